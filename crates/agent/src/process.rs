//! Starting container processes (the main one and `docker exec`s) and
//! moving their stdio.
//!
//! Every process is forked by [`spawn`] with `std::process::Command` and a
//! `pre_exec` hook that does, in order: `setsid`, `TIOCSCTTY` (with a TTY),
//! `chroot`, `mkdir -p` (main process only) + `chdir` of the working
//! directory, `setgroups`, `setgid`, `setuid`. The hook only makes raw
//! system calls on data prepared before the fork (no allocation). Output is
//! read by one thread per stream and sent to a [`Sink`]; stdin is written by
//! one thread fed through a channel so the main loop never blocks on a full
//! pipe.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};

use vessel_protocol::FrameKind;

use crate::channel::Writer;
use crate::command::{self, StartError};
use crate::user::ExecUser;

/// What to run, resolved but for the program (see [`start`]).
pub struct Launch<'a> {
    /// Root directory to chroot into.
    pub root: &'a Path,
    /// argv, `args[0]` kept as the user gave it and looked up in the
    /// container's `PATH` by [`start`].
    pub args: &'a [String],
    /// Environment.
    pub env: Vec<(String, String)>,
    /// Working directory inside the root (absolute).
    pub cwd: String,
    /// Identity.
    pub user: ExecUser,
    /// Allocate a TTY.
    pub tty: bool,
    /// Initial TTY size (rows, cols).
    pub tty_size: Option<(u16, u16)>,
    /// Keep stdin open.
    pub open_stdin: bool,
    /// Create a missing working directory (the main process); an exec's
    /// must exist.
    pub create_cwd: bool,
    /// Privileges and limits (see [`crate::restrict`]).
    pub guard: Option<Arc<crate::restrict::Guard>>,
}

/// Where a process's output goes.
#[derive(Clone)]
pub enum Sink {
    /// The main process: numbered `Stdout`/`Stderr` frames kept until
    /// acknowledged (see [`Writer::send_output`]); nothing more once `muted`
    /// is set (the exit has been reported).
    Main {
        /// The channel.
        writer: Arc<Writer>,
        /// Set once `Exited` was sent.
        muted: Arc<AtomicBool>,
    },
    /// An exec: `ExecStdout`/`ExecStderr` frames for `exec_id`, neither
    /// numbered nor kept (see [`Writer::send_exec`]); nothing more once
    /// `closed` is set (its `ExecExited` was sent).
    Exec {
        /// The channel.
        writer: Arc<Writer>,
        /// Exec id.
        exec_id: u32,
        /// Set once `ExecExited` was sent.
        closed: Arc<AtomicBool>,
    },
}

/// A command for the stdin thread.
pub enum StdinCmd {
    /// Bytes to write.
    Data(Vec<u8>),
    /// Close the process's stdin.
    Close,
}

/// The agent's handles on a started process.
pub struct Spawned {
    /// PID in the guest.
    pub pid: i32,
    /// Feeds the stdin thread (`None` when stdin is not open).
    pub stdin: Option<mpsc::Sender<StdinCmd>>,
    /// The PTY master (for resizing), with a TTY.
    pub pty_master: Option<Arc<OwnedFd>>,
    /// Output streams to pump, with the frame kind they become.
    pub outputs: Vec<(File, FrameKind)>,
}

/// The `/dev/pts/ptmx` of the container's devpts instance, so that the
/// process's TTY is `/dev/pts/N` of its own `/dev`.
fn open_pty(root: &Path, size: Option<(u16, u16)>, owner: u32) -> io::Result<(OwnedFd, OwnedFd)> {
    let ptmx = root.join("dev/pts/ptmx");
    let master = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&ptmx)
        .map_err(|e| io::Error::other(format!("open {}: {e}", ptmx.display())))?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int from a valid pointer on a pty master we own.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes an unsigned int to a valid pointer.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let slave_path = root.join(format!("dev/pts/{n}"));
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&slave_path)?;
    // The user owns its terminal, as with a login; group tty (5) stays.
    if let Err(e) = nix::unistd::fchown(&slave, Some(owner.into()), None) {
        crate::log!("chown {}: {e}", slave_path.display());
    }
    let master = OwnedFd::from(master);
    if let Some((rows, cols)) = size {
        set_winsize(&master, rows, cols)?;
    }
    Ok((master, OwnedFd::from(slave)))
}

