//! layercache as a mirror of an upstream that lies, stalls, floods or loops (a scripted
//! fake registry, `common::hostile`). Whatever the upstream does, a client gets an OCI
//! error or the right bytes within a bound time, nothing that does not hash to its
//! digest is stored, the server's memory stays flat, and the next request asks the
//! upstream again; what was cached is still served once the upstream is gone.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::hostile::{Hostile, Reply};
use futures::StreamExt;
use sha2::Digest as _;

/// The mirror's upstream read timeout in these tests.
const READ_TIMEOUT: &str = "2s";
/// Longer than any answer may take (a bounded failure included).
const PATIENCE: Duration = Duration::from_secs(20);
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A layercache mirroring `upstream` as `hostile/…`, with `extra` configuration lines.
fn mirror(upstream: &Hostile, extra: &str) -> common::Server {
    serve(upstream, "hostile", extra)
}

/// A layercache in front of `upstream` as the upstream `name` (empty: an edge, with
/// `upstream` its centre), with `extra` configuration lines.
fn serve(upstream: &Hostile, name: &str, extra: &str) -> common::Server {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mirror.toml");
    std::fs::write(
        &config,
        format!(
            "{extra}\n[[upstreams]]\nname = \"{name}\"\nurl = \"{}\"\n\
             read_timeout = \"{READ_TIMEOUT}\"\ncredentials = {{ username = \"mirror\", \
             password_env = \"HOSTILE_PASSWORD\" }}\n",
            upstream.url
        ),
    )
    .unwrap();
    let server = common::Server::start_with_env(&[
        ("LAYERCACHE_CONFIG", config.to_str().unwrap()),
        ("HOSTILE_PASSWORD", "secret"),
    ]);
    // The configuration is read at start-up; the file may go.
    drop(dir);
    server
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// What a client got.
/// A valid OCI image manifest.
const MANIFEST: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;

#[derive(Debug)]
struct Got {
    status: u16,
    body: Vec<u8>,
    /// The body ended cleanly (not cut, not failed).
    complete: bool,
    took: Duration,
}

impl Got {
    /// The OCI error code of the body.
    fn code(&self) -> String {
        let json: serde_json::Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not error JSON: {self:?}"));
        json["errors"][0]["code"].as_str().unwrap().to_owned()
    }
}

async fn fetch_async(url: String, accept: Option<&'static str>) -> Got {
    let start = Instant::now();
    let client = reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .unwrap();
    let mut request = client.get(&url);
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let mut stream = response.bytes_stream();
    let mut body = Vec::new();
    let mut complete = true;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => body.extend_from_slice(&chunk),
            Err(_) => {
                complete = false;
                break;
            }
        }
    }
    Got {
        status,
        body,
        complete,
        took: start.elapsed(),
    }
}

fn fetch(url: &str) -> Got {
    block_on(fetch_async(url.to_owned(), Some(OCI_MANIFEST)))
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Runtime::new().unwrap().block_on(future)
}

/// No stored blob file is named `digest`, and no staging file is left behind.
fn assert_not_stored(server: &common::Server, digest: &str) {
    let hex = digest.trim_start_matches("sha256:");
    let file = server
        .data_dir()
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex);
    assert!(!file.exists(), "{digest} was stored");
    common::assert_blob_files_match_their_names(server.data_dir());
    assert_no_staging(server.data_dir());
}

