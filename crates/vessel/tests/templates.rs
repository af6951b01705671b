//! VM templates: containers start as clones of a booted VM, each with its
//! own identity; without templates they boot their kernel.

mod common;

use common::{eventually, Daemon};

fn wait_for_template(d: &Daemon) {
    assert!(
        eventually(180, || d.log().contains("VM template ready")),
        "no template: {}",
        d.log()
    );
}

#[test]
fn clones_have_their_own_identity() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    wait_for_template(&d);
    let probe = "cat /proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
                 date +%s; hostname; echo $$-$RANDOM > /tmp/mine; cat /tmp/mine; ls /tmp; cat /etc/machine-id";
    let a = d.ok(&["run", "--rm", "busybox", "sh", "-c", probe]);
    let b = d.ok(&["run", "--rm", "busybox", "sh", "-c", probe]);
    let log = d.log();
    assert_eq!(
        log.matches("boot=\"clone\"").count(),
        2,
        "both containers should be clones: {log}"
    );
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    assert_ne!(a[0], b[0], "boot_id shared between clones");
    assert_ne!(a[1], b[1], "random bytes shared between clones");
    assert_eq!(a[1].len(), 32);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs();
    for clone in [&a, &b] {
        let t: u64 = clone[2].parse().expect("date");
        assert!(t.abs_diff(now) < 30, "clone clock is off: {t} vs {now}");
        // Only its own file in /tmp: nothing of the other container.
        assert_eq!(clone[5], "mine");
    }
    assert_ne!(a[3], b[3], "hostnames");
    assert_eq!(a[6].len(), 32, "machine-id: {a:?}");
    assert_ne!(a[6], b[6], "machine-id shared between clones");
    // Clones keep every other behaviour: exit codes and both streams.
    let out = d.docker(&[
        "run",
        "--rm",
        "busybox",
        "sh",
        "-c",
        "echo o; echo e >&2; exit 6",
    ]);
    assert_eq!(out.status.code(), Some(6));
    assert_eq!(common::stdout(&out), "o\n");
    assert_eq!(common::stderr(&out), "e\n");
    // Another shape has no template yet: it boots cold, and gets one.
    let out = d.ok(&[
        "run",
        "--rm",
        "-m",
        "300m",
        "busybox",
        "sh",
        "-c",
        "grep MemTotal /proc/meminfo",
    ]);
    let kb: u64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("MemTotal");
    assert!((250_000..=307_200).contains(&kb), "{out}");
    assert!(
        eventually(180, || d.log().matches("VM template ready").count() >= 2),
        "{}",
        d.log()
    );
    let out = d.ok(&[
        "run",
        "--rm",
        "-m",
        "300m",
        "busybox",
        "sh",
        "-c",
        "grep MemTotal /proc/meminfo",
    ]);
    assert!(out.contains("MemTotal"));
    assert_eq!(d.log().matches("boot=\"clone\"").count(), 4, "{}", d.log());
}

#[test]
fn templates_survive_a_daemon_restart_and_can_be_disabled() {
    let mut d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    wait_for_template(&d);
    d.kill9();
    d.restart();
    assert_eq!(d.ok(&["run", "--rm", "busybox", "echo", "hi"]), "hi\n");
    // The template found on disk was used, not rebuilt.
    assert_eq!(
        d.log().matches("VM template ready").count(),
        1,
        "{}",
        d.log()
    );
    assert_eq!(d.log().matches("boot=\"clone\"").count(), 1, "{}", d.log());

    let cold = Daemon::start_with(&["--vm-templates=false"]);
    cold.load_busybox(&["busybox:latest"]);
    assert_eq!(
        cold.ok(&["run", "--rm", "busybox", "echo", "cold"]),
        "cold\n"
    );
    let log = cold.log();
    assert!(
        log.contains("boot=\"cold\"") && !log.contains("VM template"),
        "{log}"
    );
}
