//! `/api/keys`: gateway keys. Users see and manage only keys they own (by
//! user id), within the ceilings an admin set for them (permission tags only
//! those the ceiling names: none without one), up to
//! `admin.max_keys_per_user` of them, and cannot undo an admin's decision on
//! their key: a limit, a disabled key, an expiry (which they may only bring
//! closer). Admins manage every key. Changes reach the data plane at once.

use super::{AdminState, error::ApiError, session::Caller};
use crate::store::{
    self,
    keys::{GatewayKey, KeyPatch, NewKey},
};
use axum::{
    Json,
    extract::{Path, Query, State},
    http::StatusCode,
};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

fn may_use(caller: &Caller, key: &GatewayKey) -> Result<(), ApiError> {
    if caller.is_admin() || key.owner_id.as_deref() == Some(caller.user_id.as_str()) {
        Ok(())
    } else {
        // Not 403: do not confirm that someone else's key exists.
        Err(ApiError::NotFound(format!("no gateway key with id {:?}", key.id)))
    }
}

#[derive(Deserialize)]
pub struct ListQuery {
    owner: Option<String>,
}

pub async fn list(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<GatewayKey>>, ApiError> {
    let keys = s.db(store::keys::list).await?;
    Ok(Json(
        keys.into_iter()
            .filter(|k| {
                if caller.is_admin() {
                    q.owner.as_ref().is_none_or(|o| &k.owner == o)
                } else {
                    k.owner_id.as_deref() == Some(caller.user_id.as_str())
                }
            })
            .collect(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    name: String,
    /// Admins may create keys for anyone; users always own what they create.
    owner: Option<String>,
    #[serde(default)]
    permissions: Vec<String>,
    #[serde(default)]
    allowed_routes: Vec<String>,
    #[serde(default)]
    allowed_models: Vec<String>,
    expires_at: Option<i64>,
    rpm: Option<u64>,
    tpm: Option<u64>,
    token_quota: Option<u64>,
    #[serde(default)]
    quota_period: store::keys::QuotaPeriod,
    budget: Option<crate::budget::Budget>,
}

pub async fn create(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Json(body): Json<CreateKey>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if !caller.is_admin() && body.owner.as_ref().is_some_and(|o| o != &caller.username) {
        return Err(ApiError::Forbidden);
    }
    for g in &body.allowed_models {
        globset::Glob::new(g).map_err(|e| ApiError::Invalid(format!("allowed_models: {e}")))?;
    }
    let mut new = NewKey {
        name: body.name,
        owner: body.owner.unwrap_or_else(|| caller.username.clone()),
        permissions: body.permissions,
        allowed_routes: body.allowed_routes,
        allowed_models: body.allowed_models,
        expires_at: body.expires_at,
        rpm: body.rpm,
        tpm: body.tpm,
        token_quota: body.token_quota,
        quota_period: body.quota_period,
        budget: body.budget,
        owner_id: None,
        admin_locked: Vec::new(),
    };
    if caller.is_admin() {
        new.lock_limits();
    }
    let actor = caller.username.clone();
    let as_user = !caller.is_admin();
    let max_keys = s.app.config.file.admin.max_keys_per_user;
    let (key, secret) = s
        .db(move |c| {
            let owner = store::users::find_by_name(c, &new.owner)?;
            new.owner_id = owner.as_ref().map(|u| u.id.clone());
            if as_user && let Some(owner) = &owner {
                if store::keys::count_owned(c, &owner.id)? >= max_keys {
                    return Err(store::StoreError::Denied(format!(
                        "you have {max_keys} keys, the most a user may hold (admin.max_keys_per_user); delete one first"
                    )));
                }
                let none = store::users::Ceilings::default();
                let ceilings = owner.ceilings.as_ref().unwrap_or(&none);
                ceilings
                    .fit(new.limits_mut(), true)
                    .map_err(store::StoreError::Denied)?;
            }
            let (key, secret) = store::keys::create(c, &new)?;
            store::admin_audit::record(c, &actor, "key.create", Some(&key.id), None, Some(&json!(key)))?;
            Ok((key, secret))
        })
        .await?;
    s.refresh_keys().await;
    let mut out = json!(key);
    out["secret"] = Value::String(secret);
    Ok((StatusCode::CREATED, Json(out)))
}

async fn load(s: &AdminState, caller: &Caller, id: String) -> Result<GatewayKey, ApiError> {
    let key = s.db(move |c| store::keys::get(c, &id)).await?;
    may_use(caller, &key)?;
    Ok(key)
}

pub async fn get(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> Result<Json<GatewayKey>, ApiError> {
    Ok(Json(load(&s, &caller, id).await?))
}

pub async fn update(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path(id): Path<String>,
    Json(patch): Json<KeyPatch>,
) -> Result<Json<GatewayKey>, ApiError> {
    let before = load(&s, &caller, id.clone()).await?;
    let changed = store::keys::limit_fields(&patch);
    if !caller.is_admin() {
        if let Some(f) = changed.iter().find(|f| before.is_locked(f)) {
            return Err(ApiError::Denied(format!(
                "{f} on this key was set by an admin; ask an admin to change it"
            )));
        }
        if let Some(why) = before.owner_may_not(&patch) {
            return Err(ApiError::Denied(why));
        }
    }
    let actor = caller.username.clone();
    let as_user = !caller.is_admin();
    let key = s
        .db(move |c| {
            let mut key = store::keys::get(c, &id)?;
            if as_user && let Some(why) = key.owner_may_not(&patch) {
                // Checked again under the lock: an admin may have just acted.
                return Err(store::StoreError::Denied(why));
            }
            store::keys::apply(&mut key, &patch)?;
            if as_user {
                let owner = key.owner_id.as_deref().map(|o| store::users::get(c, o)).transpose()?;
                if let Some(owner) = &owner {
                    let none = store::users::Ceilings::default();
                    let ceilings = owner.ceilings.as_ref().unwrap_or(&none);
                    ceilings
                        .fit(key.limits_mut(), patch.permissions.is_some())
                        .map_err(store::StoreError::Denied)?;
                }
            } else {
                key.lock_decisions(&patch);
                for f in &changed {
                    if !key.admin_locked.iter().any(|l| l == f) {
                        key.admin_locked.push(f.to_string());
                    }
                }
            }
            store::keys::save(c, &key)?;
            store::admin_audit::record(
                c,
                &actor,
                "key.update",
                Some(&id),
                Some(&json!(before)),
                Some(&json!(key)),
            )?;
            Ok(key)
        })
        .await?;
    s.refresh_keys().await;
    Ok(Json(key))
}

pub async fn delete(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    load(&s, &caller, id.clone()).await?;
    let actor = caller.username.clone();
    s.db(move |c| {
        let key = store::keys::delete(c, &id)?;
        store::admin_audit::record(c, &actor, "key.delete", Some(&id), Some(&json!(key)), None)
    })
    .await?;
    s.refresh_keys().await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    /// How long the old secret keeps working (`10m`); default: it stops at once.
    grace_period: Option<String>,
}

pub async fn rotate(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path(id): Path<String>,
    body: Option<Json<RotateBody>>,
) -> Result<Json<Value>, ApiError> {
    load(&s, &caller, id.clone()).await?;
    let grace = match body.and_then(|Json(b)| b.grace_period) {
        Some(g) => humantime::parse_duration(&g)
            .map_err(|e| ApiError::Invalid(format!("grace_period: {e}")))?
            .as_secs()
            .try_into()
            .unwrap_or(i64::MAX),
        None => 0,
    };
    let actor = caller.username.clone();
    let (key, secret) = s
        .db(move |c| {
            let (key, secret) = store::keys::rotate(c, &id, grace)?;
            let what = json!({"masked": key.masked, "grace_period_s": grace});
            store::admin_audit::record(c, &actor, "key.rotate", Some(&id), None, Some(&what))?;
            Ok((key, secret))
        })
        .await?;
    s.refresh_keys().await;
    let mut out = json!(key);
    out["secret"] = Value::String(secret);
    Ok(Json(out))
}

#[derive(Deserialize)]
pub struct UsageQuery {
    /// `24h` by default.
    window: Option<String>,
}

/// Requests, errors and tokens of one key, from the audit log.
pub async fn usage(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path(id): Path<String>,
    Query(q): Query<UsageQuery>,
) -> Result<Json<Value>, ApiError> {
    let key = load(&s, &caller, id.clone()).await?;
    let window = match q.window.as_deref() {
        Some(w) => humantime::parse_duration(w).map_err(|e| ApiError::Invalid(format!("window: {e}")))?,
        None => std::time::Duration::from_secs(24 * 3600),
    };
    let since = crate::clock::now_ms() - window.as_millis() as i64;
    let rows = super::cluster_log::read_log(
        &s,
        |d| {
            let sql = format!(
                "SELECT COUNT(*), CAST(COALESCE({}, 0) AS BIGINT), CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT),
                    CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT), COALESCE(SUM(cost), 0.0)
                 FROM {} WHERE key_id = {} AND ts_ms >= {}",
                super::stats::ERRORS,
                d.table(),
                d.mark(1),
                d.mark(2)
            );
            (
                sql,
                vec![store::audit::Arg::Text(id.clone()), store::audit::Arg::Int(since)],
            )
        },
        |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, f64>(4)?,
            ))
        },
        |r| {
            (
                r.get::<_, i64>(0),
                r.get::<_, i64>(1),
                r.get::<_, i64>(2),
                r.get::<_, i64>(3),
                r.get::<_, f64>(4),
            )
        },
    )
    .await?;
    let row = rows.first().copied().unwrap_or_default();
    let budget = match key.budget {
        Some(b) => budget_use(&s, "key_id", &key.id, &b).await?,
        None => Value::Null,
    };
    let owner_budget = match key.owner_id.clone() {
        Some(user_id) => {
            let user = s.db({
                let user_id = user_id.clone();
                move |c| store::users::get(c, &user_id)
            });
            match user.await.ok().and_then(|u| u.ceilings).and_then(|c| c.budget) {
                Some(b) => budget_use(&s, "user_id", &user_id, &b).await?,
                None => Value::Null,
            }
        }
        None => Value::Null,
    };
    Ok(Json(json!({
        "window_s": window.as_secs(),
        "requests": row.0,
        "errors": row.1,
        "prompt_tokens": row.2,
        "completion_tokens": row.3,
        "cost": row.4,
        "budget": budget,
        "owner_budget": owner_budget,
    })))
}

/// A budget's use in its current period, from the audit log (the whole
/// cluster's, in cluster mode): `{amount, period, spent, resets_at}`.
pub async fn budget_use(
    s: &Arc<AdminState>,
    column: &'static str,
    value: &str,
    budget: &crate::budget::Budget,
) -> Result<Value, ApiError> {
    let (start, end) = budget.period.bounds(crate::clock::now_ms());
    let value = value.to_string();
    let rows = super::cluster_log::read_log(
        s,
        |d| {
            let sql = format!(
                "SELECT COALESCE(SUM(cost), 0.0) FROM {} WHERE {column} = {} AND ts_ms >= {}",
                d.table(),
                d.mark(1),
                d.mark(2)
            );
            (
                sql,
                vec![store::audit::Arg::Text(value.clone()), store::audit::Arg::Int(start)],
            )
        },
        |r| r.get::<_, f64>(0),
        |r| r.get::<_, f64>(0),
    )
    .await?;
    Ok(json!({
        "amount": budget.amount,
        "period": budget.period.as_str(),
        "spent": rows.first().copied().unwrap_or(0.0),
        "resets_at": (end != i64::MAX).then_some(end),
    }))
}
