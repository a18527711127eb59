//! The eviction workload: how fast one pass evicts, and what a long pass costs a push and a
//! pull beside it. Eviction is layercache's own; distribution's garbage collection is
//! offline and serves as a reference.
//!
//! Every measurement has a layercache of its own (its own data directory and
//! configuration file) on which only the quota decides: no grace, no in-use lease, no
//! push window, no free-space reserve, no periodic pass.
//!
//! * **Throughput.** The server is filled over HTTP with many images of one shape (many
//!   with small layers, or fewer with large ones), then restarted with a quota whose low
//!   watermark keeps a tenth of the blob bytes (its configuration file rewritten), as an
//!   operator lowering the quota does; the pass the server runs at startup evicts the
//!   rest. (Lowering the quota takes a restart, and a `POST /api/v1/gc` would only queue
//!   behind that pass.) Its report, from `GET /api/v1/gc`, gives roots evicted, blobs
//!   swept and bytes freed per second of the pass.
//! * **Reference.** The same images are pushed to the distribution registry, the
//!   manifests layercache evicted are deleted over the API, and the registry is stopped
//!   for `registry garbage-collect`, whose wall time its figures use.
//! * **Beside a pass.** On a server filled with the small images, 1 GiB pushes and pulls
//!   are timed while it is idle, then, alternating, from its restart with the lowered
//!   quota until the startup pass has ended. The pass's start is known only afterwards
//!   (its report's duration before its end), so each transfer's overlap with the pass is
//!   computed then, and only those the pass ran for all of count as beside it.
//!   The transfers' images are pinned, so the pass never takes what a pull reads.
//!   Distribution's idle figures come from a registry holding the same small images.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::limits::GIB;
use crate::payload::{Base, Blob};
use crate::registry::{OCI_MANIFEST, Registry};
use crate::report::{self, Samples, Summary};
use crate::servers::{self, Kind, Server};
use crate::workloads::{self, REPO_BLOBS, Shape};

/// Concurrent image pushes while filling a server.
const FILL_CONNS: usize = 16;
/// Concurrent manifest deletes on distribution.
const DELETE_CONNS: usize = 16;
/// Repositories the images of a fill are spread over.
const REPOS: usize = 100;
/// The low watermark the quota is set with, in percent of it.
const LOW_WATERMARK: u64 = 80;
/// Idle pushes and pulls on each server (per round on layercache).
const IDLE_TRANSFERS: usize = 2;
/// Most pushes (and pulls) beside one pass: each push stores another blob.
const MAX_BESIDE: usize = 4;
/// A transfer this much inside a pass counts as beside it.
const INSIDE: f64 = 0.95;
/// How often the end of a pass is looked for while transfers run beside it (the
/// precision of its start and end).
const POLL: Duration = Duration::from_millis(50);
/// How often the end of a pass timed alone is looked for (each look costs the server a
/// usage query).
const POLL_ALONE: Duration = Duration::from_millis(250);
/// The longest a pass may take.
const PASS_TIMEOUT: Duration = Duration::from_secs(600);
/// Media type of the images' layers.
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Media type of the images' configs.
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// The images one fill pushes.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Fill {
    /// Images (each a root: a tagged manifest).
    pub images: usize,
    /// Layers per image, each a distinct blob.
    pub layers: usize,
    /// Size of each layer, in KiB (below 1024, or whole MiB).
    pub layer_kib: usize,
}

impl Fill {
    /// `4000 images of 3 x 256 KiB`.
    pub fn describe(&self) -> String {
        let layer = if self.layer_kib >= 1024 {
            format!("{} MiB", self.layer_kib / 1024)
        } else {
            format!("{} KiB", self.layer_kib)
        };
        format!("{} images of {} x {layer}", self.images, self.layers)
    }
}

/// One measured pass.
#[derive(Clone, Debug, Serialize)]
pub struct Pass {
    /// Which fill: `small`, `large`, or `busy` (small, with a push and a pull beside it).
    pub fill: &'static str,
    /// Round, from 1.
    pub round: usize,
    /// Images pushed.
    pub images: usize,
    /// Seconds the fill's pushes took.
    pub fill_secs: f64,
    /// Why the pass ran, as its report says.
    pub trigger: String,
    /// The pass's own duration, from its report.
    pub seconds: f64,
    /// From the restarted server's spawn to the pass's report being seen.
    pub restart_to_done_secs: f64,
    /// Roots (manifests with their tags, and cache entries) evicted.
    pub roots_evicted: usize,
    /// Blobs swept.
    pub blobs_removed: u64,
    /// Bytes the sweep freed on disk.
    pub bytes_freed: u64,
    /// Usage before the pass, in bytes.
    pub usage_before: u64,
    /// Usage after it.
    pub usage_after: u64,
    /// The quota it worked to.
    pub quota_limit: u64,
    /// Bytes released and still waiting out their window after it.
    pub released_bytes: u64,
    /// Bytes it could not free towards the low watermark.
    pub shortfall: u64,
}

