//! Gemini `generateContent` / `streamGenerateContent` ⇄ the IR.
//!
//! Gemini's REST API takes both camelCase and snake_case field names (the
//! protobuf JSON mapping); the decoder reads either, the encoder writes
//! camelCase like the official SDKs.

use super::{ConvertError, Loss, arguments_object, ir::*, opt_str};
use serde_json::{Map, Value, json};
use sha2::Digest;

fn invalid(what: impl Into<String>) -> ConvertError {
    ConvertError::Invalid(what.into())
}

/// A field under its camelCase or snake_case name.
fn field<'a>(v: &'a Value, camel: &str, snake: &str) -> Option<&'a Value> {
    v.get(camel).or_else(|| v.get(snake))
}

fn mime_of(data: &Value) -> &str {
    field(data, "mimeType", "mime_type")
        .and_then(Value::as_str)
        .unwrap_or("application/octet-stream")
}

fn media(mime: &str, data: Media) -> Part {
    if mime.starts_with("image/") {
        Part::Image(data)
    } else {
        Part::Document {
            media: data,
            title: None,
        }
    }
}

/// A response object as the text of a tool result: a lone `result`/`output`
/// string as itself, anything else as JSON.
fn response_text(response: &Value) -> String {
    if let Some(obj) = response.as_object()
        && obj.len() == 1
        && let Some(s) = obj.get("result").or_else(|| obj.get("output")).and_then(Value::as_str)
    {
        return s.to_string();
    }
    response.to_string()
}

/// A stable, unique id for a function call Gemini sent without one.
pub fn synthesize_call_id(scope: &str, index: usize, name: &str) -> String {
    let digest = sha2::Sha256::digest(format!("{scope}\0{index}\0{name}").as_bytes());
    format!("call_{}", hex::encode(&digest[..12]))
}

/// Most bytes of thinking (text, signatures, redacted data) one
/// `thoughtSignature` carries. Anthropic checks the blocks byte for byte, so
/// a longer turn is not cut: it gets no signature (logged) and its next
/// request goes as without one (thinking off for that turn, with a warning).
pub const MAX_CARRIED_THINKING: usize = 1 << 20;

/// `SEALED` (`fastgate.v1:`) in base64: how a carried signature begins
/// (12 bytes, so the same in every alphabet and never padded).
const CARRIED_B64_PREFIX: &str = "ZmFzdGdhdGUudjE6";

/// Anthropic's signed (or redacted) thinking of one turn as a Gemini
/// `thoughtSignature`, so a Gemini client (which keeps only that, and may
/// drop the thought text) hands Claude its thinking back after a tool call:
/// base64 of `fastgate.v1:` + the blocks as Anthropic writes them (compact
/// JSON), in order. Unsigned thinking is left out (Anthropic refuses it).
/// None when there is nothing to carry, or more than [`MAX_CARRIED_THINKING`].
pub(crate) fn carry_thinking<'a>(parts: impl IntoIterator<Item = &'a Part>) -> Option<String> {
    use base64::Engine;
    let blocks: Vec<Value> = parts
        .into_iter()
        .filter_map(|p| match p {
            Part::Thinking {
                text,
                signature: Some(sig),
            } if !sig.is_empty() => Some(json!({"type": "thinking", "thinking": text, "signature": sig})),
            Part::RedactedThinking(data) => Some(json!({"type": "redacted_thinking", "data": data})),
            _ => None,
        })
        .collect();
    if blocks.is_empty() {
        return None;
    }
    let mut payload = super::responses::SEALED.as_bytes().to_vec();
    // Serializing a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut payload, &blocks);
    if payload.len() > MAX_CARRIED_THINKING {
        tracing::warn!(
            bytes = payload.len(),
            max = MAX_CARRIED_THINKING,
            "Anthropic thinking too long to carry in a thoughtSignature; the Gemini client's next turn goes without it"
        );
        return None;
    }
    Some(base64::engine::general_purpose::STANDARD.encode(payload))
}

