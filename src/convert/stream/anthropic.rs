//! Anthropic Messages streams (`message_start` … `message_stop`) ⇄ deltas.

use super::{Decoder, Delta, Encoder, sse_frame};
use crate::convert::{
    anthropic::{finish_from_wire, finish_to_wire, usage_to_wire},
    ir::{Finish, Usage},
    opt_str,
};
use crate::{config::routes_d::Format, convert::errors};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::{borrow::Cow, collections::HashMap};

/// Any stream event, read typed with text borrowed where it has no escapes
/// (no JSON tree on the hot path; only a block's start and an error, rare,
/// are kept as trees).
#[derive(Deserialize)]
struct EventIn<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(default)]
    index: u64,
    #[serde(borrow, default)]
    delta: Option<DeltaIn<'a>>,
    #[serde(borrow, default)]
    message: Option<MessageIn<'a>>,
    #[serde(default)]
    usage: Option<UsageIn>,
    #[serde(default)]
    content_block: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

/// The hot event, `content_block_delta`, read into a small struct.
#[derive(Deserialize)]
struct BlockDeltaIn<'a> {
    #[serde(default)]
    index: u64,
    #[serde(borrow, default)]
    delta: Option<DeltaIn<'a>>,
}

/// `content_block_delta`'s delta, or `message_delta`'s. Each block delta
/// type has one payload field, read into `payload` whatever its name.
#[derive(Deserialize)]
struct DeltaIn<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(
        borrow,
        default,
        alias = "text",
        alias = "thinking",
        alias = "signature",
        alias = "partial_json"
    )]
    payload: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    stop_reason: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    stop_sequence: Option<Cow<'a, str>>,
}

/// `message_start`'s message.
#[derive(Deserialize)]
struct MessageIn<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    usage: Option<UsageIn>,
}

