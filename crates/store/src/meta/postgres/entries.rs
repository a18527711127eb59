//! Cache entries on PostgreSQL: reserved, filled with parts (each a stored blob),
//! finished, matched the way GitHub matches keys.
//!
//! Keys compare bytewise (their columns are `COLLATE "C"`, like SQLite's BINARY) after
//! [`folded`] (`lower()` of a `"C"` column changes only ASCII letters), so a prefix match
//! is the index range from the folded prefix to [`prefix_end`].

use oci::Digest;
use sqlx::{AssertSqlSafe, PgConnection};

use super::evict::ENTRY_LAST_USED;
use super::{parse_digest, record_blob};
use crate::error::Missing;
use crate::meta::{Entry, EntryQuery, NewEntry, Part, folded, prefix_end};
use crate::{Error, Result, now_ms, now_secs};

const COLUMNS: &str =
    "e.id, e.repository, e.scope, e.key, e.version, e.size, e.created_ms, e.accessed_at";

/// An entry's row, as [`COLUMNS`] selects it.
type EntryRow = (i64, String, String, String, String, Option<i64>, i64, i64);

fn entry(row: EntryRow) -> Entry {
    let (id, repository, scope, key, version, size, created_ms, last_used) = row;
    Entry {
        id,
        repository,
        scope,
        key,
        version,
        size: size.map(|s| s as u64),
        created_ms,
        last_used,
    }
}

/// The smallest string greater than `key`: PostgreSQL text holds no NUL, so `key`
/// followed by U+0001 bounds the range that holds `key` alone.
fn exact_end(key: &str) -> String {
    format!("{key}\u{1}")
}

/// An unfinished entry without upload activity for this long (seconds) no longer holds
/// its key: its client is taken to be gone, and a new save may replace it.
const ABANDONED_AFTER: i64 = 600;

/// Reserve an entry; [`Error::EntryExists`] when its key is taken (see
/// [`crate::meta::MetaStore::create_entry`]).
pub(super) async fn create(c: &mut PgConnection, new: &NewEntry) -> Result<Entry> {
    // Creates of one key in any case wait for each other (the unique constraint covers
    // only the exact case), across every node of the database.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!(
            "cache entry\n{}\n{}\n{}\n{}",
            new.repository,
            new.scope,
            new.version,
            folded(&new.key)
        ))
        .execute(&mut *c)
        .await?;
    for taken in same_key(c, new).await? {
        if taken.size.is_some() || taken.last_used >= now_secs() - ABANDONED_AFTER {
            return Err(Error::EntryExists);
        }
        delete_and_release(c, taken.id).await?;
    }
    let inserted: Option<EntryRow> = sqlx::query_as(AssertSqlSafe(format!(
        "INSERT INTO cache_entries AS e (repository, scope, key, version, created_ms, accessed_at)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (repository, scope, version, key) DO NOTHING
         RETURNING {COLUMNS}"
    )))
    .bind(&new.repository)
    .bind(&new.scope)
    .bind(&new.key)
    .bind(&new.version)
    .bind(now_ms())
    .bind(now_secs())
    .fetch_optional(&mut *c)
    .await?;
    inserted.map(entry).ok_or(Error::EntryExists)
}

/// An entry, finished or not.
pub(super) async fn get(c: &mut PgConnection, id: i64) -> Result<Option<Entry>> {
    let row: Option<EntryRow> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM cache_entries e WHERE e.id = $1"
    )))
    .bind(id)
    .fetch_optional(&mut *c)
    .await?;
    Ok(row.map(entry))
}

/// The entries, finished or not, whose key matches `key`'s (see [`folded`]) in its
/// scope and version: the one of exactly its case first, then the newest.
async fn same_key(c: &mut PgConnection, key: &NewEntry) -> Result<Vec<Entry>> {
    let rows: Vec<EntryRow> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM cache_entries e
         WHERE e.repository = $1 AND e.scope = $2 AND e.version = $3 AND lower(e.key) = $4
         ORDER BY e.key = $5 DESC, e.id DESC"
    )))
    .bind(&key.repository)
    .bind(&key.scope)
    .bind(&key.version)
    .bind(folded(&key.key))
    .bind(&key.key)
    .fetch_all(&mut *c)
    .await?;
    Ok(rows.into_iter().map(entry).collect())
}

/// The entry, finished or not, with this key (see [`same_key`]) and version in this scope.
pub(super) async fn by_key(c: &mut PgConnection, key: &NewEntry) -> Result<Option<Entry>> {
    Ok(same_key(c, key).await?.into_iter().next())
}

