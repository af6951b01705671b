//! `docker save`: several images into one archive, in the layout Docker 25+
//! writes (an OCI image layout plus the classic `manifest.json` and
//! `repositories`), which every `docker load` since 1.10 reads through
//! `manifest.json` and containerd-based loaders read through `index.json`:
//!
//! ```text
//! blobs/sha256/<diff id>     uncompressed layer tar (application/vnd.oci.image.layer.v1.tar)
//! blobs/sha256/<image id>    image config
//! blobs/sha256/<digest>      OCI manifest, one per image
//! index.json                 one entry per tag (io.containerd.image.name, ref.name), or one untagged
//! manifest.json              [{"Config": "blobs/sha256/<id>", "RepoTags": [...], "Layers": [...]}]
//! oci-layout                 {"imageLayoutVersion": "1.0.0"}
//! repositories               {"busybox": {"latest": "<top layer diff id hex>"}}
//! ```

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Write};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{is_digest_ref, ref_repo_name, ImageStore};
use crate::error::{Error, IoContext, Result};
use crate::reference::{is_hex64, Reference};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// One image to write, everything read or opened under the lock.
struct SaveImage {
    hex: String,
    config: Vec<u8>,
    layers: Vec<String>,
    tags: Vec<Reference>,
}

fn header(path: &str, size: u64, dir: bool) -> io::Result<tar::Header> {
    let mut h = tar::Header::new_gnu();
    h.set_path(path)?;
    h.set_size(size);
    h.set_mode(if dir { 0o755 } else { 0o644 });
    h.set_entry_type(if dir {
        tar::EntryType::Directory
    } else {
        tar::EntryType::Regular
    });
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_cksum();
    Ok(h)
}

