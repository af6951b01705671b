//! `docker push`: layers (skip, mount or upload), then the config, then a
//! Docker schema 2 manifest.
//!
//! For each layer the store's [`BlobRecord`]s name the gzip blobs known to
//! hold it on this registry: each is checked with `HEAD` in the target
//! repository (`Layer already exists`), then mounted from its source
//! repository (`Mounted from <repo>`). Otherwise the stored uncompressed tar
//! is gzip-compressed on the fly (flate2, level 6, no name, mtime 0, so the
//! same layer always gives the same blob) and uploaded with `POST`, 8 MiB
//! `PATCH` chunks and a final `PUT ?digest=`. Every blob pushed is recorded,
//! so a second push finds it again.

use std::io::{self, BufReader, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use vessel_image::{BlobRecord, ImageStore, Reference};

use crate::auth::Credentials;
use crate::client::{Http, Session, UploadStart};
use crate::error::{Error, Result};
use crate::manifest::{DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_MANIFEST};
use crate::progress::{short_id, Progress};
use crate::pull::{blocking, join_err, CountingReader, ProgressFn};

/// Upload chunk size.
pub const CHUNK_SIZE: usize = 8 << 20;
/// Layers uploaded at once.
pub const MAX_CONCURRENT_UPLOADS: usize = 3;

/// Result of a push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushOutcome {
    /// The tag pushed (`latest`).
    pub tag: String,
    /// Digest of the manifest pushed.
    pub digest: String,
    /// Size of the manifest in bytes.
    pub size: u64,
}

fn is_gzip(media_type: &str) -> bool {
    media_type == DOCKER_LAYER_GZIP || media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
}

/// Collects compressed output into chunks sent to the uploader.
struct ChunkSink {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    buf: Vec<u8>,
    hasher: Sha256,
    total: u64,
}

impl ChunkSink {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(CHUNK_SIZE),
        ));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "upload stopped"))
    }
}

impl Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.hasher.update(data);
        self.total += data.len() as u64;
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK_SIZE {
            self.send()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Pusher<'a> {
    s: &'a Session,
    store: &'a Arc<ImageStore>,
    r: &'a Reference,
    progress: ProgressFn<'a>,
}

/// (digest, size) of a pushed layer blob.
type Pushed = (String, u64);

impl Pusher<'_> {
    async fn record(&self, diff: &str, digest: &str, size: u64) {
        let rec = BlobRecord {
            diff_id: diff.to_string(),
            digest: digest.to_string(),
            media_type: DOCKER_LAYER_GZIP.to_string(),
            size,
            repository: self.r.full_name(),
        };
        let st = self.store.clone();
        if let Err(e) = blocking(move || Ok(st.record_blob(rec)?)).await {
            tracing::warn!(error = %e, "cannot record pushed blob");
        }
    }

    async fn layer(&self, diff: &str) -> Result<Pushed> {
        let id = short_id(diff);
        let target = self.r.full_name();
        let prefix = format!("{}/", self.r.domain);
        let candidates: Vec<BlobRecord> = self
            .store
            .blob_records(diff)
            .into_iter()
            .filter(|b| is_gzip(&b.media_type) && b.repository.starts_with(&prefix))
            .collect();
        // Already in the target repository?
        for c in candidates.iter().take(5) {
            if self.s.blob_exists(&c.digest).await?.is_some() {
                (self.progress)(Progress::LayerAlreadyExists { id });
                self.record(diff, &c.digest, c.size).await;
                return Ok((c.digest.clone(), c.size));
            }
        }
        // Mount from another repository of the same registry.
        let mut location = None;
        for c in candidates.iter().filter(|c| c.repository != target).take(3) {
            let from = &c.repository[prefix.len()..];
            self.s.add_scope(format!("repository:{from}:pull"));
            match self.s.start_upload(Some((&c.digest, from))).await {
                Ok(UploadStart::Mounted) => {
                    (self.progress)(Progress::MountedFrom {
                        id,
                        from: from.to_string(),
                    });
                    self.record(diff, &c.digest, c.size).await;
                    return Ok((c.digest.clone(), c.size));
                }
                Ok(UploadStart::Location(l)) => {
                    location = Some(l);
                    break;
                }
                Err(e) => {
                    tracing::info!(blob = %c.digest, from, error = %e, "cross-repository mount failed");
                }
            }
        }
        let location = match location {
            Some(l) => l,
            None => match self.s.start_upload(None).await? {
                UploadStart::Location(l) => l,
                UploadStart::Mounted => {
                    return Err(Error::Registry(
                        "registry answered an upload with a mount".into(),
                    ))
                }
            },
        };
        let pushed = self.upload(diff, &id, location).await?;
        (self.progress)(Progress::Pushed { id });
        self.record(diff, &pushed.0, pushed.1).await;
        Ok(pushed)
    }

    /// Compress the layer on a blocking thread and upload it in chunks.
    async fn upload(&self, diff: &str, id: &str, mut location: url::Url) -> Result<Pushed> {
        let (file, size) = {
            let st = self.store.clone();
            let d = diff.to_string();
            blocking(move || Ok(st.open_layer(&d)?)).await?
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(2);
        let read = Arc::new(AtomicU64::new(0));
        let reader = CountingReader {
            inner: file,
            count: read.clone(),
            cancel: None,
        };
        let handle = tokio::task::spawn_blocking(move || -> io::Result<(String, u64)> {
            let sink = ChunkSink {
                tx,
                buf: Vec::with_capacity(CHUNK_SIZE),
                hasher: Sha256::new(),
                total: 0,
            };
            let mut enc = flate2::GzBuilder::new().write(sink, flate2::Compression::default());
            io::copy(&mut BufReader::with_capacity(256 * 1024, reader), &mut enc)?;
            let mut sink = enc.finish()?;
            sink.send()?;
            Ok((
                format!("sha256:{}", hex::encode(sink.hasher.finalize())),
                sink.total,
            ))
        });
        (self.progress)(Progress::Pushing {
            id: id.to_string(),
            current: 0,
            total: size,
        });
        let mut offset = 0u64;
        while let Some(chunk) = rx.recv().await {
            let len = chunk.len() as u64;
            location = self.s.upload_chunk(&location, offset, chunk).await?;
            offset += len;
            (self.progress)(Progress::Pushing {
                id: id.to_string(),
                current: read.load(Ordering::Relaxed),
                total: size,
            });
        }
        let (digest, total) = handle
            .await
            .map_err(join_err)?
            .map_err(|e| crate::pull::io_err(format!("compressing layer {diff}"), e))?;
        self.s
            .finish_upload(&location, &digest, Bytes::new())
            .await?;
        Ok((digest, total))
    }

    async fn run(
        &self,
        diff: &str,
        sem: &tokio::sync::Semaphore,
        first_error: &Mutex<Option<Error>>,
    ) -> Option<Pushed> {
        let _permit = match sem.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                (self.progress)(Progress::Waiting { id: short_id(diff) });
                sem.acquire().await.ok()?
            }
        };
        if first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return None;
        }
        match self.layer(diff).await {
            Ok(p) => Some(p),
            Err(e) => {
                let mut fe = first_error.lock().unwrap_or_else(|p| p.into_inner());
                if fe.is_none() {
                    *fe = Some(e);
                }
                None
            }
        }
    }
}

