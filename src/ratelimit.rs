//! Per-gateway-key rate limits (requests and tokens per minute), checked in
//! memory on the request path. A sliding window made of two fixed one-minute
//! buckets (the previous bucket weighted by how much of it still overlaps
//! the last 60 s), like nginx's and Cloudflare's approximations: O(1) memory
//! per key, no timers. Tokens are only known when a response ends, so they
//! are added afterwards and a key over its token budget is refused until the
//! window slides.
//!
//! Scopes come and go (per-client-address limits on `auth: none` routes see
//! a new scope per address; IPv6 makes that endless): a scope whose both
//! buckets are over counts nothing, so [`RateLimiter::sweep`] forgets it
//! (run by the upkeep task, a shard at a time; never on the request path).

pub use crate::budget::{BudgetCheck, BudgetOf};
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

    /// Whether the window counts nothing at `minute` (both buckets are
    /// over): forgetting it changes no decision.
    fn is_idle(&self, minute: u64) -> bool {
        minute > self.minute.saturating_add(1)
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

impl Limits {
    /// This node's share when `nodes` share the limits without a common
    /// counter (cluster mode while Redis is down): at least 1.
    pub fn share(self, nodes: u32) -> Limits {
        let part = |v: u64| v.div_ceil(u64::from(nodes.max(1))).max(1);
        Limits {
            rpm: self.rpm.map(part),
            tpm: self.tpm.map(part),
        }
    }
}

/// Every limit one request is counted against, named for the 429 it
/// causes. Built once at admission, kept with the request, and used again to
/// charge its tokens, so the local limiter and the cluster's shared one
/// count the same scopes.
#[derive(Debug, Clone, Default)]
pub struct RateChecks {
    pub windows: Vec<WindowCheck>,
    pub quotas: Vec<QuotaCheck>,
    pub budgets: Vec<BudgetCheck>,
    /// What the request may cost, in micro-units: reserved against each
    /// budget (cut to it) until its cost is known.
    pub cost_reserve: u64,
}

/// Which limit a check is: how a 429 names it, worded only when one is
/// sent (admission stays free of formatting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// The gateway key's own rpm/tpm.
    Key,
    /// The route's per-key `rate_limit`.
    Route,
    /// The route's `rate_limit` per client address (no gateway key).
    RoutePerClient,
    /// The key's token quota.
    Quota(crate::store::keys::QuotaPeriod),
    /// The key owner's token quota.
    OwnerQuota(crate::store::keys::QuotaPeriod),
    /// A budget in money, on whose it is.
    Budget(BudgetOf, crate::budget::BudgetPeriod),
}

impl Limited {
    /// How a 429 names `budget`.
    pub fn of_budget(budget: &BudgetCheck) -> Limited {
        Limited::Budget(budget.of, budget.kind)
    }

    /// The scope named in the 429, on `route`.
    pub fn describe(self, route: &str) -> String {
        match self {
            Limited::Key => "key".into(),
            Limited::Route => format!("route {route}"),
            Limited::RoutePerClient => format!("route {route} per client address"),
            Limited::Quota(p) => format!("token quota per {}", p.as_str()),
            Limited::OwnerQuota(p) => format!("the owner's token quota per {}", p.as_str()),
            Limited::Budget(BudgetOf::Key, p) => format!("key budget per {}", p.as_str()),
            Limited::Budget(BudgetOf::Owner, p) => format!("the owner's budget per {}", p.as_str()),
            Limited::Budget(BudgetOf::Route, p) => format!("route {route} budget per {}", p.as_str()),
        }
    }
}

/// Requests and tokens in the rolling window, per scope.
#[derive(Debug, Clone)]
pub struct WindowCheck {
    pub scope: String,
    pub limits: Limits,
    pub label: Limited,
}

/// Tokens per quota period (day or month), per scope.
#[derive(Debug, Clone)]
pub struct QuotaCheck {
    pub scope: String,
    pub tokens: u64,
    /// Unix ms: [start, end) of the current period.
    pub period: (i64, i64),
    pub label: Limited,
}

