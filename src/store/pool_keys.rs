//! Pool keys added at run time (sealed) and the saved state of every pool
//! key, so cooldowns, disabled keys and totals survive a restart.

use super::StoreError;
use crate::{
    pool::{KeyStatus, Totals},
    seal::Sealer,
};
use rusqlite::{Connection, params};

/// An admin-added key, opened.
#[derive(Debug, Clone)]
pub struct StoredKey {
    pub pool: String,
    pub key_id: String,
    pub secret: String,
    pub weight: u32,
}

/// The name a sealed pool key is bound to (it cannot be moved to another pool).
fn seal_name(pool: &str, key_id: &str) -> String {
    format!("pool_key:{pool}:{key_id}")
}

/// Store a new key sealed; refused without a master key.
pub fn insert(
    conn: &Connection,
    sealer: &Sealer,
    pool: &str,
    key_id: &str,
    secret: &str,
    weight: u32,
    added_by: &str,
) -> Result<bool, StoreError> {
    if !sealer.enabled() {
        return Err(StoreError::Denied(
            "adding pool keys through the API needs secrets.master_key (FASTGATE_MASTER_KEY) to encrypt them; keys in fastgate.yaml still work".into(),
        ));
    }
    let sealed = sealer.seal(&seal_name(pool, key_id), secret);
    let n = conn.execute(
        "INSERT OR IGNORE INTO pool_keys (pool, key_id, secret, weight, added_by, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![pool, key_id, sealed, weight, added_by, crate::clock::now_unix()],
    )?;
    Ok(n == 1)
}

pub fn delete(conn: &Connection, pool: &str, key_id: &str) -> Result<bool, StoreError> {
    conn.execute(
        "DELETE FROM pool_key_state WHERE pool = ?1 AND key_id = ?2",
        params![pool, key_id],
    )?;
    Ok(conn.execute(
        "DELETE FROM pool_keys WHERE pool = ?1 AND key_id = ?2",
        params![pool, key_id],
    )? == 1)
}

/// Every stored key that opens with `sealer`; the others are reported
/// (logged by the caller) and skipped.
pub fn load(conn: &Connection, sealer: &Sealer) -> Result<(Vec<StoredKey>, Vec<String>), StoreError> {
    let mut stmt = conn.prepare("SELECT pool, key_id, secret, weight FROM pool_keys ORDER BY created_at, key_id")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, u32>(3)?,
        ))
    })?;
    let mut keys = Vec::new();
    let mut problems = Vec::new();
    for row in rows {
        let (pool, key_id, stored, weight) = row?;
        match sealer.open(&seal_name(&pool, &key_id), &stored) {
            Ok(secret) => keys.push(StoredKey {
                pool,
                key_id,
                secret,
                weight,
            }),
            Err(e) => problems.push(format!("pool {pool} key {key_id}: {e}")),
        }
    }
    Ok((keys, problems))
}

/// One key's saved state.
#[derive(Debug, Clone)]
pub struct SavedState {
    pub pool: String,
    pub key_id: String,
    pub status: KeyStatus,
    pub totals: Totals,
}

/// Write states in one transaction.
pub fn save_states(conn: &mut Connection, states: &[SavedState]) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO pool_key_state (pool, key_id, status, requests, errors, tokens, last_used_ms, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(pool, key_id) DO UPDATE SET status = excluded.status, requests = excluded.requests,
                errors = excluded.errors, tokens = excluded.tokens, last_used_ms = excluded.last_used_ms,
                updated_ms = excluded.updated_ms",
        )?;
        let now = crate::clock::now_ms();
        for s in states {
            let status = serde_json::to_string(&s.status).unwrap_or_else(|_| "{}".into());
            stmt.execute(params![
                s.pool,
                s.key_id,
                status,
                s.totals.requests as i64,
                s.totals.errors as i64,
                s.totals.tokens as i64,
                s.totals.last_used_ms,
                now
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

pub fn load_states(conn: &Connection) -> Result<Vec<SavedState>, StoreError> {
    let mut stmt =
        conn.prepare("SELECT pool, key_id, status, requests, errors, tokens, last_used_ms FROM pool_key_state")?;
    let rows = stmt.query_map([], |r| {
        Ok(SavedState {
            pool: r.get(0)?,
            key_id: r.get(1)?,
            status: serde_json::from_str(&r.get::<_, String>(2)?).unwrap_or_default(),
            totals: Totals {
                requests: r.get::<_, i64>(3)?.max(0) as u64,
                errors: r.get::<_, i64>(4)?.max(0) as u64,
                tokens: r.get::<_, i64>(5)?.max(0) as u64,
                last_used_ms: r.get(6)?,
            },
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
