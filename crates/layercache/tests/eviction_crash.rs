//! `kill -9` of a loaded server whose passes evict and sweep, at random moments, then a
//! restart on the same data directory, round after round.
//!
//! Each round pushes images (monolithic, session and chunked uploads, each after a HEAD),
//! deletes some, and saves GitHub Actions cache entries in Put Blocks, against a small
//! quota with short timings, and kills the server (seeded, so a failure replays): while
//! pushes are in flight, while a pass sweeps what a batch of deletes released (right
//! after `POST /api/v1/gc`), while an entry's blocks go up, or at any moment. With the
//! server down, every blob file must hash to its name (invariant 1). Restarted, every tag
//! listed pulls whole, every entry found restores to the bytes saved (acknowledged or
//! not), no blob reads back under a wrong digest, and the server takes a push and a save
//! as usual. At the end, once the windows have passed without writes, the blob files are
//! exactly those the kept manifests and entries reference: no crash left one behind or
//! took one away.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::actions::{self, SCOPE, go_block_id, go_url};
use common::load::{
    Blob, Client, Counters, Image, Pulled, blob_file_sizes, blob_files, config_blob, on_disk,
    summary,
};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const KIB: usize = 1 << 10;
const SEED: u64 = 0xdead_c0de;
const ROUNDS: usize = 24;
/// Small enough that the load's passes evict every round, large enough to keep a few
/// rounds of roots for deletes to release.
const QUOTA: &str = "64MiB";
/// Short timings, so sweeps happen within a round. A read keeps what it read this long
/// (entries count in whole seconds: 3 s keep them at least 2 s after a lookup).
const IN_USE: Duration = Duration::from_secs(3);
/// What a push checked or uploaded stays this long after its root goes.
const PUSH_WINDOW: Duration = Duration::from_secs(1);
/// Unreferenced blobs never released, and unfinished uploads and entries, go after this.
const GRACE: Duration = Duration::from_secs(4);
const UPLOAD_EXPIRY: Duration = Duration::from_secs(4);
const INTERVAL: Duration = Duration::from_millis(100);
const REPOS: usize = 2;
const PUSHERS: usize = 3;
const SAVERS: usize = 2;
/// The Put Block size of the savers.
const BLOCK: usize = 64 * KIB;

/// Where a kill lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Moment {
    /// While pushes are in flight.
    Push,
    /// Right after `POST /api/v1/gc` with a batch of released blobs due.
    Sweep,
    /// While an entry's blocks go up (some acknowledged, the block list not yet sent).
    Blocks,
    /// Any time.
    Any,
}

/// The bytes saved under `key`: 16 KiB to 256 KiB, 1 to 4 blocks.
fn entry_content(key: &str) -> Vec<u8> {
    actions::keyed_content(key, 16 * KIB, 256 * KIB)
}

/// What the test wrote, acknowledged or only attempted.
#[derive(Default)]
struct Ledger {
    /// Manifests whose PUT was sent: (repo, digest) → their blobs (digest, size).
    manifests: BTreeMap<(String, String), Vec<(String, u64)>>,
    /// Roots pushed and acknowledged: (repo, tag, digest, when), not yet deleted.
    roots: Vec<(String, String, String, Instant)>,
    /// Blobs whose upload was sent: (round, repo, digest, size).
    blobs: BTreeSet<(usize, String, String, u64)>,
    /// Keys whose finalize was acknowledged.
    finalized: BTreeSet<String>,
    /// Keys created and not (yet) acknowledged as finalized.
    unacknowledged: BTreeSet<String>,
}

/// What is in flight, for the killer to aim at.
#[derive(Default)]
struct InFlight {
    pushes: AtomicUsize,
    /// Entries with some blocks acknowledged and the block list not yet sent.
    block_uploads: AtomicUsize,
    /// Set just before the kill: errors from then on are the kill's.
    killed: AtomicBool,
    /// Errors before the kill: failures.
    failures: Mutex<Vec<String>>,
}

impl InFlight {
    /// A request of the load failed: the end of the task, and a failure unless the
    /// server was being killed.
    fn failed(&self, what: String) {
        if !self.killed.load(Ordering::SeqCst) {
            self.failures.lock().unwrap().push(what);
        }
    }
}

