//! Crash safety: `kill -9` in the middle of uploads, then restart. Nothing partial
//! becomes visible, what was stored before is intact and re-verified, and an
//! interrupted chunked upload resumes from the offset the server reports.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use futures::SinkExt;

const MIB: usize = 1 << 20;

fn upload_location(response: &reqwest::Response) -> String {
    response.headers()["location"].to_str().unwrap().to_owned()
}

/// Send `body` as a streamed request that is still open when the function returns
/// after `sent` chunks have been handed to the connection.
async fn start_streamed(
    request: reqwest::RequestBuilder,
    chunks: impl Iterator<Item = Bytes>,
    sent: usize,
) -> (
    tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
    futures::channel::mpsc::Sender<std::io::Result<Bytes>>,
) {
    let (mut tx, rx) = futures::channel::mpsc::channel::<std::io::Result<Bytes>>(1);
    let pending = tokio::spawn(request.body(reqwest::Body::wrap_stream(rx)).send());
    for chunk in chunks.take(sent) {
        tx.send(Ok(chunk)).await.unwrap();
    }
    // Let the server take in what was queued before it dies.
    tokio::time::sleep(Duration::from_millis(300)).await;
    (pending, tx)
}

#[tokio::test]
async fn kill_during_uploads_leaves_no_partial_blob_and_chunked_upload_resumes() {
    let mut server = common::Server::start();
    let client = reqwest::Client::new();

    // Content stored before the crash: a blob and a manifest referencing it.
    let kept = Bytes::from(
        common::chunks(1, 8 * MIB, MIB)
            .flat_map(|c| c.to_vec())
            .collect::<Vec<u8>>(),
    );
    let kept_digest = common::digest_of(&kept);
    let r = client
        .post(server.at(&format!(
            "/v2/crash/app/blobs/uploads/?digest={kept_digest}"
        )))
        .body(kept.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let config_digest = common::digest_of(&config);
    let r = client
        .post(server.at(&format!(
            "/v2/crash/app/blobs/uploads/?digest={config_digest}"
        )))
        .body(config.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": kept_digest, "size": kept.len()}],
    })
    .to_string();
    let r = client
        .put(server.at("/v2/crash/app/manifests/v1"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // A chunked upload with one acknowledged chunk, then a second chunk cut off mid-way.
    let total = 96 * MIB;
    let chunked_digest = common::digest_of_chunks(2, total, MIB);
    let r = client
        .post(server.at("/v2/crash/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = upload_location(&r);
    let first: Vec<u8> = common::chunks(2, total, MIB)
        .take(32)
        .flat_map(|c| c.to_vec())
        .collect();
    let r = client
        .patch(server.at(&location))
        .header("content-range", format!("0-{}", first.len() - 1))
        .body(first)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["range"], format!("0-{}", 32 * MIB - 1));
    let (chunk_pending, _chunk_tx) = start_streamed(
        client.patch(server.at(&location)),
        common::chunks(2, total, MIB).skip(32),
        20,
    )
    .await;

    // A monolithic upload of a large blob, cut off mid-way.
    let mono_total = 256 * MIB;
    let mono_digest = common::digest_of_chunks(3, mono_total, MIB);
    let (mono_pending, _mono_tx) = start_streamed(
        client.post(server.at(&format!(
            "/v2/crash/app/blobs/uploads/?digest={mono_digest}"
        ))),
        common::chunks(3, mono_total, MIB),
        100,
    )
    .await;

    server.kill();
    let _ = chunk_pending.await; // either outcome: the server may have died before or after reading it
    assert!(
        mono_pending.await.unwrap().is_err(),
        "the cut-off upload cannot have succeeded"
    );
    server.restart();
    let client = reqwest::Client::new();

    // Nothing partial is visible, on the wire or on disk.
    let r = client
        .head(server.at(&format!("/v2/crash/app/blobs/{mono_digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let hex = mono_digest.trim_start_matches("sha256:");
    assert!(
        !server
            .data_dir()
            .join(format!("blobs/sha256/{}/{hex}", &hex[..2]))
            .exists()
    );
    common::assert_blob_files_match_their_names(server.data_dir());

    // What was stored before the crash is intact.
    let got = client
        .get(server.at(&format!("/v2/crash/app/blobs/{kept_digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(common::digest_of(&got.bytes().await.unwrap()), kept_digest);
    let got = client
        .get(server.at("/v2/crash/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.text().await.unwrap(), manifest);

    // The chunked upload resumes from where the server says it is.
    let r = client.get(server.at(&location)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let range = r.headers()["range"].to_str().unwrap().to_owned();
    let offset: usize = range.split('-').nth(1).unwrap().parse::<usize>().unwrap() + 1;
    assert!(
        offset >= 32 * MIB && offset <= total,
        "offset {offset} after restart"
    );

    let wrong = client
        .patch(server.at(&location))
        .header("content-range", format!("{}-{}", offset + 1, offset + 10))
        .body(vec![0u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 416, "a chunk that leaves a gap is refused");

    let rest: Vec<u8> = common::chunks(2, total, MIB)
        .flat_map(|c| c.to_vec())
        .skip(offset)
        .collect();
    let r = client
        .patch(server.at(&location))
        .header("content-range", format!("{offset}-{}", total - 1))
        .body(rest)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = client
        .put(server.at(&format!("{location}?digest={chunked_digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let got = client
        .get(server.at(&format!("/v2/crash/app/blobs/{chunked_digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        common::digest_of(&got.bytes().await.unwrap()),
        chunked_digest
    );
    common::assert_blob_files_match_their_names(server.data_dir());
}
