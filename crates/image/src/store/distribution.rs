//! What a registry client (`vessel-registry`) needs from the store: layer
//! presence by diff id, staging verified layers, committing a pulled image,
//! reading layer tars for push, repo digests, and the compressed-blob ↔
//! diff-id records.
//!
//! The registry client never sees the store layout: it stages layers through
//! [`ImageStore::stage_layer`] (files under `tmp/`, deleted when the
//! [`StagedLayer`] is dropped) and hands them back to
//! [`ImageStore::commit_pulled`], which verifies them against the config and
//! commits everything at once.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{
    is_digest_ref, parse_config, write_atomic, ImageStore, LayerEntry, StagedImage, State,
};
use crate::error::{Error, IoContext, Result};
use crate::reference::{is_hex64, Reference};

/// File (under the store root) holding the [`BlobRecord`]s.
pub(super) const FILE: &str = "distribution.json";

/// At most this many records are kept per layer (Docker keeps 50).
const MAX_RECORDS_PER_LAYER: usize = 50;

/// A registry blob known to hold a layer: "blob `digest` in `repository` is the
/// compressed form of layer `diff_id`".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRecord {
    /// The uncompressed layer, `sha256:<hex>`.
    pub diff_id: String,
    /// The compressed blob, `sha256:<hex>`.
    pub digest: String,
    /// The blob's media type (`application/vnd.docker.image.rootfs.diff.tar.gzip`, ...).
    pub media_type: String,
    /// The blob's size in bytes.
    pub size: u64,
    /// The fully qualified repository the blob was pulled from or pushed to:
    /// `docker.io/library/busybox`, `localhost:5000/a/b`. The registry is the
    /// part before the first `/`.
    pub repository: String,
}

/// An uncompressed layer staged under the store's `tmp/`, with its diff id
/// computed while it was written. Dropping it deletes the staged file (unless
/// [`ImageStore::commit_pulled`] moved it into the store).
#[derive(Debug)]
pub struct StagedLayer {
    diff_id: String,
    size: u64,
    blob_digest: String,
    path: PathBuf,
}

impl StagedLayer {
    /// `sha256:<hex>` of the uncompressed tar.
    pub fn diff_id(&self) -> &str {
        &self.diff_id
    }
    /// Size of the uncompressed tar, bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// `sha256:<hex>` of the bytes read (the compressed blob as given).
    pub fn blob_digest(&self) -> &str {
        &self.blob_digest
    }
}

impl Drop for StagedLayer {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove staged layer");
            }
        }
    }
}

/// One layer of a pulled image, in config order.
#[derive(Debug)]
pub enum PulledLayer {
    /// The store already has this diff id (`sha256:<hex>`, see
    /// [`ImageStore::has_layer`]), or an earlier `Staged` entry of the same
    /// image holds it (a layer repeated in one image).
    Existing(String),
    /// A freshly staged layer.
    Staged(StagedLayer),
}

/// A pulled image ready to be committed by [`ImageStore::commit_pulled`].
#[derive(Debug)]
pub struct PulledImage {
    /// The image config JSON exactly as fetched (its sha256 is the image id).
    pub config: Vec<u8>,
    /// The layers, lowest first; their diff ids must equal the config's `rootfs.diff_ids`.
    pub layers: Vec<PulledLayer>,
    /// Tag to point at the image (`busybox:latest`, `localhost:5000/a:1`), if pulled by tag.
    pub tag: Option<String>,
    /// Repo digest to record (`busybox@sha256:<manifest digest>`), if known.
    pub repo_digest: Option<String>,
}

/// What [`ImageStore::commit_pulled`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOutcome {
    /// `sha256:<hex>`
    pub id: String,
    /// False when the image was already in the store (only references changed).
    pub new_image: bool,
}

fn diff_hex(d: &str) -> Result<&str> {
    match d.strip_prefix("sha256:") {
        Some(h) if is_hex64(h) => Ok(h),
        _ => Err(Error::InvalidImage(format!("unsupported digest {d:?}"))),
    }
}

/// Parse a digest reference (`name@sha256:...`, a tag is dropped) into its
/// familiar key.
fn digest_key(reference: &str) -> Result<String> {
    let r = Reference::parse(reference)?;
    match &r.digest {
        Some(d) => Ok(format!("{}@{d}", r.familiar_name())),
        None => Err(Error::InvalidReference(format!(
            "{reference} is not a digest reference"
        ))),
    }
}

/// Parse a tag reference (tag defaults to `latest`) into its familiar key.
fn tag_key(reference: &str) -> Result<Reference> {
    let r = Reference::parse(reference)?;
    if r.digest.is_some() {
        return Err(Error::InvalidReference(
            "refusing to create a tag with a digest reference".into(),
        ));
    }
    Ok(r.with_default_tag())
}

