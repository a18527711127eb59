//! Eviction under load and under crashes.
//!
//! * A soak: sixteen clients push images (layers shared from a pool and layers of their
//!   own; monolithic, session and chunked uploads, each after a HEAD), move tags, delete
//!   manifests, pull, and save and restore GitHub Actions cache entries over the v2
//!   protocol, against a quota small enough that the server's own passes (woken by the
//!   quota, on the interval, and scheduled for released blobs) evict all the time. Every
//!   timing is its default divided by one factor, [`TIME_FACTOR`] (300); with today's
//!   defaults `in_use` is 12 s, `push_window` 1 s, `grace` 24 s, `interval` 200 ms and
//!   `upload_expiry` 288 s. A read may miss only as a cache miss before it began; a part
//!   of something read within `in_use` must be there and intact. Then the store on disk
//!   is checked against what is kept: at once, the blob files nothing kept references
//!   are exactly the released, young and due bytes a dry-run pass reports; after grace +
//!   push window + interval without writes, they are exactly the referenced ones, under
//!   the high watermark. CI runs 20 000 events (HTTP requests);
//!   `LAYERCACHE_SOAK_EVENTS` asks for more.
//! * A crash test: a full store restarted with a small quota is killed (`kill -9`) while
//!   its startup pass evicts, several times; once it settles, everything still listed is
//!   whole, nothing unreferenced is left on disk, and the least recently used went first.
//! * Two small, exact cases of how much a pass evicts: only what it needs when the freed
//!   blobs are within their grace, and an index's children before newer roots.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::actions::{self, SCOPE};
use common::load::{
    Blob, Client, Counters, IMAGE, INDEX, Image, Index, Problem, PullProblem, Pulled,
    blob_file_sizes, blob_files, config_blob, image_blobs, meta_files, on_disk, summary,
    usage_total,
};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

// ---- the soak ----

/// The soak runs every eviction timing at its default divided by this one factor, so a
/// minute of soak stands for five hours of a server on the defaults.
const TIME_FACTOR: u32 = 300;

/// The eviction timings of the soak: each the default divided by [`TIME_FACTOR`].
#[derive(Clone, Copy, Debug)]
struct Timings {
    in_use: Duration,
    push_window: Duration,
    grace: Duration,
    interval: Duration,
    upload_expiry: Duration,
}

impl Timings {
    fn scaled() -> Timings {
        let defaults = store::config::Eviction::default();
        Timings {
            in_use: defaults.in_use / TIME_FACTOR,
            push_window: defaults.push_window / TIME_FACTOR,
            grace: defaults.grace / TIME_FACTOR,
            interval: defaults.interval / TIME_FACTOR,
            upload_expiry: defaults.upload_expiry / TIME_FACTOR,
        }
    }

    /// As the server's environment sets them.
    fn env(&self) -> Vec<(String, String)> {
        [
            ("IN_USE", self.in_use),
            ("PUSH_WINDOW", self.push_window),
            ("GRACE", self.grace),
            ("INTERVAL", self.interval),
            ("UPLOAD_EXPIRY", self.upload_expiry),
        ]
        .map(|(key, d)| {
            (
                format!("LAYERCACHE_STORE__EVICTION__{key}"),
                format!("{}ms", d.as_millis()),
            )
        })
        .to_vec()
    }
}

const SOAK_SEED: u64 = 0x5eed_50a4;
/// Events (HTTP requests from the clients) of the bounded soak CI runs.
const SOAK_EVENTS: u64 = 20_000;
/// A small share of what the soak writes: the server evicts all the time.
const SOAK_QUOTA: &str = "64MiB";
const CLIENTS: usize = 16;
const REPOS: usize = 4;
/// Tags and keys readers choose from most of the time: the most recently written.
const RECENT: usize = 32;
/// Entries of at least this size go up in blocks of it, smaller ones in one Put Blob.
const ENTRY_BLOCK: usize = 256 * KIB;
/// Keys every client saves to now and then (most saves find them taken).
const SHARED_KEYS: u64 = 6;
/// The roots a client remembers, to retag or delete, newest last.
const OWN_KEPT: usize = 16;
/// The longest pause of a client between two operations: the soak's 20 000 events
/// take about a minute, several times `in_use`.
const THINK: Duration = Duration::from_millis(400);

/// The bytes saved under cache key `key`, 4 KiB to 1.5 MiB.
fn entry_content(key: &str) -> Vec<u8> {
    actions::keyed_content(key, 4 * KIB, 1536 * KIB)
}

/// The blobs (digest, size) an entry saved by a soak client is stored as: one per
/// block, or one for a Put Blob.
fn entry_blobs(bytes: &[u8]) -> Vec<(String, u64)> {
    actions::stored_pieces(bytes, ENTRY_BLOCK)
}

/// A manifest the soak pushed.
#[derive(Clone)]
struct Known {
    /// The blobs it references, for an image.
    blobs: Vec<(String, u64)>,
    /// The manifests it lists, for an index.
    children: Vec<String>,
}

/// A root one client pushed (by tag), which it may retag or delete.
#[derive(Clone)]
struct Own {
    repo: String,
    digest: String,
    content: Content,
}

/// What a root is made of.
#[derive(Clone)]
enum Content {
    Image(Image),
    Index(Index),
}

impl Content {
    fn media_type(&self) -> &'static str {
        match self {
            Content::Image(_) => IMAGE,
            Content::Index(_) => INDEX,
        }
    }

    fn body(&self) -> &str {
        match self {
            Content::Image(image) => &image.body,
            Content::Index(index) => &index.body,
        }
    }
}

/// What the soak's clients wrote, shared between them.
#[derive(Default)]
struct World {
    /// Recently pushed or moved (repo, tag), newest last.
    recent_tags: Mutex<VecDeque<(String, String)>>,
    /// Every (repo, tag) ever written.
    all_tags: Mutex<Vec<(String, String)>>,
    /// Every manifest pushed, by (repo, digest).
    manifests: Mutex<BTreeMap<(String, String), Known>>,
    /// Manifests a client deleted (202), by (repo, digest).
    deleted: Mutex<BTreeSet<(String, String)>>,
    /// Recently finalized keys, newest last.
    recent_keys: Mutex<VecDeque<String>>,
    /// Every key finalized.
    keys: Mutex<Vec<String>>,
}

impl World {
    fn tagged(&self, repo: &str, tag: &str) {
        let pair = (repo.to_owned(), tag.to_owned());
        let mut recent = self.recent_tags.lock().unwrap();
        recent.push_back(pair.clone());
        while recent.len() > RECENT {
            recent.pop_front();
        }
        self.all_tags.lock().unwrap().push(pair);
    }

    fn pushed(&self, repo: &str, content: &Content) {
        let mut manifests = self.manifests.lock().unwrap();
        let mut image = |image: &Image| {
            let blobs = image
                .blobs()
                .map(|b| (b.digest.clone(), b.bytes.len() as u64))
                .collect();
            let known = Known {
                blobs,
                children: Vec::new(),
            };
            manifests.insert((repo.to_owned(), image.digest.clone()), known);
        };
        match content {
            Content::Image(i) => image(i),
            Content::Index(index) => {
                index.children.iter().for_each(&mut image);
                let known = Known {
                    blobs: Vec::new(),
                    children: index.children.iter().map(|c| c.digest.clone()).collect(),
                };
                manifests.insert((repo.to_owned(), index.digest.clone()), known);
            }
        }
    }

