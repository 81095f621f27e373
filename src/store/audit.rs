//! The audit log table: one row per proxied request.

use super::StoreError;
use rusqlite::{Connection, params, types::ValueRef};
use serde::{Deserialize, Serialize};

/// One request as recorded. Never holds a secret: keys appear by id,
/// captured headers and paths are redacted before they get here.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AuditRecord {
    pub request_id: String,
    /// Request start, Unix milliseconds (UTC).
    pub ts_ms: i64,
    pub key_id: Option<String>,
    pub owner: Option<String>,
    /// The id of the user who owns the key (what visibility is decided on).
    pub user_id: Option<String>,
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
    /// The tokens above are FastGate's estimate, not the provider's report:
    /// the request ended without usage (client hang-up, cut stream) and was
    /// charged its prompt estimate plus the output seen (docs/resilience.md).
    #[serde(default)]
    pub usage_estimated: bool,
    pub retries: u32,
    /// Every attempt of a request that failed over: `upstream address key
    /// outcome`, separated by `; ` (keys by id, never the secret).
    #[serde(default)]
    pub attempts: Option<String>,
    pub error: Option<String>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub request_headers: Option<String>,
    pub response_headers: Option<String>,
    pub request_body: Option<String>,
    pub response_body: Option<String>,
    /// The shares of `prompt_tokens` read from and written to the
    /// provider's prompt cache, and of `completion_tokens` spent reasoning.
    #[serde(default)]
    pub cache_read_tokens: Option<u64>,
    #[serde(default)]
    pub cache_write_tokens: Option<u64>,
    #[serde(default)]
    pub reasoning_tokens: Option<u64>,
    /// What the request cost in the price table's currency (`pricing`);
    /// `None` when no price matched its model (unpriced).
    #[serde(default)]
    pub cost: Option<f64>,
    /// The price table the cost is from (`builtin/<date>`, `config/<version>`).
    #[serde(default)]
    pub price_version: Option<String>,
}

/// [`AuditRecord`] by reference: what the request path encodes (no name
/// cloned) and the indexer decodes (no string allocated). The field order
/// is the segment files' wire format (`audit::entry`): keep it the same as
/// [`AuditRecord`]'s (a test holds them together).
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AuditEntry<'a> {
    pub request_id: &'a str,
    pub ts_ms: i64,
    #[serde(borrow)]
    pub key_id: Option<&'a str>,
    #[serde(borrow)]
    pub owner: Option<&'a str>,
    #[serde(borrow)]
    pub user_id: Option<&'a str>,
    #[serde(borrow)]
    pub route: Option<&'a str>,
    #[serde(borrow)]
    pub upstream: Option<&'a str>,
    #[serde(borrow)]
    pub endpoint: Option<&'a str>,
    #[serde(borrow)]
    pub upstream_key_id: Option<&'a str>,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    #[serde(borrow)]
    pub model: Option<&'a str>,
    pub stream: bool,
    pub ttfb_ms: Option<f64>,
    pub duration_ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub chunks: u64,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub usage_estimated: bool,
    pub retries: u32,
    #[serde(borrow)]
    pub attempts: Option<&'a str>,
    #[serde(borrow)]
    pub error: Option<&'a str>,
    #[serde(borrow)]
    pub client_ip: Option<&'a str>,
    #[serde(borrow)]
    pub user_agent: Option<&'a str>,
    #[serde(borrow)]
    pub request_headers: Option<&'a str>,
    #[serde(borrow)]
    pub response_headers: Option<&'a str>,
    #[serde(borrow)]
    pub request_body: Option<&'a str>,
    #[serde(borrow)]
    pub response_body: Option<&'a str>,
    // Format 2: the fields below are appended, each an `Option` (so a
    // format-1 record reads as format 2 with them absent: `audit::entry`).
    pub cache_read_tokens: Option<u64>,
    pub cache_write_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
    pub cost: Option<f64>,
    #[serde(borrow)]
    pub price_version: Option<&'a str>,
}

impl AuditEntry<'_> {
    /// Whether the row captured any header or body text.
    pub fn has_captured(&self) -> bool {
        self.request_headers.is_some()
            || self.response_headers.is_some()
            || self.request_body.is_some()
            || self.response_body.is_some()
    }
}

