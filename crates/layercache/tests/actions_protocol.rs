//! The GitHub Actions cache service at the protocol level. BuildKit's `type=gha` export
//! and import are replayed request by request over v1 (REST, chunked `PATCH` uploads) and
//! v2 (twirp + Azure-blob signed URLs, Put Blob / Put Block / Put Block List), including
//! the `index-…#N` lock that relies on create-if-absent and newest-prefix lookups; the
//! same content saved under two keys is stored once. Then malformed and hostile input
//! (bad ranges, sizes, signatures, tokens, JSON, keys), each answered 4xx without
//! touching what is stored. Written from the interface, the protocol notes and the
//! recorded BuildKit traces; BuildKit itself is not needed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use common::actions::{
    Entry, Gha, MIB, SCOPE, TWIRP, assert_request_id, base64, chunked, data, go_block_id, go_url,
    version,
};
use reqwest::{Method, StatusCode, Url};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------
// Harness (the client itself is `common::actions`)
// ---------------------------------------------------------------------------------------

/// BuildKit's index key for scope `buildkit`: `f921bd05` = sha256("refs/heads/main")[..8].
const INDEX: &str = "index-buildkit-1-f921bd05";

/// A 4xx status (never 5xx, never 2xx).
fn assert_4xx(status: StatusCode, what: &str) {
    assert!(
        status.is_client_error(),
        "{what}: expected 4xx, got {status}"
    );
}

/// Status and Azure error code (`<Error><Code>…</Code>`) of a signed-URL error.
async fn azure_error(response: reqwest::Response, what: &str) -> (StatusCode, String) {
    assert_request_id(&response, what);
    let status = response.status();
    let text = response.text().await.unwrap();
    let code = text
        .split_once("<Code>")
        .and_then(|(_, rest)| rest.split_once("</Code>"))
        .map(|(code, _)| code.to_owned())
        .unwrap_or_else(|| panic!("{what}: {status} without an Azure <Error><Code>: {text:?}"));
    (status, code)
}

// ---------------------------------------------------------------------------------------
// BuildKit type=gha, replayed
// ---------------------------------------------------------------------------------------

/// The layer blobs of one build: below, at and above the 1 MiB block size, and one
/// larger than a v1 chunk (32 MiB), so it goes up in several pieces.
fn layers(seed: u64) -> Vec<Entry> {
    [3503, 139, 2_098_527, MIB, 700_000, 33 * MIB + 5]
        .into_iter()
        .enumerate()
        .map(|(i, len)| Entry::layer(seed + i as u64, len))
        .collect()
}

/// The two generations of the mutable index BuildKit writes for scope `buildkit`.
fn indexes(seed: u64) -> [Entry; 2] {
    [
        Entry::new(format!("{INDEX}#1"), data(seed, 2531)),
        Entry::new(format!("{INDEX}#2"), data(seed + 1, 2870)),
    ]
}

#[tokio::test]
async fn buildkit_v1_export_then_import() {
    let gha = Gha::start();
    let layers = layers(100);
    let [index1, index2] = indexes(200);

    // Export: for each layer, lookup (miss), reserve, PATCH, commit.
    for layer in &layers {
        gha.v1_miss(&[&layer.key]).await;
        let id = gha.v1_reserve_ok(&layer.key, layer.bytes.len()).await;
        // BuildKit sends 32 MiB chunks, up to 4 in flight; anything above 1 MiB goes up in
        // smaller pieces here too, so every multi-chunk path is exercised.
        let chunk = if layer.bytes.len() > 32 * MIB {
            32 * MIB
        } else {
            512 * 1024
        };
        gha.v1_upload(id, &layer.bytes, chunk).await;
        gha.v1_commit_ok(id, layer.bytes.len()).await;
    }

    // The index lock: load `key#` by prefix (miss), reserve `#1`.
    let prefix = format!("{INDEX}#");
    gha.v1_miss(&[&prefix]).await;
    let id1 = gha.v1_reserve_ok(&index1.key, index1.bytes.len()).await;
    gha.v1_upload(id1, &index1.bytes, MIB).await;
    gha.v1_commit_ok(id1, index1.bytes.len()).await;
    let hit = gha.v1_hit(&[&prefix]).await;
    assert_eq!(hit["cacheKey"], index1.key, "{hit:#}");

    // A second writer that also read "no index yet" tries `#1`: refused, so it moves on.
    let again = gha.v1_reserve(&index1.key, index1.bytes.len()).await;
    let (status, body) = (again.status(), again.text().await.unwrap());
    assert_eq!(status, 409, "second reserve of {}: {body}", index1.key);
    assert!(body.contains("AlreadyExists"), "{body}");
    let id2 = gha.v1_reserve_ok(&index2.key, index2.bytes.len()).await;
    assert_ne!(id1, id2);
    gha.v1_upload(id2, &index2.bytes, MIB).await;
    gha.v1_commit_ok(id2, index2.bytes.len()).await;

    // The newest generation wins a prefix lookup and a restore-key lookup.
    for keys in [vec![prefix.as_str()], vec![INDEX], vec![INDEX, INDEX]] {
        let hit = gha.v1_hit(&keys).await;
        assert_eq!(hit["cacheKey"], index2.key, "keys {keys:?}: {hit:#}");
    }
    // An exact key still finds its own generation.
    let hit = gha.v1_hit(&[&index1.key]).await;
    assert_eq!(hit["cacheKey"], index1.key, "{hit:#}");

    // Import: the index, then every layer, downloaded without Authorization.
    let hit = gha.v1_hit(&[INDEX]).await;
    assert_eq!(hit["cacheVersion"], version(), "{hit:#}");
    assert_eq!(hit["scope"], SCOPE, "{hit:#}");
    assert!(hit["creationTime"].is_string(), "{hit:#}");
    let location = hit["archiveLocation"].as_str().unwrap();
    gha.check_download(location, &index2.bytes, true).await;
    for layer in &layers {
        let hit = gha.v1_hit(&[&layer.key]).await;
        assert_eq!(hit["cacheKey"], layer.key, "{hit:#}");
        let location = hit["archiveLocation"].as_str().unwrap();
        gha.check_download(location, &layer.bytes, true).await;
    }

    // The diagnostics listing knows the entries.
    let list = gha.v1_list(&layers[0].key).await;
    assert_eq!(list["totalCount"], 1, "{list:#}");
    assert_eq!(list["artifactCaches"][0]["cacheKey"], layers[0].key);
    assert_eq!(list["artifactCaches"][0]["cacheVersion"], version());
}

#[tokio::test]
async fn buildkit_v2_export_then_import() {
    let gha = Gha::start();
    let layers = layers(300);
    let [index1, index2] = indexes(400);

    // Export: for each layer, GetCacheEntryDownloadURL (miss), CreateCacheEntry, upload
    // (Put Blob below 1 MiB, 1 MiB Put Blocks in parallel and out of order plus Put Block
    // List otherwise), FinalizeCacheEntryUpload with `size_bytes` as a number (Go client).
    let mut ids = Vec::new();
    for layer in &layers {
        gha.v2_miss(&layer.key, &[&layer.key]).await;
        let url = gha.v2_create(&layer.key).await;
        gha.v2_upload_go(&url, &layer.bytes).await;
        let (status, body) = gha.v2_finalize(&layer.key, json!(layer.bytes.len())).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["ok"], true, "{body}");
        let id = body["entry_id"].as_str().unwrap_or_else(|| {
            panic!("entry_id is not a JSON string (int64 is emitted as a string): {body}")
        });
        assert!(id.parse::<u64>().is_ok(), "{body}");
        ids.push(id.to_owned());
    }
    let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "entry ids repeat: {ids:?}");

    // The index lock.
    let prefix = format!("{INDEX}#");
    gha.v2_miss(&prefix, &[&prefix]).await;
    let url = gha.v2_create(&index1.key).await;
    gha.v2_upload_go(&url, &index1.bytes).await;
    gha.v2_finalize_ok(&index1.key, index1.bytes.len()).await;
    let (_, matched) = gha.v2_hit(&prefix, &[&prefix]).await;
    assert_eq!(matched, index1.key);

    let (status, body) = gha
        .twirp(
            "CreateCacheEntry",
            json!({"key": index1.key, "version": version()}),
        )
        .await;
    assert_eq!(status, 409, "second create of {}: {body}", index1.key);
    assert_eq!(body["code"], "already_exists", "{body}");
    assert!(body["msg"].is_string(), "{body}");

    let url = gha.v2_create(&index2.key).await;
    gha.v2_upload_go(&url, &index2.bytes).await;
    gha.v2_finalize_ok(&index2.key, index2.bytes.len()).await;

    for (key, restore) in [
        (prefix.as_str(), vec![prefix.as_str()]),
        (INDEX, vec![INDEX]),
        (INDEX, vec![]),
        ("index-buildkit-1-00000000", vec![INDEX]),
    ] {
        let (_, matched) = gha.v2_hit(key, &restore).await;
        assert_eq!(matched, index2.key, "key {key} restore {restore:?}");
    }
    let (_, matched) = gha.v2_hit(&index1.key, &[&index1.key]).await;
    assert_eq!(matched, index1.key);

    // LookupCacheEntry agrees, with int64 fields as strings.
    let (status, found) = gha
        .twirp(
            "LookupCacheEntry",
            json!({"key": INDEX, "restore_keys": [INDEX], "version": version()}),
        )
        .await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["exists"], true, "{found}");
    assert_eq!(found["entry"]["key"], index2.key, "{found}");
    assert_eq!(
        found["entry"]["size_bytes"],
        index2.bytes.len().to_string(),
        "{found}"
    );

    // Import: the index, then every layer.
    let (url, _) = gha.v2_hit(INDEX, &[INDEX]).await;
    gha.check_download(&go_url(&url, &[]), &index2.bytes, true)
        .await;
    for layer in &layers {
        let (url, matched) = gha.v2_hit(&layer.key, &[&layer.key]).await;
        assert_eq!(matched, layer.key);
        gha.check_download(&go_url(&url, &[]), &layer.bytes, true)
            .await;
        // The URL exactly as handed out works too (the JS SDK does not re-encode it).
        gha.check_download(&url, &layer.bytes, true).await;
    }
}

