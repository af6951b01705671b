//! VM templates: one booted, snapshotted VM per VM shape, from which
//! container VMs are restored instead of booting their kernel.
//!
//! A template is keyed by everything that shapes a booted guest: the kernel,
//! the initramfs (hence the agent), the QEMU version, the acceleration and
//! the VM shape (memory, vCPUs). A key with no template starts a build in the
//! background; until it is ready, containers of that shape boot cold.
//! Templates of another generation (kernel, agent, QEMU or acceleration
//! changed) are deleted at start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tracing::{info, warn};
use vessel_vm::{Boot, Hypervisor, VmSpec};

use crate::VmShape;

/// Size of the placeholder image disk a template boots with. Real image
/// disks are smaller; the guest only learns a disk's size when it boots, so
/// the placeholder must be at least as large as any image disk.
const PLACEHOLDER_IMAGE_GIB: u64 = 256;

#[derive(Debug, Clone)]
enum State {
    Building,
    Ready { memory: PathBuf, state: PathBuf },
    Failed,
}

/// Inputs every template shares.
pub struct TemplateInputs {
    pub root: PathBuf,
    pub run_root: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub placeholder_image: PathBuf,
    pub placeholder_upper: PathBuf,
    pub generation: String,
    /// Owner mark of the template VM's taps.
    pub tap_owner: String,
}

/// The set of templates of one daemon.
pub struct Templates {
    inputs: TemplateInputs,
    hv: Arc<dyn Hypervisor>,
    states: Mutex<HashMap<String, State>>,
}

fn hash(s: &str) -> String {
    hex::encode(&Sha256::digest(s.as_bytes())[..8])
}

impl Templates {
    /// Prepares the template directory: drops templates of another
    /// generation and finds the ready ones.
    pub fn open(inputs: TemplateInputs, hv: Arc<dyn Hypervisor>) -> std::io::Result<Self> {
        std::fs::create_dir_all(&inputs.root)?;
        if !inputs.placeholder_image.exists() {
            let f = std::fs::File::create(&inputs.placeholder_image)?;
            f.set_len(PLACEHOLDER_IMAGE_GIB << 30)?;
        }
        // A template build cut short (the daemon died mid-build) leaves its
        // VM running: end it.
        for e in std::fs::read_dir(&inputs.run_root)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(key) = name.strip_prefix("t-") {
                let name = format!("template-{key}");
                let pid =
                    vessel_vm::qemu::read_pid(&e.path()).filter(|p| vessel_vm::vm_alive(*p, &name));
                if let Some(pid) = pid {
                    vessel_vm::kill_vm(pid, &name);
                }
                vessel_vm::tap::remove_after_exit(pid, vessel_vm::tap_names(&e.path()));
                crate::volumes::remove_run_dir(&e.path());
            }
        }
        let mut states = HashMap::new();
        for e in std::fs::read_dir(&inputs.root)?.flatten() {
            let dir = e.path();
            let generation = std::fs::read_to_string(dir.join("generation")).unwrap_or_default();
            let key = e.file_name().to_string_lossy().to_string();
            if generation == inputs.generation
                && dir.join("state").exists()
                && dir.join("memory").exists()
            {
                states.insert(
                    key,
                    State::Ready {
                        memory: dir.join("memory"),
                        state: dir.join("state"),
                    },
                );
            } else {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        Ok(Self {
            inputs,
            hv,
            states: Mutex::new(states),
        })
    }

    fn key(&self, shape: &VmShape) -> String {
        hash(&format!(
            "{}|{}M|{}cpu",
            self.inputs.generation, shape.memory_mib, shape.vcpus
        ))
    }

    /// How a VM of `shape` should start now: a clone when its template is
    /// ready, otherwise a cold boot (and the template is built meanwhile).
    pub fn boot_for(self: &Arc<Self>, shape: &VmShape) -> Boot {
        let key = self.key(shape);
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        match states.get(&key) {
            Some(State::Ready { memory, state }) => Boot::Clone {
                memory: memory.clone(),
                state: state.clone(),
            },
            Some(State::Building) | Some(State::Failed) => Boot::Cold,
            None => {
                states.insert(key.clone(), State::Building);
                let this = self.clone();
                let shape = shape.clone();
                tokio::task::spawn_blocking(move || this.build(&key, &shape));
                Boot::Cold
            }
        }
    }

    /// Starts building the template of `shape` if it has none.
    pub fn prepare(self: &Arc<Self>, shape: &VmShape) {
        let _ = self.boot_for(shape);
    }

    /// Forgets a template whose clone could not be restored and builds it
    /// again in the background; meanwhile containers of that shape boot cold.
    pub fn invalidate(self: &Arc<Self>, shape: &VmShape) {
        let key = self.key(shape);
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        let _ = std::fs::remove_dir_all(self.inputs.root.join(&key));
        self.prepare(shape);
    }

    fn build(&self, key: &str, shape: &VmShape) {
        let started = std::time::Instant::now();
        let dir = self.inputs.root.join(key);
        let result = (|| -> Result<State, String> {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let memory = dir.join("memory");
            let state = dir.join("state");
            let spec = VmSpec {
                name: format!("template-{key}"),
                run_dir: self.inputs.run_root.join(format!("t-{key}")),
                kernel: self.inputs.kernel.clone(),
                initrd: self.inputs.initrd.clone(),
                image_disk: self.inputs.placeholder_image.clone(),
                upper_disk: self.inputs.placeholder_upper.clone(),
                memory_mib: shape.memory_mib,
                vcpus: shape.vcpus,
                boot: Boot::Template {
                    memory: memory.clone(),
                },
                background: false,
                taps: vessel_vm::tap_names(&self.inputs.run_root.join(format!("t-{key}"))),
                tap_owner: self.inputs.tap_owner.clone(),
            };
            let r = self
                .hv
                .build_template(&spec, &state)
                .map_err(|e| e.to_string());
            crate::volumes::remove_run_dir(&spec.run_dir);
            r?;
            write_file(&dir.join("generation"), &self.inputs.generation)?;
            Ok(State::Ready { memory, state })
        })();
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(s) => {
                info!(
                    key,
                    memory_mib = shape.memory_mib,
                    vcpus = shape.vcpus,
                    build_ms = started.elapsed().as_millis() as u64,
                    "VM template ready"
                );
                states.insert(key.to_string(), s);
            }
            Err(e) => {
                warn!(
                    key,
                    "VM template build failed, containers of this shape boot cold: {e}"
                );
                let _ = std::fs::remove_dir_all(&dir);
                states.insert(key.to_string(), State::Failed);
            }
        }
    }
}

fn write_file(p: &Path, s: &str) -> Result<(), String> {
    std::fs::write(p, s).map_err(|e| format!("write {}: {e}", p.display()))
}
