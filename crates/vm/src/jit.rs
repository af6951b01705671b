//! Giving back an idle VM's translated code (software emulation only).
//!
//! Under TCG every VM process holds the host code QEMU translated from the
//! guest's: 20–30 MiB for a container that started and went idle, about
//! half of all it costs the host. QEMU never returns that memory: a flush of
//! the translation cache only rewinds its write pointer. So Vessel does it
//! from outside, in three steps, with the VM stopped throughout the part
//! that matters:
//!
//! 1. QEMU runs with `split-wx=on`, so its code buffer is a memfd (mapped
//!    once writable, once executable) rather than anonymous memory, and
//!    with a gdbstub on a socket in the VM's run directory ([`GDB_SOCKET`]).
//! 2. The flush: attaching to the gdbstub stops the VM; one single step
//!    lets the vCPU run until it has executed one instruction (an idle
//!    guest does so at its next interrupt) and then stops the VM in its
//!    debug state, which makes QEMU flush every translation block. QEMU's
//!    flush count (`info jit`) must have moved, or nothing further happens.
//! 3. With the VM still stopped, every page of the code buffer after its
//!    first [`KEEP_BYTES`] (QEMU's prologue lives at its start and must
//!    stay) is punched out of the memfd, reached through
//!    `/proc/PID/map_files`. Detaching resumes the VM, which translates
//!    again what it runs, into fresh pages.
//!
//! QEMU offers no command for either the flush or the release, hence the
//! gdbstub; the gdb remote protocol client here is the handful of packets
//! this needs (`gdbstub`-style crates implement the server side).
//! Under KVM there is no translated code and none of this applies.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::qmp::Qmp;
use crate::VmError;

/// The gdbstub's socket in a VM's run directory (TCG only).
pub const GDB_SOCKET: &str = "gdb.sock";

/// Bytes at the start of the code buffer that are never released: QEMU's
/// prologue and epilogue (a few hundred bytes on x86-64) are generated
/// there once, and every translated block jumps to them.
pub const KEEP_BYTES: u64 = 64 * 1024;

fn err(what: impl std::fmt::Display) -> VmError {
    VmError::Jit(what.to_string())
}

/// QEMU's counters of its translation cache (`info jit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JitInfo {
    /// Host code in the cache now, in bytes ("gen code size").
    pub code_bytes: u64,
    /// Flushes of the cache since QEMU started ("TB flush count").
    pub flushes: u64,
}

/// Parses the text of HMP `info jit`.
pub fn parse_info_jit(text: &str) -> Option<JitInfo> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.trim_start().strip_prefix(name)?;
            // "gen code size" is `used/capacity`.
            let value = rest.split_whitespace().next()?;
            value.split('/').next()?.parse::<u64>().ok()
        })
    };
    Some(JitInfo {
        code_bytes: field("gen code size")?,
        flushes: field("TB flush count")?,
    })
}

/// Asks QEMU for its translation cache counters.
pub fn info_jit(q: &mut Qmp) -> Result<JitInfo, VmError> {
    let out = q.execute(
        "human-monitor-command",
        json!({ "command-line": "info jit" }),
    )?;
    let text = out.as_str().unwrap_or_default();
    parse_info_jit(text).ok_or_else(|| err(format!("unexpected `info jit` output: {text:?}")))
}

/// What one trim did.
#[derive(Debug, Clone, Copy)]
pub struct Trimmed {
    /// Translated code QEMU held before, in bytes.
    pub code_bytes: u64,
    /// Resident pages of the code buffer released, in bytes.
    pub released_bytes: u64,
    /// How long the guest was stopped (attach to step, and flush to detach).
    pub stopped: Duration,
}

