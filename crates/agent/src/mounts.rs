//! Volumes, bind mounts and tmpfs mounts of the container, applied before
//! its process starts.
//!
//! The host bind-mounts every volume and host directory of the container
//! into the VM's shared directory (one entry per mount, named by index) and
//! lists them in the `Start` spec. The agent mounts the 9p share once, at a
//! private place outside the container's root, fills an empty volume from
//! the image's content at its target (copy-up, as Docker does), and
//! bind-mounts each entry onto its target inside the root. The share is
//! mounted only here, never before `Start`: a template VM must not have it
//! mounted (QEMU cannot migrate a VM whose 9p export is in use).
//!
//! [`copy_tree`] is pure file work (testable on the host); the rest mounts
//! and only runs inside the VM.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use vessel_protocol::MountSpec;

use crate::rootfs::{mount_tmpfs, resolve_in_root};

/// Where the VM's shared directory is mounted (outside the container's root).
pub const SHARE: &str = "/run/vessel/share";

/// The 9p mount tag of the VM's shared directory (QEMU's `mount_tag`, the
/// host's `vessel_vm::SHARE_TAG`).
const SHARE_TAG: &str = "vessel-share";

/// 9p options: `cache=mmap` sends every read and write to the host (two
/// VMs sharing a volume see each other's writes at once) while still
/// allowing shared writable `mmap`; a large `msize` moves up to 512 KiB per
/// request.
const SHARE_OPTIONS: &str = "trans=virtio,version=9p2000.L,cache=mmap,msize=512000";

/// Mounts the container's tmpfs mounts and its shared mounts, parents
/// before children (sorted by the depth of their targets).
pub fn apply(root: &Path, tmpfs: &[(String, String)], mounts: &[MountSpec]) -> io::Result<()> {
    enum One<'a> {
        Tmpfs(&'a str, &'a str),
        Share(&'a MountSpec),
    }
    let mut all: Vec<(usize, One<'_>)> = tmpfs
        .iter()
        .map(|(p, o)| (depth(p), One::Tmpfs(p, o)))
        .chain(mounts.iter().map(|m| (depth(&m.target), One::Share(m))))
        .collect();
    // Stable: equal depths keep the host's order.
    all.sort_by_key(|(d, _)| *d);
    if !mounts.is_empty() {
        mount_share()?;
    }
    for (_, one) in all {
        match one {
            One::Tmpfs(path, options) => mount_tmpfs(root, path, options)
                .map_err(|e| io::Error::other(format!("--tmpfs {path}: {e}")))?,
            One::Share(m) => mount_one(root, m)
                .map_err(|e| io::Error::other(format!("mount on {}: {e}", m.target)))?,
        }
    }
    Ok(())
}

fn depth(path: &str) -> usize {
    Path::new(path)
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .count()
}

fn mount_share() -> io::Result<()> {
    std::fs::create_dir_all(SHARE)?;
    mount(
        Some(SHARE_TAG),
        SHARE,
        Some("9p"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(SHARE_OPTIONS),
    )
    .map_err(|e| io::Error::other(format!("mount the shared directory (9p) on {SHARE}: {e}")))
}

fn mount_one(root: &Path, m: &MountSpec) -> io::Result<()> {
    if m.share_dir.is_empty() || m.share_dir.contains('/') || m.share_dir.starts_with('.') {
        return Err(io::Error::other(format!(
            "invalid share entry {:?}",
            m.share_dir
        )));
    }
    let src = Path::new(SHARE).join(&m.share_dir);
    let target = resolve_in_root(root, Path::new(&m.target))?;
    if m.file {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if std::fs::symlink_metadata(&target).is_err() {
            std::fs::File::create(&target)?;
        }
    } else {
        if m.copy_up && is_empty_dir(&src)? {
            if let Ok(meta) = std::fs::symlink_metadata(&target) {
                if meta.is_dir() {
                    copy_tree(&target, &src)?;
                    copy_owner_and_mode(&meta, &src)?;
                }
            }
        }
        std::fs::create_dir_all(&target)?;
    }
    mount(
        Some(&src),
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| io::Error::other(format!("bind {}: {e}", src.display())))?;
    if m.read_only {
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| io::Error::other(format!("remount read-only: {e}")))?;
    }
    Ok(())
}

fn is_empty_dir(p: &Path) -> io::Result<bool> {
    Ok(std::fs::read_dir(p)?.next().is_none())
}

fn copy_owner_and_mode(meta: &std::fs::Metadata, dst: &Path) -> io::Result<()> {
    std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()))?;
    if !meta.file_type().is_symlink() {
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    }
    Ok(())
}

