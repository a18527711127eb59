//! A build session's misses set against what the registry holds: for each reference the
//! build asked for and did not find, the nearest references that do exist, or the
//! eviction that removed it; and the blobs it uploaded although another repository
//! already held them.
//!
//! The caller gathers the facts (the session, tag lists, the catalog, the last eviction
//! pass, blob checks in other repositories); this module only reasons over them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{short_digest, text};

/// Tags that usually hold the default branch's cache: good second `--cache-from`s.
const FALLBACK_TAGS: [&str; 7] = [
    "main", "master", "latest", "develop", "dev", "trunk", "default",
];

/// Most nearest references offered per miss.
const NEAREST: usize = 3;

/// A root the last eviction pass removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictedRoot {
    /// Its repository.
    pub repo: String,
    /// The manifest.
    pub digest: String,
    /// The tags that pointed at it.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Its last use, in seconds since the epoch.
    #[serde(default)]
    pub last_used: i64,
}

/// A blob found in repositories other than the session's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlobElsewhere {
    /// The blob.
    pub digest: String,
    /// Its size.
    pub size: Option<u64>,
    /// Repositories holding it.
    pub repositories: Vec<String>,
}

/// What the caller found out about a session and the registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionFacts {
    /// The session's name or id.
    pub session: String,
    /// Repositories it touched.
    pub repositories: Vec<String>,
    /// What it asked for and did not find, in order.
    pub missed: Vec<String>,
    /// Tags of the repositories the misses name; `None` for a repository the registry
    /// does not know.
    pub tags: BTreeMap<String, Option<Vec<String>>>,
    /// Every repository of the registry (bounded by the caller).
    pub catalog: Vec<String>,
    /// When the last eviction pass ran, if one did.
    pub last_gc: Option<i64>,
    /// What that pass evicted.
    pub evicted: Vec<EvictedRoot>,
    /// Blobs the session uploaded that other repositories hold.
    pub uploaded_elsewhere: Vec<BlobElsewhere>,
    /// Blobs the session asked for, did not find, and other repositories hold.
    pub missing_elsewhere: Vec<BlobElsewhere>,
    /// Limits the caller hit while gathering (checks skipped).
    pub limits: Vec<String>,
}

/// One reference the build asked for and did not find.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MissedRef {
    /// As asked: `repo:tag` or `repo@digest`.
    pub reference: String,
    /// Its repository.
    pub repository: String,
    /// The registry knows the repository.
    pub repository_exists: bool,
    /// Existing references nearest to it, best first.
    pub nearest: Vec<String>,
    /// The eviction that removed it, if the last pass did.
    pub evicted: Option<EvictedRoot>,
    /// What to do, in a sentence.
    pub advice: String,
}

/// A session's misses, explained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionExplanation {
    /// The session.
    pub session: String,
    /// Repositories it touched.
    pub repositories: Vec<String>,
    /// References asked for and absent.
    pub missed_refs: Vec<MissedRef>,
    /// Blobs asked for and absent.
    pub missed_blobs: Vec<String>,
    /// Of those, the ones other repositories hold.
    pub missing_elsewhere: Vec<BlobElsewhere>,
    /// Actions cache keys looked up and not matched.
    pub missed_entries: Vec<String>,
    /// Blobs uploaded although other repositories held them.
    pub uploaded_elsewhere: Vec<BlobElsewhere>,
    /// Their total size (where known).
    pub uploaded_elsewhere_bytes: u64,
    /// When the last eviction pass ran.
    pub last_gc: Option<i64>,
    /// Roots of the session's repositories the last pass evicted.
    pub evicted: Vec<EvictedRoot>,
    /// Checks skipped to bound the work.
    pub limits: Vec<String>,
}

/// What a `missed` entry names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Miss {
    Tag { repo: String, tag: String },
    Manifest { repo: String, digest: String },
    Blob(String),
    Entry(String),
}

fn classify(missed: &str) -> Miss {
    if missed.parse::<oci::Digest>().is_ok() {
        return Miss::Blob(missed.to_owned());
    }
    if let Some((repo, digest)) = missed.split_once('@')
        && repo.parse::<oci::RepoName>().is_ok()
        && digest.parse::<oci::Digest>().is_ok()
    {
        return Miss::Manifest {
            repo: repo.to_owned(),
            digest: digest.to_owned(),
        };
    }
    if let Some((repo, tag)) = missed.rsplit_once(':')
        && repo.parse::<oci::RepoName>().is_ok()
        && tag.parse::<oci::Tag>().is_ok()
    {
        return Miss::Tag {
            repo: repo.to_owned(),
            tag: tag.to_owned(),
        };
    }
    Miss::Entry(missed.to_owned())
}

