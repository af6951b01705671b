//! `vessel-init`: the guest agent, PID 1 inside every container VM.
//!
//! It runs as `/init` from an initramfs that contains nothing else. It owns:
//!
//! * the early guest system: `/proc`, `/sys`, `/dev` (devtmpfs) and the
//!   loopback interface;
//! * the control channel to the host (virtio-serial port
//!   [`vessel_protocol::VIRTIO_PORT_NAME`] by default, or AF_VSOCK port
//!   [`vessel_protocol::VSOCK_PORT`] with `vessel.transport=vsock` on the
//!   kernel command line), speaking the protocol of `vessel-protocol`,
//!   including its resynchronisation rule;
//! * on `Start`, the container's root filesystem (an overlay of the image
//!   device and the container's writable device under `/run/vessel`), its
//!   `/proc`, `/sys`, `/dev`, `/etc/hostname`, `/etc/hosts`, and the one
//!   container process with its stdio;
//! * while that process runs, extra processes started by `Exec`
//!   (`docker exec`) in the same root filesystem, with their own stdio;
//! * reaping every orphan, and reporting the exits of the main process and
//!   of every exec.
//!
//! It must not:
//!
//! * touch any disk before `Prepare` or `Start` (a booted, idle VM may be
//!   snapshotted and cloned);
//! * panic or exit on bad input: it logs to stderr (the kernel console) and
//!   carries on; an unrecoverable error is logged and the VM is rebooted,
//!   which ends it (QEMU runs with `-no-reboot`);
//! * run more than one container main process, or decide policy (restarts,
//!   logs, networking): that is the host's job.

mod agent;
mod channel;
mod command;
mod copy;
mod diff;
mod mounts;
mod net;
mod process;
mod restrict;
mod rootfs;
mod system;
mod top;
mod user;

/// Logs one line to stderr (the kernel console). Never panics.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "vessel-init: {}", format_args!($($arg)*));
    }};
}

use vessel_protocol::{Decoder, FrameKind, SYNC_MAGIC};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some(agent::WARM_UP_ARG) => return,
        Some(copy::COPY_OUT_ARG)
        | Some(copy::COPY_IN_ARG)
        | Some(copy::COPY_IN_OWNERS_ARG)
        | Some(copy::EXPORT_ARG) => {
            std::process::exit(copy::child_main(&args));
        }
        _ => {}
    }
    std::panic::set_hook(Box::new(|info| {
        log!("panic: {info}");
        system::reboot();
    }));
    if std::process::id() != 1 {
        log!("warning: not running as PID 1");
    }

    system::early_boot();
    if let Err(e) = net::name_slots() {
        log!("naming the network slots: {e}");
    }
    let kind = system::transport_from_cmdline(&system::cmdline());
    log!("waiting for the host on {kind:?}");
    let (mut channel, writer) = match channel::open(kind) {
        Ok(c) => c,
        Err(e) => system::fatal(&format!("cannot open the control channel: {e}")),
    };
    // The template builder checks the clock line (a template must not carry
    // a failed timer calibration into every clone), then snapshots the VM
    // once `ready` is on the console.
    let (clocksource, clockevent) = system::clock_devices();
    log!("clock {clocksource} {clockevent}");
    log!("ready");
    let agent = agent::Agent::new(writer);
    {
        let agent = agent.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || agent.reap_forever())
        {
            system::fatal(&format!("cannot start the reaper: {e}"));
        }
    }

    // Every connection starts with SYNC_MAGIC: discard anything before it.
    let mut decoder = Decoder::new();
    decoder.resync(SYNC_MAGIC.to_vec());
    let mut buf = vec![0u8; 64 * 1024];
    let mut read_errors = 0u32;
    loop {
        let n = match channel.read(&mut buf) {
            Ok(0) => {
                decoder.resync(SYNC_MAGIC.to_vec());
                continue;
            }
            Ok(n) => {
                read_errors = 0;
                n
            }
            Err(e) => {
                read_errors = read_errors.saturating_add(1);
                if read_errors <= 3 {
                    log!("reading the control channel: {e}");
                }
                decoder.resync(SYNC_MAGIC.to_vec());
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        decoder.push(&buf[..n]);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => match frame.kind {
                    FrameKind::Control => match vessel_protocol::decode_host(&frame.payload) {
                        Ok(msg) => agent.handle(msg),
                        Err(e) => agent.error(format!("ignoring control frame: {e}")),
                    },
                    FrameKind::Stdin => agent.stdin(frame.payload),
                    FrameKind::ExecStdin => agent.exec_stdin(&frame.payload),
                    FrameKind::Stdout
                    | FrameKind::Stderr
                    | FrameKind::ExecStdout
                    | FrameKind::ExecStderr => {
                        log!("ignoring a {:?} frame from the host", frame.kind)
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    // The stream is corrupt: wait for the host to resync.
                    // The host may already have: when the VM was stopped
                    // while the host end closed and opened again, the next
                    // connection's bytes follow the old ones with no end
                    // of connection read in between.
                    log!("bad frame ({e}); resynchronising");
                    decoder.resync_buffered(SYNC_MAGIC.to_vec());
                }
            }
        }
    }
}

/// Helpers shared by the tests that run real processes.
#[cfg(test)]
mod test_support {
    /// Puts busybox at `dest` as a hard link: a copy would hold a writable
    /// descriptor that a concurrently forked test process inherits, and
    /// exec'ing the copy then fails with ETXTBSY. Falls back to a copy when
    /// the link crosses filesystems.
    pub fn install_busybox(dest: &std::path::Path) {
        if std::fs::hard_link("/usr/bin/busybox", dest).is_err() {
            std::fs::copy("/usr/bin/busybox", dest).expect("copy busybox");
        }
    }
}
