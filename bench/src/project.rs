//! A real project's size: three service images (`web`, `worker`, `api`) of one multi-stage
//! Dockerfile, sharing a base and a dependencies stage, about 4 GiB of layers together,
//! built by the real BuildKit (see the builders below) against each server in turn:
//!
//! * **cold**: builder wiped, every service built and pushed with its cache;
//! * **warm**: builder wiped, every service rebuilt from every service's pushed cache;
//!   BuildKit must have run no step (`CACHED`, or a `RUN` whose process never printed:
//!   see `e2e::Step::ran`);
//! * **change**: one service's source file edited, builder wiped, every service rebuilt
//!   from the cache and pushed; BuildKit must have run only the changed `COPY` and
//!   the `RUN` after it, in that service, and taken every other step from the cache.
//!
//! The phases are interleaved (each phase against both servers before the next, the
//! servers' order alternating between phases and between rounds), in one private dockerd
//! that has run one small untimed build first; every round (`--project-rounds`) starts
//! fresh servers and removes the last round's. Every phase reports its wall time, the
//! server's CPU seconds over it (`/proc/<pid>/stat`), that CPU as a share of the wall
//! time and of the CPU the whole machine was busy with (`/proc/stat`), and the build
//! client's CPU (dockerd's process tree and the docker CLI), so what is left of the
//! machine's busy CPU is other work: the machine is shared, and on 2 cores a phase's wall
//! time follows that load far more than the server's few CPU seconds. It also reports
//! how much of the server's data was in the page cache at the phase's start (`mincore`),
//! what the server read from the disk over it (`/proc/<pid>/io`) with its major faults,
//! and what the whole machine read (`/proc/vmstat`). Before each phase both servers' data
//! is written back and dropped from the page cache, so every phase reads what it needs
//! from the disk: on a machine whose memory does not hold both servers' data and the
//! builder's, which blobs a phase found in memory otherwise depended on what ran before
//! it, and the warm phase went to whichever server built first (the second read 2.2-2.7
//! GiB of its data from the disk, and its build client spent 8-22 CPU-seconds more).
//!
//! The Dockerfile: `base` (busybox and two "runtime" layers of `unit` MiB), `deps` on it
//! (one `2 * unit` layer), then per service a build stage on `deps` (a `2 * unit`
//! artifact) and a final stage on `base` that copies the dependencies and the artifact in,
//! adds `2 * unit` of its own assets, then copies its small source late (`COPY src/<svc>/`)
//! and derives a bundle from it (`RUN`), as a web project's images do. Every byte is from
//! `/dev/urandom` (incompressible), and no `RUN` uses a network (docker builds with
//! `--network=none`); the layers pushed are `16 * unit` MiB in all, and each service
//! image is `8 * unit` MiB.
//!
//! layercache runs with `min_free = "1GiB"` instead of its default 10 % of the
//! filesystem: on a disk others fill, the default shrinks its quota to what the run pushes
//! or below and evicts the images the warm build needs (on this machine's shared 252 GB
//! disk with 24 GB free the default quota was 0 bytes), while distribution keeps
//! everything. Its eviction passes are logged, and any root evicted during the run fails
//! it, so every figure is of a server that kept what it was given.
//!
//! Two builders carry the cache, each against fresh servers (`--project-cache`):
//!
//! * **inline**: the packaged docker CLI (Debian 12's docker.io 20.10, no buildx) with
//!   `DOCKER_BUILDKIT=1 docker build`, inline cache (`BUILDKIT_INLINE_CACHE=1`, which is
//!   `mode=min`: only the final image's layers, with the cache records that lead to them,
//!   embedded in each image's config) and `--cache-from` every service's image; warm
//!   builds load the images into dockerd.
//! * **registry mode=max**: a standalone buildkitd driven by `buildctl` (see
//!   `buildkit.rs`; used when both are found), which pushes each service's image and
//!   exports a separate registry cache (`HOST/project/<svc>:buildcache`, `mode=max`: the
//!   intermediate stages' layers too, `deps` and the build stages, `8 * unit` MiB more)
//!   and imports every service's cache; warm builds export each image as an OCI archive
//!   that the bench counts and drops. A fresh buildkitd per phase is the wiped builder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

use crate::buildkit::{self, Binaries};
use crate::e2e::{self, Daemon, Step};
use crate::registry::Registry;
use crate::report::{self, Samples, Target};
use crate::servers::{self, Kind, Server};

/// The services, in build and push order.
pub const SERVICES: [&str; 3] = ["web", "worker", "api"];
/// The service whose source the change phase edits.
pub const CHANGED: &str = "web";
/// Dockerfile steps (`COPY`, `RUN`) each service's build goes through.
const STEPS_PER_SERVICE: usize = 11;
/// layercache's configuration for the run (see the module): a small fixed free-space
/// reserve, and its eviction passes logged.
const LAYERCACHE_ENV: [(&str, &str); 2] = [
    ("LAYERCACHE_STORE__EVICTION__MIN_FREE", "1GiB"),
    ("RUST_LOG", "error,store::registry=info"),
];

