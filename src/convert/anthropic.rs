//! Anthropic Messages (`/v1/messages`) ⇄ the IR.

use super::{ConvertError, Loss, arguments_object, ir::*, opt_str, opt_u64, plain_text};
use serde_json::{Map, Value, json};

fn invalid(what: impl Into<String>) -> ConvertError {
    ConvertError::Invalid(what.into())
}

/// Anthropic wants a thinking budget of at least this many tokens.
pub const MIN_THINKING_BUDGET: u64 = 1024;

/// The lowest `top_p` Anthropic takes while thinking.
pub const MIN_THINKING_TOP_P: f64 = 0.95;

/// The tool a `json_schema` response format becomes toward Anthropic: the
/// model is made to call it, and its input is the answer's JSON.
pub const JSON_TOOL: &str = "structured_output";

fn media_from_source(src: &Value) -> Option<Media> {
    match opt_str(src, "type")? {
        "base64" => Some(Media::Base64 {
            media_type: opt_str(src, "media_type")
                .unwrap_or("application/octet-stream")
                .to_string(),
            data: opt_str(src, "data")?.to_string(),
        }),
        "url" => Some(Media::Url {
            url: opt_str(src, "url")?.to_string(),
            media_type: None,
        }),
        _ => None,
    }
}

fn source_of(m: &Media) -> Value {
    match m {
        Media::Base64 { media_type, data } => json!({"type": "base64", "media_type": media_type, "data": data}),
        Media::Url { url, .. } => json!({"type": "url", "url": url}),
    }
}

/// A document's source as Anthropic takes it: a PDF (base64 or URL) or
/// plain text (a `text` source); other media (audio, video, office files)
/// are dropped and reported.
fn document_source(m: &Media, loss: &mut Loss) -> Option<Value> {
    use base64::Engine;
    let media_type = match m {
        Media::Base64 { media_type, .. } => Some(media_type.as_str()),
        Media::Url { media_type, .. } => media_type.as_deref(),
    };
    let essence = media_type
        .map(|t| t.split(';').next().unwrap_or(t).trim().to_ascii_lowercase())
        .unwrap_or_default();
    match (m, essence.as_str()) {
        (Media::Base64 { .. }, "application/pdf") | (Media::Url { .. }, "application/pdf" | "") => Some(source_of(m)),
        (Media::Base64 { data, .. }, "text/plain") => {
            match base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
            {
                Some(text) => Some(json!({"type": "text", "media_type": "text/plain", "data": text})),
                None => {
                    loss.dropped("a text/plain document that is not UTF-8 base64");
                    None
                }
            }
        }
        _ => {
            loss.dropped(format!(
                "{} media (Anthropic takes images, PDFs and plain text)",
                if essence.is_empty() {
                    "unknown"
                } else {
                    essence.as_str()
                }
            ));
            None
        }
    }
}

