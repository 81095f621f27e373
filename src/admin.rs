//! The admin service on its own port (default `127.0.0.1:9090`), run inside
//! the Pingora server as a background service and stopped with it:
//! `/health` (liveness), `/health/ready` (database writable, routes loaded),
//! `/metrics` (Prometheus). The admin REST API and web UI grow here.

use crate::state::AppState;
use async_trait::async_trait;
use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use pingora::{server::ShutdownWatch, services::background::BackgroundService};
use serde_json::json;
use std::sync::Arc;

pub struct AdminService {
    pub state: Arc<AppState>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn ready(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let db = state.clone();
    let db_ok = tokio::task::spawn_blocking(move || db.database_writable())
        .await
        .unwrap_or(false);
    let routes = state.routes.load().len();
    let body = json!({"database_writable": db_ok, "routes": routes, "ready": db_ok && routes > 0});
    let status = if db_ok && routes > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(&state),
    )
}

#[async_trait]
impl BackgroundService for AdminService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let addr = self.state.config.admin_listen;
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(%addr, error = %e, "Admin service cannot listen; continuing without it.");
                return;
            }
        };
        tracing::info!(%addr, "Admin service listening.");
        let app = router(self.state.clone());
        let stop = async move {
            let _ = shutdown.changed().await;
        };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
            tracing::error!(error = %e, "Admin service failed.");
        }
    }
}
