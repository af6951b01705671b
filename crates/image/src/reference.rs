//! Docker image references.
//!
//! A small hand-written parser of the distribution reference grammar
//! (`github.com/distribution/reference`), with Docker's normalisation
//! (`busybox` ≡ `busybox:latest` ≡ `docker.io/library/busybox:latest`).
//! We do not use `oci-spec`'s `Reference`: it normalises differently (it keeps
//! `docker.io/library/` and accepts some names Docker rejects), and Docker's
//! exact error wording (`invalid reference format`, `... must be lowercase`)
//! is part of the API behaviour clients see; the grammar is small enough to
//! own and test here.

use crate::error::{Error, Result};

const DEFAULT_DOMAIN: &str = "docker.io";
const LEGACY_DOMAIN: &str = "index.docker.io";
const OFFICIAL_PREFIX: &str = "library/";
const NAME_TOTAL_LENGTH_MAX: usize = 255;

/// A parsed, normalised reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry domain, e.g. `docker.io`, `localhost:5000`.
    pub domain: String,
    /// Path inside the registry, e.g. `library/busybox`.
    pub path: String,
    /// Tag, if given (see [`Reference::with_default_tag`]).
    pub tag: Option<String>,
    /// Digest (`sha256:<hex>`), if given.
    pub digest: Option<String>,
}

fn invalid() -> Error {
    Error::InvalidReference("invalid reference format".to_string())
}

fn is_alnum_lower(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// path-component := [a-z0-9]+ ((\.|_|__|-+)[a-z0-9]+)*
fn valid_path_component(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || !is_alnum_lower(b[0]) || !is_alnum_lower(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum_lower(b[i]) {
            i += 1;
            continue;
        }
        // separator
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !is_alnum_lower(b[i]) {
            return false;
        }
    }
    true
}

/// domain-component := [a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
fn valid_domain_component(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

/// domain := host (':' port)?; host := domain-components joined by '.' | '[' ipv6 ']'
fn valid_domain(s: &str) -> bool {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some(end) = rest.find(']') else {
            return false;
        };
        let ip = &rest[..end];
        if ip.is_empty() || !ip.bytes().all(|c| c.is_ascii_hexdigit() || c == b':') {
            return false;
        }
        let after = &rest[end + 1..];
        match after.strip_prefix(':') {
            Some(p) => (None, Some(p)),
            None if after.is_empty() => (None, None),
            None => return false,
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(s), None),
        }
    };
    if let Some(h) = host {
        if !h.split('.').all(valid_domain_component) {
            return false;
        }
    }
    if let Some(p) = port {
        if p.is_empty() || !p.bytes().all(|c| c.is_ascii_digit()) {
            return false;
        }
    }
    true
}

/// tag := [\w][\w.-]{0,127}
fn valid_tag(s: &str) -> bool {
    let b = s.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    !b.is_empty()
        && b.len() <= 128
        && word(b[0])
        && b.iter().all(|c| word(*c) || *c == b'.' || *c == b'-')
}

/// We only store sha256 digests; other algorithms are syntactically valid
/// per the grammar but never match anything, so rejecting them is simpler.
fn valid_digest(s: &str) -> bool {
    match s.split_once(':') {
        Some(("sha256", hex)) => is_hex64(hex),
        _ => false,
    }
}

pub(crate) fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

impl Reference {
    /// Parse and normalise a reference the way `docker` does
    /// (`reference.ParseNormalizedNamed`).
    pub fn parse(s: &str) -> Result<Reference> {
        if is_hex64(s) {
            return Err(Error::InvalidReference(format!(
                "invalid repository name ({s}), cannot specify 64-byte hexadecimal strings"
            )));
        }
        // Split off digest, then tag (a ':' after the last '/').
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                if !valid_digest(d) {
                    return Err(invalid());
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains('/') => {
                let t = &rest[i + 1..];
                if !valid_tag(t) {
                    return Err(invalid());
                }
                (&rest[..i], Some(t.to_string()))
            }
            _ => (rest, None),
        };
        if name.is_empty() {
            return Err(invalid());
        }
        // splitDockerDomain
        let (mut domain, mut path) = match name.split_once('/') {
            Some((first, remainder))
                if first.contains('.')
                    || first.contains(':')
                    || first == "localhost"
                    || first.to_lowercase() != first =>
            {
                (first.to_string(), remainder.to_string())
            }
            _ => (DEFAULT_DOMAIN.to_string(), name.to_string()),
        };
        if domain == LEGACY_DOMAIN {
            domain = DEFAULT_DOMAIN.to_string();
        }
        if domain == DEFAULT_DOMAIN && !path.contains('/') {
            path = format!("{OFFICIAL_PREFIX}{path}");
        }
        if path.to_lowercase() != path {
            return Err(Error::InvalidReference(format!(
                "invalid reference format: repository name ({path}) must be lowercase"
            )));
        }
        if !valid_domain(&domain) || !path.split('/').all(valid_path_component) {
            return Err(invalid());
        }
        if domain.len() + 1 + path.len() > NAME_TOTAL_LENGTH_MAX {
            return Err(Error::InvalidReference(format!(
                "invalid reference format: repository name must not be more than {NAME_TOTAL_LENGTH_MAX} characters"
            )));
        }
        Ok(Reference {
            domain,
            path,
            tag,
            digest,
        })
    }

