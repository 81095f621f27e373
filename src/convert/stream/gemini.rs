//! Gemini `streamGenerateContent` streams (SSE with `alt=sse`, or a JSON
//! array) ⇄ deltas. Every Gemini chunk is a whole `GenerateContentResponse`.

use super::{Decoder, Delta, Encoder, sse_frame};
use crate::convert::{
    arguments_object,
    gemini::{
        MAX_CARRIED_THINKING, attach_carried, carry_thinking, finish_from_wire, finish_to_wire, first_candidate,
        prompt_blocked, synthesize_call_id, usage_from_wire, usage_to_wire,
    },
    ir::{Finish, Part, Usage},
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

/// Anthropic's signed thinking of the answer, gathered to be carried in a
/// `thoughtSignature` (the stream's thought parts go out as they come).
#[derive(Debug, Default)]
struct ThinkingToCarry {
    /// Whole blocks (signed or redacted) not carried yet.
    blocks: Vec<Part>,
    /// The text of the block streaming now (it may end unsigned).
    open: Option<String>,
    bytes: usize,
    /// More than [`MAX_CARRIED_THINKING`]: nothing of this turn is carried.
    over: bool,
    /// A signature or redacted block was seen (something to carry, or lost).
    signed: bool,
}

impl ThinkingToCarry {
    fn grow(&mut self, n: usize) -> bool {
        self.bytes += n;
        self.over |= self.bytes > MAX_CARRIED_THINKING;
        !self.over
    }

    fn text(&mut self, t: &str) {
        if self.grow(t.len()) {
            self.open.get_or_insert_default().push_str(t);
        }
    }

    /// The block streaming now is signed, and whole (Anthropic sends one
    /// `signature_delta`, just before the block's end).
    fn signature(&mut self, s: &str) {
        self.signed = true;
        let text = self.open.take().unwrap_or_default();
        if self.grow(s.len()) {
            self.blocks.push(Part::Thinking {
                text,
                signature: Some(s.to_string()),
            });
        }
    }

    fn redacted(&mut self, data: &str) {
        self.signed = true;
        self.open = None;
        if self.grow(data.len()) {
            self.blocks.push(Part::RedactedThinking(data.to_string()));
        }
    }

    /// Thinking that ended without a signature (another provider's) is not carried.
    fn end_block(&mut self) {
        self.open = None;
    }

    /// The gathered blocks as a `thoughtSignature`; the next ones start afresh.
    fn take(&mut self) -> Option<String> {
        let gathered = std::mem::take(self);
        if gathered.over {
            if !gathered.signed {
                return None;
            }
            tracing::warn!(
                max = MAX_CARRIED_THINKING,
                "Anthropic thinking too long to carry in a thoughtSignature; the Gemini client's next turn goes without it"
            );
            return None;
        }
        carry_thinking(&gathered.blocks)
    }
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
    thinking: ThinkingToCarry,
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
            thinking: ThinkingToCarry::default(),
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
        let mut parts: Vec<Value> = std::mem::take(&mut self.calls)
            .into_iter()
            .map(|c| {
                let mut p = json!({"functionCall": {"id": c.id, "name": c.name, "args": arguments_object(&c.args)}});
                if let Some(s) = c.signature {
                    p["thoughtSignature"] = s.into();
                }
                p
            })
            .collect();
        // The thinking before these calls rides on the first of them.
        if let Some(sig) = self.thinking.take() {
            attach_carried(&mut parts, sig);
        }
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
                self.thinking.end_block();
                self.flush_calls(out);
                self.chunk(out, vec![json!({"text": t})]);
            }
            Delta::Thinking(t) => {
                self.flush_calls(out);
                self.thinking.text(t);
                self.chunk(out, vec![json!({"text": t, "thought": true})]);
            }
            Delta::ThinkingSignature(s) => self.thinking.signature(s),
            Delta::RedactedThinking(data) => self.thinking.redacted(data),
            Delta::ToolStart {
                index,
                id,
                name,
                signature,
            } => {
                self.thinking.end_block();
                self.calls.push(PendingCall {
                    index: *index,
                    id: id.clone(),
                    name: name.clone(),
                    args: String::new(),
                    signature: signature.clone(),
                })
            }
            Delta::ToolArgs { index, fragment } => {
                if let Some(c) = self.calls.iter_mut().find(|c| c.index == *index) {
                    c.args.push_str(fragment);
                }
            }
            Delta::Finish(f) => self.finish = Some(f.clone()),
            Delta::Usage(u) => self.usage = Some(*u),
            Delta::Done => {
                self.flush_calls(out);
                // Thinking no call carried (a turn without calls) rides on
                // a thought part of its own.
                let mut parts = Vec::new();
                if let Some(sig) = self.thinking.take() {
                    attach_carried(&mut parts, sig);
                }
                // Never an empty `parts`: the google-genai SDKs' chats take a
                // chunk without parts for an invalid answer and leave the
                // whole turn out of the history they send back.
                if parts.is_empty() {
                    parts.push(json!({"text": ""}));
                }
                let mut v = json!({
                    "candidates": [{"content": {"role": "model", "parts": parts}, "index": 0,
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

#[cfg(test)]
mod carried_thinking_tests {
    use super::*;
    use crate::convert::{gemini::carried_thinking, sse::SseParser};

    fn run(deltas: &[Delta]) -> Vec<Value> {
        let mut enc = GeminiEncoder::new("m", false);
        let mut out = Vec::new();
        for d in deltas {
            enc.encode(d, &mut out);
        }
        SseParser::parse_all(&out)
            .into_iter()
            .flat_map(|e| {
                let v: Value = serde_json::from_str(&e.data).unwrap_or_default();
                v["candidates"][0]["content"]["parts"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .collect()
    }

    fn signed(text: &str, sig: &str) -> Part {
        Part::Thinking {
            text: text.into(),
            signature: Some(sig.into()),
        }
    }

    fn thinking(text: &[&str], sig: &str) -> Vec<Delta> {
        let mut d: Vec<Delta> = text.iter().map(|t| Delta::Thinking(t.to_string())).collect();
        d.push(Delta::ThinkingSignature(sig.into()));
        d
    }

    fn call(index: usize) -> [Delta; 2] {
        [
            Delta::ToolStart {
                index,
                id: format!("toolu_{index}"),
                name: "weather".into(),
                signature: None,
            },
            Delta::ToolArgs {
                index,
                fragment: r#"{"city":"Paris"}"#.into(),
            },
        ]
    }

    fn start() -> Delta {
        Delta::Start {
            id: "msg_1".into(),
            model: "claude".into(),
        }
    }

    #[test]
    fn streamed_thinking_rides_on_the_first_call() {
        let mut d = vec![start()];
        d.extend(thinking(&["Let me ", "check."], "SIG-1"));
        d.push(Delta::RedactedThinking("RED".into()));
        d.push(Delta::Text("Checking.".into()));
        d.extend(call(0));
        d.extend(call(1));
        d.extend([Delta::Finish(Finish::ToolCalls), Delta::Done]);
        let parts = run(&d);
        let thoughts: Vec<&Value> = parts.iter().filter(|p| p["thought"] == true).collect();
        assert_eq!(thoughts.len(), 2, "thought parts still stream: {parts:?}");
        let calls: Vec<&Value> = parts.iter().filter(|p| p.get("functionCall").is_some()).collect();
        assert_eq!(calls.len(), 2);
        assert_eq!(
            carried_thinking(calls[0]["thoughtSignature"].as_str().unwrap()),
            Some(vec![
                signed("Let me check.", "SIG-1"),
                Part::RedactedThinking("RED".into())
            ])
        );
        assert!(calls[1].get("thoughtSignature").is_none());
        assert_eq!(parts.iter().filter(|p| p.get("thoughtSignature").is_some()).count(), 1);
    }

    #[test]
    fn without_a_call_the_thinking_rides_on_a_thought_part_at_the_end() {
        let mut d = vec![start()];
        d.extend(thinking(&["hmm"], "SIG"));
        d.extend([Delta::Text("Sunny.".into()), Delta::Finish(Finish::Stop), Delta::Done]);
        let parts = run(&d);
        let last = parts.last().unwrap();
        assert_eq!(last["thought"], true);
        assert_eq!(last["text"], "");
        assert_eq!(
            carried_thinking(last["thoughtSignature"].as_str().unwrap()),
            Some(vec![signed("hmm", "SIG")])
        );
    }

    #[test]
    fn unsigned_or_oversized_thinking_carries_nothing() {
        // Another provider's reasoning: no signature.
        let mut d = vec![start(), Delta::Thinking("r".into()), Delta::Text("t".into())];
        d.extend(call(0));
        d.push(Delta::Done);
        assert!(run(&d).iter().all(|p| p.get("thoughtSignature").is_none()));
        // Past the cap.
        let long = "x".repeat(MAX_CARRIED_THINKING / 2 + 1);
        let mut d = vec![start()];
        d.extend(thinking(&[&long, &long], "SIG"));
        d.extend(call(0));
        d.push(Delta::Done);
        assert!(run(&d).iter().all(|p| p.get("thoughtSignature").is_none()));
    }

    #[test]
    fn thinking_after_the_first_call_rides_on_the_next() {
        let mut d = vec![start()];
        d.extend(thinking(&["a"], "SA"));
        d.extend(call(0));
        d.extend(thinking(&["b"], "SB"));
        d.extend(call(1));
        d.push(Delta::Done);
        let parts = run(&d);
        let calls: Vec<&Value> = parts.iter().filter(|p| p.get("functionCall").is_some()).collect();
        assert_eq!(
            carried_thinking(calls[0]["thoughtSignature"].as_str().unwrap()),
            Some(vec![signed("a", "SA")])
        );
        assert_eq!(
            carried_thinking(calls[1]["thoughtSignature"].as_str().unwrap()),
            Some(vec![signed("b", "SB")])
        );
    }
}