/// The thinking blocks a `thoughtSignature` carries when FastGate wrote it
/// ([`carry_thinking`]), whatever base64 the client re-encoded it in
/// (standard or url-safe, padded or not: the Python SDK holds it as bytes).
/// None for Gemini's own signatures and for anything damaged.
pub(crate) fn carried_thinking(signature: &str) -> Option<Vec<Part>> {
    use base64::Engine;
    if !signature.starts_with(CARRIED_B64_PREFIX) {
        return None;
    }
    let standard: String = signature
        .chars()
        .filter(|c| *c != '=' && !c.is_ascii_whitespace())
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD.decode(standard).ok()?;
    let blocks: Vec<Value> = serde_json::from_slice(bytes.strip_prefix(super::responses::SEALED.as_bytes())?).ok()?;
    let parts = blocks
        .iter()
        .map(|b| match opt_str(b, "type")? {
            "thinking" => Some(Part::Thinking {
                text: opt_str(b, "thinking")?.to_string(),
                signature: Some(opt_str(b, "signature").filter(|s| !s.is_empty())?.to_string()),
            }),
            "redacted_thinking" => Some(Part::RedactedThinking(opt_str(b, "data")?.to_string())),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    if parts.is_empty() {
        tracing::debug!("an empty carried thoughtSignature ignored");
        return None;
    }
    Some(parts)
}

/// A model turn from a Gemini client with its carried thinking restored:
/// the blocks of the first carried signature open the turn (Anthropic wants
/// the tool-calling turn to begin with them), later ones go before the part
/// that carried them. The turn's thought text parts, when the client sent
/// them back, are dropped: the carried blocks are that thinking, signed.
fn restore_carried_thinking(parts: &mut Vec<Part>) {
    let mut carried: Vec<(usize, Vec<Part>)> = Vec::new();
    for (i, p) in parts.iter_mut().enumerate() {
        let signature = match p {
            Part::ToolCall(c) => &mut c.signature,
            Part::Thinking { signature, .. } => signature,
            _ => continue,
        };
        if let Some(blocks) = signature.as_deref().and_then(carried_thinking) {
            // Not Gemini's: no Gemini upstream could read it.
            *signature = None;
            carried.push((i, blocks));
        }
    }
    if carried.is_empty() {
        return;
    }
    let mut out = Vec::with_capacity(parts.len() + carried.iter().map(|(_, b)| b.len()).sum::<usize>());
    let mut carried = carried.into_iter();
    if let Some((_, first)) = carried.next() {
        out.extend(first);
    }
    let mut next = carried.next();
    for (i, p) in std::mem::take(parts).into_iter().enumerate() {
        if let Some((_, blocks)) = next.take_if(|(at, _)| *at == i) {
            out.extend(blocks);
            next = carried.next();
        }
        if !matches!(p, Part::Thinking { .. }) {
            out.push(p);
        }
    }
    *parts = out;
}

fn decode_parts(
    parts: &[Value],
    scope: &str,
    calls_seen: &mut Vec<(String, String)>,
    loss: &mut Loss,
) -> Result<Vec<Part>, ConvertError> {
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let signature = field(p, "thoughtSignature", "thought_signature")
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(text) = p.get("text").and_then(Value::as_str) {
            if p.get("thought").and_then(Value::as_bool) == Some(true) {
                out.push(Part::Thinking {
                    text: text.to_string(),
                    signature,
                });
            } else {
                out.push(Part::Text(text.to_string()));
            }
        } else if let Some(d) = field(p, "inlineData", "inline_data") {
            let mime = mime_of(d);
            out.push(media(
                mime,
                Media::Base64 {
                    media_type: mime.to_string(),
                    data: opt_str(d, "data").unwrap_or_default().to_string(),
                },
            ));
        } else if let Some(d) = field(p, "fileData", "file_data") {
            let mime = mime_of(d);
            out.push(media(
                mime,
                Media::Url {
                    url: field(d, "fileUri", "file_uri")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    media_type: Some(mime.to_string()),
                },
            ));
        } else if let Some(c) = field(p, "functionCall", "function_call") {
            let name = opt_str(c, "name").ok_or_else(|| invalid("a functionCall without a name"))?;
            let id = opt_str(c, "id")
                .filter(|id| !id.is_empty())
                .map_or_else(|| synthesize_call_id(scope, i, name), str::to_string);
            calls_seen.push((id.clone(), name.to_string()));
            out.push(Part::ToolCall(ToolCall {
                id,
                name: name.to_string(),
                arguments: c.get("args").map_or_else(|| "{}".to_string(), Value::to_string),
                signature,
            }));
        } else if let Some(r) = field(p, "functionResponse", "function_response") {
            let name = opt_str(r, "name").unwrap_or_default().to_string();
            // It answers the known call with its id; else (no id, or one no
            // call here has: the upstream would refuse a result naming an
            // unknown call) the oldest unanswered call of that name.
            let by_id = opt_str(r, "id")
                .filter(|id| !id.is_empty())
                .and_then(|id| calls_seen.iter().position(|(c, _)| c == id));
            let call_id = match by_id.or_else(|| calls_seen.iter().position(|(_, n)| *n == name)) {
                Some(pos) => calls_seen.remove(pos).0,
                None => synthesize_call_id(scope, i, &name),
            };
            out.push(Part::ToolResult(ToolResult {
                call_id,
                name: Some(name),
                content: vec![Part::Text(response_text(r.get("response").unwrap_or(&Value::Null)))],
                is_error: false,
            }));
        } else {
            loss.dropped("Gemini parts other than text, media and function calls");
        }
    }
    Ok(out)
}

/// Decode a Gemini request; the model and streaming come from the URL.
pub fn decode_request(body: &Value, model: &str, stream: bool, loss: &mut Loss) -> Result<ChatRequest, ConvertError> {
    body.as_object()
        .ok_or_else(|| invalid("the body must be a JSON object"))?;
    let mut req = ChatRequest {
        model: model.to_string(),
        stream,
        include_usage: true,
        ..ChatRequest::default()
    };
    if let Some(si) = field(body, "systemInstruction", "system_instruction") {
        // Each part its own instruction (joined with a blank line where the
        // target has a single field).
        req.system.extend(
            si.get("parts")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .map(str::to_string),
        );
    }
    let mut calls_seen = Vec::new();
    for (turn, c) in body
        .get("contents")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("contents must be a list"))?
        .iter()
        .enumerate()
    {
        let role = match opt_str(c, "role") {
            Some("model") => Role::Assistant,
            Some("user" | "function" | "tool") | None => Role::User,
            Some(other) => return Err(invalid(format!("unknown role {other:?}"))),
        };
        let parts = c.get("parts").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
        let parts = decode_parts(parts, &format!("turn{turn}"), &mut calls_seen, loss)?;
        match req.messages.last_mut() {
            Some(last) if last.role == role => last.parts.extend(parts),
            _ => req.messages.push(Message { role, parts }),
        }
    }
    for m in req.messages.iter_mut().filter(|m| m.role == Role::Assistant) {
        restore_carried_thinking(&mut m.parts);
    }
    let g = field(body, "generationConfig", "generation_config").unwrap_or(&Value::Null);
    // The spelling the client used (Gemini takes both); ranges as Gemini's
    // API reference gives them.
    let key = |camel: &'static str, snake: &'static str| if g.get(camel).is_some() { camel } else { snake };
    let num = |camel, snake, min, max| super::number_field(g, key(camel, snake), min, max);
    req.temperature = num("temperature", "temperature", 0.0, 2.0)?;
    req.top_p = num("topP", "top_p", 0.0, 1.0)?;
    req.top_k = super::count_field(g, key("topK", "top_k"), 0)?;
    req.max_tokens = super::count_field(g, key("maxOutputTokens", "max_output_tokens"), 1)?;
    req.seed = g.get("seed").and_then(Value::as_i64);
    req.presence_penalty = num("presencePenalty", "presence_penalty", -2.0, 2.0)?;
    req.frequency_penalty = num("frequencyPenalty", "frequency_penalty", -2.0, 2.0)?;
    req.stop = field(g, "stopSequences", "stop_sequences")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default();
    req.only.candidates = field(g, "candidateCount", "candidate_count").and_then(Value::as_u64);
    let schema = field(g, "responseJsonSchema", "response_json_schema")
        .or_else(|| field(g, "responseSchema", "response_schema"));
    req.response_format = match (
        field(g, "responseMimeType", "response_mime_type").and_then(Value::as_str),
        schema,
    ) {
        (_, Some(s)) => Some(ResponseFormat::JsonSchema {
            name: "response".into(),
            schema: lower_types(s),
            strict: false,
        }),
        (Some("application/json"), None) => Some(ResponseFormat::JsonObject),
        _ => None,
    };
    if let Some(t) = field(g, "thinkingConfig", "thinking_config") {
        req.reasoning = match field(t, "thinkingBudget", "thinking_budget").and_then(Value::as_i64) {
            Some(0) => Some(Reasoning {
                effort: None,
                budget_tokens: None,
                disabled: true,
            }),
            Some(b) if b > 0 => Some(Reasoning {
                effort: None,
                budget_tokens: Some(b as u64),
                disabled: false,
            }),
            // -1: dynamic. A level, when given, says how much.
            _ => match field(t, "thinkingLevel", "thinking_level").and_then(Value::as_str) {
                Some(l) if l.eq_ignore_ascii_case("low") => Some(Reasoning {
                    effort: Some(Effort::Low),
                    budget_tokens: None,
                    disabled: false,
                }),
                Some(_) | None => Some(Reasoning {
                    effort: Some(Effort::Medium),
                    budget_tokens: None,
                    disabled: false,
                }),
            },
        };
    }
    for t in body.get("tools").and_then(Value::as_array).into_iter().flatten() {
        match field(t, "functionDeclarations", "function_declarations").and_then(Value::as_array) {
            Some(decls) => {
                for d in decls {
                    let params = field(d, "parametersJsonSchema", "parameters_json_schema")
                        .or_else(|| d.get("parameters"))
                        .map_or_else(|| json!({"type": "object", "properties": {}}), lower_types);
                    req.tools.push(Tool {
                        name: opt_str(d, "name")
                            .ok_or_else(|| invalid("a function declaration without a name"))?
                            .to_string(),
                        description: opt_str(d, "description").map(str::to_string),
                        parameters: params,
                    });
                }
            }
            None => loss.dropped("Gemini built-in tools (search, code execution)"),
        }
    }
    if let Some(fc) = field(body, "toolConfig", "tool_config")
        .and_then(|tc| field(tc, "functionCallingConfig", "function_calling_config"))
    {
        let allowed: Vec<&str> = field(fc, "allowedFunctionNames", "allowed_function_names")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        req.tool_choice = match opt_str(fc, "mode").map(str::to_ascii_uppercase).as_deref() {
            Some("AUTO") => Some(ToolChoice::Auto),
            Some("NONE") => Some(ToolChoice::None),
            Some("ANY") if allowed.len() == 1 => Some(ToolChoice::Named(allowed[0].to_string())),
            Some("ANY") => Some(ToolChoice::Required),
            // VALIDATED: calls or text, the calls held to their schemas; it
            // does not force a call, so it is auto elsewhere.
            Some("VALIDATED") => {
                loss.dropped("function calling mode VALIDATED (sent as auto: schema adherence is not enforced)");
                Some(ToolChoice::Auto)
            }
            _ => None,
        };
    }
    Ok(req)
}