/// The finished entry a restore gets (see [`EntryQuery`]): every lookup of the GitHub
/// order, each the newest entry in one scope whose key lies in one range, in one
/// statement; the first lookup in that order that finds one wins.
pub(super) async fn find(c: &mut PgConnection, query: &EntryQuery) -> Result<Option<Entry>> {
    let Some((primary, _)) = query.keys.split_first() else {
        return Ok(None);
    };
    let mut scopes = Vec::new();
    let mut starts = Vec::new();
    let mut ends = Vec::new();
    let primary = folded(primary);
    let keys: Vec<String> = query.keys.iter().map(|k| folded(k)).collect();
    for scope in &query.scopes {
        scopes.push(scope.as_str());
        starts.push(primary.clone());
        ends.push(Some(exact_end(&primary)));
        for key in &keys {
            scopes.push(scope.as_str());
            starts.push(key.clone());
            ends.push(prefix_end(key));
        }
    }
    let row: Option<EntryRow> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS}
         FROM unnest($3::text[], $4::text[], $5::text[]) WITH ORDINALITY
             AS q(scope, start_key, end_key, rank)
         CROSS JOIN LATERAL (
             SELECT {COLUMNS} FROM cache_entries e
             WHERE e.repository = $1 AND e.scope = q.scope AND e.version = $2
               AND e.size IS NOT NULL
               AND lower(e.key) >= q.start_key AND (q.end_key IS NULL OR lower(e.key) < q.end_key)
             ORDER BY e.created_ms DESC, e.id DESC LIMIT 1
         ) e
         ORDER BY q.rank LIMIT 1"
    )))
    .bind(&query.repository)
    .bind(&query.version)
    .bind(&scopes)
    .bind(&starts)
    .bind(&ends)
    .fetch_optional(&mut *c)
    .await?;
    Ok(row.map(entry))
}

/// Finished entries in `scopes` of `repository` whose key starts with one of
/// `prefixes` (any key when empty), newest first; entries of equal age in the order
/// their scope, then the first prefix they match, are listed, the newest id first.
pub(super) async fn list(
    c: &mut PgConnection,
    repository: &str,
    scopes: &[String],
    prefixes: &[String],
) -> Result<Vec<Entry>> {
    let any = [String::new()];
    let prefixes = if prefixes.is_empty() {
        &any[..]
    } else {
        prefixes
    };
    let prefixes: Vec<String> = prefixes.iter().map(|p| folded(p)).collect();
    let ends: Vec<Option<String>> = prefixes.iter().map(|p| prefix_end(p)).collect();
    let rows: Vec<EntryRow> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM cache_entries e
         JOIN (SELECT s, min(n) AS n FROM unnest($2::text[]) WITH ORDINALITY AS u(s, n)
               GROUP BY s) scope_rank ON scope_rank.s = e.scope
         CROSS JOIN LATERAL (
             SELECT min(p.n) AS n
             FROM unnest($3::text[], $4::text[]) WITH ORDINALITY AS p(start_key, end_key, n)
             WHERE lower(e.key) >= p.start_key AND (p.end_key IS NULL OR lower(e.key) < p.end_key)
         ) prefix_rank
         WHERE e.repository = $1 AND e.size IS NOT NULL AND prefix_rank.n IS NOT NULL
         ORDER BY e.created_ms DESC, scope_rank.n, prefix_rank.n, e.id DESC"
    )))
    .bind(repository)
    .bind(scopes)
    .bind(&prefixes)
    .bind(&ends)
    .fetch_all(&mut *c)
    .await?;
    Ok(rows.into_iter().map(entry).collect())
}

/// Record a use of entry `id` at `at` (seconds since the epoch).
pub(super) async fn touch(c: &mut PgConnection, id: i64, at: i64) -> Result<()> {
    sqlx::query("UPDATE cache_entries SET accessed_at = GREATEST(accessed_at, $2) WHERE id = $1")
        .bind(id)
        .bind(at)
        .execute(&mut *c)
        .await?;
    Ok(())
}

/// Check that entry `id` exists and is not finished yet; records upload activity on it.
async fn unfinished(c: &mut PgConnection, id: i64) -> Result<()> {
    let active =
        sqlx::query("UPDATE cache_entries SET accessed_at = $2 WHERE id = $1 AND size IS NULL")
            .bind(id)
            .bind(now_secs())
            .execute(&mut *c)
            .await?
            .rows_affected();
    if active > 0 {
        return Ok(());
    }
    match get(c, id).await? {
        Some(_) => Err(Error::EntryFinished),
        None => Err(Error::NotFound(Missing::Entry)),
    }
}

