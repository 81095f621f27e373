//! What a request cost: a price table per model (and upstream), the cost of
//! a metered usage, and the estimate a money budget reserves before the call.
//!
//! The table is the operator's `pricing:` rules first, then the shipped
//! default (`conf/prices.yaml`, embedded), tried in order: the first rule
//! whose upstream, provider and model glob match, and whose `effective`
//! date the request is not before, prices the request. Matching is one
//! pass of a [`GlobSet`] over the model name (no per-rule regex, no cache
//! keyed by client text). A model no rule matches costs nothing and is
//! counted as unpriced (`fastgate_unpriced_requests_total`).

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;

/// The shipped table (`conf/prices.yaml`).
const BUILTIN: &str = include_str!("../conf/prices.yaml");

/// `pricing:` in `fastgate.yaml`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PricingConfig {
    /// Also use the shipped table (after `models`).
    pub builtin: bool,
    /// Names this table in each audit row's `price_version`; defaults to a
    /// digest of the rules, so a change of rates is a new version.
    pub version: Option<String>,
    /// The currency the rates (and so costs and budgets) are in. The
    /// shipped table is in USD: another currency needs `builtin: false`.
    pub currency: String,
    pub models: Vec<PriceRule>,
}

impl Default for PricingConfig {
    fn default() -> Self {
        PricingConfig {
            builtin: true,
            version: None,
            currency: "USD".into(),
            models: Vec::new(),
        }
    }
}

/// The shipped table's file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    currency: String,
    version: String,
    models: Vec<PriceRule>,
}

/// One line of a price table: what it matches and its rates.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PriceRule {
    /// A glob over the request's model (`*`, `?`, `[a-z]`, `{a,b}`),
    /// matched without regard to case. Every model when absent.
    #[serde(default)]
    pub model: Option<String>,
    /// Only requests sent to this upstream (by name).
    #[serde(default)]
    pub upstream: Option<String>,
    /// Only upstreams of this provider (`openai`, `anthropic`, `gemini`...).
    /// The embedded mock upstream matches every provider's rules.
    #[serde(default)]
    pub provider: Option<String>,
    /// `YYYY-MM-DD` (UTC): requests made before it skip this rule.
    #[serde(default)]
    pub effective: Option<String>,
    #[serde(flatten)]
    pub rates: Rates,
    #[serde(default)]
    pub long_context: Option<LongContext>,
}

/// Per million tokens, in the table's currency.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rates {
    pub input: f64,
    pub output: f64,
    /// Prompt-cache reads; `input` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input: Option<f64>,
    /// Prompt-cache writes; `input` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write: Option<f64>,
    /// Reasoning output; `output` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<f64>,
}

/// The rates of a request whose prompt is longer than `above` tokens.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LongContext {
    pub above: u64,
    #[serde(flatten)]
    pub rates: Rates,
}

/// A request's tokens as pricing reads them: `prompt` and `completion` are
/// the totals, the rest shares of them (`usage::Usage`'s meaning; this
/// module stands below `usage` and `config`, so it has its own type).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
    pub cache_read: u64,
    pub cache_write: u64,
    pub reasoning: u64,
}

/// The provider name that matches every rule's `provider` (the embedded
/// mock upstream answers as any provider).
pub const ANY_PROVIDER: &str = "mock";

/// A matched rule: its rates and the version of the table it is from.
#[derive(Debug, Clone, Copy)]
pub struct Price<'a> {
    pub rates: &'a Rates,
    pub long_context: Option<&'a LongContext>,
    pub version: &'a str,
}

const PER: f64 = 1_000_000.0;

