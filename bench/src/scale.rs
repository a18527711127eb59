//! The scale-out workload: layercache with its blobs in an S3-compatible bucket (Garage)
//! and its metadata in PostgreSQL, on one node and on three nodes sharing the bucket and
//! the database, against the distribution registry on the same Garage through its `s3`
//! storage driver (one instance, and three sharing the bucket), with layercache on its
//! default local disk and SQLite beside them for reference: the machine's own side.
//!
//! * **Services.** One Garage node (`server --single-node`: replication 1, LMDB, its
//!   defaults otherwise, which fsync neither data nor metadata) and one PostgreSQL
//!   cluster on its durable defaults (fsync, synchronous commit, full-page writes), both
//!   in the run's temporary directory; the settings in use are printed with the table.
//!   (The test fixtures run Garage on SQLite and PostgreSQL without fsync: right for
//!   tests, not for figures.)
//!   layercache keeps its objects under the prefix `layercache` of the one bucket,
//!   distribution under the root directory `/distribution`. Distribution serves blob
//!   bytes itself (`redirect: disable`), as layercache does by default, and keeps its
//!   blob descriptors in memory, as Debian's packaged configuration does.
//! * **Nodes.** Three layercache nodes (a data directory and a port each, started one
//!   after another so the first creates the schema) and three distribution instances
//!   (one `http.secret`) are started once; a one-node deployment is the first of them,
//!   the other two idle.
//! * **Spread.** On three nodes, transfer `i` goes to node `i % 3`, and a blob is pulled
//!   from the node after the one that stored it, so every pull reads what another node
//!   wrote. A request-rate load is shared out the same way by connection: task `t` of
//!   the closed loop talks to node `t % 3` (as behind a TCP load balancer), and the
//!   rate is the sum over the nodes.
//! * **Figures.** A push of one [`SINGLE_MIB`] MiB blob and its pull; [`MANY`] pushes of
//!   [`MANY_MIB`] MiB at once and their pulls (aggregate MB/s); the HEAD rate over the
//!   run's HEAD connections; the manifest PUT rate, then the manifest GET rate by tag
//!   over every tag those PUTs wrote on every node. Every round runs every deployment,
//!   the first one rotating from round to round; loads last [`HEAD_SECS`],
//!   [`MANIFEST_SECS`] each.
//! * **Targets.** layercache on one node at least 0.9x distribution on one for pushes
//!   and pulls; three layercache nodes at least one for the HEAD and manifest GET rates
//!   (the nodes, the services and the client share the machine's cores, so more nodes
//!   may only add contention there: the figures are reported as measured).

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

use crate::limits::mbps;
use crate::payload::{Base, Blob};
use crate::registry::Registry;
use crate::report::{self, Summary};
use crate::servers::{self, Server};
use crate::workloads::{self, Fixtures, REPO_BLOBS, Rate, Shape};

/// Size of the blob pushed and pulled alone, in MiB.
const SINGLE_MIB: usize = 256;
/// Blobs pushed (and pulled) at once.
const MANY: usize = 6;
/// Size of each of them, in MiB.
const MANY_MIB: usize = 32;
/// The payload the workload cuts its blobs from, in MiB.
pub const PAYLOAD_MIB: usize = if SINGLE_MIB > MANY_MIB {
    SINGLE_MIB
} else {
    MANY_MIB
};
/// Duration of each HEAD load, in seconds.
const HEAD_SECS: f64 = 4.0;
/// Duration of each manifest load (PUT, then GET), in seconds.
const MANIFEST_SECS: f64 = 3.0;
/// Nodes of the scaled-out deployments.
const NODES: usize = 3;
/// The bucket both registries keep their objects in.
const BUCKET: &str = "bench";
/// Garage's region.
const REGION: &str = "garage";
/// layercache's key prefix in the bucket.
const LAYERCACHE_PREFIX: &str = "layercache";
/// Distribution's root directory in the bucket.
const DISTRIBUTION_ROOT: &str = "/distribution";
/// The database the layercache nodes share.
const DATABASE: &str = "layercache";
/// How long a backing service may take to accept requests.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a starting backing service is asked whether it is ready.
const POLL: Duration = Duration::from_millis(50);
/// layercache's minimum share of distribution's push and pull rates on one node.
const VERSUS_DISTRIBUTION: f64 = 0.9;

