//! Removes OpenAI's usage-only stream chunk (`"choices": []` with `usage`)
//! from what a client receives when FastGate, not the client, asked for it
//! with `stream_options.include_usage`: clients that index `choices[0]` on
//! every chunk would break on it.
//!
//! Complete events pass through untouched (zero-copy); only the tail of an
//! event cut by a read boundary is held until its end, at most
//! [`HOLD_CAP`] bytes.

use bytes::{Bytes, BytesMut};
use memchr::memmem;

/// An event longer than this cannot be the small usage chunk: pass it on.
const HOLD_CAP: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct UsageChunkFilter {
    held: BytesMut,
}

impl UsageChunkFilter {
    /// The part of `data` (after what was held) that may go to the client now.
    pub fn filter(&mut self, data: Bytes) -> Bytes {
        let buf = if self.held.is_empty() {
            data
        } else {
            self.held.extend_from_slice(&data);
            self.held.split().freeze()
        };
        let Some(end) = last_event_end(&buf) else {
            if buf.len() > HOLD_CAP {
                return buf;
            }
            self.held.extend_from_slice(&buf);
            return Bytes::new();
        };
        if end < buf.len() {
            self.held.extend_from_slice(&buf[end..]);
        }
        let complete = buf.slice(..end);
        if !may_hold_usage(&complete) {
            return complete;
        }
        // Parsed event by event; the bytes are copied only when one goes.
        let mut kept: Vec<std::ops::Range<usize>> = Vec::new();
        let mut dropped = false;
        let mut at = 0;
        while at < complete.len() {
            let n = first_event_end(&complete[at..]).unwrap_or(complete.len() - at);
            if is_usage_only(&complete[at..at + n]) {
                dropped = true;
            } else {
                kept.push(at..at + n);
            }
            at += n;
        }
        if !dropped {
            return complete;
        }
        let mut out = BytesMut::with_capacity(complete.len());
        for r in kept {
            out.extend_from_slice(&complete[r]);
        }
        out.freeze()
    }

    /// Whatever is still held, at the end of the stream.
    pub fn flush(&mut self) -> Bytes {
        self.held.split().freeze()
    }
}

/// The end (exclusive) of the first event: after its blank line.
fn first_event_end(data: &[u8]) -> Option<usize> {
    let lf = memmem::find(data, b"\n\n").map(|i| i + 2);
    let crlf = memmem::find(data, b"\n\r\n").map(|i| i + 3);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The end (exclusive) of the last complete event.
fn last_event_end(data: &[u8]) -> Option<usize> {
    let lf = memmem::rfind(data, b"\n\n").map(|i| i + 2);
    let crlf = memmem::rfind(data, b"\n\r\n").map(|i| i + 3);
    lf.max(crlf)
}

/// Whether `events` may hold a usage-only chunk, a cheap test before any
/// parsing: its JSON names `usage`, literally or through a `\u` escape.
/// Whitespace and key order do not matter here (servers differ: Python's
/// `json.dumps` writes `"choices": []`); the decision is [`is_usage_only`]'s,
/// on the parsed event.
fn may_hold_usage(events: &[u8]) -> bool {
    memmem::find(events, b"usage").is_some() || memmem::find(events, b"\\u").is_some()
}

/// An event whose data is a chunk with no choices and a usage object.
fn is_usage_only(event: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Chunk {
        choices: Option<Vec<serde::de::IgnoredAny>>,
        usage: Option<serde::de::IgnoredAny>,
    }
    let text = String::from_utf8_lossy(event);
    let data: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim_start)
        .collect::<Vec<_>>()
        .join("\n");
    serde_json::from_str::<Chunk>(&data).is_ok_and(|c| c.choices.is_some_and(|c| c.is_empty()) && c.usage.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTENT: &str = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n";
    const USAGE: &str =
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    fn run(stream: &str, chunk: usize) -> String {
        let mut f = UsageChunkFilter::default();
        let mut out = Vec::new();
        for part in stream.as_bytes().chunks(chunk) {
            out.extend_from_slice(&f.filter(Bytes::copy_from_slice(part)));
        }
        out.extend_from_slice(&f.flush());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn drops_only_the_usage_chunk_however_the_stream_is_cut() {
        let stream = format!("{CONTENT}{CONTENT}{USAGE}{DONE}");
        for chunk in [1, 3, 17, 64, stream.len()] {
            assert_eq!(
                run(&stream, chunk),
                format!("{CONTENT}{CONTENT}{DONE}"),
                "chunks of {chunk}"
            );
        }
        let crlf = stream.replace('\n', "\r\n");
        assert_eq!(run(&crlf, 5), format!("{CONTENT}{CONTENT}{DONE}").replace('\n', "\r\n"));
    }

    #[test]
    fn complete_events_pass_without_copy_and_unfinished_tails_wait() {
        let mut f = UsageChunkFilter::default();
        let data = Bytes::from(format!("{CONTENT}{CONTENT}"));
        let out = f.filter(data.clone());
        assert_eq!(out.as_ptr(), data.as_ptr());
        assert!(f.filter(Bytes::from_static(b"data: {\"id\"")).is_empty());
        assert_eq!(&f.flush()[..], b"data: {\"id\"");
    }

    #[test]
    fn the_decision_is_on_parsed_json_whatever_the_spelling() {
        // Python servers: spaces after separators; others reorder keys, or
        // escape names; usage can come after the finish chunk.
        let finish = "data: {\"id\": \"c\", \"choices\": [{\"index\": 0, \"delta\": {}, \"finish_reason\": \"stop\"}], \"usage\": null}\n\n";
        for usage in [
            "data: {\"id\": \"c\", \"choices\": [], \"usage\": {\"prompt_tokens\": 5}}\n\n",
            "data: {\"usage\":{\"prompt_tokens\":5},\"id\":\"c\",\"choices\":[ ]}\n\n",
            "data:{\ndata:\"choices\" :\t[\ndata:],\ndata:\"\\u0075sage\": {\"total_tokens\": 1}}\n\n",
        ] {
            let stream = format!("{CONTENT}{finish}{usage}{DONE}");
            for chunk in [1, 7, stream.len()] {
                assert_eq!(
                    run(&stream, chunk),
                    format!("{CONTENT}{finish}{DONE}"),
                    "{usage:?} in chunks of {chunk}"
                );
            }
        }
    }

    #[test]
    fn chunks_with_a_null_usage_pass_without_copy() {
        let mut f = UsageChunkFilter::default();
        let data = Bytes::from("data: {\"choices\": [{\"delta\": {}}], \"usage\": null}\n\n");
        assert_eq!(f.filter(data.clone()).as_ptr(), data.as_ptr());
    }

    #[test]
    fn an_empty_choices_chunk_without_usage_stays() {
        let odd = "data: {\"choices\":[]}\n\n";
        assert_eq!(run(odd, 4), odd);
    }
}
