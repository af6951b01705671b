//! The hypervisor layer of Vessel.
//!
//! Owns everything between "this container needs a VM" and a running QEMU
//! process whose guest agent answers: the probe that chooses hardware
//! virtualization (KVM) or software emulation (TCG), the [`Hypervisor`] trait
//! and its QEMU driver, the fixed device layout every container VM gets, the
//! initramfs that carries the agent, the host end of the control channel
//! ([`channel`]), and under software emulation the release of an idle VM's
//! translated code ([`jit`]).
//!
//! It must not know about Docker, images or container state: it is handed
//! disk paths and sizes and returns processes and channels. VM processes are
//! started in their own process group so that the daemon's death never takes
//! them down.

pub mod channel;
pub mod initrd;
pub mod jit;
pub mod probe;
pub mod qemu;
pub mod qmp;
pub mod tap;
pub mod tsc;

use std::path::PathBuf;

pub use probe::{probe, Accel, ProbeResult};
pub use qemu::Qemu;

/// Errors of the hypervisor layer.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Cause.
        source: std::io::Error,
    },
    /// QEMU refused to start or died early.
    #[error("VM failed to start: {0}")]
    Spawn(String),
    /// The control channel broke or the agent misbehaved.
    #[error("agent channel: {0}")]
    Channel(String),
    /// Flushing or releasing a VM's translated code failed.
    #[error("translated code: {0}")]
    Jit(String),
}

impl VmError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// What a container VM is made of. Every VM has the same device layout:
/// slot 0 is the read-only image disk, slot 1 the container's writable disk,
/// then the control channel and the entropy device, so that any booted VM
/// could stand in for any other.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Unique name (the container id); appears in the QEMU command line so
    /// a live VM can be recognised after a daemon restart.
    pub name: String,
    /// Directory for the VM's sockets, pid file and console log.
    pub run_dir: PathBuf,
    /// Guest kernel (uncompressed vmlinux with a PVH note).
    pub kernel: PathBuf,
    /// Initramfs holding the agent.
    pub initrd: PathBuf,
    /// Read-only ext4 disk of the image.
    pub image_disk: PathBuf,
    /// The container's writable disk (qcow2).
    pub upper_disk: PathBuf,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Boot from the kernel, or restore a booted template.
    pub boot: Boot,
    /// Run at a low CPU priority (nice 10) until [`set_foreground`]: a VM
    /// made ahead of time must not slow down the containers running now.
    pub background: bool,
    /// Host tap interfaces backing the VM's network slots, one per slot
    /// ([`NIC_SLOTS`]); see [`tap_names`]. Spawning makes them (persistent,
    /// see [`tap`]); whoever ends the VM deletes them with
    /// [`tap::remove_after_exit`].
    pub taps: Vec<String>,
    /// Whose taps these are: they are marked with [`tap::alias`] of it, so
    /// that a daemon finds the ones it left behind.
    pub tap_owner: String,
}

/// Network interfaces every container VM has. microvm offers eight
/// virtio-mmio transports without ACPI: two disks, the control channel, the
/// entropy source and the shared-directory device take five, the
/// network slots the other three. So a container joins at most three
/// networks.
pub const NIC_SLOTS: usize = 3;

pub use vessel_protocol::slot_mac;

/// mount_tag of the shared-directory (9p) device.
pub const SHARE_TAG: &str = "vessel-share";

/// Tap names for a VM whose run directory is `run_dir`: `vt`, ten hex digits
/// of a hash of the path, the slot number. Unique per VM and per daemon,
/// and at most 15 bytes as Linux requires.
pub fn tap_names(run_dir: &std::path::Path) -> Vec<String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in run_dir.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (0..NIC_SLOTS)
        .map(|i| format!("vt{:010x}{i}", h & 0xff_ffff_ffff))
        .collect()
}

/// How a VM comes to life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// Boot the kernel (anonymous guest memory).
    Cold,
    /// Boot the kernel with guest memory in a shared file, to be snapshotted
    /// as a template.
    Template {
        /// The template's memory file.
        memory: PathBuf,
    },
    /// Restore a template: its memory file mapped privately (copy-on-write)
    /// and its device state loaded from `state`.
    Clone {
        /// The template's memory file.
        memory: PathBuf,
        /// The template's saved device state.
        state: PathBuf,
    },
}

/// A VM process that was started.
#[derive(Debug, Clone)]
pub struct VmProcess {
    /// PID of the VM process on the host.
    pub pid: u32,
    /// Unix socket that reaches the guest agent.
    pub control_socket: PathBuf,
}

