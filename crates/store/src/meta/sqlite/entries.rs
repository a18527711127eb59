//! Cache entries: reserved, filled with parts (each a stored blob), finished, matched
//! the way GitHub matches keys.

use oci::Digest;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{parse_digest, record_blob};
use crate::error::Missing;
use crate::meta::{Entry, EntryQuery, NewEntry, Part, folded, prefix_end};
use crate::{Error, Result, now_ms, now_secs};

const COLUMNS: &str = "id, repository, scope, key, version, size, created_ms, accessed_at";

fn entry(r: &Row<'_>) -> rusqlite::Result<Entry> {
    Ok(Entry {
        id: r.get(0)?,
        repository: r.get(1)?,
        scope: r.get(2)?,
        key: r.get(3)?,
        version: r.get(4)?,
        size: r.get::<_, Option<i64>>(5)?.map(|s| s as u64),
        created_ms: r.get(6)?,
        last_used: r.get(7)?,
    })
}

/// An unfinished entry without upload activity for this long (seconds) no longer holds
/// its key: its client is taken to be gone, and a new save may replace it.
const ABANDONED_AFTER: i64 = 600;

pub(super) fn create(c: &Connection, new: &NewEntry) -> Result<Entry> {
    for taken in same_key(c, new)? {
        if taken.size.is_some() || taken.last_used >= now_secs() - ABANDONED_AFTER {
            return Err(Error::EntryExists);
        }
        delete_and_release(c, taken.id)?;
    }
    let inserted = c
        .prepare_cached(&format!(
            "INSERT INTO cache_entries (repository, scope, key, version, created_ms, accessed_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (repository, scope, version, key) DO NOTHING
             RETURNING {COLUMNS}"
        ))?
        .query_row(
            params![
                new.repository,
                new.scope,
                new.key,
                new.version,
                now_ms(),
                now_secs()
            ],
            entry,
        )
        .optional()?;
    inserted.ok_or(Error::EntryExists)
}

pub(super) fn get(c: &Connection, id: i64) -> rusqlite::Result<Option<Entry>> {
    c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM cache_entries WHERE id = ?1"
    ))?
    .query_row([id], entry)
    .optional()
}

/// The entries, finished or not, whose key matches `key`'s (see [`folded`]) in its
/// scope and version: the one of exactly its case first, then the newest.
fn same_key(c: &Connection, key: &NewEntry) -> rusqlite::Result<Vec<Entry>> {
    c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM cache_entries
         WHERE repository = ?1 AND scope = ?2 AND version = ?3 AND lower(key) = ?4
         ORDER BY key = ?5 DESC, id DESC"
    ))?
    .query_map(
        params![
            key.repository,
            key.scope,
            key.version,
            folded(&key.key),
            key.key
        ],
        entry,
    )?
    .collect()
}

pub(super) fn by_key(c: &Connection, key: &NewEntry) -> rusqlite::Result<Option<Entry>> {
    Ok(same_key(c, key)?.into_iter().next())
}

/// The newest finished entry in one scope whose key is `key`, or starts with it.
fn newest(
    c: &Connection,
    query: &EntryQuery,
    scope: &str,
    key: &str,
    exact: bool,
) -> rusqlite::Result<Option<Entry>> {
    let key = folded(key);
    let end = if exact {
        Some(format!("{key}\0"))
    } else {
        prefix_end(&key)
    };
    c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM cache_entries
         WHERE repository = ?1 AND scope = ?2 AND version = ?3 AND size IS NOT NULL
           AND lower(key) >= ?4 AND (?5 IS NULL OR lower(key) < ?5)
         ORDER BY created_ms DESC, id DESC LIMIT 1"
    ))?
    .query_row(
        params![query.repository, scope, query.version, key, end],
        entry,
    )
    .optional()
}

pub(super) fn find(c: &Connection, query: &EntryQuery) -> rusqlite::Result<Option<Entry>> {
    let Some((primary, _)) = query.keys.split_first() else {
        return Ok(None);
    };
    for scope in &query.scopes {
        if let Some(found) = newest(c, query, scope, primary, true)? {
            return Ok(Some(found));
        }
        for key in &query.keys {
            if let Some(found) = newest(c, query, scope, key, false)? {
                return Ok(Some(found));
            }
        }
    }
    Ok(None)
}

pub(super) fn list(
    c: &Connection,
    repository: &str,
    scopes: &[String],
    prefixes: &[String],
) -> rusqlite::Result<Vec<Entry>> {
    let mut found = Vec::new();
    let any = [String::new()];
    let prefixes = if prefixes.is_empty() {
        &any[..]
    } else {
        prefixes
    };
    for scope in scopes {
        for prefix in prefixes {
            let prefix = folded(prefix);
            let rows = c
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM cache_entries
                     WHERE repository = ?1 AND scope = ?2 AND size IS NOT NULL
                       AND lower(key) >= ?3 AND (?4 IS NULL OR lower(key) < ?4)
                     ORDER BY created_ms DESC, id DESC"
                ))?
                .query_map(
                    params![repository, scope, prefix, prefix_end(&prefix)],
                    entry,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            for row in rows {
                if !found.iter().any(|e: &Entry| e.id == row.id) {
                    found.push(row);
                }
            }
        }
    }
    found.sort_by_key(|e| std::cmp::Reverse(e.created_ms));
    Ok(found)
}

/// Record a use of entry `id` at `at` (seconds since the epoch).
pub(super) fn touch(c: &Connection, id: i64, at: i64) -> rusqlite::Result<()> {
    c.prepare_cached("UPDATE cache_entries SET accessed_at = max(accessed_at, ?2) WHERE id = ?1")?
        .execute(params![id, at])?;
    Ok(())
}

