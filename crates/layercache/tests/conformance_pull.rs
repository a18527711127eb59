//! OCI distribution conformance, category "Pull": blobs and manifests by `GET`/`HEAD`,
//! by tag and by digest, ranges, `Accept` negotiation, every manifest shape a build cache
//! stores (Docker schema 2 and manifest list, OCI manifest and index, BuildKit cache
//! exports), and the request-validation errors every route shares.
//! Written from the spec: <https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pull>.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;
mod conformance_support;

use common::{Server, digest_of};
use conformance_support::*;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn api_version_check_answers_200_with_the_distribution_header() {
    let server = Server::start();
    let api = Api::new(&server);
    for path in ["/v2/", "/v2"] {
        for method in [Method::GET, Method::HEAD] {
            let resp = api.request(method, path).send().await.unwrap();
            expect_status(&resp, 200);
            assert_eq!(
                header(&resp, "docker-distribution-api-version"),
                "registry/2.0"
            );
        }
    }
}

#[tokio::test]
async fn blob_get_and_head_answer_content_length_digest_and_type() {
    let server = Server::start();
    let api = Api::new(&server);
    let bytes = pseudo_random(1, 0, 4321);
    let digest = api.push_blob("pull/blob", &bytes).await;

    let got = api.get(&format!("/v2/pull/blob/blobs/{digest}")).await;
    expect_status(&got, 200);
    assert_eq!(header(&got, "content-length"), "4321");
    assert_eq!(header(&got, "docker-content-digest"), digest);
    assert_eq!(header(&got, "content-type"), "application/octet-stream");
    assert_eq!(got.bytes().await.unwrap().to_vec(), bytes);

    let head = api.head(&format!("/v2/pull/blob/blobs/{digest}")).await;
    expect_status(&head, 200);
    assert_eq!(header(&head, "content-length"), "4321");
    assert_eq!(header(&head, "docker-content-digest"), digest);
    assert!(head.bytes().await.unwrap().is_empty(), "HEAD has no body");
}

