//! Deltas → an OpenAI Responses stream, in the grammar OpenAI documents
//! (API reference, "Streaming events"): `response.created`,
//! `response.in_progress`, then per output item `response.output_item.added`
//! … `response.output_item.done` (text through `response.content_part.*`
//! and `response.output_text.*`, reasoning through
//! `response.reasoning_summary_part.*` / `response.reasoning_summary_text.*`,
//! calls through `response.function_call_arguments.*` or
//! `response.custom_tool_call_input.*`), and one terminal
//! `response.completed`, `response.incomplete` or `response.failed`. Every
//! event is named on an `event:` line and numbered by `sequence_number`
//! from 0; there is no `[DONE]`.
//!
//! One item is open at a time: a new kind of delta closes it. A custom
//! tool's input is read out of its stand-in function's `{"input": "…"}`
//! arguments as they stream ([`responses::InputTail`]).

use super::{Delta, Encoder};
use crate::convert::errors::{self, UpstreamError};
use crate::convert::{
    id_with_signature,
    ir::{Finish, ToolCall, Usage},
    responses::{self, Echo, Head, InputTail},
};
use serde::Serialize;
use serde_json::{Value, json};

/// The item being streamed.
#[derive(Debug)]
enum Open {
    Message {
        id: String,
        text: String,
    },
    Reasoning {
        id: String,
        text: String,
        /// A summary part was announced (the first thinking text came).
        part: bool,
        sealed: Option<String>,
    },
    Call {
        id: String,
        /// The upstream's index of this call.
        index: usize,
        call: ToolCall,
        /// A custom tool's input, streaming out of the arguments.
        custom: Option<responses::InputTail>,
    },
}

/// A text-like delta, the hot path: serialized without building a `Value`.
#[derive(Serialize)]
struct TextDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    item_id: &'a str,
    output_index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_index: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary_index: Option<usize>,
    delta: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<[u8; 0]>,
}

/// Writes the stream a Responses client (Codex CLI, the OpenAI SDKs) expects.
#[derive(Debug)]
pub struct ResponsesEncoder {
    id: String,
    model: String,
    created_at: i64,
    echo: Echo,
    seq: u64,
    started: bool,
    /// Items finished so far (the terminal event's `output`).
    output: Vec<Value>,
    open: Option<Open>,
    finish: Option<Finish>,
    usage: Option<Usage>,
    /// Item ids are `<kind>_<base>_<output index>`.
    base: String,
}

impl ResponsesEncoder {
    /// `model`: the model the client asked for; `echo`: its request's fields.
    pub fn new(model: &str, created_at: i64, echo: Echo) -> Self {
        let base = uuid::Uuid::now_v7().simple().to_string();
        ResponsesEncoder {
            id: format!("resp_{base}"),
            model: model.to_string(),
            created_at,
            echo,
            seq: 0,
            started: false,
            output: Vec::new(),
            open: None,
            finish: None,
            usage: None,
            base,
        }
    }

    /// Item ids from a fixed base (tests compare whole streams).
    #[cfg(test)]
    pub(super) fn with_base(mut self, base: &str) -> Self {
        self.base = base.to_string();
        self.id = format!("resp_{base}");
        self
    }

    /// One event: `event: <name>` and the data object with its
    /// `sequence_number` appended.
    fn emit<T: Serialize + ?Sized>(&mut self, out: &mut Vec<u8>, name: &str, data: &T) {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\ndata: ");
        let start = out.len();
        // Serializing strings, numbers and Values into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, data);
        if out.len() > start && out.last() == Some(&b'}') {
            out.pop();
            if out.len() > start + 1 {
                out.push(b',');
            }
            out.extend_from_slice(b"\"sequence_number\":");
            out.extend_from_slice(itoa::Buffer::new().format(self.seq).as_bytes());
            out.push(b'}');
        }
        out.extend_from_slice(b"\n\n");
        self.seq += 1;
    }

