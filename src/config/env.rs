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
}
