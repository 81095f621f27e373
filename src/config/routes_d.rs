//! `routes.d/*.yaml`: route files, loaded in name order into one route table.
//! Any invalid file fails the whole load, so a reload either swaps in a table
//! built from every file or keeps the previous one.

use super::OneOrMany;
use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesFile {
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

/// The API format clients speak on a route.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Openai,
    Anthropic,
    Gemini,
    /// OpenAI's Responses API (`POST /v1/responses`, Codex CLI): passed
    /// through to OpenAI, converted toward every other provider.
    Responses,
    /// Whatever the upstream speaks; FastGate does not look into it.
    #[default]
    Passthrough,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::Anthropic => "anthropic",
            Self::Gemini => "gemini",
            Self::Responses => "responses",
            Self::Passthrough => "passthrough",
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    #[default]
    Required,
    None,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: MatchConfig,
    #[serde(default = "default_priority")]
    pub priority: i32,
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default)]
    pub format: Format,
    #[serde(default)]
    pub auth: AuthMode,
    #[serde(default)]
    pub permissions: Vec<String>,
    /// One upstream, or a list tried in order (the rest act as `fallback`).
    pub upstream: OneOrMany<String>,
    #[serde(default)]
    pub fallback: Vec<String>,
    #[serde(default)]
    pub model_map: BTreeMap<String, String>,
    #[serde(default)]
    pub transform: TransformConfig,
    /// Overrides the upstream's `first_byte` timeout on this route.
    #[serde(default)]
    pub timeout: Option<super::HumanDuration>,
    #[serde(default)]
    pub retries: u32,
    /// Forward the client's provider-account headers (`OpenAI-Organization`,
    /// `OpenAI-Project`, `x-goog-user-project`) to a pooled upstream. Off by
    /// default: with them a client picks the account the pool key is billed
    /// to, and a wrong one makes the provider refuse (and FastGate disable)
    /// the pool key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forward_account_headers: bool,
    /// The endpoint may be called twice for one request (a retry after a
    /// 5xx, a timeout or a connection lost after the body was sent cannot
    /// double-bill): off for generation endpoints, which bill each call.
    #[serde(default)]
    pub idempotent: bool,
    /// Per gateway key, on this route.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Money per period spent through this route, all clients together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<crate::budget::Budget>,
    /// Clients that ask to stream get a stream made from the upstream's
    /// whole answer: the upstream is asked without streaming, the client
    /// gets its stream header and keepalives at once (short first-byte
    /// timeouts survive slow reasoning models), then the whole answer as
    /// its format's stream.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fake_stream: bool,
    /// How often a fake stream's keepalive is sent while the upstream
    /// thinks (default 5 s; 1 s to 60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fake_stream_keepalive: Option<super::HumanDuration>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
}

fn default_priority() -> i32 {
    100
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    pub path: String,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub model: OneOrMany<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    #[serde(default)]
    pub strip_prefix: Option<String>,
    #[serde(default)]
    pub rewrite_path: Option<String>,
    #[serde(default)]
    pub set_headers: BTreeMap<String, String>,
    #[serde(default)]
    pub remove_headers: Vec<String>,
    #[serde(default)]
    pub set_body: Option<serde_json::Value>,
}

/// The `*.yaml` / `*.yml` files of `dir`, in name order.
pub fn route_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    Ok(files)
}

/// One route as the text of a routes file (`routes: [ … ]`), for editing.
pub fn route_yaml(route: &RouteConfig) -> String {
    serde_norway::to_string(&RoutesFile {
        routes: vec![route.clone()],
    })
    .unwrap_or_default()
}

/// The line of the `n`-th (0-based) line containing `needle`; line 1 if absent.
pub(crate) fn nth_line_of(text: &str, needle: &str, n: usize) -> usize {
    // `name: ok` must not match `name: okay`: the needle ends at a boundary.
    let holds = |line: &str| {
        line.match_indices(needle).any(|(i, _)| {
            line[i + needle.len()..]
                .chars()
                .next()
                .is_none_or(|c| c.is_whitespace() || matches!(c, ',' | '}' | '#'))
        })
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| holds(l))
        .nth(n)
        .map_or(1, |(i, _)| i + 1)
}
