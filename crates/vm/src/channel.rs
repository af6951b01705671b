//! The host end of the control channel to the guest agent.
//!
//! The transport seam: a [`Transport`] knows how to reach one VM's agent as
//! a byte stream. Here that is the Unix socket QEMU exposes for the
//! virtio-serial port; on hosts with vhost-vsock it would be an `AF_VSOCK`
//! connection. Above the seam everything is the same: the host writes the
//! sync magic and a `Hello` with a fresh nonce, discards input until the
//! agent's marker for that nonce, and from then on exchanges frames.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use vessel_protocol::{
    decode_guest, encode_data, encode_host, sync_marker, Decoder, FrameKind, GuestMsg, HostMsg,
    SYNC_MAGIC,
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
}

/// Receiving half of an agent connection.
#[derive(Debug)]
pub struct AgentReader {
    read: OwnedReadHalf,
    decoder: Decoder,
    buf: Vec<u8>,
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
    pub async fn next(&mut self) -> Result<Option<Incoming>, VmError> {
        loop {
            if let Some(frame) = self
                .decoder
                .next_frame()
                .map_err(|e| VmError::Channel(e.to_string()))?
            {
                return Ok(Some(match frame.kind {
                    FrameKind::Control => Incoming::Msg(
                        decode_guest(&frame.payload)
                            .map_err(|e| VmError::Channel(e.to_string()))?,
                    ),
                    FrameKind::Stdout => Incoming::Stdout(frame.payload),
                    FrameKind::Stderr => Incoming::Stderr(frame.payload),
                    FrameKind::Stdin => {
                        return Err(VmError::Channel("agent sent a stdin frame".into()))
                    }
                }));
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
    let mut reader = AgentReader {
        read,
        decoder,
        buf: vec![0u8; 64 * 1024],
    };
    let writer = AgentWriter {
        write: Arc::new(Mutex::new(write)),
    };
    let remaining = timeout.saturating_sub(start.elapsed());
    let first = tokio::time::timeout(remaining, reader.next())
        .await
        .map_err(|_| VmError::Channel(format!("agent did not answer within {timeout:?}")))??;
    match first {
        Some(Incoming::Msg(state @ GuestMsg::State { .. })) => Ok((reader, writer, state)),
        Some(other) => Err(VmError::Channel(format!(
            "expected the agent's state, got {other:?}"
        ))),
        None => Err(VmError::Channel(
            "the VM closed the channel during the handshake".into(),
        )),
    }
}
