//! Host links: the bridge of each network with its gateway address, and the
//! VMs' taps joined to and taken out of bridges. Done with iproute2 (`ip`),
//! whose commands are batched so that one change is one process.

use std::net::Ipv4Addr;

use crate::ipam::Subnet;
use crate::{run_ip_batch, run_json, NetError};

/// Makes sure bridge `name` exists, carries `gateway`/`subnet.prefix()`,
/// is marked as `owner`'s (the link's alias, see [`owned_links`]) and is
/// up. Idempotent: a daemon restart calls it for every network.
pub fn ensure_bridge(
    name: &str,
    gateway: Ipv4Addr,
    subnet: &Subnet,
    owner: &str,
    mtu: Option<u32>,
) -> Result<(), NetError> {
    if !link_exists(name)? {
        run_ip_batch(&[format!("link add name {name} type bridge")])?;
    }
    let mut lines = vec![
        format!("link set dev {name} alias {}", owner_alias(owner)),
        format!("link set dev {name} mtu {}", mtu.unwrap_or(1500)),
        format!("addr replace {gateway}/{} dev {name}", subnet.prefix()),
        format!("link set dev {name} up"),
    ];
    // Other IPv4 addresses are left from an earlier life of the bridge (a
    // daemon whose state was wiped): their routes would shadow other
    // networks' subnets.
    let wanted = format!("{gateway}/{}", subnet.prefix());
    for old in ipv4_addresses(name)? {
        if old != wanted {
            lines.push(format!("addr del {old} dev {name}"));
        }
    }
    run_ip_batch(&lines)
}

/// The IPv4 addresses (`a.b.c.d/len`) on link `name`.
fn ipv4_addresses(name: &str) -> Result<Vec<String>, NetError> {
    let v = run_json(&["-j", "-4", "addr", "show", "dev", name])?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| {
            Some(format!(
                "{}/{}",
                a["local"].as_str()?,
                a["prefixlen"].as_u64()?
            ))
        })
        .collect())
}

fn owner_alias(owner: &str) -> String {
    format!("vessel:{owner}")
}

/// Bridges marked as `owner`'s by [`ensure_bridge`]: what a daemon made,
/// found even when its state is gone.
pub fn owned_links(owner: &str) -> Result<Vec<String>, NetError> {
    let alias = owner_alias(owner);
    let v = run_json(&["-j", "link", "show"])?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["ifalias"].as_str() == Some(alias.as_str()))
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect())
}

/// Deletes link `name` if it exists.
pub fn delete_link(name: &str) -> Result<(), NetError> {
    if link_exists(name)? {
        run_ip_batch(&[format!("link del dev {name}")])?;
    }
    Ok(())
}

/// Joins `tap` to `bridge` and brings it up. `isolated` taps cannot talk
/// to each other through the bridge (the kernel's bridge port isolation):
/// that is how a network whose members must not reach their peers is made.
pub fn attach(tap: &str, bridge: &str, isolated: bool, mtu: Option<u32>) -> Result<(), NetError> {
    let iso = if isolated { "on" } else { "off" };
    run_ip_batch(&[
        format!("link set dev {tap} mtu {}", mtu.unwrap_or(1500)),
        format!("link set dev {tap} master {bridge}"),
        format!("link set dev {tap} type bridge_slave isolated {iso}"),
        format!("link set dev {tap} up"),
    ])
}

/// Takes `tap` out of its bridge and down. A tap that no longer exists (its
/// VM ended) is not an error.
pub fn detach(tap: &str) -> Result<(), NetError> {
    if !link_exists(tap)? {
        return Ok(());
    }
    run_ip_batch(&[
        format!("link set dev {tap} down"),
        format!("link set dev {tap} nomaster"),
    ])
}

/// Whether a link called `name` exists.
pub fn link_exists(name: &str) -> Result<bool, NetError> {
    Ok(links()?.iter().any(|l| l == name))
}

/// Names of all links of the host.
pub fn links() -> Result<Vec<String>, NetError> {
    let v = run_json(&["-j", "link", "show"])?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect())
}
