//! The one shared handle: configuration, the hot-swappable route table,
//! upstreams, key pools, the gateway-key cache and the upstream connector.

use crate::{
    audit::AuditSink,
    auth::KeyCache,
    config::{Config, ConfigErrors, load_routes},
    metrics::Metrics,
    pool::KeyPool,
    router::RouteTable,
    store,
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

/// Outcome of the last route reload, for logs and (later) the admin API.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    pub last_error: Option<String>,
}

pub struct AppState {
    pub config: Config,
    /// Swapped whole on reload; a request keeps the table it started with.
    pub routes: ArcSwap<RouteTable>,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    pub pools: HashMap<String, Arc<KeyPool>>,
    pub keys: KeyCache,
    /// Upstream connections for routes whose body FastGate reads itself.
    pub connector: Connector,
    /// Requests currently being served (graceful shutdown waits on it).
    pub in_flight: AtomicUsize,
    pub reload: Mutex<ReloadStatus>,
    pub metrics: Metrics,
    pub limiter: crate::ratelimit::RateLimiter,
    pub quotas: crate::ratelimit::QuotaTracker,
    pub audit: AuditSink,
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
}

impl AppState {
    /// Build everything the data plane needs from a validated config.
    pub fn build(config: Config) -> Result<Arc<Self>, StartupError> {
        let routes = load_routes(&config.routes_dir, &config.file)?;
        let pools: HashMap<String, Arc<KeyPool>> = config
            .file
            .key_pools
            .iter()
            .map(|(name, p)| (name.clone(), Arc::new(KeyPool::new(name, p.strategy, &p.keys))))
            .collect();
        let upstreams = config
            .file
            .upstreams
            .iter()
            .map(|(name, u)| (name.clone(), Arc::new(Upstream::build(name, u, &pools))))
            .collect();
        let keys = KeyCache::load(store::open(&config.database_path)?)?;
        let audit = if config.file.audit.enabled {
            AuditSink::start(&config.database_path, &config.file.audit)?
        } else {
            AuditSink::disabled()
        };
        let health_db = Mutex::new(store::open(&config.database_path)?);
        let opts = ConnectorOptions::new(config.file.server.upstream_keepalive_pool);
        Ok(Arc::new(AppState {
            routes: ArcSwap::from_pointee(routes),
            upstreams,
            pools,
            keys,
            connector: Connector::new(Some(opts)),
            in_flight: AtomicUsize::new(0),
            reload: Mutex::new(ReloadStatus::default()),
            metrics: Metrics::new()?,
            limiter: crate::ratelimit::RateLimiter::default(),
            quotas: crate::ratelimit::QuotaTracker::default(),
            audit,
            health_db,
            config,
        }))
    }

    /// Re-read `routes.d`; swap the table in only if every file is valid.
    pub fn reload_routes(&self) -> Result<usize, ConfigErrors> {
        let result = load_routes(&self.config.routes_dir, &self.config.file);
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

    /// Count tokens already used this period by keys with a quota, from the
    /// audit log (start-up, and keys that gained a quota). Blocking.
    pub fn seed_quotas(&self) {
        let now = crate::audit::now_ms();
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

    /// Whether the database takes a write lock now (readiness).
    pub fn database_writable(&self) -> bool {
        self.health_db
            .lock()
            .execute_batch("BEGIN IMMEDIATE; ROLLBACK;")
            .is_ok()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}
