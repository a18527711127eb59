//! OCI distribution conformance, category "Content Management": deleting manifests,
//! tags and blobs, and what reads answer afterwards. Also the hostile-input checks every
//! category relies on: traversal attempts stay inside the data directory, and no bad
//! request gets a 5xx, hangs, or disturbs stored content.
//! Written from the spec: <https://github.com/opencontainers/distribution-spec/blob/main/spec.md#content-management>.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;
mod conformance_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Server, digest_of};
use conformance_support::*;
use reqwest::Method;
use serde_json::json;

async fn tags_of(api: &Api, repo: &str) -> serde_json::Value {
    json_ok(api.get(&format!("/v2/{repo}/tags/list")).await).await["tags"].clone()
}

#[tokio::test]
async fn delete_manifest_by_digest_is_202_then_it_and_its_tags_are_gone() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "mgmt/manifest";
    let image = api.push_image(repo, "v1", 50).await;
    api.push_manifest(repo, "latest", OCI_MANIFEST, &image.manifest)
        .await;
    let other = api.push_image(repo, "other", 51).await;

    let resp = api
        .delete(&format!("/v2/{repo}/manifests/{}", image.digest))
        .await;
    expect_status(&resp, 202);

    for reference in [image.digest.as_str(), "v1", "latest"] {
        let path = format!("/v2/{repo}/manifests/{reference}");
        expect_error(api.get(&path).await, 404, "MANIFEST_UNKNOWN").await;
        expect_status(&api.head(&path).await, 404);
    }
    assert_eq!(tags_of(&api, repo).await, json!(["other"]));
    let got = api.get(&format!("/v2/{repo}/manifests/other")).await;
    assert_eq!(got.bytes().await.unwrap().to_vec(), other.manifest);

    let again = api
        .delete(&format!("/v2/{repo}/manifests/{}", image.digest))
        .await;
    expect_error(again, 404, "MANIFEST_UNKNOWN").await;
    // It can be pushed again.
    api.push_manifest(repo, "v1", OCI_MANIFEST, &image.manifest)
        .await;
    let got = api.get(&format!("/v2/{repo}/manifests/v1")).await;
    assert_eq!(got.bytes().await.unwrap().to_vec(), image.manifest);
}

#[tokio::test]
async fn delete_tag_removes_only_that_tag() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "mgmt/tag";
    let image = api.push_image(repo, "v1", 52).await;
    api.push_manifest(repo, "v2", OCI_MANIFEST, &image.manifest)
        .await;

    expect_status(&api.delete(&format!("/v2/{repo}/manifests/v1")).await, 202);
    expect_error(
        api.get(&format!("/v2/{repo}/manifests/v1")).await,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await;
    for reference in ["v2", image.digest.as_str()] {
        let got = api.get(&format!("/v2/{repo}/manifests/{reference}")).await;
        expect_status(&got, 200);
        assert_eq!(got.bytes().await.unwrap().to_vec(), image.manifest);
    }
    assert_eq!(tags_of(&api, repo).await, json!(["v2"]));
    expect_error(
        api.delete(&format!("/v2/{repo}/manifests/v1")).await,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await;
    // Deleting the last tag leaves an existing, empty repository.
    expect_status(&api.delete(&format!("/v2/{repo}/manifests/v2")).await, 202);
    assert_eq!(tags_of(&api, repo).await, json!([]));
}

#[tokio::test]
async fn delete_blob_is_202_then_the_blob_is_404() {
    let server = Server::start();
    let api = Api::new(&server);
    let bytes = pseudo_random(53, 0, 2000);
    let digest = api.push_blob("mgmt/blob", &bytes).await;
    // The same content mounted elsewhere is unaffected.
    let mount = api
        .request(
            Method::POST,
            &format!("/v2/mgmt/keep/blobs/uploads/?mount={digest}&from=mgmt/blob"),
        )
        .send()
        .await
        .unwrap();
    expect_status(&mount, 201);

    let path = format!("/v2/mgmt/blob/blobs/{digest}");
    expect_status(&api.delete(&path).await, 202);
    expect_error(api.get(&path).await, 404, "BLOB_UNKNOWN").await;
    expect_status(&api.head(&path).await, 404);
    expect_error(api.delete(&path).await, 404, "BLOB_UNKNOWN").await;

    let kept = api.get(&format!("/v2/mgmt/keep/blobs/{digest}")).await;
    expect_status(&kept, 200);
    assert_eq!(kept.bytes().await.unwrap().to_vec(), bytes);
    // And it can be pushed again.
    api.push_blob("mgmt/blob", &bytes).await;
    let got = api.get(&path).await;
    assert_eq!(got.bytes().await.unwrap().to_vec(), bytes);
}

#[tokio::test]
async fn blobs_deleted_before_their_manifest_leave_the_manifest_deletable() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "mgmt/order";
    let image = api.push_image(repo, "v1", 54).await;
    // The upstream suite's default teardown order: blobs first, then the manifest.
    for blob in std::iter::once(&image.config).chain(&image.layers) {
        let resp = api
            .delete(&format!("/v2/{repo}/blobs/{}", blob.digest))
            .await;
        expect_status(&resp, 202);
    }
    let resp = api
        .delete(&format!("/v2/{repo}/manifests/{}", image.digest))
        .await;
    expect_status(&resp, 202);
    expect_status(&api.get(&format!("/v2/{repo}/manifests/v1")).await, 404);
}

