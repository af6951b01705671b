//! `docker diff`: what the container changed in its image's filesystem,
//! read from the overlay's upper directory.
//!
//! Every path in the upper directory is the container's: a character
//! device 0:0 is a whiteout (deleted), a path that also exists in the image
//! (the lower directory) is modified, any other is added. What the agent
//! itself writes for every container (`/etc/hostname`, `/etc/hosts`,
//! `/etc/resolv.conf`, `/etc/machine-id`, the mount points of `/proc`,
//! `/sys`, `/dev`) is left out, as Docker leaves out its bind mounts.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::rootfs::{LOWER, UPPERFS};

/// Paths the agent writes or mounts in every container.
const AGENT_PATHS: [&str; 7] = [
    "/etc/hostname",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/machine-id",
    "/proc",
    "/sys",
    "/dev",
];

/// Docker's change kinds.
const MODIFIED: u8 = 0;
const ADDED: u8 = 1;
const DELETED: u8 = 2;

/// The container's changes, sorted by path. `mounted`: the root filesystem
/// is mounted (otherwise there is nothing to read).
pub fn changes(mounted: bool) -> io::Result<Vec<(u8, String)>> {
    if !mounted {
        return Err(io::Error::other(
            "the container's root filesystem is not mounted",
        ));
    }
    let upper = PathBuf::from(UPPERFS).join("upper");
    let mut out = Vec::new();
    walk(&upper, Path::new("/"), &mut out)?;
    // A directory the container only touched to reach an agent path is
    // not a change of its own.
    let parents_of_agent_paths: Vec<&str> = vec!["/etc"];
    out.retain(|(kind, path)| {
        !(*kind == MODIFIED
            && parents_of_agent_paths.contains(&path.as_str())
            && !has_own_child(&upper, path))
    });
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

fn walk(dir: &Path, rel: &Path, out: &mut Vec<(u8, String)>) -> io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = rel.join(e.file_name());
        let shown = path.to_string_lossy().into_owned();
        if AGENT_PATHS.contains(&shown.as_str()) {
            continue;
        }
        let meta = e.metadata()?;
        let ft = meta.file_type();
        if ft.is_char_device() && meta.rdev() == 0 {
            out.push((DELETED, shown));
            continue;
        }
        let in_lower = std::fs::symlink_metadata(lower_path(&path)).is_ok();
        out.push((if in_lower { MODIFIED } else { ADDED }, shown));
        if ft.is_dir() {
            walk(&e.path(), &path, out)?;
        }
    }
    Ok(())
}

fn lower_path(rel: &Path) -> PathBuf {
    Path::new(LOWER).join(rel.strip_prefix("/").unwrap_or(rel))
}

/// Whether `dir` (a container path) holds anything in the upper directory
/// other than agent paths.
fn has_own_child(upper: &Path, dir: &str) -> bool {
    let Ok(rd) = std::fs::read_dir(upper.join(dir.trim_start_matches('/'))) else {
        return false;
    };
    rd.flatten().any(|e| {
        let p = format!(
            "{}/{}",
            dir.trim_end_matches('/'),
            e.file_name().to_string_lossy()
        );
        !AGENT_PATHS.contains(&p.as_str())
    })
}

/// `docker commit`: the container's changes as an image layer, a tar in
/// Docker's layer format written to `out`: the upper directory's entries
/// with their owners, modes and times, an overlay whiteout (character
/// device 0:0) as an empty `.wh.<name>` file, and an opaque directory
/// (`trusted.overlay.opaque=y`) with a `.wh..wh..opq` entry in it. The
/// agent's own files are left out, as for `docker diff`. Symlinks are
/// stored as links, never followed.
pub fn write_layer(mounted: bool, out: impl io::Write) -> io::Result<()> {
    if !mounted {
        return Err(io::Error::other(
            "the container's root filesystem is not mounted",
        ));
    }
    let upper = PathBuf::from(UPPERFS).join("upper");
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    layer_walk(&mut tar, &upper, Path::new(""))?;
    tar.into_inner()?.flush()
}

fn layer_walk<W: io::Write>(tar: &mut tar::Builder<W>, dir: &Path, rel: &Path) -> io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = rel.join(e.file_name());
        if AGENT_PATHS.contains(&format!("/{}", path.to_string_lossy()).as_str()) {
            continue;
        }
        let meta = std::fs::symlink_metadata(e.path())?;
        let ft = meta.file_type();
        if ft.is_char_device() && meta.rdev() == 0 {
            let name = format!(".wh.{}", e.file_name().to_string_lossy());
            empty_file(tar, &rel.join(name), &meta)?;
            continue;
        }
        tar.append_path_with_name(e.path(), &path)?;
        if ft.is_dir() {
            if is_opaque(&e.path()) {
                empty_file(tar, &path.join(".wh..wh..opq"), &meta)?;
            }
            layer_walk(tar, &e.path(), &path)?;
        }
    }
    Ok(())
}

fn empty_file<W: io::Write>(
    tar: &mut tar::Builder<W>,
    path: &Path,
    meta: &std::fs::Metadata,
) -> io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(0);
    h.set_mode(0o644);
    h.set_mtime(meta.mtime().max(0) as u64);
    tar.append_data(&mut h, path, io::empty())
}

fn is_opaque(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut buf = [0u8; 4];
    // SAFETY: lgetxattr(2) with a valid NUL-terminated path and name and a
    // buffer of the length given; it writes at most that many bytes.
    let n = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    n == 1 && buf[0] == b'y'
}
