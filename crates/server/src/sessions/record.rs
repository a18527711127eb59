//! One build session's record, and what a request adds to it.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::Client;

/// Most distinct digests or references a session lists per kind (counts go on).
const MAX_LISTED: usize = 1000;

/// What one registry request did, for its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A manifest was looked up (GET or HEAD) by `reference` (`repo:tag` or
    /// `repo@digest`).
    ManifestLookup {
        /// What was asked for.
        reference: String,
        /// It names a tag.
        by_tag: bool,
        /// Whether it was there.
        found: bool,
    },
    /// A manifest was stored, under `tag` if one was given.
    ManifestWritten {
        /// `repo:tag`, when pushed by tag.
        tag: Option<String>,
    },
    /// A blob's existence was checked (`HEAD`): present with its size, or absent.
    BlobChecked {
        /// The blob.
        digest: String,
        /// Its size, when present.
        size: Option<u64>,
    },
    /// Blob bytes were sent.
    BlobServed {
        /// The blob.
        digest: String,
        /// Bytes sent.
        bytes: u64,
    },
    /// A blob was stored from the client's bytes.
    BlobWritten {
        /// The blob.
        digest: String,
        /// Its size.
        bytes: u64,
    },
    /// A blob was linked from another repository instead of uploaded.
    BlobMounted {
        /// The blob.
        digest: String,
        /// Its size.
        bytes: u64,
    },
    /// A blob that was asked for is not there.
    BlobMissing {
        /// The blob.
        digest: String,
    },
    /// A cache entry was looked up by its key (and restore keys).
    EntryLookup {
        /// The primary key.
        key: String,
        /// Whether an entry matched.
        found: bool,
    },
    /// A cache entry was saved.
    EntryWritten {
        /// Its key.
        key: String,
        /// Its size.
        bytes: u64,
    },
    /// Cache entry bytes were sent.
    EntryServed {
        /// Bytes sent.
        bytes: u64,
    },
    /// The request failed (4xx other than the misses above, or 5xx).
    Failed,
    /// Anything else (upload steps, listings).
    Other,
}

/// A build session: what one build asked of the cache, and what it got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Its id.
    pub id: String,
    /// The name the client gave it, if any.
    pub name: Option<String>,
    /// The client's address.
    pub client: Option<String>,
    /// The client's `User-Agent`.
    pub user_agent: String,
    /// First request, in milliseconds since the epoch.
    pub started_ms: i64,
    /// Last request, in milliseconds since the epoch.
    pub ended_ms: i64,
    /// Still receiving requests (not idle for the gap yet).
    pub open: bool,
    /// Repositories it touched.
    pub repositories: BTreeSet<String>,
    /// Tags it read or wrote (`repo:tag`; the first 1000).
    pub tags: BTreeSet<String>,
    /// Requests.
    pub requests: u64,
    /// Manifest lookups that found the manifest.
    pub manifest_hits: u64,
    /// Manifest lookups that did not.
    pub manifest_misses: u64,
    /// Manifests stored.
    pub manifests_written: u64,
    /// Blob checks that found the blob (an upload the client could skip).
    pub blobs_present: u64,
    /// Blob checks that did not.
    pub blobs_absent: u64,
    /// Blob downloads.
    pub blobs_served: u64,
    /// Bytes downloaded.
    pub bytes_served: u64,
    /// Blobs uploaded.
    pub blobs_written: u64,
    /// Bytes uploaded.
    pub bytes_written: u64,
    /// Bytes the client did not have to upload (blobs found present or mounted).
    pub bytes_avoided: u64,
    /// Cache entry lookups that matched an entry.
    #[serde(default)]
    pub entry_hits: u64,
    /// Cache entry lookups that did not.
    #[serde(default)]
    pub entry_misses: u64,
    /// Cache entries saved.
    #[serde(default)]
    pub entries_written: u64,
    /// Failed requests.
    pub errors: u64,
    /// References asked for and absent, in order (the first 1000).
    pub missed: Vec<String>,
    /// Blobs uploaded (the first 1000).
    pub written: BTreeSet<String>,
    /// Blobs found present or mounted instead of uploaded (the first 1000).
    pub avoided: BTreeSet<String>,
    /// Changed since it was last saved.
    #[serde(skip)]
    pub(super) unsaved: bool,
}

