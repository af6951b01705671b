//! `vessel`: the command-line entry point. A thin binary: it parses flags
//! (named as dockerd names them), sets up logging, opens the engine and
//! serves the Docker Engine API on a Unix socket. All behaviour lives in the
//! library crates.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tracing::info;
use vessel_engine::{Engine, EngineConfig, NetworkConfig, DEFAULT_MEMORY_MIB};

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
    /// Root of persistent state (dockerd's --data-root; default
    /// /var/lib/vessel, or `data-root` of the config file).
    #[arg(long = "data-root")]
    data_root: Option<PathBuf>,
    /// Daemon configuration file, dockerd's daemon.json format (keys
    /// `registry-mirrors`, `insecure-registries`, `data-root`). A missing
    /// file at the default path is no error.
    #[arg(long = "config-file", default_value = DEFAULT_CONFIG_FILE)]
    config_file: PathBuf,
    /// A registry mirror for docker.io images (dockerd's --registry-mirror);
    /// repeatable, added to the config file's.
    #[arg(long = "registry-mirror")]
    registry_mirrors: Vec<String>,
    /// A registry reached without TLS verification or over plain HTTP
    /// (`host:port` or a CIDR; dockerd's --insecure-registry); repeatable.
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// Extra CAs per registry: `<dir>/<host:port>/*.crt`, as
    /// /etc/docker/certs.d for dockerd.
    #[arg(long = "registry-certs-dir", default_value = "/etc/vessel/certs.d")]
    registry_certs_dir: PathBuf,
    /// Treat registries on loopback (127.0.0.0/8, ::1, `localhost`) as
    /// insecure, as dockerd always does (HTTPS without verification, then
    /// plain HTTP). `=false` verifies their TLS like any other registry's,
    /// with the system roots and the CAs of --registry-certs-dir.
    #[arg(long = "insecure-loopback-registries", default_value_t = true, action = clap::ArgAction::Set)]
    insecure_loopback_registries: bool,
    /// Directory holding the guest kernel (`vmlinux`, `release`) and agent (`vessel-init`).
    #[arg(
        long = "guest-dir",
        env = "VESSEL_GUEST_DIR",
        default_value = "/usr/local/lib/vessel"
    )]
    guest_dir: PathBuf,
    /// QEMU system emulator: a path, or a name looked up in PATH. Default:
    /// `qemu-system-x86_64` in --guest-dir, Vessel's own build of QEMU
    /// (`scripts/build-qemu.sh`), which costs each VM less host memory than
    /// a distribution's; Debian's `qemu-system-x86_64` works too.
    #[arg(long = "qemu")]
    qemu: Option<PathBuf>,
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
    /// Under software emulation (TCG), a container VM that has been idle
    /// this many seconds gives back the host code QEMU translated for it
    /// (most of its memory); it translates again what it runs when it wakes.
    /// 0 never does. No effect under KVM.
    #[arg(long = "tcg-trim-after", default_value_t = 30)]
    tcg_trim_after: u64,
    /// Host bridge of the default `bridge` network; it also names the
    /// daemon's nftables table. Default: `vessel0` with the default data
    /// root, else `vb` and a hash of the data root, so that two daemons
    /// never share one.
    #[arg(long = "bridge-name")]
    bridge_name: Option<String>,
    /// Address and prefix of the default bridge (dockerd's --bip, e.g.
    /// 172.26.0.1/16); a free subnet when unset.
    #[arg(long = "bip")]
    bip: Option<String>,
    /// Write the daemon's PID to this file (dockerd's -p/--pidfile).
    #[arg(short = 'p', long = "pidfile")]
    pidfile: Option<PathBuf>,
    /// Log level (dockerd's --log-level): debug, info, warn, error.
    #[arg(short = 'l', long = "log-level", default_value = "info")]
    log_level: String,
}

const DEFAULT_CONFIG_FILE: &str = "/etc/vessel/daemon.json";

/// The keys of dockerd's daemon.json that Vessel understands.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(rename = "registry-mirrors", default)]
    registry_mirrors: Vec<String>,
    #[serde(rename = "insecure-registries", default)]
    insecure_registries: Vec<String>,
    #[serde(rename = "data-root")]
    data_root: Option<PathBuf>,
    bip: Option<String>,
}

fn read_config(path: &std::path::Path) -> anyhow::Result<ConfigFile> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && path == std::path::Path::new(DEFAULT_CONFIG_FILE) =>
        {
            return Ok(ConfigFile::default())
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    serde_json::from_str(&text)
        .with_context(|| format!("unable to configure the daemon from {}", path.display()))
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
    let file = read_config(&args.config_file)?;
    let data_root = match (&args.data_root, &file.data_root) {
        (Some(_), Some(_)) => bail!(
            "the following directives are specified both as a flag and in the configuration file: data-root"
        ),
        (Some(d), None) | (None, Some(d)) => d.clone(),
        (None, None) => PathBuf::from("/var/lib/vessel"),
    };
    let mut mirrors = file.registry_mirrors;
    mirrors.extend(args.registry_mirrors.iter().cloned());
    let mut insecure = file.insecure_registries;
    insecure.extend(args.insecure_registries.iter().cloned());
    let registry = vessel_registry::RegistryConfig {
        mirrors,
        insecure_registries: insecure,
        certs_dir: Some(args.registry_certs_dir.clone()),
        insecure_loopback: args.insecure_loopback_registries,
    };
    let cfg = EngineConfig {
        data_root: data_root.clone(),
        kernel: args.guest_dir.join("vmlinux"),
        agent: args.guest_dir.join("vessel-init"),
        qemu: match &args.qemu {
            Some(q) => find_in_path(q),
            None => args.guest_dir.join("qemu-system-x86_64"),
        },
        default_memory_mib: args.default_memory,
        default_vcpus: args.default_cpus.max(1),
        templates: args.vm_templates,
        warm_vms: args.warm_vms,
        tcg_trim_after: (args.tcg_trim_after > 0)
            .then(|| std::time::Duration::from_secs(args.tcg_trim_after)),
        registry,
        network: NetworkConfig {
            bridge_name: args
                .bridge_name
                .clone()
                .unwrap_or_else(|| vessel_network::default_bridge_name(&data_root)),
            bip: args.bip.clone().or(file.bip),
        },
    };
    let engine = Engine::open(cfg).await.context("starting the engine")?;
    let facts = engine.facts();
    info!(hypervisor = %facts.hypervisor, reason = %facts.accel_reason, data_root = %data_root.display(), "engine ready");
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
