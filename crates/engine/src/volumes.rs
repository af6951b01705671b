//! Volumes and mounts of containers: Docker's mount rules at create
//! (`-v`, `--mount`, `--volumes-from`, the image's `VOLUME`s), the volume
//! API (create, list, inspect, remove, prune, disk usage) with in-use
//! tracking, and the host side of handing mounts to a VM.
//!
//! A container's mounts are resolved once, at create, into
//! [`MountRecord`]s kept in its record. At each start every volume and bind
//! mount is bind-mounted on the host into the VM's shared directory
//! (`<run_dir>/share/<n>`, exported to the guest over 9p) and listed in the
//! process spec; the agent binds them onto their targets. When the VM ends
//! the share mounts are detached. Run directories are only ever removed
//! with [`remove_run_dir`], which detaches mounts first and never crosses
//! into one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use bollard_stubs::models::{
    ContainerConfig, HostConfig, Mount, MountPoint, MountType, Volume, VolumeCreateRequest,
    VolumeScopeEnum, VolumeUsageData,
};
use serde::{Deserialize, Serialize};
use tracing::warn;
use vessel_protocol::{MountSpec, ProcessSpec};
use vessel_volume::{host, VolumeError, VolumeStore};

use crate::{blocking, ContainerRecord, Engine, EngineError, EventType};

impl From<VolumeError> for EngineError {
    fn from(e: VolumeError) -> Self {
        match e {
            VolumeError::NotFound(m) => EngineError::NotFound(m),
            VolumeError::Conflict(m) => EngineError::Conflict(m),
            VolumeError::Invalid(m) => EngineError::InvalidParameter(m),
            other => EngineError::Internal(other.to_string()),
        }
    }
}

/// One mount of a container, as resolved at create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MountRecord {
    /// `volume`, `bind` or `tmpfs`.
    pub kind: String,
    /// Volume name (volumes only).
    #[serde(default)]
    pub name: String,
    /// Host path: the volume's data directory or the bound path.
    #[serde(default)]
    pub source: String,
    /// Path in the container.
    pub destination: String,
    /// Mode as Docker shows it (`z` for volumes, the `-v` mode for binds).
    #[serde(default)]
    pub mode: String,
    /// Writable.
    pub rw: bool,
    /// Bind propagation as Docker shows it.
    #[serde(default)]
    pub propagation: String,
    /// Fill an empty volume from the image at start (not `nocopy`).
    #[serde(default)]
    pub copy_data: bool,
    /// A `-v` bind whose missing source is created at start (as Docker);
    /// `--mount type=bind` refuses a missing source instead.
    #[serde(default)]
    pub create_source: bool,
    /// tmpfs options as `mount -o` takes them.
    #[serde(default)]
    pub tmpfs_options: String,
}

impl MountRecord {
    /// The `Mounts` entry of `docker inspect`.
    pub fn point(&self) -> MountPoint {
        MountPoint {
            typ: Some(self.kind.clone()),
            name: (self.kind == "volume").then(|| self.name.clone()),
            source: Some(self.source.clone()),
            destination: Some(self.destination.clone()),
            driver: (self.kind == "volume").then(|| vessel_volume::LOCAL_DRIVER.to_string()),
            mode: Some(self.mode.clone()),
            rw: Some(self.rw),
            propagation: Some(self.propagation.clone()),
        }
    }
}

/// Removes a VM's run directory: its share mounts are detached first and
/// the removal never enters another mount, so a volume's or the user's
/// data can never be deleted with it.
pub(crate) fn remove_run_dir(path: &Path) {
    if let Err(e) = host::remove_tree(path) {
        warn!(dir = %path.display(), "removing a VM's run directory: {e}");
    }
}