impl ImageStore {
    /// Whether the layer with this diff id (`sha256:<hex>` or hex) is in the store.
    pub fn has_layer(&self, diff_id: &str) -> bool {
        let hex = diff_id.strip_prefix("sha256:").unwrap_or(diff_id);
        if !is_hex64(hex) {
            return false;
        }
        let st = self.read_state();
        st.images
            .values()
            .any(|m| m.layers.iter().any(|l| l == hex))
            && self.layer_path(hex).is_file()
    }

    /// The store's staging directory (`<root>/tmp`), emptied when the store is
    /// opened. Registry downloads keep their partial blobs there.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Decompress a layer blob (gzip, zstd or plain tar, detected from its
    /// first bytes) from `reader` into a staged file, computing its diff id and
    /// the digest of the bytes read. The caller compares the diff id with what
    /// it expects; [`ImageStore::commit_pulled`] checks it again.
    pub fn stage_layer(&self, reader: impl Read) -> Result<StagedLayer> {
        let path = self
            .root
            .join("tmp")
            .join(format!("layer-{:016x}.tar", rand::random::<u64>()));
        let mut staged = StagedLayer {
            diff_id: String::new(),
            size: 0,
            blob_digest: String::new(),
            path,
        };
        let (diff, size, blob) = Self::stage_layer_into(reader, &staged.path)?;
        staged.diff_id = format!("sha256:{diff}");
        staged.size = size;
        staged.blob_digest = format!("sha256:{blob}");
        Ok(staged)
    }

    /// Commit a pulled image: verify the layers against the config's diff ids,
    /// build the boot disk (as `load` does), then move config, layers and disk
    /// into the store and record the tag and repo digest, all or nothing.
    /// A tag that pointed at another image moves to this one.
    pub fn commit_pulled(&self, img: PulledImage) -> Result<CommitOutcome> {
        let hex = hex::encode(Sha256::digest(&img.config));
        let value: Value = serde_json::from_slice(&img.config)
            .map_err(|e| Error::InvalidImage(format!("image config sha256:{hex}: {e}")))?;
        let (_, diffs, created) = parse_config(&value)
            .map_err(|e| Error::InvalidImage(format!("image config sha256:{hex}: {e}")))?;
        if diffs.len() != img.layers.len() {
            return Err(Error::InvalidImage(
                "layers from manifest don't match image configuration".into(),
            ));
        }
        let tag = img.tag.as_deref().map(tag_key).transpose()?;
        let digest_ref = img.repo_digest.as_deref().map(digest_key).transpose()?;
        let mut entries: Vec<LayerEntry> = Vec::new();
        for (layer, diff) in img.layers.iter().zip(&diffs) {
            let (got, entry) = match layer {
                PulledLayer::Existing(d) => {
                    let h = diff_hex(d)?;
                    if let Some(e) = entries.iter().find(|e| e.diff == h && !e.in_store) {
                        // The same layer staged earlier in this image.
                        let e = LayerEntry {
                            diff: e.diff.clone(),
                            size: e.size,
                            path: e.path.clone(),
                            in_store: false,
                        };
                        if h != diff {
                            return Err(Error::InvalidImage(format!(
                                "layers from manifest don't match image configuration: layer is sha256:{h}, config says sha256:{diff}"
                            )));
                        }
                        entries.push(e);
                        continue;
                    }
                    let path = self.layer_path(h);
                    let size = fs::metadata(&path)
                        .map_err(|e| {
                            Error::InvalidImage(format!("layer {d} is not in the store: {e}"))
                        })?
                        .len();
                    (
                        h,
                        LayerEntry {
                            diff: h.to_string(),
                            size,
                            path,
                            in_store: true,
                        },
                    )
                }
                PulledLayer::Staged(s) => {
                    let h = diff_hex(&s.diff_id)?;
                    (
                        h,
                        LayerEntry {
                            diff: h.to_string(),
                            size: s.size,
                            path: s.path.clone(),
                            in_store: false,
                        },
                    )
                }
            };
            if got != diff {
                return Err(Error::InvalidImage(format!(
                    "layers from manifest don't match image configuration: layer is sha256:{got}, config says sha256:{diff}"
                )));
            }
            entries.push(entry);
        }
        let exists = self.read_state().images.contains_key(&hex);
        let staging = self.staging("pull")?;
        let disk = if exists && self.disk_path(&hex).is_file() {
            None
        } else {
            let paths: Vec<&Path> = entries.iter().map(|l| l.path.as_path()).collect();
            Some(self.stage_disk(&staging.0, &hex, &paths)?)
        };
        let staged = StagedImage {
            hex: hex.clone(),
            config: img.config.clone(),
            layers: entries,
            disk,
            tags: tag.into_iter().collect(),
            digest_refs: digest_ref.into_iter().collect(),
            created,
        };
        let mut st = self.write_state();
        let new_image = !st.images.contains_key(&hex);
        for l in &staged.layers {
            if l.in_store && !l.path.is_file() {
                return Err(Error::InvalidImage(format!(
                    "layer sha256:{} was removed from the store during the pull; pull again",
                    l.diff
                )));
            }
        }
        self.commit(&mut st, std::slice::from_ref(&staged), &mut Vec::new())?;
        Ok(CommitOutcome {
            id: format!("sha256:{hex}"),
            new_image,
        })
    }

