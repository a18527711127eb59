//! What one connection and one identity may hold: a deadline on request heads, a rate
//! of requests per identity, and a number of uploads in flight per identity. An
//! identity is a credential's subject and session, or, without one, a client address.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// The `[server.limits]` section.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// A request's head (request line and headers) must arrive within this, counted
    /// from when the connection is ready for it (idle connections included).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A request body that delivers no byte for this long while the server reads it
    /// fails, and what its request held (an upload's lock, an upload slot) is released.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Requests per second one identity may make, sustained [default: no limit].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<NonZeroU32>,
    /// Requests one identity may make at once above that rate [default: one second's].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<NonZeroU32>,
    /// Upload requests (blob bodies, chunks) one identity may have in flight at once.
    pub uploads_per_identity: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(60),
            requests_per_second: None,
            burst: None,
            uploads_per_identity: 64,
        }
    }
}

/// Why a request was turned away.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The identity is over its request rate.
    #[error("too many requests: at most {rate} per second")]
    Rate {
        /// The sustained rate.
        rate: u32,
        /// When a request would be admitted again.
        retry_after: Duration,
    },
    /// The identity has as many uploads in flight as it may.
    #[error("too many uploads in flight: at most {0} at once")]
    Uploads(usize),
}

impl Refusal {
    /// Whole seconds to wait before trying again (`Retry-After`).
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            Refusal::Rate { retry_after, .. } => retry_after.as_secs_f64().ceil().max(1.0) as u64,
            Refusal::Uploads(_) => 1,
        }
    }
}

/// Enforces [`Limits`] per identity.
pub struct Limiter {
    /// See [`Limits::body_read_timeout`].
    pub body_read_timeout: Duration,
    rate: Option<(u32, DefaultKeyedRateLimiter<String>)>,
    max_uploads: usize,
    uploads: Arc<Mutex<HashMap<String, usize>>>,
}

/// An upload in flight; counted until dropped.
#[must_use]
pub struct UploadSlot {
    uploads: Arc<Mutex<HashMap<String, usize>>>,
    key: String,
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut uploads = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = uploads.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                uploads.remove(&self.key);
            }
        }
    }
}

impl Limiter {
    /// A limiter enforcing `limits`.
    pub fn new(limits: &Limits) -> Limiter {
        let rate = limits.requests_per_second.map(|rate| {
            let quota = Quota::per_second(rate).allow_burst(limits.burst.unwrap_or(rate));
            (rate.get(), RateLimiter::keyed(quota))
        });
        Limiter {
            body_read_timeout: limits.body_read_timeout,
            rate,
            max_uploads: limits.uploads_per_identity,
            uploads: Arc::default(),
        }
    }

    /// Admit one request of `identity`.
    pub fn admit(&self, identity: &str) -> Result<(), Refusal> {
        let Some((rate, limiter)) = &self.rate else {
            return Ok(());
        };
        // Forget identities idle long enough to have a full bucket again, now and then.
        if limiter.len() > 10_000 {
            limiter.retain_recent();
        }
        limiter
            .check_key(&identity.to_owned())
            .map_err(|not_until| Refusal::Rate {
                rate: *rate,
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            })
    }

    /// Count one more upload of `identity` in flight, if it may have one.
    pub fn upload(&self, identity: &str) -> Result<Option<UploadSlot>, Refusal> {
        if self.max_uploads == 0 {
            return Ok(None);
        }
        let mut uploads = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        let count = uploads.entry(identity.to_owned()).or_default();
        if *count >= self.max_uploads {
            return Err(Refusal::Uploads(self.max_uploads));
        }
        *count += 1;
        Ok(Some(UploadSlot {
            uploads: Arc::clone(&self.uploads),
            key: identity.to_owned(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_and_a_retry_after() {
        let limiter = Limiter::new(&Limits {
            requests_per_second: NonZeroU32::new(2),
            burst: NonZeroU32::new(3),
            ..Limits::default()
        });
        for _ in 0..3 {
            limiter.admit("ci").unwrap();
        }
        let refusal = limiter.admit("ci").unwrap_err();
        assert!(matches!(refusal, Refusal::Rate { rate: 2, .. }));
        assert_eq!(refusal.retry_after_secs(), 1);
        limiter.admit("someone-else").unwrap();
    }

    #[test]
    fn uploads_in_flight_are_counted_until_they_end() {
        let limiter = Limiter::new(&Limits {
            uploads_per_identity: 2,
            ..Limits::default()
        });
        let first = limiter.upload("ci").unwrap();
        let _second = limiter.upload("ci").unwrap();
        assert!(limiter.upload("ci").is_err());
        assert!(limiter.upload("other").is_ok());
        drop(first);
        assert!(limiter.upload("ci").is_ok());
        assert!(Limiter::new(&Limits::default()).admit("x").is_ok());
    }
}
