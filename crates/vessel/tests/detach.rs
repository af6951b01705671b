//! Detach keys through the real CLI on a terminal: `docker run -it` and
//! `docker attach` leave the container running when the user types
//! ctrl-p ctrl-q (or the keys of `--detach-keys`).

mod common;

use std::io::{Read, Write};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Daemon;

/// The docker CLI on a pseudo-terminal: what it writes, and its keyboard.
struct Terminal {
    child: Child,
    keyboard: std::fs::File,
    screen: Arc<Mutex<Vec<u8>>>,
}

impl Terminal {
    fn run(d: &Daemon, args: &[&str]) -> Self {
        let winsize = nix::pty::Winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&winsize), None).expect("openpty");
        let slave = |fd: &std::os::fd::OwnedFd| Stdio::from(fd.try_clone().expect("dup"));
        let child = d
            .docker_cmd(args)
            .env("TERM", "xterm")
            .stdin(slave(&pty.slave))
            .stdout(slave(&pty.slave))
            .stderr(slave(&pty.slave))
            .spawn()
            .expect("run docker");
        // Only the child holds the terminal now: reading the master ends
        // (EIO) once the CLI is gone.
        drop(pty.slave);
        let master = std::fs::File::from(pty.master);
        let keyboard = master.try_clone().expect("dup master");
        let screen = Arc::new(Mutex::new(Vec::new()));
        let s = screen.clone();
        std::thread::spawn(move || {
            let mut master = master;
            let mut buf = [0u8; 4096];
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 {
                    break;
                }
                s.lock().expect("screen").extend_from_slice(&buf[..n]);
            }
        });
        Terminal {
            child,
            keyboard,
            screen,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().expect("screen")).into_owned()
    }

    /// Waits until the screen shows `what` (after what it showed before).
    fn expect(&self, what: &str, from: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.text()[from.min(self.text().len())..].contains(what) {
            assert!(
                Instant::now() < deadline,
                "{what:?} never appeared; the terminal shows {:?}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn type_keys(&mut self, keys: &[u8]) {
        self.keyboard.write_all(keys).expect("type");
    }

    /// The CLI's exit code, waiting up to 30 s.
    fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the CLI did not exit; the terminal shows {:?}", self.text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn running(d: &Daemon, name: &str) -> String {
    d.ok(&["inspect", "-f", "{{.State.Running}}", name])
        .trim()
        .to_string()
}

#[test]
fn detach_keys_leave_the_container_running() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);

    // docker run -it, then ctrl-p ctrl-q.
    let mut t = Terminal::run(&d, &["run", "-it", "--name", "shell", "busybox", "sh"]);
    t.type_keys(b"echo one$((1+1))\r");
    t.expect("one2", 0);
    t.type_keys(b"\x10\x11");
    // `docker run` ends quietly on a detach, as with dockerd.
    assert_eq!(t.exit_code(), Some(0), "{:?}", t.text());
    assert_eq!(running(&d, "shell"), "true");
    // The shell is still there, with what it had.
    d.ok(&["exec", "shell", "true"]);

    // docker attach with keys of its own; ctrl-p ctrl-q is then just input.
    let mut t = Terminal::run(&d, &["attach", "--detach-keys", "ctrl-x,x", "shell"]);
    // (ctrl-u: the shell's line editor took ctrl-p as "previous line".)
    t.type_keys(b"\x10\x11\x15echo two$((2+1))\r");
    t.expect("two3", 0);
    let mark = t.text().len();
    t.type_keys(b"\x18x");
    let code = t.exit_code();
    t.expect("read escape sequence", mark);
    assert_eq!(code, Some(1), "{:?}", t.text());
    assert_eq!(running(&d, "shell"), "true");

    // Attached again, the shell answers, and exit ends it as usual.
    let mut t = Terminal::run(&d, &["attach", "shell"]);
    t.type_keys(b"echo three$((3+1))\r");
    t.expect("three4", 0);
    t.type_keys(b"exit 3\r");
    assert_eq!(t.exit_code(), Some(3), "{:?}", t.text());
    assert_eq!(running(&d, "shell"), "false");
}