#[tokio::test]
async fn deleting_unknown_content_is_404_with_its_error_code() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "mgmt/unknown";
    api.push_image(repo, "v1", 55).await;
    for r in ["mgmt/unknown", "mgmt/never-pushed"] {
        let resp = api
            .delete(&format!("/v2/{r}/manifests/{ABSENT_DIGEST}"))
            .await;
        expect_error(resp, 404, "MANIFEST_UNKNOWN").await;
        let resp = api.delete(&format!("/v2/{r}/manifests/no-such-tag")).await;
        expect_error(resp, 404, "MANIFEST_UNKNOWN").await;
        let resp = api.delete(&format!("/v2/{r}/blobs/{ABSENT_DIGEST}")).await;
        expect_error(resp, 404, "BLOB_UNKNOWN").await;
    }
    let resp = api.delete(&format!("/v2/{repo}/blobs/sha256:nothex")).await;
    expect_error(resp, 400, "DIGEST_INVALID").await;
    let resp = api
        .delete(&format!("/v2/{repo}/manifests/sha256:nothex"))
        .await;
    expect_error(resp, 400, "DIGEST_INVALID").await;
    let resp = api.delete("/v2/Bad/Name/manifests/v1").await;
    expect_error(resp, 400, "NAME_INVALID").await;
}

#[tokio::test]
async fn deleted_referrer_leaves_the_referrers_list() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "mgmt/refs";
    let image = api.push_image(repo, "v1", 56).await;
    let config = descriptor(OCI_EMPTY, b"{}");
    api.push_blob(repo, &config.bytes).await;
    let mut digests = Vec::new();
    for kind in ["one", "two"] {
        let body = image_manifest(
            OCI_MANIFEST,
            &config,
            &[],
            Some(json!({
                "artifactType": "application/vnd.example.note",
                "subject": manifest_descriptor(OCI_MANIFEST, &image.manifest),
                "annotations": { "kind": kind },
            })),
        );
        digests.push(
            api.push_manifest(repo, &digest_of(&body), OCI_MANIFEST, &body)
                .await,
        );
    }
    let listed = |index: serde_json::Value| -> Vec<String> {
        let mut d: Vec<String> = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["digest"].as_str().unwrap().to_owned())
            .collect();
        d.sort();
        d
    };
    let path = format!("/v2/{repo}/referrers/{}", image.digest);
    let mut expected = digests.clone();
    expected.sort();
    assert_eq!(listed(json_ok(api.get(&path).await).await), expected);

    expect_status(
        &api.delete(&format!("/v2/{repo}/manifests/{}", digests[0]))
            .await,
        202,
    );
    assert_eq!(
        listed(json_ok(api.get(&path).await).await),
        vec![digests[1].clone()]
    );
}

