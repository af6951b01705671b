//! `docker cp` inside the guest: stat a path, stream it out as a tar
//! archive, or extract a tar archive into a directory, all within the
//! container's root filesystem.
//!
//! The archive work runs in a child process (`vessel-init` itself, started
//! with [`COPY_OUT_ARG`] or [`COPY_IN_ARG`]) that first `chroot`s into the
//! container's root: names in an archive, and symlinks already in the
//! container, can then never reach the agent's own files. The child reports
//! failure on its stderr (the reaper, not the caller, collects its status).

use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vessel_protocol::PathStat;

/// `vessel-init --copy-out ROOT PATH`: writes PATH as a tar to stdout.
pub const COPY_OUT_ARG: &str = "--copy-out";
/// `vessel-init --export ROOT /`: the whole root filesystem as a tar on
/// stdout, without what is mounted on `/proc`, `/sys` and `/dev`.
pub const EXPORT_ARG: &str = "--export";
/// `vessel-init --copy-in ROOT DIR`: extracts a tar from stdin into DIR,
/// everything owned by root.
pub const COPY_IN_ARG: &str = "--copy-in";
/// As [`COPY_IN_ARG`], keeping the archive's owners.
pub const COPY_IN_OWNERS_ARG: &str = "--copy-in-keep-owners";

/// Go's `os.FileMode` type bits, which Docker's path stat carries.
mod go_mode {
    pub const DIR: u32 = 1 << 31;
    pub const SYMLINK: u32 = 1 << 27;
    pub const DEVICE: u32 = 1 << 26;
    pub const NAMED_PIPE: u32 = 1 << 25;
    pub const SOCKET: u32 = 1 << 24;
    pub const SETUID: u32 = 1 << 23;
    pub const SETGID: u32 = 1 << 22;
    pub const CHAR_DEVICE: u32 = 1 << 21;
    pub const STICKY: u32 = 1 << 20;
}

/// Splits a container path into its parent (resolved inside `root`, so
/// symlinks on the way stay inside it) and its last component, which is not
/// followed (Docker's `lstat` semantics).
fn locate(root: &Path, path: &str) -> io::Result<PathBuf> {
    let p = Path::new(path);
    let name = p.file_name();
    let parent = match (p.parent(), name) {
        (Some(parent), Some(_)) => crate::rootfs::resolve_in_root(root, parent)?,
        _ => crate::rootfs::resolve_in_root(root, p)?,
    };
    Ok(match name {
        Some(n) => parent.join(n),
        None => parent,
    })
}

/// Docker's stat of `path` in the container.
pub fn stat(root: &Path, path: &str) -> io::Result<PathStat> {
    let full = locate(root, path)?;
    let meta = std::fs::symlink_metadata(&full)?;
    let ft = meta.file_type();
    let raw = meta.mode();
    let mut mode = raw & 0o777;
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        mode |= go_mode::DIR;
    } else if ft.is_symlink() {
        mode |= go_mode::SYMLINK;
    } else if ft.is_block_device() {
        mode |= go_mode::DEVICE;
    } else if ft.is_char_device() {
        mode |= go_mode::DEVICE | go_mode::CHAR_DEVICE;
    } else if ft.is_fifo() {
        mode |= go_mode::NAMED_PIPE;
    } else if ft.is_socket() {
        mode |= go_mode::SOCKET;
    }
    if raw & 0o4000 != 0 {
        mode |= go_mode::SETUID;
    }
    if raw & 0o2000 != 0 {
        mode |= go_mode::SETGID;
    }
    if raw & 0o1000 != 0 {
        mode |= go_mode::STICKY;
    }
    let link_target = if ft.is_symlink() {
        std::fs::read_link(&full)?.to_string_lossy().into_owned()
    } else {
        String::new()
    };
    let name = Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".into());
    Ok(PathStat {
        name,
        size: meta.len() as i64,
        mode,
        mtime_unix_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        link_target,
    })
}

/// Whether `path` is a directory in the container (following symlinks
/// inside the root).
pub fn is_dir(root: &Path, path: &str) -> io::Result<bool> {
    let full = crate::rootfs::resolve_in_root(root, Path::new(path))?;
    Ok(std::fs::metadata(full)?.is_dir())
}

