#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};
use vessel_image::{extract_layer, DeleteItem, Error, ImageStore};

type Files<'a> = &'a [(&'a str, &'a [u8])];

fn hdr(path: &[u8], kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..path.len()].copy_from_slice(path);
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    h
}

/// A tar from (path, data) pairs; "dir/" makes a dir, "l->t" a symlink, "l=>t" a hardlink,
/// paths are written raw (so "../x" and "/x" are possible).
fn tar_of(files: Files) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (p, data) in files {
        if let Some((l, t)) = p.split_once("->") {
            let mut h = hdr(l.as_bytes(), tar::EntryType::Symlink, 0, 0o777);
            h.set_link_name(t).unwrap();
            h.set_cksum();
            b.append(&h, &[][..]).unwrap();
        } else if let Some((l, t)) = p.split_once("=>") {
            let mut h = hdr(l.as_bytes(), tar::EntryType::Link, 0, 0o644);
            h.as_old_mut().linkname[..t.len()].copy_from_slice(t.as_bytes());
            h.set_cksum();
            b.append(&h, &[][..]).unwrap();
        } else if p.ends_with('/') {
            b.append(
                &hdr(p.as_bytes(), tar::EntryType::Directory, 0, 0o755),
                &[][..],
            )
            .unwrap();
        } else {
            b.append(
                &hdr(
                    p.as_bytes(),
                    tar::EntryType::Regular,
                    data.len() as u64,
                    0o644,
                ),
                *data,
            )
            .unwrap();
        }
    }
    b.into_inner().unwrap()
}

fn sha(d: &[u8]) -> String {
    hex::encode(Sha256::digest(d))
}

fn gz(d: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(d).unwrap();
    e.finish().unwrap()
}

fn config(layers: &[&[u8]], cmd: &str) -> Vec<u8> {
    let diffs: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha(l)))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": [cmd], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diffs},
    }))
    .unwrap()
}

struct Img<'a> {
    layers: Vec<Vec<u8>>,
    tags: &'a [&'a str],
    cmd: &'a str,
}

fn two_images() -> Vec<Img<'static>> {
    let base = tar_of(&[
        ("bin/", b""),
        ("bin/sh", b"shell"),
        ("etc/", b""),
        ("etc/hostname", b"x"),
    ]);
    let top = tar_of(&[("etc/.wh.hostname", b""), ("app", b"app!")]);
    let other = tar_of(&[("hello", b"world")]);
    vec![
        Img {
            layers: vec![base, top],
            tags: &["busybox:latest", "localhost:5000/a/b:t"],
            cmd: "sh",
        },
        Img {
            layers: vec![other],
            tags: &["hello"],
            cmd: "/hello",
        },
    ]
}

fn classic_archive(imgs: &[Img], corrupt: impl Fn(&mut Vec<(String, Vec<u8>)>)) -> Vec<u8> {
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut manifest = Vec::new();
    for img in imgs {
        let refs: Vec<&[u8]> = img.layers.iter().map(|l| l.as_slice()).collect();
        let cfg = config(&refs, img.cmd);
        let cname = format!("{}.json", sha(&cfg));
        files.push((cname.clone(), cfg));
        let mut lnames = Vec::new();
        for (i, l) in img.layers.iter().enumerate() {
            let n = format!("{}/layer.tar", sha(format!("{}{i}", sha(l)).as_bytes()));
            let data = if i == 0 { gz(l) } else { l.clone() };
            files.push((n.clone(), data));
            lnames.push(n);
        }
        manifest.push(serde_json::json!({"Config": cname, "RepoTags": img.tags, "Layers": lnames}));
    }
    files.push((
        "manifest.json".into(),
        serde_json::to_vec(&manifest).unwrap(),
    ));
    corrupt(&mut files);
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    tar_of(&refs)
}

