//! A wrapper that keeps secrets out of logs, errors and debug output.

use std::fmt;

/// A secret string. `Debug` and `Display` print a mask; reading the value is
/// an explicit [`Secret::expose`] call, so a leak is visible in review.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The clear value. Call only where the secret must leave the process
    /// (an upstream request header) or be hashed.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A masked form that is safe to show: the first and last four characters.
    pub fn masked(&self) -> String {
        mask(&self.0)
    }
}

/// Mask a secret as `abcd…wxyz` (or `…` alone when it is too short to hint at).
pub fn mask(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    if chars.len() < 12 {
        return "…".to_string();
    }
    let head: String = chars[..6].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.masked())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("sk-test-1234567890abcdef");
        assert!(!format!("{s:?}").contains("1234567890"));
        assert!(!format!("{s}").contains("1234567890"));
        assert_eq!(s.masked(), "sk-tes…cdef");
        assert_eq!(mask("short"), "…");
    }
}