/// The repository of a `missed` entry naming a manifest, for the caller to list.
pub fn repository_of(missed: &str) -> Option<String> {
    match classify(missed) {
        Miss::Tag { repo, .. } | Miss::Manifest { repo, .. } => Some(repo),
        _ => None,
    }
}

/// Levenshtein distance over characters.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = i;
        if let Some(first) = row.first_mut() {
            *first = i + 1;
        }
        for (j, cb) in b.iter().enumerate() {
            let above = row.get(j + 1).copied().unwrap_or(0);
            let left = row.get(j).copied().unwrap_or(0);
            let value = (diagonal + usize::from(ca != *cb))
                .min(above + 1)
                .min(left + 1);
            diagonal = above;
            if let Some(cell) = row.get_mut(j + 1) {
                *cell = value;
            }
        }
    }
    row.last().copied().unwrap_or(0)
}

/// How alike two names are, 0 to 1.
fn similarity(a: &str, b: &str) -> f64 {
    let longest = a.chars().count().max(b.chars().count());
    if longest == 0 {
        return 1.0;
    }
    1.0 - distance(a, b) as f64 / longest as f64
}

/// `candidates` nearest to `asked`, best first, at most `limit`: by similarity, with the
/// default branch's usual tags (`main`, `master`, `latest`, ...) raised, since their cache
/// is the usual fallback for a branch that has none yet.
pub fn nearest(asked: &str, candidates: &[String], limit: usize) -> Vec<String> {
    let mut scored: Vec<(f64, &String)> = candidates
        .iter()
        .filter(|c| c.as_str() != asked)
        .map(|c| {
            let bonus = if FALLBACK_TAGS.contains(&c.as_str()) {
                0.5
            } else {
                0.0
            };
            (similarity(asked, c) + bonus, c)
        })
        .collect();
    scored.sort_by(|x, y| y.0.total_cmp(&x.0).then_with(|| x.1.cmp(y.1)));
    scored
        .into_iter()
        .take(limit)
        .map(|(_, c)| c.clone())
        .collect()
}

/// Explain a session from the facts gathered about it.
pub fn explain(facts: &SessionFacts) -> SessionExplanation {
    let mut missed_refs = Vec::new();
    let mut missed_blobs = Vec::new();
    let mut missed_entries = Vec::new();
    for missed in &facts.missed {
        match classify(missed) {
            Miss::Blob(digest) => missed_blobs.push(digest),
            Miss::Entry(key) => missed_entries.push(key),
            Miss::Tag { repo, tag } => missed_refs.push(missed_tag(facts, missed, &repo, &tag)),
            Miss::Manifest { repo, digest } => {
                missed_refs.push(missed_manifest(facts, missed, &repo, &digest))
            }
        }
    }
    let evicted = facts
        .evicted
        .iter()
        .filter(|e| facts.repositories.contains(&e.repo))
        .cloned()
        .collect();
    SessionExplanation {
        session: facts.session.clone(),
        repositories: facts.repositories.clone(),
        missed_refs,
        missed_blobs,
        missing_elsewhere: facts.missing_elsewhere.clone(),
        missed_entries,
        uploaded_elsewhere_bytes: facts.uploaded_elsewhere.iter().filter_map(|b| b.size).sum(),
        uploaded_elsewhere: facts.uploaded_elsewhere.clone(),
        last_gc: facts.last_gc,
        evicted,
        limits: facts.limits.clone(),
    }
}

fn evicted_advice(reference: &str, root: &EvictedRoot, last_gc: Option<i64>) -> String {
    let when = last_gc.map_or(String::new(), |t| format!(" at {}", text::utc(t)));
    format!(
        "{reference} was evicted by the last eviction pass{when} (last used {}): rebuild \
         and push it, and keep it with a `pin_tags` rule for {} or a larger quota",
        text::utc(root.last_used),
        root.repo
    )
}

