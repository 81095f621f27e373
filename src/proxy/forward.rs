//! The upstream exchange for requests whose body FastGate has read.
//!
//! Pingora replays a body consumed in `request_filter` only from its 64 KiB
//! retry buffer (cloudflare/pingora#575), so bodies FastGate reads are sent by
//! this module instead: pooled connection from pingora-core's connector,
//! request written with a correct `content-length`, response streamed to the
//! client chunk by chunk. Having the body in hand also makes retries on
//! another key, endpoint or fallback upstream possible before the first byte.

use super::{ctx::RequestCtx, errors::GatewayError, mock, rewrite};
use crate::{state::AppState, upstream::Upstream};
use bytes::Bytes;
use http::header;
use pingora::{
    ErrorType,
    http::ResponseHeader,
    protocols::http::client::HttpSession,
    proxy::Session,
    upstreams::peer::{HttpPeer, Peer},
};
use std::{sync::Arc, time::Duration};

/// How one attempt ended before anything reached the client.
enum Attempt {
    /// Response headers arrived; the session is ready to stream the body.
    Answered(Box<HttpSession>),
    Failed(GatewayError),
}

/// How long an attempt runs before FastGate starts watching for the
/// client's hang-up (well inside the 100 ms in which it must notice).
const WATCH_CLIENT_AFTER: Duration = Duration::from_millis(20);

fn is_retryable_status(status: u16) -> bool {
    status == 429 || status >= 500
}

/// Send the buffered request, retrying and failing over before the first
/// byte, then stream the answer. Returns the error to answer with if no
/// attempt produced a response.
pub async fn exchange(state: &Arc<AppState>, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), GatewayError> {
    let Some(route) = ctx.route.clone() else {
        return Err(GatewayError::NoRoute {
            method: String::new(),
            path: String::new(),
        });
    };
    let body = ctx.body.clone().unwrap_or_default();
    let hash_key = ctx.key.as_ref().map(|k| k.id.clone()).unwrap_or_default();
    let mut last_error = None;
    let chain: Vec<Arc<Upstream>> = route
        .upstreams
        .iter()
        .filter_map(|name| state.upstreams.get(name).cloned())
        .collect();
    for (position, upstream) in chain.iter().enumerate() {
        ctx.upstream.upstream = Some(upstream.clone());
        if let Some(mock_cfg) = &upstream.mock {
            ctx.upstream.attempts += 1;
            if let Err(e) = mock::respond(session, ctx, mock_cfg).await {
                // Writing failed: the client is gone.
                tracing::debug!(request_id = %ctx.request_id, error = %e, "Client went away during the mock answer.");
                ctx.response.cut_short = true;
                return Err(GatewayError::ClientClosed);
            }
            return Ok(());
        }
        let first_byte = route.timeout.unwrap_or(upstream.timeouts.first_byte.0);
        for attempt in 0..=route.retries {
            let last_try = position + 1 == chain.len() && attempt == route.retries;
            ctx.upstream.attempts += 1;
            let Some(target) = upstream.select(hash_key.as_bytes(), &ctx.upstream.tried_addrs) else {
                last_error = Some(GatewayError::NoEndpoint(upstream.name.clone()));
                break;
            };
            let lease = match &upstream.key_pool {
                Some(pool) => match pool.lease(&ctx.upstream.tried_keys) {
                    Some(l) => Some(l),
                    None => {
                        last_error = Some(GatewayError::NoUpstreamKey(pool.name.clone()));
                        break;
                    }
                },
                None => None,
            };
            let mut req = session.req_header().clone();
            rewrite::upstream_request(
                &mut req,
                ctx,
                &route,
                upstream.provider,
                upstream.endpoint(&target),
                lease.as_ref(),
            )?;
            rewrite::set_body_length(&mut req, body.len());
            let peer = upstream.peer(&target, first_byte);
            ctx.upstream.target = Some(target);
            ctx.upstream.lease = lease;
            // The client may give up while the upstream connects or thinks:
            // then the exchange is dropped (closing the upstream connection,
            // so generation and billing stop) and the key lease released.
            // Watching starts after a moment, so quick answers never pay
            // the extra read on the client's socket.
            let client_gone = async {
                tokio::time::sleep(WATCH_CLIENT_AFTER).await;
                session.downstream_session.read_body_or_idle(true).await
            };
            let attempt = tokio::select! {
                a = send(state, &peer, req, body.clone(), first_byte, &upstream.name) => a,
                _ = client_gone => {
                    tracing::debug!(request_id = %ctx.request_id, "Client disconnected before the answer; cancelling the upstream request.");
                    ctx.upstream.lease = None;
                    ctx.response.cut_short = true;
                    return Err(GatewayError::ClientClosed);
                }
            };
            match attempt {
                Attempt::Answered(up) => {
                    let status = up.response_header().map_or(502, |h| h.status.as_u16());
                    if is_retryable_status(status) && !last_try {
                        tracing::info!(request_id = %ctx.request_id, upstream = %upstream.name, status, attempt = ctx.upstream.attempts, "Upstream answered with a retryable status; trying again.");
                        last_error = Some(GatewayError::UpstreamStatus {
                            upstream: upstream.name.clone(),
                            status,
                        });
                        ctx.upstream.mark_failed();
                        continue;
                    }
                    stream_response(state, session, ctx, *up, &peer).await;
                    return Ok(());
                }
                Attempt::Failed(e) => {
                    tracing::warn!(request_id = %ctx.request_id, upstream = %upstream.name, error = %e, attempt = ctx.upstream.attempts, "Upstream attempt failed.");
                    last_error = Some(e);
                    ctx.upstream.mark_failed();
                }
            }
        }
    }
    Err(last_error.unwrap_or_else(|| GatewayError::NoEndpoint(route.upstreams[0].clone())))
}

