//! One build session's record, and what a request adds to it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use oci::CacheRecords;
use serde::{Deserialize, Serialize};

use super::Client;

/// Most distinct digests or references a session lists per kind (counts go on).
const MAX_LISTED: usize = 1000;
/// Most distinct user agents a session lists.
const MAX_AGENTS: usize = 16;
/// Most tags whose latest lookup a session remembers at once. Past it the session
/// forgets them all and starts again: only an address many builds share for hours (an
/// edge, a NAT) looks up so many, and only the last few of a build's matter.
const MAX_TAG_LOOKUPS: usize = 10_000;

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
        /// It was a `HEAD` (the manifest itself was not sent).
        head: bool,
        /// Whether it was there.
        found: bool,
        /// The cache records the manifest found gives a build (`None` when not found,
        /// or stored before layercache recorded them).
        records: Option<CacheRecords>,
        /// It was fetched from an upstream just now (a miss on this server's disk).
        filled: bool,
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
        /// They were fetched from an upstream while sent (a miss on this server's disk).
        filled: bool,
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

/// What a build asked of the cache and got: for a whole session, or for one repository
/// within it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counts {
    /// Requests.
    pub requests: u64,
    /// Manifest lookups that found a manifest with cache records (or one stored before
    /// layercache recorded them).
    pub manifest_hits: u64,
    /// Manifest lookups that did not.
    pub manifest_misses: u64,
    /// Checks of a tag the build then pushed (an output image, a cache export's own tag):
    /// neither hits nor misses.
    pub push_probes: u64,
    /// Manifest lookups that found an image without cache metadata: a base image, or a
    /// useless cache import; neither hits nor misses.
    pub no_cache_lookups: u64,
    /// Manifests with cache records fetched: the builder obtained cache it can use.
    pub cache_imports: u64,
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
    /// Of the blob downloads, those fetched from an upstream while sent (a mirror's or an
    /// edge's misses); the others came from this server's disk.
    pub blobs_filled: u64,
    /// Bytes of those.
    pub bytes_filled: u64,
    /// Manifest lookups answered by fetching from an upstream.
    pub manifests_filled: u64,
    /// Blobs uploaded.
    pub blobs_written: u64,
    /// Bytes uploaded.
    pub bytes_written: u64,
    /// Bytes the client did not have to upload (blobs found present or mounted).
    pub bytes_avoided: u64,
    /// Cache entry lookups that matched an entry.
    pub entry_hits: u64,
    /// Cache entry lookups that did not.
    pub entry_misses: u64,
    /// Cache entries saved.
    pub entries_written: u64,
    /// Failed requests.
    pub errors: u64,
}

impl Counts {
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

    /// Cache reads: manifests with cache records fetched, and cache entries found.
    pub fn reads(&self) -> u64 {
        self.cache_imports + self.entry_hits
    }

    /// Writes: blobs, manifests and cache entries stored.
    pub fn writes(&self) -> u64 {
        self.blobs_written + self.manifests_written + self.entries_written
    }

    /// Add up `other`.
    pub fn add(&mut self, other: &Counts) {
        let Counts {
            requests,
            manifest_hits,
            manifest_misses,
            push_probes,
            no_cache_lookups,
            cache_imports,
            manifests_written,
            blobs_present,
            blobs_absent,
            blobs_served,
            bytes_served,
            blobs_filled,
            bytes_filled,
            manifests_filled,
            blobs_written,
            bytes_written,
            bytes_avoided,
            entry_hits,
            entry_misses,
            entries_written,
            errors,
        } = other;
        self.requests += requests;
        self.manifest_hits += manifest_hits;
        self.manifest_misses += manifest_misses;
        self.push_probes += push_probes;
        self.no_cache_lookups += no_cache_lookups;
        self.cache_imports += cache_imports;
        self.manifests_written += manifests_written;
        self.blobs_present += blobs_present;
        self.blobs_absent += blobs_absent;
        self.blobs_served += blobs_served;
        self.bytes_served += bytes_served;
        self.blobs_filled += blobs_filled;
        self.bytes_filled += bytes_filled;
        self.manifests_filled += manifests_filled;
        self.blobs_written += blobs_written;
        self.bytes_written += bytes_written;
        self.bytes_avoided += bytes_avoided;
        self.entry_hits += entry_hits;
        self.entry_misses += entry_misses;
        self.entries_written += entries_written;
        self.errors += errors;
    }
}

