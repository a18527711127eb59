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

/// The build tool a session's requests came from, told by their user agents, so that
/// advice is a flag to paste into that tool's command.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Builder {
    /// dockerd's BuildKit (`containerd/…`) and `docker push` (`docker/…`).
    Docker,
    /// BuildKit's daemon (`buildkit/…`), driven by buildctl or buildx.
    BuildKit,
    /// Another tool, or none known.
    #[default]
    Unknown,
}

impl Builder {
    /// The builder that sent requests with `user_agents`.
    pub fn of<'a>(user_agents: impl IntoIterator<Item = &'a str>) -> Builder {
        let agents: Vec<&str> = user_agents.into_iter().collect();
        if agents.iter().any(|a| a.starts_with("buildkit/")) {
            Builder::BuildKit
        } else if agents
            .iter()
            .any(|a| a.starts_with("docker/") || a.starts_with("containerd/"))
        {
            Builder::Docker
        } else {
            Builder::Unknown
        }
    }

    /// The flag that imports the cache at `reference` (`HOST/REPO:TAG`).
    pub fn import_flag(self, reference: &str) -> String {
        let docker = format!("`--cache-from {reference}` (docker build)");
        let buildctl = format!("`--import-cache type=registry,ref={reference}` (buildctl)");
        let buildx = format!("`--cache-from type=registry,ref={reference}` (buildx)");
        match self {
            Builder::Docker => docker,
            Builder::BuildKit => format!("{buildctl} or {buildx}"),
            Builder::Unknown => format!("{docker}, {buildx} or {buildctl}"),
        }
    }

    /// The flag that makes the build pushing the image `reference` put its cache
    /// records in it (inline cache), so that importing it gives them.
    pub fn inline_export_flag(self, reference: &str) -> String {
        let docker = "`--build-arg BUILDKIT_INLINE_CACHE=1` (docker build)";
        let buildkit = "`--export-cache type=inline` (buildctl) or `--cache-to type=inline` \
                        (buildx)";
        let tools = match self {
            Builder::Docker => docker.to_owned(),
            Builder::BuildKit => buildkit.to_owned(),
            Builder::Unknown => format!("{docker}, {buildkit}"),
        };
        format!("{tools} on the build that pushes {reference}")
    }
}

/// What the caller found out about a session and the registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionFacts {
    /// The session's name or id.
    pub session: String,
    /// The registry host its client addressed (`registry.ci:5000`), for pasteable advice.
    pub host: Option<String>,
    /// The tool that made its requests.
    pub builder: Builder,
    /// Manifests with cache records it fetched.
    pub cache_imports: u64,
    /// Images without cache metadata it looked up, in order.
    pub no_cache_images: Vec<String>,
    /// Which existing tags (`repo:tag`) of the repositories it missed in carry cache
    /// records (`false`: an image without cache metadata); tags not checked are absent.
    pub tag_has_cache: BTreeMap<String, bool>,
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

