//! Token usage read from responses as they stream past, without holding the
//! stream back: OpenAI `usage` (JSON, or the last SSE chunk with
//! `stream_options.include_usage`), Anthropic `message_start` /
//! `message_delta`, Gemini `usageMetadata`.
//!
//! SSE is scanned line by line, keeping only an unfinished line; only `data:`
//! lines that mention usage are parsed. A JSON (non-SSE) body is copied
//! aside up to [`JSON_CAP`] and parsed at the end.

use serde_json::Value;

/// Largest JSON response body kept aside for reading its usage.
pub const JSON_CAP: usize = 4 * 1024 * 1024;
/// Longest SSE line kept while waiting for its end.
const LINE_CAP: usize = 1024 * 1024;

/// Prompt and completion tokens as the provider reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
}

#[derive(Debug, Default)]
enum Mode {
    #[default]
    Off,
    Sse {
        line: Vec<u8>,
    },
    Json {
        body: Vec<u8>,
        overflow: bool,
    },
}

/// Feeds on response chunks; call [`UsageMeter::finish`] at the end.
#[derive(Debug, Default)]
pub struct UsageMeter {
    mode: Mode,
    usage: Usage,
}

impl UsageMeter {
    /// Start metering a response with this `content-type`.
    pub fn for_content_type(content_type: Option<&str>) -> Self {
        let ct = content_type.unwrap_or_default().to_ascii_lowercase();
        let mode = if ct.starts_with("text/event-stream") {
            Mode::Sse { line: Vec::new() }
        } else if ct.starts_with("application/json") {
            Mode::Json {
                body: Vec::new(),
                overflow: false,
            }
        } else {
            Mode::Off
        };
        UsageMeter {
            mode,
            usage: Usage::default(),
        }
    }

    pub fn is_sse(&self) -> bool {
        matches!(self.mode, Mode::Sse { .. })
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        match &mut self.mode {
            Mode::Off => {}
            Mode::Json { body, overflow } => {
                if body.len() + chunk.len() > JSON_CAP {
                    *overflow = true;
                } else if !*overflow {
                    body.extend_from_slice(chunk);
                }
            }
            Mode::Sse { line } => {
                let mut rest = chunk;
                while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
                    let (head, tail) = rest.split_at(nl);
                    rest = &tail[1..];
                    if line.is_empty() {
                        read_sse_line(head, &mut self.usage);
                    } else {
                        line.extend_from_slice(head);
                        read_sse_line(line, &mut self.usage);
                        line.clear();
                    }
                }
                if line.len() + rest.len() <= LINE_CAP {
                    line.extend_from_slice(rest);
                } else {
                    line.clear(); // a pathological line: give up on it
                }
            }
        }
    }

    /// The usage seen; for JSON bodies this parses what was kept.
    pub fn finish(&mut self) -> Usage {
        match &mut self.mode {
            Mode::Json { body, overflow: false } if !body.is_empty() => {
                // Only the usage-bearing fields are materialised; the rest
                // (the completion text) is skipped by the parser.
                if body.first() == Some(&b'[') {
                    // Gemini's non-SSE stream is one JSON array of chunks.
                    if let Ok(items) = serde_json::from_slice::<Vec<UsageFields>>(body) {
                        items.iter().for_each(|i| i.read(&mut self.usage));
                    }
                } else if let Ok(v) = serde_json::from_slice::<UsageFields>(body) {
                    v.read(&mut self.usage);
                }
                body.clear();
            }
            Mode::Sse { line } if !line.is_empty() => {
                let l = std::mem::take(line);
                read_sse_line(&l, &mut self.usage);
            }
            _ => {}
        }
        self.usage
    }
}

/// The parts of a provider message that can carry usage.
#[derive(serde::Deserialize)]
struct UsageFields {
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    message: Option<MessageUsage>,
    #[serde(default, rename = "usageMetadata")]
    usage_metadata: Option<Value>,
}

