//! OpenAI Responses (`POST /v1/responses`) ⇄ the IR, for clients such as
//! Codex CLI that speak only this API, toward upstreams that do not.
//!
//! Request items map onto IR parts one to one (`message` → text and media,
//! `function_call` / `function_call_output` → tool calls and results,
//! `reasoning` → thinking). Two things have no IR counterpart and are kept
//! in [`Echo`], the per-request context the answer's encoders need:
//!
//! - **custom (freeform) tools** such as Codex's `apply_patch`: sent to
//!   other providers as a function with one string parameter `input`, and
//!   their calls returned as `custom_tool_call` items carrying that string;
//! - the request fields a `response` object repeats (`tools`,
//!   `tool_choice`, `instructions`…).
//!
//! FastGate keeps no response store: `previous_response_id` (and
//! `conversation`) are refused; `store: false` with
//! `include: ["reasoning.encrypted_content"]` is how Codex works anyway.
//! Reasoning FastGate hands out carries the upstream's signed thinking in
//! `encrypted_content` behind [`SEALED`], so a client sending it back keeps
//! Anthropic's thinking across tool calls; encrypted content from OpenAI
//! itself cannot be used by another provider and is dropped (reported).

use super::{ConvertError, Loss, ir::*, media_of_url, opt_str, opt_u64};
use serde_json::{Map, Value, json};

/// The one parameter a custom tool's function stand-in takes.
pub const CUSTOM_INPUT: &str = "input";

/// Prefix of the `encrypted_content` FastGate writes: `s:` an Anthropic
/// thinking signature, `r:` Anthropic redacted thinking.
pub const SEALED: &str = "fastgate.v1:";

fn invalid(what: impl Into<String>) -> ConvertError {
    ConvertError::Invalid(what.into())
}

/// What the answer's encoders need from the request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Echo {
    /// Names of the client's custom (freeform) tools.
    pub custom_tools: Vec<String>,
    /// The request fields a `response` object repeats, as the client sent them.
    pub fields: Map<String, Value>,
}

impl Echo {
    pub fn is_custom(&self, name: &str) -> bool {
        self.custom_tools.iter().any(|n| n == name)
    }
}

/// Content parts of a message or a tool output (`input_text`,
/// `output_text`, `input_image`, `input_file`, `refusal`).
fn decode_content(content: &Value, loss: &mut Loss) -> Result<Vec<Part>, ConvertError> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => Ok(vec![Part::Text(s.clone())]),
        Value::Array(items) => {
            let mut parts = Vec::new();
            for item in items {
                match opt_str(item, "type") {
                    Some("input_text" | "output_text" | "text") => {
                        parts.push(Part::Text(opt_str(item, "text").unwrap_or_default().to_string()))
                    }
                    Some("refusal") => parts.push(Part::Text(opt_str(item, "refusal").unwrap_or_default().to_string())),
                    Some("input_image") => match opt_str(item, "image_url") {
                        Some(url) => parts.push(Part::Image(media_of_url(url))),
                        None => loss.dropped("input_image by file_id (upload the file to the target provider)"),
                    },
                    Some("input_file") => {
                        let data = opt_str(item, "file_data").or_else(|| opt_str(item, "file_url"));
                        parts.extend(super::document_part(
                            data,
                            opt_str(item, "filename"),
                            "input_file",
                            loss,
                        ));
                    }
                    Some(other) => loss.dropped(format!("{other} content parts")),
                    None => return Err(invalid("a content part without a type")),
                }
            }
            Ok(parts)
        }
        _ => Err(invalid("content must be a string or a list of parts")),
    }
}

/// Append parts to the last turn when it has the same role: consecutive
/// calls become one assistant turn, consecutive outputs one user turn.
fn push(messages: &mut Vec<Message>, role: Role, parts: Vec<Part>) {
    if parts.is_empty() {
        return;
    }
    match messages.last_mut() {
        Some(last) if last.role == role => last.parts.extend(parts),
        _ => messages.push(Message { role, parts }),
    }
}

