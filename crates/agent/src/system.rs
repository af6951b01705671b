//! The guest system as PID 1 sees it: early mounts, the loopback
//! interface, the kernel command line, reboot.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::mount::{mount, MsFlags};

/// Which transport carries the control channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// The virtio-serial port named [`vessel_protocol::VIRTIO_PORT_NAME`].
    VirtioSerial,
    /// AF_VSOCK on [`vessel_protocol::VSOCK_PORT`].
    Vsock,
}

/// Reads `vessel.transport=` from a kernel command line. Unknown values
/// fall back to virtio-serial.
pub fn transport_from_cmdline(cmdline: &str) -> TransportKind {
    let mut kind = TransportKind::VirtioSerial;
    for word in cmdline.split_whitespace() {
        if let Some(v) = word.strip_prefix("vessel.transport=") {
            kind = match v {
                "vsock" => TransportKind::Vsock,
                "virtio-serial" => TransportKind::VirtioSerial,
                other => {
                    crate::log!("unknown vessel.transport={other}, using virtio-serial");
                    TransportKind::VirtioSerial
                }
            };
        }
    }
    kind
}

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn mount_early(src: &str, target: &str, fstype: &str, flags: MsFlags) {
    if let Err(e) = std::fs::create_dir_all(target) {
        crate::log!("mkdir {target}: {e}");
    }
    match mount(Some(src), target, Some(fstype), flags, None::<&str>) {
        Ok(()) => {}
        // Already mounted (e.g. devtmpfs with CONFIG_DEVTMPFS_MOUNT).
        Err(nix::errno::Errno::EBUSY) => {}
        Err(e) => crate::log!("mount {fstype} on {target}: {e}"),
    }
}

/// The kernel's clocksource and clock event device, as sysfs names them
/// (`tsc lapic`, `kvm-clock lapic-deadline`; `refined-jiffies pit` when
/// timer calibration failed at boot). `?` for what cannot be read.
pub fn clock_devices() -> (String, String) {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into())
    };
    (
        read("/sys/devices/system/clocksource/clocksource0/current_clocksource"),
        read("/sys/devices/system/clockevents/clockevent0/current_device"),
    )
}

/// Boot step 1: `/proc`, `/sys`, `/dev`, a console on fds 0–2, `lo` up.
/// Failures are logged, not fatal: the control channel may still work.
pub fn early_boot() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let nsx = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mount_early("proc", "/proc", "proc", nsx);
    mount_early("sysfs", "/sys", "sysfs", nsx);
    mount_early("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID);
    ensure_console();
    if let Err(e) = loopback_up() {
        crate::log!("bringing up lo: {e}");
    }
}

/// When the kernel found no `/dev/console` in the initramfs, fds 0–2 are
/// closed: open the console from devtmpfs so that logging works.
fn ensure_console() {
    // SAFETY: F_GETFD on a raw fd number only queries the descriptor table.
    let stderr_ok = unsafe { libc::fcntl(2, libc::F_GETFD) } != -1;
    if stderr_ok {
        return;
    }
    let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    for fd in 0..3 {
        // SAFETY: dup2 onto 0..2, which are not owned by any Rust object here.
        unsafe { libc::dup2(console.as_raw_fd(), fd) };
    }
}

/// Sets `IFF_UP` on the loopback interface.
fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into `req`, a valid ifreq that outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: after SIOCGIFFLAGS the union holds ifru_flags.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads `req`, a valid ifreq that outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads the kernel command line (empty when /proc is unavailable).
pub fn cmdline() -> String {
    std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
}

/// Flushes the disks and reboots; with QEMU's `-no-reboot` and the kernel's
/// `reboot=t` this ends the VM. Never returns.
pub fn reboot() -> ! {
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    crate::log!("reboot: {e}");
    // Not PID 1 (a test run on a host): just leave.
    std::process::exit(1);
}

/// Logs an unrecoverable error and reboots.
pub fn fatal(what: &str) -> ! {
    crate::log!("fatal: {what}; rebooting");
    reboot()
}

/// Gives a VM restored from a template its own identity before anything of
/// the container runs: the host's clock, and fresh entropy the kernel's RNG
/// reseeds from (so sibling clones never share random state).
pub fn adopt_identity(clock_unix_ns: u64, entropy_hex: &str) {
    if clock_unix_ns > 0 {
        let ts = libc::timespec {
            tv_sec: (clock_unix_ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (clock_unix_ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: clock_settime reads the timespec we own; a failure only
        // leaves the clock as it was.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
            crate::log!("clock_settime: {}", io::Error::last_os_error());
        }
    }
    let bytes: Vec<u8> = (0..entropy_hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(entropy_hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    if bytes.is_empty() {
        return;
    }
    match std::fs::OpenOptions::new().write(true).open("/dev/urandom") {
        Ok(mut f) => {
            use std::io::Write as _;
            if let Err(e) = f.write_all(&bytes) {
                crate::log!("mixing entropy: {e}");
            }
            // RNDRESEEDCRNG = _IO('R', 0x07): reseed the CRNG from the input pool now.
            const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
            // SAFETY: an argument-less ioctl on an fd we own.
            if unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), RNDRESEEDCRNG as _) } != 0
            {
                crate::log!("RNDRESEEDCRNG: {}", io::Error::last_os_error());
            }
        }
        Err(e) => crate::log!("open /dev/urandom: {e}"),
    }
}

/// Drops the kernel's cached blocks of `device`: a VM restored from a
/// template may hold pages the template's kernel read from a placeholder disk.
pub fn flush_block_cache(device: &str) {
    match std::fs::File::open(device) {
        Ok(f) => {
            // BLKFLSBUF = _IO(0x12, 97).
            const BLKFLSBUF: libc::c_ulong = 0x1261;
            // SAFETY: an ioctl without argument on an fd we own.
            if unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), BLKFLSBUF as _, 0) } != 0 {
                crate::log!("BLKFLSBUF {device}: {}", io::Error::last_os_error());
            }
        }
        Err(e) => crate::log!("open {device}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_comes_from_the_cmdline() {
        assert_eq!(
            transport_from_cmdline("console=ttyS0 reboot=t"),
            TransportKind::VirtioSerial
        );
        assert_eq!(
            transport_from_cmdline("console=ttyS0 vessel.transport=vsock quiet"),
            TransportKind::Vsock
        );
        assert_eq!(
            transport_from_cmdline("vessel.transport=virtio-serial"),
            TransportKind::VirtioSerial
        );
        assert_eq!(
            transport_from_cmdline("vessel.transport=carrier-pigeon"),
            TransportKind::VirtioSerial
        );
    }
}
