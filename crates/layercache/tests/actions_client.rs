//! The GitHub Actions cache client, `@actions/cache` 6.3.0 from npm (driven by
//! `tests/actions-cache/cache.mjs`), against layercache over both of its protocols: the
//! legacy REST API (v1, `ACTIONS_CACHE_URL`) and twirp with Azure Blob uploads (v2,
//! `ACTIONS_RESULTS_URL` + `ACTIONS_CACHE_SERVICE_V2`).
//!
//! A 512 MiB directory saves and restores byte for byte; restore keys pick the newest
//! entry by prefix; another path list is another version, so a miss; entries are
//! immutable; a pull request's token writes only its own scope and reads main's; a
//! read-only token cannot write; a bad token is refused; and a server killed in the
//! middle of a block upload either lets the client's retries finish the save or leaves a
//! clean miss that a new save fills. Saves and restores show up in the build sessions.
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

use common::cache_client::{
    Client, Protocol, Running, SMALL_RUN, client_ready, result_of, tree_digests, write_tree,
};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

const MIB: usize = 1 << 20;

/// The large directory every big test saves: incompressible, in several files, 512 MiB
/// and a bit (so that the v2 archive is well over the client's 128 MiB single-shot limit
/// and goes up as Put Block + Put Block List).
const PAYLOAD_FILES: &[(&str, usize)] = &[
    ("a.bin", 192 * MIB),
    ("b.bin", 160 * MIB),
    ("sub/c.bin", 100 * MIB),
    ("sub/deeper/d.bin", 60 * MIB),
    ("e.txt", 4097),
];

/// The default branch's scope.
const MAIN: &str = "refs/heads/main";

/// A pull request's scope.
const PR: &str = "refs/pull/7/merge";

/// How long one run of a big save or restore may take.
const BIG_RUN: Duration = Duration::from_secs(300);

/// A server on a data directory this test owns.
struct Cache {
    /// Declared before `_dir`: killed before its directory goes.
    server: common::Server,
    _dir: tempfile::TempDir,
}

impl Cache {
    fn start() -> Cache {
        Cache::start_with_env(&[])
    }

    fn start_with_env(env: &[(&str, &str)]) -> Cache {
        Cache::start_in(tempfile::tempdir().unwrap(), env)
    }

    /// A server with its data directory in `dir`.
    fn start_in(dir: tempfile::TempDir, env: &[(&str, &str)]) -> Cache {
        let server =
            common::Server::start_on_with_env(&dir.path().join("data"), "127.0.0.1:0", env);
        Cache { server, _dir: dir }
    }

    /// `layercache token --data-dir <the server's> args...`.
    fn token(&self, args: &[&str]) -> String {
        common::mint_token(self.server.data_dir(), args)
    }

    /// A token of a push to main: reads and writes main's scope.
    fn main_token(&self) -> String {
        self.token(&["--read", MAIN, "--write", MAIN])
    }

    /// A client of `protocol` with `token`.
    fn client<'a>(&self, protocol: Protocol, token: &'a str) -> Client<'a> {
        Client {
            protocol,
            url: format!("{}/", self.server.url),
            token,
        }
    }
}

/// A workspace holding a small directory `name` of pseudo-random files from `seed`; its
/// digests (relative to the workspace).
fn small_workspace(name: &str, seed: u64) -> (tempfile::TempDir, BTreeMap<String, String>) {
    let workspace = tempfile::tempdir().unwrap();
    let files = [
        (format!("{name}/lib.bin"), 48 * 1024),
        (format!("{name}/nested/index.json"), 700),
        (format!("{name}/one"), 1),
    ];
    let files: Vec<(&str, usize)> = files.iter().map(|(n, l)| (n.as_str(), *l)).collect();
    let digests = write_tree(workspace.path(), seed, &files);
    (workspace, digests)
}

/// The shared large directory: `payload/` in a workspace, and its digests.
struct Payload {
    workspace: PathBuf,
    digests: BTreeMap<String, String>,
}

