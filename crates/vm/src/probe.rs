//! Chooses how guests run: hardware virtualization (KVM) or QEMU's software
//! emulation (TCG).
//!
//! The probe never assumes. `/dev/kvm` can exist and open yet be unable to
//! run an ordinary guest kernel: on hosts whose KVM is the paravirtual PVM
//! module (`kvm_pvm`), guests fall into slow instruction emulation and fail.
//! So KVM is chosen only when the device opens, the module is not PVM, and
//! QEMU itself reports KVM enabled with the host CPU model.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The acceleration a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's Tiny Code Generator (software emulation).
    Tcg,
}

impl Accel {
    /// QEMU's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The probe's decision and why.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    /// What VMs will use.
    pub accel: Accel,
    /// One sentence saying why.
    pub reason: String,
}

/// Probes the host. Takes a few milliseconds when KVM is plainly unusable,
/// at most about three seconds otherwise.
pub fn probe(qemu: &Path) -> ProbeResult {
    let tcg = |reason: String| ProbeResult {
        accel: Accel::Tcg,
        reason,
    };
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return tcg(format!("/dev/kvm unusable ({e}); using software emulation"));
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return tcg("/dev/kvm is the paravirtual kvm_pvm module, which cannot run ordinary guest kernels; using software emulation".into());
    }
    match qemu_reports_kvm(qemu) {
        Ok(()) => ProbeResult {
            accel: Accel::Kvm,
            reason: "/dev/kvm runs a QEMU guest with the host CPU model".into(),
        },
        Err(why) => tcg(format!(
            "QEMU cannot use /dev/kvm ({why}); using software emulation"
        )),
    }
}

/// Starts QEMU paused with KVM and the host CPU, asks it over QMP whether
/// KVM is enabled, and quits.
fn qemu_reports_kvm(qemu: &Path) -> Result<(), String> {
    let mut child = Command::new(qemu)
        .args([
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-M",
            "microvm",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-S", "-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(
            br#"{"execute":"qmp_capabilities"}
{"execute":"query-kvm"}
{"execute":"quit"}
"#,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("timed out".into());
            }
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if stdout.contains(r#""enabled": true"#) && stdout.contains(r#""present": true"#) {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(err
            .lines()
            .next()
            .unwrap_or("KVM not enabled")
            .trim()
            .to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_qemu_never_chooses_kvm() {
        let r = probe(Path::new("/nonexistent/qemu"));
        assert_eq!(r.accel, Accel::Tcg);
        assert!(!r.reason.is_empty());
    }
}
