//! Many containers and execs at once: 20 containers started and stopped
//! concurrently, 200 execs, and nothing left behind (no VM process, run
//! directory, container directory, mount or tap).

mod common;

use std::process::Command;

use common::Daemon;

fn vm_processes(d: &Daemon) -> usize {
    let out = Command::new("pgrep")
        .args(["-f", &format!("qemu-system.*{}", d.data_root().display())])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// Host taps marked as this daemon's.
fn taps(d: &Daemon) -> Vec<String> {
    let mark = format!("vessel-tap:{}", d.bridge_name());
    std::fs::read_dir("/sys/class/net")
        .expect("/sys/class/net")
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("ifalias")).is_ok_and(|a| a.trim() == mark)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn twenty_containers_and_two_hundred_execs_leave_nothing_behind() {
    // No warm VMs: every VM process that runs belongs to a container.
    let d = Daemon::start_with(&["--warm-vms", "0"]);
    d.load_busybox(&["busybox:latest"]);
    d.ok(&["run", "--rm", "busybox", "true"]);

    let names: Vec<String> = (0..20).map(|i| format!("s{i:02}")).collect();
    std::thread::scope(|s| {
        for n in &names {
            let d = &d;
            s.spawn(move || {
                d.ok(&["run", "-d", "--name", n, "busybox", "sleep", "100000"]);
            });
        }
    });
    let running = d.ok(&["ps", "-q"]);
    assert_eq!(running.lines().count(), 20, "{running}");
    // Three network slots per VM, each a tap of this daemon's.
    assert_eq!(taps(&d).len(), 60, "{:?}", taps(&d));

    // 200 execs, ten at a time, each with its own output and exit code.
    std::thread::scope(|s| {
        for t in 0..10 {
            let d = &d;
            let names = &names;
            s.spawn(move || {
                for i in 0..20 {
                    let n = &names[(t * 20 + i) % names.len()];
                    let code = (t * 20 + i) % 7;
                    let out =
                        d.docker(&["exec", n, "sh", "-c", &format!("echo {n}-{i}; exit {code}")]);
                    assert_eq!(out.status.code(), Some(code as i32), "exec in {n}");
                    assert_eq!(common::stdout(&out).trim(), format!("{n}-{i}"));
                }
            });
        }
    });

    std::thread::scope(|s| {
        for chunk in names.chunks(5) {
            let d = &d;
            s.spawn(move || {
                let mut args = vec!["stop", "-t", "1"];
                args.extend(chunk.iter().map(String::as_str));
                d.ok(&args);
            });
        }
    });
    assert!(d.ok(&["ps", "-q"]).trim().is_empty());
    assert!(
        common::eventually(20, || vm_processes(&d) == 0),
        "VMs left after stop"
    );
    let mut args = vec!["rm"];
    args.extend(names.iter().map(String::as_str));
    d.ok(&args);

    assert!(d.ok(&["ps", "-aq"]).trim().is_empty());
    let left = |dir: &str| -> Vec<String> {
        std::fs::read_dir(d.data_root().join(dir))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(left("containers").is_empty(), "{:?}", left("containers"));
    assert!(
        left("vm").iter().all(|n| n.starts_with("t-")),
        "run directories left: {:?}",
        left("vm")
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let root = d.data_root().display().to_string();
    assert!(!mounts.contains(&root), "mounts left under the data root");
    assert_eq!(vm_processes(&d), 0);
    assert!(
        common::eventually(20, || taps(&d).is_empty()),
        "taps left: {:?}",
        taps(&d)
    );
}

#[test]
fn taps_of_vms_that_die_while_the_daemon_is_down_go_at_its_next_start() {
    let mut d = Daemon::start_with(&["--warm-vms", "0"]);
    d.load_busybox(&["busybox:latest"]);
    d.ok(&["run", "-d", "--name", "stays", "busybox", "sleep", "100000"]);
    d.ok(&["run", "-d", "--name", "dies", "busybox", "sleep", "100000"]);
    let pid_of = |d: &Daemon, n: &str| -> i32 {
        d.ok(&["inspect", "-f", "{{.State.Pid}}", n])
            .trim()
            .parse()
            .expect("pid")
    };
    let dies = pid_of(&d, "dies");
    assert_eq!(taps(&d).len(), 6, "{:?}", taps(&d));

    d.kill9();
    // SAFETY: kill(2) of the VM process whose pid the daemon reported.
    unsafe {
        libc::kill(dies, libc::SIGKILL);
    }
    assert!(common::eventually(10, || !std::path::Path::new(&format!(
        "/proc/{dies}"
    ))
    .exists()
        || std::fs::read_to_string(format!("/proc/{dies}/stat"))
            .is_ok_and(|s| s.contains(") Z "))));
    // Persistent taps outlive their VM while no daemon is there to delete them.
    assert_eq!(taps(&d).len(), 6, "{:?}", taps(&d));

    d.restart();
    assert_eq!(
        d.ok(&["inspect", "-f", "{{.State.Running}}", "stays"])
            .trim(),
        "true"
    );
    assert_eq!(taps(&d).len(), 3, "{:?}", taps(&d));
    // The surviving VM's taps are still its: its network works.
    d.ok(&["exec", "stays", "ping", "-c", "1", "-W", "5", &gateway(&d)]);
    d.ok(&["rm", "-f", "stays", "dies"]);
    assert!(
        common::eventually(20, || taps(&d).is_empty()),
        "taps left: {:?}",
        taps(&d)
    );
}

/// The default bridge network's gateway.
fn gateway(d: &Daemon) -> String {
    d.ok(&[
        "network",
        "inspect",
        "-f",
        "{{(index .IPAM.Config 0).Gateway}}",
        "bridge",
    ])
    .trim()
    .to_string()
}
