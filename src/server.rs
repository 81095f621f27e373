//! Assemble the Pingora server: the data-plane proxy service, the upkeep
//! background service, thread count and graceful shutdown.

use crate::{
    admin::{AdminService, AdminState},
    proxy::Gateway,
    reload::Upkeep,
    state::AppState,
    store::StoreError,
};
use async_trait::async_trait;
use pingora::{
    proxy::http_proxy_service,
    server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, configuration::ServerConf},
    services::background::background_service,
};
use std::{sync::Arc, time::Duration};

/// On SIGTERM or SIGINT, wait (up to the grace period) until in-flight
/// requests finish, then let Pingora stop. Pingora's own grace period is an
/// unconditional sleep; this one ends as soon as the server is idle.
struct DrainThenStop {
    state: Arc<AppState>,
    grace: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for DrainThenStop {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::error!("Cannot install signal handlers; stopping.");
            return ShutdownSignal::FastShutdown;
        };
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        // Poll the in-flight counter: shutdown is rare and 50 ms is short.
        let deadline = tokio::time::Instant::now() + self.grace;
        tracing::info!(
            signal = which,
            in_flight = self.state.in_flight(),
            grace_s = self.grace.as_secs(),
            "Shutting down: draining in-flight requests."
        );
        while self.state.in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(in_flight = self.state.in_flight(), "Drained; stopping.");
        ShutdownSignal::GracefulTerminate
    }
}

/// Build and run the server until a shutdown signal. Blocks.
pub fn run(state: Arc<AppState>) -> Result<(), StoreError> {
    let admin = Arc::new(AdminState::new(state.clone())?);
    let conf = ServerConf {
        threads: state.config.threads(),
        // Draining happens in `DrainThenStop`; then stop promptly.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        upstream_keepalive_pool_size: state.config.file.server.upstream_keepalive_pool,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut proxy = http_proxy_service(&server.configuration, Gateway::new(state.clone()));
    proxy.add_tcp(&state.config.listen.to_string());
    server.add_service(proxy);
    server.add_service(background_service("upkeep", Upkeep { state: state.clone() }));
    server.add_service(background_service("admin", AdminService { state: admin }));

    tracing::info!(
        listen = %state.config.listen,
        admin = %state.config.admin_listen,
        threads = state.config.threads(),
        routes = state.routes.load().len(),
        upstreams = state.runtime.load().upstreams.len(),
        gateway_keys = state.keys.len(),
        "FastGate serving."
    );
    let grace = state.config.file.server.grace_period.0;
    server.run(RunArgs {
        shutdown_signal: Box::new(DrainThenStop {
            state: state.clone(),
            grace,
        }),
    });
    // Every request has finished: write the audit rows still queued and
    // the key states changed since the last save.
    state.audit.close();
    if let Err(e) = state.save_pool_states() {
        tracing::warn!(error = %e, "Could not save the pool key states at shutdown.");
    }
    tracing::info!(
        written = state.audit.stats().written.load(std::sync::atomic::Ordering::Relaxed),
        "Audit log flushed; exiting."
    );
    Ok(())
}
