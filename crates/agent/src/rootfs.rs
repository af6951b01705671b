//! The container's root filesystem: the overlay of the image device and the
//! container's writable device, with `/proc`, `/sys`, `/dev` and the
//! `/etc/hostname` and `/etc/hosts` files inside it.
//!
//! [`resolve_in_root`] and [`hosts_file`] are pure (testable on the host);
//! [`prepare`] mounts and is only run inside the VM.

use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

/// Where the image device (read-only ext4) is mounted.
pub const LOWER: &str = "/run/vessel/lower";
/// Where the container's writable device (ext4) is mounted; it holds
/// `upper/` and `work/` for the overlay.
pub const UPPERFS: &str = "/run/vessel/upperfs";
/// Where the overlay, the container's root, is mounted.
pub const ROOTFS: &str = "/run/vessel/rootfs";

/// Most symlinks followed while resolving one path (as the kernel's ELOOP).
const MAX_LINKS: usize = 40;

/// Maps the container path `path` to a host path under `root`, following
/// symlinks as the kernel would after `chroot(root)`: absolute link targets
/// and `..` never leave `root`. Components that do not exist are appended
/// as they are, so the caller's `stat` reports them missing.
pub fn resolve_in_root(root: &Path, path: &Path) -> io::Result<PathBuf> {
    enum Part {
        Up,
        Name(OsString),
    }
    fn push_parts(pending: &mut Vec<Part>, path: &Path) {
        // `pending` is a stack: push in reverse so the first component pops first.
        for c in path.components().rev() {
            match c {
                Component::Normal(n) => pending.push(Part::Name(n.to_os_string())),
                Component::ParentDir => pending.push(Part::Up),
                Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            }
        }
    }
    let mut pending = Vec::new();
    push_parts(&mut pending, path);
    let mut parts: Vec<OsString> = Vec::new();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        let name = match part {
            Part::Up => {
                parts.pop();
                continue;
            }
            Part::Name(n) => n,
        };
        parts.push(name);
        let full: PathBuf = parts.iter().fold(root.to_path_buf(), |p, c| p.join(c));
        let Ok(meta) = std::fs::symlink_metadata(&full) else {
            continue;
        };
        if !meta.file_type().is_symlink() {
            continue;
        }
        links += 1;
        if links > MAX_LINKS {
            return Err(io::Error::from_raw_os_error(libc::ELOOP));
        }
        let target = std::fs::read_link(&full)?;
        parts.pop();
        if target.is_absolute() {
            parts.clear();
        }
        push_parts(&mut pending, &target);
    }
    Ok(parts.iter().fold(root.to_path_buf(), |p, c| p.join(c)))
}

