//! `Store::repository_usage`: what each repository holds, counted per repository (a
//! blob mounted into a second repository counts in both), largest first, and nothing
//! for a repository whose links and manifests are gone. On SQLite and on PostgreSQL
//! metadata.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod backend;

use backend::Backend;
use bytes::Bytes;
use oci::{Digest, Reference, RepoName};
use store::{ByteStream, Store};

fn body(bytes: &Bytes) -> ByteStream {
    Box::pin(futures::stream::iter([Ok::<_, std::io::Error>(
        bytes.clone(),
    )]))
}

fn blob(fill: u8, len: usize) -> (Digest, Bytes) {
    let bytes = Bytes::from(vec![fill; len]);
    (Digest::sha256_of(&bytes), bytes)
}

/// An OCI image manifest over `config` and `layers`.
fn image(config: &(Digest, Bytes), layers: &[&(Digest, Bytes)]) -> Bytes {
    let descriptor = |(d, b): &(Digest, Bytes), media_type: &str| serde_json::json!({ "mediaType": media_type, "digest": d.to_string(), "size": b.len() });
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor(config, "application/vnd.oci.image.config.v1+json"),
        "layers": layers
            .iter()
            .map(|l| descriptor(l, "application/vnd.oci.image.layer.v1.tar"))
            .collect::<Vec<_>>(),
    });
    Bytes::from(serde_json::to_vec(&manifest).unwrap())
}

backend::on_each_backend! {
    #[tokio::test]
    async fn repositories_are_listed_largest_first_with_shared_blobs_counted_in_each;
}

async fn repositories_are_listed_largest_first_with_shared_blobs_counted_in_each(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let metadata = backend.create(&dir.path().join("data"));
    let store = Store::open(&metadata.config()).await.unwrap();
    let app: RepoName = "cache/app".parse().unwrap();
    let lib: RepoName = "cache/lib".parse().unwrap();
    let config = blob(b'c', 100);
    let big = blob(b'b', 50_000);
    let small = blob(b's', 2_000);
    for (d, b) in [&config, &big, &small] {
        store.put_blob(&app, d, body(b)).await.unwrap();
    }
    // `lib` shares the small layer with `app` instead of uploading it.
    assert_eq!(
        store.mount_blob(&lib, &small.0, Some(&app)).await.unwrap(),
        Some(2_000)
    );
    let manifest = image(&config, &[&big, &small]);
    store
        .put_manifest(
            &app,
            &Reference::Tag("v1".parse().unwrap()),
            Some("application/vnd.oci.image.manifest.v1+json"),
            manifest.clone(),
        )
        .await
        .unwrap();

    let usage = store.repository_usage().await.unwrap();
    let names: Vec<&str> = usage.iter().map(|u| u.repo.as_str()).collect();
    assert_eq!(names, ["cache/app", "cache/lib"]);
    let (first, second) = (&usage[0], &usage[1]);
    assert_eq!(
        (first.blobs, first.blob_bytes, first.manifests),
        (3, 52_100, 1)
    );
    assert_eq!(first.manifest_bytes, manifest.len() as u64);
    assert_eq!(
        (second.blobs, second.blob_bytes, second.manifests),
        (1, 2_000, 0)
    );
    assert_eq!(second.manifest_bytes, 0);

    // Unlinked from `lib`, the shared blob no longer counts there: `lib` holds nothing.
    store.delete_blob(&lib, &small.0).await.unwrap();
    let usage = store.repository_usage().await.unwrap();
    let names: Vec<&str> = usage.iter().map(|u| u.repo.as_str()).collect();
    assert_eq!(names, ["cache/app"]);
}
