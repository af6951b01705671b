//! The daemon's configuration file (dockerd's `daemon.json` keys), as a user
//! sees it: what `docker info` reports, and the refusals at start.

mod common;

use std::process::Command;

use common::{write, Daemon};

/// Starts `vessel daemon` with `args` and expects it to refuse to start;
/// returns what it printed.
fn refused(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vessel"))
        .arg("daemon")
        .args(args)
        .output()
        .expect("run vessel");
    assert!(!out.status.success(), "the daemon must refuse {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn registry_settings_from_the_file_show_in_docker_info() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "daemon.json",
        br#"{"registry-mirrors": ["http://127.0.0.1:5999"],
             "insecure-registries": ["10.99.0.0/16", "myreg.test:5000"]}"#,
    );
    let d = Daemon::start_with(&["--config-file", &file.display().to_string()]);
    let rc = d.ok(&["info", "--format", "{{json .RegistryConfig}}"]);
    let rc: serde_json::Value = serde_json::from_str(&rc).expect("json");
    assert_eq!(rc["Mirrors"], serde_json::json!(["http://127.0.0.1:5999"]));
    let cidrs = rc["InsecureRegistryCIDRs"].to_string();
    assert!(
        cidrs.contains("10.99.0.0/16") && cidrs.contains("127.0.0.0/8"),
        "{cidrs}"
    );
    assert_eq!(rc["IndexConfigs"]["myreg.test:5000"]["Secure"], false);
    assert_eq!(
        rc["IndexConfigs"]["docker.io"]["Mirrors"],
        serde_json::json!(["http://127.0.0.1:5999"])
    );
    let info = d.ok(&["info"]);
    assert!(info.contains("Registry Mirrors:"), "{info}");
    assert!(info.contains("myreg.test:5000"), "{info}");
}

#[test]
fn a_bad_configuration_file_stops_the_daemon_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = format!("unix://{}", dir.path().join("d.sock").display());
    let unknown = write(dir.path(), "unknown.json", br#"{"bogus-option": true}"#);
    let out = refused(&["-H", &sock, "--config-file", &unknown.display().to_string()]);
    assert!(
        out.contains("unable to configure the daemon") && out.contains("bogus-option"),
        "{out}"
    );
    let twice = write(dir.path(), "twice.json", br#"{"data-root": "/tmp/x"}"#);
    let out = refused(&[
        "-H",
        &sock,
        "--config-file",
        &twice.display().to_string(),
        "--data-root",
        &dir.path().join("data").display().to_string(),
    ]);
    assert!(
        out.contains("specified both as a flag and in the configuration file: data-root"),
        "{out}"
    );
    let missing = dir.path().join("missing.json");
    let out = refused(&["-H", &sock, "--config-file", &missing.display().to_string()]);
    assert!(out.contains("missing.json"), "{out}");
    assert!(!dir.path().join("data").exists(), "nothing made");
}