/// Gemini's OpenAPI-style schemas use upper-case types (`STRING`); JSON
/// Schema targets want lower case.
pub fn lower_types(schema: &Value) -> Value {
    match schema {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let v = match (k.as_str(), v) {
                        ("type", Value::String(t)) => Value::String(t.to_ascii_lowercase()),
                        _ => lower_types(v),
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(lower_types).collect()),
        other => other.clone(),
    }
}

/// Keys Gemini's function `parameters` schema understands.
const SCHEMA_KEYS: &[&str] = &[
    "type",
    "format",
    "title",
    "description",
    "nullable",
    "enum",
    "properties",
    "required",
    "items",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "anyOf",
    "propertyOrdering",
    "minProperties",
    "maxProperties",
];

/// Bounds against hostile or runaway schemas (deep nesting, `$ref`
/// cycles, a `$defs` entry referenced thousands of times).
const MAX_SCHEMA_DEPTH: usize = 32;
const MAX_SCHEMA_NODES: usize = 4096;
/// How often one `$ref` may be expanded inside itself (a tree of two levels
/// of a recursive type, then a described stub).
const MAX_REF_NESTING: usize = 2;

/// A JSON Schema as Gemini's function `parameters` accept it (the OpenAPI
/// 3.0 subset of its `Schema` object): local `$ref`s resolved (never `{}`),
/// `allOf` merged, `oneOf` as `anyOf`, `const` as a one-value `enum`,
/// `type: [T, "null"]` as `type: T` + `nullable`, several types as `anyOf`.
/// What Gemini refuses but carries meaning moves into `description`: a
/// `format` other than the ones it takes (`uri`, `email`… — Gemini answers
/// "only 'enum' and 'date-time' are supported for STRING type") and the
/// value schema of `additionalProperties` (a map's values). Other unknown
/// keywords (`$schema`, `examples`…) are removed.
pub fn sanitize_schema(schema: &Value) -> Value {
    let mut s = Sanitizer {
        root: schema,
        nodes: 0,
        refs: Vec::new(),
    };
    s.walk(schema, 0)
}

/// The formats Gemini's `Schema.format` takes, by type.
fn format_accepted(ty: Option<&str>, format: &str) -> bool {
    match ty.map(str::to_ascii_lowercase).as_deref() {
        Some("string") => matches!(format, "enum" | "date-time"),
        Some("integer") => matches!(format, "int32" | "int64"),
        Some("number") => matches!(format, "float" | "double"),
        _ => false,
    }
}

struct Sanitizer<'a> {
    root: &'a Value,
    nodes: usize,
    /// The `$ref`s being expanded, outermost first.
    refs: Vec<String>,
}

