//! Errors FastGate itself answers with, rendered in the client's API error
//! shape (OpenAI, Anthropic or Gemini) with the right HTTP status.

use crate::{audit::refused::Refusal, auth::AuthError, config::routes_d::Format};
use bytes::Bytes;
use serde_json::json;

#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("no route matches {method} {path}")]
    NoRoute { method: String, path: String },
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("request body exceeds the {limit}-byte limit")]
    BodyTooLarge { limit: u64 },
    #[error("request target exceeds the {limit}-byte limit")]
    UriTooLong { limit: u64 },
    #[error("request headers exceed the {limit}-byte limit")]
    HeadersTooLarge { limit: u64 },
    #[error("a request header exceeds the {limit}-byte limit per header")]
    HeaderFieldTooLarge { limit: u64 },
    #[error("request body is not valid JSON: {0}")]
    BadJson(String),
    #[error("could not read the request body: {0}")]
    BadRequestBody(String),
    /// No byte of the request body for `server.limits.client_body_timeout`.
    #[error("the request body stalled: nothing received for {secs} s")]
    BodyTimeout { secs: u64 },
    #[error("no usable upstream key in pool {pool:?}: {reason}{}", retry_hint(*retry_after))]
    NoUpstreamKey {
        pool: String,
        reason: String,
        /// Seconds until the soonest key recovers; `None` when none will.
        retry_after: Option<u64>,
    },
    #[error("upstream {upstream:?} is at its max_in_flight of {limit} requests; retry in 1 s")]
    UpstreamBusy { upstream: String, limit: u32 },
    #[error("upstream {0:?} has no resolvable endpoint")]
    NoEndpoint(String),
    #[error("upstream {upstream:?} is unreachable: {reason}")]
    UpstreamUnreachable { upstream: String, reason: String },
    #[error("upstream {upstream:?} did not respond within {after_ms} ms")]
    UpstreamTimeout { upstream: String, after_ms: u128 },
    #[error("upstream {upstream:?} answered {status}")]
    UpstreamStatus { upstream: String, status: u16 },
    #[error("rate limit reached for this gateway key ({scope}); retry in {retry_after} s")]
    RateLimited { scope: String, retry_after: u64 },
    /// Cluster mode with `on_redis_down: fail_closed` while Redis is down.
    #[error("the shared rate limiter is unavailable; retry in {retry_after} s")]
    LimiterUnavailable { retry_after: u64 },
    /// The request cannot be converted for the upstream's format.
    #[error("{0}")]
    NotConvertible(String),
    /// A model name that cannot go into an upstream URL (it would name
    /// another resource of the provider account).
    #[error(transparent)]
    InvalidModel(#[from] crate::convert::model_id::ModelIdError),
    /// A request path that would leave the route's resources upstream
    /// (dot segments, encoded slashes).
    #[error("{0}")]
    UnsafePath(String),
    /// An upstream error answer, converted to the client's format.
    #[error("{message}")]
    Upstream {
        status: u16,
        message: String,
        /// Seconds, when the upstream said (`Retry-After`).
        retry_after: Option<u64>,
    },
    /// An upstream error answer converted to the client's format with the
    /// code clients act on (`crate::convert::errors`): `body` is already in
    /// the client's shape, `status` the client's.
    #[error("{message}")]
    UpstreamCoded {
        status: u16,
        message: String,
        retry_after: Option<u64>,
        body: Bytes,
    },
    /// Not sent to anyone: the client is gone. Recorded for logs.
    #[error("client closed the connection")]
    ClientClosed,
}

fn retry_hint(after: Option<u64>) -> String {
    match after {
        Some(s) => format!("; retry in {s} s"),
        None => "; an administrator must re-enable or add keys".into(),
    }
}

