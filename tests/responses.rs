//! The OpenAI Responses API (`POST /v1/responses`, what Codex CLI speaks)
//! through the real server toward Chat Completions, Anthropic and Gemini
//! upstreams: the answer as a `response` object, the stream in OpenAI's
//! documented event grammar, tool round trips as the upstream saw them, a
//! Codex request shape, the stateless refusal, metering, and the untouched
//! passthrough to OpenAI's own endpoint.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Gateway, MockUpstream};
use fastgate::convert::sse::SseParser;
use serde_json::{Value, json};
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

/// The three converted upstream kinds, by route prefix.
const UPSTREAMS: [&str; 3] = ["chat", "anthropic", "gemini"];

/// Routes `/{to}/v1/responses` (format: responses) toward each upstream
/// kind at `u`, and OpenAI's own Responses endpoint by a `format: openai`
/// route and a `format: responses` one.
fn config(u: &str) -> (String, String) {
    let config = format!(
        "upstreams:\n  chat: {{provider: openai_compatible, endpoints: ['{u}'], key_pool: po}}\n  openai: {{provider: openai, endpoints: ['{u}'], key_pool: po}}\n  anthropic: {{provider: anthropic, endpoints: ['{u}'], key_pool: pa}}\n  gemini: {{provider: gemini, endpoints: ['{u}'], key_pool: pg}}\nkey_pools:\n  po: {{keys: [sk-openai]}}\n  pa: {{keys: [sk-ant]}}\n  pg: {{keys: [AIza-gem]}}\n"
    );
    let mut routes = String::from("routes:\n");
    for to in UPSTREAMS {
        routes.push_str(&format!(
            "  - {{ name: {to}, match: {{ path: '/{to}/v1/responses' }}, format: responses, auth: none, upstream: {to}, transform: {{ strip_prefix: /{to} }} }}\n"
        ));
    }
    routes.push_str("  - { name: native-openai, match: { path: '/native/v1/responses' }, format: openai, auth: none, upstream: openai, transform: { strip_prefix: /native } }\n");
    routes.push_str("  - { name: native-responses, match: { path: '/nativer/v1/responses' }, format: responses, auth: none, upstream: openai, transform: { strip_prefix: /nativer } }\n");
    (config, routes)
}

async fn gateway(u: &str) -> Gateway {
    let (config, routes) = config(u);
    Gateway::start(&config, &[("r.yaml", &routes)]).await
}

fn sse_events(text: &str) -> Vec<(String, Value)> {
    SseParser::parse_all(text.as_bytes())
        .into_iter()
        .map(|e| {
            (
                e.event.unwrap_or_default(),
                serde_json::from_str(&e.data).unwrap_or(Value::String(e.data)),
            )
        })
        .collect()
}

/// The events of a stream, checked against the grammar every stream keeps:
/// each named by its `event:` line as by its `type`, numbered from 0 by
/// one, no `[DONE]`, created and in_progress first, one terminal last.
fn checked_events(body: &str) -> Vec<(String, Value)> {
    assert!(!body.contains("[DONE]"), "{body}");
    let evs = sse_events(body);
    for (i, (name, data)) in evs.iter().enumerate() {
        assert_eq!(data["type"].as_str(), Some(name.as_str()), "event {i}: {data}");
        assert_eq!(data["sequence_number"].as_u64(), Some(i as u64), "event {i}: {data}");
    }
    assert_eq!(evs[0].0, "response.created");
    assert_eq!(evs[0].1["response"]["status"], "in_progress");
    assert_eq!(evs[1].0, "response.in_progress");
    let last = &evs.last().unwrap().0;
    assert!(
        ["response.completed", "response.incomplete", "response.failed"].contains(&last.as_str()),
        "{last}"
    );
    let terminals = evs
        .iter()
        .filter(|(n, _)| n == "response.completed" || n == "response.incomplete" || n == "response.failed")
        .count();
    assert_eq!(terminals, 1);
    evs
}

/// Event names with runs of the same delta event collapsed to one.
fn grammar(evs: &[(String, Value)]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (n, _) in evs {
        if n.ends_with(".delta") && names.last() == Some(n) {
            continue;
        }
        names.push(n.clone());
    }
    names
}

