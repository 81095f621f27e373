//! A streamed answer's audit row holds the answer merged into the client's
//! own non-stream JSON (`audit.merge_streams`): text, tool call with its
//! arguments, finish reason and usage — for OpenAI, Anthropic, Gemini
//! (`alt=sse`) and Responses clients, passed through and converted, read
//! through the admin API (which masks environment values as for any body).
#![allow(clippy::unwrap_used)]

mod common;

use common::{
    Gateway, MockUpstream,
    shapes::{Canned, can},
};
use serde_json::{Value, json};
use std::time::Duration;

const TOKEN: &str = "audit-merge-admin-token-0123456789abcdef";
/// An environment value a route file interpolates: the admin API shows it
/// as `${PARTNER_TOKEN}` in any captured body.
const SECRET: &str = "partnersecret0123456789abcdefXYZ";
const MASKED: &str = "${PARTNER_TOKEN}";

/// The answer's text, in the pieces it streams in (the secret split in two).
fn pieces() -> Vec<String> {
    vec![
        "Hello".into(),
        ", world. ".into(),
        "The code is ".into(),
        SECRET[..10].into(),
        SECRET[10..].into(),
        ".".into(),
    ]
}

/// The answer's tool call arguments, in two pieces.
const ARGS: [&str; 2] = ["{\"city\":", " \"Paris\"}"];

fn sse_data(v: &Value) -> String {
    format!("data: {v}\n\n")
}

fn sse_named(v: &Value) -> String {
    format!("event: {}\ndata: {v}\n\n", v["type"].as_str().unwrap())
}

