//! `docker pull`: resolve the reference, pick the platform's manifest, fetch
//! the config and the missing layers (up to 3 at a time, digests verified
//! while streaming), stage the layers into the store, then commit.
//!
//! Downloads go to `<store tmp>/pull-<unique>/<digest>.blob`; a download
//! broken mid-blob is resumed with a `Range` request (restarted from zero
//! if the server ignores the range) up to [`MAX_ATTEMPTS`] times. The staging
//! directory is removed when the pull ends, successful or not, so partial
//! blobs are never reused across pulls (and a killed daemon's leftovers go
//! when the store is next opened). Nothing enters the store before every
//! blob and every diff id was verified: [`ImageStore::commit_pulled`] is the
//! only write.

use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use vessel_image::{BlobRecord, ImageStore, PulledImage, PulledLayer, Reference, StagedLayer};

use crate::auth::Credentials;
use crate::client::{api_error, ctx, read_limited, ApiError, Http, Session};
use crate::error::{Error, Result};
use crate::manifest::{self, Descriptor, ImageManifest, Manifest, Platform};
use crate::progress::{short_id, Progress};

/// Layers downloaded at once (dockerd's default is 3).
pub const MAX_CONCURRENT_DOWNLOADS: usize = 3;
/// Tries per blob before a broken download fails the pull.
pub const MAX_ATTEMPTS: u32 = 3;
/// Minimum interval between two `Downloading`/`Extracting` events of a layer.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Whether a pull fetched anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullStatus {
    /// The image was new: `Status: Downloaded newer image for ...`.
    Downloaded,
    /// The image was already in the store (references updated only):
    /// `Status: Image is up to date for ...`.
    UpToDate,
}

/// Result of a pull.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullOutcome {
    /// `sha256:<hex>` of the image config.
    pub image_id: String,
    /// Digest of the manifest (or manifest list/index) the reference resolved to.
    pub digest: String,
    /// Familiar reference pulled: `busybox:latest`, `busybox@sha256:...`.
    pub reference: String,
    pub status: PullStatus,
}

pub(crate) type ProgressFn<'a> = &'a (dyn Fn(Progress) + Send + Sync);

/// A staging directory removed on drop.
struct StagingDir(PathBuf);

impl Drop for StagingDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.0.display(), error = %e, "cannot remove pull staging");
            }
        }
    }
}

