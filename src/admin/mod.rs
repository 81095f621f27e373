//! The admin service on its own port (default `127.0.0.1:9090`), run inside
//! the Pingora server as a background service and stopped with it.
//!
//! Open: `/health`, `/health/ready`, `/metrics`, `POST /api/auth/login`.
//! Everything else under `/api` needs `Authorization: Bearer <jwt | admin token>`.
//! Errors are `{"error":{"code","message"}}`. See docs/admin-api.md.

pub mod answers;
pub mod cluster_log;
pub mod error;
pub mod events;
pub mod keys;
pub mod listener;
pub mod logs;
pub mod pools;
pub mod routes;
pub mod session;
pub mod stats;
pub mod ui;
pub mod users;

use crate::{
    state::{AppState, Lifecycle},
    store::{self, users::Role},
};
use async_trait::async_trait;
use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::{get, post},
};
use error::ApiError;
use pingora::{server::ShutdownWatch, services::background::BackgroundService};
use rand::{Rng, distr::Alphanumeric};
use rusqlite::Connection;
use serde_json::json;
use std::{net::SocketAddr, sync::Arc, time::Duration};

/// What admin handlers share.
pub struct AdminState {
    pub app: Arc<AppState>,
    pub tokens: session::Tokens,
    pub throttle: session::Throttle,
    /// One route edit at a time (read, validate, write, reload).
    pub route_edits: tokio::sync::Mutex<()>,
    /// Writes and small reads (users, keys, sessions).
    conn: Arc<parking_lot::Mutex<Connection>>,
    /// Reads over the audit log (logs, stats, usage), apart from `conn` so a
    /// long one never holds up logins or key changes (WAL: readers do not
    /// block the writer).
    readers: Vec<Arc<parking_lot::Mutex<Connection>>>,
    /// `admin.tls`, loaded at startup (a bad certificate stops the start).
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Connections for audit-log reads.
const READERS: usize = 2;

fn random_secret(len: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// The JWT secret FastGate generated and keeps in its database: sealed with
/// `secrets.master_key` when one is set (a value stored in clear before the
/// key was set is sealed now).
fn generated_jwt_secret(conn: &Connection, sealer: &crate::seal::Sealer) -> Result<String, store::StoreError> {
    const NAME: &str = "jwt_secret";
    let stored = store::settings::get_or_create(conn, NAME, || sealer.seal(NAME, &random_secret(48)))?;
    let clear = sealer
        .open(NAME, &stored)
        .map_err(|e| store::StoreError::Invalid(e.to_string()))?;
    if sealer.enabled() && !crate::seal::Sealer::is_sealed(&stored) {
        store::settings::set(conn, NAME, &sealer.seal(NAME, &clear))?;
    }
    Ok(clear)
}

impl AdminState {
    /// Open the admin connection, settle the JWT secret, and create the
    /// first admin if there are no users (password from
    /// `FASTGATE_ADMIN_PASSWORD`, else generated and printed once).
    pub fn new(app: Arc<AppState>) -> Result<Self, store::StoreError> {
        let conn = store::open(&app.config.database_path)?;
        let cfg = &app.config.file.admin;
        let tls = app
            .admin_tls
            .clone()
            .map(listener::tls_acceptor)
            .transpose()
            .map_err(|e| store::StoreError::Invalid(e.to_string()))?;
        let secret = if cfg.jwt_secret.is_empty() {
            generated_jwt_secret(&conn, &crate::seal::Sealer::new(&app.config.file.secrets.master_key))?
        } else {
            cfg.jwt_secret.clone()
        };
        if store::users::count(&conn)? == 0 {
            let (password, generated) = match std::env::var("FASTGATE_ADMIN_PASSWORD") {
                Ok(p) if !p.is_empty() => (p, false),
                _ => (random_secret(20), true),
            };
            let user = store::users::create(&conn, "admin", &password, Role::Admin)?;
            store::admin_audit::record(
                &conn,
                "fastgate",
                "user.bootstrap",
                Some(&user.id),
                None,
                Some(&json!(user)),
            )?;
            if generated {
                // Printed once, to the terminal only: never into the logs.
                println!("FastGate created the admin user 'admin' with password: {password}");
                println!("Change it with `fastgate users passwd admin`; it is not shown again.");
            } else {
                tracing::info!("Created the admin user 'admin' from FASTGATE_ADMIN_PASSWORD.");
            }
        }
        Ok(AdminState {
            tokens: session::Tokens::new(secret.as_bytes(), cfg.token_ttl.0, &cfg.token),
            throttle: session::Throttle::default(),
            route_edits: tokio::sync::Mutex::new(()),
            conn: Arc::new(parking_lot::Mutex::new(conn)),
            readers: (0..READERS)
                .map(|_| store::open(&app.config.database_path).map(|c| Arc::new(parking_lot::Mutex::new(c))))
                .collect::<Result<_, _>>()?,
            tls,
            app,
        })
    }

    /// Run blocking database work off the async workers.
    pub async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, store::StoreError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&conn.lock()))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(ApiError::from)
    }

    /// Where the audit log's captured headers and bodies are kept.
    pub fn captured(&self) -> crate::audit::captured::CapturedStore {
        crate::audit::captured::CapturedStore::for_database(&self.app.config.database_path)
    }

    /// Run a read of the audit log on a reader connection (a free one if
    /// any), off the async workers.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, store::StoreError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let guard = readers
                .iter()
                .find_map(|r| r.try_lock())
                .unwrap_or_else(|| readers[rand::random_range(0..readers.len())].lock());
            f(&guard)
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ApiError::from)
    }

    /// Make the data plane see gateway-key changes now, not at the next tick.
    pub async fn refresh_keys(&self) {
        let app = self.app.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let _ = app.keys.refresh();
            app.seed_quotas();
        })
        .await;
    }
}

