//! Docker's resource flags checked as dockerd checks them, and what they
//! become for a VM: `--memory-swap` (recorded; the guest has no swap) and
//! `--cpuset-cpus` (as many vCPUs as CPUs listed, the VM's threads pinned
//! to them).

use std::collections::BTreeSet;

use crate::EngineError;

/// Docker's `ParseUintListMaximum`: `0-3,5` to {0,1,2,3,5}; numbers above
/// `maximum` are refused.
fn parse_list(val: &str, maximum: usize) -> Result<BTreeSet<usize>, String> {
    let mut out = BTreeSet::new();
    if val.is_empty() {
        return Ok(out);
    }
    let invalid = || format!("invalid format: {val}");
    let number = |s: &str| -> Result<usize, String> {
        // Go's Atoi takes a sign; a CPU number never has one that counts.
        let digits = s.strip_prefix('+').unwrap_or(s);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        digits.parse::<usize>().map_err(|_| invalid())
    };
    for part in val.split(',') {
        let (lo, hi) = match part.split_once('-') {
            None => {
                let v = number(part)?;
                (v, v)
            }
            Some((lo, hi)) => {
                let (lo, hi) = (number(lo)?, number(hi)?);
                if hi < lo {
                    return Err(invalid());
                }
                (lo, hi)
            }
        };
        if hi > maximum {
            return Err(format!("value of out range, maximum is {maximum}"));
        }
        out.extend(lo..=hi);
    }
    Ok(out)
}

/// A CPU list as the kernel writes one (`0-1,4`).
pub fn format_list(cpus: &[usize]) -> String {
    let mut parts: Vec<String> = vec![];
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

/// `--cpuset-cpus`: the host CPUs asked for, checked against those the
/// daemon may use (`available`) with dockerd's messages. `None` when the
/// flag is not set.
pub fn cpuset(spec: Option<&str>, available: &[usize]) -> Result<Option<Vec<usize>>, EngineError> {
    let Some(spec) = spec.filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    // Linux's usual limit, or more where the host has more.
    let maximum = available.iter().copied().max().unwrap_or(0).max(8192);
    let asked = parse_list(spec, maximum).map_err(|e| {
        EngineError::InvalidParameter(format!("Invalid value {spec} for cpuset cpus: {e}"))
    })?;
    if asked.iter().any(|c| !available.contains(c)) {
        return Err(EngineError::InvalidParameter(format!(
            "Requested CPUs are not available - requested {spec}, available: {}",
            format_list(available)
        )));
    }
    Ok(Some(asked.into_iter().collect()))
}

/// `--memory-swap` against `--memory`, as dockerd checks them (bytes;
/// -1 is unlimited swap, 0 unset). An update may set the swap limit
/// without the memory limit.
pub fn check_memory_swap(memory: i64, swap: i64, update: bool) -> Result<(), EngineError> {
    if swap < -1 {
        return Err(EngineError::InvalidParameter(format!(
            "invalid memory swap limit {swap}: must be -1 (unlimited) or at least the memory limit"
        )));
    }
    if memory > 0 && swap > 0 && swap < memory {
        return Err(EngineError::InvalidParameter(
            "Minimum memoryswap limit should be larger than memory limit, see usage".into(),
        ));
    }
    if memory == 0 && swap > 0 && !update {
        return Err(EngineError::InvalidParameter(
            "You should always set the Memory limit when using Memoryswap limit, see usage".into(),
        ));
    }
    Ok(())
}

/// The VM's vCPUs: as many as `--cpuset-cpus` lists, ⌈`--cpus`⌉, the
/// smaller of the two when both are set, else `default`.
pub fn vcpus(nano_cpus: i64, cpuset: Option<&[usize]>, default: u32) -> u32 {
    let from_quota = (nano_cpus > 0).then(|| (nano_cpus as u64).div_ceil(1_000_000_000) as u32);
    let from_set = cpuset.map(|c| c.len() as u32);
    match (from_quota, from_set) {
        (Some(q), Some(s)) => q.min(s),
        (Some(q), None) => q,
        (None, Some(s)) => s,
        (None, None) => default,
    }
    .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(e: EngineError) -> String {
        match e {
            EngineError::InvalidParameter(m) => m,
            other => panic!("not a 400: {other:?}"),
        }
    }

    #[test]
    fn cpu_lists_are_parsed_and_checked_as_dockerd_does() {
        let host = [0, 1];
        assert_eq!(cpuset(None, &host).ok(), Some(None));
        assert_eq!(cpuset(Some(""), &host).ok(), Some(None));
        assert_eq!(cpuset(Some("1"), &host).ok(), Some(Some(vec![1])));
        assert_eq!(cpuset(Some("0-1"), &host).ok(), Some(Some(vec![0, 1])));
        assert_eq!(cpuset(Some("1,0,1"), &host).ok(), Some(Some(vec![0, 1])));
        assert_eq!(
            msg(cpuset(Some("5"), &host).expect_err("refused")),
            "Requested CPUs are not available - requested 5, available: 0-1"
        );
        for bad in ["a", "1-", "-1", "1-0", "0,,1", "1 ", "0-1-2"] {
            assert_eq!(
                msg(cpuset(Some(bad), &host).expect_err("refused")),
                format!("Invalid value {bad} for cpuset cpus: invalid format: {bad}"),
            );
        }
        assert_eq!(
            msg(cpuset(Some("9000"), &host).expect_err("refused")),
            "Invalid value 9000 for cpuset cpus: value of out range, maximum is 8192"
        );
        assert_eq!(format_list(&[0, 1, 2, 4, 6, 7]), "0-2,4,6-7");
        assert_eq!(format_list(&[3]), "3");
    }

    #[test]
    fn memory_swap_follows_dockerds_rules() {
        let mib = 1 << 20;
        assert!(check_memory_swap(64 * mib, 0, false).is_ok());
        assert!(check_memory_swap(64 * mib, -1, false).is_ok());
        assert!(check_memory_swap(64 * mib, 64 * mib, false).is_ok());
        assert!(check_memory_swap(64 * mib, 128 * mib, false).is_ok());
        assert_eq!(
            msg(check_memory_swap(64 * mib, 32 * mib, false).expect_err("refused")),
            "Minimum memoryswap limit should be larger than memory limit, see usage"
        );
        assert_eq!(
            msg(check_memory_swap(0, 128 * mib, false).expect_err("refused")),
            "You should always set the Memory limit when using Memoryswap limit, see usage"
        );
        assert!(check_memory_swap(0, 128 * mib, true).is_ok());
        assert!(check_memory_swap(64 * mib, -2, false).is_err());
    }

    #[test]
    fn vcpus_follow_the_cpu_set_and_the_quota() {
        assert_eq!(vcpus(0, None, 1), 1);
        assert_eq!(vcpus(1_500_000_000, None, 1), 2);
        assert_eq!(vcpus(0, Some(&[0, 1]), 1), 2);
        assert_eq!(vcpus(1_000_000_000, Some(&[0, 1]), 1), 1);
        assert_eq!(vcpus(2_000_000_000, Some(&[1]), 1), 1);
    }
}