/// What the workload needs from the run.
pub struct Inputs<'a> {
    /// The run's temporary directory (the workload works in `project/` under it and
    /// removes it afterwards).
    pub dir: &'a Path,
    /// The benchmark's HTTP client.
    pub http: &'a reqwest::Client,
    /// The release layercache.
    pub layercache_bin: &'a Path,
    /// The distribution registry.
    pub registry_bin: &'a Path,
    /// The docker daemon.
    pub dockerd_bin: &'a Path,
    /// The docker client.
    pub docker_bin: &'a Path,
    /// A static busybox for the images.
    pub busybox: &'a Path,
    /// MiB of random layers across the services' images (rounded down to a multiple of
    /// 16).
    pub total_mib: usize,
    /// Rounds of the three phases, each on fresh servers.
    pub rounds: usize,
    /// The builders to measure, in order.
    pub caches: Vec<Cache>,
    /// buildkitd and buildctl, for [`Cache::RegistryMax`].
    pub buildkit: Option<Binaries>,
}

/// How the services' build cache travels (see the module).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Cache {
    /// dockerd's BuildKit through the docker CLI, inline cache in each image.
    Inline,
    /// buildkitd through buildctl, a registry cache per service exported with `mode=max`.
    #[value(name = "max")]
    RegistryMax,
}

impl Cache {
    /// How the cache travels, as printed.
    pub fn describe(self) -> &'static str {
        match self {
            Cache::Inline => {
                "inline cache (docker CLI, BUILDKIT_INLINE_CACHE=1, mode=min), --cache-from every service"
            }
            Cache::RegistryMax => {
                "registry cache (buildctl, mode=max, <svc>:buildcache), imported from every service"
            }
        }
    }

    /// The sample keys of `phase`: wall seconds, the server's CPU seconds, and its share
    /// of the machine's busy CPU.
    pub fn keys(self, phase: Phase) -> [&'static str; 3] {
        match (self, phase) {
            (Cache::Inline, Phase::Cold) => [
                "project_cold_s",
                "project_cold_cpu_s",
                "project_cold_cpu_pct",
            ],
            (Cache::Inline, Phase::Warm) => [
                "project_warm_s",
                "project_warm_cpu_s",
                "project_warm_cpu_pct",
            ],
            (Cache::Inline, Phase::Change) => [
                "project_change_s",
                "project_change_cpu_s",
                "project_change_cpu_pct",
            ],
            (Cache::RegistryMax, Phase::Cold) => [
                "project_max_cold_s",
                "project_max_cold_cpu_s",
                "project_max_cold_cpu_pct",
            ],
            (Cache::RegistryMax, Phase::Warm) => [
                "project_max_warm_s",
                "project_max_warm_cpu_s",
                "project_max_warm_cpu_pct",
            ],
            (Cache::RegistryMax, Phase::Change) => [
                "project_max_change_s",
                "project_max_change_cpu_s",
                "project_max_change_cpu_pct",
            ],
        }
    }
}

/// A phase of the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Wiped builder, no cache: build and push every service.
    Cold,
    /// Wiped builder, rebuild every service from the pushed images' cache.
    Warm,
    /// One source file edited, wiped builder, rebuild from the cache and push.
    Change,
}

impl Phase {
    /// Every phase, in the order run.
    pub const ALL: [Phase; 3] = [Phase::Cold, Phase::Warm, Phase::Change];

    /// Lower-case name, as printed.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Cold => "cold",
            Phase::Warm => "warm",
            Phase::Change => "change",
        }
    }

    /// Whether the phase imports the pushed images' cache.
    fn cache_from(self) -> bool {
        self != Phase::Cold
    }

    /// Whether the phase pushes what it built.
    fn pushes(self) -> bool {
        self != Phase::Warm
    }
}

/// What the JSON report holds of the workload.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// MiB of random layers pushed across the images (`16 * unit_mib`).
    pub total_mib: usize,
    /// The size unit of the layers, in MiB.
    pub unit_mib: usize,
    /// The services.
    pub services: [&'static str; 3],
    /// The service whose source the change phase edits.
    pub changed: &'static str,
    /// Dockerfile steps per service build.
    pub steps_per_service: usize,
    /// The builders measured, in order.
    pub caches: Vec<Cache>,
    /// Every phase against every server, in the order run.
    pub runs: Vec<Run>,
}

/// One phase against one server.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    /// How the cache travelled.
    pub cache: Cache,
    /// Round, from 1.
    pub round: usize,
    /// Which phase.
    pub phase: Phase,
    /// Which server.
    pub server: Kind,
    /// Wall seconds from the first build to the last push (or build).
    pub secs: f64,
    /// The server's CPU seconds in user space over the phase.
    pub server_user_secs: f64,
    /// The server's CPU seconds in the kernel over the phase.
    pub server_system_secs: f64,
    /// CPU seconds the whole machine was busy with over the phase.
    pub machine_busy_secs: f64,
    /// CPU seconds of the build client over the phase: the private dockerd and what it
    /// ran (BuildKit, `RUN` steps, compression, pulls), and the docker CLI.
    pub client_secs: f64,
    /// The server's CPU over the wall time, in % of one core.
    pub server_of_wall_pct: f64,
    /// The server's CPU over the machine's busy CPU, in %.
    pub server_of_busy_pct: f64,
    /// Steps BuildKit reported over the phase's builds.
    pub steps: usize,
    /// Those it reported `CACHED`.
    pub cached: usize,
    /// Those it ran, as `service: step`.
    pub ran: Vec<String>,
    /// Bytes of the server's data directory in the page cache when the phase started.
    pub server_resident_at_start_bytes: u64,
    /// Bytes the server read from the disk over the phase.
    pub server_disk_read_bytes: u64,
    /// The server's page faults that waited for the disk over the phase.
    pub server_major_faults: u64,
    /// Bytes the whole machine read from its disks over the phase.
    pub machine_disk_read_bytes: u64,
    /// Bytes in the server's data directory after the phase.
    pub stored_bytes: u64,
    /// Size of each service's image as dockerd reports it, in bytes.
    pub image_bytes: BTreeMap<&'static str, u64>,
    /// Images and cache entries layercache's eviction passes had removed by the end of
    /// the phase (none, or the run fails); `None` for distribution.
    pub evicted_roots: Option<u64>,
}