pub fn router(state: Arc<AdminState>) -> Router {
    let max_body = state.app.config.file.admin.max_body.0;
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/auth/login", post(session::login))
        .route("/api/me", get(session::me))
        .route("/api/users", get(users::list).post(users::create))
        .route(
            "/api/users/{id}",
            axum::routing::patch(users::update).delete(users::delete),
        )
        .route("/api/keys", get(keys::list).post(keys::create))
        .route(
            "/api/keys/{id}",
            get(keys::get).patch(keys::update).delete(keys::delete),
        )
        .route("/api/keys/{id}/rotate", post(keys::rotate))
        .route("/api/keys/{id}/usage", get(keys::usage))
        .route("/api/logs", get(logs::list))
        .route("/api/logs/{id}", get(logs::get))
        .route("/api/audit", get(logs::admin_events))
        .route("/api/cluster/quarantine", get(logs::cluster_quarantine))
        .route(
            "/api/cluster/quarantine/{id}",
            axum::routing::delete(logs::forget_quarantined),
        )
        .route("/api/routes", get(routes::list).post(routes::create))
        .route("/api/routes/test", post(routes::test))
        .route(
            "/api/routes/{name}",
            get(routes::get).put(routes::replace).delete(routes::delete),
        )
        .route("/api/routes/{name}/toggle", post(routes::toggle))
        .route("/api/routes/{name}/yaml", get(routes::get_yaml).put(routes::put_yaml))
        .route("/api/stats/summary", get(stats::summary))
        .route("/api/stats/timeseries", get(stats::timeseries))
        .route("/api/stats/top", get(stats::top))
        .route("/api/upstreams", get(pools::upstreams))
        .route("/api/pools", get(pools::list))
        .route("/api/pools/{pool}/keys", get(pools::keys).post(pools::add))
        .route(
            "/api/pools/{pool}/keys/{id}",
            axum::routing::patch(pools::patch).delete(pools::delete),
        )
        .route("/api/pools/{pool}/keys/{id}/reset", post(pools::reset))
        .route("/api/pools/{pool}/keys/{id}/test", post(pools::test))
        .route("/api/events", get(events::stream))
        .route("/api/config", get(stats::config))
        .route("/api/pricing", get(stats::pricing))
        .route("/api/config/reload", post(stats::reload))
        .route("/api/logs/export", get(logs::export))
        .fallback(ui::serve)
        .layer(axum::middleware::from_fn_with_state(max_body, answers::api_answers))
        .layer(axum::extract::DefaultBodyLimit::max(
            usize::try_from(max_body).unwrap_or(usize::MAX),
        ))
        .with_state(state)
}