fn oci_archive(imgs: &[Img], with_manifest_json: bool) -> Vec<u8> {
    let mut files: Vec<(String, Vec<u8>)> = vec![(
        "oci-layout".into(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    )];
    let mut manifest = Vec::new();
    let mut index = Vec::new();
    for img in imgs {
        let refs: Vec<&[u8]> = img.layers.iter().map(|l| l.as_slice()).collect();
        let cfg = config(&refs, img.cmd);
        let chex = sha(&cfg);
        files.push((format!("blobs/sha256/{chex}"), cfg.clone()));
        let mut ldescs = Vec::new();
        let mut lnames = Vec::new();
        for l in &img.layers {
            let blob = gz(l);
            let h = sha(&blob);
            files.push((format!("blobs/sha256/{h}"), blob.clone()));
            ldescs.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{h}"), "size": blob.len()}));
            lnames.push(format!("blobs/sha256/{h}"));
        }
        let m = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{chex}"), "size": cfg.len()},
            "layers": ldescs,
        }))
        .unwrap();
        let mh = sha(&m);
        files.push((format!("blobs/sha256/{mh}"), m.clone()));
        for t in img.tags {
            let full = if t.contains('/') {
                t.to_string()
            } else {
                format!("docker.io/library/{t}")
            };
            index.push(serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{mh}"), "size": m.len(),
                "annotations": {"io.containerd.image.name": full, "org.opencontainers.image.ref.name": "latest"}}));
        }
        manifest.push(serde_json::json!({"Config": format!("blobs/sha256/{chex}"), "RepoTags": img.tags, "Layers": lnames}));
    }
    files.push((
        "index.json".into(),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": index})).unwrap(),
    ));
    if with_manifest_json {
        files.push((
            "manifest.json".into(),
            serde_json::to_vec(&manifest).unwrap(),
        ));
    }
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    tar_of(&refs)
}

fn debugfs(disk: &Path, cmd: &str) -> String {
    let o = Command::new("debugfs")
        .arg("-R")
        .arg(cmd)
        .arg(disk)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn no_users(_: &str) -> Vec<(String, bool)> {
    Vec::new()
}

fn assert_empty(root: &Path) {
    for d in ["blobs/sha256", "layers/sha256", "disks", "images", "tmp"] {
        let n = std::fs::read_dir(root.join(d)).unwrap().count();
        assert_eq!(n, 0, "{d} not empty");
    }
}

fn check_loaded(store: &ImageStore, lines: &[String]) {
    assert!(
        lines.contains(&"Loaded image: busybox:latest".to_string()),
        "{lines:?}"
    );
    assert!(lines.contains(&"Loaded image: localhost:5000/a/b:t".to_string()));
    assert!(lines.contains(&"Loaded image: hello:latest".to_string()));
    let bb = store.resolve("busybox").unwrap();
    assert_eq!(bb.repo_tags, vec!["busybox:latest", "localhost:5000/a/b:t"]);
    assert_eq!(bb.config.cmd, Some(vec!["sh".to_string()]));
    assert_eq!(bb.layers.len(), 2);
    assert_eq!(
        store
            .resolve("docker.io/library/busybox:latest")
            .unwrap()
            .id,
        bb.id
    );
    assert_eq!(store.resolve(&bb.id).unwrap().id, bb.id);
    assert_eq!(store.resolve(&bb.id[7..]).unwrap().id, bb.id);
    assert_eq!(store.resolve(&bb.id[7..19]).unwrap().id, bb.id);
    assert!(matches!(store.resolve("nope"), Err(Error::NotFound(_))));
    assert_eq!(store.list().len(), 2);
    let disk = store.boot_disk("busybox").unwrap();
    assert_eq!(debugfs(&disk, "cat /app"), "app!");
    assert_eq!(debugfs(&disk, "cat /bin/sh"), "shell");
    let ls = debugfs(&disk, "ls -l /etc");
    assert!(!ls.contains("hostname"), "{ls}");
}

#[test]
fn load_classic() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    let lines = store
        .load(&classic_archive(&two_images(), |_| {})[..])
        .unwrap();
    check_loaded(&store, &lines);
    // reopen keeps everything
    let store = ImageStore::open(dir.path()).unwrap();
    assert_eq!(store.list().len(), 2);
}

#[test]
fn load_oci_docker25_and_oci_only() {
    for with_manifest in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let lines = store
            .load(&oci_archive(&two_images(), with_manifest)[..])
            .unwrap();
        check_loaded(&store, &lines);
    }
}

