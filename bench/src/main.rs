//! Side-by-side benchmark of layercache against the CNCF distribution registry and
//! against the machine's own limits, in one run on one machine and one disk.
//!
//! `cargo run --release -p bench` builds `layercache` as it is deployed (`--profile dist`),
//! starts it and `docker-registry` on free loopback ports with their data in one temporary
//! directory, measures the machine's limits, runs every workload against both servers in
//! turn for several rounds, runs DESIGN.md scenario 1 with the real dockerd/BuildKit, then
//! prints one table (median and spread, ratio, limit, PASS/FAIL) and writes it as JSON.
//!
//! `--only actions` measures the GitHub Actions cache service instead: the official
//! `@actions/cache` client saving and restoring a 1 GiB entry against layercache (v2 and
//! v1) and against a null server that gives the client's own ceiling (see `actions.rs`).
//!
//! `--only head,manifest,auth` also measures HEAD and manifest rates on a second
//! layercache in `token` mode, through a bearer token as clients hold one (see
//! `auth.rs`), against the open one's in the same rounds.
//!
//! `--only eviction` measures eviction on servers of its own: how fast a pass evicts
//! thousands of images, distribution's offline garbage collection on the same images for
//! reference, and a push and a pull beside a long pass (see `eviction.rs`).
//!
//! `--only mirror` measures pull-through on servers of its own: a `--blob-mib` blob on an
//! upstream distribution registry, pulled through layercache (an `[[upstreams]]` named
//! `docker.io`) and through distribution's proxy mode, cold (the miss) and again with the
//! upstream stopped (the hit), against the upstream's own GET and a local pull from
//! layercache (see `mirror.rs`).
//!
//! `--only scale` measures scale-out on servers and services of its own: layercache on
//! Garage (S3) and PostgreSQL as one node and as three, against distribution's `s3`
//! driver on the same Garage (one instance and three) and layercache on local disk and
//! SQLite (see `scale.rs`).
//!
//! `--only project` measures a real project's size on servers and a dockerd of its own:
//! three service images sharing a base, `--project-mib` (4 GiB) of layers in all, built
//! cold, warm on a wiped builder, and after one source change, with BuildKit's inline
//! cache through the docker CLI and, when buildkitd and buildctl are found, its registry
//! cache with `mode=max` (see `project.rs`).

mod actions;
mod auth;
mod buildkit;
mod e2e;
mod eviction;
mod limits;
mod loadgen;
mod mirror;
mod payload;
mod project;
mod registry;
mod report;
mod scale;
mod servers;
mod setup;
mod windows;
mod workloads;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::e2e::{Daemon, Outcome, Plan, Variant};
use crate::payload::{Base, MIB};
use crate::registry::Registry;
use crate::report::{Figure, Limits, Samples};
use crate::servers::{Cpu, Kind, Server};
use crate::workloads::{Fixtures, Shape};

