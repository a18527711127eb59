//! Eviction's queries: the roots, removing them, and the blobs nothing references.
//!
//! They run on the writer thread (one transaction each) or a reader connection, so they
//! are ordered with every manifest PUT: a PUT either commits first (its references keep
//! their blobs) or finds the blob gone and fails with MANIFEST_BLOB_UNKNOWN.

use std::collections::HashSet;

use oci::Digest;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::mpsc;

use super::{parse_digest, parse_repo};
use crate::meta::{
    BlobUsage, EntryRoot, EvictOutcome, EvictRequest, Evictable, Evicted, Root, Unreferenced,
    on_disk,
};
use crate::now_secs;

/// A manifest's last use: its own push or read, or any of its tags'. (Without the
/// index hint SQLite scans a repository's every tag per manifest.)
const LAST_USED: &str = "max(m.created_at, m.accessed_at, coalesce(
        (SELECT max(max(t.updated_at, t.accessed_at)) FROM tags t INDEXED BY tags_by_digest
         WHERE t.repo_id = m.repo_id AND t.digest = m.digest), 0))";

/// `m` is a root: no manifest in its repository lists it, and its subject (if any) is
/// not there.
const IS_ROOT: &str = "NOT EXISTS (SELECT 1 FROM manifest_refs x
        WHERE x.repo_id = m.repo_id AND x.child_digest = m.digest AND x.kind = 'manifest')
    AND (m.subject IS NULL OR NOT EXISTS (SELECT 1 FROM manifests s
        WHERE s.repo_id = m.repo_id AND s.digest = m.subject))";

/// Blob `b` is referenced by no manifest and no cache entry (finished, or a block or
/// part of one being uploaded).
const UNREFERENCED: &str =
    "NOT EXISTS (SELECT 1 FROM manifest_refs x WHERE x.child_digest = b.digest)
    AND NOT EXISTS (SELECT 1 FROM cache_parts p WHERE p.digest = b.digest)
    AND NOT EXISTS (SELECT 1 FROM cache_blocks k WHERE k.digest = b.digest)";

/// A finished cache entry's last use: its last restore, or its creation.
const ENTRY_LAST_USED: &str = "max(e.created_ms / 1000, e.accessed_at)";

/// Blob `b`'s last upload, check, mount or read.
const BLOB_LAST_USED: &str = "max(b.created_at, b.accessed_at)";

/// Blob `b` was released: a root that referenced it was evicted or deleted.
const RELEASED: &str = "EXISTS (SELECT 1 FROM released_blobs r WHERE r.digest = b.digest)";

/// Send every root manifest and finished cache entry into `into`, least recently used
/// first (manifests before entries used in the same second), one row at a time: SQLite
/// sorts them (spilling to a temporary file past the reader's cache), so the listing's
/// memory does not grow with the store. Stops once `into` is closed.
pub(super) fn roots(c: &Connection, into: &mpsc::Sender<Evictable>) -> rusqlite::Result<()> {
    let sql = format!(
        "SELECT 0, r.name, m.digest, {LAST_USED} AS last_used, NULL, NULL,
            (SELECT group_concat(t.name, char(10)) FROM tags t INDEXED BY tags_by_digest
             WHERE t.repo_id = m.repo_id AND t.digest = m.digest)
         FROM manifests m JOIN repos r ON r.id = m.repo_id
         WHERE {IS_ROOT}
         UNION ALL
         SELECT 1, e.scope, e.key, {ENTRY_LAST_USED}, e.id, e.size, NULL FROM cache_entries e
         WHERE e.size IS NOT NULL
         ORDER BY 4, 1, 5, 2, 3"
    );
    let mut statement = c.prepare_cached(&sql)?;
    let mut rows = statement.query([])?;
    while let Some(r) = rows.next()? {
        let (kind, last_used): (i64, i64) = (r.get(0)?, r.get(3)?);
        let root = if kind == 0 {
            let tags: Option<String> = r.get(6)?;
            Evictable::Manifest(Root {
                repo: parse_repo(r.get(1)?)?,
                digest: parse_digest(r.get(2)?)?,
                last_used,
                tags: tags
                    .map(|t| t.split('\n').map(str::to_owned).collect())
                    .unwrap_or_default(),
            })
        } else {
            Evictable::Entry(EntryRoot {
                id: r.get(4)?,
                scope: r.get(1)?,
                key: r.get(2)?,
                size: r.get::<_, i64>(5)? as u64,
                last_used,
            })
        };
        if into.blocking_send(root).is_err() {
            break;
        }
    }
    Ok(())
}