impl RateChecks {
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty() && self.quotas.is_empty() && self.budgets.is_empty()
    }

    /// Whether any window counts tokens (a reservation is worth estimating).
    pub fn counts_tokens(&self) -> bool {
        self.windows.iter().any(|w| w.limits.tpm.is_some())
    }
}

/// How a request was counted; its tokens are charged the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// In Redis, across the cluster: the admission's op and token bucket,
    /// which its settlement adjusts.
    Shared(Ticket),
    /// On this node alone (no cluster, or Redis down).
    Local,
}

/// What a shared (cluster) admission took, kept with the request for its settlement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// The token bucket the reservation went to (Redis's answer).
    pub bucket: i64,
    /// Tokens reserved (before each `tpm`'s clamp to its limit).
    pub reserve: u64,
}

/// The checks a request passed and how: kept with the request until its
/// tokens are known.
#[derive(Debug, Clone)]
pub struct Admission {
    pub checks: RateChecks,
    pub counted: Counted,
}

/// Which check refused a request, and when to retry (seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub label: Limited,
    pub retry_after: u64,
}

pub struct RateLimiter {
    shards: [Mutex<HashMap<String, Window>>; SHARDS],
    window_ms: u64,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::with_window(60_000)
    }
}

fn shard_of(scope: &str) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    scope.hash(&mut h);
    (h.finish() as usize) % SHARDS
}

impl RateLimiter {
    /// A limiter whose "per minute" window is `window_ms` long (cluster
    /// mode's `rate_window`, so the fallback counts the same window).
    pub fn with_window(window_ms: u64) -> Self {
        RateLimiter {
            shards: Default::default(),
            window_ms: window_ms.max(1000),
        }
    }

    /// Admit a request against every check, each limit divided among
    /// `nodes`: quotas first, then the windows, in order (the first refusal
    /// wins; earlier windows keep their count, as two separate checks would).
    pub fn admit_all(
        &self,
        (quotas, budgets): (&QuotaTracker, &crate::budget::BudgetTracker),
        checks: &RateChecks,
        nodes: u32,
        now_ms: u64,
    ) -> Result<(), Refusal> {
        let nodes = u64::from(nodes.max(1));
        for q in &checks.quotas {
            quotas
                .check(&q.scope, q.tokens.div_ceil(nodes).max(1), q.period, now_ms as i64)
                .map_err(|retry_after| Refusal {
                    label: q.label,
                    retry_after,
                })?;
        }
        for w in &checks.windows {
            self.admit(&w.scope, w.limits.share(nodes as u32), now_ms)
                .map_err(|retry_after| Refusal {
                    label: w.label,
                    retry_after,
                })?;
        }
        // Budgets last, all or none: a reservation is only taken by a
        // request that goes ahead.
        budgets
            .admit_all(&checks.budgets, checks.cost_reserve, nodes, now_ms as i64)
            .map_err(|(i, retry_after)| Refusal {
                label: Limited::of_budget(&checks.budgets[i]),
                retry_after,
            })
    }

    /// Charge a finished request's tokens to every check it was admitted by.
    pub fn charge_all(&self, quotas: &QuotaTracker, checks: &RateChecks, tokens: u64, now_ms: u64) {
        if tokens == 0 {
            return;
        }
        for w in checks.windows.iter().filter(|w| w.limits.tpm.is_some()) {
            self.add_tokens(&w.scope, tokens, now_ms);
        }
        for q in &checks.quotas {
            quotas.add(&q.scope, q.period.0, tokens);
        }
    }

