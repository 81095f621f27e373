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
    let (items, next) = match cluster_log::source(&s)? {
        Some(pg) => cluster_log::query(&pg, &filter).await?,
        None => s.read(move |c| store::audit::query(c, &filter)).await?,
    };
    Ok(Json(json!({"items": items, "next_cursor": next})))
}

pub async fn get(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path(id): Path<i64>,
) -> Result<Json<LogRow>, ApiError> {
    let row = match cluster_log::source(&s)? {
        Some(pg) => cluster_log::get(&pg, id).await?,
        None => s.read(move |c| store::audit::get(c, id)).await?,
    };
    if !caller.is_admin() && row.record.user_id.as_deref() != Some(caller.user_id.as_str()) {
        return Err(ApiError::NotFound(format!("no log entry with id {id}")));
    }
    Ok(Json(row))
}

/// Columns of a CSV export, in order (every field of a row).
const CSV_COLUMNS: [&str; 29] = [
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
    "retries",
    "error",
    "client_ip",
    "user_agent",
    "request_headers",
    "response_headers",
    "request_body",
    "response_body",
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

/// Rows as CSV lines or NDJSON lines.
pub fn encode(rows: &[LogRow], csv: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for row in rows {
        let v = json!(row);
        if csv {
            out.extend(csv_line(CSV_COLUMNS.iter().map(|c| match &v[*c] {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })));
        } else {
            out.extend(v.to_string().into_bytes());
            out.push(b'\n');
        }
    }
    out
}

/// `GET /api/logs/export?format=csv|ndjson&<filters>`: every matching row,
/// newest first, streamed page by page (never held in memory whole).
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
    filter.limit = Some(1000);
    let db = s.app.config.database_path.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    if let Some(pg) = cluster_log::source(&s)? {
        tokio::spawn(async move {
            if csv && tx.send(Ok(csv_header().into())).await.is_err() {
                return;
            }
            loop {
                match cluster_log::query(&pg, &filter).await {
                    Ok((rows, next)) => {
                        if tx.send(Ok(encode(&rows, csv).into())).await.is_err() {
                            return;
                        }
                        match next {
                            Some(cursor) => filter.cursor = Some(cursor),
                            None => return,
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                        return;
                    }
                }
            }
        });
        return Ok(export_response(rx, csv));
    }
    tokio::task::spawn_blocking(move || {
        let conn = match store::open(&db) {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                return;
            }
        };
        if csv {
            let _ = tx.blocking_send(Ok(csv_header().into()));
        }
        loop {
            match store::audit::query(&conn, &filter) {
                Ok((rows, next)) => {
                    if tx.blocking_send(Ok(encode(&rows, csv).into())).is_err() {
                        return; // client went away
                    }
                    match next {
                        Some(cursor) => filter.cursor = Some(cursor),
                        None => return,
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
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