#[tokio::test]
async fn empty_blob_is_served_with_zero_length() {
    let server = Server::start();
    let api = Api::new(&server);
    let digest = api.push_blob("pull/empty", b"").await;
    let got = api.get(&format!("/v2/pull/empty/blobs/{digest}")).await;
    expect_status(&got, 200);
    assert_eq!(header(&got, "content-length"), "0");
    assert!(got.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn unknown_blob_is_404_blob_unknown_for_get_and_head() {
    let server = Server::start();
    let api = Api::new(&server);
    api.push_blob("pull/known", b"something").await;
    for repo in ["pull/known", "pull/never-pushed"] {
        let path = format!("/v2/{repo}/blobs/{ABSENT_DIGEST}");
        expect_error(api.get(&path).await, 404, "BLOB_UNKNOWN").await;
        let head = api.head(&path).await;
        expect_status(&head, 404);
        assert!(head.bytes().await.unwrap().is_empty(), "HEAD has no body");
    }
}

#[tokio::test]
async fn blob_pushed_to_one_repository_is_unknown_in_another() {
    let server = Server::start();
    let api = Api::new(&server);
    let digest = api.push_blob("team/a", b"private to a").await;
    let resp = api.get(&format!("/v2/team/b/blobs/{digest}")).await;
    expect_error(resp, 404, "BLOB_UNKNOWN").await;
    expect_status(&api.head(&format!("/v2/team/b/blobs/{digest}")).await, 404);
}

#[tokio::test]
async fn blob_range_requests_answer_206_with_content_range() {
    let server = Server::start();
    let api = Api::new(&server);
    let bytes = pseudo_random(2, 0, 100);
    let digest = api.push_blob("pull/range", &bytes).await;
    let path = format!("/v2/pull/range/blobs/{digest}");
    for (range, start, end) in [
        ("bytes=0-9", 0usize, 9usize),
        ("bytes=10-", 10, 99),
        ("bytes=-5", 95, 99),
        ("bytes=95-200", 95, 99),
        ("bytes=42-42", 42, 42),
    ] {
        let resp = api.get_with(&path, "range", range).await;
        expect_status(&resp, 206);
        assert_eq!(
            header(&resp, "content-range"),
            format!("bytes {start}-{end}/100"),
            "{range}"
        );
        assert_eq!(
            header(&resp, "content-length"),
            (end - start + 1).to_string()
        );
        assert_eq!(header(&resp, "docker-content-digest"), digest);
        assert_eq!(
            resp.bytes().await.unwrap().to_vec(),
            bytes[start..=end].to_vec(),
            "{range}"
        );
    }
}

#[tokio::test]
async fn a_range_of_another_unit_or_malformed_is_ignored() {
    let server = Server::start();
    let api = Api::new(&server);
    let bytes = pseudo_random(3, 1, 100);
    let digest = api.push_blob("pull/range", &bytes).await;
    for range in ["items=0-5", "bytes=-1-5", "bytes=a-b"] {
        let resp = api
            .get_with(&format!("/v2/pull/range/blobs/{digest}"), "range", range)
            .await;
        expect_status(&resp, 200);
        assert_eq!(resp.bytes().await.unwrap().to_vec(), bytes, "{range}");
    }
}

#[tokio::test]
async fn unsatisfiable_blob_range_is_416_with_content_range_of_the_size() {
    let server = Server::start();
    let api = Api::new(&server);
    let digest = api.push_blob("pull/range", &pseudo_random(3, 0, 100)).await;
    for range in ["bytes=100-", "bytes=500-600", "bytes=9-3", "bytes=-0"] {
        let resp = api
            .get_with(&format!("/v2/pull/range/blobs/{digest}"), "range", range)
            .await;
        assert_eq!(header(&resp, "content-range"), "bytes */100", "{range}");
        expect_error(resp, 416, "RANGE_INVALID").await;
    }
}

#[tokio::test]
async fn manifest_get_and_head_by_tag_and_digest_answer_the_pushed_bytes() {
    let server = Server::start();
    let api = Api::new(&server);
    let image = api.push_image("pull/manifest", "v1", 4).await;
    let len = image.manifest.len().to_string();
    for reference in ["v1", image.digest.as_str()] {
        let path = format!("/v2/pull/manifest/manifests/{reference}");
        let got = api.get_with(&path, "accept", OCI_MANIFEST).await;
        expect_status(&got, 200);
        assert_eq!(header(&got, "content-type"), OCI_MANIFEST);
        assert_eq!(header(&got, "content-length"), len);
        assert_eq!(header(&got, "docker-content-digest"), image.digest);
        assert_eq!(got.bytes().await.unwrap().to_vec(), image.manifest);

        let head = api
            .request(Method::HEAD, &path)
            .header("accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        expect_status(&head, 200);
        assert_eq!(header(&head, "content-type"), OCI_MANIFEST);
        assert_eq!(header(&head, "content-length"), len);
        assert_eq!(header(&head, "docker-content-digest"), image.digest);
        assert!(head.bytes().await.unwrap().is_empty(), "HEAD has no body");
    }
    // The blobs the manifest names are pullable by their digests.
    for blob in std::iter::once(&image.config).chain(&image.layers) {
        let got = api
            .get(&format!("/v2/pull/manifest/blobs/{}", blob.digest))
            .await;
        expect_status(&got, 200);
        assert_eq!(got.bytes().await.unwrap().to_vec(), blob.bytes);
    }
}

#[tokio::test]
async fn manifest_bytes_are_stored_and_served_without_reformatting() {
    let server = Server::start();
    let api = Api::new(&server);
    let config = descriptor(OCI_CONFIG, b"{}");
    api.push_blob("pull/verbatim", &config.bytes).await;
    // Unusual key order, indentation and a trailing newline must survive byte for byte.
    let body = format!(
        "{{\n    \"layers\": [],\n    \"config\": {{ \"size\": 2, \"digest\": \"{}\", \"mediaType\": \"{OCI_CONFIG}\" }},\n    \"mediaType\": \"{OCI_MANIFEST}\",\n    \"schemaVersion\": 2\n}}\n",
        config.digest
    );
    let digest = api
        .push_manifest("pull/verbatim", "v1", OCI_MANIFEST, body.as_bytes())
        .await;
    assert_eq!(digest, digest_of(body.as_bytes()));
    let got = api.get("/v2/pull/verbatim/manifests/v1").await;
    expect_status(&got, 200);
    assert_eq!(got.bytes().await.unwrap().to_vec(), body.as_bytes());
}

#[tokio::test]
async fn manifest_content_type_is_the_pushed_media_type_without_parameters() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "pull/content-type";
    let config = descriptor(OCI_CONFIG, b"{}");
    api.push_blob(repo, &config.bytes).await;

    // Parameters on the pushed Content-Type are ignored and never served back.
    let with_type = image_manifest(OCI_MANIFEST, &config, &[], None);
    let resp = api
        .put_manifest(
            repo,
            "params",
            &format!("{OCI_MANIFEST}; charset=utf-8"),
            &with_type,
        )
        .await;
    expect_status(&resp, 201);
    let got = api.get(&format!("/v2/{repo}/manifests/params")).await;
    assert_eq!(header(&got, "content-type"), OCI_MANIFEST);

    // Without a `mediaType` field the Content-Type of the push is what is served.
    let mut bare: serde_json::Value = serde_json::from_slice(&with_type).unwrap();
    bare.as_object_mut().unwrap().remove("mediaType");
    let bare = serde_json::to_vec(&bare).unwrap();
    api.push_manifest(repo, "bare", OCI_MANIFEST, &bare).await;
    let got = api.get(&format!("/v2/{repo}/manifests/bare")).await;
    expect_status(&got, 200);
    assert_eq!(header(&got, "content-type"), OCI_MANIFEST);
    assert_eq!(got.bytes().await.unwrap().to_vec(), bare);

    let bare_index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [manifest_descriptor(OCI_MANIFEST, &with_type)],
    }))
    .unwrap();
    api.push_manifest(repo, "bare-index", OCI_INDEX, &bare_index)
        .await;
    let got = api.get(&format!("/v2/{repo}/manifests/bare-index")).await;
    assert_eq!(header(&got, "content-type"), OCI_INDEX);
}

