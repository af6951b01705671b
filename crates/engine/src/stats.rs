//! `docker stats`: what a container's VM costs the host, measured on the
//! host from its QEMU process (CPU time, proportional memory, disk I/O) and
//! its taps (network I/O), plus what only the guest knows (the container's
//! process count). Memory usage is what the VM costs, not what the guest
//! thinks it uses (that is in `memory_stats.stats.container_usage`); the
//! limit is the VM's memory size.

use std::collections::HashMap;

use bollard_stubs::models::{
    ContainerBlkioStatEntry, ContainerBlkioStats, ContainerCpuStats, ContainerCpuUsage,
    ContainerMemoryStats, ContainerNetworkStats, ContainerPidsStats, ContainerStatsResponse,
};

use crate::record::ContainerRecord;

/// What the agent reports of the container's cgroup in the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Guest {
    /// Processes and threads.
    pub pids: u64,
    /// Memory in use, bytes.
    pub memory: u64,
}

/// One reading of a VM process.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// When (RFC 3339).
    pub read: String,
    /// CPU time of the VM process, in nanoseconds.
    pub cpu_ns: u64,
    /// Host CPU time of all CPUs, in nanoseconds.
    pub system_ns: u64,
    /// Proportional set size of the VM process, in bytes.
    pub memory: u64,
    /// Bytes read from and written to storage.
    pub io: (u64, u64),
    /// Traffic of each interface, by the guest's interface name.
    pub networks: HashMap<String, ContainerNetworkStats>,
    /// The agent's answer, when it gave one.
    pub guest: Option<Guest>,
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// CPU time (user and system, all threads) of process `pid`, in
/// nanoseconds; `None` when it cannot be read (the process ended).
pub(crate) fn cpu_ns(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit(')').next()?.split_whitespace().collect::<Vec<_>>();
    // Fields after the command: state is index 0, utime 11, stime 12.
    let ticks = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 1_000_000_000 / ticks_per_second())
}

/// Reads process `pid` now; zeros for what cannot be read (the VM ended).
pub fn sample(pid: u32) -> Sample {
    let hz = ticks_per_second();
    let cpu_ns = cpu_ns(pid).unwrap_or(0);
    let system_ns = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?;
            Some(
                line.split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse::<u64>().ok())
                    .sum::<u64>(),
            )
        })
        .unwrap_or(0)
        * 1_000_000_000
        / hz;
    let memory = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .map(|s| {
            let get = |k: &str| {
                s.lines()
                    .find(|l| l.starts_with(k))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            (get("read_bytes:"), get("write_bytes:"))
        })
        .unwrap_or((0, 0));
    Sample {
        read: crate::now_rfc3339(),
        cpu_ns,
        system_ns,
        memory,
        io,
        ..Default::default()
    }
}

/// Traffic through the container's interfaces, read from the host end of
/// each (its tap): what the tap sends, the container receives.
pub fn networks(rec: &ContainerRecord) -> HashMap<String, ContainerNetworkStats> {
    rec.networks
        .values()
        .filter_map(|ep| {
            let slot = usize::from(ep.slot?);
            let tap = rec.taps.get(slot)?;
            Some((format!("eth{slot}"), tap_counters(tap, &ep.endpoint_id)))
        })
        .collect()
}

fn tap_counters(tap: &str, endpoint_id: &str) -> ContainerNetworkStats {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/{name}"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    ContainerNetworkStats {
        rx_bytes: Some(read("tx_bytes")),
        rx_packets: Some(read("tx_packets")),
        rx_errors: Some(read("tx_errors")),
        rx_dropped: Some(read("tx_dropped")),
        tx_bytes: Some(read("rx_bytes")),
        tx_packets: Some(read("rx_packets")),
        tx_errors: Some(read("rx_errors")),
        tx_dropped: Some(read("rx_dropped")),
        endpoint_id: Some(endpoint_id.to_string()),
        instance_id: None,
    }
}

fn cpu(s: &Sample, cpus: u32) -> ContainerCpuStats {
    ContainerCpuStats {
        cpu_usage: Some(ContainerCpuUsage {
            total_usage: Some(s.cpu_ns),
            ..Default::default()
        }),
        system_cpu_usage: Some(s.system_ns),
        online_cpus: Some(cpus),
        throttling_data: None,
    }
}

/// The Docker stats document for two consecutive samples.
pub fn document(rec: &ContainerRecord, pre: &Sample, now: &Sample) -> ContainerStatsResponse {
    let limit = rec.vm.memory_mib * 1024 * 1024;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let entry = |op: &str, value: u64| ContainerBlkioStatEntry {
        major: Some(254),
        minor: Some(0),
        op: Some(op.into()),
        value: Some(value),
    };
    ContainerStatsResponse {
        id: Some(rec.id.clone()),
        name: Some(format!("/{}", rec.name)),
        os_type: Some("linux".into()),
        read: Some(now.read.clone()),
        preread: Some(pre.read.clone()),
        cpu_stats: Some(cpu(now, cpus)),
        precpu_stats: Some(cpu(pre, cpus)),
        memory_stats: Some(ContainerMemoryStats {
            usage: Some(now.memory),
            limit: Some(limit),
            stats: now
                .guest
                .map(|g| HashMap::from([("container_usage".to_string(), g.memory)])),
            ..Default::default()
        }),
        networks: (!now.networks.is_empty()).then(|| now.networks.clone()),
        blkio_stats: Some(ContainerBlkioStats {
            io_service_bytes_recursive: Some(vec![
                entry("read", now.io.0),
                entry("write", now.io.1),
            ]),
            ..Default::default()
        }),
        pids_stats: Some(ContainerPidsStats {
            current: now.guest.map(|g| g.pids),
            limit: rec
                .host_config
                .pids_limit
                .filter(|l| *l > 0)
                .and_then(|l| u64::try_from(l).ok()),
        }),
        ..Default::default()
    }
}
