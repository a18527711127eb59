//! The binary starts, answers the API version check, and restarts on its data.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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

    server.restart();
    let client = reqwest::Client::new(); // the old pool holds connections to the dead process
    let got = client
        .get(server.at(&format!("/v2/smoke/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap().to_vec(), body);
}
