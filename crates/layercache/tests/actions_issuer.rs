//! Runtime tokens from an external issuer: verified against its key set (a file, or a
//! URL), with its `iss`, never trusted on their own say-so.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{Read, Write};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::jwt::{Rsa, rsa_key, sign};

const ISSUER: &str = "https://token.actions.example";

fn claims(iss: &str, scope: &str) -> serde_json::Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    serde_json::json!({
        "iss": iss,
        "nbf": now - 5,
        "exp": now + 600,
        "repository_id": "77",
        "ac": serde_json::json!([{ "Scope": scope, "Permission": 3 }]).to_string(),
    })
}

/// `CreateCacheEntry` with `token`: the status and body.
fn create(server: &common::Server, token: &str, key: &str) -> (u16, serde_json::Value) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let response = reqwest::Client::new()
                .post(
                    server.at("/twirp/github.actions.results.api.v1.CacheService/CreateCacheEntry"),
                )
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(serde_json::json!({ "key": key, "version": "v" }).to_string())
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json().await.unwrap())
        })
}

/// Serve `body` to every request on a loopback port, in a thread; returns its URL.
fn serve_forever(body: String) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes());
        }
    });
    url
}

fn check_issuer(jwks_source: &str, key: &Rsa, other: &Rsa) {
    let server = common::Server::start_with_env(&[
        ("LAYERCACHE_ACTIONS__ISSUER__ISSUER", ISSUER),
        ("LAYERCACHE_ACTIONS__ISSUER__JWKS", jwks_source),
    ]);
    let good = sign(key, "k1", claims(ISSUER, "refs/heads/main"));
    let (status, body) = create(&server, &good, "from-issuer");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ok"], true, "{body}");

    let wrong_issuer = sign(
        key,
        "k1",
        claims("https://elsewhere.example", "refs/heads/main"),
    );
    let (status, body) = create(&server, &wrong_issuer, "wrong-issuer");
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["code"], "unauthenticated");

    // Another key under the same key id: the signature does not verify.
    let forged = sign(other, "k1", claims(ISSUER, "refs/heads/main"));
    let (status, body) = create(&server, &forged, "forged");
    assert_eq!(status, 401, "{body}");

    // A key id the set does not have.
    let unknown = sign(key, "k9", claims(ISSUER, "refs/heads/main"));
    assert_eq!(create(&server, &unknown, "unknown-kid").0, 401);

    // Unsigned ("alg": "none") tokens are never accepted.
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims(ISSUER, "refs/heads/main").to_string());
    assert_eq!(
        create(&server, &format!("{header}.{payload}."), "none").0,
        401
    );
}

#[test]
fn tokens_of_a_configured_issuer_are_verified_against_its_key_set() {
    if !common::require_tool("openssl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let key = rsa_key(tmp.path(), "k1");
    let other = rsa_key(tmp.path(), "k2");
    let file = tmp.path().join("jwks.json");
    std::fs::write(&file, &key.jwks).unwrap();
    check_issuer(file.to_str().unwrap(), &key, &other);
    check_issuer(&serve_forever(key.jwks.clone()), &key, &other);
}

#[test]
fn without_an_issuer_only_the_servers_own_tokens_are_trusted() {
    if !common::require_tool("openssl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let key = rsa_key(tmp.path(), "k1");
    let server = common::Server::start();
    let token = sign(&key, "k1", claims(ISSUER, "refs/heads/main"));
    let (status, body) = create(&server, &token, "k");
    assert_eq!(status, 401, "{body}");
    let minted = common::mint_token(server.data_dir(), &["--write", "refs/heads/main"]);
    let (status, body) = create(&server, minted.trim(), "k");
    assert_eq!((status, body["ok"].clone()), (200, serde_json::json!(true)));
}
