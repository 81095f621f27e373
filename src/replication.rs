//! Postgres as the cluster's system of record for users, gateway keys and
//! the upstream keys added through the admin API (sealed: every node needs
//! the same `secrets.master_key`).
//!
//! Every node keeps serving from its own SQLite copy (the key cache
//! authenticates from memory, the admin API writes SQLite), so Postgres is
//! never on the request path and an outage stops nothing but the spreading
//! of changes. Changes travel both ways:
//! - out: SQLite triggers queue every changed row in `sync_outbox`; this
//!   task sends the row as it is now (last writer wins per row) and
//!   `NOTIFY`s the others;
//! - in: on `NOTIFY`, every few seconds (a delta resync covering lost
//!   notifications) and after every (re)connect, rows with a revision above
//!   the last one applied are written into SQLite and the key cache reloaded.
//!
//! Exact, not last-writer-wins (docs/cluster.md, "Postgres records"):
//! - revisions are drawn under one advisory lock held to commit (a trigger,
//!   migration V4), so they become visible in order and a reader asking for
//!   `revision > applied` never skips one that commits late;
//! - a local change is sent with the revision its row was last in step with
//!   (`sync_base`); when the record moved on meanwhile, [`store::sync::resolve`]
//!   decides, and a stop (delete, revoke, disable) always wins;
//! - on (re)connect the outbox is pushed first, then the record pulled; a
//!   pull never overwrites a row whose local change is still queued; then
//!   rows this node alone has (none in the record) are sent;
//! - a row Postgres refuses (a record or an audit row) is quarantined in
//!   SQLite (`sync_quarantine`, `GET /api/cluster/quarantine`, counted in
//!   `fastgate_cluster_quarantined_total`) and the rest keeps flowing.

use crate::{state::AppState, store};
use std::{sync::Arc, time::Duration};
use tokio_postgres::{AsyncMessage, Client};

mod embedded {
    refinery::embed_migrations!("migrations/postgres");
}

const CHANNEL: &str = "fastgate_records";
/// Migrations run under this advisory lock: nodes starting together wait
/// for one another instead of racing.
const MIGRATION_LOCK: i64 = 0x6661_7374_6761_7465;
/// Every write to `fastgate_records` holds this lock until it commits (the
/// V4 trigger takes it too; the number is written there).
const REVISION_LOCK: i64 = MIGRATION_LOCK + 2;
/// The admin API's log reader, by name in `pg_stat_activity`.
const READER_NAME: &str = "fastgate-log-reader";
const PUSH_EVERY: Duration = Duration::from_millis(100);
const RESYNC_EVERY: Duration = Duration::from_secs(5);
const RETRY_EVERY: Duration = Duration::from_secs(1);
const SHIP_EVERY: Duration = Duration::from_millis(250);
/// Audit rows per shipped batch, and batches per turn at most.
const SHIP_BATCH: usize = 500;
const SHIP_BATCHES: usize = 20;
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// Partition retention runs on one node at a time.
const RETENTION_LOCK: i64 = MIGRATION_LOCK + 1;
const DAY_MS: i64 = 86_400_000;
/// The local outbox above which a warning is logged (once per crossing).
const UNSHIPPED_WARN: i64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("postgres migrations: {0}")]
    Migrate(#[from] refinery::Error),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Task(String),
}

/// The background service that keeps SQLite and Postgres in step.
pub struct RecordsService {
    pub state: Arc<AppState>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for RecordsService {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let state = self.state.clone();
        let node = node_name(&state);
        let mut warned = false;
        let mut backlog_warned = false;
        loop {
            let session = sync(&state, &node);
            let result = tokio::select! {
                r = session => r,
                _ = shutdown.changed() => return,
            };
            if let Err(e) = result
                && !warned
            {
                warned = true;
                tracing::warn!(error = %e, "Postgres unreachable: users and keys are served from the local copy; changes are kept and sent when it is back.");
            }
            measure_backlog(&state, &mut backlog_warned).await;
            tokio::select! {
                _ = tokio::time::sleep(RETRY_EVERY) => {}
                _ = shutdown.changed() => return,
            }
            if warned && connected_once(&state).await {
                warned = false;
            }
        }
    }
}

