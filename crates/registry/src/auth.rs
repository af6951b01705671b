//! Credentials (Docker's `X-Registry-Auth`), `WWW-Authenticate` challenges,
//! and bearer tokens with a process-wide cache.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::{error_chain, Error, Result};

/// Registry credentials, as Docker's `AuthConfig` (the `X-Registry-Auth`
/// header of pull/push, the body of `POST /auth`). All fields may be empty.
/// Serde uses Docker's JSON names (`identitytoken`, ...); prefer
/// [`Credentials::from_json`], which also handles `auth` and any key case.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// An OAuth refresh token (from a previous `POST /auth`), used instead of
    /// the password to get bearer tokens.
    #[serde(rename = "identitytoken", alias = "identity_token")]
    pub identity_token: String,
    /// A bearer token to send as is.
    #[serde(rename = "registrytoken", alias = "registry_token")]
    pub registry_token: String,
    /// The registry these are for (`https://index.docker.io/v1/`, `localhost:5000`), if given.
    #[serde(rename = "serveraddress", alias = "server_address")]
    pub server_address: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hide = |s: &str| if s.is_empty() { "" } else { "<redacted>" };
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &hide(&self.password))
            .field("identity_token", &hide(&self.identity_token))
            .field("registry_token", &hide(&self.registry_token))
            .field("server_address", &self.server_address)
            .finish()
    }
}

fn b64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::engine::{
        general_purpose, DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig,
    };
    let cfg = GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let url = GeneralPurpose::new(&base64::alphabet::URL_SAFE, cfg);
    let std = GeneralPurpose::new(&base64::alphabet::STANDARD, cfg);
    let s = s.trim();
    url.decode(s)
        .or_else(|_| std.decode(s))
        .or_else(|_| general_purpose::STANDARD.decode(s))
        .ok()
}

impl Credentials {
    /// Decode an `X-Registry-Auth` header: base64url JSON (padded or not;
    /// standard base64 and bare JSON are accepted too). An empty header gives
    /// empty credentials.
    pub fn from_x_registry_auth(header: &str) -> Result<Credentials> {
        let h = header.trim();
        if h.is_empty() {
            return Ok(Credentials::default());
        }
        let json = if h.starts_with('{') {
            h.as_bytes().to_vec()
        } else {
            b64_decode(h).ok_or_else(|| {
                Error::InvalidCredentials("invalid X-Registry-Auth header: not base64".into())
            })?
        };
        Credentials::from_json(&json)
            .map_err(|e| Error::InvalidCredentials(format!("invalid X-Registry-Auth header: {e}")))
    }

    /// Decode Docker's `AuthConfig` JSON (`username`, `password`, `auth`,
    /// `serveraddress`, `identitytoken`, `registrytoken`; keys are matched
    /// case-insensitively like Go's decoder). `auth` (base64 `user:password`)
    /// fills username/password when they are empty.
    pub fn from_json(data: &[u8]) -> Result<Credentials> {
        let v: Value = serde_json::from_slice(data)
            .map_err(|e| Error::InvalidCredentials(format!("invalid auth JSON: {e}")))?;
        let obj: Map<String, Value> = match v {
            Value::Object(o) => o,
            Value::Null => Map::new(),
            _ => {
                return Err(Error::InvalidCredentials(
                    "auth JSON is not an object".into(),
                ))
            }
        };
        let get = |k: &str| {
            obj.iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(k))
                .and_then(|(_, v)| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let mut c = Credentials {
            username: get("username"),
            password: get("password"),
            identity_token: get("identitytoken"),
            registry_token: get("registrytoken"),
            server_address: get("serveraddress"),
        };
        let auth = get("auth");
        if !auth.is_empty() && c.username.is_empty() && c.password.is_empty() {
            let raw = b64_decode(&auth).ok_or_else(|| {
                Error::InvalidCredentials("invalid auth field: not base64".into())
            })?;
            let s = String::from_utf8(raw)
                .map_err(|_| Error::InvalidCredentials("invalid auth field: not UTF-8".into()))?;
            let (u, p) = s.split_once(':').ok_or_else(|| {
                Error::InvalidCredentials("invalid auth field: expected user:password".into())
            })?;
            c.username = u.to_string();
            c.password = p.to_string();
        }
        Ok(c)
    }

    /// Encode as Docker's `X-Registry-Auth` value (base64url JSON).
    pub fn to_x_registry_auth(&self) -> String {
        let v = serde_json::json!({
            "username": self.username, "password": self.password,
            "identitytoken": self.identity_token, "registrytoken": self.registry_token,
            "serveraddress": self.server_address,
        });
        base64::engine::general_purpose::URL_SAFE.encode(v.to_string())
    }

    /// No secret at all (anonymous).
    pub fn is_empty(&self) -> bool {
        self.username.is_empty()
            && self.password.is_empty()
            && self.identity_token.is_empty()
            && self.registry_token.is_empty()
    }

    pub(crate) fn has_basic(&self) -> bool {
        !self.username.is_empty() || !self.password.is_empty()
    }

    /// A stable fingerprint of the secrets (token cache key part).
    pub(crate) fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for s in [
            &self.username,
            &self.password,
            &self.identity_token,
            &self.registry_token,
        ] {
            h.update(s.as_bytes());
            h.update([0]);
        }
        hex::encode(h.finalize())
    }

