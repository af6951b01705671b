//! Volumes of Vessel: the `local` volume driver's store.
//!
//! Owns `<data-root>/volumes`: one directory per volume holding its data
//! (`_data`, the volume's mountpoint, as Docker lays it out) and its
//! metadata (`volume.json`: driver, creation time, labels, driver options).
//! It validates names and options as Docker's local driver does, creates
//! volumes atomically (a crash leaves either a whole volume or none), lists
//! and removes them, measures their size, and mounts the filesystem a
//! volume's options ask for (`type`, `device`, `o`) on its data directory.
//! [`host`] holds the host mount primitives the engine uses to hand volumes
//! and bind mounts to VMs, and the removal that never crosses a mount.
//!
//! It must not know about containers or VMs: which containers use a volume
//! (and so whether it may be removed or pruned) is the engine's to track. A
//! volume name can never name a path outside `<data-root>/volumes`: names
//! are checked against Docker's pattern before any path is built.

pub mod host;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The only volume driver.
pub const LOCAL_DRIVER: &str = "local";
/// Label Docker puts on volumes made without a name.
pub const ANONYMOUS_LABEL: &str = "com.docker.volume.anonymous";
/// A volume's data directory, inside its own directory.
pub const DATA_DIR: &str = "_data";
const META_FILE: &str = "volume.json";
const TMP_PREFIX: &str = ".tmp-";

/// Errors of the volume store, each of which maps to one Docker status.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 409.
    #[error("{0}")]
    Conflict(String),
    /// 400.
    #[error("{0}")]
    Invalid(String),
    /// 500: a file or mount operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Cause.
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VolumeError {
    let context = context.into();
    move |source| VolumeError::Io { context, source }
}

/// A volume as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Its name.
    pub name: String,
    /// Always [`LOCAL_DRIVER`].
    pub driver: String,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// User labels (and [`ANONYMOUS_LABEL`] for anonymous volumes).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Driver options (`type`, `device`, `o`).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Where its data lives on the host (not persisted: derived from the
    /// store's root, so a moved data root keeps working).
    #[serde(skip)]
    pub mountpoint: PathBuf,
}

impl Volume {
    /// Whether it was made without a name (for a container).
    pub fn anonymous(&self) -> bool {
        self.labels.contains_key(ANONYMOUS_LABEL)
    }

    /// Whether its options ask for a filesystem to be mounted on its data
    /// directory while containers use it.
    pub fn needs_mount(&self) -> bool {
        self.options.contains_key("type") || self.options.contains_key("device")
    }
}

/// Checks a volume name against Docker's rule
/// (`[a-zA-Z0-9][a-zA-Z0-9_.-]+`), with Docker's messages.
pub fn validate_name(name: &str) -> Result<(), VolumeError> {
    let ok_first = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_rest = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok_first && ok_rest && name.len() == 1 {
        return Err(VolumeError::Invalid(format!(
            "create {name}: volume name is too short, names should be at least two alphanumeric characters"
        )));
    }
    if !(ok_first && ok_rest) {
        return Err(VolumeError::Invalid(format!(
            "create {name}: \"{name}\" includes invalid characters for a local volume name, only \"[a-zA-Z0-9][a-zA-Z0-9_.-]\" are allowed. If you intended to pass a host directory, use absolute path"
        )));
    }
    Ok(())
}

/// Checks the local driver's options as Docker does: only `type`, `o`,
/// `device` (and `size`, which needs quotas this driver does not have);
/// `device` and `type` need each other, `o` needs both.
pub fn validate_options(name: &str, opts: &BTreeMap<String, String>) -> Result<(), VolumeError> {
    let bad = |m: String| VolumeError::Invalid(format!("create {name}: {m}"));
    for k in opts.keys() {
        if !["type", "o", "device", "size"].contains(&k.as_str()) {
            return Err(bad(format!("invalid option: {k:?}")));
        }
    }
    if let Some(size) = opts.get("size") {
        if parse_size(size).is_none() {
            return Err(bad(format!("invalid size: '{size}'")));
        }
        if parse_size(size) != Some(0) {
            return Err(bad("quota size requested but no quota support".into()));
        }
    }
    let mandatory: [(&str, &[&str]); 3] = [
        ("device", &["type"]),
        ("type", &["device"]),
        ("o", &["device", "type"]),
    ];
    for (opt, needs) in mandatory {
        if opts.contains_key(opt) {
            for need in needs {
                if !opts.contains_key(*need) {
                    return Err(bad(format!("missing required option: {need:?}")));
                }
            }
        }
    }
    Ok(())
}

