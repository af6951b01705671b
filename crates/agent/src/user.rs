//! Resolution of the container user, with Docker's (runc's) semantics.
//!
//! Pure logic: it parses the text of the container's `/etc/passwd` and
//! `/etc/group` and never touches the system, so it is unit-tested on the
//! host. [`resolve_in_root`] only reads those two files from a root
//! directory.

use std::path::Path;

use crate::command::StartError;

/// Exit code Docker reports when the user cannot be resolved.
pub const USER_ERROR_EXIT_CODE: i32 = 126;

/// Largest uid/gid runc accepts.
const MAX_ID: i64 = 2_147_483_647;

/// The identity the container process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids.
    pub sgids: Vec<u32>,
    /// Home directory (used for `HOME` when the environment has none).
    pub home: String,
}

/// One `/etc/passwd` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PasswdEntry {
    name: String,
    uid: i64,
    gid: i64,
    home: String,
}

/// One `/etc/group` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GroupEntry {
    name: String,
    gid: i64,
    members: Vec<String>,
}

/// Meaningful lines of a colon-separated database: no blank lines, no comments.
fn db_lines(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect())
}

/// Parses `/etc/passwd`. Malformed entries (too few fields, a non-numeric
/// uid or gid) are skipped.
fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    db_lines(text)
        .filter_map(|f| {
            if f.len() < 4 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].trim().parse().ok()?,
                gid: f[3].trim().parse().ok()?,
                home: f.get(5).map(|h| h.to_string()).unwrap_or_default(),
            })
        })
        .collect()
}

/// Parses `/etc/group`. Malformed entries are skipped.
fn parse_group(text: &str) -> Vec<GroupEntry> {
    db_lines(text)
        .filter_map(|f| {
            if f.len() < 3 {
                return None;
            }
            let members = f
                .get(3)
                .map(|m| {
                    m.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].trim().parse().ok()?,
                members,
            })
        })
        .collect()
}

fn user_error(message: String) -> StartError {
    StartError {
        message,
        exit_code: USER_ERROR_EXIT_CODE,
    }
}

fn check_range(id: i64) -> Result<u32, StartError> {
    u32::try_from(id)
        .ok()
        .filter(|_| id <= MAX_ID)
        .ok_or_else(|| user_error(format!("uids and gids must be in range 0-{MAX_ID}")))
}

