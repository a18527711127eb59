//! Model-based property test of eviction: random sequences of blob pushes (whole and
//! chunked), checks (HEAD) and cross-repository mounts, image manifests (OCI and Docker),
//! indexes and manifest lists (nested too), BuildKit cache indexes, referrers, tag moves,
//! tag and manifest deletions, pulls and eviction passes, under a quota that nothing fits
//! in or one that leaves the blobs a few hundred KB, with no push window or one of
//! [`WINDOW_SECS`] (more than one [`age`] step, so a released blob waits across one).
//! After every step the store is read back (every manifest and tag stored, with the last
//! use the metadata records for each; the tags listed; every blob file on disk, hashed,
//! with its recorded last use; the blobs marked released, with the second of the
//! release; the referrers of every subject; the usage, released bytes included) and
//! compared with the model. The model bounds every time the store records (by the clock
//! read before and after the call that recorded it) and predicts every result exactly,
//! except where those bounds leave one second open: whether a blob used in the second a
//! window or the grace ends is swept, and whether a use in the second of a release came
//! after it. Pulls read through the API; the per-step checks read the metadata and the
//! blob files directly, since a read through the API is a use of what it reads.
//!
//! The rules the model follows:
//! * a use is recorded at its own second: an upload or a mount at once, a read (a blob's
//!   check, mount or pull; a manifest's or tag's pull) when the store next records its
//!   reads, at the second of the latest such read, not the second it records them in;
//! * a root evicted or deleted releases the blobs it leaves unreferenced, each marked
//!   with the second of its (latest) release; a use takes a released blob up (it waits
//!   for a manifest again, like a blob just pushed) only if it came in a later second
//!   than the release: a read made before the release or in its second, recorded after
//!   it, does not. Where the model's bounds cannot tell, the next look at the metadata
//!   settles it (before a pass, the harness has the pending reads recorded first);
//! * a pass, replayed on the model round by round as the store goes, evicts only when
//!   usage less the released bytes is over the high watermark, only roots (an index's
//!   children and a referrer only after the index or subject went), and of those never
//!   an untagged one last used within the push window before the pass started (a
//!   manifest pushed by digest: the index or referrer naming it comes next; the report
//!   counts them as kept in use); the others least recently used first (by the last use
//!   the store recorded, reported for the roots evicted and read back for the others,
//!   each checked against the model's bounds), then by repository and digest, each only
//!   while what it counts as freed (unreferenced blobs that leave now or are released
//!   and waiting, what the roots evicted so far release, directly or through the
//!   untagged child manifests they orphan and the untagged referrers of what goes, all
//!   the way down) is short of what the low watermark needs, and every candidate it
//!   can while short (so it never evicts more than needed once the waiting bytes go,
//!   and never stops early). The model predicts that sequence exactly;
//! * the pass sweeps a released blob once its last use is before the window and any
//!   other unreferenced blob once idle for the grace (zero, so the push window, the
//!   least it can be), keeps the rest waiting or young, and reports the bytes waiting,
//!   young and short of the low watermark and when the first waiting blob comes due.
//!   The manifests evicted go with exactly their tags.
//!
//! Focused tests race a manifest PUT, and a blob mount, against a pass sweeping the
//! blobs they use, and check that a pass counts an image's signature as going with it.
//!
//! Two things keep the runs deterministic:
//! * the store is opened on a runtime of its own that is dropped once its startup pass
//!   has finished, and its background tasks (access-time flusher, evictor) with it, so
//!   the only passes are the ones a test runs (a blob push that passes the high
//!   watermark would otherwise wake a background pass at any moment);
//! * time is moved forward by shifting every stored timestamp back ([`age`]), the
//!   seconds of the releases too, not by sleeping: timestamps have a one-second
//!   resolution and a blob touched in the second a pass starts is not idle, even with a
//!   zero grace. The reads the store holds in memory cannot be shifted, so each step of
//!   time first has them recorded, as the store's flusher would have in that time.
//!
//! A case runs in well under a second of the wall clock, so a use and its recording, or
//! a release and a later use, mostly share a second: [`Op::Tick`] waits for the next
//! second when it is near, and in one case of eight the final pulls wait for it halfway
//! (every other manifest pulled again), so the final pass records reads of an earlier
//! second than its own, some read in two seconds.
//!
//! Every test runs on SQLite metadata (`sqlite::…`) and on PostgreSQL metadata
//! (`postgres::…`); the checks read either database with the same SQL, and the quota on
//! PostgreSQL, whose metadata takes no room in the data directory, is smaller by what
//! SQLite's takes, so the blobs get the same budget.
//!
//! `EVICTION_MODEL_CASES` (default 96 on SQLite, [`POSTGRES_CASES`] on PostgreSQL, where a
//! case takes longer) sets the number of cases, `EVICTION_MODEL_QUOTA` fixes the quota
//! (as on SQLite), `EVICTION_MODEL_WINDOW` the push window in seconds,
//! `EVICTION_MODEL_DEBUG` prints every pass, `EVICTION_MODEL_SEED` fixes the seed the
//! cases are drawn from (a failure names the one it used).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod backend;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::BuildHasher as _;
use std::path::{Path, PathBuf};
use std::thread::LocalKey;
use std::time::Duration;

use backend::{Backend, Metadata};
use bytes::Bytes;
use futures::StreamExt;
use oci::{Digest, Reference, RepoName, Tag, media_type};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestRunner};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use store::config::{Eviction, Size};
use store::error::Missing;
use store::{ByteStream, Config, Error, GcReport, Store, Trigger};

const REPOS: [&str; 3] = ["app", "cache/app", "other"];
const TAGS: [&str; 4] = ["latest", "v1", "main", "buildcache"];
/// Blobs a case draws from (the same content may be pushed to several repositories).
const POOL: usize = 12;
/// Seconds [`age`] moves the store's clock forward.
const AGE_SECS: i64 = 10;
/// How close the next second of the wall clock must be for [`Op::Tick`] to wait for it.
const TICK_MS: u64 = 300;
/// What SQLite's metadata (its file and write-ahead log) takes of the quota through most
/// of a case (see [`grow_write_ahead_log`]), as measured.
const SQLITE_METADATA: u64 = 1_179_648;
/// The write-ahead log file's size limit the store sets.
const WAL_KEPT_BYTES: i64 = 1 << 20;
/// The push window of the cases that have one: a blob released within one [`age`] step
/// of its last use waits across that step and leaves after the next.
const WINDOW_SECS: u64 = 15;

const CONFIG_MT: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_MT: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const DOCKER_CONFIG_MT: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER_MT: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Images [`a_pass_evicts_past_what_one_round_offers`] stores: more than the 4 096 roots
/// the first round of a pass offers for eviction.
const MANY_IMAGES: usize = 5000;
/// Of those, the images whose layers the low watermark leaves room for.
const IMAGES_KEPT: usize = 400;
/// Each of those images' own layer, in bytes.
const MANY_LAYER: usize = 16_384;
/// Cases of the property test on PostgreSQL, unless `EVICTION_MODEL_CASES` says.
const POSTGRES_CASES: u32 = 48;

backend::on_each_backend! {
    #[test]
    fn eviction_keeps_what_it_serves_complete_and_within_quota;
    #[test]
    fn manifest_put_racing_a_pass_never_points_at_a_swept_blob;
    #[test]
    fn blob_mount_racing_a_pass_never_links_a_swept_blob;
    #[test]
    fn a_pass_counts_the_referrers_that_go_with_an_image;
    #[test]
    fn a_pass_evicts_past_what_one_round_offers;
}

// ---------------------------------------------------------------- helpers

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn sha256(bytes: &[u8]) -> Digest {
    format!("sha256:{:x}", Sha256::digest(bytes))
        .parse()
        .unwrap()
}

fn repo_name(i: usize) -> RepoName {
    REPOS[i].parse().unwrap()
}

fn tag_ref(name: &str) -> Reference {
    Reference::Tag(name.parse::<Tag>().unwrap())
}

/// A blob's size on disk, as the store accounts it.
fn on_disk(size: u64) -> u64 {
    size.div_ceil(4096) * 4096
}

/// The on-disk size of blobs of `sizes`.
fn disk_bytes<'a>(sizes: impl IntoIterator<Item = &'a u64>) -> u64 {
    sizes.into_iter().map(|&s| on_disk(s)).sum()
}

/// Let the wall clock reach its next second if it is at most `within` away: then a use
/// and its recording, or a release and a later use, fall in different seconds, which
/// they seldom do in a fast run.
async fn next_second(within: Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let left = Duration::from_secs(now.as_secs() + 1).saturating_sub(now);
    if left <= within {
        bump(&TICKS, 1);
        tokio::time::sleep(left + Duration::from_millis(2)).await;
    }
}

/// `bytes` as a request body of about `chunks` pieces.
fn body(bytes: &Bytes, chunks: usize) -> ByteStream {
    let step = bytes.len().div_ceil(chunks.max(1)).max(1);
    let pieces: Vec<std::io::Result<Bytes>> = (0..bytes.len())
        .step_by(step)
        .map(|at| Ok(bytes.slice(at..(at + step).min(bytes.len()))))
        .collect();
    Box::pin(futures::stream::iter(pieces))
}

/// Read a whole blob through the store's API.
async fn read_blob(store: &Store, repo: &RepoName, digest: &Digest) -> Result<Vec<u8>, Error> {
    let blob = store.open_blob(repo, digest).await?;
    let size = blob.size;
    let mut stream = blob.stream(None).await?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.map_err(Error::Io)?);
    }
    assert_eq!(
        out.len() as u64,
        size,
        "{digest}: size announced by open_blob"
    );
    Ok(out)
}

/// Move the store's clock `AGE_SECS` forward: shift every stored timestamp back, the
/// seconds of the releases too. (The uses the store keeps in memory until it records
/// them cannot be shifted: the caller has them recorded first.) Runs off the runtime's
/// threads.
async fn age(metadata: &Metadata) {
    let metadata = metadata.clone();
    tokio::task::spawn_blocking(move || metadata.transaction(&format!(
        "UPDATE blobs SET created_at = created_at - {AGE_SECS}, accessed_at = accessed_at - {AGE_SECS};
         UPDATE manifests SET created_at = created_at - {AGE_SECS}, accessed_at = accessed_at - {AGE_SECS};
         UPDATE tags SET updated_at = updated_at - {AGE_SECS}, accessed_at = accessed_at - {AGE_SECS};
         UPDATE uploads SET created_at = created_at - {AGE_SECS};
         UPDATE released_blobs SET released_at = released_at - {AGE_SECS};"
    )))
    .await
    .unwrap();
}

/// Grow SQLite's write-ahead log to the size it keeps once the store has been written to
/// for a while (1 MiB: a checkpoint resets it for reuse and cuts it back to its size limit
/// only when it has grown past it), so the metadata's share of the usage stays the same
/// during a case and a quota a little above it leaves the blobs a steady budget.
fn grow_write_ahead_log(database: &Path) {
    let db = rusqlite::Connection::open(database).unwrap();
    db.busy_timeout(Duration::from_secs(30)).unwrap();
    db.pragma_update(None, "synchronous", "OFF").unwrap();
    // One frame a commit, none checkpointed: the log passes its limit.
    db.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    db.pragma_update(None, "journal_size_limit", WAL_KEPT_BYTES)
        .unwrap();
    db.execute(
        "INSERT INTO uploads (id, repo_id, created_at) VALUES ('warm-up', 0, 0)",
        [],
    )
    .unwrap();
    for i in 0..WAL_KEPT_BYTES / 4096 + 64 {
        db.execute(
            "UPDATE uploads SET created_at = ?1 WHERE id = 'warm-up'",
            [i],
        )
        .unwrap();
    }
    // Checkpointed and restarted, the log is cut back to its limit by the next commit.
    db.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
        .unwrap();
    db.execute("DELETE FROM uploads WHERE id = 'warm-up'", [])
        .unwrap();
}

/// Every committed blob file under `<data_dir>/blobs`, verified to hash to its name
/// (invariant b), with its size.
fn blob_files(data_dir: &Path) -> BTreeMap<Digest, u64> {
    let mut found = BTreeMap::new();
    let root = data_dir.join("blobs");
    for algorithm in std::fs::read_dir(&root).unwrap() {
        let algorithm = algorithm.unwrap();
        assert_eq!(
            algorithm.file_name(),
            "sha256",
            "unexpected entry in blobs/"
        );
        for prefix in std::fs::read_dir(algorithm.path()).unwrap() {
            let prefix = prefix.unwrap();
            let prefix_name = prefix.file_name().to_string_lossy().into_owned();
            for file in std::fs::read_dir(prefix.path()).unwrap() {
                let file = file.unwrap();
                let name = file.file_name().to_string_lossy().into_owned();
                let digest: Digest = format!("sha256:{name}")
                    .parse()
                    .unwrap_or_else(|e| panic!("blob file {name:?} is not a digest: {e}"));
                assert!(
                    name.starts_with(&prefix_name),
                    "{name} under {prefix_name}/"
                );
                let bytes = std::fs::read(file.path()).unwrap();
                assert_eq!(
                    sha256(&bytes),
                    digest,
                    "blob file content hashes to its name"
                );
                found.insert(digest, bytes.len() as u64);
            }
        }
    }
    found
}

