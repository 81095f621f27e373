//! The tables cluster mode keeps in Postgres (`users`, `gateway_keys`,
//! `pool_keys`), as generic rows: the node's SQLite copy stays what the data
//! plane and the admin API read and write; triggers queue every change in
//! `sync_outbox`.

use super::StoreError;
use rusqlite::{Connection, OptionalExtension, params, types::Value as SqlValue};
use serde_json::{Map, Value};

/// The synced tables.
pub const TABLES: [&str; 3] = ["users", "gateway_keys", "pool_keys"];

/// How a synced table names a row (the `id` in the outbox and the record),
/// and the columns of its primary key.
fn identity(tbl: &str) -> (&'static str, &'static [&'static str]) {
    match tbl {
        "pool_keys" => ("pool || '/' || key_id", &["pool", "key_id"]),
        _ => ("id", &["id"]),
    }
}

/// One row as JSON (`None`: deleted). Blobs travel as `{"hex": "…"}`.
pub type Row = Option<Map<String, Value>>;

fn table(name: &str) -> Result<&'static str, StoreError> {
    TABLES
        .iter()
        .find(|t| **t == name)
        .copied()
        .ok_or_else(|| StoreError::Invalid(format!("not a synced table: {name}")))
}

/// Queue changes (on) or stop queueing and forget the queue (off).
pub fn set_enabled(conn: &Connection, on: bool) -> Result<(), StoreError> {
    if on {
        conn.execute(
            "INSERT OR IGNORE INTO settings (name, value) VALUES ('cluster_sync', '1')",
            [],
        )?;
    } else {
        conn.execute("DELETE FROM settings WHERE name = 'cluster_sync'", [])?;
        conn.execute("DELETE FROM sync_outbox", [])?;
    }
    Ok(())
}

