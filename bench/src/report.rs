//! Figures, targets and the printed table: each figure for both servers as a median with
//! its spread, their ratio, the machine limit the target uses, and PASS/FAIL.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::limits::{GIB, MB};
use crate::project;
use crate::servers::Kind;
use crate::workloads::Shape;

/// Median and spread of a figure's samples.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Median (the mean of the middle two for an even count).
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Every sample, in the order measured.
    pub samples: Vec<f64>,
}

impl Summary {
    /// Summarise `samples`; `None` when there are none.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            *sorted.get(n / 2)?
        } else {
            (sorted.get(n.checked_div(2)?.checked_sub(1)?)? + sorted.get(n / 2)?) / 2.0
        };
        Some(Summary {
            median,
            min: *sorted.first()?,
            max: *sorted.last()?,
            samples: samples.to_vec(),
        })
    }

    /// `median [min-max]`, or the median alone for one sample.
    pub fn show(&self) -> String {
        if self.samples.len() > 1 {
            format!("{} [{}-{}]", num(self.median), num(self.min), num(self.max))
        } else {
            num(self.median)
        }
    }
}

/// The machine's limits, each a summary over its repetitions (MB/s; the Actions cache
/// client's ceilings in MiB/s).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Limits {
    /// One core's SHA-256.
    pub sha256_one_core: Option<Summary>,
    /// Second read of a 1 GiB file (page cache).
    pub page_cache_read: Option<Summary>,
    /// Kernel and user CPU seconds per GiB written into the page cache (a new file).
    pub page_cache_write_cpu: Option<Summary>,
    /// The same, written at once into the pages the previous file freed: the guest's own
    /// cost, without a hypervisor's for pages it has taken back.
    pub page_cache_rewrite_cpu: Option<Summary>,
    /// A bare loop sending a cached 1 GiB file to a loopback receiver as mapped windows.
    pub loopback_mapped: Option<Summary>,
    /// Its kernel and user CPU seconds per GiB.
    pub loopback_mapped_cpu: Option<Summary>,
    /// Write, then fsync, of 1 GiB on the servers' disk.
    pub disk_write_fsync: Option<Summary>,
    /// Write of 1 GiB with fdatasync overlapping it, then fsync, on the servers' disk.
    pub disk_write_fsync_overlapped: Option<Summary>,
    /// One loopback TCP stream.
    pub loopback_tcp: Option<Summary>,
    /// The benchmark's HTTP client pulling from a trivial server (not a target).
    pub http_get_ceiling: Option<Summary>,
    /// The benchmark's HTTP client pushing to a trivial server (not a target).
    pub http_put_ceiling: Option<Summary>,
    /// `@actions/cache` saving to a null v2 server (MiB/s).
    pub actions_v2_save: Option<Summary>,
    /// `@actions/cache` restoring from a null v2 server (MiB/s).
    pub actions_v2_restore: Option<Summary>,
    /// `@actions/cache` saving to a null v1 server (MiB/s).
    pub actions_v1_save: Option<Summary>,
    /// `@actions/cache` restoring from a null v1 server (MiB/s).
    pub actions_v1_restore: Option<Summary>,
    /// The null server's figures (CPU seconds per GiB, a save's rate after its archive
    /// was made), by the key of layercache's same figure.
    pub actions_null: BTreeMap<&'static str, Summary>,
}

impl Limits {
    fn median(s: &Option<Summary>) -> Option<f64> {
        s.as_ref().map(|s| s.median)
    }