impl GatewayError {
    /// The `Retry-After` seconds to send with this error, if any.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after, .. } | Self::LimiterUnavailable { retry_after } => Some(*retry_after),
            Self::NoUpstreamKey { retry_after, .. } => *retry_after,
            Self::UpstreamBusy { .. } => Some(1),
            Self::Upstream { retry_after, .. } | Self::UpstreamCoded { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            Self::NoRoute { .. } => 404,
            Self::Auth(a) => a.status(),
            Self::BodyTooLarge { .. } => 413,
            Self::BodyTimeout { .. } => 408,
            Self::UriTooLong { .. } => 414,
            Self::HeadersTooLarge { .. } | Self::HeaderFieldTooLarge { .. } => 431,
            Self::BadJson(_)
            | Self::BadRequestBody(_)
            | Self::NotConvertible(_)
            | Self::InvalidModel(_)
            | Self::UnsafePath(_) => 400,
            Self::Upstream { status, .. } | Self::UpstreamCoded { status, .. } => *status,
            Self::NoUpstreamKey { .. } | Self::UpstreamBusy { .. } | Self::LimiterUnavailable { .. } => 503,
            Self::NoEndpoint(_) | Self::UpstreamUnreachable { .. } => 502,
            Self::UpstreamTimeout { .. } => 504,
            Self::UpstreamStatus { status, .. } => *status,
            Self::ClientClosed => 499,
            Self::RateLimited { .. } => 429,
        }
    }

    /// Why the request was refused before a route or a valid key was
    /// found, if it was (such refusals are counted, and only sampled into
    /// the audit log).
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            Self::NoRoute { .. } => Some(Refusal::NoRoute),
            Self::Auth(AuthError::Missing) => Some(Refusal::NoKey),
            Self::Auth(AuthError::Invalid) => Some(Refusal::BadKey),
            Self::Auth(AuthError::Inactive) => Some(Refusal::InactiveKey),
            Self::UriTooLong { .. } => Some(Refusal::UriTooLong),
            Self::HeadersTooLarge { .. } | Self::HeaderFieldTooLarge { .. } => Some(Refusal::HeaderTooLarge),
            _ => None,
        }
    }

    /// Low-cardinality name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoRoute { .. } => "route_not_found",
            Self::Auth(a) => a.kind(),
            Self::BodyTooLarge { .. } => "request_too_large",
            Self::UriTooLong { .. } => "uri_too_long",
            Self::HeadersTooLarge { .. } | Self::HeaderFieldTooLarge { .. } => "header_too_large",
            Self::BadJson(_) => "invalid_json",
            Self::BadRequestBody(_) => "bad_request_body",
            Self::BodyTimeout { .. } => "body_timeout",
            Self::NotConvertible(_) => "unsupported_conversion",
            Self::InvalidModel(_) => "invalid_model",
            Self::UnsafePath(_) => "invalid_path",
            Self::Upstream { .. } | Self::UpstreamCoded { .. } => "upstream_error",
            Self::NoUpstreamKey { .. } => "no_upstream_key",
            Self::UpstreamBusy { .. } => "upstream_busy",
            Self::NoEndpoint(_) => "no_upstream_endpoint",
            Self::UpstreamUnreachable { .. } => "upstream_unreachable",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
            Self::UpstreamStatus { .. } => "upstream_error",
            Self::ClientClosed => "client_closed",
            Self::RateLimited { .. } => "rate_limit_exceeded",
            Self::LimiterUnavailable { .. } => "rate_limiter_unavailable",
        }
    }

    /// The JSON body in `format`'s error shape.
    pub fn body(&self, format: Format) -> Bytes {
        if let Self::UpstreamCoded { body, .. } = self {
            return body.clone();
        }
        let status = self.status();
        let message = self.to_string();
        let value = match format {
            Format::Anthropic => json!({
                "type": "error",
                "error": { "type": anthropic_type(status), "message": message }
            }),
            Format::Gemini => json!({
                "error": { "code": status, "message": message, "status": gemini_status(status) }
            }),
            Format::Openai | Format::Responses | Format::Passthrough => json!({
                "error": {
                    "message": message,
                    "type": openai_type(status),
                    "param": null,
                    "code": self.kind()
                }
            }),
        };
        Bytes::from(value.to_string())
    }

    /// The body as one SSE event, for failures after a stream has started.
    pub fn sse_event(&self, format: Format) -> Bytes {
        if format == Format::Responses {
            // The Responses stream's own `error` event (its number unknown here).
            let data = json!({"type": "error", "code": self.kind(), "message": self.to_string(), "param": null, "sequence_number": 0});
            return Bytes::from(format!("event: error\ndata: {data}\n\n"));
        }
        let data = self.body(format);
        let data = String::from_utf8_lossy(&data);
        Bytes::from(match format {
            Format::Anthropic => format!("event: error\ndata: {data}\n\n"),
            _ => format!("data: {data}\n\n"),
        })
    }
}

fn openai_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

fn anthropic_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

fn gemini_status(status: u16) -> &'static str {
    match status {
        400 | 413 | 414 | 431 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        502 | 503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

/// The error format to use before a route is known, from what the client looks like.
pub fn guess_format(path: &str, headers: &http::HeaderMap) -> Format {
    if path.starts_with("/v1/messages") || headers.contains_key("anthropic-version") {
        Format::Anthropic
    } else if path.contains("/v1beta/")
        || path.contains(":generateContent")
        || path.contains(":streamGenerateContent")
        || headers.contains_key("x-goog-api-key")
    {
        Format::Gemini
    } else {
        Format::Openai
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(b: Bytes) -> serde_json::Value {
        serde_json::from_slice(&b).unwrap()
    }

    #[test]
    fn shapes_per_format() {
        let e = GatewayError::Auth(AuthError::Invalid);
        let o = parse(e.body(Format::Openai));
        assert_eq!(o["error"]["type"], "authentication_error");
        assert_eq!(o["error"]["code"], "invalid_api_key");
        let a = parse(e.body(Format::Anthropic));
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "authentication_error");
        let g = parse(e.body(Format::Gemini));
        assert_eq!(g["error"]["code"], 401);
        assert_eq!(g["error"]["status"], "UNAUTHENTICATED");
    }

    #[test]
    fn format_guess() {
        let h = http::HeaderMap::new();
        assert_eq!(guess_format("/v1/messages", &h), Format::Anthropic);
        assert_eq!(guess_format("/v1beta/models/g:generateContent", &h), Format::Gemini);
        assert_eq!(guess_format("/v1/chat/completions", &h), Format::Openai);
    }
}