    /// Record a repo digest (`localhost:5000/a@sha256:<manifest digest>`) for an
    /// image (any name [`ImageStore::resolve`] accepts), as a push does.
    pub fn add_repo_digest(&self, image: &str, repo_digest: &str) -> Result<()> {
        let key = digest_key(repo_digest)?;
        let mut st = self.write_state();
        let (hex, _) = Self::lookup(&st, image)?;
        let old = st.repos.insert(key.clone(), hex);
        if let Err(e) = self.save_repos(&st) {
            match old {
                Some(o) => st.repos.insert(key, o),
                None => st.repos.remove(&key),
            };
            return Err(e);
        }
        Ok(())
    }

    /// The repo digests (familiar `name@sha256:...`) pointing at an image.
    pub fn repo_digests(&self, image: &str) -> Result<Vec<String>> {
        let st = self.read_state();
        let (hex, _) = Self::lookup(&st, image)?;
        Ok(st
            .repos
            .iter()
            .filter(|(k, h)| **h == hex && is_digest_ref(k))
            .map(|(k, _)| k.clone())
            .collect())
    }

    /// The exact config bytes of an image (any name [`ImageStore::resolve`]
    /// accepts) and its id, for push.
    pub fn config_blob(&self, image: &str) -> Result<(String, Vec<u8>)> {
        let hex = {
            let st = self.read_state();
            Self::lookup(&st, image)?.0
        };
        let bp = self.blob_path(&hex);
        let data = fs::read(&bp).ctx(|| format!("reading image config {}", bp.display()))?;
        Ok((format!("sha256:{hex}"), data))
    }

    /// Open a layer's uncompressed tar for reading (push); returns the file and its size.
    pub fn open_layer(&self, diff_id: &str) -> Result<(File, u64)> {
        let hex = diff_hex(diff_id)?;
        let path = self.layer_path(hex);
        let f = File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound(format!("layer {diff_id}"))
            } else {
                Error::Io {
                    context: format!("opening {}", path.display()),
                    source: e,
                }
            }
        })?;
        let len = f
            .metadata()
            .ctx(|| format!("inspecting {}", path.display()))?
            .len();
        Ok((f, len))
    }

    /// Remember that `record.digest` in `record.repository` holds layer
    /// `record.diff_id`. Ignored (Ok) when the layer is not in the store;
    /// the records of a layer go when the layer is garbage collected.
    pub fn record_blob(&self, record: BlobRecord) -> Result<()> {
        let hex = diff_hex(&record.diff_id)?.to_string();
        diff_hex(&record.digest)?;
        let mut st = self.write_state();
        if !st.images.values().any(|m| m.layers.contains(&hex)) {
            return Ok(());
        }
        let list = st.blobs.entry(hex.clone()).or_default();
        if list.contains(&record) {
            return Ok(());
        }
        let before = list.clone();
        list.retain(|r| !(r.digest == record.digest && r.repository == record.repository));
        list.insert(0, record);
        list.truncate(MAX_RECORDS_PER_LAYER);
        if let Err(e) = self.save_blobs(&st) {
            st.blobs.insert(hex, before);
            return Err(e);
        }
        Ok(())
    }

    /// The blobs known to hold a layer (newest record first).
    pub fn blob_records(&self, diff_id: &str) -> Vec<BlobRecord> {
        let hex = diff_id.strip_prefix("sha256:").unwrap_or(diff_id);
        self.read_state()
            .blobs
            .get(hex)
            .cloned()
            .unwrap_or_default()
    }

    /// The diff id (`sha256:<hex>`) of the layer a compressed blob holds, if recorded.
    pub fn diff_id_for_blob(&self, digest: &str) -> Option<String> {
        let st = self.read_state();
        st.blobs
            .values()
            .flatten()
            .find(|r| r.digest == digest)
            .map(|r| r.diff_id.clone())
    }

    pub(super) fn save_blobs(&self, st: &State) -> Result<()> {
        let all: Vec<&BlobRecord> = st.blobs.values().flatten().collect();
        let data = serde_json::to_vec_pretty(&all).map_err(|e| Error::Corrupt(e.to_string()))?;
        write_atomic(&self.root.join(FILE), &data)
    }
}
