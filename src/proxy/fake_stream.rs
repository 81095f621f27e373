//! `fake_stream` routes: a client that asks to stream gets its stream
//! header and a keepalive at once, keepalives while the upstream thinks
//! (asked without streaming), then the upstream's whole answer as a
//! well-formed stream of the client's format. Clients with short
//! first-byte timeouts stay connected behind slow reasoning models.
//!
//! Retries and failover work as before: until the answer is written the
//! client has seen only keepalives, so another attempt is still possible.
//! An error once the header is out reaches the client as its format's
//! error event (`Converter::emit`).

use super::{
    convert::{self, Plan},
    ctx::RequestCtx,
    errors::GatewayError,
};
use crate::convert::{
    errors,
    stream::{Converter, Delta, whole},
};
use bytes::Bytes;
use http::header;
use pingora::{protocols::http::client::HttpSession, proxy::Session, upstreams::peer::HttpPeer};
use serde_json::Value;
use std::{future::Future, time::Duration};

/// One fake stream: the client's encoder and its keepalive.
pub struct FakeStream {
    conv: Converter,
    keepalive: &'static [u8],
    every: Duration,
}

impl FakeStream {
    /// Send the client's stream header and a first keepalive, before the
    /// upstream is asked. `Err` when the client is gone.
    pub async fn start(
        session: &mut Session,
        ctx: &mut RequestCtx,
        plan: &Plan,
        every: Duration,
    ) -> Result<FakeStream, GatewayError> {
        let h2 = session.is_http2();
        let mut resp = super::respond::header(200, ctx, plan.stream_content_type(), None, h2)
            .map_err(|e| GatewayError::BadRequestBody(e.to_string()))?;
        if let Some(w) = plan.loss.header_value() {
            let _ = resp.insert_header("x-fastgate-warning", w.as_str());
        }
        ctx.begin_response(&resp);
        if session.write_response_header(Box::new(resp), false).await.is_err() {
            ctx.response.cut_short = true;
            return Err(GatewayError::ClientClosed);
        }
        let mut fake = FakeStream {
            conv: plan.converter(),
            keepalive: plan.keepalive(),
            every,
        };
        fake.ping(session, ctx).await?;
        tracing::debug!(request_id = %ctx.request_id, "Fake stream started; the upstream is asked for a whole answer.");
        Ok(fake)
    }

    async fn ping(&mut self, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), GatewayError> {
        match convert::send(session, ctx, self.keepalive.to_vec()).await {
            true => Ok(()),
            false => Err(GatewayError::ClientClosed),
        }
    }

    /// Run `work` (an upstream attempt, a body read), sending keepalives
    /// every interval meanwhile. `Err(ClientClosed)` when the client hangs
    /// up (then `work` is dropped, cancelling the upstream request).
    pub async fn wait<F: Future>(
        &mut self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        work: F,
    ) -> Result<F::Output, GatewayError> {
        let mut work = std::pin::pin!(work);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + self.every, self.every);
        loop {
            tokio::select! {
                out = &mut work => return Ok(out),
                _ = tick.tick() => self.ping(session, ctx).await?,
                _ = session.downstream_session.read_body_or_idle(true) => {
                    ctx.response.cut_short = true;
                    return Err(GatewayError::ClientClosed);
                }
            }
        }
    }

    /// The upstream answered: its whole answer (read with keepalives) as
    /// the client's stream, or its error answer as the client's error event.
    pub async fn respond(
        &mut self,
        state: &crate::state::AppState,
        session: &mut Session,
        ctx: &mut RequestCtx,
        (mut up, peer): (HttpSession, &HttpPeer),
        (plan, idle): (&Plan, Duration),
        read_already: Option<Bytes>,
    ) -> Result<(), GatewayError> {
        let Some(head) = up.response_header().cloned() else {
            return Err(GatewayError::UpstreamUnreachable {
                upstream: ctx.upstream_name().to_string(),
                reason: "no response header".into(),
            });
        };
        let status = head.status.as_u16();
        let mut body = read_already.unwrap_or_default().to_vec();
        let cap = if status >= 400 {
            convert::MAX_ERROR
        } else {
            convert::MAX_ANSWER
        };
        let rest = self.wait(session, ctx, convert::read_all(&mut up, cap, idle)).await?;
        let encoding = convert::content_encoding(&head.headers);
        if status >= 400 {
            body.extend(rest.unwrap_or_default());
            let body = crate::usage::PlainBody::whole(encoding, &body, convert::MAX_ERROR * 4).into_owned();
            self.upstream_error(session, ctx, plan, status, &head.headers, &body)
                .await;
            return Ok(());
        }
        let rest = match rest {
            Ok(r) => r,
            Err(reason) => {
                let upstream = ctx.upstream_name().to_string();
                self.fail(session, ctx, GatewayError::UpstreamUnreachable { upstream, reason })
                    .await;
                return Ok(());
            }
        };
        body.extend(rest);
        let body = crate::usage::PlainBody::whole(encoding, &body, convert::MAX_ANSWER);
        let upstream_type = head
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // Metered as any whole answer: the upstream's own usage.
        ctx.meter_upstream(upstream_type.as_deref());
        ctx.response.meter.feed(&body);
        let answer = serde_json::from_slice::<Value>(&body)
            .map_err(|e| crate::convert::ConvertError::Invalid(e.to_string()))
            .and_then(|v| plan.decode_chat(&v));
        let resp = match answer {
            Ok(r) => r,
            Err(e) => {
                let upstream = ctx.upstream_name().to_string();
                let reason = format!("its answer could not be converted: {e}");
                self.fail(session, ctx, GatewayError::UpstreamUnreachable { upstream, reason })
                    .await;
                return Ok(());
            }
        };
        let out = self.conv.emit(whole::deltas(&resp));
        convert::release(state, up, peer).await;
        if convert::send(session, ctx, out).await {
            let _ = session.write_response_body(None, true).await;
        }
        Ok(())
    }

    /// An upstream error answer after the header: the client's error event
    /// (the same table as a converted error answer), the upstream's status
    /// and message in the audit row.
    async fn upstream_error(
        &mut self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        plan: &Plan,
        status: u16,
        headers: &http::HeaderMap,
        body: &[u8],
    ) {
        let error = errors::decode(plan.upstream, status, body);
        let retry_after = headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        tracing::info!(request_id = %ctx.request_id, status, "The upstream answered a fake stream with an error.");
        ctx.upstream.mark_failed(&status.to_string());
        let message = format!("the upstream answered {status}: {}", error.message);
        self.end(session, ctx, error).await;
        ctx.error = Some(GatewayError::Upstream {
            status,
            message,
            retry_after,
        });
    }

    /// End the stream with the client's error event for `err` (nothing is
    /// written to a client that is gone).
    pub async fn fail(&mut self, session: &mut Session, ctx: &mut RequestCtx, err: GatewayError) {
        if !matches!(err, GatewayError::ClientClosed) {
            tracing::info!(request_id = %ctx.request_id, error = %err, "A fake stream ends with an error event.");
            // Classed by its status alone: the message is FastGate's.
            let mut error = errors::decode(crate::config::routes_d::Format::Openai, err.status(), b"");
            error.message = err.to_string();
            self.end(session, ctx, error).await;
        }
        ctx.error = Some(err);
    }

    async fn end(&mut self, session: &mut Session, ctx: &mut RequestCtx, error: errors::UpstreamError) {
        let out = self.conv.emit([Delta::Error(error)]);
        if convert::send(session, ctx, out).await {
            let _ = session.write_response_body(None, true).await;
        }
    }
}
