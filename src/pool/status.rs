//! The state machine of one pool key, as pure functions of what the
//! upstream answered. See `docs/resilience.md` for the diagram.
//!
//! A *gate* holds one availability record: the key's own, or the key's for
//! one model (Gemini limits are per key and model; a 403 may be for one
//! model only). A gate is open, cooling until a deadline (hard after a
//! 429/5xx, soft "resting" when the provider said the key is nearly spent),
//! or disabled after `disable_after` consecutive 401/403.

use super::signals::Signals;
use crate::config::{CooldownConfig, CooldownScope};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The policy a pool applies to its keys (from `key_pools.*`).
#[derive(Debug, Clone)]
pub struct Policy {
    pub scope: CooldownScope,
    pub cooldown: CooldownConfig,
    /// 0 = never disable.
    pub disable_after: u32,
    /// 0 = unlimited.
    pub max_in_flight_per_key: u32,
    pub stuck_after: std::time::Duration,
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
        self.state(now_ms) == KeyState::Active && self.backoff_step == 0 && self.auth_failures == 0
    }

    fn succeed(&mut self) {
        self.backoff_step = 0;
        self.auth_failures = 0;
        if !self.resting {
            self.until_ms = 0;
        }
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
    /// in [0, 1) spreads backoff deadlines.
    pub fn observe(&mut self, policy: &Policy, answer: &Answer<'_>, now_ms: i64, jitter: f64) -> Change {
        let Answer {
            status,
            signals,
            model,
            others_in_flight,
        } = *answer;
        match status {
            429 | 500..=599 => {
                let per_model = policy.scope == CooldownScope::Model;
                let label = model.filter(|_| per_model).map(str::to_string);
                let gate = self.gate_mut(label.as_deref(), now_ms);
                let told = signals
                    .retry_at_ms
                    .or_else(|| (status == 429).then(|| signals.reset_ms()).flatten());
                let until = match told {
                    Some(at) => at.max(now_ms),
                    None => now_ms + backoff_ms(&policy.cooldown, gate.backoff_step, jitter),
                };
                gate.backoff_step = gate.backoff_step.saturating_add(1);
                gate.until_ms = until;
                gate.resting = false;
                let reason = if status == 429 {
                    "429 rate limited".to_string()
                } else {
                    format!("{status} upstream error")
                };
                gate.reason = Some(reason.clone());
                self.note_error(&reason, now_ms);
                Change::Cooled {
                    until_ms: until,
                    model: label,
                }
            }
            401 | 403 => {
                // A 403 names a permission: possibly for this model only.
                let label = model.filter(|_| status == 403).map(str::to_string);
                let gate = self.gate_mut(label.as_deref(), now_ms);
                gate.auth_failures = gate.auth_failures.saturating_add(1);
                let reason = format!(
                    "{status} {} x{}",
                    if status == 401 { "unauthorized" } else { "forbidden" },
                    gate.auth_failures
                );
                let disable = policy.disable_after > 0 && gate.auth_failures >= policy.disable_after;
                if disable {
                    gate.disabled = Some(reason.clone());
                }
                self.note_error(&reason, now_ms);
                if disable {
                    Change::Disabled { reason, model: label }
                } else {
                    Change::Counted
                }
            }
            _ => {
                // The key was accepted: failure streaks end.
                let mut changed = self.key.backoff_step != 0 || self.key.auth_failures != 0;
                self.key.succeed();
                if let Some(m) = model
                    && let Some(g) = self.models.get_mut(m)
                {
                    changed |= g.backoff_step != 0 || g.auth_failures != 0;
                    g.succeed();
                    if g.is_clear(now_ms) {
                        self.models.remove(m);
                    }
                }
                if status < 400
                    && let Some(until) = rest_until(signals, others_in_flight, now_ms, &policy.cooldown)
                {
                    let per_model = policy.scope == CooldownScope::Model;
                    let label = model.filter(|_| per_model).map(str::to_string);
                    let gate = self.gate_mut(label.as_deref(), now_ms);
                    if gate.state(now_ms) == KeyState::Active {
                        gate.until_ms = until;
                        gate.resting = true;
                        gate.reason = Some("nearly spent: resting until the provider's reset".into());
                        return Change::Rested { until_ms: until };
                    }
                }
                if changed { Change::Counted } else { Change::None }
            }
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

    /// An admin's reset: every gate open, failure streaks forgotten.
    pub fn reset(&mut self) {
        *self = KeyStatus {
            last_error: self.last_error.take(),
            last_error_ms: self.last_error_ms,
            ..KeyStatus::default()
        };
    }
}

/// `initial * multiplier^step`, capped at `max`, jittered by ±20 %.
pub fn backoff_ms(c: &CooldownConfig, step: u32, jitter: f64) -> i64 {
    let base = c.initial.0.as_secs_f64() * c.multiplier.powi(step.min(64) as i32);
    let max = c.max.0.as_secs_f64();
    let jittered = base.min(max) * (0.8 + 0.4 * jitter.clamp(0.0, 1.0));
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
    (reset > now_ms).then(|| reset.min(now_ms + c.max.0.as_millis() as i64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::signals::Window;
    use std::time::Duration;

    fn policy(scope: CooldownScope) -> Policy {
        Policy {
            scope,
            cooldown: CooldownConfig {
                initial: Duration::from_secs(1).into(),
                max: Duration::from_secs(60).into(),
                multiplier: 2.0,
            },
            disable_after: 2,
            max_in_flight_per_key: 0,
            stuck_after: Duration::from_secs(600),
        }
    }

    const NOW: i64 = 1_000_000;

    /// One answer with nobody else on the key, at mid jitter.
    fn see(s: &mut KeyStatus, p: &Policy, status: u16, signals: &Signals, model: Option<&str>, now: i64) -> Change {
        let answer = Answer {
            status,
            signals,
            model,
            others_in_flight: 0,
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
                    others_in_flight: 1
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
                    others_in_flight: 1
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
            };
            s.observe(&p, &answer, NOW, 0.5);
        }
        assert!(s.models.len() <= MAX_MODEL_GATES);
    }
}
