//! One request's trace: what is recorded while it runs (ids, the upstream
//! attempts' times and outcomes: a few plain fields, only when tracing is
//! on), and the spans built from it at its end, only if it is exported.

use super::context::{self, Parent};
use crate::config::Provider;
use opentelemetry::{
    InstrumentationScope, KeyValue, StringValue, Value,
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use std::{
    borrow::Cow,
    time::{Duration, Instant, SystemTime},
};

/// The trace context of one request, kept in its context from the first
/// phase to `finish` (boxed there: absent when tracing is off).
#[derive(Debug)]
pub struct RequestTrace {
    pub trace_id: TraceId,
    /// The request's own (SERVER) span.
    pub span_id: SpanId,
    /// The client's span, from its `traceparent`.
    pub parent: Option<SpanId>,
    /// The head decision: the client's `sampled` flag, or the ratio. A
    /// request that fails is exported whatever this says.
    pub head_sampled: bool,
    pub tracestate: Option<String>,
    start: SystemTime,
    attempts: Vec<AttemptSpan>,
}

/// One upstream attempt (a CLIENT span).
#[derive(Debug)]
struct AttemptSpan {
    span_id: SpanId,
    start: SystemTime,
    end: Option<SystemTime>,
    upstream: String,
    address: String,
    port: u16,
    pool_key_id: Option<String>,
    status: Option<u16>,
    error: Option<String>,
}

impl RequestTrace {
    /// The trace a request starts: the client's `traceparent` continued
    /// when it is valid (with its `tracestate`), else a fresh trace.
    /// `started` is when the request began (the span's start).
    pub fn start(headers: &http::HeaderMap, sampler: &super::Sampler, started: Instant) -> Box<Self> {
        let mut values = headers.get_all("traceparent").iter();
        // Two traceparent headers are as good as none.
        let parent = match (values.next(), values.next()) {
            (Some(v), None) => context::parse_traceparent(v.as_bytes()),
            _ => None,
        };
        // Several `tracestate` lines are one list (W3C: combined as by RFC
        // 9110), carried on whole or not at all.
        let tracestate = parent.and_then(|_| {
            let mut joined = String::new();
            for v in headers.get_all("tracestate") {
                if !joined.is_empty() {
                    joined.push(',');
                }
                joined.push_str(v.to_str().ok()?);
                if joined.len() > context::TRACESTATE_MAX {
                    return None;
                }
            }
            context::valid_tracestate(joined.as_bytes()).then_some(joined)
        });
        let trace_id = parent.map_or_else(context::new_trace_id, |p: Parent| p.trace_id);
        let head_sampled = parent.is_some_and(|p| p.sampled) || sampler.by_ratio(trace_id);
        Box::new(RequestTrace {
            trace_id,
            span_id: context::new_span_id(),
            parent: parent.map(|p| p.span_id),
            head_sampled,
            tracestate,
            start: SystemTime::now()
                .checked_sub(started.elapsed())
                .unwrap_or_else(SystemTime::now),
            attempts: Vec::new(),
        })
    }

    /// An upstream attempt starts (an open one before it ended without an
    /// answer: a dead pooled connection tried again).
    pub fn begin_attempt(&mut self, upstream: &str, address: &str, port: u16, pool_key_id: Option<&str>) {
        self.end_attempt("connection_retried");
        self.attempts.push(AttemptSpan {
            span_id: context::new_span_id(),
            start: SystemTime::now(),
            end: None,
            upstream: upstream.to_string(),
            address: address.to_string(),
            port,
            pool_key_id: pool_key_id.map(str::to_string),
            status: None,
            error: None,
        });
    }

    /// The open attempt ended with `outcome`: a status code (`429`) or an
    /// error kind.
    pub fn end_attempt(&mut self, outcome: &str) {
        if let Some(a) = self.attempts.last_mut().filter(|a| a.end.is_none()) {
            a.end = Some(SystemTime::now());
            match outcome.parse::<u16>() {
                Ok(status) => a.status = Some(status),
                Err(_) => a.error = Some(outcome.to_string()),
            }
        }
    }

    /// The `traceparent` the current attempt sends upstream: this trace,
    /// the attempt's span as the parent, the head decision as the flag.
    pub fn traceparent(&self) -> String {
        let span = self.attempts.last().map_or(self.span_id, |a| a.span_id);
        context::format_traceparent(self.trace_id, span, self.head_sampled)
    }

    /// The request span and one span per attempt.
    pub fn into_spans(self, f: &Finished<'_>, scope: &InstrumentationScope) -> Vec<SpanData> {
        let end = SystemTime::now();
        let op = operation(f.path);
        // The client names the model: its text is bounded.
        let request_model = f.request_model.map(|m| cut(m, MODEL_MAX));
        let name: Cow<'static, str> = match (op, request_model) {
            (Some(op), Some(model)) => format!("{op} {model}").into(),
            (Some(op), None) => op.into(),
            (None, _) => format!("{} {}", f.method, f.route.unwrap_or("-")).into(),
        };
        let provider = f.provider.and_then(provider_name);
        let state = self
            .tracestate
            .as_deref()
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let context = |span_id| SpanContext::new(self.trace_id, span_id, TraceFlags::SAMPLED, false, state.clone());
        let genai = |attrs: &mut Vec<KeyValue>| {
            if let Some(op) = op {
                attrs.push(KeyValue::new("gen_ai.operation.name", op));
            }
            if let Some(p) = provider {
                attrs.push(KeyValue::new("gen_ai.provider.name", p));
            }
            if let Some(m) = request_model {
                attrs.push(KeyValue::new("gen_ai.request.model", m.to_string()));
            }
        };
        let last = self.attempts.last();
        let mut attrs = Vec::with_capacity(20);
        genai(&mut attrs);
        if let Some(id) = f.response_id {
            attrs.push(KeyValue::new("gen_ai.response.id", id.to_string()));
        }
        if let Some(m) = f.response_model {
            attrs.push(KeyValue::new("gen_ai.response.model", m.to_string()));
        }
        if let Some(n) = f.input_tokens {
            attrs.push(KeyValue::new(
                "gen_ai.usage.input_tokens",
                n.min(i64::MAX as u64) as i64,
            ));
        }
        if let Some(n) = f.output_tokens {
            attrs.push(KeyValue::new(
                "gen_ai.usage.output_tokens",
                n.min(i64::MAX as u64) as i64,
            ));
        }
        if !f.finish_reasons.is_empty() {
            let reasons: Vec<StringValue> = f.finish_reasons.iter().map(|r| r.to_string().into()).collect();
            attrs.push(KeyValue::new(
                "gen_ai.response.finish_reasons",
                Value::Array(reasons.into()),
            ));
        }
        if let Some(a) = last {
            attrs.push(KeyValue::new("server.address", a.address.clone()));
            attrs.push(KeyValue::new("server.port", i64::from(a.port)));
        }
        attrs.push(KeyValue::new("http.request.method", f.method.to_string()));
        if let Some(route) = f.route {
            attrs.push(KeyValue::new("http.route", route.to_string()));
            attrs.push(KeyValue::new("fastgate.route", route.to_string()));
        }
        if f.status != 0 {
            attrs.push(KeyValue::new("http.response.status_code", i64::from(f.status)));
        }
        let failed = f.status >= 500 || (f.status == 0 && f.error.is_some());
        if let Some(e) = f.error.filter(|_| failed || f.status >= 400) {
            attrs.push(KeyValue::new("error.type", e.to_string()));
        } else if failed {
            attrs.push(KeyValue::new("error.type", f.status.to_string()));
        }
        attrs.push(KeyValue::new("fastgate.request_id", f.request_id.to_string()));
        if let Some(u) = f.upstream {
            attrs.push(KeyValue::new("fastgate.upstream", u.to_string()));
        }
        attrs.push(KeyValue::new("fastgate.stream", f.stream));
        attrs.push(KeyValue::new("fastgate.usage_estimated", f.usage_estimated));
        attrs.push(KeyValue::new("fastgate.attempts", self.attempts.len() as i64));
        if let Some(ttfb) = f.ttfb {
            attrs.push(KeyValue::new("fastgate.ttfb_ms", ttfb.as_secs_f64() * 1000.0));
        }
        if let Some(cost) = f.cost {
            attrs.push(KeyValue::new("fastgate.cost", cost));
        }
        let mut spans = Vec::with_capacity(1 + self.attempts.len());
        spans.push(SpanData {
            span_context: context(self.span_id),
            parent_span_id: self.parent.unwrap_or(SpanId::INVALID),
            parent_span_is_remote: self.parent.is_some(),
            span_kind: SpanKind::Server,
            name: name.clone(),
            start_time: self.start,
            end_time: end,
            attributes: attrs,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: if failed { Status::error("") } else { Status::Unset },
            instrumentation_scope: scope.clone(),
        });
        let count = self.attempts.len();
        for (i, a) in self.attempts.into_iter().enumerate() {
            let mut attrs = Vec::with_capacity(12);
            genai(&mut attrs);
            attrs.push(KeyValue::new("server.address", a.address));
            attrs.push(KeyValue::new("server.port", i64::from(a.port)));
            // The last attempt, still open, ended with the request.
            let status = a.status.or((i + 1 == count && a.error.is_none()).then_some(f.status));
            if let Some(s) = status.filter(|&s| s != 0) {
                attrs.push(KeyValue::new("http.response.status_code", i64::from(s)));
            }
            let error = match (&a.error, status) {
                (Some(e), _) => Some(e.clone()),
                (None, Some(s)) if s >= 400 => Some(s.to_string()),
                _ => None,
            };
            attrs.push(KeyValue::new("fastgate.upstream", a.upstream));
            if let Some(id) = a.pool_key_id {
                attrs.push(KeyValue::new("fastgate.pool_key_id", id));
            }
            attrs.push(KeyValue::new("fastgate.attempt", (i + 1) as i64));
            let failed = error.is_some();
            if let Some(e) = error {
                attrs.push(KeyValue::new("error.type", e));
            }
            spans.push(SpanData {
                span_context: context(a.span_id),
                parent_span_id: self.span_id,
                parent_span_is_remote: false,
                span_kind: SpanKind::Client,
                name: name.clone(),
                start_time: a.start,
                end_time: a.end.unwrap_or(end),
                attributes: attrs,
                dropped_attributes_count: 0,
                events: SpanEvents::default(),
                links: SpanLinks::default(),
                status: if failed { Status::error("") } else { Status::Unset },
                instrumentation_scope: scope.clone(),
            });
        }
        spans
    }
}

