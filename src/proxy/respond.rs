//! Writing responses FastGate produces itself (errors, the mock provider)
//! to the client.

use super::{ctx::RequestCtx, errors::GatewayError};
use bytes::Bytes;
use http::header;
use pingora::{http::ResponseHeader, proxy::Session};

/// A response header with FastGate's standard fields. `len: None` means a
/// streamed body (chunked on HTTP/1.1, DATA frames on HTTP/2).
pub fn header(
    status: u16,
    ctx: &RequestCtx,
    content_type: &str,
    len: Option<usize>,
    h2: bool,
) -> pingora::Result<ResponseHeader> {
    let mut resp = ResponseHeader::build(status, Some(5))?;
    resp.insert_header(header::CONTENT_TYPE, content_type)?;
    match len {
        Some(n) => resp.insert_header(header::CONTENT_LENGTH, n.to_string())?,
        None if !h2 => resp.insert_header(header::TRANSFER_ENCODING, "chunked")?,
        None => {}
    }
    if content_type.starts_with("text/event-stream") {
        resp.insert_header(header::CACHE_CONTROL, "no-cache")?;
    }
    resp.insert_header("x-request-id", ctx.request_id.as_str())?;
    Ok(resp)
}

/// Write a complete JSON response.
pub async fn json(session: &mut Session, ctx: &mut RequestCtx, status: u16, body: Bytes) -> pingora::Result<()> {
    let resp = header(status, ctx, "application/json", Some(body.len()), session.is_http2())?;
    ctx.begin_response(&resp);
    ctx.response_chunk(&body);
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// Answer with `err` in the client's error shape. If the request body was not
/// read, the connection is not reused (its unread bytes would poison it).
pub async fn error(session: &mut Session, ctx: &mut RequestCtx, err: GatewayError) -> pingora::Result<()> {
    let status = err.status();
    let body = err.body(ctx.format);
    tracing::debug!(request_id = %ctx.request_id, kind = err.kind(), status, "Answering with an error.");
    if !session.is_body_done() {
        session.set_keepalive(None);
    }
    let mut resp = header(status, ctx, "application/json", Some(body.len()), session.is_http2())?;
    if let Some(secs) = err.retry_after() {
        resp.insert_header(header::RETRY_AFTER, secs.to_string())?;
    }
    ctx.error = Some(err);
    ctx.begin_response(&resp);
    ctx.response_chunk(&body);
    let unread = !session.is_body_done();
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    if unread {
        // Like nginx's lingering close: read (and drop) what the client is
        // still sending for a moment, so it gets to read this answer
        // instead of a reset while writing its body.
        let _ = tokio::time::timeout(LINGER, session.downstream_session.drain_request_body()).await;
    }
    Ok(())
}

/// How long an unread request body is drained after an early error answer.
const LINGER: std::time::Duration = std::time::Duration::from_millis(500);
