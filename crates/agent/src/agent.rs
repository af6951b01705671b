//! The agent's state machine: answering host messages, reaping children,
//! reporting the exits of the main process and of execs.
//!
//! Lock order: `state` before the writer. Every message that reports a
//! state change (`Started`, `Exited`, `ExecStarted`, `ExecExited`, the
//! `State` answer to `Hello`) is written while `state` is held, so the host
//! sees them in a consistent order: `ExecStarted` before any output of that
//! exec, every `ExecExited` before the main process's `Exited`.
//!
//! Output of the main process is kept until the host acknowledges it (see
//! `channel::Writer`): the answer to `Hello` replays what is unacknowledged
//! between the sync marker and the `State` message, so every output frame
//! still precedes the report of the exit. Output of execs is neither
//! numbered nor kept: an exec session dies with its client.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use vessel_protocol::{ExecSpec, GuestMsg, HostMsg, ProcessSpec, ProcessState};

use crate::channel::Writer;
use crate::command::{self, StartError};
use crate::process::{self, Sink, StdinCmd};
use crate::{rootfs, system, user};

/// How long to wait for output to drain after a process exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the main process's exit waits for the execs it killed to be
/// reported (each drains for at most [`DRAIN_TIMEOUT`]).
const EXECS_TIMEOUT: Duration = Duration::from_secs(3);

/// Exit code reported for an exec whose end could not be observed.
const KILLED_EXIT_CODE: i32 = 128 + libc::SIGKILL;

/// The running (or finishing) container process.
struct Running {
    pid: i32,
    /// What it was started with: the defaults of every exec.
    spec: ProcessSpec,
    /// The main process has been reaped; the exit is being reported.
    exited: bool,
    stdin: Option<mpsc::Sender<StdinCmd>>,
    pty_master: Option<Arc<std::os::fd::OwnedFd>>,
    pumps_done: Option<(mpsc::Receiver<()>, usize)>,
    muted: Arc<AtomicBool>,
    oom_before: u64,
}

