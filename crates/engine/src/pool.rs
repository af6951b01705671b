//! Warm VMs: template clones started ahead of time for an image and a VM
//! shape, with the image's root filesystem already mounted, each waiting
//! for a container.
//!
//! A clone restored from a template still has to spawn QEMU, restore the
//! device state, answer the agent handshake and mount its disks before the
//! container's process can run; under TCG that is most of a `docker run`.
//! A warm VM has done all of it before anyone asked. The first start of a
//! container whose image and shape have a warm VM takes it: the warm VM's
//! writable disk (as fresh as the one `create` made, both are empty clones
//! of the same blank disk) replaces the container's, its run directory
//! becomes the container's, and the agent gets the container's identity
//! (clock, entropy, hostname, machine-id) with its `Start`, exactly as a
//! clone does. After every start a replacement is made in the background.
//!
//! Bounded: at most `per_key` VMs per (image, shape) and [`MAX_KEYS`] keys,
//! the least recently used key is dropped first. Warm VMs belong to no
//! container; a daemon start ends any left from an earlier run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use tracing::{info, warn};
use vessel_protocol::{GuestMsg, HostMsg, RootfsSpec};
use vessel_vm::channel::{AgentReader, AgentWriter, Incoming};
use vessel_vm::{Boot, VmSpec};

use crate::{blocking, make_upper, Engine, EngineError, VmShape};

/// Most (image, shape) keys kept warm at once.
pub const MAX_KEYS: usize = 4;

/// Run directories of warm VMs start with this (under the daemon's `vm/`).
const RUN_PREFIX: &str = "w-";

/// A VM waiting for a container.
pub(crate) struct WarmVm {
    /// Its QEMU name (see `vessel_vm::vm_alive`).
    pub name: String,
    pub run_dir: PathBuf,
    pub upper: PathBuf,
    pub pid: u32,
    pub reader: AgentReader,
    pub writer: AgentWriter,
    /// Host taps of its network slots.
    pub taps: Vec<String>,
}

#[derive(Default)]
struct Slots {
    /// Ready VMs by key.
    ready: HashMap<String, Vec<WarmVm>>,
    /// Keys being filled now, with the pid of the VM once it runs.
    filling: HashMap<String, Option<u32>>,
    /// Keys, least recently used first.
    lru: Vec<String>,
}

/// The warm VMs of one daemon.
pub(crate) struct Pool {
    /// Writable disks of warm VMs (`<data-root>/warm`).
    dir: PathBuf,
    /// Where VM run directories live (`<data-root>/vm`).
    run_root: PathBuf,
    per_key: usize,
    slots: Mutex<Slots>,
    /// Signalled whenever a fill ends.
    filled: tokio::sync::Notify,
}

pub(crate) fn key(image_id: &str, shape: &VmShape) -> String {
    format!("{image_id}|{}M|{}cpu", shape.memory_mib, shape.vcpus)
}

