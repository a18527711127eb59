//! A burst of pushes larger than the room left under the quota, as a new user meets it:
//! `--max-size 400MiB`, then nine images of 50 MiB pushed one after another within
//! seconds, the oldest pulled again half-way.
//!
//! * On the default timings the blobs the evicted images release are still inside their
//!   push window, so they stay on disk for now; the passes count them as freed already
//!   and evict only as many images as the low watermark needs (the least recently used
//!   ones), not one more.
//! * With a short window they leave by themselves: the data directory, measured on disk,
//!   is back under the quota within the window plus a pass interval, without another
//!   write.
//! * A restart while released blobs wait does not forget them: they still leave on time,
//!   by a pass scheduled for the end of their window (the interval here is an hour).
//! * A released blob that a push checks again is taken up: it waits for that push's
//!   manifest like a new blob, while one nobody touches leaves after its window.
//! * A manifest its owner deletes while a pull is reading it leaves its blobs to that
//!   pull for `in_use`, as an evicted one does.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::{Duration, Instant};

use common::registry::{
    Pushed, assert_gone, assert_intact, delete_image, disk_usage, field, get_json, push_image,
    random_bytes,
};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const QUOTA: u64 = 400 * MIB;
const IMAGES: usize = 9;
const LAYER: u64 = 50 * MIB;
/// The image pulled again once half the burst is pushed.
const PULLED_AGAIN: usize = 0;

/// One burst at a time: each writes 450 MiB, and the timed ones should not share the
/// machine's two cores with another.
static ONE_BURST: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Push the nine images (`burst/i0` … `burst/i8`, tag `v1`), pulling image 0 whole after
/// the fifth; returns them in push order.
async fn burst(client: &reqwest::Client, server: &common::Server) -> Vec<Pushed> {
    let started = Instant::now();
    let mut images = Vec::new();
    for i in 0..IMAGES {
        let layer = random_bytes(0xb005 + i as u64, LAYER);
        images.push(push_image(client, server, &format!("burst/i{i}"), layer).await);
        if i == IMAGES / 2 {
            assert_intact(client, server, &images[PULLED_AGAIN]).await;
        }
    }
    println!(
        "burst: {IMAGES} images of {} MiB pushed in {:.1} s",
        LAYER / MIB,
        started.elapsed().as_secs_f64()
    );
    images
}

