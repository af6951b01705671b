//! The control channel to the host, behind a small transport seam.
//!
//! [`Channel`] is the reading half, owned by the main loop; [`Writer`] is
//! the writing half, shared by every thread. The writer's mutex serialises
//! whole writes so frames never interleave.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vessel_protocol::GuestMsg;

use crate::system::TransportKind;

/// How long to wait for the virtio-serial port to appear.
const PORT_WAIT: Duration = Duration::from_secs(5);

/// Pause after a read that found the host end unconnected.
const IDLE_SLEEP: Duration = Duration::from_millis(5);

/// The writing half of the channel, shared by all threads.
pub struct Writer {
    /// The current connection; `None` while a vsock host is not connected.
    conn: Mutex<Option<File>>,
    connected: Condvar,
}

/// Holds the writer lock: everything written through it is contiguous.
pub struct WriteGuard<'a>(MutexGuard<'a, Option<File>>);

impl WriteGuard<'_> {
    /// Writes all of `bytes`. Errors are returned, not retried: the host
    /// resynchronises on its next connection.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self.0.as_mut() {
            Some(f) => f.write_all(bytes),
            None => Err(io::Error::from(io::ErrorKind::NotConnected)),
        }
    }

    /// Writes one guest control message.
    pub fn send(&mut self, msg: &GuestMsg) -> io::Result<()> {
        let bytes = vessel_protocol::encode_guest(msg).map_err(io::Error::other)?;
        self.write(&bytes)
    }
}

impl Writer {
    /// A writer over an already connected stream (tests use a pipe).
    #[cfg(test)]
    pub fn connected(conn: File) -> Self {
        Self::new(Some(conn))
    }

    fn new(conn: Option<File>) -> Self {
        Self {
            conn: Mutex::new(conn),
            connected: Condvar::new(),
        }
    }

    /// Takes the writer lock, waiting until a host is connected.
    pub fn lock(&self) -> WriteGuard<'_> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        while guard.is_none() {
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

    fn set(&self, conn: Option<File>) {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        *guard = conn;
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
            let writer = std::sync::Arc::new(Writer::new(Some(file.try_clone()?)));
            Ok((Box::new(VirtioSerial { file }), writer))
        }
        TransportKind::Vsock => {
            let listener = vsock_listen(vessel_protocol::VSOCK_PORT)?;
            let writer = std::sync::Arc::new(Writer::new(None));
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
}

impl Channel for VirtioSerial {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.file.read(buf) {
                Ok(0) => {
                    std::thread::sleep(IDLE_SLEEP);
                    return Ok(0);
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
