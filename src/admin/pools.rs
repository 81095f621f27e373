//! `/api/pools` and `/api/upstreams`: live key state (masked keys only),
//! bulk add, enable/disable, delete, reset and test of upstream keys, and
//! upstream addresses with their health.

use super::{AdminState, error::ApiError, session::Caller};
use crate::{
    clock::now_ms,
    pool::{KeyPool, KeySource, KeyState, PoolKey, reprobe},
    proxy::forward,
    store,
};
use axum::{
    Json,
    extract::{Path, State},
};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

fn gate_json(g: &crate::pool::status::Gate, now: i64) -> Value {
    json!({
        "state": g.state(now).as_str(),
        "until_ms": (g.until_ms > now).then_some(g.until_ms),
        "remaining_s": (g.until_ms > now).then(|| (g.until_ms - now) as f64 / 1000.0),
        "reason": g.disabled.clone().or_else(|| (g.until_ms > now).then(|| g.reason.clone()).flatten()),
        "consecutive_failures": g.auth_failures.max(g.backoff_step),
    })
}

/// One key as the API shows it: id and masked form, never the secret.
/// `reprobe_interval` is its pool's (when a provider-disabled key is tried
/// again).
pub fn key_json(k: &PoolKey, reprobe_interval: std::time::Duration) -> Value {
    let now = now_ms();
    let st = k.status();
    let totals = k.totals();
    let mut v = gate_json(&st.key, now);
    v["disabled_reason"] = json!(st.key.disabled);
    v["next_probe_at"] = json!(reprobe::next_probe_at(&st, reprobe_interval));
    v["id"] = json!(k.id);
    v["masked"] = json!(k.secret.masked());
    v["source"] = json!(k.source.as_str());
    v["weight"] = json!(k.weight);
    v["in_flight"] = json!(k.in_flight());
    v["probing"] = json!(k.probing());
    v["last_error"] = json!(st.last_error);
    v["last_error_ms"] = json!((st.last_error_ms > 0).then_some(st.last_error_ms));
    v["totals"] = json!({
        "requests": totals.requests,
        "errors": totals.errors,
        "tokens": totals.tokens,
        "last_used_ms": (totals.last_used_ms > 0).then_some(totals.last_used_ms),
    });
    let mut models: Vec<(&String, Value)> = st.models.iter().map(|(m, g)| (m, gate_json(g, now))).collect();
    models.sort_by(|a, b| a.0.cmp(b.0));
    v["models"] = Value::Object(models.into_iter().map(|(m, g)| (m.clone(), g)).collect());
    v
}

pub fn pool_json(p: &KeyPool) -> Value {
    let keys = p.keys();
    let counts = p.count_by_state(now_ms());
    let states: serde_json::Map<String, Value> = KeyState::ALL
        .iter()
        .zip(counts)
        .map(|(s, n)| (s.as_str().to_string(), json!(n)))
        .collect();
    json!({
        "name": p.name,
        "strategy": p.strategy.as_str(),
        "cooldown_scope": p.policy.scope.as_str(),
        "keys": keys.len(),
        "states": states,
        "in_flight": keys.iter().map(|k| k.in_flight()).sum::<u32>(),
        "leases_reclaimed": p.reclaimed.load(std::sync::atomic::Ordering::Relaxed),
    })
}

fn find_pool(s: &AdminState, name: &str) -> Result<Arc<KeyPool>, ApiError> {
    s.app
        .runtime
        .load()
        .pools
        .get(name)
        .cloned()
        .ok_or_else(|| ApiError::NotFound(format!("no key pool named {name:?}")))
}

fn find_key(pool: &KeyPool, id: &str) -> Result<Arc<PoolKey>, ApiError> {
    pool.key(id)
        .ok_or_else(|| ApiError::NotFound(format!("no key {id:?} in pool {:?}", pool.name)))
}

pub async fn list(caller: Caller, State(s): State<Arc<AdminState>>) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let runtime = s.app.runtime.load();
    let mut pools: Vec<&Arc<KeyPool>> = runtime.pools.values().collect();
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(Value::Array(pools.into_iter().map(|p| pool_json(p)).collect())))
}

