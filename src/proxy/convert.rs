//! The proxy side of format conversion: turning a client's request into the
//! upstream's (body, path, headers) and the upstream's answer — whole,
//! streamed, or an error — into the client's. The conversion itself lives
//! in `crate::convert`; requests whose route and upstream speak the same
//! format never come here.

use super::{ctx::RequestCtx, errors::GatewayError};
use crate::usage::PlainBody;
use crate::{
    config::routes_d::Format,
    convert::{
        ConvertError, Loss, anthropic, gemini,
        ir::{ChatRequest, ChatResponse},
        model_id,
        openai::{self, ToolNames},
        responses,
        stream::{self, Converter},
    },
    router::{converts, provider_format},
};
use bytes::Bytes;
use http::header;
use pingora::{http::ResponseHeader, protocols::http::client::HttpSession, proxy::Session};
use serde_json::Value;
use std::time::Duration;

/// Largest non-stream answer converted (an LLM answer is far smaller).
pub(super) const MAX_ANSWER: usize = 32 * 1024 * 1024;
/// How much of an upstream error answer is read to convert it.
pub(super) const MAX_ERROR: usize = 64 * 1024;
/// Most bytes a compressed upstream stream is decoded to (an LLM stream is
/// far smaller; a decompression bomb stops here).
const MAX_STREAM_DECODED: usize = 256 * 1024 * 1024;

/// The upstream body's `Content-Encoding` (FastGate asks for `identity`;
/// some servers compress anyway).
pub(super) fn content_encoding(headers: &http::HeaderMap) -> Option<&str> {
    headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok())
}

/// What is being converted.
#[derive(Debug)]
enum Op {
    Chat,
    Embed(crate::convert::embeddings::EmbedRequest),
    /// A token count, asked of the upstream's own counting endpoint.
    Count,
}

/// How one request is converted toward one upstream.
#[derive(Debug)]
pub struct Plan {
    op: Op,
    pub client: Format,
    pub upstream: Format,
    pub stream: bool,
    /// `fake_stream`: the client streams, the upstream is asked for a
    /// whole answer (`super::fake_stream` writes the stream).
    pub fake: bool,
    /// The client's own format on both sides (a fake stream on a
    /// same-format route): the rewritten path is kept.
    same_format: bool,
    include_usage: bool,
    /// The model the client asked for: answers name it.
    model: String,
    /// A Gemini client streaming without `alt=sse` gets a JSON array.
    gemini_array: bool,
    names: ToolNames,
    /// `json_schema` toward Anthropic: the forced tool whose input is the answer.
    json_tool: Option<&'static str>,
    /// A Responses client's custom tools and echoed request fields.
    echo: Option<Box<responses::Echo>>,
    pub loss: Loss,
    /// The converted body.
    pub body: Bytes,
    /// The upstream path and query (before the endpoint's base path).
    pub path: String,
}

fn not_convertible(e: ConvertError) -> GatewayError {
    match e {
        ConvertError::Invalid(m) => GatewayError::BadJson(m),
        ConvertError::Refused(m) => GatewayError::NotConvertible(m),
    }
}