/// A repository's manifests and tags, as the metadata holds them.
#[derive(Debug, Default)]
struct StoredRepo {
    /// Digest -> media type, content and the manifest's own last use (its push or a
    /// recorded read).
    manifests: BTreeMap<Digest, (String, Vec<u8>, i64)>,
    /// Tag -> the manifest it names and the tag's last use (set or a recorded read).
    tags: BTreeMap<String, (Digest, i64)>,
}

/// Every repository's manifests and tags, read from the metadata directly: a read
/// through the API is a use of the manifest, which would make every root look used in
/// the second of the next pass. Tags name stored manifests.
fn stored_manifests(metadata: &Metadata) -> Vec<StoredRepo> {
    let dangling: Vec<(i64,)> = metadata.query(
        "SELECT count(*) FROM tags t WHERE NOT EXISTS
         (SELECT 1 FROM manifests m WHERE m.repo_id = t.repo_id AND m.digest = t.digest)",
    );
    assert_eq!(dangling, [(0,)], "tags naming no stored manifest");
    let mut repos: Vec<StoredRepo> = REPOS.iter().map(|_| StoredRepo::default()).collect();
    let repo = |name: &str| -> usize {
        REPOS
            .iter()
            .position(|r| *r == name)
            .unwrap_or_else(|| panic!("metadata of a repository never used: {name}"))
    };
    let manifests: Vec<(String, String, String, Vec<u8>, i64)> = metadata.query(
        "SELECT r.name, m.digest, m.media_type, m.content,
                CASE WHEN m.created_at > m.accessed_at THEN m.created_at ELSE m.accessed_at END
         FROM manifests m JOIN repos r ON r.id = m.repo_id",
    );
    for (name, digest, media_type, content, used) in manifests {
        repos[repo(&name)]
            .manifests
            .insert(digest.parse().unwrap(), (media_type, content, used));
    }
    let tags: Vec<(String, String, String, i64)> = metadata.query(
        "SELECT r.name, t.name, t.digest,
                CASE WHEN t.updated_at > t.accessed_at THEN t.updated_at ELSE t.accessed_at END
         FROM tags t JOIN repos r ON r.id = t.repo_id",
    );
    for (name, tag, digest, used) in tags {
        repos[repo(&name)]
            .tags
            .insert(tag, (digest.parse().unwrap(), used));
    }
    repos
}

/// The blobs the metadata records, each with its last use (upload, check, mount or
/// recorded read), and those marked released, each with the second of its release.
fn stored_blobs(metadata: &Metadata) -> (BTreeMap<Digest, i64>, BTreeMap<Digest, i64>) {
    let read = |sql: &str| -> BTreeMap<Digest, i64> {
        metadata
            .query::<(String, i64)>(sql)
            .into_iter()
            .map(|(d, at)| (d.parse().unwrap(), at))
            .collect()
    };
    (
        read(
            "SELECT digest,
                    CASE WHEN created_at > accessed_at THEN created_at ELSE accessed_at END
             FROM blobs",
        ),
        read("SELECT digest, released_at FROM released_blobs"),
    )
}

/// Open a store in `data_dir` on fresh metadata of `backend`, with a zero grace and in-use
/// window and a push window of `window` seconds, whose only passes are the ones the test
/// runs (see [`Metadata::open_without_background_tasks`]). `max_size` is the quota with
/// SQLite's metadata in it: PostgreSQL's lives outside the quota, which is smaller there by
/// [`SQLITE_METADATA`] over the low watermark, so the blobs get the same budget on both.
fn open(backend: Backend, data_dir: &Path, max_size: u64, window: u64) -> (Store, Metadata) {
    let metadata = backend.create(data_dir);
    let low = u64::from(Eviction::default().low_watermark.0);
    let outside = SQLITE_METADATA * 100 / low;
    let max_size = backend.pick(max_size, max_size.saturating_sub(outside).max(1));
    let config = Config {
        eviction: Eviction {
            max_size: Size::Bytes(max_size),
            min_free: Size::Bytes(0),
            grace: Duration::ZERO,
            in_use: Duration::ZERO,
            push_window: Duration::from_secs(window),
            interval: Duration::from_secs(3600),
            ..Eviction::default()
        },
        ..metadata.config()
    };
    let store = metadata.open_without_background_tasks(&config);
    if let Some(database) = metadata.sqlite_file() {
        grow_write_ahead_log(database);
    }
    (store, metadata)
}

// ---------------------------------------------------------------- statistics

/// A statistic of the run, counted on the test's own thread (where the cases run, inside
/// `block_on`), so the runs on the two backends, side by side, count apart.
type Counter = Cell<u64>;

thread_local! {
    static CASES: Counter = const { Cell::new(0) };
    static WINDOW_CASES: Counter = const { Cell::new(0) };
    static STEPS: Counter = const { Cell::new(0) };
    static PUTS_OK: Counter = const { Cell::new(0) };
    static PUTS_REFUSED: Counter = const { Cell::new(0) };
    static PASSES: Counter = const { Cell::new(0) };
    static PASSES_OVER: Counter = const { Cell::new(0) };
    static PASSES_DISCOUNTED: Counter = const { Cell::new(0) };
    static PASSES_ROUNDS: Counter = const { Cell::new(0) };
    static PASSES_PARTIAL: Counter = const { Cell::new(0) };
    static PASSES_SHORT: Counter = const { Cell::new(0) };
    static PASSES_MET: Counter = const { Cell::new(0) };
    static EVICTED: Counter = const { Cell::new(0) };
    static SWEPT: Counter = const { Cell::new(0) };
    static SWEPT_RELEASED: Counter = const { Cell::new(0) };
    static RELEASED: Counter = const { Cell::new(0) };
    static TAKEN_UP: Counter = const { Cell::new(0) };
    static NOT_TAKEN_UP: Counter = const { Cell::new(0) };
    static SETTLED: Counter = const { Cell::new(0) };
    static TICKS: Counter = const { Cell::new(0) };
    static ROOTS_KEPT_YOUNG: Counter = const { Cell::new(0) };
    static REFERENCED_AGAIN: Counter = const { Cell::new(0) };
    static KEPT_WAITING: Counter = const { Cell::new(0) };
    static KEPT_YOUNG: Counter = const { Cell::new(0) };
    static AGED_OUT: Counter = const { Cell::new(0) };
}

fn bump(counter: &'static LocalKey<Counter>, n: u64) {
    counter.with(|c| c.set(c.get() + n));
}

// ---------------------------------------------------------------- the model

/// A manifest the test built, with what it references.
#[derive(Debug, Clone)]
struct Man {
    digest: Digest,
    media_type: &'static str,
    content: Bytes,
    blobs: Vec<Digest>,
    children: Vec<Digest>,
    subject: Option<Digest>,
}

#[derive(Debug, Default, Clone)]
struct RepoModel {
    /// Every manifest ever stored in the repository.
    known: BTreeMap<Digest, Man>,
    /// Those the store holds.
    present: BTreeSet<Digest>,
    /// Tag -> the manifest last PUT under it.
    tags: BTreeMap<String, Digest>,
    /// Blobs linked into the repository.
    linked: BTreeSet<Digest>,
    /// Manifests deleted by digest (an index listing one may be left dangling).
    user_deleted: BTreeSet<Digest>,
}

/// Bounds of a time the store recorded, in its (shifted) clock's whole seconds: the
/// clock read before the call that recorded it, and after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    lo: i64,
    hi: i64,
}

impl Span {
    /// The clock read before a call (`lo`) and now.
    fn since(lo: i64) -> Span {
        Span { lo, hi: now_secs() }
    }

    /// The later of two times.
    fn max(self, other: Span) -> Span {
        Span {
            lo: self.lo.max(other.lo),
            hi: self.hi.max(other.hi),
        }
    }

    fn contains(self, at: i64) -> bool {
        self.lo <= at && at <= self.hi
    }
}

#[derive(Debug, Default, Clone)]
struct Model {
    repos: Vec<RepoModel>,
    /// Blobs stored, with their sizes.
    stored: BTreeMap<Digest, u64>,
    /// Each stored blob's last use (upload, mount or recorded read).
    last_use: BTreeMap<Digest, Span>,
    /// Blobs the store holds as released, with the second of their last release: a root
    /// that referenced them was evicted or deleted, and no upload, check, mount or read
    /// in a later second took them up since. Only the unreferenced ones count (a root
    /// releasing one again marks it again, in the second it goes).
    released: BTreeMap<Digest, Span>,
    /// Released blobs a use may or may not have taken up: the model's bounds do not
    /// tell whether the use came in a later second than the release. The next look at
    /// the metadata settles it.
    undecided: BTreeSet<Digest>,
    /// Blobs read (checked, mounted, pulled), not yet recorded, with the second of the
    /// latest read: the store records each at its own second, when it flushes.
    pending_reads: BTreeMap<Digest, Span>,
    /// Each present manifest's own last use (push or recorded read), by repository.
    manifest_use: BTreeMap<(usize, Digest), Span>,
    /// Each tag's last use (set or recorded read), by repository.
    tag_use: BTreeMap<(usize, String), Span>,
    /// Manifests read, not yet recorded, with the second of the latest read.
    pending_manifest_reads: BTreeMap<(usize, Digest), Span>,
    /// Tags read, not yet recorded, with the second of the latest read.
    pending_tag_reads: BTreeMap<(usize, String), Span>,
    /// The push window, in seconds.
    window: i64,
}

impl Model {
    fn new(window: u64) -> Model {
        Model {
            repos: vec![RepoModel::default(); REPOS.len()],
            window: window as i64,
            ..Model::default()
        }
    }

    /// `digest` was used at `at`: its last use is at least that.
    fn used(&mut self, digest: &Digest, at: Span) {
        let span = self.last_use.entry(digest.clone()).or_insert(at);
        *span = span.max(at);
    }

    /// A use of `digest` at `at` takes it up if it was released in an earlier second: it
    /// waits for a manifest again, like a blob just pushed. One in the second of the
    /// release, or before it (a read recorded late), does not.
    fn take_up(&mut self, digest: &Digest, at: Span) {
        let Some(&released) = self.released.get(digest) else {
            return;
        };
        if at.lo > released.hi {
            self.released.remove(digest);
            self.undecided.remove(digest);
            if !self.referenced().contains(digest) {
                bump(&TAKEN_UP, 1);
            }
        } else if at.hi > released.lo {
            self.undecided.insert(digest.clone());
        } else if !self.referenced().contains(digest) {
            bump(&NOT_TAKEN_UP, 1);
        }
    }

    /// Settle the undecided take-ups from the blobs the metadata holds as released.
    fn settle(&mut self, released: &BTreeMap<Digest, i64>) {
        for d in std::mem::take(&mut self.undecided) {
            let referenced = self.referenced().contains(&d);
            bump(&SETTLED, 1);
            if released.contains_key(&d) {
                bump(&NOT_TAKEN_UP, u64::from(!referenced));
            } else {
                self.released.remove(&d);
                bump(&TAKEN_UP, u64::from(!referenced));
            }
        }
    }

    /// The store recorded the pending reads, each at its own second (taking up the
    /// released blobs read after the second of their release), on what is still there.
    fn flush(&mut self) {
        for (d, at) in std::mem::take(&mut self.pending_reads) {
            if self.stored.contains_key(&d) {
                self.take_up(&d, at);
                self.used(&d, at);
            }
        }
        for (key, at) in std::mem::take(&mut self.pending_manifest_reads) {
            if let Some(span) = self.manifest_use.get_mut(&key) {
                *span = span.max(at);
            }
        }
        for (key, at) in std::mem::take(&mut self.pending_tag_reads) {
            if let Some(span) = self.tag_use.get_mut(&key) {
                *span = span.max(at);
            }
        }
    }

    /// The store's clock moved `AGE_SECS` forward (with no reads pending).
    fn age(&mut self) {
        assert!(
            self.pending_reads.is_empty()
                && self.pending_manifest_reads.is_empty()
                && self.pending_tag_reads.is_empty()
        );
        let spans = self
            .last_use
            .values_mut()
            .chain(self.manifest_use.values_mut())
            .chain(self.tag_use.values_mut())
            .chain(self.released.values_mut());
        for span in spans {
            span.lo -= AGE_SECS;
            span.hi -= AGE_SECS;
        }
    }

