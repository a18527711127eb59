//! Registry metadata: repositories, blob links, manifests with the content they
//! reference, tags, upload sessions and access times.
//!
//! [`MetaStore`] speaks the domain, not key-value: the database does the reference
//! checks inside the same transaction that records a manifest, so a manifest is never
//! recorded pointing at content the repository does not hold.

mod postgres;
mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;
use oci::{CacheRecords, Digest, ManifestReference, Reference, RepoName, Tag};
use tokio::sync::mpsc;

pub use postgres::PgMeta;
pub use sqlite::SqliteMeta;

use crate::upload::UploadId;
use crate::{Error, Result};

/// A manifest to record, with everything it references.
#[derive(Debug, Clone)]
pub struct ManifestRecord {
    /// Digest of `content`.
    pub digest: Digest,
    /// Media type it is served with.
    pub media_type: String,
    /// Artifact type reported by the referrers API.
    pub artifact_type: Option<String>,
    /// The manifest named by its `subject` field.
    pub subject: Option<Digest>,
    /// Annotations reported by the referrers API.
    pub annotations: BTreeMap<String, String>,
    /// The exact bytes the client sent.
    pub content: Bytes,
    /// Blobs and child manifests it references.
    pub references: Vec<ManifestReference>,
    /// The cache records it gives a build that imports it.
    pub cache: CacheRecords,
}

/// A stored manifest as served.
#[derive(Debug, Clone)]
pub struct StoredManifest {
    /// Its digest.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Its bytes.
    pub content: Bytes,
    /// The cache records it gives a build that imports it (`None` when stored before
    /// layercache recorded them).
    pub cache: Option<CacheRecords>,
}

/// One entry of a referrers response.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Referrer {
    /// Media type of the referring manifest.
    pub media_type: String,
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Its artifact type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Its annotations.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// One page of a sorted listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The names on this page, in lexical order.
    pub items: Vec<String>,
    /// Whether more names follow the last one.
    pub more: bool,
}

/// Something that was read, for last-use tracking.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Touch {
    /// A blob was read, checked or mounted.
    Blob(Digest),
    /// A manifest was read.
    Manifest(RepoName, Digest),
    /// A manifest was read through this tag.
    Tag(RepoName, Tag),
    /// A cache entry was restored.
    Entry(i64),
}

/// A manifest nothing else kept needs (no kept index lists it, and it has no subject or
/// its subject is gone): the unit eviction removes, together with its tags.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Root {
    /// Its repository.
    pub repo: RepoName,
    /// Its digest.
    pub digest: Digest,
    /// The tags pointing at it.
    pub tags: Vec<String>,
    /// Last push or read of it or any of its tags, in seconds since the epoch.
    pub last_used: i64,
}

/// A cache entry as eviction sees it: it goes whole, least recently restored first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EntryRoot {
    /// The entry.
    pub id: i64,
    /// Its scope.
    pub scope: String,
    /// Its key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its last restore (or its creation), in seconds since the epoch.
    pub last_used: i64,
}

/// What eviction removes as one unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evictable {
    /// A manifest with its tags.
    Manifest(Root),
    /// A cache entry.
    Entry(EntryRoot),
}

/// A root to consider in an eviction.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The root.
    pub root: Evictable,
    /// Evict it even when enough is already freed (a rule's maximum age passed).
    pub forced: bool,
}

/// An eviction to run: candidates in order, until `need` bytes are freed.
#[derive(Debug, Clone)]
pub struct EvictRequest {
    /// The roots that may go, least recently used first.
    pub candidates: Vec<Candidate>,
    /// Bytes to free; candidates past this point go only if forced.
    pub need: u64,
    /// Unreferenced blobs never released may be swept once idle since before this time.
    pub idle_before: i64,
    /// Released blobs may be swept once unused since before this time.
    pub unused_before: i64,
    /// Change nothing: report what would be evicted and which blobs that would orphan.
    pub dry_run: bool,
}

/// A root eviction removed, with what it referenced.
#[derive(Debug, Clone)]
pub struct Evicted {
    /// The root as it was.
    pub root: Evictable,
    /// The blobs and manifests it referenced.
    pub references: Vec<Digest>,
}

/// A stored blob nothing references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreferenced {
    /// The blob.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Its last upload, check, mount or read, in seconds since the epoch.
    pub last_used: i64,
    /// Whether a root that referenced it was evicted or deleted and nothing used it since
    /// (else it was pushed, or used again, and waits for a manifest for the grace period).
    pub released: bool,
}

