//! Background upkeep, run as one Pingora background service: route reloads
//! (file watch, debounced), whole-config reloads (SIGHUP), gateway-key cache
//! refresh, re-resolution of upstream hostnames, upstream health checks,
//! saving pool key states (debounced, off the request path), reclaiming
//! stuck key leases, re-probing keys the provider disabled and forgetting
//! idle rate-limit scopes.

use crate::state::AppState;
use async_trait::async_trait;
use notify_debouncer_mini::{DebounceEventResult, new_debouncer, notify::RecursiveMode};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::{sync::Arc, time::Duration};
use tokio::sync::mpsc;

/// How long file events settle before a reload (editors write in bursts).
const DEBOUNCE: Duration = Duration::from_millis(250);
/// How often upstream hostnames are re-resolved.
const DNS_REFRESH: Duration = Duration::from_secs(60);
/// How often changed pool key states are written to the database.
const SAVE_STATES: Duration = Duration::from_secs(1);
/// How often leases are checked against `stuck_after`.
const STUCK_SWEEP: Duration = Duration::from_secs(5);
/// How often provider-disabled keys are checked for a due re-probe (each
/// key is probed once per its pool's `reprobe_interval`; this is only the
/// resolution of that schedule).
const REPROBE_SWEEP: Duration = Duration::from_secs(1);
/// How often idle rate-limit scopes are forgotten (a scope is idle two
/// windows after its last request, so memory follows the last minutes'
/// distinct clients, not every client ever seen).
const LIMITER_SWEEP: Duration = Duration::from_secs(5);
/// Quota counts older than this began in a period that is over (the
/// longest period is a month).
const QUOTA_KEEP_MS: i64 = 32 * 86_400_000;

pub struct Upkeep {
    pub state: Arc<AppState>,
}

impl Upkeep {
    async fn reload(&self, why: &'static str) {
        let state = self.state.clone();
        tracing::info!(trigger = why, "Reloading routes.d.");
        // Reading files is blocking I/O: keep it off the async workers.
        let _ = tokio::task::spawn_blocking(move || state.reload_routes()).await;
    }

    async fn reload_config(&self) {
        let state = self.state.clone();
        tracing::info!(trigger = "SIGHUP", "Reloading fastgate.yaml and routes.d.");
        let _ = tokio::task::spawn_blocking(move || state.reload_config()).await;
    }

    async fn reload_certificates(&self) {
        let state = self.state.clone();
        let _ = tokio::task::spawn_blocking(move || state.reload_certificates("file change")).await;
    }

    /// Write the states of keys that changed since the last save.
    async fn save_states(&self) {
        let state = self.state.clone();
        match tokio::task::spawn_blocking(move || state.save_pool_states()).await {
            Ok(Ok(n)) if n > 0 => tracing::debug!(keys = n, "Saved pool key states."),
            Ok(Err(e)) => tracing::warn!(error = %e, "Saving pool key states failed; will retry with the next change."),
            _ => {}
        }
    }

    /// Start the health checks that are due (each upstream on its interval).
    fn check_health(&self, last: &mut std::collections::HashMap<String, tokio::time::Instant>) {
        let runtime = self.state.runtime.load();
        let now = tokio::time::Instant::now();
        for up in runtime.upstreams.values() {
            let Some(every) = up.health_interval else { continue };
            if last.get(&up.name).is_some_and(|t| now.duration_since(*t) < every) {
                continue;
            }
            last.insert(up.name.clone(), now);
            let up = up.clone();
            tokio::spawn(async move { up.check_health().await });
        }
    }

    /// Forget rate-limit scopes and quota counts that count nothing any more.
    fn sweep_limits(&self) {
        let now = crate::clock::now_ms();
        let scopes = self.state.limiter.sweep(now as u64);
        let quotas = self.state.quotas.sweep(now - QUOTA_KEEP_MS) + self.state.budgets.sweep(now - QUOTA_KEEP_MS);
        if scopes + quotas > 0 {
            tracing::debug!(scopes, quotas, "Idle rate-limit state forgotten.");
        }
    }

