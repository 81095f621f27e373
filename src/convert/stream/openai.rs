//! OpenAI `chat.completion.chunk` streams ⇄ deltas.

use super::{Decoder, Delta, Encoder, sse_frame};
use crate::convert::{
    ir::{Finish, Usage},
    openai::{ToolNames, finish_from_wire, finish_to_wire, finish_with_calls, usage_from_wire, usage_to_wire},
    opt_str,
};
use crate::{config::routes_d::Format, convert::errors};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::borrow::Cow;

/// A chunk as read on the hot path: only the fields conversion uses, text
/// borrowed from the event where it has no escapes.
#[derive(Deserialize)]
struct ChunkIn<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    choices: Vec<ChoiceIn<'a>>,
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct ChoiceIn<'a> {
    #[serde(default)]
    index: u64,
    #[serde(borrow, default)]
    delta: Option<DeltaIn<'a>>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct DeltaIn<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reasoning: Option<Cow<'a, str>>,
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
}

/// The fields every chunk of a stream repeats, written once per stream;
/// each chunk then adds `"choices":[{"index":0,"delta":…,"finish_reason":…}]`.
#[derive(Serialize)]
struct ChunkHead<'a> {
    id: &'a str,
    object: &'static str,
    created: i64,
    model: &'a str,
}

#[derive(Serialize, Default)]
struct DeltaOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Value>,
}

/// Reads an OpenAI (or OpenAI-compatible) upstream's stream.
#[derive(Debug, Default)]
pub struct OpenaiDecoder {
    started: bool,
    /// Per tool call seen: (the upstream's index, its id).
    calls: Vec<(Option<u64>, Option<String>)>,
    names: ToolNames,
    /// A finish reason was read (a tool turn without one is inferred at the end).
    finished: bool,
}

impl OpenaiDecoder {
    /// `names`: tool names shortened on the way in, mapped back here.
    pub fn new(names: ToolNames) -> Self {
        OpenaiDecoder {
            names,
            ..Self::default()
        }
    }

    /// Our index for a tool-call delta: by the upstream's index, else by id,
    /// else the latest call; `true` with a new call to announce. A new id at
    /// a known index is a new call (servers that number every call 0).
    fn slot(&mut self, tc: &Value) -> (usize, bool) {
        let index = tc.get("index").and_then(Value::as_u64);
        let id = opt_str(tc, "id").filter(|s| !s.is_empty()).map(str::to_string);
        let found = match (index, &id) {
            (Some(i), Some(id)) => self
                .calls
                .iter()
                .rposition(|(ci, _)| *ci == Some(i))
                .filter(|&pos| self.calls[pos].1.as_ref().is_none_or(|known| known == id)),
            (Some(i), None) => self.calls.iter().rposition(|(ci, _)| *ci == Some(i)),
            (None, Some(id)) => self.calls.iter().position(|(_, cid)| cid.as_deref() == Some(id)),
            (None, None) => self.calls.len().checked_sub(1),
        };
        match found {
            Some(pos) => (pos, false),
            None => {
                self.calls.push((index, id));
                (self.calls.len() - 1, true)
            }
        }
    }
}

impl Decoder for OpenaiDecoder {
    fn decode(&mut self, _event: Option<&str>, data: &str, out: &mut Vec<Delta>) {
        let data = data.trim();
        if data == "[DONE]" {
            if !self.finished && !self.calls.is_empty() {
                // Calls, and no finish reason at all: a tool turn.
                out.push(Delta::Finish(Finish::ToolCalls));
            }
            out.push(Delta::Done);
            return;
        }
        let Ok(v) = serde_json::from_str::<ChunkIn>(data) else {
            return;
        };
        if let Some(e) = &v.error {
            out.push(Delta::Error(errors::decode_streamed(Format::Openai, e)));
            return;
        }
        if !self.started {
            self.started = true;
            out.push(Delta::Start {
                id: v.id.as_deref().unwrap_or_default().to_string(),
                model: v.model.as_deref().unwrap_or_default().to_string(),
            });
        }
        for choice in v.choices.iter().filter(|c| c.index == 0) {
            if let Some(delta) = &choice.delta {
                for t in [&delta.reasoning_content, &delta.reasoning].into_iter().flatten() {
                    if !t.is_empty() {
                        out.push(Delta::Thinking(t.to_string()));
                    }
                }
                if let Some(t) = delta.content.as_deref().filter(|t| !t.is_empty()) {
                    out.push(Delta::Text(t.to_string()));
                }
                for tc in delta.tool_calls.iter().flatten() {
                    let (index, new) = self.slot(tc);
                    let f = tc.get("function").unwrap_or(&Value::Null);
                    if new {
                        out.push(Delta::ToolStart {
                            index,
                            id: opt_str(tc, "id").unwrap_or_default().to_string(),
                            name: self.names.inbound(opt_str(f, "name").unwrap_or_default()),
                            signature: None,
                        });
                    }
                    if let Some(a) = opt_str(f, "arguments").filter(|a| !a.is_empty()) {
                        out.push(Delta::ToolArgs {
                            index,
                            fragment: a.to_string(),
                        });
                    }
                }
            }
            if let Some(r) = &choice.finish_reason {
                self.finished = true;
                let finish = finish_with_calls(Some(finish_from_wire(r)), !self.calls.is_empty());
                out.push(Delta::Finish(finish.unwrap_or(Finish::Stop)));
            }
        }
        if let Some(u) = v.usage.as_ref().filter(|u| u.is_object()) {
            out.push(Delta::Usage(usage_from_wire(u)));
        }
    }
}

