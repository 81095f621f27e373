//! Assemble the Pingora server: the data-plane proxy service, the upkeep
//! background service, thread count, graceful shutdown and upgrade.
//!
//! Shutdown order (SIGTERM or SIGINT):
//! 1. readiness turns 503 and Pingora is told to stop at once: listeners
//!    close (new connections are refused), idle keep-alive connections are
//!    closed, a kept-alive connection closes after its current request;
//! 2. in-flight requests and streams finish, up to `server.grace_period`;
//! 3. the audit log is flushed, queued trace spans exported (at most 3 s)
//!    and key states saved, then exit 0.
//!
//! SIGQUIT hands the listening sockets to a process started with
//! `serve --upgrade` (Pingora's graceful upgrade), then drains the same way.

use crate::{
    admin::{AdminService, AdminState},
    client_addr::ProxyProtocolBeforeTls,
    proxy::Gateway,
    proxy::conn_guard::{ConnGuard, GuardSettings},
    reload::Upkeep,
    state::{AppState, Lifecycle},
    store::StoreError,
};
use async_trait::async_trait;
use pingora::{
    apps::HttpServerOptions,
    listeners::tls::TlsSettings,
    proxy::http_proxy,
    server::{
        ExecutionPhase, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch,
        configuration::{Opt, ServerConf},
    },
    services::{background::background_service, listening::Service},
};
use std::{
    sync::{Arc, Once},
    time::{Duration, Instant},
};

/// Turns a signal into Pingora's shutdown at once (so listeners close before
/// anything else happens) and marks the process as no longer ready.
struct Signals {
    state: Arc<AppState>,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            tracing::error!("Cannot install signal handlers; stopping.");
            return ShutdownSignal::FastShutdown;
        };
        let (which, next) = tokio::select! {
            _ = term.recv() => ("SIGTERM", Lifecycle::Draining),
            _ = int.recv() => ("SIGINT", Lifecycle::Draining),
            _ = quit.recv() => ("SIGQUIT", Lifecycle::HandingOver),
        };
        self.state.lifecycle.send_replace(next);
        // A second SIGTERM/SIGINT (an impatient operator, a supervisor's
        // escalation) stops at once: the audit log is still flushed.
        let state = self.state.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!(
                in_flight = state.in_flight(),
                "Second signal: stopping now, cutting the requests in flight."
            );
            let _ = tokio::task::spawn_blocking(move || {
                flush_and_close(&state);
                std::process::exit(1);
            })
            .await;
        });
        tracing::info!(
            signal = which,
            in_flight = self.state.in_flight(),
            grace_s = self.state.config.file.server.grace_period.0.as_secs_f64(),
            "Shutting down: no new connections; draining in-flight requests."
        );
        match next {
            Lifecycle::HandingOver => ShutdownSignal::GracefulUpgrade,
            _ => ShutdownSignal::GracefulTerminate,
        }
    }
}

/// Write what must survive the process: queued audit rows, key states.
/// Runs once, whichever of the drain watcher or `run`'s return gets here.
fn flush_and_close(state: &AppState) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        state.audit.close();
        if let Some(tracer) = state.otel.load_full()
            && !tracer.flush(OTEL_FLUSH_AT_STOP)
        {
            tracing::warn!(
                queued = tracer.queued(),
                "OpenTelemetry spans not all exported at shutdown."
            );
        }
        if let Err(e) = state.save_pool_states() {
            tracing::warn!(error = %e, "Could not save the pool key states at shutdown.");
        }
        tracing::info!(
            written = state.audit.stats().written.load(std::sync::atomic::Ordering::Relaxed),
            dropped = state.audit.stats().dropped.load(std::sync::atomic::Ordering::Relaxed),
            "Audit log flushed; exiting."
        );
    });
}

/// How long a stopping node waits for its last spans to be exported.
const OTEL_FLUSH_AT_STOP: Duration = Duration::from_secs(3);

/// How long a stopping node waits for Redis to confirm its last settlements.
const SETTLE_AT_STOP: Duration = Duration::from_secs(2);