/// One pusher until the kill: images of 1 to 3 layers (fresh, 8 KiB to 256 KiB, or from
/// the pool) pushed as clients do, and now and then a delete of one of its own roots.
async fn pusher(
    client: Client,
    id: usize,
    round: usize,
    pool: Arc<Vec<Blob>>,
    ledger: Arc<Mutex<Ledger>>,
    flight: Arc<InFlight>,
) {
    let mut rng = StdRng::seed_from_u64(SEED ^ ((round * 64 + id) as u64 * 0x9e37_79b9));
    let repo = format!("crash/r{}", id % REPOS);
    let mut n = 0;
    while !flight.killed.load(Ordering::Relaxed) {
        n += 1;
        if rng.random_bool(0.1) {
            let victim = {
                let ledger = ledger.lock().unwrap();
                let own: Vec<_> = ledger.roots.iter().filter(|r| r.0 == repo).collect();
                (!own.is_empty()).then(|| own[rng.random_range(0..own.len())].clone())
            };
            if let Some((repo, _, digest, _)) = victim {
                if let Err(e) = client.delete_manifest(&repo, &digest).await {
                    return flight.failed(e);
                }
                ledger.lock().unwrap().roots.retain(|r| r.2 != digest);
            }
            continue;
        }
        let layers: Vec<Blob> = (0..rng.random_range(1..=3))
            .map(|_| {
                if rng.random_bool(0.2) {
                    pool[rng.random_range(0..pool.len())].clone()
                } else {
                    let len = (8.0 * KIB as f64 * 32f64.powf(rng.random::<f64>())) as usize;
                    Blob::random(&mut rng, len)
                }
            })
            .collect();
        let image = Image::new(config_blob(&format!("crash {round} {id} {n}")), layers);
        let tag = format!("r{round}-p{id}-{n}");
        {
            let mut ledger = ledger.lock().unwrap();
            let blobs: Vec<(String, u64)> = image
                .blobs()
                .map(|b| (b.digest.clone(), b.bytes.len() as u64))
                .collect();
            for (digest, size) in &blobs {
                ledger
                    .blobs
                    .insert((round, repo.clone(), digest.clone(), *size));
            }
            ledger
                .manifests
                .insert((repo.clone(), image.digest.clone()), blobs);
        }
        flight.pushes.fetch_add(1, Ordering::SeqCst);
        let pushed = client.push_image(&repo, &image, &tag).await;
        flight.pushes.fetch_sub(1, Ordering::SeqCst);
        if let Err(e) = pushed {
            return flight.failed(e);
        }
        ledger.lock().unwrap().roots.push((
            repo.clone(),
            tag,
            image.digest.clone(),
            Instant::now(),
        ));
    }
}

/// One saver until the kill: entries created, uploaded one Put Block at a time (as the
/// JS toolkit does), listed and finalized.
async fn saver(
    cache: actions::Client,
    id: usize,
    round: usize,
    ledger: Arc<Mutex<Ledger>>,
    flight: Arc<InFlight>,
) {
    let mut n = 0;
    while !flight.killed.load(Ordering::Relaxed) {
        // A build step between saves.
        tokio::time::sleep(Duration::from_millis(n % 4 * 10)).await;
        n += 1;
        let key = format!("r{round}-s{id}-{n}");
        let bytes = entry_content(&key);
        ledger.lock().unwrap().unacknowledged.insert(key.clone());
        let url = match cache.try_v2_create(&key).await {
            Ok(Some(url)) => url,
            Ok(None) => return flight.failed(format!("create {key}: already exists")),
            Err(e) => return flight.failed(e),
        };
        let mut ids = Vec::new();
        let mut counted = false;
        for (i, block) in bytes.chunks(BLOCK).enumerate() {
            let id = go_block_id(i as u32);
            let target = go_url(&url, &[("comp", "block"), ("blockid", &id)]);
            let put = cache.try_put_block(&target, block).await;
            if let Some(e) = refused(put, &format!("{key}: Put Block {i}")) {
                if counted {
                    flight.block_uploads.fetch_sub(1, Ordering::SeqCst);
                }
                return flight.failed(e);
            }
            ids.push(id);
            if !counted {
                counted = true;
                flight.block_uploads.fetch_add(1, Ordering::SeqCst);
            }
        }
        flight.block_uploads.fetch_sub(1, Ordering::SeqCst);
        let put = cache.try_put_block_list(&url, &ids).await;
        if let Some(e) = refused(put, &format!("{key}: Put Block List")) {
            return flight.failed(e);
        }
        if let Err(e) = cache.try_v2_finalize(&key, bytes.len()).await {
            return flight.failed(e);
        }
        let mut ledger = ledger.lock().unwrap();
        ledger.unacknowledged.remove(&key);
        ledger.finalized.insert(key);
    }
}

