//! The v2 twirp service `github.actions.results.api.v1.CacheService`, JSON encoding:
//! proto field names (lowerCamel accepted too), int64 as a string or a number on input
//! and a string on output, defaults left out, errors as `{"code", "msg"}`.

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Deserializer, Serialize};
use store::Entry;

use super::{ActionsError, Caller, UrlUse, rfc3339};
use crate::app::AppState;
use crate::audit::Event;
use crate::body::drain_on_drop;

/// Largest request body accepted.
const MAX_JSON: usize = 256 * 1024;

type Result<T = Response> = std::result::Result<T, ActionsError>;

/// An int64 as proto3 JSON allows it: a number or a decimal string.
fn int64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int64 {
        Number(i64),
        Text(String),
    }
    match Int64::deserialize(d)? {
        Int64::Number(n) => Ok(n),
        Int64::Text(s) => s.trim().parse().map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct KeyRequest {
    key: String,
    #[serde(alias = "restoreKeys")]
    restore_keys: Vec<String>,
    version: String,
    #[serde(alias = "sizeBytes", deserialize_with = "int64")]
    size_bytes: i64,
}

#[derive(Debug, Default, Serialize)]
struct Reply {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    ok: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    signed_upload_url: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    signed_download_url: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    matched_key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    entry_id: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    message: String,
}

/// A `CacheEntry` message.
#[derive(Debug, Serialize)]
struct CacheEntry {
    key: String,
    size_bytes: String,
    scope: String,
    version: String,
    created_at: String,
    last_accessed_at: String,
}

impl From<Entry> for CacheEntry {
    fn from(e: Entry) -> Self {
        CacheEntry {
            size_bytes: e.size.unwrap_or(0).to_string(),
            created_at: rfc3339(e.created_ms),
            last_accessed_at: rfc3339(e.last_used.saturating_mul(1000)),
            key: e.key,
            scope: e.scope,
            version: e.version,
        }
    }
}

/// Serve `POST /twirp/github.actions.results.api.v1.CacheService/{method}`.
pub(super) async fn dispatch(
    State(state): State<AppState>,
    Path(method): Path<String>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let body = drain_on_drop(body);
    handle(&state, &method, &parts, body)
        .await
        .unwrap_or_else(|e| super::refuse(&state, &parts, e, ActionsError::twirp))
}

async fn handle(state: &AppState, method: &str, parts: &Parts, body: Body) -> Result {
    const METHODS: [&str; 6] = [
        "CreateCacheEntry",
        "FinalizeCacheEntryUpload",
        "GetCacheEntryDownloadURL",
        "LookupCacheEntry",
        "ListCacheEntries",
        "DeleteCacheEntry",
    ];
    if !METHODS.contains(&method) {
        return Err(ActionsError::NoRoute(format!("no method {method}")));
    }
    // Twirp's answer to another HTTP method is its own `bad_route` error, in JSON.
    if parts.method != axum::http::Method::POST {
        return Err(ActionsError::NoRoute(format!(
            "{method} is called with POST, not {}",
            parts.method
        )));
    }
    let json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return Err(ActionsError::NoRoute(
            "only the JSON encoding (Content-Type: application/json) is served".into(),
        ));
    }
    let caller = Caller::of(state, parts).await?;
    let result = call(state, &caller, method, parts, body).await;
    Ok(caller.answer(state, parts, result, ActionsError::twirp))
}

/// Call `method` for `caller`.
async fn call(
    state: &AppState,
    caller: &Caller,
    method: &str,
    parts: &Parts,
    body: Body,
) -> Result {
    let bytes = axum::body::to_bytes(body, MAX_JSON)
        .await
        .map_err(|e| ActionsError::Malformed(format!("request body: {e}")))?;
    let request: KeyRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ActionsError::Malformed(format!("the JSON body could not be decoded: {e}")))?;
    match method {
        "CreateCacheEntry" => create(state, caller, parts, request).await,
        "FinalizeCacheEntryUpload" => finalize(state, caller, request).await,
        "GetCacheEntryDownloadURL" => download_url(state, caller, parts, request).await,
        "LookupCacheEntry" => lookup(state, caller, request).await,
        "ListCacheEntries" => list(state, caller, request).await,
        _ => delete(state, caller, request).await,
    }
}

fn reply(reply: Reply) -> Result {
    Ok(axum::Json(reply).into_response())
}

fn keys(request: &KeyRequest) -> Vec<String> {
    std::iter::once(request.key.clone())
        .chain(request.restore_keys.iter().cloned())
        .collect()
}