/// A running (or finishing) exec process.
struct ExecProc {
    pid: i32,
    /// Reaped; its exit is being reported.
    exited: bool,
    stdin: Option<mpsc::Sender<StdinCmd>>,
    pty_master: Option<Arc<std::os::fd::OwnedFd>>,
    pumps_done: Option<(mpsc::Receiver<()>, usize)>,
    /// Set, under the writer lock, once `ExecExited` was sent.
    closed: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    rootfs: Option<PathBuf>,
    /// The host's clock and entropy were taken (once per VM, at `Start`).
    identity: bool,
    running: Option<Running>,
    exit: Option<(i32, bool)>,
    /// Execs by id, until their `ExecExited` is sent.
    execs: HashMap<u32, ExecProc>,
    /// Stdin of `CopyIn` children by copy id.
    copies: HashMap<u32, mpsc::Sender<StdinCmd>>,
    /// The container's hostname, for rewriting `/etc/hosts`.
    hostname: String,
    /// Privileges and limits of the container's processes, for execs.
    guard: Option<Arc<crate::restrict::Guard>>,
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
    pub fn handle(self: &Arc<Self>, msg: HostMsg) {
        match msg {
            HostMsg::Hello { nonce } => self.hello(&nonce),
            HostMsg::Prepare(rootfs) => self.prepare(&rootfs),
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
            HostMsg::Exec { exec_id, spec } => self.exec(exec_id, &spec),
            HostMsg::ExecCloseStdin { exec_id } => {
                let mut st = self.state();
                if let Some(tx) = st.execs.get(&exec_id).and_then(|e| e.stdin.as_ref()) {
                    let _ = tx.send(StdinCmd::Close);
                } else if let Some(tx) = st.copies.remove(&exec_id) {
                    let _ = tx.send(StdinCmd::Close);
                }
            }
            HostMsg::Top { req_id, format } => {
                let root = self.state().rootfs.clone();
                self.writer.send(&GuestMsg::Top {
                    req_id,
                    titles: crate::top::titles(format),
                    processes: crate::top::processes(root.as_deref(), format),
                });
            }
            HostMsg::SetPidsLimit { req_id, limit } => {
                let error = crate::restrict::set_pids_limit(limit)
                    .err()
                    .map(|e| e.to_string());
                self.writer.send(&GuestMsg::Updated { req_id, error });
            }
            HostMsg::Stats { req_id } => {
                let (pids, memory) = crate::restrict::usage();
                self.writer.send(&GuestMsg::Stats {
                    req_id,
                    pids,
                    memory,
                });
            }
            HostMsg::CopyStat { copy_id, path } => self.copy_stat(copy_id, &path),
            HostMsg::CopyOut {
                copy_id,
                layer: true,
                ..
            } => self.layer_out(copy_id),
            HostMsg::CopyOut {
                copy_id,
                path,
                export,
                layer: false,
            } => self.copy_out(copy_id, path, export),
            HostMsg::Diff { copy_id } => {
                let has_root = self.state().rootfs.is_some();
                match crate::diff::changes(has_root) {
                    Ok(changes) => self.writer.send(&GuestMsg::Changes { copy_id, changes }),
                    Err(e) => self.copy_done(copy_id, Err(e), false),
                }
            }
            HostMsg::CopyIn {
                copy_id,
                path,
                keep_owners,
            } => self.copy_in(copy_id, path, keep_owners),
            HostMsg::ExecResize {
                exec_id,
                rows,
                cols,
            } => {
                let st = self.state();
                if let Some(master) = st.execs.get(&exec_id).and_then(|e| e.pty_master.as_ref()) {
                    if let Err(e) = process::set_winsize(master, rows, cols) {
                        crate::log!("resize of exec {exec_id}: {e}");
                    }
                }
            }
            HostMsg::ExecSignal { exec_id, signal } => {
                let st = self.state();
                // Under the state lock: the reaper reaps under it, so the
                // pid cannot be reaped and reused in between.
                let Some(pid) = st.execs.get(&exec_id).filter(|e| !e.exited).map(|e| e.pid) else {
                    return;
                };
                if !(1..=libc::SIGRTMAX()).contains(&signal) {
                    drop(st);
                    return self.error(format!("invalid signal {signal}"));
                }
                // SAFETY: getpgid(2) and kill(2) with integer arguments; `pid`
                // is an exec's process that has not been reaped.
                let target = if unsafe { libc::getpgid(pid) } == pid {
                    -pid
                } else {
                    pid
                };
                // SAFETY: as above.
                if unsafe { libc::kill(target, signal) } < 0 {
                    let e = std::io::Error::last_os_error();
                    drop(st);
                    self.error(format!("kill exec {exec_id} ({pid}) {signal}: {e}"));
                }
            }
            HostMsg::SetInterfaces {
                req_id,
                interfaces,
                hosts,
            } => {
                let (root, hostname) = {
                    let st = self.state();
                    (st.rootfs.clone(), st.hostname.clone())
                };
                let mut result = crate::net::apply(&interfaces).map_err(|e| e.to_string());
                if let (Ok(()), Some(root)) = (&result, root) {
                    result = rootfs::write_etc(&root, &hostname, &hosts)
                        .map_err(|e| format!("writing /etc/hosts: {e}"));
                }
                self.writer.send(&GuestMsg::InterfacesSet {
                    req_id,
                    error: result.err(),
                });
            }
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

    /// The payload of an `ExecStdin` frame: data for that exec's stdin.
    /// Frames for an unknown (or finished) exec, or without an exec id, are
    /// ignored.
    pub fn exec_stdin(&self, payload: &[u8]) {
        let Some((exec_id, data)) = vessel_protocol::split_exec_data(payload) else {
            crate::log!("ignoring an ExecStdin frame without an exec id");
            return;
        };
        let st = self.state();
        if let Some(tx) = st.execs.get(&exec_id).and_then(|e| e.stdin.as_ref()) {
            let _ = tx.send(StdinCmd::Data(data.to_vec()));
        } else if let Some(tx) = st.copies.get(&exec_id) {
            let _ = tx.send(StdinCmd::Data(data.to_vec()));
        }
    }

    fn copy_done(&self, copy_id: u32, result: Result<(), std::io::Error>, not_dir: bool) {
        let (error, not_found) = match result {
            Ok(()) => (None, false),
            Err(e) => (
                Some(e.to_string()),
                e.kind() == std::io::ErrorKind::NotFound,
            ),
        };
        self.writer.send(&GuestMsg::CopyDone {
            copy_id,
            error,
            not_found,
            not_dir,
        });
    }

    fn copy_root(&self) -> std::io::Result<PathBuf> {
        self.state()
            .rootfs
            .clone()
            .ok_or_else(|| std::io::Error::other("the container's root filesystem is not mounted"))
    }

    fn copy_stat(&self, copy_id: u32, path: &str) {
        match self
            .copy_root()
            .and_then(|root| crate::copy::stat(&root, path))
        {
            Ok(stat) => self.writer.send(&GuestMsg::CopyStat { copy_id, stat }),
            Err(e) => self.copy_done(copy_id, Err(e), false),
        }
    }

    /// Streams `path` as a tar (on a thread: the main loop keeps reading).
    fn copy_out(self: &Arc<Self>, copy_id: u32, path: String, export: bool) {
        let agent = self.clone();
        std::thread::spawn(move || {
            let result = (|| -> std::io::Result<()> {
                let root = agent.copy_root()?;
                let path = if export { "/".to_string() } else { path };
                let stat = crate::copy::stat(&root, &path)?;
                agent.writer.send(&GuestMsg::CopyStat { copy_id, stat });
                let arg = if export {
                    crate::copy::EXPORT_ARG
                } else {
                    crate::copy::COPY_OUT_ARG
                };
                let mut child = crate::copy::spawn(arg, &root, &path)?;
                let mut out = child
                    .stdout
                    .take()
                    .ok_or_else(|| std::io::Error::other("no stdout"))?;
                let mut buf = vec![0u8; 64 * 1024];
                let open = AtomicBool::new(false);
                loop {
                    let n = std::io::Read::read(&mut out, &mut buf)?;
                    if n == 0 {
                        break;
                    }
                    agent.writer.send_exec(
                        vessel_protocol::FrameKind::ExecStdout,
                        copy_id,
                        &buf[..n],
                        &open,
                    )?;
                }
                match crate::copy::child_error(&mut child) {
                    e if e.is_empty() => Ok(()),
                    e => Err(std::io::Error::other(e)),
                }
            })();
            agent.copy_done(copy_id, result, false);
        });
    }

    /// `docker commit`: streams the container's changes as a layer tar.
    fn layer_out(self: &Arc<Self>, copy_id: u32) {
        let agent = self.clone();
        std::thread::spawn(move || {
            let result = (|| -> std::io::Result<()> {
                let root = agent.copy_root()?;
                let stat = crate::copy::stat(&root, "/")?;
                agent.writer.send(&GuestMsg::CopyStat { copy_id, stat });
                let out = CopyWriter {
                    agent: &agent,
                    copy_id,
                    open: AtomicBool::new(false),
                };
                crate::diff::write_layer(true, std::io::BufWriter::with_capacity(64 * 1024, out))
            })();
            agent.copy_done(copy_id, result, false);
        });
    }

    /// Extracts the tar that follows into directory `path`.
    fn copy_in(self: &Arc<Self>, copy_id: u32, path: String, keep_owners: bool) {
        let started = (|| -> std::io::Result<std::process::Child> {
            let root = self.copy_root()?;
            if !crate::copy::is_dir(&root, &path)? {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotADirectory,
                    format!("extraction point is not a directory: {path}"),
                ));
            }
            let arg = if keep_owners {
                crate::copy::COPY_IN_OWNERS_ARG
            } else {
                crate::copy::COPY_IN_ARG
            };
            crate::copy::spawn(arg, &root, &path)
        })();
        let mut child = match started {
            Ok(c) => c,
            Err(e) => {
                let not_dir = e.kind() == std::io::ErrorKind::NotADirectory;
                return self.copy_done(copy_id, Err(e), not_dir);
            }
        };
        let Some(stdin) = child.stdin.take() else {
            return self.copy_done(copy_id, Err(std::io::Error::other("no stdin")), false);
        };
        let stdin = std::fs::File::from(std::os::fd::OwnedFd::from(stdin));
        let tx = process::start_stdin(stdin, false);
        self.state().copies.insert(copy_id, tx);
        let agent = self.clone();
        // The child exits once its stdin closes (`ExecCloseStdin`) and it
        // has extracted everything; its stderr says how it went.
        std::thread::spawn(move || {
            let result = match crate::copy::child_error(&mut child) {
                e if e.is_empty() => Ok(()),
                e => Err(std::io::Error::other(e)),
            };
            agent.state().copies.remove(&copy_id);
            agent.copy_done(copy_id, result, false);
        });
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

    /// Mounts the root filesystem ahead of `Start` (a warm VM).
    fn prepare(&self, spec: &vessel_protocol::RootfsSpec) {
        let mut st = self.state();
        match Self::mount_root(&mut st, spec) {
            Ok(root) => {
                drop(st);
                let t0 = std::time::Instant::now();
                warm_up(&root);
                crate::log!("warm-up {} ms", t0.elapsed().as_millis());
                self.writer.send(&GuestMsg::Prepared);
            }
            Err(e) => {
                drop(st);
                self.error(format!("preparing the root filesystem: {e}"));
            }
        }
    }

    /// The container's root: mounted on first use, then reused.
    fn mount_root(st: &mut State, spec: &vessel_protocol::RootfsSpec) -> std::io::Result<PathBuf> {
        if let Some(r) = &st.rootfs {
            return Ok(r.clone());
        }
        let t0 = std::time::Instant::now();
        // A restored VM may hold the template's cached blocks of these
        // devices; the container's disks are other files.
        crate::system::flush_block_cache(&spec.image_device);
        crate::system::flush_block_cache(&spec.upper_device);
        let root = rootfs::mount_rootfs(spec)?;
        crate::log!("root filesystem {} ms", t0.elapsed().as_millis());
        st.rootfs = Some(root.clone());
        Ok(root)
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
        let t0 = std::time::Instant::now();
        if !st.identity {
            crate::system::adopt_identity(spec.clock_unix_ns, &spec.entropy);
            st.identity = true;
        }
        let root =
            Self::mount_root(st, &spec.rootfs).map_err(|e| StartError::other(e.to_string()))?;
        // The machine id comes from the host's fresh entropy (hex): the
        // first 32 characters.
        if let Err(e) = rootfs::write_machine_id(&root, spec.entropy.get(..32).unwrap_or("")) {
            crate::log!("machine-id: {e}");
        }
        rootfs::write_etc(&root, &spec.hostname, &spec.extra_hosts)
            .map_err(|e| StartError::other(format!("writing /etc/hosts: {e}")))?;
        st.hostname = spec.hostname.clone();
        if let Some(text) = &spec.resolv_conf {
            rootfs::write_resolv_conf(&root, text)
                .map_err(|e| StartError::other(format!("writing /etc/resolv.conf: {e}")))?;
        }
        crate::net::apply(&spec.interfaces)
            .map_err(|e| StartError::other(format!("network interfaces: {e}")))?;
        if !spec.hostname.is_empty() {
            if let Err(e) = nix::unistd::sethostname(&spec.hostname) {
                crate::log!("sethostname: {e}");
            }
        }
        for (key, value) in &spec.sysctls {
            rootfs::set_sysctl(key, value).map_err(|e| StartError::other(e.to_string()))?;
        }
        crate::mounts::apply(&root, &spec.tmpfs, &spec.mounts)
            .map_err(|e| StartError::other(e.to_string()))?;
        if let Some(bytes) = spec.restrictions.shm_size {
            crate::restrict::resize_shm(&root, bytes)
                .map_err(|e| StartError::other(e.to_string()))?;
        }
        if spec.read_only {
            rootfs::make_read_only(&root).map_err(|e| StartError::other(e.to_string()))?;
        }
        let guard = Arc::new(
            crate::restrict::Guard::new(&spec.restrictions)
                .map_err(|e| StartError::other(format!("container restrictions: {e}")))?,
        );
        st.guard = Some(guard.clone());
        let t_etc = t0.elapsed();
        let mut user = user::resolve_in_root(&root, &spec.user)?;
        user.sgids.extend(user::extra_groups_in_root(
            &root,
            &spec.restrictions.group_add,
        )?);
        let env = command::build_env(&spec.env, &spec.hostname, &user.home, spec.tty);
        let oom_before = crate::restrict::oom_kills();
        let spawned = process::start(&process::Launch {
            root: &root,
            args: &spec.args,
            env,
            cwd: main_cwd(spec),
            user,
            tty: spec.tty,
            tty_size: spec.tty_size,
            open_stdin: spec.open_stdin,
            create_cwd: true,
            guard: Some(guard),
        })?;
        self.writer.send(&GuestMsg::Started {
            pid: spawned.pid as u32,
        });
        crate::log!(
            "start: identity+root+etc {} ms, then spawn {} ms",
            t_etc.as_millis(),
            (t0.elapsed() - t_etc).as_millis()
        );
        let muted = Arc::new(AtomicBool::new(false));
        let count = spawned.outputs.len();
        let done = process::start_pumps(
            spawned.outputs,
            Sink::Main {
                writer: self.writer.clone(),
                muted: muted.clone(),
            },
        );
        Ok(Running {
            pid: spawned.pid,
            spec: spec.clone(),
            exited: false,
            stdin: spawned.stdin,
            pty_master: spawned.pty_master,
            pumps_done: Some((done, count)),
            muted,
            oom_before,
        })
    }

    /// Starts exec `exec_id`, answering `ExecStarted` or `ExecFailed`.
    fn exec(&self, exec_id: u32, spec: &ExecSpec) {
        let mut st = self.state();
        match self.try_exec(&mut st, exec_id, spec) {
            Ok(proc) => {
                crate::log!("exec {exec_id} started pid {}", proc.pid);
                st.execs.insert(exec_id, proc);
            }
            Err(e) => {
                crate::log!("exec {exec_id} failed: {}", e.message);
                self.writer.send(&GuestMsg::ExecFailed {
                    exec_id,
                    message: e.message,
                    exit_code: e.exit_code,
                });
            }
        }
    }

    /// Resolves and spawns an exec the way the main process was, sends
    /// `ExecStarted` and starts its pumps, all under the state lock (so the
    /// reaper cannot report its exit before `ExecStarted`).
    fn try_exec(
        &self,
        st: &mut State,
        exec_id: u32,
        spec: &ExecSpec,
    ) -> Result<ExecProc, StartError> {
        let (Some(root), Some(main)) =
            (st.rootfs.clone(), st.running.as_ref().filter(|r| !r.exited))
        else {
            return Err(StartError::other("container is not running"));
        };
        if st.execs.contains_key(&exec_id) {
            return Err(StartError::other(format!(
                "exec id {exec_id} is already in use"
            )));
        }
        if spec.args.is_empty() {
            return Err(StartError::other("No exec command specified"));
        }
        let user_spec = if spec.user.is_empty() {
            &main.spec.user
        } else {
            &spec.user
        };
        let mut user = user::resolve_in_root(&root, user_spec)?;
        user.sgids.extend(user::extra_groups_in_root(
            &root,
            &main.spec.restrictions.group_add,
        )?);
        let env = exec_env(&main.spec, spec, &user.home);
        let cwd = exec_cwd(&main.spec, spec);
        check_exec_cwd(&root, &cwd)?;
        let spawned = process::start(&process::Launch {
            root: &root,
            args: &spec.args,
            env,
            cwd,
            user,
            tty: spec.tty,
            tty_size: spec.tty_size,
            open_stdin: spec.open_stdin,
            create_cwd: false,
            guard: st.guard.clone(),
        })?;
        self.writer.send(&GuestMsg::ExecStarted {
            exec_id,
            pid: spawned.pid as u32,
        });
        let closed = Arc::new(AtomicBool::new(false));
        let count = spawned.outputs.len();
        let done = process::start_pumps(
            spawned.outputs,
            Sink::Exec {
                writer: self.writer.clone(),
                exec_id,
                closed: closed.clone(),
            },
        );
        Ok(ExecProc {
            pid: spawned.pid,
            exited: false,
            stdin: spawned.stdin,
            pty_master: spawned.pty_master,
            pumps_done: Some((done, count)),
            closed,
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
            let st = self.state();
            let status = waitpid(pid, Some(WaitPidFlag::WNOHANG));
            let exit_code = match status {
                Ok(WaitStatus::Exited(_, code)) => code,
                Ok(WaitStatus::Signaled(_, sig, _)) => 128 + sig as i32,
                _ => continue,
            };
            self.reaped(st, pid.as_raw(), exit_code);
        }
    }

    /// Acts on the reaped child `pid` (called with the state lock held):
    /// the main process's exit is reported by [`Agent::finish`], an exec's
    /// by [`Agent::finish_exec`], each on its own thread; orphans are
    /// forgotten.
    fn reaped(self: &Arc<Self>, mut st: MutexGuard<'_, State>, pid: i32, exit_code: i32) {
        if let Some(r) = st.running.as_mut().filter(|r| r.pid == pid && !r.exited) {
            r.exited = true;
            drop(st);
            let agent = self.clone();
            std::thread::spawn(move || agent.finish(exit_code));
            return;
        }
        let exec = st.execs.iter_mut().find(|(_, e)| e.pid == pid && !e.exited);
        if let Some((&exec_id, e)) = exec {
            e.exited = true;
            e.stdin = None; // ends the stdin thread
            let pumps = e.pumps_done.take();
            drop(st);
            let agent = self.clone();
            std::thread::spawn(move || agent.finish_exec(exec_id, exit_code, pumps));
        }
    }

    /// Waits for `count` pumps to report on `done`, at most
    /// [`DRAIN_TIMEOUT`] — or as long as output waits for acknowledgements,
    /// when `while_blocked`.
    fn drain(&self, done: &mpsc::Receiver<()>, count: usize, while_blocked: bool) -> bool {
        let mut deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut finished = 0;
        while finished < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match done.recv_timeout(left) {
                Ok(()) => finished += 1,
                Err(mpsc::RecvTimeoutError::Timeout)
                    if while_blocked && self.writer.output_blocked() =>
                {
                    deadline = Instant::now() + DRAIN_TIMEOUT;
                }
                Err(_) => return false,
            }
        }
        true
    }

    /// After exec `exec_id` exited: drain its output (bounded), then report
    /// `ExecExited` after its last output frame. Other processes live on.
    fn finish_exec(
        &self,
        exec_id: u32,
        exit_code: i32,
        pumps: Option<(mpsc::Receiver<()>, usize)>,
    ) {
        if let Some((done, count)) = pumps {
            if !self.drain(&done, count, false) {
                crate::log!("output of exec {exec_id} did not drain in {DRAIN_TIMEOUT:?}");
            }
        }
        let mut st = self.state();
        // Gone when the main process's exit already reported it.
        if let Some(e) = st.execs.remove(&exec_id) {
            crate::log!("exec {exec_id} exited with {exit_code}");
            self.report_exec_exit(exec_id, exit_code, &e);
        }
    }

    /// Sends `ExecExited` and closes the exec's output under one writer
    /// lock, so no output frame of it follows. Called with `state` held.
    fn report_exec_exit(&self, exec_id: u32, exit_code: i32, e: &ExecProc) {
        let mut w = self.writer.lock();
        if let Err(err) = w.send(&GuestMsg::ExecExited { exec_id, exit_code }) {
            crate::log!("sending the exit of exec {exec_id}: {err}");
        }
        e.closed.store(true, Ordering::SeqCst);
    }

    /// After the main process exited: kill what is left, drain the output,
    /// let the killed execs report their exits, sync, and report `Exited`
    /// after the last output frame and the last `ExecExited`.
    fn finish(&self, exit_code: i32) {
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        let started = Instant::now();
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
        // A pump waits for the host to acknowledge output (the daemon may be
        // down): that output must not be lost, so keep waiting as long as
        // the host holds it up.
        if let Some((done, count)) = pumps {
            if !self.drain(&done, count, true) {
                crate::log!("output did not drain in {DRAIN_TIMEOUT:?}");
            }
        }
        // The execs were killed too: the reaper reports them (in parallel).
        let deadline = started + EXECS_TIMEOUT;
        while !self.state().execs.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // No sync here: the host answers `Exited` with `Shutdown`, which
        // syncs before powering off (and a container removed with `--rm`
        // needs none).
        let oom_killed = crate::restrict::oom_kills() > oom_before;
        crate::log!("process exited with {exit_code} (oom_killed={oom_killed})");
        let mut st = self.state();
        for (exec_id, e) in std::mem::take(&mut st.execs) {
            crate::log!("exec {exec_id} (pid {}) did not report its exit", e.pid);
            self.report_exec_exit(exec_id, KILLED_EXIT_CODE, &e);
        }
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

/// The main process's working directory: its spec's, `/` by default.
/// Runs, once, the guest code paths every start takes: the user lookup,
/// the writes to `/etc`, and a fork and exec (of the agent itself, from the
/// initramfs: nothing of the image runs). Under software emulation (TCG)
/// the first run of any guest code pays for its translation; a warm VM pays
/// it before its container is waiting. `Start` rewrites `/etc` with the
/// container's own values.
fn warm_up(root: &std::path::Path) {
    let _ = user::resolve_in_root(root, "");
    if let Err(e) = rootfs::write_etc(root, "localhost", &[]) {
        crate::log!("warm-up: {e}");
    }
    // The network set-up a container start does, on slot 0 with a
    // link-local address, then undone. A warm VM's taps are on no bridge,
    // so nothing it might send goes anywhere.
    let probe = vessel_protocol::InterfaceSpec {
        slot: 0,
        mac: vessel_protocol::slot_mac(0),
        address: "169.254.86.83".into(),
        prefix: 16,
        gateway: Some("169.254.0.1".into()),
        mtu: None,
    };
    if let Err(e) = crate::net::apply(&[probe]).and_then(|()| crate::net::apply(&[])) {
        crate::log!("warm-up: network: {e}");
    }
    let Ok(user) = user::resolve_in_root(std::path::Path::new("/"), "0:0") else {
        return;
    };
    let args = ["/init".to_string(), WARM_UP_ARG.to_string()];
    let spawned = process::start(&process::Launch {
        root: std::path::Path::new("/"),
        args: &args,
        env: vec![("PATH".into(), "/".into())],
        cwd: "/".into(),
        user,
        tty: false,
        tty_size: None,
        open_stdin: false,
        create_cwd: false,
        guard: None,
    });
    match spawned {
        // The reaper collects it; wait (briefly) until it is gone so the VM
        // is idle when its container comes.
        Ok(s) => {
            for _ in 0..500 {
                if !std::path::Path::new(&format!("/proc/{}/stat", s.pid)).exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        Err(e) => crate::log!("warm-up: {}", e.message),
    }
}

/// The argument that makes `vessel-init` exit at once (see [`warm_up`]).
pub const WARM_UP_ARG: &str = "--warm-up";

fn main_cwd(spec: &ProcessSpec) -> String {
    if spec.cwd.is_empty() {
        "/".to_string()
    } else {
        spec.cwd.clone()
    }
}

/// An exec's working directory: its own, else the main process's; always
/// absolute.
fn exec_cwd(main: &ProcessSpec, spec: &ExecSpec) -> String {
    let cwd = if spec.cwd.is_empty() {
        main_cwd(main)
    } else {
        spec.cwd.clone()
    };
    if cwd.starts_with('/') {
        cwd
    } else {
        format!("/{cwd}")
    }
}

/// An exec's environment, as Docker builds it: the container's defaults
/// (`PATH`, `HOSTNAME`, `TERM=xterm` when the exec has a TTY), then the
/// container's environment, then the exec's, a later `KEY=VALUE` replacing
/// an earlier one; `HOME` (the exec user's home) when still absent.
fn exec_env(main: &ProcessSpec, spec: &ExecSpec, home: &str) -> Vec<(String, String)> {
    let merged: Vec<String> = main.env.iter().chain(&spec.env).cloned().collect();
    command::build_env(&merged, &main.hostname, home, spec.tty)
}

/// Unlike the main process's, an exec's working directory is not created:
/// a missing one fails the exec as it does with runc.
fn check_exec_cwd(root: &Path, cwd: &str) -> Result<(), StartError> {
    let fail = |reason: &str| StartError {
        message: format!("chdir to cwd ({cwd:?}) set in config.json failed: {reason}"),
        exit_code: 126,
    };
    let host = rootfs::resolve_in_root(root, Path::new(cwd)).map_err(|e| fail(&e.to_string()))?;
    match std::fs::metadata(&host) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(fail("not a directory")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(fail("no such file or directory"))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Err(fail("not a directory")),
        Err(e) => Err(fail(&e.to_string())),
    }
}

/// Sends what is written to it as a copy's data frames.
struct CopyWriter<'a> {
    agent: &'a Agent,
    copy_id: u32,
    open: AtomicBool,
}

impl std::io::Write for CopyWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.agent.writer.send_exec(
            vessel_protocol::FrameKind::ExecStdout,
            self.copy_id,
            buf,
            &self.open,
        )?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Read;
    use vessel_protocol::{Decoder, FrameKind};

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn main_spec() -> ProcessSpec {
        ProcessSpec {
            args: s(&["sleep", "1000"]),
            env: s(&["FOO=main", "BAR=main", "PATH=/bin"]),
            cwd: "/work".into(),
            user: "1234:5678".into(),
            hostname: "box".into(),
            tty: true,
            ..Default::default()
        }
    }

    /// An agent writing into a pipe, whose main process "runs" in `root`
    /// (pid 0: never signalled, never reaped).
    fn running_agent(root: Option<&Path>) -> (Arc<Agent>, File) {
        let (rx, tx) = nix::unistd::pipe().expect("pipe");
        let agent = Agent::new(Arc::new(Writer::connected(File::from(tx))));
        if let Some(root) = root {
            let mut st = agent.state();
            st.rootfs = Some(root.to_path_buf());
            st.running = Some(Running {
                pid: 0,
                spec: main_spec(),
                exited: false,
                stdin: None,
                pty_master: None,
                pumps_done: None,
                muted: Arc::new(AtomicBool::new(false)),
                oom_before: 0,
            });
        }
        (agent, File::from(rx))
    }

    /// Decodes every frame in `bytes`.
    fn frames(bytes: &[u8]) -> Vec<(FrameKind, Vec<u8>)> {
        let mut d = Decoder::new();
        d.push(bytes);
        let mut out = vec![];
        while let Some(f) = d.next_frame().expect("frame") {
            out.push((f.kind, f.payload));
        }
        out
    }

    fn control(payload: &[u8]) -> GuestMsg {
        vessel_protocol::decode_guest(payload).expect("guest message")
    }

    fn exec_msg(exec_id: u32, spec: ExecSpec) -> HostMsg {
        HostMsg::Exec {
            exec_id,
            spec: Box::new(spec),
        }
    }

    #[test]
    fn exec_env_is_the_containers_overridden_by_the_execs() {
        let main = main_spec();
        let spec = ExecSpec {
            env: s(&["BAR=exec", "NEW=1", "FOO"]),
            ..Default::default()
        };
        let env = exec_env(&main, &spec, "/home/u");
        let get = |k: &str| command::env_value(&env, k).map(str::to_string);
        assert_eq!(get("PATH").as_deref(), Some("/bin"));
        assert_eq!(get("HOSTNAME").as_deref(), Some("box"));
        assert_eq!(get("BAR").as_deref(), Some("exec"));
        assert_eq!(get("NEW").as_deref(), Some("1"));
        assert_eq!(get("FOO"), None, "a bare key unsets");
        // HOME is the exec user's; TERM follows the exec's TTY, not the
        // main process's (Docker's CreateDaemonEnvironment(exec tty)).
        assert_eq!(get("HOME").as_deref(), Some("/home/u"));
        assert_eq!(get("TERM"), None);
        let tty = ExecSpec {
            tty: true,
            env: s(&["HOME=/x"]),
            ..Default::default()
        };
        let env = exec_env(&main, &tty, "/home/u");
        assert_eq!(command::env_value(&env, "TERM"), Some("xterm"));
        assert_eq!(command::env_value(&env, "HOME"), Some("/x"));
        assert_eq!(env.iter().filter(|(k, _)| k == "BAR").count(), 1);
    }

    #[test]
    fn exec_cwd_defaults_to_the_main_processs() {
        let main = main_spec();
        assert_eq!(exec_cwd(&main, &ExecSpec::default()), "/work");
        let own = ExecSpec {
            cwd: "/tmp".into(),
            ..Default::default()
        };
        assert_eq!(exec_cwd(&main, &own), "/tmp");
        let rel = ExecSpec {
            cwd: "tmp".into(),
            ..Default::default()
        };
        assert_eq!(exec_cwd(&main, &rel), "/tmp");
        let no_cwd = ProcessSpec::default();
        assert_eq!(exec_cwd(&no_cwd, &ExecSpec::default()), "/");
    }

    #[test]
    fn bad_execs_fail_and_frames_for_unknown_execs_are_ignored() {
        // Not running: nothing started yet.
        let (agent, mut rx) = running_agent(None);
        agent.handle(exec_msg(
            1,
            ExecSpec {
                args: s(&["ls"]),
                ..Default::default()
            },
        ));
        drop(agent);
        let mut bytes = vec![];
        rx.read_to_end(&mut bytes).expect("read");
        let got = frames(&bytes);
        assert_eq!(got.len(), 1);
        assert_eq!(
            control(&got[0].1),
            GuestMsg::ExecFailed {
                exec_id: 1,
                message: "container is not running".into(),
                exit_code: 1
            }
        );

        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("work")).expect("mkdir");
        std::fs::write(root.path().join("file"), b"").expect("write");
        let (agent, mut rx) = running_agent(Some(root.path()));
        agent.handle(exec_msg(2, ExecSpec::default()));
        agent.handle(exec_msg(
            3,
            ExecSpec {
                args: s(&["ls"]),
                cwd: "/nope".into(),
                ..Default::default()
            },
        ));
        agent.handle(exec_msg(
            4,
            ExecSpec {
                args: s(&["ls"]),
                cwd: "/file".into(),
                ..Default::default()
            },
        ));
        agent.handle(exec_msg(
            5,
            ExecSpec {
                args: s(&["ls"]),
                user: "nobody".into(),
                ..Default::default()
            },
        ));
        // The container has no `ls` in its PATH (/bin).
        agent.handle(exec_msg(
            6,
            ExecSpec {
                args: s(&["ls"]),
                ..Default::default()
            },
        ));
        // Frames and messages for execs that do not exist: ignored.
        agent.exec_stdin(&vessel_protocol::encode_exec_data(FrameKind::ExecStdin, 9, b"x")[5..]);
        agent.exec_stdin(&[0, 1]);
        agent.handle(HostMsg::ExecCloseStdin { exec_id: 9 });
        agent.handle(HostMsg::ExecResize {
            exec_id: 9,
            rows: 1,
            cols: 1,
        });
        assert!(agent.state().execs.is_empty());
        drop(agent);
        let mut bytes = vec![];
        rx.read_to_end(&mut bytes).expect("read");
        let got: Vec<GuestMsg> = frames(&bytes)
            .iter()
            .map(|(k, p)| {
                assert_eq!(*k, FrameKind::Control);
                control(p)
            })
            .collect();
        let failed = |exec_id: u32, message: &str, exit_code: i32| GuestMsg::ExecFailed {
            exec_id,
            message: message.into(),
            exit_code,
        };
        assert_eq!(
            got,
            vec![
                failed(2, "No exec command specified", 1),
                failed(
                    3,
                    "chdir to cwd (\"/nope\") set in config.json failed: no such file or directory",
                    126
                ),
                failed(
                    4,
                    "chdir to cwd (\"/file\") set in config.json failed: not a directory",
                    126
                ),
                failed(
                    5,
                    "unable to find user nobody: no matching entries in passwd file",
                    126
                ),
                failed(6, "exec: \"ls\": executable file not found in $PATH", 127),
            ]
        );
    }

    /// Runs real execs in a chroot: needs root (skipped otherwise) and a
    /// static busybox on the host. Stands in for the reaper (which would
    /// steal other tests' children) by waiting for the exec pids itself.
    #[test]
    fn execs_run_in_the_container_and_report_output_then_exit() {
        if !nix::unistd::geteuid().is_root() || !Path::new("/usr/bin/busybox").exists() {
            eprintln!("skipped: needs root and /usr/bin/busybox");
            return;
        }
        let root = tempfile::tempdir().expect("tempdir");
        for d in ["bin", "work", "tmp"] {
            std::fs::create_dir_all(root.path().join(d)).expect("mkdir");
        }
        crate::test_support::install_busybox(&root.path().join("bin/busybox"));
        std::os::unix::fs::symlink("busybox", root.path().join("bin/sh")).expect("symlink");
        std::os::unix::fs::symlink("busybox", root.path().join("bin/cat")).expect("symlink");
        let (agent, mut rx) = running_agent(Some(root.path()));
        // The host side: decode frames as they come.
        let (tx, frames_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut d = Decoder::new();
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = rx.read(&mut buf) {
                if n == 0 {
                    break;
                }
                d.push(&buf[..n]);
                while let Ok(Some(f)) = d.next_frame() {
                    let _ = tx.send(f);
                }
            }
        });

        agent.handle(exec_msg(7, ExecSpec {
            args: s(&[
                "sh",
                "-c",
                "echo out; echo err >&2; echo $(id -u):$(id -g) $PWD $FOO $BAR $HOSTNAME $HOME; exit 3",
            ]),
            env: s(&["BAR=exec"]),
            ..Default::default()
        }));
        agent.handle(exec_msg(
            8,
            ExecSpec {
                args: s(&["cat"]),
                cwd: "/tmp".into(),
                user: "0".into(),
                open_stdin: true,
                ..Default::default()
            },
        ));
        let pids: Vec<(u32, i32)> = agent
            .state()
            .execs
            .iter()
            .map(|(id, e)| (*id, e.pid))
            .collect();
        assert_eq!(pids.len(), 2, "both execs run");
        let stdin = |id: u32, data: &[u8]| {
            agent
                .exec_stdin(&vessel_protocol::encode_exec_data(FrameKind::ExecStdin, id, data)[5..])
        };
        stdin(8, b"hello ");
        stdin(9, b"not for anyone ");
        stdin(8, b"world\n");
        agent.handle(HostMsg::ExecCloseStdin { exec_id: 8 });
        for (_, pid) in &pids {
            let status = waitpid(Pid::from_raw(*pid), None).expect("wait");
            let code = match status {
                WaitStatus::Exited(_, code) => code,
                WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
                other => panic!("unexpected {other:?}"),
            };
            agent.reaped(agent.state(), *pid, code);
        }

        let mut out: HashMap<(u32, u8), Vec<u8>> = HashMap::new();
        let mut exits = HashMap::new();
        let mut started = vec![];
        while exits.len() < 2 {
            let f = frames_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("a frame before both exits");
            match f.kind {
                FrameKind::Control => match control(&f.payload) {
                    GuestMsg::ExecStarted { exec_id, pid } => {
                        assert!(pids.contains(&(exec_id, pid as i32)));
                        started.push(exec_id);
                    }
                    GuestMsg::ExecExited { exec_id, exit_code } => {
                        exits.insert(exec_id, exit_code);
                    }
                    other => panic!("unexpected {other:?}"),
                },
                FrameKind::ExecStdout | FrameKind::ExecStderr => {
                    let (id, data) = vessel_protocol::split_exec_data(&f.payload).expect("id");
                    assert!(started.contains(&id), "output of {id} before ExecStarted");
                    assert!(!exits.contains_key(&id), "output of {id} after ExecExited");
                    out.entry((id, f.kind as u8)).or_default().extend(data);
                }
                k => panic!("unexpected {k:?} frame"),
            }
        }
        let text = |id: u32, kind: FrameKind| {
            String::from_utf8_lossy(&out.get(&(id, kind as u8)).cloned().unwrap_or_default())
                .into_owned()
        };
        // User, cwd and environment default to the main process's.
        assert_eq!(
            text(7, FrameKind::ExecStdout),
            "out\n1234:5678 /work main exec box /\n"
        );
        assert_eq!(text(7, FrameKind::ExecStderr), "err\n");
        assert_eq!(text(8, FrameKind::ExecStdout), "hello world\n");
        assert_eq!(text(8, FrameKind::ExecStderr), "");
        assert_eq!(exits.get(&7), Some(&3));
        assert_eq!(exits.get(&8), Some(&0));
        assert!(agent.state().execs.is_empty());
        // The main process was left alone.
        assert!(agent.state().running.as_ref().is_some_and(|r| !r.exited));
    }

    /// Unmounts a test's devpts instance, even when the test fails.
    struct Unmount(PathBuf);

    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    /// A TTY exec: its terminal comes from the container's devpts, output
    /// arrives as `ExecStdout` only, and `ExecResize` reaches the terminal.
    #[test]
    fn tty_exec_uses_the_containers_devpts_and_resizes() {
        if !nix::unistd::geteuid().is_root() || !Path::new("/usr/bin/busybox").exists() {
            eprintln!("skipped: needs root and /usr/bin/busybox");
            return;
        }
        let root = tempfile::tempdir().expect("tempdir");
        for d in ["bin", "work", "dev/pts"] {
            std::fs::create_dir_all(root.path().join(d)).expect("mkdir");
        }
        crate::test_support::install_busybox(&root.path().join("bin/busybox"));
        std::os::unix::fs::symlink("busybox", root.path().join("bin/sh")).expect("symlink");
        let pts = root.path().join("dev/pts");
        if let Err(e) = nix::mount::mount(
            Some("devpts"),
            &pts,
            Some("devpts"),
            nix::mount::MsFlags::empty(),
            Some("newinstance,ptmxmode=0666"),
        ) {
            eprintln!("skipped: cannot mount devpts: {e}");
            return;
        }
        let _unmount = Unmount(pts);
        let (agent, mut rx) = running_agent(Some(root.path()));
        agent.handle(exec_msg(
            5,
            ExecSpec {
                args: s(&[
                    "sh",
                    "-c",
                    "stty size; read x; stty size; echo $TERM; tty; exit 4",
                ]),
                tty: true,
                open_stdin: true,
                tty_size: Some((24, 80)),
                user: "0".into(),
                ..Default::default()
            },
        ));
        let pid = agent.state().execs.get(&5).expect("exec 5 runs").pid;
        let (tx, frames_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut d = Decoder::new();
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = rx.read(&mut buf) {
                if n == 0 {
                    break;
                }
                d.push(&buf[..n]);
                while let Ok(Some(f)) = d.next_frame() {
                    let _ = tx.send(f);
                }
            }
        });
        let mut out = Vec::new();
        let next = |out: &mut Vec<u8>| -> Option<GuestMsg> {
            let f = frames_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("a frame");
            match f.kind {
                FrameKind::Control => Some(control(&f.payload)),
                FrameKind::ExecStdout => {
                    let (id, data) = vessel_protocol::split_exec_data(&f.payload).expect("id");
                    assert_eq!(id, 5);
                    out.extend(data);
                    None
                }
                k => panic!("unexpected {k:?} frame"),
            }
        };
        assert!(matches!(
            next(&mut out),
            Some(GuestMsg::ExecStarted { exec_id: 5, .. })
        ));
        while !String::from_utf8_lossy(&out).contains("24 80") {
            assert_eq!(next(&mut out), None);
        }
        agent.handle(HostMsg::ExecResize {
            exec_id: 5,
            rows: 50,
            cols: 132,
        });
        agent.exec_stdin(&vessel_protocol::encode_exec_data(FrameKind::ExecStdin, 5, b"go\n")[5..]);
        let status = waitpid(Pid::from_raw(pid), None).expect("wait");
        assert_eq!(status, WaitStatus::Exited(Pid::from_raw(pid), 4));
        agent.reaped(agent.state(), pid, 4);
        let exit = loop {
            if let Some(msg) = next(&mut out) {
                break msg;
            }
        };
        assert_eq!(
            exit,
            GuestMsg::ExecExited {
                exec_id: 5,
                exit_code: 4
            }
        );
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("50 132\r\n"), "{text:?}");
        assert!(text.contains("xterm\r\n"), "{text:?}");
        assert!(text.contains("/dev/pts/0\r\n"), "{text:?}");
    }
}
