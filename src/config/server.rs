//! `server:`, `database:`, `logging:`, `secrets:` and `admin:`: where FastGate
//! listens, what it stores where, and how its edge is bounded.

use super::{HumanDuration, HumanSize};
use serde::{Deserialize, Serialize};
use std::{path::PathBuf, time::Duration};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    /// Worker threads of the data plane; 0 = one per CPU core.
    pub threads: usize,
    pub max_request_body: HumanSize,
    /// How long SIGTERM/SIGINT waits for in-flight requests and streams.
    pub grace_period: HumanDuration,
    /// Idle upstream connections kept for reuse, per process.
    pub upstream_keepalive_pool: usize,
    /// Serve `listen` over TLS (HTTP/2 and HTTP/1.1 by ALPN).
    pub tls: Option<TlsConfig>,
    /// Accept HTTP/2 with prior knowledge (h2c) on a plain listener.
    pub h2c: bool,
    /// Peers (CIDRs or addresses) whose `X-Forwarded-For` and PROXY
    /// protocol headers name the client; from others, the peer is the client.
    pub trusted_proxies: Vec<String>,
    /// Expect a PROXY protocol v1/v2 header from `trusted_proxies` peers
    /// (L4 balancers) before each connection's first byte.
    pub proxy_protocol: bool,
    /// Where `serve --upgrade` receives the listening sockets of the old
    /// process (SIGQUIT); default: `fastgate-upgrade.sock` beside the database.
    pub upgrade_socket: Option<PathBuf>,
    /// Bounds on what one client may hold on the data port.
    pub limits: TransportLimits,
}

/// `server.limits`: what one connection and one client address may cost
/// the data port before a route is known (nginx's defaults where nginx has
/// one), so that slow or oversized request headers and connection floods
/// are refused before they pin memory or file descriptors.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportLimits {
    /// The whole request header (request line excluded): beyond it, `431`.
    pub max_header_bytes: HumanSize,
    /// The request target (path and query): beyond it, `414`.
    pub max_uri_bytes: HumanSize,
    /// One header line (name and value): beyond it, `431`.
    pub max_header_value_bytes: HumanSize,
    /// The whole request header must arrive within this, counted from the
    /// connection's start for its first request and from the first byte for
    /// each later keep-alive request; then the connection is closed.
    pub client_header_timeout: HumanDuration,
    /// The longest wait for the next piece of a request body FastGate reads
    /// (nginx's `client_body_timeout`); then `408`.
    pub client_body_timeout: HumanDuration,
    /// An idle keep-alive connection (HTTP/1.1 and HTTP/2) is closed after
    /// this; `0` turns keep-alive off.
    pub keepalive_timeout: HumanDuration,
    /// Open connections per client address (the PROXY protocol's when in
    /// use); more are refused at once. `0` = unlimited.
    pub max_connections_per_client: usize,
}

impl Default for TransportLimits {
    fn default() -> Self {
        Self {
            max_header_bytes: HumanSize(32 * 1024),
            max_uri_bytes: HumanSize(8 * 1024),
            max_header_value_bytes: HumanSize(8 * 1024),
            client_header_timeout: Duration::from_secs(30).into(),
            client_body_timeout: Duration::from_secs(60).into(),
            keepalive_timeout: Duration::from_secs(75).into(),
            max_connections_per_client: 256,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            threads: 0,
            max_request_body: HumanSize(10 * 1024 * 1024),
            grace_period: Duration::from_secs(30).into(),
            upstream_keepalive_pool: 1024,
            upgrade_socket: None,
            tls: None,
            h2c: false,
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
            limits: TransportLimits::default(),
        }
    }
}

/// `server.tls`: one certificate (`cert`, `key`) or several
/// (`certificates`), chosen by the name the client asks for (SNI).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub certificates: Vec<CertificateFiles>,
    /// Offer HTTP/2 by ALPN (HTTP/1.1 always).
    pub h2: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// PEM: the certificate, then its intermediates.
    pub cert: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl TlsConfig {
    /// Every certificate pair, the single `cert`/`key` first: the first is
    /// served to clients that send no SNI or a name no certificate covers.
    pub fn pairs(&self) -> Vec<CertificateFiles> {
        let single = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(CertificateFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        };
        single.into_iter().chain(self.certificates.iter().cloned()).collect()
    }

    pub fn h2(&self) -> bool {
        self.h2.unwrap_or(true)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Relative paths are resolved against the working directory.
    pub path: PathBuf,
    /// How often the data plane looks for gateway-key changes made by other
    /// processes (the CLI). Cheap: one `PRAGMA data_version` per tick.
    pub key_refresh: HumanDuration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data/fastgate.db"),
            key_refresh: Duration::from_secs(1).into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    pub format: LogFormat,
    /// A tracing filter (`info`, `fastgate=debug,pingora=warn`); `FASTGATE_LOG` overrides it.
    pub level: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Encryption at rest of the secrets FastGate keeps in its database.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    /// Empty: stored secrets are not encrypted. At least 32 random characters.
    #[serde(skip_serializing)]
    pub master_key: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// The admin service: REST API, `/health`, `/metrics`. Bind it privately.
    pub listen: String,
    /// A static bearer token with admin rights (automation, CLI). Empty: none.
    #[serde(skip_serializing)]
    pub token: String,
    /// HS256 secret for login tokens. Empty: generated once and kept in the database.
    #[serde(skip_serializing)]
    pub jwt_secret: String,
    /// How long a login token is valid.
    pub token_ttl: HumanDuration,
    /// Password hashes (argon2id, 19 MiB each) computed at once; more wait.
    pub password_concurrency: usize,
    /// Password checks allowed to wait for a slot; beyond that, 429 at once.
    pub password_queue: usize,
    /// Gateway keys a `user` may hold (not revoked); admins are not bound.
    pub max_keys_per_user: usize,
    /// A request's headers must arrive within this (slowloris); it also
    /// bounds the wait for the next request on a kept-alive connection.
    pub header_timeout: HumanDuration,
    /// A connection on which no byte moves either way for this long is
    /// closed: stalled bodies, answers nobody reads.
    pub idle_timeout: HumanDuration,
    /// Open admin connections at most; the next ones are answered 503 and closed.
    pub max_connections: usize,
    /// Largest request body the admin API reads (413 above it).
    pub max_body: HumanSize,
    /// Serve the admin port over TLS (same certificate settings as `server.tls`).
    pub tls: Option<TlsConfig>,
    /// Bearer token `/metrics` asks for. Empty: `/metrics` is open.
    #[serde(skip_serializing)]
    pub metrics_token: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9090".into(),
            token: String::new(),
            jwt_secret: String::new(),
            token_ttl: Duration::from_secs(3600).into(),
            password_concurrency: 2,
            password_queue: 8,
            max_keys_per_user: 100,
            header_timeout: Duration::from_secs(30).into(),
            idle_timeout: Duration::from_secs(75).into(),
            max_connections: 256,
            max_body: HumanSize(1024 * 1024),
            tls: None,
            metrics_token: String::new(),
        }
    }
}
