//! `docker commit` with the real CLI: a container's changes (added,
//! changed and deleted files, a directory replaced as a whole) become an
//! image layer on top of its image, with `-m`, `-a` and `--change`, from a
//! running and from a stopped container.

mod common;

use common::{docker_save, stderr, write, Daemon, ImageSpec};

#[test]
fn commit_makes_an_image_of_the_containers_changes() {
    let d = Daemon::start();
    let archive = docker_save(&[ImageSpec {
        tags: &["base:1"],
        cmd: &["sh"],
        files: &[
            ("/gone.txt", "bye\n"),
            ("/dir/a", "1\n"),
            ("/kept.txt", "old\n"),
        ],
        ..Default::default()
    }]);
    let path = write(d.dir.path(), "base.tar", &archive);
    d.ok(&["load", "-i", path.to_str().expect("path")]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "src",
        "base:1",
        "sh",
        "-c",
        "rm /gone.txt; rm -rf /dir; mkdir /dir; echo 2 > /dir/b; echo new > /kept.txt; \
         echo hello > /hello; chmod 600 /hello; touch /ready; sleep 1000",
    ]);
    assert!(common::eventually(20, || d
        .docker(&["exec", "src", "test", "-e", "/ready"])
        .status
        .success()));

    // From the running container.
    let id = d.ok(&[
        "commit",
        "-m",
        "my message",
        "-a",
        "me <me@example.test>",
        "-c",
        "CMD [\"cat\", \"/hello\"]",
        "-c",
        "ENV FROM_COMMIT=yes",
        "src",
        "committed:v1",
    ]);
    assert!(id.trim().starts_with("sha256:"), "{id}");
    assert_eq!(d.ok(&["run", "--rm", "committed:v1"]).trim(), "hello");
    let look = d.ok(&[
        "run",
        "--rm",
        "committed:v1",
        "sh",
        "-c",
        "ls /gone.txt 2>&1; ls /dir; cat /kept.txt; stat -c %a /hello; echo $FROM_COMMIT",
    ]);
    assert!(look.contains("No such file"), "whiteout: {look}");
    assert!(
        !look.contains("\na\n") && look.contains("b\n"),
        "opaque dir: {look}"
    );
    assert!(
        look.contains("new\n") && look.contains("600\n") && look.contains("yes"),
        "{look}"
    );
    let hist = d.ok(&["history", "--format", "{{.Comment}}", "committed:v1"]);
    assert!(
        hist.lines().next().unwrap_or("").contains("my message"),
        "{hist}"
    );
    let layers = |img: &str| {
        d.ok(&["image", "inspect", "-f", "{{len .RootFS.Layers}}", img])
            .trim()
            .parse::<usize>()
            .expect("layer count")
    };
    assert_eq!(layers("committed:v1"), layers("base:1") + 1);
    let author = d.ok(&["image", "inspect", "-f", "{{.Author}}", "committed:v1"]);
    assert_eq!(author.trim(), "me <me@example.test>");
    // The agent's own files are not part of the layer.
    let hostname = d.ok(&["run", "--rm", "committed:v1", "cat", "/etc/hostname"]);
    let src_host = d.ok(&["exec", "src", "hostname"]);
    assert_ne!(hostname.trim(), src_host.trim());

    // From a stopped container, without a tag.
    d.ok(&["stop", "-t", "1", "src"]);
    let id2 = d.ok(&["commit", "src"]);
    let id2 = id2.trim();
    assert!(id2.starts_with("sha256:"), "{id2}");
    assert_eq!(d.ok(&["run", "--rm", id2, "cat", "/hello"]).trim(), "hello");
    let dangling = d.ok(&["images", "-q", "--filter", "dangling=true", "--no-trunc"]);
    assert!(dangling.contains(id2), "{dangling}");

    let missing = d.docker(&["commit", "nosuch"]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("No such container"),
        "{}",
        stderr(&missing)
    );
    let bad = d.docker(&["commit", "-c", "FROBNICATE x", "src"]);
    assert!(!bad.status.success());
}
