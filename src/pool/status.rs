//! The state machine of one pool key, as pure functions of what the
//! upstream answered. See `docs/resilience.md` for the diagram.
//!
//! A *gate* holds one availability record: the key's own, or the key's for
//! one model (Gemini limits are per key and model; a 403 may be for one
//! model only). A gate is open, cooling until a deadline (hard after a
//! 429/5xx, soft "resting" when the provider said the key is nearly spent),
//! or disabled after `disable_after` consecutive 401/403.

use super::signals::Signals;
use crate::config::{CooldownConfig, CooldownScope, StatusSet};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The policy a pool applies to its keys (from `key_pools.*`).
#[derive(Debug, Clone)]
pub struct Policy {
    pub scope: CooldownScope,
    pub cooldown: CooldownConfig,
    /// Statuses that cool a key (`cool_on`); 5xx after `cooldown.after_5xx`.
    pub cool_on: StatusSet,
    /// Statuses that count towards `disable_after` (`disable_on`).
    pub disable_on: StatusSet,
    /// 0 = never disable.
    pub disable_after: u32,
    /// 0 = unlimited.
    pub max_in_flight_per_key: u32,
    pub stuck_after: std::time::Duration,
}

impl Policy {
    /// Today's behaviour: 429 and 5xx cool, 401 and 403 disable.
    pub fn new(scope: CooldownScope, cooldown: CooldownConfig, disable_after: u32, max_in_flight_per_key: u32) -> Self {
        let defaults = crate::config::KeyPoolConfig::default();
        Policy {
            scope,
            cooldown,
            cool_on: defaults.cool_on,
            disable_on: defaults.disable_on,
            disable_after,
            max_in_flight_per_key,
            stuck_after: defaults.stuck_after.0,
        }
    }
}

/// Live state of a key, as the admin API and metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Active,
    /// Rested before it runs out (the provider said it is nearly spent);
    /// used only when no active key is left.
    Resting,
    Cooling,
    Disabled,
}

impl KeyState {
    /// Every state, for gauges that report each (zero included).
    pub const ALL: [KeyState; 4] = [
        KeyState::Active,
        KeyState::Resting,
        KeyState::Cooling,
        KeyState::Disabled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Resting => "resting",
            KeyState::Cooling => "cooling",
            KeyState::Disabled => "disabled",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    /// Unix ms until which the gate is closed; 0 when open.
    #[serde(default)]
    pub until_ms: i64,
    /// The closure is a rest (nearly spent), not a failure.
    #[serde(default)]
    pub resting: bool,
    #[serde(default)]
    pub reason: Option<String>,
    /// Why it is disabled; only an admin opens it again.
    #[serde(default)]
    pub disabled: Option<String>,
    /// Consecutive cooldowns without a success (the backoff exponent).
    #[serde(default)]
    pub backoff_step: u32,
    /// Consecutive 401/403 answers.
    #[serde(default)]
    pub auth_failures: u32,
    /// Consecutive 5xx answers that have not cooled the gate yet
    /// (`cooldown.after_5xx`).
    #[serde(default)]
    pub server_errors: u32,
    /// Stamp of this gate's last decision (cooldown, rest, disable,
    /// recovery), from its key's [`KeyStatus::version`]. An answer to a
    /// lease taken at an older version was decided on before it and may
    /// not undo it.
    #[serde(default)]
    pub version: u64,
}

impl Gate {
    pub fn state(&self, now_ms: i64) -> KeyState {
        if self.disabled.is_some() {
            KeyState::Disabled
        } else if self.until_ms > now_ms {
            if self.resting {
                KeyState::Resting
            } else {
                KeyState::Cooling
            }
        } else {
            KeyState::Active
        }
    }

    /// Nothing worth keeping: an open gate with no failure history.
    fn is_clear(&self, now_ms: i64) -> bool {
        self.state(now_ms) == KeyState::Active
            && self.backoff_step == 0
            && self.auth_failures == 0
            && self.server_errors == 0
    }

