//! Eviction's queries on PostgreSQL: the roots, removing them, and the blobs nothing
//! references.
//!
//! Each runs inside the caller's SERIALIZABLE transaction, so it is ordered with every
//! manifest PUT on every node: a PUT either commits first (its references keep their
//! blobs) or finds the blob gone and fails with MANIFEST_BLOB_UNKNOWN. Where the
//! embedded store loops over rows, these statements work on whole sets (digests passed
//! as arrays), one round trip each.

use std::collections::HashSet;

use futures::TryStreamExt;
use oci::Digest;
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio::sync::mpsc;

use super::{parse_digest, parse_repo};
use crate::meta::{
    BlobUsage, EntryRoot, EvictOutcome, EvictRequest, Evictable, Evicted, Root, Unreferenced,
    on_disk,
};
use crate::{Result, now_secs};

/// A manifest's last use: its own push or read, or any of its tags'.
const LAST_USED: &str = "GREATEST(m.created_at, m.accessed_at, coalesce(
        (SELECT max(GREATEST(t.updated_at, t.accessed_at)) FROM tags t
         WHERE t.repo_id = m.repo_id AND t.digest = m.digest), 0))";

/// `m` is a root: no manifest in its repository lists it, and its subject (if any) is
/// not there.
const IS_ROOT: &str = "NOT EXISTS (SELECT 1 FROM manifest_refs x
        WHERE x.repo_id = m.repo_id AND x.child_digest = m.digest AND x.kind = 'manifest')
    AND (m.subject IS NULL OR NOT EXISTS (SELECT 1 FROM manifests s
        WHERE s.repo_id = m.repo_id AND s.digest = m.subject))";

/// No tag points at `m`.
const UNTAGGED: &str =
    "NOT EXISTS (SELECT 1 FROM tags t WHERE t.repo_id = m.repo_id AND t.digest = m.digest)";

/// Blob `b` is referenced by no manifest and no cache entry (finished, or a block or
/// part of one being uploaded).
const UNREFERENCED: &str =
    "NOT EXISTS (SELECT 1 FROM manifest_refs x WHERE x.child_digest = b.digest)
    AND NOT EXISTS (SELECT 1 FROM cache_parts p WHERE p.digest = b.digest)
    AND NOT EXISTS (SELECT 1 FROM cache_blocks k WHERE k.digest = b.digest)";

/// A finished cache entry's last use: its last restore, or its creation.
pub(super) const ENTRY_LAST_USED: &str = "GREATEST(e.created_ms / 1000, e.accessed_at)";

/// Blob `b`'s last upload, check, mount or read.
const BLOB_LAST_USED: &str = "GREATEST(b.created_at, b.accessed_at)";

/// Blob `b` was released: a root that referenced it was evicted or deleted.
const RELEASED: &str = "EXISTS (SELECT 1 FROM released_blobs r WHERE r.digest = b.digest)";

/// A statement deleting the manifests `target` selects (as `repo_id, digest`) with their
/// tags and references. It yields one row: the repository of those deleted (NULL when
/// none was), and what they referenced, in order (as the primary key orders them).
fn removal(target: &str) -> String {
    format!(
        "WITH target AS ({target}),
         tags_gone AS (DELETE FROM tags t USING target
             WHERE t.repo_id = target.repo_id AND t.digest = target.digest),
         refs_gone AS (DELETE FROM manifest_refs x USING target
             WHERE x.repo_id = target.repo_id AND x.manifest_digest = target.digest
             RETURNING x.manifest_digest, x.child_digest, x.kind),
         gone AS (DELETE FROM manifests m USING target
             WHERE m.repo_id = target.repo_id AND m.digest = target.digest
             RETURNING m.repo_id)
         SELECT (SELECT min(repo_id) FROM gone),
             ARRAY(SELECT child_digest FROM refs_gone ORDER BY manifest_digest, child_digest, kind)"
    )
}

/// Parse stored digests.
fn digests(stored: Vec<String>) -> Result<Vec<Digest>> {
    stored.into_iter().map(parse_digest).collect()
}

