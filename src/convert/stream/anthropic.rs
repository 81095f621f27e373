//! Anthropic Messages streams (`message_start` … `message_stop`) ⇄ deltas.

use super::{Decoder, Delta, Encoder, ErrorKind, sse_frame};
use crate::convert::{
    anthropic::{finish_from_wire, finish_to_wire, usage_to_wire},
    ir::{Finish, Usage},
    opt_str, opt_u64,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::{borrow::Cow, collections::HashMap};

/// The hot event (`content_block_delta`), read without building a tree.
#[derive(Deserialize)]
struct DeltaEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    index: u64,
    #[serde(borrow)]
    delta: Option<DeltaIn<'a>>,
}

#[derive(Deserialize)]
struct DeltaIn<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    thinking: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    signature: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    partial_json: Option<Cow<'a, str>>,
}

/// A `content_block_delta` as written.
#[derive(Serialize)]
struct DeltaEventOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u64,
    delta: DeltaOut<'a>,
}

#[derive(Serialize)]
struct DeltaOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signature: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    partial_json: Option<&'a str>,
}

impl<'a> DeltaOut<'a> {
    fn new(kind: &'static str) -> Self {
        DeltaOut {
            kind,
            text: None,
            thinking: None,
            signature: None,
            partial_json: None,
        }
    }
}

/// Reads an Anthropic upstream's stream.
#[derive(Debug, Default)]
pub struct AnthropicDecoder {
    /// Our tool index of each tool_use block, by the upstream's block index.
    tool_blocks: HashMap<u64, usize>,
    tools: usize,
    /// Usage is reported in pieces (`message_start`, then cumulative
    /// `message_delta`s): kept whole here.
    usage: Usage,
}

