//! Cluster mode: several nodes share their rate limits and their pool key
//! states through Redis/Valkey (>= 7), each decision one call of a
//! server-side function (`functions.lua`) on Redis's clock. See
//! docs/cluster.md.
//!
//! Redis is never waited on for longer than `cluster.timeout`: a failed or
//! late call opens a circuit breaker, requests are decided locally
//! (`on_redis_down`), and a background task closes the breaker once Redis
//! answers again.

pub mod key_sync;
pub mod leases;
pub mod limits;

use crate::config::ClusterConfig;
use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

/// The function library; its name carries the version (see the file).
const LIBRARY: &str = include_str!("functions.lua");
/// Every key FastGate writes starts with this: one hash tag, so that every
/// call's keys hash to one slot (Redis Cluster / Valkey cluster run it; all
/// of FastGate's state sits on that slot's shard).
pub(crate) const PREFIX: &str = "fg:{fg}:";
/// Sorted set of node ids scored by their last heartbeat.
const NODES_KEY: &str = "fg:{fg}:nodes";
/// Most lease releases kept for replay while Redis is unreachable (the
/// oldest go first past it: their slots expire after `stuck_after`).
const MAX_RELEASES: usize = 10_000;
/// A node missing heartbeats for this long no longer counts.
const NODE_TTL_MS: u64 = 5_000;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// How often a down Redis is tried again.
const RETRY_EVERY: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("Redis is unreachable (circuit open)")]
    Down,
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("cluster.ca_file: {0}")]
    Ca(String),
}

impl ClusterError {
    /// Whether Redis could not take the call now: it may not have reached
    /// Redis or its answer was lost (breaker open, timeout, connection), or
    /// Redis refused it for a state that passes ([`is_passing_refusal`]).
    /// The op is in doubt: kept and sent again once Redis answers, and the
    /// request decided locally meanwhile.
    fn is_transport(&self) -> bool {
        match self {
            ClusterError::Redis(r) => {
                r.is_io_error() || r.is_connection_dropped() || r.is_timeout() || is_passing_refusal(r)
            }
            _ => true,
        }
    }
}

/// A refusal Redis answers while it cannot run anything, not because of
/// the call: loading its data after a restart (AOF or RDB), out of memory,
/// a replica made read-only by a failover, a script running too long, a
/// cluster without a master for the slot. The same call succeeds later;
/// dropping it would lose a settlement or leak a slot.
fn is_passing_refusal(e: &redis::RedisError) -> bool {
    matches!(
        e.code(),
        Some("LOADING" | "OOM" | "READONLY" | "BUSY" | "MASTERDOWN" | "TRYAGAIN" | "CLUSTERDOWN" | "NOREPLICAS")
    )
}

/// This node's link to the cluster's shared state.
pub struct Cluster {
    pub node_id: String,
    /// This process's start, so that a node restarted under the same
    /// `node_id` never mints an op id its last run used.
    boot: String,
    /// The last op id's counter (see [`Cluster::next_op`]).
    ops: AtomicU64,
    /// Lease releases Redis has not confirmed (breaker open, timeout):
    /// replayed when it answers again. Releases are idempotent.
    releases: Mutex<std::collections::VecDeque<(String, String)>>,
    /// Settlements queued and not yet taken into a batch.
    queued: AtomicUsize,
    /// A batch is built and Redis has not confirmed it yet.
    unconfirmed: AtomicBool,
    pub config: ClusterConfig,
    client: redis::Client,
    /// The background tasks' connection (heartbeats, library, key states).
    conn: ArcSwapOption<ConnectionManager>,
    /// The request path's connection, made by the first request that needs
    /// it, so that its driver runs on the data plane's runtime (no hop to
    /// another thread and back per call). Dropped when the breaker opens:
    /// the first request after Redis is back makes a fresh one.
    data: ArcSwapOption<ConnectionManager>,
    connecting: tokio::sync::Mutex<()>,
    /// The breaker: closed (true) while Redis answers.
    up: AtomicBool,
    /// Live nodes, from the last heartbeat (at least 1).
    live_nodes: AtomicU32,
    /// Quota tokens charged while Redis was down, per counter: (tokens,
    /// counter expiry). Added to Redis when it is back.
    owed: Mutex<HashMap<String, (u64, i64)>>,
    /// Settlements queued for [`Cluster::flush_settlements`] (the receiver
    /// until that task takes it).
    settlements: (
        tokio::sync::mpsc::UnboundedSender<limits::Settlement>,
        Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<limits::Settlement>>>,
    ),
    up_gauge: prometheus::IntGauge,
    nodes_gauge: prometheus::IntGauge,
    local_decisions: prometheus::IntCounter,
    /// Where budget thresholds the shared counters cross are told.
    alerts: Arc<crate::budget::Alerts>,
}

