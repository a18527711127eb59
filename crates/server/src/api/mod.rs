//! layercache's own JSON API under `/api/v1`: build sessions, the store's usage (now
//! and over the last day), eviction passes, and per-repository figures (what each
//! holds, what builds read from it, its hit ratio over time) and what each upstream
//! did, for the dashboard.

mod stats;

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use store::{GcReport, Quota, Trigger, Usage};

use crate::app::AppState;
use crate::audit::{Event, Who};
use crate::auth::Identity;
use crate::sessions::Session;
use crate::ui::{UsageSample, history};
use crate::upstream::UpstreamStats;

/// The audit log's route (for administrators only, whatever the method).
pub(crate) const AUDIT_ROUTE: &str = "/api/v1/audit";

/// The API's routes.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route(AUDIT_ROUTE, get(audit_log))
        .route("/api/v1/gc", get(gc_status).post(run_gc))
        .route("/api/v1/sessions", get(list_sessions))
        .route("/api/v1/sessions/{id}", get(one_session))
        .route("/api/v1/usage/history", get(usage_history))
        .route("/api/v1/repositories", get(list_repositories))
        .route("/api/v1/hit-ratio", get(hit_ratio))
        .route("/api/v1/upstreams", get(list_upstreams))
}

/// `GET /api/v1/upstreams`: what each upstream did since the server started (hits,
/// fills and bytes fetched).
async fn list_upstreams(State(state): State<AppState>) -> Json<Vec<UpstreamStats>> {
    Json(state.upstreams.stats())
}

#[derive(Debug, Deserialize)]
struct SessionFilter {
    /// Active since (seconds since the epoch).
    #[serde(default)]
    since: i64,
    repo: Option<String>,
    session: Option<String>,
    /// Most sessions to answer.
    limit: Option<usize>,
}

/// `GET /api/v1/sessions[?since=SECONDS][&repo=R][&session=NAME_OR_ID][&limit=N]`: most
/// recent first.
async fn list_sessions(
    State(state): State<AppState>,
    Query(filter): Query<SessionFilter>,
) -> Result<Json<Vec<Session>>, ApiError> {
    let mut sessions = state
        .sessions
        .list(
            filter.since,
            filter.repo.as_deref(),
            filter.session.as_deref(),
        )
        .await?;
    sessions.truncate(filter.limit.unwrap_or(usize::MAX));
    Ok(Json(sessions))
}

#[derive(Debug, Deserialize)]
struct HistoryParams {
    /// Samples taken since (seconds since the epoch).
    #[serde(default)]
    since: i64,
    /// Most samples to answer (consecutive ones are merged beyond).
    points: Option<usize>,
}

/// `GET /api/v1/usage/history[?since=SECONDS][&points=N]`: the store's usage and quota
/// sampled every 10 s over the last day, oldest first (at most 720 points unless asked).
async fn usage_history(
    State(state): State<AppState>,
    Query(params): Query<HistoryParams>,
) -> Json<Vec<UsageSample>> {
    let points = params.points.unwrap_or(720).min(history::CAPACITY);
    Json(state.usage_history.since(params.since, points))
}

#[derive(Debug, Deserialize)]
struct SessionsSince {
    /// Sessions active since (seconds since the epoch).
    #[serde(default)]
    since: i64,
    /// Width of a hit-ratio bucket in seconds (chosen from the span when absent).
    bucket: Option<i64>,
}

/// `GET /api/v1/repositories[?since=SECONDS]`: every repository that holds something or
/// was used by a session since then, with bytes stored, sessions, bytes served, written
/// and avoided, hits and misses; largest first.
async fn list_repositories(
    State(state): State<AppState>,
    Query(params): Query<SessionsSince>,
) -> Result<Json<Vec<stats::RepoStats>>, ApiError> {
    let usage = state.store.repository_usage().await?;
    let sessions = state.sessions.list(params.since, None, None).await?;
    Ok(Json(stats::repositories(usage, &sessions)))
}

