//! Upstream error answers between the three formats, keeping what clients
//! act on: a context overflow (Claude Code compacts on Anthropic's "prompt is
//! too long", LangChain and Codex read OpenAI's `context_length_exceeded`),
//! an exhausted quota or credit (not worth retrying), a rate limit (retry
//! later), a key or permission problem, a safety refusal. Everything else
//! keeps its status and message. `docs/conversion.md` ("Errors") has the
//! table and the provider pages each shape comes from.

use crate::config::routes_d::Format;
use serde_json::{Value, json};

/// What an upstream error means to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The prompt does not fit the model's context window (counts when the
    /// upstream said them).
    ContextLength {
        tokens: Option<u64>,
        max: Option<u64>,
    },
    /// Out of credit, spend limit or daily quota: retrying soon will not help.
    Quota,
    RateLimited,
    Auth,
    Permission,
    NotFound,
    /// The request was refused by a safety or content-policy filter.
    Safety,
    TooLarge,
    Overloaded,
    /// Another problem with the request (4xx).
    Invalid,
    /// Anything else (5xx).
    Other,
}

/// An upstream error answer, read in the upstream's format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamError {
    /// The upstream's own status.
    pub status: u16,
    pub class: ErrorClass,
    pub message: String,
}

/// The error object of an answer: `{"error": …}`, or Gemini's streaming
/// endpoint's `[{"error": …}]`.
fn error_object(body: &Value) -> &Value {
    let top = match body {
        Value::Array(items) => items.first().unwrap_or(&Value::Null),
        other => other,
    };
    top.get("error").unwrap_or(&Value::Null)
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Every run of digits in `s`, in order ("4,097" is read as 4097).
fn numbers(s: &str) -> Vec<u64> {
    let mut out = Vec::new();
    let mut cur: Option<u64> = None;
    let bytes = s.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b.is_ascii_digit() {
            cur = Some(cur.unwrap_or(0).saturating_mul(10).saturating_add(u64::from(b - b'0')));
        } else if b == b',' && cur.is_some() && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
            // A thousands separator inside a number.
        } else if let Some(n) = cur.take() {
            out.push(n);
        }
    }
    out.extend(cur);
    out
}

/// By status alone, when the body says nothing more specific.
fn by_status(status: u16) -> ErrorClass {
    match status {
        401 => ErrorClass::Auth,
        402 => ErrorClass::Quota,
        403 => ErrorClass::Permission,
        404 => ErrorClass::NotFound,
        413 => ErrorClass::TooLarge,
        429 => ErrorClass::RateLimited,
        503 | 529 => ErrorClass::Overloaded,
        400..=499 => ErrorClass::Invalid,
        _ => ErrorClass::Other,
    }
}

/// Read an upstream error answer of format `from`.
pub fn decode(from: Format, status: u16, body: &[u8]) -> UpstreamError {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    read(from, status, error_object(&v))
}

/// Read the error object an upstream sent inside a stream (an Anthropic
/// `error` event's `error`, an OpenAI chunk's `error`, a Gemini chunk's
/// `error`) the way a whole error answer is read: a context overflow or an
/// exhausted quota mid-stream means to the client what it means as a
/// status. The status is the one the object implies (no HTTP status
/// came with it).
pub fn decode_streamed(from: Format, e: &Value) -> UpstreamError {
    let status = match from {
        Format::Gemini => e
            .get("code")
            .and_then(Value::as_u64)
            .and_then(|c| u16::try_from(c).ok()),
        Format::Anthropic => match str_of(e, "type") {
            Some("invalid_request_error") => Some(400),
            Some("authentication_error") => Some(401),
            Some("billing_error") => Some(402),
            Some("permission_error") => Some(403),
            Some("not_found_error") => Some(404),
            Some("request_too_large") => Some(413),
            Some("rate_limit_error") => Some(429),
            Some("overloaded_error") => Some(529),
            _ => None,
        },
        _ => match str_of(e, "type") {
            Some("invalid_request_error") => Some(400),
            _ => None,
        },
    };
    read(from, status.filter(|s| (400..600).contains(s)).unwrap_or(500), e)
}