    fn finalized(&self, key: &str) {
        let mut recent = self.recent_keys.lock().unwrap();
        recent.push_back(key.to_owned());
        while recent.len() > RECENT {
            recent.pop_front();
        }
        self.keys.lock().unwrap().push(key.to_owned());
    }

    /// A recently written (or, now and then, any) tag.
    fn tag_to_pull(&self, rng: &mut StdRng) -> Option<(String, String)> {
        if rng.random_bool(0.8) {
            let recent = self.recent_tags.lock().unwrap();
            (!recent.is_empty()).then(|| recent[rng.random_range(0..recent.len())].clone())
        } else {
            let all = self.all_tags.lock().unwrap();
            (!all.is_empty()).then(|| all[rng.random_range(0..all.len())].clone())
        }
    }
}

/// What the soak counted (the registry client's own counters are apart).
#[derive(Default)]
struct Stats {
    /// The server's `in_use`: a read that loses a part sooner fails.
    in_use: Duration,
    pushes: AtomicU64,
    index_pushes: AtomicU64,
    tag_moves: AtomicU64,
    tag_move_misses: AtomicU64,
    tag_moves_repushed: AtomicU64,
    deletes: AtomicU64,
    delete_misses: AtomicU64,
    pulls: AtomicU64,
    pull_hits: AtomicU64,
    pull_misses: AtomicU64,
    saves: AtomicU64,
    saves_taken: AtomicU64,
    restores: AtomicU64,
    prefix_restores: AtomicU64,
    restore_hits: AtomicU64,
    restore_misses: AtomicU64,
    entry_bytes_verified: AtomicU64,
    /// Reads that lost a part more than `in_use` after they began (nothing promised).
    past_in_use: AtomicU64,
    /// Reads that got bytes other than the ones asked for, or a body cut off.
    corrupt: AtomicU64,
    /// Client-visible failures, by kind.
    failures: Mutex<BTreeMap<&'static str, u64>>,
    /// The first problems, for the log.
    problems: Mutex<Vec<String>>,
}

impl Stats {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn note(&self, what: String) {
        let mut problems = self.problems.lock().unwrap();
        if problems.len() < 40 {
            problems.push(what);
        }
    }

    fn fail(&self, kind: &'static str, what: String) {
        *self.failures.lock().unwrap().entry(kind).or_default() += 1;
        self.note(format!("FAILURE ({kind}) {what}"));
    }

    fn corrupt(&self, what: String) {
        Stats::add(&self.corrupt);
        self.note(format!("CORRUPT {what}"));
    }

    fn failure_count(&self) -> u64 {
        self.failures.lock().unwrap().values().sum()
    }

    /// A read lost a part `since` its lease began: a failure within `in_use`, past it
    /// only a note.
    fn lost(&self, kind: &'static str, what: String, since: Instant) {
        if since.elapsed() < self.in_use {
            self.fail(kind, what);
        } else {
            Stats::add(&self.past_in_use);
            self.note(format!("past in_use ({:?}): {what}", since.elapsed()));
        }
    }
}

/// One soak client's means: a registry client and an Actions cache client, both counting
/// into the soak's shared event counters.
struct Soaker {
    id: usize,
    rng: StdRng,
    registry: Client,
    cache: actions::Client,
    pool: Arc<Vec<Blob>>,
    world: Arc<World>,
    stats: Arc<Stats>,
    /// The last [`OWN_KEPT`] roots this client pushed, oldest first.
    own: VecDeque<Own>,
    n: usize,
}

impl Soaker {
    fn events(&self) -> u64 {
        Counters::get(&self.registry.counters.requests) + self.cache.requests_sent()
    }

    /// Operations, picked at random, until the soak's events are spent.
    async fn run(mut self, budget: u64) {
        while self.events() < budget {
            // A build step between operations.
            let pause = self.rng.random_range(0..=THINK.as_millis() as u64);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            self.n += 1;
            match self.rng.random_range(0..100) {
                0..26 => self.push().await,
                26..52 => self.pull().await,
                52..58 => self.move_tag().await,
                58..62 => self.delete().await,
                62..81 => self.save().await,
                _ => self.restore().await,
            }
        }
    }

    /// An image of 1 to 4 layers, pooled or fresh (4 KiB to 512 KiB, log-uniform).
    fn image(&mut self, part: usize) -> Image {
        let layers: Vec<Blob> = (0..self.rng.random_range(1..=4))
            .map(|_| {
                if self.rng.random_bool(0.3) {
                    self.pool[self.rng.random_range(0..self.pool.len())].clone()
                } else {
                    let len = (4.0 * KIB as f64 * 128f64.powf(self.rng.random::<f64>())) as usize;
                    Blob::random(&mut self.rng, len)
                }
            })
            .collect();
        let nonce = format!("soak {} {} {part}", self.id, self.n);
        Image::new(config_blob(&nonce), layers)
    }

    async fn push(&mut self) {
        let repo = format!("soak/r{}", self.rng.random_range(0..REPOS));
        let tag = format!("c{}-{}", self.id, self.n);
        let content = if self.rng.random_bool(0.15) {
            Content::Index(Index::new(vec![self.image(0), self.image(1)]))
        } else {
            Content::Image(self.image(0))
        };
        let pushed = match &content {
            Content::Image(image) => self.registry.push_image(&repo, image, &tag).await,
            Content::Index(index) => self.registry.push_index(&repo, index, &tag).await,
        };
        if let Err(e) = pushed {
            return self.stats.fail("push", e);
        }
        Stats::add(&self.stats.pushes);
        if let Content::Index(_) = content {
            Stats::add(&self.stats.index_pushes);
        }
        self.world.pushed(&repo, &content);
        self.world.tagged(&repo, &tag);
        let digest = match &content {
            Content::Image(image) => image.digest.clone(),
            Content::Index(index) => index.digest.clone(),
        };
        self.own.push_back(Own {
            repo,
            digest,
            content,
        });
        // Older roots are left alone (and their layers' bytes dropped).
        if self.own.len() > OWN_KEPT {
            self.own.pop_front();
        }
    }

    async fn pull(&mut self) {
        let Some((repo, tag)) = self.world.tag_to_pull(&mut self.rng) else {
            return;
        };
        Stats::add(&self.stats.pulls);
        match self.registry.pull(&repo, &tag).await {
            Ok(Pulled::Miss) => Stats::add(&self.stats.pull_misses),
            Ok(Pulled::Whole { .. }) => Stats::add(&self.stats.pull_hits),
            Err(PullProblem {
                problem: Problem::Corrupt(what),
                ..
            }) => self.stats.corrupt(what),
            Err(PullProblem {
                problem: Problem::Failed(what),
                since,
            }) => self.stats.lost("pull", what, since),
        }
    }

