//! Listings: `GET /v2/<name>/tags/list` and `GET /v2/_catalog`, paged with `n` and
//! `last`, with a `Link: <…>; rel="next"` header when more follow.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use oci::{ErrorCode, RepoName};
use store::meta::Page;

use super::{Params, RegistryError, Result};
use crate::app::AppState;

/// Largest page served, whatever `n` asks for.
const MAX_PAGE: usize = 10_000;

fn page_size(params: &Params) -> Result<usize> {
    match params.n.as_deref() {
        None => Ok(MAX_PAGE),
        Some(n) => n.parse::<usize>().map(|n| n.min(MAX_PAGE)).map_err(|_| {
            RegistryError::new(
                ErrorCode::PaginationNumberInvalid,
                format!("n={n:?} is not a number"),
            )
        }),
    }
}

fn paged(path: &str, n: usize, page: Page, body: serde_json::Value) -> Response {
    let mut response = (StatusCode::OK, axum::Json(body)).into_response();
    if let Some(last) = page.items.last().filter(|_| page.more) {
        let link = format!("<{path}?n={n}&last={last}>; rel=\"next\"");
        if let Ok(value) = link.parse() {
            response.headers_mut().insert(header::LINK, value);
        }
    }
    response
}

/// `GET /v2/<name>/tags/list`.
pub async fn list_tags(state: &AppState, repo: &RepoName, params: &Params) -> Result {
    let n = page_size(params)?;
    let page = state.store.tags(repo, n, params.last.as_deref()).await?;
    let body = serde_json::json!({ "name": repo.as_str(), "tags": page.items });
    Ok(paged(&format!("/v2/{repo}/tags/list"), n, page, body))
}

/// `GET /v2/_catalog`.
pub async fn catalog(state: &AppState, params: &Params) -> Result {
    let n = page_size(params)?;
    let page = state.store.catalog(n, params.last.as_deref()).await?;
    let body = serde_json::json!({ "repositories": page.items });
    Ok(paged("/v2/_catalog", n, page, body))
}
