//! Segment files: the audit log as the writer appends it. Each record is a
//! frame `len: u32 LE | crc32: u32 LE | payload` (the payload is the
//! record's postcard encoding). Files are named by a rising sequence number
//! and never appended to after a newer one exists, so the indexer knows a
//! segment is complete once its successor is there. No B-tree, no index:
//! the SQLite index is built from these files off the request path
//! ([`super::indexer`]).

pub use crate::config::AuditFsync as Fsync;
use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Frame header: payload length and its CRC-32.
pub const HEADER: usize = 8;
/// Largest payload accepted; a longer length field means a damaged file.
pub const PAYLOAD_MAX: usize = 64 << 20;
const SUFFIX: &str = "seg";

/// Where one database's segments live: `<database>.segments/`, one
/// directory per writer process (a stream), so that two processes on one
/// database (the old and the new during an upgrade) never share a file.
#[derive(Debug, Clone)]
pub struct SegmentRoot {
    path: PathBuf,
}

/// Streams being made (and anything else hidden) start with this.
const HIDDEN: &str = ".";
/// The name of the file a stream's owner holds an exclusive lock on for
/// as long as it lives; a stream nobody holds was left by a dead process.
const LOCK: &str = "owner.lock";

impl SegmentRoot {
    pub fn for_database(db: &Path) -> SegmentRoot {
        let mut name = db.file_name().unwrap_or_default().to_os_string();
        name.push(".segments");
        SegmentRoot {
            path: db.with_file_name(name),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new stream for this process, locked by it while the returned file lives.
    pub fn new_stream(&self) -> io::Result<(SegmentDir, File)> {
        let name = format!(
            "{:013}-{:010}-{:08x}",
            crate::clock::now_ms().max(0),
            std::process::id(),
            rand::random::<u32>()
        );
        // Made and locked under a name other processes skip, then renamed
        // into place: a stream they can see is locked by its owner (or its
        // owner is dead), never between the two.
        private_dir_all(&self.path)?;
        // Made 0755 by a build before segments were private: tighten it
        // (best effort: it may belong to another user).
        let _ = std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o700));
        let hidden = self.path.join(format!("{HIDDEN}{name}"));
        std::fs::DirBuilder::new().mode(0o700).create(&hidden)?;
        let lock = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(hidden.join(LOCK))?;
        lock.try_lock().map_err(io::Error::other)?;
        let dir = SegmentDir {
            path: self.path.join(name),
        };
        std::fs::rename(&hidden, &dir.path)?;
        Ok((dir, lock))
    }

    /// Remove what a process that died while making its stream left
    /// (a hidden directory, older than a minute).
    pub fn clean_unfinished(&self) {
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return;
        };
        for entry in entries.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|e| e > Duration::from_secs(60)));
            if entry.file_name().to_string_lossy().starts_with(HIDDEN) && old {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Every stream, oldest first.
    pub fn streams(&self) -> io::Result<Vec<SegmentDir>> {
        let entries = match std::fs::read_dir(&self.path) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry?;
            if entry.file_type()?.is_dir() && !entry.file_name().to_string_lossy().starts_with(HIDDEN) {
                out.push(SegmentDir { path: entry.path() });
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Bytes in the segments of every stream, and the streams that could
    /// not be measured (unreadable).
    pub fn total_bytes(&self) -> io::Result<(u64, usize)> {
        let (mut sum, mut unreadable) = (0, 0);
        for s in self.streams()? {
            match s.total_bytes() {
                Ok(n) => sum += n,
                Err(_) => unreadable += 1,
            }
        }
        Ok((sum, unreadable))
    }
}

/// Make `dir` and its missing parents readable by this user only:
/// segments hold captured prompts and answers.
pub fn private_dir_all(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// The file name of segment `seq`.
pub fn file_name(seq: u64) -> String {
    format!("{seq:020}.{SUFFIX}")
}

/// One stream: the segments one writer process appended, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentDir {
    path: PathBuf,
}

impl SegmentDir {
    /// The stream's name (its directory's), unique per writer process.
    pub fn name(&self) -> String {
        self.path.file_name().unwrap_or_default().to_string_lossy().into_owned()
    }

    /// The stream's lock file, opened (created if missing).
    pub fn lock_file(&self) -> io::Result<File> {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.path.join(LOCK))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, seq: u64) -> PathBuf {
        self.path.join(file_name(seq))
    }

    /// Sequence numbers of the segments present, oldest first, with sizes.
    pub fn list(&self) -> io::Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.path) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            out.push((seq, entry.metadata()?.len()));
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Bytes in all segments.
    pub fn total_bytes(&self) -> io::Result<u64> {
        Ok(self.list()?.iter().map(|(_, len)| len).sum())
    }
}

