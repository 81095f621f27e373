//! OpenAI Chat Completions (`/v1/chat/completions`) ⇄ the IR.

use super::{ConvertError, Loss, arguments_object, ir::*, media_of_url, opt_str, opt_u64, plain_text};
use serde_json::{Map, Value, json};

/// OpenAI caps function names at 64 characters.
pub const MAX_TOOL_NAME: usize = 64;

fn invalid(what: impl Into<String>) -> ConvertError {
    ConvertError::Invalid(what.into())
}

fn url_of_media(m: &Media) -> String {
    match m {
        Media::Base64 { media_type, data } => format!("data:{media_type};base64,{data}"),
        Media::Url { url, .. } => url.clone(),
    }
}

/// Content parts of a user (or tool) message.
fn decode_parts(content: &Value, loss: &mut Loss) -> Result<Vec<Part>, ConvertError> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => Ok(vec![Part::Text(s.clone())]),
        Value::Array(items) => {
            let mut parts = Vec::new();
            for item in items {
                match opt_str(item, "type") {
                    Some("text") => parts.push(Part::Text(opt_str(item, "text").unwrap_or_default().to_string())),
                    Some("image_url") => {
                        let url = item
                            .get("image_url")
                            .and_then(|i| i.get("url").or(Some(i)))
                            .and_then(Value::as_str)
                            .ok_or_else(|| invalid("image_url without a url"))?;
                        parts.push(Part::Image(media_of_url(url)));
                    }
                    Some("file") => {
                        let file = item.get("file").unwrap_or(&Value::Null);
                        let (data, name) = (opt_str(file, "file_data"), opt_str(file, "filename"));
                        parts.extend(super::document_part(data, name, "file parts", loss));
                    }
                    Some(other) => loss.dropped(format!("{other} content parts")),
                    None => return Err(invalid("a content part without a type")),
                }
            }
            Ok(parts)
        }
        _ => Err(invalid("message content must be a string or a list of parts")),
    }
}

