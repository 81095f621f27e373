//! A fixed-memory JSON scanner that finds provider usage objects in a byte
//! stream without parsing (or keeping) the rest of the document.
//!
//! It tracks nesting and string state byte by byte, remembers the first
//! bytes of the last string (a candidate key), and when a `usage` or
//! `usageMetadata` key one or two levels deep opens an object, copies that
//! object (at most [`OBJECT_CAP`] bytes) and parses only it. One or two
//! levels covers every provider: OpenAI and Anthropic bodies and chunks
//! (`usage`), Anthropic `message_start` (`message.usage`), the Responses
//! API's `response.completed` (`response.usage`), Gemini chunks and the
//! elements of Gemini's JSON-array stream (`usageMetadata`). Deeper keys
//! (a tool schema's property named `usage`) are ignored.

use super::Usage;
use memchr::memchr2;
use serde::Deserialize;

/// Largest usage object kept for parsing; real ones are a few hundred bytes.
const OBJECT_CAP: usize = 4096;
/// Longest key remembered; longer strings can never be one we look for.
const KEY_CAP: usize = 16;

/// The keys whose object values are usage objects.
fn is_usage_key(s: &[u8]) -> bool {
    matches!(s, b"usage" | b"usageMetadata")
}

/// Scanner state for one JSON text (or a sequence of them).
#[derive(Debug, Default)]
pub struct JsonScan {
    depth: u32,
    in_string: bool,
    escape: bool,
    /// The current string's first bytes, and whether it was longer.
    key: [u8; KEY_CAP],
    key_len: usize,
    key_long: bool,
    /// A string just closed was `usage`/`usageMetadata` (if it is a key).
    last_string: bool,
    /// `"usage":` seen; waiting for the value.
    pending: bool,
    /// The usage object being copied, with the depth it closes at.
    capture: Option<(Vec<u8>, u32)>,
}

impl JsonScan {
    /// Start over (a new SSE event).
    pub fn reset(&mut self) {
        self.depth = 0;
        self.in_string = false;
        self.escape = false;
        self.last_string = false;
        self.pending = false;
        self.capture = None;
    }

    /// Scan `data`, updating `usage` from every usage object that completes.
    pub fn feed(&mut self, mut data: &[u8], usage: &mut Usage) {
        while !data.is_empty() {
            if self.in_string {
                data = self.string_bytes(data);
                continue;
            }
            let b = data[0];
            data = &data[1..];
            self.structural(b, usage);
        }
    }

    /// Inside a string: jump to the next quote or backslash.
    fn string_bytes<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        if self.escape {
            self.escape = false;
            self.key_long = true; // keys we look for have no escapes
            self.copy(&data[..1]);
            return &data[1..];
        }
        let Some(i) = memchr2(b'"', b'\\', data) else {
            self.key_text(data);
            self.copy(data);
            return &[];
        };
        self.key_text(&data[..i]);
        self.copy(&data[..=i]);
        if data[i] == b'\\' {
            self.escape = true;
        } else {
            self.in_string = false;
            self.last_string = !self.key_long && is_usage_key(&self.key[..self.key_len]);
        }
        &data[i + 1..]
    }

    fn key_text(&mut self, s: &[u8]) {
        if self.key_long {
            return;
        }
        if self.key_len + s.len() > KEY_CAP {
            self.key_long = true;
        } else {
            self.key[self.key_len..self.key_len + s.len()].copy_from_slice(s);
            self.key_len += s.len();
        }
    }

    fn structural(&mut self, b: u8, usage: &mut Usage) {
        match b {
            b'"' => {
                self.copy(&[b]);
                self.in_string = true;
                self.key_len = 0;
                self.key_long = false;
                self.last_string = false;
            }
            b':' => {
                self.copy(&[b]);
                self.pending = std::mem::take(&mut self.last_string) && matches!(self.depth, 1 | 2);
            }
            b'{' | b'[' => {
                // Both keys parse into the same fields; the names differ.
                if b == b'{' && self.capture.is_none() && self.pending {
                    let mut buf = Vec::with_capacity(256);
                    buf.push(b);
                    // The object closes when depth drops back to this level.
                    self.capture = Some((buf, self.depth));
                } else {
                    self.copy(&[b]);
                }
                self.pending = false;
                self.last_string = false;
                self.depth = self.depth.saturating_add(1);
            }
            b'}' | b']' => {
                self.copy(&[b]);
                self.depth = self.depth.saturating_sub(1);
                self.pending = false;
                self.last_string = false;
                if let Some((_, at)) = &self.capture
                    && *at == self.depth
                    && let Some((buf, _)) = self.capture.take()
                {
                    read_counts(&buf, usage);
                }
            }
            b' ' | b'\t' | b'\r' | b'\n' => self.copy(&[b]),
            _ => {
                // Numbers, literals, commas: no key can be pending past them.
                self.copy(&[b]);
                self.pending = false;
                self.last_string = false;
            }
        }
    }

    /// Append to the usage object being copied; an oversized one is dropped.
    fn copy(&mut self, s: &[u8]) {
        if let Some((buf, _)) = &mut self.capture {
            if buf.len() + s.len() > OBJECT_CAP {
                self.capture = None;
            } else {
                buf.extend_from_slice(s);
            }
        }
    }
}

