//! The host–guest protocol of Vessel.
//!
//! This crate owns the wire format between the daemon (host) and
//! `vessel-init`, the agent that is PID 1 inside every container VM: the
//! frame layout, the control messages, and the resynchronisation rule used
//! when the host side of the channel reconnects (for example after a daemon
//! restart). It is transport-agnostic: it turns messages into bytes and bytes
//! into messages, and never opens a device, a socket or a file. It must not
//! depend on any other Vessel crate, so that host and guest share exactly one
//! definition of the protocol.
//!
//! # Frame layout
//!
//! ```text
//! +----------------+--------+-----------------------+
//! | length: u32 BE | kind:u8| payload (length - 1)  |
//! +----------------+--------+-----------------------+
//! ```
//!
//! `kind` is one of [`FrameKind`]. Control frames carry a JSON-encoded
//! [`HostMsg`] or [`GuestMsg`]. Standard-input frames (host to guest) carry
//! raw bytes. Output frames (`Stdout` and `Stderr`, guest to host) carry an
//! 8-byte big-endian sequence number before the bytes:
//!
//! ```text
//! +----------------+--------+----------------+--------------------------+
//! | length: u32 BE | kind:u8| seq: u64 BE    | data (length - 9)        |
//! +----------------+--------+----------------+--------------------------+
//! ```
//!
//! Build output frames with [`encode_output`] and take them apart with
//! [`split_output`]; one output frame carries at most [`MAX_OUTPUT_DATA`]
//! bytes of data.
//!
//! # Resynchronisation
//!
//! A byte channel whose host end can disappear (the daemon is killed) may
//! cut a frame in half. Every time the host connects it first writes
//! [`SYNC_MAGIC`] followed by a `Hello` frame carrying a random nonce. The
//! guest, after it has seen its channel close, discards input until it finds
//! [`SYNC_MAGIC`]. The guest answers `Hello` with [`SYNC_MAGIC`] followed by
//! the 16 nonce bytes (see [`sync_marker`]); the host discards input until it
//! finds exactly that marker. Output written by the container cannot forge
//! the marker because it does not know the nonce.
//!
//! # Acknowledgement and replay
//!
//! While the host end is gone the transport may silently discard what the
//! guest writes (QEMU's virtio-serial backend does when its chardev socket
//! has no client), so output is delivered at least once by acknowledgement
//! and replay:
//!
//! * the guest numbers its output frames: the first has sequence number 1
//!   and every further output frame, on either stream, the next one;
//! * the guest keeps every output frame it has sent until the host
//!   acknowledges it; `HostMsg::Ack { seq }` acknowledges every output frame
//!   up to and including `seq`, once the host has durably handled them
//!   (written them to the container's log). Acks are cumulative: one lower
//!   than an earlier one changes nothing;
//! * the guest bounds what it keeps unacknowledged; when the bound is
//!   reached it stops reading the process's output until an ack frees room,
//!   which blocks the process instead of losing its output;
//! * in answer to `Hello` the guest writes the sync marker, then every
//!   unacknowledged output frame again, in order, then `GuestMsg::State`.
//!   All output frames of the process still come before `GuestMsg::Exited`
//!   (or before a `State` that reports the exit);
//! * the host drops an output frame whose sequence number is not above the
//!   highest it has already handled on the same connection. Frames handled
//!   by a previous connection but not acknowledged before it ended are
//!   replayed and handled again: output is never lost, but may be repeated
//!   after a host crash.

use serde::{Deserialize, Serialize};

/// Bytes that precede a fresh stream of frames in either direction.
pub const SYNC_MAGIC: [u8; 8] = *b"VSLSYNC1";

/// Largest payload a frame may carry. Larger data is split by the sender.
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// Size of the sequence number at the start of an output frame's payload.
pub const SEQ_LEN: usize = 8;

/// Largest amount of process output one output frame carries.
pub const MAX_OUTPUT_DATA: usize = MAX_PAYLOAD - SEQ_LEN;

/// Name of the virtio-serial port that carries the control channel.
pub const VIRTIO_PORT_NAME: &str = "vessel.ctl";