/// An error FastGate itself ends a stream with (the upstream's connection
/// lost, or its stream ended before its end).
pub fn gateway_failure(message: &str) -> UpstreamError {
    UpstreamError {
        status: 502,
        class: ErrorClass::Other,
        message: message.to_string(),
    }
}

fn read(from: Format, status: u16, e: &Value) -> UpstreamError {
    let message = str_of(e, "message")
        .or_else(|| e.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| format!("the upstream answered {status}"));
    let lower = message.to_ascii_lowercase();
    let class = match from {
        Format::Anthropic => anthropic_class(status, str_of(e, "type"), &lower, &message),
        Format::Gemini => gemini_class(status, e, &lower, &message),
        _ => openai_class(status, e, &lower, &message),
    };
    UpstreamError { status, class, message }
}

/// The `error.code` of a Responses API `response.failed` event. Codex acts
/// on `context_length_exceeded` (it compacts) and `insufficient_quota` (it
/// stops retrying), and retries `rate_limit_exceeded` and `server_error`.
pub fn responses_code(e: &UpstreamError) -> &'static str {
    match e.class {
        ErrorClass::ContextLength { .. } => "context_length_exceeded",
        ErrorClass::Quota => "insufficient_quota",
        ErrorClass::RateLimited => "rate_limit_exceeded",
        ErrorClass::Safety | ErrorClass::Invalid | ErrorClass::TooLarge => "invalid_prompt",
        _ => "server_error",
    }
}

/// OpenAI: `{"error": {"message", "type", "param", "code"}}`.
fn openai_class(status: u16, e: &Value, lower: &str, message: &str) -> ErrorClass {
    let code = str_of(e, "code").unwrap_or_default();
    let kind = str_of(e, "type").unwrap_or_default();
    let has = |s: &str| code == s || kind == s;
    if has("context_length_exceeded") || lower.contains("maximum context length") {
        // "This model's maximum context length is M tokens. However, your
        // messages resulted in N tokens…" / "…you requested N tokens (…)".
        let n = numbers(message);
        return ErrorClass::ContextLength {
            max: n.first().copied(),
            tokens: n.get(1).copied(),
        };
    }
    if has("insufficient_quota") || has("billing_hard_limit_reached") {
        return ErrorClass::Quota;
    }
    if has("content_filter") || has("content_policy_violation") {
        return ErrorClass::Safety;
    }
    if has("invalid_api_key") {
        return ErrorClass::Auth;
    }
    if has("rate_limit_exceeded") {
        return ErrorClass::RateLimited;
    }
    by_status(status)
}

/// Anthropic: `{"type": "error", "error": {"type", "message"}}`.
fn anthropic_class(status: u16, kind: Option<&str>, lower: &str, message: &str) -> ErrorClass {
    if lower.starts_with("prompt is too long") {
        // "prompt is too long: N tokens > M maximum"
        let n = numbers(message);
        return ErrorClass::ContextLength {
            tokens: n.first().copied(),
            max: n.get(1).copied(),
        };
    }
    if kind == Some("billing_error")
        || lower.contains("credit balance is too low")
        || lower.contains("reached your specified api usage limits")
        || lower.contains("reached your specified workspace api usage limits")
    {
        return ErrorClass::Quota;
    }
    match kind {
        Some("rate_limit_error") => ErrorClass::RateLimited,
        Some("authentication_error") => ErrorClass::Auth,
        Some("permission_error") => ErrorClass::Permission,
        Some("not_found_error") => ErrorClass::NotFound,
        Some("request_too_large") => ErrorClass::TooLarge,
        Some("overloaded_error") => ErrorClass::Overloaded,
        Some("invalid_request_error") if (400..500).contains(&status) => ErrorClass::Invalid,
        _ => by_status(status),
    }
}

