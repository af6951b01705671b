//! Reading an extracted `docker save` archive: classic layout (manifest.json
//! with `<hex>.json` / `<hex>/layer.tar`), Docker 25+ layout (OCI image layout
//! plus manifest.json pointing into blobs/), and OCI-layout-only archives.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::extract::read_small;
use crate::reference::{is_hex64, Reference};

const JSON_LIMIT: u64 = 64 * 1024 * 1024;

/// One image found in an archive; paths are inside the staging directory.
#[derive(Debug)]
pub(crate) struct Candidate {
    pub config: Vec<u8>,
    pub layers: Vec<LayerBlob>,
    pub tags: Vec<Reference>,
}

#[derive(Debug)]
pub(crate) struct LayerBlob {
    pub path: PathBuf,
    /// sha256 hex of the (possibly compressed) blob, when the layout names it.
    pub blob_digest: Option<String>,
}

fn inv(msg: impl Into<String>) -> Error {
    Error::InvalidArchive(msg.into())
}

#[derive(Deserialize)]
struct ManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    annotations: Option<std::collections::HashMap<String, String>>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct OciManifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// Resolve a path named by the archive inside `root` (symlinks stay inside;
/// classic archives link duplicate layers with relative symlinks).
fn archive_path(root: &Path, rel: &str) -> Result<PathBuf> {
    let p = Path::new(rel);
    if p.components().any(|c| {
        !matches!(
            c,
            std::path::Component::Normal(_) | std::path::Component::CurDir
        )
    }) {
        return Err(inv(format!(
            "path {rel:?} in manifest is not a plain relative path"
        )));
    }
    let full =
        safe_path::scoped_join(root, p).map_err(|e| inv(format!("resolving {rel:?}: {e}")))?;
    if !full.is_file() {
        return Err(inv(format!("{rel} is missing")));
    }
    Ok(full)
}

/// `blobs/sha256/<hex>` → Some(hex)
fn digest_of_blob_path(rel: &str) -> Option<String> {
    let hex = rel.trim_start_matches("./").strip_prefix("blobs/sha256/")?;
    is_hex64(hex).then(|| hex.to_string())
}

fn digest_hex(d: &str) -> Result<&str> {
    match d.split_once(':') {
        Some(("sha256", h)) if is_hex64(h) => Ok(h),
        _ => Err(inv(format!("unsupported digest {d:?}"))),
    }
}

fn read_verified(root: &Path, rel: &str, expect: Option<&str>) -> Result<Vec<u8>> {
    let path = archive_path(root, rel)?;
    let data = read_small(&path, JSON_LIMIT).map_err(|e| inv(format!("{rel}: {e}")))?;
    if let Some(hex) = expect {
        let got = hex::encode(Sha256::digest(&data));
        if got != hex {
            return Err(inv(format!(
                "digest mismatch for {rel}: expected sha256:{hex}, got sha256:{got}"
            )));
        }
    }
    Ok(data)
}

fn parse_tags(tags: &[String]) -> Result<Vec<Reference>> {
    tags.iter()
        .map(|t| {
            let r = Reference::parse(t).map_err(|e| inv(format!("bad tag {t:?}: {e}")))?;
            if r.digest.is_some() {
                return Err(inv(format!(
                    "bad tag {t:?}: digest references cannot be tags"
                )));
            }
            Ok(r.with_default_tag())
        })
        .collect()
}

/// Find the images in an extracted archive.
pub(crate) fn read(root: &Path) -> Result<Vec<Candidate>> {
    // Resolved inside the archive: a `manifest.json` that is a symlink to a
    // host file must not make the daemon read that file.
    let has = |name: &str| archive_path(root, name).is_ok();
    if has("manifest.json") {
        read_manifest_json(root)
    } else if has("index.json") {
        read_oci(root)
    } else {
        Err(inv(
            "no manifest.json or index.json: not a docker save archive",
        ))
    }
}

