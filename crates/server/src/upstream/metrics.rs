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

/// What one upstream did since the server started.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UpstreamStats {
    /// Its name (`centre` for an edge's central layercache).
    pub upstream: String,
    /// Its URL.
    pub url: String,
    /// Reads answered from this server's disk, by kind (`manifest`, `blob`, `entry`).
    pub hits: std::collections::BTreeMap<String, u64>,
    /// Fetches on a miss, by kind.
    pub fills: std::collections::BTreeMap<String, u64>,
    /// Bytes fetched from it.
    pub bytes: u64,
    /// Tags served although it could not confirm them.
    pub stale: u64,
    /// Fills it could not provide.
    pub failures: u64,
}

/// The kinds of content counted.
const KINDS: [&str; 3] = ["manifest", "blob", "entry"];

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

    /// What `upstream` did, from its counters.
    pub fn stats(&self, upstream: &Upstream) -> UpstreamStats {
        let name = label(upstream);
        let by_kind = |family: &Family<KindLabels, Counter>| {
            KINDS
                .iter()
                .map(|&kind| {
                    let labels = KindLabels {
                        upstream: name.clone(),
                        kind,
                    };
                    (kind.to_owned(), family.get_or_create(&labels).get())
                })
                .filter(|(_, n)| *n > 0)
                .collect()
        };
        let one = |family: &Family<UpstreamLabels, Counter>| {
            let labels = UpstreamLabels {
                upstream: name.clone(),
            };
            family.get_or_create(&labels).get()
        };
        UpstreamStats {
            url: upstream.url().to_string(),
            hits: by_kind(&self.hits),
            fills: by_kind(&self.fills),
            bytes: one(&self.bytes),
            stale: one(&self.stale),
            failures: one(&self.failures),
            upstream: name.clone(),
        }
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
