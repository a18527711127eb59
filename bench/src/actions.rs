//! The GitHub Actions cache workload: the official client, `@actions/cache` 6.3.0 run by
//! `node`, saves an entry of incompressible data and restores it end to end (the client
//! archives with tar + zstd, uploads, and on restore downloads, decompresses and
//! extracts), against layercache over both cache protocols (v2: twirp + Azure Blob
//! subset; v1: the legacy REST API) and against a null server in Node
//! (`bench/actions-cache/null-server.mjs`) that drops uploads and streams the archive
//! layercache stored: the client's own ceiling for each protocol.
//!
//! Throughput is payload bytes over the wall time of the `node` process, in MiB/s. A save
//! is also timed from the moment its archive is made (the client's `File Size` line) to
//! its end: the reservation, the upload and the commit, the only part of a save a server
//! takes part in; a restore, from its start to the moment its archive is downloaded (the
//! client's `Cache Size` line): the lookup and the download, the only part of a restore a
//! server takes part in, before the client decompresses and extracts it. Every run uses fresh content (the base XORed with a per-run mask), so
//! no entry, block or chunk is ever seen twice; every restore is checked byte for byte
//! against what was saved.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use crate::payload::{Base, MIB};
use crate::report::{self, Limits, Samples, Summary};
use crate::servers::{self, Cpu, Kind, Server};
use crate::setup;

/// The client package and the version every figure is about.
pub const CLIENT: &str = "@actions/cache";
/// The pinned version of [`CLIENT`].
pub const CLIENT_VERSION: &str = "6.3.0";
/// The one path every save names, relative to the workspace (a directory).
const SAVED_PATH: &str = "payload";
/// The file inside it.
const PAYLOAD_FILE: &str = "data.bin";
/// The twirp service's path, from the host root.
const TWIRP: &str = "twirp/github.actions.results.api.v1.CacheService/";
/// The scope the bench's token reads and writes.
const REF: &str = "refs/heads/main";
/// A peer measured elsewhere, printed for context only.
pub const PEER: Peer = Peer {
    name: "falcondev-oss/github-actions-cache-server",
    save_mib_s: 284.0,
    restore_mib_s: [137.0, 150.0],
    note: "measured elsewhere, not run here",
};

/// A server of the Actions cache protocols and the protocol spoken to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// layercache, v2.
    LayercacheV2,
    /// The null server, v2: the client's v2 ceiling.
    CeilingV2,
    /// layercache, v1.
    LayercacheV1,
    /// The null server, v1: the client's v1 ceiling.
    CeilingV1,
}

impl Target {
    /// Every target, in the order the first round visits them: v2, then v1, each
    /// protocol's ceiling right after layercache on it; layercache v2 first, because the
    /// ceilings restore the archive it stored.
    const ALL: [Target; 4] = [
        Target::LayercacheV2,
        Target::CeilingV2,
        Target::LayercacheV1,
        Target::CeilingV1,
    ];

    /// The order `round` (from 0) visits the targets in: [`Target::ALL`] in even
    /// rounds, each protocol's ceiling first in odd ones, so neither side of a pair
    /// always runs on the machine the other left behind (pages it freed, write-back it
    /// queued). An odd round's ceilings restore the archive of the round before.
    fn order(round: usize) -> [Target; 4] {
        let mut order = Target::ALL;
        if round % 2 == 1 {
            order.swap(0, 1);
            order.swap(2, 3);
        }
        order
    }

    /// As printed.
    pub fn name(self) -> &'static str {
        match self {
            Target::LayercacheV2 => "layercache v2",
            Target::CeilingV2 => "null server v2 (ceiling)",
            Target::LayercacheV1 => "layercache v1",
            Target::CeilingV1 => "null server v1 (ceiling)",
        }
    }

    /// Short tag, for keys and log names.
    fn tag(self) -> &'static str {
        match self {
            Target::LayercacheV2 => "lc-v2",
            Target::CeilingV2 => "null-v2",
            Target::LayercacheV1 => "lc-v1",
            Target::CeilingV1 => "null-v1",
        }
    }

    fn v2(self) -> bool {
        matches!(self, Target::LayercacheV2 | Target::CeilingV2)
    }

    fn is_ceiling(self) -> bool {
        matches!(self, Target::CeilingV2 | Target::CeilingV1)
    }

    /// The ceiling of the same protocol.
    fn ceiling(self) -> Target {
        if self.v2() {
            Target::CeilingV2
        } else {
            Target::CeilingV1
        }
    }

    /// layercache on the same protocol.
    fn layercache(self) -> Target {
        if self.v2() {
            Target::LayercacheV2
        } else {
            Target::LayercacheV1
        }
    }
}

