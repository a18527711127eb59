//! Eviction: the store keeps itself inside its quota, online, least recently used first.
//!
//! A pass (see [`Store::gc`]) expires abandoned uploads, evicts roots (a manifest nothing
//! else needs, with its tags) from the least recently used while usage is above the low
//! watermark or a rule's maximum age has passed, then sweeps the blobs no manifest
//! references: those a root released (an evicted or deleted one referenced them) once
//! unused for the push window, any other once idle for the grace period (a client may
//! push layers long before their manifest).
//!
//! The quota holds without a cascade (invariant 7): a released blob is remembered as
//! such in the metadata, so it survives restarts and leaves at the first pass after its
//! window, for which a pass is scheduled; until then a pass counts it as freed already,
//! and evicts only what the low watermark needs beyond it.
//!
//! What is in use is never removed:
//! * a manifest PUT and the sweep are ordered by the metadata writer: the PUT either
//!   commits first (its references keep the blobs) or finds them gone and fails with
//!   MANIFEST_BLOB_UNKNOWN;
//! * an upload publishing a blob and the sweep removing it hold the digest's lock, so a
//!   sweep never deletes a file an upload has just published under the same digest;
//! * a blob a push checked or uploaded stays for the push window after its release, so
//!   the manifest PUT that ends the push finds it; one checked, uploaded or read after
//!   its release is taken up again and waits for the grace period like a new push;
//! * a manifest pushed by digest (an index's child, a referrer) is not evicted within the
//!   push window, so the index or referrer that names it finds it;
//! * a manifest that was read is leased for `in_use`: it is not evicted, and if it was
//!   read while being evicted, the blobs it references are leased too. Reads hold the
//!   read side of a barrier while they look a manifest up and take the lease; after each
//!   eviction the pass takes the write side, so every read that saw an evicted manifest
//!   has taken its lease before the sweep looks;
//! * a download in progress keeps its file open, which outlives the unlink.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use globset::{GlobBuilder, GlobMatcher};
use oci::{Digest, RepoName};
use regex::Regex;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::Eviction;
use crate::meta::{
    BlobUsage, Candidate, EntryRoot, EvictRequest, Evictable, RepoUsage, Root, Unreferenced,
    on_disk,
};
use crate::registry::QuotaBase;
use crate::{Error, Result, Store, now_secs};

/// Blobs forgotten and deleted per metadata transaction in a sweep.
const SWEEP_BATCH: usize = 256;
/// After a pass that falls short of the quota, commits do not wake another for this many
/// times its duration, and never sooner than [`SHORT_PASS_MIN_GAP`]: nothing more can go
/// until a root's window ends, and a pass on every commit of a busy, squeezed store
/// spends a core finding that out. A full disk and the schedule still start one.
const SHORT_PASS_SPACING: u32 = 20;
/// The least time between a pass that falls short and the next one a commit starts.
const SHORT_PASS_MIN_GAP: Duration = Duration::from_secs(1);
/// Most roots the first round of a pass offers for eviction, besides those a rule's
/// maximum age forces out: the pass goes round again while usage is over the low
/// watermark, each round offering twice as many as the last up to [`MOST_CANDIDATES`], so
/// what it holds stays small however many roots the store has, and a large need takes few
/// rounds (each lists the roots again). (A dry run reports one round.)
const FIRST_CANDIDATES: usize = 4096;
/// Most roots any round offers: a round holds its candidates and a copy of each one it
/// evicts, some 600 bytes a root, so about 10 MiB at this size.
const MOST_CANDIDATES: usize = 16384;
/// Roots listed ahead of the pass choosing among them.
const ROOTS_READ_AHEAD: usize = 256;

/// Why a pass ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// Asked for (`layercache gc`).
    Manual,
    /// Usage passed the high watermark, or the disk filled up.
    Quota,
    /// The periodic check.
    Schedule,
    /// The server started (finishing whatever a previous run left).
    Startup,
    /// Released blobs came out of their window.
    Released,
}

/// The data directory's usage, in bytes on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Stored blobs.
    pub blobs: u64,
    /// Their bytes on disk.
    pub blob_bytes: u64,
    /// Bytes in upload staging files.
    pub upload_bytes: u64,
    /// Bytes of the metadata database.
    pub metadata_bytes: u64,
    /// All of the above.
    pub total: u64,
    /// Of the blob bytes, those released and waiting out their window: they leave at the
    /// first pass after it.
    #[serde(default)]
    pub released_bytes: u64,
}