/// Benchmark layercache against the distribution registry on this machine.
#[derive(Parser, Debug)]
#[command(name = "bench")]
struct Args {
    /// Rounds of every workload per server (servers interleaved within each round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Run only these workloads (comma-separated); all by default.
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Workload>,
    /// Exit with an error when a figure misses its target.
    #[arg(long)]
    strict: bool,
    /// Skip what needs dockerd: the end-to-end scenario, the protection windows and the
    /// project workload.
    #[arg(long)]
    skip_e2e: bool,
    /// Also write the JSON report here (it always goes to bench/results/latest.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Use this layercache binary instead of building the `dist` one.
    #[arg(long)]
    layercache_bin: Option<PathBuf>,
    /// The distribution registry binary.
    #[arg(long, default_value = "/usr/bin/docker-registry")]
    registry_bin: PathBuf,
    /// The docker client (Debian's, which still drives BuildKit with DOCKER_BUILDKIT=1).
    #[arg(long, default_value = "/usr/bin/docker")]
    docker_bin: PathBuf,
    /// The docker daemon.
    #[arg(long, default_value = "/usr/sbin/dockerd")]
    dockerd_bin: PathBuf,
    /// A static busybox for the end-to-end image.
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Where the run's temporary directory goes (servers' data, limits files, dockerd).
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
    /// Size of the pushed and pulled blob, in MiB.
    #[arg(long, default_value_t = 1024)]
    blob_mib: usize,
    /// Duration of the HEAD workload, in seconds.
    #[arg(long, default_value_t = 10.0)]
    head_secs: f64,
    /// Duration of each manifest workload, in seconds.
    #[arg(long, default_value_t = 5.0)]
    manifest_secs: f64,
    /// Size of each of the end-to-end image's four large layers, in MiB.
    #[arg(long, default_value_t = 256)]
    e2e_layer_mib: usize,
    /// Seconds of simulated compute in the end-to-end compute variant.
    #[arg(long, default_value_t = 64)]
    compute_secs: u64,
    /// MiB of random layers across the project workload's three service images (a
    /// multiple of 16; lower it for a quick check).
    #[arg(long, default_value_t = 4096)]
    project_mib: usize,
    /// Rounds of the project workload's three phases (each on fresh servers; about 12 min
    /// a round at the default size on 2 cores).
    #[arg(long, default_value_t = 1)]
    project_rounds: usize,
    /// The project workload's builders, comma-separated [default: inline, and max when
    /// buildkitd and buildctl are found].
    #[arg(long, value_delimiter = ',')]
    project_cache: Vec<project::Cache>,
    /// The BuildKit daemon for the registry `mode=max` builder [default: on PATH].
    #[arg(long)]
    buildkitd: Option<PathBuf>,
    /// BuildKit's client for the registry `mode=max` builder [default: on PATH].
    #[arg(long)]
    buildctl: Option<PathBuf>,
    /// Size of the file the GitHub Actions cache client saves and restores, in MiB.
    #[arg(long, default_value_t = 1024)]
    actions_mib: usize,
    /// Rounds of the Actions cache workload [default: --rounds]. Its ratios to the null
    /// server swing by some 15 % between 5-round runs of one build (a save or restore is
    /// a few seconds of a client that fills both cores), so a verdict wants more rounds
    /// than the registry workloads, which cost minutes each.
    #[arg(long)]
    actions_rounds: Option<usize>,
    /// Rounds of the eviction workload (each fills fresh servers with thousands of
    /// images, so one by default; a round's transfers beside a pass give several samples).
    #[arg(long, default_value_t = 1)]
    eviction_rounds: usize,
    /// Size of each of the three layers the protection-window pushes move, in MiB.
    #[arg(long, default_value_t = 256)]
    windows_layer_mib: usize,
    /// Seconds of the step a build runs before it needs a layer of its imported cache.
    #[arg(long, default_value_t = 20)]
    windows_step_secs: u64,
    /// The npm package (package.json and cache.mjs) that runs @actions/cache [default:
    /// crates/layercache/tests/actions-cache, which the tests pin].
    #[arg(long)]
    actions_client: Option<PathBuf>,
}

/// A workload that `--only` can select.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// The machine's limits.
    Limits,
    /// Monolithic push.
    Push,
    /// Chunked push.
    Chunked,
    /// Single pull.
    Pull,
    /// Concurrent pulls.
    Pulls,
    /// HEAD rate.
    Head,
    /// Manifest PUT and GET rates.
    Manifest,
    /// BuildKit-style cache export.
    Export,
    /// HEAD and manifest rates with authentication on (a second layercache).
    Auth,
    /// dockerd/BuildKit end to end.
    E2e,
    /// GitHub Actions cache save and restore through @actions/cache (layercache only).
    Actions,
    /// Eviction passes, and a push and a pull beside one (on servers of its own).
    Eviction,
    /// The gaps eviction's protection windows cover, with docker, buildah, skopeo and
    /// BuildKit (a server and a dockerd of its own).
    Windows,
    /// Pull-through from an upstream registry, layercache's mirror against distribution's
    /// proxy mode (servers of its own).
    Mirror,
    /// Scale-out: layercache on Garage and PostgreSQL, one node and three, against
    /// distribution's S3 driver (servers and services of its own).
    Scale,
    /// A real project's size: three service images sharing a base, cold, warm and after
    /// one source change, with dockerd/BuildKit (servers and a dockerd of its own).
    Project,
}

