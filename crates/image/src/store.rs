//! The on-disk image store.
//!
//! Layout under the root:
//! - `blobs/sha256/<hex>`: image config JSON, by digest (= image id)
//! - `layers/sha256/<diffid-hex>.tar`: uncompressed layer tars, shared between images
//! - `disks/<image-id-hex>.ext4`: read-only boot disk
//! - `images/<image-id-hex>.json`: per-image metadata ([`Meta`])
//! - `repositories.json`: familiar reference → image id; tags (`busybox:latest`)
//!   and repo digests (`busybox@sha256:<manifest digest>`) live in the same table,
//!   as in Docker's reference store
//! - `distribution.json`: which compressed registry blob is which layer, per
//!   registry repository ([`BlobRecord`]), for pull skips and push mounts
//! - `tmp/`: staging (loads, pulls, downloads), emptied by [`ImageStore::open`]
//!
//! Garbage collection: removing an image deletes its config blob, its boot
//! disk, and every layer tar (with its blob records) no remaining image uses.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::archive;
use crate::disk;
use crate::error::{Error, IoContext, Result};
use crate::extract::{decompress, extract_archive};
use crate::reference::{is_hex64, Reference};

mod distribution;
mod maintenance;
mod save;

pub use distribution::{BlobRecord, CommitOutcome, PulledImage, PulledLayer, StagedLayer};
pub use maintenance::{DiskUsage, HistoryItem, ImageUsage, PruneFilters, PruneReport};

/// A stored image, as the API needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// `sha256:<hex>`
    pub id: String,
    /// Familiar form, sorted: `busybox:latest`, `localhost:5000/a/b:t`.
    pub repo_tags: Vec<String>,
    /// Familiar repo digests, sorted: `busybox@sha256:<manifest digest>` (recorded
    /// by pulls and pushes).
    pub repo_digests: Vec<String>,
    /// RFC 3339 (from the config's `created`, else the time it was stored).
    pub created: String,
    /// Sum of the uncompressed layer sizes, bytes.
    pub size: u64,
    /// The raw image config JSON.
    pub raw_config: Value,
    /// Typed view of the config.
    pub config: ImageConfig,
    /// Diff ids (`sha256:<hex>`), lowest layer first.
    pub layers: Vec<String>,
}

/// Typed view of an image config (the parts the engine uses).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageConfig {
    pub user: String,
    pub env: Vec<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub working_dir: String,
    /// `"80/tcp"` style keys.
    pub exposed_ports: Vec<String>,
    pub volumes: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub stop_signal: Option<String>,
    pub stop_timeout: Option<i64>,
    pub healthcheck: Option<Value>,
    pub shell: Option<Vec<String>>,
    pub on_build: Vec<String>,
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
    pub author: String,
    pub comment: String,
    pub docker_version: String,
}

/// One line of an image delete response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteItem {
    Untagged(String),
    Deleted(String),
}

#[derive(Deserialize, Default)]
struct RawContainerConfig {
    #[serde(rename = "User", default)]
    user: Option<String>,
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "ExposedPorts", default)]
    exposed_ports: Option<BTreeMap<String, Value>>,
    #[serde(rename = "Volumes", default)]
    volumes: Option<BTreeMap<String, Value>>,
    #[serde(rename = "Labels", default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "StopSignal", default)]
    stop_signal: Option<String>,
    #[serde(rename = "StopTimeout", default)]
    stop_timeout: Option<i64>,
    #[serde(rename = "Healthcheck", default)]
    healthcheck: Option<Value>,
    #[serde(rename = "Shell", default)]
    shell: Option<Vec<String>>,
    #[serde(rename = "OnBuild", default)]
    on_build: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RawRootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    config: Option<RawContainerConfig>,
    rootfs: RawRootfs,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    author: Option<String>,
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    docker_version: Option<String>,
    #[serde(default)]
    created: Option<String>,
}

/// Parse an image config; returns the typed config, diff id hexes and `created`.
fn parse_config(
    v: &Value,
) -> std::result::Result<(ImageConfig, Vec<String>, Option<String>), String> {
    let raw: RawConfig =
        serde_json::from_value(v.clone()).map_err(|e| format!("image config: {e}"))?;
    let mut diff = Vec::new();
    for d in &raw.rootfs.diff_ids {
        match d.split_once(':') {
            Some(("sha256", h)) if is_hex64(h) => diff.push(h.to_string()),
            _ => return Err(format!("unsupported diff id {d:?}")),
        }
    }
    let c = raw.config.unwrap_or_default();
    let cfg = ImageConfig {
        user: c.user.unwrap_or_default(),
        env: c.env.unwrap_or_default(),
        entrypoint: c.entrypoint,
        cmd: c.cmd,
        working_dir: c.working_dir.unwrap_or_default(),
        exposed_ports: c
            .exposed_ports
            .map(|m| m.into_keys().collect())
            .unwrap_or_default(),
        volumes: c
            .volumes
            .map(|m| m.into_keys().collect())
            .unwrap_or_default(),
        labels: c.labels.unwrap_or_default(),
        stop_signal: c.stop_signal.filter(|s| !s.is_empty()),
        stop_timeout: c.stop_timeout,
        healthcheck: c.healthcheck.filter(|h| !h.is_null()),
        shell: c.shell,
        on_build: c.on_build.unwrap_or_default(),
        os: raw.os.unwrap_or_else(|| "linux".into()),
        architecture: raw.architecture.unwrap_or_else(|| "amd64".into()),
        variant: raw.variant.filter(|s| !s.is_empty()),
        author: raw.author.unwrap_or_default(),
        comment: raw.comment.unwrap_or_default(),
        docker_version: raw.docker_version.unwrap_or_default(),
    };
    Ok((cfg, diff, raw.created))
}