/// What a manifest lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// A manifest with cache records: a hit.
    Cache,
    /// An image without cache metadata.
    NoCache,
    /// Nothing: a miss.
    Nothing,
}

impl Found {
    fn of(found: bool, records: Option<CacheRecords>) -> Found {
        match (found, records) {
            (false, _) => Found::Nothing,
            (true, Some(CacheRecords::Without)) => Found::NoCache,
            (true, _) => Found::Cache,
        }
    }

    /// The count it adds to.
    fn counter(self, counts: &mut Counts) -> &mut u64 {
        match self {
            Found::Cache => &mut counts.manifest_hits,
            Found::NoCache => &mut counts.no_cache_lookups,
            Found::Nothing => &mut counts.manifest_misses,
        }
    }
}

/// The latest lookup of a tag in a session, until the build pushes that tag (a push
/// probe, when nothing was fetched through it) or resolves it (an import).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TagLookup {
    /// What it found.
    found: Found,
    /// It was a `HEAD`, which is how a push checks its tag first.
    head: bool,
    /// The repository's count of manifests fetched by digest when it was made: one
    /// fetched after it resolved it (an import).
    fetches_before: u64,
    /// The tag was listed (among the misses, or the images without cache) before it.
    listed_before: bool,
}

/// The latest lookups of tags in an open session, by repository, so that a request
/// costs the same however many tags the session looked up before it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct TagLookups {
    /// Each repository's, while it has any.
    repos: HashMap<String, RepoLookups>,
    /// Tag lookups remembered, in all repositories.
    len: usize,
}

/// An open session's tag lookups in one repository.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct RepoLookups {
    /// Manifests fetched by digest in the repository so far.
    fetches: u64,
    /// The latest lookup of each tag (`repo:tag`).
    tags: HashMap<String, TagLookup>,
}

impl TagLookups {
    /// Remember `lookup` of `reference` in `repo`, in place of any before it; its
    /// `fetches_before` is set here.
    fn insert(&mut self, repo: &str, reference: String, mut lookup: TagLookup) {
        if self.len >= MAX_TAG_LOOKUPS {
            *self = TagLookups::default();
        }
        let lookups = self.repos.entry(repo.to_owned()).or_default();
        lookup.fetches_before = lookups.fetches;
        if lookups.tags.insert(reference, lookup).is_none() {
            self.len += 1;
        }
    }

    /// A manifest of `repo` was fetched by digest, resolving its tags looked up before;
    /// whether there were any.
    fn fetched(&mut self, repo: &str) -> bool {
        self.repos.get_mut(repo).is_some_and(|lookups| {
            lookups.fetches += 1;
            !lookups.tags.is_empty()
        })
    }