/// The entry `id`, which must not be finished yet; records upload activity on it.
fn unfinished(c: &Connection, id: i64) -> Result<Entry> {
    let found = get(c, id)?.ok_or(Error::NotFound(Missing::Entry))?;
    if found.size.is_some() {
        return Err(Error::EntryFinished);
    }
    c.prepare_cached("UPDATE cache_entries SET accessed_at = ?2 WHERE id = ?1")?
        .execute(params![id, now_secs()])?;
    Ok(found)
}

pub(super) fn add_part(c: &Connection, id: i64, part: &Part, whole: bool) -> Result<()> {
    unfinished(c, id)?;
    record_blob(c, &part.digest.to_string(), part.len)?;
    if whole {
        c.prepare_cached("DELETE FROM cache_parts WHERE entry_id = ?1")?
            .execute([id])?;
    }
    c.prepare_cached(
        "INSERT OR REPLACE INTO cache_parts (entry_id, start, digest, len) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        id,
        part.start as i64,
        part.digest.to_string(),
        part.len as i64
    ])?;
    Ok(())
}

pub(super) fn add_block(
    c: &Connection,
    id: i64,
    block: &str,
    digest: &Digest,
    len: u64,
) -> Result<()> {
    unfinished(c, id)?;
    record_blob(c, &digest.to_string(), len)?;
    c.prepare_cached(
        "INSERT OR REPLACE INTO cache_blocks (entry_id, block, digest, len) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![id, block, digest.to_string(), len as i64])?;
    Ok(())
}

pub(super) fn assemble(c: &Connection, id: i64, blocks: &[String], limit: u64) -> Result<u64> {
    unfinished(c, id)?;
    let mut parts = Vec::with_capacity(blocks.len());
    let mut start = 0u64;
    for block in blocks {
        let (digest, len): (String, i64) = c
            .prepare_cached(
                "SELECT digest, len FROM cache_blocks WHERE entry_id = ?1 AND block = ?2",
            )?
            .query_row(params![id, block], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?
            .ok_or_else(|| Error::UnknownBlock(block.clone()))?;
        parts.push((start, digest, len));
        start += len as u64;
        if start > limit {
            return Err(Error::EntryTooLarge { limit });
        }
    }
    c.prepare_cached("DELETE FROM cache_parts WHERE entry_id = ?1")?
        .execute([id])?;
    for (start, digest, len) in parts {
        c.prepare_cached(
            "INSERT INTO cache_parts (entry_id, start, digest, len) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![id, start as i64, digest, len])?;
    }
    Ok(start)
}

pub(super) fn finish(c: &Connection, id: i64, size: u64) -> Result<Entry> {
    unfinished(c, id)?;
    let parts = parts(c, id)?;
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
    c.prepare_cached("DELETE FROM cache_blocks WHERE entry_id = ?1")?
        .execute([id])?;
    let finished = c
        .prepare_cached(&format!(
            "UPDATE cache_entries SET size = ?2, created_ms = ?3, accessed_at = ?4
             WHERE id = ?1 RETURNING {COLUMNS}"
        ))?
        .query_row(params![id, size as i64, now_ms(), now_secs()], entry)?;
    Ok(finished)
}

pub(super) fn parts(c: &Connection, id: i64) -> rusqlite::Result<Vec<Part>> {
    c.prepare_cached(
        "SELECT start, digest, len FROM cache_parts WHERE entry_id = ?1 ORDER BY start",
    )?
    .query_map([id], |r| {
        Ok(Part {
            start: r.get::<_, i64>(0)? as u64,
            digest: parse_digest(r.get(1)?)?,
            len: r.get::<_, i64>(2)? as u64,
        })
    })?
    .collect()
}

/// Delete an entry with its parts and blocks (their blobs stay until swept).
/// Delete an entry; returns the blobs its parts and blocks held, `None` when absent.
pub(super) fn delete(c: &Connection, id: i64) -> rusqlite::Result<Option<Vec<Digest>>> {
    let mut held = Vec::new();
    for sql in [
        "DELETE FROM cache_parts WHERE entry_id = ?1 RETURNING digest",
        "DELETE FROM cache_blocks WHERE entry_id = ?1 RETURNING digest",
    ] {
        let deleted = c
            .prepare_cached(sql)?
            .query_map([id], |r| parse_digest(r.get(0)?))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        held.extend(deleted);
    }
    let deleted = c
        .prepare_cached("DELETE FROM cache_entries WHERE id = ?1")?
        .execute([id])?;
    Ok((deleted > 0).then_some(held))
}

/// Delete an entry and release the blobs it held; `false` when absent.
pub(super) fn delete_and_release(c: &Connection, id: i64) -> rusqlite::Result<bool> {
    let Some(held) = delete(c, id)? else {
        return Ok(false);
    };
    super::evict::release(c, &held, &mut Default::default())?;
    Ok(true)
}

pub(super) fn expire(c: &Connection, before_ms: i64) -> Result<u64> {
    let ids: Vec<i64> = c
        .prepare_cached("SELECT id FROM cache_entries WHERE size IS NULL AND created_ms < ?1")?
        .query_map([before_ms], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for &id in &ids {
        delete_and_release(c, id)?;
    }
    Ok(ids.len() as u64)
}

#[cfg(test)]
mod tests {
    use crate::meta::prefix_end;

    #[test]
    fn a_prefix_range_ends_past_every_extension() {
        assert_eq!(prefix_end("index-1#").as_deref(), Some("index-1$"));
        assert_eq!(prefix_end(""), None);
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
    }
}