pub(crate) async fn push(
    http: &Http,
    store: Arc<ImageStore>,
    reference: &str,
    creds: &Credentials,
    progress: ProgressFn<'_>,
) -> Result<PushOutcome> {
    let r = Reference::parse(reference).map_err(|e| Error::InvalidReference(e.to_string()))?;
    if r.digest.is_some() {
        return Err(Error::InvalidReference(
            "cannot push a digest reference".into(),
        ));
    }
    let r = r.with_default_tag();
    let tag = r.tag.clone().unwrap_or_else(|| "latest".into());
    let (image_id, config, layers) = {
        let st = store.clone();
        let fam = r.familiar();
        let name = r.familiar_name();
        blocking(move || {
            let img = st.resolve(&fam).map_err(|e| match e {
                vessel_image::Error::NotFound(_) => Error::NotFound(format!(
                    "An image does not exist locally with the tag: {name}"
                )),
                e => Error::Store(e),
            })?;
            let (id, config) = st.config_blob(&img.id)?;
            Ok((id, config, img.layers))
        })
        .await?
    };
    let endpoints = http.config.endpoints(&r.domain, false).await?;
    let mut session = None;
    for (i, ep) in endpoints.iter().enumerate() {
        match Session::connect(http, ep, &r.path, "pull,push", creds).await {
            Ok(s) => {
                session = Some(s);
                break;
            }
            Err(e) if e.is_transport() && i + 1 < endpoints.len() => {
                tracing::info!(endpoint = %ep.base, error = %e, "registry endpoint unusable, trying the next");
            }
            Err(e) => return Err(e),
        }
    }
    let s =
        session.ok_or_else(|| Error::Registry(format!("no endpoint for registry {}", r.domain)))?;
    progress(Progress::PushRefersTo {
        repository: r.full_name(),
    });
    let mut unique: Vec<String> = Vec::new();
    for l in &layers {
        if !unique.contains(l) {
            unique.push(l.clone());
        }
    }
    for l in &unique {
        progress(Progress::Preparing { id: short_id(l) });
    }
    let pusher = Pusher {
        s: &s,
        store: &store,
        r: &r,
        progress,
    };
    let sem = tokio::sync::Semaphore::new(MAX_CONCURRENT_UPLOADS);
    let first_error = Mutex::new(None);
    let results =
        futures::future::join_all(unique.iter().map(|d| pusher.run(d, &sem, &first_error))).await;
    if let Some(e) = first_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    let mut descs = Vec::with_capacity(layers.len());
    for l in &layers {
        let i = unique.iter().position(|u| u == l).unwrap_or(0);
        let (digest, size) = results
            .get(i)
            .cloned()
            .flatten()
            .ok_or_else(|| Error::Registry("a layer upload was cancelled".into()))?;
        descs.push(json!({"mediaType": DOCKER_LAYER_GZIP, "size": size, "digest": digest}));
    }
    // The config.
    if s.blob_exists(&image_id).await?.is_none() {
        let loc = match s.start_upload(None).await? {
            UploadStart::Location(l) => l,
            UploadStart::Mounted => {
                return Err(Error::Registry(
                    "registry answered an upload with a mount".into(),
                ))
            }
        };
        s.finish_upload(&loc, &image_id, Bytes::from(config.clone()))
            .await?;
    }
    // The manifest.
    let manifest = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "size": config.len(), "digest": image_id},
        "layers": descs,
    }))
    .map_err(|e| Error::Registry(format!("encoding manifest: {e}")))?;
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&manifest)));
    let size = manifest.len() as u64;
    s.put_manifest(&tag, DOCKER_MANIFEST, Bytes::from(manifest))
        .await?;
    {
        let st = store.clone();
        let id = image_id.clone();
        let rd = format!("{}@{digest}", r.familiar_name());
        blocking(move || Ok(st.add_repo_digest(&id, &rd)?)).await?;
    }
    progress(Progress::PushDigest {
        tag: tag.clone(),
        digest: digest.clone(),
        size,
    });
    Ok(PushOutcome { tag, digest, size })
}