/// Appends frames to the newest segment; starts a new one past a size or
/// an age, and always on start (an old file may end in a torn frame).
pub struct SegmentWriter {
    dir: SegmentDir,
    seq: u64,
    file: File,
    len: u64,
    opened: Instant,
    buf: Vec<u8>,
    frames: usize,
    max_len: u64,
    max_age: Duration,
    fsync: Fsync,
}

impl SegmentWriter {
    /// Start writing to `dir` (which [`SegmentRoot::new_stream`] made).
    pub fn create(dir: SegmentDir, max_len: u64, max_age: Duration, fsync: Fsync) -> io::Result<Self> {
        let seq = dir.list()?.last().map_or(1, |(s, _)| s + 1);
        let file = open_new(&dir.file(seq))?;
        Ok(SegmentWriter {
            dir,
            seq,
            file,
            len: 0,
            opened: Instant::now(),
            buf: Vec::with_capacity(1 << 16),
            frames: 0,
            max_len,
            max_age,
            fsync,
        })
    }

    /// Queue one payload for the next [`Self::flush`].
    pub fn push(&mut self, payload: &[u8]) {
        self.buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        self.buf.extend_from_slice(payload);
        self.frames += 1;
    }

    /// Frames pushed and not yet flushed.
    pub fn pending(&self) -> usize {
        self.frames
    }

    /// Write what was pushed in one `write`, then start a new segment if
    /// this one is full or old. On error the file is cut back to its last
    /// whole frame, so a later write is not misaligned; the frames are lost
    /// and their number returned in the error.
    pub fn flush(&mut self) -> Result<usize, (usize, io::Error)> {
        let frames = std::mem::take(&mut self.frames);
        if frames > 0 {
            let written = self.file.write_all(&self.buf).and_then(|()| match self.fsync {
                Fsync::Always => self.file.sync_data(),
                Fsync::Never => Ok(()),
            });
            if let Err(e) = written {
                self.buf.clear();
                let _ = self.file.set_len(self.len);
                // A new file: once the indexer has read this one it can be
                // deleted, which frees the space a full disk needs.
                let _ = self.rotate();
                return Err((frames, e));
            }
            self.len += self.buf.len() as u64;
            self.buf.clear();
            if self.buf.capacity() > 1 << 22 {
                self.buf.shrink_to(1 << 16);
            }
        }
        if self.len >= self.max_len || (self.len > 0 && self.opened.elapsed() >= self.max_age) {
            self.rotate().map_err(|e| (0, e))?;
        }
        Ok(frames)
    }

    /// Whether the file being written is no longer at its path (its
    /// directory was removed): what is written to it is lost.
    pub fn detached(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let at_path = std::fs::metadata(self.dir.file(self.seq));
        match (at_path, self.file.metadata()) {
            (Ok(p), Ok(f)) => p.ino() != f.ino() || p.dev() != f.dev(),
            (Err(_), _) => true,
            (_, Err(_)) => false,
        }
    }

    /// The stream being written.
    pub fn stream(&self) -> &SegmentDir {
        &self.dir
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.fsync == Fsync::Always {
            self.file.sync_all()?;
        }
        let file = open_new(&self.dir.file(self.seq + 1))?;
        self.seq += 1;
        self.file = file;
        self.len = 0;
        self.opened = Instant::now();
        Ok(())
    }
}

fn open_new(path: &Path) -> io::Result<File> {
    OpenOptions::new().create_new(true).append(true).mode(0o600).open(path)
}

/// What a read of a segment found after its whole frames.
#[derive(Debug, PartialEq, Eq)]
pub enum Tail {
    /// Nothing, or the start of a frame still being written.
    Clean,
    /// A frame whose length or checksum is wrong, at this offset.
    Damaged(u64),
}

