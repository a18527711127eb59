//! Blob reads and deletes: `HEAD`/`GET`/`DELETE /v2/<name>/blobs/<digest>`, with
//! single `Range` requests answered 206.

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use oci::{Digest, ErrorCode, RepoName};

use super::{RegistryError, Result};
use crate::app::AppState;
use crate::body::parse_range;
use crate::upstream::{BlobAnswer, Route, Served};

fn blob_response(status: StatusCode, digest: &Digest, len: u64, body: Body) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
            (header::ACCEPT_RANGES, "bytes".to_owned()),
            (
                header::HeaderName::from_static("docker-content-digest"),
                digest.to_string(),
            ),
        ],
        body,
    )
        .into_response()
}

/// `307` to where the blob can be read directly.
fn redirect(digest: &Digest, url: &str) -> Response {
    (
        StatusCode::TEMPORARY_REDIRECT,
        [
            (header::LOCATION, url.to_owned()),
            (
                header::HeaderName::from_static("docker-content-digest"),
                digest.to_string(),
            ),
        ],
    )
        .into_response()
}

/// `HEAD /v2/<name>/blobs/<digest>`: existence and size, no body.
pub async fn head_blob(state: &AppState, repo: &RepoName, digest: &Digest) -> Result {
    let size = match state.upstreams.route(&state.store, repo, false).await? {
        Some(route) => route.blob_size(&state.store, digest).await?,
        None => state.store.open_blob(repo, digest).await?.size,
    };
    Ok(blob_response(StatusCode::OK, digest, size, Body::empty()))
}

/// `GET` of a blob in a mirrored repository: from disk, or followed while it is filled
/// (a `Range` is then ignored: the whole blob is sent, as the spec allows).
async fn get_mirrored_blob(
    state: &AppState,
    route: Route<'_>,
    digest: &Digest,
    request: &Parts,
) -> Result {
    match route.blob(&state.store, digest).await? {
        BlobAnswer::Stored(blob) => {
            let mut response = send_blob(blob, digest, request).await?;
            response.extensions_mut().insert(Served::Hit);
            Ok(response)
        }
        BlobAnswer::Filling(mut fill) => {
            let size = fill
                .size()
                .await
                .map_err(|e| route.absent(e, store::error::Missing::Blob))?;
            let body = Body::from_stream(fill.stream());
            let mut response = blob_response(StatusCode::OK, digest, size, body);
            response.extensions_mut().insert(Served::Filled);
            Ok(response)
        }
    }
}

/// `GET /v2/<name>/blobs/<digest>`, optionally with `Range: bytes=…`.
pub async fn get_blob(
    state: &AppState,
    repo: &RepoName,
    digest: &Digest,
    request: &Parts,
) -> Result {
    match state.upstreams.route(&state.store, repo, false).await? {
        Some(route) => get_mirrored_blob(state, route, digest, request).await,
        None => send_blob(state.store.open_blob(repo, digest).await?, digest, request).await,
    }
}

/// Send a stored blob, or the `Range` of it asked for.
async fn send_blob(blob: store::BlobRead, digest: &Digest, request: &Parts) -> Result {
    let size = blob.size;
    let headers = &request.headers;
    let range = match headers.get(header::RANGE).map(|v| v.to_str().unwrap_or("")) {
        None => None,
        Some(value) => parse_range(value, size).map_err(|()| {
            RegistryError::new(
                ErrorCode::RangeInvalid,
                format!("range {value:?} not satisfiable"),
            )
            .with_header(header::CONTENT_RANGE, format!("bytes */{size}"))
        })?,
    };
    // The object store serves the bytes itself (the client sends its `Range` there).
    if let Some(url) = blob.redirect().await? {
        return Ok(redirect(digest, &url));
    }
    let Some(range) = range else {
        let body = Body::from_stream(blob.stream(None).await?);
        return Ok(blob_response(StatusCode::OK, digest, size, body));
    };
    let body = Body::from_stream(blob.stream(Some(range)).await?);
    let mut response = blob_response(StatusCode::PARTIAL_CONTENT, digest, range.len, body);
    let content_range = format!(
        "bytes {}-{}/{size}",
        range.start,
        range.start + range.len - 1
    );
    if let Ok(value) = content_range.parse() {
        response.headers_mut().insert(header::CONTENT_RANGE, value);
    }
    Ok(response)
}

/// `DELETE /v2/<name>/blobs/<digest>`: unlink from the repository.
pub async fn delete_blob(state: &AppState, repo: &RepoName, digest: &Digest) -> Result {
    state.store.delete_blob(repo, digest).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}