impl Pass {
    /// The pass `gc` reports, on a fill of `images` pushed in `fill_secs`, seen ended
    /// `restart_to_done` after the server was spawned.
    fn new(
        fill: &'static str,
        round: usize,
        images: usize,
        fill_secs: f64,
        gc: &GcReport,
        restart_to_done: Duration,
    ) -> Pass {
        Pass {
            fill,
            round: round + 1,
            images,
            fill_secs,
            trigger: gc.trigger.clone(),
            seconds: gc.seconds,
            restart_to_done_secs: restart_to_done.as_secs_f64(),
            roots_evicted: gc.evicted.len() + gc.evicted_entries.len(),
            blobs_removed: gc.blobs_removed,
            bytes_freed: gc.bytes_freed,
            usage_before: gc.usage_before.total,
            usage_after: gc.usage_after.total,
            quota_limit: gc.quota.limit,
            released_bytes: gc.released_bytes,
            shortfall: gc.shortfall,
        }
    }

    /// Roots evicted per second of the pass.
    fn roots_per_s(&self) -> f64 {
        self.roots_evicted as f64 / self.seconds
    }

    /// Blobs swept per second of the pass.
    fn blobs_per_s(&self) -> f64 {
        self.blobs_removed as f64 / self.seconds
    }

    /// GiB freed per second of the pass.
    fn gib_per_s(&self) -> f64 {
        self.bytes_freed as f64 / GIB / self.seconds
    }
}

/// Distribution on the same images: the manifests layercache evicted deleted, then the
/// registry stopped and its garbage collector run.
#[derive(Clone, Debug, Serialize)]
pub struct Reference {
    /// Which fill.
    pub fill: &'static str,
    /// Images pushed.
    pub images: usize,
    /// Seconds the fill's pushes took.
    pub fill_secs: f64,
    /// Manifests deleted (`DELETE /v2/<name>/manifests/<digest>`).
    pub deleted: usize,
    /// Seconds the deletes took.
    pub delete_secs: f64,
    /// Wall time of `registry garbage-collect`.
    pub gc_secs: f64,
    /// Blob files it removed (manifests are blobs there too).
    pub blobs_removed: u64,
    /// Their bytes on disk.
    pub bytes_removed: u64,
    /// Blob files left.
    pub blobs_left: u64,
}

/// A push or a pull timed beside a pass.
#[derive(Clone, Debug, Serialize)]
pub struct Transfer {
    /// `push` or `pull`.
    pub op: &'static str,
    /// MB/s.
    pub mb_s: f64,
    /// When it started, in seconds from the pass's start (negative: before it).
    pub from_pass_start_s: f64,
    /// How long it took.
    pub secs: f64,
    /// Share of its time the pass was running.
    pub overlap: f64,
}

impl Transfer {
    /// Whether the pass ran for all of it (to the precision of the pass's end, seen by
    /// polling).
    pub fn inside(&self) -> bool {
        self.overlap >= INSIDE
    }
}

/// Pushes and pulls on a filled server, idle and then beside its eviction pass.
#[derive(Clone, Debug, Serialize)]
pub struct Busy {
    /// Round, from 1.
    pub round: usize,
    /// Pushes while idle, MB/s.
    pub idle_push_mb_s: Vec<f64>,
    /// Pulls while idle, MB/s.
    pub idle_pull_mb_s: Vec<f64>,
    /// Pushes and pulls, alternating, from the restart until the pass ended.
    pub beside: Vec<Transfer>,
    /// The pass.
    pub pass: Pass,
}

/// What the JSON report holds about the workload.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Rounds (each with fills of its own).
    pub rounds: usize,
    /// The fill of many small images.
    pub small: Fill,
    /// The fill of fewer large images.
    pub large: Fill,
    /// Share of the blob bytes the lowered quota keeps, in percent.
    pub keep_pct: u64,
    /// Size of the pushed and pulled blob, in MiB.
    pub blob_mib: usize,
    /// Every pass timed alone.
    pub passes: Vec<Pass>,
    /// Distribution's garbage collection on the same images, one per fill.
    pub reference: Vec<Reference>,
    /// Why a reference is missing, for each that is.
    pub reference_errors: Vec<String>,
    /// Distribution's idle push and pull (MB/s) with the small images stored.
    pub distribution_idle: Vec<[f64; 2]>,
    /// Idle pushes and pulls per server and round.
    pub idle_transfers: usize,
    /// The transfers beside a pass.
    pub busy: Vec<Busy>,
}

/// What the workload needs from the run.
pub struct Inputs<'a> {
    /// The run's temporary directory.
    pub dir: &'a Path,
    /// The payload's random base.
    pub base: &'a Base,
    /// The HTTP client.
    pub http: &'a reqwest::Client,
    /// The layercache binary.
    pub layercache_bin: &'a Path,
    /// The distribution registry binary.
    pub registry_bin: &'a Path,
    /// The fills and the transferred blob's size.
    pub shape: &'a Shape,
    /// Rounds.
    pub rounds: usize,
}

