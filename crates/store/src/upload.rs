//! Upload sessions: their ids, and the in-memory hash state that lets a chunked upload
//! continue without re-reading what it already received (a hash that may still be
//! catching up with the last chunk on its thread: the next chunk's hashing queues
//! behind it, so a chunked upload's pipeline never drains between chunks).
//!
//! The staging file is the source of truth for an upload's length; the hash state is
//! a cache of it. After a restart (or a failed chunk) the state is rebuilt by hashing
//! the staging file once, so an upload survives restarts.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use crate::blob::PendingHash;

/// The id of an upload session: a UUID, so it is always safe as a file name.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct UploadId(String);

impl UploadId {
    /// A fresh random id.
    pub fn random() -> UploadId {
        UploadId(uuid::Uuid::new_v4().to_string())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The text is not an upload id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not an upload id")]
pub struct InvalidUploadId;

impl FromStr for UploadId {
    type Err = InvalidUploadId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let uuid = uuid::Uuid::try_parse(s).map_err(|_| InvalidUploadId)?;
        let canonical = uuid.hyphenated().to_string();
        if canonical != s {
            return Err(InvalidUploadId);
        }
        Ok(UploadId(canonical))
    }
}

impl fmt::Display for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Hash of the first `len` bytes of an upload.
pub(crate) struct HashState {
    pub len: u64,
    pub hasher: PendingHash,
}

/// The lock guarding one upload's hash state; holding it serializes that upload's writes.
pub(crate) type UploadLock = Arc<tokio::sync::Mutex<Option<HashState>>>;

/// Per-upload locks and hash states of the uploads this process has seen.
#[derive(Default)]
pub(crate) struct HashStates {
    map: Mutex<HashMap<UploadId, UploadLock>>,
}

impl HashStates {
    /// The lock for `id`, created empty on first use.
    pub fn lock_for(&self, id: &UploadId) -> UploadLock {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(id.clone()).or_default().clone()
    }

    /// Forget `id` (finished or cancelled).
    pub fn forget(&self, id: &UploadId) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_uuids_are_upload_ids() {
        let id = UploadId::random();
        assert_eq!(id.as_str().parse::<UploadId>(), Ok(id.clone()));
        for bad in [
            "",
            "..",
            "../../etc",
            "not-a-uuid",
            &id.as_str().to_uppercase(),
        ] {
            assert!(bad.parse::<UploadId>().is_err(), "{bad:?}");
        }
    }
}
