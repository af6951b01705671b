//! Shared test helpers: a real `docker-registry` process, image building,
//! progress capture.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use vessel_image::ImageStore;
use vessel_registry::Progress;

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

pub fn sha(d: &[u8]) -> String {
    hex::encode(Sha256::digest(d))
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// How the test registry is set up.
#[derive(Default)]
pub struct RegistryOpts {
    /// htpasswd user and password.
    pub basic: Option<(String, String)>,
    /// (certificate PEM, key PEM) for TLS.
    pub tls: Option<(String, String)>,
}

/// A `docker-registry` process on loopback, killed on drop.
pub struct RegistryProc {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl RegistryProc {
    pub fn start(opts: RegistryOpts) -> RegistryProc {
        assert!(
            Path::new(REGISTRY_BIN).is_file(),
            "{REGISTRY_BIN} is missing: run scripts/setup.sh (it installs Debian's docker-registry package)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("data dir");
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            data.display()
        );
        if let Some((cert, key)) = &opts.tls {
            let c = dir.path().join("server.crt");
            let k = dir.path().join("server.key");
            std::fs::write(&c, cert).expect("cert");
            std::fs::write(&k, key).expect("key");
            cfg.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                c.display(),
                k.display()
            ));
        }
        if let Some((user, pass)) = &opts.basic {
            let hash = bcrypt::hash(pass, 4).expect("bcrypt");
            let hp = dir.path().join("htpasswd");
            std::fs::write(&hp, format!("{user}:{hash}\n")).expect("htpasswd");
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: basic-realm\n    path: {}\n",
                hp.display()
            ));
        }
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, cfg).expect("config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let mut rp = RegistryProc { child, port, dir };
        rp.wait_ready();
        rp
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                let log = std::fs::read_to_string(self.dir.path().join("registry.log"))
                    .unwrap_or_default();
                panic!("docker-registry exited with {st}: {log}");
            }
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for RegistryProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A deterministic pseudo-random byte stream (xorshift), incompressible.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A tar of (path, content); paths ending in '/' are directories.
pub fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (p, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_path(p).expect("path");
        h.set_mtime(1_700_000_000);
        if p.ends_with('/') {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            h.set_cksum();
            b.append(&h, &[][..]).expect("append");
        } else {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, *data).expect("append");
        }
    }
    b.into_inner().expect("tar")
}

/// An image config for `layers` (uncompressed tars).
pub fn config_for(layers: &[Vec<u8>], arch: &str, cmd: &str) -> Vec<u8> {
    let diffs: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha(l)))
        .collect();
    let mut history: Vec<serde_json::Value> = layers
        .iter()
        .enumerate()
        .map(|(i, _)| {
            serde_json::json!({"created": "2024-01-01T00:00:00Z", "created_by": format!("layer {i}")})
        })
        .collect();
    history.push(serde_json::json!({"created": "2024-01-01T00:00:01Z", "created_by": "CMD", "empty_layer": true}));
    serde_json::to_vec(&serde_json::json!({
        "architecture": arch, "os": "linux", "created": "2024-01-01T00:00:01Z",
        "config": {"Cmd": [cmd], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diffs},
        "history": history,
    }))
    .expect("config json")
}

/// Load an image made of `layers` into `store` under `tags`; returns its id.
pub fn load_image(store: &ImageStore, layers: &[Vec<u8>], tags: &[&str], cmd: &str) -> String {
    let cfg = config_for(layers, "amd64", cmd);
    let chex = sha(&cfg);
    let mut files: Vec<(String, Vec<u8>)> = vec![(format!("{chex}.json"), cfg)];
    let mut names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let n = format!("l{i}/layer.tar");
        files.push((n.clone(), l.clone()));
        names.push(n);
    }
    let manifest =
        serde_json::json!([{"Config": format!("{chex}.json"), "RepoTags": tags, "Layers": names}]);
    files.push((
        "manifest.json".into(),
        serde_json::to_vec(&manifest).expect("json"),
    ));
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let archive = tar_of(&refs);
    store.load(&archive[..]).expect("load image");
    format!("sha256:{chex}")
}

/// Three layers, the last one larger than one upload chunk when `big`.
pub fn sample_layers(seed: u64, big: bool) -> Vec<Vec<u8>> {
    let big_len = if big { 9 * 1024 * 1024 } else { 300 * 1024 };
    let a = noise(seed, 64 * 1024);
    let b = noise(seed + 1, big_len);
    let text = format!("hello from {seed}\n").repeat(1000);
    vec![
        tar_of(&[
            ("bin/", b""),
            ("bin/sh", b"#!shell"),
            ("etc/", b""),
            ("etc/a", &a),
        ]),
        tar_of(&[("data/", b""), ("data/blob", &b)]),
        tar_of(&[("etc/", b""), ("etc/motd", text.as_bytes())]),
    ]
}

pub fn store() -> (tempfile::TempDir, Arc<ImageStore>) {
    let d = tempfile::tempdir().expect("tempdir");
    let s = ImageStore::open(d.path()).expect("open store");
    (d, Arc::new(s))
}

/// Collects progress events.
#[derive(Clone, Default)]
pub struct Events(pub Arc<Mutex<Vec<Progress>>>);

impl Events {
    pub fn sink(&self) -> impl Fn(Progress) + Send + Sync + 'static {
        let v = self.0.clone();
        move |p| v.lock().unwrap().push(p)
    }
    pub fn take(&self) -> Vec<Progress> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// Number of files under `dir` (recursively).
pub fn count_files(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p: PathBuf = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                n += 1;
            }
        }
    }
    n
}

pub fn write_file(p: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(p).expect("create");
    f.write_all(data).expect("write");
}