#[tokio::test]
async fn same_content_uploaded_in_the_same_pieces_is_stored_once() {
    let gha = Gha::start();
    let bytes = data(500, 3 * MIB + 77);
    let before = gha.usage().await;

    // v1 in 1 MiB chunks.
    let id = gha.v1_reserve_ok("dedup-first", bytes.len()).await;
    gha.v1_upload(id, &bytes, MIB).await;
    gha.v1_commit_ok(id, bytes.len()).await;
    let once = gha.usage().await;
    assert!(once.blobs > before.blobs, "{before:?} -> {once:?}");
    assert!(
        once.blob_bytes >= before.blob_bytes + bytes.len() as u64,
        "{before:?} -> {once:?}"
    );

    // The same bytes under other keys, in the same 1 MiB pieces: v1 again, and v2 as
    // BuildKit uploads it (1 MiB blocks).
    let id = gha.v1_reserve_ok("dedup-second", bytes.len()).await;
    gha.v1_upload(id, &bytes, MIB).await;
    gha.v1_commit_ok(id, bytes.len()).await;
    let url = gha.v2_create("dedup-third").await;
    gha.v2_upload_go(&url, &bytes).await;
    gha.v2_finalize_ok("dedup-third", bytes.len()).await;
    let after = gha.usage().await;
    assert_eq!(
        (after.blobs, after.blob_bytes),
        (once.blobs, once.blob_bytes),
        "the same content stored again: {once:?} -> {after:?}"
    );
    for key in ["dedup-first", "dedup-second", "dedup-third"] {
        gha.v1_restores(&Entry::new(key.into(), bytes.clone()))
            .await;
        gha.v2_restores(&Entry::new(key.into(), bytes.clone()))
            .await;
    }

    // Whole-entry uploads of the same bytes (v2 Put Blob; v1 in one chunk) also share.
    let small = data(501, 200_000);
    let url = gha.v2_create("dedup-blob-1").await;
    gha.v2_put_blob(&url, &small).await;
    gha.v2_finalize_ok("dedup-blob-1", small.len()).await;
    let once = gha.usage().await;
    let url = gha.v2_create("dedup-blob-2").await;
    gha.v2_put_blob(&url, &small).await;
    gha.v2_finalize_ok("dedup-blob-2", small.len()).await;
    let id = gha.v1_reserve_ok("dedup-blob-3", small.len()).await;
    gha.v1_upload(id, &small, small.len()).await;
    gha.v1_commit_ok(id, small.len()).await;
    let after = gha.usage().await;
    assert_eq!(
        (after.blobs, after.blob_bytes),
        (once.blobs, once.blob_bytes),
        "the same content stored again: {once:?} -> {after:?}"
    );
}

#[tokio::test]
async fn v1_bad_content_range_is_refused_and_changes_nothing() {
    let gha = Gha::start();
    let base = baseline(&gha).await;
    let entry = Entry::new("bad-range".into(), data(1, 1000));
    let id = gha.v1_reserve_ok(&entry.key, 1000).await.to_string();
    let bytes = &entry.bytes;

    let cases: Vec<(&str, Option<&str>, reqwest::Body)> = vec![
        ("no Content-Range", None, chunked(&bytes[..100])),
        ("empty", Some(""), chunked(&bytes[..100])),
        ("wrong unit", Some("items 0-99/*"), chunked(&bytes[..100])),
        ("not numbers", Some("bytes a-z/*"), chunked(&bytes[..100])),
        ("no end", Some("bytes 0-/*"), chunked(&bytes[..100])),
        (
            "negative start",
            Some("bytes -1-98/*"),
            chunked(&bytes[..100]),
        ),
        (
            "end before start",
            Some("bytes 99-0/*"),
            chunked(&bytes[..100]),
        ),
        (
            "end before start, empty body",
            Some("bytes 10-5/*"),
            chunked(&[]),
        ),
        (
            "short body, chunked",
            Some("bytes 0-99/*"),
            chunked(&bytes[..50]),
        ),
        (
            "long body, chunked",
            Some("bytes 0-99/*"),
            chunked(&bytes[..150]),
        ),
        (
            "short body, Content-Length",
            Some("bytes 0-99/*"),
            bytes[..50].to_vec().into(),
        ),
        (
            "long body, Content-Length",
            Some("bytes 0-99/*"),
            bytes[..150].to_vec().into(),
        ),
        (
            "start past u64",
            Some("bytes 18446744073709551616-18446744073709551716/*"),
            chunked(&bytes[..100]),
        ),
        (
            "end at u64::MAX",
            Some("bytes 18446744073709551515-18446744073709551615/*"),
            chunked(&bytes[..100]),
        ),
        (
            "all of u64, empty body",
            Some("bytes 0-18446744073709551615/*"),
            Vec::new().into(),
        ),
    ];
    for (what, range, body) in cases {
        let response = gha.v1_patch_with(&id, range, body).await;
        let (status, body) = v1_error(response, what).await;
        assert_eq!(status, 400, "PATCH with {what} ({range:?}): {body}");
    }
    let (status, body) = v1_error(gha.v1_commit(&id, 1000).await, "commit").await;
    assert_eq!(status, 400, "commit after only refused chunks: {body}");
    gha.invisible(&entry.key).await;

    // The reservation still takes a correct upload: nothing of the refused chunks remains.
    gha.v1_upload(id.parse().unwrap(), bytes, 300).await;
    gha.v1_commit_ok(id.parse().unwrap(), bytes.len()).await;
    gha.v1_restores(&entry).await;
    check_baseline(&gha, &base).await;
}

#[tokio::test]
async fn v1_commit_of_the_wrong_size_is_refused_until_the_missing_chunk_arrives() {
    let gha = Gha::start();
    let base = baseline(&gha).await;
    let entry = Entry::new("gap".into(), data(2, 3000));
    let id = gha.v1_reserve_ok(&entry.key, 3000).await;
    for start in [2000, 0] {
        let response = gha
            .v1_patch(id, start, &entry.bytes[start..start + 1000])
            .await;
        assert_eq!(response.status(), 204);
    }
    for size in [3000, 2000, 1000, 3001, 0] {
        let (status, body) = v1_error(
            gha.v1_commit(&id.to_string(), size).await,
            &format!("commit {size}"),
        )
        .await;
        assert_eq!(
            status, 400,
            "commit size {size} with [0,1000)+[2000,3000) uploaded: {body}"
        );
        gha.invisible(&entry.key).await;
    }
    let response = gha.v1_patch(id, 1000, &entry.bytes[1000..2000]).await;
    assert_eq!(response.status(), 204);
    gha.v1_commit_ok(id, 3000).await;
    gha.v1_restores(&entry).await;
    gha.v2_restores(&entry).await;
    check_baseline(&gha, &base).await;
}

