//! The upstream exchange for requests whose body FastGate has read.
//!
//! Pingora replays a body consumed in `request_filter` only from its 64 KiB
//! retry buffer (cloudflare/pingora#575), so bodies FastGate reads are sent by
//! this module instead: pooled connection from pingora-core's connector,
//! request written with a correct `content-length`, response streamed to the
//! client chunk by chunk. Having the body in hand also makes retries on
//! another key, endpoint or fallback upstream possible before the first byte.

use super::{
    convert::Plan,
    ctx::RequestCtx,
    errors::GatewayError,
    fake_stream::FakeStream,
    mock,
    retry::{self, Facts, NotConnected, Outcome, Verdict},
    rewrite,
};
use crate::{
    router::Route,
    state::AppState,
    upstream::{Target, Upstream},
};
use bytes::Bytes;
use http::header;
use pingora::{
    ErrorType,
    http::{RequestHeader, ResponseHeader},
    protocols::http::client::HttpSession,
    proxy::Session,
    upstreams::peer::{HttpPeer, Peer},
};
use std::{sync::Arc, time::Duration};

/// How one attempt ended before anything reached the client.
enum Attempt {
    /// Response headers arrived; the session is ready to stream the body.
    Answered(Box<HttpSession>),
    /// No answer; `outcome` says how far the request got (for the retry
    /// policy: whether the provider may have acted on it).
    Failed { error: GatewayError, outcome: Outcome },
}

/// How long an attempt runs before FastGate starts watching for the
/// client's hang-up (well inside the 100 ms in which it must notice).
const WATCH_CLIENT_AFTER: Duration = Duration::from_millis(20);

/// What the client gets instead of a provider's 401/403 to a pool key: the
/// provider's message quotes the key it got (OpenAI's "Incorrect API key
/// provided: sk-…"), which is FastGate's, not the client's to see, nor the
/// audit log's. Both forwarding paths answer with this.
pub fn key_rejected(status: u16, upstream: &crate::upstream::Upstream) -> GatewayError {
    GatewayError::Upstream {
        status,
        message: format!(
            "the upstream refused FastGate's provider key ({status}); an operator must check key pool {:?}",
            upstream.key_pool.as_ref().map_or("-", |p| p.name.as_str())
        ),
        retry_after: None,
    }
}

/// Send the buffered request, retrying and failing over before the first
/// byte, then stream the answer. Returns the error to answer with if no
/// attempt produced a response.
///
/// Order: other keys and addresses of the upstream (within `retries`, every
/// attempt spending one), then the route's fallback upstreams, each within
/// the route's `timeout` overall. Whether a failure is retried at all is
/// [`retry::decide`]'s call, the same as on Pingora's path.
pub async fn exchange(state: &Arc<AppState>, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), GatewayError> {
    let mut fake = None;
    let result = attempts(state, session, ctx, &mut fake).await;
    match (result, fake) {
        // The client has its stream header: the error is its last event.
        (Err(e), Some(mut f)) => {
            f.fail(session, ctx, e).await;
            Ok(())
        }
        (result, _) => result,
    }
}

/// [`exchange`]'s attempts; `fake` holds a fake stream once its header
/// is sent (`fake_stream` routes). Each upstream of the chain in turn:
/// [`prepare`] it, then [`try_upstream`] until it answers, fails for good
/// or hands over to the next.
async fn attempts(
    state: &Arc<AppState>,
    session: &mut Session,
    ctx: &mut RequestCtx,
    fake: &mut Option<FakeStream>,
) -> Result<(), GatewayError> {
    let Some(route) = ctx.route.clone() else {
        return Err(GatewayError::NoRoute {
            method: String::new(),
            path: String::new(),
        });
    };
    let body = ctx.body.clone().unwrap_or_default();
    let chain = upstream_chain(state, &route);
    if let Some(answered) = answer_here(state, session, ctx, &route, &chain, &body).await {
        return answered;
    }
    let request = Request {
        hash_key: ctx.key.as_ref().map(|k| k.id.clone()).unwrap_or_default(),
        deadline: route.timeout.map(|t| ctx.started + t),
        idempotent: retry::idempotent(&session.req_header().method, route.idempotent),
        route: &route,
    };
    let mut last_error = None;
    for (position, upstream) in chain.iter().enumerate() {
        ctx.upstream.upstream = Some(upstream.clone());
        ctx.upstream.slot = None;
        if let Some(mock_cfg) = &upstream.mock {
            if fake.is_some() {
                last_error = Some(no_fake_stream(upstream));
                continue;
            }
            ctx.upstream.attempts += 1;
            if let Err(e) = Box::pin(mock::respond(session, ctx, mock_cfg)).await {
                // Writing failed: the client is gone.
                tracing::debug!(request_id = %ctx.request_id, error = %e, "Client went away during the mock answer.");
                ctx.response.cut_short = true;
                return Err(GatewayError::ClientClosed);
            }
            return Ok(());
        }
        let plan = match prepare(state, session, ctx, fake, &route, upstream, &body).await {
            Ok(plan) => plan,
            Err(Skip::Next(e)) => {
                last_error = Some(e);
                continue;
            }
            Err(Skip::Stop(e)) => return Err(e),
        };
        let leg = Leg {
            send_body: plan.as_ref().map_or_else(|| body.clone(), |p| p.body.clone()),
            plan: plan.as_ref(),
            upstream,
            next_upstream: chain.get(position + 1).map(Arc::as_ref),
        };
        match try_upstream(state, session, ctx, fake, &request, &leg).await {
            Err(Skip::Next(e)) => last_error = Some(e),
            Err(Skip::Stop(e)) => return Err(e),
            Ok(()) => return Ok(()),
        }
    }
    Err(last_error.unwrap_or_else(|| GatewayError::NoEndpoint(route.upstreams[0].clone())))
}

