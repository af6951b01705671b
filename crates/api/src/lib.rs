//! The Docker Engine API layer of Vessel.
//!
//! Owns HTTP: routes, API version negotiation, request parsing, the mapping
//! of engine errors to Docker's status codes and `{"message": …}` bodies, and
//! Docker's stream formats (hijacked attach with multiplexed or raw streams,
//! chunked JSON progress, log streams). Models are `bollard-stubs` types.
//!
//! It must not hold state of its own or make decisions about containers:
//! every request is translated into one engine call.

mod images;
mod networks;
pub mod stream;
pub mod version;
mod volumes;

use std::collections::HashMap;
use std::io::Read;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use axum::Router;
use bollard_stubs::models::{
    ContainerCreateBody, ContainerCreateResponse, ContainerWaitResponse, EventMessage, ExecConfig,
    ExecStartConfig, ImageDeleteResponseItem, ImageInspect, ImageInspectRootFs, Runtime,
    SystemInfo, SystemVersion, SystemVersionComponents, SystemVersionPlatform,
};
use bytes::Bytes;
use futures::StreamExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};
use vessel_engine::{Engine, EngineError, EventType, LogsOptions, Output, WaitCondition};

use crate::stream::{frame, StreamId, MULTIPLEXED, RAW};
use crate::version::{split, Versioned};

/// Version of this Vessel build.
pub const VESSEL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// An error as Docker sends it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let status = match &e {
            EngineError::NotFound(_) => StatusCode::NOT_FOUND,
            EngineError::Conflict(_) => StatusCode::CONFLICT,
            EngineError::InvalidParameter(_) => StatusCode::BAD_REQUEST,
            EngineError::NotModified => StatusCode::NOT_MODIFIED,
            EngineError::Forbidden(_) => StatusCode::FORBIDDEN,
            EngineError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            EngineError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }
}

impl From<vessel_image::Error> for ApiError {
    fn from(e: vessel_image::Error) -> Self {
        EngineError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status == StatusCode::NOT_MODIFIED {
            return StatusCode::NOT_MODIFIED.into_response();
        }
        if self.status.is_server_error() {
            warn!(status = %self.status, "{}", self.message);
        } else {
            debug!(status = %self.status, "{}", self.message);
        }
        (
            self.status,
            axum::Json(serde_json::json!({ "message": self.message })),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Query parameters, repeated keys kept.
#[derive(Debug, Default)]
struct Query(Vec<(String, String)>);

impl Query {
    fn of(uri: &axum::http::Uri) -> Self {
        Query(
            uri.query()
                .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
                .unwrap_or_default(),
        )
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }
    fn all(&self, k: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .collect()
    }
    /// Docker's boolean form values: 1/true/True are true; empty, 0, false are false.
    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some(v) if !matches!(v, "" | "0" | "false" | "False" | "FALSE"))
    }
}

/// The API version a request asked for (set by version negotiation).
#[derive(Debug, Clone, Copy)]
struct ApiVersion((u32, u32));

#[derive(Clone)]
struct AppState {
    engine: Engine,
}

/// Builds the service: version negotiation in front of the routes.
pub fn service(engine: Engine) -> Router {
    let routes = Router::new()
        .merge(networks::routes())
        .route("/_ping", get(ping).head(ping))
        .route("/commit", post(commit))
        .route("/version", get(version))
        .route("/info", get(info))
        .route("/auth", post(auth))
        .route("/system/df", get(system_df))
        .route("/images/get", get(images_save))
        .route("/images/prune", post(images_prune))
        .route("/events", get(events))
        .route("/images/json", get(images_list))
        .route("/images/load", post(images_load))
        .route("/images/create", post(images_create))
        .route("/images/{*rest}", any(images_dispatch))
        .route("/containers/json", get(containers_list))
        .route("/containers/create", post(container_create))
        .route("/containers/prune", post(containers_prune))
        .route("/containers/{id}/rename", post(container_rename))
        .route(
            "/containers/{id}/archive",
            get(archive_get).head(archive_head).put(archive_put),
        )
        .route("/containers/{id}/top", get(container_top))
        .route("/containers/{id}/export", get(container_export))
        .route("/containers/{id}/changes", get(container_changes))
        .route("/containers/{id}/pause", post(container_pause))
        .route("/containers/{id}/update", post(container_update))
        .route("/containers/{id}/unpause", post(container_unpause))
        .route("/containers/{id}/json", get(container_inspect))
        .route("/containers/{id}/start", post(container_start))
        .route("/containers/{id}/stop", post(container_stop))
        .route("/containers/{id}/restart", post(container_restart))
        .route("/containers/{id}/kill", post(container_kill))
        .route("/containers/{id}/wait", post(container_wait))
        .route("/containers/{id}/resize", post(container_resize))
        .route("/containers/{id}/attach", post(container_attach))
        .route("/containers/{id}/logs", get(container_logs))
        .route("/containers/{id}/stats", get(container_stats))
        .route("/containers/{id}", delete(container_remove))
        .route("/containers/{id}/exec", post(exec_create))
        .route("/exec/{id}/start", post(exec_start))
        .route("/exec/{id}/resize", post(exec_resize))
        .route("/exec/{id}/json", get(exec_inspect))
        .merge(volumes::routes())
        .fallback(not_found)
        .with_state(AppState { engine });
    Router::new()
        .fallback_service(routes)
        .layer(axum::middleware::from_fn(negotiate))
}

async fn negotiate(mut req: Request, next: axum::middleware::Next) -> Response {
    let path = req.uri().path().to_string();
    match split(&path) {
        Versioned::Reject(msg) => ApiError::bad(msg).into_response(),
        Versioned::Ok {
            path: new_path,
            version,
        } => {
            req.extensions_mut().insert(ApiVersion(version));
            if new_path != path {
                let pq = match req.uri().query() {
                    Some(q) => format!("{new_path}?{q}"),
                    None => new_path,
                };
                let mut parts = req.uri().clone().into_parts();
                parts.path_and_query = pq.parse().ok();
                if let Ok(uri) = axum::http::Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                }
            }
            debug!(method = %req.method(), path = %req.uri(), "request");
            let mut resp = next.run(req).await;
            let h = resp.headers_mut();
            h.insert("Api-Version", HeaderValue::from_static("1.50"));
            h.insert("Ostype", HeaderValue::from_static("linux"));
            h.insert("Docker-Experimental", HeaderValue::from_static("false"));
            if let Ok(v) = HeaderValue::from_str(&format!("Vessel/{VESSEL_VERSION} (linux)")) {
                h.insert(header::SERVER, v);
            }
            resp
        }
    }
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("page not found: {} {}", req.method(), req.uri().path()),
    )
}

