//! The scale-out metadata store: PostgreSQL, shared by every node serving one bucket.
//!
//! It keeps [`SqliteMeta`](super::SqliteMeta)'s semantics across nodes: each write is one
//! transaction at `SERIALIZABLE` isolation, retried on a serialization failure or a
//! deadlock, so two nodes' writes behave as if one writer ran them in turn (a manifest
//! that checks its references and a sweep that forgets them cannot both commit:
//! invariant 2). Reads are plain queries. Publishing and sweeping a blob, and running
//! eviction, exclude each other across nodes through session-level advisory locks.

mod entries;
mod evict;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use oci::{Digest, Reference, RepoName, Tag};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Postgres};
use tokio::sync::mpsc;

use super::{
    BlobUsage, Entry, EntryQuery, EvictOutcome, EvictRequest, Evictable, ManifestRecord, MetaStore,
    NewEntry, Page, Part, Referrer, RepoUsage, SessionFilter, SessionRecord, SharedLock,
    StoredManifest, Touch,
};
use crate::upload::UploadId;
use crate::{Error, Result, now_secs};

/// How long a request waits for a free connection (or for a new one to open) before
/// the database counts as unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Retries of a write that lost a serialization conflict or a deadlock.
const MAX_RETRIES: u32 = 10;
/// The first retry waits up to this long; each further one up to twice as long.
const FIRST_BACKOFF: Duration = Duration::from_millis(2);
/// The longest wait before a retry.
const MAX_BACKOFF: Duration = Duration::from_millis(250);
/// How long releasing a session's advisory locks may take before the session is closed
/// instead (which releases them too).
const UNLOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// Advisory lock class of blob locks; the object id comes from the digest.
const BLOB_LOCKS: i32 = 0x4c43_0001;
/// Advisory lock class and object id of the eviction leader.
const LEADER_LOCK: (i32, i32) = (0x4c43_0002, 0);

/// Metadata in a PostgreSQL database shared by every node.
#[derive(Clone)]
pub struct PgMeta {
    /// Connections for queries and write transactions.
    pool: PgPool,
    /// Connections held by advisory-lock guards, apart from `pool`, so that lock
    /// holders waiting to write never starve each other of connections.
    locks: PgPool,
}

/// A write transaction's body: it gets the transaction's connection and its arguments,
/// and may run again when the transaction is retried.
type WriteBody<A, T> = for<'c> fn(&'c mut PgConnection, &'c A) -> BoxFuture<'c, Result<T>>;

impl PgMeta {
    /// Connect to the database `config` names and bring its schema up to date.
    ///
    /// The password is `config.password_file`'s content if set, else the URL's, else
    /// `PGPASSWORD`. Nodes starting at once are safe: the migrations run under an
    /// advisory lock, one node after the other. A database migrated by a newer release
    /// is accepted (its extra migrations are left alone), so nodes can be upgraded one
    /// at a time.
    ///
    /// This node opens at most `config.max_connections` connections for queries, and as
    /// many more for held locks.
    pub async fn connect(config: &crate::config::Postgres) -> Result<PgMeta> {
        let mut options: PgConnectOptions = config
            .url
            .parse()
            .map_err(|e| Error::Config(format!("meta.url is not a PostgreSQL URL: {e}")))?;
        if let Some(path) = &config.password_file {
            let password = tokio::fs::read_to_string(path).await.map_err(|e| {
                Error::Config(format!("meta.password_file {}: {e}", path.display()))
            })?;
            options = options.password(password.trim_end_matches(['\r', '\n']));
        }
        let options = options.application_name("layercache");
        let pool_options = || {
            PgPoolOptions::new()
                .max_connections(config.max_connections.max(1))
                .acquire_timeout(ACQUIRE_TIMEOUT)
        };
        let pool = pool_options().connect_with(options.clone()).await?;
        // The schema, applied in order under an advisory lock.
        let mut migrator = sqlx::migrate!("./migrations");
        migrator.set_ignore_missing(true);
        migrator.run(&pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => Error::from(e),
            e => Error::Config(format!("the metadata database's schema: {e}")),
        })?;
        let locks = pool_options().connect_lazy_with(options);
        Ok(PgMeta { pool, locks })
    }

    /// Run `body` in one `SERIALIZABLE` transaction, committed if it succeeds; run it
    /// again in a new transaction (after a short random wait) when the transaction
    /// loses a serialization conflict or a deadlock.
    async fn write<A, T>(&self, args: A, body: WriteBody<A, T>) -> Result<T>
    where
        A: Send + Sync,
        T: Send,
    {
        let mut retries = 0;
        loop {
            let mut tx = self
                .pool
                .begin_with("BEGIN ISOLATION LEVEL SERIALIZABLE")
                .await?;
            let outcome = match body(&mut tx, &args).await {
                Ok(value) => tx.commit().await.map(|()| value).map_err(Error::from),
                Err(e) => {
                    // A failed rollback leaves the connection to be reset by the pool.
                    let _ = tx.rollback().await;
                    Err(e)
                }
            };
            match outcome {
                Err(e) if is_conflict(&e) => {
                    if retries == MAX_RETRIES {
                        tracing::warn!(error = %e, "metadata write kept conflicting; giving up");
                        return Err(Error::Unavailable("the metadata database".to_owned()));
                    }
                    retries += 1;
                    tokio::time::sleep(backoff(retries)).await;
                }
                outcome => return outcome,
            }
        }
    }
}

