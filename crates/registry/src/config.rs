//! Registry configuration (the registry part of dockerd's `daemon.json`) and
//! which endpoints serve a registry: mirrors for Docker Hub, HTTPS, and for
//! insecure registries HTTPS without verification then plain HTTP.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use url::Url;

use crate::error::{Error, Result};

/// The registry Docker Hub images live on (`docker.io` in references).
pub const DOCKER_HUB_DOMAIN: &str = "docker.io";
/// Where Docker Hub's registry API is served.
pub const DOCKER_HUB_REGISTRY: &str = "registry-1.docker.io";

/// Registry settings, as in dockerd's `daemon.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RegistryConfig {
    /// `registry-mirrors`: base URLs tried in order for `docker.io` images
    /// before Docker Hub itself, e.g. `http://127.0.0.1:5000`.
    pub mirrors: Vec<String>,
    /// `insecure-registries`: `host[:port]` entries and CIDRs (`10.0.0.0/8`).
    /// These are reached over HTTPS without certificate verification, then
    /// over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Like `/etc/docker/certs.d`: `<certs_dir>/<host[:port]>/*.crt` are extra
    /// trusted CAs for that registry, `client.cert` + `client.key` a client
    /// certificate.
    pub certs_dir: Option<PathBuf>,
    /// Treat loopback registries (`localhost`, 127.0.0.0/8, ::1) as insecure,
    /// as dockerd always does. Default true; set false to verify TLS on
    /// loopback (tests of `certs_dir` do).
    pub insecure_loopback: bool,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            mirrors: Vec::new(),
            insecure_registries: Vec::new(),
            certs_dir: None,
            insecure_loopback: true,
        }
    }
}

/// One way to reach a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// `scheme://host[:port][/prefix]`, no trailing slash.
    pub base: Url,
    /// `host[:port]` of `base`, for certs.d lookups and token caching.
    pub host: String,
    /// TLS without certificate verification.
    pub skip_verify: bool,
    /// A Docker Hub mirror (failures fall through to the next endpoint).
    pub mirror: bool,
}

impl Endpoint {
    /// `<base>/v2/<rest>`
    pub fn url(&self, rest: &str) -> Result<Url> {
        let s = format!("{}/v2/{rest}", self.base.as_str().trim_end_matches('/'));
        Url::parse(&s).map_err(|e| Error::InvalidReference(format!("invalid URL {s:?}: {e}")))
    }
}

/// `host[:port]` → (host without brackets, port)
pub(crate) fn split_host_port(hp: &str) -> (String, Option<u16>) {
    if let Some(rest) = hp.strip_prefix('[') {
        if let Some((h, after)) = rest.split_once(']') {
            let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
            return (h.to_string(), port);
        }
    }
    match hp.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h.to_string(), p.parse().ok()),
        _ => (hp.to_string(), None),
    }
}

fn cidr_contains(cidr: &str, ip: IpAddr) -> bool {
    let Some((net, bits)) = cidr.split_once('/') else {
        return false;
    };
    let (Ok(net), Ok(bits)) = (net.parse::<IpAddr>(), bits.parse::<u32>()) else {
        return false;
    };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) if bits <= 32 => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) if bits <= 128 => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

impl RegistryConfig {
    /// Whether `host_port` (`localhost:5000`, `10.1.2.3`, `[::1]:5000`) is an
    /// insecure registry: listed by name, inside a listed CIDR (the host is
    /// resolved, as dockerd does), or loopback.
    pub async fn is_insecure(&self, host_port: &str) -> bool {
        let strip = |e: &str| {
            e.trim_start_matches("http://")
                .trim_start_matches("https://")
                .trim_end_matches('/')
                .to_string()
        };
        if self
            .insecure_registries
            .iter()
            .any(|e| !e.contains('/') && strip(e).eq_ignore_ascii_case(host_port))
        {
            return true;
        }
        let (host, port) = split_host_port(host_port);
        let ips: Vec<IpAddr> = if let Ok(ip) = host.parse::<IpAddr>() {
            vec![ip]
        } else if host.eq_ignore_ascii_case("localhost") {
            vec![IpAddr::from([127, 0, 0, 1])]
        } else {
            match tokio::net::lookup_host((host.as_str(), port.unwrap_or(443))).await {
                Ok(addrs) => addrs.map(|a| a.ip()).collect(),
                Err(_) => Vec::new(),
            }
        };
        if self.insecure_loopback && ips.iter().any(IpAddr::is_loopback) {
            return true;
        }
        self.insecure_registries
            .iter()
            .filter(|e| e.contains('/'))
            .any(|c| ips.iter().any(|ip| cidr_contains(c, *ip)))
    }

