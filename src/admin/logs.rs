//! `/api/logs`: the audit log, filtered and paged by id (keyset). Users see
//! only requests made with their own keys; `/api/audit` (admins) lists admin
//! actions.

use super::{AdminState, error::ApiError, session::Caller};
use crate::store::{
    self,
    admin_audit::AdminEvent,
    audit::{LogFilter, LogRow},
};
use axum::{
    Json,
    extract::{Path, Query, State},
};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

pub async fn list(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Query(mut filter): Query<LogFilter>,
) -> Result<Json<Value>, ApiError> {
    if !caller.is_admin() {
        filter.owner = Some(caller.username.clone());
    }
    let (items, next) = s.db(move |c| store::audit::query(c, &filter)).await?;
    Ok(Json(json!({"items": items, "next_cursor": next})))
}

pub async fn get(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path(id): Path<i64>,
) -> Result<Json<LogRow>, ApiError> {
    let row = s.db(move |c| store::audit::get(c, id)).await?;
    if !caller.is_admin() && row.record.owner.as_deref() != Some(caller.username.as_str()) {
        return Err(ApiError::NotFound(format!("no log entry with id {id}")));
    }
    Ok(Json(row))
}

#[derive(Deserialize)]
pub struct EventsQuery {
    limit: Option<u32>,
}

pub async fn admin_events(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Query(q): Query<EventsQuery>,
) -> Result<Json<Vec<AdminEvent>>, ApiError> {
    caller.require_admin()?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    Ok(Json(s.db(move |c| store::admin_audit::list(c, limit)).await?))
}
