//! Re-probing keys the provider disabled.
//!
//! `disable_after` consecutive 401/403 answers disable a key, but a 401 is
//! not always a revoked key: a provider's auth outage (or a bad deploy at
//! its edge) refuses every key for minutes, and without a way back the whole
//! pool stays down until an admin acts. So a key the *provider* disabled is
//! tried again on a slow schedule (`key_pools.*.reprobe_interval`) with one
//! cheap authenticated read and comes back when it succeeds. A key an admin
//! disabled is never probed: that was a decision, not an incident.
//!
//! This module holds the decisions (which keys are due, what an answer does
//! to the key); the upkeep task sends the probe through
//! `proxy::forward::probe`, off the request path, and counts the results.
//!
//! The schedule needs no state of its own: the next probe is `interval`
//! after the key's last error, which is the answer that disabled it and then
//! each probe (a probe always records itself as the key's last error unless
//! it brought the key back). That time is saved with the key's state and, in
//! cluster mode, published with it, so a restart does not reset the clock
//! and the nodes of a cluster see each other's probes.

use super::{KeyPool, KeyState, KeyStatus, Lease, status::Gate};
use crate::clock::now_ms;
use std::{sync::Arc, time::Duration};

/// Probes started per pool and sweep at most (a pool whose keys were all
/// disabled by one outage is probed a few keys per second, not all at once).
pub const MAX_PER_SWEEP: usize = 8;

/// Whether the provider disabled this gate. The state machine writes its
/// disabling reason as `"401 unauthorized xN"` / `"403 forbidden xN"`; an
/// admin's reason is `"disabled by NAME"`.
pub fn by_provider(gate: &Gate) -> bool {
    gate.disabled
        .as_deref()
        .is_some_and(|r| r.starts_with("401 ") || r.starts_with("403 "))
}

/// When the key's next probe is due (Unix ms): `interval` after its last
/// error. `None` when the key-wide gate was not disabled by the provider or
/// re-probing is off (`interval` zero).
pub fn next_probe_at(st: &KeyStatus, interval: Duration) -> Option<i64> {
    if interval.is_zero() || !by_provider(&st.key) {
        return None;
    }
    // The first probe confirms the disable soon: the refusals may have been
    // the requests' fault, not the key's (a client asking for an admin-only
    // path or another project's file gets a 401/403 on every key it is
    // retried on). A key the model list still refuses waits `interval`.
    let confirmed = st.last_error.as_deref().is_some_and(|e| e.starts_with("re-probe"));
    let wait = if confirmed {
        interval
    } else {
        interval.min(CONFIRM_AFTER)
    };
    let every = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
    Some(st.last_error_ms.saturating_add(every))
}

/// When a key disabled by answers to client requests is first re-probed.
pub const CONFIRM_AFTER: Duration = Duration::from_secs(2);

/// Lease the keys of `pool` whose probe is due by `now_ms`: disabled by the
/// provider, `interval` passed since their last error, and nothing running
/// on them (a probe still under way holds its lease, so a slow probe is not
/// doubled by the next sweep). Disabled keys stay disabled whatever the
/// clock says, so `now_ms` may be a little ahead (the sweep's horizon).
pub fn due(pool: &Arc<KeyPool>, interval: Duration, now_ms: i64) -> Vec<Lease> {
    if interval.is_zero() {
        return Vec::new();
    }
    pool.keys()
        .into_iter()
        .filter(|k| k.state(now_ms) == KeyState::Disabled && k.in_flight() == 0)
        .filter(|k| next_probe_at(&k.status(), interval).is_some_and(|at| at <= now_ms))
        .take(MAX_PER_SWEEP)
        .filter_map(|k| pool.lease_key(&k.id))
        .collect()
}

/// What a probe found, as the `result` label of
/// `fastgate_key_reprobes_total` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx: the provider takes the key again; it is back in rotation.
    Recovered,
    /// A 401/403: the key stays disabled until the next probe.
    StillRefused,
    /// No answer, or one that says nothing about the key (timeout, 5xx,
    /// 404, 429): it stays disabled until the next probe.
    Error,
}

impl Outcome {
    pub fn of(status: Option<u16>) -> Self {
        match status {
            Some(200..=299) => Outcome::Recovered,
            Some(401 | 403) => Outcome::StillRefused,
            _ => Outcome::Error,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Recovered => "recovered",
            Outcome::StillRefused => "still_refused",
            Outcome::Error => "error",
        }
    }
}

