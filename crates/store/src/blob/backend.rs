//! The small contract every blob medium implements. Backends only move bytes; the
//! [`BlobStore`](super::BlobStore) above them owns hashing and verification, so no
//! backend can forget them.
//!
//! A staging area that does not exist is [`Error::NotFound`](crate::Error::NotFound)
//! of [`Missing::Upload`](crate::error::Missing::Upload) for `append`, `read_staged`
//! and `commit`.

use async_trait::async_trait;
use oci::Digest;

use super::{ByteRange, ByteStream};
use crate::Result;
use crate::upload::UploadId;

/// Byte storage addressed by digest, with invisible staging areas for uploads.
#[async_trait]
pub trait BlobBackend: Send + Sync + 'static {
    /// Size of a committed blob, or `None`.
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>>;
    /// Stream a committed blob, or the given range of it; `None` when absent.
    async fn read(&self, digest: &Digest, range: Option<ByteRange>) -> Result<Option<ByteStream>>;
    /// [`read`](Self::read), without keeping the bytes in memory where the medium can
    /// (the local filesystem reads them by direct I/O, unless they are in its page cache
    /// already).
    async fn read_uncached(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>> {
        self.read(digest, range).await
    }
    /// Create an empty staging area.
    async fn create_staged(&self, id: &UploadId) -> Result<()>;
    /// Current length of a staging area, or `None` when it does not exist.
    async fn staged_len(&self, id: &UploadId) -> Result<Option<u64>>;
    /// Append `body` to a staging area that must currently be `offset` bytes long
    /// ([`Error::RangeInvalid`](crate::Error::RangeInvalid) otherwise); returns the new
    /// length. On failure the area is left at `offset` bytes.
    async fn append(&self, id: &UploadId, offset: u64, body: ByteStream) -> Result<u64>;
    /// [`append`](Self::append), without keeping the bytes in memory where the medium
    /// can (the local filesystem writes them by direct I/O).
    async fn append_uncached(&self, id: &UploadId, offset: u64, body: ByteStream) -> Result<u64> {
        self.append(id, offset, body).await
    }
    /// Stream a staging area's bytes from `offset` to its current end (to rebuild hash
    /// state after a restart, or to follow a blob being filled).
    async fn read_staged(&self, id: &UploadId, offset: u64) -> Result<ByteStream>;
    /// Make a staging area visible under `digest`, durably and atomically (readers see
    /// the whole blob or nothing; committing content already there is harmless).
    async fn commit(&self, id: &UploadId, digest: &Digest) -> Result<()>;
    /// Remove a staging area (no error when it is already gone).
    async fn discard(&self, id: &UploadId) -> Result<()>;
    /// Remove a committed blob (no error when it is already gone).
    async fn delete(&self, digest: &Digest) -> Result<()>;
    /// Every committed blob.
    async fn list(&self) -> Result<Vec<Digest>>;
    /// Every staging area.
    async fn staged(&self) -> Result<Vec<Staged>>;
    /// A URL from which a client may read the committed blob directly for a while,
    /// when the medium offers one (`None`: serve the bytes through this server).
    async fn redirect(&self, _digest: &Digest) -> Result<Option<String>> {
        Ok(None)
    }
}

/// A staging area as eviction sees it.
#[derive(Debug, Clone)]
pub struct Staged {
    /// Its upload.
    pub id: UploadId,
    /// Bytes received so far.
    pub len: u64,
    /// Time since it was last written.
    pub idle: std::time::Duration,
}
