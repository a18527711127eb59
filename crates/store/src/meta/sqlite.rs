//! The embedded metadata store: SQLite in WAL mode with `synchronous=FULL`, so an
//! acknowledged manifest survives a crash. One writer connection, a few readers; all
//! calls run on blocking threads.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use oci::{Digest, Reference, RepoName, Tag};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{ManifestRecord, MetaStore, Page, Referrer, StoredManifest, Touch};
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
";

const READERS: usize = 4;

/// Metadata in an SQLite database file.
#[derive(Clone)]
pub struct SqliteMeta {
    writer: Arc<Mutex<Connection>>,
    readers: Arc<Vec<Mutex<Connection>>>,
}

fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

fn lock(m: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn parse_digest(s: String) -> rusqlite::Result<Digest> {
    s.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

const REPO_ID: &str = "(SELECT id FROM repos WHERE name = ?1)";

fn ensure_repo(conn: &Connection, repo: &RepoName) -> rusqlite::Result<i64> {
    conn.prepare_cached("INSERT INTO repos (name) VALUES (?1) ON CONFLICT (name) DO NOTHING")?
        .execute([repo.as_str()])?;
    conn.prepare_cached("SELECT id FROM repos WHERE name = ?1")?
        .query_row([repo.as_str()], |r| r.get(0))
}

impl SqliteMeta {
    /// Open (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteMeta> {
        let writer = connect(path)?;
        writer.execute_batch(SCHEMA)?;
        let readers = (0..READERS)
            .map(|_| connect(path).map(Mutex::new))
            .collect::<rusqlite::Result<_>>()?;
        Ok(SqliteMeta {
            writer: Arc::new(Mutex::new(writer)),
            readers: Arc::new(readers),
        })
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (readers, writer) = (self.readers.clone(), self.writer.clone());
        tokio::task::spawn_blocking(move || {
            // A free reader if there is one; else queue on the writer rather than wait.
            let conn = readers
                .iter()
                .find_map(|m| m.try_lock().ok())
                .unwrap_or_else(|| lock(&writer));
            f(&conn).map_err(Error::from)
        })
        .await?
    }

    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || f(&mut lock(&writer))).await?
    }
}