    /// Forget the last uses of the manifests and tags gone (pushed again, they start
    /// afresh).
    fn forget_gone(&mut self) {
        let repos = &self.repos;
        self.manifest_use
            .retain(|(repo, d), _| repos[*repo].present.contains(d));
        self.tag_use
            .retain(|(repo, t), _| repos[*repo].tags.contains_key(t));
    }

    /// Manifest `digest`'s last use in `repo` as eviction sees it: its own, or any of its
    /// tags'.
    fn manifest_last_use(&self, repo: usize, digest: &Digest) -> Span {
        self.repos[repo]
            .tags
            .iter()
            .filter(|(_, d)| *d == digest)
            .map(|(t, _)| self.tag_use[&(repo, t.clone())])
            .fold(self.manifest_use[&(repo, digest.clone())], Span::max)
    }

    fn referenced(&self) -> BTreeSet<Digest> {
        self.repos
            .iter()
            .flat_map(|r| {
                r.present
                    .iter()
                    .flat_map(|d| r.known[d].blobs.iter().cloned())
            })
            .collect()
    }

    /// On-disk bytes of the released blobs nothing references: waiting out the window.
    fn waiting_bytes(&self) -> u64 {
        let referenced = self.referenced();
        disk_bytes(
            self.released
                .keys()
                .filter(|d| !referenced.contains(*d))
                .filter_map(|d| self.stored.get(d)),
        )
    }

    /// Mark released, at `at`, the blobs `man` referenced that nothing references now.
    fn release(&mut self, man: &Man, at: Span) {
        let referenced = self.referenced();
        for blob in man.blobs.iter().collect::<BTreeSet<_>>() {
            if self.stored.contains_key(blob) && !referenced.contains(blob) {
                self.released.insert(blob.clone(), at);
                self.undecided.remove(blob);
                bump(&RELEASED, 1);
            }
        }
    }
}

/// What the store shows, read back after a step.
#[derive(Debug)]
struct Observed {
    present: Vec<BTreeSet<Digest>>,
    tags: Vec<BTreeMap<String, Digest>>,
    files: BTreeMap<Digest, u64>,
    /// Each stored manifest's own last use, by repository.
    manifest_use: BTreeMap<(usize, Digest), i64>,
    /// Each tag's last use, by repository.
    tag_use: BTreeMap<(usize, String), i64>,
    /// Each blob's last use, as the metadata records it.
    blob_use: BTreeMap<Digest, i64>,
    /// The blobs marked released, with the second of the release.
    released: BTreeMap<Digest, i64>,
}

impl Observed {
    /// Manifest `digest`'s last use in `repo` as eviction sees it: its own, or any of its
    /// tags'.
    fn last_use(&self, repo: usize, digest: &Digest) -> i64 {
        self.tags[repo]
            .iter()
            .filter(|(_, d)| *d == digest)
            .map(|(t, _)| self.tag_use[&(repo, t.clone())])
            .fold(self.manifest_use[&(repo, digest.clone())], i64::max)
    }
}

/// What a pass did to the unreferenced blobs, replayed on the model.
#[derive(Debug, Default)]
struct Replayed {
    /// Blobs swept.
    swept: BTreeSet<Digest>,
    /// Every unreferenced blob the pass looked at, with whether it was released.
    classified: BTreeMap<Digest, bool>,
    /// Released blobs left waiting out the window.
    waiting: BTreeSet<Digest>,
    /// Unreferenced blobs never released (or taken up) left inside the grace.
    young: BTreeSet<Digest>,
    /// The released blobs after the pass.
    released: BTreeMap<Digest, Span>,
    /// Bytes the last round could not count towards what the low watermark needs.
    shortfall: u64,
    /// Untagged roots the last round kept as pushed within the window.
    kept_young: u64,
    /// Rounds that evicted.
    rounds: u64,
}

/// The store's manifests and blobs as a pass changes them, replayed on the model.
#[derive(Clone)]
struct PassState<'a> {
    /// Every manifest the model pushed, per repository.
    repos: &'a [RepoModel],
    present: Vec<BTreeSet<Digest>>,
    tags: Vec<BTreeMap<String, Digest>>,
    stored: BTreeMap<Digest, u64>,
    released: BTreeMap<Digest, Span>,
    /// Blobs the evicted roots released.
    released_now: BTreeSet<Digest>,
    /// When the pass ran: the second of the releases it makes.
    now: Span,
}

