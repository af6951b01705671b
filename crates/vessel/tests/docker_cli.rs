//! End-to-end tests: a real daemon, real VMs, the real `docker` CLI and the
//! bollard client.

mod common;

use common::{docker_save, eventually, stderr, stdout, write, Daemon, ImageSpec};

#[test]
fn version_negotiation_ping_and_info() {
    let d = Daemon::start();
    let v = d.ok(&[
        "version",
        "--format",
        "{{.Server.Platform.Name}} {{.Server.APIVersion}}",
    ]);
    assert!(v.starts_with("Vessel"), "{v}");
    assert!(v.contains("1.50"), "{v}");
    let info = d.ok(&["info"]);
    assert!(
        info.contains("Acceleration: tcg") || info.contains("Acceleration: kvm"),
        "{info}"
    );
    // VMs run on Vessel's build of QEMU unless --qemu says otherwise.
    let hypervisor = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("Hypervisor: "))
        .unwrap_or_default();
    assert!(
        hypervisor.starts_with("qemu ") && hypervisor.contains(" (vessel "),
        "{info}"
    );

    for path in ["/_ping", "/v1.24/_ping", "/v1.50/_ping"] {
        let (status, headers, body) = d.http("GET", path, None);
        assert_eq!((status, body.as_str()), (200, "OK"), "{path}");
        let h = |k: &str| {
            headers
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        assert_eq!(h("api-version"), "1.50");
        assert_eq!(h("ostype"), "linux");
        assert!(h("cache-control").contains("no-cache"));
        assert!(h("server").starts_with("Vessel/"));
    }
    let (status, headers, body) = d.http("HEAD", "/_ping", None);
    assert_eq!(status, 200);
    assert!(body.is_empty());
    assert!(headers
        .iter()
        .any(|(k, v)| k == "api-version" && v == "1.50"));

    for path in [
        "/version",
        "/v1.24/version",
        "/v1.41/version",
        "/v1.50/version",
    ] {
        let (status, _, body) = d.http("GET", path, None);
        assert_eq!(status, 200, "{path}");
        assert!(body.contains("\"ApiVersion\":\"1.50\""), "{body}");
    }
    let (status, _, body) = d.http("GET", "/v1.51/version", None);
    assert_eq!(status, 400);
    assert!(body.contains("client version 1.51 is too new"), "{body}");
    let (status, _, body) = d.http("GET", "/v1.12/info", None);
    assert_eq!(status, 400);
    assert!(body.contains("too old"), "{body}");
    let (status, _, _) = d.http("GET", "/v1.30/containers/json?all=1", None);
    assert_eq!(status, 200);
}

