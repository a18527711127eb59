//! `GET /v2/<name>/referrers/<digest>[?artifactType=]`: the manifests whose `subject`
//! is `<digest>`, as an OCI image index.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use oci::{Digest, RepoName, media_type};

use super::{Params, Result};
use crate::app::AppState;

/// List referrers of `subject` (an empty index when there are none).
pub async fn list_referrers(
    state: &AppState,
    repo: &RepoName,
    subject: &Digest,
    params: &Params,
) -> Result {
    let filter = params.artifact_type.as_deref().filter(|t| !t.is_empty());
    let referrers = state.store.referrers(repo, subject, filter).await?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type::OCI_INDEX,
        "manifests": referrers,
    });
    let mut response: Response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, media_type::OCI_INDEX)],
        index.to_string(),
    )
        .into_response();
    if filter.is_some() {
        response.headers_mut().insert(
            "oci-filters-applied",
            header::HeaderValue::from_static("artifactType"),
        );
    }
    Ok(response)
}
