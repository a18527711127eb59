//! [`Store`]: the registry's operations, composed from the blob store and the metadata
//! store. This is the only API the HTTP edge calls.
//!
//! Order of effects protects the invariants: bytes are committed (durable, verified)
//! before metadata links them; a manifest is recorded only in the same transaction that
//! finds everything it references.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use oci::{Algorithm, CacheRecords, Digest, Hasher, Manifest, Reference, RepoName};

use crate::blob::{BlobBackend, BlobStore, ByteRange, ByteStream, Caching, FsBackend};
use crate::config::{Blobs, Config, Meta, Size};
use crate::error::Missing;
use crate::evict::{Evictor, Trigger};
use crate::meta::{
    ManifestRecord, MetaStore, Page, Referrer, SessionFilter, SessionRecord, SqliteMeta,
    StoredManifest, Touch,
};
use crate::upload::{HashState, HashStates, UploadId};
use crate::{Error, Result, now_secs};

/// Largest image config read to learn whether it carries inline cache.
const MAX_CONFIG_BYTES: u64 = 8 << 20;
/// How soon a pass prompted by a write looks again when another node was running one.
const LEADER_RETRY: Duration = Duration::from_secs(1);
/// How often recorded reads are written to the metadata store.
const ACCESS_FLUSH_INTERVAL: Duration = Duration::from_secs(2);
/// Most recorded reads written in one metadata write. A flush after a burst of reads
/// (thousands of manifests and blobs) holds the single metadata writer one step at a
/// time, so the uploads and manifest pushes queued behind it wait for a step, not for
/// the whole batch.
const TOUCHES_PER_WRITE: usize = 256;

/// The registry storage: blobs, metadata, uploads. Cheap to clone (one shared state).
#[derive(Clone)]
pub struct Store(pub(crate) Arc<Shared>);

/// What every clone of a [`Store`] shares.
pub(crate) struct Shared {
    /// Held for the store's life: one process per data directory (nodes sharing a bucket
    /// and a database each have their own, and coordinate through the database).
    _lock: std::fs::File,
    pub(crate) data_dir: PathBuf,
    /// What the quota is measured against.
    pub(crate) quota_base: QuotaBase,
    pub(crate) blobs: BlobStore,
    pub(crate) meta: Arc<dyn MetaStore>,
    pub(crate) hashes: HashStates,
    pub(crate) access: AccessLog,
    pub(crate) evictor: Evictor,
    pub(crate) fills: crate::fill::Fills,
    /// Which cache entries are being read again.
    pub(crate) rereads: crate::entries::Rereads,
    max_manifest_bytes: usize,
    pub(crate) max_blob_bytes: Option<u64>,
}

/// A blob found in a repository, ready to be read.
pub struct BlobRead {
    store: BlobStore,
    digest: Digest,
    /// The blob's size in bytes.
    pub size: u64,
}

impl BlobRead {
    /// A URL the client may read the whole blob from directly, when the blob medium
    /// offers one and is configured to.
    pub async fn redirect(&self) -> Result<Option<String>> {
        self.store.redirect(&self.digest).await
    }

    /// Stream the whole blob, or `range` of it.
    pub async fn stream(self, range: Option<ByteRange>) -> Result<ByteStream> {
        self.store
            .read(&self.digest, range, Caching::Keep)
            .await?
            .ok_or(Error::NotFound(Missing::Blob))
    }
}

/// What a manifest PUT stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutManifest {
    /// The manifest's digest.
    pub digest: Digest,
    /// Its `subject`, if it has one.
    pub subject: Option<Digest>,
}

/// Reads waiting to be recorded as last use, with the second each happened last,
/// flushed in batches so reads stay cheap. A read stays pending until its batch is
/// written, so an eviction pass sees it either here or in the metadata.
#[derive(Default)]
pub(crate) struct AccessLog {
    pending: Mutex<HashMap<Touch, i64>>,
    /// Held while a flush writes: a flush returns only once every read recorded before
    /// it is written, even when another flush (the background one) had taken it.
    flushing: tokio::sync::Mutex<()>,
}