/// Copies the content of directory `src` into directory `dst`: files,
/// directories, symlinks (as links), device nodes and FIFOs, with their
/// owners, modes and modification times; hard links stay linked.
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let mut links = std::collections::HashMap::<(u64, u64), PathBuf>::new();
    copy_children(src, dst, &mut links)
}

fn copy_children(
    src: &Path,
    dst: &Path,
    links: &mut std::collections::HashMap<(u64, u64), PathBuf>,
) -> io::Result<()> {
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&from)?;
        let ft = meta.file_type();
        if ft.is_dir() {
            std::fs::create_dir(&to)?;
            copy_children(&from, &to, links)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
                    std::fs::hard_link(first, &to)?;
                    continue;
                }
                links.insert((meta.dev(), meta.ino()), to.clone());
            }
            std::fs::copy(&from, &to)?;
        } else {
            let kind = if ft.is_fifo() {
                nix::sys::stat::SFlag::S_IFIFO
            } else if ft.is_char_device() {
                nix::sys::stat::SFlag::S_IFCHR
            } else if ft.is_block_device() {
                nix::sys::stat::SFlag::S_IFBLK
            } else {
                // Sockets are not copied (as Docker's copy skips them).
                continue;
            };
            nix::sys::stat::mknod(
                &to,
                kind,
                nix::sys::stat::Mode::from_bits_truncate(meta.mode() & 0o7777),
                meta.rdev(),
            )
            .map_err(|e| io::Error::other(format!("mknod {}: {e}", to.display())))?;
        }
        copy_owner_and_mode(&meta, &to)?;
        // Times last: a directory's changes when its entries are made.
        let time = |s: i64, ns: i64| nix::sys::time::TimeSpec::new(s, ns);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &to,
            &time(meta.atime(), meta.atime_nsec()),
            &time(meta.mtime(), meta.mtime_nsec()),
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| io::Error::other(format!("set times of {}: {e}", to.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_sort_parents_first() {
        assert!(depth("/data") < depth("/data/sub"));
        assert_eq!(depth("/a/./b/"), 2);
    }

    #[test]
    fn copy_tree_keeps_modes_owners_links_and_hard_links() {
        let src = tempfile::tempdir().expect("tempdir");
        let dst = tempfile::tempdir().expect("tempdir");
        let s = src.path();
        std::fs::create_dir_all(s.join("sub/deeper")).expect("mkdir");
        std::fs::write(s.join("a.txt"), "hello").expect("write");
        std::fs::write(s.join("sub/run.sh"), "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(s.join("sub/run.sh"), std::fs::Permissions::from_mode(0o750))
            .expect("chmod");
        std::fs::set_permissions(s.join("sub"), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        std::os::unix::fs::symlink("a.txt", s.join("link")).expect("symlink");
        std::fs::hard_link(s.join("a.txt"), s.join("sub/hard")).expect("hard link");
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            std::os::unix::fs::lchown(s.join("a.txt"), Some(1234), Some(4321)).expect("chown");
        }
        copy_tree(s, dst.path()).expect("copy");
        let d = dst.path();
        assert_eq!(
            std::fs::read_to_string(d.join("a.txt")).expect("read"),
            "hello"
        );
        let m = std::fs::metadata(d.join("sub/run.sh")).expect("stat");
        assert_eq!(m.mode() & 0o777, 0o750);
        let m = std::fs::metadata(d.join("sub")).expect("stat");
        assert_eq!(m.mode() & 0o777, 0o700);
        assert!(d.join("sub/deeper").is_dir());
        assert_eq!(
            std::fs::read_link(d.join("link")).expect("readlink"),
            PathBuf::from("a.txt")
        );
        let (a, h) = (
            std::fs::metadata(d.join("a.txt")).expect("stat"),
            std::fs::metadata(d.join("sub/hard")).expect("stat"),
        );
        assert_eq!(a.ino(), h.ino(), "hard links stay linked");
        if root {
            assert_eq!((a.uid(), a.gid()), (1234, 4321));
        }
        assert_eq!(
            a.mtime(),
            std::fs::metadata(s.join("a.txt")).expect("stat").mtime()
        );
    }
}