/// Gemini: `{"error": {"code", "message", "status", "details"}}`.
fn gemini_class(status: u16, e: &Value, lower: &str, message: &str) -> ErrorClass {
    let details: &[Value] = e.get("details").and_then(Value::as_array).map_or(&[], Vec::as_slice);
    if lower.contains("input token count") && lower.contains("exceeds the maximum") {
        // "The input token count (N) exceeds the maximum number of tokens allowed (M)."
        let n = numbers(message);
        return ErrorClass::ContextLength {
            tokens: n.first().copied(),
            max: n.get(1).copied(),
        };
    }
    // A bad key is a 400 INVALID_ARGUMENT with reason API_KEY_INVALID.
    if details.iter().any(|d| str_of(d, "reason") == Some("API_KEY_INVALID")) {
        return ErrorClass::Auth;
    }
    match str_of(e, "status") {
        Some("RESOURCE_EXHAUSTED") => {
            // Gemini sends RESOURCE_EXHAUSTED for per-minute limits and for
            // daily quotas alike; only a daily quota is not worth a retry.
            let daily = details
                .iter()
                .filter_map(|d| d.get("violations").and_then(Value::as_array))
                .flatten()
                .any(|v| str_of(v, "quotaId").is_some_and(|q| q.contains("PerDay")));
            if daily {
                ErrorClass::Quota
            } else {
                ErrorClass::RateLimited
            }
        }
        Some("FAILED_PRECONDITION") if lower.contains("billing") => ErrorClass::Quota,
        Some("UNAUTHENTICATED") => ErrorClass::Auth,
        Some("PERMISSION_DENIED") => ErrorClass::Permission,
        Some("NOT_FOUND") => ErrorClass::NotFound,
        Some("UNAVAILABLE") => ErrorClass::Overloaded,
        Some("INVALID_ARGUMENT" | "FAILED_PRECONDITION") => ErrorClass::Invalid,
        _ => by_status(status),
    }
}

/// The wait Gemini puts in an error's `RetryInfo` (`"retryDelay": "45s"`),
/// in whole seconds (rounded up): Gemini sends no `Retry-After` header.
pub fn gemini_retry_delay(body: &[u8]) -> Option<u64> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let details = error_object(&v).get("details")?.as_array()?;
    details.iter().find_map(|d| {
        let delay = str_of(d, "retryDelay")?.strip_suffix('s')?;
        let secs: f64 = delay.parse().ok()?;
        (secs.is_finite() && secs >= 0.0).then(|| secs.ceil() as u64)
    })
}

/// The error in the client's format `to`: its status and body.
pub fn encode(to: Format, e: &UpstreamError) -> (u16, Value) {
    match to {
        Format::Anthropic => anthropic_error(e),
        Format::Gemini => gemini_error(e),
        _ => openai_error(e),
    }
}

/// A status for a class whose status differs between providers; others
/// keep the upstream's.
fn status_for(e: &UpstreamError, quota: u16) -> u16 {
    match e.class {
        ErrorClass::ContextLength { .. } | ErrorClass::Safety => 400,
        ErrorClass::Quota => quota,
        ErrorClass::RateLimited => 429,
        ErrorClass::Auth => 401,
        ErrorClass::Permission => 403,
        ErrorClass::NotFound => 404,
        ErrorClass::TooLarge => 413,
        ErrorClass::Overloaded => 503,
        ErrorClass::Invalid | ErrorClass::Other => e.status,
    }
}

