//! What the container's processes may do: Docker's capability set
//! (`--cap-add`, `--cap-drop`, `--privileged`), `--ulimit`,
//! `--security-opt no-new-privileges`, and the guest cgroup every
//! container process joins (`--pids-limit`, and a memory limit that keeps
//! an out-of-memory kill inside the container), applied between fork and
//! exec of the main process and of every exec.
//!
//! Everything is computed before the fork ([`Guard::new`]); the child only
//! makes raw system calls on that data.

use std::ffi::CString;
use std::io;
use std::path::Path;

use vessel_protocol::Restrictions;

/// The guest's cgroup for the container's processes.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Pre-computed restrictions.
#[derive(Debug)]
pub struct Guard {
    /// Bit mask of the capabilities kept; `None`: all.
    caps: Option<u64>,
    nnp: bool,
    rlimits: Vec<(u32, libc::rlimit64)>,
    /// `cgroup.procs` of the container's cgroup, to join before exec.
    cgroup_procs: Option<CString>,
}

fn check(r: libc::c_long) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Guard {
    /// Prepares `r` and makes the container's cgroup (once per VM; later
    /// calls find it).
    pub fn new(r: &Restrictions) -> io::Result<Self> {
        let caps = r.capabilities.as_ref().map(|list| {
            list.iter()
                .filter(|c| **c < 64)
                .fold(0u64, |m, c| m | (1u64 << c))
        });
        let rlimits = r
            .ulimits
            .iter()
            .map(|(res, soft, hard)| {
                let v = |x: i64| {
                    if x < 0 {
                        libc::RLIM64_INFINITY
                    } else {
                        x as u64
                    }
                };
                (
                    *res,
                    libc::rlimit64 {
                        rlim_cur: v(*soft),
                        rlim_max: v(*hard),
                    },
                )
            })
            .collect();
        let cgroup_procs = Some(container_cgroup(r.pids_limit)?);
        Ok(Self {
            caps,
            nnp: r.no_new_privileges,
            rlimits,
            cgroup_procs,
        })
    }

    /// In the child, before `chroot`: joins the cgroup.
    pub fn before_chroot(&self) -> io::Result<()> {
        if let Some(procs) = &self.cgroup_procs {
            // SAFETY: `procs` is a valid NUL-terminated path.
            let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
            check(fd.into())?;
            // SAFETY: writing two bytes from a static buffer to `fd`.
            let n = unsafe { libc::write(fd, b"0\n".as_ptr().cast(), 2) };
            // SAFETY: `fd` was opened above and is closed once.
            unsafe { libc::close(fd) };
            check(n as libc::c_long)?;
        }
        Ok(())
    }

    /// In the child, before the user changes: resource limits and the
    /// capability bounding set.
    pub fn before_setuid(&self) -> io::Result<()> {
        for (res, lim) in &self.rlimits {
            // SAFETY: prlimit64 on ourselves (pid 0) with a valid rlimit64
            // to read and no old value to write.
            check(unsafe {
                libc::syscall(
                    libc::SYS_prlimit64,
                    0,
                    *res as libc::c_long,
                    lim as *const libc::rlimit64,
                    std::ptr::null_mut::<libc::rlimit64>(),
                )
            })?;
        }
        if let Some(mask) = self.caps {
            for cap in 0..64u64 {
                if mask & (1 << cap) == 0 {
                    // SAFETY: prctl(PR_CAPBSET_DROP) with an integer
                    // argument; numbers past the kernel's last capability
                    // fail with EINVAL, which is fine.
                    let r = unsafe {
                        libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0)
                    };
                    if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
        }
        Ok(())
    }

    /// In the child, after the user changed: a root process keeps only its
    /// capabilities (a non-root one has none left), and
    /// no-new-privileges.
    pub fn after_setuid(&self, uid: u32) -> io::Result<()> {
        if let (Some(mask), 0) = (self.caps, uid) {
            #[repr(C)]
            struct Header {
                version: u32,
                pid: i32,
            }
            #[repr(C)]
            #[derive(Clone, Copy)]
            struct Data {
                effective: u32,
                permitted: u32,
                inheritable: u32,
            }
            let header = Header {
                version: 0x2008_0522,
                pid: 0,
            };
            let lo = (mask & 0xffff_ffff) as u32;
            let hi = (mask >> 32) as u32;
            let data = [
                Data {
                    effective: lo,
                    permitted: lo,
                    inheritable: lo,
                },
                Data {
                    effective: hi,
                    permitted: hi,
                    inheritable: hi,
                },
            ];
            // SAFETY: capset(2) with a version-3 header and two data
            // structs, both valid for the call.
            check(unsafe {
                libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr())
            })?;
        }
        if self.nnp {
            // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1) with integer arguments.
            check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }.into())?;
        }
        Ok(())
    }
}

/// Memory the kernel and the agent keep outside the container's cgroup
/// (slab, page tables, the agent's output buffers): a sixteenth of the
/// VM's memory, at least 8 MiB.
fn memory_reserve(total: u64) -> u64 {
    (total / 16).max(8 << 20)
}