    /// A good answer to a lease taken at `lease_version`: failure streaks
    /// end, unless a decision was made on this gate after the lease was
    /// taken (then the answer is from the old window and changes nothing).
    /// Returns whether the gate recovered (it had been cooled).
    fn succeed(&mut self, lease_version: u64) -> bool {
        if self.version > lease_version {
            return false;
        }
        let recovered = self.backoff_step != 0;
        self.backoff_step = 0;
        self.auth_failures = 0;
        self.server_errors = 0;
        if !self.resting {
            self.until_ms = 0;
        }
        recovered
    }
}

/// What an answer did to the key (for logs, metrics and persistence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    None,
    /// Counters moved, the state did not.
    Counted,
    Cooled {
        until_ms: i64,
        model: Option<String>,
    },
    Rested {
        until_ms: i64,
    },
    Disabled {
        reason: String,
        model: Option<String>,
    },
    /// A cooled gate answered well (its half-open probe): open, backoff
    /// forgotten. Published like a cooldown.
    Recovered {
        model: Option<String>,
    },
}

/// One upstream answer as the state machine sees it.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    pub status: u16,
    pub signals: &'a Signals,
    /// The model the request was for (per-model gates).
    pub model: Option<&'a str>,
    /// Requests on this key still running: they spend what is left too.
    pub others_in_flight: u32,
    /// [`KeyStatus::version`] when the request's lease was taken.
    pub lease_version: u64,
}

/// Per-model gates kept per key at most; expired ones are pruned first.
const MAX_MODEL_GATES: usize = 256;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyStatus {
    pub key: Gate,
    #[serde(default)]
    pub models: HashMap<String, Gate>,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub last_error_ms: i64,
    /// Lamport clock of the key's decisions: every cooldown, rest, disable,
    /// recovery and admin change takes `version + 1`; a state from another
    /// node is taken only when newer (see [`KeyStatus::merge_remote`]).
    /// Saved states without one load as 0.
    #[serde(default)]
    pub version: u64,
    /// Version of the last deliberate re-enable (admin enable or reset, a
    /// re-probe's recovery) that opened a disabled gate; 0 = never. A
    /// remote open state undoes a disable only when revived after it.
    #[serde(default)]
    pub revived: u64,
}

/// What [`KeyStatus::merge_remote`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Merge {
    /// The local state changed.
    pub taken: bool,
    /// The merged state is news to the other nodes (a disable the newer
    /// state lacked was kept, or one was undone by a revive): publish it.
    pub republish: bool,
}

impl KeyStatus {
    /// Whether the key may serve `model` now (the key-wide gate aside).
    pub fn model_open(&self, model: Option<&str>, now_ms: i64) -> bool {
        model
            .and_then(|m| self.models.get(m))
            .is_none_or(|g| g.state(now_ms) == KeyState::Active)
    }

    /// Soonest time the key may serve `model` again; `None` if disabled.
    pub fn recovers_at(&self, model: Option<&str>, now_ms: i64) -> Option<i64> {
        let gates = std::iter::once(&self.key).chain(model.and_then(|m| self.models.get(m)));
        let mut at = now_ms;
        for g in gates {
            if g.disabled.is_some() {
                return None;
            }
            at = at.max(g.until_ms);
        }
        Some(at)
    }

    /// Take in one upstream answer (see [`Answer`]) at `now_ms`; `jitter`
    /// in [0, 1) spreads backoff deadlines. `disable_on` is checked first,
    /// then `cool_on`; any other status means the key was accepted.
    pub fn observe(&mut self, policy: &Policy, answer: &Answer<'_>, now_ms: i64, jitter: f64) -> Change {
        let status = answer.status;
        if policy.disable_on.contains(status) {
            self.refused(policy, answer, now_ms)
        } else if policy.cool_on.contains(status) {
            self.failed(policy, answer, now_ms, jitter)
        } else {
            self.accepted(policy, answer, now_ms)
        }
    }

    /// The next decision's stamp.
    fn stamp(&mut self) -> u64 {
        self.version = self.version.saturating_add(1);
        self.version
    }

