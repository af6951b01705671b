//! The persisted record of a container and how it is shown through the API.

use std::collections::HashMap;

use bollard_stubs::models::{
    ContainerConfig, ContainerInspectResponse, ContainerState, ContainerStateStatusEnum,
    ContainerSummary, ContainerSummaryHostConfig, ContainerSummaryNetworkSettings,
    ContainerSummaryStateEnum, DriverData, HostConfig, NetworkSettings, PortSummary,
    PortSummaryTypeEnum,
};
use serde::{Deserialize, Serialize};

/// Lifecycle status of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Created, never started (or its start failed).
    Created,
    /// Its VM runs the process.
    Running,
    /// The process ended.
    Exited,
    /// Being removed.
    Removing,
    /// Could not be cleaned up.
    Dead,
}

impl Status {
    /// Docker's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Exited => "exited",
            Status::Removing => "removing",
            Status::Dead => "dead",
        }
    }
}

/// The container's state as persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateRecord {
    /// Lifecycle status.
    pub status: Status,
    /// PID of the VM process on the host while running.
    pub pid: Option<u32>,
    /// Exit code of the last run.
    pub exit_code: i64,
    /// Why the last start or run failed.
    pub error: String,
    /// The kernel's OOM killer ended the process.
    pub oom_killed: bool,
    /// RFC 3339 start time of the last run, if any.
    pub started_at: Option<String>,
    /// RFC 3339 end time of the last run, if any.
    pub finished_at: Option<String>,
    /// The VM is frozen (`docker pause`).
    #[serde(default)]
    pub paused: bool,
    /// Health check state, when the container has a health check.
    #[serde(default)]
    pub health: Option<bollard_stubs::models::Health>,
}

/// How the container's VM is shaped.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VmShape {
    /// Guest memory.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
}

/// Everything Vessel keeps about a container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// 64 hex characters.
    pub id: String,
    /// Name without the leading slash.
    pub name: String,
    /// RFC 3339 creation time.
    pub created: String,
    /// The image as the user named it.
    pub image: String,
    /// The resolved image id (`sha256:…`).
    pub image_id: String,
    /// The effective config (image defaults merged with the request).
    pub config: ContainerConfig,
    /// The host config as requested.
    pub host_config: HostConfig,
    /// Executable and arguments.
    pub path: String,
    /// Arguments after the executable.
    pub args: Vec<String>,
    /// Lifecycle state.
    pub state: StateRecord,
    /// VM shape.
    pub vm: VmShape,
    /// Times the container was restarted by a policy.
    pub restart_count: i64,
    /// The user stopped it (`docker stop`/`kill`): restart policies other
    /// than `always`-at-daemon-start leave it alone.
    #[serde(default)]
    pub manually_stopped: bool,
    /// The writable disk is as `create` made it: no VM has used it yet, so
    /// a warm VM's equally fresh disk may take its place.
    #[serde(default)]
    pub fresh_upper: bool,
    /// The name the current VM runs under, when it is not the container id
    /// (a warm VM started before its container existed).
    #[serde(default)]
    pub vm_name: Option<String>,
    /// The networks the container is on, by network name.
    #[serde(default)]
    pub networks: std::collections::BTreeMap<String, Endpoint>,
    /// Host taps of the current VM's network slots.
    #[serde(default)]
    pub taps: Vec<String>,
    /// Ports published while running.
    #[serde(default)]
    pub published: Vec<PublishedPort>,
    /// Volumes, bind mounts and tmpfs mounts, resolved at create.
    #[serde(default)]
    pub mounts: Vec<crate::MountRecord>,
}

/// A container's place on one network. The address part is set while the
/// container runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The network's id.
    pub network_id: String,
    /// Endpoint id (Docker shows one).
    pub endpoint_id: String,
    /// `--network-alias`.
    pub aliases: Vec<String>,
    /// `--ip`.
    pub requested_ip: Option<String>,
    /// `--mac-address`.
    pub requested_mac: Option<String>,
    /// NIC slot while running.
    pub slot: Option<u8>,
    /// Address while running.
    pub ip: Option<String>,
    /// Prefix length of the network.
    pub prefix: u8,
    /// The network's gateway.
    pub gateway: Option<String>,
    /// This endpoint carries the default route.
    pub default_route: bool,
    /// MAC address while running.
    pub mac: Option<String>,
    /// The network's MTU while running, when it set one.
    #[serde(default)]
    pub mtu: Option<u32>,
}

/// One published port of a running container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    /// Container port.
    pub port: u16,
    /// `tcp` or `udp`.
    pub proto: String,
    /// Host address listened on (`0.0.0.0` for all).
    pub host_ip: String,
    /// Host port.
    pub host_port: u16,
}

impl ContainerRecord {
    /// The name of the container's VM process (see [`vessel_vm::vm_alive`]).
    pub fn vm_name(&self) -> &str {
        self.vm_name.as_deref().unwrap_or(&self.id)
    }

