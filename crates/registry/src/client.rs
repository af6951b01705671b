//! The HTTP side of the Registry v2 / OCI distribution protocol.
//!
//! Why not `oci-client`: it covers manifests, blobs and bearer/basic auth, but
//! not everything Vessel needs in one place: per-registry TLS (certs.d CAs
//! and client certificates) together with dockerd's insecure-registry rules
//! (HTTPS without verification, then plain HTTP), Docker Hub mirrors tried
//! in order, byte-level progress with resumable (`Range`) downloads written
//! straight into the image store's staging directory, cross-repository mounts
//! driven by our own blob records, and error texts matching Docker's. The
//! protocol part is small (a ping, a token request, a handful of GET/HEAD/
//! POST/PATCH/PUT calls), so it is written directly on `reqwest` (rustls with
//! the `ring` provider and the system's root store, like dockerd's system pool).
//!
//! A [`Session`] is one repository on one endpoint with its auth state: it
//! pings `/v2/`, learns the challenge, fetches bearer tokens for the scopes it
//! needs (cached process-wide per registry, scope and credentials), and
//! retries once with a fresh token when a request gets a 401.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};
use serde::Deserialize;
use url::Url;

use crate::auth::{fetch_token, parse_challenge, Challenge, Credentials, TokenRequest};
use crate::config::{Endpoint, RegistryConfig};
use crate::error::{Error, Result};

pub(crate) const USER_AGENT: &str =
    concat!("vessel/", env!("CARGO_PKG_VERSION"), " (docker-compatible)");

/// Builds and caches one HTTP client per (registry host, TLS verification).
pub(crate) struct Http {
    pub config: RegistryConfig,
    clients: Mutex<HashMap<(String, bool), reqwest::Client>>,
}

fn read_file(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).map_err(|e| Error::transport(format!("reading {}", p.display()), &e))
}

impl Http {
    pub fn new(config: RegistryConfig) -> Http {
        Http {
            config,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The client for an endpoint: extra CAs and client certificate from
    /// `<certs_dir>/<host:port>/`, verification off for insecure HTTPS.
    pub fn client(&self, ep: &Endpoint) -> Result<reqwest::Client> {
        let key = (ep.host.clone(), ep.skip_verify);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let mut b = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(60))
            .tcp_keepalive(Duration::from_secs(30))
            .use_rustls_tls();
        if ep.skip_verify {
            b = b.danger_accept_invalid_certs(true);
        } else if let Some(dir) = &self.config.certs_dir {
            let d = dir.join(&ep.host);
            if d.is_dir() {
                let entries = std::fs::read_dir(&d)
                    .map_err(|e| Error::transport(format!("reading {}", d.display()), &e))?;
                let mut names: Vec<std::path::PathBuf> =
                    entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
                names.sort();
                for p in &names {
                    if p.extension().is_some_and(|x| x == "crt") {
                        let pem = read_file(p)?;
                        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                            Error::transport(
                                format!("loading CA certificates from {}", p.display()),
                                &e,
                            )
                        })?;
                        for c in certs {
                            b = b.add_root_certificate(c);
                        }
                    }
                }
                let (cert, key) = (d.join("client.cert"), d.join("client.key"));
                if cert.is_file() && key.is_file() {
                    let mut pem = read_file(&cert)?;
                    pem.push(b'\n');
                    pem.extend(read_file(&key)?);
                    let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
                        Error::transport(
                            format!("loading client certificate {}", cert.display()),
                            &e,
                        )
                    })?;
                    b = b.identity(id);
                }
            }
        }
        let c = b
            .build()
            .map_err(|e| Error::transport(format!("creating HTTP client for {}", ep.host), &e))?;
        clients.insert(key, c.clone());
        Ok(c)
    }
}

/// Go-style method name for messages (`Get "url": ...`).
fn method_name(m: &Method) -> String {
    let s = m.as_str().to_ascii_lowercase();
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
        None => s,
    }
}

pub(crate) fn ctx(m: &Method, url: &Url) -> String {
    format!("{} \"{url}\"", method_name(m))
}

/// A registry error response (`{"errors":[{"code":..,"message":..}]}`).
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
}