    /// A `cool_on` answer (429, 5xx): cool the gate for what the provider
    /// asked, clamped to `[backoff floor, max_wait]`, unless the gate was
    /// already decided on after this request's lease (one failure window
    /// grows the backoff once, however many requests were in flight).
    fn failed(&mut self, policy: &Policy, answer: &Answer<'_>, now_ms: i64, jitter: f64) -> Change {
        let Answer {
            status,
            signals,
            model,
            lease_version,
            ..
        } = *answer;
        let per_model = policy.scope == CooldownScope::Model;
        let label = model.filter(|_| per_model).map(str::to_string);
        let reason = if status == 429 {
            "429 rate limited".to_string()
        } else {
            format!("{status} upstream error")
        };
        self.note_error(&reason, now_ms);
        if self.gate(label.as_deref()).is_some_and(|g| g.version > lease_version) {
            return Change::Counted;
        }
        // A disabled key stays disabled and does not also cool (a re-probe
        // answered 5xx or 429 says nothing about the refusal).
        if self.key.disabled.is_some() || self.gate(label.as_deref()).is_some_and(|g| g.disabled.is_some()) {
            return Change::Counted;
        }
        // 529 and a 503 naming its wait say "overloaded": cool at once.
        let overloaded = status == 529 || (status == 503 && signals.retry_at_ms.is_some());
        if (500..=599).contains(&status) && !overloaded {
            let gate = self.gate_mut(label.as_deref(), now_ms);
            gate.server_errors = gate.server_errors.saturating_add(1);
            if gate.server_errors < policy.cooldown.after_5xx {
                return Change::Counted;
            }
        }
        let version = self.stamp();
        let gate = self.gate_mut(label.as_deref(), now_ms);
        let told = signals
            .retry_at_ms
            .or_else(|| (status == 429).then(|| signals.reset_ms()).flatten());
        let until = cooldown_until(&policy.cooldown, gate.backoff_step, told, now_ms, jitter);
        gate.backoff_step = gate.backoff_step.saturating_add(1);
        gate.server_errors = 0;
        gate.until_ms = until;
        gate.resting = false;
        gate.reason = Some(reason);
        gate.version = version;
        Change::Cooled {
            until_ms: until,
            model: label,
        }
    }

    /// A `disable_on` answer (401, 403): count it; disable the gate after
    /// `disable_after` in a row. The reason reads "401 unauthorized x3" /
    /// "403 forbidden x3" (the re-probe tells a provider's refusal from an
    /// admin's disable by it).
    fn refused(&mut self, policy: &Policy, answer: &Answer<'_>, now_ms: i64) -> Change {
        let Answer { status, model, .. } = *answer;
        // A 403 names a permission: possibly for this model only.
        let label = model.filter(|_| status == 403).map(str::to_string);
        let gate = self.gate_mut(label.as_deref(), now_ms);
        gate.auth_failures = gate.auth_failures.saturating_add(1);
        let word = match status {
            401 => "unauthorized",
            403 => "forbidden",
            _ => "refused",
        };
        let reason = format!("{status} {word} x{}", gate.auth_failures);
        let disable = policy.disable_after > 0 && gate.auth_failures >= policy.disable_after && gate.disabled.is_none();
        self.note_error(&reason, now_ms);
        if !disable {
            return Change::Counted;
        }
        let version = self.stamp();
        let gate = self.gate_mut(label.as_deref(), now_ms);
        gate.disabled = Some(reason.clone());
        gate.version = version;
        Change::Disabled { reason, model: label }
    }

    /// Any other answer: the key was accepted, failure streaks end (unless
    /// the answer is from before the gate's last decision), and a 2xx/3xx
    /// saying the key is nearly spent rests it.
    fn accepted(&mut self, policy: &Policy, answer: &Answer<'_>, now_ms: i64) -> Change {
        let Answer {
            status,
            signals,
            model,
            others_in_flight,
            lease_version,
        } = *answer;
        let had_streak = |g: &Gate| g.backoff_step != 0 || g.auth_failures != 0 || g.server_errors != 0;
        let mut changed = had_streak(&self.key);
        let mut recovered = None;
        if self.key.succeed(lease_version) {
            recovered = Some(None);
        }
        if let Some(m) = model
            && let Some(g) = self.models.get_mut(m)
        {
            changed |= had_streak(g);
            if g.succeed(lease_version) {
                recovered = Some(Some(m.to_string()));
            }
            if g.is_clear(now_ms) {
                self.models.remove(m);
            }
        }
        if let Some(model) = recovered {
            let version = self.stamp();
            match &model {
                None => self.key.version = version,
                Some(m) => {
                    if let Some(g) = self.models.get_mut(m) {
                        g.version = version;
                    }
                }
            }
            return Change::Recovered { model };
        }
        if status < 400
            && let Some(until) = rest_until(signals, others_in_flight, now_ms, &policy.cooldown)
        {
            let per_model = policy.scope == CooldownScope::Model;
            let label = model.filter(|_| per_model).map(str::to_string);
            if self
                .gate(label.as_deref())
                .is_none_or(|g| g.state(now_ms) == KeyState::Active)
            {
                let version = self.stamp();
                let gate = self.gate_mut(label.as_deref(), now_ms);
                gate.until_ms = until;
                gate.resting = true;
                gate.reason = Some("nearly spent: resting until the provider's reset".into());
                gate.version = version;
                return Change::Rested { until_ms: until };
            }
        }
        if changed { Change::Counted } else { Change::None }
    }

