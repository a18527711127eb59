//! Cache entries (the GitHub Actions cache) on the same content-addressed store as
//! layers: an entry's bytes are a list of parts, each a blob stored under its own
//! digest, so identical uploads are stored once, parts arrive in any order and in
//! parallel, and assembling an entry copies nothing. Entries count against the same
//! quota and are evicted least recently restored first.
//!
//! No client names a part by its digest (the cache protocols carry none), so parts are
//! addressed by BLAKE3 rather than SHA-256: the hash is the one per-byte cost of a save
//! besides the write, and BLAKE3 costs about a fifth as much (5.7 GB/s against 1.2 on one
//! core here). A part is never stored under a digest a registry client could ask for.
//!
//! Parts are written around the page cache (direct I/O on the filesystem): an entry is
//! written once and restored at the pace of a client that unpacks it, so it gains
//! nothing from staying in memory, where it would push out the registry's hot layers,
//! and on a virtual machine whose free memory goes back to the host, filling fresh
//! page-cache pages was most of a save's CPU. An entry's first restore reads around the
//! page cache too; one read again soon after ([`Rereads`]: a matrix of jobs restoring
//! one cache at once, runs of a workflow one after another) is read through it, so the
//! disk is read about once for all of them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use oci::{Algorithm, Digest, Hasher};

use crate::blob::{ByteRange, ByteStream, Caching};
use crate::error::Missing;
use crate::meta::{Entry, EntryQuery, NewEntry, Part, Touch};
use crate::{Error, Result, Store, UploadId, limited, too_large};

/// The algorithm parts are stored under (see the module).
const PART_ALGORITHM: Algorithm = Algorithm::Blake3;

/// How long after a read of an entry began another read of it counts as a reread.
const REREAD_WINDOW: Duration = Duration::from_secs(600);

/// Most entries whose last read [`Rereads`] remembers at once.
const MAX_REMEMBERED: usize = 4096;

/// When each entry's reads (a restore, or a range of one) began lately, to tell an entry
/// read again (hot: read through the page cache, which then serves the reads after it)
/// from one read once (around it).
#[derive(Default)]
pub(crate) struct Rereads(Mutex<HashMap<i64, Began>>);

/// The reads of one entry begun so far, and when the last one began.
#[derive(Clone, Copy)]
struct Began {
    count: u64,
    last: Instant,
}

/// One read of an entry, as [`Rereads`] numbered it.
#[derive(Clone, Copy)]
struct Reading {
    entry: i64,
    /// Reads of the entry begun before this one.
    number: u64,
    /// Whether one of them began within [`REREAD_WINDOW`] before it.
    reread: bool,
}

impl Rereads {
    fn began(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Began>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A read of `entry` begins.
    fn begin(&self, entry: i64) -> Reading {
        self.begin_at(entry, Instant::now())
    }

    /// A read of `entry` begins at `now`.
    fn begin_at(&self, entry: i64, now: Instant) -> Reading {
        let mut began = self.began();
        if began.len() >= MAX_REMEMBERED && !began.contains_key(&entry) {
            began.retain(|_, b| now.duration_since(b.last) < REREAD_WINDOW);
            if began.len() >= MAX_REMEMBERED {
                began.clear();
            }
        }
        let before = began.get(&entry).copied();
        began.insert(
            entry,
            Began {
                count: before.map_or(0, |b| b.count) + 1,
                last: now,
            },
        );
        Reading {
            entry,
            number: before.map_or(0, |b| b.count),
            reread: before.is_some_and(|b| now.duration_since(b.last) < REREAD_WINDOW),
        }
    }

    /// How `reading` reads its next part: through the page cache when the entry was read
    /// shortly before it, or another read of it has begun since.
    fn caching(&self, reading: Reading) -> Caching {
        let overtaken = || {
            self.began()
                .get(&reading.entry)
                .is_some_and(|b| b.count > reading.number + 1)
        };
        if reading.reread || overtaken() {
            Caching::Keep
        } else {
            Caching::Bypass
        }
    }
}

/// A finished entry, ready to be read.
pub struct EntryRead {
    /// The entry.
    pub entry: Entry,
    /// Its size in bytes.
    pub size: u64,
    parts: Vec<Part>,
    store: Store,
}

impl EntryRead {
    /// The parts covering the whole entry, or `range` of it, each with the range of its
    /// blob that falls inside.
    fn pieces(&self, range: Option<ByteRange>) -> Vec<(Digest, ByteRange)> {
        let (start, end) = range.map_or((0, self.size), |r| (r.start, r.start + r.len));
        self.parts
            .iter()
            .filter(|p| p.start < end && p.start + p.len > start)
            .map(|p| {
                let from = start.max(p.start) - p.start;
                let to = end.min(p.start + p.len) - p.start;
                let range = ByteRange {
                    start: from,
                    len: to - from,
                };
                (p.digest.clone(), range)
            })
            .collect()
    }