fn clean(p: &str) -> String {
    let mut parts: Vec<&str> = vec![];
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

fn mount_config(kind: &str, msg: impl std::fmt::Display) -> EngineError {
    EngineError::InvalidParameter(format!("invalid mount config for type \"{kind}\": {msg}"))
}

fn check_target(kind: &str, target: &str) -> Result<String, EngineError> {
    if target.is_empty() {
        return Err(mount_config(kind, "field Target must not be empty"));
    }
    if !target.starts_with('/') {
        return Err(mount_config(
            kind,
            format!("invalid mount path: '{target}' mount path must be absolute"),
        ));
    }
    let t = clean(target);
    if t == "/" {
        return Err(mount_config(
            kind,
            "invalid specification: destination can't be '/'",
        ));
    }
    Ok(t)
}

/// What `-v`'s mode may hold (Docker's `linuxValidMountMode`).
fn valid_mode(mode: &str) -> bool {
    if mode.is_empty() {
        return true;
    }
    let mut seen = [0u8; 5];
    for o in mode.split(',') {
        let class = match o {
            "rw" | "ro" => 0,
            "z" | "Z" => 1,
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" => 2,
            "nocopy" => 3,
            "consistent" | "cached" | "delegated" => 4,
            _ => return false,
        };
        seen[class] += 1;
        if seen[class] > 1 {
            return false;
        }
    }
    true
}

fn propagation_of(mode: &str) -> Option<String> {
    mode.split(',')
        .find(|o| {
            [
                "private", "rprivate", "shared", "rshared", "slave", "rslave",
            ]
            .contains(o)
        })
        .map(str::to_string)
}

/// A volume a container asks for, before the store has it.
struct WantVolume {
    name: Option<String>,
    options: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
}

enum Planned {
    Ready(MountRecord),
    Volume(MountRecord, WantVolume),
}

impl Planned {
    fn destination(&self) -> &str {
        match self {
            Planned::Ready(m) | Planned::Volume(m, _) => &m.destination,
        }
    }
}

/// `-v SRC:DST[:MODE]` (or `-v DST` through the API).
fn parse_bind(raw: &str) -> Result<Planned, EngineError> {
    let invalid =
        || EngineError::InvalidParameter(format!("invalid volume specification: '{raw}'"));
    let parts: Vec<&str> = raw.splitn(4, ':').collect();
    if parts[0].is_empty() {
        return Err(invalid());
    }
    let (source, target, mode) = match parts.as_slice() {
        [t] => ("", *t, ""),
        [s, t] => {
            if valid_mode(t) {
                return Err(invalid());
            }
            (*s, *t, "")
        }
        [s, t, m] => (*s, *t, *m),
        _ => return Err(invalid()),
    };
    if !valid_mode(mode) {
        return Err(EngineError::InvalidParameter(format!(
            "invalid mode: {mode}"
        )));
    }
    let kind = if source.starts_with('/') {
        "bind"
    } else {
        "volume"
    };
    let destination = check_target(kind, target).map_err(|e| {
        EngineError::InvalidParameter(format!("invalid volume specification: '{raw}': {e}"))
    })?;
    let rw = !mode.split(',').any(|o| o == "ro");
    let nocopy = mode.split(',').any(|o| o == "nocopy");
    if kind == "bind" {
        return Ok(Planned::Ready(MountRecord {
            kind: kind.into(),
            source: clean(source),
            destination,
            mode: mode.into(),
            rw,
            propagation: propagation_of(mode).unwrap_or_else(|| "rprivate".into()),
            create_source: true,
            ..Default::default()
        }));
    }
    Ok(Planned::Volume(
        MountRecord {
            kind: kind.into(),
            destination,
            mode: if mode.is_empty() {
                "z".into()
            } else {
                mode.into()
            },
            rw,
            copy_data: !nocopy,
            ..Default::default()
        },
        WantVolume {
            name: (!source.is_empty()).then(|| source.to_string()),
            options: BTreeMap::new(),
            labels: BTreeMap::new(),
        },
    ))
}

/// Docker's tmpfs options of `--mount type=tmpfs`.
fn tmpfs_options(m: &Mount) -> Result<String, EngineError> {
    let mut opts = vec![];
    if m.read_only == Some(true) {
        opts.push("ro".to_string());
    }
    if let Some(t) = &m.tmpfs_options {
        if let Some(mode) = t.mode.filter(|m| *m != 0) {
            opts.push(format!("mode={mode:o}"));
        }
        if let Some(size) = t.size_bytes.filter(|s| *s != 0) {
            if size < 0 {
                return Err(mount_config("tmpfs", format!("invalid tmpfs size: {size}")));
            }
            let (mut n, mut suffix) = (size, "");
            for (s, d) in [("g", 1i64 << 30), ("m", 1 << 20), ("k", 1 << 10)] {
                if size % d == 0 {
                    n = size / d;
                    suffix = s;
                    break;
                }
            }
            opts.push(format!("size={n}{suffix}"));
        }
        for o in t.options.iter().flatten() {
            match o.as_slice() {
                [k] if k == "exec" || k == "noexec" => opts.push(k.clone()),
                [k, v] if k == "exec" || k == "noexec" => opts.push(format!("{k}={v}")),
                [k, ..] => return Err(mount_config("tmpfs", format!("invalid option: {k}"))),
                [] => return Err(mount_config("tmpfs", "invalid option array length")),
            }
        }
    }
    Ok(opts.join(","))
}

/// `--mount` (HostConfig.Mounts).
fn parse_mount(m: &Mount) -> Result<Planned, EngineError> {
    let kind = m.typ.map(|t| t.to_string()).unwrap_or_default();
    let kind = if kind.is_empty() {
        "bind".to_string()
    } else {
        kind
    };
    let destination = check_target(&kind, m.target.as_deref().unwrap_or(""))?;
    let source = m.source.clone().unwrap_or_default();
    let ro = m.read_only == Some(true);
    match m.typ {
        Some(MountType::BIND) | None => {
            if source.is_empty() {
                return Err(mount_config("bind", "field Source must not be empty"));
            }
            if m.volume_options.is_some() {
                return Err(mount_config(
                    "bind",
                    "field VolumeOptions must not be specified",
                ));
            }
            if m.tmpfs_options.is_some() {
                return Err(mount_config(
                    "bind",
                    "field TmpfsOptions must not be specified",
                ));
            }
            if !source.starts_with('/') {
                return Err(mount_config(
                    "bind",
                    format!("invalid mount path: '{source}' mount path must be absolute"),
                ));
            }
            let create = m
                .bind_options
                .as_ref()
                .and_then(|b| b.create_mountpoint)
                .unwrap_or(false);
            if !create && std::fs::metadata(&source).is_err() {
                return Err(mount_config(
                    "bind",
                    format!("bind source path does not exist: {source}"),
                ));
            }
            let propagation = m
                .bind_options
                .as_ref()
                .and_then(|b| b.propagation)
                .map(|p| p.to_string())
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "rprivate".into());
            Ok(Planned::Ready(MountRecord {
                kind: "bind".into(),
                source: clean(&source),
                destination,
                rw: !ro,
                propagation,
                create_source: create,
                ..Default::default()
            }))
        }
        Some(MountType::VOLUME) => {
            if m.bind_options.is_some() {
                return Err(mount_config(
                    "volume",
                    "field BindOptions must not be specified",
                ));
            }
            if m.tmpfs_options.is_some() {
                return Err(mount_config(
                    "volume",
                    "field TmpfsOptions must not be specified",
                ));
            }
            let vo = m.volume_options.clone().unwrap_or_default();
            if vo.subpath.as_deref().is_some_and(|s| !s.is_empty()) {
                return Err(mount_config("volume", "volume subpaths are not supported"));
            }
            if ro && source.is_empty() {
                return Err(mount_config(
                    "volume",
                    "must not set ReadOnly mode when using anonymous volumes",
                ));
            }
            let driver = vo.driver_config.clone().unwrap_or_default();
            if let Some(d) = driver
                .name
                .as_deref()
                .filter(|d| !d.is_empty() && *d != "local")
            {
                return Err(EngineError::NotFound(format!(
                    "error looking up volume plugin {d}: plugin \"{d}\" not found"
                )));
            }
            Ok(Planned::Volume(
                MountRecord {
                    kind: "volume".into(),
                    destination,
                    mode: "z".into(),
                    rw: !ro,
                    copy_data: !vo.no_copy.unwrap_or(false),
                    ..Default::default()
                },
                WantVolume {
                    name: (!source.is_empty()).then_some(source),
                    options: driver.options.unwrap_or_default().into_iter().collect(),
                    labels: vo.labels.unwrap_or_default().into_iter().collect(),
                },
            ))
        }
        Some(MountType::TMPFS) => {
            if !source.is_empty() {
                return Err(mount_config("tmpfs", "field Source must not be specified"));
            }
            if m.bind_options.is_some() {
                return Err(mount_config(
                    "tmpfs",
                    "field BindOptions must not be specified",
                ));
            }
            if m.volume_options.is_some() {
                return Err(mount_config(
                    "tmpfs",
                    "field VolumeOptions must not be specified",
                ));
            }
            Ok(Planned::Ready(MountRecord {
                kind: "tmpfs".into(),
                destination,
                rw: !ro,
                tmpfs_options: tmpfs_options(m)?,
                ..Default::default()
            }))
        }
        Some(other) => Err(mount_config(
            &other.to_string(),
            format!("mount type {other} is not supported"),
        )),
    }
}

