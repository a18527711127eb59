//! The embedded metadata store: SQLite in WAL mode with `synchronous=FULL`, so an
//! acknowledged manifest survives a crash.
//!
//! Writes go to one writer thread that commits them in groups: every write queued while
//! the previous commit was syncing runs in its own savepoint of one transaction, and all
//! are acknowledged after that transaction's single fsync. Reads use a small pool of
//! connections on blocking threads; blob links once found are answered from memory
//! ([`links`]) until a removal.

mod entries;
mod evict;
mod links;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use oci::{Digest, Reference, RepoName, Tag};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use super::{
    BlobUsage, Entry, EntryQuery, EvictOutcome, EvictRequest, Evictable, ManifestRecord, MetaStore,
    NewEntry, Page, Part, Referrer, RepoUsage, SessionFilter, SessionRecord, SharedLock,
    StoredManifest, Touch,
};
use crate::upload::UploadId;
use crate::{Error, Result, now_secs};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS repos (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS blobs (
    digest      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    accessed_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS repo_blobs (
    repo_id INTEGER NOT NULL,
    digest  TEXT NOT NULL,
    PRIMARY KEY (repo_id, digest)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS manifests (
    repo_id       INTEGER NOT NULL,
    digest        TEXT NOT NULL,
    media_type    TEXT NOT NULL,
    artifact_type TEXT,
    subject       TEXT,
    annotations   TEXT NOT NULL,
    content       BLOB NOT NULL,
    created_at    INTEGER NOT NULL,
    accessed_at   INTEGER NOT NULL,
    cache         TEXT,
    PRIMARY KEY (repo_id, digest)
);
CREATE INDEX IF NOT EXISTS manifests_by_subject ON manifests (repo_id, subject) WHERE subject IS NOT NULL;
CREATE TABLE IF NOT EXISTS manifest_refs (
    repo_id         INTEGER NOT NULL,
    manifest_digest TEXT NOT NULL,
    child_digest    TEXT NOT NULL,
    kind            TEXT NOT NULL,
    PRIMARY KEY (repo_id, manifest_digest, child_digest, kind)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS manifest_refs_by_child ON manifest_refs (child_digest);

CREATE TABLE IF NOT EXISTS tags (
    repo_id     INTEGER NOT NULL,
    name        TEXT NOT NULL,
    digest      TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    accessed_at INTEGER NOT NULL,
    PRIMARY KEY (repo_id, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS uploads (
    id         TEXT PRIMARY KEY,
    repo_id    INTEGER NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS repo_blobs_by_digest ON repo_blobs (digest);
CREATE INDEX IF NOT EXISTS tags_by_digest ON tags (repo_id, digest);
CREATE TABLE IF NOT EXISTS sessions (
    id         TEXT PRIMARY KEY,
    name       TEXT,
    repos      TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    ended_at   INTEGER NOT NULL,
    report     TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_by_end ON sessions (ended_at);
CREATE TABLE IF NOT EXISTS cache_entries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    repository  TEXT NOT NULL,
    scope       TEXT NOT NULL,
    key         TEXT NOT NULL,
    version     TEXT NOT NULL,
    size        INTEGER,
    created_ms  INTEGER NOT NULL,
    accessed_at INTEGER NOT NULL,
    UNIQUE (repository, scope, version, key)
);
CREATE TABLE IF NOT EXISTS cache_parts (
    entry_id INTEGER NOT NULL,
    start    INTEGER NOT NULL,
    digest   TEXT NOT NULL,
    len      INTEGER NOT NULL,
    PRIMARY KEY (entry_id, start)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS cache_parts_by_digest ON cache_parts (digest);
CREATE TABLE IF NOT EXISTS cache_blocks (
    entry_id INTEGER NOT NULL,
    block    TEXT NOT NULL,
    digest   TEXT NOT NULL,
    len      INTEGER NOT NULL,
    PRIMARY KEY (entry_id, block)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS cache_blocks_by_digest ON cache_blocks (digest);
CREATE INDEX IF NOT EXISTS cache_entries_by_folded_key
    ON cache_entries (repository, scope, version, lower(key));
CREATE TABLE IF NOT EXISTS released_blobs (
    digest      TEXT PRIMARY KEY,
    released_at INTEGER NOT NULL
) WITHOUT ROWID;
";

const READERS: usize = 4;
/// Write-ahead log pages after which a commit copies the log into the database.
const CHECKPOINT_PAGES: i64 = 128;
/// Bytes of write-ahead log file kept after a checkpoint: the log's next frames overwrite
/// blocks already allocated and cached instead of growing the file again (twice the log
/// between checkpoints, so only a large transaction such as an eviction cuts it back).
const WAL_KEPT_BYTES: i64 = 1 << 20;
/// The writer's page cache, in KiB: twice SQLite's default, so the index pages a
/// group's inserts and reference checks walk stay cached.
const WRITER_CACHE_KIB: i64 = 4 << 10;
/// Each reader's page cache, in KiB. Pages a reader misses come from the kernel's page
/// cache with one `pread`: against 4 MiB, manifest GETs 10 % slower (four alternated
/// runs) for 14 MiB less peak RSS (five alternated runs), which took it below
/// distribution's. The five connections keep at most 8 MiB.
const READER_CACHE_KIB: i64 = 1 << 10;
/// Most writes folded into one transaction.
const MAX_GROUP: usize = 256;
/// Writes waiting for the writer thread.
const WRITE_QUEUE: usize = 1024;

/// What the writer thread learns about a group's commit: `Err` holds the failure.
type Committed = std::result::Result<(), CommitFailed>;

/// Why a group's commit failed, for each of its writes.
#[derive(Debug, Clone)]
enum CommitFailed {
    /// The disk is full.
    DiskFull,
    /// Anything else, as text.
    Other(String),
}

impl From<CommitFailed> for Error {
    fn from(e: CommitFailed) -> Self {
        match e {
            CommitFailed::DiskFull => Error::StorageFull,
            CommitFailed::Other(message) => Error::Commit(message),
        }
    }
}
/// Delivers a write's result once its group's commit is known.
type Deliver = Box<dyn FnOnce(Committed) + Send>;
/// A write, run in its own savepoint inside the writer's current transaction.
type Job = Box<dyn FnOnce(&Connection) -> Deliver + Send>;

/// Metadata in an SQLite database file.
#[derive(Clone)]
pub struct SqliteMeta {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
    readers: Arc<Vec<Mutex<Connection>>>,
    next_reader: Arc<AtomicUsize>,
    links: Arc<links::LinkCache>,
}

/// The writer thread: run queued writes in groups, one transaction (one fsync) each.
fn run_writer(conn: Connection, mut jobs: mpsc::Receiver<Job>) {
    while let Some(first) = jobs.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let failure = format!("starting a transaction: {e}");
            for job in group {
                // Never run a write outside a transaction; tell each caller instead.
                drop(job);
                tracing::error!(error = %failure, "metadata write dropped");
            }
            continue;
        }
        let deliveries: Vec<Deliver> = group.into_iter().map(|job| job(&conn)).collect();
        let committed = conn.execute_batch("COMMIT").map_err(|e| {
            if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
                CommitFailed::DiskFull
            } else {
                CommitFailed::Other(e.to_string())
            }
        });
        if committed.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        for deliver in deliveries {
            deliver(committed.clone());
        }
    }
}

/// Run `f` in a savepoint: its changes stay only if it succeeds.
fn in_savepoint<T>(conn: &Connection, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
    conn.execute_batch("SAVEPOINT write")?;
    let result = f(conn);
    let end = if result.is_ok() {
        "RELEASE write"
    } else {
        "ROLLBACK TO write; RELEASE write"
    };
    conn.execute_batch(end)?;
    result
}

fn connect(path: &Path, cache_kib: i64) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Short, frequent checkpoints: each one stalls the writer for less than a long one
    // (manifest PUTs at 16 connections, five alternated runs: a p99 of 11.3 ms median at
    // 128 pages against 12.6 at 256, 17-19 at 1000, for 9 % fewer PUTs per second than at
    // 256), and the log stays around half a megabyte. Passive checkpoints on a thread of
    // their own, asked for once a commit left 128 pages in the log, did not take that
    // stall off the PUTs: a p99 of 11.4 and 11.9 ms against 8.70 and 8.80 here (alternated
    // 3-round runs; where the time went was not traced).
    conn.pragma_update(None, "wal_autocheckpoint", CHECKPOINT_PAGES)?;
    // A large transaction (an eviction) grows the log; shrink it again once checkpointed.
    // Kept at the log's checkpoint size (512 KiB), the file was cut back after checkpoints
    // and grown again on fresh blocks. Manifest PUTs at 16 connections, alternated 3-round
    // runs: more PUTs and a lower p99 in both pairs (3 328 and 3 711 PUTs/s at 8.15 and
    // 6.56 ms against 2 741 and 2 849 at 9.16 and 7.99), as with a 4 MiB limit in seven
    // of eight pairs.
    conn.pragma_update(None, "journal_size_limit", WAL_KEPT_BYTES)?;
    // No memory mapping of the database: its pages would count in the server's resident
    // memory (58 MiB more after a benchmark run of manifest writes and reads) and lookups
    // were no faster for it.
    conn.pragma_update(None, "cache_size", -cache_kib)?;
    Ok(conn)
}

/// Columns added after a table's first release, for databases created before them.
fn add_missing_columns(conn: &Connection) -> rusqlite::Result<()> {
    let added = [("manifests", "cache", "TEXT")];
    for (table, column, kind) in added {
        let present: bool = conn.query_row(
            "SELECT count(*) FROM pragma_table_info(?1) WHERE name = ?2",
            params![table, column],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !present {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
        }
    }
    Ok(())
}

fn lock(m: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn parse_digest(s: String) -> rusqlite::Result<Digest> {
    Digest::parse_stored(&s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn parse_repo(s: String) -> rusqlite::Result<RepoName> {
    s.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

const REPO_ID: &str = "(SELECT id FROM repos WHERE name = ?1)";

/// Record a stored blob, or its new use when it is already recorded.
fn record_blob(conn: &Connection, digest: &str, size: u64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO blobs (digest, size, created_at, accessed_at) VALUES (?1, ?2, ?3, ?3)
         ON CONFLICT (digest) DO UPDATE SET accessed_at = excluded.accessed_at",
    )?
    .execute(params![digest, size as i64, now_secs()])?;
    take_up(conn, digest, now_secs())
}

/// A released blob used again (uploaded, checked, mounted or read) after the second of
/// its release is taken up by that use: it waits for a manifest like a blob just pushed,
/// no longer counted as freed.
fn take_up(conn: &Connection, digest: &str, used_at: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM released_blobs WHERE digest = ?1 AND released_at < ?2")?
        .execute(params![digest, used_at])?;
    Ok(())
}

fn ensure_repo(conn: &Connection, repo: &RepoName) -> rusqlite::Result<i64> {
    conn.prepare_cached("INSERT INTO repos (name) VALUES (?1) ON CONFLICT (name) DO NOTHING")?
        .execute([repo.as_str()])?;
    conn.prepare_cached("SELECT id FROM repos WHERE name = ?1")?
        .query_row([repo.as_str()], |r| r.get(0))
}

impl SqliteMeta {
    /// Open (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteMeta> {
        let writer = connect(path, WRITER_CACHE_KIB)?;
        writer.execute_batch(SCHEMA)?;
        add_missing_columns(&writer)?;
        let readers = (0..READERS)
            .map(|_| connect(path, READER_CACHE_KIB).map(Mutex::new))
            .collect::<rusqlite::Result<_>>()?;
        let (jobs, queue) = mpsc::channel(WRITE_QUEUE);
        std::thread::Builder::new()
            .name("metadata-writer".into())
            .spawn(move || run_writer(writer, queue))
            .map_err(Error::Io)?;
        Ok(SqliteMeta {
            path: path.to_owned(),
            jobs,
            readers: Arc::new(readers),
            next_reader: Arc::default(),
            links: Arc::default(),
        })
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let readers = self.readers.clone();
        let turn = self.next_reader.fetch_add(1, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || {
            // A free reader if there is one; else wait for this call's turn.
            let conn = match readers.iter().find_map(|m| m.try_lock().ok()) {
                Some(conn) => conn,
                None => readers
                    .get(turn % READERS)
                    .map(lock)
                    .ok_or_else(|| Error::Task("no reader connection".into()))?,
            };
            f(&conn).map_err(Error::from)
        })
        .await?
    }

    /// A read of a few rows by key (an index lookup of microseconds): run at once on the
    /// calling thread when a reader connection is free, which spares the request two
    /// thread hand-offs; else queued like any [`read`](Self::read). Scans use `read`.
    async fn lookup<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let f = match self.readers.iter().find_map(|m| m.try_lock().ok()) {
            Some(conn) => return f(&conn).map_err(Error::from),
            None => f,
        };
        self.read(f).await
    }

    /// Run `f` on the writer thread; it returns once `f`'s changes are durable.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = in_savepoint(conn, f);
            Box::new(move |committed: Committed| {
                let _ = tx.send(committed.map_err(Error::from).and(result));
            })
        });
        let stopped = || Error::Task("the metadata writer stopped".into());
        self.jobs.send(job).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

#[async_trait]
impl MetaStore for SqliteMeta {
    async fn lock_blobs(&self, _digests: &[Digest]) -> Result<Option<SharedLock>> {
        // One process per data directory: its in-process digest locks suffice.
        Ok(None)
    }

    async fn lead(&self, _wait: bool) -> Result<Option<SharedLock>> {
        Ok(Some(Box::new(())))
    }

    async fn linked_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>> {
        let seen = match self.links.linked(repo, digest) {
            Ok(size) => return Ok(Some(size)),
            Err(seen) => seen,
        };
        let (name, hex) = (repo.to_string(), digest.to_string());
        let size = self
            .lookup(move |c| {
                c.prepare_cached(&format!(
                    "SELECT b.size FROM repo_blobs rb JOIN blobs b ON b.digest = rb.digest
                     WHERE rb.repo_id = {REPO_ID} AND rb.digest = ?2"
                ))?
                .query_row(params![name, hex], |r| r.get::<_, i64>(0))
                .optional()
                .map(|s| s.map(|s| s as u64))
            })
            .await?;
        if let Some(size) = size {
            self.links.insert(seen, repo, digest, size);
        }
        Ok(size)
    }

    async fn known_blob(&self, digest: &Digest) -> Result<Option<u64>> {
        if let Some(size) = self.links.known(digest) {
            return Ok(Some(size));
        }
        let digest = digest.to_string();
        self.lookup(move |c| {
            c.prepare_cached(
                "SELECT b.size FROM blobs b WHERE b.digest = ?1
                 AND EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.digest = b.digest)",
            )?
            .query_row([digest], |r| r.get::<_, i64>(0))
            .optional()
            .map(|s| s.map(|s| s as u64))
        })
        .await
    }

    async fn link_blob(&self, repo: &RepoName, digest: &Digest, size: u64) -> Result<()> {
        let (repo, digest) = (repo.clone(), digest.to_string());
        self.write(move |c| {
            let repo_id = ensure_repo(c, &repo)?;
            record_blob(c, &digest, size)?;
            c.prepare_cached("INSERT OR IGNORE INTO repo_blobs (repo_id, digest) VALUES (?1, ?2)")?
                .execute(params![repo_id, digest])?;
            Ok(())
        })
        .await
    }

    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        let (name, hex) = (repo.to_string(), digest.to_string());
        let unlinked = self
            .write(move |c| {
                let n = c
                    .prepare_cached(&format!(
                        "DELETE FROM repo_blobs WHERE repo_id = {REPO_ID} AND digest = ?2"
                    ))?
                    .execute(params![name, hex])?;
                Ok(n > 0)
            })
            .await;
        self.links.unlink(repo, digest);
        unlinked
    }

    async fn put_manifest(
        &self,
        repo: &RepoName,
        record: ManifestRecord,
        tag: Option<&Tag>,
    ) -> Result<()> {
        let (repo, tag) = (repo.clone(), tag.map(|t| t.to_string()));
        self.write(move |c| {
            let now = now_secs();
            let repo_id = ensure_repo(c, &repo)?;
            for reference in record.references.iter().filter(|r| r.required) {
                let sql = match reference.kind {
                    oci::RefKind::Blob => "SELECT b.size FROM repo_blobs r JOIN blobs b ON b.digest = r.digest
                                           WHERE r.repo_id = ?1 AND r.digest = ?2",
                    oci::RefKind::Manifest => "SELECT length(content) FROM manifests WHERE repo_id = ?1 AND digest = ?2",
                };
                let stored: Option<i64> = c
                    .prepare_cached(sql)?
                    .query_row(params![repo_id, reference.digest.to_string()], |r| r.get(0))
                    .optional()?;
                super::check_stored_size(reference, stored)?;
            }
            let digest = record.digest.to_string();
            let inserted = c
                .prepare_cached(
                    "INSERT INTO manifests (repo_id, digest, media_type, artifact_type, subject,
                        annotations, content, created_at, accessed_at, cache)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9)
                     ON CONFLICT (repo_id, digest) DO NOTHING",
                )?
                .execute(params![
                    repo_id,
                    digest,
                    record.media_type,
                    record.artifact_type,
                    record.subject.as_ref().map(|d| d.to_string()),
                    serde_json::to_string(&record.annotations).unwrap_or_else(|_| "{}".into()),
                    &record.content[..],
                    now,
                    record.cache.as_str()
                ])?;
            if inserted == 0 {
                // Pushed again: that is a use too (and classifies one stored unclassified).
                c.prepare_cached(
                    "UPDATE manifests SET accessed_at = max(accessed_at, ?3),
                        cache = coalesce(cache, ?4)
                     WHERE repo_id = ?1 AND digest = ?2",
                )?
                .execute(params![repo_id, digest, now, record.cache.as_str()])?;
            } else {
                let mut insert_ref = c.prepare_cached(
                    "INSERT OR IGNORE INTO manifest_refs (repo_id, manifest_digest, child_digest, kind)
                     VALUES (?1, ?2, ?3, ?4)",
                )?;
                for reference in &record.references {
                    insert_ref.execute(params![
                        repo_id,
                        digest,
                        reference.digest.to_string(),
                        reference.kind.as_str()
                    ])?;
                }
            }
            if let Some(tag) = tag {
                c.prepare_cached(
                    "INSERT INTO tags (repo_id, name, digest, updated_at, accessed_at) VALUES (?1, ?2, ?3, ?4, ?4)
                     ON CONFLICT (repo_id, name) DO UPDATE SET digest = excluded.digest, updated_at = excluded.updated_at",
                )?
                .execute(params![repo_id, tag, digest, now])?;
            }
            Ok(())
        })
        .await
    }

    async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<StoredManifest>> {
        let repo = repo.to_string();
        let (by_tag, key) = match reference {
            Reference::Tag(t) => (true, t.to_string()),
            Reference::Digest(d) => (false, d.to_string()),
        };
        self.lookup(move |c| {
            let sql = if by_tag {
                format!(
                    "SELECT m.digest, m.media_type, m.content, m.cache FROM tags t
                     JOIN manifests m ON m.repo_id = t.repo_id AND m.digest = t.digest
                     WHERE t.repo_id = {REPO_ID} AND t.name = ?2"
                )
            } else {
                format!("SELECT digest, media_type, content, cache FROM manifests WHERE repo_id = {REPO_ID} AND digest = ?2")
            };
            c.prepare_cached(&sql)?
                .query_row(params![repo, key], |r| {
                    Ok(StoredManifest {
                        digest: parse_digest(r.get(0)?)?,
                        media_type: r.get(1)?,
                        content: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                        cache: r
                            .get::<_, Option<String>>(3)?
                            .and_then(|c| oci::CacheRecords::parse(&c)),
                    })
                })
                .optional()
        })
        .await
    }

    async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<Vec<Digest>>> {
        let (repo, digest) = (repo.to_string(), digest.clone());
        self.write(move |c| {
            let repo_id: Option<i64> = c
                .prepare_cached(&format!(
                    "SELECT repo_id FROM manifests WHERE repo_id = {REPO_ID} AND digest = ?2"
                ))?
                .query_row(params![repo, digest.to_string()], |r| r.get(0))
                .optional()?;
            let Some(repo_id) = repo_id else {
                return Ok(None);
            };
            let references = evict::remove_manifest(c, repo_id, &digest)?;
            evict::release(c, &references, &mut Default::default())?;
            Ok(Some(references))
        })
        .await
    }

    async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> Result<bool> {
        let (repo, tag) = (repo.to_string(), tag.to_string());
        self.write(move |c| {
            let n = c
                .prepare_cached(&format!(
                    "DELETE FROM tags WHERE repo_id = {REPO_ID} AND name = ?2"
                ))?
                .execute(params![repo, tag])?;
            Ok(n > 0)
        })
        .await
    }

    async fn tags(&self, repo: &RepoName, n: usize, last: Option<&str>) -> Result<Option<Page>> {
        let (repo, last) = (repo.to_string(), last.unwrap_or("").to_owned());
        self.read(move |c| {
            let Some(repo_id) = c
                .prepare_cached(
                    "SELECT id FROM repos r WHERE name = ?1
                     AND EXISTS (SELECT 1 FROM manifests m WHERE m.repo_id = r.id)",
                )?
                .query_row([&repo], |r| r.get::<_, i64>(0))
                .optional()?
            else {
                return Ok(None);
            };
            let items = c
                .prepare_cached(
                    "SELECT name FROM tags WHERE repo_id = ?1 AND name > ?2 ORDER BY name LIMIT ?3",
                )?
                .query_map(params![repo_id, last, n.saturating_add(1) as i64], |r| {
                    r.get(0)
                })?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(Some(page(items, n)))
        })
        .await
    }

    async fn has_repository(&self, repo: &RepoName) -> Result<bool> {
        let repo = repo.to_string();
        self.read(move |c| {
            c.prepare_cached("SELECT 1 FROM repos WHERE name = ?1")?
                .exists([&repo])
        })
        .await
    }

    async fn repositories(&self, n: usize, last: Option<&str>) -> Result<Page> {
        let last = last.unwrap_or("").to_owned();
        self.read(move |c| {
            let items = c
                .prepare_cached(
                    "SELECT name FROM repos r WHERE name > ?1
                     AND EXISTS (SELECT 1 FROM manifests m WHERE m.repo_id = r.id)
                     ORDER BY name LIMIT ?2",
                )?
                .query_map(params![last, n.saturating_add(1) as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(page(items, n))
        })
        .await
    }

    async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>> {
        let (repo, subject, artifact_type) = (
            repo.to_string(),
            subject.to_string(),
            artifact_type.map(str::to_owned),
        );
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT digest, media_type, artifact_type, annotations, length(content) FROM manifests
                 WHERE repo_id = {REPO_ID} AND subject = ?2 AND (?3 IS NULL OR artifact_type = ?3)
                 ORDER BY created_at, digest"
            ))?
            .query_map(params![repo, subject, artifact_type], |r| {
                Ok(Referrer {
                    digest: parse_digest(r.get(0)?)?,
                    media_type: r.get(1)?,
                    artifact_type: r.get(2)?,
                    annotations: serde_json::from_str(&r.get::<_, String>(3)?).unwrap_or_default(),
                    size: r.get::<_, i64>(4)? as u64,
                })
            })?
            .collect()
        })
        .await
    }

    async fn create_upload(&self, id: &UploadId, repo: &RepoName) -> Result<()> {
        let (id, repo) = (id.to_string(), repo.clone());
        self.write(move |c| {
            let repo_id = ensure_repo(c, &repo)?;
            c.prepare_cached("INSERT INTO uploads (id, repo_id, created_at) VALUES (?1, ?2, ?3)")?
                .execute(params![id, repo_id, now_secs()])?;
            Ok(())
        })
        .await
    }

    async fn upload_repo(&self, id: &UploadId) -> Result<Option<RepoName>> {
        let id = id.to_string();
        let name: Option<String> = self
            .lookup(move |c| {
                c.prepare_cached(
                    "SELECT r.name FROM uploads u JOIN repos r ON r.id = u.repo_id WHERE u.id = ?1",
                )?
                .query_row([id], |r| r.get(0))
                .optional()
            })
            .await?;
        Ok(name.and_then(|n| n.parse().ok()))
    }

    async fn remove_upload(&self, id: &UploadId) -> Result<()> {
        let id = id.to_string();
        self.write(move |c| {
            c.prepare_cached("DELETE FROM uploads WHERE id = ?1")?
                .execute([id])?;
            Ok(())
        })
        .await
    }

    async fn touch(&self, batch: Vec<(Touch, i64)>) -> Result<()> {
        self.write(move |c| {
            for (touch, at) in &batch {
                match touch {
                    Touch::Blob(d) => {
                        let digest = d.to_string();
                        take_up(c, &digest, *at)?;
                        c.prepare_cached(
                            "UPDATE blobs SET accessed_at = max(accessed_at, ?2) WHERE digest = ?1",
                        )?
                        .execute(params![digest, at])?;
                    }
                    Touch::Manifest(repo, d) => {
                        c.prepare_cached(&format!(
                            "UPDATE manifests SET accessed_at = max(accessed_at, ?3)
                             WHERE repo_id = {REPO_ID} AND digest = ?2"
                        ))?
                        .execute(params![
                            repo.as_str(),
                            d.to_string(),
                            at
                        ])?;
                    }
                    Touch::Tag(repo, t) => {
                        c.prepare_cached(&format!(
                            "UPDATE tags SET accessed_at = max(accessed_at, ?3)
                             WHERE repo_id = {REPO_ID} AND name = ?2"
                        ))?
                        .execute(params![
                            repo.as_str(),
                            t.as_str(),
                            at
                        ])?;
                    }
                    Touch::Entry(id) => entries::touch(c, *id, *at)?,
                }
            }
            Ok(())
        })
        .await
    }

    async fn uploads(&self) -> Result<Vec<(UploadId, i64)>> {
        let rows: Vec<(String, i64)> = self
            .read(|c| {
                c.prepare_cached("SELECT id, created_at FROM uploads")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect()
            })
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, at)| Some((id.parse().ok()?, at)))
            .collect())
    }

    async fn roots(&self, into: mpsc::Sender<Evictable>) -> Result<()> {
        self.read(move |c| evict::roots(c, &into)).await
    }

    async fn evict(&self, request: EvictRequest) -> Result<EvictOutcome> {
        self.write(move |c| {
            if !request.dry_run {
                return Ok(evict::evict(c, &request)?);
            }
            c.execute_batch("SAVEPOINT dry_run")?;
            let outcome = evict::evict(c, &request);
            c.execute_batch("ROLLBACK TO dry_run; RELEASE dry_run")?;
            Ok(outcome?)
        })
        .await
    }

    async fn forget_blobs(
        &self,
        blobs: Vec<Digest>,
        idle_before: i64,
        unused_before: i64,
    ) -> Result<Vec<(Digest, u64)>> {
        let forgotten = self
            .write(move |c| Ok(evict::forget_blobs(c, &blobs, idle_before, unused_before)?))
            .await;
        match &forgotten {
            Ok(forgotten) => self
                .links
                .forget(forgotten.iter().map(|(digest, _)| digest)),
            // Which of them went is unknown: forget every link.
            Err(_) => self.links.clear(),
        }
        forgotten
    }

    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        let digest = digest.to_string();
        self.lookup(move |c| {
            c.prepare_cached("SELECT size FROM blobs WHERE digest = ?1")?
                .query_row([digest], |r| r.get::<_, i64>(0))
                .optional()
                .map(|s| s.map(|s| s as u64))
        })
        .await
    }

    async fn repository_usage(&self) -> Result<Vec<RepoUsage>> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT r.name, coalesce(b.n, 0), coalesce(b.bytes, 0), coalesce(m.n, 0),
                    coalesce(m.bytes, 0)
                 FROM repos r
                 LEFT JOIN (SELECT rb.repo_id, count(*) AS n, sum(bl.size) AS bytes
                     FROM repo_blobs rb JOIN blobs bl ON bl.digest = rb.digest
                     GROUP BY rb.repo_id) b ON b.repo_id = r.id
                 LEFT JOIN (SELECT repo_id, count(*) AS n, sum(length(content)) AS bytes
                     FROM manifests GROUP BY repo_id) m ON m.repo_id = r.id
                 WHERE b.n IS NOT NULL OR m.n IS NOT NULL
                 ORDER BY coalesce(b.bytes, 0) + coalesce(m.bytes, 0) DESC, r.name",
            )?
            .query_map([], |r| {
                Ok(RepoUsage {
                    repo: parse_repo(r.get(0)?)?,
                    blobs: r.get::<_, i64>(1)? as u64,
                    blob_bytes: r.get::<_, i64>(2)? as u64,
                    manifests: r.get::<_, i64>(3)? as u64,
                    manifest_bytes: r.get::<_, i64>(4)? as u64,
                })
            })?
            .collect()
        })
        .await
    }

    async fn create_entry(&self, entry: NewEntry) -> Result<Entry> {
        self.write(move |c| entries::create(c, &entry)).await
    }

    async fn entry(&self, id: i64) -> Result<Option<Entry>> {
        self.lookup(move |c| entries::get(c, id)).await
    }

    async fn entry_by_key(&self, key: NewEntry) -> Result<Option<Entry>> {
        self.lookup(move |c| entries::by_key(c, &key)).await
    }

    async fn find_entry(&self, query: EntryQuery) -> Result<Option<Entry>> {
        // Found and marked used in one write: an eviction either took the entry first (a
        // miss) or finds it used since it listed it and keeps it, so a restore is never
        // handed an entry that is gone before its download.
        self.write(move |c| {
            let found = entries::find(c, &query)?;
            if let Some(entry) = &found {
                entries::touch(c, entry.id, now_secs())?;
            }
            Ok(found)
        })
        .await
    }

    async fn list_entries(
        &self,
        repository: String,
        scopes: Vec<String>,
        prefixes: Vec<String>,
    ) -> Result<Vec<Entry>> {
        self.read(move |c| entries::list(c, &repository, &scopes, &prefixes))
            .await
    }

    async fn add_entry_part(&self, id: i64, part: Part, whole: bool) -> Result<()> {
        self.write(move |c| entries::add_part(c, id, &part, whole))
            .await
    }

    async fn add_entry_block(
        &self,
        id: i64,
        block: String,
        digest: Digest,
        len: u64,
    ) -> Result<()> {
        self.write(move |c| entries::add_block(c, id, &block, &digest, len))
            .await
    }

    async fn assemble_entry(&self, id: i64, blocks: Vec<String>, limit: u64) -> Result<u64> {
        self.write(move |c| entries::assemble(c, id, &blocks, limit))
            .await
    }

    async fn finish_entry(&self, id: i64, size: u64) -> Result<Entry> {
        self.write(move |c| entries::finish(c, id, size)).await
    }

    async fn entry_parts(&self, id: i64) -> Result<Vec<Part>> {
        self.lookup(move |c| entries::parts(c, id)).await
    }

    async fn delete_entry(&self, id: i64) -> Result<bool> {
        self.write(move |c| Ok(entries::delete_and_release(c, id)?))
            .await
    }

    async fn expire_entries(&self, before_ms: i64) -> Result<u64> {
        self.write(move |c| entries::expire(c, before_ms)).await
    }

    async fn save_session(&self, session: SessionRecord) -> Result<()> {
        // Each repository between newlines, so a filter matches whole names only.
        let repos = format!("\n{}\n", session.repositories.join("\n"));
        self.write(move |c| {
            c.prepare_cached(
                "INSERT INTO sessions (id, name, repos, started_at, ended_at, report)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (id) DO UPDATE SET repos = excluded.repos,
                    ended_at = excluded.ended_at, report = excluded.report",
            )?
            .execute(params![
                session.id,
                session.name,
                repos,
                session.started_at,
                session.ended_at,
                session.report
            ])?;
            Ok(())
        })
        .await
    }

    async fn sessions(
        &self,
        since: i64,
        filter: SessionFilter,
        limit: usize,
    ) -> Result<Vec<SessionRecord>> {
        self.read(move |c| {
            c.prepare_cached(
                "SELECT id, name, repos, started_at, ended_at, report FROM sessions
                 WHERE ended_at >= ?1
                   AND (?2 IS NULL OR instr(repos, char(10) || ?2 || char(10)) > 0)
                   AND (?3 IS NULL OR id = ?3 OR name = ?3)
                 ORDER BY ended_at DESC, id DESC LIMIT ?4",
            )?
            .query_map(
                params![since, filter.repo, filter.session, limit as i64],
                |r| {
                    let repos: String = r.get(2)?;
                    Ok(SessionRecord {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        repositories: repos
                            .split('\n')
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect(),
                        started_at: r.get(3)?,
                        ended_at: r.get(4)?,
                        report: r.get(5)?,
                    })
                },
            )?
            .collect()
        })
        .await
    }

    async fn prune_sessions(&self, before: i64) -> Result<u64> {
        self.write(move |c| {
            let n = c
                .prepare_cached("DELETE FROM sessions WHERE ended_at < ?1")?
                .execute([before])?;
            Ok(n as u64)
        })
        .await
    }

    async fn blob_usage(&self) -> Result<BlobUsage> {
        self.read(evict::blob_usage).await
    }

    async fn footprint(&self) -> Result<u64> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            ["", "-wal", "-shm"]
                .iter()
                .filter_map(|suffix| {
                    let mut name = path.clone().into_os_string();
                    name.push(suffix);
                    std::fs::metadata(name).ok().map(|m| m.len())
                })
                .sum()
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))
    }
}