fn decode_block(b: &Value, loss: &mut Loss) -> Result<Option<Part>, ConvertError> {
    Ok(match opt_str(b, "type") {
        Some("text") => Some(Part::Text(opt_str(b, "text").unwrap_or_default().to_string())),
        Some("image") => {
            let src = b
                .get("source")
                .ok_or_else(|| invalid("an image block without a source"))?;
            media_from_source(src).map(Part::Image)
        }
        Some("document") => {
            let src = b
                .get("source")
                .ok_or_else(|| invalid("a document block without a source"))?;
            match opt_str(src, "type") {
                Some("text") => Some(Part::Text(opt_str(src, "data").unwrap_or_default().to_string())),
                _ => media_from_source(src).map(|media| Part::Document {
                    media,
                    title: opt_str(b, "title").map(str::to_string),
                }),
            }
        }
        Some("tool_use") => {
            let (id, signature) = super::split_signature(opt_str(b, "id").unwrap_or_default());
            Some(Part::ToolCall(ToolCall {
                id,
                name: opt_str(b, "name")
                    .ok_or_else(|| invalid("a tool_use block without a name"))?
                    .to_string(),
                arguments: b.get("input").map_or_else(|| "{}".to_string(), Value::to_string),
                signature,
            }))
        }
        Some("tool_result") => {
            let content = match b.get("content") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::String(s)) => vec![Part::Text(s.clone())],
                Some(Value::Array(items)) => {
                    let mut parts = Vec::new();
                    for i in items {
                        if let Some(p) = decode_block(i, loss)? {
                            parts.push(p);
                        }
                    }
                    parts
                }
                Some(_) => return Err(invalid("tool_result content must be a string or blocks")),
            };
            Some(Part::ToolResult(ToolResult {
                call_id: super::split_signature(
                    opt_str(b, "tool_use_id").ok_or_else(|| invalid("a tool_result without tool_use_id"))?,
                )
                .0,
                name: None,
                content,
                is_error: b.get("is_error").and_then(Value::as_bool).unwrap_or(false),
            }))
        }
        Some("thinking") => Some(Part::Thinking {
            text: opt_str(b, "thinking").unwrap_or_default().to_string(),
            signature: opt_str(b, "signature").map(str::to_string),
        }),
        Some("redacted_thinking") => Some(Part::RedactedThinking(
            opt_str(b, "data").unwrap_or_default().to_string(),
        )),
        Some(other) => {
            loss.dropped(format!("{other} blocks"));
            None
        }
        None => return Err(invalid("a content block without a type")),
    })
}

fn decode_content(content: &Value, loss: &mut Loss) -> Result<Vec<Part>, ConvertError> {
    match content {
        Value::String(s) => Ok(vec![Part::Text(s.clone())]),
        Value::Array(blocks) => {
            let mut parts = Vec::new();
            for b in blocks {
                if let Some(p) = decode_block(b, loss)? {
                    parts.push(p);
                }
            }
            Ok(parts)
        }
        _ => Err(invalid("content must be a string or a list of blocks")),
    }
}

/// Whether the last assistant turn calls tools without beginning with a
/// signed thinking block (which Anthropic requires while thinking is on).
fn last_tool_turn_lacks_signed_thinking(req: &ChatRequest) -> bool {
    let Some(last) = req.messages.iter().rev().find(|m| m.role == Role::Assistant) else {
        return false;
    };
    let calls_tools = last.parts.iter().any(|p| matches!(p, Part::ToolCall(_)));
    let signed_first = match last.parts.first() {
        Some(Part::Thinking { signature: Some(s), .. }) => !s.is_empty(),
        Some(Part::RedactedThinking(_)) => true,
        _ => false,
    };
    calls_tools && !signed_first
}

/// Whether a `json_schema` answer is asked of Anthropic as a forced tool
/// (no tools of the client's and no thinking: works with every model) rather
/// than as the native `output_config.format` (keeps tools and thinking;
/// the models that support structured outputs).
pub fn answers_json_by_tool(req: &ChatRequest) -> bool {
    matches!(req.response_format, Some(ResponseFormat::JsonSchema { .. }))
        && req.tools.is_empty()
        && req.reasoning.is_none_or(|r| r.disabled)
}

