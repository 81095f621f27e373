//! The audit-log writer: the request path hands a record to a bounded queue
//! with a non-blocking `try_send`; one thread writes batches in
//! transactions, retries a failed batch, enforces retention, and drains
//! everything on shutdown. A full queue drops the record and counts it — it
//! never waits.

use crate::{
    config::AuditConfig,
    store::{self, audit::AuditRecord},
};
use parking_lot::Mutex;
use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Headers whose values never reach the audit log.
pub const REDACTED_HEADERS: [&str; 7] = [
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "x-goog-api-key",
    "cookie",
    "set-cookie",
    "anthropic-api-key",
];
const REDACTED: &str = "[redacted]";

/// Headers as a JSON object, credentials replaced by `[redacted]`.
pub fn redact_headers(headers: &http::HeaderMap) -> String {
    // Runs once per request: written straight into one buffer, values
    // escaped by serde_json without a `Value` or a string per header.
    let mut out = Vec::with_capacity(48 * headers.len().max(1));
    out.push(b'{');
    for (i, (k, v)) in headers.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // Header names are lower-case tokens: nothing to escape.
        out.push(b'"');
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b"\":");
        let bytes = v.as_bytes();
        if REDACTED_HEADERS.contains(&k.as_str()) {
            out.push(b'"');
            out.extend_from_slice(REDACTED.as_bytes());
            out.push(b'"');
        } else if bytes
            .iter()
            .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
        {
            // The usual value: printable ASCII with nothing to escape.
            out.push(b'"');
            out.extend_from_slice(bytes);
            out.push(b'"');
        } else {
            // Serializing a string into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut out, String::from_utf8_lossy(bytes).as_ref());
        }
    }
    out.push(b'}');
    String::from_utf8(out).unwrap_or_default()
}

/// Path and query with a `key=` parameter's value redacted.
pub fn redact_path(uri: &http::Uri) -> String {
    let path = uri.path();
    match uri.query() {
        None => path.to_string(),
        Some(q) => {
            let query: String = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(form_urlencoded::parse(q.as_bytes()).map(|(k, v)| {
                    let v = if k == "key" { REDACTED.into() } else { v };
                    (k, v)
                }))
                .finish();
            format!("{path}?{query}")
        }
    }
}

/// A body cut at `max` bytes, as (lossy) UTF-8.
pub fn capped_text(body: &[u8], max: usize) -> String {
    String::from_utf8_lossy(&body[..body.len().min(max)]).into_owned()
}

enum Msg {
    Record(Box<AuditRecord>),
    Stop,
}

/// Counters shared with metrics.
#[derive(Debug, Default)]
pub struct AuditStats {
    pub queued: AtomicUsize,
    pub written: AtomicU64,
    pub dropped: AtomicU64,
    pub write_errors: AtomicU64,
}

pub struct AuditSink {
    tx: Option<SyncSender<Msg>>,
    stats: Arc<AuditStats>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl AuditSink {
    /// A sink that records nothing (audit disabled).
    pub fn disabled() -> Self {
        AuditSink {
            tx: None,
            stats: Arc::new(AuditStats::default()),
            writer: Mutex::new(None),
        }
    }

    /// Start the writer thread on its own connection to `db`.
    pub fn start(db: &Path, cfg: &AuditConfig) -> Result<Self, store::StoreError> {
        let conn = store::open(db)?;
        let (tx, rx) = sync_channel(cfg.queue_size);
        let stats = Arc::new(AuditStats::default());
        let writer = Writer {
            conn,
            rx,
            stats: stats.clone(),
            batch_size: cfg.batch_size,
            retention: cfg.retention.0,
        };
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| store::StoreError::Invalid(format!("cannot start the audit writer: {e}")))?;
        Ok(AuditSink {
            tx: Some(tx),
            stats,
            writer: Mutex::new(Some(handle)),
        })
    }

