//! Format conversion through the real server: each client format against
//! each other provider, non-stream and stream, with tool calls; asserting on
//! what the client received (its own format) and what the upstream saw
//! (the provider's format, path and key header).
#![allow(clippy::unwrap_used)]

mod common;

use common::{Gateway, MockUpstream};
use fastgate::convert::sse::SseParser;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq)]
enum F {
    Openai,
    Anthropic,
    Gemini,
}

impl F {
    fn name(self) -> &'static str {
        match self {
            F::Openai => "openai",
            F::Anthropic => "anthropic",
            F::Gemini => "gemini",
        }
    }
}

/// Routes: /{client}/... in the client's format to the upstream named `to`.
async fn gateway(mock: &MockUpstream) -> Gateway {
    let u = mock.url();
    let config = format!(
        "upstreams:\n  openai: {{provider: openai, endpoints: ['{u}'], key_pool: po}}\n  anthropic: {{provider: anthropic, endpoints: ['{u}'], key_pool: pa}}\n  gemini: {{provider: gemini, endpoints: ['{u}'], key_pool: pg}}\nkey_pools:\n  po: {{keys: [sk-openai]}}\n  pa: {{keys: [sk-ant]}}\n  pg: {{keys: [AIza-gem]}}\n"
    );
    let mut routes = String::from("routes:\n");
    for client in [F::Openai, F::Anthropic, F::Gemini] {
        for to in [F::Openai, F::Anthropic, F::Gemini] {
            let (c, t) = (client.name(), to.name());
            let path = match client {
                F::Openai => format!("/{c}-{t}/v1/chat/completions"),
                F::Anthropic => format!("/{c}-{t}/v1/messages"),
                F::Gemini => format!("/{c}-{t}/v1beta/{{*rest}}"),
            };
            routes.push_str(&format!(
                "  - {{ name: {c}-{t}, match: {{ path: '{path}' }}, format: {c}, auth: none, upstream: {t}, transform: {{ strip_prefix: /{c}-{t} }} }}\n"
            ));
        }
    }
    Gateway::start(&config, &[("r.yaml", &routes)]).await
}