    /// The restart policy's name (`no`, `always`, `unless-stopped`, `on-failure`).
    pub fn restart_policy(&self) -> (String, i64) {
        match &self.host_config.restart_policy {
            Some(rp) => (
                rp.name.as_ref().map(|n| n.to_string()).unwrap_or_default(),
                rp.maximum_retry_count.unwrap_or(0),
            ),
            None => (String::new(), 0),
        }
    }

    /// Whether the policy restarts the container after it exited with `code`.
    pub fn should_restart(&self, code: i64) -> bool {
        let (name, max) = self.restart_policy();
        match name.as_str() {
            "always" | "unless-stopped" => !self.manually_stopped,
            "on-failure" => {
                !self.manually_stopped && code != 0 && (max <= 0 || self.restart_count < max)
            }
            _ => false,
        }
    }
}

const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

impl ContainerRecord {
    /// Whether the container runs.
    pub fn running(&self) -> bool {
        self.state.status == Status::Running
    }

    /// `starting`, `healthy`, `unhealthy`, or `none` without a health check.
    pub fn health_status(&self) -> &'static str {
        use bollard_stubs::models::HealthStatusEnum as H;
        match self.state.health.as_ref().and_then(|h| h.status) {
            Some(H::STARTING) => "starting",
            Some(H::HEALTHY) => "healthy",
            Some(H::UNHEALTHY) => "unhealthy",
            _ => "none",
        }
    }

    /// `sh -c 'x'` as `docker ps` shows it.
    pub fn command(&self) -> String {
        let mut parts = vec![self.path.clone()];
        parts.extend(self.args.iter().cloned());
        parts.join(" ")
    }

    /// Docker's `Status` column text: `Up 3 seconds`, `Exited (0) 2 minutes ago`, `Created`.
    pub fn status_text(&self) -> String {
        match self.state.status {
            Status::Running if self.state.paused => {
                format!("Up {} (Paused)", since(self.state.started_at.as_deref()))
            }
            Status::Running => {
                let up = format!("Up {}", since(self.state.started_at.as_deref()));
                match self.health_status() {
                    "starting" => format!("{up} (health: starting)"),
                    "healthy" => format!("{up} (healthy)"),
                    "unhealthy" => format!("{up} (unhealthy)"),
                    _ => up,
                }
            }
            Status::Exited => format!(
                "Exited ({}) {} ago",
                self.state.exit_code,
                since(self.state.finished_at.as_deref())
            ),
            Status::Created => "Created".into(),
            Status::Removing => "Removal In Progress".into(),
            Status::Dead => "Dead".into(),
        }
    }

    /// The `docker inspect` document.
    pub fn inspect(&self, log_path: String, hostname_path: String) -> ContainerInspectResponse {
        let s = &self.state;
        let status = match s.status {
            Status::Created => ContainerStateStatusEnum::CREATED,
            Status::Running if s.paused => ContainerStateStatusEnum::PAUSED,
            Status::Running => ContainerStateStatusEnum::RUNNING,
            Status::Exited => ContainerStateStatusEnum::EXITED,
            Status::Removing => ContainerStateStatusEnum::REMOVING,
            Status::Dead => ContainerStateStatusEnum::DEAD,
        };
        ContainerInspectResponse {
            id: Some(self.id.clone()),
            created: Some(self.created.clone()),
            path: Some(self.path.clone()),
            args: Some(self.args.clone()),
            state: Some(ContainerState {
                status: Some(status),
                running: Some(self.running()),
                paused: Some(s.paused),
                restarting: Some(false),
                oom_killed: Some(s.oom_killed),
                dead: Some(s.status == Status::Dead),
                pid: Some(if self.running() {
                    i64::from(s.pid.unwrap_or(0))
                } else {
                    0
                }),
                exit_code: Some(s.exit_code),
                error: Some(s.error.clone()),
                started_at: Some(s.started_at.clone().unwrap_or_else(|| ZERO_TIME.into())),
                finished_at: Some(s.finished_at.clone().unwrap_or_else(|| ZERO_TIME.into())),
                health: s.health.clone(),
            }),
            image: Some(self.image_id.clone()),
            resolv_conf_path: Some(String::new()),
            hostname_path: Some(hostname_path),
            hosts_path: Some(String::new()),
            log_path: Some(log_path),
            name: Some(format!("/{}", self.name)),
            restart_count: Some(self.restart_count),
            driver: Some("vessel-overlay".into()),
            platform: Some("linux".into()),
            mount_label: Some(String::new()),
            process_label: Some(String::new()),
            app_armor_profile: Some(String::new()),
            exec_ids: None,
            host_config: Some(self.host_config.clone()),
            graph_driver: Some(DriverData {
                name: "vessel-overlay".into(),
                data: HashMap::new(),
            }),
            mounts: Some(self.mounts.iter().map(crate::MountRecord::point).collect()),
            config: Some(self.config.clone()),
            network_settings: Some(NetworkSettings {
                networks: Some(
                    self.networks
                        .iter()
                        .map(|(name, ep)| {
                            (name.clone(), crate::network::endpoint_settings(self, ep))
                        })
                        .collect(),
                ),
                ports: Some(self.port_map()),
                sandbox_id: Some(String::new()),
                sandbox_key: Some(String::new()),
            }),
            ..Default::default()
        }
    }

    /// `NetworkSettings.Ports`: every exposed port, with its host
    /// bindings while running (Docker shows `{}` for a stopped container).
    pub fn port_map(&self) -> bollard_stubs::models::PortMap {
        let mut map = bollard_stubs::models::PortMap::new();
        if !self.running() {
            return map;
        }
        for key in self.config.exposed_ports.iter().flatten() {
            map.insert(key.clone(), None);
        }
        for p in &self.published {
            map.entry(format!("{}/{}", p.port, p.proto))
                .or_insert(None)
                .get_or_insert_with(Vec::new)
                .push(bollard_stubs::models::PortBinding {
                    host_ip: Some(p.host_ip.clone()),
                    host_port: Some(p.host_port.to_string()),
                });
        }
        map
    }

    /// The `docker ps` row.
    pub fn summary(&self) -> ContainerSummary {
        let state = match self.state.status {
            Status::Created => ContainerSummaryStateEnum::CREATED,
            Status::Running if self.state.paused => ContainerSummaryStateEnum::PAUSED,
            Status::Running => ContainerSummaryStateEnum::RUNNING,
            Status::Exited => ContainerSummaryStateEnum::EXITED,
            Status::Removing => ContainerSummaryStateEnum::REMOVING,
            Status::Dead => ContainerSummaryStateEnum::DEAD,
        };
        let created = chrono::DateTime::parse_from_rfc3339(&self.created)
            .map(|t| t.timestamp())
            .unwrap_or(0);
        ContainerSummary {
            id: Some(self.id.clone()),
            names: Some(vec![format!("/{}", self.name)]),
            image: Some(self.image.clone()),
            image_id: Some(self.image_id.clone()),
            command: Some(self.command()),
            created: Some(created),
            ports: Some(
                self.published
                    .iter()
                    .map(|p| PortSummary {
                        ip: Some(p.host_ip.clone()),
                        private_port: p.port,
                        public_port: Some(p.host_port),
                        typ: Some(if p.proto == "udp" {
                            PortSummaryTypeEnum::UDP
                        } else {
                            PortSummaryTypeEnum::TCP
                        }),
                    })
                    .collect(),
            ),
            labels: Some(self.config.labels.clone().unwrap_or_default()),
            state: Some(state),
            status: Some(self.status_text()),
            host_config: Some(ContainerSummaryHostConfig {
                network_mode: Some(
                    self.host_config
                        .network_mode
                        .clone()
                        .filter(|m| !m.is_empty())
                        .unwrap_or_else(|| "bridge".into()),
                ),
                ..Default::default()
            }),
            network_settings: Some(ContainerSummaryNetworkSettings {
                networks: Some(
                    self.networks
                        .iter()
                        .map(|(name, ep)| {
                            (name.clone(), crate::network::endpoint_settings(self, ep))
                        })
                        .collect(),
                ),
            }),
            mounts: Some(self.mounts.iter().map(crate::MountRecord::point).collect()),
            ..Default::default()
        }
    }
}

