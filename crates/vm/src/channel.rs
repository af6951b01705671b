//! The host end of the control channel to the guest agent.
//!
//! The transport seam: a [`Transport`] knows how to reach one VM's agent as
//! a byte stream. Here that is the Unix socket QEMU exposes for the
//! virtio-serial port; on hosts with vhost-vsock it would be an `AF_VSOCK`
//! connection. Above the seam everything is the same: the host writes the
//! sync magic and a `Hello` with a fresh nonce, discards input until the
//! agent's marker for that nonce, and from then on exchanges frames.
//!
//! Output is acknowledged (the protocol's "Acknowledgement and replay"
//! rule): the agent answers `Hello` with its marker, every output frame the
//! host has not acknowledged yet, then its `State`. [`connect`] keeps those
//! replayed frames in the [`AgentReader`], whose [`AgentReader::next`]
//! returns them first; the reader drops output whose sequence number it has
//! already returned on this connection, and acknowledges output once the
//! caller has handled it, that is on the caller's following `next` call.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use vessel_protocol::{
    decode_guest, encode_data, encode_host, split_output, sync_marker, Decoder, Frame, FrameKind,
    GuestMsg, HostMsg, SYNC_MAGIC,
};

use crate::VmError;

/// How to reach a VM's agent.
#[derive(Debug, Clone)]
pub enum Transport {
    /// QEMU's chardev socket behind a virtio-serial port.
    VirtioSerial(PathBuf),
}

impl Transport {
    async fn open(&self, timeout: Duration) -> Result<UnixStream, VmError> {
        match self {
            Transport::VirtioSerial(path) => {
                let deadline = tokio::time::Instant::now() + timeout;
                loop {
                    match UnixStream::connect(path).await {
                        Ok(s) => return Ok(s),
                        Err(e) if tokio::time::Instant::now() >= deadline => {
                            return Err(VmError::io(format!("connect {}", path.display()), e))
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
                    }
                }
            }
        }
    }
}

/// What the agent sent.
#[derive(Debug)]
pub enum Incoming {
    /// A control message.
    Msg(GuestMsg),
    /// Process output on stdout (or the TTY).
    Stdout(Vec<u8>),
    /// Process output on stderr.
    Stderr(Vec<u8>),
    /// Output of an exec process on stdout (or its TTY).
    ExecStdout {
        /// Exec id.
        exec_id: u32,
        /// Bytes.
        data: Vec<u8>,
    },
    /// Output of an exec process on stderr.
    ExecStderr {
        /// Exec id.
        exec_id: u32,
        /// Bytes.
        data: Vec<u8>,
    },
}

/// A frame from the agent, sorted.
enum Received {
    Msg(GuestMsg),
    /// New output with its sequence number.
    Output(u64, Incoming),
    /// Output already received on this connection.
    Duplicate,
    /// Exec output (not sequenced: it is not part of the container's logs).
    Exec(Incoming),
}

/// Receiving half of an agent connection.
///
/// It acknowledges output on its own, through a clone of the connection's
/// [`AgentWriter`]: output returned by one [`AgentReader::next`] call counts
/// as durably handled when the caller calls `next` again.
#[derive(Debug)]
pub struct AgentReader {
    read: OwnedReadHalf,
    decoder: Decoder,
    buf: Vec<u8>,
    writer: AgentWriter,
    /// Output received during the handshake, with its sequence numbers.
    queued: VecDeque<(u64, Incoming)>,
    /// Highest output sequence number received on this connection (queued
    /// or returned); output at or below it is a duplicate.
    seen: u64,
    /// Highest output sequence number returned to the caller.
    returned: u64,
    /// Highest sequence number acknowledged to the agent.
    acked: u64,
}

/// Sending half of an agent connection; cheap to clone.
#[derive(Debug, Clone)]
pub struct AgentWriter {
    write: Arc<Mutex<OwnedWriteHalf>>,
}

impl AgentWriter {
    /// Sends a control message.
    pub async fn send(&self, msg: &HostMsg) -> Result<(), VmError> {
        let bytes = encode_host(msg).map_err(|e| VmError::Channel(e.to_string()))?;
        self.write_all(&bytes).await
    }

    /// Sends bytes for the process's standard input.
    pub async fn send_stdin(&self, data: &[u8]) -> Result<(), VmError> {
        self.write_all(&encode_data(FrameKind::Stdin, data)).await
    }