pub fn decode_request(body: &Value, loss: &mut Loss) -> Result<ChatRequest, ConvertError> {
    body.as_object()
        .ok_or_else(|| invalid("the body must be a JSON object"))?;
    let mut req = ChatRequest {
        model: opt_str(body, "model").unwrap_or_default().to_string(),
        ..ChatRequest::default()
    };
    // Each system block stays its own instruction (joined with a blank line
    // where the target has a single field).
    match body.get("system") {
        Some(Value::Array(blocks)) => req.system.extend(
            blocks
                .iter()
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .map(str::to_string),
        ),
        Some(system) => req
            .system
            .push(plain_text(system).ok_or_else(|| invalid("system must be text or text blocks"))?),
        None => {}
    }
    // Structured output: `output_config.format`, or the beta's `output_format`.
    let format = body
        .get("output_config")
        .and_then(|c| c.get("format"))
        .or_else(|| body.get("output_format"));
    if let Some(f) = format.filter(|f| opt_str(f, "type") == Some("json_schema")) {
        req.response_format = Some(ResponseFormat::JsonSchema {
            name: "response".into(),
            schema: f.get("schema").cloned().unwrap_or_else(|| json!({"type": "object"})),
            strict: true,
        });
    }
    for m in body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("messages must be a list"))?
    {
        let role = match opt_str(m, "role") {
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            other => return Err(invalid(format!("unknown role {other:?}"))),
        };
        let parts = decode_content(m.get("content").unwrap_or(&Value::Null), loss)?;
        match req.messages.last_mut() {
            Some(last) if last.role == role => last.parts.extend(parts),
            _ => req.messages.push(Message { role, parts }),
        }
    }
    // Ranges as Anthropic's API reference gives them.
    req.max_tokens = super::count_field(body, "max_tokens", 1)?;
    req.temperature = super::number_field(body, "temperature", 0.0, 1.0)?;
    req.top_p = super::number_field(body, "top_p", 0.0, 1.0)?;
    req.top_k = super::count_field(body, "top_k", 0)?;
    req.stop = body
        .get("stop_sequences")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default();
    if let Some(tools) = body.get("tools").and_then(Value::as_array) {
        for t in tools {
            match t.get("input_schema") {
                Some(schema) => req.tools.push(Tool {
                    name: opt_str(t, "name")
                        .ok_or_else(|| invalid("a tool without a name"))?
                        .to_string(),
                    description: opt_str(t, "description").map(str::to_string),
                    parameters: schema.clone(),
                }),
                // Anthropic's server tools (web search, code execution...).
                None => loss.dropped(format!("{} tools", opt_str(t, "type").unwrap_or("server"))),
            }
        }
    }
    if let Some(tc) = body.get("tool_choice") {
        req.tool_choice = match opt_str(tc, "type") {
            Some("auto") => Some(ToolChoice::Auto),
            Some("any") => Some(ToolChoice::Required),
            Some("none") => Some(ToolChoice::None),
            Some("tool") => opt_str(tc, "name").map(|n| ToolChoice::Named(n.to_string())),
            _ => None,
        };
        if tc.get("disable_parallel_tool_use").and_then(Value::as_bool) == Some(true) {
            req.parallel_tool_calls = Some(false);
        }
    }
    if let Some(t) = body.get("thinking") {
        req.reasoning = match opt_str(t, "type") {
            Some("enabled") => Some(Reasoning {
                effort: None,
                budget_tokens: opt_u64(t, "budget_tokens"),
                disabled: false,
            }),
            Some("disabled") => Some(Reasoning {
                effort: None,
                budget_tokens: None,
                disabled: true,
            }),
            _ => None,
        };
    }
    req.stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    req.include_usage = true;
    req.user = body
        .get("metadata")
        .and_then(|m| opt_str(m, "user_id"))
        .map(str::to_string);
    Ok(req)
}

/// Encode for an Anthropic upstream. `default_max_tokens` fills the
/// required `max_tokens` when the client gave none.
pub fn encode_request(req: &ChatRequest, default_max_tokens: u64, loss: &mut Loss) -> Result<Value, ConvertError> {
    encode_request_with(req, default_max_tokens, Target::default(), loss)
}

/// What the Anthropic model takes (the capability table's word).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Target {
    /// `temperature` and `top_p` accepted together.
    pub sampling_pair: bool,
    /// Place `cache_control` breakpoints ([`place_cache_breakpoints`]).
    pub prompt_cache: bool,
    /// The most output tokens the model gives, thinking included.
    pub max_output: Option<u64>,
}

/// The breakpoint Anthropic caches the prompt up to (5 minutes, renewed on
/// each read).
fn ephemeral() -> Value {
    json!({"type": "ephemeral"})
}

