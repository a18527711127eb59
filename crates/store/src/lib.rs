//! layercache's storage engine. It knows nothing about HTTP.
//!
//! * [`blob`]: content-addressed bytes, verified while they stream in and made visible
//!   only once durable (invariant 1).
//! * [`meta`]: repositories, tags, manifests and what they reference, blob links,
//!   upload sessions and access times (SQLite embedded).
//! * [`Store`]: the registry operations built from both, used by the HTTP edge, and
//!   eviction, which keeps them inside a disk quota.

pub mod blob;
pub mod config;
mod entries;
pub mod error;
mod evict;
mod fill;
pub mod meta;
mod registry;
pub mod upload;

pub use blob::{BlobStore, ByteRange, ByteStream, Caching};
pub use config::Config;
pub use entries::EntryRead;
pub use error::{Error, Result, SourceFailure};
pub use evict::{EvictedRoot, GcReport, Quota, Trigger, Usage};
pub use fill::{Fill, Source};
pub use meta::{Entry, EntryQuery, EntryRoot, NewEntry, RepoUsage, SessionFilter, SessionRecord};
pub use registry::{BlobRead, PutManifest, Store};
pub use upload::UploadId;

/// Milliseconds since the Unix epoch: cache entries' creation, which orders entries
/// saved within the same second.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Stop `body` with [`std::io::ErrorKind::FileTooLarge`] once it passes `limit` bytes.
pub(crate) fn limited(body: ByteStream, limit: u64) -> ByteStream {
    use futures::StreamExt;
    let mut seen = 0u64;
    Box::pin(body.map(move |chunk| {
        let chunk = chunk?;
        seen += chunk.len() as u64;
        if seen > limit {
            return Err(std::io::ErrorKind::FileTooLarge.into());
        }
        Ok(chunk)
    }))
}

/// `error`, or `instead` when it is the stop [`limited`] makes.
pub(crate) fn too_large(error: Error, instead: Error) -> Error {
    match error {
        Error::Body(e) if e.kind() == std::io::ErrorKind::FileTooLarge => instead,
        e => e,
    }
}

/// Seconds since the Unix epoch, the time unit of the other stored timestamps.
pub(crate) fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