async fn ping(method: Method) -> Response {
    let mut h = HeaderMap::new();
    h.insert("Builder-Version", HeaderValue::from_static("1"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store, must-revalidate"),
    );
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if method == Method::HEAD {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        return (StatusCode::OK, h).into_response();
    }
    (StatusCode::OK, h, "OK").into_response()
}

fn host_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

async fn version(State(s): State<AppState>) -> axum::Json<SystemVersion> {
    let f = s.engine.facts();
    let mut details = HashMap::new();
    details.insert("ApiVersion".to_string(), "1.50".to_string());
    details.insert("MinAPIVersion".to_string(), "1.24".to_string());
    details.insert("Os".to_string(), "linux".to_string());
    details.insert("Arch".to_string(), "amd64".to_string());
    details.insert("Hypervisor".to_string(), f.hypervisor.clone());
    details.insert("GuestKernel".to_string(), f.guest_kernel.clone());
    details.insert(
        "GitCommit".to_string(),
        option_env!("VESSEL_GIT_COMMIT")
            .unwrap_or("unknown")
            .to_string(),
    );
    details.insert("GoVersion".to_string(), "none (Rust)".to_string());
    details.insert("KernelVersion".to_string(), host_kernel());
    details.insert("Experimental".to_string(), "false".to_string());
    axum::Json(SystemVersion {
        platform: Some(SystemVersionPlatform {
            name: format!("Vessel {VESSEL_VERSION}"),
        }),
        components: Some(vec![SystemVersionComponents {
            name: "Engine".into(),
            version: VESSEL_VERSION.into(),
            details: Some(details),
        }]),
        version: Some(VESSEL_VERSION.into()),
        api_version: Some("1.50".into()),
        min_api_version: Some("1.24".into()),
        git_commit: Some(option_env!("VESSEL_GIT_COMMIT").unwrap_or("unknown").into()),
        go_version: Some(format!("rust (vessel {VESSEL_VERSION})")),
        os: Some("linux".into()),
        arch: Some("amd64".into()),
        kernel_version: Some(host_kernel()),
        experimental: Some(false),
        build_time: None,
    })
}

async fn info(State(s): State<AppState>) -> axum::Json<SystemInfo> {
    let f = s.engine.facts();
    let runtime = format!("vessel-qemu-{}", f.accel.as_str());
    let mut runtimes = HashMap::new();
    runtimes.insert(
        runtime.clone(),
        Runtime {
            path: Some(f.hypervisor.clone()),
            ..Default::default()
        },
    );
    let (mem_total, ncpu) = host_resources();
    let registry = s.engine.registry();
    let rc = registry.config();
    // As dockerd shows it: CIDRs apart, host entries (and docker.io with
    // its mirrors) as index configs. Loopback is always insecure.
    let (cidrs, hosts): (Vec<String>, Vec<String>) = rc
        .insecure_registries
        .iter()
        .cloned()
        .partition(|r| r.contains('/'));
    let mut cidrs = cidrs;
    if rc.insecure_loopback {
        cidrs.insert(0, "::1/128".into());
        cidrs.insert(0, "127.0.0.0/8".into());
    }
    let mut index_configs = HashMap::new();
    index_configs.insert(
        "docker.io".to_string(),
        bollard_stubs::models::IndexInfo {
            name: Some("docker.io".into()),
            mirrors: Some(rc.mirrors.clone()),
            secure: Some(true),
            official: Some(true),
        },
    );
    for h in hosts {
        index_configs.insert(
            h.clone(),
            bollard_stubs::models::IndexInfo {
                name: Some(h),
                mirrors: Some(vec![]),
                secure: Some(false),
                official: Some(false),
            },
        );
    }
    let registry_config = bollard_stubs::models::RegistryServiceConfig {
        insecure_registry_cidrs: Some(cidrs),
        index_configs: Some(index_configs),
        mirrors: Some(rc.mirrors.clone()),
    };
    axum::Json(SystemInfo {
        registry_config: Some(registry_config),
        id: Some("vessel".into()),
        containers: Some(f.containers as i64),
        containers_running: Some(f.running as i64),
        containers_paused: Some(0),
        containers_stopped: Some(f.stopped as i64),
        images: Some(f.images as i64),
        driver: Some("vessel-overlay".into()),
        driver_status: Some(vec![
            vec![
                "Backing Filesystem".into(),
                "ext4 disk per image + qcow2 writable layer per container".into(),
            ],
            vec!["Hypervisor".into(), f.hypervisor.clone()],
            vec!["Acceleration".into(), f.accel.as_str().into()],
            vec!["Acceleration Reason".into(), f.accel_reason.clone()],
            vec!["Guest Kernel".into(), f.guest_kernel.clone()],
            vec![
                "Default VM Memory".into(),
                format!("{} MiB", f.default_memory_mib),
            ],
        ]),
        docker_root_dir: Some(f.data_root.display().to_string()),
        memory_limit: Some(true),
        swap_limit: Some(false),
        cpu_cfs_period: Some(false),
        cpu_cfs_quota: Some(false),
        cpu_shares: Some(false),
        cpu_set: Some(true),
        pids_limit: Some(true),
        oom_kill_disable: Some(false),
        ipv4_forwarding: Some(false),
        debug: Some(false),
        logging_driver: Some("json-file".into()),
        kernel_version: Some(host_kernel()),
        operating_system: Some(format!("Vessel {VESSEL_VERSION} ({})", f.hypervisor)),
        os_version: Some(VESSEL_VERSION.into()),
        os_type: Some("linux".into()),
        architecture: Some("x86_64".into()),
        ncpu: Some(ncpu),
        mem_total: Some(mem_total),
        index_server_address: Some("https://index.docker.io/v1/".into()),
        name: Some(
            std::fs::read_to_string("/etc/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
        ),
        labels: Some(vec![format!("vessel.accel={}", f.accel.as_str())]),
        experimental_build: Some(false),
        server_version: Some(VESSEL_VERSION.into()),
        runtimes: Some(runtimes),
        default_runtime: Some(runtime),
        live_restore_enabled: Some(true),
        security_options: Some(vec!["name=vm-isolation".into()]),
        ..Default::default()
    })
}

fn host_resources() -> (i64, i64) {
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<i64>().ok())
                })
        })
        .unwrap_or(0)
        * 1024;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as i64)
        .unwrap_or(1);
    (mem, cpus)
}

// ---------------------------------------------------------------- events

fn image_event(engine: &Engine, action: &str, name: &str) {
    let mut attrs = HashMap::new();
    attrs.insert("name".to_string(), name.to_string());
    engine.events().emit(EventType::IMAGE, action, name, attrs);
}

/// Docker's `since`/`until`: unix seconds, possibly fractional.
fn event_time(q: &Query, key: &str) -> ApiResult<Option<f64>> {
    match q.get(key).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse::<f64>()
            .map(Some)
            .map_err(|_| ApiError::bad(format!("invalid value for {key}: {v}"))),
    }
}

