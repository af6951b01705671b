//! `vessel`: the command-line entry point. A thin binary: it parses flags
//! (named as dockerd names them), sets up logging, opens the engine and
//! serves the Docker Engine API on a Unix socket. All behaviour lives in the
//! library crates.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tracing::info;
use vessel_engine::{Engine, EngineConfig, DEFAULT_MEMORY_MIB};

#[derive(Parser)]
#[command(
    name = "vessel",
    version,
    about = "Every Docker container in its own virtual machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon and serve the Docker Engine API.
    Daemon(DaemonArgs),
}

#[derive(Parser)]
struct DaemonArgs {
    /// Socket to listen on (dockerd's -H/--host); only unix:// is supported.
    #[arg(
        short = 'H',
        long = "host",
        default_value = "unix:///run/vessel/vessel.sock"
    )]
    host: String,
    /// Root of persistent state (dockerd's --data-root).
    #[arg(long = "data-root", default_value = "/var/lib/vessel")]
    data_root: PathBuf,
    /// Directory holding the guest kernel (`vmlinux`, `release`) and agent (`vessel-init`).
    #[arg(
        long = "guest-dir",
        env = "VESSEL_GUEST_DIR",
        default_value = "/usr/local/lib/vessel"
    )]
    guest_dir: PathBuf,
    /// QEMU system emulator.
    #[arg(long = "qemu", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Memory of a container VM that sets no --memory, in MiB.
    #[arg(long = "default-memory", default_value_t = DEFAULT_MEMORY_MIB)]
    default_memory: u64,
    /// vCPUs of a container VM that sets no --cpus.
    #[arg(long = "default-cpus", default_value_t = 1)]
    default_cpus: u32,
    /// Start container VMs by restoring a booted template VM of their shape
    /// instead of booting a kernel (`--vm-templates=false` always boots).
    #[arg(long = "vm-templates", default_value_t = true, action = clap::ArgAction::Set)]
    vm_templates: bool,
    /// Template clones kept started, with the image mounted, per recently
    /// run (image, VM shape), so a container's first start takes one
    /// instead of starting a VM (0 turns this off; needs --vm-templates).
    #[arg(long = "warm-vms", default_value_t = 1)]
    warm_vms: usize,
    /// Write the daemon's PID to this file (dockerd's -p/--pidfile).
    #[arg(short = 'p', long = "pidfile")]
    pidfile: Option<PathBuf>,
    /// Log level (dockerd's --log-level): debug, info, warn, error.
    #[arg(short = 'l', long = "log-level", default_value = "info")]
    log_level: String,
}

fn find_in_path(name: &PathBuf) -> PathBuf {
    if name.components().count() > 1 {
        return name.clone();
    }
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|c| c.is_file())
        })
        .unwrap_or_else(|| name.clone())
}

async fn daemon(args: DaemonArgs) -> anyhow::Result<()> {
    let Some(sock) = args.host.strip_prefix("unix://") else {
        bail!(
            "unsupported host {}: only unix:// sockets are supported",
            args.host
        );
    };
    let sock = PathBuf::from(sock);
    let cfg = EngineConfig {
        data_root: args.data_root.clone(),
        kernel: args.guest_dir.join("vmlinux"),
        agent: args.guest_dir.join("vessel-init"),
        qemu: find_in_path(&args.qemu),
        default_memory_mib: args.default_memory,
        default_vcpus: args.default_cpus.max(1),
        templates: args.vm_templates,
        warm_vms: args.warm_vms,
    };
    let engine = Engine::open(cfg).await.context("starting the engine")?;
    let facts = engine.facts();
    info!(hypervisor = %facts.hypervisor, reason = %facts.accel_reason, data_root = %args.data_root.display(), "engine ready");
    if let Some(dir) = sock.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if sock.exists() {
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            bail!("{} is in use by another daemon", sock.display());
        }
        std::fs::remove_file(&sock).with_context(|| format!("remove stale {}", sock.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(&sock)
        .with_context(|| format!("listen on {}", sock.display()))?;
    if let Some(p) = &args.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("write {}", p.display()))?;
    }
    info!(socket = %sock.display(), "API listening");
    let app = vessel_api::service(engine.clone());
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {},
        }
        info!("shutting down; container VMs keep running");
    };
    tokio::select! {
        r = axum::serve(listener, app) => r.context("serving the API")?,
        _ = shutdown => {}
    }
    engine.shutdown();
    let _ = std::fs::remove_file(&sock);
    if let Some(p) = &args.pidfile {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Daemon(args) => {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log_level));
            use std::io::IsTerminal;
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .init();
            let rt = tokio::runtime::Runtime::new().context("start the async runtime")?;
            rt.block_on(daemon(args))
        }
    }
}