/// Record a stored blob as bytes of an unfinished entry: at `part.start` (replacing a
/// part there), or as its whole content with `whole`.
pub(super) async fn add_part(
    c: &mut PgConnection,
    id: i64,
    part: &Part,
    whole: bool,
) -> Result<()> {
    unfinished(c, id).await?;
    let digest = part.digest.to_string();
    record_blob(c, &digest, part.len).await?;
    sqlx::query(
        "WITH cleared AS (DELETE FROM cache_parts WHERE $5 AND entry_id = $1 AND start <> $2)
         INSERT INTO cache_parts (entry_id, start, digest, len) VALUES ($1, $2, $3, $4)
         ON CONFLICT (entry_id, start) DO UPDATE SET digest = excluded.digest, len = excluded.len",
    )
    .bind(id)
    .bind(part.start as i64)
    .bind(&digest)
    .bind(part.len as i64)
    .bind(whole)
    .execute(&mut *c)
    .await?;
    Ok(())
}

/// Record a stored blob as a staged block of an unfinished entry.
pub(super) async fn add_block(
    c: &mut PgConnection,
    id: i64,
    block: &str,
    digest: &Digest,
    len: u64,
) -> Result<()> {
    unfinished(c, id).await?;
    let digest = digest.to_string();
    record_blob(c, &digest, len).await?;
    sqlx::query(
        "INSERT INTO cache_blocks (entry_id, block, digest, len) VALUES ($1, $2, $3, $4)
         ON CONFLICT (entry_id, block) DO UPDATE SET digest = excluded.digest, len = excluded.len",
    )
    .bind(id)
    .bind(block)
    .bind(&digest)
    .bind(len as i64)
    .execute(&mut *c)
    .await?;
    Ok(())
}

/// Make an unfinished entry's content its staged blocks in `blocks`' order, unless that
/// would exceed `limit` bytes; returns its size.
pub(super) async fn assemble(
    c: &mut PgConnection,
    id: i64,
    blocks: &[String],
    limit: u64,
) -> Result<u64> {
    unfinished(c, id).await?;
    let staged: Vec<(Option<String>, Option<i64>)> = sqlx::query_as(
        "SELECT k.digest, k.len FROM unnest($2::text[]) WITH ORDINALITY AS u(block, n)
         LEFT JOIN cache_blocks k ON k.entry_id = $1 AND k.block = u.block
         ORDER BY u.n",
    )
    .bind(id)
    .bind(blocks)
    .fetch_all(&mut *c)
    .await?;
    let mut starts = Vec::with_capacity(blocks.len());
    let mut digests = Vec::with_capacity(blocks.len());
    let mut lens = Vec::with_capacity(blocks.len());
    let mut start = 0u64;
    for (block, found) in blocks.iter().zip(staged) {
        let (Some(digest), Some(len)) = found else {
            return Err(Error::UnknownBlock(block.clone()));
        };
        starts.push(start as i64);
        digests.push(digest);
        lens.push(len);
        start += len as u64;
        if start > limit {
            return Err(Error::EntryTooLarge { limit });
        }
    }
    // The parts at other offsets go; those at these offsets are replaced.
    sqlx::query(
        "WITH cleared AS (DELETE FROM cache_parts WHERE entry_id = $1 AND start <> ALL($2))
         INSERT INTO cache_parts (entry_id, start, digest, len)
         SELECT $1, * FROM unnest($2::bigint[], $3::text[], $4::bigint[])
         ON CONFLICT (entry_id, start) DO UPDATE SET digest = excluded.digest, len = excluded.len",
    )
    .bind(id)
    .bind(&starts)
    .bind(&digests)
    .bind(&lens)
    .execute(&mut *c)
    .await?;
    Ok(start)
}

