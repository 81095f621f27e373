//! `/api/logs`: the audit log, filtered and paged by id (keyset). Users see
//! only requests made with their own keys; `/api/audit` (admins) lists admin
//! actions.

use super::{AdminState, cluster_log, error::ApiError, session::Caller};
use crate::store::{
    self,
    admin_audit::AdminEvent,
    audit::{LogFilter, LogRow},
};
use axum::{
    Json,
    extract::{Path, Query, State},
    http::StatusCode,
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
        filter.user_id = Some(caller.user_id.clone());
    }
    let (mut items, next) = match cluster_log::source(&s)? {
        Some(pg) => cluster_log::query(&pg, &filter).await?,
        None => {
            let captured = s.captured();
            s.read(move |c| captured.query(c, &filter)).await?
        }
    };
    let mask = super::routes::env_mask(&s).await?;
    items.iter_mut().for_each(|r| mask_row(&mask, r));
    Ok(Json(json!({"items": items, "next_cursor": next})))
}

pub async fn get(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path(id): Path<i64>,
) -> Result<Json<LogRow>, ApiError> {
    let row = match cluster_log::source(&s)? {
        Some(pg) => cluster_log::get(&pg, id).await?,
        None => {
            let captured = s.captured();
            s.read(move |c| captured.get(c, id)).await?
        }
    };
    if !caller.is_admin() && row.record.user_id.as_deref() != Some(caller.user_id.as_str()) {
        return Err(ApiError::NotFound(format!("no log entry with id {id}")));
    }
    let mut row = row;
    mask_row(&super::routes::env_mask(&s).await?, &mut row);
    Ok(Json(row))
}

/// A captured request is the one sent upstream, after the route's
/// `set_headers`/`set_body`: a value a route interpolated from the
/// environment is shown as `${VAR}`, as everywhere in the admin API.
fn mask_row(mask: &crate::config::env::EnvMask, row: &mut store::audit::LogRow) {
    let r = &mut row.record;
    for field in [
        &mut r.request_headers,
        &mut r.response_headers,
        &mut r.request_body,
        &mut r.response_body,
        &mut r.error,
    ] {
        if let Some(text) = field
            && let std::borrow::Cow::Owned(masked) = mask.mask_str(text)
        {
            *text = masked;
        }
    }
}

/// Columns of a CSV export, in order (every field of a row).
/// Columns added later come last: a spreadsheet or script that reads
/// columns by position keeps working.
const CSV_COLUMNS: [&str; 35] = [
    "id",
    "request_id",
    "ts_ms",
    "key_id",
    "owner",
    "route",
    "upstream",
    "endpoint",
    "upstream_key_id",
    "method",
    "path",
    "status",
    "model",
    "stream",
    "ttfb_ms",
    "duration_ms",
    "request_bytes",
    "response_bytes",
    "chunks",
    "prompt_tokens",
    "completion_tokens",
    "usage_estimated",
    "retries",
    "error",
    "client_ip",
    "user_agent",
    "request_headers",
    "response_headers",
    "request_body",
    "response_body",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost",
    "price_version",
];

fn csv_line(fields: impl IntoIterator<Item = String>) -> Vec<u8> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let _ = w.write_record(fields);
    w.into_inner().unwrap_or_default()
}

/// The CSV header line.
pub fn csv_header() -> Vec<u8> {
    csv_line(CSV_COLUMNS.iter().map(|c| c.to_string()))
}

/// A text cell made safe to open in a spreadsheet (OWASP, CSV injection):
/// one that starts with `=`, `+`, `-`, `@`, tab or CR gets a leading `'`,
/// so `=HYPERLINK(...)` from a client's User-Agent stays text. A plain
/// number (`-1`, `+2.5e3`) is left as is.
fn csv_cell(text: &str) -> String {
    let risky = text.starts_with(['=', '+', '-', '@', '\t', '\r']);
    if risky && !is_plain_number(text) {
        format!("'{text}")
    } else {
        text.to_string()
    }
}

/// `[+-]digits[.digits][e[+-]digits]`, nothing else.
fn is_plain_number(text: &str) -> bool {
    let t = text.strip_prefix(['+', '-']).unwrap_or(text);
    let (mantissa, exponent) = match t.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e.strip_prefix(['+', '-']).unwrap_or(e))),
        None => (t, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        Some((whole, frac)) => digits(whole) && digits(frac),
        None => digits(mantissa),
    };
    mantissa_ok && exponent.is_none_or(digits)
}

/// Rows as CSV lines or NDJSON lines.
pub fn encode(rows: &[LogRow], csv: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for row in rows {
        let v = json!(row);
        if csv {
            out.extend(csv_line(CSV_COLUMNS.iter().map(|c| match &v[*c] {
                Value::Null => String::new(),
                Value::String(s) => csv_cell(s),
                Value::Number(n) => n.to_string(),
                other => csv_cell(&other.to_string()),
            })));
        } else {
            out.extend(v.to_string().into_bytes());
            out.push(b'\n');
        }
    }
    out
}

