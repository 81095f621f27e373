//! Request rewriting: path transforms, header transforms, credential
//! stripping and upstream key injection (the header side), and the body
//! side (`model_map`, `set_body`).

use super::{ctx::RequestCtx, errors::GatewayError};
use crate::{
    auth,
    config::endpoint::EndpointUrl,
    config::{Provider, routes_d::AuthMode},
    pool::Lease,
    router::{Route, expand_template},
};
use bytes::Bytes;
use http::{HeaderValue, header};
use pingora::http::RequestHeader;

/// The default `anthropic-version` sent when the client did not send one.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Client headers that choose which provider account, organization or
/// project a request is billed to and authorized against. Toward an upstream
/// with a key pool they are dropped unless the route sets
/// `forward_account_headers`: the pool key belongs to the operator's
/// account, and a client naming another one makes the provider answer 401/403,
/// which disables the pool key for everyone. Anthropic documents no such
/// request header (`anthropic-version` and `anthropic-beta` select API
/// behaviour, not an account, and pass).
pub const ACCOUNT_HEADERS: [&str; 3] = ["openai-organization", "openai-project", "x-goog-user-project"];

/// Whether a (lower-case) header name is one of [`ACCOUNT_HEADERS`], with
/// `_` read as `-`.
pub fn is_account_header(name: &str) -> bool {
    ACCOUNT_HEADERS.iter().any(|a| {
        a.len() == name.len()
            && a.bytes()
                .zip(name.bytes())
                .all(|(x, y)| x == y || (x == b'-' && y == b'_'))
    })
}

/// Headers that describe one hop and are never forwarded.
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// The upstream path and query: strip_prefix, rewrite_path, the endpoint's
/// base path; `?key=` removed when it carried the gateway key.
pub fn upstream_path(
    route: &Route,
    endpoint: &EndpointUrl,
    path: &str,
    query: Option<&str>,
    drop_key_param: bool,
) -> String {
    let p = route_path(route, path);
    let mut out = String::with_capacity(endpoint.base_path.len() + p.len() + 16);
    out.push_str(&endpoint.base_path);
    out.push_str(&p);
    if let Some(q) = query {
        let q = forwarded_query(q, drop_key_param);
        if !q.is_empty() {
            out.push('?');
            out.push_str(&q);
        }
    }
    out
}

/// The query as it goes upstream: `key=` dropped when it was the client's
/// credential, and any parameter holding a gateway key dropped always. Kept
/// parameters keep their original encoding.
pub fn forwarded_query(q: &str, drop_key_param: bool) -> std::borrow::Cow<'_, str> {
    if !drop_key_param && !auth::holds_gateway_key(q.as_bytes()) {
        return q.into();
    }
    let kept: Vec<&str> = q
        .split('&')
        .filter(|pair| {
            let Some((name, value)) = form_urlencoded::parse(pair.as_bytes()).next() else {
                return true;
            };
            let credential = drop_key_param && name == "key";
            // The pair as sent and decoded (`+` and `%` escapes); the finder
            // decodes deeper layers itself.
            let gateway_key = auth::holds_gateway_key(pair.as_bytes())
                || auth::holds_gateway_key(name.as_bytes())
                || auth::holds_gateway_key(value.as_bytes());
            !(credential || gateway_key)
        })
        .collect();
    kept.join("&").into()
}

/// Refuse an upstream path that could name a resource outside the route's:
/// a dot segment (`..`, `.`, also spelt `%2e`) or an encoded slash or
/// backslash (`%2F`, `%5C`, which some servers decode before routing). The
/// path comes from the client (directly, or through `strip_prefix` and a
/// `{*rest}` capture) and the pooled key goes with it. No provider API uses
/// either, so the request is refused rather than normalised. A path holding
/// a gateway key is refused too.
pub fn safe_path(path_and_query: &str) -> Result<(), GatewayError> {
    let path = path_and_query.split(['?', '#']).next().unwrap_or_default();
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || path.contains('\\') {
        return Err(GatewayError::UnsafePath(
            "the path holds an encoded '/' or '\\', which no upstream API uses".into(),
        ));
    }
    let dot_segment = path.split('/').any(|seg| {
        let seg = seg.to_ascii_lowercase().replace("%2e", ".");
        seg == "." || seg == ".."
    });
    if dot_segment {
        return Err(GatewayError::UnsafePath(
            "the path holds a '.' or '..' segment, which no upstream API uses".into(),
        ));
    }
    // A gateway key never goes upstream, in the path either (the query's
    // parameters holding one are dropped, not refused: see `forwarded_query`).
    if auth::holds_gateway_key(path.as_bytes()) {
        return Err(GatewayError::UnsafePath("the path holds a gateway key".into()));
    }
    Ok(())
}

