//! Host bridges as the daemon makes them (needs root, like the daemon).

use std::process::Command;

use vessel_network::bridge::{delete_link, ensure_bridge};
use vessel_network::ipam::Subnet;

fn addresses(name: &str) -> String {
    let out = Command::new("ip")
        .args(["-4", "-br", "addr", "show", "dev", name])
        .output()
        .expect("ip addr");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn ensuring_a_bridge_again_leaves_only_its_own_gateway_address() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root");
        return;
    }
    let name = format!("vbt{:x}", std::process::id() & 0xfffff);
    let subnet: Subnet = "10.251.7.0/24".parse().expect("subnet");
    let gateway = "10.251.7.1".parse().expect("gateway");
    ensure_bridge(&name, gateway, &subnet, "unit-test", None).expect("make the bridge");
    // What a wiped daemon state leaves: the bridge with an earlier subnet.
    let status = Command::new("ip")
        .args(["addr", "add", "10.251.8.1/24", "dev", &name])
        .status()
        .expect("ip addr add");
    assert!(status.success());
    let made = ensure_bridge(&name, gateway, &subnet, "unit-test", None);
    let after = addresses(&name);
    delete_link(&name).expect("delete the bridge");
    made.expect("ensure the bridge again");
    assert!(after.contains("10.251.7.1/24"), "{after}");
    assert!(!after.contains("10.251.8.1"), "{after}");
}