/// The content of the container's `/etc/hosts`.
pub fn hosts_file(hostname: &str, extra_hosts: &[String]) -> String {
    let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    // The host lists the container's own addresses with its hostname, as
    // Docker does (so `hostname -i` prints them); a container without a
    // network still resolves its name, to a loopback address.
    let named = extra_hosts
        .iter()
        .any(|l| l.split_whitespace().skip(1).any(|n| n == hostname));
    if !hostname.is_empty() && !named {
        out.push_str(&format!("127.0.1.1\t{hostname}\n"));
    }
    for line in extra_hosts {
        // One entry per line: a newline inside an entry must not inject more.
        let line = line.replace(['\n', '\r'], " ");
        let line = line.trim();
        if !line.is_empty() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// A container path resolved under `root`, with its missing directories created.
fn dir_in_root(root: &Path, path: &str) -> io::Result<PathBuf> {
    let host = resolve_in_root(root, Path::new(path))?;
    std::fs::create_dir_all(&host)?;
    Ok(host)
}

fn mount_fs(
    src: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> io::Result<()> {
    mount(Some(src), target, Some(fstype), flags, data)
        .map_err(|e| io::Error::other(format!("mount {fstype} {src} on {}: {e}", target.display())))
}

/// Mounts the two devices and the overlay, then the pseudo filesystems
/// inside it. Runs once per VM.
pub fn mount_rootfs(spec: &vessel_protocol::RootfsSpec) -> io::Result<PathBuf> {
    for d in [LOWER, UPPERFS, ROOTFS] {
        std::fs::create_dir_all(d)?;
    }
    mount_fs(
        &spec.image_device,
        Path::new(LOWER),
        "ext4",
        MsFlags::MS_RDONLY,
        None,
    )?;
    mount_fs(
        &spec.upper_device,
        Path::new(UPPERFS),
        "ext4",
        MsFlags::empty(),
        None,
    )?;
    std::fs::create_dir_all(format!("{UPPERFS}/upper"))?;
    std::fs::create_dir_all(format!("{UPPERFS}/work"))?;
    let opts = format!("lowerdir={LOWER},upperdir={UPPERFS}/upper,workdir={UPPERFS}/work");
    mount_fs(
        "overlay",
        Path::new(ROOTFS),
        "overlay",
        MsFlags::empty(),
        Some(&opts),
    )?;

    let root = Path::new(ROOTFS);
    let nsx = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", &dir_in_root(root, "/proc")?, "proc", nsx, None)?;
    mount_fs(
        "sysfs",
        &dir_in_root(root, "/sys")?,
        "sysfs",
        nsx | MsFlags::MS_RDONLY,
        None,
    )?;
    let dev = dir_in_root(root, "/dev")?;
    mount_fs(
        "tmpfs",
        &dev,
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )?;
    populate_dev(&dev)?;
    mount_fs(
        "devpts",
        &dir_in_root(root, "/dev/pts")?,
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    mount_fs(
        "shm",
        &dir_in_root(root, "/dev/shm")?,
        "tmpfs",
        nsx,
        Some("mode=1777,size=65536k"),
    )?;
    mount_fs(
        "mqueue",
        &dir_in_root(root, "/dev/mqueue")?,
        "mqueue",
        nsx,
        None,
    )?;
    Ok(root.to_path_buf())
}

/// Device nodes and symlinks of the container's `/dev` (a fresh tmpfs).
fn populate_dev(dev: &Path) -> io::Result<()> {
    const NODES: [(&str, u64, u64); 6] = [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ];
    for (name, major, minor) in NODES {
        let path = dev.join(name);
        mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .map_err(|e| io::Error::other(format!("mknod {}: {e}", path.display())))?;
        // mknod honours the umask; set the mode explicitly.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    }
    let links = [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ];
    for (name, target) in links {
        std::os::unix::fs::symlink(target, dev.join(name))?;
    }
    Ok(())
}

/// Writes `/etc/hostname` and `/etc/hosts` inside the root filesystem.
pub fn write_etc(root: &Path, hostname: &str, extra_hosts: &[String]) -> io::Result<()> {
    dir_in_root(root, "/etc")?;
    let hostname_path = resolve_in_root(root, Path::new("/etc/hostname"))?;
    std::fs::write(hostname_path, format!("{hostname}\n"))?;
    let hosts_path = resolve_in_root(root, Path::new("/etc/hosts"))?;
    std::fs::write(hosts_path, hosts_file(hostname, extra_hosts))?;
    Ok(())
}

/// Writes the container's `/etc/resolv.conf` (replacing a symlink the image
/// may have there).
pub fn write_resolv_conf(root: &Path, text: &str) -> io::Result<()> {
    dir_in_root(root, "/etc")?;
    let path = resolve_in_root(root, Path::new("/etc"))?.join("resolv.conf");
    if path.is_symlink() {
        std::fs::remove_file(&path)?;
    }
    std::fs::write(path, text)
}

/// Gives the container a machine id of its own when its image leaves
/// `/etc/machine-id` empty or absent (as systemd-based images do): every VM,
/// clones of one template included, is a distinct machine. An id the image
/// sets is kept.
pub fn write_machine_id(root: &Path, id_hex: &str) -> io::Result<()> {
    if id_hex.len() != 32 {
        return Ok(());
    }
    let path = resolve_in_root(root, Path::new("/etc/machine-id"))?;
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    if current.trim().is_empty() {
        std::fs::write(path, format!("{id_hex}\n"))?;
    }
    Ok(())
}

/// Mounts a tmpfs at `path` in the container (`--tmpfs PATH:OPTIONS`).
/// Flags among the options (`ro`, `noexec`, `nosuid`, `nodev`, ...) become
/// mount flags; the rest (`size`, `mode`, `uid`, `gid`) is tmpfs's data.
pub fn mount_tmpfs(root: &Path, path: &str, options: &str) -> io::Result<()> {
    let target = dir_in_root(root, path)?;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mut data = Vec::new();
    for opt in options.split(',').filter(|o| !o.is_empty()) {
        match opt {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "exec" => flags &= !MsFlags::MS_NOEXEC,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "suid" => flags &= !MsFlags::MS_NOSUID,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "dev" => flags &= !MsFlags::MS_NODEV,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            other => data.push(other),
        }
    }
    let data = data.join(",");
    mount_fs(
        "tmpfs",
        &target,
        "tmpfs",
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
}

/// Makes the container's root read-only (`--read-only`); the mounts below
/// it (`/proc`, `/dev`, tmpfs) keep their own flags.
pub fn make_read_only(root: &Path) -> io::Result<()> {
    mount::<str, Path, str, str>(
        None,
        root,
        None,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
        None,
    )
    .map_err(|e| io::Error::other(format!("remounting the root read-only: {e}")))
}

/// Sets a kernel parameter (`--sysctl net.core.somaxconn=1024`).
pub fn set_sysctl(key: &str, value: &str) -> io::Result<()> {
    if key.is_empty() || key.contains("..") || key.contains('/') {
        return Err(io::Error::other(format!("invalid sysctl {key:?}")));
    }
    let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    std::fs::write(&path, value).map_err(|e| io::Error::other(format!("sysctl {key}={value}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn machine_id_is_written_only_where_the_image_has_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = dir.path();
        std::fs::create_dir_all(r.join("etc")).expect("mkdir");
        let id = "0123456789abcdef0123456789abcdef";
        write_machine_id(r, id).expect("write");
        assert_eq!(
            std::fs::read_to_string(r.join("etc/machine-id")).expect("read"),
            format!("{id}\n")
        );
        std::fs::write(r.join("etc/machine-id"), "fixed\n").expect("write");
        write_machine_id(r, id).expect("write");
        assert_eq!(
            std::fs::read_to_string(r.join("etc/machine-id")).expect("read"),
            "fixed\n"
        );
        std::fs::write(r.join("etc/machine-id"), "").expect("write");
        write_machine_id(r, id).expect("write");
        assert_eq!(
            std::fs::read_to_string(r.join("etc/machine-id")).expect("read"),
            format!("{id}\n")
        );
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = dir.path();
        std::fs::create_dir_all(r.join("usr/bin")).expect("mkdir");
        std::fs::create_dir_all(r.join("etc")).expect("mkdir");
        symlink("/usr/bin", r.join("bin")).expect("ln");
        symlink("../../../../etc", r.join("usr/bin/up")).expect("ln");
        symlink("/etc/passwd", r.join("usr/bin/escape")).expect("ln");
        symlink("loop2", r.join("loop1")).expect("ln");
        symlink("loop1", r.join("loop2")).expect("ln");

        let got = resolve_in_root(r, Path::new("/bin/sh")).expect("resolve");
        assert_eq!(got, r.join("usr/bin/sh"));
        // `..` stops at the root.
        let got = resolve_in_root(r, Path::new("/bin/up/hosts")).expect("resolve");
        assert_eq!(got, r.join("etc/hosts"));
        let got = resolve_in_root(r, Path::new("/../../etc/x")).expect("resolve");
        assert_eq!(got, r.join("etc/x"));
        // Absolute targets are relative to the root, never the host's /.
        let got = resolve_in_root(r, Path::new("/bin/escape")).expect("resolve");
        assert_eq!(got, r.join("etc/passwd"));
        let e = resolve_in_root(r, Path::new("/loop1")).expect_err("loop");
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
    }

    #[test]
    fn hosts_file_has_localhost_hostname_and_extra_hosts() {
        let hosts = hosts_file(
            "web1",
            &[
                "10.0.0.2 db db.local".into(),
                "".into(),
                "1.2.3.4 a\nevil".into(),
            ],
        );
        assert_eq!(
            hosts,
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tweb1\n\
             10.0.0.2 db db.local\n1.2.3.4 a evil\n"
        );
    }

    #[test]
    fn hostname_with_an_address_has_no_loopback_entry() {
        let hosts = hosts_file("web1", &["172.17.0.2\tweb1".into()]);
        assert_eq!(
            hosts,
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n172.17.0.2\tweb1\n"
        );
    }

    #[test]
    fn etc_files_are_written_inside_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_etc(dir.path(), "box", &[]).expect("write");
        let name = std::fs::read_to_string(dir.path().join("etc/hostname")).expect("read");
        assert_eq!(name, "box\n");
        let hosts = std::fs::read_to_string(dir.path().join("etc/hosts")).expect("read");
        assert!(hosts.contains("127.0.1.1\tbox\n"));
    }
}