/// What the workload needs from the run.
pub struct Inputs<'a> {
    /// The run's temporary directory (the workload works in `scale/` under it).
    pub dir: &'a Path,
    /// The payload the blobs are cut from (at least [`PAYLOAD_MIB`]).
    pub base: &'a Base,
    /// The benchmark's HTTP client.
    pub http: &'a reqwest::Client,
    /// The release layercache.
    pub layercache_bin: &'a Path,
    /// The distribution registry.
    pub registry_bin: &'a Path,
    /// The run's shape (connections of the HEAD and manifest loads).
    pub shape: &'a Shape,
    /// Rounds.
    pub rounds: usize,
}

/// A way of running a registry, measured side by side with the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Deployment {
    /// layercache, one node, local disk and SQLite (the defaults).
    #[serde(rename = "layercache_local")]
    LocalDisk,
    /// layercache, one node on Garage and PostgreSQL.
    #[serde(rename = "layercache_x1")]
    Layercache1,
    /// layercache, three nodes on the same bucket and database.
    #[serde(rename = "layercache_x3")]
    Layercache3,
    /// distribution, one instance on Garage.
    #[serde(rename = "distribution_x1")]
    Distribution1,
    /// distribution, three instances on the same bucket.
    #[serde(rename = "distribution_x3")]
    Distribution3,
}

/// Every deployment, in table order.
const DEPLOYMENTS: [Deployment; 5] = [
    Deployment::LocalDisk,
    Deployment::Layercache1,
    Deployment::Layercache3,
    Deployment::Distribution1,
    Deployment::Distribution3,
];

impl Deployment {
    /// How it is printed.
    pub fn name(self) -> &'static str {
        match self {
            Deployment::LocalDisk => "layercache local",
            Deployment::Layercache1 => "layercache x1",
            Deployment::Layercache3 => "layercache x3",
            Deployment::Distribution1 => "distribution x1",
            Deployment::Distribution3 => "distribution x3",
        }
    }

    /// A label for names and tags.
    fn slug(self) -> &'static str {
        match self {
            Deployment::LocalDisk => "local",
            Deployment::Layercache1 => "lc1",
            Deployment::Layercache3 => "lc3",
            Deployment::Distribution1 => "dist1",
            Deployment::Distribution3 => "dist3",
        }
    }

    /// Nodes the load is spread over.
    fn nodes(self) -> usize {
        match self {
            Deployment::Layercache3 | Deployment::Distribution3 => NODES,
            _ => 1,
        }
    }
}

/// What a figure is judged by.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    /// Reported for context.
    None,
    /// layercache x1 >= [`VERSUS_DISTRIBUTION`] x distribution x1.
    VersusDistribution,
    /// layercache x3 >= layercache x1.
    ThreeNodesVersusOne,
}

impl Goal {
    fn describe(self) -> String {
        match self {
            Goal::None => "-".into(),
            Goal::VersusDistribution => format!(">= {VERSUS_DISTRIBUTION}x dist x1"),
            Goal::ThreeNodesVersusOne => "x3 >= x1".into(),
        }
    }
}

/// What the JSON report holds of the workload.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Garage's version and settings.
    pub garage: String,
    /// PostgreSQL's version and settings.
    pub postgres: String,
    /// How distribution is configured.
    pub distribution: String,
    /// Rounds.
    pub rounds: usize,
    /// Every figure.
    pub figures: Vec<Figure>,
}

impl Report {
    /// The keys of the figures that missed their target.
    pub fn failed(&self) -> impl Iterator<Item = String> + '_ {
        self.figures
            .iter()
            .filter(|f| f.pass == Some(false))
            .map(|f| format!("scale_{}", f.key))
    }
}

/// One figure over every deployment.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    /// Stable key, for JSON consumers.
    pub key: &'static str,
    /// What is measured.
    pub label: String,
    /// Unit of the values.
    pub unit: &'static str,
    /// Each deployment's samples.
    pub values: BTreeMap<Deployment, Summary>,
    /// layercache x1 over distribution x1 (medians).
    pub one_node_ratio: Option<f64>,
    /// layercache x3 over distribution x3 (medians).
    pub three_nodes_ratio: Option<f64>,
    /// layercache x3 over layercache x1 (medians).
    pub scaling: Option<f64>,
    /// The target.
    pub goal: Goal,
    /// Whether the target is met; `None` without a target or without both values.
    pub pass: Option<bool>,
}

