//! Images and registries with the real docker CLI: push, pull (by tag, by
//! digest, through a mirror), login, save/load between daemons, history,
//! prune and system df; a registry over TLS with a CA of the test's own;
//! a daemon killed in the middle of a pull. The registry is Debian's
//! `docker-registry` on loopback.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{stderr, stdout, Daemon, ImageSpec};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// A registry on a free loopback port; with `basic`, htpasswd auth.
    fn start(basic: Option<(&str, &str)>) -> Registry {
        Registry::start_with(basic, None)
    }

    /// With `tls` (certificate and key, PEM), HTTPS only.
    fn start_with(basic: Option<(&str, &str)>, tls: Option<(&str, &str)>) -> Registry {
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
        // Under `http:`, so before `auth:`.
        if let Some((cert, key)) = tls {
            let (cp, kp) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            std::fs::write(&cp, cert).expect("certificate");
            std::fs::write(&kp, key).expect("key");
            cfg.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cp.display(),
                kp.display()
            ));
        }
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

/// A CA of the test's own and a certificate it signed for 127.0.0.1 and
/// localhost: (CA, certificate, key), PEM.
fn test_ca() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(DnType::CommonName, "vessel test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("CA");
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .expect("params");
    p.distinguished_name.push(DnType::CommonName, "127.0.0.1");
    let cert = p.signed_by(&key, &ca_cert, &ca_key).expect("certificate");
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

#[test]
fn tls_registry_trusted_through_the_certs_dir() {
    let (ca, cert, key) = test_ca();
    let reg = Registry::start_with(Some(("alice", "s3cret")), Some((&cert, &key)));
    let host = reg.host();
    // dockerd's /etc/docker/certs.d/<host:port>/ca.crt, here a directory of
    // the test's own.
    let certs = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(certs.path().join(&host)).expect("certs.d entry");
    std::fs::write(certs.path().join(&host).join("ca.crt"), &ca).expect("ca.crt");
    let certs_dir = certs.path().to_str().expect("utf-8");
    // Loopback registries are insecure by default, as in dockerd; these
    // daemons verify them like any other.
    let strict = [
        "--warm-vms",
        "0",
        "--insecure-loopback-registries=false",
        "--registry-certs-dir",
    ];
    let d = Daemon::start_with(&[&strict[..], &[certs_dir]].concat());
    d.load_busybox(&["busybox:latest"]);
    let name = format!("{host}/secure/bb:1");
    d.ok(&["tag", "busybox", &name]);
    let out = d.docker_in(
        &["login", "-u", "alice", "--password-stdin", &host],
        b"s3cret\n",
    );
    assert!(stdout(&out).contains("Login Succeeded"), "{}", stderr(&out));
    let out = d.ok(&["push", &name]);
    assert!(out.contains("Pushed"), "{out}");
    d.ok(&["rmi", "busybox", &name]);
    assert_eq!(d.ok(&["images", "-q"]), "");
    let out = d.ok(&["pull", &name]);
    assert!(out.contains("Pull complete"), "{out}");
    assert_eq!(
        d.ok(&["run", "--rm", &name, "echo", "over tls"]),
        "over tls\n"
    );

    // A daemon without the CA: the certificate does not verify, and
    // nothing is stored.
    let empty = tempfile::tempdir().expect("tempdir");
    let other =
        Daemon::start_with(&[&strict[..], &[empty.path().to_str().expect("utf-8")]].concat());
    let out = other.docker_in(
        &["login", "-u", "alice", "--password-stdin", &host],
        b"s3cret\n",
    );
    assert!(!out.status.success(), "{}", stdout(&out));
    let x509 = "tls: failed to verify certificate: x509: certificate signed by unknown authority";
    assert!(stderr(&out).contains(x509), "{}", stderr(&out));
    let out = other.docker(&["pull", &name]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stderr(&out).contains(&format!("Get \"https://{host}/v2/\": {x509}")),
        "{}",
        stderr(&out)
    );
    assert_eq!(other.ok(&["images", "-a", "-q"]), "");
    let left = other.image_store_files();
    assert!(left.is_empty(), "store not empty: {left:?}");

    // By default loopback is insecure, as in dockerd: no verification.
    let lax = Daemon::start_with(&[
        "--warm-vms",
        "0",
        "--registry-certs-dir",
        empty.path().to_str().expect("utf-8"),
    ]);
    let out = lax.docker_in(
        &["login", "-u", "alice", "--password-stdin", &host],
        b"s3cret\n",
    );
    assert!(stdout(&out).contains("Login Succeeded"), "{}", stderr(&out));
    assert!(lax.ok(&["pull", &name]).contains("Pull complete"));
}

/// A loopback TCP proxy in front of `upstream` whose answers are slowed to
/// `rate` bytes a second (0: as fast as they come), counting what it
/// forwarded to its clients.
struct SlowProxy {
    port: u16,
    rate: Arc<AtomicU64>,
    forwarded: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl SlowProxy {
    fn start(upstream: u16, rate: u64) -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("local addr").port();
        let rate = Arc::new(AtomicU64::new(rate));
        let forwarded = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, f, st) = (rate.clone(), forwarded.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (r, f) = (r.clone(), f.clone());
                if let (Ok(mut c_in), Ok(mut s_out)) = (client.try_clone(), server.try_clone()) {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut c_in, &mut s_out);
                        let _ = s_out.shutdown(std::net::Shutdown::Write);
                    });
                }
                std::thread::spawn(move || slow_copy(server, client, &r, &f));
            }
        });
        SlowProxy {
            port,
            rate,
            forwarded,
            stop,
        }
    }
}

