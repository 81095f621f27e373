//! `cluster:`: the Redis and Postgres shared by several nodes.

use super::HumanDuration;
use serde::{Deserialize, Serialize};
use std::{path::PathBuf, time::Duration};

/// Several nodes sharing limits and key states through Redis (see
/// docs/cluster.md). Off while `redis` is empty.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `redis://` or `rediss://` (TLS) URL of a Redis/Valkey >= 7 primary.
    /// Shown (admin API) with its password masked.
    #[serde(serialize_with = "masked_url")]
    pub redis: String,
    /// `postgres://` URL: the system of record for users and gateway keys
    /// (every node keeps its copy in SQLite). Shown with its password masked.
    #[serde(serialize_with = "masked_url")]
    pub postgres: String,
    /// What the limits do while Redis cannot be reached.
    pub on_redis_down: OnRedisDown,
    /// Nodes sharing the limits while Redis is down; 0 = the count of
    /// live nodes last seen in Redis (heartbeats).
    pub nodes: u32,
    /// Longest wait for Redis on the request path; past it the request is
    /// decided locally and the breaker opens.
    pub timeout: HumanDuration,
    /// The rolling window that `rpm`/`tpm` count over. Keep 60s in
    /// production (the names say per minute); shorter windows are for tests.
    pub rate_window: HumanDuration,
    /// Tokens reserved for a request that names no `max_tokens`.
    pub default_reserve: u64,
    /// This node's name in heartbeats and logs; empty = host name and pid.
    pub node_id: String,
    /// PEM file of the certificate authorities trusted for `rediss://` and
    /// Postgres TLS, instead of the system's roots (a private PKI).
    pub ca_file: Option<PathBuf>,
    /// Let the admin API edit this node's `routes.d` in cluster mode. Off:
    /// every node must serve the same routes, so they come from files
    /// shipped to all nodes (config management + SIGHUP).
    pub route_api: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            redis: String::new(),
            postgres: String::new(),
            on_redis_down: OnRedisDown::LocalShare,
            nodes: 0,
            timeout: Duration::from_millis(50).into(),
            rate_window: Duration::from_secs(60).into(),
            default_reserve: 1024,
            node_id: String::new(),
            ca_file: None,
            route_api: false,
        }
    }
}

impl ClusterConfig {
    /// Shared limits and key states (Redis).
    pub fn enabled(&self) -> bool {
        !self.redis.is_empty()
    }

    /// Whether the admin API may write `routes.d`: always on one node; in
    /// cluster mode (Redis or Postgres) only with `route_api`.
    pub fn route_api_allowed(&self) -> bool {
        (self.redis.is_empty() && self.postgres.is_empty()) || self.route_api
    }
}

/// A URL with its password replaced by `***` (a URL that does not parse
/// is shown as `***` whole: it may hold anything).
fn masked_url<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    match url::Url::parse(url) {
        _ if url.is_empty() => s.serialize_str(""),
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            s.serialize_str(u.as_str())
        }
        Ok(u) => s.serialize_str(u.as_str()),
        Err(_) => s.serialize_str("***"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRedisDown {
    /// Each node enforces `limit / nodes` on its own.
    LocalShare,
    /// Limits are not enforced until Redis is back.
    FailOpen,
    /// Requests that have limits are refused (503) until Redis is back.
    FailClosed,
}