#[derive(Deserialize)]
struct UsageIn {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
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
        // Events that carry nothing to convert are known by name.
        match event {
            Some("ping" | "content_block_stop") => return,
            Some("message_stop") => return out.push(Delta::Done),
            Some("content_block_delta") => {
                if let Ok(e) = serde_json::from_str::<BlockDeltaIn>(data) {
                    self.delta(e.index, e.delta, out);
                }
                return;
            }
            _ => {}
        }
        let Ok(e) = serde_json::from_str::<EventIn>(data) else {
            return;
        };
        match e.kind.as_deref().or(event).unwrap_or_default() {
            "content_block_delta" => self.delta(e.index, e.delta, out),
            "message_start" => {
                let Some(m) = e.message else { return };
                self.merge_usage(m.usage.as_ref());
                out.push(Delta::Start {
                    id: m.id.map(Cow::into_owned).unwrap_or_default(),
                    model: m.model.map(Cow::into_owned).unwrap_or_default(),
                });
            }
            "content_block_start" => {
                let b = e.content_block.unwrap_or(Value::Null);
                match opt_str(&b, "type") {
                    Some("text") => {
                        if let Some(t) = opt_str(&b, "text").filter(|t| !t.is_empty()) {
                            out.push(Delta::Text(t.to_string()));
                        }
                    }
                    Some("thinking") => {
                        if let Some(t) = opt_str(&b, "thinking").filter(|t| !t.is_empty()) {
                            out.push(Delta::Thinking(t.to_string()));
                        }
                    }
                    Some("redacted_thinking") => {
                        out.push(Delta::RedactedThinking(
                            opt_str(&b, "data").unwrap_or_default().to_string(),
                        ));
                    }
                    Some("tool_use") => {
                        let index = self.tools;
                        self.tools += 1;
                        self.tool_blocks.insert(e.index, index);
                        out.push(Delta::ToolStart {
                            index,
                            id: opt_str(&b, "id").unwrap_or_default().to_string(),
                            name: opt_str(&b, "name").unwrap_or_default().to_string(),
                            signature: None,
                        });
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(r) = e.delta.as_ref().and_then(|d| d.stop_reason.as_deref()) {
                    let sequence = e.delta.as_ref().and_then(|d| d.stop_sequence.as_deref());
                    out.push(Delta::Finish(finish_from_wire(r, sequence)));
                }
                self.merge_usage(e.usage.as_ref());
                out.push(Delta::Usage(self.usage));
            }
            "message_stop" => out.push(Delta::Done),
            "error" => {
                let err = e.error.unwrap_or(Value::Null);
                out.push(Delta::Error(errors::decode_streamed(Format::Anthropic, &err)));
            }
            _ => {} // ping, content_block_stop, unknown events
        }
    }
}

impl AnthropicDecoder {
    fn delta(&mut self, block: u64, delta: Option<DeltaIn<'_>>, out: &mut Vec<Delta>) {
        let Some(d) = delta else { return };
        let text = |t: Option<Cow<'_, str>>| t.map(Cow::into_owned).unwrap_or_default();
        match d.kind.as_deref().unwrap_or_default() {
            "text_delta" => out.push(Delta::Text(text(d.payload))),
            "thinking_delta" => out.push(Delta::Thinking(text(d.payload))),
            "signature_delta" => out.push(Delta::ThinkingSignature(text(d.payload))),
            "input_json_delta" => {
                if let (Some(&index), Some(p)) = (self.tool_blocks.get(&block), d.payload)
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

    fn merge_usage(&mut self, u: Option<&UsageIn>) {
        let Some(u) = u else { return };
        for (field, value) in [
            (&mut self.usage.input, u.input_tokens),
            (&mut self.usage.output, u.output_tokens),
            (&mut self.usage.cache_read, u.cache_read_input_tokens),
            (&mut self.usage.cache_write, u.cache_creation_input_tokens),
        ] {
            if let Some(n) = value {
                *field = n;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text,
    Thinking,
    Tool(usize),
}

/// A tool call whose block is opened.
#[derive(Debug)]
struct ToolCallHead {
    index: usize,
    id: String,
    name: String,
}

/// Writes the event grammar an Anthropic client (and Claude Code) expects:
/// one `message_start`, blocks opened and closed one at a time with rising
/// indices, then `message_delta` and `message_stop` — always.
///
/// The converter hands each call's deltas over together (`CallOrder`),
/// so blocks never overlap.
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

    /// Open a tool call's block (closing the open one).
    fn open_tool(&mut self, out: &mut Vec<u8>, call: ToolCallHead) {
        self.start(out, "");
        self.close(out);
        self.open(
            out,
            Open::Tool(call.index),
            json!({"type": "tool_use", "id": call.id, "name": call.name, "input": {}}),
        );
    }

    fn tool_args(&mut self, out: &mut Vec<u8>, index: usize, fragment: &str) {
        match self.open {
            Some((Open::Tool(open), block)) if open == index => {
                let d = DeltaOut {
                    partial_json: Some(fragment),
                    ..DeltaOut::new("input_json_delta")
                };
                Self::delta(out, block, d);
            }
            _ => tracing::warn!(index, "tool-call arguments for a call that is not open: dropped"),
        }
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
            Delta::ToolStart {
                index,
                id,
                name,
                signature,
            } => {
                let id = if id.is_empty() {
                    self.synthesized += 1;
                    format!("toolu_fg{}", self.synthesized)
                } else {
                    crate::convert::id_with_signature(id, signature.as_deref())
                };
                // A new call is a new block, even right after another call.
                let call = ToolCallHead {
                    index: *index,
                    id,
                    name: name.clone(),
                };
                self.open_tool(out, call);
            }
            Delta::ToolArgs { index, fragment } => self.tool_args(out, *index, fragment),
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
            Delta::Error(e) => {
                sse_frame(out, Some("error"), &errors::encode(Format::Anthropic, e).1);
            }
        }
    }
}
