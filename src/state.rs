//! The one shared handle: configuration, the hot-swappable route table,
//! upstreams, key pools, the gateway-key cache and the upstream connector.

use crate::{
    audit::AuditSink,
    auth::KeyCache,
    config::{Config, ConfigErrors, CooldownScope, FileConfig, Provider},
    metrics::Metrics,
    pool::{KeyPool, KeySource, PoolKey},
    router::RouteTable,
    router::load_routes,
    store::{self, pool_keys::StoredKey},
    upstream::Upstream,
};
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use pingora::connectors::{ConnectorOptions, http::Connector};
use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

/// Where the process is in its life. Readiness answers 503 from the moment
/// it leaves `Serving`, so a balancer stops sending before anything closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Serving,
    /// SIGTERM/SIGINT: listeners closed, in-flight requests finishing.
    Draining,
    /// SIGQUIT: the listening sockets go to a new process, then drain.
    HandingOver,
}

impl Lifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Serving => "serving",
            Lifecycle::Draining => "draining",
            Lifecycle::HandingOver => "handing_over",
        }
    }
}

/// Outcome of the last route reload, for logs and (later) the admin API.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    pub last_error: Option<String>,
}

/// What `fastgate.yaml` reloads live: upstreams and key pools, with the
/// file they came from. Swapped whole; a request keeps the one it started
/// with.
pub struct Runtime {
    pub file: FileConfig,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    pub pools: HashMap<String, Arc<KeyPool>>,
    /// `pricing:` compiled (the shipped table included).
    pub prices: Arc<crate::pricing::PriceTable>,
}

impl Runtime {
    /// The upstream a pool's keys are tested and re-probed through: the
    /// first by name of those that use the pool.
    pub fn pool_upstream(&self, pool: &Arc<KeyPool>) -> Option<Arc<Upstream>> {
        self.upstreams
            .values()
            .filter(|u| u.key_pool.as_ref().is_some_and(|p| Arc::ptr_eq(p, pool)))
            .min_by(|a, b| a.name.cmp(&b.name))
            .cloned()
    }

    /// `key_pools.{pool}.reprobe_interval` (zero for a pool not in the file).
    pub fn reprobe_interval(&self, pool: &str) -> std::time::Duration {
        self.file
            .key_pools
            .get(pool)
            .map_or(std::time::Duration::ZERO, |c| c.reprobe_interval.0)
    }

    /// Build from `file` and the admin-added keys, keeping from `previous`
    /// what did not change: whole pools and upstreams when their settings
    /// and keys are the same, else the live keys (state, in-flight, totals)
    /// of keys that still exist.
    pub fn build(file: FileConfig, stored: &[StoredKey], previous: Option<&Runtime>) -> Runtime {
        let mut pools = HashMap::new();
        for (name, cfg) in &file.key_pools {
            let gemini = file
                .upstreams
                .values()
                .any(|u| u.key_pool.as_deref() == Some(name.as_str()) && u.provider == Provider::Gemini);
            let scope = if gemini {
                CooldownScope::Model
            } else {
                CooldownScope::Key
            };
            let wanted: Vec<(String, u32, KeySource)> = cfg
                .keys
                .iter()
                .map(|k| (k.secret().trim().to_string(), k.weight(), KeySource::Config))
                .chain(
                    stored
                        .iter()
                        .filter(|k| k.pool == *name)
                        .map(|k| (k.secret.clone(), k.weight, KeySource::Admin)),
                )
                .filter(|(s, _, _)| !s.is_empty())
                .collect();
            let old = previous.and_then(|p| p.pools.get(name));
            let same_keys = |old: &KeyPool| {
                let keys = old.keys();
                keys.len() == wanted.len()
                    && keys
                        .iter()
                        .zip(&wanted)
                        .all(|(k, (s, w, src))| k.id == crate::pool::key_id(s) && k.weight == *w && k.source == *src)
            };
            let same_policy = |old: &KeyPool| {
                previous.is_some_and(|p| {
                    p.file.key_pools.get(name).map(settings_of) == Some(settings_of(cfg))
                        && old.policy.scope == cfg.cooldown_scope.unwrap_or(scope)
                })
            };
            if let Some(old) = old
                && same_keys(old)
                && same_policy(old)
            {
                pools.insert(name.clone(), old.clone());
                continue;
            }
            let keys = wanted
                .iter()
                .map(|(secret, weight, source)| {
                    let id = crate::pool::key_id(secret);
                    match old.and_then(|o| o.key(&id)) {
                        Some(k) if k.weight == *weight && k.source == *source => k,
                        Some(k) => {
                            let fresh = PoolKey::new(secret, *weight, *source);
                            fresh.restore(k.status(), k.totals());
                            Arc::new(fresh)
                        }
                        None => Arc::new(PoolKey::new(secret, *weight, *source)),
                    }
                })
                .collect();
            let mut pool = KeyPool::from_config(name, cfg, scope);
            pool.replace_keys(keys);
            pools.insert(name.clone(), Arc::new(pool));
        }
        let upstreams = file
            .upstreams
            .iter()
            .map(|(name, u)| {
                let pool = u.key_pool.as_ref().and_then(|p| pools.get(p));
                let reuse = previous.and_then(|p| {
                    let old = p.upstreams.get(name)?;
                    let same_cfg = p.file.upstreams.get(name).map(settings_of) == Some(settings_of(u));
                    let same_pool = match (&old.key_pool, pool) {
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        (None, None) => true,
                        _ => false,
                    };
                    (same_cfg && same_pool).then(|| old.clone())
                });
                let up = reuse.unwrap_or_else(|| Arc::new(Upstream::build(name, u, &pools)));
                (name.clone(), up)
            })
            .collect();
        let prices = match previous {
            Some(p) if p.file.pricing == file.pricing => p.prices.clone(),
            _ => Arc::new(price_table(&file.pricing)),
        };
        Runtime {
            file,
            upstreams,
            pools,
            prices,
        }
    }
}