/// The part of `GET /api/v1/gc` the workload reads.
#[derive(Deserialize)]
struct GcStatus {
    usage: Usage,
    last_pass: Option<GcReport>,
}

/// The store's usage, in bytes.
#[derive(Deserialize)]
struct Usage {
    blob_bytes: u64,
    metadata_bytes: u64,
    total: u64,
}

/// The part of a pass's report the workload reads.
#[derive(Deserialize)]
struct GcReport {
    trigger: String,
    seconds: f64,
    usage_before: Usage,
    usage_after: Usage,
    quota: Quota,
    evicted: Vec<EvictedRoot>,
    evicted_entries: Vec<serde_json::Value>,
    blobs_removed: u64,
    bytes_freed: u64,
    released_bytes: u64,
    shortfall: u64,
}

/// The quota a pass worked to.
#[derive(Deserialize)]
struct Quota {
    limit: u64,
}

/// A manifest a pass evicted.
#[derive(Deserialize)]
struct EvictedRoot {
    repo: String,
    digest: String,
}

/// An image: its layers, its config and its manifest, pushed under one tag.
struct Image {
    repo: String,
    tag: String,
    layers: Vec<Blob>,
    config: Blob,
    manifest: Bytes,
}

/// Every round: the small and the large fill evicted alone (distribution's reference on
/// the first round's), then the push and pull beside a pass. Figures go to `samples`.
pub async fn run(
    ctx: &Inputs<'_>,
    samples: &mut BTreeMap<&'static str, Samples>,
) -> Result<Report> {
    let shape = ctx.shape;
    let mut report = Report {
        rounds: ctx.rounds,
        small: shape.evict_small,
        large: shape.evict_large,
        keep_pct: shape.evict_keep_pct,
        blob_mib: shape.blob_mib,
        passes: Vec::new(),
        reference: Vec::new(),
        reference_errors: Vec::new(),
        distribution_idle: Vec::new(),
        idle_transfers: IDLE_TRANSFERS,
        busy: Vec::new(),
    };
    let mut record = |key: &'static str, kind: Kind, value: f64| {
        eprintln!(
            "bench: eviction {:<12} {key:<22} {}",
            kind.name(),
            report::num(value)
        );
        samples.entry(key).or_default().push(kind, value);
    };
    for round in 0..ctx.rounds {
        for (name, fill, keys) in [
            ("small", shape.evict_small, SMALL_KEYS),
            ("large", shape.evict_large, LARGE_KEYS),
        ] {
            let images = images(ctx.base, &fill, name)?;
            let (pass, evicted) = alone(ctx, name, round, &images).await?;
            for (key, value) in keys.iter().zip([
                pass.roots_per_s(),
                pass.blobs_per_s(),
                pass.gib_per_s(),
                pass.seconds,
            ]) {
                record(key, Kind::Layercache, value);
            }
            report.passes.push(pass);
            if round > 0 {
                continue;
            }
            // Distribution's idle transfers are measured on its small fill.
            let transfers = if name == "small" { IDLE_TRANSFERS } else { 0 };
            match reference(ctx, name, &images, &evicted, transfers).await {
                Ok((r, idle)) => {
                    for (key, value) in keys.iter().skip(1).zip([
                        r.blobs_removed as f64 / r.gc_secs,
                        r.bytes_removed as f64 / GIB / r.gc_secs,
                        r.gc_secs,
                    ]) {
                        record(key, Kind::Distribution, value);
                    }
                    for [push, pull] in &idle {
                        for (keys, value) in [(PUSH_KEYS, push), (PULL_KEYS, pull)] {
                            // The idle figure, and the one a transfer beside a pass is
                            // compared with.
                            record(keys[0], Kind::Distribution, *value);
                            record(keys[1], Kind::Distribution, *value);
                        }
                    }
                    report.distribution_idle.extend(idle);
                    report.reference.push(r);
                }
                Err(e) => {
                    eprintln!("bench: eviction: distribution reference skipped: {e:#}");
                    report.reference_errors.push(format!("{name}: {e:#}"));
                }
            }
        }
    }
    for round in 0..ctx.rounds {
        let busy = beside(ctx, round).await?;
        for (keys, op, idle) in [
            (PUSH_KEYS, "push", &busy.idle_push_mb_s),
            (PULL_KEYS, "pull", &busy.idle_pull_mb_s),
        ] {
            for &v in idle {
                record(keys[0], Kind::Layercache, v);
            }
            let idle = Summary::of(idle).map_or(f64::NAN, |s| s.median);
            for t in busy.beside.iter().filter(|t| t.op == op && t.inside()) {
                record(keys[1], Kind::Layercache, t.mb_s);
                record(keys[2], Kind::Layercache, 100.0 * t.mb_s / idle);
            }
        }
        report.busy.push(busy);
    }
    Ok(report)
}

