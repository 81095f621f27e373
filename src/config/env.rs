//! `${VAR}` and `${VAR:-default}` interpolation of environment variables,
//! applied to the raw file text before YAML parsing so that line numbers in
//! later errors still point at the operator's file. `$$` is a literal `$`.

use regex::{Captures, Regex};
use std::sync::LazyLock;

static VAR: LazyLock<Regex> = LazyLock::new(|| {
    #[allow(clippy::unwrap_used)] // a constant pattern, checked by the tests
    Regex::new(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}").unwrap()
});

/// An unset variable without a default, with the 1-based line it appears on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingVar {
    pub name: String,
    pub line: usize,
}

/// Interpolate `text` with `lookup`. Returns the new text or every variable
/// that is unset and has no default.
pub fn interpolate(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, Vec<MissingVar>> {
    let mut missing = Vec::new();
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let (line, comment) = line.split_at(comment_start(line));
        let replaced = VAR.replace_all(line, |c: &Captures| {
            let Some(name) = c.get(1) else {
                return "$".to_string();
            };
            match (lookup(name.as_str()), c.get(3)) {
                (Some(v), _) if !v.is_empty() || c.get(3).is_none() => v,
                (_, Some(default)) => default.as_str().to_string(),
                (None, None) => {
                    missing.push(MissingVar {
                        name: name.as_str().to_string(),
                        line: i + 1,
                    });
                    String::new()
                }
                (Some(v), None) => v,
            }
        });
        out.push_str(&replaced);
        out.push_str(comment);
    }
    if missing.is_empty() { Ok(out) } else { Err(missing) }
}

/// Where a YAML comment starts on `line` (its length if none): a `#` at the
/// start or after white space, outside quotes. Comments are not interpolated.
fn comment_start(line: &str) -> usize {
    let (mut single, mut double) = (false, false);
    let mut prev_space = true;
    for (i, ch) in line.char_indices() {
        match ch {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if prev_space && !single && !double => return i,
            _ => {}
        }
        prev_space = ch.is_whitespace();
    }
    line.len()
}

/// The variables `text` references (`${NAME}`, `${NAME:-default}`), outside
/// comments and `$$` escapes, each once, in order of first use.
pub fn referenced(text: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for line in text.split_inclusive('\n') {
        let line = &line[..comment_start(line)];
        for c in VAR.captures_iter(line) {
            if let Some(name) = c.get(1)
                && !names.iter().any(|n| n == name.as_str())
            {
                names.push(name.as_str().to_string());
            }
        }
    }
    names
}

/// Sections of the main config file whose variables hold secrets: the
/// master key, the admin token and JWT secret, pool keys, database and
/// cluster credentials (a Redis or Postgres URL carries a password).
const SECRET_SECTIONS: [&str; 4] = ["secrets", "admin", "database", "cluster"];