/// Settings compared as their serialized form (secrets are not serialized;
/// keys are compared apart).
fn settings_of<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// How long readiness waits for the database's write lock.
const READY_WAIT: std::time::Duration = std::time::Duration::from_millis(750);

pub struct AppState {
    pub config: Config,
    /// Swapped whole on reload; a request keeps the table it started with.
    pub routes: ArcSwap<RouteTable>,
    /// Upstreams and key pools; swapped whole on a config reload.
    pub runtime: ArcSwap<Runtime>,
    /// Seals upstream keys added through the admin API.
    pub sealer: crate::seal::Sealer,
    pub keys: KeyCache,
    /// Upstream connections for routes whose body FastGate reads itself.
    pub connector: Connector,
    /// Requests currently being served (graceful shutdown waits on it).
    pub in_flight: AtomicUsize,
    /// Whose forwarding and PROXY headers name the client.
    pub trusted_proxies: crate::client_addr::TrustedProxies,
    /// The TLS listener's certificates (reloaded on SIGHUP and file change).
    pub tls: Option<Arc<crate::tls::CertResolver>>,
    /// The admin listener's certificates (`admin.tls`; reloaded with `tls`).
    pub admin_tls: Option<Arc<crate::tls::CertResolver>>,
    /// Serving, draining or handing over; watched by the admin service.
    pub lifecycle: tokio::sync::watch::Sender<Lifecycle>,
    pub reload: Mutex<ReloadStatus>,
    pub metrics: Metrics,
    pub limiter: crate::ratelimit::RateLimiter,
    /// Cluster mode: the shared limits and key states (Redis).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Cluster mode with Postgres: a connection for the admin API's reads of
    /// the cluster's audit log, while Postgres is reachable.
    pub cluster_log: arc_swap::ArcSwapOption<tokio_postgres::Client>,
    pub quotas: crate::ratelimit::QuotaTracker,
    /// Budgets in money counted on this node (all of them without a
    /// cluster; this node's share and own spend with one).
    pub budgets: crate::budget::BudgetTracker,
    pub alerts: Arc<crate::budget::Alerts>,
    /// The budget webhook's queue, until its sender task takes it.
    pub alert_queue: Mutex<Option<tokio::sync::mpsc::Receiver<crate::budget::AlertEvent>>>,
    pub audit: AuditSink,
    /// The OpenTelemetry trace exporter (`otel:`); empty when off. Swapped
    /// on a config reload; a request reads it at its start and its end.
    pub otel: arc_swap::ArcSwapOption<crate::otel::Tracer>,
    /// A connection for readiness checks only.
    health_db: Mutex<rusqlite::Connection>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("server.tls: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Tls(Vec<crate::tls::TlsError>),
    #[error("admin.tls: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    AdminTls(Vec<crate::tls::TlsError>),
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("{0}")]
    Otel(String),
}

