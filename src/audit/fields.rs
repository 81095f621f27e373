//! Hard caps on what one audit row may hold, whatever a client or an
//! upstream sends: without them a request with 60 headers of 4 KB and an
//! 8 KB query was a 250 KB row, and a client could fill the disk with 401s.
//!
//! Every text field is cut on a UTF-8 character boundary and marked
//! (`…[truncated N bytes]`, visible in the admin API's log detail), invalid
//! UTF-8 becomes U+FFFD, and NUL becomes `␀` (U+2400): the cluster's
//! Postgres refuses NUL in `text` and `jsonb`, so it is removed where rows
//! are built. The usual short, clean value is passed through without a copy.

use std::{borrow::Cow, fmt::Write as _};

/// Bytes kept of the request path (before `?`).
pub const PATH_MAX: usize = 2048;
/// Bytes kept of the query string (after `?`), as received.
pub const QUERY_MAX: usize = 2048;
/// Bytes kept of the HTTP method (extension methods are any token).
pub const METHOD_MAX: usize = 32;
/// Bytes kept of the model name.
pub const MODEL_MAX: usize = 256;
/// Bytes kept of the key owner's name (set through the admin API).
pub const OWNER_MAX: usize = 256;
/// Bytes kept of the `User-Agent`.
pub const USER_AGENT_MAX: usize = 512;
/// Bytes kept of the error text (an upstream's error message included).
pub const ERROR_MAX: usize = 1024;
/// Bytes kept of one captured header's name.
pub const HEADER_NAME_MAX: usize = 128;
/// Bytes kept of one captured header's value.
pub const HEADER_VALUE_MAX: usize = 1024;
/// Headers kept per captured header set (request or response).
pub const HEADERS_MAX: usize = 64;
/// Bytes (of JSON) after which no further header is captured; one header
/// more may finish past it, so a set stays under about 19 KiB.
pub const HEADERS_BYTES_MAX: usize = 16 * 1024;
/// The same for the sampled row of a request refused before a route or a
/// key (every byte of it is the sender's choice; see `audit::refused`).
pub const REFUSED_HEADERS_BYTES_MAX: usize = 4 * 1024;

/// What replaces a NUL byte.
const NUL_MARK: &str = "\u{2400}";

/// Whether `s` may be stored as it is under a cap of `max` bytes.
#[inline]
fn fits(s: &str, max: usize) -> bool {
    s.len() <= max && !s.as_bytes().contains(&0)
}

/// `s` cut to at most `max` bytes (plus the mark) and without NUL; borrowed
/// when it already is.
pub fn cap(s: &str, max: usize) -> Cow<'_, str> {
    if fits(s, max) {
        return Cow::Borrowed(s);
    }
    let cut = floor_boundary(s, max);
    let mut out = String::with_capacity(cut + 32);
    push_clean(&mut out, &s[..cut]);
    if cut < s.len() {
        mark(&mut out, Some((s.len() - cut) as u64));
    }
    Cow::Owned(out)
}

/// The largest character boundary of `s` at or before `max` (the
/// standard `floor_char_boundary` is newer than the MSRV).
pub fn floor_boundary(s: &str, max: usize) -> usize {
    if max >= s.len() {
        return s.len();
    }
    // A character is at most 4 bytes: a boundary is within 3 steps back.
    (max.saturating_sub(3)..=max)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

/// [`cap`] for an owned string: no copy when it fits.
pub fn cap_owned(s: String, max: usize) -> String {
    if fits(&s, max) { s } else { cap(&s, max).into_owned() }
}

/// `bytes` as text: lossy UTF-8, capped at `max` and marked like [`cap`].
pub fn cap_bytes(bytes: &[u8], max: usize) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => cap(s, max),
        // Capped after the lossy conversion, which can triple the length
        // (one invalid byte becomes a 3-byte U+FFFD).
        Err(_) => Cow::Owned(cap(&String::from_utf8_lossy(bytes), max).into_owned()),
    }
}

/// The first `max` bytes of a body as text. `total` is the body's whole
/// length when known (the mark then says how much was cut); when unknown,
/// a `body` longer than `max` is marked as cut without a count.
pub fn body_text(body: &[u8], max: usize, total: Option<u64>) -> String {
    let mut head = &body[..body.len().min(max)];
    let cut_short = body.len() > max || total.is_some_and(|t| t > body.len() as u64);
    if cut_short {
        // Never split a character: an incomplete sequence at the cut goes.
        head = &head[..complete_prefix(head)];
    }
    let text = String::from_utf8_lossy(head);
    let mut out = String::with_capacity(text.len() + if cut_short { 32 } else { 0 });
    push_clean(&mut out, &text);
    if cut_short {
        mark(&mut out, total.map(|t| t.saturating_sub(head.len() as u64)));
    }
    out
}

/// `s` appended with each NUL replaced.
fn push_clean(out: &mut String, s: &str) {
    let mut parts = s.split('\0');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    for part in parts {
        out.push_str(NUL_MARK);
        out.push_str(part);
    }
}

/// Append the truncation mark: how many bytes were left out, when known.
pub fn mark(out: &mut String, dropped: Option<u64>) {
    // Writing to a String cannot fail.
    let _ = match dropped {
        Some(n) => write!(out, "…[truncated {n} bytes]"),
        None => write!(out, "…[truncated]"),
    };
}