/// What one request brings to every attempt.
struct Request<'a> {
    route: &'a Route,
    /// Consistent-hash input of the balancer (the gateway key's id).
    hash_key: String,
    /// The route's `timeout`, from the request's start.
    deadline: Option<std::time::Instant>,
    idempotent: bool,
}

/// One upstream of the chain, prepared.
struct Leg<'a> {
    upstream: &'a Arc<Upstream>,
    next_upstream: Option<&'a Upstream>,
    /// The conversion toward this upstream's format, if it differs.
    plan: Option<&'a Plan>,
    /// The body sent on every attempt (converted once).
    send_body: Bytes,
}

/// Why an upstream (or the whole exchange) ends without an answer.
enum Skip {
    /// This upstream is done; the next in the chain may still answer.
    Next(GatewayError),
    /// The client gets this error now.
    Stop(GatewayError),
}

/// The route's upstreams as this moment's runtime has them.
fn upstream_chain(state: &AppState, route: &Route) -> Vec<Arc<Upstream>> {
    let runtime = state.runtime.load();
    route
        .upstreams
        .iter()
        .filter_map(|name| runtime.upstreams.get(name).cloned())
        .collect()
}

/// Requests FastGate answers itself when it converts: a token count toward
/// an upstream that cannot count (estimated), and the model list.
async fn answer_here(
    state: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    route: &Route,
    chain: &[Arc<Upstream>],
    body: &Bytes,
) -> Option<Result<(), GatewayError>> {
    let req = session.req_header();
    // A count toward an upstream that can (Anthropic, Gemini) is converted
    // and asked like any request.
    let answer = if super::convert::is_token_count(route.format, req.uri.path())
        && chain.first().is_some_and(|u| {
            crate::router::converts(u.provider, route.format) && !super::convert::counts_tokens(u.provider)
        }) {
        match super::convert::token_count(route.format, req.uri.path(), body) {
            Ok(answer) => answer,
            Err(e) => return Some(Err(e)),
        }
    } else if chain.iter().any(|u| crate::router::converts(u.provider, route.format))
        && super::convert::is_model_list(&req.method, req.uri.path())
    {
        super::convert::model_list(route.format, &req.headers, &state.routes.load())
    } else {
        return None;
    };
    ctx.upstream.attempts += 1;
    Some(
        super::respond::json(session, ctx, 200, answer)
            .await
            .map_err(|_| GatewayError::ClientClosed),
    )
}

/// Take an upstream's slot and convert the body for it; a fake stream's
/// header goes out here, before the first upstream that can serve it is
/// asked.
async fn prepare(
    state: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    fake: &mut Option<FakeStream>,
    route: &Route,
    upstream: &Upstream,
    body: &Bytes,
) -> Result<Option<Plan>, Skip> {
    let Some(slot) = upstream.try_slot() else {
        state.metrics.failovers.with_label_values(&["upstream_busy"]).inc();
        return Err(Skip::Next(GatewayError::UpstreamBusy {
            upstream: upstream.name.clone(),
            limit: upstream.max_in_flight,
        }));
    };
    ctx.upstream.slot = Some(slot);
    // Another API format upstream: the body converted once, replayed on
    // every attempt.
    let uri = &session.req_header().uri;
    let mut plan = super::convert::plan(
        route.format,
        upstream,
        &route.model_map,
        (uri.path(), uri.query()),
        body,
        route.fake_stream.is_some(),
    )
    .map_err(Skip::Next)?;
    if let Some(p) = plan.as_mut() {
        p.answer_as(ctx.model.as_deref());
        if ctx.response.strip_usage_chunk {
            p.usage_not_asked();
        }
    }
    // An upstream that cannot answer whole is skipped once the fake
    // stream's header is out.
    match (&plan, route.fake_stream) {
        (Some(p), Some(every)) if p.fake && fake.is_none() => {
            *fake = Some(FakeStream::start(session, ctx, p, every).await.map_err(Skip::Stop)?);
        }
        (p, _) if fake.is_some() && !p.as_ref().is_some_and(|p| p.fake) => {
            return Err(Skip::Next(no_fake_stream(upstream)));
        }
        _ => {}
    }
    Ok(plan)
}