/// Default vsock port of the control channel where vsock is the transport.
pub const VSOCK_PORT: u32 = 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A JSON-encoded control message.
    Control = 1,
    /// Bytes for the process's standard input (host to guest).
    Stdin = 2,
    /// Bytes the process wrote to standard output (or to its TTY), after a
    /// sequence number.
    Stdout = 3,
    /// Bytes the process wrote to standard error, after a sequence number.
    Stderr = 4,
    /// Bytes for an exec process's stdin: payload is a 4-byte big-endian
    /// exec id, then the data (host to guest).
    ExecStdin = 5,
    /// An exec process's stdout (or TTY): 4-byte big-endian exec id, then data.
    ExecStdout = 6,
    /// An exec process's stderr: 4-byte big-endian exec id, then data.
    ExecStderr = 7,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Control),
            2 => Some(Self::Stdin),
            3 => Some(Self::Stdout),
            4 => Some(Self::Stderr),
            5 => Some(Self::ExecStdin),
            6 => Some(Self::ExecStdout),
            7 => Some(Self::ExecStderr),
            _ => None,
        }
    }

    /// Whether frames of this kind are sequenced process output.
    pub fn is_output(self) -> bool {
        matches!(self, Self::Stdout | Self::Stderr)
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub kind: FrameKind,
    /// The payload bytes.
    pub payload: Vec<u8>,
}

/// Errors of encoding and decoding.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The frame header announced an impossible length.
    #[error("frame length {0} out of range")]
    BadLength(u32),
    /// The frame kind byte is unknown.
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    /// A control payload is not a valid message.
    #[error("malformed control message: {0}")]
    BadMessage(#[from] serde_json::Error),
    /// A payload is larger than [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes exceeds the frame limit")]
    TooLarge(usize),
    /// An output frame is too short to hold its sequence number.
    #[error("output frame of {0} bytes has no sequence number")]
    NoSequence(usize),
    /// Sequenced output was requested for a kind that is not output.
    #[error("{0:?} frames are not output frames")]
    NotOutput(FrameKind),
}

/// Messages from the host to the guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostMsg {
    /// First message on every connection. The agent answers with the sync
    /// marker for `nonce` and then [`GuestMsg::State`].
    Hello {
        /// 16 random bytes, hex encoded (32 characters).
        nonce: String,
    },
    /// Mount the root filesystem now, ahead of `Start`: a warm VM waiting
    /// for its container. The agent answers [`GuestMsg::Prepared`] or
    /// [`GuestMsg::Error`]. A later `Start` uses the mounted root and takes
    /// its identity (clock, entropy, hostname, machine-id) then.
    Prepare(RootfsSpec),
    /// Prepare the root filesystem (unless `Prepare` did) and start the
    /// container's process.
    Start(Box<ProcessSpec>),
    /// The host will send no more standard input.
    CloseStdin,
    /// Set the TTY's window size.
    Resize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Send a signal to the container's main process.
    Signal {
        /// Signal number.
        signal: i32,
    },
    /// The host has recorded the exit: sync disks and power off.
    Shutdown,
    /// Start an extra process in the running container (`docker exec`).
    Exec {
        /// Host-chosen id, unique within this VM.
        exec_id: u32,
        /// What to run.
        spec: Box<ExecSpec>,
    },
    /// The host will send no more stdin to exec `exec_id`.
    ExecCloseStdin {
        /// Exec id.
        exec_id: u32,
    },
    /// Set exec `exec_id`'s TTY window size.
    ExecResize {
        /// Exec id.
        exec_id: u32,
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Signal exec `exec_id`'s process (and its process group, when it
    /// leads one): a health check that ran out of time.
    ExecSignal {
        /// Exec id.
        exec_id: u32,
        /// Signal number.
        signal: i32,
    },
    /// `docker cp` stat: answer [`GuestMsg::CopyStat`] or [`GuestMsg::CopyDone`]
    /// with the error.
    CopyStat {
        /// Host-chosen id, from the same space as exec ids.
        copy_id: u32,
        /// Path in the container.
        path: String,
    },
    /// `docker cp` out of the container: answer [`GuestMsg::CopyStat`], then
    /// the tar archive of `path` in `ExecStdout` frames carrying `copy_id`,
    /// then [`GuestMsg::CopyDone`].
    CopyOut {
        /// Host-chosen id, from the same space as exec ids.
        copy_id: u32,
        /// Path in the container.
        path: String,
        /// `docker export`: the whole root filesystem (`path` is ignored)
        /// without the contents of `/proc`, `/sys` and `/dev`.
        #[serde(default)]
        export: bool,
        /// `docker commit`: the container's changes as an image layer
        /// (`path` is ignored).
        #[serde(default)]
        layer: bool,
    },
    /// `docker diff`: answer [`GuestMsg::Changes`] (or [`GuestMsg::CopyDone`]
    /// with the error).
    Diff {
        /// Host-chosen id, from the same space as exec ids.
        copy_id: u32,
    },
    /// `docker cp` into the container: a tar archive follows in `ExecStdin`
    /// frames carrying `copy_id`, ended by `ExecCloseStdin`; the agent
    /// extracts it into directory `path` and answers [`GuestMsg::CopyDone`].
    CopyIn {
        /// Host-chosen id, from the same space as exec ids.
        copy_id: u32,
        /// Directory in the container.
        path: String,
        /// Keep the archive's owners (`docker cp -a`); otherwise everything
        /// extracted belongs to root, as with Docker.
        #[serde(default)]
        keep_owners: bool,
    },
    /// `docker top`: answer [`GuestMsg::Top`].
    Top {
        /// Host-chosen id, echoed in the answer.
        req_id: u32,
        /// The columns.
        #[serde(default)]
        format: TopFormat,
    },
    /// `docker update --pids-limit` of a running container: the new limit of
    /// the container's processes (`None` or ≤ 0: unlimited). Answered by
    /// [`GuestMsg::Updated`].
    SetPidsLimit {
        /// Host-chosen id, echoed in the answer.
        req_id: u32,
        /// The limit.
        limit: Option<i64>,
    },
    /// `docker stats`: what only the guest knows; answer [`GuestMsg::Stats`].
    Stats {
        /// Host-chosen id, echoed in the answer.
        req_id: u32,
    },
    /// The container joined or left a network while running: the complete
    /// new set of interfaces (slots not listed go down). Answered by
    /// [`GuestMsg::InterfacesSet`].
    SetInterfaces {
        /// Host-chosen id, echoed in the answer.
        req_id: u32,
        /// Every interface the container has now.
        interfaces: Vec<InterfaceSpec>,
        /// Lines to add to `/etc/hosts` (`IP<TAB>NAME`), replacing those
        /// of the previous set.
        hosts: Vec<String>,
    },
    /// The host has durably handled every output frame up to and including
    /// `seq`: the agent may forget them (see the crate docs, "Acknowledgement
    /// and replay").
    Ack {
        /// Highest sequence number handled.
        seq: u64,
    },
}