/// What the JSON report holds.
#[derive(Serialize)]
struct Report {
    started_unix: u64,
    total_secs: f64,
    rounds: usize,
    machine: setup::Machine,
    shape: Shape,
    e2e_plan: Option<Plan>,
    limits: Limits,
    figures: Vec<Figure>,
    e2e: Vec<Outcome>,
    actions: Option<actions::Report>,
    eviction: Option<eviction::Report>,
    mirror: Option<mirror::Report>,
    scale: Option<scale::Report>,
    windows: Option<windows::Report>,
    project: Option<project::Report>,
    layercache_store: Option<servers::StoreState>,
    failed: Vec<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    tokio::select! {
        report = run(&args) => {
            let report = report?;
            let failed = report.failed.len();
            if failed > 0 {
                eprintln!("{failed} figure(s) below target: {}", report.failed.join(", "));
                ensure!(!args.strict, "--strict: {failed} figure(s) below target");
            }
            Ok(())
        }
        _ = tokio::signal::ctrl_c() => bail!("interrupted; servers stopped"),
    }
}

/// The whole run: tools, limits, servers, rounds, end to end, report. Servers, dockerd and
/// the temporary directory are owned here, so they are stopped and removed on any exit.
async fn run(args: &Args) -> Result<Report> {
    let started = Instant::now();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let selection = Selection {
        only: args.only.clone(),
        skip_e2e: args.skip_e2e,
    };
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    ensure!(
        args.eviction_rounds > 0,
        "--eviction-rounds must be at least 1"
    );
    ensure!(
        args.actions_rounds != Some(0),
        "--actions-rounds must be at least 1"
    );
    ensure!(
        args.project_rounds > 0,
        "--project-rounds must be at least 1"
    );
    let root = setup::workspace_root()?;

    let layercache_bin = match &args.layercache_bin {
        Some(bin) => bin.clone(),
        None => setup::build_layercache(&root)?,
    };
    setup::ensure_installed(&args.registry_bin, "docker-registry")?;
    if selection.any(&[Workload::E2e, Workload::Windows, Workload::Project]) {
        setup::ensure_installed(&args.dockerd_bin, "docker.io")?;
        setup::ensure_installed(&args.busybox, "busybox-static")?;
    }
    let actions_client = if selection.has(Workload::Actions) {
        Some(actions::ClientPackage::prepare(
            &root,
            args.actions_client.as_deref(),
        )?)
    } else {
        None
    };

    let tmp = match &args.tmp_dir {
        Some(dir) => tempfile::Builder::new()
            .prefix("layercache-bench-")
            .tempdir_in(dir)?,
        None => tempfile::Builder::new()
            .prefix("layercache-bench-")
            .tempdir()?,
    };
    let dir = tmp.path();
    eprintln!("bench: working in {}", dir.display());

    let shape = Shape {
        blob_mib: args.blob_mib,
        head_secs: args.head_secs,
        manifest_secs: args.manifest_secs,
        actions_mib: args.actions_mib,
        ..Shape::default()
    };
    let mut base_mib = shape
        .blob_mib
        .max(shape.pull_mib)
        .max(shape.export_large_mib);
    if selection.has(Workload::Actions) {
        base_mib = base_mib.max(shape.actions_mib);
    }
    if selection.has(Workload::Eviction) {
        base_mib = base_mib.max(shape.evict_large.layer_kib.div_ceil(1024));
    }
    if selection.has(Workload::Scale) {
        base_mib = base_mib.max(scale::PAYLOAD_MIB);
    }
    eprintln!("bench: generating {base_mib} MiB of payload");
    let base = tokio::task::spawn_blocking(move || Base::generate(base_mib, 0x5eed)).await?;

    let mut limits = Limits::default();
    if selection.has(Workload::Limits) {
        limits = limits::measure(dir, &base, args.rounds).await?;
        eprint!("{}", report::limits_table(&limits));
    }

    let client = registry::http_client()?;
    let uses_servers = selection.any(&[
        Workload::Push,
        Workload::Chunked,
        Workload::Pull,
        Workload::Pulls,
        Workload::Head,
        Workload::Manifest,
        Workload::Export,
        Workload::E2e,
        Workload::Auth,
    ]);
    let mut servers = Vec::new();
    if uses_servers || selection.has(Workload::Actions) {
        servers.push(Server::start_layercache(
            &layercache_bin,
            &dir.join("layercache"),
        )?);
    }
    if uses_servers {
        servers.push(Server::start_distribution(
            &args.registry_bin,
            &dir.join("distribution"),
        )?);
    }
    let mut registries = Vec::new();
    for server in &mut servers {
        let registry = Registry::new(client.clone(), &server.url)?;
        server.wait_ready(&registry).await?;
        eprintln!("bench: {} at {}", server.kind.name(), server.url);
        registries.push(registry);
    }

    let needs_fixtures = selection.any(&[
        Workload::Pulls,
        Workload::Head,
        Workload::Manifest,
        Workload::Export,
        Workload::Auth,
    ]);
    let fixtures = Fixtures::new(&base, &shape)?;
    if needs_fixtures {
        for (server, registry) in servers.iter().zip(&registries) {
            eprintln!("bench: pushing fixtures to {}", server.kind.name());
            fixtures.push_to(registry).await?;
        }
    }
    let mut guarded = None;
    if selection.has(Workload::Auth) {
        let started = auth::start(&layercache_bin, &dir.join("layercache-auth")).await?;
        eprintln!("bench: layercache (token mode) at {}", started.server.url);
        fixtures.push_to(&started.registry).await?;
        guarded = Some(started);
    }

    let mut bench = Workbench {
        dir,
        selection: &selection,
        shape: &shape,
        base: &base,
        fixtures: &fixtures,
        samples: BTreeMap::new(),
    };
    for round in 0..args.rounds {
        for (seq, (server, registry)) in servers.iter_mut().zip(&registries).enumerate() {
            server.check_alive()?;
            bench.round(round, seq, server, registry).await?;
        }
        if let Some(guarded) = &mut guarded {
            guarded.server.check_alive()?;
            bench.auth_round(round, &guarded.registry).await?;
        }
    }
    let mut samples = bench.samples;

    let mut actions_report = None;
    if let Some(package) = &actions_client {
        let layercache = servers
            .iter_mut()
            .find(|s| s.kind == Kind::Layercache)
            .context("layercache is not running")?;
        let ctx = actions::Inputs {
            dir,
            base: &base,
            http: &client,
            layercache_bin: &layercache_bin,
            client: package,
            payload_mib: shape.actions_mib,
            rounds: args.actions_rounds.unwrap_or(args.rounds),
        };
        actions_report = Some(actions::run(&ctx, layercache, &mut samples, &mut limits).await?);
    }

    let mut eviction_report = None;
    if selection.has(Workload::Eviction) {
        let ctx = eviction::Inputs {
            dir,
            base: &base,
            http: &client,
            layercache_bin: &layercache_bin,
            registry_bin: &args.registry_bin,
            shape: &shape,
            rounds: args.eviction_rounds,
        };
        eviction_report = Some(eviction::run(&ctx, &mut samples).await?);
    }

    let mut mirror_report = None;
    if selection.has(Workload::Mirror) {
        let ctx = mirror::Inputs {
            dir,
            base: &base,
            http: &client,
            layercache_bin: &layercache_bin,
            registry_bin: &args.registry_bin,
            blob_mib: shape.blob_mib,
            rounds: args.rounds,
        };
        mirror_report = Some(mirror::run(&ctx, &mut samples).await?);
    }

    let mut scale_report = None;
    if selection.has(Workload::Scale) {
        let ctx = scale::Inputs {
            dir,
            base: &base,
            http: &client,
            layercache_bin: &layercache_bin,
            registry_bin: &args.registry_bin,
            shape: &shape,
            rounds: args.rounds,
        };
        scale_report = Some(scale::run(&ctx).await?);
    }

    let mut windows_report = None;
    if selection.has(Workload::Windows) {
        ensure!(
            setup::is_root(),
            "the protection-window workload starts its own dockerd and needs root (or pass --skip-e2e)"
        );
        windows_report = Some(
            windows::run_all(&windows::Inputs {
                dir,
                layercache_bin: &layercache_bin,
                dockerd_bin: &args.dockerd_bin,
                docker_bin: &args.docker_bin,
                busybox: &args.busybox,
                layer_mib: args.windows_layer_mib,
                step_secs: args.windows_step_secs,
            })
            .await?,
        );
    }

    let mut project_report = None;
    if selection.has(Workload::Project) {
        ensure!(
            setup::is_root(),
            "the project workload starts its own dockerd and needs root (or pass --skip-e2e)"
        );
        let buildkit =
            buildkit::Binaries::find(args.buildkitd.as_deref(), args.buildctl.as_deref());
        let caches = if !args.project_cache.is_empty() {
            args.project_cache.clone()
        } else if buildkit.is_some() {
            vec![project::Cache::Inline, project::Cache::RegistryMax]
        } else {
            eprintln!(
                "bench: project: buildkitd or buildctl not found, so BuildKit's registry \
                 cache with mode=max is not measured (see --buildkitd, --buildctl)"
            );
            vec![project::Cache::Inline]
        };
        let ctx = project::Inputs {
            dir,
            http: &client,
            layercache_bin: &layercache_bin,
            registry_bin: &args.registry_bin,
            dockerd_bin: &args.dockerd_bin,
            docker_bin: &args.docker_bin,
            busybox: &args.busybox,
            total_mib: args.project_mib,
            rounds: args.project_rounds,
            caches,
            buildkit,
        };
        project_report = Some(project::run(&ctx, &mut samples).await?);
    }

    let mut outcomes = Vec::new();
    let plan = Plan {
        layer_mib: args.e2e_layer_mib,
        compute_secs: args.compute_secs,
    };
    if selection.has(Workload::E2e) {
        outcomes = run_e2e(args, dir, &plan, &mut servers).await?;
        for o in &outcomes {
            let (cold, warm, ratio) = match o.variant {
                Variant::Plain => ("e2e_cold_s", "e2e_warm_s", "e2e_warm_pct"),
                Variant::Compute => (
                    "e2e_compute_cold_s",
                    "e2e_compute_warm_s",
                    "e2e_compute_pct",
                ),
            };
            let entry = |key: &'static str, s: &mut BTreeMap<&'static str, Samples>, v: f64| {
                s.entry(key).or_default().push(o.server, v);
            };
            entry(cold, &mut samples, o.cold_secs);
            entry(warm, &mut samples, o.warm_secs);
            entry(ratio, &mut samples, 100.0 * o.warm_secs / o.cold_secs);
        }
    }

    let mut layercache_store = None;
    for server in &mut servers {
        server.check_alive()?;
        if server.kind == Kind::Layercache {
            // An older binary (`--layercache-bin`) may not export every figure it reads.
            match servers::StoreState::read(&server.url).await {
                Ok(state) => layercache_store = Some(state),
                Err(e) => eprintln!("bench: layercache's store state unread: {e:#}"),
            }
        }
        let rss = server.peak_rss()? as f64 / (1024.0 * 1024.0);
        samples.entry("rss_mib").or_default().push(server.kind, rss);
    }
    drop(servers);

    let figures = report::figures(&samples, &limits, &shape);
    let failed: Vec<String> = figures
        .iter()
        .filter(|f| f.pass == Some(false))
        .map(|f| f.key.clone())
        .chain(scale_report.iter().flat_map(scale::Report::failed))
        .collect();
    let report = Report {
        started_unix,
        total_secs: started.elapsed().as_secs_f64(),
        rounds: args.rounds,
        machine: setup::machine(),
        shape,
        e2e_plan: selection.has(Workload::E2e).then_some(plan),
        limits,
        figures,
        e2e: outcomes,
        actions: actions_report,
        eviction: eviction_report,
        mirror: mirror_report,
        scale: scale_report,
        windows: windows_report,
        project: project_report,
        layercache_store,
        failed,
    };

    println!();
    let limits_table = report::limits_table(&report.limits);
    if !limits_table.is_empty() {
        println!("{limits_table}");
    }
    if !report.figures.is_empty() {
        println!("{}", report::figures_table(&report.figures));
    }
    if let Some(actions) = &report.actions {
        println!("{}", actions::table(actions));
    }
    if let Some(eviction) = &report.eviction {
        println!("{}", eviction::table(eviction));
    }
    if let Some(mirror) = &report.mirror {
        println!("{}", mirror::table(mirror));
    }
    if let Some(scale) = &report.scale {
        println!("{}", scale::table(scale));
    }
    if let Some(windows) = &report.windows {
        println!("{}", windows::table(windows));
    }
    if let Some(project) = &report.project {
        println!("{}", project::table(project));
    }
    if let Some(store) = &report.layercache_store {
        println!("{}", store.describe());
    }
    let judged: Vec<bool> = report
        .figures
        .iter()
        .filter_map(|f| f.pass)
        .chain(
            report
                .scale
                .iter()
                .flat_map(|s| s.figures.iter().filter_map(|f| f.pass)),
        )
        .collect();
    println!(
        "{}total {:.0} s; {} of {} targets met",
        rounds_run(&selection, args),
        report.total_secs,
        judged.iter().filter(|&&pass| pass).count(),
        judged.len(),
    );

    let json = serde_json::to_string_pretty(&report)?;
    let latest = root.join("bench/results/latest.json");
    for path in std::iter::once(&latest).chain(&args.json) {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(report)
}

/// The workloads this run measures.
struct Selection {
    only: Vec<Workload>,
    skip_e2e: bool,
}

impl Selection {
    /// Whether `workload` runs.
    fn has(&self, workload: Workload) -> bool {
        (self.only.is_empty() || self.only.contains(&workload))
            && !(matches!(
                workload,
                Workload::E2e | Workload::Windows | Workload::Project
            ) && self.skip_e2e)
    }

    /// Whether any of `workloads` runs.
    fn any(&self, workloads: &[Workload]) -> bool {
        workloads.iter().any(|&w| self.has(w))
    }
}

/// The rounds the workloads that ran repeated, each count followed by `; ` (the project
/// and eviction workloads have counts of their own, the Actions cache one may; the rest
/// share `--rounds`).
fn rounds_run(selection: &Selection, args: &Args) -> String {
    use Workload::{
        Actions, Auth, Chunked, Eviction, Export, Head, Limits, Manifest, Mirror, Project, Pull,
        Pulls, Push, Scale,
    };
    let shared = [
        Limits, Push, Chunked, Pull, Pulls, Head, Manifest, Export, Auth, Actions, Mirror, Scale,
    ];
    let (evicted, built) = (selection.has(Eviction), selection.has(Project));
    let own_actions_rounds = args.actions_rounds.filter(|_| selection.has(Actions));
    let shared: Vec<Workload> = shared
        .into_iter()
        .filter(|w| *w != Actions || own_actions_rounds.is_none())
        .collect();
    [
        (selection.any(&shared), "rounds", args.rounds),
        (
            own_actions_rounds.is_some(),
            "actions rounds",
            own_actions_rounds.unwrap_or_default(),
        ),
        (evicted, "eviction rounds", args.eviction_rounds),
        (built, "project rounds", args.project_rounds),
    ]
    .iter()
    .filter(|(ran, ..)| *ran)
    .map(|(_, name, n)| format!("{name}: {n}; "))
    .collect()
}

/// What the rounds share, and the samples they collect.
struct Workbench<'a> {
    dir: &'a Path,
    selection: &'a Selection,
    shape: &'a Shape,
    base: &'a Base,
    fixtures: &'a Fixtures,
    samples: BTreeMap<&'static str, Samples>,
}

