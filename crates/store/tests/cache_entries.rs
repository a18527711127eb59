//! Cache entries (the GitHub Actions cache) on the content-addressed blob store:
//! restores match keys the way GitHub does (exact primary key, then the newest prefix
//! match of it, then each restore key in order, scope by scope, version exact, only
//! finished entries of the repository); a (repository, scope, key, version) is taken
//! once; an entry's bytes arrive as chunks in any order (Content-Range uploads) or as
//! blocks placed by a block list, and read back exactly, whole or in ranges; identical
//! content is stored once; eviction removes entries least recently restored first with
//! the blobs only they held, and never sweeps what an unfinished entry holds until the
//! entry expires.
//!
//! Every test runs on SQLite metadata (`sqlite::…`) and on PostgreSQL metadata
//! (`postgres::…`).
//!
//! Timestamps have a one-second resolution (a blob touched in the second a pass starts
//! is not idle, even with a zero grace), so the eviction tests sleep past second
//! boundaries where order matters, and stop the store's background tasks after its
//! startup pass, so the only passes are theirs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod backend;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use backend::{Backend, Metadata};
use bytes::Bytes;
use futures::StreamExt;
use oci::Digest;
use store::config::{Eviction, Percent, Size};
use store::error::Missing;
use store::{ByteRange, ByteStream, Config, Entry, EntryQuery, Error, NewEntry, Store, Trigger};

const REPO: &str = "octo/app";
const FORK: &str = "octo/fork";
const MAIN: &str = "refs/heads/main";
const FEATURE: &str = "refs/heads/feature";
const V1: &str = "v1-0123abcd";
const V2: &str = "v2-4567ef01";
/// An entry size limit nothing in these tests reaches, unless it means to.
const LIMIT: u64 = 1 << 30;

/// Assert that `$result` is an error matching `$pattern`.
macro_rules! assert_err {
    ($result:expr, $pattern:pat $(if $guard:expr)?) => {
        match $result {
            Err($pattern) $(if $guard)? => {}
            Err(other) => panic!(
                "{}: expected {}, got error {other:?}",
                stringify!($result),
                stringify!($pattern)
            ),
            Ok(_) => panic!(
                "{}: expected {}, got Ok",
                stringify!($result),
                stringify!($pattern)
            ),
        }
    };
}

backend::on_each_backend! {
    #[tokio::test]
    async fn restores_match_exact_then_prefix_then_restore_keys_of_the_exact_version;
    #[tokio::test]
    async fn restores_search_scopes_in_order;
    #[tokio::test]
    async fn keys_match_literally_whatever_characters_they_hold;
    #[tokio::test]
    async fn keys_match_whatever_the_case_of_their_ascii_letters;
    #[tokio::test]
    async fn listing_finds_finished_entries_of_the_scopes_by_prefix_newest_first;
    #[tokio::test]
    async fn a_key_and_version_are_taken_once_per_scope;
    #[tokio::test]
    async fn an_upload_idle_for_ten_minutes_gives_its_key_up;
    #[tokio::test]
    async fn chunks_in_any_order_make_the_entry_once_they_cover_it;
    #[tokio::test]
    async fn a_whole_upload_replaces_earlier_chunks_and_an_empty_entry_is_an_entry;
    #[tokio::test]
    async fn chunks_past_the_size_limit_are_refused_and_recorded_nowhere;
    #[tokio::test]
    async fn an_overlong_chunk_is_refused_with_the_entry_limit;
    #[tokio::test]
    async fn blocks_are_placed_in_block_list_order_and_read_in_ranges;
    #[tokio::test]
    async fn a_block_list_over_the_limit_leaves_nothing_to_finish;
    #[tokio::test]
    async fn the_same_content_is_stored_once_across_entries;
    #[test]
    fn entries_are_evicted_least_recently_restored_first_with_the_blobs_only_they_hold;
    #[test]
    fn what_an_unfinished_entry_holds_is_never_swept_until_it_expires;
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunk_whose_entry_goes_mid_upload_leaves_no_blob_file_behind;
}

// ---------------------------------------------------------------- helpers

/// `len` pseudo-random bytes, different for each `seed`.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// `bytes` as a request body arriving in pieces of at most 1000 bytes.
fn body(bytes: &[u8]) -> ByteStream {
    let pieces: Vec<std::io::Result<Bytes>> = bytes
        .chunks(1000)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    Box::pin(futures::stream::iter(pieces))
}

