//! Host networking of Vessel.
//!
//! Owns what a container network is on the host: the bridge and its gateway
//! address ([`bridge`]), the address plan of each network ([`ipam`]), the
//! daemon's nftables table that gives outbound NAT and isolation
//! ([`firewall`]), published ports ([`proxy`]) and the DNS server that lets
//! containers find each other by name ([`dns`]).
//!
//! It must not know about containers, VMs or Docker's API: it is handed
//! names, subnets, interface names and addresses. Everything it makes on the
//! host is named after the daemon's bridge prefix, so that one daemon never
//! touches another's objects and leftovers can be found and removed.

pub mod dns;
pub mod proxy;