/// The variables the main config file (its raw, uninterpolated `text`)
/// uses for secrets: everything referenced under [`SECRET_SECTIONS`] and
/// under `key_pools.*.keys`. With every `FASTGATE_*` variable, these are
/// what a route written through the admin API may not reference: the route
/// would carry the value to an upstream or into a dry run.
pub fn secret_vars(text: &str) -> Vec<String> {
    fn strings(v: &serde_norway::Value, out: &mut Vec<String>) {
        match v {
            serde_norway::Value::String(s) => out.push(s.clone()),
            serde_norway::Value::Sequence(items) => items.iter().for_each(|i| strings(i, out)),
            serde_norway::Value::Mapping(m) => m.values().for_each(|i| strings(i, out)),
            serde_norway::Value::Tagged(t) => strings(&t.value, out),
            _ => {}
        }
    }
    // Comments hold no values; dropping them keeps `# ${X}` out of the list.
    let Ok(doc) = serde_norway::from_str::<serde_norway::Value>(text) else {
        return Vec::new();
    };
    let mut values = Vec::new();
    for section in SECRET_SECTIONS {
        if let Some(v) = doc.get(section) {
            strings(v, &mut values);
        }
    }
    if let Some(serde_norway::Value::Mapping(pools)) = doc.get("key_pools") {
        for pool in pools.values() {
            if let Some(keys) = pool.get("keys") {
                strings(keys, &mut values);
            }
        }
    }
    let mut names = Vec::new();
    for v in &values {
        for name in referenced(v) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

/// Whether a route written through the admin API may reference `name`.
pub fn is_secret_var(name: &str, secret_vars: &[String]) -> bool {
    name.starts_with("FASTGATE_") || secret_vars.iter().any(|v| v == name)
}

/// Values shorter than this are masked only where they are a whole string:
/// masking `1` inside every number would garble an answer and protects
/// nothing (no secret is that short).
const MASK_MIN: usize = 8;

/// Masks values that came from the environment wherever the admin API
/// would show them: each is replaced by `${NAME}`, what the operator wrote.
/// Interpolation happens on the raw text (line numbers stay right), so the
/// values are found again by content rather than tracked through parsing.
#[derive(Debug, Default, Clone)]
pub struct EnvMask {
    /// (value, `${NAME}`), longest value first so that a value holding
    /// another is replaced whole.
    values: Vec<(String, String)>,
}

impl EnvMask {
    /// A mask for the variables `names`, read with `lookup` (unset and
    /// empty ones mask nothing).
    pub fn new(names: impl IntoIterator<Item = String>, lookup: impl Fn(&str) -> Option<String>) -> Self {
        let mut values: Vec<(String, String)> = names
            .into_iter()
            .filter_map(|n| lookup(&n).filter(|v| !v.is_empty()).map(|v| (v, format!("${{{n}}}"))))
            .collect();
        values.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        values.dedup_by(|a, b| a.0 == b.0);
        EnvMask { values }
    }

    /// `text` with every environment value replaced by its `${NAME}`.
    pub fn mask_str<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        let mut out = std::borrow::Cow::Borrowed(text);
        for (value, name) in &self.values {
            if value.len() < MASK_MIN {
                if out == value.as_str() {
                    out = std::borrow::Cow::Owned(name.clone());
                }
            } else if out.contains(value.as_str()) {
                out = std::borrow::Cow::Owned(out.replace(value.as_str(), name));
            }
        }
        out
    }

    /// Mask every string (and object key) of a JSON answer in place.
    pub fn mask_json(&self, v: &mut serde_json::Value) {
        use serde_json::Value;
        if self.values.is_empty() {
            return;
        }
        match v {
            Value::String(s) => {
                if let std::borrow::Cow::Owned(m) = self.mask_str(s) {
                    *s = m;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|i| self.mask_json(i)),
            Value::Object(map) => {
                let old = std::mem::take(map);
                for (k, mut val) in old {
                    self.mask_json(&mut val);
                    map.insert(self.mask_str(&k).into_owned(), val);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SET" => Some("value".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn interpolates_defaults_and_escapes() {
        let out = interpolate("a: ${SET}\nb: ${UNSET:-dflt}\nc: ${EMPTY:-x}\nd: $${SET}\n", env);
        assert_eq!(out.unwrap(), "a: value\nb: dflt\nc: x\nd: ${SET}\n");
        assert_eq!(interpolate("e: ${EMPTY}", env).unwrap(), "e: ");
        assert_eq!(interpolate("f: ${UNSET:-}", env).unwrap(), "f: ");
    }

    #[test]
    fn comments_are_left_alone() {
        let out = interpolate("# uses ${NOPE}\na: ${SET} # or ${NOPE}\nb: \"x # ${SET}\"\n", env);
        assert_eq!(
            out.unwrap(),
            "# uses ${NOPE}\na: value # or ${NOPE}\nb: \"x # value\"\n"
        );
    }

    #[test]
    fn reports_every_missing_variable_with_its_line() {
        let err = interpolate("a: 1\nb: ${NOPE}\nc: ${ALSO_NOPE}\n", env).unwrap_err();
        assert_eq!(
            err,
            vec![
                MissingVar {
                    name: "NOPE".into(),
                    line: 2
                },
                MissingVar {
                    name: "ALSO_NOPE".into(),
                    line: 3
                }
            ]
        );
    }

    #[test]
    fn secret_variables_are_named_by_their_section() {
        let text = "admin:\n  token: ${ADMIN_TOK}\nsecrets: {master_key: \"${MK:-x}\"}\nkey_pools:\n  p:\n    keys: ['${POOL_A}', {key: '${POOL_B}', weight: 2}]\n    strategy: round_robin\nupstreams:\n  u: {provider: openai, endpoints: ['${BASE}']}\n# admin: ${IN_COMMENT}\n";
        assert_eq!(secret_vars(text), ["MK", "ADMIN_TOK", "POOL_A", "POOL_B"]);
        assert!(is_secret_var("FASTGATE_ANYTHING", &[]));
        assert!(is_secret_var("POOL_B", &secret_vars(text)));
        assert!(!is_secret_var("BASE", &secret_vars(text)));
        assert_eq!(referenced("a: ${A} $${B} ${C:-d} ${A} # ${E}"), ["A", "C"]);
    }

    #[test]
    fn the_mask_replaces_values_with_their_names() {
        let lookup = |n: &str| match n {
            "LONG" => Some("secret-value".to_string()),
            "LONGER" => Some("secret-value-2".to_string()),
            other => env(other),
        };
        let names = ["LONG", "LONGER", "SET", "EMPTY", "NOPE"].map(String::from);
        let mask = EnvMask::new(names, lookup);
        assert_eq!(mask.mask_str("Bearer secret-value!"), "Bearer ${LONG}!");
        assert_eq!(mask.mask_str("secret-value-2"), "${LONGER}", "the longer value first");
        assert_eq!(mask.mask_str("a value"), "a value", "short values only when whole");
        let mut v = serde_json::json!({"h": {"x": "value", "secret-value": 1}, "l": ["asecret-valuea", 3]});
        mask.mask_json(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"h": {"x": "${SET}", "${LONG}": 1}, "l": ["a${LONG}a", 3]})
        );
        let short = EnvMask::new(["S".to_string()], |_| Some("1".into()));
        assert_eq!(short.mask_str("1"), "${S}");
        assert_eq!(short.mask_str("x1"), "x1");
    }
}