impl Sanitizer<'_> {
    fn walk(&mut self, schema: &Value, depth: usize) -> Value {
        self.nodes += 1;
        let Value::Object(m) = schema else {
            // `true` (anything) has no Gemini form: a described string.
            return json!({"type": "string", "description": "any value"});
        };
        if depth > MAX_SCHEMA_DEPTH || self.nodes > MAX_SCHEMA_NODES {
            return stub(m, "schema too large or deep; not expanded further");
        }
        if let Some(r) = m.get("$ref").and_then(Value::as_str) {
            return self.reference(r, m, depth);
        }
        let mut out = Map::new();
        let mut hints: Vec<String> = Vec::new();
        let mut all_of: Vec<&Value> = Vec::new();
        let ty = match m.get("type") {
            Some(Value::Array(types)) => types.iter().filter_map(Value::as_str).find(|t| *t != "null"),
            other => other.and_then(Value::as_str),
        };
        for (k, v) in m {
            match k.as_str() {
                "properties" => {
                    let props = v
                        .as_object()
                        .map(|p| {
                            p.iter()
                                .map(|(name, s)| (name.clone(), self.walk(s, depth + 1)))
                                .collect()
                        })
                        .unwrap_or_default();
                    out.insert(k.clone(), Value::Object(props));
                }
                "items" => {
                    // A tuple (`items: [..]`) has no Gemini form: its first schema.
                    let item = match v {
                        Value::Array(a) => a.first().cloned().unwrap_or_else(|| json!({"type": "string"})),
                        other => other.clone(),
                    };
                    out.insert(k.clone(), self.walk(&item, depth + 1));
                }
                "anyOf" | "oneOf" => {
                    let alts: Vec<Value> = v
                        .as_array()
                        .map(|a| a.iter().map(|s| self.walk(s, depth + 1)).collect())
                        .unwrap_or_default();
                    out.insert("anyOf".into(), Value::Array(alts));
                }
                "allOf" => all_of.extend(v.as_array().into_iter().flatten()),
                "const" => {
                    out.insert("enum".into(), json!([v]));
                }
                "type" => match v {
                    Value::Array(types) => {
                        let real: Vec<&Value> = types.iter().filter(|t| t.as_str() != Some("null")).collect();
                        if real.len() < types.len() {
                            out.insert("nullable".into(), true.into());
                        }
                        match real.as_slice() {
                            [] => {}
                            [one] => {
                                out.insert("type".into(), (*one).clone());
                            }
                            many => {
                                let alts = many.iter().map(|t| json!({"type": t})).collect();
                                out.insert("anyOf".into(), Value::Array(alts));
                            }
                        }
                    }
                    other => {
                        out.insert("type".into(), other.clone());
                    }
                },
                "format" => match v.as_str() {
                    Some(f) if format_accepted(ty, f) => {
                        out.insert(k.clone(), v.clone());
                    }
                    Some(f) => hints.push(format!("format: {f}")),
                    None => {}
                },
                "additionalProperties" => match v {
                    Value::Object(_) => {
                        let values = compact(v, 300);
                        hints.push(format!("any further keys allowed, each value: {values}"));
                    }
                    Value::Bool(true) if !m.contains_key("properties") => {
                        hints.push("an object with any keys".into());
                    }
                    _ => {}
                },
                key if SCHEMA_KEYS.contains(&key) => {
                    out.insert(k.clone(), v.clone());
                }
                _ => {}
            }
        }
        for part in all_of {
            let part = self.walk(part, depth + 1);
            merge_schema(&mut out, part);
        }
        if !hints.is_empty() {
            let hint = format!("({})", hints.join("; "));
            let desc = match out.get("description").and_then(Value::as_str) {
                Some(d) if !d.is_empty() => format!("{d} {hint}"),
                _ => hint,
            };
            out.insert("description".into(), desc.into());
        }
        // Gemini refuses `required` names that are not properties.
        if let (Some(Value::Array(req)), Some(Value::Object(props))) = (out.get("required"), out.get("properties")) {
            let kept: Vec<Value> = req
                .iter()
                .filter(|r| r.as_str().is_some_and(|n| props.contains_key(n)))
                .cloned()
                .collect();
            out.insert("required".into(), Value::Array(kept));
        }
        // Gemini only takes string enums.
        if let Some(Value::Array(values)) = out.get("enum")
            && values.iter().any(|v| !v.is_string())
        {
            let strings = values
                .iter()
                .map(|v| Value::String(v.as_str().map_or_else(|| v.to_string(), str::to_string)))
                .collect();
            out.insert("enum".into(), Value::Array(strings));
            out.insert("type".into(), "string".into());
        }
        Value::Object(out)
    }

    /// A `$ref` resolved against the root (`#/$defs/X`, `#/definitions/X`,
    /// any local JSON pointer), the referring node's own keywords on top.
    fn reference(&mut self, r: &str, node: &Map<String, Value>, depth: usize) -> Value {
        let target = r.strip_prefix('#').and_then(|pointer| {
            if pointer.is_empty() {
                Some(self.root)
            } else {
                self.root.pointer(pointer)
            }
        });
        let Some(Value::Object(target)) = target else {
            return stub(node, &format!("schema {r} is not part of this tool's definition"));
        };
        let nesting = self.refs.iter().filter(|x| x.as_str() == r).count();
        if nesting >= MAX_REF_NESTING {
            let mut described = target.clone();
            described.extend(
                node.iter()
                    .filter(|(k, _)| *k != "$ref")
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
            return stub(&described, &format!("recursive {r}; not expanded further"));
        }
        let mut merged = target.clone();
        merged.extend(
            node.iter()
                .filter(|(k, _)| *k != "$ref")
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        self.refs.push(r.to_string());
        let out = self.walk(&Value::Object(merged), depth + 1);
        self.refs.pop();
        out
    }
}

/// A schema not expanded further: its type (an object when unknown) and
/// description, with why.
fn stub(m: &Map<String, Value>, why: &str) -> Value {
    let ty = match m.get("type") {
        Some(Value::String(t)) => t.clone(),
        _ => "object".to_string(),
    };
    let desc = match m.get("description").and_then(Value::as_str) {
        Some(d) if !d.is_empty() => format!("{d} ({why})"),
        _ => format!("({why})"),
    };
    json!({"type": ty, "description": desc})
}

/// `part`'s keywords into `out` (an `allOf` member): properties and
/// `required` united, other keywords kept where `out` has none.
fn merge_schema(out: &mut Map<String, Value>, part: Value) {
    let Value::Object(part) = part else { return };
    for (k, v) in part {
        match (k.as_str(), out.get_mut(&k), v) {
            ("properties", Some(Value::Object(have)), Value::Object(add)) => have.extend(add),
            ("required", Some(Value::Array(have)), Value::Array(add)) => {
                for r in add {
                    if !have.contains(&r) {
                        have.push(r);
                    }
                }
            }
            (_, Some(_), _) => {}
            (_, None, v) => {
                out.insert(k, v);
            }
        }
    }
}

/// Compact JSON of a schema for a description, cut at `max` characters.
fn compact(v: &Value, max: usize) -> String {
    let mut s = v.to_string();
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

#[cfg(test)]
#[path = "gemini_schema_tests.rs"]
mod schema_tests;

fn inline(m: &Media, loss: &mut Loss) -> Option<Value> {
    match m {
        Media::Base64 { media_type, data } => Some(json!({"inlineData": {"mimeType": media_type, "data": data}})),
        Media::Url { url, media_type } => match media_type {
            Some(mt) => Some(json!({"fileData": {"mimeType": mt, "fileUri": url}})),
            None => {
                let guess = mime_guess(url);
                if guess.is_none() {
                    loss.dropped("media by URL of unknown type (send it as a data URL)");
                }
                guess.map(|mt| json!({"fileData": {"mimeType": mt, "fileUri": url}}))
            }
        },
    }
}

fn mime_guess(url: &str) -> Option<&'static str> {
    let path = url.split(['?', '#']).next().unwrap_or(url).to_ascii_lowercase();
    let ext = path.rsplit('.').next()?;
    Some(match ext {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "heic" => "image/heic",
        "pdf" => "application/pdf",
        _ => return None,
    })
}

pub fn encode_request(req: &ChatRequest, loss: &mut Loss) -> Result<Value, ConvertError> {
    encode_request_with(req, false, loss)
}

/// Encode for a Gemini upstream; `json_schema_tools`: the model takes tool
/// schemas whole as `parametersJsonSchema` (the capability table's word),
/// else they are sanitized into `parameters`.
pub fn encode_request_with(req: &ChatRequest, json_schema_tools: bool, loss: &mut Loss) -> Result<Value, ConvertError> {
    if req.only.logprobs {
        return Err(ConvertError::Refused(
            "logprobs are not converted for Gemini upstreams; route this request to an OpenAI upstream".into(),
        ));
    }
    if req.stream && req.only.candidates.is_some_and(|n| n > 1) {
        // A Gemini stream interleaves its candidates; one stream choice per
        // candidate is not converted, and one choice alone would be silent loss.
        return Err(ConvertError::Refused(
            "n > 1 is not converted for streams from Gemini upstreams; ask without streaming, or send separate requests"
                .into(),
        ));
    }
    let mut out = Map::new();
    let names: std::collections::HashMap<&str, &str> = req
        .messages
        .iter()
        .flat_map(|m| &m.parts)
        .filter_map(|p| match p {
            Part::ToolCall(c) => Some((c.id.as_str(), c.name.as_str())),
            _ => None,
        })
        .collect();
    let mut contents = Vec::new();
    for m in &req.messages {
        let mut parts = Vec::new();
        for p in &m.parts {
            let v = match p {
                Part::Text(t) if t.is_empty() => None,
                Part::Text(t) => Some(json!({"text": t})),
                Part::Image(m) | Part::Document { media: m, .. } => inline(m, loss),
                Part::ToolCall(c) => {
                    let mut v = json!({"functionCall": {"name": c.name, "args": arguments_object(&c.arguments)}});
                    if let Some(sig) = &c.signature {
                        v["thoughtSignature"] = sig.clone().into();
                    }
                    Some(v)
                }
                Part::ToolResult(r) => {
                    let name = r
                        .name
                        .clone()
                        .or_else(|| names.get(r.call_id.as_str()).map(|n| n.to_string()))
                        .unwrap_or_default();
                    let text: String = r
                        .content
                        .iter()
                        .filter_map(|p| if let Part::Text(t) = p { Some(t.as_str()) } else { None })
                        .collect::<Vec<_>>()
                        .join("\n");
                    if r.content.iter().any(|p| !matches!(p, Part::Text(_))) {
                        loss.dropped("images in tool results (Gemini takes text)");
                    }
                    let response = match serde_json::from_str::<Value>(&text) {
                        Ok(v @ Value::Object(_)) => v,
                        _ if r.is_error => json!({"error": text}),
                        _ => json!({"result": text}),
                    };
                    Some(json!({"functionResponse": {"name": name, "response": response}}))
                }
                Part::Thinking { .. } | Part::RedactedThinking(_) => None,
            };
            parts.extend(v);
        }
        if parts.is_empty() {
            continue;
        }
        let role = if m.role == Role::User { "user" } else { "model" };
        contents.push(json!({"role": role, "parts": parts}));
    }
    out.insert("contents".into(), Value::Array(contents));
    if !req.system.is_empty() {
        out.insert(
            "systemInstruction".into(),
            json!({"parts": [{"text": req.system.join("\n\n")}]}),
        );
    }
    let mut g = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            g.insert(k.into(), v);
        }
    };
    put("maxOutputTokens", req.max_tokens.map(Value::from));
    put("temperature", req.temperature.map(Value::from));
    put("topP", req.top_p.map(Value::from));
    put("topK", req.top_k.map(Value::from));
    put("seed", req.seed.map(Value::from));
    put("presencePenalty", req.presence_penalty.map(Value::from));
    put("frequencyPenalty", req.frequency_penalty.map(Value::from));
    put("candidateCount", req.only.candidates.map(Value::from));
    if !req.stop.is_empty() {
        if req.stop.len() > 5 {
            loss.dropped("stop sequences beyond the 5 Gemini accepts");
        }
        g.insert(
            "stopSequences".into(),
            json!(req.stop.iter().take(5).collect::<Vec<_>>()),
        );
    }
    match &req.response_format {
        Some(ResponseFormat::JsonObject) => {
            g.insert("responseMimeType".into(), "application/json".into());
        }
        Some(ResponseFormat::JsonSchema { schema, .. }) => {
            g.insert("responseMimeType".into(), "application/json".into());
            g.insert("responseJsonSchema".into(), schema.clone());
        }
        Some(ResponseFormat::Text) | None => {}
    }
    if let Some(r) = &req.reasoning {
        let budget = if r.disabled {
            Some(0)
        } else {
            r.budget_tokens.or_else(|| r.effort.map(Effort::budget))
        };
        if let Some(b) = budget {
            g.insert(
                "thinkingConfig".into(),
                json!({"thinkingBudget": b, "includeThoughts": b > 0}),
            );
        }
    }
    if !g.is_empty() {
        out.insert("generationConfig".into(), Value::Object(g));
    }
    if !req.tools.is_empty() {
        let decls: Vec<Value> = req
            .tools
            .iter()
            .map(|t| {
                let mut d = if json_schema_tools {
                    let mut schema = t.parameters.clone();
                    if let Some(m) = schema.as_object_mut() {
                        m.remove("$schema");
                    }
                    json!({"name": t.name, "parametersJsonSchema": schema})
                } else {
                    json!({"name": t.name, "parameters": sanitize_schema(&t.parameters)})
                };
                if let Some(desc) = &t.description {
                    d["description"] = desc.clone().into();
                }
                d
            })
            .collect();
        out.insert("tools".into(), json!([{"functionDeclarations": decls}]));
        if let Some(tc) = &req.tool_choice {
            let fc = match tc {
                ToolChoice::Auto => json!({"mode": "AUTO"}),
                ToolChoice::None => json!({"mode": "NONE"}),
                ToolChoice::Required => json!({"mode": "ANY"}),
                ToolChoice::Named(n) => json!({"mode": "ANY", "allowedFunctionNames": [n]}),
            };
            out.insert("toolConfig".into(), json!({"functionCallingConfig": fc}));
        }
        if req.parallel_tool_calls == Some(false) {
            loss.dropped("parallel_tool_calls=false (Gemini has no such switch)");
        }
    }
    if req.user.is_some() {
        loss.dropped("user (Gemini has no end-user field)");
    }
    Ok(Value::Object(out))
}