#[async_trait]
impl MetaStore for SqliteMeta {
    async fn linked_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT b.size FROM repo_blobs rb JOIN blobs b ON b.digest = rb.digest
                 WHERE rb.repo_id = {REPO_ID} AND rb.digest = ?2"
            ))?
            .query_row(params![repo, digest], |r| r.get::<_, i64>(0))
            .optional()
            .map(|s| s.map(|s| s as u64))
        })
        .await
    }

    async fn known_blob(&self, digest: &Digest) -> Result<Option<u64>> {
        let digest = digest.to_string();
        self.read(move |c| {
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
            let now = now_secs();
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let repo_id = ensure_repo(&tx, &repo)?;
            tx.prepare_cached(
                "INSERT INTO blobs (digest, size, created_at, accessed_at) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (digest) DO UPDATE SET accessed_at = excluded.accessed_at",
            )?
            .execute(params![digest, size as i64, now])?;
            tx.prepare_cached(
                "INSERT OR IGNORE INTO repo_blobs (repo_id, digest) VALUES (?1, ?2)",
            )?
            .execute(params![repo_id, digest])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.write(move |c| {
            let n = c
                .prepare_cached(&format!(
                    "DELETE FROM repo_blobs WHERE repo_id = {REPO_ID} AND digest = ?2"
                ))?
                .execute(params![repo, digest])?;
            Ok(n > 0)
        })
        .await
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
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let repo_id = ensure_repo(&tx, &repo)?;
            for reference in record.references.iter().filter(|r| r.required) {
                let sql = match reference.kind {
                    oci::RefKind::Blob => "SELECT 1 FROM repo_blobs WHERE repo_id = ?1 AND digest = ?2",
                    oci::RefKind::Manifest => "SELECT 1 FROM manifests WHERE repo_id = ?1 AND digest = ?2",
                };
                let found = tx
                    .prepare_cached(sql)?
                    .query_row(params![repo_id, reference.digest.to_string()], |_| Ok(()))
                    .optional()?;
                if found.is_none() {
                    return Err(Error::ManifestBlobUnknown {
                        digest: reference.digest.clone(),
                        kind: reference.kind.as_str(),
                    });
                }
            }
            let digest = record.digest.to_string();
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO manifests (repo_id, digest, media_type, artifact_type, subject,
                        annotations, content, created_at, accessed_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)
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
                    now
                ])?;
            if inserted > 0 {
                let mut insert_ref = tx.prepare_cached(
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
                tx.prepare_cached(
                    "INSERT INTO tags (repo_id, name, digest, updated_at, accessed_at) VALUES (?1, ?2, ?3, ?4, ?4)
                     ON CONFLICT (repo_id, name) DO UPDATE SET digest = excluded.digest, updated_at = excluded.updated_at",
                )?
                .execute(params![repo_id, tag, digest, now])?;
            }
            tx.commit()?;
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
        self.read(move |c| {
            let sql = if by_tag {
                format!(
                    "SELECT m.digest, m.media_type, m.content FROM tags t
                     JOIN manifests m ON m.repo_id = t.repo_id AND m.digest = t.digest
                     WHERE t.repo_id = {REPO_ID} AND t.name = ?2"
                )
            } else {
                format!("SELECT digest, media_type, content FROM manifests WHERE repo_id = {REPO_ID} AND digest = ?2")
            };
            c.prepare_cached(&sql)?
                .query_row(params![repo, key], |r| {
                    Ok(StoredManifest {
                        digest: parse_digest(r.get(0)?)?,
                        media_type: r.get(1)?,
                        content: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                    })
                })
                .optional()
        })
        .await
    }

    async fn delete_manifest(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let deleted = tx
                .prepare_cached(&format!(
                    "DELETE FROM manifests WHERE repo_id = {REPO_ID} AND digest = ?2"
                ))?
                .execute(params![repo, digest])?;
            for sql in [
                format!("DELETE FROM tags WHERE repo_id = {REPO_ID} AND digest = ?2"),
                format!(
                    "DELETE FROM manifest_refs WHERE repo_id = {REPO_ID} AND manifest_digest = ?2"
                ),
            ] {
                tx.prepare_cached(&sql)?.execute(params![repo, digest])?;
            }
            tx.commit()?;
            Ok(deleted > 0)
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
                .prepare_cached("SELECT id FROM repos WHERE name = ?1")?
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
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let repo_id = ensure_repo(&tx, &repo)?;
            tx.prepare_cached("INSERT INTO uploads (id, repo_id, created_at) VALUES (?1, ?2, ?3)")?
                .execute(params![id, repo_id, now_secs()])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn upload_repo(&self, id: &UploadId) -> Result<Option<RepoName>> {
        let id = id.to_string();
        let name: Option<String> = self
            .read(move |c| {
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

    async fn touch(&self, batch: Vec<Touch>, at: i64) -> Result<()> {
        self.write(move |c| {
            let tx = c.transaction()?;
            for touch in &batch {
                match touch {
                    Touch::Blob(d) => tx
                        .prepare_cached("UPDATE blobs SET accessed_at = max(accessed_at, ?2) WHERE digest = ?1")?
                        .execute(params![d.to_string(), at])?,
                    Touch::Manifest(repo, d) => tx
                        .prepare_cached(&format!(
                            "UPDATE manifests SET accessed_at = max(accessed_at, ?3)
                             WHERE repo_id = {REPO_ID} AND digest = ?2"
                        ))?
                        .execute(params![repo.as_str(), d.to_string(), at])?,
                    Touch::Tag(repo, t) => tx
                        .prepare_cached(&format!(
                            "UPDATE tags SET accessed_at = max(accessed_at, ?3) WHERE repo_id = {REPO_ID} AND name = ?2"
                        ))?
                        .execute(params![repo.as_str(), t.as_str(), at])?,
                };
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }
}

fn page(mut items: Vec<String>, n: usize) -> Page {
    let more = items.len() > n;
    items.truncate(n);
    Page { items, more }
}