/// What the end of a request tells its span (borrowed from the request's
/// context by `proxy::finish`; nothing is copied unless exported).
#[derive(Debug, Default)]
pub struct Finished<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    /// The client's path (no query): the GenAI operation is read from it.
    pub path: &'a str,
    pub route: Option<&'a str>,
    pub upstream: Option<&'a str>,
    pub provider: Option<Provider>,
    pub request_model: Option<&'a str>,
    pub response_model: Option<&'a str>,
    pub response_id: Option<&'a str>,
    pub finish_reasons: &'a [&'a str],
    /// The status the client got (499: it hung up).
    pub status: u16,
    /// The error kind the request ended with, if any.
    pub error: Option<&'a str>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub usage_estimated: bool,
    pub stream: bool,
    pub ttfb: Option<Duration>,
    /// The request's cost in USD (pricing).
    pub cost: Option<f64>,
}

impl Finished<'_> {
    /// Exported whatever the sampling said: the gateway or the upstream
    /// failed (5xx, 429, a transport error).
    pub fn failed(&self) -> bool {
        self.status >= 500 || self.status == 429 || (self.status == 0 && self.error.is_some())
    }
}

/// Longest model name recorded (a client may send anything).
const MODEL_MAX: usize = 256;

/// `s` cut to at most `max` bytes, on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `gen_ai.operation.name` from the client's path, when it is a GenAI call.
pub fn operation(path: &str) -> Option<&'static str> {
    let last = path.rsplit('/').next().unwrap_or_default();
    let (resource, method) = last.split_once(':').unwrap_or((last, ""));
    match (resource, method) {
        (_, "generateContent" | "streamGenerateContent") => Some("generate_content"),
        (_, "embedContent" | "batchEmbedContents") => Some("embeddings"),
        (_, m) if !m.is_empty() => None,
        ("completions", _) if path.ends_with("/chat/completions") => Some("chat"),
        ("completions", _) => Some("text_completion"),
        ("embeddings", _) => Some("embeddings"),
        ("messages" | "responses", _) => Some("chat"),
        _ => None,
    }
}

/// `gen_ai.provider.name` (semconv's well-known values) of an upstream.
pub fn provider_name(p: Provider) -> Option<&'static str> {
    match p {
        Provider::Openai | Provider::OpenaiCompatible => Some("openai"),
        Provider::Anthropic => Some("anthropic"),
        Provider::Gemini => Some("gcp.gemini"),
        Provider::Mock => Some("fastgate.mock"),
        Provider::Http => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_by_path() {
        for (path, op) in [
            ("/v1/chat/completions", Some("chat")),
            ("/openai/v1/chat/completions", Some("chat")),
            ("/v1/completions", Some("text_completion")),
            ("/v1/embeddings", Some("embeddings")),
            ("/v1/messages", Some("chat")),
            ("/v1/responses", Some("chat")),
            ("/v1/messages/count_tokens", None),
            (
                "/v1beta/models/gemini-2.0-flash:generateContent",
                Some("generate_content"),
            ),
            (
                "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
                Some("generate_content"),
            ),
            ("/v1beta/models/text-embedding-004:embedContent", Some("embeddings")),
            ("/v1beta/models/gemini-2.0-flash:countTokens", None),
            ("/v1/models", None),
        ] {
            assert_eq!(operation(path), op, "{path}");
        }
    }
}