impl ApiError {
    /// Docker's text: `manifest unknown: manifest unknown`, or
    /// `received unexpected HTTP status: 500 Internal Server Error`.
    pub fn text(&self) -> String {
        if self.code.is_empty() {
            format!("received unexpected HTTP status: {}", self.status)
        } else {
            format!(
                "{}: {}",
                self.code.to_ascii_lowercase().replace('_', " "),
                self.message
            )
        }
    }
}

#[derive(Deserialize)]
struct ErrBody {
    #[serde(default)]
    errors: Vec<ErrEntry>,
}
#[derive(Deserialize)]
struct ErrEntry {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// Read an error response.
pub(crate) async fn api_error(resp: Response) -> ApiError {
    let status = resp.status();
    let body = resp.bytes().await.unwrap_or_default();
    let first = serde_json::from_slice::<ErrBody>(&body)
        .ok()
        .and_then(|b| b.errors.into_iter().next());
    match first {
        Some(e) => ApiError {
            status,
            code: e.code,
            message: e.message,
        },
        None => ApiError {
            status,
            code: String::new(),
            message: String::new(),
        },
    }
}

/// Read a whole response body, refusing more than `limit` bytes.
pub(crate) async fn read_limited(mut resp: Response, limit: usize, what: &str) -> Result<Vec<u8>> {
    let url = resp.url().clone();
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| Error::transport(format!("reading {what} from {url}"), &e))?
    {
        if out.len() + chunk.len() > limit {
            return Err(Error::InvalidManifest(format!(
                "{what} from {url} is larger than {limit} bytes"
            )));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[derive(Debug, Clone)]
enum AuthState {
    /// The registry wants no auth.
    Anonymous,
    Basic,
    Bearer {
        realm: String,
        service: String,
        token: Option<String>,
    },
}

/// One repository on one endpoint.
pub(crate) struct Session {
    client: reqwest::Client,
    pub ep: Endpoint,
    /// Path in the registry (`library/busybox`).
    pub repo: String,
    /// `pull` or `pull,push`.
    actions: &'static str,
    extra_scopes: Mutex<Vec<String>>,
    creds: Credentials,
    auth: Mutex<AuthState>,
}

/// Result of a `POST .../blobs/uploads/`.
pub(crate) enum UploadStart {
    Mounted,
    Location(Url),
}

impl Session {
    /// Ping `/v2/` on `ep` and authenticate for `repo` with `actions`.
    /// A transport error here means the endpoint is unreachable (the caller
    /// may try the next one).
    pub async fn connect(
        http: &Http,
        ep: &Endpoint,
        repo: &str,
        actions: &'static str,
        creds: &Credentials,
    ) -> Result<Session> {
        let client = http.client(ep)?;
        let url = ep.url("")?;
        let resp = client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| Error::transport(ctx(&Method::GET, &url), &e))?;
        let auth = match resp.status() {
            s if s.is_success() => AuthState::Anonymous,
            StatusCode::UNAUTHORIZED => {
                match resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|h| h.to_str().ok())
                    .and_then(parse_challenge)
                {
                    Some(Challenge::Basic { .. }) => AuthState::Basic,
                    Some(Challenge::Bearer { realm, service, .. }) => AuthState::Bearer {
                        realm,
                        service,
                        token: None,
                    },
                    None => {
                        return Err(Error::Registry(format!(
                            "{}: 401 Unauthorized without a usable WWW-Authenticate challenge",
                            ctx(&Method::GET, &url)
                        )))
                    }
                }
            }
            s => {
                return Err(Error::Registry(format!(
                    "{}: not a registry v2 endpoint: received unexpected HTTP status: {s}",
                    ctx(&Method::GET, &url)
                )))
            }
        };
        let s = Session {
            client,
            ep: ep.clone(),
            repo: repo.to_string(),
            actions,
            extra_scopes: Mutex::new(Vec::new()),
            creds: creds.clone(),
            auth: Mutex::new(auth),
        };
        s.ensure_token(false).await?;
        Ok(s)
    }

    fn scopes(&self) -> Vec<String> {
        let mut v = vec![format!("repository:{}:{}", self.repo, self.actions)];
        v.extend(
            self.extra_scopes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned(),
        );
        v
    }

    /// Also ask for `scope` (e.g. pull on a mount source); drops the current token.
    pub fn add_scope(&self, scope: String) {
        let mut ex = self.extra_scopes.lock().unwrap_or_else(|p| p.into_inner());
        if ex.contains(&scope) {
            return;
        }
        ex.push(scope);
        if let AuthState::Bearer { token, .. } =
            &mut *self.auth.lock().unwrap_or_else(|p| p.into_inner())
        {
            *token = None;
        }
    }

    /// Make sure a bearer token is at hand (a fresh one with `refresh`).
    async fn ensure_token(&self, refresh: bool) -> Result<()> {
        let (realm, service) = match &*self.auth.lock().unwrap_or_else(|p| p.into_inner()) {
            AuthState::Bearer { token: Some(_), .. } if !refresh => return Ok(()),
            AuthState::Bearer { realm, service, .. } => (realm.clone(), service.clone()),
            _ => return Ok(()),
        };
        let scopes = self.scopes();
        let req = TokenRequest {
            registry: &self.ep.host,
            realm: &realm,
            service: &service,
            scopes: &scopes,
            offline: false,
            use_cache: !refresh,
        };
        let t = fetch_token(&self.client, req, &self.creds).await?;
        if let AuthState::Bearer { token, .. } =
            &mut *self.auth.lock().unwrap_or_else(|p| p.into_inner())
        {
            *token = Some(t.token);
        }
        Ok(())
    }

    fn auth_header(&self) -> Option<String> {
        match &*self.auth.lock().unwrap_or_else(|p| p.into_inner()) {
            AuthState::Anonymous => None,
            AuthState::Basic => self.creds.has_basic().then(|| self.creds.basic_header()),
            AuthState::Bearer { token, .. } => token.as_ref().map(|t| format!("Bearer {t}")),
        }
    }

    /// Whether the session carries credentials (a 401 then means "bad credentials").
    pub fn has_credentials(&self) -> bool {
        !self.creds.is_empty()
    }

    /// Send a request with auth; on a 401 with a bearer challenge, fetch a new
    /// token (honouring a changed scope) and retry once.
    pub async fn send(
        &self,
        method: Method,
        url: &Url,
        headers: HeaderMap,
        body: Option<Bytes>,
    ) -> Result<Response> {
        // A scope added since the last token (a mount source) needs a new one.
        self.ensure_token(false).await?;
        for attempt in 0..2 {
            let mut rb = self.client.request(method.clone(), url.clone());
            rb = rb.headers(headers.clone());
            if let Some(a) = self.auth_header() {
                if let Ok(v) = HeaderValue::from_str(&a) {
                    rb = rb.header(AUTHORIZATION, v);
                }
            }
            if let Some(b) = &body {
                rb = rb.body(b.clone());
            }
            let resp = rb
                .send()
                .await
                .map_err(|e| Error::transport(ctx(&method, url), &e))?;
            if resp.status() == StatusCode::UNAUTHORIZED && attempt == 0 {
                let ch = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|h| h.to_str().ok())
                    .and_then(parse_challenge);
                if let Some(Challenge::Bearer {
                    realm,
                    service,
                    scope,
                    ..
                }) = ch
                {
                    if let Some(sc) = scope {
                        for s in sc.split(' ') {
                            if !self.scopes().iter().any(|x| x == s) {
                                self.add_scope(s.to_string());
                            }
                        }
                    }
                    *self.auth.lock().unwrap_or_else(|p| p.into_inner()) = AuthState::Bearer {
                        realm,
                        service,
                        token: None,
                    };
                    self.ensure_token(true).await?;
                    continue;
                }
            }
            return Ok(resp);
        }
        Err(Error::Registry(format!(
            "{}: authentication loop",
            ctx(&method, url)
        )))
    }

