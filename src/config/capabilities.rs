//! `capabilities:` rules of an upstream as plain data; `convert::capabilities`
//! compiles and consults them.

use serde::{Deserialize, Serialize};

/// Fields a rule sets; the ones it leaves out come from the next rule down
/// (then the provider's default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityFields {
    /// OpenAI: a reasoning model (`max_completion_tokens`, `reasoning_effort`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<bool>,
    /// Anthropic: `temperature` and `top_p` accepted together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling_pair: Option<bool>,
    /// Gemini: tools as `parametersJsonSchema` (full JSON Schema).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters_json_schema: Option<bool>,
    /// Anthropic: `cache_control` breakpoints placed for clients of other
    /// formats (which cannot place them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_cache: Option<bool>,
    /// Every provider: the most output tokens the model gives; a client's
    /// larger `max_tokens` is lowered to it (unset: not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output: Option<u64>,
}

/// A rule: the models it applies to (a case-insensitive glob) and what it sets.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityRule {
    #[serde(rename = "match")]
    pub pattern: String,
    #[serde(flatten)]
    pub fields: CapabilityFields,
}

/// Whether `pattern` is a valid rule glob (for config validation).
pub fn valid_pattern(pattern: &str) -> Result<(), String> {
    globset::Glob::new(pattern).map(|_| ()).map_err(|e| e.to_string())
}