/// Reserve an entry; a token that may not write gets `ok: false` with GitHub's
/// `cache write denied:` message.
async fn create(state: &AppState, caller: &Caller, parts: &Parts, request: KeyRequest) -> Result {
    match caller.create(state, &request.key, &request.version).await {
        Ok(entry) => {
            let mut response = reply(Reply {
                ok: true,
                signed_upload_url: state.actions.signed_url(
                    parts,
                    UrlUse::Upload,
                    entry.id,
                    caller.grant.session.as_deref(),
                )?,
                ..Reply::default()
            })?;
            let event = caller.event("cache.create", &entry, None);
            response.extensions_mut().insert(event);
            Ok(response)
        }
        Err(e @ ActionsError::WriteDenied(_)) => {
            let mut response = reply(Reply {
                message: e.to_string(),
                ..Reply::default()
            })?;
            let mut event = Event::denied(Some(caller.grant.repository.clone()), e.to_string());
            event.reference = Some(request.key);
            response.extensions_mut().insert(event);
            Ok(response)
        }
        Err(e) => Err(e),
    }
}

async fn finalize(state: &AppState, caller: &Caller, request: KeyRequest) -> Result {
    let size = u64::try_from(request.size_bytes)
        .map_err(|_| ActionsError::Invalid("size_bytes must not be negative".into()))?;
    let key = caller.entry_key(&request.key, &request.version)?;
    let entry = state
        .store
        .entry_by_key(key)
        .await?
        .ok_or(store::Error::NotFound(store::error::Missing::Entry))?;
    let finished = caller.finish(state, &entry, size).await?;
    let mut response = reply(Reply {
        ok: true,
        entry_id: Some(finished.id.to_string()),
        ..Reply::default()
    })?;
    let event = caller.event("cache.save", &entry, Some(size));
    response.extensions_mut().insert(event);
    Ok(response)
}

async fn download_url(
    state: &AppState,
    caller: &Caller,
    parts: &Parts,
    request: KeyRequest,
) -> Result {
    let found = caller
        .restore(state, keys(&request), request.version)
        .await?;
    let Some(entry) = found else {
        return reply(Reply::default());
    };
    let scope = super::scope_header(&entry);
    let mut response = reply(Reply {
        ok: true,
        signed_download_url: state.actions.signed_url(
            parts,
            UrlUse::Download,
            entry.id,
            caller.grant.session.as_deref(),
        )?,
        matched_key: entry.key,
        ..Reply::default()
    })?;
    response.headers_mut().extend(scope);
    Ok(response)
}

async fn lookup(state: &AppState, caller: &Caller, request: KeyRequest) -> Result {
    let found = caller
        .restore(state, keys(&request), request.version)
        .await?;
    let body = match found {
        Some(entry) => serde_json::json!({ "exists": true, "entry": CacheEntry::from(entry) }),
        None => serde_json::json!({}),
    };
    Ok(axum::Json(body).into_response())
}

async fn list(state: &AppState, caller: &Caller, request: KeyRequest) -> Result {
    let prefixes: Vec<String> = keys(&request)
        .into_iter()
        .filter(|k| !k.is_empty())
        .collect();
    let entries = state
        .store
        .list_entries(
            &caller.grant.repository,
            caller.grant.read.clone(),
            prefixes,
        )
        .await?;
    let entries: Vec<CacheEntry> = entries.into_iter().map(CacheEntry::from).collect();
    Ok(axum::Json(serde_json::json!({ "entries": entries })).into_response())
}

/// Delete the entries with exactly `key` (every version) in the write scope.
async fn delete(state: &AppState, caller: &Caller, request: KeyRequest) -> Result {
    let scope = caller.write_scope()?.to_owned();
    super::check_key(&request.key)?;
    let entries = state
        .store
        .list_entries(
            &caller.grant.repository,
            vec![scope],
            vec![request.key.clone()],
        )
        .await?;
    let mut deleted = None;
    for entry in entries.into_iter().filter(|e| e.key == request.key) {
        if state.store.delete_entry(entry.id).await? {
            deleted = Some(entry);
        }
    }
    let entry = deleted.ok_or(store::Error::NotFound(store::error::Missing::Entry))?;
    let mut response = reply(Reply {
        ok: true,
        entry_id: Some(entry.id.to_string()),
        ..Reply::default()
    })?;
    let event = caller.event("cache.delete", &entry, None);
    response.extensions_mut().insert(event);
    Ok(response)
}