#[test]
fn corrupt_archives_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    let cases: Vec<Vec<u8>> = vec![
        b"this is not a tar at all, just some words".repeat(20),
        tar_of(&[("hello", b"x")]),
        tar_of(&[("manifest.json", b"{not json")]),
        classic_archive(&two_images(), |f| {
            let i = f
                .iter()
                .position(|(n, _)| n.ends_with("layer.tar"))
                .unwrap();
            f.remove(i);
        }),
        classic_archive(&two_images(), |f| {
            for (n, d) in f.iter_mut() {
                if n.ends_with("layer.tar") && d[0] != 0x1f {
                    *d = tar_of(&[("tampered", b"!")]);
                }
            }
        }),
        classic_archive(&two_images(), |f| {
            for (n, d) in f.iter_mut() {
                if n.ends_with(".json") && n != "manifest.json" {
                    d.push(b' ');
                }
            }
        }),
        tar_of(&[("../evil", b"x")]),
    ];
    for (i, c) in cases.iter().enumerate() {
        let r = store.load(&c[..]);
        assert!(
            matches!(r, Err(Error::InvalidArchive(_))),
            "case {i}: {r:?}"
        );
        assert!(store.list().is_empty());
        assert_empty(dir.path());
    }
    assert!(!dir.path().parent().unwrap().join("evil").exists());
}

#[test]
fn import_with_changes() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    let rootfs = gz(&tar_of(&[("bin/", b""), ("bin/app", b"#!app")]));
    let changes: Vec<String> = [
        "CMD [\"/bin/app\"]",
        "ENV A=1 B=2",
        "ENTRYPOINT /bin/sh",
        "CMD x y",
        "WORKDIR /srv",
        "USER nobody",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let id = store
        .import(&rootfs[..], Some("myimg:v1"), &changes, "")
        .unwrap();
    let img = store.resolve("myimg:v1").unwrap();
    assert_eq!(img.id, id);
    assert_eq!(
        img.config.cmd,
        Some(vec!["/bin/sh".into(), "-c".into(), "x y".into()])
    );
    assert_eq!(
        img.config.entrypoint,
        Some(vec!["/bin/sh".into(), "-c".into(), "/bin/sh".into()])
    );
    assert_eq!(img.config.env, vec!["A=1", "B=2"]);
    assert_eq!(img.config.working_dir, "/srv");
    assert_eq!(img.config.user, "nobody");
    assert_eq!(img.raw_config["history"][0]["comment"], "Imported from -");
    let disk = store.boot_disk(&id).unwrap();
    assert_eq!(debugfs(&disk, "cat /bin/app"), "#!app");
    let e = store
        .import(&rootfs[..], None, &["FOO bar".to_string()], "")
        .unwrap_err();
    assert!(matches!(e, Error::InvalidChange(_)), "{e}");
    assert!(matches!(
        store.import(&rootfs[..], Some("Bad"), &[], ""),
        Err(Error::InvalidReference(_))
    ));
}

#[test]
fn remove_semantics() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    store
        .load(&classic_archive(&two_images(), |_| {})[..])
        .unwrap();
    let bb = store.resolve("busybox").unwrap();
    let sid = &bb.id[7..19];
    let cid = "c".repeat(64);
    let stopped = |_: &str| vec![(cid.clone(), false)];
    let running = |_: &str| vec![(cid.clone(), true)];

    // by id with two tags
    let e = store
        .remove(&bb.id, false, &no_users)
        .unwrap_err()
        .to_string();
    assert_eq!(e, format!("conflict: unable to delete {sid} (must be forced) - image is referenced in multiple repositories"));
    let e = store.remove(sid, true, &running).unwrap_err().to_string();
    assert_eq!(e, format!("conflict: unable to delete {sid} (cannot be forced) - image is being used by running container cccccccccccc"));
    // by ref with other tags: untag only
    assert_eq!(
        store
            .remove("localhost:5000/a/b:t", false, &running)
            .unwrap(),
        vec![DeleteItem::Untagged("localhost:5000/a/b:t".into())]
    );
    // last ref with a stopped user, not forced
    let e = store
        .remove("busybox", false, &stopped)
        .unwrap_err()
        .to_string();
    assert_eq!(e, format!("conflict: unable to remove repository reference \"busybox\" (must force) - container cccccccccccc is using its referenced image {sid}"));
    let e = store.remove(sid, false, &stopped).unwrap_err().to_string();
    assert_eq!(e, format!("conflict: unable to delete {sid} (must be forced) - image is being used by stopped container cccccccccccc"));
    // forced, stopped users: untag, keep
    assert_eq!(
        store.remove("busybox", true, &stopped).unwrap(),
        vec![DeleteItem::Untagged("busybox:latest".into())]
    );
    assert!(store.resolve(&bb.id).unwrap().repo_tags.is_empty());
    assert!(store.boot_disk(&bb.id).is_ok());
    // by id, no users: delete
    assert_eq!(
        store.remove(sid, false, &no_users).unwrap(),
        vec![DeleteItem::Deleted(bb.id.clone())]
    );
    assert!(matches!(store.resolve(&bb.id), Err(Error::NotFound(_))));
    // tag + remove by ref deletes when last
    store.tag("hello", "again:1").unwrap();
    let h = store.resolve("hello").unwrap();
    assert_eq!(
        store.remove("again:1", false, &no_users).unwrap(),
        vec![DeleteItem::Untagged("again:1".into())]
    );
    assert_eq!(
        store.remove("hello", false, &no_users).unwrap(),
        vec![
            DeleteItem::Untagged("hello:latest".into()),
            DeleteItem::Deleted(h.id)
        ]
    );
    assert!(store.list().is_empty());
    assert_empty(dir.path());
}

