//! The store features behind pull/push and the image commands: staging and
//! committing pulled images, repo digests, blob records and their garbage
//! collection, `save`, `history`, `prune`, `disk_usage`.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};
use vessel_image::{
    BlobRecord, DeleteItem, Error, ImageStore, PruneFilters, PulledImage, PulledLayer,
};

fn sha(d: &[u8]) -> String {
    hex::encode(Sha256::digest(d))
}

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (p, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_path(p).unwrap();
        h.set_mtime(1_700_000_000);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gz(d: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(d).unwrap();
    e.finish().unwrap()
}

fn config(
    layers: &[&[u8]],
    labels: serde_json::Value,
    created: &str,
    history: serde_json::Value,
) -> Vec<u8> {
    let diffs: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha(l)))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "created": created,
        "config": {"Cmd": ["sh"], "Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": diffs},
        "history": history,
    }))
    .unwrap()
}

/// Load one image (classic archive) with `tags`; returns the id.
fn load(store: &ImageStore, cfg: &[u8], layers: &[&[u8]], tags: &[&str]) -> String {
    let chex = sha(cfg);
    let mut files: Vec<(String, Vec<u8>)> = vec![(format!("{chex}.json"), cfg.to_vec())];
    let mut names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        files.push((format!("l{i}/layer.tar"), l.to_vec()));
        names.push(format!("l{i}/layer.tar"));
    }
    files.push((
        "manifest.json".into(),
        serde_json::to_vec(&serde_json::json!([{"Config": format!("{chex}.json"), "RepoTags": tags, "Layers": names}])).unwrap(),
    ));
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    store.load(&tar_of(&refs)[..]).unwrap();
    format!("sha256:{chex}")
}

fn no_users(_: &str) -> Vec<(String, bool)> {
    Vec::new()
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|r| r.count()).unwrap_or(0)
}

fn hist(n: usize) -> serde_json::Value {
    let mut v: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"created": "2024-01-01T00:00:00Z", "created_by": format!("RUN step {i}")}))
        .collect();
    v.insert(1.min(n), serde_json::json!({"created": "2024-01-01T00:00:05Z", "created_by": "ENV A=b", "empty_layer": true}));
    serde_json::Value::Array(v)
}