fn event_matches(e: &EventMessage, filters: &HashMap<String, Vec<String>>) -> bool {
    let actor = e.actor.clone().unwrap_or_default();
    let id = actor.id.unwrap_or_default();
    let attrs = actor.attributes.unwrap_or_default();
    let typ = e.typ.map(|t| t.to_string()).unwrap_or_default();
    let action = e.action.clone().unwrap_or_default();
    filters.iter().all(|(k, vals)| {
        vals.iter().any(|v| match k.as_str() {
            "type" => typ == *v,
            "event" => action == *v || action.split(':').next() == Some(v.as_str()),
            "container" => {
                typ == "container" && (id.starts_with(v.as_str()) || attrs.get("name") == Some(v))
            }
            "image" => {
                // As dockerd: the image (or the image event's name), also
                // without its tag (`busybox` matches `busybox:latest`).
                let mut names: Vec<&str> =
                    attrs.get("image").map(String::as_str).into_iter().collect();
                if typ == "image" {
                    names.push(id.as_str());
                    names.extend(attrs.get("name").map(String::as_str));
                }
                names.iter().any(|n| *n == v || strip_tag(n) == v)
            }
            "network" => {
                typ == "network" && (id.starts_with(v.as_str()) || attrs.get("name") == Some(v))
            }
            "scope" => v == "local",
            "label" => vessel_engine::label_matches(v, |k| attrs.get(k)),
            "volume" => typ == "volume" && id == *v,
            _ => false,
        })
    })
}

/// An image reference without its tag (`repo:tag` → `repo`; a digest or a
/// registry's port stays).
fn strip_tag(reference: &str) -> &str {
    if reference.contains('@') {
        return reference;
    }
    let last = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[last..].rfind(':') {
        Some(i) => &reference[..last + i],
        None => reference,
    }
}

fn event_seconds(e: &EventMessage) -> f64 {
    e.time_nano.unwrap_or(0) as f64 / 1e9
}

fn event_line(e: &EventMessage) -> Bytes {
    let mut v = serde_json::to_vec(e).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// `GET /events`: kept events from `since`, then live ones until `until`.
async fn events(State(s): State<AppState>, req: Request) -> ApiResult<Response> {
    let q = Query::of(req.uri());
    let filters = parse_filters(&q)?;
    for k in filters.keys() {
        if ![
            "type",
            "event",
            "container",
            "image",
            "label",
            "volume",
            "network",
            "scope",
        ]
        .contains(&k.as_str())
        {
            return Err(ApiError::bad(format!("invalid filter '{k}'")));
        }
    }
    let since = event_time(&q, "since")?;
    let until = event_time(&q, "until")?;
    let (history, mut rx) = s.engine.events().subscribe();
    let (tx, out) = tokio::sync::mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0) as f64 / 1e9;
        if let Some(since) = since {
            let old = history.iter().filter(|e| {
                event_seconds(e) >= since
                    && until.is_none_or(|u| event_seconds(e) <= u)
                    && event_matches(e, &filters)
            });
            for e in old {
                if tx.send(event_line(e)).await.is_err() {
                    return;
                }
            }
        }
        if until.is_some_and(|u| u <= now) {
            return;
        }
        let deadline = until.map(|u| {
            tokio::time::Instant::now() + std::time::Duration::from_secs_f64((u - now).max(0.0))
        });
        loop {
            let next = async {
                match deadline {
                    Some(d) => tokio::time::timeout_at(d, rx.recv()).await.ok(),
                    None => Some(rx.recv().await),
                }
            };
            tokio::select! {
                r = next => match r {
                    None => return,
                    Some(Ok(e)) => {
                        if event_matches(&e, &filters) && tx.send(event_line(&e)).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => continue,
                    Some(Err(_)) => return,
                },
                _ = tx.closed() => return,
            }
        }
    });
    let body = tokio_stream_from(out).map(Ok::<_, std::io::Error>);
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(body),
    )
        .into_response())
}

// ---------------------------------------------------------------- images

async fn images_list(State(s): State<AppState>, req: Request) -> ApiResult<Response> {
    images::list(&s, &Query::of(req.uri())).await
}

async fn auth(State(s): State<AppState>, body: Bytes) -> ApiResult<Response> {
    images::auth(&s, &body).await
}

async fn system_df(State(s): State<AppState>) -> ApiResult<Response> {
    images::system_df(&s).await
}

async fn images_save(State(s): State<AppState>, req: Request) -> ApiResult<Response> {
    images::save(&s, Query::of(req.uri()).all("names")).await
}

async fn images_prune(State(s): State<AppState>, req: Request) -> ApiResult<Response> {
    images::prune(&s, &Query::of(req.uri())).await
}

async fn images_dispatch(
    State(s): State<AppState>,
    Path(rest): Path<String>,
    req: Request,
) -> Response {
    let method = req.method().clone();
    let q = Query::of(req.uri());
    let r = if method == Method::GET {
        if let Some(name) = rest.strip_suffix("/json") {
            image_inspect(&s, name).await
        } else if let Some(name) = rest.strip_suffix("/history") {
            images::history(&s, name).await
        } else if let Some(name) = rest.strip_suffix("/get") {
            images::save(&s, vec![name.to_string()]).await
        } else {
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("page not found: {}", req.uri().path()),
            ))
        }
    } else if method == Method::DELETE {
        image_remove(&s, &rest, &q).await
    } else if method == Method::POST {
        if let Some(name) = rest.strip_suffix("/tag") {
            image_tag(&s, name, &q).await
        } else if let Some(name) = rest.strip_suffix("/push") {
            images::push(&s, name, &q, req.headers()).await
        } else {
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("page not found: {}", req.uri().path()),
            ))
        }
    } else {
        Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
        ))
    };
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn image_inspect(s: &AppState, name: &str) -> ApiResult<Response> {
    let images = s.engine.images();
    let n = name.to_string();
    let i = tokio::task::spawn_blocking(move || images.resolve(&n))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let config = i
        .raw_config
        .get("config")
        .cloned()
        .and_then(|c| serde_json::from_value(c).ok());
    let doc = ImageInspect {
        id: Some(i.id.clone()),
        repo_tags: Some(i.repo_tags.clone()),
        repo_digests: Some(i.repo_digests.clone()),
        comment: Some(i.config.comment.clone()),
        created: Some(i.created.clone()),
        author: Some(i.config.author.clone()),
        config,
        architecture: Some(i.config.architecture.clone()),
        variant: i.config.variant.clone(),
        os: Some(i.config.os.clone()),
        size: Some(i.size as i64),
        root_fs: Some(ImageInspectRootFs {
            typ: "layers".into(),
            layers: Some(i.layers.clone()),
        }),
        ..Default::default()
    };
    Ok(axum::Json(doc).into_response())
}

async fn image_tag(s: &AppState, name: &str, q: &Query) -> ApiResult<Response> {
    let repo = q.get("repo").unwrap_or("").to_string();
    let tag = q.get("tag").unwrap_or("").to_string();
    let target = if tag.is_empty() {
        repo
    } else {
        format!("{repo}:{tag}")
    };
    let images = s.engine.images();
    let n = name.to_string();
    let t = target.clone();
    tokio::task::spawn_blocking(move || images.tag(&n, &t))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    image_event(&s.engine, "tag", &target);
    Ok(StatusCode::CREATED.into_response())
}