    pub(crate) fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic {
        realm: String,
    },
    Bearer {
        realm: String,
        service: String,
        scope: Option<String>,
        error: Option<String>,
    },
}

/// Parse `Bearer realm="...",service="...",scope="..."` or `Basic realm="..."`.
pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let params = parse_params(rest);
    let get = |k: &str| params.get(k).cloned();
    if scheme.eq_ignore_ascii_case("basic") {
        Some(Challenge::Basic {
            realm: get("realm").unwrap_or_default(),
        })
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Some(Challenge::Bearer {
            realm: get("realm")?,
            service: get("service").unwrap_or_default(),
            scope: get("scope"),
            error: get("error"),
        })
    } else {
        None
    }
}

/// `k="v", k2=v2` with quoted strings (commas inside quotes allowed, `\"` escapes).
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let b: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == ',' || b[i].is_whitespace()) {
            i += 1;
        }
        let ks = i;
        while i < b.len() && b[i] != '=' && b[i] != ',' {
            i += 1;
        }
        let key: String = b[ks..i]
            .iter()
            .collect::<String>()
            .trim()
            .to_ascii_lowercase();
        if i >= b.len() || b[i] != '=' {
            continue;
        }
        i += 1;
        let mut val = String::new();
        if i < b.len() && b[i] == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' && i + 1 < b.len() {
                    i += 1;
                }
                val.push(b[i]);
                i += 1;
            }
            i += 1;
        } else {
            while i < b.len() && b[i] != ',' {
                val.push(b[i]);
                i += 1;
            }
            val = val.trim().to_string();
        }
        if !key.is_empty() {
            out.insert(key, val);
        }
    }
    out
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: String,
    #[serde(default)]
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    refresh_token: Option<String>,
}

/// A bearer token and (when the server gave one) an OAuth refresh token.
#[derive(Debug, Clone)]
pub(crate) struct Token {
    pub token: String,
    pub refresh_token: Option<String>,
}

type CacheKey = (String, String, String, String);

fn cache() -> &'static Mutex<HashMap<CacheKey, (String, Instant)>> {
    static CACHE: OnceLock<Mutex<HashMap<CacheKey, (String, Instant)>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Tokens shorter-lived than this are not cached.
const MIN_CACHE: Duration = Duration::from_secs(10);

/// What to ask a token server for.
pub(crate) struct TokenRequest<'a> {
    /// The registry host (cache key).
    pub registry: &'a str,
    pub realm: &'a str,
    pub service: &'a str,
    pub scopes: &'a [String],
    /// Ask for a refresh token (`docker login`); never cached.
    pub offline: bool,
    /// Take a cached token if there is one (and cache the new one).
    pub use_cache: bool,
}