/// The container cgroup's `memory.max` for a guest whose `/proc/meminfo`
/// is `meminfo`: what is available when the process starts, less the
/// reserve. An out-of-memory kill then happens inside the container's
/// cgroup; a kill by the whole guest could leave the kernel with nothing
/// it may kill (the agent is init) and it would panic.
pub fn memory_limit(meminfo: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    let total = field("MemTotal")?;
    let available = field("MemAvailable")?;
    Some(available.saturating_sub(memory_reserve(total)).max(4 << 20))
}

/// The `oom_kill` count of a cgroup's `memory.events` text (0 when absent).
pub fn oom_kills_from_events(events: &str) -> u64 {
    events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        .unwrap_or(0)
}

/// Processes of the container the kernel killed for want of memory so far
/// (the container cgroup's count; 0 before it exists). The guest kernel
/// keeps no global event counters (`/proc/vmstat` has no `oom_kill`).
pub fn oom_kills() -> u64 {
    std::fs::read_to_string(Path::new(CGROUP_ROOT).join("container/memory.events"))
        .map(|s| oom_kills_from_events(&s))
        .unwrap_or(0)
}

/// Changes the container cgroup's `pids.max` (`None` or ≤ 0: `max`).
pub fn set_pids_limit(limit: Option<i64>) -> io::Result<()> {
    let file = Path::new(CGROUP_ROOT).join("container/pids.max");
    let value = match limit.filter(|l| *l > 0) {
        Some(l) => l.to_string(),
        None => "max".to_string(),
    };
    std::fs::write(&file, value)
        .map_err(|e| io::Error::new(e.kind(), format!("write {}: {e}", file.display())))
}

/// The container cgroup's process count (`pids.current`) and memory use
/// (`memory.current`, bytes); zeros before the cgroup exists.
pub fn usage() -> (u64, u64) {
    let read = |file: &str| {
        std::fs::read_to_string(Path::new(CGROUP_ROOT).join("container").join(file))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (read("pids.current"), read("memory.current"))
}

/// Makes `/sys/fs/cgroup/container` (memory and pids controllers) with
/// its memory limit and, when given, `pids.max = limit`; returns its
/// `cgroup.procs`.
fn container_cgroup(pids_limit: Option<i64>) -> io::Result<CString> {
    let root = Path::new(CGROUP_ROOT);
    let dir = root.join("container");
    if !dir.exists() {
        std::fs::create_dir_all(root)?;
        if !root.join("cgroup.controllers").exists() {
            nix::mount::mount(
                Some("cgroup2"),
                root,
                Some("cgroup2"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| io::Error::other(format!("mount cgroup2: {e}")))?;
        }
        std::fs::write(root.join("cgroup.subtree_control"), "+pids +memory").map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("enable the pids and memory controllers: {e}"),
            )
        })?;
        std::fs::create_dir(&dir)?;
        let meminfo = std::fs::read_to_string("/proc/meminfo")
            .map_err(|e| io::Error::new(e.kind(), format!("read /proc/meminfo: {e}")))?;
        let limit = memory_limit(&meminfo)
            .ok_or_else(|| io::Error::other("no MemTotal or MemAvailable in /proc/meminfo"))?;
        std::fs::write(dir.join("memory.max"), limit.to_string())
            .map_err(|e| io::Error::new(e.kind(), format!("write memory.max: {e}")))?;
    }
    if let Some(limit) = pids_limit.filter(|l| *l > 0) {
        std::fs::write(dir.join("pids.max"), limit.to_string())
            .map_err(|e| io::Error::new(e.kind(), format!("write pids.max: {e}")))?;
    }
    CString::new(dir.join("cgroup.procs").as_os_str().as_encoded_bytes()).map_err(io::Error::other)
}

/// `--shm-size`: the size of the container's `/dev/shm`.
pub fn resize_shm(root: &Path, bytes: u64) -> io::Result<()> {
    let shm = root.join("dev/shm");
    nix::mount::mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_REMOUNT
            | nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some(format!("mode=1777,size={bytes}").as_str()),
    )
    .map_err(|e| io::Error::other(format!("--shm-size: remount {}: {e}", shm.display())))
}

#[cfg(test)]
mod tests {
    use super::{memory_limit, oom_kills_from_events};

    #[test]
    fn oom_kills_are_read_from_memory_events() {
        assert_eq!(
            oom_kills_from_events("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n"),
            1
        );
        assert_eq!(oom_kills_from_events("low 0\n"), 0);
    }

    #[test]
    fn the_memory_limit_leaves_a_reserve_for_the_kernel_and_the_agent() {
        // A 64 MiB VM: 8 MiB stay outside the container's cgroup.
        let small = "MemTotal:          53988 kB\nMemFree:           31932 kB\nMemAvailable:      31532 kB\n";
        assert_eq!(memory_limit(small), Some(31532 * 1024 - (8 << 20)));
        // A 512 MiB VM: a sixteenth.
        let big = "MemTotal:  500000 kB\nMemAvailable:  480000 kB\n";
        assert_eq!(memory_limit(big), Some(480000 * 1024 - 500000 * 1024 / 16));
        // Never below 4 MiB, never without the fields.
        assert_eq!(
            memory_limit("MemTotal: 20000 kB\nMemAvailable: 9000 kB\n"),
            Some(4 << 20)
        );
        assert_eq!(memory_limit("MemFree: 1 kB\n"), None);
    }
}