impl Figure {
    fn new(
        key: &'static str,
        label: String,
        unit: &'static str,
        samples: &BTreeMap<Deployment, Vec<f64>>,
        goal: Goal,
    ) -> Figure {
        let values: BTreeMap<Deployment, Summary> = samples
            .iter()
            .filter_map(|(&d, s)| Some((d, Summary::of(s)?)))
            .collect();
        let median = |d: Deployment| values.get(&d).map(|s| s.median);
        let ratio = |a: Deployment, b: Deployment| match (median(a), median(b)) {
            (Some(a), Some(b)) if b != 0.0 => Some(a / b),
            _ => None,
        };
        let one_node_ratio = ratio(Deployment::Layercache1, Deployment::Distribution1);
        let scaling = ratio(Deployment::Layercache3, Deployment::Layercache1);
        let pass = match goal {
            Goal::None => None,
            Goal::VersusDistribution => one_node_ratio.map(|r| r >= VERSUS_DISTRIBUTION),
            Goal::ThreeNodesVersusOne => scaling.map(|r| r >= 1.0),
        };
        Figure {
            key,
            label,
            unit,
            one_node_ratio,
            three_nodes_ratio: ratio(Deployment::Layercache3, Deployment::Distribution3),
            scaling,
            values,
            goal,
            pass,
        }
    }
}

/// Samples by figure key, then by deployment.
type Samples = BTreeMap<&'static str, BTreeMap<Deployment, Vec<f64>>>;

/// Start the services and every deployment, push the HEAD and manifest fixtures to each,
/// and measure every deployment in every round.
pub async fn run(ctx: &Inputs<'_>) -> Result<Report> {
    let (head_conns, manifest_conns) = (ctx.shape.head_conns, ctx.shape.manifest_conns);
    ensure!(
        head_conns >= NODES && manifest_conns >= NODES,
        "the scale workload needs at least {NODES} HEAD and manifest connections"
    );
    let work = ctx.dir.join("scale");
    std::fs::create_dir_all(&work)?;
    let mut garage = Garage::start(&work.join("garage"), ctx.http).await?;
    eprintln!(
        "bench: scale: garage at {} ({})",
        garage.endpoint, garage.settings
    );
    let mut postgres = Postgres::start(ctx.dir, &work.join("postgres")).await?;
    eprintln!(
        "bench: scale: postgresql at {} ({})",
        postgres.url, postgres.settings
    );

    let mut fleets = Fleets::start(ctx, &work, &garage, &postgres).await?;

    // The HEAD and manifest workloads' small blobs only: the transfers bring their own.
    let fixtures = Fixtures::new(
        ctx.base,
        &Shape {
            pulls: 0,
            export_large: 0,
            ..ctx.shape.clone()
        },
    )?;
    for fleet in fleets.all() {
        fixtures.push_to(fleet.node(0)?).await?;
    }

    let mut samples = Samples::new();
    for round in 0..ctx.rounds {
        for k in 0..DEPLOYMENTS.len() {
            let deployment = *DEPLOYMENTS
                .get((round + k) % DEPLOYMENTS.len())
                .context("deployment index")?;
            let fleet = fleets.of(deployment);
            fleet.check_alive()?;
            let nodes = fleet
                .registries
                .get(..deployment.nodes())
                .context("too few nodes")?;
            let mut record = |key: &'static str, value: f64| {
                eprintln!(
                    "bench: scale round {} {:<16} {key:<16} {}",
                    round + 1,
                    deployment.name(),
                    report::num(value)
                );
                samples
                    .entry(key)
                    .or_default()
                    .entry(deployment)
                    .or_default()
                    .push(value);
            };
            measure(ctx, &fixtures, deployment, round, nodes, &mut record).await?;
        }
    }
    for fleet in fleets.all_mut() {
        fleet.check_alive()?;
    }
    garage.process.check_alive()?;
    postgres.process.check_alive()?;

    let figure = |key: &'static str, label: String, unit: &'static str, goal: Goal| {
        samples
            .get(key)
            .map(|s| Figure::new(key, label, unit, s, goal))
    };
    let figures = [
        figure(
            "push_mb_s",
            format!("push {SINGLE_MIB} MiB"),
            "MB/s",
            Goal::VersusDistribution,
        ),
        figure(
            "push_many_mb_s",
            format!("push {MANY} x {MANY_MIB} MiB at once"),
            "MB/s",
            Goal::VersusDistribution,
        ),
        figure(
            "pull_mb_s",
            format!("pull {SINGLE_MIB} MiB"),
            "MB/s",
            Goal::VersusDistribution,
        ),
        figure(
            "pull_many_mb_s",
            format!("pull {MANY} x {MANY_MIB} MiB at once"),
            "MB/s",
            Goal::VersusDistribution,
        ),
        figure(
            "head_rps",
            format!("HEAD blob, {head_conns} conns"),
            "req/s",
            Goal::ThreeNodesVersusOne,
        ),
        figure(
            "mput_rps",
            format!("manifest PUT, {manifest_conns} conns"),
            "req/s",
            Goal::None,
        ),
        figure(
            "mget_rps",
            format!("manifest GET by tag, {manifest_conns} conns"),
            "req/s",
            Goal::ThreeNodesVersusOne,
        ),
    ]
    .into_iter()
    .flatten()
    .collect();
    Ok(Report {
        garage: garage.settings.clone(),
        postgres: postgres.settings.clone(),
        distribution: format!(
            "{}: s3 driver on the same Garage (root directory {DISTRIBUTION_ROOT}, path-style \
             addressing), redirect disabled, in-memory blob descriptor cache",
            ctx.registry_bin.display()
        ),
        rounds: ctx.rounds,
        figures,
    })
}

