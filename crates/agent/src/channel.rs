//! The control channel to the host, behind a small transport seam.
//!
//! [`Channel`] is the reading half, owned by the main loop; [`Writer`] is
//! the writing half, shared by every thread. The writer's mutex serialises
//! whole writes so frames never interleave.
//!
//! The writer also owns the replay buffer of the protocol's
//! "Acknowledgement and replay" rule: every output frame is numbered, kept
//! and written under the same lock (so the buffer's order is the wire's
//! order), dropped when the host acknowledges it, and written again after
//! the sync marker when the host says `Hello`. The buffer is bounded: an
//! output pump waits for room, which back-pressures the container process.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vessel_protocol::{FrameKind, GuestMsg, MAX_OUTPUT_DATA};

use crate::system::TransportKind;

/// How long to wait for the virtio-serial port to appear.
const PORT_WAIT: Duration = Duration::from_secs(5);

/// Pause after a read that found the host end unconnected.
const IDLE_SLEEP: Duration = Duration::from_millis(5);
/// The longest sleep between reads of a closed virtio-serial port.
const IDLE_SLEEP_MAX: Duration = Duration::from_millis(200);

/// How much unacknowledged output (data bytes) the agent keeps.
pub const REPLAY_CAPACITY: usize = 8 * 1024 * 1024;

/// Output frames sent but not yet acknowledged by the host, oldest first.
#[derive(Debug)]
pub struct Replay {
    /// `(seq, encoded frame, data length)`.
    frames: VecDeque<(u64, Vec<u8>, usize)>,
    /// Sum of the data lengths in `frames`.
    bytes: usize,
    capacity: usize,
    /// Sequence number of the next output frame.
    next_seq: u64,
}

impl Replay {
    fn new(capacity: usize) -> Self {
        Self {
            frames: VecDeque::new(),
            bytes: 0,
            capacity,
            next_seq: 1,
        }
    }

    /// Whether `len` more bytes of data must wait for an ack. A frame always
    /// fits into an empty buffer, whatever its size.
    fn full_for(&self, len: usize) -> bool {
        !self.frames.is_empty() && self.bytes + len > self.capacity
    }

    /// Numbers and keeps one output frame; returns its encoded bytes.
    fn push(&mut self, kind: FrameKind, data: &[u8]) -> io::Result<&[u8]> {
        let seq = self.next_seq;
        let frame = vessel_protocol::encode_output(kind, seq, data).map_err(io::Error::other)?;
        self.next_seq += 1;
        self.bytes += data.len();
        self.frames.push_back((seq, frame, data.len()));
        Ok(self
            .frames
            .back()
            .map(|f| f.1.as_slice())
            .unwrap_or_default())
    }

    /// Forgets every frame up to and including `seq`; returns how many.
    fn ack(&mut self, seq: u64) -> usize {
        let mut n = 0;
        while let Some((s, _, len)) = self.frames.front() {
            if *s > seq {
                break;
            }
            self.bytes -= *len;
            self.frames.pop_front();
            n += 1;
        }
        n
    }

    /// Sequence numbers kept, oldest first.
    #[cfg(test)]
    fn seqs(&self) -> Vec<u64> {
        self.frames.iter().map(|f| f.0).collect()
    }
}

struct Inner {
    /// The current connection; `None` while a vsock host is not connected.
    conn: Option<File>,
    replay: Replay,
    /// Output pumps waiting for room in `replay`.
    waiting: usize,
}

impl Inner {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self.conn.as_mut() {
            Some(f) => f.write_all(bytes),
            None => Err(io::Error::from(io::ErrorKind::NotConnected)),
        }
    }
}

/// The writing half of the channel, shared by all threads.
pub struct Writer {
    inner: Mutex<Inner>,
    connected: Condvar,
    /// Signalled when an ack frees room in the replay buffer.
    room: Condvar,
}