async fn image_remove(s: &AppState, name: &str, q: &Query) -> ApiResult<Response> {
    let force = q.flag("force");
    let images = s.engine.images();
    let engine = s.engine.clone();
    let n = name.to_string();
    let items =
        tokio::task::spawn_blocking(move || images.remove(&n, force, &|id| engine.image_users(id)))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    s.engine.image_removed();
    let out: Vec<ImageDeleteResponseItem> = items
        .into_iter()
        .map(|i| match i {
            vessel_image::DeleteItem::Untagged(t) => {
                image_event(&s.engine, "untag", &t);
                ImageDeleteResponseItem {
                    untagged: Some(t),
                    deleted: None,
                }
            }
            vessel_image::DeleteItem::Deleted(d) => ImageDeleteResponseItem {
                untagged: None,
                deleted: Some({
                    image_event(&s.engine, "delete", &d);
                    d
                }),
            },
        })
        .collect();
    Ok(axum::Json(out).into_response())
}

/// A blocking reader over a request body, for the image store.
fn body_reader(body: Body) -> impl Read + Send + 'static {
    let stream = body
        .into_data_stream()
        .map(|r| r.map_err(std::io::Error::other));
    tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream))
}

fn json_lines(lines: Vec<serde_json::Value>) -> Response {
    let mut body = Vec::new();
    for l in lines {
        body.extend(serde_json::to_vec(&l).unwrap_or_default());
        body.push(b'\n');
    }
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn images_load(State(s): State<AppState>, req: Request) -> ApiResult<Response> {
    let images = s.engine.images();
    let reader = body_reader(req.into_body());
    let lines = tokio::task::spawn_blocking(move || images.load(reader))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    for l in &lines {
        let name = l.rsplit(": ").next().unwrap_or(l).to_string();
        image_event(&s.engine, "load", &name);
    }
    Ok(json_lines(
        lines
            .into_iter()
            .map(|l| serde_json::json!({ "stream": format!("{l}\n") }))
            .collect(),
    ))
}

async fn images_create(State(s): State<AppState>, req: Request) -> ApiResult<Response> {
    let q = Query::of(req.uri());
    if q.get("fromImage").is_some() {
        return images::pull(&s, &q, req.headers()).await;
    }
    let repo = q.get("repo").unwrap_or("").to_string();
    let tag = q.get("tag").unwrap_or("").to_string();
    let reference = match (repo.is_empty(), tag.is_empty()) {
        (true, _) => None,
        (false, true) => Some(repo),
        (false, false) => Some(format!("{repo}:{tag}")),
    };
    let changes = q.all("changes");
    let message = q.get("message").unwrap_or("").to_string();
    let src = q.get("fromSrc").unwrap_or("");
    if src != "-" {
        return images::import_url(&s, src, reference, changes, message).await;
    }
    let images = s.engine.images();
    let reader = body_reader(req.into_body());
    let id = tokio::task::spawn_blocking(move || {
        images.import(reader, reference.as_deref(), &changes, &message)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    image_event(&s.engine, "import", &id);
    Ok(json_lines(vec![serde_json::json!({ "status": id })]))
}

// ------------------------------------------------------------ containers

/// Docker's `filters` query parameter: `{"key":["v1","v2"]}`, or the older
/// `{"key":{"v1":true}}`.
fn parse_filters(q: &Query) -> ApiResult<HashMap<String, Vec<String>>> {
    let Some(raw) = q.get("filters").filter(|f| !f.is_empty()) else {
        return Ok(HashMap::new());
    };
    let v: serde_json::Value =
        serde_json::from_str(raw).map_err(|e| ApiError::bad(format!("invalid filter: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::bad("invalid filter: not an object"))?;
    let mut out = HashMap::new();
    for (k, vals) in obj {
        let list: Vec<String> = match vals {
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
            serde_json::Value::Object(m) => m.keys().cloned().collect(),
            _ => return Err(ApiError::bad(format!("invalid filter '{k}'"))),
        };
        out.insert(k.clone(), list);
    }
    Ok(out)
}

async fn containers_list(State(s): State<AppState>, req: Request) -> ApiResult<Response> {
    let q = Query::of(req.uri());
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<i64>().ok())
        .filter(|n| *n > 0);
    // As dockerd: a limit (`ps -n`, `ps -l`) counts stopped containers too.
    let mut list = s
        .engine
        .list(q.flag("all") || limit.is_some(), &parse_filters(&q)?)?;
    if let Some(n) = limit {
        list.truncate(n as usize);
    }
    Ok(axum::Json(list).into_response())
}

async fn containers_prune(State(s): State<AppState>, req: Request) -> ApiResult<Response> {
    let q = Query::of(req.uri());
    let mut f = vessel_engine::ContainerPruneFilters::default();
    for (k, v) in parse_filters(&q)? {
        match k.as_str() {
            "label" => f.label = v,
            "label!" => f.label_not = v,
            "until" => f.until = Some(images::until_filter(&v)?),
            _ => return Err(ApiError::bad(format!("invalid filter '{k}'"))),
        }
    }
    let (deleted, space) = s.engine.prune(&f).await;
    Ok(
        axum::Json(serde_json::json!({ "ContainersDeleted": deleted, "SpaceReclaimed": space }))
            .into_response(),
    )
}

async fn container_rename(
    State(s): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<StatusCode> {
    let q = Query::of(req.uri());
    s.engine.rename(&id, q.get("name").unwrap_or("")).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn container_update(
    State(s): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    let bytes = axum::body::to_bytes(req.into_body(), 1024 * 1024)
        .await
        .map_err(|e| ApiError::bad(format!("reading request body: {e}")))?;
    let body: bollard_stubs::models::ContainerUpdateBody =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::bad(format!("invalid JSON: {e}")))?;
    let warnings = s.engine.update(&id, body).await?;
    Ok(axum::Json(serde_json::json!({ "Warnings": warnings })).into_response())
}

fn archive_path(req: &Request) -> ApiResult<String> {
    match Query::of(req.uri()).get("path") {
        Some(p) if !p.is_empty() => Ok(p.to_string()),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad parameter: path cannot be empty",
        )),
    }
}

/// Docker's `X-Docker-Container-Path-Stat`: base64 of the stat's JSON.
fn path_stat_header(stat: &vessel_engine::PathStat) -> String {
    use base64::Engine as _;
    let mtime = chrono::DateTime::from_timestamp(
        stat.mtime_unix_ns.div_euclid(1_000_000_000),
        stat.mtime_unix_ns.rem_euclid(1_000_000_000) as u32,
    )
    .unwrap_or_default()
    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    let json = serde_json::json!({
        "name": stat.name,
        "size": stat.size,
        "mode": stat.mode,
        "mtime": mtime,
        "linkTarget": stat.link_target,
    });
    base64::engine::general_purpose::STANDARD.encode(json.to_string())
}

const PATH_STAT: &str = "X-Docker-Container-Path-Stat";

async fn archive_head(
    State(s): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    let path = archive_path(&req)?;
    let stat = s.engine.archive_stat(&id, &path).await?;
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(PATH_STAT, path_stat_header(&stat))
        .body(Body::empty())
        .unwrap_or_default())
}

async fn archive_get(
    State(s): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    let path = archive_path(&req)?;
    let archive = s.engine.archive_get(&id, &path).await?;
    let stream = tokio_stream_from(archive.data).map(|r| r.map_err(std::io::Error::other));
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-tar")
        .header(PATH_STAT, path_stat_header(&archive.stat))
        .body(Body::from_stream(stream))
        .unwrap_or_default())
}

async fn archive_put(
    State(s): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<StatusCode> {
    let path = archive_path(&req)?;
    let keep_owners = Query::of(req.uri()).flag("copyUIDGID");
    let mut body = Box::pin(
        req.into_body()
            .into_data_stream()
            .map(|r| r.map_err(|e| e.to_string())),
    );
    let result = s
        .engine
        .archive_put(&id, &path, keep_owners, &mut body)
        .await;
    if result.is_err() {
        // Read what the client still sends, so it sees the answer rather
        // than a broken pipe (bounded: a minute).
        let drain = async { while body.next().await.is_some() {} };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(60), drain).await;
    }
    result?;
    Ok(StatusCode::OK)
}

/// `POST /commit` (`docker commit`).
async fn commit(State(s): State<AppState>, req: Request) -> ApiResult<Response> {
    let q = Query::of(req.uri());
    let container = q
        .get("container")
        .filter(|c| !c.is_empty())
        .ok_or_else(|| ApiError::bad("container is required"))?
        .to_string();
    let reference = match (q.get("repo").filter(|r| !r.is_empty()), q.get("tag")) {
        (Some(repo), Some(tag)) if !tag.is_empty() => Some(format!("{repo}:{tag}")),
        (Some(repo), _) => Some(repo.to_string()),
        (None, Some(tag)) if !tag.is_empty() => {
            return Err(ApiError::bad("tag is given without a repository"))
        }
        _ => None,
    };
    let bytes = axum::body::to_bytes(req.into_body(), 1024 * 1024)
        .await
        .map_err(|e| ApiError::bad(format!("reading request body: {e}")))?;
    let config = if bytes.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad(format!("invalid JSON: {e}")))?;
        Some(v)
    };
    let opts = vessel_engine::CommitOptions {
        reference: reference.clone(),
        comment: q.get("comment").unwrap_or("").to_string(),
        author: q.get("author").unwrap_or("").to_string(),
        changes: q
            .all("changes")
            .into_iter()
            .filter(|c| !c.is_empty())
            .collect(),
        config,
    };
    let id = s.engine.commit(&container, opts).await?;
    if let Some(r) = &reference {
        image_event(&s.engine, "tag", r);
    }
    Ok((
        StatusCode::CREATED,
        axum::Json(serde_json::json!({ "Id": id })),
    )
        .into_response())
}

