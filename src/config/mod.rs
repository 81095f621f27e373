//! Configuration: the serde surface of `conf/fastgate.yaml` and `routes.d/*.yaml`,
//! loading with environment interpolation, and validation that reports every
//! problem at once as `file:line: message`.
//!
//! The file types here are plain data. `router` and `upstream` compile them
//! into the runtime forms the proxy uses.

pub mod ca_roots;
pub mod capabilities;
pub mod endpoint;
pub mod env;
pub mod routes_d;
pub mod strength;
pub mod values;

use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

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
        }
    }
}

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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Write one row per proxied request to the `audit_log` table.
    pub enabled: bool,
    /// Keep request/response headers (credentials and cookies redacted).
    pub capture_headers: bool,
    /// Keep request/response bodies, each cut at `body_max_bytes`.
    pub capture_body: bool,
    pub body_max_bytes: HumanSize,
    /// A streamed answer's captured body is the answer merged into the
    /// client's non-stream JSON (text, tool calls, finish, usage) rather
    /// than its events, so the log shows what the model said.
    pub merge_streams: bool,
    /// Rows older than this are deleted in the background.
    pub retention: HumanDuration,
    /// Records waiting for the writer; when full, records are dropped (and counted), never waited for.
    pub queue_size: usize,
    /// Most rows written in one transaction.
    pub batch_size: usize,
    /// Size budget of the database (used pages): past it the oldest audit
    /// rows are deleted, alongside `retention`. 0 = no budget.
    pub max_bytes: HumanSize,
    /// Requests refused before a route or a valid key (no route, no key,
    /// bad or inactive key): one row per client per second, all, or none.
    pub refused: RefusedMode,
}

/// `audit.refused`: which refused requests get an audit row. All of them
/// are counted in `fastgate_refused_requests_total` either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RefusedMode {
    /// At most one row per client address (IPv6: per /64) per second.
    #[default]
    Sampled,
    /// Every refusal (a client without a key can then write rows at will).
    All,
    /// None.
    None,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            capture_headers: true,
            capture_body: false,
            body_max_bytes: HumanSize(16 * 1024),
            merge_streams: true,
            retention: Duration::from_secs(30 * 24 * 3600).into(),
            queue_size: 65_536,
            batch_size: 512,
            max_bytes: HumanSize(10 * 1024 * 1024 * 1024),
            refused: RefusedMode::Sampled,
        }
    }
}

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

/// The wire protocol an upstream speaks.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    Openai,
    Anthropic,
    Gemini,
    OpenaiCompatible,
    /// Any HTTP service: no API format, no key injection unless a pool is set.
    Http,
    /// Answered inside FastGate (offline demo and first try).
    Mock,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::Anthropic => "anthropic",
            Self::Gemini => "gemini",
            Self::OpenaiCompatible => "openai_compatible",
            Self::Http => "http",
            Self::Mock => "mock",
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    Random,
    ConsistentHash,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub provider: Provider,
    #[serde(default)]
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default)]
    pub key_pool: Option<String>,
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// Settings of the built-in mock provider.
    #[serde(default)]
    pub mock: Option<MockConfig>,
    /// The models this upstream serves; they get their own `tokens_total`
    /// series (other names are counted under `other`).
    #[serde(default)]
    pub models: Vec<String>,
    /// Requests in flight toward this upstream at most (0 = unlimited); over
    /// it, the next upstream in the route's chain is tried, else 503.
    #[serde(default)]
    pub max_in_flight: u32,
    /// Active health checks of the resolved endpoint addresses.
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    /// `max_tokens` sent to an Anthropic upstream when a converted request
    /// names none (Anthropic requires it).
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u64,
    /// Send `X-Forwarded-For` (the client's address appended to what trusted
    /// proxies said) and `X-Forwarded-Proto` to this upstream. Off by
    /// default: providers do not need the client's address, and forwarding
    /// headers a client sent are removed.
    #[serde(default)]
    pub forwarded_headers: bool,
    /// How many retries may be in flight toward this upstream at once
    /// (Envoy's `retry_budget`), so a provider in trouble is not hit with
    /// a multiple of its normal load.
    #[serde(default)]
    pub retry_budget: RetryBudgetConfig,
    /// What this upstream's models take, checked before the shipped table
    /// (`src/convert/capabilities.yaml`): rules of a `match` glob and the
    /// fields it sets (`reasoning`, `sampling_pair`, `parameters_json_schema`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<crate::config::capabilities::CapabilityRule>,
}