    /// Sends bytes for exec `exec_id`'s standard input.
    pub async fn send_exec_stdin(&self, exec_id: u32, data: &[u8]) -> Result<(), VmError> {
        self.write_all(&vessel_protocol::encode_exec_data(
            FrameKind::ExecStdin,
            exec_id,
            data,
        ))
        .await
    }

    async fn write_all(&self, bytes: &[u8]) -> Result<(), VmError> {
        let mut w = self.write.lock().await;
        w.write_all(bytes)
            .await
            .map_err(|e| VmError::Channel(format!("write: {e}")))
    }
}

impl AgentReader {
    /// The next thing the agent sent; `None` when the channel closed (the VM
    /// process ended or closed the socket).
    ///
    /// First acknowledges the output returned by earlier calls, if that has
    /// not been done yet. Not cancel-safe: dropping the future while it
    /// writes that acknowledgement may cut the host's stream (the agent
    /// resynchronises on the next connection).
    pub async fn next(&mut self) -> Result<Option<Incoming>, VmError> {
        self.ack_handled().await;
        if let Some((seq, incoming)) = self.queued.pop_front() {
            self.returned = seq;
            return Ok(Some(incoming));
        }
        loop {
            let Some(frame) = self.next_frame().await? else {
                return Ok(None);
            };
            match self.classify(frame)? {
                Received::Output(seq, output) => {
                    self.returned = seq;
                    return Ok(Some(output));
                }
                Received::Msg(msg) => return Ok(Some(Incoming::Msg(msg))),
                Received::Exec(out) => return Ok(Some(out)),
                Received::Duplicate => {}
            }
        }
    }

    /// Output frames received during the handshake that `next` has not
    /// returned yet. `next` returns them without waiting for the agent, so
    /// a caller that expects nothing more (the agent already reported the
    /// exit) can still take them.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Acknowledges all output returned so far, if not done yet. `next`
    /// does this itself; call it when no further `next` will follow. A
    /// failed write is logged: a later, higher ack covers the same frames.
    pub async fn ack_handled(&mut self) {
        if self.returned > self.acked {
            let seq = self.returned;
            if let Err(e) = self.writer.send(&HostMsg::Ack { seq }).await {
                tracing::warn!("acknowledging agent output up to {seq}: {e}");
            }
            self.acked = seq;
        }
    }

    /// The next raw frame, reading the socket as needed.
    async fn next_frame(&mut self) -> Result<Option<Frame>, VmError> {
        loop {
            if let Some(frame) = self
                .decoder
                .next_frame()
                .map_err(|e| VmError::Channel(e.to_string()))?
            {
                return Ok(Some(frame));
            }
            let n = self
                .read
                .read(&mut self.buf)
                .await
                .map_err(|e| VmError::Channel(format!("read: {e}")))?;
            if n == 0 {
                return Ok(None);
            }
            self.decoder.push(&self.buf[..n]);
        }
    }

