//! Container networks: Docker's network objects (the predefined `bridge`,
//! `host` and `none`, and user-defined bridge networks), each container's
//! endpoints on them, and turning both into host state through
//! `vessel-network` (bridges, taps joined to them, the firewall table).
//!
//! A container VM has [`vessel_vm::NIC_SLOTS`] network slots, each backed by
//! a host tap (see `vessel_vm::tap`). Joining a network means: an address from the
//! network's plan, the tap of a free slot joined to the network's bridge,
//! and the guest agent told the slot's MAC and address.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Mutex;

use bollard_stubs::models::{
    EndpointIpamConfig, EndpointResource, EndpointSettings, Ipam, IpamConfig, NetworkCreateRequest,
    NetworkInspect,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use vessel_network::firewall::{Firewall, NetRules, Trust, TRUST_OPTION};
use vessel_network::ipam::{self, Subnet};
use vessel_protocol::InterfaceSpec;

use crate::record::{ContainerRecord, Endpoint, Status};
use crate::{internal, now_rfc3339, EngineError, EventType};

const TABLE: &str = "networks";
/// Docker's option naming a bridge network's host bridge.
const BRIDGE_NAME_OPTION: &str = "com.docker.network.bridge.name";
/// Docker's bridge driver options Vessel honours (others are kept and shown,
/// as the bridge driver keeps options it does not know).
const ICC_OPTION: &str = "com.docker.network.bridge.enable_icc";
const MASQUERADE_OPTION: &str = "com.docker.network.bridge.enable_ip_masquerade";
const MTU_OPTION: &str = "com.docker.network.driver.mtu";

/// A boolean driver option as Go's `strconv.ParseBool` reads it, with the
/// bridge driver's error.
fn bool_option(options: &HashMap<String, String>, key: &str) -> Result<Option<bool>, EngineError> {
    let Some(v) = options.get(key) else {
        return Ok(None);
    };
    match v.as_str() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(Some(true)),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(Some(false)),
        _ => Err(EngineError::InvalidParameter(format!(
            "failed to parse {key} value: {v} (strconv.ParseBool: parsing \"{v}\": invalid syntax)"
        ))),
    }
}

/// `com.docker.network.driver.mtu`: 68 (IPv4's minimum) to 65535.
fn mtu_option(options: &HashMap<String, String>) -> Result<Option<u32>, EngineError> {
    let Some(v) = options.get(MTU_OPTION) else {
        return Ok(None);
    };
    let mtu: i64 = v.parse().map_err(|_| {
        EngineError::InvalidParameter(format!(
            "failed to parse {MTU_OPTION} value: {v} (strconv.Atoi: parsing \"{v}\": invalid syntax)"
        ))
    })?;
    if !(68..=65535).contains(&mtu) {
        return Err(EngineError::InvalidParameter(format!(
            "invalid MTU number: {mtu}"
        )));
    }
    Ok(u32::try_from(mtu).ok())
}

/// How the daemon's own networks are set up (`vessel daemon` flags).
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// Host bridge of the default `bridge` network; also names the
    /// daemon's firewall table.
    pub bridge_name: String,
    /// Subnet of the default network (`--bip`); a free one when `None`.
    pub bip: Option<String>,
}

/// A network as persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// 64 hex characters.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// `bridge`, `host` or `null`.
    pub driver: String,
    /// RFC 3339 creation time.
    pub created: String,
    /// IPv4 subnet (bridge networks).
    pub subnet: Option<Subnet>,
    /// Gateway: the host's address on the bridge.
    pub gateway: Option<Ipv4Addr>,
    /// `--ip-range`: where dynamic addresses come from.
    pub ip_range: Option<Subnet>,
    /// The user chose the subnet (needed for `--ip`).
    pub user_subnet: bool,
    /// `--internal`.
    pub internal: bool,
    /// `--attachable`.
    pub attachable: bool,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// Driver options as given.
    pub options: HashMap<String, String>,
    /// Host bridge (bridge networks).
    pub bridge: String,
    /// Firewall trust level.
    pub trust: Trust,
}

impl NetworkRecord {
    /// `enable_icc` (default true): containers of the network reach each
    /// other (and the trust level allows it).
    pub fn icc(&self) -> bool {
        self.trust.peers() && bool_option(&self.options, ICC_OPTION).ok().flatten() != Some(false)
    }

    /// `enable_ip_masquerade` (default true).
    pub fn masquerade(&self) -> bool {
        bool_option(&self.options, MASQUERADE_OPTION).ok().flatten() != Some(false)
    }

    /// The MTU of the network's interfaces, when the user chose one.
    pub fn mtu(&self) -> Option<u32> {
        mtu_option(&self.options).ok().flatten()
    }

    /// One of the three networks every daemon has.
    pub fn predefined(&self) -> bool {
        matches!(self.name.as_str(), "bridge" | "host" | "none")
    }

    fn is_bridge(&self) -> bool {
        self.driver == "bridge"
    }

    fn rules(&self) -> Option<NetRules> {
        Some(NetRules {
            bridge: self.bridge.clone(),
            subnet: self.subnet?,
            gateway: self.gateway?,
            internal: self.internal,
            trust: self.trust,
            masquerade: self.masquerade(),
        })
    }

    /// The network as `docker network inspect` shows it; `containers` are
    /// the endpoints of running containers.
    pub fn inspect(&self, containers: HashMap<String, EndpointResource>) -> NetworkInspect {
        let config = self
            .subnet
            .map(|s| {
                vec![IpamConfig {
                    subnet: Some(s.to_string()),
                    ip_range: self.ip_range.map(|r| r.to_string()),
                    gateway: self.gateway.map(|g| g.to_string()),
                    auxiliary_addresses: None,
                }]
            })
            .unwrap_or_default();
        NetworkInspect {
            name: Some(self.name.clone()),
            id: Some(self.id.clone()),
            created: Some(self.created.clone()),
            scope: Some("local".into()),
            driver: Some(self.driver.clone()),
            enable_ipv4: Some(self.is_bridge()),
            enable_ipv6: Some(false),
            ipam: Some(Ipam {
                driver: Some("default".into()),
                config: Some(config),
                options: Some(HashMap::new()),
            }),
            internal: Some(self.internal),
            attachable: Some(self.attachable),
            ingress: Some(false),
            config_only: Some(false),
            options: Some(self.options.clone()),
            labels: Some(self.labels.clone()),
            containers: Some(containers),
            ..Default::default()
        }
    }
}

/// The networks of one daemon and its firewall.
pub(crate) struct Networks {
    cfg: NetworkConfig,
    firewall: Firewall,
    table: Mutex<BTreeMap<String, NetworkRecord>>,
    /// Held while addresses are handed out, so two starts never pick the
    /// same one.
    pub(crate) alloc: Mutex<()>,
}

fn random_id() -> String {
    let mut b = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut b);
    hex::encode(b)
}

fn net_err(e: vessel_network::NetError) -> EngineError {
    match e {
        vessel_network::NetError::Invalid(m) => EngineError::InvalidParameter(m),
        vessel_network::NetError::Host(m) => EngineError::Internal(m),
    }
}