fn unique_name(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{nanos:08x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub(crate) fn io_err(context: String, e: io::Error) -> Error {
    Error::Store(vessel_image::Error::Io { context, source: e })
}

pub(crate) fn join_err(e: tokio::task::JoinError) -> Error {
    Error::Registry(format!("background task failed: {e}"))
}

/// Counts the bytes read; fails once `cancel` is set.
pub(crate) struct CountingReader<R> {
    pub inner: R,
    pub count: Arc<AtomicU64>,
    pub cancel: Option<Arc<AtomicBool>>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            // Not `Interrupted`: `io::copy` would retry that forever.
            return Err(io::Error::other("pull cancelled"));
        }
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Add what the mirrors said to a final transport error.
fn with_notes(e: Error, notes: &[String]) -> Error {
    match e {
        Error::Transport { context, message } if !notes.is_empty() => Error::Transport {
            context,
            message: format!("{message} (mirrors tried first: {})", notes.join("; ")),
        },
        e => e,
    }
}

pub(crate) async fn pull(
    http: &Http,
    store: Arc<ImageStore>,
    reference: &str,
    platform: Option<Platform>,
    creds: &Credentials,
    progress: ProgressFn<'_>,
) -> Result<PullOutcome> {
    let r = Reference::parse(reference)
        .map_err(|e| Error::InvalidReference(e.to_string()))?
        .with_default_tag();
    let endpoints = http.config.endpoints(&r.domain, true).await?;
    let mut notes = Vec::new();
    for (i, ep) in endpoints.iter().enumerate() {
        let last = i + 1 == endpoints.len();
        let session = match Session::connect(http, ep, &r.path, "pull", creds).await {
            Ok(s) => s,
            Err(e) if !last && (ep.mirror || e.is_transport()) => {
                tracing::info!(endpoint = %ep.base, error = %e, "registry endpoint unusable, trying the next");
                notes.push(format!("{}: {e}", ep.base));
                continue;
            }
            Err(e) => return Err(with_notes(e, &notes)),
        };
        match pull_from(&session, &store, &r, platform.as_ref(), progress).await {
            Ok(o) => return Ok(o),
            Err(e) if ep.mirror && !last && !matches!(e, Error::Store(_)) => {
                tracing::info!(mirror = %ep.base, error = %e, "pull from mirror failed, trying the next endpoint");
                notes.push(format!("{}: {e}", ep.base));
            }
            Err(e) => return Err(with_notes(e, &notes)),
        }
    }
    Err(Error::Registry(format!(
        "no endpoint for registry {}",
        r.domain
    )))
}

/// Docker's pull errors for a failed manifest request.
fn pull_error(s: &Session, r: &Reference, e: &ApiError, context: &str) -> Error {
    let code = e.code.as_str();
    if code == "MANIFEST_UNKNOWN" || (code.is_empty() && e.status == StatusCode::NOT_FOUND) {
        let cause = if code.is_empty() {
            "manifest unknown: manifest unknown".to_string()
        } else {
            e.text()
        };
        return Error::NotFound(format!("manifest for {} not found: {cause}", r.familiar()));
    }
    if code == "NAME_UNKNOWN" {
        return Error::NotFound(format!(
            "repository {} not found: {}",
            r.familiar_name(),
            e.text()
        ));
    }
    let denied = code == "DENIED"
        || e.status == StatusCode::UNAUTHORIZED
        || e.status == StatusCode::FORBIDDEN;
    if denied {
        if s.has_credentials() && code != "DENIED" {
            return Error::Unauthorized(if code.is_empty() {
                "unauthorized: authentication required".into()
            } else {
                e.text()
            });
        }
        let cause = if code.is_empty() {
            "denied: requested access to the resource is denied".to_string()
        } else {
            e.text()
        };
        return Error::NotFound(format!(
            "pull access denied for {}, repository does not exist or may require 'docker login': {cause}",
            r.familiar_name()
        ));
    }
    Error::Registry(format!("{context}: {}", e.text()))
}

/// GET a manifest; verify it against `expect` (by-digest) or the
/// `Docker-Content-Digest` header. Returns (body, content type, digest).
async fn fetch_manifest(
    s: &Session,
    r: &Reference,
    reference: &str,
    expect: Option<&str>,
) -> Result<(Vec<u8>, String, String)> {
    let url = s.url(&format!("manifests/{reference}"))?;
    let mut h = HeaderMap::new();
    h.insert(ACCEPT, HeaderValue::from_static(manifest::ACCEPT));
    let resp = s.send(Method::GET, &url, h, None).await?;
    if !resp.status().is_success() {
        let e = api_error(resp).await;
        return Err(pull_error(s, r, &e, &ctx(&Method::GET, &url)));
    }
    let ct = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let header_digest = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = read_limited(resp, manifest::MANIFEST_LIMIT, "manifest").await?;
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
    match (expect, header_digest) {
        (Some(e), _) if e != digest => Err(Error::DigestMismatch {
            kind: "manifest",
            digest: e.to_string(),
        }),
        (None, Some(hd)) if hd.starts_with("sha256:") && hd != digest => {
            Err(Error::DigestMismatch {
                kind: "manifest",
                digest: hd,
            })
        }
        _ => Ok((body, ct, digest)),
    }
}

/// GET a small blob (the config) into memory, verified.
async fn fetch_small_blob(
    s: &Session,
    d: &Descriptor,
    limit: usize,
    kind: &'static str,
) -> Result<Vec<u8>> {
    let url = s.url(&format!("blobs/{}", d.digest))?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let res = async {
            let resp = s.send(Method::GET, &url, HeaderMap::new(), None).await?;
            if !resp.status().is_success() {
                let e = api_error(resp).await;
                return Err(Error::Registry(format!(
                    "error pulling {kind} {}: {}: {}",
                    d.digest,
                    ctx(&Method::GET, &url),
                    e.text()
                )));
            }
            read_limited(resp, limit, kind).await
        }
        .await;
        match res {
            Ok(body) => {
                let got = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
                if got != d.digest {
                    return Err(Error::DigestMismatch {
                        kind,
                        digest: d.digest.clone(),
                    });
                }
                return Ok(body);
            }
            Err(e) if e.is_transport() && attempt < MAX_ATTEMPTS => {
                tracing::info!(error = %e, "retrying {kind} download");
                tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The parts of the image config a pull checks.
#[derive(Deserialize)]
struct ConfigView {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
    rootfs: RootfsView,
}

#[derive(Deserialize)]
struct RootfsView {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// What to do about one layer of the manifest.
enum Plan {
    Existing(String),
    /// Index into the download jobs.
    Download(usize),
}

struct Job {
    desc: Descriptor,
    diff: String,
    id: String,
}

/// Shared state of the concurrent layer downloads of one pull.
struct Downloads<'a> {
    s: &'a Session,
    store: &'a Arc<ImageStore>,
    staging: &'a Path,
    progress: ProgressFn<'a>,
    cancel: Arc<AtomicBool>,
    first_error: Mutex<Option<Error>>,
}

impl Downloads<'_> {
    fn fail(&self, e: Error) {
        if !self.cancel.swap(true, Ordering::SeqCst) {
            *self.first_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Download one blob to `path`, verifying size and digest.
    async fn download(&self, job: &Job, path: &Path) -> Result<()> {
        let d = &job.desc;
        let url = self.s.url(&format!("blobs/{}", d.digest))?;
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(|e| io_err(format!("creating {}", path.display()), e))?;
        let mut hasher = Sha256::new();
        let mut offset: u64 = 0;
        let mut attempt = 0;
        let progress = self.progress;
        let mut last = Instant::now();
        progress(Progress::Downloading {
            id: job.id.clone(),
            current: 0,
            total: d.size,
        });
        loop {
            attempt += 1;
            let mut h = HeaderMap::new();
            if offset > 0 {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes={offset}-")) {
                    h.insert(RANGE, v);
                }
            }
            let result: Result<()> = async {
                let resp = self.s.send(Method::GET, &url, h, None).await?;
                let status = resp.status();
                let resumed = status == StatusCode::PARTIAL_CONTENT
                    && resp
                        .headers()
                        .get(CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.starts_with(&format!("bytes {offset}-")));
                if status == StatusCode::OK
                    || (offset > 0 && status == StatusCode::PARTIAL_CONTENT && !resumed)
                    || (offset > 0 && status == StatusCode::RANGE_NOT_SATISFIABLE)
                {
                    if offset > 0 {
                        // Range not honoured: start over.
                        file.set_len(0)
                            .await
                            .map_err(|e| io_err(format!("truncating {}", path.display()), e))?;
                        use tokio::io::AsyncSeekExt;
                        file.seek(io::SeekFrom::Start(0))
                            .await
                            .map_err(|e| io_err(format!("seeking {}", path.display()), e))?;
                        hasher = Sha256::new();
                        offset = 0;
                    }
                    if status != StatusCode::OK {
                        return Err(Error::Transport {
                            context: ctx(&Method::GET, &url),
                            message: format!(
                                "range request answered with {status}, restarting the download"
                            ),
                        });
                    }
                } else if !resumed {
                    let retry =
                        status.is_server_error() || status == StatusCode::RANGE_NOT_SATISFIABLE;
                    let e = api_error(resp).await;
                    let msg = format!("{}: {}", ctx(&Method::GET, &url), e.text());
                    return Err(if retry {
                        Error::Transport {
                            context: ctx(&Method::GET, &url),
                            message: e.text(),
                        }
                    } else {
                        Error::Registry(msg)
                    });
                }
                let mut stream = resp.bytes_stream();
                while let Some(chunk) = stream.next().await {
                    if self.cancelled() {
                        return Err(Error::Registry("pull cancelled".into()));
                    }
                    let chunk = chunk.map_err(|e| Error::transport(ctx(&Method::GET, &url), &e))?;
                    if d.size > 0 && offset + chunk.len() as u64 > d.size {
                        return Err(Error::DigestMismatch {
                            kind: "filesystem layer",
                            digest: d.digest.clone(),
                        });
                    }
                    file.write_all(&chunk)
                        .await
                        .map_err(|e| io_err(format!("writing {}", path.display()), e))?;
                    hasher.update(&chunk);
                    offset += chunk.len() as u64;
                    if last.elapsed() >= PROGRESS_INTERVAL {
                        last = Instant::now();
                        progress(Progress::Downloading {
                            id: job.id.clone(),
                            current: offset,
                            total: d.size,
                        });
                    }
                }
                if d.size > 0 && offset < d.size {
                    return Err(Error::Transport {
                        context: ctx(&Method::GET, &url),
                        message: format!("unexpected EOF after {offset} of {} bytes", d.size),
                    });
                }
                Ok(())
            }
            .await;
            match result {
                Ok(()) => break,
                Err(e) if e.is_transport() && attempt < MAX_ATTEMPTS && !self.cancelled() => {
                    tracing::info!(blob = %d.digest, offset, error = %e, "download broke, retrying");
                    let secs = u64::from(attempt);
                    progress(Progress::Retrying {
                        id: job.id.clone(),
                        seconds: secs,
                    });
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                }
                Err(e) => return Err(e),
            }
        }
        file.flush()
            .await
            .map_err(|e| io_err(format!("writing {}", path.display()), e))?;
        drop(file);
        progress(Progress::Downloading {
            id: job.id.clone(),
            current: offset,
            total: d.size,
        });
        progress(Progress::VerifyingChecksum { id: job.id.clone() });
        let got = format!("sha256:{}", hex::encode(hasher.finalize()));
        if got != d.digest {
            return Err(Error::DigestMismatch {
                kind: "filesystem layer",
                digest: d.digest.clone(),
            });
        }
        progress(Progress::DownloadComplete { id: job.id.clone() });
        Ok(())
    }

    /// Decompress a verified blob into the store's staging area; check its diff id.
    async fn extract(&self, job: &Job, path: &Path) -> Result<StagedLayer> {
        let count = Arc::new(AtomicU64::new(0));
        let store = self.store.clone();
        let p = path.to_path_buf();
        let reader_count = count.clone();
        let cancel = self.cancel.clone();
        let mut handle = tokio::task::spawn_blocking(move || -> Result<StagedLayer> {
            let f = std::fs::File::open(&p)
                .map_err(|e| io_err(format!("opening {}", p.display()), e))?;
            let r = CountingReader {
                inner: f,
                count: reader_count,
                cancel: Some(cancel),
            };
            Ok(store.stage_layer(BufReader::with_capacity(256 * 1024, r))?)
        });
        let total = Some(job.desc.size).filter(|s| *s > 0);
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        let mut shown = u64::MAX;
        let staged = loop {
            tokio::select! {
                r = &mut handle => break r.map_err(join_err)??,
                _ = tick.tick() => {
                    let c = count.load(Ordering::Relaxed);
                    if c != shown {
                        shown = c;
                        (self.progress)(Progress::Extracting { id: job.id.clone(), current: c, total });
                    }
                }
            }
        };
        let c = count.load(Ordering::Relaxed);
        if c != shown {
            (self.progress)(Progress::Extracting {
                id: job.id.clone(),
                current: c,
                total,
            });
        }
        if let Err(e) = tokio::fs::remove_file(path).await {
            tracing::debug!(path = %path.display(), error = %e, "cannot remove downloaded blob");
        }
        if staged.diff_id() != job.diff {
            return Err(Error::InvalidManifest(format!(
                "layers from manifest don't match image configuration: layer {} is {}, the config says {}",
                job.desc.digest,
                staged.diff_id(),
                job.diff
            )));
        }
        (self.progress)(Progress::PullComplete { id: job.id.clone() });
        Ok(staged)
    }

    async fn run(&self, job: &Job, sem: &tokio::sync::Semaphore) -> Option<StagedLayer> {
        let _permit = match sem.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                (self.progress)(Progress::Waiting { id: job.id.clone() });
                match sem.acquire().await {
                    Ok(p) => p,
                    Err(e) => {
                        self.fail(Error::Registry(format!("download queue closed: {e}")));
                        return None;
                    }
                }
            }
        };
        if self.cancelled() {
            return None;
        }
        let hex = job.desc.digest.trim_start_matches("sha256:");
        let path = self.staging.join(format!("{hex}.blob"));
        let res = async {
            self.download(job, &path).await?;
            self.extract(job, &path).await
        }
        .await;
        match res {
            Ok(s) => Some(s),
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(join_err)?
}

async fn pull_from(
    s: &Session,
    store: &Arc<ImageStore>,
    r: &Reference,
    platform: Option<&Platform>,
    progress: ProgressFn<'_>,
) -> Result<PullOutcome> {
    let tag_or_digest = r
        .digest
        .clone()
        .or_else(|| r.tag.clone())
        .unwrap_or_else(|| "latest".into());
    progress(Progress::PullingFrom {
        id: tag_or_digest.clone(),
        repository: r.path.clone(),
    });
    let (body, ct, top_digest) = fetch_manifest(s, r, &tag_or_digest, r.digest.as_deref()).await?;
    let (m, from_list): (ImageManifest, bool) = match manifest::parse(&body, &ct)? {
        Manifest::Image(m) => (m, false),
        Manifest::Index(idx) => {
            let want = platform.cloned().unwrap_or_default();
            let d = manifest::select(&idx, &want)?;
            let (b, ct2, _) = fetch_manifest(s, r, &d.digest, Some(&d.digest)).await?;
            match manifest::parse(&b, &ct2)? {
                Manifest::Image(m) => (m, true),
                Manifest::Index(_) => {
                    return Err(Error::InvalidManifest(format!(
                        "manifest list entry {} is itself a manifest list",
                        d.digest
                    )))
                }
            }
        }
    };
    manifest::check_config(&m.config)?;
    manifest::digest_hex(&m.config.digest)?;
    for l in &m.layers {
        manifest::layer_compression(l)?;
        manifest::digest_hex(&l.digest)?;
    }
    let familiar = if r.digest.is_some() {
        format!("{}@{}", r.familiar_name(), tag_or_digest)
    } else {
        r.familiar()
    };
    let tag = r.digest.is_none().then(|| familiar.clone());
    let repo_digest = format!("{}@{top_digest}", r.familiar_name());
    let image_id = m.config.digest.clone();

    // Already have the image: only the references change.
    let exists = {
        let st = store.clone();
        let id = image_id.clone();
        blocking(move || Ok(st.resolve(&id).is_ok())).await?
    };
    if exists {
        let st = store.clone();
        let (id, t, rd) = (image_id.clone(), tag.clone(), repo_digest.clone());
        // As Docker: "up to date" only when the reference already named
        // this image; a new tag for an image we have is "newer".
        let already = blocking(move || {
            let already = match &t {
                Some(t) => st.resolve(t).is_ok_and(|i| i.id == id),
                None => st.repo_digests(&id).is_ok_and(|d| d.contains(&rd)),
            };
            if let Some(t) = t {
                st.tag(&id, &t)?;
            }
            st.add_repo_digest(&id, &rd)?;
            Ok(already)
        })
        .await?;
        progress(Progress::Digest {
            digest: top_digest.clone(),
        });
        let status = if already {
            progress(Progress::ImageUpToDate {
                reference: familiar.clone(),
            });
            PullStatus::UpToDate
        } else {
            progress(Progress::DownloadedNewerImage {
                reference: familiar.clone(),
            });
            PullStatus::Downloaded
        };
        return Ok(PullOutcome {
            image_id,
            digest: top_digest,
            reference: familiar,
            status,
        });
    }

    let config = fetch_small_blob(s, &m.config, manifest::CONFIG_LIMIT, "image config").await?;
    let view: ConfigView = serde_json::from_slice(&config)
        .map_err(|e| Error::InvalidManifest(format!("invalid image config {image_id}: {e}")))?;
    if view.rootfs.diff_ids.len() != m.layers.len() {
        return Err(Error::InvalidManifest(
            "layers from manifest don't match image configuration".into(),
        ));
    }
    if let (Some(want), false) = (platform, from_list) {
        let have = Platform {
            os: if view.os.is_empty() {
                "linux".into()
            } else {
                view.os.clone()
            },
            architecture: view.architecture.clone(),
            variant: view.variant.clone(),
        }
        .normalized();
        let want = want.normalized();
        if have.os != want.os || have.architecture != want.architecture {
            return Err(Error::NoMatchingPlatform(format!(
                "image with reference {familiar} was found but does not match the specified platform: wanted {want}, actual: {have}"
            )));
        }
    }

    // Plan: skip layers the store has, download each other blob once.
    let mut plan = Vec::new();
    let mut jobs: Vec<Job> = Vec::new();
    for (d, diff) in m.layers.iter().zip(&view.rootfs.diff_ids) {
        let id = short_id(&d.digest);
        if let Some(j) = jobs.iter().position(|j| j.desc.digest == d.digest) {
            if jobs[j].diff != *diff {
                return Err(Error::InvalidManifest(
                    "layers from manifest don't match image configuration".into(),
                ));
            }
            plan.push(Plan::Existing(diff.clone()));
            continue;
        }
        if store.has_layer(diff) {
            progress(Progress::AlreadyExists { id });
            plan.push(Plan::Existing(diff.clone()));
            continue;
        }
        progress(Progress::PullingFsLayer { id: id.clone() });
        plan.push(Plan::Download(jobs.len()));
        jobs.push(Job {
            desc: d.clone(),
            diff: diff.clone(),
            id,
        });
    }

    let staging_path = store.tmp_dir().join(unique_name("pull"));
    std::fs::create_dir_all(&staging_path)
        .map_err(|e| io_err(format!("creating {}", staging_path.display()), e))?;
    let staging = StagingDir(staging_path);
    let dl = Downloads {
        s,
        store,
        staging: &staging.0,
        progress,
        cancel: Arc::new(AtomicBool::new(false)),
        first_error: Mutex::new(None),
    };
    let sem = tokio::sync::Semaphore::new(MAX_CONCURRENT_DOWNLOADS);
    let results = futures::future::join_all(jobs.iter().map(|j| dl.run(j, &sem))).await;
    if let Some(e) = dl
        .first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        return Err(e);
    }
    let mut staged: Vec<Option<StagedLayer>> = results;
    if staged.iter().any(Option::is_none) {
        return Err(Error::Registry("a layer download was cancelled".into()));
    }
    let mut layers = Vec::with_capacity(plan.len());
    for p in plan {
        layers.push(match p {
            Plan::Existing(d) => PulledLayer::Existing(d),
            Plan::Download(j) => match staged.get_mut(j).and_then(Option::take) {
                Some(s) => PulledLayer::Staged(s),
                None => PulledLayer::Existing(jobs[j].diff.clone()),
            },
        });
    }
    let pulled = PulledImage {
        config,
        layers,
        tag: tag.clone(),
        repo_digest: Some(repo_digest),
    };
    let st = store.clone();
    let records: Vec<BlobRecord> = jobs
        .iter()
        .map(|j| BlobRecord {
            diff_id: j.diff.clone(),
            digest: j.desc.digest.clone(),
            media_type: j.desc.media_type.clone(),
            size: j.desc.size,
            repository: r.full_name(),
        })
        .collect();
    let outcome = blocking(move || {
        let o = st.commit_pulled(pulled)?;
        for rec in records {
            if let Err(e) = st.record_blob(rec) {
                tracing::warn!(error = %e, "cannot record blob source");
            }
        }
        Ok(o)
    })
    .await?;
    drop(staging);
    progress(Progress::Digest {
        digest: top_digest.clone(),
    });
    let status = if outcome.new_image {
        progress(Progress::DownloadedNewerImage {
            reference: familiar.clone(),
        });
        PullStatus::Downloaded
    } else {
        progress(Progress::ImageUpToDate {
            reference: familiar.clone(),
        });
        PullStatus::UpToDate
    };
    Ok(PullOutcome {
        image_id: outcome.id,
        digest: top_digest,
        reference: familiar,
        status,
    })
}
