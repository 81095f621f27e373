//! Token usage read from responses as they stream past, without holding the
//! stream back or keeping the body: OpenAI `usage` (JSON, the last SSE chunk
//! with `stream_options.include_usage`, the Responses API's
//! `response.usage`), Anthropic `message_start` / `message_delta`, Gemini
//! `usageMetadata`.
//!
//! The bytes the client receives are left alone. A copy is decoded here when
//! the upstream compressed the answer (gzip, deflate, br, zstd: SDKs ask for
//! compression), then scanned with a fixed amount of memory: SSE line by
//! line, JSON by [`scan::JsonScan`]. The same decoded copy feeds the audit
//! log's (capped) body capture.

pub mod chunk_filter;
mod decode;
pub mod estimate;
pub mod scan;

use decode::Decoding;
use memchr::memchr;
use scan::JsonScan;

/// Tokens as the provider reported them. `prompt_tokens` counts every
/// input token, cached ones included (Anthropic's three input counts are
/// summed); `completion_tokens` every output token, reasoning included.
/// The parts are what pricing needs apart: cache reads and writes bill at
/// their own rates, reasoning (where a table prices it apart) at its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// The share of `prompt_tokens` read from the provider's prompt cache.
    pub cache_read_tokens: Option<u64>,
    /// The share of `prompt_tokens` written to it (Anthropic).
    pub cache_write_tokens: Option<u64>,
    /// The share of `completion_tokens` spent reasoning.
    pub reasoning_tokens: Option<u64>,
}

/// `usage` as pricing counts it (absent counts are none).
pub fn priced(usage: &Usage) -> crate::pricing::Tokens {
    crate::pricing::Tokens {
        prompt: usage.prompt_tokens.unwrap_or(0),
        completion: usage.completion_tokens.unwrap_or(0),
        cache_read: usage.cache_read_tokens.unwrap_or(0),
        cache_write: usage.cache_write_tokens.unwrap_or(0),
        reasoning: usage.reasoning_tokens.unwrap_or(0),
    }
}

/// How the (decoded) body is read for usage.
#[derive(Debug, Default)]
enum Scanner {
    #[default]
    Off,
    Sse(SseScan),
    Json(JsonScan),
}

/// What is kept of the decoded body for the audit log.
enum Capture {
    /// The first bytes, up to the cap.
    Raw(Vec<u8>, usize),
    /// A streamed answer merged as it passes (`audit.merge_streams`).
    Merge(Box<crate::audit::merge::StreamMerge>),
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Capture::Raw(b, cap) => write!(f, "Raw({} of {cap})", b.len()),
            Capture::Merge(_) => f.write_str("Merge"),
        }
    }
}

/// Where decoded bytes go: the usage scanner and the optional capture.
#[derive(Debug, Default)]
struct Sink {
    scanner: Scanner,
    usage: Usage,
    capture: Option<Capture>,
    decoded: u64,
    /// SSE `data:` lines seen (about one token each: see `estimate`).
    data_lines: u64,
}

/// Decoded bytes past which a compressed answer is no longer read (a
/// decompression bomb costs CPU, never memory, but not without end).
const DECODED_CAP: u64 = 256 * 1024 * 1024;