#[tokio::test]
async fn v1_unknown_cache_ids_are_not_found() {
    let gha = Gha::start();
    let base = baseline(&gha).await;
    let response = gha
        .v1_patch_with("999999", Some("bytes 0-9/*"), chunked(&[7; 10]))
        .await;
    let (status, body) = v1_error(response, "PATCH unknown id").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = v1_error(gha.v1_commit("999999", 10).await, "commit unknown id").await;
    assert_4xx(status, &format!("commit of an unknown id: {body}"));
    for id in ["abc", "-1", "18446744073709551616", "1.5"] {
        let response = gha
            .v1_patch_with(id, Some("bytes 0-9/*"), chunked(&[7; 10]))
            .await;
        assert_4xx(response.status(), &format!("PATCH caches/{id}"));
        let response = gha.v1_commit(id, 10).await;
        assert_4xx(response.status(), &format!("commit caches/{id}"));
    }
    check_baseline(&gha, &base).await;
}

#[tokio::test]
async fn creating_a_key_still_being_uploaded_is_refused() {
    let gha = Gha::start();
    // v1: reserved, partly uploaded, committed: a second reserve is refused each time.
    let entry = Entry::new("v1-busy".into(), data(3, 5000));
    let id = gha.v1_reserve_ok(&entry.key, 5000).await;
    let refused = |stage: &'static str| {
        let gha = &gha;
        let key = entry.key.clone();
        async move {
            let (status, body) = v1_error(gha.v1_reserve(&key, 5000).await, stage).await;
            assert_eq!(status, 409, "reserve {key} while {stage}: {body}");
            assert!(body.to_string().contains("AlreadyExists"), "{body}");
        }
    };
    refused("reserved").await;
    gha.invisible(&entry.key).await;
    assert_eq!(
        gha.v1_patch(id, 0, &entry.bytes[..2500]).await.status(),
        204
    );
    refused("half uploaded").await;
    gha.invisible(&entry.key).await;
    assert_eq!(
        gha.v1_patch(id, 2500, &entry.bytes[2500..]).await.status(),
        204
    );
    refused("fully uploaded").await;
    gha.v1_commit_ok(id, 5000).await;
    refused("committed").await;
    gha.v1_restores(&entry).await;

    // v2: created, uploaded, finalized.
    let entry = Entry::new("v2-busy".into(), data(4, 5000));
    let url = gha.v2_create(&entry.key).await;
    let refused = |stage: &'static str| {
        let gha = &gha;
        let key = entry.key.clone();
        async move {
            let (status, body) = gha
                .twirp(
                    "CreateCacheEntry",
                    json!({"key": key, "version": version()}),
                )
                .await;
            assert_eq!(status, 409, "create {key} while {stage}: {body}");
            assert_eq!(body["code"], "already_exists", "{body}");
        }
    };
    refused("created").await;
    gha.invisible(&entry.key).await;
    gha.v2_put_blob(&url, &entry.bytes).await;
    refused("uploaded").await;
    gha.invisible(&entry.key).await;
    gha.v2_finalize_ok(&entry.key, 5000).await;
    refused("finalized").await;
    gha.v2_restores(&entry).await;
}

/// BuildKit's index lock under a race: of many writers creating the same `#N` at once,
/// exactly one wins, in v1 and in v2.
#[tokio::test]
async fn concurrent_creates_of_one_key_have_one_winner() {
    let gha = Gha::start();
    for round in 1..=3 {
        let key = format!("{INDEX}#{round}");
        let v1: Vec<u16> = futures::future::join_all(
            (0..8).map(|_| async { gha.v1_reserve(&key, 100).await.status().as_u16() }),
        )
        .await;
        assert_eq!(
            v1.iter().filter(|&&s| s == 201).count(),
            1,
            "v1 {key}: {v1:?}"
        );
        assert!(v1.iter().all(|&s| s == 201 || s == 409), "v1 {key}: {v1:?}");

        let key = format!("index-buildkit-1-0000000{round}#1");
        let v2: Vec<(u16, Value)> = futures::future::join_all((0..8).map(|_| async {
            let (status, body) = gha
                .twirp(
                    "CreateCacheEntry",
                    json!({"key": key, "version": version()}),
                )
                .await;
            (status.as_u16(), body)
        }))
        .await;
        let winners = v2
            .iter()
            .filter(|(s, b)| *s == 200 && b["ok"] == true)
            .count();
        assert_eq!(winners, 1, "v2 {key}: {v2:?}");
        assert!(
            v2.iter()
                .all(|(s, b)| *s == 200 || (*s == 409 && b["code"] == "already_exists")),
            "v2 {key}: {v2:?}"
        );
    }
}

#[tokio::test]
async fn v1_entries_over_the_size_limit_are_refused() {
    let gha = Gha::start_with_env(&[("LAYERCACHE_ACTIONS__MAX_ENTRY_SIZE", "1MiB")]);
    let base = baseline_small(&gha).await;

    let (status, body) = v1_error(gha.v1_reserve("too-big", MIB + 1).await, "reserve").await;
    assert_eq!(
        status, 400,
        "reserve of 1 MiB + 1 with a 1 MiB limit: {body}"
    );
    gha.invisible("too-big").await;

    let entry = Entry::new("grows".into(), data(5, 1000));
    let id = gha.v1_reserve_ok(&entry.key, 1000).await;
    let over = data(6, MIB + 1);
    for (what, range, body) in [
        (
            "a chunk past the limit",
            format!("bytes {MIB}-{}/*", MIB + 99),
            &over[..100],
        ),
        (
            "a chunk ending past the limit",
            format!("bytes 0-{MIB}/*"),
            &over[..],
        ),
    ] {
        let response = gha
            .v1_patch_with(&id.to_string(), Some(&range), chunked(body))
            .await;
        let (status, body) = v1_error(response, what).await;
        assert_eq!(status, 400, "PATCH {what} ({range}): {body}");
    }
    let (status, _) = v1_error(gha.v1_commit(&id.to_string(), MIB + 1).await, "commit").await;
    assert_4xx(status, "commit of an entry over the limit");
    gha.invisible(&entry.key).await;
    // The same reservation still takes a small upload.
    gha.v1_upload(id, &entry.bytes, 1000).await;
    gha.v1_commit_ok(id, 1000).await;
    gha.v1_restores(&entry).await;

    // Exactly the limit fits.
    let fits = Entry::new("fits".into(), data(7, MIB));
    gha.v1_save(&fits).await;
    gha.v1_restores(&fits).await;
    check_baseline(&gha, &base).await;
}

#[tokio::test]
async fn v2_uploads_over_the_size_limit_are_refused() {
    let gha = Gha::start_with_env(&[("LAYERCACHE_ACTIONS__MAX_ENTRY_SIZE", "1MiB")]);
    let base = baseline_small(&gha).await;
    let over = data(8, MIB + 1);

    let url = gha.v2_create("blob-too-big").await;
    let response = gha.put_blob(&url, &over).await;
    let (status, code) = azure_error(response, "Put Blob over the limit").await;
    assert_eq!(
        (status.as_u16(), code.as_str()),
        (413, "RequestBodyTooLarge")
    );
    let (status, body) = gha.v2_finalize("blob-too-big", json!(over.len())).await;
    assert_4xx(
        status,
        &format!("finalize after a refused Put Blob: {body}"),
    );
    gha.invisible("blob-too-big").await;

    let url = gha.v2_create("block-too-big").await;
    let target = go_url(&url, &[("comp", "block"), ("blockid", &go_block_id(0))]);
    let response = gha.put_block(&target, &over).await;
    let (status, code) = azure_error(response, "Put Block over the limit").await;
    assert_eq!(status, 413, "Put Block of 1 MiB + 1: {code}");
    let (status, body) = gha.v2_finalize("block-too-big", json!(over.len())).await;
    assert_4xx(
        status,
        &format!("finalize after a refused Put Block: {body}"),
    );
    gha.invisible("block-too-big").await;

    // Exactly the limit fits, in one Put Blob and in blocks.
    let fits = Entry::new("fits-blob".into(), data(9, MIB));
    let url = gha.v2_create(&fits.key).await;
    gha.v2_put_blob(&url, &fits.bytes).await;
    gha.v2_finalize_ok(&fits.key, MIB).await;
    gha.v2_restores(&fits).await;
    let fits = Entry::new("fits-blocks".into(), data(10, MIB));
    gha.v2_save(&fits).await;
    gha.v2_restores(&fits).await;
    check_baseline(&gha, &base).await;
}