/// Retries in flight toward an upstream: at most `percent` of its active
/// requests, and `min_concurrency` whatever the load (a quiet upstream still
/// gets its retries).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudgetConfig {
    pub percent: f64,
    pub min_concurrency: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            percent: 20.0,
            min_concurrency: 3,
        }
    }
}

fn default_max_tokens() -> u64 {
    8192
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    /// A TCP connect (and TLS handshake for https endpoints).
    #[default]
    Tcp,
    /// `GET path`, healthy on any status below 500.
    Http,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    #[serde(rename = "type")]
    pub kind: HealthCheckKind,
    /// For `type: http`; setting it alone implies `http`.
    pub path: Option<String>,
    pub interval: HumanDuration,
    pub timeout: HumanDuration,
    /// Consecutive results that flip an address's health.
    pub rise: usize,
    pub fall: usize,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            kind: HealthCheckKind::Tcp,
            path: None,
            interval: Duration::from_secs(10).into(),
            timeout: Duration::from_secs(2).into(),
            rise: 1,
            fall: 1,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    pub connect: HumanDuration,
    /// Until the response headers arrive (a model "thinking" counts here).
    pub first_byte: HumanDuration,
    /// Longest silence between two reads of the response body.
    pub idle: HumanDuration,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5).into(),
            first_byte: Duration::from_secs(120).into(),
            idle: Duration::from_secs(300).into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MockConfig {
    /// Pause between two streamed events.
    pub chunk_interval: HumanDuration,
    /// The text every answer contains.
    pub reply: String,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            chunk_interval: Duration::from_millis(50).into(),
            reply: "Hello from the FastGate mock upstream! Configure a real provider in conf/fastgate.yaml to talk to a model.".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum KeyStrategy {
    #[default]
    RoundRobin,
    LeastInFlight,
    Random,
    /// Random, in proportion to each key's `weight`.
    Weighted,
}

impl KeyStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "round_robin",
            Self::LeastInFlight => "least_in_flight",
            Self::Random => "random",
            Self::Weighted => "weighted",
        }
    }
}

/// What a 429 or 5xx cools: the whole key, or the key for that model only.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CooldownScope {
    Key,
    Model,
}

impl CooldownScope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::Model => "model",
        }
    }
}

/// Exponential backoff for keys that 429 or fail without saying for how long.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CooldownConfig {
    pub initial: HumanDuration,
    pub max: HumanDuration,
    pub multiplier: f64,
    /// Longest wait a provider's header or body may impose (a bogus date
    /// must not bench a key for a year); providers cap theirs at 24 h.
    pub max_wait: HumanDuration,
    /// Consecutive 5xx answers before a key cools: one 5xx says the
    /// provider is unwell (or a client sent odd input), not that the key is
    /// spent. 529 and 503 with `Retry-After` (overloaded) cool at once.
    pub after_5xx: u32,
}

impl Default for CooldownConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1).into(),
            max: Duration::from_secs(300).into(),
            multiplier: 2.0,
            max_wait: Duration::from_secs(24 * 3600).into(),
            after_5xx: 3,
        }
    }
}

/// A set of HTTP statuses in config: numbers and ranges, `[429, "500-599"]`.
/// Checked at load (100..=599, low <= high), so `fastgate check` names a
/// bad entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "Vec<StatusItem>", into = "Vec<StatusItem>")]
pub struct StatusSet(Vec<(u16, u16)>);