pub fn decode_request(body: &Value, loss: &mut Loss) -> Result<ChatRequest, ConvertError> {
    let obj = body
        .as_object()
        .ok_or_else(|| invalid("the body must be a JSON object"))?;
    let mut req = ChatRequest {
        model: opt_str(body, "model").unwrap_or_default().to_string(),
        ..ChatRequest::default()
    };
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("messages must be a list"))?;
    for m in messages {
        let role = opt_str(m, "role").ok_or_else(|| invalid("a message without a role"))?;
        let content = m.get("content").unwrap_or(&Value::Null);
        match role {
            "system" | "developer" => {
                req.system
                    .push(plain_text(content).ok_or_else(|| invalid("system content must be text"))?);
            }
            "user" => push(&mut req.messages, Role::User, decode_parts(content, loss)?),
            "assistant" => {
                let mut parts = Vec::new();
                // OpenAI-compatible servers (DeepSeek, vLLM) put reasoning here.
                if let Some(r) = opt_str(m, "reasoning_content").filter(|r| !r.is_empty()) {
                    parts.push(Part::Thinking {
                        text: r.to_string(),
                        signature: None,
                    });
                }
                parts.extend(
                    decode_parts(content, loss)?
                        .into_iter()
                        .filter(|p| !matches!(p, Part::Text(t) if t.is_empty())),
                );
                if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
                    for c in calls {
                        let f = c.get("function").unwrap_or(&Value::Null);
                        let (id, signature) = super::split_signature(opt_str(c, "id").unwrap_or_default());
                        parts.push(Part::ToolCall(ToolCall {
                            id,
                            name: opt_str(f, "name")
                                .ok_or_else(|| invalid("a tool call without a name"))?
                                .to_string(),
                            arguments: opt_str(f, "arguments").unwrap_or("{}").to_string(),
                            signature,
                        }));
                    }
                }
                push(&mut req.messages, Role::Assistant, parts);
            }
            "tool" => {
                let call_id =
                    opt_str(m, "tool_call_id").ok_or_else(|| invalid("a tool message without tool_call_id"))?;
                let result = Part::ToolResult(ToolResult {
                    call_id: super::split_signature(call_id).0,
                    name: None,
                    content: decode_parts(content, loss)?,
                    is_error: false,
                });
                // Consecutive tool messages answer one assistant turn: one user turn.
                push(&mut req.messages, Role::User, vec![result]);
            }
            "function" => {
                return Err(ConvertError::Refused(
                    "the legacy `function` role is not converted; use `tool` messages".into(),
                ));
            }
            other => return Err(invalid(format!("unknown role {other:?}"))),
        }
    }
    // Ranges as OpenAI's API reference gives them.
    req.max_tokens = match super::count_field(body, "max_completion_tokens", 1)? {
        Some(n) => Some(n),
        None => super::count_field(body, "max_tokens", 1)?,
    };
    req.temperature = super::number_field(body, "temperature", 0.0, 2.0)?;
    req.top_p = super::number_field(body, "top_p", 0.0, 1.0)?;
    req.seed = body.get("seed").and_then(Value::as_i64);
    req.presence_penalty = super::number_field(body, "presence_penalty", -2.0, 2.0)?;
    req.frequency_penalty = super::number_field(body, "frequency_penalty", -2.0, 2.0)?;
    req.stop = match body.get("stop") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        _ => Vec::new(),
    };
    if let Some(tools) = body.get("tools").and_then(Value::as_array) {
        for t in tools {
            if opt_str(t, "type") != Some("function") {
                loss.dropped(format!("{} tools", opt_str(t, "type").unwrap_or("untyped")));
                continue;
            }
            let f = t.get("function").unwrap_or(&Value::Null);
            req.tools.push(Tool {
                name: opt_str(f, "name")
                    .ok_or_else(|| invalid("a tool without a name"))?
                    .to_string(),
                description: opt_str(f, "description").map(str::to_string),
                parameters: f
                    .get("parameters")
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            });
        }
    }
    req.tool_choice = match body.get("tool_choice") {
        Some(Value::String(s)) if s == "auto" => Some(ToolChoice::Auto),
        Some(Value::String(s)) if s == "none" => Some(ToolChoice::None),
        Some(Value::String(s)) if s == "required" => Some(ToolChoice::Required),
        Some(v @ Value::Object(_)) => v
            .get("function")
            .and_then(|f| opt_str(f, "name"))
            .map(|n| ToolChoice::Named(n.to_string())),
        _ => None,
    };
    req.parallel_tool_calls = body.get("parallel_tool_calls").and_then(Value::as_bool);
    req.response_format = body.get("response_format").and_then(|rf| match opt_str(rf, "type") {
        Some("json_object") => Some(ResponseFormat::JsonObject),
        Some("json_schema") => {
            let js = rf.get("json_schema").unwrap_or(&Value::Null);
            Some(ResponseFormat::JsonSchema {
                name: opt_str(js, "name").unwrap_or("response").to_string(),
                schema: js.get("schema").cloned().unwrap_or(Value::Null),
                strict: js.get("strict").and_then(Value::as_bool).unwrap_or(false),
            })
        }
        Some("text") => Some(ResponseFormat::Text),
        _ => None,
    });
    req.reasoning = opt_str(body, "reasoning_effort").and_then(|e| {
        let effort = match e {
            "minimal" => Effort::Minimal,
            "low" => Effort::Low,
            "medium" => Effort::Medium,
            "high" => Effort::High,
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
    });
    req.stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    req.include_usage = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    req.user = opt_str(body, "user").map(str::to_string);
    req.only.candidates = opt_u64(body, "n");
    req.only.logprobs = body.get("logprobs").and_then(Value::as_bool).unwrap_or(false);
    Ok(req)
}

/// Append parts to the last message when it has the same role (OpenAI
/// allows consecutive same-role messages; others want them merged).
fn push(messages: &mut Vec<Message>, role: Role, parts: Vec<Part>) {
    match messages.last_mut() {
        Some(last) if last.role == role => last.parts.extend(parts),
        _ => messages.push(Message { role, parts }),
    }
}