/// The quota in force, resolved against the filesystem.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// The most the store may hold.
    pub limit: u64,
    /// Usage at which eviction starts.
    pub high: u64,
    /// Usage eviction brings the store down to.
    pub low: u64,
    /// What `max_size` alone allows; above `limit` when the filesystem's free space is
    /// what bounds the store (it keeps `min_free` free, whoever else fills the disk).
    #[serde(default)]
    pub max_size: u64,
    /// The free space the store leaves on its filesystem (`min_free`, resolved).
    #[serde(default)]
    pub min_free: u64,
}

impl Quota {
    /// The filesystem's free space, not `max_size`, sets the limit.
    pub fn squeezed(&self) -> bool {
        self.limit < self.max_size
    }
}

/// A root a pass evicted (or would evict).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvictedRoot {
    /// The repository.
    pub repo: RepoName,
    /// The manifest.
    pub digest: Digest,
    /// The tags that pointed at it.
    pub tags: Vec<String>,
    /// Its last use, in seconds since the epoch.
    pub last_used: i64,
}

/// What one pass did (or, in a dry run, would do).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GcReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Why it ran.
    pub trigger: Trigger,
    /// When it started, in seconds since the epoch.
    pub started_at: i64,
    /// How long it took.
    pub seconds: f64,
    /// Usage before the pass.
    pub usage_before: Usage,
    /// Usage after it (in a dry run, the estimate).
    pub usage_after: Usage,
    /// The quota it worked to.
    pub quota: Quota,
    /// Roots evicted.
    pub evicted: Vec<EvictedRoot>,
    /// Cache entries evicted.
    #[serde(default)]
    pub evicted_entries: Vec<EntryRoot>,
    /// Roots passed over because they were read within the in-use window.
    pub kept_in_use: u64,
    /// Roots kept because a rule pins one of their tags.
    pub kept_pinned: u64,
    /// Blobs deleted.
    pub blobs_removed: u64,
    /// Bytes those blobs freed on disk.
    pub bytes_freed: u64,
    /// Abandoned upload sessions and staging files removed.
    pub uploads_expired: u64,
    /// Bytes released and still waiting out their window after the pass.
    #[serde(default)]
    pub released_bytes: u64,
    /// Bytes of unreferenced blobs never released, inside their grace (pushed ahead of
    /// their manifest).
    #[serde(default)]
    pub young_bytes: u64,
    /// Bytes the pass could not free towards the low watermark because every root left
    /// is in use or pinned (0 when the quota was met).
    #[serde(default)]
    pub shortfall: u64,
    /// When the next released blob comes out of its window, in seconds since the epoch:
    /// a pass is scheduled for then.
    #[serde(default)]
    pub next_sweep_at: Option<i64>,
}

/// One configured rule, compiled.
struct Rule {
    repositories: GlobMatcher,
    pin_tags: Vec<Regex>,
    max_age: Option<Duration>,
}

/// The eviction settings, compiled, with the evictor's live state.
pub(crate) struct Evictor {
    config: Eviction,
    rules: Vec<Rule>,
    /// Manifests and blobs in use, until the instant each lease ends.
    leases: Mutex<HashMap<Digest, Instant>>,
    /// Reads hold it shared while they look up a manifest and lease it; a pass takes
    /// it exclusively after evicting, to wait for reads that saw what it evicted.
    pub(crate) reads: tokio::sync::RwLock<()>,
    /// One pass at a time.
    pass: tokio::sync::Mutex<()>,
    /// Wakes the background pass early (usage passed the high watermark, disk full).
    pub(crate) wake: Arc<tokio::sync::Notify>,
    /// An upload found the disk full: the next pass evicts as if usage were at the quota.
    disk_full: std::sync::atomic::AtomicBool,
    /// Usage at the last pass plus blobs committed since: a cheap trigger.
    estimate: AtomicU64,
    /// The high watermark at the last pass (`u64::MAX` before the first).
    high: AtomicU64,
    /// Commits do not wake a pass before this instant (see [`SHORT_PASS_SPACING`]).
    held_until: Mutex<Option<Instant>>,
    /// Passes run (not counting dry runs).
    passes: AtomicU64,
    /// The last pass that was not a dry run.
    last: Mutex<Option<GcReport>>,
    /// The last pass fell short of the quota (so a recovery is logged once, too).
    short: std::sync::atomic::AtomicBool,
    /// The filesystem's free space made a pass evict (logged once each way).
    squeezed: std::sync::atomic::AtomicBool,
}