/// Flushes and releases the translated code of the running VM `pid` whose
/// run directory is `run_dir` (see the module doc). `step_timeout` bounds
/// the wait for the guest's next instruction; a VM that does not get there
/// is resumed untouched. The VM is running again when this returns, error
/// or not, unless it was not running before.
///
/// The caller must make sure nothing else stops or resumes the VM meanwhile
/// (`docker pause` uses the same QMP `stop`/`cont`).
pub fn trim(run_dir: &Path, pid: u32, step_timeout: Duration) -> Result<Trimmed, VmError> {
    let mut q = Qmp::connect(
        &run_dir.join(crate::qemu::QMP_SOCKET),
        Duration::from_secs(5),
    )?;
    let status = q.execute("query-status", json!({}))?;
    if status.get("status").and_then(|s| s.as_str()) != Some("running") {
        return Err(err(format!("the VM is not running ({status})")));
    }
    let before = info_jit(&mut q)?;
    let map = code_buffer(pid)?;
    let mut gdb = Gdb::connect(&run_dir.join(GDB_SOCKET))?;
    // Attaching stops the VM; the stub says so before anything else.
    // Without that packet we are not attached (another client holds the
    // stub): the VM was not stopped by us, so it is not resumed either.
    let first = gdb.packet(Duration::from_secs(5))?;
    let mut session = Session {
        gdb,
        q,
        attached: true,
        stopped_at: Instant::now(),
        stopped: Duration::ZERO,
    };
    let result = session.flush_and_release(&first, before, &map, step_timeout);
    session.resume()?;
    Ok(Trimmed {
        code_bytes: before.code_bytes,
        released_bytes: result?,
        stopped: session.stopped,
    })
}

struct Session {
    gdb: Gdb,
    q: Qmp,
    attached: bool,
    stopped_at: Instant,
    stopped: Duration,
}

impl Session {
    fn flush_and_release(
        &mut self,
        first: &str,
        before: JitInfo,
        map: &CodeMap,
        step_timeout: Duration,
    ) -> Result<u64, VmError> {
        if !is_stop_reply(first) {
            return Err(err(format!(
                "unexpected first packet from the gdbstub: {first:?}"
            )));
        }
        // Let interrupts in during the step: an idle vCPU is halted and
        // executes its next instruction when one arrives.
        let ok = self
            .gdb
            .command("Qqemu.sstep=0x1", Duration::from_secs(5))?;
        if ok != "OK" {
            return Err(err(format!("the gdbstub refused the step flags: {ok:?}")));
        }
        self.stopped += self.stopped_at.elapsed();
        self.gdb.send("s")?;
        let reply = match self.gdb.packet(step_timeout) {
            Ok(r) => r,
            Err(_) => {
                // Still stepping: stop it (the stub answers with a stop
                // reply) and leave the code alone.
                self.gdb.interrupt()?;
                self.stopped_at = Instant::now();
                let r = self.gdb.packet(Duration::from_secs(5))?;
                return Err(err(format!(
                    "the guest ran no instruction within {step_timeout:?} (stopped: {r:?})"
                )));
            }
        };
        self.stopped_at = Instant::now();
        if !reply.starts_with("T05") && !reply.starts_with("S05") {
            return Err(err(format!("the step ended with {reply:?}, not a trap")));
        }
        // The flush runs on the vCPU thread right after the stop; wait
        // until QEMU counts it.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let now = info_jit(&mut self.q)?;
            if now.flushes > before.flushes {
                break;
            }
            if Instant::now() >= deadline {
                return Err(err("QEMU did not flush its translation cache"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // The VM is stopped and the cache is empty: nothing in the buffer
        // past the prologue is referenced any more.
        let resident = resident_bytes(map.pid, &map.range)?;
        release(map)?;
        let after = resident_bytes(map.pid, &map.range)?;
        Ok(resident.saturating_sub(after))
    }

    /// Detaches (which resumes the VM); falls back to QMP `cont`.
    fn resume(&mut self) -> Result<(), VmError> {
        if !self.attached {
            return Ok(());
        }
        self.attached = false;
        let detached = self.gdb.command("D", Duration::from_secs(5));
        self.stopped += self.stopped_at.elapsed();
        match detached {
            Ok(r) if r == "OK" => Ok(()),
            other => {
                tracing::warn!(reply = ?other, "gdbstub detach failed; resuming the VM over QMP");
                self.q.execute("cont", json!({})).map(|_| ())
            }
        }
    }
}

fn is_stop_reply(p: &str) -> bool {
    matches!(p.as_bytes().first(), Some(b'T' | b'S'))
}

/// QEMU's code buffer as mapped writable in process `pid`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CodeMap {
    pid: u32,
    /// `start-end` as /proc/PID/maps and map_files spell it.
    range: String,
}

/// Finds the writable mapping of QEMU's `tcg-jit` memfd in a maps listing.
fn find_code_map(maps: &str) -> Option<(String, u64)> {
    maps.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (range, perms, offset) = (f.next()?, f.next()?, f.next()?);
        let path = f.nth(2)?;
        (perms == "rw-s" && path.starts_with("/memfd:tcg-jit"))
            .then(|| Some((range.to_string(), u64::from_str_radix(offset, 16).ok()?)))
            .flatten()
    })
}