/// Staging files are discarded within a moment of a failed fill.
fn assert_no_staging(data_dir: &Path) {
    let uploads = data_dir.join("uploads");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<_> = std::fs::read_dir(&uploads)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "staging files left: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A body that does not failed to be a complete `expected`: refused before the body, or
/// cut short.
fn assert_refused(got: &Got, expected_len: usize) {
    assert!(got.took < PATIENCE, "held for {:?}", got.took);
    if got.status == 200 {
        assert!(
            !got.complete || got.body.len() != expected_len,
            "a complete body of {} bytes",
            got.body.len()
        );
    } else {
        assert!(got.status >= 400, "{got:?}");
        got.code();
    }
}

fn blob_path(digest: &str) -> String {
    format!("/v2/app/blobs/{digest}")
}

#[test]
fn a_blob_that_does_not_hash_to_its_digest_is_never_stored_and_asked_for_again() {
    let upstream = Hostile::start();
    let server = mirror(&upstream, "");
    let good = vec![7u8; 300_000];
    let digest = sha256(&good);
    let mut bad = good.clone();
    bad[150_000] ^= 1;
    upstream.reply(&blob_path(&digest), Reply::ok(&bad, &[]));
    let url = server.at(&format!("/v2/hostile/app/blobs/{digest}"));
    for _ in 0..2 {
        assert_refused(&fetch(&url), good.len());
        assert_not_stored(&server, &digest);
    }
    upstream.reply(&blob_path(&digest), Reply::ok(&good, &[]));
    let got = fetch(&url);
    assert_eq!((got.status, got.complete), (200, true));
    assert_eq!(sha256(&got.body), digest);
    assert_eq!(upstream.count("GET", &digest), 3);
}

#[test]
fn a_manifest_that_does_not_hash_to_its_reference_is_refused() {
    let upstream = Hostile::start();
    let server = mirror(&upstream, "");
    let manifest = MANIFEST;
    let digest = sha256(manifest);
    let other = sha256(b"something else");
    let ct = ("content-type", OCI_MANIFEST);
    // By digest: the bytes are another manifest's.
    let mut lying = manifest.to_vec();
    lying.extend_from_slice(b"  ");
    upstream.reply(
        &format!("/v2/app/manifests/{digest}"),
        Reply::ok(&lying, &[ct, ("docker-content-digest", &digest)]),
    );
    // By tag: the header names a digest the bytes do not hash to.
    upstream.reply(
        "/v2/app/manifests/latest",
        Reply::ok(manifest, &[ct, ("docker-content-digest", &other)]),
    );
    for reference in [digest.as_str(), "latest"] {
        let url = server.at(&format!("/v2/hostile/app/manifests/{reference}"));
        for _ in 0..2 {
            let got = fetch(&url);
            assert_eq!(got.status, 502, "{reference}: {got:?}");
            assert_eq!(got.code(), "UNAVAILABLE");
        }
        assert_eq!(upstream.count("GET", &format!("manifests/{reference}")), 2);
    }
    let by_digest = fetch(&server.at(&format!("/v2/hostile/app/manifests/{digest}")));
    assert_eq!(by_digest.status, 502, "nothing was stored under {digest}");
}

#[test]
fn endless_and_oversized_bodies_are_cut_at_a_limit() {
    let upstream = Hostile::start();
    let server = mirror(&upstream, "[store]\nmax_blob_size = \"4MiB\"\n");
    let endless = |status: u16| Reply::Endless {
        status,
        headers: vec![("content-type".into(), OCI_MANIFEST.into())],
        declared: None,
    };
    // A manifest without end, and an error answer without end.
    upstream.reply("/v2/app/manifests/endless", endless(200));
    upstream.reply("/v2/app/manifests/broken", endless(500));
    // A blob without end, and one announced larger than the store takes.
    let blob = sha256(b"endless");
    upstream.reply(&blob_path(&blob), endless(200));
    let huge = sha256(b"huge");
    upstream.reply(
        &blob_path(&huge),
        Reply::Endless {
            status: 200,
            headers: Vec::new(),
            declared: Some(1 << 40),
        },
    );
    for (path, status, code) in [
        ("manifests/endless", 502, "UNAVAILABLE"),
        ("manifests/broken", 503, "UNAVAILABLE"),
        (format!("blobs/{blob}").leak() as &str, 502, "UNAVAILABLE"),
        (format!("blobs/{huge}").leak() as &str, 502, "UNAVAILABLE"),
    ] {
        let got = fetch(&server.at(&format!("/v2/hostile/app/{path}")));
        assert!(got.took < PATIENCE, "{path}: held for {:?}", got.took);
        assert_eq!((got.status, got.code().as_str()), (status, code), "{path}");
    }
    assert_not_stored(&server, &blob);
    assert_not_stored(&server, &huge);
    let rss = common::peak_rss(server.pid());
    assert!(rss < 200 << 20, "peak RSS {} MiB", rss >> 20);
}

#[test]
fn a_stalled_body_releases_every_client_and_is_discarded() {
    let upstream = Hostile::start();
    let server = mirror(&upstream, "");
    let good = vec![3u8; 1 << 20];
    let digest = sha256(&good);
    upstream.reply(
        &blob_path(&digest),
        Reply::Stall {
            first: good[..1000].to_vec(),
            declared: good.len() as u64,
        },
    );
    let url = server.at(&format!("/v2/hostile/app/blobs/{digest}"));
    let gots = block_on(futures::future::join_all(
        (0..4).map(|_| fetch_async(url.clone(), None)),
    ));
    for got in &gots {
        assert!(
            got.took < Duration::from_secs(10),
            "held for {:?}",
            got.took
        );
        assert_refused(got, good.len());
    }
    assert_eq!(upstream.count("GET", &digest), 1, "the fill is shared");
    assert_not_stored(&server, &digest);
    // An upstream that never answers at all.
    upstream.reply(&blob_path(&digest), Reply::Silent);
    upstream.reply("/v2/app/manifests/silent", Reply::Silent);
    let gots = block_on(futures::future::join_all([
        fetch_async(url.clone(), None),
        fetch_async(url.clone(), None),
        fetch_async(
            server.at("/v2/hostile/app/manifests/silent"),
            Some(OCI_MANIFEST),
        ),
    ]));
    for got in &gots {
        assert!(
            got.took < Duration::from_secs(10),
            "held for {:?}",
            got.took
        );
        assert_eq!((got.status, got.code().as_str()), (503, "UNAVAILABLE"));
    }
    upstream.reply(&blob_path(&digest), Reply::ok(&good, &[]));
    let got = fetch(&url);
    assert_eq!(
        (got.status, got.complete, got.body == good),
        (200, true, true)
    );
}

#[test]
fn a_connection_cut_mid_body_stores_nothing_and_is_retried() {
    let upstream = Hostile::start();
    let server = mirror(&upstream, "");
    let good = vec![5u8; 1 << 20];
    let digest = sha256(&good);
    upstream.reply(
        &blob_path(&digest),
        Reply::Reset {
            first: good[..4096].to_vec(),
            declared: good.len() as u64,
        },
    );
    let url = server.at(&format!("/v2/hostile/app/blobs/{digest}"));
    assert_refused(&fetch(&url), good.len());
    assert_not_stored(&server, &digest);
    // A 5xx is the upstream's outage, said as such.
    upstream.reply(&blob_path(&digest), Reply::status(502, &[]));
    let got = fetch(&url);
    assert_eq!((got.status, got.code().as_str()), (503, "UNAVAILABLE"));
    upstream.reply(&blob_path(&digest), Reply::ok(&good, &[]));
    let got = fetch(&url);
    assert_eq!((got.status, got.body == good), (200, true));
}

#[test]
fn redirects_are_followed_to_storage_but_not_in_loops_or_off_http() {
    let upstream = Hostile::start();
    let storage = Hostile::start();
    let server = mirror(&upstream, "");
    // Basic auth everywhere on the registry: the credentials must stay on its host.
    let good = vec![9u8; 100_000];
    let digest = sha256(&good);
    upstream.reply(
        "/v2/",
        Reply::status(401, &[("www-authenticate", "Basic realm=\"r\"")]),
    );
    upstream.reply(
        &blob_path(&digest),
        Reply::redirect(307, &format!("{}/bucket/{digest}?sig=x", storage.url)),
    );
    storage.reply(&format!("/bucket/{digest}"), Reply::ok(&good, &[]));
    let got = fetch(&server.at(&format!("/v2/hostile/app/blobs/{digest}")));
    assert_eq!((got.status, got.body == good), (200, true), "{got:?}");
    let at_storage = storage.seen("/bucket/");
    assert_eq!(at_storage.len(), 1);
    assert_eq!(
        at_storage[0].authorization, None,
        "credentials sent to storage"
    );

    let looping = sha256(b"loop");
    upstream.reply(
        &blob_path(&looping),
        Reply::redirect(302, &blob_path(&looping)),
    );
    let scheme = sha256(b"scheme");
    upstream.reply(
        &blob_path(&scheme),
        Reply::redirect(307, "file:///etc/passwd"),
    );
    for digest in [&looping, &scheme] {
        let got = fetch(&server.at(&format!("/v2/hostile/app/blobs/{digest}")));
        assert!(got.took < PATIENCE);
        assert_eq!(
            (got.status, got.code().as_str()),
            (503, "UNAVAILABLE"),
            "{got:?}"
        );
        assert_not_stored(&server, digest);
    }
    assert!(
        upstream.count("GET", &looping) <= 11,
        "redirects are bounded"
    );
}

#[test]
fn challenges_that_never_end_or_answer_garbage_are_bounded() {
    let upstream = Hostile::start();
    let server = mirror(&upstream, "");
    let realm = format!("{}/token", upstream.url);
    let challenge = format!("Bearer realm=\"{realm}\",service=\"hostile\"");
    // Every token is refused again.
    upstream.reply(
        "/v2/app/manifests/loop",
        Reply::status(401, &[("www-authenticate", &challenge)]),
    );
    upstream.reply("/token", Reply::ok(br#"{"token":"t"}"#, &[]));
    let got = fetch(&server.at("/v2/hostile/app/manifests/loop"));
    assert_eq!(got.status, 403, "{got:?}");
    assert_eq!(got.code(), "DENIED");
    assert!(upstream.count("GET", "manifests/loop") <= 2);
    // The token endpoint answers garbage, or without end.
    let garbage = format!(
        "Bearer realm=\"{}/garbage\",service=\"hostile\"",
        upstream.url
    );
    upstream.reply(
        "/v2/app/manifests/garbage",
        Reply::status(401, &[("www-authenticate", &garbage)]),
    );
    upstream.reply("/garbage", Reply::ok(b"<html>not json", &[]));
    let flood = format!(
        "Bearer realm=\"{}/flood\",service=\"hostile\"",
        upstream.url
    );
    upstream.reply(
        "/v2/app/manifests/flood",
        Reply::status(401, &[("www-authenticate", &flood)]),
    );
    upstream.reply(
        "/flood",
        Reply::Endless {
            status: 200,
            headers: Vec::new(),
            declared: None,
        },
    );
    for tag in ["garbage", "flood"] {
        let got = fetch(&server.at(&format!("/v2/hostile/app/manifests/{tag}")));
        assert!(got.took < PATIENCE, "{tag}: held for {:?}", got.took);
        assert_eq!(
            (got.status, got.code().as_str()),
            (503, "UNAVAILABLE"),
            "{tag}"
        );
    }
    // A realm that is not http(s) gets nothing.
    upstream.reply(
        "/v2/app/manifests/scheme",
        Reply::status(
            401,
            &[(
                "www-authenticate",
                "Bearer realm=\"file:///etc/passwd\",service=\"x\"",
            )],
        ),
    );
    let got = fetch(&server.at("/v2/hostile/app/manifests/scheme"));
    assert_eq!((got.status, got.code().as_str()), (503, "UNAVAILABLE"));
    let rss = common::peak_rss(server.pid());
    assert!(rss < 200 << 20, "peak RSS {} MiB", rss >> 20);
}

#[test]
fn credentials_go_to_the_upstreams_own_token_realm_only() {
    let upstream = Hostile::start();
    let elsewhere = Hostile::start();
    let server = mirror(&upstream, "");
    for (tag, realm) in [
        ("own", format!("{}/token", upstream.url)),
        ("foreign", format!("{}/token", elsewhere.url)),
    ] {
        let challenge = format!("Bearer realm=\"{realm}\",service=\"hostile\"");
        upstream.reply(
            &format!("/v2/app/manifests/{tag}"),
            Reply::status(401, &[("www-authenticate", &challenge)]),
        );
    }
    let token = Reply::ok(br#"{"token":"t"}"#, &[]);
    upstream.reply("/token", token.clone());
    elsewhere.reply("/token", token);
    fetch(&server.at("/v2/hostile/app/manifests/own"));
    fetch(&server.at("/v2/hostile/app/manifests/foreign"));
    let own = upstream.seen("/token");
    assert!(
        own[0]
            .authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Basic ")),
        "{own:?}"
    );
    let foreign = elsewhere.seen("/token");
    assert_eq!(
        foreign.len(),
        1,
        "the token is still asked for, anonymously"
    );
    assert_eq!(
        foreign[0].authorization, None,
        "credentials sent off the upstream's site"
    );
}

#[test]
fn what_was_cached_is_served_when_the_upstream_is_gone() {
    let upstream = Hostile::start();
    let server = mirror(&upstream, "");
    let blob = vec![1u8; 10_000];
    let digest = sha256(&blob);
    upstream.reply(&blob_path(&digest), Reply::ok(&blob, &[]));
    assert_eq!(
        fetch(&server.at(&format!("/v2/hostile/app/blobs/{digest}"))).status,
        200
    );
    drop(upstream);
    let got = fetch(&server.at(&format!("/v2/hostile/app/blobs/{digest}")));
    assert_eq!((got.status, got.body == blob), (200, true));
    let missing = fetch(&server.at(&format!("/v2/hostile/app/blobs/{}", sha256(b"x"))));
    assert_eq!(
        (missing.status, missing.code().as_str()),
        (503, "UNAVAILABLE")
    );
}

#[test]
fn an_edge_refuses_what_its_centre_gets_wrong() {
    let centre = Hostile::start();
    let edge = serve(&centre, "", "");
    let good = vec![4u8; 200_000];
    let digest = sha256(&good);
    let mut bad = good.clone();
    bad[0] ^= 1;
    centre.reply(&blob_path(&digest), Reply::ok(&bad, &[]));
    let url = edge.at(&format!("/v2/app/blobs/{digest}"));
    assert_refused(&fetch(&url), good.len());
    assert_not_stored(&edge, &digest);
    let manifest = sha256(b"a manifest");
    centre.reply(
        &format!("/v2/app/manifests/{manifest}"),
        Reply::ok(b"{}", &[("content-type", OCI_MANIFEST)]),
    );
    let got = fetch(&edge.at(&format!("/v2/app/manifests/{manifest}")));
    assert_eq!((got.status, got.code().as_str()), (502, "UNAVAILABLE"));
    centre.reply(
        "/v2/app/manifests/latest",
        Reply::Endless {
            status: 503,
            headers: Vec::new(),
            declared: None,
        },
    );
    let got = fetch(&edge.at("/v2/app/manifests/latest"));
    assert_eq!((got.status, got.code().as_str()), (503, "UNAVAILABLE"));
    centre.reply(&blob_path(&digest), Reply::ok(&good, &[]));
    let got = fetch(&url);
    assert_eq!((got.status, got.body == good), (200, true));
}

#[test]
fn a_moved_tag_whose_new_bytes_lie_keeps_the_verified_copy() {
    let centre = Hostile::start();
    let edge = serve(&centre, "", "");
    let digest = sha256(MANIFEST);
    let ct = ("content-type", OCI_MANIFEST);
    centre.reply(
        "/v2/app/manifests/v1",
        Reply::ok(MANIFEST, &[ct, ("docker-content-digest", &digest)]),
    );
    let url = edge.at("/v2/app/manifests/v1");
    assert_eq!(fetch(&url).status, 200);
    // The tag moved, to bytes that are not what the centre names.
    let moved = sha256(b"moved");
    centre.reply(
        "/v2/app/manifests/v1",
        Reply::ok(
            b"{\"schemaVersion\":2}",
            &[ct, ("docker-content-digest", &moved)],
        ),
    );
    let got = block_on(async {
        reqwest::Client::new()
            .get(&url)
            .header("accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap()
    });
    assert_eq!(got.status(), 200);
    assert!(got.headers().contains_key("warning"), "{:?}", got.headers());
    let body = block_on(got.bytes()).unwrap();
    assert_eq!(sha256(&body), digest);
}

#[test]
fn a_blob_head_without_a_length_is_not_answered_as_empty() {
    let upstream = Hostile::start();
    let server = mirror(&upstream, "");
    let digest = sha256(b"unsized");
    upstream.reply(
        &blob_path(&digest),
        Reply::Endless {
            status: 200,
            headers: Vec::new(),
            declared: None,
        },
    );
    let status = block_on(async {
        let url = server.at(&format!("/v2/hostile/app/blobs/{digest}"));
        reqwest::Client::new()
            .head(url)
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 502);
}