/// What an eviction did (or, in a dry run, would do).
#[derive(Debug, Clone, Default)]
pub struct EvictOutcome {
    /// Roots removed.
    pub evicted: Vec<Evicted>,
    /// Unreferenced blobs a sweep may remove now: released ones (including those the
    /// evicted roots just released) unused since before `unused_before`, others idle
    /// since before `idle_before`.
    pub sweepable: Vec<Unreferenced>,
    /// Released blobs still inside their window: they leave at a later pass.
    pub waiting: Vec<Unreferenced>,
    /// Bytes on disk of unreferenced blobs never released, inside their grace.
    pub young_bytes: u64,
    /// Bytes counted as freed towards `need`: the sweepable and waiting blobs, and what
    /// the evicted roots release through the manifests that go after them too.
    pub counted: u64,
}

impl EvictOutcome {
    /// File an unreferenced blob as sweepable now, waiting, or young, and count what
    /// will go.
    pub(crate) fn classify(&mut self, blob: Unreferenced, request: &EvictRequest) {
        let bytes = on_disk(blob.size);
        let due = if blob.released {
            blob.last_used < request.unused_before
        } else {
            blob.last_used < request.idle_before
        };
        if due {
            self.counted += bytes;
            self.sweepable.push(blob);
        } else if blob.released {
            self.counted += bytes;
            self.waiting.push(blob);
        } else {
            self.young_bytes += bytes;
        }
    }
}

/// Blob bytes the metadata accounts for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlobUsage {
    /// Number of stored blobs.
    pub blobs: u64,
    /// Their size on disk (rounded up to whole 4 KiB blocks).
    pub bytes: u64,
    /// Of those, the bytes of released blobs nothing references again: they leave at
    /// the first pass after their window.
    pub released_bytes: u64,
}

/// What one repository holds. A blob linked into several repositories counts in each,
/// so these add up to more than the store's usage when repositories share layers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RepoUsage {
    /// The repository.
    pub repo: RepoName,
    /// Blobs linked into it.
    pub blobs: u64,
    /// Their bytes (as sent, not rounded to disk blocks).
    pub blob_bytes: u64,
    /// Manifests stored in it.
    pub manifests: u64,
    /// Their bytes.
    pub manifest_bytes: u64,
}

/// A lock held for every node sharing the metadata; released when dropped.
pub type SharedLock = Box<dyn std::any::Any + Send + Sync>;

/// Every root `meta` lists, in its order.
#[cfg(test)]
pub(crate) async fn all_roots(meta: &dyn MetaStore) -> Result<Vec<Evictable>> {
    let (into, mut roots) = mpsc::channel(16);
    let collect = async {
        let mut all = Vec::new();
        while let Some(root) = roots.recv().await {
            all.push(root);
        }
        all
    };
    let (listed, all) = tokio::join!(meta.roots(into), collect);
    listed.map(|()| all)
}

