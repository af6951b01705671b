//! Registry and image-maintenance endpoints: pull (`POST /images/create`
//! with `fromImage`), import from a URL (`fromSrc=<URL>`), push, `POST /auth`, history, save (`GET
//! /images/{name}/get`, `GET /images/get`), prune, `GET /system/df`, and
//! the filters of `GET /images/json`.
//!
//! Pull and push answer with Docker's JSON progress stream. As dockerd
//! does, a pull that fails before its first layer is an HTTP error status
//! (so `docker pull nosuch` prints Docker's message); otherwise, and for
//! every push (whose first line comes at once), the error is the stream's
//! last line (`errorDetail`).

use std::collections::HashMap;

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bollard_stubs::models::ImageSummary;
use futures::StreamExt;
use serde_json::{json, Value};
use vessel_registry::{Credentials, Error as RegistryError, Platform, Progress};

use super::{image_event, parse_filters, tokio_stream_from, ApiError, ApiResult, AppState, Query};

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let e = match e {
            RegistryError::Store(inner) => return inner.into(),
            other => other,
        };
        let status = match &e {
            RegistryError::NotFound(_) | RegistryError::UnknownHost(_) => StatusCode::NOT_FOUND,
            RegistryError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            RegistryError::InvalidReference(_)
            | RegistryError::InvalidCredentials(_)
            | RegistryError::InvalidUrl(_)
            | RegistryError::NoMatchingPlatform(_) => StatusCode::BAD_REQUEST,
            // dockerd keeps these four statuses of a download; others are 500.
            RegistryError::HttpStatus { status, .. } if matches!(status, 400 | 401 | 403 | 404) => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

/// Credentials from `X-Registry-Auth` (none: anonymous).
fn credentials(headers: &HeaderMap) -> ApiResult<Credentials> {
    match headers
        .get("X-Registry-Auth")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
    {
        Some(v) => Ok(Credentials::from_x_registry_auth(v)?),
        None => Ok(Credentials::default()),
    }
}

/// Runs a pull or push whose progress goes to `tx`, answering with the
/// JSON stream (or an error status if it fails before saying anything).
async fn progress_stream<F>(run: F) -> ApiResult<Response>
where
    F: FnOnce(
            tokio::sync::mpsc::UnboundedSender<Value>,
        ) -> futures::future::BoxFuture<'static, Result<Vec<Value>, ApiError>>
        + Send
        + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let mut task = tokio::spawn(run(tx));
    // Wait for the first line that says more than "Pulling from" (which
    // comes before the manifest is found), or for the end.
    let mut held: Vec<Value> = Vec::new();
    loop {
        tokio::select! {
            line = rx.recv() => match line {
                Some(v) => {
                    let preamble = v
                        .get("status")
                        .and_then(Value::as_str)
                        .is_some_and(|s| s.starts_with("Pulling from"));
                    held.push(v);
                    if !preamble {
                        break;
                    }
                }
                None => break,
            },
            done = &mut task => {
                let done = done.map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
                // Not 401: the docker CLI answers a 401 by prompting for a
                // login (dockerd reports registry auth failures otherwise).
                let tail = done.map_err(|e| {
                    if e.status == StatusCode::UNAUTHORIZED {
                        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.message)
                    } else {
                        e
                    }
                })?;
                while let Ok(l) = rx.try_recv() {
                    held.push(l);
                }
                held.extend(tail);
                return Ok(super::json_lines(held));
            }
        }
    }
    let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    tokio::spawn(async move {
        let line = |v: &Value| {
            let mut b = serde_json::to_vec(v).unwrap_or_default();
            b.push(b'\n');
            b
        };
        for v in &held {
            let _ = out_tx.send(line(v)).await;
        }
        // The task owns the only sender: the channel ends when it does.
        while let Some(v) = rx.recv().await {
            let _ = out_tx.send(line(&v)).await;
        }
        let tail = match task.await {
            Ok(Ok(tail)) => tail,
            Ok(Err(e)) => vec![error_line(&e.message)],
            Err(e) => vec![error_line(&e.to_string())],
        };
        for v in tail {
            let _ = out_tx.send(line(&v)).await;
        }
    });
    let body = tokio_stream_from(out_rx).map(Ok::<_, std::io::Error>);
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(body),
    )
        .into_response())
}

