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
    // `docker events` has the kill before the exit, as with dockerd.
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs()
        + 1;
    let events = d.ok(&[
        "events",
        "--since",
        "0",
        "--until",
        &until.to_string(),
        "--filter",
        "container=hog",
        "--format",
        "{{.Action}}",
    ]);
    let actions: Vec<&str> = events
        .lines()
        .filter(|a| ["oom", "die"].contains(a))
        .collect();
    assert_eq!(actions, ["oom", "die"], "{events}");
    // As with Docker, the kill of any process of the container counts,
    // also when the main process lives on.
    let out = d.ok(&[
        "run",
        "--name",
        "parent",
        "-m",
        "64m",
        "busybox",
        "sh",
        "-c",
        "tail /dev/zero; echo tail ended $?",
    ]);
    assert_eq!(out, "tail ended 137\n");
    assert_eq!(
        inspect(&d, "parent", "{{.State.OOMKilled}} {{.State.ExitCode}}"),
        "true 0"
    );
    // A process that stays within its memory is not reported as OOM-killed.
    d.ok(&["run", "--name", "fits", "-m", "64m", "busybox", "true"]);
    assert_eq!(
        inspect(&d, "fits", "{{.State.OOMKilled}} {{.State.ExitCode}}"),
        "false 0"
    );
}

