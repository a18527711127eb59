//! `/metrics` counts requests by route and status, bytes both ways, manifest hits and
//! misses, blob checks, and reports what is stored.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

/// The value of the sample named exactly `series` (name and labels), if exported.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_count_what_clients_did() {
    let server = common::Server::start();
    let client = reqwest::Client::new();
    let blob = vec![7u8; 100_000];
    let digest = common::digest_of(&blob);
    let r = client
        .post(server.at(&format!("/v2/m/blobs/uploads/?digest={digest}")))
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    for _ in 0..3 {
        let r = client
            .head(server.at(&format!("/v2/m/blobs/{digest}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let absent = common::digest_of(b"absent");
    let r = client
        .head(server.at(&format!("/v2/m/blobs/{absent}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let got = client
        .get(server.at(&format!("/v2/m/blobs/{digest}")))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got.len(), blob.len());
    for _ in 0..2 {
        let r = client
            .get(server.at("/v2/m/manifests/missing"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }

    let text = client
        .get(server.at("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value =
        |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"));
    assert_eq!(
        value(r#"layercache_http_requests_total{route="head_blob",status="200"}"#),
        3.0
    );
    assert_eq!(
        value(r#"layercache_http_requests_total{route="head_blob",status="404"}"#),
        1.0
    );
    assert_eq!(
        value(r#"layercache_http_request_duration_seconds_count{route="get_blob"}"#),
        1.0
    );
    assert_eq!(
        value(r#"layercache_blob_checks_total{result="present"}"#),
        3.0
    );
    assert_eq!(
        value(r#"layercache_blob_checks_total{result="absent"}"#),
        1.0
    );
    assert_eq!(
        value(r#"layercache_manifest_lookups_total{result="miss"}"#),
        2.0
    );
    assert!(value("layercache_http_request_bytes_total") >= blob.len() as f64);
    assert!(value("layercache_http_response_bytes_total") >= blob.len() as f64);
    assert_eq!(value("layercache_stored_blobs"), 1.0);
    assert!(value("layercache_stored_bytes") >= blob.len() as f64);
    assert!(value("layercache_build_sessions") >= 1.0);
}
