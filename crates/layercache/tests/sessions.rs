//! Build sessions seen from real clients: dockerd's BuildKit and `docker push`, and
//! skopeo. A warm rebuild's session shows its hits and the bytes it read, and `report`
//! and `expect` say so; a build that never reached the cache fails `expect`; a partial
//! rebuild's push writes exactly the blobs the registry did not have; every session's
//! counts agree with the server's own request log. `expect` judges the cache repository
//! by what the build did there (judged against the builder's CACHED markers), says where
//! its writes went, and does not count `explain`'s reads; BuildKit's cache export,
//! replayed, checks its own tag as a push probe, not a lookup.
//!
//! dockerd is one shared daemon and `docker builder prune` wipes all of its build cache,
//! so the tests that use it take [`daemon`] first.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{expect, layercache};
use serde_json::{Value, json};
use server::sessions::Session;

/// The Debian docker.io client: newer clients without buildx refuse `DOCKER_BUILDKIT=1`.
const DOCKER: &str = "/usr/bin/docker";

/// A short idle gap, so that builds a few seconds apart are separate sessions.
const IDLE_GAP: (&str, &str) = ("LAYERCACHE_SERVER__SESSIONS__IDLE_GAP", "2s");

/// Four steps, four layers; only the last depends on `last.txt`. The `RUN` writes
/// random bytes, so a step that runs again cannot produce the same layer.
const DOCKERFILE: &str = r#"FROM scratch
COPY nonce /nonce
COPY busybox /bin/busybox
SHELL ["/bin/busybox", "sh", "-c"]
RUN /bin/busybox mkdir -p /data && /bin/busybox dd if=/dev/urandom of=/data/a.bin bs=1M count=6
COPY last.txt /last.txt
"#;

static DAEMON: Mutex<()> = Mutex::new(());

/// Exclusive use of dockerd within this test binary.
fn daemon() -> Option<MutexGuard<'static, ()>> {
    if !common::require_tool(DOCKER) {
        return None;
    }
    let guard = DAEMON.lock().unwrap_or_else(|p| p.into_inner());
    let (ok, info) = common::run(&mut common::docker(&["info"]));
    assert!(
        ok,
        "dockerd is not answering (scripts/setup-clients.sh starts it):\n{info}"
    );
    Some(guard)
}

/// A build context of [`DOCKERFILE`] whose last step copies `last`.
fn context(server: &common::Server, last: &str) -> tempfile::TempDir {
    let context = common::busybox_context(server, "Dockerfile", DOCKERFILE);
    std::fs::write(context.path().join("last.txt"), last).unwrap();
    context
}

/// The build steps of `output` and how each ended; checks there is one per instruction.
fn steps(output: &str) -> BTreeMap<String, String> {
    let steps = common::step_outcomes(output);
    let instructions = DOCKERFILE
        .lines()
        .filter(|l| l.starts_with("RUN ") || l.starts_with("COPY "))
        .count();
    assert_eq!(steps.len(), instructions, "steps: {steps:#?}\n{output}");
    steps
}

/// Remove `tags` and all build cache from the daemon; check that the tags are gone.
fn wipe(tags: &[&str]) {
    let (pruned, out) = common::run(&mut common::docker(&["builder", "prune", "-af"]));
    assert!(pruned, "docker builder prune failed:\n{out}");
    for tag in tags {
        common::run(&mut common::docker(&["image", "rm", "-f", tag]));
    }
    let images = common::run_ok(&mut common::docker(&[
        "images",
        "--format",
        "{{.Repository}}:{{.Tag}}",
    ]));
    for tag in tags {
        assert!(
            !images.lines().any(|l| l == *tag),
            "{tag} survived the wipe:\n{images}"
        );
    }
}

/// Leaves the daemon without this test's images and build cache, also on failure.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        common::run(&mut common::docker(&["builder", "prune", "-af"]));
        for tag in &self.0 {
            common::run(&mut common::docker(&["image", "rm", "-f", tag]));
        }
    }
}

/// Cold build of `tag` with the inline cache on a wiped daemon (every step runs), then
/// `docker push`.
fn cold_build_and_push(context: &Path, tag: &str) {
    wipe(&[tag]);
    let cold = common::docker_build(context, tag, true, None);
    for (step, end) in steps(&cold) {
        assert!(
            end.starts_with("DONE"),
            "cold build: {step} ended {end}\n{cold}"
        );
    }
    common::run_ok(&mut common::docker(&["push", tag]));
}

/// Warm rebuild of `tag` on a wiped daemon, importing its inline cache: every step
/// CACHED.
fn warm_rebuild(context: &Path, tag: &str) {
    wipe(&[tag]);
    let warm = common::docker_build(context, tag, true, Some(tag));
    assert!(
        warm.contains(&format!("importing cache manifest from {tag}")),
        "{warm}"
    );
    let ran: Vec<_> = steps(&warm)
        .into_iter()
        .filter(|(_, end)| end != "CACHED")
        .collect();
    assert!(ran.is_empty(), "steps not CACHED: {ran:#?}\n{warm}");
}

/// Seconds since the epoch, now.
fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// `GET /api/v1/sessions?since=&repo=`.
fn api_sessions(server: &common::Server, since: i64, repo: &str) -> Vec<Session> {
    block_on(async {
        let response = reqwest::Client::new()
            .get(server.at("/api/v1/sessions"))
            .query(&[("since", since.to_string()), ("repo", repo.to_owned())])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    })
}