/// Save or restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// `saveCache`.
    Save,
    /// `restoreCache`.
    Restore,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Save => "save",
            Op::Restore => "restore",
        }
    }

    /// The start of the line the client prints between its own work and the server's:
    /// after a save's archive is made, after a restore's archive is downloaded.
    fn phase_line(self) -> &'static [u8] {
        match self {
            Op::Save => b"::debug::File Size:",
            Op::Restore => b"Cache Size:",
        }
    }
}

/// The figure key of a layercache target's samples.
pub fn sample_key(target: Target, op: Op) -> Option<&'static str> {
    match (target, op) {
        (Target::LayercacheV2, Op::Save) => Some("actions_v2_save_mib_s"),
        (Target::LayercacheV2, Op::Restore) => Some("actions_v2_restore_mib_s"),
        (Target::LayercacheV1, Op::Save) => Some("actions_v1_save_mib_s"),
        (Target::LayercacheV1, Op::Restore) => Some("actions_v1_restore_mib_s"),
        _ => None,
    }
}

/// The key of the figure of the server's part of `op` over v2 or v1: a save's rate after
/// its archive was made, a restore's until its archive was downloaded (layercache's; the
/// null server's are the limits of the same keys).
fn phase_key(v2: bool, op: Op) -> &'static str {
    match (v2, op) {
        (true, Op::Save) => "actions_v2_save_upload_mib_s",
        (false, Op::Save) => "actions_v1_save_upload_mib_s",
        (true, Op::Restore) => "actions_v2_restore_download_mib_s",
        (false, Op::Restore) => "actions_v1_restore_download_mib_s",
    }
}

/// The key of the figure of the server's kernel CPU seconds per GiB saved on `target`
/// (layercache's): where the cost of the pages written shows.
fn kernel_cpu_key(target: Target, op: Op) -> Option<&'static str> {
    match (target, op) {
        (Target::LayercacheV2, Op::Save) => Some("actions_v2_save_sys"),
        (Target::LayercacheV1, Op::Save) => Some("actions_v1_save_sys"),
        _ => None,
    }
}

/// The key of the figure of the server's CPU seconds per GiB for `op` on `target`
/// (layercache's; the null server's are the limits of the same keys).
pub fn cpu_key(target: Target, op: Op) -> Option<&'static str> {
    match (target, op) {
        (Target::LayercacheV2, Op::Save) => Some("actions_v2_save_cpu"),
        (Target::LayercacheV2, Op::Restore) => Some("actions_v2_restore_cpu"),
        (Target::LayercacheV1, Op::Save) => Some("actions_v1_save_cpu"),
        (Target::LayercacheV1, Op::Restore) => Some("actions_v1_restore_cpu"),
        _ => None,
    }
}

/// One timed save or restore.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    /// Round, from 1.
    pub round: usize,
    /// Where the entry went.
    pub target: Target,
    /// What was timed.
    pub op: Op,
    /// Wall time of the `node` process.
    pub secs: f64,
    /// Payload MiB over `secs`.
    pub mib_s: f64,
    /// A save's payload MiB over its time after the archive was made, a restore's over its
    /// time until the archive was downloaded (see the module).
    pub phase_mib_s: Option<f64>,
    /// CPU seconds of the client: node and the tar and zstd it ran.
    pub client_cpu_s: f64,
    /// CPU seconds of the server (layercache or the null server) meanwhile.
    pub server_cpu_s: f64,
    /// The part of them in the kernel.
    pub server_kernel_cpu_s: f64,
    /// CPU seconds the rest of the machine took meanwhile: other processes, kernel
    /// threads (write-back included) and the hypervisor's steal, but not interrupt
    /// handling (loopback traffic is the run's own). Well above zero, the run was disturbed.
    pub other_cpu_s: f64,
}

/// What one client run took.
#[derive(Clone, Copy, Debug)]
struct Timing {
    secs: f64,
    /// Seconds until the client printed its [`Op::phase_line`].
    phase_secs: Option<f64>,
    client_cpu_s: f64,
    server: Cpu,
    other_cpu_s: f64,
}

/// A peer's figures from elsewhere.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Peer {
    /// The project.
    pub name: &'static str,
    /// Save, MiB/s.
    pub save_mib_s: f64,
    /// Restore, MiB/s (a range).
    pub restore_mib_s: [f64; 2],
    /// Where the figures come from.
    pub note: &'static str,
}

/// What the JSON report holds about the workload.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Client package and version.
    pub client: String,
    /// The npm package (with `cache.mjs`) that ran it.
    pub client_dir: PathBuf,
    /// Size of the saved file, in MiB.
    pub payload_mib: usize,
    /// Size of the archive layercache stored for each round's v2 entry.
    pub archive_bytes: Vec<u64>,
    /// Every timed run.
    pub runs: Vec<Run>,
    /// A peer's figures, for context.
    pub peer: Peer,
}

/// The client package: `cache.mjs` with `@actions/cache` installed beside it.
pub struct ClientPackage {
    dir: PathBuf,
    node: PathBuf,
    null_server: PathBuf,
}

