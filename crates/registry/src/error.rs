//! Errors of registry operations. Messages follow Docker's wording where
//! Docker has one, since the API layer passes them to clients unchanged.

/// Errors of [`crate::pull`], [`crate::push`] and [`crate::check_auth`].
///
/// Suggested Engine API status codes when nothing was streamed yet:
/// `NotFound` → 404, `Unauthorized` → 401 (what `POST /auth` answers),
/// `InvalidReference`/`InvalidCredentials` → 400, everything else → 500.
/// Once progress was streamed, Docker sends the message as the stream's
/// final `{"errorDetail":{"message":..},"error":..}` instead.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The manifest, tag or repository does not exist, or pull access was denied.
    /// The message is Docker's: `manifest for busybox:nope not found: manifest
    /// unknown: manifest unknown`, `pull access denied for x, repository does not
    /// exist or may require 'docker login': denied: ...`, `An image does not
    /// exist locally with the tag: x` (push).
    #[error("{0}")]
    NotFound(String),
    /// The registry refused the credentials (or none were given where needed).
    #[error("{0}")]
    Unauthorized(String),
    /// Content did not match its digest: `filesystem layer verification failed
    /// for digest sha256:...` (also `image config` and `manifest`).
    #[error("{kind} verification failed for digest {digest}")]
    DigestMismatch {
        /// `filesystem layer`, `image config` or `manifest`.
        kind: &'static str,
        /// The expected digest.
        digest: String,
    },
    /// A manifest, config or layer media type this engine cannot use
    /// (schema 1 manifests, foreign/non-distributable layers, unknown types).
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// No manifest of an index/list matches the platform:
    /// `no matching manifest for linux/amd64 in the manifest list entries`
    /// (or the single manifest's config is for another platform).
    #[error("{0}")]
    NoMatchingPlatform(String),
    /// The manifest and the image config disagree (`layers from manifest don't
    /// match image configuration`), or a manifest/config does not parse.
    #[error("{0}")]
    InvalidManifest(String),
    /// The reference does not parse or cannot be used here (Docker's wording).
    #[error("{0}")]
    InvalidReference(String),
    /// An `X-Registry-Auth` header or auth body that does not decode.
    #[error("{0}")]
    InvalidCredentials(String),
    /// The registry answered with an unexpected status or error code:
    /// `received unexpected HTTP status: 500 Internal Server Error`, or
    /// `<code>: <message>` when the body carries a registry error.
    #[error("{0}")]
    Registry(String),
    /// A plain HTTP(S) download (`docker import <URL>`) got an error status:
    /// Docker's `failed to GET <url> with status 404 Not Found: <body>`.
    /// The API answers 400, 401, 403 and 404 with the same status, as dockerd.
    #[error("{message}")]
    HttpStatus { status: u16, message: String },
    /// A URL that does not parse: `parse "<url>": <reason>`.
    #[error("{0}")]
    InvalidUrl(String),
    /// The host of a download's URL does not resolve (dockerd answers 404).
    #[error("{0}")]
    UnknownHost(String),
    /// Connecting, TLS, or reading failed. `context` is Go-like
    /// (`Get "https://registry-1.docker.io/v2/"`), `message` the cause chain.
    #[error("{context}: {message}")]
    Transport { context: String, message: String },
    /// The image store failed (or the local image is missing/invalid).
    #[error(transparent)]
    Store(#[from] vessel_image::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn transport(
        context: impl Into<String>,
        e: &(dyn std::error::Error + 'static),
    ) -> Error {
        Error::Transport {
            context: context.into(),
            message: error_chain(e),
        }
    }

    /// Whether trying the same request again (or another endpoint) may help.
    pub(crate) fn is_transport(&self) -> bool {
        matches!(self, Error::Transport { .. })
    }
}

/// `a: b: c` from an error and its sources, without repeated parts; a
/// certificate that does not verify in Go's words, as dockerd reports it
/// (`tls: failed to verify certificate: x509: certificate signed by
/// unknown authority`).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(text) = tls_text(err) {
            return text;
        }
        let s = err.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// The rustls error inside `e`: itself, or the payload of an `io::Error`
/// (perhaps wrapped in another: `source()` skips payloads), in the words of
/// Go's `crypto/tls`.
fn tls_text(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        let inner = e.downcast_ref::<std::io::Error>()?.get_ref()?;
        find(inner)
    }
    let tls = find(e)?;
    use rustls::CertificateError as C;
    Some(match tls {
        rustls::Error::InvalidCertificate(c) => {
            let why = match c {
                C::UnknownIssuer => "certificate signed by unknown authority".to_string(),
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => {
                    "certificate has expired or is not yet valid".to_string()
                }
                other => other.to_string(),
            };
            format!("tls: failed to verify certificate: x509: {why}")
        }
        other => format!("tls: {other}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_errors_read_like_go() {
        let unknown = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, unknown);
        // As reqwest hands it over: tokio-rustls's error inside another.
        let io = std::io::Error::other(io);
        assert_eq!(
            error_chain(&io),
            "tls: failed to verify certificate: x509: certificate signed by unknown authority"
        );
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(error_chain(&plain), "refused");
    }
}
