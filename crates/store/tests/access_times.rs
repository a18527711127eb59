//! Reads are recorded as last use in batches, written in several metadata writes when a
//! burst of reads makes a batch large: every read of the burst is recorded once a flush
//! returns, even one that started while another was writing. On SQLite and on
//! PostgreSQL metadata.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod backend;

use backend::Backend;
use bytes::Bytes;
use oci::{Digest, RepoName};
use store::{ByteStream, Store};

/// Blobs read in the burst: several times what one metadata write records.
const BURST: usize = 1000;

fn body(bytes: &Bytes) -> ByteStream {
    Box::pin(futures::stream::iter([Ok::<_, std::io::Error>(
        bytes.clone(),
    )]))
}

fn now_secs() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    i64::try_from(since.unwrap().as_secs()).unwrap()
}

backend::on_each_backend! {
    #[tokio::test]
    async fn every_read_of_a_burst_is_recorded;
}

async fn every_read_of_a_burst_is_recorded(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let metadata = backend.create(&dir.path().join("data"));
    let store = Store::open(&metadata.config()).await.unwrap();
    let repo: RepoName = "cache/app".parse().unwrap();
    let blobs: Vec<(Digest, Bytes)> = (0..BURST)
        .map(|i| {
            let bytes = Bytes::from(format!("blob {i}"));
            (Digest::sha256_of(&bytes), bytes)
        })
        .collect();
    for (digest, bytes) in &blobs {
        store.put_blob(&repo, digest, body(bytes)).await.unwrap();
    }
    // Their last use, as recorded by the pushes, an hour back.
    let changed = metadata.execute("UPDATE blobs SET accessed_at = accessed_at - 3600");
    assert_eq!(changed, BURST as u64);
    let before = now_secs();
    for (digest, _) in &blobs {
        drop(store.open_blob(&repo, digest).await.unwrap());
    }
    // A flush already writing (as the background one may be) does not let the next
    // return before the reads it is writing are recorded.
    let writing = tokio::spawn({
        let store = store.clone();
        async move { store.flush_access_times().await }
    });
    tokio::task::yield_now().await;
    store.flush_access_times().await.unwrap();
    let stale: Vec<(i64,)> = metadata.query(&format!(
        "SELECT count(*) FROM blobs WHERE accessed_at < {before}"
    ));
    assert_eq!(stale, [(0,)], "reads of the burst left unrecorded");
    writing.await.unwrap().unwrap();
}