fn slow_copy(mut from: TcpStream, mut to: TcpStream, rate: &AtomicU64, forwarded: &AtomicU64) {
    let mut buf = [0u8; 8192];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        forwarded.fetch_add(n as u64, Ordering::SeqCst);
        let r = rate.load(Ordering::SeqCst);
        if r > 0 {
            std::thread::sleep(Duration::from_secs_f64(n as f64 / r as f64));
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// `n` bytes of text that do not compress much (hex of a hash chain).
fn incompressible(n: usize) -> String {
    use sha2::Digest;
    let mut out = String::with_capacity(n + 64);
    let mut h = sha2::Sha256::digest(b"vessel");
    while out.len() < n {
        out.push_str(&hex::encode(h));
        h = sha2::Sha256::digest(h);
    }
    out.truncate(n);
    out
}

#[test]
fn daemon_killed_in_the_middle_of_a_pull() {
    let reg = Registry::start(None);
    let blob = incompressible(3 << 20);
    let blob_sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(blob.as_bytes()))
    };
    let mut d = Daemon::start_with(&["--warm-vms", "0"]);
    let direct = format!("{}/crash/big:1", reg.host());
    let archive = common::write(
        d.dir.path(),
        "big.tar",
        &common::docker_save(&[ImageSpec {
            tags: &[&direct],
            cmd: &["sh"],
            files: &[("/data/blob", &blob)],
            ..Default::default()
        }]),
    );
    d.ok(&["load", "-i", archive.to_str().expect("utf-8")]);
    d.ok(&["push", &direct]);
    d.ok(&["rmi", &direct]);
    assert_eq!(d.ok(&["images", "-a", "-q"]), "");

    // The same registry behind a proxy that lets ~128 kB/s through: the
    // ~2.5 MB layer takes a while.
    let proxy = SlowProxy::start(reg.port, 128 * 1024);
    let name = format!("127.0.0.1:{}/crash/big:1", proxy.port);
    let pull = d
        .docker_cmd(&["pull", &name])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("docker pull");
    let deadline = Instant::now() + Duration::from_secs(120);
    while proxy.forwarded.load(Ordering::SeqCst) < 600 * 1024 {
        assert!(
            Instant::now() < deadline,
            "the pull did not start: {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Mid-way: a partial layer is being written in the store's staging area.
    let staged = d.data_root().join("image").join("tmp");
    assert!(
        std::fs::read_dir(&staged).map(|r| r.count()).unwrap_or(0) > 0,
        "nothing staged"
    );
    d.kill9();
    let out = pull.wait_with_output().expect("docker pull");
    assert!(!out.status.success(), "{}", stdout(&out));
    let sent = proxy.forwarded.load(Ordering::SeqCst);

    // Restarted on the same data root: no image, half or whole, and the
    // staging area is empty.
    d.restart();
    assert_eq!(d.ok(&["images", "-a", "-q"]), "");
    let out = d.docker(&["image", "inspect", &name]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("No such image"), "{}", stderr(&out));
    let left = d.image_store_files();
    assert!(left.is_empty(), "store not empty: {left:?}");

    // Pulled again at full speed, the image is whole and runs.
    proxy.rate.store(0, Ordering::SeqCst);
    let out = d.ok(&["pull", &name]);
    assert!(out.contains("Pull complete"), "{out}");
    assert!(
        out.contains(&format!("Downloaded newer image for {name}")),
        "{out}"
    );
    let whole = proxy.forwarded.load(Ordering::SeqCst) - sent;
    assert!(
        sent < whole / 2,
        "the first pull was not cut short: {sent} of {whole} bytes"
    );
    assert_eq!(
        d.ok(&["run", "--rm", &name, "sha256sum", "/data/blob"]),
        format!("{blob_sha}  /data/blob\n")
    );
}