impl AppState {
    /// Build everything the data plane needs from a validated config.
    pub fn build(config: Config) -> Result<Arc<Self>, StartupError> {
        let routes = load_routes(&config.routes_dir, &config.file)?;
        let sealer = crate::seal::Sealer::new(&config.file.secrets.master_key);
        let conn = store::open(&config.database_path)?;
        let stored = stored_pool_keys(&conn, &sealer)?;
        let runtime = Runtime::build(config.file.clone(), &stored, None);
        restore_pool_states(&conn, &runtime)?;
        // With Postgres, queue every change to users and keys from the
        // first moment (also those made before it is first reached).
        store::sync::set_enabled(&conn, !config.file.cluster.postgres.is_empty())?;
        drop(conn);
        let keys = KeyCache::load(store::open(&config.database_path)?)?;
        let audit = if config.file.audit.enabled {
            AuditSink::start(&config.database_path, &config.file.audit)?
        } else {
            AuditSink::disabled()
        };
        let tls = match &config.file.server.tls {
            Some(t) => Some(Arc::new(crate::tls::CertResolver::load(t).map_err(StartupError::Tls)?)),
            None => None,
        };
        let admin_tls = match &config.file.admin.tls {
            Some(t) => Some(Arc::new(
                crate::tls::CertResolver::load(t).map_err(StartupError::AdminTls)?,
            )),
            None => None,
        };
        // Validated with the config already.
        let trusted_proxies =
            crate::client_addr::TrustedProxies::parse(&config.file.server.trusted_proxies).unwrap_or_default();
        let health_db = Mutex::new(store::open(&config.database_path)?);
        let opts = ConnectorOptions::new(config.file.server.upstream_keepalive_pool);
        let metrics = Metrics::new()?;
        let budgets_cfg = &config.file.budgets;
        let (alert_tx, alert_rx) = match &budgets_cfg.webhook {
            Some(_) => {
                let (tx, rx) = tokio::sync::mpsc::channel(ALERT_QUEUE);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let alerts = Arc::new(crate::budget::Alerts::new(
            budgets_cfg.alert_thresholds.clone(),
            metrics.budget_alerts.clone(),
            metrics.budget_webhook_failed.clone(),
            alert_tx,
        ));
        let cluster = if config.file.cluster.enabled() {
            crate::pool::changes::collect();
            Some(crate::cluster::Cluster::new(
                &config.file.cluster,
                &metrics,
                alerts.clone(),
            )?)
        } else {
            None
        };
        let otel = match &config.file.otel {
            Some(c) => Some(Arc::new(
                crate::otel::Tracer::start(c, metrics.otel_counters()).map_err(StartupError::Otel)?,
            )),
            None => None,
        };
        // The fallback counts the shared limits' window.
        let window_ms = match &cluster {
            Some(c) => c.config.rate_window.0.as_millis() as u64,
            None => 60_000,
        };
        Ok(Arc::new(AppState {
            routes: ArcSwap::from_pointee(routes),
            runtime: ArcSwap::from_pointee(runtime),
            sealer,
            keys,
            connector: Connector::new(Some(opts)),
            in_flight: AtomicUsize::new(0),
            trusted_proxies,
            tls,
            admin_tls,
            lifecycle: tokio::sync::watch::Sender::new(Lifecycle::Serving),
            reload: Mutex::new(ReloadStatus::default()),
            metrics,
            limiter: crate::ratelimit::RateLimiter::with_window(window_ms),
            cluster,
            cluster_log: arc_swap::ArcSwapOption::empty(),
            quotas: crate::ratelimit::QuotaTracker::default(),
            budgets: crate::budget::BudgetTracker::default(),
            alerts,
            alert_queue: Mutex::new(alert_rx),
            audit,
            otel: arc_swap::ArcSwapOption::new(otel),
            health_db,
            config,
        }))
    }

    /// Re-read `routes.d`; swap the table in only if every file is valid.
    pub fn reload_routes(&self) -> Result<usize, ConfigErrors> {
        let result = load_routes(&self.config.routes_dir, &self.runtime.load().file);
        let mut status = self.reload.lock();
        match result {
            Ok(table) => {
                let n = table.len();
                self.routes.store(Arc::new(table));
                self.metrics.config_reloads.with_label_values(&["success"]).inc();
                status.last_error = None;
                tracing::info!(routes = n, "Reloaded routes.d.");
                Ok(n)
            }
            Err(e) => {
                self.metrics.config_reloads.with_label_values(&["failure"]).inc();
                status.last_error = Some(e.to_string());
                tracing::error!(error = %e, "Rejected routes.d change; the previous route table keeps serving.");
                Err(e)
            }
        }
    }

    /// Re-read `fastgate.yaml` and swap in its upstreams and key pools, with
    /// `routes.d` validated against them; on any error nothing changes.
    /// Blocking (file reads, DNS). Returns the sections that changed but
    /// only take effect after a restart.
    /// Re-read the TLS certificates: new handshakes get them, open
    /// connections keep theirs; if any file is bad, none is swapped in.
    /// Blocking file I/O.
    pub fn reload_certificates(&self, trigger: &str) {
        for (listener, certs) in [("server", &self.tls), ("admin", &self.admin_tls)] {
            let Some(certs) = certs else { continue };
            match certs.reload() {
                Ok(n) => tracing::info!(trigger, listener, certificates = n, "Reloaded TLS certificates."),
                Err(errors) => {
                    for e in errors {
                        tracing::error!(trigger, listener, error = %e, "TLS certificates not reloaded; the previous ones keep serving.");
                    }
                }
            }
        }
    }

    /// Rebuild the pools with the API-added keys the database holds now
    /// (cluster mode: another node added or removed one), keeping every
    /// live key's state. Blocking.
    pub fn reload_stored_pool_keys(&self) -> Result<(), store::StoreError> {
        let stored = stored_pool_keys(&store::open(&self.config.database_path)?, &self.sealer)?;
        let previous = self.runtime.load_full();
        let runtime = Runtime::build(previous.file.clone(), &stored, Some(&previous));
        self.runtime.store(Arc::new(runtime));
        Ok(())
    }

    /// Reload `fastgate.yaml` and `routes.d` (and the TLS certificates, whose
    /// files may have been replaced with them): SIGHUP and the admin API.
    pub fn reload_config(&self) -> Result<Vec<String>, ConfigErrors> {
        self.reload_certificates("config reload");
        let result = self.try_reload_config();
        let outcome = if result.is_ok() { "success" } else { "failure" };
        self.metrics.config_reloads.with_label_values(&[outcome]).inc();
        match &result {
            Ok(restart) => {
                self.reload.lock().last_error = None;
                tracing::info!(needs_restart = ?restart, "Reloaded fastgate.yaml (upstreams, key pools) and routes.d.");
            }
            Err(e) => {
                self.reload.lock().last_error = Some(e.to_string());
                tracing::error!(error = %e, "Rejected the fastgate.yaml change; the previous configuration keeps serving.");
            }
        }
        result
    }

    fn try_reload_config(&self) -> Result<Vec<String>, ConfigErrors> {
        let fresh = crate::config::load_config(&self.config.path)?;
        let fail = |e: store::StoreError| {
            ConfigErrors(vec![crate::config::Diagnostic {
                file: self.config.database_path.clone(),
                line: 1,
                message: e.to_string(),
            }])
        };
        let table = load_routes(&self.config.routes_dir, &fresh.file)?;
        let stored = store::open(&self.config.database_path)
            .and_then(|c| stored_pool_keys(&c, &self.sealer))
            .map_err(fail)?;
        // A new trace exporter is started before anything is swapped: one
        // that cannot start rejects the reload.
        let otel = self.reload_otel(&fresh.file).map_err(|message| {
            ConfigErrors(vec![crate::config::Diagnostic {
                file: self.config.path.clone(),
                line: 1,
                message,
            }])
        })?;
        let previous = self.runtime.load_full();
        let runtime = Runtime::build(fresh.file.clone(), &stored, Some(&previous));
        self.runtime.store(Arc::new(runtime));
        self.routes.store(Arc::new(table));
        if let Some(tracer) = otel {
            // The old exporter's worker exports what it holds and stops
            // once the requests that hold it are done.
            self.otel.store(tracer);
        }
        let (old, new) = (&self.config.file, &fresh.file);
        let mut restart = Vec::new();
        let sections: [(&str, String, String); 9] = [
            ("server", settings_of(&old.server), settings_of(&new.server)),
            ("admin", settings_of(&old.admin), settings_of(&new.admin)),
            ("database", settings_of(&old.database), settings_of(&new.database)),
            ("audit", settings_of(&old.audit), settings_of(&new.audit)),
            ("logging", settings_of(&old.logging), settings_of(&new.logging)),
            ("routes_dir", settings_of(&old.routes_dir), settings_of(&new.routes_dir)),
            ("cluster", settings_of(&old.cluster), settings_of(&new.cluster)),
            ("budgets", settings_of(&old.budgets), settings_of(&new.budgets)),
            (
                "secrets",
                settings_of(&old.secrets.master_key.len()),
                settings_of(&new.secrets.master_key.len()),
            ),
        ];
        for (name, a, b) in sections {
            let hidden_change = match name {
                "secrets" => old.secrets.master_key != new.secrets.master_key,
                // The password is masked in `settings_of`.
                "cluster" => old.cluster.redis != new.cluster.redis || old.cluster.postgres != new.cluster.postgres,
                // So are the webhook's password and query.
                "budgets" => old.budgets.webhook != new.budgets.webhook,
                _ => false,
            };
            if a != b || hidden_change {
                restart.push(name.to_string());
            }
        }
        if !restart.is_empty() {
            tracing::warn!(sections = ?restart, "These fastgate.yaml sections changed but take effect only after a restart.");
        }
        Ok(restart)
    }

    /// The trace exporter `file` asks for, when it differs from the one
    /// running: `Some(None)` turns tracing off. Blocking (starts a thread).
    fn reload_otel(&self, file: &FileConfig) -> Result<Option<Option<Arc<crate::otel::Tracer>>>, String> {
        let running = self.otel.load();
        if running.as_ref().map(|t| &t.config) == file.otel.as_ref() {
            return Ok(None);
        }
        let tracer = match &file.otel {
            Some(c) => Some(Arc::new(crate::otel::Tracer::start(c, self.metrics.otel_counters())?)),
            None => {
                tracing::info!("OpenTelemetry trace export off.");
                None
            }
        };
        Ok(Some(tracer))
    }

    /// Write the states of pool keys that changed since the last save (the
    /// upkeep task every second, and once more at shutdown). Blocking.
    pub fn save_pool_states(&self) -> Result<usize, store::StoreError> {
        let runtime = self.runtime.load_full();
        let mut keys = Vec::new();
        let mut changed = Vec::new();
        for pool in runtime.pools.values() {
            for key in pool.keys() {
                if key.take_dirty() {
                    changed.push(store::pool_keys::SavedState {
                        pool: pool.name.clone(),
                        key_id: key.id.clone(),
                        status: key.status(),
                        totals: key.totals(),
                    });
                    keys.push(key);
                }
            }
        }
        if changed.is_empty() {
            return Ok(0);
        }
        let mut conn = self.health_db.lock();
        if let Err(e) = store::pool_keys::save_states(&mut conn, &changed) {
            // Try these again with the next save.
            keys.iter().for_each(|k| k.mark_dirty());
            return Err(e);
        }
        Ok(changed.len())
    }

    /// Count tokens already used this period by keys with a quota, from the
    /// audit log (start-up, and keys that gained a quota). Blocking.
    pub fn seed_quotas(&self) {
        let now = crate::clock::now_ms();
        // (quota tracker scope, audit column, id, period start) not yet counted.
        let mut pending: Vec<(String, &'static str, String, i64)> = Vec::new();
        for key in self.keys.all() {
            if key.token_quota.is_some() {
                let start = key.quota_period.bounds(now).0;
                if !self.quotas.is_seeded(&key.id, start) {
                    pending.push((key.id.clone(), "key_id", key.id.clone(), start));
                }
            }
            // A user's shared quota, counted over all their keys by user id.
            if let (Some(q), Some(user_id)) = (&key.user_quota, &key.owner_id) {
                let start = q.period.bounds(now).0;
                if !self.quotas.is_seeded(&q.scope, start) && !pending.iter().any(|p| p.0 == q.scope) {
                    pending.push((q.scope.clone(), "user_id", user_id.clone(), start));
                }
            }
        }
        self.seed_budgets(now);
        if pending.is_empty() {
            return;
        }
        let conn = self.health_db.lock();
        for (scope, column, id, start) in pending {
            let used: i64 = conn
                .query_row(
                    &format!(
                        "SELECT COALESCE(SUM(COALESCE(prompt_tokens, 0) + COALESCE(completion_tokens, 0)), 0)
                         FROM audit_log WHERE {column} = ?1 AND ts_ms >= ?2"
                    ),
                    rusqlite::params![id, start],
                    |r| r.get(0),
                )
                .unwrap_or(0);
            self.quotas.seed(&scope, start, used.max(0) as u64);
        }
    }

    /// Count money already spent this period against keys', users' and
    /// routes' budgets, from the audit log (start-up, and budgets that
    /// appeared). Blocking.
    fn seed_budgets(&self, now: i64) {
        // (tracker scope, audit column, value, period start) not yet counted.
        let mut pending: Vec<(String, &'static str, String, i64)> = Vec::new();
        let mut add = |scope: &str, column, value: &str, b: &crate::budget::Budget| {
            let start = b.period.bounds(now).0;
            if !self.budgets.is_seeded(scope, start) && !pending.iter().any(|p| p.0 == scope) {
                pending.push((scope.to_string(), column, value.to_string(), start));
            }
        };
        for key in self.keys.all() {
            if let Some(b) = &key.budget {
                add(&key.id, "key_id", &key.id, b);
            }
            if let (Some((scope, b)), Some(user_id)) = (&key.user_budget, &key.owner_id) {
                add(scope, "user_id", user_id, b);
            }
        }
        for route in self.routes.load().routes() {
            if let Some(b) = &route.budget {
                add(&format!("route:{}", route.name), "route", &route.name, b);
            }
        }
        if pending.is_empty() {
            return;
        }
        let conn = self.health_db.lock();
        for (scope, column, value, start) in pending {
            let spent: f64 = conn
                .query_row(
                    &format!("SELECT COALESCE(SUM(cost), 0.0) FROM audit_log WHERE {column} = ?1 AND ts_ms >= ?2"),
                    rusqlite::params![value, start],
                    |r| r.get(0),
                )
                .unwrap_or(0.0);
            self.budgets.seed(&scope, start, crate::budget::to_micros(spent));
        }
    }

    /// Whether the database takes a write lock within [`READY_WAIT`]
    /// (readiness): a balancer's health check must not wait out the
    /// connection's 5 s busy timeout behind a lock.
    pub fn database_writable(&self) -> bool {
        // Held by a pool-state save that is waiting on the lock itself.
        let Some(conn) = self.health_db.try_lock_for(READY_WAIT) else {
            return false;
        };
        let _ = conn.busy_timeout(READY_WAIT);
        let writable = conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;").is_ok();
        let _ = conn.busy_timeout(store::BUSY_TIMEOUT);
        writable
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// `/metrics`: the registry, its gauges refreshed from this state.
    pub fn render_metrics(&self) -> String {
        let runtime = self.runtime.load();
        let pools: Vec<&KeyPool> = runtime.pools.values().map(|p| &**p).collect();
        let upstreams: Vec<&Upstream> = runtime.upstreams.values().map(|u| &**u).collect();
        self.metrics.render(crate::metrics::Live {
            in_flight: self.in_flight(),
            limiter_scopes: self.limiter.len(),
            pools: &pools,
            upstreams: &upstreams,
            audit: self.audit.stats(),
        })
    }

    pub fn lifecycle(&self) -> Lifecycle {
        *self.lifecycle.borrow()
    }
}

/// Admin-added pool keys that open with the master key (others are logged).
pub fn stored_pool_keys(
    conn: &rusqlite::Connection,
    sealer: &crate::seal::Sealer,
) -> Result<Vec<StoredKey>, store::StoreError> {
    let (keys, problems) = store::pool_keys::load(conn, sealer)?;
    for p in problems {
        tracing::error!(problem = %p, "A stored upstream key cannot be used.");
    }
    Ok(keys)
}

/// Budget alerts waiting for the webhook; past it they are dropped
/// (counted in `fastgate_budget_webhook_failed_total`).
const ALERT_QUEUE: usize = 256;

/// `pricing` compiled. The config loader has checked it, so the fallback
/// (the shipped table alone) is only for a file that skipped the loader.
fn price_table(pricing: &crate::pricing::PricingConfig) -> crate::pricing::PriceTable {
    use crate::pricing::{PriceTable, PricingConfig};
    PriceTable::build(pricing).unwrap_or_else(|errors| {
        tracing::error!(errors = ?errors, "The price table is invalid; using the shipped one.");
        PriceTable::build(&PricingConfig::default()).unwrap_or_else(|_| PriceTable::empty())
    })
}

/// Put saved key states back on the keys of `runtime`.
fn restore_pool_states(conn: &rusqlite::Connection, runtime: &Runtime) -> Result<(), store::StoreError> {
    for saved in store::pool_keys::load_states(conn)? {
        if let Some(key) = runtime.pools.get(&saved.pool).and_then(|p| p.key(&saved.key_id)) {
            key.restore(saved.status, saved.totals);
        }
    }
    for pool in runtime.pools.values() {
        pool.relist();
    }
    Ok(())
}
