//! OpenTelemetry traces: one SERVER span per request and one CLIENT span
//! per upstream attempt, with the GenAI semantic conventions, exported over
//! OTLP (http/protobuf or grpc) by `opentelemetry-otlp`. See docs/tracing.md.
//!
//! The request path only records a few ids and times (`span::RequestTrace`,
//! only when `otel:` is set); the decision to export is taken at the end
//! (`Tracer::finish`): sampled by the client's `traceparent` or the ratio,
//! and always when the request failed. Only then are spans built, and
//! handed to a bounded queue without waiting. A background thread batches
//! them to the exporter; a full queue drops and counts
//! (`fastgate_otel_spans_dropped_total`).

pub mod context;
pub mod span;

pub use span::{Finished, RequestTrace};

use crate::config::{OtelConfig, OtelProtocol};
use opentelemetry::{InstrumentationScope, trace::TraceId};
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc as std_mpsc,
    },
    time::{Duration, Instant},
};
use tokio::sync::mpsc;

/// The counters the exporter keeps (registered by `metrics`).
#[derive(Clone)]
pub struct Counters {
    pub exported: prometheus::IntCounter,
    pub dropped_queue_full: prometheus::IntCounter,
    pub dropped_export_failed: prometheus::IntCounter,
}

/// The ratio sampler: the same decision for a trace id on every node
/// (the SDK's `TraceIdRatioBased` rule: the id's low 63 bits under a bound).
#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    bound: u64,
}

impl Sampler {
    pub fn new(ratio: f64) -> Self {
        Sampler {
            bound: (ratio.clamp(0.0, 1.0) * (1u64 << 63) as f64) as u64,
        }
    }

    pub fn by_ratio(&self, trace_id: TraceId) -> bool {
        let bytes = trace_id.to_bytes();
        let mut low = [0u8; 8];
        low.copy_from_slice(&bytes[8..16]);
        (u64::from_be_bytes(low) >> 1) < self.bound
    }
}

enum Msg {
    Spans(Vec<SpanData>),
    /// Export what is queued, then answer.
    Flush(std_mpsc::SyncSender<()>),
}

/// A running exporter: the queue's sending side and its worker thread.
/// Dropping the last handle ends the worker after a last export.
pub struct Tracer {
    /// The settings it was started with (a reload compares them).
    pub config: OtelConfig,
    pub sampler: Sampler,
    tx: mpsc::UnboundedSender<Msg>,
    queued: Arc<AtomicUsize>,
    scope: InstrumentationScope,
    counters: Counters,
}

/// How long start-up waits for the exporter to be built.
const BUILD_WAIT: Duration = Duration::from_secs(10);

impl Tracer {
    /// Build the exporter on its own thread (with its own small runtime,
    /// apart from the proxy's) and start batching. Blocking: start-up and
    /// reloads only.
    pub fn start(config: &OtelConfig, counters: Counters) -> Result<Tracer, String> {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let (ready_tx, ready_rx) = std_mpsc::sync_channel(1);
        let worker = Worker {
            config: config.clone(),
            queued: queued.clone(),
            counters: counters.clone(),
        };
        std::thread::Builder::new()
            .name("fastgate-otel".into())
            .spawn(move || worker.run(rx, ready_tx))
            .map_err(|e| format!("otel: cannot start the exporter thread: {e}"))?;
        match ready_rx.recv_timeout(BUILD_WAIT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("otel: {e}")),
            Err(_) => return Err("otel: the exporter did not start".into()),
        }
        tracing::info!(
            endpoint = %config.export_url(),
            protocol = ?config.protocol,
            sample_ratio = config.sample_ratio,
            "OpenTelemetry trace export on."
        );
        Ok(Tracer {
            sampler: Sampler::new(config.sample_ratio),
            config: config.clone(),
            tx,
            queued,
            scope: InstrumentationScope::builder("fastgate")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            counters,
        })
    }

    /// The end of a traced request: exported if sampled at its start or if
    /// it failed; otherwise nothing is built.
    pub fn finish(&self, trace: RequestTrace, f: &Finished<'_>) {
        if !(trace.head_sampled || f.failed()) {
            return;
        }
        let spans = trace.into_spans(f, &self.scope);
        let n = spans.len();
        // A bound on what waits, not a lock: concurrent finishes may pass
        // it by a few spans at most.
        if self.queued.load(Ordering::Relaxed) + n > self.config.queue_size {
            self.counters.dropped_queue_full.inc_by(n as u64);
            return;
        }
        self.queued.fetch_add(n, Ordering::Relaxed);
        if self.tx.send(Msg::Spans(spans)).is_err() {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            self.counters.dropped_export_failed.inc_by(n as u64);
        }
    }

    /// Export what is queued, waiting at most `bound` (shutdown). Blocking.
    pub fn flush(&self, bound: Duration) -> bool {
        let (ack_tx, ack_rx) = std_mpsc::sync_channel(1);
        self.tx.send(Msg::Flush(ack_tx)).is_ok() && ack_rx.recv_timeout(bound).is_ok()
    }

    /// Spans waiting for the exporter.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

/// The exporter's side of the queue.
struct Worker {
    config: OtelConfig,
    queued: Arc<AtomicUsize>,
    counters: Counters,
}

