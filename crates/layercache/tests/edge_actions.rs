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

use common::cache_client::{Client, Protocol, client_ready, write_tree};

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

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

/// `saveCache(["deps"], key)` from `workspace` through `server`: the cache id (-1: not
/// saved) and the client's output.
fn save(
    protocol: Protocol,
    server: &common::Server,
    token: &str,
    workspace: &Path,
    key: &str,
) -> (i64, String) {
    Client::new(protocol, server, token).save(workspace, key, &["deps"], RUN)
}

/// `restoreCache(["deps"], primary, restore_keys)` through `server` into a fresh
/// workspace: the matched key, the restored files' digests and the client's output.
fn restore(
    protocol: Protocol,
    server: &common::Server,
    token: &str,
    primary: &str,
    restore_keys: &[&str],
) -> (Option<String>, BTreeMap<String, String>, String) {
    Client::new(protocol, server, token).restore_fresh(primary, restore_keys, &["deps"])
}

/// A workspace holding [`FILES`] of pseudo-random stream `seed`, and their digests.
fn workspace(seed: u64) -> (tempfile::TempDir, BTreeMap<String, String>) {
    let dir = tempfile::tempdir().unwrap();
    let digests = write_tree(dir.path(), seed, FILES);
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
    let (id, output) = save(protocol, &first, &token, work.path(), &key);
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
    let (matched, restored, output) = restore(protocol, &centre, &token, &key, &[]);
    assert_eq!(matched.as_deref(), Some(key.as_str()), "centre:\n{output}");
    assert_eq!(restored, digests, "centre:\n{output}");

    // Through a cold edge: filled from the centre.
    assert_eq!(metric(&metrics(&second), ENTRY_FILLS), 0);
    let started = Instant::now();
    let (matched, restored, output) = restore(protocol, &second, &token, &key, &[]);
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
    let (matched, restored, output) = restore(protocol, &second, &token, &key, &[]);
    assert_eq!(
        matched.as_deref(),
        Some(key.as_str()),
        "edge 2 alone:\n{output}"
    );
    assert_eq!(restored, digests, "edge 2 alone:\n{output}");
    let (matched, restored, output) = restore(protocol, &second, &token, "deps-other", &["deps-"]);
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
    let (id, output) = save(protocol, &edge, &token, work.path(), &key);
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
    let (matched, restored, output) = restore(protocol, &centre, &token, &key, &[]);
    assert_eq!(matched, None, "the failed save is at the centre:\n{output}");
    assert!(restored.is_empty());
    let (matched, restored, output) = restore(protocol, &edge, &token, &key, &[]);
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
