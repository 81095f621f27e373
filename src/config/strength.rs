//! The minimum strength of the secrets FastGate is given (`admin.token`,
//! `admin.jwt_secret`, `admin.metrics_token`, `secrets.master_key`).
//!
//! Each one alone guards the whole gateway (an admin bearer, the key that
//! signs every login token, the key that seals stored secrets), and none of
//! them is rate limited the way a password is, so a short or patterned
//! value is refused at startup and by `fastgate check` instead of being
//! guessed later. The rule is deliberately simple to state and check:
//!
//! * at least [`MIN_CHARS`] characters (32: the length of 128 bits in hex,
//!   24 bytes in base64), and
//! * at least [`MIN_DISTINCT`] distinct characters, which refuses
//!   `aaaa…`, `abab…` and `0000…1` however long they are.
//!
//! It cannot prove randomness; it refuses what is certainly not random.

/// Fewest characters a secret may have.
pub const MIN_CHARS: usize = 32;
/// Fewest distinct characters a secret may have.
pub const MIN_DISTINCT: usize = 8;

/// The command the messages suggest (44 characters, 256 random bits).
pub const GENERATE_HINT: &str = "generate one with `openssl rand -base64 32`";

/// Why `value` is too weak to be the secret `setting`, or `None` when it is
/// acceptable. An empty value means "not set" and is always accepted.
pub fn weakness(setting: &str, value: &str) -> Option<String> {
    if value.is_empty() {
        return None;
    }
    let chars = value.chars().count();
    if chars < MIN_CHARS {
        return Some(format!(
            "{setting} is too weak: {chars} characters, at least {MIN_CHARS} random ones are required; {GENERATE_HINT}"
        ));
    }
    let mut distinct: Vec<char> = value.chars().collect();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() < MIN_DISTINCT {
        return Some(format!(
            "{setting} is too weak: only {} distinct characters (a repeated pattern), at least {MIN_DISTINCT} are required; {GENERATE_HINT}",
            distinct.len()
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_patterned_secrets_are_refused_and_generated_ones_pass() {
        assert_eq!(weakness("admin.token", ""), None, "unset is fine");
        let short = weakness("admin.token", "t0k3n-for-tests").unwrap_or_default();
        assert!(short.starts_with("admin.token is too weak: 15 characters"), "{short}");
        assert!(short.contains("openssl rand -base64 32"), "{short}");
        let repeated = weakness("secrets.master_key", &"a".repeat(64)).unwrap_or_default();
        assert!(repeated.contains("only 1 distinct"), "{repeated}");
        assert!(weakness("x", &"ab".repeat(40)).is_some());
        assert!(weakness("x", &"0123456".repeat(10)).is_some(), "7 distinct");
        // `openssl rand -hex 16` and `-base64 32` outputs.
        assert_eq!(weakness("x", "9f86d081884c7d659a2feaa0c55ad015"), None);
        assert_eq!(weakness("x", "q3v1Yc0m7+G0yJ6l0m6b8o6r1w2Z6t9w0H3r8Wm8f1A="), None);
        // Counted in characters, not bytes.
        assert!(weakness("x", &"é".repeat(20)).is_some());
    }
}