/// A small whole body (an error answer) decoded per its `Content-Encoding`,
/// at most `cap` decoded bytes kept.
pub fn decode_small(encoding: Option<&str>, body: &[u8], cap: usize) -> Vec<u8> {
    struct Capped(Vec<u8>, usize);
    impl std::io::Write for Capped {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let room = self.1.saturating_sub(self.0.len());
            self.0.extend_from_slice(&buf[..buf.len().min(room)]);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut d = Decoding::new(encoding, Capped(Vec::new(), cap));
    d.write(body);
    d.finish();
    d.sink_mut().map(|c| std::mem::take(&mut c.0)).unwrap_or_default()
}

/// A body decoded per its `Content-Encoding` a piece at a time, for
/// conversion, which reads JSON and events, not gzip: FastGate asks
/// upstreams for `identity`, and some compress anyway. Past `cap` decoded
/// bytes in all nothing more is decoded (a stream then reads as cut short,
/// a whole answer as not JSON).
pub struct PlainBody(Option<Decoding<Drained>>);

#[derive(Default)]
struct Drained {
    buf: Vec<u8>,
    left: usize,
}

impl std::io::Write for Drained {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() > self.left {
            return Err(std::io::Error::other("decoded body over its bound"));
        }
        self.left -= buf.len();
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl PlainBody {
    /// For a body sent with `encoding` (none or `identity`: read as is).
    pub fn new(encoding: Option<&str>, cap: usize) -> Self {
        let encoded = encoding
            .map(str::trim)
            .is_some_and(|e| !e.is_empty() && !e.eq_ignore_ascii_case("identity"));
        let sink = Drained {
            buf: Vec::new(),
            left: cap,
        };
        PlainBody(encoded.then(|| Decoding::new(encoding, sink)))
    }

    /// `chunk` as plain bytes (itself when the body is not encoded).
    pub fn decode<'a>(&mut self, chunk: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        match &mut self.0 {
            None => std::borrow::Cow::Borrowed(chunk),
            Some(d) => {
                d.write(chunk);
                std::borrow::Cow::Owned(d.sink_mut().map(|s| std::mem::take(&mut s.buf)).unwrap_or_default())
            }
        }
    }

    /// The body ended: what the decoder still held.
    pub fn end(&mut self) -> Vec<u8> {
        match &mut self.0 {
            None => Vec::new(),
            Some(d) => {
                d.finish();
                d.sink_mut().map(|s| std::mem::take(&mut s.buf)).unwrap_or_default()
            }
        }
    }

    /// A whole body, decoded.
    pub fn whole<'a>(encoding: Option<&str>, body: &'a [u8], cap: usize) -> std::borrow::Cow<'a, [u8]> {
        let mut p = PlainBody::new(encoding, cap);
        match p.decode(body) {
            std::borrow::Cow::Borrowed(b) => std::borrow::Cow::Borrowed(b),
            std::borrow::Cow::Owned(mut v) => {
                v.extend(p.end());
                std::borrow::Cow::Owned(v)
            }
        }
    }
}

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.decoded += buf.len() as u64;
        if self.decoded > DECODED_CAP {
            return Err(std::io::Error::other("decoded body too large to meter"));
        }
        match &mut self.scanner {
            Scanner::Off => {}
            Scanner::Sse(s) => self.data_lines += s.feed(buf, &mut self.usage),
            Scanner::Json(j) => j.feed(buf, &mut self.usage),
        }
        match &mut self.capture {
            Some(Capture::Raw(body, cap)) => {
                let room = cap.saturating_sub(body.len());
                body.extend_from_slice(&buf[..buf.len().min(room)]);
            }
            Some(Capture::Merge(m)) => {
                m.feed(buf);
                if m.declined() {
                    // Not a stream after all: its bytes are kept as they are.
                    let cap = m.cap() + 1;
                    let mut raw = m.take_undecided();
                    raw.truncate(cap);
                    self.capture = Some(Capture::Raw(raw, cap));
                }
            }
            None => {}
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Feeds on response chunks as they reach the client; call
/// [`UsageMeter::finish`] at the end.
#[derive(Default)]
pub struct UsageMeter {
    decoding: Decoding<Sink>,
    sse: bool,
}

impl UsageMeter {
    /// Start metering a response with this `content-type` and
    /// `content-encoding`; `capture` keeps up to that many decoded bytes.
    pub fn new(content_type: Option<&str>, content_encoding: Option<&str>, capture: Option<usize>) -> Self {
        let ct = content_type.unwrap_or_default().trim_start().as_bytes();
        let is = |prefix: &str| ct.len() >= prefix.len() && ct[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes());
        let essence = ct.split(|&b| b == b';').next().unwrap_or_default();
        let json_suffix = essence.len() >= 5 && essence[essence.len() - 5..].eq_ignore_ascii_case(b"+json");
        let scanner = if is("text/event-stream") {
            Scanner::Sse(SseScan::default())
        } else if is("application/json") || json_suffix || is("application/x-ndjson") {
            Scanner::Json(JsonScan::default())
        } else {
            Scanner::Off
        };
        let sse = matches!(scanner, Scanner::Sse(_));
        if matches!(scanner, Scanner::Off) && capture.is_none() {
            return UsageMeter::default();
        }
        let sink = Sink {
            scanner,
            capture: capture.map(|cap| Capture::Raw(Vec::new(), cap)),
            ..Sink::default()
        };
        UsageMeter {
            decoding: Decoding::new(content_encoding, sink),
            sse,
        }
    }

    pub fn is_sse(&self) -> bool {
        self.sse
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        self.decoding.write(chunk);
    }

    /// The usage seen, after the decoder's last bytes.
    pub fn finish(&mut self) -> Usage {
        self.decoding.finish();
        self.decoding.sink().map_or_else(Usage::default, |s| s.usage)
    }

    /// Completion tokens estimated from the answer seen so far (for a
    /// request that ends without usage): one per SSE `data:` line, or the
    /// decoded bytes / [`estimate::BYTES_PER_TOKEN`] of any other body.
    pub fn seen_tokens(&self) -> u64 {
        self.decoding.sink().map_or(0, |s| match s.scanner {
            Scanner::Sse(_) => s.data_lines,
            _ => s.decoded / estimate::BYTES_PER_TOKEN,
        })
    }

    /// The model the answer named (its first `model` / `modelVersion`).
    pub fn response_model(&self) -> Option<&str> {
        self.decoding.sink().and_then(|s| match &s.scanner {
            Scanner::Sse(sse) => sse.json.model(),
            Scanner::Json(j) => j.model(),
            Scanner::Off => None,
        })
    }

    /// Whether the answer sent a usage object that could not be read or
    /// believed (then the request is charged its estimate).
    pub fn usage_unreadable(&self) -> bool {
        self.decoding.sink().is_some_and(|s| match &s.scanner {
            Scanner::Sse(sse) => sse.json.usage_unreadable(),
            Scanner::Json(j) => j.usage_unreadable(),
            Scanner::Off => false,
        })
    }

    /// The answer's own id, the first it gave.
    pub fn response_id(&self) -> Option<&str> {
        self.decoding.sink().and_then(|s| match &s.scanner {
            Scanner::Sse(sse) => sse.json.response_id(),
            Scanner::Json(j) => j.response_id(),
            Scanner::Off => None,
        })
    }

    /// Why the answer ended, as its provider said last.
    pub fn finish_reason(&self) -> Option<&str> {
        self.decoding.sink().and_then(|s| match &s.scanner {
            Scanner::Sse(sse) => sse.json.finish_reason(),
            Scanner::Json(j) => j.finish_reason(),
            Scanner::Off => None,
        })
    }

    /// Capture `merge`'s merged answer instead of the body's first bytes
    /// (only when the body is captured at all).
    pub fn merge_stream(&mut self, merge: crate::audit::merge::StreamMerge) {
        if let Some(sink) = self.decoding.sink_mut()
            && sink.capture.is_some()
        {
            sink.capture = Some(Capture::Merge(Box::new(merge)));
        }
    }

    /// The captured (decoded, capped) body, once: a merged stream's answer
    /// as JSON text, else the body's first bytes.
    pub fn take_capture(&mut self) -> Option<Vec<u8>> {
        match self.decoding.sink_mut().and_then(|s| s.capture.take())? {
            Capture::Raw(b, _) => Some(b),
            Capture::Merge(mut m) => Some(match m.finish() {
                Some(json) => json.into_bytes(),
                None => m.take_undecided(),
            }),
        }
    }
}

/// Where the SSE scanner is within the current line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Reading the first bytes, to tell a `data:` line from the rest.
    #[default]
    Start,
    Data,
    Skip,
}

