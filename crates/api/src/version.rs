//! API version negotiation: `/v1.24/…` through `/v1.50/…` and unversioned
//! paths all reach the same routes.

/// Newest API version served.
pub const MAX_VERSION: (u32, u32) = (1, 50);
/// Oldest API version served.
pub const MIN_VERSION: (u32, u32) = (1, 24);

/// The result of looking at a request path.
#[derive(Debug, PartialEq, Eq)]
pub enum Versioned {
    /// Route this path (prefix removed) with this version.
    Ok { path: String, version: (u32, u32) },
    /// Reject with this message (400).
    Reject(String),
}

fn fmt(v: (u32, u32)) -> String {
    format!("{}.{}", v.0, v.1)
}

/// Splits an optional `/vX.Y` prefix off `path`.
pub fn split(path: &str) -> Versioned {
    let Some(rest) = path.strip_prefix("/v") else {
        return Versioned::Ok {
            path: path.to_string(),
            version: MAX_VERSION,
        };
    };
    let (ver, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let parsed = ver
        .split_once('.')
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)));
    let Some(v) = parsed else {
        // Not a version prefix (e.g. `/volumes`): route as is.
        return Versioned::Ok {
            path: path.to_string(),
            version: MAX_VERSION,
        };
    };
    if v > MAX_VERSION {
        return Versioned::Reject(format!(
            "client version {} is too new. Maximum supported API version is {}",
            fmt(v),
            fmt(MAX_VERSION)
        ));
    }
    if v < MIN_VERSION {
        return Versioned::Reject(format!(
            "client version {} is too old. Minimum supported API version is {}, please upgrade your client to a newer version",
            fmt(v),
            fmt(MIN_VERSION)
        ));
    }
    Versioned::Ok {
        path: tail.to_string(),
        version: v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(
            split("/v1.50/info"),
            Versioned::Ok {
                path: "/info".into(),
                version: (1, 50)
            }
        );
        assert_eq!(
            split("/v1.24/containers/json"),
            Versioned::Ok {
                path: "/containers/json".into(),
                version: (1, 24)
            }
        );
        assert_eq!(
            split("/_ping"),
            Versioned::Ok {
                path: "/_ping".into(),
                version: MAX_VERSION
            }
        );
        assert_eq!(
            split("/volumes"),
            Versioned::Ok {
                path: "/volumes".into(),
                version: MAX_VERSION
            }
        );
        assert!(matches!(split("/v1.51/info"), Versioned::Reject(m) if m.contains("too new")));
        assert!(matches!(split("/v1.23/info"), Versioned::Reject(m) if m.contains("too old")));
        assert!(matches!(split("/v2.0/info"), Versioned::Reject(_)));
    }
}