/// Whether `e` is a transaction losing to a concurrent one, worth running again.
fn is_conflict(e: &Error) -> bool {
    let Error::Postgres(sqlx::Error::Database(db)) = e else {
        return false;
    };
    matches!(db.code().as_deref(), Some("40001" | "40P01"))
}

/// A random wait before retry number `retry` (from 1), up to a ceiling that doubles
/// with each retry, so conflicting writers spread out.
fn backoff(retry: u32) -> Duration {
    let ceiling = FIRST_BACKOFF
        .saturating_mul(1 << retry.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    let random = std::collections::hash_map::RandomState::new().hash_one(retry);
    ceiling.mul_f64((random % 1024) as f64 / 1024.0)
}

/// Advisory locks held by one database session; when dropped, they are released and
/// the connection goes back to its pool, or the session is closed (ending its locks)
/// when they cannot be released.
struct SessionLocks(Option<PoolConnection<Postgres>>);

impl SessionLocks {
    /// The session's connection.
    fn connection(&mut self) -> Result<&mut PgConnection> {
        self.0
            .as_deref_mut()
            .ok_or_else(|| Error::Task("a lock session without its connection".to_owned()))
    }
}

impl Drop for SessionLocks {
    fn drop(&mut self) {
        let Some(conn) = self.0.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(release_session(conn));
            }
            // No runtime to run the unlock on: closing the session releases its locks.
            Err(_) => drop(conn.detach()),
        }
    }
}

/// Release every advisory lock `conn`'s session holds (after any lock request still
/// pending on it completes), then return it to the pool; close it if that fails.
async fn release_session(mut conn: PoolConnection<Postgres>) {
    let unlocked = tokio::time::timeout(
        UNLOCK_TIMEOUT,
        sqlx::query("SELECT pg_advisory_unlock_all()").execute(&mut *conn),
    )
    .await;
    if !matches!(unlocked, Ok(Ok(_))) {
        tracing::warn!("closing a metadata session whose advisory locks could not be released");
        conn.close_on_drop();
    }
}

/// The advisory lock object id of `digest`: its first 32 bits.
fn blob_lock_id(digest: &Digest) -> i32 {
    let hex = digest.hex();
    let prefix = hex.get(..8).unwrap_or(hex);
    u32::from_str_radix(prefix, 16).unwrap_or(0) as i32
}

/// `s` as a stored digest.
pub(super) fn parse_digest(s: String) -> Result<Digest> {
    Digest::parse_stored(&s).map_err(|e| Error::Postgres(sqlx::Error::Decode(Box::new(e))))
}

/// `s` as a stored repository name.
pub(super) fn parse_repo(s: String) -> Result<RepoName> {
    s.parse()
        .map_err(|e| Error::Postgres(sqlx::Error::Decode(Box::new(e))))
}

/// Record a stored blob, or its new use when it is already recorded.
pub(super) async fn record_blob(c: &mut PgConnection, digest: &str, size: u64) -> Result<()> {
    sqlx::query(
        "INSERT INTO blobs (digest, size, created_at, accessed_at) VALUES ($1, $2, $3, $3)
         ON CONFLICT (digest) DO UPDATE SET accessed_at = excluded.accessed_at",
    )
    .bind(digest)
    .bind(size as i64)
    .bind(now_secs())
    .execute(&mut *c)
    .await?;
    take_up(c, digest, now_secs()).await
}

/// A released blob used again (uploaded, checked, mounted or read) after the second of
/// its release is taken up by that use: it waits for a manifest like a blob just pushed,
/// no longer counted as freed.
pub(super) async fn take_up(c: &mut PgConnection, digest: &str, used_at: i64) -> Result<()> {
    sqlx::query("DELETE FROM released_blobs WHERE digest = $1 AND released_at < $2")
        .bind(digest)
        .bind(used_at)
        .execute(&mut *c)
        .await?;
    Ok(())
}

