//! The embedded web UI: `admin-ui/dist` (built by Vite, committed, checked
//! by CI to match its sources) served at `/` on the admin port. Every path
//! that is not a file answers with `index.html` (the app routes in the
//! browser); hashed assets are cached for a year, `index.html` never; the
//! pre-compressed `.br`/`.gz` twins are sent to clients that take them; a
//! strict Content-Security-Policy allows nothing but this origin.

use axum::{
    body::{Body, Bytes},
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use std::borrow::Cow;

/// Every built file, with its `.br`/`.gz` twins.
#[derive(rust_embed::Embed)]
#[folder = "admin-ui/dist"]
struct Assets;

/// Scripts, styles, images and API calls from this origin only; no
/// framing, no plugins, no inline code.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
form-action 'self'; frame-ancestors 'none'";

/// The admin router's fallback: UI files, the app for UI paths, and a JSON
/// 404 for unknown API paths.
pub async fn serve(method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path().trim_start_matches('/');
    if path == "api" || path.starts_with("api/") {
        return super::error::ApiError::NotFound(format!("no endpoint {} {}", method, uri.path())).into_response();
    }
    if method != Method::GET && method != Method::HEAD {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let (file, asset) = match Assets::get(path) {
        Some(asset) if !path.is_empty() => (path, asset),
        // A missing file (a stale hashed asset) is a 404, not the app.
        _ if path.rsplit('/').next().is_some_and(|last| last.contains('.')) => {
            return (StatusCode::NOT_FOUND, "not found").into_response();
        }
        _ => match Assets::get("index.html") {
            Some(index) => ("index.html", index),
            None => {
                return (
                    StatusCode::NOT_FOUND,
                    "the web UI is not built into this binary (see docs/admin-ui.md)",
                )
                    .into_response();
            }
        },
    };
    let accepts = |coding: &str| {
        headers
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|c| c.split(';').next().is_some_and(|c| c.trim() == coding))
    };
    let (body, encoding) = match ["br", "gzip"].into_iter().find_map(|coding| {
        let ext = if coding == "br" { "br" } else { "gz" };
        accepts(coding)
            .then(|| Assets::get(&format!("{file}.{ext}")))
            .flatten()
            .map(|c| (c.data, coding))
    }) {
        Some((data, coding)) => (data, Some(coding)),
        None => (asset.data, None),
    };
    let cache = if file.starts_with("assets/") {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    // Embedded files are static: served without a copy.
    let body = match body {
        Cow::Borrowed(b) => Bytes::from_static(b),
        Cow::Owned(v) => Bytes::from(v),
    };
    let mut response = Response::new(Body::from(body));
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(asset.metadata.mimetype()) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    if let Some(coding) = encoding {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(coding));
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}