#[test]
fn pulled_images_repo_digests_and_gc() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    let l1 = tar_of(&[("a", b"1")]);
    let l2 = tar_of(&[("b", &[7u8; 5000][..])]);
    let cfg = config(
        &[&l1, &l2],
        serde_json::json!({}),
        "2024-01-01T00:00:00Z",
        hist(2),
    );
    let id = format!("sha256:{}", sha(&cfg));

    // Stage from compressed and plain blobs.
    let s1 = store.stage_layer(&gz(&l1)[..]).unwrap();
    assert_eq!(s1.diff_id(), format!("sha256:{}", sha(&l1)));
    assert_eq!(s1.blob_digest(), format!("sha256:{}", sha(&gz(&l1))));
    assert_eq!(s1.size(), l1.len() as u64);
    let s2 = store.stage_layer(&l2[..]).unwrap();
    // Wrong order: refused, nothing stored.
    let bad = PulledImage {
        config: cfg.clone(),
        layers: vec![PulledLayer::Staged(s2), PulledLayer::Staged(s1)],
        tag: Some("localhost:5000/x:1".into()),
        repo_digest: None,
    };
    assert!(matches!(
        store.commit_pulled(bad),
        Err(Error::InvalidImage(_))
    ));
    assert!(store.list().is_empty());
    assert_eq!(
        files_in(&dir.path().join("tmp")),
        0,
        "staged layers are dropped"
    );
    assert_eq!(files_in(&dir.path().join("layers/sha256")), 0);

    let digest = format!("sha256:{}", "d".repeat(64));
    let out = store
        .commit_pulled(PulledImage {
            config: cfg.clone(),
            layers: vec![
                PulledLayer::Staged(store.stage_layer(&gz(&l1)[..]).unwrap()),
                PulledLayer::Staged(store.stage_layer(&l2[..]).unwrap()),
            ],
            tag: Some("localhost:5000/x:1".into()),
            repo_digest: Some(format!("localhost:5000/x@{digest}")),
        })
        .unwrap();
    assert_eq!(out.id, id);
    assert!(out.new_image);
    let img = store.resolve("localhost:5000/x:1").unwrap();
    assert_eq!(img.repo_tags, vec!["localhost:5000/x:1"]);
    assert_eq!(img.repo_digests, vec![format!("localhost:5000/x@{digest}")]);
    assert_eq!(
        store
            .resolve(&format!("localhost:5000/x@{digest}"))
            .unwrap()
            .id,
        id
    );
    assert!(store.boot_disk(&id).unwrap().is_file());
    assert!(store.has_layer(&img.layers[0]));
    assert!(!store.has_layer(&format!("sha256:{}", "0".repeat(64))));
    let (cid, bytes) = store.config_blob("localhost:5000/x:1").unwrap();
    assert_eq!(
        (cid.as_str(), bytes.as_slice()),
        (id.as_str(), cfg.as_slice())
    );
    let mut tarred = Vec::new();
    store
        .open_layer(&img.layers[1])
        .unwrap()
        .0
        .read_to_end(&mut tarred)
        .unwrap();
    assert_eq!(tarred, l2);

    // Blob records survive a reopen.
    let rec = BlobRecord {
        diff_id: img.layers[0].clone(),
        digest: format!("sha256:{}", sha(&gz(&l1))),
        media_type: "application/vnd.docker.image.rootfs.diff.tar.gzip".into(),
        size: gz(&l1).len() as u64,
        repository: "localhost:5000/x".into(),
    };
    store.record_blob(rec.clone()).unwrap();
    store.record_blob(rec.clone()).unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    assert_eq!(store.blob_records(&img.layers[0]), vec![rec.clone()]);
    assert_eq!(
        store.diff_id_for_blob(&rec.digest),
        Some(img.layers[0].clone())
    );

    // The same image again: only the references change.
    let again = store
        .commit_pulled(PulledImage {
            config: cfg.clone(),
            layers: vec![
                PulledLayer::Existing(img.layers[0].clone()),
                PulledLayer::Existing(img.layers[1].clone()),
            ],
            tag: Some("other:2".into()),
            repo_digest: Some(format!("other@{digest}")),
        })
        .unwrap();
    assert!(!again.new_image);
    store
        .add_repo_digest("other:2", &format!("localhost:5000/y@{digest}"))
        .unwrap();
    let img = store.resolve(&id).unwrap();
    assert_eq!(img.repo_tags, vec!["localhost:5000/x:1", "other:2"]);
    assert_eq!(img.repo_digests.len(), 3);

    // Removing the last tag of a repository takes its digests along; the image stays.
    assert_eq!(
        store.remove("other:2", false, &no_users).unwrap(),
        vec![
            DeleteItem::Untagged("other:2".into()),
            DeleteItem::Untagged(format!("other@{digest}"))
        ]
    );
    // rmi by digest reference.
    assert_eq!(
        store
            .remove(&format!("localhost:5000/y@{digest}"), false, &no_users)
            .unwrap(),
        vec![DeleteItem::Untagged(format!("localhost:5000/y@{digest}"))]
    );
    // Tag + digest of one repository count as one reference: rmi by id works.
    let items = store.remove(&id, false, &no_users).unwrap();
    assert_eq!(items.last(), Some(&DeleteItem::Deleted(id.clone())));
    assert!(items.contains(&DeleteItem::Untagged(format!("localhost:5000/x@{digest}"))));
    // Everything garbage collected, records included.
    for d in ["blobs/sha256", "layers/sha256", "disks", "images", "tmp"] {
        assert_eq!(files_in(&dir.path().join(d)), 0, "{d}");
    }
    assert!(store.blob_records(&rec.diff_id).is_empty());
    let store = ImageStore::open(dir.path()).unwrap();
    assert!(store.blob_records(&rec.diff_id).is_empty());
}

