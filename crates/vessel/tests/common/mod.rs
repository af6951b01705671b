//! Test support: a daemon on a temporary socket and data root, the real
//! `docker` CLI pointed at it, a raw HTTP client, and docker-save archives
//! built from Debian's busybox-static.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn guest_dir() -> PathBuf {
    let dir = PathBuf::from(
        std::env::var("VESSEL_GUEST_DIR").unwrap_or_else(|_| "/usr/local/lib/vessel".into()),
    );
    assert!(
        dir.join("vmlinux").exists()
            && dir.join("vessel-init").exists()
            && dir.join("qemu-system-x86_64").exists(),
        "guest kernel, agent or QEMU missing in {}: run scripts/setup.sh",
        dir.display()
    );
    dir
}

/// A daemon of our own. Dropping it kills the daemon and every VM it started.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    child: Option<Child>,
    extra: Vec<String>,
}

impl Daemon {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A daemon with extra command-line flags.
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vt")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let sock = dir.path().join("d.sock");
        let extra = extra.iter().map(|s| s.to_string()).collect();
        let mut d = Daemon {
            dir,
            sock,
            child: None,
            extra,
        };
        d.spawn();
        d
    }

    pub fn data_root(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Sends one QMP command to the VM of container `id` (full id) behind
    /// the daemon's back, as something outside it would, and returns
    /// QEMU's answer line.
    pub fn qmp(&self, id: &str, command: &str) -> String {
        let sock = self.data_root().join("vm").join(&id[..12]).join("qmp.sock");
        let mut s = UnixStream::connect(&sock).expect("connect to the VM's QMP socket");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut lines = std::io::BufReader::new(s.try_clone().expect("clone"));
        let mut line = String::new();
        let mut next = |line: &mut String| {
            line.clear();
            std::io::BufRead::read_line(&mut lines, line).expect("QMP answer");
        };
        next(&mut line); // greeting
        for cmd in ["qmp_capabilities", command] {
            writeln!(s, "{{\"execute\":\"{cmd}\"}}").expect("QMP command");
            // Skip asynchronous events.
            loop {
                next(&mut line);
                if !line.contains("\"event\"") {
                    break;
                }
            }
        }
        line
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .expect("daemon log");
        let child = Command::new(env!("CARGO_BIN_EXE_vessel"))
            .args([
                "daemon",
                "-H",
                &format!("unix://{}", self.sock.display()),
                "--data-root",
            ])
            .arg(self.data_root())
            .arg("--guest-dir")
            .arg(guest_dir())
            .args(&self.extra)
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start vessel daemon");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if UnixStream::connect(&self.sock).is_ok() {
                break;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("daemon exited with {status}: {}", self.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not listen: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// `kill -9` of the daemon (its VMs live on).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Graceful stop (SIGTERM).
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.spawn();
    }

    /// Starts the daemon again on the same data root with other flags.
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.spawn();
    }

    pub fn host(&self) -> String {
        format!("unix://{}", self.sock.display())
    }

    pub fn docker_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("docker");
        c.env("DOCKER_HOST", self.host())
            .env("DOCKER_CONFIG", self.dir.path().join("docker-config"))
            .args(args);
        c
    }

    pub fn docker(&self, args: &[&str]) -> Output {
        self.docker_cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run docker")
    }

    pub fn docker_in(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .docker_cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run docker");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input).expect("write stdin");
        drop(stdin);
        child.wait_with_output().expect("docker output")
    }

    /// Runs docker and returns stdout, failing the test on a non-zero exit.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed ({}): {}\n--- daemon log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Loads a busybox image under `tags`.
    pub fn load_busybox(&self, tags: &[&str]) {
        let archive = self.dir.path().join(format!(
            "bb-{}.tar",
            tags.join("_").replace([':', '/'], "-")
        ));
        std::fs::write(
            &archive,
            docker_save(&[ImageSpec {
                tags,
                cmd: &["sh"],
                ..Default::default()
            }]),
        )
        .expect("write archive");
        let out = self.ok(&["load", "-i", archive.to_str().expect("path")]);
        for t in tags {
            assert!(
                out.contains(&format!("Loaded image: {t}")),
                "load output: {out}"
            );
        }
    }

    /// Every file of the daemon's image store but its tables of tags and of
    /// registry blobs (which an empty store may have): what a failed import
    /// or pull must not leave.
    pub fn image_store_files(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else if !p.ends_with("repositories.json") && !p.ends_with("distribution.json") {
                    out.push(p);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.data_root().join("image"), &mut out);
        out
    }

    /// One HTTP/1.1 request over the socket; returns status, headers (lower-case names) and body.
    pub fn http(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, Vec<(String, String)>, String) {
        let mut s = UnixStream::connect(&self.sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: docker\r\nUser-Agent: vessel-tests\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).expect("send");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("read");
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .expect("status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        let body = if chunked {
            dechunk(rest)
        } else {
            rest.to_string()
        };
        (status, headers, body)
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        // Every VM of this daemon names files under its data root.
        let _ = Command::new("pkill")
            .arg("-9")
            .arg("-f")
            .arg(self.data_root())
            .status();
        std::thread::sleep(Duration::from_millis(200));
        // Share mounts of VMs that were killed with the daemon: detach them,
        // so that removing the temporary directory never walks into a
        // bind-mounted host directory.
        let root = self.data_root();
        let mut points: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
            .filter(|m| m.starts_with(&root))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in points {
            if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) {
                // SAFETY: a valid NUL-terminated path and a valid flag.
                unsafe {
                    libc::umount2(c.as_ptr(), libc::MNT_DETACH);
                }
            }
        }
        self.remove_host_networking();
    }
}

