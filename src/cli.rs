//! Command-line interface (clap). Commands other than `serve` work directly
//! on the same config and database as the server.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "fastgate", version, about = "An LLM API gateway on Cloudflare's Pingora")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args, Clone)]
pub struct ConfigArg {
    /// The main configuration file.
    #[arg(
        short = 'c',
        long = "config",
        env = "FASTGATE_CONFIG",
        default_value = "conf/fastgate.yaml"
    )]
    pub path: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (SIGTERM/SIGINT drain and stop; SIGHUP reloads routes.d).
    Serve(ConfigArg),
    /// Validate the config and every routes.d file without serving (like `nginx -t`).
    Check(ConfigArg),
    /// Manage gateway keys (what clients present).
    Keys {
        #[command(flatten)]
        config: ConfigArg,
        #[command(subcommand)]
        action: KeysAction,
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
}