    /// The faster of the two ways to write durably.
    pub fn disk(&self) -> Option<f64> {
        match (
            Self::median(&self.disk_write_fsync),
            Self::median(&self.disk_write_fsync_overlapped),
        ) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// The least CPU a GiB pushed can cost a server that hashes it and writes it through
    /// the page cache into pages just freed (as the push workloads are given), in
    /// CPU-s/GiB: that page-cache write plus one core's SHA-256 (the socket read not
    /// counted).
    pub fn push_cpu(&self) -> Option<f64> {
        let sha = Self::median(&self.sha256_one_core)?;
        Some(Self::median(&self.page_cache_rewrite_cpu)? + GIB / MB / sha)
    }

    /// The push limit: the slower of hashing on one core and writing durably.
    pub fn push(&self) -> Option<f64> {
        match (Self::median(&self.sha256_one_core), self.disk()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// What a figure is compared against.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// No target: reported for context.
    None,
    /// layercache >= `ratio` x distribution, and >= `of_limit` x the limit if known.
    AtLeast {
        /// Minimum ratio layercache/distribution.
        ratio: f64,
        /// Minimum fraction of the machine limit.
        of_limit: Option<f64>,
    },
    /// layercache <= `ratio` x distribution.
    AtMostRatio {
        /// Maximum ratio layercache/distribution.
        ratio: f64,
    },
    /// layercache < distribution.
    Below,
    /// layercache <= an absolute value.
    AtMost {
        /// The bound, in the figure's unit.
        value: f64,
    },
    /// layercache >= `fraction` x the limit (no peer in this run).
    OfLimit {
        /// Minimum fraction of the limit.
        fraction: f64,
    },
    /// layercache >= `fraction` x the limit, where the limit is another figure of this
    /// run, named `of` (a pull-through miss against the upstream's own GET).
    Within {
        /// Minimum fraction of the other figure.
        fraction: f64,
        /// What the other figure is, as printed.
        of: &'static str,
    },
}

impl Target {
    fn describe(self, unit: &str) -> String {
        match self {
            Target::None => "-".into(),
            Target::AtLeast {
                ratio,
                of_limit: Some(f),
            } => format!(">= {ratio}x and >= {:.0}% limit", f * 100.0),
            Target::AtLeast {
                ratio,
                of_limit: None,
            } => format!(">= {ratio}x"),
            Target::AtMostRatio { ratio } => format!("<= {ratio}x"),
            Target::Below => "< distribution".into(),
            Target::AtMost { value } => format!("<= {} {unit}", num(value)),
            Target::OfLimit { fraction } => format!(">= {:.0}% limit", fraction * 100.0),
            Target::Within { fraction, of } => format!(">= {:.0}% {of}", fraction * 100.0),
        }
    }
}

/// One row of the table.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    /// Stable key, for JSON consumers.
    pub key: String,
    /// What is measured.
    pub label: String,
    /// Unit of the values.
    pub unit: String,
    /// layercache's samples.
    pub layercache: Option<Summary>,
    /// distribution's samples.
    pub distribution: Option<Summary>,
    /// layercache's median over distribution's.
    pub ratio: Option<f64>,
    /// The machine limit the target uses, in the figure's unit.
    pub limit: Option<f64>,
    /// layercache's median over the limit.
    pub of_limit: Option<f64>,
    /// The target.
    pub target: Target,
    /// Whether the target is met; `None` without a target or without both values.
    pub pass: Option<bool>,
}

impl Figure {
    /// A figure from both servers' samples, judged against `target`.
    pub fn new(
        key: &str,
        label: &str,
        unit: &str,
        samples: &Samples,
        limit: Option<f64>,
        target: Target,
    ) -> Figure {
        let layercache = Summary::of(&samples.layercache);
        let distribution = Summary::of(&samples.distribution);
        let lc = layercache.as_ref().map(|s| s.median);
        let dist = distribution.as_ref().map(|s| s.median);
        let ratio = match (lc, dist) {
            (Some(a), Some(b)) if b != 0.0 => Some(a / b),
            _ => None,
        };
        let pass = match (target, lc, dist) {
            (Target::None, _, _) => None,
            (Target::AtMost { value }, Some(a), _) => Some(a <= value),
            (Target::OfLimit { fraction } | Target::Within { fraction, .. }, Some(a), _) => {
                limit.map(|l| a >= fraction * l)
            }
            (Target::AtLeast { ratio: r, of_limit }, Some(a), Some(b)) => {
                let vs_limit = match (of_limit, limit) {
                    (Some(f), Some(l)) => a >= f * l,
                    _ => true,
                };
                Some(a >= r * b && vs_limit)
            }
            (Target::AtMostRatio { ratio: r }, Some(a), Some(b)) => Some(a <= r * b),
            (Target::Below, Some(a), Some(b)) => Some(a < b),
            _ => None,
        };
        Figure {
            key: key.into(),
            label: label.into(),
            unit: unit.into(),
            layercache,
            distribution,
            ratio,
            limit,
            of_limit: match (lc, limit) {
                (Some(a), Some(l)) if l != 0.0 => Some(a / l),
                _ => None,
            },
            target,
            pass,
        }
    }
}

/// Samples of one figure from both servers.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    /// From layercache.
    pub layercache: Vec<f64>,
    /// From distribution.
    pub distribution: Vec<f64>,
}

impl Samples {
    /// Record a sample from `kind`.
    pub fn push(&mut self, kind: Kind, value: f64) {
        match kind {
            Kind::Layercache => self.layercache.push(value),
            Kind::Distribution => self.distribution.push(value),
        }
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.layercache.is_empty() && self.distribution.is_empty()
    }
}

/// Every figure with its target, in table order; figures without samples are left out.
pub fn figures(
    samples: &BTreeMap<&'static str, Samples>,
    limits: &Limits,
    shape: &Shape,
) -> Vec<Figure> {
    let size = |mib: usize| {
        if mib.is_multiple_of(1024) {
            format!("{} GiB", mib / 1024)
        } else {
            format!("{mib} MiB")
        }
    };
    let blob = size(shape.blob_mib);
    let push_target = Target::AtLeast {
        ratio: 2.5,
        of_limit: Some(0.6),
    };
    let at_least = |ratio| Target::AtLeast {
        ratio,
        of_limit: None,
    };
    let loopback = limits.loopback_tcp.as_ref().map(|s| s.median);
    let median = |s: &Option<Summary>| s.as_ref().map(|s| s.median);
    let actions = size(shape.actions_mib);
    let of_ceiling = Target::OfLimit { fraction: 0.9 };
    // A restore reads back what was stored, as the null server streams a file: at least
    // its rate.
    let restore_ceiling = Target::OfLimit { fraction: 1.0 };
    let (small, large) = (shape.evict_small.describe(), shape.evict_large.describe());
    // With authentication on, the open server's rate in the same run is the limit.
    let open = |key: &str| {
        samples
            .get(key)
            .and_then(|s| Summary::of(&s.layercache))
            .map(|s| s.median)
    };
    let within_auth_off = Target::OfLimit { fraction: 0.9 };
    // A pull-through mirror's limits are figures of the same run: the upstream's own GET
    // for a miss, a pull of a blob pushed to layercache for a hit.
    let peer = |key: &str, kind: Kind| {
        let s = samples.get(key)?;
        let values = match kind {
            Kind::Layercache => &s.layercache,
            Kind::Distribution => &s.distribution,
        };
        Summary::of(values).map(|s| s.median)
    };
    let gib_cpu = |target| Target::AtMost { value: target };
    let null = |key: &str| limits.actions_null.get(key).map(|s| s.median);
    let rows: [(&str, String, &str, Option<f64>, Target); 70] = [
        (
            "push_mb_s",
            format!("push {blob}, monolithic"),
            "MB/s",
            limits.push(),
            push_target,
        ),
        (
            "chunked_mb_s",
            format!("push {blob}, {} chunks", size(shape.chunk_mib)),
            "MB/s",
            limits.push(),
            push_target,
        ),
        (
            "pull_mb_s",
            format!("pull {blob}"),
            "MB/s",
            loopback,
            Target::AtLeast {
                ratio: 1.0,
                of_limit: Some(0.9),
            },
        ),
        (
            "push_cpu",
            format!("push {blob}, monolithic: server CPU"),
            "CPU-s/GiB",
            limits.push_cpu(),
            gib_cpu(1.5),
        ),
        (
            "push_sys",
            format!("push {blob}, monolithic: in the kernel"),
            "CPU-s/GiB",
            None,
            Target::None,
        ),
        (
            "chunked_cpu",
            format!("push {blob}, chunked: server CPU"),
            "CPU-s/GiB",
            limits.push_cpu(),
            gib_cpu(1.5),
        ),
        (
            "chunked_sys",
            format!("push {blob}, chunked: in the kernel"),
            "CPU-s/GiB",
            None,
            Target::None,
        ),
        (
            "fresh_page_cpu",
            format!("writing {blob} into pages fresh to the VM, before each push"),
            "CPU-s/GiB",
            None,
            Target::None,
        ),
        (
            "pull_cpu",
            format!("pull {blob}: server CPU"),
            "CPU-s/GiB",
            median(&limits.loopback_mapped_cpu),
            gib_cpu(0.25),
        ),
        (
            "pulls_mb_s",
            format!(
                "{} concurrent pulls of {}",
                shape.pulls,
                size(shape.pull_mib)
            ),
            "MB/s",
            None,
            at_least(1.0),
        ),
        (
            "head_rps",
            format!("HEAD blob, {} conns", shape.head_conns),
            "req/s",
            None,
            at_least(10.0),
        ),
        (
            "head_p50_ms",
            "HEAD blob p50".into(),
            "ms",
            None,
            Target::None,
        ),
        (
            "head_p99_ms",
            "HEAD blob p99".into(),
            "ms",
            None,
            Target::AtMost { value: 5.0 },
        ),
        (
            "mput_rps",
            format!("manifest PUT, {} conns", shape.manifest_conns),
            "req/s",
            None,
            at_least(3.0),
        ),
        (
            "mput_p99_ms",
            "manifest PUT p99".into(),
            "ms",
            None,
            Target::AtMost { value: 10.0 },
        ),
        (
            "mget_rps",
            format!("manifest GET by tag, {} conns", shape.manifest_conns),
            "req/s",
            None,
            at_least(5.0),
        ),
        (
            "mget_p99_ms",
            "manifest GET p99".into(),
            "ms",
            None,
            Target::AtMost { value: 10.0 },
        ),
        (
            "head_auth_rps",
            format!("HEAD blob, {} conns, token mode", shape.head_conns),
            "req/s",
            open("head_rps"),
            within_auth_off,
        ),
        (
            "mput_auth_rps",
            format!("manifest PUT, {} conns, token mode", shape.manifest_conns),
            "req/s",
            open("mput_rps"),
            within_auth_off,
        ),
        (
            "mget_auth_rps",
            format!("manifest GET, {} conns, token mode", shape.manifest_conns),
            "req/s",
            open("mget_rps"),
            within_auth_off,
        ),
        (
            "export_s",
            format!(
                "cache export, {} blobs, {} missing",
                shape.export_blobs, shape.export_missing
            ),
            "s",
            None,
            Target::AtMostRatio { ratio: 0.5 },
        ),
        (
            "actions_v2_save_mib_s",
            format!("actions cache v2 save {actions}"),
            "MiB/s",
            median(&limits.actions_v2_save),
            of_ceiling,
        ),
        (
            "actions_v2_restore_mib_s",
            format!("actions cache v2 restore {actions}"),
            "MiB/s",
            median(&limits.actions_v2_restore),
            restore_ceiling,
        ),
        (
            "actions_v1_save_mib_s",
            format!("actions cache v1 save {actions}"),
            "MiB/s",
            median(&limits.actions_v1_save),
            of_ceiling,
        ),
        (
            "actions_v1_restore_mib_s",
            format!("actions cache v1 restore {actions}"),
            "MiB/s",
            median(&limits.actions_v1_restore),
            restore_ceiling,
        ),
        (
            "actions_v2_save_upload_mib_s",
            format!(
                "actions cache v2 save {actions}: after the archive (limit: the null server's)"
            ),
            "MiB/s",
            null("actions_v2_save_upload_mib_s"),
            Target::None,
        ),
        (
            "actions_v1_save_upload_mib_s",
            format!(
                "actions cache v1 save {actions}: after the archive (limit: the null server's)"
            ),
            "MiB/s",
            null("actions_v1_save_upload_mib_s"),
            Target::None,
        ),
        (
            "actions_v2_restore_download_mib_s",
            format!(
                "actions cache v2 restore {actions}: until downloaded (limit: the null server's)"
            ),
            "MiB/s",
            null("actions_v2_restore_download_mib_s"),
            Target::None,
        ),
        (
            "actions_v1_restore_download_mib_s",
            format!(
                "actions cache v1 restore {actions}: until downloaded (limit: the null server's)"
            ),
            "MiB/s",
            null("actions_v1_restore_download_mib_s"),
            Target::None,
        ),
        (
            "actions_v2_save_cpu",
            format!("actions cache v2 save {actions}: server CPU (limit: the null server's)"),
            "CPU-s/GiB",
            null("actions_v2_save_cpu"),
            Target::None,
        ),
        (
            "actions_v2_save_sys",
            format!("actions cache v2 save {actions}: in the kernel"),
            "CPU-s/GiB",
            None,
            Target::None,
        ),
        (
            "actions_v2_restore_cpu",
            format!("actions cache v2 restore {actions}: server CPU (limit: the null server's)"),
            "CPU-s/GiB",
            null("actions_v2_restore_cpu"),
            Target::None,
        ),
        (
            "actions_v1_save_cpu",
            format!("actions cache v1 save {actions}: server CPU (limit: the null server's)"),
            "CPU-s/GiB",
            null("actions_v1_save_cpu"),
            Target::None,
        ),
        (
            "actions_v1_save_sys",
            format!("actions cache v1 save {actions}: in the kernel"),
            "CPU-s/GiB",
            None,
            Target::None,
        ),
        (
            "actions_v1_restore_cpu",
            format!("actions cache v1 restore {actions}: server CPU (limit: the null server's)"),
            "CPU-s/GiB",
            null("actions_v1_restore_cpu"),
            Target::None,
        ),
        (
            "evict_small_roots_s",
            format!("eviction pass, {small}: roots"),
            "roots/s",
            None,
            Target::None,
        ),
        (
            "evict_small_blobs_s",
            format!("eviction pass, {small}: blobs swept"),
            "blobs/s",
            None,
            Target::None,
        ),
        (
            "evict_small_gib_s",
            format!("eviction pass, {small}: freed"),
            "GiB/s",
            None,
            Target::None,
        ),
        (
            "evict_small_s",
            format!("eviction pass, {small}: time"),
            "s",
            None,
            Target::None,
        ),
        (
            "evict_large_roots_s",
            format!("eviction pass, {large}: roots"),
            "roots/s",
            None,
            Target::None,
        ),
        (
            "evict_large_blobs_s",
            format!("eviction pass, {large}: blobs swept"),
            "blobs/s",
            None,
            Target::None,
        ),
        (
            "evict_large_gib_s",
            format!("eviction pass, {large}: freed"),
            "GiB/s",
            None,
            Target::None,
        ),
        (
            "evict_large_s",
            format!("eviction pass, {large}: time"),
            "s",
            None,
            Target::None,
        ),
        (
            "evict_push_idle_mb_s",
            format!("push {blob}, idle, {small} stored"),
            "MB/s",
            limits.push(),
            Target::None,
        ),
        (
            "evict_push_busy_mb_s",
            format!("push {blob} beside an eviction pass"),
            "MB/s",
            limits.push(),
            Target::None,
        ),
        (
            "evict_push_busy_pct",
            "push beside a pass / idle".into(),
            "%",
            None,
            Target::None,
        ),
        (
            "evict_pull_idle_mb_s",
            format!("pull {blob}, idle, {small} stored"),
            "MB/s",
            loopback,
            Target::None,
        ),
        (
            "evict_pull_busy_mb_s",
            format!("pull {blob} beside an eviction pass"),
            "MB/s",
            loopback,
            Target::None,
        ),
        (
            "evict_pull_busy_pct",
            "pull beside a pass / idle".into(),
            "%",
            None,
            Target::None,
        ),
        (
            "mirror_direct_mb_s",
            format!("pull-through: GET {blob} from the upstream itself"),
            "MB/s",
            None,
            Target::None,
        ),
        (
            "mirror_local_mb_s",
            format!("pull-through: GET {blob} pushed to layercache"),
            "MB/s",
            None,
            Target::None,
        ),
        (
            "mirror_miss_mb_s",
            format!("pull-through miss {blob} (limit: direct)"),
            "MB/s",
            peer("mirror_direct_mb_s", Kind::Distribution),
            Target::Within {
                fraction: 0.9,
                of: "direct",
            },
        ),
        (
            "mirror_hit_mb_s",
            format!("pull-through hit {blob} (limit: local pull)"),
            "MB/s",
            peer("mirror_local_mb_s", Kind::Layercache),
            Target::Within {
                fraction: 0.9,
                of: "local pull",
            },
        ),
        (
            "mirror_stored_mb_s",
            format!("pull-through miss {blob}, until stored"),
            "MB/s",
            None,
            Target::None,
        ),
        (
            "mirror_rss_mib",
            format!("pull-through miss {blob}: peak RSS"),
            "MiB",
            None,
            Target::AtMost {
                value: mirror_rss_bound(shape.blob_mib),
            },
        ),
        (
            "rss_mib",
            "peak RSS over the run".into(),
            "MiB",
            None,
            Target::Below,
        ),
        (
            "push_rss_mib",
            "peak RSS during the monolithic push".into(),
            "MiB",
            None,
            Target::None,
        ),
        (
            "chunked_rss_mib",
            "peak RSS during the chunked push".into(),
            "MiB",
            None,
            Target::None,
        ),
        (
            "pull_rss_mib",
            "peak RSS during the pulls of 1 GiB".into(),
            "MiB",
            None,
            Target::None,
        ),
        (
            "pulls_rss_mib",
            "peak RSS during the concurrent pulls".into(),
            "MiB",
            None,
            Target::None,
        ),
        (
            "head_rss_mib",
            "peak RSS during the HEAD load".into(),
            "MiB",
            None,
            Target::None,
        ),
        (
            "manifest_rss_mib",
            "peak RSS during the manifest PUTs and GETs".into(),
            "MiB",
            None,
            Target::None,
        ),
        (
            "export_rss_mib",
            "peak RSS during the cache export".into(),
            "MiB",
            None,
            Target::None,
        ),
        (
            "actions_save_rss_mib",
            "peak RSS during an Actions cache save (v2 and v1)".into(),
            "MiB",
            None,
            Target::None,
        ),
        (
            "actions_restore_rss_mib",
            "peak RSS during an Actions cache restore (v2 and v1)".into(),
            "MiB",
            None,
            Target::None,
        ),
        (
            "e2e_cold_s",
            "e2e cold build + push".into(),
            "s",
            None,
            Target::None,
        ),
        (
            "e2e_warm_s",
            "e2e warm rebuild".into(),
            "s",
            None,
            Target::AtMostRatio { ratio: 1.0 },
        ),
        (
            "e2e_compute_cold_s",
            "e2e compute: cold build + push".into(),
            "s",
            None,
            Target::None,
        ),
        (
            "e2e_compute_warm_s",
            "e2e compute: warm rebuild".into(),
            "s",
            None,
            Target::None,
        ),
        (
            "e2e_compute_pct",
            "e2e compute: warm / cold".into(),
            "%",
            None,
            Target::AtMost { value: 25.0 },
        ),
    ];
    rows.into_iter()
        .chain(project::figure_rows())
        .filter_map(|(key, label, unit, limit, target)| {
            let s = samples.get(key).filter(|s| !s.is_empty())?;
            Some(Figure::new(key, &label, unit, s, limit, target))
        })
        .collect()
}

/// The most resident memory a pull-through mirror may reach over a miss, in MiB: an
/// eighth of the blob (at least 64 MiB), so memory that grows with the blob fails.
pub fn mirror_rss_bound(blob_mib: usize) -> f64 {
    (blob_mib as f64 / 8.0).max(64.0)
}

/// The machine limits as a small table.
pub fn limits_table(limits: &Limits) -> String {
    let rows = [
        ("SHA-256, one core", &limits.sha256_one_core, "MB/s"),
        ("page-cache read", &limits.page_cache_read, "MB/s"),
        (
            "page-cache write, new file",
            &limits.page_cache_write_cpu,
            "CPU-s/GiB",
        ),
        (
            "page-cache write, pages just freed",
            &limits.page_cache_rewrite_cpu,
            "CPU-s/GiB",
        ),
        (
            "mapped cached file to loopback",
            &limits.loopback_mapped,
            "MB/s",
        ),
        (
            "mapped cached file to loopback, sender",
            &limits.loopback_mapped_cpu,
            "CPU-s/GiB",
        ),
        ("disk write, then fsync", &limits.disk_write_fsync, "MB/s"),
        (
            "disk write, fdatasync overlapped",
            &limits.disk_write_fsync_overlapped,
            "MB/s",
        ),
        ("loopback TCP, one stream", &limits.loopback_tcp, "MB/s"),
        ("HTTP client GET ceiling", &limits.http_get_ceiling, "MB/s"),
        ("HTTP client PUT ceiling", &limits.http_put_ceiling, "MB/s"),
        (
            "actions cache v2 save, null server",
            &limits.actions_v2_save,
            "MiB/s",
        ),
        (
            "actions cache v2 restore, null server",
            &limits.actions_v2_restore,
            "MiB/s",
        ),
        (
            "actions cache v1 save, null server",
            &limits.actions_v1_save,
            "MiB/s",
        ),
        (
            "actions cache v1 restore, null server",
            &limits.actions_v1_restore,
            "MiB/s",
        ),
    ];
    let rows: Vec<Vec<String>> = rows
        .iter()
        .filter_map(|(name, s, unit)| {
            s.as_ref()
                .map(|s| vec![(*name).to_owned(), format!("{} {unit}", s.show())])
        })
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    render(&["machine limit", "median [min-max]"], &rows)
}

/// The figures as the benchmark's table.
pub fn figures_table(figures: &[Figure]) -> String {
    let rows: Vec<Vec<String>> = figures
        .iter()
        .map(|f| {
            vec![
                format!("{} ({})", f.label, f.unit),
                f.layercache.as_ref().map_or("-".into(), Summary::show),
                f.distribution.as_ref().map_or("-".into(), Summary::show),
                f.ratio.map_or("-".into(), |r| format!("{r:.2}x")),
                f.limit.map_or("-".into(), num),
                f.of_limit.map_or("-".into(), |r| format!("{r:.2}x")),
                f.target.describe(&f.unit),
                match f.pass {
                    Some(true) => "PASS".into(),
                    Some(false) => "FAIL".into(),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    render(
        &[
            "figure",
            "layercache",
            "distribution",
            "lc/dist",
            "limit",
            "lc/limit",
            "target",
            "result",
        ],
        &rows,
    )
}

/// A plain-text table with aligned columns (first column left, others right).
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == 0 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect::<Vec<_>>()
            .join(" | ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    out.push_str(
        &widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-|-"),
    );
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// A number with precision that suits its size.
pub fn num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(lc: &[f64], dist: &[f64]) -> Samples {
        Samples {
            layercache: lc.to_vec(),
            distribution: dist.to_vec(),
        }
    }

    #[test]
    fn summary_takes_the_median_and_spread() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Summary::of(&[1.0, 4.0]).unwrap().median, 2.5);
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn throughput_target_needs_both_ratio_and_limit() {
        let target = Target::AtLeast {
            ratio: 2.5,
            of_limit: Some(0.6),
        };
        let s = samples(&[1000.0], &[300.0]);
        assert_eq!(
            Figure::new("k", "l", "MB/s", &s, Some(1500.0), target).pass,
            Some(true)
        );
        assert_eq!(
            Figure::new("k", "l", "MB/s", &s, Some(2000.0), target).pass,
            Some(false)
        );
        let slow_peer = samples(&[1000.0], &[500.0]);
        assert_eq!(
            Figure::new("k", "l", "MB/s", &slow_peer, None, target).pass,
            Some(false)
        );
    }

    #[test]
    fn time_and_latency_targets_are_upper_bounds() {
        let s = samples(&[4.0], &[10.0]);
        let half = Target::AtMostRatio { ratio: 0.5 };
        assert_eq!(Figure::new("k", "l", "s", &s, None, half).pass, Some(true));
        let p99 = Target::AtMost { value: 5.0 };
        assert_eq!(Figure::new("k", "l", "ms", &s, None, p99).pass, Some(true));
        assert_eq!(
            Figure::new("k", "l", "ms", &s, None, Target::Below).pass,
            Some(true)
        );
        assert_eq!(
            Figure::new("k", "l", "ms", &s, None, Target::None).pass,
            None
        );
    }

    #[test]
    fn fraction_of_limit_needs_the_limit_only() {
        let s = samples(&[95.0], &[]);
        let target = Target::OfLimit { fraction: 0.9 };
        let f = Figure::new("k", "l", "MiB/s", &s, Some(100.0), target);
        assert_eq!(f.pass, Some(true));
        assert_eq!(f.of_limit, Some(0.95));
        let f = Figure::new("k", "l", "MiB/s", &s, Some(110.0), target);
        assert_eq!(f.pass, Some(false));
        let f = Figure::new("k", "l", "MiB/s", &s, None, target);
        assert_eq!(f.pass, None);
    }

    #[test]
    fn within_another_figure_is_judged_against_it_and_names_it() {
        let s = samples(&[95.0], &[50.0]);
        let target = Target::Within {
            fraction: 0.9,
            of: "direct",
        };
        let f = Figure::new("k", "l", "MB/s", &s, Some(100.0), target);
        assert_eq!((f.pass, f.ratio), (Some(true), Some(1.9)));
        assert_eq!(target.describe("MB/s"), ">= 90% direct");
        let f = Figure::new("k", "l", "MB/s", &s, Some(120.0), target);
        assert_eq!(f.pass, Some(false));
    }
}