/// Once Pingora has stopped accepting (its grace period begins), wait until
/// no request is in flight or the grace period is over, flush and exit 0.
/// Pingora's own grace period is an unconditional sleep; this ends the
/// process as soon as it is idle.
fn spawn_drain_watcher(state: Arc<AppState>, mut phases: tokio::sync::broadcast::Receiver<ExecutionPhase>) {
    let spawned = std::thread::Builder::new().name("drain".into()).spawn(move || {
        loop {
            match phases.blocking_recv() {
                Ok(ExecutionPhase::ShutdownGracePeriod) => break,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
        let deadline = Instant::now() + state.config.file.server.grace_period.0;
        // Polled: shutdown is rare and 20 ms is short.
        while state.in_flight() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = state.in_flight();
        if left > 0 {
            tracing::warn!(
                in_flight = left,
                "Grace period over; cutting the requests still in flight."
            );
        } else {
            tracing::info!("Drained.");
        }
        if let Some(cluster) = &state.cluster {
            // The last answers' settlements (lingering a few ms to batch)
            // and quota tokens owed from an outage go to Redis first: a
            // moment, not the whole grace period, if Redis is away.
            let until = Instant::now() + SETTLE_AT_STOP;
            while cluster.settling() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            if cluster.settling() {
                tracing::warn!(
                    "Stopping with settlements or owed quota tokens Redis has not confirmed: the shared counters miss them."
                );
            }
        }
        flush_and_close(&state);
        std::process::exit(0);
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "Cannot start the drain watcher; shutdown waits the whole grace period.");
    }
}

/// The proxy service on `server.listen`: plain or TLS (certificates by SNI,
/// HTTP/2 by ALPN), h2c where configured, PROXY protocol from trusted
/// balancers where configured.
fn add_data_plane(server: &mut Server, state: &Arc<AppState>) -> Result<(), StoreError> {
    const NAME: &str = "FastGate data plane";
    let listen = state.config.listen.to_string();
    let conf = &state.config.file.server;
    let mut proxy = http_proxy(&server.configuration, Gateway::new(state.clone()));
    let mut options = HttpServerOptions::default();
    options.h2c = conf.h2c && state.tls.is_none();
    // HTTP/2's idle connections close like HTTP/1.1's kept-alive ones.
    options.h2_idle_timeout = Some(conf.limits.keepalive_timeout.0).filter(|d| !d.is_zero());
    proxy.server_options = Some(options);
    let trusted = state.trusted_proxies.clone();
    // Every listener is guarded (header time and size, connections per
    // client); on a plain listener the guard also reads the PROXY header.
    let settings = GuardSettings {
        limits: conf.limits.clone(),
        refusals: state.metrics.transport_refusals.clone(),
    };
    match &state.tls {
        None => {
            let pp = conf.proxy_protocol.then(|| trusted.clone());
            let mut service = Service::new(NAME.into(), ConnGuard::new(proxy, settings, pp, trusted.clone()));
            service.add_tcp(&listen);
            server.add_service(service);
        }
        Some(certs) => {
            // Built on the resolver: the paths are unused, and the resolver
            // picks a certificate by SNI per handshake (TLS 1.2 and 1.3).
            let mut tls = TlsSettings::intermediate("", "").map_err(|e| StoreError::Invalid(e.to_string()))?;
            tls.set_cert_resolver(certs.clone());
            if certs.offers_h2() {
                tls.enable_h2();
            }
            let mut service = Service::new(NAME.into(), ConnGuard::new(proxy, settings, None, trusted.clone()));
            service.add_tls_with_settings(&listen, None, tls);
            if conf.proxy_protocol {
                service
                    .endpoints()
                    .set_pre_tls_callback(Arc::new(ProxyProtocolBeforeTls { trusted }));
            }
            server.add_service(service);
        }
    }
    Ok(())
}

/// Build and run the server until a shutdown signal. Blocks. With
/// `upgrade`, take the listening sockets over from a running FastGate.
pub fn run(state: Arc<AppState>, upgrade: bool) -> Result<(), StoreError> {
    let admin = Arc::new(AdminState::new(state.clone())?);
    let grace = state.config.file.server.grace_period.0;
    let conf = ServerConf {
        threads: state.config.threads(),
        // The drain watcher exits as soon as the server is idle; Pingora's
        // grace period is only the backstop behind it.
        grace_period_seconds: Some(grace.as_secs() + 2),
        graceful_shutdown_timeout_seconds: Some(1),
        upstream_keepalive_pool_size: state.config.file.server.upstream_keepalive_pool,
        upgrade_sock: state.config.upgrade_socket().to_string_lossy().into_owned(),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    spawn_drain_watcher(state.clone(), server.watch_execution_phase());
    server.bootstrap();

    add_data_plane(&mut server, &state)?;
    server.add_service(background_service("upkeep", Upkeep { state: state.clone() }));
    if let Some(cluster) = state.cluster.clone() {
        let app = state.clone();
        server.add_service(background_service(
            "cluster",
            crate::cluster::ClusterService {
                cluster,
                pools: Arc::new(move |name| app.runtime.load().pools.get(name).cloned()),
            },
        ));
    }
    if !state.config.file.cluster.postgres.is_empty() {
        server.add_service(background_service(
            "records",
            crate::replication::RecordsService { state: state.clone() },
        ));
    }
    server.add_service(background_service(
        "admin",
        AdminService {
            state: admin,
            upgrading: upgrade,
        },
    ));

    tracing::info!(
        listen = %state.config.listen,
        admin = %state.config.admin_listen,
        threads = state.config.threads(),
        routes = state.routes.load().len(),
        upstreams = state.runtime.load().upstreams.len(),
        gateway_keys = state.keys.len(),
        pid = std::process::id(),
        upgraded = upgrade,
        "FastGate serving."
    );
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals { state: state.clone() }),
    });
    // Only reached if the drain watcher did not exit first.
    flush_and_close(&state);
    Ok(())
}