impl Networks {
    /// Loads the networks, creates the predefined ones on first use, and
    /// makes the host match: bridges up, firewall table written.
    pub(crate) fn open(
        cfg: NetworkConfig,
        store: &vessel_store::Store,
    ) -> Result<Self, EngineError> {
        let table_name = format!("vessel_{}", cfg.bridge_name.replace('-', "_"));
        let this = Self {
            firewall: Firewall::new(table_name),
            cfg,
            table: Mutex::new(BTreeMap::new()),
            alloc: Mutex::new(()),
        };
        let stored: Vec<(String, NetworkRecord)> = store
            .list(TABLE)
            .map_err(|e| internal("load networks", e))?;
        {
            let mut t = this.lock();
            for (id, n) in stored {
                t.insert(id, n);
            }
        }
        let _host_lock = vessel_network::HostLock::acquire().map_err(net_err)?;
        for (name, driver) in [("bridge", "bridge"), ("host", "host"), ("none", "null")] {
            if this.find_exact(name).is_some() {
                continue;
            }
            let mut n = NetworkRecord {
                id: random_id(),
                name: name.into(),
                driver: driver.into(),
                created: now_rfc3339(),
                subnet: None,
                gateway: None,
                ip_range: None,
                user_subnet: false,
                internal: false,
                attachable: false,
                labels: HashMap::new(),
                options: HashMap::new(),
                bridge: String::new(),
                trust: Trust::Open,
            };
            if name == "bridge" {
                let subnet = match &this.cfg.bip {
                    Some(b) => {
                        let s: Subnet = b.parse().map_err(net_err)?;
                        n.gateway = b.split('/').next().and_then(|a| a.parse().ok());
                        n.user_subnet = true;
                        s
                    }
                    None => this.free_subnet()?,
                };
                n.gateway = n
                    .gateway
                    .filter(|g| *g != subnet.network())
                    .or(Some(subnet.first_host()));
                n.subnet = Some(subnet);
                n.bridge = this.cfg.bridge_name.clone();
                n.options
                    .insert(BRIDGE_NAME_OPTION.into(), n.bridge.clone());
            }
            store
                .put(TABLE, &n.id, &n)
                .map_err(|e| internal("save network", e))?;
            this.lock().insert(n.id.clone(), n);
        }
        vessel_network::enable_forwarding().map_err(net_err)?;
        let owner = this.cfg.bridge_name.clone();
        for n in this.all().iter().filter(|n| n.is_bridge()) {
            if let (Some(s), Some(g)) = (n.subnet, n.gateway) {
                vessel_network::bridge::ensure_bridge(&n.bridge, g, &s, &owner, n.mtu())
                    .map_err(net_err)?;
            }
        }
        // Bridges of networks this daemon no longer has (a removal cut
        // short) go.
        let known: Vec<String> = this.all().into_iter().map(|n| n.bridge).collect();
        for link in vessel_network::bridge::owned_links(&owner).map_err(net_err)? {
            if !known.contains(&link) {
                warn!(bridge = %link, "removing the bridge of a network that no longer exists");
                vessel_network::bridge::delete_link(&link).map_err(net_err)?;
            }
        }
        this.apply_firewall()?;
        Ok(this)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, NetworkRecord>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every network.
    pub(crate) fn all(&self) -> Vec<NetworkRecord> {
        self.lock().values().cloned().collect()
    }

    fn find_exact(&self, name: &str) -> Option<NetworkRecord> {
        self.lock().values().find(|n| n.name == name).cloned()
    }

    /// Finds a network by full id, name, or unique id prefix.
    pub(crate) fn find(&self, key: &str) -> Result<NetworkRecord, EngineError> {
        let t = self.lock();
        if let Some(n) = t.get(key) {
            return Ok(n.clone());
        }
        if let Some(n) = t.values().find(|n| n.name == key) {
            return Ok(n.clone());
        }
        let matches: Vec<&NetworkRecord> = t
            .values()
            .filter(|n| !key.is_empty() && n.id.starts_with(key))
            .collect();
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(EngineError::NotFound(format!("network {key} not found"))),
            _ => Err(EngineError::NotFound(format!(
                "network {key} is ambiguous ({} matches found based on ID prefix)",
                matches.len()
            ))),
        }
    }

    fn free_subnet(&self) -> Result<Subnet, EngineError> {
        let mut taken: Vec<Subnet> = self.lock().values().filter_map(|n| n.subnet).collect();
        taken.extend(ipam::host_subnets().map_err(net_err)?);
        ipam::pick_subnet(&ipam::default_pools(), &taken).ok_or_else(|| {
            EngineError::Forbidden("all predefined address pools have been fully subnetted".into())
        })
    }

    fn apply_firewall(&self) -> Result<(), EngineError> {
        let rules: Vec<NetRules> = self.lock().values().filter_map(|n| n.rules()).collect();
        self.firewall.apply(&rules).map_err(net_err)
    }

