//! Accepting connections: HTTP/1, over TLS when configured, with a deadline on every
//! request head (and on the TLS handshake before it), so a client that sends nothing, or
//! its headers a byte at a time, cannot hold a connection (nor, with many of them, the
//! server's file descriptors); graceful shutdown, bounded in time. Each request carries
//! the [`Scheme`] its connection speaks, so the URLs the server hands out name the right
//! one.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulConnection, GracefulShutdown, Watcher};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::limits::Limits;
use crate::socket::{BodyEnd, Stepped};
use crate::tls::Tls;

/// How a request reached the server: each request carries it as an extension, set by
/// the accept loop (a request without one came over plain HTTP).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    #[default]
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    /// `http` or `https`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    /// The scheme of a request with `extensions`.
    pub fn of(extensions: &axum::http::Extensions) -> Scheme {
        extensions.get::<Scheme>().copied().unwrap_or_default()
    }
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Connections open when the shutdown began.
    pub open: usize,
    /// Of those, the ones still busy at the deadline, which were closed unfinished.
    pub cut: usize,
}

/// Serve `app` on `listener` (HTTPS only, with `tls`) until `shutdown` completes. Then
/// stop accepting, let the requests in flight finish (each connection closes after its
/// current response; idle ones at once) for at most `drain`, and close whatever is still
/// open. A TLS handshake must complete within the header read timeout too.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &Limits,
    tls: Option<&Tls>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> Drained {
    let mut http = hyper::server::conn::http1::Builder::new();
    // Body buffers are queued as they are, never copied into one: a blob's mapped
    // windows are written to the socket straight from the page cache.
    http.timer(TokioTimer::new())
        .writev(true)
        .header_read_timeout(limits.header_read_timeout);
    let http = Arc::new(http);
    let handshake_timeout = limits.header_read_timeout;
    let graceful = GracefulShutdown::new();
    // Every connection's task, so that those still open at the deadline can be ended.
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before accept:
                    // keep serving the others.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(ended) = connections.join_next(), if !connections.is_empty() => {
                report_panic(ended);
                continue;
            }
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let body_end = Arc::new(BodyEnd::default());
        let stream = Stepped::new(stream, Arc::clone(&body_end));
        // Taken now, so a shutdown during the handshake still waits for this connection
        // and then ends it gracefully.
        let watcher = graceful.watcher();
        let (http, app) = (Arc::clone(&http), app.clone());
        match tls {
            None => {
                let connection = http.serve_connection(
                    TokioIo::new(stream),
                    service(app, addr, Scheme::Http, body_end),
                );
                connections.spawn(run(watcher, connection, addr));
            }
            Some(tls) => {
                let handshake = tls.acceptor().accept(stream);
                connections.spawn(async move {
                    let stream = match tokio::time::timeout(handshake_timeout, handshake).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %addr, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%addr, "TLS handshake timed out");
                            return;
                        }
                    };
                    let connection = http.serve_connection(
                        TokioIo::new(stream),
                        service(app, addr, Scheme::Https, body_end),
                    );
                    run(watcher, connection, addr).await;
                });
            }
        }
    }
    drop(listener);
    while let Some(ended) = connections.try_join_next() {
        report_panic(ended);
    }
    let open = connections.len();
    tracing::info!(
        open,
        deadline = %humantime::format_duration(drain),
        "shutting down: no new connections; finishing the requests in flight"
    );
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        // Ended where they are: an upload keeps what it received and resumes from
        // there; a download is cut short and retried by its client.
        connections.abort_all();
    }
    let mut cut = 0;
    while let Some(ended) = connections.join_next().await {
        match ended {
            Err(e) if e.is_cancelled() => cut += 1,
            ended => report_panic(ended),
        }
    }
    if cut > 0 {
        tracing::warn!(
            cut,
            "closed the connections still busy at the shutdown deadline (server.shutdown_timeout)"
        );
    }
    Drained { open, cut }
}

/// Log a connection task that panicked (one that was aborted ended as asked).
fn report_panic(ended: Result<(), tokio::task::JoinError>) {
    if let Err(e) = ended
        && e.is_panic()
    {
        tracing::error!(error = %e, "a connection's task panicked");
    }
}

/// Serve one connection to its end, or to a graceful one after shutdown.
async fn run<C>(watcher: Watcher, connection: C, addr: SocketAddr)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(error = %e, %addr, "connection ended");
    }
}

/// `app` as the hyper service of one connection from `addr`, speaking `scheme`, whose
/// request bodies announce their ends through `body_end`.
fn service(
    app: Router,
    addr: SocketAddr,
    scheme: Scheme,
    body_end: Arc<BodyEnd>,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let mut request = request.map(|body| {
            crate::body::announce_end(axum::body::Body::new(body), Arc::clone(&body_end))
        });
        request.extensions_mut().insert(ConnectInfo(addr));
        request.extensions_mut().insert(scheme);
        request.extensions_mut().insert(Arc::clone(&body_end));
        app.clone().oneshot(request)
    })
}