/// Wait past the idle gap until every session of `repo` is closed, so that the next
/// requests start new sessions. (Waiting for the gap alone is not enough: the server
/// closes idle sessions only on its save tick, and a request before it joins the old
/// session.)
fn settle(server: &common::Server, repo: &str) {
    std::thread::sleep(Duration::from_millis(2100));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let open: Vec<String> = api_sessions(server, 0, repo)
            .into_iter()
            .filter(|s| s.open)
            .map(|s| s.id)
            .collect();
        if open.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sessions {open:?} of {repo} stay open"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn warm_rebuild_session_shows_hits_and_bytes_served() {
    let Some(_daemon) = daemon() else { return };
    let server = common::Server::start_with_env(&[IDLE_GAP]);
    let context = context(&server, "v1");
    let tag = format!("{}/cache/app:v1", server.host);
    let _cleanup = Cleanup(vec![tag.clone()]);

    cold_build_and_push(context.path(), &tag);
    settle(&server, "cache/app");
    let warm_started = SystemTime::now();
    let warm_since = now_secs();
    warm_rebuild(context.path(), &tag);
    settle(&server, "cache/app");

    // The table has a row per session: the push, and the warm build.
    let out = layercache(&[
        "report",
        "--server",
        &server.url,
        "--repo",
        "cache/app",
        "--since",
        "10m",
    ]);
    let table = text(&out.stdout);
    assert!(out.status.success(), "{table}{}", text(&out.stderr));
    eprint!("{table}");
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default();
    assert!(
        header.starts_with("SESSION") && header.contains("HITS"),
        "{table}"
    );
    let rows: Vec<&str> = lines.collect();
    assert!(rows.len() >= 2, "{table}");
    assert!(rows.iter().all(|r| r.contains("cache/app")), "{table}");

    let out = layercache(&[
        "report",
        "--server",
        &server.url,
        "--repo",
        "cache/app",
        "--since",
        "10m",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let sessions: Vec<Session> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)));
    assert_eq!(sessions.len(), rows.len(), "{table}");
    let (warm, before): (Vec<&Session>, Vec<&Session>) = sessions
        .iter()
        .partition(|s| s.started_ms >= warm_since * 1000);
    assert!(!warm.is_empty(), "no session after the wipe: {sessions:#?}");
    assert!(
        before.iter().all(|s| s.ended_ms < warm_since * 1000),
        "a session spans the wipe: {sessions:#?}"
    );
    let pushed: u64 = before.iter().map(|s| s.counts.manifests_written).sum();
    assert!(pushed >= 1, "the push wrote no manifest: {before:#?}");
    let hits: u64 = warm.iter().map(|s| s.counts.manifest_hits).sum();
    let served: u64 = warm.iter().map(|s| s.counts.bytes_served).sum();
    assert!(hits > 0, "the warm build hit no manifest: {warm:#?}");
    assert!(served > 0, "the warm build read no bytes: {warm:#?}");
    assert!(
        warm.iter().any(|s| s.tags.contains("cache/app:v1")),
        "the warm build did not read the tag: {warm:#?}"
    );
    for session in &warm {
        assert_eq!(
            session.counts.blobs_written + session.counts.manifests_written,
            0
        );
        let name = session.name.as_deref().unwrap_or(&session.id);
        assert!(rows.iter().any(|r| r.starts_with(name)), "{name}:\n{table}");
    }

    // The warm build read the cache and wrote nothing.
    let since = humantime::format_rfc3339_seconds(warm_started).to_string();
    let expect = |what: &str| expect(&server, "cache/app", &since, &[what]);
    let out = expect("--reads");
    assert!(
        out.status.success(),
        "expect --reads failed:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("cache/app since"), "{out:?}");
    let out = expect("--writes");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("no cache writes for cache/app since"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn dropped_cache_flags_fail_expect() {
    let Some(_daemon) = daemon() else { return };
    let server = common::Server::start_with_env(&[IDLE_GAP]);
    let since = now_secs();

    // Another build's push in the same window does not count for this repository.
    block_on(async {
        let blob = b"a layer of cache/kept".to_vec();
        let digest = common::digest_of(&blob);
        let r = reqwest::Client::new()
            .post(server.at(&format!("/v2/cache/kept/blobs/uploads/?digest={digest}")))
            .body(blob)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    });

    // The CI step lost --cache-from and the push: the build never reaches the cache.
    let context = context(&server, "dropped");
    let tag = format!("{}/cache/dropped:v1", server.host);
    let _cleanup = Cleanup(vec![tag.clone()]);
    common::docker_build(context.path(), &tag, false, None);

    let since = since.to_string();
    let expect = |repo: &str, what: &[&str]| expect(&server, repo, &since, what);
    let out = expect("cache/dropped", &["--reads", "--writes"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains("no cache reads or writes for cache/dropped since"),
        "{stderr}"
    );
    assert!(
        stderr.contains("check that --cache-to / --cache-from reached the builder"),
        "{stderr}"
    );

    let out = expect("cache/kept", &["--writes"]);
    assert!(out.status.success(), "{out:?}");
}

/// The manifest of `repo:tag` (a plain client, in a session of its own).
fn manifest(server: &common::Server, repo: &str, tag: &str) -> Value {
    block_on(async {
        let response = reqwest::Client::new()
            .get(server.at(&format!("/v2/{repo}/manifests/{tag}")))
            .header(
                "accept",
                "application/vnd.docker.distribution.manifest.v2+json, \
                 application/vnd.oci.image.manifest.v1+json",
            )
            .header("x-layercache-session", "probe")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{repo}:{tag}");
        response.json().await.unwrap()
    })
}

/// Config and layer blobs of a manifest: digest → size.
fn blobs_of(manifest: &Value) -> BTreeMap<String, u64> {
    let layers = manifest["layers"].as_array().expect("an image manifest");
    std::iter::once(&manifest["config"])
        .chain(layers)
        .map(|d| {
            (
                d["digest"].as_str().unwrap().to_owned(),
                d["size"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn partial_rebuild_writes_exactly_the_new_blobs() {
    let Some(_daemon) = daemon() else { return };
    let server = common::Server::start_with_env(&[IDLE_GAP]);
    let context = context(&server, "first");
    let v1 = format!("{}/cache/app:v1", server.host);
    let v2 = format!("{}/cache/app:v2", server.host);
    let _cleanup = Cleanup(vec![v1.clone(), v2.clone()]);

    cold_build_and_push(context.path(), &v1);
    settle(&server, "cache/app");

    // Only the last step's input changes: the steps before it come from v1's cache.
    wipe(&[&v1]);
    std::fs::write(context.path().join("last.txt"), "second").unwrap();
    let rebuilt = common::docker_build(context.path(), &v2, true, Some(&v1));
    for (step, end) in steps(&rebuilt) {
        if step.contains("last.txt") {
            assert!(end.starts_with("DONE"), "{step} ended {end}\n{rebuilt}");
        } else {
            assert_eq!(end, "CACHED", "{step}\n{rebuilt}");
        }
    }
    settle(&server, "cache/app");
    let push_since = now_secs();
    common::run_ok(&mut common::docker(&["push", &v2]));
    settle(&server, "cache/app");

    let old = blobs_of(&manifest(&server, "cache/app", "v1"));
    let new = blobs_of(&manifest(&server, "cache/app", "v2"));
    let added: BTreeMap<&String, u64> = new
        .iter()
        .filter(|(d, _)| !old.contains_key(*d))
        .map(|(d, s)| (d, *s))
        .collect();
    let shared: BTreeSet<&String> = new.keys().filter(|d| old.contains_key(*d)).collect();
    // The config and the last layer changed; the three layers before it did not.
    assert_eq!(added.len(), 2, "v1 {old:#?}\nv2 {new:#?}");
    assert_eq!(shared.len(), 3, "v1 {old:#?}\nv2 {new:#?}");

    let sessions = api_sessions(&server, push_since, "cache/app");
    let pushes: Vec<&Session> = sessions
        .iter()
        .filter(|s| s.name.as_deref() != Some("probe"))
        .collect();
    assert_eq!(pushes.len(), 1, "one push session: {sessions:#?}");
    let push = pushes[0];
    eprintln!(
        "push of v2 ({}): written {:?}, avoided {:?}, {} present, {} absent",
        push.user_agent,
        push.written,
        push.avoided,
        push.counts.blobs_present,
        push.counts.blobs_absent
    );
    assert_eq!(push.counts.manifests_written, 1, "{push:#?}");
    assert!(push.tags.contains("cache/app:v2"), "{push:#?}");
    let written: BTreeSet<&String> = push.written.iter().collect();
    assert_eq!(
        written,
        added.keys().copied().collect(),
        "written: {push:#?}"
    );
    assert_eq!(push.counts.blobs_written, added.len() as u64, "{push:#?}");
    assert_eq!(
        push.counts.bytes_written,
        added.values().sum::<u64>(),
        "{push:#?}"
    );
    for layer in &shared {
        assert!(
            push.avoided.contains(*layer),
            "{layer} not avoided: {push:#?}"
        );
        assert!(!push.written.contains(*layer), "{layer} written: {push:#?}");
    }
    assert!(
        push.counts.bytes_avoided >= shared.iter().map(|d| new[*d]).sum::<u64>(),
        "{push:#?}"
    );
}

/// One `served` line of the server's log.
#[derive(Debug)]
struct Served {
    method: String,
    path: String,
    status: u16,
    session: Option<String>,
}

/// The `served` lines of `log`:
/// `… request{id=3 method=GET path=/v2/… endpoint="…" session="…"}: …: served status=200 …`.
fn served(log: &str) -> Vec<Served> {
    log.lines()
        .filter(|l| l.contains(": served "))
        .map(|line| {
            let fields = line
                .split_once("request{")
                .and_then(|(_, rest)| rest.split_once("}: "))
                .unwrap_or_else(|| panic!("no request span in {line:?}"))
                .0;
            let field = |name: &str| {
                fields.split(' ').find_map(|f| {
                    f.strip_prefix(name)
                        .and_then(|v| v.strip_prefix('='))
                        .map(|v| v.trim_matches('"').to_owned())
                })
            };
            let status = line
                .split_once(": served ")
                .unwrap()
                .1
                .split(' ')
                .find_map(|f| f.strip_prefix("status="))
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("no status in {line:?}"));
            Served {
                method: field("method").unwrap_or_else(|| panic!("no method in {line:?}")),
                path: field("path").unwrap_or_else(|| panic!("no path in {line:?}")),
                status,
                session: field("session"),
            }
        })
        .collect()
}

/// What a session's counters should be, tallied from log lines.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    requests: u64,
    manifests_found: u64,
    manifest_misses: u64,
    manifests_written: u64,
    blobs_present: u64,
    blobs_absent: u64,
    blobs_served: u64,
    bytes_served: u64,
    blobs_written: u64,
    bytes_avoided: u64,
    errors: u64,
}

impl Tally {
    /// The counts `s` reports for `repo`.
    fn of(s: &Session, repo: &str) -> Tally {
        let c = s.counts_in(repo);
        Tally {
            requests: c.requests,
            // The log tells found from absent only: with or without cache metadata.
            manifests_found: c.manifest_hits + c.no_cache_lookups,
            manifest_misses: c.manifest_misses,
            manifests_written: c.manifests_written,
            blobs_present: c.blobs_present,
            blobs_absent: c.blobs_absent,
            blobs_served: c.blobs_served,
            bytes_served: c.bytes_served,
            blobs_written: c.blobs_written,
            bytes_avoided: c.bytes_avoided,
            errors: c.errors,
        }
    }

    fn add(&mut self, other: &Tally) {
        self.requests += other.requests;
        self.manifests_found += other.manifests_found;
        self.manifest_misses += other.manifest_misses;
        self.manifests_written += other.manifests_written;
        self.blobs_present += other.blobs_present;
        self.blobs_absent += other.blobs_absent;
        self.blobs_served += other.blobs_served;
        self.bytes_served += other.bytes_served;
        self.blobs_written += other.blobs_written;
        self.bytes_avoided += other.bytes_avoided;
        self.errors += other.errors;
    }
}

/// The size of a stored blob, from the data directory.
fn stored_size(data_dir: &Path, digest: &str) -> u64 {
    let hex = digest.strip_prefix("sha256:").unwrap();
    let path: PathBuf = data_dir.join("blobs/sha256").join(&hex[..2]).join(hex);
    std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .len()
}

/// The repository a `/v2/` path is in, if any.
fn repo_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    ["/manifests/", "/blobs/", "/tags/list", "/referrers/"]
        .iter()
        .filter_map(|marker| rest.find(marker))
        .min()
        .map(|end| &rest[..end])
}

/// Tally the log lines for `repo` per session (`None`: lines without a session).
fn tally_log(lines: &[Served], repo: &str, data_dir: &Path) -> BTreeMap<Option<String>, Tally> {
    let mut tallies: BTreeMap<Option<String>, Tally> = BTreeMap::new();
    let manifests = format!("/v2/{repo}/manifests/");
    let uploads = format!("/v2/{repo}/blobs/uploads");
    let blobs = format!("/v2/{repo}/blobs/");
    for line in lines {
        let path = line.path.as_str();
        if repo_of(path) != Some(repo) {
            continue;
        }
        let t = tallies.entry(line.session.clone()).or_default();
        t.requests += 1;
        let (method, status) = (line.method.as_str(), line.status);
        let mut error = status >= 400;
        if path.starts_with(&manifests) {
            match (method, status) {
                ("GET" | "HEAD", 200) => t.manifests_found += 1,
                ("GET" | "HEAD", 404) => {
                    t.manifest_misses += 1;
                    error = false;
                }
                ("PUT", 201) => t.manifests_written += 1,
                _ => {}
            }
        } else if path.starts_with(&uploads) {
            if matches!((method, status), ("POST" | "PUT", 201)) {
                t.blobs_written += 1;
            }
        } else if let Some(digest) = path.strip_prefix(&blobs) {
            match (method, status) {
                ("HEAD", 200) => {
                    t.blobs_present += 1;
                    t.bytes_avoided += stored_size(data_dir, digest);
                }
                ("HEAD", 404) => {
                    t.blobs_absent += 1;
                    error = false;
                }
                ("GET", 200) => {
                    t.blobs_served += 1;
                    t.bytes_served += stored_size(data_dir, digest);
                }
                ("GET", 206) => panic!("a range request; the log does not say its length"),
                _ => {}
            }
        }
        if error {
            t.errors += 1;
        }
    }
    tallies
}

/// The log lines from byte `from` on.
fn served_since(server: &common::Server, from: usize) -> Vec<Served> {
    served(&server.log()[from..])
}

/// The sessions the API reports for `repo` since `since` agree, one by one and summed,
/// with the log's lines for `repo`.
fn assert_sessions_match_log(
    server: &common::Server,
    repo: &str,
    since: i64,
    lines: &[Served],
) -> Vec<Session> {
    let from_log = tally_log(lines, repo, server.data_dir());
    assert!(
        !from_log.contains_key(&None),
        "requests to {repo} in no session: {lines:#?}"
    );
    let sessions = api_sessions(server, since, repo);
    let from_api: BTreeMap<Option<String>, Tally> = sessions
        .iter()
        .map(|s| (Some(s.id.clone()), Tally::of(s, repo)))
        .collect();
    assert_eq!(from_api, from_log, "{repo}: API (left) vs log (right)");
    let (mut api_sum, mut log_sum) = (Tally::default(), Tally::default());
    from_api.values().for_each(|t| api_sum.add(t));
    from_log.values().for_each(|t| log_sum.add(t));
    assert_eq!(api_sum, log_sum);
    eprintln!("{repo}: {} session(s), {log_sum:#?}", sessions.len());
    sessions
}

/// An OCI layout at `dir` holding one image, tagged `v1`, of three small tar layers;
/// the digests of its config and layers.
fn oci_layout(dir: &Path) -> BTreeSet<String> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let add = |bytes: &[u8]| {
        let digest = common::digest_of(bytes);
        std::fs::write(blobs.join(&digest[7..]), bytes).unwrap();
        json!({ "digest": digest, "size": bytes.len() })
    };
    let layers: Vec<Value> = [(1u64, 300 << 10), (2, 1 << 20), (3, 5000)]
        .into_iter()
        .map(|(seed, len)| {
            let mut tar = common::tar_header(&format!("file{seed}"), len as u64).to_vec();
            tar.extend(common::chunks(seed, len, 1 << 16).flatten());
            tar.resize(tar.len().div_ceil(512) * 512 + 1024, 0);
            let mut layer = add(&tar);
            layer["mediaType"] = json!("application/vnd.oci.image.layer.v1.tar");
            layer
        })
        .collect();
    let diff_ids: Vec<&Value> = layers.iter().map(|l| &l["digest"]).collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .unwrap();
    let mut config = add(&config);
    config["mediaType"] = json!("application/vnd.oci.image.config.v1+json");
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": layers,
    }))
    .unwrap();
    let mut descriptor = add(&manifest);
    descriptor["mediaType"] = json!("application/vnd.oci.image.manifest.v1+json");
    descriptor["annotations"] = json!({ "org.opencontainers.image.ref.name": "v1" });
    let index = json!({ "schemaVersion": 2, "manifests": [descriptor] });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::iter::once(&config)
        .chain(&layers)
        .map(|d| d["digest"].as_str().unwrap().to_owned())
        .collect()
}

fn skopeo(args: &[&str]) -> Command {
    let mut command = Command::new("skopeo");
    command.args(args);
    command
}

#[test]
fn session_counts_agree_with_the_request_log() {
    if !common::require_tool("skopeo") {
        return;
    }
    let server = common::Server::start_logged(&[IDLE_GAP]);
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let pushed = oci_layout(&layout);
    let image = |tag: &str| format!("docker://{}/counted/app:{tag}", server.host);

    // skopeo: a copy in (blobs absent, uploaded); then, in a session of its own (the
    // server does not count a session's re-check of a blob it uploaded itself as
    // present), a lookup of a tag that is not there and a copy in under another tag
    // (blobs present); then a copy out (blobs served), whose manifest fetch after those
    // writes starts the next job's session.
    let from = server.log().len();
    let since = now_secs();
    let copy_in = ["copy", "--preserve-digests", "--dest-tls-verify=false"];
    let src = format!("oci:{}:v1", layout.display());
    common::run_ok(skopeo(&copy_in).args([src.as_str(), &image("v1")]));
    settle(&server, "counted/app");
    let (found, out) = common::run(&mut skopeo(&[
        "inspect",
        "--tls-verify=false",
        &image("missing"),
    ]));
    assert!(!found, "{out}");
    common::run_ok(skopeo(&copy_in).args([src.as_str(), &image("v2")]));
    let back = tmp.path().join("back");
    common::run_ok(
        skopeo(&["copy", "--src-tls-verify=false"])
            .arg(image("v1"))
            .arg(format!("dir:{}", back.display())),
    );
    settle(&server, "counted/app");
    let lines = served_since(&server, from);
    let sessions = assert_sessions_match_log(&server, "counted/app", since, &lines);
    assert_eq!(sessions.len(), 3, "{sessions:#?}");
    let (third, second, first) = (&sessions[0], &sessions[1], &sessions[2]);
    let written: BTreeSet<String> = first.written.iter().cloned().collect();
    assert_eq!(written, pushed, "{first:#?}");
    assert_eq!(first.counts.manifests_written, 1, "{first:#?}");
    assert!(second.written.is_empty(), "{second:#?}");
    assert_eq!(second.counts.manifests_written, 1, "{second:#?}");
    assert!(second.counts.manifest_misses >= 1, "{second:#?}");
    let avoided: BTreeSet<String> = second.avoided.iter().cloned().collect();
    assert_eq!(avoided, pushed, "{second:#?}");
    assert_eq!(third.counts.writes(), 0, "{third:#?}");
    assert!(
        third.counts.blobs_served >= pushed.len() as u64,
        "{third:#?}"
    );

    // BuildKit: the warm rebuild's reads.
    let Some(_daemon) = daemon() else { return };
    let context = context(&server, "counted");
    let tag = format!("{}/cache/app:v1", server.host);
    let _cleanup = Cleanup(vec![tag.clone()]);
    cold_build_and_push(context.path(), &tag);
    settle(&server, "cache/app");
    let from = server.log().len();
    let since = now_secs();
    warm_rebuild(context.path(), &tag);
    settle(&server, "cache/app");
    let lines = served_since(&server, from);
    let sessions = assert_sessions_match_log(&server, "cache/app", since, &lines);
    let total = |f: fn(&Session) -> u64| sessions.iter().map(f).sum::<u64>();
    assert!(total(|s| s.counts.manifest_hits) > 0, "{sessions:#?}");
    assert!(total(|s| s.counts.blobs_served) > 0, "{sessions:#?}");
}

/// A request after the idle gap starts a new session even when it comes before the
/// server's next save tick.
#[test]
fn a_request_after_the_idle_gap_starts_a_new_session() {
    let server = common::Server::start_with_env(&[IDLE_GAP]);
    let since = now_secs();
    let tries = 4;
    block_on(async {
        let client = reqwest::Client::new();
        for i in 0..tries {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(2300)).await;
            }
            let r = client
                .head(server.at(&format!("/v2/gap/app/manifests/t{i}")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 404);
        }
    });
    let sessions = api_sessions(&server, since, "gap/app");
    let requests: Vec<u64> = sessions.iter().map(|s| s.counts.requests).collect();
    assert_eq!(requests, vec![1; tries], "{sessions:#?}");
}

