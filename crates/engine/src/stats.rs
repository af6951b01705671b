//! `docker stats`: what a container's VM costs the host, measured on the
//! host from its QEMU process (CPU time, proportional memory, disk I/O).
//! Usage is what the VM costs, not what the guest thinks it uses; the limit
//! is the VM's memory size.

use bollard_stubs::models::{
    ContainerBlkioStatEntry, ContainerBlkioStats, ContainerCpuStats, ContainerCpuUsage,
    ContainerMemoryStats, ContainerPidsStats, ContainerStatsResponse,
};

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

/// Reads process `pid` now; zeros for what cannot be read (the VM ended).
pub fn sample(pid: u32) -> Sample {
    let hz = ticks_per_second();
    let cpu_ns = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit(')').next()?.split_whitespace().collect::<Vec<_>>();
            // Fields after the command: state is index 0, utime 11, stime 12.
            Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
        * 1_000_000_000
        / hz;
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
pub fn document(
    id: &str,
    name: &str,
    pre: &Sample,
    now: &Sample,
    limit: u64,
) -> ContainerStatsResponse {
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
        id: Some(id.into()),
        name: Some(format!("/{name}")),
        os_type: Some("linux".into()),
        read: Some(now.read.clone()),
        preread: Some(pre.read.clone()),
        cpu_stats: Some(cpu(now, cpus)),
        precpu_stats: Some(cpu(pre, cpus)),
        memory_stats: Some(ContainerMemoryStats {
            usage: Some(now.memory),
            limit: Some(limit),
            ..Default::default()
        }),
        blkio_stats: Some(ContainerBlkioStats {
            io_service_bytes_recursive: Some(vec![
                entry("read", now.io.0),
                entry("write", now.io.1),
            ]),
            ..Default::default()
        }),
        pids_stats: Some(ContainerPidsStats {
            current: None,
            limit: None,
        }),
        ..Default::default()
    }
}