fn request(client: F, to: F, stream: bool, tools: bool) -> (String, Value) {
    let prefix = format!("/{}-{}", client.name(), to.name());
    match client {
        F::Openai => {
            let mut b = json!({"model": "m-1", "stream": stream, "max_tokens": 100,
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]});
            if tools {
                b["tools"] = json!([{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
            }
            if stream {
                b["stream_options"] = json!({"include_usage": true});
            }
            (format!("{prefix}/v1/chat/completions"), b)
        }
        F::Anthropic => {
            let mut b = json!({"model": "m-1", "stream": stream, "max_tokens": 100, "system": "Be brief.",
                "messages": [{"role": "user", "content": "hi"}]});
            if tools {
                b["tools"] = json!([{"name": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
            }
            (format!("{prefix}/v1/messages?beta=true"), b)
        }
        F::Gemini => {
            let mut b = json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
                "systemInstruction": {"parts": [{"text": "Be brief."}]}});
            if tools {
                b["tools"] = json!([{"functionDeclarations": [{"name": "weather", "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}}}]}]);
            }
            let op = if stream {
                "streamGenerateContent?alt=sse"
            } else {
                "generateContent"
            };
            (format!("{prefix}/v1beta/models/m-1:{op}"), b)
        }
    }
}

/// What the upstream must have seen for provider `to`.
fn assert_upstream_saw(mock: &MockUpstream, to: F, stream: bool) {
    let seen = mock.last();
    let body = seen.json();
    match to {
        F::Openai => {
            assert_eq!(seen.uri, "/v1/chat/completions");
            assert_eq!(seen.header("authorization"), Some("Bearer sk-openai"));
            assert_eq!(body["messages"][0], json!({"role": "system", "content": "Be brief."}));
            assert_eq!(body["stream"].as_bool().unwrap_or(false), stream);
        }
        F::Anthropic => {
            assert_eq!(seen.uri, "/v1/messages");
            assert_eq!(seen.header("x-api-key"), Some("sk-ant"));
            assert!(seen.header("anthropic-version").is_some());
            // One text block, a prompt-cache breakpoint on it.
            assert_eq!(body["system"][0]["text"], "Be brief.");
            assert_eq!(body["system"][0]["cache_control"]["type"], "ephemeral");
            assert!(body["max_tokens"].as_u64().is_some());
        }
        F::Gemini => {
            let want = if stream {
                "/v1beta/models/m-1:streamGenerateContent?alt=sse"
            } else {
                "/v1beta/models/m-1:generateContent"
            };
            assert_eq!(seen.uri, want);
            assert_eq!(seen.header("x-goog-api-key"), Some("AIza-gem"));
            assert_eq!(body["systemInstruction"]["parts"][0]["text"], "Be brief.");
        }
    }
    assert_eq!(seen.header("accept-encoding"), Some("identity"));
}

fn sse_events(text: &str) -> Vec<(Option<String>, Value)> {
    SseParser::parse_all(text.as_bytes())
        .into_iter()
        .map(|e| (e.event, serde_json::from_str(&e.data).unwrap_or(Value::String(e.data))))
        .collect()
}

/// The text and the tool call (name, args) a client got, read its own way.
fn client_view(client: F, stream: bool, body: &str) -> (String, Option<(String, Value)>, String) {
    match (client, stream) {
        (F::Openai, false) => {
            let v: Value = serde_json::from_str(body).unwrap();
            let m = &v["choices"][0]["message"];
            let call = m["tool_calls"].get(0).map(|c| {
                (
                    c["function"]["name"].as_str().unwrap().to_string(),
                    serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap(),
                )
            });
            assert_eq!(v["object"], "chat.completion");
            (
                m["content"].as_str().unwrap_or_default().to_string(),
                call,
                v["choices"][0]["finish_reason"].as_str().unwrap().to_string(),
            )
        }
        (F::Openai, true) => {
            assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
            let chunks: Vec<Value> = sse_events(body)
                .into_iter()
                .map(|(_, v)| v)
                .filter(Value::is_object)
                .collect();
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
            let text: String = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
                .collect();
            let mut name = None;
            let mut args = String::new();
            for c in &chunks {
                if let Some(tc) = c["choices"][0]["delta"]["tool_calls"].get(0) {
                    if let Some(n) = tc["function"]["name"].as_str() {
                        name = Some(n.to_string());
                    }
                    args.push_str(tc["function"]["arguments"].as_str().unwrap_or_default());
                }
            }
            assert!(
                chunks.last().unwrap()["usage"]["completion_tokens"].as_u64().unwrap() > 0,
                "asked-for usage chunk"
            );
            let finish = chunks
                .iter()
                .find_map(|c| c["choices"][0]["finish_reason"].as_str())
                .unwrap()
                .to_string();
            (text, name.map(|n| (n, serde_json::from_str(&args).unwrap())), finish)
        }
        (F::Anthropic, false) => {
            let v: Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["type"], "message");
            let text: String = v["content"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|b| b["text"].as_str())
                .collect();
            let call = v["content"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["type"] == "tool_use")
                .map(|b| (b["name"].as_str().unwrap().to_string(), b["input"].clone()));
            (text, call, v["stop_reason"].as_str().unwrap().to_string())
        }
        (F::Anthropic, true) => {
            let evs = sse_events(body);
            let types: Vec<&str> = evs.iter().map(|(_, v)| v["type"].as_str().unwrap()).collect();
            assert_eq!(types[0], "message_start");
            assert_eq!(
                &types[types.len() - 2..],
                &["message_delta", "message_stop"],
                "{types:?}"
            );
            let text: String = evs.iter().filter_map(|(_, v)| v["delta"]["text"].as_str()).collect();
            let name = evs
                .iter()
                .find_map(|(_, v)| v["content_block"]["name"].as_str().map(str::to_string));
            let args: String = evs
                .iter()
                .filter_map(|(_, v)| v["delta"]["partial_json"].as_str())
                .collect();
            let finish = evs[evs.len() - 2].1["delta"]["stop_reason"]
                .as_str()
                .unwrap()
                .to_string();
            (text, name.map(|n| (n, serde_json::from_str(&args).unwrap())), finish)
        }
        (F::Gemini, stream) => {
            let chunks: Vec<Value> = if stream {
                sse_events(body).into_iter().map(|(_, v)| v).collect()
            } else {
                vec![serde_json::from_str(body).unwrap()]
            };
            let parts: Vec<&Value> = chunks
                .iter()
                .flat_map(|c| c["candidates"][0]["content"]["parts"].as_array().into_iter().flatten())
                .collect();
            let text: String = parts.iter().filter_map(|p| p["text"].as_str()).collect();
            let call = parts
                .iter()
                .find_map(|p| p.get("functionCall"))
                .map(|c| (c["name"].as_str().unwrap().to_string(), c["args"].clone()));
            let finish = chunks.last().unwrap()["candidates"][0]["finishReason"]
                .as_str()
                .unwrap()
                .to_string();
            (text, call, finish)
        }
    }
}

#[tokio::test]
async fn every_client_format_reaches_every_other_provider() {
    let mock = MockUpstream::start().await;
    mock.behaviour
        .sse_interval_ms
        .store(30, std::sync::atomic::Ordering::SeqCst);
    let gw = gateway(&mock).await;
    let c = reqwest::Client::new();
    for client in [F::Openai, F::Anthropic, F::Gemini] {
        for to in [F::Openai, F::Anthropic, F::Gemini] {
            if client == to {
                continue;
            }
            for stream in [false, true] {
                for tools in [false, true] {
                    let what = format!("{client:?} client -> {to:?} upstream, stream {stream}, tools {tools}");
                    let (path, body) = request(client, to, stream, tools);
                    let started = Instant::now();
                    let r = c
                        .post(gw.url(&path))
                        .header("anthropic-version", "2023-06-01")
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200, "{what}: {}", r.text().await.unwrap());
                    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
                    assert_eq!(ct.starts_with("text/event-stream"), stream, "{what}: {ct}");
                    let text = r.text().await.unwrap();
                    if stream {
                        // The mock streams over ~120 ms: converted chunk by chunk, not at the end.
                        assert!(started.elapsed() >= Duration::from_millis(60), "{what}");
                    }
                    assert_upstream_saw(&mock, to, stream);
                    let (said, call, finish) = client_view(client, stream, &text);
                    if tools {
                        assert_eq!(
                            call,
                            Some(("weather".to_string(), json!({"city": "Paris"}))),
                            "{what}: {text}"
                        );
                        let want = match client {
                            F::Openai => "tool_calls",
                            F::Anthropic => "tool_use",
                            F::Gemini => "STOP",
                        };
                        assert_eq!(finish, want, "{what}");
                    } else {
                        assert!(said.contains("Hi") || said.contains("t0"), "{what}: {text}");
                        assert_eq!(call, None, "{what}");
                    }
                }
            }
        }
    }
    // Usage from converted answers lands in the audit log.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = gw.audit_rows();
        if rows.len() >= 24 {
            let metered = rows.iter().filter(|r| r.completion_tokens.unwrap_or(0) > 0).count();
            assert_eq!(metered, rows.len(), "every converted answer is metered: {rows:?}");
            break;
        }
        assert!(Instant::now() < deadline, "audit rows: {}", rows.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn upstream_errors_and_refusals_reach_the_client_in_its_own_shape() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock).await;
    let c = reqwest::Client::new();
    // n > 1 cannot be served by Anthropic: refused, not silently answered once.
    let (path, mut body) = request(F::Openai, F::Anthropic, false, false);
    body["n"] = json!(3);
    let r = c.post(gw.url(&path)).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["code"], "unsupported_conversion", "{err}");
    // An upstream 429 keeps its status and Retry-After, in the client's shape.
    common::rule_all(&mock, common::KeyRule::RateLimited { retry_after: 9 });
    let (path, body) = request(F::Anthropic, F::Openai, false, false);
    let r = c.post(gw.url(&path)).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "9");
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["type"], "error", "Anthropic's shape: {err}");
    assert_eq!(err["error"]["type"], "rate_limit_error", "{err}");
    let r = c.post(gw.url(&path)).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 503, "the only key is cooling after the upstream's 429");
    let (path, body) = request(F::Gemini, F::Anthropic, false, false);
    let r = c.post(gw.url(&path)).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "9");
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["status"], "RESOURCE_EXHAUSTED", "{err}");
    assert!(
        err["error"]["message"].as_str().unwrap().contains("Rate limit"),
        "{err}"
    );
    // Dropped features are reported, not silent.
    let mock2 = MockUpstream::start().await;
    let gw2 = gateway(&mock2).await;
    let (path, mut body) = request(F::Openai, F::Anthropic, false, false);
    body["seed"] = json!(7);
    let r = c.post(gw2.url(&path)).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["x-fastgate-warning"].to_str().unwrap().contains("seed"));
}

