//! The data plane: FastGate's Pingora `ProxyHttp` implementation.
//!
//! Phase chart (each phase hands off to one module):
//!
//! ```text
//! request_filter ── intake::admit ──┬─ error ──────────────► respond::error (client's error shape)
//!   (route, auth, body if needed)   ├─ mock upstream ──────► mock::respond
//!                                   ├─ body was read ──────► forward::exchange (own connector,
//!                                   │                         retries, fallback, streaming,
//!                                   │                         convert: other formats)
//!                                   └─ body untouched ─┐
//! upstream_peer ◄──────────────────────────────────────┘ endpoint (pingora-lb) + key lease
//! upstream_request_filter  rewrite::upstream_request (path, headers, key injection)
//! request_body_filter      max_request_body on streamed bodies
//! response_filter          x-request-id
//! fail_to_connect          retry::decide: another endpoint/key while `retries` allow
//! error_while_proxy        retry::decide: never a client hang-up, nor a POST
//!                          the provider may be running
//! fail_to_proxy            respond::error
//! logging                  finish: usage, metrics, audit row, one log line
//! ```

pub mod conn_guard;
pub mod convert;
pub mod ctx;
pub mod errors;
pub mod fake_stream;
pub mod finish;
pub mod forward;
pub mod intake;
pub mod mock;
pub mod relay;
pub mod respond;
pub mod retry;
pub mod rewrite;

use crate::{otel, state::AppState};
use async_trait::async_trait;
use bytes::Bytes;
use ctx::RequestCtx;
use errors::GatewayError;
use pingora::{
    ErrorSource, ErrorType,
    http::{RequestHeader, ResponseHeader},
    proxy::{FailToProxy, ProxyHttp, Session},
    upstreams::peer::HttpPeer,
};
use std::sync::Arc;

/// The data-plane service.
pub struct Gateway {
    pub state: Arc<AppState>,
}

impl Gateway {
    pub fn new(state: Arc<AppState>) -> Self {
        Gateway { state }
    }

    /// The retry policy for an attempt on Pingora's path (one upstream, no
    /// fallback): `retries` minus the attempts already made, the one
    /// reconnect excepted.
    fn judge(&self, ctx: &mut RequestCtx, outcome: retry::Outcome, method_idempotent: bool) -> retry::Verdict {
        let (Some(route), Some(upstream)) = (ctx.route.clone(), ctx.upstream.upstream.clone()) else {
            return retry::Verdict::Stop(None);
        };
        let spent = ctx
            .upstream
            .attempts
            .saturating_sub(1 + u32::from(ctx.upstream.reconnected));
        let facts = retry::Facts {
            outcome,
            idempotent: method_idempotent || route.idempotent,
            retries_left: route.retries.saturating_sub(spent),
            fallback_left: false,
            reconnected: ctx.upstream.reconnected,
        };
        retry::judge(&self.state, ctx, &facts, &upstream, None)
    }

