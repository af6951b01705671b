//! Address plans: IPv4 subnets, the choice of a free subnet for a new
//! network, and the addresses handed to containers inside one.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::NetError;

/// An IPv4 subnet in CIDR notation, stored normalised (host bits cleared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subnet {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    /// The subnet of `addr`/`prefix` (host bits of `addr` are cleared).
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, NetError> {
        if prefix > 32 {
            return Err(NetError::Invalid(format!(
                "invalid CIDR address: {addr}/{prefix}"
            )));
        }
        Ok(Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        })
    }

    /// First address of the subnet (the network address).
    pub fn network(&self) -> Ipv4Addr {
        self.addr
    }

    /// Prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }

    /// Whether the two subnets share any address.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        let p = self.prefix.min(other.prefix);
        u32::from(self.addr) & mask(p) == u32::from(other.addr) & mask(p)
    }

    /// Whether `other` lies entirely inside `self`.
    pub fn covers(&self, other: &Subnet) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }

    /// The last address (broadcast).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !mask(self.prefix))
    }

    /// The first usable host address (Docker's default gateway).
    pub fn first_host(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr).saturating_add(1))
    }

    /// The number of addresses in the subnet.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = || NetError::Invalid(format!("invalid CIDR address: {s}"));
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        Subnet::new(addr, prefix).map_err(|_| bad())
    }
}

impl Serialize for Subnet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Subnet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The subnets new networks get when none is asked for, in Docker's order:
/// 172.17.0.0/16 … 172.31.0.0/16, then 192.168.0.0/20 … 192.168.240.0/20.
pub fn default_pools() -> Vec<Subnet> {
    let mut out = vec![];
    for b in 17..=31u8 {
        out.push(Subnet {
            addr: Ipv4Addr::new(172, b, 0, 0),
            prefix: 16,
        });
    }
    for c in (0..=240u8).step_by(16) {
        out.push(Subnet {
            addr: Ipv4Addr::new(192, 168, c, 0),
            prefix: 20,
        });
    }
    out
}

/// The first subnet of `candidates` that overlaps none of `taken`.
pub fn pick_subnet(candidates: &[Subnet], taken: &[Subnet]) -> Option<Subnet> {
    candidates
        .iter()
        .find(|c| !taken.iter().any(|t| t.overlaps(c)))
        .copied()
}

/// Subnets the host already uses: the addresses of its interfaces and the
/// destinations of its routes (default route excluded), read with
/// iproute2's JSON output.
pub fn host_subnets() -> Result<Vec<Subnet>, NetError> {
    let mut out = vec![];
    let addrs = crate::run_json(&["-4", "-j", "addr", "show"])?;
    for link in addrs.as_array().into_iter().flatten() {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            let (Some(ip), Some(p)) = (a["local"].as_str(), a["prefixlen"].as_u64()) else {
                continue;
            };
            if let Ok(ip) = ip.parse::<Ipv4Addr>() {
                if ip.is_loopback() {
                    continue;
                }
                out.push(Subnet::new(ip, p as u8)?);
            }
        }
    }
    let routes = crate::run_json(&["-4", "-j", "route", "show"])?;
    for r in routes.as_array().into_iter().flatten() {
        let Some(dst) = r["dst"].as_str() else {
            continue;
        };
        if dst == "default" {
            continue;
        }
        let s = if dst.contains('/') {
            dst.parse()
        } else {
            format!("{dst}/32").parse()
        };
        if let Ok(s) = s {
            out.push(s);
        }
    }
    Ok(out)
}

/// The next free address for a container in `subnet`, taken from `range`
/// (the whole subnet when `None`), skipping the network, broadcast and
/// gateway addresses and every address in `used`.
pub fn next_address(
    subnet: &Subnet,
    range: Option<&Subnet>,
    gateway: Ipv4Addr,
    used: &BTreeSet<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let pool = range.unwrap_or(subnet);
    let start = u32::from(pool.network());
    let end = u32::from(pool.broadcast());
    (start..=end).map(Ipv4Addr::from).find(|ip| {
        *ip != subnet.network() && *ip != subnet.broadcast() && *ip != gateway && !used.contains(ip)
    })
}

/// A random locally administered unicast MAC address with Docker's
/// `02:42` prefix.
pub fn random_mac() -> String {
    let b: [u8; 4] = rand::random();
    format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

/// Checks a MAC address given by a user (`--mac-address`).
pub fn parse_mac(s: &str) -> Result<String, NetError> {
    let parts: Vec<&str> = s.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok());
    if !ok {
        return Err(NetError::Invalid(format!("invalid MAC address: {s}")));
    }
    let first = u8::from_str_radix(parts[0], 16).unwrap_or(1);
    if first & 1 == 1 {
        return Err(NetError::Invalid(format!(
            "invalid MAC address: {s}: a multicast address cannot be an interface's"
        )));
    }
    Ok(s.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Subnet {
        x.parse().expect("subnet")
    }

    #[test]
    fn subnets_parse_normalise_and_compare() {
        assert_eq!(s("10.1.2.3/16").to_string(), "10.1.0.0/16");
        assert!(s("10.1.0.0/16").contains("10.1.255.7".parse().expect("ip")));
        assert!(!s("10.1.0.0/16").contains("10.2.0.1".parse().expect("ip")));
        assert!(s("10.0.0.0/8").overlaps(&s("10.9.0.0/16")));
        assert!(s("10.9.0.0/16").overlaps(&s("10.0.0.0/8")));
        assert!(!s("10.9.0.0/16").overlaps(&s("10.10.0.0/16")));
        assert!(s("10.0.0.0/8").covers(&s("10.9.0.0/16")));
        assert!(!s("10.9.0.0/16").covers(&s("10.0.0.0/8")));
        assert_eq!(s("10.9.0.0/16").broadcast().to_string(), "10.9.255.255");
        assert!("10.0.0.0".parse::<Subnet>().is_err());
        assert!("10.0.0.0/33".parse::<Subnet>().is_err());
        assert!("300.0.0.0/8".parse::<Subnet>().is_err());
    }

    #[test]
    fn the_first_free_pool_is_picked() {
        let pools = default_pools();
        assert_eq!(pools[0].to_string(), "172.17.0.0/16");
        let taken = [s("172.17.0.0/16"), s("172.18.5.0/24")];
        assert_eq!(
            pick_subnet(&pools, &taken).map(|x| x.to_string()),
            Some("172.19.0.0/16".into())
        );
    }

    #[test]
    fn addresses_skip_gateway_used_and_broadcast() {
        let net = s("10.5.0.0/30");
        let gw: Ipv4Addr = "10.5.0.1".parse().expect("ip");
        let mut used = BTreeSet::new();
        assert_eq!(
            next_address(&net, None, gw, &used),
            Some("10.5.0.2".parse().expect("ip"))
        );
        used.insert("10.5.0.2".parse().expect("ip"));
        assert_eq!(next_address(&net, None, gw, &used), None);
        let wide = s("10.6.0.0/16");
        let range = s("10.6.3.0/24");
        assert_eq!(
            next_address(&wide, Some(&range), "10.6.0.1".parse().expect("ip"), &used),
            Some("10.6.3.0".parse().expect("ip"))
        );
    }

    #[test]
    fn macs_are_checked() {
        assert_eq!(
            parse_mac("02:42:AC:11:00:02").expect("mac"),
            "02:42:ac:11:00:02"
        );
        assert!(parse_mac("01:00:5e:00:00:01").is_err());
        assert!(parse_mac("02:42:ac:11:00").is_err());
        assert!(parse_mac(&random_mac()).is_ok());
    }
}
