//! The OCI distribution API (v1.1, `/v2/` routes).
//!
//! One entry point, [`dispatch`], parses the request into an [`Endpoint`] and calls the
//! thin handler for it; every failure becomes OCI error JSON through [`RegistryError`].
//! Spec: <https://github.com/opencontainers/distribution-spec/blob/main/spec.md>.

mod blobs;
mod body;
mod endpoint;
mod error;
mod manifests;
mod referrers;
mod tags;
mod uploads;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use oci::ErrorCode;

pub use endpoint::Endpoint;
pub use error::RegistryError;

use crate::app::AppState;

/// `Result` of a registry handler.
type Result<T = Response, E = RegistryError> = std::result::Result<T, E>;

/// Query parameters the distribution API uses (others, such as `_state`, are ignored).
#[derive(Debug, Default, serde::Deserialize)]
struct Params {
    digest: Option<String>,
    mount: Option<String>,
    from: Option<String>,
    n: Option<String>,
    last: Option<String>,
    #[serde(rename = "artifactType")]
    artifact_type: Option<String>,
}

impl Params {
    fn parse(query: Option<&str>) -> Result<Params> {
        serde_urlencoded::from_str(query.unwrap_or("")).map_err(|e| {
            RegistryError::new(ErrorCode::Unsupported, format!("malformed query: {e}"))
                .with_status(StatusCode::BAD_REQUEST)
        })
    }
}

/// Serve any `/v2/...` request.
pub async fn dispatch(State(state): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = body::drain_on_drop(body);
    let mut response = match Endpoint::parse(&parts.method, parts.uri.path()) {
        Ok(endpoint) => {
            tracing::Span::current().record("endpoint", endpoint.name());
            handle(&state, endpoint, &parts, body).await
        }
        Err(e) => Err(e),
    }
    .unwrap_or_else(IntoResponse::into_response);
    response.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    response
}

/// Answer a path outside the API.
pub async fn not_found() -> Response {
    RegistryError::route_not_found().into_response()
}

async fn handle(state: &AppState, endpoint: Endpoint, parts: &Parts, body: Body) -> Result {
    let params = Params::parse(parts.uri.query())?;
    let headers = &parts.headers;
    match endpoint {
        Endpoint::Base => Ok(axum::Json(serde_json::json!({})).into_response()),
        Endpoint::Catalog => tags::catalog(state, &params).await,
        Endpoint::ListTags(repo) => tags::list_tags(state, &repo, &params).await,
        Endpoint::GetManifest(repo, r) => {
            manifests::get_manifest(state, &repo, &r, headers, true).await
        }
        Endpoint::HeadManifest(repo, r) => {
            manifests::get_manifest(state, &repo, &r, headers, false).await
        }
        Endpoint::PutManifest(repo, r) => {
            manifests::put_manifest(state, &repo, &r, headers, body).await
        }
        Endpoint::DeleteManifest(repo, r) => manifests::delete_manifest(state, &repo, &r).await,
        Endpoint::GetBlob(repo, d) => blobs::get_blob(state, &repo, &d, headers).await,
        Endpoint::HeadBlob(repo, d) => blobs::head_blob(state, &repo, &d).await,
        Endpoint::DeleteBlob(repo, d) => blobs::delete_blob(state, &repo, &d).await,
        Endpoint::StartUpload(repo) => uploads::start_upload(state, &repo, &params, body).await,
        Endpoint::GetUpload(repo, id) => uploads::get_upload(state, &repo, &id).await,
        Endpoint::AppendUpload(repo, id) => {
            uploads::append_upload(state, &repo, &id, headers, body).await
        }
        Endpoint::FinishUpload(repo, id) => {
            uploads::finish_upload(state, &repo, &id, &params, headers, body).await
        }
        Endpoint::CancelUpload(repo, id) => uploads::cancel_upload(state, &repo, &id).await,
        Endpoint::ListReferrers(repo, d) => {
            referrers::list_referrers(state, &repo, &d, &params).await
        }
    }
}

/// A request body as the store's byte stream.
fn byte_stream(body: Body) -> store::ByteStream {
    Box::pin(body.into_data_stream().map_err(std::io::Error::other))
}

/// Whether the request carries a body (a `Content-Length` above zero, or chunked).
fn has_body(body: &Body) -> bool {
    use axum::body::HttpBody;
    !body.is_end_stream() && body.size_hint().exact() != Some(0)
}
