//! A real project's size: three service images (`web`, `worker`, `api`) of one multi-stage
//! Dockerfile, sharing a base and a dependencies stage, about 4 GiB of layers together,
//! built by the real dockerd/BuildKit against each server in turn:
//!
//! * **cold**: builder wiped, every service built with inline cache and pushed;
//! * **warm**: builder wiped, every service rebuilt with `--cache-from` every service's
//!   pushed image; BuildKit must report every step `CACHED`;
//! * **change**: one service's source file edited, builder wiped, every service rebuilt
//!   with `--cache-from` and pushed; BuildKit must have run only the changed `COPY` and
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
//! time follows that load far more than the server's few CPU seconds.
//!
//! The Dockerfile: `base` (busybox and two "runtime" layers of `unit` MiB), `deps` on it
//! (one `2 * unit` layer), then per service a build stage on `deps` (a `2 * unit`
//! artifact) and a final stage on `base` that copies the dependencies and the artifact in,
//! adds `2 * unit` of its own assets, then copies its small source late (`COPY src/<svc>/`)
//! and derives a bundle from it (`RUN`), as a web project's images do. Every byte is from
//! `/dev/urandom` (incompressible), built with `--network=none`; the layers pushed are
//! `16 * unit` MiB in all, and each service image is `8 * unit` MiB.
//!
//! layercache runs with `min_free = "1GiB"` instead of its default 10 % of the
//! filesystem: on a disk others fill, the default shrinks its quota to what the run pushes
//! or below and evicts the images the warm build needs (on this machine's shared 252 GB
//! disk with 24 GB free the default quota was 0 bytes), while distribution keeps
//! everything. Its eviction passes are logged, and any root evicted during the run fails
//! it, so every figure is of a server that kept what it was given.
//!
//! **Not measured: BuildKit's registry cache with `mode=max`.** The requirement asks for
//! `--cache-to type=registry,mode=max`, but Debian 12's docker.io (20.10) has no buildx
//! and BuildKit's `buildctl` is not packaged, so nothing on this machine can export a
//! separate cache manifest. What runs here is what the packaged client can do:
//! `DOCKER_BUILDKIT=1 docker build` with inline cache (`BUILDKIT_INLINE_CACHE=1`, which is
//! `mode=min`: only the final image's layers, with the cache records that lead to them,
//! embedded in each image's config) and `--cache-from` of every service's image. A
//! `mode=max` export would also push the intermediate stages' layers (here `8 * unit` MiB
//! more: `deps` and the three build stages) and a cache manifest per service, and a warm
//! build would fetch more; how layercache compares there is not known from this run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use serde::Serialize;

use crate::e2e::{self, Daemon, Step};
use crate::registry::Registry;
use crate::report::{self, Samples};
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
    /// Lower-case name, as printed.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Cold => "cold",
            Phase::Warm => "warm",
            Phase::Change => "change",
        }
    }

    /// The key of the phase's wall-time figure.
    fn secs_key(self) -> &'static str {
        match self {
            Phase::Cold => "project_cold_s",
            Phase::Warm => "project_warm_s",
            Phase::Change => "project_change_s",
        }
    }

    /// The key of the server's CPU seconds over the phase.
    fn cpu_key(self) -> &'static str {
        match self {
            Phase::Cold => "project_cold_cpu_s",
            Phase::Warm => "project_warm_cpu_s",
            Phase::Change => "project_change_cpu_s",
        }
    }

    /// The key of the server's share of the machine's busy CPU over the phase.
    fn busy_key(self) -> &'static str {
        match self {
            Phase::Cold => "project_cold_cpu_pct",
            Phase::Warm => "project_warm_cpu_pct",
            Phase::Change => "project_change_cpu_pct",
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
    /// How the cache travels (inline cache; `mode=max` is not measured, see the module).
    pub cache: &'static str,
    /// Every phase against every server, in the order run.
    pub runs: Vec<Run>,
}