/// The large directory, written once per test process (under the target's temporary
/// directory, named by process id; directories of processes that are gone are removed).
fn payload() -> &'static Payload {
    static PAYLOAD: OnceLock<Payload> = OnceLock::new();
    PAYLOAD.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let prefix = "actions-client-payload-";
        if let Ok(entries) = std::fs::read_dir(tmp) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(pid) = name.strip_prefix(prefix) else {
                    continue;
                };
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let workspace = tmp.join(format!("{prefix}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&workspace);
        let files: Vec<(String, usize)> = PAYLOAD_FILES
            .iter()
            .map(|&(name, len)| (format!("payload/{name}"), len))
            .collect();
        let files: Vec<(&str, usize)> = files.iter().map(|(n, l)| (n.as_str(), *l)).collect();
        let started = Instant::now();
        let digests = write_tree(&workspace, 42, &files);
        eprintln!(
            "wrote the {} MiB payload in {:?}",
            payload_len() / MIB,
            started.elapsed()
        );
        Payload { workspace, digests }
    })
}

/// The payload's size in bytes.
fn payload_len() -> usize {
    PAYLOAD_FILES.iter().map(|&(_, len)| len).sum()
}

/// Big saves and restores one at a time (two cores; each one is CPU and disk bound).
fn big() -> MutexGuard<'static, ()> {
    static BIG: Mutex<()> = Mutex::new(());
    BIG.lock().unwrap_or_else(|p| p.into_inner())
}