/// The id of repository `repo`, recorded now if it is new.
pub(super) async fn ensure_repo(c: &mut PgConnection, repo: &RepoName) -> Result<i64> {
    let known: Option<i64> = sqlx::query_scalar("SELECT id FROM repos WHERE name = $1")
        .bind(repo.as_str())
        .fetch_optional(&mut *c)
        .await?;
    if let Some(id) = known {
        return Ok(id);
    }
    // A concurrent transaction recording it too makes one of the two retry.
    let id = sqlx::query_scalar(
        "INSERT INTO repos (name) VALUES ($1)
         ON CONFLICT (name) DO UPDATE SET name = excluded.name RETURNING id",
    )
    .bind(repo.as_str())
    .fetch_one(&mut *c)
    .await?;
    Ok(id)
}

/// Last uses to record, one per thing (its latest), as columns for `unnest`.
#[derive(Default)]
struct TouchColumns {
    blobs: (Vec<String>, Vec<i64>),
    manifests: (Vec<String>, Vec<String>, Vec<i64>),
    tags: (Vec<String>, Vec<String>, Vec<i64>),
    entries: (Vec<i64>, Vec<i64>),
}

impl TouchColumns {
    /// The batch, keeping each thing's latest use, in a stable order (rows locked in
    /// the same order by every node deadlock less).
    fn new(batch: Vec<(Touch, i64)>) -> TouchColumns {
        let mut latest: HashMap<Touch, i64> = HashMap::new();
        for (touch, at) in batch {
            let seen = latest.entry(touch).or_insert(at);
            *seen = (*seen).max(at);
        }
        let mut blobs = Vec::new();
        let mut manifests = Vec::new();
        let mut tags = Vec::new();
        let mut entries = Vec::new();
        for (touch, at) in latest {
            match touch {
                Touch::Blob(d) => blobs.push((d.to_string(), at)),
                Touch::Manifest(repo, d) => manifests.push((repo.to_string(), d.to_string(), at)),
                Touch::Tag(repo, t) => tags.push((repo.to_string(), t.to_string(), at)),
                Touch::Entry(id) => entries.push((id, at)),
            }
        }
        blobs.sort_unstable();
        manifests.sort_unstable();
        tags.sort_unstable();
        entries.sort_unstable();
        TouchColumns {
            blobs: blobs.into_iter().unzip(),
            manifests: columns3(manifests),
            tags: columns3(tags),
            entries: entries.into_iter().unzip(),
        }
    }
}

fn columns3<A, B, C>(rows: Vec<(A, B, C)>) -> (Vec<A>, Vec<B>, Vec<C>) {
    let mut columns = (
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
    );
    for (a, b, c) in rows {
        columns.0.push(a);
        columns.1.push(b);
        columns.2.push(c);
    }
    columns
}

/// Record the uses in `t`: one statement per kind of thing.
async fn touch_all(c: &mut PgConnection, t: &TouchColumns) -> Result<()> {
    if !t.blobs.0.is_empty() {
        sqlx::query(
            "WITH used AS (SELECT * FROM unnest($1::text[], $2::bigint[]) AS u(digest, at)),
             taken_up AS (DELETE FROM released_blobs r USING used
                 WHERE r.digest = used.digest AND r.released_at < used.at)
             UPDATE blobs b SET accessed_at = GREATEST(b.accessed_at, used.at)
             FROM used WHERE b.digest = used.digest",
        )
        .bind(&t.blobs.0)
        .bind(&t.blobs.1)
        .execute(&mut *c)
        .await?;
    }
    if !t.manifests.0.is_empty() {
        sqlx::query(
            "UPDATE manifests m SET accessed_at = GREATEST(m.accessed_at, u.at)
             FROM unnest($1::text[], $2::text[], $3::bigint[]) AS u(repo, digest, at)
             JOIN repos r ON r.name = u.repo
             WHERE m.repo_id = r.id AND m.digest = u.digest",
        )
        .bind(&t.manifests.0)
        .bind(&t.manifests.1)
        .bind(&t.manifests.2)
        .execute(&mut *c)
        .await?;
    }
    if !t.tags.0.is_empty() {
        sqlx::query(
            "UPDATE tags t SET accessed_at = GREATEST(t.accessed_at, u.at)
             FROM unnest($1::text[], $2::text[], $3::bigint[]) AS u(repo, name, at)
             JOIN repos r ON r.name = u.repo
             WHERE t.repo_id = r.id AND t.name = u.name",
        )
        .bind(&t.tags.0)
        .bind(&t.tags.1)
        .bind(&t.tags.2)
        .execute(&mut *c)
        .await?;
    }
    if !t.entries.0.is_empty() {
        sqlx::query(
            "UPDATE cache_entries e SET accessed_at = GREATEST(e.accessed_at, u.at)
             FROM unnest($1::bigint[], $2::bigint[]) AS u(id, at) WHERE e.id = u.id",
        )
        .bind(&t.entries.0)
        .bind(&t.entries.1)
        .execute(&mut *c)
        .await?;
    }
    Ok(())
}