fn request(stream: bool, tools: bool) -> Value {
    let mut b = json!({"model": "m-1", "stream": stream, "max_output_tokens": 100,
        "instructions": "Be brief.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]});
    if tools {
        b["tools"] = json!([{"type": "function", "name": "weather", "description": "The weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
    }
    b
}

/// The text the upstream's mock answers with, per kind and streaming.
fn mock_text(to: &str, stream: bool) -> &'static str {
    match (to, stream) {
        ("chat", true) => "t0t1t2t3t4",
        ("gemini", true) => "HiHiHiHiHi",
        _ => "Hi",
    }
}

/// (input, output) tokens the mock reports, per kind and streaming.
fn mock_usage(to: &str, stream: bool, tools: bool) -> (u64, u64) {
    match (to, stream, tools) {
        ("chat", true, false) => (9, 5),
        ("chat", _, true) => (9, 6),
        ("chat", false, false) => (9, 1),
        ("anthropic", _, false) => (12, 3),
        ("anthropic", _, true) => (12, 7),
        ("gemini", true, _) => (5, 5),
        _ => (5, 1),
    }
}

#[tokio::test]
async fn a_responses_client_reaches_chat_anthropic_and_gemini_upstreams_whole_and_streamed() {
    let mock = MockUpstream::start().await;
    mock.behaviour
        .sse_interval_ms
        .store(20, std::sync::atomic::Ordering::SeqCst);
    let gw = gateway(&mock.url()).await;
    let c = reqwest::Client::new();
    let mut ids = Vec::new();
    let mut want_tokens = Vec::new();
    for to in UPSTREAMS {
        for stream in [false, true] {
            for tools in [false, true] {
                let what = format!("{to} stream {stream} tools {tools}");
                let r = c
                    .post(gw.url(&format!("/{to}/v1/responses")))
                    .json(&request(stream, tools))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "{what}");
                ids.push(r.headers()["x-request-id"].to_str().unwrap().to_string());
                want_tokens.push(mock_usage(to, stream, tools));
                let ct = r.headers()["content-type"].to_str().unwrap().to_string();
                assert_eq!(ct.starts_with("text/event-stream"), stream, "{what}: {ct}");
                let body = r.text().await.unwrap();
                // What the upstream saw: its own format, the instructions as its system prompt.
                let seen = mock.last();
                let up = seen.json();
                match to {
                    "chat" => {
                        assert_eq!(seen.uri, "/v1/chat/completions", "{what}");
                        assert_eq!(up["messages"][0], json!({"role": "system", "content": "Be brief."}));
                        assert_eq!(up["messages"][1]["content"], "hi");
                        // An OpenAI-compatible server takes `max_tokens` (the
                        // capability table: no reasoning parameters there).
                        assert_eq!(up["max_tokens"], 100);
                        assert!(up.get("max_completion_tokens").is_none(), "{up}");
                        if tools {
                            assert_eq!(up["tools"][0]["function"]["name"], "weather");
                        }
                    }
                    "anthropic" => {
                        assert_eq!(seen.uri, "/v1/messages", "{what}");
                        assert_eq!(up["system"][0]["text"], "Be brief.");
                        assert_eq!(up["max_tokens"], 100);
                        if tools {
                            assert_eq!(up["tools"][0]["name"], "weather");
                        }
                    }
                    _ => {
                        let op = if stream {
                            "streamGenerateContent?alt=sse"
                        } else {
                            "generateContent"
                        };
                        assert_eq!(seen.uri, format!("/v1beta/models/m-1:{op}"), "{what}");
                        assert_eq!(up["systemInstruction"]["parts"][0]["text"], "Be brief.");
                        assert_eq!(up["generationConfig"]["maxOutputTokens"], 100);
                    }
                }
                let (input, output) = mock_usage(to, stream, tools);
                let response = if stream {
                    let evs = checked_events(&body);
                    let g = grammar(&evs);
                    let want: &[&str] = if tools {
                        &[
                            "response.created",
                            "response.in_progress",
                            "response.output_item.added",
                            "response.function_call_arguments.delta",
                            "response.function_call_arguments.done",
                            "response.output_item.done",
                            "response.completed",
                        ]
                    } else {
                        &[
                            "response.created",
                            "response.in_progress",
                            "response.output_item.added",
                            "response.content_part.added",
                            "response.output_text.delta",
                            "response.output_text.done",
                            "response.content_part.done",
                            "response.output_item.done",
                            "response.completed",
                        ]
                    };
                    if to == "gemini" && tools {
                        // Gemini says "Hi" before its (whole) call: a message item first.
                        assert_eq!(&g[..2], &want[..2], "{what}: {g:?}");
                        assert_eq!(g.last().unwrap(), "response.completed");
                        assert!(g.contains(&"response.function_call_arguments.done".to_string()));
                    } else {
                        assert_eq!(g, want, "{what}");
                    }
                    // Every item event names its item and place.
                    for (n, d) in &evs {
                        if n.starts_with("response.output_text") || n.starts_with("response.function_call") {
                            assert!(d["item_id"].as_str().is_some_and(|s| !s.is_empty()), "{d}");
                            assert!(d["output_index"].as_u64().is_some(), "{d}");
                        }
                    }
                    if !tools {
                        let deltas: String = evs
                            .iter()
                            .filter(|(n, _)| n == "response.output_text.delta")
                            .map(|(_, d)| d["delta"].as_str().unwrap())
                            .collect();
                        assert_eq!(deltas, mock_text(to, true), "{what}");
                        let done = evs.iter().find(|(n, _)| n == "response.output_text.done").unwrap();
                        assert_eq!(done.1["text"], mock_text(to, true));
                    }
                    evs.last().unwrap().1["response"].clone()
                } else {
                    serde_json::from_str::<Value>(&body).unwrap()
                };
                assert_eq!(response["object"], "response", "{what}: {response}");
                assert_eq!(response["status"], "completed", "{what}: {response}");
                assert_eq!(response["model"], "m-1");
                assert!(response["id"].as_str().unwrap().starts_with("resp_"));
                assert_eq!(response["instructions"], "Be brief.");
                assert_eq!(response["usage"]["input_tokens"], input, "{what}: {response}");
                assert_eq!(response["usage"]["output_tokens"], output, "{what}: {response}");
                assert_eq!(response["usage"]["total_tokens"], input + output);
                assert_eq!(response["usage"]["input_tokens_details"]["cached_tokens"], 0);
                assert_eq!(response["usage"]["output_tokens_details"]["reasoning_tokens"], 0);
                let output_items = response["output"].as_array().unwrap();
                if tools {
                    let call = output_items.iter().find(|i| i["type"] == "function_call").unwrap();
                    assert_eq!(call["name"], "weather", "{what}");
                    assert!(call["call_id"].as_str().is_some_and(|s| !s.is_empty()));
                    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
                    assert_eq!(args, json!({"city": "Paris"}), "{what}");
                } else {
                    assert_eq!(output_items.len(), 1, "{what}: {response}");
                    assert_eq!(output_items[0]["type"], "message");
                    assert_eq!(output_items[0]["role"], "assistant");
                    assert_eq!(output_items[0]["content"][0]["type"], "output_text");
                    assert_eq!(output_items[0]["content"][0]["text"], mock_text(to, stream), "{what}");
                }
            }
        }
    }
    // Metering reads the upstream's own usage: every row has its tokens.
    let rows = gw.wait_audit_ids(&ids).await;
    for (id, (input, output)) in ids.iter().zip(want_tokens) {
        let row = rows.iter().find(|r| &r.request_id == id).unwrap();
        assert_eq!(row.prompt_tokens, Some(input), "{row:?}");
        assert_eq!(row.completion_tokens, Some(output), "{row:?}");
        assert!(!row.usage_estimated);
    }
}

#[tokio::test]
async fn a_tool_round_trip_reaches_each_upstream_as_one_assistant_turn_and_its_results() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock.url()).await;
    let c = reqwest::Client::new();
    let mut body = request(false, true);
    body["input"] = json!([
        {"type": "message", "role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "function_call", "call_id": "call_a", "name": "weather", "arguments": "{\"city\":\"Paris\"}"},
        {"type": "function_call", "call_id": "call_b", "name": "weather", "arguments": "{\"city\":\"Rome\"}"},
        {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "rain"}]},
    ]);
    for to in UPSTREAMS {
        let r = c
            .post(gw.url(&format!("/{to}/v1/responses")))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{to}");
        let answer: Value = r.json().await.unwrap();
        assert_eq!(
            answer["output"][0]["content"][0]["text"], "Hi",
            "{to}: the results answered"
        );
        let up = mock.last().json();
        match to {
            "chat" => {
                let m = up["messages"].as_array().unwrap();
                assert_eq!(m.len(), 5, "{up}");
                assert_eq!(m[1], json!({"role": "user", "content": "Weather in Paris and Rome?"}));
                assert_eq!(m[2]["role"], "assistant");
                let calls = m[2]["tool_calls"].as_array().unwrap();
                assert_eq!(calls.len(), 2, "both calls in one assistant turn: {up}");
                assert_eq!(calls[0]["id"], "call_a");
                assert_eq!(calls[1]["function"]["arguments"], "{\"city\":\"Rome\"}");
                assert_eq!(
                    m[3],
                    json!({"role": "tool", "tool_call_id": "call_a", "content": "sunny"})
                );
                assert_eq!(
                    m[4],
                    json!({"role": "tool", "tool_call_id": "call_b", "content": "rain"})
                );
            }
            "anthropic" => {
                let m = up["messages"].as_array().unwrap();
                assert_eq!(m.len(), 3, "{up}");
                assert_eq!(m[1]["role"], "assistant");
                let uses: Vec<&Value> = m[1]["content"].as_array().unwrap().iter().collect();
                assert_eq!(uses.len(), 2, "{up}");
                assert_eq!(uses[0]["type"], "tool_use");
                assert_eq!(uses[0]["id"], "call_a");
                assert_eq!(uses[1]["input"], json!({"city": "Rome"}));
                assert_eq!(m[2]["role"], "user");
                let results = m[2]["content"].as_array().unwrap();
                assert_eq!(results.len(), 2, "{up}");
                assert_eq!(results[0]["type"], "tool_result");
                assert_eq!(results[0]["tool_use_id"], "call_a");
                assert_eq!(results[1]["tool_use_id"], "call_b");
            }
            _ => {
                let contents = up["contents"].as_array().unwrap();
                assert_eq!(contents.len(), 3, "{up}");
                assert_eq!(contents[1]["role"], "model");
                let calls = contents[1]["parts"].as_array().unwrap();
                assert_eq!(calls.len(), 2);
                assert_eq!(calls[1]["functionCall"]["args"], json!({"city": "Rome"}));
                let results = contents[2]["parts"].as_array().unwrap();
                assert_eq!(results.len(), 2);
                assert_eq!(results[0]["functionResponse"]["name"], "weather");
            }
        }
    }
}

