//! The host's TSC rate, told to guests that run under TCG.
//!
//! Under TCG a guest's TSC is the host's, read through QEMU, so its rate is
//! the host's rate. Left to itself the guest kernel measures that rate
//! against the emulated PIT in a busy loop of a few milliseconds; when the
//! host is loaded the virtual CPU is starved during the loop, the measurement
//! fails, and the kernel falls back to the jiffies clocksource, with which it
//! can never stop its tick (every idle clone of such a template then costs
//! several percent of a host CPU). Measuring here, in the host, is immune to
//! that: only the two end points of the interval need to be read promptly,
//! and a late read is detected and retried.

use std::time::{Duration, Instant};

/// How long the measured interval lasts. 40 ms with end points read within
/// [`MAX_READ`] give the rate to about 0.01%.
const INTERVAL: Duration = Duration::from_millis(40);
/// An end point whose clock reads straddle more than this is read again.
const MAX_READ: Duration = Duration::from_micros(2);
/// Attempts at one end point before giving up.
const ATTEMPTS: usize = 50;

/// The host TSC rate in kHz. Refuses, with the reason, when the TSC does not
/// tick at a constant rate (then a guest is better off calibrating) or when
/// no end point could be read promptly.
pub fn host_tsc_khz() -> Result<u32, String> {
    let cpuinfo =
        std::fs::read_to_string("/proc/cpuinfo").map_err(|e| format!("read /proc/cpuinfo: {e}"))?;
    invariant_tsc(&cpuinfo)?;
    let (t0, c0) = end_point()?;
    std::thread::sleep(INTERVAL);
    let (t1, c1) = end_point()?;
    let ns = t1.duration_since(t0).as_nanos();
    let ticks = u128::from(c1.wrapping_sub(c0));
    let khz = ticks * 1_000_000 / ns.max(1);
    u32::try_from(khz)
        .ok()
        .filter(|k| *k >= 1_000)
        .ok_or_else(|| format!("implausible TSC rate: {ticks} ticks in {ns} ns"))
}

/// Whether `/proc/cpuinfo` says the TSC runs at a constant rate through
/// frequency changes and idle states.
fn invariant_tsc(cpuinfo: &str) -> Result<(), String> {
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .ok_or("no CPU flags in /proc/cpuinfo")?;
    for want in ["tsc", "constant_tsc", "nonstop_tsc"] {
        if !flags.split_whitespace().any(|f| f == want) {
            return Err(format!("the host TSC is not invariant (no {want} flag)"));
        }
    }
    Ok(())
}

/// A TSC reading and the monotonic time midway between two clock reads
/// around it, close enough together to pair them.
fn end_point() -> Result<(Instant, u64), String> {
    for _ in 0..ATTEMPTS {
        let before = Instant::now();
        let tsc = read_tsc()?;
        let after = Instant::now();
        let spread = after.duration_since(before);
        if spread <= MAX_READ {
            return Ok((before + spread / 2, tsc));
        }
    }
    Err(format!(
        "could not read the TSC and the clock within {MAX_READ:?} of each other"
    ))
}

#[cfg(target_arch = "x86_64")]
fn read_tsc() -> Result<u64, String> {
    // SAFETY: RDTSC has no memory effects; the caller checked the CPU has a
    // TSC (`tsc` flag), so the instruction exists.
    Ok(unsafe { std::arch::x86_64::_rdtsc() })
}

#[cfg(not(target_arch = "x86_64"))]
fn read_tsc() -> Result<u64, String> {
    Err("the TSC exists on x86_64 hosts only".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variable_tsc_is_refused() {
        let err = invariant_tsc("processor : 0\nflags : fpu tsc msr constant_tsc\n")
            .expect_err("no nonstop_tsc");
        assert!(err.contains("nonstop_tsc"), "{err}");
        assert!(invariant_tsc("flags : fpu tsc constant_tsc nonstop_tsc\n").is_ok());
        assert!(invariant_tsc("processor : 0\n").is_err());
    }

    #[test]
    fn two_measurements_agree() {
        let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
            return;
        };
        if invariant_tsc(&cpuinfo).is_err() {
            return;
        }
        let a = host_tsc_khz().expect("measure");
        let b = host_tsc_khz().expect("measure again");
        // Two measurements agree to 0.1%, and lie in the range of real CPUs.
        assert!((500_000..10_000_000).contains(&a), "{a} kHz");
        assert!(a.abs_diff(b) < a / 1000, "{a} kHz then {b} kHz");
    }
}
