//! Manifests: `GET`/`HEAD`/`PUT`/`DELETE /v2/<name>/manifests/<reference>`, by tag or
//! digest, with `Accept` negotiation and the `subject` (`OCI-Subject`) response header.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::IntoResponse;
use oci::{ErrorCode, Reference, RepoName, media_type};

use super::{RegistryError, Result};
use crate::app::AppState;
use crate::upstream::Served;

/// The `Warning` on a tag served from disk that its upstream could not confirm.
const STALE_WARNING: header::HeaderValue =
    header::HeaderValue::from_static("110 layercache \"stale: the upstream could not be reached\"");

const CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
/// The cache records a manifest gives a build that imports it (`export`, `inline` or
/// `none`), for layercache's own tools and the build sessions.
pub const CACHE_RECORDS: HeaderName = HeaderName::from_static("layercache-cache-records");

/// `GET` (with `body`) or `HEAD` of a manifest.
pub async fn get_manifest(
    state: &AppState,
    repo: &RepoName,
    reference: &Reference,
    headers: &HeaderMap,
    body: bool,
) -> Result {
    let (manifest, served) = match state.upstreams.route(&state.store, repo, false).await? {
        Some(route) => {
            let (manifest, served) = route.manifest(&state.store, reference).await?;
            (manifest, Some(served))
        }
        None => (state.store.get_manifest(repo, reference).await?, None),
    };
    let accept: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if !media_type::accepts(&accept, &manifest.media_type) {
        return Err(RegistryError::new(
            ErrorCode::ManifestUnknown,
            format!(
                "manifest is {}, which the Accept header does not admit",
                manifest.media_type
            ),
        ));
    }
    let len = manifest.content.len();
    let content = if body {
        Body::from(manifest.content)
    } else {
        Body::empty()
    };
    let mut response = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, manifest.media_type),
            (header::CONTENT_LENGTH, len.to_string()),
            (CONTENT_DIGEST, manifest.digest.to_string()),
        ],
        content,
    )
        .into_response();
    if let Some(records) = manifest.cache {
        let value = header::HeaderValue::from_static(records.as_str());
        response.headers_mut().insert(CACHE_RECORDS, value);
    }
    if let Some(served) = served {
        if served == Served::Stale {
            response
                .headers_mut()
                .insert(header::WARNING, STALE_WARNING);
        }
        response.extensions_mut().insert(served);
    }
    Ok(response)
}

/// `PUT /v2/<name>/manifests/<reference>`.
pub async fn put_manifest(
    state: &AppState,
    repo: &RepoName,
    reference: &Reference,
    headers: &HeaderMap,
    body: Body,
) -> Result {
    let limit = state.store.max_manifest_bytes();
    let too_large = || {
        RegistryError::new(
            ErrorCode::ManifestInvalid,
            format!("manifest exceeds the {limit}-byte limit"),
        )
        .with_status(StatusCode::PAYLOAD_TOO_LARGE)
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        let over_limit = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if over_limit {
            too_large()
        } else {
            RegistryError::new(
                ErrorCode::ManifestInvalid,
                format!("reading the manifest failed: {e}"),
            )
        }
    })?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(media_type::essence);
    let put = match state.upstreams.route(&state.store, repo, true).await? {
        Some(route) => {
            route
                .push_manifest(&state.store, reference, content_type, bytes)
                .await?
        }
        None => {
            state
                .store
                .put_manifest(repo, reference, content_type, bytes)
                .await?
        }
    };
    let mut response = (
        StatusCode::CREATED,
        [
            (
                header::LOCATION,
                format!("/v2/{repo}/manifests/{}", put.digest),
            ),
            (CONTENT_DIGEST, put.digest.to_string()),
            (header::CONTENT_LENGTH, "0".to_owned()),
        ],
    )
        .into_response();
    if let Some(value) = put.subject.and_then(|s| s.to_string().parse().ok()) {
        response.headers_mut().insert("oci-subject", value);
    }
    Ok(response)
}

/// `DELETE /v2/<name>/manifests/<reference>`: a tag, or a manifest and its tags.
pub async fn delete_manifest(state: &AppState, repo: &RepoName, reference: &Reference) -> Result {
    match state.upstreams.route(&state.store, repo, true).await? {
        Some(route) if route.upstream.takes_pushes() => {
            route.delete_manifest(&state.store, reference).await?
        }
        _ => state.store.delete_manifest(repo, reference).await?,
    }
    Ok(StatusCode::ACCEPTED.into_response())
}