/// Writes the stream an OpenAI client expects.
#[derive(Debug)]
pub struct OpenaiEncoder {
    id: String,
    model: String,
    created: i64,
    include_usage: bool,
    started: bool,
    finish: Option<Finish>,
    usage: Option<Usage>,
    /// Each chunk's bytes up to its delta, rendered at the first chunk.
    prefix: Vec<u8>,
    /// Tool calls announced that have had no arguments yet: they get `{}`
    /// before the finish (clients `json.loads` the arguments; "" fails).
    no_args: Vec<usize>,
}

impl OpenaiEncoder {
    /// `include_usage`: the client asked for the final usage chunk.
    pub fn new(model: &str, created: i64, include_usage: bool) -> Self {
        OpenaiEncoder {
            id: String::new(),
            model: model.to_string(),
            created,
            include_usage,
            started: false,
            finish: None,
            usage: None,
            prefix: Vec::new(),
            no_args: Vec::new(),
        }
    }

    /// One chunk: the prefix rendered at the start, then this delta.
    fn chunk(&mut self, out: &mut Vec<u8>, delta: DeltaOut<'_>, finish: Option<&str>) {
        if self.prefix.is_empty() {
            let head = ChunkHead {
                id: &self.id,
                object: "chat.completion.chunk",
                created: self.created,
                model: &self.model,
            };
            // Serializing plain strings and numbers into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut self.prefix, &head);
            self.prefix.pop(); // the closing brace
            self.prefix.extend_from_slice(br#","choices":[{"index":0,"delta":"#);
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&self.prefix);
        let _ = serde_json::to_writer(&mut *out, &delta);
        out.extend_from_slice(br#","finish_reason":"#);
        let _ = serde_json::to_writer(&mut *out, &finish);
        out.extend_from_slice(b"}]}\n\n");
    }

    /// The first chunk carries the role.
    fn start(&mut self, out: &mut Vec<u8>) {
        if !self.started {
            self.started = true;
            if self.id.is_empty() {
                self.id = format!("chatcmpl-{}", uuid::Uuid::now_v7().simple());
            } else if !self.id.starts_with("chatcmpl") {
                self.id = format!("chatcmpl-{}", self.id);
            }
            let delta = DeltaOut {
                role: Some("assistant"),
                content: Some(""),
                ..DeltaOut::default()
            };
            self.chunk(out, delta, None);
        }
    }
}

impl Encoder for OpenaiEncoder {
    fn encode(&mut self, delta: &Delta, out: &mut Vec<u8>) {
        match delta {
            Delta::Start { id, model } => {
                if !self.started {
                    self.id = id.clone();
                    if self.model.is_empty() {
                        self.model = model.clone();
                    }
                }
                self.start(out);
            }
            Delta::Text(t) => {
                self.start(out);
                let delta = DeltaOut {
                    content: Some(t),
                    ..DeltaOut::default()
                };
                self.chunk(out, delta, None);
            }
            Delta::Thinking(t) => {
                self.start(out);
                let delta = DeltaOut {
                    reasoning_content: Some(t),
                    ..DeltaOut::default()
                };
                self.chunk(out, delta, None);
            }
            Delta::ThinkingSignature(_) | Delta::RedactedThinking(_) => {}
            Delta::ToolStart {
                index,
                id,
                name,
                signature,
            } => {
                self.start(out);
                self.no_args.push(*index);
                let id = crate::convert::id_with_signature(id, signature.as_deref());
                let delta = DeltaOut {
                    tool_calls: Some(
                        json!([{"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]),
                    ),
                    ..DeltaOut::default()
                };
                self.chunk(out, delta, None);
            }
            Delta::ToolArgs { index, fragment } => {
                self.start(out);
                if !fragment.is_empty() {
                    self.no_args.retain(|i| i != index);
                }
                let delta = DeltaOut {
                    tool_calls: Some(json!([{"index": index, "function": {"arguments": fragment}}])),
                    ..DeltaOut::default()
                };
                self.chunk(out, delta, None);
            }
            Delta::Finish(f) => self.finish = Some(f.clone()),
            Delta::Usage(u) => self.usage = Some(*u),
            Delta::Done => {
                self.start(out);
                for index in std::mem::take(&mut self.no_args) {
                    let delta = DeltaOut {
                        tool_calls: Some(json!([{"index": index, "function": {"arguments": "{}"}}])),
                        ..DeltaOut::default()
                    };
                    self.chunk(out, delta, None);
                }
                let finish = finish_to_wire(self.finish.as_ref().unwrap_or(&Finish::Stop));
                self.chunk(out, DeltaOut::default(), Some(finish));
                if self.include_usage {
                    let v = json!({
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": usage_to_wire(&self.usage.unwrap_or_default()),
                    });
                    sse_frame(out, None, &v);
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
            }
            Delta::Error(e) => sse_frame(out, None, &errors::encode(Format::Openai, e).1),
        }
    }
}