/// Figure keys of the small fill: roots/s, blobs/s, GiB/s, seconds.
const SMALL_KEYS: [&str; 4] = [
    "evict_small_roots_s",
    "evict_small_blobs_s",
    "evict_small_gib_s",
    "evict_small_s",
];
/// Figure keys of the large fill.
const LARGE_KEYS: [&str; 4] = [
    "evict_large_roots_s",
    "evict_large_blobs_s",
    "evict_large_gib_s",
    "evict_large_s",
];
/// Figure keys of the push: idle, beside a pass, the second over the first in percent.
const PUSH_KEYS: [&str; 3] = [
    "evict_push_idle_mb_s",
    "evict_push_busy_mb_s",
    "evict_push_busy_pct",
];
/// Figure keys of the pull.
const PULL_KEYS: [&str; 3] = [
    "evict_pull_idle_mb_s",
    "evict_pull_busy_mb_s",
    "evict_pull_busy_pct",
];

/// Fill a fresh layercache with `images`, restart it with the lowered quota and time its
/// startup pass alone; returns the pass and what it evicted, as (repository, digest).
async fn alone(
    ctx: &Inputs<'_>,
    name: &'static str,
    round: usize,
    images: &[Image],
) -> Result<(Pass, Vec<(String, String)>)> {
    let dir = ctx
        .dir
        .join(format!("eviction/layercache-{name}-r{}", round + 1));
    let (server, registry) = start_layercache(ctx, &dir, None).await?;
    eprintln!(
        "bench: eviction: filling layercache with {}",
        describe(images)
    );
    let fill_secs = push_all(&registry, images).await?;
    let status: GcStatus = registry.get_json("/api/v1/gc").await?;
    let keep =
        status.usage.metadata_bytes + status.usage.blob_bytes * ctx.shape.evict_keep_pct / 100;
    let (server, registry, spawned) = restart(ctx, server, &dir, keep).await?;
    let (gc, done) = wait_for_pass(&registry, POLL_ALONE).await?;
    drop(server);
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    let evicted = gc
        .evicted
        .iter()
        .map(|r| (r.repo.clone(), r.digest.clone()))
        .collect();
    let pass = Pass::new(name, round, images.len(), fill_secs, &gc, done - spawned);
    eprintln!(
        "bench: eviction round {} {name}: filled in {:.1} s; pass {:.2} s: {} roots, {} blobs, {:.2} GiB",
        round + 1,
        fill_secs,
        pass.seconds,
        pass.roots_evicted,
        pass.blobs_removed,
        pass.bytes_freed as f64 / GIB
    );
    Ok((pass, evicted))
}

