//! The indexer: a low-priority thread that follows the segment files into
//! the SQLite `audit_log` table, in large transactions, each of which also
//! records how far it has read (so a crash neither loses nor repeats a row).
//! It deletes a segment once it has read all of it and a newer one exists,
//! and it keeps retention and the size budget. A database that is locked or
//! failing only delays it: the records wait in their segments.

use super::{
    AuditStats,
    captured::{self, CapturedStore},
    entry,
    segment::{self, SegmentDir, SegmentRoot, Tail},
};
use crate::{clock::now_ms, store};
use parking_lot::Mutex;
use std::{
    collections::{HashMap, HashSet},
    fs::File,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// The `settings` rows holding the indexer's place in each stream:
/// `audit_segment_cursor:<stream>` = `segment:offset`.
const CURSOR: &str = "audit_segment_cursor";
/// How often the indexer looks for streams dead processes left.
const ADOPT_EVERY: Duration = Duration::from_secs(1);
/// How long the indexer waits when it has read everything.
pub const POLL: Duration = Duration::from_millis(50);
/// Bytes read from a segment per transaction, about (less under a small
/// `max_bytes`, which is checked after each transaction).
const READ_BYTES: usize = 4 << 20;
/// Most bytes scanned for the next intact record after damage.
const RESYNC_SCAN: usize = 64 << 20;
/// Most expired rows deleted in one transaction.
const PURGE_BATCH: usize = 5_000;
/// How often old rows are purged.
const RETENTION_EVERY: Duration = Duration::from_secs(600);
/// Most delete batches per budget check, so the indexer gets back to
/// indexing; a larger excess is worked off over the next checks.
const BUDGET_BATCHES: usize = 20;
/// At shutdown, how long the indexer keeps at a backlog or a failing
/// database before it leaves the rest in the segments for the next start.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The indexer's nice value when it must catch up ([`Scheduling`]): below
/// the proxy threads, so it keeps up with full load while giving way when
/// the cores are short.
const NICE: i32 = 10;

/// Where the indexer is: the segment it reads and the offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub segment: u64,
    pub offset: u64,
}

fn cursor_name(stream: &SegmentDir) -> String {
    format!("{CURSOR}:{}", stream.name())
}

pub fn load_cursor(conn: &rusqlite::Connection, stream: &SegmentDir) -> Result<Option<Cursor>, store::StoreError> {
    let name = cursor_name(stream);
    let Some(v) = store::settings::get(conn, &name)? else {
        return Ok(None);
    };
    let parsed = v
        .split_once(':')
        .and_then(|(s, o)| Some((s.parse().ok()?, o.parse().ok()?)));
    match parsed {
        Some((segment, offset)) => Ok(Some(Cursor { segment, offset })),
        None => Err(store::StoreError::Invalid(format!("setting {name}: {v:?}"))),
    }
}

/// This process's streams with their locks: the one its writer appends to
/// (the last) and any it left behind (when its directory was removed), held
/// until the indexer has read them, so no other process adopts them sooner.
pub type OwnStreams = Arc<Mutex<Vec<(SegmentDir, File)>>>;

fn save_cursor(conn: &rusqlite::Connection, stream: &SegmentDir, c: Cursor) -> Result<(), store::StoreError> {
    store::settings::set(conn, &cursor_name(stream), &format!("{}:{}", c.segment, c.offset))
}

pub struct Indexer {
    pub conn: rusqlite::Connection,
    pub root: SegmentRoot,
    /// Where read segments go while their captured texts are kept.
    pub captured: CapturedStore,
    /// Whether read segments are kept (headers or bodies are captured) or
    /// deleted.
    pub keep_captured: bool,
    /// Bytes kept in `captured` (measured at retention, counted between).
    pub captured_bytes: u64,
    pub own: OwnStreams,
    pub stats: Arc<AuditStats>,
    /// Rows per transaction.
    pub batch_size: usize,
    pub retention: Duration,
    /// `audit.max_bytes`; 0 = no budget.
    pub max_bytes: u64,
    /// Set once the writer has stopped: index what is left, then end.
    pub stop: Arc<AtomicBool>,
    /// Each stream's place, as last committed (read from the database once).
    pub cursors: HashMap<String, Cursor>,
    /// Streams already warned about, so a stuck one logs once.
    pub warned: HashSet<String>,
    /// The recent mean size of a frame, for how much to read at once.
    pub frame_bytes: usize,
    /// Segments being read, by reference: whether a row points into them
    /// (a segment no row needs is deleted, not kept).
    pub with_texts: HashMap<String, bool>,
}