#[test]
fn load_several_images_inspect_and_remove() {
    let d = Daemon::start();
    let archive = docker_save(&[
        ImageSpec {
            tags: &["busybox:latest", "busybox:1.35"],
            cmd: &["sh"],
            ..Default::default()
        },
        ImageSpec {
            tags: &["localhost:5000/tools/bb:v1"],
            cmd: &["echo", "tools"],
            ..Default::default()
        },
    ]);
    let path = write(d.dir.path(), "two.tar", &archive);
    let out = d.ok(&["load", "-i", path.to_str().expect("path")]);
    for t in [
        "busybox:latest",
        "busybox:1.35",
        "localhost:5000/tools/bb:v1",
    ] {
        assert!(out.contains(&format!("Loaded image: {t}")), "{out}");
    }
    let list = d.ok(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    let mut tags: Vec<&str> = list.lines().collect();
    tags.sort();
    assert_eq!(
        tags,
        vec![
            "busybox:1.35",
            "busybox:latest",
            "localhost:5000/tools/bb:v1"
        ]
    );
    // until= keeps images created before a time; dangling takes true or
    // false only.
    let count = |f: &str| d.ok(&["images", "-q", "--filter", f]).lines().count();
    assert!(count("until=2999-01-01T00:00:00Z") >= 1);
    assert_eq!(count("until=1970-01-02T00:00:00Z"), 0);
    let bad = d.docker(&["images", "--filter", "dangling=bogus"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("invalid filter 'dangling=bogus'"),
        "{}",
        stderr(&bad)
    );

    let cmd = d.ok(&[
        "image",
        "inspect",
        "-f",
        "{{json .Config.Cmd}} {{.Os}} {{.Architecture}} {{len .RootFS.Layers}}",
        "localhost:5000/tools/bb:v1",
    ]);
    assert_eq!(cmd.trim(), r#"["echo","tools"] linux amd64 1"#);
    let id = d
        .ok(&["image", "inspect", "-f", "{{.Id}}", "busybox"])
        .trim()
        .to_string();
    assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");
    // By short id too.
    let short = &id[7..19];
    assert_eq!(
        d.ok(&["image", "inspect", "-f", "{{.Id}}", short]).trim(),
        id
    );

    // A container (not even started) holds the image: rmi is a 409 unless forced.
    d.ok(&["create", "--name", "holder", "localhost:5000/tools/bb:v1"]);
    let out = d.docker(&["rmi", "localhost:5000/tools/bb:v1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("conflict"), "{}", stderr(&out));
    let (status, _, _) = d.http("DELETE", "/images/localhost:5000/tools/bb:v1", None);
    assert_eq!(status, 409);
    // Removing one of two tags only untags.
    let out = d.ok(&["rmi", "busybox:1.35"]);
    assert!(out.contains("Untagged: busybox:1.35"), "{out}");
    assert!(!out.contains("Deleted"), "{out}");
    assert!(d.ok(&["images", "-q"]).lines().count() == 2);
    // The last tag of an unused image deletes it.
    let out = d.ok(&["rmi", "busybox"]);
    assert!(
        out.contains("Untagged: busybox:latest") && out.contains("Deleted: sha256:"),
        "{out}"
    );
    let out = d.docker(&["image", "inspect", "busybox"]);
    assert!(
        stderr(&out).contains("No such image: busybox"),
        "{}",
        stderr(&out)
    );
    d.ok(&["rm", "holder"]);
    d.ok(&["rmi", "localhost:5000/tools/bb:v1"]);
    assert_eq!(d.ok(&["images", "-q"]).trim(), "");
}

#[test]
fn a_bad_archive_is_refused_and_leaves_nothing() {
    let d = Daemon::start();
    // Not a docker-save archive: a plain tar with one file.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o644);
    h.set_path("hello.txt").expect("path");
    h.set_cksum();
    b.append(&h, &b"hello"[..]).expect("append");
    let path = write(d.dir.path(), "bad.tar", &b.into_inner().expect("tar"));
    let out = d.docker(&["load", "-i", path.to_str().expect("path")]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("invalid archive"), "{}", stderr(&out));
    // A docker-save archive whose layer does not match its diff id.
    let mut good = docker_save(&[ImageSpec {
        tags: &["broken:1"],
        cmd: &["sh"],
        ..Default::default()
    }]);
    let n = good.len();
    let pos = good
        .windows(7)
        .position(|w| w == b"busybox")
        .expect("layer content")
        + 3;
    good[pos] ^= 0xff;
    assert_eq!(good.len(), n);
    let path = write(d.dir.path(), "corrupt.tar", &good);
    let out = d.docker(&["load", "-i", path.to_str().expect("path")]);
    assert!(!out.status.success(), "{}", stdout(&out));
    let (status, _, body) = {
        let raw = std::fs::read(&path).expect("read");
        let _ = raw;
        d.http("POST", "/images/load", Some("not a tar at all"))
    };
    assert_eq!(status, 400, "{body}");
    assert_eq!(d.ok(&["images", "-q"]).trim(), "");
    let leftovers: Vec<_> = walk(&d.data_root().join("image"))
        .into_iter()
        .filter(|p| p.is_file() && !p.ends_with("repositories.json"))
        .collect();
    assert!(leftovers.is_empty(), "store not empty: {leftovers:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn run_streams_exit_codes_and_stdin() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    assert_eq!(
        d.ok(&["run", "--rm", "busybox", "echo", "hello"]),
        "hello\n"
    );
    assert_eq!(
        d.ok(&["ps", "-aq"]).trim(),
        "",
        "--rm left the container behind"
    );

    let out = d.docker(&[
        "run",
        "--name",
        "three",
        "busybox",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(stdout(&out), "out\n");
    assert_eq!(stderr(&out), "err\n");
    assert_eq!(
        d.ok(&[
            "inspect",
            "-f",
            "{{.State.Status}} {{.State.ExitCode}}",
            "three"
        ])
        .trim(),
        "exited 3"
    );

    let out = d.docker_in(
        &[
            "run",
            "-i",
            "--rm",
            "busybox",
            "sh",
            "-c",
            "cat; echo eof-seen",
        ],
        b"data\nmore\n",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "data\nmore\neof-seen\n");

    let out = d.docker(&["run", "--rm", "busybox", "no-such-command"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(
        stderr(&out).contains("executable file not found"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        d.ok(&["ps", "-aq", "--no-trunc"]).lines().count(),
        1,
        "failed --rm start left a container"
    );
}

#[test]
fn the_container_has_its_own_kernel_memory_and_cpus() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("host release");
    let guest_release =
        std::fs::read_to_string(common::guest_dir().join("release")).expect("guest release");
    let out = d.ok(&[
        "run",
        "--rm",
        "-m",
        "256m",
        "--cpus",
        "2",
        "busybox",
        "sh",
        "-c",
        "uname -r; grep MemTotal /proc/meminfo; nproc",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], guest_release.trim());
    assert_ne!(lines[0], host.trim());
    let kb: u64 = lines[1]
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("MemTotal");
    assert!(
        (200_000..=262_144).contains(&kb),
        "MemTotal {kb} kB for a 256 MiB VM"
    );
    assert_eq!(lines[2], "2");
    // The default shape is documented: 512 MiB, one vCPU.
    let out = d.ok(&[
        "run",
        "--rm",
        "busybox",
        "sh",
        "-c",
        "grep MemTotal /proc/meminfo; nproc",
    ]);
    let kb: u64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("MemTotal");
    assert!((450_000..=524_288).contains(&kb), "{out}");
    assert!(out.trim_end().ends_with("\n1"), "{out}");
}

#[test]
fn image_config_and_run_flags_are_honoured() {
    let d = Daemon::start();
    let archive = docker_save(&[ImageSpec {
        tags: &["app:1"],
        entrypoint: &["/bin/echo", "entry"],
        cmd: &["from-cmd"],
        env: &["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hello"],
        workdir: "/srv/app",
        user: "user",
        ..Default::default()
    }]);
    let p = write(d.dir.path(), "app.tar", &archive);
    d.ok(&["load", "-i", p.to_str().expect("path")]);
    // ENTRYPOINT + CMD from the image.
    assert_eq!(d.ok(&["run", "--rm", "app:1"]), "entry from-cmd\n");
    // Arguments replace CMD, not ENTRYPOINT.
    assert_eq!(d.ok(&["run", "--rm", "app:1", "given"]), "entry given\n");
    // --entrypoint drops the image's CMD; ENV, WORKDIR and USER come from the image.
    let out = d.ok(&[
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        "app:1",
        "-c",
        "echo $GREETING; pwd; id -u; id -g; echo $HOME",
    ]);
    assert_eq!(out, "hello\n/srv/app\n1000\n1000\n/home/user\n");
    // -e, -w, -u and --hostname override.
    let out = d.ok(&[
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        "-e",
        "GREETING=bye",
        "-e",
        "EXTRA=1",
        "-w",
        "/tmp",
        "-u",
        "0:100",
        "--hostname",
        "myhost",
        "app:1",
        "-c",
        "echo $GREETING $EXTRA; pwd; id -u; id -g; hostname; cat /etc/hostname",
    ]);
    assert_eq!(out, "bye 1\n/tmp\n0\n100\nmyhost\nmyhost\n");
    let out = d.ok(&["run", "--rm", "--entrypoint", "id", "-u", "nobody", "app:1"]);
    assert!(out.starts_with("uid=65534(nobody)"), "{out}");
    let out = d.docker(&["run", "--rm", "-u", "ghost", "app:1"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unable to find user ghost"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn images_filters_label_reference_before_and_since() {
    let d = Daemon::start();
    let rootfs = write(d.dir.path(), "rootfs.tar", &common::busybox_rootfs(&[]));
    let path = rootfs.to_str().expect("path");
    d.ok(&["import", "--change", "LABEL team=a", path, "lab:one"]);
    // Creation times are in seconds: the second image is a second younger.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    d.ok(&["import", "--change", "LABEL team=b", path, "lab:two"]);
    d.ok(&["import", path, "other:x"]);
    let images = |filter: &str| {
        d.ok(&[
            "images",
            "--filter",
            filter,
            "--format",
            "{{.Repository}}:{{.Tag}}",
        ])
        .lines()
        .map(str::to_string)
        .collect::<Vec<_>>()
    };
    assert_eq!(images("label=team=a"), ["lab:one"]);
    assert_eq!(images("label=team"), ["lab:two", "lab:one"]);
    assert_eq!(images("reference=lab:*"), ["lab:two", "lab:one"]);
    assert_eq!(images("reference=other"), ["other:x"]);
    assert_eq!(images("before=lab:two"), ["lab:one"]);
    assert!(images("since=lab:one").contains(&"lab:two".to_string()));
    assert!(!images("since=lab:one").contains(&"lab:one".to_string()));
    let bad = d.docker(&["images", "--filter", "bogus=1"]);
    assert!(!bad.status.success());
}

#[test]
fn import_with_changes() {
    let d = Daemon::start();
    let rootfs = write(
        d.dir.path(),
        "rootfs.tar",
        &common::busybox_rootfs(&[("/etc/motd", "imported\n")]),
    );
    let out = d.ok(&[
        "import",
        "--change",
        "CMD [\"cat\", \"/etc/motd\"]",
        "--change",
        "ENV MODE=test",
        "--change",
        "WORKDIR /etc",
        "--change",
        "USER nobody",
        rootfs.to_str().expect("path"),
        "imported:v1",
    ]);
    assert!(out.trim().starts_with("sha256:"), "{out}");
    let cfg = d.ok(&[
        "image",
        "inspect",
        "-f",
        "{{json .Config.Cmd}} {{.Config.WorkingDir}} {{.Config.User}} {{json .Config.Env}}",
        "imported:v1",
    ]);
    assert_eq!(
        cfg.trim(),
        r#"["cat","/etc/motd"] /etc nobody ["MODE=test"]"#
    );
    assert_eq!(d.ok(&["run", "--rm", "imported:v1"]), "imported\n");
    let out = d.ok(&[
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        "imported:v1",
        "-c",
        "echo $MODE; pwd; id -un",
    ]);
    assert_eq!(out, "test\n/etc\nnobody\n");
    // From stdin with ENTRYPOINT.
    let data = std::fs::read(&rootfs).expect("read");
    let out = d.docker_in(
        &[
            "import",
            "--change",
            "ENTRYPOINT [\"/bin/echo\", \"ep\"]",
            "-",
            "fromstdin:latest",
        ],
        &data,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(d.ok(&["run", "--rm", "fromstdin", "x"]), "ep x\n");
}

#[test]
fn detached_containers_logs_attach_wait_stop_kill() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "ticker",
        "busybox",
        "sh",
        "-c",
        "trap 'echo got-usr1' USR1; i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.3; done",
    ]);
    assert!(
        eventually(30, || d.ok(&["logs", "ticker"]).lines().count() >= 4),
        "no logs: {}",
        d.log()
    );
    let ps = d.ok(&["ps", "--format", "{{.Names}} {{.Status}}"]);
    assert!(ps.starts_with("ticker Up"), "{ps}");
    let tail = d.ok(&["logs", "--tail", "2", "ticker"]);
    assert_eq!(tail.lines().count(), 2);
    let ts = d.ok(&["logs", "-t", "--tail", "1", "ticker"]);
    assert!(ts.starts_with("20") && ts.contains("Z tick "), "{ts}");
    // logs -f keeps streaming new lines.
    let mut follow = d
        .docker_cmd(&["logs", "-f", "--tail", "0", "ticker"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("logs -f");
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(follow.stdout.as_mut().expect("stdout"), &mut buf).expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("tick"));
    let _ = follow.kill();
    let _ = follow.wait();

    d.ok(&["kill", "-s", "USR1", "ticker"]);
    assert!(eventually(10, || d
        .ok(&["logs", "ticker"])
        .contains("got-usr1")));
    let inspect = d.ok(&[
        "inspect",
        "-f",
        "{{.State.Running}} {{.State.Pid}} {{.Name}} {{.Config.Image}} {{.HostConfig.NetworkMode}}",
        "ticker",
    ]);
    let f: Vec<&str> = inspect.split_whitespace().collect();
    assert_eq!(f[0], "true");
    let pid: u32 = f[1].parse().expect("pid");
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "State.Pid is the VM process"
    );
    assert_eq!(f[2], "/ticker");
    assert_eq!(f[3], "busybox");

    // docker stop: SIGTERM ends the shell (exit 143).
    d.ok(&["stop", "ticker"]);
    assert_eq!(
        d.ok(&[
            "inspect",
            "-f",
            "{{.State.Status}} {{.State.ExitCode}}",
            "ticker"
        ])
        .trim(),
        "exited 143"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists() || !is_running(pid),
        "VM process left behind"
    );
    let fin = d.ok(&[
        "inspect",
        "-f",
        "{{.State.StartedAt}} {{.State.FinishedAt}}",
        "ticker",
    ]);
    assert!(!fin.contains("0001-01-01"), "{fin}");

    // A process that ignores SIGTERM is killed after the timeout.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "stubborn",
        "busybox",
        "sh",
        "-c",
        "trap '' TERM; echo ready; while true; do sleep 1; done",
    ]);
    assert!(eventually(30, || d
        .ok(&["logs", "stubborn"])
        .contains("ready")));
    let t0 = std::time::Instant::now();
    d.ok(&["stop", "-t", "1", "stubborn"]);
    assert!(t0.elapsed() >= std::time::Duration::from_millis(900));
    assert_eq!(
        d.ok(&["inspect", "-f", "{{.State.ExitCode}}", "stubborn"])
            .trim(),
        "137"
    );

    // attach to a running container sees its output and its exit code; wait returns it.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "later",
        "busybox",
        "sh",
        "-c",
        "sleep 2; echo attached-output; exit 5",
    ]);
    let out = d.docker(&["attach", "later"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stdout(&out).contains("attached-output"));
    assert_eq!(d.ok(&["wait", "later"]).trim(), "5");
    // Restarting an exited container runs it again, logs accumulate.
    d.ok(&["start", "later"]);
    assert_eq!(d.ok(&["wait", "later"]).trim(), "5");
    assert_eq!(
        d.ok(&["logs", "later"]),
        "attached-output\nattached-output\n"
    );

    let all = d.ok(&["ps", "-a", "--format", "{{.Names}}"]);
    for n in ["ticker", "stubborn", "later"] {
        assert!(all.contains(n), "{all}");
    }
    assert_eq!(d.ok(&["ps", "-q"]).trim(), "");
    d.ok(&["run", "-d", "--name", "victim", "busybox", "sleep", "1000"]);
    let out = d.docker(&["rm", "victim"]);
    assert!(
        !out.status.success() && stderr(&out).contains("container is running"),
        "{}",
        stderr(&out)
    );
    d.ok(&["rm", "-f", "victim", "ticker", "stubborn", "later"]);
    assert_eq!(d.ok(&["ps", "-aq"]).trim(), "");
}

fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

#[test]
fn bad_input_gets_dockers_answers() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    let out = d.docker(&["inspect", "nope"]);
    assert!(
        stderr(&out).contains("No such object: nope")
            || stderr(&out).contains("No such container: nope"),
        "{}",
        stderr(&out)
    );
    let (status, _, body) = d.http("GET", "/containers/nope/json", None);
    assert_eq!(status, 404);
    assert!(body.contains("No such container: nope"), "{body}");
    let (status, _, body) = d.http(
        "POST",
        "/containers/create",
        Some(r#"{"Image":"nosuchimage"}"#),
    );
    assert_eq!(status, 404);
    assert!(body.contains("No such image: nosuchimage"), "{body}");
    let (status, _, body) = d.http("POST", "/containers/create", Some("{not json"));
    assert_eq!(status, 400, "{body}");
    let (status, _, body) = d.http(
        "POST",
        "/containers/create?name=bad%20name",
        Some(r#"{"Image":"busybox","Cmd":["true"]}"#),
    );
    assert_eq!(status, 400);
    assert!(body.contains("Invalid container name"), "{body}");
    let (status, _, _) = d.http(
        "POST",
        "/containers/create?name=taken",
        Some(r#"{"Image":"busybox","Cmd":["true"]}"#),
    );
    assert_eq!(status, 201);
    let (status, _, body) = d.http(
        "POST",
        "/containers/create?name=taken",
        Some(r#"{"Image":"busybox","Cmd":["true"]}"#),
    );
    assert_eq!(status, 409);
    assert!(body.contains("is already in use"), "{body}");
    let out = d.docker(&["create", "--name", "taken", "busybox"]);
    assert!(stderr(&out).contains("already in use"), "{}", stderr(&out));
    let (status, _, _) = d.http("POST", "/containers/nope/start", None);
    assert_eq!(status, 404);
    let (status, _, body) = d.http(
        "POST",
        "/containers/create",
        Some(r#"{"Image":"busybox","Cmd":["true"],"HostConfig":{"Memory":1048576}}"#),
    );
    assert_eq!(status, 400);
    assert!(body.contains("Minimum memory limit"), "{body}");
    // Start of a running container: 304.
    d.ok(&["run", "-d", "--name", "runner", "busybox", "sleep", "1000"]);
    let (status, _, _) = d.http("POST", "/containers/runner/start", None);
    assert_eq!(status, 304);
    let (status, _, body) = d.http("POST", "/containers/runner/kill?signal=NOPE", None);
    assert_eq!(status, 400, "{body}");
    let (status, _, _) = d.http("DELETE", "/containers/runner", None);
    assert_eq!(status, 409);
    d.ok(&["rm", "-f", "runner", "taken"]);
}

#[test]
fn a_paused_or_stopped_vm_is_reattached_after_a_daemon_restart() {
    let mut d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    let paused = d.ok(&["run", "-d", "busybox", "sleep", "100000"]);
    let stopped = d.ok(&["run", "-d", "busybox", "sleep", "100000"]);
    let (paused, stopped) = (paused.trim(), stopped.trim());
    d.ok(&["pause", paused]);
    d.kill9();
    // The daemon ended while it had this VM stopped (as a translated-code
    // release cut short leaves it).
    let answer = d.qmp(stopped, "stop");
    assert!(answer.contains("return"), "{answer}");
    d.restart();
    let state = |id: &str| d.ok(&["inspect", "-f", "{{.State.Status}}", id]);
    assert_eq!(state(paused).trim(), "paused", "{}", d.log());
    assert_eq!(state(stopped).trim(), "running");
    assert!(d.qmp(paused, "query-status").contains("\"paused\""));
    assert!(d.qmp(stopped, "query-status").contains("\"running\""));
    assert_eq!(d.ok(&["exec", stopped, "echo", "hi"]), "hi\n");
    let out = d.docker(&["exec", paused, "true"]);
    assert!(stderr(&out).contains("is paused"), "{}", stderr(&out));
    d.ok(&["unpause", paused]);
    assert_eq!(d.ok(&["exec", paused, "echo", "hi"]), "hi\n");
    assert!(
        d.log().contains("was left stopped; resuming it"),
        "{}",
        d.log()
    );
    d.ok(&["rm", "-f", paused, stopped]);
}

#[test]
fn daemon_restart_keeps_containers_running() {
    let mut d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "survivor",
        "busybox",
        "sh",
        "-c",
        "i=0; while true; do echo line $i; i=$((i+1)); sleep 0.5; done",
    ]);
    let out = d.docker(&["run", "--name", "finished", "busybox", "sh", "-c", "exit 4"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(eventually(30, || d
        .ok(&["logs", "survivor"])
        .lines()
        .count()
        >= 2));
    let pid = d
        .ok(&["inspect", "-f", "{{.State.Pid}}", "survivor"])
        .trim()
        .to_string();

    for round in 0..2 {
        if round == 0 {
            d.kill9();
        } else {
            d.terminate();
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
        assert!(
            is_running(pid.parse().expect("pid")),
            "the VM died with the daemon"
        );
        d.restart();
        let ps = d.ok(&["ps", "-a", "--format", "{{.Names}} {{.State}}"]);
        assert!(ps.contains("survivor running"), "{ps}");
        assert!(ps.contains("finished exited"), "{ps}");
        assert_eq!(
            d.ok(&["inspect", "-f", "{{.State.ExitCode}}", "finished"])
                .trim(),
            "4"
        );
        assert_eq!(
            d.ok(&["inspect", "-f", "{{.State.Pid}}", "survivor"])
                .trim(),
            pid
        );
        let before = d.ok(&["logs", "survivor"]).lines().count();
        assert!(
            eventually(20, || d.ok(&["logs", "survivor"]).lines().count()
                > before + 1),
            "logs stopped after restart"
        );
    }
    // No line was lost while the daemon was down.
    let logs = d.ok(&["logs", "survivor"]);
    let numbers: Vec<u64> = logs
        .lines()
        .filter_map(|l| l.strip_prefix("line ")?.parse().ok())
        .collect();
    for w in numbers.windows(2) {
        assert!(
            w[1] == w[0] + 1 || w[1] <= w[0],
            "gap in logs: {} then {}",
            w[0],
            w[1]
        );
    }
    // attach works on the reattached container, and stop ends it.
    let mut attach = d
        .docker_cmd(&["attach", "--no-stdin", "survivor"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("attach");
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(attach.stdout.as_mut().expect("stdout"), &mut buf).expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("line "));
    d.ok(&["stop", "survivor"]);
    let _ = attach.wait();
    assert_eq!(
        d.ok(&["inspect", "-f", "{{.State.Status}}", "survivor"])
            .trim(),
        "exited"
    );
    assert!(
        eventually(10, || !is_running(pid.parse().expect("pid"))),
        "VM still running after stop"
    );
}

#[test]
fn tty_and_resize_through_bollard() {
    use bollard::query_parameters::{AttachContainerOptions, ResizeContainerTTYOptions};
    use bollard_stubs::models::ContainerCreateBody;
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;

    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let docker = bollard::Docker::connect_with_unix(
            d.sock.to_str().expect("sock"),
            120,
            bollard::API_DEFAULT_VERSION,
        )
        .expect("connect");
        let id = docker
            .create_container(
                None,
                ContainerCreateBody {
                    image: Some("busybox".into()),
                    cmd: Some(vec!["sh".into()]),
                    tty: Some(true),
                    open_stdin: Some(true),
                    ..Default::default()
                },
            )
            .await
            .expect("create")
            .id;
        let mut att = docker
            .attach_container(
                &id,
                Some(AttachContainerOptions {
                    stdin: true,
                    stdout: true,
                    stderr: true,
                    stream: true,
                    ..Default::default()
                }),
            )
            .await
            .expect("attach");
        docker.start_container(&id, None).await.expect("start");
        docker
            .resize_container_tty(&id, ResizeContainerTTYOptions { h: 33, w: 111 })
            .await
            .expect("resize");
        att.input
            .write_all(b"stty size; tty; echo marker-$((40+2))\n")
            .await
            .expect("write");
        let mut seen = String::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        while !seen.contains("marker-42") {
            let next = tokio::time::timeout_at(deadline, att.output.next())
                .await
                .expect("tty output in time");
            seen.push_str(&next.expect("stream open").expect("output").to_string());
        }
        assert!(seen.contains("33 111"), "{seen}");
        assert!(seen.contains("/dev/pts/0"), "{seen}");
        docker
            .resize_container_tty(&id, ResizeContainerTTYOptions { h: 20, w: 70 })
            .await
            .expect("resize");
        att.input
            .write_all(b"stty size; exit 9\n")
            .await
            .expect("write");
        let mut rest = String::new();
        while let Ok(Some(Ok(o))) = tokio::time::timeout_at(deadline, att.output.next()).await {
            rest.push_str(&o.to_string());
        }
        assert!(rest.contains("20 70"), "{rest}");
        let code = docker
            .inspect_container(&id, None)
            .await
            .expect("inspect")
            .state
            .and_then(|s| s.exit_code);
        assert_eq!(code, Some(9));
    });
}
