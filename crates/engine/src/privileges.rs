//! Docker's privilege and limit flags (`--cap-add`, `--cap-drop`,
//! `--privileged`, `--security-opt`, `--ulimit`, `--group-add`,
//! `--pids-limit`, `--shm-size`) turned into what the guest agent applies
//! to the container's processes inside the VM. Checked at create, so a bad
//! flag is a 400 and nothing is made.

use bollard_stubs::models::HostConfig;
use vessel_protocol::{Restrictions, CAPABILITIES, DEFAULT_CAPABILITIES};

use crate::EngineError;

fn cap_number(name: &str) -> Result<u8, EngineError> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    CAPABILITIES
        .iter()
        .position(|c| *c == bare)
        .map(|i| i as u8)
        .ok_or_else(|| EngineError::InvalidParameter(format!("unknown capability: \"{name}\"")))
}

fn is_all(name: &str) -> bool {
    name.eq_ignore_ascii_case("ALL") || name.eq_ignore_ascii_case("CAP_ALL")
}

/// The capability numbers a container keeps; `None` for all of them.
fn capabilities(hc: &HostConfig) -> Result<Option<Vec<u8>>, EngineError> {
    let adds = hc.cap_add.clone().unwrap_or_default();
    let drops = hc.cap_drop.clone().unwrap_or_default();
    for c in adds.iter().chain(&drops).filter(|c| !is_all(c)) {
        cap_number(c)?;
    }
    if hc.privileged == Some(true) {
        return Ok(None);
    }
    let all: Vec<u8> = (0..CAPABILITIES.len() as u8).collect();
    let mut set: Vec<u8> = if adds.iter().any(|c| is_all(c)) {
        all
    } else {
        DEFAULT_CAPABILITIES
            .iter()
            .map(|c| cap_number(c))
            .collect::<Result<_, _>>()?
    };
    if drops.iter().any(|c| is_all(c)) {
        set.clear();
    } else {
        let dropped: Vec<u8> = drops
            .iter()
            .map(|c| cap_number(c))
            .collect::<Result<_, _>>()?;
        set.retain(|c| !dropped.contains(c));
    }
    for c in adds.iter().filter(|c| !is_all(c)) {
        let n = cap_number(c)?;
        if !set.contains(&n) {
            set.push(n);
        }
    }
    set.sort_unstable();
    Ok(Some(set))
}

/// `--ulimit` names and their resource numbers (`RLIMIT_*`).
const ULIMITS: [(&str, u32); 15] = [
    ("cpu", 0),
    ("fsize", 1),
    ("data", 2),
    ("stack", 3),
    ("core", 4),
    ("rss", 5),
    ("nproc", 6),
    ("nofile", 7),
    ("memlock", 8),
    ("locks", 10),
    ("sigpending", 11),
    ("msgqueue", 12),
    ("nice", 13),
    ("rtprio", 14),
    ("rttime", 15),
];

