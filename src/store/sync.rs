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
                map.insert(name.clone(), pg_json(owned(r.get_ref(i)?)));
            }
            Ok(map)
        })
        .optional()?)
}

/// A column's value; text that is not UTF-8 (SQLite stores what it is
/// given) is read lossily rather than failing the whole read, so one such
/// row cannot stop a sender.
fn owned(v: rusqlite::types::ValueRef<'_>) -> SqlValue {
    use rusqlite::types::ValueRef as R;
    match v {
        R::Null => SqlValue::Null,
        R::Integer(i) => SqlValue::Integer(i),
        R::Real(f) => SqlValue::Real(f),
        R::Text(t) => SqlValue::Text(String::from_utf8_lossy(t).into_owned()),
        R::Blob(b) => SqlValue::Blob(b.to_vec()),
    }
}

/// The record revision row `id` of `tbl` was last in step with (0: never).
pub fn base(conn: &Connection, tbl: &str, id: &str) -> Result<i64, StoreError> {
    Ok(conn
        .query_row(
            "SELECT revision FROM sync_base WHERE tbl = ?1 AND id = ?2",
            [tbl, id],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0))
}

fn set_base(conn: &Connection, tbl: &str, id: &str, revision: i64) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO sync_base (tbl, id, revision) VALUES (?1, ?2, ?3)
         ON CONFLICT (tbl, id) DO UPDATE SET revision = max(revision, excluded.revision)",
        params![tbl, id, revision],
    )?;
    Ok(())
}

/// Whether a local change to the row waits in the outbox.
fn is_pending(conn: &Connection, tbl: &str, id: &str) -> Result<bool, StoreError> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM sync_outbox WHERE tbl = ?1 AND id = ?2 LIMIT 1",
            [tbl, id],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
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
            map.insert(name.clone(), pg_json(owned(r.get_ref(i)?)));
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