/// One phase against one server.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
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
         RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
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
         sha256sum /opt/{svc}/bundle.txt > /opt/{svc}/bundle.sha256"
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
        "bench: project: {} services, {} MiB of layers, {} round(s), in {}",
        SERVICES.len(),
        16 * unit,
        ctx.rounds,
        work.display()
    );
    let daemon = Daemon::start(ctx.dockerd_bin, ctx.docker_bin, &work.join("docker")).await?;
    // One small untimed build first, so the fresh daemon's first use of BuildKit, runc
    // and its layer store is charged to no phase (the first phase would pay it).
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

    let mut runs = Vec::new();
    for round in 0..ctx.rounds {
        // Fresh servers every round (the last round's removed), so each cold push is
        // cold and the disk holds one round's images at a time.
        let dir = work.join(format!("round-{}", round + 1));
        let mut servers = vec![
            Server::start_layercache_with(
                ctx.layercache_bin,
                &dir.join("layercache"),
                &LAYERCACHE_ENV.map(|(k, v)| (k.to_owned(), v.to_owned())),
            )?,
            Server::start_distribution(ctx.registry_bin, &dir.join("distribution"))?,
        ];
        for server in &mut servers {
            let registry = Registry::new(ctx.http.clone(), &server.url)?;
            server.wait_ready(&registry).await?;
        }
        for svc in SERVICES {
            write_source(&context, svc, 0)?;
        }
        for (i, phase) in [Phase::Cold, Phase::Warm, Phase::Change]
            .into_iter()
            .enumerate()
        {
            if phase == Phase::Change {
                write_source(&context, CHANGED, 1)?;
            }
            // Alternate which server goes first, between phases and between rounds, so
            // neither always follows the other.
            let order = if (i + round) % 2 == 0 { [0, 1] } else { [1, 0] };
            for k in order {
                let server = servers.get_mut(k).context("no such server")?;
                server.check_alive()?;
                eprintln!(
                    "bench: project: round {} {} with {}",
                    round + 1,
                    phase.name(),
                    server.kind.name()
                );
                let mut r = run_phase(&daemon, server, phase, &context, unit).await?;
                r.round = round + 1;
                eprintln!(
                    "bench: project: round {} {:<6} {:<12} {:.1} s, server CPU {:.1} s \
                     ({:.0} % of wall, {:.0} % of the machine's busy CPU), client CPU {:.1} s, \
                     {} of {} steps cached",
                    r.round,
                    phase.name(),
                    server.kind.name(),
                    r.secs,
                    r.server_secs(),
                    r.server_of_wall_pct,
                    r.server_of_busy_pct,
                    r.client_secs,
                    r.cached,
                    r.steps
                );
                for (key, value) in [
                    (phase.secs_key(), r.secs),
                    (phase.cpu_key(), r.server_secs()),
                    (phase.busy_key(), r.server_of_busy_pct),
                ] {
                    samples.entry(key).or_default().push(r.server, value);
                }
                runs.push(r);
            }
        }
        for server in &mut servers {
            server.check_alive()?;
        }
        drop(servers);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            eprintln!("bench: project: could not remove {}: {e}", dir.display());
        }
    }
    drop(daemon);
    Ok(Report {
        total_mib: 16 * unit,
        unit_mib: unit,
        services: SERVICES,
        changed: CHANGED,
        steps_per_service: STEPS_PER_SERVICE,
        cache: "inline (BUILDKIT_INLINE_CACHE=1, mode=min) with --cache-from every service",
        runs,
    })
}

