//! Figures computed from build sessions and the store's per-repository usage: the hit
//! ratio of each repository over time, and what each repository holds and served.
//!
//! A session counts toward every repository it touched: sessions a client names may
//! span repositories, and their counts are not kept per repository. Implicit sessions
//! (the usual case) have one repository each, so for them the figures are exact.

use std::collections::BTreeMap;

use serde::Serialize;
use store::RepoUsage;

use crate::sessions::Session;

/// Smallest bucket of the hit-ratio series, in seconds.
pub const MIN_BUCKET: i64 = 10;
/// Largest bucket of the hit-ratio series, in seconds.
pub const MAX_BUCKET: i64 = 24 * 3600;

/// Manifest lookups of one repository in one time bucket.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HitRatioPoint {
    /// Start of the bucket, in seconds since the epoch.
    pub at: i64,
    /// Lookups that found the manifest.
    pub hits: u64,
    /// Lookups that did not.
    pub misses: u64,
    /// `hits / (hits + misses)`.
    pub ratio: f64,
}

/// One repository's hit ratio over time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RepoHitRatio {
    /// The repository.
    pub repo: String,
    /// Lookups in all its buckets.
    pub lookups: u64,
    /// Its buckets with lookups, oldest first.
    pub points: Vec<HitRatioPoint>,
}

/// The hit ratio of each repository over time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HitRatios {
    /// Width of a bucket, in seconds.
    pub bucket: i64,
    /// Repositories with lookups, most lookups first.
    pub repositories: Vec<RepoHitRatio>,
}

/// A bucket width that gives a readable series over `span` seconds: a minute up to two
/// hours, five minutes up to twelve, an hour beyond.
pub fn auto_bucket(span: i64) -> i64 {
    if span <= 2 * 3600 {
        60
    } else if span <= 12 * 3600 {
        300
    } else {
        3600
    }
}

/// The manifest hit ratio of each repository in `sessions`, in buckets of `bucket`
/// seconds by the time each session ended (when `None`, one chosen from the span the
/// sessions cover, see [`auto_bucket`]). Sessions without lookups count nowhere.
pub fn hit_ratios(sessions: &[Session], bucket: Option<i64>, now_ms: i64) -> HitRatios {
    let with_lookups = || {
        sessions
            .iter()
            .filter(|s| s.counts.hits() + s.counts.misses() > 0)
    };
    let bucket = bucket
        .unwrap_or_else(|| {
            let oldest = with_lookups().map(|s| s.ended_ms).min().unwrap_or(now_ms);
            auto_bucket((now_ms - oldest) / 1000)
        })
        .clamp(MIN_BUCKET, MAX_BUCKET);
    let mut counts: BTreeMap<&str, BTreeMap<i64, (u64, u64)>> = BTreeMap::new();
    for session in with_lookups() {
        let at = (session.ended_ms / 1000).div_euclid(bucket) * bucket;
        for repo in &session.repositories {
            let used = session.counts_in(repo);
            if used.hits() + used.misses() == 0 {
                continue;
            }
            let slot = counts.entry(repo).or_default().entry(at).or_default();
            slot.0 += used.hits();
            slot.1 += used.misses();
        }
    }
    let mut repositories: Vec<RepoHitRatio> = counts
        .into_iter()
        .map(|(repo, buckets)| {
            let points: Vec<HitRatioPoint> = buckets
                .into_iter()
                .map(|(at, (hits, misses))| HitRatioPoint {
                    at,
                    hits,
                    misses,
                    ratio: hits as f64 / (hits + misses).max(1) as f64,
                })
                .collect();
            RepoHitRatio {
                repo: repo.to_owned(),
                lookups: points.iter().map(|p| p.hits + p.misses).sum(),
                points,
            }
        })
        .collect();
    repositories.sort_by(|a, b| b.lookups.cmp(&a.lookups).then(a.repo.cmp(&b.repo)));
    HitRatios {
        bucket,
        repositories,
    }
}

/// What one repository holds, and what build sessions asked of it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RepoStats {
    /// The repository.
    pub repo: String,
    /// Blobs linked into it.
    pub blobs: u64,
    /// Their bytes.
    pub blob_bytes: u64,
    /// Manifests stored in it.
    pub manifests: u64,
    /// Blob and manifest bytes it holds (a blob shared with other repositories counts
    /// in each).
    pub stored_bytes: u64,
    /// Sessions that touched it.
    pub sessions: u64,
    /// Blob bytes those sessions downloaded.
    pub bytes_served: u64,
    /// Blob bytes they uploaded.
    pub bytes_written: u64,
    /// Bytes they did not have to upload.
    pub bytes_avoided: u64,
    /// Their manifest lookups that found the manifest.
    pub hits: u64,
    /// Those that did not.
    pub misses: u64,
    /// `hits / (hits + misses)`, if there were lookups.
    pub hit_ratio: Option<f64>,
    /// The last request of those sessions, in milliseconds since the epoch.
    pub last_used_ms: Option<i64>,
}