fn error_line(message: &str) -> Value {
    json!({ "errorDetail": { "message": message }, "error": message })
}

fn send_progress(tx: &tokio::sync::mpsc::UnboundedSender<Value>, p: Progress) {
    for v in p.to_docker_json() {
        let _ = tx.send(v);
    }
}

/// `POST /images/create?fromImage=…&tag=…&platform=…`.
pub(crate) async fn pull(s: &AppState, q: &Query, headers: &HeaderMap) -> ApiResult<Response> {
    let image = q.get("fromImage").unwrap_or("").to_string();
    let tag = q.get("tag").unwrap_or("");
    let reference = if tag.is_empty() || image.contains('@') {
        image.clone()
    } else if tag.starts_with("sha256:") {
        format!("{image}@{tag}")
    } else {
        format!("{image}:{tag}")
    };
    let platform = match q.get("platform").filter(|p| !p.is_empty()) {
        Some(p) => Some(Platform::parse(p).map_err(ApiError::from)?),
        None => None,
    };
    let creds = credentials(headers)?;
    let engine = s.engine.clone();
    progress_stream(move |tx| {
        Box::pin(async move {
            let registry = engine.registry();
            let out = registry
                .pull(engine.images(), &reference, platform, &creds, |p| {
                    send_progress(&tx, p)
                })
                .await?;
            image_event(&engine, "pull", &out.reference);
            Ok(Vec::new())
        })
    })
    .await
}

/// `POST /images/create?fromSrc=<URL>` (`docker import <URL>`), as
/// dockerd: the tag is checked, the archive fetched (a failure to reach it
/// or an error status is the HTTP answer: 400, 401, 403 and 404 kept, 500
/// otherwise), then the stream says `Downloading from <url>`, reports
/// `Importing` progress as the body is read into the store, and ends with
/// the image id or the error. The store stages everything and commits only
/// a whole image.
pub(crate) async fn import_url(
    s: &AppState,
    src: &str,
    reference: Option<String>,
    changes: Vec<String>,
    message: String,
) -> ApiResult<Response> {
    if let Some(r) = &reference {
        vessel_image::Reference::parse_new_tag(r)?;
    }
    let comment = if message.is_empty() {
        format!("Imported from {src}")
    } else {
        message
    };
    let download = vessel_registry::open_archive(src).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    send_progress(
        &tx,
        Progress::DownloadingFrom {
            url: download.url().to_string(),
        },
    );
    let progress_tx = tx.clone();
    let body = download.into_stream(move |p| send_progress(&progress_tx, p));
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(body));
    let images = s.engine.images();
    let engine = s.engine.clone();
    tokio::spawn(async move {
        let done = tokio::task::spawn_blocking(move || {
            images.import(reader, reference.as_deref(), &changes, &comment)
        })
        .await;
        let last = match done {
            Ok(Ok(id)) => {
                image_event(&engine, "import", &id);
                json!({ "status": id })
            }
            Ok(Err(e)) => error_line(&ApiError::from(e).message),
            Err(e) => error_line(&e.to_string()),
        };
        let _ = tx.send(last);
    });
    Ok(lines_body(rx))
}