/// Send every root manifest and finished cache entry into `into`, least recently used
/// first (manifests before entries used in the same second), as the rows arrive: the
/// database sorts them, so the listing's memory does not grow with the store. Stops once
/// `into` is closed.
pub(super) async fn roots(c: &mut PgConnection, into: &mpsc::Sender<Evictable>) -> Result<()> {
    type Row = (
        i32,
        String,
        String,
        i64,
        Option<i64>,
        Option<i64>,
        Vec<String>,
    );
    let sql = format!(
        "SELECT 0, r.name, m.digest, {LAST_USED}, NULL::bigint, NULL::bigint,
            ARRAY(SELECT t.name FROM tags t
                  WHERE t.repo_id = m.repo_id AND t.digest = m.digest ORDER BY t.name)
         FROM manifests m JOIN repos r ON r.id = m.repo_id
         WHERE {IS_ROOT}
         UNION ALL
         SELECT 1, e.scope, e.key, {ENTRY_LAST_USED}, e.id, e.size, ARRAY[]::text[]
         FROM cache_entries e
         WHERE e.size IS NOT NULL
         ORDER BY 4, 1, 5, 2, 3"
    );
    let mut rows = sqlx::query_as::<_, Row>(AssertSqlSafe(sql)).fetch(&mut *c);
    while let Some((kind, name, key, last_used, id, size, tags)) = rows.try_next().await? {
        let root = match (kind, id, size) {
            (1, Some(id), Some(size)) => Evictable::Entry(EntryRoot {
                id,
                scope: name,
                key,
                size: size as u64,
                last_used,
            }),
            _ => Evictable::Manifest(Root {
                repo: parse_repo(name)?,
                digest: parse_digest(key)?,
                last_used,
                tags,
            }),
        };
        if into.send(root).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Run an eviction (see [`crate::meta::MetaStore::evict`]); the caller provides the
/// transaction.
pub(super) async fn evict(c: &mut PgConnection, request: &EvictRequest) -> Result<EvictOutcome> {
    let mut outcome = EvictOutcome::default();
    let mut counted = HashSet::new();
    for blob in unreferenced(c).await? {
        counted.insert(blob.digest.clone());
        outcome.classify(blob, request);
    }
    for candidate in &request.candidates {
        if outcome.counted >= request.need && !candidate.forced {
            continue;
        }
        let (released, estimate, references) = match &candidate.root {
            Evictable::Manifest(root) => {
                let Some((repo_id, references)) = evict_root(c, root).await? else {
                    continue;
                };
                let released = release(c, &references, &mut counted).await?;
                let estimate =
                    estimate_orphans(c, repo_id, &root.digest, &references, &mut counted).await?;
                (released, estimate, references)
            }
            Evictable::Entry(entry) => {
                let Some(references) =
                    super::entries::delete_unused_since(c, entry.id, entry.last_used).await?
                else {
                    continue;
                };
                let released = release(c, &references, &mut counted).await?;
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
async fn unreferenced(c: &mut PgConnection) -> Result<Vec<Unreferenced>> {
    let rows: Vec<(String, i64, i64, bool)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT b.digest, b.size, {BLOB_LAST_USED}, {RELEASED} FROM blobs b
         WHERE {UNREFERENCED} ORDER BY b.digest"
    )))
    .fetch_all(&mut *c)
    .await?;
    rows.into_iter()
        .map(|(digest, size, last_used, released)| {
            Ok(Unreferenced {
                digest: parse_digest(digest)?,
                size: size as u64,
                last_used,
                released,
            })
        })
        .collect()
}

/// An estimate in bytes of what the manifests that removing manifest `removed` (which
/// referenced `references`) from `repo_id` leaves to go after it would free in turn: the
/// untagged child manifests nothing else lists and the untagged referrers of whatever
/// goes, all the way down. Those go as roots in later rounds, once reads that saw the
/// parent have taken their leases; here their removal is only simulated, level by
/// level, in a savepoint rolled back. `counted` keeps a blob from being counted twice:
/// what this counts is added to it.
async fn estimate_orphans(
    c: &mut PgConnection,
    repo_id: i64,
    removed: &Digest,
    references: &[Digest],
    counted: &mut HashSet<Digest>,
) -> Result<u64> {
    let mut seen: HashSet<Digest> = references.iter().cloned().collect();
    let mut frontier: Vec<Digest> = seen.iter().cloned().collect();
    let mut gone = vec![removed.to_string()];
    // Manifests among the frontier, or naming one gone as their subject, that nothing
    // keeps any more: roots no tag points at.
    let orphaned = format!(
        "SELECT m.digest FROM manifests m
         WHERE m.repo_id = $1 AND (m.digest = ANY($2) OR m.subject = ANY($3))
         AND {IS_ROOT} AND {UNTAGGED}"
    );
    let keys = |frontier: &[Digest]| frontier.iter().map(Digest::to_string).collect::<Vec<_>>();
    // Most manifests leave nothing behind: then nothing needs simulating.
    let mut orphans: Vec<String> = sqlx::query_scalar(AssertSqlSafe(orphaned.clone()))
        .bind(repo_id)
        .bind(keys(&frontier))
        .bind(&gone)
        .fetch_all(&mut *c)
        .await?;
    if orphans.is_empty() {
        return Ok(0);
    }
    let mut simulated = c.begin().await?;
    let remove = removal("SELECT $1::bigint AS repo_id, d AS digest FROM unnest($2::text[]) AS d");
    while !orphans.is_empty() {
        let (_, children): (Option<i64>, Vec<String>) =
            sqlx::query_as(AssertSqlSafe(remove.clone()))
                .bind(repo_id)
                .bind(&orphans)
                .fetch_one(&mut *simulated)
                .await?;
        gone.append(&mut orphans);
        for child in digests(children)? {
            if seen.insert(child.clone()) {
                frontier.push(child);
            }
        }
        orphans = sqlx::query_scalar(AssertSqlSafe(orphaned.clone()))
            .bind(repo_id)
            .bind(keys(&frontier))
            .bind(&gone)
            .fetch_all(&mut *simulated)
            .await?;
    }
    let freed = release(&mut simulated, &frontier, counted).await?;
    simulated.rollback().await?;
    Ok(freed.iter().map(|b| on_disk(b.size)).sum())
}

/// Mark released those of `digests` that are stored blobs nothing references any more,
/// not yet in `counted` (and now added to it); returns them.
pub(super) async fn release(
    c: &mut PgConnection,
    digests: &[Digest],
    counted: &mut HashSet<Digest>,
) -> Result<Vec<Unreferenced>> {
    let mut asked = HashSet::new();
    let keys: Vec<String> = digests
        .iter()
        .filter(|d| !counted.contains(*d) && asked.insert(*d))
        .map(Digest::to_string)
        .collect();
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "WITH asked AS (SELECT d, n FROM unnest($1::text[]) WITH ORDINALITY AS u(d, n)),
         found AS (SELECT asked.n, b.digest, b.size, {BLOB_LAST_USED} AS last_used
             FROM asked JOIN blobs b ON b.digest = asked.d WHERE {UNREFERENCED}),
         marked AS (INSERT INTO released_blobs (digest, released_at)
             SELECT digest, $2 FROM found
             ON CONFLICT (digest) DO UPDATE SET released_at = excluded.released_at)
         SELECT digest, size, last_used FROM found ORDER BY n"
    )))
    .bind(&keys)
    .bind(now_secs())
    .fetch_all(&mut *c)
    .await?;
    let mut found = Vec::with_capacity(rows.len());
    for (digest, size, last_used) in rows {
        let digest = parse_digest(digest)?;
        counted.insert(digest.clone());
        found.push(Unreferenced {
            digest,
            size: size as u64,
            last_used,
            released: true,
        });
    }
    Ok(found)
}