/// Cache breakpoints for a client that cannot place them (OpenAI, Gemini
/// and Responses clients; Codex resends the whole conversation each turn):
/// on the last tool and on the system prompt, which repeat across
/// requests, and — once the conversation has an assistant turn, so it is
/// likely to go on — on the last block of the last message, so the next
/// turn reads everything before it from the cache. Three of the four
/// breakpoints Anthropic allows. A prefix below the model's minimum (1,024
/// tokens on most models) is simply not cached; a cache write costs 25 %
/// more than plain input, a read 10 % of it.
fn place_cache_breakpoints(out: &mut Map<String, Value>) {
    if let Some(Value::Array(tools)) = out.get_mut("tools")
        && let Some(Value::Object(last)) = tools.last_mut()
    {
        last.insert("cache_control".into(), ephemeral());
    }
    if let Some(Value::String(system)) = out.get("system") {
        let block = json!([{"type": "text", "text": system, "cache_control": ephemeral()}]);
        out.insert("system".into(), block);
    }
    let Some(Value::Array(messages)) = out.get_mut("messages") else {
        return;
    };
    if !messages.iter().any(|m| m["role"] == "assistant") {
        return;
    }
    let last_block = messages
        .last_mut()
        .and_then(|m| m.get_mut("content"))
        .and_then(Value::as_array_mut)
        .and_then(|blocks| blocks.last_mut())
        .and_then(Value::as_object_mut);
    // Thinking blocks and empty text cannot carry one (Anthropic refuses it there).
    if let Some(b) = last_block.filter(|b| match b.get("type").and_then(Value::as_str) {
        Some("thinking" | "redacted_thinking") => false,
        Some("text") => b
            .get("text")
            .and_then(Value::as_str)
            .is_some_and(|t| !t.trim().is_empty()),
        _ => true,
    }) {
        b.insert("cache_control".into(), ephemeral());
    }
}