    /// Sorts a frame: a control message, new output, or a duplicate.
    fn classify(&mut self, frame: Frame) -> Result<Received, VmError> {
        let chan = |e: vessel_protocol::ProtocolError| VmError::Channel(e.to_string());
        let make: fn(Vec<u8>) -> Incoming = match frame.kind {
            FrameKind::Control => {
                let msg = decode_guest(&frame.payload).map_err(chan)?;
                return Ok(Received::Msg(msg));
            }
            FrameKind::Stdout => Incoming::Stdout,
            FrameKind::Stderr => Incoming::Stderr,
            FrameKind::ExecStdout | FrameKind::ExecStderr => {
                let (exec_id, data) = vessel_protocol::split_exec_data(&frame.payload)
                    .ok_or_else(|| VmError::Channel("exec frame without exec id".into()))?;
                let data = data.to_vec();
                return Ok(Received::Exec(if frame.kind == FrameKind::ExecStdout {
                    Incoming::ExecStdout { exec_id, data }
                } else {
                    Incoming::ExecStderr { exec_id, data }
                }));
            }
            FrameKind::Stdin | FrameKind::ExecStdin => {
                return Err(VmError::Channel("agent sent a stdin frame".into()))
            }
        };
        let (seq, data) = split_output(&frame.payload).map_err(chan)?;
        if seq <= self.seen {
            tracing::debug!(seq, seen = self.seen, "dropping duplicate agent output");
            return Ok(Received::Duplicate);
        }
        if self.seen != 0 && seq != self.seen + 1 {
            tracing::warn!(
                seq,
                seen = self.seen,
                "agent output skipped sequence numbers"
            );
        }
        self.seen = seq;
        Ok(Received::Output(seq, make(data.to_vec())))
    }
}

/// Connects to the agent, performs the handshake and returns both halves
/// and the agent's state. `timeout` bounds the whole handshake, which
/// includes the guest's boot when the VM was just started.
pub async fn connect(
    transport: &Transport,
    timeout: Duration,
) -> Result<(AgentReader, AgentWriter, GuestMsg), VmError> {
    let start = tokio::time::Instant::now();
    let stream = transport.open(timeout).await?;
    let (read, mut write) = stream.into_split();
    let mut nonce = [0u8; 16];
    rand::rng().fill_bytes(&mut nonce);
    let nonce = hex::encode(nonce);
    let mut hello = SYNC_MAGIC.to_vec();
    hello.extend(
        encode_host(&HostMsg::Hello {
            nonce: nonce.clone(),
        })
        .map_err(|e| VmError::Channel(e.to_string()))?,
    );
    write
        .write_all(&hello)
        .await
        .map_err(|e| VmError::Channel(format!("write hello: {e}")))?;
    let mut decoder = Decoder::new();
    decoder.resync(sync_marker(&nonce).ok_or_else(|| VmError::Channel("bad nonce".into()))?);
    let writer = AgentWriter {
        write: Arc::new(Mutex::new(write)),
    };
    let mut reader = AgentReader {
        read,
        decoder,
        buf: vec![0u8; 64 * 1024],
        writer: writer.clone(),
        queued: VecDeque::new(),
        seen: 0,
        returned: 0,
        acked: 0,
    };
    let remaining = timeout.saturating_sub(start.elapsed());
    let state = tokio::time::timeout(remaining, reader.handshake())
        .await
        .map_err(|_| VmError::Channel(format!("agent did not answer within {timeout:?}")))??;
    Ok((reader, writer, state))
}

impl AgentReader {
    /// Reads the answer to `Hello` after the marker: replayed output, which
    /// is queued, then the agent's state.
    async fn handshake(&mut self) -> Result<GuestMsg, VmError> {
        loop {
            let Some(frame) = self.next_frame().await? else {
                return Err(VmError::Channel(
                    "the VM closed the channel during the handshake".into(),
                ));
            };
            match self.classify(frame)? {
                Received::Output(seq, output) => self.queued.push_back((seq, output)),
                Received::Msg(state @ GuestMsg::State { .. }) => return Ok(state),
                Received::Msg(other) => {
                    return Err(VmError::Channel(format!(
                        "expected the agent's state, got {other:?}"
                    )))
                }
                Received::Duplicate => {}
                // Exec sessions do not outlive a connection.
                Received::Exec(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;
    use vessel_protocol::{decode_host, encode_guest, encode_output, ProcessState};

    /// Reads host frames from `sock` until EOF or until `stop` says so.
    async fn read_host(
        sock: &mut (impl AsyncReadExt + Unpin),
        d: &mut Decoder,
        mut stop: impl FnMut(&HostMsg) -> bool,
    ) -> Vec<HostMsg> {
        let mut msgs = vec![];
        let mut buf = [0u8; 4096];
        loop {
            while let Some(f) = d.next_frame().expect("host frame") {
                assert_eq!(f.kind, FrameKind::Control);
                let msg = decode_host(&f.payload).expect("host msg");
                let done = stop(&msg);
                msgs.push(msg);
                if done {
                    return msgs;
                }
            }
            let n = sock.read(&mut buf).await.expect("read");
            if n == 0 {
                return msgs;
            }
            d.push(&buf[..n]);
        }
    }

    fn out(kind: FrameKind, seq: u64, data: &[u8]) -> Vec<u8> {
        encode_output(kind, seq, data).expect("output frame")
    }

    /// A fake agent behind a stand-in for QEMU's chardev socket: it answers
    /// Hello with its marker, two replayed output frames (one duplicated)
    /// and its state, then sends more output, and returns the acks it got.
    #[tokio::test]
    async fn replayed_output_is_queued_deduplicated_and_acknowledged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ctl.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let agent = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.expect("accept");
            let (mut rd, mut wr) = sock.into_split();
            let mut d = Decoder::new();
            d.resync(SYNC_MAGIC.to_vec());
            let hello = read_host(&mut rd, &mut d, |_| true).await;
            let Some(HostMsg::Hello { nonce }) = hello.first() else {
                panic!("expected hello, got {hello:?}");
            };
            // Output written before the marker is never seen by the host.
            let mut bytes = out(FrameKind::Stdout, 4, b"lost in the gap");
            bytes.extend(sync_marker(nonce).expect("marker"));
            bytes.extend(out(FrameKind::Stdout, 5, b"one"));
            bytes.extend(out(FrameKind::Stderr, 6, b"two"));
            bytes.extend(out(FrameKind::Stderr, 6, b"two"));
            bytes.extend(
                encode_guest(&GuestMsg::State {
                    kernel_release: "6.1".into(),
                    process: ProcessState::Running { pid: 7 },
                })
                .expect("state"),
            );
            bytes.extend(out(FrameKind::Stdout, 5, b"one"));
            bytes.extend(out(FrameKind::Stdout, 7, b"three"));
            wr.write_all(&bytes).await.expect("write");
            wr.shutdown().await.expect("shutdown");
            read_host(&mut rd, &mut d, |_| false).await
        });

        let (mut reader, writer, state) = connect(
            &Transport::VirtioSerial(path.clone()),
            Duration::from_secs(10),
        )
        .await
        .expect("connect");
        assert!(matches!(
            state,
            GuestMsg::State {
                process: ProcessState::Running { pid: 7 },
                ..
            }
        ));
        assert_eq!(reader.queued(), 2);
        let mut got = vec![];
        while let Some(incoming) = reader.next().await.expect("next") {
            got.push(match incoming {
                Incoming::Stdout(d) => ("out", d),
                Incoming::Stderr(d) => ("err", d),
                other => panic!("unexpected {other:?}"),
            });
        }
        assert_eq!(
            got,
            vec![
                ("out", b"one".to_vec()),
                ("err", b"two".to_vec()),
                ("out", b"three".to_vec()),
            ]
        );
        // Everything returned was acknowledged; nothing is acked twice.
        reader.ack_handled().await;
        drop(reader);
        drop(writer);
        let acks = agent.await.expect("agent task");
        assert_eq!(
            acks,
            vec![
                HostMsg::Ack { seq: 5 },
                HostMsg::Ack { seq: 6 },
                HostMsg::Ack { seq: 7 },
            ]
        );
    }

    /// Output is acknowledged only once the caller comes back for more.
    #[tokio::test]
    async fn output_is_acknowledged_after_it_was_handled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ctl.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel();
        let agent = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.expect("accept");
            let (mut rd, mut wr) = sock.into_split();
            let mut d = Decoder::new();
            d.resync(SYNC_MAGIC.to_vec());
            let hello = read_host(&mut rd, &mut d, |_| true).await;
            let Some(HostMsg::Hello { nonce }) = hello.first() else {
                panic!("expected hello, got {hello:?}");
            };
            let mut bytes = sync_marker(nonce).expect("marker");
            bytes.extend(
                encode_guest(&GuestMsg::State {
                    kernel_release: "6.1".into(),
                    process: ProcessState::Running { pid: 7 },
                })
                .expect("state"),
            );
            bytes.extend(out(FrameKind::Stdout, 1, b"x"));
            wr.write_all(&bytes).await.expect("write");
            read_host(&mut rd, &mut d, |m| {
                let _ = ack_tx.send(m.clone());
                false
            })
            .await;
            // Keep the agent's end open until the host is done.
            drop(wr);
        });
        let (mut reader, writer, _) = connect(
            &Transport::VirtioSerial(path.clone()),
            Duration::from_secs(10),
        )
        .await
        .expect("connect");
        assert_eq!(reader.queued(), 0);
        assert!(matches!(
            reader.next().await.expect("next"),
            Some(Incoming::Stdout(d)) if d == b"x"
        ));
        // Not handled yet as far as the reader knows: no ack.
        writer.send(&HostMsg::CloseStdin).await.expect("send");
        assert_eq!(ack_rx.recv().await, Some(HostMsg::CloseStdin));
        reader.ack_handled().await;
        assert_eq!(ack_rx.recv().await, Some(HostMsg::Ack { seq: 1 }));
        drop(reader);
        drop(writer);
        assert_eq!(ack_rx.recv().await, None);
        agent.await.expect("agent task");
    }
}
