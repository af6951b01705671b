//! The container process's environment and the lookup of its executable.
//!
//! Pure logic over a root directory (read-only file system access, no
//! mounts), unit-tested on the host against temporary directories.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::rootfs::resolve_in_root;

/// Why the process could not be started, as Docker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartError {
    /// Docker-style message, e.g. `exec: "foo": executable file not found in $PATH`.
    pub message: String,
    /// The exit code Docker records (126, 127 or 1).
    pub exit_code: i32,
}

impl StartError {
    /// A start error with exit code 1 (failures that are not about the command).
    pub fn other(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            exit_code: 1,
        }
    }
}

/// Builds the environment of the container process, Docker style: `PATH`
/// (Docker's default), `HOSTNAME` and, with a TTY, `TERM=xterm` come first
/// and are overridden by `spec_env`; `HOME` is added last when absent.
/// A later `KEY=VALUE` replaces an earlier one in place; a bare `KEY`
/// removes the variable.
pub fn build_env(
    spec_env: &[String],
    hostname: &str,
    home: &str,
    tty: bool,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> =
        vec![("PATH".into(), vessel_protocol::DEFAULT_PATH.into())];
    if !hostname.is_empty() {
        env.push(("HOSTNAME".into(), hostname.into()));
    }
    if tty {
        env.push(("TERM".into(), "xterm".into()));
    }
    for entry in spec_env {
        match entry.split_once('=') {
            Some((key, value)) if !key.is_empty() => {
                if let Some(slot) = env.iter_mut().find(|(k, _)| k == key) {
                    slot.1 = value.to_string();
                } else {
                    env.push((key.to_string(), value.to_string()));
                }
            }
            Some(_) => {}
            None => env.retain(|(k, _)| k != entry),
        }
    }
    if !env.iter().any(|(k, _)| k == "HOME") {
        env.push(("HOME".into(), home.into()));
    }
    env
}

/// The value of `key` in an environment built by [`build_env`].
pub fn env_value<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// What a path inside the container is, for the purpose of executing it.
enum Exec {
    Ok,
    Missing,
    Denied,
}

/// Stats the container path `path` (relative paths are relative to `cwd`).
fn probe(root: &Path, cwd: &str, path: &str) -> Exec {
    let in_container = if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        Path::new(cwd).join(path)
    };
    let Ok(host) = resolve_in_root(root, &in_container) else {
        return Exec::Denied;
    };
    match std::fs::metadata(&host) {
        Ok(m) if m.is_dir() => Exec::Denied,
        Ok(m) if m.permissions().mode() & 0o111 != 0 => Exec::Ok,
        Ok(_) => Exec::Denied,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Exec::Missing,
        // ENOTDIR: a path component is a regular file.
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Exec::Missing,
        Err(_) => Exec::Denied,
    }
}

/// Finds the program for `args[0]` inside the root filesystem at `root`,
/// as runc does (Go's `exec.LookPath` run in the container): a name with a
/// `/` is used as is; any other name is searched in each directory of the
/// container's `PATH` (an empty entry means the working directory), skipping
/// candidates that are not executable files.
///
/// Returns the path to exec *inside the container* (after `chroot`).
pub fn lookup(root: &Path, cwd: &str, path_env: &str, name: &str) -> Result<String, StartError> {
    if name.contains('/') {
        return match probe(root, cwd, name) {
            Exec::Ok => Ok(name.to_string()),
            Exec::Missing => Err(StartError {
                message: format!("exec: \"{name}\": stat {name}: no such file or directory"),
                exit_code: 127,
            }),
            Exec::Denied => Err(StartError {
                message: format!("exec: \"{name}\": permission denied"),
                exit_code: 126,
            }),
        };
    }
    for dir in path_env.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = format!("{}/{name}", dir.trim_end_matches('/'));
        let candidate = if candidate.starts_with("//") {
            candidate[1..].to_string()
        } else {
            candidate
        };
        if !name.is_empty() && matches!(probe(root, cwd, &candidate), Exec::Ok) {
            return Ok(candidate);
        }
    }
    Err(StartError {
        message: format!("exec: \"{name}\": executable file not found in $PATH"),
        exit_code: 127,
    })
}