/// A JSON-lines response of everything sent on `rx` until its senders are gone.
fn lines_body(mut rx: tokio::sync::mpsc::UnboundedReceiver<Value>) -> Response {
    let body = futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(|v| {
        let mut b = serde_json::to_vec(&v).unwrap_or_default();
        b.push(b'\n');
        Ok::<_, std::io::Error>(b)
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(body),
    )
        .into_response()
}

/// `POST /images/{name}/push?tag=…`: one tag, or every tag of the
/// repository when `tag` is empty (as `docker push --all-tags`).
pub(crate) async fn push(
    s: &AppState,
    name: &str,
    q: &Query,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    let tag = q.get("tag").unwrap_or("").to_string();
    let creds = credentials(headers)?;
    let refs: Vec<String> = if !tag.is_empty() {
        vec![format!("{name}:{tag}")]
    } else {
        let repo = vessel_image::Reference::parse(name)
            .map(|r| r.familiar_name())
            .map_err(ApiError::from)?;
        let images = s.engine.images();
        let mut tags: Vec<String> = images
            .list()
            .into_iter()
            .flat_map(|i| i.repo_tags)
            .filter(|t| t.rsplit_once(':').is_some_and(|(r, _)| r == repo))
            .collect();
        tags.sort();
        if tags.is_empty() {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("An image does not exist locally with the tag: {name}"),
            ));
        }
        tags
    };
    let engine = s.engine.clone();
    progress_stream(move |tx| {
        Box::pin(async move {
            let registry = engine.registry();
            for r in refs {
                registry
                    .push(engine.images(), &r, &creds, |p| send_progress(&tx, p))
                    .await?;
                image_event(&engine, "push", &r);
            }
            Ok(Vec::new())
        })
    })
    .await
}

/// `POST /auth`.
pub(crate) async fn auth(s: &AppState, body: &[u8]) -> ApiResult<Response> {
    let creds = Credentials::from_json(body)?;
    let server = creds.server_address.clone();
    let out = s.engine.registry().check_auth(&server, &creds).await?;
    Ok(axum::Json(json!({
        "Status": out.status,
        "IdentityToken": out.identity_token.unwrap_or_default(),
    }))
    .into_response())
}

/// `GET /images/{name}/history`.
pub(crate) async fn history(s: &AppState, name: &str) -> ApiResult<Response> {
    let images = s.engine.images();
    let n = name.to_string();
    let items = tokio::task::spawn_blocking(move || images.history(&n))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let out: Vec<Value> = items
        .into_iter()
        .map(|h| {
            json!({
                "Id": h.id,
                "Created": h.created,
                "CreatedBy": h.created_by,
                "Tags": if h.tags.is_empty() { Value::Null } else { json!(h.tags) },
                "Size": h.size,
                "Comment": h.comment,
            })
        })
        .collect();
    Ok(axum::Json(out).into_response())
}

/// `GET /images/{name}/get` and `GET /images/get?names=…`: a docker-archive
/// tar of the images, streamed as it is written.
pub(crate) async fn save(s: &AppState, names: Vec<String>) -> ApiResult<Response> {
    if names.is_empty() {
        return Err(ApiError::bad("no images named"));
    }
    let images = s.engine.images();
    // Resolve first, so a missing image is a 404 rather than a cut stream.
    for n in &names {
        let (store, n2) = (images.clone(), n.clone());
        tokio::task::spawn_blocking(move || store.resolve(&n2))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    }
    let (writer, reader) = tokio::io::duplex(256 * 1024);
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let out = tokio_util::io::SyncIoBridge::new(writer);
        if let Err(e) = images.save(&refs, out) {
            tracing::warn!("docker save: {e}");
        }
    });
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(reader));
    Ok(([(header::CONTENT_TYPE, "application/x-tar")], body).into_response())
}

/// The one `until` value of a prune filter, as unix seconds.
pub(crate) fn until_filter(values: &[String]) -> ApiResult<i64> {
    let [u] = values else {
        return Err(ApiError::bad("more than one until filter specified"));
    };
    unix_from_filter(u)
}

pub(crate) fn unix_from_filter(v: &str) -> ApiResult<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(v) {
        return Ok(t.timestamp());
    }
    if let Ok(secs) = v.split('.').next().unwrap_or("").parse::<i64>() {
        return Ok(secs);
    }
    // A Go duration before now, as Docker accepts it: 10m, 24h, 1h30m.
    let nanos = vessel_image::go_duration(v)
        .ok_or_else(|| ApiError::bad(format!("invalid filter 'until={v}'")))?;
    Ok(chrono::Utc::now().timestamp() - nanos / 1_000_000_000)
}