/// Attempts on one upstream (other keys and addresses, within the route's
/// `retries`) until it answers, fails for good, or hands over.
async fn try_upstream(
    state: &Arc<AppState>,
    session: &mut Session,
    ctx: &mut RequestCtx,
    fake: &mut Option<FakeStream>,
    request: &Request<'_>,
    leg: &Leg<'_>,
) -> Result<(), Skip> {
    let upstream = leg.upstream;
    let mut retries_left = request.route.retries;
    loop {
        let first_byte = first_byte_timeout(request, upstream, ctx).map_err(Skip::Stop)?;
        // A retry starts only for a client still there, even when the
        // last attempt failed too fast for the watcher in `send_watched` to run.
        if ctx.upstream.attempts > 0 && client_hung_up(session).await {
            tracing::debug!(request_id = %ctx.request_id, "Client disconnected between attempts; no retry.");
            return Err(Skip::Stop(client_closed(ctx)));
        }
        ctx.upstream.attempts += 1;
        let target = pick_target(state, ctx, upstream, &request.hash_key)
            .await
            .map_err(Skip::Next)?;
        ctx.upstream.trace_attempt();
        let req = upstream_request(session, ctx, request.route, leg, &target).map_err(Skip::Stop)?;
        let peer = upstream.peer(&target, first_byte);
        let facts = |outcome, retries_left, reconnected| Facts {
            outcome,
            idempotent: request.idempotent,
            retries_left,
            fallback_left: leg.next_upstream.is_some(),
            reconnected,
        };
        // The retry policy's verdict on this attempt (budgets counted).
        let judge = |ctx: &mut RequestCtx, outcome| {
            let facts = facts(outcome, retries_left, ctx.upstream.reconnected);
            retry::judge(state, ctx, &facts, upstream, leg.next_upstream)
        };
        let mut fresh = false;
        let attempt = loop {
            let attempt = send_watched(state, session, ctx, fake, leg, (&peer, &req), first_byte, fresh).await?;
            // A pooled connection the upstream closed while it idled:
            // once per request, on a fresh connection, when safe.
            if let Attempt::Failed { outcome, .. } = &attempt
                && retry::decide(&facts(*outcome, retries_left, ctx.upstream.reconnected)) == Verdict::Reconnect
            {
                tracing::debug!(request_id = %ctx.request_id, upstream = %upstream.name, "A pooled connection was found dead; once more on a fresh one.");
                ctx.upstream.reconnected = true;
                fresh = true;
                continue;
            }
            break attempt;
        };
        let (verdict, error) = match attempt {
            Attempt::Answered(mut up) => {
                let (status, prefix, outcome) = learn_from_answer(upstream, ctx, &mut up).await;
                let verdict = judge(ctx, outcome);
                if !matches!(verdict, Verdict::Retry { .. } | Verdict::Fallback { .. }) {
                    return relay_answer(state, session, ctx, fake, leg, (*up, &peer), (status, prefix)).await;
                }
                tracing::info!(request_id = %ctx.request_id, upstream = %upstream.name, status, attempt = ctx.upstream.attempts, "Upstream answered with a retryable status; failing over.");
                ctx.upstream.mark_failed(&status.to_string());
                (
                    verdict,
                    GatewayError::UpstreamStatus {
                        upstream: upstream.name.clone(),
                        status,
                    },
                )
            }
            Attempt::Failed { error, outcome } => {
                tracing::warn!(request_id = %ctx.request_id, upstream = %upstream.name, error = %error, attempt = ctx.upstream.attempts, "Upstream attempt failed.");
                if let Some(lease) = &ctx.upstream.lease {
                    lease.note_failure(error.kind());
                }
                if outcome == Outcome::NotConnected(NotConnected::Refused) {
                    upstream.rest_address(target.addr);
                }
                ctx.upstream.mark_failed(error.kind());
                let verdict = judge(ctx, outcome);
                // The provider may be acting on it, or nothing is left:
                // the client gets this error.
                if let Verdict::Reconnect | Verdict::Stop(_) = verdict {
                    return Err(Skip::Stop(error));
                }
                (verdict, error)
            }
        };
        if let Verdict::Fallback { .. } = verdict {
            return Err(Skip::Next(error));
        }
        retries_left = retries_left.saturating_sub(1);
    }
}