/// Fetch (or take from the cache) a bearer token.
pub(crate) async fn fetch_token(
    client: &reqwest::Client,
    req: TokenRequest<'_>,
    creds: &Credentials,
) -> Result<Token> {
    let TokenRequest {
        registry,
        realm,
        service,
        scopes,
        offline,
        use_cache,
    } = req;
    if !creds.registry_token.is_empty() {
        return Ok(Token {
            token: creds.registry_token.clone(),
            refresh_token: None,
        });
    }
    let key = (
        registry.to_string(),
        service.to_string(),
        scopes.join(" "),
        creds.fingerprint(),
    );
    if use_cache && !offline {
        let mut c = cache().lock().unwrap_or_else(|p| p.into_inner());
        c.retain(|_, (_, exp)| *exp > Instant::now());
        if let Some((t, _)) = c.get(&key) {
            return Ok(Token {
                token: t.clone(),
                refresh_token: None,
            });
        }
    }
    let mut url = url::Url::parse(realm)
        .map_err(|e| Error::Registry(format!("invalid token realm {realm:?}: {e}")))?;
    let req = if !creds.identity_token.is_empty() {
        // OAuth2 refresh token grant (POST), as Docker does with an identity token.
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", &creds.identity_token),
            ("service", service),
            ("client_id", "vessel"),
        ];
        for s in scopes {
            form.push(("scope", s));
        }
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        client
            .post(url.clone())
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
    } else {
        {
            let mut q = url.query_pairs_mut();
            if !service.is_empty() {
                q.append_pair("service", service);
            }
            for s in scopes {
                q.append_pair("scope", s);
            }
            if offline {
                q.append_pair("offline_token", "true");
                q.append_pair("client_id", "vessel");
                if !creds.username.is_empty() {
                    q.append_pair("account", &creds.username);
                }
            }
        }
        let mut r = client.get(url.clone());
        if creds.has_basic() {
            r = r.header("Authorization", creds.basic_header());
        }
        r
    };
    let method = if creds.identity_token.is_empty() {
        "Get"
    } else {
        "Post"
    };
    let resp = req
        .send()
        .await
        .map_err(|e| Error::transport(format!("{method} \"{url}\""), &e))?;
    let status = resp.status();
    let body = resp
        .bytes()
        .await
        .map_err(|e| Error::transport(format!("{method} \"{url}\""), &e))?;
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        let detail = token_error_detail(&body).unwrap_or_else(|| {
            if creds.is_empty() {
                "authentication required".to_string()
            } else {
                "incorrect username or password".to_string()
            }
        });
        return Err(Error::Unauthorized(format!("unauthorized: {detail}")));
    }
    if !status.is_success() {
        return Err(Error::Registry(format!(
            "token request to {url} failed: {status}{}",
            token_error_detail(&body)
                .map(|d| format!(": {d}"))
                .unwrap_or_default()
        )));
    }
    let tr: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
        Error::Registry(format!(
            "invalid token response from {url}: {}",
            error_chain(&e)
        ))
    })?;
    let token = if tr.token.is_empty() {
        tr.access_token
    } else {
        tr.token
    };
    if token.is_empty() {
        return Err(Error::Registry(format!(
            "token response from {url} has no token"
        )));
    }
    // The spec's default lifetime is 60 s; keep a margin.
    let life = Duration::from_secs(tr.expires_in.unwrap_or(60).max(60));
    let life = life.saturating_sub(Duration::from_secs(5));
    if use_cache && life >= MIN_CACHE {
        let mut c = cache().lock().unwrap_or_else(|p| p.into_inner());
        c.insert(key, (token.clone(), Instant::now() + life));
    }
    Ok(Token {
        token,
        refresh_token: tr.refresh_token.filter(|t| !t.is_empty()),
    })
}

/// `details`, `message` or the first registry error of a token error body.
fn token_error_detail(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    for k in ["details", "detail", "message", "error_description", "error"] {
        if let Some(s) = v.get(k).and_then(Value::as_str) {
            if !s.is_empty() {
                return Some(s.to_string());
            }
        }
    }
    let e = v.get("errors")?.as_array()?.first()?;
    e.get("message").and_then(Value::as_str).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: "registry.docker.io".into(),
                scope: Some("repository:library/busybox:pull,push".into()),
                error: None,
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic {
                realm: "Registry Realm".into()
            })
        );
        assert_eq!(
            parse_challenge(r#"bearer realm=http://x/t, error="insufficient_scope""#),
            Some(Challenge::Bearer {
                realm: "http://x/t".into(),
                service: String::new(),
                scope: None,
                error: Some("insufficient_scope".into()),
            })
        );
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[test]
    fn x_registry_auth() {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
        // "?" and ">" make base64url differ from standard base64.
        let json = r#"{"username":"u>?","password":"p~~~?","serveraddress":"localhost:5000"}"#;
        for enc in [
            URL_SAFE.encode(json),
            URL_SAFE_NO_PAD.encode(json),
            STANDARD.encode(json),
            json.to_string(),
        ] {
            let c = Credentials::from_x_registry_auth(&enc).expect("decodes");
            assert_eq!(c.username, "u>?");
            assert_eq!(c.password, "p~~~?");
            assert_eq!(c.server_address, "localhost:5000");
        }
        let auth = STANDARD.encode("bob:s3cr:et");
        let c = Credentials::from_x_registry_auth(
            &URL_SAFE.encode(format!(r#"{{"Auth":"{auth}","IdentityToken":"tok"}}"#)),
        )
        .expect("decodes");
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("bob", "s3cr:et")
        );
        assert_eq!(c.identity_token, "tok");
        assert!(Credentials::from_x_registry_auth("")
            .expect("empty")
            .is_empty());
        assert!(Credentials::from_x_registry_auth("e30")
            .expect("{}")
            .is_empty());
        assert!(Credentials::from_x_registry_auth("!!!").is_err());
        let c = Credentials {
            username: "a".into(),
            password: "b".into(),
            ..Default::default()
        };
        assert_eq!(
            Credentials::from_x_registry_auth(&c.to_x_registry_auth()).expect("round trip"),
            c
        );
        assert!(!format!("{c:?}").contains("\"b\""));
    }
}
