//! Gemini CLI on Claude keeps thinking after its first tool call (issue 24,
//! "Conversion II"): Anthropic's signed thinking reaches a Gemini client in
//! the `thoughtSignature` of its function call, and comes back to Anthropic
//! as the tool turn's opening thinking block(s) — exact text and signature —
//! even though the client drops the thought text parts from its history.
//! Through the real server, a Gemini client (raw HTTP, whole and streamed)
//! and a mock upstream answering as Anthropic does; sources of the shapes in
//! `tests/fixtures/conversion/README.md` ("Signed thinking for Gemini clients").
#![allow(clippy::unwrap_used)]

mod common;

use base64::Engine;
use common::{
    Gateway, MockUpstream,
    shapes::{self, Canned},
};
use fastgate::convert::sse::SseParser;
use serde_json::{Value, json};

/// Thinking as Claude streams it: several lines, non-ASCII, kept byte for byte.
const THINKING: &str = "The user wants Paris weather.\nI should call get_weather — city “Paris”.";
/// A signature in Anthropic's shape (standard base64, `+`, `/` and padding).
const SIGNATURE: &str = "EqQBCgIYAhIM1gbcDa9GJwZA2b3h+GgxBdjrkzLoky3dl1pk/iMOYdsQ==";
const REDACTED: &str = "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpP";

async fn gateway(mock: &MockUpstream) -> Gateway {
    let config = format!(
        "upstreams:\n  anthropic: {{provider: anthropic, endpoints: ['{}'], key_pool: pa}}\nkey_pools:\n  pa: {{keys: [sk-ant]}}\n",
        mock.url()
    );
    let routes = "routes:\n  - { name: gemini-on-claude, match: { path: '/v1beta/{*rest}' }, format: gemini, auth: none, upstream: anthropic }\n";
    Gateway::start(&config, &[("r.yaml", routes)]).await
}

/// Claude's whole answer: thinking, text, then a tool call.
fn anthropic_whole() -> Value {
    json!({"id": "msg_01Thk", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
        "content": [
            {"type": "thinking", "thinking": THINKING, "signature": SIGNATURE},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_01Wx", "name": "get_weather", "input": {"city": "Paris"}}
        ],
        "stop_reason": "tool_use", "stop_sequence": null,
        "usage": {"input_tokens": 50, "output_tokens": 80}})
}

/// Claude's streamed answer: thinking in two deltas and its
/// `signature_delta`, a redacted block, then a tool call with split input.
fn anthropic_events() -> Vec<String> {
    let (head, tail) = THINKING.split_at(THINKING.find('\n').unwrap());
    let events = [
        json!({"type": "message_start", "message": {"id": "msg_01Thk", "type": "message", "role": "assistant",
            "model": "claude-sonnet-4-5-20250929", "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 50, "output_tokens": 1}}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": head}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": tail}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": SIGNATURE}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "content_block_start", "index": 1, "content_block": {"type": "redacted_thinking", "data": REDACTED}}),
        json!({"type": "content_block_stop", "index": 1}),
        json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_01Wx", "name": "get_weather", "input": {}}}),
        json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "{\"city\": "}}),
        json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "\"Paris\"}"}}),
        json!({"type": "content_block_stop", "index": 2}),
        json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 80}}),
        json!({"type": "message_stop"}),
    ];
    events
        .iter()
        .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
        .collect()
}