#[tokio::test]
async fn v2_blocks_adding_up_past_the_size_limit_are_refused() {
    let gha = Gha::start_with_env(&[("LAYERCACHE_ACTIONS__MAX_ENTRY_SIZE", "1MiB")]);
    let base = baseline_small(&gha).await;
    let over = data(21, MIB + 1);
    // Two blocks that each fit but together do not: the second block or the list is
    // refused with 413.
    let url = gha.v2_create("blocks-too-big").await;
    let ids = [go_block_id(0), go_block_id(1)];
    let half = 600 * 1024;
    let first = gha
        .put_block(
            &go_url(&url, &[("comp", "block"), ("blockid", &ids[0])]),
            &over[..half],
        )
        .await;
    assert_eq!(first.status(), 201);
    let second = gha
        .put_block(
            &go_url(&url, &[("comp", "block"), ("blockid", &ids[1])]),
            &over[half..],
        )
        .await;
    if second.status() == 201 {
        let response = gha.put_block_list(&url, &ids).await;
        let (status, code) = azure_error(response, "Put Block List over the limit").await;
        assert_eq!(
            status, 413,
            "Put Block List of 1 MiB + 1 in two blocks: {code}"
        );
    } else {
        let (status, code) = azure_error(second, "second Put Block over the limit").await;
        assert_eq!(
            status, 413,
            "second block taking the entry past 1 MiB: {code}"
        );
    }
    let (status, body) = gha.v2_finalize("blocks-too-big", json!(over.len())).await;
    assert_4xx(status, &format!("finalize after a refused upload: {body}"));
    gha.invisible("blocks-too-big").await;

    check_baseline(&gha, &base).await;
}

/// Entries saved before a test's bad input: one through v1 (several chunks), one through
/// v2 (several blocks); [`check_baseline`] proves they were not touched.
async fn baseline(gha: &Gha) -> [Entry; 2] {
    let v1 = Entry::new("baseline-v1".into(), data(900, 3 * MIB + 17));
    gha.v1_save(&v1).await;
    let v2 = Entry::new("baseline-v2".into(), data(901, 2 * MIB + 5));
    gha.v2_save(&v2).await;
    [v1, v2]
}

/// The baseline entries still restore byte-identical, through both protocols.
async fn check_baseline(gha: &Gha, base: &[Entry; 2]) {
    for entry in base {
        gha.v1_restores(entry).await;
        gha.v2_restores(entry).await;
    }
}

/// A v1 error: a 4xx (never a 5xx) with a JSON body carrying a `message`.
async fn v1_error(response: reqwest::Response, what: &str) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.unwrap();
    assert!(
        status.is_client_error(),
        "{what}: expected 4xx, got {status}: {text}"
    );
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{what}: the error body is not JSON ({e}): {text}"));
    assert!(body["message"].is_string(), "{what}: no message: {body}");
    (status, body)
}

/// A twirp error: a 4xx with `{"code", "msg"}`, the code one of `codes`.
fn assert_twirp_error(status: StatusCode, body: &Value, codes: &[&str], what: &str) {
    assert_4xx(status, &format!("{what}: {body}"));
    let code = body["code"].as_str().unwrap_or_default();
    assert!(
        codes.contains(&code),
        "{what}: code {code:?} not in {codes:?}: {body}"
    );
    assert!(body["msg"].is_string(), "{what}: no msg: {body}");
}

/// `url` with its `sig` parameter replaced by `sig` (or removed).
fn with_sig(url: &str, sig: Option<&str>) -> String {
    let mut parsed = Url::parse(url).unwrap();
    let kept: Vec<(String, String)> = parsed
        .query_pairs()
        .filter(|(k, _)| k != "sig")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    {
        let mut query = parsed.query_pairs_mut();
        query.clear();
        for (k, v) in &kept {
            query.append_pair(k, v);
        }
        if let Some(sig) = sig {
            query.append_pair("sig", sig);
        }
    }
    parsed.to_string()
}

/// `url` with one character of its signature changed.
fn forged(url: &str) -> String {
    let parsed = Url::parse(url).unwrap();
    let sig = parsed
        .query_pairs()
        .find(|(k, _)| k == "sig")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    let (head, last) = sig.split_at(sig.len() - 2);
    let flipped = if last.starts_with('A') { "B" } else { "A" };
    with_sig(url, Some(&format!("{head}{flipped}{}", &last[1..])))
}

/// [`baseline`] small enough for a 1 MiB entry limit.
async fn baseline_small(gha: &Gha) -> [Entry; 2] {
    let v1 = Entry::new("baseline-v1".into(), data(910, 300_000));
    gha.v1_save(&v1).await;
    let v2 = Entry::new("baseline-v2".into(), data(911, 900_000));
    gha.v2_save(&v2).await;
    [v1, v2]
}

#[tokio::test]
async fn v2_block_list_naming_an_unknown_block_is_refused() {
    let gha = Gha::start();
    let base = baseline(&gha).await;
    let entry = Entry::new("blocks".into(), data(11, MIB + 500));
    let url = gha.v2_create(&entry.key).await;
    let ids = [go_block_id(0), go_block_id(1), go_block_id(2)];
    for (id, block) in ids.iter().zip(entry.bytes.chunks(MIB)) {
        let response = gha
            .put_block(&go_url(&url, &[("comp", "block"), ("blockid", id)]), block)
            .await;
        assert_eq!(response.status(), 201);
    }
    // ids[2] was never staged.
    let response = gha.put_block_list(&url, &ids).await;
    let (status, code) = azure_error(response, "Put Block List with an unknown block").await;
    assert_eq!((status.as_u16(), code.as_str()), (400, "InvalidBlockList"));
    let unknown = [ids[0].clone(), base64(b"never staged")];
    let response = gha.put_block_list(&url, &unknown).await;
    let (status, code) = azure_error(response, "Put Block List with a foreign id").await;
    assert_eq!((status.as_u16(), code.as_str()), (400, "InvalidBlockList"));

    // A block without an id, or with one that is not base64.
    for extra in [
        vec![("comp", "block")],
        vec![("comp", "block"), ("blockid", "")],
        vec![("comp", "block"), ("blockid", "!!not base64!!")],
    ] {
        let response = gha.put_block(&go_url(&url, &extra), b"abc").await;
        let (status, _) = azure_error(response, &format!("{extra:?}")).await;
        assert_4xx(status, &format!("Put Block {extra:?}"));
    }

    let (status, body) = gha.v2_finalize(&entry.key, json!(entry.bytes.len())).await;
    assert_4xx(
        status,
        &format!("finalize after a refused block list: {body}"),
    );
    gha.invisible(&entry.key).await;
    check_baseline(&gha, &base).await;
}

#[tokio::test]
async fn a_host_header_that_is_not_a_host_never_reaches_a_signed_url() {
    let gha = Gha::start();
    for (host, accepted) in [
        ("evil.example:1/x?", false),
        ("user@cache:8080", false),
        ("cache.ci:8080", true),
    ] {
        let response = gha
            .http
            .post(gha.at(&format!("{TWIRP}CreateCacheEntry")))
            .header("host", host)
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {}", gha.token))
            .body(
                json!({"key": format!("host-{accepted}-{}", host.len()), "version": version()})
                    .to_string(),
            )
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        if accepted {
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("http://cache.ci:8080/"), "{body}");
        } else {
            assert_4xx(status, &format!("Host {host:?}: {body}"));
            assert!(!body.contains("evil.example:1/x"), "{body}");
        }
    }
}

#[tokio::test]
async fn v2_malformed_block_lists_are_refused() {
    let gha = Gha::start();
    let base = baseline(&gha).await;
    let entry = Entry::new("listless".into(), data(20, MIB + 500));
    let url = gha.v2_create(&entry.key).await;
    let ids = [go_block_id(0), go_block_id(1)];
    for (id, block) in ids.iter().zip(entry.bytes.chunks(MIB)) {
        let response = gha
            .put_block(&go_url(&url, &[("comp", "block"), ("blockid", id)]), block)
            .await;
        assert_eq!(response.status(), 201);
    }
    let truncated = format!("<BlockList><Latest>{}</Latest>", ids[0]);
    for body in [
        "not xml",
        "<Other/>",
        "<BlockList><Latest>",
        truncated.as_str(),
        r#"<?xml version="1.0"?><!DOCTYPE BlockList [<!ENTITY id "x">]><BlockList><Latest>&id;</Latest></BlockList>"#,
        "<BlockList><Latest>&nope;</Latest></BlockList>",
        "<BlockList><Latest><b>x</b></Latest></BlockList>",
        "<BlockList><Latest/></BlockList>",
        "<BlockList><Latest> <![CDATA[ ]]> </Latest></BlockList>",
        "<BlockList><Block>x</Block></BlockList>",
        "<BlockList>loose text</BlockList>",
        "<BlockList/><BlockList/>",
        "<Latest>x</Latest>",
    ] {
        let response = gha.try_put_block_list_xml(&url, body).await.unwrap();
        let (status, code) = azure_error(response, body).await;
        assert_4xx(status, &format!("Put Block List {body:?} ({code})"));
    }
    // Nothing was assembled: no size finalizes the entry.
    for size in [0, MIB, entry.bytes.len()] {
        let (status, body) = gha.v2_finalize(&entry.key, json!(size)).await;
        assert_4xx(
            status,
            &format!("finalize {size} after malformed block lists: {body}"),
        );
        gha.invisible(&entry.key).await;
    }
    // A proper list still assembles the staged blocks.
    let response = gha.put_block_list(&url, &ids).await;
    assert_eq!(response.status(), 201);
    gha.v2_finalize_ok(&entry.key, entry.bytes.len()).await;
    gha.v2_restores(&entry).await;
    check_baseline(&gha, &base).await;
}