/// Encode for an Anthropic upstream whose model is described by `target`.
pub fn encode_request_with(
    req: &ChatRequest,
    default_max_tokens: u64,
    target: Target,
    loss: &mut Loss,
) -> Result<Value, ConvertError> {
    let sampling_pair = target.sampling_pair;
    if req.only.candidates.is_some_and(|n| n > 1) {
        return Err(ConvertError::Refused(
            "n > 1 (several choices) cannot be served by an Anthropic upstream; send n separate requests".into(),
        ));
    }
    if req.only.logprobs {
        return Err(ConvertError::Refused(
            "logprobs are not available from an Anthropic upstream".into(),
        ));
    }
    // A JSON schema answer: a forced tool where nothing else needs tools
    // or thinking (it works with every model); otherwise the native
    // `output_config.format`, which keeps both.
    let json_schema = match &req.response_format {
        Some(ResponseFormat::JsonSchema { schema, .. }) => Some(schema.clone()),
        _ => None,
    };
    let by_tool = answers_json_by_tool(req);
    let mut out = Map::new();
    out.insert("model".into(), req.model.clone().into());
    let mut system = req.system.clone();
    if let Some(ResponseFormat::JsonObject) = &req.response_format {
        loss.dropped("response_format json_object (asked for in the system prompt instead)");
        system.push("Answer with one JSON object and nothing else.".into());
    }
    // Empty parts say nothing (and an empty block cannot carry a cache
    // breakpoint: Anthropic refuses it).
    system.retain(|part| !part.trim().is_empty());
    if !system.is_empty() {
        out.insert("system".into(), system.join("\n\n").into());
    }
    let mut synthesized = 0usize;
    let mut messages = Vec::new();
    for m in &req.messages {
        let mut blocks = Vec::new();
        // tool_result blocks must open a user turn.
        let mut ordered: Vec<&Part> = m.parts.iter().filter(|p| matches!(p, Part::ToolResult(_))).collect();
        ordered.extend(m.parts.iter().filter(|p| !matches!(p, Part::ToolResult(_))));
        for p in ordered {
            if let Some(b) = encode_block(p, &mut synthesized, loss) {
                blocks.push(b);
            }
        }
        if blocks.is_empty() {
            continue;
        }
        let role = if m.role == Role::User { "user" } else { "assistant" };
        messages.push(json!({"role": role, "content": blocks}));
    }
    out.insert("messages".into(), Value::Array(messages));
    let mut max_tokens = req.max_tokens.unwrap_or(default_max_tokens).max(1);
    let reasoning = req.reasoning.filter(|r| {
        // While thinking, Anthropic wants the last assistant turn with tool
        // calls to begin with its signed thinking; OpenAI Chat clients never
        // send it back (Responses and Gemini clients do, in FastGate's
        // sealed forms), so such a turn is answered without thinking.
        if !r.disabled && last_tool_turn_lacks_signed_thinking(req) {
            loss.dropped(
                "reasoning for this turn (the previous tool-calling turn carries no signed Anthropic thinking)",
            );
            return false;
        }
        true
    });
    let mut thinking = reasoning.filter(|r| !r.disabled).and_then(|r| {
        r.budget_tokens
            .or_else(|| r.effort.map(Effort::budget))
            .map(|b| b.max(MIN_THINKING_BUDGET))
    });
    if let Some(budget) = thinking.as_mut() {
        if max_tokens <= *budget {
            // The budget counts inside max_tokens: leave room for the answer.
            max_tokens = *budget + req.max_tokens.unwrap_or(default_max_tokens).max(1);
        }
        if let Some(cap) = target.max_output.filter(|cap| max_tokens > *cap) {
            // Within the model's output, the answer keeps at least a quarter.
            max_tokens = cap;
            let most = (cap - cap / 4).max(MIN_THINKING_BUDGET);
            if *budget > most {
                loss.dropped(format!(
                    "thinking budget {budget} lowered to {most} (the model's output is {cap})"
                ));
                *budget = most;
            }
        }
        let budget = *budget;
        out.insert("thinking".into(), json!({"type": "enabled", "budget_tokens": budget}));
        if req.temperature.is_some_and(|t| t != 1.0) || req.top_k.is_some() {
            loss.dropped("temperature/top_k (Anthropic fixes them while thinking)");
        }
    } else {
        if let Some(t) = req.temperature {
            if t > 1.0 {
                loss.dropped(format!("temperature {t} clamped to 1 (Anthropic's range is 0-1)"));
            }
            out.insert("temperature".into(), t.clamp(0.0, 1.0).into());
        }
        if let Some(k) = req.top_k {
            out.insert("top_k".into(), k.into());
        }
    }
    out.insert("max_tokens".into(), max_tokens.into());
    if let Some(p) = req.top_p {
        if thinking.is_some() {
            // While thinking, Anthropic takes top_p from 0.95 to 1 only.
            if p < MIN_THINKING_TOP_P {
                loss.dropped(format!(
                    "top_p {p} raised to {MIN_THINKING_TOP_P} (Anthropic's minimum while thinking)"
                ));
            }
            out.insert("top_p".into(), p.max(MIN_THINKING_TOP_P).into());
        } else if out.contains_key("temperature") && !sampling_pair {
            // Anthropic's newer models refuse temperature and top_p together
            // (Gemini CLI sends both): the temperature is kept.
            if p < 1.0 {
                loss.dropped("top_p (Anthropic takes temperature or top_p, not both; temperature kept)");
            }
        } else {
            out.insert("top_p".into(), p.into());
        }
    }
    if !req.stop.is_empty() {
        out.insert("stop_sequences".into(), json!(req.stop));
    }
    if req.seed.is_some() || req.presence_penalty.is_some() || req.frequency_penalty.is_some() {
        loss.dropped("seed/presence_penalty/frequency_penalty (Anthropic has none)");
    }
    if !req.tools.is_empty() {
        let tools: Vec<Value> = req
            .tools
            .iter()
            .map(|t| {
                let mut v = json!({"name": t.name, "input_schema": t.parameters});
                if let Some(d) = &t.description {
                    v["description"] = d.clone().into();
                }
                v
            })
            .collect();
        out.insert("tools".into(), Value::Array(tools));
    }
    let mut choice = match &req.tool_choice {
        Some(ToolChoice::Auto) => Some(json!({"type": "auto"})),
        Some(ToolChoice::None) => Some(json!({"type": "none"})),
        Some(ToolChoice::Required) => Some(json!({"type": "any"})),
        Some(ToolChoice::Named(n)) => Some(json!({"type": "tool", "name": n})),
        None => None,
    };
    if req.parallel_tool_calls == Some(false) && !req.tools.is_empty() {
        let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
        if c["type"] != "none" {
            c["disable_parallel_tool_use"] = true.into();
        }
    }
    if let Some(c) = choice
        .as_mut()
        .filter(|c| thinking.is_some() && matches!(c["type"].as_str(), Some("any" | "tool")))
    {
        // Anthropic refuses a forced tool while thinking: the model may call it.
        loss.dropped("tool_choice forcing a tool (Anthropic allows only auto or none while thinking; sent as auto)");
        c["type"] = "auto".into();
        if let Some(m) = c.as_object_mut() {
            m.remove("name");
        }
    }
    if let Some(c) = choice.filter(|_| !req.tools.is_empty()) {
        out.insert("tool_choice".into(), c);
    }
    match json_schema {
        Some(schema) if by_tool => {
            out.insert(
                "tools".into(),
                json!([{"name": JSON_TOOL, "description": "Give the answer as this tool's input: one JSON object matching the schema.", "input_schema": schema}]),
            );
            out.insert("tool_choice".into(), json!({"type": "tool", "name": JSON_TOOL}));
        }
        Some(schema) => {
            out.insert(
                "output_config".into(),
                json!({"format": {"type": "json_schema", "schema": schema}}),
            );
        }
        None => {}
    }
    if let Some(u) = &req.user {
        out.insert("metadata".into(), json!({"user_id": u}));
    }
    if req.stream {
        out.insert("stream".into(), true.into());
    }
    if target.prompt_cache {
        place_cache_breakpoints(&mut out);
    }
    Ok(Value::Object(out))
}

