//! Volumes and mounts with the real `docker` CLI: the volume commands,
//! `-v`, `--mount`, `--volumes-from`, image `VOLUME`s and copy-up, two VMs
//! sharing a volume, bind mounts live both ways, read-only mounts, and
//! data that survives container removal, crashes of the daemon and of the
//! VM, and daemon restarts.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::{eventually, stderr, Daemon};

/// An image `volimg` with `VOLUME /data` and content there: a file, a
/// symlink, and a directory owned by 1000 with mode 750.
fn load_volume_image(d: &Daemon) {
    let mut rootfs = common::busybox_rootfs(&[("data/hello", "from the image\n")]);
    // Append to the archive: drop its two closing zero blocks.
    rootfs.truncate(rootfs.len() - 1024);
    let mut tar = tar::Builder::new(rootfs);
    let mut entry = |path: &str, kind: tar::EntryType, mode: u32, uid: u64, link: Option<&str>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_size(0);
        h.set_mtime(1_700_000_000);
        if let Some(l) = link {
            h.set_link_name(l).expect("link");
        }
        h.set_path(path).expect("path");
        h.set_cksum();
        tar.append(&h, &[][..]).expect("append");
    };
    entry("data/sub", tar::EntryType::Directory, 0o750, 1000, None);
    entry(
        "data/link",
        tar::EntryType::Symlink,
        0o777,
        0,
        Some("hello"),
    );
    let archive = d.dir.path().join("volimg.tar");
    std::fs::write(&archive, tar.into_inner().expect("tar")).expect("write");
    d.ok(&[
        "import",
        "--change",
        "VOLUME /data",
        "--change",
        "CMD [\"sh\"]",
        archive.to_str().expect("utf-8"),
        "volimg",
    ]);
}

/// Mount points under the daemon's data root (none may be left behind).
fn mounts_under(root: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m.starts_with(root.to_str().expect("utf-8")))
        .collect()
}