/// `POST /images/prune`.
pub(crate) async fn prune(s: &AppState, q: &Query) -> ApiResult<Response> {
    let filters = parse_filters(q)?;
    let dangling_only = !filters
        .get("dangling")
        .is_some_and(|v| v.iter().any(|d| matches!(d.as_str(), "false" | "0")));
    let mut pf = vessel_image::PruneFilters::default();
    for (k, vals) in &filters {
        match k.as_str() {
            "dangling" => {}
            "label" => pf.labels.extend(vals.iter().cloned()),
            "label!" => pf.labels_not.extend(vals.iter().cloned()),
            "until" => pf.until = Some(until_filter(vals)?),
            other => return Err(ApiError::bad(format!("invalid filter '{other}'"))),
        }
    }
    let in_use = s.engine.images_in_use();
    let images = s.engine.images();
    let report = tokio::task::spawn_blocking(move || images.prune(dangling_only, &in_use, &pf))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    s.engine.image_removed();
    let deleted: Vec<Value> = report
        .deleted
        .iter()
        .map(|d| match d {
            vessel_image::DeleteItem::Untagged(t) => {
                image_event(&s.engine, "untag", t);
                json!({ "Untagged": t })
            }
            vessel_image::DeleteItem::Deleted(t) => {
                image_event(&s.engine, "delete", t);
                json!({ "Deleted": t })
            }
        })
        .collect();
    Ok(axum::Json(json!({
        "ImagesDeleted": if deleted.is_empty() { Value::Null } else { json!(deleted) },
        "SpaceReclaimed": report.space_reclaimed,
    }))
    .into_response())
}

fn summary(s: &AppState, i: vessel_image::Image, shared: i64) -> ImageSummary {
    ImageSummary {
        containers: s.engine.image_users(&i.id).len() as i64,
        created: i.created_unix(),
        labels: i.config.labels.clone().into_iter().collect(),
        id: i.id,
        parent_id: String::new(),
        repo_tags: i.repo_tags,
        repo_digests: i.repo_digests,
        size: i.size as i64,
        shared_size: shared,
        manifests: None,
        descriptor: None,
    }
}