pub async fn keys(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let pool = find_pool(&s, &name)?;
    let interval = s.app.runtime.load().reprobe_interval(&pool.name);
    Ok(Json(Value::Array(
        pool.keys().iter().map(|k| key_json(k, interval)).collect(),
    )))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddKeys {
    /// Keys as a list, or as text with one key per line (a pasted list).
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    weight: Option<u32>,
    /// Test each new key with a cheap real call.
    #[serde(default)]
    test: bool,
}

pub async fn add(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path(name): Path<String>,
    Json(body): Json<AddKeys>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let pool = find_pool(&s, &name)?;
    if !s.app.sealer.enabled() {
        return Err(ApiError::Conflict(
            "adding upstream keys through the API needs secrets.master_key (FASTGATE_MASTER_KEY) to encrypt them at rest; keys listed in fastgate.yaml work without it".into(),
        ));
    }
    let weight = body.weight.unwrap_or(1);
    if weight == 0 {
        return Err(ApiError::Invalid("weight must be at least 1".into()));
    }
    let mut secrets: Vec<String> = body.keys.iter().map(|k| k.trim().to_string()).collect();
    if let Some(text) = &body.text {
        secrets.extend(text.lines().map(|l| l.trim().to_string()));
    }
    secrets.retain(|k| !k.is_empty() && !k.starts_with('#'));
    if let Some(bad) = secrets
        .iter()
        .find(|k| k.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        return Err(ApiError::Invalid(format!(
            "a key must not contain spaces or control characters (the one masked {})",
            crate::secret::mask(bad)
        )));
    }
    if secrets.is_empty() {
        return Err(ApiError::Invalid(
            "no keys given: send {\"keys\": [...]} or {\"text\": \"one per line\"}".into(),
        ));
    }
    let mut fresh = Vec::new();
    let mut duplicates = Vec::new();
    for secret in &secrets {
        let id = crate::pool::key_id(secret);
        if pool.key(&id).is_some() || fresh.iter().any(|(i, _): &(String, String)| *i == id) {
            duplicates.push(id);
        } else {
            fresh.push((id, secret.clone()));
        }
    }
    let app = s.app.clone();
    let (pool_name, actor, to_store) = (name.clone(), caller.username.clone(), fresh.clone());
    s.db(move |c| {
        for (id, secret) in &to_store {
            store::pool_keys::insert(c, &app.sealer, &pool_name, id, secret, weight, &actor)?;
        }
        let ids: Vec<&String> = to_store.iter().map(|(id, _)| id).collect();
        store::admin_audit::record(
            c,
            &actor,
            "pool.keys.add",
            Some(&pool_name),
            None,
            Some(&json!({"keys": ids})),
        )
    })
    .await?;
    let added = pool.add(
        fresh
            .iter()
            .map(|(_, secret)| Arc::new(PoolKey::new(secret, weight, KeySource::Admin)))
            .collect(),
    );
    let mut tests = Vec::new();
    if body.test {
        for k in &added {
            tests.push(json!({"id": k.id, "test": test_key(&s, &pool, &k.id).await?}));
        }
    }
    Ok(Json(json!({
        "added": added.iter().map(|k| k.id.clone()).collect::<Vec<_>>(),
        "duplicates": duplicates,
        "tests": tests,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPatch {
    enabled: bool,
}

pub async fn patch(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path((name, id)): Path<(String, String)>,
    Json(body): Json<KeyPatch>,
) -> Result<Json<Value>, ApiError> {
    let by = caller.username.clone();
    let action = if body.enabled {
        "pool.key.enable"
    } else {
        "pool.key.disable"
    };
    change_key(&s, &caller, &name, &id, action, |st| {
        if body.enabled {
            st.key.disabled = None;
            st.key.auth_failures = 0;
            for g in st.models.values_mut() {
                g.disabled = None;
                g.auth_failures = 0;
            }
        } else {
            st.key.disabled = Some(format!("disabled by {by}"));
        }
    })
    .await
}

pub async fn reset(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    change_key(&s, &caller, &name, &id, "pool.key.reset", crate::pool::KeyStatus::reset).await
}

/// Change one key's state (admins), audit it, answer with the key as it is now.
async fn change_key(
    s: &AdminState,
    caller: &Caller,
    pool_name: &str,
    id: &str,
    action: &'static str,
    change: impl FnOnce(&mut crate::pool::KeyStatus),
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let pool = find_pool(s, pool_name)?;
    let key = find_key(&pool, id)?;
    pool.set_status(id, change);
    audit_write(s, caller, action, pool_name, id).await?;
    let interval = s.app.runtime.load().reprobe_interval(&pool.name);
    Ok(Json(key_json(&key, interval)))
}

pub async fn delete(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let pool = find_pool(&s, &name)?;
    let key = find_key(&pool, &id)?;
    if key.source == KeySource::Config {
        return Err(ApiError::Conflict(format!(
            "key {id} is listed in fastgate.yaml: remove it there and reload, or disable it here"
        )));
    }
    let (pool_name, key_id, actor) = (name.clone(), id.clone(), caller.username.clone());
    s.db(move |c| {
        store::pool_keys::delete(c, &pool_name, &key_id)?;
        store::admin_audit::record(
            c,
            &actor,
            "pool.key.delete",
            Some(&format!("{pool_name}/{key_id}")),
            None,
            None,
        )
    })
    .await?;
    pool.remove(&id);
    Ok(Json(json!({"deleted": id})))
}

pub async fn test(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let pool = find_pool(&s, &name)?;
    Ok(Json(json!(test_key(&s, &pool, &id).await?)))
}

/// Test one key through the first upstream that uses its pool.
async fn test_key(s: &AdminState, pool: &Arc<KeyPool>, id: &str) -> Result<forward::Probe, ApiError> {
    let upstream = s.app.runtime.load().pool_upstream(pool).ok_or_else(|| {
        ApiError::Conflict(format!(
            "no upstream uses pool {:?}; nothing to test against",
            pool.name
        ))
    })?;
    let lease = pool
        .lease_key(id)
        .ok_or_else(|| ApiError::NotFound(format!("no key {id:?} in pool {:?}", pool.name)))?;
    Ok(forward::probe(&s.app, &upstream, &lease).await)
}

async fn audit_write(
    s: &AdminState,
    caller: &Caller,
    action: &'static str,
    pool: &str,
    id: &str,
) -> Result<(), ApiError> {
    let (actor, target) = (caller.username.clone(), format!("{pool}/{id}"));
    s.db(move |c| store::admin_audit::record(c, &actor, action, Some(&target), None, None))
        .await
}

pub async fn upstreams(caller: Caller, State(s): State<Arc<AdminState>>) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let mut list = Value::Array(upstreams_json(&s.app.runtime.load()));
    // Endpoints written as `${VAR}` are shown so.
    super::routes::env_mask(&s).await?.mask_json(&mut list);
    Ok(Json(list))
}

/// Every upstream with its endpoints, addresses (and their health) and
/// in-flight count, by name.
pub fn upstreams_json(runtime: &crate::state::Runtime) -> Vec<Value> {
    let mut list: Vec<Value> = runtime
        .upstreams
        .values()
        .map(|u| {
            json!({
                "name": u.name,
                "provider": u.provider.name(),
                "endpoints": u.endpoints.iter().map(|e| format!("{}://{}{}", if e.tls { "https" } else { "http" }, e.authority, e.base_path)).collect::<Vec<_>>(),
                "addresses": u.addresses(),
                "resolved_addresses": u.backend_count(),
                "health_check_interval_s": u.health_interval.map(|d| d.as_secs_f64()),
                "key_pool": u.key_pool.as_ref().map(|p| p.name.clone()),
                "in_flight": u.in_flight(),
                "max_in_flight": u.max_in_flight,
            })
        })
        .collect();
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    list
}
