//! `POST /auth` (`docker login`): check credentials against a registry.

use reqwest::header::WWW_AUTHENTICATE;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use crate::auth::{fetch_token, parse_challenge, Challenge, Credentials, TokenRequest};
use crate::client::{ctx, Http};
use crate::config::DOCKER_HUB_DOMAIN;
use crate::error::{Error, Result};

/// Result of a successful [`crate::check_auth`] (Engine API `AuthResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthOutcome {
    /// `Login Succeeded`
    pub status: String,
    /// An OAuth refresh token the client may store instead of the password
    /// (`IdentityToken`), when the registry's token server issued one.
    pub identity_token: Option<String>,
}

/// The registry domain of a `serveraddress`: `""`, `docker.io`,
/// `https://index.docker.io/v1/` → `docker.io`; `http://host:5000/x` → `host:5000`.
pub fn registry_domain(server_address: &str) -> String {
    let s = server_address.trim();
    let s = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s);
    let host = s.split('/').next().unwrap_or_default().to_ascii_lowercase();
    match host.as_str() {
        ""
        | "docker.io"
        | "index.docker.io"
        | "registry-1.docker.io"
        | "registry.hub.docker.com" => DOCKER_HUB_DOMAIN.to_string(),
        _ => host,
    }
}

fn ok(identity_token: Option<String>) -> AuthOutcome {
    AuthOutcome {
        status: "Login Succeeded".into(),
        identity_token,
    }
}

pub(crate) async fn check_auth(
    http: &Http,
    server_address: &str,
    creds: &Credentials,
) -> Result<AuthOutcome> {
    let domain = registry_domain(server_address);
    let endpoints = http.config.endpoints(&domain, false).await?;
    for (i, ep) in endpoints.iter().enumerate() {
        let last = i + 1 == endpoints.len();
        let client = http.client(ep)?;
        let url = ep.url("")?;
        let get = reqwest::Method::GET;
        let resp = match client.get(url.clone()).send().await {
            Ok(r) => r,
            Err(e) if !last => {
                tracing::info!(endpoint = %ep.base, error = %e, "login: endpoint unreachable, trying the next");
                continue;
            }
            Err(e) => return Err(Error::transport(ctx(&get, &url), &e)),
        };
        if resp.status().is_success() {
            return Ok(ok(None));
        }
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Err(Error::Registry(format!(
                "{}: received unexpected HTTP status: {}",
                ctx(&get, &url),
                resp.status()
            )));
        }
        let challenge = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|h| h.to_str().ok())
            .and_then(parse_challenge);
        let failed = || {
            Error::Unauthorized(format!(
                "login attempt to {url} failed with status: 401 Unauthorized"
            ))
        };
        if creds.is_empty() {
            return Err(failed());
        }
        let (auth, refresh) = match challenge {
            Some(Challenge::Basic { .. }) => (creds.basic_header(), None),
            Some(Challenge::Bearer { realm, service, .. }) => {
                let req = TokenRequest {
                    registry: &ep.host,
                    realm: &realm,
                    service: &service,
                    scopes: &[],
                    offline: true,
                    use_cache: false,
                };
                let t = fetch_token(&client, req, creds).await?;
                (format!("Bearer {}", t.token), t.refresh_token)
            }
            None => return Err(failed()),
        };
        let resp = client
            .get(url.clone())
            .header(reqwest::header::AUTHORIZATION, auth)
            .send()
            .await
            .map_err(|e| Error::transport(ctx(&get, &url), &e))?;
        if resp.status().is_success() {
            return Ok(ok(refresh));
        }
        if resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::FORBIDDEN {
            return Err(failed());
        }
        return Err(Error::Registry(format!(
            "{}: received unexpected HTTP status: {}",
            ctx(&get, &url),
            resp.status()
        )));
    }
    Err(Error::Registry(format!(
        "no endpoint for registry {domain}"
    )))
}

#[cfg(test)]
mod tests {
    use super::registry_domain;

    #[test]
    fn domains() {
        assert_eq!(registry_domain(""), "docker.io");
        assert_eq!(registry_domain("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(registry_domain("http://127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(registry_domain("localhost:5000/"), "localhost:5000");
    }
}