/// One round of every figure on one deployment, whose nodes are `nodes`.
async fn measure(
    ctx: &Inputs<'_>,
    fixtures: &Fixtures,
    deployment: Deployment,
    round: usize,
    nodes: &[Registry],
    record: &mut impl FnMut(&'static str, f64),
) -> Result<()> {
    let name = |what: &str| format!("scale-{}-{round}-{what}", deployment.slug());
    let node = |i: usize| nodes.get(i % nodes.len()).context("no node");
    let single = ctx.base.blob(SINGLE_MIB, &name("single"))?;
    let many = (0..MANY)
        .map(|i| ctx.base.blob(MANY_MIB, &name(&format!("many-{i}"))))
        .collect::<Result<Vec<_>>>()?;

    crate::settle();
    record(
        "push_mb_s",
        workloads::push_monolithic(node(round)?, &single).await?,
    );
    crate::settle();
    let rate = spread_blobs(nodes, &many, 0, |registry, blobs| async move {
        futures::future::try_join_all(blobs.iter().map(|b| registry.push(REPO_BLOBS, b))).await
    })
    .await?;
    record("push_many_mb_s", rate);
    crate::settle();
    record(
        "pull_mb_s",
        workloads::pull(node(round + 1)?, &single).await?,
    );
    crate::settle();
    let rate = spread_blobs(nodes, &many, 1, |registry, blobs| async move {
        workloads::pull_concurrent(registry, &blobs).await
    })
    .await?;
    record("pull_many_mb_s", rate);

    let conns = ctx.shape.head_conns;
    let rates = futures::future::try_join_all(nodes.iter().enumerate().map(|(k, registry)| {
        workloads::head_load(registry, fixtures, share(conns, nodes.len(), k), HEAD_SECS)
    }))
    .await?;
    record("head_rps", total(&rates));

    let conns = ctx.shape.manifest_conns;
    let puts = futures::future::try_join_all(nodes.iter().enumerate().map(|(k, registry)| {
        let prefix = name(&format!("node{k}"));
        async move {
            workloads::manifest_put_load(
                registry,
                fixtures,
                &prefix,
                share(conns, nodes.len(), k),
                MANIFEST_SECS,
            )
            .await
        }
    }))
    .await?;
    let (rates, tags): (Vec<Rate>, Vec<Vec<String>>) = puts.into_iter().unzip();
    record("mput_rps", total(&rates));
    let tags: Vec<String> = tags.into_iter().flatten().collect();
    let rates = futures::future::try_join_all(nodes.iter().enumerate().map(|(k, registry)| {
        workloads::manifest_get_load(
            registry,
            tags.clone(),
            share(conns, nodes.len(), k),
            MANIFEST_SECS,
        )
    }))
    .await?;
    record("mget_rps", total(&rates));
    Ok(())
}

/// Run `op` on every node at once with its share of `blobs` (blob `i` on node
/// `(i + shift) % nodes`); returns MB/s over all their bytes.
async fn spread_blobs<'a, F, Fut, T>(
    nodes: &'a [Registry],
    blobs: &[Blob],
    shift: usize,
    op: F,
) -> Result<f64>
where
    F: Fn(&'a Registry, Vec<Blob>) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut shares = vec![Vec::new(); nodes.len()];
    for (i, blob) in blobs.iter().enumerate() {
        shares
            .get_mut((i + shift) % nodes.len())
            .context("no node")?
            .push(blob.clone());
    }
    let bytes = blobs.iter().map(|b| b.len).sum();
    let start = Instant::now();
    futures::future::try_join_all(nodes.iter().zip(shares).map(|(r, s)| op(r, s))).await?;
    mbps(bytes, start.elapsed().as_secs_f64())
}

