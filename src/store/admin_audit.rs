//! Who changed what through the admin API (or CLI), and when. Secrets never
//! enter: callers pass masked before/after values.

use super::StoreError;
use rusqlite::{Connection, params};
use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AdminEvent {
    pub id: i64,
    pub ts_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

pub fn record(
    conn: &Connection,
    actor: &str,
    action: &str,
    target: Option<&str>,
    before: Option<&serde_json::Value>,
    after: Option<&serde_json::Value>,
) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO admin_audit (ts_ms, actor, action, target, before, after) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            crate::clock::now_ms(),
            actor,
            action,
            target,
            before.map(|v| v.to_string()),
            after.map(|v| v.to_string())
        ],
    )?;
    Ok(())
}

/// An event as shipped to the cluster's list (the SQLite row as JSON), under
/// the cluster-wide `id`.
pub fn from_shipped(id: i64, row: &serde_json::Value) -> AdminEvent {
    let text = |k: &str| row.get(k).and_then(serde_json::Value::as_str).map(str::to_string);
    let parse = |k: &str| text(k).and_then(|s| serde_json::from_str(&s).ok());
    AdminEvent {
        id,
        ts_ms: row.get("ts_ms").and_then(serde_json::Value::as_i64).unwrap_or(0),
        actor: text("actor").unwrap_or_default(),
        action: text("action").unwrap_or_default(),
        target: text("target"),
        before: parse("before"),
        after: parse("after"),
    }
}

pub fn list(conn: &Connection, limit: u32) -> Result<Vec<AdminEvent>, StoreError> {
    let mut stmt = conn
        .prepare("SELECT id, ts_ms, actor, action, target, before, after FROM admin_audit ORDER BY id DESC LIMIT ?1")?;
    let parse = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
    let rows = stmt.query_map([limit], |r| {
        Ok(AdminEvent {
            id: r.get(0)?,
            ts_ms: r.get(1)?,
            actor: r.get(2)?,
            action: r.get(3)?,
            target: r.get(4)?,
            before: parse(r.get(5)?),
            after: parse(r.get(6)?),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