fn tools() -> Value {
    json!([{"functionDeclarations": [{"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}, "required": ["city"]}}]}])
}

fn generation_config() -> Value {
    json!({"thinkingConfig": {"thinkingBudget": 2048, "includeThoughts": true}, "maxOutputTokens": 4096})
}

fn path(stream: bool) -> &'static str {
    if stream {
        "/v1beta/models/claude-sonnet-4-5:streamGenerateContent?alt=sse"
    } else {
        "/v1beta/models/claude-sonnet-4-5:generateContent"
    }
}

/// Status, `x-fastgate-warning` and the model parts the client received
/// (a stream's chunks joined).
async fn ask(gw: &Gateway, stream: bool, body: &Value) -> (u16, Option<String>, Vec<Value>) {
    let r = reqwest::Client::new()
        .post(gw.url(path(stream)))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let warning = r
        .headers()
        .get("x-fastgate-warning")
        .map(|w| w.to_str().unwrap().to_string());
    let text = r.text().await.unwrap();
    let chunks: Vec<Value> = if stream {
        SseParser::parse_all(text.as_bytes())
            .into_iter()
            .map(|e| serde_json::from_str(&e.data).unwrap())
            .collect()
    } else {
        vec![serde_json::from_str(&text).unwrap()]
    };
    assert!(chunks.iter().all(|c| c.get("error").is_none()), "no error: {text}");
    // The google-genai chats drop a streamed turn from their history when
    // a chunk has no parts.
    assert!(
        chunks.iter().all(|c| c["candidates"][0]["content"]["parts"]
            .as_array()
            .is_some_and(|p| !p.is_empty())),
        "every chunk has parts: {text}"
    );
    let parts = chunks
        .iter()
        .flat_map(|c| {
            c["candidates"][0]["content"]["parts"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    (status, warning, parts)
}

/// Turn 1, then turn 2 sent back as Gemini CLI does (thought parts removed,
/// the function call with its `thoughtSignature` — passed through
/// `resign` — and the function's response); the request Anthropic got for
/// turn 2 and the turn-2 warning header.
async fn two_turns(stream: bool, resign: impl Fn(&str) -> String) -> (Value, Option<String>) {
    let mock = MockUpstream::start().await;
    shapes::can(
        &mock,
        Canned {
            whole: Some(anthropic_whole()),
            events: anthropic_events(),
        },
    );
    let gw = gateway(&mock).await;
    let user = json!({"role": "user", "parts": [{"text": "What's the weather in Paris?"}]});
    let turn1 = json!({"contents": [user], "tools": tools(), "generationConfig": generation_config()});
    let (status, _, parts) = ask(&gw, stream, &turn1).await;
    assert_eq!(status, 200, "{parts:?}");

    // The client still sees the thinking as thought parts.
    let thought: String = parts
        .iter()
        .filter(|p| p["thought"] == true)
        .filter_map(|p| p["text"].as_str())
        .collect();
    assert_eq!(thought, THINKING, "{parts:?}");
    let calls: Vec<&Value> = parts.iter().filter(|p| p.get("functionCall").is_some()).collect();
    assert_eq!(calls.len(), 1, "{parts:?}");
    let signature = calls[0]["thoughtSignature"].as_str();
    assert!(
        signature.is_some(),
        "the function call carries a thoughtSignature: {parts:?}"
    );

    // Gemini CLI's history: the model turn without its thought parts.
    let mut model_parts: Vec<Value> = parts
        .iter()
        .filter(|p| p["thought"] != true && p.get("text").is_some_and(|t| t != ""))
        .cloned()
        .collect();
    let mut call = json!({"functionCall": calls[0]["functionCall"].clone()});
    if let Some(sig) = signature {
        call["thoughtSignature"] = resign(sig).into();
    }
    model_parts.push(call);
    let response = json!({"functionResponse": {"id": calls[0]["functionCall"]["id"], "name": "get_weather",
        "response": {"temperature": 21, "sky": "clear"}}});
    let turn2 = json!({"contents": [user, {"role": "model", "parts": model_parts}, {"role": "user", "parts": [response]}],
        "tools": tools(), "generationConfig": generation_config()});
    mock.clear();
    let (status, warning, _) = ask(&gw, stream, &turn2).await;
    assert_eq!(status, 200);
    let seen = mock.seen();
    assert_eq!(seen.len(), 1, "one upstream request for turn 2");
    assert!(seen[0].uri.ends_with("/v1/messages"), "{}", seen[0].uri);
    (seen[0].json(), warning)
}

/// What Anthropic must receive for turn 2: thinking still on, and the
/// assistant turn opening with the thinking block(s) exactly as Claude sent
/// them, before the tool call its result answers.
fn assert_thinking_kept(sent: &Value, warning: Option<&str>, expected_thinking: &[Value]) {
    assert_eq!(
        sent["thinking"],
        json!({"type": "enabled", "budget_tokens": 2048}),
        "thinking stays on (warning: {warning:?}): {sent}"
    );
    assert!(
        !warning.unwrap_or_default().contains("reasoning"),
        "no reasoning dropped: {warning:?}"
    );
    let messages = sent["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3, "{sent}");
    assert_eq!(messages[1]["role"], "assistant");
    let content = messages[1]["content"].as_array().unwrap();
    assert_eq!(
        &content[..expected_thinking.len()],
        expected_thinking,
        "the assistant turn opens with Claude's thinking, unmodified: {sent}"
    );
    let thinking_blocks = content
        .iter()
        .filter(|b| matches!(b["type"].as_str(), Some("thinking" | "redacted_thinking")))
        .count();
    assert_eq!(thinking_blocks, expected_thinking.len(), "no thinking repeated: {sent}");
    let tool_use = content.last().unwrap();
    assert_eq!(tool_use["type"], "tool_use", "{sent}");
    assert_eq!(tool_use["name"], "get_weather");
    assert_eq!(tool_use["input"], json!({"city": "Paris"}));
    let result = &messages[2]["content"][0];
    assert_eq!(result["type"], "tool_result");
    assert_eq!(result["tool_use_id"], tool_use["id"], "{sent}");
}

fn thinking_block() -> Value {
    json!({"type": "thinking", "thinking": THINKING, "signature": SIGNATURE})
}

/// `:generateContent`: the signature comes back re-encoded url-safe without
/// padding (the Python SDK holds it as bytes and encodes it again).
#[tokio::test]
async fn whole_answers_keep_claude_thinking_across_a_tool_call() {
    let url_safe = |sig: &str| {
        let bytes = base64::engine::general_purpose::STANDARD.decode(sig).unwrap();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    };
    let (sent, warning) = two_turns(false, url_safe).await;
    assert_thinking_kept(&sent, warning.as_deref(), &[thinking_block()]);
    let content = sent["messages"][1]["content"].as_array().unwrap();
    assert_eq!(content[1], json!({"type": "text", "text": "Checking."}), "{sent}");
}

/// `:streamGenerateContent?alt=sse`: thinking and redacted thinking, in order,
/// the signature sent back as received.
#[tokio::test]
async fn streamed_answers_keep_claude_thinking_across_a_tool_call() {
    let (sent, warning) = two_turns(true, str::to_string).await;
    assert_thinking_kept(
        &sent,
        warning.as_deref(),
        &[thinking_block(), json!({"type": "redacted_thinking", "data": REDACTED})],
    );
}

/// The google-genai Python SDK's own chat, whole and streamed: it decodes
/// the signature into bytes and encodes it again for turn 2. Needs the SDK:
/// `GENAI_PYTHON=/path/to/python cargo nextest run --test
/// gemini_thinking_signatures --run-ignored all` (a python3 with
/// `pip install google-genai`).
#[tokio::test]
#[ignore = "needs google-genai for Python (GENAI_PYTHON)"]
async fn the_python_sdk_keeps_claude_thinking_across_a_tool_call() {
    let mock = MockUpstream::start().await;
    shapes::can(
        &mock,
        Canned {
            whole: Some(anthropic_whole()),
            events: anthropic_events(),
        },
    );
    let gw = gateway(&mock).await;
    let python = std::env::var("GENAI_PYTHON").unwrap_or_else(|_| "python3".into());
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/conversion/genai_thinking_round_trip.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(gw.url(""))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = mock.seen();
    assert_eq!(seen.len(), 4, "two turns, whole then streamed");
    assert!(seen[3].uri.ends_with("/v1/messages"));
    assert_eq!(seen[3].json()["stream"], true);
    assert_thinking_kept(&seen[1].json(), None, &[thinking_block()]);
    assert_thinking_kept(
        &seen[3].json(),
        None,
        &[thinking_block(), json!({"type": "redacted_thinking", "data": REDACTED})],
    );
}