/// Per-image metadata, `images/<hex>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    /// When the image entered the store (RFC 3339).
    stored: String,
    /// Diff id hexes, lowest first.
    layers: Vec<String>,
    /// Uncompressed sizes of `layers`.
    layer_sizes: Vec<u64>,
}

#[derive(Default, Clone)]
struct State {
    /// familiar reference (`busybox:latest`, `busybox@sha256:...`) → image id hex
    repos: BTreeMap<String, String>,
    images: HashMap<String, Meta>,
    /// diff id hex → compressed blobs known to hold that layer
    blobs: BTreeMap<String, Vec<BlobRecord>>,
}

/// A reference key of `State::repos` is a repo digest (`name@sha256:...`), not a tag.
fn is_digest_ref(key: &str) -> bool {
    key.contains('@')
}

/// The repository name of a reference key: `busybox` for `busybox:latest` and
/// `busybox@sha256:...`, `localhost:5000/a` for `localhost:5000/a:t`.
fn ref_repo_name(key: &str) -> &str {
    let name = key.split_once('@').map_or(key, |(n, _)| n);
    match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => &name[..i],
        _ => name,
    }
}

/// Docker's `isSingleReference`: at most one tag, and every reference (tags
/// and digests) in the same repository.
fn is_single_reference(refs: &[String]) -> bool {
    if refs.len() <= 1 {
        return refs.len() == 1;
    }
    let mut single: Option<&str> = None;
    let mut names = HashSet::new();
    for r in refs {
        if is_digest_ref(r) {
            names.insert(ref_repo_name(r));
        } else if single.is_none() {
            names.insert(ref_repo_name(r));
            single = Some(r);
        } else {
            return false;
        }
    }
    let single = single.unwrap_or(&refs[0]);
    names.len() == 1 && names.contains(ref_repo_name(single))
}

/// The image store. `Send + Sync`; all methods block.
pub struct ImageStore {
    root: PathBuf,
    state: RwLock<State>,
    /// Serialises boot disk builds.
    disk_lock: Mutex<()>,
}

/// Removes a staging directory when dropped.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.0.display(), error = %e, "cannot remove staging directory");
            }
        }
    }
}