fn openai_error(e: &UpstreamError) -> (u16, Value) {
    let status = status_for(e, 429);
    let (kind, code, param, message) = match e.class {
        ErrorClass::ContextLength {
            tokens: Some(n),
            max: Some(m),
        } => (
            "invalid_request_error",
            "context_length_exceeded",
            json!("messages"),
            format!(
                "This model's maximum context length is {m} tokens. However, your messages resulted in {n} tokens. Please reduce the length of the messages."
            ),
        ),
        ErrorClass::ContextLength { .. } => (
            "invalid_request_error",
            "context_length_exceeded",
            json!("messages"),
            e.message.clone(),
        ),
        ErrorClass::Quota => (
            "insufficient_quota",
            "insufficient_quota",
            Value::Null,
            e.message.clone(),
        ),
        ErrorClass::RateLimited => (
            "rate_limit_error",
            "rate_limit_exceeded",
            Value::Null,
            e.message.clone(),
        ),
        ErrorClass::Auth => (
            "authentication_error",
            "invalid_api_key",
            Value::Null,
            e.message.clone(),
        ),
        ErrorClass::Permission => ("permission_error", "permission_denied", Value::Null, e.message.clone()),
        ErrorClass::NotFound => ("not_found_error", "not_found", Value::Null, e.message.clone()),
        ErrorClass::Safety => (
            "invalid_request_error",
            "content_filter",
            Value::Null,
            e.message.clone(),
        ),
        ErrorClass::TooLarge => (
            "invalid_request_error",
            "request_too_large",
            Value::Null,
            e.message.clone(),
        ),
        ErrorClass::Overloaded => ("server_error", "overloaded", Value::Null, e.message.clone()),
        ErrorClass::Invalid => (
            "invalid_request_error",
            "upstream_error",
            Value::Null,
            e.message.clone(),
        ),
        ErrorClass::Other => ("server_error", "upstream_error", Value::Null, e.message.clone()),
    };
    (
        status,
        json!({"error": {"message": message, "type": kind, "param": param, "code": code}}),
    )
}

fn anthropic_error(e: &UpstreamError) -> (u16, Value) {
    // Anthropic's documented status for billing is 402 (`billing_error`).
    let status = status_for(e, 402);
    let (kind, message) = match e.class {
        // The exact wording Claude Code compacts the conversation on.
        ErrorClass::ContextLength {
            tokens: Some(n),
            max: Some(m),
        } => (
            "invalid_request_error",
            format!("prompt is too long: {n} tokens > {m} maximum"),
        ),
        ErrorClass::ContextLength { .. } => ("invalid_request_error", format!("prompt is too long: {}", e.message)),
        ErrorClass::Quota => ("billing_error", e.message.clone()),
        ErrorClass::RateLimited => ("rate_limit_error", e.message.clone()),
        ErrorClass::Auth => ("authentication_error", e.message.clone()),
        ErrorClass::Permission => ("permission_error", e.message.clone()),
        ErrorClass::NotFound => ("not_found_error", e.message.clone()),
        ErrorClass::TooLarge => ("request_too_large", e.message.clone()),
        ErrorClass::Overloaded => ("overloaded_error", e.message.clone()),
        ErrorClass::Safety | ErrorClass::Invalid => ("invalid_request_error", e.message.clone()),
        ErrorClass::Other => ("api_error", e.message.clone()),
    };
    (
        status,
        json!({"type": "error", "error": {"type": kind, "message": message}}),
    )
}