/// Docker's `RAMInBytes`: `512`, `64k`, `1.5m`, `2g` (binary units).
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim().to_ascii_lowercase();
    let s = s.strip_suffix('b').unwrap_or(&s);
    let (num, mul) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1u64 << 10),
        'm' => (&s[..s.len() - 1], 1 << 20),
        'g' => (&s[..s.len() - 1], 1 << 30),
        't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: f64 = num.parse().ok()?;
    (n >= 0.0).then_some((n * mul as f64) as u64)
}

/// The volumes under one data root.
pub struct VolumeStore {
    root: PathBuf,
    lock: Mutex<()>,
}

impl VolumeStore {
    /// Opens (creating) `root`, and drops half-made volumes a crash left.
    pub fn open(root: &Path) -> Result<Self, VolumeError> {
        std::fs::create_dir_all(root).map_err(io_err(format!("create {}", root.display())))?;
        let rd = std::fs::read_dir(root).map_err(io_err(format!("read {}", root.display())))?;
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                host::remove_tree(&e.path())
                    .map_err(io_err(format!("remove {}", e.path().display())))?;
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            lock: Mutex::new(()),
        })
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Where volume `name` keeps its data (the name must be valid).
    pub fn data_path(&self, name: &str) -> PathBuf {
        self.dir(name).join(DATA_DIR)
    }

    /// Creates a volume, or returns the existing one of that name (as
    /// Docker does). `None` as name makes an anonymous volume with a random
    /// 64-hex name. Returns the volume and whether it was made now.
    pub fn create(
        &self,
        name: Option<&str>,
        driver: Option<&str>,
        options: BTreeMap<String, String>,
        mut labels: BTreeMap<String, String>,
    ) -> Result<(Volume, bool), VolumeError> {
        let name = match name.filter(|n| !n.is_empty()) {
            Some(n) => n.to_string(),
            None => {
                labels.insert(ANONYMOUS_LABEL.into(), String::new());
                let mut b = [0u8; 32];
                rand::Rng::fill(&mut rand::rng(), &mut b);
                hex::encode(b)
            }
        };
        validate_name(&name)?;
        let driver = driver.filter(|d| !d.is_empty()).unwrap_or(LOCAL_DRIVER);
        if driver != LOCAL_DRIVER {
            return Err(VolumeError::NotFound(format!(
                "create {name}: error looking up volume plugin {driver}: plugin \"{driver}\" not found"
            )));
        }
        validate_options(&name, &options)?;
        let _g = self.guard();
        if let Some(v) = self.load(&name)? {
            return Ok((v, false));
        }
        let mut b = [0u8; 8];
        rand::Rng::fill(&mut rand::rng(), &mut b);
        let tmp = self.root.join(format!("{TMP_PREFIX}{}", hex::encode(b)));
        let vol = Volume {
            name: name.clone(),
            driver: LOCAL_DRIVER.into(),
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            labels,
            options,
            mountpoint: self.data_path(&name),
        };
        let made = (|| {
            std::fs::create_dir_all(tmp.join(DATA_DIR))
                .map_err(io_err(format!("create {}", tmp.display())))?;
            write_synced(&tmp.join(META_FILE), &vol)?;
            std::fs::rename(&tmp, self.dir(&name))
                .map_err(io_err(format!("create volume directory for {name}")))?;
            sync_dir(&self.root)
        })();
        if let Err(e) = made {
            let _ = host::remove_tree(&tmp);
            return Err(e);
        }
        Ok((vol, true))
    }

    fn load(&self, name: &str) -> Result<Option<Volume>, VolumeError> {
        let dir = self.dir(name);
        let meta = dir.join(META_FILE);
        match std::fs::read(&meta) {
            Ok(bytes) => {
                let mut v: Volume =
                    serde_json::from_slice(&bytes).map_err(|e| VolumeError::Io {
                        context: format!("read {}", meta.display()),
                        source: std::io::Error::other(e),
                    })?;
                v.mountpoint = self.data_path(name);
                v.name = name.to_string();
                Ok(Some(v))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A volume directory without metadata (made by hand, or by
                // an older layout): a plain local volume.
                if dir.join(DATA_DIR).is_dir() {
                    let created = std::fs::metadata(&dir)
                        .and_then(|m| m.modified())
                        .map(chrono::DateTime::<chrono::Utc>::from)
                        .unwrap_or_else(|_| chrono::Utc::now());
                    Ok(Some(Volume {
                        name: name.to_string(),
                        driver: LOCAL_DRIVER.into(),
                        created_at: created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        labels: BTreeMap::new(),
                        options: BTreeMap::new(),
                        mountpoint: self.data_path(name),
                    }))
                } else {
                    Ok(None)
                }
            }
            Err(e) => Err(VolumeError::Io {
                context: format!("read {}", meta.display()),
                source: e,
            }),
        }
    }

    /// Volume `name`, or Docker's 404.
    pub fn get(&self, name: &str) -> Result<Volume, VolumeError> {
        let missing = || VolumeError::NotFound(format!("get {name}: no such volume"));
        if validate_name(name).is_err() {
            return Err(missing());
        }
        self.load(name)?.ok_or_else(missing)
    }

    /// Every volume, by name.
    pub fn list(&self) -> Result<Vec<Volume>, VolumeError> {
        let rd = std::fs::read_dir(&self.root)
            .map_err(io_err(format!("read {}", self.root.display())))?;
        let mut out = vec![];
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if validate_name(&name).is_err() {
                continue;
            }
            if let Some(v) = self.load(&name)? {
                out.push(v);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Deletes volume `name` and its data. The caller has checked that no
    /// container uses it.
    pub fn remove(&self, name: &str) -> Result<(), VolumeError> {
        let v = self.get(name)?;
        let _g = self.guard();
        if v.needs_mount() {
            self.deactivate_locked(&v)?;
        }
        // Renamed away first: a crash in the middle leaves a `.tmp-`
        // directory (removed at the next start), never half a volume.
        let mut b = [0u8; 8];
        rand::Rng::fill(&mut rand::rng(), &mut b);
        let doomed = self.root.join(format!("{TMP_PREFIX}{}", hex::encode(b)));
        std::fs::rename(self.dir(name), &doomed)
            .map_err(io_err(format!("remove volume {name}")))?;
        host::remove_tree(&doomed).map_err(io_err(format!("remove volume {name}")))
    }

    /// Mounts the filesystem the volume's options name (`mount -t TYPE -o
    /// O DEVICE`) on its data directory unless it is mounted already, and
    /// returns the data directory. A volume without such options needs
    /// nothing.
    pub fn activate(&self, v: &Volume) -> Result<PathBuf, VolumeError> {
        let path = self.data_path(&v.name);
        if !v.needs_mount() {
            return Ok(path);
        }
        let _g = self.guard();
        if host::is_mount_point(&path).map_err(io_err("read mountinfo"))? {
            return Ok(path);
        }
        let mut cmd = std::process::Command::new("mount");
        cmd.arg("-t")
            .arg(v.options.get("type").map_or("", String::as_str));
        if let Some(o) = v.options.get("o").filter(|o| !o.is_empty()) {
            cmd.arg("-o").arg(o);
        }
        cmd.arg(v.options.get("device").map_or("", String::as_str))
            .arg(&path);
        let out = cmd.output().map_err(io_err("run mount"))?;
        if !out.status.success() {
            return Err(VolumeError::Io {
                context: format!("error while mounting volume '{}'", path.display()),
                source: std::io::Error::other(format!(
                    "failed to mount local volume: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
            });
        }
        Ok(path)
    }

    /// Unmounts what [`activate`](Self::activate) mounted (no container
    /// uses the volume any more).
    pub fn deactivate(&self, v: &Volume) -> Result<(), VolumeError> {
        if !v.needs_mount() {
            return Ok(());
        }
        let _g = self.guard();
        self.deactivate_locked(v)
    }

    fn deactivate_locked(&self, v: &Volume) -> Result<(), VolumeError> {
        let path = self.data_path(&v.name);
        host::unmount_under(&path).map_err(io_err(format!("unmount volume {}", v.name)))
    }

    /// Bytes the volume's data takes.
    pub fn size(&self, v: &Volume) -> u64 {
        host::disk_usage(&self.data_path(&v.name))
    }
}

fn write_synced(path: &Path, v: &Volume) -> Result<(), VolumeError> {
    let bytes = serde_json::to_vec_pretty(v).map_err(|e| VolumeError::Io {
        context: "encode volume metadata".into(),
        source: std::io::Error::other(e),
    })?;
    let mut f =
        std::fs::File::create(path).map_err(io_err(format!("create {}", path.display())))?;
    f.write_all(&bytes)
        .and_then(|_| f.sync_all())
        .map_err(io_err(format!("write {}", path.display())))
}

fn sync_dir(dir: &Path) -> Result<(), VolumeError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(format!("sync {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn names_follow_dockers_rule() {
        for ok in ["ab", "a1", "my_vol.v-2", "0x"] {
            validate_name(ok).expect(ok);
        }
        for bad in [
            "", "a", "_ab", ".ab", "..", "a/b", "../x", "/abs", "a b", "a:b", "ä1",
        ] {
            assert!(validate_name(bad).is_err(), "{bad} accepted");
        }
        let e = validate_name("a/b").expect_err("slash");
        assert!(
            e.to_string().starts_with(
                "create a/b: \"a/b\" includes invalid characters for a local volume name"
            ),
            "{e}"
        );
    }

    #[test]
    fn options_are_checked_as_the_local_driver_does() {
        validate_options("v", &map(&[])).expect("none");
        validate_options(
            "v",
            &map(&[("type", "tmpfs"), ("device", "tmpfs"), ("o", "size=1m")]),
        )
        .expect("tmpfs");
        let e = validate_options("v", &map(&[("foo", "bar")])).expect_err("unknown");
        assert_eq!(e.to_string(), "create v: invalid option: \"foo\"");
        let e = validate_options("v", &map(&[("type", "tmpfs")])).expect_err("no device");
        assert_eq!(
            e.to_string(),
            "create v: missing required option: \"device\""
        );
        let e = validate_options("v", &map(&[("size", "10m")])).expect_err("quota");
        assert!(e.to_string().contains("no quota support"));
        validate_options("v", &map(&[("size", "0")])).expect("size 0 is no quota");
    }

    #[test]
    fn create_get_list_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = VolumeStore::open(&dir.path().join("volumes")).expect("open");
        let (v, made) = store
            .create(Some("data"), None, map(&[]), map(&[("a", "b")]))
            .expect("create");
        assert!(made);
        assert_eq!(v.mountpoint, dir.path().join("volumes/data/_data"));
        assert!(v.mountpoint.is_dir());
        std::fs::write(v.mountpoint.join("f"), "x").expect("write");
        // Creating it again returns it, data and labels untouched.
        let (again, made) = store
            .create(Some("data"), Some("local"), map(&[]), map(&[]))
            .expect("again");
        assert!(!made);
        assert_eq!(again.labels, map(&[("a", "b")]));
        assert!(again.mountpoint.join("f").exists());

        let (anon, _) = store.create(None, None, map(&[]), map(&[])).expect("anon");
        assert_eq!(anon.name.len(), 64);
        assert!(anon.anonymous());
        assert!(!v.anonymous());
        let names: Vec<String> = store
            .list()
            .expect("list")
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names.len(), 2);
        assert!(names.contains(&"data".to_string()));

        // A reopened store finds them by name.
        drop(store);
        let store = VolumeStore::open(&dir.path().join("volumes")).expect("reopen");
        let got = store.get("data").expect("get");
        assert_eq!(got.created_at, v.created_at);
        assert!(store.size(&got) > 0);

        let e = store.get("nope").expect_err("missing");
        assert!(matches!(e, VolumeError::NotFound(_)));
        assert_eq!(e.to_string(), "get nope: no such volume");
        let e = store.get("../volumes").expect_err("escape");
        assert!(matches!(e, VolumeError::NotFound(_)));
        let e = store
            .create(Some("x"), Some("nfs-plugin"), map(&[]), map(&[]))
            .expect_err("driver");
        assert!(matches!(
            e,
            VolumeError::Invalid(_) | VolumeError::NotFound(_)
        ));

        store.remove("data").expect("remove");
        assert!(!dir.path().join("volumes/data").exists());
        assert!(matches!(
            store.remove("data"),
            Err(VolumeError::NotFound(_))
        ));
        // Nothing but the anonymous volume is left, no temporary directory.
        let left: Vec<_> = std::fs::read_dir(dir.path().join("volumes"))
            .expect("read")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(left, vec![anon.name.clone()]);
    }

    #[test]
    fn a_half_made_volume_is_dropped_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("volumes");
        std::fs::create_dir_all(root.join(".tmp-0011/_data")).expect("mkdir");
        let store = VolumeStore::open(&root).expect("open");
        assert!(store.list().expect("list").is_empty());
        assert!(!root.join(".tmp-0011").exists());
    }

    #[test]
    fn sizes_parse_like_docker() {
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("1m"), Some(1 << 20));
        assert_eq!(parse_size("2GB"), Some(2 << 30));
        assert_eq!(parse_size("x"), None);
    }
}