    /// `docker network create`.
    pub(crate) fn create(
        &self,
        store: &vessel_store::Store,
        req: NetworkCreateRequest,
    ) -> Result<NetworkRecord, EngineError> {
        let name = req.name.trim().to_string();
        if name.is_empty() {
            return Err(EngineError::InvalidParameter(
                "network name cannot be empty".into(),
            ));
        }
        if self.find_exact(&name).is_some() {
            return Err(EngineError::Conflict(format!(
                "network with name {name} already exists"
            )));
        }
        let driver = req
            .driver
            .clone()
            .filter(|d| !d.is_empty())
            .unwrap_or("bridge".into());
        if driver != "bridge" {
            return Err(if ["host", "null"].contains(&driver.as_str()) {
                EngineError::Forbidden(format!(
                    "only one instance of \"{driver}\" network is allowed"
                ))
            } else {
                EngineError::NotFound(format!("plugin \"{driver}\" not found"))
            });
        }
        if req.enable_ipv6 == Some(true) {
            return Err(EngineError::InvalidParameter(
                "IPv6 networks are not supported by Vessel yet".into(),
            ));
        }
        let options = req.options.clone().unwrap_or_default();
        let trust = match options.get(TRUST_OPTION) {
            Some(t) => t.parse::<Trust>().map_err(net_err)?,
            None => Trust::Open,
        };
        bool_option(&options, ICC_OPTION)?;
        bool_option(&options, MASQUERADE_OPTION)?;
        let mtu = mtu_option(&options)?;
        let ipam_cfg = req
            .ipam
            .as_ref()
            .and_then(|i| i.config.clone())
            .unwrap_or_default();
        let v4: Vec<&IpamConfig> = ipam_cfg
            .iter()
            .filter(|c| {
                c.subnet
                    .as_deref()
                    .map(|s| !s.contains(':'))
                    .unwrap_or(true)
            })
            .collect();
        if v4.len() > 1 {
            return Err(EngineError::InvalidParameter(
                "a bridge network has one IPv4 subnet".into(),
            ));
        }
        let _alloc = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
        // Held until the bridge has its address, which is how other daemons
        // see the subnet as taken.
        let _host_lock = vessel_network::HostLock::acquire().map_err(net_err)?;
        let (subnet, user_subnet) = match v4.first().and_then(|c| c.subnet.clone()) {
            Some(s) => (s.parse::<Subnet>().map_err(net_err)?, true),
            None => {
                if v4
                    .first()
                    .map(|c| c.gateway.is_some() || c.ip_range.is_some())
                    == Some(true)
                {
                    return Err(EngineError::InvalidParameter(
                        "a gateway or an IP range needs a subnet (--subnet)".into(),
                    ));
                }
                (self.free_subnet()?, false)
            }
        };
        if subnet.prefix() > 30 {
            return Err(EngineError::InvalidParameter(format!(
                "subnet {subnet} is too small for a network"
            )));
        }
        if let Some(other) = self
            .lock()
            .values()
            .find(|n| n.subnet.map(|s| s.overlaps(&subnet)).unwrap_or(false))
        {
            return Err(EngineError::Forbidden(format!(
                "invalid pool request: Pool overlaps with other one on this address space (network {})",
                other.name
            )));
        }
        let gateway = match v4.first().and_then(|c| c.gateway.clone()) {
            Some(g) => {
                let ip: Ipv4Addr = g.parse().map_err(|_| {
                    EngineError::InvalidParameter(format!("invalid gateway address {g}"))
                })?;
                if !subnet.contains(ip) || ip == subnet.network() || ip == subnet.broadcast() {
                    return Err(EngineError::InvalidParameter(format!(
                        "no matching subnet for gateway {g}"
                    )));
                }
                ip
            }
            None => subnet.first_host(),
        };
        let ip_range = match v4.first().and_then(|c| c.ip_range.clone()) {
            Some(r) => {
                let r: Subnet = r.parse().map_err(net_err)?;
                if !subnet.covers(&r) {
                    return Err(EngineError::InvalidParameter(format!(
                        "no matching subnet for range {r}"
                    )));
                }
                Some(r)
            }
            None => None,
        };
        let id = random_id();
        let bridge = match options.get(BRIDGE_NAME_OPTION) {
            Some(b) if !b.is_empty() && b.len() < 16 => b.clone(),
            Some(b) => {
                return Err(EngineError::InvalidParameter(format!(
                    "invalid bridge name {b:?}: 1 to 15 characters"
                )))
            }
            None => format!("vs-{}", &id[..12]),
        };
        if self.lock().values().any(|n| n.bridge == bridge) {
            return Err(EngineError::Conflict(format!(
                "bridge {bridge} is used by another network"
            )));
        }
        let n = NetworkRecord {
            id: id.clone(),
            name,
            driver,
            created: now_rfc3339(),
            subnet: Some(subnet),
            gateway: Some(gateway),
            ip_range,
            user_subnet,
            internal: req.internal.unwrap_or(false),
            attachable: req.attachable.unwrap_or(false),
            labels: req.labels.clone().unwrap_or_default(),
            options,
            bridge,
            trust,
        };
        store
            .put(TABLE, &id, &n)
            .map_err(|e| internal("save network", e))?;
        self.lock().insert(id.clone(), n.clone());
        let made = vessel_network::bridge::ensure_bridge(
            &n.bridge,
            gateway,
            &subnet,
            &self.cfg.bridge_name,
            mtu,
        )
        .map_err(net_err)
        .and_then(|_| self.apply_firewall());
        if let Err(e) = made {
            // Nothing half-made stays behind.
            self.lock().remove(&id);
            let _ = store.delete(TABLE, &id);
            let _ = vessel_network::bridge::delete_link(&n.bridge);
            let _ = self.apply_firewall();
            return Err(e);
        }
        info!(network = %n.name, subnet = %subnet, bridge = %n.bridge, trust = n.trust.as_str(), "network created");
        Ok(n)
    }

    /// Deletes a network that no running container uses.
    pub(crate) fn remove(
        &self,
        store: &vessel_store::Store,
        n: &NetworkRecord,
    ) -> Result<(), EngineError> {
        if n.predefined() {
            return Err(EngineError::Forbidden(format!(
                "{} is a pre-defined network and cannot be removed",
                n.name
            )));
        }
        store
            .delete(TABLE, &n.id)
            .map_err(|e| internal("delete network", e))?;
        self.lock().remove(&n.id);
        self.apply_firewall()?;
        vessel_network::bridge::delete_link(&n.bridge).map_err(net_err)?;
        info!(network = %n.name, "network removed");
        Ok(())
    }

    /// The daemon's default network name for `NetworkMode` values that mean
    /// it.
    pub(crate) fn mode_network(mode: Option<&str>) -> Option<String> {
        match mode.unwrap_or("") {
            "" | "default" | "bridge" => Some("bridge".into()),
            "none" => None,
            other => Some(other.to_string()),
        }
    }
}

/// Checks the networking part of a create request and returns the
/// container's endpoints, keyed by network name.
pub(crate) fn endpoints_for_create(
    nets: &Networks,
    mode: Option<&str>,
    endpoints_config: Option<&HashMap<String, EndpointSettings>>,
    mac_address: Option<&str>,
) -> Result<BTreeMap<String, Endpoint>, EngineError> {
    let mode_str = mode.unwrap_or("");
    if mode_str == "host" {
        return Err(EngineError::InvalidParameter(
            "network mode \"host\" is not supported: a Vessel container is a virtual machine with its own kernel and network stack; publish ports with -p instead".into(),
        ));
    }
    if mode_str.starts_with("container:") {
        return Err(EngineError::InvalidParameter(
            "network mode \"container:<name|id>\" is not supported: each Vessel container is a virtual machine with its own network stack".into(),
        ));
    }
    let mut out = BTreeMap::new();
    // The CLI keys the default network's settings as "default".
    let configs: HashMap<String, EndpointSettings> = endpoints_config
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            (
                if k == "default" {
                    "bridge".to_string()
                } else {
                    k
                },
                v,
            )
        })
        .collect();
    let primary = Networks::mode_network(mode);
    if primary.is_none() && configs.keys().any(|k| k != "none") {
        return Err(EngineError::InvalidParameter(
            "container cannot be connected to multiple networks with one of the networks in private (none) mode".into(),
        ));
    }
    let mut wanted: Vec<String> = primary.into_iter().collect();
    for k in configs.keys() {
        if k != "none" && !wanted.contains(k) {
            wanted.push(k.clone());
        }
    }
    if wanted.len() > vessel_vm::NIC_SLOTS {
        return Err(EngineError::InvalidParameter(format!(
            "a container can join at most {} networks (its VM has {} network slots)",
            vessel_vm::NIC_SLOTS,
            vessel_vm::NIC_SLOTS
        )));
    }
    for (i, key) in wanted.iter().enumerate() {
        let n = nets.find(key)?;
        if !n.is_bridge() {
            return Err(EngineError::InvalidParameter(format!(
                "network {} ({}) cannot be joined by a Vessel container",
                n.name, n.driver
            )));
        }
        let cfg = configs
            .get(key)
            .or_else(|| configs.get(&n.name))
            .or_else(|| configs.get(&n.id));
        let mut ep = endpoint_from_settings(&n, cfg)?;
        if i == 0 && ep.requested_mac.is_none() {
            if let Some(m) = mac_address.filter(|m| !m.is_empty()) {
                ep.requested_mac = Some(ipam::parse_mac(m).map_err(net_err)?);
            }
        }
        out.insert(n.name.clone(), ep);
    }
    Ok(out)
}