    /// Move the repository's `latest` to one of this client's recent roots, as `crane
    /// tag` does: GET it by digest, PUT it under the tag.
    async fn move_tag(&mut self) {
        if self.own.is_empty() {
            return;
        }
        let recent = self.own.len().saturating_sub(8);
        let pick = self.rng.random_range(recent..self.own.len());
        let own = self.own[pick].clone();
        let began = Instant::now();
        match self.registry.get_manifest(&own.repo, &own.digest).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                Stats::add(&self.stats.tag_move_misses);
                self.own.remove(pick);
                return;
            }
            Err(Problem::Corrupt(what)) => return self.stats.corrupt(what),
            Err(Problem::Failed(what)) => return self.stats.fail("tag move", what),
        }
        let put = self
            .registry
            .put_manifest(
                &own.repo,
                "latest",
                own.content.media_type(),
                own.content.body(),
            )
            .await;
        match put {
            Ok(None) => {}
            Ok(Some(refusal)) if began.elapsed() < self.stats.in_use => {
                return self.stats.fail(
                    "tag move",
                    format!(
                        "{}@{} read {:?} ago, then MANIFEST_BLOB_UNKNOWN: {refusal}",
                        own.repo,
                        own.digest,
                        began.elapsed()
                    ),
                );
            }
            Ok(Some(_)) => {
                // Read longer ago than the lease: push it all again, as a client would.
                Stats::add(&self.stats.tag_moves_repushed);
                let pushed = match &own.content {
                    Content::Image(image) => {
                        self.registry.push_image(&own.repo, image, "latest").await
                    }
                    Content::Index(index) => {
                        self.registry.push_index(&own.repo, index, "latest").await
                    }
                };
                if let Err(e) = pushed {
                    return self.stats.fail("tag move", e);
                }
            }
            Err(e) => return self.stats.fail("tag move", e),
        }
        Stats::add(&self.stats.tag_moves);
        self.world.tagged(&own.repo, "latest");
    }

    /// Delete one of this client's roots by digest (its tags go with it).
    async fn delete(&mut self) {
        if self.own.is_empty() {
            return;
        }
        let pick = self.rng.random_range(0..self.own.len());
        let own = self.own.remove(pick).unwrap();
        match self.registry.delete_manifest(&own.repo, &own.digest).await {
            Ok(true) => {
                Stats::add(&self.stats.deletes);
                self.world
                    .deleted
                    .lock()
                    .unwrap()
                    .insert((own.repo, own.digest));
            }
            Ok(false) => Stats::add(&self.stats.delete_misses),
            Err(e) => self.stats.fail("delete", e),
        }
    }

    /// Save an entry as go-actions-cache does: create, Put Blob or Put Blocks and a
    /// block list, finalize. A key another client holds is taken: nothing to save.
    async fn save(&mut self) {
        let key = if self.rng.random_bool(0.1) {
            format!("shared-{}", self.rng.random_range(0..SHARED_KEYS))
        } else {
            format!("soak-{}-{}", self.id, self.n)
        };
        let bytes = entry_content(&key);
        let url = match self.cache.try_v2_create(&key).await {
            Ok(Some(url)) => url,
            Ok(None) => return Stats::add(&self.stats.saves_taken),
            Err(e) => return self.stats.fail("save: create", e),
        };
        let uploaded = if bytes.len() < ENTRY_BLOCK {
            self.cache.try_v2_put_blob(&url, &bytes).await
        } else {
            self.cache
                .try_upload_blocks(&url, &bytes, ENTRY_BLOCK, 4)
                .await
        };
        if let Err(e) = uploaded {
            return self.stats.fail("save: upload", format!("{key}: {e}"));
        }
        if let Err(e) = self.cache.try_v2_finalize(&key, bytes.len()).await {
            return self.stats.fail("save: finalize", e);
        }
        Stats::add(&self.stats.saves);
        self.world.finalized(&key);
    }

    /// Restore a recently saved key, any key, or the newest of a client's keys by
    /// prefix; check the bytes against the key matched.
    async fn restore(&mut self) {
        let roll = self.rng.random_range(0..100);
        let (key, prefix) = if roll < 15 {
            let client = self.rng.random_range(0..CLIENTS);
            (
                format!("soak-{client}-none"),
                Some(format!("soak-{client}-")),
            )
        } else {
            let picked = if roll < 85 {
                let recent = self.world.recent_keys.lock().unwrap();
                (!recent.is_empty()).then(|| recent[self.rng.random_range(0..recent.len())].clone())
            } else {
                let keys = self.world.keys.lock().unwrap();
                (!keys.is_empty()).then(|| keys[self.rng.random_range(0..keys.len())].clone())
            };
            let Some(key) = picked else { return };
            (key, None)
        };
        Stats::add(&self.stats.restores);
        if prefix.is_some() {
            Stats::add(&self.stats.prefix_restores);
        }
        let restore_keys: Vec<&str> = prefix.iter().map(String::as_str).collect();
        let began = Instant::now();
        let (url, matched) = match self.cache.try_v2_lookup(&key, &restore_keys).await {
            Ok(Some(hit)) => hit,
            Ok(None) => return Stats::add(&self.stats.restore_misses),
            Err(e) => return self.stats.fail("restore: lookup", e),
        };
        // No exact match matches the newest key with the key, then a restore key, as a
        // prefix (as on GitHub).
        let expected_key =
            matched.starts_with(&key) || prefix.as_deref().is_some_and(|p| matched.starts_with(p));
        if !expected_key {
            return self.stats.fail(
                "restore: lookup",
                format!("{key} {prefix:?} matched {matched}"),
            );
        }
        match self.cache.try_get(&url).await {
            Ok((status, body)) if status == 200 => {
                if body == entry_content(&matched) {
                    Stats::add(&self.stats.restore_hits);
                    self.stats
                        .entry_bytes_verified
                        .fetch_add(body.len() as u64, Ordering::Relaxed);
                } else {
                    self.stats.corrupt(format!(
                        "entry {matched}: {} bytes that are not the ones saved",
                        body.len()
                    ));
                }
            }
            Ok((status, body)) => self.stats.lost(
                "restore: download",
                format!(
                    "entry {matched} found, then its download answered {status}: {}",
                    String::from_utf8_lossy(&body)
                ),
                began,
            ),
            Err(e) if e.contains("body cut off") => {
                self.stats.corrupt(format!("entry {matched}: {e}"));
            }
            Err(e) => self.stats.lost("restore: download", e, began),
        }
    }
}

/// What the soak saw of the server's passes and usage from `GET /api/v1/gc`.
#[derive(Default)]
struct Watched {
    polls: u64,
    /// Distinct passes seen, by (started_at, trigger, seconds).
    passes: BTreeSet<(i64, String, String)>,
    passes_by_trigger: BTreeMap<String, u64>,
    evicted_roots: u64,
    evicted_entries: u64,
    bytes_freed: u64,
    peak_total: u64,
    /// The highest usage net of released bytes (what the quota is held to).
    peak_staying: u64,
    peak_released: u64,
    peak_upload_bytes: u64,
    max_shortfall: u64,
    quota: Value,
}

