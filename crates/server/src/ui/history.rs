//! The store's usage over time: a sample of stored bytes and the quota every
//! [`SAMPLE_INTERVAL`], kept in memory for [`KEEP`] (the dashboard's first plot). It
//! starts empty at each start of the server.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::Serialize;
use store::Store;

/// How often usage is sampled.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(10);
/// How long samples are kept.
pub const KEEP: Duration = Duration::from_secs(24 * 3600);
/// Most samples kept: [`KEEP`] at one per [`SAMPLE_INTERVAL`].
pub const CAPACITY: usize = (KEEP.as_secs() / SAMPLE_INTERVAL.as_secs()) as usize;

/// The store's usage and quota at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UsageSample {
    /// When, in seconds since the epoch.
    pub at: i64,
    /// Bytes the store used (blobs, uploads, metadata).
    pub total: u64,
    /// Of which blobs.
    pub blob_bytes: u64,
    /// Of the blobs, bytes released and waiting to be swept.
    pub released_bytes: u64,
    /// What the last pass could not free because every root left was in use or pinned.
    pub shortfall: u64,
    /// The quota's limit.
    pub limit: u64,
    /// Usage at which eviction starts.
    pub high: u64,
    /// Usage eviction brings the store down to.
    pub low: u64,
}

/// The samples of the last [`KEEP`], oldest first.
pub struct UsageHistory {
    samples: Mutex<VecDeque<UsageSample>>,
    store: Store,
}

impl UsageHistory {
    /// Sample `store` now and every [`SAMPLE_INTERVAL`] while the history lives.
    pub fn start(store: Store) -> Arc<UsageHistory> {
        let history = Arc::new(UsageHistory::new(store));
        tokio::spawn(sample_in_background(Arc::downgrade(&history)));
        history
    }

    /// An empty history of `store`, sampled only when told.
    fn new(store: Store) -> UsageHistory {
        UsageHistory {
            samples: Mutex::new(VecDeque::with_capacity(CAPACITY)),
            store,
        }
    }

    /// Sample the store's usage now.
    pub async fn sample(&self) -> store::Result<UsageSample> {
        let (usage, quota) = self.store.usage().await?;
        let sample = UsageSample {
            at: crate::now_ms() / 1000,
            total: usage.total,
            blob_bytes: usage.blob_bytes,
            released_bytes: usage.released_bytes,
            shortfall: self.store.last_gc().map_or(0, |pass| pass.shortfall),
            limit: quota.limit,
            high: quota.high,
            low: quota.low,
        };
        self.record(sample);
        Ok(sample)
    }

    /// Add `sample`, dropping those older than [`KEEP`] before it and the oldest past
    /// [`CAPACITY`].
    fn record(&self, sample: UsageSample) {
        let oldest = sample.at - KEEP.as_secs() as i64;
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        while samples
            .front()
            .is_some_and(|s| s.at < oldest || samples.len() >= CAPACITY)
        {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// Samples taken at or after `since` (seconds since the epoch), oldest first, at most
    /// `points` of them: when there are more, consecutive samples are merged (the latest
    /// time and quota, the highest usage and shortfall, so peaks stay visible).
    pub fn since(&self, since: i64, points: usize) -> Vec<UsageSample> {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let recent: Vec<UsageSample> = samples.iter().filter(|s| s.at >= since).copied().collect();
        drop(samples);
        merge(recent, points.max(1))
    }
}

/// `samples` merged into at most `points`, keeping the most recent ones whole.
fn merge(samples: Vec<UsageSample>, points: usize) -> Vec<UsageSample> {
    if samples.len() <= points {
        return samples;
    }
    let per_point = samples.len().div_ceil(points);
    // Group from the newest so the last point is the latest sample on its own
    // when the count does not divide evenly.
    let mut merged: Vec<UsageSample> = samples
        .rchunks(per_point)
        .filter_map(|group| {
            let last = *group.last()?;
            Some(UsageSample {
                total: group.iter().map(|s| s.total).max().unwrap_or(last.total),
                blob_bytes: group
                    .iter()
                    .map(|s| s.blob_bytes)
                    .max()
                    .unwrap_or(last.blob_bytes),
                released_bytes: group
                    .iter()
                    .map(|s| s.released_bytes)
                    .max()
                    .unwrap_or(last.released_bytes),
                shortfall: group
                    .iter()
                    .map(|s| s.shortfall)
                    .max()
                    .unwrap_or(last.shortfall),
                ..last
            })
        })
        .collect();
    merged.reverse();
    merged
}

/// Sample every [`SAMPLE_INTERVAL`] (the first at once) while the history lives.
async fn sample_in_background(history: Weak<UsageHistory>) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(history) = history.upgrade() else {
            return;
        };
        if let Err(e) = history.sample().await {
            tracing::warn!(error = %e, "sampling the store's usage failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: i64, total: u64) -> UsageSample {
        UsageSample {
            at,
            total,
            blob_bytes: total,
            released_bytes: 0,
            shortfall: 0,
            limit: 1000,
            high: 900,
            low: 800,
        }
    }

    async fn history() -> (UsageHistory, tempfile::TempDir) {
        let (store, dir) = crate::temporary_store().await;
        (UsageHistory::new(store), dir)
    }

    #[tokio::test]
    async fn samples_older_than_a_day_or_past_the_capacity_are_dropped() {
        let (history, _dir) = history().await;
        let day = KEEP.as_secs() as i64;
        history.record(sample(0, 1));
        history.record(sample(10, 2));
        history.record(sample(day + 5, 3));
        let kept: Vec<i64> = history.since(0, usize::MAX).iter().map(|s| s.at).collect();
        assert_eq!(kept, [10, day + 5]);
        for i in 0..CAPACITY as i64 + 5 {
            history.record(sample(day + 10 + i, 4));
        }
        let all = history.since(0, usize::MAX);
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(all.last().unwrap().at, day + 10 + CAPACITY as i64 + 4);
    }

    #[tokio::test]
    async fn a_sample_reads_the_stores_usage_and_quota() {
        let (history, _dir) = history().await;
        let taken = history.sample().await.unwrap();
        assert!(taken.total > 0, "the metadata database takes room");
        assert!(taken.limit >= taken.high && taken.high >= taken.low);
        assert_eq!(history.since(taken.at, 10), [taken]);
        assert!(history.since(taken.at + 1, 10).is_empty());
    }

    #[test]
    fn merging_keeps_peaks_and_the_latest_sample() {
        let samples: Vec<UsageSample> =
            (0..10).map(|i| sample(i, [1, 9][i as usize % 2])).collect();
        let merged = merge(samples.clone(), 3);
        // 10 samples into groups of 4 from the newest: [0,1], [2..=5], [6..=9].
        let at: Vec<i64> = merged.iter().map(|s| s.at).collect();
        assert_eq!(at, [1, 5, 9]);
        assert!(merged.iter().all(|s| s.total == 9));
        assert_eq!(merge(samples.clone(), 10), samples);
    }
}