/// Connections of node `k` when `conns` are shared out evenly over `nodes`.
fn share(conns: usize, nodes: usize, k: usize) -> usize {
    conns / nodes + usize::from(k < conns % nodes)
}

/// Requests per second over loads that ran side by side.
fn total(rates: &[Rate]) -> f64 {
    rates.iter().map(|r| r.per_sec).sum()
}

/// Running registries of one kind.
struct Fleet {
    servers: Vec<Server>,
    registries: Vec<Registry>,
}

impl Fleet {
    /// Wait until every server answers.
    async fn ready(mut servers: Vec<Server>, http: &reqwest::Client) -> Result<Fleet> {
        let mut registries = Vec::with_capacity(servers.len());
        for server in &mut servers {
            let registry = Registry::new(http.clone(), &server.url)?;
            server.wait_ready(&registry).await?;
            registries.push(registry);
        }
        Ok(Fleet {
            servers,
            registries,
        })
    }

    fn node(&self, k: usize) -> Result<&Registry> {
        self.registries.get(k).context("no such node")
    }

    fn check_alive(&mut self) -> Result<()> {
        self.servers.iter_mut().try_for_each(Server::check_alive)
    }
}

/// The three fleets the deployments run on.
struct Fleets {
    local: Fleet,
    layercache: Fleet,
    distribution: Fleet,
}

impl Fleets {
    /// Start layercache on local disk, the layercache nodes and the distribution
    /// instances, and wait until every one answers.
    async fn start(
        ctx: &Inputs<'_>,
        work: &Path,
        garage: &Garage,
        postgres: &Postgres,
    ) -> Result<Fleets> {
        let local = Server::start_layercache(ctx.layercache_bin, &work.join("local"))?;
        let fleets = Fleets {
            local: Fleet::ready(vec![local], ctx.http).await?,
            layercache: Fleet::ready(
                start_layercache_nodes(ctx, work, garage, postgres)?,
                ctx.http,
            )
            .await?,
            distribution: Fleet::ready(start_distribution_instances(ctx, work, garage)?, ctx.http)
                .await?,
        };
        let names = [
            "layercache local",
            "layercache nodes",
            "distribution instances",
        ];
        for (name, fleet) in names.into_iter().zip(fleets.all()) {
            let urls: Vec<&str> = fleet.servers.iter().map(|s| s.url.as_str()).collect();
            eprintln!("bench: scale: {name} at {}", urls.join(", "));
        }
        Ok(fleets)
    }

    fn all(&self) -> [&Fleet; 3] {
        [&self.local, &self.layercache, &self.distribution]
    }

    fn all_mut(&mut self) -> [&mut Fleet; 3] {
        [
            &mut self.local,
            &mut self.layercache,
            &mut self.distribution,
        ]
    }