    pub fn url(&self, rest: &str) -> Result<Url> {
        self.ep.url(&format!("{}/{rest}", self.repo))
    }

    /// Resolve a `Location` header against the endpoint.
    fn location(&self, resp: &Response) -> Result<Url> {
        let loc = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|h| h.to_str().ok())
            .ok_or_else(|| {
                Error::Registry(format!("{}: upload response without Location", resp.url()))
            })?;
        resp.url()
            .join(loc)
            .map_err(|e| Error::Registry(format!("bad upload Location {loc:?}: {e}")))
    }

    /// `HEAD /v2/<repo>/blobs/<digest>`: Some(size) if the repository has it.
    pub async fn blob_exists(&self, digest: &str) -> Result<Option<u64>> {
        let url = self.url(&format!("blobs/{digest}"))?;
        let resp = self
            .send(Method::HEAD, &url, HeaderMap::new(), None)
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(Some(resp.content_length().unwrap_or(0))),
            StatusCode::NOT_FOUND => Ok(None),
            _ => {
                let e = api_error(resp).await;
                Err(self.push_error(&e, &ctx(&Method::HEAD, &url)))
            }
        }
    }

    /// Errors of push requests: 401/403 → Unauthorized, else Registry.
    pub fn push_error(&self, e: &ApiError, context: &str) -> Error {
        match e.status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Error::Unauthorized(if e.code.is_empty() {
                    "unauthorized: authentication required".to_string()
                } else {
                    e.text()
                })
            }
            _ => Error::Registry(format!("{context}: {}", e.text())),
        }
    }

    /// `POST /v2/<repo>/blobs/uploads/`, optionally mounting `digest` from `from`.
    pub async fn start_upload(&self, mount: Option<(&str, &str)>) -> Result<UploadStart> {
        let mut url = self.url("blobs/uploads/")?;
        if let Some((digest, from)) = mount {
            url.query_pairs_mut()
                .append_pair("mount", digest)
                .append_pair("from", from);
        }
        let resp = self
            .send(Method::POST, &url, HeaderMap::new(), Some(Bytes::new()))
            .await?;
        match resp.status() {
            StatusCode::CREATED if mount.is_some() => Ok(UploadStart::Mounted),
            StatusCode::ACCEPTED | StatusCode::CREATED => {
                Ok(UploadStart::Location(self.location(&resp)?))
            }
            _ => {
                let e = api_error(resp).await;
                Err(self.push_error(&e, &ctx(&Method::POST, &url)))
            }
        }
    }

    /// `PATCH <location>` with one chunk at `offset`; returns the next location.
    pub async fn upload_chunk(&self, location: &Url, offset: u64, chunk: Bytes) -> Result<Url> {
        let mut h = HeaderMap::new();
        h.insert(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        let end = offset + chunk.len() as u64;
        if let Ok(v) = HeaderValue::from_str(&format!("{offset}-{}", end.saturating_sub(1))) {
            h.insert(reqwest::header::CONTENT_RANGE, v);
        }
        let resp = self.send(Method::PATCH, location, h, Some(chunk)).await?;
        if resp.status() == StatusCode::ACCEPTED || resp.status().is_success() {
            return self.location(&resp).or_else(|_| Ok(location.clone()));
        }
        let e = api_error(resp).await;
        Err(self.push_error(&e, &ctx(&Method::PATCH, location)))
    }

    /// `PUT <location>?digest=` (with the last bytes, if any): completes an upload.
    pub async fn finish_upload(&self, location: &Url, digest: &str, body: Bytes) -> Result<()> {
        let mut url = location.clone();
        url.query_pairs_mut().append_pair("digest", digest);
        let mut h = HeaderMap::new();
        h.insert(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        let resp = self.send(Method::PUT, &url, h, Some(body)).await?;
        if resp.status().is_success() {
            return Ok(());
        }
        let e = api_error(resp).await;
        Err(self.push_error(&e, &ctx(&Method::PUT, &url)))
    }

    /// `PUT /v2/<repo>/manifests/<tag>`.
    pub async fn put_manifest(&self, tag: &str, media_type: &str, body: Bytes) -> Result<()> {
        let url = self.url(&format!("manifests/{tag}"))?;
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(media_type) {
            h.insert(reqwest::header::CONTENT_TYPE, v);
        }
        let resp = self.send(Method::PUT, &url, h, Some(body)).await?;
        if resp.status().is_success() {
            return Ok(());
        }
        let e = api_error(resp).await;
        Err(self.push_error(&e, &ctx(&Method::PUT, &url)))
    }
}