impl Pool {
    /// Ends warm VMs an earlier daemon left and empties their directories.
    pub fn open(dir: PathBuf, run_root: PathBuf, per_key: usize) -> std::io::Result<Self> {
        end_leftovers(&run_root);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            run_root,
            per_key,
            slots: Mutex::new(Slots::default()),
            filled: tokio::sync::Notify::new(),
        })
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a live warm VM for `key`, if there is one.
    pub fn take(&self, key: &str) -> Option<WarmVm> {
        let mut slots = self.slots();
        touch(&mut slots.lru, key);
        let list = slots.ready.get_mut(key)?;
        while let Some(vm) = list.pop() {
            if vessel_vm::vm_alive(vm.pid, &vm.name) {
                return Some(vm);
            }
            warn!(vm = %vm.name, "a warm VM died while waiting; dropped");
            discard(&vm);
        }
        None
    }

    /// Takes a warm VM for `key`; when none is ready but one is being
    /// made, waits for it (up to `patience`): it is further along than a VM
    /// started now would be.
    pub async fn take_or_wait(&self, key: &str, patience: Duration) -> Option<WarmVm> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let notified = self.filled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(vm) = self.take(key) {
                return Some(vm);
            }
            match self.slots().filling.get(key) {
                None => return None,
                // Someone waits for it now: it is no longer background work.
                Some(Some(pid)) => {
                    let _ = vessel_vm::set_foreground(*pid);
                }
                Some(None) => {}
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Whether `key` needs another VM now; if so it is marked as filling.
    fn begin_fill(&self, key: &str) -> bool {
        if self.per_key == 0 {
            return false;
        }
        let mut slots = self.slots();
        let have = slots.ready.get(key).map_or(0, Vec::len);
        if have >= self.per_key || slots.filling.contains_key(key) {
            return false;
        }
        touch(&mut slots.lru, key);
        // Too many keys: drop the least recently used other one.
        while slots.lru.len() > MAX_KEYS {
            let old = slots.lru.remove(0);
            slots.filling.remove(&old);
            for vm in slots.ready.remove(&old).unwrap_or_default() {
                info!(vm = %vm.name, "warm VM of a less recently used image ended");
                discard(&vm);
            }
        }
        slots.filling.insert(key.to_string(), None);
        true
    }

    fn end_fill(&self, key: &str, vm: Option<WarmVm>) {
        let mut slots = self.slots();
        let wanted = slots.filling.remove(key).is_some() && slots.lru.iter().any(|k| k == key);
        match vm {
            Some(vm) if wanted => slots.ready.entry(key.to_string()).or_default().push(vm),
            Some(vm) => discard(&vm),
            None => {}
        }
        drop(slots);
        self.filled.notify_waiters();
    }

    fn filling_pid(&self, key: &str, pid: u32) {
        if let Some(slot) = self.slots().filling.get_mut(key) {
            *slot = Some(pid);
        }
    }

    /// Ends the warm VMs of images no longer wanted (an image was removed).
    pub fn retain_images(&self, keep: impl Fn(&str) -> bool) {
        let mut slots = self.slots();
        let gone: Vec<String> = slots
            .lru
            .iter()
            .filter(|k| !keep(k.split('|').next().unwrap_or("")))
            .cloned()
            .collect();
        for k in gone {
            slots.lru.retain(|x| x != &k);
            slots.filling.remove(&k);
            for vm in slots.ready.remove(&k).unwrap_or_default() {
                discard(&vm);
            }
        }
    }

    /// Ends every warm VM (daemon shutdown).
    pub fn clear(&self) {
        let mut slots = self.slots();
        slots.lru.clear();
        slots.filling.clear();
        for (_, list) in slots.ready.drain() {
            for vm in list {
                discard(&vm);
            }
        }
        end_leftovers(&self.run_root);
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// How many VMs are warm now (for `docker info` and tests).
    pub fn len(&self) -> usize {
        self.slots().ready.values().map(Vec::len).sum()
    }
}

/// Ends every warm VM whose run directory is under `run_root`, whether it
/// was ready or still being made.
fn end_leftovers(run_root: &Path) {
    for e in std::fs::read_dir(run_root).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(rest) = name.strip_prefix(RUN_PREFIX) {
            let pid = vessel_vm::qemu::read_pid(&e.path())
                .filter(|p| vessel_vm::vm_alive(*p, &vm_name(rest)));
            if let Some(pid) = pid {
                vessel_vm::kill_vm(pid, &vm_name(rest));
            }
            vessel_vm::tap::remove_after_exit(pid, vessel_vm::tap_names(&e.path()));
            crate::volumes::remove_run_dir(&e.path());
        }
    }
}

fn touch(lru: &mut Vec<String>, key: &str) {
    lru.retain(|k| k != key);
    lru.push(key.to_string());
}

fn vm_name(suffix: &str) -> String {
    format!("warm-{suffix}")
}