fn missed_tag(facts: &SessionFacts, reference: &str, repo: &str, tag: &str) -> MissedRef {
    let evicted = facts
        .evicted
        .iter()
        .find(|e| e.repo == repo && e.tags.iter().any(|t| t == tag))
        .cloned();
    let tags = facts.tags.get(repo).cloned().flatten();
    let repository_exists = tags.is_some();
    let (nearest_refs, advice) = match (&evicted, &tags) {
        (Some(root), _) => {
            let near = tags
                .as_deref()
                .map(|t| nearest(tag, t, NEAREST))
                .unwrap_or_default()
                .into_iter()
                .map(|t| format!("{repo}:{t}"))
                .collect();
            (near, evicted_advice(reference, root, facts.last_gc))
        }
        (None, Some(tags)) if !tags.is_empty() => {
            let near: Vec<String> = nearest(tag, tags, NEAREST)
                .into_iter()
                .map(|t| format!("{repo}:{t}"))
                .collect();
            let advice = match near.first() {
                Some(best) => format!(
                    "{reference} does not exist; {best} does: add `--cache-from {best}` as a \
                     second --cache-from (BuildKit imports from every one it is given), so a \
                     build of a new branch starts from that cache"
                ),
                None => format!("{reference} does not exist"),
            };
            (near, advice)
        }
        (None, Some(_)) => (
            Vec::new(),
            format!(
                "{reference} does not exist and {repo} holds no tags: no build has exported \
                 a cache to it yet — check the --cache-to (or the push) of the build meant to"
            ),
        ),
        (None, None) => {
            let near: Vec<String> = nearest(repo, &facts.catalog, NEAREST)
                .into_iter()
                .filter(|r| similarity(repo, r) >= 0.5)
                .collect();
            let advice = match near.first() {
                Some(best) => format!(
                    "there is no repository {repo} on this registry; {best} exists: check \
                     the spelling of the --cache-from / --cache-to reference"
                ),
                None => format!(
                    "there is no repository {repo} on this registry: no build has pushed to \
                     it yet — check the --cache-to (or the push) of the build meant to"
                ),
            };
            (near, advice)
        }
    };
    MissedRef {
        reference: reference.to_owned(),
        repository: repo.to_owned(),
        repository_exists,
        nearest: nearest_refs,
        evicted,
        advice,
    }
}

fn missed_manifest(facts: &SessionFacts, reference: &str, repo: &str, digest: &str) -> MissedRef {
    let evicted = facts
        .evicted
        .iter()
        .find(|e| e.repo == repo && e.digest == digest)
        .cloned();
    let tags = facts.tags.get(repo).cloned().flatten();
    let advice = match &evicted {
        Some(root) => evicted_advice(reference, root, facts.last_gc),
        None => format!(
            "manifest {} is not in {repo}: the reference was pinned to a digest this \
             registry never held, or it was deleted",
            short_digest(digest)
        ),
    };
    MissedRef {
        reference: reference.to_owned(),
        repository: repo.to_owned(),
        repository_exists: tags.is_some(),
        nearest: Vec::new(),
        evicted,
        advice,
    }
}

impl SessionExplanation {
    /// Whether there is nothing to explain.
    pub fn is_clean(&self) -> bool {
        self.missed_refs.is_empty()
            && self.missed_blobs.is_empty()
            && self.missed_entries.is_empty()
            && self.uploaded_elsewhere.is_empty()
    }

