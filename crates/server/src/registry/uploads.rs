//! Blob uploads: `POST /v2/<name>/blobs/uploads/` (session, monolithic with `?digest=`,
//! or cross-repository `?mount=&from=`), then `PATCH` chunks with `Content-Range`,
//! `PUT ?digest=` to finish, `GET` for status and `DELETE` to cancel.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use oci::{Digest, ErrorCode, RepoName};
use store::UploadId;

use super::error::range_header;
use super::{Params, RegistryError, Result, body_len, has_body};
use crate::app::AppState;
use crate::body::byte_stream;

const UPLOAD_UUID: HeaderName = HeaderName::from_static("docker-upload-uuid");
const CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");

/// How a blob came to be in a repository, for the build session's record.
#[derive(Debug, Clone, Copy)]
pub(super) enum Stored {
    /// Uploaded: this many bytes.
    Uploaded(u64),
    /// Mounted from another repository: this many bytes not uploaded.
    Mounted(u64),
}

/// 201 for a blob now present in `repo`.
fn created(repo: &RepoName, digest: &Digest, stored: Stored) -> Response {
    (
        StatusCode::CREATED,
        [
            (header::LOCATION, format!("/v2/{repo}/blobs/{digest}")),
            (CONTENT_DIGEST, digest.to_string()),
            (header::CONTENT_LENGTH, "0".to_owned()),
        ],
        axum::Extension(stored),
    )
        .into_response()
}

/// The headers that say where an upload session holding `len` bytes stands: its
/// `Location`, the `Range` it holds and its id.
fn session_headers(repo: &RepoName, id: &UploadId, len: u64) -> [(HeaderName, String); 3] {
    [
        (header::LOCATION, format!("/v2/{repo}/blobs/uploads/{id}")),
        (header::RANGE, range_header(len)),
        (UPLOAD_UUID, id.to_string()),
    ]
}

/// Where an upload session stands: `status` with its [`session_headers`].
fn session(status: StatusCode, repo: &RepoName, id: &UploadId, len: u64) -> Response {
    (
        status,
        session_headers(repo, id, len),
        [(header::CONTENT_LENGTH, "0")],
    )
        .into_response()
}

/// A chunk refused with 416 (a malformed `Content-Range`, or one that does not start
/// where the upload stands) carries the session's headers, as the registry API's
/// description of chunked uploads has it, so the client resumes without asking first.
/// Any other error, and a session that is gone, stays as it is.
async fn resumable(
    state: &AppState,
    repo: &RepoName,
    id: &UploadId,
    error: RegistryError,
) -> RegistryError {
    if error.status() != StatusCode::RANGE_NOT_SATISFIABLE {
        return error;
    }
    match state.store.upload_offset(repo, id).await {
        Ok(len) => session_headers(repo, id, len)
            .into_iter()
            .fold(error, |error, (name, value)| error.with_header(name, value)),
        Err(e) => e.into(),
    }
}

/// Append `body` to the upload as the chunk its `Content-Range` (if any) places;
/// returns the upload's new length.
async fn append_chunk(
    state: &AppState,
    repo: &RepoName,
    id: &UploadId,
    headers: &HeaderMap,
    body: Body,
) -> Result<u64> {
    let start = match chunk_start(headers, body_len(&body)) {
        Ok(start) => start,
        Err(e) => return Err(resumable(state, repo, id, e).await),
    };
    match state
        .store
        .append_upload(repo, id, start, byte_stream(body))
        .await
    {
        Ok(len) => Ok(len),
        Err(e) => Err(resumable(state, repo, id, e.into()).await),
    }
}

fn digest_param(params: &Params) -> Result<Option<Digest>> {
    params
        .digest
        .as_deref()
        .map(|d| {
            d.parse().map_err(|e: oci::DigestError| {
                RegistryError::new(ErrorCode::DigestInvalid, e.to_string())
            })
        })
        .transpose()
}

