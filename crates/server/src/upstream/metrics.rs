//! What each upstream did: reads answered from disk, fills, bytes fetched, stale
//! answers and failures, exported at `/metrics` with an `upstream` label (`centre` for
//! an edge's central layercache).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::Upstream;

/// An upstream and the kind of content (`manifest` or `blob`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    upstream: String,
    kind: &'static str,
}

/// An upstream.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

/// The upstreams' counters.
#[derive(Default)]
pub struct UpstreamMetrics {
    hits: Family<KindLabels, Counter>,
    fills: Family<KindLabels, Counter>,
    bytes: Family<UpstreamLabels, Counter>,
    stale: Family<UpstreamLabels, Counter>,
    failures: Family<UpstreamLabels, Counter>,
}

fn label(upstream: &Upstream) -> String {
    if upstream.name.is_empty() {
        "centre".to_owned()
    } else {
        upstream.name.clone()
    }
}

impl UpstreamMetrics {
    /// Register every counter in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "upstream_hits",
            "Reads of mirrored repositories answered from this server's disk, by upstream and kind",
            self.hits.clone(),
        );
        registry.register(
            "upstream_fills",
            "Manifests and blobs fetched from an upstream on a miss, by upstream and kind",
            self.fills.clone(),
        );
        registry.register(
            "upstream_bytes",
            "Bytes fetched from an upstream (manifests and blobs)",
            self.bytes.clone(),
        );
        registry.register(
            "upstream_stale",
            "Tags served from disk because their upstream could not confirm them",
            self.stale.clone(),
        );
        registry.register(
            "upstream_failures",
            "Fills an upstream could not provide (absent, unreachable, rate-limited, corrupt)",
            self.failures.clone(),
        );
    }

    pub(super) fn hit(&self, upstream: &Upstream, kind: &'static str) {
        let upstream = label(upstream);
        self.hits
            .get_or_create(&KindLabels { upstream, kind })
            .inc();
    }

    pub(super) fn filled(&self, upstream: &Upstream, kind: &'static str, bytes: u64) {
        let labels = KindLabels {
            upstream: label(upstream),
            kind,
        };
        self.fills.get_or_create(&labels).inc();
        if bytes > 0 {
            self.bytes_counter(upstream).inc_by(bytes);
        }
    }

    pub(super) fn bytes_counter(&self, upstream: &Upstream) -> Counter {
        let upstream = label(upstream);
        self.bytes
            .get_or_create(&UpstreamLabels { upstream })
            .clone()
    }

    pub(super) fn stale(&self, upstream: &Upstream) {
        let upstream = label(upstream);
        self.stale.get_or_create(&UpstreamLabels { upstream }).inc();
    }

    pub(super) fn failure_counter(&self, upstream: &Upstream) -> Counter {
        let upstream = label(upstream);
        self.failures
            .get_or_create(&UpstreamLabels { upstream })
            .clone()
    }
}
