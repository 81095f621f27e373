//! Prometheus metrics (served by the admin service at `/metrics`).
//! Labels stay low-cardinality: route and upstream names, status codes,
//! error kinds, pool names, model names, upstream key ids (`k_` + 8 hex of
//! a hash; bounded by the pool sizes) — never paths or secrets.

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::sync::atomic::{AtomicU64, Ordering};

const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Series labelled by one route, looked up on first use and kept with the route.
#[derive(Default)]
pub struct RouteSeries(std::sync::OnceLock<RouteHandles>);

pub struct RouteHandles {
    pub duration: prometheus::Histogram,
    pub ttfb: prometheus::Histogram,
    pub retries: IntCounter,
}

impl std::fmt::Debug for RouteSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteSeries")
    }
}

impl RouteSeries {
    pub fn get(&self, m: &Metrics, route: &str) -> &RouteHandles {
        self.0.get_or_init(|| RouteHandles::resolve(m, route))
    }
}

impl RouteHandles {
    pub fn resolve(m: &Metrics, route: &str) -> Self {
        RouteHandles {
            duration: m.duration.with_label_values(&[route]),
            ttfb: m.ttfb.with_label_values(&[route]),
            retries: m.retries.with_label_values(&[route]),
        }
    }
}

/// What the gauges read at a scrape, handed in by the state that holds it
/// (metrics sit below the pools' and upstreams' owner, not above it).
pub struct Live<'a> {
    pub in_flight: usize,
    pub limiter_scopes: usize,
    pub pools: &'a [&'a crate::pool::KeyPool],
    pub upstreams: &'a [&'a crate::upstream::Upstream],
    pub audit: &'a crate::audit::AuditStats,
}

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub ttfb: HistogramVec,
    pub in_flight: IntGauge,
    pub streams_in_flight: IntGauge,
    pub upstream_errors: IntCounterVec,
    pub retries: IntCounterVec,
    pub tokens: IntCounterVec,
    /// Requests that ended without the provider's usage and were charged
    /// an estimate (docs/resilience.md), by route.
    pub usage_estimated: IntCounterVec,
    /// What requests cost (`pricing`), in the price table's currency, by
    /// route, upstream and model (the model label bounded like `tokens`).
    pub cost: CounterVec,
    /// Requests with usage whose model no price matched (they cost nothing).
    pub unpriced: IntCounterVec,
    /// Budget thresholds crossed, by whose budget and threshold (percent).
    pub budget_alerts: IntCounterVec,
    /// Alerts the webhook's queue had no room for, or the receiver refused.
    pub budget_webhook_failed: IntCounter,
    /// Scopes the in-memory rate limiter holds (idle ones are swept).
    pub limiter_scopes: IntGauge,
    pub pool_keys: IntGaugeVec,
    pub pool_in_flight: IntGaugeVec,
    pub pool_key_in_flight: IntGaugeVec,
    pub pool_key_cooldown: GaugeVec,
    pub leases_reclaimed: IntCounterVec,
    /// Re-probes of provider-disabled keys, by pool and result
    /// (`recovered`, `still_refused`, `error`).
    pub key_reprobes: IntCounterVec,
    pub failovers: IntCounterVec,
    /// Retries not made, by upstream and reason (`budget`,
    /// `not_idempotent`, `exhausted`): the client got the last answer.
    pub retries_refused: IntCounterVec,
    pub upstream_in_flight: IntGaugeVec,
    pub upstream_address_healthy: IntGaugeVec,
    pub audit_queue_depth: IntGauge,
    pub audit_dropped: IntCounter,
    audit_dropped_seen: AtomicU64,
    pub audit_written: IntCounter,
    audit_written_seen: AtomicU64,
    pub config_reloads: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub cluster_redis_up: IntGauge,
    pub cluster_nodes: IntGauge,
    pub cluster_local_decisions: IntCounter,
    pub audit_unshipped: IntGauge,
    /// Cluster mode with Postgres: rows Postgres refused, kept aside in the
    /// node's quarantine, by kind (`record`, `audit`, `admin_audit`).
    pub cluster_quarantined: IntCounterVec,
    /// Requests refused before a route or a valid key, by reason (only
    /// sampled into the audit log).
    pub refused: IntCounterVec,
    pub audit_budget_deleted: IntCounter,
    audit_budget_deleted_seen: AtomicU64,
    /// Bytes in audit segment files not yet indexed and deleted.
    pub audit_segment_bytes: IntGauge,
    pub audit_captured_bytes: IntGauge,
    /// Audit records found damaged in a segment file and skipped.
    pub audit_damaged: IntCounter,
    audit_damaged_seen: AtomicU64,
    /// Connections and requests the data port's transport limits refused,
    /// by reason (`per_client_cap`, `header_timeout`, `header_too_large`,
    /// `uri_too_long`).
    pub transport_refusals: IntCounterVec,
    /// OpenTelemetry spans exported (`otel:`).
    pub otel_spans_exported: IntCounter,
    /// OpenTelemetry spans dropped, by reason (`queue_full`, `export_failed`).
    pub otel_spans_dropped: IntCounterVec,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
    let m = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