/// Run an eviction (see [`crate::meta::MetaStore::evict`]); the caller provides the
/// transaction.
pub(super) fn evict(c: &Connection, request: &EvictRequest) -> rusqlite::Result<EvictOutcome> {
    let mut outcome = EvictOutcome::default();
    let mut counted = HashSet::new();
    for blob in unreferenced(c)? {
        counted.insert(blob.digest.clone());
        outcome.classify(blob, request);
    }
    for candidate in &request.candidates {
        if outcome.counted >= request.need && !candidate.forced {
            continue;
        }
        let (released, estimate, references) = match &candidate.root {
            Evictable::Manifest(root) => {
                let Some((repo_id, references)) = evict_root(c, root)? else {
                    continue;
                };
                let (released, estimate) =
                    released_by(c, repo_id, &root.digest, &references, &mut counted)?;
                (released, estimate, references)
            }
            Evictable::Entry(entry) => {
                let Some(references) = evict_entry(c, entry)? else {
                    continue;
                };
                let released = release(c, &references, &mut counted)?;
                (released, 0, references)
            }
        };
        for blob in released {
            outcome.classify(blob, request);
        }
        outcome.counted += estimate;
        outcome.evicted.push(Evicted {
            root: candidate.root.clone(),
            references,
        });
    }
    Ok(outcome)
}

/// Every stored blob nothing references.
fn unreferenced(c: &Connection) -> rusqlite::Result<Vec<Unreferenced>> {
    c.prepare_cached(&format!(
        "SELECT b.digest, b.size, {BLOB_LAST_USED}, {RELEASED} FROM blobs b WHERE {UNREFERENCED}"
    ))?
    .query_map([], |r| {
        Ok(Unreferenced {
            digest: parse_digest(r.get(0)?)?,
            size: r.get::<_, i64>(1)? as u64,
            last_used: r.get(2)?,
            released: r.get(3)?,
        })
    })?
    .collect()
}

/// What removing manifest `removed` (which referenced `references`) from `repo_id` frees:
/// the blobs it releases (marked released, returned to sweep now or later), and an
/// estimate in bytes of what the manifests it leaves to go after it would free in turn:
/// the untagged child manifests nothing else lists and the untagged referrers of
/// whatever goes, all the way down. Those go as roots in later rounds, once reads that
/// saw the parent have taken their leases; here their removal is only simulated, level
/// by level (so the order of the references does not matter), then rolled back.
/// `counted` keeps a blob from being counted twice.
fn released_by(
    c: &Connection,
    repo_id: i64,
    removed: &Digest,
    references: &[Digest],
    counted: &mut HashSet<Digest>,
) -> rusqlite::Result<(Vec<Unreferenced>, u64)> {
    let released = release(c, references, counted)?;
    c.execute_batch("SAVEPOINT estimate")?;
    let mut frontier = references.to_vec();
    frontier.extend(referrers(c, repo_id, removed)?);
    let mut seen: HashSet<Digest> = frontier.iter().cloned().collect();
    loop {
        let mut orphans = Vec::new();
        for digest in &frontier {
            if orphaned(c, repo_id, digest)? {
                orphans.push(digest.clone());
            }
        }
        if orphans.is_empty() {
            break;
        }
        for orphan in orphans {
            let mut next = remove_manifest(c, repo_id, &orphan)?;
            next.extend(referrers(c, repo_id, &orphan)?);
            for digest in next {
                if seen.insert(digest.clone()) {
                    frontier.push(digest);
                }
            }
        }
    }
    let estimate = release(c, &frontier, counted)?
        .iter()
        .map(|b| on_disk(b.size))
        .sum();
    c.execute_batch("ROLLBACK TO estimate; RELEASE estimate")?;
    Ok((released, estimate))
}

