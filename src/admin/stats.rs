//! `/api/stats/*`: traffic, errors, latency and tokens from the audit log,
//! and `/api/upstreams`, `/api/pools`, `/api/config` from live state.
//! Users get numbers for their own keys only.

use super::{
    AdminState,
    cluster_log::{self, Dialect},
    error::ApiError,
    session::Caller,
};
use crate::store::{audit::Arg, rollup};
use axum::{
    Json,
    extract::{Query, State},
};
use serde::Deserialize;
use serde_json::{Value, json};
use std::{sync::Arc, time::Duration};

#[derive(Deserialize)]
pub struct StatsQuery {
    /// How far back (`1h`, `24h`, `7d`); default 1h (summary, top) or 24h (timeseries).
    window: Option<String>,
    bucket: Option<String>,
    by: Option<String>,
    limit: Option<u32>,
    /// One gateway key's requests only (a user's own keys, for users).
    key_id: Option<String>,
}

/// The start of the window asked for (Unix ms). Rows older than the audit
/// retention are gone, so no window reaches further back than it.
fn window(q: &StatsQuery, default: Duration, retention: Duration) -> Result<i64, ApiError> {
    let w = match &q.window {
        Some(w) => humantime::parse_duration(w).map_err(|e| ApiError::Invalid(format!("window: {e}")))?,
        None => default,
    };
    Ok(crate::clock::now_ms() - w.min(retention).as_millis() as i64)
}

/// Whether the node's rollup can answer: the admin's whole-gateway view
/// on the node's own SQLite (a user's or one key's numbers, and the
/// cluster's Postgres, are read from the rows).
fn rolled_up(s: &AdminState, caller: &Caller, q: &StatsQuery) -> Result<bool, ApiError> {
    Ok(caller.is_admin() && q.key_id.is_none() && cluster_log::source(s)?.is_none())
}

/// `WHERE` clause and arguments: the time window, the owner for users, and
/// one key where asked.
fn scope(caller: &Caller, since: i64, key_id: Option<&str>, dialect: Dialect) -> (String, Vec<Arg>) {
    let mut args = vec![Arg::Int(since)];
    let mut clause = format!("ts_ms >= {}", dialect.mark(1));
    if !caller.is_admin() {
        args.push(Arg::Text(caller.user_id.clone()));
        clause.push_str(&format!(" AND user_id = {}", dialect.mark(args.len())));
    }
    if let Some(k) = key_id {
        args.push(Arg::Text(k.to_string()));
        clause.push_str(&format!(" AND key_id = {}", dialect.mark(args.len())));
    }
    (clause, args)
}

/// Requests that failed, in SQL both dialects take.
pub const ERRORS: &str = "SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END)";

pub async fn summary(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Query(q): Query<StatsQuery>,
) -> Result<Json<Value>, ApiError> {
    let since = window(&q, Duration::from_secs(3600), s.app.config.file.audit.retention.0)?;
    if rolled_up(&s, &caller, &q)? {
        let r = s.read(move |c| rollup::summary(c, since)).await?;
        return Ok(Json(summary_json(&r)));
    }
    type Sample = (i64, f64, Option<f64>, Option<i64>, Option<i64>, Option<f64>);
    // One pass over the window; nothing but the histogram is kept.
    let rows: Vec<Sample> = cluster_log::read_log(
        &s,
        |d| {
            let (clause, args) = scope(&caller, since, q.key_id.as_deref(), d);
            let sql = format!(
                "SELECT status, duration_ms, ttfb_ms, prompt_tokens, completion_tokens, cost FROM {} WHERE {clause}",
                d.table()
            );
            (sql, args)
        },
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        |r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)),
    )
    .await?;
    let mut summary = rollup::Summary::default();
    for (status, ms, t, p, c, cost) in rows {
        summary.add_row(status, ms, t, (p, c), cost);
    }
    Ok(Json(summary_json(&summary)))
}

/// The summary's JSON, from either source.
fn summary_json(s: &rollup::Summary) -> Value {
    let n = s.requests;
    let avg_ms = (n > 0).then(|| s.sum_ms / n as f64);
    let avg_ttfb = (s.n_ttfb > 0).then(|| s.sum_ttfb / s.n_ttfb as f64);
    json!({
        "requests": n,
        "errors": s.errors,
        "error_rate": if n > 0 { s.errors as f64 / n as f64 } else { 0.0 },
        "avg_ms": avg_ms,
        "p50_ms": s.latency.quantile(0.5),
        "p95_ms": s.latency.quantile(0.95),
        "avg_ttfb_ms": avg_ttfb,
        "p50_ttfb_ms": s.ttfb.quantile(0.5),
        "p95_ttfb_ms": s.ttfb.quantile(0.95),
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "cost": s.cost,
    })
}