#[tokio::test]
async fn manifest_pushed_to_one_repository_is_unknown_in_another() {
    let server = Server::start();
    let api = Api::new(&server);
    let image = api.push_image("team/a", "v1", 14).await;
    for reference in ["v1", image.digest.as_str()] {
        let resp = api.get(&format!("/v2/team/b/manifests/{reference}")).await;
        expect_error(resp, 404, "MANIFEST_UNKNOWN").await;
    }
}

#[tokio::test]
async fn unknown_manifest_is_404_manifest_unknown_by_tag_and_digest() {
    let server = Server::start();
    let api = Api::new(&server);
    api.push_image("pull/known", "v1", 5).await;
    for repo in ["pull/known", "pull/never-pushed"] {
        // A name no tag can have is as unknown as any other (distribution-spec v1.1.1).
        for reference in ["nope", ABSENT_DIGEST, ".INVALID_MANIFEST_NAME"] {
            let path = format!("/v2/{repo}/manifests/{reference}");
            expect_error(api.get(&path).await, 404, "MANIFEST_UNKNOWN").await;
            expect_status(&api.head(&path).await, 404);
        }
    }
}

#[tokio::test]
async fn manifest_accept_negotiation_serves_admitted_types_and_refuses_others() {
    let server = Server::start();
    let api = Api::new(&server);
    let image = api.push_image("pull/accept", "v1", 6).await;
    let path = "/v2/pull/accept/manifests/v1";
    let buildkit_wide =
        format!("{DOCKER_MANIFEST}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX},*/*");
    let admitted = [
        None,
        Some(OCI_MANIFEST.to_owned()),
        Some(format!("{DOCKER_MANIFEST}, {OCI_MANIFEST};q=0.9")),
        Some(buildkit_wide),
        Some("*/*".to_owned()),
    ];
    for accept in admitted {
        for method in [Method::GET, Method::HEAD] {
            let mut req = api.request(method.clone(), path);
            if let Some(accept) = &accept {
                req = req.header("accept", accept);
            }
            let resp = req.send().await.unwrap();
            expect_status(&resp, 200);
            assert_eq!(header(&resp, "content-type"), OCI_MANIFEST, "{accept:?}");
            assert_eq!(header(&resp, "docker-content-digest"), image.digest);
        }
    }
    // Several Accept headers are one list.
    let resp = api
        .request(Method::GET, path)
        .header("accept", DOCKER_MANIFEST)
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    expect_status(&resp, 200);

    // A client that admits only Docker types must not be handed an OCI manifest.
    for accept in [
        DOCKER_MANIFEST,
        &format!("{DOCKER_MANIFEST}, {DOCKER_LIST}"),
    ] {
        let resp = api.get_with(path, "accept", accept).await;
        expect_error(resp, 404, "MANIFEST_UNKNOWN").await;
        let head = api
            .request(Method::HEAD, path)
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        expect_status(&head, 404);
    }
}