/// One phase against one server: wipe the builder, build every service (and push them),
/// then check BuildKit's own account of which steps it ran.
async fn run_phase(
    daemon: &Daemon,
    server: &Server,
    phase: Phase,
    context: &Path,
    unit: usize,
) -> Result<Run> {
    let ctx = context.to_str().context("context path is not UTF-8")?;
    let image = |svc: &str| format!("{}/project/{svc}:latest", server.host);
    let images: Vec<String> = SERVICES.iter().map(|svc| image(svc)).collect();
    daemon.wipe().await?;
    crate::settle();

    let cpu0 = server.cpu()?;
    let client0 = client_cpu_secs(daemon)?;
    let busy0 = servers::machine_busy_secs()?;
    let start = Instant::now();
    let mut outputs = Vec::new();
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
        outputs.push((*svc, daemon.run(&args).await?));
    }
    if phase.pushes() {
        for tag in &images {
            daemon.run(&["push", tag]).await?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let busy = servers::machine_busy_secs()? - busy0;
    let cpu = server.cpu()?.since(cpu0);
    let client = client_cpu_secs(daemon)? - client0;

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
    for (svc, out) in &outputs {
        let built = e2e::build_steps(out);
        check_steps(phase, svc, &built, out)
            .with_context(|| format!("{} phase against {}", phase.name(), server.kind.name()))?;
        steps += built.len();
        cached += built.iter().filter(|s| s.cached).count();
        ran.extend(
            built
                .iter()
                .filter(|s| !s.cached)
                .map(|s| format!("{svc}: {}", s.name)),
        );
    }
    let mut image_bytes = BTreeMap::new();
    for (svc, tag) in SERVICES.iter().zip(&images) {
        let bytes: u64 = daemon
            .run(&["image", "inspect", "--format", "{{.Size}}", tag])
            .await?
            .trim()
            .parse()
            .context("image size")?;
        let expected = (8 * unit as u64) << 20;
        ensure!(
            bytes >= expected,
            "{svc} is {bytes} bytes, expected at least {expected}"
        );
        image_bytes.insert(*svc, bytes);
    }
    Ok(Run {
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
            .map(|s| {
                format!(
                    "  {} {}",
                    if s.cached { "CACHED" } else { "ran   " },
                    s.name
                )
            })
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
        .filter(|s| !s.cached)
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

/// CPU seconds so far of the build client: the private dockerd's process tree (each
/// process's own time and that of the children it has waited for, which is where
/// BuildKit's finished `RUN` steps land), and the docker CLI runs this process has
/// waited for (with this process's own, small, time).
fn client_cpu_secs(daemon: &Daemon) -> Result<f64> {
    let mut procs: Vec<(u32, u32, f64)> = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may exit between the listing and the read.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // After the command's closing parenthesis: state, ppid (1), ... utime (11),
        // stime (12), cutime (13), cstime (14), in USER_HZ (100).
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        if let (Some(ppid), Some(u), Some(s), Some(cu), Some(cs)) =
            (num(1), num(11), num(12), num(13), num(14))
        {
            procs.push((pid, ppid as u32, (u + s + cu + cs) as f64 / 100.0));
        }
    }
    let mut tree = vec![daemon.pid()];
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

/// Bytes in the files under `dir` (0 if it cannot be read).
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack: Vec<PathBuf> = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// The workload as a table: every phase per server, the ratio, the server's CPU.
pub fn table(report: &Report) -> String {
    let find = |round: usize, phase: Phase, kind: Kind| {
        report
            .runs
            .iter()
            .find(|r| r.round == round && r.phase == phase && r.server == kind)
    };
    let rounds = report.runs.iter().map(|r| r.round).max().unwrap_or(0);
    let mut rows = Vec::new();
    for (round, phase) in
        (1..=rounds).flat_map(|n| [Phase::Cold, Phase::Warm, Phase::Change].map(|p| (n, p)))
    {
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
                format!("{}/{}", r.cached, r.steps),
                format!("{:.2}", r.stored_bytes as f64 / (1u64 << 30) as f64),
            ]);
        }
    }
    format!(
        "project: {} services, {} MiB of layers, {}\n{}",
        report.services.len(),
        report.total_mib,
        report.cache,
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
                "cached",
                "stored GiB",
            ],
            &rows,
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
