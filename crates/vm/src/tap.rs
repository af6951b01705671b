//! Host tap devices behind a VM's network slots.
//!
//! The daemon makes each tap persistent, keeps the descriptor attached to it
//! and hands that descriptor to QEMU (`-netdev tap,fd=N`), so QEMU never
//! attaches by name. Attaching by name would race with any process the
//! daemon forks at that moment: a child holds a copy of every descriptor
//! until it execs, and a tap with an attached descriptor refuses a second
//! one (`EBUSY`).
//!
//! Persistent, because when the last descriptor of a non-persistent tap
//! closes, the kernel unregisters the device inside the closing process's
//! exit path, about 20 ms per device here: with three slots every VM's exit
//! (and so every `docker run --rm`) waited ~60 ms for it. A persistent tap
//! survives its VM, so the VM exits at once and the taps are deleted
//! afterwards, off the container's path ([`remove_after_exit`]).
//!
//! Each tap carries the alias `vessel-tap:<owner>`, so that taps left behind
//! by a daemon that died are found again ([`owned`]).
//!
//! Making and deleting taps both attach a descriptor for a moment, and a
//! VM that starts again (a restarted container, the next copy VM of a
//! stopped one) reuses its taps' names while the reaper may still be
//! deleting the previous VM's. A claim on the names ([`Claim`]) keeps the
//! two apart: either the old tap is gone before the new VM makes it again,
//! or the new VM holds it and the reaper leaves it alone. Taps of other
//! names are made and deleted meanwhile (deleting one takes ~20 ms).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Condvar, Mutex, OnceLock};

use crate::VmError;

/// `_IOW('T', 202, int)` and `_IOW('T', 203, int)` from `<linux/if_tun.h>`;
/// the libc crate does not define the tun ioctls.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

/// The alias marking a tap as `owner`'s.
pub fn alias(owner: &str) -> String {
    format!("vessel-tap:{owner}")
}

/// Opens `/dev/net/tun` and attaches it to tap `name`, creating the device
/// when it does not exist. A tap a running VM holds gives `EBUSY`.
fn attach(name: &str) -> std::io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is a plain C struct for which all-zero bytes are valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads an ifreq, which `req` is, from a valid
    // pointer; the fd is open for the call's duration.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

fn set_persist(file: &std::fs::File, on: bool) -> std::io::Result<()> {
    // SAFETY: TUNSETPERSIST takes an integer argument by value.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETPERSIST, libc::c_ulong::from(on)) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Tap names being made or deleted now, and the signal that one set was
/// let go (see the module doc).
static CLAIMED: Mutex<Vec<String>> = Mutex::new(Vec::new());
static RELEASED: Condvar = Condvar::new();

/// Names claimed for making or deleting their taps; let go on drop.
struct Claim(Vec<String>);

impl Claim {
    /// Waits until no other claim holds any of `names`, then claims them all.
    fn new(names: &[String]) -> Self {
        let mut claimed = CLAIMED.lock().unwrap_or_else(|p| p.into_inner());
        while names.iter().any(|n| claimed.contains(n)) {
            claimed = RELEASED.wait(claimed).unwrap_or_else(|p| p.into_inner());
        }
        claimed.extend(names.iter().cloned());
        Self(names.to_vec())
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut claimed = CLAIMED.lock().unwrap_or_else(|p| p.into_inner());
        claimed.retain(|n| !self.0.contains(n));
        RELEASED.notify_all();
    }
}

fn exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Makes persistent taps `names`, marked as `owner`'s, and returns a
/// descriptor attached to each (close-on-exec). A tap that already exists
/// (left by a VM whose daemon died) is taken over.
pub fn open(names: &[String], owner: &str) -> Result<Vec<OwnedFd>, VmError> {
    let marker = alias(owner);
    let mut fds = Vec::with_capacity(names.len());
    let claim = Claim::new(names);
    for name in names {
        let made = attach(name)
            .and_then(|f| set_persist(&f, true).map(|()| f))
            .map_err(|e| VmError::io(format!("make tap {name}"), e));
        let marked = made.and_then(|f| {
            let path = format!("/sys/class/net/{name}/ifalias");
            std::fs::write(&path, &marker)
                .map(|()| f)
                .map_err(|e| VmError::io(format!("write {path}"), e))
        });
        match marked {
            Ok(f) => fds.push(OwnedFd::from(f)),
            Err(e) => {
                drop(fds);
                drop(claim);
                remove(names);
                return Err(e);
            }
        }
    }
    Ok(fds)
}

/// Deletes taps `names` now; missing ones are skipped. A tap a running VM
/// holds cannot be attached to and stays: whoever ends that VM deletes it.
pub fn remove(names: &[String]) {
    let _claim = Claim::new(names);
    for name in names.iter().filter(|n| exists(n)) {
        // Closing the only descriptor of a non-persistent tap unregisters it.
        match attach(name).and_then(|f| set_persist(&f, false)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                tracing::debug!(tap = %name, "tap in use, kept");
            }
            Err(e) => tracing::warn!(tap = %name, "cannot delete tap: {e}"),
        }
    }
}

/// Deletes `owner`'s taps that no VM holds: those of VMs that ended while
/// their daemon was not running.
pub fn sweep(owner: &str) {
    remove(&owned(owner));
}