/// SSE framing: `data:` lines go to the JSON scanner, which starts over at
/// every event (blank line). Holds no line buffer.
#[derive(Debug, Default)]
struct SseScan {
    line: Line,
    prefix_len: usize,
    json: JsonScan,
}

impl SseScan {
    /// Scan `data`; returns how many `data:` lines began in it.
    fn feed(&mut self, mut data: &[u8], usage: &mut Usage) -> u64 {
        const DATA: &[u8] = b"data:";
        let mut lines = 0;
        while let Some((&b, rest)) = data.split_first() {
            match self.line {
                Line::Start => {
                    data = rest;
                    match b {
                        b'\n' => {
                            if self.prefix_len == 0 {
                                self.json.reset(); // blank line: the event ends
                            }
                            self.prefix_len = 0;
                        }
                        b'\r' if self.prefix_len == 0 => {}
                        _ if DATA[self.prefix_len] == b => {
                            self.prefix_len += 1;
                            if self.prefix_len == DATA.len() {
                                self.line = Line::Data;
                                lines += 1;
                            }
                        }
                        _ => {
                            self.prefix_len += 1;
                            self.line = Line::Skip;
                        }
                    }
                }
                Line::Data | Line::Skip => {
                    let end = memchr(b'\n', data);
                    let line = &data[..end.unwrap_or(data.len())];
                    if self.line == Line::Data {
                        self.json.feed(line, usage);
                    }
                    match end {
                        Some(i) => {
                            data = &data[i + 1..];
                            self.line = Line::Start;
                            self.prefix_len = 0;
                        }
                        None => data = &[],
                    }
                }
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter(ct: &str, chunks: &[&str]) -> Usage {
        let mut m = UsageMeter::new(Some(ct), None, None);
        chunks.iter().for_each(|c| m.feed(c.as_bytes()));
        m.finish()
    }

    #[test]
    fn openai_json_and_stream() {
        let u = meter(
            "application/json",
            &[
                r#"{"id":"x","usage":{"prompt_tokens":9,"#,
                r#""completion_tokens":3,"total_tokens":12}}"#,
            ],
        );
        assert_eq!(
            u,
            Usage {
                prompt_tokens: Some(9),
                completion_tokens: Some(3),
                ..Default::default()
            }
        );
        let u = meter(
            "text/event-stream",
            &[
                "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\nda",
                "ta: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}\n\ndata: [DONE]\n\n",
            ],
        );
        assert_eq!(
            u,
            Usage {
                prompt_tokens: Some(5),
                completion_tokens: Some(7),
                ..Default::default()
            }
        );
    }

    #[test]
    fn anthropic_stream_with_split_lines_and_cache_tokens() {
        let u = meter(
            "text/event-stream; charset=utf-8",
            &[
                "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":90,\"output_tokens\":1}}}\r\n\r\n",
                "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"usage\"}}\n\n",
                "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":",
                "42}}\n\n",
            ],
        );
        assert_eq!(
            u,
            Usage {
                prompt_tokens: Some(100),
                completion_tokens: Some(42),
                cache_read_tokens: Some(90),
                ..Default::default()
            }
        );
    }

    #[test]
    fn gemini_sse_and_json_array() {
        let chunk = |p: u64, c: u64| {
            format!("{{\"candidates\":[],\"usageMetadata\":{{\"promptTokenCount\":{p},\"candidatesTokenCount\":{c}}}}}")
        };
        let sse = format!("data: {}\n\ndata: {}\n\n", chunk(4, 1), chunk(4, 6));
        assert_eq!(
            meter("text/event-stream", &[&sse]),
            Usage {
                prompt_tokens: Some(4),
                completion_tokens: Some(6),
                ..Default::default()
            }
        );
        let arr = format!("[{},\r\n{}]", chunk(3, 1), chunk(3, 8));
        assert_eq!(
            meter("application/json", &[&arr]),
            Usage {
                prompt_tokens: Some(3),
                completion_tokens: Some(8),
                ..Default::default()
            }
        );
    }

    #[test]
    fn a_corrupt_or_unknown_encoding_meters_nothing_and_does_not_panic() {
        let mut m = UsageMeter::new(Some("application/json"), Some("gzip"), Some(16));
        m.feed(b"\x1f\x8bnot really gzip at all");
        assert_eq!(m.finish(), Usage::default());
        let mut m = UsageMeter::new(Some("application/json"), Some("compress"), None);
        m.feed(br#"{"usage":{"prompt_tokens":1}}"#);
        assert_eq!(m.finish(), Usage::default());
    }

    #[test]
    fn content_types_are_matched_without_regard_to_case_and_parameters() {
        let body = r#"{"usage":{"prompt_tokens":2,"completion_tokens":3}}"#;
        for ct in [
            "Application/JSON; charset=utf-8",
            "application/vnd.example+json",
            "application/x-ndjson",
        ] {
            assert_eq!(meter(ct, &[body]).completion_tokens, Some(3), "{ct}");
        }
        assert_eq!(meter("text/plain; x=+json", &[body]), Usage::default());
    }

    #[test]
    fn seen_tokens_count_sse_data_lines_or_json_bytes() {
        let mut m = UsageMeter::new(Some("text/event-stream"), None, None);
        m.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\nda");
        m.feed(b"ta: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n: comment\n\n");
        assert_eq!(m.seen_tokens(), 2);
        let mut m = UsageMeter::new(Some("application/json"), None, None);
        m.feed(&[b' '; 400]);
        assert_eq!(m.seen_tokens(), 100);
        assert_eq!(UsageMeter::default().seen_tokens(), 0);
    }

    #[test]
    fn other_content_is_ignored() {
        assert_eq!(meter("text/plain", &["usage: 5"]), Usage::default());
        assert_eq!(meter("application/json", &["{not json"]), Usage::default());
    }
}