fn duplicate(dest: &str) -> EngineError {
    EngineError::InvalidParameter(format!("Duplicate mount point: {dest}"))
}

fn volume_model(v: &vessel_volume::Volume, usage: Option<VolumeUsageData>) -> Volume {
    Volume {
        name: v.name.clone(),
        driver: v.driver.clone(),
        mountpoint: v.mountpoint.display().to_string(),
        created_at: Some(v.created_at.clone()),
        status: None,
        labels: v.labels.clone().into_iter().collect(),
        scope: Some(VolumeScopeEnum::LOCAL),
        cluster_volume: None,
        options: v.options.clone().into_iter().collect(),
        usage_data: usage,
    }
}

impl Engine {
    fn volume_event(&self, action: &str, name: &str, extra: &[(&str, String)]) {
        let mut attrs = HashMap::new();
        attrs.insert(
            "driver".to_string(),
            vessel_volume::LOCAL_DRIVER.to_string(),
        );
        for (k, v) in extra {
            attrs.insert((*k).to_string(), v.clone());
        }
        self.inner
            .events
            .emit(EventType::VOLUME, action, name, attrs);
    }

    /// Containers (ids) whose mounts use volume `name`.
    fn volume_users(&self, name: &str) -> Vec<String> {
        self.handles()
            .iter()
            .map(|h| h.rec())
            .filter(|r| {
                r.mounts
                    .iter()
                    .any(|m| m.kind == "volume" && m.name == name)
            })
            .map(|r| r.id)
            .collect()
    }

