//! Safe extraction of hostile tar streams (layers and docker-save archives).
//!
//! Path resolution uses `safe_path::scoped_join` (Kata's userspace
//! implementation of chroot-like resolution, modelled on filepath-securejoin):
//! every *parent* component is resolved inside `root`, symlinks included
//! (absolute symlink targets are taken relative to `root`, `..` is clamped
//! at `root`). We chose it over `openat2(RESOLVE_IN_ROOT)` because it needs no
//! unsafe fd plumbing and works on older kernels; the usual TOCTOU weakness of
//! userspace resolution does not apply because the extraction directory is a
//! private staging directory that nothing else writes to while we extract.
//! The *final* component is never followed: an existing entry there is
//! removed (lstat) and the new one created with `O_EXCL` (which does not
//! follow symlinks).

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, IoContext, Result};

const WHITEOUT_PREFIX: &str = ".wh.";
const WHITEOUT_META_PREFIX: &str = ".wh..wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

/// The most a layer's sparse files may claim beyond the data they hold (the
/// sum of their holes). A few bytes of tar can describe a terabyte file;
/// beyond this the layer is refused rather than read for hours.
pub const MAX_SPARSE_HOLES: u64 = 4 << 30;

/// Copies `reader` to `f`, seeking over blocks of zeros instead of writing
/// them, so that a sparse file stays sparse on the host; returns the bytes
/// read.
fn copy_sparse(reader: &mut impl Read, f: &mut File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom, Write};
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf[..n].iter().all(|b| *b == 0) {
            f.seek(SeekFrom::Current(n as i64))?;
        } else {
            f.write_all(&buf[..n])?;
        }
        total += n as u64;
    }
    // A file that ends in a hole gets its length.
    f.set_len(total)?;
    Ok(total)
}

/// Apply one layer tar (uncompressed) onto `root`, honouring OCI whiteouts.
/// Applying the layers of an image in order onto an empty directory flattens it.
pub fn extract_layer<R: Read>(reader: R, root: &Path) -> Result<()> {
    extract(reader, root, true)
}

/// Extract a plain tar (e.g. a docker-save archive) into `root`, with the same
/// safety rules as [`extract_layer`] but no whiteout processing.
pub fn extract_archive<R: Read>(reader: R, root: &Path) -> Result<()> {
    extract(reader, root, false)
}

fn bad(msg: impl Into<String>) -> Error {
    Error::InvalidLayer(msg.into())
}

/// Check a tar path: only normal components (and `.`); no `..`, no absolute paths.
fn clean_rel_path(raw: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(bad(format!("path {} contains '..'", raw.display())))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(bad(format!("absolute path {} not allowed", raw.display())))
            }
        }
    }
    Ok(out)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| bad(format!("path {} contains NUL", p.display())))
}

fn lsetxattr(path: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let p = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let n = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: p and n are valid NUL-terminated strings that outlive the call;
    // value points to value.len() readable bytes.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_mtime_nofollow(path: &Path, mtime: u64) -> Result<()> {
    let p = cstr(path)?;
    let secs = i64::try_from(mtime).unwrap_or(i64::MAX) as libc::time_t;
    let ts = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
    ];
    // SAFETY: p is a valid C string, ts is an array of two timespecs as utimensat requires.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .ctx(|| format!("setting mtime of {}", path.display()));
    }
    Ok(())
}

/// Remove whatever is at `path` without following a symlink there.
fn remove_any(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            fs::remove_dir_all(path).ctx(|| format!("removing {}", path.display()))
        }
        Ok(_) => fs::remove_file(path).ctx(|| format!("removing {}", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).ctx(|| format!("inspecting {}", path.display())),
    }
}

/// Resolve `rel`'s parent inside `root` (following symlinks only within root),
/// create it, and return (parent, final path).
fn resolve_parent(root: &Path, rel: &Path) -> Result<(PathBuf, PathBuf)> {
    let name = rel
        .file_name()
        .ok_or_else(|| bad(format!("bad path {}", rel.display())))?;
    let parent_rel = rel.parent().unwrap_or(Path::new(""));
    let parent = safe_path::scoped_join(root, parent_rel)
        .ctx(|| format!("resolving {} inside the root", parent_rel.display()))?;
    if !parent.starts_with(root) {
        return Err(bad(format!("{} escapes the root", rel.display())));
    }
    match fs::symlink_metadata(&parent) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(bad(format!(
                "parent of {} is not a directory",
                rel.display()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // The missing components contain no symlinks (scoped_join expanded the
            // existing ones), so create_dir_all stays inside root.
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&parent)
                .ctx(|| format!("creating {}", parent.display()))?;
        }
        Err(e) => return Err(e).ctx(|| format!("inspecting {}", parent.display())),
    }
    let full = parent.join(name);
    Ok((parent, full))
}