impl Decoder for AnthropicDecoder {
    fn decode(&mut self, event: Option<&str>, data: &str, out: &mut Vec<Delta>) {
        // Most events are deltas: read those typed, the rest as a tree.
        if event.is_none_or(|e| e == "content_block_delta")
            && let Ok(e) = serde_json::from_str::<DeltaEvent>(data)
            && e.kind == "content_block_delta"
        {
            self.delta(e, out);
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return;
        };
        let kind = opt_str(&v, "type").or(event).unwrap_or_default();
        match kind {
            "message_start" => {
                let m = v.get("message").unwrap_or(&Value::Null);
                self.merge_usage(m.get("usage"));
                out.push(Delta::Start {
                    id: opt_str(m, "id").unwrap_or_default().to_string(),
                    model: opt_str(m, "model").unwrap_or_default().to_string(),
                });
            }
            "content_block_start" => {
                let b = v.get("content_block").unwrap_or(&Value::Null);
                match opt_str(b, "type") {
                    Some("text") => {
                        if let Some(t) = opt_str(b, "text").filter(|t| !t.is_empty()) {
                            out.push(Delta::Text(t.to_string()));
                        }
                    }
                    Some("thinking") => {
                        if let Some(t) = opt_str(b, "thinking").filter(|t| !t.is_empty()) {
                            out.push(Delta::Thinking(t.to_string()));
                        }
                    }
                    Some("redacted_thinking") => {
                        out.push(Delta::RedactedThinking(
                            opt_str(b, "data").unwrap_or_default().to_string(),
                        ));
                    }
                    Some("tool_use") => {
                        let index = self.tools;
                        self.tools += 1;
                        self.tool_blocks.insert(opt_u64(&v, "index").unwrap_or(0), index);
                        out.push(Delta::ToolStart {
                            index,
                            id: opt_str(b, "id").unwrap_or_default().to_string(),
                            name: opt_str(b, "name").unwrap_or_default().to_string(),
                            signature: None,
                        });
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                let d = v.get("delta").unwrap_or(&Value::Null);
                if let Some(r) = opt_str(d, "stop_reason") {
                    out.push(Delta::Finish(finish_from_wire(r, opt_str(d, "stop_sequence"))));
                }
                self.merge_usage(v.get("usage"));
                out.push(Delta::Usage(self.usage));
            }
            "message_stop" => out.push(Delta::Done),
            "error" => {
                let e = v.get("error").unwrap_or(&Value::Null);
                let kind = match opt_str(e, "type") {
                    Some("overloaded_error") => ErrorKind::Overloaded,
                    Some("rate_limit_error") => ErrorKind::RateLimited,
                    _ => ErrorKind::Other,
                };
                out.push(Delta::Error {
                    kind,
                    message: opt_str(e, "message").unwrap_or("upstream error").to_string(),
                });
            }
            _ => {} // ping, content_block_stop, unknown events
        }
    }
}

impl AnthropicDecoder {
    fn delta(&mut self, e: DeltaEvent<'_>, out: &mut Vec<Delta>) {
        let Some(d) = e.delta else { return };
        let text = |t: Option<Cow<'_, str>>| t.map(Cow::into_owned).unwrap_or_default();
        match &*d.kind {
            "text_delta" => out.push(Delta::Text(text(d.text))),
            "thinking_delta" => out.push(Delta::Thinking(text(d.thinking))),
            "signature_delta" => out.push(Delta::ThinkingSignature(text(d.signature))),
            "input_json_delta" => {
                if let (Some(&index), Some(p)) = (self.tool_blocks.get(&e.index), d.partial_json)
                    && !p.is_empty()
                {
                    out.push(Delta::ToolArgs {
                        index,
                        fragment: p.into_owned(),
                    });
                }
            }
            _ => {}
        }
    }

    fn merge_usage(&mut self, u: Option<&Value>) {
        let Some(u) = u.filter(|u| u.is_object()) else { return };
        let set = |field: &mut u64, key| {
            if let Some(n) = opt_u64(u, key) {
                *field = n;
            }
        };
        set(&mut self.usage.input, "input_tokens");
        set(&mut self.usage.output, "output_tokens");
        set(&mut self.usage.cache_read, "cache_read_input_tokens");
        set(&mut self.usage.cache_write, "cache_creation_input_tokens");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text,
    Thinking,
    Tool(usize),
}

/// Writes the event grammar an Anthropic client (and Claude Code) expects:
/// one `message_start`, blocks opened and closed one at a time with rising
/// indices, then `message_delta` and `message_stop` — always.
#[derive(Debug, Default)]
pub struct AnthropicEncoder {
    model: String,
    started: bool,
    next_block: u64,
    open: Option<(Open, u64)>,
    finish: Option<Finish>,
    usage: Usage,
    synthesized: usize,
}

impl AnthropicEncoder {
    pub fn new(model: &str) -> Self {
        AnthropicEncoder {
            model: model.to_string(),
            ..Self::default()
        }
    }

    fn start(&mut self, out: &mut Vec<u8>, id: &str) {
        if self.started {
            return;
        }
        self.started = true;
        let id = if id.starts_with("msg_") {
            id.to_string()
        } else if id.is_empty() {
            format!("msg_{}", uuid::Uuid::now_v7().simple())
        } else {
            format!("msg_{id}")
        };
        let v = json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": self.usage.input, "output_tokens": 0,
                      "cache_creation_input_tokens": self.usage.cache_write,
                      "cache_read_input_tokens": self.usage.cache_read},
        }});
        sse_frame(out, Some("message_start"), &v);
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if let Some((_, index)) = self.open.take() {
            sse_frame(
                out,
                Some("content_block_stop"),
                &json!({"type": "content_block_stop", "index": index}),
            );
        }
    }

    /// Make `kind` the open block (opening it with `block` if it is not).
    fn open(&mut self, out: &mut Vec<u8>, kind: Open, block: Value) -> u64 {
        self.start(out, "");
        if let Some((k, i)) = self.open
            && k == kind
        {
            return i;
        }
        self.close(out);
        let index = self.next_block;
        self.next_block += 1;
        sse_frame(
            out,
            Some("content_block_start"),
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        );
        self.open = Some((kind, index));
        index
    }

    /// A text or thinking delta, into its block (opened if it is not the open one).
    fn block_delta(&mut self, out: &mut Vec<u8>, kind: Open, delta: DeltaOut<'_>) {
        let start = match kind {
            Open::Thinking => json!({"type": "thinking", "thinking": "", "signature": ""}),
            _ => json!({"type": "text", "text": ""}),
        };
        let i = self.open(out, kind, start);
        Self::delta(out, i, delta);
    }

    fn delta(out: &mut Vec<u8>, index: u64, delta: DeltaOut<'_>) {
        let e = DeltaEventOut {
            kind: "content_block_delta",
            index,
            delta,
        };
        sse_frame(out, Some("content_block_delta"), &e);
    }
}