fn read_manifest_json(root: &Path) -> Result<Vec<Candidate>> {
    let data = read_small(&archive_path(root, "manifest.json")?, JSON_LIMIT)?;
    let entries: Vec<ManifestEntry> =
        serde_json::from_slice(&data).map_err(|e| inv(format!("manifest.json: {e}")))?;
    let mut out = Vec::new();
    for e in entries {
        let expect = digest_of_blob_path(&e.config).or_else(|| {
            let stem = e.config.trim_start_matches("./").strip_suffix(".json")?;
            is_hex64(stem).then(|| stem.to_string())
        });
        let config = read_verified(root, &e.config, expect.as_deref())?;
        let layers = e
            .layers
            .iter()
            .map(|l| {
                Ok(LayerBlob {
                    path: archive_path(root, l)?,
                    blob_digest: digest_of_blob_path(l),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let tags = parse_tags(e.repo_tags.as_deref().unwrap_or(&[]))?;
        out.push(Candidate {
            config,
            layers,
            tags,
        });
    }
    Ok(out)
}

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

fn read_oci(root: &Path) -> Result<Vec<Candidate>> {
    let data = read_small(&archive_path(root, "index.json")?, JSON_LIMIT)?;
    let index: Index =
        serde_json::from_slice(&data).map_err(|e| inv(format!("index.json: {e}")))?;
    let mut out = Vec::new();
    for desc in &index.manifests {
        let mut tags = Vec::new();
        if let Some(ann) = &desc.annotations {
            // Docker writes the full name in io.containerd.image.name; the OCI
            // ref.name may be only a tag, so use it only when it parses as a full reference.
            let name = ann.get("io.containerd.image.name").or_else(|| {
                ann.get("org.opencontainers.image.ref.name")
                    .filter(|n| n.contains(':') || n.contains('/'))
            });
            if let Some(n) = name {
                tags = parse_tags(std::slice::from_ref(n))?;
            }
        }
        let manifest = resolve_manifest(root, desc, 0)?;
        let chex = digest_hex(&manifest.config.digest)?;
        let config = read_verified(root, &format!("blobs/sha256/{chex}"), Some(chex))?;
        let layers = manifest
            .layers
            .iter()
            .map(|l| {
                let hex = digest_hex(&l.digest)?;
                Ok(LayerBlob {
                    path: archive_path(root, &format!("blobs/sha256/{hex}"))?,
                    blob_digest: Some(hex.to_string()),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        out.push(Candidate {
            config,
            layers,
            tags,
        });
    }
    Ok(out)
}

fn resolve_manifest(root: &Path, desc: &Descriptor, depth: u32) -> Result<OciManifest> {
    if depth > 4 {
        return Err(inv("index nesting too deep"));
    }
    let hex = digest_hex(&desc.digest)?;
    let data = read_verified(root, &format!("blobs/sha256/{hex}"), Some(hex))?;
    let v: Value =
        serde_json::from_slice(&data).map_err(|e| inv(format!("manifest {hex}: {e}")))?;
    let is_index = INDEX_TYPES.contains(&desc.media_type.as_str())
        || v.get("mediaType")
            .and_then(Value::as_str)
            .is_some_and(|m| INDEX_TYPES.contains(&m))
        || (v.get("manifests").is_some() && v.get("layers").is_none());
    if !is_index {
        return serde_json::from_value(v).map_err(|e| inv(format!("manifest {hex}: {e}")));
    }
    let index: Index = serde_json::from_value(v).map_err(|e| inv(format!("index {hex}: {e}")))?;
    let present = |d: &&Descriptor| {
        digest_hex(&d.digest)
            .is_ok_and(|h| archive_path(root, &format!("blobs/sha256/{h}")).is_ok())
    };
    let pick = index
        .manifests
        .iter()
        .filter(present)
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .or_else(|| index.manifests.iter().find(present))
        .ok_or_else(|| {
            inv(format!(
                "index {hex} has no manifest present in the archive"
            ))
        })?;
    resolve_manifest(root, pick, depth + 1)
}
