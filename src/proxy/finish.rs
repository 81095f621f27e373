//! The end of a request: token usage settled, metrics observed, one audit
//! row queued (never waited for), one log line.
//!
//! A request that reached the provider and ended without its usage (client
//! hang-up, cut stream, upstream error after bytes) is charged an estimate
//! (`usage::estimate`), audited with `usage_estimated`.

use super::ctx::RequestCtx;
use crate::usage::estimate;
use crate::{
    audit::entry::AuditEntry,
    audit::{self, fields},
};
use pingora::proxy::Session;

pub fn finish(session: &Session, ctx: &mut RequestCtx, e: Option<&pingora::Error>) {
    let state = ctx.state.clone();
    let req = session.req_header();
    // A client that hung up is recorded as such (nginx's 499), whatever
    // status line it may already have received.
    let status = match (&ctx.error, ctx.response.status) {
        (Some(super::errors::GatewayError::ClientClosed), _) => 499,
        (_, 0) => session.response_written().map_or(0, |r| r.status.as_u16()),
        (_, s) => s,
    };
    let duration = ctx.started.elapsed();
    let reported = ctx.response.meter.finish();
    let request_bytes = ctx.body.as_ref().map_or(ctx.body_seen, |b| b.len() as u64);
    // A stream that ended cleanly without the provider's usage (a proxy
    // that strips it, a provider that omits it, a client field that turned
    // it off) is charged its estimate too: a clean end is not a free one.
    // So is an answer whose usage could not be read or believed (`-5`,
    // `1e20`, a billion tokens): a broken count is not a free request.
    let usage_missing = ctx.response.upstream_answered
        && (200..300).contains(&status)
        && (ctx.response.meter.usage_unreadable()
            || ctx.response.meter.is_sse()
                && (reported.prompt_tokens.is_none() || reported.completion_tokens.is_none()));
    let (usage, usage_estimated) = estimate::charge(
        reported,
        unfinished(ctx, e) || usage_missing,
        estimate::prompt_tokens(request_bytes),
        ctx.response.meter.seen_tokens(),
    );
    let error = ctx.error.as_ref().map(|e| e.kind()).or(e.map(|e| e.etype().as_str()));
    // Reference-counted handles instead of copied names: `ctx` is borrowed
    // mutably below, and this runs once per request.
    let (route_arc, upstream_arc) = (ctx.route.clone(), ctx.upstream.upstream.clone());
    let route = route_arc.as_ref().map_or("-", |r| r.name.as_str());
    let upstream = upstream_arc.as_ref().map_or("-", |u| u.name.as_str());
    // The request's model, or (a body FastGate did not read) the one the
    // answer named.
    let model = ctx
        .model
        .take()
        .or_else(|| ctx.response.meter.response_model().map(str::to_owned));
    let retries = ctx.upstream.attempts.saturating_sub(1);

    let tokens = usage
        .prompt_tokens
        .unwrap_or(0)
        .saturating_add(usage.completion_tokens.unwrap_or(0));
    if let Some(lease) = &ctx.upstream.lease {
        lease.key().add_tokens(tokens);
    }
    // Priced by the table this node serves now; only a request with usage
    // has a cost (or is unpriced).
    let runtime = state.runtime.load();
    // The answer's model first: what the provider billed (a route's
    // `model_map` may have renamed the client's).
    let billed = ctx.response.meter.response_model().or(model.as_deref());
    let price = match (&upstream_arc, billed) {
        (Some(u), Some(m)) if tokens > 0 => runtime.prices.price(&u.name, u.provider.name(), m, ctx.started_ms),
        _ => None,
    };
    let cost = price.map(|p| p.cost(&crate::usage::priced(&usage)));
    if let Some(admission) = ctx.admission.take() {
        settle(
            &state,
            &ctx.request_id,
            admission,
            tokens,
            cost.map_or(0, crate::budget::to_micros),
        );
    }
    let m = &state.metrics;
    let mut status_buf = itoa::Buffer::new();
    m.requests
        .with_label_values(&[route, upstream, status_buf.format(status)])
        .inc();
    let unrouted;
    let series = match &ctx.route {
        Some(r) => r.metrics.get(m, &r.name),
        None => {
            unrouted = crate::metrics::RouteHandles::resolve(m, "-");
            &unrouted
        }
    };
    series.duration.observe(duration.as_secs_f64());
    if let Some(ttfb) = ctx.response.ttfb {
        series.ttfb.observe(ttfb.as_secs_f64());
    }
    if retries > 0 {
        series.retries.inc_by(u64::from(retries));
    }
    if let Some(kind) = error.filter(|_| status >= 500 || ctx.upstream.attempts > 1) {
        m.upstream_errors.with_label_values(&[upstream, kind]).inc();
    }
    let table = state.routes.load();
    let model_label = table.model_label(model.as_deref());
    match cost {
        Some(c) if c > 0.0 => m.cost.with_label_values(&[route, upstream, model_label]).inc_by(c),
        None if tokens > 0 => m.unpriced.with_label_values(&[route, upstream]).inc(),
        _ => {}
    }
    if let Some(p) = usage.prompt_tokens {
        m.tokens.with_label_values(&[route, model_label, "prompt"]).inc_by(p);
    }
    if let Some(c) = usage.completion_tokens {
        m.tokens
            .with_label_values(&[route, model_label, "completion"])
            .inc_by(c);
    }
    if usage_estimated {
        m.usage_estimated.with_label_values(&[route]).inc();
    }

    if let Some(trace) = ctx.upstream.trace.take() {
        let path = req.uri.path();
        let finish: Vec<&str> = ctx.response.meter.finish_reason().into_iter().collect();
        let span = crate::otel::Finished {
            request_id: &ctx.request_id,
            method: req.method.as_str(),
            path,
            route: ctx.route.as_ref().map(|r| r.name.as_str()),
            upstream: ctx.upstream.upstream.as_ref().map(|u| u.name.as_str()),
            provider: ctx.upstream.upstream.as_ref().map(|u| u.provider),
            request_model: model.as_deref(),
            response_model: ctx.response.meter.response_model(),
            response_id: ctx.response.meter.response_id(),
            finish_reasons: finish.as_slice(),
            status,
            error,
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
            usage_estimated,
            stream: ctx.response.stream || path.ends_with(":streamGenerateContent"),
            ttfb: ctx.response.ttfb,
            cost,
        };
        if let Some(tracer) = &*state.otel.load() {
            tracer.finish(*trace, &span);
        }
    }
    let ttfb_ms = ctx.response.ttfb.map(|d| d.as_secs_f64() * 1000.0);
    let ms = duration.as_secs_f64() * 1000.0;
    // A refusal before any route or key is counted; only a sample of them
    // (one per client per second) is logged at info and audited.
    let refusal = ctx.error.as_ref().and_then(super::errors::GatewayError::refusal);
    if let Some(r) = refusal {
        m.refused.with_label_values(&[r.as_str()]).inc();
        if !state.audit.keep_refused(ctx.client.ip) {
            tracing::debug!(
                request_id = %ctx.request_id,
                client_ip = ctx.client.ip.map(tracing::field::display),
                status,
                refused = r.as_str(),
                "request refused (not sampled)"
            );
            return;
        }
    }
    tracing::info!(
        request_id = %ctx.request_id,
        method = %req.method,
        path = fields::cap(req.uri.path(), fields::PATH_MAX).as_ref(),
        route,
        upstream,
        key_id = ctx.key.as_ref().map_or("-", |k| k.id.as_str()),
        client_ip = ctx.client.ip.map(tracing::field::display),
        upstream_key = ctx.upstream.lease.as_ref().map_or("-", |l| l.key().id.as_str()),
        model = model_label,
        status,
        refused = refusal.map(|r| r.as_str()),
        attempts = ctx.upstream.attempts,
        bytes = ctx.response.bytes,
        chunks = ctx.response.chunks,
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        usage_estimated,
        cost,
        ttfb_ms = ttfb_ms.map(round_ms),
        duration_ms = round_ms(ms),
        error = error.unwrap_or(""),
        "request"
    );

    if !state.audit.enabled() {
        return;
    }
    let cfg = &state.config.file.audit;
    let cap = cfg.body_max_bytes.0 as usize;
    let request_body = cfg
        .capture_body
        .then(|| match &ctx.body {
            Some(b) => Some(fields::body_text(b, cap, Some(b.len() as u64))),
            None => ctx
                .body_capture
                .as_deref()
                .map(|b| fields::body_text(b, cap, Some(ctx.body_seen))),
        })
        .flatten();
    let endpoint = match (&ctx.upstream.upstream, &ctx.upstream.target) {
        (Some(u), Some(t)) if !u.endpoints.is_empty() => Some(u.endpoint(t).display.as_str()),
        (Some(u), _) if u.is_mock() => Some("mock"),
        _ => None,
    };
    let path_is_stream = req.uri.path().ends_with(":streamGenerateContent");
    // Texts made here live on this stack until the entry is encoded; the
    // names (key, route, upstream...) are borrowed, never cloned.
    let owner = ctx
        .key
        .as_ref()
        .filter(|k| !k.owner.is_empty())
        .map(|k| fields::cap(&k.owner, fields::OWNER_MAX));
    let method = fields::cap(req.method.as_str(), fields::METHOD_MAX);
    let path = audit::redact_path(&req.uri);
    let model = model.as_deref().map(|m| fields::cap(m, fields::MODEL_MAX));
    let attempts = ctx.upstream.attempts_summary(status);
    let error_text = ctx
        .error
        .as_ref()
        .map(|e| fields::cap_owned(e.to_string(), fields::ERROR_MAX));
    let client_ip = ctx.client.ip.map(|ip| ip.to_string());
    let user_agent = req
        .headers
        .get(http::header::USER_AGENT)
        .map(|v| fields::cap_bytes(v.as_bytes(), fields::USER_AGENT_MAX));
    let request_headers = cfg.capture_headers.then(|| {
        let max = match refusal {
            Some(_) => fields::REFUSED_HEADERS_BYTES_MAX,
            None => fields::HEADERS_BYTES_MAX,
        };
        audit::redact_headers_within(&req.headers, max)
    });
    // The meter keeps one byte more than the cap: a longer body is marked.
    let response_body = ctx
        .response
        .meter
        .take_capture()
        .map(|b| fields::body_text(&b, cap, None));
    let entry = AuditEntry {
        request_id: &ctx.request_id,
        ts_ms: ctx.started_ms,
        key_id: ctx.key.as_ref().map(|k| k.id.as_str()),
        owner: owner.as_deref(),
        user_id: ctx.key.as_ref().and_then(|k| k.owner_id.as_deref()),
        route: ctx.route.as_ref().map(|r| r.name.as_str()),
        upstream: ctx.upstream.upstream.as_ref().map(|u| u.name.as_str()),
        endpoint,
        upstream_key_id: ctx.upstream.lease.as_ref().map(|l| l.key().id.as_str()),
        method: &method,
        path: &path,
        status,
        model: model.as_deref(),
        stream: ctx.response.stream || path_is_stream,
        ttfb_ms,
        duration_ms: ms,
        request_bytes,
        response_bytes: ctx.response.bytes,
        chunks: ctx.response.chunks,
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        usage_estimated,
        retries,
        attempts: attempts.as_deref(),
        error: error_text.as_deref().or(e.map(|e| e.etype().as_str())),
        client_ip: client_ip.as_deref(),
        user_agent: user_agent.as_deref(),
        request_headers: request_headers.as_deref(),
        response_headers: ctx.response.headers.as_deref(),
        request_body: request_body.as_deref(),
        response_body: response_body.as_deref(),
        cache_read_tokens: usage.cache_read_tokens,
        cache_write_tokens: usage.cache_write_tokens,
        reasoning_tokens: usage.reasoning_tokens,
        cost,
        price_version: price.map(|p| p.version),
    };
    state.audit.record_entry(&entry);
}