impl Cluster {
    pub fn new(
        config: &ClusterConfig,
        metrics: &crate::metrics::Metrics,
        alerts: Arc<crate::budget::Alerts>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let client = match &config.ca_file {
            Some(ca) if config.redis.starts_with("rediss:") => {
                let root_cert = std::fs::read(ca).map_err(|e| ClusterError::Ca(format!("{}: {e}", ca.display())))?;
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                };
                redis::Client::build_with_tls(config.redis.as_str(), certs)?
            }
            _ => redis::Client::open(config.redis.as_str())?,
        };
        let node_id = if config.node_id.is_empty() {
            format!("{}-{}", host_name(), std::process::id())
        } else {
            config.node_id.clone()
        };
        metrics.cluster_redis_up.set(0);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let boot = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Ok(Arc::new(Cluster {
            alerts,
            settlements: (tx, Mutex::new(Some(rx))),
            node_id,
            boot: format!("{boot:x}"),
            ops: AtomicU64::new(0),
            releases: Mutex::new(std::collections::VecDeque::new()),
            queued: AtomicUsize::new(0),
            unconfirmed: AtomicBool::new(false),
            config: config.clone(),
            client,
            conn: ArcSwapOption::empty(),
            data: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            up: AtomicBool::new(false),
            live_nodes: AtomicU32::new(1),
            owed: Mutex::new(HashMap::new()),
            up_gauge: metrics.cluster_redis_up.clone(),
            nodes_gauge: metrics.cluster_nodes.clone(),
            local_decisions: metrics.cluster_local_decisions.clone(),
        }))
    }

    /// A fresh op id, `node:boot:counter`: what Redis logs, leases and
    /// settles under. Never the client's request id (that repeats at will,
    /// and is for logs only).
    pub fn next_op(&self) -> String {
        let n = self.ops.fetch_add(1, Ordering::Relaxed) + 1;
        format!("{}:{}:{n}", self.node_id, self.boot)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// How many nodes share a limit while Redis is down: the configured
    /// count, else the live nodes last seen.
    pub fn share_nodes(&self) -> u32 {
        match self.config.nodes {
            0 => self.live_nodes.load(Ordering::Relaxed).max(1),
            n => n,
        }
    }

    fn manager_config() -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
    }

    /// One call on the request path: never while the breaker is open,
    /// never longer than `cluster.timeout`.
    async fn call<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, ClusterError> {
        if !self.is_up() {
            return Err(ClusterError::Down);
        }
        let timeout = self.config.timeout.0;
        let mut conn = match tokio::time::timeout(timeout * 4, self.data_connection()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let e = ClusterError::Redis(e);
                self.trip(&e);
                return Err(e);
            }
            Err(_) => {
                let e = ClusterError::Timeout(timeout * 4);
                self.trip(&e);
                return Err(e);
            }
        };
        let result = match tokio::time::timeout(timeout, cmd.query_async::<T>(&mut conn)).await {
            Err(_) => Err(ClusterError::Timeout(timeout)),
            // A Redis restarted without persistence has lost the library.
            Ok(Err(e)) if is_missing_function(&e) => {
                match tokio::time::timeout(timeout * 4, async {
                    load_library(&mut conn).await?;
                    cmd.query_async::<T>(&mut conn).await
                })
                .await
                {
                    Err(_) => Err(ClusterError::Timeout(timeout)),
                    Ok(r) => r.map_err(ClusterError::from),
                }
            }
            Ok(r) => r.map_err(ClusterError::from),
        };
        if let Err(e) = &result {
            self.trip(e);
        }
        result
    }

    /// The request path's connection, made here (on the caller's runtime)
    /// if there is none.
    async fn data_connection(&self) -> redis::RedisResult<ConnectionManager> {
        if let Some(c) = self.data.load_full() {
            return Ok((*c).clone());
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(c) = self.data.load_full() {
            return Ok((*c).clone());
        }
        let c = ConnectionManager::new_with_config(self.client.clone(), Self::manager_config()).await?;
        self.data.store(Some(Arc::new(c.clone())));
        Ok(c)
    }

    /// Open the breaker (once per outage, logged).
    fn trip(&self, e: &ClusterError) {
        if !e.is_transport() {
            tracing::warn!(error = %e, "Redis refused a cluster call; decided locally.");
            return;
        }
        if self.up.swap(false, Ordering::Relaxed) {
            self.up_gauge.set(0);
            self.data.store(None);
            tracing::warn!(
                error = %e,
                on_redis_down = ?self.config.on_redis_down,
                nodes = self.share_nodes(),
                "Redis unreachable: limits are enforced locally until it answers again."
            );
        }
    }

    /// Note a decision made without Redis (metrics).
    fn decided_locally(&self) {
        self.local_decisions.inc();
    }

    /// Connect (or check the connection), load the function library and
    /// beat; closes the breaker on success. Returns whether Redis is up.
    async fn check(&self) -> bool {
        let attempt = async {
            let mut conn = match self.conn.load_full() {
                Some(c) => (*c).clone(),
                None => {
                    let c = ConnectionManager::new_with_config(self.client.clone(), Self::manager_config()).await?;
                    self.conn.store(Some(Arc::new(c.clone())));
                    c
                }
            };
            if !self.is_up() {
                load_library(&mut conn).await?;
            }
            heartbeat_cmd(&self.node_id).query_async::<u32>(&mut conn).await
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(nodes)) => {
                self.live_nodes.store(nodes.max(1), Ordering::Relaxed);
                self.nodes_gauge.set(i64::from(nodes));
                if !self.up.swap(true, Ordering::Relaxed) {
                    self.up_gauge.set(1);
                    tracing::info!(node = %self.node_id, nodes, "Redis reachable: limits and key states are shared.");
                }
                true
            }
            Ok(Err(e)) => {
                self.trip(&ClusterError::Redis(e));
                false
            }
            Err(_) => {
                self.trip(&ClusterError::Timeout(Duration::from_secs(2)));
                false
            }
        }
    }
}