#[tokio::test]
async fn docker_schema2_manifest_round_trips_with_its_media_type() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "pull/docker";
    let config = descriptor(DOCKER_CONFIG, br#"{"architecture":"amd64","os":"linux"}"#);
    let layer = descriptor(DOCKER_LAYER, &pseudo_random(7, 0, 2048));
    api.push_blob(repo, &config.bytes).await;
    api.push_blob(repo, &layer.bytes).await;
    let manifest = image_manifest(DOCKER_MANIFEST, &config, &[layer], None);
    let digest = api
        .push_manifest(repo, "latest", DOCKER_MANIFEST, &manifest)
        .await;

    let got = api
        .get_with(
            &format!("/v2/{repo}/manifests/latest"),
            "accept",
            DOCKER_MANIFEST,
        )
        .await;
    expect_status(&got, 200);
    assert_eq!(header(&got, "content-type"), DOCKER_MANIFEST);
    assert_eq!(header(&got, "docker-content-digest"), digest);
    assert_eq!(got.bytes().await.unwrap().to_vec(), manifest);
}

#[tokio::test]
async fn docker_manifest_list_round_trips_over_its_platform_manifests() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "pull/docker-list";
    let mut children = Vec::new();
    for arch in ["amd64", "arm64"] {
        let config = descriptor(
            DOCKER_CONFIG,
            format!("{{\"architecture\":\"{arch}\",\"os\":\"linux\"}}").as_bytes(),
        );
        let layer = descriptor(DOCKER_LAYER, arch.as_bytes());
        api.push_blob(repo, &config.bytes).await;
        api.push_blob(repo, &layer.bytes).await;
        let manifest = image_manifest(DOCKER_MANIFEST, &config, &[layer], None);
        let digest = api
            .push_manifest(repo, &digest_of(&manifest), DOCKER_MANIFEST, &manifest)
            .await;
        let mut child = manifest_descriptor(DOCKER_MANIFEST, &manifest);
        child["platform"] = json!({ "architecture": arch, "os": "linux" });
        children.push((child, digest, manifest));
    }
    let descriptors: Vec<_> = children.iter().map(|c| c.0.clone()).collect();
    let list = index(DOCKER_LIST, &descriptors, None);
    let list_digest = api.push_manifest(repo, "multi", DOCKER_LIST, &list).await;

    let got = api
        .get_with(
            &format!("/v2/{repo}/manifests/multi"),
            "accept",
            &format!("{DOCKER_LIST}, {DOCKER_MANIFEST}"),
        )
        .await;
    expect_status(&got, 200);
    assert_eq!(header(&got, "content-type"), DOCKER_LIST);
    assert_eq!(header(&got, "docker-content-digest"), list_digest);
    assert_eq!(got.bytes().await.unwrap().to_vec(), list);
    for (_, digest, manifest) in &children {
        let got = api
            .get_with(
                &format!("/v2/{repo}/manifests/{digest}"),
                "accept",
                DOCKER_MANIFEST,
            )
            .await;
        expect_status(&got, 200);
        assert_eq!(&got.bytes().await.unwrap().to_vec(), manifest);
    }
}

#[tokio::test]
async fn oci_index_round_trips_over_its_image_manifests() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "pull/oci-index";
    let a = api.push_image(repo, "amd64", 8).await;
    let b = api.push_image(repo, "arm64", 9).await;
    let mut da = manifest_descriptor(OCI_MANIFEST, &a.manifest);
    da["platform"] = json!({ "architecture": "amd64", "os": "linux" });
    let mut db = manifest_descriptor(OCI_MANIFEST, &b.manifest);
    db["platform"] = json!({ "architecture": "arm64", "os": "linux" });
    let body = index(OCI_INDEX, &[da, db], None);
    let digest = api.push_manifest(repo, "multi", OCI_INDEX, &body).await;

    for reference in ["multi", digest.as_str()] {
        let got = api
            .get_with(
                &format!("/v2/{repo}/manifests/{reference}"),
                "accept",
                &format!("{OCI_INDEX}, {OCI_MANIFEST}"),
            )
            .await;
        expect_status(&got, 200);
        assert_eq!(header(&got, "content-type"), OCI_INDEX);
        assert_eq!(header(&got, "docker-content-digest"), digest);
        assert_eq!(got.bytes().await.unwrap().to_vec(), body);
    }
}