impl Run {
    /// The server's CPU seconds, user and kernel.
    pub fn server_secs(&self) -> f64 {
        self.server_user_secs + self.server_system_secs
    }
}

/// The project's Dockerfile for layers of `unit` MiB (see the module).
fn dockerfile(unit: usize) -> String {
    let dd = |path: &str, mib: usize| {
        let dir = path.rsplit_once('/').map_or("/", |(d, _)| d);
        format!("RUN mkdir -p {dir}/ && dd if=/dev/urandom of={path} bs=1M count={mib}")
    };
    let mut out = format!(
        "FROM scratch AS base\n\
         COPY busybox /bin/busybox\n\
         RUN [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox --install -s /bin && echo installed\"]\n\
         {}\n{}\n\n\
         FROM base AS deps\n{}\n",
        dd("/opt/runtime-1.bin", unit),
        dd("/opt/runtime-2.bin", unit),
        dd("/deps.bin", 2 * unit),
    );
    for svc in SERVICES {
        out.push_str(&format!(
            "\nFROM deps AS {svc}-build\n{}\n\n\
             FROM base AS {svc}\n\
             COPY --from=deps /deps.bin /opt/deps.bin\n\
             COPY --from={svc}-build /{svc}.bin /opt/{svc}/app.bin\n\
             {}\n\
             {}\n\
             {}\n",
            dd(&format!("/{svc}.bin"), 2 * unit),
            dd(&format!("/opt/{svc}/assets.bin"), 2 * unit),
            source_copy(svc),
            source_run(svc),
        ));
    }
    out
}

/// The late `COPY` of a service's source.
fn source_copy(svc: &str) -> String {
    format!("COPY src/{svc}/ /src/{svc}/")
}

/// The `RUN` that derives the service's bundle from its source.
fn source_run(svc: &str) -> String {
    format!(
        "RUN cat /src/{svc}/* > /opt/{svc}/bundle.txt && \
         sha256sum /opt/{svc}/bundle.txt | tee /opt/{svc}/bundle.sha256"
    )
}

/// Write a service's source file at `revision`.
fn write_source(ctx: &Path, svc: &str, revision: u32) -> Result<()> {
    let dir = ctx.join("src").join(svc);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("main.txt"),
        format!("// {svc}: the service's source, revision {revision}\n"),
    )?;
    Ok(())
}

/// Start a private dockerd and both servers, run every phase against each server, and
/// remove everything the workload stored. Figures go to `samples`.
pub async fn run(
    ctx: &Inputs<'_>,
    samples: &mut BTreeMap<&'static str, Samples>,
) -> Result<Report> {
    let unit = ctx.total_mib / 16;
    ensure!(unit > 0, "--project-mib must be at least 16");
    let work = ctx.dir.join("project");
    let report = run_in(ctx, &work, unit, samples).await;
    // Servers and dockerd are stopped by now; what they stored goes, whatever happened.
    if let Err(e) = std::fs::remove_dir_all(&work) {
        eprintln!("bench: project: could not remove {}: {e}", work.display());
    }
    report
}

async fn run_in(
    ctx: &Inputs<'_>,
    work: &Path,
    unit: usize,
    samples: &mut BTreeMap<&'static str, Samples>,
) -> Result<Report> {
    let context = work.join("context");
    e2e::write_context(&context, ctx.busybox, &dockerfile(unit))?;
    eprintln!(
        "bench: project: {} services, {} MiB of layers, {} round(s) of {:?}, in {}",
        SERVICES.len(),
        16 * unit,
        ctx.rounds,
        ctx.caches,
        work.display()
    );
    let mut runs = Vec::new();
    for &cache in &ctx.caches {
        let builder = Builder::new(ctx, cache, work).await?;
        for round in 1..=ctx.rounds {
            // Fresh servers every round (the last round's removed), so each cold push is
            // cold and the disk holds one round's images at a time.
            let dir = work.join(format!("{cache:?}-round-{round}"));
            for r in run_round(ctx, &builder, round, &dir, &context, unit).await? {
                let values = [r.secs, r.server_secs(), r.server_of_busy_pct];
                for (key, value) in cache.keys(r.phase).into_iter().zip(values) {
                    samples.entry(key).or_default().push(r.server, value);
                }
                runs.push(r);
            }
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                eprintln!("bench: project: could not remove {}: {e}", dir.display());
            }
        }
    }
    Ok(Report {
        total_mib: 16 * unit,
        unit_mib: unit,
        services: SERVICES,
        changed: CHANGED,
        steps_per_service: STEPS_PER_SERVICE,
        caches: ctx.caches.clone(),
        runs,
    })
}