fn encode_block(p: &Part, synthesized: &mut usize, loss: &mut Loss) -> Option<Value> {
    Some(match p {
        Part::Text(t) if t.is_empty() => return None,
        Part::Text(t) => json!({"type": "text", "text": t}),
        Part::Image(m) => json!({"type": "image", "source": source_of(m)}),
        Part::Document { media, title } => {
            let mut v = json!({"type": "document", "source": document_source(media, loss)?});
            if let Some(t) = title {
                v["title"] = t.clone().into();
            }
            v
        }
        Part::ToolCall(c) => {
            let id = if c.id.is_empty() {
                *synthesized += 1;
                format!("toolu_fg{synthesized}")
            } else {
                c.id.clone()
            };
            json!({"type": "tool_use", "id": id, "name": c.name, "input": arguments_object(&c.arguments)})
        }
        Part::ToolResult(r) => {
            let content: Vec<Value> = r
                .content
                .iter()
                .filter_map(|p| match p {
                    Part::Text(t) if !t.is_empty() => Some(json!({"type": "text", "text": t})),
                    Part::Image(m) => Some(json!({"type": "image", "source": source_of(m)})),
                    _ => None,
                })
                .collect();
            let mut v = json!({"type": "tool_result", "tool_use_id": r.call_id, "content": content});
            if r.is_error {
                v["is_error"] = true.into();
            }
            v
        }
        Part::Thinking {
            text,
            signature: Some(sig),
        } if !sig.is_empty() => {
            json!({"type": "thinking", "thinking": text, "signature": sig})
        }
        Part::Thinking { .. } => {
            // Anthropic rejects thinking it did not sign.
            loss.dropped("unsigned reasoning from another provider");
            return None;
        }
        Part::RedactedThinking(data) => json!({"type": "redacted_thinking", "data": data}),
    })
}