impl AccessLog {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<Touch, i64>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn record(&self, touch: Touch) {
        self.pending().insert(touch, now_secs());
    }

    /// Whether a read of blob `digest` is waiting to be recorded.
    pub(crate) fn pending_blob(&self, digest: &Digest) -> bool {
        self.pending().contains_key(&Touch::Blob(digest.clone()))
    }

    /// Write every pending read; what fails to be written stays pending.
    async fn flush(&self, meta: &dyn MetaStore) -> Result<()> {
        let _one_at_a_time = self.flushing.lock().await;
        let batch: Vec<(Touch, i64)> = self
            .pending()
            .iter()
            .map(|(touch, at)| (touch.clone(), *at))
            .collect();
        for step in batch.chunks(TOUCHES_PER_WRITE) {
            meta.touch(step.to_vec()).await?;
        }
        let mut pending = self.pending();
        for (touch, at) in batch {
            // A read since, in a later second, waits for the next flush.
            if pending.get(&touch) == Some(&at) {
                pending.remove(&touch);
            }
        }
        Ok(())
    }
}

impl Store {
    /// Open the store described by `config`, creating its directory if needed. Must be
    /// called inside a Tokio runtime: it starts the access-time flusher and the evictor
    /// (whose first pass finishes whatever a previous run left).
    pub async fn open(config: &Config) -> Result<Store> {
        let evictor = Evictor::new(config.eviction.clone())?;
        let root = config.data_dir.clone();
        let lock = tokio::task::spawn_blocking(move || -> Result<_> {
            std::fs::create_dir_all(&root)?;
            lock_data_dir(&root)
        })
        .await??;
        let (backend, meta) = open_backends(config).await?;
        let quota_base = match &config.blobs {
            Blobs::Fs => QuotaBase::Disk,
            Blobs::S3(_) => match config.eviction.max_size {
                Size::Bytes(limit) => QuotaBase::Bucket(limit),
                Size::Percent(_) => {
                    return Err(Error::Config(
                        "with blobs in a bucket, store.eviction.max_size must be a size \
                         (like \"500GiB\"): a share of a filesystem means nothing there"
                            .into(),
                    ));
                }
            },
        };
        let store = Store(Arc::new(Shared {
            _lock: lock,
            data_dir: config.data_dir.clone(),
            quota_base,
            blobs: BlobStore::new(backend, meta.clone()),
            meta,
            hashes: HashStates::default(),
            access: AccessLog::default(),
            evictor,
            fills: Default::default(),
            rereads: Default::default(),
            max_manifest_bytes: config.max_manifest_bytes,
            max_blob_bytes: config.max_blob_size.map(|s| s.as_u64()),
        }));
        tokio::spawn(flush_access_times(Arc::downgrade(&store.0)));
        tokio::spawn(evict_in_background(Arc::downgrade(&store.0)));
        Ok(store)
    }

    /// Save a build session's record (replacing an earlier save of it).
    pub async fn save_session(&self, session: SessionRecord) -> Result<()> {
        self.0.meta.save_session(session).await
    }

    /// Records of build sessions active at or after `since` (seconds since the epoch)
    /// that match `filter`, most recent first, at most `limit`.
    pub async fn sessions(
        &self,
        since: i64,
        filter: SessionFilter,
        limit: usize,
    ) -> Result<Vec<SessionRecord>> {
        self.0.meta.sessions(since, filter, limit).await
    }

    /// Forget build sessions that ended before `before` (seconds since the epoch).
    pub async fn prune_sessions(&self, before: i64) -> Result<u64> {
        self.0.meta.prune_sessions(before).await
    }

