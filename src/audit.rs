//! The audit log: the request path encodes its record once and hands it to
//! a bounded queue with a non-blocking `try_send`; the writer thread appends
//! the records to segment files ([`segment`]), and the indexer thread loads
//! them into SQLite for the admin queries ([`indexer`]), enforcing retention
//! and the size budget. A full queue drops the record and counts it — it
//! never waits; a failing database only delays the indexer.

use crate::{
    clock::now_ms,
    config::AuditConfig,
    store::{self, audit::AuditRecord},
};
use entry::AuditEntry;
use indexer::{Indexer, OwnStreams};
use parking_lot::Mutex;
use segment::{SegmentRoot, SegmentWriter};
use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

pub mod captured;
pub mod entry;
pub mod fields;
pub mod indexer;
pub mod merge;
pub mod refused;
pub mod segment;

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
            let v = if names_a_key(&k) || contains_ignore_case(&v, "key=") {
                REDACTED.into()
            } else {
                v
            };
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

/// A query parameter named `key`, also as the last `;`-separated part
/// (`a;key=…`): some servers split on `;` too.
fn names_a_key(name: &str) -> bool {
    let last = name.rsplit(';').next().unwrap_or(name);
    last.eq_ignore_ascii_case("key")
}

/// A value holding `key=` (`a=1;key=…`), whatever its case, is redacted
/// whole: erring towards hiding.
fn contains_ignore_case(hay: &str, needle: &str) -> bool {
    hay.as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

enum Msg {
    /// One record, encoded ([`entry::AuditEntry::encode`]).
    Record(Vec<u8>),
    Stop,
}

/// Counters shared with metrics.
#[derive(Debug, Default)]
pub struct AuditStats {
    pub queued: AtomicUsize,
    /// Rows indexed into the database.
    pub written: AtomicU64,
    pub dropped: AtomicU64,
    pub write_errors: AtomicU64,
    /// Rows deleted to keep the database under `audit.max_bytes`.
    pub budget_deleted: AtomicU64,
    /// Bytes in segment files (written, and not yet indexed or deleted).
    pub segment_bytes: AtomicU64,
    /// Records found damaged in a segment (after a machine crash) and skipped.
    pub damaged: AtomicU64,
    /// Bytes of indexed segments kept for their captured headers and bodies.
    pub captured_bytes: AtomicU64,
}

pub struct AuditSink {
    tx: Option<SyncSender<Msg>>,
    stats: Arc<AuditStats>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    indexer_stop: Arc<AtomicBool>,
    refused: refused::RefusalSampler,
}

impl AuditSink {
    /// A sink that records nothing (audit disabled).
    pub fn disabled() -> Self {
        AuditSink {
            tx: None,
            stats: Arc::new(AuditStats::default()),
            threads: Mutex::new(Vec::new()),
            indexer_stop: Arc::new(AtomicBool::new(false)),
            refused: refused::RefusalSampler::new(crate::config::RefusedMode::default()),
        }
    }

    /// Start the writer thread on the segment files beside `db`, and the
    /// indexer on its own connection to `db`. Segments a crash left are
    /// indexed first.
    pub fn start(db: &Path, cfg: &AuditConfig) -> Result<Self, store::StoreError> {
        let conn = store::open(db)?;
        let root = SegmentRoot::for_database(db);
        let invalid = |what: &str, e: std::io::Error| {
            store::StoreError::Invalid(format!("{what} {}: {e}", root.path().display()))
        };
        let (stream, lock) = root
            .new_stream()
            .map_err(|e| invalid("cannot create the audit segments in", e))?;
        let segments = SegmentWriter::create(stream.clone(), segment_bytes(cfg), SEGMENT_AGE, cfg.fsync)
            .map_err(|e| invalid("cannot open the audit segments in", e))?;
        let own: OwnStreams = Arc::new(Mutex::new(vec![(stream, lock)]));
        let (tx, rx) = sync_channel(cfg.queue_size);
        let stats = Arc::new(AuditStats::default());
        stats
            .segment_bytes
            .store(root.total_bytes().map_or(0, |(b, _)| b), Ordering::Relaxed);
        let writer = Writer {
            segment_bytes: segment_bytes(cfg),
            segments,
            root: root.clone(),
            own: own.clone(),
            fsync: cfg.fsync,
            rx,
            stats: stats.clone(),
        };
        let indexer_stop = Arc::new(AtomicBool::new(false));
        let mut indexer = Indexer {
            conn,
            root,
            captured: captured::CapturedStore::for_database(db),
            keep_captured: cfg.capture_headers || cfg.capture_body,
            captured_bytes: 0,
            own,
            cursors: Default::default(),
            warned: Default::default(),
            frame_bytes: 1024,
            with_texts: Default::default(),
            stats: stats.clone(),
            batch_size: cfg.batch_size.max(1),
            retention: cfg.retention.0,
            max_bytes: cfg.max_bytes.0,
            stop: indexer_stop.clone(),
        };
        indexer.measure_captured();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| store::StoreError::Invalid(format!("cannot start the {name}: {e}")))
        };
        let threads = vec![
            spawn("audit-writer", Box::new(move || writer.run()))?,
            spawn("audit-indexer", Box::new(move || indexer.run()))?,
        ];
        Ok(AuditSink {
            tx: Some(tx),
            stats,
            threads: Mutex::new(threads),
            indexer_stop,
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
        self.record_entry(&AuditEntry::from(&record))
    }

    /// Queue a record the request path borrows; it is encoded here, once.
    pub fn record_entry(&self, entry: &AuditEntry<'_>) -> bool {
        let Some(tx) = &self.tx else { return false };
        match tx.try_send(Msg::Record(entry.encode())) {
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

    /// Write everything queued so far to the segments, index them, and stop
    /// both threads. Blocking: call at shutdown.
    pub fn close(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Stop);
        }
        let mut threads = std::mem::take(&mut *self.threads.lock()).into_iter();
        // The writer first: the indexer stops once it has what was written.
        if let Some(writer) = threads.next() {
            let _ = writer.join();
        }
        self.indexer_stop.store(true, Ordering::Release);
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Appends queued records to the segment files.
struct Writer {
    segment_bytes: u64,
    segments: SegmentWriter,
    root: SegmentRoot,
    /// Shared with the indexer: a new stream goes here.
    own: OwnStreams,
    fsync: crate::config::AuditFsync,
    rx: Receiver<Msg>,
    stats: Arc<AuditStats>,
}

/// How often the writer wakes to write what has queued up. A SIGKILL loses
/// what is queued and not yet written: at most this long of records.
const WRITE_WINDOW: Duration = Duration::from_millis(20);
/// A segment is closed (and can be deleted once indexed) past this size or age.
const SEGMENT_BYTES: u64 = 32 << 20;

/// The size at which segments are closed: [`SEGMENT_BYTES`], or a 16th of
/// `audit.max_bytes` (at least 1 MiB) when that is less, so the segment
/// being written (outside the budget until it is read) stays small beside
/// a small budget.
fn segment_bytes(cfg: &AuditConfig) -> u64 {
    match cfg.max_bytes.0 {
        0 => SEGMENT_BYTES,
        budget => (budget / 16).clamp(1 << 20, SEGMENT_BYTES),
    }
}
const SEGMENT_AGE: Duration = Duration::from_secs(600);
/// Most bytes waiting in segments for the indexer (a database that fails
/// for long); past it new records are dropped and counted, so the disk
/// does not fill.
const BACKLOG_MAX: u64 = 1 << 30;
/// How often the writer measures the backlog.
const BACKLOG_EVERY: Duration = Duration::from_secs(1);
/// Most records the writer takes from the queue between two looks at the
/// clock (and the backlog).
const DRAIN_MAX: usize = 16_384;

impl Writer {
    fn run(mut self) {
        let mut drops = DropReport::default();
        let mut backlog_checked = Instant::now();
        let mut over_backlog = false;
        let mut unmeasured = 0;
        let mut stopping = false;
        // The last drain stopped at DRAIN_MAX with records left: no sleep.
        let mut busy = false;
        while !stopping {
            drops.check(&self.stats);
            // Sleep rather than block on the channel: a blocked receiver
            // would make every request's `try_send` a futex wake-up.
            if !busy {
                std::thread::sleep(WRITE_WINDOW);
            }
            if backlog_checked.elapsed() >= BACKLOG_EVERY {
                backlog_checked = Instant::now();
                self.check_stream();
                let bytes = match self.root.total_bytes() {
                    Ok((bytes, unreadable)) => {
                        if unreadable > unmeasured {
                            tracing::warn!(
                                unreadable,
                                "Audit segment streams cannot be measured; the backlog cap counts only the others."
                            );
                        }
                        unmeasured = unreadable;
                        bytes
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "Audit segments cannot be measured.");
                        self.stats.segment_bytes.load(Ordering::Relaxed)
                    }
                };
                self.stats.segment_bytes.store(bytes, Ordering::Relaxed);
                let over = bytes > BACKLOG_MAX;
                if over && !over_backlog {
                    tracing::error!(
                        bytes,
                        "Audit segments waiting to be indexed passed 1 GiB (the database failing, or a load the indexer cannot keep up with); new audit records are dropped until they are fewer."
                    );
                }
                over_backlog = over;
            }
            // Bounded, so a queue that never empties (full load) still
            // lets the backlog be measured and capped every second.
            busy = true;
            for _ in 0..DRAIN_MAX {
                match self.rx.try_recv() {
                    Ok(Msg::Record(r)) => self.take(&r, over_backlog),
                    Ok(Msg::Stop) | Err(TryRecvError::Disconnected) => {
                        // Records sent before Stop are already queued ahead
                        // of it; drain whatever else is there, then stop.
                        stopping = true;
                        while let Ok(Msg::Record(r)) = self.rx.try_recv() {
                            self.take(&r, over_backlog);
                        }
                        break;
                    }
                    Err(TryRecvError::Empty) => {
                        busy = false;
                        break;
                    }
                }
            }
            self.flush();
        }
    }

    /// Write what was pushed; the records a failed write loses are counted.
    fn flush(&mut self) {
        if let Err((lost, e)) = self.segments.flush() {
            self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            self.stats.dropped.fetch_add(lost as u64, Ordering::Relaxed);
            tracing::error!(records = lost, error = %e, "Audit records could not be written to their segment.");
        }
    }

    /// If the stream's directory was removed under the writer (what it
    /// writes would go nowhere), start a new stream.
    fn check_stream(&mut self) {
        if !self.segments.detached() {
            return;
        }
        tracing::error!(
            dir = %self.segments.stream().path().display(),
            "The audit segment file was removed while in use; records written to it and not yet indexed are lost. Starting a new one."
        );
        let made = self.root.new_stream().and_then(|(stream, lock)| {
            let w = SegmentWriter::create(stream.clone(), self.segment_bytes, SEGMENT_AGE, self.fsync)?;
            Ok((w, stream, lock))
        });
        match made {
            Ok((w, stream, lock)) => {
                self.segments = w;
                self.own.lock().push((stream, lock));
            }
            Err(e) => tracing::error!(error = %e, "A new audit segment stream cannot be made; retrying."),
        }
    }

    fn take(&mut self, record: &[u8], over_backlog: bool) {
        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
        if over_backlog || record.len() > segment::PAYLOAD_MAX {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.segments.push(record);
        if self.segments.pending() >= 4096 {
            // A burst: write it out rather than buffer without bound.
            self.flush();
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
        let uri: http::Uri = "/v1/x?Key=fg_secret&KEY=fg_secret2".parse().unwrap();
        assert!(!redact_path(&uri).contains("secret"), "{}", redact_path(&uri));
        // `;` as a separator, as some servers read it.
        for q in [
            "a=1;key=fg_secret",
            "a=1;KEY=fg_secret&b=2",
            "x;key=fg_secret",
            "a=1%3Bkey%3Dfg_secret",
        ] {
            let uri: http::Uri = format!("/v1/x?{q}").parse().unwrap();
            assert!(!redact_path(&uri).contains("secret"), "{q}: {}", redact_path(&uri));
        }
        let uri: http::Uri = "/v1/x?alt=sse&monkey=1".parse().unwrap();
        assert_eq!(redact_path(&uri), "/v1/x?alt=sse&monkey=1", "other names are kept");
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
        let rows = captured::CapturedStore::for_database(&db)
            .all(&store::open(&db).unwrap())
            .unwrap();
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
            max_bytes: crate::config::HumanSize(256 * 1024),
            ..AuditConfig::default()
        };
        let sink = AuditSink::start(&db, &cfg).unwrap();
        for i in 0..4000 {
            assert!(sink.record(AuditRecord {
                request_id: format!("r{i}"),
                ts_ms: now_ms(),
                path: "/v1/chat/completions".repeat(10),
                ..Default::default()
            }));
        }
        sink.close();
        let conn = store::open(&db).unwrap();
        let used = store::audit::used_bytes(&conn).unwrap();
        assert!(used <= 256 * 1024, "{used} bytes used");
        let rows = captured::CapturedStore::for_database(&db).all(&conn).unwrap();
        assert!(!rows.is_empty() && rows.len() < 2000, "{} rows kept", rows.len());
        assert_eq!(rows.last().unwrap().request_id, "r3999", "the newest are kept");
        assert_eq!(
            sink.stats().budget_deleted.load(Ordering::Relaxed) as usize,
            4000 - rows.len()
        );
    }

    /// Captured texts count against the budget too, in their segments; the
    /// oldest go first, rows and their texts together, so every row left
    /// keeps its texts (deleting texts first left the newest rows bare).
    #[test]
    fn the_size_budget_deletes_rows_with_their_captured_texts() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.db");
        let budget = 4 << 20;
        let cfg = AuditConfig {
            batch_size: 100,
            max_bytes: crate::config::HumanSize(budget),
            ..AuditConfig::default()
        };
        let sink = AuditSink::start(&db, &cfg).unwrap();
        for i in 0..12_000 {
            assert!(sink.record(AuditRecord {
                request_id: format!("r{i}"),
                ts_ms: now_ms(),
                path: "/v1/chat/completions".repeat(8),
                request_body: Some(format!("{i:>600}")),
                ..Default::default()
            }));
            if i % 1000 == 999 {
                // Spread over a few writer windows, as requests are.
                std::thread::sleep(Duration::from_millis(30));
            }
        }
        sink.close();
        let store = captured::CapturedStore::for_database(&db);
        let conn = store::open(&db).unwrap();
        let kept: u64 = store.files().unwrap().iter().map(|f| f.len).sum();
        let used = store::audit::used_bytes(&conn).unwrap();
        assert!(used + kept <= budget, "{used} + {kept} bytes used");
        assert_eq!(sink.stats().captured_bytes.load(Ordering::Relaxed), kept);
        let rows = store.all(&conn).unwrap();
        assert!(rows.len() > 1000 && rows.len() < 12_000, "{} rows kept", rows.len());
        assert_eq!(rows.last().unwrap().request_id, "r11999", "the newest are kept");
        let bare: Vec<&str> = rows
            .iter()
            .filter(|r| r.request_body.is_none())
            .map(|r| r.request_id.as_str())
            .collect();
        assert!(
            bare.is_empty(),
            "{} rows lost their texts: {:?}…",
            bare.len(),
            &bare[..bare.len().min(5)]
        );
        let i: usize = rows.last().unwrap().request_id[1..].parse().unwrap();
        assert_eq!(rows.last().unwrap().request_body, Some(format!("{i:>600}")));
        assert_eq!(
            sink.stats().budget_deleted.load(Ordering::Relaxed) as usize,
            12_000 - rows.len()
        );
    }

    /// Captured texts stay in the segment files, read back by offset: the
    /// row holds only where they are, and rows of other kinds none.
    #[test]
    fn captured_texts_stay_in_the_segments() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.db");
        let sink = AuditSink::start(&db, &AuditConfig::default()).unwrap();
        for i in 0..300 {
            let texts = i % 3 != 0;
            assert!(sink.record(AuditRecord {
                request_id: format!("r{i}"),
                ts_ms: now_ms(),
                request_headers: texts.then(|| format!("{{\"x-n\":\"{i}\"}}")),
                response_body: (texts && i % 2 == 0).then(|| "é".repeat(i)),
                ..Default::default()
            }));
        }
        sink.close();
        let conn = store::open(&db).unwrap();
        let in_rows: i64 = conn
            .query_row(
                "SELECT count(*) FROM audit_log WHERE request_headers IS NOT NULL OR response_body IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(in_rows, 0, "no captured text in a row");
        let refs: i64 = conn
            .query_row(
                "SELECT count(*) FROM audit_log WHERE captured_in IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(refs, 200, "only rows with texts point to a segment");
        let store = captured::CapturedStore::for_database(&db);
        assert!(!store.files().unwrap().is_empty(), "the read segment was kept");
        // Captured prompts are this user's only.
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(SegmentRoot::for_database(&db).path()), 0o700);
        for f in store.files().unwrap() {
            assert_eq!(mode(&f.path), 0o600, "{}", f.path.display());
            assert_eq!(mode(f.path.parent().unwrap()), 0o700);
        }
        for (i, r) in store.all(&conn).unwrap().iter().enumerate() {
            let texts = i % 3 != 0;
            assert_eq!(r.request_id, format!("r{i}"));
            assert_eq!(r.request_headers, texts.then(|| format!("{{\"x-n\":\"{i}\"}}")));
            assert_eq!(r.response_body, (texts && i % 2 == 0).then(|| "é".repeat(i)));
        }
        // One row, and a page, read the same texts.
        let id: i64 = conn
            .query_row("SELECT id FROM audit_log WHERE request_id = 'r298'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            store.get(&conn, id).unwrap().record.response_body,
            Some("é".repeat(298))
        );
        let (page, _) = store.query(&conn, &store::audit::LogFilter::default()).unwrap();
        assert_eq!(page[1].record.response_body, Some("é".repeat(298)));
        // A reference edited to point elsewhere, or at another record,
        // reads nothing.
        for bad in ["../../etc/1", "nostream/1"] {
            conn.execute(
                "UPDATE audit_log SET captured_in = ?1 WHERE id = ?2",
                rusqlite::params![bad, id],
            )
            .unwrap();
            assert_eq!(store.get(&conn, id).unwrap().record.response_body, None, "{bad}");
        }
        conn.execute(
            "UPDATE audit_log SET captured_in = (SELECT captured_in FROM audit_log WHERE request_id = 'r1'),
                captured_at = (SELECT captured_at FROM audit_log WHERE request_id = 'r1') WHERE id = ?1",
            [id],
        )
        .unwrap();
        assert_eq!(
            store.get(&conn, id).unwrap().record.request_headers,
            None,
            "r1's texts are not r298's"
        );
    }

    /// Retention deletes kept segments wholly past it; with nothing
    /// captured, read segments are deleted at once.
    #[test]
    fn retention_deletes_kept_segments_and_uncaptured_ones_are_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.db");
        let store = captured::CapturedStore::for_database(&db);
        let record = |i: usize| AuditRecord {
            request_id: format!("r{i}"),
            ts_ms: now_ms(),
            request_headers: Some("{}".into()),
            ..Default::default()
        };
        let sink = AuditSink::start(&db, &AuditConfig::default()).unwrap();
        (0..10).for_each(|i| assert!(sink.record(record(i))));
        sink.close();
        let files = store.files().unwrap();
        assert_eq!(files.len(), 1);
        // Last written two days ago: past a day's retention.
        let old = std::time::SystemTime::now() - Duration::from_secs(2 * 86_400);
        std::fs::File::options()
            .write(true)
            .open(&files[0].path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let cfg = AuditConfig {
            retention: Duration::from_secs(86_400).into(),
            capture_headers: false,
            ..AuditConfig::default()
        };
        let sink = AuditSink::start(&db, &cfg).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.files().unwrap().len() == 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        (10..20).for_each(|i| assert!(sink.record(record(i))));
        sink.close();
        assert!(
            store.files().unwrap().is_empty(),
            "expired and uncaptured segments are gone"
        );
        let rows = store.all(&store::open(&db).unwrap()).unwrap();
        assert_eq!(rows.len(), 20);
        assert!(rows[..10].iter().all(|r| r.request_headers.is_none()), "expired texts");
        // Texts reaching an indexer that keeps no segments stay in the row.
        assert!(rows[10..].iter().all(|r| r.request_headers.as_deref() == Some("{}")));
    }

    #[test]
    fn a_full_queue_drops_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.db");
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
        sink.close();
        let rows = captured::CapturedStore::for_database(&db)
            .all(&store::open(&db).unwrap())
            .unwrap();
        assert_eq!(rows.len(), accepted, "every accepted record is written");
    }

    fn rows_of(db: &Path) -> Vec<String> {
        captured::CapturedStore::for_database(db)
            .all(&store::open(db).unwrap())
            .unwrap()
            .into_iter()
            .map(|r| r.request_id)
            .collect()
    }

    /// A locked database delays the index; nothing is dropped, and the
    /// rows arrive once the lock is gone.
    #[test]
    fn a_locked_database_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.db");
        let blocker = store::open(&db).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let sink = AuditSink::start(&db, &AuditConfig::default()).unwrap();
        for i in 0..300 {
            assert!(sink.record(AuditRecord {
                request_id: format!("r{i}"),
                ts_ms: now_ms(),
                ..Default::default()
            }));
        }
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(sink.stats().written.load(Ordering::Relaxed), 0);
        assert!(
            SegmentRoot::for_database(&db).total_bytes().unwrap().0 > 0,
            "the rows wait in a segment"
        );
        blocker.execute_batch("COMMIT").unwrap();
        sink.close();
        let ids = rows_of(&db);
        assert_eq!(ids, (0..300).map(|i| format!("r{i}")).collect::<Vec<_>>());
        assert_eq!(sink.stats().dropped.load(Ordering::Relaxed), 0);
    }

    /// Records a crash left in segments are indexed at the next start, once:
    /// the cursor moves in the same transaction as the rows.
    #[test]
    fn segments_left_by_a_crash_are_indexed_once_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.db");
        let rec = |id: String| AuditRecord {
            request_id: id,
            ts_ms: now_ms(),
            ..Default::default()
        };
        let sink = AuditSink::start(&db, &AuditConfig::default()).unwrap();
        for i in 0..5 {
            assert!(sink.record(rec(format!("a{i}"))));
        }
        sink.close();
        // What a killed process leaves: a stream whose lock nobody holds,
        // frames written and never indexed, half a frame at the end.
        let root = SegmentRoot::for_database(&db);
        let (stream, lock) = root.new_stream().unwrap();
        let mut w = SegmentWriter::create(stream.clone(), 1 << 20, SEGMENT_AGE, Default::default()).unwrap();
        for i in 0..7 {
            w.push(&AuditEntry::from(&rec(format!("b{i}"))).encode());
        }
        w.flush().unwrap();
        let newest = stream.list().unwrap().last().unwrap().0;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(stream.file(newest))
            .unwrap();
        std::io::Write::write_all(&mut f, &[9, 0, 0]).unwrap();
        drop((w, lock));
        for torn in [1, 0] {
            let sink = AuditSink::start(&db, &AuditConfig::default()).unwrap();
            sink.close();
            assert_eq!(
                sink.stats().damaged.load(Ordering::Relaxed),
                torn,
                "the torn tail, counted once"
            );
        }
        let ids = rows_of(&db);
        let want: Vec<String> = (0..5)
            .map(|i| format!("a{i}"))
            .chain((0..7).map(|i| format!("b{i}")))
            .collect();
        assert_eq!(ids, want);
        // Every stream is indexed and gone, and so are their places.
        assert!(root.streams().unwrap().is_empty(), "{:?}", root.streams());
        let places: i64 = store::open(&db)
            .unwrap()
            .query_row(
                "SELECT count(*) FROM settings WHERE name LIKE 'audit_segment_cursor%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(places, 0);
    }

    /// Two processes on one database (an upgrade's old and new): each
    /// appends to its own stream, neither indexes the other's live one, and
    /// every record arrives once.
    #[test]
    fn two_sinks_on_one_database_keep_every_record_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.db");
        let (a, b) = (
            AuditSink::start(&db, &AuditConfig::default()).unwrap(),
            AuditSink::start(&db, &AuditConfig::default()).unwrap(),
        );
        for i in 0..2000 {
            let sink = if i % 2 == 0 { &a } else { &b };
            assert!(sink.record(AuditRecord {
                request_id: format!("r{i:04}"),
                ts_ms: now_ms(),
                ..Default::default()
            }));
            if i % 100 == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        a.close();
        for i in 2000..2100 {
            assert!(b.record(AuditRecord {
                request_id: format!("r{i:04}"),
                ts_ms: now_ms(),
                ..Default::default()
            }));
        }
        b.close();
        let mut ids = rows_of(&db);
        ids.sort();
        assert_eq!(ids, (0..2100).map(|i| format!("r{i:04}")).collect::<Vec<_>>());
    }

    /// The segment directory removed under a running writer: it notices
    /// within a second, starts a new stream, and what comes after is kept.
    #[test]
    fn a_removed_segment_directory_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.db");
        let sink = AuditSink::start(&db, &AuditConfig::default()).unwrap();
        let rec = |id: String| AuditRecord {
            request_id: id,
            ts_ms: now_ms(),
            ..Default::default()
        };
        assert!(sink.record(rec("before".into())));
        std::thread::sleep(Duration::from_millis(300));
        std::fs::remove_dir_all(SegmentRoot::for_database(&db).path()).unwrap();
        std::thread::sleep(BACKLOG_EVERY + Duration::from_millis(500));
        for i in 0..20 {
            assert!(sink.record(rec(format!("after{i}"))));
        }
        sink.close();
        let ids = rows_of(&db);
        assert_eq!(ids[0], "before");
        assert_eq!(ids[1..], (0..20).map(|i| format!("after{i}")).collect::<Vec<_>>()[..]);
        assert!(
            SegmentRoot::for_database(&db).streams().unwrap().is_empty(),
            "all read and gone"
        );
    }

    /// Damage in a finished segment (a length running past its end, as a
    /// power loss can leave) and a segment deleted by hand: the records
    /// around them are kept, the damage counted.
    #[test]
    fn damage_in_a_dead_stream_costs_only_the_damaged_records() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.db");
        store::open(&db).unwrap();
        let root = SegmentRoot::for_database(&db);
        let (stream, lock) = root.new_stream().unwrap();
        // Segments of 3 records each: 1, 2, 3, 4.
        let mut w = SegmentWriter::create(stream.clone(), 1, SEGMENT_AGE, Default::default()).unwrap();
        for i in 0..12 {
            w.push(
                &AuditEntry::from(&AuditRecord {
                    request_id: format!("r{i:02}"),
                    ts_ms: now_ms(),
                    ..Default::default()
                })
                .encode(),
            );
            if i % 3 == 2 {
                w.flush().unwrap();
            }
        }
        drop((w, lock));
        // Segment 1: the second record's length made 60 MiB.
        let one = stream.file(1);
        let mut bytes = std::fs::read(&one).unwrap();
        let first = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
        bytes[8 + first..8 + first + 4].copy_from_slice(&(60u32 << 20).to_le_bytes());
        std::fs::write(&one, &bytes).unwrap();
        // Segment 3: gone.
        std::fs::remove_file(stream.file(3)).unwrap();
        let sink = AuditSink::start(&db, &AuditConfig::default()).unwrap();
        sink.close();
        let ids = rows_of(&db);
        assert_eq!(ids, ["r00", "r02", "r03", "r04", "r05", "r09", "r10", "r11"]);
        assert_eq!(
            sink.stats().damaged.load(Ordering::Relaxed),
            2,
            "one damaged stretch, one missing segment"
        );
    }
}