/// Filtering sessions by repository finds a repository's session even when more than
/// a thousand other sessions were saved after it.
#[test]
fn a_repository_filter_sees_past_a_thousand_other_sessions() {
    let server = common::Server::start_with_env(&[IDLE_GAP]);
    let since = now_secs();
    block_on(async {
        let client = reqwest::Client::new();
        let head = |repo: &str, session: String| {
            client
                .head(server.at(&format!("/v2/{repo}/manifests/v1")))
                .header("x-layercache-session", session)
                .send()
        };
        assert_eq!(
            head("wanted/app", "build".into()).await.unwrap().status(),
            404
        );
        // Later sessions end in later seconds.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        for i in 0..=server::sessions::MAX_SESSIONS {
            let r = head("other/app", format!("other-{i}")).await.unwrap();
            assert_eq!(r.status(), 404);
        }
    });
    // Wait until they are closed: saved, and no longer open.
    settle(&server, "other/app");
    let wanted = api_sessions(&server, since, "wanted/app");
    assert_eq!(wanted.len(), 1, "the session of wanted/app is lost");
}

/// With `ask_credentials`, a client without credentials is challenged, and after
/// `docker login -u run-1234` (any password) every request of the build, BuildKit's
/// included, lands in the session named `run-1234`.
#[test]
fn docker_login_names_the_build_session() {
    let Some(_daemon) = daemon() else { return };
    let server = common::Server::start_with_env(&[
        IDLE_GAP,
        ("LAYERCACHE_SERVER__SESSIONS__ASK_CREDENTIALS", "true"),
    ]);
    let challenge = block_on(async {
        reqwest::Client::new()
            .get(server.at("/v2/named/app/manifests/v1"))
            .send()
            .await
            .unwrap()
    });
    assert_eq!(challenge.status(), 401);
    assert_eq!(
        challenge.headers()["www-authenticate"],
        "Basic realm=\"layercache\""
    );
    let tag = format!("{}/named/app:v1", server.host);
    let _cleanup = Cleanup(vec![tag.clone()]);
    let _login = Login::new(&server, "run-1234");
    let since = now_secs();
    let context = context(&server, "named");
    cold_build_and_push(context.path(), &tag);
    warm_rebuild(context.path(), &tag);
    settle(&server, "named/app");
    let sessions = api_sessions(&server, since, "named/app");
    let names: BTreeSet<Option<&str>> = sessions.iter().map(|s| s.name.as_deref()).collect();
    assert_eq!(names, BTreeSet::from([Some("run-1234")]), "{sessions:#?}");
    let total = |f: fn(&Session) -> u64| sessions.iter().map(f).sum::<u64>();
    assert!(total(|s| s.counts.blobs_written) > 0, "{sessions:#?}");
    assert!(total(|s| s.counts.manifest_hits) > 0, "{sessions:#?}");
    assert!(total(|s| s.counts.bytes_served) > 0, "{sessions:#?}");
}

