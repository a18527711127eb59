//! Memory stays flat whatever the blob size: pushing and pulling a 1 GiB blob does not
//! grow the server's peak resident memory anywhere near the blob's size.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use futures::StreamExt;

const MIB: usize = 1 << 20;
const GIB: usize = 1 << 30;
/// Far below the blob size; the server's steady state is a few tens of MiB.
const PEAK_LIMIT: u64 = 160 * MIB as u64;

#[tokio::test]
async fn pushing_and_pulling_a_gib_blob_keeps_server_memory_flat() {
    let server = common::Server::start();
    let client = reqwest::Client::new();
    let digest = common::digest_of_chunks(7, GIB, 4 * MIB);

    let r = client
        .post(server.at("/v2/mem/big/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let body = futures::stream::iter(common::chunks(7, GIB, 4 * MIB).map(Ok::<_, std::io::Error>));
    let r = client
        .put(server.at(&format!("{location}?digest={digest}")))
        .header("content-length", GIB.to_string())
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let mut stream = client
        .get(server.at(&format!("/v2/mem/big/blobs/{digest}")))
        .send()
        .await
        .unwrap()
        .bytes_stream();
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut len = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        len += chunk.len();
        sha2::Digest::update(&mut hasher, &chunk);
    }
    assert_eq!(len, GIB);
    assert_eq!(
        format!("sha256:{}", hex::encode(sha2::Digest::finalize(hasher))),
        digest
    );

    let peak = common::peak_rss(server.pid());
    assert!(
        peak < PEAK_LIMIT,
        "server peak RSS {} MiB while moving 1 GiB",
        peak / MIB as u64
    );
}