/// One round (from 1) of every phase against fresh servers in `dir`, alternating which
/// server goes first; its runs, in the order run.
async fn run_round(
    ctx: &Inputs<'_>,
    builder: &Builder,
    round: usize,
    dir: &Path,
    context: &Path,
    unit: usize,
) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    let cache = builder.cache();
    let mut servers = vec![
        Server::start_layercache_with(
            ctx.layercache_bin,
            &dir.join("layercache"),
            &LAYERCACHE_ENV.map(|(k, v)| (k.to_owned(), v.to_owned())),
        )?,
        Server::start_distribution(ctx.registry_bin, &dir.join("distribution"))?,
    ];
    let mut registries = Vec::new();
    for server in &mut servers {
        let registry = Registry::new(ctx.http.clone(), &server.url)?;
        server.wait_ready(&registry).await?;
        registries.push(registry);
    }
    for svc in SERVICES {
        write_source(context, svc, 0)?;
    }
    let data_dirs: Vec<PathBuf> = servers.iter().map(|s| s.data_dir.clone()).collect();
    for (i, phase) in Phase::ALL.into_iter().enumerate() {
        if phase == Phase::Change {
            write_source(context, CHANGED, 1)?;
        }
        // Alternate which server goes first, between phases and between rounds, so
        // neither always follows the other.
        let order = if (i + round) % 2 == 1 { [0, 1] } else { [1, 0] };
        for k in order {
            let (Some(server), Some(registry)) = (servers.get_mut(k), registries.get(k)) else {
                bail!("no server {k}");
            };
            server.check_alive()?;
            crate::settle();
            for dir in &data_dirs {
                drop_from_page_cache(dir);
            }
            eprintln!(
                "bench: project: {cache:?} round {round} {} with {}",
                phase.name(),
                server.kind.name()
            );
            let mut r = run_phase(builder, server, registry, phase, context, unit).await?;
            r.round = round;
            eprintln!(
                "bench: project: {cache:?} round {round} {:<6} {:<12} {:.1} s, server CPU \
                 {:.1} s ({:.0} % of wall, {:.0} % of the machine's busy CPU), client CPU \
                 {:.1} s, {} of {} steps cached; the server read {} MiB from the disk \
                 ({} major faults) with {} MiB of its data in the page cache at the start, \
                 the machine {} MiB",
                phase.name(),
                server.kind.name(),
                r.secs,
                r.server_secs(),
                r.server_of_wall_pct,
                r.server_of_busy_pct,
                r.client_secs,
                r.cached,
                r.steps,
                r.server_disk_read_bytes >> 20,
                r.server_major_faults,
                r.server_resident_at_start_bytes >> 20,
                r.machine_disk_read_bytes >> 20
            );
            runs.push(r);
        }
    }
    for server in &mut servers {
        server.check_alive()?;
    }
    Ok(runs)
}

/// The repository of `svc`'s image and cache.
fn repo(svc: &str) -> String {
    format!("project/{svc}")
}

/// The image `svc` is tagged and pushed as on the registry at `host`.
fn image(host: &str, svc: &str) -> String {
    format!("{host}/{}:latest", repo(svc))
}

/// The builder of one [`Cache`].
enum Builder {
    /// A private dockerd, wiped before each phase.
    Docker(Daemon),
    /// buildkitd and buildctl; each phase starts a fresh buildkitd with its state in `dir`.
    Buildkit { bins: Binaries, dir: PathBuf },
}

/// A builder wiped for one phase.
enum Wiped<'a> {
    Docker(&'a Daemon),
    Buildkit(buildkit::Daemon),
}

impl Builder {
    /// Which cache this builder carries.
    fn cache(&self) -> Cache {
        match self {
            Builder::Docker(_) => Cache::Inline,
            Builder::Buildkit { .. } => Cache::RegistryMax,
        }
    }

    /// The builder for `cache`, working under `work`.
    async fn new(ctx: &Inputs<'_>, cache: Cache, work: &Path) -> Result<Builder> {
        Ok(match cache {
            Cache::Inline => {
                let daemon =
                    Daemon::start(ctx.dockerd_bin, ctx.docker_bin, &work.join("docker")).await?;
                // One small untimed build first, so the fresh daemon's first use of
                // BuildKit, runc and its layer store is charged to no phase.
                let warmup = work.join("warmup");
                e2e::write_context(
                    &warmup,
                    ctx.busybox,
                    "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"true\"]\n",
                )?;
                let warmup = warmup.to_str().context("context path is not UTF-8")?;
                daemon
                    .run(&["build", "--network=none", "-t", "bench-warmup", warmup])
                    .await?;
                Builder::Docker(daemon)
            }
            Cache::RegistryMax => Builder::Buildkit {
                bins: ctx.buildkit.clone().context(
                    "the registry mode=max builder needs buildkitd and buildctl \
                     (--buildkitd and --buildctl, or on PATH)",
                )?,
                dir: work.join("buildkit"),
            },
        })
    }