#[test]
fn volume_commands_answer_as_docker_does() {
    let d = Daemon::start_with(&["--warm-vms", "0"]);
    d.load_busybox(&["busybox:latest"]);
    load_volume_image(&d);

    // create / inspect / ls.
    assert_eq!(
        d.ok(&["volume", "create", "--label", "tier=db", "data1"]),
        "data1\n"
    );
    d.ok(&["volume", "create", "data2"]);
    let v: serde_json::Value =
        serde_json::from_str(&d.ok(&["volume", "inspect", "data1"])).expect("json");
    let v = &v[0];
    assert_eq!(v["Driver"], "local");
    assert_eq!(v["Scope"], "local");
    assert_eq!(v["Labels"]["tier"], "db");
    let mp = d.data_root().join("volumes/data1/_data");
    assert_eq!(v["Mountpoint"], mp.to_str().expect("utf-8"));
    assert!(mp.is_dir());
    assert!(v["CreatedAt"].as_str().is_some_and(|t| t.starts_with("20")));
    // Creating an existing volume returns it.
    d.ok(&["volume", "create", "data1"]);
    assert_eq!(
        d.ok(&["volume", "ls", "-q", "--filter", "label=tier=db"]),
        "data1\n"
    );
    assert_eq!(
        d.ok(&["volume", "ls", "-q", "--filter", "name=ta2"]),
        "data2\n"
    );
    assert_eq!(
        d.ok(&["volume", "ls", "-q", "--filter", "driver=local"])
            .lines()
            .count(),
        2
    );

    // Driver options as the local driver takes them.
    let out = d.docker(&["volume", "create", "-o", "foo=bar", "bad1"]);
    assert!(
        stderr(&out).contains("create bad1: invalid option: \"foo\""),
        "{}",
        stderr(&out)
    );
    let out = d.docker(&["volume", "create", "-o", "type=tmpfs", "bad2"]);
    assert!(
        stderr(&out).contains("missing required option: \"device\""),
        "{}",
        stderr(&out)
    );
    let out = d.docker(&["volume", "create", "bad/name"]);
    assert!(
        stderr(&out).contains("includes invalid characters for a local volume name"),
        "{}",
        stderr(&out)
    );
    d.ok(&[
        "volume",
        "create",
        "-o",
        "type=tmpfs",
        "-o",
        "device=tmpfs",
        "-o",
        "o=size=2m",
        "mem",
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&d.ok(&["volume", "inspect", "mem"])).expect("json");
    assert_eq!(v[0]["Options"]["o"], "size=2m");
    let out = d.docker(&["volume", "inspect", "nosuch"]);
    assert!(stderr(&out).contains("no such volume"), "{}", stderr(&out));

    // In use by a container (even one that never ran): 409, also with -f.
    d.ok(&[
        "create", "--name", "user1", "-v", "data1:/d", "busybox", "true",
    ]);
    for args in [
        &["volume", "rm", "data1"][..],
        &["volume", "rm", "-f", "data1"][..],
    ] {
        let out = d.docker(args);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("remove data1: volume is in use - ["),
            "{}",
            stderr(&out)
        );
    }
    let (status, _, _) = d.http("DELETE", "/v1.50/volumes/data1", None);
    assert_eq!(status, 409);
    assert_eq!(
        d.ok(&["volume", "ls", "-q", "--filter", "dangling=false"]),
        "data1\n"
    );
    let out = d.docker(&["volume", "rm", "nosuch"]);
    assert!(stderr(&out).contains("no such volume"), "{}", stderr(&out));
    d.ok(&["volume", "rm", "-f", "nosuch"]);

    // Mounts: image VOLUME and `-v /path` make anonymous volumes; inspect
    // shows every mount as Docker does.
    let host = tempfile::tempdir().expect("tempdir");
    let hp = host.path().to_str().expect("utf-8");
    d.ok(&[
        "create",
        "--name",
        "user2",
        "-v",
        "/anon",
        "-v",
        &format!("{hp}:/h:ro"),
        "--mount",
        "type=volume,src=data2,dst=/d2,volume-nocopy",
        "--mount",
        "type=tmpfs,dst=/t,tmpfs-size=1m",
        "volimg",
    ]);
    let mounts: serde_json::Value =
        serde_json::from_str(&d.ok(&["inspect", "-f", "{{json .Mounts}}", "user2"])).expect("json");
    let by_dest = |dest: &str| -> serde_json::Value {
        mounts
            .as_array()
            .expect("array")
            .iter()
            .find(|m| m["Destination"] == dest)
            .cloned()
            .unwrap_or_else(|| panic!("no mount at {dest}: {mounts}"))
    };
    let data = by_dest("/data");
    assert_eq!(data["Type"], "volume");
    assert_eq!(data["Name"].as_str().map(str::len), Some(64));
    assert_eq!(data["Driver"], "local");
    assert_eq!(by_dest("/anon")["Type"], "volume");
    let h = by_dest("/h");
    assert_eq!(
        (
            &h["Type"],
            &h["Source"],
            &h["RW"],
            &h["Mode"],
            &h["Propagation"]
        ),
        (
            &serde_json::json!("bind"),
            &serde_json::json!(hp),
            &serde_json::json!(false),
            &serde_json::json!("ro"),
            &serde_json::json!("rprivate")
        )
    );
    assert_eq!(by_dest("/d2")["Name"], "data2");
    assert_eq!(by_dest("/t")["Type"], "tmpfs");
    let anon: Vec<String> = d
        .ok(&[
            "volume",
            "ls",
            "-q",
            "--filter",
            "label=com.docker.volume.anonymous",
        ])
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(anon.len(), 2, "{anon:?}");
    assert!(
        d.ok(&["inspect", "-f", "{{json .Config.Volumes}}", "user2"])
            .contains("/data"),
        "the image's VOLUME is in the config"
    );

    // Bad mounts are refused with Docker's message and leave nothing.
    let before = d.ok(&["volume", "ls", "-q"]);
    for (args, msg) in [
        (
            vec!["--mount", "type=bind,src=/nonexistent/vessel,dst=/x"],
            "invalid mount config for type \"bind\": bind source path does not exist: /nonexistent/vessel",
        ),
        (vec!["-v", "fresh1:/x", "-v", "fresh2:/x"], "Duplicate mount point: /x"),
        (
            vec!["-v", "fresh3:/y", "--mount", "type=volume,dst=/z,readonly"],
            "must not set ReadOnly mode when using anonymous volumes",
        ),
        (vec!["-v", "bad/name:/x"], "includes invalid characters"),
    ] {
        let mut full = vec!["create"];
        full.extend(args.iter().copied());
        full.extend(["busybox", "true"]);
        let out = d.docker(&full);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr(&out).contains(msg), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(
        d.ok(&["volume", "ls", "-q"]),
        before,
        "a refused create left volumes"
    );
    assert_eq!(d.ok(&["ps", "-aq"]).lines().count(), 2);

    // rm -v removes the anonymous volumes only.
    d.ok(&["rm", "-v", "user2"]);
    for a in &anon {
        assert!(!d.docker(&["volume", "inspect", a]).status.success());
    }
    d.ok(&["volume", "inspect", "data2"]);

    // prune: without --all only anonymous volumes; never one in use.
    d.ok(&[
        "create", "--name", "user3", "-v", "/anon2", "busybox", "true",
    ]);
    d.ok(&["rm", "user3"]);
    let dangling = d.ok(&["volume", "ls", "-q", "--filter", "dangling=true"]);
    assert_eq!(dangling.lines().count(), 3, "{dangling}");
    let pruned = d.ok(&["volume", "prune", "-f"]);
    assert_eq!(
        pruned.lines().filter(|l| l.len() == 64).count(),
        1,
        "{pruned}"
    );
    let pruned = d.ok(&["volume", "prune", "-af"]);
    assert!(
        pruned.contains("data2") && pruned.contains("mem"),
        "{pruned}"
    );
    assert!(!pruned.contains("data1"), "{pruned}");
    assert_eq!(d.ok(&["volume", "ls", "-q"]), "data1\n");

    // Disk usage and events.
    std::fs::write(mp.join("blob"), vec![7u8; 64 * 1024]).expect("write");
    let (status, _, body) = d.http("GET", "/v1.50/system/df", None);
    assert_eq!(status, 200);
    let df: serde_json::Value = serde_json::from_str(&body).expect("json");
    let vols = df["Volumes"].as_array().expect("volumes");
    assert_eq!(vols.len(), 1, "{body}");
    assert_eq!(vols[0]["Name"], "data1");
    assert_eq!(vols[0]["UsageData"]["RefCount"], 1);
    assert!(
        vols[0]["UsageData"]["Size"].as_i64().unwrap_or(0) >= 64 * 1024,
        "{body}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let events = d.ok(&[
        "events",
        "--since",
        "0",
        "--until",
        &format!("{}", now + 1),
        "--filter",
        "type=volume",
        "--format",
        "{{.Action}} {{.Actor.ID}}",
    ]);
    assert!(events.contains("create data1"), "{events}");
    assert!(events.contains("destroy data2"), "{events}");
}

