//! Background upkeep, run as one Pingora background service: route reloads
//! (file watch, debounced, and SIGHUP), gateway-key cache refresh, and
//! re-resolution of upstream hostnames.

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
}

#[async_trait]
impl BackgroundService for Upkeep {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let dir = self.state.config.routes_dir.clone();
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
            Ok(mut w) => match w.watcher().watch(&dir, RecursiveMode::NonRecursive) {
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
        let mut dns_tick = tokio::time::interval(DNS_REFRESH);
        dns_tick.tick().await; // resolved at start already
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(()) = rx.recv() => self.reload("file change").await,
                Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    self.reload("SIGHUP").await;
                }
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
                    for upstream in self.state.upstreams.values() {
                        upstream.refresh().await;
                    }
                }
            }
        }
    }
}