    /// The explanation for people.
    pub fn text(&self) -> String {
        let mut out = format!(
            "Build session {} ({})\n",
            self.session,
            if self.repositories.is_empty() {
                "no repositories".to_owned()
            } else {
                self.repositories.join(", ")
            }
        );
        if self.is_clean() {
            out += "No misses: every reference it asked for was there, and it uploaded no \
                    blob another repository already held.\n";
        }
        if !self.missed_refs.is_empty() {
            out += &format!(
                "\nReferences asked for and absent ({}):\n",
                self.missed_refs.len()
            );
            for m in &self.missed_refs {
                out += &format!("  {}\n", m.reference);
                out += &format!("    {}.\n", m.advice);
                if m.nearest.len() > 1 {
                    out += &format!("    Nearest existing: {}\n", m.nearest.join(", "));
                }
            }
        }
        if !self.missed_blobs.is_empty() {
            out += &format!(
                "\nBlobs asked for and absent ({}): a manifest named content this registry \
                 does not hold\n",
                self.missed_blobs.len()
            );
            for digest in &self.missed_blobs {
                let elsewhere = self.missing_elsewhere.iter().find(|b| &b.digest == digest);
                match elsewhere {
                    Some(b) => {
                        out += &format!("  {digest}  (held by {})\n", b.repositories.join(", "))
                    }
                    None => out += &format!("  {digest}\n"),
                }
            }
        }
        if !self.missed_entries.is_empty() {
            out += &format!(
                "\nActions cache keys that matched no entry ({}):\n",
                self.missed_entries.len()
            );
            for key in &self.missed_entries {
                out += &format!("  {key}\n");
            }
        }
        if !self.uploaded_elsewhere.is_empty() {
            out += &format!(
                "\nBlobs uploaded although another repository already held them ({}, {}): \
                 pushing to the repository the base or cache came from (or one BuildKit \
                 pulled from in the same build, so it mounts them) skips these uploads:\n",
                self.uploaded_elsewhere.len(),
                text::bytes(self.uploaded_elsewhere_bytes)
            );
            for b in &self.uploaded_elsewhere {
                let size = b.size.map_or("-".to_owned(), text::size);
                out += &format!(
                    "  {}  {size}  in {}\n",
                    short_digest(&b.digest),
                    b.repositories.join(", ")
                );
            }
        }
        if !self.evicted.is_empty() {
            let when = self
                .last_gc
                .map_or(String::new(), |t| format!(" at {}", text::utc(t)));
            out += &format!("\nEvicted from its repositories by the last eviction pass{when}:\n");
            for e in &self.evicted {
                let name = if e.tags.is_empty() {
                    format!("{}@{}", e.repo, short_digest(&e.digest))
                } else {
                    format!("{}:{}", e.repo, e.tags.join(","))
                };
                out += &format!("  {name}  (last used {})\n", text::utc(e.last_used));
            }
        }
        for limit in &self.limits {
            out += &format!("Note: {limit}.\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn misses_are_told_apart() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(classify(&d), Miss::Blob(d.clone()));
        assert_eq!(
            classify(&format!("cache/app@{d}")),
            Miss::Manifest {
                repo: "cache/app".into(),
                digest: d.clone()
            }
        );
        assert_eq!(
            classify("cache/app:pr-12"),
            Miss::Tag {
                repo: "cache/app".into(),
                tag: "pr-12".into()
            }
        );
        assert_eq!(
            classify("Linux-npm-abc"),
            Miss::Entry("Linux-npm-abc".into())
        );
        assert_eq!(
            repository_of("cache/app:pr-12").as_deref(),
            Some("cache/app")
        );
        assert_eq!(repository_of(&d), None);
    }

    #[test]
    fn nearest_tags_rank_similar_names_and_the_default_branch_first() {
        let tags = strings(&["v1", "main", "pr-11", "pr-120", "feature-x"]);
        let got = nearest("pr-12", &tags, 3);
        assert_eq!(got.len(), 3);
        assert!(got.contains(&"main".to_owned()), "{got:?}");
        assert!(got.contains(&"pr-11".to_owned()), "{got:?}");
        assert!(!got.contains(&"feature-x".to_owned()), "{got:?}");
        assert_eq!(nearest("x", &strings(&["x"]), 3), Vec::<String>::new());
        assert_eq!(distance("kitten", "sitting"), 3);
    }

    #[test]
    fn a_missing_branch_tag_names_the_existing_nearest_tag() {
        let mut facts = SessionFacts {
            session: "run-1".into(),
            repositories: strings(&["cache/app"]),
            missed: strings(&["cache/app:pr-12", "cache/ap:main"]),
            catalog: strings(&["cache/app", "other"]),
            ..SessionFacts::default()
        };
        facts
            .tags
            .insert("cache/app".into(), Some(strings(&["main"])));
        facts.tags.insert("cache/ap".into(), None);
        let e = explain(&facts);
        assert_eq!(e.missed_refs.len(), 2);
        let first = &e.missed_refs[0];
        assert_eq!(first.nearest, ["cache/app:main"]);
        assert!(
            first.advice.contains("--cache-from cache/app:main"),
            "{}",
            first.advice
        );
        let second = &e.missed_refs[1];
        assert!(!second.repository_exists);
        assert_eq!(second.nearest, ["cache/app"]);
        let text = e.text();
        assert!(text.contains("cache/app:pr-12"), "{text}");
        assert!(text.contains("second --cache-from"), "{text}");
    }

    #[test]
    fn evicted_refs_and_uploads_found_elsewhere_are_reported() {
        let d = format!("sha256:{}", "b".repeat(64));
        let facts = SessionFacts {
            session: "run-2".into(),
            repositories: strings(&["cache/app"]),
            missed: strings(&["cache/app:main", "some-actions-key"]),
            last_gc: Some(1_795_460_791),
            evicted: vec![EvictedRoot {
                repo: "cache/app".into(),
                digest: d.clone(),
                tags: strings(&["main"]),
                last_used: 1_795_000_000,
            }],
            uploaded_elsewhere: vec![BlobElsewhere {
                digest: d.clone(),
                size: Some(4096),
                repositories: strings(&["cache/base"]),
            }],
            tags: [("cache/app".to_owned(), Some(Vec::new()))].into(),
            ..SessionFacts::default()
        };
        let e = explain(&facts);
        let miss = &e.missed_refs[0];
        assert!(miss.evicted.is_some());
        assert!(miss.advice.contains("evicted"), "{}", miss.advice);
        assert_eq!(e.missed_entries, ["some-actions-key"]);
        assert_eq!(e.uploaded_elsewhere_bytes, 4096);
        assert_eq!(e.evicted.len(), 1);
        let text = e.text();
        assert!(text.contains("2026-11-23T19:06:31Z"), "{text}");
        assert!(text.contains("cache/base"), "{text}");
        assert!(!e.is_clean());
    }
}