impl Price<'_> {
    fn rates_for(&self, prompt: u64) -> &Rates {
        match self.long_context {
            Some(l) if prompt > l.above => &l.rates,
            _ => self.rates,
        }
    }

    /// The cost of `usage`: uncached input, cache reads, cache writes,
    /// output and reasoning, each at its rate. Parts larger than their
    /// total (a provider's odd report) are cut to it: never a negative part.
    pub fn cost(&self, t: &Tokens) -> f64 {
        let prompt = t.prompt;
        let r = self.rates_for(prompt);
        let read = t.cache_read.min(prompt);
        let write = t.cache_write.min(prompt - read);
        let plain = prompt - read - write;
        let output = t.completion;
        let reasoning = t.reasoning.min(output);
        let cost = plain as f64 * r.input
            + read as f64 * r.cached_input.unwrap_or(r.input)
            + write as f64 * r.cache_write.unwrap_or(r.input)
            + (output - reasoning) as f64 * r.output
            + reasoning as f64 * r.reasoning.unwrap_or(r.output);
        cost / PER
    }

    /// What a request may cost at most, as a budget reserves it: its
    /// prompt estimate at the input rate plus the output it allows at the
    /// output rate (reasoning at the dearer of the two output rates).
    pub fn estimate(&self, prompt_tokens: u64, output_tokens: u64) -> f64 {
        let r = self.rates_for(prompt_tokens);
        let output = r.output.max(r.reasoning.unwrap_or(0.0));
        (prompt_tokens as f64 * r.input + output_tokens as f64 * output) / PER
    }
}

/// A rule ready to match.
#[derive(Debug)]
struct Compiled {
    rule: PriceRule,
    /// Unix ms from which it applies.
    from_ms: i64,
    /// Index into `PriceTable::versions`.
    version: usize,
}

impl Compiled {
    /// Whether the rule is in effect at `at_ms` for `upstream` (of
    /// `provider`), whatever the model.
    fn applies(&self, upstream: &str, provider: &str, at_ms: i64) -> bool {
        at_ms >= self.from_ms
            && self.rule.upstream.as_deref().is_none_or(|u| u == upstream)
            && self
                .rule
                .provider
                .as_deref()
                .is_none_or(|p| provider == ANY_PROVIDER || p == provider)
    }
}

/// The compiled table: swapped whole on a config reload.
#[derive(Debug)]
pub struct PriceTable {
    rules: Vec<Compiled>,
    /// One glob per rule, same order.
    models: GlobSet,
    versions: Vec<String>,
    pub currency: String,
}

/// Why a `pricing:` section cannot be used (shown at load, per rule).
#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    #[error("pricing.models[{index}].model: {glob:?} is not a glob: {reason}")]
    Glob { index: usize, glob: String, reason: String },
    #[error("pricing.models[{index}].effective: {value:?} is not a date like 2026-12-01")]
    Date { index: usize, value: String },
    #[error("pricing.models[{index}]: rates are per million tokens, from 0 to {MAX_RATE}")]
    Rate { index: usize },
    #[error(
        "pricing.currency: {0:?} with the shipped table (in USD); set `builtin: false` to price in another currency"
    )]
    Currency(String),
    #[error("pricing.currency: {0:?} is not a currency code like USD or EUR")]
    CurrencyCode(String),
    #[error("the shipped price table does not parse: {0}")]
    Builtin(String),
}

/// The dearest rate a rule may set, per million tokens: far above any
/// model's, and low enough that a request's cost stays a sane number (with
/// counts at most `usage::scan::MAX_COUNT`).
pub const MAX_RATE: f64 = 1_000_000.0;

fn finite(r: &Rates) -> bool {
    [
        Some(r.input),
        Some(r.output),
        r.cached_input,
        r.cache_write,
        r.reasoning,
    ]
    .into_iter()
    .flatten()
    .all(|v| (0.0..=MAX_RATE).contains(&v))
}

fn day_ms(value: &str) -> Option<i64> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let date = time::Date::parse(value.trim(), &format).ok()?;
    Some(date.midnight().assume_utc().unix_timestamp() * 1000)
}