/// An image a build imported that carries no cache records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UselessImport {
    /// As looked up: `repo:tag` or `repo@digest`.
    pub reference: String,
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
    /// The tool that made its requests.
    pub builder: Builder,
    /// Images it imported that carry no cache records, when it obtained no cache at
    /// all: the first thing to fix.
    pub useless_imports: Vec<UselessImport>,
    /// Images without cache metadata it looked up while it did obtain cache elsewhere
    /// (base images, most likely).
    pub images_without_cache: Vec<String>,
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
    let (useless_imports, images_without_cache) = if facts.cache_imports == 0 {
        let useless = facts
            .no_cache_images
            .iter()
            .map(|reference| UselessImport {
                reference: reference.clone(),
                advice: useless_import_advice(facts, reference),
            })
            .collect();
        (useless, Vec::new())
    } else {
        (Vec::new(), facts.no_cache_images.clone())
    };
    SessionExplanation {
        session: facts.session.clone(),
        repositories: facts.repositories.clone(),
        builder: facts.builder,
        useless_imports,
        images_without_cache,
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

/// `reference` as a client pastes it: with the registry host, when known.
fn qualified(facts: &SessionFacts, reference: &str) -> String {
    match &facts.host {
        Some(host) => format!("{host}/{reference}"),
        None => reference.to_owned(),
    }
}

/// What to do about `reference`, an image without cache metadata the build imported.
pub fn useless_import_advice(facts: &SessionFacts, reference: &str) -> String {
    let full = qualified(facts, reference);
    format!(
        "{full} is an image without cache metadata: the build imported it and found no \
         cache records, so every step ran again. Push it with its cache: {}; or import a \
         cache export instead with {}",
        facts.builder.inline_export_flag(&full),
        facts.builder.import_flag(&qualified(
            facts,
            &format!("{}:cache", repo_part(reference))
        ))
    )
}

/// The repository of `repo:tag` or `repo@digest`.
fn repo_part(reference: &str) -> &str {
    match reference.split_once('@') {
        Some((repo, _)) => repo,
        None => reference
            .rsplit_once(':')
            .map_or(reference, |(repo, _)| repo),
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
            // Never offer an image a build would find no cache in.
            let with_cache: Vec<String> = tags
                .iter()
                .filter(|t| facts.tag_has_cache.get(&format!("{repo}:{t}")) != Some(&false))
                .cloned()
                .collect();
            let near: Vec<String> = nearest(tag, &with_cache, NEAREST)
                .into_iter()
                .map(|t| format!("{repo}:{t}"))
                .collect();
            let advice = match near.first() {
                Some(best) => format!(
                    "{reference} does not exist; {best} does and carries cache: add {} as a \
                     second cache import (BuildKit imports from every one it is given), so \
                     a build of a new branch starts from that cache",
                    facts.builder.import_flag(&qualified(facts, best))
                ),
                None => format!(
                    "{reference} does not exist, and no tag of {repo} carries cache records: \
                     export a cache to it ({})",
                    facts
                        .builder
                        .inline_export_flag(&qualified(facts, reference))
                ),
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
        self.useless_imports.is_empty()
            && self.missed_refs.is_empty()
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
        if !self.useless_imports.is_empty() {
            out += &format!(
                "\nImported, but without cache metadata ({}): the build obtained no cache \
                 at all\n",
                self.useless_imports.len()
            );
            for u in &self.useless_imports {
                out += &format!("  {}\n    {}.\n", u.reference, u.advice);
            }
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
        if !self.images_without_cache.is_empty() {
            out += &format!(
                "\nImages without cache metadata it looked up (base images, or cache \
                 imports that gave nothing): {}\n",
                self.images_without_cache.join(", ")
            );
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
        // An image without cache metadata is never offered; the advice is the flag of
        // the builder that asked, with the host.
        facts.tag_has_cache.insert("cache/app:main".into(), false);
        facts.host = Some("ci:5000".into());
        facts.builder = Builder::BuildKit;
        let advice = &explain(&facts).missed_refs[0].advice;
        assert!(
            advice.contains("no tag of cache/app carries cache"),
            "{advice}"
        );
        assert!(
            advice.contains("`--export-cache type=inline` (buildctl)"),
            "{advice}"
        );
        facts
            .tags
            .insert("cache/app".into(), Some(strings(&["main", "pr-11-cache"])));
        let e = explain(&facts);
        assert_eq!(e.missed_refs[0].nearest, ["cache/app:pr-11-cache"]);
        assert!(
            e.missed_refs[0]
                .advice
                .contains("`--import-cache type=registry,ref=ci:5000/cache/app:pr-11-cache`"),
            "{}",
            e.missed_refs[0].advice
        );
        let second = &e.missed_refs[1];
        assert!(!second.repository_exists);
        assert_eq!(second.nearest, ["cache/app"]);
        let text = e.text();
        assert!(text.contains("cache/app:pr-12"), "{text}");
        assert!(text.contains("second cache import"), "{text}");
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

    #[test]
    fn an_import_without_cache_metadata_comes_first_when_nothing_gave_cache() {
        let mut facts = SessionFacts {
            session: "job-2".into(),
            host: Some("127.0.0.1:5000".into()),
            builder: Builder::of(["containerd/1.6.20", "docker/20.10.24 go/1.19"]),
            repositories: strings(&["s5/prebuild"]),
            no_cache_images: strings(&["s5/prebuild:v1"]),
            missed: strings(&["s5/prebuild:other"]),
            tags: [("s5/prebuild".to_owned(), Some(strings(&["v1"])))].into(),
            ..SessionFacts::default()
        };
        let e = explain(&facts);
        assert_eq!(e.builder, Builder::Docker);
        assert_eq!(e.useless_imports.len(), 1);
        let advice = &e.useless_imports[0].advice;
        assert!(
            advice.contains("127.0.0.1:5000/s5/prebuild:v1 is an image without cache metadata"),
            "{advice}"
        );
        assert!(advice.contains("BUILDKIT_INLINE_CACHE=1"), "{advice}");
        let text = e.text();
        let first_section = text.lines().nth(2).unwrap_or("");
        assert!(
            first_section.starts_with("Imported, but without cache"),
            "{text}"
        );
        assert!(!e.is_clean());
        // With cache obtained elsewhere, such images are most likely base images.
        facts.cache_imports = 1;
        let e = explain(&facts);
        assert!(e.useless_imports.is_empty());
        assert_eq!(e.images_without_cache, ["s5/prebuild:v1"]);
    }
}