/// Starts the child that archives `path` (stdout) or extracts into it
/// (stdin).
pub fn spawn(arg: &str, root: &Path, path: &str) -> io::Result<std::process::Child> {
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(arg).arg(root).arg(path).stderr(Stdio::piped());
    if arg == COPY_OUT_ARG || arg == EXPORT_ARG {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    } else {
        cmd.stdin(Stdio::piped()).stdout(Stdio::null());
    }
    cmd.spawn()
}

/// Reads what the child wrote on stderr: empty when it succeeded.
pub fn child_error(child: &mut std::process::Child) -> String {
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    err.trim().to_string()
}

/// The child's side: runs when `vessel-init` was started with one of the
/// copy arguments. Returns the process exit code.
pub fn child_main(args: &[String]) -> i32 {
    let (Some(arg), Some(root), Some(path)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: vessel-init --copy-out|--copy-in ROOT PATH");
        return 2;
    };
    let result = (|| -> io::Result<()> {
        nix::unistd::chroot(root.as_str()).map_err(io::Error::from)?;
        std::env::set_current_dir("/")?;
        match arg.as_str() {
            COPY_OUT_ARG => copy_out(path, io::stdout().lock()),
            EXPORT_ARG => export(io::stdout().lock()),
            COPY_IN_ARG => copy_in(path, io::stdin().lock(), false),
            _ => copy_in(path, io::stdin().lock(), true),
        }
    })();
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

/// Docker's archive of `path`: one entry named after its last component
/// (a directory with everything below it); `dir/.` gives the directory's
/// contents without the directory itself.
fn copy_out(path: &str, out: impl Write) -> io::Result<()> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    let p = Path::new(path);
    let contents_only = path.ends_with("/.") || path == ".";
    let meta = std::fs::symlink_metadata(p)?;
    if meta.is_dir() {
        if contents_only {
            for e in std::fs::read_dir(p)? {
                let e = e?;
                let name = PathBuf::from(e.file_name());
                append(&mut b, &e.path(), &name)?;
            }
        } else {
            let name = p
                .file_name()
                .map(PathBuf::from)
                .unwrap_or_else(|| ".".into());
            append(&mut b, p, &name)?;
        }
    } else {
        let name = p
            .file_name()
            .map(PathBuf::from)
            .ok_or_else(|| io::Error::other("no file name"))?;
        b.append_path_with_name(p, name)?;
    }
    b.into_inner()?.flush()
}

/// `docker export`: every top-level entry of the root; `/proc`, `/sys` and
/// `/dev` only as empty directories (their contents are the guest's).
fn export(out: impl Write) -> io::Result<()> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    let mut entries: Vec<_> = std::fs::read_dir("/")?.collect::<io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = PathBuf::from(e.file_name());
        let pseudo = ["proc", "sys", "dev"].iter().any(|p| name == Path::new(p));
        if pseudo && e.file_type()?.is_dir() {
            let mut h = tar::Header::new_gnu();
            h.set_metadata_in_mode(
                &std::fs::symlink_metadata(e.path())?,
                tar::HeaderMode::Complete,
            );
            h.set_size(0);
            b.append_data(&mut h, &name, io::empty())?;
        } else {
            append(&mut b, &e.path(), &name)?;
        }
    }
    b.into_inner()?.flush()
}

fn append<W: Write>(b: &mut tar::Builder<W>, src: &Path, name: &Path) -> io::Result<()> {
    if std::fs::symlink_metadata(src)?.is_dir() {
        b.append_dir_all(name, src)
    } else {
        b.append_path_with_name(src, name)
    }
}

/// Extracts an archive into directory `dir`, keeping modes and times (and
/// owners with `keep_owners`), as `docker cp` into a container does.
fn copy_in(dir: &str, input: impl Read, keep_owners: bool) -> io::Result<()> {
    let mut a = tar::Archive::new(input);
    a.set_preserve_permissions(true);
    a.set_preserve_ownerships(keep_owners);
    a.set_preserve_mtime(true);
    a.set_unpack_xattrs(false);
    a.set_overwrite(true);
    a.unpack(dir)
}