/// How long this attempt may wait for the first byte: the upstream's
/// `first_byte` timeout, within what is left of the route's `timeout`.
fn first_byte_timeout(request: &Request<'_>, upstream: &Upstream, ctx: &RequestCtx) -> Result<Duration, GatewayError> {
    let Some(deadline) = request.deadline else {
        return Ok(upstream.timeouts.first_byte.0);
    };
    match deadline.checked_duration_since(std::time::Instant::now()) {
        Some(left) if !left.is_zero() => Ok(left.min(upstream.timeouts.first_byte.0)),
        _ => Err(GatewayError::UpstreamTimeout {
            upstream: upstream.name.clone(),
            after_ms: ctx.started.elapsed().as_millis(),
        }),
    }
}

/// The client left: its key lease goes back at once.
fn client_closed(ctx: &mut RequestCtx) -> GatewayError {
    ctx.upstream.lease = None;
    ctx.response.cut_short = true;
    GatewayError::ClientClosed
}

/// An address of the upstream, and a key of its pool, for this attempt.
async fn pick_target(
    state: &AppState,
    ctx: &mut RequestCtx,
    upstream: &Upstream,
    hash_key: &str,
) -> Result<Target, GatewayError> {
    let Some(target) = upstream.select(hash_key.as_bytes(), &ctx.upstream.tried_addrs) else {
        return Err(GatewayError::NoEndpoint(upstream.name.clone()));
    };
    ctx.upstream.target = Some(target.clone());
    ctx.upstream.lease = match &upstream.key_pool {
        Some(pool) => match lease_key(state, pool, ctx).await {
            Ok(lease) => Some(lease),
            Err(no) => {
                state.metrics.failovers.with_label_values(&["no_usable_key"]).inc();
                ctx.upstream.target = None;
                return Err(no_key_error(&pool.name, no));
            }
        },
        None => None,
    };
    Ok(target)
}

/// The request header this attempt sends: rewritten for the route, the
/// upstream, its endpoint and key, and the converted body's format.
fn upstream_request(
    session: &Session,
    ctx: &RequestCtx,
    route: &Route,
    leg: &Leg<'_>,
    target: &Target,
) -> Result<RequestHeader, GatewayError> {
    let mut req = session.req_header().clone();
    let endpoint = leg.upstream.endpoint(target);
    rewrite::upstream_request(
        &mut req,
        ctx,
        route,
        leg.upstream,
        endpoint,
        ctx.upstream.lease.as_ref(),
    )?;
    if let Some(p) = leg.plan {
        p.adjust(&mut req, &endpoint.base_path)?;
    }
    rewrite::set_body_length(&mut req, leg.send_body.len());
    Ok(req)
}

/// [`send`], while watching the client: one that gives up while the
/// upstream connects or thinks drops the exchange (closing the upstream
/// connection, so generation and billing stop) and its key lease. A fake
/// stream sends its keepalives meanwhile instead.
#[allow(clippy::too_many_arguments)]
async fn send_watched(
    state: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    fake: &mut Option<FakeStream>,
    leg: &Leg<'_>,
    (peer, req): (&HttpPeer, &RequestHeader),
    first_byte: Duration,
    fresh: bool,
) -> Result<Attempt, Skip> {
    // Boxed: connecting and sending is the largest state of this exchange
    // (about 10 KiB, most of it Pingora's connector). Held inline, every
    // open stream would carry it until its end.
    let sending = Box::pin(send(
        state,
        peer,
        req,
        leg.send_body.clone(),
        first_byte,
        &leg.upstream.name,
        fresh,
    ));
    let attempt = match fake.as_mut() {
        Some(f) => f.wait(session, ctx, sending).await.ok(),
        None => {
            // Watching starts after a moment, so quick answers never pay
            // the extra read on the client's socket.
            let client_gone = async {
                tokio::time::sleep(WATCH_CLIENT_AFTER).await;
                session.downstream_session.read_body_or_idle(true).await
            };
            tokio::select! {
                a = sending => Some(a),
                _ = client_gone => None,
            }
        }
    };
    attempt.ok_or_else(|| {
        tracing::debug!(request_id = %ctx.request_id, "Client disconnected before the answer; cancelling the upstream request.");
        Skip::Stop(client_closed(ctx))
    })
}