impl Watched {
    fn saw(&mut self, status: &Value) {
        self.polls += 1;
        let usage = &status["usage"];
        let field = |v: &Value, name: &str| v[name].as_u64().unwrap_or(0);
        let total = field(usage, "total");
        let released = field(usage, "released_bytes");
        self.peak_total = self.peak_total.max(total);
        self.peak_staying = self.peak_staying.max(total - released.min(total));
        self.peak_released = self.peak_released.max(released);
        self.peak_upload_bytes = self.peak_upload_bytes.max(field(usage, "upload_bytes"));
        self.quota = status["quota"].clone();
        let last = &status["last_pass"];
        if last.is_null() {
            return;
        }
        let trigger = last["trigger"].as_str().unwrap_or("?").to_owned();
        let id = (
            last["started_at"].as_i64().unwrap_or(0),
            trigger.clone(),
            last["seconds"].to_string(),
        );
        if self.passes.insert(id) {
            *self.passes_by_trigger.entry(trigger).or_default() += 1;
            self.evicted_roots += last["evicted"].as_array().map_or(0, Vec::len) as u64;
            self.evicted_entries += last["evicted_entries"].as_array().map_or(0, Vec::len) as u64;
            self.bytes_freed += field(last, "bytes_freed");
            self.max_shortfall = self.max_shortfall.max(field(last, "shortfall"));
        }
    }
}