/// The length of `b` without a UTF-8 sequence left incomplete at its end.
fn complete_prefix(b: &[u8]) -> usize {
    // A sequence is at most 4 bytes: look at the last 3 for its lead byte.
    for back in 1..=b.len().min(3) {
        let at = b.len() - back;
        let byte = b[at];
        if byte & 0xC0 == 0x80 {
            continue; // a continuation byte: its lead is further back
        }
        let need = match byte {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if need > back { at } else { b.len() };
    }
    b.len()
}

/// Captured headers as one JSON object, credentials replaced by `redacted`
/// and every bound above applied (`max_bytes` for the whole set); headers
/// past the bounds are counted in a last `"…"` member (`"[truncated N
/// headers, M bytes]"`).
pub fn headers_json(headers: &http::HeaderMap, redacted_names: &[&str], redacted: &str, max_bytes: usize) -> String {
    // Runs once per request: written straight into one buffer, values
    // escaped by serde_json without a `Value` or a string per header.
    let mut out = Vec::with_capacity((48 * headers.len().max(1)).min(max_bytes));
    out.push(b'{');
    let (mut kept, mut left_headers, mut left_bytes) = (0usize, 0usize, 0usize);
    for (k, v) in headers {
        let (name, bytes) = (k.as_str(), v.as_bytes());
        if kept >= HEADERS_MAX || out.len() >= max_bytes {
            left_headers += 1;
            left_bytes += name.len() + bytes.len();
            continue;
        }
        if kept > 0 {
            out.push(b',');
        }
        kept += 1;
        // Header names are lower-case tokens: nothing to escape, only to cut.
        out.push(b'"');
        out.extend_from_slice(cap(name, HEADER_NAME_MAX).as_bytes());
        out.extend_from_slice(b"\":");
        if redacted_names.contains(&name) {
            out.push(b'"');
            out.extend_from_slice(redacted.as_bytes());
            out.push(b'"');
        } else if bytes.len() <= HEADER_VALUE_MAX
            && bytes
                .iter()
                .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
        {
            // The usual value: short printable ASCII with nothing to escape.
            out.push(b'"');
            out.extend_from_slice(bytes);
            out.push(b'"');
        } else {
            // Serializing a string into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut out, &cap_bytes(bytes, HEADER_VALUE_MAX));
        }
    }
    if left_headers > 0 {
        if kept > 0 {
            out.push(b',');
        }
        let note = format!("[truncated {left_headers} headers, {left_bytes} bytes]");
        let _ = serde_json::to_writer(&mut out, "…");
        out.push(b':');
        let _ = serde_json::to_writer(&mut out, &note);
    }
    out.push(b'}');
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_clean_text_is_not_copied() {
        assert!(matches!(cap("gpt-4o", MODEL_MAX), Cow::Borrowed("gpt-4o")));
    }

    #[test]
    fn cut_on_a_char_boundary_and_marked() {
        let s = format!("{}é", "a".repeat(9)); // é is 2 bytes at 9..11
        assert_eq!(cap(&s, 10), "aaaaaaaaa…[truncated 2 bytes]");
        assert_eq!(cap(&"x".repeat(20), 5), "xxxxx…[truncated 15 bytes]");
    }

    #[test]
    fn nul_is_replaced_everywhere() {
        assert_eq!(cap("a\0b", 10), "a\u{2400}b");
        assert_eq!(body_text(b"x\0y", 10, Some(3)), "x\u{2400}y");
        assert_eq!(cap_bytes(b"\0\xff", 10), "\u{2400}\u{fffd}");
        let invalid = cap_bytes(&[0xff; 600], 512);
        assert!(invalid.len() <= 512 + 40, "{} bytes", invalid.len());
        assert!(invalid.ends_with("bytes]"), "marked as cut: {invalid}");
    }

    #[test]
    fn bodies_keep_whole_characters() {
        let body = "ab€".as_bytes(); // € is 3 bytes at 2..5
        assert_eq!(body_text(body, 4, Some(5)), "ab…[truncated 3 bytes]");
        assert_eq!(body_text(body, 5, Some(5)), "ab€");
        assert_eq!(body_text(b"abcdef", 3, None), "abc…[truncated]");
        assert_eq!(body_text(b"abc", 3, None), "abc");
        assert_eq!(body_text(b"abc", 3, Some(10)), "abc…[truncated 7 bytes]");
        assert_eq!(body_text(b"a\xffb", 3, Some(3)), "a\u{fffd}b");
    }

    #[test]
    fn header_sets_are_bounded() {
        let mut h = http::HeaderMap::new();
        for i in 0..100 {
            let name = http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap();
            h.insert(name, "v".repeat(4096).parse().unwrap());
        }
        let json = headers_json(&h, &[], "[redacted]", HEADERS_BYTES_MAX);
        assert!(json.len() < HEADERS_BYTES_MAX + 3 * HEADER_VALUE_MAX, "{}", json.len());
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let obj = v.as_object().unwrap();
        assert!(obj.len() <= HEADERS_MAX + 1);
        let note = obj["…"].as_str().unwrap();
        assert!(note.starts_with("[truncated ") && note.contains(" headers, "), "{note}");
        let one = obj["x-h0"].as_str().unwrap();
        assert!(one.ends_with("…[truncated 3072 bytes]"), "{one}");
    }
}