/// On a fresh layercache filled with the small images: pushes and pulls while idle, then
/// a restart with the lowered quota and pushes and pulls beside its startup pass, from
/// the restart until the pass ends (the server scans its blob files before the pass
/// starts, and the pass's start is known only from its report at the end).
async fn beside(ctx: &Inputs<'_>, round: usize) -> Result<Busy> {
    let (shape, base) = (ctx.shape, ctx.base);
    let images = images(base, &shape.evict_small, "busy")?;
    let dir = ctx
        .dir
        .join(format!("eviction/layercache-busy-r{}", round + 1));
    let (server, registry) = start_layercache(ctx, &dir, None).await?;
    eprintln!(
        "bench: eviction: filling layercache with {}",
        describe(&images)
    );
    let fill_secs = push_all(&registry, &images).await?;
    let filled: GcStatus = registry.get_json("/api/v1/gc").await?;
    let label = format!("evict-lc-r{}", round + 1);
    let (mut idle_push, mut idle_pull, mut pulled) = (Vec::new(), Vec::new(), None);
    for i in 0..IDLE_TRANSFERS {
        let (push, pull, blob) =
            idle_transfers(&registry, base, shape.blob_mib, &format!("{label}-{i}")).await?;
        idle_push.push(push);
        idle_pull.push(pull);
        pulled = Some(blob);
    }
    let pulled = pulled.context("no idle transfer")?;
    let now: GcStatus = registry.get_json("/api/v1/gc").await?;
    // Keep a tenth of the fill and everything pushed since (pinned, the pulled blob among
    // it). A push beside the pass that lands before the pass looks at the usage makes it
    // evict more of the fill, all of it at worst.
    let keep = now.usage.metadata_bytes
        + filled.usage.blob_bytes * shape.evict_keep_pct / 100
        + now.usage.blob_bytes.saturating_sub(filled.usage.blob_bytes);
    let (server, registry, spawned) = restart(ctx, server, &dir, keep).await?;
    let poll = {
        let registry = registry.clone();
        tokio::spawn(async move { wait_for_pass(&registry, POLL).await })
    };
    let mut timed: Vec<(&'static str, f64, Instant, Instant)> = Vec::new();
    for i in 0..MAX_BESIDE {
        if poll.is_finished() {
            break;
        }
        let blob = base.blob(shape.blob_mib, &format!("{label}-beside-{i}"))?;
        let t0 = Instant::now();
        let push = workloads::push_monolithic(&registry, &blob).await?;
        timed.push(("push", push, t0, Instant::now()));
        if poll.is_finished() {
            break;
        }
        let t0 = Instant::now();
        let pull = workloads::pull(&registry, &pulled).await?;
        timed.push(("pull", pull, t0, Instant::now()));
    }
    let (gc, done) = poll.await??;
    drop(server);
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    let pass = Pass::new("busy", round, images.len(), fill_secs, &gc, done - spawned);
    // The pass ran from `seconds` before its report was seen until then.
    let start = done
        .checked_sub(Duration::from_secs_f64(gc.seconds))
        .unwrap_or(spawned);
    let beside: Vec<Transfer> = timed
        .into_iter()
        .map(|(op, mb_s, t0, t1)| Transfer {
            op,
            mb_s,
            from_pass_start_s: if t0 >= start {
                (t0 - start).as_secs_f64()
            } else {
                -(start - t0).as_secs_f64()
            },
            secs: (t1 - t0).as_secs_f64(),
            overlap: overlap((t0, t1), (start, done)),
        })
        .collect();
    eprintln!(
        "bench: eviction round {} beside a pass of {:.2} s ({} roots; it started {:.2} s after the restart): idle push {} and pull {} MB/s",
        round + 1,
        pass.seconds,
        pass.roots_evicted,
        pass.restart_to_done_secs - pass.seconds,
        show(&idle_push),
        show(&idle_pull),
    );
    for t in &beside {
        eprintln!(
            "bench: eviction   {} {:>5} MB/s from {:+.2} s to {:+.2} s of the pass, {:.0}% inside it",
            t.op,
            report::num(t.mb_s),
            t.from_pass_start_s,
            t.from_pass_start_s + t.secs,
            100.0 * t.overlap
        );
    }
    for op in ["push", "pull"] {
        if !beside.iter().any(|t| t.op == op && t.inside()) {
            eprintln!("bench: eviction: warning: no {op} ran wholly inside the pass");
        }
    }
    Ok(Busy {
        round: round + 1,
        idle_push_mb_s: idle_push,
        idle_pull_mb_s: idle_pull,
        beside,
        pass,
    })
}

/// `median [min-max]` of `values`.
fn show(values: &[f64]) -> String {
    Summary::of(values).map_or("-".into(), |s| s.show())
}

/// Share of `span` inside `during`.
fn overlap(span: (Instant, Instant), during: (Instant, Instant)) -> f64 {
    let len = span.1.saturating_duration_since(span.0).as_secs_f64();
    let from = span.0.max(during.0);
    let to = span.1.min(during.1);
    if len <= 0.0 {
        return 0.0;
    }
    to.saturating_duration_since(from).as_secs_f64() / len
}

/// A push of a fresh blob (then made a root by a manifest, untimed) and a pull of it, on
/// an idle server; returns both in MB/s and the blob.
async fn idle_transfers(
    registry: &Registry,
    base: &Base,
    blob_mib: usize,
    label: &str,
) -> Result<(f64, f64, Blob)> {
    let blob = base.blob(blob_mib, label)?;
    crate::settle();
    let push = workloads::push_monolithic(registry, &blob).await?;
    let root = image(
        REPO_BLOBS.to_owned(),
        label.to_owned(),
        vec![blob.clone()],
        label,
    )?;
    push_image(registry, &root, false).await?;
    crate::settle();
    let pull = workloads::pull(registry, &blob).await?;
    Ok((push, pull, blob))
}

/// Push `images` to distribution, with `transfers` idle push-and-pull measurements, then
/// delete the manifests in `evicted`, stop the registry and run its garbage collector.
async fn reference(
    ctx: &Inputs<'_>,
    name: &'static str,
    images: &[Image],
    evicted: &[(String, String)],
    transfers: usize,
) -> Result<(Reference, Vec<[f64; 2]>)> {
    let dir = ctx.dir.join(format!("eviction/distribution-{name}"));
    let mut server = Server::start_distribution(ctx.registry_bin, &dir)?;
    let registry = Registry::new(ctx.http.clone(), &server.url)?;
    server.wait_ready(&registry).await?;
    eprintln!(
        "bench: eviction: filling distribution with {}",
        describe(images)
    );
    let fill_secs = push_all(&registry, images).await?;
    let mut idle = Vec::new();
    for i in 0..transfers {
        let label = format!("evict-dist-r{}", i + 1);
        let (push, pull, _) =
            idle_transfers(&registry, ctx.base, ctx.shape.blob_mib, &label).await?;
        idle.push([push, pull]);
    }
    let started = Instant::now();
    futures::stream::iter(evicted)
        .map(|(repo, digest)| registry.delete_manifest(repo, digest))
        .buffer_unordered(DELETE_CONNS)
        .try_collect::<Vec<()>>()
        .await?;
    let delete_secs = started.elapsed().as_secs_f64();
    server.stop().await?;
    let blobs = server.data_dir.join("docker/registry/v2/blobs");
    let (before, before_bytes) = blob_files(&blobs)?;
    crate::settle();
    let log = dir.join("garbage-collect.log");
    let started = Instant::now();
    let status = Command::new(ctx.registry_bin)
        .arg("garbage-collect")
        .arg(servers::distribution_config(&dir))
        .stdout(std::fs::File::create(&log)?)
        .stderr(Stdio::inherit())
        .status()
        .context("running registry garbage-collect")?;
    let gc_secs = started.elapsed().as_secs_f64();
    ensure!(
        status.success(),
        "registry garbage-collect failed ({status}); log {}:\n{}",
        log.display(),
        servers::tail(&log)
    );
    let (after, after_bytes) = blob_files(&blobs)?;
    drop(server);
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    // Each deleted image leaves its layers, its config and its manifest (a blob there).
    let per_image = images.first().map_or(0, |i| i.layers.len() as u64 + 2);
    let expected = evicted.len() as u64 * per_image;
    ensure!(
        before.saturating_sub(after) == expected,
        "garbage-collect removed {} blob files, expected {expected}",
        before.saturating_sub(after)
    );
    let r = Reference {
        fill: name,
        images: images.len(),
        fill_secs,
        deleted: evicted.len(),
        delete_secs,
        gc_secs,
        blobs_removed: before.saturating_sub(after),
        bytes_removed: before_bytes.saturating_sub(after_bytes),
        blobs_left: after,
    };
    eprintln!(
        "bench: eviction {name}: distribution filled in {:.1} s; {} deletes in {:.2} s; garbage-collect {:.2} s: {} blobs, {:.2} GiB",
        fill_secs,
        r.deleted,
        delete_secs,
        gc_secs,
        r.blobs_removed,
        r.bytes_removed as f64 / GIB
    );
    Ok((r, idle))
}

/// Blob files under distribution's `blobs` directory and their bytes on disk.
fn blob_files(root: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let (mut files, mut bytes) = (0, 0);
    let mut pending: Vec<PathBuf> = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                pending.push(entry.path());
            } else if entry.file_name() == "data" {
                files += 1;
                bytes += meta.blocks() * 512;
            }
        }
    }
    Ok((files, bytes))
}