fn node_name(state: &AppState) -> String {
    match &state.cluster {
        Some(c) => c.node_id.clone(),
        None if !state.config.file.cluster.node_id.is_empty() => state.config.file.cluster.node_id.clone(),
        None => format!("node-{}", uuid::Uuid::now_v7().simple()),
    }
}

/// Whether Postgres answers a connect now (to log the recovery once).
async fn connected_once(state: &AppState) -> bool {
    connect(&state.config.file.cluster, "fastgate").await.is_ok()
}

/// Whether Postgres refused this row's data (a data exception, an integrity
/// rule, a size limit) rather than failing as a connection: such a row is
/// quarantined, and retrying it would only stop everything behind it.
fn refused(e: &RecordsError) -> bool {
    let RecordsError::Postgres(e) = e else {
        return false;
    };
    e.code()
        .is_some_and(|c| ["22", "23", "54"].iter().any(|class| c.code().starts_with(class)))
}

/// Keep a row Postgres refused aside, count it and say so.
async fn quarantine(
    state: &AppState,
    kind: &'static str,
    tbl: &str,
    id: &str,
    error: &RecordsError,
    row: Option<serde_json::Value>,
) -> Result<(), RecordsError> {
    tracing::warn!(kind, table = tbl, id, error = %error, "Postgres refused a row: kept aside in the local quarantine (GET /api/cluster/quarantine); the rest keeps flowing.");
    state.metrics.cluster_quarantined.with_label_values(&[kind]).inc();
    // Postgres's own words (code and message), not the driver's "db error".
    let error = match error {
        RecordsError::Postgres(e) => e
            .as_db_error()
            .map_or_else(|| e.to_string(), |d| format!("{} ({})", d.message(), d.code().code())),
        e => e.to_string(),
    };
    let (tbl, id) = (tbl.to_string(), id.to_string());
    with_db(state, move |c| {
        store::sync::quarantine(c, kind, &tbl, &id, &error, row.as_ref())
    })
    .await
}

/// Postgres TLS (as `sslmode` asks): `cluster.ca_file`'s authorities, else
/// the system's roots.
fn tls(ca_file: Option<&std::path::Path>) -> Result<tokio_postgres_rustls::MakeRustlsConnect, RecordsError> {
    let roots = match ca_file {
        Some(path) => crate::config::ca_roots::load(path).map_err(RecordsError::Task)?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            roots
        }
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// A client and the stream of its notifications (the connection runs in
/// its own task; the stream ends when the connection does).
async fn connect(
    cluster: &crate::config::ClusterConfig,
    application: &str,
) -> Result<
    (
        Client,
        tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
    ),
    RecordsError,
> {
    let mut config: tokio_postgres::Config = cluster.postgres.parse()?;
    config.application_name(application);
    let (client, mut connection) =
        tokio::time::timeout(Duration::from_secs(5), config.connect(tls(cluster.ca_file.as_deref())?))
            .await
            .map_err(|_| RecordsError::Task("connect timed out".into()))??;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    let _ = tx.send(n);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "Postgres connection ended.");
                    return;
                }
                None => return,
            }
        }
    });
    Ok((client, rx))
}

/// Blocking SQLite work on the node's database.
async fn with_db<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&mut rusqlite::Connection) -> Result<T, store::StoreError> + Send + 'static,
) -> Result<T, RecordsError> {
    let path = state.config.database_path.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = store::open(&path)?;
        f(&mut conn)
    })
    .await
    .map_err(|e| RecordsError::Task(e.to_string()))?
    .map_err(RecordsError::from)
}

/// The admin API's connection to the cluster's log, withdrawn when the
/// session that opened it ends, and checked on every resync: a dead one is
/// replaced, or withdrawn (the admin API answers 503) until one connects.
struct ClusterLog<'a>(&'a AppState);

impl<'a> ClusterLog<'a> {
    fn open(state: &'a AppState, client: Client) -> Self {
        state.cluster_log.store(Some(Arc::new(client)));
        ClusterLog(state)
    }

