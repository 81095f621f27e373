//! Captured headers and bodies stay in the segment files they were written
//! to, not in SQLite: the indexer moves each segment it has read here
//! (`<database>.captured/<stream>/<segment>.seg`, a rename on the same file
//! system) and the row keeps the file and its record's offset. Reading a
//! row's detail is one `pread`. Retention and `audit.max_bytes` delete
//! whole files, oldest first.

use super::{entry, segment};
use crate::store::{
    self, StoreError,
    audit::{LogFilter, LogRow},
};
use rusqlite::Connection;
use serde_json::Value;
use std::{
    collections::HashMap,
    fs::File,
    io,
    path::{Path, PathBuf},
    time::SystemTime,
};

/// The directory of indexed segments beside one database.
#[derive(Debug, Clone)]
pub struct CapturedStore {
    path: PathBuf,
    /// Where segments are before the indexer has read them all.
    segments: segment::SegmentRoot,
}

/// One kept segment file.
#[derive(Debug)]
pub struct Kept {
    pub path: PathBuf,
    pub len: u64,
    pub modified: SystemTime,
}

/// A file's time comes from the kernel's coarse clock, a few ms behind
/// the one request times are read from: a file counts as older than a time
/// only by this much more, so none is deleted under a row it still holds.
const CLOCK_SLACK: std::time::Duration = std::time::Duration::from_secs(1);

/// The columns a segment keeps instead of the row.
const TEXTS: [&str; 4] = ["request_headers", "response_headers", "request_body", "response_body"];

/// Segments opened while reading one page (`None`: gone).
#[derive(Default)]
struct OpenFiles(HashMap<String, Option<File>>);

/// A row's reference to its segment: `<stream>/<segment>`.
pub fn file_ref(stream: &segment::SegmentDir, seq: u64) -> String {
    format!("{}/{seq}", stream.name())
}

/// The stream and segment of a reference read back from a row; `None` for
/// anything this build did not write (a row edited by hand).
fn parse_ref(r: &str) -> Option<(&str, u64)> {
    let (stream, seq) = r.split_once('/')?;
    let plain = !stream.is_empty()
        && !stream.starts_with('.')
        && stream
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    Some((stream, seq.parse().ok()?)).filter(|_| plain)
}

