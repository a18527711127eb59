//! Application state, the router, and the request layer every request passes through
//! (a request id and a tracing span naming the endpoint and the build session).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use http_body::{Frame, SizeHint};
use tracing::Instrument;

use crate::actions::{self, Actions};
use crate::audit::Audit;
use crate::auth::{self, Authority};
use crate::limits::Limiter;
use crate::metrics::{self, Metrics, Route};
use crate::sessions::Sessions;
use crate::ui::UsageHistory;
use crate::upstream::Upstreams;
use crate::{api, health, registry, ui};

/// Everything a handler may use; no global state lives outside it.
#[derive(Clone)]
pub struct AppState {
    /// The storage engine.
    pub store: store::Store,
    /// The build sessions requests are recorded in.
    pub sessions: Arc<Sessions>,
    /// What `/metrics` exports.
    pub metrics: Arc<Metrics>,
    /// The store's usage over the last day, for the dashboard.
    pub usage_history: Arc<UsageHistory>,
    /// The GitHub Actions cache service.
    pub actions: Arc<Actions>,
    /// Who may pull, push and delete.
    pub authority: Arc<Authority>,
    /// How much each identity may do at once.
    pub limiter: Arc<Limiter>,
    /// The log of writes, deletes, administrative actions and denials.
    pub audit: Audit,
    /// The registries reads are filled from.
    pub upstreams: Arc<Upstreams>,
    requests: Arc<AtomicU64>,
}

impl AppState {
    /// State over an opened store (starts recording build sessions into it, and
    /// sampling its usage) with the policy `authority` enforces; writes and denials go
    /// to `audit`; misses are filled from `upstreams`.
    pub fn new(
        store: store::Store,
        config: &crate::Config,
        actions: Actions,
        authority: Authority,
        audit: Audit,
        upstreams: Upstreams,
    ) -> AppState {
        AppState {
            actions: Arc::new(actions),
            authority: Arc::new(authority),
            limiter: Arc::new(Limiter::new(&config.limits)),
            sessions: Sessions::start(store.clone(), config.sessions.clone()),
            metrics: Metrics::new(audit.dropped(), &upstreams.metrics),
            upstreams: Arc::new(upstreams),
            audit,
            usage_history: UsageHistory::start(store.clone()),
            store,
            requests: Arc::default(),
        }
    }
}

/// The whole HTTP surface.
pub fn build_router(state: AppState) -> Router {
    Router::new()
        .route("/v2", any(registry::dispatch))
        .route("/v2/", any(registry::dispatch))
        .route("/v2/{*path}", any(registry::dispatch))
        .merge(actions::router())
        .merge(
            api::router()
                .merge(ui::router())
                .route("/metrics", get(metrics::serve))
                .route_layer(middleware::from_fn_with_state(state.clone(), auth::guard)),
        )
        .route("/token", get(auth::token).post(auth::token))
        .fallback(registry::not_found)
        .layer(middleware::from_fn(refuse_cross_site))
        .layer(middleware::from_fn_with_state(state.clone(), trace_request))
        // After the layer, so probes are neither counted, logged nor guarded.
        .merge(health::router())
        .with_state(state)
}

/// Refuse a request that a browser sent from another site's page: one that may change
/// something (not `GET`, `HEAD`, `OPTIONS`) with an `Origin` other than the server's own.
/// Builders, registry clients and the Actions cache client send no `Origin`, and a browser
/// always does on such requests: so a page elsewhere cannot write the cache of a server
/// on its visitor's loopback, nor run a pass with an administrator's remembered login.
async fn refuse_cross_site(request: Request, next: Next) -> Response {
    let origin = request.headers().get(header::ORIGIN);
    if request.method().is_safe() || origin.is_none_or(|origin| is_own(origin, &request)) {
        return next.run(request).await;
    }
    registry::RegistryError::new(
        oci::ErrorCode::Denied,
        "a request from another site's page is refused: its Origin is not this server",
    )
    .with_status(axum::http::StatusCode::FORBIDDEN)
    .into_response()
}

/// Whether `origin` (`scheme://host[:port]`, or `null`, an opaque origin and never ours)
/// names the host `request` was sent to.
fn is_own(origin: &HeaderValue, request: &Request) -> bool {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or(request.uri().authority().map(|a| a.as_str()));
    let authority = origin.to_str().ok().and_then(|o| o.split_once("://"));
    authority.is_some_and(|(_, authority)| host.is_some_and(|h| authority.eq_ignore_ascii_case(h)))
}

/// Give each request an id and a span; count it in the metrics; log its outcome once its
/// response body is over.
async fn trace_request(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let timeout = state.limiter.body_read_timeout;
    let request =
        request.map(|body| crate::body::idle_timeout(state.metrics.count_in(body), timeout));
    let fallback_route = metrics::route_of(request.uri().path());
    let id = state.requests.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!(
        "request",
        id,
        method = %request.method(),
        path = %request.uri().path(),
        endpoint = tracing::field::Empty,
        session = tracing::field::Empty,
    );
    let head = request.method() == Method::HEAD;
    let started = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    let route = response
        .extensions()
        .get::<Route>()
        .map_or(fallback_route, |r| r.0);
    state
        .metrics
        .request(route, response.status(), started.elapsed());
    response
        .headers_mut()
        .insert("x-request-id", HeaderValue::from(id));
    let length = if head {
        Some(0)
    } else {
        content_length(&response).or(response.body().size_hint().exact())
    };
    let status = response.status().as_u16();
    response.map(|body| {
        Body::new(AccessLine {
            body: state.metrics.count_out(body),
            span,
            status,
            started,
            length,
            sent: 0,
            ended: false,
        })
    })
}

/// The length a response's headers promise for its body, if they do.
fn content_length(response: &Response) -> Option<u64> {
    let header = response.headers().get(header::CONTENT_LENGTH)?;
    header.to_str().ok()?.parse().ok()
}

/// A response body that logs its request's `served` line once it is over: with the status,
/// the body bytes handed to the connection, the time from the request to then, and
/// `cut=true` when the body ended short of its length (the client went away, or the
/// blob's source failed mid-way).
struct AccessLine {
    body: Body,
    span: tracing::Span,
    status: u16,
    started: Instant,
    /// The body's length, when its headers or the body itself say it (0 for a `HEAD`,
    /// whose body is never sent).
    length: Option<u64>,
    sent: u64,
    ended: bool,
}

impl HttpBody for AccessLine {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                self.sent += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
            Some(Err(_)) => {}
            None => self.ended = true,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for AccessLine {
    fn drop(&mut self) {
        let micros = self.started.elapsed().as_micros() as u64;
        let (status, bytes) = (self.status, self.sent);
        let whole = self.ended
            || self.body.is_end_stream()
            || self.length.is_some_and(|length| bytes >= length);
        self.span.in_scope(|| {
            if whole {
                tracing::info!(status, bytes, micros, "served");
            } else {
                tracing::info!(status, bytes, micros, cut = true, "served");
            }
        });
    }
}