/// One entry of a [`StatusSet`] as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum StatusItem {
    Code(u16),
    Text(String),
}

impl StatusSet {
    /// The set of the given inclusive ranges (defaults, tests).
    pub fn of(ranges: &[(u16, u16)]) -> Self {
        StatusSet(ranges.to_vec())
    }

    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&status))
    }
}

impl TryFrom<Vec<StatusItem>> for StatusSet {
    type Error = String;

    fn try_from(items: Vec<StatusItem>) -> Result<Self, String> {
        let code = |t: &str| -> Result<u16, String> {
            t.trim()
                .parse::<u16>()
                .map_err(|_| format!("{t:?} is not a status code (write 429 or \"500-599\")"))
        };
        let mut ranges = Vec::with_capacity(items.len());
        for item in items {
            let (lo, hi) = match &item {
                StatusItem::Code(c) => (*c, *c),
                StatusItem::Text(t) => match t.split_once('-') {
                    Some((lo, hi)) => (code(lo)?, code(hi)?),
                    None => {
                        let c = code(t)?;
                        (c, c)
                    }
                },
            };
            if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
                return Err(format!(
                    "status {item:?} must be a code or a range \"low-high\" within 100-599"
                ));
            }
            ranges.push((lo, hi));
        }
        Ok(StatusSet(ranges))
    }
}

impl From<StatusSet> for Vec<StatusItem> {
    fn from(s: StatusSet) -> Self {
        s.0.into_iter()
            .map(|(lo, hi)| {
                if lo == hi {
                    StatusItem::Code(lo)
                } else {
                    StatusItem::Text(format!("{lo}-{hi}"))
                }
            })
            .collect()
    }
}

/// A pool key in config: the secret alone, or with a weight for `weighted`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum PoolKeyEntry {
    Secret(String),
    Weighted {
        key: String,
        #[serde(default = "one")]
        weight: u32,
    },
}

fn one() -> u32 {
    1
}

impl PoolKeyEntry {
    pub fn secret(&self) -> &str {
        match self {
            Self::Secret(s) | Self::Weighted { key: s, .. } => s,
        }
    }