/// An endpoint on `n` from a request's endpoint settings (`--ip`,
/// `--alias`, `--mac-address`), checked.
pub(crate) fn endpoint_from_settings(
    n: &NetworkRecord,
    cfg: Option<&EndpointSettings>,
) -> Result<Endpoint, EngineError> {
    let mut ep = Endpoint {
        network_id: n.id.clone(),
        endpoint_id: random_id(),
        ..Default::default()
    };
    let Some(cfg) = cfg else { return Ok(ep) };
    let aliases: Vec<String> = cfg.aliases.clone().unwrap_or_default();
    if !aliases.is_empty() && n.name == "bridge" {
        return Err(EngineError::InvalidParameter(
            "network-scoped alias is supported only for containers in user defined networks".into(),
        ));
    }
    ep.aliases = aliases;
    let ip = cfg
        .ipam_config
        .as_ref()
        .and_then(|c| c.ipv4_address.clone())
        .or_else(|| cfg.ip_address.clone())
        .filter(|s| !s.is_empty());
    if let Some(ip) = ip {
        let addr: Ipv4Addr = ip
            .parse()
            .map_err(|_| EngineError::InvalidParameter(format!("invalid IPv4 address: {ip}")))?;
        if !n.user_subnet {
            return Err(EngineError::InvalidParameter(
                "user specified IP address is supported only when connecting to networks with user configured subnets".into(),
            ));
        }
        let subnet = n.subnet.ok_or_else(|| internal("network", "no subnet"))?;
        if !subnet.contains(addr)
            || addr == subnet.network()
            || addr == subnet.broadcast()
            || Some(addr) == n.gateway
        {
            return Err(EngineError::InvalidParameter(format!(
                "no configured subnet or ip-range contain the IP address {ip}"
            )));
        }
        ep.requested_ip = Some(addr.to_string());
    }
    if let Some(m) = cfg.mac_address.as_deref().filter(|m| !m.is_empty()) {
        ep.requested_mac = Some(ipam::parse_mac(m).map_err(net_err)?);
    }
    Ok(ep)
}

/// Addresses in use on network `id` by running containers other than
/// `except`.
pub(crate) fn used_addresses(
    recs: &[ContainerRecord],
    network_id: &str,
    except: &str,
) -> BTreeSet<Ipv4Addr> {
    recs.iter()
        .filter(|r| r.id != except)
        .flat_map(|r| r.networks.values())
        .filter(|e| e.network_id == network_id)
        .filter_map(|e| e.ip.as_deref()?.parse().ok())
        .collect()
}

/// Hands out an address, MAC and slot to `ep` on `n`. `slot` is the NIC
/// slot it takes; `gateway` whether this endpoint carries the default route.
pub(crate) fn allocate(
    n: &NetworkRecord,
    ep: &mut Endpoint,
    used: &BTreeSet<Ipv4Addr>,
    slot: u8,
    gateway: bool,
) -> Result<(), EngineError> {
    let subnet = n
        .subnet
        .ok_or_else(|| internal("network", format!("{} has no subnet", n.name)))?;
    let gw = n
        .gateway
        .ok_or_else(|| internal("network", format!("{} has no gateway", n.name)))?;
    let ip = match &ep.requested_ip {
        Some(ip) => {
            let ip: Ipv4Addr = ip.parse().map_err(|_| {
                EngineError::InvalidParameter(format!("invalid IPv4 address: {ip}"))
            })?;
            if used.contains(&ip) {
                return Err(EngineError::Conflict(format!(
                    "Address already in use: {ip} is taken on network {}",
                    n.name
                )));
            }
            ip
        }
        None => ipam::next_address(&subnet, n.ip_range.as_ref(), gw, used).ok_or_else(|| {
            EngineError::Forbidden(format!("no available IPv4 addresses on network {}", n.name))
        })?,
    };
    ep.ip = Some(ip.to_string());
    ep.prefix = subnet.prefix();
    ep.gateway = Some(gw.to_string());
    ep.default_route = gateway && !n.internal;
    ep.mtu = n.mtu();
    ep.mac = Some(ep.requested_mac.clone().unwrap_or_else(ipam::random_mac));
    ep.slot = Some(slot);
    Ok(())
}

/// Joins a container's tap to the network's bridge.
pub(crate) fn plug(n: &NetworkRecord, tap: &str) -> Result<(), EngineError> {
    vessel_network::bridge::attach(tap, &n.bridge, !n.icc(), n.mtu()).map_err(net_err)
}

/// Takes a tap out of its bridge.
pub(crate) fn unplug(tap: &str) {
    if let Err(e) = vessel_network::bridge::detach(tap) {
        warn!(tap, "taking a tap out of its bridge: {e}");
    }
}

/// The interfaces the guest must configure for a container's endpoints.
pub(crate) fn interfaces(rec: &ContainerRecord) -> Vec<InterfaceSpec> {
    let mut out: Vec<InterfaceSpec> = rec
        .networks
        .values()
        .filter_map(|e| {
            Some(InterfaceSpec {
                slot: e.slot?,
                mac: e.mac.clone()?,
                address: e.ip.clone()?,
                prefix: e.prefix,
                gateway: if e.default_route {
                    e.gateway.clone()
                } else {
                    None
                },
                mtu: e.mtu,
            })
        })
        .collect();
    out.sort_by_key(|i| i.slot);
    out
}

/// The address `--add-host name:host-gateway` stands for.
pub(crate) const HOST_GATEWAY: &str = "host-gateway";

/// One `--add-host` entry, `name:ip` (what the docker CLI sends) or
/// `name=ip`, the address optionally in brackets: the name and the address,
/// or dockerd's message for an entry it refuses.
pub(crate) fn parse_extra_host(entry: &str) -> Result<(&str, &str), EngineError> {
    let (name, ip) = entry
        .split_once('=')
        .or_else(|| entry.split_once(':'))
        .filter(|(name, _)| !name.is_empty())
        .ok_or_else(|| {
            EngineError::InvalidParameter(format!("bad format for add-host: \"{entry}\""))
        })?;
    let ip = ip
        .strip_prefix('[')
        .and_then(|i| i.strip_suffix(']'))
        .unwrap_or(ip);
    if ip != HOST_GATEWAY && ip.parse::<std::net::IpAddr>().is_err() {
        return Err(EngineError::InvalidParameter(format!(
            "invalid IP address in add-host: \"{ip}\""
        )));
    }
    Ok((name, ip))
}

/// Checks every `--add-host` entry of a container to be created.
pub(crate) fn check_extra_hosts(hc: &bollard_stubs::models::HostConfig) -> Result<(), EngineError> {
    for entry in hc.extra_hosts.iter().flatten() {
        parse_extra_host(entry)?;
    }
    Ok(())
}

/// `/etc/hosts` lines for the user's `--add-host` entries (`host-gateway`
/// replaced by `host_gateway`, the default bridge's gateway on the host, as
/// dockerd does), then the container's own addresses (Docker lists the
/// container's address with its hostname).
pub(crate) fn hosts_lines(rec: &ContainerRecord, host_gateway: Option<Ipv4Addr>) -> Vec<String> {
    let mut out: Vec<String> = rec
        .host_config
        .extra_hosts
        .iter()
        .flatten()
        .filter_map(|h| {
            let (name, ip) = parse_extra_host(h).ok()?;
            if ip == HOST_GATEWAY {
                Some(format!("{}\t{name}", host_gateway?))
            } else {
                Some(format!("{ip}\t{name}"))
            }
        })
        .collect();
    let hostname = rec.config.hostname.clone().unwrap_or_default();
    let mut eps: Vec<&Endpoint> = rec.networks.values().filter(|e| e.ip.is_some()).collect();
    eps.sort_by_key(|e| e.slot);
    for e in eps {
        if let Some(ip) = &e.ip {
            out.push(format!("{ip}\t{hostname}"));
        }
    }
    out
}