    /// Write pending access times now (at shutdown).
    pub async fn flush_access_times(&self) -> Result<()> {
        self.0.access.flush(self.0.meta.as_ref()).await
    }

    /// Whether the store can serve: its data directory is there, and the metadata store
    /// and the blob medium each answer one cheap read (a readiness probe; nothing is
    /// written).
    pub async fn ready(&self) -> Result<()> {
        let absent = Digest::sha256_of(b"");
        let data_dir = async {
            let metadata = tokio::fs::metadata(&self.0.data_dir).await?;
            if metadata.is_dir() {
                Ok(())
            } else {
                Err(Error::Io(std::io::Error::from(
                    std::io::ErrorKind::NotADirectory,
                )))
            }
        };
        tokio::try_join!(
            data_dir,
            self.0.meta.blob_size(&absent),
            self.0.blobs.stat(&absent)
        )?;
        Ok(())
    }

    /// Largest manifest accepted, in bytes.
    pub fn max_manifest_bytes(&self) -> usize {
        self.0.max_manifest_bytes
    }

    // ---- blobs ----

    /// Find `digest` in `repo`.
    pub async fn open_blob(&self, repo: &RepoName, digest: &Digest) -> Result<BlobRead> {
        let size = self
            .0
            .meta
            .linked_blob(repo, digest)
            .await?
            .ok_or(Error::NotFound(Missing::Blob))?;
        self.0.access.record(Touch::Blob(digest.clone()));
        Ok(BlobRead {
            store: self.0.blobs.clone(),
            digest: digest.clone(),
            size,
        })
    }