/// Apply a probe's answer (`status`, or the `error` that stopped it) to the
/// leased key: reopen it on a 2xx, else record the probe as the key's last
/// error, which schedules the next one. Both go through
/// [`KeyPool::set_status`], so the change is saved and published.
pub fn settle(lease: &Lease, status: Option<u16>, error: Option<&str>) -> Outcome {
    let (pool, key) = (lease.pool(), lease.key());
    let outcome = Outcome::of(status);
    if outcome == Outcome::Recovered {
        let mut reopened = false;
        pool.set_status(&key.id, |st| {
            // An admin may have disabled it by hand meanwhile: that stays.
            if by_provider(&st.key) {
                st.key.disabled = None;
                st.key.auth_failures = 0;
                reopened = true;
            }
        });
        if reopened {
            tracing::info!(pool = %pool.name, key = %key.id, status = status.unwrap_or_default(), "Disabled upstream key answered a re-probe; back in rotation.");
        }
        return outcome;
    }
    let what = match (status, error) {
        (Some(code), _) => format!("re-probe answered {code}"),
        (None, Some(e)) => format!("re-probe failed: {e}"),
        (None, None) => "re-probe failed".to_string(),
    };
    let now = now_ms();
    tracing::info!(pool = %pool.name, key = %key.id, result = outcome.as_str(), detail = %what, "Disabled upstream key still refused; probing again later.");
    pool.set_status(&key.id, |st| {
        st.last_error = Some(what);
        st.last_error_ms = now;
    });
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Disabled for `reason`, and already re-probed once at `last_error_ms`.
    fn disabled(reason: &str, last_error_ms: i64) -> KeyStatus {
        let mut st = KeyStatus::default();
        st.key.disabled = Some(reason.to_string());
        st.last_error = Some("re-probe answered 401".into());
        st.last_error_ms = last_error_ms;
        st
    }

    #[test]
    fn a_disable_by_client_requests_is_confirmed_by_a_probe_soon() {
        let mut st = disabled("401 unauthorized x3", 1_000);
        st.last_error = Some("401 unauthorized x3".into());
        assert_eq!(next_probe_at(&st, Duration::from_secs(600)), Some(3_000));
        assert_eq!(
            next_probe_at(&st, Duration::from_secs(1)),
            Some(2_000),
            "never later than the interval"
        );
    }

    #[test]
    fn only_provider_disabled_keys_get_a_next_probe() {
        let ten_min = Duration::from_secs(600);
        assert_eq!(
            next_probe_at(&disabled("401 unauthorized x3", 1_000), ten_min),
            Some(601_000)
        );
        assert_eq!(
            next_probe_at(&disabled("403 forbidden x3", 5), Duration::from_secs(1)),
            Some(1_005)
        );
        // An admin's decision is not an incident.
        assert_eq!(next_probe_at(&disabled("disabled by admin", 1_000), ten_min), None);
        // Off, or not disabled at all.
        assert_eq!(
            next_probe_at(&disabled("401 unauthorized x3", 1_000), Duration::ZERO),
            None
        );
        assert_eq!(next_probe_at(&KeyStatus::default(), ten_min), None);
        // A per-model 403 leaves the key-wide gate open: not probed.
        let mut per_model = KeyStatus::default();
        per_model.models.insert(
            "gpt-4o".into(),
            Gate {
                disabled: Some("403 forbidden x3".into()),
                ..Gate::default()
            },
        );
        assert_eq!(next_probe_at(&per_model, ten_min), None);
        // An absurd interval saturates instead of wrapping.
        assert_eq!(
            next_probe_at(&disabled("401 unauthorized x3", 1), Duration::from_secs(u64::MAX)),
            Some(i64::MAX)
        );
        let mut fresh = disabled("401 unauthorized x3", 1);
        fresh.last_error = None;
        assert_eq!(
            next_probe_at(&fresh, Duration::from_secs(u64::MAX)),
            Some(2_001),
            "the confirmation probe does not wait an absurd interval"
        );
    }

    #[test]
    fn reprobe_interval_defaults_to_ten_minutes_and_refuses_a_hammer() {
        use crate::config::parse_config;
        use std::path::Path;
        let parse = |pool: &str| parse_config(Path::new("f.yaml"), &format!("key_pools:\n  p: {pool}\n"));
        let c = parse("{keys: [sk-1]}").unwrap();
        assert_eq!(c.file.key_pools["p"].reprobe_interval.0, Duration::from_secs(600));
        assert!(
            parse("{reprobe_interval: 0}").unwrap().file.key_pools["p"]
                .reprobe_interval
                .0
                .is_zero()
        );
        assert_eq!(
            parse("{reprobe_interval: 30s}").unwrap().file.key_pools["p"]
                .reprobe_interval
                .0,
            Duration::from_secs(30)
        );
        let err = parse("{reprobe_interval: 200ms}").unwrap_err().to_string();
        assert!(
            err.contains("key_pools.p.reprobe_interval must be 0 (never) or at least 1s"),
            "{err}"
        );
        assert!(parse("{reprobe_interval: soon}").is_err());
    }

    #[test]
    fn outcomes_by_status() {
        assert_eq!(Outcome::of(Some(200)), Outcome::Recovered);
        assert_eq!(Outcome::of(Some(204)), Outcome::Recovered);
        assert_eq!(Outcome::of(Some(401)), Outcome::StillRefused);
        assert_eq!(Outcome::of(Some(403)), Outcome::StillRefused);
        for other in [Some(404), Some(429), Some(500), Some(503), None] {
            assert_eq!(Outcome::of(other), Outcome::Error, "{other:?}");
        }
    }
}
