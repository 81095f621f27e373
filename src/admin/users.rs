//! `/api/users`: admins manage accounts; anyone may change their own password.

use super::{AdminState, error::ApiError, session::Caller};
use crate::store::{
    self,
    users::{Role, User},
};
use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

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
    let actor = caller.username.clone();
    let user = s
        .db(move |c| {
            let user = store::users::create(c, &body.username, &body.password, body.role)?;
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
    role: Option<Role>,
}

pub async fn update(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path(id): Path<String>,
    Json(body): Json<UserPatch>,
) -> Result<Json<User>, ApiError> {
    let own = caller.user_id == id;
    if !caller.is_admin() && (!own || body.role.is_some()) {
        return Err(ApiError::Forbidden);
    }
    let actor = caller.username.clone();
    let user = s
        .db(move |c| {
            let before = store::users::get(c, &id)?;
            if let Some(p) = &body.password {
                store::users::set_password(c, &id, p)?;
            }
            if let Some(r) = body.role {
                store::users::set_role(c, &id, r)?;
            }
            let after = store::users::get(c, &id)?;
            let what = json!({"password_changed": body.password.is_some(), "role": after.role});
            store::admin_audit::record(c, &actor, "user.update", Some(&id), Some(&json!(before)), Some(&what))?;
            Ok(after)
        })
        .await?;
    Ok(Json(user))
}

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
        let user = store::users::delete(c, &id)?;
        store::admin_audit::record(c, &actor, "user.delete", Some(&id), Some(&json!(user)), None)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
