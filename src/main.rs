//! `fastgate`: parse the CLI, set up logging, load config, run.

use anyhow::{Context, Result};
use clap::Parser;
use fastgate::{
    cli::{Cli, Command, KeysAction},
    cli_ops,
    config::{self, LogFormat},
    state::AppState,
    store,
};
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Pingora logs whole HTTP headers at `trace` (the client's request with its
/// gateway key, the request written upstream with the injected pool key):
/// its trace events are dropped whatever `FASTGATE_LOG` says.
fn not_pingora_trace(meta: &tracing::Metadata<'_>) -> bool {
    !(*meta.level() == tracing::Level::TRACE && meta.target().starts_with("pingora"))
}

fn init_tracing(format: LogFormat, default_level: &str) {
    use tracing_subscriber::{Layer, filter::filter_fn, layer::SubscriberExt, util::SubscriberInitExt};
    let filter = tracing_subscriber::EnvFilter::try_from_env("FASTGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Json => registry
            .with(layer.json().with_filter(filter_fn(not_pingora_trace)))
            .try_init(),
        LogFormat::Text => registry
            .with(layer.with_filter(filter_fn(not_pingora_trace)))
            .try_init(),
    };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fastgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let c = &cli.config;
    match cli.command {
        Command::Serve { upgrade } => {
            let config = config::load_config(c)?;
            init_tracing(config.file.logging.format, &config.file.logging.level);
            let state = AppState::build(config)?;
            fastgate::server::run(state, upgrade)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => check(c),
        Command::Version => {
            println!("fastgate {}", fastgate::BUILD);
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "fastgate", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Users { action } => {
            init_tracing(LogFormat::Text, "warn");
            cli_ops::users(&config::load_config(c)?, action)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs { action } => {
            init_tracing(LogFormat::Text, "warn");
            cli_ops::logs(&config::load_config(c)?, action)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Routes { action } => {
            init_tracing(LogFormat::Text, "error");
            let code = cli_ops::routes(&config::load_config(c)?, action)?;
            Ok(ExitCode::from(code as u8))
        }
        Command::Keys { action } => {
            init_tracing(LogFormat::Text, "warn");
            let config = config::load_config(c)?;
            let conn = store::open(&config.database_path)?;
            keys(&conn, action)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `fastgate check`: every problem as `file:line: message`, exit 1; or a summary, exit 0.
fn check(path: &std::path::Path) -> Result<ExitCode> {
    let result = config::load_config(path).and_then(|c| {
        let table = fastgate::router::load_routes(&c.routes_dir, &c.file)?;
        Ok((c, table))
    });
    match result {
        Ok((c, table)) => {
            // Certificates: readable, key matching, not about to expire.
            let mut tls_summary = String::new();
            if let Some(tls) = &c.file.server.tls {
                match fastgate::tls::load_all(tls) {
                    Ok(certs) => {
                        let now = fastgate::clock::now_unix();
                        for w in certs.iter().filter_map(|cert| cert.expiry_warning(now)) {
                            eprintln!("warning: {w}");
                        }
                        tls_summary = format!(", TLS with {} certificate(s)", certs.len());
                    }
                    Err(errors) => {
                        for e in &errors {
                            eprintln!("{e}");
                        }
                        eprintln!("fastgate: configuration has {} error(s)", errors.len());
                        return Ok(ExitCode::FAILURE);
                    }
                }
            }
            if let Some(tls) = &c.file.admin.tls
                && let Err(errors) = fastgate::tls::load_all(tls)
            {
                for e in &errors {
                    eprintln!("admin.tls: {e}");
                }
                eprintln!("fastgate: configuration has {} error(s)", errors.len());
                return Ok(ExitCode::FAILURE);
            }
            let files = config::routes_d::route_files(&c.routes_dir).map_or(0, |f| f.len());
            println!(
                "fastgate: configuration ok: {} ({} upstreams, {} key pools{tls_summary}), {} routes in {} files under {}",
                path.display(),
                c.file.upstreams.len(),
                c.file.key_pools.len(),
                table.len(),
                files,
                c.routes_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            for d in &errors.0 {
                eprintln!("{d}");
            }
            eprintln!("fastgate: configuration has {} error(s)", errors.0.len());
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Show a new key secret, the only time it exists in clear.
fn print_secret(key: &store::keys::GatewayKey, secret: &str, json: bool) -> Result<()> {
    if json {
        let mut v = serde_json::to_value(key)?;
        v["secret"] = serde_json::Value::String(secret.to_string());
        println!("{v}");
    } else {
        println!("id:     {}", key.id);
        println!("name:   {}", key.name);
        println!("secret: {secret}");
        println!("Store the secret now: it is not shown again.");
    }
    Ok(())
}

fn keys(conn: &rusqlite::Connection, action: KeysAction) -> Result<()> {
    use store::keys;
    match action {
        KeysAction::Create {
            name,
            owner,
            permissions,
            routes,
            models,
            expires_in,
            rpm,
            tpm,
            budget,
            budget_period,
            json,
        } => {
            let budget = budget.map(|amount| fastgate::budget::Budget {
                amount: amount + 0.0, // -0 is 0
                period: budget_period,
            });
            if let Some(Err(e)) = budget.as_ref().map(fastgate::budget::Budget::check) {
                anyhow::bail!(e);
            }
            let expires_at = expires_in.map(|d| fastgate::clock::now_unix() + d.as_secs() as i64);
            let mut new = keys::NewKey {
                name,
                owner,
                permissions,
                allowed_routes: routes,
                allowed_models: models,
                expires_at,
                rpm,
                tpm,
                budget,
                ..Default::default()
            };
            new.lock_limits(); // the operator's limits, like an admin's
            let (key, secret) = keys::create(conn, &new)?;
            store::admin_audit::record(
                conn,
                "cli",
                "key.create",
                Some(&key.id),
                None,
                Some(&serde_json::json!(key)),
            )?;
            print_secret(&key, &secret, json)?;
        }
        KeysAction::List { json } => {
            let list = keys::list(conn)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<18} {:<20} {:<16} {:<9} PERMISSIONS", "ID", "NAME", "KEY", "STATE");
                let now = fastgate::clock::now_unix();
                for k in list {
                    let state = if k.revoked_at.is_some() {
                        "revoked"
                    } else if !k.is_active(now) {
                        "expired"
                    } else {
                        "active"
                    };
                    println!(
                        "{:<18} {:<20} {:<16} {:<9} {}",
                        k.id,
                        k.name,
                        k.masked,
                        state,
                        k.permissions.join(",")
                    );
                }
            }
        }
        KeysAction::Rotate { id, grace, json } => {
            let grace = grace.map_or(0, |g| i64::try_from(g.as_secs()).unwrap_or(i64::MAX));
            let (key, secret) = keys::rotate(conn, &id, grace)?;
            store::admin_audit::record(
                conn,
                "cli",
                "key.rotate",
                Some(&id),
                None,
                Some(&serde_json::json!({"masked": key.masked, "grace_period_s": grace})),
            )?;
            print_secret(&key, &secret, json)?;
        }
        KeysAction::Revoke { id } => {
            let key = keys::revoke(conn, &id).with_context(|| format!("revoking {id}"))?;
            store::admin_audit::record(
                conn,
                "cli",
                "key.revoke",
                Some(&id),
                None,
                Some(&serde_json::json!(key)),
            )?;
            println!("revoked {} ({})", key.id, key.name);
        }
    }
    Ok(())
}
