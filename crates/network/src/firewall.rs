//! The daemon's firewall: one nftables table holding outbound NAT,
//! isolation between networks and each network's trust level.
//!
//! The whole table is generated from the list of networks and replaced in
//! one nftables transaction on every change, so the rules on the host are
//! always exactly those of the networks that exist: nothing stale survives a
//! network's removal, and a daemon restart rewrites the same table.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ipam::Subnet;
use crate::NetError;

/// Firewall mark the published-port proxy puts on its connections to
/// containers, so that networks that accept only published ports can let
/// exactly those in.
pub const PROXY_MARK: u32 = 0x5653_0001;

/// Network option that sets a network's trust level.
pub const TRUST_OPTION: &str = "com.vessel.network.trust";

/// How much a network's containers may talk, after vSphere Integrated
/// Containers' container-network firewall levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trust {
    /// No traffic in or out (only the network's DNS server answers).
    Closed,
    /// Containers may open connections out (to the host and beyond); nothing
    /// may connect to them, not even their peers.
    Outbound,
    /// Containers of the network may talk to each other, and to nothing else.
    Peers,
    /// Only connections to published ports come in; nothing goes out.
    Published,
    /// All traffic, as on a Docker bridge network (the default).
    #[default]
    Open,
}

impl Trust {
    /// The level's name, as given in the network option.
    pub fn as_str(&self) -> &'static str {
        match self {
            Trust::Closed => "closed",
            Trust::Outbound => "outbound",
            Trust::Peers => "peers",
            Trust::Published => "published",
            Trust::Open => "open",
        }
    }
    /// Whether containers may open connections leaving the network.
    pub fn outbound(&self) -> bool {
        matches!(self, Trust::Outbound | Trust::Open)
    }
    /// Whether containers of the network reach each other.
    pub fn peers(&self) -> bool {
        matches!(self, Trust::Peers | Trust::Open)
    }
    /// Whether published ports are reachable.
    pub fn published(&self) -> bool {
        matches!(self, Trust::Published | Trust::Open)
    }
    /// Whether anything else may connect to the containers.
    pub fn inbound(&self) -> bool {
        matches!(self, Trust::Open)
    }
}

impl FromStr for Trust {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, NetError> {
        Ok(match s {
            "closed" => Trust::Closed,
            "outbound" => Trust::Outbound,
            "peers" => Trust::Peers,
            "published" => Trust::Published,
            "open" => Trust::Open,
            _ => {
                return Err(NetError::Invalid(format!(
                    "invalid value for {TRUST_OPTION}: {s:?} (one of closed, outbound, peers, published, open)"
                )))
            }
        })
    }
}

/// What the firewall needs to know of one network.
#[derive(Debug, Clone)]
pub struct NetRules {
    /// The network's bridge.
    pub bridge: String,
    /// Its subnet.
    pub subnet: Subnet,
    /// The gateway address (the host's, on the bridge).
    pub gateway: Ipv4Addr,
    /// `--internal`: no traffic leaves the network.
    pub internal: bool,
    /// Trust level.
    pub trust: Trust,
    /// Outgoing traffic leaves with the host's address
    /// (`com.docker.network.bridge.enable_ip_masquerade`, default true).
    pub masquerade: bool,
}

/// One daemon's nftables table.
#[derive(Debug, Clone)]
pub struct Firewall {
    table: String,
}