/// `TIOCSWINSZ` on a PTY master.
pub fn set_winsize(master: &OwnedFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn cstring(s: impl AsRef<[u8]>) -> io::Result<CString> {
    CString::new(s.as_ref()).map_err(|_| io::Error::other("path contains a NUL byte"))
}

/// Finds the program for `l.args` inside the container and spawns it: the
/// one way both the main process and every exec start. Errors carry
/// Docker's messages and exit codes.
pub fn start(l: &Launch<'_>) -> Result<Spawned, StartError> {
    // The working directory may not exist yet: the lookup of a relative
    // program only needs it as a prefix; spawn creates it (main process).
    let program = command::resolve_program(l.root, &l.cwd, &l.env, l.args)?;
    spawn(l, &program).map_err(|e| spawn_error(l.args, &e))
}

/// Maps an error of `spawn` (chroot, exec...) to a Docker-style start error.
fn spawn_error(args: &[String], e: &io::Error) -> StartError {
    let name = args.first().map(String::as_str).unwrap_or("");
    match e.raw_os_error() {
        Some(libc::ENOENT) => StartError {
            message: format!("exec: \"{name}\": stat {name}: no such file or directory"),
            exit_code: 127,
        },
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::ENOEXEC) => StartError {
            message: format!("exec: \"{name}\": permission denied"),
            exit_code: 126,
        },
        _ => StartError {
            message: format!("exec: \"{name}\": {e}"),
            exit_code: 126,
        },
    }
}