    /// Turn a FastGate error into a Pingora error that `fail_to_proxy` renders.
    fn fail(ctx: &mut RequestCtx, err: GatewayError) -> Box<pingora::Error> {
        let status = err.status();
        let msg = err.to_string();
        ctx.error = Some(err);
        pingora::Error::explain(ErrorType::HTTPStatus(status), msg)
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(&self.state)
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> pingora::Result<bool> {
        ctx.request_id = intake::request_id(session);
        if let Some(tracer) = &*self.state.otel.load() {
            let headers = &session.req_header().headers;
            ctx.upstream.trace = Some(otel::RequestTrace::start(headers, &tracer.sampler, ctx.started));
        }
        ctx.client = intake::client(&self.state, session);
        ctx.format = errors::guess_format(session.req_header().uri.path(), &session.req_header().headers);
        // Transport bounds first: before routing, auth or any body read.
        if self.state.config.file.server.limits.keepalive_timeout.0.is_zero() {
            session.set_keepalive(None);
        }
        if let Some((why, e)) = conn_guard::check_header(&self.state.config.file.server.limits, session.req_header()) {
            self.state
                .metrics
                .transport_refusals
                .with_label_values(&[why.label()])
                .inc();
            respond::error(session, ctx, e).await?;
            return Ok(true);
        }
        if let Err(e) = intake::admit(&self.state, session, ctx).await {
            respond::error(session, ctx, e).await?;
            return Ok(true);
        }
        let is_mock = ctx.upstream.upstream.as_ref().is_some_and(|u| u.is_mock());
        if ctx.body.is_some() || is_mock {
            match forward::exchange(&self.state, session, ctx).await {
                Err(e) if !ctx.response.cut_short => respond::error(session, ctx, e).await?,
                Err(e) => ctx.error = Some(e),
                Ok(()) => {}
            }
            if ctx.response.cut_short {
                // Pingora would end the body cleanly and reuse the
                // connection; an error makes it drop the connection instead.
                let status = ctx.error.as_ref().map_or(502, GatewayError::status);
                return Err(pingora::Error::explain(
                    ErrorType::HTTPStatus(status),
                    "response cut short",
                ));
            }
            return Ok(true);
        }
        let audit = &self.state.config.file.audit;
        if audit.enabled && audit.capture_body {
            ctx.body_capture = Some(Vec::new());
        }
        // Streaming path: refuse a declared oversize body before connecting.
        let limit = self.state.config.file.server.max_request_body.0;
        let declared = intake::declared_length(session);
        if declared.is_some_and(|n| n > limit) {
            respond::error(session, ctx, GatewayError::BodyTooLarge { limit }).await?;
            return Ok(true);
        }
        // Admitted: the body will be streamed upstream. The upstream is not
        // asked (its `Expect` is removed) so one interim answer is sent.
        if let Err(e) = intake::continue_if_expected(session).await {
            respond::error(session, ctx, e).await?;
            return Ok(true);
        }
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut RequestCtx) -> pingora::Result<Box<HttpPeer>> {
        let (Some(route), Some(upstream)) = (ctx.route.clone(), ctx.upstream.upstream.clone()) else {
            return Err(pingora::Error::explain(ErrorType::InternalError, "no route in context"));
        };
        if ctx.upstream.slot.is_none() {
            match upstream.try_slot() {
                Some(slot) => ctx.upstream.slot = Some(slot),
                None => {
                    self.state.metrics.failovers.with_label_values(&["upstream_busy"]).inc();
                    let err = GatewayError::UpstreamBusy {
                        upstream: upstream.name.clone(),
                        limit: upstream.max_in_flight,
                    };
                    return Err(Self::fail(ctx, err));
                }
            }
        }
        ctx.upstream.attempts += 1;
        let hash_key = ctx.key.as_ref().map(|k| k.id.clone()).unwrap_or_default();
        let Some(target) = upstream.select(hash_key.as_bytes(), &ctx.upstream.tried_addrs) else {
            return Err(Self::fail(ctx, GatewayError::NoEndpoint(upstream.name.clone())));
        };
        if let Some(pool) = &upstream.key_pool {
            match forward::lease_key(&self.state, pool, ctx).await {
                Ok(lease) => ctx.upstream.lease = Some(lease),
                Err(no) => {
                    self.state.metrics.failovers.with_label_values(&["no_usable_key"]).inc();
                    return Err(Self::fail(ctx, forward::no_key_error(&pool.name, no)));
                }
            }
        }
        // Pingora applies one read timeout to the header wait and to body
        // silences alike, so the streaming path honours the stricter of the two.
        let first_byte = route.timeout.unwrap_or(upstream.timeouts.first_byte.0);
        let peer = upstream.peer(&target, first_byte.min(upstream.timeouts.idle.0));
        ctx.upstream.target = Some(target);
        ctx.upstream.trace_attempt();
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let (Some(route), Some(upstream), Some(target)) = (
            ctx.route.clone(),
            ctx.upstream.upstream.clone(),
            ctx.upstream.target.clone(),
        ) else {
            return Err(pingora::Error::explain(
                ErrorType::InternalError,
                "no upstream in context",
            ));
        };
        rewrite::upstream_request(
            req,
            ctx,
            &route,
            &upstream,
            upstream.endpoint(&target),
            ctx.upstream.lease.as_ref(),
        )
        .map_err(|e| Self::fail(ctx, e))
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if let Some(b) = body {
            ctx.body_seen += b.len() as u64;
            if let Some(capture) = &mut ctx.body_capture {
                let room = (self.state.config.file.audit.body_max_bytes.0 as usize).saturating_sub(capture.len());
                capture.extend_from_slice(&b[..b.len().min(room)]);
            }
            let limit = self.state.config.file.server.max_request_body.0;
            if ctx.body_seen > limit {
                return Err(Self::fail(ctx, GatewayError::BodyTooLarge { limit }));
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        // Pingora drops the fixed hop-by-hop list; the headers `Connection`
        // names are ours to drop, as `forward::client_header` does.
        for name in rewrite::connection_named(&resp.headers) {
            resp.remove_header(&name);
        }
        resp.insert_header("x-request-id", ctx.request_id.as_str())?;
        if let Some(lease) = &ctx.upstream.lease {
            let status = resp.status.as_u16();
            lease.observe(status, &resp.headers, ctx.model.as_deref());
            if matches!(status, 401 | 403)
                && session.req_header().method != http::Method::HEAD
                && let Some(upstream) = &ctx.upstream.upstream
            {
                let e = forward::key_rejected(status, upstream);
                let body = e.body(ctx.format);
                for name in [
                    http::header::CONTENT_ENCODING,
                    http::header::TRANSFER_ENCODING,
                    http::header::CONTENT_TYPE,
                ] {
                    resp.remove_header(&name);
                }
                resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
                resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
                ctx.begin_response(resp);
                ctx.response.replacement = Some(body);
                ctx.error = Some(e);
                return Ok(());
            }
        }
        ctx.begin_response(resp);
        ctx.response.upstream_answered = true;
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Option<std::time::Duration>> {
        if ctx.response.replacement.is_some() {
            // Neither sent, metered nor captured: it quotes the pool key.
            *body = if end { ctx.response.replacement.take() } else { None };
            return Ok(None);
        }
        if let Some(b) = body.take() {
            *body = Some(ctx.upstream_chunk(b));
        }
        if end && let Some(rest) = ctx.upstream_end() {
            let mut out = body.take().map(bytes::BytesMut::from).unwrap_or_default();
            out.extend_from_slice(&rest);
            *body = Some(out.freeze());
        }
        Ok(None)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<pingora::Error>,
    ) -> Box<pingora::Error> {
        let why = forward::not_connected(&e);
        if let (retry::NotConnected::Refused, Some(upstream), Some(target)) =
            (why, &ctx.upstream.upstream, &ctx.upstream.target)
        {
            upstream.rest_address(target.addr);
        }
        if let Some(lease) = &ctx.upstream.lease {
            lease.note_failure(e.etype().as_str());
        }
        ctx.upstream.mark_failed(e.etype().as_str());
        // Nothing was sent, so another endpoint/key is safe, but it spends
        // a retry like any attempt: an upstream whose every address refuses
        // is not looped over.
        let verdict = self.judge(ctx, retry::Outcome::NotConnected(why), false);
        e.set_retry(matches!(verdict, retry::Verdict::Retry { .. }));
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<pingora::Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<pingora::Error> {
        let mut e = e.more_context(format!("peer: {peer}"));
        // Never retry because the client hung up or FastGate refused (only
        // the upstream's failures are the policy's), nor replay a body
        // Pingora no longer holds, nor once the client has the headers.
        if e.esource() != &ErrorSource::Upstream
            || session.as_ref().retry_buffer_truncated()
            || session.response_written().is_some()
        {
            e.set_retry(false);
            return e;
        }
        // The request was (possibly) written: the policy decides, the same
        // as for FastGate's own exchange. Pingora marks a dead pooled
        // connection found while waiting for the answer as `ReusedOnly`.
        let outcome = retry::Outcome::AfterWrite {
            reused: client_reused && matches!(e.retry, pingora::RetryType::ReusedOnly),
            timeout: e.etype() == &ErrorType::ReadTimedout,
        };
        let by_method = session.req_header().method.is_idempotent();
        let verdict = self.judge(ctx, outcome, by_method);
        match verdict {
            retry::Verdict::Reconnect => {
                ctx.upstream.reconnected = true;
                e.set_retry(true);
            }
            retry::Verdict::Retry { .. } => {
                ctx.upstream.mark_failed(e.etype().as_str());
                e.set_retry(true);
            }
            _ => e.set_retry(false),
        }
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &pingora::Error, ctx: &mut RequestCtx) -> FailToProxy {
        let err = ctx.error.take().unwrap_or_else(|| match (e.esource(), e.etype()) {
            (_, ErrorType::HTTPStatus(413)) => GatewayError::BodyTooLarge {
                limit: self.state.config.file.server.max_request_body.0,
            },
            (ErrorSource::Downstream, _) => GatewayError::ClientClosed,
            (_, ErrorType::ConnectTimedout | ErrorType::ReadTimedout) => GatewayError::UpstreamTimeout {
                upstream: ctx.upstream_name().to_string(),
                after_ms: ctx.started.elapsed().as_millis(),
            },
            _ => GatewayError::UpstreamUnreachable {
                upstream: ctx.upstream_name().to_string(),
                reason: e.etype().as_str().to_string(),
            },
        });
        let code = err.status();
        // A stream that already started ends with a well-formed error event.
        if !matches!(err, GatewayError::ClientClosed)
            && session.response_written().is_some()
            && ctx.response.meter.is_sse()
        {
            let event = err.sse_event(ctx.format);
            if session.write_response_body(Some(event), true).await.is_ok() {
                ctx.error = Some(err);
                return FailToProxy {
                    error_code: code,
                    can_reuse_downstream: false,
                };
            }
        }
        // Nothing can be written to a client that is gone or already got headers.
        if matches!(err, GatewayError::ClientClosed) || session.response_written().is_some() {
            ctx.error = Some(err);
            return FailToProxy {
                error_code: code,
                can_reuse_downstream: false,
            };
        }
        if let Err(write_err) = respond::error(session, ctx, err).await {
            tracing::debug!(request_id = %ctx.request_id, error = %write_err, "Could not send the error response.");
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// What Pingora's own error lines show of a request: never the query,
    /// which may hold a credential (`?key=`).
    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        let req = session.req_header();
        format!(
            "{} {} request_id={}",
            req.method,
            crate::audit::redact_path(&req.uri),
            ctx.request_id
        )
    }

    /// A client hanging up is routine, not an error worth a log line.
    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, _e: &pingora::Error) -> bool {
        matches!(ctx.error, Some(GatewayError::ClientClosed))
    }

    async fn logging(&self, session: &mut Session, e: Option<&pingora::Error>, ctx: &mut RequestCtx) {
        finish::finish(session, ctx, e);
    }
}