/// What went wrong with a signed-URL write that should have been answered 201.
fn refused(put: Result<reqwest::Response, String>, what: &str) -> Option<String> {
    match put {
        Ok(r) if r.status() == 201 => None,
        Ok(r) => Some(format!("{what}: {}", r.status())),
        Err(e) => Some(format!("{what}: {e}")),
    }
}

/// `POST /api/v1/gc`, the report, or `None` if the server went away.
async fn run_pass(client: Client) -> Option<Value> {
    let r = client
        .send(
            client
                .http
                .post(format!("{}/api/v1/gc?dry_run=false", client.base)),
        )
        .await
        .ok()?;
    r.json().await.ok()
}

/// Delete up to `max` acknowledged roots pushed longer ago than the push window, the
/// newest of them first (the oldest are evicted already), at once, so their blobs are
/// released and due now or within a second; how many went.
async fn delete_old_roots(client: &Client, ledger: &Mutex<Ledger>, max: usize) -> usize {
    let victims: Vec<_> = {
        let ledger = ledger.lock().unwrap();
        ledger
            .roots
            .iter()
            .rev()
            .filter(|r| r.3.elapsed() > PUSH_WINDOW)
            .take(max)
            .cloned()
            .collect()
    };
    let deleted: Vec<(String, bool)> = futures::stream::iter(victims)
        .map(|(repo, _, digest, _)| async move {
            let ok = client
                .delete_manifest(&repo, &digest)
                .await
                .unwrap_or(false);
            (digest, ok)
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut ledger = ledger.lock().unwrap();
    for (digest, _) in &deleted {
        ledger.roots.retain(|r| r.2 != *digest);
    }
    deleted.iter().filter(|(_, ok)| *ok).count()
}

/// What one verification after a restart saw.
#[derive(Default, Debug)]
struct Verified {
    tags_pulled: usize,
    tags_gone_meanwhile: usize,
    entries_restored: usize,
    entries_missing: usize,
    unacknowledged_whole: usize,
    unacknowledged_absent: usize,
    blobs_read: usize,
    blobs_absent: usize,
}

/// Everything the restarted server shows must be whole: tags, entries, blobs (eight
/// requests at a time).
async fn verify(client: &Client, cache: &actions::Client, ledger: &Mutex<Ledger>) -> Verified {
    let mut v = Verified::default();
    let mut listed = Vec::new();
    for r in 0..REPOS {
        let repo = format!("crash/r{r}");
        listed.extend(
            client
                .tags(&repo)
                .await
                .into_iter()
                .map(|t| (repo.clone(), t)),
        );
    }
    let pulls: Vec<bool> = futures::stream::iter(listed)
        .map(|(repo, tag)| async move {
            match client.pull(&repo, &tag).await {
                Ok(Pulled::Whole { .. }) => true,
                // Evicted since the listing: it must not be listed any more.
                Ok(Pulled::Miss) if !client.tags(&repo).await.contains(&tag) => false,
                other => panic!("listed tag {repo}:{tag} does not pull whole: {other:?}"),
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    v.tags_pulled = pulls.iter().filter(|&&whole| whole).count();
    v.tags_gone_meanwhile = pulls.len() - v.tags_pulled;
    let (finalized, unacknowledged, blobs) = {
        let ledger = ledger.lock().unwrap();
        (
            ledger.finalized.clone(),
            ledger.unacknowledged.clone(),
            ledger.blobs.clone(),
        )
    };
    let keys = finalized
        .iter()
        .map(|k| (k, true))
        .chain(unacknowledged.iter().map(|k| (k, false)));
    let restores: Vec<(bool, bool)> = futures::stream::iter(keys)
        .map(|(key, acknowledged)| async move {
            let found = cache
                .try_v2_lookup(key, &[])
                .await
                .unwrap_or_else(|e| panic!("lookup {key} after the restart: {e}"));
            // A key with no exact match may match a longer one by prefix: not this entry.
            let Some((url, _)) = found.filter(|(_, matched)| matched == key) else {
                return (acknowledged, false);
            };
            let (status, body) = cache
                .try_get(&url)
                .await
                .unwrap_or_else(|e| panic!("entry {key} found after the restart, then: {e}"));
            assert_eq!(
                status, 200,
                "entry {key} found after the restart, then not read"
            );
            assert!(
                body == entry_content(key),
                "entry {key} (finalize acknowledged: {acknowledged}) restores {} bytes that \
                 are not the ones saved",
                body.len()
            );
            (acknowledged, true)
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for (acknowledged, whole) in restores {
        match (acknowledged, whole) {
            (true, true) => v.entries_restored += 1,
            (true, false) => v.entries_missing += 1,
            (false, true) => v.unacknowledged_whole += 1,
            (false, false) => v.unacknowledged_absent += 1,
        }
    }
    // Blobs of this round and the one before: uploads the kill cut short among them.
    let latest = blobs.iter().map(|b| b.0).max().unwrap_or(0);
    let reads: Vec<bool> = futures::stream::iter(blobs.iter().filter(|b| b.0 + 1 >= latest))
        .map(|(_, repo, digest, size)| async move {
            match client.try_get_blob(repo, digest, Some(*size)).await {
                Ok(found) => found,
                Err(p) => panic!("blob {repo} {digest} after the restart: {}", p.text()),
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    v.blobs_read = reads.iter().filter(|&&found| found).count();
    v.blobs_absent = reads.len() - v.blobs_read;
    v
}

/// The restarted server works as usual: a push and a pull, a save and a restore.
async fn works_as_usual(client: &Client, cache: &actions::Client, round: usize) {
    let mut rng = StdRng::seed_from_u64(SEED + round as u64);
    let image = Image::new(
        config_blob(&format!("after kill {round}")),
        vec![
            Blob::random(&mut rng, 100 * KIB),
            Blob::random(&mut rng, 5 * KIB),
        ],
    );
    let tag = format!("after-{round}");
    client
        .push_image("crash/check", &image, &tag)
        .await
        .unwrap_or_else(|e| panic!("push after restart {round}: {e}"));
    assert!(matches!(
        client.pull("crash/check", &tag).await,
        Ok(Pulled::Whole { .. })
    ));
    let key = format!("after-{round}");
    let bytes = entry_content(&key);
    let url = cache.try_v2_create(&key).await.unwrap().unwrap();
    cache
        .try_upload_blocks(&url, &bytes, BLOCK, 4)
        .await
        .unwrap();
    cache.try_v2_finalize(&key, bytes.len()).await.unwrap();
    let (url, matched) = cache.try_v2_lookup(&key, &[]).await.unwrap().unwrap();
    assert_eq!(matched, key);
    assert!(cache.try_get(&url).await.unwrap().1 == bytes);
    client.gc_status().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_at_random_moments_shows_nothing_partial_and_loses_nothing_kept() {
    let started = Instant::now();
    let timings = [
        ("IN_USE", IN_USE),
        ("PUSH_WINDOW", PUSH_WINDOW),
        ("GRACE", GRACE),
        ("UPLOAD_EXPIRY", UPLOAD_EXPIRY),
        ("INTERVAL", INTERVAL),
    ]
    .map(|(key, d)| {
        (
            format!("LAYERCACHE_STORE__EVICTION__{key}"),
            format!("{}ms", d.as_millis()),
        )
    });
    let mut env: Vec<(&str, &str)> = vec![
        ("LAYERCACHE_STORE__EVICTION__MAX_SIZE", QUOTA),
        ("LAYERCACHE_STORE__EVICTION__MIN_FREE", "0"),
    ];
    env.extend(timings.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut server = common::Server::start_logged(&env);
    let dir = server.data_dir().to_owned();
    let token = common::mint_token(&dir, &["--read", SCOPE, "--write", SCOPE]);
    let counters = Arc::new(Counters::default());
    let client = Client::new(&server.url, counters.clone()).with_push_window(PUSH_WINDOW);
    let cache = actions::Client::new(&server.url, token);
    let mut rng = StdRng::seed_from_u64(SEED);
    let pool: Arc<Vec<Blob>> = Arc::new(
        (0..8)
            .map(|_| {
                let len = rng.random_range(8 * KIB..=64 * KIB);
                Blob::random(&mut rng, len)
            })
            .collect(),
    );
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut kills: BTreeMap<String, usize> = BTreeMap::new();
    let mut totals = Verified::default();
    let mut sweep_estimate = Duration::from_millis(20);
    let moments = [Moment::Push, Moment::Sweep, Moment::Blocks, Moment::Any];

    for round in 0..ROUNDS {
        let moment = moments[round % moments.len()];
        let flight = Arc::new(InFlight::default());
        let mut tasks = Vec::new();
        for id in 0..PUSHERS {
            tasks.push(tokio::spawn(pusher(
                client.clone(),
                id,
                round,
                pool.clone(),
                ledger.clone(),
                flight.clone(),
            )));
        }
        for id in 0..SAVERS {
            tasks.push(tokio::spawn(saver(
                cache.clone(),
                id,
                round,
                ledger.clone(),
                flight.clone(),
            )));
        }

        // Aim.
        let mut detail = String::new();
        let mut pass = None;
        let files_before = blob_files(&dir).len();
        match moment {
            Moment::Push => {
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..=800))).await;
                while flight.pushes.load(Ordering::SeqCst) == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            Moment::Blocks => {
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..=800))).await;
                let deadline = Instant::now() + Duration::from_secs(10);
                while flight.block_uploads.load(Ordering::SeqCst) == 0 {
                    assert!(Instant::now() < deadline, "no block upload under way");
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                tokio::time::sleep(Duration::from_micros(rng.random_range(0..=500))).await;
            }
            Moment::Sweep => {
                // Late enough in the round that its first roots are past the window.
                tokio::time::sleep(Duration::from_millis(rng.random_range(1500..=2500))).await;
                let deleted = delete_old_roots(&client, &ledger, 80).await;
                let due = client.gc_pass(true).await["blobs_removed"].clone();
                pass = Some(tokio::spawn(run_pass(client.clone())));
                let delay = sweep_estimate.mul_f64(rng.random::<f64>());
                tokio::time::sleep(delay).await;
                detail = format!(
                    "{deleted} roots deleted, {due} blobs due, killed {delay:?} after POST /api/v1/gc (a pass took about {sweep_estimate:?})"
                );
            }
            Moment::Any => {
                tokio::time::sleep(Duration::from_millis(rng.random_range(50..=1500))).await;
            }
        }
        let in_flight = (
            flight.pushes.load(Ordering::SeqCst),
            flight.block_uploads.load(Ordering::SeqCst),
        );
        let pass_ended = pass.as_ref().map(|p| p.is_finished());
        flight.killed.store(true, Ordering::SeqCst);
        server.kill();
        let pass_finished = match pass {
            Some(pass) => {
                let report = pass.await.unwrap();
                let finished = pass_ended == Some(true) && report.is_some();
                match report {
                    Some(report) if finished => {
                        sweep_estimate =
                            Duration::from_secs_f64(report["seconds"].as_f64().unwrap() * 2.0)
                                .max(Duration::from_millis(5));
                        detail.push_str(&format!(", the pass had ended: {}", summary(&report)));
                    }
                    _ => detail.push_str(", the pass had not answered"),
                }
                Some(finished)
            }
            None => None,
        };
        for task in tasks {
            task.await.unwrap();
        }
        let failures = flight.failures.lock().unwrap().clone();
        assert!(
            failures.is_empty(),
            "round {round}: requests failed before the kill: {failures:#?}"
        );
        let kind = match (moment, pass_finished) {
            (Moment::Sweep, Some(false)) => "during a pass after deletes".to_owned(),
            (Moment::Sweep, _) => "after a pass after deletes".to_owned(),
            (m, _) => format!("{m:?}").to_lowercase(),
        };
        *kills.entry(kind.clone()).or_default() += 1;
        if in_flight.0 > 0 {
            *kills.entry("(with pushes in flight)".into()).or_default() += 1;
        }
        if in_flight.1 > 0 {
            *kills
                .entry("(with block uploads in flight)".into())
                .or_default() += 1;
        }

        // Down: nothing partial is visible.
        common::assert_blob_files_match_their_names(&dir);
        let files_killed = blob_files(&dir).len();

        let restarting = Instant::now();
        server.restart();
        let v = verify(&client, &cache, &ledger).await;
        works_as_usual(&client, &cache, round).await;
        let checked_in = restarting.elapsed();
        println!(
            "round {round:2}: kill {kind} ({} pushes, {} block uploads in flight{}{detail}); blob files {files_before} before, {files_killed} at the kill; restarted and checked in {checked_in:.1?}: {v:?}",
            in_flight.0,
            in_flight.1,
            if detail.is_empty() { "" } else { "; " },
        );
        totals.tags_pulled += v.tags_pulled;
        totals.tags_gone_meanwhile += v.tags_gone_meanwhile;
        totals.entries_restored += v.entries_restored;
        totals.entries_missing += v.entries_missing;
        totals.unacknowledged_whole += v.unacknowledged_whole;
        totals.unacknowledged_absent += v.unacknowledged_absent;
        totals.blobs_read += v.blobs_read;
        totals.blobs_absent += v.blobs_absent;
    }

    // Quiet: past grace, upload expiry and the windows, the files are exactly what the
    // kept manifests and entries reference.
    tokio::time::sleep(GRACE.max(UPLOAD_EXPIRY) + PUSH_WINDOW + INTERVAL + Duration::from_secs(2))
        .await;
    let (manifests, keys) = {
        let ledger = ledger.lock().unwrap();
        let keys: BTreeSet<String> = ledger
            .finalized
            .iter()
            .chain(&ledger.unacknowledged)
            .cloned()
            .collect();
        (ledger.manifests.clone(), keys)
    };
    let mut referenced: BTreeMap<String, u64> = BTreeMap::new();
    let mut kept_manifests = 0;
    for ((repo, digest), blobs) in &manifests {
        match client.get_manifest(repo, digest).await {
            Ok(Some(_)) => {
                kept_manifests += 1;
                referenced.extend(blobs.iter().cloned());
            }
            Ok(None) => {}
            Err(p) => panic!("{}", p.text()),
        }
    }
    for r in 0..ROUNDS {
        if let Ok(Some((_, _, m))) = client
            .get_manifest("crash/check", &format!("after-{r}"))
            .await
        {
            kept_manifests += 1;
            referenced.extend(common::load::image_blobs(&m));
        }
    }
    let mut kept_entries = 0;
    for key in keys
        .iter()
        .cloned()
        .chain((0..ROUNDS).map(|r| format!("after-{r}")))
    {
        if let Some((url, matched)) = cache.try_v2_lookup(&key, &[]).await.unwrap()
            && matched == key
        {
            let (status, body) = cache.try_get(&url).await.unwrap();
            assert_eq!(status, 200);
            assert!(body == entry_content(&key), "entry {key} changed");
            kept_entries += 1;
            referenced.extend(actions::stored_pieces(&body, BLOCK));
        }
    }
    let files = blob_file_sizes(&dir);
    let status = client.gc_status().await;
    let leaked: Vec<_> = files
        .keys()
        .filter(|d| !referenced.contains_key(*d))
        .collect();
    let lost: Vec<_> = referenced
        .keys()
        .filter(|d| !files.contains_key(*d))
        .collect();
    let leaked_bytes: u64 = leaked.iter().map(|d| on_disk(files[*d])).sum();
    common::assert_blob_files_match_their_names(&dir);
    let log = server.log();
    let (finalized, unacknowledged) = {
        let ledger = ledger.lock().unwrap();
        (ledger.finalized.len(), ledger.unacknowledged.len())
    };
    println!(
        "kill -9 summary: {ROUNDS} rounds in {:.1} s; kills by moment {kills:?}\n\
         \x20 load: {} registry requests; {} manifests attempted, {} entries finalized, {} created and not acknowledged\n\
         \x20 verified after the restarts: {} listed tags pulled whole ({} evicted between listing and pull), \
         {} acknowledged entries restored whole ({} absent: evicted), {} unacknowledged entries whole and {} absent, \
         {} blob reads hashing right ({} absent)\n\
         \x20 at the end: {kept_manifests} manifests and {kept_entries} entries kept, {} blob files, {} referenced; usage {}; \
         startups that removed files a crash left: {}",
        started.elapsed().as_secs_f64(),
        Counters::get(&counters.requests),
        manifests.len(),
        finalized,
        unacknowledged,
        totals.tags_pulled,
        totals.tags_gone_meanwhile,
        totals.entries_restored,
        totals.entries_missing,
        totals.unacknowledged_whole,
        totals.unacknowledged_absent,
        totals.blobs_read,
        totals.blobs_absent,
        files.len(),
        referenced.len(),
        status["usage"],
        log.matches("removed blob files an interrupted run left")
            .count(),
    );
    assert!(
        lost.is_empty(),
        "blobs of kept manifests or entries missing: {lost:?}"
    );
    assert!(
        leaked.is_empty(),
        "blob files ({leaked_bytes} bytes) nothing kept references, after the windows: {leaked:?}"
    );
    assert!(
        kills.keys().any(|k| k == "during a pass after deletes"),
        "no kill landed during a pass: {kills:?}"
    );
}