impl<'a> PassState<'a> {
    fn new(m: &'a Model, now: Span) -> PassState<'a> {
        PassState {
            repos: &m.repos,
            present: m.repos.iter().map(|r| r.present.clone()).collect(),
            tags: m.repos.iter().map(|r| r.tags.clone()).collect(),
            stored: m.stored.clone(),
            released: m.released.clone(),
            released_now: BTreeSet::new(),
            now,
        }
    }

    fn referenced(&self) -> BTreeSet<&Digest> {
        self.present
            .iter()
            .zip(self.repos)
            .flat_map(|(present, r)| present.iter().flat_map(|d| &r.known[d].blobs))
            .collect()
    }

    fn unreferenced(&self) -> Vec<Digest> {
        let referenced = self.referenced();
        self.stored
            .keys()
            .filter(|d| !referenced.contains(d))
            .cloned()
            .collect()
    }

    /// Whether `digest` is a root of `repo`: there, listed by no manifest there, and its
    /// subject (if any) not there.
    fn is_root(&self, repo: usize, digest: &Digest) -> bool {
        let (present, known) = (&self.present[repo], &self.repos[repo].known);
        present.contains(digest)
            && !present.iter().any(|p| known[p].children.contains(digest))
            && known[digest]
                .subject
                .as_ref()
                .is_none_or(|s| !present.contains(s))
    }

    fn roots(&self) -> BTreeSet<(usize, Digest)> {
        (0..REPOS.len())
            .flat_map(|repo| {
                self.present[repo]
                    .iter()
                    .filter(move |d| self.is_root(repo, d))
                    .map(move |d| (repo, d.clone()))
            })
            .collect()
    }

    /// Remove manifest `digest` from `repo` with its tags; returns what it referenced
    /// (its blobs and child manifests).
    fn remove(&mut self, repo: usize, digest: &Digest) -> Vec<Digest> {
        self.present[repo].remove(digest);
        self.tags[repo].retain(|_, d| d != digest);
        let man = &self.repos[repo].known[digest];
        man.blobs.iter().chain(&man.children).cloned().collect()
    }

    /// Mark released those of `digests` that are stored blobs nothing references now
    /// and that are not counted yet (counting them); returns their bytes on disk.
    fn release(&mut self, digests: &[Digest], counted: &mut BTreeSet<Digest>) -> u64 {
        let referenced: BTreeSet<Digest> = self.referenced().into_iter().cloned().collect();
        let mut bytes = 0;
        for d in digests {
            if let Some(&size) = self.stored.get(d)
                && !referenced.contains(d)
                && counted.insert(d.clone())
            {
                self.released.insert(d.clone(), self.now);
                self.released_now.insert(d.clone());
                bytes += on_disk(size);
            }
        }
        bytes
    }

    /// What the manifests that removing root `removed` of `repo` (which referenced
    /// `references`) leaves to go after it would release in turn, not counted yet (now
    /// counted): the untagged child manifests nothing else lists and the untagged
    /// referrers of whatever goes, all the way down. The pass counts it as freed, and
    /// evicts them as roots in later rounds.
    fn orphaned_release(
        &self,
        repo: usize,
        removed: &Digest,
        references: &[Digest],
        counted: &mut BTreeSet<Digest>,
    ) -> u64 {
        let mut simulated = self.clone();
        let mut frontier: BTreeSet<Digest> = references.iter().cloned().collect();
        let mut gone = BTreeSet::from([removed.clone()]);
        loop {
            let known = &simulated.repos[repo].known;
            let orphans: Vec<Digest> = simulated.present[repo]
                .iter()
                .filter(|d| {
                    frontier.contains(*d)
                        || known[*d].subject.as_ref().is_some_and(|s| gone.contains(s))
                })
                .filter(|d| {
                    simulated.is_root(repo, d) && !simulated.tags[repo].values().any(|t| t == *d)
                })
                .cloned()
                .collect();
            if orphans.is_empty() {
                break;
            }
            for orphan in orphans {
                frontier.extend(simulated.remove(repo, &orphan));
                gone.insert(orphan);
            }
        }
        simulated.release(&frontier.into_iter().collect::<Vec<_>>(), counted)
    }
}

// ---------------------------------------------------------------- operations

#[derive(Debug, Clone)]
enum Op {
    PushBlobs {
        repo: usize,
        blobs: Vec<usize>,
        chunked: bool,
    },
    Mount {
        repo: usize,
        from: Option<usize>,
        blob: usize,
    },
    Head {
        repo: usize,
        blob: usize,
    },
    PushImage {
        repo: usize,
        config: usize,
        layers: Vec<usize>,
        tag: Option<usize>,
        docker: bool,
        nonce: u8,
        upload_first: bool,
    },
    PushIndex {
        repo: usize,
        children: Vec<Index>,
        tag: Option<usize>,
        docker: bool,
        nonce: u8,
    },
    PushCache {
        repo: usize,
        config: usize,
        layers: Vec<usize>,
        tag: Option<usize>,
        nonce: u8,
        upload_first: bool,
    },
    PushReferrer {
        repo: usize,
        subject: Index,
        blob: usize,
        nonce: u8,
    },
    MoveTag {
        repo: usize,
        tag: usize,
        target: Index,
    },
    DeleteTag {
        repo: usize,
        tag: usize,
    },
    DeleteManifest {
        repo: usize,
        target: Index,
    },
    Pull {
        repo: usize,
        target: Index,
        by_tag: bool,
    },
    Age,
    /// Let the wall clock reach its next second if it is at most [`TICK_MS`] away.
    Tick,
    Gc,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let repo = || 0..REPOS.len();
    let blob = || 0..POOL;
    let tag = || proptest::option::weighted(0.6, 0..TAGS.len());
    let nonce = || 0u8..3;
    prop_oneof![
        6 => (repo(), prop::collection::vec(blob(), 1..4), any::<bool>())
            .prop_map(|(repo, blobs, chunked)| Op::PushBlobs { repo, blobs, chunked }),
        2 => (repo(), proptest::option::of(repo()), blob())
            .prop_map(|(repo, from, blob)| Op::Mount { repo, from, blob }),
        2 => (repo(), blob()).prop_map(|(repo, blob)| Op::Head { repo, blob }),
        6 => (repo(), blob(), prop::collection::vec(blob(), 0..3), tag(), any::<bool>(), nonce(),
              prop::bool::weighted(0.85))
            .prop_map(|(repo, config, layers, tag, docker, nonce, upload_first)| Op::PushImage {
                repo, config, layers, tag, docker, nonce, upload_first,
            }),
        3 => (repo(), prop::collection::vec(any::<Index>(), 1..4), tag(), any::<bool>(), nonce())
            .prop_map(|(repo, children, tag, docker, nonce)| Op::PushIndex {
                repo, children, tag, docker, nonce,
            }),
        2 => (repo(), blob(), prop::collection::vec(blob(), 1..3), tag(), nonce(),
              prop::bool::weighted(0.85))
            .prop_map(|(repo, config, layers, tag, nonce, upload_first)| Op::PushCache {
                repo, config, layers, tag, nonce, upload_first,
            }),
        2 => (repo(), any::<Index>(), blob(), nonce())
            .prop_map(|(repo, subject, blob, nonce)| Op::PushReferrer { repo, subject, blob, nonce }),
        2 => (repo(), 0..TAGS.len(), any::<Index>())
            .prop_map(|(repo, tag, target)| Op::MoveTag { repo, tag, target }),
        1 => (repo(), 0..TAGS.len()).prop_map(|(repo, tag)| Op::DeleteTag { repo, tag }),
        1 => (repo(), any::<Index>()).prop_map(|(repo, target)| Op::DeleteManifest { repo, target }),
        3 => (repo(), any::<Index>(), any::<bool>())
            .prop_map(|(repo, target, by_tag)| Op::Pull { repo, target, by_tag }),
        4 => Just(Op::Age),
        2 => Just(Op::Tick),
        4 => Just(Op::Gc),
    ]
}

/// A case: blob sizes, a content seed, the quota's headroom over the metadata, the push
/// window in seconds, the steps, and whether the final pulls go on in the wall clock's
/// next second (so the final pass records reads of an earlier second than its own, and
/// of two seconds).
#[derive(Debug, Clone)]
struct Case {
    sizes: Vec<usize>,
    seed: u64,
    max_size: u64,
    window: u64,
    ops: Vec<Op>,
    last_pass_later: bool,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    let size = prop_oneof![
        1 => Just(0usize),
        4 => 1usize..4096,
        3 => 4096usize..160_000,
    ];
    (
        prop::collection::vec(size, POOL),
        any::<u64>(),
        quota_strategy(),
        window_strategy(),
        prop::collection::vec(op_strategy(), 40..80),
        prop::bool::weighted(0.125),
    )
        .prop_map(
            |(sizes, seed, max_size, window, ops, last_pass_later)| Case {
                sizes,
                seed,
                max_size,
                window,
                ops,
                last_pass_later,
            },
        )
}

/// No push window (released blobs leave at the next pass, like any unreferenced one),
/// or one a released blob waits across an [`age`] step in.
fn window_strategy() -> impl Strategy<Value = u64> {
    if let Some(w) = std::env::var("EVICTION_MODEL_WINDOW")
        .ok()
        .and_then(|w| w.parse().ok())
    {
        return Just(w).boxed();
    }
    prop_oneof![Just(0), Just(WINDOW_SECS)].boxed()
}

fn quota_strategy() -> impl Strategy<Value = u64> {
    if let Some(q) = std::env::var("EVICTION_MODEL_QUOTA")
        .ok()
        .and_then(|q| q.parse().ok())
    {
        return Just(q).boxed();
    }
    // A tiny quota that nothing fits in, or one whose low watermark leaves the blobs
    // (beside SQLite's metadata, [`SQLITE_METADATA`]) from less than nothing to about
    // 500 KB; mostly one that leaves them about 0 to 260 KB, so passes evict part of
    // what is stored and stop at the low watermark.
    prop_oneof![
        1 => Just(64u64 * 1024),
        1 => (-180_000i64..-20_000).prop_map(quota_leaving),
        4 => (-20_000i64..260_000).prop_map(quota_leaving),
        1 => (260_000i64..500_000).prop_map(quota_leaving),
    ]
    .boxed()
}

/// The quota whose low watermark (the default, as the cases use) leaves `blobs` bytes
/// to the blobs beside SQLite's metadata.
fn quota_leaving(blobs: i64) -> u64 {
    let low = i64::from(Eviction::default().low_watermark.0);
    ((SQLITE_METADATA as i64 + blobs) * 100 / low) as u64
}

/// Deterministic pseudo-random content for pool entry `i`.
fn content(seed: u64, i: usize, len: usize) -> Bytes {
    let mut x = seed ^ ((i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    if let Some(first) = out.first_mut() {
        *first = i as u8;
    }
    Bytes::from(out)
}

// ---------------------------------------------------------------- the harness

struct Harness {
    store: Store,
    data_dir: PathBuf,
    metadata: Metadata,
    pool: Vec<(Digest, Bytes)>,
    m: Model,
    step: usize,
}

impl Harness {
    fn ctx(&self, what: &str) -> String {
        format!("step {}: {what}", self.step)
    }

    // ---- blobs

    async fn push_blob(&mut self, repo: usize, blob: usize, chunked: bool) {
        let (digest, bytes) = self.pool[blob].clone();
        let name = repo_name(repo);
        let at = now_secs();
        let size = if chunked {
            let id = self.store.start_upload(&name).await.unwrap();
            let half = bytes.len() / 2;
            let first = bytes.slice(..half);
            let len = self
                .store
                .append_upload(&name, &id, Some(0), body(&first, 2))
                .await
                .unwrap();
            assert_eq!(len, half as u64);
            let rest = bytes.slice(half..);
            let len = self
                .store
                .append_upload(&name, &id, Some(len), body(&rest, 3))
                .await
                .unwrap();
            assert_eq!(len, bytes.len() as u64);
            self.store.finish_upload(&name, &id, &digest).await.unwrap()
        } else {
            self.store
                .put_blob(&name, &digest, body(&bytes, 3))
                .await
                .unwrap()
        };
        assert_eq!(size, bytes.len() as u64, "{}", self.ctx("pushed size"));
        let at = Span::since(at);
        self.m.repos[repo].linked.insert(digest.clone());
        self.m.stored.insert(digest.clone(), size);
        self.m.take_up(&digest, at);
        self.m.used(&digest, at);
    }

    async fn mount(&mut self, repo: usize, from: Option<usize>, blob: usize) {
        let digest = self.pool[blob].0.clone();
        let expected = match from {
            Some(f) => self.m.repos[f].linked.contains(&digest),
            None => self.m.repos.iter().any(|r| r.linked.contains(&digest)),
        };
        let at = now_secs();
        let from_name = from.map(repo_name);
        let mounted = self
            .store
            .mount_blob(&repo_name(repo), &digest, from_name.as_ref())
            .await
            .unwrap()
            .is_some();
        assert_eq!(
            mounted,
            expected,
            "{}",
            self.ctx(&format!("mount {digest}"))
        );
        if mounted {
            // Linking records the time (and takes up a blob released in an earlier
            // second); the mount is also a read, recorded at its second when the store
            // next flushes its reads.
            let at = Span::since(at);
            self.m.repos[repo].linked.insert(digest.clone());
            self.m.take_up(&digest, at);
            self.m.used(&digest, at);
            self.m.pending_reads.insert(digest, at);
        }
    }

    /// Check a blob like a client's HEAD: found if linked into `repo`, and a read,
    /// recorded at its second when the store next flushes its reads.
    async fn head(&mut self, repo: usize, blob: usize) {
        let digest = self.pool[blob].0.clone();
        let expected = self.m.repos[repo]
            .linked
            .contains(&digest)
            .then(|| self.m.stored[&digest]);
        let at = now_secs();
        let found = match self.store.open_blob(&repo_name(repo), &digest).await {
            Ok(blob) => Some(blob.size),
            Err(Error::NotFound(Missing::Blob)) => None,
            Err(e) => panic!("{}: {e}", self.ctx(&format!("HEAD {digest}"))),
        };
        assert_eq!(
            found,
            expected,
            "{}",
            self.ctx(&format!("HEAD {digest} in {}", REPOS[repo]))
        );
        if found.is_some() {
            self.m.pending_reads.insert(digest, Span::since(at));
        }
    }

    // ---- manifests

    fn blob_descriptor(&self, mt: &str, blob: usize) -> serde_json::Value {
        let (digest, bytes) = &self.pool[blob];
        json!({"mediaType": mt, "digest": digest.to_string(), "size": bytes.len()})
    }

    fn man_descriptor(man: &Man) -> serde_json::Value {
        json!({"mediaType": man.media_type, "digest": man.digest.to_string(), "size": man.content.len()})
    }

    fn man(
        media_type: &'static str,
        value: &serde_json::Value,
        blobs: Vec<Digest>,
        children: Vec<Digest>,
        subject: Option<Digest>,
    ) -> Man {
        let (digest, content) = manifest_of(value);
        Man {
            digest,
            media_type,
            content,
            blobs,
            children,
            subject,
        }
    }

    fn image(&self, config: usize, layers: &[usize], docker: bool, nonce: u8) -> Man {
        let (mt, config_mt, layer_mt) = if docker {
            (
                media_type::DOCKER_MANIFEST,
                DOCKER_CONFIG_MT,
                DOCKER_LAYER_MT,
            )
        } else {
            (media_type::OCI_MANIFEST, CONFIG_MT, LAYER_MT)
        };
        let value = json!({
            "schemaVersion": 2,
            "mediaType": mt,
            "config": self.blob_descriptor(config_mt, config),
            "layers": layers.iter().map(|&l| self.blob_descriptor(layer_mt, l)).collect::<Vec<_>>(),
            "annotations": {"nonce": nonce.to_string()},
        });
        let blobs = std::iter::once(config)
            .chain(layers.iter().copied())
            .map(|b| self.pool[b].0.clone())
            .collect();
        Self::man(mt, &value, blobs, Vec::new(), None)
    }

    fn cache_index(&self, config: usize, layers: &[usize], nonce: u8) -> Man {
        let mut entries: Vec<_> = layers
            .iter()
            .map(|&l| self.blob_descriptor(LAYER_MT, l))
            .collect();
        entries.push(self.blob_descriptor(media_type::BUILDKIT_CACHE_CONFIG, config));
        let value = json!({
            "schemaVersion": 2,
            "mediaType": media_type::OCI_INDEX,
            "manifests": entries,
            "annotations": {"nonce": nonce.to_string()},
        });
        let blobs = layers
            .iter()
            .copied()
            .chain(std::iter::once(config))
            .map(|b| self.pool[b].0.clone())
            .collect();
        Self::man(media_type::OCI_INDEX, &value, blobs, Vec::new(), None)
    }

    fn index(children: &[Man], docker: bool, nonce: u8) -> Man {
        let mt = if docker {
            media_type::DOCKER_MANIFEST_LIST
        } else {
            media_type::OCI_INDEX
        };
        let value = json!({
            "schemaVersion": 2,
            "mediaType": mt,
            "manifests": children.iter().map(Self::man_descriptor).collect::<Vec<_>>(),
            "annotations": {"nonce": nonce.to_string()},
        });
        let digests = children.iter().map(|c| c.digest.clone()).collect();
        Self::man(mt, &value, Vec::new(), digests, None)
    }

    fn referrer(&self, subject: &Man, blob: usize, nonce: u8) -> Man {
        let value = json!({
            "schemaVersion": 2,
            "mediaType": media_type::OCI_MANIFEST,
            "artifactType": "application/vnd.example.signature",
            "config": self.blob_descriptor("application/vnd.oci.empty.v1+json", blob),
            "layers": [self.blob_descriptor("application/vnd.example.signature.layer", blob)],
            "subject": Self::man_descriptor(subject),
            "annotations": {"nonce": nonce.to_string()},
        });
        let d = self.pool[blob].0.clone();
        Self::man(
            media_type::OCI_MANIFEST,
            &value,
            vec![d.clone(), d],
            Vec::new(),
            Some(subject.digest.clone()),
        )
    }

    fn pick_known(&self, repo: usize, index: &Index) -> Option<Man> {
        let known = &self.m.repos[repo].known;
        if known.is_empty() {
            return None;
        }
        known.values().nth(index.index(known.len())).cloned()
    }

    /// PUT `man` in `repo` under `tag` (else by digest); the model predicts the outcome.
    async fn put(&mut self, repo: usize, man: Man, tag: Option<&str>) {
        let r = &self.m.repos[repo];
        let mut missing: Vec<(Digest, &'static str)> = man
            .blobs
            .iter()
            .filter(|b| !r.linked.contains(*b))
            .map(|b| (b.clone(), "blob"))
            .collect();
        missing.extend(
            man.children
                .iter()
                .filter(|c| !r.present.contains(*c))
                .map(|c| (c.clone(), "manifest")),
        );
        let reference = match tag {
            Some(t) => tag_ref(t),
            None => Reference::Digest(man.digest.clone()),
        };
        let at = now_secs();
        let result = self
            .store
            .put_manifest(
                &repo_name(repo),
                &reference,
                Some(man.media_type),
                man.content.clone(),
            )
            .await;
        let put_at = Span {
            lo: at,
            hi: now_secs(),
        };
        let what = self.ctx(&format!(
            "PUT {} {} in {} (missing {missing:?})",
            man.media_type, man.digest, REPOS[repo]
        ));
        match result {
            Ok(put) => {
                assert!(missing.is_empty(), "{what}: accepted");
                assert_eq!(put.digest, man.digest, "{what}");
                assert_eq!(put.subject, man.subject, "{what}");
                bump(&PUTS_OK, 1);
                let referenced = self.m.referenced();
                let again = man
                    .blobs
                    .iter()
                    .filter(|b| self.m.released.contains_key(*b) && !referenced.contains(*b))
                    .collect::<BTreeSet<_>>()
                    .len();
                bump(&REFERENCED_AGAIN, again as u64);
                // A new manifest is used now; one pushed again is used again.
                let used = self
                    .m
                    .manifest_use
                    .entry((repo, man.digest.clone()))
                    .or_insert(put_at);
                *used = used.max(put_at);
                if let Some(t) = tag {
                    // Setting the tag is its use now (a read of it may have been later).
                    let used = self.m.tag_use.entry((repo, t.to_owned())).or_insert(put_at);
                    *used = Span {
                        lo: put_at.lo,
                        hi: used.hi.max(put_at.hi),
                    };
                }
                let r = &mut self.m.repos[repo];
                r.present.insert(man.digest.clone());
                r.user_deleted.remove(&man.digest);
                if let Some(t) = tag {
                    r.tags.insert(t.to_owned(), man.digest.clone());
                }
                r.known.insert(man.digest.clone(), man);
            }
            Err(Error::ManifestBlobUnknown { digest, kind }) => {
                assert!(
                    missing.contains(&(digest.clone(), kind)),
                    "{what}: refused for {kind} {digest}"
                );
                bump(&PUTS_REFUSED, 1);
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }

    // ---- reads

    /// Pull `man` like a client: every blob through the API, child manifests too.
    async fn pull_contents(&mut self, repo: usize, man: &Man) {
        let name = repo_name(repo);
        for blob in &man.blobs {
            let at = now_secs();
            let bytes = read_blob(&self.store, &name, blob)
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "{}: {e}",
                        self.ctx(&format!("pull blob {blob} of {}", man.digest))
                    )
                });
            assert_eq!(sha256(&bytes), *blob, "{}", self.ctx("pulled blob content"));
            self.m.pending_reads.insert(blob.clone(), Span::since(at));
        }
        for child in &man.children {
            let at = now_secs();
            let got = self
                .store
                .get_manifest(&name, &Reference::Digest(child.clone()))
                .await;
            let r = &self.m.repos[repo];
            match got {
                Ok(stored) => {
                    assert!(r.present.contains(child), "{}", self.ctx("child served"));
                    let child_man = r.known[child].clone();
                    assert_eq!(stored.content, child_man.content);
                    self.m
                        .pending_manifest_reads
                        .insert((repo, child.clone()), Span::since(at));
                    Box::pin(self.pull_contents(repo, &child_man)).await;
                }
                Err(Error::NotFound(Missing::Manifest)) => assert!(
                    r.user_deleted.contains(child),
                    "{}",
                    self.ctx(&format!("child {child} of {} missing", man.digest))
                ),
                Err(e) => panic!("{}: {e}", self.ctx("pull child")),
            }
        }
    }

    async fn pull(&mut self, repo: usize, target: &Index, by_tag: bool) {
        let r = &self.m.repos[repo];
        let (reference, expected) = if by_tag && !r.tags.is_empty() {
            let (t, d) = r.tags.iter().nth(target.index(r.tags.len())).unwrap();
            (tag_ref(t), Some(d.clone()))
        } else if let Some(man) = self.pick_known(repo, target) {
            let present = r.present.contains(&man.digest);
            (
                Reference::Digest(man.digest.clone()),
                present.then_some(man.digest),
            )
        } else {
            return;
        };
        let at = now_secs();
        let got = self.store.get_manifest(&repo_name(repo), &reference).await;
        let at = Span::since(at);
        match (got, expected) {
            (Ok(stored), Some(d)) => {
                let man = self.m.repos[repo].known[&d].clone();
                assert_eq!(stored.digest, d, "{}", self.ctx("pulled digest"));
                assert_eq!(
                    stored.content,
                    man.content,
                    "{}",
                    self.ctx("pulled content")
                );
                assert_eq!(stored.media_type, man.media_type);
                if let Reference::Tag(t) = &reference {
                    self.m.pending_tag_reads.insert((repo, t.to_string()), at);
                }
                self.m.pending_manifest_reads.insert((repo, d), at);
                self.pull_contents(repo, &man).await;
            }
            (Err(Error::NotFound(Missing::Manifest)), None) => {}
            (got, expected) => panic!(
                "{}: got {:?}, expected {expected:?}",
                self.ctx(&format!("pull {reference}")),
                got.map(|m| m.digest)
            ),
        }
    }

    // ---- deletions

    async fn delete_tag(&mut self, repo: usize, tag: usize) {
        let t = TAGS[tag];
        let result = self
            .store
            .delete_manifest(&repo_name(repo), &tag_ref(t))
            .await;
        let had = self.m.repos[repo].tags.remove(t).is_some();
        match result {
            Ok(()) => assert!(had, "{}", self.ctx("deleted an unknown tag")),
            Err(Error::NotFound(Missing::Manifest)) => {
                assert!(!had, "{}", self.ctx("tag to delete not found"));
            }
            Err(e) => panic!("{}: {e}", self.ctx("delete tag")),
        }
        self.m.forget_gone();
    }

    async fn delete_manifest(&mut self, repo: usize, target: &Index) {
        let Some(man) = self.pick_known(repo, target) else {
            return;
        };
        let at = now_secs();
        let result = self
            .store
            .delete_manifest(&repo_name(repo), &Reference::Digest(man.digest.clone()))
            .await;
        let at = Span::since(at);
        let r = &mut self.m.repos[repo];
        let had = r.present.remove(&man.digest);
        match result {
            Ok(()) => assert!(had, "{}", self.ctx("deleted an absent manifest")),
            Err(Error::NotFound(Missing::Manifest)) => {
                assert!(!had, "{}", self.ctx("manifest to delete not found"));
            }
            Err(e) => panic!("{}: {e}", self.ctx("delete manifest")),
        }
        r.tags.retain(|_, d| *d != man.digest);
        r.user_deleted.insert(man.digest.clone());
        if had {
            // The blobs it leaves unreferenced are released (its children stay roots).
            self.m.release(&man, at);
        }
        self.m.forget_gone();
    }

    // ---- observation and invariants

    /// Read the store back: manifests and tags from the metadata (see
    /// [`stored_manifests`]), the tag listing through the API, blob files from disk, the
    /// blobs' last uses and release marks from the metadata.
    async fn observe(&self) -> Observed {
        let stored = stored_manifests(&self.metadata);
        let mut seen = Observed {
            present: Vec::new(),
            tags: Vec::new(),
            files: blob_files(&self.data_dir),
            manifest_use: BTreeMap::new(),
            tag_use: BTreeMap::new(),
            blob_use: BTreeMap::new(),
            released: BTreeMap::new(),
        };
        for (i, (r, stored)) in self.m.repos.iter().zip(stored).enumerate() {
            for (digest, (media_type, content, used)) in stored.manifests {
                let man = r.known.get(&digest).unwrap_or_else(|| {
                    panic!(
                        "{}",
                        self.ctx(&format!("{digest} stored in {}, never pushed", REPOS[i]))
                    )
                });
                assert_eq!(&content[..], &man.content[..], "{}", self.ctx("content"));
                assert_eq!(media_type, man.media_type, "{}", self.ctx("media type"));
                seen.manifest_use.insert((i, digest), used);
            }
            seen.present.push(
                seen.manifest_use
                    .keys()
                    .filter(|(repo, _)| *repo == i)
                    .map(|(_, d)| d.clone())
                    .collect(),
            );
            let listed: BTreeSet<String> = match self.store.tags(&repo_name(i), 1000, None).await {
                Ok(page) => page.items.into_iter().collect(),
                Err(Error::NotFound(Missing::Repository)) => BTreeSet::new(),
                Err(e) => panic!("{}: {e}", self.ctx("tags")),
            };
            assert_eq!(
                listed,
                stored.tags.keys().cloned().collect(),
                "{}",
                self.ctx(&format!("tags listed in {}", REPOS[i]))
            );
            let mut tagged = BTreeMap::new();
            for (tag, (digest, used)) in stored.tags {
                seen.tag_use.insert((i, tag.clone()), used);
                tagged.insert(tag, digest);
            }
            seen.tags.push(tagged);
        }
        (seen.blob_use, seen.released) = stored_blobs(&self.metadata);
        seen
    }

    /// Invariants that hold after every step, with the model updated to the step.
    async fn check_state(&self, seen: &Observed) {
        for (i, r) in self.m.repos.iter().enumerate() {
            assert_eq!(
                seen.present[i],
                r.present,
                "{}",
                self.ctx(&format!("manifests in {}", REPOS[i]))
            );
            assert_eq!(
                seen.tags[i],
                r.tags,
                "{}",
                self.ctx(&format!("tags in {}", REPOS[i]))
            );
            // (a) what is served is complete: blobs stored and linked, children present.
            for d in &r.present {
                let man = &r.known[d];
                for blob in &man.blobs {
                    assert!(
                        seen.files.contains_key(blob) && r.linked.contains(blob),
                        "{}",
                        self.ctx(&format!(
                            "{d} in {} references missing blob {blob}",
                            REPOS[i]
                        ))
                    );
                }
                for child in &man.children {
                    assert!(
                        r.present.contains(child) || r.user_deleted.contains(child),
                        "{}",
                        self.ctx(&format!("index {d} in {} lists missing {child}", REPOS[i]))
                    );
                }
            }
            for blob in &r.linked {
                assert!(
                    seen.files.contains_key(blob),
                    "{}",
                    self.ctx(&format!("linked blob {blob} has no file"))
                );
            }
            // Referrers: exactly the present manifests naming each subject.
            let subjects: BTreeSet<&Digest> = r
                .known
                .values()
                .filter_map(|m| m.subject.as_ref())
                .collect();
            for subject in subjects {
                let got: BTreeSet<Digest> = self
                    .store
                    .referrers(&repo_name(i), subject, None)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|x| x.digest)
                    .collect();
                let expected: BTreeSet<Digest> = r
                    .present
                    .iter()
                    .filter(|d| r.known[*d].subject.as_ref() == Some(subject))
                    .cloned()
                    .collect();
                assert_eq!(
                    got,
                    expected,
                    "{}",
                    self.ctx(&format!("referrers of {subject}"))
                );
            }
        }
        assert_eq!(seen.files, self.m.stored, "{}", self.ctx("blob files"));
        // Every time the metadata records is within the model's bounds: each use at its
        // own second, each release at the second it was made.
        let within = |what: String, at: i64, span: Option<&Span>| {
            assert!(
                span.is_some_and(|s| s.contains(at)),
                "{}",
                self.ctx(&format!("{what}: recorded at {at}, the model has {span:?}"))
            );
        };
        for ((repo, d), &at) in &seen.manifest_use {
            let what = format!("last use of {d} in {}", REPOS[*repo]);
            within(what, at, self.m.manifest_use.get(&(*repo, d.clone())));
        }
        for ((repo, t), &at) in &seen.tag_use {
            let what = format!("last use of tag {t} in {}", REPOS[*repo]);
            within(what, at, self.m.tag_use.get(&(*repo, t.clone())));
        }
        assert_eq!(
            seen.blob_use.keys().collect::<Vec<_>>(),
            seen.files.keys().collect::<Vec<_>>(),
            "{}",
            self.ctx("blobs recorded vs. blob files")
        );
        for (d, &at) in &seen.blob_use {
            within(format!("last use of blob {d}"), at, self.m.last_use.get(d));
        }
        assert_eq!(
            seen.released.keys().collect::<Vec<_>>(),
            self.m.released.keys().collect::<Vec<_>>(),
            "{}",
            self.ctx("blobs marked released")
        );
        for (d, &at) in &seen.released {
            within(format!("release of {d}"), at, self.m.released.get(d));
        }
        let (usage, _) = self.store.usage().await.unwrap();
        assert_eq!(
            usage.blobs,
            seen.files.len() as u64,
            "{}",
            self.ctx("usage: blobs")
        );
        assert_eq!(
            usage.blob_bytes,
            seen.files.values().map(|&s| on_disk(s)).sum::<u64>(),
            "{}",
            self.ctx("usage: blob bytes")
        );
        assert_eq!(usage.upload_bytes, 0, "{}", self.ctx("usage: uploads"));
        assert_eq!(
            usage.released_bytes,
            self.m.waiting_bytes(),
            "{}",
            self.ctx("usage: released bytes")
        );
    }

    /// One eviction pass, checked against the model (see [`Harness::replay`]); returns
    /// its report.
    async fn gc(&mut self) -> GcReport {
        // The pass first records the pending reads, each at its own second, taking up the
        // blobs read in a later second than their release. Where the model cannot tell
        // the seconds apart, the reads are recorded before the pass (as the store's
        // flusher might have) and the marks left read back.
        self.m.flush();
        if !self.m.undecided.is_empty() {
            self.store.flush_access_times().await.unwrap();
            let (_, released) = stored_blobs(&self.metadata);
            self.m.settle(&released);
        }
        let report = self.store.gc(Trigger::Manual, false).await.unwrap();
        let ended = now_secs();
        bump(&PASSES, 1);
        if std::env::var_os("EVICTION_MODEL_DEBUG").is_some() {
            eprintln!(
                "step {}: pass at {}: quota {:?}; before {:?}; after {:?}; evicted {}, swept \
                 {}; waiting {}, young {}, short {}, next sweep at {:?}",
                self.step,
                report.started_at,
                report.quota,
                report.usage_before,
                report.usage_after,
                report.evicted.len(),
                report.blobs_removed,
                report.released_bytes,
                report.young_bytes,
                report.shortfall,
                report.next_sweep_at,
            );
        }
        assert!(!report.dry_run && report.trigger == Trigger::Manual);
        let seen = self.observe().await;
        let what = self.ctx("pass");

        // Usage before the pass, as the model has it (the metadata's bytes aside); the
        // released bytes count as freed already.
        let before = &report.usage_before;
        assert_eq!(
            before.blobs,
            self.m.stored.len() as u64,
            "{what}: blobs before"
        );
        assert_eq!(
            before.blob_bytes,
            disk_bytes(self.m.stored.values()),
            "{what}: blob bytes before"
        );
        assert_eq!(
            before.released_bytes,
            self.m.waiting_bytes(),
            "{what}: released bytes before"
        );
        let over = before.total.saturating_sub(before.released_bytes) > report.quota.high;
        if over {
            bump(&PASSES_OVER, 1);
        } else if before.total > report.quota.high {
            bump(&PASSES_DISCOUNTED, 1);
        }

        // Evicted roots: exactly the manifests that went, each with the tags it had, each
        // a root when it went (whatever listed it or was its subject went before it).
        let evicted: Vec<(usize, Digest)> = report
            .evicted
            .iter()
            .map(|e| {
                let repo = REPOS.iter().position(|r| *r == e.repo.as_str()).unwrap();
                (repo, e.digest.clone())
            })
            .collect();
        let evicted_set: BTreeSet<(usize, Digest)> = evicted.iter().cloned().collect();
        assert_eq!(
            evicted_set.len(),
            evicted.len(),
            "{what}: a root evicted twice"
        );
        let mut gone = BTreeSet::new();
        for (i, r) in self.m.repos.iter().enumerate() {
            assert!(
                seen.present[i].is_subset(&r.present),
                "{what}: a manifest appeared"
            );
            gone.extend(
                r.present
                    .difference(&seen.present[i])
                    .map(|d| (i, d.clone())),
            );
        }
        assert_eq!(
            gone, evicted_set,
            "{what}: manifests gone vs. reported evicted"
        );
        if !over {
            assert!(
                evicted.is_empty(),
                "{what}: evicted with usage less released bytes under the high watermark: \
                 {report:?}"
            );
        }
        for (pos, (e, (repo, digest))) in report.evicted.iter().zip(&evicted).enumerate() {
            let r = &self.m.repos[*repo];
            let tags: BTreeSet<&String> = r
                .tags
                .iter()
                .filter(|(_, d)| *d == digest)
                .map(|(t, _)| t)
                .collect();
            let reported: BTreeSet<&String> = e.tags.iter().collect();
            assert_eq!(reported, tags, "{what}: tags of evicted {digest}");
            let before: BTreeSet<&(usize, Digest)> = evicted[..pos].iter().collect();
            for parent in &r.present {
                if r.known[parent].children.contains(digest) {
                    assert!(
                        before.contains(&(*repo, parent.clone())),
                        "{what}: {digest} evicted while index {parent} kept it"
                    );
                }
            }
            if let Some(subject) = &r.known[digest].subject
                && r.present.contains(subject)
            {
                assert!(
                    before.contains(&(*repo, subject.clone())),
                    "{what}: referrer {digest} evicted before its subject {subject}"
                );
            }
        }
        for (i, r) in self.m.repos.iter().enumerate() {
            let expected: BTreeMap<String, Digest> = r
                .tags
                .iter()
                .filter(|(_, d)| seen.present[i].contains(*d))
                .map(|(t, d)| (t.clone(), d.clone()))
                .collect();
            assert_eq!(seen.tags[i], expected, "{what}: tags after the pass");
        }
        bump(&EVICTED, evicted.len() as u64);

        // The pass replayed on the model, round by round.
        let now = Span {
            lo: report.started_at,
            hi: ended,
        };
        let replayed = self.replay(&report, &evicted, &seen, over, now);
        if replayed.rounds > 1 {
            bump(&PASSES_ROUNDS, 1);
        }
        assert_eq!(
            report.kept_in_use, replayed.kept_young,
            "{what}: roots kept in use (untagged, pushed within the window)"
        );
        if replayed.kept_young > 0 {
            bump(&ROOTS_KEPT_YOUNG, replayed.kept_young);
        }

        // Sweep: nothing appeared, the report counts what went, exactly the blobs the
        // replay swept went.
        let files_before = self.m.stored.clone();
        for (d, size) in &seen.files {
            assert_eq!(
                files_before.get(d),
                Some(size),
                "{what}: blob file {d} appeared"
            );
        }
        let swept: BTreeMap<&Digest, &u64> = files_before
            .iter()
            .filter(|(d, _)| !seen.files.contains_key(*d))
            .collect();
        assert_eq!(
            swept.keys().copied().collect::<BTreeSet<_>>(),
            replayed.swept.iter().collect(),
            "{what}: blobs swept"
        );
        assert_eq!(
            report.blobs_removed,
            swept.len() as u64,
            "{what}: blobs removed"
        );
        assert_eq!(
            report.bytes_freed,
            disk_bytes(swept.values().copied()),
            "{what}: bytes freed"
        );
        // Each unreferenced blob went exactly when due: a released one once its last use
        // was before the window, another once idle for the grace (zero here, so the
        // window: a blob taken up again stays at least that long); a use in the very
        // second that ends either may go both ways.
        for (d, &released) in &replayed.classified {
            let span = self.m.last_use[d];
            let (rule, unused_before) = if released {
                (
                    "released, its push window",
                    report.started_at - self.m.window,
                )
            } else {
                // The grace is zero, but never shorter than the push window.
                (
                    "never released, its grace",
                    report.started_at - self.m.window,
                )
            };
            if span.hi < unused_before {
                assert!(
                    replayed.swept.contains(d),
                    "{what}: {d} ({rule} ended: last used {span:?}, before {unused_before}) kept"
                );
            }
            if span.lo >= unused_before {
                assert!(
                    !replayed.swept.contains(d),
                    "{what}: {d} ({rule} not over: last used {span:?}, not before \
                     {unused_before}) swept"
                );
            }
            if released && replayed.swept.contains(d) {
                bump(&SWEPT_RELEASED, 1);
            }
        }
        bump(&SWEPT, swept.len() as u64);
        bump(&KEPT_WAITING, replayed.waiting.len() as u64);
        bump(&KEPT_YOUNG, replayed.young.len() as u64);

        // What the report says is left: waiting, young, short; when the first waiting
        // blob comes due (after its window, and after the pass).
        let waiting_bytes = disk_bytes(replayed.waiting.iter().map(|d| &files_before[d]));
        assert_eq!(
            report.released_bytes, waiting_bytes,
            "{what}: released bytes waiting"
        );
        assert_eq!(
            report.usage_after.released_bytes, waiting_bytes,
            "{what}: usage after: released bytes"
        );
        assert_eq!(
            report.young_bytes,
            disk_bytes(replayed.young.iter().map(|d| &files_before[d])),
            "{what}: young bytes"
        );
        assert_eq!(report.shortfall, replayed.shortfall, "{what}: shortfall");
        if report.shortfall > 0 {
            bump(&PASSES_SHORT, 1);
        } else if !report.evicted.is_empty() {
            bump(&PASSES_MET, 1);
        }
        let comes_due = |bound: fn(&Span) -> i64| {
            replayed
                .waiting
                .iter()
                .map(|d| {
                    (bound(&self.m.last_use[d]) + self.m.window + 1).max(report.started_at + 1)
                })
                .min()
        };
        let (earliest, latest) = (comes_due(|s| s.lo), comes_due(|s| s.hi));
        assert!(
            report.next_sweep_at >= earliest && report.next_sweep_at <= latest,
            "{what}: next sweep at {:?}, expected from {earliest:?} to {latest:?}",
            report.next_sweep_at
        );

        // Apply the pass to the model.
        for (i, r) in self.m.repos.iter_mut().enumerate() {
            r.present = seen.present[i].clone();
            r.tags = seen.tags[i].clone();
            r.linked.retain(|d| seen.files.contains_key(d));
        }
        self.m.stored = seen.files.clone();
        self.m.last_use.retain(|d, _| seen.files.contains_key(d));
        self.m.released = replayed.released;
        self.m.forget_gone();
        if over && !report.evicted.is_empty() && report.usage_after.total <= report.quota.high {
            bump(&PASSES_PARTIAL, 1);
        }
        self.check_state(&seen).await;
        report
    }

    /// Replay a pass on the model, round by round as the store goes, and check that it
    /// evicted exactly what the model predicts, in the same order. A round counts as
    /// freed every unreferenced blob that leaves now or is released and waiting; while
    /// that is short of what the low watermark needs (nothing unless usage less the
    /// released bytes was over the high watermark), it evicts the least recently used
    /// (then by repository and digest) of the roots it started with, except untagged
    /// ones last used within the push window, counting what each releases, directly or
    /// through the untagged child manifests it orphans and the untagged referrers of
    /// what goes; it stops when the count reaches the need or no candidate is left.
    /// Then it sweeps what is due, and goes round again while it evicted something and
    /// usage less the bytes still waiting is above the low watermark. A root's last use
    /// is the one the store recorded (reported for the roots evicted, read back for the
    /// others; checked against the model's bounds). Whether a blob was due is taken from
    /// whether it went (checked against its last use by the caller): only a use in the
    /// second a window ends leaves it open.
    fn replay(
        &self,
        report: &GcReport,
        evicted: &[(usize, Digest)],
        seen: &Observed,
        over: bool,
        now: Span,
    ) -> Replayed {
        let what = self.ctx("pass");
        let due = |d: &Digest| !seen.files.contains_key(d);
        // Every manifest's last use at the start of the pass, as the store recorded it.
        let mut last_used = BTreeMap::new();
        for (i, r) in self.m.repos.iter().enumerate() {
            for d in &r.present {
                let at = match evicted.iter().position(|e| *e == (i, d.clone())) {
                    Some(pos) => report.evicted[pos].last_used,
                    None => seen.last_use(i, d),
                };
                let span = self.m.manifest_last_use(i, d);
                assert!(
                    span.contains(at),
                    "{what}: {d} in {} last used at {at}, the model has {span:?}",
                    REPOS[i]
                );
                last_used.insert((i, d.clone()), at);
            }
        }
        let mut state = PassState::new(&self.m, now);
        let mut out = Replayed::default();
        let mut used = report.usage_before.total;
        let mut next = 0;
        for round in 1.. {
            let need = if over {
                used.saturating_sub(report.quota.low)
            } else {
                0
            };
            let mut counted_blobs = BTreeSet::new();
            let mut counted = 0;
            for d in state.unreferenced() {
                if state.released.contains_key(&d) || due(&d) {
                    counted += on_disk(state.stored[&d]);
                }
                counted_blobs.insert(d);
            }
            // The candidates, in the order the pass takes them: every root but the
            // untagged ones last used within the push window (pushed by digest: what
            // names them may come next).
            let mut candidates = Vec::new();
            out.kept_young = 0;
            if need > 0 {
                for (repo, digest) in state.roots() {
                    let at = last_used[&(repo, digest.clone())];
                    let tagged = state.tags[repo].values().any(|d| *d == digest);
                    if !tagged && report.started_at - at <= self.m.window {
                        out.kept_young += 1;
                    } else {
                        candidates.push((at, REPOS[repo], digest.to_string(), repo, digest));
                    }
                }
            }
            candidates.sort();
            let mut evicted_here = 0;
            for (at, _, _, repo, digest) in candidates {
                if counted >= need {
                    break;
                }
                let Some(got) = evicted.get(next) else {
                    panic!(
                        "{what}: round {round} stopped at {counted} of the {need} bytes the \
                         low watermark needs, with roots left to evict, the first {digest} in \
                         {} (last used at {at})",
                        REPOS[repo]
                    );
                };
                assert!(
                    *got == (repo, digest.clone()),
                    "{what}: round {round}: evicted {} in {} (last used at {}), where the \
                     least recently used candidate left is {digest} in {} (last used at \
                     {at}); the pass started at {}, and the model has the evicted one {}",
                    got.1,
                    REPOS[got.0],
                    report.evicted[next].last_used,
                    REPOS[repo],
                    report.started_at,
                    if !state.roots().contains(got) {
                        "as no root"
                    } else if state.tags[got.0].values().any(|d| *d == got.1) {
                        "as a tagged root"
                    } else {
                        "as an untagged root"
                    },
                );
                let references = state.remove(repo, &digest);
                counted += state.release(&references, &mut counted_blobs);
                counted += state.orphaned_release(repo, &digest, &references, &mut counted_blobs);
                next += 1;
                evicted_here += 1;
            }
            out.shortfall = need.saturating_sub(counted);
            let mut freed = 0;
            out.waiting.clear();
            out.young.clear();
            for d in state.unreferenced() {
                let released = state.released.contains_key(&d);
                out.classified.insert(d.clone(), released);
                if due(&d) {
                    freed += on_disk(state.stored.remove(&d).unwrap());
                    state.released.remove(&d);
                    out.swept.insert(d);
                } else if released {
                    out.waiting.insert(d);
                } else {
                    out.young.insert(d);
                }
            }
            used = used.saturating_sub(freed);
            let waiting: u64 = out.waiting.iter().map(|d| on_disk(state.stored[d])).sum();
            if evicted_here > 0 {
                out.rounds += 1;
            }
            if evicted_here == 0 || !over || used.saturating_sub(waiting) <= report.quota.low {
                break;
            }
        }
        assert!(
            next == evicted.len(),
            "{what}: evicted beyond what the low watermark needed: {:?}",
            &report.evicted[next..]
        );
        bump(&RELEASED, state.released_now.len() as u64);
        out.released = state.released;
        out
    }

    async fn apply(&mut self, op: &Op) {
        match op {
            Op::PushBlobs {
                repo,
                blobs,
                chunked,
            } => {
                for &b in blobs {
                    self.push_blob(*repo, b, *chunked).await;
                }
            }
            Op::Mount { repo, from, blob } => self.mount(*repo, *from, *blob).await,
            Op::Head { repo, blob } => self.head(*repo, *blob).await,
            Op::PushImage {
                repo,
                config,
                layers,
                tag,
                docker,
                nonce,
                upload_first,
            } => {
                if *upload_first {
                    for &b in std::iter::once(config).chain(layers) {
                        self.push_blob(*repo, b, false).await;
                    }
                }
                let man = self.image(*config, layers, *docker, *nonce);
                self.put(*repo, man, tag.map(|t| TAGS[t])).await;
            }
            Op::PushIndex {
                repo,
                children,
                tag,
                docker,
                nonce,
            } => {
                let children: Vec<Man> = children
                    .iter()
                    .filter_map(|c| self.pick_known(*repo, c))
                    .collect();
                if children.is_empty() {
                    return;
                }
                let man = Self::index(&children, *docker, *nonce);
                self.put(*repo, man, tag.map(|t| TAGS[t])).await;
            }
            Op::PushCache {
                repo,
                config,
                layers,
                tag,
                nonce,
                upload_first,
            } => {
                if *upload_first {
                    for &b in layers.iter().chain(std::iter::once(config)) {
                        self.push_blob(*repo, b, true).await;
                    }
                }
                let man = self.cache_index(*config, layers, *nonce);
                self.put(*repo, man, tag.map(|t| TAGS[t])).await;
            }
            Op::PushReferrer {
                repo,
                subject,
                blob,
                nonce,
            } => {
                let Some(subject) = self.pick_known(*repo, subject) else {
                    return;
                };
                self.push_blob(*repo, *blob, false).await;
                let man = self.referrer(&subject, *blob, *nonce);
                self.put(*repo, man, None).await;
            }
            Op::MoveTag { repo, tag, target } => {
                if let Some(man) = self.pick_known(*repo, target) {
                    self.put(*repo, man, Some(TAGS[*tag])).await;
                }
            }
            Op::DeleteTag { repo, tag } => self.delete_tag(*repo, *tag).await,
            Op::DeleteManifest { repo, target } => self.delete_manifest(*repo, target).await,
            Op::Pull {
                repo,
                target,
                by_tag,
            } => self.pull(*repo, target, *by_tag).await,
            Op::Age => {
                // Within the time skipped the store's flusher records the pending reads.
                self.store.flush_access_times().await.unwrap();
                self.m.flush();
                age(&self.metadata).await;
                self.m.age();
            }
            Op::Tick => {
                next_second(Duration::from_millis(TICK_MS)).await;
                return;
            }
            Op::Gc => {
                let first = self.gc().await;
                // (d) within the quota, or nothing left to evict: a second pass evicts
                // nothing more, unless it started in a later second and the first kept
                // untagged roots as pushed within the window, which the second may find
                // outside it (the replay checked what it evicted then), or the metadata
                // grew since the first measured it (its own writes, a log a reader kept
                // from being reset) by what takes usage over the high watermark again.
                let (usage, quota) = self.store.usage().await.unwrap();
                if usage.total > quota.high {
                    let again = self.gc().await;
                    let aged_out = again.started_at > first.started_at && first.kept_in_use > 0;
                    let grown = usage
                        .metadata_bytes
                        .saturating_sub(first.usage_before.metadata_bytes);
                    let metadata_grew_over = usage.total - grown <= quota.high;
                    assert!(
                        again.evicted.is_empty() || aged_out || metadata_grew_over,
                        "{}: over the quota ({} > {}) and a second pass (at {}; the first at \
                         {}, keeping {} roots in use) still evicted {:?}; the metadata took \
                         {} bytes when the first pass started, {} when it ended, {} now",
                        self.ctx("pass"),
                        usage.total,
                        quota.high,
                        again.started_at,
                        first.started_at,
                        first.kept_in_use,
                        again.evicted,
                        first.usage_before.metadata_bytes,
                        first.usage_after.metadata_bytes,
                        usage.metadata_bytes,
                    );
                    bump(&AGED_OUT, u64::from(!again.evicted.is_empty()));
                }
                return;
            }
        }
        let seen = self.observe().await;
        self.m.settle(&seen.released);
        self.check_state(&seen).await;
    }
}

fn run_case(backend: Backend, case: &Case) {
    let runtime = backend::test_runtime();
    let dir = tempfile::tempdir().unwrap();
    let (store, metadata) = open(backend, dir.path(), case.max_size, case.window);
    let pool = (0..POOL)
        .map(|i| blob_of(case.seed, i, case.sizes[i]))
        .collect();
    let mut harness = Harness {
        store,
        data_dir: dir.path().to_owned(),
        metadata,
        pool,
        m: Model::new(case.window),
        step: 0,
    };
    runtime.block_on(async {
        for (step, op) in case.ops.iter().enumerate() {
            harness.step = step;
            harness.apply(op).await;
        }
        // Finally pull everything still served, then let a pass run over it. In some
        // cases the wall clock moves to its next second first and every other manifest is
        // pulled again: the pass then records reads of one second and of two.
        harness.step = case.ops.len();
        let present: Vec<(usize, Man)> = (0..REPOS.len())
            .flat_map(|repo| {
                let r = &harness.m.repos[repo];
                r.present.iter().map(move |d| (repo, r.known[d].clone()))
            })
            .collect();
        for (repo, man) in &present {
            harness.pull_contents(*repo, man).await;
        }
        if case.last_pass_later {
            next_second(Duration::from_secs(1)).await;
            for (repo, man) in present.iter().step_by(2) {
                harness.pull_contents(*repo, man).await;
            }
        }
        harness.apply(&Op::Gc).await;
    });
    bump(&CASES, 1);
    bump(&WINDOW_CASES, u64::from(case.window > 0));
    bump(&STEPS, case.ops.len() as u64);
    drop(harness);
    drop(runtime);
}

fn eviction_keeps_what_it_serves_complete_and_within_quota(backend: Backend) {
    let cases = std::env::var("EVICTION_MODEL_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(backend.pick(96, POSTGRES_CASES));
    let seed = std::env::var("EVICTION_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::collections::hash_map::RandomState::new().hash_one(0));
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 400,
        rng_seed: RngSeed::Fixed(seed),
        ..ProptestConfig::default()
    });
    let result = runner.run(&case_strategy(), |case| {
        run_case(backend, &case);
        Ok(())
    });
    let n = |counter: &'static LocalKey<Counter>| counter.with(Cell::get);
    eprintln!(
        "eviction model on {}: {} cases ({} with a push window), {} steps; manifest PUTs {} \
         accepted, {} refused; {} passes ({} over the high watermark less the released \
         bytes, {} over it only with them, {} evicting in several rounds, {} brought back \
         under it by evicting, {} evicting just enough for the low watermark, {} short of \
         it); {} roots evicted, {} untagged roots kept as pushed within the window; {} \
         blobs released, {} taken up by a use after the release, {} used no later than the \
         second of the release and kept released ({} of these two settled from the \
         metadata), {} referenced again; {} blobs swept ({} released); unreferenced blobs \
         kept by a pass: {} waiting out the window, {} young; {} second passes evicting \
         roots the first kept in use, a second before; {} waits for the next second",
        backend.name(),
        n(&CASES),
        n(&WINDOW_CASES),
        n(&STEPS),
        n(&PUTS_OK),
        n(&PUTS_REFUSED),
        n(&PASSES),
        n(&PASSES_OVER),
        n(&PASSES_DISCOUNTED),
        n(&PASSES_ROUNDS),
        n(&PASSES_PARTIAL),
        n(&PASSES_MET),
        n(&PASSES_SHORT),
        n(&EVICTED),
        n(&ROOTS_KEPT_YOUNG),
        n(&RELEASED),
        n(&TAKEN_UP),
        n(&NOT_TAKEN_UP),
        n(&SETTLED),
        n(&REFERENCED_AGAIN),
        n(&SWEPT),
        n(&SWEPT_RELEASED),
        n(&KEPT_WAITING),
        n(&KEPT_YOUNG),
        n(&AGED_OUT),
        n(&TICKS),
    );
    if let Err(e) = result {
        panic!(
            "on {}, with seed {seed} (EVICTION_MODEL_SEED={seed} draws these cases again): {e}",
            backend.name()
        );
    }
}

// ---------------------------------------------------------------- races with a pass

/// Content for round `round` of a race test: distinct in every round.
fn race_blob(round: usize, i: usize) -> (Digest, Bytes) {
    blob_of(0x5eed ^ (round as u64) << 8, i, 1000 + 1500 * i)
}

fn race_image(blobs: &[(Digest, Bytes)]) -> (Digest, Bytes) {
    let descriptor = |mt: &str, (d, b): &(Digest, Bytes)| json!({"mediaType": mt, "digest": d.to_string(), "size": b.len()});
    manifest_of(&json!({
        "schemaVersion": 2,
        "mediaType": media_type::OCI_MANIFEST,
        "config": descriptor(CONFIG_MT, &blobs[0]),
        "layers": blobs[1..].iter().map(|b| descriptor(LAYER_MT, b)).collect::<Vec<_>>(),
    }))
}

/// Wait about `micros` microseconds off the runtime's threads, so the other side of a
/// race gets ahead by a varying amount.
async fn pause(micros: u64) {
    if micros > 0 {
        tokio::task::spawn_blocking(move || std::thread::sleep(Duration::from_micros(micros)))
            .await
            .unwrap();
    }
}

/// How far one side of round `round` starts behind the other, and which side waits.
fn stagger(round: usize) -> (u64, bool) {
    ((round as u64 * 389) % 6000, round & 1 == 0)
}

fn manifest_put_racing_a_pass_never_points_at_a_swept_blob(backend: Backend) {
    let runtime = backend::test_runtime();
    let dir = tempfile::tempdir().unwrap();
    // No quota pressure: nothing is evicted, but every pass sweeps unreferenced blobs.
    let (store, metadata) = open(backend, dir.path(), 1 << 40, 0);
    let repo = repo_name(0);
    let rounds = 80;
    let (mut accepted, mut refused) = (0, 0);
    runtime.block_on(async {
        for round in 0..rounds {
            let blobs: Vec<(Digest, Bytes)> = (0..3).map(|i| race_blob(round, i)).collect();
            for (d, b) in &blobs {
                store.put_blob(&repo, d, body(b, 1)).await.unwrap();
            }
            // Idle for longer than the (zero) grace: the pass may sweep them.
            age(&metadata).await;
            let (digest, manifest) = race_image(&blobs);
            let (delay, put_waits) = stagger(round);
            let put = async {
                if put_waits {
                    pause(delay).await;
                }
                store
                    .put_manifest(
                        &repo,
                        &Reference::Digest(digest.clone()),
                        Some(media_type::OCI_MANIFEST),
                        manifest.clone(),
                    )
                    .await
            };
            let pass = async {
                if !put_waits {
                    pause(delay).await;
                }
                store.gc(Trigger::Manual, false).await
            };
            let (put, pass) = tokio::join!(put, pass);
            pass.unwrap();
            match put {
                Ok(stored) => {
                    accepted += 1;
                    assert_eq!(stored.digest, digest);
                    // A later pass must not take them either.
                    store.gc(Trigger::Manual, false).await.unwrap();
                    for (d, b) in &blobs {
                        let read = read_blob(&store, &repo, d).await.unwrap_or_else(|e| {
                            panic!("round {round}: manifest accepted, its blob {d} unreadable: {e}")
                        });
                        assert_eq!(&read[..], &b[..], "round {round}: blob {d}");
                    }
                }
                Err(Error::ManifestBlobUnknown {
                    digest: missing,
                    kind,
                }) => {
                    refused += 1;
                    assert_eq!(kind, "blob");
                    assert!(
                        blobs.iter().any(|(d, _)| *d == missing),
                        "round {round}: {missing}"
                    );
                    assert!(
                        matches!(
                            store.open_blob(&repo, &missing).await,
                            Err(Error::NotFound(Missing::Blob))
                        ),
                        "round {round}: refused for {missing}, which is still there"
                    );
                }
                Err(e) => panic!("round {round}: manifest PUT failed: {e}"),
            }
        }
    });
    eprintln!("manifest PUT racing a pass: {accepted} accepted, {refused} refused (of {rounds})");
}

/// A cross-repository mount racing a sweep of the same (unreferenced, idle) blob: the
/// mount either links a blob that stays readable or finds nothing to mount; it never
/// links a blob whose file the sweep deleted.
fn blob_mount_racing_a_pass_never_links_a_swept_blob(backend: Backend) {
    let runtime = backend::test_runtime();
    let dir = tempfile::tempdir().unwrap();
    // A one-second window: with none, a link made in second t is already idle for a pass
    // in second t + 1, which may then forget it however the lock falls.
    let (store, metadata) = open(backend, dir.path(), 1 << 40, 1);
    let (source, target) = (repo_name(0), repo_name(1));
    let rounds = 80;
    let (mut mounted, mut not_mounted) = (0, 0);
    let mut broken = Vec::new();
    runtime.block_on(async {
        for round in 0..rounds {
            let blob = race_blob(round, 1);
            store
                .put_blob(&source, &blob.0, body(&blob.1, 1))
                .await
                .unwrap();
            age(&metadata).await;
            let (delay, mount_waits) = stagger(round);
            let mount = async {
                if mount_waits {
                    pause(delay).await;
                }
                store.mount_blob(&target, &blob.0, Some(&source)).await
            };
            let pass = async {
                if !mount_waits {
                    pause(delay).await;
                }
                store.gc(Trigger::Manual, false).await
            };
            let (mount, pass) = tokio::join!(mount, pass);
            pass.unwrap();
            if mount.unwrap().is_none() {
                not_mounted += 1;
                continue;
            }
            mounted += 1;
            // Mounted: the blob is in the target repository, so a manifest may use it.
            let (digest, manifest) = race_image(std::slice::from_ref(&blob));
            let put = store
                .put_manifest(
                    &target,
                    &Reference::Digest(digest),
                    Some(media_type::OCI_MANIFEST),
                    manifest,
                )
                .await;
            match put {
                Ok(_) => match read_blob(&store, &target, &blob.0).await {
                    Ok(read) => assert_eq!(&read[..], &blob.1[..]),
                    Err(e) => {
                        let hex = blob.0.hex();
                        let file = dir.path().join("blobs/sha256").join(&hex[..2]).join(hex);
                        let usage = store.usage().await.unwrap().0;
                        broken.push(format!(
                            "round {round}: {}: {e} (file present: {}; usage counts {} blobs)",
                            blob.0,
                            file.exists(),
                            usage.blobs
                        ));
                    }
                },
                Err(e) => broken.push(format!("round {round}: mounted, then PUT failed: {e}")),
            }
        }
    });
    eprintln!(
        "blob mount racing a pass: {mounted} mounted, {not_mounted} not (of {rounds}); \
         {} mounted and accepted in a manifest but unreadable",
        broken.len()
    );
    assert!(
        broken.is_empty(),
        "mount_blob returned true and a manifest using the blob was accepted, but the \
         blob's file was gone:\n{}",
        broken.join("\n")
    );
}

// ---------------------------------------------------------------- what goes with a root

/// An image with a signature (an untagged referrer), listed by a tagged index, and a
/// newer image in another repository; the low watermark needs more than the first
/// image's blobs and less than its and its signature's together. The pass evicts the
/// index, then (in later rounds, as they become roots) the image and its signature, and
/// keeps the newer image: each eviction counts the signature as going with the image,
/// whether the index lists the signature too, and whichever of the two digests sorts
/// first.
fn a_pass_counts_the_referrers_that_go_with_an_image(backend: Backend) {
    let mut covered = BTreeSet::new();
    for nonce in 0u8.. {
        let signed = SignedImage::new(nonce);
        let signature_sorts_last = signed.signature.0 > signed.image.0;
        for lists_signature in [false, true] {
            if covered.insert((lists_signature, lists_signature && signature_sorts_last)) {
                evict_an_index_over(backend, &signed, lists_signature);
            }
        }
        if covered.len() == 3 {
            break;
        }
    }
}

/// An image, a signature naming it as its subject (told apart by a nonce), and their
/// blobs.
struct SignedImage {
    nonce: u8,
    /// The image's config and layer, and the signature's blob (its config and layer).
    blobs: [(Digest, Bytes); 3],
    image: (Digest, Bytes),
    signature: (Digest, Bytes),
}

impl SignedImage {
    fn new(nonce: u8) -> SignedImage {
        let blobs = [(0, 200), (1, 300_000), (2, 300_000)].map(|(i, len)| blob_of(0x5167, i, len));
        let descriptor = |mt: &str, (d, b): &(Digest, Bytes)| json!({"mediaType": mt, "digest": d.to_string(), "size": b.len()});
        let image = manifest_of(&json!({
            "schemaVersion": 2,
            "mediaType": media_type::OCI_MANIFEST,
            "config": descriptor(CONFIG_MT, &blobs[0]),
            "layers": [descriptor(LAYER_MT, &blobs[1])],
        }));
        let signature = manifest_of(&json!({
            "schemaVersion": 2,
            "mediaType": media_type::OCI_MANIFEST,
            "artifactType": "application/vnd.example.signature",
            "config": descriptor("application/vnd.oci.empty.v1+json", &blobs[2]),
            "layers": [descriptor("application/vnd.example.signature.layer", &blobs[2])],
            "subject": descriptor(media_type::OCI_MANIFEST, &image),
            "annotations": {"nonce": nonce.to_string()},
        }));
        SignedImage {
            nonce,
            blobs,
            image,
            signature,
        }
    }
}

/// Blob `i` of the content drawn from `seed`, `len` bytes long, with its digest.
fn blob_of(seed: u64, i: usize, len: usize) -> (Digest, Bytes) {
    let bytes = content(seed, i, len);
    (sha256(&bytes), bytes)
}

/// A manifest's content, with its digest.
fn manifest_of(value: &serde_json::Value) -> (Digest, Bytes) {
    let content = Bytes::from(serde_json::to_vec(value).unwrap());
    (sha256(&content), content)
}

/// Push `signed` and a tagged index over its image (and its signature too, if
/// `lists_signature`), then a newer image in another repository, and check the pass.
fn evict_an_index_over(backend: Backend, signed: &SignedImage, lists_signature: bool) {
    let runtime = backend::test_runtime();
    let dir = tempfile::tempdir().unwrap();
    let SignedImage {
        nonce,
        blobs,
        image,
        signature,
    } = signed;
    let newer_blobs = [(0, 200), (1, 300_000)].map(|(i, len)| blob_of(0x0e3e, i, len));
    let newer = race_image(&newer_blobs);
    let mut listed = vec![image];
    if lists_signature {
        listed.push(signature);
    }
    let index = manifest_of(&json!({
        "schemaVersion": 2,
        "mediaType": media_type::OCI_INDEX,
        "manifests": listed.iter().map(|(d, b)| json!({"mediaType": media_type::OCI_MANIFEST, "digest": d.to_string(), "size": b.len()})).collect::<Vec<_>>(),
    }));
    // Every blob on disk, less what the low watermark needs: 512 KiB on either backend,
    // between the image's blobs and the image's and the signature's together.
    let stored: u64 = blobs
        .iter()
        .chain(&newer_blobs)
        .map(|(_, b)| on_disk(b.len() as u64))
        .sum();
    let max_size = quota_leaving(stored as i64 - 524_288);
    let (store, metadata) = open(backend, dir.path(), max_size, 0);
    let (app, other) = (repo_name(0), repo_name(2));
    let what = format!("nonce {nonce}, the index listing the signature: {lists_signature}");
    runtime.block_on(async {
        for (d, b) in blobs {
            store.put_blob(&app, d, body(b, 1)).await.unwrap();
        }
        for (d, b) in &newer_blobs {
            store.put_blob(&other, d, body(b, 1)).await.unwrap();
        }
        let by_digest = |(d, _): &(Digest, Bytes)| Reference::Digest(d.clone());
        let puts = [
            (&app, by_digest(image), image, media_type::OCI_MANIFEST),
            (
                &app,
                by_digest(signature),
                signature,
                media_type::OCI_MANIFEST,
            ),
            (&app, tag_ref("latest"), &index, media_type::OCI_INDEX),
            (&other, tag_ref("latest"), &newer, media_type::OCI_MANIFEST),
        ];
        for (repo, reference, (_, content), mt) in puts {
            store
                .put_manifest(repo, &reference, Some(mt), content.clone())
                .await
                .unwrap();
        }
        // Nothing is left inside the (zero) push window.
        age(&metadata).await;
        let report = store.gc(Trigger::Manual, false).await.unwrap();
        let evicted: Vec<(&str, &Digest)> = report
            .evicted
            .iter()
            .map(|e| (e.repo.as_str(), &e.digest))
            .collect();
        assert_eq!(
            evicted,
            [("app", &index.0), ("app", &image.0), ("app", &signature.0)],
            "{what}: {report:?}"
        );
        assert!(
            report.usage_after.total <= report.quota.low,
            "{what}: {report:?}"
        );
        store
            .get_manifest(&other, &tag_ref("latest"))
            .await
            .unwrap_or_else(|e| panic!("{what}: the newer image went: {e}"));
    });
}

/// A store over its quota by more than one round of a pass offers: the pass goes round
/// until it is under the low watermark, least recently used first, with no windows (what
/// the evicted roots release is swept at once) and on the default ones (it waits out the
/// push window, counted as freed).
fn a_pass_evicts_past_what_one_round_offers(backend: Backend) {
    for default_windows in [false, true] {
        evict_past_one_round(backend, default_windows);
    }
}

fn evict_past_one_round(backend: Backend, default_windows: bool) {
    let runtime = backend::test_runtime();
    let dir = tempfile::tempdir().unwrap();
    let config_blob = blob_of(0x3a55, 0, 200);
    let images: Vec<_> = (0..MANY_IMAGES)
        .map(|i| {
            let layer = blob_of(0x3a56, i, MANY_LAYER);
            let image = race_image(&[config_blob.clone(), layer.clone()]);
            (tag_ref(&format!("i-{i}")), layer, image)
        })
        .collect();
    let metadata = backend.create(dir.path());
    let repo = repo_name(0);
    let opened = |max_size| {
        let defaults = Eviction {
            max_size: Size::Bytes(max_size),
            min_free: Size::Bytes(0),
            ..Eviction::default()
        };
        let eviction = if default_windows {
            defaults
        } else {
            Eviction {
                grace: Duration::ZERO,
                in_use: Duration::ZERO,
                push_window: Duration::ZERO,
                interval: Duration::from_secs(3600),
                ..defaults
            }
        };
        metadata.open_without_background_tasks(&Config {
            eviction,
            ..metadata.config()
        })
    };
    // Store every image, the newest ten seconds after the others, and measure.
    let store = opened(u64::MAX / 2);
    let (older, newest) = images.split_at(MANY_IMAGES - IMAGES_KEPT);
    let usage = runtime.block_on(async {
        let (config_digest, config_bytes) = &config_blob;
        store
            .put_blob(&repo, config_digest, body(config_bytes, 1))
            .await
            .unwrap();
        for batch in [older, newest] {
            futures::stream::iter(batch)
                .for_each_concurrent(32, |(tag, (ld, lb), (_, mb))| {
                    let (store, repo) = (&store, &repo);
                    async move {
                        store.put_blob(repo, ld, body(lb, 1)).await.unwrap();
                        store
                            .put_manifest(repo, tag, Some(media_type::OCI_MANIFEST), mb.clone())
                            .await
                            .unwrap();
                    }
                })
                .await;
            age(&metadata).await;
        }
        store
            .gc(Trigger::Manual, true)
            .await
            .unwrap()
            .usage_before
            .total
    });
    drop(store);
    // A quota whose low watermark leaves the newest images' layers (and the rest).
    let layer = on_disk(MANY_LAYER as u64);
    let low = u64::from(Eviction::default().low_watermark.0);
    // Opened again, the store runs its first pass.
    let store = opened((usage - older.len() as u64 * layer) * 100 / low + 1);
    {
        let report = store.last_gc().unwrap();
        assert_eq!(report.trigger, Trigger::Startup);
        let need = report.usage_before.total.saturating_sub(report.quota.low);
        let summary = format!(
            "default windows: {default_windows}; evicted {} for {need} bytes, usage {:?}, \
             quota {:?}, shortfall {}",
            report.evicted.len(),
            report.usage_after,
            report.quota,
            report.shortfall
        );
        assert!(report.evicted.len() > 4096, "{summary}");
        assert_eq!(
            report.evicted.len() as u64,
            need.div_ceil(layer),
            "{summary}"
        );
        assert_eq!(report.shortfall, 0, "{summary}");
        let waiting = if default_windows { need } else { 0 };
        assert!(
            report.released_bytes >= waiting && report.released_bytes <= waiting + layer,
            "{summary}, released {}",
            report.released_bytes
        );
        let newest: BTreeSet<&Digest> = newest.iter().map(|(_, _, (d, _))| d).collect();
        let evicted_newest = report.evicted.iter().filter(|e| newest.contains(&e.digest));
        assert_eq!(evicted_newest.count(), 0, "{summary}");
    }
}