impl ClientPackage {
    /// Find the package (`explicit`, else the one the end-to-end tests pin), install
    /// its dependencies if missing and check the client's version; also installs node,
    /// npm and zstd if missing (as root).
    pub fn prepare(root: &Path, explicit: Option<&Path>) -> Result<ClientPackage> {
        let dir = explicit.map_or_else(
            || root.join("crates/layercache/tests/actions-cache"),
            Path::to_owned,
        );
        ensure!(
            dir.join("package.json").is_file() && dir.join("cache.mjs").is_file(),
            "{} has no package.json and cache.mjs",
            dir.display()
        );
        let node = find_or_install("node", "nodejs")?;
        find_or_install("zstd", "zstd")?;
        let installed = dir.join("node_modules/@actions/cache/package.json");
        if !installed.is_file() {
            let npm = find_or_install("npm", "npm")?;
            let args: &[&str] = if dir.join("package-lock.json").is_file() {
                &["ci", "--no-audit", "--no-fund"]
            } else {
                &["install", "--no-audit", "--no-fund", "--no-package-lock"]
            };
            eprintln!("bench: npm {} in {}", args.join(" "), dir.display());
            let status = Command::new(npm)
                .args(args)
                .current_dir(&dir)
                .stdout(Stdio::null())
                .status()
                .context("running npm")?;
            ensure!(status.success(), "npm failed in {}", dir.display());
        }
        let manifest: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&installed)
                .with_context(|| format!("reading {}", installed.display()))?,
        )?;
        let version = manifest.get("version").and_then(|v| v.as_str());
        ensure!(
            version == Some(CLIENT_VERSION),
            "{} has {CLIENT} {version:?}, not {CLIENT_VERSION}",
            dir.display()
        );
        Ok(ClientPackage {
            dir,
            node,
            null_server: root.join("bench/actions-cache/null-server.mjs"),
        })
    }
}

/// What the workload needs from the run.
pub struct Inputs<'a> {
    /// The run's temporary directory.
    pub dir: &'a Path,
    /// The payload's random base.
    pub base: &'a Base,
    /// For the untimed archive fetch.
    pub http: &'a reqwest::Client,
    /// The layercache binary (for `layercache token`).
    pub layercache_bin: &'a Path,
    /// The client.
    pub client: &'a ClientPackage,
    /// Size of the saved file, in MiB.
    pub payload_mib: usize,
    /// Rounds.
    pub rounds: usize,
}

