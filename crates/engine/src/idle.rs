//! Idle containers give back their VM's translated code (software
//! emulation only; see `vessel_vm::jit` for how).
//!
//! Every few seconds the host CPU time of each running container's VM
//! process is sampled. A VM that used less than [`IDLE_SHARE`] of a CPU
//! for the whole `--tcg-trim-after` span is trimmed once; it is trimmed
//! again only after it has been busy and then idle that long again. (A
//! second trim of a VM that stayed idle was tried: an idle guest
//! translates ~2.5 MB again in the minute after any trim, the same after
//! a second one, so it gained under 0.5 MB.) The
//! cost of a trim is paid when the container wakes: the code it runs is
//! translated anew (a `docker exec` into a trimmed container takes longer
//! the first time).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use vessel_protocol::HostMsg;

use crate::stats::cpu_ns;
use crate::{blocking, Engine, Handle};

/// A VM using less than this share of one host CPU counts as idle (an idle
/// guest with its tick stopped uses about 0.2%).
pub(crate) const IDLE_SHARE: f64 = 0.01;

/// How long a trim waits for an idle guest's next instruction (it is
/// nudged meanwhile).
const STEP_TIMEOUT: Duration = Duration::from_secs(3);

struct Sample {
    pid: u32,
    cpu_ns: u64,
    at: Instant,
    idle_since: Instant,
    trimmed: bool,
    /// Until then the VM's CPU time is not judged: right after a trim it
    /// translates its idle loop and interrupt handlers again.
    grace_until: Instant,
}

impl Sample {
    fn new(pid: u32, cpu_ns: u64, now: Instant) -> Self {
        Self {
            pid,
            cpu_ns,
            at: now,
            idle_since: now,
            trimmed: false,
            grace_until: now,
        }
    }
}

/// Whether `cpu_ns` of CPU time over `span` is more than an idle VM uses.
fn busy(cpu_ns: u64, span: Duration) -> bool {
    cpu_ns as f64 / 1e9 > span.as_secs_f64() * IDLE_SHARE
}

/// Watches the running containers and trims those idle for `after`.
pub(crate) async fn run(engine: Engine, after: Duration) {
    let period = (after / 3).clamp(Duration::from_secs(1), Duration::from_secs(10));
    let mut samples: HashMap<String, Sample> = HashMap::new();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut live = HashSet::new();
        for h in engine.handles() {
            let rec = h.rec();
            let Some(pid) = rec.state.pid.filter(|_| rec.running() && !rec.state.paused) else {
                continue;
            };
            let Some(total_ns) = cpu_ns(pid) else {
                continue;
            };
            live.insert(rec.id.clone());
            let now = Instant::now();
            let s = samples
                .entry(rec.id.clone())
                .or_insert_with(|| Sample::new(pid, total_ns, now));
            if s.pid != pid {
                // Restarted: a new VM.
                *s = Sample::new(pid, total_ns, now);
                continue;
            }
            let used = total_ns.saturating_sub(s.cpu_ns);
            let span = now - s.at;
            s.cpu_ns = total_ns;
            s.at = now;
            if now >= s.grace_until && busy(used, span) {
                s.idle_since = now;
                s.trimmed = false;
                continue;
            }
            if s.trimmed || now - s.idle_since < after {
                continue;
            }
            s.trimmed = true;
            trim(&engine, &h, pid).await;
            s.grace_until = Instant::now() + 2 * period;
            s.cpu_ns = cpu_ns(pid).unwrap_or(s.cpu_ns);
            s.at = Instant::now();
        }
        samples.retain(|id, _| live.contains(id));
    }
}

async fn trim(engine: &Engine, h: &Arc<Handle>, pid: u32) {
    // Something is being done to the container (pause, stop, a copy): it
    // is not idle, and pause must not race with the trim's stop and resume.
    let Ok(_op) = h.op.try_lock() else {
        return;
    };
    let rec = h.rec();
    if !rec.running() || rec.state.paused || rec.state.pid != Some(pid) {
        return;
    }
    let dir = engine.run_dir(&rec.id);
    let short = rec.id[..12.min(rec.id.len())].to_string();
    // An idle guest may not take an interrupt for seconds, and the trim's
    // single step waits for one: a message to its agent brings one. The
    // message is an acknowledgement of nothing (`Ack { seq: 0 }`): the
    // guest code it runs (the port's interrupt and read, the agent's
    // decoding) is translated again after the flush, so the less it runs
    // the less comes back.
    let nudge = {
        let h = h.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(150)).await;
                let writer = h.live.lock().await.writer.clone();
                if let Some(w) = writer {
                    let _ = w.send(&HostMsg::Ack { seq: 0 }).await;
                }
            }
        })
    };
    let result = blocking(move || vessel_vm::jit::trim(&dir, pid, STEP_TIMEOUT)).await;
    nudge.abort();
    match result {
        Ok(Ok(t)) => info!(
            container = %short,
            code_kib = t.code_bytes / 1024,
            released_kib = t.released_bytes / 1024,
            stopped_ms = t.stopped.as_millis() as u64,
            "idle VM gave back its translated code"
        ),
        Ok(Err(e)) => {
            if vessel_vm::vm_alive(pid, rec.vm_name()) {
                warn!(container = %short, "could not release an idle VM's translated code: {e}");
            }
        }
        Err(e) => warn!(container = %short, "translated code release: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_is_under_one_percent_of_a_cpu() {
        let ten = Duration::from_secs(10);
        assert!(!busy(20_000_000, ten), "an idle guest: 20 ms in 10 s");
        assert!(!busy(100_000_000, ten));
        assert!(busy(110_000_000, ten));
        assert!(busy(1_000_000_000, Duration::from_secs(1)));
    }

    #[test]
    fn cpu_time_of_this_process_is_read() {
        let me = std::process::id();
        let start = cpu_ns(me).expect("own stat");
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(300) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(cpu_ns(me).expect("own stat") > start);
        assert_eq!(cpu_ns(u32::MAX / 2), None);
    }
}
