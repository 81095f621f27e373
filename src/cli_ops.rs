//! What the operator commands do (`users`, `logs`, `routes test`), working on
//! the same database and files as the server. Kept out of `main.rs`, which
//! only wires.

use crate::{
    admin::{self, routes::TestRequest},
    cli::{LogFilterArgs, LogsAction, RoutesAction, UsersAction},
    config::{self, Config},
    store::{
        self,
        audit::{LogFilter, LogRow},
        users::Role,
    },
    upstream::Upstream,
};
use std::{collections::HashMap, io::BufRead, sync::Arc, time::Duration};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Config(#[from] config::ConfigErrors),
    #[error("{0}")]
    Input(String),
}

/// A password from standard input (first line), or a hidden prompt on a terminal.
fn read_password(prompt: &str) -> Result<String, CliError> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password(prompt).map_err(|e| CliError::Input(e.to_string()))?;
        let again = rpassword::prompt_password("Again: ").map_err(|e| CliError::Input(e.to_string()))?;
        if first != again {
            return Err(CliError::Input("the passwords differ".into()));
        }
        return Ok(first);
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| CliError::Input(e.to_string()))?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

pub fn users(config: &Config, action: UsersAction) -> Result<(), CliError> {
    let conn = store::open(&config.database_path)?;
    match action {
        UsersAction::Add { username, role } => {
            let role = if role == "admin" { Role::Admin } else { Role::User };
            let password = read_password("Password: ")?;
            let user = store::users::create(&conn, &username, &password, role)?;
            store::admin_audit::record(
                &conn,
                "cli",
                "user.create",
                Some(&user.id),
                None,
                Some(&serde_json::json!(user)),
            )?;
            println!("added {} ({}, {})", user.username, user.id, user.role.as_str());
        }
        UsersAction::Passwd { username } => {
            let user = store::users::find_by_name(&conn, &username)?
                .ok_or_else(|| store::StoreError::NotFound(format!("no user named {username:?}")))?;
            let password = read_password("New password: ")?;
            store::users::set_password(&conn, &user.id, &password)?;
            store::admin_audit::record(&conn, "cli", "user.passwd", Some(&user.id), None, None)?;
            println!("password changed for {username}");
        }
        UsersAction::List => {
            for u in store::users::list(&conn)? {
                println!("{:<40} {:<24} {}", u.id, u.username, u.role.as_str());
            }
        }
    }
    Ok(())
}

fn to_filter(f: &LogFilterArgs) -> LogFilter {
    LogFilter {
        from: f.since.map(|d| crate::clock::now_ms() - d.as_millis() as i64),
        status: f.status,
        route: f.route.clone(),
        model: f.model.clone(),
        upstream: f.upstream.clone(),
        key_id: f.key_id.clone(),
        path: f.path.clone(),
        request_id: f.request_id.clone(),
        min_ms: f.min_ms,
        ..LogFilter::default()
    }
}

fn print_row(row: &LogRow, json: bool) {
    if json {
        println!("{}", serde_json::json!(row));
        return;
    }
    let r = &row.record;
    let ts = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(r.ts_ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default();
    let tokens = match (r.prompt_tokens, r.completion_tokens) {
        (None, None) => "-".to_string(),
        // `~`: FastGate's estimate (the request ended without usage).
        (p, c) => format!(
            "{}{}+{}",
            if r.usage_estimated { "~" } else { "" },
            p.unwrap_or(0),
            c.unwrap_or(0)
        ),
    };
    // `-`: unpriced or no usage; costs to the micro-unit (a cheap request
    // costs fractions of a cent).
    let cost = r.cost.map_or_else(|| "-".to_string(), |c| format!("{c:.6}"));
    println!(
        "{ts} {} {:<6} {} route={} model={} {:.1}ms tokens={tokens} cost={cost} id={}",
        r.status,
        r.method,
        r.path,
        r.route.as_deref().unwrap_or("-"),
        r.model.as_deref().unwrap_or("-"),
        r.duration_ms,
        r.request_id
    );
}

pub fn logs(config: &Config, action: LogsAction) -> Result<(), CliError> {
    let conn = store::open(&config.database_path)?;
    let captured = crate::audit::captured::CapturedStore::for_database(&config.database_path);
    match action {
        LogsAction::Query { filter, limit, json } => {
            let mut f = to_filter(&filter);
            f.limit = Some(limit);
            let (rows, _) = captured.query(&conn, &f)?;
            for row in rows.iter().rev() {
                print_row(row, json);
            }
        }
        LogsAction::Tail { filter, json } => {
            let base = to_filter(&filter);
            // Start from the newest row; then poll for newer ones.
            let mut last = store::audit::query(
                &conn,
                &LogFilter {
                    limit: Some(1),
                    ..LogFilter::default()
                },
            )?
            .0
            .first()
            .map_or(0, |r| r.id);
            loop {
                let (rows, _) = captured.query(
                    &conn,
                    &LogFilter {
                        limit: Some(1000),
                        ..base.clone()
                    },
                )?;
                for row in rows.iter().rev().filter(|r| r.id > last) {
                    print_row(row, json);
                }
                last = rows.first().map_or(last, |r| r.id.max(last));
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        LogsAction::Export { filter, format } => {
            let mut f = to_filter(&filter);
            f.limit = Some(1000);
            let csv = format == "csv";
            let mut out = std::io::stdout().lock();
            use std::io::Write;
            if csv {
                let _ = out.write_all(&admin::logs::csv_header());
            }
            loop {
                let (rows, next) = captured.query(&conn, &f)?;
                let _ = out.write_all(&admin::logs::encode(&rows, csv));
                match next {
                    Some(c) => f.cursor = Some(c),
                    None => break,
                }
            }
        }
    }
    Ok(())
}

pub fn routes(config: &Config, action: RoutesAction) -> Result<i32, CliError> {
    match action {
        RoutesAction::Test {
            path,
            method,
            headers,
            body,
        } => {
            let table = crate::router::load_routes(&config.routes_dir, &config.file)?;
            let upstreams: HashMap<String, Arc<Upstream>> = config
                .file
                .upstreams
                .iter()
                .map(|(n, u)| (n.clone(), Arc::new(Upstream::build(n, u, &HashMap::new()))))
                .collect();
            let mut hdrs = std::collections::BTreeMap::new();
            for h in headers {
                let (k, v) = h
                    .split_once(':')
                    .ok_or_else(|| CliError::Input(format!("header {h:?}: use `name: value`")))?;
                hdrs.insert(k.trim().to_string(), v.trim().to_string());
            }
            let body = body
                .map(|b| serde_json::from_str(&b).map_err(|e| CliError::Input(format!("--body is not JSON: {e}"))))
                .transpose()?;
            let t = TestRequest {
                method,
                path,
                headers: hdrs,
                body,
            };
            let out = admin::routes::explain(&table, &upstreams, &t).map_err(|e| CliError::Input(e.to_string()))?;
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            Ok(if out["matched"] == true { 0 } else { 1 })
        }
    }
}