/// Write the configuration every eviction server gets to `dir/eviction.toml`: only the
/// quota decides, the quota is `max_size` bytes (by default the whole filesystem), and
/// the images of [`REPO_BLOBS`] (what the transfers push and pull) are pinned, so a pass
/// never takes the blob a pull beside it reads.
fn config(dir: &Path, max_size: Option<u64>) -> Result<PathBuf> {
    let max_size = max_size.map_or_else(|| "\"100%\"".to_owned(), |b| b.to_string());
    let path = dir.join("eviction.toml");
    std::fs::write(
        &path,
        format!(
            "[store.eviction]\n\
             max_size = {max_size}\n\
             min_free = 0\n\
             high_watermark = 90\n\
             low_watermark = {LOW_WATERMARK}\n\
             grace = \"0s\"\n\
             in_use = \"0s\"\n\
             push_window = \"0s\"\n\
             interval = \"1h\"\n\
             \n\
             [[store.eviction.rules]]\n\
             repositories = \"{REPO_BLOBS}\"\n\
             pin_tags = [\".*\"]\n"
        ),
    )
    .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Start a layercache in `dir` with the quota `max_size` (see [`config`]) and wait for it.
async fn start_layercache(
    ctx: &Inputs<'_>,
    dir: &Path,
    max_size: Option<u64>,
) -> Result<(Server, Registry)> {
    std::fs::create_dir_all(dir)?;
    let config = config(dir, max_size)?;
    let env = [(
        "LAYERCACHE_CONFIG".to_owned(),
        config.to_string_lossy().into_owned(),
    )];
    let mut server = Server::start_layercache_with(ctx.layercache_bin, dir, &env)?;
    let registry = Registry::new(ctx.http.clone(), &server.url)?;
    server.wait_ready(&registry).await?;
    Ok((server, registry))
}

/// Stop `server` and start it again on the same data with a quota whose low watermark is
/// `keep` bytes; returns it and when it was spawned. Everything it stored is made older
/// than the pass first: the pass runs at startup, and with no push window or grace a
/// blob leaves only if last used in an earlier second.
async fn restart(
    ctx: &Inputs<'_>,
    mut server: Server,
    dir: &Path,
    keep: u64,
) -> Result<(Server, Registry, Instant)> {
    crate::settle();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    server.stop().await?;
    drop(server);
    let spawned = Instant::now();
    let (server, registry) = start_layercache(ctx, dir, Some(keep * 100 / LOW_WATERMARK)).await?;
    Ok((server, registry, spawned))
}

/// Wait for the server's first pass to end; returns its report and when it was seen.
async fn wait_for_pass(registry: &Registry, poll: Duration) -> Result<(GcReport, Instant)> {
    let deadline = Instant::now() + PASS_TIMEOUT;
    loop {
        let status: GcStatus = registry.get_json("/api/v1/gc").await?;
        if let Some(pass) = status.last_pass {
            return Ok((pass, Instant::now()));
        }
        ensure!(
            Instant::now() < deadline,
            "no eviction pass ended within {} s",
            PASS_TIMEOUT.as_secs()
        );
        tokio::time::sleep(poll).await;
    }
}

/// Push every image, [`FILL_CONNS`] at a time; returns the seconds it took.
async fn push_all(registry: &Registry, images: &[Image]) -> Result<f64> {
    let started = Instant::now();
    futures::stream::iter(images)
        .map(|image| push_image(registry, image, true))
        .buffer_unordered(FILL_CONNS)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(started.elapsed().as_secs_f64())
}

/// Push an image's layers (with `layers`), its config, then its manifest under its tag.
async fn push_image(registry: &Registry, image: &Image, layers: bool) -> Result<()> {
    if layers {
        for blob in &image.layers {
            registry.push(&image.repo, blob).await?;
        }
    }
    registry.push(&image.repo, &image.config).await?;
    registry
        .put_manifest(
            &image.repo,
            &image.tag,
            OCI_MANIFEST,
            image.manifest.clone(),
        )
        .await
}

/// The images of `fill`, named after `name`: `bench/evict-<name>/r<k>:t<i>`, spread over
/// [`REPOS`] repositories, every layer a distinct blob.
fn images(base: &Base, fill: &Fill, name: &str) -> Result<Vec<Image>> {
    let prefix = if fill.layer_kib < 1024 {
        Some(base.prefix(fill.layer_kib * 1024)?)
    } else {
        ensure!(
            fill.layer_kib.is_multiple_of(1024),
            "layers of {} KiB: below 1 MiB or whole MiB",
            fill.layer_kib
        );
        None
    };
    (0..fill.images)
        .map(|i| {
            let layers = (0..fill.layers)
                .map(|l| {
                    let label = format!("evict-{name}-{i}-{l}");
                    match &prefix {
                        Some(p) => Ok(p.blob(&label)),
                        None => base.blob(fill.layer_kib / 1024, &label),
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            image(
                format!("bench/evict-{name}/r{}", i % REPOS),
                format!("t{i}"),
                layers,
                &format!("{name}-{i}"),
            )
        })
        .collect()
}

/// An image of `layers` with a config unique to `label`.
fn image(repo: String, tag: String, layers: Vec<Blob>, label: &str) -> Result<Image> {
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": {"bench": label}},
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|b| b.digest.as_str()).collect::<Vec<_>>(),
        },
    });
    let config = Blob::from_bytes(Bytes::from(serde_json::to_vec(&config)?));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": workloads::descriptor(CONFIG, &config),
        "layers": layers.iter().map(|b| workloads::descriptor(LAYER, b)).collect::<Vec<_>>(),
    });
    Ok(Image {
        repo,
        tag,
        layers,
        config,
        manifest: Bytes::from(serde_json::to_vec(&manifest)?),
    })
}