/// Finish an entry whose parts cover exactly `size` bytes.
pub(super) async fn finish(c: &mut PgConnection, id: i64, size: u64) -> Result<Entry> {
    unfinished(c, id).await?;
    let parts = parts(c, id).await?;
    let mut covered = 0u64;
    for part in &parts {
        if part.start != covered {
            return Err(Error::EntryIncomplete { size, covered });
        }
        covered += part.len;
    }
    // Nothing placed (no upload, or blocks never listed) is not an empty entry.
    if covered != size || parts.is_empty() {
        return Err(Error::EntryIncomplete { size, covered });
    }
    let finished: EntryRow = sqlx::query_as(AssertSqlSafe(format!(
        "WITH blocks_gone AS (DELETE FROM cache_blocks WHERE entry_id = $1)
         UPDATE cache_entries e SET size = $2, created_ms = $3, accessed_at = $4
         WHERE e.id = $1 RETURNING {COLUMNS}"
    )))
    .bind(id)
    .bind(size as i64)
    .bind(now_ms())
    .bind(now_secs())
    .fetch_one(&mut *c)
    .await?;
    Ok(entry(finished))
}

/// An entry's parts, in order.
pub(super) async fn parts(c: &mut PgConnection, id: i64) -> Result<Vec<Part>> {
    let rows: Vec<(i64, String, i64)> = sqlx::query_as(
        "SELECT start, digest, len FROM cache_parts WHERE entry_id = $1 ORDER BY start",
    )
    .bind(id)
    .fetch_all(&mut *c)
    .await?;
    rows.into_iter()
        .map(|(start, digest, len)| {
            Ok(Part {
                start: start as u64,
                digest: parse_digest(digest)?,
                len: len as u64,
            })
        })
        .collect()
}

/// A statement deleting the entries `which` selects (a condition on `e`) with their
/// parts and blocks. It yields one row: how many entries went, and the blobs their parts
/// (in order) then their blocks (by name) held.
fn removal(which: &str) -> String {
    format!(
        "WITH gone AS (DELETE FROM cache_entries e WHERE {which} RETURNING e.id),
         parts_gone AS (DELETE FROM cache_parts p USING gone WHERE p.entry_id = gone.id
             RETURNING p.entry_id, p.start, p.digest),
         blocks_gone AS (DELETE FROM cache_blocks k USING gone WHERE k.entry_id = gone.id
             RETURNING k.entry_id, k.block, k.digest)
         SELECT (SELECT count(*) FROM gone),
             ARRAY(SELECT digest FROM parts_gone ORDER BY entry_id, start)
             || ARRAY(SELECT digest FROM blocks_gone ORDER BY entry_id, block)"
    )
}

/// Parse the digests a [`removal`] yields.
fn held(stored: Vec<String>) -> Result<Vec<Digest>> {
    stored.into_iter().map(parse_digest).collect()
}

/// Delete an entry with its parts and blocks (their blobs stay until swept); returns
/// the blobs they held, `None` when absent.
pub(super) async fn delete(c: &mut PgConnection, id: i64) -> Result<Option<Vec<Digest>>> {
    let (gone, stored): (i64, Vec<String>) = sqlx::query_as(AssertSqlSafe(removal("e.id = $1")))
        .bind(id)
        .fetch_one(&mut *c)
        .await?;
    (gone > 0).then(|| held(stored)).transpose()
}

/// Delete a finished entry as [`delete`] does, unless it was used after `last_used`
/// (seconds since the epoch, when eviction listed it); `None` when it stays or is
/// absent.
pub(super) async fn delete_unused_since(
    c: &mut PgConnection,
    id: i64,
    last_used: i64,
) -> Result<Option<Vec<Digest>>> {
    let which = format!("e.id = $1 AND e.size IS NOT NULL AND {ENTRY_LAST_USED} <= $2");
    let (gone, stored): (i64, Vec<String>) = sqlx::query_as(AssertSqlSafe(removal(&which)))
        .bind(id)
        .bind(last_used)
        .fetch_one(&mut *c)
        .await?;
    (gone > 0).then(|| held(stored)).transpose()
}

/// Delete an entry and release the blobs it held; `false` when absent.
pub(super) async fn delete_and_release(c: &mut PgConnection, id: i64) -> Result<bool> {
    let Some(held) = delete(c, id).await? else {
        return Ok(false);
    };
    super::evict::release(c, &held, &mut Default::default()).await?;
    Ok(true)
}

/// Delete unfinished entries created before `before_ms`, releasing the blobs they held;
/// returns how many.
pub(super) async fn expire(c: &mut PgConnection, before_ms: i64) -> Result<u64> {
    let (gone, stored): (i64, Vec<String>) = sqlx::query_as(AssertSqlSafe(removal(
        "e.size IS NULL AND e.created_ms < $1",
    )))
    .bind(before_ms)
    .fetch_one(&mut *c)
    .await?;
    super::evict::release(c, &held(stored)?, &mut Default::default()).await?;
    Ok(gone as u64)
}