/// Every round: each target saves a fresh entry and restores it. layercache's figures go
/// to `samples`, the ceilings to `limits`.
pub async fn run(
    ctx: &Inputs<'_>,
    layercache: &mut Server,
    samples: &mut BTreeMap<&'static str, Samples>,
    limits: &mut Limits,
) -> Result<Report> {
    let work = ctx.dir.join("actions");
    let ws = work.join("workspace");
    let runner_temp = work.join("runner-temp");
    let logs = work.join("logs");
    for d in [&ws.join(SAVED_PATH), &runner_temp, &logs] {
        std::fs::create_dir_all(d)?;
    }
    let archive = work.join("ceiling.tzst");
    let token = token(ctx.layercache_bin, &layercache.data_dir)?;
    let null = NullServer::start(&ctx.client.node, &ctx.client.null_server, &archive, &work)?;
    eprintln!(
        "bench: {CLIENT} {CLIENT_VERSION} from {}; null server at {}",
        ctx.client.dir.display(),
        null.url
    );
    let version = cache_version(&[SAVED_PATH]);
    let slices = ctx
        .base
        .slices()
        .get(..ctx.payload_mib)
        .with_context(|| format!("{} MiB of payload base", ctx.payload_mib))?
        .to_vec();
    let payload = ws.join(SAVED_PATH).join(PAYLOAD_FILE);
    let mut runs = Vec::new();
    let mut archive_bytes = Vec::new();
    let mut ceilings: BTreeMap<(bool, Op), Vec<f64>> = BTreeMap::new();
    // The null server's figures, by the key of layercache's same figure.
    let mut null_figures: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    // What the ceilings restore: the archive of the last layercache v2 entry saved.
    let mut served: Option<Content> = None;
    let warm_up_invoke = Invoke {
        client: ctx.client,
        ws: &ws,
        runner_temp: &runner_temp,
        token: &token,
        url: &layercache.url,
        server_pid: layercache.pid(),
        target: Target::LayercacheV2,
    };
    let warm_up_content = Content::new((ctx.rounds * Target::ALL.len()) as u64);
    warm_up(&warm_up_invoke, &payload, &slices, warm_up_content, &logs).await?;
    for round in 0..ctx.rounds {
        for (i, target) in Target::order(round).into_iter().enumerate() {
            layercache.check_alive()?;
            let content = Content::new((round * Target::ALL.len() + i) as u64);
            let key = format!("bench-{}-r{}", target.tag(), round + 1);
            let (url, pid) = if target.is_ceiling() {
                (null.url.as_str(), null.pid())
            } else {
                (layercache.url.as_str(), layercache.pid())
            };
            let invoke = Invoke {
                client: ctx.client,
                ws: &ws,
                runner_temp: &runner_temp,
                token: &token,
                url,
                server_pid: pid,
                target,
            };
            write_payload(&payload, &slices, content).await?;
            crate::settle();
            let uploaded = if target.is_ceiling() {
                null.uploaded(ctx.http).await?
            } else {
                0
            };
            let log = logs.join(format!("{}-r{}-save.log", target.tag(), round + 1));
            let save_start = layercache.new_peak_window()?;
            let save = invoke.time(Op::Save, &key, &log).await?;
            let save_peak = layercache.window_peak_rss()?;
            if target.is_ceiling() {
                let got = null.uploaded(ctx.http).await?.saturating_sub(uploaded);
                ensure!(
                    got >= (ctx.payload_mib * MIB) as u64,
                    "the null server received {got} bytes for {key}"
                );
            }
            std::fs::remove_file(&payload)?;
            crate::settle();
            let log = logs.join(format!("{}-r{}-restore.log", target.tag(), round + 1));
            let restore_start = layercache.new_peak_window()?;
            let restore = invoke.time(Op::Restore, &key, &log).await?;
            let restore_peak = layercache.window_peak_rss()?;
            let expected = if target.is_ceiling() {
                served.context("no archive for the ceiling")?
            } else {
                content
            };
            verify_payload(&payload, &slices, expected)
                .await
                .with_context(|| {
                    format!(
                        "{} restored {key} wrong; log {}",
                        target.name(),
                        log.display()
                    )
                })?;
            if target == Target::LayercacheV2 {
                let n = fetch_archive(ctx.http, &layercache.url, &token, &key, &version, &archive)
                    .await?;
                archive_bytes.push(n);
                served = Some(content);
            }
            for (op, t, start, peak) in [
                (Op::Save, save, save_start, save_peak),
                (Op::Restore, restore, restore_start, restore_peak),
            ] {
                let mib_s = ctx.payload_mib as f64 / t.secs;
                let phase_mib_s = t
                    .phase_secs
                    .map(|at| match op {
                        Op::Save => t.secs - at,
                        Op::Restore => at,
                    })
                    .filter(|&secs| secs > 0.0)
                    .map(|secs| ctx.payload_mib as f64 / secs);
                eprintln!(
                    "bench: round {} {:<24} {:<7} {:>5} MiB/s ({:.1} s; CPU: client {:.1} s, server {:.1} s, others {:.1} s)",
                    round + 1,
                    target.name(),
                    op.name(),
                    report::num(mib_s),
                    t.secs,
                    t.client_cpu_s,
                    t.server.total(),
                    t.other_cpu_s,
                );
                runs.push(Run {
                    round: round + 1,
                    target,
                    op,
                    secs: t.secs,
                    mib_s,
                    phase_mib_s,
                    client_cpu_s: t.client_cpu_s,
                    server_cpu_s: t.server.total(),
                    server_kernel_cpu_s: t.server.system,
                    other_cpu_s: t.other_cpu_s,
                });
                let per_gib = |secs: f64| secs * 1024.0 / ctx.payload_mib as f64;
                let cpu_s_gib = per_gib(t.server.total());
                if let Some(k) = kernel_cpu_key(target, op) {
                    let kernel = per_gib(t.server.system);
                    samples.entry(k).or_default().push(Kind::Layercache, kernel);
                }
                match sample_key(target, op) {
                    Some(k) => samples.entry(k).or_default().push(Kind::Layercache, mib_s),
                    None => ceilings.entry((target.v2(), op)).or_default().push(mib_s),
                }
                if !target.is_ceiling() {
                    let key = match op {
                        Op::Save => "actions_save_rss_mib",
                        Op::Restore => "actions_restore_rss_mib",
                    };
                    let mib = |bytes: u64| bytes as f64 / MIB as f64;
                    eprintln!(
                        "bench: round {} {:<24} {:<7} peak RSS {:.1} MiB (from {:.1})",
                        round + 1,
                        target.name(),
                        op.name(),
                        mib(peak),
                        mib(start)
                    );
                    samples
                        .entry(key)
                        .or_default()
                        .push(Kind::Layercache, mib(peak));
                }
                let cpu = cpu_key(target.layercache(), op).map(|key| (key, cpu_s_gib));
                let phase = phase_mib_s.map(|rate| (phase_key(target.v2(), op), rate));
                for (key, value) in cpu.into_iter().chain(phase) {
                    if target.is_ceiling() {
                        null_figures.entry(key).or_default().push(value);
                    } else {
                        samples
                            .entry(key)
                            .or_default()
                            .push(Kind::Layercache, value);
                    }
                }
            }
        }
    }
    let ceiling = |v2, op| ceilings.get(&(v2, op)).and_then(|s| Summary::of(s));
    limits.actions_v2_save = ceiling(true, Op::Save);
    limits.actions_v2_restore = ceiling(true, Op::Restore);
    limits.actions_v1_save = ceiling(false, Op::Save);
    limits.actions_v1_restore = ceiling(false, Op::Restore);
    for (key, values) in &null_figures {
        if let Some(summary) = Summary::of(values) {
            limits.actions_null.insert(key, summary);
        }
    }
    Ok(Report {
        client: format!("{CLIENT} {CLIENT_VERSION}"),
        client_dir: ctx.client.dir.clone(),
        payload_mib: ctx.payload_mib,
        archive_bytes,
        runs,
        peer: PEER,
    })
}

