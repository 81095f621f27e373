//! Conversion of the answer shapes real providers send and the happy-path
//! mocks never did (issue 24, defects 1, 2, 3, 6, 7 and 9), through the real
//! server: the mock upstream replays each shape (`tests/common/shapes.rs`,
//! sources in `tests/fixtures/conversion/README.md`) and each test asserts
//! what the client received, in its own format.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Gateway, MockUpstream, shapes};
use fastgate::convert::sse::SseParser;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Routes /{client}-{upstream}/… for every pair of formats.
async fn gateway(mock: &MockUpstream) -> Gateway {
    let u = mock.url();
    let config = format!(
        "upstreams:\n  openai: {{provider: openai, endpoints: ['{u}'], key_pool: po}}\n  anthropic: {{provider: anthropic, endpoints: ['{u}'], key_pool: pa}}\n  gemini: {{provider: gemini, endpoints: ['{u}'], key_pool: pg}}\nkey_pools:\n  po: {{keys: [sk-openai]}}\n  pa: {{keys: [sk-ant]}}\n  pg: {{keys: [AIza-gem]}}\n"
    );
    let mut routes = String::from("routes:\n");
    for c in ["openai", "anthropic", "gemini"] {
        for t in ["openai", "anthropic", "gemini"] {
            let path = match c {
                "openai" => format!("/{c}-{t}/v1/chat/completions"),
                "anthropic" => format!("/{c}-{t}/v1/messages"),
                _ => format!("/{c}-{t}/v1beta/{{*rest}}"),
            };
            routes.push_str(&format!(
                "  - {{ name: {c}-{t}, match: {{ path: '{path}' }}, format: {c}, auth: none, upstream: {t}, transform: {{ strip_prefix: /{c}-{t} }} }}\n"
            ));
        }
    }
    Gateway::start(&config, &[("r.yaml", &routes)]).await
}