    fn of(&mut self, deployment: Deployment) -> &mut Fleet {
        match deployment {
            Deployment::LocalDisk => &mut self.local,
            Deployment::Layercache1 | Deployment::Layercache3 => &mut self.layercache,
            Deployment::Distribution1 | Deployment::Distribution3 => &mut self.distribution,
        }
    }
}

/// Start the layercache nodes on the bucket and the database, one after another.
fn start_layercache_nodes(
    ctx: &Inputs<'_>,
    work: &Path,
    garage: &Garage,
    postgres: &Postgres,
) -> Result<Vec<Server>> {
    let env: Vec<(String, String)> = [
        ("LAYERCACHE_STORE__BLOBS__BACKEND", "s3"),
        ("LAYERCACHE_STORE__BLOBS__ENDPOINT", &garage.endpoint),
        ("LAYERCACHE_STORE__BLOBS__BUCKET", BUCKET),
        ("LAYERCACHE_STORE__BLOBS__REGION", REGION),
        ("LAYERCACHE_STORE__BLOBS__PREFIX", LAYERCACHE_PREFIX),
        ("AWS_ACCESS_KEY_ID", &garage.key_id),
        ("AWS_SECRET_ACCESS_KEY", &garage.secret),
        ("LAYERCACHE_STORE__META__BACKEND", "postgres"),
        ("LAYERCACHE_STORE__META__URL", &postgres.url),
        ("LAYERCACHE_STORE__EVICTION__MAX_SIZE", "100GiB"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    (0..NODES)
        .map(|k| {
            Server::start_layercache_with(
                ctx.layercache_bin,
                &work.join(format!("layercache-{k}")),
                &env,
            )
        })
        .collect()
}

/// Start the distribution instances on the bucket.
fn start_distribution_instances(
    ctx: &Inputs<'_>,
    work: &Path,
    garage: &Garage,
) -> Result<Vec<Server>> {
    // distribution 2.8's S3 client refuses to start when `AWS_CA_BUNDLE` is set (it
    // cannot add a CA to the transport it wraps); Garage is plain HTTP here.
    let bin = work.join("docker-registry");
    let target = ctx.registry_bin.display().to_string();
    ensure!(
        !target.contains('\''),
        "{target}: a path with a quote in it"
    );
    std::fs::write(
        &bin,
        format!("#!/bin/sh\nunset AWS_CA_BUNDLE\nexec '{target}' \"$@\"\n"),
    )
    .with_context(|| format!("writing {}", bin.display()))?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
    // Appended after `http.addr`: the shared upload-state secret, then a `storage`
    // section that replaces the filesystem one (the parser keeps a repeated key's last).
    let secret = hex::encode(rand::random::<[u8; 16]>());
    let extra = format!(
        "  secret: {secret}\n\
         storage:\n  cache:\n    blobdescriptor: inmemory\n  \
         s3:\n    accesskey: {key}\n    secretkey: {secret_key}\n    region: {REGION}\n    \
         regionendpoint: {endpoint}\n    forcepathstyle: true\n    bucket: {BUCKET}\n    \
         rootdirectory: {DISTRIBUTION_ROOT}\n    secure: false\n    v4auth: true\n  \
         delete:\n    enabled: true\n  redirect:\n    disable: true\n",
        key = garage.key_id,
        secret_key = garage.secret,
        endpoint = garage.endpoint,
    );
    (0..NODES)
        .map(|k| {
            let host = format!("127.0.0.1:{}", servers::free_port()?);
            Server::start_distribution_on(
                &bin,
                &work.join(format!("distribution-{k}")),
                &host,
                &extra,
            )
        })
        .collect()
}

/// A backing service's process, killed when dropped.
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Wait until `ready` says so, failing if the process exits or [`START_TIMEOUT`]
    /// passes first.
    async fn wait_until<F, Fut>(&mut self, mut ready: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let start = Instant::now();
        while !ready().await {
            self.check_alive()?;
            ensure!(
                start.elapsed() < START_TIMEOUT,
                "{} is not ready after {} s; log:\n{}",
                self.name,
                START_TIMEOUT.as_secs(),
                servers::tail(&self.log)
            );
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }

    /// Fail if it has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited with {status}; log:\n{}",
                self.name,
                servers::tail(&self.log)
            );
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Garage node with one bucket and one key that may use it.
struct Garage {
    process: Process,
    /// `http://127.0.0.1:PORT` of its S3 API.
    endpoint: String,
    key_id: String,
    secret: String,
    /// Its version and settings, as printed.
    settings: String,
}

impl Garage {
    /// Start a single-node Garage in `dir` on free ports, with the bucket and the key
    /// created at startup; wait until its S3 API answers.
    async fn start(dir: &Path, http: &reqwest::Client) -> Result<Garage> {
        let bin = garage_bin()?;
        std::fs::create_dir_all(dir)?;
        let (rpc, api) = (servers::free_port()?, servers::free_port()?);
        let config = dir.join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"lmdb\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{rpc_secret}\"\n\n\
                 [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{api}\"\n",
                meta = dir.join("meta").display(),
                data = dir.join("data").display(),
                rpc_secret = hex::encode(rand::random::<[u8; 32]>()),
            ),
        )?;
        let key_id = format!("GK{}", hex::encode(rand::random::<[u8; 12]>()));
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let log = dir.join("garage.log");
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&config)
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", &key_id)
            .env("GARAGE_DEFAULT_SECRET_KEY", &secret)
            .env("GARAGE_DEFAULT_BUCKET", BUCKET)
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(File::create(dir.join("stdout.log"))?)
            .stderr(File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut process = Process {
            name: "garage",
            child,
            log,
        };
        let endpoint = format!("http://127.0.0.1:{api}");
        // Any answer (an anonymous request gets a 403) means the bucket and key exist.
        process
            .wait_until(|| {
                let request = http.get(&endpoint).send();
                async move { request.await.is_ok() }
            })
            .await?;
        // `garage cargo:2.5.0 [features: ...]`
        let version = output(Command::new(&bin).arg("--version"))?;
        let version = version.split(" [").next().unwrap_or_default().trim();
        Ok(Garage {
            process,
            endpoint,
            key_id,
            secret,
            settings: format!(
                "{version}: single node, replication 1, lmdb, metadata_fsync and data_fsync \
                 off (defaults)"
            ),
        })
    }
}

