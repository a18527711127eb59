//! Blob reads and deletes: `HEAD`/`GET`/`DELETE /v2/<name>/blobs/<digest>`, with
//! single `Range` requests answered 206.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use oci::{Digest, ErrorCode, RepoName};
use store::ByteRange;

use super::{RegistryError, Result};
use crate::app::AppState;

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

/// Parse one `bytes=` range against `size`. `Ok(None)` means "serve it all" (a form we
/// may ignore, such as several ranges); `Err` means unsatisfiable or malformed.
fn parse_range(value: &str, size: u64) -> std::result::Result<Option<ByteRange>, ()> {
    let spec = value.trim().strip_prefix("bytes=").ok_or(())?;
    if spec.contains(',') {
        return Ok(None);
    }
    let (first, last) = spec.split_once('-').ok_or(())?;
    let num = |s: &str| s.trim().parse::<u64>().map_err(|_| ());
    let (start, end) = match (first.trim().is_empty(), last.trim().is_empty()) {
        (false, true) => (num(first)?, size.checked_sub(1).ok_or(())?),
        (false, false) => (num(first)?, num(last)?.min(size.saturating_sub(1))),
        (true, false) => {
            let suffix = num(last)?.min(size);
            if suffix == 0 {
                return Err(());
            }
            (size - suffix, size - 1)
        }
        (true, true) => return Err(()),
    };
    if start >= size || end < start {
        return Err(());
    }
    Ok(Some(ByteRange {
        start,
        len: end - start + 1,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, len: u64) -> std::result::Result<Option<ByteRange>, ()> {
        Ok(Some(ByteRange { start, len }))
    }

    #[test]
    fn byte_ranges_follow_rfc_9110() {
        assert_eq!(parse_range("bytes=0-9", 100), r(0, 10));
        assert_eq!(parse_range("bytes=90-", 100), r(90, 10));
        assert_eq!(parse_range("bytes=-10", 100), r(90, 10));
        assert_eq!(parse_range("bytes=95-200", 100), r(95, 5));
        assert_eq!(parse_range("bytes=-500", 100), r(0, 100));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ok(None));
        for bad in [
            "bytes=100-",
            "bytes=5-2",
            "bytes=-0",
            "bytes=-",
            "items=0-1",
            "bytes=a-b",
            "bytes=0-1-2",
        ] {
            assert_eq!(parse_range(bad, 100), Err(()), "{bad}");
        }
        assert_eq!(parse_range("bytes=0-", 0), Err(()));
    }
}