#[test]
fn shared_layers_are_kept_until_unused() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    let base = tar_of(&[("base", &[1u8; 3000][..])]);
    let a = tar_of(&[("a", b"a")]);
    let b = tar_of(&[("b", b"b")]);
    let ia = load(
        &store,
        &config(
            &[&base, &a],
            serde_json::json!({}),
            "2024-01-01T00:00:00Z",
            hist(2),
        ),
        &[&base, &a],
        &["a:1"],
    );
    let ib = load(
        &store,
        &config(
            &[&base, &b],
            serde_json::json!({}),
            "2024-01-02T00:00:00Z",
            hist(2),
        ),
        &[&base, &b],
        &["b:1"],
    );
    let du = store.disk_usage().unwrap();
    assert_eq!(du.layers_size, (base.len() + a.len() + b.len()) as u64);
    for u in &du.images {
        assert_eq!(u.shared_size, base.len() as u64);
        assert_eq!(u.unique_size, u.image.size - base.len() as u64);
    }
    assert!(du.boot_disks_size > 0);
    store.remove("a:1", false, &no_users).unwrap();
    assert_eq!(files_in(&dir.path().join("layers/sha256")), 2);
    assert!(store.has_layer(&format!("sha256:{}", sha(&base))));
    assert!(store.resolve(&ia).is_err());
    store.remove(&ib, false, &no_users).unwrap();
    assert_eq!(files_in(&dir.path().join("layers/sha256")), 0);
}

#[test]
fn history_like_docker() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    let l1 = tar_of(&[("a", b"1")]);
    let l2 = tar_of(&[("b", &[7u8; 5000][..])]);
    let id = load(
        &store,
        &config(
            &[&l1, &l2],
            serde_json::json!({}),
            "2024-01-01T00:00:00Z",
            hist(2),
        ),
        &[&l1, &l2],
        &["h:1", "h:2"],
    );
    let h = store.history("h:1").unwrap();
    assert_eq!(h.len(), 3);
    // Newest first: the top entry is the image with its tags.
    assert_eq!(h[0].id, id);
    assert_eq!(h[0].tags, vec!["h:1", "h:2"]);
    assert_eq!(h[0].created_by, "RUN step 1");
    assert_eq!(h[0].size, l2.len() as u64);
    assert_eq!(h[1].id, "<missing>");
    assert_eq!(h[1].created_by, "ENV A=b");
    assert_eq!(h[1].size, 0);
    assert_eq!(h[1].created, 1_704_067_205);
    assert_eq!(h[2].size, l1.len() as u64);
    assert!(h[2].tags.is_empty());
    assert!(matches!(store.history("nope"), Err(Error::NotFound(_))));
}

#[test]
fn prune_dangling_all_and_filters() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    let mk = |n: &str, labels: serde_json::Value, created: &str, tags: &[&str]| {
        let l = tar_of(&[(n, n.as_bytes())]);
        load(
            &store,
            &config(&[&l], labels, created, hist(1)),
            &[&l],
            tags,
        )
    };
    let dangling = mk("d", serde_json::json!({}), "2020-01-01T00:00:00Z", &[]);
    let used_dangling = mk("u", serde_json::json!({}), "2020-01-01T00:00:00Z", &[]);
    let tagged = mk(
        "t",
        serde_json::json!({"keep": "yes"}),
        "2020-01-01T00:00:00Z",
        &["t:1"],
    );
    let labelled = mk(
        "l",
        serde_json::json!({"team": "a"}),
        "2020-01-01T00:00:00Z",
        &["l:1"],
    );
    let recent = mk(
        "r",
        serde_json::json!({"team": "a"}),
        "2030-01-01T00:00:00Z",
        &["r:1"],
    );
    let in_use: HashSet<String> = [used_dangling.clone()].into();

    let r = store
        .prune(true, &in_use, &PruneFilters::default())
        .unwrap();
    assert_eq!(r.deleted, vec![DeleteItem::Deleted(dangling.clone())]);
    assert!(r.space_reclaimed > 0);
    assert_eq!(store.list().len(), 4);

    // -a with label=team=a and until: only the old labelled one.
    let f = PruneFilters {
        labels: vec!["team=a".into()],
        until: Some(1_700_000_000),
        ..Default::default()
    };
    let r = store.prune(false, &in_use, &f).unwrap();
    assert_eq!(
        r.deleted,
        vec![
            DeleteItem::Untagged("l:1".into()),
            DeleteItem::Deleted(labelled)
        ]
    );
    // -a with label!=keep: everything unused but the kept one.
    let f = PruneFilters {
        labels_not: vec!["keep".into()],
        ..Default::default()
    };
    let r = store.prune(false, &in_use, &f).unwrap();
    assert_eq!(
        r.deleted,
        vec![
            DeleteItem::Untagged("r:1".into()),
            DeleteItem::Deleted(recent)
        ]
    );
    let left: HashSet<String> = store.list().into_iter().map(|i| i.id).collect();
    assert_eq!(left, [used_dangling, tagged].into());
}