    async fn check(&self) {
        let healthy = match self.0.cluster_log.load_full() {
            Some(c) if !c.is_closed() => {
                matches!(
                    tokio::time::timeout(Duration::from_secs(2), c.simple_query("SELECT 1")).await,
                    Ok(Ok(_))
                )
            }
            _ => false,
        };
        if healthy {
            return;
        }
        match connect(&self.0.config.file.cluster, READER_NAME).await {
            Ok((client, _)) => {
                tracing::info!("The admin API's connection to the cluster's log was lost: reconnected.");
                self.0.cluster_log.store(Some(Arc::new(client)));
            }
            Err(e) => {
                tracing::warn!(error = %e, "The admin API's connection to the cluster's log was lost and cannot be replaced yet.");
                self.0.cluster_log.store(None);
            }
        }
    }
}

impl Drop for ClusterLog<'_> {
    fn drop(&mut self) {
        self.0.cluster_log.store(None);
    }
}

/// One connected session: returns (with the error) when Postgres goes away.
async fn sync(state: &Arc<AppState>, node: &str) -> Result<(), RecordsError> {
    let (mut client, mut notifications) = connect(&state.config.file.cluster, "fastgate").await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let migrated = embedded::migrations::runner().run_async(&mut client).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await?;
    migrated?;
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    with_db(state, |c| store::sync::set_enabled(c, true)).await?;
    // The admin API's reads get their own connection, for this session.
    let (reader, _) = connect(&state.config.file.cluster, READER_NAME).await?;
    let reader = ClusterLog::open(state, reader);

    // Changes made while Postgres was away go first (resolved against what
    // changed meanwhile), then the record comes in (never over a row whose
    // change is still queued), then rows only this node has.
    while push(state, &mut client, node).await? > 0 {}
    let mut applied = pull(state, &client, node, 0).await?;
    push_local_only(state, &client, node).await?;
    tracing::info!(
        revision = applied,
        "Connected to Postgres: users and keys in step with the cluster."
    );
    let mut shipper = Shipper::new(state, node).await?;
    let mut push_tick = tokio::time::interval(PUSH_EVERY);
    let mut resync_tick = tokio::time::interval(RESYNC_EVERY);
    let mut ship_tick = tokio::time::interval(SHIP_EVERY);
    let mut retention_tick = tokio::time::interval(RETENTION_EVERY);
    loop {
        tokio::select! {
            n = notifications.recv() => {
                if n.is_none() {
                    return Err(RecordsError::Task("connection closed".into()));
                }
                // Several notifications, one pull.
                while notifications.try_recv().is_ok() {}
                applied = pull(state, &client, node, applied).await?;
            }
            _ = push_tick.tick() => {
                push(state, &mut client, node).await?;
            }
            _ = resync_tick.tick() => {
                applied = pull(state, &client, node, applied).await?;
                reader.check().await;
            }
            _ = ship_tick.tick() => shipper.ship(state, &mut client).await?,
            _ = retention_tick.tick() => drop_old_partitions(state, &client).await?,
        }
        if client.is_closed() {
            return Err(RecordsError::Task("connection closed".into()));
        }
    }
}

/// Apply every row changed after revision `after` by other nodes; returns
/// the highest revision seen. Revisions become visible in order (V4), so
/// none below it can appear later.
async fn pull(state: &Arc<AppState>, client: &Client, node: &str, after: i64) -> Result<i64, RecordsError> {
    let rows = client
        .query(
            "SELECT tbl, id, row, revision, updated_by FROM fastgate_records WHERE revision > $1 ORDER BY revision",
            &[&after],
        )
        .await?;
    let Some(last) = rows.last().map(|r| r.get::<_, i64>(3)) else {
        return Ok(after);
    };
    let changes: Vec<store::sync::Change> = rows
        .iter()
        .map(|r| store::sync::Change {
            tbl: r.get(0),
            id: r.get(1),
            row: as_row(r.get(2)),
            revision: r.get(3),
            own: r.get::<_, &str>(4) == node,
        })
        .collect();
    let pool_keys = changes.iter().any(|c| !c.own && c.tbl == "pool_keys");
    let written = with_db(state, move |c| store::sync::apply(c, &changes)).await?;
    if written > 0 {
        reload(state, pool_keys).await?;
        tracing::debug!(
            rows = written,
            revision = last,
            "Applied users and keys changed on other nodes."
        );
    }
    Ok(last)
}