pub async fn timeseries(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Query(q): Query<StatsQuery>,
) -> Result<Json<Value>, ApiError> {
    let bucket_ms: i64 = match q.bucket.as_deref().unwrap_or("hour") {
        "minute" => 60_000,
        "hour" => 3_600_000,
        "day" => 86_400_000,
        other => return Err(ApiError::Invalid(format!("bucket {other:?}: use minute, hour or day"))),
    };
    let since = window(&q, Duration::from_secs(24 * 3600), s.app.config.file.audit.retention.0)?;
    let point = |t: i64, requests: i64, errors: i64, avg_ms: Option<f64>, pt: i64, ct: i64, cost: f64| json!({"t": t, "requests": requests, "errors": errors, "avg_ms": avg_ms, "prompt_tokens": pt, "completion_tokens": ct, "cost": cost});
    if rolled_up(&s, &caller, &q)? {
        let series = s.read(move |c| rollup::timeseries(c, since, bucket_ms)).await?;
        let points: Vec<Value> = series
            .into_iter()
            .map(|(t, p)| {
                let avg = (p.requests > 0).then(|| p.sum_ms / p.requests as f64);
                point(
                    t,
                    p.requests,
                    p.errors,
                    avg,
                    p.prompt_tokens,
                    p.completion_tokens,
                    p.cost,
                )
            })
            .collect();
        return Ok(Json(json!({"bucket_ms": bucket_ms, "points": points})));
    }
    let points = cluster_log::read_log(
        &s,
        |d| {
            let (clause, args) = scope(&caller, since, q.key_id.as_deref(), d);
            let sql = format!(
                "SELECT (ts_ms / {bucket_ms}) * {bucket_ms} AS t, COUNT(*), CAST(COALESCE({ERRORS}, 0) AS BIGINT),
                    AVG(duration_ms), CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT),
                    CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT), COALESCE(SUM(cost), 0.0)
                 FROM {} WHERE {clause} GROUP BY t ORDER BY t",
                d.table()
            );
            (sql, args)
        },
        move |r| {
            Ok(point(
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        },
        move |r| point(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6)),
    )
    .await?;
    Ok(Json(json!({"bucket_ms": bucket_ms, "points": points})))
}

pub async fn top(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Query(q): Query<StatsQuery>,
) -> Result<Json<Value>, ApiError> {
    let column = match q.by.as_deref().unwrap_or("route") {
        "route" => "route",
        "model" => "model",
        "key" => "key_id",
        "upstream" => "upstream",
        other => {
            return Err(ApiError::Invalid(format!(
                "by {other:?}: use route, model, key or upstream"
            )));
        }
    };
    let limit = q.limit.unwrap_or(10).clamp(1, 100);
    let since = window(&q, Duration::from_secs(3600), s.app.config.file.audit.retention.0)?;
    let item = |value: Option<String>, requests: i64, errors: i64, tokens: i64, avg_ms: Option<f64>, cost: f64| json!({"value": value, "requests": requests, "errors": errors, "tokens": tokens, "avg_ms": avg_ms, "cost": cost});
    let by = match column {
        "route" => Some(rollup::By::Route),
        "model" => Some(rollup::By::Model),
        "upstream" => Some(rollup::By::Upstream),
        _ => None,
    };
    if let Some(by) = by
        && rolled_up(&s, &caller, &q)?
    {
        let items = s.read(move |c| rollup::top(c, since, by, limit as usize)).await?;
        let items: Vec<Value> = items
            .into_iter()
            .map(|t| {
                let avg = (t.requests > 0).then(|| t.sum_ms / t.requests as f64);
                item(t.value, t.requests, t.errors, t.tokens, avg, t.cost)
            })
            .collect();
        return Ok(Json(json!({"by": q.by.as_deref().unwrap_or("route"), "items": items})));
    }
    let rows = cluster_log::read_log(
        &s,
        |d| {
            let (clause, args) = scope(&caller, since, q.key_id.as_deref(), d);
            let sql = format!(
                "SELECT {column}, COUNT(*) AS n, CAST(COALESCE({ERRORS}, 0) AS BIGINT),
                    CAST(COALESCE(SUM(prompt_tokens), 0) + COALESCE(SUM(completion_tokens), 0) AS BIGINT),
                    AVG(duration_ms), COALESCE(SUM(cost), 0.0)
                 FROM {} WHERE {clause} GROUP BY {column} ORDER BY n DESC LIMIT {limit}",
                d.table()
            );
            (sql, args)
        },
        move |r| Ok(item(r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        move |r| item(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)),
    )
    .await?;
    Ok(Json(json!({"by": q.by.as_deref().unwrap_or("route"), "items": rows})))
}

pub async fn config(caller: Caller, State(s): State<Arc<AdminState>>) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    // Secrets are `skip_serializing` on the file types: pool keys, admin token, JWT secret.
    let mut file = s.app.config.file.clone();
    // Upstreams, pools and `otel` reload live; show what is serving.
    let runtime = s.app.runtime.load();
    file.upstreams = runtime.file.upstreams.clone();
    file.key_pools = runtime.file.key_pools.clone();
    file.otel = runtime.file.otel.clone();
    let mut v = json!(file);
    v["path"] = Value::String(s.app.config.path.display().to_string());
    // Values interpolated from the environment are shown as `${NAME}`.
    super::routes::env_mask(&s).await?.mask_json(&mut v);
    Ok(Json(v))
}

/// The price table serving now, every rule in the order tried (any
/// signed-in caller: rates are no secret, and users see what they spend).
pub async fn pricing(_caller: Caller, State(s): State<Arc<AdminState>>) -> Json<Value> {
    let runtime = s.app.runtime.load();
    let table = &runtime.prices;
    let rules: Vec<Value> = table
        .rules()
        .map(|(rule, version)| {
            let mut v = json!(rule);
            v["version"] = json!(version);
            v
        })
        .collect();
    Json(json!({"currency": table.currency, "rules": rules}))
}

pub async fn reload(caller: Caller, State(s): State<Arc<AdminState>>) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let app = s.app.clone();
    let result = tokio::task::spawn_blocking(move || app.reload_config())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let actor = caller.username.clone();
    let ok = result.is_ok();
    s.db(move |c| crate::store::admin_audit::record(c, &actor, "config.reload", None, None, Some(&json!({"ok": ok}))))
        .await?;
    let runtime = s.app.runtime.load();
    match result {
        Ok(restart) => Ok(Json(json!({
            "reloaded": true,
            "routes": s.app.routes.load().len(),
            "upstreams": runtime.upstreams.len(),
            "key_pools": runtime.pools.len(),
            "needs_restart": restart,
        }))),
        Err(e) => Err(ApiError::Invalid(e.to_string())),
    }
}