    /// Stream the whole entry, or `range` of it (which must lie inside it).
    pub fn stream(self, range: Option<ByteRange>) -> ByteStream {
        let store = self.store.clone();
        let reading = store.0.rereads.begin(self.entry.id);
        let stream = futures::stream::iter(self.pieces(range))
            .then(move |(digest, range)| {
                let store = store.clone();
                let caching = store.0.rereads.caching(reading);
                async move {
                    store
                        .0
                        .blobs
                        .read(&digest, Some(range), caching)
                        .await
                        .map_err(std::io::Error::other)?
                        .ok_or_else(|| gone(&digest))
                }
            })
            .try_flatten();
        Box::pin(stream)
    }
}

/// The error of a part whose blob is no longer stored.
fn gone(digest: &Digest) -> std::io::Error {
    std::io::Error::other(format!("part {digest} is gone"))
}

impl Store {
    /// Reserve an entry for upload.
    pub async fn create_entry(&self, new: NewEntry) -> Result<Entry> {
        self.0.meta.create_entry(new).await
    }

    /// An entry, finished or not.
    pub async fn entry(&self, id: i64) -> Result<Entry> {
        self.0
            .meta
            .entry(id)
            .await?
            .ok_or(Error::NotFound(Missing::Entry))
    }

    /// The entry, finished or not, with exactly this key and version in this scope.
    pub async fn entry_by_key(&self, key: NewEntry) -> Result<Option<Entry>> {
        self.0.meta.entry_by_key(key).await
    }

    /// The finished entry a restore gets, if any.
    pub async fn find_entry(&self, query: EntryQuery) -> Result<Option<Entry>> {
        self.0.meta.find_entry(query).await
    }

    /// Finished entries of `repository` in `scopes` whose key starts with one of
    /// `prefixes` (all when empty), newest first.
    pub async fn list_entries(
        &self,
        repository: &str,
        scopes: Vec<String>,
        prefixes: Vec<String>,
    ) -> Result<Vec<Entry>> {
        self.0
            .meta
            .list_entries(repository.to_owned(), scopes, prefixes)
            .await
    }

    /// Store `body` as a blob under the digest it hashes to, at most `limit` bytes (and
    /// exactly `expected` when given), then let `record` link it while its digest is
    /// locked, so no sweep can remove it in between. Returns the blob and its length.
    async fn store_part(
        &self,
        body: ByteStream,
        limit: u64,
        expected: Option<u64>,
        record: impl AsyncFnOnce(Digest, u64) -> Result<()>,
    ) -> Result<(Digest, u64)> {
        let id = UploadId::random();
        self.0.blobs.create_staged(&id).await?;
        let stored = async {
            let (len, hasher) = self
                .0
                .blobs
                .append(
                    &id,
                    0,
                    limited(body, limit),
                    Hasher::new(PART_ALGORITHM),
                    Caching::Bypass,
                )
                .await
                .map_err(|e| too_large(e, Error::EntryTooLarge { limit }))?;
            if let Some(declared) = expected.filter(|&d| d != len) {
                return Err(Error::ChunkLength {
                    declared,
                    received: len,
                });
            }
            let (digest, _locked) = self.0.blobs.commit_as_hashed(&id, hasher).await?;
            if let Err(e) = record(digest.clone(), len).await {
                // Not recorded (the entry went meanwhile): a file nothing knows must not
                // stay behind, unless the blob is stored for something else too.
                if self.0.meta.blob_size(&digest).await?.is_none() {
                    self.0.blobs.delete(&digest).await?;
                }
                return Err(e);
            }
            Ok((digest, len))
        }
        .await;
        if stored.is_err() {
            self.0.blobs.discard(&id).await?;
        }
        self.account(stored, |(_, len)| *len)
    }

    /// Store the bytes from `start` of an unfinished entry (a chunk with its declared
    /// length, or with `whole`, all of its content). The entry may hold at most `limit`
    /// bytes. Returns the bytes stored.
    pub async fn put_entry_part(
        &self,
        id: i64,
        start: u64,
        declared: Option<u64>,
        whole: bool,
        body: ByteStream,
        limit: u64,
    ) -> Result<u64> {
        self.unfinished_entry(id).await?;
        let room = limit
            .checked_sub(start)
            .ok_or(Error::EntryTooLarge { limit })?;
        if declared.is_some_and(|d| d > room) {
            return Err(Error::EntryTooLarge { limit });
        }
        let meta = &self.0.meta;
        let stored = self
            .store_part(body, room, declared, async |digest, len| {
                let part = Part { start, digest, len };
                meta.add_entry_part(id, part, whole).await
            })
            .await;
        match stored {
            Ok((_, len)) => Ok(len),
            // The room left after `start` ran out: report the entry's limit.
            Err(Error::EntryTooLarge { .. }) => Err(Error::EntryTooLarge { limit }),
            Err(e) => Err(e),
        }
    }

