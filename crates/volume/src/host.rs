//! Host mounts: bind mounts of volumes and host paths into a VM's shared
//! directory, their removal, and a directory removal that never follows a
//! mount into somebody else's data.
//!
//! A VM's run directory holds bind mounts of volume data and of the user's
//! host directories. `std::fs::remove_dir_all` on it would walk into them
//! and delete the user's files. [`remove_tree`] first detaches every mount
//! below the path, checks that none is left, and then deletes without ever
//! entering a directory on another device.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::other(format!("path {} contains a NUL byte", p.display())))
}

/// Undoes the octal escapes of `/proc/self/mountinfo` (`\040` is a space).
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let oct = std::str::from_utf8(oct).unwrap_or("");
                if let Ok(v) = u8::from_str_radix(oct, 8) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// Mount points of this process's mount namespace, in mount order.
pub fn mount_points() -> io::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text))
}

fn parse_mountinfo(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .collect()
}

/// Mount points at `path` or below it, deepest first.
pub fn mounts_under(path: &Path) -> io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = mount_points()?
        .into_iter()
        .filter(|m| m.starts_with(path))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    Ok(v)
}

/// Whether something is mounted exactly at `path`.
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    Ok(mount_points()?.iter().any(|m| m == path))
}

/// Bind-mounts `src` on `dst` (recursively: mounts below `src` come along,
/// as Docker's `rbind`), private (mount and unmount events do not travel
/// between it and its source), and read-only when asked.
pub fn bind(src: &Path, dst: &Path, read_only: bool) -> io::Result<()> {
    let (s, d) = (cstr(src)?, cstr(dst)?);
    let fail = |what: &str| {
        let e = io::Error::last_os_error();
        io::Error::new(
            e.kind(),
            format!("{what} {} on {}: {e}", src.display(), dst.display()),
        )
    };
    // SAFETY: both pointers are valid NUL-terminated strings that outlive
    // the call; fstype and data are null, which MS_BIND allows.
    let r = unsafe {
        libc::mount(
            s.as_ptr(),
            d.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(fail("bind-mount"));
    }
    // SAFETY: as above; a propagation change takes only the target.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            d.as_ptr(),
            std::ptr::null(),
            libc::MS_PRIVATE | libc::MS_REC,
            std::ptr::null(),
        )
    };
    if r != 0 {
        let e = fail("make private");
        let _ = unmount(dst);
        return Err(e);
    }
    if read_only {
        if let Err(e) = remount_read_only(dst) {
            let _ = unmount(dst);
            return Err(e);
        }
    }
    Ok(())
}

/// Makes the bind mount at `path` read-only.
pub fn remount_read_only(path: &Path) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: `p` is a valid NUL-terminated path; a bind remount takes no
    // source, fstype or data.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            p.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("remount {} read-only: {e}", path.display()),
        ));
    }
    Ok(())
}

/// Detaches the mount at `path` (`umount -l`): it disappears from the tree
/// at once, and is freed when its last user (a VM's open file) lets go.
pub fn unmount(path: &Path) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: `p` is a valid NUL-terminated path; MNT_DETACH is a valid flag.
    if unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("unmount {}: {e}", path.display()),
        ));
    }
    Ok(())
}

/// Detaches every mount at or below `path`, deepest first. Fails if one
/// cannot be detached.
pub fn unmount_under(path: &Path) -> io::Result<()> {
    // A mount stacked on another at the same point shows up twice; detach
    // until none is left (bounded, in case one refuses to go).
    for _ in 0..8 {
        let left = mounts_under(path)?;
        if left.is_empty() {
            return Ok(());
        }
        for m in &left {
            match unmount(m) {
                Ok(()) => {}
                // Gone already (detached with its parent).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    let left = mounts_under(path)?;
    if left.is_empty() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "mounts below {} could not be detached: {left:?}",
            path.display()
        )))
    }
}

/// Removes the directory tree at `path` (a missing path is fine), never
/// touching data of another mount: every mount below it is detached first,
/// the removal is refused if one remains, and the walk never enters a
/// directory on another device.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    };
    if !meta.is_dir() {
        return std::fs::remove_file(path);
    }
    unmount_under(path)?;
    let meta = std::fs::symlink_metadata(path)?;
    remove_walk(path, meta.dev())
}