#[test]
fn memory_swap_is_checked_and_recorded_as_dockerd_does() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    let mib = 1024 * 1024;
    // A memory limit alone allows as much swap again.
    d.ok(&["create", "--name", "mem", "-m", "96m", "busybox", "true"]);
    assert_eq!(
        inspect(
            &d,
            "mem",
            "{{.HostConfig.Memory}} {{.HostConfig.MemorySwap}}"
        ),
        format!("{} {}", 96 * mib, 192 * mib)
    );
    d.ok(&[
        "create",
        "--name",
        "same",
        "-m",
        "96m",
        "--memory-swap",
        "96m",
        "busybox",
        "true",
    ]);
    assert_eq!(
        inspect(&d, "same", "{{.HostConfig.MemorySwap}}"),
        (96 * mib).to_string()
    );
    d.ok(&[
        "create",
        "--name",
        "unl",
        "-m",
        "96m",
        "--memory-swap",
        "-1",
        "busybox",
        "true",
    ]);
    assert_eq!(inspect(&d, "unl", "{{.HostConfig.MemorySwap}}"), "-1");
    for (args, message) in [
        (
            vec!["-m", "96m", "--memory-swap", "64m"],
            "Minimum memoryswap limit should be larger than memory limit, see usage",
        ),
        (
            vec!["--memory-swap", "128m"],
            "You should always set the Memory limit when using Memoryswap limit, see usage",
        ),
    ] {
        let mut a = vec!["create"];
        a.extend(args);
        a.extend(["busybox", "true"]);
        let out = d.docker(&a);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains(&format!("Error response from daemon: {message}")),
            "{}",
            stderr(&out)
        );
    }
    // The guest has no swap: the VM's memory is all there is.
    let out = d.ok(&[
        "run",
        "--rm",
        "-m",
        "96m",
        "--memory-swap",
        "192m",
        "busybox",
        "grep",
        "SwapTotal",
        "/proc/meminfo",
    ]);
    assert!(out.split_whitespace().nth(1) == Some("0"), "{out}");
    // docker update: memory above the swap limit needs a new swap limit.
    let out = d.docker(&["update", "-m", "256m", "mem"]);
    assert!(
        stderr(&out).contains("Memory limit should be smaller than already set memoryswap limit, update the memoryswap at the same time"),
        "{}",
        stderr(&out)
    );
    let out = d.docker(&["update", "-m", "256m", "--memory-swap", "128m", "mem"]);
    assert!(
        stderr(&out).contains("Minimum memoryswap limit should be larger than memory limit"),
        "{}",
        stderr(&out)
    );
    d.ok(&["update", "-m", "256m", "--memory-swap", "512m", "mem"]);
    assert_eq!(
        inspect(
            &d,
            "mem",
            "{{.HostConfig.Memory}} {{.HostConfig.MemorySwap}}"
        ),
        format!("{} {}", 256 * mib, 512 * mib)
    );
    // dockerd's statuses: a conflict with the recorded swap limit is a 409,
    // a bad pair of values a 400.
    let (status, _, body) = d.http(
        "POST",
        "/v1.50/containers/mem/update",
        Some(r#"{"Memory":1073741824}"#),
    );
    assert_eq!(status, 409, "{body}");
    let (status, _, body) = d.http(
        "POST",
        "/v1.50/containers/mem/update",
        Some(r#"{"Memory":1073741824,"MemorySwap":536870912}"#),
    );
    assert_eq!(status, 400, "{body}");
    // The swap limit of a running container can change (its VM does not).
    d.ok(&[
        "run", "-d", "--name", "run1", "-m", "96m", "busybox", "sleep", "1000",
    ]);
    d.ok(&["update", "--memory-swap", "-1", "run1"]);
    assert_eq!(inspect(&d, "run1", "{{.HostConfig.MemorySwap}}"), "-1");
    d.ok(&["rm", "-f", "run1"]);
}

/// The host CPUs a process may run on (`Cpus_allowed_list`).
fn allowed_cpus(pid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// Every thread of process `pid` is allowed exactly `cpus`.
fn threads_allowed(pid: &str) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
        .map(|t| allowed_cpus(&format!("{pid}/task/{}", t.file_name().to_string_lossy())))
        .collect()
}

#[test]
fn cpuset_cpus_gives_that_many_vcpus_pinned_to_those_cpus() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    let host: Vec<usize> = {
        let all = allowed_cpus("self");
        // e.g. "0-1" or "0,2-3"
        all.split(',')
            .flat_map(|p| match p.split_once('-') {
                Some((a, b)) => {
                    (a.parse::<usize>().expect("cpu")..=b.parse::<usize>().expect("cpu")).collect()
                }
                None => vec![p.parse::<usize>().expect("cpu")],
            })
            .collect()
    };
    let last = host.last().expect("a CPU").to_string();
    d.ok(&[
        "run",
        "-d",
        "--name",
        "pinned",
        "--cpuset-cpus",
        &last,
        "busybox",
        "sleep",
        "1000",
    ]);
    assert_eq!(inspect(&d, "pinned", "{{.HostConfig.CpusetCpus}}"), last);
    assert_eq!(d.ok(&["exec", "pinned", "nproc"]).trim(), "1");
    let pid = inspect(&d, "pinned", "{{.State.Pid}}");
    let threads = threads_allowed(&pid);
    assert!(threads.len() > 1, "{threads:?}");
    assert!(threads.iter().all(|t| *t == last), "{threads:?}");
    d.ok(&["rm", "-f", "pinned"]);

    if host.len() >= 2 {
        let two = format!("{},{}", host[0], host[1]);
        let out = d.ok(&["run", "--rm", "--cpuset-cpus", &two, "busybox", "nproc"]);
        assert_eq!(out.trim(), "2");
        // With --cpus as well, the smaller of the two.
        let out = d.ok(&[
            "run",
            "--rm",
            "--cpuset-cpus",
            &two,
            "--cpus",
            "1",
            "busybox",
            "nproc",
        ]);
        assert_eq!(out.trim(), "1");
        // A running VM is pinned again when its CPU set keeps its size.
        d.ok(&[
            "run",
            "-d",
            "--name",
            "moved",
            "--cpuset-cpus",
            &host[0].to_string(),
            "busybox",
            "sleep",
            "1000",
        ]);
        d.ok(&["update", "--cpuset-cpus", &host[1].to_string(), "moved"]);
        let pid = inspect(&d, "moved", "{{.State.Pid}}");
        assert!(
            threads_allowed(&pid)
                .iter()
                .all(|t| *t == host[1].to_string()),
            "{:?}",
            threads_allowed(&pid)
        );
        let out = d.docker(&["update", "--cpuset-cpus", &two, "moved"]);
        assert!(
            stderr(&out).contains("cannot change the memory or CPUs of running container"),
            "{}",
            stderr(&out)
        );
        d.ok(&["rm", "-f", "moved"]);
    }

    let available = allowed_cpus("self");
    let missing = (host.last().expect("a CPU") + 3).to_string();
    for (spec, message) in [
        (
            missing.clone(),
            format!(
                "Requested CPUs are not available - requested {missing}, available: {available}"
            ),
        ),
        (
            "1-a".to_string(),
            "Invalid value 1-a for cpuset cpus: invalid format: 1-a".to_string(),
        ),
    ] {
        let out = d.docker(&["run", "--rm", "--cpuset-cpus", &spec, "busybox", "true"]);
        assert_eq!(out.status.code(), Some(125));
        assert!(
            stderr(&out).contains(&format!("Error response from daemon: {message}")),
            "{}",
            stderr(&out)
        );
    }
    // The HTTP status is dockerd's 400.
    let (status, _, body) = d.http(
        "POST",
        "/v1.50/containers/create",
        Some(r#"{"Image":"busybox","Cmd":["true"],"HostConfig":{"CpusetCpus":"1-a"}}"#),
    );
    assert_eq!(status, 400, "{body}");
}