    /// The builder with nothing built or cached, able to reach `server`.
    async fn wiped(&self, server: &Server) -> Result<Wiped<'_>> {
        Ok(match self {
            Builder::Docker(daemon) => {
                daemon.wipe().await?;
                Wiped::Docker(daemon)
            }
            Builder::Buildkit { bins, dir } => {
                Wiped::Buildkit(buildkit::Daemon::start(bins, dir, &[&server.host]).await?)
            }
        })
    }
}

/// One service's build in a phase.
struct Built {
    svc: &'static str,
    /// BuildKit's `--progress=plain` output.
    progress: String,
    /// Bytes of the OCI archive buildctl exported instead of pushing, if it did.
    archive_bytes: Option<u64>,
}

impl Wiped<'_> {
    /// The builder's process: its CPU, and its children's, is the build client's.
    fn pid(&self) -> u32 {
        match self {
            Wiped::Docker(daemon) => daemon.pid(),
            Wiped::Buildkit(daemon) => daemon.pid(),
        }
    }

    /// Build every service for `phase` against the registry at `host`, and push them if
    /// the phase pushes.
    async fn build(&self, phase: Phase, host: &str, ctx: &str) -> Result<Vec<Built>> {
        let mut built = Vec::new();
        match self {
            Wiped::Docker(daemon) => {
                let images: Vec<String> = SERVICES.iter().map(|svc| image(host, svc)).collect();
                for (svc, tag) in SERVICES.iter().zip(&images) {
                    let mut args = vec![
                        "build",
                        "--progress=plain",
                        "--network=none",
                        "--build-arg",
                        "BUILDKIT_INLINE_CACHE=1",
                        "--target",
                        svc,
                        "-t",
                        tag,
                    ];
                    if phase.cache_from() {
                        for from in &images {
                            args.extend(["--cache-from", from.as_str()]);
                        }
                    }
                    args.push(ctx);
                    built.push(Built {
                        svc,
                        progress: daemon.run(&args).await?,
                        archive_bytes: None,
                    });
                }
                if phase.pushes() {
                    for tag in &images {
                        daemon.run(&["push", tag]).await?;
                    }
                }
            }
            Wiped::Buildkit(daemon) => {
                let cache_ref =
                    |svc: &str| format!("type=registry,ref={host}/{}:buildcache", repo(svc));
                for svc in SERVICES {
                    let mut args: Vec<String> = [
                        "--frontend",
                        "dockerfile.v0",
                        "--local",
                        &format!("context={ctx}"),
                        "--local",
                        &format!("dockerfile={ctx}"),
                        "--opt",
                        &format!("target={svc}"),
                    ]
                    .map(str::to_owned)
                    .into();
                    if phase.pushes() {
                        args.extend([
                            "--output".to_owned(),
                            format!("type=image,name={},push=true", image(host, svc)),
                            "--export-cache".to_owned(),
                            format!("{},mode=max", cache_ref(svc)),
                        ]);
                    }
                    if phase.cache_from() {
                        for from in SERVICES {
                            args.extend(["--import-cache".to_owned(), cache_ref(from)]);
                        }
                    }
                    let build = daemon.build(&args, !phase.pushes()).await?;
                    built.push(Built {
                        svc,
                        progress: build.progress,
                        archive_bytes: build.archive_bytes,
                    });
                }
            }
        }
        Ok(built)
    }

    /// The size of `built`'s image: as dockerd stored it, as the registry holds it
    /// (pushed by buildctl), or the archive buildctl exported.
    async fn image_bytes(&self, built: &Built, registry: &Registry, host: &str) -> Result<u64> {
        match self {
            Wiped::Docker(daemon) => daemon
                .run(&[
                    "image",
                    "inspect",
                    "--format",
                    "{{.Size}}",
                    &image(host, built.svc),
                ])
                .await?
                .trim()
                .parse()
                .context("image size"),
            Wiped::Buildkit(_) => match built.archive_bytes {
                Some(bytes) => Ok(bytes),
                None => registry.image_bytes(&repo(built.svc), "latest").await,
            },
        }
    }
}