pub fn finish_from_wire(reason: &str, has_calls: bool) -> Finish {
    match reason {
        "STOP" if has_calls => Finish::ToolCalls,
        "STOP" => Finish::Stop,
        "MAX_TOKENS" => Finish::Length,
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => Finish::ContentFilter,
        other => Finish::Other(other.to_string()),
    }
}

pub fn finish_to_wire(f: &Finish) -> &'static str {
    match f {
        Finish::Stop | Finish::StopSequence(_) | Finish::ToolCalls | Finish::PauseTurn => "STOP",
        Finish::Length => "MAX_TOKENS",
        Finish::ContentFilter | Finish::Refusal => "SAFETY",
        Finish::Other(_) => "OTHER",
    }
}

pub fn usage_from_wire(u: &Value) -> Usage {
    let n = |k| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let cached = n("cachedContentTokenCount");
    let thoughts = n("thoughtsTokenCount");
    Usage {
        input: n("promptTokenCount").saturating_sub(cached),
        cache_read: cached,
        cache_write: 0,
        output: n("candidatesTokenCount") + thoughts,
        reasoning: thoughts,
    }
}

pub fn usage_to_wire(u: &Usage) -> Value {
    let mut v = json!({
        "promptTokenCount": u.input_total(),
        "candidatesTokenCount": u.output - u.reasoning.min(u.output),
        "totalTokenCount": u.input_total() + u.output,
    });
    if u.reasoning > 0 {
        v["thoughtsTokenCount"] = u.reasoning.into();
    }
    if u.cache_read > 0 {
        v["cachedContentTokenCount"] = u.cache_read.into();
    }
    v
}