/// Rows per page of an export: one short read of the audit log each.
const EXPORT_PAGE: u32 = 500;
/// Encoded pages waiting for a slow reader (memory per export: about this
/// many pages).
const EXPORT_QUEUE: usize = 2;

/// `GET /api/logs/export?format=csv|ndjson&<filters>`: every matching row,
/// newest first, streamed page by page (never held in memory whole).
///
/// Each page is one short blocking read on a shared reader connection;
/// between pages the export waits for its reader on an async channel, so a
/// reader that stops reading holds no thread and no database connection.
pub async fn export(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Query(mut filter): Query<LogFilter>,
) -> Result<axum::response::Response, ApiError> {
    let csv = match filter.format.as_deref().unwrap_or("ndjson") {
        "csv" => true,
        "ndjson" => false,
        other => return Err(ApiError::Invalid(format!("format {other:?}: use csv or ndjson"))),
    };
    if !caller.is_admin() {
        filter.user_id = Some(caller.user_id.clone());
    }
    filter.limit = Some(EXPORT_PAGE);
    let pg = cluster_log::source(&s)?;
    let mask = super::routes::env_mask(&s).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(EXPORT_QUEUE);
    tokio::spawn(async move {
        if csv && tx.send(Ok(csv_header().into())).await.is_err() {
            return;
        }
        loop {
            let page = match &pg {
                Some(pg) => cluster_log::query(pg, &filter).await,
                None => {
                    let (f, captured) = (filter.clone(), s.captured());
                    s.read(move |c| captured.query(c, &f)).await
                }
            };
            match page {
                Ok((mut rows, next)) => {
                    rows.iter_mut().for_each(|r| mask_row(&mask, r));
                    // Encoding is CPU work on at most one page.
                    if tx.send(Ok(encode(&rows, csv).into())).await.is_err() {
                        return; // the client went away
                    }
                    match next {
                        Some(cursor) => filter.cursor = Some(cursor),
                        None => return,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Log export stopped.");
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            }
        }
    });
    Ok(export_response(rx, csv))
}

/// The export's streamed answer.
fn export_response(
    rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, std::io::Error>>,
    csv: bool,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let content_type = if csv {
        "text/csv; charset=utf-8"
    } else {
        "application/x-ndjson"
    };
    let file = if csv {
        "fastgate-logs.csv"
    } else {
        "fastgate-logs.ndjson"
    };
    (
        [
            (axum::http::header::CONTENT_TYPE, content_type.to_string()),
            (
                axum::http::header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file}\""),
            ),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
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
    if let Some(pg) = cluster_log::source(&s)? {
        let rows = cluster_log::pg_query(
            &pg,
            "SELECT seq, row FROM fastgate_admin_audit ORDER BY seq DESC LIMIT $1",
            &[store::audit::Arg::Int(i64::from(limit))],
        )
        .await?;
        let events = rows
            .iter()
            .map(|r| store::admin_audit::from_shipped(r.get(0), &r.get::<_, Value>(1)))
            .collect();
        return Ok(Json(events));
    }
    Ok(Json(s.db(move |c| store::admin_audit::list(c, limit)).await?))
}

/// Rows Postgres refused on this node (cluster mode), kept aside with the
/// error so the rest of the sync and the audit shipping keep flowing; newest
/// first. Admin only: the node's own quarantine, not the cluster's.
pub async fn cluster_quarantine(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Query(q): Query<EventsQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000) as usize;
    let items = s.db(move |c| store::sync::quarantined(c, limit)).await?;
    Ok(Json(serde_json::json!({ "items": items })))
}

/// Drop one row of this node's quarantine (admins; recorded in the admin
/// audit with what it was).
pub async fn forget_quarantined(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path(id): Path<i64>,
) -> Result<StatusCode, ApiError> {
    caller.require_admin()?;
    let actor = caller.username.clone();
    s.db(move |c| {
        let q = store::sync::forget_quarantined(c, id)?;
        let target = id.to_string();
        let before = serde_json::to_value(&q).ok();
        store::admin_audit::record(c, &actor, "quarantine.delete", Some(&target), before.as_ref(), None)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_cells_are_quoted_and_numbers_are_not() {
        for risky in [
            "=HYPERLINK(\"http://x\",\"y\")",
            "+cmd|' /C calc'!A0",
            "-2+3",
            "@SUM(A1)",
            "\tx",
            "\rx",
            "-",
        ] {
            assert_eq!(csv_cell(risky), format!("'{risky}"), "{risky:?}");
        }
        for plain in ["-1", "+2", "-2.5", "1e9", "-3.0E-2", "curl/8.5", "", "a=b"] {
            assert_eq!(csv_cell(plain), plain, "{plain:?}");
        }
        for not_number in ["-1-1", "-.5", "-1.", "-e5", "+inf", "-NaN"] {
            assert!(!is_plain_number(not_number), "{not_number:?}");
        }
    }
}
