//! The legacy v1 REST API under `/_apis/artifactcache/`: lookup, reserve, chunked
//! upload (`PATCH` with `Content-Range`, in any order and in parallel), commit, list.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::{ActionsError, Caller, UrlUse, entry_id, rfc3339};
use crate::app::AppState;
use crate::body::{byte_stream, drain_on_drop};

/// Largest JSON body accepted.
const MAX_JSON: usize = 64 * 1024;

type Result<T = Response> = std::result::Result<T, ActionsError>;

#[derive(Debug, Default, Deserialize)]
struct Query {
    keys: Option<String>,
    key: Option<String>,
    version: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Reserve {
    key: String,
    version: String,
    cache_size: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Commit {
    size: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Found {
    cache_key: String,
    scope: String,
    cache_version: String,
    creation_time: String,
    archive_location: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Listed {
    cache_key: String,
    cache_version: String,
    scope: String,
    creation_time: String,
}

/// Serve any `/_apis/artifactcache/...` request.
pub(super) async fn dispatch(State(state): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = drain_on_drop(body);
    handle(&state, &parts, body)
        .await
        .unwrap_or_else(|e| super::refuse(&state, &parts, e, ActionsError::v1))
}

async fn handle(state: &AppState, parts: &Parts, body: Body) -> Result {
    let path = parts
        .uri
        .path()
        .trim_start_matches("/_apis/artifactcache/")
        .trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').collect();
    let query: Query = serde_urlencoded::from_str(parts.uri.query().unwrap_or(""))
        .map_err(|e| ActionsError::Invalid(format!("malformed query: {e}")))?;
    let caller = Caller::of(state, parts).await?;
    let result = match (&parts.method, segments.as_slice()) {
        (&Method::GET, ["cache"]) => lookup(state, &caller, parts, query).await,
        (&Method::GET, ["caches"]) => list(state, &caller, query).await,
        (&Method::POST, ["caches"]) => match json(body).await {
            Ok(request) => reserve(state, &caller, request).await,
            Err(e) => Err(e),
        },
        (&Method::PATCH, ["caches", id]) => upload(state, &caller, parts, id, body).await,
        (&Method::POST, ["caches", id]) => match json(body).await {
            Ok(request) => commit(state, &caller, id, request).await,
            Err(e) => Err(e),
        },
        _ => Err(ActionsError::NoRoute(format!(
            "no {} {} in the cache API",
            parts.method,
            parts.uri.path()
        ))),
    };
    Ok(caller.answer(state, parts, result, ActionsError::v1))
}

async fn json<T: serde::de::DeserializeOwned>(body: Body) -> Result<T> {
    let bytes = axum::body::to_bytes(body, MAX_JSON)
        .await
        .map_err(|e| ActionsError::Malformed(format!("request body: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ActionsError::Malformed(format!("request body: {e}")))
}

/// `GET cache?keys=k1,k2&version=v`: 200 with the entry, or 204.
async fn lookup(state: &AppState, caller: &Caller, parts: &Parts, query: Query) -> Result {
    let keys = query
        .keys
        .ok_or_else(|| ActionsError::Invalid("`keys` is required".into()))?
        .split(',')
        .map(str::to_owned)
        .collect();
    let version = query
        .version
        .ok_or_else(|| ActionsError::Invalid("`version` is required".into()))?;
    let Some(entry) = caller.restore(state, keys, version).await? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let location = state.actions.signed_url(
        parts,
        UrlUse::Download,
        entry.id,
        caller.grant.session.as_deref(),
    )?;
    let scope = super::scope_header(&entry);
    let mut response = axum::Json(Found {
        cache_key: entry.key,
        scope: entry.scope,
        cache_version: entry.version,
        creation_time: rfc3339(entry.created_ms),
        archive_location: location,
    })
    .into_response();
    response.headers_mut().extend(scope);
    Ok(response)
}

/// `GET caches?key=k`: the entries with that key in the readable scopes.
async fn list(state: &AppState, caller: &Caller, query: Query) -> Result {
    let key = query
        .key
        .ok_or_else(|| ActionsError::Invalid("`key` is required".into()))?;
    let entries = state
        .store
        .list_entries(
            &caller.grant.repository,
            caller.grant.read.clone(),
            vec![key.clone()],
        )
        .await?;
    let listed: Vec<Listed> = entries
        .into_iter()
        .filter(|e| e.key == key)
        .map(|e| Listed {
            cache_key: e.key,
            cache_version: e.version,
            scope: e.scope,
            creation_time: rfc3339(e.created_ms),
        })
        .collect();
    Ok(axum::Json(serde_json::json!({
        "totalCount": listed.len(),
        "artifactCaches": listed,
    }))
    .into_response())
}

/// `POST caches {key, version, cacheSize}`: 201 with the new entry's id.
async fn reserve(state: &AppState, caller: &Caller, request: Reserve) -> Result {
    let limit = state.actions.max_entry_size();
    if let Some(size) = request.cache_size.filter(|&s| s > limit) {
        return Err(ActionsError::Invalid(format!(
            "a cache of {size} bytes is over the {limit}-byte limit"
        )));
    }
    let entry = caller.create(state, &request.key, &request.version).await?;
    Ok((
        StatusCode::CREATED,
        axum::Extension(caller.event("cache.create", &entry, None)),
        axum::Json(serde_json::json!({ "cacheId": entry.id })),
    )
        .into_response())
}

/// The first and last byte a `Content-Range: bytes S-E/*` names.
pub(crate) fn content_range(parts: &Parts) -> Result<(u64, u64)> {
    let value = parts
        .headers
        .get(axum::http::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ActionsError::Invalid("Content-Range is required".into()))?;
    let bad = || ActionsError::Invalid(format!("malformed Content-Range {value:?}"));
    let (range, _total) = value
        .trim()
        .strip_prefix("bytes ")
        .and_then(|r| r.split_once('/'))
        .ok_or_else(bad)?;
    let (first, last) = range.split_once('-').ok_or_else(bad)?;
    let first: u64 = first.trim().parse().map_err(|_| bad())?;
    let last: u64 = last.trim().parse().map_err(|_| bad())?;
    // A last byte at u64::MAX would make a chunk longer than any size can say.
    if last < first || last == u64::MAX {
        return Err(bad());
    }
    Ok((first, last))
}

/// `PATCH caches/{id}` with `Content-Range`: store one chunk.
async fn upload(state: &AppState, caller: &Caller, parts: &Parts, id: &str, body: Body) -> Result {
    let entry = caller.own_entry(state, entry_id(id)?).await?;
    let (first, last) = content_range(parts)?;
    // `@actions/cache` sends its chunks without a `Content-Length`.
    crate::body::expect_len(&parts.extensions, last - first + 1);
    state
        .store
        .put_entry_part(
            entry.id,
            first,
            Some(last - first + 1),
            false,
            byte_stream(body),
            state.actions.max_entry_size(),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST caches/{id} {size}`: finish the entry.
async fn commit(state: &AppState, caller: &Caller, id: &str, request: Commit) -> Result {
    let entry = caller.own_entry(state, entry_id(id)?).await?;
    caller.finish(state, &entry, request.size).await?;
    let event = caller.event("cache.save", &entry, Some(request.size));
    Ok((StatusCode::NO_CONTENT, axum::Extension(event)).into_response())
}
