//! The agent's state machine: answering host messages, reaping children,
//! reporting the exit.
//!
//! Lock order: `state` before the writer. Every message that reports a
//! state change (`Started`, `Exited`, the `State` answer to `Hello`) is
//! written while `state` is held, so the host sees them in a consistent
//! order.
//!
//! Output is kept until the host acknowledges it (see `channel::Writer`):
//! the answer to `Hello` replays what is unacknowledged between the sync
//! marker and the `State` message, so every output frame still precedes the
//! report of the exit.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use vessel_protocol::{GuestMsg, HostMsg, ProcessSpec, ProcessState};

use crate::channel::Writer;
use crate::command::{self, StartError};
use crate::process::{self, StdinCmd};
use crate::{rootfs, system, user};

/// How long to wait for output to drain after the main process exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// The running (or finishing) container process.
struct Running {
    pid: i32,
    /// The main process has been reaped; the exit is being reported.
    exited: bool,
    stdin: Option<mpsc::Sender<StdinCmd>>,
    pty_master: Option<Arc<std::os::fd::OwnedFd>>,
    pumps_done: Option<(mpsc::Receiver<()>, usize)>,
    muted: Arc<AtomicBool>,
    oom_before: u64,
}

#[derive(Default)]
struct State {
    rootfs: Option<PathBuf>,
    running: Option<Running>,
    exit: Option<(i32, bool)>,
}

impl State {
    fn process_state(&self) -> ProcessState {
        match (&self.running, self.exit) {
            (_, Some((exit_code, oom_killed))) => ProcessState::Exited {
                exit_code,
                oom_killed,
            },
            (Some(r), None) => ProcessState::Running { pid: r.pid as u32 },
            (None, None) => ProcessState::Idle,
        }
    }
}

/// Everything the agent's threads share.
pub struct Agent {
    writer: Arc<Writer>,
    state: Mutex<State>,
}

