//! FastGate: an LLM API gateway on Cloudflare's Pingora.
//!
//! Data flows one way: `config` (files) -> `router` (compiled route table) ->
//! `proxy` (request filters, upstream exchange, response filters) -> logs.
//! `main.rs` only wires these together; everything lives here so tests and
//! benches can reach it.

/// `<version> (<commit>)`: what `fastgate version` and `--version` print.
pub const BUILD: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("FASTGATE_GIT_SHA"), ")");

pub mod admin;
pub mod audit;
pub mod auth;
pub mod budget;
pub mod cli;
pub mod cli_ops;
pub mod client_addr;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod convert;
pub mod metrics;
pub mod otel;
pub mod pool;
pub mod pricing;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod replication;
pub mod router;
pub mod seal;
pub mod secret;
pub mod server;
pub mod state;
pub mod store;
pub mod tls;
pub mod upstream;
pub mod usage;
