//! `vessel-image`: the image store of Vessel.
//!
//! This crate owns everything about images on the host:
//! - image metadata (config JSON blobs addressed by digest, per-image metadata,
//!   the reference → image id table),
//! - layers (uncompressed layer tars, kept by diff id for a later `docker save`/push),
//! - reference names (parsing, validation and normalisation of Docker references),
//! - boot disks (one read-only ext4 image per image, the flattened root filesystem
//!   a microVM boots from),
//! - `docker save` archives, history, prune and disk usage,
//! - what a registry client needs from the store (layer presence, staging and
//!   committing pulled images, reading layers for push, repo digests, records of
//!   which compressed registry blob holds which layer); the registry protocol
//!   itself lives in `vessel-registry`.
//!
//! It must not do: HTTP (the API crate serialises [`Image`] into Engine API JSON),
//! VMs (the vm crate boots the disk returned by [`ImageStore::boot_disk`]), or
//! container state (callers pass the users of an image to [`ImageStore::remove`]).
//!
//! The API is synchronous and blocking; the engine calls it through
//! `spawn_blocking`. [`ImageStore`] is `Send + Sync`.

mod archive;
mod changes;
mod disk;
mod error;
mod extract;
pub mod reference;
mod store;

pub use changes::{apply_changes, go_duration};
pub use error::{Error, Result};
pub use extract::{extract_archive, extract_layer};
pub use reference::Reference;
pub use store::{
    BlobRecord, CommitOutcome, DeleteItem, DiskUsage, HistoryItem, Image, ImageConfig, ImageStore,
    ImageUsage, PruneFilters, PruneReport, PulledImage, PulledLayer, StagedLayer,
};