impl Workbench<'_> {
    fn record(&mut self, round: usize, kind: Kind, key: &'static str, value: f64) {
        eprintln!(
            "bench: round {} {:<12} {key:<16} {}",
            round + 1,
            kind.name(),
            report::num(value)
        );
        self.samples.entry(key).or_default().push(kind, value);
    }

    /// [`fresh_pages`] of the blob's size before a timed push, its cost recorded as the
    /// round's `fresh_page_cpu`.
    async fn fresh_pages(&mut self, round: usize, kind: Kind) -> Result<()> {
        let slices = self.base.slices();
        let slices = slices.get(..self.shape.blob_mib).unwrap_or(slices);
        let cost = fresh_pages(self.dir, slices).await?;
        self.record(round, kind, "fresh_page_cpu", cost);
        Ok(())
    }

    /// Record the server's peak resident memory since [`Server::new_peak_window`], which
    /// started it at `start` bytes, as `key`, in MiB.
    fn record_peak(
        &mut self,
        round: usize,
        server: &Server,
        key: &'static str,
        start: u64,
    ) -> Result<()> {
        let mib = |bytes: u64| bytes as f64 / MIB as f64;
        let peak = mib(server.window_peak_rss()?);
        eprintln!(
            "bench: round {} {:<12} {key:<16} {peak:.1} (from {:.1})",
            round + 1,
            server.kind.name(),
            mib(start)
        );
        self.samples.entry(key).or_default().push(server.kind, peak);
        Ok(())
    }

    /// HEAD and manifest rates on the server in `token` mode, recorded as layercache's
    /// `*_auth_*` figures.
    async fn auth_round(&mut self, round: usize, registry: &Registry) -> Result<()> {
        let (shape, fixtures) = (self.shape, self.fixtures);
        let kind = Kind::Layercache;
        let head =
            workloads::head_load(registry, fixtures, shape.head_conns, shape.head_secs).await?;
        self.record(round, kind, "head_auth_rps", head.per_sec);
        let (put, tags) = workloads::manifest_put_load(
            registry,
            fixtures,
            &format!("auth{round}"),
            shape.manifest_conns,
            shape.manifest_secs,
        )
        .await?;
        self.record(round, kind, "mput_auth_rps", put.per_sec);
        let get =
            workloads::manifest_get_load(registry, tags, shape.manifest_conns, shape.manifest_secs)
                .await?;
        self.record(round, kind, "mget_auth_rps", get.per_sec);
        Ok(())
    }

    /// Record the server's CPU seconds per GiB of `blob_mib` since `before` as `key`
    /// (and, with `kernel_key`, its kernel part).
    fn record_cpu(
        &mut self,
        round: usize,
        server: &Server,
        before: Cpu,
        keys: (&'static str, Option<&'static str>),
    ) -> Result<()> {
        let spent = server.cpu()?.since(before);
        let gib = self.shape.blob_mib as f64 / 1024.0;
        self.record(round, server.kind, keys.0, spent.total() / gib);
        if let Some(kernel) = keys.1 {
            self.record(round, server.kind, kernel, spent.system / gib);
        }
        Ok(())
    }

    /// One round of every selected workload against one server (`seq` is its place in
    /// the round).
    async fn round(
        &mut self,
        round: usize,
        seq: usize,
        server: &Server,
        registry: &Registry,
    ) -> Result<()> {
        let (shape, base, fixtures) = (self.shape, self.base, self.fixtures);
        let has = |w| self.selection.has(w);
        let kind = server.kind;
        let name = kind.name();
        let blob = base.blob(shape.blob_mib, &format!("mono-{name}-{round}"))?;
        if has(Workload::Push) {
            self.fresh_pages(round, kind).await?;
            let rss = server.new_peak_window()?;
            let before = server.cpu()?;
            let rate = workloads::push_monolithic(registry, &blob).await?;
            self.record_cpu(round, server, before, ("push_cpu", Some("push_sys")))?;
            self.record(round, kind, "push_mb_s", rate);
            self.record_peak(round, server, "push_rss_mib", rss)?;
        }
        if has(Workload::Chunked) {
            let chunked = base.blob(shape.blob_mib, &format!("chunked-{name}-{round}"))?;
            self.fresh_pages(round, kind).await?;
            let rss = server.new_peak_window()?;
            let before = server.cpu()?;
            let rate = workloads::push_chunked(registry, &chunked, shape.chunk_mib).await?;
            self.record_cpu(round, server, before, ("chunked_cpu", Some("chunked_sys")))?;
            self.record(round, kind, "chunked_mb_s", rate);
            self.record_peak(round, server, "chunked_rss_mib", rss)?;
        }
        if has(Workload::Pull) {
            if !has(Workload::Push) {
                registry.push(workloads::REPO_BLOBS, &blob).await?;
            }
            settle();
            let rss = server.new_peak_window()?;
            for _ in 0..workloads::PULLS_PER_ROUND {
                let before = server.cpu()?;
                let rate = workloads::pull(registry, &blob).await?;
                self.record_cpu(round, server, before, ("pull_cpu", None))?;
                self.record(round, kind, "pull_mb_s", rate);
            }
            self.record_peak(round, server, "pull_rss_mib", rss)?;
        }
        if has(Workload::Pulls) {
            let rss = server.new_peak_window()?;
            let rate = workloads::pull_concurrent(registry, &fixtures.pulls).await?;
            self.record(round, kind, "pulls_mb_s", rate);
            self.record_peak(round, server, "pulls_rss_mib", rss)?;
        }
        if has(Workload::Head) {
            let rss = server.new_peak_window()?;
            let rate =
                workloads::head_load(registry, fixtures, shape.head_conns, shape.head_secs).await?;
            self.record(round, kind, "head_rps", rate.per_sec);
            self.record(round, kind, "head_p50_ms", rate.p50_ms);
            self.record(round, kind, "head_p99_ms", rate.p99_ms);
            self.record_peak(round, server, "head_rss_mib", rss)?;
        }
        if has(Workload::Manifest) {
            let rss = server.new_peak_window()?;
            let (put, tags) = workloads::manifest_put_load(
                registry,
                fixtures,
                &format!("r{round}"),
                shape.manifest_conns,
                shape.manifest_secs,
            )
            .await?;
            self.record(round, kind, "mput_rps", put.per_sec);
            self.record(round, kind, "mput_p99_ms", put.p99_ms);
            let get = workloads::manifest_get_load(
                registry,
                tags,
                shape.manifest_conns,
                shape.manifest_secs,
            )
            .await?;
            self.record(round, kind, "mget_rps", get.per_sec);
            self.record(round, kind, "mget_p99_ms", get.p99_ms);
            self.record_peak(round, server, "manifest_rss_mib", rss)?;
        }
        if has(Workload::Export) {
            let seed = (round * 2 + seq) as u64 + 1;
            let missing = workloads::export_missing(base, shape, &format!("{name}-{round}"), seed)?;
            // Like a push, the export's uploads draw pages just freed (see `fresh_pages`).
            let mib = missing
                .iter()
                .map(|b| b.len)
                .sum::<u64>()
                .div_ceil(MIB as u64);
            let slices = base.slices();
            fresh_pages(
                self.dir,
                slices.get(..usize::try_from(mib)?).unwrap_or(slices),
            )
            .await?;
            let tag = format!("cache-{round}");
            let rss = server.new_peak_window()?;
            let secs = workloads::cache_export(registry, fixtures, &missing, shape, &tag).await?;
            self.record(round, kind, "export_s", secs);
            self.record_peak(round, server, "export_rss_mib", rss)?;
        }
        Ok(())
    }
}

