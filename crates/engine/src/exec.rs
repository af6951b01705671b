//! `docker exec`: extra processes in a running container's VM.
//!
//! Exec instances live in memory, as in Docker: they belong to a running
//! container and end with it. Each has a small number (unique within the
//! container's VM) that the agent uses on the wire, its own output stream,
//! and a watch of its state.

use std::sync::{Arc, Mutex};

use bollard_stubs::models::{ExecConfig, ExecInspectResponse, ProcessConfig};
use tokio::sync::{broadcast, oneshot, watch};
use vessel_protocol::ExecSpec;

use crate::Output;

/// Lifecycle of an exec instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecState {
    /// Created, not started.
    Created,
    /// Start requested; waiting for the agent.
    Starting,
    /// Runs.
    Running,
    /// Ended (or failed to start).
    Exited,
}

pub(crate) struct ExecInner {
    pub state: ExecState,
    pub pid: Option<u32>,
    pub exit_code: Option<i64>,
    pub started: Option<oneshot::Sender<Result<(), String>>>,
}

/// One exec instance.
pub struct ExecHandle {
    /// 64 hex characters.
    pub id: String,
    /// The container it runs in.
    pub container_id: String,
    /// Its number inside the container's VM.
    pub num: u32,
    /// What the user asked for.
    pub config: ExecConfig,
    pub(crate) inner: Mutex<ExecInner>,
    pub(crate) output: broadcast::Sender<Output>,
    pub(crate) done: watch::Sender<bool>,
}

impl ExecHandle {
    pub(crate) fn new(id: String, container_id: String, num: u32, config: ExecConfig) -> Arc<Self> {
        Arc::new(Self {
            id,
            container_id,
            num,
            config,
            inner: Mutex::new(ExecInner {
                state: ExecState::Created,
                pid: None,
                exit_code: None,
                started: None,
            }),
            output: broadcast::channel(4096).0,
            done: watch::channel(false).0,
        })
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, ExecInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver of the exec's output (subscribe before starting it).
    pub fn subscribe(&self) -> broadcast::Receiver<Output> {
        self.output.subscribe()
    }

    /// Whether the exec has a TTY.
    pub fn tty(&self) -> bool {
        self.config.tty.unwrap_or(false)
    }

    /// The spec sent to the agent.
    pub(crate) fn spec(&self, tty_size: Option<(u16, u16)>) -> ExecSpec {
        let c = &self.config;
        ExecSpec {
            args: c.cmd.clone().unwrap_or_default(),
            env: c.env.clone().unwrap_or_default(),
            cwd: c.working_dir.clone().unwrap_or_default(),
            user: c.user.clone().unwrap_or_default(),
            tty: self.tty(),
            open_stdin: c.attach_stdin.unwrap_or(false),
            tty_size: tty_size.or_else(|| {
                c.console_size
                    .as_ref()
                    .filter(|s| s.len() == 2 && s[0] > 0 && s[1] > 0)
                    .map(|s| (s[0] as u16, s[1] as u16))
            }),
        }
    }

    /// Records the end of the exec (once) and closes its stream.
    pub(crate) fn finish(&self, exit_code: i64, start_error: Option<String>) {
        let mut g = self.lock();
        if g.state == ExecState::Exited {
            return;
        }
        g.state = ExecState::Exited;
        g.exit_code = Some(exit_code);
        if let Some(tx) = g.started.take() {
            let _ = tx.send(match start_error {
                Some(e) => Err(e),
                None => Ok(()),
            });
        }
        drop(g);
        let _ = self.output.send(Output::End);
        self.done.send_replace(true);
    }

    /// `GET /exec/{id}/json`.
    pub fn inspect(&self) -> ExecInspectResponse {
        let g = self.lock();
        let args = self.config.cmd.clone().unwrap_or_default();
        ExecInspectResponse {
            can_remove: Some(false),
            detach_keys: Some(self.config.detach_keys.clone().unwrap_or_default()),
            id: Some(self.id.clone()),
            running: Some(matches!(g.state, ExecState::Running | ExecState::Starting)),
            exit_code: g.exit_code,
            process_config: Some(ProcessConfig {
                privileged: Some(self.config.privileged.unwrap_or(false)),
                user: Some(self.config.user.clone().unwrap_or_default()),
                tty: Some(self.tty()),
                entrypoint: args.first().cloned(),
                arguments: Some(args.iter().skip(1).cloned().collect()),
            }),
            open_stdin: Some(self.config.attach_stdin.unwrap_or(false)),
            open_stderr: Some(self.config.attach_stderr.unwrap_or(false)),
            open_stdout: Some(self.config.attach_stdout.unwrap_or(false)),
            container_id: Some(self.container_id.clone()),
            pid: Some(g.pid.map(i64::from).unwrap_or(0)),
        }
    }
}