impl Evictor {
    /// Compile `config`, refusing invalid patterns or watermarks.
    pub(crate) fn new(config: Eviction) -> Result<Evictor> {
        if config.low_watermark > config.high_watermark {
            return Err(Error::Config(format!(
                "eviction low watermark {} is above the high watermark {}",
                config.low_watermark, config.high_watermark
            )));
        }
        let rules = config
            .rules
            .iter()
            .map(|rule| {
                let repositories = GlobBuilder::new(&rule.repositories)
                    .literal_separator(true)
                    .build()
                    .map_err(|e| Error::Config(format!("eviction rule repositories: {e}")))?
                    .compile_matcher();
                let pin_tags = rule
                    .pin_tags
                    .iter()
                    .map(|p| {
                        Regex::new(&format!("^(?:{p})$"))
                            .map_err(|e| Error::Config(format!("eviction rule pin_tags: {e}")))
                    })
                    .collect::<Result<_>>()?;
                Ok(Rule {
                    repositories,
                    pin_tags,
                    max_age: rule.max_age,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Evictor {
            config,
            rules,
            leases: Mutex::default(),
            reads: tokio::sync::RwLock::new(()),
            pass: tokio::sync::Mutex::new(()),
            wake: Arc::default(),
            disk_full: Default::default(),
            estimate: AtomicU64::new(0),
            high: AtomicU64::new(u64::MAX),
            held_until: Mutex::default(),
            passes: AtomicU64::new(0),
            last: Mutex::default(),
            short: Default::default(),
            squeezed: Default::default(),
        })
    }

    /// How often the background pass runs unprompted.
    pub(crate) fn interval(&self) -> Duration {
        self.config.interval
    }

    /// Mark `digests` in use for the in-use window.
    pub(crate) fn lease<'a>(&self, digests: impl IntoIterator<Item = &'a Digest>) {
        let until = Instant::now() + self.config.in_use;
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        for digest in digests {
            leases.insert(digest.clone(), until);
        }
    }

    /// Lease `references` if `manifest`, just removed, was read within the in-use window:
    /// first wait for reads that may have seen it, so they hold their leases.
    pub(crate) async fn lease_if_read(&self, manifest: &Digest, references: &[Digest]) {
        drop(self.reads.write().await);
        if self.leased(manifest) {
            self.lease(references);
        }
    }

    fn leased(&self, digest: &Digest) -> bool {
        self.lease_end(digest).is_some()
    }

    /// When `digest`'s lease ends, if it is leased now.
    fn lease_end(&self, digest: &Digest) -> Option<Instant> {
        let leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        leases
            .get(digest)
            .copied()
            .filter(|&until| until > Instant::now())
    }

    fn drop_expired_leases(&self) {
        let now = Instant::now();
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        leases.retain(|_, until| *until > now);
    }

    /// A blob of `bytes` was committed: wake the pass if usage may have passed the high
    /// watermark.
    pub(crate) fn added(&self, bytes: u64) {
        let estimate = self.estimate.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if estimate > self.high.load(Ordering::Relaxed) && !self.held() {
            self.wake.notify_one();
        }
    }

    /// Whether commits are held from waking a pass (the last one fell short).
    fn held(&self) -> bool {
        let held_until = self.held_until.lock().unwrap_or_else(|p| p.into_inner());
        held_until.is_some_and(|until| Instant::now() < until)
    }

    /// Record a finished pass that took `took`: if it fell short of the quota, hold
    /// commits from waking the next for a while.
    fn finished(&self, report: &GcReport, took: Duration) {
        self.passes.fetch_add(1, Ordering::Relaxed);
        let hold = (report.shortfall > 0).then(|| {
            let gap = (took * SHORT_PASS_SPACING).max(SHORT_PASS_MIN_GAP);
            Instant::now() + gap.min(self.config.interval)
        });
        *self.held_until.lock().unwrap_or_else(|p| p.into_inner()) = hold;
    }

    /// An upload found the disk full: run a pass now that makes room.
    pub(crate) fn disk_full(&self) {
        self.disk_full.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// The last pass that changed something (or found nothing to do).
    pub(crate) fn last_report(&self) -> Option<GcReport> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Log, once each way, that a pass could not meet the quota or met it again.
    fn note_shortfall(&self, report: &GcReport) {
        let short = report.shortfall > 0;
        if self.short.swap(short, Ordering::Relaxed) == short {
            return;
        }
        if short {
            tracing::warn!(
                usage = report.usage_after.total,
                limit = report.quota.limit,
                low_watermark = report.quota.low,
                shortfall = report.shortfall,
                roots_in_use = report.kept_in_use,
                roots_pinned = report.kept_pinned,
                released_waiting = report.released_bytes,
                young = report.young_bytes,
                uploads = report.usage_after.upload_bytes,
                "the quota cannot be met: every root left is in use or pinned"
            );
        } else {
            tracing::info!(
                usage = report.usage_after.total,
                limit = report.quota.limit,
                "the quota is met again"
            );
        }
    }

    fn rule_for(&self, repo: &RepoName) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| r.repositories.is_match(repo.as_str()))
    }

    /// The quota on a filesystem of `total` bytes with `available` free, when the store
    /// uses `used`.
    fn quota(&self, used: u64, total: u64, available: u64) -> Quota {
        let max_size = self.config.max_size.resolve(total);
        let min_free = self.config.min_free.resolve(total);
        let limit = max_size.min((used + available).saturating_sub(min_free));
        self.watermarks(Quota {
            limit,
            max_size,
            min_free,
            ..Quota::default()
        })
    }

    /// `quota` lowered to `used`, when that is less.
    fn shrink(&self, quota: Quota, used: u64) -> Quota {
        self.watermarks(Quota {
            limit: quota.limit.min(used),
            ..quota
        })
    }

    /// `quota` with the watermarks of its limit.
    fn watermarks(&self, quota: Quota) -> Quota {
        Quota {
            high: self.config.high_watermark.of(quota.limit),
            low: self.config.low_watermark.of(quota.limit),
            ..quota
        }
    }

    /// Log, once each way, that the filesystem's free space rather than `max_size` made
    /// a pass evict, or that `max_size` bounds the store again.
    fn note_squeeze(&self, report: &GcReport) {
        let quota = &report.quota;
        let evicting = !report.evicted.is_empty()
            || !report.evicted_entries.is_empty()
            || report.shortfall > 0;
        let squeezed = quota.squeezed();
        // Squeezed but not evicting: as it was.
        if (squeezed && !evicting) || self.squeezed.swap(squeezed, Ordering::Relaxed) == squeezed {
            return;
        }
        if squeezed {
            tracing::warn!(
                limit = quota.limit,
                max_size = quota.max_size,
                min_free = quota.min_free,
                usage = report.usage_before.total,
                "evicting to keep min_free free on the data directory's filesystem: its free \
                 space leaves the store less than max_size (other files fill it, or it is \
                 smaller than max_size)"
            );
        } else {
            tracing::info!(
                limit = quota.limit,
                "the quota is max_size again: the filesystem has room for it"
            );
        }
    }
}

/// Total and available bytes of the filesystem holding `path`.
fn filesystem(path: &Path) -> Result<(u64, u64)> {
    let stat = rustix::fs::statvfs(path).map_err(|e| Error::Io(e.into()))?;
    Ok((
        stat.f_blocks.saturating_mul(stat.f_frsize),
        stat.f_bavail.saturating_mul(stat.f_frsize),
    ))
}

impl Store {
    /// The store's current usage and the quota in force.
    pub async fn usage(&self) -> Result<(Usage, Quota)> {
        let BlobUsage {
            blobs,
            bytes,
            released_bytes,
        } = self.0.meta.blob_usage().await?;
        let upload_bytes = self
            .0
            .blobs
            .staged()
            .await?
            .iter()
            .map(|s| on_disk(s.len))
            .sum();
        let metadata_bytes = self.0.meta.footprint().await?;
        let usage = Usage {
            blobs,
            blob_bytes: bytes,
            upload_bytes,
            metadata_bytes,
            total: bytes + upload_bytes + metadata_bytes,
            released_bytes,
        };
        let evictor = &self.0.evictor;
        let quota = match self.0.quota_base {
            QuotaBase::Disk => {
                let root = self.0.data_dir.clone();
                let (total, available) =
                    tokio::task::spawn_blocking(move || filesystem(&root)).await??;
                evictor.quota(usage.total, total, available)
            }
            // A bucket has no free space to keep: only the configured size bounds it.
            QuotaBase::Bucket(limit) => Quota {
                min_free: 0,
                ..evictor.quota(usage.total, limit, u64::MAX / 2)
            },
        };
        Ok((usage, quota))
    }