    fn reclaim_stuck(&self) {
        for pool in self.state.runtime.load().pools.values() {
            let n = pool.reclaim_stuck();
            if n > 0 {
                self.state
                    .metrics
                    .leases_reclaimed
                    .with_label_values(&[pool.name.as_str()])
                    .inc_by(n as u64);
            }
        }
    }
}

impl Upkeep {
    /// Start the re-probes that are due: one cheap authenticated read per
    /// provider-disabled key and `reprobe_interval`, each in its own task
    /// (a slow provider never holds up the upkeep loop), through the first
    /// upstream that uses the pool. See `pool::reprobe`.
    fn reprobe(&self) {
        let runtime = self.state.runtime.load();
        // Keys due before the middle of the next sweep go now: otherwise a
        // probe recorded a few ms after this sweep would always wait for the
        // one after next (`interval` + one sweep).
        let horizon = crate::clock::now_ms() + (REPROBE_SWEEP / 2).as_millis() as i64;
        for pool in runtime.pools.values() {
            let leases = crate::pool::reprobe::due(pool, runtime.reprobe_interval(&pool.name), horizon);
            if leases.is_empty() {
                continue;
            }
            let Some(upstream) = runtime.pool_upstream(pool) else {
                tracing::debug!(pool = %pool.name, "No upstream uses the pool; its disabled keys cannot be re-probed.");
                continue;
            };
            for lease in leases {
                let (state, upstream) = (self.state.clone(), upstream.clone());
                tokio::spawn(async move {
                    let probe = crate::proxy::forward::probe(&state, &upstream, &lease).await;
                    let outcome = crate::pool::reprobe::settle(&lease, probe.status, probe.error.as_deref());
                    state
                        .metrics
                        .key_reprobes
                        .with_label_values(&[lease.pool().name.as_str(), outcome.as_str()])
                        .inc();
                });
            }
        }
    }
}

#[async_trait]
impl BackgroundService for Upkeep {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Budget alerts to the webhook (`budgets.webhook`, read at start).
        if let (Some(url), Some(queue)) = (
            self.state.config.file.budgets.webhook.clone(),
            self.state.alert_queue.lock().take(),
        ) {
            let failed = self.state.metrics.budget_webhook_failed.clone();
            tokio::spawn(crate::budget::deliver(url, queue, failed));
        }
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let dir = self.state.config.routes_dir.clone();
        let mut routes_seen = routes_fingerprint(&dir).await;
        let watch_dir = dir.clone();
        let watcher = new_debouncer(DEBOUNCE, move |res: DebounceEventResult| {
            let relevant = res.is_ok_and(|events| {
                events
                    .iter()
                    .any(|e| matches!(e.path.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")))
            });
            if relevant {
                let _ = tx.try_send(());
            }
        });
        let _watcher = match watcher {
            Ok(mut w) => match w.watcher().watch(&watch_dir, RecursiveMode::NonRecursive) {
                Ok(()) => Some(w),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "Cannot watch routes.d; reload with SIGHUP.");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "Cannot start the file watcher; reload with SIGHUP.");
                None
            }
        };
        let (cert_tx, mut cert_rx) = mpsc::channel::<()>(1);
        // The data plane's and the admin listener's certificates alike.
        let cert_files: Vec<std::path::PathBuf> = [&self.state.tls, &self.state.admin_tls]
            .into_iter()
            .flatten()
            .flat_map(|certs| certs.paths())
            .collect();
        let _cert_watcher = (!cert_files.is_empty())
            .then(|| watch_files(cert_files, cert_tx))
            .flatten();
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "Cannot listen for SIGHUP.");
                None
            }
        };
        let mut key_tick = tokio::time::interval(
            self.state
                .config
                .file
                .database
                .key_refresh
                .0
                .max(Duration::from_millis(50)),
        );
        let mut save_tick = tokio::time::interval(SAVE_STATES);
        let mut health_tick = tokio::time::interval(Duration::from_millis(500));
        let mut health_runs = std::collections::HashMap::new();
        let mut stuck_tick = tokio::time::interval(STUCK_SWEEP);
        let mut reprobe_tick = tokio::time::interval(REPROBE_SWEEP);
        let mut dns_tick = tokio::time::interval(DNS_REFRESH);
        let mut limits_tick = tokio::time::interval(LIMITER_SWEEP);
        dns_tick.tick().await; // resolved at start already
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(()) = rx.recv() => {
                    // An event is not a change: opening a file to read it
                    // (a `cat`, an editor, this very reload) is one too.
                    let now = routes_fingerprint(&dir).await;
                    if now.is_none() || now != routes_seen {
                        routes_seen = now;
                        self.reload("file change").await;
                    }
                }
                Some(()) = cert_rx.recv() => self.reload_certificates().await,
                Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    self.reload_config().await;
                    routes_seen = routes_fingerprint(&dir).await;
                }
                _ = save_tick.tick() => self.save_states().await,
                _ = health_tick.tick() => self.check_health(&mut health_runs),
                _ = stuck_tick.tick() => self.reclaim_stuck(),
                _ = reprobe_tick.tick() => self.reprobe(),
                _ = limits_tick.tick() => self.sweep_limits(),
                _ = key_tick.tick() => {
                    let state = self.state.clone();
                    match tokio::task::spawn_blocking(move || {
                        let changed = state.keys.refresh();
                        state.seed_quotas();
                        changed
                    })
                    .await
                    {
                        Ok(Ok(true)) => tracing::info!(keys = self.state.keys.len(), "Gateway keys reloaded."),
                        Ok(Err(e)) => tracing::warn!(error = %e, "Gateway key refresh failed; keeping the previous keys."),
                        _ => {}
                    }
                }
                _ = dns_tick.tick() => {
                    let runtime = self.state.runtime.load_full();
                    for upstream in runtime.upstreams.values() {
                        upstream.refresh().await;
                    }
                }
            }
        }
    }
}