/// Resolves a Docker user spec (`""`, `name`, `uid`, `user:group`) against
/// the text of `/etc/passwd` and `/etc/group` (`None` when the file is missing).
///
/// * `""` is root: uid 0, gid 0, or what the passwd entry of uid 0 says.
/// * a name must exist in passwd; a number need not (gid 0, home `/`).
/// * a group part, name or number, replaces the primary gid; a name must
///   exist in the group file.
/// * without a group part, the supplementary groups are the groups whose
///   member list names the user.
pub fn resolve(
    spec: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<ExecUser, StartError> {
    let mut parts = spec.split(':');
    let user_arg = parts.next().unwrap_or("");
    let group_arg = parts.next().unwrap_or("");
    let uid_num: Option<i64> = user_arg.parse().ok();
    let gid_num: Option<i64> = group_arg.parse().ok();

    let users = passwd.map(parse_passwd).unwrap_or_default();
    let matched = users.iter().find(|u| {
        if user_arg.is_empty() {
            u.uid == 0
        } else if let Some(uid) = uid_num {
            u.uid == uid
        } else {
            u.name == user_arg
        }
    });

    let (mut uid, mut gid, mut home, user_name) = (0i64, 0i64, "/".to_string(), String::new());
    let user_name = match matched {
        Some(u) => {
            uid = u.uid;
            gid = u.gid;
            if !u.home.is_empty() {
                home = u.home.clone();
            }
            u.name.clone()
        }
        None if user_arg.is_empty() => user_name,
        None => match uid_num {
            Some(n) => {
                uid = n;
                user_name
            }
            None => {
                return Err(user_error(format!(
                    "unable to find user {user_arg}: no matching entries in passwd file"
                )))
            }
        },
    };

    let groups = group.map(parse_group).unwrap_or_default();
    let mut sgids = Vec::new();
    if group_arg.is_empty() {
        if !user_name.is_empty() {
            for g in groups.iter().filter(|g| g.members.contains(&user_name)) {
                sgids.push(check_range(g.gid)?);
            }
        }
    } else {
        let found = groups.iter().find(|g| match gid_num {
            Some(n) => g.gid == n,
            None => g.name == group_arg,
        });
        gid = match (found, gid_num) {
            (Some(g), _) => g.gid,
            (None, Some(n)) => n,
            (None, None) => {
                return Err(user_error(format!(
                    "unable to find group {group_arg}: no matching entries in group file"
                )))
            }
        };
    }

    Ok(ExecUser {
        uid: check_range(uid)?,
        gid: check_range(gid)?,
        sgids,
        home,
    })
}

/// Reads `/etc/passwd` and `/etc/group` of the root filesystem at `root`
/// (following symlinks inside it) and resolves `spec`. Unreadable files are
/// treated as missing.
pub fn resolve_in_root(root: &Path, spec: &str) -> Result<ExecUser, StartError> {
    let read = |p: &str| -> Option<String> {
        let path = crate::rootfs::resolve_in_root(root, Path::new(p)).ok()?;
        std::fs::read(path)
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    let passwd = read("/etc/passwd");
    let group = read("/etc/group");
    resolve(spec, passwd.as_deref(), group.as_deref())
}

/// `--group-add`: each entry a group name of the root filesystem's
/// `/etc/group` or a number. An unknown name fails the start as Docker does.
pub fn extra_groups_in_root(root: &Path, names: &[String]) -> Result<Vec<u32>, StartError> {
    if names.is_empty() {
        return Ok(vec![]);
    }
    let group = crate::rootfs::resolve_in_root(root, Path::new("/etc/group"))
        .ok()
        .and_then(|p| std::fs::read(p).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let groups = parse_group(&group);
    names
        .iter()
        .map(|n| match n.parse::<i64>() {
            Ok(id) => check_range(id),
            Err(_) => groups
                .iter()
                .find(|g| &g.name == n)
                .ok_or_else(|| {
                    user_error(format!(
                        "unable to find group {n}: no matching entries in group file"
                    ))
                })
                .and_then(|g| check_range(g.gid)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/ash
# a comment

daemon:x:2:2:daemon:/sbin:/sbin/nologin
nginx:x:101:101:nginx:/var/cache/nginx:/sbin/nologin
broken:x:notanumber:1::/nowhere:/bin/sh
nohome:x:1000:1000::
";
    const GROUP: &str = "\
root:x:0:root
bin:x:1:root,bin,daemon
daemon:x:2:root,bin,daemon
wheel:x:10:root,nginx
nginx:x:101:nginx
users:x:100:
";

    fn ok(spec: &str) -> ExecUser {
        resolve(spec, Some(PASSWD), Some(GROUP)).expect("resolves")
    }

    fn err(spec: &str, passwd: Option<&str>, group: Option<&str>) -> StartError {
        resolve(spec, passwd, group).expect_err("fails")
    }

    #[test]
    fn empty_user_is_root_with_passwd_home_and_member_groups() {
        let u = ok("");
        assert_eq!(
            u,
            ExecUser {
                uid: 0,
                gid: 0,
                sgids: vec![0, 1, 2, 10],
                home: "/root".into()
            }
        );
    }

    #[test]
    fn empty_user_without_files_is_root_with_home_slash() {
        let u = resolve("", None, None).expect("root");
        assert_eq!(
            u,
            ExecUser {
                uid: 0,
                gid: 0,
                sgids: vec![],
                home: "/".into()
            }
        );
    }

    #[test]
    fn name_is_looked_up_in_passwd() {
        let u = ok("nginx");
        assert_eq!(
            u,
            ExecUser {
                uid: 101,
                gid: 101,
                sgids: vec![10, 101],
                home: "/var/cache/nginx".into()
            }
        );
        let u = ok("daemon");
        assert_eq!(
            (u.uid, u.gid, u.home.as_str(), u.sgids),
            (2, 2, "/sbin", vec![1, 2])
        );
    }

    #[test]
    fn unknown_name_is_a_docker_style_error() {
        let e = err("nobody", Some(PASSWD), Some(GROUP));
        assert_eq!(
            e.message,
            "unable to find user nobody: no matching entries in passwd file"
        );
        assert_eq!(e.exit_code, 126);
        // A malformed entry does not match either.
        let e = err("broken", Some(PASSWD), Some(GROUP));
        assert_eq!(
            e.message,
            "unable to find user broken: no matching entries in passwd file"
        );
        // Nor does anything when there is no passwd file at all.
        let e = err("nginx", None, None);
        assert_eq!(
            e.message,
            "unable to find user nginx: no matching entries in passwd file"
        );
    }

    #[test]
    fn numeric_uid_matches_by_uid_or_stands_alone() {
        let u = ok("101");
        assert_eq!(
            (u.uid, u.gid, u.home.as_str()),
            (101, 101, "/var/cache/nginx")
        );
        let u = ok("4242");
        assert_eq!(
            u,
            ExecUser {
                uid: 4242,
                gid: 0,
                sgids: vec![],
                home: "/".into()
            }
        );
        let u = resolve("4242", None, None).expect("no passwd is fine");
        assert_eq!(
            u,
            ExecUser {
                uid: 4242,
                gid: 0,
                sgids: vec![],
                home: "/".into()
            }
        );
    }

    #[test]
    fn entry_without_home_gets_slash() {
        let u = ok("nohome");
        assert_eq!((u.uid, u.gid, u.home.as_str()), (1000, 1000, "/"));
    }

    #[test]
    fn user_and_group_forms() {
        // name:name — explicit group replaces the gid, no supplementary groups.
        let u = ok("nginx:wheel");
        assert_eq!(
            u,
            ExecUser {
                uid: 101,
                gid: 10,
                sgids: vec![],
                home: "/var/cache/nginx".into()
            }
        );
        // uid:gid, neither in the files.
        let u = ok("1234:5678");
        assert_eq!(
            u,
            ExecUser {
                uid: 1234,
                gid: 5678,
                sgids: vec![],
                home: "/".into()
            }
        );
        // name:gid
        let u = ok("daemon:100");
        assert_eq!((u.uid, u.gid), (2, 100));
        // uid:name
        let u = ok("1234:users");
        assert_eq!((u.uid, u.gid, u.home.as_str()), (1234, 100, "/"));
        // numeric group with no group file.
        let u = resolve("7:8", None, None).expect("numeric");
        assert_eq!((u.uid, u.gid), (7, 8));
    }

    #[test]
    fn unknown_group_is_a_docker_style_error() {
        let e = err("nginx:nogroup", Some(PASSWD), Some(GROUP));
        assert_eq!(
            e.message,
            "unable to find group nogroup: no matching entries in group file"
        );
        assert_eq!(e.exit_code, 126);
        let e = err("0:staff", Some(PASSWD), None);
        assert_eq!(
            e.message,
            "unable to find group staff: no matching entries in group file"
        );
    }

    #[test]
    fn out_of_range_ids_are_rejected() {
        let e = err("-1", Some(PASSWD), Some(GROUP));
        assert_eq!(e.message, "uids and gids must be in range 0-2147483647");
        let e = err("0:4294967296", Some(PASSWD), Some(GROUP));
        assert_eq!(e.message, "uids and gids must be in range 0-2147483647");
    }

    #[test]
    fn reads_files_from_a_root_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("etc")).expect("mkdir");
        std::fs::write(dir.path().join("etc/passwd"), PASSWD).expect("write");
        std::fs::write(dir.path().join("etc/group"), GROUP).expect("write");
        let u = resolve_in_root(dir.path(), "nginx").expect("nginx");
        assert_eq!((u.uid, u.gid, u.sgids), (101, 101, vec![10, 101]));

        let empty = tempfile::tempdir().expect("tempdir");
        let u = resolve_in_root(empty.path(), "").expect("root");
        assert_eq!((u.uid, u.gid, u.home.as_str()), (0, 0, "/"));
        let e = resolve_in_root(empty.path(), "app").expect_err("no passwd");
        assert_eq!(
            e.message,
            "unable to find user app: no matching entries in passwd file"
        );
    }
}
