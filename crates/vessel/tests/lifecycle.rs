//! Lifecycle commands beyond run/stop: pause, rename, ps filters, prune.

mod common;

use common::{eventually, stderr, Daemon};

#[test]
fn pause_freezes_the_vm_and_unpause_resumes_it() {
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
        "i=0; while true; do echo $i; i=$((i+1)); sleep 0.2; done",
    ]);
    assert!(eventually(30, || d.ok(&["logs", "ticker"]).lines().count() >= 2));
    d.ok(&["pause", "ticker"]);
    assert_eq!(
        d.ok(&[
            "inspect",
            "-f",
            "{{.State.Status}} {{.State.Paused}} {{.State.Running}}",
            "ticker"
        ])
        .trim(),
        "paused true true"
    );
    assert!(d
        .ok(&["ps", "--format", "{{.Status}}"])
        .contains("(Paused)"));
    let frozen = d.ok(&["logs", "ticker"]).lines().count();
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(
        d.ok(&["logs", "ticker"]).lines().count(),
        frozen,
        "a paused VM kept running"
    );
    let out = d.docker(&["pause", "ticker"]);
    assert!(stderr(&out).contains("already paused"), "{}", stderr(&out));
    let out = d.docker(&["exec", "ticker", "true"]);
    assert!(stderr(&out).contains("is paused"), "{}", stderr(&out));
    assert_eq!(
        d.ok(&["ps", "-q", "--filter", "status=paused"])
            .lines()
            .count(),
        1
    );
    d.ok(&["unpause", "ticker"]);
    assert!(
        eventually(20, || d.ok(&["logs", "ticker"]).lines().count()
            > frozen + 2),
        "unpause did not resume"
    );
    let out = d.docker(&["unpause", "ticker"]);
    assert!(stderr(&out).contains("is not paused"), "{}", stderr(&out));
    // Stopping a paused container works.
    d.ok(&["pause", "ticker"]);
    d.ok(&["stop", "ticker"]);
    assert_eq!(
        d.ok(&[
            "inspect",
            "-f",
            "{{.State.Status}} {{.State.Paused}}",
            "ticker"
        ])
        .trim(),
        "exited false"
    );
}

#[test]
fn rename_ps_filters_and_prune() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    d.ok(&[
        "run", "--name", "ok0", "--label", "team=a", "busybox", "true",
    ]);
    let out = d.docker(&[
        "run", "--name", "bad3", "--label", "team=b", "busybox", "sh", "-c", "exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    d.ok(&["create", "--name", "fresh", "busybox", "true"]);
    d.ok(&["run", "-d", "--name", "live", "busybox", "sleep", "1000"]);

    let names = |args: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = d
            .ok(&[&["ps", "--format", "{{.Names}}"], args].concat())
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&[]), vec!["live"]);
    assert_eq!(names(&["-a"]).len(), 4);
    assert_eq!(names(&["--filter", "status=exited"]), vec!["bad3", "ok0"]);
    assert_eq!(names(&["--filter", "exited=3"]), vec!["bad3"]);
    assert_eq!(names(&["--filter", "status=created"]), vec!["fresh"]);
    assert_eq!(names(&["-a", "--filter", "label=team=a"]), vec!["ok0"]);
    assert_eq!(
        names(&["-a", "--filter", "label=team"]),
        vec!["bad3", "ok0"]
    );
    assert_eq!(names(&["-a", "--filter", "name=ok"]), vec!["ok0"]);
    // Name filters are regular expressions, as with dockerd.
    assert_eq!(
        names(&["-a", "--filter", "name=^/?(ok0|live)$"]),
        vec!["live", "ok0"]
    );
    assert_eq!(names(&["-a", "--filter", "name=^/live"]), vec!["live"]);
    assert!(names(&["-a", "--filter", "name=^ok$"]).is_empty());
    assert_eq!(names(&["-a", "--filter", "ancestor=busybox"]).len(), 4);
    assert_eq!(
        names(&["-a", "--filter", "since=bad3"]),
        vec!["fresh", "live"]
    );
    assert_eq!(names(&["-a", "--filter", "before=bad3"]), vec!["ok0"]);
    // -n and -l count containers that are not running, newest first.
    assert_eq!(names(&["-n", "2"]), vec!["fresh", "live"]);
    assert_eq!(names(&["-n", "3"]), vec!["bad3", "fresh", "live"]);
    let out = d.docker(&["ps", "--filter", "nonsense=1"]);
    assert!(stderr(&out).contains("invalid filter"), "{}", stderr(&out));

    d.ok(&["rename", "ok0", "renamed"]);
    assert_eq!(
        d.ok(&["inspect", "-f", "{{.Name}}", "renamed"]).trim(),
        "/renamed"
    );
    let out = d.docker(&["rename", "renamed", "live"]);
    assert!(stderr(&out).contains("already in use"), "{}", stderr(&out));
    let out = d.docker(&["rename", "renamed", "bad name"]);
    assert!(
        stderr(&out).contains("Invalid container name"),
        "{}",
        stderr(&out)
    );

    let out = d.ok(&["container", "prune", "-f"]);
    assert!(out.contains("Deleted Containers"), "{out}");
    assert_eq!(names(&["-a"]), vec!["live"]);
}

