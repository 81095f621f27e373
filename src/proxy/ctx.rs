//! Per-request state, grouped by concern. Lives from `new_ctx` to `logging`.

use super::errors::GatewayError;
use crate::{
    auth::CredentialSource,
    config::routes_d::Format,
    pool::Lease,
    router::Route,
    state::AppState,
    store::keys::GatewayKey,
    upstream::{Target, Upstream},
};
use bytes::Bytes;
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
        state.requests_total.fetch_add(1, Ordering::Relaxed);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Which upstream attempt is under way and what was tried before.
#[derive(Default)]
pub struct UpstreamCtx {
    pub upstream: Option<Arc<Upstream>>,
    pub target: Option<Target>,
    pub lease: Option<Lease>,
    pub attempts: u32,
    pub tried_addrs: Vec<SocketAddr>,
    pub tried_keys: Vec<String>,
}

impl UpstreamCtx {
    /// Remember the current target and key as failed, for the next attempt.
    pub fn mark_failed(&mut self) {
        if let Some(t) = self.target.take() {
            self.tried_addrs.push(t.addr);
        }
        if let Some(l) = self.lease.take() {
            self.tried_keys.push(l.key().id.clone());
        }
    }
}

/// What went back to the client.
#[derive(Default)]
pub struct ResponseCtx {
    pub status: u16,
    pub ttfb: Option<Duration>,
    pub bytes: u64,
    pub chunks: u64,
}

pub struct RequestCtx {
    pub request_id: String,
    pub started: Instant,
    /// Error shape for responses FastGate writes itself.
    pub format: Format,
    pub route: Option<Arc<Route>>,
    pub key: Option<Arc<GatewayKey>>,
    pub credential: Option<CredentialSource>,
    /// The request body when FastGate read it (already rewritten).
    pub body: Option<Bytes>,
    /// Request body bytes seen on the streaming path.
    pub body_seen: u64,
    pub model: Option<String>,
    pub upstream: UpstreamCtx,
    pub response: ResponseCtx,
    /// The error FastGate answered with (or that ended the request).
    pub error: Option<GatewayError>,
    _in_flight: Option<InFlight>,
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
            body: None,
            body_seen: 0,
            model: None,
            upstream: UpstreamCtx::default(),
            response: ResponseCtx::default(),
            error: None,
            _in_flight: Some(InFlight::new(state)),
        }
    }

    pub fn route_name(&self) -> &str {
        self.route.as_ref().map_or("-", |r| r.name.as_str())
    }

    pub fn upstream_name(&self) -> &str {
        self.upstream.upstream.as_ref().map_or("-", |u| u.name.as_str())
    }
}