pub fn finish_from_wire(reason: &str, sequence: Option<&str>) -> Finish {
    match reason {
        "end_turn" => Finish::Stop,
        // The answer was cut by the context window, not the model's choice
        // (Anthropic, Claude Sonnet 4.5 on): a length stop to other clients.
        "max_tokens" | "model_context_window_exceeded" => Finish::Length,
        "tool_use" => Finish::ToolCalls,
        "stop_sequence" => Finish::StopSequence(sequence.map(str::to_string)),
        "refusal" => Finish::Refusal,
        "pause_turn" => Finish::PauseTurn,
        other => Finish::Other(other.to_string()),
    }
}

pub fn finish_to_wire(f: &Finish) -> (&'static str, Option<String>) {
    match f {
        Finish::Stop | Finish::Other(_) => ("end_turn", None),
        Finish::Length => ("max_tokens", None),
        Finish::ToolCalls => ("tool_use", None),
        Finish::StopSequence(s) => ("stop_sequence", s.clone()),
        Finish::ContentFilter | Finish::Refusal => ("refusal", None),
        Finish::PauseTurn => ("pause_turn", None),
    }
}

pub fn usage_from_wire(u: &Value) -> Usage {
    Usage {
        input: opt_u64(u, "input_tokens").unwrap_or(0),
        cache_read: opt_u64(u, "cache_read_input_tokens").unwrap_or(0),
        cache_write: opt_u64(u, "cache_creation_input_tokens").unwrap_or(0),
        output: opt_u64(u, "output_tokens").unwrap_or(0),
        reasoning: 0,
    }
}

pub fn usage_to_wire(u: &Usage) -> Value {
    json!({
        "input_tokens": u.input,
        "output_tokens": u.output,
        "cache_creation_input_tokens": u.cache_write,
        "cache_read_input_tokens": u.cache_read,
    })
}

pub fn decode_response(body: &Value, loss: &mut Loss) -> Result<ChatResponse, ConvertError> {
    let parts = decode_content(body.get("content").unwrap_or(&Value::Array(Vec::new())), loss)?;
    Ok(ChatResponse {
        id: opt_str(body, "id").unwrap_or_default().to_string(),
        model: opt_str(body, "model").unwrap_or_default().to_string(),
        parts,
        finish: opt_str(body, "stop_reason").map(|r| finish_from_wire(r, opt_str(body, "stop_sequence"))),
        usage: body.get("usage").filter(|u| u.is_object()).map(usage_from_wire),
        more: Vec::new(),
    })
}

pub fn encode_response(resp: &ChatResponse) -> Value {
    let mut synthesized = 0usize;
    let mut ignored = Loss::default();
    let content: Vec<Value> = resp
        .parts
        .iter()
        .filter_map(|p| match p {
            // Reasoning from another provider reaches Anthropic clients as
            // thinking; it has no signature to keep.
            Part::Thinking { text, signature } => {
                Some(json!({"type": "thinking", "thinking": text, "signature": signature.clone().unwrap_or_default()}))
            }
            // A Gemini signature rides in the id the client sends back.
            Part::ToolCall(c) if c.signature.is_some() => {
                let carried = ToolCall {
                    id: super::id_with_signature(&c.id, c.signature.as_deref()),
                    ..c.clone()
                };
                encode_block(&Part::ToolCall(carried), &mut synthesized, &mut ignored)
            }
            other => encode_block(other, &mut synthesized, &mut ignored),
        })
        .collect();
    let (stop_reason, stop_sequence) = resp.finish.as_ref().map_or(("end_turn", None), finish_to_wire);
    json!({
        "id": if resp.id.starts_with("msg_") { resp.id.clone() } else { format!("msg_{}", resp.id) },
        "type": "message",
        "role": "assistant",
        "model": resp.model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage_to_wire(&resp.usage.unwrap_or_default()),
    })
}