fn as_row(v: Option<serde_json::Value>) -> store::sync::Row {
    v.and_then(|v| match v {
        serde_json::Value::Object(m) => Some(m),
        _ => None,
    })
}

/// The key cache and the pools see a change now, not at their next refresh.
async fn reload(state: &Arc<AppState>, pool_keys: bool) -> Result<(), RecordsError> {
    let app = state.clone();
    tokio::task::spawn_blocking(move || {
        app.keys.refresh()?;
        if pool_keys {
            app.reload_stored_pool_keys()?;
        }
        Ok::<_, store::StoreError>(())
    })
    .await
    .map_err(|e| RecordsError::Task(e.to_string()))??;
    Ok(())
}

/// What the record holds for a row after it was sent.
struct Sent {
    revision: i64,
    /// The record changed.
    changed: bool,
    /// The record's row, when it is not the one sent (a conflict resolved).
    merged: Option<store::sync::Row>,
}

/// Send one row (or its deletion), made on top of revision `base`. Under
/// the revision lock: when the record's row is newer than `base`, the
/// conflict rule decides what both keep ([`store::sync::resolve`]).
async fn send(
    client: &mut Client,
    node: &str,
    tbl: &str,
    id: &str,
    row: &store::sync::Row,
    base: i64,
) -> Result<Sent, RecordsError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&REVISION_LOCK])
        .await?;
    let current = tx
        .query_opt(
            "SELECT row, revision FROM fastgate_records WHERE tbl = $1 AND id = $2",
            &[&tbl, &id],
        )
        .await?;
    let (target, unchanged) = match current {
        None => (row.clone(), None),
        Some(r) => {
            let record = as_row(r.get(0));
            let revision: i64 = r.get(1);
            let target = if revision <= base {
                row.clone()
            } else {
                store::sync::resolve(tbl, &record, row)
            };
            let unchanged = (target == record).then_some(revision);
            (target, unchanged)
        }
    };
    let merged = (target != *row).then(|| target.clone());
    if let Some(revision) = unchanged {
        tx.commit().await?;
        return Ok(Sent {
            revision,
            changed: false,
            merged,
        });
    }
    let json = target.map(serde_json::Value::Object);
    let revision: i64 = tx
        .query_one(
            "INSERT INTO fastgate_records (tbl, id, row, revision, updated_by)
             VALUES ($1, $2, $3, nextval('fastgate_revision'), $4)
             ON CONFLICT (tbl, id) DO UPDATE
               SET row = EXCLUDED.row, revision = EXCLUDED.revision, updated_by = EXCLUDED.updated_by
             RETURNING revision",
            &[&tbl, &id, &json, &node],
        )
        .await?
        .get(0);
    tx.commit().await?;
    Ok(Sent {
        revision,
        changed: true,
        merged,
    })
}