    /// Resolves the mounts of a container being created, as Docker does:
    /// `--volumes-from` first, then `-v` binds and `--mount`s (which
    /// replace what they overlap, and may not overlap each other or a
    /// `--tmpfs`), then an anonymous volume for every `VOLUME` of the image
    /// and config not mounted otherwise. Volumes are created here; the
    /// names of those made now are returned so that a failed create can
    /// remove them again.
    pub(crate) async fn plan_mounts(
        &self,
        hc: &HostConfig,
        image_volumes: &[String],
        config: &mut ContainerConfig,
    ) -> Result<(Vec<MountRecord>, Vec<String>), EngineError> {
        // The image's `VOLUME`s join the config's, as in Docker's inspect.
        let mut config_volumes: Vec<String> = image_volumes.to_vec();
        for v in config.volumes.iter().flatten() {
            if !config_volumes.contains(v) {
                config_volumes.push(v.clone());
            }
        }
        if !config_volumes.is_empty() {
            config.volumes = Some(config_volumes.clone());
        }
        let mut mounts: BTreeMap<String, Planned> = BTreeMap::new();
        for spec in hc.volumes_from.iter().flatten() {
            if spec.is_empty() {
                return Err(EngineError::InvalidParameter(
                    "volumes-from specification cannot be an empty string".into(),
                ));
            }
            let (id, mode) = spec.split_once(':').unwrap_or((spec, "rw"));
            if !valid_mode(mode) || propagation_of(mode).is_some() || mode.contains("nocopy") {
                return Err(EngineError::InvalidParameter(format!(
                    "invalid mode: {mode}"
                )));
            }
            let ro = mode.split(',').any(|o| o == "ro");
            let from = self.lookup(id)?.rec();
            for m in from.mounts.iter().filter(|m| m.kind != "tmpfs") {
                let mut m = m.clone();
                m.rw = m.rw && !ro;
                m.copy_data = false;
                m.create_source = m.kind == "bind";
                mounts.insert(m.destination.clone(), Planned::Ready(m));
            }
        }
        let tmpfs: HashSet<String> = hc
            .tmpfs
            .iter()
            .flat_map(|t| t.keys())
            .map(|k| clean(k.split(':').next().unwrap_or(k)))
            .collect();
        let mut explicit: HashSet<String> = HashSet::new();
        let binds = hc.binds.iter().flatten().map(|b| parse_bind(b));
        let specs = hc.mounts.iter().flatten().map(parse_mount);
        for planned in binds.chain(specs) {
            let planned = planned?;
            let dest = planned.destination().to_string();
            if !explicit.insert(dest.clone()) || tmpfs.contains(&dest) {
                return Err(duplicate(&dest));
            }
            mounts.insert(dest, planned);
        }
        for v in &config_volumes {
            let dest = clean(v);
            if mounts.contains_key(&dest) || tmpfs.contains(&dest) {
                continue;
            }
            check_target("volume", v)?;
            mounts.insert(
                dest.clone(),
                Planned::Volume(
                    MountRecord {
                        kind: "volume".into(),
                        destination: dest,
                        rw: true,
                        copy_data: true,
                        ..Default::default()
                    },
                    WantVolume {
                        name: None,
                        options: BTreeMap::new(),
                        labels: BTreeMap::new(),
                    },
                ),
            );
        }
        // Names first: nothing is made when one of them is wrong.
        for p in mounts.values() {
            if let Planned::Volume(_, w) = p {
                if let Some(n) = &w.name {
                    vessel_volume::validate_name(n)?;
                }
                vessel_volume::validate_options(w.name.as_deref().unwrap_or(""), &w.options)?;
            }
        }
        let mut made = vec![];
        let mut out = vec![];
        for (_, p) in mounts {
            match p {
                Planned::Ready(m) => out.push(m),
                Planned::Volume(mut m, want) => {
                    let store = self.inner.volumes.clone();
                    let created = blocking(move || {
                        store.create(want.name.as_deref(), None, want.options, want.labels)
                    })
                    .await?;
                    match created {
                        Ok((v, fresh)) => {
                            if fresh {
                                self.volume_event("create", &v.name, &[]);
                                made.push(v.name.clone());
                            }
                            m.name = v.name.clone();
                            m.source = v.mountpoint.display().to_string();
                            out.push(m);
                        }
                        Err(e) => {
                            self.drop_volumes(&made).await;
                            return Err(e.into());
                        }
                    }
                }
            }
        }
        Ok((out, made))
    }

    /// Removes volumes a failed create made.
    pub(crate) async fn drop_volumes(&self, names: &[String]) {
        for n in names {
            let store = self.inner.volumes.clone();
            let name = n.clone();
            match blocking(move || store.remove(&name)).await {
                Ok(Ok(())) => self.volume_event("destroy", n, &[]),
                Ok(Err(e)) => warn!(volume = %n, "removing a volume of a failed create: {e}"),
                Err(e) => warn!(volume = %n, "removing a volume of a failed create: {e}"),
            }
        }
    }