/// Holds the writer lock: everything written through it is contiguous.
pub struct WriteGuard<'a>(MutexGuard<'a, Inner>);

impl WriteGuard<'_> {
    /// Writes all of `bytes`. Errors are returned, not retried: the host
    /// resynchronises on its next connection.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write(bytes)
    }

    /// Writes one guest control message.
    pub fn send(&mut self, msg: &GuestMsg) -> io::Result<()> {
        let bytes = vessel_protocol::encode_guest(msg).map_err(io::Error::other)?;
        self.write(&bytes)
    }

    /// Writes `marker`, then every unacknowledged output frame in order:
    /// the start of the answer to `Hello`, which the caller ends with the
    /// `State` message under the same guard.
    pub fn replay(&mut self, marker: &[u8]) -> io::Result<()> {
        let inner = &mut *self.0;
        let conn = inner
            .conn
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
        conn.write_all(marker)?;
        for (_, frame, _) in &inner.replay.frames {
            conn.write_all(frame)?;
        }
        Ok(())
    }
}

impl Writer {
    /// A writer over an already connected stream (tests use a pipe).
    #[cfg(test)]
    pub fn connected(conn: File) -> Self {
        Self::new(Some(conn), REPLAY_CAPACITY)
    }

    fn new(conn: Option<File>, capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                conn,
                replay: Replay::new(capacity),
                waiting: 0,
            }),
            connected: Condvar::new(),
            room: Condvar::new(),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the writer lock, waiting until a host is connected.
    pub fn lock(&self) -> WriteGuard<'_> {
        let mut guard = self.inner();
        while guard.conn.is_none() {
            guard = self
                .connected
                .wait(guard)
                .unwrap_or_else(|p| p.into_inner());
        }
        WriteGuard(guard)
    }

    /// Sends one control message; failures are logged.
    pub fn send(&self, msg: &GuestMsg) {
        if let Err(e) = self.lock().send(msg) {
            crate::log!("sending {msg:?}: {e}");
        }
    }

    /// Sends process output as numbered frames, keeping each until the host
    /// acknowledges it. Waits while the replay buffer is full. Returns
    /// `false`, having sent nothing more, once `muted` is set (the exit has
    /// been reported); `muted` is read under the writer lock.
    ///
    /// Does not wait for a host: with none connected (or when writing
    /// fails) the frames are only kept, and replayed on the next `Hello`.
    pub fn send_output(&self, kind: FrameKind, data: &[u8], muted: &AtomicBool) -> bool {
        for chunk in data.chunks(MAX_OUTPUT_DATA) {
            let mut guard = self.inner();
            while guard.replay.full_for(chunk.len()) && !muted.load(Ordering::SeqCst) {
                guard.waiting += 1;
                guard = self.room.wait(guard).unwrap_or_else(|p| p.into_inner());
                guard.waiting -= 1;
            }
            if muted.load(Ordering::SeqCst) {
                return false;
            }
            let inner = &mut *guard;
            let result = match inner.replay.push(kind, chunk) {
                Ok(frame) => match inner.conn.as_mut() {
                    Some(f) => f.write_all(frame),
                    None => Ok(()),
                },
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                // The frame stays in the replay buffer.
                crate::log!("sending output: {e}");
            }
        }
        true
    }

    /// Sends output of exec `exec_id` as `kind` frames (`ExecStdout` or
    /// `ExecStderr`). Exec output is neither numbered nor kept for replay:
    /// it is written once under the writer lock, and lost when no host is
    /// connected or the write fails (the exec session dies with its client).
    ///
    /// Never waits for a host or for acknowledgements. Returns `Ok(false)`,
    /// having sent nothing, once `closed` is set (the exec's exit has been
    /// reported); `closed` is read under the writer lock.
    pub fn send_exec(
        &self,
        kind: FrameKind,
        exec_id: u32,
        data: &[u8],
        closed: &AtomicBool,
    ) -> io::Result<bool> {
        let bytes = vessel_protocol::encode_exec_data(kind, exec_id, data);
        let mut guard = self.inner();
        if closed.load(Ordering::SeqCst) {
            return Ok(false);
        }
        guard.write(&bytes)?;
        Ok(true)
    }

    /// The host acknowledged every output frame up to and including `seq`.
    pub fn ack(&self, seq: u64) {
        let mut guard = self.inner();
        if guard.replay.ack(seq) > 0 {
            self.room.notify_all();
        }
    }

    /// Whether an output pump is waiting for the host to acknowledge output.
    pub fn output_blocked(&self) -> bool {
        self.inner().waiting > 0
    }

    /// Wakes output pumps waiting for room so they notice `muted`.
    pub fn wake_output(&self) {
        let _guard = self.inner();
        self.room.notify_all();
    }

    fn set(&self, conn: Option<File>) {
        let mut guard = self.inner();
        guard.conn = conn;
        self.connected.notify_all();
    }
}