fn content_value(parts: &[Part]) -> Value {
    if let [Part::Text(t)] = parts {
        return Value::String(t.clone());
    }
    Value::Array(
        parts
            .iter()
            .filter_map(|p| match p {
                Part::Text(t) => Some(json!({"type": "text", "text": t})),
                Part::Image(m) => Some(json!({"type": "image_url", "image_url": {"url": url_of_media(m)}})),
                Part::Document { media, title } => Some(json!({"type": "file", "file": {
                    "file_data": url_of_media(media),
                    "filename": title.clone().unwrap_or_else(|| "document.pdf".into()),
                }})),
                _ => None,
            })
            .collect(),
    )
}

/// Tool names OpenAI accepts, and the way back to the original names.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ToolNames(pub Vec<(String, String)>);

impl ToolNames {
    /// The name to send: names over 64 characters are cut and given a hash
    /// suffix, so different long names stay different.
    pub fn outbound(&mut self, name: &str) -> String {
        if name.len() <= MAX_TOOL_NAME {
            return name.to_string();
        }
        if let Some((short, _)) = self.0.iter().find(|(_, long)| long == name) {
            return short.clone();
        }
        use sha2::Digest;
        let digest = hex::encode(&sha2::Sha256::digest(name.as_bytes())[..4]);
        let mut cut = MAX_TOOL_NAME - 9;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        let short = format!("{}_{digest}", &name[..cut]);
        self.0.push((short.clone(), name.to_string()));
        short
    }

    /// The client's name for a name the upstream used.
    pub fn inbound(&self, name: &str) -> String {
        self.0
            .iter()
            .find(|(short, _)| short == name)
            .map_or_else(|| name.to_string(), |(_, long)| long.clone())
    }
}

/// What an OpenAI-format request is sent to: OpenAI itself or an
/// OpenAI-compatible server, and whether the model reasons.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Target {
    /// `provider: openai_compatible` (vLLM, Ollama, DeepSeek…): the classic
    /// `max_tokens`, no `reasoning_effort`.
    pub compatible: bool,
    /// Whether the model is a reasoning model (`max_completion_tokens`,
    /// `reasoning_effort`), from the capability table; `None`: judged by its
    /// name (OpenAI's reasoning models; never on a compatible server).
    pub reasoning: Option<bool>,
}

impl Target {
    fn reasons(self, model: &str) -> bool {
        self.reasoning
            .unwrap_or_else(|| !self.compatible && is_reasoning_model(model))
    }
}

/// OpenAI's reasoning models by name: the o-series and GPT-5 (not its
/// `-chat` variants).
pub fn is_reasoning_model(model: &str) -> bool {
    let m = model.rsplit('/').next().unwrap_or(model).to_ascii_lowercase();
    let o_series = m.len() >= 2 && m.starts_with('o') && m.as_bytes()[1].is_ascii_digit();
    o_series || (m.starts_with("gpt-5") && !m.contains("-chat")) || m.starts_with("codex-")
}

/// Encode for OpenAI itself, the model's kind judged by its name.
pub fn encode_request(req: &ChatRequest, names: &mut ToolNames, loss: &mut Loss) -> Result<Value, ConvertError> {
    encode_request_to(req, Target::default(), names, loss)
}