#[tokio::test]
async fn a_json_schema_answer_reaches_anthropic_as_a_forced_tool_or_natively_with_tools() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock).await;
    let c = reqwest::Client::new();
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": false});
    let format = json!({"type": "json_schema", "json_schema": {"name": "answer", "strict": true, "schema": schema}});
    // Alone: a forced tool (every Claude model has tools).
    let (path, mut body) = request(F::Openai, F::Anthropic, false, false);
    body["response_format"] = format.clone();
    let r = c.post(gw.url(&path)).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = mock.last().json();
    assert_eq!(seen["tool_choice"]["type"], "tool", "{seen}");
    assert_eq!(seen["tools"][0]["input_schema"], schema);
    assert!(seen.get("output_config").is_none(), "{seen}");
    // With the client's own tools: Anthropic's native structured output,
    // the tools kept and free to be called (no longer refused).
    let (path, mut body) = request(F::Openai, F::Anthropic, true, true);
    body["response_format"] = format;
    let r = c.post(gw.url(&path)).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-fastgate-warning").is_none());
    let seen = mock.last().json();
    assert_eq!(seen["output_config"]["format"]["schema"], schema, "{seen}");
    assert_eq!(seen["output_config"]["format"]["type"], "json_schema");
    let tools = seen["tools"].as_array().unwrap();
    assert!(
        !tools.is_empty() && tools.iter().all(|t| t["name"] != "structured_output"),
        "{seen}"
    );
    assert_ne!(seen["tool_choice"]["type"], "tool", "{seen}");
}