impl CapturedStore {
    pub fn for_database(db: &Path) -> CapturedStore {
        let mut name = db.file_name().unwrap_or_default().to_os_string();
        name.push(".captured");
        CapturedStore {
            path: db.with_file_name(name),
            segments: segment::SegmentRoot::for_database(db),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Move a segment the indexer has read wholly here; returns its size.
    pub fn keep(&self, stream: &segment::SegmentDir, seq: u64) -> io::Result<u64> {
        let from = stream.file(seq);
        let len = std::fs::metadata(&from)?.len();
        let dir = self.path.join(stream.name());
        let to = dir.join(segment::file_name(seq));
        // Retention may remove the stream's directory between the two
        // steps when it was empty: make it again, once.
        for attempt in 0..2 {
            segment::private_dir_all(&dir)?;
            match std::fs::rename(&from, &to) {
                Ok(()) => return Ok(len),
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempt == 0 && from.exists() => {}
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::from(io::ErrorKind::NotFound))
    }

    /// Every kept file, oldest (by last write) first.
    pub fn files(&self) -> io::Result<Vec<Kept>> {
        let mut out = Vec::new();
        let streams = match std::fs::read_dir(&self.path) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for stream in streams.flatten() {
            let Ok(files) = std::fs::read_dir(stream.path()) else {
                continue;
            };
            for f in files.flatten() {
                let Ok(meta) = f.metadata() else { continue };
                if meta.is_file() && f.file_name().to_string_lossy().ends_with(".seg") {
                    out.push(Kept {
                        path: f.path(),
                        len: meta.len(),
                        modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.modified.cmp(&b.modified).then_with(|| a.path.cmp(&b.path)));
        Ok(out)
    }

    /// Delete `file` and, if that left its stream's directory empty, the
    /// directory. Returns the bytes freed.
    pub fn delete(&self, file: &Kept) -> io::Result<u64> {
        match std::fs::remove_file(&file.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        }
        if let Some(dir) = file.path.parent() {
            // Fails while other files are there: that is the point.
            let _ = std::fs::remove_dir(dir);
        }
        Ok(file.len)
    }

    /// Delete the files of `files` that `gone` picks, and drop them from
    /// the list; returns how many and the bytes freed.
    fn delete_where(&self, files: &mut Vec<Kept>, gone: impl Fn(&Kept) -> bool) -> io::Result<(usize, u64)> {
        let (mut n, mut freed, mut failed) = (0, 0, None);
        files.retain(|f| {
            if failed.is_some() || !gone(f) {
                return true;
            }
            match self.delete(f) {
                Ok(len) => {
                    (n, freed) = (n + 1, freed + len);
                    false
                }
                Err(e) => {
                    failed = Some(e);
                    true
                }
            }
        });
        failed.map_or(Ok((n, freed)), Err)
    }

    /// Delete the files last written more than [`CLOCK_SLACK`] before
    /// `cutoff` (every record in them is older); returns how many and the
    /// bytes freed.
    pub fn delete_before(&self, cutoff: SystemTime) -> io::Result<(usize, u64)> {
        let cutoff = cutoff.checked_sub(CLOCK_SLACK).unwrap_or(SystemTime::UNIX_EPOCH);
        self.delete_where(&mut self.files()?, |f| f.modified < cutoff)
    }

    /// Delete the files of `files` (as [`Self::files`] listed them) no row
    /// points into any more, given `oldest`: the oldest row's time (Unix
    /// ms) and the segment (`<stream>/<seq>`) of the oldest row that points
    /// into one. Gone are that stream's earlier segments, and other
    /// streams' files last written before the oldest row's time (by more
    /// than [`CLOCK_SLACK`]); with no row left (`None`), all. Returns how
    /// many and the bytes freed.
    pub fn delete_unreferenced(
        &self,
        files: &mut Vec<Kept>,
        oldest: Option<(i64, Option<&str>)>,
    ) -> io::Result<(usize, u64)> {
        let Some((oldest_ts, oldest_file)) = oldest else {
            return self.delete_where(files, |_| true);
        };
        let before = (SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(oldest_ts.max(0) as u64))
            .checked_sub(CLOCK_SLACK)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let oldest = oldest_file.and_then(parse_ref);
        self.delete_where(files, |f| {
            let stream = f.path.parent().and_then(|d| d.file_name()).and_then(|s| s.to_str());
            let seq = f
                .path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok());
            match (oldest, stream, seq) {
                (Some((s, q)), Some(stream), Some(seq)) if s == stream => seq < q,
                _ => f.modified < before,
            }
        })
    }

    /// One page of the audit log (`store::audit::query`), captured texts
    /// filled in.
    pub fn query(&self, conn: &Connection, f: &LogFilter) -> Result<(Vec<LogRow>, Option<i64>), StoreError> {
        let (mut rows, next) = store::audit::query(conn, f)?;
        self.fill(&mut rows);
        Ok((rows, next))
    }

    /// Every row, oldest first, captured texts filled in (tests and small
    /// exports).
    pub fn all(&self, conn: &Connection) -> Result<Vec<store::audit::AuditRecord>, StoreError> {
        let mut rows = store::audit::all_rows(conn)?;
        self.fill(&mut rows);
        Ok(rows.into_iter().map(|r| r.record).collect())
    }

    /// One row by id, captured texts filled in.
    pub fn get(&self, conn: &Connection, id: i64) -> Result<LogRow, StoreError> {
        let mut row = store::audit::get(conn, id)?;
        self.fill(std::slice::from_mut(&mut row));
        Ok(row)
    }

    /// Fill in the captured headers and bodies of `rows` that keep them in
    /// a segment. A row whose file is gone (past retention or the size
    /// budget) or whose record does not match it keeps none.
    pub fn fill(&self, rows: &mut [LogRow]) {
        let mut files = OpenFiles::default();
        for row in rows {
            let Some((file_ref, at)) = row.captured.take() else {
                continue;
            };
            let r = &mut row.record;
            if let Some(t) = self.texts(&mut files, &file_ref, at, &r.request_id, r.ts_ms) {
                [r.request_headers, r.response_headers, r.request_body, r.response_body] = t;
            }
        }
    }

    /// The same for rows shipped to the cluster's log (SQLite rows as
    /// JSON): the reference columns are replaced by the texts.
    pub fn fill_shipped(&self, rows: &mut [store::sync::AuditRow]) {
        let mut files = OpenFiles::default();
        for row in rows {
            let file_ref = row.row.remove("captured_in");
            let at = row.row.remove("captured_at");
            let (Some(Value::String(file_ref)), Some(at)) = (file_ref, at.and_then(|v| v.as_u64())) else {
                continue;
            };
            if let Some(t) = self.texts(&mut files, &file_ref, at, &row.request_id, row.ts_ms) {
                for (name, text) in TEXTS.iter().zip(t) {
                    row.row
                        .insert((*name).to_owned(), text.map_or(Value::Null, Value::String));
                }
            }
        }
    }

    /// The captured texts of the record at `at` in `file_ref`, in
    /// [`TEXTS`] order, if it is the row's (same request id and time).
    fn texts(
        &self,
        files: &mut OpenFiles,
        file_ref: &str,
        at: u64,
        request_id: &str,
        ts_ms: i64,
    ) -> Option<[Option<String>; 4]> {
        let file = files
            .0
            .entry(file_ref.to_owned())
            .or_insert_with(|| self.open(file_ref))
            .as_ref()?;
        let frames = segment::read_frames(file, at, 4096, 1).ok()?;
        let payload = frames.payloads().next()?;
        let upgraded = entry::upgrade(payload);
        let e = entry::decode(upgraded.as_deref().unwrap_or(payload)).ok()?;
        if e.request_id != request_id || e.ts_ms != ts_ms {
            return None;
        }
        Some([e.request_headers, e.response_headers, e.request_body, e.response_body].map(|t| t.map(str::to_owned)))
    }

    /// A segment by reference: kept here, or still in its stream (the
    /// indexer is reading it), or moved here meanwhile.
    fn open(&self, file_ref: &str) -> Option<File> {
        let (stream, seq) = parse_ref(file_ref)?;
        let name = segment::file_name(seq);
        let kept = self.path.join(stream).join(&name);
        let live = self.segments.path().join(stream).join(&name);
        File::open(&kept)
            .or_else(|_| File::open(&live))
            .or_else(|_| File::open(&kept))
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_name_only_plain_streams() {
        assert_eq!(parse_ref("0001-22-ab/7"), Some(("0001-22-ab", 7)));
        for bad in [
            "../etc/7",
            "./7",
            "/7",
            "a/b/7",
            "a/-1",
            "a/x",
            "a",
            ".hidden/1",
            "a\0/1",
        ] {
            assert_eq!(parse_ref(bad), None, "{bad:?}");
        }
    }
}
