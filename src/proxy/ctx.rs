//! Per-request state, grouped by concern. Lives from `new_ctx` to `logging`.

use super::errors::GatewayError;
use crate::{
    audit,
    usage::{UsageMeter, chunk_filter::UsageChunkFilter},
};
use crate::{
    auth::CredentialSource,
    config::routes_d::Format,
    pool::Lease,
    router::Route,
    state::AppState,
    store::keys::GatewayKey,
    upstream::{RetryToken, Slot, Target, Upstream},
};
use bytes::Bytes;
use pingora::http::ResponseHeader;
use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

/// Counts the request in `AppState::in_flight` for as long as it lives.
pub struct InFlight(Arc<AppState>);

impl InFlight {
    pub fn new(state: &Arc<AppState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Who the client is, as far as the network tells.
#[derive(Debug, Default, Clone, Copy)]
pub struct ClientCtx {
    /// The client's address: the peer's, or behind trusted proxies theirs.
    pub ip: Option<std::net::IpAddr>,
    /// The connection's peer (after a PROXY header, the address it named).
    pub peer: Option<std::net::IpAddr>,
    /// Whether the peer is a trusted proxy (its `X-Forwarded-For` counts).
    pub peer_trusted: bool,
    /// Whether the client connection is TLS.
    pub https: bool,
}

/// Which upstream attempt is under way and what was tried before.
#[derive(Default)]
pub struct UpstreamCtx {
    pub upstream: Option<Arc<Upstream>>,
    pub target: Option<Target>,
    pub lease: Option<Lease>,
    /// The request's place under the upstream's `max_in_flight`.
    pub slot: Option<Slot>,
    pub attempts: u32,
    pub tried_addrs: Vec<SocketAddr>,
    pub tried_keys: Vec<String>,
    /// The current attempt's place under its upstream's `retry_budget`
    /// (a retry holds one until it ends).
    pub retry_token: Option<RetryToken>,
    /// The one fresh connection after a dead pooled one was used.
    pub reconnected: bool,
    /// Failed attempts, `upstream address key outcome` each; empty on the
    /// happy path (nothing is built then).
    pub trail: Vec<String>,
    /// The request's trace and its attempts' spans; `None` unless `otel:`
    /// is set (nothing is recorded or allocated then).
    pub trace: Option<Box<crate::otel::RequestTrace>>,
}

impl UpstreamCtx {
    /// Remember the current attempt as failed with `outcome` (for the next
    /// attempt's choice, the audit row and metrics).
    pub fn mark_failed(&mut self, outcome: &str) {
        if let Some(trace) = &mut self.trace {
            trace.end_attempt(outcome);
        }
        self.trail.push(self.describe(outcome));
        if let Some(t) = self.target.take() {
            self.tried_addrs.push(t.addr);
        }
        if let Some(l) = self.lease.take() {
            self.tried_keys.push(l.key().id.clone());
        }
    }

    /// A traced request's attempt starts, toward the target and with the
    /// key now chosen (only the key's id is kept, never the key).
    pub fn trace_attempt(&mut self) {
        let Some(trace) = &mut self.trace else { return };
        let (Some(upstream), Some(target)) = (&self.upstream, &self.target) else {
            return;
        };
        let endpoint = (!upstream.endpoints.is_empty()).then(|| upstream.endpoint(target));
        trace.begin_attempt(
            &upstream.name,
            endpoint.map_or("-", |e| e.host.as_str()),
            endpoint.map_or(target.addr.port(), |e| e.port),
            self.lease.as_ref().map(|l| l.key().id.as_str()),
        );
    }

    fn describe(&self, outcome: &str) -> String {
        format!(
            "{} {} {} {outcome}",
            self.upstream.as_ref().map_or("-", |u| u.name.as_str()),
            self.target
                .as_ref()
                .map_or_else(|| "-".to_string(), |t| t.addr.to_string()),
            self.lease.as_ref().map_or("-", |l| l.key().id.as_str()),
        )
    }

    /// Every attempt of a request that failed over (for the audit row);
    /// `None` when the first attempt was the only one.
    pub fn attempts_summary(&self, final_status: u16) -> Option<String> {
        if self.trail.is_empty() {
            return None;
        }
        let mut all = self.trail.clone();
        if self.target.is_some() || self.lease.is_some() {
            all.push(self.describe(&final_status.to_string()));
        }
        Some(all.join("; "))
    }
}

/// Decrements the streams-in-flight gauge when the stream ends.
pub struct StreamGuard(prometheus::IntGauge);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What went back to the client.
#[derive(Default)]
pub struct ResponseCtx {
    pub status: u16,
    pub ttfb: Option<Duration>,
    pub bytes: u64,
    pub chunks: u64,
    /// Token usage read from the body as it passes; also keeps the decoded
    /// first `body_max_bytes` when the audit log captures bodies.
    pub meter: UsageMeter,
    /// Redacted response headers, when the audit log captures them.
    pub headers: Option<String>,
    pub stream: bool,
    /// Set when FastGate asked an OpenAI stream for usage on the client's
    /// behalf: the usage-only chunk is kept from the client.
    pub strip_usage_chunk: bool,
    usage_chunks: Option<UsageChunkFilter>,
    /// The body was cut short (client gone, or a non-SSE upstream body
    /// failed): the connection must close without a clean end of body, so
    /// the client cannot take a partial answer for a whole one.
    pub cut_short: bool,
    /// The upstream's answer began reaching the client (not an answer
    /// FastGate wrote itself): a request that then ends in an error is
    /// charged an estimate of its tokens (`usage::estimate`).
    pub upstream_answered: bool,
    /// Pingora's path: the upstream's body is dropped and this sent instead
    /// (a provider's 401/403 quoting the pool key).
    pub replacement: Option<Bytes>,
    _stream: Option<StreamGuard>,
}

pub struct RequestCtx {
    pub request_id: String,
    pub started: Instant,
    /// Error shape for responses FastGate writes itself.
    pub format: Format,
    pub route: Option<Arc<Route>>,
    pub key: Option<Arc<GatewayKey>>,
    pub credential: Option<CredentialSource>,
    pub client: ClientCtx,
    /// The request body when FastGate read it (already rewritten).
    pub body: Option<Bytes>,
    /// Request body bytes seen on the streaming path.
    pub body_seen: u64,
    /// The first `body_max_bytes` of a streamed request body, when captured.
    pub body_capture: Option<Vec<u8>>,
    /// Wall-clock start, Unix milliseconds.
    pub started_ms: i64,
    pub model: Option<String>,
    /// The rate limits the request was admitted by (its tokens are charged
    /// to them at the end).
    pub admission: Option<crate::ratelimit::Admission>,
    pub upstream: UpstreamCtx,
    pub response: ResponseCtx,
    /// The error FastGate answered with (or that ended the request).
    pub error: Option<GatewayError>,
    pub state: Arc<AppState>,
    _in_flight: Option<InFlight>,
}

/// A request that ends without reaching `finish` (a panic unwinding its
/// task) still gives its reservations back: held, they would refuse the
/// key's next requests until the period ends.
impl Drop for RequestCtx {
    fn drop(&mut self) {
        if let Some(admission) = self.admission.take() {
            tracing::error!(
                request_id = %self.request_id,
                "request ended without settling its limits; its reservations were released"
            );
            super::finish::settle(&self.state, &self.request_id, admission, 0, 0);
        }
    }
}

impl RequestCtx {
    pub fn new(state: &Arc<AppState>) -> Self {
        RequestCtx {
            request_id: String::new(),
            started: Instant::now(),
            format: Format::Openai,
            route: None,
            key: None,
            credential: None,
            client: ClientCtx::default(),
            body: None,
            body_seen: 0,
            body_capture: None,
            started_ms: crate::clock::now_ms(),
            model: None,
            admission: None,
            upstream: UpstreamCtx::default(),
            response: ResponseCtx::default(),
            error: None,
            state: state.clone(),
            _in_flight: Some(InFlight::new(state)),
        }
    }

    pub fn route_name(&self) -> &str {
        self.route.as_ref().map_or("-", |r| r.name.as_str())
    }

    /// The response header is going to the client: start timing, metering
    /// and (if configured) capture.
    pub fn begin_response(&mut self, header: &ResponseHeader) {
        self.response.status = header.status.as_u16();
        self.response.ttfb.get_or_insert(self.started.elapsed());
        let text = |name| {
            header
                .headers
                .get(name)
                .and_then(|v: &http::HeaderValue| v.to_str().ok())
        };
        let audit = &self.state.config.file.audit;
        // One byte past the cap tells the audit row the body was longer.
        let capture = (audit.enabled && audit.capture_body).then_some(audit.body_max_bytes.0 as usize + 1);
        self.response.meter = UsageMeter::new(
            text(http::header::CONTENT_TYPE),
            text(http::header::CONTENT_ENCODING),
            capture,
        );
        let merge = capture.is_some() && audit.merge_streams;
        if audit.enabled && audit.capture_headers {
            self.response.headers = Some(audit::redact_headers(&header.headers));
        }
        if merge {
            // A passthrough answer: its format is told by its first event.
            self.merge_stream(text(http::header::CONTENT_TYPE), Default::default);
        }
        let encoded = text(http::header::CONTENT_ENCODING).is_some_and(|e| !e.eq_ignore_ascii_case("identity"));
        if self.response.strip_usage_chunk && self.response.meter.is_sse() && !encoded {
            self.response.usage_chunks = Some(UsageChunkFilter::default());
        }
        if self.response.meter.is_sse() {
            self.response.stream = true;
            let gauge = self.state.metrics.streams_in_flight.clone();
            gauge.inc();
            self.response._stream = Some(StreamGuard(gauge));
        }
    }

    /// A chunk of a response body FastGate wrote itself is going to the client.
    pub fn response_chunk(&mut self, data: &[u8]) {
        self.response.bytes += data.len() as u64;
        self.response.chunks += 1;
        self.response.meter.feed(data);
    }

    /// A chunk of the upstream's body: metered as it came, then what the
    /// client should get of it (possibly nothing yet).
    pub fn upstream_chunk(&mut self, data: Bytes) -> Bytes {
        self.response.upstream_answered = true;
        self.response.meter.feed(&data);
        let out = match &mut self.response.usage_chunks {
            Some(filter) => filter.filter(data),
            None => data,
        };
        self.count_sent(&out);
        out
    }

    /// The upstream body ended: anything still held for the client.
    pub fn upstream_end(&mut self) -> Option<Bytes> {
        let rest = self.response.usage_chunks.as_mut()?.flush();
        self.count_sent(&rest);
        (!rest.is_empty()).then_some(rest)
    }

    /// Meter the upstream's bytes rather than the client's (a converted
    /// answer: usage is read in the upstream's own format, before conversion).
    pub fn meter_upstream(&mut self, content_type: Option<&str>) {
        let audit = &self.state.config.file.audit;
        // One byte past the cap tells the audit row the body was longer.
        let capture = (audit.enabled && audit.capture_body).then_some(audit.body_max_bytes.0 as usize + 1);
        self.response.meter = UsageMeter::new(content_type, None, capture);
        self.response.upstream_answered = true;
    }

    /// Capture a streamed answer merged (`audit.merge_streams`) rather than
    /// its first bytes; `spec` is only built when bodies are captured.
    pub fn merge_stream(&mut self, content_type: Option<&str>, spec: impl FnOnce() -> crate::audit::merge::Spec) {
        let audit = &self.state.config.file.audit;
        if !(audit.enabled && audit.capture_body && audit.merge_streams) {
            return;
        }
        let cap = audit.body_max_bytes.0 as usize;
        if let Some(merge) = crate::audit::merge::StreamMerge::new(spec(), content_type, cap) {
            self.response.meter.merge_stream(merge);
        }
    }

    pub fn count_sent(&mut self, data: &[u8]) {
        if !data.is_empty() {
            self.response.bytes += data.len() as u64;
            self.response.chunks += 1;
        }
    }

    pub fn upstream_name(&self) -> &str {
        self.upstream.upstream.as_ref().map_or("-", |u| u.name.as_str())
    }
}