    /// The response object, taking the output items along: it is sent at
    /// the start (no items yet) and at the end, never in between, so the
    /// whole answer is not held twice.
    fn response(&mut self, status: Option<&str>) -> Value {
        let head = Head {
            id: &self.id,
            model: &self.model,
            created_at: self.created_at,
        };
        responses::response_object(
            &head,
            &self.echo,
            std::mem::take(&mut self.output),
            self.finish.as_ref(),
            self.usage.as_ref(),
            status,
        )
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        let mut r = self.response(Some("in_progress"));
        r["usage"] = Value::Null;
        self.emit(
            out,
            "response.created",
            &json!({"type": "response.created", "response": r}),
        );
        self.emit(
            out,
            "response.in_progress",
            &json!({"type": "response.in_progress", "response": r}),
        );
    }

    fn item_id(&self, kind: &str) -> String {
        format!("{kind}_{}_{}", self.base, self.output.len())
    }

    fn item_added(&mut self, out: &mut Vec<u8>, item: Value) {
        let index = self.output.len();
        self.emit(
            out,
            "response.output_item.added",
            &json!({"type": "response.output_item.added", "output_index": index, "item": item}),
        );
    }

    fn item_done(&mut self, out: &mut Vec<u8>, item: Value) {
        let index = self.output.len();
        self.emit(
            out,
            "response.output_item.done",
            &json!({"type": "response.output_item.done", "output_index": index, "item": item}),
        );
        self.output.push(item);
    }

    /// Finish the open item with its `*.done` events.
    fn close(&mut self, out: &mut Vec<u8>) {
        self.close_as(out, "completed");
    }

