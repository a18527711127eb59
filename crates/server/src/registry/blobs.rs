//! Blob reads and deletes: `HEAD`/`GET`/`DELETE /v2/<name>/blobs/<digest>`, with
//! single `Range` requests answered 206.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use oci::{Digest, ErrorCode, RepoName};

use super::{RegistryError, Result};
use crate::app::AppState;
use crate::body::parse_range;

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

/// `HEAD /v2/<name>/blobs/<digest>`: existence and size, no body.
pub async fn head_blob(state: &AppState, repo: &RepoName, digest: &Digest) -> Result {
    let blob = state.store.open_blob(repo, digest).await?;
    Ok(blob_response(
        StatusCode::OK,
        digest,
        blob.size,
        Body::empty(),
    ))
}

/// `GET /v2/<name>/blobs/<digest>`, optionally with `Range: bytes=…`.
pub async fn get_blob(
    state: &AppState,
    repo: &RepoName,
    digest: &Digest,
    headers: &HeaderMap,
) -> Result {
    let blob = state.store.open_blob(repo, digest).await?;
    let size = blob.size;
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