/// Send the rows changed on this node since the last push, each with its
/// base revision; returns how many outbox entries were handled.
async fn push(state: &Arc<AppState>, client: &mut Client, node: &str) -> Result<usize, RecordsError> {
    let (last, pending) = with_db(state, |c| {
        let queued = store::sync::pending(c, 256)?;
        let last = queued.last().map(|q| q.0);
        let mut rows = Vec::with_capacity(queued.len());
        let mut seen = std::collections::HashSet::new();
        for (_, tbl, id) in queued {
            if seen.insert((tbl.clone(), id.clone())) {
                let row = store::sync::row(c, &tbl, &id)?;
                let base = store::sync::base(c, &tbl, &id)?;
                rows.push((tbl, id, row, base));
            }
        }
        Ok((last, rows))
    })
    .await?;
    let Some(last) = last else {
        return Ok(0);
    };
    let mut changed = false;
    let mut results = Vec::with_capacity(pending.len());
    for (tbl, id, row, base) in &pending {
        match send(client, node, tbl, id, row, *base).await {
            Ok(sent) => {
                changed |= sent.changed;
                results.push(store::sync::Pushed {
                    tbl: tbl.clone(),
                    id: id.clone(),
                    revision: sent.revision,
                    merged: sent.merged,
                });
            }
            Err(e) if refused(&e) => {
                let json = row.clone().map(serde_json::Value::Object);
                quarantine(state, "record", tbl, id, &e, json).await?;
            }
            Err(e) => return Err(e),
        }
    }
    if changed {
        client.batch_execute(&format!("NOTIFY {CHANNEL}")).await?;
    }
    let pool_keys = results.iter().any(|r| r.merged.is_some() && r.tbl == "pool_keys");
    let n = pending.len();
    let written = with_db(state, move |c| store::sync::pushed(c, last, &results)).await?;
    if written {
        reload(state, pool_keys).await?;
    }
    Ok(n)
}

/// Send the rows only this node has (a first node, or one that ran alone
/// before joining), never overwriting the record.
async fn push_local_only(state: &Arc<AppState>, client: &Client, node: &str) -> Result<(), RecordsError> {
    let mut added = 0;
    for tbl in store::sync::TABLES {
        let known: Vec<String> = client
            .query("SELECT id FROM fastgate_records WHERE tbl = $1", &[&tbl])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let local = with_db(state, move |c| {
            let mut rows = Vec::new();
            for id in store::sync::ids(c, tbl)? {
                if !known.contains(&id) {
                    let row = store::sync::row(c, tbl, &id)?;
                    rows.push((id, row));
                }
            }
            Ok(rows)
        })
        .await?;
        let mut bases = Vec::new();
        for (id, row) in &local {
            let json = row.clone().map(serde_json::Value::Object);
            let inserted = client
                .query_opt(
                    "INSERT INTO fastgate_records (tbl, id, row, revision, updated_by)
                     VALUES ($1, $2, $3, nextval('fastgate_revision'), $4) ON CONFLICT DO NOTHING
                     RETURNING revision",
                    &[&tbl, id, &json, &node],
                )
                .await;
            match inserted {
                Ok(Some(r)) => {
                    bases.push((tbl.to_string(), id.clone(), r.get::<_, i64>(0)));
                    added += 1;
                }
                Ok(None) => {}
                Err(e) => {
                    let e = RecordsError::from(e);
                    if !refused(&e) {
                        return Err(e);
                    }
                    quarantine(state, "record", tbl, id, &e, json).await?;
                }
            }
        }
        with_db(state, move |c| store::sync::note_bases(c, &bases)).await?;
    }
    if added > 0 {
        client.batch_execute(&format!("NOTIFY {CHANNEL}")).await?;
        tracing::info!(rows = added, "Sent users and keys only this node had to Postgres.");
    }
    Ok(())
}

/// Ships this node's audit rows from its SQLite log (the outbox) to
/// Postgres in id order. Idempotent: a batch is sent again after a failure
/// (or a crash before the watermark was saved) and taken once, because a
/// row's identity is (node, id).
struct Shipper {
    /// This database's lasting name in the shipped log (not the node id,
    /// which may change between restarts).
    node: String,
    shipped: i64,
    /// The last admin-audit id shipped.
    shipped_admin: i64,
    days: std::collections::HashSet<i64>,
    warned: bool,
}

impl Shipper {
    async fn new(state: &AppState, node: &str) -> Result<Shipper, RecordsError> {
        let node = node.to_string();
        let (name, shipped) = with_db(state, move |c| {
            let name = store::settings::get_or_create(c, "audit_node", || {
                format!("{node}-{}", &uuid::Uuid::now_v7().simple().to_string()[20..])
            })?;
            let watermark = |name: &str| -> Result<i64, store::StoreError> {
                Ok(store::settings::get(c, name)?.and_then(|v| v.parse().ok()).unwrap_or(0))
            };
            Ok((
                name,
                (watermark("audit_shipped_id")?, watermark("admin_audit_shipped_id")?),
            ))
        })
        .await?;
        let (shipped, shipped_admin) = shipped;
        Ok(Shipper {
            node: name,
            shipped,
            shipped_admin,
            days: Default::default(),
            warned: false,
        })
    }