    /// Count a request against `scope` if `limits` allow it; otherwise the
    /// seconds after which to retry. `now_ms` is wall-clock milliseconds.
    pub fn admit(&self, scope: &str, limits: Limits, now_ms: u64) -> Result<(), u64> {
        if limits.is_none() {
            return Ok(());
        }
        let w_ms = self.window_ms;
        let minute = now_ms / w_ms;
        let frac = (now_ms % w_ms) as f64 / w_ms as f64;
        let retry_after = ((w_ms - now_ms % w_ms) / 1000).max(1);
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

    /// Add the tokens a finished request used (to a scope swept while the
    /// request ran, too: a long stream's tokens still count).
    pub fn add_tokens(&self, scope: &str, tokens: u64, now_ms: u64) {
        let mut map = self.shards[shard_of(scope)].lock();
        let w = match map.get_mut(scope) {
            Some(w) => w,
            None => map.entry(scope.to_string()).or_default(),
        };
        w.roll(now_ms / self.window_ms);
        w.tokens = w.tokens.saturating_add(tokens);
    }

    /// Forget every scope that counts nothing any more (both its buckets
    /// are over), one shard lock at a time; returns how many were
    /// forgotten. A shard that shrank to a quarter of its capacity gives
    /// the memory back.
    pub fn sweep(&self, now_ms: u64) -> usize {
        let minute = now_ms / self.window_ms;
        let mut forgotten = 0;
        for shard in &self.shards {
            let mut map = shard.lock();
            let before = map.len();
            map.retain(|_, w| !w.is_idle(minute));
            forgotten += before - map.len();
            if map.capacity() > 64 && map.len() < map.capacity() / 4 {
                map.shrink_to_fit();
            }
        }
        forgotten
    }

    /// Scopes held (for the `fastgate_limiter_scopes` gauge).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

    #[test]
    fn a_million_idle_scopes_are_forgotten_after_the_window() {
        let rl = RateLimiter::default();
        let lim = Limits {
            rpm: Some(10),
            tpm: None,
        };
        let t0 = 6_000_000; // start of a minute
        // A million client addresses, each seen once, over one minute.
        for i in 0..1_000_000u64 {
            let ip = std::net::Ipv6Addr::from((0x2001_0db8u128 << 96) | u128::from(i));
            assert!(
                rl.admit(&format!("ip:{ip}/r"), lim, t0 + i * 60_000 / 1_000_000)
                    .is_ok()
            );
        }
        assert_eq!(rl.len(), 1_000_000);
        // The next minute still weighs the previous one: nothing forgotten.
        assert_eq!(rl.sweep(t0 + 60_000), 0);
        // Two windows on, every bucket is over: all forgotten.
        assert_eq!(rl.sweep(t0 + 120_000), 1_000_000);
        assert_eq!(rl.len(), 0);
        let capacity: usize = rl.shards.iter().map(|s| s.lock().capacity()).sum();
        assert!(capacity < 1_000, "memory given back: capacity {capacity}");
    }

    #[test]
    fn a_busy_scope_is_kept_and_its_count_survives_a_sweep() {
        let rl = RateLimiter::default();
        let lim = Limits {
            rpm: Some(2),
            tpm: None,
        };
        let t0 = 600_000;
        assert!(rl.admit("busy", lim, t0).is_ok());
        assert!(rl.admit("busy", lim, t0 + 70_000).is_ok());
        assert!(rl.admit("idle", lim, t0).is_ok());
        assert_eq!(rl.sweep(t0 + 125_000), 1, "only the idle scope goes");
        // 70 s in, the busy scope's one request still counts beside the new one.
        assert!(rl.admit("busy", lim, t0 + 125_000).is_ok());
        assert!(rl.admit("busy", lim, t0 + 125_000).is_err());
    }

    #[test]
    fn tokens_of_a_request_whose_scope_was_swept_still_count() {
        let rl = RateLimiter::default();
        let lim = Limits {
            rpm: None,
            tpm: Some(100),
        };
        let t0 = 600_000;
        assert!(rl.admit("k", lim, t0).is_ok());
        rl.sweep(t0 + 130_000); // a long stream: the scope went idle
        rl.add_tokens("k", 150, t0 + 130_000);
        assert!(rl.admit("k", lim, t0 + 131_000).is_err());
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

    /// Forget counts of periods that began before `oldest_start` (every
    /// period, a month at most, that began earlier is over); returns how
    /// many. A running period's count is never forgotten.
    pub fn sweep(&self, oldest_start: i64) -> usize {
        let mut map = self.used.lock();
        let before = map.len();
        map.retain(|_, (start, _)| *start >= oldest_start);
        before - map.len()
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
        assert_eq!(q.sweep(day.0), 0, "a running period is kept");
        assert_eq!(q.sweep(day.0 + 1), 1);
        assert!(!q.is_seeded("k", day.0));
    }
}
