//! `explain --session`: gather the facts about one build session from a layercache
//! server (the session, the tags of the repositories it missed in, the catalog, the
//! last eviction pass, and which other repositories held the blobs it uploaded before
//! it), within fixed bounds on the requests made.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use anyhow::{Context, bail};
use diagnose::explain::session::{
    BlobElsewhere, EvictedRoot, SessionFacts, nearest, repository_of,
};

use super::registry::Registry;

/// Most tags listed per repository, and repositories from the catalog.
const MAX_LISTED: usize = 10_000;
/// Most tags near a missed one checked for cache records.
const CACHE_CHECKS: usize = 10;
/// Most blobs looked for in other repositories.
const MAX_BLOBS: usize = 200;
/// Most other repositories a blob is looked for in.
const MAX_REPOS: usize = 100;
/// Most blob checks (`HEAD`) in all.
const MAX_CHECKS: usize = 2_000;
/// Blob checks in flight at once.
const PARALLEL: usize = 16;

/// The facts about session `name` (its name or id) on the layercache server at `server`.
pub async fn gather(server: &str, name: &str) -> anyhow::Result<SessionFacts> {
    let sessions = crate::commands::sessions(server, 0, None, Some(name)).await?;
    if sessions.is_empty() {
        bail!(
            "no build session named {name:?} (nor with that id) on {server}: `layercache \
             report --since 1d` lists the recent ones"
        );
    }
    let mut repositories = BTreeSet::new();
    let mut missed: Vec<String> = Vec::new();
    let mut written = BTreeSet::new();
    // A named session may have closed and reopened: take every one of that name.
    for session in &sessions {
        repositories.extend(session.repositories.iter().cloned());
        for m in &session.missed {
            if !missed.contains(m) {
                missed.push(m.clone());
            }
        }
        written.extend(
            session
                .written
                .iter()
                .filter(|w| w.parse::<oci::Digest>().is_ok())
                .cloned(),
        );
    }
    let registry = Arc::new(Registry::new(server)?);
    let mut no_cache_images: Vec<String> = Vec::new();
    for image in sessions.iter().flat_map(|s| &s.no_cache_images) {
        if !no_cache_images.contains(image) {
            no_cache_images.push(image.clone());
        }
    }
    let mut facts = SessionFacts {
        session: name.to_owned(),
        host: crate::commands::host_of(&sessions).or_else(|| Some(registry.host().to_owned())),
        builder: crate::commands::builder_of(&sessions),
        cache_imports: sessions.iter().map(|s| s.counts.cache_imports).sum(),
        no_cache_images,
        repositories: repositories.iter().cloned().collect(),
        missed: missed.clone(),
        ..SessionFacts::default()
    };

    let asked: BTreeSet<String> = missed.iter().filter_map(|m| repository_of(m)).collect();
    for repo in asked {
        let tags = registry
            .tags(&repo, MAX_LISTED)
            .await
            .with_context(|| format!("listing the tags of {repo}"))?;
        // Which of the tags nearest to those missed carry cache, so advice names one.
        let candidates: BTreeSet<String> = missed
            .iter()
            .filter_map(|m| m.strip_prefix(&format!("{repo}:")))
            .flat_map(|tag| nearest(tag, tags.as_deref().unwrap_or_default(), CACHE_CHECKS))
            .collect();
        for tag in candidates {
            if let Some(has) = registry.has_cache(&repo, &tag).await? {
                facts.tag_has_cache.insert(format!("{repo}:{tag}"), has);
            }
        }
        facts.tags.insert(repo, tags);
    }
    match registry.catalog(MAX_LISTED).await {
        Ok(catalog) => facts.catalog = catalog,
        Err(e) => facts.limits.push(format!(
            "the catalog could not be listed ({e:#}): other repositories were not searched"
        )),
    }

    #[derive(serde::Deserialize)]
    struct GcStatus {
        last_pass: Option<LastPass>,
    }
    #[derive(serde::Deserialize)]
    struct LastPass {
        started_at: i64,
        #[serde(default)]
        evicted: Vec<EvictedRoot>,
    }
    let gc: GcStatus = serde_json::from_slice(&registry.api("/api/v1/gc").await?)
        .context("reading the server's eviction report")?;
    if let Some(pass) = gc.last_pass {
        facts.last_gc = Some(pass.started_at);
        facts.evicted = pass.evicted;
    }

    let missing: Vec<String> = missed
        .iter()
        .filter(|m| m.parse::<oci::Digest>().is_ok())
        .cloned()
        .collect();
    let mut others: Vec<String> = facts
        .catalog
        .iter()
        .filter(|r| !repositories.contains(*r))
        .cloned()
        .collect();
    if others.len() > MAX_REPOS {
        facts.limits.push(format!(
            "blobs were looked for in {MAX_REPOS} of the {} other repositories only",
            others.len()
        ));
        others.truncate(MAX_REPOS);
    }
    let mut blobs: Vec<String> = written.iter().cloned().collect();
    blobs.extend(missing.iter().cloned());
    if blobs.len() > MAX_BLOBS {
        facts.limits.push(format!(
            "only the first {MAX_BLOBS} of {} blobs were looked for elsewhere",
            blobs.len()
        ));
        blobs.truncate(MAX_BLOBS);
    }
    let mut found = find_elsewhere(&registry, &blobs, &others, &mut facts.limits).await;
    // A repository that received the blob after this build started (a later push, or a
    // mount from this very build's repository) did not hold it when the build uploaded.
    let started_ms = sessions.iter().map(|s| s.started_ms).min().unwrap_or(0);
    let ours: BTreeSet<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
    let later = crate::commands::sessions(server, started_ms / 1000, None, None).await?;
    let arrived: BTreeSet<(&str, &str)> = later
        .iter()
        .filter(|s| !ours.contains(s.id.as_str()) && s.started_ms >= started_ms)
        .flat_map(|s| {
            s.repositories.iter().flat_map(move |r| {
                s.written
                    .iter()
                    .chain(&s.avoided)
                    .map(move |d| (r.as_str(), d.as_str()))
            })
        })
        .collect();
    for (digest, (_, repos)) in found.iter_mut() {
        repos.retain(|r| !arrived.contains(&(r.as_str(), digest.as_str())));
    }
    found.retain(|_, (_, repos)| !repos.is_empty());
    for (digest, (size, repos)) in found {
        let entry = BlobElsewhere {
            digest: digest.clone(),
            size,
            repositories: repos,
        };
        if written.contains(&digest) {
            facts.uploaded_elsewhere.push(entry);
        } else {
            facts.missing_elsewhere.push(entry);
        }
    }
    Ok(facts)
}