/// What one step of the indexer did.
enum Step {
    /// Rows were indexed, or a finished segment was passed: go on.
    Progress,
    /// Everything written so far is indexed.
    CaughtUp,
    /// The database or the file system failed; try again later.
    Failed,
}

impl Indexer {
    pub fn run(mut self) {
        let mut scheduling = Scheduling::start();
        let mut last_purge = Instant::now() - RETENTION_EVERY;
        let mut last_adopt = Instant::now() - ADOPT_EVERY;
        let mut stop_seen: Option<Instant> = None;
        loop {
            if last_adopt.elapsed() >= ADOPT_EVERY {
                last_adopt = Instant::now();
                self.adopt_orphans();
            }
            // Read before the steps: caught up after the writer stopped
            // means everything it wrote is indexed.
            let stopping = self.stop.load(Ordering::Acquire);
            if stopping && stop_seen.is_none() {
                stop_seen = Some(Instant::now());
            }
            let owned: Vec<SegmentDir> = self.own.lock().iter().map(|(d, _)| d.clone()).collect();
            let (mut progress, mut failed) = (false, false);
            for (i, stream) in owned.iter().enumerate() {
                let live = i + 1 == owned.len() && !stopping;
                match self.step(stream, live) {
                    Step::Progress => progress = true,
                    Step::Failed => failed = true,
                    Step::CaughtUp if live => {}
                    Step::CaughtUp => {
                        // All of a stream its writer has left is indexed.
                        self.forget(stream);
                        self.own.lock().retain(|(d, _)| d != stream);
                        if self.max_bytes > 0 {
                            self.enforce_budget();
                        }
                    }
                }
            }
            if stopping && self.own.lock().is_empty() {
                break;
            }
            if let Some(t) = stop_seen
                && t.elapsed() >= SHUTDOWN_GRACE
            {
                tracing::warn!(
                    "Audit indexer stopped before it caught up; the rest stays in the segment files and is indexed at the next start."
                );
                break;
            }
            scheduling.note(progress, stopping);
            if !progress {
                std::thread::sleep(if failed { Duration::from_millis(250) } else { POLL });
            }
            if last_purge.elapsed() >= RETENTION_EVERY && !stopping {
                let backlog = self.purge();
                last_purge = if backlog {
                    Instant::now() - RETENTION_EVERY
                } else {
                    Instant::now()
                };
            }
        }
    }

    /// Warn about `stream` (a stream's name, or the segment root) once (a stuck stream would otherwise log every
    /// second).
    fn warn_once(&mut self, stream: &str, what: &str, error: &dyn std::fmt::Display) {
        if self.warned.insert(format!("{stream}/{what}")) {
            tracing::warn!(stream, error = %error, "{what}");
        }
    }

    /// Index the streams of processes that died (their lock is free), then
    /// delete them. Another live process may take one first; the lock
    /// decides.
    fn adopt_orphans(&mut self) {
        self.root.clean_unfinished();
        let streams = match self.root.streams() {
            Ok(s) => s,
            Err(e) => {
                let root = self.root.path().display().to_string();
                self.warn_once(&root, "Audit segment streams cannot be listed.", &e);
                return;
            }
        };
        let own: Vec<SegmentDir> = self.own.lock().iter().map(|(d, _)| d.clone()).collect();
        for stream in streams.into_iter().filter(|s| !own.contains(s)) {
            let lock = match stream.lock_file() {
                Ok(l) => l,
                Err(e) => {
                    self.warn_once(
                        &stream.name(),
                        "Audit segment stream cannot be opened; its records are not indexed.",
                        &e,
                    );
                    continue;
                }
            };
            if lock.try_lock().is_err() {
                continue; // a live process's, or being adopted
            }
            let started = Instant::now();
            loop {
                match self.step(&stream, false) {
                    Step::Progress if started.elapsed() < Duration::from_secs(5) => {}
                    // A long backlog is worked off over several rounds,
                    // between steps of this process's own stream.
                    Step::Progress | Step::Failed => break,
                    Step::CaughtUp => {
                        tracing::info!(stream = %stream.name(), "Audit records a stopped process left were indexed.");
                        self.forget(&stream);
                        if self.max_bytes > 0 {
                            self.enforce_budget();
                        }
                        break;
                    }
                }
            }
            drop(lock);
        }
    }