/// Every file and directory under `root`, relative to it.
fn tree(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(root).unwrap().to_owned());
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn percent_encoded_traversal_attempts_never_touch_files_outside_the_data_dir() {
    let server = Server::start();
    let api = Api::new(&server);
    let image = api.push_image("mgmt/safe", "v1", 57).await;
    let location = api.start_upload("mgmt/safe").await;
    let outside = server.data_dir().parent().unwrap().to_owned();
    std::fs::write(outside.join("secret"), b"do not touch").unwrap();
    std::fs::write(server.data_dir().join("canary"), b"inside").unwrap();
    let before_outside = tree(&outside);
    let before_inside = tree(server.data_dir());

    let d = digest_of(b"escape");
    let targets = [
        "/v2/mgmt/safe/blobs/uploads/..%2F..%2Fsecret".to_owned(),
        "/v2/mgmt/safe/blobs/uploads/%2e%2e%2f%2e%2e%2fsecret".to_owned(),
        "/v2/mgmt/safe/blobs/uploads/%2E%2E/%2E%2E/secret".to_owned(),
        "/v2/mgmt/safe/blobs/uploads/../../../secret".to_owned(),
        "/v2/mgmt/safe/blobs/uploads/..%2F..%2Fcanary".to_owned(),
        "/v2/mgmt/safe/blobs/uploads/..%252F..%252Fsecret".to_owned(),
        "/v2/mgmt/safe/blobs/uploads/%2Fetc%2Fpasswd".to_owned(),
        "/v2/mgmt/safe/blobs/uploads/%00".to_owned(),
        "/v2/mgmt/safe/blobs/uploads/..%5C..%5Csecret".to_owned(),
        "/v2/..%2F..%2Fsecret/blobs/uploads/".to_owned(),
        "/v2/%2e%2e/%2e%2e/secret/tags/list".to_owned(),
        "/v2/mgmt/safe/blobs/sha256:..%2F..%2F..%2Fsecret".to_owned(),
        "/v2/mgmt/safe/blobs/sha256%3A..%2F..%2Fsecret".to_owned(),
        "/v2/mgmt/safe/blobs/sha256%3A%2E%2E%2F%2E%2E%2Fsecret".to_owned(),
        "/v2/mgmt/safe/manifests/..%2F..%2Fsecret".to_owned(),
        "/v2/mgmt/safe/manifests/%2E%2E".to_owned(),
        "/v2/mgmt/safe/referrers/..%2Fsecret".to_owned(),
        "/v2/mgmt/%ff%fe/tags/list".to_owned(),
        "/v2/mgmt/safe%2F..%2F..%2Fsecret/tags/list".to_owned(),
        format!("/v2/mgmt/safe/blobs/uploads/..%2F..%2Fsecret?digest={d}"),
        "/v2/mgmt/safe/blobs/uploads/?mount=..%2F..%2Fsecret&from=mgmt/safe".to_owned(),
        "/v2/mgmt/safe/blobs/uploads/?digest=sha256:..%2F..%2Fsecret".to_owned(),
    ];
    for target in &targets {
        for method in ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE"] {
            let resp = raw_request(&server.host, method, target, b"escape").await;
            // A mount that cannot be done starts an upload session instead (cancelled
            // here, so that the tree is compared as it was).
            if method == "POST" && target.contains("?mount=") && resp.status == 202 {
                let (_, session) = resp
                    .headers
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case("location"))
                    .unwrap();
                expect_status(
                    &api.request(Method::DELETE, session).send().await.unwrap(),
                    204,
                );
                continue;
            }
            assert!(
                (400..500).contains(&resp.status),
                "{method} {target} answered {}",
                resp.status
            );
            if method != "HEAD" {
                let body: serde_json::Value = serde_json::from_slice(&resp.body)
                    .unwrap_or_else(|e| panic!("{method} {target}: not JSON ({e})"));
                assert!(body["errors"][0]["code"].is_string(), "{method} {target}");
            }
        }
    }

    assert_eq!(
        std::fs::read(outside.join("secret")).unwrap(),
        b"do not touch"
    );
    assert_eq!(
        std::fs::read(server.data_dir().join("canary")).unwrap(),
        b"inside"
    );
    assert_eq!(
        tree(&outside),
        before_outside,
        "nothing created or removed outside"
    );
    assert_eq!(
        tree(server.data_dir()),
        before_inside,
        "no new files inside"
    );
    // Stored content and the open session are intact.
    let got = api.get("/v2/mgmt/safe/manifests/v1").await;
    assert_eq!(got.bytes().await.unwrap().to_vec(), image.manifest);
    expect_status(&api.get(&location).await, 204);
}