/// Messages from the guest agent to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GuestMsg {
    /// Answer to `Hello`: what the agent is doing now.
    State {
        /// `uname -r` of the guest kernel.
        kernel_release: String,
        /// The state of the container's process.
        process: ProcessState,
    },
    /// The root filesystem asked for by `Prepare` is mounted.
    Prepared,
    /// The stat of a `CopyStat` or `CopyOut` path.
    CopyStat {
        /// Copy id.
        copy_id: u32,
        /// What Docker's `X-Docker-Container-Path-Stat` header carries.
        stat: PathStat,
    },
    /// Answer to [`HostMsg::SetInterfaces`].
    InterfacesSet {
        /// The request's id.
        req_id: u32,
        /// Why the change failed, if it did.
        error: Option<String>,
    },
    /// The container's processes (`ps -ef` columns).
    Top {
        /// The request's id.
        req_id: u32,
        /// Column titles.
        titles: Vec<String>,
        /// One row per process.
        processes: Vec<Vec<String>>,
    },
    /// Answer to [`HostMsg::SetPidsLimit`].
    Updated {
        /// The request's id.
        req_id: u32,
        /// Why the change failed, if it did.
        error: Option<String>,
    },
    /// Answer to [`HostMsg::Stats`]: the container's cgroup in the guest.
    Stats {
        /// The request's id.
        req_id: u32,
        /// Processes and threads in the container (`pids.current`).
        pids: u64,
        /// Memory the container's processes use, in bytes (`memory.current`).
        memory: u64,
    },
    /// The container's changes to its image's filesystem, as `docker diff`
    /// lists them: (kind, path) with kind 0 modified, 1 added, 2 deleted.
    Changes {
        /// Copy id of the `Diff`.
        copy_id: u32,
        /// The changes, sorted by path.
        changes: Vec<(u8, String)>,
    },
    /// A copy finished (every data frame of a `CopyOut` came before this).
    CopyDone {
        /// Copy id.
        copy_id: u32,
        /// Why it failed, if it did.
        error: Option<String>,
        /// The path does not exist.
        not_found: bool,
        /// The `CopyIn` destination is not a directory.
        not_dir: bool,
    },
    /// The process was started.
    Started {
        /// Its PID inside the guest.
        pid: u32,
    },
    /// The process could not be started; nothing is running.
    StartFailed {
        /// Docker-style reason, e.g. `exec: "foo": executable file not found in $PATH`.
        message: String,
        /// The exit code Docker reports for this failure (126, 127 or 1).
        exit_code: i32,
    },
    /// The process ended and all its output has been sent before this message.
    Exited {
        /// Exit status; 128 + signal number when killed by a signal.
        exit_code: i32,
        /// The kernel's OOM killer ended the process.
        oom_killed: bool,
    },
    /// Exec `exec_id` runs.
    ExecStarted {
        /// Exec id.
        exec_id: u32,
        /// Its PID inside the guest.
        pid: u32,
    },
    /// Exec `exec_id` could not be started.
    ExecFailed {
        /// Exec id.
        exec_id: u32,
        /// Docker-style reason.
        message: String,
        /// 126, 127 or 1, as for the main process.
        exit_code: i32,
    },
    /// Exec `exec_id` ended; all its output was sent before this message.
    ExecExited {
        /// Exec id.
        exec_id: u32,
        /// Exit status; 128 + signal number when killed by a signal.
        exit_code: i32,
    },
    /// The agent could not do what was asked (not fatal for the VM).
    Error {
        /// Description.
        message: String,
    },
}

