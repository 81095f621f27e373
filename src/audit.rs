//! The audit-log writer: the request path hands a record to a bounded queue
//! with a non-blocking `try_send`; one thread writes batches in
//! transactions, retries a failed batch, enforces retention, and drains
//! everything on shutdown. A full queue drops the record and counts it — it
//! never waits.

use crate::{
    clock::now_ms,
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

pub mod fields;
pub mod merge;
pub mod refused;

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

/// Headers as a JSON object, credentials replaced by `[redacted]`, within
/// the caps of [`fields`].
pub fn redact_headers(headers: &http::HeaderMap) -> String {
    redact_headers_within(headers, fields::HEADERS_BYTES_MAX)
}

/// [`redact_headers`] with the whole set cut at about `max_bytes`.
pub fn redact_headers_within(headers: &http::HeaderMap, max_bytes: usize) -> String {
    fields::headers_json(headers, &REDACTED_HEADERS, REDACTED, max_bytes)
}

/// Path and query with a `key=` parameter's value redacted, each cut at its
/// cap ([`fields::PATH_MAX`], [`fields::QUERY_MAX`]) and marked if cut.
pub fn redact_path(uri: &http::Uri) -> String {
    let path = fields::cap(uri.path(), fields::PATH_MAX);
    let Some(q) = uri.query() else {
        return path.into_owned();
    };
    // Only the kept part is parsed: a cut `key=` value is still redacted,
    // and what follows the cut is never stored.
    let cut = fields::floor_boundary(q, fields::QUERY_MAX);
    let query: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form_urlencoded::parse(&q.as_bytes()[..cut]).map(|(k, v)| {
            let v = if k == "key" { REDACTED.into() } else { v };
            (k, v)
        }))
        .finish();
    // Re-encoding may lengthen it (at most threefold): cut again.
    let query = fields::cap_owned(query, fields::QUERY_MAX);
    let mut out = format!("{path}?{query}");
    if cut < q.len() {
        fields::mark(&mut out, Some((q.len() - cut) as u64));
    }
    out
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
    /// Rows deleted to keep the database under `audit.max_bytes`.
    pub budget_deleted: AtomicU64,
}

pub struct AuditSink {
    tx: Option<SyncSender<Msg>>,
    stats: Arc<AuditStats>,
    writer: Mutex<Option<JoinHandle<()>>>,
    refused: refused::RefusalSampler,
}

impl AuditSink {
    /// A sink that records nothing (audit disabled).
    pub fn disabled() -> Self {
        AuditSink {
            tx: None,
            stats: Arc::new(AuditStats::default()),
            writer: Mutex::new(None),
            refused: refused::RefusalSampler::new(crate::config::RefusedMode::default()),
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
            max_bytes: cfg.max_bytes.0,
        };
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| store::StoreError::Invalid(format!("cannot start the audit writer: {e}")))?;
        Ok(AuditSink {
            tx: Some(tx),
            stats,
            writer: Mutex::new(Some(handle)),
            refused: refused::RefusalSampler::new(cfg.refused),
        })
    }

    /// Whether a request refused before a route or key (see
    /// [`refused`]) from `client` gets its audit row and log line now.
    pub fn keep_refused(&self, client: Option<std::net::IpAddr>) -> bool {
        self.refused.keep(client, (now_ms() / 1000) as u64)
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
    /// `audit.max_bytes`; 0 = no budget.
    max_bytes: u64,
}

/// How often the writer wakes to write what has queued up.
const BATCH_WINDOW: Duration = Duration::from_millis(50);
/// Most expired rows deleted in one transaction.
const PURGE_BATCH: usize = 5_000;

/// How often old rows are purged.
const RETENTION_EVERY: Duration = Duration::from_secs(600);
/// Most delete batches per budget check, so the writer gets back to
/// writing; a larger excess is worked off over the next checks.
const BUDGET_BATCHES: usize = 20;
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
                            self.flush_within_budget(&mut pending, false);
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
            self.flush_within_budget(&mut pending, stopping);
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

    /// [`Self::flush`], then the size budget. It is checked after every
    /// write (two PRAGMA reads of the database header: cheap), so the file
    /// outgrows it by one batch at most.
    fn flush_within_budget(&mut self, pending: &mut Vec<AuditRecord>, final_flush: bool) {
        if self.flush(pending, final_flush) && self.max_bytes > 0 {
            self.enforce_budget();
        }
    }

    /// Write what is pending; whether any row was written.
    fn flush(&mut self, pending: &mut Vec<AuditRecord>, final_flush: bool) -> bool {
        let attempts = if final_flush { 20 } else { 1 };
        for attempt in 0..attempts {
            if pending.is_empty() {
                return false;
            }
            match store::audit::insert_batch(&mut self.conn, pending) {
                Ok(()) => {
                    self.stats.written.fetch_add(pending.len() as u64, Ordering::Relaxed);
                    pending.clear();
                    return true;
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
        false
    }

    /// Keep the database under `max_bytes` of used pages: delete the oldest
    /// audit rows, a bounded batch at a time, until it is under 90 % of the
    /// budget (so it is not at the edge again with the next batch). Deleted
    /// pages go to SQLite's free list and are reused by the next inserts,
    /// so the file stops growing at about the budget.
    fn enforce_budget(&self) {
        let target = self.max_bytes / 10 * 9;
        let mut deleted = 0u64;
        for _ in 0..BUDGET_BATCHES {
            let step = store::audit::used_bytes(&self.conn).and_then(|used| {
                if used <= target || (deleted == 0 && used <= self.max_bytes) {
                    return Ok(None);
                }
                let rows = store::audit::rows_estimate(&self.conn)?;
                if rows == 0 {
                    return Ok(None);
                }
                // As many rows as the excess holds at the average row size.
                let per_row = (used / rows).max(1);
                let n = ((used - target) / per_row + 1).min(PURGE_BATCH as u64);
                store::audit::delete_oldest(&self.conn, n as usize).map(Some)
            });
            match step {
                Ok(Some(n)) if n > 0 => deleted += n as u64,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "Audit size budget could not be enforced.");
                    break;
                }
            }
        }
        if deleted > 0 {
            self.stats.budget_deleted.fetch_add(deleted, Ordering::Relaxed);
            tracing::info!(
                rows = deleted,
                max_bytes = self.max_bytes,
                "Audit size budget: deleted the oldest rows."
            );
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
    fn the_size_budget_deletes_the_oldest_rows() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.db");
        let cfg = AuditConfig {
            batch_size: 100,
            max_bytes: crate::config::HumanSize(512 * 1024),
            ..AuditConfig::default()
        };
        let sink = AuditSink::start(&db, &cfg).unwrap();
        for i in 0..2000 {
            assert!(sink.record(AuditRecord {
                request_id: format!("r{i}"),
                ts_ms: now_ms(),
                request_body: Some("b".repeat(1000)),
                ..Default::default()
            }));
        }
        sink.close();
        let conn = store::open(&db).unwrap();
        let used = store::audit::used_bytes(&conn).unwrap();
        assert!(used <= 512 * 1024, "{used} bytes used");
        let rows = store::audit::all(&conn).unwrap();
        assert!(!rows.is_empty() && rows.len() < 500, "{} rows kept", rows.len());
        assert_eq!(rows.last().unwrap().request_id, "r1999", "the newest are kept");
        assert_eq!(
            sink.stats().budget_deleted.load(Ordering::Relaxed) as usize,
            2000 - rows.len()
        );
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
