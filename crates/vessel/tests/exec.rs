//! `docker exec`: extra processes in a running container's VM.

mod common;

use common::{eventually, stderr, stdout, Daemon};

#[test]
fn exec_runs_processes_in_a_running_container() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "box",
        "-e",
        "FROM_RUN=1",
        "-w",
        "/home",
        "busybox",
        "sleep",
        "100000",
    ]);

    assert_eq!(d.ok(&["exec", "box", "echo", "hi"]), "hi\n");
    let out = d.docker(&["exec", "box", "sh", "-c", "echo o; echo e >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(stdout(&out), "o\n");
    assert_eq!(stderr(&out), "e\n");
    // The container's environment and working directory, overridable.
    assert_eq!(
        d.ok(&["exec", "box", "sh", "-c", "echo $FROM_RUN; pwd; id -u"]),
        "1\n/home\n0\n"
    );
    let out = d.ok(&[
        "exec",
        "-e",
        "FROM_RUN=2",
        "-e",
        "X=y",
        "-w",
        "/tmp",
        "-u",
        "nobody",
        "box",
        "sh",
        "-c",
        "echo $FROM_RUN $X; pwd; id -un",
    ]);
    assert_eq!(out, "2 y\n/tmp\nnobody\n");
    // Same root filesystem as the main process; the main process still runs.
    d.ok(&["exec", "box", "sh", "-c", "echo shared > /tmp/f"]);
    assert_eq!(d.ok(&["exec", "box", "cat", "/tmp/f"]), "shared\n");
    assert!(d.ok(&["exec", "box", "ps"]).contains("sleep 100000"));
    // stdin.
    let out = d.docker_in(
        &["exec", "-i", "box", "sh", "-c", "cat; echo done"],
        b"piped\n",
    );
    assert_eq!(stdout(&out), "piped\ndone\n", "{}", stderr(&out));
    // A TTY.
    let out = d.ok(&["exec", "-t", "box", "sh", "-c", "tty"]);
    assert!(out.starts_with("/dev/pts/"), "{out}");
    // Detached.
    d.ok(&[
        "exec",
        "-d",
        "box",
        "sh",
        "-c",
        "sleep 1; echo later > /tmp/d",
    ]);
    assert!(eventually(20, || d
        .docker(&["exec", "box", "cat", "/tmp/d"])
        .stdout
        == b"later\n"));
    // Unknown command: Docker's message and a failing exit code.
    let out = d.docker(&["exec", "box", "no-such-cmd"]);
    assert!(!out.status.success());
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(all.contains("executable file not found"), "{all}");
    // Several at once.
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let mut c =
                d.docker_cmd(&["exec", "box", "sh", "-c", &format!("sleep 0.5; echo n{i}")]);
            c.stdout(std::process::Stdio::piped());
            c.spawn().expect("spawn exec")
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let out = h.wait_with_output().expect("exec output");
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("n{i}\n"));
    }
    // The container is unaffected.
    assert!(d
        .ok(&["ps", "--format", "{{.Names}} {{.State}}"])
        .contains("box running"));
}

#[test]
fn exec_inspect_and_bad_input() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    d.ok(&["run", "-d", "--name", "box", "busybox", "sleep", "100000"]);
    let (status, _, body) = d.http(
        "POST",
        "/containers/box/exec",
        Some(r#"{"Cmd":["sh","-c","exit 3"],"AttachStdout":true}"#),
    );
    assert_eq!(status, 201, "{body}");
    let id: serde_json::Value = serde_json::from_str(&body).expect("json");
    let id = id["Id"].as_str().expect("id").to_string();
    let (status, _, body) = d.http("GET", &format!("/exec/{id}/json"), None);
    assert_eq!(status, 200);
    assert!(
        body.contains("\"Running\":false") && !body.contains("\"ExitCode\":3"),
        "{body}"
    );
    let (status, _, _) = d.http(
        "POST",
        &format!("/exec/{id}/start"),
        Some(r#"{"Detach":true}"#),
    );
    assert_eq!(status, 200);
    assert!(eventually(20, || d
        .http("GET", &format!("/exec/{id}/json"), None)
        .2
        .contains("\"ExitCode\":3")));
    let (status, _, body) = d.http(
        "POST",
        &format!("/exec/{id}/start"),
        Some(r#"{"Detach":true}"#),
    );
    assert_eq!(status, 409, "{body}");
    let (status, _, body) = d.http("GET", "/exec/nope/json", None);
    assert_eq!(status, 404);
    assert!(body.contains("No such exec instance"), "{body}");
    let (status, _, body) = d.http("POST", "/containers/box/exec", Some(r#"{"Cmd":[]}"#));
    assert_eq!(status, 400, "{body}");
    d.ok(&["stop", "-t", "0", "box"]);
    let out = d.docker(&["exec", "box", "true"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is not running"), "{}", stderr(&out));
    let (status, _, _) = d.http("POST", "/containers/box/exec", Some(r#"{"Cmd":["true"]}"#));
    assert_eq!(status, 409);
}