/// State of the container process as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ProcessState {
    /// Nothing started yet: the agent waits for `Start`.
    Idle,
    /// The process runs.
    Running {
        /// Its PID inside the guest.
        pid: u32,
    },
    /// The process ended; the exit has not been acknowledged with `Shutdown`.
    Exited {
        /// Exit status.
        exit_code: i32,
        /// Killed by the OOM killer.
        oom_killed: bool,
    },
}

/// Everything the agent needs to run the container's process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ProcessSpec {
    /// argv; `args[0]` is looked up in the container's `PATH` when it has no `/`.
    pub args: Vec<String>,
    /// Environment as `KEY=VALUE`. The agent adds `PATH`, `HOSTNAME` and
    /// `HOME` when absent, as Docker does.
    pub env: Vec<String>,
    /// Working directory inside the container; created when missing.
    pub cwd: String,
    /// User as Docker accepts it: empty, `name`, `uid`, `name:group`,
    /// `uid:gid`; names are resolved from the container's `/etc/passwd` and
    /// `/etc/group`.
    pub user: String,
    /// Hostname of the guest.
    pub hostname: String,
    /// Allocate a pseudo-terminal for the process.
    pub tty: bool,
    /// Keep standard input open (otherwise it is `/dev/null`).
    pub open_stdin: bool,
    /// Initial TTY size (rows, cols), if known.
    pub tty_size: Option<(u16, u16)>,
    /// Block devices to assemble the root filesystem from.
    pub rootfs: RootfsSpec,
    /// Extra lines for `/etc/hosts` (`IP NAME...`).
    pub extra_hosts: Vec<String>,
    /// `--read-only`: the root filesystem is mounted read-only once the
    /// agent has written `/etc`.
    #[serde(default)]
    pub read_only: bool,
    /// `--tmpfs PATH[:OPTIONS]`: (path, options as `mount -o` takes them).
    #[serde(default)]
    pub tmpfs: Vec<(String, String)>,
    /// `--sysctl KEY=VALUE`: written to `/proc/sys` before the process starts.
    #[serde(default)]
    pub sysctls: Vec<(String, String)>,
    /// Privileges and limits of the container's processes (main and
    /// execs).
    #[serde(default)]
    pub restrictions: Restrictions,
    /// The container's network interfaces (empty: only loopback).
    #[serde(default)]
    pub interfaces: Vec<InterfaceSpec>,
    /// Content for the container's `/etc/resolv.conf`; `None` keeps the
    /// image's file.
    #[serde(default)]
    pub resolv_conf: Option<String>,
    /// Volumes and bind mounts, handed over through the VM's shared
    /// directory (9p). Empty: the agent never mounts the share.
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    /// Fresh random bytes (hex) the agent mixes into the guest's RNG and
    /// reseeds from: a VM restored from a template must not share the
    /// template's random state with its siblings.
    #[serde(default)]
    pub entropy: String,
    /// The host's wall clock (nanoseconds since the epoch) when it sent the
    /// spec; a restored VM's clock still shows the template's time.
    #[serde(default)]
    pub clock_unix_ns: u64,
}

/// One volume or bind mount of the container. The host has bind-mounted
/// its source at `<share>/<share_dir>` of the shared directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MountSpec {
    /// Name of the entry in the shared directory (a decimal index).
    pub share_dir: String,
    /// Absolute path in the container; created when missing.
    pub target: String,
    /// Mounted read-only (`:ro`, `readonly`).
    #[serde(default)]
    pub read_only: bool,
    /// A volume that may be filled from the image: when the shared
    /// directory is empty, the image's content at `target` is copied into
    /// it (modes, owners, symlinks) before it is mounted.
    #[serde(default)]
    pub copy_up: bool,
    /// The source is a single file, not a directory.
    #[serde(default)]
    pub file: bool,
}