/// Check that everything `record` requires is in repository `repo_id`, with the size
/// it declares; the first reference that is not is the error.
async fn check_references(
    c: &mut PgConnection,
    repo_id: i64,
    record: &ManifestRecord,
) -> Result<()> {
    let required: Vec<_> = record.references.iter().filter(|r| r.required).collect();
    if required.is_empty() {
        return Ok(());
    }
    let digests: Vec<String> = required.iter().map(|r| r.digest.to_string()).collect();
    let blobs: Vec<bool> = required
        .iter()
        .map(|r| r.kind == oci::RefKind::Blob)
        .collect();
    let stored: Vec<Option<i64>> = sqlx::query_scalar(
        "SELECT CASE WHEN u.blob
                THEN (SELECT b.size FROM repo_blobs r JOIN blobs b ON b.digest = r.digest
                      WHERE r.repo_id = $1 AND r.digest = u.digest)
                ELSE (SELECT octet_length(m.content)::bigint FROM manifests m
                      WHERE m.repo_id = $1 AND m.digest = u.digest)
            END
         FROM unnest($2::text[], $3::bool[]) WITH ORDINALITY AS u(digest, blob, n)
         ORDER BY u.n",
    )
    .bind(repo_id)
    .bind(&digests)
    .bind(&blobs)
    .fetch_all(&mut *c)
    .await?;
    for (reference, stored) in required.into_iter().zip(stored) {
        super::check_stored_size(reference, stored)?;
    }
    Ok(())
}

/// Record `record` in `repo` (and point `tag` at it) once its references check out.
async fn put_manifest(
    c: &mut PgConnection,
    repo: &RepoName,
    record: &ManifestRecord,
    tag: Option<&str>,
) -> Result<()> {
    let now = now_secs();
    let repo_id = ensure_repo(c, repo).await?;
    check_references(c, repo_id, record).await?;
    let digest = record.digest.to_string();
    let inserted = sqlx::query(
        "INSERT INTO manifests (repo_id, digest, media_type, artifact_type, subject,
            annotations, content, created_at, accessed_at, cache)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9)
         ON CONFLICT (repo_id, digest) DO NOTHING",
    )
    .bind(repo_id)
    .bind(&digest)
    .bind(&record.media_type)
    .bind(&record.artifact_type)
    .bind(record.subject.as_ref().map(Digest::to_string))
    .bind(serde_json::to_string(&record.annotations).unwrap_or_else(|_| "{}".into()))
    .bind(&record.content[..])
    .bind(now)
    .bind(record.cache.as_str())
    .execute(&mut *c)
    .await?
    .rows_affected();
    if inserted == 0 {
        // Pushed again: that is a use too (and classifies one stored unclassified).
        sqlx::query(
            "UPDATE manifests SET accessed_at = GREATEST(accessed_at, $3),
                cache = coalesce(cache, $4)
             WHERE repo_id = $1 AND digest = $2",
        )
        .bind(repo_id)
        .bind(&digest)
        .bind(now)
        .bind(record.cache.as_str())
        .execute(&mut *c)
        .await?;
    } else if !record.references.is_empty() {
        let (children, kinds): (Vec<String>, Vec<&str>) = record
            .references
            .iter()
            .map(|r| (r.digest.to_string(), r.kind.as_str()))
            .unzip();
        sqlx::query(
            "INSERT INTO manifest_refs (repo_id, manifest_digest, child_digest, kind)
             SELECT $1, $2, child, kind FROM unnest($3::text[], $4::text[]) AS u(child, kind)
             ON CONFLICT DO NOTHING",
        )
        .bind(repo_id)
        .bind(&digest)
        .bind(&children)
        .bind(&kinds)
        .execute(&mut *c)
        .await?;
    }
    if let Some(tag) = tag {
        sqlx::query(
            "INSERT INTO tags (repo_id, name, digest, updated_at, accessed_at)
             VALUES ($1, $2, $3, $4, $4)
             ON CONFLICT (repo_id, name) DO UPDATE
             SET digest = excluded.digest, updated_at = excluded.updated_at",
        )
        .bind(repo_id)
        .bind(tag)
        .bind(&digest)
        .bind(now)
        .execute(&mut *c)
        .await?;
    }
    Ok(())
}