/// OpenAI chat chunks: text, a call of get_weather with split arguments,
/// `tool_calls`, the usage chunk (11, 7), `[DONE]`.
fn openai_events(text: &[String]) -> Vec<String> {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-m1", "object": "chat.completion.chunk", "created": 1_761_000_000, "model": "gpt-4o",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut out = vec![sse_data(&chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    ))];
    out.extend(
        text.iter()
            .map(|t| sse_data(&chunk(json!({"content": t}), Value::Null))),
    );
    out.push(sse_data(&chunk(
        json!({"tool_calls": [{"index": 0, "id": "call_w1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
        Value::Null,
    )));
    for a in ARGS {
        out.push(sse_data(&chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": a}}]}),
            Value::Null,
        )));
    }
    out.push(sse_data(&chunk(json!({}), json!("tool_calls"))));
    out.push(sse_data(
        &json!({"id": "chatcmpl-m1", "object": "chat.completion.chunk", "created": 1_761_000_000,
        "model": "gpt-4o", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}),
    ));
    out.push("data: [DONE]\n\n".into());
    out
}

/// Anthropic events: a text block, a tool_use block with split input,
/// `tool_use`, usage 11 in / 7 out.
fn anthropic_events(text: &[String]) -> Vec<String> {
    let mut evs = vec![
        json!({"type": "message_start", "message": {"id": "msg_m1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [], "stop_reason": null, "usage": {"input_tokens": 11, "output_tokens": 1}}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ];
    evs.extend(
        text.iter()
            .map(|t| json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}})),
    );
    evs.push(json!({"type": "content_block_stop", "index": 0}));
    evs.push(json!({"type": "content_block_start", "index": 1,
        "content_block": {"type": "tool_use", "id": "toolu_w1", "name": "get_weather", "input": {}}}));
    evs.extend(
        ARGS.iter()
            .map(|a| json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": a}})),
    );
    evs.push(json!({"type": "content_block_stop", "index": 1}));
    evs.push(json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 7}}));
    evs.push(json!({"type": "message_stop"}));
    evs.iter().map(sse_named).collect()
}

/// Gemini chunks (`alt=sse`): text parts, then the whole call with `STOP`
/// and usage (11 prompt, 7 candidates).
fn gemini_events(text: &[String]) -> Vec<String> {
    let mut out: Vec<String> = text
        .iter()
        .map(|t| {
            sse_data(
                &json!({"candidates": [{"content": {"parts": [{"text": t}], "role": "model"}, "index": 0}],
                "modelVersion": "gemini-2.5-flash", "responseId": "gem-m1"}),
            )
        })
        .collect();
    out.push(sse_data(&json!({"candidates": [{"content": {"parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}], "role": "model"},
        "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 11, "candidatesTokenCount": 7, "totalTokenCount": 18},
        "modelVersion": "gemini-2.5-flash", "responseId": "gem-m1"})));
    out
}

/// OpenAI's Responses events: a message's text deltas, a function call's
/// argument deltas, `response.completed` with usage.
fn responses_events(text: &[String]) -> Vec<String> {
    let whole: String = text.concat();
    let mut evs = vec![
        json!({"type": "response.created", "response": {"id": "resp_m1", "object": "response", "status": "in_progress", "model": "gpt-5", "output": [], "usage": null}}),
        json!({"type": "response.output_item.added", "output_index": 0, "item": {"id": "msg_m1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}}),
    ];
    evs.extend(text.iter().map(|t| {
        json!({"type": "response.output_text.delta", "item_id": "msg_m1", "output_index": 0, "content_index": 0, "delta": t, "logprobs": []})
    }));
    evs.push(json!({"type": "response.output_item.done", "output_index": 0, "item": {"id": "msg_m1", "type": "message", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": whole, "annotations": []}]}}));
    evs.push(json!({"type": "response.output_item.added", "output_index": 1, "item": {"id": "fc_m1", "type": "function_call", "status": "in_progress", "call_id": "call_w1", "name": "get_weather", "arguments": ""}}));
    evs.extend(ARGS.iter().map(|a| {
        json!({"type": "response.function_call_arguments.delta", "item_id": "fc_m1", "output_index": 1, "delta": a})
    }));
    evs.push(json!({"type": "response.output_item.done", "output_index": 1, "item": {"id": "fc_m1", "type": "function_call", "status": "completed", "call_id": "call_w1", "name": "get_weather", "arguments": ARGS.concat()}}));
    evs.push(json!({"type": "response.completed", "response": {"id": "resp_m1", "object": "response", "status": "completed", "model": "gpt-5", "output": [],
        "usage": {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 18}}}));
    evs.iter()
        .enumerate()
        .map(|(i, e)| {
            let mut e = e.clone();
            e["sequence_number"] = i.into();
            sse_named(&e)
        })
        .collect()
}

fn canned(events: Vec<String>) -> Canned {
    Canned { whole: None, events }
}

/// The client formats, each with its passthrough upstream and the upstream
/// its converted route goes to.
const CLIENTS: [(&str, &str, &str); 4] = [
    ("openai", "oai", "ant"),
    ("anthropic", "ant", "gem"),
    ("gemini", "gem", "oai"),
    ("responses", "resp", "ant"),
];

fn routes() -> String {
    let mut r = String::from("routes:\n");
    for (format, pass, conv) in CLIENTS {
        for (prefix, upstream) in [("p", pass), ("c", conv)] {
            let path = match format {
                "openai" => "v1/chat/completions".to_string(),
                "anthropic" => "v1/messages".into(),
                "gemini" => "v1beta/{*rest}".into(),
                _ => "v1/responses".into(),
            };
            r.push_str(&format!(
                "  - {{ name: {prefix}-{format}, match: {{ path: '/{prefix}/{format}/{path}' }}, format: {format}, auth: none, upstream: {upstream}, transform: {{ strip_prefix: /{prefix}/{format}, set_headers: {{ x-partner: \"${{PARTNER_TOKEN}}\" }} }} }}\n"
            ));
        }
    }
    r
}

struct Mocks {
    oai: MockUpstream,
    ant: MockUpstream,
    gem: MockUpstream,
    resp: MockUpstream,
}

impl Mocks {
    async fn start(text: &[String]) -> Mocks {
        let m = Mocks {
            oai: MockUpstream::start().await,
            ant: MockUpstream::start().await,
            gem: MockUpstream::start().await,
            resp: MockUpstream::start().await,
        };
        can(&m.oai, canned(openai_events(text)));
        can(&m.ant, canned(anthropic_events(text)));
        can(&m.gem, canned(gemini_events(text)));
        can(&m.resp, canned(responses_events(text)));
        m
    }
}

async fn gateway(m: &Mocks, audit: &str) -> Gateway {
    let config = format!(
        "admin:\n  token: {TOKEN}\naudit:\n  capture_body: true\n{audit}upstreams:\n  oai: {{provider: openai, endpoints: ['{}']}}\n  ant: {{provider: anthropic, endpoints: ['{}']}}\n  gem: {{provider: gemini, endpoints: ['{}']}}\n  resp: {{provider: openai, endpoints: ['{}']}}\n",
        m.oai.url(),
        m.ant.url(),
        m.gem.url(),
        m.resp.url()
    );
    Gateway::start_with_env(&config, &[("r.yaml", &routes())], &[("PARTNER_TOKEN", SECRET)]).await
}

/// A streamed request of `format` under `prefix`: (request id, the client's
/// text deltas joined, the raw stream).
async fn stream(gw: &Gateway, prefix: &str, format: &str) -> (String, String, String) {
    let (path, body) = match format {
        "openai" => (
            "v1/chat/completions",
            json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "weather?"}]}),
        ),
        "anthropic" => (
            "v1/messages",
            json!({"model": "claude-x", "max_tokens": 100, "stream": true, "messages": [{"role": "user", "content": "weather?"}]}),
        ),
        "gemini" => (
            "v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            json!({"contents": [{"role": "user", "parts": [{"text": "weather?"}]}]}),
        ),
        _ => (
            "v1/responses",
            json!({"model": "gpt-5", "stream": true, "input": "weather?"}),
        ),
    };
    let r = reqwest::Client::new()
        .post(gw.url(&format!("/{prefix}/{format}/{path}")))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{prefix} {format}");
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let raw = r.text().await.unwrap();
    (id, client_text(format, &raw), raw)
}

/// The text deltas a client of `format` received, joined.
fn client_text(format: &str, raw: &str) -> String {
    let mut text = String::new();
    for data in raw.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim) {
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        let piece = match format {
            "openai" => v["choices"][0]["delta"]["content"].as_str().map(str::to_string),
            "anthropic" => (v["delta"]["type"] == "text_delta")
                .then(|| v["delta"]["text"].as_str().map(str::to_string))
                .flatten(),
            "gemini" => Some(
                v["candidates"][0]["content"]["parts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["thought"] != true)
                    .filter_map(|p| p["text"].as_str())
                    .collect(),
            ),
            _ => (v["type"] == "response.output_text.delta")
                .then(|| v["delta"].as_str().map(str::to_string))
                .flatten(),
        };
        text.push_str(&piece.unwrap_or_default());
    }
    text
}

/// The response body of `request_id`'s row, through the admin API (list
/// by request id, then the entry itself).
async fn logged_body(gw: &Gateway, request_id: &str) -> String {
    let admin = reqwest::Client::new();
    for _ in 0..100 {
        let listed: Value = admin
            .get(gw.admin_url(&format!("/api/logs?request_id={request_id}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(id) = listed["items"][0]["id"].as_i64() {
            let row: Value = admin
                .get(gw.admin_url(&format!("/api/logs/{id}")))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            return row["response_body"].as_str().unwrap_or_default().to_string();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no audit row for {request_id}");
}

/// What the merged body of `format` says: (text, tool name, arguments,
/// finish reason, prompt tokens, completion tokens).
type Said = (String, String, Value, String, u64, u64);

fn said(format: &str, v: &Value) -> Said {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let n = |v: &Value| v.as_u64().unwrap_or(u64::MAX);
    match format {
        "openai" => {
            let m = &v["choices"][0]["message"];
            let call = &m["tool_calls"][0]["function"];
            (
                s(&m["content"]),
                s(&call["name"]),
                serde_json::from_str(call["arguments"].as_str().unwrap_or("null")).unwrap_or(Value::Null),
                s(&v["choices"][0]["finish_reason"]),
                n(&v["usage"]["prompt_tokens"]),
                n(&v["usage"]["completion_tokens"]),
            )
        }
        "anthropic" => {
            let blocks = v["content"].as_array().cloned().unwrap_or_default();
            let text = blocks
                .iter()
                .filter(|b| b["type"] == "text")
                .map(|b| s(&b["text"]))
                .collect();
            let call = blocks
                .iter()
                .find(|b| b["type"] == "tool_use")
                .cloned()
                .unwrap_or_default();
            (
                text,
                s(&call["name"]),
                call["input"].clone(),
                s(&v["stop_reason"]),
                n(&v["usage"]["input_tokens"]),
                n(&v["usage"]["output_tokens"]),
            )
        }
        "gemini" => {
            let parts = v["candidates"][0]["content"]["parts"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let text = parts.iter().filter_map(|p| p["text"].as_str()).collect();
            let call = parts
                .iter()
                .find_map(|p| p.get("functionCall"))
                .cloned()
                .unwrap_or_default();
            (
                text,
                s(&call["name"]),
                call["args"].clone(),
                s(&v["candidates"][0]["finishReason"]),
                n(&v["usageMetadata"]["promptTokenCount"]),
                n(&v["usageMetadata"]["candidatesTokenCount"]),
            )
        }
        _ => {
            let items = v["output"].as_array().cloned().unwrap_or_default();
            let text = items
                .iter()
                .filter(|i| i["type"] == "message")
                .flat_map(|i| i["content"].as_array().cloned().unwrap_or_default())
                .map(|c| s(&c["text"]))
                .collect();
            let call = items
                .iter()
                .find(|i| i["type"] == "function_call")
                .cloned()
                .unwrap_or_default();
            (
                text,
                s(&call["name"]),
                serde_json::from_str(call["arguments"].as_str().unwrap_or("null")).unwrap_or(Value::Null),
                s(&v["status"]),
                n(&v["usage"]["input_tokens"]),
                n(&v["usage"]["output_tokens"]),
            )
        }
    }
}

fn finish_of(format: &str) -> &'static str {
    match format {
        "openai" => "tool_calls",
        "anthropic" => "tool_use",
        "gemini" => "STOP",
        _ => "completed",
    }
}

#[tokio::test]
async fn a_streamed_answer_is_logged_merged_in_the_clients_shape_passed_through_or_converted() {
    let mocks = Mocks::start(&pieces()).await;
    let gw = gateway(&mocks, "").await;
    for (format, _, _) in CLIENTS {
        let mut seen = Vec::new();
        for prefix in ["p", "c"] {
            let (id, text, raw) = stream(&gw, prefix, format).await;
            assert_eq!(
                text,
                pieces().concat(),
                "{prefix} {format}: the client got the text: {raw}"
            );
            let body = logged_body(&gw, &id).await;
            let v: Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("{prefix} {format}: one JSON object, not events ({e}): {body}"));
            assert!(v.get("fastgate_incomplete").is_none(), "{prefix} {format}: {body}");
            assert!(v.get("fastgate_truncated").is_none(), "{prefix} {format}: {body}");
            assert!(
                !body.contains(SECRET),
                "{prefix} {format}: masked as bodies are: {body}"
            );
            let got = said(format, &v);
            let expected: Said = (
                text.replace(SECRET, MASKED),
                "get_weather".into(),
                json!({"city": "Paris"}),
                finish_of(format).into(),
                11,
                7,
            );
            assert_eq!(got, expected, "{prefix} {format}: {body}");
            seen.push(got);
        }
        assert_eq!(seen[0], seen[1], "{format}: passthrough and converted merge alike");
    }
}

/// A long stream: the merged body stays within `body_max_bytes`, is still
/// one JSON object, says it was cut, and its text is the start of what the
/// client got.
#[tokio::test]
async fn a_stream_longer_than_the_cap_is_merged_within_it_and_marked() {
    let long: Vec<String> = (0..250).map(|i| format!("word{i:04} ")).collect();
    let mocks = Mocks::start(&long).await;
    let gw = gateway(&mocks, "  body_max_bytes: 2KiB\n").await;
    for (prefix, format) in [("p", "openai"), ("c", "gemini"), ("c", "anthropic"), ("p", "responses")] {
        let (id, text, _) = stream(&gw, prefix, format).await;
        assert_eq!(text.len(), 250 * 9, "{prefix} {format}");
        let body = logged_body(&gw, &id).await;
        assert!(body.len() <= 2048, "{prefix} {format}: {} bytes", body.len());
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{prefix} {format}: {e}: {body}"));
        assert_eq!(v["fastgate_truncated"], true, "{prefix} {format}: {body}");
        let (merged, ..) = said(format, &v);
        assert!(
            merged.len() >= 1000 && text.starts_with(&merged),
            "{prefix} {format}: {} bytes kept of the text: {body}",
            merged.len()
        );
    }
}

/// A stream the upstream cuts: what arrived is merged, and the row says
/// the answer is incomplete (no finish reason).
#[tokio::test]
async fn a_stream_cut_short_is_merged_as_far_as_it_came_and_marked_incomplete() {
    let mocks = Mocks::start(&pieces()).await;
    common::rule_all(&mocks.oai, common::KeyRule::CutMidStream);
    *mocks.oai.behaviour.canned.lock().unwrap() = None;
    let gw = gateway(&mocks, "").await;
    for (prefix, format) in [("p", "openai"), ("c", "gemini")] {
        let (id, text, _) = stream(&gw, prefix, format).await;
        assert_eq!(text, "t0t1", "{prefix} {format}");
        let body = logged_body(&gw, &id).await;
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{prefix} {format}: {e}: {body}"));
        assert_eq!(v["fastgate_incomplete"], true, "{prefix} {format}: {body}");
        let (merged, _, _, finish, ..) = said(format, &v);
        assert_eq!(
            (merged.as_str(), finish.as_str()),
            ("t0t1", ""),
            "{prefix} {format}: {body}"
        );
    }
}

/// `merge_streams: false` keeps the events, as before.
#[tokio::test]
async fn merge_streams_off_keeps_the_events() {
    let mocks = Mocks::start(&pieces()).await;
    let gw = gateway(&mocks, "  merge_streams: false\n").await;
    for (prefix, format) in [("p", "openai"), ("p", "anthropic")] {
        let (id, _, _) = stream(&gw, prefix, format).await;
        let body = logged_body(&gw, &id).await;
        assert!(
            body.starts_with("data: ") || body.starts_with("event: "),
            "{prefix} {format}: the events: {body}"
        );
        assert!(serde_json::from_str::<Value>(&body).is_err(), "{body}");
    }
}

/// Whole answers are stored as they were.
#[tokio::test]
async fn a_whole_answer_is_stored_as_before() {
    let mocks = Mocks::start(&pieces()).await;
    can(
        &mocks.oai,
        Canned {
            whole: Some(json!({"id": "c9", "object": "chat.completion", "model": "gpt-4o",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "whole"}, "finish_reason": "stop"}]})),
            events: Vec::new(),
        },
    );
    let gw = gateway(&mocks, "").await;
    let r = reqwest::Client::new()
        .post(gw.url("/p/openai/v1/chat/completions"))
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let sent = r.text().await.unwrap();
    assert_eq!(logged_body(&gw, &id).await, sent);
}

/// A client that hangs up mid-stream: what reached it is merged, marked
/// incomplete, without a finish reason.
#[tokio::test]
async fn a_stream_the_client_leaves_is_merged_as_far_as_it_came() {
    use futures_util::StreamExt;
    let mocks = Mocks::start(&pieces()).await;
    *mocks.oai.behaviour.canned.lock().unwrap() = None;
    mocks
        .oai
        .behaviour
        .sse_interval_ms
        .store(300, std::sync::atomic::Ordering::SeqCst);
    let gw = gateway(&mocks, "").await;
    for (prefix, format, path, body) in [
        (
            "p",
            "openai",
            "v1/chat/completions",
            json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "c",
            "gemini",
            "v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}),
        ),
    ] {
        let r = reqwest::Client::new()
            .post(gw.url(&format!("/{prefix}/{format}/{path}")))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        let mut events = r.bytes_stream();
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("t0") {
            got.extend_from_slice(&events.next().await.unwrap().unwrap());
        }
        drop(events);
        let body = logged_body(&gw, &id).await;
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{prefix} {format}: {e}: {body}"));
        assert_eq!(v["fastgate_incomplete"], true, "{prefix} {format}: {body}");
        let (merged, _, _, finish, ..) = said(format, &v);
        assert!(
            merged.starts_with("t0") && "t0t1t2t3t4".starts_with(&merged) && merged.len() < 10,
            "{prefix} {format}: {body}"
        );
        assert_eq!(finish, "", "{prefix} {format}: {body}");
    }
}

/// A converted stream that ends in the upstream's error event, or stops
/// before its terminal event, is an error in its row (with its message), and marked incomplete in the
/// merged body, not a 200 without one.
#[tokio::test]
async fn a_converted_stream_ending_in_an_error_is_logged_as_one() {
    let mocks = Mocks::start(&pieces()).await;
    let gw = gateway(&mocks, "").await;
    let overloaded =
        sse_named(&json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}));
    for (ending, want) in [(Some(overloaded), "Overloaded"), (None, "before its end")] {
        let mut events = anthropic_events(&pieces());
        events.truncate(4);
        events.extend(ending);
        can(&mocks.ant, canned(events));
        let (id, text, raw) = stream(&gw, "c", "openai").await;
        assert_eq!(text, "Hello, world. ", "{raw}");
        assert!(!raw.contains("[DONE]"), "{raw}");
        let body: Value = serde_json::from_str(&logged_body(&gw, &id).await).unwrap();
        assert_eq!(body["fastgate_incomplete"], true, "{want}: {body}");
        if want == "Overloaded" {
            assert_eq!(body["fastgate_error"], "Overloaded", "{body}");
        }
        let row = gw
            .audit_rows()
            .into_iter()
            .find(|r| r.request_id == id)
            .expect("the row");
        assert!(
            row.error.as_deref().is_some_and(|m| m.contains(want)),
            "{want}: {:?}",
            row.error
        );
    }
}
