//! Archives fetched over HTTP(S): the source of `docker import <URL>`
//! (`POST /images/create?fromSrc=<URL>`), fetched as dockerd's
//! `remotecontext.GetWithStatusError` fetches it. A source without `://`
//! is `http://`; redirects are followed; HTTPS is verified with the
//! system's roots (no per-registry CAs: this is not a registry); an error
//! status is an error carrying the server's answer, with the status dockerd
//! gives it; a host that does not resolve is a not-found.
//!
//! The body is read as it arrives: nothing is buffered here, the image store
//! decompresses it into its staging area. Progress follows dockerd's
//! progress reader: an `Importing` update every 512 kB (or every 1% of a
//! known size, when that is less), at most every 100 ms, and one at the end.

use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::Method;
use url::Url;

use crate::client::{ctx, USER_AGENT};
use crate::error::{error_chain, Error, Result};
use crate::progress::Progress;

/// How much of an error response's body goes into the message.
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// dockerd's progress reader: at most this many bytes between updates...
const UPDATE_EVERY: u64 = 512 * 1024;
/// ...and at most one update per this interval (except the last).
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// The archive's bytes as they arrive; a failed read is an `io::Error`
/// naming the URL.
pub type ArchiveStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// An archive whose server answered with a success status.
pub struct Download {
    url: Url,
    total: Option<u64>,
    response: reqwest::Response,
}

/// The URL an import source names: dockerd prefixes `http://` when the
/// source has no `://`. A URL that does not parse is Docker's
/// `parse "<url>": <reason>`.
pub fn archive_url(src: &str) -> Result<Url> {
    let full = if src.contains("://") {
        src.to_string()
    } else {
        format!("http://{src}")
    };
    Url::parse(&full).map_err(|e| Error::InvalidUrl(format!("parse {full:?}: {e}")))
}

/// `GET` the archive at `src` and return it once the server answered with
/// a success status. Errors: [`Error::InvalidUrl`] (400 in the API),
/// [`Error::UnknownHost`] (404), [`Error::HttpStatus`] (`failed to GET
/// <url> with status 404 Not Found: <body>`), [`Error::Transport`] for
/// refused connections, TLS failures and schemes other than http(s).
pub async fn open_archive(src: &str) -> Result<Download> {
    let url = archive_url(src)?;
    let context = ctx(&Method::GET, &url);
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Error::Transport {
            context,
            message: format!("unsupported protocol scheme {:?}", url.scheme()),
        });
    }
    let client = reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(60))
        .use_rustls_tls()
        .build()
        .map_err(|e| Error::transport("creating HTTP client".to_string(), &e))?;
    let mut response = client.get(url.clone()).send().await.map_err(|e| {
        let message = error_chain(&e);
        // hyper's connector reports a failed name lookup as "dns error".
        if e.is_connect() && message.contains("dns error") {
            Error::UnknownHost(format!("{context}: {message}"))
        } else {
            Error::Transport { context, message }
        }
    })?;
    let status = response.status();
    if status.is_client_error() || status.is_server_error() {
        let mut body = Vec::new();
        let mut read_err = None;
        while body.len() < ERROR_BODY_LIMIT {
            match response.chunk().await {
                Ok(Some(c)) => body.extend_from_slice(&c),
                Ok(None) => break,
                Err(e) => {
                    read_err = Some(e);
                    break;
                }
            }
        }
        let mut message = format!("failed to GET {url} with status {status}");
        if read_err.is_some() {
            message.push_str(": error reading body");
        } else {
            body.truncate(ERROR_BODY_LIMIT);
            message.push_str(": ");
            message.push_str(String::from_utf8_lossy(&body).trim());
        }
        return Err(Error::HttpStatus {
            status: status.as_u16(),
            message,
        });
    }
    let total = response.content_length();
    Ok(Download {
        url,
        total,
        response,
    })
}

struct Reading<F> {
    inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    context: String,
    total: Option<u64>,
    every: u64,
    current: u64,
    last_update: u64,
    last_sent: Option<Instant>,
    ended: bool,
    progress: F,
}

impl Download {
    /// The URL fetched (after dockerd's `http://` default).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The archive's size, when the server said (`Content-Length`).
    pub fn total(&self) -> Option<u64> {
        self.total
    }

    /// The body as a byte stream, reporting [`Progress::Importing`] to
    /// `progress` as it is read.
    pub fn into_stream<F>(self, progress: F) -> ArchiveStream
    where
        F: Fn(Progress) + Send + 'static,
    {
        let every = match self.total {
            Some(t) => (t / 100).min(UPDATE_EVERY),
            None => UPDATE_EVERY,
        };
        let state = Reading {
            inner: Box::pin(self.response.bytes_stream()),
            context: ctx(&Method::GET, &self.url),
            total: self.total,
            every,
            current: 0,
            last_update: 0,
            last_sent: None,
            ended: false,
            progress,
        };
        Box::pin(futures::stream::unfold(state, |mut st| async move {
            if st.ended {
                return None;
            }
            match st.inner.next().await {
                Some(Ok(chunk)) => {
                    st.current += chunk.len() as u64;
                    if st.current - st.last_update > st.every {
                        let due = st.total == Some(st.current)
                            || st.last_sent.is_none_or(|t| t.elapsed() >= MIN_INTERVAL);
                        if due {
                            (st.progress)(Progress::Importing {
                                current: st.current,
                                total: st.total,
                            });
                            st.last_sent = Some(Instant::now());
                        }
                        st.last_update = st.current;
                    }
                    Some((Ok(chunk), st))
                }
                Some(Err(e)) => {
                    st.ended = true;
                    let err = std::io::Error::other(format!("{}: {}", st.context, error_chain(&e)));
                    Some((Err(err), st))
                }
                None => {
                    (st.progress)(Progress::Importing {
                        current: st.current,
                        total: st.total,
                    });
                    None
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_as_dockerd_reads_them() {
        assert_eq!(
            archive_url("127.0.0.1:8000/a.tar").expect("url").as_str(),
            "http://127.0.0.1:8000/a.tar"
        );
        assert_eq!(
            archive_url("https://example.com/a.tgz")
                .expect("url")
                .as_str(),
            "https://example.com/a.tgz"
        );
        let e = archive_url("http://[::1").expect_err("bad");
        assert!(matches!(e, Error::InvalidUrl(_)), "{e}");
        assert!(e.to_string().starts_with("parse \"http://[::1\": "), "{e}");
        assert!(matches!(archive_url(""), Err(Error::InvalidUrl(_))));
    }

    #[tokio::test]
    async fn other_schemes_are_refused() {
        let e = open_archive("ftp://127.0.0.1/a.tar")
            .await
            .err()
            .expect("refused");
        assert_eq!(
            e.to_string(),
            "Get \"ftp://127.0.0.1/a.tar\": unsupported protocol scheme \"ftp\""
        );
    }
}