    /// The endpoints serving registry `domain` (a reference's domain), in the
    /// order to try. Mirrors only with `use_mirrors` (pulls of docker.io).
    pub(crate) async fn endpoints(&self, domain: &str, use_mirrors: bool) -> Result<Vec<Endpoint>> {
        let mut out = Vec::new();
        if domain == DOCKER_HUB_DOMAIN {
            if use_mirrors {
                for m in &self.mirrors {
                    let base = Url::parse(m.trim_end_matches('/')).map_err(|e| {
                        Error::InvalidReference(format!("invalid mirror URL {m:?}: {e}"))
                    })?;
                    if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
                        return Err(Error::InvalidReference(format!(
                            "invalid mirror URL {m:?}: must be http:// or https://"
                        )));
                    }
                    let host = host_port_of(&base);
                    let skip_verify = base.scheme() == "https" && self.is_insecure(&host).await;
                    out.push(Endpoint {
                        base,
                        host,
                        skip_verify,
                        mirror: true,
                    });
                }
            }
            out.push(self.https(DOCKER_HUB_REGISTRY, false)?);
            return Ok(out);
        }
        if self.is_insecure(domain).await {
            out.push(self.https(domain, true)?);
            let mut http = self.https(domain, true)?;
            http.base
                .set_scheme("http")
                .map_err(|()| Error::InvalidReference(format!("invalid registry {domain}")))?;
            http.skip_verify = false;
            out.push(http);
        } else {
            out.push(self.https(domain, false)?);
        }
        Ok(out)
    }

    fn https(&self, host: &str, skip_verify: bool) -> Result<Endpoint> {
        let base = Url::parse(&format!("https://{host}"))
            .map_err(|e| Error::InvalidReference(format!("invalid registry {host:?}: {e}")))?;
        Ok(Endpoint {
            base,
            host: host.to_string(),
            skip_verify,
            mirror: false,
        })
    }
}

/// `host[:port]` of a URL, IPv6 in brackets, default ports omitted.
pub(crate) fn host_port_of(u: &Url) -> String {
    let host = match u.host() {
        Some(url::Host::Ipv6(a)) => format!("[{a}]"),
        Some(h) => h.to_string(),
        None => String::new(),
    };
    match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert!(cidr_contains("10.0.0.0/8", "10.1.2.3".parse().expect("ip")));
        assert!(!cidr_contains(
            "10.0.0.0/8",
            "11.1.2.3".parse().expect("ip")
        ));
        assert!(cidr_contains("0.0.0.0/0", "1.2.3.4".parse().expect("ip")));
        assert!(cidr_contains("::1/128", "::1".parse().expect("ip")));
        assert!(!cidr_contains("::1/128", "127.0.0.1".parse().expect("ip")));
        assert!(!cidr_contains("garbage", "127.0.0.1".parse().expect("ip")));
    }

    #[tokio::test]
    async fn insecure_rules() {
        let mut c = RegistryConfig::default();
        assert!(c.is_insecure("localhost:5000").await);
        assert!(c.is_insecure("127.0.0.2").await);
        assert!(c.is_insecure("[::1]:5000").await);
        assert!(!c.is_insecure("10.1.1.1:5000").await);
        c.insecure_registries = vec!["10.0.0.0/8".into(), "myreg.example:5000".into()];
        assert!(c.is_insecure("10.1.1.1:5000").await);
        assert!(c.is_insecure("myreg.example:5000").await);
        assert!(!c.is_insecure("myreg.example").await);
        c.insecure_loopback = false;
        assert!(!c.is_insecure("127.0.0.1:5000").await);
        let eps = c.endpoints("docker.io", true).await.expect("endpoints");
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].base.as_str(), "https://registry-1.docker.io/");
        c.mirrors = vec!["http://127.0.0.1:5000/".into()];
        let eps = c.endpoints("docker.io", true).await.expect("endpoints");
        assert_eq!(eps.len(), 2);
        assert_eq!(
            eps[0]
                .url("library/busybox/manifests/latest")
                .expect("url")
                .as_str(),
            "http://127.0.0.1:5000/v2/library/busybox/manifests/latest"
        );
        assert_eq!(eps[0].host, "127.0.0.1:5000");
        let eps = c.endpoints("10.1.1.1:5000", true).await.expect("endpoints");
        assert_eq!(
            eps.iter().map(|e| e.base.as_str()).collect::<Vec<_>>(),
            vec!["https://10.1.1.1:5000/", "http://10.1.1.1:5000/"]
        );
        assert!(eps[0].skip_verify);
    }
}
