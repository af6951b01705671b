//! Manifests, indexes and platforms (Docker schema 2 and OCI).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
const DOCKER_FOREIGN: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const OCI_NONDIST: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar";
const SCHEMA1: [&str; 2] = [
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

/// The `Accept` header of manifest requests.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// Largest manifest accepted (as Docker: 4 MiB).
pub const MANIFEST_LIMIT: usize = 4 << 20;
/// Largest image config accepted (as Docker: 8 MiB).
pub const CONFIG_LIMIT: usize = 8 << 20;

/// A target platform (`--platform linux/arm64/v8`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Default for Platform {
    /// linux/amd64, what Vessel's VMs run.
    fn default() -> Self {
        Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

fn normalize_arch(arch: &str, variant: Option<&str>) -> (String, Option<String>) {
    let arch = arch.to_ascii_lowercase();
    let variant = variant
        .filter(|v| !v.is_empty())
        .map(str::to_ascii_lowercase);
    match arch.as_str() {
        "x86_64" | "x86-64" | "amd64" => ("amd64".into(), variant.filter(|v| v != "v1")),
        "i386" | "386" => ("386".into(), None),
        "aarch64" | "arm64" => ("arm64".into(), variant.filter(|v| v != "v8" && v != "8")),
        "armhf" => ("arm".into(), Some("v7".into())),
        "armel" => ("arm".into(), Some("v6".into())),
        "arm" => (
            "arm".into(),
            Some(match variant.as_deref() {
                None => "v7".into(),
                Some(v) if !v.starts_with('v') => format!("v{v}"),
                Some(v) => v.to_string(),
            }),
        ),
        _ => (arch, variant),
    }
}

impl Platform {
    /// Parse `os[/arch[/variant]]` or a bare architecture (`arm64`, OS linux).
    pub fn parse(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.trim().split('/').collect();
        let bad = || {
            Error::InvalidReference(format!(
                "\"{s}\": unknown operating system or architecture: invalid argument"
            ))
        };
        let (os, arch, variant) = match parts.as_slice() {
            [""] => return Err(bad()),
            [one] if *one == "linux" || *one == "windows" || *one == "darwin" => {
                (one.to_string(), "amd64".to_string(), None)
            }
            [one] => ("linux".to_string(), one.to_string(), None),
            [os, arch] => (os.to_string(), arch.to_string(), None),
            [os, arch, v] => (os.to_string(), arch.to_string(), Some(v.to_string())),
            _ => return Err(bad()),
        };
        if os.is_empty() || arch.is_empty() {
            return Err(bad());
        }
        Ok(Platform {
            os: os.to_ascii_lowercase(),
            architecture: arch,
            variant,
        }
        .normalized())
    }

    /// Canonical names (`aarch64` → `arm64`, `arm64/v8` → `arm64`, `arm` → `arm/v7`).
    pub fn normalized(&self) -> Platform {
        let (architecture, variant) = normalize_arch(&self.architecture, self.variant.as_deref());
        Platform {
            os: self.os.to_ascii_lowercase(),
            architecture,
            variant,
        }
    }

    /// How well `candidate` serves `self` (both normalized): None = not at all,
    /// higher = better.
    fn score(&self, candidate: &Platform) -> Option<u32> {
        if self.os != candidate.os || self.architecture != candidate.architecture {
            return None;
        }
        if self.variant == candidate.variant {
            return Some(100);
        }
        // arm: v7 runs v6 and v5 binaries; prefer the highest variant not above ours.
        let num = |v: &Option<String>| {
            v.as_deref()
                .and_then(|v| v.strip_prefix('v'))
                .and_then(|n| n.parse::<u32>().ok())
        };
        if self.architecture == "arm" {
            if let (Some(want), Some(have)) = (num(&self.variant), num(&candidate.variant)) {
                if have <= want {
                    return Some(have);
                }
            }
        }
        None
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// An image manifest (Docker schema 2 or OCI).
#[derive(Debug, Clone, Deserialize)]
pub struct ImageManifest {
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// A manifest list / OCI index.
#[derive(Debug, Clone, Deserialize)]
pub struct Index {
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

/// What a manifest response holds.
#[derive(Debug, Clone)]
pub enum Manifest {
    Image(ImageManifest),
    Index(Index),
}

/// Interpret a manifest body, given the response's `Content-Type`.
pub fn parse(body: &[u8], content_type: &str) -> Result<Manifest> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Error::InvalidManifest(format!("invalid manifest: {e}")))?;
    let ct = content_type.split(';').next().unwrap_or("").trim();
    let mt = v
        .get("mediaType")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or(ct);
    let schema1 = SCHEMA1.contains(&mt)
        || SCHEMA1.contains(&ct)
        || v.get("schemaVersion").and_then(Value::as_u64) == Some(1);
    if schema1 {
        return Err(Error::UnsupportedMediaType(
            "[DEPRECATION NOTICE] Docker Image Format v1 and Docker Image manifest version 2, schema 1 support has been removed. Suggest the author of the image to upgrade it to image manifest version 2, schema 2.".into(),
        ));
    }
    let is_index = mt == DOCKER_LIST
        || mt == OCI_INDEX
        || (v.get("manifests").is_some() && v.get("layers").is_none() && v.get("config").is_none());
    if is_index {
        let idx: Index = serde_json::from_value(v)
            .map_err(|e| Error::InvalidManifest(format!("invalid manifest list: {e}")))?;
        return Ok(Manifest::Index(idx));
    }
    let untyped = mt.is_empty() || mt == "application/json";
    if mt == DOCKER_MANIFEST || mt == OCI_MANIFEST || (untyped && v.get("config").is_some()) {
        let m: ImageManifest = serde_json::from_value(v)
            .map_err(|e| Error::InvalidManifest(format!("invalid manifest: {e}")))?;
        return Ok(Manifest::Image(m));
    }
    Err(Error::UnsupportedMediaType(format!(
        "unsupported manifest media type and no default available: {mt}"
    )))
}

/// Pick the manifest for `want` from an index (Docker's choice: best match,
/// first in list order among equals).
pub fn select<'a>(index: &'a Index, want: &Platform) -> Result<&'a Descriptor> {
    let want = want.normalized();
    let mut best: Option<(u32, &Descriptor)> = None;
    for d in &index.manifests {
        if d.media_type != DOCKER_MANIFEST
            && d.media_type != OCI_MANIFEST
            && !d.media_type.is_empty()
        {
            continue;
        }
        let Some(p) = &d.platform else { continue };
        if let Some(s) = want.score(&p.normalized()) {
            if best.is_none_or(|(b, _)| s > b) {
                best = Some((s, d));
            }
        }
    }
    best.map(|(_, d)| d).ok_or_else(|| {
        Error::NoMatchingPlatform(format!(
            "no matching manifest for {want} in the manifest list entries"
        ))
    })
}

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Check a layer descriptor's media type: supported compression, or an error
/// for foreign/non-distributable and unknown types.
pub fn layer_compression(d: &Descriptor) -> Result<Compression> {
    let mt = d.media_type.as_str();
    if mt == DOCKER_FOREIGN || mt.starts_with(OCI_NONDIST) {
        return Err(Error::UnsupportedMediaType(format!(
            "layer {} has media type {mt}: foreign (non-distributable) layers are not supported",
            d.digest
        )));
    }
    match mt {
        DOCKER_LAYER_GZIP => Ok(Compression::Gzip),
        DOCKER_LAYER_TAR => Ok(Compression::None),
        "application/vnd.docker.image.rootfs.diff.tar.zstd" => Ok(Compression::Zstd),
        _ if mt == OCI_LAYER => Ok(Compression::None),
        _ if mt == format!("{OCI_LAYER}+gzip") => Ok(Compression::Gzip),
        _ if mt == format!("{OCI_LAYER}+zstd") => Ok(Compression::Zstd),
        _ => Err(Error::UnsupportedMediaType(format!(
            "layer {} has unsupported media type {mt:?}",
            d.digest
        ))),
    }
}

/// Check the config descriptor's media type.
pub fn check_config(d: &Descriptor) -> Result<()> {
    match d.media_type.as_str() {
        DOCKER_CONFIG | OCI_CONFIG | "" | "application/octet-stream" => Ok(()),
        mt => Err(Error::UnsupportedMediaType(format!(
            "unsupported image config media type {mt:?}: this is not a container image"
        ))),
    }
}

/// `sha256:<64 hex>` → the hex.
pub fn digest_hex(d: &str) -> Result<&str> {
    match d.strip_prefix("sha256:") {
        Some(h)
            if h.len() == 64
                && h.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) =>
        {
            Ok(h)
        }
        _ => Err(Error::InvalidManifest(format!("unsupported digest {d:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(p: &str) -> Descriptor {
        let pl = Platform::parse(p).expect("platform");
        Descriptor {
            media_type: DOCKER_MANIFEST.into(),
            digest: format!("sha256:{p}"),
            size: 1,
            urls: None,
            platform: Some(pl),
        }
    }

    #[test]
    fn platforms() {
        assert_eq!(
            Platform::parse("linux/aarch64/v8").expect("p").to_string(),
            "linux/arm64"
        );
        assert_eq!(
            Platform::parse("arm64").expect("p").to_string(),
            "linux/arm64"
        );
        assert_eq!(
            Platform::parse("linux/arm").expect("p").to_string(),
            "linux/arm/v7"
        );
        assert_eq!(
            Platform::parse("linux/x86_64").expect("p").to_string(),
            "linux/amd64"
        );
        assert!(Platform::parse("").is_err());
        let idx = Index {
            manifests: vec![
                desc("linux/arm/v6"),
                desc("linux/arm64/v8"),
                desc("linux/amd64"),
                desc("linux/arm/v7"),
            ],
        };
        let pick =
            |p: &str| select(&idx, &Platform::parse(p).expect("p")).map(|d| d.digest.clone());
        assert_eq!(pick("linux/amd64").expect("amd64"), "sha256:linux/amd64");
        assert_eq!(pick("linux/arm64").expect("arm64"), "sha256:linux/arm64/v8");
        assert_eq!(pick("linux/arm/v7").expect("v7"), "sha256:linux/arm/v7");
        assert_eq!(pick("linux/arm/v6").expect("v6"), "sha256:linux/arm/v6");
        assert_eq!(
            pick("linux/s390x").expect_err("none").to_string(),
            "no matching manifest for linux/s390x in the manifest list entries"
        );
    }
}
