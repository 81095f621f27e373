//! `/api/users`: admins manage accounts; anyone may change their own password.
//! Passwords are hashed and checked through the session's password gate
//! (a few argon2 runs at a time), off the database lock; a wrong
//! `current_password` counts like a failed login.

use super::{AdminState, error::ApiError, session::Caller};
use crate::store::{
    self,
    users::{Ceilings, Role, User},
};
use axum::{
    Json,
    extract::{ConnectInfo, Path, State},
    http::{HeaderMap, StatusCode},
};
use serde::Deserialize;
use serde_json::json;
use std::{net::SocketAddr, sync::Arc};

pub async fn list(caller: Caller, State(s): State<Arc<AdminState>>) -> Result<Json<Vec<User>>, ApiError> {
    caller.require_admin()?;
    Ok(Json(s.db(store::users::list).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    username: String,
    password: String,
    #[serde(default = "default_role")]
    role: Role,
    ceilings: Option<Ceilings>,
}

fn default_role() -> Role {
    Role::User
}

pub async fn create(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Json(body): Json<NewUser>,
) -> Result<(StatusCode, Json<User>), ApiError> {
    caller.require_admin()?;
    store::users::check_new(&body.username, &body.password)?;
    if let Some(c) = &body.ceilings {
        c.validate()?;
    }
    let hash = s.throttle.passwords(&s).hash(body.password.clone()).await?;
    let actor = caller.username.clone();
    let user = s
        .db(move |c| {
            let mut user = store::users::create_hashed(c, &body.username, &hash, body.role)?;
            if let Some(ceilings) = &body.ceilings {
                store::users::set_ceilings(c, &user.id, Some(ceilings))?;
                user.ceilings = Some(ceilings.clone());
            }
            store::admin_audit::record(c, &actor, "user.create", Some(&user.id), None, Some(&json!(user)))?;
            Ok(user)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(user)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    password: Option<String>,
    /// Required to change your own password.
    current_password: Option<String>,
    role: Option<Role>,
    disabled: Option<bool>,
    /// `null` removes the ceilings.
    #[serde(default, deserialize_with = "present")]
    ceilings: Option<Option<Ceilings>>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<Ceilings>>, D::Error> {
    <Option<Ceilings> as serde::Deserialize>::deserialize(d).map(Some)
}

pub async fn update(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(body): Json<UserPatch>,
) -> Result<Json<User>, ApiError> {
    let own = caller.user_id == id;
    let admin_fields = body.role.is_some() || body.disabled.is_some() || body.ceilings.is_some();
    if !caller.is_admin() && (!own || admin_fields) {
        return Err(ApiError::Forbidden);
    }
    if own && (body.disabled == Some(true) || body.role == Some(Role::User)) && caller.is_admin() {
        return Err(ApiError::Invalid("you cannot disable or demote yourself".into()));
    }
    if let Some(p) = &body.password {
        store::fields::password(p, store::users::MIN_PASSWORD)?;
    }
    if let Some(Some(c)) = &body.ceilings {
        c.validate()?;
    }
    if own && body.password.is_some() {
        // Whoever holds a session must still prove they know the password:
        // counted per user and per address before argon2 runs.
        let current = body
            .current_password
            .clone()
            .ok_or_else(|| ApiError::Invalid("current_password is required to change your password".into()))?;
        let client = super::session::client_of(&s, Some(peer), &headers);
        if !s.throttle.check_password(&s, &caller.user_id, &client, current).await? {
            tracing::warn!(user_id = %caller.user_id, ip = %client, "Wrong current_password.");
            return Err(ApiError::Denied("current_password is wrong".into()));
        }
    }
    let hash = match &body.password {
        Some(p) => Some(s.throttle.passwords(&s).hash(p.clone()).await?),
        None => None,
    };
    let actor = caller.username.clone();
    let user = s
        .db(move |c| {
            let before = store::users::get(c, &id)?;
            if let Some(h) = &hash {
                store::users::set_password_hash(c, &id, h)?;
            }
            if let Some(r) = body.role {
                store::users::set_role(c, &id, r)?;
            }
            if let Some(d) = body.disabled {
                store::users::set_disabled(c, &id, d)?;
            }
            if let Some(ceilings) = &body.ceilings {
                store::users::set_ceilings(c, &id, ceilings.as_ref())?;
            }
            let after = store::users::get(c, &id)?;
            let what = json!({
                "password_changed": body.password.is_some(),
                "role": after.role,
                "disabled": after.disabled,
                "ceilings": after.ceilings,
            });
            store::admin_audit::record(c, &actor, "user.update", Some(&id), Some(&json!(before)), Some(&what))?;
            Ok(after)
        })
        .await?;
    s.refresh_keys().await;
    Ok(Json(user))
}

/// Delete a user: their keys are revoked and their sessions end at once.
pub async fn delete(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_admin()?;
    if caller.user_id == id {
        return Err(ApiError::Invalid("you cannot delete yourself".into()));
    }
    let actor = caller.username.clone();
    s.db(move |c| {
        let (user, revoked) = store::users::delete(c, &id)?;
        let what = json!({"keys_revoked": revoked});
        store::admin_audit::record(c, &actor, "user.delete", Some(&id), Some(&json!(user)), Some(&what))
    })
    .await?;
    s.refresh_keys().await;
    Ok(StatusCode::NO_CONTENT)
}