/// Garage's binary: `garage` on `PATH`, else cargo's install directory.
fn garage_bin() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    std::env::split_paths(&path)
        .chain(cargo_home.map(|c| c.join("bin")))
        .map(|dir| dir.join("garage"))
        .find(|bin| bin.is_file())
        .context("garage is not installed: cargo install --locked garage")
}

/// A PostgreSQL server on its default (durable) settings, with one database.
struct Postgres {
    process: Process,
    /// URL of the database, as the superuser.
    url: String,
    /// Its version and settings, as printed.
    settings: String,
}

impl Postgres {
    /// Initialise a cluster in `dir` (under `run_dir`, the run's temporary directory),
    /// start a server on it on a free port, create [`DATABASE`]. As root, the server runs
    /// as the `postgres` user (it refuses root), so `run_dir` becomes traversable by it.
    async fn start(run_dir: &Path, dir: &Path) -> Result<Postgres> {
        let bin = postgres_bin_dir()?;
        let as_postgres = crate::setup::is_root();
        let (data, socket) = (dir.join("data"), dir.join("socket"));
        std::fs::create_dir_all(&socket)?;
        if as_postgres {
            std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o711))?;
            output(
                Command::new("chown")
                    .arg("-R")
                    .arg("postgres:postgres")
                    .arg(dir),
            )?;
        }
        output(
            service(&bin.join("initdb"), as_postgres)
                .arg("--pgdata")
                .arg(&data)
                .args(["--username", "postgres", "--auth", "trust"])
                .args(["--encoding", "UTF8", "--no-locale"]),
        )?;
        let port = servers::free_port()?;
        let log = dir.join("postgres.log");
        let child = service(&bin.join("postgres"), as_postgres)
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .context("starting postgres")?;
        let mut process = Process {
            name: "postgres",
            child,
            log,
        };
        let psql = |database: &str, sql: &str| {
            output(
                Command::new(bin.join("psql"))
                    .args(["--no-psqlrc", "--quiet", "--tuples-only", "--no-align"])
                    .args(["--set", "ON_ERROR_STOP=1", "--host", "127.0.0.1"])
                    .args(["--port", &port.to_string(), "--username", "postgres"])
                    .args(["--dbname", database, "--command", sql]),
            )
        };
        process
            .wait_until(|| std::future::ready(psql("postgres", "SELECT 1").is_ok()))
            .await?;
        psql("postgres", &format!("CREATE DATABASE {DATABASE}"))?;
        let settings = psql(
            "postgres",
            "SELECT 'PostgreSQL ' || current_setting('server_version') \
             || ': fsync=' || current_setting('fsync') \
             || ', synchronous_commit=' || current_setting('synchronous_commit') \
             || ', full_page_writes=' || current_setting('full_page_writes') \
             || ', shared_buffers=' || current_setting('shared_buffers') \
             || ', max_connections=' || current_setting('max_connections') \
             || ' (defaults)'",
        )?;
        Ok(Postgres {
            process,
            url: format!("postgres://postgres@127.0.0.1:{port}/{DATABASE}"),
            settings: settings.trim().to_owned(),
        })
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding a server.
fn postgres_bin_dir() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("postgres").is_file())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .context("PostgreSQL is not installed: apt-get install postgresql")
}