/// A Put Block List is read as the XML it is, as Azure reads it: an id in a CDATA
/// section, or spelled with references, names the same block as the plain id.
#[tokio::test]
async fn v2_block_list_ids_are_read_however_the_xml_spells_them() {
    let gha = Gha::start();
    let entry = Entry::new("spelled".into(), data(22, 2 * MIB + 500));
    let url = gha.v2_create(&entry.key).await;
    let ids = [go_block_id(0), go_block_id(1), go_block_id(2)];
    for (id, block) in ids.iter().zip(entry.bytes.chunks(MIB)) {
        let response = gha
            .put_block(&go_url(&url, &[("comp", "block"), ("blockid", id)]), block)
            .await;
        assert_eq!(response.status(), 201);
    }
    let (first, rest) = ids[2].split_at(1);
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<BlockList>\n  \
         <Latest><![CDATA[{}]]></Latest>\n  <Uncommitted> {} </Uncommitted>\n  \
         <Committed>&#x{:x};{rest}</Committed>\n</BlockList>\n",
        ids[0],
        ids[1],
        u32::from(first.chars().next().unwrap()),
    );
    let response = gha.try_put_block_list_xml(&url, xml).await.unwrap();
    assert_request_id(&response, "Put Block List");
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    gha.v2_finalize_ok(&entry.key, entry.bytes.len()).await;
    gha.v2_restores(&entry).await;
}

/// A block list naming no block commits an empty entry, as a zero-byte Put Blob does
/// (and as Azure commits an empty blob); finalized with size 0, it restores empty.
#[tokio::test]
async fn v2_an_empty_block_list_commits_an_empty_entry() {
    let gha = Gha::start();
    for (key, xml) in [
        (
            "empty-js",
            "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?><BlockList/>",
        ),
        (
            "empty-go",
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<BlockList></BlockList>",
        ),
    ] {
        let entry = Entry::new(key.into(), Vec::new());
        let url = gha.v2_create(&entry.key).await;
        // A block staged and left out of the list is not part of the entry.
        let id = go_block_id(0);
        let staged = gha
            .put_block(
                &go_url(&url, &[("comp", "block"), ("blockid", &id)]),
                b"left out",
            )
            .await;
        assert_eq!(staged.status(), 201);
        let response = gha.try_put_block_list_xml(&url, xml).await.unwrap();
        assert_request_id(&response, "Put Block List");
        assert_eq!(
            response.status(),
            201,
            "{key}: {}",
            response.text().await.unwrap()
        );
        gha.v2_finalize_ok(&entry.key, 0).await;
        gha.v2_restores(&entry).await;
    }
    // The same as a zero-byte Put Blob.
    let entry = Entry::new("empty-put-blob".into(), Vec::new());
    let url = gha.v2_create(&entry.key).await;
    gha.v2_put_blob(&url, &[]).await;
    gha.v2_finalize_ok(&entry.key, 0).await;
    gha.v2_restores(&entry).await;
}