/// The headers a `Connection` header names: like the fixed [`HOP_BY_HOP`]
/// list, they describe one hop only. Usually none (no allocation).
pub fn connection_named(headers: &http::HeaderMap) -> Vec<http::HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|text| text.split(','))
        .filter_map(|t| http::HeaderName::from_bytes(t.trim().to_ascii_lowercase().as_bytes()).ok())
        .collect()
}

/// Whether `name` describes one hop, given what `Connection` named.
pub fn is_hop_by_hop(name: &http::HeaderName, named: &[http::HeaderName]) -> bool {
    HOP_BY_HOP.contains(&name.as_str()) || named.contains(name)
}

/// The path after the route's `strip_prefix` and `rewrite_path`, before the
/// endpoint's base path.
pub fn route_path<'a>(route: &Route, path: &'a str) -> std::borrow::Cow<'a, str> {
    use std::borrow::Cow;
    let mut p = Cow::Borrowed(path);
    if let Some(prefix) = &route.transform.strip_prefix
        && let Some(rest) = path.strip_prefix(prefix.as_str())
        && (rest.is_empty() || rest.starts_with('/'))
    {
        p = if rest.is_empty() {
            Cow::Borrowed("/")
        } else {
            Cow::Borrowed(rest)
        };
    }
    if let Some(template) = &route.transform.rewrite_path {
        p = Cow::Owned(expand_template(template, &route.path_params(path)));
    }
    p
}

/// Whether a request on this route is an OpenAI (chat) completion whose
/// stream FastGate asks for usage.
pub fn wants_openai_usage(route: &Route, method: &http::Method, path: &str) -> bool {
    route.openai_usage && method == http::Method::POST && route_path(route, path).ends_with("/completions")
}

/// Whether and how a request body must be changed to ask for usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageAsk {
    /// Not a stream, already asking, or not for FastGate to judge.
    No,
    /// A stream without `stream_options`: splice the field in.
    Splice,
    /// `stream_options` (an object or `null`) without `include_usage:
    /// true`: set it.
    Merge,
}

impl UsageAsk {
    /// Decide from a body's `stream` and `stream_options` values.
    pub fn of(stream: Option<&serde_json::Value>, stream_options: Option<&serde_json::Value>) -> Self {
        use serde_json::Value;
        if stream != Some(&Value::Bool(true)) {
            return UsageAsk::No;
        }
        match stream_options {
            None => UsageAsk::Splice,
            Some(Value::Object(o)) if o.get("include_usage") == Some(&Value::Bool(true)) => UsageAsk::No,
            Some(Value::Object(_) | Value::Null) => UsageAsk::Merge,
            Some(_) => UsageAsk::No, // the upstream answers that
        }
    }
}

/// For a streamed OpenAI completion that does not ask for usage, the body
/// with `stream_options.include_usage: true` (so the stream can be metered).
pub fn ask_for_usage(body: &[u8], ask: UsageAsk) -> Result<Option<Bytes>, GatewayError> {
    match ask {
        UsageAsk::No => Ok(None),
        UsageAsk::Splice => {
            // Insert the field after the opening brace: no re-encoding.
            let Some(open) = body.iter().position(|&b| b == b'{') else {
                return Ok(None);
            };
            let mut out = Vec::with_capacity(body.len() + 40);
            out.extend_from_slice(&body[..=open]);
            out.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
            out.extend_from_slice(&body[open + 1..]);
            Ok(Some(Bytes::from(out)))
        }
        UsageAsk::Merge => {
            let mut v: serde_json::Value =
                serde_json::from_slice(body).map_err(|e| GatewayError::BadJson(e.to_string()))?;
            v["stream_options"]["include_usage"] = serde_json::Value::Bool(true);
            serde_json::to_vec(&v)
                .map(|v| Some(Bytes::from(v)))
                .map_err(|e| GatewayError::BadJson(e.to_string()))
        }
    }
}