async fn post_gc(client: &reqwest::Client, server: &common::Server, dry_run: bool) -> Value {
    let r = client
        .post(server.at(&format!("/api/v1/gc?dry_run={dry_run}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Which images still resolve, by index.
async fn survivors(
    client: &reqwest::Client,
    server: &common::Server,
    images: &[Pushed],
) -> Vec<usize> {
    let mut kept = Vec::new();
    for (i, image) in images.iter().enumerate() {
        let (code, _) = common::registry::get_manifest(client, server, &image.repo, "v1").await;
        match code {
            200 => kept.push(i),
            404 => {}
            other => panic!("{}: GET manifest answered {other}", image.repo),
        }
    }
    kept
}

/// The evicted images are the least recently used: after the one pulled again, the
/// oldest pushes, in order.
fn assert_lru(kept: &[usize]) {
    let evicted: Vec<usize> = (0..IMAGES).filter(|i| !kept.contains(i)).collect();
    let lru_order: Vec<usize> = (0..IMAGES).filter(|&i| i != PULLED_AGAIN).collect();
    assert_eq!(
        evicted,
        lru_order[..evicted.len()],
        "evicted out of LRU order (kept {kept:?})"
    );
}

/// Wait until the data directory, measured on disk, is under the quota; returns how
/// long that took. Fails past `deadline`.
async fn under_quota_within(server: &common::Server, deadline: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let (_, allocated) = disk_usage(server.data_dir());
        if allocated <= QUOTA {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < deadline,
            "the data directory still holds {} MiB on disk after {deadline:?} (quota {} MiB)",
            allocated / MIB,
            QUOTA / MIB
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Wait until no released blob waits any more; returns the status then.
async fn released_swept_within(
    client: &reqwest::Client,
    server: &common::Server,
    deadline: Duration,
) -> Value {
    let started = Instant::now();
    loop {
        let status = get_json(client, &server.at("/api/v1/gc")).await;
        if field(&status, &["usage", "released_bytes"]) == 0 {
            return status;
        }
        assert!(
            started.elapsed() < deadline,
            "released blobs still wait after {deadline:?}: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_the_default_timings_evicts_only_what_the_quota_needs() {
    let _one = ONE_BURST.lock().await;
    let server =
        common::Server::start_with_env(&[("LAYERCACHE_STORE__EVICTION__MAX_SIZE", "400MiB")]);
    let client = reqwest::Client::new();
    let images = burst(&client, &server).await;
    post_gc(&client, &server, false).await;
    let status = get_json(&client, &server.at("/api/v1/gc")).await;

    // Nothing more to evict: what the evicted images released is as good as freed.
    let dry = post_gc(&client, &server, true).await;
    assert_eq!(
        dry["evicted"],
        Value::Array(vec![]),
        "a dry run proposes more: {dry:#}"
    );
    let pass = post_gc(&client, &server, false).await;
    assert_eq!(
        pass["evicted"],
        Value::Array(vec![]),
        "a pass evicts more: {pass:#}"
    );

    let kept = survivors(&client, &server, &images).await;
    println!("kept {kept:?}; status after the burst: {status:#}");
    assert!(kept.len() >= 6, "only {kept:?} of {IMAGES} images survived");
    assert!(
        kept.contains(&PULLED_AGAIN),
        "the image pulled again was evicted: {kept:?}"
    );
    assert!(
        kept.contains(&(IMAGES - 1)),
        "the newest image was evicted: {kept:?}"
    );
    assert_lru(&kept);
    for &i in &kept {
        assert_intact(&client, &server, &images[i]).await;
    }

    // The released bytes wait out the 15-minute window on disk, reported as such.
    let status = get_json(&client, &server.at("/api/v1/gc")).await;
    let released = field(&status, &["usage", "released_bytes"]);
    let evicted = (IMAGES - kept.len()) as u64;
    assert!(
        released >= evicted * LAYER && released < evicted * (LAYER + MIB),
        "released bytes {released} for {evicted} evicted images: {status:#}"
    );
    assert!(
        field(&status, &["usage", "total"]) - released <= field(&status, &["quota", "high"]),
        "above the high watermark even once the released bytes go: {status:#}"
    );
    let files = common::load::blob_files(server.data_dir());
    for i in (0..IMAGES).filter(|i| !kept.contains(i)) {
        assert!(
            files.contains(&images[i].layer),
            "image {i}'s layer left inside its window"
        );
    }
    let metrics = common::registry::get_text(&client, &server.at("/metrics")).await;
    assert!(
        metrics.contains(&format!("layercache_released_bytes {released}")),
        "metrics do not show the released bytes:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_short_window_the_store_is_back_under_the_quota_by_itself() {
    const WINDOW: Duration = Duration::from_secs(5);
    let _one = ONE_BURST.lock().await;
    let server = common::Server::start_with_env(&[
        ("LAYERCACHE_STORE__EVICTION__MAX_SIZE", "400MiB"),
        ("LAYERCACHE_STORE__EVICTION__IN_USE", "5s"),
        ("LAYERCACHE_STORE__EVICTION__PUSH_WINDOW", "5s"),
    ]);
    let client = reqwest::Client::new();
    let images = burst(&client, &server).await;
    // The default interval (a minute) bounds it; the pass scheduled for the end of the
    // window is what should do it.
    let took = under_quota_within(&server, WINDOW + Duration::from_secs(60)).await;
    let (_, allocated) = disk_usage(server.data_dir());
    println!(
        "under the quota {:.1} s after the burst: {} MiB on disk",
        took.as_secs_f64(),
        allocated / MIB
    );
    let status = released_swept_within(&client, &server, WINDOW + Duration::from_secs(60)).await;
    println!("status once every released blob left: {status:#}");
    let kept = survivors(&client, &server, &images).await;
    assert_lru(&kept);
    assert_gone(&client, &server, &images[1]).await;
    for &i in &kept {
        assert_intact(&client, &server, &images[i]).await;
    }
    let files = common::load::blob_files(server.data_dir());
    for i in (0..IMAGES).filter(|i| !kept.contains(i)) {
        assert!(
            !files.contains(&images[i].layer),
            "image {i}'s layer is still on disk"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_blobs_still_leave_on_time_after_a_restart() {
    const WINDOW: Duration = Duration::from_secs(20);
    let _one = ONE_BURST.lock().await;
    let mut server = common::Server::start_with_env(&[
        ("LAYERCACHE_STORE__EVICTION__MAX_SIZE", "400MiB"),
        ("LAYERCACHE_STORE__EVICTION__IN_USE", "20s"),
        ("LAYERCACHE_STORE__EVICTION__PUSH_WINDOW", "20s"),
        ("LAYERCACHE_STORE__EVICTION__INTERVAL", "1h"),
    ]);
    let client = reqwest::Client::new();
    let burst_started = Instant::now();
    let images = burst(&client, &server).await;
    post_gc(&client, &server, false).await;
    let status = get_json(&client, &server.at("/api/v1/gc")).await;
    assert!(
        field(&status, &["usage", "released_bytes"]) > 0,
        "nothing released: {status:#}"
    );
    let waiting: Vec<usize> = {
        let kept = survivors(&client, &server, &images).await;
        (0..IMAGES).filter(|i| !kept.contains(i)).collect()
    };

    server.kill();
    server.restart();
    let status = get_json(&client, &server.at("/api/v1/gc")).await;
    let files = common::load::blob_files(server.data_dir());
    if burst_started.elapsed() < WINDOW {
        // Still inside the window of every released blob: the startup pass kept them.
        for &i in &waiting {
            assert!(
                files.contains(&images[i].layer),
                "image {i}'s layer left early"
            );
        }
        assert!(
            field(&status, &["usage", "released_bytes"]) > 0,
            "the restart forgot the released blobs: {status:#}"
        );
    }
    // Only the pass scheduled for the end of the window can sweep them now.
    let took = under_quota_within(&server, WINDOW + Duration::from_secs(5)).await;
    println!(
        "under the quota {:.1} s after the restart, {:.1} s after the burst began",
        took.as_secs_f64(),
        burst_started.elapsed().as_secs_f64()
    );
    let files = common::load::blob_files(server.data_dir());
    for &i in &waiting {
        assert!(
            !files.contains(&images[i].layer),
            "image {i}'s layer is still on disk"
        );
        assert_gone(&client, &server, &images[i]).await;
    }
    let last = get_json(&client, &server.at("/api/v1/gc")).await;
    assert_eq!(
        last["last_pass"]["trigger"], "released",
        "not swept by the scheduled pass: {last:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_blob_checked_again_waits_for_the_manifest_of_that_push() {
    let server = common::Server::start_with_env(&[
        ("LAYERCACHE_STORE__EVICTION__PUSH_WINDOW", "1s"),
        ("LAYERCACHE_STORE__EVICTION__INTERVAL", "1h"),
    ]);
    let client = reqwest::Client::new();
    let taken = push_image(&client, &server, "release/taken", random_bytes(71, MIB)).await;
    let left = push_image(&client, &server, "release/left", random_bytes(72, MIB)).await;
    for image in [&taken, &left] {
        delete_image(&client, &server, image).await;
    }
    let status = get_json(&client, &server.at("/api/v1/gc")).await;
    assert!(
        field(&status, &["usage", "released_bytes"]) >= 2 * MIB,
        "the deleted images' blobs are not released: {status:#}"
    );
    // A push checks the first image's layer and config again (a use in the second of
    // the release counts as before it, so a second later) ...
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for digest in [&taken.layer, &taken.config] {
        let r = client
            .head(server.at(&format!("/v2/{}/blobs/{digest}", taken.repo)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // ... and takes its time: past the push window, passes keep what it checked and
    // sweep what nobody touched.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let pass = post_gc(&client, &server, false).await;
    let files = common::load::blob_files(server.data_dir());
    assert!(
        files.contains(&taken.layer),
        "a blob a push checked was swept: {pass:#}"
    );
    assert!(
        !files.contains(&left.layer),
        "an untouched released blob stayed: {pass:#}"
    );
    assert_eq!(pass["released_bytes"], 0, "{pass:#}");
    assert!(pass["young_bytes"].as_u64() >= Some(MIB), "{pass:#}");
    let r = client
        .put(server.at(&format!("/v2/{}/manifests/again", taken.repo)))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(taken.manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let (code, _) = common::registry::get_manifest(&client, &server, &taken.repo, "again").await;
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_finds_the_blobs_of_a_manifest_deleted_after_it_read_it() {
    let server = common::Server::start_with_env(&[
        ("LAYERCACHE_STORE__EVICTION__PUSH_WINDOW", "1s"),
        ("LAYERCACHE_STORE__EVICTION__INTERVAL", "1h"),
    ]);
    let client = reqwest::Client::new();
    let read = push_image(&client, &server, "delete/read", random_bytes(81, MIB)).await;
    let unread = push_image(&client, &server, "delete/unread", random_bytes(82, MIB)).await;
    // Past the push window of the uploads: only the pull's lease keeps a blob now.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (code, _) = common::registry::get_manifest(&client, &server, &read.repo, "v1").await;
    assert_eq!(code, 200);
    for image in [&read, &unread] {
        delete_image(&client, &server, image).await;
    }
    let pass = post_gc(&client, &server, false).await;
    for digest in [&read.layer, &read.config] {
        common::registry::get_blob(&client, &server, &read.repo, digest)
            .await
            .unwrap_or_else(|e| panic!("the pull lost blob {digest}: {e:?} ({pass:#})"));
    }
    assert_eq!(
        common::registry::get_blob(&client, &server, &unread.repo, &unread.layer).await,
        Err((404, "BLOB_UNKNOWN".to_owned())),
        "a blob of a deleted manifest nobody read stayed: {pass:#}"
    );
}
