//! Resource flags as Docker's CLI sets them, on a VM: `--memory` and the
//! OOM killer, `--memory-swap`, `--cpuset-cpus` with `--cpus`.

mod common;

use common::{stderr, Daemon};

fn inspect(d: &Daemon, container: &str, format: &str) -> String {
    d.ok(&["inspect", "-f", format, container])
        .trim()
        .to_string()
}

#[test]
fn a_process_beyond_its_memory_is_oom_killed() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    // `tail` keeps the unending line it reads in memory.
    let out = d.docker(&[
        "run",
        "--name",
        "hog",
        "-m",
        "64m",
        "busybox",
        "tail",
        "/dev/zero",
    ]);
    assert_eq!(out.status.code(), Some(137), "{}", stderr(&out));
    assert_eq!(
        inspect(
            &d,
            "hog",
            "{{.State.OOMKilled}} {{.State.ExitCode}} {{.State.Status}}"
        ),
        "true 137 exited"
    );
    // A process that stays within its memory is not reported as OOM-killed.
    d.ok(&["run", "--name", "fits", "-m", "64m", "busybox", "true"]);
    assert_eq!(
        inspect(&d, "fits", "{{.State.OOMKilled}} {{.State.ExitCode}}"),
        "false 0"
    );
}