#[test]
fn volumes_are_shared_between_vms_and_bind_mounts_with_the_host() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    load_volume_image(&d);
    let host = tempfile::tempdir().expect("tempdir");
    let hp = host.path().to_str().expect("utf-8");
    std::fs::write(host.path().join("from-host"), "host says hi\n").expect("write");
    d.ok(&[
        "volume",
        "create",
        "-o",
        "type=tmpfs",
        "-o",
        "device=tmpfs",
        "-o",
        "o=size=2m",
        "mem",
    ]);

    // A new named volume is filled from the image at its target.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "one",
        "-v",
        "shared:/data",
        "-v",
        &format!("{hp}:/h"),
        "volimg",
        "sleep",
        "100000",
    ]);
    assert_eq!(
        d.ok(&[
            "exec",
            "one",
            "sh",
            "-c",
            "cat /data/hello; readlink /data/link; stat -c '%a %u %g' /data/sub"
        ]),
        "from the image\nhello\n750 1000 1000\n"
    );
    let vol = d.data_root().join("volumes/shared/_data");
    let sub = std::fs::metadata(vol.join("sub")).expect("stat");
    assert_eq!((sub.uid(), sub.mode() & 0o777), (1000, 0o750));

    // A second VM mounts it at the same time (read-only) and the tmpfs
    // volume; each sees the other's writes at once. It may mount (below it
    // tries to make the volume writable again).
    d.ok(&[
        "run",
        "-d",
        "--name",
        "two",
        "--cap-add",
        "SYS_ADMIN",
        "-v",
        "shared:/data:ro",
        "-v",
        "mem:/m",
        "busybox",
        "sleep",
        "100000",
    ]);
    d.ok(&[
        "exec",
        "one",
        "sh",
        "-c",
        "echo written by one > /data/note",
    ]);
    assert_eq!(
        d.ok(&["exec", "two", "cat", "/data/note"]),
        "written by one\n"
    );
    let out = d.docker(&["exec", "two", "sh", "-c", "echo no > /data/note"]);
    assert!(!out.status.success(), "a read-only mount was written");
    assert!(
        stderr(&out).contains("Read-only file system"),
        "{}",
        stderr(&out)
    );
    // Not even root in the VM gets around it: the host side is read-only too.
    let out = d.docker(&[
        "exec",
        "two",
        "sh",
        "-c",
        "mount -o remount,rw /data; echo no > /data/note",
    ]);
    assert!(
        !out.status.success(),
        "a remounted read-only mount was written"
    );
    assert_eq!(
        std::fs::read_to_string(vol.join("note")).expect("read"),
        "written by one\n"
    );
    // The tmpfs volume holds 2 MiB, as its options say.
    d.ok(&[
        "exec",
        "two",
        "sh",
        "-c",
        "head -c 1000000 /dev/zero > /m/fits",
    ]);
    let out = d.docker(&[
        "exec",
        "two",
        "sh",
        "-c",
        "head -c 3000000 /dev/zero > /m/big",
    ]);
    assert!(!out.status.success(), "a 2 MiB tmpfs volume took 3 MB");
    assert!(mounts_under(&d.data_root().join("volumes/mem")).len() == 1);

    // Bind mount: live in both directions, owners as the guest wrote them.
    assert_eq!(
        d.ok(&["exec", "one", "cat", "/h/from-host"]),
        "host says hi\n"
    );
    std::fs::write(host.path().join("later"), "changed on the host\n").expect("write");
    assert_eq!(
        d.ok(&["exec", "one", "cat", "/h/later"]),
        "changed on the host\n"
    );
    d.ok(&[
        "exec",
        "one",
        "sh",
        "-c",
        "mkdir /h/dir && echo g > /h/dir/f && chown 1000:1000 /h/dir/f && chmod 640 /h/dir/f",
    ]);
    let f = std::fs::metadata(host.path().join("dir/f")).expect("stat");
    assert_eq!((f.uid(), f.gid(), f.mode() & 0o777), (1000, 1000, 0o640));
    assert_eq!(
        std::fs::read_to_string(host.path().join("dir/f")).expect("read"),
        "g\n"
    );
    // The host directory belongs to root with mode 700 here: user 1000 in
    // the guest may not write it, as on Docker.
    std::fs::set_permissions(
        host.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod");
    let out = d.docker(&["exec", "-u", "1000", "one", "touch", "/h/denied"]);
    assert!(!out.status.success(), "permissions were not enforced");
    assert!(!host.path().join("denied").exists());

    // Two writable VMs on one volume see each other's writes.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "three",
        "-v",
        "shared:/data",
        "busybox",
        "sleep",
        "100000",
    ]);
    d.ok(&[
        "exec",
        "three",
        "sh",
        "-c",
        "echo written by three > /data/three",
    ]);
    assert_eq!(
        d.ok(&["exec", "one", "cat", "/data/three"]),
        "written by three\n"
    );
    d.ok(&["exec", "one", "sh", "-c", "echo one again >> /data/three"]);
    assert_eq!(
        d.ok(&["exec", "three", "cat", "/data/three"]),
        "written by three\none again\n"
    );
    // A single host file, bound read-only.
    std::fs::write(host.path().join("greeting"), "a file of its own\n").expect("write");
    let bound = format!("{hp}/greeting:/etc/greeting:ro");
    assert_eq!(
        d.ok(&[
            "run",
            "--rm",
            "-v",
            &bound,
            "busybox",
            "cat",
            "/etc/greeting"
        ]),
        "a file of its own\n"
    );
    let out = d.docker(&[
        "run",
        "--rm",
        "-v",
        &bound,
        "busybox",
        "sh",
        "-c",
        "echo no > /etc/greeting",
    ]);
    assert!(!out.status.success(), "a read-only file was written");

    // nocopy: the volume stays empty.
    assert_eq!(
        d.ok(&[
            "run",
            "--rm",
            "--mount",
            "type=volume,src=empty,dst=/data,volume-nocopy",
            "volimg",
            "ls",
            "-A",
            "/data"
        ]),
        ""
    );
    d.ok(&["rm", "-f", "one", "two", "three"]);
    assert!(
        eventually(10, || mounts_under(&d.data_root().join("vm")).is_empty()),
        "share mounts left: {:?}",
        mounts_under(&d.data_root())
    );
    // The tmpfs volume is unmounted once no container runs with it.
    assert!(mounts_under(&d.data_root().join("volumes")).is_empty());
}