fn discard(vm: &WarmVm) {
    vessel_vm::kill_vm(vm.pid, &vm.name);
    crate::volumes::remove_run_dir(&vm.run_dir);
    if let Some(dir) = vm.upper.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

impl Engine {
    /// Makes sure a warm VM for `image_id` and `shape` is on its way, when
    /// warm VMs are on and the shape's template is ready.
    pub(crate) fn refill_warm(&self, image_id: &str, shape: &VmShape) {
        let (Some(pool), Some(templates)) = (&self.inner.pool, &self.inner.templates) else {
            return;
        };
        let Boot::Clone { memory, state } = templates.boot_for(shape) else {
            return;
        };
        let key = key(image_id, shape);
        if !pool.begin_fill(&key) {
            return;
        }
        let engine = self.clone();
        let image_id = image_id.to_string();
        let shape = shape.clone();
        tokio::spawn(async move {
            let boot = Boot::Clone { memory, state };
            let vm = match engine.make_warm(&key, &image_id, &shape, boot).await {
                Ok(vm) => Some(vm),
                Err(e) => {
                    warn!(image = %image_id, "making a warm VM failed: {e}");
                    None
                }
            };
            if let Some(pool) = &engine.inner.pool {
                pool.end_fill(&key, vm);
            }
        });
    }

    async fn make_warm(
        &self,
        key: &str,
        image_id: &str,
        shape: &VmShape,
        boot: Boot,
    ) -> Result<WarmVm, EngineError> {
        let Some(pool) = &self.inner.pool else {
            return Err(EngineError::Internal("warm VMs are off".into()));
        };
        let started = std::time::Instant::now();
        let mut b = [0u8; 6];
        rand::Rng::fill(&mut rand::rng(), &mut b);
        let suffix = hex::encode(b);
        let name = vm_name(&suffix);
        let dir = pool.dir.join(&suffix);
        std::fs::create_dir_all(&dir)
            .map_err(|e| crate::internal(&format!("create {}", dir.display()), e))?;
        let upper = dir.join("upper.qcow2");
        let run_dir = pool.run_root.join(format!("{RUN_PREFIX}{suffix}"));
        let cleanup = |pid: Option<u32>| {
            if let Some(pid) = pid {
                vessel_vm::kill_vm(pid, &name);
            }
            let _ = std::fs::remove_dir_all(&dir);
            crate::volumes::remove_run_dir(&run_dir);
        };
        let made = {
            let (blank, upper) = (self.inner.blank_upper.clone(), upper.clone());
            blocking(move || make_upper(&blank, &upper)).await?
        };
        if let Err(e) = made {
            cleanup(None);
            return Err(e);
        }
        let images = self.inner.images.clone();
        let id = image_id.to_string();
        let image_disk = match blocking(move || images.boot_disk(&id)).await? {
            Ok(d) => d,
            Err(e) => {
                cleanup(None);
                return Err(e.into());
            }
        };
        let spec = VmSpec {
            boot,
            background: true,
            ..self.vm_spec(
                name.clone(),
                run_dir.clone(),
                image_disk,
                upper.clone(),
                shape,
            )
        };
        let (pid, _, mut reader, writer, _) = match self.launch(&spec).await {
            Ok(l) => l,
            Err(e) => {
                cleanup(None);
                return Err(e);
            }
        };
        pool.filling_pid(key, pid);
        if let Err(e) = prepare_root(&mut reader, &writer).await {
            cleanup(Some(pid));
            return Err(EngineError::Internal(format!("warm VM: {e}")));
        }
        info!(vm = %name, image = %image_id, ms = started.elapsed().as_millis() as u64, "warm VM ready");
        Ok(WarmVm {
            taps: spec.taps.clone(),
            name,
            run_dir,
            upper,
            pid,
            reader,
            writer,
        })
    }
}

/// Asks a fresh VM's agent to mount the root filesystem (`Prepare`) and
/// waits (up to 30 s) for `Prepared`.
pub(crate) async fn prepare_root(
    reader: &mut AgentReader,
    writer: &AgentWriter,
) -> Result<(), String> {
    let prepared = async {
        writer
            .send(&HostMsg::Prepare(RootfsSpec::default()))
            .await
            .map_err(|e| e.to_string())?;
        loop {
            match reader.next().await {
                Ok(Some(Incoming::Msg(GuestMsg::Prepared))) => return Ok(()),
                Ok(Some(Incoming::Msg(GuestMsg::Error { message }))) => return Err(message),
                Ok(Some(_)) => {}
                Ok(None) => return Err("the VM stopped".to_string()),
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), prepared)
        .await
        .unwrap_or_else(|_| Err("no answer to Prepare in 30 s".into()))
}

/// Moves a claimed warm VM's writable disk and run directory into the
/// container's places. The VM keeps its open files; only names change.
pub(crate) fn adopt(vm: &WarmVm, upper: &Path, run_dir: &Path) -> std::io::Result<()> {
    std::fs::rename(&vm.upper, upper)?;
    crate::volumes::remove_run_dir(run_dir);
    std::fs::rename(&vm.run_dir, run_dir)?;
    if let Some(dir) = vm.upper.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}