/// The conversion for a request in `client` format to `provider`, or `None`
/// when the upstream speaks the client's format (raw passthrough). With
/// `fake_stream`, a chat request that asks to stream is asked of the
/// upstream whole (same format included) and streamed by FastGate.
pub fn plan(
    client: Format,
    upstream: &crate::upstream::Upstream,
    model_map: &std::collections::HashMap<String, String>,
    (path, query): (&str, Option<&str>),
    body: &[u8],
    fake_stream: bool,
) -> Result<Option<Plan>, GatewayError> {
    let provider = upstream.provider;
    if !converts(provider, client) {
        return match fake_stream && provider_format(provider) == client {
            true => same_format_plan(client, path, query, body),
            false => Ok(None),
        };
    }
    let default_max_tokens = upstream.default_max_tokens;
    let upstream_caps = &upstream.capabilities;
    let upstream = provider_format(provider);
    let json: Value = serde_json::from_slice(body).map_err(|e| GatewayError::BadJson(e.to_string()))?;
    let mut loss = Loss::default();
    let gemini_array = client == Format::Gemini && !query.is_some_and(|q| q.split('&').any(|p| p == "alt=sse"));
    // `model_map` applies once: a body's model was mapped by intake (with
    // the route's other rewrites), a Gemini URL's model is mapped here.
    let mapped = |m: &str| match client {
        Format::Gemini => model_map.get(m).cloned().unwrap_or_else(|| m.to_string()),
        _ => m.to_string(),
    };
    if let Some(plan) = embeddings_plan(client, upstream, path, &json, &mapped)? {
        return Ok(Some(plan));
    }
    if is_token_count(client, path) {
        return count_plan(client, upstream, path, &json, &mapped, default_max_tokens).map(Some);
    }
    let mut echo = None;
    let mut req: ChatRequest = match client {
        Format::Openai if path.ends_with("/chat/completions") => openai::decode_request(&json, &mut loss),
        Format::Responses if path.ends_with("/responses") => {
            responses::decode_request(&json, &mut loss).map(|(req, e)| {
                echo = Some(Box::new(e));
                req
            })
        }
        Format::Anthropic if path.ends_with("/messages") => anthropic::decode_request(&json, &mut loss),
        Format::Gemini if path.contains(":generateContent") || path.contains(":streamGenerateContent") => {
            let model = super::intake::model_from_gemini_path(path).unwrap_or_default();
            gemini::decode_request(&json, model, path.contains(":streamGenerateContent"), &mut loss)
        }
        _ => {
            return Err(GatewayError::NotConvertible(format!(
                "{path} is not converted from {} to {}: chat, responses, embeddings and model lists are",
                client.name(),
                upstream.name()
            )));
        }
    }
    .map_err(not_convertible)?;
    req.model = mapped(&req.model);
    let client_stream = req.stream;
    let fake = fake_stream && req.stream;
    if fake {
        refuse_fake_candidates(&req)?;
        req.stream = false;
    }
    let mut names = ToolNames::default();
    // What the model takes: the upstream's rules, then the shipped table.
    let caps = crate::convert::capabilities::lookup(provider, &req.model, upstream_caps);
    if let Some(max) = caps.max_output {
        lower_max_tokens(&mut req, max, &mut loss);
    }
    let default_max_tokens = caps
        .max_output
        .map_or(default_max_tokens, |m| default_max_tokens.min(m));
    let encoded = match upstream {
        Format::Openai => {
            let target = openai::Target {
                compatible: provider == crate::config::Provider::OpenaiCompatible,
                reasoning: Some(caps.reasoning),
            };
            openai::encode_request_to(&req, target, &mut names, &mut loss)
        }
        Format::Anthropic => {
            let target = anthropic::Target {
                sampling_pair: caps.sampling_pair,
                prompt_cache: caps.prompt_cache,
                max_output: caps.max_output,
            };
            anthropic::encode_request_with(&req, default_max_tokens, target, &mut loss)
        }
        Format::Gemini => gemini::encode_request_with(&req, caps.parameters_json_schema, &mut loss),
        Format::Responses | Format::Passthrough => return Ok(None),
    }
    .map_err(not_convertible)?;
    let upstream_path = match upstream {
        Format::Openai => "/v1/chat/completions".to_string(),
        Format::Anthropic => "/v1/messages".to_string(),
        _ if req.stream => format!(
            "/v1beta/models/{}:streamGenerateContent?alt=sse",
            model_id::path_segment(&req.model)?
        ),
        _ => format!("/v1beta/models/{}:generateContent", model_id::path_segment(&req.model)?),
    };
    Ok(Some(Plan {
        op: Op::Chat,
        client,
        upstream,
        stream: client_stream,
        fake,
        same_format: false,
        include_usage: req.include_usage,
        model: req.model.clone(),
        gemini_array,
        names,
        json_tool: (upstream == Format::Anthropic && anthropic::answers_json_by_tool(&req))
            .then_some(anthropic::JSON_TOOL),
        echo,
        loss,
        body: Bytes::from(serde_json::to_vec(&encoded).unwrap_or_default()),
        path: upstream_path,
    }))
}

/// A fake stream serves one choice: several (OpenAI `n`, Gemini
/// `candidateCount`) are refused, as they are for converted streams.
fn refuse_fake_candidates(req: &ChatRequest) -> Result<(), GatewayError> {
    match req.only.candidates {
        Some(n) if n > 1 => Err(GatewayError::NotConvertible(
            "several choices (n / candidateCount > 1) are not served as a fake stream; ask without streaming".into(),
        )),
        _ => Ok(()),
    }
}

