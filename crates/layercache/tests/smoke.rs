//! The binary starts, answers the API version check, and restarts on its data (blobs
//! and build sessions).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

#[tokio::test]
async fn serve_answers_the_version_check_and_keeps_data_across_restarts() {
    let mut server = common::Server::start();
    let client = reqwest::Client::new();
    let base = client.get(server.at("/v2/")).send().await.unwrap();
    assert_eq!(base.status(), 200);
    assert_eq!(
        base.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );

    let body = b"layer bytes".to_vec();
    let digest = common::digest_of(&body);
    let put = client
        .post(server.at(&format!("/v2/smoke/blobs/uploads/?digest={digest}")))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);

    // Build sessions are saved every few seconds: wait for one save, then crash.
    let sessions_before: serde_json::Value = client
        .get(server.at("/api/v1/sessions?repo=smoke"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5500)).await;
    server.restart();
    let client = reqwest::Client::new(); // the old pool holds connections to the dead process
    let sessions_after: serde_json::Value = client
        .get(server.at("/api/v1/sessions?repo=smoke"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(sessions_before[0]["id"], sessions_after[0]["id"]);
    assert_eq!(sessions_after[0]["blobs_written"], 1, "{sessions_after:#}");
    let got = client
        .get(server.at(&format!("/v2/smoke/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap().to_vec(), body);
}