/// Rewrite a copy of the client's request header into the upstream request.
pub fn upstream_request(
    req: &mut RequestHeader,
    ctx: &RequestCtx,
    route: &Route,
    upstream: &crate::upstream::Upstream,
    endpoint: &EndpointUrl,
    lease: Option<&Lease>,
) -> Result<(), GatewayError> {
    let provider = upstream.provider;
    // Client credentials never travel upstream when FastGate authenticates or
    // injects its own key. On other routes a client's own credential passes
    // (bring your own key), but a gateway key (`fg_…`) never does, anywhere.
    let strip = route.auth == AuthMode::Required || lease.is_some() || ctx.key.is_some();
    // Where FastGate authenticates or injects its own key, a client's `?key=`
    // is never forwarded, whichever way the client authenticated: Google
    // reads a `key` parameter as the credential, beside the pool's header.
    let drop_key_param = strip;
    let path = upstream_path(route, endpoint, req.uri.path(), req.uri.query(), drop_key_param);
    safe_path(&path)?;
    let uri = path
        .parse::<http::Uri>()
        .map_err(|e| GatewayError::BadRequestBody(format!("rewritten path is invalid: {e}")))?;
    req.set_uri(uri);
    // Upstreams are spoken to in HTTP/1.1 whatever the client used (an
    // HTTP/2 request header would otherwise be written as `HTTP/2.0`).
    req.set_version(http::Version::HTTP_11);

    for name in connection_named(&req.headers) {
        req.remove_header(&name);
    }
    for name in HOP_BY_HOP {
        req.remove_header(name);
    }
    // FastGate answers `Expect: 100-continue` itself before reading or
    // streaming the body; the upstream gets the body without waiting.
    req.remove_header(&header::EXPECT);
    if strip {
        req.remove_header(&header::AUTHORIZATION);
        req.remove_header("x-api-key");
        req.remove_header("x-goog-api-key");
    }
    let leaking: Vec<http::HeaderName> = req
        .headers
        .iter()
        .filter(|(n, v)| auth::header_holds_gateway_key(n.as_str().as_bytes(), v.as_bytes()))
        .map(|(n, _)| n.clone())
        .collect();
    for name in leaking {
        req.remove_header(&name);
    }
    if upstream.key_pool.is_some() && !route.forward_account_headers {
        // Every spelling a server may read as one of them: stacks that map
        // headers the CGI way read `OpenAI_Organization` as the same name.
        let account: Vec<http::HeaderName> = req
            .headers
            .keys()
            .filter(|n| is_account_header(n.as_str()))
            .cloned()
            .collect();
        for name in account {
            req.remove_header(&name);
        }
    }
    for name in &route.transform.remove_headers {
        req.remove_header(name);
    }
    for (name, value) in &route.transform.set_headers {
        let _ = req.insert_header(name.clone(), value.clone());
    }
    forwarded_headers(req, ctx, upstream.forwarded_headers);
    let _ = req.insert_header(header::HOST, endpoint.authority.as_str());
    let _ = req.insert_header("x-request-id", ctx.request_id.as_str());
    // Traced: the upstream continues this trace under the attempt's span
    // (whatever the client sent); untraced, the client's headers pass.
    if let Some(trace) = &ctx.upstream.trace {
        let _ = req.insert_header("traceparent", trace.traceparent());
        match &trace.tracestate {
            Some(state) => {
                let _ = req.insert_header("tracestate", state.as_str());
            }
            None => {
                req.remove_header("tracestate");
            }
        }
    }
    if ctx.response.strip_usage_chunk {
        // The usage chunk is removed from a plain stream only.
        let _ = req.insert_header(header::ACCEPT_ENCODING, "identity");
    }
    if let Some(lease) = lease {
        inject_key(req, provider, lease.key().secret.expose());
    }
    Ok(())
}

/// Headers that name the client or the hops before FastGate.
const FORWARDING: [&str; 5] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "forwarded",
];