/// `POST /v2/<name>/blobs/uploads/`. A mount takes the blob only from a repository the
/// caller may pull (`readable`; `None`: any repository that holds it, when no `from` is
/// named); otherwise it starts an upload session, as distribution does.
pub async fn start_upload(
    state: &AppState,
    repo: &RepoName,
    params: &Params,
    body: Body,
    readable: impl Fn(Option<&RepoName>) -> bool,
) -> Result {
    if let Some(mount) = params.mount.as_deref() {
        // A mount that cannot be done (a malformed digest or source, a source the caller
        // may not read, a blob not there) starts an upload session instead.
        let source = params.from.as_deref().map(str::parse::<RepoName>);
        if let (Ok(digest), Ok(from)) = (mount.parse::<Digest>(), source.transpose())
            && readable(from.as_ref())
            && let Some(size) = state.store.mount_blob(repo, &digest, from.as_ref()).await?
        {
            return Ok(created(repo, &digest, Stored::Mounted(size)));
        }
    } else if let Some(digest) = digest_param(params)? {
        let size = state
            .store
            .put_blob(repo, &digest, byte_stream(body))
            .await?;
        return Ok(created(repo, &digest, Stored::Uploaded(size)));
    }
    let id = state.store.start_upload(repo).await?;
    Ok(session(StatusCode::ACCEPTED, repo, &id, 0))
}

/// `GET /v2/<name>/blobs/uploads/<id>`: how much has been received.
pub async fn get_upload(state: &AppState, repo: &RepoName, id: &UploadId) -> Result {
    let len = state.store.upload_offset(repo, id).await?;
    Ok(session(StatusCode::NO_CONTENT, repo, id, len))
}

/// The start offset a chunk claims, checked against its length when that is known: its
/// `Content-Length`, else `body_len` (an empty body's 0).
pub(crate) fn chunk_start(headers: &HeaderMap, body_len: Option<u64>) -> Result<Option<u64>> {
    let Some(value) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let invalid = || {
        RegistryError::new(ErrorCode::RangeInvalid, "malformed Content-Range")
            .with_status(StatusCode::RANGE_NOT_SATISFIABLE)
    };
    let text = value.to_str().map_err(|_| invalid())?.trim();
    let text = text
        .strip_prefix("bytes=")
        .or_else(|| text.strip_prefix("bytes "))
        .unwrap_or(text);
    let text = text.split('/').next().unwrap_or(text);
    let (start, end) = text.split_once('-').ok_or_else(invalid)?;
    let (start, end): (u64, u64) = (
        start.trim().parse().map_err(|_| invalid())?,
        end.trim().parse().map_err(|_| invalid())?,
    );
    if end < start {
        return Err(invalid());
    }
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .or(body_len);
    if length.is_some_and(|len| Some(len) != (end - start).checked_add(1)) {
        return Err(invalid());
    }
    Ok(Some(start))
}

/// `PATCH /v2/<name>/blobs/uploads/<id>`: append a chunk (or stream the whole blob).
pub async fn append_upload(
    state: &AppState,
    repo: &RepoName,
    id: &UploadId,
    headers: &HeaderMap,
    body: Body,
) -> Result {
    let len = append_chunk(state, repo, id, headers, body).await?;
    Ok(session(StatusCode::ACCEPTED, repo, id, len))
}

/// `PUT /v2/<name>/blobs/uploads/<id>?digest=`: optional last chunk, then verify and commit.
pub async fn finish_upload(
    state: &AppState,
    repo: &RepoName,
    id: &UploadId,
    params: &Params,
    headers: &HeaderMap,
    body: Body,
) -> Result {
    let digest = digest_param(params)?.ok_or_else(|| {
        RegistryError::new(
            ErrorCode::DigestInvalid,
            "the digest query parameter is required",
        )
    })?;
    if has_body(&body) {
        append_chunk(state, repo, id, headers, body).await?;
    }
    let size = state.store.finish_upload(repo, id, &digest).await?;
    Ok(created(repo, &digest, Stored::Uploaded(size)))
}

/// `DELETE /v2/<name>/blobs/uploads/<id>`.
pub async fn cancel_upload(state: &AppState, repo: &RepoName, id: &UploadId) -> Result {
    state.store.cancel_upload(repo, id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