/// Watch the directories of `files` (certificate renewals replace files by
/// rename or swap a symlink) and signal `tx` when one of them changes.
fn watch_files(
    files: Vec<std::path::PathBuf>,
    tx: mpsc::Sender<()>,
) -> Option<notify_debouncer_mini::Debouncer<notify_debouncer_mini::notify::RecommendedWatcher>> {
    let wanted: Vec<std::path::PathBuf> = files
        .iter()
        .map(|f| std::path::absolute(f).unwrap_or_else(|_| f.clone()))
        .collect();
    let names: std::collections::HashSet<std::ffi::OsString> = wanted
        .iter()
        .filter_map(|f| f.file_name().map(ToOwned::to_owned))
        .collect();
    let mut debouncer = new_debouncer(DEBOUNCE, move |res: DebounceEventResult| {
        let relevant = res.is_ok_and(|events| {
            events
                .iter()
                .any(|e| e.path.file_name().is_some_and(|n| names.contains(n)))
        });
        if relevant {
            let _ = tx.try_send(());
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "Cannot watch the TLS certificates; reload them with SIGHUP."))
    .ok()?;
    let dirs: std::collections::BTreeSet<std::path::PathBuf> = wanted
        .iter()
        .filter_map(|f| f.parent().map(ToOwned::to_owned))
        .collect();
    for dir in dirs {
        if let Err(e) = debouncer.watcher().watch(&dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "Cannot watch a TLS certificate directory; reload with SIGHUP.");
        }
    }
    Some(debouncer)
}

/// What the route files look like from their metadata alone (name, size,
/// modification time, inode), read without opening them, so that taking
/// it causes no file event of its own. `None` if the directory cannot be
/// read (the reload then reports why).
async fn routes_fingerprint(dir: &std::path::Path) -> Option<Vec<(std::ffi::OsString, u64, i64, i64, u64)>> {
    use std::os::unix::fs::MetadataExt;
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).ok()? {
            let entry = entry.ok()?;
            let path = entry.path();
            if !matches!(path.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")) {
                continue;
            }
            let m = std::fs::metadata(&path).ok()?;
            out.push((entry.file_name(), m.len(), m.mtime(), m.mtime_nsec(), m.ino()));
        }
        out.sort();
        Some(out)
    })
    .await
    .ok()
    .flatten()
}