/// Delete manifest `digest` of `repo` with its tags, releasing what it leaves
/// unreferenced; what it referenced, `None` when absent.
async fn delete_manifest(
    c: &mut PgConnection,
    repo: &RepoName,
    digest: &Digest,
) -> Result<Option<Vec<Digest>>> {
    let repo_id: Option<i64> = sqlx::query_scalar(
        "SELECT repo_id FROM manifests
         WHERE repo_id = (SELECT id FROM repos WHERE name = $1) AND digest = $2",
    )
    .bind(repo.as_str())
    .bind(digest.to_string())
    .fetch_optional(&mut *c)
    .await?;
    let Some(repo_id) = repo_id else {
        return Ok(None);
    };
    let references = evict::remove_manifest(c, repo_id, digest).await?;
    evict::release(c, &references, &mut Default::default()).await?;
    Ok(Some(references))
}

/// Run an eviction; for a dry run, undo it and keep only its report.
async fn evict(c: &mut PgConnection, request: &EvictRequest) -> Result<EvictOutcome> {
    if !request.dry_run {
        return evict::evict(c, request).await;
    }
    sqlx::query("SAVEPOINT dry_run").execute(&mut *c).await?;
    let outcome = evict::evict(c, request).await;
    sqlx::query("ROLLBACK TO SAVEPOINT dry_run")
        .execute(&mut *c)
        .await?;
    outcome
}

/// Find the entry a restore gets and record it as used, in the same transaction.
async fn find_entry(c: &mut PgConnection, query: &EntryQuery) -> Result<Option<Entry>> {
    let found = entries::find(c, query).await?;
    if let Some(entry) = &found {
        entries::touch(c, entry.id, now_secs()).await?;
    }
    Ok(found)
}

/// Store a build session's record, replacing an earlier save of it.
async fn save_session(c: &mut PgConnection, session: &SessionRecord) -> Result<()> {
    // Each repository between newlines, so a filter matches whole names only.
    let repos = format!("\n{}\n", session.repositories.join("\n"));
    sqlx::query(
        "INSERT INTO sessions (id, name, repos, started_at, ended_at, report)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (id) DO UPDATE SET repos = excluded.repos,
            ended_at = excluded.ended_at, report = excluded.report",
    )
    .bind(&session.id)
    .bind(&session.name)
    .bind(repos)
    .bind(session.started_at)
    .bind(session.ended_at)
    .bind(&session.report)
    .execute(&mut *c)
    .await?;
    Ok(())
}

fn page(mut items: Vec<String>, n: usize) -> Page {
    let more = items.len() > n;
    items.truncate(n);
    Page { items, more }
}

