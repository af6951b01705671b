//! The Vessel engine: containers whose bodies are virtual machines.
//!
//! Owns the container state machine (created → running → exited → removed),
//! the single source of truth about containers (an embedded store under the
//! data root, written before it is acted on), the live connections to the
//! guest agents, logs, attach streams and waits, and the recovery of running
//! containers after a daemon restart. It drives the image store for boot
//! disks and the hypervisor layer for VMs.
//!
//! It must not speak HTTP or know about the Docker API's wire formats beyond
//! the model types it returns: that is the API layer's job.

mod copy;
mod events;
mod exec;
mod filters;
mod health;
mod idle;
mod logs;
mod names;
mod network;
mod pool;
mod privileges;
mod record;
mod resources;
pub mod signal;
mod stats;
mod template;
mod volumes;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard_stubs::models::{
    ContainerConfig, ContainerCreateBody, ContainerInspectResponse, ContainerSummary,
    ContainerUpdateBody, ExecConfig, HostConfig,
};
use bytes::Bytes;
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};
use vessel_image::ImageStore;
use vessel_protocol::{GuestMsg, HostMsg, ProcessSpec, ProcessState, RootfsSpec};
use vessel_store::Store;
use vessel_vm::channel::{connect, AgentReader, AgentWriter, Incoming, Transport};
use vessel_vm::{Accel, Boot, Hypervisor, ProbeResult, Qemu, VmSpec};

pub use bollard_stubs::models::EventMessageTypeEnum as EventType;
pub use copy::{ArchiveStream, CommitOptions};
pub use events::Events;
pub use exec::{ExecHandle, ExecState};
pub use filters::label_matches;
pub use logs::LogEntry;
pub use network::{NetworkConfig, NetworkFilters, NetworkRecord};
pub use record::{ContainerRecord, StateRecord, Status, VmShape};
pub use vessel_protocol::PathStat;
pub use volumes::MountRecord;

/// Default guest memory when `--memory` is not given.
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// Smallest guest memory Vessel accepts: below this the guest kernel and
/// agent do not fit.
pub const MIN_MEMORY_MIB: u64 = 64;
/// Size of every container's writable disk (sparse; only what is written
/// costs space).
pub const UPPER_DISK_GIB: u64 = 16;

const CONTAINERS: &str = "containers";

/// Errors, each of which maps to one Docker API status.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 409.
    #[error("{0}")]
    Conflict(String),
    /// 400.
    #[error("{0}")]
    InvalidParameter(String),
    /// 304: nothing to do.
    #[error("not modified")]
    NotModified,
    /// 403.
    #[error("{0}")]
    Forbidden(String),
    /// 501: the request is valid but this configuration cannot serve it.
    #[error("{0}")]
    NotImplemented(String),
    /// 500.
    #[error("{0}")]
    Internal(String),
}

fn internal(context: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Internal(format!("{context}: {e}"))
}

impl From<vessel_image::Error> for EngineError {
    fn from(e: vessel_image::Error) -> Self {
        use vessel_image::Error as E;
        match e {
            E::NotFound(_) => EngineError::NotFound(e.to_string()),
            E::Conflict(m) => EngineError::Conflict(m),
            E::InvalidArchive(_)
            | E::InvalidReference(_)
            | E::InvalidChange(_)
            | E::InvalidLayer(_)
            | E::Ambiguous(_) => EngineError::InvalidParameter(e.to_string()),
            other => EngineError::Internal(other.to_string()),
        }
    }
}

/// `docker top`'s answer: column titles and one row per process.
pub type TopAnswer = (Vec<String>, Vec<Vec<String>>);

/// Where things are and how VMs are shaped by default.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Root of all state (`--data-root`).
    pub data_root: PathBuf,
    /// Guest kernel (vmlinux).
    pub kernel: PathBuf,
    /// Guest agent binary (static).
    pub agent: PathBuf,
    /// QEMU system emulator.
    pub qemu: PathBuf,
    /// Memory of a VM whose container sets no `--memory`.
    pub default_memory_mib: u64,
    /// vCPUs of a VM whose container sets no `--cpus`.
    pub default_vcpus: u32,
    /// Start container VMs by restoring booted templates (falls back to a
    /// cold boot when a template is not ready or its restore fails).
    pub templates: bool,
    /// Warm VMs kept per (image, VM shape) when templates are on (see
    /// `pool`); 0 turns them off.
    pub warm_vms: usize,
    /// Registries: mirrors, insecure registries, trusted CAs.
    pub registry: vessel_registry::RegistryConfig,
    /// The default network's bridge and subnet.
    pub network: NetworkConfig,
    /// Under software emulation, a container VM idle this long gives back
    /// its translated code (see `idle`); `None` never.
    pub tcg_trim_after: Option<Duration>,
}

/// Output of a container as attach clients see it.
#[derive(Debug, Clone)]
pub enum Output {
    /// Standard output (or the TTY).
    Stdout(Bytes),
    /// Standard error.
    Stderr(Bytes),
    /// The process ended; nothing more will come.
    End,
}

/// What `wait` watches.
#[derive(Debug, Clone, Default)]
struct Watch {
    running: bool,
    exits: u64,
    exit_code: i64,
    removed: bool,
}

/// `docker wait --condition`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitCondition {
    /// Return when the container is not running (at once if it is not).
    NotRunning,
    /// Return at the next exit.
    NextExit,
    /// Return when the container is removed.
    Removed,
}

#[derive(Default)]
struct Live {
    writer: Option<AgentWriter>,
    pending_stdin: Vec<u8>,
    stdin_closed: bool,
    tty_size: Option<(u16, u16)>,
}

struct Handle {
    id: String,
    record: Mutex<ContainerRecord>,
    op: Arc<tokio::sync::Mutex<()>>,
    live: tokio::sync::Mutex<Live>,
    output: broadcast::Sender<Output>,
    status: watch::Sender<Watch>,
    log_version: watch::Sender<u64>,
    killed: AtomicBool,
}

impl Handle {
    fn new(rec: ContainerRecord) -> Arc<Self> {
        let w = Watch {
            running: rec.running(),
            exit_code: rec.state.exit_code,
            ..Default::default()
        };
        Arc::new(Self {
            id: rec.id.clone(),
            record: Mutex::new(rec),
            op: Arc::new(tokio::sync::Mutex::new(())),
            live: tokio::sync::Mutex::new(Live::default()),
            output: broadcast::channel(4096).0,
            status: watch::channel(w).0,
            log_version: watch::channel(0).0,
            killed: AtomicBool::new(false),
        })
    }

    fn rec(&self) -> ContainerRecord {
        self.record
            .lock()
            .map(|r| r.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn update(&self, f: impl FnOnce(&mut ContainerRecord)) -> ContainerRecord {
        let mut g = self.record.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g);
        g.clone()
    }
}

/// Facts for `docker info` and `docker version`.
#[derive(Debug, Clone)]
pub struct SystemFacts {
    /// Acceleration in use.
    pub accel: Accel,
    /// Why the probe chose it.
    pub accel_reason: String,
    /// e.g. `qemu 7.2.22 (tcg)`.
    pub hypervisor: String,
    /// Release of the guest kernel.
    pub guest_kernel: String,
    /// Counts of containers.
    pub containers: usize,
    /// Running containers.
    pub running: usize,
    /// Stopped containers.
    pub stopped: usize,
    /// Images.
    pub images: usize,
    /// Data root.
    pub data_root: PathBuf,
    /// Default VM memory.
    pub default_memory_mib: u64,
}

/// Filters of `docker container prune`.
#[derive(Debug, Clone, Default)]
pub struct ContainerPruneFilters {
    /// `until=`: created before this time (unix seconds).
    pub until: Option<i64>,
    /// `label=key[=value]`: every one must match.
    pub label: Vec<String>,
    /// `label!=key[=value]`: none may match.
    pub label_not: Vec<String>,
}

impl ContainerPruneFilters {
    fn matches(&self, rec: &ContainerRecord) -> bool {
        let labels = rec.config.labels.clone().unwrap_or_default();
        let has = |l: &String| filters::label_matches(l, |k| labels.get(k));
        filters::created_before(&rec.created, self.until)
            && self.label.iter().all(has)
            && !self.label_not.iter().any(has)
    }
}

/// Options of `docker logs`.
#[derive(Debug, Clone, Default)]
pub struct LogsOptions {
    /// Include stdout.
    pub stdout: bool,
    /// Include stderr.
    pub stderr: bool,
    /// Keep streaming until the container stops.
    pub follow: bool,
    /// Only the last N entries.
    pub tail: Option<usize>,
    /// Only entries at or after this unix time.
    pub since: Option<f64>,
    /// Only entries before this unix time.
    pub until: Option<f64>,
}

/// An attach session.
pub struct Attach {
    /// Whether the container has a TTY (raw stream instead of multiplexed).
    pub tty: bool,
    /// Live output.
    pub output: broadcast::Receiver<Output>,
    /// Whether the container was running when attached.
    pub running: bool,
}

/// The engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: EngineConfig,
    store: Store,
    images: Arc<ImageStore>,
    hv: Arc<dyn Hypervisor>,
    probe: ProbeResult,
    initrd: PathBuf,
    blank_upper: PathBuf,
    guest_kernel: String,
    templates: Option<Arc<template::Templates>>,
    pool: Option<pool::Pool>,
    registry: Arc<vessel_registry::Registry>,
    /// `docker top` requests waiting for their answer, by request id.
    tops: Mutex<HashMap<u32, tokio::sync::oneshot::Sender<TopAnswer>>>,
    /// `docker stats` questions to agents (processes, memory in the guest)
    /// waiting for their answer, by request id.
    guest_stats: Mutex<HashMap<u32, tokio::sync::oneshot::Sender<stats::Guest>>>,
    /// Networks and the firewall.
    networks: Arc<network::Networks>,
    /// DNS servers and published-port proxies.
    net_services: network::NetServices,
    /// Interface and limit changes (`docker network connect`, `docker
    /// update --pids-limit`) waiting for the agent's
    /// answer, by request id.
    iface_waiters: Mutex<HashMap<u32, tokio::sync::oneshot::Sender<Option<String>>>>,
    /// Copies (`docker cp`) under way, by copy id.
    copies: Mutex<HashMap<u32, tokio::sync::mpsc::UnboundedSender<copy::CopyEvent>>>,
    execs: Mutex<HashMap<String, Arc<ExecHandle>>>,
    events: Events,
    next_exec: std::sync::atomic::AtomicU32,
    containers: Mutex<HashMap<String, Arc<Handle>>>,
    create_lock: tokio::sync::Mutex<()>,
    /// Named and anonymous volumes (`<data-root>/volumes`).
    volumes: Arc<vessel_volume::VolumeStore>,
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| internal("background task", e))
}

