//! `key_pools:`: upstream keys, how one is picked and how it cools down.

use super::HumanDuration;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum KeyStrategy {
    #[default]
    RoundRobin,
    LeastInFlight,
    Random,
    /// Random, in proportion to each key's `weight`.
    Weighted,
}

impl KeyStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "round_robin",
            Self::LeastInFlight => "least_in_flight",
            Self::Random => "random",
            Self::Weighted => "weighted",
        }
    }
}

/// What a 429 or 5xx cools: the whole key, or the key for that model only.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CooldownScope {
    Key,
    Model,
}

impl CooldownScope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::Model => "model",
        }
    }
}

/// Exponential backoff for keys that 429 or fail without saying for how long.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CooldownConfig {
    pub initial: HumanDuration,
    pub max: HumanDuration,
    pub multiplier: f64,
    /// Longest wait a provider's header or body may impose (a bogus date
    /// must not bench a key for a year); providers cap theirs at 24 h.
    pub max_wait: HumanDuration,
    /// Consecutive 5xx answers before a key cools: one 5xx says the
    /// provider is unwell (or a client sent odd input), not that the key is
    /// spent. 529 and 503 with `Retry-After` (overloaded) cool at once.
    pub after_5xx: u32,
}

impl Default for CooldownConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1).into(),
            max: Duration::from_secs(300).into(),
            multiplier: 2.0,
            max_wait: Duration::from_secs(24 * 3600).into(),
            after_5xx: 3,
        }
    }
}

/// A set of HTTP statuses in config: numbers and ranges, `[429, "500-599"]`.
/// Checked at load (100..=599, low <= high), so `fastgate check` names a
/// bad entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "Vec<StatusItem>", into = "Vec<StatusItem>")]
pub struct StatusSet(Vec<(u16, u16)>);

/// One entry of a [`StatusSet`] as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum StatusItem {
    Code(u16),
    Text(String),
}

impl StatusSet {
    /// The set of the given inclusive ranges (defaults, tests).
    pub fn of(ranges: &[(u16, u16)]) -> Self {
        StatusSet(ranges.to_vec())
    }

    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&status))
    }
}

impl TryFrom<Vec<StatusItem>> for StatusSet {
    type Error = String;

    fn try_from(items: Vec<StatusItem>) -> Result<Self, String> {
        let code = |t: &str| -> Result<u16, String> {
            t.trim()
                .parse::<u16>()
                .map_err(|_| format!("{t:?} is not a status code (write 429 or \"500-599\")"))
        };
        let mut ranges = Vec::with_capacity(items.len());
        for item in items {
            let (lo, hi) = match &item {
                StatusItem::Code(c) => (*c, *c),
                StatusItem::Text(t) => match t.split_once('-') {
                    Some((lo, hi)) => (code(lo)?, code(hi)?),
                    None => {
                        let c = code(t)?;
                        (c, c)
                    }
                },
            };
            if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
                return Err(format!(
                    "status {item:?} must be a code or a range \"low-high\" within 100-599"
                ));
            }
            ranges.push((lo, hi));
        }
        Ok(StatusSet(ranges))
    }
}

impl From<StatusSet> for Vec<StatusItem> {
    fn from(s: StatusSet) -> Self {
        s.0.into_iter()
            .map(|(lo, hi)| {
                if lo == hi {
                    StatusItem::Code(lo)
                } else {
                    StatusItem::Text(format!("{lo}-{hi}"))
                }
            })
            .collect()
    }
}

/// A pool key in config: the secret alone, or with a weight for `weighted`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum PoolKeyEntry {
    Secret(String),
    Weighted {
        key: String,
        #[serde(default = "one")]
        weight: u32,
    },
}

fn one() -> u32 {
    1
}

impl PoolKeyEntry {
    pub fn secret(&self) -> &str {
        match self {
            Self::Secret(s) | Self::Weighted { key: s, .. } => s,
        }
    }

    pub fn weight(&self) -> u32 {
        match self {
            Self::Secret(_) => 1,
            Self::Weighted { weight, .. } => *weight,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyPoolConfig {
    /// Empty strings (an unset `${VAR:-}`) are ignored.
    #[serde(skip_serializing)]
    pub keys: Vec<PoolKeyEntry>,
    pub strategy: KeyStrategy,
    /// Default: `model` when a Gemini upstream uses the pool, else `key`.
    pub cooldown_scope: Option<CooldownScope>,
    pub cooldown: CooldownConfig,
    /// Statuses that cool a key (5xx only after `cooldown.after_5xx` in a row).
    pub cool_on: StatusSet,
    /// Statuses that count towards `disable_after` (the provider refused the key).
    pub disable_on: StatusSet,
    /// Consecutive `disable_on` answers (401/403) that disable a key until re-enabled.
    pub disable_after: u32,
    /// 0 = unlimited.
    pub max_in_flight_per_key: u32,
    /// A lease held longer than this is reclaimed (a request that never ended).
    pub stuck_after: HumanDuration,
    /// How often a key the provider disabled (401/403) is tried again with
    /// one cheap request; 0 = never. A provider's auth outage then does not
    /// take the pool down until someone acts.
    pub reprobe_interval: HumanDuration,
}

impl Default for KeyPoolConfig {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            strategy: KeyStrategy::default(),
            cooldown_scope: None,
            cooldown: CooldownConfig::default(),
            cool_on: StatusSet::of(&[(429, 429), (500, 599)]),
            disable_on: StatusSet::of(&[(401, 401), (403, 403)]),
            disable_after: 3,
            max_in_flight_per_key: 0,
            stuck_after: Duration::from_secs(600).into(),
            reprobe_interval: Duration::from_secs(600).into(),
        }
    }
}