/// The workload's own table: each target's save and restore (median [min-max]), against
/// its protocol's ceiling, with the CPU each side spent; then the peer, for context.
pub fn table(report: &Report) -> String {
    let median = |target: Target, op: Op, f: fn(&Run) -> Option<f64>| {
        let v: Vec<f64> = report
            .runs
            .iter()
            .filter(|r| r.target == target && r.op == op)
            .filter_map(f)
            .collect();
        Summary::of(&v)
    };
    let rate = |t, op| median(t, op, |r| Some(r.mib_s));
    let show = |s: Option<Summary>| s.map_or("-".into(), |s| s.show());
    let cpu = |t, op, f: fn(&Run) -> Option<f64>| {
        median(t, op, f).map_or("-".into(), |s| format!("{:.1}", s.median))
    };
    let rows: Vec<Vec<String>> = Target::ALL
        .into_iter()
        .map(|t| {
            let ratio = |op| match (rate(t, op), rate(t.ceiling(), op)) {
                (Some(a), Some(b)) if !t.is_ceiling() && b.median > 0.0 => {
                    format!("{:.2}x", a.median / b.median)
                }
                _ => "-".into(),
            };
            vec![
                t.name().to_owned(),
                show(rate(t, Op::Save)),
                show(median(t, Op::Save, |r| r.phase_mib_s)),
                show(rate(t, Op::Restore)),
                show(median(t, Op::Restore, |r| r.phase_mib_s)),
                ratio(Op::Save),
                ratio(Op::Restore),
                format!(
                    "{} / {}",
                    cpu(t, Op::Save, |r| Some(r.client_cpu_s)),
                    cpu(t, Op::Restore, |r| Some(r.client_cpu_s))
                ),
                format!(
                    "{} / {}",
                    cpu(t, Op::Save, |r| Some(r.server_cpu_s)),
                    cpu(t, Op::Restore, |r| Some(r.server_cpu_s))
                ),
                format!(
                    "{} / {}",
                    cpu(t, Op::Save, |r| Some(r.other_cpu_s)),
                    cpu(t, Op::Restore, |r| Some(r.other_cpu_s))
                ),
            ]
        })
        .collect();
    let mut out = format!(
        "{} {}, {} MiB of incompressible data (tar + zstd by the client); MiB/s = payload / node wall time, a save's time after its archive was made, or a restore's until its archive was downloaded\n",
        CLIENT, CLIENT_VERSION, report.payload_mib
    );
    out.push_str(&report::render(
        &[
            "actions cache",
            "save MiB/s",
            "after the archive",
            "restore MiB/s",
            "until downloaded",
            "save/ceiling",
            "restore/ceiling",
            "client CPU s save/restore",
            "server CPU s save/restore",
            "others' CPU s save/restore",
        ],
        &rows,
    ));
    let disturbed = report
        .runs
        .iter()
        .filter(|r| r.other_cpu_s > 0.25 * r.secs)
        .count();
    if disturbed > 0 {
        out.push_str(&format!(
            "warning: in {disturbed} of {} runs the rest of the machine used more than a quarter of a core (others' CPU): those figures are disturbed\n",
            report.runs.len()
        ));
    }
    let p = PEER;
    out.push_str(&format!(
        "context: {} at ~{} MiB/s save and ~{}-{} MiB/s restore ({})\n",
        p.name,
        report::num(p.save_mib_s),
        report::num(p.restore_mib_s[0]),
        report::num(p.restore_mib_s[1]),
        p.note
    ));
    out
}