/// A candidate's place among the answer's candidates (Gemini omits a zero `index`).
fn candidate_index(c: &Value) -> u64 {
    c.get("index").and_then(Value::as_u64).unwrap_or(0)
}

/// The candidate numbered 0 — not necessarily the first listed.
pub(crate) fn first_candidate(body: &Value) -> Option<&Value> {
    body.get("candidates")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| candidate_index(c) == 0))
}

/// Why the prompt was blocked, when Gemini refused it whole
/// (`promptFeedback.blockReason`, sent with no candidates).
pub(crate) fn prompt_blocked(body: &Value) -> Option<&str> {
    field(body, "promptFeedback", "prompt_feedback")
        .and_then(|f| field(f, "blockReason", "block_reason"))
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty() && *r != "BLOCK_REASON_UNSPECIFIED")
}

/// One candidate's parts and finish reason.
fn decode_candidate(cand: &Value, id: &str, loss: &mut Loss) -> Result<Choice, ConvertError> {
    let parts = cand
        .get("content")
        .and_then(|c| c.get("parts"))
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let parts = decode_parts(parts, id, &mut Vec::new(), loss)?;
    let has_calls = parts.iter().any(|p| matches!(p, Part::ToolCall(_)));
    Ok(Choice {
        finish: opt_str(cand, "finishReason").map(|r| finish_from_wire(r, has_calls)),
        parts,
    })
}

pub fn decode_response(body: &Value, loss: &mut Loss) -> Result<ChatResponse, ConvertError> {
    let id = opt_str(body, "responseId").unwrap_or_default().to_string();
    // Every candidate (several with `candidateCount`), in `index` order.
    let mut cands: Vec<&Value> = body
        .get("candidates")
        .and_then(Value::as_array)
        .map(|cs| cs.iter().collect())
        .unwrap_or_default();
    cands.sort_by_key(|c| candidate_index(c));
    let mut choices = cands
        .into_iter()
        .map(|c| decode_candidate(c, &id, loss))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter();
    let first = choices.next().unwrap_or_default();
    let finish = match first.finish {
        None if prompt_blocked(body).is_some() => Some(Finish::ContentFilter),
        f => f,
    };
    Ok(ChatResponse {
        model: opt_str(body, "modelVersion").unwrap_or_default().to_string(),
        id,
        parts: first.parts,
        finish,
        usage: body.get("usageMetadata").filter(|u| u.is_object()).map(usage_from_wire),
        more: choices.collect(),
    })
}