/// An extra process in a running container (`docker exec`). It runs in the
/// container's root filesystem with the container's environment plus `env`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExecSpec {
    /// argv; `args[0]` is looked up in the container's `PATH`.
    pub args: Vec<String>,
    /// Environment as `KEY=VALUE`: the container's, then the exec's own.
    pub env: Vec<String>,
    /// Working directory; empty means the container's.
    pub cwd: String,
    /// User as Docker accepts it; empty means the container's.
    pub user: String,
    /// Allocate a pseudo-terminal.
    pub tty: bool,
    /// Keep stdin open (otherwise `/dev/null`).
    pub open_stdin: bool,
    /// Initial TTY size (rows, cols).
    pub tty_size: Option<(u16, u16)>,
}

/// Encodes exec stdio (`ExecStdin`, `ExecStdout` or `ExecStderr`) for
/// `exec_id`, split into frames of at most [`MAX_PAYLOAD`].
pub fn encode_exec_data(kind: FrameKind, exec_id: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 9 * (data.len() / MAX_PAYLOAD + 1));
    let chunks: Vec<&[u8]> = if data.is_empty() {
        vec![data]
    } else {
        data.chunks(MAX_PAYLOAD - 4).collect()
    };
    for chunk in chunks {
        let len = (chunk.len() + 5) as u32;
        out.extend_from_slice(&len.to_be_bytes());
        out.push(kind as u8);
        out.extend_from_slice(&exec_id.to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// Splits an exec stdio payload into its exec id and data.
pub fn split_exec_data(payload: &[u8]) -> Option<(u32, &[u8])> {
    if payload.len() < 4 {
        return None;
    }
    let id = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
    Some((id, &payload[4..]))
}

/// A path's stat as `docker cp` needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathStat {
    /// Last path component.
    pub name: String,
    /// Size in bytes.
    pub size: i64,
    /// Go `os.FileMode` bits: permissions plus type bits (directory is 1<<31,
    /// symlink 1<<27, ...), as Docker encodes them.
    pub mode: u32,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_unix_ns: i64,
    /// Target of a symlink, else empty.
    pub link_target: String,
}

/// How the guest builds the container's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsSpec {
    /// Read-only device holding the image's filesystem (ext4), e.g. `/dev/vda`.
    pub image_device: String,
    /// Writable device holding the container's own layer (ext4), e.g. `/dev/vdb`.
    pub upper_device: String,
}

impl Default for RootfsSpec {
    fn default() -> Self {
        Self {
            image_device: "/dev/vda".into(),
            upper_device: "/dev/vdb".into(),
        }
    }
}

/// Encodes one frame. Fails when the payload is over [`MAX_PAYLOAD`].
pub fn encode(kind: FrameKind, payload: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(payload.len()));
    }
    let len =
        u32::try_from(payload.len() + 1).map_err(|_| ProtocolError::TooLarge(payload.len()))?;
    let mut out = Vec::with_capacity(payload.len() + 5);
    out.extend_from_slice(&len.to_be_bytes());
    out.push(kind as u8);
    out.extend_from_slice(payload);
    Ok(out)
}

/// Encodes a control message from the host.
pub fn encode_host(msg: &HostMsg) -> Result<Vec<u8>, ProtocolError> {
    encode(FrameKind::Control, &serde_json::to_vec(msg)?)
}

/// Encodes a control message from the guest.
pub fn encode_guest(msg: &GuestMsg) -> Result<Vec<u8>, ProtocolError> {
    encode(FrameKind::Control, &serde_json::to_vec(msg)?)
}

/// Encodes one output frame: sequence number `seq`, then `data`.
///
/// Fails when `kind` is not `Stdout` or `Stderr`, or when `data` is over
/// [`MAX_OUTPUT_DATA`]; the sender splits larger output into several frames,
/// each with its own sequence number.
pub fn encode_output(kind: FrameKind, seq: u64, data: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    if !kind.is_output() {
        return Err(ProtocolError::NotOutput(kind));
    }
    if data.len() > MAX_OUTPUT_DATA {
        return Err(ProtocolError::TooLarge(data.len()));
    }
    let len = (1 + SEQ_LEN + data.len()) as u32;
    let mut out = Vec::with_capacity(5 + SEQ_LEN + data.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.push(kind as u8);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(data);
    Ok(out)
}

/// Splits the payload of an output frame into its sequence number and data.
pub fn split_output(payload: &[u8]) -> Result<(u64, &[u8]), ProtocolError> {
    match payload.split_first_chunk::<SEQ_LEN>() {
        Some((seq, data)) => Ok((u64::from_be_bytes(*seq), data)),
        None => Err(ProtocolError::NoSequence(payload.len())),
    }
}

/// Encodes data, splitting it into as many frames as needed. For standard
/// input (host to guest); output frames are built with [`encode_output`].
pub fn encode_data(kind: FrameKind, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 5 * (data.len() / MAX_PAYLOAD + 1));
    for chunk in data.chunks(MAX_PAYLOAD) {
        let len = (chunk.len() + 1) as u32;
        out.extend_from_slice(&len.to_be_bytes());
        out.push(kind as u8);
        out.extend_from_slice(chunk);
    }
    out
}