/// The oldest queued changes: (seq, table, id).
pub fn pending(conn: &Connection, limit: usize) -> Result<Vec<(i64, String, String)>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT seq, tbl, id FROM sync_outbox ORDER BY seq LIMIT ?1")?;
    let rows = stmt.query_map([limit as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Forget queued changes up to `seq` (sent).
pub fn sent(conn: &Connection, seq: i64) -> Result<(), StoreError> {
    conn.execute("DELETE FROM sync_outbox WHERE seq <= ?1", [seq])?;
    Ok(())
}

/// Every id of `tbl`.
pub fn ids(conn: &Connection, tbl: &str) -> Result<Vec<String>, StoreError> {
    let tbl = table(tbl)?;
    let mut stmt = conn.prepare(&format!("SELECT {} FROM {tbl}", identity(tbl).0))?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Row `id` of `tbl` as it is now.
pub fn row(conn: &Connection, tbl: &str, id: &str) -> Result<Row, StoreError> {
    let tbl = table(tbl)?;
    let mut stmt = conn.prepare_cached(&format!("SELECT * FROM {tbl} WHERE {} = ?1", identity(tbl).0))?;
    let names: Vec<String> = stmt.column_names().iter().map(|c| c.to_string()).collect();
    Ok(stmt
        .query_row([id], |r| {
            let mut map = Map::new();
            for (i, name) in names.iter().enumerate() {
                map.insert(name.clone(), to_json(r.get::<_, SqlValue>(i)?));
            }
            Ok(map)
        })
        .optional()?)
}

/// One audit row to ship: its identity, time and request id beside the
/// whole row.
#[derive(Debug)]
pub struct AuditRow {
    pub id: i64,
    pub ts_ms: i64,
    pub request_id: String,
    pub row: Map<String, Value>,
}

/// The append-only logs a node ships: the audit log and the admin audit.
pub const LOGS: [&str; 2] = ["audit_log", "admin_audit"];

/// Rows of the log `tbl` (one of [`LOGS`]) after id `after`, oldest first.
pub fn log_after(conn: &Connection, tbl: &str, after: i64, limit: usize) -> Result<Vec<AuditRow>, StoreError> {
    let tbl = LOGS
        .iter()
        .find(|t| **t == tbl)
        .ok_or_else(|| StoreError::Invalid(format!("not a shipped log: {tbl}")))?;
    let mut stmt = conn.prepare_cached(&format!("SELECT * FROM {tbl} WHERE id > ?1 ORDER BY id LIMIT ?2"))?;
    let names: Vec<String> = stmt.column_names().iter().map(|c| c.to_string()).collect();
    let rows = stmt.query_map(params![after, limit as i64], |r| {
        let mut map = Map::new();
        for (i, name) in names.iter().enumerate() {
            map.insert(name.clone(), log_json(r.get::<_, SqlValue>(i)?));
        }
        Ok(map)
    })?;
    let mut out = Vec::new();
    for row in rows {
        let row = row?;
        out.push(AuditRow {
            id: row.get("id").and_then(Value::as_i64).unwrap_or(0),
            ts_ms: row.get("ts_ms").and_then(Value::as_i64).unwrap_or(0),
            request_id: row.get("request_id").and_then(Value::as_str).unwrap_or("").to_string(),
            row,
        });
    }
    Ok(out)
}

/// Audit rows written but not shipped yet.
pub fn audit_unshipped(conn: &Connection, shipped: i64) -> Result<i64, StoreError> {
    // (The admin audit is small: its backlog is not worth a metric.)
    Ok(conn.query_row("SELECT count(*) FROM audit_log WHERE id > ?1", [shipped], |r| r.get(0))?)
}

/// A logged value for Postgres, which refuses NUL in `jsonb`: new audit
/// rows never hold one (`audit::fields`), rows written before that and the
/// admin audit's texts get `␀` (U+2400) instead, so no row stops the outbox.
fn log_json(v: SqlValue) -> Value {
    match v {
        SqlValue::Text(t) if t.contains('\0') => t.replace('\0', "\u{2400}").into(),
        v => to_json(v),
    }
}

fn to_json(v: SqlValue) -> Value {
    match v {
        SqlValue::Null => Value::Null,
        SqlValue::Integer(i) => i.into(),
        SqlValue::Real(f) => f.into(),
        SqlValue::Text(t) => t.into(),
        SqlValue::Blob(b) => serde_json::json!({ "hex": hex::encode(b) }),
    }
}

fn to_sql(v: &Value) -> SqlValue {
    match v {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Value::Number(n) => n
            .as_i64()
            .map_or_else(|| SqlValue::Real(n.as_f64().unwrap_or(0.0)), SqlValue::Integer),
        Value::String(s) => SqlValue::Text(s.clone()),
        Value::Object(o) => match o.get("hex").and_then(Value::as_str).and_then(|h| hex::decode(h).ok()) {
            Some(b) => SqlValue::Blob(b),
            None => SqlValue::Text(v.to_string()),
        },
        Value::Array(_) => SqlValue::Text(v.to_string()),
    }
}

/// Apply rows from the cluster's record in one transaction, without
/// queueing them to be sent back. The record wins: a local user with the
/// same name under another id (each node's first admin) gives way.
pub fn apply(conn: &mut Connection, rows: &[(String, String, Row)]) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    let before: i64 = tx.query_row("SELECT coalesce(max(seq), 0) FROM sync_outbox", [], |r| r.get(0))?;
    for (tbl, id, row) in rows {
        let tbl = table(tbl)?;
        let (name_expr, key_cols) = identity(tbl);
        let Some(row) = row else {
            tx.execute(&format!("DELETE FROM {tbl} WHERE {name_expr} = ?1"), [id])?;
            continue;
        };
        if tbl == "users"
            && let Some(name) = row.get("username").and_then(Value::as_str)
        {
            tx.execute("DELETE FROM users WHERE username = ?1 AND id <> ?2", params![name, id])?;
        }
        // Only columns this node's schema has (a peer may run a newer one).
        let have: Vec<String> = {
            let mut stmt = tx.prepare_cached(&format!("SELECT name FROM pragma_table_info('{tbl}')"))?;
            let names = stmt.query_map([], |r| r.get::<_, String>(0))?;
            names.collect::<Result<_, _>>()?
        };
        let cols: Vec<&String> = row.keys().filter(|c| have.contains(c)).collect();
        if !key_cols.iter().all(|k| cols.iter().any(|c| c.as_str() == *k)) {
            return Err(StoreError::Invalid(format!("{tbl} row without its key")));
        }
        let names = cols.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ");
        let marks = (1..=cols.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ");
        let updates = cols
            .iter()
            .filter(|c| !key_cols.contains(&c.as_str()))
            .map(|c| format!("\"{c}\" = excluded.\"{c}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let target = key_cols.join(", ");
        let sql =
            format!("INSERT INTO {tbl} ({names}) VALUES ({marks}) ON CONFLICT ({target}) DO UPDATE SET {updates}");
        let values: Vec<SqlValue> = cols.iter().map(|c| to_sql(&row[c.as_str()])).collect();
        tx.execute(&sql, rusqlite::params_from_iter(values))?;
    }
    tx.execute("DELETE FROM sync_outbox WHERE seq > ?1", [before])?;
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_log_rows_hold_no_nul() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = super::super::open(&dir.path().join("a.db")).unwrap();
        let row = crate::store::audit::AuditRecord {
            request_id: "r1".into(),
            model: Some("m\0x".into()),
            ..Default::default()
        };
        crate::store::audit::insert_batch(&mut conn, &[row]).unwrap();
        let shipped = log_after(&conn, "audit_log", 0, 10).unwrap();
        assert_eq!(shipped[0].row["model"], "m\u{2400}x");
    }

    #[test]
    fn changes_are_queued_only_while_enabled_and_applied_rows_are_not_queued_back() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::open(&dir.path().join("a.db")).unwrap();
        conn.execute(
            "INSERT INTO users (id, username, password_hash, role, created_at) VALUES ('u1', 'ann', 'h', 'user', 1)",
            [],
        )
        .unwrap();
        assert!(pending(&conn, 10).unwrap().is_empty(), "off: nothing queued");
        set_enabled(&conn, true).unwrap();
        conn.execute("UPDATE users SET role = 'admin' WHERE id = 'u1'", [])
            .unwrap();
        let queued = pending(&conn, 10).unwrap();
        assert_eq!(queued.len(), 1);
        assert_eq!((queued[0].1.as_str(), queued[0].2.as_str()), ("users", "u1"));
        let ann = row(&conn, "users", "u1").unwrap().unwrap();
        assert_eq!(ann["role"], "admin");
        sent(&conn, queued[0].0).unwrap();

        // Another node's copy of the table: the record wins, nothing echoes.
        let mut other = super::super::open(&dir.path().join("b.db")).unwrap();
        set_enabled(&other, true).unwrap();
        other
            .execute(
                "INSERT INTO users (id, username, password_hash, role, created_at) VALUES ('u0', 'ann', 'x', 'user', 1)",
                [],
            )
            .unwrap();
        let before = pending(&other, 10).unwrap().len();
        apply(&mut other, &[("users".into(), "u1".into(), Some(ann))]).unwrap();
        assert_eq!(
            pending(&other, 10).unwrap().len(),
            before,
            "applied rows are not sent back"
        );
        assert_eq!(ids(&other, "users").unwrap(), vec!["u1".to_string()]);
        assert_eq!(row(&other, "users", "u1").unwrap().unwrap()["role"], "admin");
        // Pool keys are named pool/key_id.
        conn.execute(
            "INSERT INTO pool_keys (pool, key_id, secret, weight, added_by, created_at) VALUES ('p', 'k_1', 'sealed', 1, 'ann', 1)",
            [],
        )
        .unwrap();
        let queued = pending(&conn, 10).unwrap();
        assert_eq!((queued[0].1.as_str(), queued[0].2.as_str()), ("pool_keys", "p/k_1"));
        let key = row(&conn, "pool_keys", "p/k_1").unwrap();
        assert_eq!(ids(&conn, "pool_keys").unwrap(), vec!["p/k_1".to_string()]);
        apply(&mut other, &[("pool_keys".into(), "p/k_1".into(), key.clone())]).unwrap();
        apply(&mut other, &[("pool_keys".into(), "p/k_1".into(), key)]).unwrap();
        assert_eq!(row(&other, "pool_keys", "p/k_1").unwrap().unwrap()["secret"], "sealed");
        apply(&mut other, &[("pool_keys".into(), "p/k_1".into(), None)]).unwrap();
        assert!(ids(&other, "pool_keys").unwrap().is_empty());

        apply(&mut other, &[("users".into(), "u1".into(), None)]).unwrap();
        assert!(row(&other, "users", "u1").unwrap().is_none());
        assert!(apply(&mut other, &[("audit_log".into(), "1".into(), None)]).is_err());
    }
}