/// Checks `args` and finds the program to execute (see [`lookup`]).
pub fn resolve_program(
    root: &Path,
    cwd: &str,
    env: &[(String, String)],
    args: &[String],
) -> Result<String, StartError> {
    let Some(name) = args.first() else {
        return Err(StartError::other("no command specified"));
    };
    let path_env = env_value(env, "PATH").unwrap_or(vessel_protocol::DEFAULT_PATH);
    lookup(root, cwd, path_env, name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn get<'a>(env: &'a [(String, String)], k: &str) -> Option<&'a str> {
        env_value(env, k)
    }

    #[test]
    fn env_defaults_are_added_when_absent() {
        let env = build_env(&s(&["FOO=bar"]), "c0ffee", "/root", false);
        assert_eq!(
            env,
            vec![
                (
                    "PATH".to_string(),
                    vessel_protocol::DEFAULT_PATH.to_string()
                ),
                ("HOSTNAME".into(), "c0ffee".into()),
                ("FOO".into(), "bar".into()),
                ("HOME".into(), "/root".into()),
            ]
        );
        let env = build_env(&[], "h", "/", true);
        assert_eq!(get(&env, "TERM"), Some("xterm"));
        let env = build_env(&[], "h", "/", false);
        assert_eq!(get(&env, "TERM"), None);
    }

    #[test]
    fn env_from_spec_wins_over_defaults() {
        let env = build_env(
            &s(&[
                "PATH=/opt/bin",
                "HOME=/data",
                "HOSTNAME=mine",
                "TERM=dumb",
                "A=1",
                "A=2",
                "EMPTY=",
            ]),
            "h",
            "/root",
            true,
        );
        assert_eq!(get(&env, "PATH"), Some("/opt/bin"));
        assert_eq!(get(&env, "HOME"), Some("/data"));
        assert_eq!(get(&env, "HOSTNAME"), Some("mine"));
        assert_eq!(get(&env, "TERM"), Some("dumb"));
        assert_eq!(get(&env, "A"), Some("2"));
        assert_eq!(get(&env, "EMPTY"), Some(""));
        assert_eq!(env.iter().filter(|(k, _)| k == "A").count(), 1);
        // Values may contain '='.
        let env = build_env(&s(&["OPTS=a=b=c"]), "h", "/", false);
        assert_eq!(get(&env, "OPTS"), Some("a=b=c"));
        // A bare key unsets.
        let env = build_env(&s(&["X=1", "X"]), "h", "/", false);
        assert_eq!(get(&env, "X"), None);
    }

    /// A fake rootfs: /bin/busybox (executable), /bin/sh -> /bin/busybox
    /// (absolute symlink, resolved inside the root), /usr/bin/notexec (0644),
    /// /usr/bin/adir (a directory), /app/run.sh (executable).
    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = dir.path();
        for d in ["bin", "usr/bin/adir", "app", "usr/local/bin"] {
            std::fs::create_dir_all(r.join(d)).expect("mkdir");
        }
        let write = |p: &str, mode: u32| {
            std::fs::write(r.join(p), b"#!/bin/sh\n").expect("write");
            std::fs::set_permissions(r.join(p), std::fs::Permissions::from_mode(mode))
                .expect("chmod");
        };
        write("bin/busybox", 0o755);
        write("usr/bin/notexec", 0o644);
        write("app/run.sh", 0o700);
        write("usr/local/bin/notexec", 0o755);
        symlink("/bin/busybox", r.join("bin/sh")).expect("symlink");
        symlink("../../bin/busybox", r.join("usr/bin/env")).expect("symlink");
        dir
    }

    #[test]
    fn names_are_searched_in_the_container_path() {
        let root = rootfs();
        let p = vessel_protocol::DEFAULT_PATH;
        assert_eq!(lookup(root.path(), "/", p, "sh").expect("sh"), "/bin/sh");
        assert_eq!(
            lookup(root.path(), "/", p, "env").expect("env"),
            "/usr/bin/env"
        );
        assert_eq!(
            lookup(root.path(), "/", "/app", "run.sh").expect("run"),
            "/app/run.sh"
        );
        // A non-executable hit is skipped; a later executable one is used.
        assert_eq!(
            lookup(root.path(), "/", "/usr/bin:/usr/local/bin", "notexec").expect("x"),
            "/usr/local/bin/notexec"
        );
        // An empty PATH entry is the working directory.
        assert_eq!(
            lookup(root.path(), "/app", ":/bin", "run.sh").expect("cwd"),
            "./run.sh"
        );
    }

    #[test]
    fn missing_name_is_not_found_in_path() {
        let root = rootfs();
        let e =
            lookup(root.path(), "/", vessel_protocol::DEFAULT_PATH, "nginx").expect_err("missing");
        assert_eq!(
            e.message,
            "exec: \"nginx\": executable file not found in $PATH"
        );
        assert_eq!(e.exit_code, 127);
        // Only non-executable candidates: still "not found", as with Docker.
        let e = lookup(root.path(), "/", "/usr/bin", "notexec").expect_err("skip");
        assert_eq!(
            e.message,
            "exec: \"notexec\": executable file not found in $PATH"
        );
        let e = lookup(root.path(), "/", "/usr/bin", "adir").expect_err("dir");
        assert_eq!(e.exit_code, 127);
        // The host's PATH is never consulted: the container has no `ls`.
        let e = lookup(root.path(), "/", "/usr/bin:/bin", "ls").expect_err("no ls");
        assert_eq!(
            e.message,
            "exec: \"ls\": executable file not found in $PATH"
        );
    }

    #[test]
    fn paths_with_a_slash_are_used_as_given() {
        let root = rootfs();
        assert_eq!(
            lookup(root.path(), "/", "", "/bin/sh").expect("abs"),
            "/bin/sh"
        );
        assert_eq!(
            lookup(root.path(), "/app", "", "./run.sh").expect("rel"),
            "./run.sh"
        );
        let e = lookup(root.path(), "/", "", "/nope").expect_err("missing");
        assert_eq!(
            e.message,
            "exec: \"/nope\": stat /nope: no such file or directory"
        );
        assert_eq!(e.exit_code, 127);
        let e = lookup(root.path(), "/", "", "/bin/sh/x").expect_err("enotdir");
        assert_eq!(e.exit_code, 127);
        let e = lookup(root.path(), "/", "", "/usr/bin/notexec").expect_err("mode");
        assert_eq!(e.message, "exec: \"/usr/bin/notexec\": permission denied");
        assert_eq!(e.exit_code, 126);
        let e = lookup(root.path(), "/", "", "/usr/bin/adir").expect_err("dir");
        assert_eq!(e.message, "exec: \"/usr/bin/adir\": permission denied");
        assert_eq!(e.exit_code, 126);
    }

    #[test]
    fn empty_command_and_program_resolution_use_the_env_path() {
        let root = rootfs();
        let e = resolve_program(root.path(), "/", &[], &[]).expect_err("empty");
        assert_eq!(
            e,
            StartError {
                message: "no command specified".into(),
                exit_code: 1
            }
        );
        let env = build_env(&s(&["PATH=/app"]), "h", "/", false);
        assert_eq!(
            resolve_program(root.path(), "/", &env, &s(&["run.sh", "x"])).expect("run"),
            "/app/run.sh"
        );
        let e = resolve_program(root.path(), "/", &env, &s(&["sh"])).expect_err("not in PATH");
        assert_eq!(
            e.message,
            "exec: \"sh\": executable file not found in $PATH"
        );
        let e = resolve_program(root.path(), "/", &env, &s(&[""])).expect_err("empty name");
        assert_eq!(e.message, "exec: \"\": executable file not found in $PATH");
    }
}