/// Whole frames read from one segment.
pub struct Frames {
    buf: Vec<u8>,
    /// (start, end) of each payload in `buf`.
    spans: Vec<(usize, usize)>,
    /// File offset of `buf`'s first byte.
    start: u64,
    /// File offset just past the last whole frame.
    pub end: u64,
    pub tail: Tail,
}

impl Frames {
    pub fn payloads(&self) -> impl Iterator<Item = &[u8]> {
        self.spans.iter().map(|&(a, b)| &self.buf[a..b])
    }

    /// Each frame's offset in the file, with its payload.
    pub fn with_offsets(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.spans
            .iter()
            .map(|&(a, b)| (self.start + (a - HEADER) as u64, &self.buf[a..b]))
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }
}

/// Read whole frames of `file` from `offset`, about `want` bytes of them
/// (more when one frame is longer), and at most `max_frames`.
pub fn read_frames(file: &File, offset: u64, want: usize, max_frames: usize) -> io::Result<Frames> {
    let mut buf = vec![0u8; want.max(HEADER)];
    let mut filled = read_full_at(file, &mut buf, offset)?;
    buf.truncate(filled);
    let mut spans = Vec::new();
    let mut at = 0usize;
    let tail = loop {
        if spans.len() >= max_frames || filled - at < HEADER {
            break Tail::Clean;
        }
        let len = u32::from_le_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(buf[at + 4..at + 8].try_into().unwrap_or_default());
        // Zero bytes (what a power loss can leave) read as a frame of
        // length 0 whose checksum matches: no record is empty.
        if len == 0 || len > PAYLOAD_MAX {
            break Tail::Damaged(offset + at as u64);
        }
        let end = at + HEADER + len;
        if end > filled {
            if spans.is_empty() {
                // One frame longer than the read: read exactly it.
                buf.resize(end, 0);
                let more = read_full_at(file, &mut buf[filled..], offset + filled as u64)?;
                filled += more;
                buf.truncate(filled);
                if end > filled {
                    break Tail::Clean;
                }
            } else {
                break Tail::Clean;
            }
        }
        if crc32fast::hash(&buf[at + HEADER..end]) != crc {
            break Tail::Damaged(offset + at as u64);
        }
        spans.push((at + HEADER, end));
        at = end;
    };
    Ok(Frames {
        buf,
        spans,
        start: offset,
        end: offset + at as u64,
        tail,
    })
}

/// The offset of the first whole, intact frame after damage at `from`
/// (scanning byte by byte: a false match needs a plausible length, a
/// matching CRC-32 and `accept` taking the payload), or `None`. Reads at
/// most `max_scan` bytes of the file.
pub fn resync(file: &File, from: u64, max_scan: usize, accept: impl Fn(&[u8]) -> bool) -> io::Result<Option<u64>> {
    let left = file.metadata()?.len().saturating_sub(from);
    let mut buf = vec![0u8; max_scan.min(usize::try_from(left).unwrap_or(usize::MAX))];
    let n = read_full_at(file, &mut buf, from)?;
    buf.truncate(n);
    for at in 0..n.saturating_sub(HEADER) {
        let len = u32::from_le_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
        let Some(end) = (at + HEADER).checked_add(len) else {
            continue;
        };
        if len == 0 || len > PAYLOAD_MAX || end > n {
            continue;
        }
        let crc = u32::from_le_bytes(buf[at + 4..at + 8].try_into().unwrap_or_default());
        if crc32fast::hash(&buf[at + HEADER..end]) == crc && accept(&buf[at + HEADER..end]) {
            return Ok(Some(from + at as u64));
        }
    }
    Ok(None)
}