/// Deletes taps `names` once process `pid` (the VM that uses them) has
/// exited, or at once when `pid` is `None` or already gone. One background
/// thread waits for all VMs (a pidfd each), so no caller waits for the
/// kernel to unregister devices.
pub fn remove_after_exit(pid: Option<u32>, names: Vec<String>) {
    if names.is_empty() {
        return;
    }
    let pidfd = pid.and_then(|pid| {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        // SAFETY: a non-negative fd was just returned to us and nobody else
        // owns it.
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    });
    match (pidfd, reaper()) {
        (Some(fd), Some(r)) => {
            r.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((fd, names));
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
            unsafe {
                libc::write(r.wake.as_raw_fd(), (&one as *const u64).cast(), 8);
            }
        }
        (Some(_), None) => {
            tracing::warn!(
                ?names,
                "no tap reaper: the taps stay until the next daemon start"
            );
        }
        (None, _) => remove(&names),
    }
}

/// The thread deleting taps of VMs that exit.
struct Reaper {
    pending: Mutex<Vec<(OwnedFd, Vec<String>)>>,
    wake: OwnedFd,
}

fn reaper() -> Option<&'static Reaper> {
    static REAPER: OnceLock<Option<&'static Reaper>> = OnceLock::new();
    *REAPER.get_or_init(|| {
        // SAFETY: eventfd takes an initial value and flags; returns a new fd
        // or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            tracing::warn!("eventfd: {}", std::io::Error::last_os_error());
            return None;
        }
        let r: &'static Reaper = Box::leak(Box::new(Reaper {
            pending: Mutex::new(Vec::new()),
            // SAFETY: fd was just returned by eventfd and is owned by nobody else.
            wake: unsafe { OwnedFd::from_raw_fd(fd) },
        }));
        match std::thread::Builder::new()
            .name("tap-reaper".into())
            .spawn(move || reap_loop(r))
        {
            Ok(_) => Some(r),
            Err(e) => {
                tracing::warn!("cannot start the tap reaper: {e}");
                None
            }
        }
    })
}

fn reap_loop(r: &'static Reaper) {
    let mut watched: Vec<(OwnedFd, Vec<String>)> = Vec::new();
    loop {
        let mut fds: Vec<libc::pollfd> = std::iter::once(r.wake.as_raw_fd())
            .chain(watched.iter().map(|(fd, _)| fd.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds whose
        // descriptors stay open during the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::warn!("tap reaper: poll: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            continue;
        }
        // A pidfd is readable once its process has exited; its descriptors,
        // the taps among them, were closed before that.
        let mut i = 0;
        watched.retain(|(_, names)| {
            i += 1;
            if fds[i].revents == 0 {
                return true;
            }
            remove(names);
            false
        });
        if fds[0].revents != 0 {
            let mut buf = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a valid buffer from our eventfd.
            unsafe {
                libc::read(r.wake.as_raw_fd(), buf.as_mut_ptr().cast(), 8);
            }
            watched.append(&mut r.pending.lock().unwrap_or_else(|p| p.into_inner()));
        }
    }
}

/// Taps marked as `owner`'s.
pub fn owned(owner: &str) -> Vec<String> {
    let marker = alias(owner);
    std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("ifalias")).is_ok_and(|a| a.trim_end() == marker)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        uid == 0 && std::path::Path::new("/dev/net/tun").exists()
    }

    #[test]
    fn a_claim_waits_only_for_claims_on_the_same_names() {
        let a = vec!["claim-test-a".to_string()];
        let first = Claim::new(&a);
        // Other names: at once.
        drop(Claim::new(&["claim-test-b".to_string()]));
        let (tx, rx) = std::sync::mpsc::channel();
        let both = vec!["claim-test-b".to_string(), "claim-test-a".to_string()];
        let waiter = std::thread::spawn(move || {
            let _c = Claim::new(&both);
            tx.send(()).ok();
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "a claim on a claimed name went ahead"
        );
        drop(first);
        assert!(rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok());
        waiter.join().expect("waiter");
    }

    #[test]
    fn taps_are_made_persistent_marked_and_removed() {
        if !root() {
            eprintln!("skipped: needs root and /dev/net/tun");
            return;
        }
        let owner = format!("unit{}", std::process::id());
        let names: Vec<String> = (0..2)
            .map(|i| format!("vu{:08x}{i}", std::process::id()))
            .collect();
        let fds = open(&names, &owner).expect("make taps");
        for n in &names {
            assert!(exists(n), "{n} should exist after create");
        }
        let mut found = owned(&owner);
        found.sort();
        assert_eq!(found, names);
        // Held: a second attach is refused, and removal keeps them.
        assert!(open(&names, &owner).is_err());
        remove(&names);
        assert!(names.iter().all(|n| exists(n)));
        drop(fds);
        // Made again (a daemon taking over leftovers): still fine. Another
        // test's child may hold a copy of a descriptor until it execs.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match open(&names, &owner) {
                Ok(fds) => break drop(fds),
                Err(e) if std::time::Instant::now() > deadline => panic!("make taps again: {e}"),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
        remove_after_exit(None, names.clone());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while names.iter().any(|n| exists(n)) {
            assert!(std::time::Instant::now() < deadline, "taps still there");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(owned(&owner).is_empty());
    }
}
