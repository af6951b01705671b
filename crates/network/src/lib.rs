//! Host networking of Vessel.
//!
//! Owns what a container network is on the host: the bridge and its gateway
//! address ([`bridge`]), the address plan of each network ([`ipam`]), the
//! daemon's nftables table that gives outbound NAT and isolation
//! ([`firewall`]), published ports ([`proxy`]) and the DNS server that lets
//! containers find each other by name ([`dns`]).
//!
//! It must not know about containers, VMs or Docker's API: it is handed
//! names, subnets, interface names and addresses. Everything it makes on the
//! host is named after the daemon's bridge prefix, so that one daemon never
//! touches another's objects and leftovers can be found and removed.

pub mod bridge;
pub mod dns;
pub mod firewall;
pub mod ipam;
pub mod proxy;

use std::io::Write;
use std::process::{Command, Stdio};

/// The default bridge's name for a daemon whose data root is `data_root`:
/// `vessel0` for `/var/lib/vessel`, else `vb` and eight hex digits of an
/// FNV-1a hash of the path, so that daemons with different data roots never
/// share a bridge (or the firewall table and links named after it).
pub fn default_bridge_name(data_root: &std::path::Path) -> String {
    if data_root == std::path::Path::new("/var/lib/vessel") {
        return "vessel0".into();
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in data_root.as_os_str().as_encoded_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("vb{h:08x}")
}

/// Errors of host networking.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Bad input from the user (a subnet, an address, an option).
    #[error("{0}")]
    Invalid(String),
    /// A host tool (`ip`, `nft`) failed.
    #[error("{0}")]
    Host(String),
}

pub(crate) fn run_tool(tool: &str, args: &[&str], stdin: Option<&str>) -> Result<String, NetError> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetError::Host(format!("run {tool}: {e}")))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| NetError::Host(format!("write to {tool}: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| NetError::Host(format!("run {tool}: {e}")))?;
    if !out.status.success() {
        return Err(NetError::Host(format!(
            "{tool} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip` with JSON output and parses it.
pub(crate) fn run_json(args: &[&str]) -> Result<serde_json::Value, NetError> {
    let out = run_tool("ip", args, None)?;
    if out.trim().is_empty() {
        return Ok(serde_json::Value::Array(vec![]));
    }
    serde_json::from_str(&out).map_err(|e| NetError::Host(format!("ip {}: {e}", args.join(" "))))
}

/// Runs several `ip` commands in one process (`ip -batch -`), stopping at
/// the first that fails.
pub(crate) fn run_ip_batch(lines: &[String]) -> Result<(), NetError> {
    let mut script = lines.join("\n");
    script.push('\n');
    run_tool("ip", &["-batch", "-"], Some(&script)).map(|_| ())
}

/// Turns on IPv4 forwarding, without which no container reaches past its
/// bridge.
pub fn enable_forwarding() -> Result<(), NetError> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(path)
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
    {
        return Ok(());
    }
    std::fs::write(path, "1").map_err(|e| NetError::Host(format!("write {path}: {e}")))
}

/// A lock shared by every Vessel daemon on the host, held while a daemon
/// chooses a subnet and gives its bridge the address: two daemons creating
/// networks at the same time would otherwise pick the same free subnet.
pub struct HostLock {
    _file: std::fs::File,
}

impl HostLock {
    /// Waits for the lock (`/run/lock/vessel-networks.lock`).
    pub fn acquire() -> Result<Self, NetError> {
        use std::os::fd::AsRawFd;
        let dir = std::path::Path::new("/run/lock");
        std::fs::create_dir_all(dir)
            .map_err(|e| NetError::Host(format!("create {}: {e}", dir.display())))?;
        let path = dir.join("vessel-networks.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| NetError::Host(format!("open {}: {e}", path.display())))?;
        // SAFETY: flock(2) on a descriptor `file` owns; the lock goes when
        // the file is closed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(NetError::Host(format!(
                "lock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            )));
        }
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::default_bridge_name;
    use std::path::Path;

    #[test]
    fn default_bridge_names_are_per_data_root_and_fit_linux() {
        assert_eq!(default_bridge_name(Path::new("/var/lib/vessel")), "vessel0");
        let a = default_bridge_name(Path::new("/tmp/a"));
        let b = default_bridge_name(Path::new("/tmp/b"));
        assert_ne!(a, b);
        assert_eq!(a, default_bridge_name(Path::new("/tmp/a")));
        for name in [a, b] {
            assert!(name.starts_with("vb") && name.len() <= 15, "{name}");
        }
    }
}