fn fresh() -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    std::fs::create_dir(&root).unwrap();
    (d, root)
}

#[test]
fn extraction_rejects_escapes() {
    for bad in [
        &[("../evil", &b"x"[..])][..],
        &[("/etc/evil-vessel-test", b"x")],
        &[("a/../../evil", b"x")],
    ] {
        let (d, root) = fresh();
        assert!(
            extract_layer(&tar_of(bad)[..], &root).is_err(),
            "{:?}",
            bad[0].0
        );
        assert!(!d.path().join("evil").exists());
        assert!(!Path::new("/etc/evil-vessel-test").exists());
    }
    // symlink out of the root, then write through it
    for target in ["/", "../../..", "../"] {
        let (d, root) = fresh();
        let link = format!("a->{target}");
        let t = tar_of(&[(&link, b""), ("a/pwned", b"x"), ("a/sub/pwned2", b"y")]);
        extract_layer(&t[..], &root).unwrap();
        assert!(!d.path().join("pwned").exists());
        assert!(!Path::new("/pwned").exists());
        assert!(root.join("pwned").exists(), "resolved inside the root");
    }
    // final component symlink is replaced, not written through
    let (d, root) = fresh();
    let outside = d.path().join("outside");
    std::fs::write(&outside, "orig").unwrap();
    let link = format!("f->{}", outside.display());
    extract_layer(&tar_of(&[(&link, b""), ("f", b"new")])[..], &root).unwrap();
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "orig");
    assert_eq!(std::fs::read_to_string(root.join("f")).unwrap(), "new");
    // hardlinks
    let (_d, root) = fresh();
    assert!(extract_layer(&tar_of(&[("h=>../../etc/passwd", b"")])[..], &root).is_err());
    assert!(extract_layer(&tar_of(&[("h=>/etc/passwd", b"")])[..], &root).is_err());
    extract_layer(&tar_of(&[("x", b"data"), ("h=>x", b"")])[..], &root).unwrap();
    assert_eq!(std::fs::read_to_string(root.join("h")).unwrap(), "data");
}

#[test]
fn load_never_reads_host_files_through_the_archives_symlinks() {
    let d = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&d.path().join("store")).unwrap();
    let host = d.path().join("host-secret.json");
    std::fs::write(&host, "not json, and not the archive's").unwrap();
    for name in ["manifest.json", "index.json"] {
        let link = format!("{name}->{}", host.display());
        let err = store.load(&tar_of(&[(&link, b"")])[..]).unwrap_err();
        assert!(
            err.to_string().contains("no manifest.json or index.json"),
            "{name}: {err}"
        );
    }
}

/// A GNU number field in base-256 (big enough for any size).
fn base256(field: &mut [u8; 12], value: u64) {
    *field = [0; 12];
    field[0] = 0x80;
    field[4..].copy_from_slice(&value.to_be_bytes());
}