/// Every token field any provider puts in its usage object.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Counts {
    // OpenAI chat / completions / embeddings
    #[serde(rename = "prompt_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(rename = "completion_tokens")]
    completion_tokens: Option<u64>,
    // Anthropic; the OpenAI Responses API uses the same two names
    #[serde(rename = "input_tokens")]
    input_tokens: Option<u64>,
    #[serde(rename = "output_tokens")]
    output_tokens: Option<u64>,
    #[serde(rename = "cache_creation_input_tokens")]
    cache_creation_input_tokens: Option<u64>,
    #[serde(rename = "cache_read_input_tokens")]
    cache_read_input_tokens: Option<u64>,
    // Gemini usageMetadata
    prompt_token_count: Option<u64>,
    candidates_token_count: Option<u64>,
    thoughts_token_count: Option<u64>,
}

/// Parse one usage object and merge what it says into `usage`. Later
/// objects win: providers report cumulative counts.
fn read_counts(object: &[u8], usage: &mut Usage) {
    let Ok(c) = serde_json::from_slice::<Counts>(object) else {
        return;
    };
    let prompt = c.prompt_tokens.or(c.prompt_token_count).or_else(|| {
        // Anthropic counts cache reads and writes apart from input_tokens.
        c.input_tokens
            .map(|i| i + c.cache_creation_input_tokens.unwrap_or(0) + c.cache_read_input_tokens.unwrap_or(0))
    });
    let completion = c.completion_tokens.or(c.output_tokens).or_else(|| {
        (c.candidates_token_count.is_some() || c.thoughts_token_count.is_some())
            .then(|| c.candidates_token_count.unwrap_or(0) + c.thoughts_token_count.unwrap_or(0))
    });
    if prompt.is_some() {
        usage.prompt_tokens = prompt;
    }
    if completion.is_some() {
        usage.completion_tokens = completion;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(parts: &[&str]) -> Usage {
        let mut s = JsonScan::default();
        let mut u = Usage::default();
        parts.iter().for_each(|p| s.feed(p.as_bytes(), &mut u));
        u
    }

    fn scan_bytewise(text: &str) -> Usage {
        let mut s = JsonScan::default();
        let mut u = Usage::default();
        text.as_bytes().chunks(1).for_each(|b| s.feed(b, &mut u));
        u
    }

    #[test]
    fn finds_usage_at_the_top_level_whatever_the_split() {
        let body = r#"{"id":"x","choices":[{"message":{"content":"the \"usage\": {\"prompt_tokens\": 1}"}}],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12,"prompt_tokens_details":{"cached_tokens":0}}}"#;
        let want = Usage {
            prompt_tokens: Some(9),
            completion_tokens: Some(3),
        };
        assert_eq!(scan_all(&[body]), want);
        assert_eq!(scan_bytewise(body), want);
        for cut in 0..body.len() {
            assert_eq!(scan_all(&[&body[..cut], &body[cut..]]), want, "cut at {cut}");
        }
    }

    #[test]
    fn ignores_deep_keys_and_keys_in_strings() {
        let body = r#"{"tools":[{"parameters":{"properties":{"usage":{"prompt_tokens":1000}}}}],"text":"\"usage\":{\"prompt_tokens\":5}"}"#;
        assert_eq!(scan_all(&[body]), Usage::default());
    }

    #[test]
    fn responses_api_and_anthropic_nesting() {
        let done = r#"{"type":"response.completed","response":{"id":"r","output":[],"usage":{"input_tokens":20,"input_tokens_details":{"cached_tokens":4},"output_tokens":7,"total_tokens":27}}}"#;
        assert_eq!(
            scan_all(&[done]),
            Usage {
                prompt_tokens: Some(20),
                completion_tokens: Some(7)
            }
        );
        let start = r#"{"type":"message_start","message":{"usage":{"input_tokens":10,"cache_creation_input_tokens":5,"cache_read_input_tokens":90,"output_tokens":1}}}"#;
        assert_eq!(
            scan_all(&[start]),
            Usage {
                prompt_tokens: Some(105),
                completion_tokens: Some(1)
            }
        );
    }

    #[test]
    fn gemini_array_elements() {
        let arr = r#"[{"candidates":[],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":1}},
{"candidates":[],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":8,"thoughtsTokenCount":2}}]"#;
        assert_eq!(
            scan_all(&[arr]),
            Usage {
                prompt_tokens: Some(3),
                completion_tokens: Some(10)
            }
        );
    }

    #[test]
    fn an_oversized_usage_object_is_dropped_not_kept() {
        let big = format!(
            r#"{{"usage":{{"pad":"{}","prompt_tokens":1}}}}"#,
            "x".repeat(OBJECT_CAP)
        );
        assert_eq!(scan_all(&[&big]), Usage::default());
    }
}