/// Remove `root` with its tags if it is still a root and unused since it was listed;
/// returns its repository's id and what it referenced.
async fn evict_root(c: &mut PgConnection, root: &Root) -> Result<Option<(i64, Vec<Digest>)>> {
    let sql = removal(&format!(
        "SELECT m.repo_id, m.digest FROM manifests m JOIN repos r ON r.id = m.repo_id
         WHERE r.name = $1 AND m.digest = $2 AND {IS_ROOT} AND {LAST_USED} <= $3"
    ));
    let (repo_id, references): (Option<i64>, Vec<String>) = sqlx::query_as(AssertSqlSafe(sql))
        .bind(root.repo.as_str())
        .bind(root.digest.to_string())
        .bind(root.last_used)
        .fetch_one(&mut *c)
        .await?;
    let Some(repo_id) = repo_id else {
        return Ok(None);
    };
    Ok(Some((repo_id, digests(references)?)))
}

/// Delete a manifest, its tags and its references; returns what it referenced.
pub(super) async fn remove_manifest(
    c: &mut PgConnection,
    repo_id: i64,
    digest: &Digest,
) -> Result<Vec<Digest>> {
    let sql = removal("SELECT $1::bigint AS repo_id, $2::text AS digest");
    let (_, references): (Option<i64>, Vec<String>) = sqlx::query_as(AssertSqlSafe(sql))
        .bind(repo_id)
        .bind(digest.to_string())
        .fetch_one(&mut *c)
        .await?;
    digests(references)
}

