//! A streamed answer merged for the audit log: the text, tool calls with
//! their arguments, finish reason and usage, written as the client's own
//! non-stream JSON body (an OpenAI chat completion, an Anthropic message, a
//! Gemini `GenerateContentResponse`, a Responses `response` object), so the
//! log shows what the model said rather than a list of events.
//!
//! Fed the (decoded) upstream bytes as they pass, through the same
//! incremental parsers and decoders stream conversion uses; nothing waits
//! for the end and nothing is re-parsed. Memory stays bounded: the answer's
//! content (text, reasoning, arguments) is kept up to the body cap, and the
//! merged JSON is fitted under it ([`StreamMerge::finish`]).
//!
//! What the JSON adds of its own (documented in `docs/configuration.md`):
//! `fastgate_incomplete: true` when the stream did not reach its end (the
//! client or the upstream went away, or an error event ended it; the finish
//! reason is then the one that arrived, or the format's "none"),
//! `fastgate_error` with an upstream's mid-stream error message, and
//! `fastgate_truncated: true` when content was cut at the cap.

mod responses_in;

use super::fields;
use crate::{
    config::routes_d::Format,
    convert::{
        anthropic, gemini,
        ir::{ChatResponse, Finish, Part, ToolCall, Usage},
        openai::{self, ToolNames},
        responses::{self, Echo},
        sse::{JsonArrayParser, SseParser},
        stream::{Decoder, Delta, anthropic::AnthropicDecoder, gemini::GeminiDecoder, openai::OpenaiDecoder},
    },
};
use serde_json::Value;

/// How the bytes fed are read and the merged answer written.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    /// The format of the bytes fed; `None`: told from the first event (a
    /// passthrough answer, whose format is also the client's).
    pub upstream: Option<Format>,
    /// The format the merged answer is written in; `None`: the upstream's.
    pub client: Option<Format>,
    /// Tool names shortened toward an OpenAI upstream, mapped back.
    pub names: ToolNames,
    /// A forced tool whose arguments are the answer's text (`json_schema`
    /// toward Anthropic).
    pub json_tool: Option<String>,
    /// The model the answer names (the one the client asked for).
    pub model: Option<String>,
    /// What a Responses client's `response` object repeats of its request.
    pub echo: Echo,
}

enum Framing {
    Sse(SseParser),
    Array(JsonArrayParser),
    /// A JSON body: a Gemini stream without `alt=sse` is an array, anything
    /// else a whole answer (not merged).
    Probe,
}

/// One streamed answer being merged.
pub struct StreamMerge {
    framing: Framing,
    decoder: Option<Box<dyn Decoder + Sync>>,
    deltas: Vec<Delta>,
    spec: Spec,
    answer: Answer,
    cap: usize,
    /// Raw bytes kept until the format is known (given back when it is
    /// not one merged), at most `cap + 1`.
    undecided: Option<Vec<u8>>,
    declined: bool,
}

impl StreamMerge {
    /// A merge of an answer with `content_type`, capped at `cap` bytes.
    /// `None` when the body cannot be a stream.
    pub fn new(spec: Spec, content_type: Option<&str>, cap: usize) -> Option<Self> {
        let ct = content_type.unwrap_or_default().trim_start().to_ascii_lowercase();
        let framing = if ct.starts_with("text/event-stream") {
            Framing::Sse(SseParser::default())
        } else if ct.starts_with("application/json") {
            Framing::Probe
        } else {
            return None;
        };
        let decoder = spec.upstream.and_then(|f| decoder_for(f, &spec.names));
        let undecided = (decoder.is_none() || matches!(framing, Framing::Probe)).then(Vec::new);
        Some(StreamMerge {
            framing,
            decoder,
            deltas: Vec::new(),
            spec,
            answer: Answer::new(cap),
            cap,
            undecided,
            declined: false,
        })
    }

    /// Whether the body turned out not to be a stream this can merge: its
    /// raw bytes ([`StreamMerge::take_undecided`]) are captured instead.
    pub fn declined(&self) -> bool {
        self.declined
    }

    /// The body cap the merged answer is fitted under.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// The bytes seen before the merge declined.
    pub fn take_undecided(&mut self) -> Vec<u8> {
        self.undecided.take().unwrap_or_default()
    }

