//! Content-addressed blob storage.
//!
//! [`BlobStore`] wraps a [`BlobBackend`] and owns what every medium must get right:
//! hashing while bytes stream in (on a blocking thread, off the async reactor), and
//! refusing to commit content that does not hash to its digest (invariant 1). Memory
//! stays flat: bodies move through bounded queues, never buffered whole (invariant 4).

mod backend;
mod fs;
mod s3;

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use oci::{Algorithm, Digest, Hasher};
use tokio::sync::mpsc;

pub use backend::{BlobBackend, Staged};
pub use fs::FsBackend;
pub use s3::S3Backend;

use crate::meta::{MetaStore, SharedLock};
use crate::upload::UploadId;
use crate::{Error, Result};

/// A stream of body bytes, in or out.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// Batches queued for the hashing thread.
const HASH_QUEUE: usize = 8;
/// Most body chunks grouped into one batch. A batch holds only chunks that were already
/// received, so grouping never delays bytes; it lets the hashing and writing threads
/// wake once per batch instead of once per network read.
pub(crate) const BATCH_CHUNKS: usize = 64;

/// A byte range of a blob: `len` bytes from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// Number of bytes.
    pub len: u64,
}

/// Number of digest lock stripes.
const LOCK_STRIPES: usize = 256;

/// Blob storage with verification; what the rest of the program uses.
#[derive(Clone)]
pub struct BlobStore {
    backend: Arc<dyn BlobBackend>,
    /// Striped by digest: publishing a blob (and linking it) and sweeping it exclude
    /// each other, so a sweep never deletes a file published after it decided.
    locks: Arc<[tokio::sync::Mutex<()>]>,
    /// The same exclusion between nodes sharing the metadata.
    meta: Arc<dyn MetaStore>,
}

/// Holds the locks of some digests; they are released when it is dropped.
pub struct DigestLocks<'a> {
    _held: Vec<tokio::sync::MutexGuard<'a, ()>>,
    _shared: Option<SharedLock>,
}

/// Pass `body` through unchanged while a blocking thread hashes it; the returned task
/// yields the hasher once the stream has been consumed (or dropped).
fn tee_hash(body: ByteStream, mut hasher: Hasher) -> (ByteStream, tokio::task::JoinHandle<Hasher>) {
    let (tx, mut rx) = mpsc::channel::<Vec<Bytes>>(HASH_QUEUE);
    let task = tokio::task::spawn_blocking(move || {
        while let Some(batch) = rx.blocking_recv() {
            batch.iter().for_each(|chunk| hasher.update(chunk));
        }
        hasher
    });
    let stream = body
        .ready_chunks(BATCH_CHUNKS)
        .then(move |batch| {
            let tx = tx.clone();
            async move {
                let chunks = batch
                    .iter()
                    .filter_map(|c| c.as_ref().ok())
                    .cloned()
                    .collect();
                // The hashing thread only stops when this stream is dropped.
                let _ = tx.send(chunks).await;
                futures::stream::iter(batch)
            }
        })
        .flatten();
    (Box::pin(stream), task)
}

impl BlobStore {
    /// Wrap a backend whose blobs `meta` records.
    pub fn new(backend: Arc<dyn BlobBackend>, meta: Arc<dyn MetaStore>) -> BlobStore {
        let locks = (0..LOCK_STRIPES)
            .map(|_| tokio::sync::Mutex::new(()))
            .collect();
        BlobStore {
            backend,
            locks,
            meta,
        }
    }