/// A value for Postgres, which refuses NUL in `jsonb`: new audit rows and
/// names never hold one (`audit::fields`, `store::fields`); rows written
/// before that, by hand or restored from a backup get `␀` (U+2400)
/// instead, so no such row stops the outbox or holds back a revocation
/// made on it (a key disabled whose old name holds a NUL).
fn pg_json(v: SqlValue) -> Value {
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

/// One row from the cluster's record.
#[derive(Debug, Clone)]
pub struct Change {
    pub tbl: String,
    pub id: String,
    pub row: Row,
    pub revision: i64,
    /// Written by this node: its copy already is the record's; only the
    /// revision is noted.
    pub own: bool,
}

/// Apply rows from the cluster's record in one transaction, without
/// queueing them to be sent back; returns how many rows were written. A
/// row with a local change still in the outbox is left alone: that change
/// is sent with its base revision and resolved against this one
/// ([`resolve`]), never overwritten here. The record wins otherwise: a
/// local user with the same name under another id (each node's first
/// admin) gives way.
pub fn apply(conn: &mut Connection, changes: &[Change]) -> Result<usize, StoreError> {
    let tx = conn.transaction()?;
    let before: i64 = tx.query_row("SELECT coalesce(max(seq), 0) FROM sync_outbox", [], |r| r.get(0))?;
    let mut written = 0;
    for c in changes {
        let tbl = table(&c.tbl)?;
        if is_pending(&tx, tbl, &c.id)? {
            continue;
        }
        set_base(&tx, tbl, &c.id, c.revision)?;
        if !c.own {
            if tbl == "users"
                && let Some(row) = &c.row
                && loses_username(&tx, &c.id, row)?
            {
                tracing::warn!(
                    user = %c.id,
                    "Two users were made with one name on nodes apart from each other: the one made first keeps it; this one is not applied."
                );
                continue;
            }
            write_row(&tx, tbl, &c.id, &c.row)?;
            written += 1;
        }
    }
    tx.execute("DELETE FROM sync_outbox WHERE seq > ?1", [before])?;
    tx.commit()?;
    Ok(written)
}

/// Whether a user row from the record loses its username to a local user
/// that is in the record too: two users made with one name on nodes that
/// were apart. The one made first (`created_at`, then id) keeps the name on
/// every node, whatever order the rows arrive in. A local user the record
/// has never seen (each node's first admin) still gives way to the record.
fn loses_username(tx: &Connection, id: &str, row: &Map<String, Value>) -> Result<bool, StoreError> {
    let Some(name) = row.get("username").and_then(Value::as_str) else {
        return Ok(false);
    };
    let created = row.get("created_at").and_then(Value::as_i64).unwrap_or(i64::MAX);
    let holder: Option<(String, i64)> = tx
        .query_row(
            "SELECT u.id, u.created_at FROM users u JOIN sync_base b ON b.tbl = 'users' AND b.id = u.id
             WHERE u.username = ?1 AND u.id <> ?2",
            params![name, id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(holder.is_some_and(|(holder, holder_created)| (holder_created, holder.as_str()) < (created, id)))
}

/// What became of one sent row: the record's revision for it now, and the
/// row it holds when that differs from the one sent (a conflict resolved).
#[derive(Debug, Clone)]
pub struct Pushed {
    pub tbl: String,
    pub id: String,
    pub revision: i64,
    pub merged: Option<Row>,
}

/// After a push: forget the outbox up to `seq`, note each row's revision,
/// and take the record's row where a conflict changed it (unless a newer
/// local change waits: it goes out next, resolved again). Returns whether
/// any row was written.
pub fn pushed(conn: &mut Connection, seq: i64, rows: &[Pushed]) -> Result<bool, StoreError> {
    let tx = conn.transaction()?;
    tx.execute("DELETE FROM sync_outbox WHERE seq <= ?1", [seq])?;
    let before: i64 = tx.query_row("SELECT coalesce(max(seq), 0) FROM sync_outbox", [], |r| r.get(0))?;
    let mut written = false;
    for p in rows {
        let tbl = table(&p.tbl)?;
        if is_pending(&tx, tbl, &p.id)? {
            continue;
        }
        set_base(&tx, tbl, &p.id, p.revision)?;
        if let Some(row) = &p.merged {
            write_row(&tx, tbl, &p.id, row)?;
            written = true;
        }
    }
    tx.execute("DELETE FROM sync_outbox WHERE seq > ?1", [before])?;
    tx.commit()?;
    Ok(written)
}

/// Note the revision of rows this node sent first (nothing was pending).
pub fn note_bases(conn: &mut Connection, rows: &[(String, String, i64)]) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    for (tbl, id, revision) in rows {
        set_base(&tx, table(tbl)?, id, *revision)?;
    }
    tx.commit()?;
    Ok(())
}

/// The conflict rule, when a row was changed in the record after the
/// revision a local change was based on: a stop always wins. A deletion on
/// either side deletes; otherwise the later change's row is kept, with every
/// stop the record holds carried over: a revoked key stays revoked, a
/// disabled key or user stays disabled, the earlier expiry stays, sessions
/// ended stay ended (`token_version`), and admin locks add up.
pub fn resolve(tbl: &str, record: &Row, edit: &Row) -> Row {
    let (Some(rec), Some(edit)) = (record, edit) else {
        return None;
    };
    let mut out = edit.clone();
    let int = |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_i64);
    match tbl {
        "gateway_keys" => {
            if let Some(t) = int(rec, "revoked_at") {
                let keep = int(&out, "revoked_at").map_or(t, |o| o.min(t));
                out.insert("revoked_at".into(), keep.into());
            }
            if int(rec, "enabled") == Some(0) {
                out.insert("enabled".into(), 0.into());
            }
            if let Some(t) = int(rec, "expires_at") {
                let keep = int(&out, "expires_at").map_or(t, |o| o.min(t));
                out.insert("expires_at".into(), keep.into());
            }
            let locks = |m: &Map<String, Value>| -> Vec<String> {
                m.get("admin_locked")
                    .and_then(Value::as_str)
                    .and_then(|t| serde_json::from_str(t).ok())
                    .unwrap_or_default()
            };
            let mut all = locks(&out);
            for l in locks(rec) {
                if !all.contains(&l) {
                    all.push(l);
                }
            }
            if let Ok(text) = serde_json::to_string(&all) {
                out.insert("admin_locked".into(), text.into());
            }
        }
        "users" => {
            for k in ["disabled", "token_version"] {
                if let Some(r) = int(rec, k) {
                    let keep = int(&out, k).map_or(r, |o| o.max(r));
                    out.insert(k.into(), keep.into());
                }
            }
        }
        _ => {}
    }
    Some(out)
}

/// Write the record's copy of one row (`None`: delete it).
fn write_row(tx: &Connection, tbl: &'static str, id: &str, row: &Row) -> Result<(), StoreError> {
    let (name_expr, key_cols) = identity(tbl);
    let Some(row) = row else {
        tx.execute(&format!("DELETE FROM {tbl} WHERE {name_expr} = ?1"), [id])?;
        return Ok(());
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
    let sql = format!("INSERT INTO {tbl} ({names}) VALUES ({marks}) ON CONFLICT ({target}) DO UPDATE SET {updates}");
    let values: Vec<SqlValue> = cols.iter().map(|c| to_sql(&row[c.as_str()])).collect();
    tx.execute(&sql, rusqlite::params_from_iter(values))?;
    Ok(())
}

/// One row Postgres refused, kept aside with the reason.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Quarantined {
    pub id: i64,
    pub ts_ms: i64,
    /// `record`, `audit` or `admin_audit`.
    pub kind: String,
    pub table: String,
    pub row_id: String,
    pub error: String,
}

/// Keep a refused row aside (with its JSON when given) so the rest flows.
pub fn quarantine(
    conn: &Connection,
    kind: &str,
    tbl: &str,
    row_id: &str,
    error: &str,
    row: Option<&Value>,
) -> Result<(), StoreError> {
    let ts_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    conn.execute(
        "INSERT INTO sync_quarantine (ts_ms, kind, tbl, row_id, error, row) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![ts_ms, kind, tbl, row_id, error, row.map(Value::to_string)],
    )?;
    Ok(())
}

/// A `sync_quarantine` row read as `id, ts_ms, kind, tbl, row_id, error`.
fn quarantined_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Quarantined> {
    Ok(Quarantined {
        id: r.get(0)?,
        ts_ms: r.get(1)?,
        kind: r.get(2)?,
        table: r.get(3)?,
        row_id: r.get(4)?,
        error: r.get(5)?,
    })
}

/// Remove one row kept aside (the operator fixed it at its source, or
/// gave it up); the row itself leaves with it. Returns what was removed.
pub fn forget_quarantined(conn: &Connection, id: i64) -> Result<Quarantined, StoreError> {
    let q = conn
        .query_row(
            "DELETE FROM sync_quarantine WHERE id = ?1 RETURNING id, ts_ms, kind, tbl, row_id, error",
            [id],
            quarantined_row,
        )
        .optional()?;
    q.ok_or_else(|| StoreError::NotFound(format!("no quarantined row {id}")))
}

/// The rows kept aside, newest first.
pub fn quarantined(conn: &Connection, limit: usize) -> Result<Vec<Quarantined>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT id, ts_ms, kind, tbl, row_id, error FROM sync_quarantine ORDER BY id DESC LIMIT ?1")?;
    let rows = stmt.query_map([limit as i64], quarantined_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ch(tbl: &str, id: &str, row: Row) -> Change {
        Change {
            tbl: tbl.into(),
            id: id.into(),
            row,
            revision: 1,
            own: false,
        }
    }

    #[test]
    fn one_username_made_on_two_nodes_apart_goes_to_the_first_made_everywhere() {
        let dir = tempfile::tempdir().unwrap();
        let user = |id: &str, created: i64| {
            let mut m = Map::new();
            for (k, v) in [
                ("id", json!(id)),
                ("username", json!("twin")),
                ("password_hash", json!(format!("h-{id}"))),
                ("role", json!("user")),
                ("created_at", json!(created)),
            ] {
                m.insert(k.into(), v);
            }
            Some(m)
        };
        // `ua` was made first (on A), `ub` later (on B); B's reached the
        // record first (revision 201), A's second (203).
        let change = |id: &str, created: i64, revision: i64, own: bool| Change {
            tbl: "users".into(),
            id: id.into(),
            row: user(id, created),
            revision,
            own,
        };
        let node = |name: &str, local: Option<(&str, i64, i64)>| {
            let mut conn = super::super::open(&dir.path().join(name)).unwrap();
            set_enabled(&conn, true).unwrap();
            if let Some((id, created, revision)) = local {
                write_row(&conn, "users", id, &user(id, created)).unwrap();
                set_base(&conn, "users", id, revision).unwrap();
            }
            let own = |id: &str| local.is_some_and(|l| l.0 == id);
            apply(
                &mut conn,
                &[change("ub", 2, 201, own("ub")), change("ua", 1, 203, own("ua"))],
            )
            .unwrap();
            ids(&conn, "users").unwrap()
        };
        assert_eq!(node("a.db", Some(("ua", 1, 203))), vec!["ua".to_string()]);
        assert_eq!(node("b.db", Some(("ub", 2, 201))), vec!["ua".to_string()]);
        assert_eq!(node("c.db", None), vec!["ua".to_string()]);
    }

    #[test]
    fn a_row_with_a_pending_local_change_is_not_overwritten_by_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = super::super::open(&dir.path().join("a.db")).unwrap();
        set_enabled(&conn, true).unwrap();
        conn.execute(
            "INSERT INTO users (id, username, password_hash, role, created_at) VALUES ('u1', 'ann', 'h', 'user', 1)",
            [],
        )
        .unwrap();
        let queued = pending(&conn, 10).unwrap();
        sent(&conn, queued[0].0).unwrap();
        let ann = row(&conn, "users", "u1").unwrap();
        apply(
            &mut conn,
            &[Change {
                revision: 7,
                ..ch("users", "u1", ann)
            }],
        )
        .unwrap();
        assert_eq!(base(&conn, "users", "u1").unwrap(), 7);
        // Deleted here while the record still has it: the deletion waits in
        // the outbox, and a pull does not bring the row back.
        conn.execute("DELETE FROM users WHERE id = 'u1'", []).unwrap();
        let mut old = serde_json::Map::new();
        for (k, v) in [
            ("id", "u1"),
            ("username", "ann"),
            ("password_hash", "h"),
            ("role", "user"),
        ] {
            old.insert(k.into(), v.into());
        }
        old.insert("created_at".into(), 1.into());
        assert_eq!(
            apply(
                &mut conn,
                &[Change {
                    revision: 9,
                    ..ch("users", "u1", Some(old))
                }]
            )
            .unwrap(),
            0
        );
        assert!(row(&conn, "users", "u1").unwrap().is_none());
        assert_eq!(base(&conn, "users", "u1").unwrap(), 7, "the change keeps its base");
        assert_eq!(pending(&conn, 10).unwrap().len(), 1);
    }

    #[test]
    fn on_a_conflict_a_stop_wins() {
        let obj = |v: serde_json::Value| v.as_object().cloned();
        let rec = obj(
            serde_json::json!({"id": "k", "name": "a", "enabled": 0, "revoked_at": 5, "expires_at": 100, "admin_locked": "[\"enabled\"]"}),
        );
        let edit = obj(
            serde_json::json!({"id": "k", "name": "b", "enabled": 1, "revoked_at": null, "expires_at": null, "admin_locked": "[]"}),
        );
        let out = resolve("gateway_keys", &rec, &edit).unwrap();
        assert_eq!(out["name"], "b", "the edit's other fields are kept");
        assert_eq!(
            (
                out["enabled"].as_i64(),
                out["revoked_at"].as_i64(),
                out["expires_at"].as_i64()
            ),
            (Some(0), Some(5), Some(100))
        );
        assert_eq!(out["admin_locked"], "[\"enabled\"]");
        assert!(
            resolve("gateway_keys", &None, &edit).is_none(),
            "deleted in the record: stays deleted"
        );
        assert!(resolve("gateway_keys", &rec, &None).is_none(), "deleted here: deleted");
        let user = obj(serde_json::json!({"id": "u", "disabled": 1, "token_version": 4}));
        let edit = obj(serde_json::json!({"id": "u", "disabled": 0, "token_version": 2, "role": "admin"}));
        let out = resolve("users", &user, &edit).unwrap();
        assert_eq!(
            (out["disabled"].as_i64(), out["token_version"].as_i64()),
            (Some(1), Some(4))
        );
        assert_eq!(out["role"], "admin");
    }

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
        apply(&mut other, &[ch("users", "u1", Some(ann))]).unwrap();
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
        apply(&mut other, &[ch("pool_keys", "p/k_1", key.clone())]).unwrap();
        apply(&mut other, &[ch("pool_keys", "p/k_1", key)]).unwrap();
        assert_eq!(row(&other, "pool_keys", "p/k_1").unwrap().unwrap()["secret"], "sealed");
        apply(&mut other, &[ch("pool_keys", "p/k_1", None)]).unwrap();
        assert!(ids(&other, "pool_keys").unwrap().is_empty());

        apply(&mut other, &[ch("users", "u1", None)]).unwrap();
        assert!(row(&other, "users", "u1").unwrap().is_none());
        assert!(apply(&mut other, &[ch("audit_log", "1", None)]).is_err());
    }
}
