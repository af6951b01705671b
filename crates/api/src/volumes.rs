//! The volume endpoints: `GET /volumes`, `POST /volumes/create`,
//! `GET /volumes/{name}`, `DELETE /volumes/{name}`, `POST /volumes/prune`.

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bollard_stubs::models::{VolumeCreateRequest, VolumeListResponse, VolumePruneResponse};

use super::{parse_filters, ApiError, ApiResult, ApiVersion, AppState, Query};

/// The volume routes.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/volumes", get(list))
        .route("/volumes/create", post(create))
        .route("/volumes/prune", post(prune))
        .route("/volumes/{name}", get(inspect).delete(remove))
}

async fn list(State(s): State<AppState>, req: Request) -> ApiResult<Response> {
    let q = Query::of(req.uri());
    let volumes = s.engine.volume_list(&parse_filters(&q)?)?;
    Ok(axum::Json(VolumeListResponse {
        volumes: Some(volumes),
        warnings: Some(vec![]),
    })
    .into_response())
}

async fn create(State(s): State<AppState>, req: Request) -> ApiResult<Response> {
    let bytes = axum::body::to_bytes(req.into_body(), 1024 * 1024)
        .await
        .map_err(|e| ApiError::bad(format!("reading request body: {e}")))?;
    let body: VolumeCreateRequest = if bytes.is_empty() {
        VolumeCreateRequest::default()
    } else {
        serde_json::from_slice(&bytes).map_err(|e| ApiError::bad(format!("invalid JSON: {e}")))?
    };
    let v = s.engine.volume_create(body).await?;
    Ok((StatusCode::CREATED, axum::Json(v)).into_response())
}

async fn inspect(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(axum::Json(s.engine.volume_inspect(&name)?).into_response())
}

async fn remove(
    State(s): State<AppState>,
    Path(name): Path<String>,
    req: Request,
) -> ApiResult<StatusCode> {
    let q = Query::of(req.uri());
    s.engine.volume_remove(&name, q.flag("force")).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn prune(State(s): State<AppState>, req: Request) -> ApiResult<Response> {
    let q = Query::of(req.uri());
    // API 1.42 made prune keep named volumes unless `all=true`.
    let version = req
        .extensions()
        .get::<ApiVersion>()
        .map_or(crate::version::MAX_VERSION, |v| v.0);
    let (deleted, freed) = s
        .engine
        .volume_prune(&parse_filters(&q)?, version >= (1, 42))
        .await?;
    Ok(axum::Json(VolumePruneResponse {
        volumes_deleted: Some(deleted),
        space_reclaimed: Some(freed as i64),
    })
    .into_response())
}