/// The metadata operations the registry needs.
#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    // ---- coordination between nodes ----

    /// Lock `digests` for every node sharing this metadata, so that publishing a blob
    /// (its bytes committed, then linked) and sweeping it (forgotten, then its bytes
    /// deleted) exclude each other across nodes. `None` where one process is the only
    /// user (its in-process digest locks suffice).
    async fn lock_blobs(&self, digests: &[Digest]) -> Result<Option<SharedLock>>;
    /// Become the one node running eviction passes until the returned lock is dropped;
    /// with `wait`, wait for the node running one now, else `None` when one does.
    async fn lead(&self, wait: bool) -> Result<Option<SharedLock>>;

    /// Size of `digest` if it is linked into `repo`.
    async fn linked_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>>;
    /// Size of `digest` if any repository links it.
    async fn known_blob(&self, digest: &Digest) -> Result<Option<u64>>;
    /// Record a committed blob and link it into `repo`.
    async fn link_blob(&self, repo: &RepoName, digest: &Digest, size: u64) -> Result<()>;
    /// Remove `repo`'s link to `digest`; `false` when there was none.
    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool>;
    /// Record a manifest (and point `tag` at it) in one transaction, after checking that
    /// everything it requires is in `repo`.
    async fn put_manifest(
        &self,
        repo: &RepoName,
        record: ManifestRecord,
        tag: Option<&Tag>,
    ) -> Result<()>;
    /// Resolve a tag or digest to a stored manifest.
    async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<StoredManifest>>;
    /// Delete a manifest and every tag pointing at it, releasing the blobs it leaves
    /// unreferenced; returns what it referenced, `None` when absent.
    async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<Vec<Digest>>>;
    /// Delete a tag; `false` when absent.
    async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> Result<bool>;
    /// Tags of `repo` after `last`, at most `n`; `None` when the repository holds no
    /// manifest (never written to, or holding only blobs and uploads), as it is then
    /// missing from [`repositories`](Self::repositories) too.
    async fn tags(&self, repo: &RepoName, n: usize, last: Option<&str>) -> Result<Option<Page>>;
    /// Whether anything was ever written to `repo`: an upload started, a blob or a
    /// manifest stored.
    async fn has_repository(&self, repo: &RepoName) -> Result<bool>;
    /// Repositories holding manifests, after `last`, at most `n`.
    async fn repositories(&self, n: usize, last: Option<&str>) -> Result<Page>;
    /// Manifests in `repo` whose subject is `subject`, optionally of one artifact type.
    async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>>;
    /// Record a new upload session for `repo`.
    async fn create_upload(&self, id: &UploadId, repo: &RepoName) -> Result<()>;
    /// The repository an upload session belongs to, if it exists.
    async fn upload_repo(&self, id: &UploadId) -> Result<Option<RepoName>>;
    /// Forget an upload session.
    async fn remove_upload(&self, id: &UploadId) -> Result<()>;
    /// Record the last use of each of `batch` at its time (seconds since the epoch); a
    /// released blob used after its release is taken up again.
    async fn touch(&self, batch: Vec<(Touch, i64)>) -> Result<()>;
    /// Every upload session with the time it started.
    async fn uploads(&self) -> Result<Vec<(UploadId, i64)>>;

    // ---- eviction ----

    /// Send every root and committed cache entry into `into`, least recently used first,
    /// as they are read: the listing's memory does not grow with the store. Stops early,
    /// without an error, once `into` is closed.
    async fn roots(&self, into: mpsc::Sender<Evictable>) -> Result<()>;
    /// Remove candidates in order (each only if it is still a root, unused since it was
    /// listed) until the unreferenced blobs that will go (sweepable now, or released and
    /// waiting out their window) plus what the removed roots release (through the
    /// untagged child manifests only they list and the untagged referrers of whatever
    /// goes too) add up to `need`, then only forced ones; mark what they release as
    /// released; in one transaction, rolled back for a dry run.
    async fn evict(&self, request: EvictRequest) -> Result<EvictOutcome>;
    /// Forget each of `blobs` that is still sweepable (see [`EvictOutcome::sweepable`]),
    /// with its links; returns those forgotten, with their sizes.
    async fn forget_blobs(
        &self,
        blobs: Vec<Digest>,
        idle_before: i64,
        unused_before: i64,
    ) -> Result<Vec<(Digest, u64)>>;
    /// Stored blobs and their bytes.
    async fn blob_usage(&self) -> Result<BlobUsage>;
    /// Bytes the metadata itself occupies on disk.
    async fn footprint(&self) -> Result<u64>;
    /// Size of a stored blob, linked or not.
    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>>;
    /// What each repository holds (those holding nothing are left out), largest first.
    async fn repository_usage(&self) -> Result<Vec<RepoUsage>>;

    // ---- cache entries ----

    /// Reserve an entry (its upload not done yet); [`Error::EntryExists`] when the key
    /// and version are taken in the scope, finished or being uploaded (an upload idle
    /// for ten minutes is abandoned and replaced).
    ///
    /// [`Error::EntryExists`]: crate::Error::EntryExists
    async fn create_entry(&self, entry: NewEntry) -> Result<Entry>;
    /// An entry, finished or not.
    async fn entry(&self, id: i64) -> Result<Option<Entry>>;
    /// The entry, finished or not, with exactly this key and version in this scope.
    async fn entry_by_key(&self, key: NewEntry) -> Result<Option<Entry>>;
    /// The finished entry a restore gets (see [`EntryQuery`]), recorded as used in the
    /// same transaction, so no eviction removes it between the lookup and the download.
    async fn find_entry(&self, query: EntryQuery) -> Result<Option<Entry>>;
    /// Finished entries in `scopes` of `repository` whose key starts with one of
    /// `prefixes` (any key when empty), newest first.
    async fn list_entries(
        &self,
        repository: String,
        scopes: Vec<String>,
        prefixes: Vec<String>,
    ) -> Result<Vec<Entry>>;
    /// Record a stored blob as bytes of an unfinished entry: at `part.start` (replacing
    /// a part there), or as its whole content with `whole`.
    async fn add_entry_part(&self, id: i64, part: Part, whole: bool) -> Result<()>;
    /// Record a stored blob as a staged block of an unfinished entry.
    async fn add_entry_block(&self, id: i64, block: String, digest: Digest, len: u64)
    -> Result<()>;
    /// Make an unfinished entry's content its staged blocks in `blocks`' order, unless
    /// that would exceed `limit` bytes; returns its size.
    async fn assemble_entry(&self, id: i64, blocks: Vec<String>, limit: u64) -> Result<u64>;
    /// Finish an entry whose parts cover exactly `size` bytes.
    async fn finish_entry(&self, id: i64, size: u64) -> Result<Entry>;
    /// An entry's parts, in order.
    async fn entry_parts(&self, id: i64) -> Result<Vec<Part>>;
    /// Delete an entry, releasing the blobs it leaves unreferenced; `false` when absent.
    async fn delete_entry(&self, id: i64) -> Result<bool>;
    /// Delete unfinished entries created before `before_ms`; returns how many.
    async fn expire_entries(&self, before_ms: i64) -> Result<u64>;

    // ---- build sessions ----

    /// Store a build session's record, replacing an earlier save of the same session.
    async fn save_session(&self, session: SessionRecord) -> Result<()>;
    /// Records of sessions active at or after `since` (seconds since the epoch) that
    /// match `filter`, most recent first, at most `limit`.
    async fn sessions(
        &self,
        since: i64,
        filter: SessionFilter,
        limit: usize,
    ) -> Result<Vec<SessionRecord>>;
    /// Forget sessions that ended before `before`; returns how many.
    async fn prune_sessions(&self, before: i64) -> Result<u64>;
}