impl<'a> From<&'a AuditRecord> for AuditEntry<'a> {
    fn from(r: &'a AuditRecord) -> Self {
        AuditEntry {
            request_id: &r.request_id,
            ts_ms: r.ts_ms,
            key_id: r.key_id.as_deref(),
            owner: r.owner.as_deref(),
            user_id: r.user_id.as_deref(),
            route: r.route.as_deref(),
            upstream: r.upstream.as_deref(),
            endpoint: r.endpoint.as_deref(),
            upstream_key_id: r.upstream_key_id.as_deref(),
            method: &r.method,
            path: &r.path,
            status: r.status,
            model: r.model.as_deref(),
            stream: r.stream,
            ttfb_ms: r.ttfb_ms,
            duration_ms: r.duration_ms,
            request_bytes: r.request_bytes,
            response_bytes: r.response_bytes,
            chunks: r.chunks,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            usage_estimated: r.usage_estimated,
            retries: r.retries,
            attempts: r.attempts.as_deref(),
            error: r.error.as_deref(),
            client_ip: r.client_ip.as_deref(),
            user_agent: r.user_agent.as_deref(),
            request_headers: r.request_headers.as_deref(),
            response_headers: r.response_headers.as_deref(),
            request_body: r.request_body.as_deref(),
            response_body: r.response_body.as_deref(),
            cache_read_tokens: r.cache_read_tokens,
            cache_write_tokens: r.cache_write_tokens,
            reasoning_tokens: r.reasoning_tokens,
            cost: r.cost,
            price_version: r.price_version.as_deref(),
        }
    }
}

/// Where a batch's captured headers and bodies stay instead of in the
/// rows: one segment file (`<stream>/<segment>`, `audit::captured`) and
/// each row's record offset in it.
#[derive(Debug, Clone, Copy)]
pub struct CapturedIn<'a> {
    pub file: &'a str,
    pub offsets: &'a [u64],
}

/// Insert `records` in one transaction, captured texts in the rows.
pub fn insert_batch(conn: &mut Connection, records: &[AuditRecord]) -> Result<(), StoreError> {
    let entries: Vec<AuditEntry<'_>> = records.iter().map(AuditEntry::from).collect();
    insert_batch_with(conn, &entries, None, |_| Ok(()))
}

/// Insert `records` and run `also` in one transaction: both or neither.
/// With `captured`, a row's headers and bodies are left where it says and
/// the row points there.
pub fn insert_batch_with(
    conn: &mut Connection,
    records: &[AuditEntry<'_>],
    captured: Option<CapturedIn<'_>>,
    also: impl FnOnce(&Connection) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO audit_log (request_id, ts_ms, key_id, owner, route, upstream, endpoint,
                upstream_key_id, method, path, status, model, stream, ttfb_ms, duration_ms,
                request_bytes, response_bytes, chunks, prompt_tokens, completion_tokens, retries,
                error, client_ip, user_agent, request_headers, response_headers, request_body,
                response_body, user_id, attempts, usage_estimated, captured_in, captured_at,
                cache_read_tokens, cache_write_tokens, reasoning_tokens, cost, price_version)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31, ?32, ?33,
                ?34, ?35, ?36, ?37, ?38)",
        )?;
        for (i, r) in records.iter().enumerate() {
            let at = captured
                .filter(|_| r.has_captured())
                .and_then(|c| Some((c.file, *c.offsets.get(i)?)));
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
                r.request_headers.filter(|_| at.is_none()),
                r.response_headers.filter(|_| at.is_none()),
                r.request_body.filter(|_| at.is_none()),
                r.response_body.filter(|_| at.is_none()),
                r.user_id,
                r.attempts,
                r.usage_estimated,
                at.map(|(f, _)| f),
                at.map(|(_, o)| o as i64),
                r.cache_read_tokens.map(|t| t.min(i64::MAX as u64) as i64),
                r.cache_write_tokens.map(|t| t.min(i64::MAX as u64) as i64),
                r.reasoning_tokens.map(|t| t.min(i64::MAX as u64) as i64),
                r.cost.filter(|c| c.is_finite()),
                r.price_version,
            ])?;
        }
    }
    super::rollup::add(&tx, records)?;
    also(&tx)?;
    tx.commit()?;
    Ok(())
}

