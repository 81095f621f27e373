//! Gemini `streamGenerateContent` streams (SSE with `alt=sse`, or a JSON
//! array) ⇄ deltas. Every Gemini chunk is a whole `GenerateContentResponse`.

use super::{Decoder, Delta, Encoder, sse_frame};
use crate::convert::{
    arguments_object,
    gemini::{
        finish_from_wire, finish_to_wire, first_candidate, prompt_blocked, synthesize_call_id, usage_from_wire,
        usage_to_wire,
    },
    ir::{Finish, Usage},
    opt_str,
};
use crate::{config::routes_d::Format, convert::errors};
use serde_json::{Value, json};

/// Reads a Gemini upstream's stream.
#[derive(Debug, Default)]
pub struct GeminiDecoder {
    started: bool,
    response_id: String,
    tools: usize,
    /// A finish reason (or a prompt block) was read. Gemini has no terminal
    /// event and may send usage in a later chunk: the body's end ends the
    /// stream, not this.
    finished: bool,
}

impl Decoder for GeminiDecoder {
    fn decode(&mut self, _event: Option<&str>, data: &str, out: &mut Vec<Delta>) {
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return;
        };
        if let Some(e) = v.get("error") {
            out.push(Delta::Error(errors::decode_streamed(Format::Gemini, e)));
            return;
        }
        if !self.started {
            self.started = true;
            self.response_id = opt_str(&v, "responseId").unwrap_or_default().to_string();
            out.push(Delta::Start {
                id: self.response_id.clone(),
                model: opt_str(&v, "modelVersion").unwrap_or_default().to_string(),
            });
        }
        let cand = first_candidate(&v);
        let parts = cand
            .and_then(|c| c.get("content"))
            .and_then(|c| c.get("parts"))
            .and_then(Value::as_array);
        for p in parts.into_iter().flatten() {
            let signature = opt_str(p, "thoughtSignature").map(str::to_string);
            if let Some(t) = opt_str(p, "text") {
                if p.get("thought").and_then(Value::as_bool) == Some(true) {
                    if !t.is_empty() {
                        out.push(Delta::Thinking(t.to_string()));
                    }
                } else if !t.is_empty() {
                    out.push(Delta::Text(t.to_string()));
                }
            } else if let Some(c) = p.get("functionCall") {
                let index = self.tools;
                self.tools += 1;
                let name = opt_str(c, "name").unwrap_or_default();
                let id = opt_str(c, "id")
                    .filter(|id| !id.is_empty())
                    .map_or_else(|| synthesize_call_id(&self.response_id, index, name), str::to_string);
                out.push(Delta::ToolStart {
                    index,
                    id,
                    name: name.to_string(),
                    signature,
                });
                out.push(Delta::ToolArgs {
                    index,
                    fragment: c
                        .get("args")
                        .filter(|a| a.is_object())
                        .map_or_else(|| "{}".to_string(), Value::to_string),
                });
            }
        }
        if let Some(r) = cand.and_then(|c| opt_str(c, "finishReason")) {
            out.push(Delta::Finish(finish_from_wire(r, self.tools > 0)));
            self.finished = true;
        } else if cand.is_none() && prompt_blocked(&v).is_some() {
            // The prompt was refused: no candidates at all, only `promptFeedback`.
            tracing::info!(reason = ?prompt_blocked(&v), "the Gemini upstream blocked the prompt");
            out.push(Delta::Finish(Finish::ContentFilter));
            self.finished = true;
        }
        if let Some(u) = v.get("usageMetadata").filter(|u| u.is_object()) {
            out.push(Delta::Usage(usage_from_wire(u)));
        }
    }

    fn end(&mut self, out: &mut Vec<Delta>) {
        if self.finished {
            out.push(Delta::Done);
        }
    }
}

/// A call being assembled: Gemini sends a call's arguments whole.
#[derive(Debug)]
struct PendingCall {
    index: usize,
    id: String,
    name: String,
    args: String,
    signature: Option<String>,
}