/// The reading half of the control channel.
pub trait Channel: Send {
    /// Blocks until bytes arrive. `Ok(0)` means the host end is not (or no
    /// longer) connected: the caller must resynchronise.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

/// Opens the channel of `kind`, returning its reading half and the shared
/// writer.
pub fn open(kind: TransportKind) -> io::Result<(Box<dyn Channel>, std::sync::Arc<Writer>)> {
    match kind {
        TransportKind::VirtioSerial => {
            let file = open_virtio_port(vessel_protocol::VIRTIO_PORT_NAME)?;
            let writer = std::sync::Arc::new(Writer::new(Some(file.try_clone()?), REPLAY_CAPACITY));
            Ok((
                Box::new(VirtioSerial {
                    file,
                    idle: IDLE_SLEEP,
                }),
                writer,
            ))
        }
        TransportKind::Vsock => {
            let listener = vsock_listen(vessel_protocol::VSOCK_PORT)?;
            let writer = std::sync::Arc::new(Writer::new(None, REPLAY_CAPACITY));
            Ok((
                Box::new(Vsock {
                    listener,
                    conn: None,
                    writer: writer.clone(),
                }),
                writer,
            ))
        }
    }
}

/// Finds `/sys/class/virtio-ports/<dev>/name == name` and opens `/dev/<dev>`,
/// retrying while the port probes.
fn open_virtio_port(name: &str) -> io::Result<File> {
    let deadline = Instant::now() + PORT_WAIT;
    loop {
        if let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") {
            for entry in entries.flatten() {
                let port_name =
                    std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
                if port_name.trim() == name {
                    let dev = std::path::Path::new("/dev").join(entry.file_name());
                    match std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&dev)
                    {
                        Ok(f) => return Ok(f),
                        Err(e) if Instant::now() >= deadline => {
                            return Err(io::Error::other(format!("open {}: {e}", dev.display())))
                        }
                        Err(_) => {}
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(io::Error::other(format!(
                "no virtio-serial port named {name}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct VirtioSerial {
    file: File,
    /// How long to sleep before the next read while the host end is
    /// closed: the port reads 0 (and polls as hung up) until the host
    /// connects, so it can only be polled by retrying. Doubles up to
    /// [`IDLE_SLEEP_MAX`] (a VM whose daemon is down must stay idle) and
    /// starts over when bytes arrive.
    idle: Duration,
}

impl Channel for VirtioSerial {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.file.read(buf) {
                Ok(0) => {
                    std::thread::sleep(self.idle);
                    self.idle = (self.idle * 2).min(IDLE_SLEEP_MAX);
                    return Ok(0);
                }
                Ok(n) => {
                    self.idle = IDLE_SLEEP;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }
}

fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes for the whole call.
    if unsafe { libc::bind(sock.as_raw_fd(), (&raw const addr).cast(), len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on a descriptor we own.
    if unsafe { libc::listen(sock.as_raw_fd(), 1) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

struct Vsock {
    listener: OwnedFd,
    conn: Option<File>,
    writer: std::sync::Arc<Writer>,
}

impl Vsock {
    fn accept(&mut self) -> io::Result<File> {
        loop {
            // SAFETY: accept4 with null address pointers on a listening socket we own.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: `fd` is a fresh descriptor that nothing else owns.
                return Ok(unsafe { File::from_raw_fd(fd) });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Channel for Vsock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.conn.is_none() {
            let conn = self.accept()?;
            self.writer.set(Some(conn.try_clone()?));
            self.conn = Some(conn);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(0);
        };
        let result = loop {
            match conn.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        match result {
            Ok(n) if n > 0 => Ok(n),
            other => {
                if let Err(e) = other {
                    crate::log!("vsock read: {e}");
                }
                // Host gone: drop both halves, accept the next connection.
                self.writer.set(None);
                self.conn = None;
                Ok(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{mpsc, Arc};
    use vessel_protocol::{split_output, Decoder, ProcessState};

    const NONCE: &str = "00112233445566778899aabbccddeeff";

    fn pipe() -> (File, File) {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        (File::from(r), File::from(w))
    }

    /// What the host would see after the sync marker of [`NONCE`].
    fn after_marker(bytes: &[u8]) -> Vec<(FrameKind, Option<u64>, Vec<u8>)> {
        let mut d = Decoder::new();
        d.resync(vessel_protocol::sync_marker(NONCE).expect("marker"));
        d.push(bytes);
        let mut out = vec![];
        while let Some(f) = d.next_frame().expect("frame") {
            if f.kind.is_output() {
                let (seq, data) = split_output(&f.payload).expect("seq");
                out.push((f.kind, Some(seq), data.to_vec()));
            } else {
                out.push((f.kind, None, f.payload));
            }
        }
        out
    }

    fn answer_hello(w: &Writer) {
        let marker = vessel_protocol::sync_marker(NONCE).expect("marker");
        let mut g = w.lock();
        g.replay(&marker).expect("replay");
        g.send(&GuestMsg::State {
            kernel_release: "test".into(),
            process: ProcessState::Idle,
        })
        .expect("state");
    }

    #[test]
    fn replay_numbers_frames_and_forgets_acknowledged_ones() {
        let mut r = Replay::new(100);
        for data in [&b"a"[..], b"bb", b"ccc"] {
            r.push(FrameKind::Stdout, data).expect("push");
        }
        assert_eq!(r.seqs(), vec![1, 2, 3]);
        assert_eq!(r.bytes, 6);
        assert_eq!(r.ack(0), 0);
        assert_eq!(r.ack(2), 2);
        assert_eq!((r.seqs(), r.bytes), (vec![3], 3));
        // Acks are cumulative: an older one changes nothing.
        assert_eq!(r.ack(1), 0);
        r.push(FrameKind::Stderr, b"d").expect("push");
        assert_eq!(r.seqs(), vec![3, 4]);
        assert_eq!(r.ack(u64::MAX), 2);
        assert_eq!((r.seqs(), r.bytes), (vec![], 0));
        // Numbering goes on after the buffer emptied.
        r.push(FrameKind::Stdout, b"e").expect("push");
        assert_eq!(r.seqs(), vec![5]);
    }

    #[test]
    fn replay_bound_admits_one_frame_into_an_empty_buffer() {
        let mut r = Replay::new(4);
        assert!(!r.full_for(10));
        r.push(FrameKind::Stdout, b"123").expect("push");
        assert!(!r.full_for(1));
        assert!(r.full_for(2));
    }

    #[test]
    fn hello_replays_unacknowledged_output_in_order_before_state() {
        let (mut rx, tx) = pipe();
        let w = Writer::connected(tx);
        let live = AtomicBool::new(false);
        assert!(w.send_output(FrameKind::Stdout, b"one", &live));
        assert!(w.send_output(FrameKind::Stderr, b"two", &live));
        assert!(w.send_output(FrameKind::Stdout, b"three", &live));
        w.ack(1);
        // A reconnect: the host says Hello and syncs on the marker.
        answer_hello(&w);
        drop(w);
        let mut bytes = vec![];
        rx.read_to_end(&mut bytes).expect("read");
        let frames = after_marker(&bytes);
        assert_eq!(frames.len(), 3, "{frames:?}");
        assert_eq!(frames[0], (FrameKind::Stderr, Some(2), b"two".to_vec()));
        assert_eq!(frames[1], (FrameKind::Stdout, Some(3), b"three".to_vec()));
        assert_eq!(frames[2].0, FrameKind::Control);
        assert!(matches!(
            vessel_protocol::decode_guest(&frames[2].2).expect("state"),
            GuestMsg::State { .. }
        ));
    }

    #[test]
    fn output_survives_a_missing_or_broken_connection() {
        let live = AtomicBool::new(false);
        // No host (vsock between connections): nothing blocks, all is kept.
        let w = Writer::new(None, REPLAY_CAPACITY);
        assert!(w.send_output(FrameKind::Stdout, b"a", &live));
        // A broken connection: the write fails, the frame is kept.
        let (rx, tx) = pipe();
        drop(rx);
        w.set(Some(tx));
        assert!(w.send_output(FrameKind::Stderr, b"b", &live));
        // The host comes back.
        let (mut rx, tx) = pipe();
        w.set(Some(tx));
        answer_hello(&w);
        drop(w);
        let mut bytes = vec![];
        rx.read_to_end(&mut bytes).expect("read");
        let frames = after_marker(&bytes);
        assert_eq!(frames[0], (FrameKind::Stdout, Some(1), b"a".to_vec()));
        assert_eq!(frames[1], (FrameKind::Stderr, Some(2), b"b".to_vec()));
        assert_eq!(frames[2].0, FrameKind::Control);
        assert_eq!(frames.len(), 3);
    }

    /// Polls `cond` for up to five seconds.
    fn eventually(cond: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn a_full_buffer_blocks_output_until_an_ack() {
        let (_rx, tx) = pipe();
        let w = Arc::new(Writer::new(Some(tx), 10));
        let live = Arc::new(AtomicBool::new(false));
        assert!(w.send_output(FrameKind::Stdout, b"123456", &live));
        let (done_tx, done_rx) = mpsc::channel();
        {
            let (w, live) = (w.clone(), live.clone());
            std::thread::spawn(move || {
                let sent = w.send_output(FrameKind::Stdout, b"abcdef", &live);
                let _ = done_tx.send(sent);
            });
        }
        assert!(eventually(|| w.output_blocked()), "the pump never blocked");
        assert!(done_rx.try_recv().is_err(), "sent past the bound");
        w.ack(1);
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(5)), Ok(true));
        assert!(!w.output_blocked());
        assert_eq!(w.inner().replay.seqs(), vec![2]);
    }

    #[test]
    fn muting_releases_a_blocked_pump_without_sending() {
        let (_rx, tx) = pipe();
        let w = Arc::new(Writer::new(Some(tx), 4));
        let muted = Arc::new(AtomicBool::new(false));
        assert!(w.send_output(FrameKind::Stdout, b"1234", &muted));
        let (done_tx, done_rx) = mpsc::channel();
        {
            let (w, muted) = (w.clone(), muted.clone());
            std::thread::spawn(move || {
                let _ = done_tx.send(w.send_output(FrameKind::Stdout, b"5", &muted));
            });
        }
        assert!(eventually(|| w.output_blocked()), "the pump never blocked");
        muted.store(true, Ordering::SeqCst);
        w.wake_output();
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(5)), Ok(false));
        assert_eq!(w.inner().replay.seqs(), vec![1]);
    }
}