#[test]
fn volume_data_survives_crashes_and_restarts() {
    let mut d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "writer",
        "-v",
        "durable:/d",
        "busybox",
        "sh",
        "-c",
        "echo one >> /d/f; sync; touch /d/synced; sleep 100000",
    ]);
    let vol = d.data_root().join("volumes/durable/_data");
    assert!(eventually(30, || vol.join("synced").exists()));

    // kill -9 of the daemon: the VM keeps its mounts, the new daemon finds
    // the container and the volume by name.
    d.kill9();
    d.restart();
    d.ok(&["volume", "inspect", "durable"]);
    assert_eq!(d.ok(&["exec", "writer", "cat", "/d/f"]), "one\n");
    d.ok(&["exec", "writer", "sh", "-c", "echo two >> /d/f; sync"]);

    // kill -9 of the VM process: what was written stays, the share mounts go.
    let pid: i32 = d
        .ok(&["inspect", "-f", "{{.State.Pid}}", "writer"])
        .trim()
        .parse()
        .expect("pid");
    // SAFETY: kill(2) on the VM's pid, which the daemon reported.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    assert!(eventually(20, || d
        .ok(&["inspect", "-f", "{{.State.Running}}", "writer"])
        .trim()
        == "false"));
    assert!(
        eventually(10, || mounts_under(&d.data_root().join("vm")).is_empty()),
        "share mounts of a dead VM: {:?}",
        mounts_under(&d.data_root())
    );
    assert_eq!(
        std::fs::read_to_string(vol.join("f")).expect("read"),
        "one\ntwo\n"
    );

    // docker start again, then stop, then remove the container: the data
    // stays, and a daemon restart finds it by name.
    d.ok(&["start", "writer"]);
    assert!(eventually(30, || d
        .docker(&["exec", "writer", "cat", "/d/f"])
        .stdout
        == b"one\ntwo\none\n"));
    d.ok(&["stop", "-t", "1", "writer"]);
    d.ok(&["rm", "-v", "writer"]);
    d.terminate();
    d.restart();
    assert_eq!(
        d.ok(&["run", "--rm", "-v", "durable:/d", "busybox", "cat", "/d/f"]),
        "one\ntwo\none\n"
    );
}