/// One phase against one server: wipe the builder, build every service (and push them),
/// then check BuildKit's own account of which steps it ran.
async fn run_phase(
    builder: &Builder,
    server: &Server,
    registry: &Registry,
    phase: Phase,
    context: &Path,
    unit: usize,
) -> Result<Run> {
    let ctx = context.to_str().context("context path is not UTF-8")?;
    let wiped = builder.wiped(server).await?;
    crate::settle();

    let resident = resident_bytes(&server.data_dir);
    let cpu0 = server.cpu()?;
    let reads0 = server.disk_reads()?;
    let machine_reads0 = servers::machine_disk_read_bytes()?;
    let client0 = client_cpu_secs(wiped.pid())?;
    let busy0 = servers::machine_busy_secs()?;
    let start = Instant::now();
    let built = wiped.build(phase, &server.host, ctx).await?;
    let secs = start.elapsed().as_secs_f64();
    let busy = servers::machine_busy_secs()? - busy0;
    let cpu = server.cpu()?.since(cpu0);
    let reads = server.disk_reads()?.since(reads0);
    let machine_reads = servers::machine_disk_read_bytes()?.saturating_sub(machine_reads0);
    let client = client_cpu_secs(wiped.pid())? - client0;

    let evicted = match server.kind {
        Kind::Layercache => {
            let evicted = evicted_roots(&server.data_dir.with_file_name("server.log"));
            ensure!(
                evicted == 0,
                "layercache evicted {evicted} images or cache entries by the end of the {} \
                 phase (is the disk nearly full?); the figures would not compare",
                phase.name()
            );
            Some(evicted)
        }
        Kind::Distribution => None,
    };
    let mut steps = 0;
    let mut cached = 0;
    let mut ran = Vec::new();
    let mut image_bytes = BTreeMap::new();
    for b in &built {
        let svc = b.svc;
        let found = e2e::build_steps(&b.progress);
        check_steps(phase, svc, &found, &b.progress)
            .with_context(|| format!("{} phase against {}", phase.name(), server.kind.name()))?;
        steps += found.len();
        cached += found.iter().filter(|s| !s.ran()).count();
        ran.extend(
            found
                .iter()
                .filter(|s| s.ran())
                .map(|s| format!("{svc}: {}", s.name)),
        );
        let bytes = wiped.image_bytes(b, registry, &server.host).await?;
        let expected = (8 * unit as u64) << 20;
        ensure!(
            bytes >= expected,
            "{svc} is {bytes} bytes, expected at least {expected}"
        );
        image_bytes.insert(svc, bytes);
    }
    Ok(Run {
        cache: builder.cache(),
        round: 0,
        phase,
        server: server.kind,
        secs,
        server_user_secs: cpu.user,
        server_system_secs: cpu.system,
        machine_busy_secs: busy,
        server_of_wall_pct: 100.0 * cpu.total() / secs,
        client_secs: client,
        server_of_busy_pct: if busy > 0.0 {
            100.0 * cpu.total() / busy
        } else {
            0.0
        },
        steps,
        cached,
        ran,
        server_resident_at_start_bytes: resident,
        server_disk_read_bytes: reads.bytes,
        server_major_faults: reads.major_faults,
        machine_disk_read_bytes: machine_reads,
        stored_bytes: dir_bytes(&server.data_dir),
        image_bytes,
        evicted_roots: evicted,
    })
}

/// BuildKit's ground truth for one service's build in `phase`: every step of the
/// Dockerfile reported; after a warm start nothing ran, after the change only the edited
/// service's source `COPY` and the `RUN` after it.
fn check_steps(phase: Phase, svc: &str, steps: &[Step], out: &str) -> Result<()> {
    let show = || {
        let mut lines: Vec<String> = steps
            .iter()
            .map(|s| format!("  {} {}", if s.ran() { "ran   " } else { "CACHED" }, s.name))
            .collect();
        // What BuildKit said about the cache it imported, to tell a miss from a failure.
        lines.extend(
            out.lines()
                .filter(|l| l.to_ascii_lowercase().contains("cache") && !l.contains(" ["))
                .take(20)
                .map(|l| format!("  | {l}")),
        );
        lines.join("\n")
    };
    ensure!(
        steps.len() == STEPS_PER_SERVICE,
        "{svc}: BuildKit reported {} steps, the Dockerfile has {STEPS_PER_SERVICE}:\n{}\n{out}",
        steps.len(),
        show()
    );
    let ran: Vec<&str> = steps
        .iter()
        .filter(|s| s.ran())
        .map(|s| s.name.as_str())
        .collect();
    match phase {
        Phase::Cold => Ok(()),
        Phase::Warm => {
            ensure!(
                ran.is_empty() && !out.contains("records in"),
                "{svc}: the warm rebuild ran steps again:\n{}",
                show()
            );
            Ok(())
        }
        Phase::Change => {
            let expected: Vec<String> = if svc == CHANGED {
                vec![source_copy(svc), source_run(svc)]
            } else {
                Vec::new()
            };
            let matches = ran.len() == expected.len()
                && ran
                    .iter()
                    .zip(&expected)
                    .all(|(r, e)| r.ends_with(e.as_str()));
            ensure!(
                matches && !out.contains("records in"),
                "{svc}: after editing {CHANGED}'s source BuildKit ran {ran:?}, expected \
                 {expected:?}:\n{}",
                show()
            );
            Ok(())
        }
    }
}

/// CPU seconds so far of the build client: the process tree of the `builder` daemon
/// (dockerd or buildkitd; each process's own time and that of the children it has
/// waited for, which is where BuildKit's finished `RUN` steps land), and the clients
/// (docker CLI, buildctl) this process has waited for (with this process's own, small,
/// time).
fn client_cpu_secs(builder: u32) -> Result<f64> {
    let mut procs: Vec<(u32, u32, f64)> = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // A process may exit between the listing and the read.
        let Ok(fields) = servers::stat_fields(&pid.to_string()) else {
            continue;
        };
        // From the state: ppid (1), ... utime (11), stime (12), cutime (13), cstime (14),
        // in USER_HZ (100).
        let num = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        if let (Some(ppid), Some(u), Some(s), Some(cu), Some(cs)) =
            (num(1), num(11), num(12), num(13), num(14))
        {
            procs.push((pid, ppid as u32, (u + s + cu + cs) as f64 / 100.0));
        }
    }
    let mut tree = vec![builder];
    let mut total = 0.0;
    let mut i = 0;
    while let Some(&parent) = tree.get(i) {
        for &(pid, ppid, secs) in &procs {
            if pid == parent {
                total += secs;
            }
            if ppid == parent {
                tree.push(pid);
            }
        }
        i += 1;
    }
    Ok(total + servers::Cpu::of("self", true)?.total())
}