async fn container_export(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let archive = s.engine.export(&id).await?;
    let stream = tokio_stream_from(archive.data).map(|r| r.map_err(std::io::Error::other));
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-tar")
        .body(Body::from_stream(stream))
        .unwrap_or_default())
}

async fn container_changes(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let changes = s.engine.changes(&id).await?;
    let out: Vec<serde_json::Value> = changes
        .into_iter()
        .map(|(kind, path)| serde_json::json!({ "Path": path, "Kind": kind }))
        .collect();
    Ok(axum::Json(out).into_response())
}

async fn container_top(
    State(s): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    let q = Query::of(req.uri());
    let (titles, processes) = s.engine.top(&id, q.get("ps_args").unwrap_or("")).await?;
    Ok(axum::Json(serde_json::json!({ "Titles": titles, "Processes": processes })).into_response())
}

async fn container_pause(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    s.engine.pause(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn container_unpause(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    s.engine.unpause(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn container_create(State(s): State<AppState>, req: Request) -> ApiResult<Response> {
    let q = Query::of(req.uri());
    let bytes = axum::body::to_bytes(req.into_body(), 16 * 1024 * 1024)
        .await
        .map_err(|e| ApiError::bad(format!("reading request body: {e}")))?;
    let body: ContainerCreateBody = serde_json::from_slice(&bytes).map_err(|e| {
        restart_policy_error(&bytes).unwrap_or_else(|| ApiError::bad(format!("invalid JSON: {e}")))
    })?;
    let id = s.engine.create(q.get("name"), body).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(ContainerCreateResponse {
            id,
            warnings: vec![],
        }),
    )
        .into_response())
}

/// dockerd's answer to a restart policy name it does not know, which the
/// typed model cannot even parse.
fn restart_policy_error(body: &[u8]) -> Option<ApiError> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let name = v.pointer("/HostConfig/RestartPolicy/Name")?.as_str()?;
    if ["", "no", "always", "on-failure", "unless-stopped"].contains(&name) {
        return None;
    }
    Some(ApiError::bad(format!(
        "invalid restart policy: unknown policy '{name}'; use one of 'no', 'always', 'on-failure', or 'unless-stopped'"
    )))
}

async fn container_inspect(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let mut v = serde_json::to_value(s.engine.inspect(&id)?)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    legacy_network_fields(&mut v);
    Ok(axum::Json(v).into_response())
}

/// API 1.50 still carries the default bridge's endpoint at the top of
/// `NetworkSettings` (`IPAddress`, `Gateway`, …; deprecated, but scripts
/// use `{{.NetworkSettings.IPAddress}}`). bollard's model no longer has
/// these fields, so they are added to the JSON.
fn legacy_network_fields(v: &mut serde_json::Value) {
    let Some(ns) = v.get_mut("NetworkSettings").and_then(|n| n.as_object_mut()) else {
        return;
    };
    let bridge = ns
        .get("Networks")
        .and_then(|n| n.get("bridge"))
        .cloned()
        .unwrap_or_default();
    let text = |k: &str| bridge.get(k).cloned().unwrap_or_else(|| "".into());
    for (field, from) in [
        ("EndpointID", "EndpointID"),
        ("Gateway", "Gateway"),
        ("IPAddress", "IPAddress"),
        ("MacAddress", "MacAddress"),
        ("IPv6Gateway", "IPv6Gateway"),
        ("GlobalIPv6Address", "GlobalIPv6Address"),
    ] {
        ns.insert(field.into(), text(from));
    }
    for (field, from) in [
        ("IPPrefixLen", "IPPrefixLen"),
        ("GlobalIPv6PrefixLen", "GlobalIPv6PrefixLen"),
    ] {
        ns.insert(
            field.into(),
            bridge.get(from).cloned().unwrap_or_else(|| 0.into()),
        );
    }
    ns.insert("Bridge".into(), "".into());
    ns.insert("HairpinMode".into(), false.into());
    ns.insert("LinkLocalIPv6Address".into(), "".into());
    ns.insert("LinkLocalIPv6PrefixLen".into(), 0.into());
    ns.insert("SecondaryIPAddresses".into(), serde_json::Value::Null);
    ns.insert("SecondaryIPv6Addresses".into(), serde_json::Value::Null);
}

async fn container_start(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    s.engine.start(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn stop_args(q: &Query) -> ApiResult<Option<i64>> {
    q.get("t")
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<i64>()
                .map_err(|_| ApiError::bad(format!("invalid value for t: {t}")))
        })
        .transpose()
}

async fn container_stop(
    State(s): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<StatusCode> {
    let q = Query::of(req.uri());
    s.engine.stop(&id, stop_args(&q)?, q.get("signal")).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn container_restart(
    State(s): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<StatusCode> {
    let q = Query::of(req.uri());
    s.engine
        .restart(&id, stop_args(&q)?, q.get("signal"))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn container_kill(
    State(s): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<StatusCode> {
    let q = Query::of(req.uri());
    s.engine
        .kill(&id, q.get("signal").unwrap_or("KILL"))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn container_remove(
    State(s): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<StatusCode> {
    let q = Query::of(req.uri());
    s.engine
        .remove_with_volumes(&id, q.flag("force"), q.flag("v"))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn container_wait(
    State(s): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    let q = Query::of(req.uri());
    let cond = match q.get("condition").unwrap_or("") {
        "" | "not-running" => WaitCondition::NotRunning,
        "next-exit" => WaitCondition::NextExit,
        "removed" => WaitCondition::Removed,
        other => return Err(ApiError::bad(format!("invalid condition: \"{other}\""))),
    };
    let fut = s.engine.wait(&id, cond)?;
    // Headers go out at once (the CLI waits for them before starting the
    // container); the body follows when the condition is met.
    let body = futures::stream::once(async move {
        let code = fut.await;
        let mut v = serde_json::to_vec(&ContainerWaitResponse {
            status_code: code,
            error: None,
        })
        .unwrap_or_default();
        v.push(b'\n');
        Ok::<_, std::io::Error>(Bytes::from(v))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(body),
    )
        .into_response())
}

fn resize_args(q: &Query) -> ApiResult<(u16, u16)> {
    let parse = |k: &str| -> ApiResult<u16> {
        q.get(k)
            .unwrap_or("0")
            .parse::<u16>()
            .map_err(|_| ApiError::bad(format!("invalid {k}: {}", q.get(k).unwrap_or(""))))
    };
    Ok((parse("h")?, parse("w")?))
}

async fn container_resize(
    State(s): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<StatusCode> {
    let q = Query::of(req.uri());
    let (h, w) = resize_args(&q)?;
    s.engine.resize(&id, h, w).await?;
    Ok(StatusCode::OK)
}

async fn container_logs(
    State(s): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    let q = Query::of(req.uri());
    let stdout = q.flag("stdout");
    let stderr = q.flag("stderr");
    if !stdout && !stderr {
        return Err(ApiError::bad(
            "Bad parameters: you must choose at least one stream",
        ));
    }
    let tail = match q.get("tail") {
        None | Some("") | Some("all") => None,
        Some(t) => Some(
            t.parse::<usize>()
                .map_err(|_| ApiError::bad(format!("invalid tail value: {t}")))?,
        ),
    };
    let time = |k: &str| -> ApiResult<Option<f64>> {
        match q.get(k) {
            None | Some("") | Some("0") => Ok(None),
            Some(v) => v
                .parse::<f64>()
                .map(Some)
                .map_err(|_| ApiError::bad(format!("invalid value for {k}: {v}"))),
        }
    };
    let opts = LogsOptions {
        stdout,
        stderr,
        follow: q.flag("follow"),
        tail,
        since: time("since")?,
        until: time("until")?,
    };
    let timestamps = q.flag("timestamps");
    let details = q.flag("details");
    let (tty, rx) = s.engine.logs(&id, opts)?;
    let body = tokio_stream_from(rx).map(move |e| {
        let mut text = Vec::new();
        if timestamps {
            text.extend_from_slice(e.time.as_bytes());
            text.push(b' ');
        }
        if details {
            text.extend_from_slice(details_prefix(e.attrs.as_ref()).as_bytes());
        }
        text.extend_from_slice(e.log.as_bytes());
        let out = if tty {
            text
        } else {
            frame(
                if e.stream == "stderr" {
                    StreamId::Stderr
                } else {
                    StreamId::Stdout
                },
                &text,
            )
        };
        Ok::<_, std::io::Error>(Bytes::from(out))
    });
    let ct = if tty { RAW } else { MULTIPLEXED };
    Ok(([(header::CONTENT_TYPE, ct)], Body::from_stream(body)).into_response())
}

/// What `docker logs --details` puts before a line, as dockerd writes it:
/// the entry's extra attributes sorted by key, `k=v` joined by commas,
/// keys and values query-escaped, then a space (a lone space when there
/// are none).
fn details_prefix(attrs: Option<&std::collections::BTreeMap<String, String>>) -> String {
    // Go's url.QueryEscape: all but letters, digits and `-_.~` escaped,
    // spaces as `+`.
    const QUERY: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    let escape = |s: &str| {
        percent_encoding::utf8_percent_encode(s, QUERY)
            .to_string()
            .replace("%20", "+")
    };
    let mut out = attrs
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
        .collect::<Vec<_>>()
        .join(",");
    out.push(' ');
    out
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// `GET /containers/{id}/stats`: a JSON document per second (`stream=1`,
/// the default) or one (`stream=0`, `one-shot=1`).
async fn container_stats(
    State(s): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    let q = Query::of(req.uri());
    let stream = q
        .get("stream")
        .is_none_or(|v| !matches!(v, "0" | "false" | "False"))
        && !q.flag("one-shot");
    let rx = s.engine.stats(&id, stream)?;
    let body = tokio_stream_from(rx).map(|doc| {
        let mut v = serde_json::to_vec(&doc).unwrap_or_default();
        v.push(b'\n');
        Ok::<_, std::io::Error>(Bytes::from(v))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(body),
    )
        .into_response())
}

/// Feeds a hijacked connection's input somewhere: `Some(bytes)` for data,
/// `None` at end of input. Returns false to stop reading.
type StdinSink =
    Box<dyn FnMut(Option<Vec<u8>>) -> futures::future::BoxFuture<'static, bool> + Send>;

/// After a `101 UPGRADED`, streams `output` to the client (multiplexed
/// frames, or raw bytes with a TTY) until the process ends, and feeds what
/// the client sends to `stdin`. `first` is written before any output (an
/// error message for an exec that failed to start).
/// With `detach_keys`, that key sequence on stdin detaches the client: the
/// connection ends and the process keeps running with its stdin open.
fn serve_hijacked(
    on_upgrade: hyper::upgrade::OnUpgrade,
    mut output: tokio::sync::broadcast::Receiver<Output>,
    tty: bool,
    (want_stdout, want_stderr): (bool, bool),
    stdin: Option<StdinSink>,
    before: Option<futures::future::BoxFuture<'static, Option<String>>>,
    detach_keys: Option<Vec<u8>>,
) {
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                debug!("upgrade failed: {e}");
                return;
            }
        };
        let (mut rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
        let (detached_tx, detached_rx) = tokio::sync::oneshot::channel::<()>();
        // `None` once the stdin side ended without detaching.
        let mut detached = Some(detached_rx);
        let stdin_task = stdin.map(|mut sink| {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 32 * 1024];
                let mut escape = detach_keys.map(EscapeScanner::new);
                loop {
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            sink(None).await;
                            break;
                        }
                        Ok(n) => {
                            let (data, detach) = match escape.as_mut() {
                                Some(e) => e.feed(&buf[..n]),
                                None => (buf[..n].to_vec(), false),
                            };
                            if !data.is_empty() && !sink(Some(data)).await {
                                break;
                            }
                            if detach {
                                debug!("attach: detach keys read, the client is detached");
                                let _ = detached_tx.send(());
                                break;
                            }
                        }
                    }
                }
            })
        });
        if let Some(before) = before {
            if let Some(msg) = before.await {
                let line = format!("{msg}\r\n");
                let bytes = if tty {
                    line.into_bytes()
                } else {
                    frame(StreamId::Stderr, line.as_bytes())
                };
                let _ = wr.write_all(&bytes).await;
            }
        }
        loop {
            let received = match detached.as_mut() {
                Some(d) => tokio::select! {
                    r = output.recv() => r,
                    seen = d => match seen {
                        Ok(()) => break,
                        Err(_) => {
                            detached = None;
                            continue;
                        }
                    },
                },
                None => output.recv().await,
            };
            let item = match received {
                Ok(o) => o,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    warn!("attach client fell behind; {n} output chunks dropped");
                    continue;
                }
                Err(_) => break,
            };
            let bytes = match item {
                Output::Stdout(b) if want_stdout => {
                    if tty {
                        b.to_vec()
                    } else {
                        frame(StreamId::Stdout, &b)
                    }
                }
                Output::Stderr(b) if want_stderr => {
                    if tty {
                        b.to_vec()
                    } else {
                        frame(StreamId::Stderr, &b)
                    }
                }
                Output::End => break,
                _ => continue,
            };
            if wr.write_all(&bytes).await.is_err() {
                break;
            }
            let _ = wr.flush().await;
        }
        let _ = wr.shutdown().await;
        if let Some(t) = stdin_task {
            t.abort();
        }
    });
}

/// Finds a detach key sequence in a stdin stream, holding back bytes that
/// may start it until it is known whether they do.
struct EscapeScanner {
    keys: Vec<u8>,
    pending: Vec<u8>,
}

impl EscapeScanner {
    fn new(keys: Vec<u8>) -> Self {
        Self {
            keys,
            pending: Vec::new(),
        }
    }

    /// The bytes to pass on, and whether the sequence was seen (what
    /// follows it is dropped).
    fn feed(&mut self, data: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(data.len());
        for &b in data {
            if self.keys.get(self.pending.len()) == Some(&b) {
                self.pending.push(b);
                if self.pending.len() == self.keys.len() {
                    return (out, true);
                }
                continue;
            }
            out.append(&mut self.pending);
            if self.keys.first() == Some(&b) {
                self.pending.push(b);
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

/// Docker's `detachKeys`: comma-separated `ctrl-<c>` or single characters;
/// empty means the default, ctrl-p ctrl-q.
fn parse_detach_keys(spec: Option<&str>) -> ApiResult<Vec<u8>> {
    let spec = spec.filter(|s| !s.is_empty()).unwrap_or("ctrl-p,ctrl-q");
    let bad = || ApiError::bad(format!("Invalid detach keys ({spec}) provided"));
    spec.split(',')
        .map(|k| {
            if let Some(c) = k.strip_prefix("ctrl-") {
                let c = c.as_bytes();
                if c.len() != 1 {
                    return Err(bad());
                }
                match c[0] {
                    b'a'..=b'z' => Ok(c[0] - b'a' + 1),
                    b'@' => Ok(0),
                    b'[' => Ok(27),
                    b'\\' => Ok(28),
                    b']' => Ok(29),
                    b'^' => Ok(30),
                    b'_' => Ok(31),
                    _ => Err(bad()),
                }
            } else if k.len() == 1 {
                Ok(k.as_bytes()[0])
            } else {
                Err(bad())
            }
        })
        .collect()
}

/// The `101 UPGRADED` answer (or `200` for a client that did not ask to upgrade).
fn upgraded_response(upgrading: bool, tty: bool) -> Response {
    let mut resp = Response::new(Body::empty());
    if upgrading {
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        resp.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("tcp"));
    }
    let ct = if tty { RAW } else { MULTIPLEXED };
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    resp
}

async fn container_attach(
    State(s): State<AppState>,
    Path(id): Path<String>,
    mut req: Request,
) -> ApiResult<Response> {
    let q = Query::of(req.uri());
    let (cid, att) = s.engine.attach(&id)?;
    let rec = s.engine.record(&cid)?;
    // As dockerd: a stopped container may be attached to (`docker start -a`
    // attaches before it starts); a paused one may not.
    if rec.state.paused {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "You cannot attach to a paused container, unpause it first",
        ));
    }
    let want_stdin = q.flag("stdin") && rec.config.open_stdin.unwrap_or(false);
    let detach_keys = parse_detach_keys(q.get("detachKeys"))?;
    let upgrading = req.headers().get(header::UPGRADE).is_some();
    let on_upgrade = hyper::upgrade::on(&mut req);
    let stdin: Option<StdinSink> = want_stdin.then(|| {
        let engine = s.engine.clone();
        Box::new(move |data: Option<Vec<u8>>| {
            let engine = engine.clone();
            let cid = cid.clone();
            Box::pin(async move {
                match data {
                    Some(d) => engine.write_stdin(&cid, &d).await.is_ok(),
                    None => {
                        let _ = engine.close_stdin(&cid).await;
                        false
                    }
                }
            }) as futures::future::BoxFuture<'static, bool>
        }) as StdinSink
    });
    serve_hijacked(
        on_upgrade,
        att.output,
        att.tty,
        (q.flag("stdout"), q.flag("stderr")),
        stdin,
        None,
        Some(detach_keys),
    );
    Ok(upgraded_response(upgrading, att.tty))
}

async fn exec_create(
    State(s): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    let bytes = axum::body::to_bytes(req.into_body(), 1024 * 1024)
        .await
        .map_err(|e| ApiError::bad(format!("reading request body: {e}")))?;
    let config: ExecConfig =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::bad(format!("invalid JSON: {e}")))?;
    let id = s.engine.exec_create(&id, config)?;
    // Docker spells it `Id` (bollard's IdResponse serialises `id`).
    Ok((
        StatusCode::CREATED,
        axum::Json(serde_json::json!({ "Id": id })),
    )
        .into_response())
}

async fn exec_start(
    State(s): State<AppState>,
    Path(id): Path<String>,
    mut req: Request,
) -> ApiResult<Response> {
    let upgrading = req.headers().get(header::UPGRADE).is_some();
    let on_upgrade = hyper::upgrade::on(&mut req);
    let bytes = axum::body::to_bytes(req.into_body(), 1024 * 1024)
        .await
        .map_err(|e| ApiError::bad(format!("reading request body: {e}")))?;
    let cfg: ExecStartConfig = if bytes.is_empty() {
        ExecStartConfig::default()
    } else {
        serde_json::from_slice(&bytes).map_err(|e| ApiError::bad(format!("invalid JSON: {e}")))?
    };
    let tty_size = cfg
        .console_size
        .as_ref()
        .filter(|c| c.len() == 2 && c[0] > 0 && c[1] > 0)
        .map(|c| (c[0] as u16, c[1] as u16));
    let e = s.engine.exec_claim(&id)?;
    if cfg.detach.unwrap_or(false) {
        s.engine.exec_launch(&e, tty_size).await.map_err(|m| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("OCI runtime exec failed: {m}"),
            )
        })?;
        return Ok(StatusCode::OK.into_response());
    }
    let output = e.subscribe();
    let tty = e.tty();
    let engine = s.engine.clone();
    let launch_exec = e.clone();
    let before = Box::pin(async move {
        engine
            .exec_launch(&launch_exec, tty_size)
            .await
            .err()
            .map(|m| format!("OCI runtime exec failed: {m}"))
    }) as futures::future::BoxFuture<'static, Option<String>>;
    let stdin: Option<StdinSink> = e.config.attach_stdin.unwrap_or(false).then(|| {
        let engine = s.engine.clone();
        let e = e.clone();
        Box::new(move |data: Option<Vec<u8>>| {
            let engine = engine.clone();
            let e = e.clone();
            Box::pin(async move {
                let more = data.is_some();
                engine.exec_stdin(&e, data.as_deref()).await.is_ok() && more
            }) as futures::future::BoxFuture<'static, bool>
        }) as StdinSink
    });
    let want = (
        e.config.attach_stdout.unwrap_or(true),
        e.config.attach_stderr.unwrap_or(true),
    );
    serve_hijacked(on_upgrade, output, tty, want, stdin, Some(before), None);
    Ok(upgraded_response(upgrading, tty))
}