/// The client's request (with a tool offered) from `client` to `to`.
fn request(client: &str, to: &str, stream: bool) -> (String, Value) {
    let prefix = format!("/{client}-{to}");
    match client {
        "openai" => {
            let mut b = json!({"model": "m-1", "stream": stream, "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]});
            if stream {
                b["stream_options"] = json!({"include_usage": true});
            }
            (format!("{prefix}/v1/chat/completions"), b)
        }
        "anthropic" => (
            format!("{prefix}/v1/messages"),
            json!({"model": "m-1", "stream": stream, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"name": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]}),
        ),
        _ => {
            let op = if stream {
                "streamGenerateContent?alt=sse"
            } else {
                "generateContent"
            };
            (
                format!("{prefix}/v1beta/models/m-1:{op}"),
                json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
                    "tools": [{"functionDeclarations": [{"name": "weather", "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}}}]}]}),
            )
        }
    }
}

/// Status, request id and body of one call.
async fn call(gw: &Gateway, path: &str, body: &Value) -> (u16, String, String) {
    let r = reqwest::Client::new()
        .post(gw.url(path))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    (status, id, r.text().await.unwrap())
}

async fn ask(gw: &Gateway, client: &str, to: &str, stream: bool) -> (String, String) {
    let (path, body) = request(client, to, stream);
    let (status, id, text) = call(gw, &path, &body).await;
    assert_eq!(status, 200, "{client} ← {to} (stream {stream}): {text}");
    (id, text)
}

fn events(text: &str) -> Vec<(Option<String>, Value)> {
    SseParser::parse_all(text.as_bytes())
        .into_iter()
        .map(|e| (e.event, serde_json::from_str(&e.data).unwrap_or(Value::String(e.data))))
        .collect()
}

/// An OpenAI client's stream, assembled as the SDK does.
#[derive(Debug, Default)]
struct OpenaiStream {
    text: String,
    /// By index: (id, name, arguments).
    calls: BTreeMap<u64, (String, String, String)>,
    finish: Option<String>,
    usage: Option<Value>,
}

fn openai_stream(text: &str) -> OpenaiStream {
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "the stream ends with [DONE]: {text}"
    );
    let mut s = OpenaiStream::default();
    for (_, c) in events(text).into_iter().filter(|(_, v)| v.is_object()) {
        assert!(c.get("error").is_none(), "no error event: {text}");
        assert_eq!(c["object"], "chat.completion.chunk");
        if c["usage"].is_object() {
            s.usage = Some(c["usage"].clone());
        }
        let Some(ch) = c["choices"].get(0) else { continue };
        assert_eq!(ch["index"], 0);
        s.text.push_str(ch["delta"]["content"].as_str().unwrap_or_default());
        for tc in ch["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let e = s.calls.entry(tc["index"].as_u64().unwrap()).or_default();
            if let Some(id) = tc["id"].as_str() {
                e.0 = id.to_string();
            }
            if let Some(n) = tc["function"]["name"].as_str() {
                e.1 = n.to_string();
            }
            e.2.push_str(tc["function"]["arguments"].as_str().unwrap_or_default());
        }
        if let Some(f) = ch["finish_reason"].as_str() {
            s.finish = Some(f.to_string());
        }
    }
    s
}

/// An Anthropic client's stream, checked against the grammar Claude Code
/// relies on, assembled as the SDK does.
#[derive(Debug, Default)]
struct AnthropicStream {
    text: String,
    /// (id, name, input) per tool_use block, in order.
    calls: Vec<(String, String, Value)>,
    stop_reason: String,
    usage: Value,
}

fn anthropic_stream(text: &str) -> AnthropicStream {
    let evs = events(text);
    let types: Vec<&str> = evs.iter().map(|(_, v)| v["type"].as_str().unwrap()).collect();
    assert!(!types.contains(&"error"), "no error event: {text}");
    assert_eq!(types.first(), Some(&"message_start"), "{types:?}");
    assert_eq!(types.iter().filter(|t| **t == "message_start").count(), 1);
    assert_eq!(
        &types[types.len() - 2..],
        &["message_delta", "message_stop"],
        "{types:?}"
    );
    let mut s = AnthropicStream::default();
    let mut open: Option<(u64, Value, String)> = None;
    let mut next = 0;
    for (_, v) in &evs {
        match v["type"].as_str().unwrap() {
            "content_block_start" => {
                assert!(open.is_none(), "blocks never overlap: {text}");
                assert_eq!(v["index"], next, "indices rise by one: {text}");
                next += 1;
                open = Some((v["index"].as_u64().unwrap(), v["content_block"].clone(), String::new()));
            }
            "content_block_delta" => {
                let (i, _, json) = open.as_mut().expect("a delta inside its block");
                assert_eq!(v["index"], *i, "a delta for the open block: {text}");
                json.push_str(v["delta"]["partial_json"].as_str().unwrap_or_default());
                s.text.push_str(v["delta"]["text"].as_str().unwrap_or_default());
            }
            "content_block_stop" => {
                let (i, block, json) = open.take().expect("a stop for an open block");
                assert_eq!(v["index"], i);
                if block["type"] == "tool_use" {
                    let input = if json.is_empty() {
                        block["input"].clone()
                    } else {
                        serde_json::from_str(&json).unwrap()
                    };
                    s.calls.push((
                        block["id"].as_str().unwrap().to_string(),
                        block["name"].as_str().unwrap().to_string(),
                        input,
                    ));
                }
            }
            "message_delta" => {
                s.stop_reason = v["delta"]["stop_reason"].as_str().unwrap().to_string();
                s.usage = v["usage"].clone();
            }
            _ => {}
        }
    }
    s
}

/// A Gemini client's stream: its function calls (name, args) and last finish reason.
fn gemini_stream(text: &str) -> (Vec<(String, Value)>, String) {
    let chunks: Vec<Value> = events(text).into_iter().map(|(_, v)| v).collect();
    assert!(chunks.iter().all(|c| c.get("error").is_none()), "no error: {text}");
    let calls = chunks
        .iter()
        .flat_map(|c| {
            c["candidates"][0]["content"]["parts"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|p| p.get("functionCall").cloned())
        .map(|c| (c["name"].as_str().unwrap().to_string(), c["args"].clone()))
        .collect();
    let finish = chunks.last().unwrap()["candidates"][0]["finishReason"]
        .as_str()
        .unwrap()
        .to_string();
    (calls, finish)
}

/// Defect 1: a Gemini prompt block (`promptFeedback.blockReason`, no
/// candidates) is a content filter for OpenAI clients and a refusal for
/// Anthropic clients — a whole answer, never an error or a null finish.
#[tokio::test]
async fn a_gemini_prompt_block_is_a_content_filter_or_a_refusal() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock).await;
    shapes::can(&mock, shapes::gemini_prompt_block());

    let (_, body) = ask(&gw, "openai", "gemini", false).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "content_filter", "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 12);

    let (_, body) = ask(&gw, "openai", "gemini", true).await;
    let s = openai_stream(&body);
    assert_eq!(s.finish.as_deref(), Some("content_filter"), "{body}");
    assert_eq!(s.usage.unwrap()["prompt_tokens"], 12);

    let (_, body) = ask(&gw, "anthropic", "gemini", false).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["type"], "message", "{v}");
    assert_eq!(v["stop_reason"], "refusal", "{v}");

    let (_, body) = ask(&gw, "anthropic", "gemini", true).await;
    let s = anthropic_stream(&body);
    assert_eq!(s.stop_reason, "refusal", "{body}");
    assert!(s.calls.is_empty() && s.text.is_empty());
}

/// Defect 2: Gemini's usage in a chunk after the `finishReason` chunk is
/// kept — for the client and for the audit row — and OpenAI's usual usage
/// chunk after `finish_reason` too: the body's end ends the stream.
#[tokio::test]
async fn usage_sent_after_the_finish_reason_reaches_the_client_and_the_audit_row() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock).await;
    shapes::can(&mock, shapes::gemini_usage_after_finish());
    let mut ids = Vec::new();

    let (id, body) = ask(&gw, "openai", "gemini", true).await;
    let s = openai_stream(&body);
    assert_eq!(s.text, "Hello there");
    assert_eq!(s.finish.as_deref(), Some("stop"));
    let usage = s.usage.expect("the asked-for usage chunk");
    assert_eq!(
        (usage["prompt_tokens"].as_u64(), usage["completion_tokens"].as_u64()),
        (Some(11), Some(4)),
        "{body}"
    );
    ids.push((id, (11, 4)));

    let (id, body) = ask(&gw, "anthropic", "gemini", true).await;
    let s = anthropic_stream(&body);
    assert_eq!(s.text, "Hello there");
    assert_eq!(
        (s.usage["input_tokens"].as_u64(), s.usage["output_tokens"].as_u64()),
        (Some(11), Some(4)),
        "{body}"
    );
    ids.push((id, (11, 4)));

    shapes::can(&mock, shapes::openai_usage_after_finish());
    let (id, body) = ask(&gw, "anthropic", "openai", true).await;
    let s = anthropic_stream(&body);
    assert_eq!(s.text, "Hi there");
    assert_eq!(s.stop_reason, "end_turn");
    assert_eq!(
        (s.usage["input_tokens"].as_u64(), s.usage["output_tokens"].as_u64()),
        (Some(9), Some(3)),
        "{body}"
    );
    ids.push((id, (9, 3)));

    let rows = gw.wait_audit_ids(ids.iter().map(|(id, _)| id)).await;
    for (id, (prompt, completion)) in &ids {
        let row = rows.iter().find(|r| &r.request_id == id).expect("an audit row");
        assert_eq!(
            (row.prompt_tokens, row.completion_tokens, row.usage_estimated),
            (Some(*prompt), Some(*completion), false),
            "the provider's report, not an estimate: {row:?}"
        );
    }
}

/// Defect 3: an OpenAI-compatible upstream that ends a tool turn with
/// `finish_reason: "stop"` (or none at all) still gives a tool turn.
#[tokio::test]
async fn a_tool_turn_ended_with_stop_or_no_reason_is_a_tool_turn() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock).await;
    for finish in [Some("stop"), None] {
        shapes::can(&mock, shapes::openai_calls_then(finish));

        let (_, body) = ask(&gw, "anthropic", "openai", false).await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["stop_reason"], "tool_use", "{finish:?}: {v}");
        assert_eq!(v["content"][0]["type"], "tool_use");
        assert_eq!(v["content"][0]["input"], json!({"city": "Paris"}));

        let (_, body) = ask(&gw, "anthropic", "openai", true).await;
        let s = anthropic_stream(&body);
        assert_eq!(s.stop_reason, "tool_use", "{finish:?}: {body}");
        assert_eq!(s.calls.len(), 1);
        assert_eq!(s.calls[0].2, json!({"city": "Paris"}));

        for stream in [false, true] {
            let (_, body) = ask(&gw, "gemini", "openai", stream).await;
            let (calls, finish_reason) = if stream {
                gemini_stream(&body)
            } else {
                let v: Value = serde_json::from_str(&body).unwrap();
                let calls = v["candidates"][0]["content"]["parts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|p| p.get("functionCall"))
                    .map(|c| (c["name"].as_str().unwrap().to_string(), c["args"].clone()))
                    .collect();
                (calls, v["candidates"][0]["finishReason"].as_str().unwrap().to_string())
            };
            assert_eq!(calls, vec![("weather".to_string(), json!({"city": "Paris"}))], "{body}");
            assert_eq!(finish_reason, "STOP");
        }
    }
}

