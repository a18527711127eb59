//! Limits per identity and per blob, each answered with the protocol's own error:
//! `413 BLOB_UPLOAD_INVALID` for a blob over the size limit (monolithic or chunked, and
//! nothing of it kept), `429 TOOMANYREQUESTS` with `Retry-After` for an identity over
//! its request rate or its uploads in flight, while other identities are served.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use common::{Server, layercache};

const MIB: usize = 1024 * 1024;

async fn error_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap();
    (
        status,
        body["errors"][0]["code"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn a_blob_over_the_size_limit_is_refused_whole_or_in_chunks() {
    let server = Server::start_with_env(&[("LAYERCACHE_STORE__MAX_BLOB_SIZE", "1MiB")]);
    let client = reqwest::Client::new();
    let big = vec![7u8; MIB + 1];
    let at_limit = vec![8u8; MIB];

    let r = client
        .post(server.at(&format!(
            "/v2/app/blobs/uploads/?digest={}",
            common::digest_of(&big)
        )))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (413, "BLOB_UPLOAD_INVALID".into()));
    let r = client
        .post(server.at(&format!(
            "/v2/app/blobs/uploads/?digest={}",
            common::digest_of(&at_limit)
        )))
        .body(at_limit.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "a blob of exactly the limit is accepted");

    // Chunked: the chunk that would pass the limit is refused; what came before stays
    // resumable, and nothing over the limit is ever stored.
    let r = client
        .post(server.at("/v2/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let half = MIB / 2;
    let r = client
        .patch(server.at(&location))
        .header("content-range", format!("0-{}", half - 1))
        .body(big[..half].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let r = client
        .patch(server.at(&location))
        .header("content-range", format!("{half}-{}", big.len() - 1))
        .body(big[half..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (413, "BLOB_UPLOAD_INVALID".into()));
    let r = client.get(server.at(&location)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["range"], format!("0-{}", half - 1));
    let r = client
        .head(server.at(&format!("/v2/app/blobs/{}", common::digest_of(&big))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// A server in `token` mode with `env`, and credentials for two identities.
fn token_server(env: &[(&str, &str)]) -> (Server, String, String) {
    let env: Vec<(&str, &str)> = [("LAYERCACHE_SERVER__AUTH__MODE", "token")]
        .into_iter()
        .chain(env.iter().copied())
        .collect();
    let server = Server::start_with_env(&env);
    let data_dir = server.data_dir().to_str().unwrap().to_owned();
    let mint = |session: &str| {
        let out = layercache(&[
            "token",
            "--data-dir",
            &data_dir,
            "--push",
            "**",
            "--session",
            session,
        ]);
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let (a, b) = (mint("a"), mint("b"));
    (server, a, b)
}

#[tokio::test]
async fn an_identity_over_its_rate_gets_429_with_retry_after_and_others_are_served() {
    let (server, busy, calm) = token_server(&[
        ("LAYERCACHE_SERVER__LIMITS__REQUESTS_PER_SECOND", "5"),
        ("LAYERCACHE_SERVER__LIMITS__BURST", "5"),
    ]);
    let client = reqwest::Client::new();
    let head = |credential: &str| {
        client
            .get(server.at("/v2/app/tags/list"))
            .basic_auth("ci", Some(credential))
            .send()
    };
    let mut refused = None;
    for _ in 0..20 {
        let r = head(&busy).await.unwrap();
        if r.status() == 429 {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status(), 404, "admitted: the repository is empty");
    }
    let refused = refused.expect("20 requests at once pass a burst of 5");
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(error_code(refused).await, (429, "TOOMANYREQUESTS".into()));
    assert_eq!(head(&calm).await.unwrap().status(), 404, "another identity");
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(
        head(&busy).await.unwrap().status(),
        404,
        "after Retry-After"
    );
}

/// The login name that labels a credential without a session is the client's to choose:
/// a new name per request does not make a new identity, so the rate still holds.
#[tokio::test]
async fn a_credential_is_limited_whatever_login_name_it_comes_with() {
    let (server, _, _) = token_server(&[
        ("LAYERCACHE_SERVER__LIMITS__REQUESTS_PER_SECOND", "1"),
        ("LAYERCACHE_SERVER__LIMITS__BURST", "5"),
    ]);
    let data_dir = server.data_dir().to_str().unwrap().to_owned();
    let out = layercache(&["token", "--data-dir", &data_dir, "--push", "**"]);
    assert!(out.status.success());
    let credential = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let client = reqwest::Client::new();
    let mut refused = 0;
    for n in 0..30 {
        let r = client
            .get(server.at("/v2/app/tags/list"))
            .basic_auth(format!("name-{n}"), Some(&credential))
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            refused += 1;
        }
    }
    assert!(
        refused >= 10,
        "{refused} of 30 refused past a burst of 5 at 1 per second"
    );
}

/// A chunk upload whose body is held open until the returned sender is dropped.
fn held_patch(
    client: &reqwest::Client,
    url: String,
    credential: &str,
) -> (
    futures::channel::mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
    tokio::task::JoinHandle<u16>,
) {
    let (tx, rx) = futures::channel::mpsc::channel(1);
    let body = reqwest::Body::wrap_stream(rx);
    let request = client
        .patch(url)
        .basic_auth("ci", Some(credential))
        .body(body)
        .send();
    let task = tokio::spawn(async move { request.await.unwrap().status().as_u16() });
    (tx, task)
}

#[tokio::test]
async fn uploads_in_flight_are_limited_per_identity() {
    let (server, busy, calm) =
        token_server(&[("LAYERCACHE_SERVER__LIMITS__UPLOADS_PER_IDENTITY", "2")]);
    let client = reqwest::Client::new();
    let server = &server;
    let start = |credential: &str| {
        let request = client
            .post(server.at("/v2/app/blobs/uploads/"))
            .basic_auth("ci", Some(credential))
            .send();
        async move {
            let r = request.await.unwrap();
            assert_eq!(r.status(), 202);
            server.at(r.headers()["location"].to_str().unwrap())
        }
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        let url = start(&busy).await;
        let (mut tx, task) = held_patch(&client, url, &busy);
        futures::SinkExt::send(&mut tx, Ok(vec![1u8; 1024]))
            .await
            .unwrap();
        held.push((tx, task));
    }
    // Both are in flight once the server has read their first bytes.
    let url = start(&calm).await;
    let mut third = None;
    for _ in 0..50 {
        let url = start(&busy).await;
        let r = client
            .patch(&url)
            .basic_auth("ci", Some(&busy))
            .body(vec![2u8; 10])
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            third = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let third = third.expect("a third upload while two are in flight is refused");
    assert!(third.headers().contains_key("retry-after"));
    assert_eq!(error_code(third).await, (429, "TOOMANYREQUESTS".into()));
    let r = client
        .patch(&url)
        .basic_auth("ci", Some(&calm))
        .body(vec![3u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "another identity uploads meanwhile");
    // Once the held uploads end, the identity uploads again.
    for (tx, task) in held {
        drop(tx);
        assert_eq!(task.await.unwrap(), 202);
    }
    let url = start(&busy).await;
    let r = client
        .patch(&url)
        .basic_auth("ci", Some(&busy))
        .body(vec![4u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

#[tokio::test]
async fn on_the_defaults_a_client_pushing_in_parallel_is_not_limited() {
    // docker pushes 5 layers at once, BuildKit more: well under the default 64.
    let server = Server::start();
    let client = reqwest::Client::new();
    let pushes = (0..32u8).map(|i| {
        let client = client.clone();
        let url = server.at(&format!(
            "/v2/app/blobs/uploads/?digest={}",
            common::digest_of(&vec![i; 256 * 1024])
        ));
        async move {
            client
                .post(url)
                .body(vec![i; 256 * 1024])
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    let statuses = futures::future::join_all(pushes).await;
    assert!(statuses.iter().all(|s| *s == 201), "{statuses:?}");
}