/// Delete at most `batch` of the oldest rows before `cutoff_ms` (a short
/// write lock, however large the backlog); returns how many.
pub fn delete_before(conn: &Connection, cutoff_ms: i64, batch: usize) -> Result<usize, StoreError> {
    Ok(conn.execute(
        "DELETE FROM audit_log WHERE id IN
            (SELECT id FROM audit_log WHERE ts_ms < ?1 ORDER BY ts_ms LIMIT ?2)",
        params![cutoff_ms, batch as i64],
    )?)
}

/// Bytes of the database in use: its pages minus the free ones (which
/// SQLite reuses before growing the file).
pub fn used_bytes(conn: &Connection) -> Result<u64, StoreError> {
    let pragma = |name: &str| conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0));
    let pages = pragma("page_count")? - pragma("freelist_count")?;
    Ok(pages.max(0) as u64 * pragma("page_size")?.max(0) as u64)
}

/// About how many audit rows there are (the id span: exact without gaps,
/// and read from the ends of the primary key rather than counted).
pub fn rows_estimate(conn: &Connection) -> Result<u64, StoreError> {
    let (lo, hi): (Option<i64>, Option<i64>) = conn.query_row("SELECT min(id), max(id) FROM audit_log", [], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })?;
    Ok(match (lo, hi) {
        (Some(lo), Some(hi)) => (hi - lo + 1).max(0) as u64,
        _ => 0,
    })
}

/// The request time of the oldest row, if any.
pub fn oldest_ts(conn: &Connection) -> Result<Option<i64>, StoreError> {
    Ok(conn.query_row("SELECT min(ts_ms) FROM audit_log", [], |r| r.get(0))?)
}

/// The segment (`captured_in`) of the oldest row that points into one.
pub fn oldest_captured_in(conn: &Connection) -> Result<Option<String>, StoreError> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .query_row(
            "SELECT captured_in FROM audit_log WHERE typeof(captured_in) = 'text' ORDER BY id LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?)
}

/// Delete the `n` oldest rows (by id, the order they were written);
/// returns how many.
pub fn delete_oldest(conn: &Connection, n: usize) -> Result<usize, StoreError> {
    Ok(conn.execute(
        "DELETE FROM audit_log WHERE id IN (SELECT id FROM audit_log ORDER BY id LIMIT ?1)",
        [n as i64],
    )?)
}

const SELECT: &str = "SELECT id, request_id, ts_ms, key_id, owner, route, upstream, endpoint,
    upstream_key_id, method, path, status, model, stream, ttfb_ms, duration_ms, request_bytes,
    response_bytes, chunks, prompt_tokens, completion_tokens, retries, error, client_ip, user_agent,
    request_headers, response_headers, request_body, response_body, user_id, attempts, usage_estimated,
    captured_in, captured_at, cache_read_tokens, cache_write_tokens, reasoning_tokens, cost, price_version
    FROM audit_log";

/// A stored row: its id (the pagination cursor) and the record.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LogRow {
    pub id: i64,
    #[serde(flatten)]
    pub record: AuditRecord,
    /// Where the row's captured headers and bodies are kept (a segment
    /// file and the record's offset), when not in the row itself; read
    /// by `audit::captured::fill`.
    #[serde(skip)]
    pub captured: Option<(String, u64)>,
}

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LogRow> {
    Ok(LogRow {
        id: r.get(0)?,
        record: AuditRecord {
            request_id: r.get(1)?,
            ts_ms: r.get(2)?,
            key_id: r.get(3)?,
            owner: r.get(4)?,
            route: r.get(5)?,
            upstream: r.get(6)?,
            endpoint: r.get(7)?,
            upstream_key_id: r.get(8)?,
            method: r.get(9)?,
            path: r.get(10)?,
            status: r.get(11)?,
            model: r.get(12)?,
            stream: r.get(13)?,
            ttfb_ms: r.get(14)?,
            duration_ms: r.get(15)?,
            request_bytes: r.get::<_, i64>(16)? as u64,
            response_bytes: r.get::<_, i64>(17)? as u64,
            chunks: r.get::<_, i64>(18)? as u64,
            prompt_tokens: r.get::<_, Option<i64>>(19)?.map(|t| t as u64),
            completion_tokens: r.get::<_, Option<i64>>(20)?.map(|t| t as u64),
            retries: r.get(21)?,
            error: r.get(22)?,
            client_ip: r.get(23)?,
            user_agent: r.get(24)?,
            request_headers: r.get(25)?,
            response_headers: r.get(26)?,
            request_body: r.get(27)?,
            response_body: r.get(28)?,
            user_id: r.get(29)?,
            attempts: r.get(30)?,
            usage_estimated: r.get(31)?,
            cache_read_tokens: r.get::<_, Option<i64>>(34)?.map(|t| t.max(0) as u64),
            cache_write_tokens: r.get::<_, Option<i64>>(35)?.map(|t| t.max(0) as u64),
            reasoning_tokens: r.get::<_, Option<i64>>(36)?.map(|t| t.max(0) as u64),
            cost: r.get(37)?,
            price_version: r.get(38)?,
        },
        // Anything but what the indexer writes (a hand edit) points nowhere.
        captured: match (r.get_ref(32)?, r.get_ref(33)?) {
            (ValueRef::Text(file), ValueRef::Integer(at)) if at >= 0 => {
                std::str::from_utf8(file).ok().map(|f| (f.to_owned(), at as u64))
            }
            _ => None,
        },
    })
}

