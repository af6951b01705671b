//! What the container's processes may do: Docker's capability set
//! (`--cap-add`, `--cap-drop`, `--privileged`), `--ulimit`,
//! `--security-opt no-new-privileges` and `--pids-limit` (a cgroup of the
//! guest's), applied between fork and exec of the main process and of
//! every exec.
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
    /// Prepares `r`. With a pids limit, this makes the guest's cgroup
    /// (once per VM; later calls find it).
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
        let cgroup_procs = match r.pids_limit {
            Some(limit) if limit > 0 => Some(pids_cgroup(limit)?),
            _ => None,
        };
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

/// Makes `/sys/fs/cgroup/container` with `pids.max = limit` and returns
/// its `cgroup.procs`.
fn pids_cgroup(limit: i64) -> io::Result<CString> {
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
        std::fs::write(root.join("cgroup.subtree_control"), "+pids")
            .map_err(|e| io::Error::new(e.kind(), format!("enable the pids controller: {e}")))?;
        std::fs::create_dir(&dir)?;
    }
    std::fs::write(dir.join("pids.max"), limit.to_string())
        .map_err(|e| io::Error::new(e.kind(), format!("write pids.max: {e}")))?;
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