    /// Decoded body bytes, as they pass.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.declined {
            return;
        }
        if let Some(raw) = &mut self.undecided {
            let room = (self.cap + 1).saturating_sub(raw.len());
            raw.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        if let Framing::Probe = self.framing {
            match chunk.iter().find(|b| !b.is_ascii_whitespace()) {
                None => return,
                Some(b'[') => self.framing = Framing::Array(JsonArrayParser::default()),
                Some(_) => {
                    self.declined = true;
                    return;
                }
            }
        }
        let Self {
            framing,
            decoder,
            deltas,
            spec,
            declined,
            ..
        } = self;
        let mut on_event = |event: Option<&str>, data: &str| {
            if decoder.is_none() && !*declined {
                match sniff(event, data) {
                    Sniffed::Format(f) => *decoder = decoder_for(f, &spec.names).inspect(|_| spec.upstream = Some(f)),
                    Sniffed::Unknown => *declined = true,
                    Sniffed::Nothing => {}
                }
            }
            if let Some(d) = decoder {
                d.decode(event, data, deltas);
            }
        };
        match framing {
            Framing::Sse(p) => p.feed_with(chunk, &mut on_event),
            Framing::Array(p) => p.feed_with(chunk, &mut |item| on_event(None, item)),
            Framing::Probe => {}
        }
        if self.decoder.is_some() && !matches!(self.framing, Framing::Probe) {
            self.undecided = None;
        }
        self.apply();
    }

    fn apply(&mut self) {
        let json_tool = self.spec.json_tool.as_deref();
        for d in self.deltas.drain(..) {
            self.answer.apply(d, json_tool);
        }
    }

    /// The body ended (or the request did): the merged answer as JSON text
    /// of at most `cap` bytes; `None` when nothing was merged (the format was
    /// never told, or the merge declined).
    pub fn finish(&mut self) -> Option<String> {
        if self.declined {
            return None;
        }
        let Self {
            framing,
            decoder,
            deltas,
            ..
        } = self;
        let decoder = decoder.as_mut()?;
        if let Framing::Sse(p) = framing {
            p.finish_with(&mut |event, data| decoder.decode(event, data, deltas));
        }
        decoder.end(deltas);
        self.apply();
        let client = self.spec.client.or(self.spec.upstream)?;
        Some(self.answer.fitted_json(client, &self.spec, self.cap))
    }
}

/// What the first event tells of a passthrough stream's format.
enum Sniffed {
    Format(Format),
    /// Not an event of a format merged here.
    Unknown,
    /// Nothing to tell by (an empty event, Anthropic's `ping`).
    Nothing,
}

fn sniff(event: Option<&str>, data: &str) -> Sniffed {
    let data = data.trim();
    if data.is_empty() || event == Some("ping") {
        return Sniffed::Nothing;
    }
    let Ok(Value::Object(v)) = serde_json::from_str::<Value>(data) else {
        return Sniffed::Unknown;
    };
    let kind = v.get("type").and_then(Value::as_str).or(event).unwrap_or_default();
    if kind.starts_with("response.") {
        Sniffed::Format(Format::Responses)
    } else if kind.starts_with("message_") || kind.starts_with("content_block_") {
        Sniffed::Format(Format::Anthropic)
    } else if v.contains_key("candidates") || v.contains_key("usageMetadata") || v.contains_key("promptFeedback") {
        Sniffed::Format(Format::Gemini)
    } else if v.contains_key("choices") {
        Sniffed::Format(Format::Openai)
    } else {
        Sniffed::Unknown
    }
}

/// `Sync`: the request's context is shared across awaits.
fn decoder_for(format: Format, names: &ToolNames) -> Option<Box<dyn Decoder + Sync>> {
    Some(match format {
        Format::Openai => Box::new(OpenaiDecoder::new(names.clone())),
        Format::Anthropic => Box::new(AnthropicDecoder::default()),
        Format::Gemini => Box::new(GeminiDecoder::default()),
        Format::Responses => Box::new(responses_in::ResponsesDecoder::default()),
        Format::Passthrough => return None,
    })
}

