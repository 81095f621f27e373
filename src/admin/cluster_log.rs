//! The audit log the admin API reads: the node's own SQLite table, or in
//! cluster mode with Postgres the whole cluster's (`fastgate_audit`, whose
//! filtered columns have the same names and types). One SQL text per
//! question serves both (`Dialect` fills in the table and placeholders), so
//! a node and the cluster answer alike.

use super::{AdminState, error::ApiError};
use crate::store::audit::{Arg, LogFilter, LogRow, from_shipped, page_sql, paginate};
use std::sync::Arc;
use tokio_postgres::{Client, types::ToSql};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    pub fn table(self) -> &'static str {
        match self {
            Dialect::Sqlite => "audit_log",
            Dialect::Postgres => "fastgate_audit",
        }
    }

    pub fn mark(self, n: usize) -> String {
        match self {
            Dialect::Sqlite => format!("?{n}"),
            Dialect::Postgres => format!("${n}"),
        }
    }
}

/// Where the admin API reads the log: `None` for the node's SQLite, else a
/// Postgres connection; an error while cluster mode's Postgres is down.
pub fn source(s: &AdminState) -> Result<Option<Arc<Client>>, ApiError> {
    if s.app.config.file.cluster.postgres.is_empty() {
        return Ok(None);
    }
    s.app.cluster_log.load_full().map(Some).ok_or_else(|| {
        ApiError::Unavailable(
            "the cluster's audit log is in Postgres, which cannot be reached right now; retry shortly".into(),
        )
    })
}

fn pg_error(e: tokio_postgres::Error) -> ApiError {
    ApiError::Internal(format!("postgres: {e}"))
}

/// `args` as Postgres parameters.
pub fn pg_args(args: &[Arg]) -> Vec<Box<dyn ToSql + Sync + Send>> {
    args.iter()
        .map(|a| -> Box<dyn ToSql + Sync + Send> {
            match a {
                Arg::Int(i) => Box::new(*i),
                Arg::Real(f) => Box::new(*f),
                Arg::Text(t) => Box::new(t.clone()),
            }
        })
        .collect()
}

/// Run `sql` with `args` on Postgres.
pub async fn pg_query(c: &Client, sql: &str, args: &[Arg]) -> Result<Vec<tokio_postgres::Row>, ApiError> {
    let owned = pg_args(args);
    let refs: Vec<&(dyn ToSql + Sync)> = owned.iter().map(|b| b.as_ref() as &(dyn ToSql + Sync)).collect();
    c.query(sql, &refs).await.map_err(pg_error)
}

/// One page of the cluster's log, newest first (ids are the cluster-wide
/// `seq`), with the same filters as [`crate::store::audit::query`].
pub async fn query(c: &Client, f: &LogFilter) -> Result<(Vec<LogRow>, Option<i64>), ApiError> {
    let (sql, args, limit) = page_sql(f, "SELECT seq, row FROM fastgate_audit", "seq", |n| {
        Dialect::Postgres.mark(n)
    });
    let mut rows: Vec<LogRow> = pg_query(c, &sql, &args)
        .await?
        .iter()
        .filter_map(|r| {
            from_shipped(r.get(1)).map(|record| LogRow {
                id: r.get(0),
                record,
                captured: None,
            })
        })
        .collect();
    let next = paginate(&mut rows, limit);
    Ok((rows, next))
}

/// One row of the cluster's log by its `seq`.
pub async fn get(c: &Client, id: i64) -> Result<LogRow, ApiError> {
    let rows = pg_query(c, "SELECT seq, row FROM fastgate_audit WHERE seq = $1", &[Arg::Int(id)]).await?;
    rows.first()
        .and_then(|r| {
            from_shipped(r.get(1)).map(|record| LogRow {
                id: r.get(0),
                record,
                captured: None,
            })
        })
        .ok_or_else(|| ApiError::NotFound(format!("no log entry with id {id}")))
}

/// Run one read of the log, on the node's SQLite or the cluster's Postgres:
/// the same SQL (`{table}` and placeholders filled in per dialect), its rows
/// turned into `T` by `sqlite` or `pg`.
pub async fn read_log<T: Send + 'static>(
    s: &AdminState,
    sql: impl Fn(Dialect) -> (String, Vec<Arg>),
    sqlite: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T> + Send + 'static,
    pg: impl Fn(&tokio_postgres::Row) -> T,
) -> Result<Vec<T>, ApiError> {
    match source(s)? {
        Some(client) => {
            let (text, args) = sql(Dialect::Postgres);
            Ok(pg_query(&client, &text, &args).await?.iter().map(pg).collect())
        }
        None => {
            let (text, args) = sql(Dialect::Sqlite);
            s.read(move |c| {
                let mut stmt = c.prepare(&text)?;
                let args = args.into_iter().map(rusqlite::types::Value::from);
                let rows = stmt.query_map(rusqlite::params_from_iter(args), sqlite)?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
        }
    }
}