impl Firewall {
    /// The firewall kept in table `inet <table>`.
    pub fn new(table: impl Into<String>) -> Self {
        Self {
            table: table.into(),
        }
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The nftables script that replaces the table with the rules of `nets`.
    pub fn script(&self, nets: &[NetRules]) -> String {
        let t = &self.table;
        let mut s = String::new();
        // Creating then deleting makes the delete valid whether or not the
        // table exists; the three steps are one transaction.
        let _ = writeln!(
            s,
            "table inet {t} {{}}\ndelete table inet {t}\ntable inet {t} {{"
        );
        let _ = writeln!(
            s,
            "  chain forward {{\n    type filter hook forward priority filter; policy accept;"
        );
        for n in nets {
            let others: Vec<String> = nets
                .iter()
                .filter(|o| o.bridge != n.bridge)
                .map(|o| format!("\"{}\"", o.bridge))
                .collect();
            if !others.is_empty() {
                let _ = writeln!(
                    s,
                    "    iifname \"{}\" oifname {{ {} }} drop",
                    n.bridge,
                    others.join(", ")
                );
            }
        }
        for n in nets {
            let b = &n.bridge;
            let _ = writeln!(s, "    iifname \"{b}\" oifname \"{b}\" accept");
            let _ = writeln!(s, "    oifname \"{b}\" ct state established,related accept");
            let out = if n.trust.outbound() && !n.internal {
                "accept"
            } else {
                "drop"
            };
            let _ = writeln!(s, "    iifname \"{b}\" {out}");
            let inb = if n.trust.inbound() && !n.internal {
                "accept"
            } else {
                "drop"
            };
            let _ = writeln!(s, "    oifname \"{b}\" {inb}");
        }
        let _ = writeln!(s, "  }}");
        let _ = writeln!(
            s,
            "  chain input {{\n    type filter hook input priority filter; policy accept;"
        );
        for n in nets {
            let (b, gw) = (&n.bridge, n.gateway);
            let _ = writeln!(s, "    iifname \"{b}\" ip daddr {gw} udp dport 53 accept");
            let _ = writeln!(s, "    iifname \"{b}\" ip daddr {gw} tcp dport 53 accept");
            let _ = writeln!(s, "    iifname \"{b}\" ct state established,related accept");
            let to_host = if n.trust.outbound() && !n.internal {
                "accept"
            } else {
                "drop"
            };
            let _ = writeln!(s, "    iifname \"{b}\" {to_host}");
        }
        let _ = writeln!(s, "  }}");
        let _ = writeln!(
            s,
            "  chain output {{\n    type filter hook output priority filter; policy accept;"
        );
        for n in nets {
            let (b, gw) = (&n.bridge, n.gateway);
            // The network's DNS answers, whatever conntrack made of the
            // queries (a resolver's parallel A and AAAA queries from one
            // socket can lose their entry to a clash).
            let _ = writeln!(s, "    oifname \"{b}\" ip saddr {gw} udp sport 53 accept");
            let _ = writeln!(s, "    oifname \"{b}\" ip saddr {gw} tcp sport 53 accept");
            let _ = writeln!(s, "    oifname \"{b}\" ct state established,related accept");
            if n.trust.published() {
                let _ = writeln!(s, "    oifname \"{b}\" meta mark {PROXY_MARK:#x} accept");
            }
            let from_host = if n.trust.inbound() { "accept" } else { "drop" };
            let _ = writeln!(s, "    oifname \"{b}\" {from_host}");
        }
        let _ = writeln!(s, "  }}");
        let _ = writeln!(
            s,
            "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;"
        );
        for n in nets
            .iter()
            .filter(|n| n.trust.outbound() && !n.internal && n.masquerade)
        {
            let _ = writeln!(
                s,
                "    ip saddr {} oifname != \"{}\" masquerade",
                n.subnet, n.bridge
            );
        }
        let _ = writeln!(s, "  }}\n}}");
        s
    }

    /// Replaces the table with the rules of `nets`.
    pub fn apply(&self, nets: &[NetRules]) -> Result<(), NetError> {
        crate::run_tool("nft", &["-f", "-"], Some(&self.script(nets))).map(|_| ())
    }

    /// Deletes the table (no error when it does not exist).
    pub fn remove(&self) -> Result<(), NetError> {
        let t = &self.table;
        crate::run_tool(
            "nft",
            &["-f", "-"],
            Some(&format!("table inet {t} {{}}\ndelete table inet {t}\n")),
        )
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(bridge: &str, subnet: &str, trust: Trust, internal: bool) -> NetRules {
        let subnet: Subnet = subnet.parse().expect("subnet");
        NetRules {
            bridge: bridge.into(),
            gateway: subnet.first_host(),
            subnet,
            internal,
            trust,
            masquerade: true,
        }
    }

    #[test]
    fn a_network_without_masquerade_gets_no_nat() {
        let f = Firewall::new("vessel_t");
        let mut plain = net("br-e", "10.5.0.0/16", Trust::Open, false);
        plain.masquerade = false;
        let s = f.script(&[plain, net("br-f", "10.6.0.0/16", Trust::Open, false)]);
        assert!(!s.contains("ip saddr 10.5.0.0/16"), "{s}");
        assert!(
            s.contains("ip saddr 10.6.0.0/16 oifname != \"br-f\" masquerade"),
            "{s}"
        );
    }

    #[test]
    fn networks_are_isolated_from_each_other_and_nat_follows_trust() {
        let f = Firewall::new("vessel_t");
        let s = f.script(&[
            net("br-a", "10.1.0.0/16", Trust::Open, false),
            net("br-b", "10.2.0.0/16", Trust::Published, false),
            net("br-c", "10.3.0.0/16", Trust::Open, true),
            net("br-d", "10.4.0.0/16", Trust::Outbound, false),
        ]);
        assert!(s.contains("iifname \"br-a\" oifname { \"br-b\", \"br-c\", \"br-d\" } drop"));
        assert!(s.contains("iifname \"br-b\" oifname { \"br-a\", \"br-c\", \"br-d\" } drop"));
        assert!(s.contains("ip saddr 10.1.0.0/16 oifname != \"br-a\" masquerade"));
        assert!(
            !s.contains("ip saddr 10.2.0.0/16"),
            "published: nothing goes out"
        );
        assert!(!s.contains("ip saddr 10.3.0.0/16"), "internal: no NAT");
        assert!(s.contains(&format!(
            "oifname \"br-b\" meta mark {PROXY_MARK:#x} accept"
        )));
        assert!(
            !s.contains("oifname \"br-d\" meta mark"),
            "outbound: published ports are not let in"
        );
        assert!(s.contains("iifname \"br-d\" accept"), "outbound: out");
        assert!(s.contains("oifname \"br-d\" drop"), "outbound: nothing in");
        assert!(s.starts_with("table inet vessel_t {}\ndelete table inet vessel_t\n"));
    }

    #[test]
    fn trust_levels_parse() {
        assert_eq!("peers".parse::<Trust>().expect("trust"), Trust::Peers);
        assert!("wide-open".parse::<Trust>().is_err());
        assert!(Trust::Open.peers() && Trust::Open.outbound() && Trust::Open.inbound());
        assert!(!Trust::Closed.peers() && !Trust::Closed.outbound() && !Trust::Closed.published());
    }
}

#[cfg(test)]
mod host_tests {
    use super::*;

    /// The generated script is valid nftables: applied and removed on the
    /// host (needs root and nft, as the daemon does).
    #[test]
    fn the_script_applies_and_the_table_goes_away() {
        let f = Firewall::new("vessel_unit_test");
        let subnet: Subnet = "10.77.0.0/16".parse().expect("subnet");
        let nets = [
            NetRules {
                bridge: "vs-unit-a".into(),
                subnet,
                gateway: subnet.first_host(),
                internal: false,
                trust: Trust::Open,
                masquerade: true,
            },
            NetRules {
                bridge: "vs-unit-b".into(),
                subnet: "10.78.0.0/16".parse().expect("subnet"),
                gateway: "10.78.0.1".parse().expect("ip"),
                internal: true,
                trust: Trust::Published,
                masquerade: true,
            },
        ];
        f.apply(&nets).expect("apply");
        f.apply(&nets).expect("apply twice");
        let listed = crate::run_tool("nft", &["list", "table", "inet", "vessel_unit_test"], None)
            .expect("list");
        assert!(listed.contains("masquerade"), "{listed}");
        f.remove().expect("remove");
        assert!(
            crate::run_tool("nft", &["list", "table", "inet", "vessel_unit_test"], None).is_err()
        );
        f.remove().expect("remove is idempotent");
    }
}