impl Encoder for AnthropicEncoder {
    fn encode(&mut self, delta: &Delta, out: &mut Vec<u8>) {
        match delta {
            Delta::Start { id, model } => {
                if self.model.is_empty() {
                    self.model = model.clone();
                }
                self.start(out, id);
            }
            Delta::Text(t) => self.block_delta(
                out,
                Open::Text,
                DeltaOut {
                    text: Some(t),
                    ..DeltaOut::new("text_delta")
                },
            ),
            Delta::Thinking(t) => self.block_delta(
                out,
                Open::Thinking,
                DeltaOut {
                    thinking: Some(t),
                    ..DeltaOut::new("thinking_delta")
                },
            ),
            Delta::ThinkingSignature(s) => self.block_delta(
                out,
                Open::Thinking,
                DeltaOut {
                    signature: Some(s),
                    ..DeltaOut::new("signature_delta")
                },
            ),
            Delta::RedactedThinking(data) => {
                self.start(out, "");
                self.close(out);
                let index = self.next_block;
                self.next_block += 1;
                sse_frame(
                    out,
                    Some("content_block_start"),
                    &json!({"type": "content_block_start", "index": index, "content_block": {"type": "redacted_thinking", "data": data}}),
                );
                sse_frame(
                    out,
                    Some("content_block_stop"),
                    &json!({"type": "content_block_stop", "index": index}),
                );
            }
            Delta::ToolStart { index, id, name, .. } => {
                let id = if id.is_empty() {
                    self.synthesized += 1;
                    format!("toolu_fg{}", self.synthesized)
                } else {
                    id.clone()
                };
                // A new call is a new block, even right after another call.
                self.start(out, "");
                self.close(out);
                self.open(
                    out,
                    Open::Tool(*index),
                    json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                );
            }
            Delta::ToolArgs { index, fragment } => {
                // Only into the call's own block, which is the open one.
                if let Some((Open::Tool(open), block)) = self.open
                    && open == *index
                {
                    let d = DeltaOut {
                        partial_json: Some(fragment),
                        ..DeltaOut::new("input_json_delta")
                    };
                    Self::delta(out, block, d);
                }
            }
            Delta::Finish(f) => self.finish = Some(f.clone()),
            Delta::Usage(u) => self.usage = *u,
            Delta::Done => {
                self.start(out, "");
                self.close(out);
                let (reason, sequence) = finish_to_wire(self.finish.as_ref().unwrap_or(&Finish::Stop));
                sse_frame(
                    out,
                    Some("message_delta"),
                    &json!({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": usage_to_wire(&self.usage)}),
                );
                sse_frame(out, Some("message_stop"), &json!({"type": "message_stop"}));
            }
            Delta::Error { kind, message } => {
                let kind = match kind {
                    ErrorKind::Overloaded => "overloaded_error",
                    ErrorKind::RateLimited => "rate_limit_error",
                    ErrorKind::Other => "api_error",
                };
                sse_frame(
                    out,
                    Some("error"),
                    &json!({"type": "error", "error": {"type": kind, "message": message}}),
                );
            }
        }
    }
}