/// Parses the payload of a control frame sent by the host.
pub fn decode_host(payload: &[u8]) -> Result<HostMsg, ProtocolError> {
    Ok(serde_json::from_slice(payload)?)
}

/// Parses the payload of a control frame sent by the guest.
pub fn decode_guest(payload: &[u8]) -> Result<GuestMsg, ProtocolError> {
    Ok(serde_json::from_slice(payload)?)
}

/// The marker the guest sends in answer to `Hello { nonce }`.
///
/// Returns `None` when `nonce` is not 32 hex characters.
pub fn sync_marker(nonce: &str) -> Option<Vec<u8>> {
    if nonce.len() != 32 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = SYNC_MAGIC.to_vec();
    for i in 0..16 {
        let byte = u8::from_str_radix(&nonce[2 * i..2 * i + 2], 16).ok()?;
        out.push(byte);
    }
    Some(out)
}

/// Incremental frame decoder with resynchronisation.
///
/// Feed bytes with [`Decoder::push`], take frames with [`Decoder::next_frame`].
/// While a sync marker is expected, every byte before it is discarded.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    expect: Option<Vec<u8>>,
}

impl Decoder {
    /// A decoder that starts in frame mode.
    pub fn new() -> Self {
        Self::default()
    }

    /// Discards buffered bytes and everything that follows until `marker`.
    pub fn resync(&mut self, marker: Vec<u8>) {
        self.buf.clear();
        self.expect = Some(marker);
    }

    /// Waits for `marker` like [`Decoder::resync`], but searches the bytes
    /// already buffered too. For a corrupt frame: its "header" may be the
    /// marker of a new connection that came before the receiver noticed
    /// the old one close (both happen while a VM is stopped).
    pub fn resync_buffered(&mut self, marker: Vec<u8>) {
        self.expect = Some(marker);
        self.push(&[]);
    }

    /// Whether the decoder still waits for its sync marker.
    pub fn syncing(&self) -> bool {
        self.expect.is_some()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if let Some(marker) = &self.expect {
            if let Some(pos) = find(&self.buf, marker) {
                self.buf.drain(..pos + marker.len());
                self.expect = None;
            } else {
                // Keep only a tail that could still be the start of the marker.
                let keep = marker.len().saturating_sub(1).min(self.buf.len());
                let cut = self.buf.len() - keep;
                self.buf.drain(..cut);
            }
        }
    }