#[async_trait]
impl MetaStore for PgMeta {
    async fn lock_blobs(&self, digests: &[Digest]) -> Result<Option<SharedLock>> {
        let mut ids: Vec<i32> = digests.iter().map(blob_lock_id).collect();
        // In one order for every holder, so two holders never wait for each other.
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            return Ok(Some(Box::new(())));
        }
        // Owned by the guard before the locks are asked for: should this call be
        // dropped while it waits, the guard still releases what it gets.
        let mut held = SessionLocks(Some(self.locks.acquire().await?));
        sqlx::query("SELECT pg_advisory_lock($1, id) FROM unnest($2::int4[]) AS u(id)")
            .bind(BLOB_LOCKS)
            .bind(&ids)
            .execute(held.connection()?)
            .await?;
        Ok(Some(Box::new(held)))
    }

    async fn lead(&self, wait: bool) -> Result<Option<SharedLock>> {
        let mut held = SessionLocks(Some(self.locks.acquire().await?));
        let (class, id) = LEADER_LOCK;
        if wait {
            sqlx::query("SELECT pg_advisory_lock($1, $2)")
                .bind(class)
                .bind(id)
                .execute(held.connection()?)
                .await?;
        } else {
            let led: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(class)
                .bind(id)
                .fetch_one(held.connection()?)
                .await?;
            if !led {
                // It holds nothing: straight back to the pool.
                drop(held.0.take());
                return Ok(None);
            }
        }
        Ok(Some(Box::new(held)))
    }

    async fn linked_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>> {
        let size: Option<i64> = sqlx::query_scalar(
            "SELECT b.size FROM repo_blobs rb JOIN blobs b ON b.digest = rb.digest
             WHERE rb.repo_id = (SELECT id FROM repos WHERE name = $1) AND rb.digest = $2",
        )
        .bind(repo.as_str())
        .bind(digest.to_string())
        .fetch_optional(&self.pool)
        .await?;
        Ok(size.map(|s| s as u64))
    }

    async fn known_blob(&self, digest: &Digest) -> Result<Option<u64>> {
        let size: Option<i64> = sqlx::query_scalar(
            "SELECT b.size FROM blobs b WHERE b.digest = $1
             AND EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.digest = b.digest)",
        )
        .bind(digest.to_string())
        .fetch_optional(&self.pool)
        .await?;
        Ok(size.map(|s| s as u64))
    }

    async fn link_blob(&self, repo: &RepoName, digest: &Digest, size: u64) -> Result<()> {
        let args = (repo.clone(), digest.to_string(), size);
        self.write(args, |c, (repo, digest, size)| {
            Box::pin(async move {
                let repo_id = ensure_repo(c, repo).await?;
                record_blob(c, digest, *size).await?;
                sqlx::query(
                    "INSERT INTO repo_blobs (repo_id, digest) VALUES ($1, $2)
                     ON CONFLICT DO NOTHING",
                )
                .bind(repo_id)
                .bind(digest)
                .execute(&mut *c)
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        let args = (repo.to_string(), digest.to_string());
        self.write(args, |c, (repo, digest)| {
            Box::pin(async move {
                let gone = sqlx::query(
                    "DELETE FROM repo_blobs
                     WHERE repo_id = (SELECT id FROM repos WHERE name = $1) AND digest = $2",
                )
                .bind(repo)
                .bind(digest)
                .execute(&mut *c)
                .await?;
                Ok(gone.rows_affected() > 0)
            })
        })
        .await
    }

    async fn put_manifest(
        &self,
        repo: &RepoName,
        record: ManifestRecord,
        tag: Option<&Tag>,
    ) -> Result<()> {
        let args = (repo.clone(), record, tag.map(Tag::to_string));
        self.write(args, |c, (repo, record, tag)| {
            Box::pin(put_manifest(c, repo, record, tag.as_deref()))
        })
        .await
    }

    async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<StoredManifest>> {
        let query = match reference {
            Reference::Tag(tag) => sqlx::query_as(
                "SELECT m.digest, m.media_type, m.content, m.cache FROM tags t
                 JOIN manifests m ON m.repo_id = t.repo_id AND m.digest = t.digest
                 WHERE t.repo_id = (SELECT id FROM repos WHERE name = $1) AND t.name = $2",
            )
            .bind(repo.as_str())
            .bind(tag.to_string()),
            Reference::Digest(digest) => sqlx::query_as(
                "SELECT digest, media_type, content, cache FROM manifests
                 WHERE repo_id = (SELECT id FROM repos WHERE name = $1) AND digest = $2",
            )
            .bind(repo.as_str())
            .bind(digest.to_string()),
        };
        let row: Option<(String, String, Vec<u8>, Option<String>)> =
            query.fetch_optional(&self.pool).await?;
        row.map(|(digest, media_type, content, cache)| {
            Ok(StoredManifest {
                digest: parse_digest(digest)?,
                media_type,
                content: Bytes::from(content),
                cache: cache.and_then(|c| oci::CacheRecords::parse(&c)),
            })
        })
        .transpose()
    }

    async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<Vec<Digest>>> {
        let args = (repo.clone(), digest.clone());
        self.write(args, |c, (repo, digest)| {
            Box::pin(delete_manifest(c, repo, digest))
        })
        .await
    }

    async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> Result<bool> {
        let args = (repo.to_string(), tag.to_string());
        self.write(args, |c, (repo, tag)| {
            Box::pin(async move {
                let gone = sqlx::query(
                    "DELETE FROM tags
                     WHERE repo_id = (SELECT id FROM repos WHERE name = $1) AND name = $2",
                )
                .bind(repo)
                .bind(tag)
                .execute(&mut *c)
                .await?;
                Ok(gone.rows_affected() > 0)
            })
        })
        .await
    }

    async fn tags(&self, repo: &RepoName, n: usize, last: Option<&str>) -> Result<Option<Page>> {
        let repo_id: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM repos r WHERE name = $1
             AND EXISTS (SELECT 1 FROM manifests m WHERE m.repo_id = r.id)",
        )
        .bind(repo.as_str())
        .fetch_optional(&self.pool)
        .await?;
        let Some(repo_id) = repo_id else {
            return Ok(None);
        };
        let items: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM tags WHERE repo_id = $1 AND name > $2 ORDER BY name LIMIT $3",
        )
        .bind(repo_id)
        .bind(last.unwrap_or(""))
        .bind(n.saturating_add(1) as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(page(items, n)))
    }

    async fn has_repository(&self, repo: &RepoName) -> Result<bool> {
        let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM repos WHERE name = $1")
            .bind(repo.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(found.is_some())
    }

    async fn repositories(&self, n: usize, last: Option<&str>) -> Result<Page> {
        let items: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM repos r WHERE name > $1
             AND EXISTS (SELECT 1 FROM manifests m WHERE m.repo_id = r.id)
             ORDER BY name LIMIT $2",
        )
        .bind(last.unwrap_or(""))
        .bind(n.saturating_add(1) as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(page(items, n))
    }

    async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>> {
        let rows: Vec<(String, String, Option<String>, String, i64)> = sqlx::query_as(
            "SELECT digest, media_type, artifact_type, annotations, octet_length(content)::bigint
             FROM manifests
             WHERE repo_id = (SELECT id FROM repos WHERE name = $1) AND subject = $2
               AND ($3::text IS NULL OR artifact_type = $3)
             ORDER BY created_at, digest",
        )
        .bind(repo.as_str())
        .bind(subject.to_string())
        .bind(artifact_type)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(digest, media_type, artifact_type, annotations, size)| {
                Ok(Referrer {
                    digest: parse_digest(digest)?,
                    media_type,
                    artifact_type,
                    annotations: serde_json::from_str(&annotations).unwrap_or_default(),
                    size: size as u64,
                })
            })
            .collect()
    }

    async fn create_upload(&self, id: &UploadId, repo: &RepoName) -> Result<()> {
        let args = (id.to_string(), repo.clone());
        self.write(args, |c, (id, repo)| {
            Box::pin(async move {
                let repo_id = ensure_repo(c, repo).await?;
                sqlx::query("INSERT INTO uploads (id, repo_id, created_at) VALUES ($1, $2, $3)")
                    .bind(id)
                    .bind(repo_id)
                    .bind(now_secs())
                    .execute(&mut *c)
                    .await?;
                Ok(())
            })
        })
        .await
    }

    async fn upload_repo(&self, id: &UploadId) -> Result<Option<RepoName>> {
        let name: Option<String> = sqlx::query_scalar(
            "SELECT r.name FROM uploads u JOIN repos r ON r.id = u.repo_id WHERE u.id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        Ok(name.and_then(|n| n.parse().ok()))
    }

    async fn remove_upload(&self, id: &UploadId) -> Result<()> {
        self.write(id.to_string(), |c, id| {
            Box::pin(async move {
                sqlx::query("DELETE FROM uploads WHERE id = $1")
                    .bind(id)
                    .execute(&mut *c)
                    .await?;
                Ok(())
            })
        })
        .await
    }

    async fn touch(&self, batch: Vec<(Touch, i64)>) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.write(TouchColumns::new(batch), |c, t| Box::pin(touch_all(c, t)))
            .await
    }

    async fn uploads(&self) -> Result<Vec<(UploadId, i64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT id, created_at FROM uploads")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, at)| Some((id.parse().ok()?, at)))
            .collect())
    }

    async fn roots(&self, into: mpsc::Sender<Evictable>) -> Result<()> {
        evict::roots(&mut *self.pool.acquire().await?, &into).await
    }

    async fn evict(&self, request: EvictRequest) -> Result<EvictOutcome> {
        self.write(request, |c, request| Box::pin(evict(c, request)))
            .await
    }

    async fn forget_blobs(
        &self,
        blobs: Vec<Digest>,
        idle_before: i64,
        unused_before: i64,
    ) -> Result<Vec<(Digest, u64)>> {
        let args = (blobs, idle_before, unused_before);
        self.write(args, |c, (blobs, idle_before, unused_before)| {
            Box::pin(evict::forget_blobs(c, blobs, *idle_before, *unused_before))
        })
        .await
    }

    async fn blob_usage(&self) -> Result<BlobUsage> {
        evict::blob_usage(&mut *self.pool.acquire().await?).await
    }

    /// Always 0: the database lives on its own server, not on the store's disk or in
    /// its bucket, so it takes nothing from the blob quota.
    async fn footprint(&self) -> Result<u64> {
        Ok(0)
    }

    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        let size: Option<i64> = sqlx::query_scalar("SELECT size FROM blobs WHERE digest = $1")
            .bind(digest.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(size.map(|s| s as u64))
    }

    async fn repository_usage(&self) -> Result<Vec<RepoUsage>> {
        let rows: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT r.name, coalesce(b.n, 0), coalesce(b.bytes, 0), coalesce(m.n, 0),
                coalesce(m.bytes, 0)
             FROM repos r
             LEFT JOIN (SELECT rb.repo_id, count(*) AS n, sum(bl.size)::bigint AS bytes
                 FROM repo_blobs rb JOIN blobs bl ON bl.digest = rb.digest
                 GROUP BY rb.repo_id) b ON b.repo_id = r.id
             LEFT JOIN (SELECT repo_id, count(*) AS n,
                     sum(octet_length(content))::bigint AS bytes
                 FROM manifests GROUP BY repo_id) m ON m.repo_id = r.id
             WHERE b.n IS NOT NULL OR m.n IS NOT NULL
             ORDER BY coalesce(b.bytes, 0) + coalesce(m.bytes, 0) DESC, r.name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(repo, blobs, blob_bytes, manifests, manifest_bytes)| {
                Ok(RepoUsage {
                    repo: parse_repo(repo)?,
                    blobs: blobs as u64,
                    blob_bytes: blob_bytes as u64,
                    manifests: manifests as u64,
                    manifest_bytes: manifest_bytes as u64,
                })
            })
            .collect()
    }

    async fn create_entry(&self, entry: NewEntry) -> Result<Entry> {
        self.write(entry, |c, entry| Box::pin(entries::create(c, entry)))
            .await
    }

    async fn entry(&self, id: i64) -> Result<Option<Entry>> {
        entries::get(&mut *self.pool.acquire().await?, id).await
    }

    async fn entry_by_key(&self, key: NewEntry) -> Result<Option<Entry>> {
        entries::by_key(&mut *self.pool.acquire().await?, &key).await
    }

    async fn find_entry(&self, query: EntryQuery) -> Result<Option<Entry>> {
        // Found and marked used in one write: an eviction either took the entry first (a
        // miss) or finds it used since it listed it and keeps it, so a restore is never
        // handed an entry that is gone before its download.
        self.write(query, |c, query| Box::pin(find_entry(c, query)))
            .await
    }

    async fn list_entries(
        &self,
        repository: String,
        scopes: Vec<String>,
        prefixes: Vec<String>,
    ) -> Result<Vec<Entry>> {
        let mut c = self.pool.acquire().await?;
        entries::list(&mut c, &repository, &scopes, &prefixes).await
    }

    async fn add_entry_part(&self, id: i64, part: Part, whole: bool) -> Result<()> {
        self.write((id, part, whole), |c, (id, part, whole)| {
            Box::pin(entries::add_part(c, *id, part, *whole))
        })
        .await
    }

    async fn add_entry_block(
        &self,
        id: i64,
        block: String,
        digest: Digest,
        len: u64,
    ) -> Result<()> {
        self.write((id, block, digest, len), |c, (id, block, digest, len)| {
            Box::pin(entries::add_block(c, *id, block, digest, *len))
        })
        .await
    }

    async fn assemble_entry(&self, id: i64, blocks: Vec<String>, limit: u64) -> Result<u64> {
        self.write((id, blocks, limit), |c, (id, blocks, limit)| {
            Box::pin(entries::assemble(c, *id, blocks, *limit))
        })
        .await
    }

    async fn finish_entry(&self, id: i64, size: u64) -> Result<Entry> {
        self.write((id, size), |c, (id, size)| {
            Box::pin(entries::finish(c, *id, *size))
        })
        .await
    }

    async fn entry_parts(&self, id: i64) -> Result<Vec<Part>> {
        entries::parts(&mut *self.pool.acquire().await?, id).await
    }

    async fn delete_entry(&self, id: i64) -> Result<bool> {
        self.write(id, |c, id| Box::pin(entries::delete_and_release(c, *id)))
            .await
    }

    async fn expire_entries(&self, before_ms: i64) -> Result<u64> {
        self.write(before_ms, |c, before_ms| {
            Box::pin(entries::expire(c, *before_ms))
        })
        .await
    }

    async fn save_session(&self, session: SessionRecord) -> Result<()> {
        self.write(session, |c, session| Box::pin(save_session(c, session)))
            .await
    }

    async fn sessions(
        &self,
        since: i64,
        filter: SessionFilter,
        limit: usize,
    ) -> Result<Vec<SessionRecord>> {
        type Row = (String, Option<String>, String, i64, i64, String);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, name, repos, started_at, ended_at, report FROM sessions
             WHERE ended_at >= $1
               AND ($2::text IS NULL OR strpos(repos, chr(10) || $2 || chr(10)) > 0)
               AND ($3::text IS NULL OR id = $3 OR name = $3)
             ORDER BY ended_at DESC, id DESC LIMIT $4",
        )
        .bind(since)
        .bind(filter.repo)
        .bind(filter.session)
        .bind(limit.min(i64::MAX as usize) as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(id, name, repos, started_at, ended_at, report)| SessionRecord {
                    id,
                    name,
                    repositories: repos
                        .split('\n')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    started_at,
                    ended_at,
                    report,
                },
            )
            .collect())
    }

    async fn prune_sessions(&self, before: i64) -> Result<u64> {
        self.write(before, |c, before| {
            Box::pin(async move {
                let gone = sqlx::query("DELETE FROM sessions WHERE ended_at < $1")
                    .bind(*before)
                    .execute(&mut *c)
                    .await?;
                Ok(gone.rows_affected())
            })
        })
        .await
    }
}