    /// Take a state another node published, Lamport style: the newer
    /// version wins; the local clock moves to the larger of both either
    /// way, so this node's next decision outranks both. On a tie (two nodes
    /// decided at once) the more closed state wins (disabled, then the later
    /// deadline, then the longer streak), the same choice on every node, so
    /// they converge.
    ///
    /// Disables are merged, not overwritten: a gate disabled on either side
    /// stays disabled unless a side that has it open was deliberately
    /// re-enabled after it (`revived` above the disable's version: an
    /// admin's enable or reset, a re-probe's recovery). A newer cooldown
    /// from a node that never saw the disable does not undo it.
    pub fn merge_remote(&mut self, remote: KeyStatus) -> Merge {
        let rank = |s: &KeyStatus| (s.key.disabled.is_some(), s.key.until_ms, s.key.backoff_step);
        let take = remote.version > self.version || (remote.version == self.version && rank(&remote) > rank(self));
        let version = self.version.max(remote.version);
        let local = std::mem::take(self);
        let local_gates = local.disabled_gates();
        let (mut merged, other) = if take { (remote, local) } else { (local, remote) };
        let winner_gates = merged.disabled_gates();
        let mut names = winner_gates.clone();
        names.extend(other.disabled_gates());
        names.sort();
        names.dedup();
        for name in names {
            let m = name.as_deref();
            let Some(disable) = [&merged, &other]
                .into_iter()
                .filter_map(|s| s.gate(m))
                .find(|g| g.disabled.is_some())
                .cloned()
            else {
                continue;
            };
            let revived = [&merged, &other]
                .into_iter()
                .any(|s| s.gate(m).is_none_or(|g| g.disabled.is_none()) && s.revived > disable.version);
            let gate = match m {
                Some(m) => merged.models.entry(m.to_string()).or_default(),
                None => &mut merged.key,
            };
            if revived {
                gate.disabled = None;
                gate.auth_failures = 0;
            } else if gate.disabled.is_none() {
                gate.disabled = disable.disabled;
                gate.auth_failures = disable.auth_failures;
                gate.version = gate.version.max(disable.version);
            }
        }
        merged.version = version;
        merged.revived = merged.revived.max(other.revived);
        let gates = merged.disabled_gates();
        let republish = gates != winner_gates;
        let taken = take || gates != local_gates;
        *self = merged;
        if republish {
            // News to the cluster (the state Redis keeps lacks it): outrank it.
            self.stamp();
        }
        Merge { taken, republish }
    }

    /// The disabled gates (`None` = the key's own), sorted.
    fn disabled_gates(&self) -> Vec<Option<String>> {
        let mut gates: Vec<Option<String>> = self
            .models
            .iter()
            .filter(|(_, g)| g.disabled.is_some())
            .map(|(m, _)| Some(m.clone()))
            .collect();
        if self.key.disabled.is_some() {
            gates.push(None);
        }
        gates.sort();
        gates
    }

    fn gate(&self, model: Option<&str>) -> Option<&Gate> {
        match model {
            Some(m) => self.models.get(m),
            None => Some(&self.key),
        }
    }

    fn note_error(&mut self, reason: &str, now_ms: i64) {
        self.last_error = Some(reason.to_string());
        self.last_error_ms = now_ms;
    }

    fn gate_mut(&mut self, model: Option<&str>, now_ms: i64) -> &mut Gate {
        match model {
            Some(m) => {
                if !self.models.contains_key(m) {
                    self.prune(now_ms);
                }
                self.models.entry(m.to_string()).or_default()
            }
            None => &mut self.key,
        }
    }

    /// Keep the per-model map bounded: drop clear gates, then the oldest.
    fn prune(&mut self, now_ms: i64) {
        if self.models.len() < MAX_MODEL_GATES {
            return;
        }
        self.models.retain(|_, g| !g.is_clear(now_ms));
        while self.models.len() >= MAX_MODEL_GATES {
            let Some(oldest) = self
                .models
                .iter()
                .filter(|(_, g)| g.disabled.is_none())
                .min_by_key(|(_, g)| g.until_ms)
                .map(|(m, _)| m.clone())
            else {
                break;
            };
            self.models.remove(&oldest);
        }
    }

    /// An admin's reset: every gate open, failure streaks forgotten (the
    /// version stays: it only moves forward).
    pub fn reset(&mut self) {
        *self = KeyStatus {
            last_error: self.last_error.take(),
            last_error_ms: self.last_error_ms,
            version: self.version,
            revived: self.revived,
            ..KeyStatus::default()
        };
    }