/// Whether `digest` is a manifest of `repo_id` that nothing keeps: a root no tag points
/// at.
fn orphaned(c: &Connection, repo_id: i64, digest: &Digest) -> rusqlite::Result<bool> {
    c.prepare_cached(&format!(
        "SELECT 1 FROM manifests m WHERE m.repo_id = ?1 AND m.digest = ?2 AND {IS_ROOT}
         AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repo_id = m.repo_id AND t.digest = m.digest)"
    ))?
    .query_row(params![repo_id, digest.to_string()], |_| Ok(()))
    .optional()
    .map(|found| found.is_some())
}

/// The manifests of `repo_id` whose subject is `subject`.
fn referrers(c: &Connection, repo_id: i64, subject: &Digest) -> rusqlite::Result<Vec<Digest>> {
    c.prepare_cached("SELECT digest FROM manifests WHERE repo_id = ?1 AND subject = ?2")?
        .query_map(params![repo_id, subject.to_string()], |r| {
            parse_digest(r.get(0)?)
        })?
        .collect()
}

/// Mark released those of `digests` that are stored blobs nothing references any more,
/// not yet in `counted` (and now added to it); returns them.
pub(super) fn release(
    c: &Connection,
    digests: &[Digest],
    counted: &mut HashSet<Digest>,
) -> rusqlite::Result<Vec<Unreferenced>> {
    let mut found = Vec::new();
    for digest in digests {
        if counted.contains(digest) {
            continue;
        }
        let key = digest.to_string();
        let blob = c
            .prepare_cached(&format!(
                "SELECT b.size, {BLOB_LAST_USED} FROM blobs b WHERE b.digest = ?1 AND {UNREFERENCED}"
            ))?
            .query_row([&key], |r| Ok((r.get::<_, i64>(0)?, r.get(1)?)))
            .optional()?;
        if let Some((size, last_used)) = blob {
            c.prepare_cached(
                "INSERT INTO released_blobs (digest, released_at) VALUES (?1, ?2)
                 ON CONFLICT (digest) DO UPDATE SET released_at = excluded.released_at",
            )?
            .execute(params![key, now_secs()])?;
            counted.insert(digest.clone());
            found.push(Unreferenced {
                digest: digest.clone(),
                size: size as u64,
                last_used,
                released: true,
            });
        }
    }
    Ok(found)
}

/// Remove `root` with its tags if it is still a root and unused since it was listed;
/// returns its repository's id and what it referenced.
fn evict_root(c: &Connection, root: &Root) -> rusqlite::Result<Option<(i64, Vec<Digest>)>> {
    let (repo, digest) = (root.repo.as_str(), root.digest.to_string());
    let repo_id: Option<i64> = c
        .prepare_cached("SELECT id FROM repos WHERE name = ?1")?
        .query_row([repo], |r| r.get(0))
        .optional()?;
    let Some(repo_id) = repo_id else {
        return Ok(None);
    };
    let last_used: Option<i64> = c
        .prepare_cached(&format!(
            "SELECT {LAST_USED} FROM manifests m WHERE m.repo_id = ?1 AND m.digest = ?2 AND {IS_ROOT}"
        ))?
        .query_row(params![repo_id, digest], |r| r.get(0))
        .optional()?;
    if last_used.is_none_or(|used| used > root.last_used) {
        return Ok(None);
    }
    Ok(Some((repo_id, remove_manifest(c, repo_id, &root.digest)?)))
}