fn histogram_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<HistogramVec, prometheus::Error> {
    let m = HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()), labels)?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

fn gauge(r: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    let m = IntGauge::new(name, help)?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec, prometheus::Error> {
    let m = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

fn counter(r: &Registry, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    let m = IntCounter::new(name, help)?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registry::new_custom(Some("fastgate".into()), None)?;
        Ok(Metrics {
            requests: counter_vec(
                &r,
                "requests_total",
                "Requests answered, by route, upstream and status.",
                &["route", "upstream", "status"],
            )?,
            duration: histogram_vec(
                &r,
                "request_duration_seconds",
                "Whole request time, by route.",
                &["route"],
            )?,
            ttfb: histogram_vec(
                &r,
                "ttfb_seconds",
                "Time to the first response byte, by route.",
                &["route"],
            )?,
            in_flight: gauge(&r, "requests_in_flight", "Requests being served.")?,
            transport_refusals: counter_vec(
                &r,
                "transport_refusals_total",
                "Connections and requests refused by server.limits before any route, by reason.",
                &["reason"],
            )?,
            streams_in_flight: gauge(&r, "streams_in_flight", "Streamed (SSE) responses being forwarded.")?,
            pool_key_in_flight: gauge_vec(
                &r,
                "pool_key_in_flight",
                "Requests in flight on one upstream key (by key id, never the secret).",
                &["pool", "key"],
            )?,
            pool_key_cooldown: {
                let m = GaugeVec::new(
                    Opts::new(
                        "pool_key_cooldown_seconds",
                        "Seconds until a cooling or resting upstream key is usable again (0 when usable).",
                    ),
                    &["pool", "key"],
                )?;
                r.register(Box::new(m.clone()))?;
                m
            },
            leases_reclaimed: counter_vec(
                &r,
                "pool_leases_reclaimed_total",
                "Key leases held past stuck_after and reclaimed, by pool.",
                &["pool"],
            )?,
            key_reprobes: counter_vec(
                &r,
                "key_reprobes_total",
                "Re-probes of pool keys the provider disabled (401/403), by pool and result: recovered, still_refused, error.",
                &["pool", "result"],
            )?,
            failovers: counter_vec(
                &r,
                "failovers_total",
                "Requests moved to another key, address or upstream before the first byte, by reason.",
                &["reason"],
            )?,
            retries_refused: counter_vec(
                &r,
                "retries_refused_total",
                "Retryable failures not retried, by upstream and reason (budget|not_idempotent|exhausted).",
                &["upstream", "reason"],
            )?,
            upstream_in_flight: gauge_vec(
                &r,
                "upstream_in_flight",
                "Requests in flight toward an upstream.",
                &["upstream"],
            )?,
            upstream_address_healthy: gauge_vec(
                &r,
                "upstream_address_healthy",
                "1 when a resolved upstream address passes its health checks and is not resting after a refused connection.",
                &["upstream", "address"],
            )?,
            upstream_errors: counter_vec(
                &r,
                "upstream_errors_total",
                "Failed upstream attempts, by upstream and kind.",
                &["upstream", "kind"],
            )?,
            retries: counter_vec(&r, "retries_total", "Extra upstream attempts, by route.", &["route"])?,
            tokens: counter_vec(
                &r,
                "tokens_total",
                "Tokens reported by upstreams (or estimated for requests that ended without usage), by route, model and kind (prompt|completion).",
                &["route", "model", "kind"],
            )?,
            usage_estimated: counter_vec(
                &r,
                "usage_estimated_total",
                "Requests that ended without the provider's usage (client hang-up, cut stream) and were charged an estimate, by route.",
                &["route"],
            )?,
            cost: {
                let m = CounterVec::new(
                    Opts::new(
                        "cost_total",
                        "What requests cost by the price table (in its currency), by route, upstream and model.",
                    ),
                    &["route", "upstream", "model"],
                )?;
                r.register(Box::new(m.clone()))?;
                m
            },
            unpriced: counter_vec(
                &r,
                "unpriced_requests_total",
                "Requests with token usage whose model has no price (counted as costing nothing), by route and upstream.",
                &["route", "upstream"],
            )?,
            budget_alerts: counter_vec(
                &r,
                "budget_alerts_total",
                "Budget alert thresholds crossed, by whose budget (key, user, route) and threshold in percent.",
                &["of", "threshold"],
            )?,
            budget_webhook_failed: counter(
                &r,
                "budget_webhook_failed_total",
                "Budget alerts not delivered to the webhook (queue full, receiver down or refusing).",
            )?,
            limiter_scopes: gauge(
                &r,
                "limiter_scopes",
                "Rate-limit scopes (keys, key/route pairs, client addresses) held in memory; idle ones are forgotten.",
            )?,
            pool_keys: gauge_vec(&r, "pool_keys", "Upstream keys per pool and state.", &["pool", "state"])?,
            pool_in_flight: gauge_vec(&r, "pool_in_flight", "Requests holding a key of the pool.", &["pool"])?,
            audit_queue_depth: gauge(&r, "audit_queue_depth", "Audit records waiting to be written.")?,
            audit_dropped: counter(
                &r,
                "audit_dropped_total",
                "Audit records dropped (queue full or database failing).",
            )?,
            audit_dropped_seen: AtomicU64::new(0),
            audit_written: counter(&r, "audit_written_total", "Audit records written.")?,
            audit_written_seen: AtomicU64::new(0),
            config_reloads: counter_vec(
                &r,
                "config_reloads_total",
                "routes.d reloads, by result (success|failure).",
                &["result"],
            )?,
            rate_limited: counter_vec(
                &r,
                "rate_limited_total",
                "Requests refused by a rate limit, by route.",
                &["route"],
            )?,
            cluster_redis_up: gauge(
                &r,
                "cluster_redis_up",
                "Cluster mode: 1 while Redis answers (breaker closed).",
            )?,
            cluster_nodes: gauge(
                &r,
                "cluster_nodes",
                "Cluster mode: live nodes seen in the last heartbeat.",
            )?,
            cluster_local_decisions: counter(
                &r,
                "cluster_local_decisions_total",
                "Cluster mode: rate-limit decisions made without Redis (on_redis_down).",
            )?,
            audit_unshipped: gauge(
                &r,
                "audit_unshipped",
                "Cluster mode with Postgres: audit rows in the local outbox not shipped yet.",
            )?,
            cluster_quarantined: {
                let m = counter_vec(
                    &r,
                    "cluster_quarantined_total",
                    "Cluster mode with Postgres: rows Postgres refused, kept aside in the local quarantine (GET /api/cluster/quarantine), by kind (record|audit|admin_audit).",
                    &["kind"],
                )?;
                for kind in ["record", "audit", "admin_audit"] {
                    m.with_label_values(&[kind]);
                }
                m
            },
            refused: {
                let m = counter_vec(
                    &r,
                    "refused_requests_total",
                    "Requests refused before a route or a valid gateway key was found, by reason (no_route|no_key|bad_key|inactive_key); the audit log keeps at most one per client per second.",
                    &["reason"],
                )?;
                for reason in crate::audit::refused::Refusal::ALL {
                    m.with_label_values(&[reason.as_str()]);
                }
                m
            },
            audit_budget_deleted: counter(
                &r,
                "audit_budget_deleted_total",
                "Audit rows deleted (oldest first) to keep the database under audit.max_bytes.",
            )?,
            audit_budget_deleted_seen: AtomicU64::new(0),
            audit_segment_bytes: gauge(
                &r,
                "audit_segment_bytes",
                "Bytes in the audit segment files (written, not yet indexed into the database and deleted).",
            )?,
            audit_captured_bytes: gauge(
                &r,
                "audit_captured_bytes",
                "Bytes of indexed audit segments kept for their captured headers and bodies.",
            )?,
            audit_damaged: counter(
                &r,
                "audit_damaged_total",
                "Audit records found damaged in a segment file (after a machine crash) and skipped.",
            )?,
            audit_damaged_seen: AtomicU64::new(0),
            otel_spans_exported: counter(
                &r,
                "otel_spans_exported_total",
                "OpenTelemetry spans the collector accepted (otel:).",
            )?,
            otel_spans_dropped: {
                let m = counter_vec(
                    &r,
                    "otel_spans_dropped_total",
                    "OpenTelemetry spans dropped, by reason: queue_full (the export queue was full; never waited for) or export_failed (the collector refused or did not answer in time).",
                    &["reason"],
                )?;
                for reason in ["queue_full", "export_failed"] {
                    m.with_label_values(&[reason]);
                }
                m
            },
            registry: r,
        })
    }

    /// Bring a counter up to a value kept elsewhere (the audit writer's stats).
    fn sync_counter(counter: &IntCounter, seen: &AtomicU64, now: u64) {
        let before = seen.swap(now, Ordering::Relaxed);
        if now > before {
            counter.inc_by(now - before);
        }
    }

    /// The handles the trace exporter counts with.
    pub fn otel_counters(&self) -> crate::otel::Counters {
        crate::otel::Counters {
            exported: self.otel_spans_exported.clone(),
            dropped_queue_full: self.otel_spans_dropped.with_label_values(&["queue_full"]),
            dropped_export_failed: self.otel_spans_dropped.with_label_values(&["export_failed"]),
        }
    }

    /// Prometheus text format, after refreshing the gauges read from live state.
    pub fn render(&self, live: Live<'_>) -> String {
        self.in_flight.set(live.in_flight as i64);
        self.limiter_scopes.set(live.limiter_scopes as i64);
        let now = crate::clock::now_ms();
        // Keys and addresses come and go: stale series must not linger.
        self.pool_key_in_flight.reset();
        self.pool_key_cooldown.reset();
        self.upstream_address_healthy.reset();
        self.pool_keys.reset();
        for pool in live.pools {
            let keys = pool.keys();
            let counts = pool.count_by_state(now);
            for (st, n) in crate::pool::KeyState::ALL.iter().zip(counts) {
                self.pool_keys
                    .with_label_values(&[pool.name.as_str(), st.as_str()])
                    .set(n as i64);
            }
            self.pool_in_flight
                .with_label_values(&[pool.name.as_str()])
                .set(keys.iter().map(|k| i64::from(k.in_flight())).sum());
            for k in &keys {
                let labels = [pool.name.as_str(), k.id.as_str()];
                self.pool_key_in_flight
                    .with_label_values(&labels)
                    .set(i64::from(k.in_flight()));
                let wait = k.closed_until(now).map_or(0.0, |t| (t - now) as f64 / 1000.0);
                self.pool_key_cooldown.with_label_values(&labels).set(wait);
            }
        }
        for up in live.upstreams {
            self.upstream_in_flight
                .with_label_values(&[up.name.as_str()])
                .set(i64::from(up.in_flight()));
            for a in up.addresses() {
                self.upstream_address_healthy
                    .with_label_values(&[up.name.as_str(), a.address.as_str()])
                    .set(i64::from(a.healthy && !a.resting));
            }
        }
        let stats = live.audit;
        self.audit_queue_depth.set(stats.queued.load(Ordering::Relaxed) as i64);
        Self::sync_counter(
            &self.audit_dropped,
            &self.audit_dropped_seen,
            stats.dropped.load(Ordering::Relaxed),
        );
        Self::sync_counter(
            &self.audit_written,
            &self.audit_written_seen,
            stats.written.load(Ordering::Relaxed),
        );
        Self::sync_counter(
            &self.audit_budget_deleted,
            &self.audit_budget_deleted_seen,
            stats.budget_deleted.load(Ordering::Relaxed),
        );
        Self::sync_counter(
            &self.audit_damaged,
            &self.audit_damaged_seen,
            stats.damaged.load(Ordering::Relaxed),
        );
        self.audit_segment_bytes
            .set(stats.segment_bytes.load(Ordering::Relaxed).min(i64::MAX as u64) as i64);
        self.audit_captured_bytes
            .set(stats.captured_bytes.load(Ordering::Relaxed).min(i64::MAX as u64) as i64);
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "Encoding metrics failed.");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