/// Scenario 1 for each variant, against each server in turn, in a private dockerd.
async fn run_e2e(
    args: &Args,
    dir: &Path,
    plan: &Plan,
    servers: &mut [Server],
) -> Result<Vec<Outcome>> {
    ensure!(
        setup::is_root(),
        "the end-to-end scenario starts its own dockerd and needs root (or pass --skip-e2e)"
    );
    let docker_dir = dir.join("docker");
    eprintln!(
        "bench: starting a private dockerd in {}",
        docker_dir.display()
    );
    let daemon = Daemon::start(&args.dockerd_bin, &args.docker_bin, &docker_dir).await?;
    let mut outcomes = Vec::new();
    for variant in [Variant::Plain, Variant::Compute] {
        let ctx = e2e::context(&docker_dir, &args.busybox, plan, variant)?;
        for server in servers.iter_mut() {
            server.check_alive()?;
            eprintln!("bench: e2e {} with {}", variant.name(), server.kind.name());
            let o = e2e::scenario(
                &daemon,
                server.kind,
                &server.host,
                variant,
                &ctx,
                plan.layer_mib,
            )
            .await?;
            eprintln!(
                "bench: e2e {} {:<12} cold {:.1} s, warm {:.1} s",
                variant.name(),
                server.kind.name(),
                o.cold_secs,
                o.warm_secs
            );
            outcomes.push(o);
        }
    }
    drop(daemon);
    Ok(outcomes)
}

/// Flush dirty pages so one measurement's writeback does not land in the next one's time.
pub(crate) fn settle() {
    let _ = Command::new("sync").status();
}

/// [`settle`], then hand the next write workload pages the guest has just used: write
/// `slices` to a file in `dir` and delete it; returns what that cost, in CPU-s/GiB. On a
/// VM whose hypervisor takes free pages back (a balloon with free page reporting), a
/// page fresh to the guest costs several times the copy into it, so whichever server
/// writes into such pages pays the hypervisor's faults, and a figure measures the VM's
/// state and the order of the servers rather than the server. Freed pages stay cheap for
/// about a second, so this is a race the workload usually wins; the returned cost shows
/// the state it started from.
pub(crate) async fn fresh_pages(dir: &Path, slices: &[bytes::Bytes]) -> Result<f64> {
    settle();
    limits::page_cache_write_cpu(dir, slices).await
}
