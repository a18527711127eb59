//! The GitHub Actions cache through edges in front of a central layercache, driven by
//! the official client (`@actions/cache`, `tests/actions-cache/cache.mjs`) over both
//! protocols. Centre and edges share one signing key, so the client's runtime token,
//! which an edge forwards, is good at the centre too.
//!
//! A save through one edge reaches the centre; a restore through a cold second edge is
//! filled from the centre (an entry fill in its `/metrics`) and, with the centre gone,
//! still restores from the edge's own disk. A save through an edge whose centre is down
//! fails visibly (the client warns), is not at the centre once it is back, and stays
//! restorable from the edge.
//!
//! The client comes from `npm ci` in `tests/actions-cache` (`scripts/setup-clients.sh`);
//! without it the tests are skipped, unless `REQUIRE_REAL_CLIENTS=1` or `CI=true`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::Digest as _;

/// The npm package holding the client and `cache.mjs`.
const CLIENT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/actions-cache");
/// The scope every token here reads and writes.
const MAIN: &str = "refs/heads/main";
const MIB: usize = 1 << 20;
/// The saved directory: one incompressible multi-MiB file and two small ones.
const FILES: &[(&str, usize)] = &[
    ("deps/big.bin", 24 * MIB),
    ("deps/nested/index.json", 700),
    ("deps/one", 1),
];
/// How long one run of the client may take (a v2 save retries a failed finalize for
/// about 25 s).
const RUN: Duration = Duration::from_secs(180);

/// Environment of the test process that must not reach the client.
const CLEARED_ENV: &[&str] = &[
    "ACTIONS_CACHE_URL",
    "ACTIONS_RESULTS_URL",
    "ACTIONS_CACHE_SERVICE_V2",
    "ACTIONS_CACHE_MODE",
    "ACTIONS_RUNTIME_TOKEN",
    "ACTIONS_STEP_DEBUG",
    "GITHUB_REF",
    "GITHUB_SERVER_URL",
    "GITHUB_WORKSPACE",
    "RUNNER_DEBUG",
    "RUNNER_TEMP",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
];

/// Whether the client is installed; if not, skip (or fail when real clients are required).
fn client_ready() -> bool {
    if !common::require_tool("node") || !common::require_tool("zstd") {
        return false;
    }
    let installed = Path::new(CLIENT_DIR)
        .join("node_modules/@actions/cache/package.json")
        .is_file();
    if !installed {
        let required = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
            || std::env::var("REQUIRE_REAL_CLIENTS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "@actions/cache is required but not installed in {CLIENT_DIR}"
        );
        eprintln!("SKIPPED: @actions/cache is not installed (npm ci in {CLIENT_DIR})");
    }
    installed
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    V1,
    V2,
}

/// `cache.mjs` against `server` with `token`, run as a job step would.
struct Client<'a> {
    protocol: Protocol,
    server: &'a common::Server,
    token: &'a str,
}

