//! Probes for whatever runs the server (a container's `HEALTHCHECK`, Kubernetes, a load
//! balancer): `GET /healthz` answers while the process serves HTTP and touches nothing
//! else; `GET /readyz` answers `200` only when the store's metadata and blobs answer.
//! Both are open in every auth mode (they tell nothing but up or down), and sit outside
//! the request layer: a probe every few seconds is not counted in the metrics, logged
//! per request, or recorded in a build session.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::app::AppState;

/// The liveness probe's path.
pub const LIVE_PATH: &str = "/healthz";
/// The readiness probe's path.
pub const READY_PATH: &str = "/readyz";
/// How long the store has to answer a readiness probe (a database that does not answer
/// at all must not hold the probe until the prober's own timeout).
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// The two probe routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route(LIVE_PATH, get(live))
        .route(READY_PATH, get(ready))
}

/// `GET /healthz`: the process is up and serving.
async fn live() -> Response {
    probe(StatusCode::OK, "ok")
}

/// `GET /readyz`: the store answers; `503` (and a warning in the log) when it does not.
async fn ready(State(state): State<AppState>) -> Response {
    match tokio::time::timeout(READY_TIMEOUT, state.store.ready()).await {
        Ok(Ok(())) => probe(StatusCode::OK, "ready"),
        Ok(Err(e)) => unready(&e),
        Err(_) => unready(&format!(
            "the store did not answer within {}",
            humantime::format_duration(READY_TIMEOUT)
        )),
    }
}

/// The readiness failure, logged in full; the prober only learns that the store is not
/// ready (the probe needs no credentials, so it reveals nothing more).
fn unready(cause: &dyn std::fmt::Display) -> Response {
    tracing::warn!(error = %cause, "readiness probe: the store is not ready");
    probe(StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
}

/// `{"status":"…"}` with `status`, never cached.
fn probe(code: StatusCode, status: &str) -> Response {
    (
        code,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(serde_json::json!({ "status": status })),
    )
        .into_response()
}