/// `GET /images/json` with Docker's filters: `dangling`, `label`,
/// `reference`, `before`, `since`.
pub(crate) async fn list(s: &AppState, q: &Query) -> ApiResult<Response> {
    let filters = parse_filters(q)?;
    let images = s.engine.images();
    let all = tokio::task::spawn_blocking({
        let images = images.clone();
        move || images.list()
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let created_of = |name: &str| -> ApiResult<i64> {
        images
            .resolve(name)
            .map(|i| i.created_unix())
            .map_err(ApiError::from)
    };
    let mut before = None;
    let mut since = None;
    let mut until: Vec<i64> = vec![];
    let mut dangling = None;
    for (k, vals) in &filters {
        match k.as_str() {
            "before" => before = vals.first().map(|v| created_of(v)).transpose()?,
            "since" => since = vals.first().map(|v| created_of(v)).transpose()?,
            "until" => {
                until = vals
                    .iter()
                    .map(|v| unix_from_filter(v))
                    .collect::<ApiResult<_>>()?
            }
            // As dockerd: true or false, nothing else.
            "dangling" => {
                dangling = match vals.first().map(String::as_str) {
                    Some("true" | "1") => Some(true),
                    Some("false" | "0") => Some(false),
                    other => {
                        return Err(ApiError::bad(format!(
                            "invalid filter 'dangling={}'",
                            other.unwrap_or_default()
                        )))
                    }
                }
            }
            "label" | "reference" => {}
            other => return Err(ApiError::bad(format!("invalid filter '{other}'"))),
        }
    }
    let labels = filters.get("label").cloned().unwrap_or_default();
    let refs = filters.get("reference").cloned().unwrap_or_default();
    let out: Vec<ImageSummary> = all
        .into_iter()
        .filter(|i| dangling.is_none_or(|d| i.is_dangling() == d))
        .filter(|i| labels.iter().all(|l| i.matches_label(l)))
        .filter(|i| {
            refs.is_empty()
                || refs.iter().any(|pattern| {
                    i.repo_tags
                        .iter()
                        .chain(i.repo_digests.iter())
                        .any(|t| reference_matches(pattern, t))
                })
        })
        .filter(|i| before.is_none_or(|b| i.created_unix() < b))
        .filter(|i| since.is_none_or(|b| i.created_unix() > b))
        .filter(|i| until.iter().all(|u| i.created_unix() < *u))
        .map(|i| summary(s, i, -1))
        .collect();
    Ok(axum::Json(out).into_response())
}

/// Docker's `reference` filter: a shell pattern against the familiar name
/// with tag (`busybox:*`), or against the name alone (`busybox`).
fn reference_matches(pattern: &str, tagged: &str) -> bool {
    let name = tagged
        .rsplit_once('@')
        .map(|(n, _)| n)
        .or_else(|| tagged.rsplit_once(':').map(|(n, _)| n))
        .unwrap_or(tagged);
    glob(pattern, tagged) || glob(pattern, name)
}

/// `*` and `?` shell patterns (`*` does not cross `/`, as Go's path.Match).
fn glob(p: &str, s: &str) -> bool {
    fn go(p: &[char], s: &[char]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some('*'), _) => go(&p[1..], s) || (!s.is_empty() && s[0] != '/' && go(p, &s[1..])),
            (Some('?'), Some(c)) if *c != '/' => go(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &s[1..]),
            _ => false,
        }
    }
    let p: Vec<char> = p.chars().collect();
    let s: Vec<char> = s.chars().collect();
    go(&p, &s)
}

/// `GET /system/df`.
pub(crate) async fn system_df(s: &AppState) -> ApiResult<Response> {
    let images = s.engine.images();
    let usage = tokio::task::spawn_blocking(move || images.disk_usage())
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let image_list: Vec<ImageSummary> = usage
        .images
        .into_iter()
        .map(|u| summary(s, u.image, u.shared_size as i64))
        .collect();
    let containers = s
        .engine
        .list(true, &HashMap::new())
        .map_err(ApiError::from)?;
    Ok(axum::Json(json!({
        "LayersSize": usage.layers_size,
        "Images": image_list,
        "Containers": containers,
        "Volumes": s.engine.volumes_disk_usage().await?,
        "BuildCache": [],
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn until_takes_timestamps_and_go_durations_before_now() {
        assert_eq!(unix_from_filter("1700000000").ok(), Some(1_700_000_000));
        assert_eq!(unix_from_filter("1700000000.5").ok(), Some(1_700_000_000));
        assert_eq!(
            unix_from_filter("2023-11-14T22:13:20Z").ok(),
            Some(1_700_000_000)
        );
        let now = chrono::Utc::now().timestamp();
        let ago = |v: &str| unix_from_filter(v).map(|t| now - t).ok();
        assert!(
            matches!(ago("1h30m"), Some(5400..=5401)),
            "{:?}",
            ago("1h30m")
        );
        assert!(matches!(ago("90s"), Some(90..=91)));
        assert!(matches!(ago("1500ms"), Some(1..=2)));
        for bad in ["soon", "1x", "1h30", ""] {
            let e = unix_from_filter(bad).expect_err(bad);
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.message, format!("invalid filter 'until={bad}'"));
        }
    }

    #[test]
    fn prune_refuses_two_until_filters() {
        let two = ["1h".to_string(), "2h".to_string()];
        let e = until_filter(&two).expect_err("two values");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.message, "more than one until filter specified");
        assert!(until_filter(&two[..1]).is_ok());
    }
}