impl<'a> Client<'a> {
    fn new(protocol: Protocol, server: &'a common::Server, token: &'a str) -> Client<'a> {
        Client {
            protocol,
            server,
            token,
        }
    }

    /// `node cache.mjs args...` in `workspace`: the `result` it printed, and its output.
    fn run(&self, workspace: &Path, args: &[&str]) -> (Value, String) {
        let runner_temp = tempfile::tempdir().unwrap();
        let url = format!("{}/", self.server.url);
        let mut command = Command::new("node");
        command
            .arg(Path::new(CLIENT_DIR).join("cache.mjs"))
            .args(args)
            .current_dir(workspace);
        for var in CLEARED_ENV {
            command.env_remove(var);
        }
        command
            .env("RUNNER_TEMP", runner_temp.path())
            .env("GITHUB_WORKSPACE", workspace)
            .env("ACTIONS_RUNTIME_TOKEN", self.token);
        match self.protocol {
            Protocol::V1 => command.env("ACTIONS_CACHE_URL", &url),
            Protocol::V2 => command
                .env("ACTIONS_RESULTS_URL", &url)
                .env("ACTIONS_CACHE_SERVICE_V2", "true")
                .env("GITHUB_SERVER_URL", "https://github.com"),
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let read = |mut from: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = from.read_to_string(&mut text);
                text
            })
        };
        let stdout = read(Box::new(child.stdout.take().unwrap()));
        let stderr = read(Box::new(child.stderr.take().unwrap()));
        let deadline = Instant::now() + RUN;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("cache.mjs {args:?} took over {RUN:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let output = stdout.join().unwrap() + &stderr.join().unwrap();
        assert!(
            status.success(),
            "{:?} cache.mjs {args:?} failed ({status}):\n{output}",
            self.protocol
        );
        let line = output
            .lines()
            .rev()
            .find(|l| l.starts_with("{\"result\""))
            .unwrap_or_else(|| panic!("no result line in:\n{output}"));
        let parsed: Value = serde_json::from_str(line).unwrap();
        (parsed["result"].clone(), output)
    }

    /// `saveCache(["deps"], key)` from `workspace`: the cache id (-1: not saved) and the
    /// output.
    fn save(&self, workspace: &Path, key: &str) -> (i64, String) {
        let (result, output) = self.run(workspace, &["save", key, "deps"]);
        let id = result
            .as_i64()
            .unwrap_or_else(|| panic!("save result {result} is not a number:\n{output}"));
        (id, output)
    }

    /// `restoreCache(["deps"], primary, restore_keys)` into a fresh workspace: the
    /// matched key, the restored files' digests and the output.
    fn restore(
        &self,
        primary: &str,
        restore_keys: &[&str],
    ) -> (Option<String>, BTreeMap<String, String>, String) {
        let workspace = tempfile::tempdir().unwrap();
        let keys = if restore_keys.is_empty() {
            "-".to_owned()
        } else {
            restore_keys.join(",")
        };
        let (result, output) = self.run(workspace.path(), &["restore", primary, &keys, "deps"]);
        let matched = match result {
            Value::Null => None,
            Value::String(key) => Some(key),
            other => panic!("restore result {other} is neither a key nor null:\n{output}"),
        };
        (matched, tree_digests(workspace.path()), output)
    }
}

/// Every regular file under `dir`: its path relative to `dir` → `sha256` hex.
fn tree_digests(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, into: &mut BTreeMap<String, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, into);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                let relative = path.strip_prefix(root).unwrap().to_string_lossy();
                into.insert(
                    relative.into_owned(),
                    hex::encode(sha2::Sha256::digest(bytes)),
                );
            }
        }
    }
    let mut digests = BTreeMap::new();
    walk(dir, dir, &mut digests);
    digests
}

/// A workspace holding [`FILES`] of pseudo-random stream `seed`, and their digests.
fn workspace(seed: u64) -> (tempfile::TempDir, BTreeMap<String, String>) {
    let dir = tempfile::tempdir().unwrap();
    for (i, &(name, len)) in FILES.iter().enumerate() {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut file = std::fs::File::create(&path).unwrap();
        for chunk in common::chunks(seed * 100 + i as u64, len, 4 * MIB) {
            file.write_all(&chunk).unwrap();
        }
    }
    let digests = tree_digests(dir.path());
    (dir, digests)
}

/// A central layercache, the environment of an edge in front of it that shares its
/// signing key, and a token of that key that reads and writes [`MAIN`].
fn centre() -> (common::Server, Vec<(String, String)>, String) {
    let centre = common::Server::start();
    // Minting makes the key if the starting server has not yet (either way, one key).
    let key = centre.data_dir().join("actions.key");
    let token = common::mint_token(centre.data_dir(), &["--read", MAIN, "--write", MAIN]);
    assert!(key.is_file(), "no {}", key.display());
    let env = vec![
        ("LAYERCACHE_UPSTREAM".to_owned(), centre.url.clone()),
        (
            "LAYERCACHE_ACTIONS__KEY_FILE".to_owned(),
            key.to_str().unwrap().to_owned(),
        ),
    ];
    (centre, env, token)
}

fn edge(env: &[(String, String)]) -> common::Server {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    common::Server::start_with_env(&env)
}