/// Toward an upstream that asked for them (`forwarded_headers: true`),
/// `X-Forwarded-For` (what trusted proxies said, then the peer) and
/// `X-Forwarded-Proto`; toward any other, no forwarding header at all, not
/// even one the client sent: providers need no client addresses.
fn forwarded_headers(req: &mut RequestHeader, ctx: &RequestCtx, forward: bool) {
    // What trusted proxies forwarded is read before every such header goes.
    let chain = match ctx.client.peer {
        Some(peer) if forward => {
            let mut hops: Vec<String> = Vec::new();
            if ctx.client.peer_trusted {
                hops.extend(
                    req.headers
                        .get_all("x-forwarded-for")
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .map(str::to_string),
                );
            }
            hops.push(peer.to_string());
            Some(hops.join(", "))
        }
        _ => None,
    };
    for name in FORWARDING {
        req.remove_header(name);
    }
    if let Some(chain) = chain {
        let _ = req.insert_header("x-forwarded-for", chain);
        let _ = req.insert_header("x-forwarded-proto", if ctx.client.https { "https" } else { "http" });
    }
}

/// Put an upstream key where `provider` expects it.
pub fn inject_key(req: &mut RequestHeader, provider: Provider, secret: &str) {
    let Ok(mut value) = HeaderValue::from_str(secret) else {
        return;
    };
    value.set_sensitive(true);
    match provider {
        Provider::Anthropic => {
            let _ = req.insert_header("x-api-key", value);
            if !req.headers.contains_key("anthropic-version") {
                let _ = req.insert_header("anthropic-version", ANTHROPIC_VERSION);
            }
        }
        Provider::Gemini => {
            let _ = req.insert_header("x-goog-api-key", value);
        }
        Provider::Openai | Provider::OpenaiCompatible | Provider::Http | Provider::Mock => {
            if let Ok(mut bearer) = HeaderValue::from_str(&format!("Bearer {secret}")) {
                bearer.set_sensitive(true);
                let _ = req.insert_header(header::AUTHORIZATION, bearer);
            }
        }
    }
}

/// Fix framing for a body FastGate sends itself: headers go out before the
/// body, so the length must be right up front.
pub fn set_body_length(req: &mut RequestHeader, len: usize) {
    req.remove_header(&header::TRANSFER_ENCODING);
    let _ = req.insert_header(header::CONTENT_LENGTH, len.to_string());
}

/// Apply `model_map` and `set_body` to a JSON body. Returns `None` when
/// nothing changes, so the original bytes are forwarded untouched.
pub fn rewrite_body(route: &Route, body: &Bytes) -> Result<Option<Bytes>, GatewayError> {
    // A bodiless request (a GET) has nothing to rewrite.
    if (route.model_map.is_empty() && route.transform.set_body.is_none()) || body.is_empty() {
        return Ok(None);
    }
    let mut value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| GatewayError::BadJson(e.to_string()))?;
    let mut changed = false;
    if let Some(model) = value.get("model").and_then(|m| m.as_str())
        && let Some(to) = route.model_map.get(model)
    {
        value["model"] = serde_json::Value::String(to.clone());
        changed = true;
    }
    if let Some(patch) = &route.transform.set_body {
        if !value.is_object() {
            return Err(GatewayError::BadJson("the body must be a JSON object".into()));
        }
        json_patch::merge(&mut value, patch);
        changed = true;
    }
    if !changed {
        return Ok(None);
    }
    serde_json::to_vec(&value)
        .map(|v| Some(Bytes::from(v)))
        .map_err(|e| GatewayError::BadJson(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_headers_are_known_in_every_spelling() {
        for name in [
            "openai-organization",
            "openai_organization",
            "openai-project",
            "x-goog_user_project",
            "x_goog_user_project",
        ] {
            assert!(is_account_header(name), "{name}");
        }
        for name in ["anthropic-beta", "openai-organizationx", "x-goog-api-key", "openai"] {
            assert!(!is_account_header(name), "{name}");
        }
    }

    #[test]
    fn paths_that_leave_the_route_are_refused() {
        for ok in [
            "/v1beta/models/gemini-pro:generateContent?alt=sse",
            "/v1/chat/completions",
            "/a.b/c..d/e.",
            "/v1/files/x?q=../..",
        ] {
            assert!(safe_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "/v1beta/models/x/../../cachedContents",
            "/v1/./chat",
            "/v1/%2e%2E/files",
            "/v1/.%2e/files",
            "/v1beta/models/x%2F..%2Ffiles",
            "/v1/a%5cb",
            "/v1/..",
            "/v1/fg_a1B2a1B2a1B2a1B2a1B2a1B2a1B2a1B2/chat",
            "/v1/FG%5Fa1B2a1B2a1B2a1B2a1B2a1B2a1B2a1B2",
        ] {
            assert_eq!(safe_path(bad).unwrap_err().status(), 400, "{bad}");
        }
    }
}