    /// Stage a block of an unfinished entry under its client-chosen id.
    pub async fn put_entry_block(
        &self,
        id: i64,
        block: String,
        body: ByteStream,
        limit: u64,
    ) -> Result<u64> {
        self.unfinished_entry(id).await?;
        let meta = &self.0.meta;
        let (_, len) = self
            .store_part(body, limit, None, async |digest, len| {
                meta.add_entry_block(id, block, digest, len).await
            })
            .await?;
        Ok(len)
    }

    /// Make an unfinished entry's content its staged blocks, in `blocks`' order. No
    /// block makes it empty, as storing an empty whole upload does (an empty list is how
    /// Azure clients commit an empty blob).
    pub async fn assemble_entry(&self, id: i64, blocks: Vec<String>, limit: u64) -> Result<u64> {
        if blocks.is_empty() {
            let nothing: ByteStream = Box::pin(futures::stream::empty());
            return self
                .put_entry_part(id, 0, Some(0), true, nothing, limit)
                .await;
        }
        self.0.meta.assemble_entry(id, blocks, limit).await
    }

    /// Finish an entry whose uploaded bytes cover exactly `size`.
    pub async fn finish_entry(&self, id: i64, size: u64) -> Result<Entry> {
        self.0.meta.finish_entry(id, size).await
    }

    /// Open a finished entry for reading (recorded as a restore).
    pub async fn read_entry(&self, id: i64) -> Result<EntryRead> {
        let entry = self.entry(id).await?;
        let size = entry.size.ok_or(Error::NotFound(Missing::Entry))?;
        let parts = self.0.meta.entry_parts(id).await?;
        self.0.access.record(Touch::Entry(id));
        for part in &parts {
            self.0.access.record(Touch::Blob(part.digest.clone()));
        }
        Ok(EntryRead {
            entry,
            size,
            parts,
            store: self.clone(),
        })
    }

    /// Delete an entry; `false` when there was none.
    pub async fn delete_entry(&self, id: i64) -> Result<bool> {
        self.0.meta.delete_entry(id).await
    }

    /// The unfinished entry `id`, about to receive a part: that activity is recorded as it
    /// starts, so an upload whose parts each take long is not taken for abandoned.
    async fn unfinished_entry(&self, id: i64) -> Result<Entry> {
        let entry = self.entry(id).await?;
        if entry.size.is_some() {
            return Err(Error::EntryFinished);
        }
        self.0.access.record(Touch::Entry(id));
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_restored_once_is_read_around_the_page_cache_and_again_through_it() {
        let rereads = Rereads::default();
        let first = rereads.begin(1);
        assert_eq!(rereads.caching(first), Caching::Bypass);
        assert_eq!(rereads.caching(first), Caching::Bypass, "its own parts");
        let other = rereads.begin(2);
        assert_eq!(rereads.caching(other), Caching::Bypass, "another entry");
        assert_eq!(rereads.caching(first), Caching::Bypass);
        let second = rereads.begin(1);
        assert_eq!(rereads.caching(second), Caching::Keep);
        assert_eq!(
            rereads.caching(first),
            Caching::Keep,
            "the first restore's later parts, once another has begun"
        );
        assert_eq!(rereads.caching(other), Caching::Bypass);
    }

    #[test]
    fn a_restore_long_after_the_last_is_read_around_the_page_cache() {
        let rereads = Rereads::default();
        let start = Instant::now();
        rereads.begin_at(1, start);
        let soon = rereads.begin_at(1, start + REREAD_WINDOW / 2);
        assert_eq!(rereads.caching(soon), Caching::Keep);
        let late = rereads.begin_at(1, start + REREAD_WINDOW / 2 + REREAD_WINDOW);
        assert_eq!(rereads.caching(late), Caching::Bypass);
    }

    #[test]
    fn restores_of_very_many_entries_are_remembered_up_to_a_bound() {
        let rereads = Rereads::default();
        for entry in 0..(MAX_REMEMBERED as i64 + 10) {
            rereads.begin(entry);
            assert!(rereads.began().len() <= MAX_REMEMBERED);
        }
        let again = rereads.begin(MAX_REMEMBERED as i64 + 9);
        assert_eq!(
            rereads.caching(again),
            Caching::Keep,
            "a recent one is kept"
        );
    }
}