/// A reasoning item as thinking: its summary text, and the signature it
/// carries when FastGate sealed it (else dropped: only OpenAI reads its own).
fn decode_reasoning(item: &Value, loss: &mut Loss) -> Option<Part> {
    let text: String = item
        .get("summary")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .chain(item.get("content").and_then(Value::as_array).into_iter().flatten())
        .filter_map(|s| opt_str(s, "text"))
        .collect::<Vec<_>>()
        .join("\n\n");
    let sealed = opt_str(item, "encrypted_content").filter(|e| !e.is_empty());
    match sealed.map(|e| e.strip_prefix(SEALED)) {
        Some(Some(rest)) => {
            if let Some(data) = rest.strip_prefix("r:") {
                return Some(Part::RedactedThinking(data.to_string()));
            }
            Some(Part::Thinking {
                text,
                signature: rest.strip_prefix("s:").map(str::to_string),
            })
        }
        Some(None) => {
            loss.dropped("reasoning encrypted_content made by OpenAI (only OpenAI can read it)");
            (!text.is_empty()).then_some(Part::Thinking { text, signature: None })
        }
        None => (!text.is_empty()).then_some(Part::Thinking { text, signature: None }),
    }
}

/// A tool output (`output`: text or content parts) as a tool result.
fn decode_output(item: &Value, loss: &mut Loss) -> Result<Part, ConvertError> {
    let call_id = opt_str(item, "call_id").ok_or_else(|| invalid("a tool output without call_id"))?;
    Ok(Part::ToolResult(ToolResult {
        call_id: super::split_signature(call_id).0,
        name: None,
        content: decode_content(item.get("output").unwrap_or(&Value::Null), loss)?,
        is_error: false,
    }))
}

fn decode_items(input: &Value, req: &mut ChatRequest, loss: &mut Loss) -> Result<(), ConvertError> {
    let items = match input {
        Value::String(s) => {
            push(&mut req.messages, Role::User, vec![Part::Text(s.clone())]);
            return Ok(());
        }
        Value::Array(items) => items,
        Value::Null => return Ok(()),
        _ => return Err(invalid("input must be a string or a list of items")),
    };
    for item in items {
        // An "easy" message has a role and no type.
        let kind = opt_str(item, "type").unwrap_or("message");
        match kind {
            "message" => {
                let role = opt_str(item, "role").ok_or_else(|| invalid("a message without a role"))?;
                let content = item.get("content").unwrap_or(&Value::Null);
                match role {
                    "system" | "developer" => {
                        let text = decode_content(content, loss)?
                            .into_iter()
                            .filter_map(|p| if let Part::Text(t) = p { Some(t) } else { None })
                            .collect::<Vec<_>>()
                            .join("\n");
                        req.system.push(text);
                    }
                    "user" => push(&mut req.messages, Role::User, decode_content(content, loss)?),
                    "assistant" => {
                        let parts = decode_content(content, loss)?
                            .into_iter()
                            .filter(|p| !matches!(p, Part::Text(t) if t.is_empty()))
                            .collect();
                        push(&mut req.messages, Role::Assistant, parts);
                    }
                    other => return Err(invalid(format!("unknown role {other:?}"))),
                }
            }
            "function_call" | "custom_tool_call" => {
                let (id, signature) = super::split_signature(
                    opt_str(item, "call_id").ok_or_else(|| invalid(format!("a {kind} without call_id")))?,
                );
                let name = opt_str(item, "name")
                    .ok_or_else(|| invalid(format!("a {kind} without a name")))?
                    .to_string();
                let arguments = if kind == "custom_tool_call" {
                    json!({ CUSTOM_INPUT: opt_str(item, "input").unwrap_or_default() }).to_string()
                } else {
                    opt_str(item, "arguments").unwrap_or("{}").to_string()
                };
                push(
                    &mut req.messages,
                    Role::Assistant,
                    vec![Part::ToolCall(ToolCall {
                        id,
                        name,
                        arguments,
                        signature,
                    })],
                );
            }
            "function_call_output" | "custom_tool_call_output" => {
                push(&mut req.messages, Role::User, vec![decode_output(item, loss)?]);
            }
            "reasoning" => {
                if let Some(p) = decode_reasoning(item, loss) {
                    push(&mut req.messages, Role::Assistant, vec![p]);
                }
            }
            "item_reference" => {
                return Err(ConvertError::Refused(
                    "item_reference needs a stored response, and FastGate keeps none: send the item itself".into(),
                ));
            }
            other => loss.dropped(format!("{other} input items")),
        }
    }
    Ok(())
}