    /// [`Self::close`] with the item's status: `incomplete` when the
    /// response failed while it was open (every item added gets its done).
    fn close_as(&mut self, out: &mut Vec<u8>, status: &str) {
        let Some(open) = self.open.take() else { return };
        let index = self.output.len();
        match open {
            Open::Message { id, text } => {
                self.emit(
                    out,
                    "response.output_text.done",
                    &json!({"type": "response.output_text.done", "item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
                );
                self.emit(
                    out,
                    "response.content_part.done",
                    &json!({"type": "response.content_part.done", "item_id": id, "output_index": index, "content_index": 0,
                        "part": {"type": "output_text", "text": text, "annotations": [], "logprobs": []}}),
                );
                self.item_done(out, responses::message_item(&id, &text, status));
            }
            Open::Reasoning { id, text, part, sealed } => {
                if part {
                    self.emit(
                        out,
                        "response.reasoning_summary_text.done",
                        &json!({"type": "response.reasoning_summary_text.done", "item_id": id, "output_index": index, "summary_index": 0, "text": text}),
                    );
                    self.emit(
                        out,
                        "response.reasoning_summary_part.done",
                        &json!({"type": "response.reasoning_summary_part.done", "item_id": id, "output_index": index, "summary_index": 0,
                            "part": {"type": "summary_text", "text": text}}),
                    );
                }
                self.item_done(out, responses::reasoning_item(&id, &text, sealed));
            }
            Open::Call { id, call, custom, .. } => {
                if let Some(tail) = custom {
                    let input = responses::custom_input(&call.arguments);
                    // What the pieces did not give yet (all of it when the
                    // model did not write the `input` object).
                    let rest = input.strip_prefix(tail.sent.as_str()).unwrap_or_default();
                    if !rest.is_empty() {
                        self.emit(
                            out,
                            "response.custom_tool_call_input.delta",
                            &TextDelta {
                                kind: "response.custom_tool_call_input.delta",
                                item_id: &id,
                                output_index: index,
                                content_index: None,
                                summary_index: None,
                                delta: rest,
                                logprobs: None,
                            },
                        );
                    }
                    self.emit(
                        out,
                        "response.custom_tool_call_input.done",
                        &json!({"type": "response.custom_tool_call_input.done", "item_id": id, "output_index": index, "input": input}),
                    );
                } else {
                    self.emit(
                        out,
                        "response.function_call_arguments.done",
                        &json!({"type": "response.function_call_arguments.done", "item_id": id, "output_index": index, "arguments": responses::arguments_or_empty_object(&call.arguments)}),
                    );
                }
                let item = responses::call_item(&id, &call, &self.echo, status);
                self.item_done(out, item);
            }
        }
    }

    fn text(&mut self, out: &mut Vec<u8>, t: &str) {
        if !matches!(self.open, Some(Open::Message { .. })) {
            self.close(out);
            let id = self.item_id("msg");
            let index = self.output.len();
            self.item_added(
                out,
                json!({"id": id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}),
            );
            self.emit(
                out,
                "response.content_part.added",
                &json!({"type": "response.content_part.added", "item_id": id, "output_index": index, "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
            );
            self.open = Some(Open::Message {
                id,
                text: String::new(),
            });
        }
        let index = self.output.len();
        let Some(Open::Message { id, text }) = self.open.take() else {
            return;
        };
        self.emit(
            out,
            "response.output_text.delta",
            &TextDelta {
                kind: "response.output_text.delta",
                item_id: &id,
                output_index: index,
                content_index: Some(0),
                summary_index: None,
                delta: t,
                logprobs: Some([]),
            },
        );
        let mut text = text;
        text.push_str(t);
        self.open = Some(Open::Message { id, text });
    }

    /// Open a reasoning item unless one is open.
    fn reasoning(&mut self, out: &mut Vec<u8>) {
        if !matches!(self.open, Some(Open::Reasoning { .. })) {
            self.close(out);
            let id = self.item_id("rs");
            self.item_added(out, json!({"id": id, "type": "reasoning", "summary": []}));
            self.open = Some(Open::Reasoning {
                id,
                text: String::new(),
                part: false,
                sealed: None,
            });
        }
    }

    fn thinking(&mut self, out: &mut Vec<u8>, t: &str) {
        self.reasoning(out);
        let index = self.output.len();
        let Some(Open::Reasoning {
            id,
            mut text,
            part,
            sealed,
        }) = self.open.take()
        else {
            return;
        };
        if !part {
            self.emit(
                out,
                "response.reasoning_summary_part.added",
                &json!({"type": "response.reasoning_summary_part.added", "item_id": id, "output_index": index, "summary_index": 0,
                    "part": {"type": "summary_text", "text": ""}}),
            );
        }
        self.emit(
            out,
            "response.reasoning_summary_text.delta",
            &TextDelta {
                kind: "response.reasoning_summary_text.delta",
                item_id: &id,
                output_index: index,
                content_index: None,
                summary_index: Some(0),
                delta: t,
                logprobs: None,
            },
        );
        text.push_str(t);
        self.open = Some(Open::Reasoning {
            id,
            text,
            part: true,
            sealed,
        });
    }

    fn tool_start(&mut self, out: &mut Vec<u8>, index: usize, id: &str, name: &str, signature: Option<&str>) {
        self.close(out);
        let custom = self.echo.is_custom(name).then(InputTail::default);
        let item_id = self.item_id(if custom.is_some() { "ctc" } else { "fc" });
        let call_id = id_with_signature(id, signature);
        let item = if custom.is_some() {
            json!({"id": item_id, "type": "custom_tool_call", "call_id": call_id, "name": name, "input": ""})
        } else {
            json!({"id": item_id, "type": "function_call", "status": "in_progress", "call_id": call_id, "name": name, "arguments": ""})
        };
        self.item_added(out, item);
        self.open = Some(Open::Call {
            id: item_id,
            index,
            call: ToolCall {
                id: id.to_string(),
                name: name.to_string(),
                arguments: String::new(),
                signature: signature.map(str::to_string),
            },
            custom,
        });
    }

    fn tool_args(&mut self, out: &mut Vec<u8>, index: usize, fragment: &str) {
        let output_index = self.output.len();
        if !matches!(self.open, Some(Open::Call { index: open_index, .. }) if open_index == index) {
            // The converter keeps each call's pieces together: not expected.
            tracing::debug!(index, "Tool-call arguments for a call that is not open dropped.");
            return;
        }
        let Some(Open::Call {
            id,
            index: open_index,
            mut call,
            mut custom,
        }) = self.open.take()
        else {
            return;
        };
        if open_index != index {
            tracing::debug!(index, open_index, "Tool-call arguments for a closed call dropped.");
        } else {
            call.arguments.push_str(fragment);
            let (kind, piece) = match &mut custom {
                Some(tail) => ("response.custom_tool_call_input.delta", tail.feed(&call.arguments)),
                None => ("response.function_call_arguments.delta", String::new()),
            };
            let delta = if custom.is_some() { piece.as_str() } else { fragment };
            if !delta.is_empty() {
                self.emit(
                    out,
                    kind,
                    &TextDelta {
                        kind,
                        item_id: &id,
                        output_index,
                        content_index: None,
                        summary_index: None,
                        delta,
                        logprobs: None,
                    },
                );
            }
        }
        self.open = Some(Open::Call {
            id,
            index: open_index,
            call,
            custom,
        });
    }

    fn done(&mut self, out: &mut Vec<u8>) {
        self.start(out);
        self.close(out);
        let (status, _) = responses::status_of(self.finish.as_ref());
        let name = if status == "incomplete" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        let r = self.response(None);
        self.emit(out, name, &json!({"type": name, "response": r}));
    }

    fn failed(&mut self, out: &mut Vec<u8>, e: &UpstreamError) {
        self.start(out);
        self.close_as(out, "incomplete");
        let code = errors::responses_code(e);
        // OpenAI's wording of the same error (a context overflow with its
        // counts): what a Responses client reads elsewhere too.
        let openai = errors::encode(crate::config::routes_d::Format::Openai, e).1;
        let message = openai["error"]["message"].as_str().unwrap_or(&e.message);
        let mut r = self.response(Some("failed"));
        r["error"] = json!({"code": code, "message": message});
        self.emit(
            out,
            "response.failed",
            &json!({"type": "response.failed", "response": r}),
        );
    }
}

impl Encoder for ResponsesEncoder {
    fn holds_the_answer(&self) -> bool {
        true
    }

    fn encode(&mut self, delta: &Delta, out: &mut Vec<u8>) {
        match delta {
            Delta::Start { id, model } => {
                if !self.started {
                    if id.starts_with("resp_") {
                        self.id = id.clone();
                    }
                    if self.model.is_empty() {
                        self.model = model.clone();
                    }
                }
                self.start(out);
            }
            Delta::Text(t) => {
                self.start(out);
                self.text(out, t);
            }
            Delta::Thinking(t) => {
                self.start(out);
                self.thinking(out, t);
            }
            Delta::ThinkingSignature(s) => {
                self.start(out);
                self.reasoning(out);
                if let Some(Open::Reasoning { sealed, .. }) = &mut self.open {
                    *sealed = Some(responses::seal_signature(s));
                }
            }
            Delta::RedactedThinking(data) => {
                self.start(out);
                self.close(out);
                let id = self.item_id("rs");
                self.item_added(out, json!({"id": id, "type": "reasoning", "summary": []}));
                self.item_done(
                    out,
                    responses::reasoning_item(&id, "", Some(responses::seal_redacted(data))),
                );
            }
            Delta::ToolStart {
                index,
                id,
                name,
                signature,
            } => {
                self.start(out);
                self.tool_start(out, *index, id, name, signature.as_deref());
            }
            Delta::ToolArgs { index, fragment } => {
                self.start(out);
                self.tool_args(out, *index, fragment);
            }
            Delta::Finish(f) => self.finish = Some(f.clone()),
            Delta::Usage(u) => self.usage = Some(*u),
            Delta::Done => self.done(out),
            Delta::Error(e) => self.failed(out, e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::{
        openai::ToolNames,
        sse::SseParser,
        stream::{Converter, Decoder, anthropic::AnthropicDecoder, gemini::GeminiDecoder, openai::OpenaiDecoder},
    };

    const ANTHROPIC: &str = include_str!("../../../tests/fixtures/conversion/anthropic_stream.sse");
    const OPENAI: &str = include_str!("../../../tests/fixtures/conversion/openai_stream.sse");
    const GEMINI: &str = include_str!("../../../tests/fixtures/conversion/gemini_stream.sse");

    fn run(decoder: &dyn Fn() -> Box<dyn Decoder>, echo: &Echo, input: &str, step: usize) -> String {
        let encoder = ResponsesEncoder::new("client-model", 7, echo.clone()).with_base("B");
        let mut c = Converter::new(decoder(), Box::new(encoder), false);
        let mut out = Vec::new();
        for piece in input.as_bytes().chunks(step) {
            out.extend(c.feed(piece));
        }
        out.extend(c.finish());
        String::from_utf8(out).unwrap()
    }

    /// The stream, the same however the input is cut, checked against the
    /// grammar; returns the terminal event's response.
    fn converted(decoder: &dyn Fn() -> Box<dyn Decoder>, echo: &Echo, input: &str) -> (Vec<String>, Value) {
        let whole = run(decoder, echo, input, input.len());
        for step in [1, 3, 64] {
            assert_eq!(run(decoder, echo, input, step), whole, "pieces of {step}");
        }
        let evs: Vec<(String, Value)> = SseParser::parse_all(whole.as_bytes())
            .into_iter()
            .map(|e| (e.event.unwrap_or_default(), serde_json::from_str(&e.data).unwrap()))
            .collect();
        let mut open: Option<u64> = None;
        for (i, (name, v)) in evs.iter().enumerate() {
            assert_eq!(v["type"].as_str(), Some(name.as_str()));
            assert_eq!(v["sequence_number"].as_u64(), Some(i as u64));
            match name.as_str() {
                "response.output_item.added" => {
                    assert!(open.is_none(), "one item open at a time: {whole}");
                    open = v["output_index"].as_u64();
                }
                "response.output_item.done" => {
                    assert_eq!(open, v["output_index"].as_u64());
                    open = None;
                }
                n if n.ends_with(".delta") || n.ends_with(".done") => {
                    assert_eq!(open, v["output_index"].as_u64(), "{n} inside its item")
                }
                _ => {}
            }
        }
        assert!(!whole.contains("[DONE]"));
        let names = evs.iter().map(|(n, _)| n.clone()).collect();
        (names, evs.last().unwrap().1["response"].clone())
    }

    #[test]
    fn an_anthropic_stream_becomes_reasoning_text_and_a_call() {
        let (names, r) = converted(&|| Box::new(AnthropicDecoder::default()), &Echo::default(), ANTHROPIC);
        assert_eq!(names[..2], ["response.created", "response.in_progress"]);
        assert_eq!(names.last().unwrap(), "response.completed");
        let out = r["output"].as_array().unwrap();
        assert_eq!(out.len(), 3, "{r}");
        assert_eq!(out[0]["type"], "reasoning");
        assert_eq!(out[0]["summary"][0]["text"], "Plan: read the file.");
        assert_eq!(
            out[0]["encrypted_content"],
            "fastgate.v1:s:EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"
        );
        assert_eq!(out[1]["content"][0]["text"], "Sure \u{2014} reading it.");
        assert_eq!(out[2]["type"], "function_call");
        assert_eq!(out[2]["arguments"], r#"{"path":"src/a.rs"}"#);
        assert_eq!(r["model"], "client-model");
        assert_eq!(r["id"], "resp_B");
        assert_eq!(out[2]["id"], "fc_B_2");
    }

    #[test]
    fn an_openai_stream_gives_two_calls_and_usage() {
        let decoder = || -> Box<dyn Decoder> { Box::new(OpenaiDecoder::new(ToolNames::default())) };
        let (_, r) = converted(&decoder, &Echo::default(), OPENAI);
        let calls: Vec<&Value> = r["output"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["type"] == "function_call")
            .collect();
        assert_eq!(calls.len(), 2, "{r}");
        assert_eq!(calls[0]["arguments"], r#"{"city":"Paris"}"#);
        assert_eq!(calls[1]["call_id"], "call_b");
        assert_eq!(r["usage"]["input_tokens"], 20);
        assert_eq!(r["usage"]["input_tokens_details"]["cached_tokens"], 4);
        assert_eq!(r["usage"]["output_tokens_details"]["reasoning_tokens"], 3);
    }

    #[test]
    fn a_gemini_stream_keeps_the_signature_in_the_call_id() {
        let (_, r) = converted(&|| Box::new(GeminiDecoder::default()), &Echo::default(), GEMINI);
        let calls: Vec<&Value> = r["output"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["type"] == "function_call")
            .collect();
        assert_eq!(calls.len(), 2, "{r}");
        let (_, sig) = crate::convert::split_signature(calls[0]["call_id"].as_str().unwrap());
        assert_eq!(sig.as_deref(), Some("CiQBVKhc7oFQ"));
    }

    #[test]
    fn a_custom_tool_call_streams_its_input_and_a_cut_stream_fails() {
        let echo = Echo {
            custom_tools: vec!["read".into()],
            ..Echo::default()
        };
        // The Anthropic transcript's `read` call, as a custom tool's stand-in.
        let input = ANTHROPIC.replace(r#"{\"path\":"#, r#"{\"input\":"#);
        let (names, r) = converted(&|| Box::new(AnthropicDecoder::default()), &echo, &input);
        assert!(
            names.contains(&"response.custom_tool_call_input.delta".to_string()),
            "{names:?}"
        );
        assert!(names.contains(&"response.custom_tool_call_input.done".to_string()));
        assert!(!names.iter().any(|n| n.starts_with("response.function_call")));
        let call = &r["output"][2];
        assert_eq!(call["type"], "custom_tool_call");
        assert_eq!(call["input"], "src/a.rs");
        // Cut before its end: the terminal event is response.failed.
        let cut = &ANTHROPIC[..ANTHROPIC.find("event: message_delta").unwrap()];
        let out = run(
            &|| Box::new(AnthropicDecoder::default()),
            &Echo::default(),
            cut,
            cut.len(),
        );
        let last = SseParser::parse_all(out.as_bytes()).pop().unwrap();
        assert_eq!(last.event.as_deref(), Some("response.failed"));
        let v: Value = serde_json::from_str(&last.data).unwrap();
        assert_eq!(v["response"]["status"], "failed");
        assert_eq!(v["response"]["error"]["code"], "server_error");
    }

    #[test]
    fn a_context_overflow_mid_stream_fails_with_the_code_codex_compacts_on() {
        let input = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"c\",\"usage\":{\"input_tokens\":1}}}\n\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"invalid_request_error\",\"message\":\"prompt is too long: 210012 tokens > 200000 maximum\"}}\n\n";
        let out = run(
            &|| Box::new(AnthropicDecoder::default()),
            &Echo::default(),
            input,
            input.len(),
        );
        let last = SseParser::parse_all(out.as_bytes()).pop().unwrap();
        assert_eq!(last.event.as_deref(), Some("response.failed"));
        let v: Value = serde_json::from_str(&last.data).unwrap();
        assert_eq!(v["response"]["error"]["code"], "context_length_exceeded", "{v}");
        // The quota a Gemini stream reports: not worth retrying.
        let quota = "data: {\"error\":{\"code\":429,\"message\":\"Quota exceeded\",\"status\":\"RESOURCE_EXHAUSTED\",\"details\":[{\"violations\":[{\"quotaId\":\"GenerateRequestsPerDayPerProjectPerModel\"}]}]}}\n\n";
        let out = run(
            &|| Box::new(GeminiDecoder::default()),
            &Echo::default(),
            quota,
            quota.len(),
        );
        let last = SseParser::parse_all(out.as_bytes()).pop().unwrap();
        let v: Value = serde_json::from_str(&last.data).unwrap();
        assert_eq!(v["response"]["error"]["code"], "insufficient_quota", "{v}");
    }

    #[test]
    fn a_length_stop_is_incomplete() {
        let mut e = ResponsesEncoder::new("m", 1, Echo::default());
        let mut out = Vec::new();
        for d in [Delta::Text("a".into()), Delta::Finish(Finish::Length), Delta::Done] {
            e.encode(&d, &mut out);
        }
        let last = SseParser::parse_all(&out).pop().unwrap();
        assert_eq!(last.event.as_deref(), Some("response.incomplete"));
        let v: Value = serde_json::from_str(&last.data).unwrap();
        assert_eq!(v["response"]["incomplete_details"]["reason"], "max_output_tokens");
    }
}