#[test]
fn events_history_and_live_stream() {
    let d = Daemon::start();
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs()
        - 1;
    d.load_busybox(&["busybox:latest"]);
    let mut live = d
        .docker_cmd(&[
            "events",
            "--filter",
            "type=container",
            "--filter",
            "event=start",
            "--format",
            "{{.Action}} {{.Actor.Attributes.name}}",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("docker events");
    d.ok(&["run", "--rm", "--name", "evt", "busybox", "true"]);
    let mut buf = [0u8; 64];
    let n =
        std::io::Read::read(live.stdout.as_mut().expect("stdout"), &mut buf).expect("read events");
    assert_eq!(String::from_utf8_lossy(&buf[..n]), "start evt\n");
    let _ = live.kill();
    let _ = live.wait();
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs()
        + 1;
    let out = d.ok(&[
        "events",
        "--since",
        &t0.to_string(),
        "--until",
        &until.to_string(),
        "--format",
        "{{.Type}} {{.Action}} {{.Actor.Attributes.name}}",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.contains(&"image load busybox:latest"), "{out}");
    // The default bridge, joined at start and left after the exit, in
    // dockerd's order.
    let pos = |l: &str| lines.iter().position(|x| *x == l);
    let connect = pos("network connect bridge").expect("network connect");
    let disconnect = pos("network disconnect bridge").expect("network disconnect");
    assert!(
        connect < pos("container start evt").expect("start"),
        "{out}"
    );
    assert!(pos("container die evt").expect("die") < disconnect, "{out}");
    let evt: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.ends_with(" evt"))
        .collect();
    assert_eq!(
        evt,
        vec![
            "container create evt",
            "container attach evt",
            "container start evt",
            "container die evt",
            "container destroy evt"
        ],
        "{out}"
    );
    let out = d.docker(&["events", "--filter", "bogus=1", "--until", "0"]);
    assert!(stderr(&out).contains("invalid filter"), "{}", stderr(&out));
}

#[test]
fn stats_report_what_the_vm_costs() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "busy",
        "-m",
        "256m",
        "--pids-limit",
        "50",
        "busybox",
        "sh",
        "-c",
        "sleep 1000 & sleep 1000 & while true; do :; done",
    ]);
    // Traffic both ways through the container's interface.
    let gateway = d.ok(&["inspect", "-f", "{{.NetworkSettings.Gateway}}", "busy"]);
    d.ok(&[
        "exec",
        "busy",
        "ping",
        "-c",
        "3",
        "-s",
        "1000",
        gateway.trim(),
    ]);
    let out = d.ok(&[
        "stats",
        "--no-stream",
        "--format",
        "{{.Name}}|{{.CPUPerc}}|{{.MemUsage}}|{{.BlockIO}}|{{.NetIO}}|{{.PIDs}}",
    ]);
    let f: Vec<&str> = out.trim().split('|').collect();
    assert_eq!(f[0], "busy", "{out}");
    let cpu: f64 = f[1].trim_end_matches('%').parse().expect("cpu %");
    assert!(cpu > 20.0, "a busy loop should show CPU use: {out}");
    assert!(
        f[2].ends_with("/ 256MiB") && !f[2].starts_with("0B"),
        "{out}"
    );
    // Three pings of 1000 bytes out and back: more than 3 kB each way.
    let net: Vec<&str> = f[4].split(" / ").collect();
    assert_eq!(net.len(), 2, "{out}");
    for side in net {
        assert!(side.ends_with("kB") || side.ends_with("MB"), "{out}");
        let kb: f64 = side
            .trim_end_matches("kB")
            .trim_end_matches("MB")
            .parse()
            .expect("net io");
        assert!(side.ends_with("MB") || kb >= 3.0, "{out}");
    }
    // The shell and its two sleeps.
    assert_eq!(f[5], "3", "{out}");
    let (status, _, body) = d.http("GET", "/containers/busy/stats?stream=0", None);
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).expect("stats json");
    assert_eq!(doc["memory_stats"]["limit"], 256 * 1024 * 1024);
    assert_eq!(doc["pids_stats"]["limit"], 50);
    assert_eq!(doc["pids_stats"]["current"], 3);
    assert!(
        doc["networks"]["eth0"]["rx_packets"].as_u64().unwrap_or(0) >= 3,
        "{body}"
    );
    assert!(
        doc["networks"]["eth0"]["tx_packets"].as_u64().unwrap_or(0) >= 3,
        "{body}"
    );
    assert!(
        doc["memory_stats"]["stats"]["container_usage"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{body}"
    );
    assert!(
        doc["cpu_stats"]["cpu_usage"]["total_usage"]
            .as_u64()
            .unwrap_or(0)
            > doc["precpu_stats"]["cpu_usage"]["total_usage"]
                .as_u64()
                .unwrap_or(0)
    );
    let (status, _, _) = d.http("GET", "/containers/nope/stats?stream=0", None);
    assert_eq!(status, 404);
    d.ok(&["rm", "-f", "busy"]);
}