    /// Bind-mounts every volume and bind mount of `rec` into the VM's
    /// shared directory and lists them (and `--mount type=tmpfs`) in
    /// `spec`. On failure nothing stays mounted. Returns the share entries
    /// to make read-only once the process has started
    /// ([`seal_mounts`](Self::seal_mounts)).
    pub(crate) async fn share_mounts(
        &self,
        rec: &ContainerRecord,
        run_dir: &Path,
        spec: &mut ProcessSpec,
    ) -> Result<Vec<PathBuf>, EngineError> {
        if rec.mounts.is_empty() {
            return Ok(vec![]);
        }
        let share = run_dir.join(vessel_vm::qemu::SHARE_DIR);
        let mounts = rec.mounts.clone();
        let store = self.inner.volumes.clone();
        let shared = blocking(move || {
            let r = mount_shares(&store, &mounts, &share);
            if r.is_err() {
                let _ = host::unmount_under(&share);
            }
            r
        })
        .await??;
        for m in &rec.mounts {
            if m.kind == "tmpfs" {
                spec.tmpfs
                    .push((m.destination.clone(), m.tmpfs_options.clone()));
            }
        }
        let (shared, seal) = shared;
        spec.mounts = shared;
        for m in rec.mounts.iter().filter(|m| m.kind == "volume") {
            self.volume_event(
                "mount",
                &m.name,
                &[
                    ("container", rec.id.clone()),
                    ("destination", m.destination.clone()),
                    ("propagation", m.propagation.clone()),
                    ("read/write", m.rw.to_string()),
                ],
            );
        }
        Ok(seal)
    }

    /// Makes read-only the share entries of read-only volumes that the
    /// guest filled from the image during the start.
    pub(crate) async fn seal_mounts(
        &self,
        id: &str,
        seal: Vec<PathBuf>,
    ) -> Result<(), EngineError> {
        if seal.is_empty() {
            return Ok(());
        }
        blocking(move || seal.iter().try_for_each(|p| host::remount_read_only(p)))
            .await?
            .map_err(|e| EngineError::Internal(format!("container {id}: {e}")))
    }