/// A cache config blob shaped like BuildKit's (`layers` and `records`).
fn cache_config(layers: &[Blob]) -> Vec<u8> {
    let layer_entries: Vec<_> = layers
        .iter()
        .map(|l| {
            json!({
                "blob": l.digest,
                "annotations": {
                    "mediaType": l.media_type,
                    "diffID": digest_of(&l.digest.clone().into_bytes()),
                    "size": l.bytes.len(),
                },
            })
        })
        .collect();
    let body = json!({
        "layers": layer_entries,
        "records": [
            { "digest": digest_of(b"record-0"), "layers": [{ "layer": 0 }] },
            { "digest": digest_of(b"record-1"), "inputs": [[{ "selector": "", "link": 0 }]], "layers": [{ "layer": 1 }] },
        ],
    });
    serde_json::to_vec(&body).unwrap()
}

#[tokio::test]
async fn buildkit_cache_index_of_layers_and_cacheconfig_round_trips_like_buildkit_uses_it() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "cache/hdr";
    let layers: Vec<Blob> = (0..3)
        .map(|i| descriptor(OCI_LAYER, &pseudo_random(10, i, 500 + usize::from(i) * 700)))
        .collect();
    let config = descriptor(BUILDKIT_CACHE_CONFIG, &cache_config(&layers));

    // Export: HEAD 404, POST session, one PUT with the body, for every blob.
    for blob in layers.iter().chain(std::iter::once(&config)) {
        let path = format!("/v2/{repo}/blobs/{}", blob.digest);
        let head = api
            .request(Method::HEAD, &path)
            .header("accept", format!("{},*/*", blob.media_type))
            .send()
            .await
            .unwrap();
        expect_status(&head, 404);
        api.push_blob(repo, &blob.bytes).await;
    }
    let head = api
        .request(Method::HEAD, &format!("/v2/{repo}/manifests/buildcache"))
        .header("accept", format!("{OCI_INDEX},*/*"))
        .send()
        .await
        .unwrap();
    expect_status(&head, 404);
    let mut descriptors: Vec<_> = layers
        .iter()
        .map(|l| {
            let mut d = l.json();
            d["annotations"] = json!({
                "buildkit/createdat": "2024-01-01T00:00:00Z",
                "containerd.io/uncompressed": digest_of(&l.bytes),
            });
            d
        })
        .collect();
    descriptors.push(config.json());
    let body = index(OCI_INDEX, &descriptors, None);
    let digest = api
        .push_manifest(repo, "buildcache", OCI_INDEX, &body)
        .await;

    // Import: HEAD by tag with the wide Accept list, GET by the digest it answered,
    // then the cache config and (lazily, with ranges) the layers.
    let head = api
        .request(Method::HEAD, &format!("/v2/{repo}/manifests/buildcache"))
        .header(
            "accept",
            format!("{DOCKER_MANIFEST}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX},*/*"),
        )
        .send()
        .await
        .unwrap();
    expect_status(&head, 200);
    assert_eq!(header(&head, "content-type"), OCI_INDEX);
    assert_eq!(header(&head, "content-length"), body.len().to_string());
    assert_eq!(header(&head, "docker-content-digest"), digest);
    let got = api
        .get_with(
            &format!("/v2/{repo}/manifests/{digest}"),
            "accept",
            &format!("{OCI_INDEX},*/*"),
        )
        .await;
    expect_status(&got, 200);
    assert_eq!(got.bytes().await.unwrap().to_vec(), body);
    let got = api
        .get(&format!("/v2/{repo}/blobs/{}", config.digest))
        .await;
    expect_status(&got, 200);
    assert_eq!(header(&got, "content-type"), "application/octet-stream");
    assert_eq!(got.bytes().await.unwrap().to_vec(), config.bytes);
    for layer in &layers {
        let path = format!("/v2/{repo}/blobs/{}", layer.digest);
        let head = api.head(&path).await;
        expect_status(&head, 200);
        assert_eq!(
            header(&head, "content-length"),
            layer.bytes.len().to_string()
        );
        let tail = api.get_with(&path, "range", "bytes=100-").await;
        expect_status(&tail, 206);
        assert_eq!(
            tail.bytes().await.unwrap().to_vec(),
            layer.bytes[100..].to_vec()
        );
    }
}