#[tokio::test]
async fn bad_requests_never_get_a_5xx_or_hang_and_stored_content_survives() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "mgmt/robust";
    let image = api.push_image(repo, "v1", 58).await;
    let partial = pseudo_random(58, 9, 3000);
    let location = api.start_upload(repo).await;
    let first = api
        .request(Method::PATCH, &location)
        .header("content-range", "0-999")
        .body(partial[..1000].to_vec())
        .send()
        .await
        .unwrap();
    expect_status(&first, 202);
    let layer = image.layers[0].digest.clone();
    let long_tag = "t".repeat(129);
    let long_name = "a/".repeat(200);

    type Case = (Method, String, Vec<(&'static str, String)>, Vec<u8>);
    let mut cases: Vec<Case> = Vec::new();
    let mut add = |m: Method, p: String, h: Vec<(&'static str, String)>, b: &[u8]| {
        cases.push((m, p, h, b.to_vec()));
    };
    // Garbage Content-Range values on an open upload.
    for range in [
        "bytes=abc",
        "5-2",
        "-",
        "0-",
        "1000-99999999999999999999999",
        "1000-1009, 1010-1019",
        "1000-2000",
    ] {
        add(
            Method::PATCH,
            location.clone(),
            vec![("content-range", range.to_owned())],
            &[1u8; 10],
        );
    }
    // Odd queries.
    for query in [
        "?n=99999999999999999999999",
        "?n=%zz",
        "?last=%ff%fe",
        "?n=1&n=2",
        "?last=../../etc",
    ] {
        add(
            Method::GET,
            format!("/v2/{repo}/tags/list{query}"),
            vec![],
            b"",
        );
        add(Method::GET, format!("/v2/_catalog{query}"), vec![], b"");
    }
    add(
        Method::POST,
        format!("/v2/{repo}/blobs/uploads/?mount="),
        vec![],
        b"",
    );
    add(
        Method::POST,
        format!("/v2/{repo}/blobs/uploads/?digest="),
        vec![],
        b"x",
    );
    add(
        Method::POST,
        format!("/v2/{repo}/blobs/uploads/?digest=a&digest=b"),
        vec![],
        b"x",
    );
    add(
        Method::PUT,
        with_query(&location, "digest", "sha256:%zz"),
        vec![],
        b"",
    );
    // Bad manifest references and bodies.
    add(
        Method::PUT,
        format!("/v2/{repo}/manifests/{long_tag}"),
        vec![("content-type", OCI_MANIFEST.to_owned())],
        &image.manifest,
    );
    add(
        Method::PUT,
        format!("/v2/{repo}/manifests/-leading-dash"),
        vec![("content-type", OCI_MANIFEST.to_owned())],
        &image.manifest,
    );
    add(
        Method::PUT,
        format!("/v2/{repo}/manifests/v1"),
        vec![("content-type", "application/json; charset=%%%".to_owned())],
        b"\xff\xfe\x00garbage",
    );
    add(
        Method::PUT,
        format!("/v2/{repo}/manifests/v1"),
        vec![("content-type", OCI_MANIFEST.to_owned())],
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"x","digest":"sha256:abc","size":-1},"layers":null}"#,
    );
    add(
        Method::PUT,
        format!("/v2/{repo}/manifests/v1"),
        vec![("content-type", OCI_MANIFEST.to_owned())],
        format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).as_bytes(),
    );
    // Odd range headers on a blob read (multi-range may be served whole).
    for range in [
        "bytes=0-1,5-6",
        "bytes=abc",
        "bytes=99999999999999999999-",
        "lines=1-2",
    ] {
        add(
            Method::GET,
            format!("/v2/{repo}/blobs/{layer}"),
            vec![("range", range.to_owned())],
            b"",
        );
    }
    add(
        Method::GET,
        format!("/v2/{repo}/manifests/v1"),
        vec![("accept", ",,;q=;,*/".to_owned())],
        b"",
    );
    add(
        Method::GET,
        format!("/v2/{long_name}x/tags/list"),
        vec![],
        b"",
    );
    add(Method::GET, "/v2/_catalog/extra".to_owned(), vec![], b"");
    add(Method::GET, "/v3/".to_owned(), vec![], b"");
    add(Method::GET, "/".to_owned(), vec![], b"");
    add(
        Method::from_bytes(b"BREW").unwrap(),
        format!("/v2/{repo}/manifests/v1"),
        vec![],
        b"",
    );
    add(
        Method::OPTIONS,
        format!("/v2/{repo}/manifests/v1"),
        vec![],
        b"",
    );

    for (method, path, headers, body) in cases {
        let mut req = api.request(method.clone(), &path).body(body);
        for (name, value) in headers {
            req = req.header(name, value);
        }
        let resp = tokio::time::timeout(Duration::from_secs(10), req.send())
            .await
            .unwrap_or_else(|_| panic!("{method} {path} hung"))
            .unwrap();
        let status = resp.status().as_u16();
        assert!(status < 500, "{method} {path} answered {status}");
        if status >= 400 && method != Method::HEAD {
            let text = resp.text().await.unwrap();
            let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
                panic!("{method} {path}: {status} body not JSON ({e}): {text}")
            });
            let code = value["errors"][0]["code"].as_str().unwrap_or("");
            assert!(
                !code.is_empty() && code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{method} {path}: code {code:?}"
            );
        }
    }

    // Raw request lines no URL library would send.
    for line in [
        "GET /v2/../../etc/passwd".to_owned(),
        "GET /v2/mgmt/robust/manifests/v1?x=%".to_owned(),
        "GET //v2//mgmt//robust//tags//list".to_owned(),
        format!("GET /v2/{}", "a/".repeat(3000)),
        "PATCH /v2/mgmt/robust/blobs/uploads/".to_owned(),
    ] {
        let (method, target) = line.split_once(' ').unwrap();
        let resp = raw_request(&server.host, method, target, b"").await;
        assert!(resp.status < 500, "{line} answered {}", resp.status);
    }

    // Everything stored reads back byte for byte, and the open upload goes on.
    for reference in ["v1", image.digest.as_str()] {
        let got = api.get(&format!("/v2/{repo}/manifests/{reference}")).await;
        expect_status(&got, 200);
        assert_eq!(got.bytes().await.unwrap().to_vec(), image.manifest);
    }
    for blob in std::iter::once(&image.config).chain(&image.layers) {
        let got = api.get(&format!("/v2/{repo}/blobs/{}", blob.digest)).await;
        expect_status(&got, 200);
        assert_eq!(got.bytes().await.unwrap().to_vec(), blob.bytes);
    }
    assert_eq!(tags_of(&api, repo).await, json!(["v1"]));
    let status = api.get(&location).await;
    expect_status(&status, 204);
    assert_eq!(
        header(&status, "range"),
        "0-999",
        "rejected chunks left no trace"
    );
    let put = api
        .request(
            Method::PUT,
            &with_query(&location, "digest", &digest_of(&partial)),
        )
        .header("content-range", "1000-2999")
        .body(partial[1000..].to_vec())
        .send()
        .await
        .unwrap();
    expect_status(&put, 201);
    let got = api
        .get(&format!("/v2/{repo}/blobs/{}", digest_of(&partial)))
        .await;
    assert_eq!(got.bytes().await.unwrap().to_vec(), partial);
}