#[derive(serde::Deserialize)]
struct MessageUsage {
    #[serde(default)]
    usage: Option<Value>,
}

impl UsageFields {
    fn read(&self, usage: &mut Usage) {
        let mut v = serde_json::Map::new();
        if let Some(u) = &self.usage {
            v.insert("usage".into(), u.clone());
        }
        if let Some(u) = self.message.as_ref().and_then(|m| m.usage.as_ref()) {
            v.insert("message".into(), serde_json::json!({ "usage": u }));
        }
        if let Some(u) = &self.usage_metadata {
            v.insert("usageMetadata".into(), u.clone());
        }
        read_usage(&Value::Object(v), usage);
    }
}

fn read_sse_line(line: &[u8], usage: &mut Usage) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(data) = line.strip_prefix(b"data:") else {
        return;
    };
    // Cheap filter: most events carry no usage.
    if !contains(data, b"sage") {
        return;
    }
    if let Ok(v) = serde_json::from_slice::<Value>(data.trim_ascii_start()) {
        read_usage(&v, usage);
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Anthropic's usage object; cache reads and writes count as prompt tokens.
fn read_anthropic(u: &Value, usage: &mut Usage) {
    let cached = ["cache_creation_input_tokens", "cache_read_input_tokens"]
        .iter()
        .filter_map(|k| u.get(*k).and_then(Value::as_u64))
        .sum::<u64>();
    if let Some(i) = u.get("input_tokens").and_then(Value::as_u64) {
        usage.prompt_tokens = Some(i + cached);
    }
    if let Some(o) = u.get("output_tokens").and_then(Value::as_u64) {
        usage.completion_tokens = Some(o);
    }
}

/// Pick usage out of one provider message, whatever its format.
fn read_usage(v: &Value, usage: &mut Usage) {
    let num = |v: &Value| v.as_u64();
    // OpenAI chat/embeddings: {"usage": {"prompt_tokens", "completion_tokens"}}
    if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
        if let Some(p) = u.get("prompt_tokens").and_then(num) {
            usage.prompt_tokens = Some(p);
        }
        if let Some(c) = u.get("completion_tokens").and_then(num) {
            usage.completion_tokens = Some(c);
        }
        // Anthropic: message (non-stream) or message_delta: cumulative output.
        read_anthropic(u, usage);
    }
    // Anthropic stream: message_start carries the input side.
    if let Some(u) = v.get("message").and_then(|m| m.get("usage")) {
        read_anthropic(u, usage);
    }
    // Gemini: usageMetadata, cumulative in every chunk.
    if let Some(u) = v.get("usageMetadata") {
        if let Some(p) = u.get("promptTokenCount").and_then(num) {
            usage.prompt_tokens = Some(p);
        }
        let out = u.get("candidatesTokenCount").and_then(num).unwrap_or(0)
            + u.get("thoughtsTokenCount").and_then(num).unwrap_or(0);
        if u.get("candidatesTokenCount").is_some() || u.get("thoughtsTokenCount").is_some() {
            usage.completion_tokens = Some(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter(ct: &str, chunks: &[&str]) -> Usage {
        let mut m = UsageMeter::for_content_type(Some(ct));
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
                completion_tokens: Some(3)
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
                completion_tokens: Some(7)
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
                completion_tokens: Some(42)
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
                completion_tokens: Some(6)
            }
        );
        let arr = format!("[{},\r\n{}]", chunk(3, 1), chunk(3, 8));
        assert_eq!(
            meter("application/json", &[&arr]),
            Usage {
                prompt_tokens: Some(3),
                completion_tokens: Some(8)
            }
        );
    }

    #[test]
    fn other_content_is_ignored() {
        assert_eq!(meter("text/plain", &["usage: 5"]), Usage::default());
        assert_eq!(meter("application/json", &["{not json"]), Usage::default());
    }
}
