//! layercache's own JSON API under `/api/v1`: build sessions, the store's usage and
//! eviction passes.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use store::{GcReport, Quota, Trigger, Usage};

use crate::app::AppState;
use crate::sessions::Session;

/// The API's routes.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/gc", get(gc_status).post(run_gc))
        .route("/api/v1/sessions", get(list_sessions))
        .route("/api/v1/sessions/{id}", get(one_session))
}

#[derive(Debug, Deserialize)]
struct SessionFilter {
    /// Active since (seconds since the epoch).
    #[serde(default)]
    since: i64,
    repo: Option<String>,
    session: Option<String>,
}

/// `GET /api/v1/sessions[?since=SECONDS][&repo=R][&session=NAME_OR_ID]`: most recent
/// first.
async fn list_sessions(
    State(state): State<AppState>,
    Query(filter): Query<SessionFilter>,
) -> Result<Json<Vec<Session>>, ApiError> {
    let sessions = state
        .sessions
        .list(
            filter.since,
            filter.repo.as_deref(),
            filter.session.as_deref(),
        )
        .await?;
    Ok(Json(sessions))
}

/// `GET /api/v1/sessions/{id}`: one session by id (or name: the latest of that name).
async fn one_session(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Session>, ApiError> {
    let mut found = state.sessions.list(0, None, Some(&id)).await?;
    if found.is_empty() {
        return Err(ApiError::NotFound(format!("no build session {id}")));
    }
    Ok(Json(found.swap_remove(0)))
}

/// `GET /api/v1/gc`: usage now, the quota, and the last pass.
#[derive(Debug, Serialize)]
struct GcStatus {
    usage: Usage,
    quota: Quota,
    last_pass: Option<GcReport>,
}

async fn gc_status(State(state): State<AppState>) -> Result<Json<GcStatus>, ApiError> {
    let (usage, quota) = state.store.usage().await?;
    Ok(Json(GcStatus {
        usage,
        quota,
        last_pass: state.store.last_gc(),
    }))
}

#[derive(Debug, Deserialize)]
struct GcParams {
    #[serde(default)]
    dry_run: bool,
}

/// `POST /api/v1/gc[?dry_run=true]`: run one pass now and report it.
async fn run_gc(
    State(state): State<AppState>,
    Query(params): Query<GcParams>,
) -> Result<Json<GcReport>, ApiError> {
    Ok(Json(state.store.gc(Trigger::Manual, params.dry_run).await?))
}

/// A failure of the JSON API, answered as `{"error": "..."}`.
#[derive(Debug)]
pub(crate) enum ApiError {
    /// What was asked for does not exist.
    NotFound(String),
    /// The store failed.
    Store(store::Error),
}

impl From<store::Error> for ApiError {
    fn from(e: store::Error) -> Self {
        ApiError::Store(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            ApiError::NotFound(message) => (StatusCode::NOT_FOUND, message),
            ApiError::Store(e) => {
                tracing::error!(error = %e, "api request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        };
        (status, Json(serde_json::json!({ "error": message }))).into_response()
    }
}
