//! What a model takes, for the request converters: a shipped table
//! (`capabilities.yaml`, defaults per provider and rules by model glob) that
//! an upstream's `capabilities:` in `fastgate.yaml` override, consulted
//! instead of guessing from names in the encoders.

use crate::config::Provider;
use serde::Deserialize;
use std::{collections::BTreeMap, sync::LazyLock};

pub use crate::config::capabilities::{CapabilityFields, CapabilityRule, valid_pattern};

impl CapabilityRule {
    fn matcher(&self) -> Option<globset::GlobMatcher> {
        globset::GlobBuilder::new(&self.pattern)
            .case_insensitive(true)
            .build()
            .ok()
            .map(|g| g.compile_matcher())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderTable {
    #[serde(default)]
    default: CapabilityFields,
    #[serde(default)]
    models: Vec<CapabilityRule>,
}

/// A provider's rules with their globs compiled.
struct Compiled {
    default: CapabilityFields,
    rules: Vec<(globset::GlobMatcher, CapabilityFields)>,
}

/// The shipped table, by provider name, compiled once.
static SHIPPED: LazyLock<BTreeMap<String, Compiled>> = LazyLock::new(|| {
    let tables: BTreeMap<String, ProviderTable> = serde_norway::from_str(include_str!("capabilities.yaml"))
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "The shipped capability table does not parse; using built-in defaults.");
            BTreeMap::new()
        });
    tables
        .into_iter()
        .map(|(provider, t)| {
            let rules = t
                .models
                .iter()
                .filter_map(|r| r.matcher().map(|m| (m, r.fields)))
                .collect();
            (
                provider,
                Compiled {
                    default: t.default,
                    rules,
                },
            )
        })
        .collect()
});

/// What a model takes, all fields decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub reasoning: bool,
    pub sampling_pair: bool,
    pub parameters_json_schema: bool,
    pub prompt_cache: bool,
    pub max_output: Option<u64>,
}

/// The capabilities of `model` on an upstream of `provider` whose own rules
/// are `overrides` (checked first, in order).
pub fn lookup(provider: Provider, model: &str, overrides: &[CapabilityRule]) -> Capabilities {
    let table = SHIPPED.get(provider.name());
    let model = model.strip_prefix("models/").unwrap_or(model);
    let own = overrides
        .iter()
        .filter(|r| r.matcher().is_some_and(|m| m.is_match(model)))
        .map(|r| r.fields);
    let shipped = table
        .map_or(&[][..], |t| t.rules.as_slice())
        .iter()
        .filter(|(m, _)| m.is_match(model))
        .map(|(_, f)| *f);
    let rules = own.chain(shipped).chain(table.map(|t| t.default));
    let mut out = CapabilityFields::default();
    for f in rules {
        out.reasoning = out.reasoning.or(f.reasoning);
        out.sampling_pair = out.sampling_pair.or(f.sampling_pair);
        out.parameters_json_schema = out.parameters_json_schema.or(f.parameters_json_schema);
        out.prompt_cache = out.prompt_cache.or(f.prompt_cache);
        out.max_output = out.max_output.or(f.max_output);
    }
    Capabilities {
        reasoning: out.reasoning.unwrap_or(false),
        sampling_pair: out.sampling_pair.unwrap_or(false),
        parameters_json_schema: out.parameters_json_schema.unwrap_or(false),
        prompt_cache: out.prompt_cache.unwrap_or(false),
        max_output: out.max_output.filter(|m| *m > 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_table_parses_and_decides_by_model() {
        assert!(!SHIPPED.is_empty());
        let reasons = |m| lookup(Provider::Openai, m, &[]).reasoning;
        assert!(reasons("o3") && reasons("o4-mini") && reasons("gpt-5") && reasons("GPT-5.1"));
        assert!(!reasons("gpt-4.1") && !reasons("gpt-5-chat-latest") && !reasons("omni-x"));
        assert!(!lookup(Provider::OpenaiCompatible, "o3", &[]).reasoning);
        let pair = |m| lookup(Provider::Anthropic, m, &[]).sampling_pair;
        assert!(pair("claude-3-7-sonnet-latest") && pair("claude-sonnet-4-20250514"));
        assert!(!pair("claude-sonnet-4-5") && !pair("claude-opus-4-1") && !pair("claude-haiku-4-5"));
        assert!(!lookup(Provider::Gemini, "models/gemini-2.5-pro", &[]).parameters_json_schema);
        assert!(lookup(Provider::Anthropic, "claude-sonnet-4-5", &[]).prompt_cache);
        let off: Vec<CapabilityRule> = serde_norway::from_str("- {match: '*', prompt_cache: false}").unwrap();
        assert!(!lookup(Provider::Anthropic, "claude-sonnet-4-5", &off).prompt_cache);
        let max = |p, m| lookup(p, m, &[]).max_output;
        assert_eq!(max(Provider::Openai, "gpt-4o-2024-08-06"), Some(16_384));
        assert_eq!(max(Provider::Openai, "gpt-4o-mini"), Some(16_384));
        assert_eq!(max(Provider::Anthropic, "claude-3-5-haiku-latest"), Some(8_192));
        assert_eq!(max(Provider::Anthropic, "claude-sonnet-4-5-20250929"), Some(64_000));
        assert_eq!(max(Provider::Anthropic, "claude-opus-4-1"), Some(32_000));
        assert_eq!(max(Provider::Gemini, "models/gemini-2.5-pro"), Some(65_536));
        // A model the table does not know is not limited by it.
        assert_eq!(max(Provider::Anthropic, "claude-opus-5"), None);
        assert_eq!(max(Provider::OpenaiCompatible, "llama-3.1-70b"), None);
    }

    #[test]
    fn an_upstreams_rules_come_first_and_fill_only_what_they_name() {
        let rules: Vec<CapabilityRule> =
            serde_norway::from_str("- {match: 'deepseek-r*', reasoning: true}\n- {match: '*', sampling_pair: true}")
                .unwrap();
        let c = lookup(Provider::OpenaiCompatible, "deepseek-r1", &rules);
        assert!(c.reasoning && c.sampling_pair);
        let c = lookup(Provider::Openai, "gpt-5-chat-latest", &rules);
        assert!(
            !c.reasoning,
            "the shipped rule still decides what the override leaves out"
        );
        assert!(valid_pattern("o[0-9*").is_err());
    }
}