    /// Detaches a VM's share mounts after it ended, and unmounts the
    /// filesystems of volumes (`type`/`device` options) no running
    /// container uses any more.
    pub(crate) async fn release_mounts(&self, rec: &ContainerRecord, run_dir: &Path) {
        if rec.mounts.is_empty() {
            return;
        }
        let share = run_dir.join(vessel_vm::qemu::SHARE_DIR);
        let running: HashSet<String> = self
            .handles()
            .iter()
            .map(|h| h.rec())
            .filter(|r| r.running() && r.id != rec.id)
            .flat_map(|r| r.mounts.into_iter().map(|m| m.name))
            .collect();
        let idle: Vec<String> = rec
            .mounts
            .iter()
            .filter(|m| m.kind == "volume" && !running.contains(&m.name))
            .map(|m| m.name.clone())
            .collect();
        let store = self.inner.volumes.clone();
        let r = blocking(move || {
            host::unmount_under(&share)?;
            for n in idle {
                if let Ok(v) = store.get(&n) {
                    store.deactivate(&v).map_err(std::io::Error::other)?;
                }
            }
            Ok::<(), std::io::Error>(())
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(id = %rec.id, "releasing the container's mounts: {e}"),
            Err(e) => warn!(id = %rec.id, "releasing the container's mounts: {e}"),
        }
        for m in rec.mounts.iter().filter(|m| m.kind == "volume") {
            self.volume_event("unmount", &m.name, &[("container", rec.id.clone())]);
        }
    }

    /// At daemon start: detaches share mounts of VMs that are gone (the
    /// daemon or a VM died while they were mounted), and volume
    /// filesystems no running container uses.
    pub(crate) fn release_stale_mounts(&self) {
        let recs: Vec<ContainerRecord> = self.handles().iter().map(|h| h.rec()).collect();
        let live: Vec<PathBuf> = recs
            .iter()
            .filter(|r| r.running())
            .map(|r| self.run_dir(&r.id))
            .collect();
        let vm_root = self.inner.cfg.data_root.join("vm");
        match host::mounts_under(&vm_root) {
            Ok(points) => {
                for p in points {
                    if !live.iter().any(|l| p.starts_with(l)) {
                        if let Err(e) = host::unmount(&p) {
                            warn!(mount = %p.display(), "detaching a stale share mount: {e}");
                        }
                    }
                }
            }
            Err(e) => warn!("reading mountinfo: {e}"),
        }
        let used: HashSet<String> = recs
            .iter()
            .filter(|r| r.running())
            .flat_map(|r| r.mounts.iter().map(|m| m.name.clone()))
            .collect();
        for v in self.inner.volumes.list().unwrap_or_default() {
            if v.needs_mount() && !used.contains(&v.name) {
                if let Err(e) = self.inner.volumes.deactivate(&v) {
                    warn!(volume = %v.name, "{e}");
                }
            }
        }
    }

    /// Removes the anonymous volumes of a removed container that no other
    /// container uses (`docker rm -v`, `--rm`).
    pub(crate) async fn remove_anonymous_volumes(&self, rec: &ContainerRecord) {
        for m in rec.mounts.iter().filter(|m| m.kind == "volume") {
            let Ok(v) = self.inner.volumes.get(&m.name) else {
                continue;
            };
            if !v.anonymous() || !self.volume_users(&v.name).is_empty() {
                continue;
            }
            self.drop_volumes(std::slice::from_ref(&v.name)).await;
        }
    }

    /// `POST /volumes/create`.
    pub async fn volume_create(&self, req: VolumeCreateRequest) -> Result<Volume, EngineError> {
        let _g = self.inner.create_lock.lock().await;
        let store = self.inner.volumes.clone();
        let (v, made) = blocking(move || {
            store.create(
                req.name.as_deref(),
                req.driver.as_deref(),
                req.driver_opts.unwrap_or_default().into_iter().collect(),
                req.labels.unwrap_or_default().into_iter().collect(),
            )
        })
        .await??;
        if made {
            self.volume_event("create", &v.name, &[]);
        }
        Ok(volume_model(&v, None))
    }

    /// `GET /volumes/{name}`.
    pub fn volume_inspect(&self, name: &str) -> Result<Volume, EngineError> {
        Ok(volume_model(&self.inner.volumes.get(name)?, None))
    }

    /// `GET /volumes`, with Docker's filters (`dangling`, `label`, `name`,
    /// `driver`).
    pub fn volume_list(
        &self,
        filters: &HashMap<String, Vec<String>>,
    ) -> Result<Vec<Volume>, EngineError> {
        for k in filters.keys() {
            if !["dangling", "label", "name", "driver"].contains(&k.as_str()) {
                return Err(EngineError::InvalidParameter(format!(
                    "invalid filter '{k}'"
                )));
            }
        }
        let dangling = match filters.get("dangling").and_then(|v| v.first()) {
            None => None,
            Some(v) => match v.as_str() {
                "true" | "1" => Some(true),
                "false" | "0" => Some(false),
                other => {
                    return Err(EngineError::InvalidParameter(format!(
                        "invalid filter 'dangling={other}'"
                    )))
                }
            },
        };
        let used = self.used_volumes();
        Ok(self
            .inner
            .volumes
            .list()?
            .into_iter()
            .filter(|v| dangling.is_none_or(|d| d != used.contains(&v.name)))
            .filter(|v| {
                filters
                    .get("name")
                    .is_none_or(|ns| ns.iter().any(|n| v.name.contains(n.as_str())))
            })
            .filter(|v| {
                filters
                    .get("driver")
                    .is_none_or(|ds| ds.iter().any(|d| v.driver.contains(d.as_str())))
            })
            .filter(|v| labels_match(&v.labels, filters.get("label"), true))
            .map(|v| volume_model(&v, None))
            .collect())
    }

    fn used_volumes(&self) -> HashSet<String> {
        self.handles()
            .iter()
            .flat_map(|h| h.rec().mounts.into_iter())
            .filter(|m| m.kind == "volume")
            .map(|m| m.name)
            .collect()
    }

    /// `DELETE /volumes/{name}`: 409 while a container uses it; `force`
    /// only makes a missing volume no error (as Docker).
    pub async fn volume_remove(&self, name: &str, force: bool) -> Result<(), EngineError> {
        let _g = self.inner.create_lock.lock().await;
        let v = match self.inner.volumes.get(name) {
            Ok(v) => v,
            Err(VolumeError::NotFound(_)) if force => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let users = self.volume_users(&v.name);
        if !users.is_empty() {
            return Err(EngineError::Conflict(format!(
                "remove {name}: volume is in use - [{}]",
                users.join(", ")
            )));
        }
        let store = self.inner.volumes.clone();
        let n = v.name.clone();
        blocking(move || store.remove(&n)).await??;
        self.volume_event("destroy", &v.name, &[]);
        Ok(())
    }

    /// `POST /volumes/prune`: removes unused volumes; only anonymous ones
    /// unless `all` (API ≥ 1.42 semantics; older clients prune all).
    /// Filters: `label`, `label!`, `all`. Returns the names and the bytes
    /// freed.
    pub async fn volume_prune(
        &self,
        filters: &HashMap<String, Vec<String>>,
        anonymous_only_by_default: bool,
    ) -> Result<(Vec<String>, u64), EngineError> {
        for k in filters.keys() {
            if !["label", "label!", "all"].contains(&k.as_str()) {
                return Err(EngineError::InvalidParameter(format!(
                    "invalid filter '{k}'"
                )));
            }
        }
        let all = match filters
            .get("all")
            .and_then(|v| v.first())
            .map(String::as_str)
        {
            None => !anonymous_only_by_default,
            Some("true" | "1") => true,
            Some("false" | "0") => false,
            Some(other) => {
                return Err(EngineError::InvalidParameter(format!(
                    "invalid filter 'all={other}'"
                )))
            }
        };
        let _g = self.inner.create_lock.lock().await;
        let used = self.used_volumes();
        let mut removed = vec![];
        let mut freed = 0u64;
        for v in self.inner.volumes.list()? {
            if used.contains(&v.name)
                || (!all && !v.anonymous())
                || !labels_match(&v.labels, filters.get("label"), true)
                || !labels_match(&v.labels, filters.get("label!"), false)
            {
                continue;
            }
            let store = self.inner.volumes.clone();
            let n = v.name.clone();
            let r = blocking(move || {
                let size = store.get(&n).map(|v| store.size(&v)).unwrap_or(0);
                store.remove(&n).map(|_| size)
            })
            .await?;
            match r {
                Ok(size) => {
                    freed += size;
                    self.volume_event("destroy", &v.name, &[]);
                    removed.push(v.name);
                }
                Err(e) => warn!(volume = %v.name, "prune: {e}"),
            }
        }
        self.inner.events.emit(
            EventType::VOLUME,
            "prune",
            "",
            HashMap::from([("reclaimed".to_string(), freed.to_string())]),
        );
        Ok((removed, freed))
    }

    /// The volumes of `GET /system/df`, with their size and how many
    /// containers use them.
    pub async fn volumes_disk_usage(&self) -> Result<Vec<Volume>, EngineError> {
        let mut refs: HashMap<String, i64> = HashMap::new();
        for h in self.handles() {
            for m in h.rec().mounts.iter().filter(|m| m.kind == "volume") {
                *refs.entry(m.name.clone()).or_default() += 1;
            }
        }
        let store = self.inner.volumes.clone();
        let sized = blocking(move || {
            store.list().map(|vs| {
                vs.into_iter()
                    .map(|v| (store.size(&v), v))
                    .collect::<Vec<_>>()
            })
        })
        .await??;
        Ok(sized
            .into_iter()
            .map(|(size, v)| {
                let usage = VolumeUsageData {
                    size: size as i64,
                    ref_count: refs.get(&v.name).copied().unwrap_or(0),
                };
                volume_model(&v, Some(usage))
            })
            .collect())
    }
}

/// Docker's label filter: `key` or `key=value`; all must match (or, for
/// `label!`, none).
fn labels_match(
    labels: &BTreeMap<String, String>,
    wanted: Option<&Vec<String>>,
    positive: bool,
) -> bool {
    let Some(wanted) = wanted else { return true };
    let hit = |l: &String| crate::filters::label_matches(l, |k| labels.get(k));
    if positive {
        wanted.iter().all(hit)
    } else {
        !wanted.iter().any(hit)
    }
}

/// The host side of [`Engine::share_mounts`]: one entry per volume or bind
/// mount under `share`, bind-mounted from its source.
#[allow(clippy::type_complexity)]
fn mount_shares(
    store: &VolumeStore,
    mounts: &[MountRecord],
    share: &Path,
) -> Result<(Vec<MountSpec>, Vec<PathBuf>), EngineError> {
    let io = |what: String| move |e: std::io::Error| EngineError::Internal(format!("{what}: {e}"));
    std::fs::create_dir_all(share).map_err(io(format!("create {}", share.display())))?;
    let mut out = vec![];
    let mut seal = vec![];
    for (i, m) in mounts.iter().enumerate() {
        let src = match m.kind.as_str() {
            "volume" => {
                let v = store.get(&m.name)?;
                store.activate(&v)?
            }
            "bind" => {
                let src = PathBuf::from(&m.source);
                if std::fs::metadata(&src).is_err() {
                    if !m.create_source {
                        return Err(mount_config(
                            "bind",
                            format!("bind source path does not exist: {}", m.source),
                        ));
                    }
                    std::fs::create_dir_all(&src)
                        .map_err(io(format!("create bind source {}", src.display())))?;
                }
                src
            }
            _ => continue,
        };
        let file = !std::fs::metadata(&src)
            .map_err(io(format!("stat {}", src.display())))?
            .is_dir();
        let dst = share.join(i.to_string());
        if file {
            std::fs::File::create(&dst).map_err(io(format!("create {}", dst.display())))?;
        } else {
            std::fs::create_dir_all(&dst).map_err(io(format!("create {}", dst.display())))?;
        }
        // A read-only volume the guest may still fill from the image stays
        // writable on the host until the process has started (see
        // `Engine::seal_mounts`); the guest's bind is read-only throughout.
        let copy_up = m.kind == "volume" && m.copy_data;
        let fill_first = copy_up && !m.rw && !file && dir_is_empty(&src);
        host::bind(&src, &dst, !m.rw && !fill_first)
            .map_err(io(format!("mount for {}", m.destination)))?;
        if fill_first {
            seal.push(dst.clone());
        }
        out.push(MountSpec {
            share_dir: i.to_string(),
            target: m.destination.clone(),
            read_only: !m.rw,
            copy_up,
            file,
        });
    }
    Ok((out, seal))
}

fn dir_is_empty(p: &Path) -> bool {
    std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind_of(raw: &str) -> Result<MountRecord, EngineError> {
        match parse_bind(raw)? {
            Planned::Ready(m) => Ok(m),
            Planned::Volume(m, w) => Ok(MountRecord {
                name: w.name.unwrap_or_default(),
                ..m
            }),
        }
    }

    #[test]
    fn binds_parse_as_docker_parses_them() {
        let m = bind_of("/host/dir/:/data:ro").expect("bind");
        assert_eq!((m.kind.as_str(), m.source.as_str()), ("bind", "/host/dir"));
        assert_eq!((m.destination.as_str(), m.rw), ("/data", false));
        assert_eq!(
            (m.mode.as_str(), m.propagation.as_str()),
            ("ro", "rprivate")
        );
        assert!(m.create_source);
        let m = bind_of("cache:/var/cache/:nocopy").expect("volume");
        assert_eq!((m.kind.as_str(), m.name.as_str()), ("volume", "cache"));
        assert_eq!(m.destination, "/var/cache");
        assert!(m.rw && !m.copy_data);
        let m = bind_of("vol:/x").expect("volume");
        assert_eq!(m.mode, "z");
        assert!(m.copy_data);
        let m = bind_of("/only/target").expect("anonymous");
        assert_eq!((m.kind.as_str(), m.name.as_str()), ("volume", ""));

        for (raw, msg) in [
            ("/a:ro", "invalid volume specification: '/a:ro'"),
            ("v:/x:bogus", "invalid mode: bogus"),
            ("v:/x:ro,rw", "invalid mode: ro,rw"),
            (
                "v:rel",
                "invalid volume specification: 'v:rel': invalid mount config for type \"volume\": invalid mount path: 'rel' mount path must be absolute",
            ),
            ("/h:/", "destination can't be '/'"),
            (":/x", "invalid volume specification: ':/x'"),
        ] {
            let e = bind_of(raw).expect_err(raw).to_string();
            assert!(e.contains(msg), "{raw}: {e}");
        }
    }

    #[test]
    fn mounts_are_checked_as_docker_checks_them() {
        let mk = |typ, source: &str, target: &str| Mount {
            typ: Some(typ),
            source: (!source.is_empty()).then(|| source.to_string()),
            target: Some(target.to_string()),
            ..Default::default()
        };
        let e = parse_mount(&mk(MountType::BIND, "/nonexistent/vessel", "/x"))
            .err()
            .expect("missing source");
        assert_eq!(
            e.to_string(),
            "invalid mount config for type \"bind\": bind source path does not exist: /nonexistent/vessel"
        );
        assert!(matches!(e, EngineError::InvalidParameter(_)));
        let e = parse_mount(&mk(MountType::BIND, "", "/x"))
            .err()
            .expect("no source");
        assert!(e.to_string().contains("field Source must not be empty"));
        let mut anon_ro = mk(MountType::VOLUME, "", "/x");
        anon_ro.read_only = Some(true);
        let e = parse_mount(&anon_ro).err().expect("ro anonymous");
        assert!(e.to_string().contains("must not set ReadOnly mode"));
        let mut t = mk(MountType::TMPFS, "", "/t");
        t.tmpfs_options = Some(bollard_stubs::models::MountTmpfsOptions {
            size_bytes: Some(64 << 20),
            mode: Some(0o1777),
            options: Some(vec![vec!["exec".into()]]),
        });
        match parse_mount(&t).expect("tmpfs") {
            Planned::Ready(m) => assert_eq!(m.tmpfs_options, "mode=1777,size=64m,exec"),
            Planned::Volume(..) => panic!("tmpfs is no volume"),
        }
        let e = parse_mount(&mk(MountType::VOLUME, "v", "rel"))
            .err()
            .expect("relative");
        assert!(e.to_string().contains("must be absolute"));
        match parse_mount(&mk(MountType::BIND, "/tmp", "/h")).expect("bind") {
            Planned::Ready(m) => {
                assert_eq!(m.point().typ.as_deref(), Some("bind"));
                assert_eq!(m.point().propagation.as_deref(), Some("rprivate"));
                assert!(!m.create_source);
            }
            Planned::Volume(..) => panic!("bind is no volume"),
        }
    }

    #[test]
    fn paths_are_cleaned() {
        assert_eq!(clean("/a//b/./c/"), "/a/b/c");
        assert_eq!(clean("/a/../../b"), "/b");
    }
}