    pub fn stats(&self) -> &Arc<AuditStats> {
        &self.stats
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queue a record; never blocks. Returns false if it was dropped.
    pub fn record(&self, record: AuditRecord) -> bool {
        let Some(tx) = &self.tx else { return false };
        match tx.try_send(Msg::Record(Box::new(record))) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Write everything queued so far and stop the writer. Blocking: call at shutdown.
    pub fn close(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Stop);
        }
        if let Some(handle) = self.writer.lock().take() {
            let _ = handle.join();
        }
    }
}

struct Writer {
    conn: rusqlite::Connection,
    rx: Receiver<Msg>,
    stats: Arc<AuditStats>,
    batch_size: usize,
    retention: Duration,
}

/// How often the writer wakes to write what has queued up.
const BATCH_WINDOW: Duration = Duration::from_millis(50);
/// Most expired rows deleted in one transaction.
const PURGE_BATCH: usize = 5_000;

/// How often old rows are purged.
const RETENTION_EVERY: Duration = Duration::from_secs(600);
/// A batch that failed to write is kept (and retried) up to this many rows.
const MAX_PENDING_FACTOR: usize = 20;

impl Writer {
    fn run(mut self) {
        let mut pending: Vec<AuditRecord> = Vec::with_capacity(self.batch_size);
        let mut last_purge = Instant::now() - RETENTION_EVERY;
        let mut drops = DropReport::default();
        let mut stopping = false;
        while !stopping {
            drops.check(&self.stats);
            // Sleep rather than block on the channel: a blocked receiver
            // would make every request's `try_send` a futex wake-up.
            std::thread::sleep(BATCH_WINDOW);
            loop {
                match self.rx.try_recv() {
                    Ok(Msg::Record(r)) => {
                        self.take(&mut pending, *r);
                        if pending.len() >= self.batch_size {
                            self.flush(&mut pending, false);
                        }
                    }
                    Ok(Msg::Stop) | Err(TryRecvError::Disconnected) => {
                        stopping = true;
                        // Records sent before Stop are already queued ahead of it.
                    }
                    Err(TryRecvError::Empty) => break,
                }
                if stopping {
                    // Drain whatever else is queued, then stop.
                    while let Ok(Msg::Record(r)) = self.rx.try_recv() {
                        self.take(&mut pending, *r);
                    }
                    break;
                }
            }
            self.flush(&mut pending, stopping);
            if last_purge.elapsed() >= RETENTION_EVERY {
                // A backlog is deleted a bounded batch per writer cycle, so
                // neither the writer nor other connections wait long on it.
                let backlog = self.purge();
                last_purge = if backlog {
                    Instant::now() - RETENTION_EVERY
                } else {
                    Instant::now()
                };
            }
        }
    }

