//! The built-in `mock` provider: answers inside FastGate in the OpenAI,
//! Anthropic or Gemini wire format (JSON and SSE), so the gateway works
//! offline and SDKs get real-shaped answers with no API key.

use super::{ctx::RequestCtx, errors::GatewayError, respond};
use crate::config::MockConfig;
use bytes::Bytes;
use pingora::proxy::Session;
use serde_json::{Value, json};

enum Api {
    OpenaiChat,
    OpenaiEmbeddings,
    OpenaiModels,
    Anthropic,
    Gemini { stream: bool, sse: bool },
    GeminiModels,
}

fn api_for(path: &str, query: Option<&str>) -> Option<Api> {
    let sse = query.is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "alt" && v == "sse"));
    if path.ends_with(":streamGenerateContent") {
        Some(Api::Gemini { stream: true, sse })
    } else if path.ends_with(":generateContent") {
        Some(Api::Gemini { stream: false, sse })
    } else if path.ends_with("/chat/completions") {
        Some(Api::OpenaiChat)
    } else if path.ends_with("/embeddings") {
        Some(Api::OpenaiEmbeddings)
    } else if path.ends_with("/messages") {
        Some(Api::Anthropic)
    } else if path.ends_with("/models") && path.contains("v1beta") {
        Some(Api::GeminiModels)
    } else if path.ends_with("/models") {
        Some(Api::OpenaiModels)
    } else {
        None
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Answer the request as the mock provider.
pub async fn respond(session: &mut Session, ctx: &mut RequestCtx, cfg: &MockConfig) -> pingora::Result<()> {
    let path = session.req_header().uri.path().to_string();
    let query = session.req_header().uri.query().map(str::to_string);
    let Some(api) = api_for(&path, query.as_deref()) else {
        let err = GatewayError::UpstreamStatus {
            upstream: "mock".into(),
            status: 404,
        };
        return respond::error(session, ctx, err).await;
    };
    let body: Value = ctx
        .body
        .as_ref()
        .filter(|b| !b.is_empty())
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or(Value::Null);
    let model = body["model"]
        .as_str()
        .map(str::to_string)
        .or_else(|| ctx.model.clone())
        .unwrap_or_else(|| crate::config::MOCK_MODEL.into());
    let stream = body["stream"].as_bool().unwrap_or(false);
    let prompt_tokens = ctx.body.as_ref().map_or(1, |b| (b.len() / 4).max(1));
    let words: Vec<String> = cfg.reply.split_inclusive(' ').map(str::to_string).collect();
    let completion_tokens = words.len();
    let id = format!("mock-{}", &ctx.request_id[..ctx.request_id.len().min(24)]);
    let text = cfg.reply.clone();
    let interval = cfg.chunk_interval.0;

    match api {
        Api::OpenaiModels => {
            let data = json!({"object": "list", "data": [{"id": "mock-1", "object": "model", "created": 0, "owned_by": "fastgate"}]});
            respond::json(session, ctx, 200, Bytes::from(data.to_string())).await
        }
        Api::GeminiModels => {
            let data = json!({"models": [{"name": "models/mock-1", "displayName": "FastGate mock", "supportedGenerationMethods": ["generateContent", "streamGenerateContent"]}]});
            respond::json(session, ctx, 200, Bytes::from(data.to_string())).await
        }
        Api::OpenaiEmbeddings => {
            let inputs = match &body["input"] {
                Value::Array(a) => a.len().max(1),
                _ => 1,
            };
            let data: Vec<Value> = (0..inputs)
                .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.1, -0.2, 0.3, 0.05 * i as f64]}))
                .collect();
            let out = json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}});
            respond::json(session, ctx, 200, Bytes::from(out.to_string())).await
        }
        Api::OpenaiChat if !stream => {
            let out = json!({
                "id": format!("chatcmpl-{id}"), "object": "chat.completion", "created": now(), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
            });
            respond::json(session, ctx, 200, Bytes::from(out.to_string())).await
        }
        Api::OpenaiChat => {
            let include_usage = body["stream_options"]["include_usage"].as_bool().unwrap_or(false);
            let chunk = |delta: Value, finish: Value| {
                json!({"id": format!("chatcmpl-{id}"), "object": "chat.completion.chunk", "created": now(), "model": model,
                       "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
            };
            let mut events = vec![sse(
                None,
                &chunk(json!({"role": "assistant", "content": ""}), Value::Null),
            )];
            events.extend(
                words
                    .iter()
                    .map(|w| sse(None, &chunk(json!({"content": w}), Value::Null))),
            );
            events.push(sse(None, &chunk(json!({}), json!("stop"))));
            if include_usage {
                events.push(sse(None, &json!({"id": format!("chatcmpl-{id}"), "object": "chat.completion.chunk", "created": now(), "model": model, "choices": [],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}})));
            }
            events.push(Bytes::from_static(b"data: [DONE]\n\n"));
            stream_events(session, ctx, "text/event-stream", events, interval).await
        }
        Api::Anthropic if !stream => {
            let out = json!({
                "id": format!("msg_{id}"), "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens}
            });
            respond::json(session, ctx, 200, Bytes::from(out.to_string())).await
        }
        Api::Anthropic => {
            let mut events = vec![
                sse(
                    Some("message_start"),
                    &json!({"type": "message_start", "message": {"id": format!("msg_{id}"), "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": prompt_tokens, "output_tokens": 1}}}),
                ),
                sse(
                    Some("content_block_start"),
                    &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                ),
                sse(Some("ping"), &json!({"type": "ping"})),
            ];
            events.extend(words.iter().map(|w| {
                sse(
                    Some("content_block_delta"),
                    &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}),
                )
            }));
            events.push(sse(
                Some("content_block_stop"),
                &json!({"type": "content_block_stop", "index": 0}),
            ));
            events.push(sse(Some("message_delta"), &json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": completion_tokens}})));
            events.push(sse(Some("message_stop"), &json!({"type": "message_stop"})));
            stream_events(session, ctx, "text/event-stream", events, interval).await
        }
        Api::Gemini { stream, sse: as_sse } => {
            let usage = json!({"promptTokenCount": prompt_tokens, "candidatesTokenCount": completion_tokens, "totalTokenCount": prompt_tokens + completion_tokens});
            let piece = |t: &str, last: bool| {
                let mut c = json!({"candidates": [{"content": {"parts": [{"text": t}], "role": "model"}, "index": 0}], "modelVersion": model});
                if last {
                    c["candidates"][0]["finishReason"] = json!("STOP");
                    c["usageMetadata"] = usage.clone();
                }
                c
            };
            if !stream {
                return respond::json(session, ctx, 200, Bytes::from(piece(&text, true).to_string())).await;
            }
            let n = words.len();
            let chunks: Vec<Value> = words.iter().enumerate().map(|(i, w)| piece(w, i + 1 == n)).collect();
            if as_sse {
                let events = chunks.iter().map(|c| sse(None, c)).collect();
                stream_events(session, ctx, "text/event-stream", events, interval).await
            } else {
                // Without `alt=sse` Gemini streams one JSON array, element by element.
                let mut events = Vec::with_capacity(n + 1);
                for (i, c) in chunks.iter().enumerate() {
                    events.push(Bytes::from(format!("{}{c}", if i == 0 { "[" } else { ",\r\n" })));
                }
                events.push(Bytes::from_static(b"]"));
                stream_events(session, ctx, "application/json", events, interval).await
            }
        }
    }
}

fn sse(event: Option<&str>, data: &Value) -> Bytes {
    Bytes::from(match event {
        Some(e) => format!("event: {e}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    })
}

/// Write `events` one at a time, `interval` apart, like a model producing tokens.
async fn stream_events(
    session: &mut Session,
    ctx: &mut RequestCtx,
    content_type: &str,
    events: Vec<Bytes>,
    interval: std::time::Duration,
) -> pingora::Result<()> {
    let resp = respond::header(200, ctx, content_type, None, session.is_http2())?;
    ctx.begin_response(&resp);
    session.write_response_header(Box::new(resp), false).await?;
    for (i, event) in events.into_iter().enumerate() {
        if i > 0 && !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
        let event = ctx.upstream_chunk(event);
        if !event.is_empty() {
            session.write_response_body(Some(event), false).await?;
        }
    }
    if let Some(rest) = ctx.upstream_end() {
        session.write_response_body(Some(rest), false).await?;
    }
    session.write_response_body(None, true).await?;
    Ok(())
}