    /// A reference to tag a new image with (`docker import`, `docker
    /// commit`): parsed as [`Reference::parse`], a digest refused, the tag
    /// `latest` by default.
    pub fn parse_new_tag(s: &str) -> Result<Reference> {
        let r = Reference::parse(s)?;
        if r.digest.is_some() {
            return Err(Error::InvalidReference(
                "refusing to create a tag with a digest reference".into(),
            ));
        }
        Ok(r.with_default_tag())
    }

    /// `TagNameOnly`: add `latest` when neither a tag nor a digest is given.
    pub fn with_default_tag(mut self) -> Reference {
        if self.tag.is_none() && self.digest.is_none() {
            self.tag = Some("latest".to_string());
        }
        self
    }

    /// The familiar repository name: `busybox`, `user/app`, `localhost:5000/a/b`.
    pub fn familiar_name(&self) -> String {
        if self.domain == DEFAULT_DOMAIN {
            match self.path.strip_prefix(OFFICIAL_PREFIX) {
                Some(p) if !p.contains('/') => p.to_string(),
                _ => self.path.clone(),
            }
        } else {
            format!("{}/{}", self.domain, self.path)
        }
    }

    /// The fully qualified name: `docker.io/library/busybox`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// Familiar string: `busybox:latest`, `name@sha256:...`, `name:tag@sha256:...`.
    pub fn familiar(&self) -> String {
        let mut s = self.familiar_name();
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(d);
        }
        s
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.familiar())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fam(s: &str) -> String {
        Reference::parse(s)
            .map(|r| r.with_default_tag().familiar())
            .unwrap_or_else(|e| format!("ERR {e}"))
    }

    #[test]
    fn normalisation() {
        assert_eq!(fam("busybox"), "busybox:latest");
        assert_eq!(fam("busybox:latest"), "busybox:latest");
        assert_eq!(fam("docker.io/library/busybox:latest"), "busybox:latest");
        assert_eq!(fam("index.docker.io/library/busybox"), "busybox:latest");
        assert_eq!(fam("docker.io/user/app:1.0"), "user/app:1.0");
        assert_eq!(fam("user/app"), "user/app:latest");
        assert_eq!(fam("localhost:5000/a/b:t"), "localhost:5000/a/b:t");
        assert_eq!(fam("localhost/a"), "localhost/a:latest");
        assert_eq!(
            fam("example.com/a_b/c__d/e-f--g.h:v1.2-rc_3"),
            "example.com/a_b/c__d/e-f--g.h:v1.2-rc_3"
        );
        assert_eq!(fam("[::1]:5000/x:y"), "[::1]:5000/x:y");
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(fam(&format!("busybox@{d}")), format!("busybox@{d}"));
        assert_eq!(fam(&format!("busybox:1@{d}")), format!("busybox:1@{d}"));
        let r = Reference::parse("busybox").map(|r| r.full_name());
        assert_eq!(r.ok().as_deref(), Some("docker.io/library/busybox"));
    }

    #[test]
    fn invalid_references() {
        for bad in [
            "",
            ":",
            "busybox:",
            "a//b",
            "a/",
            "-a",
            "a-",
            "a..b",
            "a___b",
            "busybox:-tag",
            "busybox@sha256:abc",
            "bus box",
            "a:b:c",
            "UPPER.com:x/a:b:c",
        ] {
            assert_eq!(fam(bad), "ERR invalid reference format", "{bad:?}");
        }
        assert_eq!(
            fam("Foo"),
            "ERR invalid reference format: repository name (library/Foo) must be lowercase"
        );
        assert_eq!(
            fam("user/Foo:1"),
            "ERR invalid reference format: repository name (user/Foo) must be lowercase"
        );
        assert!(fam(&"a".repeat(64)).contains("64-byte hexadecimal"));
        assert_eq!(
            fam(&format!("busybox:{}", "t".repeat(129))),
            "ERR invalid reference format"
        );
        assert_eq!(
            fam(&format!("busybox:{}", "t".repeat(128))),
            format!("busybox:{}", "t".repeat(128))
        );
        // uppercase domain is fine
        assert_eq!(fam("Example.com/a"), "Example.com/a:latest");
    }
}