fn since(t: Option<&str>) -> String {
    let Some(t) = t.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()) else {
        return "Less than a second".into();
    };
    let secs = (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    human_duration(secs)
}

/// Docker's `units.HumanDuration`.
pub fn human_duration(secs: i64) -> String {
    match secs {
        s if s < 1 => "Less than a second".into(),
        1 => "1 second".into(),
        s if s < 60 => format!("{s} seconds"),
        s if s / 60 == 1 => "About a minute".into(),
        s if s / 60 < 60 => format!("{} minutes", s / 60),
        s if (s as f64 / 3600.0).round() as i64 == 1 => "About an hour".into(),
        s if s / 3600 < 48 => format!("{} hours", s / 3600),
        s if s / 86400 < 14 => format!("{} days", s / 86400),
        s if s / 86400 < 60 => format!("{} weeks", s / 86400 / 7),
        s if s / 86400 < 365 * 2 => format!("{} months", s / 86400 / 30),
        s => format!("{} years", s / 86400 / 365),
    }
}

#[cfg(test)]
mod tests {
    use super::human_duration;

    #[test]
    fn durations_read_like_docker() {
        assert_eq!(human_duration(0), "Less than a second");
        assert_eq!(human_duration(5), "5 seconds");
        assert_eq!(human_duration(70), "About a minute");
        assert_eq!(human_duration(600), "10 minutes");
        assert_eq!(human_duration(3 * 3600), "3 hours");
    }
}