impl Engine {
    /// Opens the data root, probes the hypervisor and recovers every
    /// container recorded there (reattaching to VMs that still run).
    pub async fn open(cfg: EngineConfig) -> Result<Self, EngineError> {
        let root = cfg.data_root.clone();
        for dir in ["containers", "vm", "guest", "image"] {
            std::fs::create_dir_all(root.join(dir))
                .map_err(|e| internal(&format!("create {}", root.join(dir).display()), e))?;
        }
        for (path, what) in [
            (&cfg.kernel, "guest kernel"),
            (&cfg.agent, "guest agent"),
            (&cfg.qemu, "QEMU"),
        ] {
            if !path.exists() {
                return Err(EngineError::Internal(format!(
                    "{what} not found at {} (run scripts/setup.sh)",
                    path.display()
                )));
            }
        }
        let store =
            Store::open(&root.join("vessel.db")).map_err(|e| internal("open state store", e))?;
        let images = {
            let dir = root.join("image");
            blocking(move || ImageStore::open(&dir)).await??
        };
        let qemu_path = cfg.qemu.clone();
        let probe = blocking(move || vessel_vm::probe(&qemu_path)).await?;
        info!(accel = probe.accel.as_str(), reason = %probe.reason, "hypervisor probe");
        let qemu = {
            let (binary, accel) = (cfg.qemu.clone(), probe.accel);
            // Blocking: runs `qemu --version` and measures the host TSC.
            blocking(move || Qemu::new(binary, accel))
                .await?
                .map_err(|e| internal("qemu", e))?
        };
        let (initrd, _) = vessel_vm::initrd::prepare(&cfg.agent, &root.join("guest"))
            .map_err(|e| internal("initramfs", e))?;
        let blank_upper = root
            .join("guest")
            .join(format!("upper-blank-{UPPER_DISK_GIB}g.ext4"));
        if !blank_upper.exists() {
            let p = blank_upper.clone();
            blocking(move || make_blank_upper(&p)).await??;
        }
        let guest_kernel = std::fs::read_to_string(cfg.kernel.with_file_name("release"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let hv: Arc<dyn Hypervisor> = Arc::new(qemu);
        let templates = if cfg.templates {
            let placeholder_upper = root.join("guest").join("placeholder-upper.qcow2");
            if !placeholder_upper.exists() {
                let (b, u) = (blank_upper.clone(), placeholder_upper.clone());
                blocking(move || make_upper(&b, &u)).await??;
            }
            let kmeta = std::fs::metadata(&cfg.kernel).map_err(|e| internal("guest kernel", e))?;
            // Bump the leading format number whenever the VM's device layout
            // or the way templates are made changes. The command line's TCG
            // additions are not spelled out here: their host TSC rate differs
            // by a few kHz from one measurement to the next; `describe()`
            // gives it in MHz.
            let generation = format!(
                "format=3|cmdline={}|kernel={}:{}:{:?}|initrd={}|{}",
                vessel_vm::qemu::KERNEL_CMDLINE,
                cfg.kernel.display(),
                kmeta.len(),
                kmeta.modified().ok(),
                initrd.display(),
                hv.describe()
            );
            let inputs = template::TemplateInputs {
                root: root.join("templates"),
                run_root: root.join("vm"),
                kernel: cfg.kernel.clone(),
                initrd: initrd.clone(),
                placeholder_image: root.join("guest").join("placeholder-image.raw"),
                placeholder_upper,
                generation,
                tap_owner: cfg.network.bridge_name.clone(),
            };
            let t = template::Templates::open(inputs, hv.clone())
                .map_err(|e| internal("VM templates", e))?;
            Some(Arc::new(t))
        } else {
            None
        };
        let pool = if templates.is_some() && cfg.warm_vms > 0 {
            Some(
                pool::Pool::open(root.join("warm"), root.join("vm"), cfg.warm_vms)
                    .map_err(|e| internal("warm VMs", e))?,
            )
        } else {
            None
        };
        let registry = Arc::new(vessel_registry::Registry::new(cfg.registry.clone()));
        let networks = Arc::new(network::Networks::open(cfg.network.clone(), &store)?);
        let volumes = Arc::new(vessel_volume::VolumeStore::open(&root.join("volumes"))?);
        let engine = Engine {
            inner: Arc::new(Inner {
                cfg,
                store,
                images: Arc::new(images),
                hv,
                probe,
                initrd,
                blank_upper,
                guest_kernel,
                templates,
                pool,
                registry,
                networks,
                net_services: network::NetServices::default(),
                iface_waiters: Mutex::new(HashMap::new()),
                copies: Mutex::new(HashMap::new()),
                tops: Mutex::new(HashMap::new()),
                guest_stats: Mutex::new(HashMap::new()),
                execs: Mutex::new(HashMap::new()),
                events: Events::default(),
                next_exec: std::sync::atomic::AtomicU32::new(0),
                containers: Mutex::new(HashMap::new()),
                create_lock: tokio::sync::Mutex::new(()),
                volumes,
            }),
        };
        engine.recover().await?;
        engine.refresh_dns().await;
        if let Some(t) = &engine.inner.templates {
            let shape = VmShape {
                memory_mib: engine.inner.cfg.default_memory_mib,
                vcpus: engine.inner.cfg.default_vcpus,
            };
            t.prepare(&shape);
        }
        if let (Accel::Tcg, Some(after)) =
            (engine.inner.probe.accel, engine.inner.cfg.tcg_trim_after)
        {
            tokio::spawn(idle::run(engine.clone(), after));
        }
        Ok(engine)
    }

    /// Ends what only this daemon process uses (warm VMs); containers'
    /// VMs keep running.
    pub fn shutdown(&self) {
        if let Some(pool) = &self.inner.pool {
            pool.clear();
        }
    }

    /// Ends warm VMs of images that are no longer in the store.
    pub fn image_removed(&self) {
        if let Some(pool) = &self.inner.pool {
            let images = self.inner.images.clone();
            pool.retain_images(|id| images.resolve(id).is_ok());
        }
    }

    /// How many warm VMs wait for containers now.
    pub fn warm_vms(&self) -> usize {
        self.inner.pool.as_ref().map_or(0, pool::Pool::len)
    }

    /// The registry client (pull, push, login).
    pub fn registry(&self) -> Arc<vessel_registry::Registry> {
        self.inner.registry.clone()
    }

    /// Ids of the images some container uses.
    pub fn images_in_use(&self) -> std::collections::HashSet<String> {
        self.handles().iter().map(|h| h.rec().image_id).collect()
    }

    /// `docker top`: the processes in the container's VM (`ps -ef` columns).
    pub async fn top(&self, name_or_id: &str, ps_args: &str) -> Result<TopAnswer, EngineError> {
        let h = self.lookup(name_or_id)?;
        // The agent lists the processes itself (there is no `ps` to run in
        // every image): the two column sets users ask for.
        let format = match ps_args.split_whitespace().collect::<Vec<_>>().as_slice() {
            [] | ["-ef"] | ["-e", "-f"] | ["-f", "-e"] | ["-fe"] => vessel_protocol::TopFormat::Ef,
            ["aux"] | ["-aux"] | ["axu"] | ["-ax", "-u"] => vessel_protocol::TopFormat::Aux,
            _ => {
                return Err(EngineError::InvalidParameter(format!(
                    "ps_args {ps_args:?} is not supported: Vessel's top shows the columns of ps -ef or ps aux"
                )))
            }
        };
        let not_running = || EngineError::Conflict(format!("Container {} is not running", h.id));
        let writer = h.live.lock().await.writer.clone().ok_or_else(not_running)?;
        self.ask_agent(
            &writer,
            &self.inner.tops,
            |req_id| HostMsg::Top { req_id, format },
            Duration::from_secs(10),
        )
        .await
        .ok_or_else(not_running)
    }

    /// Sends the request `msg` makes from a fresh request id to an agent and
    /// waits up to `timeout` for the answer that the monitor hands to
    /// `waiters` under that id; `None` when it cannot be sent or no answer
    /// comes.
    pub(crate) async fn ask_agent<T>(
        &self,
        writer: &AgentWriter,
        waiters: &Mutex<HashMap<u32, tokio::sync::oneshot::Sender<T>>>,
        msg: impl FnOnce(u32) -> HostMsg,
        timeout: Duration,
    ) -> Option<T> {
        let req_id = self.inner.next_exec.fetch_add(1, Ordering::SeqCst) + 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(req_id, tx);
        let answer = match writer.send(&msg(req_id)).await {
            Ok(()) => tokio::time::timeout(timeout, rx)
                .await
                .ok()
                .and_then(Result::ok),
            Err(_) => None,
        };
        waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&req_id);
        answer
    }

    /// Changes the process limit inside a running container's VM.
    async fn set_pids_limit(&self, h: &Handle, limit: Option<i64>) -> Result<(), EngineError> {
        let not_running = || EngineError::Conflict(format!("container {} is not running", h.id));
        let writer = h.live.lock().await.writer.clone().ok_or_else(not_running)?;
        let answer = self
            .ask_agent(
                &writer,
                &self.inner.iface_waiters,
                |req_id| HostMsg::SetPidsLimit { req_id, limit },
                Duration::from_secs(10),
            )
            .await;
        match answer {
            Some(None) => Ok(()),
            Some(Some(e)) => Err(internal("setting the PIDs limit in the guest", e)),
            None => Err(internal(
                "setting the PIDs limit in the guest",
                "the agent did not answer",
            )),
        }
    }

    /// What the agent of a running container reports for `docker stats`;
    /// `None` when it is not running or does not answer within a second.
    async fn guest_stats(&self, h: &Handle) -> Option<stats::Guest> {
        let writer = h.live.lock().await.writer.clone()?;
        self.ask_agent(
            &writer,
            &self.inner.guest_stats,
            |req_id| HostMsg::Stats { req_id },
            Duration::from_secs(1),
        )
        .await
    }

    /// The image store.
    pub fn images(&self) -> Arc<ImageStore> {
        self.inner.images.clone()
    }

    /// Facts for `docker info`.
    pub fn facts(&self) -> SystemFacts {
        let recs: Vec<ContainerRecord> = self.handles().iter().map(|h| h.rec()).collect();
        let running = recs.iter().filter(|r| r.running()).count();
        SystemFacts {
            accel: self.inner.probe.accel,
            accel_reason: self.inner.probe.reason.clone(),
            hypervisor: self.inner.hv.describe(),
            guest_kernel: self.inner.guest_kernel.clone(),
            containers: recs.len(),
            running,
            stopped: recs.len() - running,
            images: self.inner.images.list().len(),
            data_root: self.inner.cfg.data_root.clone(),
            default_memory_mib: self.inner.cfg.default_memory_mib,
        }
    }

    /// The event bus.
    pub fn events(&self) -> &Events {
        &self.inner.events
    }

    /// Publishes a container event with Docker's attributes (name, image,
    /// labels) plus `extra`.
    fn container_event(&self, rec: &ContainerRecord, action: &str, extra: &[(&str, String)]) {
        let mut attrs: HashMap<String, String> = rec.config.labels.clone().unwrap_or_default();
        attrs.insert("name".into(), rec.name.clone());
        attrs.insert("image".into(), rec.image.clone());
        for (k, v) in extra {
            attrs.insert((*k).to_string(), v.clone());
        }
        self.inner
            .events
            .emit(EventType::CONTAINER, action, &rec.id, attrs);
    }

    fn handles(&self) -> Vec<Arc<Handle>> {
        self.inner
            .containers
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    fn container_dir(&self, id: &str) -> PathBuf {
        self.inner.cfg.data_root.join("containers").join(id)
    }

    fn run_dir(&self, id: &str) -> PathBuf {
        // Short, so socket paths stay under the 108-byte limit of sun_path.
        self.inner
            .cfg
            .data_root
            .join("vm")
            .join(&id[..12.min(id.len())])
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.container_dir(id).join(format!("{id}-json.log"))
    }

    fn persist(&self, rec: &ContainerRecord) -> Result<(), EngineError> {
        self.inner
            .store
            .put(CONTAINERS, &rec.id, rec)
            .map_err(|e| internal("save container state", e))
    }

    /// Finds a container by id, name or unambiguous id prefix.
    fn lookup(&self, name_or_id: &str) -> Result<Arc<Handle>, EngineError> {
        let map = self
            .inner
            .containers
            .lock()
            .map_err(|e| internal("container table", e))?;
        if let Some(h) = map.get(name_or_id) {
            return Ok(h.clone());
        }
        let bare = name_or_id.strip_prefix('/').unwrap_or(name_or_id);
        if let Some(h) = map.values().find(|h| h.rec().name == bare) {
            return Ok(h.clone());
        }
        let matches: Vec<_> = if name_or_id.is_empty() {
            vec![]
        } else {
            map.values()
                .filter(|h| h.id.starts_with(name_or_id))
                .collect()
        };
        match matches.len() {
            1 => Ok(matches[0].clone()),
            0 => Err(EngineError::NotFound(format!(
                "No such container: {name_or_id}"
            ))),
            _ => Err(EngineError::InvalidParameter(format!(
                "multiple containers found with provided prefix: {name_or_id}"
            ))),
        }
    }

    /// Containers that use image `image_id`, with whether each runs.
    pub fn image_users(&self, image_id: &str) -> Vec<(String, bool)> {
        self.handles()
            .iter()
            .map(|h| h.rec())
            .filter(|r| r.image_id == image_id)
            .map(|r| (r.id.clone(), r.running()))
            .collect()
    }

    /// `docker ps`, with Docker's filters (`status`, `name`, `id`, `label`,
    /// `ancestor`, `exited`, `before`, `since`).
    pub fn list(
        &self,
        all: bool,
        filters: &HashMap<String, Vec<String>>,
    ) -> Result<Vec<ContainerSummary>, EngineError> {
        for key in filters.keys() {
            if ![
                "status", "name", "id", "label", "ancestor", "exited", "before", "since", "health",
                "network", "volume", "publish", "expose",
            ]
            .contains(&key.as_str())
            {
                return Err(EngineError::InvalidParameter(format!(
                    "invalid filter '{key}'"
                )));
            }
        }
        let statuses = [
            "created",
            "restarting",
            "running",
            "removing",
            "paused",
            "exited",
            "dead",
        ];
        for h in filters.get("health").into_iter().flatten() {
            if !["starting", "healthy", "unhealthy", "none"].contains(&h.as_str()) {
                return Err(EngineError::InvalidParameter(format!(
                    "Unrecognised filter value for health: {h}"
                )));
            }
        }
        for key in ["publish", "expose"] {
            for v in filters.get(key).into_iter().flatten() {
                if port_filter(v).is_none() {
                    return Err(EngineError::InvalidParameter(format!(
                        "invalid filter '{key}={v}'"
                    )));
                }
            }
        }
        for st in filters.get("status").into_iter().flatten() {
            if !statuses.contains(&st.as_str()) {
                return Err(EngineError::InvalidParameter(format!(
                    "invalid filter 'status={st}'"
                )));
            }
        }
        let mut recs: Vec<ContainerRecord> = self.handles().iter().map(|h| h.rec()).collect();
        recs.sort_by(|a, b| b.created.cmp(&a.created));
        let created_of =
            |name: &String| -> Result<String, EngineError> { Ok(self.lookup(name)?.rec().created) };
        let before = filters
            .get("before")
            .and_then(|v| v.first())
            .map(created_of)
            .transpose()?;
        let since = filters
            .get("since")
            .and_then(|v| v.first())
            .map(created_of)
            .transpose()?;
        let any = |key: &str, f: &dyn Fn(&str) -> bool| {
            filters.get(key).is_none_or(|vs| vs.iter().any(|v| f(v)))
        };
        let all = all || filters.contains_key("status") || filters.contains_key("exited");
        Ok(recs
            .iter()
            .filter(|r| all || r.running())
            .filter(|r| {
                let state = if r.state.paused && r.running() {
                    "paused"
                } else {
                    r.state.status.as_str()
                };
                any("status", &|v| v == state)
                    // A regular expression against "/<name>", as dockerd
                    // matches it; one that does not compile matches nothing.
                    && any("name", &|v| {
                        regex::Regex::new(v).is_ok_and(|re| re.is_match(&format!("/{}", r.name)))
                    })
                    && any("id", &|v| r.id.starts_with(v))
                    && any("health", &|v| v == r.health_status())
                    && any("exited", &|v| {
                        r.state.status == Status::Exited && v.parse() == Ok(r.state.exit_code)
                    })
                    && any("ancestor", &|v| {
                        r.image == v
                            || r.image_id == v
                            || r.image_id
                                .trim_start_matches("sha256:")
                                .starts_with(v.trim_start_matches("sha256:"))
                            || format!("{}:latest", r.image) == v
                    })
                    && filters.get("label").is_none_or(|vs| {
                        let labels = r.config.labels.clone().unwrap_or_default();
                        vs.iter()
                            .all(|l| filters::label_matches(l, |k| labels.get(k)))
                    })
                    && any("network", &|v| {
                        r.networks
                            .iter()
                            .any(|(name, e)| name == v || e.network_id.starts_with(v))
                    })
                    && any("volume", &|v| {
                        r.mounts
                            .iter()
                            .any(|m| m.name == v || m.destination == v || m.source == v)
                    })
                    && any("publish", &|v| {
                        r.host_config
                            .port_bindings
                            .iter()
                            .flatten()
                            .any(|(port, _)| port_filter_matches(v, port))
                    })
                    && any("expose", &|v| {
                        r.config
                            .exposed_ports
                            .iter()
                            .flatten()
                            .any(|port| port_filter_matches(v, port))
                    })
                    && before.as_ref().is_none_or(|b| r.created < *b)
                    && since.as_ref().is_none_or(|b| r.created > *b)
            })
            .map(|r| r.summary())
            .collect())
    }

    /// `docker rename`.
    pub async fn rename(&self, name_or_id: &str, new_name: &str) -> Result<(), EngineError> {
        let h = self.lookup(name_or_id)?;
        let name = names::validate(new_name).map_err(EngineError::InvalidParameter)?;
        let _guard = self.inner.create_lock.lock().await;
        if let Some(other) = self.lookup_name(&name) {
            if other == h.id {
                return Err(EngineError::InvalidParameter(
                    "Renaming a container with the same name as its current name".into(),
                ));
            }
            return Err(EngineError::Conflict(format!(
                "Conflict. The container name \"/{name}\" is already in use by container \"{other}\". You have to remove (or rename) that container to be able to reuse that name."
            )));
        }
        let old = h.rec().name;
        let rec = h.update(|r| r.name = name.clone());
        self.persist(&rec)?;
        self.container_event(&rec, "rename", &[("oldName", format!("/{old}"))]);
        self.refresh_dns().await;
        Ok(())
    }

    /// `docker update`: the restart policy and the swap limit always;
    /// memory and vCPUs only while the container is not running (they
    /// shape its next VM: a running VM's memory and vCPUs cannot change);
    /// the CPU set of a running VM when its size stays (its threads are
    /// pinned again).
    pub async fn update(
        &self,
        name_or_id: &str,
        body: ContainerUpdateBody,
    ) -> Result<Vec<String>, EngineError> {
        let h = self.lookup(name_or_id)?;
        let _op = h.op.lock().await;
        let rec = h.rec();
        let mut hc = rec.host_config.clone();
        // As dockerd: the request's own values first.
        resources::check_memory_swap(
            body.memory.unwrap_or(0),
            body.memory_swap.unwrap_or(0),
            true,
        )?;
        // As in Docker, zero (or empty) means "leave as it is".
        let mut swap_conflict = false;
        if let Some(m) = body.memory.filter(|m| *m != 0) {
            let swap = hc.memory_swap.unwrap_or(0);
            swap_conflict = swap > 0 && m > swap && body.memory_swap.unwrap_or(0) == 0;
            hc.memory = Some(m);
        }
        if let Some(sw) = body.memory_swap.filter(|s| *s != 0) {
            hc.memory_swap = Some(sw);
        }
        if let Some(n) = body.nano_cpus.filter(|n| *n != 0) {
            hc.nano_cpus = Some(n);
        }
        if let Some(c) = body.cpuset_cpus.clone().filter(|c| !c.is_empty()) {
            hc.cpuset_cpus = Some(c);
        }
        // As dockerd: 0 leaves the limit, -1 (any value ≤ 0) removes it.
        let pids_changed = body.pids_limit.filter(|p| *p != 0);
        if let Some(p) = pids_changed {
            hc.pids_limit = Some(if p < 0 { 0 } else { p });
        }
        // What a VM cannot honour is refused, not ignored.
        let unsupported = [
            ("--cpu-shares", body.cpu_shares.is_some_and(|v| v != 0)),
            ("--cpu-period", body.cpu_period.is_some_and(|v| v != 0)),
            ("--cpu-quota", body.cpu_quota.is_some_and(|v| v != 0)),
            (
                "--cpu-rt-period",
                body.cpu_realtime_period.is_some_and(|v| v != 0),
            ),
            (
                "--cpu-rt-runtime",
                body.cpu_realtime_runtime.is_some_and(|v| v != 0),
            ),
            (
                "--cpuset-mems",
                body.cpuset_mems.as_ref().is_some_and(|v| !v.is_empty()),
            ),
            ("--blkio-weight", body.blkio_weight.is_some_and(|v| v != 0)),
            (
                "--memory-reservation",
                body.memory_reservation.is_some_and(|v| v != 0),
            ),
        ];
        if let Some((flag, _)) = unsupported.iter().find(|(_, set)| *set) {
            return Err(EngineError::InvalidParameter(format!(
                "{flag} cannot be updated on Vessel: a container is a VM with its own vCPUs, memory and disks (use --cpus, --cpuset-cpus or --memory)"
            )));
        }
        let shape = self.shape(&hc, true)?;
        // dockerd checks the values first (400), then what they would
        // change (409).
        if swap_conflict {
            return Err(EngineError::Conflict(format!(
                "Cannot update container {}: Memory limit should be smaller than already set memoryswap limit, update the memoryswap at the same time",
                rec.id
            )));
        }
        resources::check_memory_swap(hc.memory.unwrap_or(0), hc.memory_swap.unwrap_or(0), true)?;
        let reshaped = shape.memory_mib != rec.vm.memory_mib || shape.vcpus != rec.vm.vcpus;
        if reshaped && rec.running() {
            return Err(EngineError::InvalidParameter(format!(
                "cannot change the memory or CPUs of running container {}: its VM has {} MiB and {} vCPUs; stop it, update it, and start it again",
                rec.id, rec.vm.memory_mib, rec.vm.vcpus
            )));
        }
        if rec.running() && pids_changed.is_some() {
            self.set_pids_limit(&h, hc.pids_limit).await?;
        }
        if rec.running() && hc.cpuset_cpus != rec.host_config.cpuset_cpus {
            if let (Some(pid), Some(cpus)) = (rec.state.pid, cpuset_of(&hc)?) {
                vessel_vm::pin(pid, &cpus).map_err(|e| internal("pinning the VM's threads", e))?;
            }
        }
        if let Some(rp) = body.restart_policy.clone() {
            if rp.maximum_retry_count.unwrap_or(0) < 0 {
                return Err(EngineError::InvalidParameter(
                    "invalid restart policy: maximum retry count cannot be negative".into(),
                ));
            }
            if rec.host_config.auto_remove == Some(true)
                && rp
                    .name
                    .as_ref()
                    .is_some_and(|n| !["", "no"].contains(&n.to_string().as_str()))
            {
                return Err(EngineError::InvalidParameter(
                    "Restart policy cannot be updated because AutoRemove is enabled for the container".into(),
                ));
            }
            hc.restart_policy = Some(rp);
        }
        let rec = h.update(|r| {
            r.host_config = hc;
            r.vm = shape;
        });
        self.persist(&rec)?;
        self.container_event(&rec, "update", &[]);
        Ok(vec![])
    }

    /// `docker container prune`: removes the containers that are not
    /// running and pass `filters`; returns their ids and the bytes their
    /// writable layers took on the host.
    pub async fn prune(&self, filters: &ContainerPruneFilters) -> (Vec<String>, u64) {
        let mut removed = vec![];
        let mut space = 0u64;
        for h in self.handles() {
            let rec = h.rec();
            if rec.running() || !filters.matches(&rec) {
                continue;
            }
            let upper = self.container_dir(&rec.id).join("upper.qcow2");
            let size = std::fs::metadata(&upper)
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .unwrap_or(0);
            if self.remove(&h.id, false).await.is_ok() {
                removed.push(h.id.clone());
                space += size;
            }
        }
        (removed, space)
    }

    /// Sends one argument-less QMP command to the container's VM and
    /// returns QEMU's answer.
    async fn qmp(&self, id: &str, command: &'static str) -> Result<serde_json::Value, EngineError> {
        let sock = self.run_dir(id).join(vessel_vm::qemu::QMP_SOCKET);
        blocking(move || {
            let mut q = vessel_vm::qmp::Qmp::connect(&sock, Duration::from_secs(5))?;
            q.execute(command, serde_json::json!({}))
        })
        .await?
        .map_err(|e| internal(command, e))
    }

    /// The VM's run state as QMP `query-status` names it ("running",
    /// "paused", "debug", ...).
    async fn vm_status(&self, id: &str) -> Result<String, EngineError> {
        let v = self.qmp(id, "query-status").await?;
        v.get("status")
            .and_then(|s| s.as_str())
            .map(str::to_string)
            .ok_or_else(|| internal("query-status", format!("no status in {v}")))
    }

    /// `docker pause`: freezes the whole VM.
    pub async fn pause(&self, name_or_id: &str) -> Result<(), EngineError> {
        let h = self.lookup(name_or_id)?;
        let _op = h.op.lock().await;
        let rec = h.rec();
        if !rec.running() {
            return Err(EngineError::Conflict(format!(
                "Container {} is not running",
                rec.id
            )));
        }
        if rec.state.paused {
            return Err(EngineError::Conflict(format!(
                "Container {} is already paused",
                rec.id
            )));
        }
        let rec = h.update(|r| r.state.paused = true);
        self.persist(&rec)?;
        if let Err(e) = self.qmp(&rec.id, "stop").await {
            let rec = h.update(|r| r.state.paused = false);
            self.persist(&rec)?;
            return Err(e);
        }
        self.container_event(&rec, "pause", &[]);
        Ok(())
    }

    /// `docker unpause`.
    pub async fn unpause(&self, name_or_id: &str) -> Result<(), EngineError> {
        let h = self.lookup(name_or_id)?;
        let _op = h.op.lock().await;
        let rec = h.rec();
        if !rec.running() || !rec.state.paused {
            return Err(EngineError::Conflict(format!(
                "Container {} is not paused",
                rec.id
            )));
        }
        self.qmp(&rec.id, "cont").await?;
        let rec = h.update(|r| r.state.paused = false);
        self.container_event(&rec, "unpause", &[]);
        self.persist(&rec)
    }

    fn start_health_checks(&self, h: &Arc<Handle>, rec: &ContainerRecord) {
        if let Some(cfg) = rec.config.healthcheck.clone() {
            if let Some(cmd) = health::command(&cfg) {
                tokio::spawn(health::run(self.clone(), h.clone(), cfg, cmd));
            }
        }
    }

    /// Records a new health state (and emits `health_status` when it changes).
    fn set_health(&self, h: &Handle, health: bollard_stubs::models::Health) {
        let before = h.rec().health_status();
        let rec = h.update(|r| r.state.health = Some(health));
        if let Err(e) = self.persist(&rec) {
            warn!(id = %h.id, "saving health: {e}");
        }
        let after = rec.health_status();
        if before != after {
            self.container_event(&rec, &format!("health_status: {after}"), &[]);
        }
    }

    /// Drops an internal exec (a health check's) once it is done.
    fn forget_exec(&self, id: &str) {
        if let Ok(mut m) = self.inner.execs.lock() {
            m.remove(id);
        }
    }

    /// Starts a container again because its restart policy says so. Boxed:
    /// it runs from the monitor that `start` spawns, a cycle the compiler
    /// cannot see through otherwise.
    fn restart_by_policy(
        &self,
        id: String,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let engine = self.clone();
        Box::pin(async move { engine.restart_by_policy_inner(&id).await })
    }

    async fn restart_by_policy_inner(&self, id: &str) {
        let Ok(h) = self.lookup(id) else { return };
        let rec = h.rec();
        if rec.running()
            || rec.manually_stopped
            || !matches!(rec.state.status, Status::Exited | Status::Created)
        {
            return;
        }
        let rec = h.update(|r| r.restart_count += 1);
        if let Err(e) = self.persist(&rec) {
            warn!(%id, "restart policy: {e}");
            return;
        }
        info!(%id, restart_count = rec.restart_count, "restarting by policy");
        let start: std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(), EngineError>> + Send + '_>,
        > = Box::pin(self.start_as(id, false));
        if let Err(e) = start.await {
            warn!(%id, "restart by policy failed: {e}");
        }
    }

    /// `docker stats`: one document per `interval` (the first compares with
    /// a sample taken `interval` earlier), until the container stops or the
    /// receiver goes away; a single document when `stream` is false.
    pub fn stats(
        &self,
        name_or_id: &str,
        stream: bool,
    ) -> Result<
        tokio::sync::mpsc::Receiver<bollard_stubs::models::ContainerStatsResponse>,
        EngineError,
    > {
        let h = self.lookup(name_or_id)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let engine = self.clone();
        tokio::spawn(async move {
            let interval = Duration::from_secs(1);
            let mut pre = stats::Sample::default();
            let mut first = true;
            loop {
                let rec = h.rec();
                let mut now = match rec.state.pid.filter(|_| rec.running()) {
                    Some(pid) => stats::sample(pid),
                    None => stats::Sample {
                        read: now_rfc3339(),
                        ..Default::default()
                    },
                };
                if first && rec.running() {
                    first = false;
                    pre = now;
                    tokio::time::sleep(interval).await;
                    continue;
                }
                if rec.running() {
                    now.networks = stats::networks(&rec);
                    // A paused VM cannot answer.
                    if !rec.state.paused {
                        now.guest = engine.guest_stats(&h).await;
                    }
                }
                let doc = stats::document(&rec, &pre, &now);
                if tx.send(doc).await.is_err() || !stream || !rec.running() {
                    return;
                }
                pre = now;
                tokio::time::sleep(interval).await;
            }
        });
        Ok(rx)
    }

    /// Thaws a paused VM before it is signalled or killed.
    async fn thaw(&self, h: &Handle) {
        if h.rec().state.paused {
            if let Err(e) = self.qmp(&h.id, "cont").await {
                warn!(id = %h.id, "unpausing before stop: {e}");
            }
            let rec = h.update(|r| r.state.paused = false);
            let _ = self.persist(&rec);
        }
    }

    /// `docker inspect`.
    pub fn inspect(&self, name_or_id: &str) -> Result<ContainerInspectResponse, EngineError> {
        let rec = self.lookup(name_or_id)?.rec();
        let log = self.log_path(&rec.id).display().to_string();
        Ok(rec.inspect(log, String::new()))
    }

    /// The record of a container (tests and the API use it for details).
    pub fn record(&self, name_or_id: &str) -> Result<ContainerRecord, EngineError> {
        Ok(self.lookup(name_or_id)?.rec())
    }

    /// `POST /containers/create`: returns the new id.
    pub async fn create(
        &self,
        name: Option<&str>,
        body: ContainerCreateBody,
    ) -> Result<String, EngineError> {
        let created_at = std::time::Instant::now();
        let image_name = body
            .image
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                EngineError::InvalidParameter(
                    "config.Image: image is required to create a container".into(),
                )
            })?;
        let images = self.inner.images.clone();
        let lookup_name = image_name.clone();
        let image = blocking(move || images.resolve(&lookup_name)).await??;
        if let Some(sig) = body.stop_signal.as_deref().filter(|s| !s.is_empty()) {
            if signal::parse(sig).is_none() {
                return Err(EngineError::InvalidParameter(format!(
                    "Invalid signal: {sig}"
                )));
            }
        }
        let host_config = body.host_config.clone().unwrap_or_default();
        for link in host_config.links.iter().flatten() {
            let (target, _) = parse_link(link);
            if self.lookup(target).is_err() {
                return Err(EngineError::InvalidParameter(format!(
                    "Could not get container for {target}"
                )));
            }
        }
        log_driver(&host_config)?;
        network::check_extra_hosts(&host_config)?;
        for path in host_config.tmpfs.iter().flat_map(|t| t.keys()) {
            if !path.starts_with('/') {
                return Err(EngineError::InvalidParameter(format!(
                    "invalid mount config for type \"tmpfs\": invalid mount path: '{path}' mount path must be absolute"
                )));
            }
        }
        let shape = self.shape(&host_config, false)?;
        privileges::restrictions(&host_config)?;
        let mut host_config = host_config;
        // As dockerd: a memory limit alone allows as much swap again. The
        // VM has no swap either way (see docs/architecture.md).
        if let (Some(m), None | Some(0)) = (host_config.memory, host_config.memory_swap) {
            if m > 0 {
                host_config.memory_swap = Some(m * 2);
            }
        }
        if matches!(
            host_config.network_mode.as_deref(),
            None | Some("") | Some("default")
        ) {
            host_config.network_mode = Some("bridge".into());
        }
        let endpoints = network::endpoints_for_create(
            &self.inner.networks,
            host_config.network_mode.as_deref(),
            body.networking_config
                .as_ref()
                .and_then(|n| n.endpoints_config.as_ref()),
            None,
        )?;
        let config = merge_config(&body, &image.config, &image_name);
        if !network::port_requests(&config, &host_config)?.is_empty() && endpoints.is_empty() {
            return Err(EngineError::InvalidParameter(
                "conflicting options: port publishing and the container type network mode".into(),
            ));
        }
        let mut argv = config.entrypoint.clone().unwrap_or_default();
        argv.extend(config.cmd.clone().unwrap_or_default());
        if argv.is_empty() {
            return Err(EngineError::InvalidParameter("no command specified".into()));
        }
        if let Some(rp) = &host_config.restart_policy {
            let name = rp.name.as_ref().map(|n| n.to_string()).unwrap_or_default();
            let max = rp.maximum_retry_count.unwrap_or(0);
            if !["", "no"].contains(&name.as_str()) && host_config.auto_remove == Some(true) {
                return Err(EngineError::InvalidParameter(
                    "can't create 'AutoRemove' container with restart policy".into(),
                ));
            }
            if max < 0 {
                return Err(EngineError::InvalidParameter(
                    "invalid restart policy: maximum retry count cannot be negative".into(),
                ));
            }
            if max > 0 && name != "on-failure" {
                return Err(EngineError::InvalidParameter(
                    "invalid restart policy: maximum retry count can only be used with 'on-failure'".into(),
                ));
            }
        }
        let _guard = self.inner.create_lock.lock().await;
        let name = match name.filter(|n| !n.is_empty()) {
            Some(n) => names::validate(n).map_err(EngineError::InvalidParameter)?,
            None => loop {
                let n = names::random();
                if self.lookup_name(&n).is_none() {
                    break n;
                }
            },
        };
        if let Some(other) = self.lookup_name(&name) {
            return Err(EngineError::Conflict(format!(
                "Conflict. The container name \"/{name}\" is already in use by container \"{other}\". You have to remove (or rename) that container to be able to reuse that name."
            )));
        }
        let mut idb = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut idb);
        let id = hex::encode(idb);
        let mut config = config;
        let (mounts, made_volumes) = self
            .plan_mounts(&host_config, &image.config.volumes, &mut config)
            .await?;
        if config.hostname.as_deref().unwrap_or("").is_empty() {
            config.hostname = Some(id[..12].to_string());
        }
        let rec = ContainerRecord {
            id: id.clone(),
            name,
            created: now_rfc3339(),
            image: image_name,
            image_id: image.id.clone(),
            path: argv[0].clone(),
            args: argv[1..].to_vec(),
            config,
            host_config,
            state: StateRecord {
                status: Status::Created,
                pid: None,
                exit_code: 0,
                error: String::new(),
                oom_killed: false,
                started_at: None,
                finished_at: None,
                paused: false,
                health: None,
            },
            vm: shape,
            restart_count: 0,
            manually_stopped: false,
            fresh_upper: true,
            vm_name: None,
            networks: endpoints,
            taps: vec![],
            published: vec![],
            mounts,
        };
        let dir = self.container_dir(&id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| internal(&format!("create {}", dir.display()), e))?;
        let upper = dir.join("upper.qcow2");
        let blank = self.inner.blank_upper.clone();
        let made = blocking(move || make_upper(&blank, &upper)).await?;
        if let Err(e) = made.and_then(|_| self.persist(&rec)) {
            let _ = std::fs::remove_dir_all(&dir);
            self.drop_volumes(&made_volumes).await;
            return Err(e);
        }
        info!(id = %id, name = %rec.name, image = %rec.image, create_ms = created_at.elapsed().as_millis() as u64, "container created");
        self.container_event(&rec, "create", &[]);
        self.inner
            .containers
            .lock()
            .map_err(|e| internal("container table", e))?
            .insert(id.clone(), Handle::new(rec));
        Ok(id)
    }

    fn lookup_name(&self, name: &str) -> Option<String> {
        self.handles()
            .iter()
            .map(|h| h.rec())
            .find(|r| r.name == name)
            .map(|r| r.id)
    }

    /// The VM a container's resource flags ask for, checked in dockerd's
    /// order: memory, swap, CPUs, CPU set. `update` leaves the swap limit
    /// to the caller, which checks it in dockerd's order for an update.
    fn shape(&self, hc: &HostConfig, update: bool) -> Result<VmShape, EngineError> {
        let memory = hc.memory.unwrap_or(0);
        if memory < 0 {
            return Err(EngineError::InvalidParameter(
                "invalid memory limit: must be positive".into(),
            ));
        }
        let memory_mib = if memory == 0 {
            self.inner.cfg.default_memory_mib
        } else {
            (memory as u64).div_ceil(1024 * 1024)
        };
        if memory_mib < MIN_MEMORY_MIB {
            return Err(EngineError::InvalidParameter(format!(
                "Minimum memory limit allowed is {MIN_MEMORY_MIB}MB: a container is a VM whose kernel needs it"
            )));
        }
        if !update {
            resources::check_memory_swap(memory, hc.memory_swap.unwrap_or(0), false)?;
        }
        let host_cpus = std::thread::available_parallelism()
            .map(|n| n.get() as i64)
            .unwrap_or(1);
        let nano = hc.nano_cpus.unwrap_or(0);
        if nano < 0 || nano > host_cpus * 1_000_000_000 {
            return Err(EngineError::InvalidParameter(format!(
                "Range of CPUs is from 0.01 to {host_cpus}.00, as there are only {host_cpus} CPUs available"
            )));
        }
        let cpuset = cpuset_of(hc)?;
        Ok(VmShape {
            memory_mib,
            vcpus: resources::vcpus(nano, cpuset.as_deref(), self.inner.cfg.default_vcpus),
        })
    }

    /// `POST /containers/{id}/start`.
    pub async fn start(&self, name_or_id: &str) -> Result<(), EngineError> {
        self.start_as(name_or_id, true).await
    }

    /// Starts a container for the user, or (`by_user` false) for its
    /// restart policy, which gives way to a stop the user made meanwhile.
    async fn start_as(&self, name_or_id: &str, by_user: bool) -> Result<(), EngineError> {
        let h = self.lookup(name_or_id)?;
        if by_user && h.rec().manually_stopped {
            let rec = h.update(|r| r.manually_stopped = false);
            self.persist(&rec)?;
        }
        let result = {
            let _op = h.op.lock().await;
            if !by_user && h.rec().manually_stopped {
                return Ok(());
            }
            self.start_locked(&h).await
        };
        match result {
            Err(EngineError::NotModified) => Err(EngineError::NotModified),
            Err(e) => {
                let rec = h.update(|r| {
                    if r.state.error.is_empty() {
                        r.state.error = e.to_string();
                    }
                    network::release(r);
                });
                self.unpublish_ports(&rec.id);
                let _ = self.persist(&rec);
                volumes::remove_run_dir(&self.run_dir(&rec.id));
                // Docker removes an auto-remove container whose start failed;
                // `docker run --rm` waits for that removal.
                if rec.host_config.auto_remove == Some(true) {
                    let _ = self.remove_with_volumes(&rec.id, true, true).await;
                }
                Err(e)
            }
            Ok(()) => Ok(()),
        }
    }

    async fn start_locked(&self, h: &Arc<Handle>) -> Result<(), EngineError> {
        let rec = h.rec();
        match rec.state.status {
            Status::Running => return Err(EngineError::NotModified),
            Status::Removing | Status::Dead => {
                return Err(EngineError::Conflict(format!(
                    "container {} is marked for removal and cannot be started",
                    rec.id
                )))
            }
            _ => {}
        }
        let started = std::time::Instant::now();
        let images = self.inner.images.clone();
        let image_id = rec.image_id.clone();
        let image_disk = blocking(move || images.boot_disk(&image_id)).await??;
        let t_disk = started.elapsed();
        let run_dir = self.run_dir(&rec.id);
        volumes::remove_run_dir(&run_dir);
        let upper_disk = self.container_dir(&rec.id).join("upper.qcow2");
        let warm = match &self.inner.pool {
            Some(pool) if rec.fresh_upper => pool
                .take_or_wait(&pool::key(&rec.image_id, &rec.vm), Duration::from_secs(3))
                .await
                .and_then(|vm| match pool::adopt(&vm, &upper_disk, &run_dir) {
                    Ok(()) => Some(vm),
                    Err(e) => {
                        warn!(id = %rec.id, "taking a warm VM failed ({e}); starting another");
                        vessel_vm::kill_vm(vm.pid, &vm.name);
                        None
                    }
                }),
            _ => None,
        };
        let (pid, t_spawn, mut reader, writer, state, boot_kind, vm_name, taps) = match warm {
            Some(vm) => {
                if let Err(e) = vessel_vm::set_foreground(vm.pid) {
                    warn!(id = %rec.id, "raising the warm VM's CPU priority: {e}");
                }
                // The next container of this image finds a VM ready.
                self.refill_warm(&rec.image_id, &rec.vm);
                let idle = GuestMsg::State {
                    kernel_release: String::new(),
                    process: ProcessState::Idle,
                };
                (
                    vm.pid,
                    Duration::ZERO,
                    vm.reader,
                    vm.writer,
                    idle,
                    "warm",
                    Some(vm.name),
                    vm.taps,
                )
            }
            None => {
                let mut spec = self.vm_spec(
                    rec.id.clone(),
                    run_dir.clone(),
                    image_disk,
                    upper_disk,
                    &rec.vm,
                );
                let cloned = matches!(spec.boot, Boot::Clone { .. });
                let launched = match self.launch(&spec).await {
                    Err(e) if cloned => {
                        warn!(id = %rec.id, "restoring the VM template failed ({e}); booting the kernel instead");
                        if let Some(t) = &self.inner.templates {
                            t.invalidate(&rec.vm);
                        }
                        spec.boot = Boot::Cold;
                        self.launch(&spec).await
                    }
                    other => other,
                };
                let (pid, t_spawn, reader, writer, state) = launched?;
                let kind = if matches!(spec.boot, Boot::Clone { .. }) {
                    "clone"
                } else {
                    "cold"
                };
                (
                    pid,
                    t_spawn,
                    reader,
                    writer,
                    state,
                    kind,
                    None,
                    spec.taps.clone(),
                )
            }
        };
        h.killed.store(false, Ordering::SeqCst);
        let rec = h.update(|r| {
            r.fresh_upper = false;
            r.vm_name = vm_name;
            r.taps = taps;
        });
        self.persist(&rec)?;
        let vm_name = rec.vm_name().to_string();
        // `--cpuset-cpus`: every thread of the VM on those host CPUs.
        if let Err(e) = cpuset_of(&rec.host_config).and_then(|set| match set {
            Some(cpus) => {
                vessel_vm::pin(pid, &cpus).map_err(|e| internal("pinning the VM's threads", e))
            }
            None => Ok(()),
        }) {
            vessel_vm::kill_vm(pid, &vm_name);
            return Err(e);
        }
        if let Err(e) = self.join_networks(h) {
            vessel_vm::kill_vm(pid, &vm_name);
            return Err(e);
        }
        if let Err(e) = self.publish_ports(h).await {
            vessel_vm::kill_vm(pid, &vm_name);
            return Err(e);
        }
        let rec = h.rec();
        let t_spawn = t_spawn + t_disk;
        let fail = |msg: String| {
            vessel_vm::kill_vm(pid, &vm_name);
            EngineError::Internal(msg)
        };
        let t_boot = started.elapsed();
        let t_spawned = t_spawn.saturating_sub(t_disk);
        if !matches!(
            state,
            GuestMsg::State {
                process: ProcessState::Idle,
                ..
            }
        ) {
            return Err(fail(format!("fresh VM's agent is not idle: {state:?}")));
        }
        let tty_size = h.live.lock().await.tty_size;
        let mut spec = match self.process_spec(&rec, tty_size) {
            Ok(s) => s,
            Err(e) => {
                vessel_vm::kill_vm(pid, &vm_name);
                return Err(e);
            }
        };
        let seal = match self.share_mounts(&rec, &run_dir, &mut spec).await {
            Ok(seal) => seal,
            Err(e) => {
                vessel_vm::kill_vm(pid, &vm_name);
                return Err(e);
            }
        };
        writer
            .send(&HostMsg::Start(Box::new(spec)))
            .await
            .map_err(|e| fail(e.to_string()))?;
        loop {
            match reader.next().await {
                Ok(Some(Incoming::Msg(GuestMsg::Started { .. }))) => {
                    self.seal_mounts(&rec.id, seal)
                        .await
                        .map_err(|e| fail(e.to_string()))?;
                    break;
                }
                Ok(Some(Incoming::Msg(GuestMsg::StartFailed { message, exit_code }))) => {
                    vessel_vm::kill_vm(pid, &vm_name);
                    let rec = h.update(|r| {
                        r.state.exit_code = i64::from(exit_code);
                        r.state.error = message.clone();
                    });
                    let _ = self.persist(&rec);
                    return Err(EngineError::InvalidParameter(format!(
                        "failed to create task for container: {message}: unknown"
                    )));
                }
                Ok(Some(Incoming::Msg(GuestMsg::Error { message }))) => {
                    return Err(fail(format!("guest agent: {message}")));
                }
                Ok(Some(other)) => {
                    warn!(id = %rec.id, "unexpected message before start: {other:?}")
                }
                Ok(None) => return Err(fail("the VM stopped while starting the process".into())),
                Err(e) => return Err(fail(e.to_string())),
            }
        }
        let rec = h.update(|r| {
            r.state = StateRecord {
                status: Status::Running,
                pid: Some(pid),
                exit_code: 0,
                error: String::new(),
                oom_killed: false,
                started_at: Some(now_rfc3339()),
                finished_at: r.state.finished_at.clone(),
                paused: false,
                health: None,
            };
        });
        self.persist(&rec)?;
        self.go_live(h, writer).await;
        h.status.send_modify(|w| w.running = true);
        info!(
            id = %rec.id,
            disk_ms = t_disk.as_millis() as u64,
            spawn_ms = t_spawned.as_millis() as u64,
            boot_ms = (t_boot - t_spawn).as_millis() as u64,
            boot = boot_kind,
            exec_ms = (started.elapsed() - t_boot).as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "container started"
        );
        self.container_event(&rec, "start", &[]);
        self.refresh_dns().await;
        if boot_kind != "warm" {
            self.refill_warm(&rec.image_id, &rec.vm);
        }
        self.start_health_checks(h, &rec);
        tokio::spawn(self.clone().monitor(h.clone(), reader, pid, None));
        Ok(())
    }

    /// A container VM's spec: the daemon's kernel and initramfs, and a clone
    /// of the shape's template when it is ready (else a cold boot).
    fn vm_spec(
        &self,
        name: String,
        run_dir: PathBuf,
        image_disk: PathBuf,
        upper_disk: PathBuf,
        shape: &VmShape,
    ) -> VmSpec {
        VmSpec {
            name,
            kernel: self.inner.cfg.kernel.clone(),
            initrd: self.inner.initrd.clone(),
            image_disk,
            upper_disk,
            memory_mib: shape.memory_mib,
            vcpus: shape.vcpus,
            boot: match &self.inner.templates {
                Some(t) => t.boot_for(shape),
                None => Boot::Cold,
            },
            background: false,
            taps: vessel_vm::tap_names(&run_dir),
            tap_owner: self.inner.cfg.network.bridge_name.clone(),
            run_dir,
        }
    }

    /// Starts a VM and connects to its agent: the VM's pid, the time the
    /// spawn took, the channel and the agent's first state.
    async fn launch(
        &self,
        spec: &VmSpec,
    ) -> Result<(u32, Duration, AgentReader, AgentWriter, GuestMsg), EngineError> {
        let started = std::time::Instant::now();
        let hv = self.inner.hv.clone();
        let s = spec.clone();
        let vm = blocking(move || hv.spawn(&s))
            .await?
            .map_err(|e| internal("start VM", e))?;
        let t_spawn = started.elapsed();
        let pid = vm.pid;
        tokio::spawn(vessel_vm::wait_exit(pid));
        // A restored VM answers at once; a cold boot takes seconds under TCG.
        let timeout = if matches!(spec.boot, Boot::Clone { .. }) {
            15
        } else {
            120
        };
        match connect(
            &Transport::VirtioSerial(vm.control_socket),
            Duration::from_secs(timeout),
        )
        .await
        {
            Ok((reader, writer, state)) => Ok((pid, t_spawn, reader, writer, state)),
            Err(e) => {
                vessel_vm::kill_vm(pid, &spec.name);
                Err(EngineError::Internal(format!("VM did not come up: {e}")))
            }
        }
    }

    async fn go_live(&self, h: &Handle, writer: AgentWriter) {
        let mut live = h.live.lock().await;
        if !live.pending_stdin.is_empty() {
            let data = std::mem::take(&mut live.pending_stdin);
            let _ = writer.send_stdin(&data).await;
        }
        if live.stdin_closed {
            let _ = writer.send(&HostMsg::CloseStdin).await;
        }
        live.writer = Some(writer);
    }

    /// `/etc/hosts` lines for legacy links (`--link name:alias`): the linked
    /// container's address with the alias, its name and its short id. With
    /// `strict`, a link to a container that is missing or not running is
    /// dockerd's error; otherwise it is left out.
    pub(crate) fn link_hosts(
        &self,
        rec: &ContainerRecord,
        strict: bool,
    ) -> Result<Vec<String>, EngineError> {
        let mut out = vec![];
        for link in rec.host_config.links.iter().flatten() {
            let (name, alias) = parse_link(link);
            let target = match self.lookup(name) {
                Ok(t) => t.rec(),
                Err(_) if !strict => continue,
                Err(_) => {
                    return Err(EngineError::InvalidParameter(format!(
                        "Could not get container for {name}"
                    )))
                }
            };
            // Its address on a network the two share, else its first one.
            let ip = rec
                .networks
                .values()
                .filter_map(|e| {
                    target
                        .networks
                        .values()
                        .find(|t| t.network_id == e.network_id)
                })
                .chain(target.networks.values())
                .find_map(|e| e.ip.clone());
            match ip {
                Some(ip) if target.running() => {
                    let mut names = vec![alias.to_string()];
                    for n in [target.name.clone(), target.id[..12].to_string()] {
                        if !names.contains(&n) {
                            names.push(n);
                        }
                    }
                    out.push(format!("{ip}\t{}", names.join(" ")));
                }
                _ if !strict => {}
                _ => {
                    return Err(EngineError::InvalidParameter(format!(
                        "Cannot link to a non running container: /{} AS /{}/{alias}",
                        target.name, rec.name
                    )))
                }
            }
        }
        Ok(out)
    }

    fn process_spec(
        &self,
        rec: &ContainerRecord,
        tty_size: Option<(u16, u16)>,
    ) -> Result<ProcessSpec, EngineError> {
        let c = &rec.config;
        let mut args = vec![rec.path.clone()];
        args.extend(rec.args.iter().cloned());
        Ok(ProcessSpec {
            args,
            env: c.env.clone().unwrap_or_default(),
            cwd: c
                .working_dir
                .clone()
                .filter(|w| !w.is_empty())
                .unwrap_or_else(|| "/".into()),
            user: c.user.clone().unwrap_or_default(),
            hostname: c.hostname.clone().unwrap_or_default(),
            tty: c.tty.unwrap_or(false),
            open_stdin: c.open_stdin.unwrap_or(false),
            tty_size: tty_size.or_else(|| {
                rec.host_config
                    .console_size
                    .as_ref()
                    .filter(|s| s.len() == 2 && s[0] > 0 && s[1] > 0)
                    .map(|s| (s[0] as u16, s[1] as u16))
            }),
            rootfs: RootfsSpec::default(),
            entropy: {
                let mut b = [0u8; 64];
                rand::Rng::fill(&mut rand::rng(), &mut b);
                hex::encode(b)
            },
            clock_unix_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
            extra_hosts: {
                let mut lines = network::hosts_lines(rec, self.host_gateway());
                lines.extend(self.link_hosts(rec, true)?);
                lines
            },
            interfaces: network::interfaces(rec),
            resolv_conf: network::resolv_conf(rec),
            read_only: rec.host_config.readonly_rootfs.unwrap_or(false),
            tmpfs: sorted_pairs(rec.host_config.tmpfs.as_ref()),
            sysctls: sorted_pairs(rec.host_config.sysctls.as_ref()),
            mounts: vec![],
            restrictions: privileges::restrictions(&rec.host_config)?,
        })
    }

    /// Follows a running container's agent until its process ends or its VM dies.
    /// `exited` carries an exit the agent reported before a daemon restart.
    async fn monitor(
        self,
        h: Arc<Handle>,
        mut reader: AgentReader,
        pid: u32,
        exited: Option<(i32, bool)>,
    ) {
        let id = h.id.clone();
        let name = h.rec().vm_name().to_string();
        let run_started = std::time::Instant::now();
        let rec = h.rec();
        let mut log = match log_driver(&rec.host_config).and_then(|r| Ok((r, log_attrs(&rec)?))) {
            Ok((Some(rotation), attrs)) => {
                match logs::LogWriter::open(&self.log_path(&id), rotation, attrs) {
                    Ok(l) => Some(l),
                    Err(e) => {
                        warn!(%id, "cannot open log file: {e}");
                        None
                    }
                }
            }
            Ok((None, _)) => None,
            Err(e) => {
                warn!(%id, "log options: {e}");
                None
            }
        };
        // Output the agent replayed before reporting an earlier exit.
        while exited.is_some() && reader.queued() > 0 {
            match reader.next().await {
                Ok(Some(Incoming::Stdout(d))) => self.output(&h, &mut log, false, d),
                Ok(Some(Incoming::Stderr(d))) => self.output(&h, &mut log, true, d),
                _ => break,
            }
        }
        reader.ack_handled().await;
        let mut exit: Option<(i32, bool)> = exited;
        while exit.is_none() {
            match reader.next().await {
                Ok(Some(Incoming::Stdout(d))) => self.output(&h, &mut log, false, d),
                Ok(Some(Incoming::Stderr(d))) => self.output(&h, &mut log, true, d),
                Ok(Some(Incoming::Msg(GuestMsg::Exited {
                    exit_code,
                    oom_killed,
                }))) => {
                    exit = Some((exit_code, oom_killed));
                }
                Ok(Some(Incoming::ExecStdout { exec_id, data })) => {
                    if let Some(e) = self.exec_by_num(&id, exec_id) {
                        let _ = e.output.send(Output::Stdout(Bytes::from(data)));
                    } else {
                        self.copy_event(exec_id, copy::CopyEvent::Data(data));
                    }
                }
                Ok(Some(Incoming::ExecStderr { exec_id, data })) => {
                    if let Some(e) = self.exec_by_num(&id, exec_id) {
                        let _ = e.output.send(Output::Stderr(Bytes::from(data)));
                    }
                }
                Ok(Some(Incoming::Msg(GuestMsg::ExecStarted { exec_id, pid }))) => {
                    if let Some(e) = self.exec_by_num(&id, exec_id) {
                        let mut g = e.lock();
                        g.state = ExecState::Running;
                        g.pid = Some(pid);
                        if let Some(tx) = g.started.take() {
                            let _ = tx.send(Ok(()));
                        }
                    }
                }
                Ok(Some(Incoming::Msg(GuestMsg::ExecFailed {
                    exec_id,
                    message,
                    exit_code,
                }))) => {
                    if let Some(e) = self.exec_by_num(&id, exec_id) {
                        e.finish(i64::from(exit_code), Some(message));
                        self.exec_event(&e, "exec_die", false, Some(i64::from(exit_code)));
                    }
                }
                Ok(Some(Incoming::Msg(GuestMsg::ExecExited { exec_id, exit_code }))) => {
                    if let Some(e) = self.exec_by_num(&id, exec_id) {
                        e.finish(i64::from(exit_code), None);
                        self.exec_event(&e, "exec_die", false, Some(i64::from(exit_code)));
                    }
                }
                Ok(Some(Incoming::Msg(GuestMsg::Error { message }))) => {
                    warn!(%id, "guest agent: {message}")
                }
                Ok(Some(Incoming::Msg(msg))) => match self.copy_message(msg) {
                    None => {}
                    Some(
                        GuestMsg::InterfacesSet { req_id, error }
                        | GuestMsg::Updated { req_id, error },
                    ) => answer_waiter(&self.inner.iface_waiters, req_id, error),
                    Some(GuestMsg::Top {
                        req_id,
                        titles,
                        processes,
                    }) => answer_waiter(&self.inner.tops, req_id, (titles, processes)),
                    Some(GuestMsg::Stats {
                        req_id,
                        pids,
                        memory,
                    }) => answer_waiter(
                        &self.inner.guest_stats,
                        req_id,
                        stats::Guest { pids, memory },
                    ),
                    Some(other) => warn!(%id, "unexpected agent message: {other:?}"),
                },
                Ok(None) => break,
                Err(e) => {
                    warn!(%id, "agent channel: {e}");
                    break;
                }
            }
        }
        if let Some(l) = log.as_mut() {
            let _ = l.flush_partial();
        }
        let run_ms = run_started.elapsed().as_millis() as u64;
        let teardown_started = std::time::Instant::now();
        let (code, oom, error) = match exit {
            Some((c, o)) => (i64::from(c), o, String::new()),
            None if h.killed.load(Ordering::SeqCst) => (137, false, String::new()),
            None => (
                255,
                false,
                "the container's VM stopped unexpectedly".to_string(),
            ),
        };
        {
            let mut live = h.live.lock().await;
            if let Some(w) = live.writer.take() {
                if exit.is_some() && h.rec().host_config.auto_remove != Some(true) {
                    // The agent syncs the container's disk, then powers off.
                    let _ = w.send(&HostMsg::Shutdown).await;
                } else {
                    // `--rm`: the disk is deleted next, nothing to keep.
                    vessel_vm::kill_vm(pid, &name);
                }
            }
            *live = Live::default();
        }
        // The agent powers the VM off after Shutdown; make sure it is gone.
        let reaped = tokio::time::timeout(Duration::from_secs(3), vessel_vm::wait_exit(pid)).await;
        if reaped.is_err() {
            vessel_vm::kill_vm(pid, &name);
            vessel_vm::wait_exit(pid).await;
        }
        self.release_mounts(&h.rec(), &self.run_dir(&id)).await;
        let connected = h.rec();
        let rec = h.update(|r| {
            network::release(r);
            r.state.status = Status::Exited;
            r.state.pid = None;
            r.state.paused = false;
            r.state.exit_code = code;
            r.state.oom_killed = oom;
            r.state.error = error;
            r.state.finished_at = Some(now_rfc3339());
        });
        if let Err(e) = self.persist(&rec) {
            warn!(%id, "cannot save exit: {e}");
        }
        self.unpublish_ports(&id);
        self.refresh_dns().await;
        for e in self.execs_of(&id) {
            e.finish(137, Some(format!("container {id} stopped")));
        }
        if oom {
            // dockerd reports the kill before the exit.
            self.container_event(&rec, "oom", &[]);
        }
        self.container_event(&rec, "die", &[("exitCode", code.to_string())]);
        // After `die`, as dockerd orders them.
        self.endpoint_events(&connected, "disconnect");
        let _ = h.output.send(Output::End);
        h.log_version.send_modify(|v| *v += 1);
        h.status.send_modify(|w| {
            w.running = false;
            w.exits += 1;
            w.exit_code = code;
        });
        if rec.should_restart(code) {
            let delay = Duration::from_millis(100u64 << rec.restart_count.clamp(0, 9));
            let engine = self.clone();
            let id = id.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                engine.restart_by_policy(id).await;
            });
        }
        if rec.host_config.auto_remove == Some(true) {
            if let Err(e) = self.remove_with_volumes(&id, true, true).await {
                if !matches!(e, EngineError::NotFound(_)) {
                    warn!(%id, "auto-remove failed: {e}");
                }
            }
        }
        info!(
            %id,
            exit_code = code,
            run_ms,
            teardown_ms = teardown_started.elapsed().as_millis() as u64,
            "container exited"
        );
    }

    fn output(&self, h: &Handle, log: &mut Option<logs::LogWriter>, stderr: bool, data: Vec<u8>) {
        if let Some(l) = log.as_mut() {
            if let Err(e) = l.write(stderr, &data) {
                warn!(id = %h.id, "log write failed: {e}");
            }
        }
        h.log_version.send_modify(|v| *v += 1);
        let b = Bytes::from(data);
        let _ = h.output.send(if stderr {
            Output::Stderr(b)
        } else {
            Output::Stdout(b)
        });
    }

    /// Sends a signal to the main process of a running container.
    async fn signal(&self, h: &Handle, sig: i32) -> Result<(), EngineError> {
        let live = h.live.lock().await;
        match &live.writer {
            Some(w) => w
                .send(&HostMsg::Signal { signal: sig })
                .await
                .map_err(|e| internal("signal", e)),
            None => Err(EngineError::Conflict(format!(
                "container {} is not running",
                h.id
            ))),
        }
    }

    /// `docker kill`.
    pub async fn kill(&self, name_or_id: &str, signal: &str) -> Result<(), EngineError> {
        let h = self.lookup(name_or_id)?;
        let sig = signal::parse(if signal.is_empty() { "KILL" } else { signal })
            .ok_or_else(|| EngineError::InvalidParameter(format!("Invalid signal: {signal}")))?;
        if !h.rec().running() {
            return Err(EngineError::Conflict(format!(
                "cannot kill container: {name_or_id}: container {} is not running",
                h.id
            )));
        }
        let rec = h.update(|r| r.manually_stopped = true);
        self.persist(&rec)?;
        self.thaw(&h).await;
        self.container_event(&rec, "kill", &[("signal", sig.to_string())]);
        self.signal(&h, sig).await
    }

    async fn wait_exit_of(&self, h: &Handle, exits0: u64, timeout: Option<Duration>) -> bool {
        let mut rx = h.status.subscribe();
        let fut = rx.wait_for(|w| w.exits > exits0 || !w.running);
        match timeout {
            Some(t) => matches!(tokio::time::timeout(t, fut).await, Ok(Ok(_))),
            None => fut.await.is_ok(),
        }
    }

    /// `docker stop`: the stop signal, then SIGKILL after `timeout` seconds,
    /// then the VM itself.
    pub async fn stop(
        &self,
        name_or_id: &str,
        timeout: Option<i64>,
        signal: Option<&str>,
    ) -> Result<(), EngineError> {
        let h = self.lookup(name_or_id)?;
        self.stop_inner(name_or_id, timeout, signal).await?;
        self.container_event(&h.rec(), "stop", &[]);
        Ok(())
    }

    /// `docker restart`: stop (if running), start, and a `restart` event.
    pub async fn restart(
        &self,
        name_or_id: &str,
        timeout: Option<i64>,
        signal: Option<&str>,
    ) -> Result<(), EngineError> {
        match self.stop(name_or_id, timeout, signal).await {
            Ok(()) | Err(EngineError::NotModified) => {}
            Err(e) => return Err(e),
        }
        self.start(name_or_id).await?;
        let h = self.lookup(name_or_id)?;
        self.container_event(&h.rec(), "restart", &[]);
        Ok(())
    }

    async fn stop_inner(
        &self,
        name_or_id: &str,
        timeout: Option<i64>,
        signal: Option<&str>,
    ) -> Result<(), EngineError> {
        let h = self.lookup(name_or_id)?;
        let rec = h.rec();
        if !rec.running() {
            // Between two runs of a restart policy: the user's stop cancels
            // the next one, as Docker's does for a restarting container.
            if !rec.manually_stopped {
                let rec = h.update(|r| r.manually_stopped = true);
                self.persist(&rec)?;
            }
            return Err(EngineError::NotModified);
        }
        let sig = match signal.filter(|s| !s.is_empty()) {
            Some(name) => signal::parse(name)
                .ok_or_else(|| EngineError::InvalidParameter(format!("Invalid signal: {name}")))?,
            // The container's (or its image's) stop signal; one that does
            // not parse falls back to SIGTERM, as with dockerd.
            None => match rec.config.stop_signal.as_deref().filter(|s| !s.is_empty()) {
                Some(name) => signal::parse(name).unwrap_or_else(|| {
                    warn!(id = %rec.id, signal = name, "invalid stop signal, using SIGTERM");
                    libc::SIGTERM
                }),
                None => libc::SIGTERM,
            },
        };
        let t = timeout.or(rec.config.stop_timeout).unwrap_or(10);
        let rec = h.update(|r| r.manually_stopped = true);
        self.persist(&rec)?;
        self.thaw(&h).await;
        let exits0 = h.status.borrow().exits;
        self.container_event(&rec, "kill", &[("signal", sig.to_string())]);
        let _ = self.signal(&h, sig).await;
        let grace = if t < 0 {
            None
        } else {
            Some(Duration::from_secs(t as u64))
        };
        if self.wait_exit_of(&h, exits0, grace).await {
            return Ok(());
        }
        self.container_event(&rec, "kill", &[("signal", libc::SIGKILL.to_string())]);
        let _ = self.signal(&h, libc::SIGKILL).await;
        if self
            .wait_exit_of(&h, exits0, Some(Duration::from_secs(5)))
            .await
        {
            return Ok(());
        }
        self.kill_vm(&h).await;
        Ok(())
    }

    async fn kill_vm(&self, h: &Handle) {
        let rec = h.rec();
        if let Some(pid) = rec.state.pid {
            h.killed.store(true, Ordering::SeqCst);
            let exits0 = h.status.borrow().exits;
            vessel_vm::kill_vm(pid, rec.vm_name());
            self.wait_exit_of(h, exits0, Some(Duration::from_secs(10)))
                .await;
        }
    }

    /// `docker rm`.
    pub async fn remove(&self, name_or_id: &str, force: bool) -> Result<(), EngineError> {
        self.remove_with_volumes(name_or_id, force, false).await
    }

    /// `docker rm [-v]`: with `volumes`, the container's anonymous volumes
    /// that no other container uses go too.
    pub async fn remove_with_volumes(
        &self,
        name_or_id: &str,
        force: bool,
        volumes: bool,
    ) -> Result<(), EngineError> {
        let h = self.lookup(name_or_id)?;
        let _op = h.op.lock().await;
        let rec = h.rec();
        if rec.running() {
            if !force {
                return Err(EngineError::Conflict(format!(
                    "cannot remove container \"/{}\": container is running: stop the container before removing or force remove",
                    rec.name
                )));
            }
            self.thaw(&h).await;
            let exits0 = h.status.borrow().exits;
            let _ = self.signal(&h, libc::SIGKILL).await;
            if !self
                .wait_exit_of(&h, exits0, Some(Duration::from_secs(5)))
                .await
            {
                self.kill_vm(&h).await;
            }
        }
        let rec = h.update(|r| r.state.status = Status::Removing);
        self.persist(&rec)?;
        volumes::remove_run_dir(&self.run_dir(&rec.id));
        let dir = self.container_dir(&rec.id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                let rec = h.update(|r| r.state.status = Status::Dead);
                let _ = self.persist(&rec);
                return Err(internal(&format!("remove {}", dir.display()), e));
            }
        }
        self.inner
            .store
            .delete(CONTAINERS, &rec.id)
            .map_err(|e| internal("delete container state", e))?;
        self.inner
            .containers
            .lock()
            .map_err(|e| internal("container table", e))?
            .remove(&rec.id);
        h.status.send_modify(|w| w.removed = true);
        if let Ok(mut execs) = self.inner.execs.lock() {
            execs.retain(|_, e| e.container_id != rec.id);
        }
        self.container_event(&rec, "destroy", &[]);
        if volumes {
            self.remove_anonymous_volumes(&rec).await;
        }
        info!(id = %rec.id, "container removed");
        Ok(())
    }

    /// `docker wait`: resolves the container now (so a missing one is an
    /// error before any response is sent) and returns a future of the exit code.
    pub fn wait(
        &self,
        name_or_id: &str,
        cond: WaitCondition,
    ) -> Result<impl std::future::Future<Output = i64> + Send + 'static, EngineError> {
        let h = self.lookup(name_or_id)?;
        let mut rx = h.status.subscribe();
        let exits0 = rx.borrow().exits;
        Ok(async move {
            let r = match cond {
                WaitCondition::NotRunning => rx
                    .wait_for(|w| !w.running || w.removed)
                    .await
                    .map(|w| w.exit_code),
                WaitCondition::NextExit => rx
                    .wait_for(|w| w.exits > exits0 || w.removed)
                    .await
                    .map(|w| w.exit_code),
                WaitCondition::Removed => rx.wait_for(|w| w.removed).await.map(|w| w.exit_code),
            };
            // A closed channel means the container is gone.
            r.unwrap_or_else(|_| h.status.borrow().exit_code)
        })
    }

    /// Starts an attach session.
    pub fn attach(&self, name_or_id: &str) -> Result<(String, Attach), EngineError> {
        let h = self.lookup(name_or_id)?;
        let rec = h.rec();
        self.container_event(&rec, "attach", &[]);
        Ok((
            h.id.clone(),
            Attach {
                tty: rec.config.tty.unwrap_or(false),
                output: h.output.subscribe(),
                running: rec.running(),
            },
        ))
    }

    /// Sends attach input to the container's stdin (buffered until it starts).
    pub async fn write_stdin(&self, id: &str, data: &[u8]) -> Result<(), EngineError> {
        let h = self.lookup(id)?;
        let mut live = h.live.lock().await;
        match &live.writer {
            Some(w) => w.send_stdin(data).await.map_err(|e| internal("stdin", e)),
            None => {
                live.pending_stdin.extend_from_slice(data);
                Ok(())
            }
        }
    }

    /// Closes the container's stdin (the attached client sent EOF).
    pub async fn close_stdin(&self, id: &str) -> Result<(), EngineError> {
        let h = self.lookup(id)?;
        if !h.rec().config.stdin_once.unwrap_or(false) {
            return Ok(());
        }
        let mut live = h.live.lock().await;
        match &live.writer {
            Some(w) => w
                .send(&HostMsg::CloseStdin)
                .await
                .map_err(|e| internal("stdin", e)),
            None => {
                live.stdin_closed = true;
                Ok(())
            }
        }
    }

    /// `POST /containers/{id}/resize`.
    pub async fn resize(&self, name_or_id: &str, rows: u16, cols: u16) -> Result<(), EngineError> {
        let h = self.lookup(name_or_id)?;
        let mut live = h.live.lock().await;
        live.tty_size = Some((rows, cols));
        if let Some(w) = &live.writer {
            w.send(&HostMsg::Resize { rows, cols })
                .await
                .map_err(|e| internal("resize", e))?;
        }
        Ok(())
    }

    /// `docker logs`: whether the container has a TTY, and a stream of entries.
    pub fn logs(
        &self,
        name_or_id: &str,
        opts: LogsOptions,
    ) -> Result<(bool, tokio::sync::mpsc::Receiver<LogEntry>), EngineError> {
        let h = self.lookup(name_or_id)?;
        let tty = h.rec().config.tty.unwrap_or(false);
        let path = self.log_path(&h.id);
        let Some(rotation) = log_driver(&h.rec().host_config)? else {
            return Err(EngineError::NotImplemented(
                "configured logging driver does not support reading".into(),
            ));
        };
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let mut version = h.log_version.subscribe();
        let mut status = h.status.subscribe();
        tokio::spawn(async move {
            let keep = |e: &LogEntry| {
                (if e.stream == "stderr" {
                    opts.stderr
                } else {
                    opts.stdout
                }) && entry_time(e).is_none_or(|t| {
                    opts.since.is_none_or(|s| t >= s) && opts.until.is_none_or(|u| t < u)
                })
            };
            let p = path.clone();
            let Ok(Ok((first, mut offset))) = tokio::task::spawn_blocking(move || {
                let mut all = vec![];
                let mut offset = 0;
                for f in logs::files(&p, rotation) {
                    let (entries, off) = logs::read_from(&f, 0)?;
                    all.extend(entries);
                    offset = off;
                }
                Ok::<_, std::io::Error>((all, offset))
            })
            .await
            else {
                return;
            };
            let mut first: Vec<LogEntry> = first.into_iter().filter(|e| keep(e)).collect();
            if let Some(n) = opts.tail {
                let skip = first.len().saturating_sub(n);
                first.drain(..skip);
            }
            for e in first {
                if tx.send(e).await.is_err() {
                    return;
                }
            }
            if !opts.follow {
                return;
            }
            loop {
                let running = status.borrow_and_update().running;
                let p = path.clone();
                let Ok(Ok((more, off))) = tokio::task::spawn_blocking(move || {
                    // A rotation started a new file: read it from its start.
                    let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                    logs::read_from(&p, if len < offset { 0 } else { offset })
                })
                .await
                else {
                    return;
                };
                offset = off;
                for e in more.into_iter().filter(|e| keep(e)) {
                    if tx.send(e).await.is_err() {
                        return;
                    }
                }
                if !running {
                    return;
                }
                tokio::select! {
                    r = version.changed() => if r.is_err() { return },
                    r = status.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok((tty, rx))
    }

    fn execs_of(&self, container_id: &str) -> Vec<Arc<ExecHandle>> {
        self.inner
            .execs
            .lock()
            .map(|m| {
                m.values()
                    .filter(|e| e.container_id == container_id)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    fn exec_by_num(&self, container_id: &str, num: u32) -> Option<Arc<ExecHandle>> {
        self.execs_of(container_id)
            .into_iter()
            .find(|e| e.num == num)
    }

    /// `POST /containers/{id}/exec`: returns the exec id.
    pub fn exec_create(&self, container: &str, config: ExecConfig) -> Result<String, EngineError> {
        let h = self.lookup(container)?;
        if !h.rec().running() {
            return Err(EngineError::Conflict(format!(
                "container {} is not running",
                h.id
            )));
        }
        if h.rec().state.paused {
            return Err(EngineError::Conflict(format!(
                "Container {} is paused, unpause the container before exec",
                h.id
            )));
        }
        if config.cmd.as_ref().is_none_or(|c| c.is_empty()) {
            return Err(EngineError::InvalidParameter(
                "No exec command specified".into(),
            ));
        }
        let mut idb = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut idb);
        let id = hex::encode(idb);
        let num = self.inner.next_exec.fetch_add(1, Ordering::SeqCst) + 1;
        let e = ExecHandle::new(id.clone(), h.id.clone(), num, config);
        self.inner
            .execs
            .lock()
            .map_err(|e| internal("exec table", e))?
            .insert(id.clone(), e.clone());
        self.exec_event(&e, "exec_create", true, None);
        Ok(id)
    }

    /// An exec event as dockerd emits it (`exec_create: sh -c …`,
    /// `exec_start: …`, `exec_die` with the exit code), on the container.
    fn exec_event(&self, e: &ExecHandle, action: &str, with_cmd: bool, exit_code: Option<i64>) {
        let Ok(h) = self.lookup(&e.container_id) else {
            return;
        };
        let action = if with_cmd {
            let cmd = e.config.cmd.clone().unwrap_or_default().join(" ");
            format!("{action}: {cmd}")
        } else {
            action.to_string()
        };
        let mut extra = vec![("execID", e.id.clone())];
        if let Some(code) = exit_code {
            extra.push(("exitCode", code.to_string()));
        }
        self.container_event(&h.rec(), &action, &extra);
    }

    /// Finds an exec instance by id or unambiguous prefix.
    pub fn exec(&self, id: &str) -> Result<Arc<ExecHandle>, EngineError> {
        let map = self
            .inner
            .execs
            .lock()
            .map_err(|e| internal("exec table", e))?;
        if let Some(e) = map.get(id) {
            return Ok(e.clone());
        }
        let found: Vec<_> = if id.is_empty() {
            vec![]
        } else {
            map.values().filter(|e| e.id.starts_with(id)).collect()
        };
        match found.as_slice() {
            [one] => Ok((*one).clone()),
            _ => Err(EngineError::NotFound(format!(
                "No such exec instance: {id}"
            ))),
        }
    }

    /// Marks an exec as being started; a second start is a conflict.
    pub fn exec_claim(&self, id: &str) -> Result<Arc<ExecHandle>, EngineError> {
        let e = self.exec(id)?;
        let mut g = e.lock();
        match g.state {
            ExecState::Created => {}
            ExecState::Exited => {
                return Err(EngineError::Conflict(format!(
                    "Error: Exec command {} has already run",
                    e.id
                )))
            }
            _ => {
                return Err(EngineError::Conflict(format!(
                    "Error: Exec command {} is already running",
                    e.id
                )))
            }
        }
        if !self
            .lookup(&e.container_id)
            .map(|h| h.rec().running())
            .unwrap_or(false)
        {
            return Err(EngineError::Conflict(format!(
                "container {} is not running",
                e.container_id
            )));
        }
        g.state = ExecState::Starting;
        drop(g);
        self.exec_event(&e, "exec_start", true, None);
        Ok(e)
    }

    /// Signals a running exec's process (a health check out of time).
    pub(crate) async fn exec_signal(&self, e: &ExecHandle, signal: i32) {
        let Ok(h) = self.lookup(&e.container_id) else {
            return;
        };
        let writer = h.live.lock().await.writer.clone();
        if let Some(w) = writer {
            let msg = HostMsg::ExecSignal {
                exec_id: e.num,
                signal,
            };
            if let Err(err) = w.send(&msg).await {
                warn!(exec = %e.id, "signalling an exec: {err}");
            }
        }
    }

    /// Starts a claimed exec in its VM and waits until it runs. Subscribe to
    /// its output before calling this. `Err` carries Docker's message; the
    /// exit code is recorded on the exec.
    pub async fn exec_launch(
        &self,
        e: &Arc<ExecHandle>,
        tty_size: Option<(u16, u16)>,
    ) -> Result<(), String> {
        let h = match self.lookup(&e.container_id) {
            Ok(h) => h,
            Err(err) => {
                e.finish(126, Some(err.to_string()));
                return Err(err.to_string());
            }
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        e.lock().started = Some(tx);
        {
            let live = h.live.lock().await;
            let sent = match &live.writer {
                Some(w) => w
                    .send(&HostMsg::Exec {
                        exec_id: e.num,
                        spec: Box::new(e.spec(tty_size)),
                    })
                    .await
                    .map_err(|err| err.to_string()),
                None => Err(format!("container {} is not running", e.container_id)),
            };
            if let Err(msg) = sent {
                e.finish(126, Some(msg.clone()));
                return Err(msg);
            }
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err("the exec was abandoned".into()),
        }
    }

    /// Sends stdin to an exec (`None`: close it).
    pub async fn exec_stdin(&self, e: &ExecHandle, data: Option<&[u8]>) -> Result<(), EngineError> {
        let h = self.lookup(&e.container_id)?;
        let live = h.live.lock().await;
        let Some(w) = &live.writer else { return Ok(()) };
        match data {
            Some(d) => w.send_exec_stdin(e.num, d).await,
            None => w.send(&HostMsg::ExecCloseStdin { exec_id: e.num }).await,
        }
        .map_err(|err| internal("exec stdin", err))
    }

    /// `POST /exec/{id}/resize`.
    pub async fn exec_resize(&self, id: &str, rows: u16, cols: u16) -> Result<(), EngineError> {
        let e = self.exec(id)?;
        let h = self.lookup(&e.container_id)?;
        let live = h.live.lock().await;
        if let Some(w) = &live.writer {
            w.send(&HostMsg::ExecResize {
                exec_id: e.num,
                rows,
                cols,
            })
            .await
            .map_err(|err| internal("resize", err))?;
        }
        Ok(())
    }

    /// Reconnects to every container recorded as running, marks the ones
    /// whose VM is gone as exited, and kills VMs nobody owns.
    async fn recover(&self) -> Result<(), EngineError> {
        // Taps of VMs that ended while the daemon was down. Running VMs hold
        // theirs, which stay; nothing new has been spawned yet.
        let owner = self.inner.cfg.network.bridge_name.clone();
        blocking(move || vessel_vm::tap::sweep(&owner)).await?;
        let recs: Vec<(String, ContainerRecord)> = self
            .inner
            .store
            .list(CONTAINERS)
            .map_err(|e| internal("read container state", e))?;
        for (_, rec) in recs {
            let h = Handle::new(rec.clone());
            self.inner
                .containers
                .lock()
                .map_err(|e| internal("container table", e))?
                .insert(rec.id.clone(), h.clone());
            match rec.state.status {
                Status::Running => self.reattach(h).await,
                Status::Removing | Status::Dead => {
                    if let Err(e) = self.remove(&rec.id, true).await {
                        warn!(id = %rec.id, "finishing removal failed: {e}");
                    }
                }
                _ => {
                    // A start that was cut short may have left a VM behind.
                    if let Some(pid) = vessel_vm::qemu::read_pid(&self.run_dir(&rec.id)) {
                        vessel_vm::kill_vm(pid, rec.vm_name());
                    }
                }
            }
        }
        self.release_stale_mounts();
        // Restart policies at daemon start: `always` even after a manual
        // stop, `unless-stopped` unless the user stopped it.
        for h in self.handles() {
            let rec = h.rec();
            let (policy, _) = rec.restart_policy();
            let wanted =
                policy == "always" || (policy == "unless-stopped" && !rec.manually_stopped);
            if wanted && !rec.running() && rec.state.status == Status::Exited {
                let engine = self.clone();
                let id = rec.id.clone();
                tokio::spawn(async move {
                    if let Err(e) = engine.start(&id).await {
                        warn!(%id, "restart policy at daemon start: {e}");
                    }
                });
            }
        }
        // Container directories without a record are leftovers of a create
        // that was cut short.
        let known: Vec<String> = self.handles().iter().map(|h| h.id.clone()).collect();
        if let Ok(rd) = std::fs::read_dir(self.inner.cfg.data_root.join("containers")) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                if !known.contains(&n) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }

    async fn reattach(&self, h: Arc<Handle>) {
        let rec = h.rec();
        let id = rec.id.clone();
        let pid = rec
            .state
            .pid
            .or_else(|| vessel_vm::qemu::read_pid(&self.run_dir(&id)));
        let vm_name = rec.vm_name().to_string();
        let alive = pid.is_some_and(|p| vessel_vm::vm_alive(p, &vm_name));
        if let (true, Some(pid)) = (alive, pid) {
            // Its taps go when it ends, as if this daemon had spawned it.
            vessel_vm::tap::remove_after_exit(Some(pid), rec.taps.clone());
            // A stopped VM cannot answer its agent's handshake. It is
            // stopped because it is paused, or because this daemon ended
            // while it had the VM stopped to release its translated code;
            // either way it runs for the handshake, and a paused one is
            // stopped again after it.
            let stopped = match self.vm_status(&id).await {
                Ok(status) => status != "running",
                Err(e) => {
                    warn!(%id, "cannot ask a running VM for its state: {e}");
                    false
                }
            };
            if stopped {
                if !rec.state.paused {
                    warn!(%id, "the container's VM was left stopped; resuming it");
                }
                if let Err(e) = self.qmp(&id, "cont").await {
                    warn!(%id, "cannot resume a stopped VM: {e}");
                }
            }
            let sock = self.run_dir(&id).join(vessel_vm::qemu::CONTROL_SOCKET);
            let answer = connect(&Transport::VirtioSerial(sock), Duration::from_secs(10)).await;
            if rec.state.paused && answer.is_ok() {
                if let Err(e) = self.qmp(&id, "stop").await {
                    warn!(%id, "cannot pause the reattached VM again: {e}");
                    let rec = h.update(|r| r.state.paused = false);
                    let _ = self.persist(&rec);
                }
            }
            match answer {
                Ok((reader, writer, GuestMsg::State { process, .. })) => {
                    // An exit the agent reported while nobody listened is
                    // delivered from the state it answers with.
                    let exited = match process {
                        ProcessState::Exited {
                            exit_code,
                            oom_killed,
                        } => Some((exit_code, oom_killed)),
                        _ => None,
                    };
                    self.go_live(&h, writer).await;
                    tokio::spawn(vessel_vm::wait_exit(pid));
                    tokio::spawn(self.clone().monitor(h.clone(), reader, pid, exited));
                    if exited.is_none() {
                        self.start_health_checks(&h, &rec);
                        self.republish_ports(&rec).await;
                    }
                    info!(%id, pid, "reattached to running container");
                    return;
                }
                Ok((_, _, other)) => warn!(%id, "unexpected agent answer on reattach: {other:?}"),
                Err(e) => warn!(%id, "cannot reach the agent of a running VM: {e}"),
            }
            vessel_vm::kill_vm(pid, &vm_name);
        }
        let rec = h.update(|r| {
            network::release(r);
            r.state.status = Status::Exited;
            r.state.pid = None;
            r.state.exit_code = 255;
            r.state.error = "the container's VM stopped while the daemon was down".into();
            r.state.finished_at = Some(now_rfc3339());
        });
        let _ = self.persist(&rec);
        h.status.send_modify(|w| {
            w.running = false;
            w.exit_code = 255;
        });
    }
}

/// `--cpuset-cpus` as host CPU numbers, checked against the CPUs the
/// daemon may use.
fn cpuset_of(hc: &HostConfig) -> Result<Option<Vec<usize>>, EngineError> {
    if hc.cpuset_cpus.as_deref().is_none_or(str::is_empty) {
        return Ok(None);
    }
    let available = vessel_vm::host_cpus().map_err(|e| internal("reading the host's CPUs", e))?;
    resources::cpuset(hc.cpuset_cpus.as_deref(), &available)
}

/// The container's log driver: `Some(rotation)` for json-file (the
/// default), `None` for `none`; anything else is refused.
fn log_driver(hc: &HostConfig) -> Result<Option<logs::Rotation>, EngineError> {
    let Some(lc) = &hc.log_config else {
        return Ok(Some(logs::Rotation::default()));
    };
    let opts = lc.config.clone().unwrap_or_default();
    match lc.typ.as_deref().unwrap_or("") {
        "" | "json-file" => {
            let max_size = match opts.get("max-size") {
                None => None,
                Some(v) if v == "-1" => None,
                Some(v) => Some(logs::parse_size(v).ok_or_else(|| {
                    EngineError::InvalidParameter(format!("invalid value for max-size: {v}"))
                })?),
            };
            let max_file = match opts.get("max-file") {
                None => 1,
                Some(v) => v.parse::<u32>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                    EngineError::InvalidParameter(format!("invalid value for max-file: {v}"))
                })?,
            };
            if max_file > 1 && max_size.is_none() {
                return Err(EngineError::InvalidParameter(
                    "max-file cannot be set without max-size".into(),
                ));
            }
            for k in opts.keys() {
                if ![
                    "max-size",
                    "max-file",
                    "compress",
                    "labels",
                    "labels-regex",
                    "env",
                    "env-regex",
                    "tag",
                ]
                .contains(&k.as_str())
                {
                    return Err(EngineError::InvalidParameter(format!(
                        "unknown log opt '{k}' for json-file log driver"
                    )));
                }
            }
            if opts.get("compress").is_some_and(|v| v == "true") {
                return Err(EngineError::InvalidParameter(
                    "log opt compress=true is not supported: rotated json-file logs are kept uncompressed".into(),
                ));
            }
            // The regular expressions and the tag template, checked now
            // rather than at the first start.
            logs::extra_attributes(&opts, &HashMap::new(), &[], &logs::TagInfo::default())
                .map_err(EngineError::InvalidParameter)?;
            Ok(Some(logs::Rotation { max_size, max_file }))
        }
        "none" => Ok(None),
        other => Err(EngineError::InvalidParameter(format!(
            "logger: no log driver named '{other}' is registered"
        ))),
    }
}

/// The extra attributes each log entry of `rec` carries (see
/// [`logs::extra_attributes`]).
fn log_attrs(
    rec: &ContainerRecord,
) -> Result<std::collections::BTreeMap<String, String>, EngineError> {
    let opts = rec
        .host_config
        .log_config
        .as_ref()
        .and_then(|l| l.config.clone())
        .unwrap_or_default();
    let mut command = vec![rec.path.clone()];
    command.extend(rec.args.iter().cloned());
    let tag = logs::TagInfo {
        id: rec.id.clone(),
        name: rec.name.clone(),
        image_id: rec.image_id.clone(),
        image_name: rec.image.clone(),
        hostname: rec.config.hostname.clone().unwrap_or_default(),
        command: command.join(" "),
    };
    logs::extra_attributes(
        &opts,
        rec.config.labels.as_ref().unwrap_or(&HashMap::new()),
        rec.config.env.as_deref().unwrap_or(&[]),
        &tag,
    )
    .map_err(EngineError::InvalidParameter)
}

fn entry_time(e: &LogEntry) -> Option<f64> {
    chrono::DateTime::parse_from_rfc3339(&e.time)
        .ok()
        .map(|t| t.timestamp() as f64 + f64::from(t.timestamp_subsec_nanos()) / 1e9)
}

/// Merges the image's config with the create request as Docker does.
fn merge_config(
    body: &ContainerCreateBody,
    image: &vessel_image::ImageConfig,
    image_name: &str,
) -> ContainerConfig {
    let user_entrypoint = body.entrypoint.clone();
    let user_cmd = body.cmd.clone().filter(|c| !c.is_empty());
    let (entrypoint, cmd) = match user_entrypoint {
        // `--entrypoint` given: the image's CMD no longer applies.
        Some(ep) if !(ep.is_empty() || ep.len() == 1 && ep[0].is_empty()) => (Some(ep), user_cmd),
        Some(_) => (None, user_cmd),
        None => (
            image.entrypoint.clone(),
            user_cmd.or_else(|| image.cmd.clone()),
        ),
    };
    let mut env: Vec<String> = image.env.clone();
    for kv in body.env.clone().unwrap_or_default() {
        let key = kv.split('=').next().unwrap_or("").to_string();
        env.retain(|e| e.split('=').next() != Some(key.as_str()));
        env.push(kv);
    }
    let mut labels: HashMap<String, String> = image.labels.clone().into_iter().collect();
    labels.extend(body.labels.clone().unwrap_or_default());
    let pick = |user: &Option<String>, img: &Option<String>| {
        user.clone()
            .filter(|s| !s.is_empty())
            .or_else(|| img.clone().filter(|s| !s.is_empty()))
    };
    let image_user = Some(image.user.clone());
    let image_workdir = Some(image.working_dir.clone());
    ContainerConfig {
        hostname: body.hostname.clone(),
        domainname: body.domainname.clone(),
        user: pick(&body.user, &image_user),
        attach_stdin: body.attach_stdin,
        attach_stdout: body.attach_stdout,
        attach_stderr: body.attach_stderr,
        exposed_ports: merge_exposed_ports(body.exposed_ports.as_deref(), &image.exposed_ports),
        tty: Some(body.tty.unwrap_or(false)),
        open_stdin: Some(body.open_stdin.unwrap_or(false)),
        stdin_once: Some(body.stdin_once.unwrap_or(false)),
        env: Some(env),
        cmd,
        healthcheck: merge_healthcheck(
            body.healthcheck.clone(),
            image
                .healthcheck
                .clone()
                .and_then(|v| serde_json::from_value(v).ok()),
        ),
        args_escaped: body.args_escaped,
        image: Some(image_name.to_string()),
        volumes: body.volumes.clone(),
        working_dir: pick(&body.working_dir, &image_workdir),
        entrypoint,
        network_disabled: body.network_disabled,
        on_build: None,
        labels: Some(labels),
        stop_signal: pick(&body.stop_signal, &image.stop_signal),
        stop_timeout: body.stop_timeout,
        shell: body.shell.clone(),
    }
}

/// Hands an agent's answer to the request waiting for it under `req_id`
/// (see [`Engine::ask_agent`]); an answer nobody waits for any more (it came
/// after the timeout) is dropped.
fn answer_waiter<T>(
    waiters: &Mutex<HashMap<u32, tokio::sync::oneshot::Sender<T>>>,
    req_id: u32,
    answer: T,
) {
    let waiter = waiters
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&req_id);
    if let Some(tx) = waiter {
        let _ = tx.send(answer);
    }
}

/// A `publish`/`expose` filter of `docker ps`: `port[/proto]` or
/// `from-to[/proto]`, as (from, to, proto).
fn port_filter(v: &str) -> Option<(u16, u16, Option<&str>)> {
    let (ports, proto) = match v.split_once('/') {
        Some((p, proto)) => (p, Some(proto)),
        None => (v, None),
    };
    let (from, to) = match ports.split_once('-') {
        Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
        None => {
            let p = ports.parse().ok()?;
            (p, p)
        }
    };
    (from <= to).then_some((from, to, proto))
}

/// Whether a container port (`80/tcp`) passes a `publish`/`expose` filter.
fn port_filter_matches(filter: &str, port: &str) -> bool {
    let Some((from, to, proto)) = port_filter(filter) else {
        return false;
    };
    let (num, port_proto) = port.split_once('/').unwrap_or((port, "tcp"));
    num.parse::<u16>()
        .is_ok_and(|n| (from..=to).contains(&n) && proto.is_none_or(|p| p == port_proto))
}

/// A legacy link, `name:alias` as the CLI sends it or `/name:/container/alias`
/// as dockerd records it: (name, alias); without an alias, the name.
fn parse_link(link: &str) -> (&str, &str) {
    let (name, alias) = link.split_once(':').unwrap_or((link, link));
    let name = name.trim_start_matches('/');
    let alias = alias.rsplit('/').next().unwrap_or(alias);
    (name, if alias.is_empty() { name } else { alias })
}

/// The container's exposed ports: the request's, then the image's
/// (`EXPOSE`) that the request does not name, as dockerd merges them (so
/// `-P` publishes an image's ports). A port without a protocol is TCP.
fn merge_exposed_ports(user: Option<&[String]>, image: &[String]) -> Option<Vec<String>> {
    let norm = |p: &str| {
        if p.contains('/') {
            p.to_ascii_lowercase()
        } else {
            format!("{p}/tcp")
        }
    };
    let mut out: Vec<String> = user.unwrap_or_default().to_vec();
    for p in image {
        if !out.iter().any(|u| norm(u) == norm(p)) {
            out.push(p.clone());
        }
    }
    if out.is_empty() && user.is_none() {
        None
    } else {
        Some(out)
    }
}

/// The container's health check as dockerd merges it: the image's, with
/// each field the request sets (`--health-interval` alone keeps the
/// image's test command).
fn merge_healthcheck(
    user: Option<bollard_stubs::models::HealthConfig>,
    image: Option<bollard_stubs::models::HealthConfig>,
) -> Option<bollard_stubs::models::HealthConfig> {
    let Some(mut user) = user else {
        return image;
    };
    let Some(image) = image else {
        return Some(user);
    };
    let unset = |v: Option<i64>| v.is_none_or(|x| x == 0);
    if user.test.as_ref().is_none_or(|t| t.is_empty()) {
        user.test = image.test;
    }
    if unset(user.interval) {
        user.interval = image.interval;
    }
    if unset(user.timeout) {
        user.timeout = image.timeout;
    }
    if unset(user.start_period) {
        user.start_period = image.start_period;
    }
    if unset(user.start_interval) {
        user.start_interval = image.start_interval;
    }
    if unset(user.retries) {
        user.retries = image.retries;
    }
    Some(user)
}

/// A map of the host config as (key, value) pairs in key order.
fn sorted_pairs(map: Option<&HashMap<String, String>>) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = map
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    v.sort();
    v
}

fn make_blank_upper(path: &Path) -> Result<(), EngineError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let out = std::process::Command::new("mke2fs")
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-i",
            "65536",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
        ])
        .arg(&tmp)
        .arg(format!("{UPPER_DISK_GIB}G"))
        .output()
        .map_err(|e| internal("run mke2fs", e))?;
    if !out.status.success() {
        return Err(EngineError::Internal(format!(
            "mke2fs: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::rename(&tmp, path).map_err(|e| internal("rename blank disk", e))
}

fn make_upper(blank: &Path, upper: &Path) -> Result<(), EngineError> {
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(blank)
        .arg(upper)
        .output()
        .map_err(|e| internal("run qemu-img", e))?;
    if !out.status.success() {
        return Err(EngineError::Internal(format!(
            "qemu-img: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{merge_exposed_ports, merge_healthcheck};
    use bollard_stubs::models::HealthConfig;

    #[test]
    fn port_filters_of_ps() {
        assert!(super::port_filter_matches("80", "80/tcp"));
        assert!(super::port_filter_matches("80/tcp", "80/tcp"));
        assert!(!super::port_filter_matches("80/udp", "80/tcp"));
        assert!(super::port_filter_matches("8000-8100", "8080/tcp"));
        assert!(!super::port_filter_matches("8000-8010", "8080/tcp"));
        assert!(super::port_filter("x").is_none());
        assert!(super::port_filter("90-80").is_none());
    }

    #[test]
    fn links_parse_as_the_cli_sends_them_and_dockerd_records_them() {
        assert_eq!(super::parse_link("db:database"), ("db", "database"));
        assert_eq!(super::parse_link("/db:/web/database"), ("db", "database"));
        assert_eq!(super::parse_link("db"), ("db", "db"));
    }

    #[test]
    fn exposed_ports_merge_the_image_s_after_the_request_s() {
        let img = vec!["80/tcp".to_string(), "53/udp".to_string()];
        assert_eq!(merge_exposed_ports(None, &[]), None);
        assert_eq!(merge_exposed_ports(Some(&[]), &[]), Some(vec![]));
        assert_eq!(
            merge_exposed_ports(None, &img),
            Some(vec!["80/tcp".to_string(), "53/udp".to_string()])
        );
        // "80" is 80/tcp: not listed twice; 53/tcp is not 53/udp.
        let user = vec!["80".to_string(), "53/tcp".to_string()];
        assert_eq!(
            merge_exposed_ports(Some(&user), &img),
            Some(vec!["80".into(), "53/tcp".into(), "53/udp".into()])
        );
    }

    #[test]
    fn health_checks_merge_field_by_field_as_dockerd() {
        let image = HealthConfig {
            test: Some(vec!["CMD-SHELL".into(), "true".into()]),
            interval: Some(30_000_000_000),
            retries: Some(3),
            ..Default::default()
        };
        let user = HealthConfig {
            interval: Some(5_000_000_000),
            ..Default::default()
        };
        let m = merge_healthcheck(Some(user), Some(image.clone())).expect("merged");
        assert_eq!(m.test, image.test, "the image's test command stays");
        assert_eq!(m.interval, Some(5_000_000_000));
        assert_eq!(m.retries, Some(3));
        assert_eq!(merge_healthcheck(None, Some(image.clone())), Some(image));
        let none = HealthConfig {
            test: Some(vec!["NONE".into()]),
            ..Default::default()
        };
        let m = merge_healthcheck(Some(none.clone()), None).expect("user's");
        assert_eq!(m.test, none.test);
    }
}