/// Poll `GET /api/v1/gc` until `stop`, for the figures.
async fn watch(url: String, stop: Arc<AtomicBool>) -> Watched {
    let http = reqwest::Client::new();
    let mut watched = Watched::default();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(r) = http.get(format!("{url}/api/v1/gc")).send().await
            && let Ok(status) = r.json::<Value>().await
        {
            watched.saw(&status);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watched
}

/// The server's own log of its passes (those that evicted or removed something):
/// (passes, roots evicted, blobs removed, bytes freed).
fn logged_passes(log: &str) -> (u64, u64, u64, u64) {
    let field = |line: &str, name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    log.lines()
        .filter(|l| l.contains("eviction pass") && l.contains("trigger="))
        .fold((0, 0, 0, 0), |(n, roots, blobs, freed), l| {
            (
                n + 1,
                roots + field(l, "evicted"),
                blobs + field(l, "blobs"),
                freed + field(l, "freed"),
            )
        })
}

/// What the server keeps of what the soak wrote, read back from it.
struct Kept {
    /// Manifests still there, by (repo, digest).
    manifests: BTreeSet<(String, String)>,
    /// Keys whose entries still restore, whole.
    keys: BTreeSet<String>,
    /// The blobs those reference, with their sizes.
    referenced: BTreeMap<String, u64>,
}

/// Read back every manifest the soak pushed (by digest; an index's children are
/// manifests pushed too) and restore every key it finalized, checking the bytes.
async fn kept(registry: &Client, cache: &actions::Client, world: &World) -> Kept {
    let manifests = world.manifests.lock().unwrap().clone();
    let mut kept = Kept {
        manifests: BTreeSet::new(),
        keys: BTreeSet::new(),
        referenced: BTreeMap::new(),
    };
    let reads = futures::stream::iter(manifests.iter())
        .map(|((repo, digest), known)| async move {
            match registry.get_manifest(repo, digest).await {
                Ok(found) => (repo, digest, known, found.is_some()),
                Err(p) => panic!("reading back {repo}@{digest}: {}", p.text()),
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    for (repo, digest, known, found) in reads {
        if found {
            kept.manifests.insert((repo.clone(), digest.clone()));
            kept.referenced.extend(known.blobs.iter().cloned());
        }
    }
    for ((repo, digest), known) in &manifests {
        if kept.manifests.contains(&(repo.clone(), digest.clone())) {
            for child in &known.children {
                assert!(
                    kept.manifests.contains(&(repo.clone(), child.clone())),
                    "index {repo}@{digest} is kept but its child {child} is not"
                );
            }
        }
    }
    let keys: BTreeSet<String> = world.keys.lock().unwrap().iter().cloned().collect();
    let restores = futures::stream::iter(keys)
        .map(|key| async move {
            let found = cache
                .try_v2_lookup(&key, &[])
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            // A key with no exact match matches the newest with it as a prefix, as on
            // GitHub: that one is checked as itself.
            let (url, _) = found.filter(|(_, matched)| *matched == key)?;
            let (status, body) = cache.try_get(&url).await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(status, 200, "entry {key} found, then not downloaded");
            assert!(
                body == entry_content(&key),
                "entry {key}: {} bytes that are not the ones saved",
                body.len()
            );
            Some(key)
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    for key in restores.into_iter().flatten() {
        kept.referenced.extend(entry_blobs(&entry_content(&key)));
        kept.keys.insert(key);
    }
    kept
}

/// The bytes on disk (whole 4 KiB blocks) of the blob files in `files` not in
/// `referenced`; panics if a referenced blob has no file.
fn unreferenced_bytes(files: &BTreeMap<String, u64>, referenced: &BTreeMap<String, u64>) -> u64 {
    let missing: Vec<_> = referenced
        .keys()
        .filter(|d| !files.contains_key(*d))
        .collect();
    assert!(
        missing.is_empty(),
        "blobs of kept manifests or entries missing on disk: {missing:?}"
    );
    files
        .iter()
        .filter(|(d, _)| !referenced.contains_key(*d))
        .map(|(_, &size)| on_disk(size))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_push_pull_under_continuous_eviction() {
    let budget: u64 = std::env::var(common::SOAK_EVENTS)
        .ok()
        .map(|v| v.parse().expect("LAYERCACHE_SOAK_EVENTS is a number"))
        .unwrap_or(SOAK_EVENTS);
    let started = Instant::now();
    let t = Timings::scaled();
    let timings = t.env();
    let mut env: Vec<(&str, &str)> = vec![
        ("LAYERCACHE_STORE__EVICTION__MAX_SIZE", SOAK_QUOTA),
        ("LAYERCACHE_STORE__EVICTION__MIN_FREE", "0"),
    ];
    env.extend(timings.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let server = common::Server::start_logged(&env);
    let token = common::mint_token(server.data_dir(), &["--read", SCOPE, "--write", SCOPE]);
    let counters = Arc::new(Counters::default());
    let cache_sent = Arc::new(AtomicU64::new(0));
    let registry = Client::new(&server.url, counters.clone()).with_push_window(t.push_window);
    let cache = actions::Client::new(&server.url, token).counting_into(cache_sent.clone());
    let world = Arc::new(World::default());
    let stats = Arc::new(Stats {
        in_use: t.in_use,
        ..Stats::default()
    });

    // A pool of layers images share, within and across repositories.
    let mut rng = StdRng::seed_from_u64(SOAK_SEED);
    let pool: Arc<Vec<Blob>> = Arc::new(
        (0..12)
            .map(|_| {
                let len = rng.random_range(16 * KIB..=128 * KIB);
                Blob::random(&mut rng, len)
            })
            .collect(),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch(server.url.clone(), stop.clone()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let soaker = Soaker {
                id,
                rng: StdRng::seed_from_u64(SOAK_SEED ^ ((id as u64 + 1) * 0x9e37_79b9)),
                registry: registry.clone(),
                cache: cache.clone(),
                pool: pool.clone(),
                world: world.clone(),
                stats: stats.clone(),
                own: VecDeque::new(),
                n: 0,
            };
            tokio::spawn(soaker.run(budget))
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let watched = watcher.await.unwrap();
    let load_seconds = started.elapsed().as_secs_f64();
    let events = Counters::get(&counters.requests) + cache_sent.load(Ordering::Relaxed);

    // (a) Every blob file hashes to its name.
    let dir = server.data_dir().to_owned();
    common::assert_blob_files_match_their_names(&dir);

    // (b) At once: the files nothing kept references are exactly what a dry run reports
    // as released (waiting out the window), young (inside grace) or due now. A pass
    // evicting between the read-back and the dry run would skew it: then once more.
    let reader = Client::new(&server.url, Arc::new(Counters::default()));
    let mut attempts = 0;
    let (kept_then, dry, unreferenced) = loop {
        attempts += 1;
        let kept = kept(&reader, &cache, &world).await;
        let files = blob_file_sizes(&dir);
        let dry = reader.gc_pass(true).await;
        let files_after = blob_file_sizes(&dir);
        let unreferenced = unreferenced_bytes(&files, &kept.referenced);
        let field = |name: &str| dry[name].as_u64().unwrap();
        let accounted = field("released_bytes") + field("young_bytes") + field("bytes_freed");
        let quiet = files == files_after
            && dry["evicted"] == Value::Array(vec![])
            && dry["evicted_entries"] == Value::Array(vec![]);
        if (quiet && unreferenced == accounted) || attempts == 3 {
            assert!(quiet, "the store kept changing under the check: {dry:#}");
            assert_eq!(
                unreferenced,
                accounted,
                "blob files nothing kept references ({unreferenced} bytes on disk) are not \
                 the released + young + due bytes of a dry run: {:#}",
                summary(&dry)
            );
            break (kept, dry, unreferenced);
        }
    };
    let pushed_manifests = world.manifests.lock().unwrap().len() as u64;
    let deleted = world.deleted.lock().unwrap().len() as u64;
    let finalized = Counters::get(&stats.saves);
    let evicted_manifests =
        pushed_manifests.saturating_sub(kept_then.manifests.len() as u64 + deleted);
    let evicted_entries = finalized.saturating_sub(kept_then.keys.len() as u64);

    // (c) After grace + push window + interval without writes (and a second for the
    // whole-second timestamps), the files are exactly the referenced ones, within quota.
    let quiet = t.grace + t.push_window + t.interval + Duration::from_secs(1);
    tokio::time::sleep(quiet).await;
    let kept_after = kept(&reader, &cache, &world).await;
    let files = blob_file_sizes(&dir);
    let status = reader.gc_status().await;
    let leaked: Vec<_> = files
        .keys()
        .filter(|d| !kept_after.referenced.contains_key(*d))
        .collect();
    let settled_unreferenced = unreferenced_bytes(&files, &kept_after.referenced);
    common::assert_blob_files_match_their_names(&dir);

    // Every tag still listed pulls whole.
    let mut tags_pulled = 0;
    for r in 0..REPOS {
        let repo = format!("soak/r{r}");
        for tag in reader.tags(&repo).await {
            match reader.pull(&repo, &tag).await {
                Ok(Pulled::Whole { .. }) => tags_pulled += 1,
                other => panic!("listed tag {repo}:{tag} does not pull whole: {other:?}"),
            }
        }
    }

    let (logged, logged_roots, logged_blobs, logged_freed) = logged_passes(&server.log());
    let s = &*stats;
    let g = Counters::get;
    let failures = s.failures.lock().unwrap().clone();
    let quota_limit = watched.quota["limit"].as_u64().unwrap_or(1);
    println!(
        "eviction soak summary\n\
         \x20 timings: defaults / {TIME_FACTOR} (in_use {:?}, push_window {:?}, grace {:?}, interval {:?}, upload_expiry {:?}); quota {SOAK_QUOTA}, {CLIENTS} clients\n\
         \x20 events: {events} (budget {budget}) in {load_seconds:.1} s of load ({:.0}/s); {:.1} s in all\n\
         \x20 pushes: {} ({} indexes; blobs uploaded {} monolithic, {} session, {} chunked; {} skipped after HEAD)\n\
         \x20 MANIFEST_BLOB_UNKNOWN retries: {} (each followed by a push that succeeded; {} naming a blob found or uploaded within the push window, {} an index's child)\n\
         \x20 tag moves: {} ({} found the root gone first, {} pushed again as read past in_use)\n\
         \x20 deletes: {} ({} found the root gone)\n\
         \x20 pulls: {} ({} hits, {} misses; {} blobs / {} MiB verified)\n\
         \x20 saves: {} ({} found the key taken); restores: {} ({} by prefix; {} hits, {} misses; {} MiB verified)\n\
         \x20 reads that lost a part past in_use (allowed): {}\n\
         \x20 failures: {} {failures:?}; corrupt or torn reads: {}\n\
         \x20 passes seen: {} sampled of {} polls {:?}; {logged} logged as evicting or removing\n\
         \x20 evicted: {evicted_manifests} distinct manifests, {evicted_entries} entries (exact: pushed - kept - deleted); \
         sampled passes {} roots, {} entries; logged passes {logged_roots} roots (a manifest pushed again counts again), {logged_blobs} blobs removed, {} MiB freed\n\
         \x20 peak usage {} KiB ({:.2}x the quota of {} KiB, high watermark {} KiB); net of released {} KiB ({:.2}x); released up to {} KiB; uploads up to {} KiB; largest shortfall {} KiB\n\
         \x20 check at once (attempt {attempts}): {} manifests and {} entries kept; unreferenced on disk {unreferenced} = released {} + young {} + due {}\n\
         \x20 check after {quiet:?} quiet: {} manifests and {} entries kept, {} blob files, {} referenced, {settled_unreferenced} bytes unreferenced; usage {} KiB (high {} KiB), released {}; {tags_pulled} listed tags pulled whole; {}",
        t.in_use,
        t.push_window,
        t.grace,
        t.interval,
        t.upload_expiry,
        events as f64 / load_seconds,
        started.elapsed().as_secs_f64(),
        g(&s.pushes),
        g(&s.index_pushes),
        g(&counters.monolithic),
        g(&counters.sessions),
        g(&counters.chunked),
        g(&counters.blobs_skipped),
        g(&counters.blob_unknown_retries),
        g(&counters.blob_unknown_within_window),
        g(&counters.blob_unknown_child),
        g(&s.tag_moves),
        g(&s.tag_move_misses),
        g(&s.tag_moves_repushed),
        g(&s.deletes),
        g(&s.delete_misses),
        g(&s.pulls),
        g(&s.pull_hits),
        g(&s.pull_misses),
        g(&counters.blobs_verified),
        g(&counters.bytes_verified) / MIB as u64,
        g(&s.saves),
        g(&s.saves_taken),
        g(&s.restores),
        g(&s.prefix_restores),
        g(&s.restore_hits),
        g(&s.restore_misses),
        g(&s.entry_bytes_verified) / MIB as u64,
        g(&s.past_in_use),
        s.failure_count(),
        g(&s.corrupt),
        watched.passes.len(),
        watched.polls,
        watched.passes_by_trigger,
        watched.evicted_roots,
        watched.evicted_entries,
        logged_freed / MIB as u64,
        watched.peak_total / KIB as u64,
        watched.peak_total as f64 / quota_limit as f64,
        quota_limit / KIB as u64,
        watched.quota["high"].as_u64().unwrap_or(0) / KIB as u64,
        watched.peak_staying / KIB as u64,
        watched.peak_staying as f64 / quota_limit as f64,
        watched.peak_released / KIB as u64,
        watched.peak_upload_bytes / KIB as u64,
        watched.max_shortfall / KIB as u64,
        kept_then.manifests.len(),
        kept_then.keys.len(),
        dry["released_bytes"],
        dry["young_bytes"],
        dry["bytes_freed"],
        kept_after.manifests.len(),
        kept_after.keys.len(),
        files.len(),
        kept_after.referenced.len(),
        usage_total(&status) / KIB as u64,
        status["quota"]["high"].as_u64().unwrap() / KIB as u64,
        status["usage"]["released_bytes"],
        meta_files(&dir),
    );
    let problems = s.problems.lock().unwrap().clone();
    for p in &problems {
        println!("  {p}");
    }
    for r in counters.refusals.lock().unwrap().iter() {
        println!("  MANIFEST_BLOB_UNKNOWN: {r}");
    }

    assert_eq!(s.failure_count(), 0, "failures: {problems:#?}");
    assert_eq!(g(&s.corrupt), 0, "corrupt reads: {problems:#?}");
    assert!(events >= budget, "the clients stopped early");
    assert!(
        g(&s.pull_hits) > 0 && g(&s.restore_hits) > 0,
        "nothing was ever read back"
    );
    assert!(
        evicted_manifests > 0 && evicted_entries > 0,
        "the server never evicted both manifests and entries"
    );
    assert!(
        leaked.is_empty(),
        "blob files nothing kept references, after {quiet:?} without writes: {leaked:?}"
    );
    assert_eq!(status["usage"]["released_bytes"], 0, "{status:#}");
    assert!(
        usage_total(&status) <= status["quota"]["high"].as_u64().unwrap(),
        "usage is above the high watermark after {quiet:?} without writes: {status:#}"
    );
}

// ---- crashes during the startup pass ----

const CRASH_SEED: u64 = 0xc0ff_ee00;
/// Many small images: the startup pass has thousands of blobs to delete, so it runs
/// long enough to be killed in the middle.
const CRASH_IMAGES: usize = 1600;
const CRASH_ROUNDS: usize = 4;
const CRASH_KILLS: usize = 6;
/// The share of the blob bytes the small quota leaves room for.
const CRASH_KEEP_PERCENT: u64 = 35;

/// A root the crash test pushed: its tag, the round it was pushed in, and its manifests
/// (an image, or an index and its children) with their blobs.
struct Root {
    repo: String,
    tag: String,
    round: usize,
    digest: String,
    /// (manifest digest, its blobs) for the root and, for an index, each child.
    images: Vec<(String, Vec<String>)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_mid_eviction_pass_loses_nothing_referenced() {
    let started = Instant::now();
    let base_env = [
        ("LAYERCACHE_STORE__EVICTION__GRACE", "0s"),
        ("LAYERCACHE_STORE__EVICTION__IN_USE", "0s"),
        ("LAYERCACHE_STORE__EVICTION__PUSH_WINDOW", "0s"),
    ];
    let mut first = common::Server::start_with_env(&base_env);
    let dir = first.data_dir().to_owned();
    let counters = Arc::new(Counters::default());
    let client = Client::new(&first.url, counters.clone());
    let mut rng = StdRng::seed_from_u64(CRASH_SEED);
    let pool: Vec<Blob> = (0..16).map(|_| Blob::random(&mut rng, 4 * KIB)).collect();

    // Fill: rounds of images more than a second apart, so their last use orders them.
    let mut roots: Vec<Root> = Vec::new();
    let per_round = CRASH_IMAGES / CRASH_ROUNDS;
    for round in 0..CRASH_ROUNDS {
        if round > 0 {
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let mut batch = Vec::new();
        for k in round * per_round..(round + 1) * per_round {
            let make = |rng: &mut StdRng, part: usize| {
                let mut layers: Vec<Blob> = (0..2)
                    .map(|_| {
                        let len = rng.random_range(KIB..=8 * KIB);
                        Blob::random(rng, len)
                    })
                    .collect();
                if rng.random_bool(0.5) {
                    layers.push(pool[rng.random_range(0..pool.len())].clone());
                }
                Image::new(config_blob(&format!("crash {k} {part}")), layers)
            };
            let repo = format!("fill/{}", ["a", "b", "c"][k % 3]);
            let tag = format!("img-{k}");
            let root = if k % 10 == 9 {
                let index = Index::new(vec![make(&mut rng, 0), make(&mut rng, 1)]);
                let mut images = vec![(index.digest.clone(), Vec::new())];
                images.extend(index.children.iter().map(|c| {
                    (
                        c.digest.clone(),
                        c.blobs().map(|b| b.digest.clone()).collect(),
                    )
                }));
                (
                    Root {
                        repo,
                        tag,
                        round,
                        digest: index.digest.clone(),
                        images,
                    },
                    Content::Index(index),
                )
            } else {
                let image = make(&mut rng, 0);
                let images = vec![(
                    image.digest.clone(),
                    image.blobs().map(|b| b.digest.clone()).collect(),
                )];
                (
                    Root {
                        repo,
                        tag,
                        round,
                        digest: image.digest.clone(),
                        images,
                    },
                    Content::Image(image),
                )
            };
            batch.push(root);
        }
        // Push the round 16 at a time.
        let pushes = batch.iter().map(|(root, content)| {
            let client = client.clone();
            let (repo, tag) = (root.repo.clone(), root.tag.clone());
            let content = content.clone();
            tokio::spawn(async move {
                match content {
                    Content::Image(image) => client.push_image(&repo, &image, &tag).await,
                    Content::Index(index) => client.push_index(&repo, &index, &tag).await,
                }
            })
        });
        let results: Vec<_> = futures::stream::iter(pushes)
            .buffer_unordered(16)
            .collect()
            .await;
        for r in results {
            r.unwrap().unwrap();
        }
        roots.extend(batch.into_iter().map(|(root, _)| root));
    }
    let full = client.gc_status().await;
    let full_usage = usage_total(&full);
    let full_files = blob_files(&dir).len();
    let full_meta = meta_files(&dir);
    first.kill();

    // Restart with a quota whose low watermark (80%) leaves room for the metadata and
    // a share of the blobs, and crash while the startup pass works. Each restart lowers
    // the share a little, so every startup pass has work to be killed in the middle of;
    // the last start keeps CRASH_KEEP_PERCENT.
    let quota_env = |keep_percent: u64| -> Vec<(String, String)> {
        let max_size = (full["usage"]["metadata_bytes"].as_u64().unwrap()
            + full["usage"]["blob_bytes"].as_u64().unwrap() * keep_percent / 100)
            * 100
            / 80;
        base_env
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .chain(
                [
                    ("LAYERCACHE_STORE__EVICTION__MAX_SIZE", max_size.to_string()),
                    ("LAYERCACHE_STORE__EVICTION__MIN_FREE", "0".to_owned()),
                    ("LAYERCACHE_STORE__EVICTION__INTERVAL", "1s".to_owned()),
                ]
                .map(|(k, v)| (k.to_owned(), v)),
            )
            .collect()
    };
    let start = |env: &[(String, String)]| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        common::Server::start_on_with_env(&dir, "127.0.0.1:0", &env)
    };
    println!(
        "restart mid-pass: filled {} roots, {full_usage} bytes ({}), {full_files} blob files, {full_meta} in {:.1} s",
        roots.len(),
        full["usage"],
        started.elapsed().as_secs_f64()
    );
    let mut kill_rng = StdRng::seed_from_u64(CRASH_SEED + 1);
    let mut mid_pass_kills = 0;
    for kill in 0..CRASH_KILLS {
        let keep = CRASH_KEEP_PERCENT + 5 * (CRASH_KILLS - kill) as u64;
        let mut server = start(&quota_env(keep));
        let delay = Duration::from_millis(kill_rng.random_range(20..=300));
        tokio::time::sleep(delay).await;
        let status = Client::new(&server.url, counters.clone()).gc_status().await;
        server.kill();
        if status["last_pass"].is_null() {
            mid_pass_kills += 1;
        }
        println!(
            "  kill {kill} (quota for {keep}% of the blobs): after {delay:?}, {} blob files left; usage then {}, last pass {}",
            blob_files(&dir).len(),
            status["usage"],
            summary(&status["last_pass"]),
        );
    }

    println!("  {mid_pass_kills} of {CRASH_KILLS} kills came before the startup pass had finished");

    // Once more, killed as soon as the sweep is seen under way (the metadata holds fewer
    // blobs than when the server started), whatever the machine's speed.
    let mut server = start(&quota_env(CRASH_KEEP_PERCENT));
    let watcher = Client::new(&server.url, counters.clone());
    let at_start = watcher.gc_status().await["usage"]["blobs"]
        .as_u64()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let status = watcher.gc_status().await;
        let blobs = status["usage"]["blobs"].as_u64().unwrap();
        if blobs < at_start || !status["last_pass"].is_null() || Instant::now() > deadline {
            server.kill();
            break status;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    println!(
        "  kill {CRASH_KILLS} (sweep seen under way: {}): {} blobs in the metadata at start, {} then, {} blob files left",
        seen["last_pass"].is_null(),
        at_start,
        seen["usage"]["blobs"],
        blob_files(&dir).len(),
    );

    // Start once more and let it settle.
    let server = start(&quota_env(CRASH_KEEP_PERCENT));
    let client = Client::new(&server.url, counters.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    let settled = loop {
        let status = client.gc_status().await;
        if !status["last_pass"].is_null()
            && usage_total(&status) <= status["quota"]["high"].as_u64().unwrap()
        {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "usage never got under the quota: {} (last pass {})",
            status["usage"],
            summary(&status["last_pass"])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let last = client.gc().await;
    // Judge the store as the passes left it. The reads below record access times, which
    // grow the metadata (its WAL) past a quota this tight, and with a 1 s interval and no
    // grace a pass during them would evict roots while they are being judged: restart
    // with eviction idle.
    drop(server);
    let idle: Vec<(String, String)> = quota_env(CRASH_KEEP_PERCENT)
        .into_iter()
        .map(|(k, v)| match k.as_str() {
            "LAYERCACHE_STORE__EVICTION__MAX_SIZE" => (k, "1TiB".to_owned()),
            "LAYERCACHE_STORE__EVICTION__INTERVAL" => (k, "1h".to_owned()),
            _ => (k, v),
        })
        .collect();
    let server = start(&idle);
    let client = Client::new(&server.url, counters.clone());
    let on_disk = blob_files(&dir);
    println!(
        "  settled: usage {}; last pass {}\n  final pass {}\n  {} blob files; {}",
        settled["usage"],
        summary(&settled["last_pass"]),
        summary(&last),
        on_disk.len(),
        meta_files(&dir),
    );
    common::assert_blob_files_match_their_names(&dir);

    // Which roots are kept: a tag listed resolves to the root pushed under it, and a
    // root is kept exactly when its tag is still listed.
    let mut listed = BTreeSet::new();
    for repo in ["fill/a", "fill/b", "fill/c"] {
        for tag in client.tags(repo).await {
            listed.insert((repo.to_owned(), tag));
        }
    }
    let mut kept: Vec<&Root> = Vec::new();
    let mut evicted: Vec<&Root> = Vec::new();
    for root in &roots {
        let by_digest = match client.get_manifest(&root.repo, &root.digest).await {
            Ok(m) => m.is_some(),
            Err(p) => panic!("{}", p.text()),
        };
        let is_listed = listed.contains(&(root.repo.clone(), root.tag.clone()));
        assert_eq!(
            by_digest, is_listed,
            "{}:{} ({}): manifest stored {by_digest}, tag listed {is_listed}",
            root.repo, root.tag, root.digest
        );
        if by_digest {
            kept.push(root);
        } else {
            evicted.push(root);
        }
    }
    assert_eq!(
        listed.len(),
        kept.len(),
        "tags listed that were never pushed: {listed:?}"
    );

    // Every kept root pulls whole through its tag, and its blobs are all on disk; an
    // evicted index's children may outlive it (they are roots of their own then).
    let mut referenced = BTreeSet::new();
    for root in &kept {
        match client.pull(&root.repo, &root.tag).await {
            Ok(Pulled::Whole { .. }) => {}
            other => panic!(
                "kept root {}:{} does not pull whole: {other:?}",
                root.repo, root.tag
            ),
        }
        for (_, blobs) in &root.images {
            referenced.extend(blobs.iter().cloned());
        }
    }
    let mut orphaned_children = 0;
    for root in &evicted {
        for (digest, blobs) in root.images.iter().skip(1) {
            let child = match client.get_manifest(&root.repo, digest).await {
                Ok(child) => child,
                Err(p) => panic!("{}", p.text()),
            };
            if let Some((_, _, child)) = child {
                orphaned_children += 1;
                for (blob, size) in image_blobs(&child) {
                    if let Err(p) = client.get_blob(&root.repo, &blob, size).await {
                        panic!("kept child {digest}: {}", p.text());
                    }
                }
                referenced.extend(blobs.iter().cloned());
            }
        }
    }

    // Nothing on disk but what kept manifests reference (grace is 0).
    let leaked: Vec<_> = on_disk.difference(&referenced).collect();
    let lost: Vec<_> = referenced.difference(&on_disk).collect();
    println!(
        "  kept {} roots, evicted {} ({orphaned_children} children of evicted indexes kept); {} blobs referenced, {} files; {:.1} s in all",
        kept.len(),
        evicted.len(),
        referenced.len(),
        on_disk.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        lost.is_empty(),
        "blobs of kept manifests missing on disk: {lost:?}"
    );
    assert!(
        leaked.is_empty(),
        "blob files no kept manifest references: {leaked:?}"
    );
    assert!(
        !kept.is_empty() && evicted.len() > roots.len() / 2,
        "expected most roots evicted: kept {}, evicted {}",
        kept.len(),
        evicted.len()
    );

    // Least recently used first: no root evicted from a later round than one kept.
    let newest_evicted = evicted.iter().map(|r| r.round).max().unwrap();
    let oldest_kept = kept.iter().map(|r| r.round).min().unwrap();
    assert!(
        newest_evicted <= oldest_kept,
        "evicted a root of round {newest_evicted} but kept one of round {oldest_kept}"
    );
    common::assert_blob_files_match_their_names(&dir);
}

// ---- how much a pass evicts ----

/// Fill a fresh server: `push` runs against it; then wait past the current second (so
/// everything pushed is idle for a 0 s grace), note its usage and stop it. Returns the
/// first server (its directory lives as long as it does) and its status.
async fn fill_then_stop<F, Fut>(env: &[(&str, &str)], push: F) -> (common::Server, Value)
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut server = common::Server::start_with_env(env);
    let client = Client::new(&server.url, Arc::new(Counters::default()));
    push(client.clone()).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let status = client.gc_status().await;
    server.kill();
    (server, status)
}

/// Start on `dir` with a quota whose watermarks (both 80%) sit `over` bytes under
/// `usage`, and wait for the startup pass. Returns the server and that pass's report.
async fn restart_over_quota(
    dir: &Path,
    env: &[(&str, &str)],
    usage: u64,
    over: u64,
) -> (common::Server, Client, Value) {
    let max_size = ((usage - over) * 100 / 80).to_string();
    let mut env: Vec<(&str, &str)> = env.to_vec();
    env.extend([
        ("LAYERCACHE_STORE__EVICTION__MAX_SIZE", max_size.as_str()),
        ("LAYERCACHE_STORE__EVICTION__MIN_FREE", "0"),
        ("LAYERCACHE_STORE__EVICTION__HIGH_WATERMARK", "80%"),
        ("LAYERCACHE_STORE__EVICTION__LOW_WATERMARK", "80%"),
        ("LAYERCACHE_STORE__EVICTION__INTERVAL", "1h"),
    ]);
    let server = common::Server::start_on_with_env(dir, "127.0.0.1:0", &env);
    let client = Client::new(&server.url, Arc::new(Counters::default()));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = client.gc_status().await;
        if !status["last_pass"].is_null() {
            let report = status["last_pass"].clone();
            return (server, client, report);
        }
        assert!(Instant::now() < deadline, "no startup pass: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An image of one layer of `len` random bytes.
fn big_image(rng: &mut StdRng, name: &str, len: usize) -> Image {
    Image::new(config_blob(name), vec![Blob::random(rng, len)])
}

/// A pass that must free a little evicts the least recently used roots, not every root,
/// even when the blobs it unreferences stay for their grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_evicts_only_what_it_needs_when_blobs_are_in_grace() {
    let env = [
        ("LAYERCACHE_STORE__EVICTION__GRACE", "1h"),
        ("LAYERCACHE_STORE__EVICTION__IN_USE", "0s"),
        ("LAYERCACHE_STORE__EVICTION__PUSH_WINDOW", "0s"),
    ];
    let mut rng = StdRng::seed_from_u64(0x6ace);
    let images: Vec<Image> = (0..10)
        .map(|i| big_image(&mut rng, &format!("grace {i}"), 2 * MIB))
        .collect();
    let pushed = images.clone();
    let (first, status) = fill_then_stop(&env, |client| async move {
        for (i, image) in pushed.iter().enumerate() {
            if i == 5 {
                // The second half is more recently used.
                tokio::time::sleep(Duration::from_millis(1100)).await;
            }
            let tag = format!("img-{i}");
            client.push_image("grace/app", image, &tag).await.unwrap();
        }
    })
    .await;
    // 5 MiB over: the three least recently used images would cover it.
    let (_server, client, report) =
        restart_over_quota(first.data_dir(), &env, usage_total(&status), 5 * MIB as u64).await;
    let tags = client.tags("grace/app").await;
    println!("pass: {}\ntags left: {tags:?}", summary(&report));
    for i in 5..10 {
        assert!(
            tags.contains(&format!("img-{i}")),
            "the pass evicted img-{i}, one of the most recently used; tags left {tags:?}; pass {}",
            summary(&report)
        );
    }
}

/// Evicting an index lets its children go too, before any more recently used root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicting_an_index_frees_its_children_before_newer_roots() {
    let env = [
        ("LAYERCACHE_STORE__EVICTION__GRACE", "0s"),
        ("LAYERCACHE_STORE__EVICTION__IN_USE", "0s"),
        ("LAYERCACHE_STORE__EVICTION__PUSH_WINDOW", "0s"),
    ];
    let mut rng = StdRng::seed_from_u64(0x1dec);
    let index = Index::new(vec![
        big_image(&mut rng, "old amd64", 4 * MIB),
        big_image(&mut rng, "old arm64", 4 * MIB),
    ]);
    let newer: Vec<Image> = (0..6)
        .map(|i| big_image(&mut rng, &format!("new {i}"), 4 * MIB))
        .collect();
    let (old, pushed) = (index.clone(), newer.clone());
    let (first, status) = fill_then_stop(&env, |client| async move {
        client.push_index("lru/app", &old, "old").await.unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        for (i, image) in pushed.iter().enumerate() {
            client
                .push_image("lru/app", image, &format!("new-{i}"))
                .await
                .unwrap();
        }
    })
    .await;
    // 6 MiB over: the old index with its children (8 MiB) covers it.
    let (_server, client, report) =
        restart_over_quota(first.data_dir(), &env, usage_total(&status), 6 * MIB as u64).await;
    let tags = client.tags("lru/app").await;
    let mut children_left = Vec::new();
    for child in &index.children {
        if let Ok(Some(_)) = client.get_manifest("lru/app", &child.digest).await {
            children_left.push(child.digest.clone());
        }
    }
    println!(
        "pass: {}\ntags left: {tags:?}\nchildren of the evicted index left: {children_left:?}",
        summary(&report)
    );
    for i in 0..newer.len() {
        assert!(
            tags.contains(&format!("new-{i}")),
            "the pass evicted new-{i}, more recently used than the index it evicted; tags left \
             {tags:?}, the index's children left: {children_left:?}; pass {}",
            summary(&report)
        );
    }
    assert!(
        children_left.is_empty(),
        "children of the evicted index are left: {children_left:?}"
    );
}