fn remove_walk(path: &Path, dev: u64) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io::Error::new(
                e.kind(),
                format!("remove {}: {e}", path.display()),
            )),
            _ => Ok(()),
        };
    }
    if meta.dev() != dev {
        return Err(io::Error::other(format!(
            "refusing to remove {}: another filesystem is mounted there",
            path.display()
        )));
    }
    for entry in std::fs::read_dir(path)? {
        remove_walk(&entry?.path(), dev)?;
    }
    match std::fs::remove_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io::Error::new(
            e.kind(),
            format!("remove {}: {e}", path.display()),
        )),
        _ => Ok(()),
    }
}

/// Bytes used by the files below `path` (allocated blocks, hard links
/// counted once), not crossing into other filesystems.
pub fn disk_usage(path: &Path) -> u64 {
    fn walk(p: &Path, dev: u64, seen: &mut std::collections::HashSet<(u64, u64)>) -> u64 {
        let Ok(m) = std::fs::symlink_metadata(p) else {
            return 0;
        };
        if m.dev() != dev || !seen.insert((m.dev(), m.ino())) {
            return 0;
        }
        let mut n = m.blocks() * 512;
        if m.is_dir() {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                n += walk(&e.path(), dev, seen);
            }
        }
        n
    }
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let mut seen = std::collections::HashSet::new();
    // The directory itself is not counted, as Docker's `du` of a volume.
    let mut n = 0;
    if m.is_dir() {
        seen.insert((m.dev(), m.ino()));
        for e in std::fs::read_dir(path).into_iter().flatten().flatten() {
            n += walk(&e.path(), m.dev(), &mut seen);
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        let text =
            "36 35 98:0 /mnt1 /mnt\\040with\\040space rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 98:0 / / rw - ext4 /dev/sda rw\n";
        assert_eq!(
            parse_mountinfo(text),
            vec![PathBuf::from("/mnt with space"), PathBuf::from("/")]
        );
    }

    #[test]
    fn removing_a_tree_never_deletes_what_is_bind_mounted_in_it() {
        if !root() {
            eprintln!("skipped: bind mounts need root");
            return;
        }
        let user = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(user.path().join("sub")).expect("mkdir");
        std::fs::write(user.path().join("sub/precious"), "data").expect("write");
        let file = user.path().join("single");
        std::fs::write(&file, "one file").expect("write");

        let tree = tempfile::tempdir().expect("tempdir");
        let share = tree.path().join("run/share");
        std::fs::create_dir_all(share.join("0")).expect("mkdir");
        std::fs::write(share.join("1"), "").expect("mountpoint file");
        bind(user.path(), &share.join("0"), false).expect("bind dir");
        bind(&file, &share.join("1"), true).expect("bind file");
        // Mounted twice at the same place: both must go.
        bind(user.path(), &share.join("0"), true).expect("bind again");
        assert_eq!(
            std::fs::read_to_string(share.join("0/sub/precious")).expect("read"),
            "data"
        );
        assert!(
            std::fs::write(share.join("1"), "x").is_err(),
            "read-only bind"
        );

        remove_tree(&tree.path().join("run")).expect("remove");
        assert!(!tree.path().join("run").exists());
        assert_eq!(
            std::fs::read_to_string(user.path().join("sub/precious")).expect("read"),
            "data"
        );
        assert_eq!(std::fs::read_to_string(&file).expect("read"), "one file");
        assert!(mounts_under(tree.path()).expect("mountinfo").is_empty());
    }

    #[test]
    fn the_walk_refuses_to_enter_another_filesystem() {
        if !root() {
            eprintln!("skipped: mounts need root");
            return;
        }
        let tree = tempfile::tempdir().expect("tempdir");
        let m = tree.path().join("t");
        std::fs::create_dir(&m).expect("mkdir");
        let (src, dst) = (cstr(Path::new("tmpfs")).expect("c"), cstr(&m).expect("c"));
        let fstype = cstr(Path::new("tmpfs")).expect("c");
        // SAFETY: valid NUL-terminated strings; no data.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "mount tmpfs: {}", io::Error::last_os_error());
        std::fs::write(m.join("f"), "on tmpfs").expect("write");
        let dev = std::fs::metadata(tree.path()).expect("stat").dev();
        let e = remove_walk(tree.path(), dev).expect_err("must refuse");
        assert!(e.to_string().contains("another filesystem"), "{e}");
        assert_eq!(
            std::fs::read_to_string(m.join("f")).expect("read"),
            "on tmpfs"
        );
        unmount(&m).expect("unmount");
    }
}