/// A custom tool as a function taking its freeform text in `input`; the
/// grammar (if any) goes into the parameter's description so the model
/// still knows the format it must write.
fn custom_tool(t: &Value) -> Result<Tool, ConvertError> {
    let name = opt_str(t, "name").ok_or_else(|| invalid("a custom tool without a name"))?;
    let format = t.get("format").unwrap_or(&Value::Null);
    let mut about = String::from("The tool's whole input, as free text.");
    if opt_str(format, "type") == Some("grammar")
        && let Some(def) = opt_str(format, "definition")
    {
        about = format!(
            "The tool's whole input, as free text in this grammar ({} syntax):\n{def}",
            opt_str(format, "syntax").unwrap_or("lark")
        );
    }
    Ok(Tool {
        name: name.to_string(),
        description: opt_str(t, "description").map(str::to_string),
        parameters: json!({
            "type": "object",
            "properties": { CUSTOM_INPUT: { "type": "string", "description": about } },
            "required": [CUSTOM_INPUT],
            "additionalProperties": false,
        }),
    })
}

fn decode_tools(body: &Value, req: &mut ChatRequest, echo: &mut Echo, loss: &mut Loss) -> Result<(), ConvertError> {
    for t in body.get("tools").and_then(Value::as_array).into_iter().flatten() {
        match opt_str(t, "type") {
            Some("function") => req.tools.push(Tool {
                name: opt_str(t, "name")
                    .ok_or_else(|| invalid("a function tool without a name"))?
                    .to_string(),
                description: opt_str(t, "description").map(str::to_string),
                parameters: t
                    .get("parameters")
                    .filter(|p| p.is_object())
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            }),
            Some("custom") => {
                let tool = custom_tool(t)?;
                echo.custom_tools.push(tool.name.clone());
                req.tools.push(tool);
            }
            other => loss.dropped(format!("{} tools (OpenAI-hosted)", other.unwrap_or("untyped"))),
        }
    }
    req.tool_choice = match body.get("tool_choice") {
        Some(Value::String(s)) if s == "auto" => Some(ToolChoice::Auto),
        Some(Value::String(s)) if s == "none" => Some(ToolChoice::None),
        Some(Value::String(s)) if s == "required" => Some(ToolChoice::Required),
        Some(v @ Value::Object(_)) => match opt_str(v, "type") {
            Some("function" | "custom") => opt_str(v, "name").map(|n| ToolChoice::Named(n.to_string())),
            Some("allowed_tools") => {
                loss.dropped("tool_choice allowed_tools (every tool stays allowed)");
                match opt_str(v, "mode") {
                    Some("required") => Some(ToolChoice::Required),
                    _ => Some(ToolChoice::Auto),
                }
            }
            _ => {
                loss.dropped("tool_choice of an OpenAI-hosted tool");
                None
            }
        },
        _ => None,
    };
    req.parallel_tool_calls = body.get("parallel_tool_calls").and_then(Value::as_bool);
    Ok(())
}

fn decode_effort(e: &str) -> Option<Reasoning> {
    let effort = match e {
        "minimal" => Effort::Minimal,
        "low" => Effort::Low,
        "medium" => Effort::Medium,
        "high" | "xhigh" => Effort::High,
        "none" => {
            return Some(Reasoning {
                effort: None,
                budget_tokens: None,
                disabled: true,
            });
        }
        _ => return None,
    };
    Some(Reasoning {
        effort: Some(effort),
        budget_tokens: None,
        disabled: false,
    })
}

/// Fields of the request a `response` object repeats (with the defaults
/// OpenAI fills in for the ones every response has).
const ECHOED: &[&str] = &[
    "instructions",
    "max_output_tokens",
    "metadata",
    "parallel_tool_calls",
    "reasoning",
    "store",
    "temperature",
    "text",
    "tool_choice",
    "tools",
    "top_p",
    "truncation",
    "user",
];