/// An entry to reserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    /// The repository it belongs to.
    pub repository: String,
    /// The scope (a git ref) it is written in.
    pub scope: String,
    /// Its key.
    pub key: String,
    /// Its version (opaque, matched exactly).
    pub version: String,
}

/// A cache entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its id (never reused).
    pub id: i64,
    /// The repository it belongs to.
    pub repository: String,
    /// Its scope.
    pub scope: String,
    /// Its key.
    pub key: String,
    /// Its version.
    pub version: String,
    /// Its size; `None` until its upload is finished.
    pub size: Option<u64>,
    /// When it was created (finished, once it is), in milliseconds since the epoch.
    pub created_ms: i64,
    /// Its last restore or creation (while unfinished: its last upload activity), in
    /// seconds since the epoch.
    pub last_used: i64,
}

/// A run of an entry's bytes, stored as one blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Offset of its first byte in the entry.
    pub start: u64,
    /// The blob.
    pub digest: Digest,
    /// Its length.
    pub len: u64,
}

/// What a restore looks for, the way GitHub matches: in each scope in turn, an exact
/// match of the first key, then the newest entry whose key starts with the first key,
/// then with each further key in order; only entries of exactly `version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryQuery {
    /// The repository.
    pub repository: String,
    /// Scopes readable, in order.
    pub scopes: Vec<String>,
    /// The primary key, then the restore keys.
    pub keys: Vec<String>,
    /// The version.
    pub version: String,
}

/// Which saved build sessions a query wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionFilter {
    /// Only those that touched this repository.
    pub repo: Option<String>,
    /// Only the one with this id, or those with this name.
    pub session: Option<String>,
}

/// A build session as the metadata keeps it: what queries filter on, and its report as
/// JSON (the HTTP edge owns what a report holds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Its id.
    pub id: String,
    /// The name its client gave it.
    pub name: Option<String>,
    /// The repositories it touched.
    pub repositories: Vec<String>,
    /// First request, in seconds since the epoch.
    pub started_at: i64,
    /// Last request, in seconds since the epoch.
    pub ended_at: i64,
    /// The report.
    pub report: String,
}

/// A blob's size on disk: whole 4 KiB blocks.
pub fn on_disk(size: u64) -> u64 {
    size.div_ceil(4096) * 4096
}

/// Refuse a manifest whose required `reference` the repository does not hold
/// (`stored` is `None`) or holds with another size than the manifest declares: a pull
/// must never be promised more (or fewer) bytes than exist.
fn check_stored_size(reference: &ManifestReference, stored: Option<i64>) -> Result<()> {
    let (digest, kind) = (reference.digest.clone(), reference.kind.as_str());
    let Some(stored) = stored else {
        return Err(Error::ManifestBlobUnknown { digest, kind });
    };
    if stored as u64 != reference.size {
        return Err(Error::ManifestSizeMismatch {
            digest,
            kind,
            declared: reference.size,
            stored: stored as u64,
        });
    }
    Ok(())
}

/// A cache key as keys are matched: ASCII letters folded to lower case, as GitHub's cache
/// service matches keys that differ only in case (the entry keeps the case it was saved
/// with). The databases index the same fold (`lower()` changes only ASCII letters in
/// both).
fn folded(key: &str) -> String {
    key.to_ascii_lowercase()
}

/// The smallest string greater than every string starting with `prefix` (`None` when
/// there is none), so a prefix match is an index range.
fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (u32::from(last) + 1..=u32::from(char::MAX)).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}