impl PriceTable {
    /// Build from the operator's `pricing:`; every problem is reported.
    pub fn build(config: &PricingConfig) -> Result<PriceTable, Vec<PricingError>> {
        let mut errors = Vec::new();
        let code = config.currency.trim();
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
            errors.push(PricingError::CurrencyCode(config.currency.clone()));
        }
        let mut sources: Vec<(String, Vec<PriceRule>)> = Vec::new();
        let own_version = config.version.clone().unwrap_or_else(|| digest(&config.models));
        sources.push((format!("config/{own_version}"), config.models.clone()));
        if config.builtin {
            match serde_norway::from_str::<TableFile>(BUILTIN) {
                Ok(t) => {
                    if t.currency != code {
                        errors.push(PricingError::Currency(config.currency.clone()));
                    }
                    sources.push((format!("builtin/{}", t.version), t.models));
                }
                Err(e) => errors.push(PricingError::Builtin(e.to_string())),
            }
        }
        let mut rules = Vec::new();
        let mut models = GlobSetBuilder::new();
        let mut versions = Vec::new();
        for (version, list) in sources {
            let v = versions.len();
            versions.push(version);
            let own = v == 0;
            for (index, rule) in list.into_iter().enumerate() {
                // Rules of the shipped table are numbered past the operator's.
                let index = if own { index } else { config.models.len() + index };
                let glob = rule.model.as_deref().unwrap_or("*");
                match GlobBuilder::new(glob)
                    .case_insensitive(true)
                    .literal_separator(false)
                    .build()
                {
                    Ok(g) => {
                        models.add(g);
                    }
                    Err(e) => errors.push(PricingError::Glob {
                        index,
                        glob: glob.to_string(),
                        reason: e.kind().to_string(),
                    }),
                }
                if !finite(&rule.rates) || rule.long_context.is_some_and(|l| !finite(&l.rates)) {
                    errors.push(PricingError::Rate { index });
                }
                let from_ms = match rule.effective.as_deref() {
                    None => i64::MIN,
                    Some(d) => day_ms(d).unwrap_or_else(|| {
                        errors.push(PricingError::Date {
                            index,
                            value: d.to_string(),
                        });
                        i64::MIN
                    }),
                };
                rules.push(Compiled {
                    rule,
                    from_ms,
                    version: v,
                });
            }
        }
        let models = match models.build() {
            Ok(m) => m,
            Err(e) => {
                errors.push(PricingError::Builtin(e.to_string()));
                GlobSet::empty()
            }
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(PriceTable {
            rules,
            models,
            versions,
            currency: code.to_string(),
        })
    }

    /// A table that prices nothing.
    pub fn empty() -> PriceTable {
        PriceTable {
            rules: Vec::new(),
            models: GlobSet::empty(),
            versions: Vec::new(),
            currency: "USD".into(),
        }
    }

    /// The price of `model` on `upstream` (a `provider` upstream) for a
    /// request made at `at_ms`; `None` when no rule prices it.
    pub fn price(&self, upstream: &str, provider: &str, model: &str, at_ms: i64) -> Option<Price<'_>> {
        thread_local! {
            static MATCHES: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
        }
        MATCHES
            .with_borrow_mut(|hits| {
                self.models.matches_into(model, hits);
                // `matches_into` lists indices in ascending order: rule order.
                hits.iter()
                    .map(|&i| &self.rules[i])
                    .find(|c| c.applies(upstream, provider, at_ms))
            })
            .map(|c| Price {
                rates: &c.rule.rates,
                long_context: c.rule.long_context.as_ref(),
                version: &self.versions[c.version],
            })
    }

    /// What `prompt` and `output` tokens may cost on `upstream` whatever
    /// the model: the dearest estimate among the rules that apply to the
    /// upstream and its provider. A budget's reservation for a request
    /// whose model no rule prices (an alias, none at all): the provider
    /// may still bill a model the table knows. `None` when no rule applies
    /// (a self-hosted upstream without rules).
    pub fn dearest_estimate(
        &self,
        upstream: &str,
        provider: &str,
        at_ms: i64,
        prompt: u64,
        output: u64,
    ) -> Option<f64> {
        self.rules
            .iter()
            .filter(|c| c.applies(upstream, provider, at_ms))
            .map(|c| {
                Price {
                    rates: &c.rule.rates,
                    long_context: c.rule.long_context.as_ref(),
                    version: &self.versions[c.version],
                }
                .estimate(prompt, output)
            })
            .reduce(f64::max)
    }

    /// Every rule in the order tried, with its version (the admin API's
    /// view of the table).
    pub fn rules(&self) -> impl Iterator<Item = (&PriceRule, &str)> {
        self.rules.iter().map(|c| (&c.rule, self.versions[c.version].as_str()))
    }
}