/// Writes the stream a Gemini client expects, as SSE (`alt=sse`) or as a
/// JSON array.
#[derive(Debug)]
pub struct GeminiEncoder {
    model: String,
    id: String,
    json_array: bool,
    wrote_first: bool,
    calls: Vec<PendingCall>,
    finish: Option<Finish>,
    usage: Option<Usage>,
}

impl GeminiEncoder {
    pub fn new(model: &str, json_array: bool) -> Self {
        GeminiEncoder {
            model: model.to_string(),
            id: String::new(),
            json_array,
            wrote_first: false,
            calls: Vec::new(),
            finish: None,
            usage: None,
        }
    }

    fn emit(&mut self, out: &mut Vec<u8>, v: &Value) {
        if self.json_array {
            out.extend_from_slice(if self.wrote_first { b",\r\n" } else { b"[" });
            let _ = serde_json::to_writer(&mut *out, v);
        } else {
            sse_frame(out, None, v);
        }
        self.wrote_first = true;
    }

    fn chunk(&mut self, out: &mut Vec<u8>, parts: Vec<Value>) {
        let v = json!({
            "candidates": [{"content": {"role": "model", "parts": parts}, "index": 0}],
            "modelVersion": self.model,
            "responseId": self.id,
        });
        self.emit(out, &v);
    }

    fn flush_calls(&mut self, out: &mut Vec<u8>) {
        if self.calls.is_empty() {
            return;
        }
        let parts = std::mem::take(&mut self.calls)
            .into_iter()
            .map(|c| {
                let mut p = json!({"functionCall": {"id": c.id, "name": c.name, "args": arguments_object(&c.args)}});
                if let Some(s) = c.signature {
                    p["thoughtSignature"] = s.into();
                }
                p
            })
            .collect();
        self.chunk(out, parts);
    }
}

impl Encoder for GeminiEncoder {
    fn encode(&mut self, delta: &Delta, out: &mut Vec<u8>) {
        match delta {
            Delta::Start { id, model } => {
                self.id = id.clone();
                if self.model.is_empty() {
                    self.model = model.clone();
                }
            }
            Delta::Text(t) => {
                self.flush_calls(out);
                self.chunk(out, vec![json!({"text": t})]);
            }
            Delta::Thinking(t) => {
                self.flush_calls(out);
                self.chunk(out, vec![json!({"text": t, "thought": true})]);
            }
            Delta::ThinkingSignature(_) | Delta::RedactedThinking(_) => {}
            Delta::ToolStart {
                index,
                id,
                name,
                signature,
            } => self.calls.push(PendingCall {
                index: *index,
                id: id.clone(),
                name: name.clone(),
                args: String::new(),
                signature: signature.clone(),
            }),
            Delta::ToolArgs { index, fragment } => {
                if let Some(c) = self.calls.iter_mut().find(|c| c.index == *index) {
                    c.args.push_str(fragment);
                }
            }
            Delta::Finish(f) => self.finish = Some(f.clone()),
            Delta::Usage(u) => self.usage = Some(*u),
            Delta::Done => {
                self.flush_calls(out);
                let mut v = json!({
                    "candidates": [{"content": {"role": "model", "parts": []}, "index": 0,
                        "finishReason": finish_to_wire(self.finish.as_ref().unwrap_or(&Finish::Stop))}],
                    "modelVersion": self.model,
                    "responseId": self.id,
                });
                if let Some(u) = &self.usage {
                    v["usageMetadata"] = usage_to_wire(u);
                }
                self.emit(out, &v);
                if self.json_array {
                    out.push(b']');
                }
            }
            Delta::Error(e) => {
                self.emit(out, &errors::encode(Format::Gemini, e).1);
                if self.json_array {
                    out.push(b']');
                }
            }
        }
    }
}