/// The answer as merged so far.
#[derive(Debug, Default, Clone)]
struct Answer {
    id: String,
    model: String,
    parts: Vec<Part>,
    /// (the delta's tool index, the call's place in `parts`).
    calls: Vec<(usize, usize)>,
    /// The tool index of the forced JSON tool's call.
    json_index: Option<usize>,
    finish: Option<Finish>,
    usage: Option<Usage>,
    error: Option<String>,
    /// The terminal event (or an error) came: later deltas are ignored.
    ended: bool,
    complete: bool,
    /// Content bytes kept, and how many may be.
    kept: usize,
    budget: usize,
    truncated: bool,
    /// Custom tools' names seen in a Responses stream.
    custom_tools: Vec<String>,
    /// The request fields a Responses answer repeats are left out: they
    /// did not fit the cap beside the answer (Codex sends ~20 KB of
    /// instructions and tools; the answer is what the log is for).
    echo_dropped: bool,
}

impl Answer {
    fn new(budget: usize) -> Self {
        Answer {
            budget,
            ..Self::default()
        }
    }

    /// The part of `s` that fits the budget (marking the answer cut if not all).
    fn fit<'a>(&mut self, s: &'a str) -> &'a str {
        let room = self.budget.saturating_sub(self.kept);
        let n = fields::floor_boundary(s, room);
        if n < s.len() {
            self.truncated = true;
        }
        self.kept += n;
        &s[..n]
    }

    fn apply(&mut self, d: Delta, json_tool: Option<&str>) {
        if self.ended {
            return;
        }
        match d {
            Delta::Start { id, model } => {
                if self.id.is_empty() {
                    self.id = id;
                }
                if self.model.is_empty() {
                    self.model = model;
                }
            }
            Delta::Text(t) => self.push_text(&t),
            Delta::Thinking(t) => {
                let t = self.fit(&t).to_string();
                match self.parts.last_mut() {
                    Some(Part::Thinking { text, signature: None }) => text.push_str(&t),
                    _ if t.is_empty() => {}
                    _ => self.parts.push(Part::Thinking {
                        text: t,
                        signature: None,
                    }),
                }
            }
            Delta::ThinkingSignature(s) => {
                let s = self.fit(&s).to_string();
                match self.parts.last_mut() {
                    Some(Part::Thinking { signature, .. }) => signature.get_or_insert_default().push_str(&s),
                    _ => self.parts.push(Part::Thinking {
                        text: String::new(),
                        signature: Some(s),
                    }),
                }
            }
            Delta::RedactedThinking(data) => {
                let data = self.fit(&data).to_string();
                self.parts.push(Part::RedactedThinking(data));
            }
            Delta::ToolStart {
                index,
                id,
                name,
                signature,
            } => {
                if json_tool == Some(name.as_str()) {
                    self.json_index = Some(index);
                    return;
                }
                if let Some(custom) = name.strip_prefix(responses_in::CUSTOM_MARK) {
                    self.custom_tools.push(custom.to_string());
                }
                let name = name
                    .strip_prefix(responses_in::CUSTOM_MARK)
                    .map_or(name.clone(), str::to_string);
                self.calls.push((index, self.parts.len()));
                self.parts.push(Part::ToolCall(ToolCall {
                    id,
                    name,
                    arguments: String::new(),
                    signature,
                }));
            }
            Delta::ToolArgs { index, fragment } => {
                if self.json_index == Some(index) {
                    return self.push_text(&fragment);
                }
                let Some(&(_, at)) = self.calls.iter().rev().find(|(i, _)| *i == index) else {
                    return;
                };
                let fragment = self.fit(&fragment).to_string();
                if let Some(Part::ToolCall(c)) = self.parts.get_mut(at) {
                    c.arguments.push_str(&fragment);
                }
            }
            Delta::Finish(f) => {
                self.finish = Some(match f {
                    Finish::ToolCalls if self.json_index.is_some() && self.calls.is_empty() => Finish::Stop,
                    other => other,
                });
            }
            Delta::Usage(u) => self.usage = Some(u),
            Delta::Error(e) => {
                self.error = Some(e.message);
                self.ended = true;
            }
            Delta::Done => {
                self.ended = true;
                self.complete = true;
            }
        }
    }

    fn push_text(&mut self, t: &str) {
        let t = self.fit(t);
        match self.parts.last_mut() {
            Some(Part::Text(text)) => text.push_str(t),
            _ if t.is_empty() => {}
            _ => self.parts.push(Part::Text(t.to_string())),
        }
    }

    /// The answer with every part kept and its content emptied (marked cut).
    fn without_content(&self) -> Answer {
        let mut empty = self.clone();
        for p in &mut empty.parts {
            match p {
                Part::Text(t) | Part::RedactedThinking(t) => t.clear(),
                Part::Thinking { text, signature } => {
                    text.clear();
                    *signature = None;
                }
                Part::ToolCall(c) => c.arguments.clear(),
                _ => {}
            }
        }
        empty.truncated = true;
        empty
    }

    /// Cut the content to `budget` bytes, from the end.
    fn trim_to(&mut self, budget: usize) {
        let mut left = budget;
        let mut keep = 0;
        for p in &mut self.parts {
            let field = match p {
                Part::Text(t) | Part::RedactedThinking(t) => t,
                Part::Thinking { text, .. } => text,
                Part::ToolCall(c) => &mut c.arguments,
                _ => {
                    keep += 1;
                    continue;
                }
            };
            if left == 0 {
                break;
            }
            let n = fields::floor_boundary(field, left);
            field.truncate(n);
            if let Part::Thinking { signature: Some(s), .. } = p {
                s.clear();
            }
            left -= n;
            keep += 1;
        }
        self.parts.truncate(keep);
        self.kept = budget - left;
        self.truncated = true;
    }

    /// The merged answer in `client`'s non-stream shape, within `cap` bytes.
    fn fitted_json(&mut self, client: Format, spec: &Spec, cap: usize) -> String {
        let mut text = self.encode(client, spec);
        let mut frame = 0;
        if text.len() > cap {
            frame = self.without_content().encode(client, spec).len();
            if frame + 32 > cap && client == Format::Responses && !spec.echo.fields.is_empty() {
                self.echo_dropped = true;
                self.truncated = true;
                text = self.encode(client, spec);
                frame = self.without_content().encode(client, spec).len();
            }
        }
        if text.len() > cap && self.kept > 0 {
            // The answer's frame (ids, usage, the marks) without content,
            // then content cut by its JSON bytes per byte (escapes grow it):
            // it fits in a step, rarely two.
            for _ in 0..4 {
                if text.len() <= cap || self.kept == 0 {
                    break;
                }
                let per = (text.len().saturating_sub(frame) as f64 / self.kept as f64).max(1.0);
                let room = cap.saturating_sub(frame + 32) as f64;
                self.trim_to(((room / per) as usize).min(self.kept - 1));
                text = self.encode(client, spec);
            }
        }
        if text.len() > cap {
            // Even the answer's frame does not fit: cut and marked, as any body.
            return fields::body_text(text.as_bytes(), cap, Some(text.len() as u64));
        }
        text
    }

    fn encode(&self, client: Format, spec: &Spec) -> String {
        let resp = ChatResponse {
            id: self.id.clone(),
            model: spec.model.clone().unwrap_or_else(|| self.model.clone()),
            parts: self.parts.clone(),
            finish: self.finish.clone(),
            usage: self.usage,
            more: Vec::new(),
        };
        let now = crate::clock::now_unix();
        let incomplete = !self.complete;
        let mut v = match client {
            Format::Anthropic => {
                let mut v = anthropic::encode_response(&resp);
                if resp.finish.is_none() {
                    v["stop_reason"] = Value::Null;
                }
                v
            }
            Format::Gemini => {
                let mut v = gemini::encode_response(&resp);
                if resp.finish.is_none()
                    && let Some(c) = v.pointer_mut("/candidates/0").and_then(Value::as_object_mut)
                {
                    c.remove("finishReason");
                }
                v
            }
            Format::Responses => {
                let mut echo = spec.echo.clone();
                echo.custom_tools.extend(self.custom_tools.iter().cloned());
                if self.echo_dropped {
                    echo.fields.clear();
                }
                let mut v = responses::encode_response(&resp, &echo, now);
                if incomplete {
                    v["status"] = if self.error.is_some() { "failed" } else { "incomplete" }.into();
                    if let Some(m) = &self.error {
                        v["error"] = serde_json::json!({"code": "server_error", "message": m});
                    }
                }
                v
            }
            _ => openai::encode_response(&resp, now),
        };
        if let Value::Object(o) = &mut v {
            if incomplete {
                o.insert("fastgate_incomplete".into(), true.into());
            }
            if let Some(m) = &self.error {
                o.insert("fastgate_error".into(), m.as_str().into());
            }
            if self.truncated {
                o.insert("fastgate_truncated".into(), true.into());
            }
        }
        v.to_string()
    }
}

#[cfg(test)]
mod tests;