pub fn decode_request(body: &Value, loss: &mut Loss) -> Result<(ChatRequest, Echo), ConvertError> {
    let obj = body
        .as_object()
        .ok_or_else(|| invalid("the body must be a JSON object"))?;
    for stateful in ["previous_response_id", "conversation"] {
        if obj.get(stateful).is_some_and(|v| !v.is_null()) {
            return Err(ConvertError::Refused(format!(
                "{stateful} is not supported: FastGate keeps no response store. Send the whole conversation in `input` (with `store: false`, as Codex does)"
            )));
        }
    }
    if obj.get("background").and_then(Value::as_bool) == Some(true) {
        return Err(ConvertError::Refused(
            "background responses are not supported: FastGate keeps no response store".into(),
        ));
    }
    let mut req = ChatRequest {
        model: opt_str(body, "model").unwrap_or_default().to_string(),
        ..ChatRequest::default()
    };
    let mut echo = Echo::default();
    if let Some(i) = opt_str(body, "instructions").filter(|i| !i.is_empty()) {
        req.system.push(i.to_string());
    }
    decode_items(body.get("input").unwrap_or(&Value::Null), &mut req, loss)?;
    decode_tools(body, &mut req, &mut echo, loss)?;
    // Ranges as OpenAI's API reference gives them.
    req.max_tokens = super::count_field(body, "max_output_tokens", 1)?;
    req.temperature = super::number_field(body, "temperature", 0.0, 2.0)?;
    req.top_p = super::number_field(body, "top_p", 0.0, 1.0)?;
    req.reasoning = body
        .get("reasoning")
        .and_then(|r| opt_str(r, "effort"))
        .and_then(decode_effort);
    let format = body.get("text").and_then(|t| t.get("format"));
    req.response_format = format.and_then(|f| match opt_str(f, "type") {
        Some("json_schema") => Some(ResponseFormat::JsonSchema {
            name: opt_str(f, "name").unwrap_or("response").to_string(),
            schema: f.get("schema").cloned().unwrap_or(Value::Null),
            strict: f.get("strict").and_then(Value::as_bool).unwrap_or(false),
        }),
        Some("json_object") => Some(ResponseFormat::JsonObject),
        _ => None,
    });
    req.stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    // A Responses stream always ends with its usage.
    req.include_usage = req.stream;
    req.user = opt_str(body, "safety_identifier")
        .or_else(|| opt_str(body, "user"))
        .map(str::to_string);
    if body.get("store").and_then(Value::as_bool) == Some(true) {
        loss.dropped("store (FastGate keeps no responses)");
    }
    if opt_u64(body, "top_logprobs").is_some_and(|n| n > 0) {
        loss.dropped("top_logprobs");
    }
    if body.get("max_tool_calls").is_some_and(|v| !v.is_null()) {
        loss.dropped("max_tool_calls");
    }
    for key in ECHOED {
        if let Some(v) = obj.get(*key) {
            echo.fields.insert((*key).to_string(), v.clone());
        }
    }
    Ok((req, echo))
}

/// Output status and, when incomplete, why.
pub fn status_of(finish: Option<&Finish>) -> (&'static str, Option<&'static str>) {
    match finish {
        Some(Finish::Length) => ("incomplete", Some("max_output_tokens")),
        Some(Finish::ContentFilter | Finish::Refusal) => ("incomplete", Some("content_filter")),
        _ => ("completed", None),
    }
}

pub fn usage_to_wire(u: &Usage) -> Value {
    json!({
        "input_tokens": u.input_total(),
        "input_tokens_details": {"cached_tokens": u.cache_read},
        "output_tokens": u.output,
        "output_tokens_details": {"reasoning_tokens": u.reasoning},
        "total_tokens": u.input_total() + u.output,
    })
}

/// A custom tool's input from its function stand-in's arguments (the
/// arguments text itself when the model did not use the `input` object).
pub fn custom_input(arguments: &str) -> String {
    match serde_json::from_str::<Value>(arguments) {
        Ok(Value::Object(mut o)) => match o.remove(CUSTOM_INPUT) {
            Some(Value::String(s)) => s,
            _ => arguments.to_string(),
        },
        _ => arguments.to_string(),
    }
}

/// A call as its output item (`function_call`, or `custom_tool_call` for a
/// custom tool).
pub fn call_item(id: &str, c: &ToolCall, echo: &Echo, status: &str) -> Value {
    let call_id = super::id_with_signature(&c.id, c.signature.as_deref());
    if echo.is_custom(&c.name) {
        json!({"id": id, "type": "custom_tool_call", "call_id": call_id, "name": c.name, "input": custom_input(&c.arguments)})
    } else {
        json!({"id": id, "type": "function_call", "status": status, "call_id": call_id, "name": c.name, "arguments": arguments_or_empty_object(&c.arguments)})
    }
}

/// A call without arguments has `"{}"`, never `""` (which clients cannot
/// parse as JSON).
pub fn arguments_or_empty_object(arguments: &str) -> &str {
    if arguments.trim().is_empty() { "{}" } else { arguments }
}

