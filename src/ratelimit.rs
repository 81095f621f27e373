//! Per-gateway-key rate limits (requests and tokens per minute), checked in
//! memory on the request path. A sliding window made of two fixed one-minute
//! buckets (the previous bucket weighted by how much of it still overlaps
//! the last 60 s), like nginx's and Cloudflare's approximations: O(1) memory
//! per key, no timers. Tokens are only known when a response ends, so they
//! are added afterwards and a key over its token budget is refused until the
//! window slides.

use parking_lot::Mutex;
use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
};

const SHARDS: usize = 16;

#[derive(Debug, Default, Clone, Copy)]
struct Window {
    minute: u64,
    requests: u64,
    tokens: u64,
    prev_requests: u64,
    prev_tokens: u64,
}

impl Window {
    fn roll(&mut self, minute: u64) {
        if minute == self.minute {
            return;
        }
        if minute == self.minute + 1 {
            self.prev_requests = self.requests;
            self.prev_tokens = self.tokens;
        } else {
            self.prev_requests = 0;
            self.prev_tokens = 0;
        }
        self.requests = 0;
        self.tokens = 0;
        self.minute = minute;
    }

    /// (requests, tokens) over the last 60 s, estimated.
    fn estimate(&self, frac_of_minute: f64) -> (f64, f64) {
        let weight = 1.0 - frac_of_minute;
        (
            self.prev_requests as f64 * weight + self.requests as f64,
            self.prev_tokens as f64 * weight + self.tokens as f64,
        )
    }
}

/// Limits for one scope; `None` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
}

impl Limits {
    pub fn is_none(&self) -> bool {
        self.rpm.is_none() && self.tpm.is_none()
    }
}

#[derive(Default)]
pub struct RateLimiter {
    shards: [Mutex<HashMap<String, Window>>; SHARDS],
}

fn shard_of(scope: &str) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    scope.hash(&mut h);
    (h.finish() as usize) % SHARDS
}

impl RateLimiter {
    /// Count a request against `scope` if `limits` allow it; otherwise the
    /// seconds after which to retry. `now_ms` is wall-clock milliseconds.
    pub fn admit(&self, scope: &str, limits: Limits, now_ms: u64) -> Result<(), u64> {
        if limits.is_none() {
            return Ok(());
        }
        let minute = now_ms / 60_000;
        let frac = (now_ms % 60_000) as f64 / 60_000.0;
        let retry_after = (60 - (now_ms % 60_000) / 1000).max(1);
        let mut map = self.shards[shard_of(scope)].lock();
        let w = map.entry(scope.to_string()).or_default();
        w.roll(minute);
        let (requests, tokens) = w.estimate(frac);
        if limits.rpm.is_some_and(|rpm| requests + 1.0 > rpm as f64)
            || limits.tpm.is_some_and(|tpm| tokens >= tpm as f64)
        {
            return Err(retry_after);
        }
        w.requests += 1;
        Ok(())
    }

    /// Add the tokens a finished request used.
    pub fn add_tokens(&self, scope: &str, tokens: u64, now_ms: u64) {
        let mut map = self.shards[shard_of(scope)].lock();
        if let Some(w) = map.get_mut(scope) {
            w.roll(now_ms / 60_000);
            w.tokens += tokens;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_per_minute_with_a_sliding_window() {
        let rl = RateLimiter::default();
        let lim = Limits {
            rpm: Some(3),
            tpm: None,
        };
        let t0 = 600_000; // start of a minute
        for _ in 0..3 {
            assert!(rl.admit("k", lim, t0).is_ok());
        }
        assert_eq!(rl.admit("k", lim, t0 + 10_000), Err(50));
        // Half a minute into the next one, half the previous minute still counts: 1.5 + 1 > 3? no -> ok once.
        assert!(rl.admit("k", lim, t0 + 90_000).is_ok());
        assert!(rl.admit("k", lim, t0 + 90_000).is_err());
        // Two minutes later everything has slid out.
        assert!(rl.admit("k", lim, t0 + 180_000).is_ok());
        assert!(rl.admit("other", lim, t0).is_ok(), "scopes are independent");
    }

    #[test]
    fn tokens_per_minute_are_charged_after_the_fact() {
        let rl = RateLimiter::default();
        let lim = Limits {
            rpm: None,
            tpm: Some(100),
        };
        let t0 = 1_200_000;
        assert!(rl.admit("k", lim, t0).is_ok());
        rl.add_tokens("k", 150, t0 + 1_000);
        assert!(rl.admit("k", lim, t0 + 2_000).is_err());
        assert!(rl.admit("k", lim, t0 + 130_000).is_ok());
        assert!(rl.admit("k", Limits::default(), t0).is_ok());
    }
}

/// Tokens used per key in its current quota period (day or month, UTC).
/// Seeded from the audit log (so restarts keep the count) and then counted
/// in memory as responses finish.
#[derive(Default)]
pub struct QuotaTracker {
    used: Mutex<HashMap<String, (i64, u64)>>,
}

impl QuotaTracker {
    /// Whether `key` is still within `quota` in the period starting at
    /// `period_start`; else the seconds until `period_end`.
    pub fn check(&self, key: &str, quota: u64, (period_start, period_end): (i64, i64), now_ms: i64) -> Result<(), u64> {
        let used = self
            .used
            .lock()
            .get(key)
            .filter(|(start, _)| *start == period_start)
            .map_or(0, |(_, u)| *u);
        if used >= quota {
            return Err(((period_end - now_ms) / 1000).max(1) as u64);
        }
        Ok(())
    }

    pub fn add(&self, key: &str, period_start: i64, tokens: u64) {
        let mut map = self.used.lock();
        let entry = map.entry(key.to_string()).or_insert((period_start, 0));
        if entry.0 != period_start {
            *entry = (period_start, 0);
        }
        entry.1 += tokens;
    }

    /// Whether `key` already has a count for the period starting at `period_start`.
    pub fn is_seeded(&self, key: &str, period_start: i64) -> bool {
        self.used.lock().get(key).is_some_and(|(s, _)| *s == period_start)
    }

    /// Set the count from the audit log (keeps whatever is larger).
    pub fn seed(&self, key: &str, period_start: i64, used: u64) {
        let mut map = self.used.lock();
        let entry = map.entry(key.to_string()).or_insert((period_start, 0));
        if entry.0 != period_start {
            *entry = (period_start, used);
        } else {
            entry.1 = entry.1.max(used);
        }
    }
}

#[cfg(test)]
mod quota_tests {
    use super::*;

    #[test]
    fn quota_resets_with_the_period() {
        let q = QuotaTracker::default();
        let day = (86_400_000, 2 * 86_400_000);
        assert!(q.check("k", 100, day, day.0 + 5).is_ok());
        q.add("k", day.0, 60);
        q.seed("k", day.0, 40);
        assert!(q.check("k", 100, day, day.0 + 5).is_ok());
        q.add("k", day.0, 40);
        assert_eq!(q.check("k", 100, day, day.1 - 10_000), Err(10));
        let next = (day.1, day.1 + 86_400_000);
        assert!(q.check("k", 100, next, next.0 + 1).is_ok());
    }
}
