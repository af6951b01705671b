//! Many containers and execs at once: 20 containers started and stopped
//! concurrently, 200 execs, and nothing left behind (no VM process, run
//! directory, container directory or mount).

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
}
