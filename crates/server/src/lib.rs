//! layercache's HTTP edge. Handlers are thin: parse the request into a typed
//! [`registry::Endpoint`], call the [`store::Store`], and map errors to the wire once
//! (in [`registry::RegistryError`]). `api` is layercache's own JSON API, and [`ui`] the
//! web dashboard over it.

pub mod actions;
mod api;
pub mod app;
pub mod auth;
mod body;
pub mod config;
pub mod metrics;
#[doc(hidden)]
pub mod parse;
pub mod registry;
pub mod serve;
pub mod sessions;
pub mod ui;

pub use app::{AppState, build_router};
pub use config::Config;
pub use serve::serve;

/// Milliseconds since the Unix epoch: the clock of build sessions and usage samples.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The server's URL as a request with `headers` addressed it (`http://HOST:PORT`):
/// `None` when its `Host` is absent, or is more than a host and port.
pub(crate) fn addressed_base(headers: &axum::http::HeaderMap) -> Option<String> {
    let host = headers.get(axum::http::header::HOST)?.to_str().ok()?;
    let authority = host.parse::<axum::http::uri::Authority>().ok()?;
    (!authority.as_str().contains('@')).then(|| format!("http://{authority}"))
}

/// A store in a new temporary directory (removed when the directory is dropped).
#[cfg(test)]
async fn temporary_store() -> (store::Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = store::Config {
        data_dir: dir.path().join("data"),
        ..store::Config::default()
    };
    (store::Store::open(&config).await.unwrap(), dir)
}
