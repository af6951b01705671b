//! `docker cp`: files into and out of a container's VM, running or not.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{stderr, Daemon};

fn host_tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("d");
    std::fs::create_dir_all(d.join("sub")).expect("mkdir");
    std::fs::write(d.join("a.txt"), "hello\n").expect("write");
    std::fs::write(d.join("sub/run.sh"), "#!/bin/sh\necho ran\n").expect("write");
    std::fs::set_permissions(d.join("sub/run.sh"), std::fs::Permissions::from_mode(0o750))
        .expect("chmod");
    std::os::unix::fs::symlink("a.txt", d.join("link")).expect("symlink");
    std::os::unix::fs::chown(d.join("a.txt"), Some(1234), Some(1234)).expect("chown");
    dir
}

#[test]
fn cp_into_and_out_of_a_running_container() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    d.ok(&["run", "-d", "--name", "box", "busybox", "sleep", "100000"]);
    let host = host_tree();
    let src = host.path().join("d");
    let src = src.to_str().expect("utf-8");

    // A directory into an existing directory: it lands below it, with its
    // modes and symlinks; owners become root (no -a).
    d.ok(&["cp", src, "box:/tmp/"]);
    let out = d.ok(&[
        "exec",
        "box",
        "sh",
        "-c",
        "cat /tmp/d/a.txt; /tmp/d/sub/run.sh; readlink /tmp/d/link; stat -c '%a %u' /tmp/d/sub/run.sh /tmp/d/a.txt",
    ]);
    assert_eq!(out, "hello\nran\na.txt\n750 0\n644 0\n");
    // -a keeps the owner; a file to a new name.
    let file = host.path().join("d/a.txt");
    d.ok(&[
        "cp",
        "-a",
        file.to_str().expect("utf-8"),
        "box:/tmp/renamed",
    ]);
    assert_eq!(
        d.ok(&["exec", "box", "stat", "-c", "%u %n", "/tmp/renamed"]),
        "1234 /tmp/renamed\n"
    );

    // Out again: a file, a directory, and a tar on stdout.
    let back = tempfile::tempdir().expect("tempdir");
    let dst = back.path().join("passwd");
    d.ok(&["cp", "box:/etc/passwd", dst.to_str().expect("utf-8")]);
    assert!(std::fs::read_to_string(&dst)
        .expect("read")
        .starts_with("root:x:0:0"));
    let dst = back.path().join("tree");
    d.ok(&["cp", "box:/tmp/d", dst.to_str().expect("utf-8")]);
    assert_eq!(
        std::fs::read_to_string(dst.join("a.txt")).expect("read"),
        "hello\n"
    );
    let meta = std::fs::metadata(dst.join("sub/run.sh")).expect("stat");
    assert_eq!(meta.permissions().mode() & 0o777, 0o750);
    assert_eq!(
        std::fs::read_link(dst.join("link")).expect("readlink"),
        std::path::PathBuf::from("a.txt")
    );
    let tar = d.docker(&["cp", "box:/tmp/d/a.txt", "-"]);
    assert!(tar.status.success());
    let mut archive = tar::Archive::new(&tar.stdout[..]);
    let names: Vec<String> = archive
        .entries()
        .expect("tar")
        .map(|e| {
            e.expect("entry")
                .path()
                .expect("path")
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(names, vec!["a.txt"]);

    // Docker's answers to bad paths.
    let out = d.docker(&["cp", "box:/nope", back.path().to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Could not find the file /nope in container"),
        "{}",
        stderr(&out)
    );
    let out = d.docker(&["cp", file.to_str().expect("utf-8"), "box:/etc/passwd/x"]);
    assert!(!out.status.success());
    let out = d.docker(&["cp", file.to_str().expect("utf-8"), "nosuch:/tmp"]);
    assert!(
        stderr(&out).contains("No such container"),
        "{}",
        stderr(&out)
    );
    // The copies did not disturb the container.
    assert_eq!(
        d.ok(&["inspect", "-f", "{{.State.Running}}", "box"]),
        "true\n"
    );
}

#[test]
fn cp_works_on_containers_that_are_not_running() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    let host = host_tree();
    let file = host.path().join("d/a.txt");
    // Into a created container, before its first start.
    d.ok(&["create", "--name", "made", "busybox", "cat", "/tmp/a.txt"]);
    d.ok(&["cp", file.to_str().expect("utf-8"), "made:/tmp/"]);
    assert_eq!(d.ok(&["start", "-a", "made"]), "hello\n");
    // Out of an exited container: what its process wrote.
    d.ok(&[
        "run",
        "--name",
        "done",
        "busybox",
        "sh",
        "-c",
        "echo result > /out",
    ]);
    let back = tempfile::tempdir().expect("tempdir");
    let dst = back.path().join("out");
    d.ok(&["cp", "done:/out", dst.to_str().expect("utf-8")]);
    assert_eq!(std::fs::read_to_string(&dst).expect("read"), "result\n");
    // Into an exited container, seen by its next start.
    d.ok(&["cp", file.to_str().expect("utf-8"), "done:/"]);
    d.ok(&["start", "done"]);
    assert_eq!(d.ok(&["wait", "done"]), "0\n");
    let dst = back.path().join("a.txt");
    d.ok(&["cp", "done:/a.txt", dst.to_str().expect("utf-8")]);
    assert_eq!(std::fs::read_to_string(&dst).expect("read"), "hello\n");
    // The VMs started for copies are gone (the last one shuts down after
    // its archive was sent).
    let copy_vms = || {
        std::process::Command::new("pgrep")
            .arg("-f")
            .arg(format!("vessel-cp-.*{}", d.data_root().display()))
            .output()
            .expect("pgrep")
            .stdout
    };
    assert!(
        common::eventually(20, || copy_vms().is_empty()),
        "a copy VM was left running"
    );
}

#[test]
fn diff_and_export_show_the_containers_filesystem() {
    let d = Daemon::start_with(&["--warm-vms", "0"]);
    d.load_busybox(&["busybox:latest"]);
    d.ok(&[
        "run",
        "--name",
        "changed",
        "busybox",
        "sh",
        "-c",
        "echo x > /tmp/new; rm /etc/group; mkdir -p /home/user/d; echo y > /home/user/d/f",
    ]);
    // Docker's listing; nothing of what the agent writes (hostname, hosts).
    assert_eq!(
        d.ok(&["diff", "changed"]),
        "C /etc\nD /etc/group\nC /home\nC /home/user\nA /home/user/d\nA /home/user/d/f\nC /tmp\nA /tmp/new\n"
    );
    // The whole filesystem as a tar, with the container's changes, and
    // the pseudo filesystems only as empty directories.
    let out = d.docker(&["export", "changed"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut archive = tar::Archive::new(&out.stdout[..]);
    let mut names = Vec::new();
    let mut new_file = String::new();
    for e in archive.entries().expect("tar") {
        let mut e = e.expect("entry");
        let name = e.path().expect("path").display().to_string();
        if name == "tmp/new" {
            std::io::Read::read_to_string(&mut e, &mut new_file).expect("read");
        }
        names.push(name);
    }
    assert_eq!(new_file, "x\n");
    assert!(names.iter().any(|n| n == "bin/busybox"), "{names:?}");
    assert!(
        !names.iter().any(|n| n == "etc/group"),
        "deleted file exported"
    );
    assert!(names.iter().any(|n| n.trim_end_matches('/') == "proc"));
    assert!(!names
        .iter()
        .any(|n| n.starts_with("proc/") || n.starts_with("sys/")));
    // A running container too.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "live",
        "busybox",
        "sh",
        "-c",
        "touch /added; sleep 1000",
    ]);
    assert!(common::eventually(20, || d.ok(&["diff", "live"]) == "A /added\n"));
}