/// A tar of one GNU sparse file `name` of `size` bytes whose only data is
/// its last 512 bytes (all `b'x'`); everything before is a hole.
fn sparse_tar(name: &[u8], size: u64) -> Vec<u8> {
    let mut h = hdr(name, tar::EntryType::GNUSparse, 512, 0o644);
    let gnu = h.as_gnu_mut().expect("GNU header");
    base256(&mut gnu.realsize, size);
    base256(&mut gnu.sparse[0].offset, size - 512);
    base256(&mut gnu.sparse[0].numbytes, 512);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(&[b'x'; 512]);
    out.extend_from_slice(&[0; 1024]);
    out
}

#[test]
fn sparse_files_stay_sparse_and_huge_ones_are_refused() {
    use std::os::unix::fs::MetadataExt;
    // 64 MiB claimed, 512 bytes held: extracted with its hole.
    let (_d, root) = fresh();
    extract_layer(&sparse_tar(b"holes", 64 << 20)[..], &root).unwrap();
    let m = std::fs::metadata(root.join("holes")).unwrap();
    assert_eq!(m.len(), 64 << 20);
    assert!(
        m.blocks() * 512 < 1 << 20,
        "written sparse: {} blocks",
        m.blocks()
    );
    let data = std::fs::read(root.join("holes")).unwrap();
    assert!(data[..(64 << 20) - 512].iter().all(|b| *b == 0));
    assert!(data[(64 << 20) - 512..].iter().all(|b| *b == b'x'));

    // A terabyte in a few bytes of tar is refused at once, nothing written.
    let (_d, root) = fresh();
    let err = extract_layer(&sparse_tar(b"huge", 1 << 40)[..], &root).unwrap_err();
    assert!(err.to_string().contains("sparse file huge"), "{err}");
    assert!(!root.join("huge").exists());
}

#[test]
fn whiteouts() {
    let (_d, root) = fresh();
    let l1 = tar_of(&[
        ("d/", b""),
        ("d/a", b"1"),
        ("d/sub/", b""),
        ("d/sub/s", b"s"),
        ("e/", b""),
        ("e/gone", b"g"),
        ("e/keep", b"k"),
    ]);
    let l2 = tar_of(&[
        ("d/new", b"n"),
        ("d/.wh..wh..opq", b""),
        ("d/sub/t", b"t"),
        ("e/.wh.gone", b""),
    ]);
    extract_layer(&l1[..], &root).unwrap();
    extract_layer(&l2[..], &root).unwrap();
    assert!(!root.join("d/a").exists());
    assert!(!root.join("d/sub/s").exists());
    assert!(root.join("d/sub/t").exists());
    assert!(root.join("d/new").exists());
    assert!(!root.join("e/gone").exists());
    assert!(root.join("e/keep").exists());
    assert!(!root.join("d/.wh..wh..opq").exists());
}

#[test]
fn boot_disk_preserves_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = hdr(b"bin/su", tar::EntryType::Regular, 2, 0o4755);
    h.set_uid(0);
    h.set_cksum();
    b.append(&h, &b"su"[..]).unwrap();
    let mut h = hdr(b"home/user/f", tar::EntryType::Regular, 1, 0o600);
    h.set_uid(1000);
    h.set_gid(1000);
    h.set_cksum();
    b.append(&h, &b"f"[..]).unwrap();
    let mut h = hdr(b"dev/null", tar::EntryType::Char, 0, 0o666);
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
    let mut h = hdr(b"link", tar::EntryType::Symlink, 0, 0o777);
    h.set_link_name("/bin/su").unwrap();
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
    let id = store
        .import(&b.into_inner().unwrap()[..], None, &[], "msg")
        .unwrap();
    let disk = store.boot_disk(&id).unwrap();
    let st = debugfs(&disk, "stat /bin/su");
    assert!(st.contains("Mode:  04755"), "{st}");
    let st = debugfs(&disk, "stat /home/user/f");
    assert!(
        st.contains("User:  1000") && st.contains("Group:  1000"),
        "{st}"
    );
    assert!(debugfs(&disk, "stat /link").contains("Fast link dest: \"/bin/su\""));
    assert!(!debugfs(&disk, "ls /dev").contains("null"));
}