/// Forget each of `blobs` that is still sweepable, with its links.
pub(super) async fn forget_blobs(
    c: &mut PgConnection,
    blobs: &[Digest],
    idle_before: i64,
    unused_before: i64,
) -> Result<Vec<(Digest, u64)>> {
    let mut asked = HashSet::new();
    let keys: Vec<String> = blobs
        .iter()
        .filter(|d| asked.insert(*d))
        .map(Digest::to_string)
        .collect();
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "WITH asked AS (SELECT d, n FROM unnest($3::text[]) WITH ORDINALITY AS u(d, n)),
         gone AS (DELETE FROM blobs AS b USING asked WHERE b.digest = asked.d
             AND {BLOB_LAST_USED} < CASE WHEN {RELEASED} THEN $2 ELSE $1 END
             AND {UNREFERENCED}
             RETURNING asked.n, b.digest, b.size),
         links_gone AS (DELETE FROM repo_blobs rb USING gone WHERE rb.digest = gone.digest),
         marks_gone AS (DELETE FROM released_blobs r USING gone WHERE r.digest = gone.digest)
         SELECT digest, size FROM gone ORDER BY n"
    )))
    .bind(idle_before)
    .bind(unused_before)
    .bind(&keys)
    .fetch_all(&mut *c)
    .await?;
    rows.into_iter()
        .map(|(digest, size)| Ok((parse_digest(digest)?, size as u64)))
        .collect()
}

/// Stored blobs, their bytes on disk, and the bytes of those released and waiting.
pub(super) async fn blob_usage(c: &mut PgConnection) -> Result<BlobUsage> {
    const ON_DISK: &str = "coalesce(sum((b.size + 4095) / 4096 * 4096), 0)::bigint";
    let (blobs, bytes, released_bytes): (i64, i64, i64) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT (SELECT count(*) FROM blobs),
            (SELECT {ON_DISK} FROM blobs b),
            (SELECT {ON_DISK} FROM released_blobs r JOIN blobs b ON b.digest = r.digest
             WHERE {UNREFERENCED})"
    )))
    .fetch_one(&mut *c)
    .await?;
    Ok(BlobUsage {
        blobs: blobs as u64,
        bytes: bytes as u64,
        released_bytes: released_bytes as u64,
    })
}

#[cfg(test)]
mod tests {
    //! The same eviction on the embedded store and on PostgreSQL: the same roots, the
    //! same removals, releases and sweeps.

    use std::collections::BTreeMap;

