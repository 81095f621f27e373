//! Bounds on the names and lists the admin API, the CLI and the store accept
//! for users and keys: every one of them is kept in memory by the data
//! plane's key cache, written to the admin audit trail and shown in logs, so
//! an unbounded field is memory, disk and log volume an attacker chooses.

use super::StoreError;

/// Most characters in a key name.
pub const MAX_NAME: usize = 128;
/// Most characters in an owner name a key carries (a username or a team).
pub const MAX_OWNER: usize = 64;
/// Most bytes of a password (the argon2 input; longer adds nothing).
pub const MAX_PASSWORD: usize = 1024;
/// Most permission tags on a key or a ceiling, and their length.
pub const MAX_TAGS: usize = 32;
pub const MAX_TAG: usize = 64;
/// Most entries in an allowed routes or models list, and their length.
pub const MAX_LIST: usize = 256;
pub const MAX_ENTRY: usize = 256;

fn invalid(field: &str, message: impl std::fmt::Display) -> StoreError {
    StoreError::Field(format!("{field}: {message}"))
}

/// The Unicode `Bidi_Control` characters: they reorder the text around
/// them when shown, so a name holding one reads differently from what it
/// is ("Trojan Source"; Unicode TR9, table 4).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// A name shown to people: not empty, at most `max` characters, and no
/// control characters (NUL, newlines, escapes) that would cut or forge log
/// lines, CSV cells or terminal output, nor bidirectional controls that
/// would make it read as another name in the UI.
pub fn name(field: &str, value: &str, max: usize) -> Result<(), StoreError> {
    if value.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.chars().count() > max {
        return Err(invalid(field, format_args!("at most {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "control characters (such as NUL) are not allowed"));
    }
    if value.chars().any(is_bidi_control) {
        return Err(invalid(
            field,
            "bidirectional control characters (such as U+202E) are not allowed",
        ));
    }
    Ok(())
}

/// A list of names: at most `max_len` entries, each a [`name`] of at most
/// `max_entry` characters.
pub fn list(field: &str, values: &[String], max_len: usize, max_entry: usize) -> Result<(), StoreError> {
    if values.len() > max_len {
        return Err(invalid(field, format_args!("at most {max_len} entries")));
    }
    values.iter().try_for_each(|v| name(field, v, max_entry))
}

/// The three lists a key and a ceiling share.
pub fn limit_lists(permissions: &[String], routes: &[String], models: &[String]) -> Result<(), StoreError> {
    list("permissions", permissions, MAX_TAGS, MAX_TAG)?;
    list("allowed_routes", routes, MAX_LIST, MAX_ENTRY)?;
    list("allowed_models", models, MAX_LIST, MAX_ENTRY)
}

/// A new password: long enough to resist guessing, short enough that
/// hashing it costs what every other password costs.
pub fn password(value: &str, min: usize) -> Result<(), StoreError> {
    if value.chars().count() < min {
        return Err(invalid("password", format_args!("must be at least {min} characters")));
    }
    if value.len() > MAX_PASSWORD {
        return Err(invalid("password", format_args!("at most {MAX_PASSWORD} bytes")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_lists_are_bounded() {
        for good in ["ci key", "ключ", "مفتاح", "鍵 ✓"] {
            assert!(name("name", good, MAX_NAME).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            "  ",
            "a\0b",
            "a\nb",
            "\u{1b}[31m",
            "key\u{202E}txt.exe",
            "\u{2066}admin\u{2069}",
            "a\u{200F}b",
            "\u{061C}",
        ] {
            assert!(name("name", bad, MAX_NAME).is_err(), "{bad:?}");
        }
        let long = "é".repeat(MAX_NAME + 1);
        assert!(
            name("name", &long, MAX_NAME)
                .unwrap_err()
                .to_string()
                .starts_with("name: ")
        );
        assert!(list("permissions", &vec!["a".to_string(); MAX_TAGS + 1], MAX_TAGS, MAX_TAG).is_err());
        assert!(limit_lists(&["chat".into()], &[], &["gpt-*".into()]).is_ok());
        assert!(password(&"x".repeat(MAX_PASSWORD + 1), 8).is_err());
        assert!(password("short", 8).is_err());
    }
}