    /// Returns the next complete frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        if self.expect.is_some() || self.buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        if len == 0 || len as usize > MAX_PAYLOAD + 1 {
            return Err(ProtocolError::BadLength(len));
        }
        let total = 4 + len as usize;
        if self.buf.len() < total {
            return Ok(None);
        }
        let kind = FrameKind::from_u8(self.buf[4]).ok_or(ProtocolError::BadKind(self.buf[4]))?;
        let payload = self.buf[5..total].to_vec();
        self.buf.drain(..total);
        Ok(Some(Frame { kind, payload }))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Docker's default `PATH` when the image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_control_and_data() {
        let mut bytes = encode_host(&HostMsg::Resize { rows: 24, cols: 80 }).expect("encode");
        bytes.extend(encode_data(FrameKind::Stdin, b"hello"));
        let mut d = Decoder::new();
        // Feed one byte at a time: frames must come out whole.
        let mut frames = vec![];
        for b in &bytes {
            d.push(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().expect("decode") {
                frames.push(f);
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(
            decode_host(&frames[0].payload).expect("msg"),
            HostMsg::Resize { rows: 24, cols: 80 }
        );
        assert_eq!(
            frames[1],
            Frame {
                kind: FrameKind::Stdin,
                payload: b"hello".to_vec()
            }
        );
    }

    #[test]
    fn a_new_connection_behind_a_bad_frame_is_found() {
        // No end-of-connection was seen: the decoder is in frame mode when
        // the next connection's marker and Hello arrive.
        let hello = HostMsg::Hello {
            nonce: "00".repeat(16),
        };
        let mut bytes = SYNC_MAGIC.to_vec();
        bytes.extend(encode_host(&hello).expect("encode"));
        let mut d = Decoder::new();
        d.push(&bytes);
        assert!(matches!(d.next_frame(), Err(ProtocolError::BadLength(_))));
        d.resync_buffered(SYNC_MAGIC.to_vec());
        let f = d.next_frame().expect("decode").expect("the Hello frame");
        assert_eq!(decode_host(&f.payload).expect("msg"), hello);
        // Garbage without a marker is dropped, keeping only a possible
        // start of one.
        d.push(b"garbage bytes, no marker VSL");
        assert!(d.next_frame().is_err());
        d.resync_buffered(SYNC_MAGIC.to_vec());
        assert!(d.syncing());
        d.push(b"SYNC1");
        assert!(!d.syncing());
    }

    #[test]
    fn large_data_is_split() {
        let data = vec![7u8; MAX_PAYLOAD * 2 + 3];
        let bytes = encode_data(FrameKind::Stdin, &data);
        let mut d = Decoder::new();
        d.push(&bytes);
        let mut got = vec![];
        while let Some(f) = d.next_frame().expect("decode") {
            assert_eq!(f.kind, FrameKind::Stdin);
            got.extend(f.payload);
        }
        assert_eq!(got, data);
        assert!(encode(FrameKind::Stdout, &data).is_err());
    }

    #[test]
    fn resync_skips_garbage_and_forged_frames() {
        let nonce = "00112233445566778899aabbccddeeff";
        let marker = sync_marker(nonce).expect("marker");
        let mut d = Decoder::new();
        d.resync(marker.clone());
        // The tail of a frame cut in half, then a forged frame that does not
        // know the nonce, then the real marker and a real frame.
        let mut bytes = vec![1, 2, 3];
        bytes.extend(SYNC_MAGIC);
        bytes.extend(
            encode_guest(&GuestMsg::Exited {
                exit_code: 0,
                oom_killed: false,
            })
            .expect("enc"),
        );
        bytes.extend(&marker);
        bytes.extend(encode_guest(&GuestMsg::Started { pid: 9 }).expect("enc"));
        for chunk in bytes.chunks(3) {
            d.push(chunk);
        }
        let f = d.next_frame().expect("decode").expect("frame");
        assert_eq!(
            decode_guest(&f.payload).expect("msg"),
            GuestMsg::Started { pid: 9 }
        );
        assert!(d.next_frame().expect("decode").is_none());
    }

    #[test]
    fn exec_frames_carry_their_exec_id() {
        let bytes = encode_exec_data(FrameKind::ExecStdout, 7, b"hello");
        let mut d = Decoder::new();
        d.push(&bytes);
        let f = d.next_frame().expect("decode").expect("frame");
        assert_eq!(f.kind, FrameKind::ExecStdout);
        assert_eq!(split_exec_data(&f.payload), Some((7, &b"hello"[..])));
        assert_eq!(split_exec_data(&[0, 1]), None);
        let msg = HostMsg::Exec {
            exec_id: 3,
            spec: Box::new(ExecSpec {
                args: vec!["ls".into()],
                ..Default::default()
            }),
        };
        let json = serde_json::to_string(&msg).expect("json");
        assert!(
            json.starts_with(r#"{"type":"exec","exec_id":3,"spec":{"args":["ls"]"#),
            "{json}"
        );
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let mut d = Decoder::new();
        d.push(&[0, 0, 0, 0, 1]);
        assert!(matches!(d.next_frame(), Err(ProtocolError::BadLength(0))));
        let mut d = Decoder::new();
        d.push(&[0, 0, 0, 2, 99, 0]);
        assert!(matches!(d.next_frame(), Err(ProtocolError::BadKind(99))));
        assert!(decode_host(b"{\"type\":\"nope\"}").is_err());
        assert!(sync_marker("xyz").is_none());
    }

    #[test]
    fn output_frames_carry_a_sequence_number() {
        let mut bytes = encode_output(FrameKind::Stdout, 1, b"out").expect("enc");
        bytes.extend(encode_output(FrameKind::Stderr, 2, b"").expect("enc"));
        bytes.extend(encode_output(FrameKind::Stdout, u64::MAX - 1, b"last").expect("enc"));
        // Layout: length, kind, big-endian seq, data.
        assert_eq!(
            &bytes[..16],
            &[0, 0, 0, 12, 3, 0, 0, 0, 0, 0, 0, 0, 1, b'o', b'u', b't']
        );
        let mut d = Decoder::new();
        for chunk in bytes.chunks(5) {
            d.push(chunk);
        }
        let mut got = vec![];
        while let Some(f) = d.next_frame().expect("decode") {
            let (seq, data) = split_output(&f.payload).expect("split");
            got.push((f.kind, seq, data.to_vec()));
        }
        assert_eq!(
            got,
            vec![
                (FrameKind::Stdout, 1, b"out".to_vec()),
                (FrameKind::Stderr, 2, vec![]),
                (FrameKind::Stdout, u64::MAX - 1, b"last".to_vec()),
            ]
        );
    }

    #[test]
    fn output_frames_are_bounded_and_checked() {
        let max = vec![1u8; MAX_OUTPUT_DATA];
        let frame = encode_output(FrameKind::Stdout, 7, &max).expect("a full frame");
        let mut d = Decoder::new();
        d.push(&frame);
        let f = d.next_frame().expect("decode").expect("frame");
        assert_eq!(f.payload.len(), MAX_PAYLOAD);
        assert_eq!(split_output(&f.payload).expect("split"), (7, &max[..]));
        assert!(matches!(
            encode_output(FrameKind::Stdout, 8, &vec![1u8; MAX_OUTPUT_DATA + 1]),
            Err(ProtocolError::TooLarge(_))
        ));
        assert!(matches!(
            encode_output(FrameKind::Stdin, 1, b"x"),
            Err(ProtocolError::NotOutput(FrameKind::Stdin))
        ));
        assert!(matches!(
            split_output(&[0, 0, 0]),
            Err(ProtocolError::NoSequence(3))
        ));
        assert_eq!(split_output(&[0; 8]).expect("empty"), (0, &[][..]));
    }

    #[test]
    fn messages_have_a_stable_json_shape() {
        let json = serde_json::to_string(&HostMsg::Signal { signal: 15 }).expect("json");
        assert_eq!(json, r#"{"type":"signal","signal":15}"#);
        let json = serde_json::to_string(&HostMsg::Ack { seq: 42 }).expect("json");
        assert_eq!(json, r#"{"type":"ack","seq":42}"#);
        assert_eq!(
            decode_host(json.as_bytes()).expect("decode"),
            HostMsg::Ack { seq: 42 }
        );
        let json = serde_json::to_string(&ProcessState::Running { pid: 3 }).expect("json");
        assert_eq!(json, r#"{"state":"running","pid":3}"#);
    }
}

/// One network interface of a container VM: which slot (the VM's NIC
/// number, shown as `eth<slot>` in the guest), its MAC address and its IPv4
/// configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceSpec {
    /// NIC slot, 0-based.
    pub slot: u8,
    /// The container's MAC address on this network.
    pub mac: String,
    /// IPv4 address.
    pub address: String,
    /// Prefix length of the network.
    pub prefix: u8,
    /// Default gateway through this interface; set on one interface only.
    pub gateway: Option<String>,
    /// The network's MTU, when it is not Ethernet's 1500.
    #[serde(default)]
    pub mtu: Option<u32>,
}

/// The columns of `docker top`, after the `ps` arguments they stand for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TopFormat {
    /// `ps -ef` (Docker's default).
    #[default]
    Ef,
    /// `ps aux`.
    Aux,
}

/// The MAC address QEMU gives network slot `slot` of every VM. The guest
/// agent finds its slots by these addresses at boot (a clone keeps its
/// template's) and names them `eth<slot>`; each container then gets its own
/// address.
pub fn slot_mac(slot: usize) -> String {
    format!("52:54:00:56:53:{slot:02x}")
}

/// What the container's processes may do, as Docker's run flags say, applied
/// by the agent inside the VM to the main process and every exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Restrictions {
    /// Capability numbers the processes keep (bounding, permitted,
    /// effective and inheritable sets); `None` keeps them all
    /// (`--privileged`).
    pub capabilities: Option<Vec<u8>>,
    /// `--security-opt no-new-privileges`.
    pub no_new_privileges: bool,
    /// `--ulimit`: (resource number, soft, hard); -1 is unlimited.
    pub ulimits: Vec<(u32, i64, i64)>,
    /// `--group-add`: group names (looked up in the container's
    /// `/etc/group`) or numbers.
    pub group_add: Vec<String>,
    /// `--pids-limit`: most processes at once (a cgroup in the guest).
    pub pids_limit: Option<i64>,
    /// `--shm-size` in bytes (the size of `/dev/shm`).
    pub shm_size: Option<u64>,
}

/// Linux capability names (without `CAP_`), by number.
pub const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The capabilities a Docker container has by default.
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];
