//! The audit log table: one row per proxied request.

use super::StoreError;
use rusqlite::{Connection, params};
use serde::Serialize;

/// One request as recorded. Never holds a secret: keys appear by id,
/// captured headers and paths are redacted before they get here.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct AuditRecord {
    pub request_id: String,
    /// Request start, Unix milliseconds (UTC).
    pub ts_ms: i64,
    pub key_id: Option<String>,
    pub owner: Option<String>,
    pub route: Option<String>,
    pub upstream: Option<String>,
    pub endpoint: Option<String>,
    pub upstream_key_id: Option<String>,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub model: Option<String>,
    pub stream: bool,
    pub ttfb_ms: Option<f64>,
    pub duration_ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub chunks: u64,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub retries: u32,
    pub error: Option<String>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub request_headers: Option<String>,
    pub response_headers: Option<String>,
    pub request_body: Option<String>,
    pub response_body: Option<String>,
}

/// Insert `records` in one transaction.
pub fn insert_batch(conn: &mut Connection, records: &[AuditRecord]) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO audit_log (request_id, ts_ms, key_id, owner, route, upstream, endpoint,
                upstream_key_id, method, path, status, model, stream, ttfb_ms, duration_ms,
                request_bytes, response_bytes, chunks, prompt_tokens, completion_tokens, retries,
                error, client_ip, user_agent, request_headers, response_headers, request_body,
                response_body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28)",
        )?;
        for r in records {
            stmt.execute(params![
                r.request_id,
                r.ts_ms,
                r.key_id,
                r.owner,
                r.route,
                r.upstream,
                r.endpoint,
                r.upstream_key_id,
                r.method,
                r.path,
                r.status,
                r.model,
                r.stream,
                r.ttfb_ms,
                r.duration_ms,
                r.request_bytes as i64,
                r.response_bytes as i64,
                r.chunks as i64,
                r.prompt_tokens.map(|t| t as i64),
                r.completion_tokens.map(|t| t as i64),
                r.retries,
                r.error,
                r.client_ip,
                r.user_agent,
                r.request_headers,
                r.response_headers,
                r.request_body,
                r.response_body,
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Delete rows older than `cutoff_ms`; returns how many.
pub fn delete_before(conn: &Connection, cutoff_ms: i64) -> Result<usize, StoreError> {
    Ok(conn.execute("DELETE FROM audit_log WHERE ts_ms < ?1", [cutoff_ms])?)
}

/// Every row, oldest first (tests and small exports).
pub fn all(conn: &Connection) -> Result<Vec<AuditRecord>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT request_id, ts_ms, key_id, owner, route, upstream, endpoint, upstream_key_id,
            method, path, status, model, stream, ttfb_ms, duration_ms, request_bytes,
            response_bytes, chunks, prompt_tokens, completion_tokens, retries, error, client_ip,
            user_agent, request_headers, response_headers, request_body, response_body
         FROM audit_log ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(AuditRecord {
            request_id: r.get(0)?,
            ts_ms: r.get(1)?,
            key_id: r.get(2)?,
            owner: r.get(3)?,
            route: r.get(4)?,
            upstream: r.get(5)?,
            endpoint: r.get(6)?,
            upstream_key_id: r.get(7)?,
            method: r.get(8)?,
            path: r.get(9)?,
            status: r.get(10)?,
            model: r.get(11)?,
            stream: r.get(12)?,
            ttfb_ms: r.get(13)?,
            duration_ms: r.get(14)?,
            request_bytes: r.get::<_, i64>(15)? as u64,
            response_bytes: r.get::<_, i64>(16)? as u64,
            chunks: r.get::<_, i64>(17)? as u64,
            prompt_tokens: r.get::<_, Option<i64>>(18)?.map(|t| t as u64),
            completion_tokens: r.get::<_, Option<i64>>(19)?.map(|t| t as u64),
            retries: r.get(20)?,
            error: r.get(21)?,
            client_ip: r.get(22)?,
            user_agent: r.get(23)?,
            request_headers: r.get(24)?,
            response_headers: r.get(25)?,
            request_body: r.get(26)?,
            response_body: r.get(27)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_roundtrip_and_retention() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = super::super::open(&dir.path().join("a.db")).unwrap();
        let rec = |id: &str, ts: i64| AuditRecord {
            request_id: id.into(),
            ts_ms: ts,
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            status: 200,
            prompt_tokens: Some(3),
            ..Default::default()
        };
        insert_batch(&mut conn, &[rec("a", 1_000), rec("b", 5_000)]).unwrap();
        let rows = all(&conn).unwrap();
        assert_eq!(rows, vec![rec("a", 1_000), rec("b", 5_000)]);
        assert_eq!(delete_before(&conn, 2_000).unwrap(), 1);
        assert_eq!(all(&conn).unwrap().len(), 1);
    }
}