/// An untimed save and restore through layercache v2 before the rounds. On this VM the
/// first save and restore of a run cost the client about twice the CPU of any later one,
/// in making the archive as much as in sending it (likely memory the hypervisor took
/// back, touched first by the client), and the run's first is always layercache v2's.
async fn warm_up(
    invoke: &Invoke<'_>,
    payload: &Path,
    slices: &[Bytes],
    content: Content,
    logs: &Path,
) -> Result<()> {
    write_payload(payload, slices, content).await?;
    crate::settle();
    let key = "bench-warm-up";
    let save = invoke
        .time(Op::Save, key, &logs.join("warm-up-save.log"))
        .await?;
    std::fs::remove_file(payload)?;
    crate::settle();
    let restore = invoke
        .time(Op::Restore, key, &logs.join("warm-up-restore.log"))
        .await?;
    verify_payload(payload, slices, content).await?;
    eprintln!(
        "bench: warm-up through layercache v2 (untimed): save {:.1} s (client CPU {:.1} s), restore {:.1} s (client CPU {:.1} s)",
        save.secs, save.client_cpu_s, restore.secs, restore.client_cpu_s
    );
    Ok(())
}

/// How to run the client against one target.
struct Invoke<'a> {
    client: &'a ClientPackage,
    ws: &'a Path,
    runner_temp: &'a Path,
    token: &'a str,
    url: &'a str,
    server_pid: u32,
    target: Target,
}

impl Invoke<'_> {
    /// Run `node cache.mjs save|restore` for `key` with its output in `log`; returns its
    /// wall time, the client's CPU time (node and the tar and zstd it waited for), the
    /// server's and the rest of the machine's meanwhile.
    async fn time(&self, op: Op, key: &str, log: &Path) -> Result<Timing> {
        let out = File::create(log)?;
        let mut cmd = tokio::process::Command::new(&self.client.node);
        cmd.arg(self.client.dir.join("cache.mjs"))
            .arg(op.name())
            .arg(key);
        if op == Op::Restore {
            cmd.arg("-");
        }
        cmd.arg(SAVED_PATH)
            .current_dir(self.ws)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", std::env::var_os("HOME").unwrap_or_default())
            .env("ACTIONS_RUNTIME_TOKEN", self.token)
            .env("RUNNER_TEMP", self.runner_temp)
            .env("GITHUB_WORKSPACE", self.ws)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(out.try_clone()?);
        let base = format!("{}/", self.url.trim_end_matches('/'));
        if self.target.v2() {
            cmd.env("ACTIONS_RESULTS_URL", base)
                .env("ACTIONS_CACHE_SERVICE_V2", "true")
                .env("GITHUB_SERVER_URL", "https://github.com");
        } else {
            cmd.env("ACTIONS_CACHE_URL", base);
        }
        let pid = self.server_pid.to_string();
        let server0 = Cpu::of(&pid, false)?;
        let client0 = Cpu::of("self", true)?.total();
        let busy0 = servers::machine_busy_secs()?;
        let start = Instant::now();
        let mut child = cmd.spawn().context("running node")?;
        let output = child.stdout.take().context("no output from node")?;
        let (status, phase_secs) = tokio::join!(
            child.wait(),
            copy_output(output, out, op.phase_line(), start)
        );
        let (status, phase_secs) = (status.context("running node")?, phase_secs?);
        let secs = start.elapsed().as_secs_f64();
        let busy = servers::machine_busy_secs()? - busy0;
        let client = Cpu::of("self", true)?.total() - client0;
        let server = Cpu::of(&pid, false)?.since(server0);
        if !status.success() || !succeeded(op, log) {
            bail!(
                "{} {} of {key} failed ({status}); log {}:\n{}",
                self.target.name(),
                op.name(),
                log.display(),
                servers::tail(log)
            );
        }
        Ok(Timing {
            secs,
            phase_secs,
            client_cpu_s: client,
            other_cpu_s: (busy - client - server.total()).max(0.0),
            server,
        })
    }
}

/// Copy the client's `output` to `log`, line by line; returns how long after `start` it
/// first printed a line starting with `marker`, if it did.
async fn copy_output(
    output: tokio::process::ChildStdout,
    mut log: File,
    marker: &[u8],
    start: Instant,
) -> Result<Option<f64>> {
    use tokio::io::AsyncBufReadExt as _;
    let mut lines = tokio::io::BufReader::new(output).split(b'\n');
    let mut marked = None;
    while let Some(line) = lines.next_segment().await? {
        if marked.is_none() && line.starts_with(marker) {
            marked = Some(start.elapsed().as_secs_f64());
        }
        log.write_all(&line)?;
        log.write_all(b"\n")?;
    }
    Ok(marked)
}

/// Whether the client's last JSON line in `log` reports success: a save's cache id is
/// not -1 and a restore matched a key. The library turns most failures into a warning
/// and carries on, so a zero exit status alone proves nothing. The command line prints
/// `{"result": ...}` last.
fn succeeded(op: Op, log: &Path) -> bool {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let Some(last) = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .filter(serde_json::Value::is_object)
    else {
        return false;
    };
    match (op, last.get("result")) {
        (Op::Save, Some(v)) => v.as_i64().is_some_and(|id| id != -1),
        (Op::Restore, Some(v)) => v.is_string(),
        (_, None) => false,
    }
}