fn record_touched(touched: &mut HashSet<PathBuf>, root: &Path, path: &Path) {
    let mut p = path.to_path_buf();
    loop {
        if !touched.insert(p.clone()) || p == root {
            break;
        }
        if !p.pop() || !p.starts_with(root) {
            break;
        }
    }
}

/// Opaque whiteout: remove everything below `dir` that this layer did not add.
fn opaque_clear(dir: &Path, touched: &HashSet<PathBuf>) -> Result<()> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).ctx(|| format!("reading {}", dir.display())),
    };
    for ent in rd {
        let ent = ent.ctx(|| format!("reading {}", dir.display()))?;
        let p = ent.path();
        if touched.contains(&p) {
            let ft = ent
                .file_type()
                .ctx(|| format!("inspecting {}", p.display()))?;
            if ft.is_dir() {
                opaque_clear(&p, touched)?;
            }
        } else {
            remove_any(&p)?;
        }
    }
    Ok(())
}

fn extract<R: Read>(reader: R, root: &Path, whiteouts: bool) -> Result<()> {
    let root = fs::canonicalize(root).ctx(|| format!("resolving {}", root.display()))?;
    let mut ar = tar::Archive::new(reader);
    let mut touched: HashSet<PathBuf> = HashSet::new();
    let mut holes = 0u64;
    let entries = ar.entries().map_err(|e| bad(format!("reading tar: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("reading tar entry: {e}")))?;
        let raw = entry
            .path()
            .map_err(|e| bad(format!("bad entry path: {e}")))?
            .into_owned();
        let rel = clean_rel_path(&raw)?;
        let kind = entry.header().entry_type();
        if rel.as_os_str().is_empty() {
            // "./": the root itself; we keep the root as created by us.
            continue;
        }
        let name = rel
            .file_name()
            .unwrap_or(OsStr::new(""))
            .to_string_lossy()
            .into_owned();
        if whiteouts && name.starts_with(WHITEOUT_PREFIX) {
            let (parent, _) = resolve_parent(&root, &rel)?;
            if name == OPAQUE_WHITEOUT {
                opaque_clear(&parent, &touched)?;
            } else if name.starts_with(WHITEOUT_META_PREFIX) {
                // other aufs metadata (.wh..wh.plnk, ...): ignore
            } else {
                let target = &name[WHITEOUT_PREFIX.len()..];
                if target.is_empty() || target == "." || target == ".." {
                    return Err(bad(format!("bad whiteout {}", raw.display())));
                }
                remove_any(&parent.join(target))?;
            }
            continue;
        }
        let (_, full) = resolve_parent(&root, &rel)?;
        let existing = fs::symlink_metadata(&full).ok();
        let header = entry.header().clone();
        let mode = header
            .mode()
            .map_err(|e| bad(format!("bad mode for {}: {e}", raw.display())))?
            & 0o7777;
        let uid = header.uid().unwrap_or(0);
        let gid = header.gid().unwrap_or(0);
        let mtime = header.mtime().unwrap_or(0);
        match kind {
            tar::EntryType::Directory => match &existing {
                Some(m) if m.is_dir() => {}
                Some(_) => {
                    remove_any(&full)?;
                    fs::create_dir(&full).ctx(|| format!("creating {}", full.display()))?;
                }
                None => fs::create_dir(&full).ctx(|| format!("creating {}", full.display()))?,
            },
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                if kind == tar::EntryType::GNUSparse {
                    // The size the file claims against the data the tar holds.
                    let stored = header.entry_size().unwrap_or(0);
                    holes = holes.saturating_add(entry.size().saturating_sub(stored));
                    if holes > MAX_SPARSE_HOLES {
                        return Err(bad(format!(
                            "sparse file {} of {} bytes: the layer's sparse files claim more than {} bytes beyond their data",
                            raw.display(),
                            entry.size(),
                            MAX_SPARSE_HOLES
                        )));
                    }
                }
                if existing.is_some() {
                    remove_any(&full)?;
                }
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&full)
                    .ctx(|| format!("creating {}", full.display()))?;
                // Copies only the bytes the tar holds: a lying size header ends in an
                // error at EOF, never in a huge write.
                copy_sparse(&mut entry, &mut f)
                    .map_err(|e| bad(format!("reading data of {}: {e}", raw.display())))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| bad(format!("bad symlink target for {}: {e}", raw.display())))?
                    .ok_or_else(|| bad(format!("symlink {} without target", raw.display())))?
                    .into_owned();
                if existing.is_some() {
                    remove_any(&full)?;
                }
                // Stored as given: only followed inside the guest.
                std::os::unix::fs::symlink(&target, &full)
                    .ctx(|| format!("creating symlink {}", full.display()))?;
            }
            tar::EntryType::Link => {
                let target_raw = entry
                    .link_name()
                    .map_err(|e| bad(format!("bad hardlink target for {}: {e}", raw.display())))?
                    .ok_or_else(|| bad(format!("hardlink {} without target", raw.display())))?
                    .into_owned();
                let target_rel = clean_rel_path(&target_raw).map_err(|_| {
                    bad(format!(
                        "hardlink {} -> {} escapes the root",
                        raw.display(),
                        target_raw.display()
                    ))
                })?;
                let (_, target) = resolve_parent(&root, &target_rel)?;
                let tm = fs::symlink_metadata(&target).ctx(|| {
                    format!(
                        "hardlink target {} of {}",
                        target_raw.display(),
                        raw.display()
                    )
                })?;
                if tm.is_dir() {
                    return Err(bad(format!(
                        "hardlink {} points to a directory",
                        raw.display()
                    )));
                }
                if target == full {
                    continue;
                }
                if existing.is_some() {
                    remove_any(&full)?;
                }
                // link(2) does not follow a symlink target: the link is to the symlink itself.
                fs::hard_link(&target, &full)
                    .ctx(|| format!("creating hardlink {}", full.display()))?;
                record_touched(&mut touched, &root, &full);
                continue; // metadata is shared with the target
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                tracing::warn!(path = %raw.display(), "skipping device node/fifo in layer");
                continue;
            }
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => continue,
            other => {
                tracing::warn!(path = %raw.display(), kind = ?other, "skipping unsupported tar entry");
                continue;
            }
        }
        record_touched(&mut touched, &root, &full);
        let is_symlink = kind == tar::EntryType::Symlink;
        if is_root() {
            std::os::unix::fs::lchown(&full, Some(uid as u32), Some(gid as u32))
                .ctx(|| format!("chown {}", full.display()))?;
        }
        if !is_symlink {
            // after chown, which clears setuid/setgid
            fs::set_permissions(&full, fs::Permissions::from_mode(mode))
                .ctx(|| format!("chmod {}", full.display()))?;
        }
        // xattrs from PAX records (SCHILY.xattr.<name>), set after chown (which drops
        // security.capability).
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts.flatten() {
                if let Some(xname) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    if let Err(e) = lsetxattr(&full, xname, ext.value_bytes()) {
                        tracing::warn!(path = %raw.display(), error = %e, "cannot set xattr");
                    }
                }
            }
        }
        if kind != tar::EntryType::Directory {
            set_mtime_nofollow(&full, mtime)?;
        }
    }
    Ok(())
}

/// Wrap a possibly compressed layer stream (plain, gzip or zstd, sniffed by
/// magic bytes) into a reader of the uncompressed tar.
pub(crate) fn decompress<'a, R: Read + 'a>(reader: R) -> Result<Box<dyn Read + 'a>> {
    let mut br = BufReader::with_capacity(64 * 1024, reader);
    let head = br.fill_buf().ctx(|| "reading layer header".to_string())?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(br)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let dec =
            ruzstd::decoding::StreamingDecoder::new(br).map_err(|e| bad(format!("zstd: {e}")))?;
        Ok(Box::new(dec))
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) || head.starts_with(b"BZh") {
        Err(bad("xz and bzip2 compressed layers are not supported"))
    } else {
        Ok(Box::new(br))
    }
}

/// Read the whole file (used for small JSON files in archives), bounded.
pub(crate) fn read_small(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let f = File::open(path).ctx(|| format!("opening {}", path.display()))?;
    let mut buf = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut buf)
        .ctx(|| format!("reading {}", path.display()))?;
    if buf.len() as u64 > limit {
        return Err(bad(format!("{} is too large", path.display())));
    }
    Ok(buf)
}