#[cfg(test)]
mod tests {
    use oci::Digest;

    use super::exact_end;
    use crate::config::Postgres;
    use crate::meta::prefix_end;
    use crate::meta::{
        BlobUsage, Entry, EntryQuery, MetaStore, NewEntry, Part, PgMeta, SqliteMeta,
    };
    use crate::{Result, now_ms};

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

    fn new(scope: &str, key: &str, version: &str) -> NewEntry {
        NewEntry {
            repository: "octo/app".into(),
            scope: scope.into(),
            key: key.into(),
            version: version.into(),
        }
    }

    /// A value as the two stores must agree on it: entries without their ids and times
    /// (the stores number and time them apart).
    trait Plain: std::fmt::Debug + Sized {
        fn plain(self) -> Self {
            self
        }
    }
    impl Plain for Entry {
        fn plain(self) -> Self {
            Entry {
                id: 0,
                created_ms: 0,
                last_used: 0,
                ..self
            }
        }
    }
    impl<T: Plain> Plain for Option<T> {
        fn plain(self) -> Self {
            self.map(Plain::plain)
        }
    }
    impl<T: Plain> Plain for Vec<T> {
        fn plain(self) -> Self {
            self.into_iter().map(Plain::plain).collect()
        }
    }
    impl Plain for () {}
    impl Plain for bool {}
    impl Plain for u64 {}
    impl Plain for usize {}
    impl Plain for Part {}
    impl Plain for BlobUsage {}

    fn shown<T: Plain>(result: Result<T>) -> String {
        match result {
            Ok(value) => format!("{:?}", value.plain()),
            Err(e) => format!("error {e:?}"),
        }
    }