    /// What each repository holds, largest first (a blob shared by repositories counts
    /// in each of them).
    pub async fn repository_usage(&self) -> Result<Vec<RepoUsage>> {
        self.0.meta.repository_usage().await
    }

    /// The last eviction pass's report, if one ran.
    pub fn last_gc(&self) -> Option<GcReport> {
        self.0.evictor.last_report()
    }

    /// Eviction passes run since the store opened (dry runs not counted).
    pub fn gc_passes(&self) -> u64 {
        self.0.evictor.passes.load(Ordering::Relaxed)
    }

    /// Run one eviction pass now (see the module documentation); with `dry_run`, report
    /// what it would do and change nothing.
    pub async fn gc(&self, trigger: Trigger, dry_run: bool) -> Result<GcReport> {
        let _one_pass = self.0.evictor.pass.lock().await;
        // Nodes sharing the metadata take turns; a dry run changes nothing.
        let _lead = match dry_run {
            true => None,
            false => self.0.meta.lead(true).await?,
        };
        self.pass(trigger, dry_run).await
    }

    /// Run one pass, unless another node sharing the metadata is running one (`None`).
    pub(crate) async fn gc_unless_running(&self, trigger: Trigger) -> Result<Option<GcReport>> {
        let _one_pass = self.0.evictor.pass.lock().await;
        let Some(_lead) = self.0.meta.lead(false).await? else {
            return Ok(None);
        };
        if trigger == Trigger::Startup {
            match self.remove_unknown_blob_files().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(files = n, "removed blob files an interrupted run left"),
                Err(e) => tracing::warn!(error = %e, "checking blob files failed"),
            }
        }
        self.pass(trigger, false).await.map(Some)
    }