impl Worker {
    fn run(self, rx: mpsc::UnboundedReceiver<Msg>, ready: std_mpsc::SyncSender<Result<(), String>>) {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(r) => r,
            Err(e) => {
                let _ = ready.send(Err(format!("cannot start a runtime: {e}")));
                return;
            }
        };
        runtime.block_on(async move {
            let exporter = match build_exporter(&self.config) {
                Ok(e) => {
                    let _ = ready.send(Ok(()));
                    e
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            self.batch(exporter, rx).await;
        });
    }

    /// Collect spans into batches of `batch_size`, exported when full or
    /// `flush_interval` after their first span; one export at a time.
    async fn batch(self, exporter: opentelemetry_otlp::SpanExporter, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut batch: Vec<SpanData> = Vec::new();
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let msg = match deadline {
                Some(at) => tokio::select! {
                    m = rx.recv() => m,
                    _ = tokio::time::sleep_until(at) => {
                        self.export(&exporter, &mut batch).await;
                        deadline = None;
                        continue;
                    }
                },
                None => rx.recv().await,
            };
            match msg {
                Some(Msg::Spans(spans)) => {
                    self.queued.fetch_sub(spans.len(), Ordering::Relaxed);
                    batch.extend(spans);
                    deadline.get_or_insert_with(|| tokio::time::Instant::now() + self.config.flush_interval.0);
                    if batch.len() >= self.config.batch_size {
                        self.export(&exporter, &mut batch).await;
                        deadline = None;
                    }
                }
                Some(Msg::Flush(ack)) => {
                    // Take what is already queued behind the flush too.
                    while let Ok(Msg::Spans(spans)) = rx.try_recv() {
                        self.queued.fetch_sub(spans.len(), Ordering::Relaxed);
                        batch.extend(spans);
                    }
                    self.export(&exporter, &mut batch).await;
                    deadline = None;
                    let _ = ack.send(());
                }
                None => {
                    self.export(&exporter, &mut batch).await;
                    let _ = exporter.shutdown_with_timeout(Duration::from_secs(1));
                    return;
                }
            }
        }
    }

    /// Export `batch` (emptied) in calls of at most `batch_size`.
    async fn export(&self, exporter: &opentelemetry_otlp::SpanExporter, batch: &mut Vec<SpanData>) {
        while !batch.is_empty() {
            let take = batch.len().min(self.config.batch_size);
            let part: Vec<SpanData> = batch.drain(..take).collect();
            let started = Instant::now();
            match tokio::time::timeout(self.config.timeout.0, exporter.export(part)).await {
                Ok(Ok(())) => self.counters.exported.inc_by(take as u64),
                Ok(Err(e)) => {
                    self.counters.dropped_export_failed.inc_by(take as u64);
                    tracing::warn!(spans = take, error = %e, "OpenTelemetry export failed; spans dropped.");
                }
                Err(_) => {
                    self.counters.dropped_export_failed.inc_by(take as u64);
                    tracing::warn!(
                        spans = take,
                        after_ms = started.elapsed().as_millis() as u64,
                        "OpenTelemetry export timed out; spans dropped."
                    );
                }
            }
        }
    }
}

/// The OTLP exporter for `config` (inside the worker's runtime: gRPC's
/// channel and the HTTP client need one).
fn build_exporter(config: &OtelConfig) -> Result<opentelemetry_otlp::SpanExporter, String> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
    let timeout = config.timeout.0;
    let mut exporter = match config.protocol {
        OtelProtocol::HttpProtobuf => {
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_provider_and_native_roots(Arc::new(rustls::crypto::ring::default_provider()))
                .map_err(|e| format!("no system root certificates: {e}"))?
                .https_or_http()
                .enable_http1()
                .build();
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(opentelemetry_http::hyper::HyperClient::new(https, timeout, None))
                .with_endpoint(config.export_url())
                .with_timeout(timeout)
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_headers(config.headers.clone().into_iter().collect())
                .build()
        }
        OtelProtocol::Grpc => {
            let mut headers = http::HeaderMap::new();
            for (name, value) in &config.headers {
                let name = http::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| format!("headers: {name:?} is not a gRPC metadata name"))?;
                let value = http::HeaderValue::from_str(value)
                    .map_err(|_| format!("headers.{name}: not a valid metadata value"))?;
                headers.insert(name, value);
            }
            let metadata = opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(headers);
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(config.export_url())
                .with_timeout(timeout)
                .with_metadata(metadata);
            if config.endpoint.starts_with("https:") {
                builder = builder.with_tls_config(
                    opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new().with_native_roots(),
                );
            }
            builder.build()
        }
    }
    .map_err(|e| e.to_string())?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    exporter.set_resource(&resource);
    Ok(exporter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_sampler_takes_its_share_and_the_ends_are_exact() {
        let ids: Vec<TraceId> = (0..20_000).map(|_| context::new_trace_id()).collect();
        let share = |r| ids.iter().filter(|&&t| Sampler::new(r).by_ratio(t)).count();
        assert_eq!(share(0.0), 0);
        assert_eq!(share(1.0), ids.len());
        let tenth = share(0.1);
        assert!((1_600..2_400).contains(&tenth), "{tenth}");
    }
}