    /// Forget the latest lookup of `reference` in `repo`, returning it and whether it
    /// was resolved.
    fn remove(&mut self, repo: &str, reference: &str) -> Option<(TagLookup, bool)> {
        let lookups = self.repos.get_mut(repo)?;
        let lookup = lookups.tags.remove(reference)?;
        self.len -= 1;
        let resolved = lookups.fetches > lookup.fetches_before;
        if lookups.tags.is_empty() {
            self.repos.remove(repo);
        }
        Some((lookup, resolved))
    }
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
    /// The client's `User-Agent` (of its first request).
    pub user_agent: String,
    /// Every `User-Agent` it sent (a docker build's pull comes from dockerd's BuildKit,
    /// its push from dockerd).
    #[serde(default)]
    pub user_agents: BTreeSet<String>,
    /// The `Host` its client addressed (`registry.ci:5000`), when it sent one.
    #[serde(default)]
    pub host: Option<String>,
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
    /// What it asked and got, in all.
    #[serde(flatten)]
    pub counts: Counts,
    /// The same, per repository.
    #[serde(default)]
    pub by_repo: BTreeMap<String, Counts>,
    /// References asked for and absent, in order (the first 1000).
    pub missed: Vec<String>,
    /// Images without cache metadata it looked up, in order (the first 1000): base
    /// images, or cache imports that gave nothing.
    #[serde(default)]
    pub no_cache_images: Vec<String>,
    /// Blobs uploaded (the first 1000).
    pub written: BTreeSet<String>,
    /// Blobs found present or mounted instead of uploaded (the first 1000).
    pub avoided: BTreeSet<String>,
    /// Changed since it was last saved.
    #[serde(skip)]
    pub(super) unsaved: bool,
    /// The latest lookup of each tag, while the session is open.
    #[serde(skip)]
    tag_lookups: TagLookups,
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
            host: client.host.clone(),
            started_ms: now,
            ended_ms: now,
            open: true,
            ..Session::default()
        }
    }

    /// What the session asked and got in `repo` (nothing if it never touched it; all of
    /// it for a session saved before counts were kept per repository).
    pub fn counts_in(&self, repo: &str) -> Counts {
        match self.by_repo.get(repo) {
            Some(counts) => counts.clone(),
            None if self.by_repo.is_empty() && self.repositories.contains(repo) => {
                self.counts.clone()
            }
            None => Counts::default(),
        }
    }

    /// Note a `User-Agent` the client sent.
    pub(super) fn note_agent(&mut self, user_agent: &str) {
        if !self.user_agents.contains(user_agent) && self.user_agents.len() < MAX_AGENTS {
            self.user_agents.insert(user_agent.to_owned());
        }
    }

    /// Change the counts of the whole session and of `repo` alike.
    fn count(&mut self, repo: &str, change: impl Fn(&mut Counts)) {
        change(&mut self.counts);
        change(self.by_repo.entry(repo.to_owned()).or_default());
    }

    /// Add one request to `repo` that had `outcome`, at `now` (milliseconds).
    pub(super) fn record(&mut self, repo: &str, outcome: Outcome, now: i64) {
        self.ended_ms = self.ended_ms.max(now);
        self.unsaved = true;
        if !self.repositories.contains(repo) {
            self.repositories.insert(repo.to_owned());
        }
        self.count(repo, |c| c.requests += 1);
        match outcome {
            Outcome::ManifestLookup {
                reference,
                by_tag,
                head,
                found,
                records,
                filled,
            } => {
                if filled {
                    self.count(repo, |c| c.manifests_filled += 1);
                }
                let found = Found::of(found, records);
                self.count(repo, |c| *found.counter(c) += 1);
                if found == Found::Cache && !head {
                    self.count(repo, |c| c.cache_imports += 1);
                }
                let listed = match found {
                    Found::Cache => {
                        if by_tag {
                            note(&mut self.tags, reference.clone());
                        }
                        None
                    }
                    Found::NoCache => Some(&mut self.no_cache_images),
                    Found::Nothing => Some(&mut self.missed),
                };
                if by_tag {
                    let listed_before = listed.as_ref().is_some_and(|l| l.contains(&reference));
                    if let Some(listed) = listed {
                        list(listed, reference.clone());
                    }
                    let lookup = TagLookup {
                        found,
                        head,
                        fetches_before: 0,
                        listed_before,
                    };
                    self.tag_lookups.insert(repo, reference, lookup);
                } else {
                    let resolved_a_tag = self.tag_lookups.fetched(repo);
                    // An image without cache is listed by the tag that named it.
                    let by_its_tag = found == Found::NoCache && resolved_a_tag;
                    if let Some(listed) = listed.filter(|_| !by_its_tag) {
                        list(listed, reference);
                    }
                }
            }
            Outcome::ManifestWritten { tag } => {
                self.count(repo, |c| c.manifests_written += 1);
                if let Some(tag) = tag {
                    self.push_probed(repo, &tag);
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
                self.count(repo, |c| {
                    c.blobs_present += 1;
                    c.bytes_avoided += size;
                });
                note(&mut self.avoided, digest);
            }
            Outcome::BlobChecked { size: None, .. } => self.count(repo, |c| c.blobs_absent += 1),
            Outcome::BlobServed { bytes, filled, .. } => self.count(repo, |c| {
                c.blobs_served += 1;
                c.bytes_served += bytes;
                if filled {
                    c.blobs_filled += 1;
                    c.bytes_filled += bytes;
                }
            }),
            Outcome::BlobWritten { digest, bytes } => {
                self.count(repo, |c| {
                    c.blobs_written += 1;
                    c.bytes_written += bytes;
                });
                note(&mut self.written, digest);
            }
            Outcome::BlobMounted { digest, bytes } => {
                self.count(repo, |c| c.bytes_avoided += bytes);
                note(&mut self.avoided, digest);
            }
            Outcome::BlobMissing { digest } => {
                self.count(repo, |c| c.errors += 1);
                list(&mut self.missed, digest);
            }
            Outcome::EntryLookup { key, found } => {
                if found {
                    self.count(repo, |c| c.entry_hits += 1);
                } else {
                    self.count(repo, |c| c.entry_misses += 1);
                    list(&mut self.missed, key);
                }
            }
            Outcome::EntryWritten { key, bytes } => {
                self.count(repo, |c| {
                    c.entries_written += 1;
                    c.bytes_written += bytes;
                });
                note(&mut self.written, key);
            }
            Outcome::EntryServed { bytes } => self.count(repo, |c| c.bytes_served += bytes),
            Outcome::Failed => self.count(repo, |c| c.errors += 1),
            Outcome::Other => {}
        }
    }

    /// The build pushed `tag`: if its latest lookup was a `HEAD` that fetched nothing
    /// through it, that was the push checking its own tag, not a cache lookup.
    fn push_probed(&mut self, repo: &str, tag: &str) {
        let Some((lookup, resolved)) = self.tag_lookups.remove(repo, tag) else {
            return;
        };
        if !lookup.head || resolved {
            return;
        }
        self.count(repo, |c| {
            let counter = lookup.found.counter(c);
            *counter = counter.saturating_sub(1);
            c.push_probes += 1;
        });
        if !lookup.listed_before {
            self.missed.retain(|m| m != tag);
            self.no_cache_images.retain(|m| m != tag);
        }
    }

    /// Mark it closed (and due for saving).
    pub(super) fn close(&mut self) {
        self.open = false;
        self.unsaved = true;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(reference: &str, head: bool, found: bool) -> Outcome {
        Outcome::ManifestLookup {
            filled: false,
            reference: reference.to_owned(),
            by_tag: !reference.contains('@'),
            head,
            found,
            records: found.then_some(CacheRecords::Export),
        }
    }

    fn image_without_cache(reference: &str, head: bool) -> Outcome {
        Outcome::ManifestLookup {
            filled: false,
            reference: reference.to_owned(),
            by_tag: !reference.contains('@'),
            head,
            found: true,
            records: Some(CacheRecords::Without),
        }
    }

    fn push(tag: &str) -> Outcome {
        Outcome::ManifestWritten {
            tag: Some(tag.to_owned()),
        }
    }

    fn session(requests: Vec<(&str, Outcome)>) -> Session {
        let mut session = Session::default();
        for (at, (repo, outcome)) in requests.into_iter().enumerate() {
            session.record(repo, outcome, at as i64);
        }
        session
    }

    #[test]
    fn a_push_checking_its_own_tag_is_neither_hit_nor_miss() {
        // BuildKit pushing its output image, then exporting its cache over an old one.
        let s = session(vec![
            ("app", lookup("app:v1", true, false)),
            ("app", push("app:v1")),
            ("cache/app", lookup("cache/app:main", true, true)),
            ("cache/app", push("cache/app:main")),
        ]);
        assert_eq!((s.counts.hits(), s.counts.misses()), (0, 0));
        assert_eq!(s.counts.push_probes, 2);
        assert!(s.missed.is_empty(), "{:?}", s.missed);
        assert_eq!(s.counts_in("app").push_probes, 1);
    }

    #[test]
    fn an_import_of_the_tag_a_build_then_exports_stays_a_lookup() {
        // Warm: the import resolves the tag and fetches it by digest, then the export
        // checks the tag and pushes it.
        let warm = session(vec![
            ("cache/app", lookup("cache/app:main", true, true)),
            ("cache/app", lookup("cache/app@sha256:1", false, true)),
            ("cache/app", lookup("cache/app:main", true, true)),
            ("cache/app", push("cache/app:main")),
        ]);
        assert_eq!(warm.counts.manifest_hits, 2);
        assert_eq!(warm.counts.push_probes, 1);
        // Cold: the import misses, so does the export's check.
        let cold = session(vec![
            ("cache/app", lookup("cache/app:main", true, false)),
            ("cache/app", lookup("cache/app:main", true, false)),
            ("cache/app", push("cache/app:main")),
        ]);
        assert_eq!(cold.counts.manifest_misses, 1);
        assert_eq!(cold.counts.push_probes, 1);
        assert_eq!(cold.missed, ["cache/app:main"]);
        // A pull by tag (GET) before a push of the same tag is a real lookup.
        let pulled = session(vec![
            ("app", lookup("app:v1", false, true)),
            ("app", push("app:v1")),
        ]);
        assert_eq!(pulled.counts.manifest_hits, 1);
        assert_eq!(pulled.counts.push_probes, 0);
    }

    #[test]
    fn a_fetch_by_digest_resolves_only_its_own_repositorys_tags() {
        let digest = "@sha256:0000000000000000000000000000000000000000000000000000000000000000";
        let elsewhere = session(vec![
            ("app", lookup("app:v1", true, true)),
            ("other", lookup(&format!("other{digest}"), false, true)),
            ("app", push("app:v1")),
        ]);
        assert_eq!(elsewhere.counts.push_probes, 1);
        let imported = session(vec![
            ("app", lookup("app:v1", true, true)),
            ("app", lookup(&format!("app{digest}"), false, true)),
            ("app", push("app:v1")),
        ]);
        assert_eq!(imported.counts.push_probes, 0);
        assert_eq!(imported.counts.hits(), 2);
    }

    #[test]
    fn a_session_of_very_many_tags_remembers_a_bounded_number_and_still_sees_a_probe() {
        let mut s = Session::default();
        for i in 0..MAX_TAG_LOOKUPS + 5 {
            s.record("many", lookup(&format!("many:t{i}"), false, false), 0);
            assert!(s.tag_lookups.len <= MAX_TAG_LOOKUPS);
        }
        s.record("app", lookup("app:v1", true, false), 1);
        s.record("app", push("app:v1"), 2);
        assert_eq!(s.counts.push_probes, 1);
        assert_eq!(s.counts.manifest_misses, (MAX_TAG_LOOKUPS + 5) as u64);
        assert!(s.tag_lookups.len <= MAX_TAG_LOOKUPS);
        assert!(
            !s.tag_lookups.repos.contains_key("app"),
            "nothing left to remember"
        );
    }

    #[test]
    fn counts_are_kept_per_repository() {
        let s = session(vec![
            ("cache/app", lookup("cache/app:main", true, true)),
            (
                "cache/app",
                Outcome::BlobServed {
                    filled: false,
                    digest: "sha256:2".into(),
                    bytes: 10,
                },
            ),
            ("other", lookup("other:v1", false, false)),
        ]);
        assert_eq!(s.counts.requests, 3);
        let cache = s.counts_in("cache/app");
        assert_eq!(
            (cache.hits(), cache.misses(), cache.bytes_served),
            (1, 0, 10)
        );
        assert_eq!(s.counts_in("other").misses(), 1);
        assert_eq!(s.counts_in("elsewhere"), Counts::default());
    }

    #[test]
    fn an_image_without_cache_metadata_is_no_hit_and_no_cache_read() {
        // A --cache-from of an image pushed without cache: BuildKit resolves the tag,
        // fetches the manifest, finds no records.
        let s = session(vec![
            ("app", image_without_cache("app:prebuild", true)),
            ("app", image_without_cache("app@sha256:1", false)),
        ]);
        assert_eq!((s.counts.hits(), s.counts.misses()), (0, 0));
        assert_eq!((s.counts.no_cache_lookups, s.counts.reads()), (2, 0));
        assert_eq!(s.no_cache_images, ["app:prebuild"]);
        // A cache export fetched is a cache read; its tag check is a hit.
        let warm = session(vec![
            ("cache", lookup("cache:main", true, true)),
            ("cache", lookup("cache@sha256:2", false, true)),
        ]);
        assert_eq!((warm.counts.hits(), warm.counts.reads()), (2, 1));
        // A push over an image without cache checks its own tag first: a probe.
        let pushed = session(vec![
            ("app", image_without_cache("app:v1", true)),
            ("app", push("app:v1")),
        ]);
        assert_eq!(
            (pushed.counts.no_cache_lookups, pushed.counts.push_probes),
            (0, 1)
        );
        assert!(pushed.no_cache_images.is_empty());
    }
}