    async fn ship(&mut self, state: &AppState, client: &mut Client) -> Result<(), RecordsError> {
        for _ in 0..SHIP_BATCHES {
            let after = self.shipped;
            let captured = crate::audit::captured::CapturedStore::for_database(&state.config.database_path);
            let batch = with_db(state, move |c| {
                let mut rows = store::sync::log_after(c, "audit_log", after, SHIP_BATCH)?;
                captured.fill_shipped(&mut rows);
                Ok(rows)
            })
            .await?;
            let Some(last) = batch.last().map(|b| b.id) else {
                break;
            };
            for day in batch.iter().map(|b| b.ts_ms.div_euclid(DAY_MS)) {
                if !self.days.contains(&day) {
                    match create_partition(client, day).await {
                        Ok(()) => {}
                        // A day Postgres cannot hold (a wild clock): its
                        // rows are refused one by one below, and quarantined.
                        Err(RecordsError::Postgres(e)) if e.as_db_error().is_some() => {
                            tracing::warn!(day, error = %e, "Cannot make the audit partition of this day.");
                        }
                        Err(e) => return Err(e),
                    }
                    self.days.insert(day);
                }
            }
            let full = batch.len() == SHIP_BATCH;
            self.insert_or_quarantine(state, client, "audit", &batch).await?;
            self.shipped = last;
            with_db(state, move |c| {
                store::settings::set(c, "audit_shipped_id", &last.to_string())
            })
            .await?;
            if !full {
                break;
            }
        }
        self.ship_admin(state, client).await?;
        let shipped = self.shipped;
        let left = with_db(state, move |c| store::sync::audit_unshipped(c, shipped)).await?;
        report_backlog(state, left, &mut self.warned);
        Ok(())
    }
}

/// The audit outbox's size in `fastgate_audit_unshipped`, and a warning
/// once it passes [`UNSHIPPED_WARN`].
fn report_backlog(state: &AppState, left: i64, warned: &mut bool) {
    state.metrics.audit_unshipped.set(left);
    if left > UNSHIPPED_WARN && !*warned {
        tracing::warn!(
            unshipped = left,
            "The audit outbox is growing: Postgres takes rows slower than they are written."
        );
    }
    *warned = left > UNSHIPPED_WARN;
}

/// The outbox measured while Postgres is away (the shipper measures it
/// after each shipment), so the gauge and the warning tell how it grows.
async fn measure_backlog(state: &AppState, warned: &mut bool) {
    let left = with_db(state, |c| {
        let shipped = store::settings::get(c, "audit_shipped_id")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        store::sync::audit_unshipped(c, shipped)
    })
    .await;
    match left {
        Ok(left) => report_backlog(state, left, warned),
        Err(e) => tracing::debug!(error = %e, "Cannot measure the audit outbox."),
    }
}

impl Shipper {
    /// The admin audit: who changed what, on every node, in one list.
    async fn ship_admin(&mut self, state: &AppState, client: &Client) -> Result<(), RecordsError> {
        let after = self.shipped_admin;
        let batch = with_db(state, move |c| {
            store::sync::log_after(c, "admin_audit", after, SHIP_BATCH)
        })
        .await?;
        let Some(last) = batch.last().map(|b| b.id) else {
            return Ok(());
        };
        self.insert_or_quarantine(state, client, "admin_audit", &batch).await?;
        self.shipped_admin = last;
        with_db(state, move |c| {
            store::settings::set(c, "admin_audit_shipped_id", &last.to_string())
        })
        .await
    }
}