async fn ready(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let app = state.app.clone();
    let db_ok = tokio::task::spawn_blocking(move || app.database_writable())
        .await
        .unwrap_or(false);
    let routes = state.app.routes.load().len();
    // Audit health is reported, not gating: shedding audit rows is better
    // than taking the gateway out of its balancer.
    let audit = state.app.audit.stats();
    let audit = json!({
        "enabled": state.app.audit.enabled(),
        "queued": audit.queued.load(std::sync::atomic::Ordering::Relaxed),
        "written_total": audit.written.load(std::sync::atomic::Ordering::Relaxed),
        "dropped_total": audit.dropped.load(std::sync::atomic::Ordering::Relaxed),
        "write_errors_total": audit.write_errors.load(std::sync::atomic::Ordering::Relaxed),
        "segment_bytes": audit.segment_bytes.load(std::sync::atomic::Ordering::Relaxed),
        "captured_bytes": audit.captured_bytes.load(std::sync::atomic::Ordering::Relaxed),
        "damaged_total": audit.damaged.load(std::sync::atomic::Ordering::Relaxed),
    });
    // Draining: not ready from the signal on, so a balancer stops sending
    // while in-flight requests finish.
    let lifecycle = state.app.lifecycle();
    let ready = db_ok && routes > 0 && lifecycle == Lifecycle::Serving;
    let body = json!({
        "database_writable": db_ok,
        "routes": routes,
        "audit": audit,
        "lifecycle": lifecycle.as_str(),
        "ready": ready,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

/// `GET /metrics`, behind `admin.metrics_token` when one is set.
async fn metrics(State(state): State<Arc<AdminState>>, headers: header::HeaderMap) -> axum::response::Response {
    let want = &state.app.config.file.admin.metrics_token;
    if !want.is_empty() && !bearer_matches(&headers, want) {
        let mut resp = ApiError::Unauthenticated.into_response();
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return resp;
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.app.render_metrics(),
    )
        .into_response()
}

/// Whether the request's bearer token is `want`, compared in constant time
/// (over digests, so the length does not show either).
fn bearer_matches(headers: &header::HeaderMap, want: &str) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
    else {
        return false;
    };
    let (a, b) = (Sha256::digest(given.trim().as_bytes()), Sha256::digest(want.as_bytes()));
    a.ct_eq(&b).into()
}

/// Bind the admin port. A process started with `--upgrade` waits (up to
/// 15 s) for the old one to let go of it.
async fn bind_admin(addr: SocketAddr, upgrading: bool) -> std::io::Result<tokio::net::TcpListener> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Err(e)
                if upgrading && e.kind() == std::io::ErrorKind::AddrInUse && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            result => return result,
        }
    }
}

pub struct AdminService {
    pub state: Arc<AdminState>,
    /// Started with `serve --upgrade`: the old process still holds the port.
    pub upgrading: bool,
}

#[async_trait]
impl BackgroundService for AdminService {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let addr = self.state.app.config.admin_listen;
        let listener = match bind_admin(addr, self.upgrading).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(%addr, error = %e, "Admin service cannot listen; continuing without it.");
                return;
            }
        };
        let cfg = &self.state.app.config.file.admin;
        let tls = self.state.tls.clone();
        tracing::info!(%addr, tls = tls.is_some(), "Admin service listening.");
        let app = router(self.state.clone());
        // Keep answering through a drain (readiness says 503 then, which is
        // what a balancer needs to see); let go of the port at once when
        // handing over to a new process, which binds it next.
        let mut lifecycle = self.state.app.lifecycle.subscribe();
        let stop = async move {
            let _ = lifecycle.wait_for(|l| *l == Lifecycle::HandingOver).await;
            tracing::info!("Admin service closed for the new process.");
        };
        listener::serve(listener, app, listener::Limits::from_config(cfg), tls, stop).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::Sealer;

    #[test]
    fn the_generated_jwt_secret_is_sealed_once_a_master_key_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let conn = store::open(&dir.path().join("s.db")).unwrap();
        let stored = |c: &Connection| store::settings::get(c, "jwt_secret").unwrap().unwrap();
        let clear = generated_jwt_secret(&conn, &Sealer::new("")).unwrap();
        assert_eq!(stored(&conn), clear, "no master key: kept as is");
        let key = Sealer::new("master-key-master-key-master-key-1");
        assert_eq!(
            generated_jwt_secret(&conn, &key).unwrap(),
            clear,
            "same secret: tokens survive"
        );
        assert!(Sealer::is_sealed(&stored(&conn)) && !stored(&conn).contains(&clear));
        assert_eq!(generated_jwt_secret(&conn, &key).unwrap(), clear);
        let err = generated_jwt_secret(&conn, &Sealer::new("")).unwrap_err().to_string();
        assert!(err.contains("master_key"), "{err}");
        assert!(generated_jwt_secret(&conn, &Sealer::new("some-other-master-key-entirely")).is_err());
    }
}