    async fn pass(&self, trigger: Trigger, dry_run: bool) -> Result<GcReport> {
        let evictor = &self.0.evictor;
        let started = Instant::now();
        let started_at = now_secs();
        self.flush_access_times().await?;
        evictor.drop_expired_leases();
        // A blob taken up again stays at least as long as it would have as released.
        let grace = evictor.config.grace.max(evictor.config.push_window);
        let idle_before = started_at - grace.as_secs() as i64;
        let unused_before = started_at - evictor.config.push_window.as_secs() as i64;
        let uploads_expired = self.expire_uploads(started_at, dry_run).await?;
        let (usage_before, mut quota) = self.usage().await?;
        // Released bytes are as good as gone: eviction starts when what stays passes the
        // high watermark.
        let staying = usage_before
            .total
            .saturating_sub(usage_before.released_bytes);
        if !dry_run && evictor.disk_full.swap(false, Ordering::Relaxed) {
            // The failed upload's bytes are gone again, so usage looks fine: make room
            // as if the store were at its limit.
            quota = evictor.shrink(quota, staying);
        }
        let over = staying > quota.high;
        let mut report = GcReport {
            dry_run,
            trigger,
            started_at,
            seconds: 0.0,
            usage_before,
            usage_after: usage_before,
            quota,
            evicted: Vec::new(),
            evicted_entries: Vec::new(),
            kept_in_use: 0,
            kept_pinned: 0,
            blobs_removed: 0,
            bytes_freed: 0,
            uploads_expired,
            released_bytes: 0,
            young_bytes: 0,
            shortfall: 0,
            next_sweep_at: None,
        };
        let mut used = usage_before.total;
        let mut most = FIRST_CANDIDATES;
        loop {
            let need = if over {
                used.saturating_sub(quota.low)
            } else {
                0
            };
            let candidates = self.candidates(started_at, need, most, &mut report).await?;
            most = (most * 2).min(MOST_CANDIDATES);
            let outcome = self
                .0
                .meta
                .evict(EvictRequest {
                    candidates,
                    need,
                    idle_before,
                    unused_before,
                    dry_run,
                })
                .await?;
            // Wait for reads that may have seen an evicted manifest: they hold leases now.
            drop(evictor.reads.write().await);
            for evicted in &outcome.evicted {
                if let Evictable::Manifest(root) = &evicted.root
                    && evictor.leased(&root.digest)
                {
                    evictor.lease(&evicted.references);
                }
            }
            let progress = !outcome.evicted.is_empty();
            for evicted in outcome.evicted {
                match evicted.root {
                    Evictable::Manifest(root) => report.evicted.push(EvictedRoot {
                        repo: root.repo,
                        digest: root.digest,
                        tags: root.tags,
                        last_used: root.last_used,
                    }),
                    Evictable::Entry(entry) => report.evicted_entries.push(entry),
                }
            }
            // What is leased or was read since the flush waits for a later pass.
            let mut due = Vec::new();
            let mut waiting = outcome.waiting;
            for blob in outcome.sweepable {
                if dry_run
                    || !(evictor.leased(&blob.digest) || self.0.access.pending_blob(&blob.digest))
                {
                    due.push(blob);
                } else if blob.released {
                    waiting.push(blob);
                }
            }
            let swept = if dry_run {
                due.into_iter().map(|b| (b.digest, b.size)).collect()
            } else {
                self.sweep(due, idle_before, unused_before).await?
            };
            let freed: u64 = swept.iter().map(|(_, s)| on_disk(*s)).sum();
            report.blobs_removed += swept.len() as u64;
            report.bytes_freed += freed;
            report.released_bytes = waiting.iter().map(|b| on_disk(b.size)).sum();
            report.young_bytes = outcome.young_bytes;
            report.shortfall = need.saturating_sub(outcome.counted);
            report.next_sweep_at = self.next_sweep(&waiting, started_at);
            used = used.saturating_sub(freed);
            // Evicting an index can make its children roots: go round while that helps.
            if dry_run
                || !progress
                || !over
                || used.saturating_sub(report.released_bytes) <= quota.low
            {
                break;
            }
        }
        report.usage_after = if dry_run {
            Usage {
                total: used,
                blobs: usage_before.blobs - report.blobs_removed.min(usage_before.blobs),
                blob_bytes: usage_before.blob_bytes.saturating_sub(report.bytes_freed),
                released_bytes: report.released_bytes,
                ..usage_before
            }
        } else {
            self.usage().await?.0
        };
        report.seconds = started.elapsed().as_secs_f64();
        if !dry_run {
            // Released bytes are as good as gone: only growth beyond them wakes a pass.
            let projected = report
                .usage_after
                .total
                .saturating_sub(report.usage_after.released_bytes);
            evictor.estimate.store(projected, Ordering::Relaxed);
            evictor.high.store(quota.high, Ordering::Relaxed);
            evictor.finished(&report, started.elapsed());
            evictor.note_shortfall(&report);
            evictor.note_squeeze(&report);
            *evictor.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
        }
        Ok(report)
    }