/// Every row, oldest first (tests and small exports); the captured texts a
/// segment keeps are read by `audit::captured::CapturedStore::all`.
pub fn all_rows(conn: &Connection) -> Result<Vec<LogRow>, StoreError> {
    let mut stmt = conn.prepare(&format!("{SELECT} ORDER BY id"))?;
    let rows = stmt.query_map([], from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Filters of `GET /api/logs`; every one optional.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFilter {
    /// Unix milliseconds, inclusive.
    pub from: Option<i64>,
    /// Unix milliseconds, exclusive.
    pub to: Option<i64>,
    pub status: Option<u16>,
    pub key_id: Option<String>,
    pub owner: Option<String>,
    /// Set by the server for callers who may only see their own rows.
    #[serde(skip)]
    pub user_id: Option<String>,
    pub route: Option<String>,
    pub model: Option<String>,
    pub upstream: Option<String>,
    /// A path prefix.
    pub path: Option<String>,
    pub method: Option<String>,
    pub stream: Option<bool>,
    pub request_id: Option<String>,
    pub min_ms: Option<f64>,
    /// Rows per page (default 100, at most 1000).
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<i64>,
    /// `csv` or `ndjson`; read by the export endpoint only.
    pub format: Option<String>,
}

/// A value bound to a filter's placeholder.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Int(i64),
    Real(f64),
    Text(String),
}

impl From<Arg> for rusqlite::types::Value {
    fn from(a: Arg) -> Self {
        match a {
            Arg::Int(i) => Self::Integer(i),
            Arg::Real(f) => Self::Real(f),
            Arg::Text(t) => Self::Text(t),
        }
    }
}

/// `f` as a `WHERE` clause (`1 = 1 AND …`) over the audit columns, with
/// placeholders made by `mark` (`?1` for SQLite, `$1` for Postgres: the
/// cluster's log has the same columns), and its arguments.
pub fn filter_clause(f: &LogFilter, mark: impl Fn(usize) -> String) -> (String, Vec<Arg>) {
    use Arg as V;
    let mut sql = String::from("1 = 1");
    let mut args: Vec<V> = Vec::new();
    let mut push_with = |clause: &str, v: V, tail: &str| {
        args.push(v);
        sql.push_str(&format!(" AND {clause} {}{tail}", mark(args.len())));
    };
    if let Some(v) = f.from {
        push_with("ts_ms >=", V::Int(v), "");
    }
    if let Some(v) = f.to {
        push_with("ts_ms <", V::Int(v), "");
    }
    if let Some(v) = f.status {
        push_with("status =", V::Int(i64::from(v)), "");
    }
    for (col, v) in [
        ("key_id", &f.key_id),
        ("owner", &f.owner),
        ("user_id", &f.user_id),
        ("route", &f.route),
        ("model", &f.model),
        ("upstream", &f.upstream),
        ("method", &f.method),
        ("request_id", &f.request_id),
    ] {
        if let Some(v) = v {
            push_with(&format!("{col} ="), V::Text(v.clone()), "");
        }
    }
    if let Some(v) = f.stream {
        push_with("stream =", V::Int(i64::from(v)), "");
    }
    if let Some(v) = f.min_ms {
        push_with("duration_ms >=", V::Real(v), "");
    }
    if let Some(p) = &f.path {
        // A case-sensitive prefix match, character for character, on both
        // stores: no LIKE (case-insensitive in SQLite, case-sensitive in
        // Postgres), no wildcards. The cast names the parameter's type for
        // Postgres.
        args.push(V::Text(p.clone()));
        let m = mark(args.len());
        sql.push_str(&format!(
            " AND substr(path, 1, length(CAST({m} AS TEXT))) = CAST({m} AS TEXT)"
        ));
    }
    (sql, args)
}

/// Rows per page a filter asks for (default 100, at most 1000).
pub fn page_size(f: &LogFilter) -> usize {
    f.limit.unwrap_or(100).clamp(1, 1000) as usize
}

/// Cut a page fetched with one row too many; returns the next cursor.
pub fn paginate(rows: &mut Vec<LogRow>, limit: usize) -> Option<i64> {
    if rows.len() <= limit {
        return None;
    }
    rows.truncate(limit);
    rows.last().map(|r| r.id)
}

/// The SQL of one page, newest first by `id_col`, for `f`: `select` (up to
/// its `FROM`) with the filters, the cursor and one row more than the page
/// (to know whether another follows). Returns the SQL, its arguments and
/// the page size.
pub fn page_sql(
    f: &LogFilter,
    select: &str,
    id_col: &str,
    mark: impl Fn(usize) -> String,
) -> (String, Vec<Arg>, usize) {
    let (clause, mut args) = filter_clause(f, &mark);
    let mut sql = format!("{select} WHERE {clause}");
    if let Some(v) = f.cursor {
        args.push(Arg::Int(v));
        sql.push_str(&format!(" AND {id_col} < {}", mark(args.len())));
    }
    let limit = page_size(f);
    sql.push_str(&format!(" ORDER BY {id_col} DESC LIMIT {}", limit + 1));
    (sql, args, limit)
}

/// Newest first, one page. Returns the rows and the cursor of the next page.
pub fn query(conn: &Connection, f: &LogFilter) -> Result<(Vec<LogRow>, Option<i64>), StoreError> {
    let (sql, args, limit) = page_sql(f, SELECT, "id", |n| format!("?{n}"));
    let mut stmt = conn.prepare(&sql)?;
    let args = args.into_iter().map(rusqlite::types::Value::from);
    let mut rows: Vec<LogRow> = stmt
        .query_map(rusqlite::params_from_iter(args), from_row)?
        .collect::<Result<_, _>>()?;
    let next = paginate(&mut rows, limit);
    Ok((rows, next))
}

/// A row as shipped to the cluster's log (the SQLite row as JSON).
pub fn from_shipped(mut row: serde_json::Value) -> Option<AuditRecord> {
    // SQLite's booleans travel as 0/1 (a row shipped before a column
    // existed lacks it: false).
    for flag in ["stream", "usage_estimated"] {
        let on = row.get(flag).and_then(serde_json::Value::as_i64).unwrap_or(0) != 0;
        row[flag] = on.into();
    }
    serde_json::from_value(row).ok()
}

/// One row by id.
pub fn get(conn: &Connection, id: i64) -> Result<LogRow, StoreError> {
    use rusqlite::OptionalExtension;
    conn.query_row(&format!("{SELECT} WHERE id = ?1"), [id], from_row)
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("no log entry with id {id}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(conn: &Connection) -> Result<Vec<AuditRecord>, StoreError> {
        Ok(all_rows(conn)?.into_iter().map(|r| r.record).collect())
    }

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
        let page = query(
            &conn,
            &LogFilter {
                limit: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(page.0[0].record.request_id, "b");
        let next = query(
            &conn,
            &LogFilter {
                limit: Some(1),
                cursor: page.1,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((next.0[0].record.request_id.as_str(), next.1), ("a", None));
        let by_path = query(
            &conn,
            &LogFilter {
                path: Some("/v1/chat".into()),
                from: Some(2_000),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(by_path.0.len(), 1);
        assert!(
            query(
                &conn,
                &LogFilter {
                    path: Some("/v1%".into()),
                    ..Default::default()
                }
            )
            .unwrap()
            .0
            .is_empty()
        );
        assert_eq!(get(&conn, page.0[0].id).unwrap().record.request_id, "b");
        assert_eq!(delete_before(&conn, 2_000, 100).unwrap(), 1);
        assert_eq!(all(&conn).unwrap().len(), 1);
    }

    #[test]
    fn retention_deletes_a_backlog_in_bounded_batches() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = super::super::open(&dir.path().join("a.db")).unwrap();
        let rows: Vec<AuditRecord> = (0..35)
            .map(|i| AuditRecord {
                request_id: format!("r{i}"),
                ts_ms: i,
                method: "GET".into(),
                path: "/".into(),
                ..Default::default()
            })
            .collect();
        insert_batch(&mut conn, &rows).unwrap();
        let mut batches = Vec::new();
        loop {
            let n = delete_before(&conn, 30, 10).unwrap();
            batches.push(n);
            if n < 10 {
                break;
            }
        }
        assert_eq!(batches, [10, 10, 10, 0]);
        let left: Vec<i64> = all(&conn).unwrap().iter().map(|r| r.ts_ms).collect();
        assert_eq!(left, (30..35).collect::<Vec<_>>(), "the oldest go first");
    }

    #[test]
    fn the_estimated_usage_flag_is_stored_and_read_from_shipped_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = super::super::open(&dir.path().join("a.db")).unwrap();
        let rec = |id: &str, estimated: bool| AuditRecord {
            request_id: id.into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            prompt_tokens: Some(100),
            completion_tokens: Some(2),
            usage_estimated: estimated,
            ..Default::default()
        };
        insert_batch(&mut conn, &[rec("a", true), rec("b", false)]).unwrap();
        let flags: Vec<bool> = all(&conn).unwrap().iter().map(|r| r.usage_estimated).collect();
        assert_eq!(flags, [true, false]);
        // Shipped rows carry SQLite's 0/1; rows shipped before the column, nothing.
        let shipped = |v: serde_json::Value| from_shipped(v).map(|r| r.usage_estimated);
        let row = serde_json::json!({"request_id": "a", "ts_ms": 1, "method": "GET", "path": "/", "status": 200,
            "stream": 0, "duration_ms": 1.0, "request_bytes": 0, "response_bytes": 0, "chunks": 0, "retries": 0});
        assert_eq!(shipped(row.clone()), Some(false));
        let mut with = row;
        with["usage_estimated"] = 1.into();
        assert_eq!(shipped(with), Some(true));
    }

    #[test]
    fn the_path_filter_is_a_case_sensitive_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = super::super::open(&dir.path().join("a.db")).unwrap();
        let rec = |id: &str, path: &str| AuditRecord {
            request_id: id.into(),
            method: "POST".into(),
            path: path.into(),
            ..Default::default()
        };
        insert_batch(
            &mut conn,
            &[
                rec("a", "/v1/chat/completions"),
                rec("b", "/V1/Chat"),
                rec("c", "/v1_x"),
            ],
        )
        .unwrap();
        let ids = |path: &str| -> Vec<String> {
            let f = LogFilter {
                path: Some(path.into()),
                ..Default::default()
            };
            let mut ids: Vec<String> = query(&conn, &f)
                .unwrap()
                .0
                .into_iter()
                .map(|r| r.record.request_id)
                .collect();
            ids.sort();
            ids
        };
        assert_eq!(ids("/v1/chat"), ["a"]);
        assert_eq!(ids("/V1/"), ["b"]);
        assert_eq!(ids("/v1_"), ["c"], "_ is no wildcard");
        assert!(ids("/V1/CHAT").is_empty());
    }

    #[test]
    fn ids_are_never_reused_after_retention_empties_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = super::super::open(&dir.path().join("a.db")).unwrap();
        let rec = |id: &str| AuditRecord {
            request_id: id.into(),
            method: "GET".into(),
            path: "/".into(),
            ..Default::default()
        };
        insert_batch(&mut conn, &[rec("a"), rec("b"), rec("c")]).unwrap();
        let before: i64 = conn
            .query_row("SELECT max(id) FROM audit_log", [], |r| r.get(0))
            .unwrap();
        assert_eq!(delete_oldest(&conn, 10).unwrap(), 3);
        insert_batch(&mut conn, &[rec("d")]).unwrap();
        let after: i64 = conn
            .query_row("SELECT max(id) FROM audit_log", [], |r| r.get(0))
            .unwrap();
        assert!(
            after > before,
            "id {after} reused (the shipper's watermark is {before})"
        );
    }
}