/// Forks and execs `program` (a path inside the root) with `l` (see the
/// module doc for the exec sequence).
pub fn spawn(l: &Launch<'_>, program: &str) -> io::Result<Spawned> {
    let root = cstring(l.root.as_os_str().as_bytes())?;
    let cwd = if l.cwd.starts_with('/') {
        l.cwd.clone()
    } else {
        format!("/{}", l.cwd)
    };
    // Every prefix of the working directory, for `mkdir -p` after chroot.
    let mut prefixes = Vec::new();
    let mut acc = String::new();
    for part in cwd.split('/').filter(|p| !p.is_empty()) {
        acc.push('/');
        acc.push_str(part);
        prefixes.push(cstring(&acc)?);
    }
    let cwd_c = cstring(&cwd)?;
    if !l.create_cwd {
        prefixes.clear();
    }
    let groups: Vec<libc::gid_t> = l.user.sgids.clone();
    let (uid, gid, tty) = (l.user.uid, l.user.gid, l.tty);
    let guard = l.guard.clone();

    let mut cmd = Command::new(program);
    cmd.arg0(l.args.first().map(String::as_str).unwrap_or(program));
    cmd.args(l.args.iter().skip(1));
    cmd.env_clear();
    cmd.envs(l.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));

    let mut pty_master = None;
    if l.tty {
        let (master, slave) = open_pty(l.root, l.tty_size, uid)?;
        cmd.stdin(Stdio::from(slave.try_clone()?));
        cmd.stdout(Stdio::from(slave.try_clone()?));
        cmd.stderr(Stdio::from(slave));
        pty_master = Some(Arc::new(master));
    } else {
        cmd.stdin(if l.open_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.stdout(Stdio::piped());
        cmd.stderr(Stdio::piped());
    }

    let hook = move || -> io::Result<()> {
        // Only async-signal-safe system calls on pre-built data below.
        let check = |r: libc::c_long| {
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: setsid(2) has no memory-safety preconditions.
        check(unsafe { libc::setsid() }.into())?;
        if tty {
            // SAFETY: TIOCSCTTY takes an integer argument; fd 0 is the PTY slave.
            check(unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) }.into())?;
        }
        if let Some(g) = &guard {
            g.before_chroot()?;
        }
        // SAFETY: `root` is a valid NUL-terminated string owned by the closure.
        check(unsafe { libc::chroot(root.as_ptr()) }.into())?;
        for p in &prefixes {
            // SAFETY: `p` is a valid NUL-terminated string; EEXIST is expected.
            unsafe { libc::mkdir(p.as_ptr(), 0o755) };
        }
        // SAFETY: `cwd_c` is a valid NUL-terminated string.
        check(unsafe { libc::chdir(cwd_c.as_ptr()) }.into())?;
        // Raw system calls: only this thread exists in the child, so glibc's
        // cross-thread setxid broadcast is neither needed nor safe after fork.
        if let Some(g) = &guard {
            g.before_setuid()?;
        }
        // SAFETY: `groups` is a valid array of `groups.len()` gid_t.
        check(unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) })?;
        // SAFETY: setgid(2) with an integer argument.
        check(unsafe { libc::syscall(libc::SYS_setgid, gid) })?;
        // SAFETY: setuid(2) with an integer argument.
        check(unsafe { libc::syscall(libc::SYS_setuid, uid) })?;
        if let Some(g) = &guard {
            g.after_setuid(uid)?;
        }
        Ok(())
    };
    // SAFETY: the hook performs only raw system calls on data captured before
    // the fork; it neither allocates nor takes locks.
    unsafe { cmd.pre_exec(hook) };

    let mut child = cmd.spawn()?;
    // Drop our copies of the PTY slave now that the child has it.
    drop(cmd);
    let pid = i32::try_from(child.id()).map_err(io::Error::other)?;

    let mut outputs = Vec::new();
    let mut stdin_file: Option<File> = None;
    if let Some(master) = &pty_master {
        outputs.push((File::from(master.try_clone()?), FrameKind::Stdout));
        if l.open_stdin {
            stdin_file = Some(File::from(master.try_clone()?));
        }
    } else {
        if let Some(out) = child.stdout.take() {
            outputs.push((File::from(OwnedFd::from(out)), FrameKind::Stdout));
        }
        if let Some(err) = child.stderr.take() {
            outputs.push((File::from(OwnedFd::from(err)), FrameKind::Stderr));
        }
        stdin_file = child.stdin.take().map(|s| File::from(OwnedFd::from(s)));
    }
    // `child` is dropped without waiting: the reaper thread owns waitpid.
    drop(child);

    let stdin = stdin_file.map(|f| start_stdin(f, tty));
    Ok(Spawned {
        pid,
        stdin,
        pty_master,
        outputs,
    })
}

/// The stdin thread: writes what the main loop sends; `Close` closes the
/// pipe (ignored for a TTY, whose master is also the output).
pub fn start_stdin(file: File, tty: bool) -> mpsc::Sender<StdinCmd> {
    let (tx, rx) = mpsc::channel::<StdinCmd>();
    std::thread::spawn(move || {
        let mut file = Some(file);
        for cmd in rx {
            match cmd {
                StdinCmd::Data(bytes) => {
                    if let Some(f) = file.as_mut() {
                        if let Err(e) = f.write_all(&bytes) {
                            crate::log!("writing stdin: {e}");
                            file = None;
                        }
                    }
                }
                StdinCmd::Close if !tty => file = None,
                StdinCmd::Close => {}
            }
        }
    });
    tx
}