/// For each blob, the other repositories holding it (and its size), checking at most
/// [`MAX_CHECKS`] pairs, [`PARALLEL`] at a time.
async fn find_elsewhere(
    registry: &Arc<Registry>,
    blobs: &[String],
    repos: &[String],
    limits: &mut Vec<String>,
) -> BTreeMap<String, (Option<u64>, Vec<String>)> {
    let mut pairs: Vec<(String, String)> = blobs
        .iter()
        .flat_map(|b| repos.iter().map(move |r| (b.clone(), r.clone())))
        .collect();
    if pairs.len() > MAX_CHECKS {
        limits.push(format!(
            "{} of {} blob checks were made",
            MAX_CHECKS,
            pairs.len()
        ));
        pairs.truncate(MAX_CHECKS);
    }
    let mut found: BTreeMap<String, (Option<u64>, Vec<String>)> = BTreeMap::new();
    let mut failures = 0usize;
    let mut pending = pairs.into_iter();
    let mut running = tokio::task::JoinSet::new();
    loop {
        while running.len() < PARALLEL {
            let Some((digest, repo)) = pending.next() else {
                break;
            };
            let registry = Arc::clone(registry);
            running.spawn(async move {
                let size = registry.blob_size(&repo, &digest).await;
                (digest, repo, size)
            });
        }
        let Some(done) = running.join_next().await else {
            break;
        };
        match done {
            Ok((digest, repo, Ok(Some(size)))) => {
                let entry = found.entry(digest).or_insert((Some(size), Vec::new()));
                entry.1.push(repo);
            }
            Ok((_, _, Ok(None))) => {}
            Ok((_, _, Err(_))) | Err(_) => failures += 1,
        }
    }
    if failures > 0 {
        limits.push(format!("{failures} blob check(s) failed"));
    }
    found
}