/// Encode for an OpenAI-format upstream: `target` says which parameters it takes.
pub fn encode_request_to(
    req: &ChatRequest,
    target: Target,
    names: &mut ToolNames,
    loss: &mut Loss,
) -> Result<Value, ConvertError> {
    if req.stream && req.only.candidates.is_some_and(|n| n > 1) {
        // Only a Gemini client sets it; its stream would carry one
        // candidate of the several asked for, silently.
        return Err(ConvertError::Refused(
            "candidateCount > 1 is not converted for streams from OpenAI upstreams; ask without streaming, or send separate requests"
                .into(),
        ));
    }
    let reasons = target.reasons(&req.model);
    let mut messages: Vec<Value> = req
        .system
        .iter()
        .map(|s| json!({"role": "system", "content": s}))
        .collect();
    for m in &req.messages {
        match m.role {
            Role::User => {
                let (results, rest): (Vec<&Part>, Vec<&Part>) =
                    m.parts.iter().partition(|p| matches!(p, Part::ToolResult(_)));
                // Tool results first: they answer the previous assistant turn.
                // OpenAI tool messages hold text only: images in results
                // follow in a user message.
                let mut carried: Vec<Part> = Vec::new();
                for r in results {
                    if let Part::ToolResult(r) = r {
                        let text = r
                            .content
                            .iter()
                            .filter_map(|p| if let Part::Text(t) = p { Some(t.as_str()) } else { None })
                            .collect::<Vec<_>>()
                            .join("\n");
                        carried.extend(r.content.iter().filter(|p| !matches!(p, Part::Text(_))).cloned());
                        messages.push(json!({"role": "tool", "tool_call_id": r.call_id, "content": text}));
                    }
                }
                carried.extend(rest.into_iter().cloned());
                if !carried.is_empty() {
                    messages.push(json!({"role": "user", "content": content_value(&carried)}));
                }
            }
            Role::Assistant => {
                let mut msg = Map::new();
                msg.insert("role".into(), "assistant".into());
                let text: String = m
                    .parts
                    .iter()
                    .filter_map(|p| if let Part::Text(t) = p { Some(t.as_str()) } else { None })
                    .collect();
                msg.insert(
                    "content".into(),
                    if text.is_empty() {
                        Value::Null
                    } else {
                        Value::String(text)
                    },
                );
                let calls: Vec<Value> = m
                    .parts
                    .iter()
                    .filter_map(|p| match p {
                        Part::ToolCall(c) => Some(json!({"id": c.id, "type": "function", "function": {"name": names.outbound(&c.name), "arguments": c.arguments}})),
                        _ => None,
                    })
                    .collect();
                if !calls.is_empty() {
                    msg.insert("tool_calls".into(), Value::Array(calls));
                }
                if m.parts
                    .iter()
                    .any(|p| matches!(p, Part::Thinking { .. } | Part::RedactedThinking(_)))
                {
                    loss.dropped("earlier reasoning blocks (OpenAI takes none back)");
                }
                messages.push(Value::Object(msg));
            }
        }
    }
    let mut out = Map::new();
    out.insert("model".into(), req.model.clone().into());
    out.insert("messages".into(), Value::Array(messages));
    if let Some(n) = req.max_tokens {
        // Reasoning models want max_completion_tokens (they refuse
        // max_tokens); compatible servers and older models know max_tokens.
        let key = if reasons { "max_completion_tokens" } else { "max_tokens" };
        out.insert(key.into(), n.into());
    }
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            out.insert(k.into(), v);
        }
    };
    // Reasoning models take only the default sampling (OpenAI answers 400
    // "Unsupported value: 'temperature' does not support 0.2 with this
    // model"); 1 is the default, so it is no loss.
    let sampling = |name: &'static str, v: Option<f64>, default: f64, loss: &mut Loss| match v {
        Some(x) if reasons && x != default => {
            loss.dropped(name);
            None
        }
        Some(_) if reasons => None,
        v => v.map(Value::from),
    };
    put(
        "temperature",
        sampling(
            "temperature (OpenAI reasoning models take only the default)",
            req.temperature,
            1.0,
            loss,
        ),
    );
    put(
        "top_p",
        sampling(
            "top_p (OpenAI reasoning models take only the default)",
            req.top_p,
            1.0,
            loss,
        ),
    );
    put("seed", req.seed.map(Value::from));
    put(
        "presence_penalty",
        sampling(
            "presence_penalty (not taken by OpenAI reasoning models)",
            req.presence_penalty,
            0.0,
            loss,
        ),
    );
    put(
        "frequency_penalty",
        sampling(
            "frequency_penalty (not taken by OpenAI reasoning models)",
            req.frequency_penalty,
            0.0,
            loss,
        ),
    );
    put("user", req.user.clone().map(Value::from));
    put("n", req.only.candidates.map(Value::from));
    if req.top_k.is_some() {
        loss.dropped("top_k (OpenAI has none)");
    }
    if !req.stop.is_empty() {
        if req.stop.len() > 4 {
            loss.dropped("stop sequences beyond the 4 OpenAI accepts");
        }
        out.insert("stop".into(), json!(req.stop.iter().take(4).collect::<Vec<_>>()));
    }
    if !req.tools.is_empty() {
        let tools: Vec<Value> = req
            .tools
            .iter()
            .map(|t| {
                let mut f = json!({"name": names.outbound(&t.name), "parameters": t.parameters});
                if let Some(d) = &t.description {
                    f["description"] = d.clone().into();
                }
                json!({"type": "function", "function": f})
            })
            .collect();
        out.insert("tools".into(), Value::Array(tools));
    }
    if let Some(tc) = &req.tool_choice {
        let v = match tc {
            ToolChoice::Auto => json!("auto"),
            ToolChoice::None => json!("none"),
            ToolChoice::Required => json!("required"),
            ToolChoice::Named(n) => json!({"type": "function", "function": {"name": names.outbound(n)}}),
        };
        out.insert("tool_choice".into(), v);
    }
    if let Some(p) = req.parallel_tool_calls.filter(|_| !req.tools.is_empty()) {
        out.insert("parallel_tool_calls".into(), p.into());
    }
    match &req.response_format {
        Some(ResponseFormat::JsonObject) => {
            out.insert("response_format".into(), json!({"type": "json_object"}));
        }
        Some(ResponseFormat::JsonSchema { name, schema, strict }) => {
            out.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}),
            );
        }
        Some(ResponseFormat::Text) | None => {}
    }
    if let Some(r) = &req.reasoning {
        let effort = if r.disabled {
            None
        } else {
            r.effort.or_else(|| r.budget_tokens.map(Effort::from_budget))
        };
        if effort.is_some() && !reasons {
            loss.dropped(if target.compatible {
                "reasoning_effort (not sent to OpenAI-compatible servers)"
            } else {
                "reasoning_effort (the model is not an OpenAI reasoning model)"
            });
        }
        if let Some(e) = effort.filter(|_| reasons) {
            let e = match e {
                Effort::Minimal => "minimal",
                Effort::Low => "low",
                Effort::Medium => "medium",
                Effort::High => "high",
            };
            out.insert("reasoning_effort".into(), e.into());
        }
    }
    if req.stream {
        out.insert("stream".into(), true.into());
        // FastGate meters every stream; the client's own wish is kept apart.
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(Value::Object(out))
}