/// The container's `/etc/resolv.conf`: the DNS server on its first
/// network's gateway (which knows the other containers and forwards the
/// rest to the container's `--dns` servers or the host's resolvers) — on
/// the default bridge with `--dns`, those servers themselves — then
/// `--dns-search` and `--dns-option`. `None` when the container has no
/// network.
pub(crate) fn resolv_conf(rec: &ContainerRecord) -> Option<String> {
    let (first_net, first) = rec
        .networks
        .iter()
        .filter(|(_, e)| e.slot.is_some())
        .min_by_key(|(_, e)| e.slot)?;
    let mut s = String::new();
    let dns = rec.host_config.dns.clone().unwrap_or_default();
    if first_net == "bridge" && !dns.is_empty() {
        // As on Docker's default bridge: its containers have no names to
        // look up, and their `--dns` servers are theirs to ask directly.
        for d in dns {
            s.push_str(&format!("nameserver {d}\n"));
        }
    } else if let Some(gw) = &first.gateway {
        // The network's DNS server, which forwards what it does not know
        // to the container's `--dns` servers, or the host's.
        s.push_str(&format!("nameserver {gw}\n"));
    }
    let search = rec.host_config.dns_search.clone().unwrap_or_default();
    if !search.is_empty() {
        s.push_str(&format!("search {}\n", search.join(" ")));
    }
    let opts = rec.host_config.dns_options.clone().unwrap_or_default();
    if !opts.is_empty() {
        s.push_str(&format!("options {}\n", opts.join(" ")));
    }
    Some(s)
}

/// The names a container answers to on a network: its name, its aliases,
/// its short id and its hostname (Docker's `DNSNames`).
pub(crate) fn dns_names(rec: &ContainerRecord, ep: &Endpoint) -> Vec<String> {
    let mut names = vec![rec.name.clone()];
    for a in &ep.aliases {
        if !names.contains(a) {
            names.push(a.clone());
        }
    }
    let short = rec.id[..12].to_string();
    if !names.contains(&short) {
        names.push(short);
    }
    if let Some(h) = rec.config.hostname.clone().filter(|h| !h.is_empty()) {
        if !names.contains(&h) {
            names.push(h);
        }
    }
    names
}

/// A container's endpoint as `docker inspect` shows it.
pub(crate) fn endpoint_settings(rec: &ContainerRecord, ep: &Endpoint) -> EndpointSettings {
    let live = ep.ip.is_some() && rec.state.status == Status::Running;
    EndpointSettings {
        ipam_config: ep.requested_ip.as_ref().map(|ip| EndpointIpamConfig {
            ipv4_address: Some(ip.clone()),
            ..Default::default()
        }),
        links: None,
        mac_address: Some(if live {
            ep.mac.clone().unwrap_or_default()
        } else {
            String::new()
        }),
        aliases: if ep.aliases.is_empty() {
            None
        } else {
            Some(ep.aliases.clone())
        },
        driver_opts: None,
        gw_priority: Some(0),
        network_id: Some(ep.network_id.clone()),
        endpoint_id: Some(if live {
            ep.endpoint_id.clone()
        } else {
            String::new()
        }),
        gateway: Some(if live {
            ep.gateway.clone().unwrap_or_default()
        } else {
            String::new()
        }),
        ip_address: Some(if live {
            ep.ip.clone().unwrap_or_default()
        } else {
            String::new()
        }),
        ip_prefix_len: Some(if live { i64::from(ep.prefix) } else { 0 }),
        ipv6_gateway: Some(String::new()),
        global_ipv6_address: Some(String::new()),
        global_ipv6_prefix_len: Some(0),
        dns_names: Some(dns_names(rec, ep)),
    }
}

/// Emits a network event.
pub(crate) fn event(
    events: &crate::events::Events,
    n: &NetworkRecord,
    action: &str,
    container: Option<&str>,
) {
    let mut attrs = HashMap::new();
    attrs.insert("name".to_string(), n.name.clone());
    attrs.insert("type".to_string(), n.driver.clone());
    if let Some(c) = container {
        attrs.insert("container".to_string(), c.to_string());
    }
    events.emit(EventType::NETWORK, action, &n.id, attrs);
}

/// Forgets the address part of a container's endpoints (its VM ended).
pub(crate) fn release(r: &mut ContainerRecord) {
    for ep in r.networks.values_mut() {
        ep.slot = None;
        ep.ip = None;
        ep.mac = None;
        ep.gateway = None;
        ep.default_route = false;
        ep.mtu = None;
    }
    r.taps.clear();
    r.published.clear();
}

/// Filters of `GET /networks` and `POST /networks/prune`.
#[derive(Debug, Default, Clone)]
pub struct NetworkFilters {
    /// `driver=`.
    pub driver: Vec<String>,
    /// `id=` (prefix).
    pub id: Vec<String>,
    /// `name=` (substring).
    pub name: Vec<String>,
    /// `label=key` or `label=key=value`.
    pub label: Vec<String>,
    /// `type=custom|builtin`.
    pub kind: Vec<String>,
    /// `dangling=true|false`.
    pub dangling: Option<bool>,
    /// `scope=`.
    pub scope: Vec<String>,
    /// `label!=key` or `label!=key=value` (prune): networks without it.
    pub label_not: Vec<String>,
    /// `until=` (prune): networks created before this time (unix seconds).
    pub until: Option<i64>,
}

impl NetworkFilters {
    fn matches(&self, n: &NetworkRecord, in_use: bool) -> bool {
        let has = |l: &String| crate::filters::label_matches(l, |k| n.labels.get(k));
        let label_ok = self.label.iter().all(has) && !self.label_not.iter().any(has);
        let until_ok = crate::filters::created_before(&n.created, self.until);
        (self.driver.is_empty() || self.driver.contains(&n.driver))
            && (self.id.is_empty() || self.id.iter().any(|i| n.id.starts_with(i.as_str())))
            && (self.name.is_empty() || self.name.iter().any(|x| n.name.contains(x.as_str())))
            && label_ok
            && until_ok
            && (self.kind.is_empty()
                || self.kind.iter().any(|k| {
                    (k == "custom" && !n.predefined()) || (k == "builtin" && n.predefined())
                }))
            && (self.scope.is_empty() || self.scope.iter().any(|s| s == "local"))
            && self
                .dangling
                .map(|d| d == (!in_use && !n.predefined()))
                .unwrap_or(true)
    }
}

impl crate::Engine {
    fn nets(&self) -> &Networks {
        &self.inner.networks
    }

    /// The host's address on the default bridge, which `host-gateway` in
    /// `--add-host` stands for.
    pub(crate) fn host_gateway(&self) -> Option<Ipv4Addr> {
        self.nets().find_exact("bridge").and_then(|n| n.gateway)
    }

    /// Containers (records) that have an endpoint on network `id`.
    fn network_users(&self, id: &str) -> Vec<ContainerRecord> {
        self.handles()
            .iter()
            .map(|h| h.rec())
            .filter(|r| r.networks.values().any(|e| e.network_id == id))
            .collect()
    }