    fn take(&self, pending: &mut Vec<AuditRecord>, r: AuditRecord) {
        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
        if pending.len() >= self.batch_size * MAX_PENDING_FACTOR {
            // The database has been failing for a while: shed the oldest.
            pending.remove(0);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        pending.push(r);
    }

    fn flush(&mut self, pending: &mut Vec<AuditRecord>, final_flush: bool) {
        let attempts = if final_flush { 20 } else { 1 };
        for attempt in 0..attempts {
            if pending.is_empty() {
                return;
            }
            match store::audit::insert_batch(&mut self.conn, pending) {
                Ok(()) => {
                    self.stats.written.fetch_add(pending.len() as u64, Ordering::Relaxed);
                    pending.clear();
                    return;
                }
                Err(e) => {
                    self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(rows = pending.len(), error = %e, attempt, "Audit batch not written yet; will retry.");
                    if final_flush {
                        std::thread::sleep(Duration::from_millis(250));
                    }
                }
            }
        }
        if final_flush && !pending.is_empty() {
            tracing::error!(
                rows = pending.len(),
                "Audit rows lost at shutdown: the database kept failing."
            );
            self.stats.dropped.fetch_add(pending.len() as u64, Ordering::Relaxed);
        }
    }

    /// Delete one batch of expired rows; whether more may be left.
    fn purge(&self) -> bool {
        let cutoff = now_ms() - self.retention.as_millis() as i64;
        match store::audit::delete_before(&self.conn, cutoff, PURGE_BATCH) {
            Ok(0) => false,
            Ok(n) => {
                tracing::info!(rows = n, "Audit retention: deleted old rows.");
                n == PURGE_BATCH
            }
            Err(e) => {
                tracing::warn!(error = %e, "Audit retention failed.");
                false
            }
        }
    }
}

/// How often, at most, dropped audit records are reported in the log.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(10);

/// Reports dropped records once per interval (never once per record: a
/// full queue under load would flood the log).
#[derive(Default)]
struct DropReport {
    reported: u64,
    last: Option<Instant>,
}

impl DropReport {
    fn check(&mut self, stats: &AuditStats) {
        let dropped = stats.dropped.load(Ordering::Relaxed);
        if dropped == self.reported || self.last.is_some_and(|t| t.elapsed() < DROP_REPORT_EVERY) {
            return;
        }
        tracing::warn!(
            dropped = dropped - self.reported,
            dropped_total = dropped,
            "Audit records dropped (queue full or database failing); raise audit.queue_size or check the database."
        );
        self.reported = dropped;
        self.last = Some(Instant::now());
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction() {
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "Bearer fg_secret".parse().unwrap());
        h.insert("x-goog-api-key", "g-secret".parse().unwrap());
        h.insert("user-agent", "sdk/1".parse().unwrap());
        h.insert("x-quoted", http::HeaderValue::from_bytes(b"a \"b\" \\ \xff").unwrap());
        let json = redact_headers(&h);
        assert!(!json.contains("secret"), "{json}");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["user-agent"], "sdk/1");
        assert_eq!(v["authorization"], "[redacted]");
        assert_eq!(
            v["x-quoted"], "a \"b\" \\ \u{fffd}",
            "escaped, and lossy for non-UTF-8: {json}"
        );
        let uri: http::Uri = "/v1beta/models/m:generateContent?alt=sse&key=fg_secret"
            .parse()
            .unwrap();
        assert_eq!(
            redact_path(&uri),
            "/v1beta/models/m:generateContent?alt=sse&key=%5Bredacted%5D"
        );
    }

    #[test]
    fn writer_flushes_everything_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.db");
        let cfg = AuditConfig {
            batch_size: 7,
            ..AuditConfig::default()
        };
        let sink = AuditSink::start(&db, &cfg).unwrap();
        for i in 0..100 {
            assert!(sink.record(AuditRecord {
                request_id: format!("r{i}"),
                ts_ms: now_ms(),
                ..Default::default()
            }));
        }
        sink.close();
        let rows = store::audit::all(&store::open(&db).unwrap()).unwrap();
        assert_eq!(rows.len(), 100);
        assert_eq!(sink.stats().written.load(Ordering::Relaxed), 100);
        assert_eq!(sink.stats().queued.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_full_queue_drops_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.db");
        // Hold a write lock so the writer stalls on its first batch.
        let blocker = store::open(&db).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let cfg = AuditConfig {
            queue_size: 4,
            batch_size: 1,
            ..AuditConfig::default()
        };
        let sink = AuditSink::start(&db, &cfg).unwrap();
        let started = Instant::now();
        let accepted = (0..1000)
            .filter(|i| {
                sink.record(AuditRecord {
                    request_id: format!("r{i}"),
                    ts_ms: now_ms(),
                    ..Default::default()
                })
            })
            .count();
        assert!(started.elapsed() < Duration::from_millis(200), "record() waited");
        assert!(accepted < 1000);
        assert_eq!(sink.stats().dropped.load(Ordering::Relaxed) as usize, 1000 - accepted);
        blocker.execute_batch("COMMIT").unwrap();
        sink.close();
        let rows = store::audit::all(&store::open(&db).unwrap()).unwrap();
        assert_eq!(
            rows.len(),
            accepted,
            "every accepted record is written once the lock is gone"
        );
    }
}
