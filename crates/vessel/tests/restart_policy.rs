//! Restart policies: `on-failure[:N]`, `always`, `unless-stopped`, also
//! across a daemon restart.

mod common;

use common::{eventually, Daemon};

#[test]
fn restart_policies() {
    let mut d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    // on-failure:2 runs once and is restarted twice.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "flaky",
        "--restart",
        "on-failure:2",
        "busybox",
        "sh",
        "-c",
        "echo run; exit 1",
    ]);
    assert!(
        eventually(90, || d
            .ok(&[
                "inspect",
                "-f",
                "{{.RestartCount}} {{.State.Status}}",
                "flaky"
            ])
            .trim()
            == "2 exited"),
        "{}",
        d.log()
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(
        d.ok(&[
            "inspect",
            "-f",
            "{{.RestartCount}} {{.State.ExitCode}}",
            "flaky"
        ])
        .trim(),
        "2 1"
    );
    assert_eq!(d.ok(&["logs", "flaky"]), "run\nrun\nrun\n");
    // on-failure does not restart a success.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "fine",
        "--restart",
        "on-failure",
        "busybox",
        "true",
    ]);
    // always restarts until the user stops it.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "forever",
        "--restart",
        "always",
        "busybox",
        "sh",
        "-c",
        "sleep 0.5",
    ]);
    assert!(eventually(60, || {
        d.ok(&["inspect", "-f", "{{.RestartCount}}", "forever"])
            .trim()
            .parse::<i64>()
            .unwrap_or(0)
            >= 2
    }));
    d.ok(&["stop", "forever"]);
    // unless-stopped, stopped by the user.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "manual",
        "--restart",
        "unless-stopped",
        "busybox",
        "sleep",
        "1000",
    ]);
    d.ok(&["stop", "-t", "0", "manual"]);
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(
        d.ok(&["inspect", "-f", "{{.State.Status}}", "forever"])
            .trim(),
        "exited",
        "{}",
        d.log()
    );
    assert_eq!(
        d.ok(&[
            "inspect",
            "-f",
            "{{.State.Status}} {{.RestartCount}}",
            "fine"
        ])
        .trim(),
        "exited 0"
    );

    // At daemon start, `always` comes back even after a manual stop;
    // `unless-stopped` does not.
    d.kill9();
    d.restart();
    assert!(
        eventually(60, || d
            .ok(&["inspect", "-f", "{{.State.Status}}", "forever"])
            .trim()
            == "running"),
        "{}",
        d.log()
    );
    assert_eq!(
        d.ok(&["inspect", "-f", "{{.State.Status}}", "manual"])
            .trim(),
        "exited"
    );
    d.ok(&["rm", "-f", "forever"]);

    // Bad policies are refused.
    let (status, _, body) = d.http(
        "POST",
        "/containers/create",
        Some(r#"{"Image":"busybox","Cmd":["true"],"HostConfig":{"RestartPolicy":{"Name":"always","MaximumRetryCount":3}}}"#),
    );
    assert_eq!(status, 400, "{body}");
    let (status, _, body) = d.http(
        "POST",
        "/containers/create",
        Some(r#"{"Image":"busybox","Cmd":["true"],"HostConfig":{"AutoRemove":true,"RestartPolicy":{"Name":"always"}}}"#),
    );
    assert_eq!(status, 400, "{body}");
}
