//! Configuration: the serde surface of `conf/fastgate.yaml` and `routes.d/*.yaml`,
//! loading with environment interpolation, and validation that reports every
//! problem at once as `file:line: message`.
//!
//! The file types here are plain data. `router` and `upstream` compile them
//! into the runtime forms the proxy uses.

mod audit;
pub mod ca_roots;
pub mod capabilities;
mod cluster;
pub mod endpoint;
pub mod env;
mod key_pools;
mod load;
mod otel;
pub mod routes_d;
mod server;
pub mod strength;
mod upstreams;
pub mod values;

use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

pub use self::{audit::*, cluster::*, key_pools::*, load::*, otel::*, server::*, upstreams::*};
pub use routes_d::RouteConfig;
pub use values::{HumanDuration, HumanSize, OneOrMany};

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

/// Every problem found while loading; never just the first.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<Diagnostic>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// `conf/fastgate.yaml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub logging: LoggingConfig,
    pub admin: AdminConfig,
    pub secrets: SecretsConfig,
    pub audit: AuditConfig,
    /// Relative paths are resolved against the working directory.
    pub routes_dir: PathBuf,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    pub key_pools: BTreeMap<String, KeyPoolConfig>,
    pub cluster: ClusterConfig,
    /// Prices per model: the cost of each request and money budgets.
    pub pricing: crate::pricing::PricingConfig,
    /// Budget alerts and reservations.
    pub budgets: crate::budget::BudgetsConfig,
    /// OpenTelemetry trace export; absent = off (docs/tracing.md).
    pub otel: Option<OtelConfig>,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            database: DatabaseConfig::default(),
            logging: LoggingConfig::default(),
            admin: AdminConfig::default(),
            secrets: SecretsConfig::default(),
            audit: AuditConfig::default(),
            routes_dir: PathBuf::from("routes.d"),
            upstreams: BTreeMap::new(),
            key_pools: BTreeMap::new(),
            cluster: ClusterConfig::default(),
            pricing: crate::pricing::PricingConfig::default(),
            budgets: crate::budget::BudgetsConfig::default(),
            otel: None,
        }
    }
}

/// A loaded, validated configuration and where it came from.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: FileConfig,
    pub path: PathBuf,
    pub routes_dir: PathBuf,
    pub database_path: PathBuf,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
}

impl Config {
    /// The Unix socket a graceful upgrade hands the listening sockets over.
    pub fn upgrade_socket(&self) -> PathBuf {
        self.file.server.upgrade_socket.clone().unwrap_or_else(|| {
            let dir = self.database_path.parent().unwrap_or(Path::new("."));
            dir.join("fastgate-upgrade.sock")
        })
    }

    /// Worker threads for the data plane.
    pub fn threads(&self) -> usize {
        match self.file.server.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_empty_file_gets_defaults() {
        let c = parse_config(Path::new("/etc/fg/fastgate.yaml"), "{}\n").unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.file.server.max_request_body.0, 10 * 1024 * 1024);
        assert_eq!(c.routes_dir, Path::new("routes.d"));
    }

    #[test]
    fn unknown_keys_are_errors_with_a_line() {
        let err = parse_config(Path::new("f.yaml"), "server:\n  listen: 0.0.0.0:1\n  lisen: x\n").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("f.yaml:3: "), "{text}");
        assert!(text.contains("unknown field `lisen`"), "{text}");
    }

    #[test]
    fn cluster_mode_is_off_unless_a_redis_url_is_given_and_a_bad_one_is_reported_without_its_password() {
        let c = parse_config(Path::new("f.yaml"), "{}\n").unwrap();
        assert!(!c.file.cluster.enabled());
        let ok = "cluster:\n  redis: rediss://:pw@redis.internal:6380/0\n  on_redis_down: fail_closed\n";
        let c = parse_config(Path::new("f.yaml"), ok).unwrap();
        assert!(c.file.cluster.enabled());
        assert_eq!(c.file.cluster.on_redis_down, OnRedisDown::FailClosed);
        assert_eq!(c.file.cluster.rate_window.0, Duration::from_secs(60));
        let bad = "cluster:\n  redis: http://:s3cret@redis:6379\n  timeout: 0s\n";
        let err = parse_config(Path::new("f.yaml"), bad).unwrap_err().to_string();
        assert!(err.contains("f.yaml:2: cluster.redis: scheme http"), "{err}");
        assert!(err.contains("timeout must be greater than zero"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
        let shown = serde_json::to_value(&c.file.cluster).unwrap();
        assert_eq!(shown["redis"], "rediss://:***@redis.internal:6380/0");
    }

    #[test]
    fn weak_secrets_are_refused_with_the_setting_and_its_line() {
        let yaml = "admin:\n  metrics_token: x\n  token: short\n  jwt_secret: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\nsecrets:\n  master_key: 0123456789abcdef0123456789abcdef\n";
        let err = parse_config(Path::new("f.yaml"), yaml).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.0.len(), 3, "{text}");
        assert!(text.contains("f.yaml:3: admin.token is too weak"), "{text}");
        assert!(text.contains("f.yaml:4: admin.jwt_secret is too weak"), "{text}");
        assert!(text.contains("f.yaml:2: admin.metrics_token is too weak"), "{text}");
        assert!(!text.contains("master_key"), "16 distinct hex digits pass: {text}");
    }

    #[test]
    fn semantic_errors_are_all_reported() {
        let yaml = "upstreams:\n  a:\n    provider: openai\n    endpoints: [ftp://x]\n    key_pool: nope\n";
        let err = parse_config(Path::new("f.yaml"), yaml).unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
        assert_eq!(err.0[0].line, 4);
        assert_eq!(err.0[1].line, 5);
    }
}