    pub fn weight(&self) -> u32 {
        match self {
            Self::Secret(_) => 1,
            Self::Weighted { weight, .. } => *weight,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyPoolConfig {
    /// Empty strings (an unset `${VAR:-}`) are ignored.
    #[serde(skip_serializing)]
    pub keys: Vec<PoolKeyEntry>,
    pub strategy: KeyStrategy,
    /// Default: `model` when a Gemini upstream uses the pool, else `key`.
    pub cooldown_scope: Option<CooldownScope>,
    pub cooldown: CooldownConfig,
    /// Statuses that cool a key (5xx only after `cooldown.after_5xx` in a row).
    pub cool_on: StatusSet,
    /// Statuses that count towards `disable_after` (the provider refused the key).
    pub disable_on: StatusSet,
    /// Consecutive `disable_on` answers (401/403) that disable a key until re-enabled.
    pub disable_after: u32,
    /// 0 = unlimited.
    pub max_in_flight_per_key: u32,
    /// A lease held longer than this is reclaimed (a request that never ended).
    pub stuck_after: HumanDuration,
    /// How often a key the provider disabled (401/403) is tried again with
    /// one cheap request; 0 = never. A provider's auth outage then does not
    /// take the pool down until someone acts.
    pub reprobe_interval: HumanDuration,
}

impl Default for KeyPoolConfig {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            strategy: KeyStrategy::default(),
            cooldown_scope: None,
            cooldown: CooldownConfig::default(),
            cool_on: StatusSet::of(&[(429, 429), (500, 599)]),
            disable_on: StatusSet::of(&[(401, 401), (403, 403)]),
            disable_after: 3,
            max_in_flight_per_key: 0,
            stuck_after: Duration::from_secs(600).into(),
            reprobe_interval: Duration::from_secs(600).into(),
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

/// Read the main config file, interpolate, parse and validate it.
pub fn load_config(path: &Path) -> Result<Config, ConfigErrors> {
    let raw = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![Diagnostic {
            file: path.to_path_buf(),
            line: 1,
            message: format!("cannot read: {e}"),
        }])
    })?;
    parse_config(path, &raw)
}

/// Parse and validate config text as if read from `path`.
pub fn parse_config(path: &Path, raw: &str) -> Result<Config, ConfigErrors> {
    let text = interpolate(path, raw)?;
    let file: FileConfig = parse_yaml(path, &text)?;
    let mut errors = Vec::new();
    let at = |needle: &str| line_of(&text, needle);
    let diag = |line: usize, message: String| Diagnostic {
        file: path.to_path_buf(),
        line,
        message,
    };

    let listen = match file.server.listen.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errors.push(diag(
                at("listen:"),
                format!(
                    "server.listen: {:?} is not an address like 0.0.0.0:8080",
                    file.server.listen
                ),
            ));
            None
        }
    };
    let admin_listen = match file.admin.listen.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errors.push(diag(
                at("listen:"),
                format!(
                    "admin.listen: {:?} is not an address like 127.0.0.1:9090",
                    file.admin.listen
                ),
            ));
            None
        }
    };
    if let Some(tls) = &file.server.tls {
        if tls.cert.is_some() != tls.key.is_some() {
            errors.push(diag(at("tls:"), "server.tls: `cert` and `key` go together".into()));
        } else if tls.pairs().is_empty() {
            errors.push(diag(
                at("tls:"),
                "server.tls: needs `cert` and `key`, or `certificates: [{cert, key}, ...]`".into(),
            ));
        }
        if file.server.h2c {
            errors.push(diag(
                at("h2c:"),
                "server.h2c: h2c is for plain listeners; with TLS, HTTP/2 is offered by ALPN (`tls.h2`)".into(),
            ));
        }
    }
    match crate::client_addr::TrustedProxies::parse(&file.server.trusted_proxies) {
        Ok(t) if t.is_empty() && file.server.proxy_protocol => errors.push(diag(
            at("proxy_protocol:"),
            "server.proxy_protocol: list the balancers' addresses in server.trusted_proxies (no one else may send a PROXY header)".into(),
        )),
        Ok(_) => {}
        Err(bad) => errors.extend(bad.into_iter().map(|m| diag(at("trusted_proxies:"), m))),
    }
    let limits = &file.server.limits;
    if limits.max_header_bytes.0 < 1024 || limits.max_uri_bytes.0 < 256 || limits.max_header_value_bytes.0 < 256 {
        errors.push(diag(
            at("limits:"),
            "server.limits: max_header_bytes must be at least 1KiB, max_uri_bytes and max_header_value_bytes at least 256 bytes".into(),
        ));
    }
    if limits.client_body_timeout.0 < Duration::from_millis(100) {
        errors.push(diag(
            at("client_body_timeout:"),
            "server.limits.client_body_timeout must be at least 100ms".into(),
        ));
    }
    if limits.client_header_timeout.0 < Duration::from_millis(100) {
        errors.push(diag(
            at("client_header_timeout:"),
            "server.limits.client_header_timeout must be at least 100ms".into(),
        ));
    }
    if file.audit.queue_size == 0 || file.audit.batch_size == 0 {
        errors.push(diag(
            at("audit:"),
            "audit.queue_size and audit.batch_size must be greater than zero".into(),
        ));
    }
    for (name, up) in &file.upstreams {
        let line = at(&format!("{name}:"));
        if up.provider == Provider::Mock {
            if !up.endpoints.is_empty() {
                errors.push(diag(
                    line,
                    format!("upstreams.{name}: a mock upstream has no endpoints"),
                ));
            }
        } else {
            if up.endpoints.is_empty() {
                errors.push(diag(
                    line,
                    format!("upstreams.{name}.endpoints: at least one endpoint is required"),
                ));
            }
            if up.mock.is_some() {
                errors.push(diag(
                    line,
                    format!("upstreams.{name}.mock: only a `provider: mock` upstream takes mock settings"),
                ));
            }
        }
        for ep in &up.endpoints {
            if let Err(e) = endpoint::EndpointUrl::parse(ep) {
                errors.push(diag(at(ep), format!("upstreams.{name}.endpoints: {e}")));
            }
        }
        for rule in &up.capabilities {
            if let Err(e) = capabilities::valid_pattern(&rule.pattern) {
                errors.push(diag(
                    line,
                    format!("upstreams.{name}.capabilities: match {:?}: {e}", rule.pattern),
                ));
            }
        }
        if let Some(pool) = &up.key_pool
            && !file.key_pools.contains_key(pool)
        {
            errors.push(diag(
                at(&format!("key_pool: {pool}")),
                format!("upstreams.{name}.key_pool: no key pool named {pool:?} in key_pools"),
            ));
        }
        if up.timeouts.connect.0.is_zero() || up.timeouts.first_byte.0.is_zero() || up.timeouts.idle.0.is_zero() {
            errors.push(diag(
                line,
                format!("upstreams.{name}.timeouts: timeouts must be greater than zero"),
            ));
        }
    }
    for (name, pool) in &file.key_pools {
        let line = at(&format!("{name}:"));
        let c = &pool.cooldown;
        if c.initial.0.is_zero() || c.max.0 < c.initial.0 || !(c.multiplier >= 1.0 && c.multiplier <= 100.0) {
            errors.push(diag(
                line,
                format!("key_pools.{name}.cooldown: needs initial > 0, max >= initial and 1 <= multiplier <= 100"),
            ));
        }
        if c.max_wait.0 < c.initial.0 || c.max_wait.0 > Duration::from_secs(366 * 24 * 3600) || c.after_5xx == 0 {
            errors.push(diag(
                line,
                format!("key_pools.{name}.cooldown: needs initial <= max_wait <= 366d and after_5xx >= 1"),
            ));
        }
        if pool.keys.iter().any(|k| k.weight() == 0) {
            errors.push(diag(
                line,
                format!("key_pools.{name}.keys: a weight must be at least 1"),
            ));
        }
        if pool.stuck_after.0.is_zero() {
            errors.push(diag(
                line,
                format!("key_pools.{name}.stuck_after must be greater than zero"),
            ));
        }
        let reprobe = pool.reprobe_interval.0;
        if !reprobe.is_zero() && reprobe < Duration::from_secs(1) {
            errors.push(diag(
                line,
                format!("key_pools.{name}.reprobe_interval must be 0 (never) or at least 1s"),
            ));
        }
    }
    for (name, up) in &file.upstreams {
        if let Some(hc) = &up.health_check
            && (hc.interval.0.is_zero() || hc.timeout.0.is_zero() || hc.rise == 0 || hc.fall == 0)
        {
            errors.push(diag(
                at("health_check"),
                format!("upstreams.{name}.health_check: interval, timeout, rise and fall must be greater than zero"),
            ));
        }
        let pct = up.retry_budget.percent;
        if !(0.0..=100.0).contains(&pct) {
            errors.push(diag(
                at("retry_budget"),
                format!("upstreams.{name}.retry_budget.percent must be between 0 and 100 (got {pct})"),
            ));
        }
    }
    if !file.cluster.postgres.is_empty()
        && let Err(e) = file.cluster.postgres.parse::<tokio_postgres::Config>()
    {
        errors.push(diag(at("postgres:"), format!("cluster.postgres: {e}")));
    }
    if let Some(ca) = &file.cluster.ca_file
        && let Err(e) = ca_roots::load(ca)
    {
        errors.push(diag(at("ca_file:"), format!("cluster.ca_file: {e}")));
    }
    if file.cluster.enabled() {
        let c = &file.cluster;
        if let Err(e) = url::Url::parse(&c.redis)
            .map_err(|e| e.to_string())
            .and_then(|u| match u.scheme() {
                "redis" | "rediss" => Ok(()),
                s => Err(format!("scheme {s}: use redis:// or rediss://")),
            })
        {
            errors.push(diag(at("redis:"), format!("cluster.redis: {e}")));
        }
        if c.timeout.0.is_zero() || c.rate_window.0 < Duration::from_secs(1) {
            errors.push(diag(
                at("cluster:"),
                "cluster: timeout must be greater than zero and rate_window at least 1s".into(),
            ));
        }
    }
    // Secrets: each guards the whole gateway alone (see `strength`).
    for (setting, key, value) in [
        ("admin.token", "token:", &file.admin.token),
        ("admin.jwt_secret", "jwt_secret:", &file.admin.jwt_secret),
        ("admin.metrics_token", "metrics_token:", &file.admin.metrics_token),
        ("secrets.master_key", "master_key:", &file.secrets.master_key),
    ] {
        if let Some(message) = strength::weakness(setting, value) {
            errors.push(diag(key_line(&text, key), message));
        }
    }
    let a = &file.admin;
    if a.header_timeout.0.is_zero() || a.idle_timeout.0.is_zero() || a.max_connections == 0 || a.max_body.0 == 0 {
        errors.push(diag(
            at("admin:"),
            "admin: header_timeout, idle_timeout, max_connections and max_body must be greater than zero".into(),
        ));
    }
    if let Some(tls) = &a.tls
        && (tls.cert.is_some() != tls.key.is_some() || tls.pairs().is_empty())
    {
        errors.push(diag(
            key_line(&text, "tls:").max(at("admin:")),
            "admin.tls: needs `cert` and `key`, or `certificates: [{cert, key}, ...]`".into(),
        ));
    }
    if file.server.max_request_body.0 == 0 {
        errors.push(diag(
            at("max_request_body"),
            "server.max_request_body must be greater than zero".into(),
        ));
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    // Relative paths are relative to the working directory, like nginx's
    // prefix: run from the install directory (systemd: WorkingDirectory=).
    let routes_dir = file.routes_dir.clone();
    let database_path = file.database.path.clone();
    Ok(Config {
        listen: listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080))),
        admin_listen: admin_listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9090))),
        file,
        path: path.to_path_buf(),
        routes_dir,
        database_path,
    })
}

