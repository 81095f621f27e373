//! Admission of a request, in order: request id, route candidates,
//! authentication, body (only when needed), model, final route, body rewrite.
//! Everything here runs before any upstream is contacted.

use super::{ctx::RequestCtx, errors::GatewayError, rewrite};
use crate::clock::now_unix;
use crate::{
    auth::{self, AuthError},
    cluster::limits::Denied,
    config::routes_d::{AuthMode, Format},
    ratelimit::{Admission, BudgetCheck, BudgetOf, Counted, Limited, QuotaCheck, RateChecks, WindowCheck},
    router::Route,
    state::AppState,
};
use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use serde::Deserialize;
use std::{borrow::Cow, sync::Arc, time::Duration};

/// Who the client is: the peer, or behind trusted proxies the address
/// they forwarded (`X-Forwarded-For`; a PROXY header already replaced the
/// peer).
pub fn client(state: &AppState, session: &Session) -> super::ctx::ClientCtx {
    let https = session.digest().is_some_and(|d| d.ssl_digest.is_some());
    let Some(peer) = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_canonical())
    else {
        return super::ctx::ClientCtx {
            https,
            ..Default::default()
        };
    };
    let (ip, peer_trusted) = state.trusted_proxies.resolve(peer, &session.req_header().headers);
    super::ctx::ClientCtx {
        ip: Some(ip),
        peer: Some(peer),
        peer_trusted,
        https,
    }
}

/// The client's `x-request-id` if it is sane, else a fresh UUIDv7.
pub fn request_id(session: &Session) -> String {
    session
        .req_header()
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string())
}

/// The fields FastGate reads from a JSON body; the rest is skipped unparsed.
#[derive(Deserialize)]
struct BodyPeek<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<serde_json::Value>,
    /// `Some(Null)` for an explicit `null`: it must be replaced, not
    /// spliced beside (a second `stream_options` key, of which providers
    /// read the last: the client's `null`, and no usage).
    #[serde(default, deserialize_with = "present")]
    stream_options: Option<serde_json::Value>,
}

/// A field that is present, `null` included (plain `Option` reads `null` as
/// absent).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// What one parse of a request body told: its model (or the Gemini URL's)
/// and whether it must be changed to ask for usage.
#[derive(Debug, Clone)]
struct Peeked {
    model: Option<String>,
    usage: rewrite::UsageAsk,
}

/// A body is parsed at most once: the result (or why it is not JSON) is kept.
#[derive(Default)]
struct Peek(Option<Result<Peeked, String>>);

impl Peek {
    fn get(&mut self, body: &[u8], path: &str, format: Format) -> Result<&Peeked, GatewayError> {
        self.0
            .get_or_insert_with(|| peek(body, path, format))
            .as_ref()
            .map_err(|e| GatewayError::BadJson(e.clone()))
    }
}

/// The model a Gemini URL names: `/v1beta/models/{model}:generateContent`.
pub fn model_from_gemini_path(path: &str) -> Option<&str> {
    let rest = &path[path.find("/models/")? + "/models/".len()..];
    let model = rest.split([':', '/']).next()?;
    (!model.is_empty()).then_some(model)
}

