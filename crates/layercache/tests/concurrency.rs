//! Concurrency: 16 clients pushing the same and different blobs and manifests at once
//! while readers stream the shared blob. Every push succeeds, identical pushes are
//! idempotent, and no reader ever sees bytes that do not hash to the digest.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;

const MIB: usize = 1 << 20;
const CLIENTS: usize = 16;

fn collect(seed: u64, len: usize) -> Bytes {
    Bytes::from(
        common::chunks(seed, len, MIB)
            .flat_map(|c| c.to_vec())
            .collect::<Vec<u8>>(),
    )
}

/// The BuildKit sequence: POST a session, PUT the whole body with `?digest=`.
async fn push_session_put(client: &reqwest::Client, base: &str, repo: &str, body: Bytes) {
    let digest = common::digest_of(&body);
    let r = client
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let r = client
        .put(format!("{base}{location}?digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
}

/// Chunked: POST, two PATCHes with Content-Range, PUT ?digest= without body.
async fn push_chunked(client: &reqwest::Client, base: &str, repo: &str, body: Bytes) {
    let digest = common::digest_of(&body);
    let r = client
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let mut location = r.headers()["location"].to_str().unwrap().to_owned();
    let half = body.len() / 2;
    for (start, part) in [(0, body.slice(..half)), (half, body.slice(half..))] {
        let r = client
            .patch(format!("{base}{location}"))
            .header(
                "content-range",
                format!("{start}-{}", start + part.len() - 1),
            )
            .body(part)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        location = r.headers()["location"].to_str().unwrap().to_owned();
    }
    let r = client
        .put(format!("{base}{location}?digest={digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
}

async fn put_manifest(client: &reqwest::Client, base: &str, repo: &str, tag: &str, manifest: &str) {
    let r = client
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
}

fn manifest(config: &Bytes, layers: &[&Bytes]) -> String {
    let layers: Vec<_> = layers
        .iter()
        .map(|l| {
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": common::digest_of(l), "size": l.len()})
        })
        .collect();
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": common::digest_of(config), "size": config.len()},
        "layers": layers,
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_clients_push_same_and_different_content_without_failures_or_torn_reads() {
    let server = common::Server::start();
    let base = server.url.clone();
    let shared = collect(100, 16 * MIB);
    let shared_digest = common::digest_of(&shared);
    let config =
        Bytes::from_static(br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers"}}"#);
    let shared_manifest = manifest(&config, &[&shared]);

    let done = Arc::new(AtomicBool::new(false));
    let full_reads = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (base, digest, done, full_reads) = (
                base.clone(),
                shared_digest.clone(),
                done.clone(),
                full_reads.clone(),
            );
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                while !done.load(Ordering::Relaxed) {
                    let r = client
                        .get(format!("{base}/v2/conc/shared/blobs/{digest}"))
                        .send()
                        .await
                        .unwrap();
                    match r.status().as_u16() {
                        404 => tokio::task::yield_now().await,
                        200 => {
                            let got = r.bytes().await.unwrap();
                            assert_eq!(common::digest_of(&got), digest, "torn read");
                            full_reads.fetch_add(1, Ordering::Relaxed);
                        }
                        other => panic!("reader got {other}"),
                    }
                }
            })
        })
        .collect();

    let writers: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (base, shared, config, shared_manifest) = (
                base.clone(),
                shared.clone(),
                config.clone(),
                shared_manifest.clone(),
            );
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let own = collect(1000 + i as u64, 2 * MIB + i * 4096);
                let config_digest = common::digest_of(&config);
                // The same config by monolithic POST from every client at once.
                let r = client
                    .post(format!(
                        "{base}/v2/conc/shared/blobs/uploads/?digest={config_digest}"
                    ))
                    .body(config.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
                push_session_put(&client, &base, "conc/shared", shared).await;
                push_chunked(&client, &base, "conc/shared", own.clone()).await;
                put_manifest(&client, &base, "conc/shared", "same", &shared_manifest).await;
                put_manifest(
                    &client,
                    &base,
                    "conc/shared",
                    &format!("c{i}"),
                    &manifest(&config, &[&own]),
                )
                .await;
                own
            })
        })
        .collect();
    let mut owns = Vec::new();
    for w in writers {
        owns.push(w.await.unwrap());
    }
    // Keep reading a little after the last write so readers overlap the whole run.
    while full_reads.load(Ordering::Relaxed) < 8 {
        tokio::task::yield_now().await;
    }
    done.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }

    let client = reqwest::Client::new();
    let r = client
        .get(format!("{base}/v2/conc/shared/manifests/same"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), shared_manifest);
    for (i, own) in owns.iter().enumerate() {
        let digest = common::digest_of(own);
        let got = client
            .get(format!("{base}/v2/conc/shared/blobs/{digest}"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(common::digest_of(&got), digest);
        let r = client
            .get(format!("{base}/v2/conc/shared/manifests/c{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let tags: serde_json::Value = client
        .get(format!("{base}/v2/conc/shared/tags/list"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tags["tags"].as_array().unwrap().len(), CLIENTS + 1);
    common::assert_blob_files_match_their_names(server.data_dir());
}