    /// Delete a stream wholly indexed (keeping its segments' captured
    /// texts), and its cursor.
    fn forget(&mut self, stream: &SegmentDir) {
        for (seq, _) in stream.list().unwrap_or_default() {
            self.retire(stream, seq);
        }
        if let Err(e) = std::fs::remove_dir_all(stream.path())
            && e.kind() != std::io::ErrorKind::NotFound
        {
            self.warn_once(&stream.name(), "Indexed audit segments cannot be deleted.", &e);
            return;
        }
        self.cursors.remove(&stream.name());
        if let Err(e) = store::settings::delete(&self.conn, &cursor_name(stream)) {
            tracing::warn!(error = %e, "Audit indexer cannot drop a stream's place.");
        }
    }

    fn cursor(&mut self, stream: &SegmentDir) -> Result<Option<Cursor>, store::StoreError> {
        if let Some(c) = self.cursors.get(&stream.name()) {
            return Ok(Some(*c));
        }
        let c = load_cursor(&self.conn, stream)?;
        if let Some(c) = c {
            self.cursors.insert(stream.name(), c);
        }
        Ok(c)
    }

    /// Index the next batch of `stream`'s frames, or move past a finished
    /// segment. `live`: its writer may still append to its newest segment.
    fn step(&mut self, stream: &SegmentDir, live: bool) -> Step {
        let segments = match stream.list() {
            Ok(s) => s,
            Err(e) => {
                self.warn_once(&stream.name(), "Audit segments cannot be listed.", &e);
                return Step::Failed;
            }
        };
        let Some(&(newest, _)) = segments.last() else {
            return Step::CaughtUp;
        };
        let cursor = match self.cursor(stream) {
            Ok(c) => c,
            Err(e) => {
                // A place nobody can read (edited by hand): start the
                // stream over. Rows may repeat; none is lost.
                self.warn_once(
                    &stream.name(),
                    "Audit indexer cannot read its place in a stream; reading it from its start.",
                    &e,
                );
                None
            }
        };
        // A stream's segments are numbered from 1 up, one by one.
        let mut cursor = cursor.unwrap_or(Cursor { segment: 1, offset: 0 });
        // Segments wholly indexed before a crash: retire them.
        for &(seq, _) in segments.iter().filter(|(s, _)| *s < cursor.segment) {
            self.retire(stream, seq);
        }
        if !segments.iter().any(|(s, _)| *s == cursor.segment) {
            match segments.iter().find(|(s, _)| *s > cursor.segment) {
                Some(&(seq, _)) => {
                    self.missing(stream, cursor.segment, seq);
                    cursor = Cursor {
                        segment: seq,
                        offset: 0,
                    };
                }
                None => return Step::CaughtUp,
            }
        }
        let file = match File::open(stream.file(cursor.segment)) {
            Ok(f) => f,
            Err(e) => {
                self.warn_once(&stream.name(), "Audit segment cannot be opened.", &e);
                return Step::Failed;
            }
        };
        // About one batch of frames, at their recent average size: reading
        // (and zeroing) much more than a batch uses was a tenth of the
        // indexer's CPU.
        let cap = match self.max_bytes {
            0 => READ_BYTES,
            budget => READ_BYTES.min((budget / 8).max(64 << 10) as usize),
        };
        let want = (self.batch_size.saturating_mul(self.frame_bytes / 4 * 5) + (4 << 10)).min(cap);
        let frames = match segment::read_frames(&file, cursor.offset, want, self.batch_size) {
            Ok(f) => f,
            Err(e) => {
                self.warn_once(&stream.name(), "Audit segment cannot be read.", &e);
                return Step::Failed;
            }
        };
        if !frames.is_empty() {
            let mean = ((frames.end - cursor.offset) / frames.len() as u64) as usize;
            self.frame_bytes = (self.frame_bytes * 3 + mean) / 4;
        }
        let finished = cursor.segment < newest || !live;
        if !frames.is_empty() {
            let mut records = Vec::with_capacity(frames.len());
            let mut offsets = Vec::with_capacity(frames.len());
            let mut unreadable = (0u64, None);
            // Records of an older format (segments an older build wrote),
            // brought to this one; borrowed from here like the rest.
            let upgraded: Vec<Option<Vec<u8>>> = frames.payloads().map(entry::upgrade).collect();
            for ((at, payload), up) in frames.with_offsets().zip(&upgraded) {
                match entry::decode(up.as_deref().unwrap_or(payload)) {
                    Ok(r) => {
                        records.push(r);
                        offsets.push(at);
                    }
                    Err(e) => unreadable = (unreadable.0 + 1, Some(e)),
                }
            }
            if let (n, Some(e)) = unreadable {
                self.stats.damaged.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(records = n, error = %e, stream = %stream.name(), segment = cursor.segment, "Audit records cannot be decoded; skipped.");
            }
            let next = Cursor {
                segment: cursor.segment,
                offset: frames.end,
            };
            let file = captured::file_ref(stream, cursor.segment);
            let kept = self.keep_captured.then_some(store::audit::CapturedIn {
                file: &file,
                offsets: &offsets,
            });
            let any_texts = records.iter().any(|r| r.has_captured());
            let step = self.index(stream, &records, kept, next);
            if matches!(step, Step::Progress) {
                // Read from its start by this process, or not known.
                *self.with_texts.entry(file).or_insert(cursor.offset != 0) |= any_texts;
            }
            return step;
        }
        if let Tail::Damaged(at) = frames.tail {
            // Only a crash of the machine (or a hand) leaves this; the
            // writer never appends to a file it did not write whole.
            return self.skip_damage(stream, &file, cursor.segment, at);
        }
        if !finished {
            return Step::CaughtUp;
        }
        if file.metadata().is_ok_and(|m| m.len() > frames.end) {
            // A finished segment with bytes after its last whole frame: a
            // length running past the end, or half a frame the writer died
            // writing (a machine crash with `fsync: never`).
            return self.skip_damage(stream, &file, cursor.segment, frames.end);
        }
        let Some(&(next, _)) = segments.iter().find(|(s, _)| *s > cursor.segment) else {
            // The last segment of a stream whose writer is gone: all read.
            return Step::CaughtUp;
        };
        self.missing(stream, cursor.segment + 1, next);
        match self.index(
            stream,
            &[],
            None,
            Cursor {
                segment: next,
                offset: 0,
            },
        ) {
            Step::Progress => {
                self.retire(stream, cursor.segment);
                if self.max_bytes > 0 {
                    // A kept segment counts at once, not from the next batch.
                    self.enforce_budget();
                }
                Step::Progress
            }
            other => other,
        }
    }

