//! `docker history`, `docker image prune` and `docker system df` on the store,
//! plus small helpers on [`Image`] for the API's list filters.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;
use serde_json::Value;

use super::{DeleteItem, Image, ImageStore};
use crate::error::{Error, Result};

/// One line of `docker history` (Engine API `GET /images/{name}/history`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryItem {
    /// The image id for the newest entry, `<missing>` for the others (Vessel
    /// keeps no parent chain, like images pulled by Docker).
    pub id: String,
    /// Unix seconds (0 when the config does not say).
    pub created: i64,
    pub created_by: String,
    /// The image's tags on the newest entry, empty otherwise.
    pub tags: Vec<String>,
    /// Uncompressed size of the layer this step made; 0 for `empty_layer` steps.
    pub size: u64,
    pub comment: String,
}

/// Filters of `docker image prune` (Engine API `POST /images/prune`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneFilters {
    /// `label=` values (`key` or `key=value`): an image must match every one.
    pub labels: Vec<String>,
    /// `label!=` values (`key` or `key=value`): an image matching any one is kept.
    pub labels_not: Vec<String>,
    /// `until=` as Unix seconds: only images created before it.
    pub until: Option<i64>,
}

/// Result of [`ImageStore::prune`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// `Untagged`/`Deleted` lines, in order.
    pub deleted: Vec<DeleteItem>,
    /// Bytes freed on disk (layer tars, config blobs, boot disks).
    pub space_reclaimed: u64,
}

/// One image of [`ImageStore::disk_usage`].
#[derive(Debug, Clone, PartialEq)]
pub struct ImageUsage {
    pub image: Image,
    /// Sum of the sizes of this image's layers that other images use too.
    pub shared_size: u64,
    /// `image.size - shared_size`.
    pub unique_size: u64,
}

/// `docker system df`, images part (the caller adds the container counts).
#[derive(Debug, Clone, PartialEq)]
pub struct DiskUsage {
    /// Sum of the sizes of all distinct layers (Engine API `LayersSize`).
    pub layers_size: u64,
    /// Bytes taken by boot disks (Vessel-specific, not in Docker's answer).
    pub boot_disks_size: u64,
    pub images: Vec<ImageUsage>,
}

impl Image {
    /// `created` as Unix seconds (0 if it does not parse), for `before`/`since`/`until`.
    pub fn created_unix(&self) -> i64 {
        chrono::DateTime::parse_from_rfc3339(&self.created)
            .map(|d| d.timestamp())
            .unwrap_or(0)
    }

    /// The image's labels (`Config.Labels`).
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.config.labels
    }

    /// No tags (Docker's `dangling=true`; repo digests do not count).
    pub fn is_dangling(&self) -> bool {
        self.repo_tags.is_empty()
    }

    /// Whether the labels match a `label` filter value (`key` or `key=value`).
    pub fn matches_label(&self, filter: &str) -> bool {
        match filter.split_once('=') {
            Some((k, v)) => self.config.labels.get(k).is_some_and(|x| x == v),
            None => self.config.labels.contains_key(filter),
        }
    }
}

fn time_of(v: &Value) -> i64 {
    v.as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|d| d.timestamp())
        .unwrap_or(0)
}