/// What an answer's head tells the key pool and the retry policy; a
/// Gemini 429 names its wait in the body, whose start is read (and handed
/// on as `prefix` if the answer is relayed).
async fn learn_from_answer(
    upstream: &Upstream,
    ctx: &RequestCtx,
    up: &mut HttpSession,
) -> (u16, Option<Bytes>, Outcome) {
    let status = up.response_header().map_or(502, |h| h.status.as_u16());
    let (mut prefix, mut body_delay) = (None, None);
    if status == 429 && upstream.provider == crate::config::Provider::Gemini {
        let (bytes, encoding) = read_error_body(up).await;
        let plain = crate::usage::decode_small(encoding.as_deref(), &bytes, ERROR_BODY_CAP * 4);
        body_delay = crate::pool::signals::gemini_retry_delay(&plain);
        prefix = Some(bytes);
    }
    let mut retry_after = false;
    if let Some(h) = up.response_header() {
        retry_after = h.headers.contains_key(header::RETRY_AFTER);
        if let Some(lease) = &ctx.upstream.lease {
            lease.observe_with_delay(status, &h.headers, ctx.model.as_deref(), body_delay);
        }
    }
    let outcome = Outcome::Answered {
        status,
        retry_after,
        pooled_key: ctx.upstream.lease.is_some(),
    };
    (status, prefix, outcome)
}

/// Hand an answer that is not retried to the client: as it came, converted
/// to the client's format, or as a fake stream's events.
async fn relay_answer(
    state: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    fake: &mut Option<FakeStream>,
    leg: &Leg<'_>,
    (up, peer): (HttpSession, &HttpPeer),
    (status, prefix): (u16, Option<Bytes>),
) -> Result<(), Skip> {
    if matches!(status, 401 | 403) && ctx.upstream.lease.is_some() {
        return Err(Skip::Stop(key_rejected(status, leg.upstream)));
    }
    let idle = leg.upstream.timeouts.idle.0;
    let relayed = match (leg.plan, fake.as_mut()) {
        (Some(p), Some(f)) => Box::pin(f.respond(state, session, ctx, (up, peer), (p, idle), prefix)).await,
        // Boxed like `send`: only a converted answer carries it.
        (Some(p), None) => {
            Box::pin(super::convert::respond(
                state,
                session,
                ctx,
                (up, peer),
                p,
                idle,
                prefix,
            ))
            .await
        }
        (None, _) => {
            stream_response(state, session, ctx, up, peer, prefix).await;
            Ok(())
        }
    };
    relayed.map_err(Skip::Stop)
}

/// An upstream skipped because it cannot serve a fake stream whose header
/// is already out (a mock, or an upstream the route's format passes through to).
fn no_fake_stream(upstream: &Upstream) -> GatewayError {
    GatewayError::NotConvertible(format!(
        "upstream {:?} cannot answer a fake stream (fake_stream needs an OpenAI, Anthropic or Gemini upstream)",
        upstream.name
    ))
}

/// How much of an error answer is read to learn from it (Gemini's
/// `RetryInfo`), and for how long at most.
const ERROR_BODY_CAP: usize = 16 * 1024;
const ERROR_BODY_WAIT: Duration = Duration::from_secs(1);

/// The start of an error answer's body (still encoded) and its encoding;
/// whatever was not read is streamed after it if the answer is handed on.
async fn read_error_body(up: &mut HttpSession) -> (Bytes, Option<String>) {
    let encoding = up
        .response_header()
        .and_then(|h| h.headers.get(header::CONTENT_ENCODING))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let deadline = tokio::time::Instant::now() + ERROR_BODY_WAIT;
    let mut buf = bytes::BytesMut::new();
    while buf.len() < ERROR_BODY_CAP {
        match tokio::time::timeout_at(deadline, up.read_response_body()).await {
            Ok(Ok(Some(chunk))) => buf.extend_from_slice(&chunk),
            _ => break,
        }
    }
    (buf.freeze(), encoding)
}

/// The 503 for a pool with no usable key, with the soonest recovery.
pub fn no_key_error(pool: &str, no: crate::pool::NoKey) -> GatewayError {
    let now = crate::clock::now_ms();
    GatewayError::NoUpstreamKey {
        pool: pool.to_string(),
        reason: no.reason,
        // Rounded up: a client must not come back a moment too early.
        retry_after: no
            .retry_at_ms
            .map(|at| ((at - now).max(0) as u64).div_ceil(1000).max(1)),
    }
}

/// Whether the client has hung up, without waiting: between attempts, when
/// a failure came too fast for the watcher around `send` to run.
async fn client_hung_up(session: &mut Session) -> bool {
    futures_lite::future::poll_once(session.downstream_session.read_body_or_idle(true))
        .await
        .is_some()
}