#[test]
fn json_file_rotation_and_the_none_driver() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    let out = d.ok(&[
        "run",
        "--name",
        "chatty",
        "--log-opt",
        "max-size=2k",
        "--log-opt",
        "max-file=2",
        "busybox",
        "sh",
        "-c",
        "i=1; while [ $i -le 400 ]; do echo line $i; i=$((i+1)); done",
    ]);
    assert_eq!(out.lines().count(), 400, "attach sees everything");
    let logs = d.ok(&["logs", "chatty"]);
    let kept: Vec<&str> = logs.lines().collect();
    assert!(
        kept.len() < 400 && kept.len() > 20,
        "{} lines kept",
        kept.len()
    );
    assert_eq!(kept.last(), Some(&"line 400"));
    let files = std::fs::read_dir(d.data_root().join("containers"))
        .expect("containers dir")
        .flatten()
        .flat_map(|c| {
            std::fs::read_dir(c.path())
                .expect("dir")
                .flatten()
                .collect::<Vec<_>>()
        })
        .filter(|f| f.file_name().to_string_lossy().contains("-json.log"))
        .count();
    assert_eq!(files, 2, "max-file=2 keeps two files");

    assert_eq!(
        d.ok(&[
            "run",
            "--name",
            "quiet",
            "--log-driver",
            "none",
            "busybox",
            "echo",
            "seen"
        ]),
        "seen\n"
    );
    let out = d.docker(&["logs", "quiet"]);
    assert!(
        stderr(&out).contains("does not support reading"),
        "{}",
        stderr(&out)
    );
    let out = d.docker(&["run", "--log-driver", "syslogx", "busybox", "true"]);
    assert!(
        stderr(&out).contains("no log driver named"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn logs_details_show_the_extra_attributes_the_log_options_name() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    d.ok(&[
        "run",
        "--name",
        "tagged",
        "--label",
        "team=web ops",
        "--label",
        "tier=front",
        "-e",
        "REGION=eu",
        "-e",
        "RACK=7",
        "-e",
        "SECRET=x",
        "--log-opt",
        "labels=team,absent",
        "--log-opt",
        "env=REGION",
        "--log-opt",
        "env-regex=^RA",
        "--log-opt",
        "tag={{.Name}}",
        "busybox",
        "sh",
        "-c",
        "echo one; echo two >&2",
    ]);
    let out = d.docker(&["logs", "--details", "tagged"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let prefix = "RACK=7,REGION=eu,tag=tagged,team=web+ops ";
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{prefix}one\n")
    );
    assert_eq!(stderr(&out), format!("{prefix}two\n"));
    // Without --details the lines are as they were written.
    assert_eq!(d.ok(&["logs", "tagged"]), "one\n");
    // Timestamps come first, as with dockerd.
    let line = d.ok(&["logs", "-t", "--details", "tagged"]);
    let (time, rest) = line.split_once(' ').expect("timestamp");
    assert!(time.ends_with('Z') && time.contains('T'), "{line}");
    assert_eq!(rest, format!("{prefix}one\n"));
    // The json-file log carries them as dockerd's driver does.
    let id = d.ok(&["inspect", "-f", "{{.Id}}", "tagged"]);
    let log = std::fs::read_to_string(
        d.data_root()
            .join("containers")
            .join(id.trim())
            .join(format!("{}-json.log", id.trim())),
    )
    .expect("log file");
    assert!(
        log.contains(r#""attrs":{"RACK":"7","REGION":"eu","tag":"tagged","team":"web ops"}"#),
        "{log}"
    );
    // No attributes: dockerd still writes the separating space.
    d.ok(&["run", "--name", "plain", "busybox", "echo", "bare"]);
    assert_eq!(d.ok(&["logs", "--details", "plain"]), " bare\n");
    // A bad regular expression or tag template is refused at create.
    for opt in ["env-regex=(", "tag={{.Nope}}", "labels-regex=["] {
        let out = d.docker(&["create", "--log-opt", opt, "busybox", "true"]);
        assert!(!out.status.success(), "{opt}");
        assert!(
            stderr(&out).contains("Error response from daemon"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn update_changes_what_a_vm_can_change() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    d.ok(&[
        "run", "-d", "--name", "up", "-m", "256m", "busybox", "sleep", "1000",
    ]);
    // A running VM's memory cannot change: a clear error.
    let out = d.docker(&["update", "-m", "300m", "up"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot change the memory or CPUs of running container"),
        "{}",
        stderr(&out)
    );
    // The restart policy can.
    d.ok(&["update", "--restart", "on-failure:3", "up"]);
    assert_eq!(
        d.ok(&[
            "inspect",
            "-f",
            "{{.HostConfig.RestartPolicy.Name}} {{.HostConfig.RestartPolicy.MaximumRetryCount}}",
            "up"
        ])
        .trim(),
        "on-failure 3"
    );
    // So can the PIDs limit, live in the guest: 5 processes, then a fork
    // fails.
    d.ok(&["update", "--pids-limit", "5", "up"]);
    assert_eq!(
        d.ok(&["inspect", "-f", "{{.HostConfig.PidsLimit}}", "up"])
            .trim(),
        "5"
    );
    let out = d.docker(&[
        "exec",
        "up",
        "sh",
        "-c",
        "for i in 1 2 3 4 5 6; do sleep 30 & done; wait",
    ]);
    assert!(!out.status.success(), "a sixth process must not start");
    let out = d.ok(&["stats", "--no-stream", "--format", "{{.PIDs}}", "up"]);
    assert!(out.trim().parse::<u32>().expect("pids") <= 5, "{out}");
    d.ok(&["update", "--pids-limit", "-1", "up"]);
    d.ok(&[
        "exec",
        "up",
        "sh",
        "-c",
        "for i in 1 2 3 4 5 6; do true & done; wait",
    ]);
    // What a VM cannot honour is refused, not ignored.
    let out = d.docker(&["update", "--cpu-shares", "512", "up"]);
    assert!(
        stderr(&out).contains("--cpu-shares cannot be updated"),
        "{}",
        stderr(&out)
    );
    // A stopped container's next VM gets the new shape.
    d.ok(&["stop", "-t", "0", "up"]);
    d.ok(&["update", "-m", "300m", "--memory-swap", "-1", "up"]);
    d.ok(&["start", "up"]);
    let out = d.ok(&["exec", "up", "grep", "MemTotal", "/proc/meminfo"]);
    let kb: u64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("MemTotal");
    assert!((250_000..=307_200).contains(&kb), "{out}");
    d.ok(&["rm", "-f", "up"]);
}

#[test]
fn health_checks_follow_the_test_command() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "hc",
        "--health-cmd",
        "test -f /tmp/ok",
        "--health-interval",
        "1s",
        "--health-retries",
        "2",
        "--health-timeout",
        "10s",
        "busybox",
        "sleep",
        "1000",
    ]);
    let status = || {
        d.ok(&["inspect", "-f", "{{.State.Health.Status}}", "hc"])
            .trim()
            .to_string()
    };
    assert!(eventually(60, || status() == "unhealthy"), "{}", status());
    assert!(d
        .ok(&["ps", "--format", "{{.Status}}"])
        .contains("(unhealthy)"));
    let streak: i64 = d
        .ok(&["inspect", "-f", "{{.State.Health.FailingStreak}}", "hc"])
        .trim()
        .parse()
        .expect("streak");
    assert!(streak >= 2);
    d.ok(&["exec", "hc", "touch", "/tmp/ok"]);
    assert!(eventually(60, || status() == "healthy"), "{}", status());
    assert_eq!(
        d.ok(&["ps", "-q", "--filter", "health=healthy"])
            .lines()
            .count(),
        1
    );
    let log = d.ok(&[
        "inspect",
        "-f",
        "{{range .State.Health.Log}}{{.ExitCode}} {{end}}",
        "hc",
    ]);
    assert!(log.trim().ends_with('0') && log.contains('1'), "{log}");
    let ev = d.ok(&[
        "events",
        "--since",
        "0",
        "--until",
        &(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("t")
            .as_secs()
            + 1)
        .to_string(),
        "--filter",
        "container=hc",
        "--format",
        "{{.Action}}",
    ]);
    assert!(
        ev.contains("health_status: unhealthy") && ev.contains("health_status: healthy"),
        "{ev}"
    );
    // No health check: no health state.
    d.ok(&["run", "-d", "--name", "plain", "busybox", "sleep", "1000"]);
    assert_eq!(
        d.ok(&["inspect", "-f", "{{.State.Health}}", "plain"])
            .trim(),
        "<nil>"
    );
    // A check out of time fails and is killed, not left running.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "slow",
        "--health-cmd",
        "sleep 77",
        "--health-interval",
        "1s",
        "--health-timeout",
        "1s",
        "busybox",
        "sleep",
        "1000",
    ]);
    assert!(
        eventually(60, || {
            d.ok(&["inspect", "-f", "{{len .State.Health.Log}}", "slow"])
                .trim()
                .parse::<u32>()
                .unwrap_or(0)
                >= 2
        }),
        "two checks ran"
    );
    let log = d.ok(&["inspect", "-f", "{{json .State.Health.Log}}", "slow"]);
    assert!(log.contains("Health check exceeded timeout"), "{log}");
    let top = d.ok(&["top", "slow"]);
    assert!(
        top.matches("sleep 77").count() <= 1,
        "checks out of time are killed: {top}"
    );
    d.ok(&["rm", "-f", "hc", "plain", "slow"]);
}

#[test]
fn top_lists_the_processes_in_the_vm() {
    let d = Daemon::start_with(&["--warm-vms", "0"]);
    d.load_busybox(&["busybox:latest"]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "tp",
        "busybox",
        "sh",
        "-c",
        "sleep 1000; true",
    ]);
    d.ok(&["exec", "-d", "-u", "nobody", "tp", "sleep", "2000"]);
    assert!(common::eventually(20, || d
        .ok(&["top", "tp"])
        .contains("sleep 2000")));
    let out = d.ok(&["top", "tp"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("UID"), "{out}");
    assert!(
        lines[0].contains("PID") && lines[0].ends_with("CMD"),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("root") && l.ends_with("sh -c sleep 1000; true")),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("nobody") && l.ends_with("sleep 2000")),
        "{out}"
    );
    // Nothing of the agent or the kernel.
    assert!(!out.contains("/init") && !out.contains("kthreadd"), "{out}");
    // `ps aux` columns on request; other ps arguments are refused.
    let aux = d.ok(&["top", "tp", "aux"]);
    let mut aux_lines = aux.lines();
    let head: Vec<&str> = aux_lines.next().unwrap_or("").split_whitespace().collect();
    assert_eq!(
        head,
        ["USER", "PID", "%CPU", "%MEM", "VSZ", "RSS", "TTY", "STAT", "START", "TIME", "COMMAND"],
        "{aux}"
    );
    let sleeper = aux
        .lines()
        .find(|l| l.ends_with("sleep 2000"))
        .unwrap_or_else(|| panic!("{aux}"));
    let cols: Vec<&str> = sleeper.split_whitespace().collect();
    assert_eq!(cols[0], "nobody", "{aux}");
    assert!(cols[5].parse::<u64>().expect("RSS") > 0, "{aux}");
    assert_eq!(cols[7], "S", "a sleeping process: {aux}");
    let out = d.docker(&["top", "tp", "-o", "pid"]);
    assert!(
        common::stderr(&out).contains("is not supported"),
        "{}",
        common::stderr(&out)
    );
    d.ok(&["kill", "tp"]);
    d.ok(&["wait", "tp"]);
    let out = d.docker(&["top", "tp"]);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("is not running"),
        "{}",
        common::stderr(&out)
    );
}

