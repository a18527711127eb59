//! layercache's own JSON API under `/api/v1`: the store's usage and eviction passes.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use store::{GcReport, Quota, Trigger, Usage};

use crate::app::AppState;

/// The API's routes.
pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/api/v1/gc", get(gc_status).post(run_gc))
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
pub(crate) struct ApiError(store::Error);

impl From<store::Error> for ApiError {
    fn from(e: store::Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        tracing::error!(error = %self.0, "api request failed");
        let body = serde_json::json!({ "error": self.0.to_string() });
        (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
    }
}