/// One attempt: connect (pooled unless `fresh`), write request and body,
/// wait for headers. Nothing is retried here: how far the request got is
/// reported for [`retry::decide`] (a dead pooled connection after the write
/// is not the same as one before it).
async fn send(
    state: &AppState,
    peer: &HttpPeer,
    req: &pingora::http::RequestHeader,
    body: Bytes,
    first_byte: Duration,
    upstream: &str,
    fresh: bool,
) -> Attempt {
    let (mut s, reused) = loop {
        match state.connector.get_http_session(peer).await {
            // Drain stale pooled connections rather than use them.
            Ok((s, true)) if fresh => drop(s),
            Ok(pair) => break pair,
            Err(e) => {
                return Attempt::Failed {
                    outcome: Outcome::NotConnected(not_connected(&e)),
                    error: connect_error(&e, upstream),
                };
            }
        }
    };
    let written: pingora::Result<()> = async {
        let _cork = (!body.is_empty()).then(|| Cork::new(&s));
        s.write_request_header(Box::new(req.clone())).await?;
        s.write_request_body(body, true).await?;
        s.finish_request_body().await?;
        Ok(())
    }
    .await;
    if let Err(e) = written {
        return Attempt::Failed {
            error: connect_error(&e, upstream),
            outcome: Outcome::WriteFailed { reused },
        };
    }
    match tokio::time::timeout(first_byte, s.read_response_header()).await {
        Ok(Ok(())) => Attempt::Answered(Box::new(s)),
        Ok(Err(e)) => Attempt::Failed {
            outcome: Outcome::AfterWrite {
                reused,
                timeout: e.etype() == &ErrorType::ReadTimedout,
            },
            error: connect_error(&e, upstream),
        },
        Err(_) => Attempt::Failed {
            error: GatewayError::UpstreamTimeout {
                upstream: upstream.into(),
                after_ms: first_byte.as_millis(),
            },
            outcome: Outcome::AfterWrite { reused, timeout: true },
        },
    }
}

/// How a connection that was never made failed.
pub fn not_connected(e: &pingora::Error) -> NotConnected {
    match e.etype() {
        _ if is_refused(e) => NotConnected::Refused,
        ErrorType::ConnectTimedout => NotConnected::Timeout,
        ErrorType::TLSHandshakeFailure
        | ErrorType::TLSHandshakeTimedout
        | ErrorType::InvalidCert
        | ErrorType::HandshakeError => NotConnected::Tls,
        _ => NotConnected::Other,
    }
}

/// Holds partial TCP frames while set (`TCP_CORK`), so a request header and
/// the body FastGate already holds leave in one segment: Pingora flushes the
/// header on its own, which would cost the upstream a second wake-up and
/// this process a second loopback/NIC transmit per request. Uncorked on
/// drop, whatever happened in between.
struct Cork(Option<std::os::fd::RawFd>);

impl Cork {
    fn new(session: &HttpSession) -> Self {
        use std::os::fd::AsRawFd;
        // Plain TCP only: Pingora's TLS streams do not expose their socket.
        Cork(
            session
                .as_http1()
                .and_then(|h1| {
                    h1.stream()
                        .as_any()
                        .downcast_ref::<pingora::protocols::l4::stream::Stream>()
                })
                .map(AsRawFd::as_raw_fd)
                .filter(|&fd| set_cork(fd, true)),
        )
    }
}

impl Drop for Cork {
    fn drop(&mut self) {
        if let Some(fd) = self.0 {
            set_cork(fd, false);
        }
    }
}

/// Whether the option was set (false on a non-TCP socket).
fn set_cork(fd: std::os::fd::RawFd, on: bool) -> bool {
    let value = libc::c_int::from(on);
    // SAFETY: `fd` is the live socket of a session borrowed by the caller;
    // the option value is a c_int on the stack, passed with its size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// A connection that was never made (refused, no route, unreachable):
/// nothing reached the upstream.
pub fn is_refused(e: &pingora::Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectRefused | ErrorType::ConnectNoRoute | ErrorType::ConnectError | ErrorType::SocketError
    )
}

fn connect_error(e: &pingora::Error, upstream: &str) -> GatewayError {
    match e.etype() {
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
            GatewayError::UpstreamTimeout {
                upstream: upstream.into(),
                after_ms: 0,
            }
        }
        _ => GatewayError::UpstreamUnreachable {
            upstream: upstream.into(),
            reason: e.etype().as_str().to_string(),
        },
    }
}

