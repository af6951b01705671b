//! VM templates: containers start as clones of a booted VM, each with its
//! own identity; without templates they boot their kernel. Warm VMs (clones
//! made ahead, with the image mounted) take a container's first start.

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
    let d = Daemon::start_with(&["--warm-vms", "0"]);
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

    // Two clones running side by side: each has its own MAC address in the
    // guest, the one Docker reports (the template's is the same for all).
    let ids: Vec<String> = (0..2)
        .map(|_| {
            d.ok(&["run", "-d", "busybox", "sleep", "600"])
                .trim()
                .to_string()
        })
        .collect();
    let macs: Vec<String> = ids
        .iter()
        .map(|id| {
            let guest = d.ok(&["exec", id, "cat", "/sys/class/net/eth0/address"]);
            let api = d.ok(&["inspect", "-f", "{{.NetworkSettings.MacAddress}}", id]);
            assert_eq!(guest.trim(), api.trim(), "{id}");
            guest.trim().to_string()
        })
        .collect();
    assert_ne!(macs[0], macs[1], "MAC shared between clones");
    d.ok(&["rm", "-f", &ids[0], &ids[1]]);
}

/// Busy loops on every host CPU (two per CPU) until dropped.
struct HostLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl HostLoad {
    fn start() -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = (0..2 * cpus)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for HostLoad {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A template booted while every host CPU is busy still has a working TSC
/// clocksource and local APIC timer (the guest kernel's own calibration of
/// both fails under load, leaving jiffies and the PIT, with which an idle
/// container never stops ticking): its clones report them, and the daemon
/// logs no calibration failure.
#[test]
fn a_template_booted_on_a_busy_host_keeps_its_clocks() {
    let load = HostLoad::start();
    let d = Daemon::start_with(&["--warm-vms", "0"]);
    wait_for_template(&d);
    drop(load);
    d.load_busybox(&["busybox:latest"]);
    let out = d.ok(&[
        "run",
        "--rm",
        "busybox",
        "cat",
        "/sys/devices/system/clocksource/clocksource0/current_clocksource",
        "/sys/devices/system/clockevents/clockevent0/current_device",
    ]);
    let log = d.log();
    assert!(log.contains("boot=\"clone\""), "{log}");
    if log.contains("(tcg") {
        assert_eq!(out, "tsc\nlapic\n", "{log}");
    } else {
        // Under KVM the guest keeps time with kvm-clock.
        assert!(
            out.starts_with("kvm-clock\n") || out.starts_with("tsc\n"),
            "{out}"
        );
    }
    assert!(!log.contains("timer calibration failed"), "{log}");
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

/// The template directories on disk, by key.
fn template_keys(d: &Daemon) -> Vec<String> {
    let mut keys: Vec<String> = std::fs::read_dir(d.data_root().join("templates"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    keys.sort();
    keys
}

#[test]
fn another_qemu_gets_its_own_template_and_a_failed_restore_boots_cold() {
    let mut d = Daemon::start_with(&["--warm-vms", "0"]);
    d.load_busybox(&["busybox:latest"]);
    wait_for_template(&d);
    let first = template_keys(&d);
    assert_eq!(first.len(), 1, "{first:?}");

    // The same data root with another QEMU (Debian's, from PATH): the
    // template of the other build is deleted and one is built for this one.
    d.kill9();
    d.restart_with(&["--warm-vms", "0", "--qemu", "qemu-system-x86_64"]);
    let info = d.ok(&["info", "--format", "{{json .}}"]);
    assert!(!info.contains("(vessel "), "{info}");
    assert!(
        eventually(180, || d.log().matches("VM template ready").count() >= 2),
        "no template for the other QEMU: {}",
        d.log()
    );
    let second = template_keys(&d);
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(first, second, "the other build's template was kept");
    assert_eq!(
        d.ok(&["run", "--rm", "busybox", "echo", "clone"]),
        "clone\n"
    );
    assert!(d.log().contains("boot=\"clone\""), "{}", d.log());

    // A template whose saved state no longer loads: the container boots its
    // kernel instead, the log says why, and the template is rebuilt.
    let state = d
        .data_root()
        .join("templates")
        .join(&second[0])
        .join("state");
    std::fs::write(&state, b"not a device state").expect("spoil the template's state");
    assert_eq!(d.ok(&["run", "--rm", "busybox", "echo", "cold"]), "cold\n");
    let log = d.log();
    assert!(
        log.contains("restoring the VM template failed") && log.contains("boot=\"cold\""),
        "{log}"
    );
    assert!(
        eventually(180, || d.log().matches("VM template ready").count() >= 3),
        "the template was not rebuilt: {}",
        d.log()
    );
    assert_eq!(
        d.ok(&["run", "--rm", "busybox", "echo", "again"]),
        "again\n"
    );
    assert_eq!(d.log().matches("boot=\"clone\"").count(), 2, "{}", d.log());
}

fn wait_for_warm(d: &Daemon, n: usize) {
    assert!(
        eventually(120, || d.log().matches("warm VM ready").count() >= n),
        "no warm VM: {}",
        d.log()
    );
}

#[test]
fn warm_vms_take_first_starts_with_their_own_identity() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    wait_for_template(&d);
    // Created before any warm VM exists: its start will find one later.
    let early = d.ok(&["create", "busybox", "sh", "-c", "cat /etc/hostname"]);
    let early = early.trim();
    // The first run of the image is a clone and makes a warm VM after it.
    d.ok(&["run", "--rm", "busybox", "true"]);
    wait_for_warm(&d, 1);
    let probe = "cat /proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
                 date +%s; hostname; echo $$-$RANDOM > /tmp/mine; ls /tmp; cat /etc/machine-id";
    let a = d.ok(&[
        "run", "--rm", "--name", "warm-a", "busybox", "sh", "-c", probe,
    ]);
    wait_for_warm(&d, 2);
    let b = d.ok(&[
        "run",
        "--rm",
        "--hostname",
        "bee",
        "busybox",
        "sh",
        "-c",
        probe,
    ]);
    let log = d.log();
    assert_eq!(log.matches("boot=\"warm\"").count(), 2, "{log}");
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    assert_ne!(a[0], b[0], "boot_id shared between warm VMs");
    assert_ne!(a[1], b[1], "random bytes shared between warm VMs");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs();
    for vm in [&a, &b] {
        let t: u64 = vm[2].parse().expect("date");
        assert!(t.abs_diff(now) < 30, "warm VM clock is off: {t} vs {now}");
        assert_eq!(
            vm[4], "mine",
            "another container's files are visible: {vm:?}"
        );
    }
    assert_eq!(a[3].len(), 12, "hostname is the container id: {a:?}");
    assert_eq!(b[3], "bee");
    assert_eq!(a[5].len(), 32, "machine-id: {a:?}");
    assert_ne!(a[5], b[5], "machine-id shared between warm VMs");

    // A container created earlier takes a warm VM at its first start and
    // gets its own hostname.
    wait_for_warm(&d, 3);
    let out = d.ok(&["start", "-a", early]);
    assert_eq!(out.trim(), &early[..12]);
    assert_eq!(d.log().matches("boot=\"warm\"").count(), 3);

    // A second start keeps the container's own disk: no warm VM for it.
    wait_for_warm(&d, 4);
    let script = "if [ -f /seen ]; then echo again; else touch /seen; echo first; fi";
    assert_eq!(
        d.ok(&["run", "--name", "twice", "busybox", "sh", "-c", script]),
        "first\n"
    );
    assert_eq!(d.ok(&["start", "-a", "twice"]), "again\n");
    let log = d.log();
    assert_eq!(log.matches("boot=\"warm\"").count(), 4, "{log}");
    assert_eq!(log.matches("boot=\"clone\"").count(), 2, "{log}");

    // Removing the image ends its warm VMs.
    d.ok(&["rm", "-f", "twice", early]);
    wait_for_warm(&d, 5);
    d.ok(&["rmi", "busybox"]);
    assert!(
        eventually(20, || !vm_running(&d, "vessel-warm-")),
        "a warm VM outlived its image"
    );
}

fn vm_running(d: &Daemon, pattern: &str) -> bool {
    let out = std::process::Command::new("pgrep")
        .arg("-f")
        .arg(format!("{pattern}.*{}", d.data_root().display()))
        .output()
        .expect("pgrep");
    !out.stdout.is_empty()
}

/// KiB of `field` (`Rss:`, `Shared_Clean:`, ...) of the first mapping of
/// process `pid` whose `/proc/PID/smaps` header line `is_it` picks.
fn smaps_kib(pid: &str, is_it: impl Fn(&str) -> bool, field: &str) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let mut lines = smaps.lines();
    while let Some(l) = lines.next() {
        if is_it(l) {
            return lines
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("no {field} after {l}"));
        }
    }
    panic!("no such mapping in {pid}")
}

/// Resident KiB of QEMU's translated-code buffer (its `tcg-jit` memfd,
/// writable mapping) in process `pid`.
fn translated_code_kib(pid: &str) -> u64 {
    smaps_kib(
        pid,
        |l| l.contains("rw-s") && l.contains("/memfd:tcg-jit"),
        "Rss:",
    )
}

#[test]
fn an_idle_container_gives_back_its_translated_code_and_keeps_working() {
    let d = Daemon::start_with(&["--warm-vms", "0", "--tcg-trim-after", "2"]);
    d.load_busybox(&["busybox:latest"]);
    wait_for_template(&d);
    if !d.log().contains("(tcg") {
        // Under KVM there is no translated code.
        return;
    }
    let id = d.ok(&[
        "run",
        "-d",
        "busybox",
        "sh",
        "-c",
        "echo kept > /tmp/f; sleep 100000",
    ]);
    let id = id.trim();
    let pid = d.ok(&["inspect", "-f", "{{.State.Pid}}", id]);
    let pid = pid.trim();
    // Started moments ago: not idle long enough to have been trimmed.
    let before = translated_code_kib(pid);
    assert!(before > 8 * 1024, "only {before} KiB of translated code");
    assert!(
        eventually(60, || d
            .log()
            .contains("idle VM gave back its translated code")),
        "no trim: {}",
        d.log()
    );
    let after = translated_code_kib(pid);
    assert!(after < 8 * 1024, "{after} KiB of translated code kept");
    // Past the trim's grace period, so that the execs count as activity.
    std::thread::sleep(std::time::Duration::from_secs(3));
    // The container is untouched: running, its files there, exec and stop work.
    assert_eq!(d.ok(&["exec", id, "cat", "/tmp/f"]), "kept\n");
    assert_eq!(d.ok(&["exec", id, "sh", "-c", "echo $((6*7))"]), "42\n");
    assert_eq!(
        d.ok(&["inspect", "-f", "{{.State.Status}}", id]).trim(),
        "running"
    );
    // Busy, then idle again: it is trimmed a second time.
    assert!(
        eventually(60, || d
            .log()
            .matches("idle VM gave back its translated code")
            .count()
            >= 2),
        "no second trim: {}",
        d.log()
    );
    assert_eq!(d.ok(&["exec", id, "cat", "/tmp/f"]), "kept\n");
    // Paused containers are left alone and unpause as usual.
    d.ok(&["pause", id]);
    d.ok(&["unpause", id]);
    d.ok(&["rm", "-f", id]);
    assert!(!d.log().contains("could not release"), "{}", d.log());
}

/// KiB of `field` (`Shared_Clean:`, `Private_Dirty:`, ...) in process
/// `pid`'s mapping of `file`.
fn mapping_kib(pid: &str, file: &std::path::Path, field: &str) -> u64 {
    let name = file.display().to_string();
    smaps_kib(pid, |l| l.ends_with(&name), field)
}

fn sha256_of(path: &std::path::Path) -> String {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).expect("open");
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).expect("read");
    hex::encode(h.finalize())
}

