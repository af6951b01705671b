//! Privileges and limits inside the VM, as Docker's flags set them:
//! capabilities (`--cap-add`, `--cap-drop`, `--privileged`), `--ulimit`,
//! `--security-opt no-new-privileges`, `--group-add`, `--pids-limit`,
//! `--shm-size`, for the main process and for execs.

mod common;

use common::{stderr, Daemon};

fn status_field(d: &Daemon, container: &str, field: &str) -> String {
    let s = d.ok(&["exec", container, "cat", "/proc/self/status"]);
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("")
        .to_string()
}

#[test]
fn docker_privilege_and_limit_flags_apply_inside_the_vm() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);

    // Docker's default capability set, for the process and its execs.
    let out = d.ok(&[
        "run",
        "--rm",
        "busybox",
        "sh",
        "-c",
        "grep CapEff /proc/self/status; mkdir -p /tmp/m; mount -t tmpfs none /tmp/m && echo mounted; true",
    ]);
    assert!(out.contains("00000000a80425fb"), "{out}");
    assert!(
        !out.contains("mounted"),
        "no CAP_SYS_ADMIN by default: {out}"
    );

    d.ok(&[
        "run",
        "-d",
        "--name",
        "lim",
        "--cap-add",
        "SYS_ADMIN",
        "--cap-drop",
        "NET_RAW",
        "--ulimit",
        "nofile=100:200",
        "--security-opt",
        "no-new-privileges",
        "--group-add",
        "1234",
        "--group-add",
        "users",
        "--pids-limit",
        "20",
        "--shm-size",
        "16m",
        "busybox",
        "sleep",
        "1000",
    ]);
    let caps = u64::from_str_radix(&status_field(&d, "lim", "CapEff:"), 16).expect("caps");
    assert!(caps & (1 << 21) != 0, "SYS_ADMIN added: {caps:x}");
    assert!(caps & (1 << 13) == 0, "NET_RAW dropped: {caps:x}");
    assert_eq!(status_field(&d, "lim", "NoNewPrivs:"), "1");
    let limits = d.ok(&["exec", "lim", "sh", "-c", "ulimit -n; ulimit -Hn; id -G"]);
    let lines: Vec<&str> = limits.lines().collect();
    assert_eq!(&lines[..2], &["100", "200"], "{limits}");
    assert!(lines[2].split(' ').any(|g| g == "1234"), "{limits}");
    assert!(
        lines[2].split(' ').any(|g| g == "100"),
        "--group-add by name: {limits}"
    );
    let shm = d.ok(&["exec", "lim", "df", "-k", "/dev/shm"]);
    assert!(shm.contains("16384"), "{shm}");
    let forks = d.docker(&[
        "exec",
        "lim",
        "sh",
        "-c",
        "for i in $(seq 40); do sleep 5 & done 2>&1; wait",
    ]);
    let text = format!("{}{}", common::stdout(&forks), stderr(&forks));
    assert!(
        text.contains("can't fork") || text.contains("Resource temporarily unavailable"),
        "--pids-limit 20 stops 40 processes: {text}"
    );

    // --privileged: every capability.
    let out = d.ok(&[
        "run",
        "--rm",
        "--privileged",
        "busybox",
        "sh",
        "-c",
        "grep CapEff /proc/self/status; mkdir -p /tmp/m; mount -t tmpfs none /tmp/m && echo mounted; true",
    ]);
    assert!(out.contains("000001ffffffffff"), "{out}");
    assert!(out.contains("mounted"), "{out}");
    // A non-root user has no capabilities, as in Docker.
    let out = d.ok(&[
        "run",
        "--rm",
        "-u",
        "1000",
        "busybox",
        "grep",
        "CapEff",
        "/proc/self/status",
    ]);
    assert!(out.contains("0000000000000000"), "{out}");

    for (flag, value, want) in [
        ("--cap-add", "FROBNICATE", "unknown capability"),
        ("--security-opt", "apparmor=docker-default", "not supported"),
        ("--group-add", "nosuchgroup", "nosuchgroup"),
    ] {
        let r = d.docker(&["run", "--rm", flag, value, "busybox", "true"]);
        assert!(!r.status.success(), "{flag} {value}");
        assert!(stderr(&r).contains(want), "{flag} {value}: {}", stderr(&r));
    }
}