#[test]
fn bind_mounted_data_survives_removal_and_failed_starts() {
    let d = Daemon::start_with(&["--warm-vms", "0"]);
    d.load_busybox(&["busybox:latest"]);
    load_volume_image(&d);
    let host = tempfile::tempdir().expect("tempdir");
    let hp = host.path().to_str().expect("utf-8");
    std::fs::create_dir(host.path().join("deep")).expect("mkdir");
    std::fs::write(host.path().join("deep/precious"), "keep me\n").expect("write");

    // A start that fails after the mounts were made.
    d.ok(&[
        "create",
        "--name",
        "broken",
        "-v",
        &format!("{hp}:/h"),
        "-v",
        "kept:/k",
        "busybox",
        "/no/such/command",
    ]);
    let out = d.docker(&["start", "broken"]);
    assert!(!out.status.success(), "the start should fail");
    assert_eq!(
        std::fs::read_to_string(host.path().join("deep/precious")).expect("read"),
        "keep me\n"
    );
    assert!(mounts_under(&d.data_root()).is_empty());
    d.ok(&["rm", "broken"]);

    // Removal of a running container, forced.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "victim",
        "-v",
        &format!("{hp}:/h"),
        "-v",
        &format!("{hp}/created/by/docker:/made"),
        "--mount",
        "type=tmpfs,dst=/t,tmpfs-size=1m",
        "busybox",
        "sh",
        "-c",
        "echo in > /made/f; grep ' /t ' /proc/mounts > /made/t.new; mv /made/t.new /made/t; sleep 100000",
    ]);
    assert!(eventually(30, || host
        .path()
        .join("created/by/docker/t")
        .exists()));
    assert!(
        std::fs::read_to_string(host.path().join("created/by/docker/t"))
            .expect("read")
            .contains("tmpfs /t tmpfs rw,nosuid,nodev,noexec,relatime,size=1024k")
    );
    d.ok(&["rm", "-f", "victim"]);
    assert_eq!(
        std::fs::read_to_string(host.path().join("deep/precious")).expect("read"),
        "keep me\n"
    );
    assert_eq!(
        std::fs::read_to_string(host.path().join("created/by/docker/f")).expect("read"),
        "in\n"
    );
    assert!(mounts_under(&d.data_root()).is_empty());

    // --volumes-from (read-only here), and --rm removing anonymous volumes.
    d.ok(&[
        "run", "-d", "--name", "source", "-v", "/anon", "-v", "named:/n", "volimg", "sleep",
        "100000",
    ]);
    let anon = d.ok(&[
        "inspect",
        "-f",
        "{{range .Mounts}}{{if eq .Destination \"/anon\"}}{{.Name}}{{end}}{{end}}",
        "source",
    ]);
    let out = d.docker(&[
        "run",
        "--rm",
        "--volumes-from",
        "source:ro",
        "busybox",
        "sh",
        "-c",
        "cat /data/hello; ls -d /anon /n; touch /n/x",
    ]);
    assert_eq!(common::stdout(&out), "from the image\n/anon\n/n\n");
    assert!(
        stderr(&out).contains("Read-only file system"),
        "{}",
        stderr(&out)
    );
    d.ok(&["rm", "-fv", "source"]);
    assert!(!d
        .docker(&["volume", "inspect", anon.trim()])
        .status
        .success());
    d.ok(&["volume", "inspect", "named"]);
    let before = d.ok(&["volume", "ls", "-q"]);
    d.ok(&["run", "--rm", "-v", "/scratch", "busybox", "true"]);
    assert!(eventually(10, || d.ok(&["volume", "ls", "-q"]) == before));
}