    /// An admin's change (enable, disable, reset) is a decision too: stamp
    /// it so in-flight answers cannot undo it and other nodes take it.
    /// A new version for the same state (to outrank a stored copy).
    pub fn restamp(&mut self) {
        self.stamp();
    }

    pub fn stamp_admin(&mut self) {
        let version = self.stamp();
        self.key.version = version;
    }

    /// A deliberate change from outside the request path (admin enable,
    /// disable, reset; a re-probe's recovery): `change` applied and
    /// stamped. When it opened a disabled gate, the key is marked revived
    /// at this version: other nodes' disables from before it are undone by
    /// it, their later ones are not ([`KeyStatus::merge_remote`]).
    pub fn deliberate(&mut self, change: impl FnOnce(&mut KeyStatus)) {
        let before = self.disabled_gates();
        change(self);
        self.stamp_admin();
        let after = self.disabled_gates();
        if before.iter().any(|g| !after.contains(g)) {
            self.revived = self.version;
        }
    }
}

/// Until when a failed gate cools: what the provider named (`told`, Unix
/// ms) or else the backoff, never sooner than the backoff floor (the
/// backoff this step would get, at least `initial`: "retry now" from a
/// provider or a skewed clock must not mean "hammer") and never later than
/// `max_wait` past now (nor than the floor, should `max_wait` be shorter).
pub fn cooldown_until(c: &CooldownConfig, step: u32, told: Option<i64>, now_ms: i64, jitter: f64) -> i64 {
    let initial = i64::try_from(c.initial.0.as_millis()).unwrap_or(i64::MAX);
    let floor = backoff_ms(c, step, jitter).max(initial);
    let max_wait = i64::try_from(c.max_wait.0.as_millis()).unwrap_or(i64::MAX).max(floor);
    let lo = now_ms.saturating_add(floor);
    let hi = now_ms.saturating_add(max_wait);
    told.map_or(lo, |at| at.max(lo).min(hi))
}

/// `initial * multiplier^step`, capped at `max`, jittered by ±20 %.
pub fn backoff_ms(c: &CooldownConfig, step: u32, jitter: f64) -> i64 {
    let base = c.initial.0.as_secs_f64() * c.multiplier.powi(step.min(64) as i32);
    let max = c.max.0.as_secs_f64();
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.5
    };
    let jittered = base.min(max) * (0.8 + 0.4 * jitter);
    // `as` saturates (NaN to 0): no panic whatever the config holds.
    (jittered.min(max) * 1000.0).round() as i64
}