/// `server`'s `/metrics`.
fn metrics(server: &common::Server) -> String {
    let url = server.at("/metrics");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let response = reqwest::get(url).await.unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    })
}

/// The value of the metric line starting with `name` (0 when absent).
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

const ENTRY_FILLS: &str = "layercache_upstream_fills_total{upstream=\"centre\",kind=\"entry\"}";
const ENTRY_HITS: &str = "layercache_upstream_hits_total{upstream=\"centre\",kind=\"entry\"}";
const BYTES: &str = "layercache_upstream_bytes_total{upstream=\"centre\"}";
const FAILURES: &str = "layercache_upstream_failures_total{upstream=\"centre\"}";

/// A save through edge 1 is at the centre; a cold edge 2 fills it from the centre, then
/// serves it from its own disk with the centre gone.
fn save_and_restore_through_edges(protocol: Protocol) {
    if !client_ready() {
        return;
    }
    let (centre, env, token) = centre();
    let first = edge(&env);
    let second = edge(&env);
    let key = format!("deps-{protocol:?}-1");

    let (work, digests) = workspace(1);
    let started = Instant::now();
    let (id, output) = Client::new(protocol, &first, &token).save(work.path(), &key);
    eprintln!(
        "{protocol:?} save through edge 1: id {id}, {:?}",
        started.elapsed()
    );
    assert!(id > 0, "{protocol:?} save through edge 1:\n{output}");
    assert!(
        !output.contains("::warning::") && !output.contains("::error::"),
        "{protocol:?} save through edge 1 warned:\n{output}"
    );

    // At the centre.
    let (matched, restored, output) = Client::new(protocol, &centre, &token).restore(&key, &[]);
    assert_eq!(matched.as_deref(), Some(key.as_str()), "centre:\n{output}");
    assert_eq!(restored, digests, "centre:\n{output}");

    // Through a cold edge: filled from the centre.
    assert_eq!(metric(&metrics(&second), ENTRY_FILLS), 0);
    let started = Instant::now();
    let (matched, restored, output) = Client::new(protocol, &second, &token).restore(&key, &[]);
    eprintln!(
        "{protocol:?} cold restore through edge 2: {:?}",
        started.elapsed()
    );
    assert_eq!(matched.as_deref(), Some(key.as_str()), "edge 2:\n{output}");
    assert_eq!(restored, digests, "edge 2:\n{output}");
    let text = metrics(&second);
    let (fills, bytes) = (metric(&text, ENTRY_FILLS), metric(&text, BYTES));
    eprintln!(
        "{protocol:?} edge 2 after the cold restore: {fills} entry fill(s), {bytes} bytes from the centre"
    );
    assert_eq!(fills, 1, "{text}");
    assert!(bytes >= (24 * MIB) as u64, "{text}");

    // The centre gone: served from edge 2's disk, by its key and by a restore key (the
    // centre, asked first for a restore key's match, cannot answer).
    drop(centre);
    let (matched, restored, output) = Client::new(protocol, &second, &token).restore(&key, &[]);
    assert_eq!(
        matched.as_deref(),
        Some(key.as_str()),
        "edge 2 alone:\n{output}"
    );
    assert_eq!(restored, digests, "edge 2 alone:\n{output}");
    let (matched, restored, output) =
        Client::new(protocol, &second, &token).restore("deps-other", &["deps-"]);
    assert_eq!(
        matched.as_deref(),
        Some(key.as_str()),
        "edge 2 alone:\n{output}"
    );
    assert_eq!(restored, digests, "edge 2 alone:\n{output}");
    let text = metrics(&second);
    let (fills, hits, failures) = (
        metric(&text, ENTRY_FILLS),
        metric(&text, ENTRY_HITS),
        metric(&text, FAILURES),
    );
    eprintln!(
        "{protocol:?} edge 2 with the centre gone: {fills} fill(s), {hits} hit(s), {failures} failure(s)"
    );
    assert_eq!(fills, 1, "{text}");
    assert!(hits >= 2, "{text}");
    assert!(failures >= 1, "{text}");
}

#[test]
fn v1_save_and_restore_through_edges() {
    save_and_restore_through_edges(Protocol::V1);
}