/// Remove a cache entry if it is unused since it was listed; returns the blobs it held.
fn evict_entry(c: &Connection, root: &EntryRoot) -> rusqlite::Result<Option<Vec<Digest>>> {
    let last_used: Option<i64> = c
        .prepare_cached(&format!(
            "SELECT {ENTRY_LAST_USED} FROM cache_entries e WHERE e.id = ?1 AND e.size IS NOT NULL"
        ))?
        .query_row([root.id], |r| r.get(0))
        .optional()?;
    if last_used.is_none_or(|used| used > root.last_used) {
        return Ok(None);
    }
    super::entries::delete(c, root.id)
}

/// Delete the tags of manifest `?2` in repository `?1`. Without the index hint SQLite
/// walks the repository's every tag (its primary key's prefix) for each manifest removed:
/// evicting 60 000 tagged manifests of one repository took about 4 ms each.
pub(super) const DELETE_TAGS_OF: &str =
    "DELETE FROM tags INDEXED BY tags_by_digest WHERE repo_id = ?1 AND digest = ?2";

/// Delete a manifest, its tags and its references; returns what it referenced.
pub(super) fn remove_manifest(
    c: &Connection,
    repo_id: i64,
    digest: &Digest,
) -> rusqlite::Result<Vec<Digest>> {
    let digest = digest.to_string();
    let references = c
        .prepare_cached(
            "SELECT child_digest FROM manifest_refs WHERE repo_id = ?1 AND manifest_digest = ?2",
        )?
        .query_map(params![repo_id, digest], |r| parse_digest(r.get(0)?))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    for sql in [
        "DELETE FROM manifests WHERE repo_id = ?1 AND digest = ?2",
        DELETE_TAGS_OF,
        "DELETE FROM manifest_refs WHERE repo_id = ?1 AND manifest_digest = ?2",
    ] {
        c.prepare_cached(sql)?.execute(params![repo_id, digest])?;
    }
    Ok(references)
}

/// Forget each of `blobs` that is still sweepable, with its links.
pub(super) fn forget_blobs(
    c: &Connection,
    blobs: &[Digest],
    idle_before: i64,
    unused_before: i64,
) -> rusqlite::Result<Vec<(Digest, u64)>> {
    let mut forgotten = Vec::new();
    for digest in blobs {
        let key = digest.to_string();
        let size: Option<i64> = c
            .prepare_cached(&format!(
                "DELETE FROM blobs AS b WHERE b.digest = ?3
                 AND {BLOB_LAST_USED} < CASE WHEN {RELEASED} THEN ?2 ELSE ?1 END
                 AND {UNREFERENCED} RETURNING size"
            ))?
            .query_row(params![idle_before, unused_before, key], |r| r.get(0))
            .optional()?;
        if let Some(size) = size {
            for sql in [
                "DELETE FROM repo_blobs WHERE digest = ?1",
                "DELETE FROM released_blobs WHERE digest = ?1",
            ] {
                c.prepare_cached(sql)?.execute([&key])?;
            }
            forgotten.push((digest.clone(), size as u64));
        }
    }
    Ok(forgotten)
}

/// Stored blobs, their bytes on disk, and the bytes of those released and waiting.
pub(super) fn blob_usage(c: &Connection) -> rusqlite::Result<BlobUsage> {
    const ON_DISK: &str = "coalesce(sum((b.size + 4095) / 4096 * 4096), 0)";
    let (blobs, bytes) = c
        .prepare_cached(&format!("SELECT count(*), {ON_DISK} FROM blobs b"))?
        .query_row([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
    let released_bytes = c
        .prepare_cached(&format!(
            "SELECT {ON_DISK} FROM released_blobs r JOIN blobs b ON b.digest = r.digest
             WHERE {UNREFERENCED}"
        ))?
        .query_row([], |r| r.get::<_, i64>(0))?;
    Ok(BlobUsage {
        blobs: blobs as u64,
        bytes: bytes as u64,
        released_bytes: released_bytes as u64,
    })
}