/// One attempt: connect (pooled), write request and body, wait for headers.
/// A reused pooled connection that turns out dead is retried once on a fresh
/// one, since the server may have closed it while idle.
async fn send(
    state: &AppState,
    peer: &HttpPeer,
    req: pingora::http::RequestHeader,
    body: Bytes,
    first_byte: Duration,
    upstream: &str,
) -> Attempt {
    let mut fresh_only = false;
    loop {
        let (mut s, reused) = match state.connector.get_http_session(peer).await {
            Ok(pair) => pair,
            Err(e) => return Attempt::Failed(connect_error(&e, upstream)),
        };
        if fresh_only && reused {
            // Drain stale pooled connections rather than loop on them.
            drop(s);
            continue;
        }
        let result: pingora::Result<()> = async {
            s.write_request_header(Box::new(req.clone())).await?;
            s.write_request_body(body.clone(), true).await?;
            s.finish_request_body().await?;
            Ok(())
        }
        .await;
        let result = match result {
            Ok(()) => match tokio::time::timeout(first_byte, s.read_response_header()).await {
                Ok(r) => r,
                Err(_) => {
                    return Attempt::Failed(GatewayError::UpstreamTimeout {
                        upstream: upstream.into(),
                        after_ms: first_byte.as_millis(),
                    });
                }
            },
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => return Attempt::Answered(Box::new(s)),
            Err(_) if reused && !fresh_only => fresh_only = true,
            Err(e) => return Attempt::Failed(connect_error(&e, upstream)),
        }
    }
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
    // A streamed answer can stay silent for long: watch the client meanwhile,
    // so a hang-up cancels generation. A sized body arrives at once and needs
    // no watcher (saving a syscall per read).
    let watch_client = !upstream_header.headers.contains_key(header::CONTENT_LENGTH);
    loop {
        let chunk = if watch_client {
            tokio::select! {
                chunk = up.read_response_body() => chunk,
                _ = session.downstream_session.read_body_or_idle(true) => {
                    tracing::debug!(request_id = %ctx.request_id, "Client disconnected; cancelling the upstream request.");
                    ctx.error = Some(GatewayError::ClientClosed);
                    ctx.response.cut_short = true;
                    return;
                }
            }
        } else {
            up.read_response_body().await
        };
        match chunk {
            Ok(Some(data)) => {
                let data = ctx.upstream_chunk(data);
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