    /// Size of blob `digest` when it is stored in any repository.
    pub async fn stored_blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        self.0.meta.known_blob(digest).await
    }

    /// Remove `digest` from `repo` (the bytes go when nothing else needs them).
    pub async fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<()> {
        if self.0.meta.unlink_blob(repo, digest).await? {
            Ok(())
        } else {
            Err(Error::NotFound(Missing::Blob))
        }
    }

    /// Link an existing blob into `repo` from `from` (or, without `from`, from wherever it
    /// is stored); its size, or `None` when it is not there to mount.
    pub async fn mount_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: Option<&RepoName>,
    ) -> Result<Option<u64>> {
        let size = match from {
            Some(from) => self.0.meta.linked_blob(from, digest).await?,
            None => self.0.meta.known_blob(digest).await?,
        };
        let Some(size) = size else { return Ok(None) };
        // Under the digest's lock, a sweep either removed the blob before the check
        // (nothing to mount) or finds it freshly linked after.
        let _locked = self
            .0
            .blobs
            .lock_digests(std::slice::from_ref(digest))
            .await?;
        if self.0.blobs.stat(digest).await? != Some(size) {
            return Ok(None);
        }
        self.0.meta.link_blob(repo, digest, size).await?;
        self.0.access.record(Touch::Blob(digest.clone()));
        Ok(Some(size))
    }

    /// Store a whole blob sent in one request (monolithic upload).
    pub async fn put_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        body: ByteStream,
    ) -> Result<u64> {
        let id = UploadId::random();
        self.0.blobs.create_staged(&id).await?;
        let result = async {
            let (size, hasher) = self
                .0
                .blobs
                .append(
                    &id,
                    0,
                    self.blob_limit(body, 0),
                    Hasher::new(digest.algorithm()),
                    Caching::Keep,
                )
                .await
                .map_err(|e| self.blob_too_large(e))?;
            let _locked = self.0.blobs.commit(&id, digest, hasher).await?;
            self.0.meta.link_blob(repo, digest, size).await?;
            Ok(size)
        }
        .await;
        if result.is_err() {
            self.0.blobs.discard(&id).await?;
        }
        self.account(result, |&size| size)
    }

    /// `body`, stopped once a blob of which `len` bytes are already received passes
    /// the size limit.
    fn blob_limit(&self, body: ByteStream, len: u64) -> ByteStream {
        match self.0.max_blob_bytes {
            Some(max) => crate::limited(body, max.saturating_sub(len)),
            None => body,
        }
    }

    fn blob_too_large(&self, error: Error) -> Error {
        let limit = self.0.max_blob_bytes.unwrap_or(u64::MAX);
        crate::too_large(error, Error::BlobTooLarge { limit })
    }

    // ---- upload sessions ----

    /// Open an upload session in `repo`.
    pub async fn start_upload(&self, repo: &RepoName) -> Result<UploadId> {
        let id = UploadId::random();
        self.0.blobs.create_staged(&id).await?;
        self.0.meta.create_upload(&id, repo).await?;
        Ok(id)
    }

    async fn check_upload(&self, repo: &RepoName, id: &UploadId) -> Result<()> {
        match self.0.meta.upload_repo(id).await? {
            Some(owner) if owner == *repo => Ok(()),
            _ => Err(Error::NotFound(Missing::Upload)),
        }
    }

    async fn staged_len(&self, id: &UploadId) -> Result<u64> {
        self.0
            .blobs
            .staged_len(id)
            .await?
            .ok_or(Error::NotFound(Missing::Upload))
    }

    /// How many upload sessions are open.
    pub async fn upload_sessions(&self) -> Result<usize> {
        Ok(self.0.meta.uploads().await?.len())
    }

    /// Bytes received so far by an upload session.
    pub async fn upload_offset(&self, repo: &RepoName, id: &UploadId) -> Result<u64> {
        self.check_upload(repo, id).await?;
        self.staged_len(id).await
    }

    /// The hash state for the upload's current length `len`, rebuilt from disk when stale.
    async fn current_hash(
        &self,
        id: &UploadId,
        len: u64,
        state: Option<HashState>,
        algorithm: Algorithm,
    ) -> Result<HashState> {
        match state {
            Some(s) if s.len == len && algorithm == Algorithm::Sha256 => Ok(s),
            _ => {
                let (len, hasher) = self.0.blobs.rehash(id, algorithm).await?;
                Ok(HashState { len, hasher })
            }
        }
    }

    /// Append a chunk to an upload. `start`, when the client sent a `Content-Range`, must
    /// equal the bytes received so far. Returns the new length.
    pub async fn append_upload(
        &self,
        repo: &RepoName,
        id: &UploadId,
        start: Option<u64>,
        body: ByteStream,
    ) -> Result<u64> {
        self.check_upload(repo, id).await?;
        let lock = self.0.hashes.lock_for(id);
        let mut slot = lock.lock().await;
        let len = self.staged_len(id).await?;
        if let Some(start) = start.filter(|&s| s != len) {
            return Err(Error::RangeInvalid {
                expected_offset: len,
                got: start,
            });
        }
        let state = self
            .current_hash(id, len, slot.take(), Algorithm::Sha256)
            .await?;
        let appended = self
            .0
            .blobs
            .append(
                id,
                state.len,
                self.blob_limit(body, len),
                state.hasher,
                Caching::Keep,
            )
            .await
            .map_err(|e| self.blob_too_large(e));
        let (len, hasher) = self.account(appended, |_| 0)?;
        *slot = Some(HashState { len, hasher });
        Ok(len)
    }

    /// Finish an upload: verify what was received against `digest`, commit, link.
    /// A digest mismatch ends the session. Returns the blob's size.
    pub async fn finish_upload(
        &self,
        repo: &RepoName,
        id: &UploadId,
        digest: &Digest,
    ) -> Result<u64> {
        self.check_upload(repo, id).await?;
        let lock = self.0.hashes.lock_for(id);
        let mut slot = lock.lock().await;
        let len = self.staged_len(id).await?;
        let state = self
            .current_hash(id, len, slot.take(), digest.algorithm())
            .await?;
        let committed = self.0.blobs.commit(id, digest, state.hasher).await;
        if let Err(Error::DigestMismatch { .. }) = committed {
            self.end_upload(id).await?;
        }
        let linked = match committed {
            Ok(_locked) => self.0.meta.link_blob(repo, digest, state.len).await,
            Err(e) => Err(e),
        };
        let size = self.account(linked.map(|()| state.len), |&len| len)?;
        self.end_upload(id).await?;
        Ok(size)
    }

    /// Abandon an upload session and its bytes.
    pub async fn cancel_upload(&self, repo: &RepoName, id: &UploadId) -> Result<()> {
        self.check_upload(repo, id).await?;
        let lock = self.0.hashes.lock_for(id);
        let _held = lock.lock().await;
        self.0.blobs.discard(id).await?;
        self.end_upload(id).await
    }

    /// Tell the evictor about a write: it stored `added` bytes, or the disk filled up
    /// and a pass is due now.
    pub(crate) fn account<T>(
        &self,
        outcome: Result<T>,
        added: impl FnOnce(&T) -> u64,
    ) -> Result<T> {
        match &outcome {
            Ok(value) => self.0.evictor.added(added(value)),
            Err(Error::StorageFull) => self.0.evictor.disk_full(),
            Err(_) => {}
        }
        outcome
    }

    pub(crate) async fn end_upload(&self, id: &UploadId) -> Result<()> {
        self.0.meta.remove_upload(id).await?;
        self.0.hashes.forget(id);
        Ok(())
    }

    // ---- manifests and tags ----

    /// Store a manifest under `reference` (a tag, or the digest it must hash to).
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<PutManifest> {
        self.store_manifest(repo, reference, content_type, body, None)
            .await
    }

    /// Store a manifest fetched from an upstream: what it references is filled when
    /// asked for, so none of it needs to be here yet. `records` are the cache records
    /// the upstream gave it, when it said.
    pub async fn put_mirrored_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: Option<&str>,
        body: Bytes,
        records: Option<CacheRecords>,
    ) -> Result<PutManifest> {
        self.store_manifest(repo, reference, content_type, body, Some(records))
            .await
    }

    /// Whether anything was ever written to `repo` (an upload, a blob or a manifest).
    pub async fn has_repository(&self, repo: &RepoName) -> Result<bool> {
        self.0.meta.has_repository(repo).await
    }

    /// Store a manifest; `mirrored` (with the cache records an upstream gave) when its
    /// references are filled on demand.
    async fn store_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: Option<&str>,
        body: Bytes,
        mirrored: Option<Option<CacheRecords>>,
    ) -> Result<PutManifest> {
        if body.len() > self.0.max_manifest_bytes {
            return Err(Error::ManifestTooLarge {
                size: body.len(),
                limit: self.0.max_manifest_bytes,
            });
        }
        let mut parsed = Manifest::parse(content_type, &body)?;
        if mirrored.is_some() {
            parsed
                .references
                .iter_mut()
                .for_each(|r| r.required = false);
        }
        let (digest, tag) = match reference {
            Reference::Digest(d) if d.matches(&body) => (d.clone(), None),
            Reference::Digest(d) => {
                let mut hasher = Hasher::new(d.algorithm());
                hasher.update(&body);
                return Err(Error::DigestMismatch {
                    expected: d.clone(),
                    actual: hasher.finish(),
                });
            }
            Reference::Tag(t) => (Digest::sha256_of(&body), Some(t)),
        };
        let subject = parsed.subject.clone();
        let cache = match mirrored.flatten() {
            Some(records) => records,
            None => self.cache_records(repo, &parsed).await?,
        };
        let record = ManifestRecord {
            digest: digest.clone(),
            media_type: parsed.media_type,
            artifact_type: parsed.artifact_type,
            subject: parsed.subject,
            annotations: parsed.annotations,
            content: body,
            references: parsed.references,
            cache,
        };
        self.0.meta.put_manifest(repo, record, tag).await?;
        Ok(PutManifest { digest, subject })
    }

    /// The cache records `manifest`, about to be stored in `repo`, gives a build that
    /// imports it: read from its image config, or from the children of an index.
    async fn cache_records(&self, repo: &RepoName, manifest: &Manifest) -> Result<CacheRecords> {
        if manifest.cache_export {
            return Ok(CacheRecords::Export);
        }
        if let Some((config, size)) = &manifest.image_config {
            if *size > MAX_CONFIG_BYTES {
                return Ok(CacheRecords::Without);
            }
            let Some(mut stream) = self.0.blobs.read(config, None, Caching::Keep).await? else {
                // The manifest is refused for it.
                return Ok(CacheRecords::Without);
            };
            let mut bytes = Vec::new();
            while let Some(chunk) = stream.next().await {
                bytes.extend_from_slice(&chunk?);
            }
            return Ok(if oci::manifest::has_inline_cache(&bytes) {
                CacheRecords::Inline
            } else {
                CacheRecords::Without
            });
        }
        let children = manifest
            .references
            .iter()
            .filter(|r| r.kind == oci::RefKind::Manifest);
        for child in children {
            let reference = Reference::Digest(child.digest.clone());
            let stored = self.0.meta.get_manifest(repo, &reference).await?;
            if let Some(records) = stored.and_then(|m| m.cache).filter(|c| c.has_records()) {
                return Ok(records);
            }
        }
        Ok(CacheRecords::Without)
    }

    /// The manifest a tag or digest names in `repo`.
    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<StoredManifest> {
        let manifest = {
            // Look up and lease under the barrier eviction waits on (see `evict`).
            let _reading = self.0.evictor.reads.read().await;
            let manifest = self
                .0
                .meta
                .get_manifest(repo, reference)
                .await?
                .ok_or(Error::NotFound(Missing::Manifest))?;
            self.0.evictor.lease([&manifest.digest]);
            manifest
        };
        if let Reference::Tag(tag) = reference {
            self.0.access.record(Touch::Tag(repo.clone(), tag.clone()));
        }
        self.0
            .access
            .record(Touch::Manifest(repo.clone(), manifest.digest.clone()));
        Ok(manifest)
    }

    /// Delete a tag, or a manifest (and its tags) by digest.
    pub async fn delete_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<()> {
        let gone = Error::NotFound(Missing::Manifest);
        match reference {
            Reference::Tag(tag) => {
                if !self.0.meta.delete_tag(repo, tag).await? {
                    return Err(gone);
                }
            }
            Reference::Digest(digest) => {
                let references = self.0.meta.delete_manifest(repo, digest).await?;
                let references = references.ok_or(gone)?;
                // A pull that read it finds the rest for `in_use`, as after an eviction.
                self.0.evictor.lease_if_read(digest, &references).await;
            }
        }
        Ok(())
    }

    /// One page of `repo`'s tags; [`Missing::Repository`] when it holds no manifest
    /// (only blobs or uploads, or nothing), so that its tags can be listed exactly when
    /// the catalog lists it.
    pub async fn tags(&self, repo: &RepoName, n: usize, last: Option<&str>) -> Result<Page> {
        self.0
            .meta
            .tags(repo, n, last)
            .await?
            .ok_or(Error::NotFound(Missing::Repository))
    }

    /// One page of repository names.
    pub async fn catalog(&self, n: usize, last: Option<&str>) -> Result<Page> {
        self.0.meta.repositories(n, last).await
    }

    /// Manifests in `repo` that name `subject`, optionally filtered by artifact type.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>> {
        self.0.meta.referrers(repo, subject, artifact_type).await
    }
}

