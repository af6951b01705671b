//! Boot disk building: flatten layers, then `mke2fs -d`.

use std::fs::{self, File};
use std::io::BufReader;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::error::{Error, IoContext, Result};
use crate::extract::extract_layer;

const BLOCK: u64 = 4096;
const MIB: u64 = 1024 * 1024;

/// Flatten `layers` (uncompressed tars, lowest first) into `rootfs` (an empty
/// staging directory) and write an ext4 image to `out` (which must not exist).
/// `rootfs` is left for the caller to delete.
pub(crate) fn build(layers: &[&Path], rootfs: &Path, out: &Path) -> Result<()> {
    fs::create_dir_all(rootfs).ctx(|| format!("creating {}", rootfs.display()))?;
    for layer in layers {
        let f = File::open(layer).ctx(|| format!("opening layer {}", layer.display()))?;
        extract_layer(BufReader::with_capacity(256 * 1024, f), rootfs)?;
    }
    let (blocks, inodes) = usage(rootfs)?;
    // Generous slack: ext4 metadata (inode tables, bitmaps, extent trees,
    // directories) plus 20%, and at least 8 MiB.
    let inodes = (inodes + inodes / 4 + 1024).max(4096);
    let inode_bytes = inodes * 256;
    let data = blocks * BLOCK;
    let size = (data + data / 5 + inode_bytes + 16 * MIB).max(8 * MIB);
    let size_k = size.div_ceil(MIB) * 1024;
    let output = Command::new("mke2fs")
        .args([
            "-q",
            "-t",
            "ext4",
            "-O",
            "^has_journal",
            "-b",
            "4096",
            "-m",
            "0",
            "-I",
            "256",
        ])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-E")
        .arg("root_owner=0:0")
        .arg("-d")
        .arg(rootfs)
        .arg("-F")
        .arg(out)
        .arg(format!("{size_k}k"))
        .output()
        .ctx(|| "running mke2fs (is e2fsprogs installed?)".to_string())?;
    if !output.status.success() {
        let _ = fs::remove_file(out);
        return Err(Error::Disk(format!(
            "mke2fs failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// (4 KiB blocks used by file data, number of inodes)
fn usage(dir: &Path) -> Result<(u64, u64)> {
    let mut blocks = 1u64;
    let mut inodes = 1u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for ent in fs::read_dir(&d).ctx(|| format!("reading {}", d.display()))? {
            let ent = ent.ctx(|| format!("reading {}", d.display()))?;
            let m = ent
                .path()
                .symlink_metadata()
                .ctx(|| format!("inspecting {}", ent.path().display()))?;
            inodes += 1;
            // Count allocated size (st_blocks, 512-byte units) but also the apparent
            // size: mke2fs -d may not preserve holes.
            let sz = m.len().max(m.blocks() * 512);
            blocks += sz.div_ceil(BLOCK) + 1;
            if m.is_dir() {
                stack.push(ent.path());
            }
        }
    }
    Ok((blocks, inodes))
}