impl ImageStore {
    /// Write the images named by `names` into one `docker save` archive.
    ///
    /// Names are resolved as Docker does: `busybox:1` saves that tag;
    /// `busybox` (no tag) saves every tag of the repository; an id or a digest
    /// reference saves the image without a tag. Layer files are opened before
    /// writing starts, so a concurrent `rmi` cannot cut the archive short.
    pub fn save(&self, names: &[&str], out: impl Write) -> Result<()> {
        let (images, mut layer_files) = self.collect_for_save(names)?;
        let mut b = tar::Builder::new(out);
        let w = |e: io::Error| Error::Io {
            context: "writing the archive".into(),
            source: e,
        };
        for d in ["blobs/", "blobs/sha256/"] {
            b.append(&header(d, 0, true).map_err(w)?, io::empty())
                .map_err(w)?;
        }
        let mut written: HashSet<String> = HashSet::new();
        let mut manifest_json = Vec::new();
        let mut index = Vec::new();
        let mut repositories: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for img in &images {
            let mut layer_descs = Vec::new();
            for l in &img.layers {
                let (file, size) = layer_files
                    .get_mut(l)
                    .ok_or_else(|| Error::NotFound(format!("layer sha256:{l}")))?;
                if written.insert(l.clone()) {
                    let path = format!("blobs/sha256/{l}");
                    let mut r = file.take(*size);
                    b.append(&header(&path, *size, false).map_err(w)?, &mut r)
                        .map_err(w)?;
                }
                layer_descs.push(json!({
                    "mediaType": OCI_LAYER, "digest": format!("sha256:{l}"), "size": size,
                }));
            }
            if written.insert(img.hex.clone()) {
                let path = format!("blobs/sha256/{}", img.hex);
                b.append(
                    &header(&path, img.config.len() as u64, false).map_err(w)?,
                    &img.config[..],
                )
                .map_err(w)?;
            }
            let manifest = serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": OCI_CONFIG,
                    "digest": format!("sha256:{}", img.hex),
                    "size": img.config.len(),
                },
                "layers": layer_descs,
            }))
            .map_err(|e| Error::Corrupt(e.to_string()))?;
            let mhex = hex::encode(Sha256::digest(&manifest));
            if written.insert(mhex.clone()) {
                let path = format!("blobs/sha256/{mhex}");
                b.append(
                    &header(&path, manifest.len() as u64, false).map_err(w)?,
                    &manifest[..],
                )
                .map_err(w)?;
            }
            let desc = |ann: Option<Value>| {
                let mut d = json!({
                    "mediaType": OCI_MANIFEST,
                    "digest": format!("sha256:{mhex}"),
                    "size": manifest.len(),
                });
                if let (Some(a), Some(o)) = (ann, d.as_object_mut()) {
                    o.insert("annotations".into(), a);
                }
                d
            };
            if img.tags.is_empty() {
                index.push(desc(None));
            }
            for t in &img.tags {
                let tag = t.tag.clone().unwrap_or_else(|| "latest".into());
                index.push(desc(Some(json!({
                    "io.containerd.image.name": format!("{}:{tag}", t.full_name()),
                    "org.opencontainers.image.ref.name": tag,
                }))));
                if let Some(top) = img.layers.last() {
                    repositories
                        .entry(t.familiar_name())
                        .or_default()
                        .insert(tag, top.clone());
                }
            }
            manifest_json.push(json!({
                "Config": format!("blobs/sha256/{}", img.hex),
                "RepoTags": img.tags.iter().map(Reference::familiar).collect::<Vec<_>>(),
                "Layers": img.layers.iter().map(|l| format!("blobs/sha256/{l}")).collect::<Vec<_>>(),
            }));
        }
        let files: [(&str, Value); 4] = [
            (
                "index.json",
                json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index}),
            ),
            ("manifest.json", Value::Array(manifest_json)),
            ("oci-layout", json!({"imageLayoutVersion": "1.0.0"})),
            ("repositories", json!(repositories)),
        ];
        for (name, v) in files {
            let data = serde_json::to_vec(&v).map_err(|e| Error::Corrupt(e.to_string()))?;
            b.append(
                &header(name, data.len() as u64, false).map_err(w)?,
                &data[..],
            )
            .map_err(w)?;
        }
        b.into_inner().map_err(w)?.flush().map_err(w)?;
        Ok(())
    }

    /// Resolve `names`, read the configs and open the layer files, under the read lock.
    #[allow(clippy::type_complexity)]
    fn collect_for_save(
        &self,
        names: &[&str],
    ) -> Result<(
        Vec<SaveImage>,
        std::collections::HashMap<String, (File, u64)>,
    )> {
        let st = self.read_state();
        let mut images: Vec<SaveImage> = Vec::new();
        let mut add =
            |hex: String, tag: Option<Reference>| match images.iter_mut().find(|i| i.hex == hex) {
                Some(i) => {
                    if let Some(t) = tag {
                        if !i.tags.contains(&t) {
                            i.tags.push(t);
                        }
                    }
                }
                None => images.push(SaveImage {
                    hex,
                    config: Vec::new(),
                    layers: Vec::new(),
                    tags: tag.into_iter().collect(),
                }),
            };
        for name in names {
            let name_only = Reference::parse(name)
                .ok()
                .filter(|r| r.tag.is_none() && r.digest.is_none() && !is_hex64(name));
            if let Some(r) = name_only {
                let repo = r.familiar_name();
                let mut found = false;
                for (k, h) in st.repos.iter().filter(|(k, _)| ref_repo_name(k) == repo) {
                    found = true;
                    let tag = if is_digest_ref(k) {
                        None
                    } else {
                        Some(Reference::parse(k)?)
                    };
                    add(h.clone(), tag);
                }
                if found {
                    continue;
                }
            }
            let (hex, by_ref) = Self::lookup(&st, name)?;
            let tag = match by_ref {
                Some(k) if !is_digest_ref(&k) => Some(Reference::parse(&k)?),
                _ => None,
            };
            add(hex, tag);
        }
        let mut files = std::collections::HashMap::new();
        for img in &mut images {
            let meta = st
                .images
                .get(&img.hex)
                .ok_or_else(|| Error::NotFound(img.hex.clone()))?;
            img.layers = meta.layers.clone();
            let bp = self.blob_path(&img.hex);
            img.config = std::fs::read(&bp).ctx(|| format!("reading {}", bp.display()))?;
            for l in &img.layers {
                if files.contains_key(l) {
                    continue;
                }
                let p = self.layer_path(l);
                let f = File::open(&p).ctx(|| format!("opening layer {}", p.display()))?;
                let len = f
                    .metadata()
                    .ctx(|| format!("inspecting {}", p.display()))?
                    .len();
                files.insert(l.clone(), (f, len));
            }
        }
        Ok((images, files))
    }
}