async fn collect(mut stream: ByteStream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

/// Restore an entry whole.
async fn read(store: &Store, id: i64) -> Vec<u8> {
    let read = store.read_entry(id).await.unwrap();
    let size = read.size;
    let bytes = collect(read.stream(None)).await;
    assert_eq!(bytes.len() as u64, size, "entry {id}: size announced");
    bytes
}

/// Restore `len` bytes from `start` of an entry.
async fn read_range(store: &Store, id: i64, start: u64, len: u64) -> Vec<u8> {
    let read = store.read_entry(id).await.unwrap();
    collect(read.stream(Some(ByteRange { start, len }))).await
}

fn key(repository: &str, scope: &str, key: &str, version: &str) -> NewEntry {
    NewEntry {
        repository: repository.into(),
        scope: scope.into(),
        key: key.into(),
        version: version.into(),
    }
}

async fn create(store: &Store, repository: &str, scope: &str, k: &str, version: &str) -> Entry {
    store
        .create_entry(key(repository, scope, k, version))
        .await
        .unwrap()
}

/// Save `bytes` as a finished entry in one upload. Entries saved one after the other
/// are finished in different milliseconds, so "newest" is the order of saving.
async fn save(
    store: &Store,
    repository: &str,
    scope: &str,
    k: &str,
    version: &str,
    bytes: &[u8],
) -> Entry {
    let entry = create(store, repository, scope, k, version).await;
    let len = bytes.len() as u64;
    let stored = store
        .put_entry_part(entry.id, 0, Some(len), true, body(bytes), LIMIT)
        .await
        .unwrap();
    assert_eq!(stored, len);
    let finished = store.finish_entry(entry.id, len).await.unwrap();
    assert_eq!(finished.size, Some(len));
    tokio::time::sleep(Duration::from_millis(3)).await;
    finished
}

/// The (scope, key) of what a restore of `keys` in `scopes` of `repository` gets.
async fn restore_in(
    store: &Store,
    repository: &str,
    scopes: &[&str],
    keys: &[&str],
    version: &str,
) -> Option<(String, String)> {
    store
        .find_entry(EntryQuery {
            repository: repository.into(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            keys: keys.iter().map(|s| (*s).to_owned()).collect(),
            version: version.into(),
        })
        .await
        .unwrap()
        .map(|e| {
            assert_eq!(e.repository, repository);
            assert_eq!(e.version, version);
            assert!(e.size.is_some(), "a restore found an unfinished entry");
            (e.scope, e.key)
        })
}

/// The key a restore of `keys` in `scopes` of [`REPO`] at `version` gets.
async fn restore(store: &Store, scopes: &[&str], keys: &[&str], version: &str) -> Option<String> {
    restore_in(store, REPO, scopes, keys, version)
        .await
        .map(|(_, k)| k)
}

fn data_dir(dir: &Path) -> std::path::PathBuf {
    dir.join("data")
}

/// Every committed blob file under the data directory.
fn blob_files(dir: &Path) -> BTreeSet<Digest> {
    let mut found = BTreeSet::new();
    let root = data_dir(dir).join("blobs");
    let Ok(algorithms) = std::fs::read_dir(&root) else {
        return found;
    };
    for algorithm in algorithms {
        let algorithm = algorithm.unwrap();
        for prefix in std::fs::read_dir(algorithm.path()).unwrap() {
            for file in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
                let file = file.unwrap();
                let name = format!(
                    "{}:{}",
                    algorithm.file_name().to_string_lossy(),
                    file.file_name().to_string_lossy()
                );
                found.insert(Digest::parse_stored(&name).unwrap());
            }
        }
    }
    found
}

/// The digest a part of these bytes is stored under (the reference implementation's).
fn part(bytes: &[u8]) -> Digest {
    Digest::parse_stored(&format!("blake3:{}", blake3::hash(bytes).to_hex())).unwrap()
}

/// Fresh metadata of `backend` for a store in `dir`.
fn metadata(backend: Backend, dir: &Path) -> Metadata {
    backend.create(&data_dir(dir))
}

fn config(metadata: &Metadata, eviction: Eviction) -> Config {
    Config {
        eviction: Eviction {
            min_free: Size::Bytes(0),
            interval: Duration::from_secs(3600),
            ..eviction
        },
        ..metadata.config()
    }
}

/// A store with no quota pressure and the default grace on `metadata`: its passes remove
/// nothing the tests made.
async fn open_on(metadata: &Metadata) -> Store {
    Store::open(&config(
        metadata,
        Eviction {
            max_size: Size::Bytes(1 << 40),
            ..Eviction::default()
        },
    ))
    .await
    .unwrap()
}

/// A store like [`open_on`]'s on fresh metadata of `backend`.
async fn open(backend: Backend, dir: &Path) -> Store {
    open_on(&metadata(backend, dir)).await
}

/// Stored blobs and their bytes, as the metadata counts them.
async fn blob_usage(store: &Store) -> (u64, u64) {
    let (usage, _) = store.usage().await.unwrap();
    (usage.blobs, usage.blob_bytes)
}

fn on_disk(size: u64) -> u64 {
    size.div_ceil(4096) * 4096
}

// ---------------------------------------------------------------- matching

async fn restores_match_exact_then_prefix_then_restore_keys_of_the_exact_version(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(backend, dir.path()).await;
    let m = &[MAIN][..];

    save(&store, REPO, MAIN, "linux-deps", V1, b"deps").await;
    save(&store, REPO, MAIN, "linux-deps-2", V1, b"deps 2").await;
    save(&store, REPO, MAIN, "linux-other", V1, b"other").await;

    // The exact key beats newer entries it is a prefix of.
    assert_eq!(
        restore(&store, m, &["linux-deps"], V1).await.as_deref(),
        Some("linux-deps")
    );
    // A prefix of the primary key gets the newest entry it starts.
    assert_eq!(
        restore(&store, m, &["linux-"], V1).await.as_deref(),
        Some("linux-other")
    );
    assert_eq!(
        restore(&store, m, &["linux-d"], V1).await.as_deref(),
        Some("linux-deps-2")
    );
    assert_eq!(
        restore(&store, m, &["linux-deps-"], V1).await.as_deref(),
        Some("linux-deps-2")
    );
    // A restore key is a prefix too, never only an exact match.
    assert_eq!(
        restore(&store, m, &["windows", "linux-deps"], V1)
            .await
            .as_deref(),
        Some("linux-deps-2")
    );
    // Restore keys in their order, not by recency.
    assert_eq!(
        restore(&store, m, &["windows", "linux-deps-", "linux-"], V1)
            .await
            .as_deref(),
        Some("linux-deps-2")
    );
    assert_eq!(
        restore(
            &store,
            m,
            &["windows", "macos", "linux-o", "linux-deps"],
            V1
        )
        .await
        .as_deref(),
        Some("linux-other")
    );
    // A prefix match of the primary key beats an exact match of a restore key.
    assert_eq!(
        restore(&store, m, &["linux-deps-", "linux-other"], V1)
            .await
            .as_deref(),
        Some("linux-deps-2")
    );
    assert_eq!(restore(&store, m, &["windows", "macos"], V1).await, None);
    assert_eq!(restore(&store, m, &[], V1).await, None);
    // Keys are not patterns (their case is another test's).
    assert_eq!(restore(&store, m, &["linux-deps-2-"], V1).await, None);
    assert_eq!(restore(&store, m, &["linux-*"], V1).await, None);

    // The version must match exactly.
    save(&store, REPO, MAIN, "linux-deps", V2, b"deps for v2").await;
    save(&store, REPO, MAIN, "linux-v2-only", V2, b"v2 only").await;
    assert_eq!(
        restore(&store, m, &["linux-deps"], V1).await.as_deref(),
        Some("linux-deps")
    );
    assert_eq!(
        restore(&store, m, &["linux-"], V1).await.as_deref(),
        Some("linux-other")
    );
    assert_eq!(
        restore(&store, m, &["linux-"], V2).await.as_deref(),
        Some("linux-v2-only")
    );
    let v2 = store
        .find_entry(EntryQuery {
            repository: REPO.into(),
            scopes: vec![MAIN.into()],
            keys: vec!["linux-deps".into()],
            version: V2.into(),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read(&store, v2.id).await, b"deps for v2");
    for version in [
        "v1",
        &V1[..V1.len() - 1],
        &format!("{V1} "),
        "V1-0123ABCD",
        "",
    ] {
        assert_eq!(
            restore(&store, m, &["linux-"], version).await,
            None,
            "version {version:?}"
        );
    }

    // Unfinished entries are invisible, even with all their bytes uploaded.
    let pending = create(&store, REPO, MAIN, "linux-pending", V1).await;
    store
        .put_entry_part(pending.id, 0, Some(7), false, body(b"pending"), LIMIT)
        .await
        .unwrap();
    let pending_exact = create(&store, REPO, MAIN, "linux-other-pending", V1).await;
    assert_eq!(restore(&store, m, &["linux-pending"], V1).await, None);
    assert_eq!(
        restore(&store, m, &["linux-"], V1).await.as_deref(),
        Some("linux-other")
    );
    assert_eq!(
        restore(&store, m, &["linux-other-"], V1).await,
        None,
        "only an unfinished entry starts with it"
    );
    // Once finished, it is the newest.
    store.finish_entry(pending.id, 7).await.unwrap();
    assert_eq!(
        restore(&store, m, &["linux-"], V1).await.as_deref(),
        Some("linux-pending")
    );
    assert_eq!(store.entry(pending_exact.id).await.unwrap().size, None);

    // Other repositories' entries are invisible, however well they match.
    tokio::time::sleep(Duration::from_millis(3)).await;
    save(&store, FORK, MAIN, "linux-deps", V1, b"fork deps").await;
    save(&store, FORK, MAIN, "linux-zzz", V1, b"fork newest").await;
    assert_eq!(
        restore(&store, m, &["linux-"], V1).await.as_deref(),
        Some("linux-pending")
    );
    assert_eq!(
        restore(&store, m, &["linux-z"], V1).await,
        None,
        "another repository's entry"
    );
    assert_eq!(
        restore_in(&store, FORK, m, &["linux-"], V1).await,
        Some((MAIN.into(), "linux-zzz".into()))
    );
    assert_eq!(
        restore_in(&store, FORK, m, &["linux-deps"], V1).await,
        Some((MAIN.into(), "linux-deps".into()))
    );
    assert_eq!(
        restore_in(&store, FORK, m, &["linux-other"], V1).await,
        None
    );
    assert_eq!(
        restore_in(&store, "octo", m, &["linux-"], V1).await,
        None,
        "a prefix of the repository's name"
    );
}

async fn restores_search_scopes_in_order(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(backend, dir.path()).await;
    let feature_first = &[FEATURE, MAIN][..];

    save(&store, REPO, FEATURE, "build-feature", V1, b"feature").await;
    save(&store, REPO, MAIN, "build-main", V1, b"main, newer").await;
    // An entry in the first scope beats a newer one in the second.
    assert_eq!(
        restore_in(&store, REPO, feature_first, &["build-"], V1).await,
        Some((FEATURE.into(), "build-feature".into()))
    );
    assert_eq!(
        restore_in(&store, REPO, &[MAIN, FEATURE], &["build-"], V1).await,
        Some((MAIN.into(), "build-main".into()))
    );
    // Each scope is searched fully (exact, prefix, restore keys) before the next: a
    // prefix or restore-key match in the first beats an exact match in the second.
    save(&store, REPO, FEATURE, "tool-1.2", V1, b"feature prefix").await;
    save(&store, REPO, MAIN, "tool-1", V1, b"main exact").await;
    assert_eq!(
        restore_in(&store, REPO, feature_first, &["tool-1"], V1).await,
        Some((FEATURE.into(), "tool-1.2".into()))
    );
    save(
        &store,
        REPO,
        FEATURE,
        "fallback-x",
        V1,
        b"feature restore key",
    )
    .await;
    save(&store, REPO, MAIN, "primary", V1, b"main exact").await;
    assert_eq!(
        restore_in(&store, REPO, feature_first, &["primary", "fallback-"], V1).await,
        Some((FEATURE.into(), "fallback-x".into()))
    );
    // Nothing in the first scope: the second one's.
    save(&store, REPO, MAIN, "only-main", V1, b"only main").await;
    assert_eq!(
        restore_in(&store, REPO, feature_first, &["only-"], V1).await,
        Some((MAIN.into(), "only-main".into()))
    );
    assert_eq!(
        restore_in(&store, REPO, feature_first, &["nothing", "only-main"], V1).await,
        Some((MAIN.into(), "only-main".into()))
    );
    // Scopes not listed are not searched.
    assert_eq!(
        restore_in(&store, REPO, &[FEATURE], &["only-"], V1).await,
        None
    );
    assert_eq!(
        restore_in(&store, REPO, &["refs/heads/other"], &["build-"], V1).await,
        None
    );
    assert_eq!(restore_in(&store, REPO, &[], &["build-"], V1).await, None);
}

async fn keys_match_literally_whatever_characters_they_hold(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(backend, dir.path()).await;
    let m = &[MAIN][..];
    let found = async |keys: &[&str]| restore(&store, m, keys, V1).await;

    // SQL LIKE wildcards are ordinary characters.
    for k in ["npm-%1", "npm-_1", "npm-ab", "npm-a%"] {
        save(&store, REPO, MAIN, k, V1, k.as_bytes()).await;
    }
    assert_eq!(found(&["npm-%"]).await.as_deref(), Some("npm-%1"));
    assert_eq!(found(&["npm-_"]).await.as_deref(), Some("npm-_1"));
    assert_eq!(found(&["npm-a"]).await.as_deref(), Some("npm-a%"));
    assert_eq!(found(&["npm-ab"]).await.as_deref(), Some("npm-ab"));
    assert_eq!(found(&["npm-%1"]).await.as_deref(), Some("npm-%1"));
    assert_eq!(found(&["npm-a_"]).await, None);
    assert_eq!(found(&["npm-%%"]).await, None);
    assert_eq!(found(&["npm-"]).await.as_deref(), Some("npm-a%"));

    // A prefix's range ends right after it: `index-1$` follows every `index-1#…`.
    save(&store, REPO, MAIN, "index-1#abc", V1, b"hash").await;
    save(&store, REPO, MAIN, "index-1$", V1, b"dollar").await;
    assert_eq!(found(&["index-1#"]).await.as_deref(), Some("index-1#abc"));
    assert_eq!(found(&["index-1"]).await.as_deref(), Some("index-1$"));
    assert_eq!(found(&["index-1$x"]).await, None);

    // A key that is a prefix of another: exact first, then the longer one by prefix.
    let cache = save(&store, REPO, MAIN, "cache", V1, b"short").await;
    save(&store, REPO, MAIN, "cache-2", V1, b"longer").await;
    assert_eq!(found(&["cache"]).await.as_deref(), Some("cache"));
    assert_eq!(found(&["cach"]).await.as_deref(), Some("cache-2"));
    assert!(store.delete_entry(cache.id).await.unwrap());
    assert!(!store.delete_entry(cache.id).await.unwrap());
    assert_eq!(found(&["cache"]).await.as_deref(), Some("cache-2"));

    // Unicode, up to the last code point; 🦁 (U+1F981) follows 🦀 (U+1F980).
    save(&store, REPO, MAIN, "ünï-cödé-🦀-1", V1, b"crab 1").await;
    save(&store, REPO, MAIN, "ünï-cödé-🦀-2", V1, b"crab 2").await;
    save(&store, REPO, MAIN, "ünï-cödé-🦁", V1, b"lion").await;
    assert_eq!(
        found(&["ünï-cödé-🦀"]).await.as_deref(),
        Some("ünï-cödé-🦀-2")
    );
    assert_eq!(
        found(&["ünï-cödé-🦀-1"]).await.as_deref(),
        Some("ünï-cödé-🦀-1")
    );
    assert_eq!(found(&["ünï-cödé-"]).await.as_deref(), Some("ünï-cödé-🦁"));
    assert_eq!(found(&["uni-"]).await, None);
    assert_eq!(found(&["ünï-cödé-🦀-3"]).await, None);
    save(&store, REPO, MAIN, "z\u{10FFFF}x", V1, b"last code point").await;
    save(&store, REPO, MAIN, "zz", V1, b"after it").await;
    save(
        &store,
        REPO,
        MAIN,
        "z\u{D7FF}q",
        V1,
        b"before the surrogates",
    )
    .await;
    save(&store, REPO, MAIN, "z\u{E000}", V1, b"after the surrogates").await;
    assert_eq!(
        found(&["z\u{10FFFF}"]).await.as_deref(),
        Some("z\u{10FFFF}x")
    );
    assert_eq!(found(&["z\u{D7FF}"]).await.as_deref(), Some("z\u{D7FF}q"));
    assert_eq!(found(&["z\u{E000}"]).await.as_deref(), Some("z\u{E000}"));

    // Quotes, backslashes, spaces, slashes, NUL-free control characters.
    for k in [
        "o'brien\\\"x",
        "with space/and/slashes",
        "tab\tkey",
        "semi;colon--",
    ] {
        let saved = save(&store, REPO, MAIN, k, V1, k.as_bytes()).await;
        assert_eq!(found(&[k]).await.as_deref(), Some(k));
        assert_eq!(read(&store, saved.id).await, k.as_bytes());
    }
    assert_eq!(found(&["o'"]).await.as_deref(), Some("o'brien\\\"x"));
}

async fn listing_finds_finished_entries_of_the_scopes_by_prefix_newest_first(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(backend, dir.path()).await;
    let a = save(&store, REPO, MAIN, "npm-%a", V1, b"1").await;
    let b = save(&store, REPO, FEATURE, "npm-b", V2, b"2").await;
    let c = save(&store, REPO, MAIN, "pip-c", V1, b"3").await;
    let d = save(&store, REPO, "refs/heads/other", "npm-d", V1, b"4").await;
    save(&store, FORK, MAIN, "npm-fork", V1, b"5").await;
    create(&store, REPO, MAIN, "npm-unfinished", V1).await;
    let ids = |entries: Vec<Entry>| entries.into_iter().map(|e| e.id).collect::<Vec<_>>();
    let list = async |scopes: &[&str], prefixes: &[&str]| {
        ids(store
            .list_entries(
                REPO,
                scopes.iter().map(|s| (*s).to_owned()).collect(),
                prefixes.iter().map(|s| (*s).to_owned()).collect(),
            )
            .await
            .unwrap())
    };
    assert_eq!(list(&[MAIN, FEATURE], &[]).await, [c.id, b.id, a.id]);
    assert_eq!(list(&[MAIN], &[]).await, [c.id, a.id]);
    assert_eq!(list(&[MAIN, FEATURE], &["npm-"]).await, [b.id, a.id]);
    // Overlapping prefixes list an entry once.
    assert_eq!(
        list(&[MAIN, FEATURE], &["npm-", "npm-%", "pip"]).await,
        [c.id, b.id, a.id]
    );
    assert_eq!(list(&[MAIN, FEATURE], &["npm-%"]).await, [a.id]);
    assert_eq!(list(&[MAIN, FEATURE], &["npm-_"]).await, Vec::<i64>::new());
    assert_eq!(list(&["refs/heads/other"], &["npm"]).await, [d.id]);
    assert_eq!(list(&[], &[]).await, Vec::<i64>::new());
}

// ---------------------------------------------------------------- reserving

/// GitHub's cache service matches keys whatever the case of their letters (a key saved
/// as `Linux-deps` restores as `linux-deps`), and answers with the key as saved.
async fn keys_match_whatever_the_case_of_their_ascii_letters(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(backend, dir.path()).await;
    let m = &[MAIN][..];
    let found = async |keys: &[&str]| restore(&store, m, keys, V1).await;
    save(&store, REPO, MAIN, "Linux-deps-2", V1, b"deps").await;
    assert_eq!(
        found(&["linux-deps-2"]).await.as_deref(),
        Some("Linux-deps-2")
    );
    assert_eq!(
        found(&["LINUX-DEPS"]).await.as_deref(),
        Some("Linux-deps-2")
    );
    assert_eq!(
        found(&["nothing", "linux-"]).await.as_deref(),
        Some("Linux-deps-2")
    );
    let listed = store
        .list_entries(REPO, vec![MAIN.into()], vec!["LINUX-".into()])
        .await
        .unwrap();
    assert_eq!(
        listed.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
        ["Linux-deps-2"]
    );
    assert_err!(
        store
            .create_entry(key(REPO, MAIN, "linux-deps-2", V1))
            .await,
        Error::EntryExists
    );
    // Only ASCII letters fold (the databases' `lower()` of a byte-ordered column).
    save(&store, REPO, MAIN, "Über-1", V1, b"umlaut").await;
    assert_eq!(found(&["über-1"]).await, None);
    assert_eq!(found(&["Über-1"]).await.as_deref(), Some("Über-1"));
}

async fn a_key_and_version_are_taken_once_per_scope(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(backend, dir.path()).await;
    let first = create(&store, REPO, MAIN, "deps", V1).await;
    assert_eq!(
        (first.size, first.key.as_str(), first.scope.as_str()),
        (None, "deps", MAIN)
    );
    // Taken while unfinished.
    assert_err!(
        store.create_entry(key(REPO, MAIN, "deps", V1)).await,
        Error::EntryExists
    );
    assert_eq!(
        store
            .entry_by_key(key(REPO, MAIN, "deps", V1))
            .await
            .unwrap()
            .map(|e| e.id),
        Some(first.id)
    );
    // The key in another case is the same key, as on GitHub.
    assert_err!(
        store.create_entry(key(REPO, MAIN, "DEPS", V1)).await,
        Error::EntryExists
    );
    // The same key in another scope, version or repository, or another key, is free.
    let others = [
        key(REPO, FEATURE, "deps", V1),
        key(REPO, MAIN, "deps", V2),
        key(FORK, MAIN, "deps", V1),
        key(REPO, MAIN, "deps-2", V1),
    ];
    let mut ids = BTreeSet::from([first.id]);
    for other in &others {
        let entry = store.create_entry(other.clone()).await.unwrap();
        assert!(ids.insert(entry.id), "ids are unique");
        assert_eq!(
            store.entry_by_key(other.clone()).await.unwrap(),
            Some(entry)
        );
    }
    // Taken once finished.
    store
        .put_entry_part(first.id, 0, None, true, body(b"content"), LIMIT)
        .await
        .unwrap();
    store.finish_entry(first.id, 7).await.unwrap();
    assert_err!(
        store.create_entry(key(REPO, MAIN, "deps", V1)).await,
        Error::EntryExists
    );
    let finished = store
        .entry_by_key(key(REPO, MAIN, "deps", V1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((finished.id, finished.size), (first.id, Some(7)));
    assert_eq!(
        store
            .entry_by_key(key(REPO, MAIN, "deps", "v3"))
            .await
            .unwrap(),
        None
    );
    // Free again once deleted, under a new id.
    assert!(store.delete_entry(first.id).await.unwrap());
    assert_err!(store.entry(first.id).await, Error::NotFound(Missing::Entry));
    let again = create(&store, REPO, MAIN, "deps", V1).await;
    assert!(!ids.contains(&again.id), "an id is never reused");
}

/// Move an entry's last activity `secs` into the past, after the store has written the
/// uses it records in the background (or one written later would undo the move).
async fn idle_for(store: &Store, metadata: &Metadata, id: i64, secs: i64) {
    store.flush_access_times().await.unwrap();
    let changed = metadata.execute(&format!(
        "UPDATE cache_entries SET accessed_at = accessed_at - {secs} WHERE id = {id}"
    ));
    assert_eq!(changed, 1);
}

async fn an_upload_idle_for_ten_minutes_gives_its_key_up(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let metadata = metadata(backend, dir.path());
    let store = open_on(&metadata).await;
    let stale = create(&store, REPO, MAIN, "deps", V1).await;
    store
        .put_entry_block(stale.id, "a".into(), body(b"stale block"), LIMIT)
        .await
        .unwrap();
    idle_for(&store, &metadata, stale.id, 590).await;
    assert_err!(
        store.create_entry(key(REPO, MAIN, "deps", V1)).await,
        Error::EntryExists
    );
    idle_for(&store, &metadata, stale.id, 11).await;
    let fresh = create(&store, REPO, MAIN, "deps", V1).await;
    assert_ne!(fresh.id, stale.id);
    assert_err!(store.entry(stale.id).await, Error::NotFound(Missing::Entry));
    // The new upload starts empty: the abandoned one's blocks are not its own.
    assert_err!(
        store.assemble_entry(fresh.id, vec!["a".into()], LIMIT).await,
        Error::UnknownBlock(b) if b == "a"
    );
    assert_err!(
        store
            .put_entry_block(stale.id, "b".into(), body(b"late"), LIMIT)
            .await,
        Error::NotFound(Missing::Entry)
    );

    // Upload activity keeps the key.
    let active = create(&store, REPO, MAIN, "active", V1).await;
    idle_for(&store, &metadata, active.id, 601).await;
    store
        .put_entry_part(active.id, 0, Some(4), false, body(b"busy"), LIMIT)
        .await
        .unwrap();
    assert_err!(
        store.create_entry(key(REPO, MAIN, "active", V1)).await,
        Error::EntryExists
    );
    // A finished entry keeps it however long it goes unrestored.
    let done = save(&store, REPO, MAIN, "done", V1, b"done").await;
    idle_for(&store, &metadata, done.id, 100_000).await;
    assert_err!(
        store.create_entry(key(REPO, MAIN, "done", V1)).await,
        Error::EntryExists
    );
    assert_eq!(read(&store, done.id).await, b"done");
}

// ---------------------------------------------------------------- chunked uploads

async fn chunks_in_any_order_make_the_entry_once_they_cover_it(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(backend, dir.path()).await;
    let data = content(1, 10_000);
    let entry = create(&store, REPO, MAIN, "chunked", V1).await;
    let put = async |start: usize, end: usize| {
        store
            .put_entry_part(
                entry.id,
                start as u64,
                Some((end - start) as u64),
                false,
                body(&data[start..end]),
                LIMIT,
            )
            .await
    };
    assert_eq!(put(8192, 10_000).await.unwrap(), 1808);
    assert_eq!(put(0, 4096).await.unwrap(), 4096);
    // A gap: not finished, whatever the size.
    assert_err!(
        store.finish_entry(entry.id, 10_000).await,
        Error::EntryIncomplete {
            size: 10_000,
            covered: 4096
        }
    );
    assert_err!(
        store.finish_entry(entry.id, 4096).await,
        Error::EntryIncomplete {
            size: 4096,
            covered: 4096
        }
    );
    assert_eq!(store.entry(entry.id).await.unwrap().size, None);
    assert_err!(
        store.read_entry(entry.id).await,
        Error::NotFound(Missing::Entry)
    );
    assert_eq!(restore(&store, &[MAIN], &["chunked"], V1).await, None);

    // A chunk whose body is shorter or longer than declared is refused and recorded
    // nowhere, not even over the gap.
    let before = blob_usage(&store).await;
    let files = blob_files(dir.path());
    for received in [4095, 4097] {
        let sent = content(2, received);
        assert_err!(
            store
                .put_entry_part(entry.id, 4096, Some(4096), false, body(&sent), LIMIT)
                .await,
            Error::ChunkLength { declared: 4096, received: r } if r == received as u64
        );
    }
    assert_eq!(blob_usage(&store).await, before);
    assert_eq!(blob_files(dir.path()), files);
    assert_eq!(store.usage().await.unwrap().0.upload_bytes, 0);
    assert_err!(
        store.finish_entry(entry.id, 10_000).await,
        Error::EntryIncomplete {
            size: 10_000,
            covered: 4096
        }
    );

    // The gap filled: the size must still be exact.
    assert_eq!(put(4096, 8192).await.unwrap(), 4096);
    for wrong in [9_999, 10_001, 0] {
        assert_err!(
            store.finish_entry(entry.id, wrong).await,
            Error::EntryIncomplete { size, covered: 10_000 } if size == wrong
        );
    }
    assert_eq!(store.entry(entry.id).await.unwrap().size, None);
    // A chunk sent again replaces the first (a retried PATCH).
    assert_eq!(put(0, 4096).await.unwrap(), 4096);
    let finished = store.finish_entry(entry.id, 10_000).await.unwrap();
    assert_eq!(finished.size, Some(10_000));
    assert_eq!(read(&store, entry.id).await, data);
    assert_eq!(
        restore(&store, &[MAIN], &["chunked"], V1).await.as_deref(),
        Some("chunked")
    );

    // Finished entries are immutable.
    let before = blob_usage(&store).await;
    assert_err!(
        store
            .put_entry_part(entry.id, 0, Some(4), false, body(b"more"), LIMIT)
            .await,
        Error::EntryFinished
    );
    assert_err!(
        store
            .put_entry_part(entry.id, 10_000, None, false, body(b"more"), LIMIT)
            .await,
        Error::EntryFinished
    );
    assert_err!(
        store
            .put_entry_block(entry.id, "b".into(), body(b"more"), LIMIT)
            .await,
        Error::EntryFinished
    );
    assert_err!(
        store.assemble_entry(entry.id, vec![], LIMIT).await,
        Error::EntryFinished
    );
    assert_err!(
        store.finish_entry(entry.id, 10_000).await,
        Error::EntryFinished
    );
    assert_eq!(blob_usage(&store).await, before);
    assert_eq!(read(&store, entry.id).await, data);

    // Unknown entries.
    assert_err!(
        store
            .put_entry_part(i64::MAX, 0, None, false, body(b"x"), LIMIT)
            .await,
        Error::NotFound(Missing::Entry)
    );
    assert_err!(
        store.finish_entry(i64::MAX, 0).await,
        Error::NotFound(Missing::Entry)
    );
    assert_err!(store.entry(i64::MAX).await, Error::NotFound(Missing::Entry));
    assert_eq!(blob_usage(&store).await, before);
}

async fn a_whole_upload_replaces_earlier_chunks_and_an_empty_entry_is_an_entry(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(backend, dir.path()).await;
    let entry = create(&store, REPO, MAIN, "whole", V1).await;
    let chunk = content(3, 5000);
    for start in [0u64, 5000] {
        store
            .put_entry_part(entry.id, start, Some(5000), false, body(&chunk), LIMIT)
            .await
            .unwrap();
    }
    let whole = content(4, 3000);
    store
        .put_entry_part(entry.id, 0, None, true, body(&whole), LIMIT)
        .await
        .unwrap();
    assert_err!(
        store.finish_entry(entry.id, 10_000).await,
        Error::EntryIncomplete {
            size: 10_000,
            covered: 3000
        }
    );
    store.finish_entry(entry.id, 3000).await.unwrap();
    assert_eq!(read(&store, entry.id).await, whole);

    // Nothing uploaded is not an empty entry; an empty upload is.
    let empty = create(&store, REPO, MAIN, "empty", V1).await;
    for size in [0, 1] {
        assert_err!(
            store.finish_entry(empty.id, size).await,
            Error::EntryIncomplete { size: s, covered: 0 } if s == size
        );
    }
    store
        .put_entry_part(empty.id, 0, Some(0), true, body(b""), LIMIT)
        .await
        .unwrap();
    assert_err!(
        store.finish_entry(empty.id, 1).await,
        Error::EntryIncomplete {
            size: 1,
            covered: 0
        }
    );
    store.finish_entry(empty.id, 0).await.unwrap();
    assert_eq!(read(&store, empty.id).await, b"");
    assert_eq!(
        restore(&store, &[MAIN], &["empty"], V1).await.as_deref(),
        Some("empty")
    );
}

async fn chunks_past_the_size_limit_are_refused_and_recorded_nowhere(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(backend, dir.path()).await;
    let limit = 10_000u64;
    let data = content(5, 10_000);
    let entry = create(&store, REPO, MAIN, "limited", V1).await;
    store
        .put_entry_part(entry.id, 0, Some(8192), false, body(&data[..8192]), limit)
        .await
        .unwrap();
    let before = blob_usage(&store).await;
    let files = blob_files(dir.path());
    let too_long = content(6, 1809);
    // Declared past the limit.
    assert_err!(
        store
            .put_entry_part(entry.id, 8192, Some(1809), false, body(&too_long), limit)
            .await,
        Error::EntryTooLarge { limit: 10_000 }
    );
    // Starting past it.
    assert_err!(
        store
            .put_entry_part(entry.id, 10_001, Some(1), false, body(b"x"), limit)
            .await,
        Error::EntryTooLarge { limit: 10_000 }
    );
    // Undeclared, or declared short, and running past it.
    assert_err!(
        store
            .put_entry_part(entry.id, 8192, None, false, body(&too_long), limit)
            .await,
        Error::EntryTooLarge { .. }
    );
    assert_err!(
        store
            .put_entry_part(entry.id, 8192, Some(1000), false, body(&too_long), limit)
            .await,
        Error::EntryTooLarge { .. }
    );
    assert_err!(
        store
            .put_entry_part(entry.id, 0, None, true, body(&content(7, 10_001)), limit)
            .await,
        Error::EntryTooLarge { limit: 10_000 }
    );
    // A block past it.
    assert_err!(
        store
            .put_entry_block(entry.id, "big".into(), body(&content(8, 10_001)), limit)
            .await,
        Error::EntryTooLarge { limit: 10_000 }
    );
    assert_eq!(blob_usage(&store).await, before);
    assert_eq!(blob_files(dir.path()), files);
    assert_eq!(store.usage().await.unwrap().0.upload_bytes, 0);
    // The earlier chunk is intact, and a chunk ending exactly at the limit fits.
    store
        .put_entry_part(
            entry.id,
            8192,
            Some(1808),
            false,
            body(&data[8192..]),
            limit,
        )
        .await
        .unwrap();
    store.finish_entry(entry.id, 10_000).await.unwrap();
    assert_eq!(read(&store, entry.id).await, data);
}

/// A chunk that runs past the limit without saying so (no declared length, or a short
/// one) is refused with the entry's limit, not with the room that was left after its
/// start (which the client would read as the limit).
async fn an_overlong_chunk_is_refused_with_the_entry_limit(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(backend, dir.path()).await;
    let entry = create(&store, REPO, MAIN, "limited", V1).await;
    let too_long = content(6, 1809);
    for declared in [None, Some(1000)] {
        assert_err!(
            store
                .put_entry_part(entry.id, 8192, declared, false, body(&too_long), 10_000)
                .await,
            Error::EntryTooLarge { limit: 10_000 }
        );
    }
}

// ---------------------------------------------------------------- blocks

async fn blocks_are_placed_in_block_list_order_and_read_in_ranges(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(backend, dir.path()).await;
    let entry = create(&store, REPO, MAIN, "blocks", V1).await;
    let b0 = content(10, 5000);
    let b1 = content(11, 7000);
    let b2 = content(12, 3000);
    let put = async |id: i64, block: &str, bytes: &[u8]| {
        store
            .put_entry_block(id, block.into(), body(bytes), LIMIT)
            .await
            .unwrap()
    };
    // Uploaded in another order than listed; `b0` sent twice, the second replacing it.
    assert_eq!(put(entry.id, "b2", &b2).await, 3000);
    assert_eq!(put(entry.id, "b0", &content(13, 100)).await, 100);
    assert_eq!(put(entry.id, "b1", &b1).await, 7000);
    assert_eq!(put(entry.id, "b0", &b0).await, 5000);
    // Blocks belong to their entry.
    let other = create(&store, REPO, MAIN, "other-blocks", V1).await;
    assert_err!(
        store.assemble_entry(other.id, vec!["b0".into()], LIMIT).await,
        Error::UnknownBlock(b) if b == "b0"
    );

    let list = |ids: &[&str]| ids.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        store
            .assemble_entry(entry.id, list(&["b2", "b0"]), LIMIT)
            .await
            .unwrap(),
        8000
    );
    // A new list replaces the assembly; sending it again (a retry) changes nothing.
    for _ in 0..2 {
        assert_eq!(
            store
                .assemble_entry(entry.id, list(&["b1", "b2", "b0"]), LIMIT)
                .await
                .unwrap(),
            15_000
        );
    }
    // An unknown block fails the list and leaves the assembly as it was.
    assert_err!(
        store
            .assemble_entry(entry.id, list(&["b0", "nope"]), LIMIT)
            .await,
        Error::UnknownBlock(b) if b == "nope"
    );
    assert_err!(
        store.finish_entry(entry.id, 5000).await,
        Error::EntryIncomplete { .. }
    );
    store.finish_entry(entry.id, 15_000).await.unwrap();
    let expected: Vec<u8> = [&b1[..], &b2, &b0].concat();
    assert_eq!(read(&store, entry.id).await, expected);

    // Ranges, inside a part, across one or two boundaries (at 7000 and 10 000), to the
    // end, empty.
    for (start, len) in [
        (0u64, 1u64),
        (0, 7000),
        (6990, 20),
        (7000, 3000),
        (6999, 3002),
        (100, 14_800),
        (9_999, 2),
        (14_999, 1),
        (10_000, 5000),
        (0, 15_000),
        (4321, 0),
    ] {
        let (s, e) = (start as usize, (start + len) as usize);
        assert_eq!(
            read_range(&store, entry.id, start, len).await,
            &expected[s..e],
            "range {start}+{len}"
        );
    }

    // A block listed twice is placed twice.
    put(other.id, "x", b"abc").await;
    put(other.id, "y", b"-").await;
    assert_eq!(
        store
            .assemble_entry(other.id, list(&["x", "y", "x"]), LIMIT)
            .await
            .unwrap(),
        7
    );
    store.finish_entry(other.id, 7).await.unwrap();
    assert_eq!(read(&store, other.id).await, b"abc-abc");
    assert_eq!(read_range(&store, other.id, 2, 3).await, b"c-a");
}

/// A block list over the size limit is refused and places nothing, so the entry cannot
/// be finished with that content either (a finalize call does not check the limit).
async fn a_block_list_over_the_limit_leaves_nothing_to_finish(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(backend, dir.path()).await;
    let limit = 10_000u64;
    let entry = create(&store, REPO, MAIN, "over", V1).await;
    for block in ["a", "b", "c"] {
        store
            .put_entry_block(entry.id, block.into(), body(&content(20, 4000)), limit)
            .await
            .unwrap();
    }
    assert_err!(
        store
            .assemble_entry(entry.id, vec!["a".into(), "b".into(), "c".into()], limit)
            .await,
        Error::EntryTooLarge { limit: 10_000 }
    );
    assert_err!(
        store.finish_entry(entry.id, 12_000).await,
        Error::EntryIncomplete {
            size: 12_000,
            covered: 0
        }
    );
    // A list within the limit still places the blocks.
    assert_eq!(
        store
            .assemble_entry(entry.id, vec!["c".into(), "a".into()], limit)
            .await
            .unwrap(),
        8000
    );
    store.finish_entry(entry.id, 8000).await.unwrap();
    assert_eq!(read(&store, entry.id).await, content(20, 4000).repeat(2));
}

// ---------------------------------------------------------------- dedup

async fn the_same_content_is_stored_once_across_entries(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(backend, dir.path()).await;
    assert_eq!(blob_usage(&store).await, (0, 0));
    let data = content(30, 300_000);

    let first = save(&store, REPO, MAIN, "one", V1, &data).await;
    let once = blob_usage(&store).await;
    assert_eq!(once, (1, on_disk(300_000)));
    // Other keys, scopes, versions and repositories: no new blob.
    let mut same = vec![first.id];
    for (repository, scope, k, version) in [
        (REPO, MAIN, "two", V1),
        (REPO, FEATURE, "one", V1),
        (REPO, MAIN, "one", V2),
        (FORK, MAIN, "one", V1),
    ] {
        same.push(save(&store, repository, scope, k, version, &data).await.id);
        assert_eq!(blob_usage(&store).await, once);
    }
    assert_eq!(blob_files(dir.path()), BTreeSet::from([part(&data)]));

    // Chunked twice at the same boundaries: two blobs, not four.
    for k in ["chunked-1", "chunked-2"] {
        let entry = create(&store, REPO, MAIN, k, V1).await;
        for (start, end) in [(100_000usize, 300_000usize), (0, 100_000)] {
            store
                .put_entry_part(
                    entry.id,
                    start as u64,
                    Some((end - start) as u64),
                    false,
                    body(&data[start..end]),
                    LIMIT,
                )
                .await
                .unwrap();
        }
        store.finish_entry(entry.id, 300_000).await.unwrap();
        same.push(entry.id);
    }
    let chunked = (3, on_disk(300_000) + on_disk(100_000) + on_disk(200_000));
    assert_eq!(blob_usage(&store).await, chunked);
    // The same blocks: nothing new either, even under other block ids.
    for (k, ids) in [("blocks-1", ["p", "q"]), ("blocks-2", ["q", "p"])] {
        let entry = create(&store, REPO, MAIN, k, V1).await;
        store
            .put_entry_block(entry.id, ids[0].into(), body(&data[..100_000]), LIMIT)
            .await
            .unwrap();
        store
            .put_entry_block(entry.id, ids[1].into(), body(&data[100_000..]), LIMIT)
            .await
            .unwrap();
        store
            .assemble_entry(
                entry.id,
                ids.iter().map(|s| (*s).to_owned()).collect(),
                LIMIT,
            )
            .await
            .unwrap();
        store.finish_entry(entry.id, 300_000).await.unwrap();
        same.push(entry.id);
    }
    assert_eq!(blob_usage(&store).await, chunked);
    assert_eq!(
        blob_files(dir.path()),
        BTreeSet::from([part(&data), part(&data[..100_000]), part(&data[100_000..])])
    );
    for id in same {
        assert_eq!(read(&store, id).await, data, "entry {id}");
    }
}

// ---------------------------------------------------------------- eviction

/// A store in `dir` on fresh metadata of `backend` with these eviction settings, whose
/// only passes are the ones a test runs.
fn open_for_passes(backend: Backend, dir: &Path, eviction: Eviction) -> Store {
    let metadata = metadata(backend, dir);
    metadata.open_without_background_tasks(&config(&metadata, eviction))
}

/// Sleep into the next second and a bit: what was touched before is now idle, and what
/// is used next has a later last use.
async fn next_second() {
    tokio::time::sleep(Duration::from_millis(1100)).await;
}

/// Put `chunks` as consecutive parts of a new entry and finish it.
async fn save_parts(store: &Store, k: &str, chunks: &[&[u8]]) -> Entry {
    let entry = create(store, REPO, MAIN, k, V1).await;
    let mut start = 0u64;
    for chunk in chunks {
        let len = chunk.len() as u64;
        store
            .put_entry_part(entry.id, start, Some(len), false, body(chunk), LIMIT)
            .await
            .unwrap();
        start += len;
    }
    store.finish_entry(entry.id, start).await.unwrap()
}

fn entries_are_evicted_least_recently_restored_first_with_the_blobs_only_they_hold(
    backend: Backend,
) {
    const MIB: usize = 1 << 20;
    const U: usize = 4 * MIB;
    let runtime = backend::test_runtime();
    let dir = tempfile::tempdir().unwrap();
    // Evict down to 10 MiB once over it. The entries' blobs take 16 MiB and the
    // metadata well under 2 MiB, so making room takes 6 to 8 MiB: two of the entries
    // (4 MiB each freed), never the third.
    let store = open_for_passes(
        backend,
        dir.path(),
        Eviction {
            max_size: Size::Bytes(10 * MIB as u64),
            high_watermark: Percent(100),
            low_watermark: Percent(100),
            grace: Duration::ZERO,
            in_use: Duration::ZERO,
            push_window: Duration::ZERO,
            ..Eviction::default()
        },
    );
    runtime.block_on(async {
        let a1 = content(40, U);
        let shared = content(41, U);
        let b1 = content(42, U);
        let c1 = content(43, U);
        // Oldest: a, then b, then c (which shares a part with a).
        let a = save_parts(&store, "a", &[&a1, &shared]).await;
        next_second().await;
        let b = save_parts(&store, "b", &[&b1]).await;
        next_second().await;
        let c = save_parts(&store, "c", &[&c1, &shared]).await;
        next_second().await;
        // A restore of `a` makes it the most recently used.
        let restored = store.read_entry(a.id).await.unwrap();
        drop(restored.stream(None));
        store.flush_access_times().await.unwrap();
        assert!(store.entry(a.id).await.unwrap().last_used > c.last_used);
        next_second().await;

        let (usage, quota) = store.usage().await.unwrap();
        assert_eq!((usage.blobs, usage.blob_bytes), (4, 4 * U as u64));
        assert!(
            usage.metadata_bytes < 2 * MIB as u64,
            "metadata of {} bytes upsets the quota arithmetic",
            usage.metadata_bytes
        );
        assert!(usage.total > quota.high);

        let report = store.gc(Trigger::Manual, false).await.unwrap();
        let evicted: Vec<i64> = report.evicted_entries.iter().map(|e| e.id).collect();
        assert_eq!(evicted, [b.id, c.id], "least recently restored first");
        assert!(report.evicted.is_empty());
        assert_eq!(report.blobs_removed, 2);
        assert_eq!(report.bytes_freed, 2 * U as u64);
        for gone in [&b, &c] {
            assert_err!(store.entry(gone.id).await, Error::NotFound(Missing::Entry));
            assert_err!(
                store.read_entry(gone.id).await,
                Error::NotFound(Missing::Entry)
            );
            assert_eq!(restore(&store, &[MAIN], &[&gone.key], V1).await, None);
        }
        // Their blobs are deleted, except the part `a` still holds.
        assert_eq!(
            blob_files(dir.path()),
            BTreeSet::from([part(&a1), part(&shared)])
        );
        assert_eq!(blob_usage(&store).await, (2, 2 * U as u64));
        assert_eq!(read(&store, a.id).await, [&a1[..], &shared].concat());
        assert_eq!(
            restore(&store, &[MAIN], &["a"], V1).await.as_deref(),
            Some("a")
        );

        // Within the quota now: the next pass leaves `a` alone.
        next_second().await;
        let report = store.gc(Trigger::Manual, false).await.unwrap();
        assert!(report.evicted_entries.is_empty());
        assert_eq!(report.blobs_removed, 0);
        assert_eq!(read(&store, a.id).await, [&a1[..], &shared].concat());
    });
}

fn what_an_unfinished_entry_holds_is_never_swept_until_it_expires(backend: Backend) {
    let runtime = backend::test_runtime();
    let dir = tempfile::tempdir().unwrap();
    // Everything is over this quota, nothing has a grace period, and unfinished entries
    // expire after 3 s.
    let store = open_for_passes(
        backend,
        dir.path(),
        Eviction {
            max_size: Size::Bytes(1),
            grace: Duration::ZERO,
            in_use: Duration::ZERO,
            push_window: Duration::ZERO,
            upload_expiry: Duration::from_secs(3),
            ..Eviction::default()
        },
    );
    runtime.block_on(async {
        let f1 = content(50, 6000);
        let shared = content(51, 7000);
        let (x, y, z) = (content(52, 3000), content(53, 4000), content(54, 5000));
        let p2 = content(55, 2000);
        let started = Instant::now();
        // A finished entry sharing a part with an unfinished entry's block.
        let finished = save_parts(&store, "finished", &[&f1, &shared]).await;
        // One unfinished entry with blocks (`z` will not be listed) ...
        let u1 = create(&store, REPO, MAIN, "u1", V1).await;
        for (block, bytes) in [("x", &x), ("y", &y), ("z", &z)] {
            store
                .put_entry_block(u1.id, block.into(), body(bytes), LIMIT)
                .await
                .unwrap();
        }
        // ... and one with a block and a chunk.
        let u2 = create(&store, REPO, MAIN, "u2", V1).await;
        store
            .put_entry_block(u2.id, "s".into(), body(&shared), LIMIT)
            .await
            .unwrap();
        store
            .put_entry_part(u2.id, 0, Some(2000), false, body(&p2), LIMIT)
            .await
            .unwrap();
        let held = BTreeSet::from([part(&shared), part(&x), part(&y), part(&z), part(&p2)]);

        // Past the grace and over the quota: the finished entry goes, with the blob only
        // it held; what the unfinished ones hold stays.
        next_second().await;
        let report = store.gc(Trigger::Manual, false).await.unwrap();
        let evicted: Vec<i64> = report.evicted_entries.iter().map(|e| e.id).collect();
        assert_eq!(evicted, [finished.id]);
        assert_eq!(report.uploads_expired, 0);
        assert_eq!(blob_files(dir.path()), held);
        assert_eq!(blob_usage(&store).await.0, 5);
        for u in [&u1, &u2] {
            assert_eq!(store.entry(u.id).await.unwrap().size, None);
        }

        // The first is finished from its blocks, intact.
        store
            .assemble_entry(u1.id, vec!["y".into(), "x".into()], LIMIT)
            .await
            .unwrap();
        store.finish_entry(u1.id, 7000).await.unwrap();
        assert_eq!(read(&store, u1.id).await, [&y[..], &x].concat());
        // A pass now evicts it (over the quota) and sweeps its unlisted block; the other
        // unfinished entry's blobs stay.
        let report = store.gc(Trigger::Manual, false).await.unwrap();
        assert!(report.evicted_entries.iter().any(|e| e.id == u1.id));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "too slow to test"
        );
        assert_eq!(report.uploads_expired, 0);
        let files = blob_files(dir.path());
        assert!(!files.contains(&part(&z)), "the unlisted block is swept");
        assert!(files.contains(&part(&shared)) && files.contains(&part(&p2)));
        assert_eq!(store.entry(u2.id).await.unwrap().size, None);

        // Once the unfinished entry expires, its blobs go too.
        let expired_at = started + Duration::from_millis(4500);
        tokio::time::sleep(expired_at.saturating_duration_since(Instant::now())).await;
        let report = store.gc(Trigger::Manual, false).await.unwrap();
        assert_eq!(report.uploads_expired, 1);
        assert_err!(store.entry(u2.id).await, Error::NotFound(Missing::Entry));
        assert_eq!(blob_files(dir.path()), BTreeSet::new());
        assert_eq!(blob_usage(&store).await, (0, 0));
    });
}

/// A chunk whose entry is deleted (or expires, or is finished) while its body streams
/// in fails; the blob it had already published must not stay on disk unknown to the
/// metadata, where no pass would ever remove it or count it.
async fn a_chunk_whose_entry_goes_mid_upload_leaves_no_blob_file_behind(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(backend, dir.path()).await;
    let entry = create(&store, REPO, MAIN, "racing", V1).await;
    let (tx, rx) = futures::channel::mpsc::unbounded::<std::io::Result<Bytes>>();
    let uploading = store.clone();
    let put = tokio::spawn(async move {
        uploading
            .put_entry_part(entry.id, 0, None, false, Box::pin(rx), LIMIT)
            .await
    });
    tx.unbounded_send(Ok(Bytes::from(content(60, 10_000))))
        .unwrap();
    // Wait until the chunk is being staged: the entry was found unfinished.
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.usage().await.unwrap().0.upload_bytes == 0 {
        assert!(Instant::now() < deadline, "the chunk never reached staging");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(store.delete_entry(entry.id).await.unwrap());
    drop(tx);
    assert_err!(put.await.unwrap(), Error::NotFound(Missing::Entry));
    store.gc(Trigger::Manual, false).await.unwrap();
    let (blobs, _) = blob_usage(&store).await;
    assert_eq!(
        blob_files(dir.path()).len() as u64,
        blobs,
        "blob files on disk that the metadata does not know"
    );
}
