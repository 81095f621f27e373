//! OpenAI Responses stream events → deltas, for merging a Responses stream
//! passed through to OpenAI (API reference, "Streaming events"): text and
//! reasoning summary deltas, calls announced by `response.output_item.added`
//! with their arguments (or a custom tool's input) by `output_index`, and
//! the terminal `response.completed` / `response.incomplete` (status,
//! usage) or `response.failed` / `error`.

use crate::{
    config::routes_d::Format,
    convert::{
        errors,
        ir::{Finish, Usage},
        opt_str,
        stream::{Decoder, Delta},
    },
};
use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;

/// Put before a custom tool's name in [`Delta::ToolStart`]: the merged
/// `response` writes its call back as a `custom_tool_call` (a NUL never
/// starts a real name).
pub const CUSTOM_MARK: &str = "\u{0}custom:";

#[derive(Deserialize)]
struct EventIn<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    delta: Option<Cow<'a, str>>,
    #[serde(default)]
    output_index: Option<u64>,
    #[serde(default)]
    item: Option<Value>,
    #[serde(default)]
    response: Option<ResponseIn>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    code: Option<Value>,
}

/// The fields of a `response` object the merge reads (never its output,
/// which repeats the whole answer).
#[derive(Deserialize)]
struct ResponseIn {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    incomplete_details: Option<Value>,
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

/// Reads a Responses stream.
#[derive(Debug, Default)]
pub struct ResponsesDecoder {
    started: bool,
    /// Per call: (its `output_index`, whether arguments streamed).
    calls: Vec<(Option<u64>, bool)>,
}

impl ResponsesDecoder {
    fn start(&mut self, r: Option<&ResponseIn>, out: &mut Vec<Delta>) {
        if !self.started {
            self.started = true;
            out.push(Delta::Start {
                id: r.and_then(|r| r.id.clone()).unwrap_or_default(),
                model: r.and_then(|r| r.model.clone()).unwrap_or_default(),
            });
        }
    }

    fn call_at(&self, output_index: Option<u64>) -> Option<usize> {
        match output_index {
            Some(_) => self.calls.iter().rposition(|(i, _)| *i == output_index),
            None => self.calls.len().checked_sub(1),
        }
    }
}

impl Decoder for ResponsesDecoder {
    fn decode(&mut self, event: Option<&str>, data: &str, out: &mut Vec<Delta>) {
        let Ok(e) = serde_json::from_str::<EventIn>(data) else {
            return;
        };
        let kind = e.kind.as_deref().or(event).unwrap_or_default();
        match kind {
            "response.created" | "response.in_progress" => self.start(e.response.as_ref(), out),
            "response.output_text.delta" | "response.refusal.delta" => {
                self.start(None, out);
                if let Some(t) = e.delta.filter(|t| !t.is_empty()) {
                    out.push(Delta::Text(t.into_owned()));
                }
            }
            "response.reasoning_summary_text.delta" | "response.reasoning_text.delta" => {
                self.start(None, out);
                if let Some(t) = e.delta.filter(|t| !t.is_empty()) {
                    out.push(Delta::Thinking(t.into_owned()));
                }
            }
            "response.output_item.added" => {
                self.start(None, out);
                let item = e.item.unwrap_or(Value::Null);
                let custom = match opt_str(&item, "type") {
                    Some("function_call") => false,
                    Some("custom_tool_call") => true,
                    _ => return,
                };
                let index = self.calls.len();
                self.calls.push((e.output_index, false));
                let name = opt_str(&item, "name").unwrap_or_default();
                out.push(Delta::ToolStart {
                    index,
                    id: opt_str(&item, "call_id").unwrap_or_default().to_string(),
                    name: if custom {
                        format!("{CUSTOM_MARK}{name}")
                    } else {
                        name.to_string()
                    },
                    signature: None,
                });
                // A server may send the arguments whole with the item.
                let whole = opt_str(&item, "arguments").or_else(|| opt_str(&item, "input"));
                if let Some(a) = whole.filter(|a| !a.is_empty()) {
                    self.calls[index].1 = true;
                    out.push(Delta::ToolArgs {
                        index,
                        fragment: a.to_string(),
                    });
                }
            }
            "response.function_call_arguments.delta" | "response.custom_tool_call_input.delta" => {
                if let (Some(index), Some(d)) = (self.call_at(e.output_index), e.delta.filter(|d| !d.is_empty())) {
                    self.calls[index].1 = true;
                    out.push(Delta::ToolArgs {
                        index,
                        fragment: d.into_owned(),
                    });
                }
            }
            "response.output_item.done" => {
                // Arguments given only whole, at the item's end.
                let item = e.item.unwrap_or(Value::Null);
                let whole = opt_str(&item, "arguments").or_else(|| opt_str(&item, "input"));
                if let (Some(index), Some(a)) = (self.call_at(e.output_index), whole.filter(|a| !a.is_empty()))
                    && !self.calls[index].1
                {
                    self.calls[index].1 = true;
                    out.push(Delta::ToolArgs {
                        index,
                        fragment: a.to_string(),
                    });
                }
            }
            "response.completed" | "response.incomplete" => {
                let r = e.response;
                self.start(r.as_ref(), out);
                let reason = r
                    .as_ref()
                    .and_then(|r| r.incomplete_details.as_ref())
                    .and_then(|d| opt_str(d, "reason"));
                let finish = match (r.as_ref().and_then(|r| r.status.as_deref()), reason) {
                    (Some("incomplete"), Some("max_output_tokens")) => Finish::Length,
                    (Some("incomplete"), Some("content_filter")) => Finish::ContentFilter,
                    _ if !self.calls.is_empty() => Finish::ToolCalls,
                    _ => Finish::Stop,
                };
                out.push(Delta::Finish(finish));
                if let Some(u) = r.as_ref().and_then(|r| r.usage.as_ref()).filter(|u| u.is_object()) {
                    out.push(Delta::Usage(usage_from_wire(u)));
                }
                out.push(Delta::Done);
            }
            "response.failed" => {
                let err = e.response.and_then(|r| r.error).unwrap_or(Value::Null);
                out.push(Delta::Error(errors::decode_streamed(Format::Openai, &err)));
            }
            "error" => {
                let err = serde_json::json!({"message": e.message, "code": e.code});
                out.push(Delta::Error(errors::decode_streamed(Format::Openai, &err)));
            }
            _ => {}
        }
    }
}

/// A Responses `usage` object (input includes cached, output reasoning).
fn usage_from_wire(u: &Value) -> Usage {
    let n = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
    let input = n(u.get("input_tokens"));
    let cached = n(u.pointer("/input_tokens_details/cached_tokens"));
    Usage {
        input: input.saturating_sub(cached),
        cache_read: cached,
        cache_write: 0,
        output: n(u.get("output_tokens")),
        reasoning: n(u.pointer("/output_tokens_details/reasoning_tokens")),
    }
}