/// docker compose (Debian's docker-compose 1.29) with a named volume shared
/// by two services on the project's default network.
#[test]
fn compose_services_share_a_named_volume() {
    if std::process::Command::new("docker-compose")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("skipped: docker-compose is not installed");
        return;
    }
    let d = Daemon::start_with(&["--warm-vms", "0"]);
    d.load_busybox(&["busybox:latest"]);
    let project = d.dir.path().join("proj");
    std::fs::create_dir(&project).expect("mkdir");
    std::fs::write(
        project.join("docker-compose.yml"),
        r#"version: "3.8"
services:
  writer:
    image: busybox
    command: sh -c 'echo from-compose > /data/f; sleep 100000'
    volumes:
      - appdata:/data
  reader:
    image: busybox
    command: sh -c 'while [ ! -e /data/f ]; do sleep 0.2; done; cat /data/f; sleep 100000'
    volumes:
      - appdata:/data:ro
volumes:
  appdata:
"#,
    )
    .expect("write compose file");
    let compose = |args: &[&str]| {
        let out = std::process::Command::new("docker-compose")
            .current_dir(&project)
            .env("DOCKER_HOST", d.host())
            .args(args)
            .output()
            .expect("run docker-compose");
        assert!(
            out.status.success(),
            "docker-compose {args:?}: {}\n{}",
            stderr(&out),
            d.log()
        );
        common::stdout(&out)
    };
    compose(&["up", "-d"]);
    let v: serde_json::Value =
        serde_json::from_str(&d.ok(&["volume", "inspect", "proj_appdata"])).expect("json");
    assert_eq!(v[0]["Labels"]["com.docker.compose.project"], "proj");
    assert!(eventually(60, || compose(&["logs", "reader"]).contains("from-compose")));
    compose(&["down", "-v"]);
    assert!(!d
        .docker(&["volume", "inspect", "proj_appdata"])
        .status
        .success());
}