/// Restore `key` (exact) of the payload into a fresh workspace and check every byte.
fn assert_payload_restores(client: &Client<'_>, key: &str) {
    let payload = payload();
    let workspace = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (matched, output) = client.restore(workspace.path(), key, &[], &["payload"], BIG_RUN);
    eprintln!(
        "{:?} restore of {key}: {:?}",
        client.protocol,
        started.elapsed()
    );
    assert_eq!(
        matched.as_deref(),
        Some(key),
        "{:?} restore of {key}:\n{output}",
        client.protocol
    );
    let restored = tree_digests(workspace.path());
    assert_eq!(
        restored, payload.digests,
        "{:?} restore of {key} differs from what was saved:\n{output}",
        client.protocol
    );
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// `GET /api/v1/sessions`.
fn sessions(server: &common::Server) -> Vec<Value> {
    block_on(async {
        let response = reqwest::Client::new()
            .get(server.at("/api/v1/sessions"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    })
}

/// The session named `name` shows the entry written and hit, and at least `bytes` each
/// way.
fn assert_session_shows_round_trip(server: &common::Server, name: &str, bytes: u64) {
    let count = |s: &Value, field: &str| s[field].as_u64().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let all = sessions(server);
        let found = all.iter().any(|s| {
            s["name"].as_str() == Some(name)
                && count(s, "entry_hits") >= 1
                && count(s, "entries_written") >= 1
                && count(s, "bytes_written") >= bytes
                && count(s, "bytes_served") >= bytes
        });
        if found {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no session named {name} with entry_hits >= 1, entries_written >= 1, \
             bytes_written and bytes_served >= {bytes}: {}",
            serde_json::to_string_pretty(&all).unwrap()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

// --- a. A 512 MiB directory round trip --------------------------------------------

/// A 512 MiB directory of several incompressible files saves (a positive id) and
/// restores into a clean workspace byte for byte, under its exact key; the build
/// session named by the token shows the entry written and hit.
fn large_directory_round_trip(protocol: Protocol) {
    if !client_ready() {
        return;
    }
    let payload = payload();
    let _big = big();
    let cache = Cache::start();
    let session = format!("round-trip-{protocol:?}").to_lowercase();
    let token = cache.token(&["--read", MAIN, "--write", MAIN, "--session", &session]);
    let client = cache.client(protocol, &token);
    let key = format!("large-{protocol:?}");

    let started = Instant::now();
    let (id, output) = client.save(&payload.workspace, &key, &["payload"], BIG_RUN);
    eprintln!("{protocol:?} save of {key}: {:?}", started.elapsed());
    assert!(
        id > 0,
        "{protocol:?} save of {key} failed (id {id}):\n{output}"
    );
    assert!(
        !output.contains("::warning::") && !output.contains("::error::"),
        "{protocol:?} save of {key} warned:\n{output}"
    );
    if protocol == Protocol::V2 {
        // Over 128 MiB: the Azure SDK stages blocks and commits a block list.
        assert!(output.contains("::debug::BlobClient:"), "{output}");
    }

    assert_payload_restores(&client, &key);
    assert_session_shows_round_trip(&cache.server, &session, (512 * MIB) as u64);
}

#[test]
fn v1_large_directory_round_trip() {
    large_directory_round_trip(Protocol::V1);
}

#[test]
fn v2_large_directory_round_trip() {
    large_directory_round_trip(Protocol::V2);
}

// --- b. Restore keys ------------------------------------------------------------------

/// With no entry under the primary key, a restore key matches by prefix and the newest
/// entry wins; an exact primary key still beats a newer entry.
fn restore_key_prefix_picks_newest(protocol: Protocol) {
    if !client_ready() {
        return;
    }
    let cache = Cache::start();
    let token = cache.main_token();
    let client = cache.client(protocol, &token);

    let (older, older_digests) = small_workspace("deps", 1);
    client.save_ok(older.path(), "deps-a", &["deps"]);
    std::thread::sleep(Duration::from_millis(1500));
    let (newer, newer_digests) = small_workspace("deps", 2);
    client.save_ok(newer.path(), "deps-b", &["deps"]);
    assert_ne!(older_digests, newer_digests);

    let (matched, restored, output) = client.restore_fresh("deps-zzz", &["deps-"], &["deps"]);
    assert_eq!(
        matched.as_deref(),
        Some("deps-b"),
        "{protocol:?}:\n{output}"
    );
    assert_eq!(restored, newer_digests, "{protocol:?}:\n{output}");

    let (matched, restored, output) = client.restore_fresh("deps-a", &["deps-"], &["deps"]);
    assert_eq!(
        matched.as_deref(),
        Some("deps-a"),
        "{protocol:?}:\n{output}"
    );
    assert_eq!(restored, older_digests, "{protocol:?}:\n{output}");
}

#[test]
fn v1_restore_key_prefix_picks_newest() {
    restore_key_prefix_picks_newest(Protocol::V1);
}

#[test]
fn v2_restore_key_prefix_picks_newest() {
    restore_key_prefix_picks_newest(Protocol::V2);
}

/// A key differing only in case is the same key, as on GitHub: it restores the entry
/// (named as saved), and saving under it is refused like a second save.
fn a_key_in_another_case_is_the_same_key(protocol: Protocol) {
    if !client_ready() {
        return;
    }
    let cache = Cache::start();
    let token = cache.main_token();
    let client = cache.client(protocol, &token);
    let (workspace, digests) = small_workspace("deps", 7);
    client.save_ok(workspace.path(), "Linux-deps-2", &["deps"]);

    let (matched, restored, output) = client.restore_fresh("linux-deps-2", &[], &["deps"]);
    assert_eq!(
        matched.as_deref(),
        Some("Linux-deps-2"),
        "{protocol:?}:\n{output}"
    );
    assert_eq!(restored, digests, "{protocol:?}:\n{output}");
    let (matched, _, output) = client.restore_fresh("none", &["LINUX-"], &["deps"]);
    assert_eq!(
        matched.as_deref(),
        Some("Linux-deps-2"),
        "{protocol:?}:\n{output}"
    );
    let (id, output) = client.save(workspace.path(), "linux-deps-2", &["deps"], SMALL_RUN);
    assert_eq!(
        id, -1,
        "{protocol:?} a save in another case was accepted:\n{output}"
    );
}

#[test]
fn v1_a_key_in_another_case_is_the_same_key() {
    a_key_in_another_case_is_the_same_key(Protocol::V1);
}

#[test]
fn v2_a_key_in_another_case_is_the_same_key() {
    a_key_in_another_case_is_the_same_key(Protocol::V2);
}

// --- c. Versions ----------------------------------------------------------------------

/// The version covers the path list: a restore of the same key with another path list
/// misses, and a save of the same key with another path list is another entry.
fn version_mismatch_is_a_miss(protocol: Protocol) {
    if !client_ready() {
        return;
    }
    let cache = Cache::start();
    let token = cache.main_token();
    let client = cache.client(protocol, &token);
    let (workspace, digests) = small_workspace("src", 3);
    client.save_ok(workspace.path(), "build-1", &["src"]);

    let (matched, restored, output) = client.restore_fresh("build-1", &[], &["src", "extra"]);
    assert_eq!(matched, None, "{protocol:?} other path list:\n{output}");
    assert!(restored.is_empty(), "{protocol:?}: {restored:?}");

    let (matched, restored, output) = client.restore_fresh("build-1", &[], &["src"]);
    assert_eq!(
        matched.as_deref(),
        Some("build-1"),
        "{protocol:?}:\n{output}"
    );
    assert_eq!(restored, digests, "{protocol:?}:\n{output}");

    // Same key, another version: not a conflict.
    let (other, other_digests) = small_workspace("src", 4);
    client.save_ok(other.path(), "build-1", &["src", "extra"]);
    let (matched, restored, output) = client.restore_fresh("build-1", &[], &["src", "extra"]);
    assert_eq!(
        matched.as_deref(),
        Some("build-1"),
        "{protocol:?}:\n{output}"
    );
    assert_eq!(restored, other_digests, "{protocol:?}:\n{output}");
    let (_, restored, output) = client.restore_fresh("build-1", &[], &["src"]);
    assert_eq!(restored, digests, "{protocol:?}:\n{output}");
}

#[test]
fn v1_version_mismatch_is_a_miss() {
    version_mismatch_is_a_miss(Protocol::V1);
}

#[test]
fn v2_version_mismatch_is_a_miss() {
    version_mismatch_is_a_miss(Protocol::V2);
}

// --- d. Immutability ------------------------------------------------------------------

/// A second save of the same key and version is refused (-1, "another job may be
/// creating this cache") and the first content is still what restores.
fn second_save_is_refused(protocol: Protocol) {
    if !client_ready() {
        return;
    }
    let cache = Cache::start();
    let token = cache.main_token();
    let client = cache.client(protocol, &token);
    let (first, first_digests) = small_workspace("out", 5);
    client.save_ok(first.path(), "immutable", &["out"]);

    let (second, _) = small_workspace("out", 6);
    let (id, output) = client.save(second.path(), "immutable", &["out"], SMALL_RUN);
    assert_eq!(id, -1, "{protocol:?} second save was accepted:\n{output}");
    assert!(
        output.contains("another job may be creating this cache"),
        "{protocol:?}:\n{output}"
    );

    let (matched, restored, output) = client.restore_fresh("immutable", &[], &["out"]);
    assert_eq!(
        matched.as_deref(),
        Some("immutable"),
        "{protocol:?}:\n{output}"
    );
    assert_eq!(restored, first_digests, "{protocol:?}:\n{output}");
}

#[test]
fn v1_second_save_is_refused() {
    second_save_is_refused(Protocol::V1);
}

#[test]
fn v2_second_save_is_refused() {
    second_save_is_refused(Protocol::V2);
}

// --- e. Scopes ------------------------------------------------------------------------

/// A pull request's token reads main's entries but writes only its own scope, so it
/// cannot poison main; a read-only token cannot write at all.
fn pull_request_cannot_poison_main(protocol: Protocol) {
    if !client_ready() {
        return;
    }
    let cache = Cache::start();
    let main = cache.main_token();
    let pr = cache.token(&["--read", MAIN, "--write", PR]);
    let read_only = cache.token(&["--read", MAIN]);
    let main_client = cache.client(protocol, &main);
    let pr_client = cache.client(protocol, &pr);
    let read_only_client = cache.client(protocol, &read_only);

    let (main_ws, main_digests) = small_workspace("deps", 7);
    main_client.save_ok(main_ws.path(), "deps-lock", &["deps"]);

    // The pull request's scope is empty: it reads main's entry.
    let (matched, restored, output) = pr_client.restore_fresh("deps-lock", &[], &["deps"]);
    assert_eq!(
        matched.as_deref(),
        Some("deps-lock"),
        "{protocol:?} PR:\n{output}"
    );
    assert_eq!(restored, main_digests, "{protocol:?} PR:\n{output}");

    // Its save of the same key lands in its own scope.
    let (pr_ws, pr_digests) = small_workspace("deps", 8);
    pr_client.save_ok(pr_ws.path(), "deps-lock", &["deps"]);

    let (matched, restored, output) = main_client.restore_fresh("deps-lock", &[], &["deps"]);
    assert_eq!(
        matched.as_deref(),
        Some("deps-lock"),
        "{protocol:?} main:\n{output}"
    );
    assert_eq!(
        restored, main_digests,
        "{protocol:?}: the pull request's save replaced main's entry:\n{output}"
    );
    let (matched, restored, output) = pr_client.restore_fresh("deps-lock", &[], &["deps"]);
    assert_eq!(
        matched.as_deref(),
        Some("deps-lock"),
        "{protocol:?} PR:\n{output}"
    );
    assert_eq!(
        restored, pr_digests,
        "{protocol:?}: the pull request reads its own scope first:\n{output}"
    );

    // Read-only: refused with the denial the client knows, nothing stored.
    let (ro_ws, _) = small_workspace("deps", 9);
    for key in ["deps-readonly", "deps-lock"] {
        let (id, output) = read_only_client.save(ro_ws.path(), key, &["deps"], SMALL_RUN);
        assert_eq!(id, -1, "{protocol:?} read-only save of {key}:\n{output}");
        assert!(
            output
                .lines()
                .any(|l| l.starts_with("::warning::") && l.contains("cache write denied")),
            "{protocol:?} read-only save of {key}: no `cache write denied` warning:\n{output}"
        );
    }
    let (matched, _, output) = main_client.restore_fresh("deps-readonly", &[], &["deps"]);
    assert_eq!(
        matched, None,
        "{protocol:?} read-only save stored something:\n{output}"
    );
    let (matched, _, output) = pr_client.restore_fresh("deps-readonly", &[], &["deps"]);
    assert_eq!(
        matched, None,
        "{protocol:?} read-only save stored something:\n{output}"
    );
    let (_, restored, output) = main_client.restore_fresh("deps-lock", &[], &["deps"]);
    assert_eq!(restored, main_digests, "{protocol:?}:\n{output}");
    // The read-only token still reads.
    let (matched, restored, output) = read_only_client.restore_fresh("deps-lock", &[], &["deps"]);
    assert_eq!(
        matched.as_deref(),
        Some("deps-lock"),
        "{protocol:?}:\n{output}"
    );
    assert_eq!(restored, main_digests, "{protocol:?}:\n{output}");
}

#[test]
fn v1_pull_request_cannot_poison_main() {
    pull_request_cannot_poison_main(Protocol::V1);
}

#[test]
fn v2_pull_request_cannot_poison_main() {
    pull_request_cannot_poison_main(Protocol::V2);
}

// --- f. Bad tokens --------------------------------------------------------------------

/// A token that is not a JWT, or is signed with another server's key, neither saves
/// (-1, nothing stored) nor restores (a miss, even of an entry that exists).
fn bad_token_is_refused(protocol: Protocol) {
    if !client_ready() {
        return;
    }
    let cache = Cache::start();
    let good = cache.main_token();
    let good_client = cache.client(protocol, &good);
    let (workspace, _) = small_workspace("deps", 10);
    good_client.save_ok(workspace.path(), "present", &["deps"]);

    let elsewhere = tempfile::tempdir().unwrap();
    let foreign = common::mint_token(elsewhere.path(), &["--read", MAIN, "--write", MAIN]);
    assert_ne!(foreign, good);
    for (what, token) in [
        ("garbage", "garbage.not-a.jwt"),
        ("foreign", foreign.as_str()),
    ] {
        let bad_client = cache.client(protocol, token);
        let key = format!("bad-{what}");
        let (id, output) = bad_client.save(workspace.path(), &key, &["deps"], SMALL_RUN);
        assert_eq!(id, -1, "{protocol:?} save with a {what} token:\n{output}");
        let (matched, restored, output) = bad_client.restore_fresh(&key, &[], &["deps"]);
        assert_eq!(matched, None, "{protocol:?} {what} token:\n{output}");
        assert!(restored.is_empty());
        let (matched, restored, output) = bad_client.restore_fresh("present", &[], &["deps"]);
        assert_eq!(
            matched, None,
            "{protocol:?} restore with a {what} token:\n{output}"
        );
        assert!(restored.is_empty());
        assert!(
            output.contains("401"),
            "{protocol:?} restore with a {what} token: no 401 in:\n{output}"
        );
        let (matched, _, output) = good_client.restore_fresh(&key, &[], &["deps"]);
        assert_eq!(
            matched, None,
            "{protocol:?} the save with a {what} token stored something:\n{output}"
        );
    }
}

#[test]
fn v1_bad_token_is_refused() {
    bad_token_is_refused(Protocol::V1);
}

#[test]
fn v2_bad_token_is_refused() {
    bad_token_is_refused(Protocol::V2);
}

// --- g. A crash in the middle of a block upload -----------------------------------------

/// Total size of the files under `dir`.
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_size(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The server is SIGKILLed while the v2 client stages the blocks of a 512 MiB archive,
/// and restarted on the same address and data directory. The client's retries either
/// finish the save, and the entry restores byte for byte; or the save fails, a restore
/// is a clean miss, and a new save of the key succeeds and restores. Never a corrupt
/// restore.
#[test]
fn v2_server_killed_during_block_upload() {
    if !client_ready() {
        return;
    }
    let payload = payload();
    let _big = big();
    let mut cache = Cache::start();
    let token = cache.main_token();
    let key = "killed-mid-upload";

    let started = Instant::now();
    let (outcome, output) = {
        let client = cache.client(Protocol::V2, &token);
        let runner_temp = tempfile::tempdir().unwrap();
        let mut running = Running::spawn(client.command(
            &payload.workspace,
            runner_temp.path(),
            &["save", key, "payload"],
        ));
        // Logged just before `BlockBlobClient.uploadFile`: the archive is built.
        assert!(
            running.wait_for("::debug::BlobClient:", BIG_RUN),
            "the upload never started:\n{}",
            running.output
        );
        // Kill once the server has taken in some of the blocks (or soon anyway).
        let data_dir = cache.server.data_dir().to_owned();
        let before = dir_size(&data_dir);
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut grown = 0;
        while Instant::now() < deadline {
            grown = dir_size(&data_dir).saturating_sub(before);
            if grown >= (48 * MIB) as u64 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        running.drain(Duration::ZERO);
        // Whether the kill came too late to cut into the upload (a valid run all the same).
        let uploaded = running.output.contains("(100.0%)")
            || running.output.contains("FinalizeCacheEntryUpload");
        cache.server.restart();
        eprintln!(
            "killed the server {:?} into the save, {} MiB into the data directory{}",
            started.elapsed(),
            grown / MIB as u64,
            if uploaded {
                " (too late: the upload was done)"
            } else {
                ", mid-upload"
            }
        );
        let (status, output) = running.finish(BIG_RUN);
        assert!(
            status.success(),
            "cache.mjs save failed ({status}):\n{output}"
        );
        (result_of(&output), output)
    };
    let id = outcome
        .as_i64()
        .unwrap_or_else(|| panic!("save result {outcome} is not a number:\n{output}"));
    eprintln!(
        "the save across the restart returned {id} after {:?}; its output:\n{output}",
        started.elapsed()
    );

    let client = cache.client(Protocol::V2, &token);
    if id > 0 {
        assert_payload_restores(&client, key);
        return;
    }
    assert_eq!(id, -1, "{output}");
    let workspace = tempfile::tempdir().unwrap();
    let (matched, restore_output) =
        client.restore(workspace.path(), key, &[], &["payload"], BIG_RUN);
    assert_eq!(
        matched, None,
        "the failed save left an entry:\n{output}\nrestore:\n{restore_output}"
    );
    assert!(
        tree_digests(workspace.path()).is_empty(),
        "a miss restored files:\n{restore_output}"
    );
    let (id, again) = client.save(&payload.workspace, key, &["payload"], BIG_RUN);
    assert!(
        id > 0,
        "a new save after the failed one was refused (id {id}):\n{again}\nthe failed save:\n{output}"
    );
    assert_payload_restores(&client, key);
}

// --- Restores of one entry read the disk about once --------------------------------

/// Bytes the server process has read from storage devices (`/proc/PID/io`): what it read
/// from the disk, not what the page cache served.
fn disk_reads(server: &common::Server) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{}/io", server.pid())).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("read_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no read_bytes in /proc/PID/io:\n{io}"))
}

/// On the default configuration, with the data directory on a disk: the 512 MiB entry's
/// first restore reads it from the disk around the page cache (leaving it out of memory);
/// two jobs restoring it at once right after read it from the disk once between them; a
/// fourth restore after them finds it all in memory, as does a fifth after a restart of
/// the server (which remembers no reads). The figures are the server's own reads from
/// the disk, and every restore is checked byte for byte.
#[test]
fn v2_restores_of_one_entry_read_the_disk_about_once() {
    if !client_ready() {
        return;
    }
    let payload = payload();
    let _big = big();
    // Under the target directory, which is on a disk (a temporary directory may be in
    // memory, where there is no disk to count).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut cache = Cache::start_in(dir, &[]);
    let token = cache.main_token();
    let key = "restored-by-a-matrix";
    let client = cache.client(Protocol::V2, &token);
    let (id, output) = client.save(&payload.workspace, key, &["payload"], BIG_RUN);
    assert!(id > 0, "save of {key} failed (id {id}):\n{output}");
    let len = payload_len() as u64;

    let before = disk_reads(&cache.server);
    assert_payload_restores(&client, key);
    let first = disk_reads(&cache.server) - before;
    eprintln!("first restore: {} MiB from the disk", first >> 20);
    assert!(
        first >= len * 9 / 10,
        "the first restore read {first} bytes from the disk, not the entry's {len}: \
         the data directory is not on a disk, or the entry was in memory already"
    );

    let before = disk_reads(&cache.server);
    let jobs: Vec<_> = (0..2)
        .map(|_| {
            let workspace = tempfile::tempdir().unwrap();
            let runner_temp = tempfile::tempdir().unwrap();
            let running = Running::spawn(client.command(
                workspace.path(),
                runner_temp.path(),
                &["restore", key, "-", "payload"],
            ));
            (workspace, runner_temp, running)
        })
        .collect();
    for (workspace, _runner_temp, mut running) in jobs {
        let (status, output) = running.finish(BIG_RUN);
        assert!(status.success(), "restore failed ({status}):\n{output}");
        assert_eq!(result_of(&output).as_str(), Some(key), "{output}");
        assert_eq!(
            tree_digests(workspace.path()),
            payload.digests,
            "a concurrent restore differs from what was saved:\n{output}"
        );
    }
    let both = disk_reads(&cache.server) - before;
    eprintln!("two restores at once: {} MiB from the disk", both >> 20);
    assert!(
        both >= len * 9 / 10,
        "two restores after the first read {both} bytes from the disk: the first left the \
         entry in memory, where a restore read once is to go around it"
    );
    assert!(
        both < len * 3 / 2,
        "two restores at once read {both} bytes from the disk: more than once the entry's {len}"
    );

    let before = disk_reads(&cache.server);
    assert_payload_restores(&client, key);
    let last = disk_reads(&cache.server) - before;
    eprintln!("the restore after them: {} MiB from the disk", last >> 20);
    assert!(
        last < len / 10,
        "the restore after them read {last} bytes from the disk: the entry was not kept in memory"
    );

    cache.server.restart();
    let client = cache.client(Protocol::V2, &token);
    let before = disk_reads(&cache.server);
    assert_payload_restores(&client, key);
    let restarted = disk_reads(&cache.server) - before;
    eprintln!(
        "a restore after a restart: {} MiB from the disk",
        restarted >> 20
    );
    assert!(
        restarted < len / 10,
        "a restore after a restart read {restarted} bytes from the disk, though the entry \
         was in memory"
    );
}
