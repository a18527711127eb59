//! The web dashboard at `/ui`: one page, embedded in the binary, that draws the store's
//! usage against the quota, the hit ratio of each repository over time, the recent
//! build sessions and the largest and most-read repositories from the JSON API
//! (`/api/v1/...`), refreshing itself every few seconds.
//!
//! The page loads nothing from elsewhere: its styles and script are inline and its
//! plots are SVG drawn by that script, and its content security policy lets the browser
//! fetch only this server's API.

pub mod history;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::app::AppState;

pub use history::{UsageHistory, UsageSample};

/// The page: HTML, CSS and script in one file.
const PAGE: &str = include_str!("dashboard.html");

/// What the page may load: nothing but its own inline style and script, and the API.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The dashboard's routes.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/ui", get(dashboard))
        .route("/ui/", get(dashboard))
}

/// `GET /ui`: the dashboard page.
async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        PAGE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for external in ["http://", "https://", "src=", "href=", "@import", "url("] {
            // The SVG namespace is a name, not something loaded.
            let page = PAGE.replace("http://www.w3.org/2000/svg", "");
            assert!(!page.contains(external), "the page refers to {external}");
        }
        for api in [
            "/api/v1/gc",
            "/api/v1/usage/history",
            "/api/v1/hit-ratio",
            "/api/v1/sessions",
            "/api/v1/repositories",
        ] {
            assert!(PAGE.contains(api), "the page does not use {api}");
        }
    }
}