/// The null server, a child process on a free loopback port; killed when dropped.
struct NullServer {
    child: Child,
    url: String,
}

impl NullServer {
    fn start(node: &Path, script: &Path, archive: &Path, dir: &Path) -> Result<NullServer> {
        let log = dir.join("null-server.log");
        let mut child = Command::new(node)
            .arg(script)
            .arg("--archive")
            .arg(archive)
            .stdout(Stdio::piped())
            .stderr(File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", script.display()))?;
        let stdout = child.stdout.take().context("null server stdout")?;
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let Some(url) = line.trim().strip_prefix("null-server listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the null server printed {line:?}; log:\n{}",
                servers::tail(&log)
            );
        };
        let url = url.to_owned();
        let mut out = File::create(dir.join("null-server.stdout.log"))?;
        std::thread::spawn(move || std::io::copy(&mut reader, &mut out));
        Ok(NullServer { child, url })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Bytes it has received in uploads so far.
    async fn uploaded(&self, http: &reqwest::Client) -> Result<u64> {
        let stats: serde_json::Value = http
            .get(format!("{}/_null/stats", self.url))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        stats
            .get("uploaded_bytes")
            .and_then(serde_json::Value::as_u64)
            .context("null server stats without uploaded_bytes")
    }
}

impl Drop for NullServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A token for the bench's scope, signed with the key in layercache's data directory.
fn token(bin: &Path, data_dir: &Path) -> Result<String> {
    let out = Command::new(bin)
        .args(["token", "--data-dir"])
        .arg(data_dir)
        .args(["--read", REF, "--write", REF])
        .output()
        .with_context(|| format!("running {} token", bin.display()))?;
    ensure!(
        out.status.success(),
        "`layercache token` failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let token = String::from_utf8(out.stdout)?.trim().to_owned();
    ensure!(
        token.split('.').count() == 3,
        "`layercache token` printed {token:?}"
    );
    Ok(token)
}

/// The entry version the client computes for `paths` when `zstd` is installed.
fn cache_version(paths: &[&str]) -> String {
    let mut components: Vec<&str> = paths.to_vec();
    components.extend(["zstd-without-long", "1.0"]);
    hex::encode(Sha256::digest(components.join("|").as_bytes()))
}

/// Download, untimed, the archive layercache stores for `key` (through v2, as the
/// client would) to `dest`; returns its size.
async fn fetch_archive(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    key: &str,
    version: &str,
    dest: &Path,
) -> Result<u64> {
    let url = format!(
        "{}/{TWIRP}GetCacheEntryDownloadURL",
        base.trim_end_matches('/')
    );
    let response = http
        .post(&url)
        .bearer_auth(token)
        .json(&serde_json::json!({ "key": key, "version": version }))
        .send()
        .await?;
    let status = response.status();
    let body: serde_json::Value = response
        .json()
        .await
        .context("GetCacheEntryDownloadURL body")?;
    ensure!(
        status.is_success(),
        "GetCacheEntryDownloadURL: {status} {body}"
    );
    let signed = body
        .get("signed_download_url")
        .and_then(serde_json::Value::as_str)
        .with_context(|| format!("GetCacheEntryDownloadURL for {key}: {body}"))?;
    let mut response = http.get(signed).send().await?.error_for_status()?;
    let part = dest.with_extension("part");
    let mut file = tokio::fs::File::create(&part).await?;
    let mut n = 0u64;
    while let Some(chunk) = response.chunk().await? {
        file.write_all(&chunk).await?;
        n += chunk.len() as u64;
    }
    file.flush().await?;
    drop(file);
    tokio::fs::rename(&part, dest).await?;
    Ok(n)
}

/// One run's payload: the base with every 8 bytes XORed with a per-run mask.
#[derive(Clone, Copy, Debug)]
struct Content {
    mask: u64,
}

impl Content {
    fn new(run: u64) -> Content {
        // splitmix64: distinct, well-mixed masks for consecutive runs.
        let mut z = (run + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Content {
            mask: z ^ (z >> 31),
        }
    }

    /// `slice` of the base as this run has it, into `out`.
    fn fill(self, slice: &[u8], out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(slice);
        let mask = self.mask.to_ne_bytes();
        for chunk in out.chunks_exact_mut(8) {
            for (b, m) in chunk.iter_mut().zip(mask) {
                *b ^= m;
            }
        }
    }
}

/// Write the run's payload to `path`.
async fn write_payload(path: &Path, slices: &[Bytes], content: Content) -> Result<()> {
    let (path, slices) = (path.to_owned(), slices.to_vec());
    tokio::task::spawn_blocking(move || {
        let mut file = File::create(&path)?;
        let mut buf = Vec::with_capacity(MIB);
        for s in &slices {
            content.fill(s, &mut buf);
            file.write_all(&buf)?;
        }
        anyhow::Ok(())
    })
    .await?
}

/// Check that `path` holds exactly the payload of `content`.
async fn verify_payload(path: &Path, slices: &[Bytes], content: Content) -> Result<()> {
    let (path, slices) = (path.to_owned(), slices.to_vec());
    tokio::task::spawn_blocking(move || {
        let mut file =
            File::open(&path).with_context(|| format!("{} was not restored", path.display()))?;
        let want: u64 = slices.iter().map(|s| s.len() as u64).sum();
        let len = file.metadata()?.len();
        ensure!(len == want, "restored {len} bytes, saved {want}");
        let (mut expected, mut got) = (Vec::with_capacity(MIB), Vec::new());
        for (i, s) in slices.iter().enumerate() {
            content.fill(s, &mut expected);
            got.resize(expected.len(), 0);
            file.read_exact(&mut got)?;
            ensure!(got == expected, "restored bytes differ in MiB {i}");
        }
        Ok(())
    })
    .await?
}

/// `name` on the PATH, installing Debian `package` if it is missing (as root).
fn find_or_install(name: &str, package: &str) -> Result<PathBuf> {
    let find = || {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    setup::ensure_installed(&Path::new("/usr/bin").join(name), package)?;
    find().with_context(|| format!("{name} is not on the PATH"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_alternate_which_side_of_a_pair_goes_first() {
        let first = |round, side: fn(Target) -> bool| {
            let order = Target::order(round);
            [true, false].map(|v2| order.into_iter().find(|t| t.v2() == v2).map(side))
        };
        assert_eq!(first(0, Target::is_ceiling), [Some(false), Some(false)]);
        assert_eq!(first(1, Target::is_ceiling), [Some(true), Some(true)]);
        assert_eq!(first(2, Target::is_ceiling), [Some(false), Some(false)]);
        for round in 0..4 {
            let mut order = Target::order(round);
            order.sort_by_key(|t| t.tag());
            let mut all = Target::ALL;
            all.sort_by_key(|t| t.tag());
            assert_eq!(order, all, "round {round} visits every target once");
        }
        // The first ceiling restores an archive layercache v2 stored before it.
        assert_eq!(Target::order(0)[0], Target::LayercacheV2);
    }

    #[test]
    fn version_matches_the_client() {
        // sha256("payload|zstd-without-long|1.0"): what @actions/cache 6.3.0 sends for
        // paths ["payload"] with zstd installed.
        assert_eq!(
            cache_version(&["payload"]),
            "017732637f43e77771705c70b712049b766ed31ee9674eb5edeba6cb4eabb04c"
        );
    }

    #[test]
    fn content_differs_per_run_and_round_trips() {
        let slice = vec![7u8; 64];
        let (mut a, mut b, mut back) = (Vec::new(), Vec::new(), Vec::new());
        Content::new(0).fill(&slice, &mut a);
        Content::new(1).fill(&slice, &mut b);
        assert_ne!(a, b);
        Content::new(0).fill(&a, &mut back);
        assert_eq!(back, slice);
    }

    #[test]
    fn client_results_are_read_from_the_last_json_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let check = |op, text: &str| {
            std::fs::write(&log, text).unwrap();
            succeeded(op, &log)
        };
        assert!(check(Op::Save, "::debug::x\n{\"result\":12}\n"));
        assert!(!check(Op::Save, "{\"result\":-1}\n"));
        assert!(check(Op::Restore, "{\"result\":\"k\"}\n"));
        assert!(!check(Op::Restore, "{\"result\":null}\n"));
        assert!(!check(
            Op::Restore,
            "{\"result\":null}\nrestore of k: miss\n"
        ));
        assert!(!check(Op::Save, "no json here\n"));
    }

    #[tokio::test]
    async fn the_phase_line_is_found_and_every_line_logged() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        // What @actions/cache 6.3.0 prints around a restore's download.
        let output = "Cache hit for: k\nCache Size: ~1024 MB (1073741824 B)\n/usr/bin/tar -xf\n";
        let phase = |op: Op| {
            let log = log.clone();
            async move {
                let mut child = tokio::process::Command::new("printf")
                    .arg(output)
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                let stdout = child.stdout.take().unwrap();
                let file = File::create(&log).unwrap();
                let at = copy_output(stdout, file, op.phase_line(), Instant::now())
                    .await
                    .unwrap();
                child.wait().await.unwrap();
                (at, std::fs::read_to_string(&log).unwrap())
            }
        };
        let (at, logged) = phase(Op::Restore).await;
        assert!(at.is_some());
        assert_eq!(logged, output);
        let (at, _) = phase(Op::Save).await;
        assert_eq!(at, None, "a restore prints no save's phase line");
    }

    #[test]
    fn cpu_times_are_readable() {
        assert!(Cpu::of("self", false).is_ok());
        assert!(Cpu::of("self", true).is_ok());
        assert!(servers::machine_busy_secs().unwrap() > 0.0);
    }
}