struct HashReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Write `data` to `path` atomically (temp file in the same dir, fsync, rename).
fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{:x}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        rand::random::<u64>()
    ));
    let res = (|| {
        let mut f = File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        f.write_all(data)
            .ctx(|| format!("writing {}", tmp.display()))?;
        f.sync_all().ctx(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .ctx(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn short(id: &str) -> &str {
    let h = id.strip_prefix("sha256:").unwrap_or(id);
    &h[..h.len().min(12)]
}

/// A staged layer: uncompressed tar at `path` (in staging, or already in the store).
struct LayerEntry {
    diff: String,
    size: u64,
    path: PathBuf,
    in_store: bool,
}

/// A staged image ready to commit.
struct StagedImage {
    hex: String,
    config: Vec<u8>,
    layers: Vec<LayerEntry>,
    disk: Option<PathBuf>,
    tags: Vec<Reference>,
    /// Digest references (`name@sha256:...` keys) that name it too.
    digest_refs: Vec<String>,
    created: Option<String>,
}

impl ImageStore {
    /// Open (creating if needed) the store at `root`; clears stale `tmp/` entries.
    pub fn open(root: &Path) -> Result<ImageStore> {
        for d in ["blobs/sha256", "layers/sha256", "disks", "images", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).ctx(|| format!("creating {}", p.display()))?;
        }
        let root = fs::canonicalize(root).ctx(|| format!("resolving {}", root.display()))?;
        let tmp = root.join("tmp");
        for ent in fs::read_dir(&tmp).ctx(|| format!("reading {}", tmp.display()))? {
            let p = ent.ctx(|| format!("reading {}", tmp.display()))?.path();
            let r = if p.is_dir() && !p.is_symlink() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            r.ctx(|| format!("removing stale {}", p.display()))?;
        }
        let mut state = State::default();
        let images_dir = root.join("images");
        for ent in fs::read_dir(&images_dir).ctx(|| format!("reading {}", images_dir.display()))? {
            let p = ent
                .ctx(|| format!("reading {}", images_dir.display()))?
                .path();
            let Some(hex) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            if !is_hex64(hex) {
                continue;
            }
            let data = fs::read(&p).ctx(|| format!("reading {}", p.display()))?;
            let meta: Meta = serde_json::from_slice(&data)
                .map_err(|e| Error::Corrupt(format!("{}: {e}", p.display())))?;
            state.images.insert(hex.to_string(), meta);
        }
        let repos_path = root.join("repositories.json");
        match fs::read(&repos_path) {
            Ok(data) => {
                state.repos = serde_json::from_slice(&data)
                    .map_err(|e| Error::Corrupt(format!("{}: {e}", repos_path.display())))?;
                state.repos.retain(|r, id| {
                    let keep = state.images.contains_key(id);
                    if !keep {
                        tracing::warn!(reference = %r, "dropping reference to missing image");
                    }
                    keep
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).ctx(|| format!("reading {}", repos_path.display())),
        }
        let dist_path = root.join(distribution::FILE);
        match fs::read(&dist_path) {
            Ok(data) => {
                let records: Vec<BlobRecord> = serde_json::from_slice(&data)
                    .map_err(|e| Error::Corrupt(format!("{}: {e}", dist_path.display())))?;
                let used: HashSet<&String> = state
                    .images
                    .values()
                    .flat_map(|m| m.layers.iter())
                    .collect();
                for r in records {
                    let Some(hex) = r.diff_id.strip_prefix("sha256:") else {
                        continue;
                    };
                    if used.contains(&hex.to_string()) {
                        state.blobs.entry(hex.to_string()).or_default().push(r);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).ctx(|| format!("reading {}", dist_path.display())),
        }
        Ok(ImageStore {
            root,
            state: RwLock::new(state),
            disk_lock: Mutex::new(()),
        })
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn blob_path(&self, hex: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(hex)
    }
    fn layer_path(&self, diff: &str) -> PathBuf {
        self.root.join("layers/sha256").join(format!("{diff}.tar"))
    }
    fn disk_path(&self, hex: &str) -> PathBuf {
        self.root.join("disks").join(format!("{hex}.ext4"))
    }
    fn meta_path(&self, hex: &str) -> PathBuf {
        self.root.join("images").join(format!("{hex}.json"))
    }

    fn staging(&self, what: &str) -> Result<Staging> {
        let p = self
            .root
            .join("tmp")
            .join(format!("{what}-{:016x}", rand::random::<u64>()));
        fs::create_dir(&p).ctx(|| format!("creating {}", p.display()))?;
        Ok(Staging(p))
    }

    fn save_repos(&self, st: &State) -> Result<()> {
        let data =
            serde_json::to_vec_pretty(&st.repos).map_err(|e| Error::Corrupt(e.to_string()))?;
        write_atomic(&self.root.join("repositories.json"), &data)
    }

    /// Decompress `reader` into `out`, returning (diff id hex, size, blob digest hex).
    fn stage_layer_into<R: Read>(reader: R, out: &Path) -> Result<(String, u64, String)> {
        let mut raw = HashReader {
            inner: reader,
            hasher: Sha256::new(),
        };
        let mut plain = HashReader {
            inner: decompress(&mut raw)?,
            hasher: Sha256::new(),
        };
        let f = File::create(out).ctx(|| format!("creating {}", out.display()))?;
        let mut w = BufWriter::with_capacity(256 * 1024, f);
        let size = io::copy(&mut plain, &mut w)
            .map_err(|e| Error::InvalidLayer(format!("decompressing layer: {e}")))?;
        w.flush().ctx(|| format!("writing {}", out.display()))?;
        let diff = hex::encode(plain.hasher.finalize_reset());
        drop(plain);
        // Read any trailing bytes so the blob digest covers the whole blob.
        io::copy(&mut raw, &mut io::sink()).ctx(|| "reading layer blob".to_string())?;
        let blob = hex::encode(raw.hasher.finalize());
        Ok((diff, size, blob))
    }

    /// Build a boot disk from layer tars into a staging dir; returns the disk file.
    fn stage_disk(&self, staging: &Path, hex: &str, layers: &[&Path]) -> Result<PathBuf> {
        let rootfs = staging.join(format!("rootfs-{hex}"));
        let out = staging.join(format!("disk-{hex}.ext4"));
        let r = disk::build(layers, &rootfs, &out);
        if let Err(e) = fs::remove_dir_all(&rootfs) {
            tracing::warn!(path = %rootfs.display(), error = %e, "cannot remove rootfs staging");
        }
        r.map(|()| out)
    }

    /// Load a `docker save` archive (classic, Docker 25+/OCI, or OCI-only layout).
    /// Returns Docker's output lines (`Loaded image: busybox:latest`,
    /// `Loaded image ID: sha256:...`). On error nothing is left behind.
    pub fn load(&self, reader: impl Read) -> Result<Vec<String>> {
        let staging = self.staging("load")?;
        let ar = staging.0.join("archive");
        fs::create_dir(&ar).ctx(|| format!("creating {}", ar.display()))?;
        extract_archive(reader, &ar).map_err(|e| match e {
            Error::InvalidLayer(m) => Error::InvalidArchive(m),
            e => e,
        })?;
        let candidates = archive::read(&ar)?;
        if candidates.is_empty() {
            return Err(Error::InvalidArchive("archive contains no images".into()));
        }
        let out_dir = staging.0.join("out");
        fs::create_dir(&out_dir).ctx(|| format!("creating {}", out_dir.display()))?;
        let mut staged: Vec<StagedImage> = Vec::new();
        let mut staged_layers: HashMap<String, (PathBuf, u64)> = HashMap::new();
        for cand in candidates {
            let hex = hex::encode(Sha256::digest(&cand.config));
            let value: Value = serde_json::from_slice(&cand.config)
                .map_err(|e| Error::InvalidArchive(format!("config {hex}: {e}")))?;
            let (_, diffs, created) = parse_config(&value)
                .map_err(|e| Error::InvalidArchive(format!("config {hex}: {e}")))?;
            if diffs.len() != cand.layers.len() {
                return Err(Error::InvalidArchive(format!(
                    "image {hex}: config has {} diff ids but the manifest lists {} layers",
                    diffs.len(),
                    cand.layers.len()
                )));
            }
            let existing = self.read_state().images.get(&hex).cloned();
            let mut layers = Vec::new();
            for (i, (blob, diff)) in cand.layers.iter().zip(&diffs).enumerate() {
                if let Some(m) = existing.as_ref().filter(|m| m.layers.get(i) == Some(diff)) {
                    let path = self.layer_path(diff);
                    if path.is_file() {
                        layers.push(LayerEntry {
                            diff: diff.clone(),
                            size: m.layer_sizes.get(i).copied().unwrap_or(0),
                            path,
                            in_store: true,
                        });
                        continue;
                    }
                }
                if let Some((path, size)) = staged_layers.get(diff) {
                    layers.push(LayerEntry {
                        diff: diff.clone(),
                        size: *size,
                        path: path.clone(),
                        in_store: false,
                    });
                    continue;
                }
                let out = out_dir.join(format!("{diff}.tar"));
                let f =
                    File::open(&blob.path).ctx(|| format!("opening {}", blob.path.display()))?;
                let (got, size, blob_hex) = Self::stage_layer_into(BufReader::new(f), &out)
                    .map_err(|e| match e {
                        Error::InvalidLayer(m) | Error::InvalidArchive(m) => {
                            Error::InvalidArchive(m)
                        }
                        e => e,
                    })?;
                if let Some(expect) = &blob.blob_digest {
                    if *expect != blob_hex {
                        return Err(Error::InvalidArchive(format!(
                            "layer blob digest mismatch: expected sha256:{expect}, got sha256:{blob_hex}"
                        )));
                    }
                }
                if got != *diff {
                    return Err(Error::InvalidArchive(format!(
                        "layer diff id mismatch: config says sha256:{diff}, content is sha256:{got}"
                    )));
                }
                staged_layers.insert(diff.clone(), (out.clone(), size));
                layers.push(LayerEntry {
                    diff: diff.clone(),
                    size,
                    path: out,
                    in_store: false,
                });
            }
            if let Some(s) = staged.iter_mut().find(|s| s.hex == hex) {
                s.tags.extend(cand.tags);
                continue;
            }
            let disk = if existing.is_some() && self.disk_path(&hex).is_file() {
                None
            } else {
                let paths: Vec<&Path> = layers.iter().map(|l| l.path.as_path()).collect();
                Some(
                    self.stage_disk(&staging.0, &hex, &paths)
                        .map_err(|e| match e {
                            Error::InvalidLayer(m) => Error::InvalidArchive(m),
                            e => e,
                        })?,
                )
            };
            staged.push(StagedImage {
                hex,
                config: cand.config,
                layers,
                disk,
                tags: cand.tags,
                digest_refs: Vec::new(),
                created,
            });
        }
        let mut lines = Vec::new();
        self.commit(&mut self.write_state(), &staged, &mut lines)?;
        Ok(lines)
    }

    /// Moves staged images into the store, all or nothing: on failure the
    /// files it created are removed and the state is as before.
    fn commit(
        &self,
        st: &mut State,
        staged: &[StagedImage],
        lines: &mut Vec<String>,
    ) -> Result<()> {
        let before = st.clone();
        let mut created = Vec::new();
        let result = self.commit_inner(st, staged, &mut created, lines);
        if result.is_err() {
            for p in created.iter().rev() {
                let _ = fs::remove_file(p);
            }
            *st = before;
            let _ = self.save_repos(st);
        }
        result
    }

    /// [`Self::commit`]'s work; records every file it creates in `created`.
    fn commit_inner(
        &self,
        st: &mut State,
        staged: &[StagedImage],
        created: &mut Vec<PathBuf>,
        lines: &mut Vec<String>,
    ) -> Result<()> {
        for img in staged {
            let blob = self.blob_path(&img.hex);
            if !blob.is_file() {
                write_atomic(&blob, &img.config)?;
                created.push(blob);
            }
            for l in &img.layers {
                let dst = self.layer_path(&l.diff);
                if l.in_store || dst.is_file() {
                    continue;
                }
                if l.path.is_file() {
                    fs::rename(&l.path, &dst)
                        .ctx(|| format!("moving layer into {}", dst.display()))?;
                    created.push(dst);
                }
            }
            if let Some(d) = &img.disk {
                let dst = self.disk_path(&img.hex);
                fs::rename(d, &dst).ctx(|| format!("moving boot disk into {}", dst.display()))?;
                created.push(dst);
            }
            if !st.images.contains_key(&img.hex) {
                let meta = Meta {
                    stored: img.created.clone().unwrap_or_else(now_rfc3339),
                    layers: img.layers.iter().map(|l| l.diff.clone()).collect(),
                    layer_sizes: img.layers.iter().map(|l| l.size).collect(),
                };
                let mp = self.meta_path(&img.hex);
                let data =
                    serde_json::to_vec_pretty(&meta).map_err(|e| Error::Corrupt(e.to_string()))?;
                write_atomic(&mp, &data)?;
                created.push(mp);
                st.images.insert(img.hex.clone(), meta);
            }
            if img.tags.is_empty() {
                lines.push(format!("Loaded image ID: sha256:{}", img.hex));
            }
            for t in &img.tags {
                let name = t.familiar();
                if let Some(old) = st.repos.insert(name.clone(), img.hex.clone()) {
                    if old != img.hex {
                        lines.push(format!(
                            "The image {name} already exists, renaming the old one with ID sha256:{old} to empty string"
                        ));
                    }
                }
                lines.push(format!("Loaded image: {name}"));
            }
            for k in &img.digest_refs {
                st.repos.insert(k.clone(), img.hex.clone());
            }
        }
        self.save_repos(st)
    }

    /// Import a root filesystem tarball (plain, gzip or zstd) as a one-layer image.
    /// `changes` are Dockerfile instructions (see [`crate::apply_changes`]).
    /// Returns the image id (`sha256:<hex>`).
    pub fn import(
        &self,
        reader: impl Read,
        reference: Option<&str>,
        changes: &[String],
        message: &str,
    ) -> Result<String> {
        let tag = new_image_tag(reference)?;
        let mut cc = Map::new();
        crate::changes::apply_changes(&mut cc, changes)?;
        let staging = self.staging("import")?;
        let layer = staging.0.join("layer.tar");
        let (diff, size, _) = Self::stage_layer_into(reader, &layer)?;
        let now = now_rfc3339();
        let comment = if message.is_empty() {
            "Imported from -".to_string()
        } else {
            message.to_string()
        };
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "created": now,
            "comment": comment,
            "config": Value::Object(cc),
            "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff}")] },
            "history": [ { "created": now, "comment": comment } ],
        });
        let bytes = serde_json::to_vec(&config).map_err(|e| Error::Corrupt(e.to_string()))?;
        let hex = hex::encode(Sha256::digest(&bytes));
        let disk = self.stage_disk(&staging.0, &hex, &[layer.as_path()])?;
        let staged = StagedImage {
            hex: hex.clone(),
            config: bytes,
            layers: vec![LayerEntry {
                diff,
                size,
                path: layer,
                in_store: false,
            }],
            disk: Some(disk),
            tags: tag.into_iter().collect(),
            digest_refs: Vec::new(),
            created: Some(now),
        };
        self.commit(
            &mut self.write_state(),
            std::slice::from_ref(&staged),
            &mut Vec::new(),
        )?;
        Ok(format!("sha256:{hex}"))
    }

    /// `docker commit`: a new image made of `base`'s layers and one more
    /// (`layer`, a plain tar of the container's changes in Docker's layer
    /// format), with `config` (the container's config, Docker's image
    /// `config` object) changed by `changes` (Dockerfile instructions).
    /// Tagged `reference` when given. Returns the image id.
    #[allow(clippy::too_many_arguments)]
    pub fn commit_container(
        &self,
        base: &str,
        layer: impl Read,
        reference: Option<&str>,
        config: Value,
        changes: &[String],
        comment: &str,
        author: &str,
        container_id: &str,
    ) -> Result<String> {
        let tag = new_image_tag(reference)?;
        let mut cc = match config {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        crate::changes::apply_changes(&mut cc, changes)?;
        let (base_hex, base_meta, base_raw) = {
            let st = self.read_state();
            let (hex, _) = Self::lookup(&st, base)?;
            let meta = st
                .images
                .get(&hex)
                .cloned()
                .ok_or_else(|| Error::NotFound(base.to_string()))?;
            let raw = self.image(&st, &hex)?.raw_config;
            (hex, meta, raw)
        };
        let staging = self.staging("commit")?;
        let new_layer = staging.0.join("layer.tar");
        let (diff, size, _) = Self::stage_layer_into(layer, &new_layer)?;
        let now = now_rfc3339();
        let mut diff_ids: Vec<Value> = base_meta
            .layers
            .iter()
            .map(|d| Value::String(format!("sha256:{d}")))
            .collect();
        diff_ids.push(Value::String(format!("sha256:{diff}")));
        let mut history = base_raw
            .get("history")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut entry = Map::new();
        entry.insert("created".into(), now.clone().into());
        if !author.is_empty() {
            entry.insert("author".into(), author.into());
        }
        if !comment.is_empty() {
            entry.insert("comment".into(), comment.into());
        }
        history.push(Value::Object(entry));
        let mut image = serde_json::json!({
            "architecture": base_raw.get("architecture").cloned().unwrap_or("amd64".into()),
            "os": base_raw.get("os").cloned().unwrap_or("linux".into()),
            "created": now,
            "container": container_id,
            "config": Value::Object(cc),
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": history,
        });
        if let Some(obj) = image.as_object_mut() {
            if !author.is_empty() {
                obj.insert("author".into(), author.into());
            }
            if !comment.is_empty() {
                obj.insert("comment".into(), comment.into());
            }
        }
        let bytes = serde_json::to_vec(&image).map_err(|e| Error::Corrupt(e.to_string()))?;
        let hex = hex::encode(Sha256::digest(&bytes));
        let mut layers: Vec<LayerEntry> = Vec::new();
        for (i, d) in base_meta.layers.iter().enumerate() {
            let path = self.layer_path(d);
            if !path.is_file() {
                return Err(Error::Corrupt(format!(
                    "layer {d} of image {base_hex} is missing from the store"
                )));
            }
            layers.push(LayerEntry {
                diff: d.clone(),
                size: base_meta.layer_sizes.get(i).copied().unwrap_or(0),
                path,
                in_store: true,
            });
        }
        layers.push(LayerEntry {
            diff,
            size,
            path: new_layer,
            in_store: false,
        });
        let paths: Vec<&Path> = layers.iter().map(|l| l.path.as_path()).collect();
        let disk = self.stage_disk(&staging.0, &hex, &paths)?;
        let staged = StagedImage {
            hex: hex.clone(),
            config: bytes,
            layers,
            disk: Some(disk),
            tags: tag.into_iter().collect(),
            digest_refs: Vec::new(),
            created: Some(now),
        };
        self.commit(
            &mut self.write_state(),
            std::slice::from_ref(&staged),
            &mut Vec::new(),
        )?;
        Ok(format!("sha256:{hex}"))
    }

    /// Find the image hex for a name: full id, `sha256:` id, reference, or unambiguous id prefix.
    /// Returns (hex, Some(familiar reference) if found by reference).
    fn lookup(st: &State, name: &str) -> Result<(String, Option<String>)> {
        let not_found = || Error::NotFound(name.to_string());
        if let Some(h) = name.strip_prefix("sha256:") {
            if is_hex64(h) {
                return st
                    .images
                    .contains_key(h)
                    .then(|| (h.to_string(), None))
                    .ok_or_else(not_found);
            }
            return Self::by_prefix(st, h, name);
        }
        if is_hex64(name) {
            return st
                .images
                .contains_key(name)
                .then(|| (name.to_string(), None))
                .ok_or_else(not_found);
        }
        if let Ok(r) = Reference::parse(name) {
            let r = r.with_default_tag();
            if let Some(d) = &r.digest {
                // Repo digests are keyed without the tag: `name@sha256:...`.
                let key = format!("{}@{d}", r.familiar_name());
                return match st.repos.get(&key) {
                    Some(h) => Ok((h.clone(), Some(key))),
                    None => Err(not_found()),
                };
            }
            let fam = r.familiar();
            if let Some(h) = st.repos.get(&fam) {
                return Ok((h.clone(), Some(fam)));
            }
        }
        Self::by_prefix(st, name, name)
    }

    fn by_prefix(st: &State, prefix: &str, name: &str) -> Result<(String, Option<String>)> {
        if prefix.is_empty()
            || !prefix
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        {
            return Err(Error::NotFound(name.to_string()));
        }
        let mut m = st.images.keys().filter(|h| h.starts_with(prefix));
        match (m.next(), m.next()) {
            (Some(h), None) => Ok((h.clone(), None)),
            (None, _) => Err(Error::NotFound(name.to_string())),
            (Some(_), Some(_)) => Err(Error::Ambiguous(format!(
                "multiple IDs found with provided prefix: {prefix}"
            ))),
        }
    }

    fn image(&self, st: &State, hex: &str) -> Result<Image> {
        let meta = st
            .images
            .get(hex)
            .ok_or_else(|| Error::NotFound(hex.to_string()))?;
        let bp = self.blob_path(hex);
        let data = fs::read(&bp).ctx(|| format!("reading image config {}", bp.display()))?;
        let raw: Value = serde_json::from_slice(&data)
            .map_err(|e| Error::Corrupt(format!("{}: {e}", bp.display())))?;
        let (config, diffs, created) =
            parse_config(&raw).map_err(|e| Error::Corrupt(format!("{}: {e}", bp.display())))?;
        let (repo_digests, repo_tags): (Vec<String>, Vec<String>) = st
            .repos
            .iter()
            .filter(|(_, h)| *h == hex)
            .map(|(r, _)| r.clone())
            .partition(|r| is_digest_ref(r));
        Ok(Image {
            id: format!("sha256:{hex}"),
            repo_tags,
            repo_digests,
            created: created.unwrap_or_else(|| meta.stored.clone()),
            size: meta.layer_sizes.iter().sum(),
            raw_config: raw,
            config,
            layers: diffs.iter().map(|d| format!("sha256:{d}")).collect(),
        })
    }

    /// Resolve a reference (tag defaults to `latest`), full id, hex id or unambiguous id prefix.
    pub fn resolve(&self, name_or_id: &str) -> Result<Image> {
        let st = self.read_state();
        let (hex, _) = Self::lookup(&st, name_or_id)?;
        self.image(&st, &hex)
    }

    /// All images, newest first.
    pub fn list(&self) -> Vec<Image> {
        let st = self.read_state();
        let mut out: Vec<Image> = st
            .images
            .keys()
            .filter_map(|h| match self.image(&st, h) {
                Ok(i) => Some(i),
                Err(e) => {
                    tracing::warn!(image = %h, error = %e, "skipping unreadable image");
                    None
                }
            })
            .collect();
        let key = |i: &Image| {
            chrono::DateTime::parse_from_rfc3339(&i.created)
                .map(|d| d.timestamp_nanos_opt().unwrap_or(0))
                .unwrap_or(0)
        };
        out.sort_by(|a, b| key(b).cmp(&key(a)).then_with(|| a.id.cmp(&b.id)));
        out
    }

    /// Tag `image` (any name `resolve` accepts) as `reference` (tag defaults to latest).
    pub fn tag(&self, image: &str, reference: &str) -> Result<()> {
        let r = Reference::parse(reference)?;
        if r.digest.is_some() {
            return Err(Error::InvalidReference(
                "refusing to create a tag with a digest reference".into(),
            ));
        }
        let fam = r.with_default_tag().familiar();
        let mut st = self.write_state();
        let (hex, _) = Self::lookup(&st, image)?;
        let old = st.repos.insert(fam.clone(), hex);
        if let Err(e) = self.save_repos(&st) {
            match old {
                Some(o) => st.repos.insert(fam, o),
                None => st.repos.remove(&fam),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Remove an image or a reference, with Docker's semantics (see the crate docs).
    /// `users(image_id)` gets `sha256:<hex>` and returns the containers using the
    /// image as (container id, running).
    ///
    /// Removing a tag also removes the repo digests of the same repository when
    /// no other tag of that repository remains (as Docker does). When the image
    /// itself goes, its config, boot disk and every layer tar (and blob record)
    /// no remaining image uses are deleted.
    pub fn remove(
        &self,
        name_or_id: &str,
        force: bool,
        users: &dyn Fn(&str) -> Vec<(String, bool)>,
    ) -> Result<Vec<DeleteItem>> {
        let mut st = self.write_state();
        self.remove_locked(&mut st, name_or_id, force, users)
            .map(|(items, _)| items)
    }

    /// [`ImageStore::remove`] with the state locked; also returns the bytes freed.
    fn remove_locked(
        &self,
        st: &mut State,
        name_or_id: &str,
        force: bool,
        users: &dyn Fn(&str) -> Vec<(String, bool)>,
    ) -> Result<(Vec<DeleteItem>, u64)> {
        let (hex, by_ref) = Self::lookup(st, name_or_id)?;
        let id = format!("sha256:{hex}");
        let refs: Vec<String> = st
            .repos
            .iter()
            .filter(|(_, h)| **h == hex)
            .map(|(r, _)| r.clone())
            .collect();
        let using = users(&id);
        let running = using
            .iter()
            .find(|(_, r)| *r)
            .map(|(c, _)| short(c).to_string());
        let stopped = using
            .iter()
            .find(|(_, r)| !*r)
            .map(|(c, _)| short(c).to_string());
        let any_user = using.first().map(|(c, _)| short(c).to_string());
        let sid = short(&hex).to_string();
        let mut items = Vec::new();
        let before = st.repos.clone();
        if let Some(fam) = by_ref {
            if !force && is_single_reference(&refs) {
                if let Some(c) = &any_user {
                    return Err(Error::Conflict(format!(
                        "conflict: unable to remove repository reference \"{name_or_id}\" (must force) - container {c} is using its referenced image {sid}"
                    )));
                }
            }
            st.repos.remove(&fam);
            items.push(DeleteItem::Untagged(fam.clone()));
            let mut remaining: Vec<String> = refs.into_iter().filter(|r| *r != fam).collect();
            if !is_digest_ref(&fam) {
                // The last tag of a repository takes that repository's digests along.
                let name = ref_repo_name(&fam);
                let tag_left = remaining
                    .iter()
                    .any(|r| !is_digest_ref(r) && ref_repo_name(r) == name);
                if !tag_left {
                    remaining.retain(|r| {
                        let drop = is_digest_ref(r) && ref_repo_name(r) == name;
                        if drop {
                            st.repos.remove(r);
                            items.push(DeleteItem::Untagged(r.clone()));
                        }
                        !drop
                    });
                }
            }
            if !remaining.is_empty() || any_user.is_some() {
                // Other references remain, or (forced) containers still need the image:
                // untag only.
                self.save_repos(st)
                    .inspect_err(|_| st.repos = before.clone())?;
                return Ok((items, 0));
            }
        } else {
            if let Some(c) = &running {
                return Err(Error::Conflict(format!(
                    "conflict: unable to delete {sid} (cannot be forced) - image is being used by running container {c}"
                )));
            }
            if !force {
                if refs.len() > 1 && !is_single_reference(&refs) {
                    return Err(Error::Conflict(format!(
                        "conflict: unable to delete {sid} (must be forced) - image is referenced in multiple repositories"
                    )));
                }
                if let Some(c) = &stopped {
                    return Err(Error::Conflict(format!(
                        "conflict: unable to delete {sid} (must be forced) - image is being used by stopped container {c}"
                    )));
                }
            }
            for r in &refs {
                st.repos.remove(r);
                items.push(DeleteItem::Untagged(r.clone()));
            }
            if stopped.is_some() {
                // Forced with stopped users: keep the image, their boot disk is needed.
                self.save_repos(st)
                    .inspect_err(|_| st.repos = before.clone())?;
                return Ok((items, 0));
            }
        }
        self.save_repos(st)
            .inspect_err(|_| st.repos = before.clone())?;
        let freed = self.delete_image(st, &hex)?;
        items.push(DeleteItem::Deleted(id));
        Ok((items, freed))
    }

    /// Forget image `hex` (its references are already gone) and delete the
    /// files nothing else needs. Returns the bytes freed.
    fn delete_image(&self, st: &mut State, hex: &str) -> Result<u64> {
        let meta = st.images.remove(hex);
        let mp = self.meta_path(hex);
        if let Err(e) = fs::remove_file(&mp) {
            if e.kind() != io::ErrorKind::NotFound {
                if let Some(m) = meta {
                    st.images.insert(hex.to_string(), m);
                }
                return Err(e).ctx(|| format!("removing {}", mp.display()));
            }
        }
        let still_used: HashSet<String> = st
            .images
            .values()
            .flat_map(|m| m.layers.iter().cloned())
            .collect();
        let mut garbage = vec![self.blob_path(hex), self.disk_path(hex)];
        let mut dropped_records = false;
        if let Some(m) = &meta {
            for l in m.layers.iter().filter(|l| !still_used.contains(*l)) {
                garbage.push(self.layer_path(l));
                dropped_records |= st.blobs.remove(l).is_some();
            }
        }
        if dropped_records {
            if let Err(e) = self.save_blobs(st) {
                tracing::warn!(error = %e, "cannot save blob records");
            }
        }
        let mut freed = 0;
        for p in garbage {
            let len = fs::symlink_metadata(&p).map(|m| m.len()).unwrap_or(0);
            match fs::remove_file(&p) {
                Ok(()) => freed += len,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove image file")
                }
            }
        }
        Ok(freed)
    }

    /// The image's read-only ext4 boot disk, built if missing.
    pub fn boot_disk(&self, id: &str) -> Result<PathBuf> {
        let (hex, meta) = {
            let st = self.read_state();
            let (hex, _) = Self::lookup(&st, id)?;
            let meta = st
                .images
                .get(&hex)
                .cloned()
                .ok_or_else(|| Error::NotFound(id.to_string()))?;
            (hex, meta)
        };
        let path = self.disk_path(&hex);
        if path.is_file() {
            return Ok(path);
        }
        let _g = self.disk_lock.lock().unwrap_or_else(|p| p.into_inner());
        if path.is_file() {
            return Ok(path);
        }
        let layers: Vec<PathBuf> = meta.layers.iter().map(|l| self.layer_path(l)).collect();
        let refs: Vec<&Path> = layers.iter().map(PathBuf::as_path).collect();
        let staging = self.staging("disk")?;
        let built = self.stage_disk(&staging.0, &hex, &refs)?;
        fs::rename(&built, &path).ctx(|| format!("moving boot disk into {}", path.display()))?;
        Ok(path)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<ImageStore>();
}

/// The tag a new image (`import`, `commit`) gets: none for an empty
/// reference; a digest reference cannot be a tag.
fn new_image_tag(reference: Option<&str>) -> Result<Option<Reference>> {
    match reference {
        Some(r) if !r.is_empty() => Ok(Some(Reference::parse_new_tag(r)?)),
        _ => Ok(None),
    }
}
