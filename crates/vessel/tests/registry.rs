//! Images and registries with the real docker CLI: push, pull (by tag, by
//! digest, through a mirror), login, save/load between daemons, history,
//! prune and system df. The registry is Debian's `docker-registry` on
//! loopback.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{stderr, stdout, Daemon};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// A registry on a free loopback port; with `basic`, htpasswd auth.
    fn start(basic: Option<(&str, &str)>) -> Registry {
        assert!(
            std::path::Path::new(REGISTRY_BIN).is_file(),
            "{REGISTRY_BIN} is missing: run scripts/setup.sh"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((user, pass)) = basic {
            let hash = bcrypt::hash(pass, 4).expect("bcrypt");
            let hp = dir.path().join("htpasswd");
            std::fs::write(&hp, format!("{user}:{hash}\n")).expect("htpasswd");
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: vessel-test\n    path: {}\n",
                hp.display()
            ));
        }
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, cfg).expect("config");
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&cfg_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            child,
            port,
            _dir: dir,
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn push_pull_mirror_save_and_maintenance() {
    let reg = Registry::start(None);
    let host = reg.host();
    let mirror = format!("http://{host}");
    let d = Daemon::start_with(&["--registry-mirror", &mirror, "--warm-vms", "0"]);
    d.load_busybox(&["busybox:latest"]);
    let team = format!("{host}/team/bb:1");
    d.ok(&["tag", "busybox", &team]);
    let out = d.ok(&["push", &team]);
    assert!(out.contains("Pushed"), "{out}");
    assert!(out.contains("1: digest: sha256:"), "{out}");
    let digest = out
        .split("digest: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("digest")
        .to_string();
    // Again: nothing to upload.
    assert!(d.ok(&["push", &team]).contains("Layer already exists"));
    // The same image under docker.io's name, for the mirror.
    let lib = format!("{host}/library/busybox:latest");
    d.ok(&["tag", "busybox", &lib]);
    d.ok(&["push", &lib]);

    // An empty store pulls by tag, by digest and through the mirror.
    d.ok(&["rmi", "busybox", &team, &lib]);
    assert_eq!(d.ok(&["images", "-q"]), "");
    let out = d.ok(&["pull", &team]);
    assert!(out.contains("Pull complete"), "{out}");
    assert!(out.contains(&format!("Digest: {digest}")), "{out}");
    assert!(d.ok(&["images", "--digests"]).contains(&digest));
    let again = d.ok(&["pull", &team]);
    assert!(again.contains("Image is up to date"), "{again}");
    let by_digest = format!("{host}/team/bb@{digest}");
    d.ok(&["pull", &by_digest]);
    let out = d.ok(&["pull", "busybox"]);
    assert!(
        out.contains("Downloaded newer image for busybox:latest"),
        "{out}"
    );
    assert_eq!(
        d.ok(&["run", "--rm", "busybox", "echo", "pulled"]),
        "pulled\n"
    );
    let inspect = d.ok(&["image", "inspect", "-f", "{{json .RepoDigests}}", "busybox"]);
    assert!(inspect.contains(&digest), "{inspect}");

    // Docker's errors.
    let out = d.docker(&["pull", &format!("{host}/nosuch")]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("manifest for") && stderr(&out).contains("not found"),
        "{}",
        stderr(&out)
    );
    let out = d.docker(&["push", &format!("{host}/absent:1")]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("An image does not exist locally with the tag"),
        "{}",
        stderr(&out)
    );

    // history, save → load into another daemon, prune, system df.
    let hist = d.ok(&["history", "--no-trunc", "busybox"]);
    assert!(hist.contains("IMAGE"), "{hist}");
    let other = Daemon::start_with(&["--warm-vms", "0"]);
    let archive = tempfile::NamedTempFile::new().expect("tmp");
    let path = archive.path().to_str().expect("utf-8");
    d.ok(&["save", "-o", path, "busybox", &team]);
    let loaded = other.ok(&["load", "-i", path]);
    assert!(loaded.contains("busybox:latest"), "{loaded}");
    assert!(loaded.contains(&team), "{loaded}");
    assert_eq!(
        other.ok(&["run", "--rm", "busybox", "echo", "loaded"]),
        "loaded\n"
    );
    let df = d.ok(&["system", "df"]);
    assert!(df.contains("Images"), "{df}");
    d.ok(&["rmi", &team]);
    let pruned = d.ok(&["image", "prune", "-a", "-f"]);
    assert!(pruned.contains("deleted: sha256:"), "{pruned}");
    assert_eq!(d.ok(&["images", "-q"]), "");
}

#[test]
fn login_then_push_and_pull_with_credentials() {
    let reg = Registry::start(Some(("alice", "s3cret")));
    let host = reg.host();
    let d = Daemon::start_with(&["--warm-vms", "0"]);
    d.load_busybox(&["busybox:latest"]);
    let name = format!("{host}/private/bb:1");
    d.ok(&["tag", "busybox", &name]);
    // Without credentials the registry says no.
    let out = d.docker(&["push", &name]);
    assert!(!out.status.success(), "{}", stdout(&out));
    // A wrong password is refused by `docker login` (POST /auth).
    let out = d.docker_in(
        &["login", "-u", "alice", "--password-stdin", &host],
        b"wrong\n",
    );
    assert!(!out.status.success(), "{}", stdout(&out));
    let out = d.docker_in(
        &["login", "-u", "alice", "--password-stdin", &host],
        b"s3cret\n",
    );
    assert!(stdout(&out).contains("Login Succeeded"), "{}", stderr(&out));
    assert!(d.ok(&["push", &name]).contains("Pushed"));
    d.ok(&["rmi", "busybox", &name]);
    assert!(d.ok(&["pull", &name]).contains("Pull complete"));
}