/// Defect 6: arguments sent after every call's header, alternating by
/// index, reach their own call; two calls that both say `index: 0` with
/// different ids stay two calls.
#[tokio::test]
async fn call_arguments_reach_their_call_and_a_reused_index_is_a_new_call() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock).await;
    let want = |a: &str, b: &str| {
        vec![
            (a.to_string(), "weather".to_string(), json!({"city": "Paris"})),
            (b.to_string(), "time".to_string(), json!({"tz": "CET"})),
        ]
    };
    for (shape, ids) in [
        (shapes::openai_headers_first_then_arguments(), ("call_a", "call_b")),
        (shapes::openai_calls_reusing_index_zero(), ("call_x", "call_y")),
    ] {
        shapes::can(&mock, shape);
        let (_, body) = ask(&gw, "anthropic", "openai", true).await;
        let s = anthropic_stream(&body);
        assert_eq!(s.calls, want(ids.0, ids.1), "{body}");
        assert_eq!(s.stop_reason, "tool_use");

        let (_, body) = ask(&gw, "gemini", "openai", true).await;
        let (calls, _) = gemini_stream(&body);
        assert_eq!(
            calls,
            vec![
                ("weather".to_string(), json!({"city": "Paris"})),
                ("time".to_string(), json!({"tz": "CET"}))
            ],
            "{body}"
        );
    }
}