/// `program`, run as the `postgres` user when `as_postgres`.
fn service(program: &Path, as_postgres: bool) -> Command {
    if !as_postgres {
        return Command::new(program);
    }
    let mut command = Command::new("setpriv");
    command
        .args([
            "--reuid",
            "postgres",
            "--regid",
            "postgres",
            "--clear-groups",
        ])
        .arg(program);
    command
}

/// Run `command` to completion; its stdout, or an error with its stderr.
fn output(command: &mut Command) -> Result<String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {:?}", command.get_program()))?;
    ensure!(
        out.status.success(),
        "{:?} failed ({}): {}",
        command.get_program(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every figure over every deployment as a table, then the services' settings.
pub fn table(report: &Report) -> String {
    let ratio = |r: Option<f64>| r.map_or("-".into(), |r| format!("{r:.2}x"));
    let rows: Vec<Vec<String>> = report
        .figures
        .iter()
        .map(|f| {
            let mut row = vec![format!("{} ({})", f.label, f.unit)];
            row.extend(
                DEPLOYMENTS
                    .iter()
                    .map(|d| f.values.get(d).map_or("-".into(), Summary::show)),
            );
            row.extend([
                ratio(f.one_node_ratio),
                ratio(f.three_nodes_ratio),
                ratio(f.scaling),
                f.goal.describe(),
                match f.pass {
                    Some(true) => "PASS".into(),
                    Some(false) => "FAIL".into(),
                    None => "-".into(),
                },
            ]);
            row
        })
        .collect();
    let mut header = vec!["scale-out figure"];
    header.extend(DEPLOYMENTS.iter().map(|d| d.name()));
    header.extend(["lc/dist x1", "lc/dist x3", "lc x3/x1", "target", "result"]);
    format!(
        "{}garage: {}\npostgresql: {}\ndistribution: {}\n",
        report::render(&header, &rows),
        report.garage,
        report.postgres,
        report.distribution
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_shared_out_evenly() {
        let shares: Vec<usize> = (0..3).map(|k| share(64, 3, k)).collect();
        assert_eq!(shares, vec![22, 21, 21]);
        assert_eq!(share(16, 1, 0), 16);
    }

    #[test]
    fn targets_compare_the_right_deployments() {
        let samples = BTreeMap::from([
            (Deployment::Layercache1, vec![90.0, 100.0, 110.0]),
            (Deployment::Layercache3, vec![80.0]),
            (Deployment::Distribution1, vec![105.0]),
        ]);
        let f = Figure::new("k", "l".into(), "MB/s", &samples, Goal::VersusDistribution);
        assert_eq!(f.pass, Some(true));
        assert_eq!(f.three_nodes_ratio, None);
        let f = Figure::new("k", "l".into(), "MB/s", &samples, Goal::ThreeNodesVersusOne);
        assert_eq!((f.pass, f.scaling), (Some(false), Some(0.8)));
        let f = Figure::new("k", "l".into(), "req/s", &samples, Goal::None);
        assert_eq!(f.pass, None);
    }
}