fn heartbeat_cmd(node: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("FCALL");
    cmd.arg("fastgate_heartbeat_v3")
        .arg(1)
        .arg(NODES_KEY)
        .arg(node)
        .arg(NODE_TTL_MS);
    cmd
}

async fn load_library(conn: &mut ConnectionManager) -> redis::RedisResult<()> {
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(LIBRARY)
        .query_async::<String>(conn)
        .await
        .map(|_| ())
}

fn is_missing_function(e: &redis::RedisError) -> bool {
    e.to_string().contains("Function not found")
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into())
}

/// The cluster's background work, on its own runtime: keep the link and
/// the breaker, beat, replay unconfirmed releases, settle (owed quota
/// tokens included), and sync key states.
pub struct ClusterService {
    pub cluster: Arc<Cluster>,
    pub pools: key_sync::PoolLookup,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for ClusterService {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let cluster = self.cluster.clone();
        tokio::spawn(key_sync::subscribe(cluster.clone(), self.pools.clone()));
        tokio::spawn(cluster.clone().flush_settlements());
        if let Some(outbox) = crate::pool::changes::take() {
            tokio::spawn(key_sync::publish(cluster.clone(), self.pools.clone(), outbox));
        }
        loop {
            let up = cluster.check().await;
            if up {
                cluster.replay_releases().await;
            }
            let wait = if up { HEARTBEAT_EVERY } else { RETRY_EVERY };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