/// `read_at` until the buffer is full or the file ends.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(dir: &Path, max_len: u64) -> SegmentWriter {
        SegmentWriter::create(stream(dir), max_len, Duration::from_secs(3600), Fsync::Never).unwrap()
    }

    fn stream(dir: &Path) -> SegmentDir {
        let path = dir.join("s");
        std::fs::create_dir_all(&path).unwrap();
        SegmentDir { path }
    }

    #[test]
    fn zeros_are_damage_and_a_read_resyncs_past_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = writer(tmp.path(), 1 << 20);
        w.push(b"one");
        w.push(b"two");
        w.push(b"three");
        w.flush().unwrap();
        let path = w.dir.file(w.seq);
        let mut bytes = std::fs::read(&path).unwrap();
        // Zero the second frame: what a power loss leaves.
        bytes[11..22].fill(0);
        std::fs::write(&path, &bytes).unwrap();
        let f = File::open(&path).unwrap();
        let frames = read_frames(&f, 0, 4096, usize::MAX).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames.tail, Tail::Damaged(11));
        let next = resync(&f, 12, 1 << 20, |_| true).unwrap();
        assert_eq!(next, Some(22), "the third frame");
        let rest = read_frames(&f, 22, 4096, usize::MAX).unwrap();
        assert_eq!(rest.payloads().collect::<Vec<_>>(), vec![b"three".as_slice()]);
        assert_eq!(resync(&f, 23, 1 << 20, |_| true).unwrap(), None);
    }

    #[test]
    fn a_stream_is_seen_only_once_locked_by_its_owner() {
        let tmp = tempfile::tempdir().unwrap();
        let root = SegmentRoot::for_database(&tmp.path().join("a.db"));
        let (a, lock) = root.new_stream().unwrap();
        assert_eq!(root.streams().unwrap(), vec![a.clone()]);
        assert!(a.lock_file().unwrap().try_lock().is_err(), "held by its owner");
        drop(lock);
        assert!(a.lock_file().unwrap().try_lock().is_ok(), "free once the owner is gone");
        // A stream being made is hidden.
        std::fs::create_dir(root.path().join(".half-made")).unwrap();
        assert_eq!(root.streams().unwrap().len(), 1);
    }

    #[test]
    fn frames_round_trip_and_segments_rotate() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = writer(tmp.path(), 100);
        for i in 0..10u8 {
            w.push(&[i; 30]);
            assert_eq!(w.flush().unwrap(), 1);
        }
        let dir = stream(tmp.path());
        let segs = dir.list().unwrap();
        // 38 bytes a frame: three fill a segment past 100 bytes.
        assert_eq!(segs.len(), 4, "{segs:?}");
        let mut seen = Vec::new();
        for (seq, _) in segs {
            let f = File::open(dir.file(seq)).unwrap();
            let frames = read_frames(&f, 0, 1 << 16, usize::MAX).unwrap();
            assert_eq!(frames.tail, Tail::Clean);
            seen.extend(frames.payloads().map(|p| p[0]));
        }
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        // A restart never appends to an old file.
        let w2 = writer(tmp.path(), 100);
        assert_eq!(w2.seq, 5);
    }

    #[test]
    fn a_torn_or_damaged_frame_stops_the_read_where_it_starts() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = writer(tmp.path(), 1 << 20);
        w.push(b"one");
        w.push(b"two");
        w.flush().unwrap();
        let path = w.dir.file(w.seq);
        let whole = std::fs::read(&path).unwrap();
        // Torn: the last frame half written.
        std::fs::write(&path, &whole[..whole.len() - 2]).unwrap();
        let frames = read_frames(&File::open(&path).unwrap(), 0, 4096, usize::MAX).unwrap();
        assert_eq!(frames.payloads().collect::<Vec<_>>(), vec![b"one".as_slice()]);
        assert_eq!((frames.end, frames.tail), (11, Tail::Clean));
        // Damaged: a flipped payload byte.
        let mut bad = whole.clone();
        bad[8 + 3 + 8] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let frames = read_frames(&File::open(&path).unwrap(), 0, 4096, usize::MAX).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames.tail, Tail::Damaged(11));
        // A length past the cap.
        let mut huge = whole;
        huge[11..15].copy_from_slice(&u32::MAX.to_le_bytes());
        std::fs::write(&path, &huge).unwrap();
        let frames = read_frames(&File::open(&path).unwrap(), 0, 4096, usize::MAX).unwrap();
        assert_eq!(frames.tail, Tail::Damaged(11));
    }

    #[test]
    fn a_frame_longer_than_the_read_is_read_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = writer(tmp.path(), 1 << 30);
        w.push(&vec![7u8; 100_000]);
        w.push(b"after");
        w.flush().unwrap();
        let f = File::open(w.dir.file(w.seq)).unwrap();
        let first = read_frames(&f, 0, 4096, usize::MAX).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first.payloads().next().unwrap().len(), 100_000);
        let second = read_frames(&f, first.end, 4096, usize::MAX).unwrap();
        assert_eq!(second.payloads().collect::<Vec<_>>(), vec![b"after".as_slice()]);
    }
}