fn code_buffer(pid: u32) -> Result<CodeMap, VmError> {
    let path = format!("/proc/{pid}/maps");
    let maps =
        std::fs::read_to_string(&path).map_err(|e| VmError::io(format!("read {path}"), e))?;
    let (range, offset) = find_code_map(&maps).ok_or_else(|| {
        err("QEMU's code buffer is not a memfd (is it running with split-wx=on?)")
    })?;
    if offset != 0 {
        return Err(err(format!(
            "QEMU's code buffer maps its memfd from offset {offset:#x}"
        )));
    }
    Ok(CodeMap { pid, range })
}

/// Resident bytes of the mapping `range` of process `pid`.
fn resident_bytes(pid: u32, range: &str) -> Result<u64, VmError> {
    let path = format!("/proc/{pid}/smaps");
    let smaps =
        std::fs::read_to_string(&path).map_err(|e| VmError::io(format!("read {path}"), e))?;
    Ok(mapping_rss_kib(&smaps, range).unwrap_or(0) * 1024)
}

/// The `Rss:` of the mapping that starts the line `range ...` in smaps.
fn mapping_rss_kib(smaps: &str, range: &str) -> Option<u64> {
    let mut lines = smaps.lines().skip_while(|l| !l.starts_with(range));
    lines.next()?;
    // The mapping's fields ("Key: value") run up to the next header line.
    lines
        .take_while(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|t| t.ends_with(':'))
        })
        .find_map(|l| l.strip_prefix("Rss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Punches everything after [`KEEP_BYTES`] out of the code buffer's memfd.
fn release(map: &CodeMap) -> Result<(), VmError> {
    let path = format!("/proc/{}/map_files/{}", map.pid, map.range);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| VmError::io(format!("open {path}"), e))?;
    let size = file
        .metadata()
        .map_err(|e| VmError::io(format!("stat {path}"), e))?
        .len();
    if size <= KEEP_BYTES {
        return Ok(());
    }
    let (Ok(offset), Ok(len)) = (
        libc::off_t::try_from(KEEP_BYTES),
        libc::off_t::try_from(size - KEEP_BYTES),
    ) else {
        return Err(err(format!("code buffer of {size} bytes")));
    };
    // SAFETY: fallocate(2) on a descriptor we own; punching a hole only
    // changes the file's contents, which nothing reads until the VM (stopped
    // now, its cache flushed) writes new code there.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    if r != 0 {
        return Err(VmError::io(
            format!("release the code buffer ({path})"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// A gdb remote protocol client: packets `$data#checksum`, each answered
/// with `+`.
struct Gdb {
    stream: UnixStream,
    buf: Vec<u8>,
}

fn frame(data: &str) -> Vec<u8> {
    let sum = data.bytes().fold(0u8, u8::wrapping_add);
    format!("${data}#{sum:02x}").into_bytes()
}

/// Takes the first whole packet out of `buf`, if there is one; acks (`+`)
/// and anything before the packet are dropped.
fn take_packet(buf: &mut Vec<u8>) -> Option<String> {
    let start = buf.iter().position(|&b| b == b'$')?;
    let hash = start + buf[start..].iter().position(|&b| b == b'#')?;
    if buf.len() < hash + 3 {
        return None;
    }
    let data = String::from_utf8_lossy(&buf[start + 1..hash]).into_owned();
    buf.drain(..hash + 3);
    Some(data)
}

impl Gdb {
    fn connect(path: &Path) -> Result<Self, VmError> {
        let stream = UnixStream::connect(path)
            .map_err(|e| VmError::io(format!("connect {}", path.display()), e))?;
        Ok(Self {
            stream,
            buf: Vec::new(),
        })
    }

    fn send(&mut self, data: &str) -> Result<(), VmError> {
        self.stream
            .write_all(&frame(data))
            .map_err(|e| VmError::io("write to the gdbstub", e))
    }

    /// Sends the interrupt byte (what Ctrl-C in gdb sends).
    fn interrupt(&mut self) -> Result<(), VmError> {
        self.stream
            .write_all(&[3])
            .map_err(|e| VmError::io("write to the gdbstub", e))
    }

    fn command(&mut self, data: &str, timeout: Duration) -> Result<String, VmError> {
        self.send(data)?;
        self.packet(timeout)
    }

    /// The next packet from the stub (acknowledged), within `timeout`.
    fn packet(&mut self, timeout: Duration) -> Result<String, VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = take_packet(&mut self.buf) {
                self.stream
                    .write_all(b"+")
                    .map_err(|e| VmError::io("write to the gdbstub", e))?;
                return Ok(p);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(err("no answer from the gdbstub"));
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| VmError::io("gdbstub socket", e))?;
            let mut chunk = [0u8; 512];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(err("the gdbstub closed the connection")),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(VmError::io("read from the gdbstub", e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_jit_is_parsed() {
        let text = "Translation buffer state:\r\ngen code size       26123456/33554432\r\n\
                    TB count            46760\r\n\r\nStatistics:\r\nTB flush count      3\r\n";
        assert_eq!(
            parse_info_jit(text),
            Some(JitInfo {
                code_bytes: 26_123_456,
                flushes: 3
            })
        );
        assert_eq!(parse_info_jit("TB count 5"), None);
    }

    #[test]
    fn packets_are_framed_and_split() {
        assert_eq!(frame("s"), b"$s#73");
        assert_eq!(frame("Qqemu.sstep=0x1"), b"$Qqemu.sstep=0x1#7c");
        let mut buf = b"+$T02thread:01;#06$O".to_vec();
        assert_eq!(take_packet(&mut buf).as_deref(), Some("T02thread:01;"));
        assert_eq!(take_packet(&mut buf), None, "half a packet waits");
        buf.extend_from_slice(b"K#9a");
        assert_eq!(take_packet(&mut buf).as_deref(), Some("OK"));
        assert!(buf.is_empty());
    }

    #[test]
    fn the_code_buffer_is_found_in_maps() {
        let maps = "\
7f0000000000-7f0002000000 r-xs 00000000 00:01 1234                       /memfd:tcg-jit (deleted)
7f0002000000-7f0004000000 rw-s 00000000 00:01 1234                       /memfd:tcg-jit (deleted)
7f0004000000-7f0004001000 rw-p 00000000 00:00 0 
";
        assert_eq!(
            find_code_map(maps),
            Some(("7f0002000000-7f0004000000".to_string(), 0))
        );
        assert_eq!(
            find_code_map("7f00-7f01 rw-p 00000000 00:00 0 [heap]"),
            None
        );
        let smaps = "\
7f0002000000-7f0004000000 rw-s 00000000 00:01 1234                       /memfd:tcg-jit (deleted)
Size:              32768 kB
Rss:               24576 kB
7f0004000000-7f0004001000 rw-p 00000000 00:00 0 
Rss:                   4 kB
";
        assert_eq!(
            mapping_rss_kib(smaps, "7f0002000000-7f0004000000"),
            Some(24576)
        );
    }
}
