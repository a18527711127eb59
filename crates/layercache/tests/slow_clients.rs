//! Clients that send nothing, or their request head a byte at a time, are disconnected
//! once the head deadline passes, while normal clients keep being served; a client that
//! stalls mid-body is answered once the body deadline passes, and until then holds
//! neither the eviction pass nor other requests. A large body that pauses and ends with
//! a few bytes is answered as its last byte arrives (the server is woken in steps while
//! a body's rest is certain to come, never waiting for bytes past its end), with a
//! `Content-Length` or chunked with a `Content-Range`, and its connection serves the
//! next request.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// How a slow client behaves.
#[derive(Clone, Copy)]
enum Slow {
    /// Connects and sends nothing.
    Silent,
    /// Sends a request head one byte every 200 ms.
    Dribbling,
}

/// Hold a connection the `slow` way until the server closes it; panics if it is still
/// open after `patience`.
fn hold(host: &str, slow: Slow, patience: Duration) {
    let mut stream = TcpStream::connect(host).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let head = format!(
        "GET /v2/ HTTP/1.1\r\nHost: {host}\r\nX-Slow: {}\r\n\r\n",
        "x".repeat(500)
    );
    let deadline = Instant::now() + patience;
    let mut sent = 0;
    let mut buf = [0u8; 512];
    loop {
        assert!(Instant::now() < deadline, "a slow connection is still open");
        if matches!(slow, Slow::Dribbling) && sent < head.len() {
            if stream.write_all(&head.as_bytes()[sent..=sent]).is_err() {
                return;
            }
            sent += 1;
        }
        match stream.read(&mut buf) {
            Ok(0) => return,
            // hyper may answer 408 before closing: read on to the end.
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
    }
}

#[test]
fn fifty_slow_clients_are_cut_off_while_a_normal_client_is_served() {
    let server =
        common::Server::start_with_env(&[("LAYERCACHE_SERVER__LIMITS__HEADER_READ_TIMEOUT", "1s")]);
    let slow: Vec<_> = (0..50)
        .map(|i| {
            let host = server.host.clone();
            let kind = if i % 2 == 0 {
                Slow::Silent
            } else {
                Slow::Dribbling
            };
            std::thread::spawn(move || hold(&host, kind, Duration::from_secs(60)))
        })
        .collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        for _ in 0..20 {
            let response = client.get(server.at("/v2/")).send().await.unwrap();
            assert_eq!(response.status(), 200);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    for thread in slow {
        thread.join().unwrap();
    }
}

/// The configuration the server runs with when nothing is set.
fn default_config() -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_layercache"))
        .args(["serve", "--print-config"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_silent_connection_is_closed_on_the_default_deadline() {
    let server = common::Server::start();
    let config = default_config();
    assert!(config.contains("header_read_timeout = \"30s\""), "{config}");
    hold(&server.host, Slow::Silent, Duration::from_secs(90));
}

/// Start an upload on `server` and stall its `PATCH` after 10 of 1000 bytes; returns the
/// upload's path and the stalled connection (reads time out after 100 ms).
fn stalled_patch(server: &common::Server) -> (String, TcpStream) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let location = runtime.block_on(async {
        let r = reqwest::Client::new()
            .post(server.at("/v2/cache/stalled/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        r.headers()["location"].to_str().unwrap().to_owned()
    });
    let mut stream = connect(&server.host);
    let head = format!(
        "PATCH {location} HTTP/1.1\r\nHost: {}\r\nContent-Length: 1000\r\n\r\n",
        server.host
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&[b'x'; 10]).unwrap();
    (location, stream)
}

/// A connection to `host` whose reads time out after 100 ms, for [`answer`].
fn connect(host: &str) -> TcpStream {
    let stream = TcpStream::connect(host).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    stream
}

/// What the server answered on `stream` within `patience` (its status line and body).
fn answer(stream: &mut TcpStream, patience: Duration) -> String {
    let deadline = Instant::now() + patience;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.ends_with(b"0\r\n\r\n") || got.ends_with(b"}]}") {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if !got.is_empty() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn a_stalled_body_holds_neither_the_eviction_pass_nor_its_upload_past_the_deadline() {
    let server = common::Server::start_with_env(&[
        ("LAYERCACHE_SERVER__LIMITS__BODY_READ_TIMEOUT", "4s"),
        ("LAYERCACHE_STORE__EVICTION__UPLOAD_EXPIRY", "1s"),
    ]);
    let (location, mut stalled) = stalled_patch(&server);
    // Idle past the upload expiry, but a request is still streaming into it.
    std::thread::sleep(Duration::from_millis(1500));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    runtime.block_on(async {
        let pass = client.post(server.at("/api/v1/gc")).send().await.unwrap();
        assert_eq!(
            pass.status(),
            200,
            "the pass does not wait on the stalled client"
        );
    });
    assert_eq!(
        answer(&mut stalled, Duration::from_millis(200)),
        "",
        "the stalled request is answered only at its deadline"
    );
    let said = answer(&mut stalled, Duration::from_secs(30));
    assert!(said.starts_with("HTTP/1.1 400"), "{said}");
    assert!(
        said.contains("BLOB_UPLOAD_INVALID") && said.contains("no bytes arrived for 4s"),
        "{said}"
    );
    // Its lock is free: the client (or another) may resume or cancel at once.
    runtime.block_on(async {
        let status = client.get(server.at(&location)).send().await.unwrap();
        assert_eq!(
            status.status(),
            204,
            "not expired while it was being written"
        );
        assert_eq!(
            status.headers()["range"],
            "0-0",
            "the unfinished chunk is not kept"
        );
        let cancel = client.delete(server.at(&location)).send().await.unwrap();
        assert_eq!(cancel.status(), 204);
    });
}

#[test]
fn a_stalled_body_is_answered_on_the_default_deadline() {
    let server = common::Server::start();
    let config = default_config();
    assert!(config.contains("body_read_timeout = \"1m\""), "{config}");
    let (_, mut stalled) = stalled_patch(&server);
    let said = answer(&mut stalled, Duration::from_secs(90));
    assert!(said.contains("no bytes arrived for 1m"), "{said}");
}

/// Send `head`, then `body` as a client that pauses: all but its last MiB and 7 bytes at
/// once, then all but 7 bytes, then the 7, with a pause before each so the server has
/// read everything before them. `frame` wraps each piece (chunked encoding or as is);
/// `end` follows the last.
fn send_in_pieces(
    stream: &mut TcpStream,
    head: &str,
    body: &[u8],
    frame: fn(&[u8]) -> Vec<u8>,
    end: &[u8],
) {
    stream.write_all(head.as_bytes()).unwrap();
    let cuts = [0, body.len() - (1 << 20) - 7, body.len() - 7, body.len()];
    for (i, piece) in cuts.windows(2).enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
        stream.write_all(&frame(&body[piece[0]..piece[1]])).unwrap();
    }
    stream.write_all(end).unwrap();
}

/// `piece` as one chunk of chunked transfer encoding.
fn chunk(piece: &[u8]) -> Vec<u8> {
    let mut framed = format!("{:x}\r\n", piece.len()).into_bytes();
    framed.extend_from_slice(piece);
    framed.extend_from_slice(b"\r\n");
    framed
}

#[test]
fn a_large_body_that_pauses_and_ends_in_a_few_bytes_is_answered_at_its_last_byte() {
    let server = common::Server::start();
    let body = common::actions::data(7, 6 << 20);
    let digest = common::digest_of(&body);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let location = runtime.block_on(async {
        let r = reqwest::Client::new()
            .post(server.at("/v2/cache/paced/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        r.headers()["location"].to_str().unwrap().to_owned()
    });
    let separator = if location.contains('?') { '&' } else { '?' };
    let mut stream = connect(&server.host);
    let head = format!(
        "PUT {location}{separator}digest={digest} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n",
        server.host,
        body.len()
    );
    send_in_pieces(&mut stream, &head, &body, <[u8]>::to_vec, b"");
    // Well inside the body deadline (1 minute), at which a wait past the end would end.
    let said = answer(&mut stream, Duration::from_secs(20));
    assert!(said.starts_with("HTTP/1.1 201"), "{said}");
    // The same connection takes the next request at once.
    let next = format!(
        "HEAD /v2/cache/paced/blobs/{digest} HTTP/1.1\r\nHost: {}\r\n\r\n",
        server.host
    );
    stream.write_all(next.as_bytes()).unwrap();
    let said = answer(&mut stream, Duration::from_secs(20));
    assert!(said.starts_with("HTTP/1.1 200"), "{said}");
    assert!(
        said.contains(&format!("content-length: {}", body.len())),
        "{said}"
    );
}

#[test]
fn a_chunked_actions_part_that_pauses_and_ends_in_a_few_bytes_is_answered_at_its_last_byte() {
    let gha = common::actions::Gha::start();
    let body = common::actions::data(8, 6 << 20);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let id = runtime.block_on(gha.v1_reserve_ok("paced", body.len()));
    let mut stream = connect(&gha.server.host);
    // As `@actions/cache` sends a chunk: no Content-Length, the range in Content-Range.
    let head = format!(
        "PATCH /_apis/artifactcache/caches/{id} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nAccept: application/json;api-version=6.0-preview.1\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 0-{}/*\r\nTransfer-Encoding: chunked\r\n\r\n",
        gha.server.host,
        gha.token,
        body.len() - 1
    );
    send_in_pieces(&mut stream, &head, &body, chunk, b"0\r\n\r\n");
    let said = answer(&mut stream, Duration::from_secs(20));
    assert!(said.starts_with("HTTP/1.1 204"), "{said}");
    runtime.block_on(async {
        let commit = gha.v1_commit(&id.to_string(), body.len()).await;
        assert_eq!(commit.status(), 204);
        let hit = gha.v1_hit(&["paced"]).await;
        assert_eq!(hit["cacheKey"], "paced");
    });
}