/// Every repository that holds something or that `sessions` touched, largest first.
pub fn repositories(usage: Vec<RepoUsage>, sessions: &[Session]) -> Vec<RepoStats> {
    let mut stats: BTreeMap<String, RepoStats> = BTreeMap::new();
    for held in usage {
        let repo = held.repo.to_string();
        stats.insert(
            repo.clone(),
            RepoStats {
                repo,
                blobs: held.blobs,
                blob_bytes: held.blob_bytes,
                manifests: held.manifests,
                stored_bytes: held.blob_bytes + held.manifest_bytes,
                ..RepoStats::default()
            },
        );
    }
    for session in sessions {
        for repo in &session.repositories {
            let entry = stats.entry(repo.clone()).or_insert_with(|| RepoStats {
                repo: repo.clone(),
                ..RepoStats::default()
            });
            let used = session.counts_in(repo);
            entry.sessions += 1;
            entry.bytes_served += used.bytes_served;
            entry.bytes_written += used.bytes_written;
            entry.bytes_avoided += used.bytes_avoided;
            entry.hits += used.hits();
            entry.misses += used.misses();
            entry.last_used_ms = entry.last_used_ms.max(Some(session.ended_ms));
        }
    }
    let mut stats: Vec<RepoStats> = stats
        .into_values()
        .map(|mut s| {
            let lookups = s.hits + s.misses;
            s.hit_ratio = (lookups > 0).then(|| s.hits as f64 / lookups as f64);
            s
        })
        .collect();
    stats.sort_by(|a, b| {
        b.stored_bytes
            .cmp(&a.stored_bytes)
            .then(b.bytes_served.cmp(&a.bytes_served))
            .then(a.repo.cmp(&b.repo))
    });
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(repos: &[&str], ended_s: i64, hits: u64, misses: u64, served: u64) -> Session {
        // Built field by field: a session has fields only the recorder sets.
        let mut session = Session::default();
        session.id = format!("s{ended_s}");
        session.ended_ms = ended_s * 1000 + 500;
        session.repositories = repos.iter().map(|r| r.to_string()).collect();
        session.counts.manifest_hits = hits;
        session.counts.manifest_misses = misses;
        session.counts.bytes_served = served;
        session
    }

    #[test]
    fn hit_ratios_are_bucketed_by_session_end_per_repository() {
        let sessions = [
            session(&["cache/app"], 3600, 1, 3, 0),
            session(&["cache/app"], 3700, 3, 1, 0),
            session(&["cache/app"], 7300, 4, 0, 0),
            session(&["cache/lib", "cache/app"], 7400, 1, 1, 0),
            // No lookups (a push): no point.
            session(&["cache/tool"], 7400, 0, 0, 0),
        ];
        let ratios = hit_ratios(&sessions, Some(3600), 8000 * 1000);
        assert_eq!(ratios.bucket, 3600);
        let repos: Vec<&str> = ratios
            .repositories
            .iter()
            .map(|r| r.repo.as_str())
            .collect();
        assert_eq!(repos, ["cache/app", "cache/lib"]);
        let app = &ratios.repositories[0];
        assert_eq!(app.lookups, 14);
        let points: Vec<(i64, u64, u64, f64)> = app
            .points
            .iter()
            .map(|p| (p.at, p.hits, p.misses, p.ratio))
            .collect();
        assert_eq!(points, [(3600, 4, 4, 0.5), (7200, 5, 1, 5.0 / 6.0)]);
        assert_eq!(ratios.repositories[1].points[0].ratio, 0.5);
    }

    #[test]
    fn the_bucket_follows_the_span_unless_given_and_stays_in_bounds() {
        let now = 100_000 * 1000;
        let recent = [session(&["a"], 100_000 - 600, 1, 0, 0)];
        assert_eq!(hit_ratios(&recent, None, now).bucket, 60);
        let older = [session(&["a"], 100_000 - 20_000, 1, 0, 0)];
        assert_eq!(hit_ratios(&older, None, now).bucket, 300);
        let oldest = [session(&["a"], 0, 1, 0, 0)];
        assert_eq!(hit_ratios(&oldest, None, now).bucket, 3600);
        assert_eq!(hit_ratios(&[], None, now).bucket, 60);
        assert_eq!(hit_ratios(&recent, Some(1), now).bucket, MIN_BUCKET);
        assert_eq!(hit_ratios(&recent, Some(i64::MAX), now).bucket, MAX_BUCKET);
    }

    #[test]
    fn repositories_join_what_is_stored_with_what_sessions_read() {
        let usage = vec![RepoUsage {
            repo: "cache/app".parse().unwrap(),
            blobs: 3,
            blob_bytes: 1000,
            manifests: 1,
            manifest_bytes: 24,
        }];
        let sessions = [
            session(&["cache/app"], 10, 2, 2, 500),
            session(&["cache/app", "cache/gone"], 20, 1, 0, 300),
        ];
        let stats = repositories(usage, &sessions);
        assert_eq!(stats.len(), 2);
        let app = &stats[0];
        assert_eq!(app.repo, "cache/app");
        assert_eq!((app.blobs, app.stored_bytes, app.manifests), (3, 1024, 1));
        assert_eq!(
            (app.sessions, app.bytes_served, app.hits, app.misses),
            (2, 800, 3, 2)
        );
        assert_eq!(app.hit_ratio, Some(0.6));
        assert_eq!(app.last_used_ms, Some(20_500));
        // Read but no longer stored (evicted): still listed, holding nothing.
        let gone = &stats[1];
        assert_eq!(gone.repo, "cache/gone");
        assert_eq!(
            (gone.stored_bytes, gone.bytes_served, gone.sessions),
            (0, 300, 1)
        );
        assert_eq!(gone.hit_ratio, Some(1.0));
    }
}