fn page(mut items: Vec<String>, n: usize) -> Page {
    let more = items.len() > n;
    items.truncate(n);
    Page { items, more }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps SQLite's machine takes to run `sql` with `params` once on `conn`: what a
    /// statement walks, counted rather than timed.
    fn steps(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> i32 {
        let mut statement = conn.prepare(sql).unwrap();
        statement.query(params).unwrap().next().unwrap();
        statement.get_status(rusqlite::StatementStatus::VmStep)
    }

    #[test]
    fn removing_a_manifests_tags_walks_none_of_its_repositorys_other_tags() {
        let dir = tempfile::tempdir().unwrap();
        let conn = connect(&dir.path().join("meta.db"), WRITER_CACHE_KIB).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
             INSERT INTO tags SELECT 1, 'tag-' || i, 'sha256:' || i, 0, 0 FROM n;",
        )
        .unwrap();
        let taken = steps(&conn, evict::DELETE_TAGS_OF, params![1, "sha256:1000"]);
        // A walk over the repository's 2 000 tags takes thousands of steps (8 019 without
        // the index); a lookup, tens.
        assert!(
            taken < 200,
            "deleting one manifest's tags took {taken} steps"
        );
        let (tags, gone): (i64, i64) = conn
            .query_row(
                "SELECT count(*), count(*) FILTER (WHERE digest = 'sha256:1000') FROM tags",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((tags, gone), (1999, 0));
    }

    #[test]
    fn a_database_from_before_a_column_gets_it_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE manifests (repo_id INTEGER NOT NULL, digest TEXT NOT NULL,
                media_type TEXT NOT NULL, artifact_type TEXT, subject TEXT,
                annotations TEXT NOT NULL, content BLOB NOT NULL,
                created_at INTEGER NOT NULL, accessed_at INTEGER NOT NULL,
                PRIMARY KEY (repo_id, digest));
             INSERT INTO manifests VALUES (1, 'sha256:1', 'm', NULL, NULL, '{}', x'00', 0, 0);",
        )
        .unwrap();
        drop(old);
        let conn = connect(&path, WRITER_CACHE_KIB).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        add_missing_columns(&conn).unwrap();
        // Twice: a second start finds it there.
        add_missing_columns(&conn).unwrap();
        let cache: Option<String> = conn
            .query_row("SELECT cache FROM manifests", [], |r| r.get(0))
            .unwrap();
        assert_eq!(cache, None);
    }

    #[tokio::test]
    async fn the_log_file_keeps_its_size_across_checkpoints_and_is_cut_back_past_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let meta = SqliteMeta::open(&path).unwrap();
        let log = || std::fs::metadata(dir.path().join("meta.db-wal")).map_or(0, |m| m.len());
        let app = "app".parse::<RepoName>().unwrap();
        // Small commits, checkpointed every 128 pages: once the file has held a whole
        // cycle of the log, it never shrinks.
        let (mut largest, mut shrank) = (0, Vec::new());
        for i in 0u32..1500 {
            let digest = Digest::sha256_of(&i.to_le_bytes());
            meta.link_blob(&app, &digest, 1).await.unwrap();
            let now = log();
            if now < largest {
                shrank.push((i, largest, now));
            }
            largest = largest.max(now);
        }
        assert!(
            largest > CHECKPOINT_PAGES as u64 * 4096,
            "no checkpoint: {largest}"
        );
        assert!(largest <= WAL_KEPT_BYTES as u64, "{largest}");
        assert!(shrank.is_empty(), "the log file shrank: {shrank:?}");

        // One transaction larger than the limit grows the file past it; the commit after
        // the next checkpoint cuts it back to the limit.
        let report = "x".repeat(3 * WAL_KEPT_BYTES as usize);
        meta.write(move |c| {
            c.execute(
                "INSERT INTO sessions (id, repos, started_at, ended_at, report)
                 VALUES ('large', '[]', 0, 0, ?1)",
                [report],
            )?;
            Ok(())
        })
        .await
        .unwrap();
        assert!(log() > WAL_KEPT_BYTES as u64);
        for i in 0u32..3 {
            let digest = Digest::sha256_of(&(i + 1500).to_le_bytes());
            meta.link_blob(&app, &digest, 1).await.unwrap();
        }
        assert_eq!(log(), WAL_KEPT_BYTES as u64);
    }

    #[tokio::test]
    async fn a_link_found_once_is_not_found_after_it_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SqliteMeta::open(&dir.path().join("meta.db")).unwrap();
        let (app, blob) = (
            "app".parse::<RepoName>().unwrap(),
            Digest::sha256_of(b"layer"),
        );
        let found_twice = async || {
            for _ in 0..2 {
                assert_eq!(meta.linked_blob(&app, &blob).await.unwrap(), Some(5));
                assert_eq!(meta.known_blob(&blob).await.unwrap(), Some(5));
            }
        };
        meta.link_blob(&app, &blob, 5).await.unwrap();
        found_twice().await;
        assert!(meta.unlink_blob(&app, &blob).await.unwrap());
        assert_eq!(meta.linked_blob(&app, &blob).await.unwrap(), None);
        assert_eq!(meta.known_blob(&blob).await.unwrap(), None);

        meta.link_blob(&app, &blob, 5).await.unwrap();
        found_twice().await;
        let forgotten = meta.forget_blobs(vec![blob.clone()], i64::MAX, i64::MAX);
        assert_eq!(forgotten.await.unwrap(), vec![(blob.clone(), 5)]);
        assert_eq!(meta.linked_blob(&app, &blob).await.unwrap(), None);
        assert_eq!(meta.known_blob(&blob).await.unwrap(), None);
    }
}
