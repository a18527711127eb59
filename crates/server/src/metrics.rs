//! Prometheus metrics, served at `/metrics` in the OpenMetrics text format.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use oci::CacheRecords;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::app::AppState;
use crate::sessions::Outcome;
use crate::upstream::UpstreamMetrics;

/// The route a response answered, for its labels (the registry endpoint's name).
#[derive(Debug, Clone, Copy)]
pub struct Route(pub &'static str);

/// The label of a route outside the registry.
pub fn route_of(path: &str) -> &'static str {
    if path.starts_with("/api/") {
        "api"
    } else if path == "/ui" || path.starts_with("/ui/") {
        "ui"
    } else if path == "/metrics" {
        "metrics"
    } else {
        "other"
    }
}

/// A request's route and status.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
}

/// A request's route.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

/// Whether a lookup found what it looked for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Every metric layercache exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    bytes_in: Counter,
    bytes_out: Counter,
    manifest_lookups: Family<ResultLabels, Counter>,
    blob_checks: Family<ResultLabels, Counter>,
    entry_lookups: Family<ResultLabels, Counter>,
    stored_bytes: Gauge,
    stored_blobs: Gauge,
    released_bytes: Gauge,
    quota_bytes: Gauge,
    quota_max_size_bytes: Gauge,
    shortfall_bytes: Gauge,
    eviction_passes: Counter,
    upload_sessions: Gauge,
    build_sessions: Gauge,
}

/// Latency buckets: 100 µs to about 26 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 4.0, 10))
}

impl Metrics {
    /// Register every metric; `audit_dropped` counts audit log lines lost, `upstreams`
    /// what the upstreams did.
    pub fn new(audit_dropped: Counter, upstreams: &UpstreamMetrics) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("layercache");
        upstreams.register(&mut registry);
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let (bytes_in, bytes_out) = (Counter::default(), Counter::default());
        let manifest_lookups = Family::<ResultLabels, Counter>::default();
        let blob_checks = Family::<ResultLabels, Counter>::default();
        let entry_lookups = Family::<ResultLabels, Counter>::default();
        let gauges: [Gauge; 8] = Default::default();
        let [
            stored_bytes,
            stored_blobs,
            released_bytes,
            quota_bytes,
            quota_max_size_bytes,
            shortfall_bytes,
            upload_sessions,
            build_sessions,
        ] = gauges;
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer a request (to its headers; bodies stream after), by route",
            latency.clone(),
        );
        registry.register(
            "http_request_bytes",
            "Request body bytes received",
            bytes_in.clone(),
        );
        registry.register(
            "http_response_bytes",
            "Response body bytes sent",
            bytes_out.clone(),
        );
        registry.register(
            "manifest_lookups",
            "Manifest GET/HEAD by result (hit, no_cache: an image without cache metadata, or miss)",
            manifest_lookups.clone(),
        );
        registry.register(
            "blob_checks",
            "Blob existence checks (HEAD) by result (present or absent)",
            blob_checks.clone(),
        );
        registry.register(
            "cache_entry_lookups",
            "Actions cache restores by result (hit or miss)",
            entry_lookups.clone(),
        );
        registry.register(
            "stored_bytes",
            "Bytes the data directory holds",
            stored_bytes.clone(),
        );
        registry.register("stored_blobs", "Blobs stored", stored_blobs.clone());
        registry.register(
            "released_bytes",
            "Of the stored bytes, those evicted roots released, waiting out the push window",
            released_bytes.clone(),
        );
        registry.register("quota_bytes", "The quota in force", quota_bytes.clone());
        registry.register(
            "quota_max_size_bytes",
            "What max_size alone allows: above the quota in force when the filesystem's free \
             space (less min_free) sets it",
            quota_max_size_bytes.clone(),
        );
        registry.register(
            "eviction_shortfall_bytes",
            "Bytes the last eviction pass could not free because every root left is in use \
             or pinned (0 when the quota was met)",
            shortfall_bytes.clone(),
        );
        let eviction_passes = Counter::default();
        registry.register(
            "eviction_passes",
            "Eviction passes run",
            eviction_passes.clone(),
        );
        registry.register(
            "upload_sessions",
            "Open upload sessions",
            upload_sessions.clone(),
        );
        registry.register(
            "build_sessions",
            "Open build sessions",
            build_sessions.clone(),
        );
        registry.register(
            "audit_dropped",
            "Audit log lines lost: the writer was behind (queue full) or a write failed",
            audit_dropped,
        );
        Arc::new(Metrics {
            registry,
            requests,
            latency,
            bytes_in,
            bytes_out,
            manifest_lookups,
            blob_checks,
            entry_lookups,
            stored_bytes,
            stored_blobs,
            released_bytes,
            quota_bytes,
            quota_max_size_bytes,
            shortfall_bytes,
            eviction_passes,
            upload_sessions,
            build_sessions,
        })
    }

    /// Count a request to `route` answered with `status` after `elapsed`.
    pub fn request(&self, route: &'static str, status: StatusCode, elapsed: Duration) {
        let status = status.as_u16();
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
        self.latency
            .get_or_create(&RouteLabels { route })
            .observe(elapsed.as_secs_f64());
    }

    /// A request body that counts its bytes as they arrive.
    pub fn count_in(&self, body: Body) -> Body {
        counted(body, self.bytes_in.clone())
    }

    /// A response body that counts its bytes as they leave.
    pub fn count_out(&self, body: Body) -> Body {
        counted(body, self.bytes_out.clone())
    }

    /// Count a registry request's cache outcome.
    pub fn outcome(&self, outcome: &Outcome) {
        let (family, result) = match outcome {
            Outcome::ManifestLookup { found, records, .. } => {
                let result = match (found, records) {
                    (false, _) => "miss",
                    (true, Some(CacheRecords::Without)) => "no_cache",
                    (true, _) => "hit",
                };
                (&self.manifest_lookups, result)
            }
            Outcome::BlobChecked { size, .. } => (
                &self.blob_checks,
                if size.is_some() { "present" } else { "absent" },
            ),
            Outcome::EntryLookup { found, .. } => {
                (&self.entry_lookups, if *found { "hit" } else { "miss" })
            }
            _ => return,
        };
        family.get_or_create(&ResultLabels { result }).inc();
    }
}