#[tokio::test]
async fn previous_response_id_is_refused_with_a_clear_message() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock.url()).await;
    let c = reqwest::Client::new();
    for to in UPSTREAMS {
        let mut body = request(false, false);
        body["previous_response_id"] = json!("resp_123");
        let r = c
            .post(gw.url(&format!("/{to}/v1/responses")))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{to}");
        let err: Value = r.json().await.unwrap();
        assert_eq!(err["error"]["type"], "invalid_request_error", "{err}");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("previous_response_id") && message.contains("no response store"),
            "{message}"
        );
    }
    assert!(mock.seen().is_empty(), "nothing reached an upstream");
}

#[tokio::test]
async fn responses_to_openai_pass_through_untouched() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock.url()).await;
    let c = reqwest::Client::new();
    // Fields FastGate does not convert (hosted tools, previous_response_id)
    // reach OpenAI as they are: OpenAI keeps the state.
    let body = r#"{"model":"gpt-5","input":"hi","previous_response_id":"resp_1","tools":[{"type":"web_search"}],"store":true}"#;
    for prefix in ["/native", "/nativer"] {
        mock.clear();
        let r = c
            .post(gw.url(&format!("{prefix}/v1/responses")))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{prefix}");
        let answer: Value = r.json().await.unwrap();
        // The mock's own (chat-shaped) answer, not converted.
        assert_eq!(answer["upstream_port_echo"], true, "{prefix}: {answer}");
        let seen = mock.last();
        assert_eq!(seen.uri, "/v1/responses", "{prefix}");
        assert_eq!(seen.body.as_ref(), body.as_bytes(), "{prefix}: body untouched");
        assert_eq!(seen.header("authorization"), Some("Bearer sk-openai"));
    }
}

