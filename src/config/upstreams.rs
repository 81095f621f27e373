//! `upstreams:`: providers, endpoints, timeouts, health checks and the mock.

use super::HumanDuration;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The wire protocol an upstream speaks.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    Openai,
    Anthropic,
    Gemini,
    OpenaiCompatible,
    /// Any HTTP service: no API format, no key injection unless a pool is set.
    Http,
    /// Answered inside FastGate (offline demo and first try).
    Mock,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::Anthropic => "anthropic",
            Self::Gemini => "gemini",
            Self::OpenaiCompatible => "openai_compatible",
            Self::Http => "http",
            Self::Mock => "mock",
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    Random,
    ConsistentHash,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub provider: Provider,
    #[serde(default)]
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default)]
    pub key_pool: Option<String>,
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// Settings of the built-in mock provider.
    #[serde(default)]
    pub mock: Option<MockConfig>,
    /// The models this upstream serves; they get their own `tokens_total`
    /// series (other names are counted under `other`).
    #[serde(default)]
    pub models: Vec<String>,
    /// Requests in flight toward this upstream at most (0 = unlimited); over
    /// it, the next upstream in the route's chain is tried, else 503.
    #[serde(default)]
    pub max_in_flight: u32,
    /// Active health checks of the resolved endpoint addresses.
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    /// `max_tokens` sent to an Anthropic upstream when a converted request
    /// names none (Anthropic requires it).
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u64,
    /// Send `X-Forwarded-For` (the client's address appended to what trusted
    /// proxies said) and `X-Forwarded-Proto` to this upstream. Off by
    /// default: providers do not need the client's address, and forwarding
    /// headers a client sent are removed.
    #[serde(default)]
    pub forwarded_headers: bool,
    /// How many retries may be in flight toward this upstream at once
    /// (Envoy's `retry_budget`), so a provider in trouble is not hit with
    /// a multiple of its normal load.
    #[serde(default)]
    pub retry_budget: RetryBudgetConfig,
    /// What this upstream's models take, checked before the shipped table
    /// (`src/convert/capabilities.yaml`): rules of a `match` glob and the
    /// fields it sets (`reasoning`, `sampling_pair`, `parameters_json_schema`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<crate::config::capabilities::CapabilityRule>,
}

/// Retries in flight toward an upstream: at most `percent` of its active
/// requests, and `min_concurrency` whatever the load (a quiet upstream still
/// gets its retries).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudgetConfig {
    pub percent: f64,
    pub min_concurrency: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            percent: 20.0,
            min_concurrency: 3,
        }
    }
}

fn default_max_tokens() -> u64 {
    8192
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    /// A TCP connect (and TLS handshake for https endpoints).
    #[default]
    Tcp,
    /// `GET path`, healthy on any status below 500.
    Http,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    #[serde(rename = "type")]
    pub kind: HealthCheckKind,
    /// For `type: http`; setting it alone implies `http`.
    pub path: Option<String>,
    pub interval: HumanDuration,
    pub timeout: HumanDuration,
    /// Consecutive results that flip an address's health.
    pub rise: usize,
    pub fall: usize,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            kind: HealthCheckKind::Tcp,
            path: None,
            interval: Duration::from_secs(10).into(),
            timeout: Duration::from_secs(2).into(),
            rise: 1,
            fall: 1,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    pub connect: HumanDuration,
    /// Until the response headers arrive (a model "thinking" counts here).
    pub first_byte: HumanDuration,
    /// Longest silence between two reads of the response body.
    pub idle: HumanDuration,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5).into(),
            first_byte: Duration::from_secs(120).into(),
            idle: Duration::from_secs(300).into(),
        }
    }
}

/// The model name the mock upstream answers as when the request names none.
pub const MOCK_MODEL: &str = "mock-1";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MockConfig {
    /// Pause between two streamed events.
    pub chunk_interval: HumanDuration,
    /// The text every answer contains.
    pub reply: String,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            chunk_interval: Duration::from_millis(50).into(),
            reply: "Hello from the FastGate mock upstream! Configure a real provider in conf/fastgate.yaml to talk to a model.".into(),
        }
    }
}
