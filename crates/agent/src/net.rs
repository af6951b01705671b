//! The guest's network interfaces.
//!
//! At boot every NIC slot is named after its slot (`eth0`, `eth1`, …),
//! found by the fixed MAC address QEMU gives it. At start (and when the
//! container joins or leaves a network while running) each slot gets the
//! container's MAC and IPv4 address, or goes down; one interface carries
//! the default route.
//!
//! Done with the classic `SIOCSIF*`/`SIOCADDRT` ioctls rather than netlink:
//! the agent is a small static, synchronous init, the handful of IPv4
//! settings it needs are all reachable that way, and a netlink library
//! would bring an async runtime into PID 1.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vessel_protocol::InterfaceSpec;

/// Number of NIC slots the agent looks for.
const MAX_SLOTS: usize = 8;

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name} too long"),
        ));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn ioctl(
    sock: &OwnedFd,
    request: libc::Ioctl,
    req: &mut libc::ifreq,
    what: &str,
) -> io::Result<()> {
    // SAFETY: `req` is a valid ifreq that outlives the call; every request
    // used here reads or writes only the ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, req as *mut libc::ifreq) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux and
    // sockaddr is plain old data: any bit pattern is valid.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn parse_mac(mac: &str) -> io::Result<[u8; 6]> {
    let mut out = [0u8; 6];
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad MAC address {mac}"),
        ));
    }
    for (o, p) in out.iter_mut().zip(parts) {
        *o = u8::from_str_radix(p, 16).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad MAC address {mac}"),
            )
        })?;
    }
    Ok(out)
}

fn set_flags(sock: &OwnedFd, name: &str, up: bool) -> io::Result<()> {
    let mut req = ifreq(name)?;
    ioctl(
        sock,
        libc::SIOCGIFFLAGS,
        &mut req,
        &format!("flags of {name}"),
    )?;
    // SAFETY: after SIOCGIFFLAGS the union holds ifru_flags.
    unsafe {
        let bits = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if up {
            req.ifr_ifru.ifru_flags |= bits;
        } else {
            req.ifr_ifru.ifru_flags &= !bits;
        }
    }
    ioctl(
        sock,
        libc::SIOCSIFFLAGS,
        &mut req,
        &format!("set flags of {name}"),
    )
}

/// Names the NIC slots `eth<slot>` by their MAC addresses. Run once at
/// boot, before anything configures them.
pub fn name_slots() -> io::Result<()> {
    let sock = socket()?;
    let mut found = vec![];
    for e in std::fs::read_dir("/sys/class/net")?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let mac = std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
        if let Some(slot) = (0..MAX_SLOTS).find(|s| vessel_protocol::slot_mac(*s) == mac.trim()) {
            found.push((slot, name));
        }
    }
    // Two rounds through temporary names: `eth1` may be slot 0's name now.
    for (slot, name) in &found {
        rename(&sock, name, &format!("vslot{slot}"))?;
    }
    for (slot, _) in &found {
        let name = format!("eth{slot}");
        rename(&sock, &format!("vslot{slot}"), &name)?;
        // Vessel's networks are IPv4-only, and Docker disables IPv6 on the
        // interfaces of such networks (no link-local address, no router
        // solicitations: CVE-2024-32473). `lo` keeps `::1`, as in Docker.
        let knob = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
        if std::path::Path::new(&knob).exists() {
            std::fs::write(&knob, "1")
                .map_err(|e| io::Error::new(e.kind(), format!("disable IPv6 on {name}: {e}")))?;
        }
    }
    Ok(())
}

fn rename(sock: &OwnedFd, from: &str, to: &str) -> io::Result<()> {
    if from == to {
        return Ok(());
    }
    let mut req = ifreq(from)?;
    // SAFETY: writing the ifru_newname member of the union; it is a
    // c_char array as large as the name.
    unsafe {
        for (dst, src) in req.ifr_ifru.ifru_newname.iter_mut().zip(to.bytes()) {
            *dst = src as libc::c_char;
        }
    }
    ioctl(
        sock,
        libc::SIOCSIFNAME,
        &mut req,
        &format!("rename {from} to {to}"),
    )
}

