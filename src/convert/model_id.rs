//! A model name as one segment of an upstream URL.
//!
//! Gemini names the model in the path (`/v1beta/models/{model}:generateContent`),
//! so a client's `model` would otherwise steer the pooled key to any resource
//! of the provider account: `gemini-x/../../cachedContents?x=` reaches cached
//! contents, files and tuned models that belong to others on a shared key.
//! Every model that enters a URL passes [`path_segment`] first.
//!
//! The charset is Google's for model ids (`gemini-2.0-flash`,
//! `gemini-1.5-flash-002`, `text-embedding-004`): letters, digits, `-`, `.`
//! and `_`, at most [`MAX_LEN`] bytes (Google's limit for resource names is
//! 128). The `models/` prefix SDKs send (`models/gemini-2.0-flash`) is
//! accepted and dropped; any other `/` would be another resource
//! (`tunedModels/…`, `cachedContents/…`) and is refused, as are `..`, `?`,
//! `#`, `%`, `:`, white space and control characters. Everything accepted is
//! an unreserved URL character, so nothing is left to percent-encode.

/// Longest model id accepted in a URL.
pub const MAX_LEN: usize = 128;

/// Why a model name cannot be put in an upstream URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelIdError {
    #[error("the request names no model")]
    Empty,
    #[error("model name longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("model name {0:?} is not a model id: letters, digits, '-', '.' and '_' only")]
    Charset(String),
    #[error("model name {0:?} is not a model id: it holds \"..\"")]
    DotDot(String),
}

/// `model` as a path segment of a provider URL, or why it cannot be one.
pub fn path_segment(model: &str) -> Result<&str, ModelIdError> {
    let id = model.strip_prefix("models/").unwrap_or(model);
    if id.is_empty() {
        return Err(ModelIdError::Empty);
    }
    if id.len() > MAX_LEN {
        return Err(ModelIdError::TooLong);
    }
    let shown = || id.chars().take(MAX_LEN).collect::<String>();
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(ModelIdError::Charset(shown()));
    }
    if id.contains("..") || id == "." {
        return Err(ModelIdError::DotDot(shown()));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_ids_pass_and_steering_is_refused() {
        for ok in [
            "gemini-2.0-flash",
            "gemini-1.5-flash-002",
            "gemini-2.5-flash-preview-04-17",
            "text-embedding-004",
            "models/gemini-2.0-flash",
            "learnlm_1.5",
        ] {
            assert!(path_segment(ok).is_ok(), "{ok}");
        }
        assert_eq!(path_segment("models/gemini-pro"), Ok("gemini-pro"));
        for bad in [
            "",
            "models/",
            "gemini-x/../../../v1beta/cachedContents?x=",
            "tunedModels/mine",
            "..",
            ".",
            "a..b",
            "gemini%2F..",
            "gemini pro",
            "gemini\n",
            "g:generateContent",
            "g#frag",
            "g?alt=media",
            "gémini",
        ] {
            assert!(path_segment(bad).is_err(), "{bad:?}");
        }
        assert_eq!(path_segment(&"a".repeat(MAX_LEN + 1)), Err(ModelIdError::TooLong));
    }
}