/// The Azure SDK itself (`@azure/storage-blob`, which `@actions/cache` uploads with)
/// uploads a stream as staged blocks and a block list, an empty stream as an empty list:
/// both entries restore as sent.
#[tokio::test]
async fn the_azure_sdk_uploads_streams_empty_or_not() {
    if !common::cache_client::client_ready() {
        return;
    }
    let gha = Gha::start();
    for entry in [
        Entry::new("sdk-stream".into(), data(23, 200_000)),
        Entry::new("sdk-empty".into(), Vec::new()),
    ] {
        let url = gha.v2_create(&entry.key).await;
        let script = std::path::Path::new(common::cache_client::CLIENT_DIR).join("azure-blob.mjs");
        let out = common::output_with_input(
            std::process::Command::new("node")
                .arg(script)
                .args(["upload-stream", &url]),
            &entry.bytes,
        );
        assert!(
            out.status.success(),
            "{}: {}{}",
            entry.key,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        gha.v2_finalize_ok(&entry.key, entry.bytes.len()).await;
        gha.v2_restores(&entry).await;
    }
}

#[tokio::test]
async fn v2_finalize_of_the_wrong_size_is_refused() {
    let gha = Gha::start();
    let base = baseline(&gha).await;
    let entry = Entry::new("sized".into(), data(12, 1000));
    let url = gha.v2_create(&entry.key).await;
    gha.v2_put_blob(&url, &entry.bytes).await;
    for size in [json!(999), json!("1001"), json!(0)] {
        let (status, body) = gha.v2_finalize(&entry.key, size.clone()).await;
        assert_twirp_error(
            status,
            &body,
            &["invalid_argument", "failed_precondition"],
            &format!("finalize size {size} of 1000 uploaded"),
        );
        assert!(
            matches!(
                (status.as_u16(), body["code"].as_str()),
                (400, Some("invalid_argument")) | (412, Some("failed_precondition"))
            ),
            "twirp maps invalid_argument to 400 and failed_precondition to 412: {status} {body}"
        );
        gha.invisible(&entry.key).await;
    }

    // Created but nothing uploaded.
    gha.v2_create("nothing").await;
    let (status, body) = gha.v2_finalize("nothing", json!("10")).await;
    assert_twirp_error(
        status,
        &body,
        &["invalid_argument", "failed_precondition"],
        "finalize with nothing uploaded",
    );
    gha.invisible("nothing").await;

    // Never created.
    let (status, body) = gha.v2_finalize("never-created", json!("10")).await;
    assert_4xx(status, &format!("finalize of a key never created: {body}"));
    assert!(body["code"].is_string(), "{body}");
    gha.invisible("never-created").await;
    check_baseline(&gha, &base).await;
}

/// A client whose finish answer was lost (a proxy timing out after the commit) retries
/// it: the same size succeeds again with the same entry, another size is still refused.
#[tokio::test]
async fn a_finish_retried_after_its_answer_was_lost_succeeds_again() {
    let gha = Gha::start();
    let entry = Entry::new("retried-v2".into(), data(13, 1000));
    let url = gha.v2_create(&entry.key).await;
    gha.v2_put_blob(&url, &entry.bytes).await;
    let first = gha.v2_finalize_ok(&entry.key, entry.bytes.len()).await;
    let again = gha.v2_finalize_ok(&entry.key, entry.bytes.len()).await;
    assert_eq!(first, again);
    let (status, body) = gha.v2_finalize(&entry.key, json!(999)).await;
    assert_eq!(status, 409, "{body}");
    gha.v2_restores(&entry).await;

    let entry = Entry::new("retried-v1".into(), data(14, 1000));
    let id = gha.v1_reserve_ok(&entry.key, 1000).await;
    gha.v1_upload(id, &entry.bytes, 300).await;
    gha.v1_commit_ok(id, entry.bytes.len()).await;
    gha.v1_commit_ok(id, entry.bytes.len()).await;
    let (status, body) = v1_error(gha.v1_commit(&id.to_string(), 999).await, "commit").await;
    assert_eq!(status, 409, "{body}");
    gha.v1_restores(&entry).await;
}

#[tokio::test]
async fn v2_unknown_and_forged_signed_urls_are_refused() {
    let gha = Gha::start();
    let base = baseline(&gha).await;

    // A correctly signed URL of an entry that no longer exists.
    let doomed = Entry::new("doomed".into(), data(13, 2000));
    gha.v2_save(&doomed).await;
    let (gone_url, _) = gha.v2_hit(&doomed.key, &[]).await;
    let (status, body) = gha
        .twirp("DeleteCacheEntry", json!({"key": doomed.key}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ok"], true, "{body}");
    gha.invisible(&doomed.key).await;
    let response = gha.http.get(&gone_url).send().await.unwrap();
    let (status, code) = azure_error(response, "GET of a deleted entry").await;
    assert_eq!((status.as_u16(), code.as_str()), (404, "BlobNotFound"));
    let response = gha.http.head(&gone_url).send().await.unwrap();
    assert_request_id(&response, "HEAD of a deleted entry");
    assert_eq!(response.status(), 404);

    // The path names another entry id: the signature does not cover it.
    let (url, _) = gha.v2_hit(&base[1].key, &[]).await;
    let mut other = Url::parse(&url).unwrap();
    let segments: Vec<String> = other.path_segments().unwrap().map(str::to_owned).collect();
    let mut replaced = segments.clone();
    *replaced.last_mut().unwrap() = "987654321".into();
    other.set_path(&replaced.join("/"));
    let response = gha.http.get(other.as_str()).send().await.unwrap();
    let (status, code) = azure_error(response, "GET of an unknown entry id").await;
    assert!(
        matches!(
            (status.as_u16(), code.as_str()),
            (403, "AuthenticationFailed") | (404, "BlobNotFound")
        ),
        "GET {other}: {status} {code}"
    );

    // Forged, missing and empty signatures on a download URL and on an upload URL.
    let upload = gha.v2_create("forged-upload").await;
    for (what, target) in [
        ("forged", forged(&url)),
        ("no sig", with_sig(&url, None)),
        ("empty sig", with_sig(&url, Some(""))),
        ("garbage sig", with_sig(&url, Some("x"))),
    ] {
        let response = gha.http.get(&target).send().await.unwrap();
        let (status, code) = azure_error(response, &format!("GET, {what}")).await;
        assert_eq!(
            (status.as_u16(), code.as_str()),
            (403, "AuthenticationFailed"),
            "GET with {what}: {target}"
        );
        let response = gha
            .http
            .get(&target)
            .header("range", "bytes=0-9")
            .send()
            .await
            .unwrap();
        let (status, _) = azure_error(response, &format!("ranged GET, {what}")).await;
        assert_eq!(status, 403, "ranged GET with {what}");
        let response = gha.http.head(&target).send().await.unwrap();
        assert_request_id(&response, "HEAD");
        assert_eq!(response.status(), 403, "HEAD with {what}");
    }
    for (what, target) in [
        ("forged", forged(&upload)),
        ("no sig", with_sig(&upload, None)),
    ] {
        let response = gha.put_blob(&target, b"poison").await;
        let (status, code) = azure_error(response, &format!("Put Blob, {what}")).await;
        assert_eq!(
            (status.as_u16(), code.as_str()),
            (403, "AuthenticationFailed"),
            "Put Blob with {what}"
        );
        let block = go_url(&target, &[("comp", "block"), ("blockid", &go_block_id(0))]);
        let response = gha.put_block(&block, b"poison").await;
        let (status, _) = azure_error(response, &format!("Put Block, {what}")).await;
        assert_eq!(status, 403, "Put Block with {what}");
    }
    let (status, body) = gha.v2_finalize("forged-upload", json!("6")).await;
    assert_4xx(status, &format!("finalize after refused uploads: {body}"));
    gha.invisible("forged-upload").await;

    // No signed URL at all, and one under the signed-URL prefix naming nothing.
    for path in [
        "/layercache/actions/1",
        "/layercache/actions/",
        "/layercache/actions/x?sig=abc",
    ] {
        let response = gha.http.get(gha.at(path)).send().await.unwrap();
        assert_4xx(response.status(), &format!("GET {path}"));
    }
    check_baseline(&gha, &base).await;
}

#[tokio::test]
async fn v2_expired_signed_urls_are_refused() {
    let gha = Gha::start_with_env(&[("LAYERCACHE_ACTIONS__URL_TTL", "2s")]);
    let entry = Entry::new("short-lived".into(), data(14, 5000));
    gha.v2_save(&entry).await;
    let (download, _) = gha.v2_hit(&entry.key, &[]).await;
    gha.check_download(&download, &entry.bytes, true).await;
    let upload = gha.v2_create("late").await;
    tokio::time::sleep(Duration::from_millis(3500)).await;

    let response = gha.http.get(&download).send().await.unwrap();
    let (status, code) = azure_error(response, "GET after expiry").await;
    assert_eq!(
        (status.as_u16(), code.as_str()),
        (403, "AuthenticationFailed")
    );
    let response = gha
        .http
        .get(&download)
        .header("x-ms-range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    let (status, _) = azure_error(response, "ranged GET after expiry").await;
    assert_eq!(status, 403);
    let response = gha.http.head(&download).send().await.unwrap();
    assert_request_id(&response, "HEAD after expiry");
    assert_eq!(response.status(), 403);

    let response = gha.put_blob(&upload, b"too late").await;
    let (status, code) = azure_error(response, "Put Blob after expiry").await;
    assert_eq!(
        (status.as_u16(), code.as_str()),
        (403, "AuthenticationFailed")
    );
    let block = go_url(&upload, &[("comp", "block"), ("blockid", &go_block_id(0))]);
    let response = gha.put_block(&block, b"too late").await;
    let (status, _) = azure_error(response, "Put Block after expiry").await;
    assert_eq!(status, 403);
    let (status, body) = gha.v2_finalize("late", json!("8")).await;
    assert_4xx(status, &format!("finalize after an expired upload: {body}"));
    gha.invisible("late").await;

    // A fresh URL works.
    gha.v2_restores(&entry).await;
}

#[tokio::test]
async fn v2_upload_and_download_urls_are_not_interchangeable() {
    let gha = Gha::start();
    let base = baseline(&gha).await;
    let entry = Entry::new("in-progress".into(), data(15, 1000));
    let upload = gha.v2_create(&entry.key).await;
    gha.v2_put_blob(&upload, &entry.bytes).await;

    // An upload URL does not download, before or after finalize.
    let check_upload_url_refuses_reads = |stage: &'static str| {
        let gha = &gha;
        let upload = upload.clone();
        async move {
            let response = gha.http.get(&upload).send().await.unwrap();
            let (status, _) = azure_error(response, stage).await;
            assert_eq!(status, 403, "GET of an upload URL ({stage})");
            let response = gha.http.head(&upload).send().await.unwrap();
            assert_request_id(&response, stage);
            assert_eq!(response.status(), 403, "HEAD of an upload URL ({stage})");
        }
    };
    check_upload_url_refuses_reads("uploaded").await;

    // A download URL does not upload.
    let (download, _) = gha.v2_hit(&base[1].key, &[]).await;
    let response = gha.put_blob(&download, b"poison").await;
    let (status, _) = azure_error(response, "Put Blob to a download URL").await;
    assert_eq!(status, 403);
    let block = go_url(
        &download,
        &[("comp", "block"), ("blockid", &go_block_id(0))],
    );
    let response = gha.put_block(&block, b"poison").await;
    let (status, _) = azure_error(response, "Put Block to a download URL").await;
    assert_eq!(status, 403);
    let response = gha.put_block_list(&download, &[go_block_id(0)]).await;
    let (status, _) = azure_error(response, "Put Block List to a download URL").await;
    assert_eq!(status, 403);

    gha.v2_finalize_ok(&entry.key, entry.bytes.len()).await;
    check_upload_url_refuses_reads("finalized").await;
    gha.v2_restores(&entry).await;
    check_baseline(&gha, &base).await;
}

#[tokio::test]
async fn writes_after_commit_change_nothing() {
    let gha = Gha::start();
    // v1: PATCH and commit again after the commit.
    let entry = Entry::new("v1-done".into(), data(16, 4000));
    let id = gha.v1_reserve_ok(&entry.key, 4000).await;
    gha.v1_upload(id, &entry.bytes, 1000).await;
    gha.v1_commit_ok(id, 4000).await;
    let response = gha.v1_patch(id, 0, &[0u8; 1000]).await;
    let (status, body) = v1_error(response, "PATCH after commit").await;
    assert_4xx(status, &format!("PATCH after commit: {body}"));
    let response = gha.v1_patch(id, 4000, &[0u8; 1000]).await;
    let (status, body) = v1_error(response, "PATCH past the end after commit").await;
    assert_4xx(status, &format!("PATCH past the end after commit: {body}"));
    let response = gha.v1_commit(&id.to_string(), 5000).await;
    assert!(
        !response.status().is_server_error() && response.status() != 204,
        "second commit with another size: {}",
        response.status()
    );
    gha.v1_restores(&entry).await;

    // v2: the upload URL after finalize.
    let entry = Entry::new("v2-done".into(), data(17, MIB + 10));
    let upload = gha.v2_create(&entry.key).await;
    gha.v2_upload_go(&upload, &entry.bytes).await;
    gha.v2_finalize_ok(&entry.key, entry.bytes.len()).await;
    let response = gha.put_blob(&upload, b"poison").await;
    let (status, _) = azure_error(response, "Put Blob after finalize").await;
    assert_4xx(status, "Put Blob after finalize");
    let block = go_url(&upload, &[("comp", "block"), ("blockid", &go_block_id(9))]);
    let response = gha.put_block(&block, b"poison").await;
    let (status, _) = azure_error(response, "Put Block after finalize").await;
    assert_4xx(status, "Put Block after finalize");
    let response = gha.put_block_list(&upload, &[go_block_id(1)]).await;
    let (status, _) = azure_error(response, "Put Block List after finalize").await;
    assert_4xx(status, "Put Block List after finalize");
    let (status, body) = gha.v2_finalize(&entry.key, json!("6")).await;
    assert_4xx(
        status,
        &format!("second finalize with another size: {body}"),
    );
    gha.v2_restores(&entry).await;
}

#[tokio::test]
async fn v2_malformed_twirp_json_is_refused() {
    let gha = Gha::start();
    let base = baseline(&gha).await;
    let bearer = format!("Bearer {}", gha.token);
    let v = version();
    for method in [
        "CreateCacheEntry",
        "FinalizeCacheEntryUpload",
        "GetCacheEntryDownloadURL",
        "LookupCacheEntry",
        "ListCacheEntries",
        "DeleteCacheEntry",
    ] {
        for body in [
            "this is not json",
            "{\"key\":",
            "{\"key\":\"k\"",
            "\u{0}\u{1}",
            "[1,2]",
            "\"key\"",
        ] {
            let (status, reply) = gha.twirp_raw(method, body, Some(&bearer)).await;
            assert_eq!(status, 400, "{method} {body:?}: {reply}");
            assert_twirp_error(
                status,
                &reply,
                &["malformed", "invalid_argument"],
                &format!("{method} {body:?}"),
            );
        }
        let (status, reply) = gha.twirp_raw(method, "not json", Some(&bearer)).await;
        assert_eq!(reply["code"], "malformed", "{method}: {status} {reply}");
    }

    for (method, body) in [
        ("CreateCacheEntry", json!({"key": 5, "version": v})),
        ("CreateCacheEntry", json!({"key": "k", "version": 7})),
        ("CreateCacheEntry", json!({"key": ["k"], "version": v})),
        ("CreateCacheEntry", json!({"version": v})),
        ("CreateCacheEntry", json!({"key": "", "version": v})),
        (
            "FinalizeCacheEntryUpload",
            json!({"key": "k", "version": v, "size_bytes": "abc"}),
        ),
        (
            "FinalizeCacheEntryUpload",
            json!({"key": "k", "version": v, "size_bytes": true}),
        ),
        (
            "FinalizeCacheEntryUpload",
            json!({"key": "k", "version": v, "size_bytes": 1.5}),
        ),
        (
            "FinalizeCacheEntryUpload",
            json!({"key": "k", "version": v, "size_bytes": {}}),
        ),
        (
            "FinalizeCacheEntryUpload",
            json!({"key": "k", "version": v, "size_bytes": "99999999999999999999999"}),
        ),
        (
            "GetCacheEntryDownloadURL",
            json!({"key": "k", "restore_keys": "k", "version": v}),
        ),
        (
            "GetCacheEntryDownloadURL",
            json!({"key": "k", "restore_keys": [1], "version": v}),
        ),
        ("GetCacheEntryDownloadURL", json!({"key": 1, "version": v})),
        ("GetCacheEntryDownloadURL", json!({"version": v})),
        (
            "LookupCacheEntry",
            json!({"key": "k", "restore_keys": {"a": 1}, "version": v}),
        ),
        ("DeleteCacheEntry", json!({"key": null})),
    ] {
        let (status, reply) = gha.twirp(method, body.clone()).await;
        assert_eq!(status, 400, "{method} {body}: {reply}");
        assert_twirp_error(
            status,
            &reply,
            &["malformed", "invalid_argument"],
            &format!("{method} {body}"),
        );
    }
    gha.invisible("k").await;

    // v1 bodies that are not what they should be.
    for (what, request) in [
        (
            "reserve, not JSON",
            gha.v1(Method::POST, &gha.at("/_apis/artifactcache/caches"))
                .header("content-type", "application/json")
                .body("not json"),
        ),
        (
            "reserve, key a number",
            gha.v1(Method::POST, &gha.at("/_apis/artifactcache/caches"))
                .json(&json!({"key": 5, "version": v, "cacheSize": 5})),
        ),
        (
            "reserve, no key",
            gha.v1(Method::POST, &gha.at("/_apis/artifactcache/caches"))
                .json(&json!({"version": v, "cacheSize": 5})),
        ),
        (
            "reserve, cacheSize a word",
            gha.v1(Method::POST, &gha.at("/_apis/artifactcache/caches"))
                .json(&json!({"key": "k", "version": v, "cacheSize": "five"})),
        ),
        (
            "reserve, cacheSize negative",
            gha.v1(Method::POST, &gha.at("/_apis/artifactcache/caches"))
                .json(&json!({"key": "k", "version": v, "cacheSize": -5})),
        ),
    ] {
        let (status, body) = v1_error(request.send().await.unwrap(), what).await;
        assert_4xx(status, &format!("{what}: {body}"));
    }
    let id = gha.v1_reserve_ok("v1-commit-body", 10).await;
    assert_eq!(gha.v1_patch(id, 0, &[1; 10]).await.status(), 204);
    for body in [
        json!({"size": "ten"}),
        json!({"size": -1}),
        json!({}),
        json!({"size": 10.5}),
    ] {
        let response = gha
            .v1(Method::POST, &gha.v1_cache_url(&id.to_string()))
            .json(&body)
            .send()
            .await
            .unwrap();
        let (status, reply) = v1_error(response, &format!("commit {body}")).await;
        assert_4xx(status, &format!("commit {body}: {reply}"));
    }
    gha.invisible("v1-commit-body").await;
    gha.invisible("k").await;
    check_baseline(&gha, &base).await;
}

#[tokio::test]
async fn v2_int64_fields_accept_strings_and_numbers() {
    let gha = Gha::start();
    for (key, size, repository) in [
        ("as-string", json!("5"), json!("0")),
        ("as-number", json!(5), json!(0)),
    ] {
        // The JS client's request shape: metadata, URL used as given.
        let (status, body) = gha
            .twirp(
                "CreateCacheEntry",
                json!({
                    "metadata": {
                        "repository_id": repository,
                        "scope": [{"scope": SCOPE, "permission": repository}],
                    },
                    "key": key,
                    "version": version(),
                }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["ok"], true, "{body}");
        let url = body["signed_upload_url"].as_str().unwrap();
        if key == "as-string" {
            let response = gha.put_blob(url, b"12345").await;
            assert_request_id(&response, "Put Blob");
            assert_eq!(response.status(), 201);
        } else {
            // The JS SDK's block path: 48-byte ids, parameters appended to the URL as is.
            gha.js_upload_blocks(url, b"12345", 2).await;
        }
        let (status, body) = gha.v2_finalize(key, size.clone()).await;
        assert_eq!(status, 200, "finalize with size_bytes {size}: {body}");
        assert_eq!(body["ok"], true, "{body}");
        assert!(
            body["entry_id"].is_string(),
            "entry_id not a string: {body}"
        );

        let (status, found) = gha
            .twirp(
                "LookupCacheEntry",
                json!({"key": key, "version": version()}),
            )
            .await;
        assert_eq!(status, 200, "{found}");
        assert_eq!(found["exists"], true, "{found}");
        assert_eq!(found["entry"]["size_bytes"], "5", "{found}");
        let (status, list) = gha.twirp("ListCacheEntries", json!({"key": key})).await;
        assert_eq!(status, 200, "{list}");
        assert_eq!(list["entries"][0]["key"], key, "{list}");
        assert_eq!(list["entries"][0]["size_bytes"], "5", "{list}");
        gha.v2_restores(&Entry::new(key.into(), b"12345".to_vec()))
            .await;
    }
}

#[tokio::test]
async fn too_many_keys_or_too_long_keys_are_refused() {
    let gha = Gha::start();
    let base = baseline(&gha).await;
    let keys: Vec<String> = (0..11).map(|i| format!("k{i}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();

    // Ten keys are fine, eleven are not.
    gha.v1_miss(&keys[..10]).await;
    let (status, body) = v1_error(gha.v1_lookup(&keys).await, "11 keys").await;
    assert_eq!(status, 400, "v1 lookup with 11 keys: {body}");
    gha.v2_miss(keys[0], &keys[1..10]).await;
    for method in ["GetCacheEntryDownloadURL", "LookupCacheEntry"] {
        let (status, body) = gha
            .twirp(
                method,
                json!({"key": keys[0], "restore_keys": &keys[1..], "version": version()}),
            )
            .await;
        assert_eq!(status, 400, "{method} with 11 keys: {body}");
        assert_twirp_error(status, &body, &["invalid_argument"], method);
    }

    // 512 characters are fine, 513 are not.
    let long = "a".repeat(513);
    let fits = "b".repeat(512);
    let (status, body) = v1_error(gha.v1_reserve(&long, 10).await, "513-char key").await;
    assert_eq!(status, 400, "v1 reserve of a 513-character key: {body}");
    for keys in [vec![long.as_str()], vec!["x", long.as_str()]] {
        let (status, body) = v1_error(gha.v1_lookup(&keys).await, "513-char key").await;
        assert_eq!(status, 400, "v1 lookup with a 513-character key: {body}");
    }
    for (method, body) in [
        (
            "CreateCacheEntry",
            json!({"key": long, "version": version()}),
        ),
        (
            "GetCacheEntryDownloadURL",
            json!({"key": long, "version": version()}),
        ),
        (
            "GetCacheEntryDownloadURL",
            json!({"key": "x", "restore_keys": [long], "version": version()}),
        ),
        (
            "LookupCacheEntry",
            json!({"key": long, "version": version()}),
        ),
    ] {
        let (status, reply) = gha.twirp(method, body).await;
        assert_eq!(status, 400, "{method} with a 513-character key: {reply}");
        assert_twirp_error(status, &reply, &["invalid_argument"], method);
    }
    let entry = Entry::new(fits.clone(), data(18, 100));
    gha.v1_save(&entry).await;
    gha.v1_restores(&entry).await;
    let entry = Entry::new("c".repeat(512), data(19, 100));
    gha.v2_save(&entry).await;
    gha.v2_restores(&entry).await;

    // Empty keys and, in v1, commas.
    for key in ["", "a,b"] {
        let (status, body) = v1_error(gha.v1_reserve(key, 10).await, "bad key").await;
        assert_eq!(status, 400, "v1 reserve of {key:?}: {body}");
    }
    let (status, body) = gha
        .twirp("CreateCacheEntry", json!({"key": "", "version": version()}))
        .await;
    assert_eq!(status, 400, "v2 create of an empty key: {body}");
    check_baseline(&gha, &base).await;
}

/// base64url without padding, as JWTs use.
fn base64url(bytes: &[u8]) -> String {
    base64(bytes)
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_")
}

#[tokio::test]
async fn missing_or_bad_tokens_are_unauthenticated() {
    let gha = Gha::start();
    let base = baseline(&gha).await;
    let elsewhere = tempfile::tempdir().unwrap();
    let foreign = common::mint_token(elsewhere.path(), &["--read", SCOPE, "--write", SCOPE]);
    let tampered = {
        let mut parts: Vec<String> = gha.token.split('.').map(str::to_owned).collect();
        let mut sig: Vec<char> = parts[2].chars().collect();
        let middle = sig.len() / 2;
        sig[middle] = if sig[middle] == 'A' { 'B' } else { 'A' };
        parts[2] = sig.into_iter().collect();
        parts.join(".")
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({
        "ac": format!("[{{\"Scope\":\"{SCOPE}\",\"Permission\":3}}]"),
        "iss": "layercache", "exp": now + 3600, "nbf": now - 60, "iat": now - 60,
        "repository_id": "0",
    });
    let unsigned = format!(
        "{}.{}.",
        base64url(br#"{"alg":"none","typ":"JWT"}"#),
        base64url(claims.to_string().as_bytes())
    );
    // The real header and signature around other claims.
    let resigned = {
        let parts: Vec<&str> = gha.token.split('.').collect();
        format!(
            "{}.{}.{}",
            parts[0],
            base64url(claims.to_string().as_bytes()),
            parts[2]
        )
    };

    let cases: Vec<(&str, Option<String>)> = vec![
        ("no Authorization", None),
        ("empty bearer", Some("Bearer ".into())),
        ("not a JWT", Some("Bearer not-a-jwt".into())),
        ("three dots of nothing", Some("Bearer a.b.c".into())),
        ("another server's key", Some(format!("Bearer {foreign}"))),
        ("tampered signature", Some(format!("Bearer {tampered}"))),
        ("alg none", Some(format!("Bearer {unsigned}"))),
        ("claims swapped", Some(format!("Bearer {resigned}"))),
        ("Basic", Some("Basic dXNlcjpwYXNz".into())),
    ];
    for (what, authorization) in &cases {
        let mut lookup = gha.http.get(gha.v1_lookup_url(&[&base[0].key]));
        let mut reserve = gha
            .http
            .post(gha.at("/_apis/artifactcache/caches"))
            .json(&json!({"key": "intruder", "version": version(), "cacheSize": 5}));
        if let Some(authorization) = authorization {
            lookup = lookup.header("authorization", authorization);
            reserve = reserve.header("authorization", authorization);
        }
        let (status, body) = v1_error(lookup.send().await.unwrap(), what).await;
        assert_eq!(status, 401, "v1 lookup, {what}: {body}");
        let (status, body) = v1_error(reserve.send().await.unwrap(), what).await;
        assert_eq!(status, 401, "v1 reserve, {what}: {body}");
        for (method, body) in [
            (
                "GetCacheEntryDownloadURL",
                json!({"key": base[1].key, "version": version()}),
            ),
            (
                "CreateCacheEntry",
                json!({"key": "intruder", "version": version()}),
            ),
            ("DeleteCacheEntry", json!({"key": base[1].key})),
        ] {
            let (status, reply) = gha
                .twirp_raw(method, body.to_string(), authorization.as_deref())
                .await;
            assert_eq!(status, 401, "{method}, {what}: {reply}");
            assert_eq!(
                reply["code"], "unauthenticated",
                "{method}, {what}: {reply}"
            );
        }
    }
    gha.invisible("intruder").await;

    // A read-only token reads but is denied writes with GitHub's wording.
    let reader = common::mint_token(gha.dir(), &["--read", SCOPE]);
    let response = gha
        .http
        .get(gha.v1_lookup_url(&[&base[0].key]))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = gha
        .http
        .post(gha.at("/_apis/artifactcache/caches"))
        .bearer_auth(&reader)
        .json(&json!({"key": "intruder", "version": version(), "cacheSize": 5}))
        .send()
        .await
        .unwrap();
    let (status, body) = v1_error(response, "read-only reserve").await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("cache write denied:"),
        "{body}"
    );
    let (status, body) = gha
        .twirp_raw(
            "CreateCacheEntry",
            json!({"key": "intruder", "version": version()}).to_string(),
            Some(&format!("Bearer {reader}")),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(body["ok"], true, "{body}");
    assert!(body.get("signed_upload_url").is_none(), "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("cache write denied:"),
        "{body}"
    );
    gha.invisible("intruder").await;
    check_baseline(&gha, &base).await;
}

#[tokio::test]
async fn v2_unknown_method_is_bad_route() {
    let gha = Gha::start();
    let (status, body) = gha.twirp("NoSuchMethod", json!({"key": "k"})).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["code"], "bad_route", "{body}");
    for path in [
        "/twirp/github.actions.results.api.v1.NoSuchService/CreateCacheEntry",
        "/twirp/github.actions.results.api.v1.CacheService/",
    ] {
        let response = gha
            .http
            .post(gha.at(path))
            .bearer_auth(&gha.token)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_4xx(response.status(), path);
    }
    // Twirp is POST only.
    let response = gha
        .http
        .get(gha.at(&format!("{TWIRP}CreateCacheEntry")))
        .bearer_auth(&gha.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404, "GET of a twirp method");
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["code"], "bad_route",
        "twirp's own error, in JSON: {body}"
    );
}

/// The harness's own encoders, checked against RFC 4648 and the SDKs' shapes.
#[test]
fn harness_encodings() {
    for (plain, encoded) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64(plain.as_bytes()), encoded);
    }
    let id = go_block_id(1);
    assert_eq!(id.len(), 88);
    assert!(
        id.contains('+') && id.contains('/') && id.ends_with("=="),
        "{id}"
    );
    let url = go_url(
        "http://h/layercache/actions/7?sig=s%2Bg",
        &[("comp", "block"), ("blockid", &id)],
    );
    assert!(
        url.starts_with("http://h/layercache/actions/7?blockid="),
        "{url}"
    );
    assert!(url.ends_with("&comp=block&sig=s%2Bg"), "{url}");
    let query = url.split_once('?').unwrap().1;
    assert!(!query.contains('+') && !query.contains('/'), "{url}");
    assert!(
        query.contains("%2B") && query.contains("%2F") && query.contains("%3D%3D"),
        "{url}"
    );
    let parsed = Url::parse(&url).unwrap();
    assert!(parsed.query_pairs().any(|(k, v)| k == "blockid" && v == id));
}