/// Defect 7: a call without arguments streams to OpenAI clients with
/// `arguments: "{}"` (what a non-stream answer says), from Anthropic's empty
/// `input_json_delta` and from Gemini's `functionCall` without `args`.
#[tokio::test]
async fn a_call_without_arguments_reaches_openai_clients_as_an_empty_object() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock).await;
    for (to, shape) in [
        ("anthropic", shapes::anthropic_call_without_input()),
        ("gemini", shapes::gemini_call_without_args()),
    ] {
        shapes::can(&mock, shape);
        let (_, body) = ask(&gw, "openai", to, true).await;
        let s = openai_stream(&body);
        assert_eq!(s.calls.len(), 1, "{to}: {body}");
        let (id, name, args) = &s.calls[&0];
        assert!(!id.is_empty());
        assert_eq!((name.as_str(), args.as_str()), ("now", "{}"), "{to}: {body}");
        assert_eq!(s.finish.as_deref(), Some("tool_calls"));

        let (_, body) = ask(&gw, "openai", to, false).await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], "{}",
            "{to}: {v}"
        );
    }
}

/// Defect 9: `n: 2` toward Gemini asks for two candidates and answers two
/// choices, each Gemini candidate by its `index`; a stream with `n > 1` is
/// refused in the OpenAI shape rather than cut to one choice.
#[tokio::test]
async fn several_candidates_are_several_choices_or_refused() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock).await;
    shapes::can(&mock, shapes::gemini_two_candidates());
    let (path, mut body) = request("openai", "gemini", false);
    body["n"] = 2.into();
    let (status, _, text) = call(&gw, &path, &body).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(mock.last().json()["generationConfig"]["candidateCount"], 2);
    let v: Value = serde_json::from_str(&text).unwrap();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2, "{v}");
    for (i, want) in ["first answer", "second answer"].iter().enumerate() {
        assert_eq!(choices[i]["index"], i);
        assert_eq!(choices[i]["message"]["content"], *want, "{v}");
        assert_eq!(choices[i]["finish_reason"], "stop");
    }

    let seen = mock.seen().len();
    let (path, mut body) = request("openai", "gemini", true);
    body["n"] = 2.into();
    let (status, _, text) = call(&gw, &path, &body).await;
    assert_eq!(status, 400, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("n > 1"), "{v}");
    assert_eq!(mock.seen().len(), seen, "a refused request never reaches the upstream");
}