    /// Move past damage at `at` in a segment: to the next intact record
    /// after it, or to the end of the file if there is none. Counted and
    /// logged once per damaged stretch.
    fn skip_damage(&mut self, stream: &SegmentDir, file: &File, segment: u64, at: u64) -> Step {
        let resume = match segment::resync(file, at + 1, RESYNC_SCAN, entry::is_current) {
            Ok(Some(next)) => next,
            Ok(None) => file.metadata().map_or(at, |m| m.len()).max(at),
            Err(e) => {
                self.warn_once(&stream.name(), "Audit segment cannot be read.", &e);
                return Step::Failed;
            }
        };
        self.stats.damaged.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            stream = %stream.name(),
            segment,
            offset = at,
            skipped_bytes = resume - at,
            "Audit segment damaged or torn (a machine crash?); the damaged bytes are skipped, the records after them kept."
        );
        self.index(
            stream,
            &[],
            None,
            Cursor {
                segment,
                offset: resume,
            },
        )
    }

    /// Report segments `from..until` of `stream` as missing (deleted by
    /// hand: the writer numbers them one by one), if there are any.
    fn missing(&self, stream: &SegmentDir, from: u64, until: u64) {
        if from < until {
            self.stats.damaged.fetch_add(until - from, Ordering::Relaxed);
            tracing::error!(
                stream = %stream.name(),
                first = from,
                last = until - 1,
                "Audit segments missing (deleted by hand?); the records in them that were not indexed are lost."
            );
        }
    }

    /// A segment wholly indexed: kept for its captured texts, or deleted
    /// (none captured, or no row with any).
    fn retire(&mut self, stream: &SegmentDir, seq: u64) {
        let texts = self.with_texts.remove(&captured::file_ref(stream, seq));
        if self.keep_captured && texts != Some(false) {
            match self.captured.keep(stream, seq) {
                Ok(len) => {
                    self.captured_bytes += len;
                    self.stats.captured_bytes.store(self.captured_bytes, Ordering::Relaxed);
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) => self.warn_once(
                    &stream.name(),
                    "Indexed audit segments cannot be kept; their captured headers and bodies are deleted.",
                    &e,
                ),
            }
        }
        match std::fs::remove_file(stream.file(seq)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => self.warn_once(&stream.name(), "Indexed audit segments cannot be deleted.", &e),
        }
    }

    /// Insert `records` and move the cursor, in one transaction.
    fn index(
        &mut self,
        stream: &SegmentDir,
        records: &[store::audit::AuditEntry<'_>],
        captured: Option<store::audit::CapturedIn<'_>>,
        next: Cursor,
    ) -> Step {
        let written =
            store::audit::insert_batch_with(&mut self.conn, records, captured, |tx| save_cursor(tx, stream, next));
        match written {
            Ok(()) => {
                self.cursors.insert(stream.name(), next);
                if !records.is_empty() {
                    self.stats.written.fetch_add(records.len() as u64, Ordering::Relaxed);
                    if self.max_bytes > 0 {
                        self.enforce_budget();
                    }
                }
                Step::Progress
            }
            Err(e) => {
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(rows = records.len(), error = %e, "Audit rows not indexed yet; they wait in their segment.");
                Step::Failed
            }
        }
    }

    /// Keep the database's used pages and the kept segments under
    /// `max_bytes`, oldest first, rows and their captured texts together:
    /// the kept segments whose rows are all gone (last written before the
    /// oldest row left), else a bounded batch of the oldest rows, until
    /// under 90 % of the budget (so it is not at the edge again with the
    /// next batch). Deleted pages go to SQLite's free list and are reused
    /// by the next inserts, so the file stops growing at about the budget.
    fn enforce_budget(&mut self) {
        let target = self.max_bytes / 10 * 9;
        let over = |this: &Self| store::audit::used_bytes(&this.conn).map(|db| db + this.captured_bytes);
        match over(self) {
            Ok(used) if used > self.max_bytes => {}
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "Audit size budget could not be enforced.");
                return;
            }
        }
        // Listed once per pass (other processes keep and delete files too);
        // what this pass deletes leaves the list.
        let Some(mut kept) = self.measure_captured() else {
            return;
        };
        let (mut rows_deleted, mut files, mut freed) = (0u64, 0usize, 0u64);
        for _ in 0..BUDGET_BATCHES {
            let step = over(self).and_then(|used| {
                let started = rows_deleted > 0 || files > 0;
                if used <= target || (!started && used <= self.max_bytes) {
                    return Ok(None);
                }
                let (n, bytes) = self.delete_unreferenced(&mut kept);
                if n > 0 {
                    files += n;
                    freed += bytes;
                    return Ok(Some(()));
                }
                let rows = store::audit::rows_estimate(&self.conn)?;
                if rows == 0 {
                    return Ok(None);
                }
                // As many rows as the excess holds at the average size of
                // a row and its texts.
                let per_row = (used / rows).max(1);
                let n = ((used - target) / per_row + 1).min(PURGE_BATCH as u64);
                let n = store::audit::delete_oldest(&self.conn, n as usize)?;
                rows_deleted += n as u64;
                Ok((n > 0).then_some(()))
            });
            match step {
                Ok(Some(())) => {}
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "Audit size budget could not be enforced.");
                    break;
                }
            }
        }
        if files > 0 {
            tracing::info!(
                files,
                bytes = freed,
                max_bytes = self.max_bytes,
                "Audit size budget: deleted the captured headers and bodies of deleted rows."
            );
        }
        if rows_deleted > 0 {
            self.stats.budget_deleted.fetch_add(rows_deleted, Ordering::Relaxed);
            tracing::info!(
                rows = rows_deleted,
                max_bytes = self.max_bytes,
                "Audit size budget: deleted the oldest rows."
            );
        }
    }

    /// Delete the kept segments of `kept` whose rows are all gone
    /// ([`CapturedStore::delete_unreferenced`]). Returns how many and the
    /// bytes freed.
    fn delete_unreferenced(&mut self, kept: &mut Vec<captured::Kept>) -> (usize, u64) {
        let oldest = store::audit::oldest_ts(&self.conn).and_then(|ts| match ts {
            Some(ts) => Ok(Some((ts, store::audit::oldest_captured_in(&self.conn)?))),
            None => Ok(None),
        });
        let deleted = match oldest {
            Ok(oldest) => self
                .captured
                .delete_unreferenced(kept, oldest.as_ref().map(|(ts, f)| (*ts, f.as_deref()))),
            Err(e) => {
                tracing::warn!(error = %e, "Audit size budget could not be enforced.");
                return (0, 0);
            }
        };
        match deleted {
            Ok((n, bytes)) => {
                self.captured_bytes = self.captured_bytes.saturating_sub(bytes);
                self.stats.captured_bytes.store(self.captured_bytes, Ordering::Relaxed);
                (n, bytes)
            }
            Err(e) => {
                tracing::warn!(error = %e, "Audit size budget: kept segments cannot be deleted.");
                (0, 0)
            }
        }
    }

    /// Measure the kept segments anew (other processes keep and delete
    /// them too); returns them as listed.
    pub fn measure_captured(&mut self) -> Option<Vec<captured::Kept>> {
        match self.captured.files() {
            Ok(files) => {
                self.captured_bytes = files.iter().map(|f| f.len).sum();
                self.stats.captured_bytes.store(self.captured_bytes, Ordering::Relaxed);
                Some(files)
            }
            Err(e) => {
                self.warn_once(
                    &self.captured.path().display().to_string(),
                    "Kept audit segments cannot be listed.",
                    &e,
                );
                None
            }
        }
    }

    /// Delete one batch of expired rows, and the kept segments wholly
    /// expired; whether more rows may be left.
    fn purge(&mut self) -> bool {
        let cutoff = now_ms() - self.retention.as_millis() as i64;
        if let Err(e) = store::rollup::delete_before(&self.conn, cutoff) {
            tracing::warn!(error = %e, "Audit retention of the per-minute totals failed.");
        }
        let oldest = std::time::SystemTime::now()
            .checked_sub(self.retention)
            .unwrap_or(std::time::UNIX_EPOCH);
        match self.captured.delete_before(oldest) {
            Ok((0, _)) => {}
            Ok((files, bytes)) => {
                tracing::info!(
                    files,
                    bytes,
                    "Audit retention: deleted old captured headers and bodies."
                )
            }
            Err(e) => tracing::warn!(error = %e, "Audit retention of the kept segments failed."),
        }
        self.measure_captured();
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

/// How the indexer thread is scheduled (Linux sets it per thread).
///
/// While it keeps up it runs under `SCHED_IDLE`: a proxy thread that wakes
/// takes the core from it at once, which keeps the indexer out of the
/// proxy's tail latency (p99 with the audit log on fell from 4.2–4.5 ms to
/// 3.0–3.6 ms in one A/B, docs/benchmarks.md). Once it has been behind for
/// [`BEHIND_FOR`] (a gateway at full load for long), or at shutdown, it
/// returns to the normal policy at nice [`NICE`], so it still catches up.
/// Leaving `SCHED_IDLE` needs `RLIMIT_NICE` ≥ 10 (or `CAP_SYS_NICE`); where
/// that is not allowed the indexer stays at nice 10 throughout.
struct Scheduling {
    /// `SCHED_IDLE` now.
    idle: bool,
    /// It can go back and forth (checked once at start).
    adaptive: bool,
    behind_since: Option<Instant>,
}

/// How long the indexer may stay behind under `SCHED_IDLE`.
const BEHIND_FOR: Duration = Duration::from_secs(2);

impl Scheduling {
    fn start() -> Scheduling {
        // SAFETY: setpriority only reads its integer arguments; `who` 0 is
        // the calling thread on Linux.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, NICE) } != 0 {
            tracing::debug!("Audit indexer priority unchanged: {}", std::io::Error::last_os_error());
        }
        // Not tried and undone: a thread that may not leave SCHED_IDLE
        // could not undo it either.
        let adaptive = may_leave_idle() && set_policy(libc::SCHED_IDLE);
        Scheduling {
            idle: adaptive,
            adaptive,
            behind_since: None,
        }
    }

    /// After a pass over the streams: `behind` when it indexed rows and
    /// may have more to do, `stopping` at shutdown.
    fn note(&mut self, behind: bool, stopping: bool) {
        if !self.adaptive {
            return;
        }
        let since = if behind {
            *self.behind_since.get_or_insert_with(Instant::now)
        } else {
            self.behind_since = None;
            Instant::now()
        };
        let want_idle = !stopping && since.elapsed() < BEHIND_FOR;
        if want_idle == self.idle {
            return;
        }
        if set_policy(if want_idle { libc::SCHED_IDLE } else { libc::SCHED_OTHER }) {
            self.idle = want_idle;
            if !want_idle && !stopping {
                tracing::info!(
                    "Audit indexer behind for {BEHIND_FOR:?}: scheduled at nice {NICE} until it catches up."
                );
            }
        } else {
            // Permission taken away meanwhile: stop trying.
            self.adaptive = false;
            tracing::warn!(
                "Audit indexer cannot change its scheduling: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Whether this thread may go from `SCHED_IDLE` back to nice [`NICE`]:
/// `RLIMIT_NICE` allows that nice value (20 − limit ≤ NICE), or it has
/// `CAP_SYS_NICE`.
fn may_leave_idle() -> bool {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit to write for the call's duration.
    let read = unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut limit) } == 0;
    if read && limit.rlim_cur >= (20 - NICE) as libc::rlim_t {
        return true;
    }
    const CAP_SYS_NICE: u32 = 23;
    std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_NICE) != 0)
}