    fn part(start: u64, n: u8, len: u64) -> Part {
        Part {
            start,
            digest: Digest::sha256_of(&[n]),
            len,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_keeps_entries_as_sqlite_does() {
        let Some((_dir, stores)) = both().await else {
            return;
        };
        let (main, feature) = ("refs/heads/main", "refs/heads/feature");
        let mut seen = Vec::new();
        for meta in &stores {
            let mut log = Vec::new();
            let mut ids = Vec::new();
            for (scope, key, version) in [
                (main, "linux-deps-abc", "v1"),
                (main, "linux-deps-abd", "v1"),
                (main, "linux-deps", "v1"),
                (feature, "linux-deps-x", "v1"),
                (main, "linux-deps-z", "v2"),
                (main, "npm-%a", "v1"),
                (main, "z\u{10FFFF}x", "v1"),
                (main, "tab\tkey", "v1"),
            ] {
                let created = meta.create_entry(new(scope, key, version)).await.unwrap();
                let id = created.id;
                log.push(shown(Ok(created)));
                ids.push(id);
                let added = meta.add_entry_part(id, part(0, 1, 10), false).await;
                log.push(shown(added));
                tokio::time::sleep(std::time::Duration::from_millis(3)).await;
                log.push(shown(meta.finish_entry(id, 10).await));
            }
            log.push(shown(
                meta.create_entry(new(main, "linux-deps", "v1")).await,
            ));
            // Chunks in any order, a whole upload, blocks placed by a list.
            let chunked = meta.create_entry(new(main, "chunked", "v1")).await.unwrap();
            for p in [part(5, 2, 5), part(0, 3, 5), part(0, 4, 5)] {
                log.push(shown(meta.add_entry_part(chunked.id, p, false).await));
            }
            log.push(shown(meta.entry_parts(chunked.id).await));
            log.push(shown(meta.finish_entry(chunked.id, 11).await));
            log.push(shown(meta.finish_entry(chunked.id, 10).await));
            log.push(shown(meta.finish_entry(chunked.id, 10).await));
            log.push(shown(
                meta.add_entry_part(chunked.id, part(0, 1, 1), false).await,
            ));
            log.push(shown(meta.add_entry_part(-5, part(0, 1, 1), false).await));
            let whole = meta.create_entry(new(main, "whole", "v1")).await.unwrap();
            for p in [part(0, 2, 5), part(5, 3, 5)] {
                log.push(shown(meta.add_entry_part(whole.id, p, false).await));
            }
            log.push(shown(
                meta.add_entry_part(whole.id, part(0, 5, 0), true).await,
            ));
            log.push(shown(meta.entry_parts(whole.id).await));
            let blocks = meta.create_entry(new(main, "blocks", "v1")).await.unwrap();
            for (name, n, len) in [("b1", 6, 3), ("b2", 7, 4), ("b3", 8, 5), ("b1", 9, 2)] {
                let added = meta
                    .add_entry_block(blocks.id, name.into(), Digest::sha256_of(&[n]), len)
                    .await;
                log.push(shown(added));
            }
            let list = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect();
            log.push(shown(
                meta.add_entry_part(blocks.id, part(0, 1, 100), false).await,
            ));
            log.push(shown(
                meta.assemble_entry(blocks.id, list(&["b2", "nope", "b1"]), 100)
                    .await,
            ));
            log.push(shown(
                meta.assemble_entry(blocks.id, list(&["b2", "b3", "b1"]), 8)
                    .await,
            ));
            log.push(shown(
                meta.assemble_entry(blocks.id, list(&["b2", "b1", "b3"]), 100)
                    .await,
            ));
            log.push(shown(meta.entry_parts(blocks.id).await));
            log.push(shown(
                meta.assemble_entry(blocks.id, list(&["b3", "b1"]), 100)
                    .await,
            ));
            log.push(shown(meta.entry_parts(blocks.id).await));
            log.push(shown(meta.finish_entry(blocks.id, 7).await));
            log.push(shown(meta.entry_parts(blocks.id).await));
            // Restores, listings.
            let scopes = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect();
            for (s, keys, version) in [
                (&[main, feature][..], &["linux-deps"][..], "v1"),
                (&[main, feature], &["linux-deps-a"], "v1"),
                (&[feature, main], &["linux-deps-a", "linux-"], "v1"),
                (&[main], &["linux-deps-q", "linux-deps-ab"], "v1"),
                (&[main], &["linux-deps-q", "zzz"], "v1"),
                (&[main], &["linux-deps"], "v2"),
                (&[main], &["npm-%"], "v1"),
                (&[main], &["npm-_"], "v1"),
                (&[main], &["z\u{10FFFF}"], "v1"),
                (&[main], &["tab\t"], "v1"),
                (&[main], &[], "v1"),
                (&[], &["linux"], "v1"),
            ] {
                let query = EntryQuery {
                    repository: "octo/app".into(),
                    scopes: scopes(s),
                    keys: scopes(keys),
                    version: version.into(),
                };
                log.push(shown(meta.find_entry(query).await));
            }
            for (s, prefixes) in [
                (&[main, feature][..], &[][..]),
                (&[feature, main], &["linux-deps-", "linux", "npm"]),
                (&[main], &["linux-deps-ab", "npm-%"]),
                (&[main], &["npm-_"]),
                (&[], &[]),
            ] {
                let listed = meta
                    .list_entries("octo/app".into(), scopes(s), scopes(prefixes))
                    .await;
                log.push(shown(listed));
            }
            // Deletion and expiry release what only they held.
            log.push(shown(meta.delete_entry(ids[0]).await));
            log.push(shown(meta.delete_entry(ids[0]).await));
            log.push(shown(
                meta.entry_by_key(new(main, "linux-deps-abc", "v1")).await,
            ));
            log.push(shown(
                meta.entry_by_key(new(main, "linux-deps", "v1")).await,
            ));
            let unfinished = meta.create_entry(new(main, "late", "v1")).await.unwrap();
            log.push(shown(
                meta.add_entry_part(unfinished.id, part(0, 20, 3), false)
                    .await,
            ));
            let staged = meta
                .add_entry_block(unfinished.id, "s".into(), Digest::sha256_of(&[21]), 4)
                .await;
            log.push(shown(staged));
            log.push(shown(meta.expire_entries(now_ms() + 1000).await));
            log.push(shown(meta.entry(unfinished.id).await));
            log.push(shown(meta.blob_usage().await));
            log.push(shown(
                crate::meta::all_roots(meta.as_ref()).await.map(|r| r.len()),
            ));
            seen.push(log);
        }
        for (sqlite, postgres) in seen[0].iter().zip(&seen[1]) {
            assert_eq!(sqlite, postgres);
        }
        assert_eq!(seen[0].len(), seen[1].len());
    }

    #[test]
    fn a_prefix_range_ends_past_every_extension() {
        assert_eq!(prefix_end("index-1#").as_deref(), Some("index-1$"));
        assert_eq!(prefix_end(""), None);
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
    }

    #[test]
    fn an_exact_range_holds_the_key_alone() {
        let end = exact_end("key");
        assert!("key" < end.as_str());
        assert!("key\u{1}" >= end.as_str());
        assert!("key-1" > end.as_str());
    }
}