    use bytes::Bytes;
    use oci::{CacheRecords, Digest, ManifestReference, RefKind, RepoName};

    use crate::config::Postgres;
    use crate::meta::{
        Candidate, EvictOutcome, EvictRequest, Evictable, ManifestRecord, MetaStore, NewEntry,
        Part, PgMeta, SqliteMeta, Unreferenced,
    };

    /// The embedded store in a temporary directory, and PostgreSQL on a fresh database;
    /// `None` when PostgreSQL is missing and not required.
    async fn both() -> Option<(tempfile::TempDir, Vec<Box<dyn MetaStore>>)> {
        let url = testsupport::postgres::require()?.create_database();
        let dir = tempfile::tempdir().unwrap();
        let sqlite = SqliteMeta::open(&dir.path().join("meta.db")).unwrap();
        let config = Postgres {
            url,
            password_file: None,
            max_connections: 4,
        };
        let postgres = PgMeta::connect(&config).await.unwrap();
        Some((dir, vec![Box::new(sqlite), Box::new(postgres)]))
    }

    fn blob(n: u8) -> (Digest, u64) {
        (Digest::sha256_of(&[n]), 1000 * u64::from(n) + 1)
    }

    fn repo(name: &str) -> RepoName {
        name.parse().unwrap()
    }

    fn manifest(
        content: &str,
        blobs: &[(Digest, u64)],
        children: &[&ManifestRecord],
        subject: Option<&ManifestRecord>,
    ) -> ManifestRecord {
        let blobs = blobs.iter().map(|(digest, size)| ManifestReference {
            digest: digest.clone(),
            kind: RefKind::Blob,
            required: true,
            size: *size,
        });
        let children = children.iter().map(|m| ManifestReference {
            digest: m.digest.clone(),
            kind: RefKind::Manifest,
            required: true,
            size: m.content.len() as u64,
        });
        ManifestRecord {
            digest: Digest::sha256_of(content.as_bytes()),
            media_type: "application/vnd.oci.image.manifest.v1+json".to_owned(),
            artifact_type: None,
            subject: subject.map(|s| s.digest.clone()),
            annotations: BTreeMap::new(),
            content: Bytes::copy_from_slice(content.as_bytes()),
            references: blobs.chain(children).collect(),
            cache: CacheRecords::Without,
        }
    }

    /// What eviction lists, without the times (the two stores record them a moment
    /// apart), in a canonical order.
    fn listed(roots: &[Evictable]) -> Vec<String> {
        let mut all: Vec<String> = roots
            .iter()
            .map(|root| match root {
                Evictable::Manifest(m) => format!("{} {} {:?}", m.repo, m.digest, m.tags),
                Evictable::Entry(e) => format!("{} {} {}", e.scope, e.key, e.size),
            })
            .collect();
        all.sort();
        all
    }

    fn blobs(list: &[Unreferenced]) -> Vec<(String, u64, bool)> {
        let mut all: Vec<_> = list
            .iter()
            .map(|b| (b.digest.to_string(), b.size, b.released))
            .collect();
        all.sort();
        all
    }

    /// An outcome without times or entry ids.
    fn outcome(o: &EvictOutcome) -> String {
        let evicted: Vec<(String, Vec<String>)> = o
            .evicted
            .iter()
            .map(|e| {
                (
                    listed(std::slice::from_ref(&e.root)).concat(),
                    e.references.iter().map(Digest::to_string).collect(),
                )
            })
            .collect();
        format!(
            "evicted {evicted:?}\nsweepable {:?}\nwaiting {:?}\nyoung {}\ncounted {}",
            blobs(&o.sweepable),
            blobs(&o.waiting),
            o.young_bytes,
            o.counted
        )
    }