#[tokio::test]
async fn buildkit_image_manifest_cache_with_cacheconfig_config_round_trips() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "cache/new";
    let layers: Vec<Blob> = (0..2)
        .map(|i| descriptor(OCI_LAYER, &pseudo_random(11, i, 3000)))
        .collect();
    let config = descriptor(BUILDKIT_CACHE_CONFIG, &cache_config(&layers));
    for blob in layers.iter().chain(std::iter::once(&config)) {
        api.push_blob(repo, &blob.bytes).await;
    }
    let body = image_manifest(OCI_MANIFEST, &config, &layers, None);
    let digest = api
        .push_manifest(repo, "buildcache", OCI_MANIFEST, &body)
        .await;

    let head = api
        .request(Method::HEAD, &format!("/v2/{repo}/manifests/buildcache"))
        .header(
            "accept",
            format!("{DOCKER_MANIFEST}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX},*/*"),
        )
        .send()
        .await
        .unwrap();
    expect_status(&head, 200);
    assert_eq!(header(&head, "content-type"), OCI_MANIFEST);
    assert_eq!(header(&head, "docker-content-digest"), digest);
    let got = api
        .get_with(
            &format!("/v2/{repo}/manifests/{digest}"),
            "accept",
            &format!("{OCI_MANIFEST},*/*"),
        )
        .await;
    expect_status(&got, 200);
    let parsed: serde_json::Value = serde_json::from_slice(&got.bytes().await.unwrap()).unwrap();
    assert_eq!(parsed["config"]["mediaType"], BUILDKIT_CACHE_CONFIG);
    let cfg = api
        .get(&format!("/v2/{repo}/blobs/{}", config.digest))
        .await;
    expect_status(&cfg, 200);
    assert_eq!(cfg.bytes().await.unwrap().to_vec(), config.bytes);
}

#[tokio::test]
async fn buildkit_cache_as_docker_manifest_list_round_trips() {
    // `oci-mediatypes=false`: the same cache index, in a Docker manifest list.
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "cache/docker";
    let layers: Vec<Blob> = (0..2)
        .map(|i| descriptor(DOCKER_LAYER, &pseudo_random(15, i, 900)))
        .collect();
    let config = descriptor(BUILDKIT_CACHE_CONFIG, &cache_config(&layers));
    for blob in layers.iter().chain(std::iter::once(&config)) {
        api.push_blob(repo, &blob.bytes).await;
    }
    let mut descriptors: Vec<_> = layers.iter().map(Blob::json).collect();
    descriptors.push(config.json());
    let body = index(DOCKER_LIST, &descriptors, None);
    let digest = api
        .push_manifest(repo, "buildcache", DOCKER_LIST, &body)
        .await;
    let got = api
        .get_with(
            &format!("/v2/{repo}/manifests/buildcache"),
            "accept",
            &format!("{DOCKER_LIST},*/*"),
        )
        .await;
    expect_status(&got, 200);
    assert_eq!(header(&got, "content-type"), DOCKER_LIST);
    assert_eq!(header(&got, "docker-content-digest"), digest);
    assert_eq!(got.bytes().await.unwrap().to_vec(), body);
}

#[tokio::test]
async fn invalid_repository_names_are_400_name_invalid_on_every_route() {
    let server = Server::start();
    let api = Api::new(&server);
    let too_long = format!("{}/x", "a".repeat(255));
    let names = [
        "Upper",
        "team/Upper",
        "a//b",
        "a/",
        "a..b",
        "a___b",
        "-a",
        "a-",
        "a/.b",
        "a%20b",
        &too_long,
    ];
    for name in names {
        let routes = [
            (Method::GET, format!("/v2/{name}/tags/list")),
            (Method::GET, format!("/v2/{name}/manifests/latest")),
            (Method::HEAD, format!("/v2/{name}/manifests/latest")),
            (Method::PUT, format!("/v2/{name}/manifests/latest")),
            (Method::GET, format!("/v2/{name}/blobs/{ABSENT_DIGEST}")),
            (Method::POST, format!("/v2/{name}/blobs/uploads/")),
            (Method::GET, format!("/v2/{name}/referrers/{ABSENT_DIGEST}")),
        ];
        for (method, path) in routes {
            let resp = api.request(method.clone(), &path).send().await.unwrap();
            if method == Method::HEAD {
                expect_status(&resp, 400);
            } else {
                expect_error(resp, 400, "NAME_INVALID").await;
            }
        }
    }
    // `..` as a path component, sent verbatim (a URL library would resolve it away).
    for target in [
        "/v2/a/../b/tags/list".to_owned(),
        "/v2/../tags/list".to_owned(),
        format!("/v2/a/./b/blobs/{ABSENT_DIGEST}"),
    ] {
        let resp = raw_request(&server.host, "GET", &target, b"").await;
        assert_eq!(resp.status, 400, "{target}");
        check_error_body(&resp.body, "NAME_INVALID");
    }
}