/// Whether the request reached the provider and ended without finishing:
/// the upstream's answer had begun and then the request ended in an error
/// (client gone, stream cut, upstream failure), or the client hung up while
/// an attempt was with the upstream. Answers FastGate wrote itself (a
/// refusal, a 502 after every attempt failed) and whole answers are not.
fn unfinished(ctx: &RequestCtx, e: Option<&pingora::Error>) -> bool {
    let ended_badly = ctx.error.is_some() || e.is_some() || ctx.response.cut_short;
    if !ended_badly {
        return false;
    }
    let client_gone = matches!(ctx.error, Some(super::errors::GatewayError::ClientClosed));
    ctx.response.upstream_answered || (client_gone && ctx.upstream.target.is_some())
}

/// Milliseconds to two decimals, for log fields (numbers in JSON lines).
fn round_ms(ms: f64) -> f64 {
    (ms * 100.0).round() / 100.0
}

/// Swap a request's reservations for what it used: `tokens` for its token
/// limits and quotas, `micros` for its budgets.
pub fn settle(
    state: &crate::state::AppState,
    request_id: &str,
    admission: crate::ratelimit::Admission,
    tokens: u64,
    micros: u64,
) {
    let now = crate::clock::now_ms() as u64;
    match &state.cluster {
        Some(cluster) => cluster.settle(
            request_id,
            admission,
            (tokens, micros),
            (&state.limiter, &state.quotas, &state.budgets),
            now,
        ),
        None => {
            let checks = &admission.checks;
            state.limiter.charge_all(&state.quotas, checks, tokens, now);
            state
                .budgets
                .settle_all(&checks.budgets, checks.cost_reserve, micros, Some(&state.alerts));
        }
    }
}