/// Copy the upstream response header for the client: hop-by-hop headers
/// dropped, framing decided by the client's protocol, request id added.
fn client_header(upstream: &ResponseHeader, ctx: &RequestCtx, h2: bool) -> pingora::Result<ResponseHeader> {
    let mut resp = ResponseHeader::build(upstream.status, Some(upstream.headers.len() + 2))?;
    let named = rewrite::connection_named(&upstream.headers);
    for (name, value) in upstream.headers.iter() {
        if rewrite::is_hop_by_hop(name, &named) || name == header::TRANSFER_ENCODING {
            continue;
        }
        resp.append_header(name.clone(), value.clone())?;
    }
    // 1xx, 204 and 304 answers have no body, so no framing either.
    let bodyless = matches!(upstream.status.as_u16(), 100..=199 | 204 | 304);
    if !h2 && !bodyless && !resp.headers.contains_key(header::CONTENT_LENGTH) {
        resp.insert_header(header::TRANSFER_ENCODING, "chunked")?;
    }
    resp.insert_header("x-request-id", ctx.request_id.as_str())?;
    Ok(resp)
}

/// Stream the upstream body to the client as it arrives. Ends early (and
/// drops the upstream connection, cancelling the request) when the client
/// goes away; a mid-stream upstream failure ends an SSE stream with an error
/// event.
async fn stream_response(
    state: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    mut up: HttpSession,
    peer: &HttpPeer,
    read_already: Option<Bytes>,
) {
    let Some(upstream_header) = up.response_header().cloned() else {
        return;
    };
    let status = upstream_header.status.as_u16();
    let resp = match client_header(&upstream_header, ctx, session.is_http2()) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(request_id = %ctx.request_id, error = %e, "Upstream response header could not be copied.");
            return;
        }
    };
    ctx.begin_response(&resp);
    let is_sse = ctx.response.meter.is_sse();
    let head_only = session.req_header().method == http::Method::HEAD || status == 204 || status == 304;
    if session.write_response_header(Box::new(resp), head_only).await.is_err() {
        return;
    }
    if head_only {
        return;
    }
    let idle = ctx
        .upstream
        .upstream
        .as_ref()
        .map_or(Duration::from_secs(300), |u| u.timeouts.idle.0);
    up.set_read_timeout(Some(idle));
    if let Some(first) = read_already.filter(|b| !b.is_empty()) {
        let data = ctx.upstream_chunk(first);
        if !data.is_empty() && session.write_response_body(Some(data), false).await.is_err() {
            ctx.error = Some(GatewayError::ClientClosed);
            ctx.response.cut_short = true;
            return;
        }
    }
    // A streamed answer can stay silent for long: watch the client meanwhile,
    // so a hang-up cancels generation. A sized body arrives at once and needs
    // no watcher (saving a syscall per read).
    let watch_client = !upstream_header.headers.contains_key(header::CONTENT_LENGTH);
    let mut relay = super::relay::Relay::default();
    loop {
        let chunk = if watch_client {
            tokio::select! {
                chunk = relay.next(&mut up) => chunk,
                _ = session.downstream_session.read_body_or_idle(true) => {
                    tracing::debug!(request_id = %ctx.request_id, "Client disconnected; cancelling the upstream request.");
                    ctx.error = Some(GatewayError::ClientClosed);
                    ctx.response.cut_short = true;
                    return;
                }
            }
        } else {
            relay.next(&mut up).await
        };
        match chunk {
            Ok(Some(data)) => {
                let data = relay_batch(ctx, &mut relay, &mut up, data);
                if data.is_empty() {
                    continue;
                }
                if session.write_response_body(Some(data), false).await.is_err() {
                    tracing::debug!(request_id = %ctx.request_id, "Client went away mid-response; upstream request dropped.");
                    ctx.error = Some(GatewayError::ClientClosed);
                    ctx.response.cut_short = true;
                    return;
                }
            }
            Ok(None) => {
                if let Some(rest) = ctx.upstream_end()
                    && session.write_response_body(Some(rest), false).await.is_err()
                {
                    ctx.error = Some(GatewayError::ClientClosed);
                    ctx.response.cut_short = true;
                    return;
                }
                break;
            }
            Err(e) => {
                tracing::warn!(request_id = %ctx.request_id, error = %e, "Upstream failed mid-response.");
                let err = GatewayError::UpstreamUnreachable {
                    upstream: ctx.upstream_name().to_string(),
                    reason: format!("{} after the response started", e.etype().as_str()),
                };
                if is_sse {
                    // A well-formed end: the client sees an error event.
                    let _ = session
                        .write_response_body(Some(err.sse_event(ctx.format)), false)
                        .await;
                    let _ = session.write_response_body(None, true).await;
                } else {
                    // No clean end of body: the client must not see a
                    // truncated answer as a complete one.
                    ctx.response.cut_short = true;
                }
                ctx.error = Some(err);
                return;
            }
        }
    }
    let _ = session.write_response_body(None, true).await;
    if up.response_done() {
        let idle_timeout = peer.idle_timeout();
        state.connector.release_http_session(up, peer, idle_timeout).await;
    }
}