/// A reasoning item; signed or redacted thinking is sealed into
/// `encrypted_content` so the client can send it back.
pub fn reasoning_item(id: &str, text: &str, sealed: Option<String>) -> Value {
    let summary = if text.is_empty() {
        json!([])
    } else {
        json!([{"type": "summary_text", "text": text}])
    };
    let mut item = json!({"id": id, "type": "reasoning", "summary": summary});
    if let Some(s) = sealed {
        item["encrypted_content"] = s.into();
    }
    item
}

pub fn seal_signature(sig: &str) -> String {
    format!("{SEALED}s:{sig}")
}

pub fn seal_redacted(data: &str) -> String {
    format!("{SEALED}r:{data}")
}

pub fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"id": id, "type": "message", "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
}

/// What names a response: its id, model and creation time.
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    pub id: &'a str,
    pub model: &'a str,
    pub created_at: i64,
}

/// The `response` object: what the request asked (`echo`), the output so
/// far, its status and usage.
pub fn response_object(
    head: &Head<'_>,
    echo: &Echo,
    output: Vec<Value>,
    finish: Option<&Finish>,
    usage: Option<&Usage>,
    status: Option<&str>,
) -> Value {
    let (done_status, reason) = status_of(finish);
    let mut r = Map::new();
    r.insert("id".into(), head.id.into());
    r.insert("object".into(), "response".into());
    r.insert("created_at".into(), head.created_at.into());
    r.insert("status".into(), status.unwrap_or(done_status).into());
    r.insert("error".into(), Value::Null);
    r.insert(
        "incomplete_details".into(),
        match reason.filter(|_| status.is_none()) {
            Some(reason) => json!({ "reason": reason }),
            None => Value::Null,
        },
    );
    r.insert("model".into(), head.model.into());
    r.insert("output".into(), Value::Array(output));
    for (k, v) in &echo.fields {
        r.insert(k.clone(), v.clone());
    }
    r.entry("parallel_tool_calls").or_insert(true.into());
    r.entry("tool_choice").or_insert("auto".into());
    r.entry("tools").or_insert(json!([]));
    r.entry("previous_response_id").or_insert(Value::Null);
    r.insert("usage".into(), usage.map_or(Value::Null, usage_to_wire));
    Value::Object(r)
}

/// A new response id (`resp_…`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// A whole answer as a `response` object.
pub fn encode_response(resp: &ChatResponse, echo: &Echo, created_at: i64) -> Value {
    let base = uuid::Uuid::now_v7().simple().to_string();
    let mut output = Vec::new();
    let mut text = String::new();
    let flush_text = |text: &mut String, output: &mut Vec<Value>| {
        if !text.is_empty() {
            let id = format!("msg_{base}_{}", output.len());
            output.push(message_item(&id, text, "completed"));
            text.clear();
        }
    };
    for p in &resp.parts {
        match p {
            Part::Text(t) => text.push_str(t),
            Part::Thinking { text: t, signature } => {
                flush_text(&mut text, &mut output);
                let id = format!("rs_{base}_{}", output.len());
                output.push(reasoning_item(&id, t, signature.as_deref().map(seal_signature)));
            }
            Part::RedactedThinking(data) => {
                flush_text(&mut text, &mut output);
                let id = format!("rs_{base}_{}", output.len());
                output.push(reasoning_item(&id, "", Some(seal_redacted(data))));
            }
            Part::ToolCall(c) => {
                flush_text(&mut text, &mut output);
                let prefix = if echo.is_custom(&c.name) { "ctc" } else { "fc" };
                let id = format!("{prefix}_{base}_{}", output.len());
                output.push(call_item(&id, c, echo, "completed"));
            }
            Part::Image(_) | Part::Document { .. } | Part::ToolResult(_) => {}
        }
    }
    flush_text(&mut text, &mut output);
    let id = if resp.id.starts_with("resp_") {
        resp.id.clone()
    } else {
        format!("resp_{base}")
    };
    let head = Head {
        id: &id,
        model: &resp.model,
        created_at,
    };
    response_object(&head, echo, output, resp.finish.as_ref(), resp.usage.as_ref(), None)
}

/// Reads a custom tool's `input` out of its stand-in function's arguments
/// as they stream (`{"input": "…`), so the input streams too: each call of
/// [`InputTail::feed`] gives the text decoded since the last one. An escape
/// cut between two pieces waits for the next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InputTail {
    /// Where the string value starts in the arguments, once seen.
    value_at: Option<usize>,
    /// How far the value is decoded.
    pos: usize,
    ended: bool,
    /// Everything given out so far.
    pub sent: String,
}