/// `docker login` to the server as `user` for as long as it lives.
struct Login(String);

impl Login {
    fn new(server: &common::Server, user: &str) -> Login {
        let out = common::run_ok(&mut common::docker(&[
            "login",
            "-u",
            user,
            "-p",
            "any",
            &server.host,
        ]));
        assert!(out.contains("Login Succeeded"), "{out}");
        Login(server.host.clone())
    }
}

impl Drop for Login {
    fn drop(&mut self) {
        common::run(&mut common::docker(&["logout", &self.0]));
    }
}

/// One named build reads the cache repository and pushes its image to another: the
/// gate judges the cache repository alone (the image push is no lookup of it), says
/// where the writes went when the cache got none, and layercache's own `explain`
/// reads count for no build.
#[test]
fn the_gate_judges_the_cache_repository_by_what_the_build_did_there() {
    let Some(_daemon) = daemon() else { return };
    let server = common::Server::start_with_env(&[
        IDLE_GAP,
        ("LAYERCACHE_SERVER__SESSIONS__ASK_CREDENTIALS", "true"),
    ]);
    let cache = format!("{}/cache/gate:v1", server.host);
    let image = format!("{}/gate/app:v2", server.host);
    let _cleanup = Cleanup(vec![cache.clone(), image.clone()]);
    let _login = Login::new(&server, "run-gate");
    let context = context(&server, "gate");
    cold_build_and_push(context.path(), &cache);
    settle(&server, "cache/gate");

    // The warm build: every step CACHED from the cache image (whose layers dockerd
    // pulls for the output), the output pushed to another repository.
    let since = now_secs().to_string();
    wipe(&[&cache, &image]);
    let warm = common::docker_build(context.path(), &image, true, Some(&cache));
    let ran: Vec<_> = steps(&warm)
        .into_iter()
        .filter(|(_, end)| end != "CACHED")
        .collect();
    assert!(ran.is_empty(), "steps not CACHED: {ran:#?}\n{warm}");
    common::run_ok(&mut common::docker(&["push", &image]));
    settle(&server, "gate/app");
    let sessions = api_sessions(&server, since.parse().unwrap(), "gate/app");
    assert_eq!(sessions.len(), 1, "{sessions:#?}");
    let build = &sessions[0];
    assert!(build.repositories.contains("cache/gate"), "{build:#?}");
    let read = build.counts_in("cache/gate");
    assert!(read.hits() > 0, "{build:#?}");
    assert_eq!(read.misses(), 0, "{build:#?}");
    let pushed = build.counts_in("gate/app");
    assert_eq!(pushed.manifests_written, 1, "{build:#?}");
    eprintln!(
        "warm build: cache/gate {read:?}; gate/app {pushed:?}; missed {:?}",
        build.missed
    );

    let expect = |since: &str, checks: &[&str]| expect(&server, "cache/gate", since, checks);
    let out = expect(&since, &["--reads", "--min-hit-ratio", "0.9"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // It exported no cache: the failure says where its writes went.
    let out = expect(&since, &["--writes"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = text(&out.stderr);
    assert!(
        said.contains("no cache writes for cache/gate since")
            && said.contains("gate/app: 1 manifest(s)"),
        "{said}"
    );
    // Without a check there is nothing to judge.
    let out = expect(&since, &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        text(&out.stderr).contains("--reads"),
        "{}",
        text(&out.stderr)
    );

    // explain (given the cache as pasted from a build command) reads the cache image
    // whole; no build did, so the gate still fails.
    settle(&server, "gate/app");
    let later = now_secs().to_string();
    let pasted = format!("type=registry,ref={cache},mode=max");
    let out = layercache(&["explain", "--cache-from", &pasted]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = expect(&later, &["--reads"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "explain counted as a read: {out:?}"
    );
    assert!(
        text(&out.stderr).contains("nothing reached layercache since"),
        "{}",
        text(&out.stderr)
    );
}

/// BuildKit's registry cache export and import, replayed request by request as
/// `shared/traces/buildkit.md` records them (its pusher checks the tag with a `HEAD`
/// before the `PUT`; its import resolves the tag, then fetches by digest). Returns the
/// cache manifest's digest.
async fn replay_export(
    client: &reqwest::Client,
    server: &common::Server,
    session: Option<&str>,
    import: Option<&str>,
) -> String {
    const REPO: &str = "cache/replay";
    const WIDE: &str = "application/vnd.docker.distribution.manifest.v2+json, \
        application/vnd.docker.distribution.manifest.list.v2+json, \
        application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json,*/*";
    const NARROW: &str = "application/vnd.oci.image.manifest.v1+json,*/*";
    let send = |request: reqwest::RequestBuilder| async move {
        let request = request.header("user-agent", "buildkit/v0.11");
        match session {
            Some(name) => request.header("x-layercache-session", name),
            None => request,
        }
        .send()
        .await
        .unwrap()
    };
    let by = session.unwrap_or("an unnamed build");
    let manifests = |r: &str| server.at(&format!("/v2/{REPO}/manifests/{r}"));
    if let Some(digest) = import {
        let r = send(client.head(manifests("buildcache")).header("accept", WIDE)).await;
        assert_eq!(r.status(), 200);
        let r = send(client.get(manifests(digest)).header("accept", NARROW)).await;
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        let config = body["config"]["digest"].as_str().unwrap().to_owned();
        let r = send(client.get(server.at(&format!("/v2/{REPO}/blobs/{config}")))).await;
        assert_eq!(r.status(), 200);
    }
    let layer = format!("a layer exported by {by} {import:?}").into_bytes();
    let config =
        format!("{{\"layers\":[],\"records\":[],\"by\":\"{by} {import:?}\"}}").into_bytes();
    for blob in [&layer, &config] {
        let digest = common::digest_of(blob);
        let r = send(client.head(server.at(&format!("/v2/{REPO}/blobs/{digest}")))).await;
        assert_eq!(r.status(), 404);
        let r = send(
            client
                .post(server.at(&format!("/v2/{REPO}/blobs/uploads/?digest={digest}")))
                .body(blob.clone()),
        )
        .await;
        assert_eq!(r.status(), 201);
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.buildkit.cacheconfig.v0",
            "digest": common::digest_of(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": common::digest_of(&layer),
            "size": layer.len(),
        }],
    })
    .to_string();
    let r = send(
        client
            .head(manifests("buildcache"))
            .header("accept", NARROW),
    )
    .await;
    assert_eq!(r.status(), if import.is_some() { 200 } else { 404 });
    let r = send(
        client
            .put(manifests("buildcache"))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(manifest.clone()),
    )
    .await;
    assert_eq!(r.status(), 201);
    common::digest_of(manifest.as_bytes())
}

/// A cache export's check of its own tag is a push probe: the cold export has no
/// lookups at all, the warm one (which imported the cache first) only hits.
#[test]
fn a_cache_export_checking_its_own_tag_is_no_lookup() {
    let server = common::Server::start_with_env(&[IDLE_GAP]);
    let client = reqwest::Client::new();
    let since = now_secs().to_string();
    let digest = block_on(replay_export(&client, &server, Some("cold"), None));
    block_on(replay_export(&client, &server, Some("warm"), Some(&digest)));
    let sessions = api_sessions(&server, 0, "cache/replay");
    let by_name = |name: &str| {
        sessions
            .iter()
            .find(|s| s.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no session {name}: {sessions:#?}"))
            .counts
            .clone()
    };
    let (cold, warm) = (by_name("cold"), by_name("warm"));
    assert_eq!(
        (cold.hits(), cold.misses(), cold.push_probes),
        (0, 0, 1),
        "{cold:?}"
    );
    assert_eq!(
        (warm.hits(), warm.misses(), warm.push_probes),
        (2, 0, 1),
        "{warm:?}"
    );
    let expect = |session: &str, checks: &[&str]| {
        let checks = [&["--session", session], checks].concat();
        expect(&server, "cache/replay", &since, &checks)
    };
    let out = expect("warm", &["--reads", "--min-hit-ratio", "0.9"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("0 miss(es), 1 cache import(s), 1 push probe(s)"),
        "{out:?}"
    );
    let out = expect("cold", &["--reads"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = expect("cold", &["--writes"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // The same two builds unnamed, back to back, on the default idle gap: two sessions,
    // split where the second imports, with the same counts.
    let server = common::Server::start();
    let digest = block_on(replay_export(&client, &server, None, None));
    block_on(replay_export(&client, &server, None, Some(&digest)));
    let mut sessions = api_sessions(&server, 0, "cache/replay");
    sessions.sort_by_key(|s| s.started_ms);
    let counts: Vec<(u64, u64, u64, u64)> = sessions
        .iter()
        .map(|s| {
            let c = &s.counts;
            (c.hits(), c.misses(), c.push_probes, c.cache_imports)
        })
        .collect();
    assert_eq!(counts, [(0, 0, 1, 0), (2, 0, 1, 1)], "{sessions:#?}");
}

/// The staged-jobs failure: job 1 pushes a prebuild image without cache metadata, job 2
/// (on a wiped builder) imports it and runs every step again. The gate fails naming the
/// image and the fix; report and `explain --session` name the useless import first.
#[test]
fn an_import_without_cache_metadata_fails_the_reads_gate() {
    let Some(_daemon) = daemon() else { return };
    let server = common::Server::start();
    let prebuild = format!("{}/s5/prebuild:v1", server.host);
    let image = format!("{}/s5/app:v1", server.host);
    let _cleanup = Cleanup(vec![prebuild.clone(), image.clone()]);
    let context = context(&server, "staged");

    // Job 1: the prebuild image, pushed without its cache.
    wipe(&[&prebuild, &image]);
    common::docker_build(context.path(), &prebuild, false, None);
    common::run_ok(&mut common::docker(&["push", &prebuild]));

    // Job 2, right after, from the same runner: nothing CACHED.
    let since = now_secs().to_string();
    wipe(&[&prebuild]);
    let job2 = common::docker_build(context.path(), &image, false, Some(&prebuild));
    let cached: Vec<_> = steps(&job2)
        .into_iter()
        .filter(|(_, end)| end == "CACHED")
        .collect();
    assert!(cached.is_empty(), "steps CACHED: {cached:#?}\n{job2}");
    common::run_ok(&mut common::docker(&["push", &image]));

    let out = expect(&server, "s5/prebuild", &since, &["--reads"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = text(&out.stderr);
    assert!(
        said.contains("no cache reads for s5/prebuild")
            && said.contains("imported s5/prebuild:v1")
            && said.contains(&format!("push {prebuild} with its cache"))
            && said.contains("BUILDKIT_INLINE_CACHE=1"),
        "{said}"
    );
    let out = expect(&server, "s5/prebuild", &since, &["--min-hit-ratio", "0.5"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    // Job 2's session: its import and its push, and nothing of job 1.
    let sessions = api_sessions(&server, 0, "s5/prebuild");
    let job2 = sessions
        .iter()
        .find(|s| s.no_cache_images.iter().any(|i| i == "s5/prebuild:v1"))
        .unwrap_or_else(|| panic!("no session imported s5/prebuild:v1: {sessions:#?}"));
    assert_eq!(job2.counts.reads(), 0, "{job2:#?}");
    assert_eq!(job2.counts_in("s5/app").manifests_written, 1, "{job2:#?}");
    assert_eq!(job2.counts_in("s5/prebuild").writes(), 0, "{job2:#?}");

    let report = layercache(&["report", "--server", &server.url, "--since", "10m"]);
    let report = text(&report.stdout);
    assert!(
        report.contains(&format!(
            "{}: useless import: it looked up s5/prebuild:v1",
            job2.id
        )),
        "{report}"
    );
    let out = layercache(&["explain", "--session", &job2.id, "--server", &server.url]);
    let explained = text(&out.stdout);
    let first = explained
        .lines()
        .find(|l| !l.is_empty() && !l.starts_with("Build session"));
    assert_eq!(
        first,
        Some("Imported, but without cache metadata (1): the build obtained no cache at all"),
        "{explained}"
    );
    assert!(
        explained.contains(&format!("{prebuild} is an image without cache metadata"))
            && explained.contains("--build-arg BUILDKIT_INLINE_CACHE=1"),
        "{explained}"
    );
}

/// Two builds run back to back from one runner, unnamed, on the default idle gap: each
/// is one session (its cache import and its push together), split where the second
/// build imports the first one's cache.
#[test]
fn two_back_to_back_unnamed_builds_are_two_sessions() {
    let Some(_daemon) = daemon() else { return };
    let server = common::Server::start();
    let first = format!("{}/pair/app:v1", server.host);
    let second = format!("{}/pair/app:v2", server.host);
    let _cleanup = Cleanup(vec![first.clone(), second.clone()]);
    let context = context(&server, "pair");

    cold_build_and_push(context.path(), &first);
    wipe(&[&first]);
    let warm = common::docker_build(context.path(), &second, true, Some(&first));
    let ran: Vec<_> = steps(&warm)
        .into_iter()
        .filter(|(_, end)| end != "CACHED")
        .collect();
    assert!(ran.is_empty(), "steps not CACHED: {ran:#?}\n{warm}");
    common::run_ok(&mut common::docker(&["push", &second]));

    let mut sessions = api_sessions(&server, 0, "pair/app");
    sessions.sort_by_key(|s| s.started_ms);
    assert_eq!(sessions.len(), 2, "{sessions:#?}");
    let (one, two) = (&sessions[0], &sessions[1]);
    assert!(!one.open, "{one:#?}");
    assert_eq!(
        (one.counts.reads(), one.counts.manifests_written),
        (0, 1),
        "{one:#?}"
    );
    assert!(one.tags.contains("pair/app:v1") && !one.tags.contains("pair/app:v2"));
    // The second build's import (dockerd's BuildKit) and its push (dockerd) together.
    assert_eq!(two.counts.cache_imports, 1, "{two:#?}");
    assert_eq!(two.counts.manifests_written, 1, "{two:#?}");
    assert!(two.tags.contains("pair/app:v2"), "{two:#?}");
    assert!(two.user_agents.len() >= 2, "{:?}", two.user_agents);
    assert!(two.started_ms >= one.ended_ms, "{sessions:#?}");
}
