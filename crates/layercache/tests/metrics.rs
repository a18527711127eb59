//! `/metrics` counts requests by route and status, bytes both ways, manifest hits and
//! misses, blob checks, and reports what is stored; the request log's `served` line says
//! how much of each body went out, and which downloads were cut short.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::registry::sample;

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
    assert!(value("layercache_quota_max_size_bytes") >= value("layercache_quota_bytes"));
}

/// The `served` line of each request to `path`: `(method, status, bytes, cut)`.
fn served_lines(log: &str, path: &str) -> Vec<(String, u16, u64, bool)> {
    let field = common::log_field;
    log.lines()
        .filter(|l| l.contains(": served ") && l.contains(&format!(" path={path}")))
        .map(|l| {
            let number = |name| {
                field(l, name)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("no {name} in {l:?}"))
            };
            (
                field(l, "method").unwrap(),
                number("status") as u16,
                number("bytes"),
                field(l, "cut").as_deref() == Some("true"),
            )
        })
        .collect()
}

#[tokio::test]
async fn the_request_log_says_how_much_of_a_download_went_out() {
    const LEN: usize = 64 << 20;
    let server = common::Server::start_logged(&[]);
    let client = reqwest::Client::new();
    let blob: Vec<u8> = common::chunks(18, LEN, 1 << 20).flatten().collect();
    let digest = common::digest_of(&blob);
    let r = client
        .post(server.at(&format!("/v2/m/blobs/uploads/?digest={digest}")))
        .body(blob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let path = format!("/v2/m/blobs/{digest}");

    let whole = client.get(server.at(&path)).send().await.unwrap();
    assert_eq!(whole.bytes().await.unwrap().len(), LEN);
    let head = client.head(server.at(&path)).send().await.unwrap();
    assert_eq!(head.status(), 200);
    let part = client
        .get(server.at(&path))
        .header("Range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.bytes().await.unwrap().len(), 100);

    // A client that reads the first 64 KiB and goes away: far less than the socket's
    // buffers hold of the rest, so the server finds out while sending.
    let host = server.url.trim_start_matches("http://").to_owned();
    let request = path.clone();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&host).unwrap();
        write!(stream, "GET {request} HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
        let mut first = vec![0u8; 64 << 10];
        stream.read_exact(&mut first).unwrap();
        assert!(first.starts_with(b"HTTP/1.1 200"));
    })
    .await
    .unwrap();

    // The cut request's line comes when the server notices, which may be after the
    // requests that follow it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let lines = loop {
        let lines = served_lines(&server.log(), &path);
        if lines.len() == 4 || std::time::Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let (cut, sent): (Vec<_>, Vec<_>) = lines.into_iter().partition(|line| line.3);
    assert_eq!(
        sent,
        [
            ("GET".to_owned(), 200, LEN as u64, false),
            ("HEAD".to_owned(), 200, 0, false),
            ("GET".to_owned(), 206, 100, false),
        ]
    );
    let [(method, status, bytes, _)] = cut.as_slice() else {
        panic!("not one cut download: {cut:?}");
    };
    assert_eq!((method.as_str(), *status), ("GET", 200));
    assert!(
        *bytes < LEN as u64,
        "{bytes} bytes of {LEN} logged as sent, cut"
    );
}