    /// When the first of `waiting` may be swept, in seconds since the epoch: after its
    /// window, and after its lease if it has one.
    fn next_sweep(&self, waiting: &[Unreferenced], now: i64) -> Option<i64> {
        let evictor = &self.0.evictor;
        let window = evictor.config.push_window.as_secs() as i64;
        waiting
            .iter()
            .map(|blob| {
                // Sweepable once its last use is strictly before `now - window`.
                let unused = blob.last_used + window + 1;
                let leased = evictor.lease_end(&blob.digest).map(|end| {
                    now + end.saturating_duration_since(Instant::now()).as_secs() as i64 + 1
                });
                unused.max(leased.unwrap_or(0)).max(now + 1)
            })
            .min()
    }

    /// When the background loop should run a pass for released blobs coming due.
    pub(crate) fn next_sweep_at(&self) -> Option<i64> {
        self.0
            .evictor
            .last_report()
            .and_then(|report| report.next_sweep_at)
    }

    /// The roots eviction may take, in order: neither pinned nor in use (read within
    /// `in_use`, or an untagged manifest pushed within the push window), the first
    /// `most` of them and every one a maximum age forces out. None when
    /// nothing needs freeing and no rule sets a maximum age.
    async fn candidates(
        &self,
        now: i64,
        need: u64,
        most: usize,
        report: &mut GcReport,
    ) -> Result<Vec<Candidate>> {
        let evictor = &self.0.evictor;
        let mut candidates = Vec::new();
        (report.kept_in_use, report.kept_pinned) = (0, 0);
        if need == 0 && evictor.rules.iter().all(|r| r.max_age.is_none()) {
            return Ok(candidates);
        }
        let in_use = evictor.config.in_use.as_secs() as i64;
        let push_window = evictor.config.push_window.as_secs() as i64;
        let (into, mut roots) = mpsc::channel(ROOTS_READ_AHEAD);
        let choose = async {
            while let Some(root) = roots.recv().await {
                let root = match root {
                    Evictable::Manifest(root) => root,
                    Evictable::Entry(entry) => {
                        // A restore may still be reading it.
                        if now - entry.last_used < in_use {
                            report.kept_in_use += 1;
                        } else if candidates.len() < most {
                            candidates.push(Candidate {
                                root: Evictable::Entry(entry),
                                forced: false,
                            });
                        }
                        continue;
                    }
                };
                let rule = evictor.rule_for(&root.repo);
                if rule.is_some_and(|r| pinned(r, &root)) {
                    report.kept_pinned += 1;
                    continue;
                }
                if evictor.leased(&root.digest) {
                    report.kept_in_use += 1;
                    continue;
                }
                if root.tags.is_empty() && now - root.last_used <= push_window {
                    // Pushed by digest just now: the index or referrer naming it comes next.
                    report.kept_in_use += 1;
                    continue;
                }
                let forced = rule
                    .and_then(|r| r.max_age)
                    .is_some_and(|age| now - root.last_used > age.as_secs() as i64);
                if forced || candidates.len() < most {
                    candidates.push(Candidate {
                        root: Evictable::Manifest(root),
                        forced,
                    });
                }
            }
        };
        let (listed, ()) = tokio::join!(self.0.meta.roots(into), choose);
        listed?;
        Ok(candidates)
    }

