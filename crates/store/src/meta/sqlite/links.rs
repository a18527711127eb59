//! Blob links recently found in the database, kept in memory so that checking the same
//! blob again (a builder's `HEAD` before each push, a pull's `GET`) skips SQLite.
//!
//! Only links that exist are kept, and never one that no longer does: the store removes a
//! link from here in the same call that deletes it from the database, once that deletion
//! is committed, and a lookup that raced such a removal does not put its answer back
//! (each removal starts a new generation; an answer read in an older one is dropped). One
//! process owns a data directory, so no other writer can delete behind this cache's back.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use oci::{Digest, RepoName};

/// Most digests kept; when full, the cache starts over empty (a few hundred KiB at most).
const CAPACITY: usize = 4096;

/// Known `(repository, digest)` links, with each blob's size.
#[derive(Default)]
pub(super) struct LinkCache(Mutex<Links>);

#[derive(Default)]
struct Links {
    /// Bumped by every removal.
    generation: u64,
    /// Each digest's size and the repositories it is known to be linked into.
    blobs: HashMap<Digest, (u64, Vec<RepoName>)>,
}

/// Where a lookup missed: the generation to pass back to [`LinkCache::insert`].
#[derive(Clone, Copy)]
pub(super) struct Generation(u64);

impl LinkCache {
    fn links(&self) -> MutexGuard<'_, Links> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The size of `digest` when it is known to be linked into `repo`; else the
    /// generation in which the caller is about to ask the database.
    pub(super) fn linked(&self, repo: &RepoName, digest: &Digest) -> Result<u64, Generation> {
        let links = self.links();
        match links.blobs.get(digest) {
            Some((size, repos)) if repos.contains(repo) => Ok(*size),
            _ => Err(Generation(links.generation)),
        }
    }

    /// The size of `digest` when it is known to be linked into some repository.
    pub(super) fn known(&self, digest: &Digest) -> Option<u64> {
        self.links().blobs.get(digest).map(|(size, _)| *size)
    }

    /// Remember a link the database showed in generation `seen`, unless something was
    /// removed since.
    pub(super) fn insert(&self, seen: Generation, repo: &RepoName, digest: &Digest, size: u64) {
        let mut links = self.links();
        if links.generation != seen.0 {
            return;
        }
        if links.blobs.len() >= CAPACITY && !links.blobs.contains_key(digest) {
            links.blobs.clear();
        }
        let (_, repos) = links
            .blobs
            .entry(digest.clone())
            .or_insert_with(|| (size, Vec::new()));
        if !repos.contains(repo) {
            repos.push(repo.clone());
        }
    }

    /// Forget the link of `digest` into `repo` (called once its deletion is committed).
    pub(super) fn unlink(&self, repo: &RepoName, digest: &Digest) {
        let mut links = self.links();
        links.generation += 1;
        if let Some((_, repos)) = links.blobs.get_mut(digest) {
            repos.retain(|r| r != repo);
            if repos.is_empty() {
                links.blobs.remove(digest);
            }
        }
    }

    /// Forget every link of each of `digests` (called once their deletion is committed).
    pub(super) fn forget<'a>(&self, digests: impl IntoIterator<Item = &'a Digest>) {
        let mut links = self.links();
        links.generation += 1;
        for digest in digests {
            links.blobs.remove(digest);
        }
    }

    /// Forget every link.
    pub(super) fn clear(&self) {
        let mut links = self.links();
        links.generation += 1;
        links.blobs.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(name: &str) -> RepoName {
        name.parse().unwrap()
    }

    #[test]
    fn keeps_links_per_repository() {
        let cache = LinkCache::default();
        let (a, b, blob) = (repo("a"), repo("b"), Digest::sha256_of(b"x"));
        let seen = cache.linked(&a, &blob).unwrap_err();
        cache.insert(seen, &a, &blob, 1);
        assert_eq!(cache.linked(&a, &blob).ok(), Some(1));
        assert!(cache.linked(&b, &blob).is_err());
        assert_eq!(cache.known(&blob), Some(1));
        cache.unlink(&a, &blob);
        assert!(cache.linked(&a, &blob).is_err());
        assert_eq!(cache.known(&blob), None);
    }

    #[test]
    fn an_answer_read_before_a_removal_is_not_kept() {
        let cache = LinkCache::default();
        let (a, blob, other) = (repo("a"), Digest::sha256_of(b"x"), Digest::sha256_of(b"y"));
        let seen = cache.linked(&a, &blob).unwrap_err();
        // The database answered "linked"; meanwhile an eviction committed and forgot.
        cache.forget([&other]);
        cache.insert(seen, &a, &blob, 1);
        assert!(cache.linked(&a, &blob).is_err());
        let seen = cache.linked(&a, &blob).unwrap_err();
        cache.insert(seen, &a, &blob, 1);
        cache.forget([&blob]);
        assert!(cache.linked(&a, &blob).is_err());
    }

    #[test]
    fn starts_over_when_full() {
        let cache = LinkCache::default();
        let a = repo("a");
        for i in 0..=CAPACITY {
            let digest = Digest::sha256_of(&i.to_le_bytes());
            let seen = cache.linked(&a, &digest).unwrap_err();
            cache.insert(seen, &a, &digest, 1);
        }
        assert_eq!(cache.links().blobs.len(), 1);
    }
}