/// An upstream that compresses although FastGate asks for `identity` (some
/// OpenAI-compatible servers and CDNs do): a raw HTTP/1.1 server answering
/// every request with `body` in `encoding` and `content_type`, in two
/// writes (the compressed stream arrives in pieces).
async fn compressing_upstream(encoding: &'static str, content_type: &'static str, body: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let packed = common::compress(encoding, body.as_bytes());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let packed = packed.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 65536];
                // Headers, then the body by its Content-Length.
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap())
                            })
                            .unwrap_or(0);
                        if req.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-encoding: {encoding}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    packed.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let half = packed.len() / 2;
                let _ = s.write_all(&packed[..half]).await;
                let _ = s.flush().await;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                let _ = s.write_all(&packed[half..]).await;
            });
        }
    });
    url
}

#[tokio::test]
async fn answers_compressed_against_the_request_are_converted_all_the_same() {
    let whole = json!({"id": "chatcmpl-z", "object": "chat.completion", "created": 1, "model": "m-1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello, zipped."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})
    .to_string();
    let chunk = |delta: Value, finish: Value| json!({"id": "chatcmpl-z", "object": "chat.completion.chunk", "created": 1, "model": "m-1", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    let stream = [
        chunk(json!({"role": "assistant", "content": "Hello, "}), Value::Null),
        chunk(json!({"content": "zipped."}), Value::Null),
        chunk(json!({}), json!("stop")),
        json!({"id": "chatcmpl-z", "object": "chat.completion.chunk", "created": 1, "model": "m-1", "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}),
    ]
    .iter()
    .map(|v| format!("data: {v}\n\n"))
    .collect::<String>()
        + "data: [DONE]\n\n";
    for encoding in ["gzip", "br", "zstd"] {
        let json_up = compressing_upstream(encoding, "application/json", whole.clone()).await;
        let sse_up = compressing_upstream(encoding, "text/event-stream", stream.clone()).await;
        let config = format!(
            "upstreams:\n  whole: {{provider: openai_compatible, endpoints: ['{json_up}']}}\n  streamed: {{provider: openai_compatible, endpoints: ['{sse_up}']}}\n"
        );
        let routes = "routes:\n  - { name: w, match: { path: '/w/v1/messages' }, format: anthropic, auth: none, upstream: whole, retries: 0, transform: { strip_prefix: /w } }\n  - { name: s, match: { path: '/s/v1/messages' }, format: anthropic, auth: none, upstream: streamed, retries: 0, transform: { strip_prefix: /s } }\n";
        let gw = Gateway::start(&config, &[("r.yaml", routes)]).await;
        let body = json!({"model": "m-1", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]});
        let (status, _, text) = call(&gw, "/w/v1/messages", &body).await;
        assert_eq!(status, 200, "{encoding}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["content"][0]["text"], "Hello, zipped.", "{encoding}: {v}");
        assert_eq!(v["usage"]["output_tokens"], 3, "{encoding}: {v}");

        let mut body = body.clone();
        body["stream"] = json!(true);
        let (status, id, text) = call(&gw, "/s/v1/messages", &body).await;
        assert_eq!(status, 200, "{encoding}: {text}");
        let said: String = events(&text)
            .iter()
            .filter_map(|(_, v)| v["delta"]["text"].as_str())
            .collect();
        assert_eq!(said, "Hello, zipped.", "{encoding}: {text}");
        assert!(text.contains("message_stop"), "{encoding}: {text}");
        // Metered from the decoded stream.
        let rows = gw.wait_audit_ids([&id]).await;
        let row = rows.iter().find(|r| r.request_id == id).expect("the row");
        assert_eq!(row.completion_tokens, Some(3), "{encoding}");
    }
}
