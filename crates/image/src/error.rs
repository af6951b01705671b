use std::io;

/// Errors of the image store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No image matches the given name, id or reference (the Engine API answers 404).
    #[error("No such image: {0}")]
    NotFound(String),
    /// The reference does not parse; the message is Docker's wording
    /// (`invalid reference format`, ...).
    #[error("{0}")]
    InvalidReference(String),
    /// A short id prefix matches more than one image.
    #[error("{0}")]
    Ambiguous(String),
    /// The tar given to `load` is not a usable docker-save archive.
    #[error("invalid archive: {0}")]
    InvalidArchive(String),
    /// A layer or rootfs tar is hostile or broken (path escapes, bad compression, ...).
    #[error("invalid layer: {0}")]
    InvalidLayer(String),
    /// A `--change` instruction of `docker import` is invalid; Docker-like message.
    #[error("{0}")]
    InvalidChange(String),
    /// The operation conflicts with the store state (Engine API 409); Docker's wording.
    #[error("{0}")]
    Conflict(String),
    /// A pulled image is inconsistent (its layers do not match its config, ...).
    #[error("{0}")]
    InvalidImage(String),
    /// Building the boot disk failed (mke2fs).
    #[error("building boot disk: {0}")]
    Disk(String),
    /// Store metadata on disk is unreadable.
    #[error("corrupt image store: {0}")]
    Corrupt(String),
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach context to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: f(),
            source,
        })
    }
}