impl Daemon {
    /// The default bridge's name, as the daemon derives it from its data
    /// root.
    pub fn bridge_name(&self) -> String {
        vessel_network::default_bridge_name(&self.data_root())
    }

    /// Deletes what the daemon made on the host that outlives it by design
    /// (networks persist across daemon restarts, taps their VMs): its
    /// bridges and taps, found by their alias, and its nftables table.
    fn remove_host_networking(&self) {
        let owners = [
            format!("vessel:{}", self.bridge_name()),
            format!("vessel-tap:{}", self.bridge_name()),
        ];
        let out = Command::new("ip").args(["-j", "link", "show"]).output();
        if let Ok(out) = out {
            let links: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            for l in links.as_array().into_iter().flatten() {
                if owners
                    .iter()
                    .any(|o| l["ifalias"].as_str() == Some(o.as_str()))
                {
                    if let Some(name) = l["ifname"].as_str() {
                        let _ = Command::new("ip").args(["link", "del", name]).status();
                    }
                }
            }
        }
        let table = format!("vessel_{}", self.bridge_name());
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &table])
            .stderr(Stdio::null())
            .status();
    }
}

/// What goes into one test image.
#[derive(Default, Clone)]
pub struct ImageSpec<'a> {
    pub tags: &'a [&'a str],
    pub cmd: &'a [&'a str],
    pub entrypoint: &'a [&'a str],
    pub env: &'a [&'a str],
    pub workdir: &'a str,
    pub user: &'a str,
    /// Extra files (path, content).
    pub files: &'a [(&'a str, &'a str)],
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

fn append(
    tar: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    data: &[u8],
    link: Option<&str>,
) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(data.len() as u64);
    if let Some(l) = link {
        h.set_link_name(l).expect("link");
    }
    h.set_path(path).expect("path");
    h.set_cksum();
    tar.append(&h, data).expect("append");
}

/// A root filesystem tar: busybox with its applets, /etc/passwd and group.
pub fn busybox_rootfs(files: &[(&str, &str)]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for d in [
        "bin",
        "etc",
        "root",
        "home",
        "home/user",
        "tmp",
        "usr",
        "usr/bin",
        "proc",
        "sys",
        "dev",
    ] {
        append(
            &mut tar,
            d,
            tar::EntryType::Directory,
            if d == "tmp" { 0o1777 } else { 0o755 },
            b"",
            None,
        );
    }
    let bb = std::fs::read("/bin/busybox").expect("/bin/busybox (Debian busybox-static)");
    append(
        &mut tar,
        "bin/busybox",
        tar::EntryType::Regular,
        0o755,
        &bb,
        None,
    );
    let list = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    for a in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if a != "busybox" {
            append(
                &mut tar,
                &format!("bin/{a}"),
                tar::EntryType::Symlink,
                0o777,
                b"",
                Some("busybox"),
            );
        }
    }
    append(
        &mut tar,
        "etc/passwd",
        tar::EntryType::Regular,
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        None,
    );
    append(
        &mut tar,
        "etc/group",
        tar::EntryType::Regular,
        0o644,
        b"root:x:0:\nusers:x:100:user\nuser:x:1000:\n",
        None,
    );
    for (p, c) in files {
        append(
            &mut tar,
            p.trim_start_matches('/'),
            tar::EntryType::Regular,
            0o644,
            c.as_bytes(),
            None,
        );
    }
    tar.into_inner().expect("tar")
}

/// A classic `docker save` archive holding `images`.
pub fn docker_save(images: &[ImageSpec<'_>]) -> Vec<u8> {
    let mut out = tar::Builder::new(Vec::new());
    let mut manifest = vec![];
    let mut written = std::collections::HashSet::new();
    for spec in images {
        let layer = busybox_rootfs(spec.files);
        let diff = sha256_hex(&layer);
        let mut cfg = serde_json::json!({
            "Env": if spec.env.is_empty() { vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] } else { spec.env.to_vec() },
        });
        if !spec.cmd.is_empty() {
            cfg["Cmd"] = serde_json::json!(spec.cmd);
        }
        if !spec.entrypoint.is_empty() {
            cfg["Entrypoint"] = serde_json::json!(spec.entrypoint);
        }
        if !spec.workdir.is_empty() {
            cfg["WorkingDir"] = serde_json::json!(spec.workdir);
        }
        if !spec.user.is_empty() {
            cfg["User"] = serde_json::json!(spec.user);
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux", "created": "2026-01-01T00:00:00Z",
            "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff}")]},
        }))
        .expect("config");
        let cfg_hex = sha256_hex(&config);
        let mut add = |name: String, data: &[u8]| {
            if written.insert(name.clone()) {
                append(&mut out, &name, tar::EntryType::Regular, 0o644, data, None);
            }
        };
        add(format!("{cfg_hex}.json"), &config);
        add(format!("{diff}/layer.tar"), &layer);
        manifest.push(serde_json::json!({
            "Config": format!("{cfg_hex}.json"), "RepoTags": spec.tags, "Layers": [format!("{diff}/layer.tar")],
        }));
    }
    let m = serde_json::to_vec(&manifest).expect("manifest");
    append(
        &mut out,
        "manifest.json",
        tar::EntryType::Regular,
        0o644,
        &m,
        None,
    );
    out.into_inner().expect("archive")
}

/// Now, in unix seconds (for `docker events --since/--until`).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Polls `f` until it returns true or `secs` pass.
pub fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).expect("write file");
    p
}