impl Shipper {
    /// Insert a batch of `kind` (`audit` or `admin_audit`); when Postgres
    /// refuses it, row by row, quarantining the rows it refuses.
    async fn insert_or_quarantine(
        &self,
        state: &AppState,
        client: &Client,
        kind: &'static str,
        batch: &[store::sync::AuditRow],
    ) -> Result<(), RecordsError> {
        match self.insert(client, kind, batch).await {
            Err(e) if refused(&e) => {}
            other => return other,
        }
        for one in batch {
            match self.insert(client, kind, std::slice::from_ref(one)).await {
                Err(e) if refused(&e) => {
                    let tbl = if kind == "audit" { "audit_log" } else { "admin_audit" };
                    let row = serde_json::Value::Object(one.row.clone());
                    quarantine(state, kind, tbl, &one.id.to_string(), &e, Some(row)).await?;
                }
                other => other?,
            }
        }
        Ok(())
    }

    async fn insert(&self, client: &Client, kind: &str, batch: &[store::sync::AuditRow]) -> Result<(), RecordsError> {
        let ids: Vec<i64> = batch.iter().map(|b| b.id).collect();
        let ts: Vec<i64> = batch.iter().map(|b| b.ts_ms).collect();
        let rows: Vec<serde_json::Value> = batch.iter().map(|b| serde_json::Value::Object(b.row.clone())).collect();
        if kind == "audit" {
            let request_ids: Vec<&str> = batch.iter().map(|b| b.request_id.as_str()).collect();
            client
                .execute(
                    "INSERT INTO fastgate_audit (node, id, ts_ms, request_id, row)
                     SELECT $1, * FROM UNNEST($2::bigint[], $3::bigint[], $4::text[], $5::jsonb[])
                     ON CONFLICT DO NOTHING",
                    &[&self.node, &ids, &ts, &request_ids, &rows],
                )
                .await?;
        } else {
            client
                .execute(
                    "INSERT INTO fastgate_admin_audit (node, id, ts_ms, row)
                     SELECT $1, * FROM UNNEST($2::bigint[], $3::bigint[], $4::jsonb[])
                     ON CONFLICT DO NOTHING",
                    &[&self.node, &ids, &ts, &rows],
                )
                .await?;
        }
        Ok(())
    }
}

/// `fastgate_audit_YYYYMMDD`, the partition of one UTC day.
fn partition_name(day: i64) -> String {
    let date = time::OffsetDateTime::from_unix_timestamp(day * 86_400).map_or(time::Date::MIN, |t| t.date());
    format!(
        "fastgate_audit_{:04}{:02}{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

async fn create_partition(client: &mut Client, day: i64) -> Result<(), RecordsError> {
    let tx = client.transaction().await?;
    // Nodes making the same day's partition at once wait for each other.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {} PARTITION OF fastgate_audit FOR VALUES FROM ({}) TO ({})",
        partition_name(day),
        day * DAY_MS,
        (day + 1) * DAY_MS
    ))
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Drop the days wholly older than `audit.retention` (one node at a time).
async fn drop_old_partitions(state: &AppState, client: &Client) -> Result<(), RecordsError> {
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&RETENTION_LOCK])
        .await?
        .get(0);
    if !locked {
        return Ok(());
    }
    let retention_ms = state.config.file.audit.retention.0.as_millis() as i64;
    let oldest_kept = partition_name((crate::clock::now_ms() - retention_ms).div_euclid(DAY_MS));
    let names: Vec<String> = client
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'fastgate_audit'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut dropped = 0;
    for name in names.iter().filter(|n| n.as_str() < oldest_kept.as_str()) {
        client.batch_execute(&format!("DROP TABLE IF EXISTS {name}")).await?;
        dropped += 1;
    }
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&RETENTION_LOCK])
        .await?;
    if dropped > 0 {
        tracing::info!(partitions = dropped, "Audit retention: dropped old days from Postgres.");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn partitions_are_named_by_their_utc_day_and_sort_by_it() {
        let day = 1_796_169_600_000 / super::DAY_MS; // 2026-12-02
        assert_eq!(super::partition_name(day), "fastgate_audit_20261202");
        assert!(super::partition_name(day - 40) < super::partition_name(day));
    }
}