#[tokio::test]
async fn invalid_digests_are_400_digest_invalid() {
    let server = Server::start();
    let api = Api::new(&server);
    api.push_image("pull/digests", "v1", 12).await;
    let bad = [
        "sha256:xyz",
        "sha256:",
        "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        "sha256:totallywrong",
        // The algorithm the store addresses cache entries' parts by: never a client's.
        "blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
    ];
    for digest in bad {
        for path in [
            format!("/v2/pull/digests/blobs/{digest}"),
            format!("/v2/pull/digests/manifests/{digest}"),
            format!("/v2/pull/digests/referrers/{digest}"),
        ] {
            expect_error(api.get(&path).await, 400, "DIGEST_INVALID").await;
        }
        // The conformance suite's own error-format probe: PUT a manifest to a bad digest.
        let resp = api
            .put_manifest("pull/digests", digest, OCI_MANIFEST, b"{}")
            .await;
        expect_error(resp, 400, "DIGEST_INVALID").await;
        let resp = api
            .request(
                Method::POST,
                &format!("/v2/pull/digests/blobs/uploads/?digest={digest}"),
            )
            .body("x")
            .send()
            .await
            .unwrap();
        expect_error(resp, 400, "DIGEST_INVALID").await;
    }
    // A blob is addressed by digest only; a tag-like word is not one.
    let resp = api.get("/v2/pull/digests/blobs/not-a-digest").await;
    expect_error(resp, 400, "DIGEST_INVALID").await;
}

#[tokio::test]
async fn unsupported_methods_are_405_unsupported() {
    let server = Server::start();
    let api = Api::new(&server);
    let image = api.push_image("pull/methods", "v1", 13).await;
    let blob = &image.layers[0].digest;
    let location = api.start_upload("pull/methods").await;
    let manifest = "GET, HEAD, PUT, DELETE";
    let cases = [
        (
            Method::POST,
            "/v2/pull/methods/manifests/v1".to_owned(),
            manifest,
        ),
        (
            Method::PATCH,
            "/v2/pull/methods/manifests/v1".to_owned(),
            manifest,
        ),
        (
            Method::PUT,
            format!("/v2/pull/methods/blobs/{blob}"),
            "GET, HEAD, DELETE",
        ),
        (
            Method::POST,
            format!("/v2/pull/methods/blobs/{blob}"),
            "GET, HEAD, DELETE",
        ),
        (
            Method::PATCH,
            format!("/v2/pull/methods/blobs/{blob}"),
            "GET, HEAD, DELETE",
        ),
        (
            Method::DELETE,
            "/v2/pull/methods/tags/list".to_owned(),
            "GET",
        ),
        (Method::PUT, "/v2/pull/methods/tags/list".to_owned(), "GET"),
        (
            Method::GET,
            "/v2/pull/methods/blobs/uploads/".to_owned(),
            "POST",
        ),
        (Method::POST, location.clone(), "GET, PATCH, PUT, DELETE"),
        (Method::DELETE, "/v2/".to_owned(), "GET, HEAD"),
        (Method::POST, "/v2/_catalog".to_owned(), "GET"),
        (
            Method::PUT,
            format!("/v2/pull/methods/referrers/{blob}"),
            "GET",
        ),
    ];
    for (method, path, allow) in cases {
        let resp = api.request(method.clone(), &path).send().await.unwrap();
        // HTTP requires a 405 to say what is allowed.
        assert_eq!(header(&resp, "allow"), allow, "{method} {path}");
        expect_error(resp, 405, "UNSUPPORTED").await;
    }
    // Nothing changed: the content still reads back.
    let got = api.get("/v2/pull/methods/manifests/v1").await;
    assert_eq!(got.bytes().await.unwrap().to_vec(), image.manifest);
}