pub fn finish_to_wire(f: &Finish) -> &'static str {
    match f {
        Finish::Stop | Finish::StopSequence(_) | Finish::PauseTurn | Finish::Other(_) => "stop",
        Finish::Length => "length",
        Finish::ToolCalls => "tool_calls",
        Finish::ContentFilter | Finish::Refusal => "content_filter",
    }
}

pub fn finish_from_wire(s: &str) -> Finish {
    match s {
        "stop" => Finish::Stop,
        "length" => Finish::Length,
        "tool_calls" | "function_call" => Finish::ToolCalls,
        "content_filter" => Finish::ContentFilter,
        other => Finish::Other(other.to_string()),
    }
}

pub fn usage_from_wire(u: &Value) -> Usage {
    let prompt = opt_u64(u, "prompt_tokens").unwrap_or(0);
    let cached = u
        .get("prompt_tokens_details")
        .and_then(|d| opt_u64(d, "cached_tokens"))
        .unwrap_or(0);
    Usage {
        input: prompt.saturating_sub(cached),
        cache_read: cached,
        cache_write: 0,
        output: opt_u64(u, "completion_tokens").unwrap_or(0),
        reasoning: u
            .get("completion_tokens_details")
            .and_then(|d| opt_u64(d, "reasoning_tokens"))
            .unwrap_or(0),
    }
}

pub fn usage_to_wire(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.input_total(),
        "completion_tokens": u.output,
        "total_tokens": u.input_total() + u.output,
        "prompt_tokens_details": {"cached_tokens": u.cache_read},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning},
    })
}

/// A tool turn's finish inferred from its calls: OpenAI-compatible servers
/// (and OpenAI itself with a named tool choice) end one with `stop`, or
/// with no reason at all, while agents wait for `tool_calls`.
pub fn finish_with_calls(finish: Option<Finish>, has_calls: bool) -> Option<Finish> {
    match finish {
        Some(Finish::Stop) | None if has_calls => Some(Finish::ToolCalls),
        f => f,
    }
}

