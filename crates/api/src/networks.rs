//! The `/networks` endpoints: list, inspect, create, remove, prune,
//! connect and disconnect.

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bollard_stubs::models::{
    NetworkConnectRequest, NetworkCreateRequest, NetworkCreateResponse, NetworkDisconnectRequest,
};
use serde::de::DeserializeOwned;
use vessel_engine::NetworkFilters;

use super::{parse_filters, ApiError, ApiResult, AppState, Query};

/// The routes, to be merged into the service.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/networks", get(list))
        .route("/networks/create", post(create))
        .route("/networks/prune", post(prune))
        .route("/networks/{id}", get(inspect).delete(remove))
        .route("/networks/{id}/connect", post(connect))
        .route("/networks/{id}/disconnect", post(disconnect))
}

fn json<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid JSON: {e}")))
}

fn filters(q: &Query, allowed: &[&str]) -> ApiResult<NetworkFilters> {
    let raw = parse_filters(q)?;
    let mut f = NetworkFilters::default();
    for (k, v) in raw {
        if !allowed.contains(&k.as_str()) {
            return Err(ApiError::bad(format!("invalid filter '{k}'")));
        }
        match k.as_str() {
            "driver" => f.driver = v,
            "id" => f.id = v,
            "name" => f.name = v,
            "label" => f.label = v,
            "label!" => f.label_not = v,
            "until" => f.until = Some(super::images::until_filter(&v)?),
            "scope" => f.scope = v,
            "type" => {
                for t in &v {
                    if t != "custom" && t != "builtin" {
                        return Err(ApiError::bad(format!("invalid filter: 'type'='{t}'")));
                    }
                }
                f.kind = v
            }
            "dangling" => {
                f.dangling = match v.first().map(String::as_str) {
                    Some("true") | Some("1") => Some(true),
                    Some("false") | Some("0") => Some(false),
                    other => {
                        return Err(ApiError::bad(format!(
                            "invalid filter 'dangling={}'",
                            other.unwrap_or("")
                        )))
                    }
                }
            }
            _ => {}
        }
    }
    Ok(f)
}

async fn list(State(s): State<AppState>, req: Request) -> ApiResult<Response> {
    let q = Query::of(req.uri());
    let f = filters(
        &q,
        &["driver", "id", "name", "label", "scope", "type", "dangling"],
    )?;
    Ok(axum::Json(s.engine.networks(&f)).into_response())
}

async fn inspect(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(axum::Json(s.engine.network_inspect(&id)?).into_response())
}

async fn create(State(s): State<AppState>, body: Bytes) -> ApiResult<Response> {
    let req: NetworkCreateRequest = json(&body)?;
    let id = s.engine.network_create(req).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(NetworkCreateResponse {
            id,
            warning: String::new(),
        }),
    )
        .into_response())
}

async fn remove(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    s.engine.network_remove(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn prune(State(s): State<AppState>, req: Request) -> ApiResult<Response> {
    let q = Query::of(req.uri());
    let f = filters(&q, &["label", "label!", "until"])?;
    let deleted = s.engine.network_prune(&f).await;
    Ok(axum::Json(serde_json::json!({ "NetworksDeleted": deleted })).into_response())
}

async fn connect(
    State(s): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let req: NetworkConnectRequest = json(&body)?;
    s.engine
        .network_connect(&id, &req.container, req.endpoint_config)
        .await?;
    Ok(StatusCode::OK)
}

async fn disconnect(
    State(s): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let req: NetworkDisconnectRequest = json(&body)?;
    s.engine.network_disconnect(&id, &req.container).await?;
    Ok(StatusCode::OK)
}