/// Parse a tar into name → content.
fn untar(data: &[u8]) -> HashMap<String, Vec<u8>> {
    let mut a = tar::Archive::new(data);
    let mut out = HashMap::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut d = Vec::new();
        e.read_to_end(&mut d).unwrap();
        out.insert(name, d);
    }
    out
}

#[test]
fn save_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    let base = tar_of(&[("base", &[1u8; 3000][..])]);
    let a = tar_of(&[("a", b"a")]);
    let b = tar_of(&[("b", b"b")]);
    let ia = load(
        &store,
        &config(
            &[&base, &a],
            serde_json::json!({}),
            "2024-01-01T00:00:00Z",
            hist(2),
        ),
        &[&base, &a],
        &["app:1", "app:2", "localhost:5000/app:x"],
    );
    let ib = load(
        &store,
        &config(
            &[&base, &b],
            serde_json::json!({}),
            "2024-01-02T00:00:00Z",
            hist(2),
        ),
        &[&base, &b],
        &[],
    );

    let mut out = Vec::new();
    store
        .save(&["app", "localhost:5000/app:x", &ib[7..19]], &mut out)
        .unwrap();
    let files = untar(&out);
    for f in [
        "manifest.json",
        "index.json",
        "oci-layout",
        "repositories",
        "blobs/",
        "blobs/sha256/",
    ] {
        assert!(
            files.contains_key(f),
            "{f} missing: {:?}",
            files.keys().collect::<Vec<_>>()
        );
    }
    // Every blob is named by its digest; layers are written once.
    for (name, data) in &files {
        if let Some(h) = name.strip_prefix("blobs/sha256/") {
            if !h.is_empty() {
                assert_eq!(sha(data), h, "{name}");
            }
        }
    }
    assert_eq!(
        files
            .keys()
            .filter(|k| k.starts_with("blobs/sha256/") && k.len() > 20)
            .count(),
        3 + 2 + 2
    );
    let manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
    let entries = manifest.as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["Config"], format!("blobs/sha256/{}", &ia[7..]));
    assert_eq!(
        entries[0]["RepoTags"],
        serde_json::json!(["app:1", "app:2", "localhost:5000/app:x"])
    );
    assert_eq!(
        entries[0]["Layers"][0],
        format!("blobs/sha256/{}", sha(&base))
    );
    assert_eq!(entries[1]["RepoTags"], serde_json::json!([]));
    let repos: serde_json::Value = serde_json::from_slice(&files["repositories"]).unwrap();
    assert_eq!(repos["app"]["1"], sha(&a));
    assert_eq!(repos["localhost:5000/app"]["x"], sha(&a));
    let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let m = index["manifests"].as_array().unwrap();
    assert_eq!(m.len(), 4, "one per tag plus the untagged image");
    assert_eq!(
        m[0]["annotations"]["io.containerd.image.name"],
        "docker.io/library/app:1"
    );
    assert_eq!(
        m[0]["annotations"]["org.opencontainers.image.ref.name"],
        "1"
    );

    // load round-trips it into an empty store.
    let dir2 = tempfile::tempdir().unwrap();
    let other = ImageStore::open(dir2.path()).unwrap();
    let lines = other.load(&out[..]).unwrap();
    assert!(
        lines.contains(&"Loaded image: app:1".to_string()),
        "{lines:?}"
    );
    assert!(
        lines.contains(&format!("Loaded image ID: {ib}")),
        "{lines:?}"
    );
    let got = other.resolve("app:2").unwrap();
    let want = store.resolve("app:2").unwrap();
    assert_eq!(
        (got.id.clone(), got.layers.clone(), got.raw_config.clone()),
        (want.id, want.layers, want.raw_config)
    );
    assert_eq!(
        got.repo_tags,
        vec!["app:1", "app:2", "localhost:5000/app:x"]
    );
    assert_eq!(other.resolve(&ib).unwrap().layers.len(), 2);

    assert!(matches!(
        store.save(&["missing:1"], &mut Vec::new()),
        Err(Error::NotFound(_))
    ));
}
