//! `docker top`: the container's processes, as `ps -ef` (Docker's default
//! `ps_args`) or `ps aux` shows them.
//!
//! Everything in the guest except the agent (PID 1, its helpers) and kernel
//! threads belongs to the container, so the list is read from `/proc`.

use std::path::Path;

use vessel_protocol::TopFormat;

/// Column titles of `ps -ef`.
pub const TITLES: [&str; 8] = ["UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD"];

/// Column titles of `ps aux`.
pub const AUX_TITLES: [&str; 11] = [
    "USER", "PID", "%CPU", "%MEM", "VSZ", "RSS", "TTY", "STAT", "START", "TIME", "COMMAND",
];

/// The titles of `format`.
pub fn titles(format: TopFormat) -> Vec<String> {
    match format {
        TopFormat::Ef => TITLES.iter().map(|t| t.to_string()).collect(),
        TopFormat::Aux => AUX_TITLES.iter().map(|t| t.to_string()).collect(),
    }
}

/// What is shown of the guest as a whole.
struct Host {
    names: Vec<(u32, String)>,
    ticks: u64,
    boot: u64,
    uptime: f64,
    mem_total_kib: u64,
    page_kib: u64,
}

/// One row per container process, in PID order.
pub fn processes(root: Option<&Path>, format: TopFormat) -> Vec<Vec<String>> {
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let host = Host {
        names: root.map(user_names).unwrap_or_default(),
        ticks: clock_ticks(),
        boot: boot_time(),
        uptime: std::fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0),
        mem_total_kib: std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0),
        page_kib: if page > 0 { page as u64 / 1024 } else { 4 },
    };
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    let mut rows = Vec::new();
    for pid in pids {
        if pid == 1 {
            continue;
        }
        let Some(row) = row(pid, &host, format) else {
            continue;
        };
        rows.push(row);
    }
    rows
}

fn row(pid: u32, host: &Host, format: TopFormat) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    // Kernel threads have no command line.
    if cmdline.is_empty() {
        return None;
    }
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    // The agent's own helpers (copies, warm-up) are not the container's.
    if args
        .first()
        .is_some_and(|a| a == "/init" || a == "/proc/self/exe")
    {
        return None;
    }
    // Fields after the `(comm)`, which may contain spaces.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let state = f.first()?.to_string();
    let ppid = f.get(1)?.to_string();
    let tty_nr: u64 = f.get(4)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let start: u64 = f.get(19)?.parse().ok()?;
    let vsize: u64 = f.get(20)?.parse().ok()?;
    let rss_pages: u64 = f.get(21)?.parse().ok()?;
    let uid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok())?;
    let user = host
        .names
        .iter()
        .find(|(u, _)| *u == uid)
        .map(|(_, n)| n.clone())
        .unwrap_or_else(|| uid.to_string());
    let ticks = host.ticks.max(1);
    let cpu = (utime + stime) / ticks;
    let started = host.boot + start / ticks;
    Some(match format {
        TopFormat::Ef => vec![
            user,
            pid.to_string(),
            ppid,
            "0".into(),
            hh_mm(started),
            tty(tty_nr),
            format!("{:02}:{:02}:{:02}", cpu / 3600, cpu / 60 % 60, cpu % 60),
            args.join(" "),
        ],
        TopFormat::Aux => {
            let elapsed = host.uptime - start as f64 / ticks as f64;
            let cpu_pct = if elapsed > 0.0 {
                (utime + stime) as f64 / ticks as f64 / elapsed * 100.0
            } else {
                0.0
            };
            let rss_kib = rss_pages * host.page_kib;
            let mem_pct = if host.mem_total_kib > 0 {
                rss_kib as f64 / host.mem_total_kib as f64 * 100.0
            } else {
                0.0
            };
            vec![
                user,
                pid.to_string(),
                format!("{cpu_pct:.1}"),
                format!("{mem_pct:.1}"),
                (vsize / 1024).to_string(),
                rss_kib.to_string(),
                tty(tty_nr),
                state,
                hh_mm(started),
                format!("{}:{:02}", cpu / 60, cpu % 60),
                args.join(" "),
            ]
        }
    })
}

/// `pts/N` for a pseudo-terminal, `?` for none.
fn tty(nr: u64) -> String {
    let major = (nr >> 8) & 0xfff;
    let minor = (nr & 0xff) | ((nr >> 12) & 0xfff00);
    match (nr, major) {
        (0, _) => "?".into(),
        (_, 136..=143) => format!("pts/{}", (major - 136) * 256 + minor),
        _ => "?".into(),
    }
}

fn hh_mm(unix: u64) -> String {
    let day = unix % 86_400;
    format!("{:02}:{:02}", day / 3600, day / 60 % 60)
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

fn boot_time() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// uid → name from the container's `/etc/passwd`.
fn user_names(root: &Path) -> Vec<(u32, String)> {
    let Ok(path) = crate::rootfs::resolve_in_root(root, Path::new("/etc/passwd")) else {
        return Vec::new();
    };
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut p = l.split(':');
            let name = p.next()?.to_string();
            let uid = p.nth(1)?.parse().ok()?;
            Some((uid, name))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tty_numbers_read_as_ps_prints_them() {
        assert_eq!(tty(0), "?");
        assert_eq!(tty((136 << 8) | 3), "pts/3");
        assert_eq!(tty((4 << 8) | 1), "?");
    }

    #[test]
    fn this_process_is_listed_with_its_command() {
        let rows = processes(None, TopFormat::Ef);
        let me = std::process::id().to_string();
        let row = rows.iter().find(|r| r[1] == me).expect("own row");
        assert_eq!(row.len(), TITLES.len());
        assert!(!row[7].is_empty());
        let rows = processes(None, TopFormat::Aux);
        let row = rows.iter().find(|r| r[1] == me).expect("own row");
        assert_eq!(row.len(), AUX_TITLES.len());
        assert!(row[5].parse::<u64>().expect("RSS in KiB") > 0);
        assert!(!row[10].is_empty(), "the command");
    }
}