    /// Delete those of `blobs` that are still sweepable: the metadata first, then the
    /// files, under each digest's lock. Returns what was deleted.
    async fn sweep(
        &self,
        blobs: Vec<Unreferenced>,
        idle_before: i64,
        unused_before: i64,
    ) -> Result<Vec<(Digest, u64)>> {
        let mut swept = Vec::new();
        for batch in blobs.chunks(SWEEP_BATCH) {
            let digests: Vec<Digest> = batch.iter().map(|b| b.digest.clone()).collect();
            let _locked = self.0.blobs.lock_digests(&digests).await?;
            let forgotten = self
                .0
                .meta
                .forget_blobs(digests, idle_before, unused_before)
                .await?;
            for (digest, _) in &forgotten {
                self.0.blobs.delete(digest).await?;
            }
            swept.extend(forgotten);
        }
        Ok(swept)
    }

    /// Remove upload sessions and staging files idle for the expiry (or, in a dry run,
    /// count them). A session with no staging file is removed at once.
    async fn expire_uploads(&self, now: i64, dry_run: bool) -> Result<u64> {
        let expiry = self.0.evictor.config.upload_expiry;
        // Sessions first: a session's staging file exists before its record, so one
        // missing from the later listing has finished or is gone for good; the record of
        // one that is gone goes once the session is older than the expiry.
        let sessions: HashMap<_, _> = self.0.meta.uploads().await?.into_iter().collect();
        let staged = self.0.blobs.staged().await?;
        let mut expired = 0;
        for area in &staged {
            if area.idle < expiry {
                continue;
            }
            if !dry_run {
                // A request still streaming into it (however slowly) holds its lock: in
                // use, so not expired, and the pass does not wait on that client.
                let lock = self.0.hashes.lock_for(&area.id);
                let Ok(_held) = lock.try_lock() else {
                    continue;
                };
                self.0.blobs.discard(&area.id).await?;
                if sessions.contains_key(&area.id) {
                    self.end_upload(&area.id).await?;
                }
            }
            expired += 1;
        }
        let expiry_ms = expiry.as_millis() as i64;
        if !dry_run {
            // Cache entries reserved and never finished.
            expired += self.0.meta.expire_entries(now * 1000 - expiry_ms).await?;
        }
        let staged_ids: std::collections::HashSet<_> = staged.iter().map(|s| &s.id).collect();
        for (id, started) in &sessions {
            if !staged_ids.contains(id) && now - started > expiry.as_secs() as i64 {
                expired += 1;
                if !dry_run {
                    self.end_upload(id).await?;
                }
            }
        }
        Ok(expired)
    }