/// What the guest agent must apply for `hc`.
pub(crate) fn restrictions(hc: &HostConfig) -> Result<Restrictions, EngineError> {
    let mut no_new_privileges = false;
    for opt in hc.security_opt.iter().flatten() {
        let (key, value) = opt
            .split_once(['=', ':'])
            .map(|(k, v)| (k, Some(v)))
            .unwrap_or((opt.as_str(), None));
        match (key, value) {
            ("no-new-privileges", None | Some("true")) => no_new_privileges = true,
            ("no-new-privileges", Some("false")) => no_new_privileges = false,
            // Confinement of a shared host kernel, which a VM does not
            // have: asking for none of it is what the VM gives anyway.
            ("seccomp" | "apparmor", Some("unconfined")) | ("label", Some("disable")) => {}
            _ => {
                return Err(EngineError::InvalidParameter(format!(
                    "security option {opt:?} is not supported: a Vessel container is confined by its VM (no-new-privileges, seccomp=unconfined, apparmor=unconfined and label=disable are accepted)"
                )))
            }
        }
    }
    let mut ulimits = vec![];
    for u in hc.ulimits.iter().flatten() {
        let name = u.name.clone().unwrap_or_default();
        let res = ULIMITS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| *r)
            .ok_or_else(|| EngineError::InvalidParameter(format!("invalid ulimit type: {name}")))?;
        let soft = u.soft.unwrap_or(0);
        let hard = u.hard.unwrap_or(soft);
        if soft >= 0 && hard >= 0 && soft > hard {
            return Err(EngineError::InvalidParameter(format!(
                "ulimit soft limit must be less than or equal to hard limit: {soft} > {hard}"
            )));
        }
        ulimits.push((res, soft, hard));
    }
    let shm_size = match hc.shm_size {
        Some(s) if s < 0 => {
            return Err(EngineError::InvalidParameter(
                "SHM size can not be less than 0".into(),
            ))
        }
        Some(0) | None => None,
        Some(s) => Some(s as u64),
    };
    Ok(Restrictions {
        capabilities: capabilities(hc)?,
        no_new_privileges,
        ulimits,
        group_add: hc.group_add.clone().unwrap_or_default(),
        pids_limit: hc.pids_limit.filter(|p| *p > 0),
        shm_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hc(add: &[&str], drop: &[&str], privileged: bool) -> HostConfig {
        HostConfig {
            cap_add: Some(add.iter().map(|s| s.to_string()).collect()),
            cap_drop: Some(drop.iter().map(|s| s.to_string()).collect()),
            privileged: Some(privileged),
            ..Default::default()
        }
    }

    fn names(caps: Option<Vec<u8>>) -> Vec<&'static str> {
        caps.unwrap_or_default()
            .iter()
            .map(|c| CAPABILITIES[usize::from(*c)])
            .collect()
    }

    #[test]
    fn capabilities_follow_dockers_rules() {
        let d = names(capabilities(&hc(&[], &[], false)).expect("caps"));
        assert_eq!(d.len(), DEFAULT_CAPABILITIES.len());
        assert!(!d.contains(&"SYS_ADMIN") && d.contains(&"NET_RAW"));
        let c = names(capabilities(&hc(&["cap_sys_admin"], &["NET_RAW"], false)).expect("caps"));
        assert!(c.contains(&"SYS_ADMIN") && !c.contains(&"NET_RAW"));
        let only = names(capabilities(&hc(&["CHOWN"], &["ALL"], false)).expect("caps"));
        assert_eq!(only, vec!["CHOWN"]);
        assert_eq!(capabilities(&hc(&[], &[], true)).expect("caps"), None);
        assert_eq!(
            names(capabilities(&hc(&["ALL"], &[], false)).expect("caps")).len(),
            CAPABILITIES.len()
        );
        assert!(capabilities(&hc(&["FROBNICATE"], &[], false)).is_err());
        assert!(capabilities(&hc(&["FROBNICATE"], &[], true)).is_err());
    }

    #[test]
    fn security_options_and_ulimits_are_checked() {
        let mut h = HostConfig {
            security_opt: Some(vec![
                "no-new-privileges".into(),
                "seccomp=unconfined".into(),
            ]),
            ulimits: Some(vec![bollard_stubs::models::ResourcesUlimits {
                name: Some("nofile".into()),
                soft: Some(100),
                hard: Some(200),
            }]),
            ..Default::default()
        };
        let r = restrictions(&h).expect("restrictions");
        assert!(r.no_new_privileges);
        assert_eq!(r.ulimits, vec![(7, 100, 200)]);
        h.security_opt = Some(vec!["seccomp=/etc/profile.json".into()]);
        assert!(restrictions(&h).is_err());
        h.security_opt = None;
        h.ulimits = Some(vec![bollard_stubs::models::ResourcesUlimits {
            name: Some("nofile".into()),
            soft: Some(300),
            hard: Some(200),
        }]);
        assert!(restrictions(&h).is_err());
    }
}