/// `GET /api/v1/hit-ratio[?since=SECONDS][&bucket=SECONDS]`: each repository's manifest
/// hit ratio over time, from the sessions active since then, bucketed by session end.
async fn hit_ratio(
    State(state): State<AppState>,
    Query(params): Query<SessionsSince>,
) -> Result<Json<stats::HitRatios>, ApiError> {
    let sessions = state.sessions.list(params.since, None, None).await?;
    Ok(Json(stats::hit_ratios(
        &sessions,
        params.bucket,
        crate::now_ms(),
    )))
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

/// `POST /api/v1/gc[?dry_run=true]`: run one pass now and report it (in the audit log
/// too, with who asked).
async fn run_gc(
    State(state): State<AppState>,
    Query(params): Query<GcParams>,
    extensions: axum::http::Extensions,
) -> Result<Json<GcReport>, ApiError> {
    let pass = state.store.gc(Trigger::Manual, params.dry_run).await;
    let identity = extensions.get::<Arc<Identity>>().map(Arc::as_ref);
    let client = crate::sessions::remote_addr(&extensions);
    let (status, detail, reason) = match &pass {
        Ok(report) => (
            StatusCode::OK,
            serde_json::json!({
                "dry_run": report.dry_run,
                "roots_evicted": report.evicted.len() + report.evicted_entries.len(),
                "blobs_removed": report.blobs_removed,
                "bytes_freed": report.bytes_freed,
            }),
            None,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({ "dry_run": params.dry_run }),
            Some(e.to_string()),
        ),
    };
    let event = Event {
        action: "gc",
        detail: Some(detail),
        reason,
        ..Event::default()
    };
    let who = Who::of(identity, client);
    state
        .audit
        .record(&who, &Method::POST, "/api/v1/gc", status, event);
    Ok(Json(pass?))
}

#[derive(Debug, Deserialize)]
struct AuditParams {
    /// Lines recorded since: seconds since the epoch, or an RFC 3339 time.
    since: Option<String>,
    /// Most lines to answer (the newest).
    limit: Option<usize>,
}

/// Lines answered when no limit is asked for.
const AUDIT_LIMIT: usize = 10_000;

/// `GET /api/v1/audit[?since=SECONDS|RFC3339][&limit=N]`: the audit log's lines as
/// stored (`application/x-ndjson`), oldest first, across the current and rotated files;
/// the newest `limit` (10000 unless asked).
async fn audit_log(
    State(state): State<AppState>,
    Query(params): Query<AuditParams>,
) -> Result<Response, ApiError> {
    let since = match params.since.as_deref() {
        None | Some("") => None,
        Some(text) => Some(match text.parse::<u64>() {
            Ok(seconds) => std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds),
            Err(_) => humantime::parse_rfc3339_weak(text).map_err(|e| {
                ApiError::Invalid(format!(
                    "since {text:?}: neither seconds since the epoch nor an RFC 3339 time: {e}"
                ))
            })?,
        }),
    };
    let limit = params.limit.unwrap_or(AUDIT_LIMIT);
    let lines = state
        .audit
        .read(since, limit)
        .await
        .ok_or_else(|| ApiError::NotFound("the audit log is off ([server.audit])".into()))?
        .map_err(|e| ApiError::Store(store::Error::Io(e)))?;
    let mut body = lines.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

/// A failure of the JSON API, answered as `{"error": "..."}`.
#[derive(Debug)]
pub(crate) enum ApiError {
    /// What was asked for does not exist.
    NotFound(String),
    /// The request is not valid.
    Invalid(String),
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
            ApiError::Invalid(message) => (StatusCode::BAD_REQUEST, message),
            ApiError::Store(e) => {
                tracing::error!(error = %e, "api request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        };
        (status, Json(serde_json::json!({ "error": message }))).into_response()
    }
}