    /// Delete committed blob files the metadata does not know (left by a crash between
    /// a sweep's metadata commit and its unlink, or an upload's publish and its link).
    pub(crate) async fn remove_unknown_blob_files(&self) -> Result<u64> {
        let mut removed = 0;
        for digest in self.0.blobs.list().await? {
            let _locked = self
                .0
                .blobs
                .lock_digests(std::slice::from_ref(&digest))
                .await?;
            if self.0.meta.blob_size(&digest).await?.is_none() {
                self.0.blobs.delete(&digest).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Whether `rule` pins one of `root`'s tags.
fn pinned(rule: &Rule, root: &Root) -> bool {
    root.tags
        .iter()
        .any(|tag| rule.pin_tags.iter().any(|p| p.is_match(tag)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Percent, Size};

    fn evictor(max_size: Size, min_free: Size) -> Evictor {
        Evictor::new(Eviction {
            max_size,
            min_free,
            ..Eviction::default()
        })
        .unwrap()
    }

    #[test]
    fn the_quota_is_the_lower_of_the_size_and_what_keeps_the_disk_free() {
        const GIB: u64 = 1 << 30;
        let e = evictor(Size::Percent(Percent(60)), Size::Percent(Percent(10)));
        // 100 GiB disk, 30 GiB used by the store, 50 GiB free: 60 % of the disk.
        let q = e.quota(30 * GIB, 100 * GIB, 50 * GIB);
        assert_eq!(
            (q.limit, q.max_size, q.min_free),
            (60 * GIB, 60 * GIB, 10 * GIB)
        );
        assert!(!q.squeezed());
        // Others filled the disk to 5 GiB free: keep 10 GiB free, so 25 GiB.
        let q = e.quota(30 * GIB, 100 * GIB, 5 * GIB);
        assert_eq!((q.limit, q.max_size), (25 * GIB, 60 * GIB));
        assert!(q.squeezed());
        assert_eq!((q.high, q.low), (q.limit * 9 / 10, q.limit * 8 / 10));
        // Less than min_free is free even without the store: it may keep nothing.
        assert_eq!(e.quota(0, 100 * GIB, 5 * GIB).limit, 0);
        let fixed = evictor(Size::Bytes(GIB), Size::Bytes(0));
        assert_eq!(fixed.quota(0, 100 * GIB, 100 * GIB).limit, GIB);
    }

    #[test]
    fn bad_rules_and_watermarks_are_refused() {
        let inverted = Eviction {
            high_watermark: Percent(70),
            low_watermark: Percent(80),
            ..Eviction::default()
        };
        assert!(matches!(Evictor::new(inverted), Err(Error::Config(_))));
        let bad_pattern = Eviction {
            rules: vec![crate::config::Rule {
                repositories: "cache/*".into(),
                pin_tags: vec!["(unclosed".into()],
                max_age: None,
            }],
            ..Eviction::default()
        };
        assert!(matches!(Evictor::new(bad_pattern), Err(Error::Config(_))));
    }

    #[test]
    fn rules_match_repositories_by_segment_and_pin_whole_tags() {
        let e = Evictor::new(Eviction {
            rules: vec![crate::config::Rule {
                repositories: "cache/*".into(),
                pin_tags: vec!["main|release-.*".into()],
                max_age: None,
            }],
            ..Eviction::default()
        })
        .unwrap();
        let name = |s: &str| s.parse::<RepoName>().unwrap();
        assert!(e.rule_for(&name("cache/app")).is_some());
        assert!(e.rule_for(&name("cache/app/sub")).is_none());
        let rule = e.rule_for(&name("cache/app")).unwrap();
        let root = |tag: &str| Root {
            repo: name("cache/app"),
            digest: Digest::sha256_of(tag.as_bytes()),
            tags: vec![tag.to_owned()],
            last_used: 0,
        };
        assert!(pinned(rule, &root("main")));
        assert!(pinned(rule, &root("release-1.2")));
        assert!(!pinned(rule, &root("mainline")));
    }
}
