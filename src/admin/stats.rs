//! `/api/stats/*`: traffic, errors, latency and tokens from the audit log,
//! and `/api/upstreams`, `/api/pools`, `/api/config` from live state.
//! Users get numbers for their own keys only.

use super::{AdminState, error::ApiError, session::Caller};
use axum::{
    Json,
    extract::{Path, Query, State},
};
use rusqlite::types::Value as Sql;
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
}

fn window(q: &StatsQuery, default: Duration) -> Result<i64, ApiError> {
    let w = match &q.window {
        Some(w) => humantime::parse_duration(w).map_err(|e| ApiError::Invalid(format!("window: {e}")))?,
        None => default,
    };
    Ok(crate::audit::now_ms() - w.as_millis() as i64)
}

/// `WHERE` clause and arguments: the time window, and the owner for users.
fn scope(caller: &Caller, since: i64) -> (String, Vec<Sql>) {
    let mut args = vec![Sql::Integer(since)];
    let mut clause = "ts_ms >= ?1".to_string();
    if !caller.is_admin() {
        args.push(Sql::Text(caller.user_id.clone()));
        clause.push_str(" AND user_id = ?2");
    }
    (clause, args)
}

pub async fn summary(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Query(q): Query<StatsQuery>,
) -> Result<Json<Value>, ApiError> {
    let since = window(&q, Duration::from_secs(3600))?;
    let (clause, args) = scope(&caller, since);
    let v = s
        .db(move |c| {
            let (n, errors, avg_ms, avg_ttfb, pt, ct): (i64, i64, Option<f64>, Option<f64>, i64, i64) = c.query_row(
                &format!(
                    "SELECT COUNT(*), COALESCE(SUM(status >= 400), 0), AVG(duration_ms), AVG(ttfb_ms),
                        COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0)
                     FROM audit_log WHERE {clause}"
                ),
                rusqlite::params_from_iter(args.iter()),
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )?;
            // Percentiles by rank over the window.
            let pct = |p: f64| -> Result<Option<f64>, crate::store::StoreError> {
                if n == 0 {
                    return Ok(None);
                }
                let offset = ((n as f64 - 1.0) * p).round() as i64;
                let mut a = args.clone();
                a.push(Sql::Integer(offset));
                let idx = a.len();
                Ok(c.query_row(
                    &format!(
                        "SELECT duration_ms FROM audit_log WHERE {clause} ORDER BY duration_ms LIMIT 1 OFFSET ?{idx}"
                    ),
                    rusqlite::params_from_iter(a.iter()),
                    |r| r.get(0),
                )?)
            };
            Ok(json!({
                "requests": n,
                "errors": errors,
                "error_rate": if n > 0 { errors as f64 / n as f64 } else { 0.0 },
                "avg_ms": avg_ms,
                "p50_ms": pct(0.5)?,
                "p95_ms": pct(0.95)?,
                "avg_ttfb_ms": avg_ttfb,
                "prompt_tokens": pt,
                "completion_tokens": ct,
            }))
        })
        .await?;
    Ok(Json(v))
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
    let since = window(&q, Duration::from_secs(24 * 3600))?;
    let (clause, args) = scope(&caller, since);
    let points = s
        .db(move |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT (ts_ms / {bucket_ms}) * {bucket_ms} AS t, COUNT(*), COALESCE(SUM(status >= 400), 0),
                    AVG(duration_ms), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0)
                 FROM audit_log WHERE {clause} GROUP BY t ORDER BY t"
            ))?;
            let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| {
                Ok(json!({
                    "t": r.get::<_, i64>(0)?,
                    "requests": r.get::<_, i64>(1)?,
                    "errors": r.get::<_, i64>(2)?,
                    "avg_ms": r.get::<_, Option<f64>>(3)?,
                    "prompt_tokens": r.get::<_, i64>(4)?,
                    "completion_tokens": r.get::<_, i64>(5)?,
                }))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
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
    let since = window(&q, Duration::from_secs(3600))?;
    let (clause, args) = scope(&caller, since);
    let rows = s
        .db(move |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {column}, COUNT(*) AS n, COALESCE(SUM(status >= 400), 0),
                    COALESCE(SUM(prompt_tokens), 0) + COALESCE(SUM(completion_tokens), 0), AVG(duration_ms)
                 FROM audit_log WHERE {clause} GROUP BY {column} ORDER BY n DESC LIMIT {limit}"
            ))?;
            let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| {
                Ok(json!({
                    "value": r.get::<_, Option<String>>(0)?,
                    "requests": r.get::<_, i64>(1)?,
                    "errors": r.get::<_, i64>(2)?,
                    "tokens": r.get::<_, i64>(3)?,
                    "avg_ms": r.get::<_, Option<f64>>(4)?,
                }))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await?;
    Ok(Json(json!({"by": q.by.as_deref().unwrap_or("route"), "items": rows})))
}

pub async fn upstreams(caller: Caller, State(s): State<Arc<AdminState>>) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let mut list: Vec<Value> = s
        .app
        .upstreams
        .values()
        .map(|u| {
            json!({
                "name": u.name,
                "provider": u.provider.name(),
                "endpoints": u.endpoints.iter().map(|e| format!("{}://{}{}", if e.tls { "https" } else { "http" }, e.authority, e.base_path)).collect::<Vec<_>>(),
                "resolved_addresses": u.backend_count(),
                "key_pool": u.key_pool.as_ref().map(|p| p.name.clone()),
                "in_flight": u.key_pool.as_ref().map_or(0, |p| p.keys().iter().map(|k| k.in_flight()).sum::<u32>()),
            })
        })
        .collect();
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Ok(Json(Value::Array(list)))
}

fn pool_keys(pool: &crate::pool::KeyPool) -> Vec<Value> {
    pool.keys()
        .iter()
        .map(|k| json!({"id": k.id, "masked": k.secret.masked(), "state": "active", "in_flight": k.in_flight(), "total": k.total()}))
        .collect()
}

pub async fn pools(caller: Caller, State(s): State<Arc<AdminState>>) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let mut list: Vec<Value> = s
        .app
        .pools
        .values()
        .map(|p| {
            json!({
                "name": p.name,
                "strategy": format!("{:?}", p.strategy).to_lowercase(),
                "keys": p.keys().len(),
                "in_flight": p.keys().iter().map(|k| k.in_flight()).sum::<u32>(),
            })
        })
        .collect();
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Ok(Json(Value::Array(list)))
}

pub async fn pool(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let pool = s
        .app
        .pools
        .get(&name)
        .ok_or_else(|| ApiError::NotFound(format!("no key pool named {name:?}")))?;
    Ok(Json(Value::Array(pool_keys(pool))))
}

pub async fn config(caller: Caller, State(s): State<Arc<AdminState>>) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    // Secrets are `skip_serializing` on the file types: pool keys, admin token, JWT secret.
    let mut v = json!(s.app.config.file);
    v["path"] = Value::String(s.app.config.path.display().to_string());
    Ok(Json(v))
}

pub async fn reload(caller: Caller, State(s): State<Arc<AdminState>>) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let app = s.app.clone();
    let result = tokio::task::spawn_blocking(move || app.reload_routes())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let actor = caller.username.clone();
    let ok = result.is_ok();
    s.db(move |c| crate::store::admin_audit::record(c, &actor, "config.reload", None, None, Some(&json!({"ok": ok}))))
        .await?;
    match result {
        Ok(n) => Ok(Json(json!({"reloaded": true, "routes": n}))),
        Err(e) => Err(ApiError::Invalid(e.to_string())),
    }
}