    /// Every root as a candidate, in a canonical order.
    fn candidates(roots: Vec<Evictable>, forced: bool) -> Vec<Candidate> {
        let mut roots = roots;
        roots.sort_by_key(|r| listed(std::slice::from_ref(r)));
        roots
            .into_iter()
            .map(|root| Candidate { root, forced })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_evicts_what_sqlite_evicts() {
        let Some((_dir, stores)) = both().await else {
            return;
        };
        let (a, b) = (repo("team/app"), repo("team/other"));
        let m1 = manifest("m1", &[blob(1), blob(2)], &[], None);
        let m2 = manifest("m2", &[blob(2), blob(3)], &[], None);
        let index = manifest("index", &[], &[&m1, &m2], None);
        let signature = manifest("signature", &[blob(4)], &[], Some(&m2));
        let other = manifest("other", &[blob(5), blob(1)], &[], None);
        let nested = manifest("nested", &[blob(6)], &[], None);
        let outer = manifest("outer", &[], &[&index, &nested], None);
        let mut outcomes = Vec::new();
        for meta in &stores {
            for n in 1..=8 {
                let (digest, size) = blob(n);
                meta.link_blob(&a, &digest, size).await.unwrap();
            }
            let (digest, size) = blob(5);
            meta.link_blob(&b, &digest, size).await.unwrap();
            meta.link_blob(&b, &blob(1).0, blob(1).1).await.unwrap();
            for m in [&m1, &m2, &index, &signature, &nested, &outer] {
                meta.put_manifest(&a, m.clone(), None).await.unwrap();
            }
            meta.put_manifest(&a, m1.clone(), Some(&"x".parse().unwrap()))
                .await
                .unwrap();
            for t in ["latest", "v1"] {
                meta.put_manifest(&a, outer.clone(), Some(&t.parse().unwrap()))
                    .await
                    .unwrap();
            }
            meta.put_manifest(&b, other.clone(), Some(&"v2".parse().unwrap()))
                .await
                .unwrap();
            let new = NewEntry {
                repository: "octo/app".into(),
                scope: "refs/heads/main".into(),
                key: "deps".into(),
                version: "v1".into(),
            };
            let entry = meta.create_entry(new).await.unwrap();
            for (start, n) in [(0, 3), (blob(3).1, 7)] {
                let (digest, len) = blob(n);
                let part = Part { start, digest, len };
                meta.add_entry_part(entry.id, part, false).await.unwrap();
            }
            meta.finish_entry(entry.id, blob(3).1 + blob(7).1)
                .await
                .unwrap();

            let mut seen = vec![listed(
                &crate::meta::all_roots(meta.as_ref()).await.unwrap(),
            )];
            let future = crate::now_secs() + 10;
            let request = |candidates, need, dry_run| EvictRequest {
                candidates,
                need,
                idle_before: future,
                unused_before: future,
                dry_run,
            };
            // A dry run changes nothing; a real one stops at the need; forced ones go.
            let roots = crate::meta::all_roots(meta.as_ref()).await.unwrap();
            let dry = meta
                .evict(request(candidates(roots.clone(), false), u64::MAX, true))
                .await
                .unwrap();
            seen.push(vec![outcome(&dry)]);
            seen.push(listed(
                &crate::meta::all_roots(meta.as_ref()).await.unwrap(),
            ));
            let first = meta
                .evict(request(candidates(roots, false), 1, false))
                .await
                .unwrap();
            seen.push(vec![outcome(&first)]);
            for round in 0..4 {
                let roots = crate::meta::all_roots(meta.as_ref()).await.unwrap();
                seen.push(listed(&roots));
                let done = meta
                    .evict(request(candidates(roots, round % 2 == 1), 1, false))
                    .await
                    .unwrap();
                seen.push(vec![outcome(&done)]);
                let sweep: Vec<Digest> = done.sweepable.iter().map(|b| b.digest.clone()).collect();
                let forgotten = meta.forget_blobs(sweep, future, future).await.unwrap();
                seen.push(vec![format!("{forgotten:?}")]);
                seen.push(vec![format!("{:?}", meta.blob_usage().await.unwrap())]);
            }
            outcomes.push(seen);
        }
        assert_eq!(outcomes[0], outcomes[1]);
    }
}