/// One choice's message and finish reason.
fn decode_choice(choice: &Value, names: &ToolNames) -> Choice {
    let msg = choice.get("message").unwrap_or(&Value::Null);
    let mut parts = Vec::new();
    if let Some(r) = opt_str(msg, "reasoning_content").filter(|r| !r.is_empty()) {
        parts.push(Part::Thinking {
            text: r.to_string(),
            signature: None,
        });
    }
    if let Some(t) = opt_str(msg, "content").filter(|t| !t.is_empty()) {
        parts.push(Part::Text(t.to_string()));
    }
    if let Some(calls) = msg.get("tool_calls").and_then(Value::as_array) {
        for c in calls {
            let f = c.get("function").unwrap_or(&Value::Null);
            parts.push(Part::ToolCall(ToolCall {
                id: opt_str(c, "id").unwrap_or_default().to_string(),
                name: names.inbound(opt_str(f, "name").unwrap_or_default()),
                arguments: opt_str(f, "arguments")
                    .filter(|a| !a.trim().is_empty())
                    .unwrap_or("{}")
                    .to_string(),
                signature: None,
            }));
        }
    }
    let has_calls = parts.iter().any(|p| matches!(p, Part::ToolCall(_)));
    Choice {
        finish: finish_with_calls(opt_str(choice, "finish_reason").map(finish_from_wire), has_calls),
        parts,
    }
}

pub fn decode_response(body: &Value, names: &ToolNames) -> Result<ChatResponse, ConvertError> {
    let mut choices: Vec<&Value> = body
        .get("choices")
        .and_then(Value::as_array)
        .map(|c| c.iter().collect())
        .unwrap_or_default();
    if choices.is_empty() {
        return Err(invalid("an answer without choices"));
    }
    choices.sort_by_key(|c| opt_u64(c, "index").unwrap_or(0));
    let mut choices = choices.into_iter().map(|c| decode_choice(c, names));
    let first = choices.next().unwrap_or_default();
    Ok(ChatResponse {
        id: opt_str(body, "id").unwrap_or_default().to_string(),
        model: opt_str(body, "model").unwrap_or_default().to_string(),
        parts: first.parts,
        finish: first.finish,
        usage: body.get("usage").filter(|u| u.is_object()).map(usage_from_wire),
        more: choices.collect(),
    })
}

/// One choice of an answer, as OpenAI writes it.
fn encode_choice(index: usize, parts: &[Part], finish: Option<&Finish>) -> Value {
    let text: String = parts
        .iter()
        .filter_map(|p| if let Part::Text(t) = p { Some(t.as_str()) } else { None })
        .collect();
    let reasoning: String = parts
        .iter()
        .filter_map(|p| {
            if let Part::Thinking { text, .. } = p {
                Some(text.as_str())
            } else {
                None
            }
        })
        .collect();
    let calls: Vec<Value> = parts
        .iter()
        .filter_map(|p| match p {
            Part::ToolCall(c) => {
                let id = super::id_with_signature(&c.id, c.signature.as_deref());
                Some(json!({"id": id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
            }
            _ => None,
        })
        .collect();
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) }});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    if !reasoning.is_empty() {
        message["reasoning_content"] = reasoning.into();
    }
    json!({
        "index": index,
        "message": message,
        "finish_reason": finish.map(finish_to_wire),
    })
}

pub fn encode_response(resp: &ChatResponse, created: i64) -> Value {
    let choices: Vec<Value> = std::iter::once(encode_choice(0, &resp.parts, resp.finish.as_ref()))
        .chain(
            resp.more
                .iter()
                .enumerate()
                .map(|(i, c)| encode_choice(i + 1, &c.parts, c.finish.as_ref())),
        )
        .collect();
    let mut out = json!({
        "id": if resp.id.starts_with("chatcmpl") { resp.id.clone() } else { format!("chatcmpl-{}", resp.id) },
        "object": "chat.completion",
        "created": created,
        "model": resp.model,
        "choices": choices,
    });
    if let Some(u) = &resp.usage {
        out["usage"] = usage_to_wire(u);
    }
    out
}

/// The arguments of a call as an object (for formats that want one).
pub fn call_arguments(c: &ToolCall) -> Value {
    arguments_object(&c.arguments)
}