    fn network_view(&self, n: &NetworkRecord) -> NetworkInspect {
        let containers = self
            .network_users(&n.id)
            .iter()
            .filter(|r| r.running())
            .filter_map(|r| {
                let ep = r.networks.values().find(|e| e.network_id == n.id)?;
                ep.ip.as_ref()?;
                Some((
                    r.id.clone(),
                    EndpointResource {
                        name: Some(r.name.clone()),
                        endpoint_id: Some(ep.endpoint_id.clone()),
                        mac_address: ep.mac.clone(),
                        ipv4_address: ep.ip.as_ref().map(|ip| format!("{ip}/{}", ep.prefix)),
                        ipv6_address: Some(String::new()),
                    },
                ))
            })
            .collect();
        n.inspect(containers)
    }

    /// `GET /networks`.
    pub fn networks(&self, filters: &NetworkFilters) -> Vec<NetworkInspect> {
        let mut out: Vec<NetworkInspect> = self
            .nets()
            .all()
            .iter()
            .filter(|n| filters.matches(n, !self.network_users(&n.id).is_empty()))
            .map(|n| self.network_view(n))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// `GET /networks/{id}`.
    pub fn network_inspect(&self, key: &str) -> Result<NetworkInspect, EngineError> {
        let n = self.nets().find(key)?;
        Ok(self.network_view(&n))
    }

    /// `POST /networks/create`: the new network's id.
    pub async fn network_create(&self, req: NetworkCreateRequest) -> Result<String, EngineError> {
        let nets = self.inner.networks.clone();
        let engine = self.clone();
        let n = crate::blocking(move || nets.create(&engine.inner.store, req)).await??;
        event(&self.inner.events, &n, "create", None);
        self.refresh_dns().await;
        Ok(n.id)
    }

    /// `DELETE /networks/{id}`.
    pub async fn network_remove(&self, key: &str) -> Result<(), EngineError> {
        let n = self.nets().find(key)?;
        if n.predefined() {
            return Err(EngineError::Forbidden(format!(
                "{} is a pre-defined network and cannot be removed",
                n.name
            )));
        }
        if self.network_users(&n.id).iter().any(|r| r.running()) {
            return Err(EngineError::Forbidden(format!(
                "error while removing network: network {} id {} has active endpoints",
                n.name, n.id
            )));
        }
        let (nets, engine, n2) = (self.inner.networks.clone(), self.clone(), n.clone());
        crate::blocking(move || nets.remove(&engine.inner.store, &n2)).await??;
        event(&self.inner.events, &n, "destroy", None);
        self.refresh_dns().await;
        Ok(())
    }

    /// `POST /networks/prune`: names of the removed networks.
    pub async fn network_prune(&self, filters: &NetworkFilters) -> Vec<String> {
        let mut removed = vec![];
        for n in self.nets().all() {
            if n.predefined() || !self.network_users(&n.id).is_empty() {
                continue;
            }
            if !filters.matches(&n, false) {
                continue;
            }
            match self.network_remove(&n.id).await {
                Ok(()) => removed.push(n.name.clone()),
                Err(e) => warn!(network = %n.name, "prune: {e}"),
            }
        }
        removed
    }

    /// Gives a starting container's endpoints their addresses and joins its
    /// taps to the networks' bridges.
    pub(crate) fn join_networks(&self, h: &crate::Handle) -> Result<(), EngineError> {
        let _alloc = self.nets().alloc.lock().unwrap_or_else(|p| p.into_inner());
        let rec = h.rec();
        let all: Vec<ContainerRecord> = self.handles().iter().map(|x| x.rec()).collect();
        let mode_net = Networks::mode_network(rec.host_config.network_mode.as_deref());
        let mut order: Vec<String> = rec.networks.keys().cloned().collect();
        // The network of NetworkMode comes first: slot 0, default route.
        order.sort_by_key(|k| Some(k) != mode_net.as_ref());
        let mut eps = rec.networks.clone();
        // The first network (in slot order) that is not `--internal`
        // carries the default route: an internal network has no way out.
        let mut has_default = false;
        for (slot, name) in order.iter().enumerate() {
            let ep = eps
                .get_mut(name)
                .ok_or_else(|| internal("endpoints", name))?;
            let n = self.nets().find(&ep.network_id).map_err(|_| {
                EngineError::NotFound(format!(
                    "network {name} not found (it was removed while the container was stopped)"
                ))
            })?;
            let tap = rec.taps.get(slot).ok_or_else(|| {
                EngineError::InvalidParameter(format!(
                    "a container can join at most {} networks",
                    rec.taps.len()
                ))
            })?;
            let used = used_addresses(&all, &n.id, &rec.id);
            allocate(&n, ep, &used, slot as u8, !has_default)?;
            has_default |= ep.default_route;
            plug(&n, tap)?;
        }
        let rec = h.update(|r| r.networks = eps);
        self.persist(&rec)?;
        self.endpoint_events(&rec, "connect");
        Ok(())
    }

    /// `network connect` or `disconnect` events for each network a running
    /// container has an interface on, as dockerd emits them when the
    /// container starts and stops.
    pub(crate) fn endpoint_events(&self, rec: &ContainerRecord, action: &str) {
        for ep in rec.networks.values().filter(|e| e.slot.is_some()) {
            if let Ok(n) = self.nets().find(&ep.network_id) {
                event(&self.inner.events, &n, action, Some(&rec.id));
            }
        }
    }

    async fn set_interfaces(
        &self,
        h: &crate::Handle,
        rec: &ContainerRecord,
    ) -> Result<(), EngineError> {
        let writer =
            h.live.lock().await.writer.clone().ok_or_else(|| {
                EngineError::Conflict(format!("container {} is not running", rec.id))
            })?;
        let mut hosts = hosts_lines(rec, self.host_gateway());
        hosts.extend(self.link_hosts(rec, false).unwrap_or_default());
        let interfaces = interfaces(rec);
        let answer = self
            .ask_agent(
                &writer,
                &self.inner.iface_waiters,
                |req_id| vessel_protocol::HostMsg::SetInterfaces {
                    req_id,
                    interfaces,
                    hosts,
                },
                std::time::Duration::from_secs(10),
            )
            .await;
        match answer {
            Some(None) => Ok(()),
            Some(Some(e)) => Err(EngineError::Internal(format!("guest network setup: {e}"))),
            None => Err(EngineError::Internal(
                "the container's agent did not answer the network change".into(),
            )),
        }
    }

    /// `POST /networks/{id}/connect`.
    pub async fn network_connect(
        &self,
        key: &str,
        container: &str,
        cfg: Option<EndpointSettings>,
    ) -> Result<(), EngineError> {
        let n = self.nets().find(key)?;
        let h = self.lookup(container)?;
        let _op = h.op.lock().await;
        let rec = h.rec();
        if !n.is_bridge() {
            return Err(EngineError::Forbidden(
                "container cannot be disconnected from host network or connected to host network"
                    .into(),
            ));
        }
        if rec.host_config.network_mode.as_deref() == Some("none") {
            return Err(EngineError::Forbidden(
                "container cannot be connected to multiple networks with one of the networks in private (none) mode".into(),
            ));
        }
        if rec.networks.contains_key(&n.name) {
            return Err(EngineError::Forbidden(format!(
                "endpoint with name {} already exists in network {}",
                rec.name, n.name
            )));
        }
        let mut ep = endpoint_from_settings(&n, cfg.as_ref())?;
        if rec.networks.len() >= vessel_vm::NIC_SLOTS {
            return Err(EngineError::InvalidParameter(format!(
                "a container can join at most {} networks (its VM has {} network slots)",
                vessel_vm::NIC_SLOTS,
                vessel_vm::NIC_SLOTS
            )));
        }
        if rec.running() {
            let used_slots: BTreeSet<u8> = rec.networks.values().filter_map(|e| e.slot).collect();
            let slot = (0..vessel_vm::NIC_SLOTS as u8)
                .find(|s| !used_slots.contains(s))
                .ok_or_else(|| EngineError::InvalidParameter("no free network slot".into()))?;
            let tap = rec
                .taps
                .get(usize::from(slot))
                .cloned()
                .ok_or_else(|| internal("network", "no tap for the slot"))?;
            {
                let _alloc = self.nets().alloc.lock().unwrap_or_else(|p| p.into_inner());
                let all: Vec<ContainerRecord> = self.handles().iter().map(|x| x.rec()).collect();
                let used = used_addresses(&all, &n.id, &rec.id);
                let has_default = rec.networks.values().any(|e| e.default_route);
                allocate(&n, &mut ep, &used, slot, !has_default)?;
                let name = n.name.clone();
                let ep2 = ep.clone();
                h.update(|r| {
                    r.networks.insert(name, ep2);
                });
            }
            let joined = plug(&n, &tap);
            let joined = match joined {
                Ok(()) => self.set_interfaces(&h, &h.rec()).await,
                Err(e) => Err(e),
            };
            if let Err(e) = joined {
                unplug(&tap);
                h.update(|r| {
                    r.networks.remove(&n.name);
                });
                return Err(e);
            }
        } else {
            let name = n.name.clone();
            h.update(|r| {
                r.networks.insert(name, ep);
            });
        }
        self.persist(&h.rec())?;
        event(&self.inner.events, &n, "connect", Some(&rec.id));
        self.refresh_dns().await;
        Ok(())
    }

    /// `POST /networks/{id}/disconnect`.
    pub async fn network_disconnect(&self, key: &str, container: &str) -> Result<(), EngineError> {
        let n = self.nets().find(key)?;
        let h = self.lookup(container)?;
        let _op = h.op.lock().await;
        let rec = h.rec();
        let Some(ep) = rec.networks.get(&n.name).cloned() else {
            return Err(EngineError::Forbidden(format!(
                "container {} is not connected to network {}",
                rec.id, n.name
            )));
        };
        let routable: BTreeSet<String> = self
            .nets()
            .all()
            .into_iter()
            .filter(|n| !n.internal)
            .map(|n| n.id)
            .collect();
        let rec = h.update(|r| {
            r.networks.remove(&n.name);
            if ep.default_route {
                if let Some(next) = r
                    .networks
                    .values_mut()
                    .filter(|e| e.slot.is_some() && routable.contains(&e.network_id))
                    .min_by_key(|e| e.slot)
                {
                    next.default_route = true;
                }
            }
        });
        if rec.running() {
            if let Some(slot) = ep.slot {
                if let Some(tap) = rec.taps.get(usize::from(slot)) {
                    unplug(tap);
                }
            }
            self.set_interfaces(&h, &rec).await?;
        }
        self.persist(&rec)?;
        event(&self.inner.events, &n, "disconnect", Some(&rec.id));
        self.refresh_dns().await;
        Ok(())
    }
}

/// One port a container asks to publish.
pub(crate) struct PortRequest {
    port: u16,
    proto: Proto,
    host_ip: String,
    /// First and last host port to try (0, 0: any free port).
    host_ports: (u16, u16),
}

/// The ports a container asks to publish, from `-p` and, with `-P`, every
/// exposed port. Checked at create, used at start.
pub(crate) fn port_requests(
    rec_config: &bollard_stubs::models::ContainerConfig,
    hc: &bollard_stubs::models::HostConfig,
) -> Result<Vec<PortRequest>, EngineError> {
    fn key(k: &str) -> Result<(u16, Proto), EngineError> {
        let (p, proto) = k.split_once('/').unwrap_or((k, "tcp"));
        let port: u16 = p.parse().ok().filter(|p| *p > 0).ok_or_else(|| {
            EngineError::InvalidParameter(format!("invalid port specification: \"{k}\""))
        })?;
        let proto: Proto = proto.parse().map_err(|_| {
            EngineError::InvalidParameter(format!(
                "invalid proto \"{proto}\" in port specification \"{k}\": Vessel publishes tcp and udp ports"
            ))
        })?;
        Ok((port, proto))
    }
    let mut out = vec![];
    for (k, bindings) in hc.port_bindings.iter().flatten() {
        let (port, proto) = key(k)?;
        for b in bindings.iter().flatten() {
            let host_ip = b
                .host_ip
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or("0.0.0.0".into());
            host_ip.parse::<std::net::IpAddr>().map_err(|_| {
                EngineError::InvalidParameter(format!("invalid host IP address: {host_ip}"))
            })?;
            let hp = b.host_port.clone().unwrap_or_default();
            let bad = || EngineError::InvalidParameter(format!("invalid hostPort: {hp}"));
            let host_ports = if hp.is_empty() {
                (0, 0)
            } else {
                let (a, b) = hp.split_once('-').unwrap_or((&hp, &hp));
                let a: u16 = a.parse().map_err(|_| bad())?;
                let b: u16 = b.parse().map_err(|_| bad())?;
                if b < a {
                    return Err(bad());
                }
                (a, b)
            };
            out.push(PortRequest {
                port,
                proto,
                host_ip,
                host_ports,
            });
        }
    }
    if hc.publish_all_ports == Some(true) {
        for k in rec_config.exposed_ports.iter().flatten() {
            let (port, proto) = key(k)?;
            if !out.iter().any(|r| r.port == port && r.proto == proto) {
                out.push(PortRequest {
                    port,
                    proto,
                    host_ip: "0.0.0.0".into(),
                    host_ports: (0, 0),
                });
            }
        }
    }
    Ok(out)
}

use vessel_network::proxy::{PortProxy, Proto};

/// Services the daemon runs for networks and containers: one DNS server
/// per bridge network and the proxies of published ports.
#[derive(Default)]
pub(crate) struct NetServices {
    dns: tokio::sync::Mutex<
        HashMap<
            String,
            (
                vessel_network::dns::DnsServer,
                Arc<vessel_network::dns::NameTable>,
            ),
        >,
    >,
    proxies: Mutex<HashMap<String, Vec<PortProxy>>>,
}

use std::sync::Arc;

impl crate::Engine {
    /// Starts the proxies of a starting container's published ports and
    /// records them. Any port that cannot be had fails the whole start.
    pub(crate) async fn publish_ports(&self, h: &crate::Handle) -> Result<(), EngineError> {
        let rec = h.rec();
        let wanted = port_requests(&rec.config, &rec.host_config)?;
        if wanted.is_empty() {
            return Ok(());
        }
        let target_ip: Ipv4Addr = rec
            .networks
            .values()
            .filter(|e| e.slot.is_some())
            .min_by_key(|e| e.slot)
            .and_then(|e| e.ip.as_deref()?.parse().ok())
            .ok_or_else(|| {
                EngineError::InvalidParameter(
                    "conflicting options: port publishing and the container type network mode"
                        .into(),
                )
            })?;
        let mut proxies = vec![];
        let mut published = vec![];
        for req in wanted {
            let PortRequest {
                port,
                proto,
                host_ip,
                host_ports: (first, last),
            } = req;
            let ip: std::net::IpAddr = host_ip.parse().map_err(|_| {
                EngineError::InvalidParameter(format!("invalid host IP address: {host_ip}"))
            })?;
            let target = std::net::SocketAddr::new(std::net::IpAddr::V4(target_ip), port);
            let mut last_err = None;
            // A range takes its first free port.
            for host_port in first..=last {
                let listen = std::net::SocketAddr::new(ip, host_port);
                match PortProxy::start(
                    proto,
                    listen,
                    target,
                    Some(vessel_network::firewall::PROXY_MARK),
                )
                .await
                {
                    Ok(p) => {
                        published.push(crate::record::PublishedPort {
                            port,
                            proto: proto.as_str().into(),
                            host_ip: host_ip.clone(),
                            host_port: p.local_addr().port(),
                        });
                        proxies.push(p);
                        last_err = None;
                        break;
                    }
                    Err(e) => last_err = Some(e),
                }
            }
            if let Some(e) = last_err {
                let why = if e.kind() == std::io::ErrorKind::AddrInUse {
                    "port is already allocated".to_string()
                } else {
                    e.to_string()
                };
                let ports = if first == last {
                    first.to_string()
                } else {
                    format!("{first}-{last}")
                };
                return Err(EngineError::Internal(format!(
                    "driver failed programming external connectivity on endpoint {} ({}): Bind for {host_ip}:{ports} failed: {why}",
                    rec.name, rec.id
                )));
            }
        }
        let rec = h.update(|r| r.published = published);
        self.persist(&rec)?;
        self.inner
            .net_services
            .proxies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec.id.clone(), proxies);
        Ok(())
    }