impl Session {
    /// A new session of `client`, at `now` (milliseconds).
    pub(super) fn new(client: &Client, now: i64) -> Session {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Session {
            id: id.get(..12).unwrap_or(&id).to_owned(),
            name: client.name.clone(),
            client: client.addr.map(|a| a.to_string()),
            user_agent: client.user_agent.clone(),
            started_ms: now,
            ended_ms: now,
            open: true,
            ..Session::default()
        }
    }

    /// Add one request to `repo` that had `outcome`, at `now` (milliseconds).
    pub(super) fn record(&mut self, repo: &str, outcome: Outcome, now: i64) {
        self.requests += 1;
        self.ended_ms = self.ended_ms.max(now);
        self.unsaved = true;
        if !self.repositories.contains(repo) {
            self.repositories.insert(repo.to_owned());
        }
        match outcome {
            Outcome::ManifestLookup {
                reference,
                by_tag,
                found,
            } => {
                if found {
                    self.manifest_hits += 1;
                    if by_tag {
                        note(&mut self.tags, reference);
                    }
                } else {
                    self.manifest_misses += 1;
                    list(&mut self.missed, reference);
                }
            }
            Outcome::ManifestWritten { tag } => {
                self.manifests_written += 1;
                if let Some(tag) = tag {
                    note(&mut self.tags, tag);
                }
            }
            // A client re-checking what it just uploaded avoided nothing.
            Outcome::BlobChecked {
                digest,
                size: Some(_),
            } if self.written.contains(&digest) => {}
            Outcome::BlobChecked {
                digest,
                size: Some(size),
            } => {
                self.blobs_present += 1;
                self.bytes_avoided += size;
                note(&mut self.avoided, digest);
            }
            Outcome::BlobChecked { size: None, .. } => self.blobs_absent += 1,
            Outcome::BlobServed { bytes, .. } => {
                self.blobs_served += 1;
                self.bytes_served += bytes;
            }
            Outcome::BlobWritten { digest, bytes } => {
                self.blobs_written += 1;
                self.bytes_written += bytes;
                note(&mut self.written, digest);
            }
            Outcome::BlobMounted { digest, bytes } => {
                self.bytes_avoided += bytes;
                note(&mut self.avoided, digest);
            }
            Outcome::BlobMissing { digest } => {
                self.errors += 1;
                list(&mut self.missed, digest);
            }
            Outcome::EntryLookup { key, found } => {
                if found {
                    self.entry_hits += 1;
                } else {
                    self.entry_misses += 1;
                    list(&mut self.missed, key);
                }
            }
            Outcome::EntryWritten { key, bytes } => {
                self.entries_written += 1;
                self.bytes_written += bytes;
                note(&mut self.written, key);
            }
            Outcome::EntryServed { bytes } => self.bytes_served += bytes,
            Outcome::Failed => self.errors += 1,
            Outcome::Other => {}
        }
    }

    /// Mark it closed (and due for saving).
    pub(super) fn close(&mut self) {
        self.open = false;
        self.unsaved = true;
    }

    /// Lookups that hit: manifests and Actions cache entries.
    pub fn hits(&self) -> u64 {
        self.manifest_hits + self.entry_hits
    }

    /// Lookups that missed: manifests and Actions cache entries.
    pub fn misses(&self) -> u64 {
        self.manifest_misses + self.entry_misses
    }

    /// Hits over lookups, if there were lookups.
    pub fn hit_ratio(&self) -> Option<f64> {
        let lookups = self.hits() + self.misses();
        (lookups > 0).then(|| self.hits() as f64 / lookups as f64)
    }
}

/// Add `item` to `items` unless the set is full.
fn note(items: &mut BTreeSet<String>, item: String) {
    if items.len() < MAX_LISTED {
        items.insert(item);
    }
}

/// Append `item` to `items` unless it is there or the list is full.
fn list(items: &mut Vec<String>, item: String) {
    if items.len() < MAX_LISTED && !items.contains(&item) {
        items.push(item);
    }
}
