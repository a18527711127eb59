//! `Store::tags`: a repository's tags can be listed once it holds a manifest, tagged or
//! not, and exactly while the catalog lists it; one that holds nothing, an upload or
//! only blobs is an unknown repository (`Missing::Repository`), though it was written
//! to. On SQLite and on PostgreSQL metadata.

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
use store::error::Missing;
use store::{ByteStream, Error, Store};

fn body(bytes: &Bytes) -> ByteStream {
    Box::pin(futures::stream::iter([Ok::<_, std::io::Error>(
        bytes.clone(),
    )]))
}

fn repo(name: &str) -> RepoName {
    name.parse().unwrap()
}

/// An OCI image manifest over a config blob alone.
fn image(config: &Digest, size: usize) -> Bytes {
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config.to_string(),
            "size": size,
        },
        "layers": [],
    });
    Bytes::from(serde_json::to_vec(&manifest).unwrap())
}

/// `repo`'s tags, `None` when the store calls it unknown.
async fn tags(store: &Store, name: &str) -> Option<Vec<String>> {
    match store.tags(&repo(name), 100, None).await {
        Ok(page) => Some(page.items),
        Err(Error::NotFound(Missing::Repository)) => None,
        Err(e) => panic!("tags of {name}: {e}"),
    }
}

backend::on_each_backend! {
    #[tokio::test]
    async fn tags_are_listed_once_a_repository_holds_a_manifest;
}

async fn tags_are_listed_once_a_repository_holds_a_manifest(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let metadata = backend.create(&dir.path().join("data"));
    let store = Store::open(&metadata.config()).await.unwrap();
    let config = Bytes::from_static(b"{\"os\":\"linux\"}");
    let digest = Digest::sha256_of(&config);
    let manifest = image(&digest, config.len());
    let media_type = Some("application/vnd.oci.image.manifest.v1+json");
    let by_digest = Reference::Digest(Digest::sha256_of(&manifest));
    let v1 = Reference::Tag("v1".parse().unwrap());

    store.start_upload(&repo("cache/uploading")).await.unwrap();
    for name in ["cache/blobs", "cache/by-digest", "cache/tagged"] {
        store
            .put_blob(&repo(name), &digest, body(&config))
            .await
            .unwrap();
    }
    store
        .put_manifest(
            &repo("cache/by-digest"),
            &by_digest,
            media_type,
            manifest.clone(),
        )
        .await
        .unwrap();
    store
        .put_manifest(&repo("cache/tagged"), &v1, media_type, manifest.clone())
        .await
        .unwrap();

    let name = backend.name();
    assert_eq!(tags(&store, "cache/never").await, None, "{name}");
    for written in ["cache/uploading", "cache/blobs"] {
        assert_eq!(tags(&store, written).await, None, "{written} on {name}");
        assert!(
            store.has_repository(&repo(written)).await.unwrap(),
            "{written} on {name}"
        );
    }
    assert!(!store.has_repository(&repo("cache/never")).await.unwrap());
    assert_eq!(
        tags(&store, "cache/by-digest").await,
        Some(vec![]),
        "{name}"
    );
    assert_eq!(
        tags(&store, "cache/tagged").await,
        Some(vec!["v1".to_owned()]),
        "{name}"
    );
    let catalog = store.catalog(100, None).await.unwrap().items;
    assert_eq!(catalog, ["cache/by-digest", "cache/tagged"], "{name}");

    // Untagged, it still holds its manifest; with the manifest gone, it holds none.
    store
        .delete_manifest(&repo("cache/tagged"), &v1)
        .await
        .unwrap();
    assert_eq!(tags(&store, "cache/tagged").await, Some(vec![]), "{name}");
    store
        .delete_manifest(&repo("cache/tagged"), &by_digest)
        .await
        .unwrap();
    assert_eq!(tags(&store, "cache/tagged").await, None, "{name}");
    let catalog = store.catalog(100, None).await.unwrap().items;
    assert_eq!(catalog, ["cache/by-digest"], "{name}");
}
