//! Health checks (`HEALTHCHECK` in the image, `--health-*` flags): the
//! engine runs the test command as an exec in the container's VM at each
//! interval and keeps Docker's health state (starting, healthy, unhealthy,
//! the failing streak and the last five results).

use std::sync::Arc;
use std::time::Duration;

use bollard_stubs::models::{Health, HealthConfig, HealthStatusEnum, HealthcheckResult};
use tracing::debug;

use crate::{now_rfc3339, Engine, Handle, Output};

const NS: i64 = 1_000_000_000;
const DEFAULT_INTERVAL: i64 = 30 * NS;
const DEFAULT_TIMEOUT: i64 = 30 * NS;
const DEFAULT_RETRIES: i64 = 3;
const KEEP_RESULTS: usize = 5;

/// The command a health config runs, or `None` when there is no check
/// (absent, empty, or `NONE`).
pub fn command(cfg: &HealthConfig) -> Option<Vec<String>> {
    let test = cfg.test.as_ref()?;
    match test.first().map(String::as_str) {
        Some("CMD") if test.len() > 1 => Some(test[1..].to_vec()),
        Some("CMD-SHELL") if test.len() > 1 => {
            Some(vec!["/bin/sh".into(), "-c".into(), test[1..].join(" ")])
        }
        _ => None,
    }
}

fn dur(v: Option<i64>, default: i64) -> Duration {
    Duration::from_nanos(v.filter(|n| *n > 0).unwrap_or(default) as u64)
}

/// Runs the checks of one run of a container until it stops.
pub(crate) async fn run(engine: Engine, h: Arc<Handle>, cfg: HealthConfig, cmd: Vec<String>) {
    let exits0 = h.status.borrow().exits;
    let interval = dur(cfg.interval, DEFAULT_INTERVAL);
    let timeout = dur(cfg.timeout, DEFAULT_TIMEOUT);
    let retries = cfg.retries.filter(|r| *r > 0).unwrap_or(DEFAULT_RETRIES);
    let start_period = dur(cfg.start_period, 0);
    let start_interval = dur(cfg.start_interval, 5 * NS);
    let started = tokio::time::Instant::now();
    engine.set_health(
        &h,
        Health {
            status: Some(HealthStatusEnum::STARTING),
            failing_streak: Some(0),
            log: Some(vec![]),
        },
    );
    loop {
        let in_start = started.elapsed() < start_period;
        let wait = if in_start && cfg.start_interval.is_some() {
            start_interval
        } else {
            interval
        };
        let mut st = h.status.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = st.wait_for(|w| w.exits > exits0 || !w.running) => return,
        }
        if h.status.borrow().exits > exits0 {
            return;
        }
        let begin = now_rfc3339();
        let (code, output) = probe(&engine, &h, &cmd, timeout).await;
        if h.status.borrow().exits > exits0 {
            return;
        }
        let result = HealthcheckResult {
            start: Some(begin),
            end: Some(now_rfc3339()),
            exit_code: Some(code),
            output: Some(output),
        };
        let mut health = h.rec().state.health.unwrap_or_default();
        let mut log = health.log.take().unwrap_or_default();
        log.push(result);
        if log.len() > KEEP_RESULTS {
            log.remove(0);
        }
        health.log = Some(log);
        let streak = health.failing_streak.unwrap_or(0);
        if code == 0 {
            health.failing_streak = Some(0);
            health.status = Some(HealthStatusEnum::HEALTHY);
        } else if !(in_start && health.status == Some(HealthStatusEnum::STARTING)) {
            health.failing_streak = Some(streak + 1);
            if streak + 1 >= retries {
                health.status = Some(HealthStatusEnum::UNHEALTHY);
            }
        }
        engine.set_health(&h, health);
    }
}

/// One check: exit code and (at most 4 KiB of) output.
async fn probe(engine: &Engine, h: &Handle, cmd: &[String], timeout: Duration) -> (i64, String) {
    let config = bollard_stubs::models::ExecConfig {
        cmd: Some(cmd.to_vec()),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        ..Default::default()
    };
    let e = match engine
        .exec_create(&h.id, config)
        .and_then(|id| engine.exec_claim(&id))
    {
        Ok(e) => e,
        Err(err) => return (-1, err.to_string()),
    };
    let mut rx = e.subscribe();
    let collect = async {
        let mut out = Vec::new();
        if let Err(msg) = engine.exec_launch(&e, None).await {
            return msg;
        }
        loop {
            match rx.recv().await {
                Ok(Output::Stdout(b)) | Ok(Output::Stderr(b)) => {
                    if out.len() < 4096 {
                        out.extend_from_slice(&b[..b.len().min(4096 - out.len())]);
                    }
                }
                Ok(Output::End) | Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                Err(_) => continue,
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    let result = tokio::time::timeout(timeout, collect).await;
    if result.is_err() {
        // As dockerd: a check out of time is killed, not left running.
        engine.exec_signal(&e, libc::SIGKILL).await;
    }
    engine.forget_exec(&e.id);
    match result {
        Ok(output) => (e.inspect().exit_code.unwrap_or(-1), output),
        Err(_) => {
            debug!(id = %h.id, "health check timed out");
            (-1, format!("Health check exceeded timeout ({timeout:?})"))
        }
    }
}