#[test]
fn v2_save_and_restore_through_edges() {
    save_and_restore_through_edges(Protocol::V2);
}

/// A save through an edge whose centre is down: the client warns (v2: no id; v1 reports
/// the id of its reservation all the same), the entry is not at the centre once it is
/// back, and the edge keeps its copy.
fn save_with_the_centre_down(protocol: Protocol) {
    if !client_ready() {
        return;
    }
    let (mut centre, env, token) = centre();
    let edge = edge(&env);
    let key = format!("deps-{protocol:?}-down");
    centre.kill();

    let (work, digests) = workspace(2);
    let started = Instant::now();
    let (id, output) = Client::new(protocol, &edge, &token).save(work.path(), &key);
    let warning = output
        .lines()
        .find(|l| l.starts_with("::warning::Failed to save"))
        .unwrap_or_else(|| panic!("{protocol:?}: no warning of the failed save:\n{output}"));
    eprintln!(
        "{protocol:?} save with the centre down: id {id} after {:?}, {warning}",
        started.elapsed()
    );
    match protocol {
        Protocol::V2 => {
            assert_eq!(id, -1, "{output}");
            assert!(warning.contains("central cache"), "{output}");
        }
        Protocol::V1 => assert!(warning.contains("502"), "{output}"),
    }

    centre.restart();
    let (matched, restored, output) = Client::new(protocol, &centre, &token).restore(&key, &[]);
    assert_eq!(matched, None, "the failed save is at the centre:\n{output}");
    assert!(restored.is_empty());
    let (matched, restored, output) = Client::new(protocol, &edge, &token).restore(&key, &[]);
    assert_eq!(matched.as_deref(), Some(key.as_str()), "edge:\n{output}");
    assert_eq!(restored, digests, "edge:\n{output}");
    assert!(metric(&metrics(&edge), FAILURES) >= 1);
}

#[test]
fn v1_save_with_the_centre_down() {
    save_with_the_centre_down(Protocol::V1);
}

#[test]
fn v2_save_with_the_centre_down() {
    save_with_the_centre_down(Protocol::V2);
}

/// At the protocol level (go-actions-cache's calls): the centre names the scope of its
/// match in a header; a local match of a restore key does not hide the centre's exact
/// match of a newer key (saved through another edge); four restores of it at once
/// through the edge fill it once, and all get its bytes.
#[tokio::test(flavor = "multi_thread")]
async fn an_edge_asks_past_a_partial_match_and_fills_once() {
    use common::actions::{Client, Entry, TWIRP, data, version};

    let (centre, env, token) = centre();
    let edge = edge(&env);
    let at_centre = Client::new(&centre.url, token.clone());
    let at_edge = Client::new(&edge.url, token.clone());

    let old = Entry::new("deps-old".into(), data(1, 3 * MIB));
    at_edge.v2_save(&old).await;
    at_centre.v2_restores(&old).await;
    let response = at_centre
        .http
        .post(centre.at(&format!("{TWIRP}GetCacheEntryDownloadURL")))
        .bearer_auth(&token)
        .json(&serde_json::json!({"key": "deps-old", "version": version()}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        common::actions::header(&response, "layercache-cache-scope").as_deref(),
        Some(MAIN)
    );

    let new = Entry::new("deps-new".into(), data(2, 5 * MIB));
    at_centre.v2_save(&new).await;
    let restores = (0..4).map(|_| async {
        let (url, matched) = at_edge.v2_hit("deps-new", &["deps-"]).await;
        (matched, at_edge.get_ok(&url).await)
    });
    for (matched, bytes) in futures::future::join_all(restores).await {
        assert_eq!(matched, "deps-new");
        assert!(bytes == new.bytes, "{} bytes restored", bytes.len());
    }
    let text = at_edge
        .http
        .get(edge.at("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let fills = metric(&text, ENTRY_FILLS);
    eprintln!(
        "four restores at once through the edge: {fills} fill(s), {} bytes from the centre",
        metric(&text, BYTES)
    );
    assert_eq!(fills, 1, "{text}");
}