/// One candidate, as Gemini writes it.
fn encode_candidate(index: usize, parts: &[Part], finish: Option<&Finish>) -> Value {
    let mut ignored = Loss::default();
    let carried = carry_thinking(parts);
    let mut parts: Vec<Value> = parts
        .iter()
        .filter_map(|p| match p {
            Part::Text(t) if t.is_empty() => None,
            Part::Text(t) => Some(json!({"text": t})),
            Part::Thinking { text, .. } => Some(json!({"text": text, "thought": true})),
            Part::ToolCall(c) => {
                let mut v =
                    json!({"functionCall": {"id": c.id, "name": c.name, "args": arguments_object(&c.arguments)}});
                if let Some(sig) = &c.signature {
                    v["thoughtSignature"] = sig.clone().into();
                }
                Some(v)
            }
            Part::Image(m) | Part::Document { media: m, .. } => inline(m, &mut ignored),
            Part::ToolResult(_) | Part::RedactedThinking(_) => None,
        })
        .collect();
    if let Some(sig) = carried {
        attach_carried(&mut parts, sig);
    }
    json!({
        "content": {"role": "model", "parts": parts},
        "finishReason": finish.map_or("STOP", finish_to_wire),
        "index": index,
    })
}

/// A carried thinking signature ([`carry_thinking`]) on the part a Gemini
/// client keeps and sends back: the first function call (where Gemini puts
/// its own), else the last thought part, else a thought part of its own.
pub(crate) fn attach_carried(parts: &mut Vec<Value>, signature: String) {
    let at = parts
        .iter()
        .position(|p| p.get("functionCall").is_some())
        .or_else(|| parts.iter().rposition(|p| p.get("thought") == Some(&Value::Bool(true))));
    match at.and_then(|i| parts.get_mut(i)) {
        Some(p) if p.get("thoughtSignature").is_none() => p["thoughtSignature"] = signature.into(),
        Some(_) => tracing::debug!("a part already signed by Gemini; carried thinking not attached"),
        None => parts.push(json!({"text": "", "thought": true, "thoughtSignature": signature})),
    }
}

pub fn encode_response(resp: &ChatResponse) -> Value {
    let candidates: Vec<Value> = std::iter::once(encode_candidate(0, &resp.parts, resp.finish.as_ref()))
        .chain(
            resp.more
                .iter()
                .enumerate()
                .map(|(i, c)| encode_candidate(i + 1, &c.parts, c.finish.as_ref())),
        )
        .collect();
    let mut out = json!({
        "candidates": candidates,
        "modelVersion": resp.model,
        "responseId": resp.id,
    });
    if let Some(u) = &resp.usage {
        out["usageMetadata"] = usage_to_wire(u);
    }
    out
}