/// Makes the NIC slots match `wanted`: listed slots get their MAC and
/// address and go up, the others go down without an address; the default
/// route follows the interface that has a gateway.
pub fn apply(wanted: &[InterfaceSpec]) -> io::Result<()> {
    let sock = socket()?;
    delete_default_route(&sock)?;
    for slot in 0..MAX_SLOTS {
        let name = format!("eth{slot}");
        if !std::path::Path::new("/sys/class/net").join(&name).exists() {
            continue;
        }
        set_flags(&sock, &name, false)?;
        let mut req = ifreq(&name)?;
        req.ifr_ifru.ifru_addr = sockaddr_in(Ipv4Addr::UNSPECIFIED);
        // Clearing an address that is not set fails with EADDRNOTAVAIL.
        let _ = ioctl(&sock, libc::SIOCSIFADDR, &mut req, "clear address");
        let Some(spec) = wanted.iter().find(|w| usize::from(w.slot) == slot) else {
            continue;
        };
        configure(&sock, &name, spec)?;
    }
    for spec in wanted {
        if let Some(gw) = &spec.gateway {
            let gw: Ipv4Addr = gw.parse().map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("bad gateway {gw}"))
            })?;
            add_default_route(&sock, gw)?;
        }
    }
    Ok(())
}

fn configure(sock: &OwnedFd, name: &str, spec: &InterfaceSpec) -> io::Result<()> {
    let mac = parse_mac(&spec.mac)?;
    let mut req = ifreq(name)?;
    let mut hw: libc::sockaddr = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    hw.sa_family = libc::ARPHRD_ETHER;
    for (dst, src) in hw.sa_data.iter_mut().zip(mac) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_hwaddr = hw;
    ioctl(
        sock,
        libc::SIOCSIFHWADDR,
        &mut req,
        &format!("MAC of {name}"),
    )?;
    let ip: Ipv4Addr = spec.address.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad address {}", spec.address),
        )
    })?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(ip);
    ioctl(
        sock,
        libc::SIOCSIFADDR,
        &mut req,
        &format!("address of {name}"),
    )?;
    let mask = if spec.prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(spec.prefix.min(32)))
    };
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr_in(Ipv4Addr::from(mask));
    ioctl(
        sock,
        libc::SIOCSIFNETMASK,
        &mut req,
        &format!("netmask of {name}"),
    )?;
    // Always set: the slot may have carried a network with another MTU.
    let mtu = spec.mtu.unwrap_or(1500);
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_mtu = i32::try_from(mtu)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("bad MTU {mtu}")))?;
    ioctl(sock, libc::SIOCSIFMTU, &mut req, &format!("MTU of {name}"))?;
    set_flags(sock, name, true)
}

fn route_request(sock: &OwnedFd, request: libc::Ioctl, gw: Option<Ipv4Addr>) -> io::Result<()> {
    // SAFETY: rtentry is plain old data; all-zero is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_flags = libc::RTF_UP;
    if let Some(gw) = gw {
        rt.rt_gateway = sockaddr_in(gw);
        rt.rt_flags |= libc::RTF_GATEWAY;
    }
    // SAFETY: `rt` is a valid rtentry that outlives the call; the kernel
    // only reads it.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, &mut rt as *mut libc::rtentry) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn add_default_route(sock: &OwnedFd, gw: Ipv4Addr) -> io::Result<()> {
    route_request(sock, libc::SIOCADDRT, Some(gw))
        .map_err(|e| io::Error::new(e.kind(), format!("default route via {gw}: {e}")))
}

fn delete_default_route(sock: &OwnedFd) -> io::Result<()> {
    loop {
        match route_request(sock, libc::SIOCDELRT, None) {
            Ok(()) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("delete default route: {e}"),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("02:42:ac:11:00:02").expect("mac"),
            [2, 0x42, 0xac, 0x11, 0, 2]
        );
        assert!(parse_mac("02:42:ac:11:00").is_err());
        assert!(parse_mac("zz:42:ac:11:00:02").is_err());
    }
}