/// The request's `Content-Length`, if it sent a valid one.
pub fn declared_length(session: &Session) -> Option<u64> {
    session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Answer `Expect: 100-continue` (RFC 9110 §10.1.1) once FastGate has
/// decided to read the body: the client sends it only after this, or after
/// waiting (curl: 1 s). A request refused before its body is read gets its
/// final status instead. Pingora itself never sends the interim answer.
pub async fn continue_if_expected(session: &mut Session) -> Result<(), GatewayError> {
    let req = session.req_header();
    let expects = req.version == http::Version::HTTP_11
        && req
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects && !session.is_http2() && !session.is_body_done() {
        session
            .downstream_session
            .write_continue_response()
            .await
            .map_err(|e| GatewayError::BadRequestBody(e.to_string()))?;
    }
    Ok(())
}

/// Read the whole request body, refusing more than `limit` bytes.
/// `idle` bounds the wait for each next piece of the body (nginx's
/// `client_body_timeout`): on HTTP/2 nothing else would end a stream whose
/// body stalls, and a stalled body holds the request's memory.
pub async fn read_body(session: &mut Session, limit: u64, idle: Duration) -> Result<Bytes, GatewayError> {
    let declared = declared_length(session);
    if declared.is_some_and(|n| n > limit) {
        return Err(GatewayError::BodyTooLarge { limit });
    }
    continue_if_expected(session).await?;
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0) as usize);
    while let Some(chunk) = tokio::time::timeout(idle, session.read_request_body())
        .await
        .map_err(|_| GatewayError::BodyTimeout { secs: idle.as_secs() })?
        .map_err(|e| GatewayError::BadRequestBody(e.to_string()))?
    {
        if (buf.len() + chunk.len()) as u64 > limit {
            return Err(GatewayError::BodyTooLarge { limit });
        }
        if buf.is_empty() && session.is_body_done() {
            return Ok(chunk); // the usual case: one read, no copy
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Decide the route, authenticate, read and rewrite the body if needed.
/// On success `ctx` holds the route, key, upstream and (maybe) the body.
pub async fn admit(state: &Arc<AppState>, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), GatewayError> {
    let table = state.routes.load_full();
    let req = session.req_header();
    let path = req.uri.path().to_string();
    let host = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.host())
        .map(|h| {
            h.rsplit_once(':')
                .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
                .map_or(h, |(h, _)| h)
        });
    let candidates = table.candidates(&req.method, host, &path, &req.headers);
    let Some(first) = candidates.first() else {
        return Err(GatewayError::NoRoute {
            method: req.method.to_string(),
            path,
        });
    };
    if first.format != Format::Passthrough {
        ctx.format = first.format;
    }
    // The route the request is headed for, until the model decides (logs, audit).
    ctx.route = Some((*first).clone());

    // Authenticate before reading any body, so anonymous clients cannot make
    // FastGate buffer megabytes.
    let credential = auth::extract_credential(&req.headers, req.uri.query());
    ctx.credential = credential.as_ref().map(|(src, _)| *src);
    let authenticated = credential.map(|(_, secret)| state.keys.authenticate(&secret, now_unix()));
    let all_need_auth = candidates.iter().all(|r| r.auth == AuthMode::Required);
    if all_need_auth {
        match &authenticated {
            None => return Err(AuthError::Missing.into()),
            Some(Err(e)) => return Err(e.clone().into()),
            Some(Ok(_)) => {}
        }
    }

    let needs_model = candidates.iter().any(|r| r.model.is_some());
    let limit = state.config.file.server.max_request_body.0;
    let body_idle = state.config.file.server.limits.client_body_timeout.0;
    let mut body = None;
    let mut peeked = Peek::default();
    let mut model: Option<String> = None;
    if needs_model || first.buffers_body {
        let bytes = read_body(session, limit, body_idle).await?;
        if needs_model {
            model = peeked.get(&bytes, &path, ctx.format)?.model.clone();
        }
        body = Some(bytes);
    }
    let route: Arc<Route> = if needs_model {
        let Some(picked) = table.pick(&candidates, model.as_deref()) else {
            ctx.route = None;
            return Err(GatewayError::NoRoute {
                method: session.req_header().method.to_string(),
                path: format!("{path} (model {})", model.as_deref().unwrap_or("none")),
            });
        };
        picked.clone()
    } else {
        (*first).clone()
    };
    if route.format != Format::Passthrough {
        ctx.format = route.format;
    }

    if route.auth == AuthMode::Required {
        let key = match authenticated {
            None => return Err(AuthError::Missing.into()),
            Some(result) => result?,
        };
        auth::authorize_route(&key, &route.name, &route.permissions)?;
        if !key.allowed_models.is_empty() {
            if body.is_none() {
                body = Some(read_body(session, limit, body_idle).await?);
            }
            let b = body.as_deref().unwrap_or_default();
            model = peeked.get(b, &path, ctx.format)?.model.clone();
            auth::authorize_model(&key, model.as_deref())?;
        }
        ctx.key = Some(key);
    }
    let mut checks = rate_checks(ctx.key.as_deref(), &route, ctx.client.ip);
    // A shared token reservation is sized from the body, and so is a budget's.
    if (state.cluster.is_some() && checks.counts_tokens() || !checks.budgets.is_empty()) && body.is_none() {
        body = Some(read_body(session, limit, body_idle).await?);
    }
    // Read once for both (and only for them): the tokens a shared limit
    // reserves, the cost a budget does.
    let asked = if !checks.is_empty() && (state.cluster.is_some() || !checks.budgets.is_empty()) {
        crate::cluster::limits::asked(body.as_deref())
    } else {
        crate::cluster::limits::Asked::default()
    };
    if !checks.budgets.is_empty() {
        checks.cost_reserve = cost_reserve(
            state,
            &route,
            (session, &path),
            model.as_deref(),
            (body.as_deref(), &asked),
        );
    }
    if !checks.is_empty() {
        admit_rate(state, ctx, &route, checks, &asked).await?;
    }

    let wants_usage = rewrite::wants_openai_usage(&route, &session.req_header().method, &path);
    if (route.buffers_body || wants_usage) && body.is_none() {
        body = Some(read_body(session, limit, body_idle).await?);
    }
    if let Some(b) = body.clone() {
        // A body FastGate reads anyway names its model for the audit log and
        // metrics; only rewrites need it to be JSON.
        let rewrites = !route.model_map.is_empty() || route.transform.set_body.is_some();
        let usage = match peeked.get(&b, &path, ctx.format) {
            Ok(p) => {
                model = model.or_else(|| p.model.clone());
                p.usage
            }
            Err(e) if rewrites => return Err(e),
            Err(_) => rewrite::UsageAsk::No,
        };
        let usage = match rewrite::rewrite_body(&route, &b)? {
            Some(new) => {
                // The rewrite may have touched `stream`: judge the new body.
                let usage = Peek::default()
                    .get(&new, &path, ctx.format)
                    .map_or(rewrite::UsageAsk::No, |p| p.usage);
                body = Some(new);
                usage
            }
            None => usage,
        };
        if wants_usage && let Some(new) = rewrite::ask_for_usage(body.as_deref().unwrap_or_default(), usage)? {
            body = Some(new);
            ctx.response.strip_usage_chunk = true;
        }
    }
    // A Gemini URL names its model: known without reading the body (key
    // cooldowns are per model there).
    ctx.model = model.or_else(|| model_from_gemini_path(&path).map(str::to_string));
    ctx.body = body;
    ctx.upstream.upstream = state.runtime.load().upstreams.get(&route.upstreams[0]).cloned();
    ctx.route = Some(route);
    Ok(())
}

/// What a request may cost, in micro-units, as its budgets reserve it:
/// its prompt estimate at the input rate plus the output it allows (or
/// `budgets.default_output_tokens`) at the output rate, priced for the
/// route's first upstream. A model no rule prices reserves nothing (it
/// costs nothing); a body FastGate cannot read reserves each budget's
/// whole amount (an upstream may read it, and bill it).
fn cost_reserve(
    state: &AppState,
    route: &Route,
    (session, path): (&Session, &str),
    model: Option<&str>,
    (body, asked): (Option<&[u8]>, &crate::cluster::limits::Asked),
) -> u64 {
    // No body, no answer to pay for (a model list, a GET).
    if body.is_none_or(<[u8]>::is_empty) {
        return 0;
    }
    let req = session.req_header();
    // A compressed body is not read here, but an upstream may inflate it.
    let encoded = req
        .headers
        .get(http::header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if asked.unreadable || encoded {
        return u64::MAX;
    }
    // A Gemini URL's model is the one served, whatever the body says.
    let model = model
        .or_else(|| model_from_gemini_path(path))
        .or(asked.model.as_deref());
    let runtime = state.runtime.load();
    let Some(upstream) = route.upstreams.first().and_then(|u| runtime.upstreams.get(u)) else {
        return 0;
    };
    let output = asked.output_or(state.config.file.budgets.default_output_tokens);
    let now = crate::clock::now_ms();
    let (name, provider) = (&upstream.name, upstream.provider.name());
    // A `model_map` renames the model before the upstream sees it.
    let priced = model
        .map(|m| route.model_map.get(m).map_or(m, String::as_str))
        .and_then(|m| runtime.prices.price(name, provider, m, now));
    let estimate = match priced {
        Some(p) => p.estimate(asked.prompt, output),
        // No model, or one no rule prices: what the upstream's dearest
        // model would cost (it may bill one the table knows).
        None => runtime
            .prices
            .dearest_estimate(name, provider, now, asked.prompt, output)
            .unwrap_or(0.0),
    };
    crate::budget::to_micros(estimate)
}

/// The limits a request counts against: with a gateway key, its quotas,
/// its own limits and the route's per-key limits; without one, the route's
/// limits per client address.
fn rate_checks(
    key: Option<&crate::store::keys::GatewayKey>,
    route: &Route,
    client_ip: Option<std::net::IpAddr>,
) -> RateChecks {
    let mut checks = RateChecks::default();
    let now_ms = crate::clock::now_ms();
    if let Some(b) = &route.budget {
        checks.budgets.push(BudgetCheck::new(
            format!("route:{}", route.name),
            BudgetOf::Route,
            b,
            now_ms,
        ));
    }
    let Some(key) = key else {
        if let Some(ip) = client_ip.filter(|_| !route.rate_limit.is_none()) {
            checks.windows.push(WindowCheck {
                scope: client_scope(ip, &route.name),
                limits: route.rate_limit,
                label: Limited::RoutePerClient,
            });
        }
        return checks;
    };
    if let Some(tokens) = key.token_quota {
        checks.quotas.push(QuotaCheck {
            scope: key.id.clone(),
            tokens,
            period: key.quota_period.bounds(now_ms),
            label: Limited::Quota(key.quota_period),
        });
    }
    if let Some(q) = &key.user_quota {
        checks.quotas.push(QuotaCheck {
            scope: q.scope.clone(),
            tokens: q.tokens,
            period: q.period.bounds(now_ms),
            label: Limited::OwnerQuota(q.period),
        });
    }
    if let Some(b) = &key.budget {
        checks
            .budgets
            .push(BudgetCheck::new(key.id.clone(), BudgetOf::Key, b, now_ms));
    }
    if let Some((scope, b)) = &key.user_budget {
        checks
            .budgets
            .push(BudgetCheck::new(scope.clone(), BudgetOf::Owner, b, now_ms));
    }
    let own = crate::ratelimit::Limits {
        rpm: key.rpm,
        tpm: key.tpm,
    };
    if !own.is_none() {
        checks.windows.push(WindowCheck {
            scope: key.id.clone(),
            limits: own,
            label: Limited::Key,
        });
    }
    if !route.rate_limit.is_none() {
        checks.windows.push(WindowCheck {
            scope: route_scope(&key.id, &route.name),
            limits: route.rate_limit,
            label: Limited::Route,
        });
    }
    checks
}

/// Count the request against `checks` (shared across the cluster in
/// cluster mode, else on this node); refuse with 429 when one is exhausted.
async fn admit_rate(
    state: &AppState,
    ctx: &mut RequestCtx,
    route: &Route,
    checks: RateChecks,
    asked: &crate::cluster::limits::Asked,
) -> Result<(), GatewayError> {
    let now = crate::clock::now_ms() as u64;
    let counted = match &state.cluster {
        Some(cluster) => {
            let reserve = crate::cluster::limits::reserve_for(asked, cluster.config.default_reserve);
            cluster
                .admit(
                    &ctx.request_id,
                    &checks,
                    reserve,
                    &state.limiter,
                    (&state.quotas, &state.budgets),
                    now,
                )
                .await
        }
        None => state
            .limiter
            .admit_all((&state.quotas, &state.budgets), &checks, 1, now)
            .map(|()| Counted::Local)
            .map_err(Denied::Limit),
    };
    match counted {
        Ok(counted) => {
            ctx.admission = Some(Admission { checks, counted });
            Ok(())
        }
        Err(Denied::Limit(r)) => Err(rate_refusal(
            state,
            route,
            &r.label.describe(&route.name),
            r.retry_after,
        )),
        Err(Denied::Unavailable) => Err(GatewayError::LimiterUnavailable { retry_after: 1 }),
    }
}

/// A 429 for `scope`, counted in metrics.
fn rate_refusal(state: &AppState, route: &Route, scope: &str, retry_after: u64) -> GatewayError {
    state
        .metrics
        .rate_limited
        .with_label_values(&[route.name.as_str()])
        .inc();
    GatewayError::RateLimited {
        scope: scope.to_string(),
        retry_after,
    }
}

/// The limiter scope of one client address on a route without gateway keys.
pub fn client_scope(ip: std::net::IpAddr, route: &str) -> String {
    format!("ip:{ip}/{route}")
}

/// The limiter scope of one key on one route.
pub fn route_scope(key_id: &str, route: &str) -> String {
    format!("{key_id}/{route}")
}

/// Parse a request body once: the JSON body's `model` (or the Gemini
/// URL's) and its streaming fields. An empty body is fine (no model); a body
/// that is not JSON is an error (a 400 where the body must be JSON).
fn peek(body: &[u8], path: &str, format: Format) -> Result<Peeked, String> {
    let (model, usage) = if body.is_empty() {
        (None, rewrite::UsageAsk::No)
    } else {
        let p: BodyPeek = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        let usage = rewrite::UsageAsk::of(p.stream.as_ref(), p.stream_options.as_ref());
        (p.model.map(Cow::into_owned), usage)
    };
    // A Gemini URL's model is the one served: a `model` in the body must
    // not choose the route or pass `allowed_models` for another.
    let from_path = (format == Format::Gemini || path.contains("/models/"))
        .then(|| model_from_gemini_path(path).map(str::to_string))
        .flatten();
    let model = from_path.or(model);
    Ok(Peeked { model, usage })
}

/// The model named by a request (see [`peek`]).
#[cfg(test)]
fn peek_model(body: &[u8], path: &str, format: Format) -> Result<Option<String>, GatewayError> {
    peek(body, path, format).map(|p| p.model).map_err(GatewayError::BadJson)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream's body as the upstream gets it, parsed as providers parse
    /// duplicate keys (the last one wins).
    fn asked(body: &[u8]) -> serde_json::Value {
        let usage = peek(body, "/v1/chat/completions", Format::Openai).unwrap().usage;
        let sent = rewrite::ask_for_usage(body, usage)
            .unwrap()
            .unwrap_or_else(|| Bytes::copy_from_slice(body));
        serde_json::from_slice(&sent).unwrap()
    }

    #[test]
    fn every_stream_asks_for_usage_whatever_the_client_wrote_for_stream_options() {
        for body in [
            &br#"{"model":"m","stream":true}"#[..],
            br#"{"model":"m","stream":true,"stream_options":null}"#,
            br#"{"model":"m","stream":true, "stream_options" : null }"#,
            br#"{"model":"m","stream":true,"stream_options":{}}"#,
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":false}}"#,
        ] {
            let sent = asked(body);
            assert_eq!(
                sent["stream_options"]["include_usage"],
                serde_json::Value::Bool(true),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let dup = br#"{"model":"m","stream":true,"stream_options":null,"stream_options":null}"#;
        assert!(
            peek(dup, "/v1/chat/completions", Format::Openai).is_err(),
            "a repeated field is refused"
        );
    }

    #[test]
    fn models_from_body_and_gemini_path() {
        assert_eq!(
            peek_model(
                br#"{"model":"gpt-4o","messages":[]}"#,
                "/v1/chat/completions",
                Format::Openai
            )
            .unwrap()
            .as_deref(),
            Some("gpt-4o")
        );
        assert_eq!(
            peek_model(
                b"",
                "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
                Format::Gemini
            )
            .unwrap()
            .as_deref(),
            Some("gemini-2.0-flash")
        );
        assert_eq!(peek_model(b"{}", "/v1/x", Format::Openai).unwrap(), None);
        assert!(matches!(
            peek_model(b"{not json", "/v1/x", Format::Openai),
            Err(GatewayError::BadJson(_))
        ));
        assert_eq!(model_from_gemini_path("/v1beta/models/"), None);
    }
}