#[cfg(test)]
mod carried_thinking_tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

    fn signed(text: &str, sig: &str) -> Part {
        Part::Thinking {
            text: text.into(),
            signature: Some(sig.into()),
        }
    }

    fn call(sig: Option<&str>) -> Part {
        Part::ToolCall(ToolCall {
            id: "toolu_1".into(),
            name: "weather".into(),
            arguments: r#"{"city":"Paris"}"#.into(),
            signature: sig.map(str::to_string),
        })
    }

    /// Gemini's own signatures look like this (base64 of a protobuf).
    const FOREIGN: &str = "CiQB0e2Kb3sL8Gm2wY4mQ2rKgD9hYp1yQ9x0c1C3m8k0VnU=";

    #[test]
    fn the_prefix_is_sealed_in_base64() {
        assert_eq!(STANDARD.encode(super::super::responses::SEALED), CARRIED_B64_PREFIX);
    }

    #[test]
    fn blocks_round_trip_in_order() {
        let blocks = vec![
            signed("let me think", "EqQBsig=="),
            Part::RedactedThinking("EmwKAhgB".into()),
        ];
        let sig = carry_thinking(&blocks).unwrap();
        assert!(sig.starts_with(CARRIED_B64_PREFIX));
        assert!(STANDARD.decode(&sig).unwrap().starts_with(b"fastgate.v1:["));
        assert_eq!(carried_thinking(&sig), Some(blocks));
    }

    #[test]
    fn unsigned_thinking_is_not_carried() {
        assert_eq!(
            carry_thinking(&[Part::Thinking {
                text: "t".into(),
                signature: None
            }]),
            None
        );
        assert_eq!(carry_thinking(&[Part::Text("hi".into())]), None);
    }

    #[test]
    fn url_safe_and_unpadded_base64_is_read() {
        // Text whose encoding needs `+`, `/` and padding in the standard alphabet.
        let blocks = vec![signed("ÿþ?>~ünicode ✓✓", "sig/+=")];
        let sig = carry_thinking(&blocks).unwrap();
        let bytes = STANDARD.decode(&sig).unwrap();
        let url = URL_SAFE_NO_PAD.encode(&bytes);
        assert!(sig.contains('+') || sig.contains('/'), "{sig}");
        assert_ne!(url, sig);
        assert_eq!(carried_thinking(&url), Some(blocks.clone()));
        // Padding stripped from the standard alphabet, and url-safe padded.
        assert_eq!(carried_thinking(sig.trim_end_matches('=')), Some(blocks.clone()));
        let url_padded = base64::engine::general_purpose::URL_SAFE.encode(&bytes);
        assert_eq!(carried_thinking(&url_padded), Some(blocks));
    }

    #[test]
    fn a_foreign_signature_is_not_read() {
        assert_eq!(carried_thinking(FOREIGN), None);
        assert_eq!(carried_thinking("skip_thought_signature_validator"), None);
        assert_eq!(carried_thinking(""), None);
    }

    #[test]
    fn a_damaged_payload_is_ignored() {
        let sealed = |s: &str| STANDARD.encode(format!("fastgate.v1:{s}"));
        let whole = carry_thinking(&[signed("thinking", "SIG")]).unwrap();
        for bad in [
            sealed("[{"),
            sealed("{}"),
            sealed("[]"),
            sealed(r#"[{"type":"thinking"}]"#),
            sealed(r#"[{"type":"thinking","thinking":"t","signature":""}]"#),
            sealed(r#"[{"type":"text","text":"t"}]"#),
            format!("{CARRIED_B64_PREFIX}!!!%%"),
            whole[..whole.len() / 2].to_string(),
            format!("{whole}AB"),
        ] {
            assert_eq!(carried_thinking(&bad), None, "{bad}");
        }
    }

    #[test]
    fn past_the_cap_nothing_is_carried() {
        let long = "x".repeat(MAX_CARRIED_THINKING);
        assert_eq!(carry_thinking(&[signed(&long, "S")]), None);
        assert!(carry_thinking(&[signed(&long[..MAX_CARRIED_THINKING - 100], "S")]).is_some());
    }

    fn request(model_parts: Value) -> ChatRequest {
        let body = json!({"contents": [
            {"role": "user", "parts": [{"text": "weather in Paris?"}]},
            {"role": "model", "parts": model_parts},
            {"role": "user", "parts": [{"functionResponse": {"name": "weather", "response": {"temp": 21}}}]},
        ]});
        decode_request(&body, "m", false, &mut Loss::default()).unwrap()
    }

    #[test]
    fn a_carried_signature_opens_the_turn_without_duplicates() {
        let blocks = vec![signed("think A", "SIG-A"), Part::RedactedThinking("RED".into())];
        let sig = carry_thinking(&blocks).unwrap();
        // As Gemini CLI sends it back: thought parts gone, the call signed.
        let call_only = json!([{"text": "Checking."}, {"functionCall": {"name": "weather", "args": {"city": "Paris"}}, "thoughtSignature": sig}]);
        let req = request(call_only);
        let turn = &req.messages[1].parts;
        assert_eq!(&turn[..2], &blocks[..]);
        assert_eq!(turn[2], Part::Text("Checking.".into()));
        assert!(matches!(&turn[3], Part::ToolCall(c) if c.signature.is_none() && c.name == "weather"));
        assert_eq!(turn.len(), 4);
        // The thought text sent back too is not repeated.
        let with_thoughts = json!([{"text": "think A", "thought": true}, {"functionCall": {"name": "weather", "args": {}}, "thoughtSignature": URL_SAFE_NO_PAD.encode(STANDARD.decode(&sig).unwrap())}]);
        let turn = request(with_thoughts).messages[1].parts.clone();
        assert_eq!(&turn[..2], &blocks[..]);
        assert_eq!(turn.len(), 3);
    }

    #[test]
    fn a_carried_signature_on_a_thought_part_replaces_it() {
        let blocks = vec![signed("think", "SIG")];
        let sig = carry_thinking(&blocks).unwrap();
        let turn = request(json!([{"text": "think", "thought": true, "thoughtSignature": sig}, {"text": "Sunny."}]))
            .messages[1]
            .parts
            .clone();
        assert_eq!(turn, vec![signed("think", "SIG"), Part::Text("Sunny.".into())]);
    }

    #[test]
    fn foreign_and_damaged_signatures_stay_on_their_part() {
        for sig in [FOREIGN.to_string(), format!("{CARRIED_B64_PREFIX}AAAA")] {
            let turn = request(json!([{"text": "t", "thought": true}, {"functionCall": {"name": "weather", "args": {}}, "thoughtSignature": sig}]))
                .messages[1]
                .parts
                .clone();
            assert_eq!(turn.len(), 2, "{turn:?}");
            assert!(matches!(&turn[1], Part::ToolCall(c) if c.signature.as_deref() == Some(sig.as_str())));
        }
    }

    #[test]
    fn answers_carry_the_thinking_on_the_first_call_or_the_last_thought() {
        let blocks = vec![signed("one", "S1"), signed("two", "S2")];
        let mut parts = blocks.clone();
        parts.extend([Part::Text("Checking.".into()), call(None), call(None)]);
        let resp = ChatResponse {
            parts,
            ..ChatResponse::default()
        };
        let out = encode_response(&resp);
        let wire = out["candidates"][0]["content"]["parts"].as_array().unwrap();
        assert_eq!(wire[0], json!({"text": "one", "thought": true}));
        assert_eq!(wire[1], json!({"text": "two", "thought": true}));
        let sig = wire[3]["thoughtSignature"].as_str().unwrap();
        assert_eq!(carried_thinking(sig), Some(blocks.clone()));
        assert!(wire[4].get("thoughtSignature").is_none());
        // No call: on the last thought part.
        let mut parts = blocks.clone();
        parts.push(Part::Text("Sunny.".into()));
        let out = encode_response(&ChatResponse {
            parts,
            ..ChatResponse::default()
        });
        let wire = out["candidates"][0]["content"]["parts"].as_array().unwrap();
        assert!(wire[0].get("thoughtSignature").is_none());
        assert_eq!(
            carried_thinking(wire[1]["thoughtSignature"].as_str().unwrap()),
            Some(blocks)
        );
        // Redacted only: a thought part of its own.
        let out = encode_response(&ChatResponse {
            parts: vec![Part::RedactedThinking("R".into()), Part::Text("ok".into())],
            ..ChatResponse::default()
        });
        let wire = out["candidates"][0]["content"]["parts"].as_array().unwrap();
        assert_eq!(wire[1]["thought"], true);
        assert_eq!(wire[1]["text"], "");
        assert_eq!(
            carried_thinking(wire[1]["thoughtSignature"].as_str().unwrap()),
            Some(vec![Part::RedactedThinking("R".into())])
        );
        // Unsigned reasoning (another provider's) carries nothing.
        let out = encode_response(&ChatResponse {
            parts: vec![
                Part::Thinking {
                    text: "r".into(),
                    signature: None,
                },
                call(None),
            ],
            ..ChatResponse::default()
        });
        assert!(out.to_string().find("thoughtSignature").is_none());
        // A Gemini signature on the call stays as it is.
        let out = encode_response(&ChatResponse {
            parts: vec![call(Some(FOREIGN))],
            ..ChatResponse::default()
        });
        assert_eq!(out["candidates"][0]["content"]["parts"][0]["thoughtSignature"], FOREIGN);
    }
}