#[test]
fn clones_share_the_templates_pages_and_keep_their_writes() {
    let d = Daemon::start_with(&["--warm-vms", "0"]);
    d.load_busybox(&["busybox:latest"]);
    wait_for_template(&d);
    let keys = template_keys(&d);
    assert_eq!(keys.len(), 1, "{keys:?}");
    let memory = d
        .data_root()
        .join("templates")
        .join(&keys[0])
        .join("memory");
    let before = sha256_of(&memory);
    let start = || {
        let id = d.ok(&[
            "run", "-d", "--tmpfs", "/scratch", "busybox", "sleep", "600",
        ]);
        let id = id.trim().to_string();
        let pid = d.ok(&["inspect", "-f", "{{.State.Pid}}", &id]);
        (id, pid.trim().to_string())
    };
    let (a, pid_a) = start();
    let (b, pid_b) = start();
    // Both QEMUs map the template's memory, and the guest pages neither
    // has written are the file's, one copy for both (dirty while the page
    // cache has not written the template back).
    for pid in [&pid_a, &pid_b] {
        let shared =
            mapping_kib(pid, &memory, "Shared_Clean:") + mapping_kib(pid, &memory, "Shared_Dirty:");
        assert!(
            shared >= 4096,
            "{pid} shares only {shared} KiB of the template"
        );
    }
    // What one guest writes is its own: its private pages grow, the
    // other's do not, and the template is unchanged.
    let dirty = |pid: &str| mapping_kib(pid, &memory, "Private_Dirty:");
    let (a0, b0) = (dirty(&pid_a), dirty(&pid_b));
    d.ok(&[
        "exec",
        &a,
        "dd",
        "if=/dev/urandom",
        "of=/scratch/fill",
        "bs=1M",
        "count=64",
    ]);
    let (a1, b1) = (dirty(&pid_a), dirty(&pid_b));
    assert!(
        a1 >= a0 + 60 * 1024,
        "the writing clone's private pages: {a0} -> {a1} KiB"
    );
    assert!(
        b1 < b0 + 8 * 1024,
        "the other clone's private pages: {b0} -> {b1} KiB"
    );
    assert_eq!(
        d.ok(&["exec", &b, "ls", "/scratch"]),
        "",
        "one clone's files in the other"
    );
    assert_eq!(sha256_of(&memory), before, "a clone wrote to the template");
    d.ok(&["rm", "-f", &a, &b]);
}