/// What the quota is measured against.
pub(crate) enum QuotaBase {
    /// The data directory's filesystem (its size and free space).
    Disk,
    /// A bucket: the configured size alone.
    Bucket(u64),
}

/// Open the configured blob and metadata backends.
async fn open_backends(config: &Config) -> Result<(Arc<dyn BlobBackend>, Arc<dyn MetaStore>)> {
    let root = config.data_dir.clone();
    let backend: Arc<dyn BlobBackend> = match &config.blobs {
        Blobs::Fs => Arc::new(tokio::task::spawn_blocking(move || FsBackend::open(&root)).await??),
        Blobs::S3(s3) => Arc::new(crate::blob::S3Backend::connect(s3).await?),
    };
    let path = config.data_dir.join("meta.db");
    let meta: Arc<dyn MetaStore> = match &config.meta {
        Meta::Sqlite => {
            Arc::new(tokio::task::spawn_blocking(move || SqliteMeta::open(&path)).await??)
        }
        Meta::Postgres(postgres) => Arc::new(crate::meta::PgMeta::connect(postgres).await?),
    };
    Ok((backend, meta))
}

/// Lock `root` for this process, or fail if another process holds it.
fn lock_data_dir(root: &std::path::Path) -> Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join("lock"))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(|_| Error::DataDirInUse(root.to_owned()))?;
    Ok(file)
}