/// A fake stream toward an upstream of the client's own format: the
/// client's body with streaming off (OpenAI's `stream_options` go with
/// it), a Gemini stream path turned into `:generateContent`. `None` for
/// anything but a chat request that asks to stream (it passes through).
fn same_format_plan(
    client: Format,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Result<Option<Plan>, GatewayError> {
    let chat = match client {
        Format::Openai => path.ends_with("/chat/completions"),
        Format::Anthropic => path.ends_with("/messages"),
        Format::Gemini => path.contains(":streamGenerateContent"),
        // Responses toward OpenAI itself, or a format FastGate does not read.
        _ => false,
    };
    if !chat {
        return Ok(None);
    }
    let mut json: Value = serde_json::from_slice(body).map_err(|e| GatewayError::BadJson(e.to_string()))?;
    let mut loss = Loss::default();
    let req = match client {
        Format::Openai => openai::decode_request(&json, &mut loss),
        Format::Anthropic => anthropic::decode_request(&json, &mut loss),
        _ => {
            let model = super::intake::model_from_gemini_path(path).unwrap_or_default();
            gemini::decode_request(&json, model, true, &mut loss)
        }
    }
    .map_err(not_convertible)?;
    if !req.stream {
        return Ok(None);
    }
    refuse_fake_candidates(&req)?;
    if let Some(obj) = json.as_object_mut()
        && client != Format::Gemini
    {
        obj.insert("stream".into(), Value::Bool(false));
        obj.remove("stream_options");
    }
    Ok(Some(Plan {
        op: Op::Chat,
        client,
        upstream: client,
        stream: true,
        fake: true,
        same_format: true,
        include_usage: req.include_usage,
        model: req.model.clone(),
        gemini_array: client == Format::Gemini && !query.is_some_and(|q| q.split('&').any(|p| p == "alt=sse")),
        names: ToolNames::default(),
        json_tool: None,
        echo: None,
        // Nothing was converted: nothing to warn about.
        loss: Loss::default(),
        body: Bytes::from(serde_json::to_vec(&json).unwrap_or_default()),
        path: String::new(),
    }))
}

/// A `max_tokens` over what the model gives is lowered to it (the provider
/// would refuse the request: Claude Code asks 32,000, gpt-4o gives 16,384).
fn lower_max_tokens(req: &mut ChatRequest, max: u64, loss: &mut Loss) {
    if let Some(n) = req.max_tokens.filter(|n| *n > max) {
        loss.dropped(format!(
            "max_tokens {n} lowered to {max}, the model's most output tokens"
        ));
        req.max_tokens = Some(max);
    }
}

/// The plan for an embeddings request, if this is one (OpenAI ⇄ Gemini;
/// Anthropic has no embeddings API).
fn embeddings_plan(
    client: Format,
    upstream: Format,
    path: &str,
    json: &Value,
    mapped: &dyn Fn(&str) -> String,
) -> Result<Option<Plan>, GatewayError> {
    use crate::convert::embeddings as e;
    let mut req = match client {
        Format::Openai if path.ends_with("/embeddings") => e::decode_openai(json),
        Format::Gemini if path.contains(":embedContent") || path.contains(":batchEmbedContents") => {
            let model = super::intake::model_from_gemini_path(path).unwrap_or_default();
            e::decode_gemini(json, model, path.contains(":embedContent"))
        }
        _ => return Ok(None),
    }
    .map_err(not_convertible)?;
    req.model = mapped(&req.model);
    let (body, path) = match upstream {
        Format::Gemini => (
            e::encode_gemini(&req),
            format!(
                "/v1beta/models/{}:batchEmbedContents",
                model_id::path_segment(&req.model)?
            ),
        ),
        Format::Openai => (e::encode_openai(&req), "/v1/embeddings".to_string()),
        _ => {
            return Err(GatewayError::NotConvertible(format!(
                "embeddings cannot be served by an {} upstream (it has no embeddings API)",
                upstream.name()
            )));
        }
    };
    let model = req.model.clone();
    Ok(Some(Plan::whole(
        Op::Embed(req),
        (client, upstream),
        model,
        &body,
        path,
        Loss::default(),
    )))
}

/// Whether `provider` has a token-counting endpoint a converted count can
/// be asked of (Anthropic's `count_tokens`, Gemini's `countTokens`; OpenAI's
/// Chat Completions has none).
pub fn counts_tokens(provider: crate::config::Provider) -> bool {
    use crate::config::Provider;
    matches!(provider, Provider::Anthropic | Provider::Gemini)
}

/// The plan for a token count toward an upstream that counts: the client's
/// request (Anthropic `count_tokens` body; Gemini `{contents}` or
/// `{generateContentRequest}`) encoded as that upstream's count request.
fn count_plan(
    client: Format,
    upstream: Format,
    path: &str,
    json: &Value,
    mapped: &dyn Fn(&str) -> String,
    default_max_tokens: u64,
) -> Result<Plan, GatewayError> {
    let mut loss = Loss::default();
    let mut req = decode_count(client, path, json, &mut loss)?;
    req.model = mapped(&req.model);
    let (body, path) = match upstream {
        Format::Anthropic => {
            let full = anthropic::encode_request(&req, default_max_tokens, &mut loss).map_err(not_convertible)?;
            // count_tokens takes the request's content, not its generation settings.
            let body: serde_json::Map<String, Value> = full
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| {
                    matches!(
                        k.as_str(),
                        "model" | "messages" | "system" | "tools" | "tool_choice" | "thinking"
                    )
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (Value::Object(body), "/v1/messages/count_tokens".to_string())
        }
        Format::Gemini => {
            let mut inner = gemini::encode_request(&req, &mut loss).map_err(not_convertible)?;
            let id = model_id::path_segment(&req.model)?;
            inner["model"] = format!("models/{id}").into();
            (
                serde_json::json!({ "generateContentRequest": inner }),
                format!("/v1beta/models/{id}:countTokens"),
            )
        }
        _ => {
            return Err(GatewayError::NotConvertible(format!(
                "{path}: an {} upstream has no token-counting endpoint",
                upstream.name()
            )));
        }
    };
    Ok(Plan::whole(Op::Count, (client, upstream), req.model, &body, path, loss))
}

/// A token-count request in the client's format, as a chat request.
fn decode_count(client: Format, path: &str, json: &Value, loss: &mut Loss) -> Result<ChatRequest, GatewayError> {
    match client {
        Format::Anthropic => anthropic::decode_request(json, loss),
        _ => {
            let model = super::intake::model_from_gemini_path(path).unwrap_or_default();
            // `{contents}` or a whole `{generateContentRequest}`.
            let inner = json.get("generateContentRequest").unwrap_or(json);
            gemini::decode_request(inner, model, false, loss)
        }
    }
    .map_err(not_convertible)
}

impl Plan {
    /// A plan whose answer comes whole (embeddings, token counts): no stream,
    /// no tools to map back.
    fn whole(
        op: Op,
        (client, upstream): (Format, Format),
        model: String,
        body: &Value,
        path: String,
        loss: Loss,
    ) -> Self {
        Plan {
            op,
            client,
            upstream,
            stream: false,
            fake: false,
            same_format: false,
            include_usage: false,
            model,
            gemini_array: false,
            names: ToolNames::default(),
            json_tool: None,
            echo: None,
            loss,
            body: Bytes::from(serde_json::to_vec(body).unwrap_or_default()),
            path,
        }
    }

    /// Answers name `model`, the one the client asked for (before
    /// `model_map`), as the docs promise; the upstream still gets the mapped one.
    pub fn answer_as(&mut self, model: Option<&str>) {
        if let Some(m) = model.filter(|m| !m.is_empty()) {
            self.model = m.to_string();
        }
    }

    /// The client did not ask for a stream's usage (FastGate asked for
    /// it on the client's behalf): no usage chunk is written.
    pub fn usage_not_asked(&mut self) {
        self.include_usage = false;
    }

    /// The content type of the client's stream: SSE, or a Gemini JSON array.
    pub(super) fn stream_content_type(&self) -> &'static str {
        if self.client == Format::Gemini && self.gemini_array {
            "application/json"
        } else {
            "text/event-stream"
        }
    }

    /// What keeps a fake stream's client waiting, in its own grammar: an
    /// SSE comment for OpenAI and Responses clients (their SDKs skip
    /// comments), Anthropic's `ping` event, and for Gemini blank lines — the
    /// Python SDK parses any other line as JSON, and a JSON array may
    /// start with whitespace.
    pub(super) fn keepalive(&self) -> &'static [u8] {
        match self.client {
            Format::Anthropic => b"event: ping\ndata: {\"type\": \"ping\"}\n\n",
            Format::Gemini if self.gemini_array => b"\n",
            Format::Gemini => b"\n\n",
            _ => b": keepalive\n\n",
        }
    }

    /// Fit the rewritten upstream request to the conversion: path, plain
    /// (uncompressed) answers, JSON body, no headers of the client's format.
    pub fn adjust(&self, req: &mut pingora::http::RequestHeader, base_path: &str) -> Result<(), GatewayError> {
        let uri = match self.same_format {
            true => whole_answer_uri(&req.uri),
            false => format!("{base_path}{}", self.path),
        }
        .parse::<http::Uri>()
        .map_err(|e| GatewayError::BadRequestBody(format!("converted path is invalid: {e}")))?;
        req.set_uri(uri);
        let _ = req.insert_header(header::ACCEPT_ENCODING, "identity");
        let _ = req.insert_header(header::CONTENT_TYPE, "application/json");
        let _ = req.insert_header(
            header::ACCEPT,
            if self.stream && !self.fake {
                "text/event-stream"
            } else {
                "application/json"
            },
        );
        if self.upstream != Format::Anthropic {
            // Consumed here: the Anthropic version and betas of a Claude client.
            req.remove_header("anthropic-version");
            req.remove_header("anthropic-beta");
        }
        if self.client == Format::Gemini {
            req.remove_header("x-goog-api-client");
        }
        Ok(())
    }

    pub(super) fn converter(&self) -> Converter {
        let decoder: Box<dyn stream::Decoder> = match self.upstream {
            Format::Anthropic => Box::new(stream::anthropic::AnthropicDecoder::default()),
            Format::Gemini => Box::new(stream::gemini::GeminiDecoder::default()),
            _ => Box::new(stream::openai::OpenaiDecoder::new(self.names.clone())),
        };
        let encoder: Box<dyn stream::Encoder> = match self.client {
            Format::Anthropic => Box::new(stream::anthropic::AnthropicEncoder::new(&self.model)),
            Format::Gemini => Box::new(stream::gemini::GeminiEncoder::new(&self.model, self.gemini_array)),
            Format::Responses => Box::new(stream::responses::ResponsesEncoder::new(
                &self.model,
                crate::clock::now_unix(),
                self.echo.as_deref().cloned().unwrap_or_default(),
            )),
            _ => Box::new(stream::openai::OpenaiEncoder::new(
                &self.model,
                crate::clock::now_unix(),
                self.include_usage,
            )),
        };
        let conv = Converter::new(decoder, encoder, false);
        match self.json_tool {
            Some(tool) => conv.with_json_tool(tool),
            None => conv,
        }
    }

    /// How the audit log merges this stream: read in the upstream's format,
    /// written in the client's, as the client's stream was converted.
    fn merge_spec(&self) -> crate::audit::merge::Spec {
        crate::audit::merge::Spec {
            upstream: Some(self.upstream),
            client: Some(self.client),
            names: self.names.clone(),
            json_tool: self.json_tool.map(str::to_string),
            model: Some(self.model.clone()),
            echo: self.echo.as_deref().cloned().unwrap_or_default(),
        }
    }

    /// A whole upstream answer in the client's format.
    fn convert_answer(&self, body: &[u8]) -> Result<Vec<u8>, ConvertError> {
        let v: Value = serde_json::from_slice(body).map_err(|e| ConvertError::Invalid(e.to_string()))?;
        if let Op::Count = self.op {
            let n = ["input_tokens", "totalTokens"]
                .iter()
                .find_map(|k| v.get(*k).and_then(Value::as_u64))
                .ok_or_else(|| ConvertError::Invalid("the token count answer has no count".into()))?;
            return Ok(count_answer(self.client, n).to_vec());
        }
        if let Op::Embed(req) = &self.op {
            use crate::convert::embeddings as e;
            let vectors = match self.upstream {
                Format::Gemini => e::vectors_from_gemini(&v)?,
                _ => e::vectors_from_openai(&v)?,
            };
            let out = match self.client {
                Format::Gemini => e::answer_gemini(req, &vectors),
                _ => e::answer_openai(req, &vectors),
            };
            return Ok(serde_json::to_vec(&out).unwrap_or_default());
        }
        let resp = self.decode_chat(&v)?;
        let out = match self.client {
            Format::Anthropic => anthropic::encode_response(&resp),
            Format::Gemini => gemini::encode_response(&resp),
            Format::Responses => responses::encode_response(
                &resp,
                self.echo.as_deref().unwrap_or(&responses::Echo::default()),
                crate::clock::now_unix(),
            ),
            _ => openai::encode_response(&resp, crate::clock::now_unix()),
        };
        Ok(serde_json::to_vec(&out).unwrap_or_default())
    }

    /// A whole chat answer of the upstream, in the IR, naming the client's
    /// model (and a JSON answer's forced tool turned back into text).
    pub(super) fn decode_chat(&self, v: &Value) -> Result<ChatResponse, ConvertError> {
        let mut loss = Loss::default();
        let mut resp = match self.upstream {
            Format::Anthropic => anthropic::decode_response(v, &mut loss)?,
            Format::Gemini => gemini::decode_response(v, &mut loss)?,
            _ => openai::decode_response(v, &self.names)?,
        };
        resp.model = self.model.clone();
        if let Some(tool) = self.json_tool {
            crate::convert::ir::answer_from_json_tool(&mut resp, tool);
        }
        Ok(resp)
    }

    /// An upstream error answer as the client's error: its message, and the
    /// status and code clients act on (context overflow, quota, rate limit,
    /// key, safety) in the client's vocabulary (`convert::errors`).
    fn convert_error(&self, status: u16, body: &[u8], retry_after: Option<u64>) -> GatewayError {
        use crate::convert::errors;
        let upstream_error = errors::decode(self.upstream, status, body);
        // Gemini says how long to wait in the body only.
        let retry_after = retry_after.or_else(|| {
            (self.upstream == Format::Gemini && self.client != Format::Gemini)
                .then(|| errors::gemini_retry_delay(body))
                .flatten()
        });
        let (status, value) = errors::encode(self.client, &upstream_error);
        GatewayError::UpstreamCoded {
            status,
            message: upstream_error.message,
            retry_after,
            body: Bytes::from(value.to_string()),
        }
    }
}