impl InputTail {
    /// The newly decoded part of the input, given the whole arguments so far.
    pub fn feed(&mut self, raw: &str) -> String {
        if self.ended {
            return String::new();
        }
        if self.value_at.is_none() {
            let Some(at) = value_start(raw) else {
                return String::new();
            };
            self.value_at = Some(at);
            self.pos = at;
        }
        let (piece, pos, ended) = decode_partial(raw, self.pos);
        self.pos = pos;
        self.ended = ended;
        self.sent.push_str(&piece);
        piece
    }
}

/// The offset just past the opening quote of `"input": "`, if it came yet.
fn value_start(raw: &str) -> Option<usize> {
    let key = format!("\"{CUSTOM_INPUT}\"");
    let after = raw.find(&key)? + key.len();
    let rest = &raw[after..];
    let colon = rest.trim_start();
    let colon = colon.strip_prefix(':')?;
    let quote = colon.trim_start();
    quote.strip_prefix('"')?;
    Some(raw.len() - quote.len() + 1)
}

/// Decode a JSON string's content from `from` up to its closing quote or
/// the end of what came; an escape not yet whole is left for later.
/// Returns (text, where decoding stopped, whether the string ended).
fn decode_partial(raw: &str, from: usize) -> (String, usize, bool) {
    let bytes = raw.as_bytes();
    let mut out = String::new();
    let mut i = from;
    let mut plain = from;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                out.push_str(&raw[plain..i]);
                return (out, i + 1, true);
            }
            b'\\' => {
                out.push_str(&raw[plain..i]);
                let len = match bytes.get(i + 1) {
                    None => return (out, i, false),
                    Some(b'u') => {
                        // A high surrogate needs its low half too.
                        let high = raw.get(i + 2..i + 6).and_then(|h| u16::from_str_radix(h, 16).ok());
                        match high {
                            None => return (out, i, false),
                            Some(h) if (0xD800..0xDC00).contains(&h) => 12,
                            Some(_) => 6,
                        }
                    }
                    Some(_) => 2,
                };
                let Some(escape) = raw.get(i..i + len) else {
                    return (out, i, false);
                };
                match serde_json::from_str::<String>(&format!("\"{escape}\"")) {
                    Ok(s) => out.push_str(&s),
                    // A broken escape: kept as it came.
                    Err(_) => out.push_str(escape),
                }
                i += len;
                plain = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&raw[plain..]);
    (out, bytes.len(), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_custom_input_streams_out_of_its_arguments_whatever_the_pieces() {
        let input = "*** Begin Patch\n+Hi \"you\" \u{1F600} \\ é\n*** End Patch";
        let args = json!({ CUSTOM_INPUT: input }).to_string();
        let escaped = serde_json::to_string(input)
            .unwrap()
            .replace('\u{1F600}', "\\ud83d\\ude00");
        for raw in [args.clone(), format!("{{ \"input\" : {escaped} }}")] {
            for step in [1, 2, 3, 7, raw.len()] {
                let mut tail = InputTail::default();
                let mut got = String::new();
                let mut end = 0;
                while end < raw.len() {
                    end = (end + step).min(raw.len());
                    while !raw.is_char_boundary(end) {
                        end += 1;
                    }
                    got.push_str(&tail.feed(&raw[..end]));
                }
                assert_eq!(got, input, "{raw} by {step}");
                assert_eq!(custom_input(&raw), input);
            }
        }
    }

    #[test]
    fn items_decode_into_turns() {
        let body = json!({"model": "m", "instructions": "I", "input": [
            {"role": "developer", "content": "D"},
            {"role": "user", "content": [{"type": "input_text", "text": "u"}, {"type": "input_image", "image_url": "data:image/png;base64,AAA"}]},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "r"}], "encrypted_content": "fastgate.v1:s:S"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "custom_tool_call", "call_id": "c2", "name": "p", "input": "x"},
            {"type": "function_call_output", "call_id": "c1", "output": "o1"},
            {"type": "custom_tool_call_output", "call_id": "c2", "output": "o2"},
            {"type": "reasoning", "summary": [], "encrypted_content": "gAAAA"},
            {"type": "reasoning", "summary": [], "encrypted_content": "fastgate.v1:r:R"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
            {"type": "web_search_call", "id": "ws"},
        ], "tools": [{"type": "custom", "name": "p"}, {"type": "web_search"}],
           "tool_choice": {"type": "custom", "name": "p"}, "reasoning": {"effort": "xhigh"},
           "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}, "strict": true}}});
        let mut loss = Loss::default();
        let (req, echo) = decode_request(&body, &mut loss).unwrap();
        assert_eq!(req.system, ["I", "D"]);
        assert_eq!(req.messages.len(), 4);
        assert_eq!(req.messages[0].parts.len(), 2);
        assert!(matches!(&req.messages[1].parts[0], Part::Thinking { signature: Some(s), .. } if s == "S"));
        assert!(matches!(&req.messages[1].parts[2], Part::ToolCall(c) if c.arguments == r#"{"input":"x"}"#));
        assert_eq!(req.messages[2].parts.len(), 2, "both outputs in one user turn");
        assert_eq!(req.messages[3].parts[0], Part::RedactedThinking("R".into()));
        assert_eq!(req.messages[3].parts[1], Part::Text("a".into()));
        assert_eq!(echo.custom_tools, ["p"]);
        assert_eq!(req.tools.len(), 1);
        assert_eq!(req.tool_choice, Some(ToolChoice::Named("p".into())));
        assert_eq!(req.reasoning.and_then(|r| r.effort), Some(Effort::High));
        assert!(matches!(
            req.response_format,
            Some(ResponseFormat::JsonSchema { strict: true, .. })
        ));
        let warned = loss.header_value().unwrap();
        for what in [
            "encrypted_content made by OpenAI",
            "web_search_call input items",
            "web_search tools",
        ] {
            assert!(warned.contains(what), "{warned}");
        }
    }

    #[test]
    fn stateful_requests_are_refused() {
        for (k, v) in [
            ("previous_response_id", json!("resp_1")),
            ("conversation", json!("conv_1")),
            ("background", json!(true)),
        ] {
            let mut body = json!({"model": "m", "input": "hi"});
            body[k] = v;
            assert!(matches!(
                decode_request(&body, &mut Loss::default()),
                Err(ConvertError::Refused(_))
            ));
        }
        let ok = json!({"model": "m", "input": "hi", "previous_response_id": null, "store": false});
        assert!(decode_request(&ok, &mut Loss::default()).is_ok());
    }

    #[test]
    fn an_answer_becomes_a_response_object() {
        let echo = Echo {
            custom_tools: vec!["p".into()],
            fields: Map::new(),
        };
        let resp = ChatResponse {
            id: "x".into(),
            model: "m".into(),
            parts: vec![
                Part::Thinking {
                    text: "t".into(),
                    signature: Some("S".into()),
                },
                Part::Text("a".into()),
                Part::Text("b".into()),
                Part::ToolCall(ToolCall {
                    id: "c1".into(),
                    name: "f".into(),
                    arguments: String::new(),
                    signature: None,
                }),
                Part::ToolCall(ToolCall {
                    id: "c2".into(),
                    name: "p".into(),
                    arguments: r#"{"input":"patch"}"#.into(),
                    signature: None,
                }),
            ],
            finish: Some(Finish::Length),
            usage: Some(Usage {
                input: 3,
                cache_read: 2,
                cache_write: 0,
                output: 5,
                reasoning: 1,
            }),
            more: Vec::new(),
        };
        let v = encode_response(&resp, &echo, 7);
        assert_eq!(v["status"], "incomplete");
        assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
        let out = v["output"].as_array().unwrap();
        assert_eq!(out.len(), 4);
        assert_eq!(out[0]["encrypted_content"], "fastgate.v1:s:S");
        assert_eq!(out[1]["content"][0]["text"], "ab");
        assert_eq!(out[2]["arguments"], "{}", "no arguments: an empty object, never \"\"");
        assert_eq!(out[3]["type"], "custom_tool_call");
        assert_eq!(out[3]["input"], "patch");
        assert_eq!(
            v["usage"],
            json!({"input_tokens": 5, "input_tokens_details": {"cached_tokens": 2}, "output_tokens": 5,
                "output_tokens_details": {"reasoning_tokens": 1}, "total_tokens": 10})
        );
        assert_eq!(v["tool_choice"], "auto");
        assert_eq!(v["parallel_tool_calls"], true);
    }
}