impl Sink {
    /// Sends one chunk of output read from a `Stdout` or `Stderr` stream.
    /// Returns `false` when the pump must stop (the exit was reported).
    /// `failed` makes an exec's write errors logged once per stream.
    fn send(&self, kind: FrameKind, data: &[u8], failed: &mut bool) -> bool {
        match self {
            // Waits while the host has too much unacknowledged output,
            // which back-pressures the process.
            Sink::Main { writer, muted } => writer.send_output(kind, data, muted),
            Sink::Exec {
                writer,
                exec_id,
                closed,
            } => {
                let kind = match kind {
                    FrameKind::Stderr => FrameKind::ExecStderr,
                    _ => FrameKind::ExecStdout,
                };
                match writer.send_exec(kind, *exec_id, data, closed) {
                    Ok(more) => more,
                    Err(e) => {
                        // Dropped; keep draining so the process never blocks.
                        if !*failed {
                            crate::log!("sending output of exec {exec_id}: {e}");
                            *failed = true;
                        }
                        true
                    }
                }
            }
        }
    }
}

/// Starts one thread per output stream. Each sends its data to `sink`
/// until EOF (EIO on a PTY master whose slave is closed), then reports on
/// `done`. Once the sink is muted (the exit has been reported) nothing more
/// is sent.
pub fn start_pumps(outputs: Vec<(File, FrameKind)>, sink: Sink) -> mpsc::Receiver<()> {
    let (done_tx, done_rx) = mpsc::channel();
    for (mut file, kind) in outputs {
        let sink = sink.clone();
        let done = done_tx.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut failed = false;
            loop {
                match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if !sink.send(kind, &buf[..n], &mut failed) {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
                    Err(e) => {
                        crate::log!("reading output: {e}");
                        break;
                    }
                }
            }
            let _ = done.send(());
        });
    }
    done_rx
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a real process in a chroot: needs root (skipped otherwise) and a
    /// static busybox on the host. Never calls the reaper or `kill(-1)`.
    #[test]
    fn spawn_chroots_creates_cwd_drops_privileges_and_pumps_output() {
        if !nix::unistd::geteuid().is_root() || !Path::new("/usr/bin/busybox").exists() {
            eprintln!("skipped: needs root and /usr/bin/busybox");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("bin")).expect("mkdir");
        crate::test_support::install_busybox(&dir.path().join("bin/busybox"));
        let (rx, tx) = nix::unistd::pipe().expect("pipe");
        let writer = Arc::new(Writer::connected(File::from(tx)));
        let args: Vec<String> = [
            "sh",
            "-c",
            "echo out; echo err >&2; echo $(id -u):$(id -g):$(id -G) $PWD $FOO",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let spawned = spawn(
            &Launch {
                root: dir.path(),
                args: &args,
                env: vec![("FOO".into(), "bar".into())],
                cwd: "/work/dir".into(),
                user: ExecUser {
                    uid: 1234,
                    gid: 5678,
                    sgids: vec![5678, 42],
                    home: "/".into(),
                },
                tty: false,
                tty_size: None,
                open_stdin: false,
                create_cwd: true,
                guard: None,
            },
            "/bin/busybox",
        )
        .expect("spawn");
        let done = start_pumps(
            spawned.outputs,
            Sink::Main {
                writer: writer.clone(),
                muted: Arc::new(AtomicBool::new(false)),
            },
        );
        for _ in 0..2 {
            done.recv_timeout(std::time::Duration::from_secs(10))
                .expect("pump done");
        }
        let status =
            nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(spawned.pid), None).expect("wait");
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(spawned.pid), 0)
        );
        drop(writer);
        let mut bytes = Vec::new();
        File::from(rx).read_to_end(&mut bytes).expect("read");
        let mut d = vessel_protocol::Decoder::new();
        d.push(&bytes);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(f) = d.next_frame().expect("frame") {
            let (_, data) = vessel_protocol::split_output(&f.payload).expect("seq");
            match f.kind {
                FrameKind::Stdout => out.extend(data),
                FrameKind::Stderr => err.extend(data),
                k => panic!("unexpected {k:?}"),
            }
        }
        assert_eq!(
            String::from_utf8_lossy(&out),
            "out\n1234:5678:5678 42 /work/dir bar\n"
        );
        assert_eq!(String::from_utf8_lossy(&err), "err\n");
        assert!(dir.path().join("work/dir").is_dir());
    }
}