/// Interpolate environment variables, reporting unset ones with their line.
pub(crate) fn interpolate(path: &Path, raw: &str) -> Result<String, ConfigErrors> {
    env::interpolate(raw, |name| std::env::var(name).ok()).map_err(|missing| {
        ConfigErrors(
            missing
                .into_iter()
                .map(|m| Diagnostic {
                    file: path.to_path_buf(),
                    line: m.line,
                    message: format!(
                        "environment variable {} is not set (write ${{{}:-default}} to make it optional)",
                        m.name, m.name
                    ),
                })
                .collect(),
        )
    })
}

/// Parse YAML into `T`, turning serde errors into a located diagnostic.
pub(crate) fn parse_yaml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigErrors> {
    serde_norway::from_str(text).map_err(|e| {
        let line = e.location().map_or(1, |l| l.line());
        // serde_norway appends " at line X column Y"; the prefix says it already.
        let msg = e.to_string();
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        ConfigErrors(vec![Diagnostic {
            file: path.to_path_buf(),
            line,
            message: msg,
        }])
    })
}

/// The first line whose key is `key` (`token:` finds `  token: x`, not
/// `  metrics_token: x`); falls back to line 1.
fn key_line(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(key))
        .map_or(1, |i| i + 1)
}

/// The first line containing `needle`, for pointing at semantic errors that
/// serde cannot locate. Falls back to line 1.
pub(crate) fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).map_or(1, |i| i + 1)
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