fn gemini_error(e: &UpstreamError) -> (u16, Value) {
    let status = status_for(e, 429);
    let (code, message) = match e.class {
        ErrorClass::ContextLength {
            tokens: Some(n),
            max: Some(m),
        } => (
            "INVALID_ARGUMENT",
            format!("The input token count ({n}) exceeds the maximum number of tokens allowed ({m})."),
        ),
        ErrorClass::ContextLength { .. } | ErrorClass::Safety | ErrorClass::Invalid | ErrorClass::TooLarge => {
            ("INVALID_ARGUMENT", e.message.clone())
        }
        ErrorClass::Quota | ErrorClass::RateLimited => ("RESOURCE_EXHAUSTED", e.message.clone()),
        ErrorClass::Auth => ("UNAUTHENTICATED", e.message.clone()),
        ErrorClass::Permission => ("PERMISSION_DENIED", e.message.clone()),
        ErrorClass::NotFound => ("NOT_FOUND", e.message.clone()),
        ErrorClass::Overloaded => ("UNAVAILABLE", e.message.clone()),
        ErrorClass::Other => (
            match status {
                504 => "DEADLINE_EXCEEDED",
                502 | 503 => "UNAVAILABLE",
                _ => "INTERNAL",
            },
            e.message.clone(),
        ),
    };
    (
        status,
        json!({"error": {"code": status, "message": message, "status": code}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert(from: Format, status: u16, body: Value, to: Format) -> (u16, Value) {
        encode(to, &decode(from, status, body.to_string().as_bytes()))
    }

    #[test]
    fn context_overflow_keeps_its_code_and_counts_every_way() {
        let openai = json!({"error": {"message": "This model's maximum context length is 128000 tokens. However, your messages resulted in 130532 tokens. Please reduce the length of the messages.", "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}});
        let anthropic = json!({"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long: 130532 tokens > 128000 maximum"}});
        let gemini = json!({"error": {"code": 400, "message": "The input token count (130532) exceeds the maximum number of tokens allowed (128000).", "status": "INVALID_ARGUMENT"}});
        for (from, body) in [
            (Format::Openai, openai.clone()),
            (Format::Anthropic, anthropic.clone()),
            (Format::Gemini, gemini.clone()),
        ] {
            let e = decode(from, 400, body.to_string().as_bytes());
            assert_eq!(
                e.class,
                ErrorClass::ContextLength {
                    tokens: Some(130532),
                    max: Some(128000)
                },
                "{from:?}"
            );
            assert_eq!(encode(Format::Openai, &e), (400, openai.clone()), "{from:?}");
            assert_eq!(encode(Format::Anthropic, &e), (400, anthropic.clone()), "{from:?}");
            assert_eq!(encode(Format::Gemini, &e), (400, gemini.clone()), "{from:?}");
        }
    }

    #[test]
    fn quota_is_not_a_rate_limit() {
        let openai = json!({"error": {"message": "You exceeded your current quota, please check your plan and billing details.", "type": "insufficient_quota", "param": null, "code": "insufficient_quota"}});
        let (s, a) = convert(Format::Openai, 429, openai, Format::Anthropic);
        assert_eq!((s, a["error"]["type"].as_str()), (402, Some("billing_error")));
        let credit = json!({"type": "error", "error": {"type": "invalid_request_error", "message": "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."}});
        let (s, o) = convert(Format::Anthropic, 400, credit, Format::Openai);
        assert_eq!((s, o["error"]["code"].as_str()), (429, Some("insufficient_quota")));
        let daily = json!({"error": {"code": 429, "message": "You exceeded your current quota", "status": "RESOURCE_EXHAUSTED", "details": [{"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]}]}});
        let (s, o) = convert(Format::Gemini, 429, daily, Format::Openai);
        assert_eq!((s, o["error"]["code"].as_str()), (429, Some("insufficient_quota")));
        let minute = json!({"error": {"code": 429, "message": "You exceeded your current quota", "status": "RESOURCE_EXHAUSTED", "details": [{"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]}]}});
        let (s, a) = convert(Format::Gemini, 429, minute, Format::Anthropic);
        assert_eq!((s, a["error"]["type"].as_str()), (429, Some("rate_limit_error")));
    }

    #[test]
    fn gemini_bad_key_is_an_authentication_error() {
        let bad = json!([{"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.", "status": "INVALID_ARGUMENT", "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}]}}]);
        let (s, o) = convert(Format::Gemini, 400, bad, Format::Openai);
        assert_eq!((s, o["error"]["type"].as_str()), (401, Some("authentication_error")));
    }

    #[test]
    fn geminis_retry_delay_is_read_from_the_body() {
        let body = json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "12.5s"}]}});
        assert_eq!(gemini_retry_delay(body.to_string().as_bytes()), Some(13));
        assert_eq!(gemini_retry_delay(b"{}"), None);
    }

    #[test]
    fn unreadable_bodies_keep_status() {
        let e = decode(Format::Openai, 502, b"<html>bad gateway</html>");
        assert_eq!(e.class, ErrorClass::Other);
        let (s, g) = encode(Format::Gemini, &e);
        assert_eq!((s, g["error"]["status"].as_str()), (502, Some("UNAVAILABLE")));
        assert_eq!(numbers("4,097 tokens (3,120 in)"), vec![4097, 3120]);
    }
}
