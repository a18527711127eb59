//! Scale-out end to end: three `layercache serve` nodes over one Garage bucket and one
//! PostgreSQL database (`common::cluster`), driven by real clients.
//!
//! * An image pushed through node 0 (docker push with BuildKit's inline cache; buildah
//!   push and buildah's `--cache-to` layer cache) pulls through nodes 1 and 2 at once
//!   (skopeo, docker pull), and builds on a wiped builder importing the cache through
//!   node 2 run no step (BuildKit `--cache-from`, buildah `--cache-from`).
//! * `@actions/cache` saves through one node and restores through another, over v1 and
//!   v2; restore keys match by prefix across nodes; a key saved once stays immutable on
//!   every node.
//! * A small quota while all three nodes take pushes and pulls at once (and skopeo
//!   reads): no request fails because of eviction, usage stays bounded, and afterwards
//!   every tag left pulls whole through every node. On the default eviction settings a
//!   burst through every node evicts only what the quota needs, least recently used
//!   first.
//! * Faults: a node `kill -9`ed in the middle of a large docker push behind a round-robin
//!   balancer (the client's retry lands on another node: the push succeeds and pulls
//!   intact); Garage, then PostgreSQL, stopped for a few seconds under load: clients get
//!   503 UNAVAILABLE with `Retry-After` (or wait), never a 500, nothing acknowledged is
//!   lost or corrupt, and everything is consistent once the service is back; a docker
//!   push and a docker pull under way when it goes retry through it and succeed.
//!
//! Garage and PostgreSQL come from `testsupport`; without them the tests skip, unless
//! `REQUIRE_REAL_CLIENTS=1`. dockerd is one shared daemon, so the tests that use it take
//! turns.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::cache_client::{Client as CacheClient, Protocol, Running, SMALL_RUN, client_ready};
use common::cache_client::{tree_digests, write_tree};
use common::cluster::{Cluster, Options};
use common::load::{self, Blob, Counters, Image, Pulled, config_blob};
use common::registry::{
    Pushed, assert_intact, blobs_of, field, get_json, get_manifest, push_image, random_bytes,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const MIB: usize = 1 << 20;

/// Timestamps of use have a one-second resolution: uses further apart than this are
/// ordered.
const TICK: Duration = Duration::from_millis(1100);

// ---- real clients ----

/// dockerd is one daemon: tests that build, push, pull or wipe through it take turns.
fn docker_turn() -> MutexGuard<'static, ()> {
    static DOCKER: Mutex<()> = Mutex::new(());
    DOCKER.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether dockerd can be used (if not, skip, or fail when real clients are required).
fn dockerd_ready() -> bool {
    if !common::require_tool("/usr/bin/docker") {
        return false;
    }
    let (ok, info) = common::run(&mut common::docker(&["info"]));
    assert!(
        ok,
        "dockerd is not answering (scripts/setup-clients.sh starts it):\n{info}"
    );
    true
}

fn image_id(reference: &str) -> String {
    common::run_ok(&mut common::docker(&[
        "image", "inspect", "--format", "{{.Id}}", reference,
    ]))
    .trim()
    .to_owned()
}

/// The manifest digest a `docker push` printed.
fn pushed_digest(output: &str) -> String {
    output
        .split_whitespace()
        .skip_while(|w| *w != "digest:")
        .nth(1)
        .unwrap_or_else(|| panic!("no digest in the push output:\n{output}"))
        .to_owned()
}

/// Removes the test's images (tags and ids) and the builder's cache, also on failure.
struct Wipe(Vec<String>);

impl Wipe {
    fn now(&self) {
        let (pruned, out) = common::run(&mut common::docker(&["builder", "prune", "-af"]));
        assert!(pruned, "docker builder prune failed:\n{out}");
        for image in &self.0 {
            common::run(&mut common::docker(&["image", "rm", "-f", image]));
        }
    }
}

impl Drop for Wipe {
    fn drop(&mut self) {
        common::run(&mut common::docker(&["builder", "prune", "-af"]));
        for image in &self.0 {
            common::run(&mut common::docker(&["image", "rm", "-f", image]));
        }
    }
}

/// Every build step ended `CACHED`.
fn assert_all_cached(output: &str, steps: usize) {
    let outcomes = common::step_outcomes(output);
    assert_eq!(outcomes.len(), steps, "{outcomes:#?}\n{output}");
    for (step, end) in &outcomes {
        assert_eq!(end, "CACHED", "{step} ran:\n{output}");
    }
}

/// `skopeo copy` of `reference` (`HOST:PORT/REPO:TAG`) into a `dir:` layout, checking
/// that every blob the manifest names came and hashes to its digest: the manifest, or
/// skopeo's output when the copy failed.
fn skopeo_pull(reference: &str) -> Result<Vec<u8>, String> {
    let dir = tempfile::tempdir().unwrap();
    let (ok, output) = common::run(
        Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false"])
            .arg(format!("docker://{reference}"))
            .arg(format!("dir:{}", dir.path().display())),
    );
    if !ok {
        return Err(output);
    }
    let manifest = std::fs::read(dir.path().join("manifest.json")).unwrap();
    let files = tree_digests(dir.path());
    for digest in blobs_of(&manifest) {
        let hex = digest.trim_start_matches("sha256:");
        assert_eq!(
            files.get(hex).map(String::as_str),
            Some(hex),
            "{reference}: blob {digest} missing or corrupt after skopeo copy"
        );
    }
    Ok(manifest)
}

/// [`skopeo_pull`] that must succeed.
fn skopeo_pull_ok(reference: &str) -> Vec<u8> {
    skopeo_pull(reference).unwrap_or_else(|output| panic!("skopeo copy {reference}:\n{output}"))
}

/// Storage of its own for buildah (vfs, chroot isolation: no daemon, no privileges
/// beyond the test's).
struct Buildah {
    storage: tempfile::TempDir,
}

impl Buildah {
    fn new() -> Buildah {
        Buildah {
            storage: tempfile::tempdir().unwrap(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("buildah");
        command
            .arg("--root")
            .arg(self.storage.path().join("root"))
            .arg("--runroot")
            .arg(self.storage.path().join("runroot"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        command
    }

    /// `bud --layers` of `context` as `tag`, exporting its layer cache to `cache_to`
    /// and importing from `cache_from`: the output and the image id.
    fn build(
        &self,
        context: &Path,
        tag: &str,
        cache_to: Option<&str>,
        cache_from: Option<&str>,
    ) -> (String, String) {
        let iid = self.storage.path().join("iid");
        let mut command = self.command(&["bud", "--isolation", "chroot", "--layers"]);
        command
            .args(["--tls-verify=false", "-t", tag, "--iidfile"])
            .arg(&iid);
        if let Some(cache) = cache_to {
            command.args(["--cache-to", cache]);
        }
        if let Some(cache) = cache_from {
            command.args(["--cache-from", cache]);
        }
        let output = common::run_ok(command.arg(context));
        let id = std::fs::read_to_string(&iid).unwrap().trim().to_owned();
        (output, id)
    }

    /// Push `image` to `reference`; the digest of the manifest pushed.
    fn push(&self, image: &str, reference: &str) -> String {
        let digest_file = self.storage.path().join("digest");
        let mut command = self.command(&["push", "--tls-verify=false", "--digestfile"]);
        command
            .arg(&digest_file)
            .arg(image)
            .arg(format!("docker://{reference}"));
        common::run_ok(&mut command);
        std::fs::read_to_string(&digest_file)
            .unwrap()
            .trim()
            .to_owned()
    }
}

/// The output of each buildah `STEP i/n: INSTRUCTION` after `FROM`.
fn buildah_steps(output: &str) -> Vec<&str> {
    output
        .split("STEP ")
        .skip(1)
        .filter(|step| !step.contains(": FROM "))
        .collect()
}

// ---- 1. push through one node, pull and build through the others ----

/// Four layers of a few MiB; each `RUN` writes random bytes, so a step that runs again
/// cannot produce the same layer.
const DOCKERFILE: &str = r#"FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox dd if=/dev/urandom of=/a.bin bs=1M count=4"]
COPY nonce /nonce
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox dd if=/dev/urandom of=/b.bin bs=1M count=3"]
"#;

const DOCKERFILE_STEPS: usize = 4;

#[test]
fn an_image_pushed_through_one_node_pulls_and_rebuilds_cached_through_the_others() {
    if !dockerd_ready() || !common::require_tool("skopeo") || !common::require_tool("buildah") {
        return;
    }
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let _turn = docker_turn();
    let (first, second, third) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let context = common::busybox_context(first, "Dockerfile", DOCKERFILE);

    // BuildKit builds and docker pushes through node 0, the cache inline.
    let pushed = format!("{}/scale/app:1", first.host);
    let through_second = format!("{}/scale/app:1", second.host);
    let through_third = format!("{}/scale/app:1", third.host);
    let mut wipe = Wipe(vec![
        pushed.clone(),
        through_second.clone(),
        through_third.clone(),
    ]);
    wipe.now();
    let cold = common::docker_build(context.path(), &pushed, true, None);
    let steps = common::step_outcomes(&cold);
    assert_eq!(steps.len(), DOCKERFILE_STEPS, "{steps:#?}\n{cold}");
    assert!(steps.values().all(|end| end.starts_with("DONE")), "{cold}");
    let built = image_id(&pushed);
    wipe.0.push(built.clone());
    let digest = pushed_digest(&common::run_ok(&mut common::docker(&["push", &pushed])));

    // buildah builds with its layer cache exported through node 0, and pushes.
    let buildah_cache = |node: &common::Server| format!("{}/scale/buildah-cache", node.host);
    let cold_builder = Buildah::new();
    let (cold_buildah, buildah_id) = cold_builder.build(
        context.path(),
        "localhost/scale-buildah:1",
        Some(&buildah_cache(first)),
        None,
    );
    for step in buildah_steps(&cold_buildah) {
        assert!(
            step.contains("--> Pushing cache"),
            "STEP {step}\n{cold_buildah}"
        );
    }
    let buildah_digest = cold_builder.push(
        "localhost/scale-buildah:1",
        &format!("{}/scale/buildah:1", first.host),
    );
    drop(cold_builder);

    // Through nodes 1 and 2 at once: skopeo both images, docker the BuildKit one on a
    // daemon that no longer has it.
    wipe.now();
    let (by_skopeo, by_skopeo_buildah, docker_pull) = std::thread::scope(|s| {
        let skopeo = s.spawn(|| skopeo_pull_ok(&through_second));
        let skopeo_buildah = s.spawn(|| skopeo_pull_ok(&format!("{}/scale/buildah:1", third.host)));
        let docker = s.spawn(|| common::run(&mut common::docker(&["pull", &through_third])));
        (
            skopeo.join().unwrap(),
            skopeo_buildah.join().unwrap(),
            docker.join().unwrap(),
        )
    });
    assert_eq!(common::digest_of(&by_skopeo), digest, "through node 1");
    assert_eq!(
        common::digest_of(&by_skopeo_buildah),
        buildah_digest,
        "buildah's image through node 2"
    );
    assert!(
        docker_pull.0,
        "docker pull {through_third}:\n{}",
        docker_pull.1
    );
    assert_eq!(
        image_id(&through_third),
        built,
        "docker pull through node 2"
    );

    // A wiped builder importing the inline cache through node 2 runs no step.
    wipe.now();
    let warm = common::docker_build(context.path(), &through_third, true, Some(&through_third));
    assert!(
        warm.contains(&format!("importing cache manifest from {through_third}")),
        "{warm}"
    );
    assert_all_cached(&warm, DOCKERFILE_STEPS);
    assert_eq!(
        image_id(&through_third),
        built,
        "the cached rebuild differs"
    );

    // So does buildah on empty storage, its layer cache read through node 2.
    let warm_builder = Buildah::new();
    let cache = buildah_cache(third);
    let (warm_buildah, rebuilt) = warm_builder.build(
        context.path(),
        "localhost/scale-buildah:1",
        None,
        Some(&cache),
    );
    let warm_steps = buildah_steps(&warm_buildah);
    assert_eq!(warm_steps.len(), DOCKERFILE_STEPS, "{warm_buildah}");
    for step in warm_steps {
        assert!(
            step.contains(&format!("--> Cache pulled from remote {cache}:")),
            "STEP {step} was not pulled from the cache through node 2\n{warm_buildah}"
        );
    }
    assert!(
        !warm_buildah.contains("records in"),
        "a RUN step ran:\n{warm_buildah}"
    );
    assert_eq!(rebuilt, buildah_id, "buildah's cached build differs");
    assert_no_server_errors(&cluster);
}

/// No node answered a request with a 5xx.
fn assert_no_server_errors(cluster: &Cluster) {
    let statuses = cluster.statuses();
    assert!(
        statuses.keys().all(|status| *status < 500),
        "server errors: {statuses:?}\n{}",
        cluster.logs()
    );
}

// ---- 2. the Actions cache across nodes ----

const MAIN: &str = "refs/heads/main";

/// A small directory `deps/` of pseudo-random files from `seed` in a new workspace.
fn deps_workspace(seed: u64) -> (tempfile::TempDir, BTreeMap<String, String>) {
    let workspace = tempfile::tempdir().unwrap();
    let files = [
        ("deps/lib.bin", 300 * 1024),
        ("deps/nested/index.json", 700),
        ("deps/one", 1),
    ];
    let digests = write_tree(workspace.path(), seed, &files);
    (workspace, digests)
}

#[test]
fn actions_cache_entries_saved_through_one_node_restore_through_the_others() {
    if !client_ready() {
        return;
    }
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let token = cluster.token(&["--read", MAIN, "--write", MAIN]);
    for (seed, protocol) in [(1, Protocol::V1), (2, Protocol::V2)] {
        let through = |node: usize| CacheClient::new(protocol, cluster.node(node), &token);
        let prefix = format!("deps-{protocol:?}-").to_lowercase();

        // Saved through node 0, restored through node 1 under its exact key.
        let (older_workspace, older) = deps_workspace(seed * 10);
        let older_key = format!("{prefix}1");
        through(0).save_ok(older_workspace.path(), &older_key, &["deps"]);
        let (matched, restored, output) = through(1).restore_fresh(&older_key, &[], &["deps"]);
        assert_eq!(
            matched.as_deref(),
            Some(older_key.as_str()),
            "{protocol:?}:\n{output}"
        );
        assert_eq!(
            restored, older,
            "{protocol:?} restore through node 1:\n{output}"
        );

        // The key is taken on every node: a save through node 2 is refused.
        let (other_workspace, _) = deps_workspace(seed * 10 + 1);
        let (id, output) =
            through(2).save(other_workspace.path(), &older_key, &["deps"], SMALL_RUN);
        assert_eq!(id, -1, "{protocol:?}: {older_key} saved twice:\n{output}");

        // A newer entry through node 1; restore keys find it by prefix through nodes 2
        // and 0.
        std::thread::sleep(TICK);
        let (newer_workspace, newer) = deps_workspace(seed * 10 + 2);
        let newer_key = format!("{prefix}2");
        through(1).save_ok(newer_workspace.path(), &newer_key, &["deps"]);
        for node in [2, 0] {
            let (matched, restored, output) =
                through(node).restore_fresh(&format!("{prefix}missing"), &[&prefix], &["deps"]);
            assert_eq!(
                matched.as_deref(),
                Some(newer_key.as_str()),
                "{protocol:?} prefix restore through node {node}:\n{output}"
            );
            assert_eq!(
                restored, newer,
                "{protocol:?} through node {node}:\n{output}"
            );
        }
        // The older entry is still there, unchanged, through node 2.
        let (matched, restored, output) = through(2).restore_fresh(&older_key, &[], &["deps"]);
        assert_eq!(matched.as_deref(), Some(older_key.as_str()), "{output}");
        assert_eq!(restored, older, "{protocol:?}:\n{output}");
    }
    assert_no_server_errors(&cluster);
}

// ---- 3. eviction across nodes ----

/// An image a push of a load got acknowledged.
struct Acknowledged {
    /// The node it went through.
    node: usize,
    repo: String,
    tag: String,
    image: Image,
    /// When the manifest was stored.
    at: Instant,
}

impl Acknowledged {
    /// `image`, just stored as `repo:tag` through `node`.
    fn now(node: usize, repo: String, tag: String, image: Image) -> Acknowledged {
        Acknowledged {
            node,
            repo,
            tag,
            image,
            at: Instant::now(),
        }
    }

    /// The bytes of its blobs.
    fn bytes(&self) -> u64 {
        self.image.blobs().map(|b| b.bytes.len() as u64).sum()
    }
}

/// Images a node's pusher pushes.
const BUSY_IMAGES: usize = 14;

/// Pushes `BUSY_IMAGES` images through `client` (node `node`), each a fresh layer of 1
/// to 2 MiB and one of `shared` (the same blobs through every node, concurrently).
async fn busy_pusher(
    client: load::Client,
    node: usize,
    shared: Arc<Vec<Blob>>,
    acknowledged: Arc<Mutex<Vec<Acknowledged>>>,
    failures: Arc<Mutex<Vec<String>>>,
) {
    let mut rng = StdRng::seed_from_u64(0x5ca1e + node as u64);
    for n in 0..BUSY_IMAGES {
        let len = rng.random_range(MIB..=2 * MIB);
        let fresh = Blob::random(&mut rng, len);
        let pooled = shared[rng.random_range(0..shared.len())].clone();
        let image = Image::new(
            config_blob(&format!("busy {node} {n}")),
            vec![fresh, pooled],
        );
        let repo = format!("busy/node{node}-{}", n % 3);
        let tag = format!("t{n}");
        match client.push_image(&repo, &image, &tag).await {
            Ok(()) => acknowledged
                .lock()
                .unwrap()
                .push(Acknowledged::now(node, repo, tag, image)),
            Err(e) => failures
                .lock()
                .unwrap()
                .push(format!("push {repo}:{tag} through node {node}: {e}")),
        }
    }
}

/// Until `done`, pulls whole (every blob verified) one of the latest images another
/// node pushed; a miss (the tag evicted) is fine, a manifest served without its blobs
/// is not.
async fn busy_puller(
    client: load::Client,
    node: usize,
    acknowledged: Arc<Mutex<Vec<Acknowledged>>>,
    failures: Arc<Mutex<Vec<String>>>,
    done: Arc<AtomicBool>,
) -> (usize, usize) {
    let mut rng = StdRng::seed_from_u64(0x9011 + node as u64);
    let (mut whole, mut missed) = (0, 0);
    while !done.load(Ordering::SeqCst) {
        let pick = {
            let acknowledged = acknowledged.lock().unwrap();
            let others: Vec<&Acknowledged> = acknowledged
                .iter()
                .rev()
                .filter(|a| a.node != node)
                .take(6)
                .collect();
            (!others.is_empty()).then(|| {
                let a = others[rng.random_range(0..others.len())];
                (a.repo.clone(), a.tag.clone())
            })
        };
        if let Some((repo, tag)) = pick {
            match client.pull(&repo, &tag).await {
                Ok(Pulled::Whole { .. }) => whole += 1,
                Ok(Pulled::Miss) => missed += 1,
                Err(problem) => failures.lock().unwrap().push(format!(
                    "pull {repo}:{tag} through node {node}: {}",
                    problem.problem.text()
                )),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (whole, missed)
}

/// The most bytes acknowledged within any `window`.
fn most_written_within(acknowledged: &[Acknowledged], window: Duration) -> u64 {
    acknowledged
        .iter()
        .map(|a| {
            acknowledged
                .iter()
                .filter(|b| b.at >= a.at && b.at.duration_since(a.at) <= window)
                .map(Acknowledged::bytes)
                .sum()
        })
        .max()
        .unwrap_or(0)
}

/// Every tag of every repository, through `client`.
async fn all_tags(client: &load::Client) -> Vec<(String, String)> {
    let catalog = get_json(
        &client.http,
        &format!("{}/v2/_catalog?n=10000", client.base),
    )
    .await;
    let mut tags = Vec::new();
    for repo in catalog["repositories"].as_array().unwrap() {
        let repo = repo.as_str().unwrap();
        for tag in client.tags(repo).await {
            tags.push((repo.to_owned(), tag));
        }
    }
    tags
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_busy_nodes_under_a_small_quota_evict_without_failing_a_request() {
    const QUOTA: u64 = 32 << 20;
    const GRACE: Duration = Duration::from_secs(3);
    const IN_USE: Duration = Duration::from_secs(3);
    const PUSH_WINDOW: Duration = Duration::from_secs(2);
    const INTERVAL: Duration = Duration::from_secs(1);
    let skopeo = common::require_tool("skopeo");
    let seconds = |duration: Duration| format!("{}s", duration.as_secs());
    let Some(cluster) = Cluster::start_with(
        Options::default()
            .env("LAYERCACHE_STORE__EVICTION__MAX_SIZE", &QUOTA.to_string())
            .env("LAYERCACHE_STORE__EVICTION__GRACE", &seconds(GRACE))
            .env("LAYERCACHE_STORE__EVICTION__IN_USE", &seconds(IN_USE))
            .env(
                "LAYERCACHE_STORE__EVICTION__PUSH_WINDOW",
                &seconds(PUSH_WINDOW),
            )
            .env("LAYERCACHE_STORE__EVICTION__INTERVAL", &seconds(INTERVAL)),
    ) else {
        return;
    };
    let cluster = Arc::new(cluster);
    let counters = Arc::new(Counters::default());
    let clients: Vec<load::Client> = cluster
        .nodes()
        .iter()
        .map(|n| load::Client::new(&n.url, counters.clone()).with_push_window(PUSH_WINDOW))
        .collect();
    let status = clients[0].gc_status().await;
    assert_eq!(field(&status, &["quota", "limit"]), QUOTA, "{status:#}");
    let high = field(&status, &["quota", "high"]);
    let mut rng = StdRng::seed_from_u64(0x5a5e);
    let shared: Arc<Vec<Blob>> =
        Arc::new((0..4).map(|_| Blob::random(&mut rng, 512 * 1024)).collect());
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let started = Instant::now();

    let pushers: Vec<_> = (0..clients.len())
        .map(|node| {
            tokio::spawn(busy_pusher(
                clients[node].clone(),
                node,
                shared.clone(),
                acknowledged.clone(),
                failures.clone(),
            ))
        })
        .collect();
    let pullers: Vec<_> = (0..clients.len())
        .map(|node| {
            tokio::spawn(busy_puller(
                clients[node].clone(),
                node,
                acknowledged.clone(),
                failures.clone(),
                done.clone(),
            ))
        })
        .collect();
    // skopeo reads the latest image pushed through one node through the next, now and
    // then.
    let skopeo_reader = {
        let (cluster, acknowledged, failures, done) = (
            cluster.clone(),
            acknowledged.clone(),
            failures.clone(),
            done.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let mut copies = 0;
            while skopeo && !done.load(Ordering::SeqCst) {
                let latest = acknowledged
                    .lock()
                    .unwrap()
                    .last()
                    .map(|a| (a.node, a.repo.clone(), a.tag.clone()));
                if let Some((node, repo, tag)) = latest {
                    let through = cluster.node((node + 1) % cluster.nodes().len());
                    let reference = format!("{}/{repo}:{tag}", through.host);
                    match skopeo_pull(&reference) {
                        Ok(_) => copies += 1,
                        // Evicted before skopeo asked: a miss.
                        Err(output) if output.contains("manifest unknown") => {}
                        Err(output) => failures
                            .lock()
                            .unwrap()
                            .push(format!("skopeo copy {reference}:\n{output}")),
                    }
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            copies
        })
    };
    // Usage, sampled through each node in turn.
    let sampler = {
        let (clients, done) = (clients.clone(), done.clone());
        tokio::spawn(async move {
            let mut peak = 0;
            let mut turn = 0;
            while !done.load(Ordering::SeqCst) {
                let status = clients[turn % clients.len()].gc_status().await;
                peak = peak.max(field(&status, &["usage", "total"]));
                turn += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            peak
        })
    };

    for pusher in pushers {
        pusher.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let mut pulls = (0, 0);
    for puller in pullers {
        let (whole, missed) = puller.await.unwrap();
        pulls = (pulls.0 + whole, pulls.1 + missed);
    }
    let copies = skopeo_reader.await.unwrap();
    let peak = sampler.await.unwrap();
    let acknowledged = std::mem::take(&mut *acknowledged.lock().unwrap());
    let written: u64 = acknowledged.iter().map(Acknowledged::bytes).sum();
    eprintln!(
        "{} images ({} MiB) pushed through 3 nodes in {:?}; {} pulls whole, {} missed, \
         {copies} skopeo copies; peak usage {} MiB (quota {} MiB)",
        acknowledged.len(),
        written >> 20,
        started.elapsed(),
        pulls.0,
        pulls.1,
        peak >> 20,
        QUOTA >> 20,
    );
    let failures = std::mem::take(&mut *failures.lock().unwrap());
    assert!(
        failures.is_empty(),
        "requests failed under eviction: {failures:#?}"
    );
    assert_eq!(
        Counters::get(&counters.blob_unknown_within_window),
        0,
        "manifest pushes refused for blobs checked within the push window: {:?}",
        counters.refusals.lock().unwrap()
    );
    assert!(written > 2 * QUOTA, "the load wrote only {written} bytes");
    assert!(pulls.0 > 0, "no pull got a whole image");
    // What exceeds the quota is bounded by what was written within the protection
    // window (plus a pass interval either side).
    let window = GRACE.max(IN_USE).max(PUSH_WINDOW) + 2 * INTERVAL;
    let bound = QUOTA + most_written_within(&acknowledged, window);
    assert!(peak <= bound, "peak usage {peak} above {bound}");

    // Settled: under the high watermark, and every tag left pulls whole through every
    // node.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = clients[1].gc_status().await;
        if field(&status, &["usage", "total"]) <= high {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "usage stays above the high watermark: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let tags = all_tags(&clients[2]).await;
    assert!(
        tags.len() < acknowledged.len(),
        "nothing was evicted: {} tags of {} pushed",
        tags.len(),
        acknowledged.len()
    );
    for (repo, tag) in &tags {
        for (node, client) in clients.iter().enumerate() {
            match client.pull(repo, tag).await {
                Ok(Pulled::Whole { .. }) => {}
                other => panic!("{repo}:{tag} through node {node}: {other:?}"),
            }
        }
    }
    if skopeo {
        let newest = acknowledged
            .iter()
            .rev()
            .find(|a| tags.contains(&(a.repo.clone(), a.tag.clone())));
        if let Some(newest) = newest {
            for node in cluster.nodes() {
                let reference = format!("{}/{}:{}", node.host, newest.repo, newest.tag);
                tokio::task::block_in_place(|| skopeo_pull_ok(&reference));
            }
        }
    }
    eprintln!(
        "{} tags left, each pulled whole through every node",
        tags.len()
    );
    assert_no_server_errors(&cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_through_every_node_on_the_default_eviction_settings_evicts_only_what_is_needed() {
    // Six of the nine images fit under the low watermark.
    const QUOTA: u64 = 64 << 20;
    const IMAGES: usize = 9;
    const LAYER: u64 = 8 << 20;
    const PULLED_AGAIN: usize = 0;
    let Some(cluster) = Cluster::start_with(
        Options::default().env("LAYERCACHE_STORE__EVICTION__MAX_SIZE", &QUOTA.to_string()),
    ) else {
        return;
    };
    let http = reqwest::Client::new();
    let nodes = cluster.nodes();
    let mut images: Vec<Pushed> = Vec::new();
    for i in 0..IMAGES {
        let layer = random_bytes(0xb005 + i as u64, LAYER);
        let node = &nodes[i % nodes.len()];
        images.push(push_image(&http, node, &format!("burst/i{i}"), layer).await);
        if i == IMAGES / 2 {
            assert_intact(&http, &nodes[2], &images[PULLED_AGAIN]).await;
        }
        tokio::time::sleep(TICK).await;
    }
    let through = |node: &common::Server| load::Client::new(&node.url, Arc::default());
    let pass = through(&nodes[1]).gc().await;
    let dry = through(&nodes[2]).gc_pass(true).await;
    assert_eq!(
        dry["evicted"],
        Value::Array(vec![]),
        "a dry run proposes more: {dry:#}\n{pass:#}"
    );

    let mut kept = Vec::new();
    for (i, image) in images.iter().enumerate() {
        let (code, _) = get_manifest(&http, &nodes[0], &image.repo, "v1").await;
        match code {
            200 => kept.push(i),
            404 => {}
            other => panic!("{}: GET manifest answered {other}", image.repo),
        }
    }
    let status = through(&nodes[0]).gc_status().await;
    eprintln!("kept {kept:?}; {status}");
    assert_eq!(field(&status, &["quota", "limit"]), QUOTA, "{status:#}");
    assert!(
        kept.contains(&PULLED_AGAIN),
        "the image pulled again was evicted: {kept:?}"
    );
    assert!(
        kept.contains(&(IMAGES - 1)),
        "the newest image was evicted: {kept:?}"
    );
    // Least recently used first: after the one pulled again, the oldest pushes.
    let evicted: Vec<usize> = (0..IMAGES).filter(|i| !kept.contains(i)).collect();
    let lru: Vec<usize> = (0..IMAGES).filter(|&i| i != PULLED_AGAIN).collect();
    assert_eq!(
        evicted,
        lru[..evicted.len()],
        "not least recently used first"
    );
    // Only what the quota needs: one image more would not have fitted the low
    // watermark.
    let low = field(&status, &["quota", "low"]);
    assert!(
        (kept.len() as u64 + 1) * LAYER > low,
        "kept {kept:?} of {IMAGES}, yet the low watermark is {low}"
    );
    // The evicted images' layers wait out the push window (minutes on the defaults),
    // counted as released.
    let released = field(&status, &["usage", "released_bytes"]);
    assert!(
        released >= evicted.len() as u64 * LAYER,
        "{released} bytes released for {evicted:?}: {status:#}"
    );
    assert!(
        field(&status, &["usage", "total"]) - released <= field(&status, &["quota", "high"]),
        "above the high watermark even once the released bytes go: {status:#}"
    );
    for &i in &kept {
        for node in nodes {
            assert_intact(&http, node, &images[i]).await;
        }
    }
    assert_no_server_errors(&cluster);
}

// ---- 4. faults ----

/// A layer big enough for a node to die in the middle of its upload.
const BIG_DOCKERFILE: &str = r#"FROM scratch
COPY busybox /bin/busybox
COPY nonce /nonce
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox dd if=/dev/urandom of=/big.bin bs=1M count=128"]
"#;

#[test]
fn a_node_killed_in_the_middle_of_a_large_push_leaves_the_retry_to_another_behind_a_balancer() {
    if !dockerd_ready() || !common::require_tool("skopeo") {
        return;
    }
    let Some(mut cluster) = Cluster::start() else {
        return;
    };
    let _turn = docker_turn();
    let balancer = cluster.round_robin();
    let context = common::busybox_context(cluster.node(0), "Dockerfile", BIG_DOCKERFILE);
    let tag = format!("{}/scale/big:1", balancer.host);
    let mut wipe = Wipe(vec![tag.clone()]);
    wipe.now();
    common::docker_build(context.path(), &tag, false, None);
    let built = image_id(&tag);
    wipe.0.push(built.clone());

    // Kill the node the layer is going to once 24 MiB of it reached that node.
    let before = balancer.bytes_in();
    let mut push = Running::spawn(common::docker(&["push", &tag]));
    let deadline = Instant::now() + Duration::from_secs(120);
    let victim = loop {
        let now = balancer.bytes_in();
        if let Some(node) = (0..now.len()).find(|&i| now[i] - before[i] > 24 << 20) {
            break node;
        }
        assert!(
            Instant::now() < deadline,
            "the push never got going:\n{}",
            push.output
        );
        push.drain(Duration::from_millis(20));
    };
    cluster.kill(victim);
    let killed_at = balancer.bytes_in();
    let (status, output) = push.finish(Duration::from_secs(300));
    assert!(
        status.success(),
        "docker push after node {victim} died:\n{output}"
    );
    let digest = pushed_digest(&output);
    let after = balancer.bytes_in();
    let moved: u64 = (0..after.len())
        .filter(|&i| i != victim)
        .map(|i| after[i] - killed_at[i])
        .sum();
    eprintln!(
        "node {victim} killed after {} MiB of the layer reached it; {} MiB went to the \
         other nodes after that; connections per node {:?}",
        (killed_at[victim] - before[victim]) >> 20,
        moved >> 20,
        balancer.connections()
    );
    assert!(
        moved > 100 << 20,
        "the layer did not go up again through another node"
    );

    // Back up, every node serves the image whole; docker pulls the very image built.
    cluster.restart(victim);
    for node in cluster.nodes() {
        let manifest = skopeo_pull_ok(&format!("{}/scale/big:1", node.host));
        assert_eq!(
            common::digest_of(&manifest),
            digest,
            "through {}",
            node.host
        );
    }
    let through_victim = format!("{}/scale/big:1", cluster.node(victim).host);
    wipe.0.push(through_victim.clone());
    wipe.now();
    common::run_ok(&mut common::docker(&["pull", &through_victim]));
    assert_eq!(image_id(&through_victim), built);
    assert_no_server_errors(&cluster);
}

/// A shared backend a fault test stops.
#[derive(Clone, Copy, Debug)]
enum Backend {
    ObjectStore,
    Database,
}

impl Backend {
    fn stop(self, cluster: &Cluster) {
        match self {
            Backend::ObjectStore => cluster.garage().stop(),
            Backend::Database => cluster.postgres().stop(),
        }
    }

    fn start(self, cluster: &Cluster) {
        match self {
            Backend::ObjectStore => cluster.garage().start(),
            Backend::Database => cluster.postgres().start(),
        }
    }
}

/// How long the backend is away.
const OUTAGE: Duration = Duration::from_secs(5);
/// How long after it is back a request may still fail.
const RECOVERY: Duration = Duration::from_secs(10);

/// When the outage began and ended, once known.
#[derive(Default)]
struct Outage {
    began: Option<Instant>,
    ended: Option<Instant>,
}

impl Outage {
    /// Whether a request that ended at `at` may have failed because of the outage.
    fn excuses(&self, at: Instant) -> bool {
        self.began.is_some_and(|began| at >= began)
            && self.ended.is_none_or(|ended| at <= ended + RECOVERY)
    }
}

/// A failure of the load: retryable (a 503 UNAVAILABLE, a HEAD's bare 503, or a blob
/// whose body stopped short of its length) or not.
///
/// A GET under way when the object store goes can only be cut: its status and length
/// are sent, and the store's own retries of the rest ran out. Clients retry such a
/// transfer; what they must never get is other bytes, which the load reports as corrupt.
fn retryable(error: &str) -> bool {
    error.contains(": 503 UNAVAILABLE")
        || (error.contains(": HEAD blob ") && error.ends_with(": 503"))
        || (error.contains(": GET blob ") && error.contains("IncompleteBody"))
}

/// Size of the blob a GET is reading when the backend goes: more than every buffer
/// between the object store and the client holds, so the object store's going reaches
/// into the body.
const READ_ACROSS: usize = 64 * MIB;

/// A blob GET begun before an outage, of which the first MiB was read.
struct ReadAcross {
    response: reqwest::Response,
    received: Vec<u8>,
}

impl ReadAcross {
    /// GET `blob` of `repo` through `node` and read its first MiB.
    async fn begin(node: &common::Server, repo: &str, blob: &Blob) -> ReadAcross {
        let response = reqwest::Client::new()
            .get(node.at(&format!("/v2/{repo}/blobs/{}", blob.digest)))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "GET blob before the outage");
        let mut read = ReadAcross {
            response,
            received: Vec::new(),
        };
        while read.received.len() < MIB {
            let chunk = read.response.chunk().await.unwrap().expect("a first MiB");
            read.received.extend_from_slice(&chunk);
        }
        read
    }

    /// Read on to the end: the bytes received, and the error the body ended with.
    async fn finish(mut self) -> (Vec<u8>, Option<String>) {
        loop {
            match self.response.chunk().await {
                Ok(Some(chunk)) => self.received.extend_from_slice(&chunk),
                Ok(None) => return (self.received, None),
                Err(e) => return (self.received, Some(format!("{e:?}"))),
            }
        }
    }
}

/// Wait for `client` (`what`: `docker push` or `docker pull`), begun before an outage of
/// `backend`, to finish: it must succeed, and across the object store's outage it must have
/// met errors its retries carried it through. Its output.
fn finished_across(client: &mut Running, what: &str, backend: Backend) -> String {
    let (status, output) = tokio::task::block_in_place(|| client.finish(Duration::from_secs(180)));
    assert!(
        status.success(),
        "{what} across the {backend:?} outage:\n{output}"
    );
    let retries = output.matches("Retrying in").count();
    eprintln!("{what} across the {backend:?} outage: {retries} `Retrying in` lines");
    if let Backend::ObjectStore = backend {
        assert!(retries > 0, "{what} met no error:\n{output}");
    }
    output
}

/// Layers of the image `docker pull` fetches across an outage, and their size: with three
/// downloads at a time, some are still to start (or under way) when the backend goes.
const PULL_ACROSS_LAYERS: usize = 8;
const PULL_ACROSS_LAYER: usize = 48 * MIB;

/// An image docker can pull: `layers` uncompressed tar layers of one random file of `len`
/// bytes each, and a config that names them.
fn tar_image(rng: &mut StdRng, layers: usize, len: usize) -> Image {
    let layers: Vec<Blob> = (0..layers)
        .map(|i| {
            let mut tar = common::tar_header(&format!("data/{i}.bin"), len as u64).to_vec();
            let file = tar.len();
            tar.resize(file + len.next_multiple_of(512) + 1024, 0);
            rng.fill(&mut tar[file..file + len]);
            Blob::new(tar)
        })
        .collect();
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    Image::new(Blob::new(config.to_string().into_bytes()), layers)
}

/// One node's load until `done`: push a fresh small image, pull the base image of
/// another node. Every failure is recorded with when it ended.
async fn outage_load(
    client: load::Client,
    node: usize,
    base: Arc<Vec<(String, Image)>>,
    acknowledged: Arc<Mutex<Vec<Acknowledged>>>,
    errors: Arc<Mutex<Vec<(Instant, String)>>>,
    done: Arc<AtomicBool>,
) -> Duration {
    let mut rng = StdRng::seed_from_u64(0x0017 + node as u64);
    let mut slowest = Duration::ZERO;
    let mut n = 0;
    while !done.load(Ordering::SeqCst) {
        let image = Image::new(
            config_blob(&format!("outage {node} {n}")),
            vec![Blob::random(&mut rng, 256 * 1024)],
        );
        let repo = format!("outage/node{node}");
        let tag = format!("t{n}");
        let began = Instant::now();
        let pushed = client.push_image(&repo, &image, &tag).await;
        slowest = slowest.max(began.elapsed());
        match pushed {
            Ok(()) => acknowledged
                .lock()
                .unwrap()
                .push(Acknowledged::now(node, repo, tag, image)),
            Err(e) => errors
                .lock()
                .unwrap()
                .push((Instant::now(), format!("push through node {node}: {e}"))),
        }
        let (repo, _) = &base[(node + 1) % base.len()];
        let began = Instant::now();
        let pulled = client.pull(repo, "base").await;
        slowest = slowest.max(began.elapsed());
        match pulled {
            Ok(Pulled::Whole { .. }) => {}
            Ok(Pulled::Miss) => errors.lock().unwrap().push((
                Instant::now(),
                format!("pull {repo}:base through node {node}: a miss"),
            )),
            Err(problem) => errors.lock().unwrap().push((
                Instant::now(),
                format!(
                    "pull {repo}:base through node {node}: {}",
                    problem.problem.text()
                ),
            )),
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    slowest
}

/// Requests a client reads from storage, sent through every node while the backend is
/// away: each answer that is not a success must be a 503 with the OCI error code
/// UNAVAILABLE and a `Retry-After`. Returns the answers, counted by status.
async fn probe_during_outage(
    cluster: Arc<Cluster>,
    base: Arc<Vec<(String, Image)>>,
    outage: Arc<Mutex<Outage>>,
    wrong: Arc<Mutex<Vec<String>>>,
) -> BTreeMap<u16, usize> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut statuses = BTreeMap::new();
    let (repo, image) = &base[0];
    let layer = &image.layers[0].digest;
    while outage.lock().unwrap().ended.is_none() {
        for node in cluster.nodes() {
            let requests = [
                http.get(node.at(&format!("/v2/{repo}/blobs/{layer}"))),
                http.get(node.at(&format!("/v2/{repo}/manifests/base")))
                    .header("accept", load::ACCEPT),
                http.post(node.at(&format!("/v2/{repo}/blobs/uploads/"))),
            ];
            for request in requests {
                let Ok(response) = request.send().await else {
                    wrong
                        .lock()
                        .unwrap()
                        .push(format!("{}: no answer", node.url));
                    continue;
                };
                let status = response.status().as_u16();
                *statuses.entry(status).or_insert(0) += 1;
                if response.status().is_success() {
                    continue;
                }
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let (status, code, text) = load::Client::explain(response).await;
                if status != 503 || code != "UNAVAILABLE" || retry_after.is_none() {
                    wrong.lock().unwrap().push(format!(
                        "{}: {status} {code} (Retry-After {retry_after:?}) {text}",
                        node.url
                    ));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    statuses
}

/// Stop `backend` for [`OUTAGE`] under load through every node, then check that the
/// clients only ever saw retryable errors, that a blob read under way got only its own
/// bytes, that nothing acknowledged was lost, and that everything works again.
async fn an_outage_of(backend: Backend) {
    let Some(cluster) = Cluster::start_with(Options::default().own_services()) else {
        return;
    };
    let cluster = Arc::new(cluster);
    let counters = Arc::new(Counters::default());
    let clients: Vec<load::Client> = cluster
        .nodes()
        .iter()
        .map(|n| load::Client::new(&n.url, counters.clone()))
        .collect();
    let mut rng = StdRng::seed_from_u64(0xba5e);
    let mut base = Vec::new();
    for (node, client) in clients.iter().enumerate() {
        let image = Image::new(
            config_blob(&format!("base {node}")),
            vec![Blob::random(&mut rng, 2 * MIB)],
        );
        let repo = format!("outage/base{node}");
        client.push_image(&repo, &image, "base").await.unwrap();
        base.push((repo, image));
    }
    let base = Arc::new(base);
    let across_image = Image::new(
        config_blob("read across"),
        vec![Blob::random(&mut rng, READ_ACROSS)],
    );
    clients[0]
        .push_image("outage/across", &across_image, "1")
        .await
        .unwrap();
    let across = &across_image.layers[0];
    // docker pushes an image through node 1 while the backend is away: its retries
    // carry it through.
    let with_docker = dockerd_ready() && common::require_tool("skopeo");
    let _turn = with_docker.then(docker_turn);
    let docker_image = format!("{}/outage/docker:1", cluster.node(1).host);
    // ...and pulls an image through node 2 that it began to download before.
    let pull_image = tar_image(&mut rng, PULL_ACROSS_LAYERS, PULL_ACROSS_LAYER);
    let pull_reference = format!("{}/outage/pull:1", cluster.node(2).host);
    if with_docker {
        clients[0]
            .push_image("outage/pull", &pull_image, "1")
            .await
            .unwrap();
    }
    let _wipe = with_docker.then(|| {
        let wipe = Wipe(vec![docker_image.clone(), pull_reference.clone()]);
        let context = common::busybox_context(cluster.node(1), "Dockerfile", DOCKERFILE);
        tokio::task::block_in_place(|| {
            wipe.now();
            common::docker_build(context.path(), &docker_image, false, None);
        });
        wipe
    });
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let outage = Arc::new(Mutex::new(Outage::default()));
    let wrong = Arc::new(Mutex::new(Vec::new()));

    let loads: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(node, client)| {
            tokio::spawn(outage_load(
                client.clone(),
                node,
                base.clone(),
                acknowledged.clone(),
                errors.clone(),
                done.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let read_across = ReadAcross::begin(cluster.node(2), "outage/across", across).await;
    let mut docker_pull = with_docker.then(|| {
        let mut pull = Running::spawn(common::docker(&["pull", &pull_reference]));
        let downloading = tokio::task::block_in_place(|| {
            pull.wait_for("Pulling fs layer", Duration::from_secs(60))
        });
        assert!(downloading, "docker pull did not begin:\n{}", pull.output);
        pull
    });

    outage.lock().unwrap().began = Some(Instant::now());
    {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || backend.stop(&cluster))
            .await
            .unwrap();
    }
    let (received, cut) = read_across.finish().await;
    let mut docker_push =
        with_docker.then(|| Running::spawn(common::docker(&["push", &docker_image])));
    let probe = tokio::spawn(probe_during_outage(
        cluster.clone(),
        base.clone(),
        outage.clone(),
        wrong.clone(),
    ));
    tokio::time::sleep(OUTAGE).await;
    {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || backend.start(&cluster))
            .await
            .unwrap();
    }
    let ended = Instant::now();
    outage.lock().unwrap().ended = Some(ended);
    let probed = probe.await.unwrap();
    tokio::time::sleep(RECOVERY).await;
    done.store(true, Ordering::SeqCst);
    let mut slowest = Duration::ZERO;
    for load in loads {
        slowest = slowest.max(load.await.unwrap());
    }
    if let Some(push) = docker_push.as_mut() {
        let output = finished_across(push, "docker push", backend);
        let digest = pushed_digest(&output);
        let through_other = format!("{}/outage/docker:1", cluster.node(2).host);
        let manifest = tokio::task::block_in_place(|| skopeo_pull_ok(&through_other));
        assert_eq!(common::digest_of(&manifest), digest);
    }
    if let Some(pull) = docker_pull.as_mut() {
        finished_across(pull, "docker pull", backend);
        // docker checked every layer against its digest; the image is the one pushed.
        assert_eq!(
            tokio::task::block_in_place(|| image_id(&pull_reference)),
            pull_image.config.digest
        );
    }

    let errors = std::mem::take(&mut *errors.lock().unwrap());
    let acknowledged = std::mem::take(&mut *acknowledged.lock().unwrap());
    let statuses = cluster.statuses();
    eprintln!(
        "{backend:?} away for {OUTAGE:?}: {} pushes acknowledged, {} failed requests of the \
         load, slowest push or pull {slowest:?}; probes during the outage {probed:?}; all \
         answers {statuses:?}",
        acknowledged.len(),
        errors.len()
    );
    let outage = std::mem::take(&mut *outage.lock().unwrap());
    let began = outage.began.unwrap();
    for (at, error) in errors.iter().take(8) {
        eprintln!(
            "  {:?} after the outage began: {error}",
            at.duration_since(began)
        );
    }
    let wrong = std::mem::take(&mut *wrong.lock().unwrap());
    assert!(
        wrong.is_empty(),
        "not a retryable answer during the outage: {wrong:#?}"
    );
    let unexcused: Vec<&String> = errors
        .iter()
        .filter(|(at, error)| !(outage.excuses(*at) && retryable(error)))
        .map(|(_, error)| error)
        .collect();
    assert!(
        unexcused.is_empty(),
        "failures that are not the outage's: {unexcused:#?}"
    );
    assert!(
        statuses
            .keys()
            .all(|status| *status < 500 || *status == 503),
        "server errors other than 503: {statuses:?}\n{}",
        cluster.logs()
    );
    if let Backend::ObjectStore = backend {
        assert!(
            probed.get(&503).copied().unwrap_or(0) > 0,
            "with the object store away no read failed: {probed:?}"
        );
    }

    // A blob being read when the backend went: every byte that came is the blob's own.
    // The database's going does not touch a read under way; the object store's cuts it
    // once its client's retries run out, and the node says so.
    assert!(
        across.bytes.starts_with(&received),
        "a blob read across the {backend:?} outage got other bytes than the blob's"
    );
    match backend {
        Backend::Database => assert_eq!(
            (received.len(), cut.as_deref()),
            (READ_ACROSS, None),
            "a blob read across the database outage"
        ),
        Backend::ObjectStore => {
            assert!(
                cut.as_deref().is_some_and(|e| e.contains("IncompleteBody")),
                "a blob read across the object store outage ended with {cut:?} after {} of \
                 {READ_ACROSS} bytes",
                received.len()
            );
            assert!(
                cluster
                    .node(2)
                    .log()
                    .contains("a blob read from the object store broke off"),
                "the node did not log the read it cut:\n{}",
                cluster.logs()
            );
        }
    }
    eprintln!(
        "a blob read across the {backend:?} outage: {} of {READ_ACROSS} bytes, {}",
        received.len(),
        cut.map_or("whole".to_owned(), |e| format!("cut: {e}"))
    );
    let after_recovery = acknowledged
        .iter()
        .filter(|a| a.at > outage.ended.unwrap() + RECOVERY / 2)
        .count();
    assert!(
        after_recovery > 0,
        "no push succeeded once the {backend:?} was back"
    );

    // Nothing acknowledged is lost or corrupt, through every node; each takes a push.
    let every = acknowledged
        .iter()
        .map(|a| (a.repo.as_str(), a.tag.as_str(), &a.image))
        .chain(
            base.iter()
                .map(|(repo, image)| (repo.as_str(), "base", image)),
        );
    for (repo, tag, image) in every {
        for (node, client) in clients.iter().enumerate() {
            match client.pull(repo, tag).await {
                Ok(Pulled::Whole { blobs, .. }) => assert_eq!(blobs, image.blobs().count()),
                other => panic!("{repo}:{tag} through node {node} after the outage: {other:?}"),
            }
        }
    }
    match clients[2].pull("outage/across", "1").await {
        Ok(Pulled::Whole { blobs, .. }) => assert_eq!(blobs, across_image.blobs().count()),
        other => panic!("the blob read across the outage, after it: {other:?}"),
    }
    for (node, client) in clients.iter().enumerate() {
        let image = Image::new(
            config_blob(&format!("after {node}")),
            vec![Blob::random(&mut rng, 64 * 1024)],
        );
        client
            .push_image("outage/after", &image, &format!("node{node}"))
            .await
            .unwrap_or_else(|e| panic!("push through node {node} after the outage: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_object_store_away_clients_get_retryable_errors_and_nothing_is_lost() {
    an_outage_of(Backend::ObjectStore).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_database_away_clients_get_retryable_errors_and_nothing_is_lost() {
    an_outage_of(Backend::Database).await;
}