impl ImageStore {
    /// The image's history (newest first), from its config's `history`, as
    /// Docker computes it: non-empty steps take the layer sizes in order.
    pub fn history(&self, name: &str) -> Result<Vec<HistoryItem>> {
        let st = self.read_state();
        let (hex, _) = Self::lookup(&st, name)?;
        let img = self.image(&st, &hex)?;
        let sizes = st
            .images
            .get(&hex)
            .map(|m| m.layer_sizes.clone())
            .unwrap_or_default();
        drop(st);
        let steps = img
            .raw_config
            .get("history")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut out = Vec::with_capacity(steps.len());
        let mut layer = 0;
        for h in &steps {
            let empty = h
                .get("empty_layer")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let size = if empty {
                0
            } else {
                let s = sizes.get(layer).copied().ok_or_else(|| {
                    Error::Corrupt(format!(
                        "image {}: too many non-empty layers in History section",
                        img.id
                    ))
                })?;
                layer += 1;
                s
            };
            let text = |k: &str| {
                h.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            out.push(HistoryItem {
                id: "<missing>".into(),
                created: h.get("created").map(time_of).unwrap_or(0),
                created_by: text("created_by"),
                tags: Vec::new(),
                size,
                comment: text("comment"),
            });
        }
        out.reverse();
        if let Some(top) = out.first_mut() {
            top.id = img.id.clone();
            top.tags = img.repo_tags.clone();
        }
        Ok(out)
    }

    /// `docker image prune`: remove unused images (not in `in_use`, which holds
    /// the image ids, `sha256:<hex>` or hex, of all containers). With
    /// `dangling_only`, only images without tags; otherwise every unused image
    /// (`-a`). Images that do not match `filters` are kept. An image that
    /// cannot be removed is skipped (logged), as Docker does.
    pub fn prune(
        &self,
        dangling_only: bool,
        in_use: &HashSet<String>,
        filters: &PruneFilters,
    ) -> Result<PruneReport> {
        let mut st = self.write_state();
        let used = |hex: &str| in_use.contains(hex) || in_use.contains(&format!("sha256:{hex}"));
        let mut hexes: Vec<String> = st.images.keys().cloned().collect();
        hexes.sort();
        let mut report = PruneReport::default();
        let no_users = |_: &str| Vec::new();
        for hex in hexes {
            if used(&hex) {
                continue;
            }
            let img = match self.image(&st, &hex) {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!(image = %hex, error = %e, "prune: skipping unreadable image");
                    continue;
                }
            };
            if dangling_only && !img.is_dangling() {
                continue;
            }
            if !filters.labels.iter().all(|f| img.matches_label(f))
                || filters.labels_not.iter().any(|f| img.matches_label(f))
                || filters.until.is_some_and(|u| img.created_unix() >= u)
            {
                continue;
            }
            let refs: Vec<String> = img
                .repo_tags
                .iter()
                .chain(&img.repo_digests)
                .cloned()
                .collect();
            let names = if refs.is_empty() {
                vec![hex.clone()]
            } else {
                refs
            };
            for name in names {
                match self.remove_locked(&mut st, &name, false, &no_users) {
                    Ok((items, freed)) => {
                        report.deleted.extend(items);
                        report.space_reclaimed += freed;
                    }
                    // A digest reference already went with its repository's last tag.
                    Err(Error::NotFound(_)) => {}
                    Err(e) => {
                        tracing::warn!(image = %hex, reference = %name, error = %e, "prune: cannot remove");
                    }
                }
            }
        }
        Ok(report)
    }

    /// Sizes for `docker system df` (images part).
    pub fn disk_usage(&self) -> Result<DiskUsage> {
        let st = self.read_state();
        let mut uses: HashMap<&str, usize> = HashMap::new();
        let mut layer_size: HashMap<&str, u64> = HashMap::new();
        for m in st.images.values() {
            let distinct: HashSet<&String> = m.layers.iter().collect();
            for l in distinct {
                *uses.entry(l).or_default() += 1;
            }
            for (l, s) in m.layers.iter().zip(&m.layer_sizes) {
                layer_size.insert(l, *s);
            }
        }
        let layers_size = layer_size.values().sum();
        let mut boot_disks_size = 0;
        let mut images = Vec::new();
        let mut hexes: Vec<&String> = st.images.keys().collect();
        hexes.sort();
        for hex in hexes {
            let image = match self.image(&st, hex) {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!(image = %hex, error = %e, "df: skipping unreadable image");
                    continue;
                }
            };
            if let Ok(m) = std::fs::metadata(self.disk_path(hex)) {
                boot_disks_size += m.len();
            }
            let meta = &st.images[hex.as_str()];
            let mut seen = HashSet::new();
            let shared_size = meta
                .layers
                .iter()
                .zip(&meta.layer_sizes)
                .filter(|(l, _)| seen.insert(l.as_str()))
                .filter(|(l, _)| uses.get(l.as_str()).copied().unwrap_or(0) > 1)
                .map(|(_, s)| *s)
                .sum();
            let unique_size = image.size.saturating_sub(shared_size);
            images.push(ImageUsage {
                image,
                shared_size,
                unique_size,
            });
        }
        Ok(DiskUsage {
            layers_size,
            boot_disks_size,
            images,
        })
    }
}