/// A hypervisor able to run container VMs.
pub trait Hypervisor: Send + Sync {
    /// A human-readable description, e.g. `qemu 7.2.0 (tcg)`.
    fn describe(&self) -> String;
    /// The acceleration in use.
    fn accel(&self) -> Accel;
    /// Starts a VM. Returns once the process runs and its control socket
    /// exists; a clone is restored and running.
    fn spawn(&self, spec: &VmSpec) -> Result<VmProcess, VmError>;
    /// Boots a template VM for `spec` (whose boot is [`Boot::Template`]),
    /// waits until its agent is ready, saves its device state to `state` and
    /// ends it. Its memory file then holds the booted guest.
    fn build_template(&self, spec: &VmSpec, state: &std::path::Path) -> Result<(), VmError>;
}

/// Whether `pid` is alive and is the VM named `name` (guards against PID reuse).
pub fn vm_alive(pid: u32, name: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = format!("vessel-{name}");
    if !cmdline.split(|b| *b == 0).any(|arg| arg == want.as_bytes()) {
        return false;
    }
    // A zombie still has a cmdline entry briefly; check its state.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Gives every thread of VM `pid` the normal CPU priority again (see
/// [`VmSpec::background`]).
pub fn set_foreground(pid: u32) -> std::io::Result<()> {
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(tid) = e?.file_name().to_string_lossy().parse::<libc::id_t>() else {
            continue;
        };
        // SAFETY: setpriority(2) on a thread id; no memory is involved.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The host CPUs this daemon may run on (its affinity mask), ascending:
/// what a VM can be pinned to.
pub fn host_cpus() -> std::io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; all zeroes is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most `size_of::<cpu_set_t>()`
    // bytes into `set`, which is that large.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads bit `c` of `set`, with `c` below CPU_SETSIZE.
        .filter(|c| unsafe { libc::CPU_ISSET(*c, &set) })
        .collect())
}

/// Pins every thread of VM `pid` (vCPUs, I/O and QEMU's own) to the host
/// CPUs `cpus`. Threads QEMU starts later inherit the mask from the thread
/// that starts them, so the threads are listed again until a pass finds
/// none it had not pinned.
pub fn pin(pid: u32, cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; all zeroes is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c >= libc::CPU_SETSIZE as usize {
            return Err(std::io::Error::other(format!(
                "CPU {c} is beyond the {} CPUs an affinity mask holds",
                libc::CPU_SETSIZE
            )));
        }
        // SAFETY: CPU_SET sets bit `c` of `set`, with `c` below CPU_SETSIZE.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    let mut pinned = std::collections::HashSet::new();
    loop {
        let mut found = false;
        for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let Ok(tid) = e?.file_name().to_string_lossy().parse::<libc::pid_t>() else {
                continue;
            };
            if !pinned.insert(tid) {
                continue;
            }
            found = true;
            // SAFETY: sched_setaffinity on a thread id with a valid mask of
            // the size given.
            let r = unsafe {
                libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
            };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                // A thread that ended meanwhile needs no pinning.
                if e.raw_os_error() != Some(libc::ESRCH) {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("pin thread {tid} of VM {pid}: {e}"),
                    ));
                }
            }
        }
        if !found {
            return Ok(());
        }
    }
}

/// Kills a VM process with SIGKILL if it is still the VM named `name`.
pub fn kill_vm(pid: u32, name: &str) {
    if vm_alive(pid, name) {
        // SAFETY: kill(2) with a PID we verified belongs to our VM and a valid signal.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
}

/// Waits until process `pid` has exited, whether or not it is our child,
/// and reaps it when it is. Uses a pidfd, so no polling.
pub async fn wait_exit(pid: u32) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        // The process is already gone (ESRCH).
        reap(pid);
        return;
    }
    // SAFETY: fd was just returned by pidfd_open and is owned by nobody else.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    // SAFETY: `owned` is an OwnedFd: it stays open and refers to the same
    // pidfd for as long as the AsyncFd that owns it lives.
    match unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)
    } {
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(_) => {
            while std::path::Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    reap(pid);
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

fn reap(pid: u32) {
    let mut status = 0;
    // SAFETY: waitpid on a specific pid with WNOHANG; harmless (ECHILD) when
    // the process is not our child.
    unsafe {
        libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG);
    }
}

#[cfg(test)]
mod tests {
    use super::{host_cpus, pin};

    #[test]
    fn a_process_is_pinned_to_the_cpus_given() {
        let cpus = host_cpus().expect("affinity");
        assert!(!cpus.is_empty());
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let last = *cpus.last().expect("a CPU");
        pin(child.id(), &[last]).expect("pin");
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", child.id())).expect("status");
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(str::trim)
            .unwrap_or("");
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(allowed, last.to_string());
        assert!(pin(u32::MAX / 2, &[last]).is_err(), "no such process");
    }
}