/// `4000 images, 3.0 GiB`.
fn describe(images: &[Image]) -> String {
    let bytes: u64 = images
        .iter()
        .flat_map(|i| i.layers.iter().chain(std::iter::once(&i.config)))
        .map(|b| b.len)
        .sum();
    format!("{} images, {:.2} GiB", images.len(), bytes as f64 / GIB)
}

/// The workload's own table: each pass (median [min-max] over rounds), distribution's
/// reference, and the transfers beside a pass with how much of them the pass overlapped.
pub fn table(report: &Report) -> String {
    let mut out = format!(
        "eviction, {} round(s): a layercache filled over HTTP, restarted with a quota keeping {}% of the blob bytes; its startup pass, timed by its own report\n\
         (in the figures above, distribution's pass figures are its offline garbage collection, and a transfer beside a pass is compared with distribution idle)\n",
        report.rounds, report.keep_pct
    );
    let passes = |fill: &str| -> Vec<&Pass> {
        report
            .passes
            .iter()
            .chain(report.busy.iter().map(|b| &b.pass))
            .filter(|p| p.fill == fill)
            .collect()
    };
    let rows: Vec<Vec<String>> = [
        ("small", report.small),
        ("large", report.large),
        ("busy", report.small),
    ]
    .into_iter()
    .filter(|(name, _)| !passes(name).is_empty())
    .map(|(name, fill)| {
        let p = passes(name);
        let of = |f: fn(&Pass) -> f64| show(&p.iter().map(|p| f(p)).collect::<Vec<_>>());
        vec![
            if name == "busy" {
                format!("{} (push+pull beside)", fill.describe())
            } else {
                fill.describe()
            },
            of(|p| p.fill_secs),
            of(|p| p.roots_evicted as f64),
            of(|p| p.blobs_removed as f64),
            of(|p| p.bytes_freed as f64 / GIB),
            of(|p| p.seconds),
            of(Pass::roots_per_s),
            of(Pass::blobs_per_s),
            of(Pass::gib_per_s),
        ]
    })
    .collect();
    out.push_str(&report::render(
        &[
            "layercache pass",
            "fill s",
            "roots evicted",
            "blobs swept",
            "GiB freed",
            "pass s",
            "roots/s",
            "blobs/s",
            "GiB/s",
        ],
        &rows,
    ));
    if !report.reference.is_empty() {
        out.push_str("distribution: the same images, the manifests layercache evicted deleted over the API, the registry stopped, then `registry garbage-collect` (wall time)\n");
        let rows: Vec<Vec<String>> = report
            .reference
            .iter()
            .map(|r| {
                let fill = if r.fill == "small" {
                    report.small
                } else {
                    report.large
                };
                vec![
                    fill.describe(),
                    format!("{:.1}", r.fill_secs),
                    r.deleted.to_string(),
                    format!("{:.2}", r.delete_secs),
                    r.blobs_removed.to_string(),
                    format!("{:.2}", r.bytes_removed as f64 / GIB),
                    format!("{:.2}", r.gc_secs),
                    report::num(r.blobs_removed as f64 / r.gc_secs),
                    format!("{:.2}", r.bytes_removed as f64 / GIB / r.gc_secs),
                ]
            })
            .collect();
        out.push_str(&report::render(
            &[
                "distribution GC",
                "fill s",
                "deleted",
                "DELETE s",
                "blobs removed",
                "GiB removed",
                "GC s",
                "blobs/s",
                "GiB/s",
            ],
            &rows,
        ));
    }
    for e in &report.reference_errors {
        out.push_str(&format!("distribution reference skipped: {e}\n"));
    }
    if !report.busy.is_empty() {
        let dist = |i: usize| {
            show(
                &report
                    .distribution_idle
                    .iter()
                    .filter_map(|v| v.get(i).copied())
                    .collect::<Vec<_>>(),
            )
        };
        out.push_str(&format!(
            "{} MiB pushes and pulls on a server holding {}: idle, then from its restart with the lowered quota until the pass ended; \
             'inside' counts those the pass ran for all of (>= {:.0}%), the figures use those\n",
            report.blob_mib,
            report.small.describe(),
            100.0 * INSIDE
        ));
        let rows: Vec<Vec<String>> = [("push, monolithic", "push", 0), ("pull", "pull", 1)]
            .into_iter()
            .map(|(name, op, i)| {
                let idle: Vec<f64> = report
                    .busy
                    .iter()
                    .flat_map(|b| {
                        if op == "push" {
                            &b.idle_push_mb_s
                        } else {
                            &b.idle_pull_mb_s
                        }
                    })
                    .copied()
                    .collect();
                let all: Vec<&Transfer> = report
                    .busy
                    .iter()
                    .flat_map(|b| &b.beside)
                    .filter(|t| t.op == op)
                    .collect();
                let inside: Vec<f64> = all.iter().filter(|t| t.inside()).map(|t| t.mb_s).collect();
                let ratio = match (Summary::of(&inside), Summary::of(&idle)) {
                    (Some(a), Some(b)) if b.median > 0.0 => format!("{:.2}x", a.median / b.median),
                    _ => "-".into(),
                };
                vec![
                    name.into(),
                    show(&idle),
                    show(&inside),
                    ratio,
                    format!("{} of {}", inside.len(), all.len()),
                    dist(i),
                ]
            })
            .collect();
        out.push_str(&report::render(
            &[
                "transfer",
                "idle MB/s",
                "beside a pass MB/s",
                "beside/idle",
                "inside",
                "distribution idle MB/s",
            ],
            &rows,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_is_the_share_of_the_transfer_inside_the_pass() {
        let t = Instant::now();
        let at = |ms: u64| t + Duration::from_millis(ms);
        assert_eq!(overlap((at(0), at(100)), (at(200), at(300))), 0.0);
        assert_eq!(overlap((at(200), at(300)), (at(100), at(400))), 1.0);
        assert!((overlap((at(0), at(100)), (at(50), at(400))) - 0.5).abs() < 1e-9);
        assert_eq!(overlap((at(10), at(10)), (at(0), at(400))), 0.0);
    }

    #[test]
    fn fills_make_distinct_images_of_their_shape() {
        let base = Base::generate(2, 9);
        let small = Fill {
            images: 3,
            layers: 2,
            layer_kib: 4,
        };
        let images = images(&base, &small, "t").unwrap();
        assert_eq!(images.len(), 3);
        let digests: std::collections::HashSet<&str> = images
            .iter()
            .flat_map(|i| i.layers.iter().chain(std::iter::once(&i.config)))
            .map(|b| b.digest.as_str())
            .collect();
        assert_eq!(digests.len(), 9);
        assert!(images.iter().all(|i| i.layers.iter().all(|l| l.len > 4096)));
        assert_eq!(small.describe(), "3 images of 2 x 4 KiB");
        let large = Fill {
            images: 1,
            layers: 1,
            layer_kib: 2048,
        };
        // The suffix is "\nevict-t-0-0\n".
        assert_eq!(images_len(&base, &large), 2 * 1024 * 1024 + 13);
        assert_eq!(large.describe(), "1 images of 1 x 2 MiB");
        let odd = Fill {
            layer_kib: 1500,
            ..large
        };
        assert!(super::images(&base, &odd, "t").is_err());
    }

    /// Length of the first layer of the first image of `fill`.
    fn images_len(base: &Base, fill: &Fill) -> u64 {
        images(base, fill, "t").unwrap()[0].layers[0].len
    }
}