/// Set this thread's scheduling policy; whether it was allowed.
fn set_policy(policy: libc::c_int) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call's duration; pid 0
    // is the calling thread on Linux.
    unsafe { libc::sched_setscheduler(0, policy, &param) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (policy, nice) of the calling thread, from `/proc`.
    fn scheduling_now() -> (i64, i64) {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let rest: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        (rest[38].parse().unwrap(), rest[16].parse().unwrap()) // fields 41 and 19
    }

    /// Idle while it keeps up, nice 10 once behind for long or stopping,
    /// and idle again once caught up; nice 10 throughout where leaving
    /// `SCHED_IDLE` is not allowed.
    #[test]
    fn the_indexer_runs_idle_until_it_falls_behind() {
        std::thread::spawn(|| {
            let mut s = Scheduling::start();
            let (idle, other) = (libc::SCHED_IDLE as i64, libc::SCHED_OTHER as i64);
            if !may_leave_idle() {
                assert_eq!(scheduling_now(), (other, 10));
                return;
            }
            assert_eq!(scheduling_now(), (idle, 10));
            s.note(true, false);
            assert_eq!(scheduling_now().0, idle, "behind only briefly");
            std::thread::sleep(BEHIND_FOR);
            s.note(true, false);
            assert_eq!(scheduling_now(), (other, 10), "behind for long");
            s.note(false, false);
            assert_eq!(scheduling_now().0, idle, "caught up");
            s.note(false, true);
            assert_eq!(scheduling_now(), (other, 10), "stopping");
        })
        .join()
        .unwrap();
    }
}