    /// Lock `digests` (in stripe order, so two holders never deadlock), in this process
    /// and then for every node sharing the metadata.
    pub async fn lock_digests(&self, digests: &[Digest]) -> Result<DigestLocks<'_>> {
        let mut stripes: Vec<usize> = digests
            .iter()
            .map(|d| {
                let hash = d
                    .hex()
                    .bytes()
                    .take(4)
                    .fold(0usize, |h, b| h * 31 + usize::from(b));
                hash % LOCK_STRIPES
            })
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut held = Vec::with_capacity(stripes.len());
        for stripe in stripes {
            if let Some(lock) = self.locks.get(stripe) {
                held.push(lock.lock().await);
            }
        }
        Ok(DigestLocks {
            _held: held,
            _shared: self.meta.lock_blobs(digests).await?,
        })
    }

    /// Every committed blob.
    pub async fn list(&self) -> Result<Vec<Digest>> {
        self.backend.list().await
    }

    /// Every staging area.
    pub async fn staged(&self) -> Result<Vec<Staged>> {
        self.backend.staged().await
    }

    /// Size of a committed blob, or `None`.
    pub async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        self.backend.stat(digest).await
    }

    /// Stream a committed blob or a range of it; `None` when absent.
    pub async fn read(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>> {
        self.backend.read(digest, range).await
    }

    /// A URL from which a client may read the committed blob directly for a while, when
    /// the backend offers one; `None` means the bytes are served through this server.
    pub async fn redirect(&self, digest: &Digest) -> Result<Option<String>> {
        self.backend.redirect(digest).await
    }

    /// The committed blob as an open local file, when the backend keeps files.
    pub async fn local_file(&self, digest: &Digest) -> Result<Option<std::fs::File>> {
        self.backend.local_file(digest).await
    }

    /// Create an empty staging area for `id`.
    pub async fn create_staged(&self, id: &UploadId) -> Result<()> {
        self.backend.create_staged(id).await
    }

    /// Current length of a staging area, or `None`.
    pub async fn staged_len(&self, id: &UploadId) -> Result<Option<u64>> {
        self.backend.staged_len(id).await
    }

    /// Append `body` at `offset`, hashing it into `hasher`; returns the new length and
    /// the updated hasher. On error the staging area is unchanged and the hasher lost.
    pub async fn append(
        &self,
        id: &UploadId,
        offset: u64,
        body: ByteStream,
        hasher: Hasher,
    ) -> Result<(u64, Hasher)> {
        let (body, hashing) = tee_hash(body, hasher);
        let len = self.backend.append(id, offset, body).await?;
        Ok((len, hashing.await?))
    }

    /// Hash a staging area from its first byte (hash state is lost on restart).
    pub async fn rehash(&self, id: &UploadId, algorithm: Algorithm) -> Result<(u64, Hasher)> {
        let (mut stream, hashing) = tee_hash(
            self.backend.read_staged(id, 0).await?,
            Hasher::new(algorithm),
        );
        let mut len = 0u64;
        while let Some(chunk) = stream.next().await {
            len += chunk?.len() as u64;
        }
        drop(stream);
        Ok((len, hashing.await?))
    }

    /// Verify the staged content's hash against `expected` and make it visible under
    /// it. On a mismatch the staging area is discarded and nothing becomes visible.
    /// Returns holding the digest's lock, for the caller to record the blob under it.
    pub async fn commit(
        &self,
        id: &UploadId,
        expected: &Digest,
        hasher: Hasher,
    ) -> Result<DigestLocks<'_>> {
        let actual = hasher.finish();
        if actual != *expected {
            self.backend.discard(id).await?;
            return Err(Error::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        let locked = self.lock_digests(std::slice::from_ref(expected)).await?;
        self.backend.commit(id, expected).await?;
        Ok(locked)
    }

    /// Make the staged content visible under the digest it hashes to (`hasher` saw
    /// exactly its bytes). Returns the digest, holding its lock.
    pub async fn commit_as_hashed(
        &self,
        id: &UploadId,
        hasher: Hasher,
    ) -> Result<(Digest, DigestLocks<'_>)> {
        let digest = hasher.finish();
        let locked = self.lock_digests(std::slice::from_ref(&digest)).await?;
        self.backend.commit(id, &digest).await?;
        Ok((digest, locked))
    }

    /// Stream a staging area from `offset` to its current end.
    pub async fn read_staged(&self, id: &UploadId, offset: u64) -> Result<ByteStream> {
        self.backend.read_staged(id, offset).await
    }

    /// Remove a staging area.
    pub async fn discard(&self, id: &UploadId) -> Result<()> {
        self.backend.discard(id).await
    }

    /// Remove a committed blob.
    pub async fn delete(&self, digest: &Digest) -> Result<()> {
        self.backend.delete(digest).await
    }
}
