//! OCI distribution conformance, category "Push": every way a blob can be uploaded
//! (POST + PUT, streamed PATCH, single POST, chunked PATCH with `Content-Range`),
//! upload status and cancellation, cross-repository mounts, digest verification, and
//! manifest uploads with their validation errors. Uploads must survive a `kill -9`.
//! Written from the spec: <https://github.com/opencontainers/distribution-spec/blob/main/spec.md#push>.

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
use serde_json::{Value, json};

/// Files left in the upload staging directory.
fn staged_files(server: &Server) -> Vec<String> {
    std::fs::read_dir(server.data_dir().join("uploads"))
        .map(|dir| {
            dir.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// PATCH `bytes` to `location` as the chunk starting at `start`; returns the response.
async fn patch_chunk(api: &Api, location: &str, start: usize, bytes: &[u8]) -> reqwest::Response {
    let end = start + bytes.len() - 1;
    api.request(Method::PATCH, location)
        .header("content-type", "application/octet-stream")
        .header("content-range", format!("{start}-{end}"))
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap()
}

async fn blob_bytes(api: &Api, repo: &str, digest: &str) -> Vec<u8> {
    let got = api.get(&format!("/v2/{repo}/blobs/{digest}")).await;
    expect_status(&got, 200);
    got.bytes().await.unwrap().to_vec()
}

#[tokio::test]
async fn post_session_then_put_with_body_creates_the_blob() {
    let server = Server::start();
    let api = Api::new(&server);
    let bytes = pseudo_random(20, 0, 70_000);
    let digest = digest_of(&bytes);

    let post = api
        .request(Method::POST, "/v2/push/session/blobs/uploads/")
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    expect_status(&post, 202);
    let location = header(&post, "location");
    let id = upload_id(&location);
    assert!(
        location.starts_with("/v2/push/session/blobs/uploads/"),
        "{location}"
    );
    assert_eq!(id.len(), 36, "a UUID session id in {location}");
    assert_eq!(header(&post, "docker-upload-uuid"), id);
    assert_eq!(header(&post, "range"), "0-0");

    let put = api
        .request(Method::PUT, &with_query(&location, "digest", &digest))
        .header("content-type", "application/octet-stream")
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    expect_status(&put, 201);
    assert_eq!(
        header(&put, "location"),
        format!("/v2/push/session/blobs/{digest}")
    );
    assert_eq!(header(&put, "docker-content-digest"), digest);
    assert_eq!(
        blob_bytes(&api, "push/session", &digest).await,
        bytes,
        "readable at the Location"
    );
    // The finished session is gone and left nothing staged.
    let status = api.get(&location).await;
    expect_error(status, 404, "BLOB_UPLOAD_UNKNOWN").await;
    assert!(staged_files(&server).is_empty());
}

#[tokio::test]
async fn absolute_and_percent_encoded_digest_forms_finish_an_upload() {
    let server = Server::start();
    let api = Api::new(&server);
    let bytes = b"encoded digest".to_vec();
    let digest = digest_of(&bytes);
    let location = api.start_upload("push/encoded").await;
    // containerd sends `sha256%3A…` and an absolute URL built from the Location.
    let url = format!(
        "{}?digest={}",
        api.url(&location),
        digest.replace(':', "%3A")
    );
    let put = api
        .request(Method::PUT, &url)
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    expect_status(&put, 201);
    assert_eq!(blob_bytes(&api, "push/encoded", &digest).await, bytes);
}

#[tokio::test]
async fn streamed_patch_without_content_range_then_put_creates_the_blob() {
    let server = Server::start();
    let api = Api::new(&server);
    let bytes = pseudo_random(21, 0, 300_000);
    let digest = digest_of(&bytes);
    let location = api.start_upload("push/streamed").await;

    // Chunked transfer encoding: no Content-Length, no Content-Range.
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    let patch = api
        .request(Method::PATCH, &location)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
        .send()
        .await
        .unwrap();
    expect_status(&patch, 202);
    assert_eq!(header(&patch, "range"), "0-299999");
    let location = header(&patch, "location");

    let put = api
        .request(Method::PUT, &with_query(&location, "digest", &digest))
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    expect_status(&put, 201);
    assert_eq!(header(&put, "docker-content-digest"), digest);
    assert_eq!(blob_bytes(&api, "push/streamed", &digest).await, bytes);
}

#[tokio::test]
async fn monolithic_post_with_digest_creates_the_blob_in_one_request() {
    let server = Server::start();
    let api = Api::new(&server);
    let bytes = pseudo_random(22, 0, 12_345);
    let digest = digest_of(&bytes);
    let resp = api
        .request(
            Method::POST,
            &format!("/v2/push/mono/blobs/uploads/?digest={digest}"),
        )
        .header("content-type", "application/octet-stream")
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    expect_status(&resp, 201);
    assert_eq!(
        header(&resp, "location"),
        format!("/v2/push/mono/blobs/{digest}")
    );
    assert_eq!(header(&resp, "docker-content-digest"), digest);
    assert_eq!(blob_bytes(&api, "push/mono", &digest).await, bytes);
    assert!(staged_files(&server).is_empty());
}

#[tokio::test]
async fn pushing_an_existing_blob_again_succeeds_and_keeps_one_copy() {
    let server = Server::start();
    let api = Api::new(&server);
    let bytes = pseudo_random(23, 0, 5000);
    let first = api.push_blob("push/again", &bytes).await;
    let second = api.push_blob("push/again", &bytes).await;
    assert_eq!(first, second);
    assert_eq!(blob_bytes(&api, "push/again", &first).await, bytes);
    let hex = first.strip_prefix("sha256:").unwrap();
    let shard = server.data_dir().join("blobs/sha256").join(&hex[..2]);
    let files: Vec<_> = std::fs::read_dir(shard).unwrap().collect();
    assert_eq!(files.len(), 1, "one stored copy");
    assert!(staged_files(&server).is_empty());
}

#[tokio::test]
async fn chunked_upload_in_several_patches_with_content_range_creates_the_blob() {
    let server = Server::start();
    let api = Api::new(&server);
    let bytes = pseudo_random(24, 0, 2500);
    let digest = digest_of(&bytes);
    let mut location = api.start_upload("push/chunked").await;
    let id = upload_id(&location);

    for (start, end) in [(0usize, 1000usize), (1000, 2000)] {
        let resp = patch_chunk(&api, &location, start, &bytes[start..end]).await;
        expect_status(&resp, 202);
        assert_eq!(header(&resp, "range"), format!("0-{}", end - 1));
        assert_eq!(header(&resp, "docker-upload-uuid"), id);
        location = header(&resp, "location");
        assert_eq!(upload_id(&location), id);
    }
    // The last chunk rides on the closing PUT, with its Content-Range.
    let put = api
        .request(Method::PUT, &with_query(&location, "digest", &digest))
        .header("content-type", "application/octet-stream")
        .header("content-range", "2000-2499")
        .body(bytes[2000..].to_vec())
        .send()
        .await
        .unwrap();
    expect_status(&put, 201);
    assert_eq!(
        header(&put, "location"),
        format!("/v2/push/chunked/blobs/{digest}")
    );
    assert_eq!(header(&put, "docker-content-digest"), digest);
    assert_eq!(blob_bytes(&api, "push/chunked", &digest).await, bytes);
}

/// A query parameter given twice takes its first value (distribution's answer), not a 400.
#[tokio::test]
async fn a_parameter_given_twice_takes_its_first_value() {
    let server = Server::start();
    let api = Api::new(&server);
    let bytes = pseudo_random(23, 0, 100);
    let digest = digest_of(&bytes);
    let location = api.start_upload("push/twice").await;
    let url = with_query(&with_query(&location, "digest", &digest), "digest", &digest);
    let resp = api
        .request(Method::PUT, &url)
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    expect_status(&resp, 201);
    assert_eq!(blob_bytes(&api, "push/twice", &digest).await, bytes);
}

#[tokio::test]
async fn first_chunk_not_starting_at_zero_is_rejected_with_416() {
    let server = Server::start();
    let api = Api::new(&server);
    let location = api.start_upload("push/order").await;
    let resp = patch_chunk(&api, &location, 10, &[7u8; 10]).await;
    assert_eq!(header(&resp, "range"), "0-0");
    expect_error(resp, 416, "BLOB_UPLOAD_INVALID").await;
}

/// A `Content-Range` whose length is not the body's is refused, the widest range (whose
/// length does not fit in 64 bits) included, and the upload holds nothing.
#[tokio::test]
async fn a_content_range_not_matching_the_body_is_416() {
    let server = Server::start();
    let api = Api::new(&server);
    let location = api.start_upload("push/claimed").await;
    for (range, body) in [("0-18446744073709551615", &b""[..]), ("0-9", &b"12345"[..])] {
        let resp = api
            .request(Method::PATCH, &location)
            .header("content-range", range)
            .header("content-type", "application/octet-stream")
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        expect_error(resp, 416, "RANGE_INVALID").await;
    }
    let status = api.get(&location).await;
    expect_status(&status, 204);
    assert_eq!(header(&status, "range"), "0-0");
}

#[tokio::test]
async fn chunked_upload_with_gap_is_rejected_with_416_and_can_resume() {
    let server = Server::start();
    let api = Api::new(&server);
    let bytes = pseudo_random(25, 0, 3000);
    let digest = digest_of(&bytes);
    let location = api.start_upload("push/gap").await;
    expect_status(&patch_chunk(&api, &location, 0, &bytes[..1000]).await, 202);

    // A gap, then an overlap: both 416 with the Range the upload really holds.
    for start in [1500usize, 0, 999] {
        let resp = patch_chunk(&api, &location, start, &bytes[start..start + 500]).await;
        assert_eq!(header(&resp, "range"), "0-999", "chunk at {start}");
        expect_error(resp, 416, "BLOB_UPLOAD_INVALID").await;
    }
    // A rejected chunk changes nothing; the client asks where to resume and goes on.
    let status = api.get(&location).await;
    expect_status(&status, 204);
    assert_eq!(header(&status, "range"), "0-999");
    let resp = patch_chunk(&api, &location, 1000, &bytes[1000..]).await;
    expect_status(&resp, 202);
    assert_eq!(header(&resp, "range"), "0-2999");
    let put = api
        .request(Method::PUT, &with_query(&location, "digest", &digest))
        .send()
        .await
        .unwrap();
    expect_status(&put, 201);
    assert_eq!(blob_bytes(&api, "push/gap", &digest).await, bytes);
}

/// Every chunk refused with 416, on a PATCH or on the closing PUT, says where the upload
/// stands (its `Location`, the `Range` it holds, its id), whether its `Content-Range` is
/// malformed, disagrees with the body or starts elsewhere; the client resumes from there.
/// A malformed range on an upload that does not exist is the upload's 404.
#[tokio::test]
async fn every_refused_chunk_is_416_with_where_the_upload_stands() {
    let server = Server::start();
    let api = Api::new(&server);
    let bytes = pseudo_random(27, 0, 2000);
    let digest = digest_of(&bytes);
    let location = api.start_upload("push/refused").await;
    let id = upload_id(&location);
    expect_status(&patch_chunk(&api, &location, 0, &bytes[..1000]).await, 202);

    let chunk = &bytes[1000..1500];
    let refusals = [
        ("bytes", "RANGE_INVALID"),
        ("1000-", "RANGE_INVALID"),
        ("1499-1000", "RANGE_INVALID"),
        ("1000-1009", "RANGE_INVALID"),
        ("1500-1999", "BLOB_UPLOAD_INVALID"),
        ("0-499", "BLOB_UPLOAD_INVALID"),
    ];
    for method in [Method::PATCH, Method::PUT] {
        let target = if method == Method::PUT {
            with_query(&location, "digest", &digest)
        } else {
            location.clone()
        };
        for (range, code) in refusals {
            let resp = api
                .request(method.clone(), &target)
                .header("content-type", "application/octet-stream")
                .header("content-range", range)
                .body(chunk.to_vec())
                .send()
                .await
                .unwrap();
            let what = format!("{method} with Content-Range {range}");
            assert_eq!(
                maybe_header(&resp, "location"),
                Some(location.clone()),
                "{what}"
            );
            assert_eq!(
                maybe_header(&resp, "range").as_deref(),
                Some("0-999"),
                "{what}"
            );
            assert_eq!(
                maybe_header(&resp, "docker-upload-uuid").as_deref(),
                Some(id.as_str()),
                "{what}"
            );
            expect_error(resp, 416, code).await;
        }
    }
    // Resumed where the 416 said, the upload completes.
    let put = api
        .request(Method::PUT, &with_query(&location, "digest", &digest))
        .header("content-range", "1000-1999")
        .body(bytes[1000..].to_vec())
        .send()
        .await
        .unwrap();
    expect_status(&put, 201);
    assert_eq!(blob_bytes(&api, "push/refused", &digest).await, bytes);

    let unknown = "/v2/push/refused/blobs/uploads/9d1c8f6e-3b1a-4a7e-9d0a-2f4b6c8e0a1b";
    let resp = api
        .request(Method::PATCH, unknown)
        .header("content-range", "bytes")
        .body(chunk.to_vec())
        .send()
        .await
        .unwrap();
    expect_error(resp, 404, "BLOB_UPLOAD_UNKNOWN").await;
}

#[tokio::test]
async fn closing_put_with_misplaced_final_chunk_is_416() {
    let server = Server::start();
    let api = Api::new(&server);
    let bytes = pseudo_random(26, 0, 200);
    let digest = digest_of(&bytes);
    let location = api.start_upload("push/final").await;
    expect_status(&patch_chunk(&api, &location, 0, &bytes[..100]).await, 202);
    let put = api
        .request(Method::PUT, &with_query(&location, "digest", &digest))
        .header("content-range", "150-199")
        .body(bytes[150..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(header(&put, "range"), "0-99");
    expect_error(put, 416, "BLOB_UPLOAD_INVALID").await;
    expect_status(
        &api.get(&format!("/v2/push/final/blobs/{digest}")).await,
        404,
    );
}

#[tokio::test]
async fn early_errors_reach_a_client_still_sending_a_large_body() {
    // The server decides before reading the body; the client, still writing, must get
    // the answer rather than a reset connection (a 416 it never sees breaks resumption).
    let server = Server::start();
    let api = Api::new(&server);
    let big = vec![7u8; 16 * 1024 * 1024];
    let location = api.start_upload("push/early").await;
    expect_status(&patch_chunk(&api, &location, 0, b"first").await, 202);

    let resp = patch_chunk(&api, &location, 1, &big).await;
    assert_eq!(header(&resp, "range"), "0-4");
    expect_error(resp, 416, "BLOB_UPLOAD_INVALID").await;
    let unknown = "/v2/push/early/blobs/uploads/9d1c8f6e-3b1a-4a7e-9d0a-2f4b6c8e0a1b";
    let resp = api
        .request(
            Method::PUT,
            &with_query(unknown, "digest", &digest_of(&big)),
        )
        .body(big.clone())
        .send()
        .await
        .unwrap();
    expect_error(resp, 404, "BLOB_UPLOAD_UNKNOWN").await;
    let resp = api
        .request(
            Method::POST,
            "/v2/push/early/blobs/uploads/?digest=sha256:bad",
        )
        .body(big.clone())
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "DIGEST_INVALID").await;
    let resp = api
        .request(
            Method::PATCH,
            "/v2/Push/early/blobs/uploads/9d1c8f6e-3b1a-4a7e-9d0a-2f4b6c8e0a1b",
        )
        .body(big.clone())
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "NAME_INVALID").await;

    // The session is unharmed and the connection pool still works.
    let status = api.get(&location).await;
    expect_status(&status, 204);
    assert_eq!(header(&status, "range"), "0-4");
}

#[tokio::test]
async fn upload_status_answers_204_with_range_and_location() {
    let server = Server::start();
    let api = Api::new(&server);
    let location = api.start_upload("push/status").await;
    let id = upload_id(&location);

    let fresh = api.get(&location).await;
    expect_status(&fresh, 204);
    assert_eq!(header(&fresh, "range"), "0-0");
    assert_eq!(header(&fresh, "location"), location);
    assert_eq!(header(&fresh, "docker-upload-uuid"), id);

    expect_status(&patch_chunk(&api, &location, 0, &[1u8; 777]).await, 202);
    let status = api.get(&location).await;
    expect_status(&status, 204);
    assert_eq!(header(&status, "range"), "0-776");
    assert_eq!(upload_id(&header(&status, "location")), id);
    assert!(status.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn cancelled_upload_is_404_blob_upload_unknown_afterwards() {
    let server = Server::start();
    let api = Api::new(&server);
    let location = api.start_upload("push/cancel").await;
    expect_status(&patch_chunk(&api, &location, 0, b"partial").await, 202);

    let cancel = api.delete(&location).await;
    expect_status(&cancel, 204);
    assert!(staged_files(&server).is_empty(), "staging file removed");

    expect_error(api.get(&location).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
    let patch = patch_chunk(&api, &location, 7, b"more").await;
    expect_error(patch, 404, "BLOB_UPLOAD_UNKNOWN").await;
    let put = api
        .request(
            Method::PUT,
            &with_query(&location, "digest", &digest_of(b"partial")),
        )
        .send()
        .await
        .unwrap();
    expect_error(put, 404, "BLOB_UPLOAD_UNKNOWN").await;
    expect_error(api.delete(&location).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
}

#[tokio::test]
async fn malformed_or_unknown_upload_ids_are_404_blob_upload_unknown() {
    let server = Server::start();
    let api = Api::new(&server);
    let real = upload_id(&api.start_upload("push/ids").await);
    let ids = [
        "not-a-uuid".to_owned(),
        real.to_uppercase(),
        real.replace('-', ""),
        format!("{real}0"),
        format!("{{{real}}}"),
        "9d1c8f6e-3b1a-4a7e-9d0a-2f4b6c8e0a1b".to_owned(),
        "..meta.db".to_owned(),
    ];
    let d = digest_of(b"x");
    for id in ids {
        let path = format!("/v2/push/ids/blobs/uploads/{id}");
        expect_error(api.get(&path).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
        let patch = api
            .request(Method::PATCH, &path)
            .body("x")
            .send()
            .await
            .unwrap();
        expect_error(patch, 404, "BLOB_UPLOAD_UNKNOWN").await;
        let put = api
            .request(Method::PUT, &format!("{path}?digest={d}"))
            .body("x")
            .send()
            .await
            .unwrap();
        expect_error(put, 404, "BLOB_UPLOAD_UNKNOWN").await;
        expect_error(api.delete(&path).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
    }
    assert_eq!(staged_files(&server), vec![real], "only the real session");
}

#[tokio::test]
async fn upload_url_used_under_another_repository_is_404_blob_upload_unknown() {
    let server = Server::start();
    let api = Api::new(&server);
    let bytes = b"belongs to repo a".to_vec();
    let digest = digest_of(&bytes);
    let location = api.start_upload("team/a").await;
    let id = upload_id(&location);
    let foreign = format!("/v2/team/b/blobs/uploads/{id}");

    expect_error(api.get(&foreign).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
    let patch = patch_chunk(&api, &foreign, 0, &bytes).await;
    expect_error(patch, 404, "BLOB_UPLOAD_UNKNOWN").await;
    let put = api
        .request(Method::PUT, &with_query(&foreign, "digest", &digest))
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    expect_error(put, 404, "BLOB_UPLOAD_UNKNOWN").await;
    expect_error(api.delete(&foreign).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
    expect_status(&api.get(&format!("/v2/team/b/blobs/{digest}")).await, 404);

    // The session is untouched in its own repository.
    let status = api.get(&location).await;
    expect_status(&status, 204);
    assert_eq!(header(&status, "range"), "0-0");
    let put = api
        .request(Method::PUT, &with_query(&location, "digest", &digest))
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    expect_status(&put, 201);
    assert_eq!(blob_bytes(&api, "team/a", &digest).await, bytes);
}

#[tokio::test]
async fn cross_repository_mount_of_a_present_blob_answers_201() {
    let server = Server::start();
    let api = Api::new(&server);
    let bytes = pseudo_random(27, 0, 9000);
    let digest = api.push_blob("cache/src", &bytes).await;
    let resp = api
        .request(
            Method::POST,
            &format!("/v2/app/dst/blobs/uploads/?mount={digest}&from=cache/src"),
        )
        .send()
        .await
        .unwrap();
    expect_status(&resp, 201);
    assert_eq!(
        header(&resp, "location"),
        format!("/v2/app/dst/blobs/{digest}")
    );
    assert_eq!(header(&resp, "docker-content-digest"), digest);
    assert_eq!(blob_bytes(&api, "app/dst", &digest).await, bytes);
    // Both repositories hold it independently.
    expect_status(
        &api.delete(&format!("/v2/cache/src/blobs/{digest}")).await,
        202,
    );
    assert_eq!(blob_bytes(&api, "app/dst", &digest).await, bytes);
}

#[tokio::test]
async fn cross_repository_mount_of_an_absent_blob_starts_an_upload_session() {
    let server = Server::start();
    let api = Api::new(&server);
    let bytes = b"not there yet".to_vec();
    let digest = digest_of(&bytes);
    api.push_blob("cache/src", b"something else").await;
    let elsewhere = api.push_blob("cache/other", b"only in other").await;

    for (mount, from) in [(&digest, "cache/src"), (&elsewhere, "cache/src")] {
        let resp = api
            .request(
                Method::POST,
                &format!("/v2/app/dst/blobs/uploads/?mount={mount}&from={from}"),
            )
            .send()
            .await
            .unwrap();
        expect_status(&resp, 202);
        let location = header(&resp, "location");
        assert!(
            location.starts_with("/v2/app/dst/blobs/uploads/"),
            "{location}"
        );
        assert_eq!(header(&resp, "docker-upload-uuid"), upload_id(&location));
        // The client carries on with a normal upload.
        let put = api
            .request(Method::PUT, &with_query(&location, "digest", &digest))
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        expect_status(&put, 201);
    }
    assert_eq!(blob_bytes(&api, "app/dst", &digest).await, bytes);
    expect_status(
        &api.get(&format!("/v2/app/dst/blobs/{elsewhere}")).await,
        404,
    );
}

#[tokio::test]
async fn mount_without_from_links_a_blob_stored_in_any_repository() {
    let server = Server::start();
    let api = Api::new(&server);
    let bytes = pseudo_random(28, 0, 4096);
    let digest = api.push_blob("cache/anywhere", &bytes).await;
    let resp = api
        .request(
            Method::POST,
            &format!("/v2/app/auto/blobs/uploads/?mount={digest}"),
        )
        .send()
        .await
        .unwrap();
    expect_status(&resp, 201);
    assert_eq!(
        header(&resp, "location"),
        format!("/v2/app/auto/blobs/{digest}")
    );
    assert_eq!(blob_bytes(&api, "app/auto", &digest).await, bytes);

    let resp = api
        .request(
            Method::POST,
            &format!("/v2/app/auto/blobs/uploads/?mount={ABSENT_DIGEST}"),
        )
        .send()
        .await
        .unwrap();
    expect_status(&resp, 202);
    assert!(header(&resp, "location").starts_with("/v2/app/auto/blobs/uploads/"));
}

/// A mount that cannot be done, because its digest or source name is malformed, starts an
/// upload session (the spec's SHOULD, and distribution's answer), so the client uploads.
#[tokio::test]
async fn mount_with_invalid_parameters_starts_an_upload() {
    let server = Server::start();
    let api = Api::new(&server);
    let digest = api.push_blob("cache/src", b"mount me").await;
    for query in [
        "mount=sha256:nothex&from=cache/src".to_owned(),
        format!("mount={digest}&from=Cache/../src"),
    ] {
        let resp = api
            .request(Method::POST, &format!("/v2/app/dst/blobs/uploads/?{query}"))
            .send()
            .await
            .unwrap();
        expect_status(&resp, 202);
        assert!(header(&resp, "location").starts_with("/v2/app/dst/blobs/uploads/"));
    }
    let resp = api
        .request(Method::HEAD, &format!("/v2/app/dst/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    expect_status(&resp, 404);
}

#[tokio::test]
async fn digest_mismatch_on_upload_is_400_digest_invalid_and_nothing_is_visible() {
    let server = Server::start();
    let api = Api::new(&server);
    let bytes = pseudo_random(29, 0, 5000);
    let actual = digest_of(&bytes);
    let claimed = digest_of(b"something else entirely");

    // POST + PUT with the body.
    let location = api.start_upload("push/mismatch").await;
    let put = api
        .request(Method::PUT, &with_query(&location, "digest", &claimed))
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    expect_error(put, 400, "DIGEST_INVALID").await;
    // Chunked, verified only at the closing PUT.
    let location = api.start_upload("push/mismatch").await;
    expect_status(&patch_chunk(&api, &location, 0, &bytes).await, 202);
    let put = api
        .request(Method::PUT, &with_query(&location, "digest", &claimed))
        .send()
        .await
        .unwrap();
    expect_error(put, 400, "DIGEST_INVALID").await;
    // Single POST.
    let post = api
        .request(
            Method::POST,
            &format!("/v2/push/mismatch/blobs/uploads/?digest={claimed}"),
        )
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    expect_error(post, 400, "DIGEST_INVALID").await;

    for digest in [&actual, &claimed] {
        let path = format!("/v2/push/mismatch/blobs/{digest}");
        expect_error(api.get(&path).await, 404, "BLOB_UNKNOWN").await;
        expect_status(&api.head(&path).await, 404);
    }
    let mount = api
        .request(
            Method::POST,
            &format!("/v2/push/other/blobs/uploads/?mount={actual}"),
        )
        .send()
        .await
        .unwrap();
    expect_status(&mount, 202);
    assert_eq!(
        staged_files(&server).len(),
        1,
        "only the mount's new session"
    );
    let hex = actual.strip_prefix("sha256:").unwrap();
    let file = server
        .data_dir()
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex);
    assert!(!file.exists(), "no blob file for mismatched content");
}

#[tokio::test]
async fn closing_put_without_digest_is_400_digest_invalid() {
    let server = Server::start();
    let api = Api::new(&server);
    let location = api.start_upload("push/nodigest").await;
    let put = api
        .request(Method::PUT, &location)
        .body("data")
        .send()
        .await
        .unwrap();
    expect_error(put, 400, "DIGEST_INVALID").await;
}

#[tokio::test]
async fn sha512_digests_are_verified_like_sha256() {
    use sha2::Digest as _;
    let server = Server::start();
    let api = Api::new(&server);
    let bytes = pseudo_random(30, 0, 3333);
    let digest = format!("sha512:{}", hex::encode(sha2::Sha512::digest(&bytes)));
    let location = api.start_upload("push/sha512").await;
    expect_status(&patch_chunk(&api, &location, 0, &bytes[..1000]).await, 202);
    let put = api
        .request(Method::PUT, &with_query(&location, "digest", &digest))
        .header("content-range", "1000-3332")
        .body(bytes[1000..].to_vec())
        .send()
        .await
        .unwrap();
    expect_status(&put, 201);
    assert_eq!(header(&put, "docker-content-digest"), digest);
    assert_eq!(blob_bytes(&api, "push/sha512", &digest).await, bytes);
}

#[tokio::test]
async fn chunked_upload_continues_after_kill_and_restart() {
    let mut server = Server::start();
    let api = Api::new(&server);
    let bytes = pseudo_random(31, 0, 600_000);
    let digest = digest_of(&bytes);
    let location = api.start_upload("push/restart").await;
    expect_status(
        &patch_chunk(&api, &location, 0, &bytes[..200_000]).await,
        202,
    );
    expect_status(
        &patch_chunk(&api, &location, 200_000, &bytes[200_000..400_000]).await,
        202,
    );
    drop(api);

    server.restart();
    let api = Api::new(&server);
    let status = api.get(&location).await;
    expect_status(&status, 204);
    assert_eq!(header(&status, "range"), "0-399999");
    // Out-of-order is still caught with the recovered offset.
    let resp = patch_chunk(&api, &location, 0, &bytes[..10]).await;
    assert_eq!(header(&resp, "range"), "0-399999");
    expect_error(resp, 416, "BLOB_UPLOAD_INVALID").await;
    expect_status(
        &patch_chunk(&api, &location, 400_000, &bytes[400_000..500_000]).await,
        202,
    );
    let put = api
        .request(Method::PUT, &with_query(&location, "digest", &digest))
        .header("content-range", "500000-599999")
        .body(bytes[500_000..].to_vec())
        .send()
        .await
        .unwrap();
    expect_status(&put, 201);
    assert_eq!(blob_bytes(&api, "push/restart", &digest).await, bytes);
}

#[tokio::test]
async fn manifest_put_by_tag_answers_201_and_retagging_moves_the_tag() {
    let server = Server::start();
    let api = Api::new(&server);
    let first = api.push_image("push/manifest", "v1", 32).await;
    // The same manifest under more tags (the upstream suite pushes four).
    for tag in ["test0", "test1", "test2", "test3"] {
        let digest = api
            .push_manifest("push/manifest", tag, OCI_MANIFEST, &first.manifest)
            .await;
        assert_eq!(digest, first.digest);
    }
    let second = api.push_image("push/manifest", "v1", 33).await;
    let got = api.get("/v2/push/manifest/manifests/v1").await;
    assert_eq!(header(&got, "docker-content-digest"), second.digest);
    assert_eq!(got.bytes().await.unwrap().to_vec(), second.manifest);
    let old = api
        .get(&format!("/v2/push/manifest/manifests/{}", first.digest))
        .await;
    expect_status(&old, 200);
    assert_eq!(old.bytes().await.unwrap().to_vec(), first.manifest);
}

#[tokio::test]
async fn manifest_put_by_digest_is_201_and_a_mismatched_digest_is_400_digest_invalid() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "push/bydigest";
    let config = descriptor(OCI_CONFIG, b"{\"os\":\"linux\"}");
    api.push_blob(repo, &config.bytes).await;
    let manifest = image_manifest(OCI_MANIFEST, &config, &[], None);
    let digest = digest_of(&manifest);
    api.push_manifest(repo, &digest, OCI_MANIFEST, &manifest)
        .await;
    let got = api.get(&format!("/v2/{repo}/manifests/{digest}")).await;
    expect_status(&got, 200);
    assert_eq!(got.bytes().await.unwrap().to_vec(), manifest);
    let tags = json_ok(api.get(&format!("/v2/{repo}/tags/list")).await).await;
    assert_eq!(tags["tags"], json!([]), "a digest push creates no tag");

    let other = image_manifest(
        OCI_MANIFEST,
        &config,
        &[],
        Some(json!({ "annotations": { "a": "b" } })),
    );
    let resp = api.put_manifest(repo, &digest, OCI_MANIFEST, &other).await;
    expect_error(resp, 400, "DIGEST_INVALID").await;
    let resp = api
        .put_manifest(repo, ABSENT_DIGEST, OCI_MANIFEST, &other)
        .await;
    expect_error(resp, 400, "DIGEST_INVALID").await;
    expect_status(
        &api.get(&format!("/v2/{repo}/manifests/{}", digest_of(&other)))
            .await,
        404,
    );
    expect_status(
        &api.get(&format!("/v2/{repo}/manifests/{ABSENT_DIGEST}"))
            .await,
        404,
    );
    let got = api.get(&format!("/v2/{repo}/manifests/{digest}")).await;
    assert_eq!(got.bytes().await.unwrap().to_vec(), manifest, "unchanged");
}

#[tokio::test]
async fn manifest_referencing_a_missing_blob_is_400_manifest_blob_unknown() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "push/missing";
    let config = descriptor(OCI_CONFIG, b"{\"present\":true}");
    let layer = descriptor(OCI_LAYER, b"present layer");
    let absent_layer = descriptor(OCI_LAYER, b"never pushed");
    let absent_config = descriptor(OCI_CONFIG, b"{\"never\":true}");
    api.push_blob(repo, &config.bytes).await;
    api.push_blob(repo, &layer.bytes).await;
    // Present in another repository only: still unknown here.
    let foreign = descriptor(OCI_LAYER, b"in another repository");
    api.push_blob("push/elsewhere", &foreign.bytes).await;

    let cases = [
        (
            image_manifest(
                OCI_MANIFEST,
                &config,
                &[layer.clone(), absent_layer.clone()],
                None,
            ),
            absent_layer.digest.clone(),
        ),
        (
            image_manifest(
                OCI_MANIFEST,
                &absent_config,
                std::slice::from_ref(&layer),
                None,
            ),
            absent_config.digest.clone(),
        ),
        (
            image_manifest(OCI_MANIFEST, &config, std::slice::from_ref(&foreign), None),
            foreign.digest.clone(),
        ),
    ];
    for (manifest, missing) in cases {
        let resp = api
            .put_manifest(repo, "broken", OCI_MANIFEST, &manifest)
            .await;
        let entry = expect_error(resp, 400, "MANIFEST_BLOB_UNKNOWN").await;
        assert_eq!(entry["detail"]["digest"], missing.as_str());
        expect_status(
            &api.get(&format!("/v2/{repo}/manifests/{}", digest_of(&manifest)))
                .await,
            404,
        );
    }
    expect_error(
        api.get(&format!("/v2/{repo}/manifests/broken")).await,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await;
}

#[tokio::test]
async fn a_descriptor_size_other_than_the_stored_size_is_400_manifest_invalid() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "push/sizes";
    let config = descriptor(OCI_CONFIG, b"{\"size\":\"checked\"}");
    let layer = descriptor(OCI_LAYER, b"a layer of known size");
    api.push_blob(repo, &config.bytes).await;
    api.push_blob(repo, &layer.bytes).await;
    let good = image_manifest(OCI_MANIFEST, &config, std::slice::from_ref(&layer), None);
    let mut lying: Value = serde_json::from_slice(&good).unwrap();
    lying["config"]["size"] = json!(999_999);
    let lying = serde_json::to_vec(&lying).unwrap();
    let resp = api.put_manifest(repo, "lying", OCI_MANIFEST, &lying).await;
    let entry = expect_error(resp, 400, "MANIFEST_INVALID").await;
    assert!(
        entry["message"].as_str().unwrap().contains("999999"),
        "{entry}"
    );
    expect_status(&api.get(&format!("/v2/{repo}/manifests/lying")).await, 404);
    // An index whose child's size is wrong, likewise.
    let pushed = api.put_manifest(repo, "good", OCI_MANIFEST, &good).await;
    expect_status(&pushed, 201);
    let mut child = manifest_descriptor(OCI_MANIFEST, &good);
    child["size"] = json!(good.len() + 1);
    let resp = api
        .put_manifest(repo, "index", OCI_INDEX, &index(OCI_INDEX, &[child], None))
        .await;
    expect_error(resp, 400, "MANIFEST_INVALID").await;
}

#[tokio::test]
async fn index_referencing_a_missing_child_manifest_is_400_manifest_blob_unknown() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "push/index";
    let present = api.push_image(repo, "present", 34).await;
    let ghost = image_manifest(
        OCI_MANIFEST,
        &descriptor(OCI_CONFIG, b"{\"ghost\":1}"),
        &[],
        None,
    );
    let body = index(
        OCI_INDEX,
        &[
            manifest_descriptor(OCI_MANIFEST, &present.manifest),
            manifest_descriptor(OCI_MANIFEST, &ghost),
        ],
        None,
    );
    let resp = api.put_manifest(repo, "multi", OCI_INDEX, &body).await;
    let entry = expect_error(resp, 400, "MANIFEST_BLOB_UNKNOWN").await;
    assert_eq!(entry["detail"]["digest"], digest_of(&ghost));
    expect_status(&api.get(&format!("/v2/{repo}/manifests/multi")).await, 404);

    // A Docker manifest list is checked the same way.
    let list = index(
        DOCKER_LIST,
        &[manifest_descriptor(DOCKER_MANIFEST, &ghost)],
        None,
    );
    let resp = api.put_manifest(repo, "list", DOCKER_LIST, &list).await;
    expect_error(resp, 400, "MANIFEST_BLOB_UNKNOWN").await;
}

#[tokio::test]
async fn manifest_with_no_layers_is_accepted() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "push/nolayers";
    let config = descriptor(OCI_EMPTY, b"{}");
    assert_eq!(
        config.digest,
        "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    );
    api.push_blob(repo, &config.bytes).await;
    let manifest = image_manifest(
        OCI_MANIFEST,
        &config,
        &[],
        Some(json!({ "artifactType": "application/vnd.example.thing" })),
    );
    let digest = api
        .push_manifest(repo, "emptylayer", OCI_MANIFEST, &manifest)
        .await;
    let got = api.get(&format!("/v2/{repo}/manifests/{digest}")).await;
    expect_status(&got, 200);
    assert_eq!(got.bytes().await.unwrap().to_vec(), manifest);
}

#[tokio::test]
async fn manifest_put_by_sha512_digest_is_served_under_that_digest() {
    use sha2::Digest as _;
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "push/sha512-manifest";
    let config = descriptor(OCI_CONFIG, b"{}");
    api.push_blob(repo, &config.bytes).await;
    let manifest = image_manifest(OCI_MANIFEST, &config, &[], None);
    let digest = format!("sha512:{}", hex::encode(sha2::Sha512::digest(&manifest)));
    let resp = api
        .put_manifest(repo, &digest, OCI_MANIFEST, &manifest)
        .await;
    expect_status(&resp, 201);
    assert_eq!(header(&resp, "docker-content-digest"), digest);
    assert_eq!(
        header(&resp, "location"),
        format!("/v2/{repo}/manifests/{digest}")
    );
    let got = api.get(&format!("/v2/{repo}/manifests/{digest}")).await;
    expect_status(&got, 200);
    assert_eq!(header(&got, "docker-content-digest"), digest);
    assert_eq!(got.bytes().await.unwrap().to_vec(), manifest);
}

#[tokio::test]
async fn tags_up_to_128_characters_are_accepted_and_longer_ones_refused() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "push/tags";
    let image = api.push_image(repo, "v1", 36).await;
    for tag in ["_underscore", "UPPER.case-1", &"t".repeat(128)] {
        api.push_manifest(repo, tag, OCI_MANIFEST, &image.manifest)
            .await;
        let got = api.get(&format!("/v2/{repo}/manifests/{tag}")).await;
        expect_status(&got, 200);
    }
    for tag in [&"t".repeat(129), ".dot", "-dash"] {
        let resp = api
            .put_manifest(repo, tag, OCI_MANIFEST, &image.manifest)
            .await;
        expect_error(resp, 400, "TAG_INVALID").await;
    }
}

#[tokio::test]
async fn foreign_layers_with_urls_need_not_be_pushed() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "push/foreign";
    let config = descriptor(DOCKER_CONFIG, b"{\"os\":\"windows\"}");
    api.push_blob(repo, &config.bytes).await;
    let mut foreign = descriptor(
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        b"base layer hosted elsewhere",
    )
    .json();
    foreign["urls"] = json!(["https://example.invalid/layer.tar.gz"]);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": config.json(),
        "layers": [foreign],
    }))
    .unwrap();
    api.push_manifest(repo, "win", DOCKER_MANIFEST, &manifest)
        .await;
}

#[tokio::test]
async fn manifest_referencing_a_deleted_blob_is_400_manifest_blob_unknown() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "push/deleted";
    let config = descriptor(OCI_CONFIG, b"{}");
    let layer = descriptor(OCI_LAYER, b"soon gone");
    api.push_blob(repo, &config.bytes).await;
    api.push_blob(repo, &layer.bytes).await;
    expect_status(
        &api.delete(&format!("/v2/{repo}/blobs/{}", layer.digest))
            .await,
        202,
    );
    let manifest = image_manifest(OCI_MANIFEST, &config, &[layer], None);
    let resp = api.put_manifest(repo, "v1", OCI_MANIFEST, &manifest).await;
    expect_error(resp, 400, "MANIFEST_BLOB_UNKNOWN").await;
}

/// An image manifest padded with an annotation to exactly `len` bytes.
fn padded_manifest(config: &Blob, len: usize) -> Vec<u8> {
    let empty = image_manifest(
        OCI_MANIFEST,
        config,
        &[],
        Some(json!({ "annotations": { "pad": "" } })),
    );
    image_manifest(
        OCI_MANIFEST,
        config,
        &[],
        Some(json!({ "annotations": { "pad": "x".repeat(len - empty.len()) } })),
    )
}

#[tokio::test]
async fn manifest_over_4_mib_is_413_manifest_invalid_and_4_mib_is_accepted() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "push/large";
    let config = descriptor(OCI_CONFIG, b"{}");
    api.push_blob(repo, &config.bytes).await;
    const LIMIT: usize = 4 * 1024 * 1024;

    let at_limit = padded_manifest(&config, LIMIT);
    assert_eq!(at_limit.len(), LIMIT);
    api.push_manifest(repo, "big", OCI_MANIFEST, &at_limit)
        .await;

    // The client is still sending when the answer is decided: it must get the 413.
    for len in [LIMIT + 1, 5 * LIMIT] {
        let over = padded_manifest(&config, len);
        let resp = api.put_manifest(repo, "huge", OCI_MANIFEST, &over).await;
        expect_error(resp, 413, "MANIFEST_INVALID").await;
        // Without a Content-Length the limit is enforced while reading.
        let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
            over.chunks(256 * 1024).map(|c| Ok(c.to_vec())).collect();
        let resp = api
            .request(Method::PUT, &format!("/v2/{repo}/manifests/huge"))
            .header("content-type", OCI_MANIFEST)
            .body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
            .send()
            .await
            .unwrap();
        expect_error(resp, 413, "MANIFEST_INVALID").await;
    }
    expect_status(&api.get(&format!("/v2/{repo}/manifests/huge")).await, 404);
}

#[tokio::test]
async fn malformed_manifests_are_400_manifest_invalid() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "push/malformed";
    let config = descriptor(OCI_CONFIG, b"{}");
    api.push_blob(repo, &config.bytes).await;
    let good = image_manifest(OCI_MANIFEST, &config, &[], None);
    let good_text = String::from_utf8(good.clone()).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (OCI_MANIFEST, b"{".to_vec()),
        (OCI_MANIFEST, b"".to_vec()),
        (OCI_MANIFEST, b"not json at all".to_vec()),
        (OCI_MANIFEST, b"[]".to_vec()),
        (OCI_MANIFEST, br#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#.to_vec()),
        (OCI_MANIFEST, br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#.to_vec()),
        (OCI_MANIFEST, good_text.replace(&config.digest, "sha256:zz").into_bytes()),
        (OCI_MANIFEST, good_text.replace("\"size\":2", "\"size\":\"two\"").into_bytes()),
        // Content-Type disagrees with the body's mediaType.
        (DOCKER_MANIFEST, good.clone()),
        (OCI_INDEX, good.clone()),
        // Not a manifest type at all.
        ("text/plain", br#"{"schemaVersion":2}"#.to_vec()),
        (OCI_INDEX, br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":{}}"#.to_vec()),
    ];
    for (content_type, body) in cases {
        let resp = api.put_manifest(repo, "bad", content_type, &body).await;
        let text = String::from_utf8_lossy(&body)
            .chars()
            .take(80)
            .collect::<String>();
        assert_eq!(resp.status(), 400, "{content_type} {text}");
        expect_error(resp, 400, "MANIFEST_INVALID").await;
    }
    expect_status(&api.get(&format!("/v2/{repo}/manifests/bad")).await, 404);
    // The well-formed one is fine.
    api.push_manifest(repo, "good", OCI_MANIFEST, &good).await;
}

#[tokio::test]
async fn repository_names_with_several_segments_and_route_words_work_end_to_end() {
    let server = Server::start();
    let api = Api::new(&server);
    for repo in [
        "org/team/project/cache/x86_64",
        "a/b/c/d/e/f/g/h",
        "cache/blobs/uploads/x",
        "my.registry/manifests/tags/list",
        "a0/b-c/d__e/f.g",
    ] {
        let bytes = format!("layer of {repo}").into_bytes();
        let digest = digest_of(&bytes);
        let location = api.start_upload(repo).await;
        assert!(
            location.starts_with(&format!("/v2/{repo}/blobs/uploads/")),
            "{location}"
        );
        let patch = patch_chunk(&api, &location, 0, &bytes).await;
        expect_status(&patch, 202);
        let status = api.get(&location).await;
        expect_status(&status, 204);
        let put = api
            .request(Method::PUT, &with_query(&location, "digest", &digest))
            .send()
            .await
            .unwrap();
        expect_status(&put, 201);
        assert_eq!(
            header(&put, "location"),
            format!("/v2/{repo}/blobs/{digest}")
        );
        assert_eq!(blob_bytes(&api, repo, &digest).await, bytes);

        let image = api.push_image(repo, "v1", 35).await;
        let got = api.get(&format!("/v2/{repo}/manifests/v1")).await;
        assert_eq!(got.bytes().await.unwrap().to_vec(), image.manifest);
        let tags = json_ok(api.get(&format!("/v2/{repo}/tags/list")).await).await;
        assert_eq!(tags, json!({ "name": repo, "tags": ["v1"] }));
    }
}