    /// Re-creates the proxies of a running container after a daemon
    /// restart, on the host ports it had.
    pub(crate) async fn republish_ports(&self, rec: &ContainerRecord) {
        let Some(target_ip) = rec
            .networks
            .values()
            .filter(|e| e.slot.is_some())
            .min_by_key(|e| e.slot)
            .and_then(|e| e.ip.as_deref()?.parse::<Ipv4Addr>().ok())
        else {
            return;
        };
        let mut proxies = vec![];
        for p in &rec.published {
            let (Ok(ip), Ok(proto)) = (
                p.host_ip.parse::<std::net::IpAddr>(),
                p.proto.parse::<Proto>(),
            ) else {
                continue;
            };
            let listen = std::net::SocketAddr::new(ip, p.host_port);
            let target = std::net::SocketAddr::new(std::net::IpAddr::V4(target_ip), p.port);
            match PortProxy::start(
                proto,
                listen,
                target,
                Some(vessel_network::firewall::PROXY_MARK),
            )
            .await
            {
                Ok(px) => proxies.push(px),
                Err(e) => {
                    warn!(id = %rec.id, "publishing {}:{} again: {e}", p.host_ip, p.host_port)
                }
            }
        }
        self.inner
            .net_services
            .proxies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec.id.clone(), proxies);
    }

    /// Stops a container's published ports.
    pub(crate) fn unpublish_ports(&self, id: &str) {
        self.inner
            .net_services
            .proxies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Brings the DNS servers in line with the networks and running
    /// containers: one per bridge network on its gateway, answering the
    /// names of the containers on user-defined networks.
    pub(crate) async fn refresh_dns(&self) {
        // The state is read under the lock: a refresh that read it earlier
        // must not overwrite a newer one's tables.
        let mut dns = self.inner.net_services.dns.lock().await;
        let recs: Vec<ContainerRecord> = self.handles().iter().map(|h| h.rec()).collect();
        let nets: Vec<NetworkRecord> = self
            .nets()
            .all()
            .into_iter()
            .filter(|n| n.is_bridge())
            .collect();
        dns.retain(|id, _| nets.iter().any(|n| &n.id == id));
        for n in &nets {
            let mut names: HashMap<String, Vec<Ipv4Addr>> = HashMap::new();
            if !n.predefined() {
                for r in recs.iter().filter(|r| r.running()) {
                    let Some(ep) = r.networks.values().find(|e| e.network_id == n.id) else {
                        continue;
                    };
                    let Some(ip) = ep.ip.as_deref().and_then(|ip| ip.parse().ok()) else {
                        continue;
                    };
                    for name in dns_names(r, ep) {
                        names.entry(name.to_lowercase()).or_default().push(ip);
                    }
                }
            }
            // Containers with `--dns` servers have their queries forwarded
            // there.
            let mut clients: HashMap<Ipv4Addr, Vec<std::net::SocketAddr>> = HashMap::new();
            for r in recs.iter().filter(|r| r.running()) {
                let servers: Vec<std::net::SocketAddr> = r
                    .host_config
                    .dns
                    .iter()
                    .flatten()
                    .filter_map(|d| d.parse::<std::net::IpAddr>().ok())
                    .map(|ip| std::net::SocketAddr::new(ip, 53))
                    .collect();
                if servers.is_empty() {
                    continue;
                }
                if let Some(ip) = r
                    .networks
                    .values()
                    .find(|e| e.network_id == n.id)
                    .and_then(|e| e.ip.as_deref()?.parse::<Ipv4Addr>().ok())
                {
                    clients.insert(ip, servers);
                }
            }
            if let Some((_, table)) = dns.get(&n.id) {
                table.replace(names);
                table.replace_client_upstreams(clients);
                continue;
            }
            let Some(gw) = n.gateway else { continue };
            let table = Arc::new(vessel_network::dns::NameTable::default());
            table.replace(names);
            table.replace_client_upstreams(clients);
            let upstreams = vessel_network::dns::upstreams_from_resolv_conf(
                &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            );
            let listen = std::net::SocketAddr::new(std::net::IpAddr::V4(gw), 53);
            match vessel_network::dns::DnsServer::start(listen, table.clone(), upstreams).await {
                Ok(server) => {
                    dns.insert(n.id.clone(), (server, table));
                }
                Err(e) => warn!(network = %n.name, "DNS server on {listen}: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod extra_host_tests {
    use super::*;

    #[test]
    fn add_host_entries_parse_as_dockerd_and_bad_ones_are_refused() {
        fn ok(e: &str) -> (&str, &str) {
            parse_extra_host(e).expect(e)
        }
        assert_eq!(ok("db.local:10.1.2.3"), ("db.local", "10.1.2.3"));
        assert_eq!(ok("db.local=10.1.2.3"), ("db.local", "10.1.2.3"));
        assert_eq!(ok("v6:::1"), ("v6", "::1"));
        assert_eq!(ok("v6=[fe80::1]"), ("v6", "fe80::1"));
        assert_eq!(ok("gw:host-gateway"), ("gw", HOST_GATEWAY));
        let msg = |e: &str| parse_extra_host(e).expect_err(e).to_string();
        assert!(msg("db:notanip").contains("invalid IP address in add-host: \"notanip\""));
        assert!(msg("justaname").contains("bad format for add-host"));
        assert!(msg(":1.2.3.4").contains("bad format for add-host"));
    }
}