/// Roots (images, cache entries) evicted by the passes layercache logged in `log` (the
/// `eviction pass` lines of `store::registry`: `evicted=N evicted_entries=M`).
fn evicted_roots(log: &Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .map(strip_ansi)
        .filter(|l| l.contains("eviction pass"))
        .flat_map(|l| {
            l.split_whitespace()
                .filter_map(|w| {
                    w.strip_prefix("evicted=")
                        .or_else(|| w.strip_prefix("evicted_entries="))
                })
                .filter_map(|n| n.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// `line` without terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The files under `dir` (empty if it cannot be read).
fn dir_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut files = Vec::new();
    let mut stack: Vec<PathBuf> = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) => files.push((entry.path(), m.len())),
                Err(_) => {}
            }
        }
    }
    files
}

/// Bytes in the files under `dir` (0 if it cannot be read).
fn dir_bytes(dir: &Path) -> u64 {
    dir_files(dir).iter().map(|(_, len)| len).sum()
}

/// Bytes of the files under `dir` that are in the page cache, as util-linux's `fincore`
/// counts them (`mincore`, which reads nothing; a file's partly filled last page counts
/// the bytes it holds), so a phase's start shows what it could read from memory. A file
/// `fincore` cannot read counts as not resident.
fn resident_bytes(dir: &Path) -> u64 {
    let files: Vec<PathBuf> = dir_files(dir)
        .into_iter()
        .filter(|(_, len)| *len > 0)
        .map(|(path, _)| path)
        .collect();
    if files.is_empty() {
        return 0;
    }
    let Ok(out) = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--raw", "--output", "RES,SIZE"])
        .args(&files)
        .output()
    else {
        return 0;
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let (res, size) = line.split_once(' ')?;
            Some(res.parse::<u64>().ok()?.min(size.parse().ok()?))
        })
        .sum()
}

/// Drop the files under `dir` from the page cache (`posix_fadvise(DONTNEED)`, after the
/// caller's `sync`: dirty pages would stay), so that what a phase finds in memory does
/// not depend on what ran before it.
fn drop_from_page_cache(dir: &Path) {
    for (path, _) in dir_files(dir) {
        if let Ok(file) = std::fs::File::open(&path) {
            let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed);
        }
    }
}

/// The report's rows for the workload's figures (key, label, unit, limit, target): each
/// phase's wall time, which layercache must not take longer than distribution, and the
/// server's CPU seconds and share of the machine's busy CPU, for each cache.
pub fn figure_rows() -> Vec<(&'static str, String, &'static str, Option<f64>, Target)> {
    let mut rows = Vec::new();
    for cache in [Cache::Inline, Cache::RegistryMax] {
        let name = match cache {
            Cache::Inline => "project",
            Cache::RegistryMax => "project mode=max",
        };
        for phase in Phase::ALL {
            let what = match phase {
                Phase::Cold => "cold build + push",
                Phase::Warm => "warm rebuild, wiped builder",
                Phase::Change => "one source change, rebuild + push",
            };
            let [secs, cpu, busy] = cache.keys(phase);
            let phase = phase.name();
            rows.extend([
                (
                    secs,
                    format!("{name}: {what}"),
                    "s",
                    None,
                    Target::AtMostRatio { ratio: 1.0 },
                ),
                (
                    cpu,
                    format!("{name} {phase}: server CPU"),
                    "CPU-s",
                    None,
                    Target::None,
                ),
                (
                    busy,
                    format!("{name} {phase}: server share of the machine's busy CPU"),
                    "%",
                    None,
                    Target::None,
                ),
            ]);
        }
    }
    rows
}