/// Record pending reads every [`ACCESS_FLUSH_INTERVAL`] while the store lives.
async fn flush_access_times(store: Weak<Shared>) {
    let mut tick = tokio::time::interval(ACCESS_FLUSH_INTERVAL);
    loop {
        tick.tick().await;
        let Some(store) = store.upgrade() else { return };
        if let Err(e) = store.access.flush(store.meta.as_ref()).await {
            tracing::warn!(error = %e, "recording access times failed");
        }
    }
}

/// Run eviction passes while the store lives: one at startup (removing blob files a
/// crash left unrecorded first), then on every interval, whenever woken, and when
/// released blobs come out of their window.
async fn evict_in_background(store: Weak<Shared>) {
    let Some((interval, wake)) = store
        .upgrade()
        .map(|s| (s.evictor.interval(), s.evictor.wake.clone()))
    else {
        return;
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut trigger = Trigger::Startup;
    loop {
        let Some(store) = store.upgrade().map(Store) else {
            return;
        };
        let mut retry = None;
        match store.gc_unless_running(trigger).await {
            Ok(None) => {
                // Another node is running a pass; one prompted by a write looks again
                // soon, in case that pass measured usage before the write.
                if trigger == Trigger::Quota {
                    retry = Some(LEADER_RETRY);
                }
            }
            Ok(Some(r))
                if r.evicted.is_empty()
                    && r.evicted_entries.is_empty()
                    && r.blobs_removed == 0
                    && r.uploads_expired == 0 => {}
            Ok(Some(r)) => tracing::info!(
                trigger = ?r.trigger,
                evicted = r.evicted.len(),
                evicted_entries = r.evicted_entries.len(),
                blobs = r.blobs_removed,
                freed = r.bytes_freed,
                released_waiting = r.released_bytes,
                uploads = r.uploads_expired,
                usage = r.usage_after.total,
                limit = r.quota.limit,
                seconds = r.seconds,
                "eviction pass"
            ),
            Err(e) => tracing::warn!(error = %e, "eviction pass failed"),
        }
        // Released blobs coming out of their window get a pass of their own.
        let released_due = store
            .next_sweep_at()
            .map(|at| Duration::from_secs(at.saturating_sub(now_secs()).max(1) as u64));
        drop(store);
        trigger = tokio::select! {
            _ = tick.tick() => Trigger::Schedule,
            () = wake.notified() => Trigger::Quota,
            () = sleep_for(retry) => Trigger::Quota,
            () = sleep_for(released_due) => Trigger::Released,
        };
    }
}

/// Sleep for `duration`, or forever without one.
async fn sleep_for(duration: Option<Duration>) {
    match duration {
        Some(duration) => tokio::time::sleep(duration).await,
        None => std::future::pending().await,
    }
}