/// When a successful answer says the key is nearly spent, until when to
/// rest it: requests left no more than the requests already running on it,
/// or tokens down to 1 % of the window (to none when the limit is unknown).
fn rest_until(s: &Signals, others_in_flight: u32, now_ms: i64, c: &CooldownConfig) -> Option<i64> {
    let requests_spent = s.requests.remaining.is_some_and(|r| r <= u64::from(others_in_flight));
    let tokens_spent = s
        .tokens
        .remaining
        .is_some_and(|r| r <= s.tokens.limit.map_or(0, |l| l / 100));
    let reset = [
        requests_spent.then_some(s.requests.reset_ms).flatten(),
        tokens_spent.then_some(s.tokens.reset_ms).flatten(),
    ]
    .into_iter()
    .flatten()
    .max()?;
    let max = i64::try_from(c.max.0.as_millis()).unwrap_or(i64::MAX);
    (reset > now_ms).then(|| reset.min(now_ms.saturating_add(max)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::signals::Window;
    use std::time::Duration;

    fn policy(scope: CooldownScope) -> Policy {
        let cooldown = CooldownConfig {
            initial: Duration::from_secs(1).into(),
            max: Duration::from_secs(60).into(),
            multiplier: 2.0,
            max_wait: Duration::from_secs(3600).into(),
            after_5xx: 1,
        };
        Policy::new(scope, cooldown, 2, 0)
    }

    const NOW: i64 = 1_000_000;

    /// One answer with nobody else on the key, at mid jitter.
    fn see(s: &mut KeyStatus, p: &Policy, status: u16, signals: &Signals, model: Option<&str>, now: i64) -> Change {
        let answer = Answer {
            status,
            signals,
            model,
            others_in_flight: 0,
            lease_version: s.version,
        };
        s.observe(p, &answer, now, 0.5)
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let c = policy(CooldownScope::Key).cooldown;
        assert_eq!(backoff_ms(&c, 0, 0.5), 1000);
        assert_eq!(backoff_ms(&c, 3, 0.5), 8000);
        assert_eq!(backoff_ms(&c, 30, 0.5), 60_000);
        assert_eq!(backoff_ms(&c, 30, 1.0), 60_000, "jitter never exceeds max");
        assert_eq!(backoff_ms(&c, 0, 0.0), 800);
    }

    #[test]
    fn a_429_cools_for_retry_after_then_backoff_and_success_resets() {
        let p = policy(CooldownScope::Key);
        let mut s = KeyStatus::default();
        let told = Signals {
            retry_at_ms: Some(NOW + 7000),
            ..Signals::default()
        };
        assert_eq!(
            see(&mut s, &p, 429, &told, None, NOW),
            Change::Cooled {
                until_ms: NOW + 7000,
                model: None
            }
        );
        assert_eq!(s.key.state(NOW), KeyState::Cooling);
        assert_eq!(s.key.state(NOW + 7000), KeyState::Active);
        // No header: exponential backoff from the streak.
        see(&mut s, &p, 503, &Signals::default(), None, NOW + 7000);
        assert_eq!(s.key.until_ms, NOW + 7000 + 2000);
        see(&mut s, &p, 200, &Signals::default(), None, NOW + 9000);
        assert_eq!(s.key.backoff_step, 0);
        assert_eq!(s.recovers_at(None, NOW + 9000), Some(NOW + 9000));
    }

    #[test]
    fn a_disabled_key_answered_429_or_5xx_stays_disabled_and_does_not_cool() {
        let p = policy(CooldownScope::Key);
        let mut s = KeyStatus::default();
        see(&mut s, &p, 401, &Signals::default(), None, NOW);
        assert!(matches!(
            see(&mut s, &p, 401, &Signals::default(), None, NOW),
            Change::Disabled { .. }
        ));
        let version = s.version;
        for status in [429, 500, 529] {
            assert_eq!(see(&mut s, &p, status, &Signals::default(), None, NOW), Change::Counted);
        }
        assert_eq!(s.key.state(NOW), KeyState::Disabled);
        assert_eq!((s.key.until_ms, s.key.backoff_step, s.version), (0, 0, version));
        assert_eq!(
            see(&mut s, &p, 401, &Signals::default(), None, NOW),
            Change::Counted,
            "no second Disabled (and no second warning) for a key already disabled"
        );
    }

    #[test]
    fn consecutive_auth_failures_disable_and_a_model_403_stays_with_the_model() {
        let p = policy(CooldownScope::Key);
        let mut s = KeyStatus::default();
        assert_eq!(
            see(&mut s, &p, 401, &Signals::default(), Some("m"), NOW),
            Change::Counted
        );
        see(&mut s, &p, 200, &Signals::default(), Some("m"), NOW);
        assert_eq!(s.key.auth_failures, 0, "a success ends the streak");
        see(&mut s, &p, 401, &Signals::default(), None, NOW);
        assert!(matches!(
            see(&mut s, &p, 401, &Signals::default(), None, NOW),
            Change::Disabled { model: None, .. }
        ));
        assert_eq!(s.key.state(NOW + 10_000_000), KeyState::Disabled);
        assert_eq!(s.recovers_at(None, NOW), None);

        let mut s = KeyStatus::default();
        see(&mut s, &p, 403, &Signals::default(), Some("gpt-x"), NOW);
        see(&mut s, &p, 403, &Signals::default(), Some("gpt-x"), NOW);
        assert_eq!(s.key.state(NOW), KeyState::Active, "the key serves other models");
        assert!(!s.model_open(Some("gpt-x"), NOW));
        assert!(s.model_open(Some("gpt-y"), NOW));
    }

    #[test]
    fn model_scope_cools_one_model_only() {
        let p = policy(CooldownScope::Model);
        let mut s = KeyStatus::default();
        see(&mut s, &p, 429, &Signals::default(), Some("a"), NOW);
        assert_eq!(s.key.state(NOW), KeyState::Active);
        assert!(!s.model_open(Some("a"), NOW));
        assert!(s.model_open(Some("b"), NOW));
        assert_eq!(s.recovers_at(Some("a"), NOW), Some(NOW + 1000));
        see(&mut s, &p, 200, &Signals::default(), Some("a"), NOW + 1000);
        assert!(s.models.is_empty(), "a recovered model leaves no gate behind");
    }

    #[test]
    fn nearly_spent_keys_rest_until_the_reset() {
        let p = policy(CooldownScope::Key);
        let mut s = KeyStatus::default();
        let low = |remaining| Signals {
            requests: Window {
                limit: Some(10),
                remaining: Some(remaining),
                reset_ms: Some(NOW + 5000),
            },
            ..Signals::default()
        };
        assert_eq!(
            s.observe(
                &p,
                &Answer {
                    status: 200,
                    signals: &low(3),
                    model: None,
                    others_in_flight: 1,
                    lease_version: 0,
                },
                NOW,
                0.5
            ),
            Change::None
        );
        assert_eq!(
            s.observe(
                &p,
                &Answer {
                    status: 200,
                    signals: &low(1),
                    model: None,
                    others_in_flight: 1,
                    lease_version: 0,
                },
                NOW,
                0.5
            ),
            Change::Rested { until_ms: NOW + 5000 }
        );
        assert_eq!(s.key.state(NOW), KeyState::Resting);
        assert_eq!(s.key.state(NOW + 5000), KeyState::Active);
    }

    #[test]
    fn model_gates_stay_bounded() {
        let p = policy(CooldownScope::Model);
        let mut s = KeyStatus::default();
        for i in 0..1000 {
            let model = format!("m{i}");
            let answer = Answer {
                status: 429,
                signals: &Signals::default(),
                model: Some(&model),
                others_in_flight: 0,
                lease_version: s.version,
            };
            s.observe(&p, &answer, NOW, 0.5);
        }
        assert!(s.models.len() <= MAX_MODEL_GATES);
    }

    fn disable_key(s: &mut KeyStatus) {
        s.deliberate(|st| st.key.disabled = Some("disabled by admin".into()));
    }

    fn enable_key(s: &mut KeyStatus) {
        s.deliberate(|st| {
            st.key.disabled = None;
            st.key.auth_failures = 0;
        });
    }

    #[test]
    fn a_disable_is_not_undone_by_a_newer_concurrent_cooldown() {
        let p = policy(CooldownScope::Key);
        let shared = KeyStatus {
            version: 4,
            ..KeyStatus::default()
        };
        // Node A disables (version 5); node B, not having seen it, cools
        // the key twice (versions 5 and 6).
        let (mut a, mut b) = (shared.clone(), shared);
        disable_key(&mut a);
        assert_eq!(a.version, 5);
        see(&mut b, &p, 429, &Signals::default(), None, NOW);
        see(&mut b, &p, 429, &Signals::default(), None, NOW + 5000);
        assert_eq!(b.version, 6);
        let (from_a, from_b) = (a.clone(), b.clone());
        // A takes B's newer cooldown, keeps its disable, and says so.
        let m = a.merge_remote(from_b);
        assert_eq!(a.key.state(NOW), KeyState::Disabled);
        assert_eq!(a.key.until_ms, b.key.until_ms, "B's cooldown is taken too");
        assert!(m.taken && m.republish, "{m:?}");
        assert_eq!(a.version, 7, "the merged state outranks both");
        // B takes A's older disable all the same, and says so.
        let m = b.merge_remote(from_a);
        assert_eq!(b.key.state(NOW), KeyState::Disabled);
        assert!(m.taken && m.republish, "{m:?}");
        // Each takes the other's merged state without another round.
        let (from_a, from_b) = (a.clone(), b.clone());
        assert!(!a.merge_remote(from_b).republish);
        assert!(!b.merge_remote(from_a).republish);
        assert_eq!(
            (a.key.state(NOW), b.key.state(NOW)),
            (KeyState::Disabled, KeyState::Disabled)
        );
    }

    #[test]
    fn only_a_deliberate_enable_after_a_disable_undoes_it() {
        let mut a = KeyStatus {
            version: 4,
            ..KeyStatus::default()
        };
        let mut b = a.clone();
        // B re-enabled the key at version 3, before A's disable (5), then
        // made decisions of its own up to version 9.
        b.revived = 3;
        disable_key(&mut a);
        b.version = 9;
        let m = a.merge_remote(b.clone());
        assert_eq!(
            a.key.state(NOW),
            KeyState::Disabled,
            "an earlier enable does not undo it"
        );
        assert!(m.republish, "{m:?}");
        // B learns of the disable, then an admin enables the key on B.
        b.merge_remote(a.clone());
        assert_eq!(b.key.state(NOW), KeyState::Disabled);
        enable_key(&mut b);
        assert_eq!(b.revived, b.version);
        let m = a.merge_remote(b.clone());
        assert_eq!(a.key.state(NOW), KeyState::Active, "the later enable undoes it");
        assert!(m.taken && !m.republish, "{m:?}");
        // A disable that is not a change (already disabled) marks no revive,
        // nor does a reset of an open key.
        let mut c = KeyStatus::default();
        c.reset();
        c.deliberate(KeyStatus::reset);
        assert_eq!(c.revived, 0);
    }

    #[test]
    fn a_model_disable_survives_a_key_level_reprobe_elsewhere() {
        let p = policy(CooldownScope::Key);
        let mut a = KeyStatus::default();
        see(&mut a, &p, 403, &Signals::default(), Some("m"), NOW);
        see(&mut a, &p, 403, &Signals::default(), Some("m"), NOW);
        assert!(!a.model_open(Some("m"), NOW));
        // Another node, newer, without the model gate.
        let other = KeyStatus {
            version: a.version + 3,
            ..KeyStatus::default()
        };
        a.merge_remote(other);
        assert!(!a.model_open(Some("m"), NOW), "the model's disable is kept");
    }

    proptest::proptest! {
        #[test]
        fn a_cooldown_is_always_between_the_floor_and_max_wait(
            told in proptest::option::of(proptest::num::i64::ANY),
            step in proptest::num::u32::ANY,
            jitter in proptest::num::f64::ANY,
        ) {
            let c = policy(CooldownScope::Key).cooldown;
            let until = cooldown_until(&c, step, told, NOW, jitter);
            proptest::prop_assert!(until >= NOW + 1000, "floor: {until}");
            proptest::prop_assert!(until <= NOW + 3_600_000, "max_wait: {until}");
        }
    }

    #[test]
    fn concurrent_429s_grow_the_backoff_once_per_window() {
        let p = policy(CooldownScope::Key);
        let mut s = KeyStatus::default();
        let leased_at = s.version;
        for _ in 0..20 {
            let answer = Answer {
                status: 429,
                signals: &Signals::default(),
                model: None,
                others_in_flight: 0,
                lease_version: leased_at,
            };
            s.observe(&p, &answer, NOW, 0.5);
        }
        assert_eq!(s.key.backoff_step, 1);
        assert_eq!(s.version, 1);
    }

    proptest::proptest! {
        /// Any sequence of answers, to leases of any age, at any time: the
        /// version only grows, the backoff grows by at most one per decision,
        /// and a cooldown always lands within [now + initial, now + max_wait].
        #[test]
        fn the_state_machine_keeps_its_invariants(
            steps in proptest::collection::vec(
                (
                    proptest::sample::select(vec![200u16, 400, 401, 403, 404, 429, 500, 502, 503, 529]),
                    0u64..4,
                    proptest::option::of(proptest::num::i64::ANY),
                    0i64..5000,
                    proptest::bool::ANY,
                ),
                1..60,
            )
        ) {
            let p = policy(CooldownScope::Model);
            let mut s = KeyStatus::default();
            let mut now = NOW;
            for (status, age, retry_at, dt, with_model) in steps {
                now += dt;
                let before = s.clone();
                let signals = Signals { retry_at_ms: retry_at, ..Signals::default() };
                let model = with_model.then_some("m");
                let answer = Answer {
                    status,
                    signals: &signals,
                    model,
                    others_in_flight: 0,
                    lease_version: s.version.saturating_sub(age),
                };
                let change = s.observe(&p, &answer, now, 0.5);
                proptest::prop_assert!(s.version >= before.version);
                proptest::prop_assert!(s.version <= before.version + 1);
                let gates = |st: &KeyStatus| {
                    std::iter::once(st.key.backoff_step)
                        .chain(st.models.get("m").map(|g| g.backoff_step))
                        .collect::<Vec<_>>()
                };
                for (a, b) in gates(&before).iter().zip(gates(&s)) {
                    proptest::prop_assert!(b <= a + 1, "{a} -> {b}");
                }
                if s.version == before.version {
                    let decided = matches!(
                        change,
                        Change::Cooled { .. } | Change::Recovered { .. } | Change::Disabled { .. } | Change::Rested { .. }
                    );
                    proptest::prop_assert!(!decided, "a decision without a version: {:?}", change);
                }
                if let Change::Cooled { until_ms, .. } = change {
                    proptest::prop_assert!(until_ms >= now + 1000 && until_ms <= now + 3_600_000, "{until_ms}");
                }
            }
        }
    }
}
