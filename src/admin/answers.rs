//! What every admin API answer carries, whoever wrote it: a middleware
//! around the whole router.
//!
//! * `Cache-Control: no-store` on `/api/*`, `/health*` and `/metrics`:
//!   answers hold keys, users and logs that no browser or proxy cache should
//!   keep. (UI files set their own caching in `ui`.)
//! * The documented error shape, `{"error":{"code","message"}}`, for the
//!   rejections axum writes itself as `text/plain` (a body that is not JSON,
//!   a wrong content type, a bad query or path parameter, 405, 413): the
//!   status is kept, the text becomes the message.
//! * A declared body over `admin.max_body` is refused (413) before any
//!   handler runs; a chunked one is cut by `DefaultBodyLimit` when read.

use axum::{
    Json,
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde_json::json;

/// Most bytes of a rejection's text kept as the message.
const MESSAGE_MAX: usize = 1024;

/// Whether `path` is answered by the API rather than the UI.
fn is_api(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/") || path.starts_with("/health") || path == "/metrics"
}

/// The error code for a status axum answered with.
fn code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 422 => "invalid_request",
        401 => "unauthenticated",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "timeout",
        411 => "length_required",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        429 => "too_many_attempts",
        503 => "unavailable",
        500..=599 => "internal",
        _ => "error",
    }
}

/// An error answer in the documented shape.
pub fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code(status), "message": message}})),
    )
        .into_response()
}

/// The middleware; `max_body` is `admin.max_body` in bytes.
pub async fn api_answers(State(max_body): State<u64>, req: Request, next: Next) -> Response {
    let api = is_api(req.uri().path());
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut resp = match declared {
        Some(n) if n > max_body => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body of {n} bytes is over the admin limit of {max_body} bytes"),
        ),
        _ => next.run(req).await,
    };
    if !api {
        return resp;
    }
    let status = resp.status();
    if (status.is_client_error() || status.is_server_error()) && !is_json(&resp) {
        resp = as_json(resp).await;
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn is_json(resp: &Response) -> bool {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// Rewrite a plain-text rejection as a JSON error, keeping its status and
/// headers such as `Allow` and `Retry-After`.
async fn as_json(resp: Response) -> Response {
    let (parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, MESSAGE_MAX * 4).await {
        Ok(b) => String::from_utf8_lossy(&b[..b.len().min(MESSAGE_MAX)])
            .trim()
            .to_string(),
        Err(_) => String::new(),
    };
    let message = if text.is_empty() {
        parts.status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    let mut out = error(parts.status, &message);
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().append(name.clone(), value.clone());
        }
    }
    out
}