/// `first` and the pieces ready after it, filtered for the client, as one
/// write (no copy when only one piece was ready).
fn relay_batch(ctx: &mut RequestCtx, relay: &mut super::relay::Relay, up: &mut HttpSession, first: Bytes) -> Bytes {
    let first = ctx.upstream_chunk(first);
    let Some(second) = relay.ready(up) else { return first };
    let mut batch = bytes::BytesMut::with_capacity(first.len() * 4);
    batch.extend_from_slice(&first);
    batch.extend_from_slice(&ctx.upstream_chunk(second));
    while batch.len() < super::relay::BATCH_BYTES {
        let Some(more) = relay.ready(up) else { break };
        batch.extend_from_slice(&ctx.upstream_chunk(more));
    }
    batch.freeze()
}

/// What a key test (`POST /api/pools/{pool}/keys/{id}/test`) found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Probe {
    pub status: Option<u16>,
    pub latency_ms: f64,
    pub error: Option<String>,
    pub upstream: String,
    pub path: String,
}

/// A cheap real call with `key`: the provider's model list. The answer's
/// status feeds the key's state like any request's would (a 401 counts
/// toward `disable_after`).
pub async fn probe(state: &AppState, upstream: &Upstream, lease: &crate::pool::Lease) -> Probe {
    use crate::config::Provider;
    let path = match upstream.provider {
        Provider::Gemini => "/v1beta/models",
        _ => "/v1/models",
    };
    let started = std::time::Instant::now();
    let done = |status: Option<u16>, error: Option<String>| Probe {
        status,
        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        error,
        upstream: upstream.name.clone(),
        path: path.to_string(),
    };
    let Some(target) = upstream.select(b"", &[]) else {
        return done(None, Some(GatewayError::NoEndpoint(upstream.name.clone()).to_string()));
    };
    let ep = upstream.endpoint(&target);
    let full = format!("{}{path}", ep.base_path);
    let mut req = match pingora::http::RequestHeader::build("GET", full.as_bytes(), None) {
        Ok(r) => r,
        Err(e) => return done(None, Some(e.to_string())),
    };
    let _ = req.insert_header(header::HOST, ep.authority.as_str());
    let _ = req.insert_header(header::ACCEPT, "application/json");
    rewrite::inject_key(&mut req, upstream.provider, lease.key().secret.expose());
    let timeout = upstream.timeouts.first_byte.0.min(Duration::from_secs(30));
    let peer = upstream.peer(&target, timeout);
    let mut attempt = send(state, &peer, &req, Bytes::new(), timeout, &upstream.name, false).await;
    // A GET: a pooled connection found dead gets its one fresh one.
    if let Attempt::Failed { outcome, .. } = &attempt {
        let facts = Facts {
            outcome: *outcome,
            idempotent: true,
            retries_left: 0,
            fallback_left: false,
            reconnected: false,
        };
        if retry::decide(&facts) == Verdict::Reconnect {
            attempt = send(state, &peer, &req, Bytes::new(), timeout, &upstream.name, true).await;
        }
    }
    match attempt {
        Attempt::Answered(s) => {
            let status = s.response_header().map(|h| h.status.as_u16());
            if let (Some(code), Some(h)) = (status, s.response_header()) {
                lease.observe(code, &h.headers, None);
            }
            done(status, None)
        }
        Attempt::Failed { error, .. } => done(None, Some(error.to_string())),
    }
}

/// Lease a key of `pool` for this attempt: in cluster mode with a per-key
/// in-flight cap, a slot counted across the nodes too.
pub async fn lease_key(
    state: &crate::state::AppState,
    pool: &std::sync::Arc<crate::pool::KeyPool>,
    ctx: &RequestCtx,
) -> Result<crate::pool::Lease, crate::pool::NoKey> {
    let (avoid, model) = (&ctx.upstream.tried_keys, ctx.model.as_deref());
    match &state.cluster {
        Some(cluster) if pool.policy.max_in_flight_per_key > 0 => {
            let lease_id = format!("{}:{}", ctx.request_id, ctx.upstream.attempts);
            cluster.lease(pool, avoid, model, &lease_id).await
        }
        _ => pool.lease(avoid, model),
    }
}
