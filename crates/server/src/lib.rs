//! layercache's HTTP edge. Handlers are thin: parse the request into a typed
//! [`registry::Endpoint`], call the [`store::Store`], and map errors to the wire once
//! (in [`registry::RegistryError`]). `api` is layercache's own JSON API, and [`ui`] the
//! web dashboard over it.

pub mod actions;
mod api;
pub mod app;
pub mod audit;
pub mod auth;
mod body;
pub mod config;
pub mod health;
pub mod limits;
pub mod metrics;
#[doc(hidden)]
pub mod parse;
pub mod registry;
pub mod serve;
pub mod sessions;
mod socket;
pub mod tls;
pub mod ui;
pub mod upstream;

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

/// The server's URL as a request addressed it (`http://HOST:PORT`, `https://` over TLS):
/// `None` when its `Host` is absent, or is more than a host and port.
pub(crate) fn addressed_base(request: &axum::http::request::Parts) -> Option<String> {
    let host = request
        .headers
        .get(axum::http::header::HOST)?
        .to_str()
        .ok()?;
    let authority = host.parse::<axum::http::uri::Authority>().ok()?;
    let scheme = serve::Scheme::of(&request.extensions).as_str();
    (!authority.as_str().contains('@')).then(|| format!("{scheme}://{authority}"))
}

/// The server's URL for a request that named no usable host: loopback, in its scheme.
pub(crate) fn loopback_base(request: &axum::http::request::Parts) -> String {
    format!(
        "{}://127.0.0.1",
        serve::Scheme::of(&request.extensions).as_str()
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    fn request(scheme: Option<serve::Scheme>, host: Option<&str>) -> axum::http::request::Parts {
        let mut builder = Request::builder().uri("/v2/");
        if let Some(host) = host {
            builder = builder.header(axum::http::header::HOST, host);
        }
        if let Some(scheme) = scheme {
            builder = builder.extension(scheme);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn urls_handed_out_say_https_when_the_connection_is_tls() {
        let tls = request(Some(serve::Scheme::Https), Some("cache.internal:5000"));
        assert_eq!(
            addressed_base(&tls).as_deref(),
            Some("https://cache.internal:5000")
        );
        assert_eq!(loopback_base(&tls), "https://127.0.0.1");
        let plain = request(Some(serve::Scheme::Http), Some("cache.internal:5000"));
        assert_eq!(
            addressed_base(&plain).as_deref(),
            Some("http://cache.internal:5000")
        );
        // No scheme recorded: plain HTTP, as served before TLS existed.
        let unmarked = request(None, Some("10.0.0.1:5000"));
        assert_eq!(
            addressed_base(&unmarked).as_deref(),
            Some("http://10.0.0.1:5000")
        );
        assert_eq!(
            addressed_base(&request(Some(serve::Scheme::Https), None)),
            None
        );
        assert_eq!(
            addressed_base(&request(Some(serve::Scheme::Https), Some("u@h:1"))),
            None
        );
    }
}
