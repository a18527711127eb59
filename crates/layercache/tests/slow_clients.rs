//! Clients that send nothing, or their request head a byte at a time, are disconnected
//! once the head deadline passes, while normal clients keep being served.

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

#[test]
fn a_silent_connection_is_closed_on_the_default_deadline() {
    let server = common::Server::start();
    let config = std::process::Command::new(env!("CARGO_BIN_EXE_layercache"))
        .args(["serve", "--print-config"])
        .output()
        .unwrap();
    let config = String::from_utf8_lossy(&config.stdout).into_owned();
    assert!(config.contains("header_read_timeout = \"30s\""), "{config}");
    hold(&server.host, Slow::Silent, Duration::from_secs(90));
}