/// A short digest of the operator's rules: their version when unnamed.
fn digest(rules: &[PriceRule]) -> String {
    use sha2::Digest;
    let text = serde_json::to_string(rules).unwrap_or_default();
    hex::encode(&sha2::Sha256::digest(text.as_bytes())[..4])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(yaml: &str) -> PriceTable {
        let config: PricingConfig = serde_norway::from_str(yaml).expect("pricing yaml");
        PriceTable::build(&config).expect("valid table")
    }

    fn usage(prompt: u64, completion: u64, cache_read: u64, cache_write: u64, reasoning: u64) -> Tokens {
        Tokens {
            prompt,
            completion,
            cache_read,
            cache_write,
            reasoning,
        }
    }

    const NOW: i64 = 1_796_000_000_000; // 2026-11

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// Hand-computed against conf/prices.yaml's rates (per million tokens).
    #[test]
    fn the_shipped_table_prices_each_providers_usage_shape() {
        let t = table("{}");
        // OpenAI gpt-4o: 2006 prompt of which 1920 cached, 300 output.
        // (86 × 2.50 + 1920 × 1.25 + 300 × 10.00) / 1e6 = 0.005615
        let p = t.price("openai", "openai", "gpt-4o-2024-08-06", NOW).expect("gpt-4o");
        assert!(
            close(p.cost(&usage(2006, 300, 1920, 0, 0)), 0.005615),
            "{}",
            p.cost(&usage(2006, 300, 1920, 0, 0))
        );
        assert!(p.version.starts_with("builtin/"));
        // o4-mini with reasoning (billed as output): 1500 in (1024 cached), 700 out.
        // (476 × 1.10 + 1024 × 0.275 + 700 × 4.40) / 1e6 = 0.0038852
        let p = t.price("openai", "openai", "o4-mini", NOW).expect("o4-mini");
        assert!(close(p.cost(&usage(1500, 700, 1024, 0, 512)), 0.0038852));
        // Anthropic claude-sonnet-4-5: input 50, cache write 2000, read 8000, output 120.
        // (50 × 3 + 2000 × 3.75 + 8000 × 0.30 + 120 × 15) / 1e6 = 0.01185
        let p = t
            .price("anthropic", "anthropic", "claude-sonnet-4-5-20250929", NOW)
            .expect("sonnet");
        assert!(close(p.cost(&usage(10_050, 120, 8000, 2000, 0)), 0.01185));
        // Gemini 2.5 Flash: 5000 prompt (4096 cached), 200 + 800 thoughts out.
        // (904 × 0.30 + 4096 × 0.075 + 1000 × 2.50) / 1e6 = 0.0030784
        let p = t.price("gemini", "gemini", "gemini-2.5-flash", NOW).expect("flash");
        assert!(close(p.cost(&usage(5000, 1000, 4096, 0, 800)), 0.0030784));
        // Gemini 2.5 Pro above 200k prompt tokens: the long-context rates.
        // (250000 × 2.50 + 1000 × 15) / 1e6 = 0.64
        let p = t.price("gemini", "gemini", "gemini-2.5-pro", NOW).expect("pro");
        assert!(close(p.cost(&usage(250_000, 1000, 0, 0, 0)), 0.64));
        assert!(close(p.cost(&usage(200_000, 1000, 0, 0, 0)), 0.26));
    }

    #[test]
    fn specific_names_win_over_their_prefixes_and_dates_pick_the_rate() {
        let t = table("{}");
        let input = |m: &str, at| t.price("x", "openai", m, at).map(|p| p.rates.input);
        assert_eq!(input("gpt-4o-mini", NOW), Some(0.15));
        assert_eq!(input("GPT-4o", NOW), Some(2.50), "case does not matter");
        assert_eq!(input("gpt-4o", NOW), Some(2.50));
        assert_eq!(input("gpt-4.1-mini-2025-04-14", NOW), Some(0.40));
        assert_eq!(
            input("gpt-4o-evil", NOW),
            None,
            "a suffix that is no date is not gpt-4o"
        );
        let read = |at| {
            t.price("a", "anthropic", "claude-sonnet-5-5", at)
                .and_then(|p| p.rates.cached_input)
        };
        assert_eq!(read(NOW), Some(0.10));
        assert_eq!(read(day_ms("2026-10-06").expect("date")), Some(0.20));
        assert!(
            t.price("x", "openai", "claude-sonnet-4-5", NOW).is_none(),
            "another provider's model"
        );
        assert!(
            t.price("x", "mock", "claude-sonnet-4-5", NOW).is_some(),
            "the mock answers as any"
        );
        assert!(
            t.price("x", "openai_compatible", "gpt-4o", NOW).is_none(),
            "self-hosted: not the provider's rate"
        );
    }

    #[test]
    fn the_operators_rules_come_first() {
        let t = table(
            "version: q4
models:
  - { upstream: vllm, input: 0, output: 0 }
  - { model: 'gpt-4o', input: 2.0, output: 8.0, cached_input: 1.0 }
  - { model: 'llama-*', provider: openai_compatible, input: 0.1, output: 0.2 }",
        );
        let p = t
            .price("vllm", "openai_compatible", "anything", NOW)
            .expect("per upstream");
        assert_eq!(p.cost(&usage(1000, 1000, 0, 0, 0)), 0.0);
        assert_eq!(p.version, "config/q4");
        let p = t.price("openai", "openai", "gpt-4o", NOW).expect("own rate");
        assert_eq!(p.rates.input, 2.0);
        let p = t.price("lab", "openai_compatible", "Llama-3-70b", NOW).expect("glob");
        assert!(close(p.cost(&usage(1_000_000, 500_000, 0, 0, 0)), 0.2));
        assert_eq!(
            t.price("openai", "openai", "gpt-4o-mini", NOW)
                .map(|p| p.version.starts_with("builtin/")),
            Some(true)
        );
    }

    #[test]
    fn without_the_shipped_table_only_the_rules_price() {
        let t = table("builtin: false\ncurrency: EUR\nmodels: [{ model: 'm', input: 1, output: 1 }]");
        assert_eq!(t.currency, "EUR");
        assert!(t.price("o", "openai", "gpt-4o", NOW).is_none());
        assert!(t.price("o", "openai", "m", NOW).is_some());
    }

    #[test]
    fn bad_rules_are_all_reported() {
        let config: PricingConfig = serde_norway::from_str(
            "currency: EUR
models:
  - { model: 'gpt-[', input: 1, output: 1 }
  - { model: 'x', input: -1, output: 1 }
  - { model: 'y', input: .nan, output: 1 }
  - { model: 'z', effective: '2026-13-01', input: 1, output: 1 }",
        )
        .expect("yaml");
        let errors = PriceTable::build(&config)
            .expect_err("invalid")
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>();
        assert_eq!(errors.len(), 5, "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("models[0].model")));
        assert!(errors.iter().any(|e| e.contains("models[1]: rates")));
        assert!(errors.iter().any(|e| e.contains("models[2]: rates")));
        assert!(errors.iter().any(|e| e.contains("models[3].effective")));
        assert!(errors.iter().any(|e| e.contains("builtin: false")));
    }

    #[test]
    fn odd_reports_never_make_a_negative_part() {
        let t = table("builtin: false\nmodels: [{ input: 1, output: 2, cached_input: 0.5 }]");
        let p = t.price("u", "openai", "m", NOW).expect("catch-all");
        // More cached than prompt, more reasoning than output: cut to the totals.
        assert!(close(p.cost(&usage(10, 5, 50, 50, 99)), (10.0 * 0.5 + 5.0 * 2.0) / PER));
        assert_eq!(p.cost(&Tokens::default()), 0.0);
        let huge = usage(u64::MAX, u64::MAX, 0, 0, 0);
        assert!(p.cost(&huge).is_finite());
        assert!(close(p.estimate(1000, 500), (1000.0 + 1000.0) / PER));
    }
}