impl Agent {
    /// A new, idle agent writing to `writer`.
    pub fn new(writer: Arc<Writer>) -> Arc<Self> {
        Arc::new(Self {
            writer,
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Logs and reports a non-fatal error to the host.
    pub fn error(&self, message: impl Into<String>) {
        let message = message.into();
        crate::log!("error: {message}");
        self.writer.send(&GuestMsg::Error { message });
    }

    /// Handles one control message.
    pub fn handle(&self, msg: HostMsg) {
        match msg {
            HostMsg::Hello { nonce } => self.hello(&nonce),
            HostMsg::Start(spec) => self.start(&spec),
            HostMsg::CloseStdin => {
                let st = self.state();
                if let Some(tx) = st.running.as_ref().and_then(|r| r.stdin.as_ref()) {
                    let _ = tx.send(StdinCmd::Close);
                }
            }
            HostMsg::Resize { rows, cols } => {
                let st = self.state();
                if let Some(master) = st.running.as_ref().and_then(|r| r.pty_master.as_ref()) {
                    if let Err(e) = process::set_winsize(master, rows, cols) {
                        crate::log!("resize: {e}");
                    }
                }
            }
            HostMsg::Signal { signal } => self.signal(signal),
            HostMsg::Shutdown => {
                crate::log!("shutdown requested");
                system::reboot();
            }
            HostMsg::Ack { seq } => self.writer.ack(seq),
        }
    }

    /// Data for the process's stdin.
    pub fn stdin(&self, data: Vec<u8>) {
        let st = self.state();
        if let Some(tx) = st.running.as_ref().and_then(|r| r.stdin.as_ref()) {
            let _ = tx.send(StdinCmd::Data(data));
        }
    }

    /// Answers `Hello`: the sync marker, every unacknowledged output frame
    /// in order, then `State`, all under one writer lock.
    fn hello(&self, nonce: &str) {
        let st = self.state();
        let Some(marker) = vessel_protocol::sync_marker(nonce) else {
            drop(st);
            self.error(format!("bad hello nonce {nonce:?}"));
            return;
        };
        let msg = GuestMsg::State {
            kernel_release: system::kernel_release(),
            process: st.process_state(),
        };
        let mut w = self.writer.lock();
        let result = w.replay(&marker).and_then(|()| w.send(&msg));
        if let Err(e) = result {
            crate::log!("answering hello: {e}");
        }
    }

    fn signal(&self, signal: i32) {
        let st = self.state();
        let Some(pid) = st.running.as_ref().filter(|r| !r.exited).map(|r| r.pid) else {
            drop(st);
            return self.error("no running process to signal");
        };
        // `st` stays locked until after kill: the reaper reaps under this
        // lock, so `pid` cannot be reaped and reused in between.
        // Any signal 1..=SIGRTMAX, real-time ones included (Docker allows them).
        if !(1..=libc::SIGRTMAX()).contains(&signal) {
            return self.error(format!("invalid signal {signal}"));
        }
        // SAFETY: kill(2) with integer arguments; `pid` is the container's
        // main process, which has not been reaped yet (`exited` is false).
        if unsafe { libc::kill(pid, signal) } < 0 {
            let e = std::io::Error::last_os_error();
            self.error(format!("kill {pid} {signal}: {e}"));
        }
    }

    fn start(&self, spec: &ProcessSpec) {
        let mut st = self.state();
        if st.running.is_some() || st.exit.is_some() {
            drop(st);
            return self.error("the container process was already started");
        }
        match self.try_start(&mut st, spec) {
            Ok(running) => {
                let pid = running.pid;
                st.running = Some(running);
                crate::log!("started pid {pid}");
            }
            Err(e) => {
                crate::log!("start failed: {}", e.message);
                self.writer.send(&GuestMsg::StartFailed {
                    message: e.message,
                    exit_code: e.exit_code,
                });
            }
        }
    }

    /// Builds the rootfs (once), resolves everything, spawns, sends
    /// `Started` and starts the pumps — all under the state lock, so the
    /// reaper cannot report an exit before `Started`.
    fn try_start(&self, st: &mut State, spec: &ProcessSpec) -> Result<Running, StartError> {
        let root = match &st.rootfs {
            Some(r) => r.clone(),
            None => {
                let t0 = std::time::Instant::now();
                crate::system::adopt_identity(spec.clock_unix_ns, &spec.entropy);
                crate::system::flush_block_cache(&spec.rootfs.image_device);
                crate::system::flush_block_cache(&spec.rootfs.upper_device);
                let t1 = t0.elapsed();
                let root = rootfs::mount_rootfs(&spec.rootfs)
                    .map_err(|e| StartError::other(e.to_string()))?;
                crate::log!(
                    "identity {} ms, root filesystem {} ms",
                    t1.as_millis(),
                    (t0.elapsed() - t1).as_millis()
                );
                st.rootfs = Some(root.clone());
                root
            }
        };
        rootfs::write_etc(&root, &spec.hostname, &spec.extra_hosts)
            .map_err(|e| StartError::other(format!("writing /etc/hosts: {e}")))?;
        if !spec.hostname.is_empty() {
            if let Err(e) = nix::unistd::sethostname(&spec.hostname) {
                crate::log!("sethostname: {e}");
            }
        }
        let user = user::resolve_in_root(&root, &spec.user)?;
        let env = command::build_env(&spec.env, &spec.hostname, &user.home, spec.tty);
        let cwd = if spec.cwd.is_empty() {
            "/".to_string()
        } else {
            spec.cwd.clone()
        };
        // The working directory may not exist yet: the lookup of a relative
        // program only needs it as a prefix; spawn creates it.
        let program = command::resolve_program(&root, &cwd, &env, &spec.args)?;
        let oom_before = system::oom_kills();
        let spawned = process::spawn(process::Launch {
            root: &root,
            program,
            args: &spec.args,
            env,
            cwd,
            user,
            tty: spec.tty,
            tty_size: spec.tty_size,
            open_stdin: spec.open_stdin,
        })
        .map_err(|e| spawn_error(&spec.args, &e))?;
        self.writer.send(&GuestMsg::Started {
            pid: spawned.pid as u32,
        });
        let muted = Arc::new(AtomicBool::new(false));
        let count = spawned.outputs.len();
        let done = process::start_pumps(spawned.outputs, self.writer.clone(), muted.clone());
        Ok(Running {
            pid: spawned.pid,
            exited: false,
            stdin: spawned.stdin,
            pty_master: spawned.pty_master,
            pumps_done: Some((done, count)),
            muted,
            oom_before,
        })
    }

    /// The reaper: PID 1 reaps every child. It peeks with `WNOWAIT`, then
    /// reaps under the state lock so a child that fails during `spawn`
    /// (which std reaps itself) is never stolen from std.
    pub fn reap_forever(self: &Arc<Self>) {
        loop {
            let pid = match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Ok(status) => match status.pid() {
                    Some(pid) => pid,
                    None => continue,
                },
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::ECHILD) => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => {
                    crate::log!("waitid: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let mut st = self.state();
            let status = waitpid(pid, Some(WaitPidFlag::WNOHANG));
            let exit_code = match status {
                Ok(WaitStatus::Exited(_, code)) => code,
                Ok(WaitStatus::Signaled(_, sig, _)) => 128 + sig as i32,
                _ => continue,
            };
            let is_main = st
                .running
                .as_mut()
                .filter(|r| r.pid == pid.as_raw() && !r.exited);
            if let Some(r) = is_main {
                r.exited = true;
                drop(st);
                let agent = self.clone();
                std::thread::spawn(move || agent.finish(exit_code));
            }
        }
    }

    /// After the main process exited: kill what is left, drain the output,
    /// sync, and report `Exited` after the last output frame.
    fn finish(&self, exit_code: i32) {
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        let (pumps, muted, oom_before) = {
            let mut st = self.state();
            match st.running.as_mut() {
                Some(r) => {
                    r.stdin = None; // ends the stdin thread
                    (r.pumps_done.take(), r.muted.clone(), r.oom_before)
                }
                None => (None, Arc::new(AtomicBool::new(false)), 0),
            }
        };
        if let Some((done, count)) = pumps {
            let mut deadline = Instant::now() + DRAIN_TIMEOUT;
            let mut finished = 0;
            while finished < count {
                let left = deadline.saturating_duration_since(Instant::now());
                match done.recv_timeout(left) {
                    Ok(()) => finished += 1,
                    // A pump waits for the host to acknowledge output (the
                    // daemon may be down): that output must not be lost, so
                    // keep waiting as long as the host holds it up.
                    Err(mpsc::RecvTimeoutError::Timeout) if self.writer.output_blocked() => {
                        deadline = Instant::now() + DRAIN_TIMEOUT;
                    }
                    Err(_) => {
                        crate::log!("output did not drain in {DRAIN_TIMEOUT:?}");
                        break;
                    }
                }
            }
        }
        nix::unistd::sync();
        let oom_killed = system::oom_kills() > oom_before;
        crate::log!("process exited with {exit_code} (oom_killed={oom_killed})");
        let mut st = self.state();
        st.exit = Some((exit_code, oom_killed));
        // Under the writer lock: no pump frame can follow `Exited`.
        let mut w = self.writer.lock();
        muted.store(true, Ordering::SeqCst);
        if let Err(e) = w.send(&GuestMsg::Exited {
            exit_code,
            oom_killed,
        }) {
            crate::log!("sending exit: {e}");
        }
        drop(w);
        self.writer.wake_output();
        if let Some(r) = st.running.as_mut() {
            r.pty_master = None;
        }
    }
}

/// Maps an error of `spawn` (chroot, exec...) to a Docker-style start error.
fn spawn_error(args: &[String], e: &std::io::Error) -> StartError {
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
