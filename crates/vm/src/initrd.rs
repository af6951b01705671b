//! The initramfs that carries the guest agent.
//!
//! A newc-format cpio archive holding `/init` (the agent) and `/dev/console`
//! (so the kernel can give PID 1 a console before devtmpfs is mounted). It is
//! written here rather than with a crate or the `cpio` tool because the
//! format is a dozen lines and the archive is built in memory in
//! microseconds at daemon start.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::VmError;

struct Entry<'a> {
    name: &'a str,
    mode: u32,
    rdev: (u32, u32),
    data: &'a [u8],
}

fn push_entry(out: &mut Vec<u8>, ino: u32, e: &Entry<'_>) {
    let namesize = e.name.len() + 1;
    let header = format!(
        "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        ino,
        e.mode,
        0,
        0,
        1,
        0,
        e.data.len(),
        0,
        0,
        e.rdev.0,
        e.rdev.1,
        namesize,
        0
    );
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(e.name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(e.data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Builds the initramfs bytes for `agent`.
pub fn build(agent: &[u8]) -> Vec<u8> {
    let entries = [
        Entry {
            name: "dev",
            mode: 0o040755,
            rdev: (0, 0),
            data: &[],
        },
        Entry {
            name: "dev/console",
            mode: 0o020600,
            rdev: (5, 1),
            data: &[],
        },
        Entry {
            name: "init",
            mode: 0o100755,
            rdev: (0, 0),
            data: agent,
        },
        Entry {
            name: "TRAILER!!!",
            mode: 0,
            rdev: (0, 0),
            data: &[],
        },
    ];
    let mut out = Vec::with_capacity(agent.len() + 1024);
    for (i, e) in entries.iter().enumerate() {
        push_entry(&mut out, i as u32 + 1, e);
    }
    out
}

/// Writes the initramfs for the agent at `agent_path` into `dir` (named by
/// the agent's hash, so it is written once per agent build) and returns its
/// path and the hash.
pub fn prepare(agent_path: &Path, dir: &Path) -> Result<(PathBuf, String), VmError> {
    let agent = std::fs::read(agent_path)
        .map_err(|e| VmError::io(format!("read guest agent {}", agent_path.display()), e))?;
    let hash = hex::encode(&Sha256::digest(&agent)[..8]);
    let path = dir.join(format!("initrd-{hash}.cpio"));
    if !path.exists() {
        std::fs::create_dir_all(dir)
            .map_err(|e| VmError::io(format!("create {}", dir.display()), e))?;
        let tmp = dir.join(format!(".initrd-{hash}.tmp"));
        std::fs::write(&tmp, build(&agent))
            .map_err(|e| VmError::io(format!("write {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| VmError::io(format!("rename {}", path.display()), e))?;
    }
    Ok((path, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_valid_newc() {
        let bytes = build(b"#!agent");
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        // The agent's bytes and every name are in the archive, in order.
        let text = String::from_utf8_lossy(&bytes);
        let (d, c, i, t) = (
            text.find("dev\0").expect("dev"),
            text.find("dev/console\0").expect("console"),
            text.find("init\0").expect("init"),
            text.find("TRAILER!!!\0").expect("trailer"),
        );
        assert!(d < c && c < i && i < t);
        assert!(text[i..t].contains("#!agent"));
        // /init is a regular executable file of 7 bytes.
        let hdr = &text[i - 110..i];
        assert_eq!(&hdr[14..22], "000081ed");
        assert_eq!(&hdr[54..62], "00000007");
    }
}
