//! Command-line interface (clap). Commands other than `serve` work directly
//! on the same config and database as the server.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "fastgate", version = crate::BUILD, about = "An LLM API gateway on Cloudflare's Pingora")]
pub struct Cli {
    /// The main configuration file (before or after the command, like any option).
    #[arg(
        short = 'c',
        long = "config",
        env = "FASTGATE_CONFIG",
        default_value = "conf/fastgate.yaml",
        global = true
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (SIGTERM/SIGINT drain and stop; SIGHUP reloads routes.d;
    /// SIGQUIT hands the listening sockets to a process started with --upgrade).
    Serve {
        /// Take over the listening sockets of a running FastGate (zero-downtime
        /// binary upgrade): start this, then send SIGQUIT to the old process.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate the config and every routes.d file without serving (like `nginx -t`).
    Check,
    /// Manage admin-service users.
    Users {
        #[command(subcommand)]
        action: UsersAction,
    },
    /// Read the audit log.
    Logs {
        #[command(subcommand)]
        action: LogsAction,
    },
    /// Work with routes.d.
    Routes {
        #[command(subcommand)]
        action: RoutesAction,
    },
    /// Manage gateway keys (what clients present).
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Print the version and the commit it was built from.
    Version,
    /// Print a shell completion script: `source <(fastgate completions bash)`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Create a key. The secret is printed once and never stored.
    Create {
        /// A name to recognise the key by.
        #[arg(long)]
        name: String,
        /// Who the key belongs to.
        #[arg(long, default_value = "")]
        owner: String,
        /// Permission tags (routes with `permissions:` need one of them). Repeatable.
        #[arg(long = "permission")]
        permissions: Vec<String>,
        /// Restrict the key to these route names. Repeatable.
        #[arg(long = "route")]
        routes: Vec<String>,
        /// Restrict the key to models matching these globs. Repeatable.
        #[arg(long = "model")]
        models: Vec<String>,
        /// Expire after this long (`30d`, `12h`).
        #[arg(long)]
        expires_in: Option<humantime::Duration>,
        /// Requests per minute (all routes together).
        #[arg(long)]
        rpm: Option<u64>,
        /// Tokens per minute (prompt + completion).
        #[arg(long)]
        tpm: Option<u64>,
        /// A budget in money, in the price table's currency (`25.50`).
        #[arg(long)]
        budget: Option<f64>,
        /// The budget's calendar period (UTC): day, week, month or total.
        #[arg(long, default_value = "month", requires = "budget")]
        budget_period: crate::budget::BudgetPeriod,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List keys (masked).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id; it stops working within a second.
    Revoke { id: String },
    /// Give a key a new secret (printed once); the old one stops after the grace period.
    Rotate {
        id: String,
        /// How long the old secret keeps working (`10m`); default: it stops at once.
        #[arg(long)]
        grace: Option<humantime::Duration>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum UsersAction {
    /// Add a user. The password is read from standard input (or prompted for).
    Add {
        username: String,
        #[arg(long, value_parser = ["admin", "user"], default_value = "user")]
        role: String,
    },
    /// Set a user's password (read from standard input or prompted for).
    Passwd { username: String },
    /// List users.
    List,
}

/// Filters shared by `logs query|tail|export`.
#[derive(Debug, Args, Clone, Default)]
pub struct LogFilterArgs {
    /// Only rows newer than this (`15m`, `24h`).
    #[arg(long)]
    pub since: Option<humantime::Duration>,
    #[arg(long)]
    pub status: Option<u16>,
    #[arg(long)]
    pub route: Option<String>,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub upstream: Option<String>,
    #[arg(long = "key-id")]
    pub key_id: Option<String>,
    /// Path prefix.
    #[arg(long)]
    pub path: Option<String>,
    #[arg(long = "request-id")]
    pub request_id: Option<String>,
    /// Only requests that took at least this many milliseconds.
    #[arg(long = "min-ms")]
    pub min_ms: Option<f64>,
}

#[derive(Debug, Subcommand)]
pub enum LogsAction {
    /// The newest matching rows.
    Query {
        #[command(flatten)]
        filter: LogFilterArgs,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Follow new rows as they are written (Ctrl-C to stop).
    Tail {
        #[command(flatten)]
        filter: LogFilterArgs,
        #[arg(long)]
        json: bool,
    },
    /// Every matching row to standard output.
    Export {
        #[command(flatten)]
        filter: LogFilterArgs,
        #[arg(long, value_parser = ["csv", "ndjson"], default_value = "ndjson")]
        format: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RoutesAction {
    /// Which route a request would take, and what the upstream would receive.
    Test {
        /// The request path, with query (`/v1/chat/completions`).
        path: String,
        #[arg(long, short = 'X', default_value = "POST")]
        method: String,
        /// `name: value`, repeatable.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// The JSON body (for model routing and body rewrites).
        #[arg(long, short = 'd')]
        body: Option<String>,
    },
}