async fn exec_resize(
    State(s): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<StatusCode> {
    let q = Query::of(req.uri());
    let (h, w) = resize_args(&q)?;
    s.engine.exec_resize(&id, h, w).await?;
    Ok(StatusCode::OK)
}

async fn exec_inspect(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(axum::Json(s.engine.exec(&id)?.inspect()).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_restart_policies_get_dockerds_message() {
        let e = restart_policy_error(br#"{"HostConfig":{"RestartPolicy":{"Name":"sometimes"}}}"#)
            .expect("an error");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(
            e.message.contains("unknown policy 'sometimes'"),
            "{}",
            e.message
        );
        assert!(
            restart_policy_error(br#"{"HostConfig":{"RestartPolicy":{"Name":"always"}}}"#)
                .is_none()
        );
        assert!(restart_policy_error(b"not json").is_none());
    }

    #[test]
    fn image_filters_of_events_match_without_the_tag() {
        assert_eq!(strip_tag("busybox:latest"), "busybox");
        assert_eq!(strip_tag("localhost:5000/a/b:1"), "localhost:5000/a/b");
        assert_eq!(strip_tag("localhost:5000/a/b"), "localhost:5000/a/b");
        assert_eq!(strip_tag("busybox@sha256:00"), "busybox@sha256:00");
        let e = EventMessage {
            typ: Some(bollard_stubs::models::EventMessageTypeEnum::CONTAINER),
            action: Some("start".into()),
            actor: Some(bollard_stubs::models::EventActor {
                id: Some("abc".into()),
                attributes: Some(HashMap::from([(
                    "image".to_string(),
                    "busybox:latest".to_string(),
                )])),
            }),
            ..Default::default()
        };
        let f = |k: &str, v: &str| HashMap::from([(k.to_string(), vec![v.to_string()])]);
        assert!(event_matches(&e, &f("image", "busybox")));
        assert!(event_matches(&e, &f("image", "busybox:latest")));
        assert!(!event_matches(&e, &f("image", "busy")));
        assert!(event_matches(&e, &f("scope", "local")));
        assert!(
            !event_matches(&e, &f("network", "abc")),
            "not a network event"
        );
    }

    #[test]
    fn engine_errors_map_to_docker_statuses() {
        let cases = [
            (
                EngineError::NotFound("No such container: x".into()),
                StatusCode::NOT_FOUND,
            ),
            (EngineError::Conflict("in use".into()), StatusCode::CONFLICT),
            (
                EngineError::InvalidParameter("bad".into()),
                StatusCode::BAD_REQUEST,
            ),
            (EngineError::NotModified, StatusCode::NOT_MODIFIED),
            (
                EngineError::NotImplemented("cannot read logs".into()),
                StatusCode::NOT_IMPLEMENTED,
            ),
            (
                EngineError::Internal("boom".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (e, status) in cases {
            let msg = e.to_string();
            let r = ApiError::from(e);
            assert_eq!(r.status, status);
            assert_eq!(r.message, msg);
        }
    }

    #[test]
    fn query_flags_follow_docker() {
        let uri: axum::http::Uri = "/x?all=1&force=true&f=0&e=&changes=CMD%20a&changes=ENV%20b%3Dc"
            .parse()
            .expect("uri");
        let q = Query::of(&uri);
        assert!(q.flag("all") && q.flag("force"));
        assert!(!q.flag("f") && !q.flag("e") && !q.flag("missing"));
        assert_eq!(
            q.all("changes"),
            vec!["CMD a".to_string(), "ENV b=c".to_string()]
        );
    }
}

#[cfg(test)]
mod detach_tests {
    use super::{details_prefix, parse_detach_keys, EscapeScanner};

    #[test]
    fn details_are_written_as_dockerd_writes_them() {
        assert_eq!(details_prefix(None), " ");
        let attrs: std::collections::BTreeMap<String, String> = [
            ("b".to_string(), "two words".to_string()),
            ("a".to_string(), "x=y,z/~*".to_string()),
        ]
        .into();
        assert_eq!(
            details_prefix(Some(&attrs)),
            "a=x%3Dy%2Cz%2F~%2A,b=two+words "
        );
    }

    #[test]
    fn detach_keys_parse_as_docker_writes_them() {
        assert_eq!(parse_detach_keys(None).expect("default"), vec![16, 17]);
        assert_eq!(
            parse_detach_keys(Some("ctrl-a,x")).expect("keys"),
            vec![1, b'x']
        );
        assert!(parse_detach_keys(Some("ctrl-ab")).is_err());
        assert!(parse_detach_keys(Some("abc")).is_err());
    }

    #[test]
    fn the_sequence_detaches_and_near_misses_pass_through() {
        let mut e = EscapeScanner::new(vec![16, 17]);
        assert_eq!(e.feed(b"ab\x10"), (b"ab".to_vec(), false));
        assert_eq!(e.feed(b"c"), (b"\x10c".to_vec(), false));
        assert_eq!(e.feed(b"\x10\x10"), (b"\x10".to_vec(), false));
        assert_eq!(e.feed(b"\x11rest"), (vec![], true));
    }
}