/// A Gemini stream URI (`:streamGenerateContent?alt=sse`) as the whole
/// answer's (`:generateContent`); other paths unchanged.
fn whole_answer_uri(uri: &http::Uri) -> String {
    let path = uri.path().replacen(":streamGenerateContent", ":generateContent", 1);
    let query: Vec<&str> = uri
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty() && *p != "alt=sse")
        .collect();
    match query.is_empty() {
        true => path,
        false => format!("{path}?{}", query.join("&")),
    }
}

/// Read the rest of a body, at most `cap` bytes, each read within `idle`.
pub(super) async fn read_all(up: &mut HttpSession, cap: usize, idle: Duration) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    loop {
        match tokio::time::timeout(idle, up.read_response_body()).await {
            Ok(Ok(Some(chunk))) => {
                if buf.len() + chunk.len() > cap {
                    return Err(format!("answer larger than {cap} bytes"));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(Ok(None)) => return Ok(buf),
            Ok(Err(e)) => return Err(e.etype().as_str().to_string()),
            Err(_) => return Err("idle timeout".into()),
        }
    }
}

/// Hand a converted answer to the client. Returns the error to answer
/// with when nothing was written yet.
pub async fn respond(
    state: &crate::state::AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    (mut up, peer): (HttpSession, &pingora::upstreams::peer::HttpPeer),
    plan: &Plan,
    idle: Duration,
    read_already: Option<Bytes>,
) -> Result<(), GatewayError> {
    let already = read_already.unwrap_or_default();
    let Some(head) = up.response_header().cloned() else {
        return Err(GatewayError::UpstreamUnreachable {
            upstream: ctx.upstream_name().to_string(),
            reason: "no response header".into(),
        });
    };
    let status = head.status.as_u16();
    let upstream_type = head
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let encoding = content_encoding(&head.headers);
    if status >= 400 {
        let mut body = already.to_vec();
        body.extend(read_all(&mut up, MAX_ERROR, idle).await.unwrap_or_default());
        let body = PlainBody::whole(encoding, &body, MAX_ERROR * 4);
        let retry_after = head
            .headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        return Err(plan.convert_error(status, &body, retry_after));
    }
    let h2 = session.is_http2();
    let warning = plan.loss.header_value();
    if plan.stream {
        let content_type = plan.stream_content_type();
        let mut resp = super::respond::header(200, ctx, content_type, None, h2)
            .map_err(|e| GatewayError::BadRequestBody(e.to_string()))?;
        if let Some(w) = &warning {
            let _ = resp.insert_header("x-fastgate-warning", w.as_str());
        }
        ctx.begin_response(&resp);
        ctx.meter_upstream(upstream_type.as_deref());
        ctx.merge_stream(upstream_type.as_deref(), || plan.merge_spec());
        if session.write_response_header(Box::new(resp), false).await.is_err() {
            ctx.response.cut_short = true;
            return Ok(());
        }
        up.set_read_timeout(Some(idle));
        let mut conv = plan.converter();
        let mut plain = PlainBody::new(encoding, MAX_STREAM_DECODED);
        if !already.is_empty() {
            let already = plain.decode(&already);
            ctx.response.meter.feed(&already);
            let out = conv.feed(&already);
            if !send(session, ctx, out).await {
                return Ok(());
            }
        }
        let mut relay = super::relay::Relay::default();
        loop {
            let chunk = tokio::select! {
                chunk = relay.next(&mut up) => chunk,
                _ = session.downstream_session.read_body_or_idle(true) => {
                    ctx.error = Some(GatewayError::ClientClosed);
                    ctx.response.cut_short = true;
                    return Ok(());
                }
            };
            let (out, end) = match chunk {
                Ok(Some(data)) => {
                    let data = plain.decode(&data);
                    ctx.response.meter.feed(&data);
                    // Converted events are somewhat larger than the input.
                    let mut out = Vec::with_capacity(data.len() * 2);
                    conv.feed_into(&data, &mut out);
                    while out.len() < super::relay::BATCH_BYTES && !conv.is_done() {
                        let Some(more) = relay.ready(&mut up) else { break };
                        let more = plain.decode(&more);
                        ctx.response.meter.feed(&more);
                        conv.feed_into(&more, &mut out);
                    }
                    (out, false)
                }
                Ok(None) => {
                    let tail = plain.end();
                    ctx.response.meter.feed(&tail);
                    let mut out = conv.feed(&tail);
                    out.extend(conv.finish());
                    (out, true)
                }
                Err(e) => {
                    let err = GatewayError::UpstreamUnreachable {
                        upstream: ctx.upstream_name().to_string(),
                        reason: format!("{} after the response started", e.etype().as_str()),
                    };
                    let out = conv.fail(&err.to_string());
                    ctx.error = Some(err);
                    (out, true)
                }
            };
            if !send(session, ctx, out).await {
                return Ok(());
            }
            if end || conv.is_done() {
                break;
            }
        }
        // A stream that ended in an error event (the upstream's, or one cut
        // before its end) is an error in the log, not a 200 without one.
        if ctx.error.is_none()
            && let Some(e) = conv.failure()
        {
            ctx.error = Some(GatewayError::Upstream {
                status: e.status,
                message: e.message.clone(),
                retry_after: None,
            });
        }
        let _ = session.write_response_body(None, true).await;
        // The terminal event may come before the body's own end: read that
        // (at once when it is there, else briefly) so the connection can be
        // reused.
        while relay.ready(&mut up).is_some() {}
        if !up.response_done() {
            let _ = tokio::time::timeout(Duration::from_millis(200), async {
                while let Ok(Some(_)) = up.read_response_body().await {}
            })
            .await;
        }
        release(state, up, peer).await;
        return Ok(());
    }
    let mut body = already.to_vec();
    body.extend(
        read_all(&mut up, MAX_ANSWER, idle)
            .await
            .map_err(|reason| GatewayError::UpstreamUnreachable {
                upstream: ctx.upstream_name().to_string(),
                reason,
            })?,
    );
    let body = PlainBody::whole(encoding, &body, MAX_ANSWER);
    let out = plan
        .convert_answer(&body)
        .map_err(|e| GatewayError::UpstreamUnreachable {
            upstream: ctx.upstream_name().to_string(),
            reason: format!("its answer could not be converted: {e}"),
        })?;
    let mut resp = ResponseHeader::build(status, Some(6)).map_err(|e| GatewayError::BadRequestBody(e.to_string()))?;
    resp.insert_header(header::CONTENT_TYPE, "application/json")
        .and_then(|_| resp.insert_header(header::CONTENT_LENGTH, out.len().to_string()))
        .and_then(|_| resp.insert_header("x-request-id", ctx.request_id.as_str()))
        .map_err(|e| GatewayError::BadRequestBody(e.to_string()))?;
    if let Some(w) = &warning {
        let _ = resp.insert_header("x-fastgate-warning", w.as_str());
    }
    ctx.begin_response(&resp);
    ctx.meter_upstream(upstream_type.as_deref());
    ctx.response.meter.feed(&body);
    ctx.count_sent(&out);
    release(state, up, peer).await;
    if session.write_response_header(Box::new(resp), false).await.is_ok() {
        let _ = session.write_response_body(Some(Bytes::from(out)), true).await;
    }
    Ok(())
}

/// Write converted bytes to the client (nothing when empty); false when the
/// client is gone (recorded, and the connection will close).
pub(super) async fn send(session: &mut Session, ctx: &mut RequestCtx, out: Vec<u8>) -> bool {
    if out.is_empty() {
        return true;
    }
    ctx.count_sent(&out);
    if session
        .write_response_body(Some(Bytes::from(out)), false)
        .await
        .is_err()
    {
        ctx.error = Some(GatewayError::ClientClosed);
        ctx.response.cut_short = true;
        return false;
    }
    true
}

/// Give a fully read upstream connection back to the pool.
pub(super) async fn release(
    state: &crate::state::AppState,
    mut up: HttpSession,
    peer: &pingora::upstreams::peer::HttpPeer,
) {
    use pingora::upstreams::peer::Peer;
    if up.response_done() {
        state
            .connector
            .release_http_session(up, peer, peer.idle_timeout())
            .await;
    }
}

/// Whether a request counts tokens (Anthropic `/v1/messages/count_tokens`,
/// Gemini `:countTokens`).
pub fn is_token_count(client: Format, path: &str) -> bool {
    match client {
        Format::Anthropic => path.ends_with("/messages/count_tokens"),
        Format::Gemini => path.contains(":countTokens"),
        _ => false,
    }
}

/// A token count a converting route answers itself with the documented
/// estimate (`ir::estimate_input_tokens`): its upstream (OpenAI-speaking)
/// has no counting endpoint.
pub fn token_count(client: Format, path: &str, body: &[u8]) -> Result<Bytes, GatewayError> {
    let json: Value = serde_json::from_slice(body).map_err(|e| GatewayError::BadJson(e.to_string()))?;
    let req = decode_count(client, path, &json, &mut Loss::default())?;
    Ok(count_answer(client, crate::convert::ir::estimate_input_tokens(&req)))
}

/// A token count in the client's shape.
fn count_answer(client: Format, n: u64) -> Bytes {
    let v = match client {
        Format::Anthropic => serde_json::json!({"input_tokens": n}),
        _ => serde_json::json!({"totalTokens": n}),
    };
    Bytes::from(v.to_string())
}

/// Whether a request lists models (`GET …/models`).
pub fn is_model_list(method: &http::Method, path: &str) -> bool {
    method == http::Method::GET && path.trim_end_matches('/').ends_with("/models")
}

/// The model list a converting route answers itself (the upstream's own
/// list is in another format and names models the client does not use):
/// the models the route table knows for routes of this format, in the
/// client's shape — Anthropic's when the client is Anthropic's SDK.
pub fn model_list(client: Format, headers: &http::HeaderMap, table: &crate::router::RouteTable) -> Bytes {
    let mut models: Vec<&str> = table
        .routes()
        .iter()
        .filter(|r| r.enabled && r.format == client)
        .flat_map(|r| r.known_models.iter().map(String::as_str))
        .collect();
    models.sort_unstable();
    models.dedup();
    let anthropic_client = client == Format::Anthropic || headers.contains_key("anthropic-version");
    let v = match client {
        Format::Gemini => serde_json::json!({
            "models": models.iter().map(|m| serde_json::json!({
                "name": format!("models/{m}"),
                "displayName": m,
                "supportedGenerationMethods": ["generateContent", "streamGenerateContent"],
            })).collect::<Vec<_>>(),
        }),
        _ if anthropic_client => serde_json::json!({
            "data": models.iter().map(|m| serde_json::json!({
                "type": "model", "id": m, "display_name": m, "created_at": "1970-01-01T00:00:00Z",
            })).collect::<Vec<_>>(),
            "has_more": false,
            "first_id": models.first(),
            "last_id": models.last(),
        }),
        _ => serde_json::json!({
            "object": "list",
            "data": models.iter().map(|m| serde_json::json!({
                "id": m, "object": "model", "created": 0, "owned_by": "fastgate",
            })).collect::<Vec<_>>(),
        }),
    };
    Bytes::from(v.to_string())
}