// --- A Codex CLI request, against canned provider answers ----------------

/// An upstream answering every request with one canned (content type,
/// body) chosen by path, recording what it was sent.
struct Canned {
    url: String,
    seen: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Canned {
    async fn start(answer: fn(&str, &Value) -> (&'static str, String)) -> Canned {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let record = record.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 8192];
                    let (head_end, length) = loop {
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                            let length = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (end + 4, length);
                        }
                    };
                    while buf.len() < head_end + length {
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let path = head.split_whitespace().nth(1).unwrap_or_default().to_string();
                    let body: Value = serde_json::from_slice(&buf[head_end..head_end + length]).unwrap_or(Value::Null);
                    let (ct, out) = answer(&path, &body);
                    record.lock().unwrap().push((path, body));
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {ct}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{out}",
                        out.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Canned { url, seen }
    }

    fn last(&self) -> (String, Value) {
        self.seen.lock().unwrap().last().cloned().unwrap()
    }
}

const PATCH: &str = "*** Begin Patch\n*** Add File: hello.txt\n+Hello \"world\"\n*** End Patch";

/// Claude's answer to Codex: signed thinking, then a call of apply_patch
/// (its input the stand-in function's `input`); the chat server's the same
/// call as `tool_calls`. Streams are the same answers as events.
fn codex_answer(path: &str, body: &Value) -> (&'static str, String) {
    let stream = body["stream"].as_bool().unwrap_or(false);
    let input = json!({"input": PATCH});
    if path.ends_with("/messages") {
        if stream {
            let events = [
                json!({"type":"message_start","message":{"id":"msg_9","type":"message","role":"assistant","model":"claude-x","content":[],"usage":{"input_tokens":40,"output_tokens":1}}}),
                json!({"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":""}}),
                json!({"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"Need a file."}}),
                json!({"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"SIG-2"}}),
                json!({"type":"content_block_stop","index":0}),
                json!({"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_7","name":"apply_patch","input":{}}}),
                json!({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":input.to_string()[..10]}}),
                json!({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":input.to_string()[10..]}}),
                json!({"type":"content_block_stop","index":1}),
                json!({"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":30}}),
                json!({"type":"message_stop"}),
            ];
            let text: String = events
                .iter()
                .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
                .collect();
            return ("text/event-stream", text);
        }
        let out = json!({"id":"msg_9","type":"message","role":"assistant","model":"claude-x","content":[
            {"type":"thinking","thinking":"Need a file.","signature":"SIG-2"},
            {"type":"tool_use","id":"toolu_7","name":"apply_patch","input":input}],
            "stop_reason":"tool_use","usage":{"input_tokens":40,"output_tokens":30}});
        return ("application/json", out.to_string());
    }
    let out = json!({"id":"c9","object":"chat.completion","model":"gpt-x","choices":[{"index":0,"message":{"role":"assistant","content":null,
        "tool_calls":[{"id":"call_7","type":"function","function":{"name":"apply_patch","arguments":input.to_string()}}]},"finish_reason":"tool_calls"}],
        "usage":{"prompt_tokens":40,"completion_tokens":30,"total_tokens":70}});
    ("application/json", out.to_string())
}

const GRAMMAR: &str =
    "start: begin_patch hunk+ end_patch\nbegin_patch: \"*** Begin Patch\" LF\nend_patch: \"*** End Patch\" LF?";

/// A Codex CLI request (its shape as Codex sends it): instructions, a
/// developer message, the environment as a user message, an earlier turn
/// with reasoning (one sealed by FastGate, one encrypted by OpenAI), a
/// shell call and its output, tools with the freeform apply_patch.
fn codex_request(stream: bool) -> Value {
    json!({
        "model": "gpt-5-codex",
        "instructions": "You are Codex, based on GPT-5.",
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "<permissions instructions>sandbox: workspace-write</permissions instructions>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<environment_context><cwd>/work</cwd></environment_context>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list files, then add hello.txt"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "List first."}], "encrypted_content": "fastgate.v1:s:SIG-1"},
            {"type": "function_call", "id": "fc_1", "call_id": "call_ls", "name": "shell", "arguments": "{\"command\":[\"ls\"]}"},
            {"type": "function_call_output", "call_id": "call_ls", "output": "README.md"},
            {"type": "reasoning", "id": "rs_2", "summary": [], "encrypted_content": "gAAAAABopenai-encrypted"},
        ],
        "tools": [
            {"type": "function", "name": "shell", "description": "Runs a shell command", "strict": false,
             "parameters": {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}}, "required": ["command"], "additionalProperties": false}},
            {"type": "custom", "name": "apply_patch", "description": "Use the `apply_patch` tool to edit files.",
             "format": {"type": "grammar", "syntax": "lark", "definition": GRAMMAR}},
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": false,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": false,
        "stream": stream,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0199-session",
    })
}

#[tokio::test]
async fn a_codex_request_reaches_claude_and_a_chat_server_and_gets_apply_patch_back() {
    let canned = Canned::start(codex_answer).await;
    let gw = gateway(&canned.url).await;
    let c = reqwest::Client::new();
    for stream in [false, true] {
        let r = c
            .post(gw.url("/anthropic/v1/responses"))
            .json(&codex_request(stream))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "stream {stream}");
        let warning = r.headers()["x-fastgate-warning"].to_str().unwrap().to_string();
        assert!(warning.contains("encrypted_content made by OpenAI"), "{warning}");
        let text = r.text().await.unwrap();
        let (path, up) = canned.last();
        assert_eq!(path, "/v1/messages");
        // Instructions and the developer message are Claude's system prompt.
        let system = up["system"].to_string();
        assert!(
            system.contains("You are Codex") && system.contains("sandbox: workspace-write"),
            "{up}"
        );
        let m = up["messages"].as_array().unwrap();
        assert_eq!(m.len(), 3, "user turn, assistant turn, results: {up}");
        assert_eq!(m[0]["role"], "user");
        assert_eq!(m[0]["content"].as_array().unwrap().len(), 2, "{up}");
        // The sealed reasoning is Claude's signed thinking again, before its call.
        assert_eq!(
            m[1]["content"][0],
            json!({"type": "thinking", "thinking": "List first.", "signature": "SIG-1"}),
            "{up}"
        );
        assert_eq!(m[1]["content"][1]["type"], "tool_use");
        assert_eq!(m[1]["content"][1]["input"], json!({"command": ["ls"]}));
        assert_eq!(m[2]["content"][0]["tool_use_id"], "call_ls");
        // apply_patch is a function taking its freeform text, the grammar said.
        let tools = up["tools"].as_array().unwrap();
        let patch = tools.iter().find(|t| t["name"] == "apply_patch").unwrap();
        assert_eq!(patch["input_schema"]["required"], json!(["input"]));
        assert_eq!(patch["input_schema"]["properties"]["input"]["type"], "string");
        let about = patch["input_schema"]["properties"]["input"]["description"]
            .as_str()
            .unwrap();
        assert!(about.contains(GRAMMAR), "{about}");
        assert_eq!(up["tool_choice"]["disable_parallel_tool_use"], true, "{up}");
        assert!(up["thinking"]["budget_tokens"].as_u64().is_some(), "{up}");
        // The answer: reasoning sealed for the next turn, then the custom call.
        let response = if stream {
            let evs = checked_events(&text);
            let g = grammar(&evs);
            assert_eq!(
                g,
                [
                    "response.created",
                    "response.in_progress",
                    "response.output_item.added",
                    "response.reasoning_summary_part.added",
                    "response.reasoning_summary_text.delta",
                    "response.reasoning_summary_text.done",
                    "response.reasoning_summary_part.done",
                    "response.output_item.done",
                    "response.output_item.added",
                    "response.custom_tool_call_input.delta",
                    "response.custom_tool_call_input.done",
                    "response.output_item.done",
                    "response.completed",
                ]
            );
            let done = evs
                .iter()
                .find(|(n, _)| n == "response.custom_tool_call_input.done")
                .unwrap();
            assert_eq!(done.1["input"], PATCH);
            let added = &evs[8].1["item"];
            assert_eq!(added["type"], "custom_tool_call");
            assert_eq!(added["name"], "apply_patch");
            evs.last().unwrap().1["response"].clone()
        } else {
            serde_json::from_str::<Value>(&text).unwrap()
        };
        let out = response["output"].as_array().unwrap();
        assert_eq!(out.len(), 2, "{response}");
        assert_eq!(out[0]["type"], "reasoning");
        assert_eq!(out[0]["summary"][0]["text"], "Need a file.");
        assert_eq!(out[0]["encrypted_content"], "fastgate.v1:s:SIG-2");
        assert_eq!(out[1]["type"], "custom_tool_call");
        assert_eq!(out[1]["name"], "apply_patch");
        assert_eq!(out[1]["call_id"], "toolu_7");
        assert_eq!(out[1]["input"], PATCH);
        assert_eq!(response["usage"]["input_tokens"], 40);
        assert_eq!(response["usage"]["output_tokens"], 30);
    }
    // Toward a Chat Completions server: the same call, as the same item.
    let r = c
        .post(gw.url("/chat/v1/responses"))
        .json(&codex_request(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    let (path, up) = canned.last();
    assert_eq!(path, "/v1/chat/completions");
    let m = up["messages"].as_array().unwrap();
    assert_eq!(m[0]["content"], "You are Codex, based on GPT-5.");
    assert_eq!(m[1]["role"], "system", "the developer message: {up}");
    assert_eq!(m[3]["tool_calls"][0]["id"], "call_ls");
    assert_eq!(m[4]["role"], "tool");
    let patch = up["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["function"]["name"] == "apply_patch")
        .unwrap();
    assert_eq!(patch["function"]["parameters"]["properties"]["input"]["type"], "string");
    assert_eq!(up["parallel_tool_calls"], false);
    // `reasoning_effort` is not sent to an OpenAI-compatible server.
    assert!(up.get("reasoning_effort").is_none(), "{up}");
    let call = &answer["output"][0];
    assert_eq!(call["type"], "custom_tool_call", "{answer}");
    assert_eq!(call["input"], PATCH);
    assert_eq!(call["call_id"], "call_7");
    // Codex sends the call and its output back: the upstream sees the
    // stand-in function's call again.
    let mut next = codex_request(false);
    let items = next["input"].as_array_mut().unwrap();
    items.push(json!({"type": "custom_tool_call", "call_id": "call_7", "name": "apply_patch", "input": PATCH}));
    items.push(json!({"type": "custom_tool_call_output", "call_id": "call_7", "output": "Done!"}));
    let r = c.post(gw.url("/chat/v1/responses")).json(&next).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (_, up) = canned.last();
    let m = up["messages"].as_array().unwrap();
    let back = &m[m.len() - 2]["tool_calls"][0]["function"];
    assert_eq!(back["name"], "apply_patch");
    let args: Value = serde_json::from_str(back["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"input": PATCH}));
    assert_eq!(
        m[m.len() - 1],
        json!({"role": "tool", "tool_call_id": "call_7", "content": "Done!"})
    );
}

#[tokio::test]
async fn a_responses_stream_that_breaks_off_ends_with_response_failed() {
    let mock = MockUpstream::start().await;
    common::rule_all(&mock, common::KeyRule::CutMidStream);
    let gw = gateway(&mock.url()).await;
    let started = Instant::now();
    let r = reqwest::Client::new()
        .post(gw.url("/chat/v1/responses"))
        .json(&request(true, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let evs = checked_events(&r.text().await.unwrap());
    let (name, last) = evs.last().unwrap();
    assert_eq!(name, "response.failed");
    assert_eq!(last["response"]["status"], "failed");
    assert!(
        last["response"]["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// OpenAI's own Responses stream (its documented events, usage on
/// `response.completed`).
fn openai_responses_stream(_path: &str, _body: &Value) -> (&'static str, String) {
    let events = [
        json!({"type": "response.created", "sequence_number": 0, "response": {"id": "resp_up", "object": "response", "status": "in_progress", "output": [], "usage": null}}),
        json!({"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_up", "output_index": 0, "content_index": 0, "delta": "Hi", "logprobs": []}),
        json!({"type": "response.completed", "sequence_number": 2, "response": {"id": "resp_up", "object": "response", "status": "completed",
            "output": [{"id": "msg_up", "type": "message", "role": "assistant", "status": "completed", "content": [{"type": "output_text", "text": "Hi", "annotations": []}]}],
            "usage": {"input_tokens": 21, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 8, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 29}}}),
    ];
    let text = events
        .iter()
        .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
        .collect();
    ("text/event-stream", text)
}

#[tokio::test]
async fn a_responses_stream_passed_through_to_openai_is_metered_from_its_usage() {
    let canned = Canned::start(openai_responses_stream).await;
    let gw = gateway(&canned.url).await;
    let mut body = request(true, false);
    body["store"] = json!(false);
    let r = reqwest::Client::new()
        .post(gw.url("/nativer/v1/responses"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let text = r.text().await.unwrap();
    assert_eq!(
        text,
        openai_responses_stream("", &Value::Null).1,
        "OpenAI's stream untouched"
    );
    let (path, seen) = canned.last();
    assert_eq!(path, "/v1/responses");
    assert_eq!(seen, body);
    let rows = gw.wait_audit_ids([&id]).await;
    let row = rows.iter().find(|r| r.request_id == id).unwrap();
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens),
        (Some(21), Some(8)),
        "{row:?}"
    );
}