/// The workload as tables, one per cache: every phase per server, the ratio, the
/// server's CPU.
pub fn table(report: &Report) -> String {
    let rounds = report.runs.iter().map(|r| r.round).max().unwrap_or(0);
    let mut tables = Vec::new();
    for &cache in &report.caches {
        let find = |round: usize, phase: Phase, kind: Kind| {
            report.runs.iter().find(|r| {
                r.cache == cache && r.round == round && r.phase == phase && r.server == kind
            })
        };
        let mut rows = Vec::new();
        for (round, phase) in (1..=rounds).flat_map(|n| Phase::ALL.map(|p| (n, p))) {
            let dist = find(round, phase, Kind::Distribution).map(|r| r.secs);
            for kind in [Kind::Layercache, Kind::Distribution] {
                let Some(r) = find(round, phase, kind) else {
                    continue;
                };
                let ratio = match (kind, dist) {
                    (Kind::Layercache, Some(d)) if d > 0.0 => format!("{:.2}x", r.secs / d),
                    _ => "-".into(),
                };
                rows.push(vec![
                    round.to_string(),
                    phase.name().to_owned(),
                    kind.name().to_owned(),
                    report::num(r.secs),
                    ratio,
                    format!(
                        "{} ({} user, {} sys)",
                        report::num(r.server_secs()),
                        report::num(r.server_user_secs),
                        report::num(r.server_system_secs)
                    ),
                    format!("{:.1} %", r.server_of_wall_pct),
                    format!("{:.1} %", r.server_of_busy_pct),
                    report::num(r.client_secs),
                    report::num(r.machine_busy_secs - r.server_secs() - r.client_secs),
                    (r.server_resident_at_start_bytes >> 20).to_string(),
                    format!(
                        "{} ({} faults)",
                        r.server_disk_read_bytes >> 20,
                        r.server_major_faults
                    ),
                    (r.machine_disk_read_bytes >> 20).to_string(),
                    format!("{}/{}", r.cached, r.steps),
                    format!("{:.2}", r.stored_bytes as f64 / (1u64 << 30) as f64),
                ]);
            }
        }
        tables.push(format!(
            "project: {} services, {} MiB of layers, {}\n{}",
            report.services.len(),
            report.total_mib,
            cache.describe(),
            report::render(
                &[
                    "round",
                    "phase",
                    "server",
                    "wall s",
                    "lc/dist",
                    "server CPU s",
                    "of wall",
                    "of machine busy",
                    "client CPU s",
                    "rest of machine CPU s",
                    "server MiB cached at start",
                    "server disk MiB read",
                    "machine disk MiB read",
                    "cached",
                    "stored GiB",
                ],
                &rows,
            )
        ));
    }
    tables.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_bytes_counts_the_page_cache_and_not_what_left_it() {
        use std::io::Write;

        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("blobs");
        std::fs::create_dir(&sub).unwrap();
        let len = (1 << 20) + 3;
        let path = sub.join("a");
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&vec![7u8; len]).unwrap();
        file.sync_all().unwrap();
        std::fs::File::create(sub.join("empty")).unwrap();
        // Just written: every page is in the page cache, the partial last one counted
        // by the bytes it holds.
        assert_eq!(dir_bytes(dir.path()), len as u64);
        assert_eq!(resident_bytes(dir.path()), len as u64);

        // Written back and dropped from the page cache: no longer counted.
        drop_from_page_cache(dir.path());
        let left = resident_bytes(dir.path());
        assert!(left < len as u64 / 2, "{left} bytes still resident");
    }

    #[test]
    fn every_service_has_the_counted_steps_and_distinct_layers() {
        let text = dockerfile(16);
        let steps = |stages: &[&str]| -> usize {
            let mut count = 0;
            let mut current = "";
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("FROM ") {
                    current = rest.rsplit(' ').next().unwrap_or_default();
                } else if stages.contains(&current)
                    && (line.starts_with("COPY ") || line.starts_with("RUN "))
                {
                    count += 1;
                }
            }
            count
        };
        for svc in SERVICES {
            let build = format!("{svc}-build");
            assert_eq!(
                steps(&["base", "deps", build.as_str(), svc]),
                STEPS_PER_SERVICE
            );
            assert!(text.contains(&source_copy(svc)));
        }
        // 16 units of random data in all: 2 runtime, 2 deps, and 4 per service.
        let mib: usize = text
            .lines()
            .filter_map(|l| l.rsplit_once("count=").map(|(_, n)| n))
            .map(|n| n.parse::<usize>().unwrap())
            .sum();
        assert_eq!(mib, 16 * 16);
    }

    #[test]
    fn evicted_roots_sums_the_logged_passes() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("server.log");
        std::fs::write(
            &log,
            "2026-01-01T00:00:00Z  INFO store::registry: eviction pass trigger=Interval \
             evicted=0 evicted_entries=0 blobs=3\n\
             \u{1b}[2m2026\u{1b}[0m INFO eviction pass \u{1b}[3mevicted\u{1b}[0m\u{1b}[2m=\u{1b}[0m2 \
             evicted_entries=1\n\
             2026 INFO served path=/v2/evicted=9\n",
        )
        .unwrap();
        assert_eq!(evicted_roots(&log), 3);
        assert_eq!(evicted_roots(&dir.path().join("missing.log")), 0);
    }

    fn step(name: &str, cached: bool) -> Step {
        Step {
            name: name.into(),
            cached,
            printed: !cached,
        }
    }

    #[test]
    fn change_check_accepts_only_the_edited_services_source_steps() {
        let mut steps: Vec<Step> = (0..STEPS_PER_SERVICE - 2)
            .map(|i| step(&format!("[web {i}/9] RUN x{i}"), true))
            .collect();
        steps.push(step(&format!("[web 5/6] {}", source_copy("web")), false));
        steps.push(step(&format!("[web 6/6] {}", source_run("web")), false));
        assert!(check_steps(Phase::Change, "web", &steps, "").is_ok());
        assert!(check_steps(Phase::Warm, "web", &steps, "").is_err());
        assert!(check_steps(Phase::Change, "api", &steps, "").is_err());
        let all: Vec<Step> = steps.iter().map(|s| step(&s.name, true)).collect();
        assert!(check_steps(Phase::Warm, "api", &all, "").is_ok());
        assert!(check_steps(Phase::Change, "api", &all, "").is_ok());
        assert!(check_steps(Phase::Change, "web", &all, "").is_err());
        assert!(check_steps(Phase::Warm, "api", &all[1..], "").is_err());
    }
}