#[test]
fn read_only_tmpfs_and_sysctl_apply_inside_the_vm() {
    let d = Daemon::start_with(&["--warm-vms", "0"]);
    d.load_busybox(&["busybox:latest"]);
    let out = d.docker(&["run", "--rm", "--read-only", "busybox", "touch", "/x"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Read-only file system"),
        "{}",
        stderr(&out)
    );
    let out = d.ok(&[
        "run",
        "--rm",
        "--read-only",
        "--tmpfs",
        "/scratch:size=8m,mode=0770",
        "--sysctl",
        "net.core.somaxconn=1234",
        "busybox",
        "sh",
        "-c",
        "touch /scratch/ok && echo wrote; grep ' /scratch ' /proc/mounts; cat /proc/sys/net/core/somaxconn",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "wrote", "{out}");
    assert!(
        lines[1].starts_with("tmpfs /scratch tmpfs rw,nosuid,nodev,noexec"),
        "{out}"
    );
    assert!(
        lines[1].contains("size=8192k") && lines[1].contains("mode=770"),
        "{out}"
    );
    assert_eq!(lines[2], "1234", "{out}");
    // Docker's answer to a relative tmpfs path.
    let out = d.docker(&["run", "--rm", "--tmpfs", "scratch", "busybox", "true"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("must be absolute"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn lifecycle_events_prune_filters_and_bad_stop_signals() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    let bad = d.docker(&["create", "--stop-signal", "FOO", "busybox", "true"]);
    assert!(
        stderr(&bad).contains("Invalid signal: FOO"),
        "{}",
        stderr(&bad)
    );
    assert_eq!(d.ok(&["ps", "-aq"]).trim(), "", "nothing half-made");

    let t0 = common::unix_now().to_string();
    d.ok(&["run", "-d", "--name", "ev", "busybox", "sleep", "1000"]);
    let _ = d.docker(&["exec", "ev", "sh", "-c", "exit 3"]);
    d.ok(&["restart", "-t", "1", "ev"]);
    let t1 = (common::unix_now() + 1).to_string();
    let events = d.ok(&[
        "events",
        "--since",
        &t0,
        "--until",
        &t1,
        "--filter",
        "container=ev",
        "--filter",
        "image=busybox",
        "--format",
        "{{.Action}}|{{index .Actor.Attributes \"exitCode\"}}",
    ]);
    for want in [
        "exec_create: sh -c exit 3|",
        "exec_start: sh -c exit 3|",
        "exec_die|3",
        "kill|",
        "die|",
        "stop|",
        "start|",
        "restart|",
    ] {
        assert!(
            events.lines().any(|l| l.starts_with(want)),
            "{want}: {events}"
        );
    }

    // container prune: label!, label and until filters.
    d.ok(&["rm", "-f", "ev"]);
    d.ok(&[
        "create", "--name", "keep", "--label", "keep=1", "busybox", "true",
    ]);
    d.ok(&["create", "--name", "drop", "busybox", "true"]);
    let out = d.ok(&["container", "prune", "-f", "--filter", "until=1h"]);
    assert!(!out.contains(
        &d.ok(&["inspect", "-f", "{{.Id}}", "drop"])
            .trim()
            .to_string()
    ));
    let drop_id = d.ok(&["inspect", "-f", "{{.Id}}", "drop"]);
    let out = d.ok(&["container", "prune", "-f", "--filter", "label!=keep=1"]);
    assert!(out.contains(drop_id.trim()), "{out}");
    let left = d.ok(&["ps", "-a", "--format", "{{.Names}}"]);
    assert_eq!(left.trim(), "keep");
    let out = d.ok(&["container", "prune", "-f", "--filter", "label=keep"]);
    assert!(!out.is_empty());
    assert_eq!(d.ok(&["ps", "-aq"]).trim(), "");
    let bad = d.docker(&["container", "prune", "-f", "--filter", "bogus=1"]);
    assert!(
        stderr(&bad).contains("invalid filter 'bogus'"),
        "{}",
        stderr(&bad)
    );
}