/// `body`, adding the length of each data frame to `counter` as it passes.
fn counted(body: Body, counter: Counter) -> Body {
    Body::new(body.map_frame(move |frame| {
        if let Some(data) = frame.data_ref() {
            counter.inc_by(data.len() as u64);
        }
        frame
    }))
}

/// `GET /metrics`.
pub async fn serve(State(state): State<AppState>) -> Response {
    let metrics = &state.metrics;
    match state.store.usage().await {
        Ok((usage, quota)) => {
            metrics.stored_bytes.set(usage.total as i64);
            metrics.stored_blobs.set(usage.blobs as i64);
            metrics.released_bytes.set(usage.released_bytes as i64);
            metrics.quota_bytes.set(quota.limit as i64);
            metrics.quota_max_size_bytes.set(quota.max_size as i64);
        }
        Err(e) => tracing::warn!(error = %e, "reading usage for metrics failed"),
    }
    match state.store.upload_sessions().await {
        Ok(n) => {
            metrics.upload_sessions.set(n as i64);
        }
        Err(e) => tracing::warn!(error = %e, "counting upload sessions failed"),
    }
    let shortfall = state.store.last_gc().map_or(0, |pass| pass.shortfall);
    metrics.shortfall_bytes.set(shortfall as i64);
    metrics.eviction_passes.inner().store(
        state.store.gc_passes(),
        std::sync::atomic::Ordering::Relaxed,
    );
    metrics
        .build_sessions
        .set(state.sessions.open_count() as i64);
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &metrics.registry) {
        tracing::error!(error = %e, "encoding metrics failed");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
