//! Request shapes and upstream errors through the real gateway: what each
//! upstream saw for a converted request (tool schemas toward Gemini,
//! thinking toward Anthropic, instructions, tool modes, documents, OpenAI
//! parameters, tool result ids, `model_map`) and the error each client got
//! for the error answers real providers send (context overflow, quota, rate
//! limit, bad key). `tests/fixtures/conversion/README.md` ("Request shapes
//! and errors") says which provider page each shape comes from.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::Gateway;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
};

/// What the canned upstream saw: path (with query) and JSON body.
type Seen = Arc<Mutex<Vec<(String, Value)>>>;

/// An upstream speaking the three providers' formats (by path) whose answer
/// the model name picks: `ctx` (context overflow), `quota`, `rate` (a rate
/// limit with `Retry-After: 7`), `badkey` (Gemini's bad-key 400); any other
/// model gets a short answer naming it.
struct Canned {
    url: String,
    seen: Seen,
}

impl Canned {
    async fn start() -> Canned {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen: Seen = Arc::default();
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(req, s.clone()));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Canned { url, seen }
    }

    fn last(&self) -> (String, Value) {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream saw a request")
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Wire {
    Openai,
    Anthropic,
    Gemini,
}

fn wire_of(path: &str) -> Wire {
    if path.ends_with("/v1/messages") {
        Wire::Anthropic
    } else if path.contains(":generateContent") || path.contains(":streamGenerateContent") {
        Wire::Gemini
    } else {
        Wire::Openai
    }
}

/// The provider's own error answer for `kind` (bodies as their docs and
/// real answers show them; see the fixtures README).
fn error_answer(wire: Wire, kind: &str) -> Option<(u16, Value)> {
    Some(match (kind, wire) {
        ("ctx", Wire::Openai) => (
            400,
            json!({"error": {"message": "This model's maximum context length is 128000 tokens. However, your messages resulted in 130532 tokens. Please reduce the length of the messages.", "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}),
        ),
        ("ctx", Wire::Anthropic) => (
            400,
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long: 130532 tokens > 128000 maximum"}, "request_id": "req_011"}),
        ),
        ("ctx", Wire::Gemini) => (
            400,
            json!({"error": {"code": 400, "message": "The input token count (130532) exceeds the maximum number of tokens allowed (128000).", "status": "INVALID_ARGUMENT"}}),
        ),
        ("quota", Wire::Openai) => (
            429,
            json!({"error": {"message": "You exceeded your current quota, please check your plan and billing details.", "type": "insufficient_quota", "param": null, "code": "insufficient_quota"}}),
        ),
        ("quota", Wire::Anthropic) => (
            400,
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."}}),
        ),
        ("quota", Wire::Gemini) => (
            429,
            json!({"error": {"code": 429, "message": "You exceeded your current quota, please check your plan and billing details.", "status": "RESOURCE_EXHAUSTED", "details": [{"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests", "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]}]}}),
        ),
        ("rate", Wire::Openai) => (
            429,
            json!({"error": {"message": "Rate limit reached for gpt-4.1 on requests per min (RPM): Limit 500, Used 500.", "type": "requests", "param": null, "code": "rate_limit_exceeded"}}),
        ),
        ("rate", Wire::Anthropic) => (
            429,
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "This request would exceed the rate limit for your organization of 50 requests per minute."}}),
        ),
        ("rate", Wire::Gemini) => (
            429,
            json!({"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).", "status": "RESOURCE_EXHAUSTED", "details": [{"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaId": "GenerateRequestsPerMinutePerProjectPerModel"}]}, {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "6.2s"}]}}),
        ),
        ("badkey", Wire::Gemini) => (
            400,
            json!({"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.", "status": "INVALID_ARGUMENT", "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}}),
        ),
        _ => return None,
    })
}

/// A short well-formed answer naming `model` (whole, or as the provider's stream).
fn normal_answer(wire: Wire, model: &str, stream: bool) -> (&'static str, String) {
    match (wire, stream) {
        (Wire::Openai, false) => (
            "application/json",
            json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}).to_string(),
        ),
        (Wire::Openai, true) => {
            let c = |delta: Value, finish: Value| json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
            let usage = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}});
            let events = [
                c(json!({"role": "assistant", "content": "ok"}), Value::Null),
                c(json!({}), json!("stop")),
                usage,
            ];
            let mut out: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
            out.push_str("data: [DONE]\n\n");
            ("text/event-stream", out)
        }
        (Wire::Anthropic, false) => (
            "application/json",
            json!({"id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn", "stop_sequence": null, "usage": anthropic_usage(model)}).to_string(),
        ),
        (Wire::Anthropic, true) => {
            let events = [
                json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [], "usage": anthropic_usage(model)}}),
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}}),
                json!({"type": "content_block_stop", "index": 0}),
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}}),
                json!({"type": "message_stop"}),
            ];
            let out = events
                .iter()
                .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
                .collect();
            ("text/event-stream", out)
        }
        (Wire::Gemini, stream) => {
            let v = json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "ok"}]}, "finishReason": "STOP", "index": 0}], "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 1, "totalTokenCount": 6}, "modelVersion": model, "responseId": "r1"});
            if stream {
                ("text/event-stream", format!("data: {v}\n\n"))
            } else {
                ("application/json", v.to_string())
            }
        }
    }
}

/// Anthropic's usage; for a model named `*cached*`, as its docs show a
/// request that read 900 tokens from the cache and wrote 100 (`input_tokens`
/// counts neither).
fn anthropic_usage(model: &str) -> Value {
    if model.contains("cached") {
        json!({"input_tokens": 10, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 900, "output_tokens": 1})
    } else {
        json!({"input_tokens": 5, "output_tokens": 1})
    }
}

async fn answer(req: Request<hyper::body::Incoming>, seen: Seen) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    seen.lock().unwrap().push((path.clone(), json.clone()));
    let wire = wire_of(&path);
    let model = json["model"].as_str().map(str::to_string).unwrap_or_else(|| {
        path.split("/models/")
            .nth(1)
            .and_then(|r| r.split(':').next())
            .unwrap_or("unknown")
            .to_string()
    });
    let mut resp = Response::builder();
    let (status, content_type, text) = match error_answer(wire, &model) {
        Some((status, v)) => {
            if model == "rate" && wire != Wire::Gemini {
                resp = resp.header("retry-after", "7");
            }
            (status, "application/json", v.to_string())
        }
        None => {
            let stream = json["stream"].as_bool().unwrap_or(false) || path.contains(":streamGenerateContent");
            let (ct, text) = normal_answer(wire, &model, stream);
            (200, ct, text)
        }
    };
    Ok(resp
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(text)))
        .unwrap())
}

const CLIENTS: [&str; 3] = ["openai", "anthropic", "gemini"];
const UPSTREAMS: [&str; 4] = ["openai", "anthropic", "gemini", "compat"];

/// Routes `/{client}-{upstream}/…` in the client's format to each upstream
/// (no key pools: a 429 cools no key), with a chained `model_map`.
async fn gateway(up: &Canned) -> Gateway {
    let u = &up.url;
    let config = format!(
        "upstreams:\n  openai: {{provider: openai, endpoints: ['{u}']}}\n  anthropic: {{provider: anthropic, endpoints: ['{u}']}}\n  gemini: {{provider: gemini, endpoints: ['{u}']}}\n  compat: {{provider: openai_compatible, endpoints: ['{u}']}}\n"
    );
    let mut routes = String::from("routes:\n");
    for c in CLIENTS {
        for t in UPSTREAMS.into_iter().filter(|t| *t != c) {
            let path = match c {
                "openai" => format!("/{c}-{t}/v1/chat/completions"),
                "anthropic" => format!("/{c}-{t}/v1/messages"),
                _ => format!("/{c}-{t}/v1beta/{{*rest}}"),
            };
            routes.push_str(&format!(
                "  - {{ name: {c}-{t}, match: {{ path: '{path}' }}, format: {c}, auth: none, upstream: {t}, retries: 0, model_map: {{m-a: m-b, m-b: m-c}}, transform: {{ strip_prefix: /{c}-{t} }} }}\n"
            ));
        }
    }
    Gateway::start(&config, &[("r.yaml", &routes)]).await
}

/// A minimal chat request of `client`'s format for `model`.
fn chat(client: &str, to: &str, model: &str, stream: bool) -> (String, Value) {
    let prefix = format!("/{client}-{to}");
    match client {
        "openai" => (
            format!("{prefix}/v1/chat/completions"),
            json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}),
        ),
        "anthropic" => (
            format!("{prefix}/v1/messages"),
            json!({"model": model, "stream": stream, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}),
        ),
        _ => {
            let op = if stream {
                "streamGenerateContent?alt=sse"
            } else {
                "generateContent"
            };
            (
                format!("{prefix}/v1beta/models/{model}:{op}"),
                json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}),
            )
        }
    }
}

struct Answer {
    status: u16,
    retry_after: Option<String>,
    warning: String,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }
}

async fn post(gw: &Gateway, path: &str, body: &Value) -> Answer {
    let r = reqwest::Client::new()
        .post(gw.url(path))
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap();
    let header = |n: &str| r.headers().get(n).map(|v| v.to_str().unwrap().to_string());
    let (status, retry_after, warning) = (r.status().as_u16(), header("retry-after"), header("x-fastgate-warning"));
    Answer {
        status,
        retry_after,
        warning: warning.unwrap_or_default(),
        text: r.text().await.unwrap(),
    }
}

/// The code a client acts on, read its own way: (status, code).
fn client_code(client: &str, a: &Answer) -> (u16, String) {
    let v = a.json();
    let code = match client {
        "openai" => v["error"]["code"].as_str(),
        "anthropic" => v["error"]["type"].as_str(),
        _ => v["error"]["status"].as_str(),
    };
    (a.status, code.unwrap_or_default().to_string())
}

/// Every converting (client, upstream) pair, whole and streamed.
fn pairs() -> Vec<(&'static str, &'static str, bool)> {
    let mut out = Vec::new();
    for client in CLIENTS {
        for to in ["openai", "anthropic", "gemini"].into_iter().filter(|t| *t != client) {
            for stream in [false, true] {
                out.push((client, to, stream));
            }
        }
    }
    out
}

#[tokio::test]
async fn a_context_overflow_keeps_its_code_and_counts_for_every_client() {
    let up = Canned::start().await;
    let gw = gateway(&up).await;
    for (client, to, stream) in pairs() {
        let what = format!("{client} client <- {to} upstream, stream {stream}");
        let (path, body) = chat(client, to, "ctx", stream);
        let a = post(&gw, &path, &body).await;
        let v = a.json();
        match client {
            "openai" => {
                assert_eq!(
                    client_code(client, &a),
                    (400, "context_length_exceeded".into()),
                    "{what}: {v}"
                );
                assert!(
                    v["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("maximum context length is 128000 tokens"),
                    "{what}: {v}"
                );
            }
            // Claude Code compacts on exactly this message.
            "anthropic" => {
                assert_eq!(client_code(client, &a), (400, "invalid_request_error".into()), "{what}");
                assert_eq!(
                    v["error"]["message"], "prompt is too long: 130532 tokens > 128000 maximum",
                    "{what}"
                );
            }
            _ => {
                assert_eq!(client_code(client, &a), (400, "INVALID_ARGUMENT".into()), "{what}");
                assert_eq!(
                    v["error"]["message"],
                    "The input token count (130532) exceeds the maximum number of tokens allowed (128000).",
                    "{what}"
                );
            }
        }
    }
}

#[tokio::test]
async fn an_exhausted_quota_or_credit_is_not_a_rate_limit() {
    let up = Canned::start().await;
    let gw = gateway(&up).await;
    for (client, to, stream) in pairs() {
        let (path, body) = chat(client, to, "quota", stream);
        let a = post(&gw, &path, &body).await;
        let want = match client {
            "openai" => (429, "insufficient_quota"),
            "anthropic" => (402, "billing_error"),
            _ => (429, "RESOURCE_EXHAUSTED"),
        };
        assert_eq!(
            client_code(client, &a),
            (want.0, want.1.to_string()),
            "{client} <- {to}, stream {stream}: {}",
            a.text
        );
    }
}

#[tokio::test]
async fn a_rate_limit_stays_one_with_its_retry_after() {
    let up = Canned::start().await;
    let gw = gateway(&up).await;
    for (client, to, stream) in pairs() {
        let what = format!("{client} <- {to}, stream {stream}");
        let (path, body) = chat(client, to, "rate", stream);
        let a = post(&gw, &path, &body).await;
        let want = match client {
            "openai" => "rate_limit_exceeded",
            "anthropic" => "rate_limit_error",
            _ => "RESOURCE_EXHAUSTED",
        };
        assert_eq!(client_code(client, &a), (429, want.to_string()), "{what}: {}", a.text);
        // Gemini's wait is in the body (RetryInfo 6.2 s, rounded up); the
        // others send the header (7).
        assert_eq!(a.retry_after.as_deref(), Some("7"), "{what}");
    }
}

#[tokio::test]
async fn geminis_bad_key_answer_is_an_authentication_error_for_other_clients() {
    let up = Canned::start().await;
    let gw = gateway(&up).await;
    // Gemini answers a bad key with 400 INVALID_ARGUMENT (reason API_KEY_INVALID).
    for (client, want) in [("openai", "invalid_api_key"), ("anthropic", "authentication_error")] {
        let (path, body) = chat(client, "gemini", "badkey", false);
        let a = post(&gw, &path, &body).await;
        assert_eq!(client_code(client, &a), (401, want.to_string()), "{}", a.text);
    }
}

fn claude_code_tools() -> Vec<Value> {
    let v: Value = serde_json::from_str(include_str!("fixtures/conversion/claude_code_tools.json")).unwrap();
    v["tools"].as_array().unwrap().clone()
}

#[tokio::test]
async fn tool_schemas_reach_gemini_in_a_form_it_takes_with_their_meaning() {
    let up = Canned::start().await;
    let gw = gateway(&up).await;
    let (path, mut body) = chat("anthropic", "gemini", "gemini-2.5-pro", false);
    body["tools"] = Value::Array(claude_code_tools());
    let a = post(&gw, &path, &body).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let (_, seen) = up.last();
    let decls = seen["tools"][0]["functionDeclarations"].as_array().unwrap();
    let decl = |name: &str| decls.iter().find(|d| d["name"] == name).unwrap()["parameters"].clone();
    let fetch = decl("WebFetch");
    assert_eq!(
        fetch["properties"]["url"],
        json!({"type": "string", "description": "The URL to fetch content from (format: uri)"}),
        "Gemini refuses format uri; its meaning stays: {fetch}"
    );
    assert!(fetch.get("$schema").is_none() && fetch.get("additionalProperties").is_none());
    let mcp = decl("mcp__tracker__create_issue");
    let link = &mcp["properties"]["links"]["items"];
    assert_eq!(link["type"], "object", "a $ref is resolved, never {{}}: {mcp}");
    assert_eq!(link["properties"]["url"]["type"], "string");
    assert!(
        mcp["properties"]["labels"]["description"]
            .as_str()
            .unwrap()
            .contains(r#"each value: {"type":"string"}"#),
        "{mcp}"
    );
    assert_eq!(mcp["required"], json!(["title", "assignee"]));
    assert!(!seen.to_string().contains("\"$ref\""), "{seen}");
}

#[tokio::test]
async fn thinking_toward_anthropic_relaxes_forced_tools_and_sampling() {
    let up = Canned::start().await;
    let gw = gateway(&up).await;
    // An OpenAI client reasoning with a forced tool and a low top_p.
    let (path, mut body) = chat("openai", "anthropic", "claude-sonnet-4-5", false);
    body["reasoning_effort"] = json!("high");
    body["temperature"] = json!(0.3);
    body["top_p"] = json!(0.5);
    body["tools"] = json!([{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    body["tool_choice"] = json!("required");
    let a = post(&gw, &path, &body).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let (_, seen) = up.last();
    assert_eq!(seen["thinking"]["type"], "enabled", "{seen}");
    assert_eq!(seen["tool_choice"], json!({"type": "auto"}), "{seen}");
    assert_eq!(seen["top_p"], 0.95, "{seen}");
    assert!(seen.get("temperature").is_none(), "{seen}");
    assert!(
        a.warning.contains("tool_choice") && a.warning.contains("top_p"),
        "{}",
        a.warning
    );
    // A named tool while thinking (a Gemini client asks ANY with one name).
    let (path, mut body) = chat("gemini", "anthropic", "claude-sonnet-4-5", false);
    body["generationConfig"] = json!({"thinkingConfig": {"thinkingBudget": 2048}});
    body["tools"] = json!([{"functionDeclarations": [{"name": "weather", "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}}}]}]);
    body["toolConfig"] = json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["weather"]}});
    let a = post(&gw, &path, &body).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let (_, seen) = up.last();
    assert_eq!(seen["thinking"]["budget_tokens"], 2048, "{seen}");
    assert_eq!(seen["tool_choice"], json!({"type": "auto"}), "{seen}");
}

#[tokio::test]
async fn temperature_and_top_p_together_reach_anthropic_as_one() {
    let up = Canned::start().await;
    let gw = gateway(&up).await;
    // Gemini CLI sends temperature and topP together: Anthropic gets one.
    let (path, mut body) = chat("gemini", "anthropic", "claude-sonnet-4-5", false);
    body["generationConfig"] = json!({"temperature": 0.2, "topP": 0.9});
    let a = post(&gw, &path, &body).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let (_, seen) = up.last();
    assert_eq!(seen["temperature"], 0.2, "{seen}");
    assert!(seen.get("top_p").is_none(), "{seen}");
    assert!(a.warning.contains("top_p"), "{}", a.warning);
}

#[tokio::test]
async fn model_map_applies_once_and_answers_name_the_clients_model() {
    let up = Canned::start().await;
    let gw = gateway(&up).await;
    // The route maps m-a -> m-b and m-b -> m-c: applied once, m-a becomes m-b.
    for (client, to) in [
        ("anthropic", "openai"),
        ("openai", "anthropic"),
        ("openai", "gemini"),
        ("gemini", "anthropic"),
    ] {
        for stream in [false, true] {
            let what = format!("{client} -> {to}, stream {stream}");
            let (path, body) = chat(client, to, "m-a", stream);
            let a = post(&gw, &path, &body).await;
            assert_eq!(a.status, 200, "{what}: {}", a.text);
            let (seen_path, seen) = up.last();
            let upstream_model = seen["model"].as_str().map(str::to_string).unwrap_or_else(|| {
                seen_path
                    .split("/models/")
                    .nth(1)
                    .unwrap()
                    .split(':')
                    .next()
                    .unwrap()
                    .to_string()
            });
            assert_eq!(upstream_model, "m-b", "{what}: {seen_path} {seen}");
            // The answer names the model the client asked for.
            let named: Vec<String> = if stream {
                a.text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                    .filter_map(|v| {
                        v["model"]
                            .as_str()
                            .or_else(|| v["message"]["model"].as_str())
                            .or_else(|| v["modelVersion"].as_str())
                            .map(str::to_string)
                    })
                    .collect()
            } else {
                let v = a.json();
                vec![
                    v["model"]
                        .as_str()
                        .or_else(|| v["modelVersion"].as_str())
                        .unwrap()
                        .to_string(),
                ]
            };
            assert!(
                !named.is_empty() && named.iter().all(|m| m == "m-a"),
                "{what}: {named:?} {}",
                a.text
            );
        }
    }
}

#[tokio::test]
async fn system_blocks_stay_apart() {
    let up = Canned::start().await;
    let gw = gateway(&up).await;
    // Claude Code's system blocks stay apart: never "You are Claude Code.Be terse."
    let (path, mut body) = chat("anthropic", "openai", "gpt-4.1", false);
    body["system"] = json!([{"type": "text", "text": "You are Claude Code."}, {"type": "text", "text": "Be terse."}]);
    assert_eq!(post(&gw, &path, &body).await.status, 200);
    let (_, seen) = up.last();
    assert_eq!(
        seen["messages"][0],
        json!({"role": "system", "content": "You are Claude Code."}),
        "{seen}"
    );
    assert_eq!(
        seen["messages"][1],
        json!({"role": "system", "content": "Be terse."}),
        "{seen}"
    );
    let (path, mut body) = chat("gemini", "anthropic", "claude-sonnet-4-5", false);
    body["systemInstruction"] = json!({"parts": [{"text": "You are Gemini CLI."}, {"text": "Be terse."}]});
    assert_eq!(post(&gw, &path, &body).await.status, 200);
    let (_, seen) = up.last();
    assert_eq!(seen["system"][0]["text"], "You are Gemini CLI.\n\nBe terse.", "{seen}");
}

#[tokio::test]
async fn geminis_validated_mode_does_not_force_a_call() {
    let up = Canned::start().await;
    let gw = gateway(&up).await;
    let (path, mut body) = chat("gemini", "openai", "gpt-4.1", false);
    body["tools"] = json!([{"functionDeclarations": [{"name": "weather", "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}}}]}]);
    body["toolConfig"] = json!({"functionCallingConfig": {"mode": "VALIDATED"}});
    let a = post(&gw, &path, &body).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let (_, seen) = up.last();
    assert_eq!(seen["tool_choice"], "auto", "{seen}");
    assert!(a.warning.contains("VALIDATED"), "{}", a.warning);
}

#[tokio::test]
async fn gemini_inline_data_reaches_anthropic_only_as_documents_it_takes() {
    let up = Canned::start().await;
    let gw = gateway(&up).await;
    // A PDF stays a document, plain text becomes a text document, audio is
    // dropped and reported.
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let (path, mut body) = chat("gemini", "anthropic", "claude-sonnet-4-5", false);
    body["contents"] = json!([{"role": "user", "parts": [
        {"text": "read these"},
        {"inlineData": {"mimeType": "application/pdf", "data": b64("%PDF-1.4")}},
        {"inlineData": {"mimeType": "text/plain", "data": b64("notes: ship it")}},
        {"inlineData": {"mimeType": "audio/mpeg", "data": b64("ID3")}}
    ]}]);
    let a = post(&gw, &path, &body).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let (_, seen) = up.last();
    let blocks = seen["messages"][0]["content"].as_array().unwrap();
    assert_eq!(blocks.len(), 3, "{seen}");
    assert_eq!(blocks[1]["source"]["media_type"], "application/pdf");
    assert_eq!(
        blocks[2]["source"],
        json!({"type": "text", "media_type": "text/plain", "data": "notes: ship it"})
    );
    assert!(a.warning.contains("audio/mpeg"), "{}", a.warning);
}

#[tokio::test]
async fn openai_parameters_follow_the_upstream_and_model() {
    let up = Canned::start().await;
    let gw = gateway(&up).await;
    // max_completion_tokens and reasoning_effort go only to OpenAI's reasoning
    // models; compatible servers and other models get max_tokens.
    for (to, model, reasoning) in [
        ("compat", "deepseek-r1", false),
        ("openai", "gpt-4.1", false),
        ("openai", "o3", true),
    ] {
        let (path, mut body) = chat("anthropic", to, model, false);
        body["max_tokens"] = json!(4096);
        body["thinking"] = json!({"type": "enabled", "budget_tokens": 2048});
        let a = post(&gw, &path, &body).await;
        assert_eq!(a.status, 200, "{}", a.text);
        let (_, seen) = up.last();
        if reasoning {
            assert_eq!(seen["max_completion_tokens"], 4096, "{to} {model}: {seen}");
            assert_eq!(seen["reasoning_effort"], "low", "{to} {model}: {seen}");
            assert!(seen.get("max_tokens").is_none());
        } else {
            assert_eq!(seen["max_tokens"], 4096, "{to} {model}: {seen}");
            assert!(seen.get("max_completion_tokens").is_none(), "{to} {model}: {seen}");
            assert!(seen.get("reasoning_effort").is_none(), "{to} {model}: {seen}");
            assert!(a.warning.contains("reasoning_effort"), "{}", a.warning);
        }
    }
}

#[tokio::test]
async fn gemini_function_responses_answer_the_call_the_upstream_saw() {
    let up = Canned::start().await;
    let gw = gateway(&up).await;
    let tools = json!([{"functionDeclarations": [{"name": "weather", "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}}}]}]);
    // The response's id matches no call (a client that made its own up), or
    // the call had none: the result answers the call by name and order.
    for (call_id, response_id) in [
        (Some("toolu_1"), Some("not-a-call")),
        (None, Some("call-x")),
        (Some("toolu_1"), Some("toolu_1")),
    ] {
        let mut call = json!({"name": "weather", "args": {"city": "Paris"}});
        if let Some(id) = call_id {
            call["id"] = id.into();
        }
        let mut response = json!({"name": "weather", "response": {"result": "sunny"}});
        if let Some(id) = response_id {
            response["id"] = id.into();
        }
        for to in ["anthropic", "openai"] {
            let what = format!("{to}: call {call_id:?}, response {response_id:?}");
            let (path, mut body) = chat("gemini", to, "m-1", false);
            body["tools"] = tools.clone();
            body["contents"] = json!([
                {"role": "user", "parts": [{"text": "weather in Paris?"}]},
                {"role": "model", "parts": [{"functionCall": call}]},
                {"role": "user", "parts": [{"functionResponse": response}]}
            ]);
            let a = post(&gw, &path, &body).await;
            assert_eq!(a.status, 200, "{what}: {}", a.text);
            let (_, seen) = up.last();
            let (used, answered) = if to == "anthropic" {
                (
                    seen["messages"][1]["content"][0]["id"].clone(),
                    seen["messages"][2]["content"][0]["tool_use_id"].clone(),
                )
            } else {
                (
                    seen["messages"][1]["tool_calls"][0]["id"].clone(),
                    seen["messages"][2]["tool_call_id"].clone(),
                )
            };
            assert!(used.is_string(), "{what}: {seen}");
            assert_eq!(answered, used, "{what}: {seen}");
            if let Some(id) = call_id {
                assert_eq!(used, id, "{what}");
            }
        }
    }
}

#[tokio::test]
async fn the_capability_table_and_an_upstreams_own_rules_decide_what_is_sent() {
    let up = Canned::start().await;
    let u = &up.url;
    let config = format!(
        "upstreams:\n  gem: {{provider: gemini, endpoints: ['{u}'], capabilities: [{{match: 'gemini-3*', parameters_json_schema: true}}]}}\n  ant: {{provider: anthropic, endpoints: ['{u}']}}\n  compat: {{provider: openai_compatible, endpoints: ['{u}'], capabilities: [{{match: 'deepseek-r*', reasoning: true}}]}}\n"
    );
    let routes = "routes:\n  - { name: a-gem, match: { path: '/a-gem/v1/messages' }, format: anthropic, auth: none, upstream: gem, retries: 0, transform: { strip_prefix: /a-gem } }\n  - { name: g-ant, match: { path: '/g-ant/v1beta/{*rest}' }, format: gemini, auth: none, upstream: ant, retries: 0, transform: { strip_prefix: /g-ant } }\n  - { name: a-compat, match: { path: '/a-compat/v1/messages' }, format: anthropic, auth: none, upstream: compat, retries: 0, transform: { strip_prefix: /a-compat } }\n";
    let gw = Gateway::start(&config, &[("r.yaml", routes)]).await;
    // Gemini: whole JSON Schema where the upstream says its model takes it.
    let webfetch = claude_code_tools()
        .into_iter()
        .find(|t| t["name"] == "WebFetch")
        .unwrap();
    for (model, whole) in [("gemini-3-pro-preview", true), ("gemini-2.5-pro", false)] {
        let body = json!({"model": model, "max_tokens": 64, "tools": [webfetch], "messages": [{"role": "user", "content": "hi"}]});
        let a = post(&gw, "/a-gem/v1/messages", &body).await;
        assert_eq!(a.status, 200, "{}", a.text);
        let (_, seen) = up.last();
        let decl = &seen["tools"][0]["functionDeclarations"][0];
        if whole {
            assert_eq!(
                decl["parametersJsonSchema"]["properties"]["url"]["format"], "uri",
                "{decl}"
            );
            assert!(decl.get("parameters").is_none() && decl["parametersJsonSchema"].get("$schema").is_none());
        } else {
            assert!(decl.get("parametersJsonSchema").is_none(), "{decl}");
            assert!(
                decl["parameters"]["properties"]["url"].get("format").is_none(),
                "{decl}"
            );
        }
    }
    // Anthropic: older models take temperature and top_p together.
    for (model, pair) in [("claude-3-7-sonnet-latest", true), ("claude-sonnet-4-5", false)] {
        let body = json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": {"temperature": 0.2, "topP": 0.9}});
        let a = post(&gw, &format!("/g-ant/v1beta/models/{model}:generateContent"), &body).await;
        assert_eq!(a.status, 200, "{}", a.text);
        let (_, seen) = up.last();
        assert_eq!(seen["temperature"], 0.2, "{model}: {seen}");
        assert_eq!(seen.get("top_p").is_some(), pair, "{model}: {seen}");
    }
    // An OpenAI-compatible server whose reasoning model the operator names.
    for (model, reasoning) in [("deepseek-r1", true), ("deepseek-chat", false)] {
        let body = json!({"model": model, "max_tokens": 4096, "thinking": {"type": "enabled", "budget_tokens": 2048}, "messages": [{"role": "user", "content": "hi"}]});
        let a = post(&gw, "/a-compat/v1/messages", &body).await;
        assert_eq!(a.status, 200, "{}", a.text);
        let (_, seen) = up.last();
        assert_eq!(seen.get("reasoning_effort").is_some(), reasoning, "{model}: {seen}");
        assert_eq!(
            seen.get("max_completion_tokens").is_some(),
            reasoning,
            "{model}: {seen}"
        );
    }
}

#[tokio::test]
async fn openai_reasoning_models_get_only_the_default_sampling() {
    let up = Canned::start().await;
    let gw = gateway(&up).await;
    for (model, reasoning) in [("o3", true), ("gpt-5", true), ("gpt-4.1", false)] {
        let body = json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": {"temperature": 0.3, "topP": 0.5, "presencePenalty": 0.2}});
        let a = post(
            &gw,
            &format!("/gemini-openai/v1beta/models/{model}:generateContent"),
            &body,
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.text);
        let (_, seen) = up.last();
        for field in ["temperature", "top_p", "presence_penalty"] {
            assert_eq!(seen.get(field).is_none(), reasoning, "{model} {field}: {seen}");
            // OpenAI answers 400 to a reasoning model given them: say so.
            assert_eq!(a.warning.contains(field), reasoning, "{model}: {}", a.warning);
        }
    }
    // The default value is no loss: sent nowhere, and no warning.
    let body = json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": {"temperature": 1, "topP": 1}});
    let a = post(&gw, "/gemini-openai/v1beta/models/o3:generateContent", &body).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(up.last().1.get("temperature").is_none());
    assert!(!a.warning.contains("temperature"), "{}", a.warning);
}

/// Codex (Responses), OpenAI and Gemini clients cannot place Anthropic's
/// `cache_control`; FastGate does, where Anthropic's prompt-caching docs
/// put them (tools, then system, then the conversation), and gives the
/// cache's usage back in each client's own fields.
#[tokio::test]
async fn clients_of_other_formats_get_anthropics_prompt_cache() {
    let up = Canned::start().await;
    let u = &up.url;
    let config = format!(
        "upstreams:\n  ant: {{provider: anthropic, endpoints: ['{u}']}}\n  nocache: {{provider: anthropic, endpoints: ['{u}'], capabilities: [{{match: '*', prompt_cache: false}}]}}\n"
    );
    let routes = "routes:\n  - { name: o-ant, match: { path: '/o-ant/v1/chat/completions' }, format: openai, auth: none, upstream: ant, retries: 0, transform: { strip_prefix: /o-ant } }\n  - { name: r-ant, match: { path: '/r-ant/v1/responses' }, format: responses, auth: none, upstream: ant, retries: 0, transform: { strip_prefix: /r-ant } }\n  - { name: o-no, match: { path: '/o-no/v1/chat/completions' }, format: openai, auth: none, upstream: nocache, retries: 0, transform: { strip_prefix: /o-no } }\n";
    let gw = Gateway::start(&config, &[("r.yaml", routes)]).await;
    let tool = |name: &str| json!({"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}});
    let ephemeral = json!({"type": "ephemeral"});

    // One user turn: tools and system are marked, the lone turn is not
    // (a one-off request would pay the cache write for nothing).
    let first = json!({"model": "claude-cached", "tools": [tool("read"), tool("write")], "messages": [
        {"role": "system", "content": "You are Codex."},
        {"role": "user", "content": "hi"}]});
    let a = post(&gw, "/o-ant/v1/chat/completions", &first).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let (_, seen) = up.last();
    assert!(seen["tools"][0].get("cache_control").is_none(), "{seen}");
    assert_eq!(seen["tools"][1]["cache_control"], ephemeral, "{seen}");
    assert_eq!(seen["system"][0]["text"], "You are Codex.");
    assert_eq!(seen["system"][0]["cache_control"], ephemeral, "{seen}");
    assert!(
        seen["messages"][0]["content"][0].get("cache_control").is_none(),
        "{seen}"
    );
    // Usage: OpenAI counts cached tokens inside prompt_tokens.
    let v = a.json();
    assert_eq!(v["usage"]["prompt_tokens"], 1010, "{v}");
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 900, "{v}");
    assert_eq!(v["usage"]["total_tokens"], 1011, "{v}");

    // A conversation that goes on: its last block is a breakpoint too.
    let more = json!({"model": "claude-cached", "tools": [tool("read")], "messages": [
        {"role": "system", "content": "You are Codex."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "read", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "file text"}]});
    let a = post(&gw, "/o-ant/v1/chat/completions", &more).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let (_, seen) = up.last();
    let last = seen["messages"].as_array().unwrap().last().unwrap().clone();
    let block = last["content"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(block["type"], "tool_result", "{seen}");
    assert_eq!(block["cache_control"], ephemeral, "{seen}");
    let marks = seen.to_string().matches("cache_control").count();
    assert!(marks <= 4, "Anthropic allows four breakpoints: {marks}");

    // Streamed, through the Responses API (Codex): cached tokens in
    // input_tokens_details.
    let body = json!({"model": "claude-cached", "instructions": "You are Codex.", "input": "hi", "stream": true, "store": false});
    let a = post(&gw, "/r-ant/v1/responses", &body).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(up.last().1["system"][0]["cache_control"], ephemeral);
    let done = a
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|e| e["type"] == "response.completed")
        .expect("a completed event");
    let usage = &done["response"]["usage"];
    assert_eq!(usage["input_tokens"], 1010, "{usage}");
    assert_eq!(usage["input_tokens_details"]["cached_tokens"], 900, "{usage}");

    // An empty system prompt is not sent: an empty block cannot carry a
    // breakpoint (Anthropic: "cache_control cannot be set for empty text
    // blocks"), and says nothing anyway.
    for system in ["", "  "] {
        let body = json!({"model": "claude-cached", "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": ""}]});
        let a = post(&gw, "/o-ant/v1/chat/completions", &body).await;
        assert_eq!(a.status, 200, "{}", a.text);
        let (_, seen) = up.last();
        assert!(seen.get("system").is_none(), "{seen}");
        for m in seen["messages"].as_array().unwrap() {
            for b in m["content"].as_array().into_iter().flatten() {
                let empty = b["type"] == "text" && b["text"].as_str().is_some_and(|t| t.trim().is_empty());
                assert!(!(empty && b.get("cache_control").is_some()), "{seen}");
            }
        }
    }

    // The operator can turn it off per upstream (or model).
    let a = post(&gw, "/o-no/v1/chat/completions", &more).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let (_, seen) = up.last();
    assert!(!seen.to_string().contains("cache_control"), "{seen}");
    assert_eq!(seen["system"], "You are Codex.");
}

/// A client's `max_tokens` over the model's most output (Claude Code asks
/// 32,000 of any model; gpt-4o answers 400 above 16,384) is lowered to it,
/// with the thinking budget kept inside it; models the capability table
/// does not list are left alone.
#[tokio::test]
async fn max_tokens_over_the_models_output_is_lowered_to_it() {
    let up = Canned::start().await;
    let gw = gateway(&up).await;
    for (to, model, field, want) in [
        ("openai", "gpt-4o", "max_tokens", 16_384),
        ("openai", "o3", "max_completion_tokens", 32_000),
        ("anthropic", "claude-3-5-haiku-latest", "max_tokens", 8_192),
        ("compat", "llama-3.1-70b", "max_tokens", 32_000),
    ] {
        let path = if to == "anthropic" {
            "/gemini-anthropic/v1beta/models/"
        } else {
            ""
        };
        let a = if path.is_empty() {
            let (path, mut body) = chat("anthropic", to, model, false);
            body["max_tokens"] = json!(32_000);
            post(&gw, &path, &body).await
        } else {
            let body = json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 32000}});
            post(&gw, &format!("{path}{model}:generateContent"), &body).await
        };
        assert_eq!(a.status, 200, "{}", a.text);
        let (_, seen) = up.last();
        assert_eq!(seen[field], want, "{to} {model}: {seen}");
        assert_eq!(
            a.warning.contains("max_tokens 32000 lowered"),
            want < 32_000,
            "{}",
            a.warning
        );
    }
    // No max_tokens from the client: Anthropic's default stays within the model.
    let body = json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]});
    let a = post(
        &gw,
        "/gemini-anthropic/v1beta/models/claude-3-haiku-20240307:generateContent",
        &body,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(up.last().1["max_tokens"], 4_096);
    // Thinking: the budget and the answer both fit in the model's output.
    let body = json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 8000, "thinkingConfig": {"thinkingBudget": 30000}}});
    let a = post(
        &gw,
        "/gemini-anthropic/v1beta/models/claude-opus-4-1:generateContent",
        &body,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let (_, seen) = up.last();
    assert_eq!(seen["max_tokens"], 32_000, "{seen}");
    let budget = seen["thinking"]["budget_tokens"].as_u64().unwrap();
    assert!((1024..32_000).contains(&budget), "{seen}");
    assert!(a.warning.contains("thinking budget 30000 lowered"), "{}", a.warning);
}

/// Numbers a client's API refuses (a string, a fraction, a negative, past
/// the range or past u64) are refused in the client's error shape before
/// any upstream call: read as absent they would turn a client's
/// `"max_tokens": "100"` into the default 8,192 billed tokens.
#[tokio::test]
async fn sampling_numbers_out_of_the_clients_api_are_refused_not_ignored() {
    let up = Canned::start().await;
    let gw = gateway(&up).await;
    let calls = || up.seen.lock().unwrap().len();
    let bad = [json!(-1), json!("100"), json!(100.5), json!(1e20), json!(0)];
    for (client, to) in [
        ("openai", "anthropic"),
        ("anthropic", "openai"),
        ("gemini", "anthropic"),
    ] {
        for value in &bad {
            let (path, mut body) = chat(client, to, "m-x", false);
            match client {
                "gemini" => body["generationConfig"] = json!({"maxOutputTokens": value}),
                _ => body["max_tokens"] = value.clone(),
            }
            let before = calls();
            let a = post(&gw, &path, &body).await;
            assert_eq!(a.status, 400, "{client} max_tokens {value}: {}", a.text);
            assert_eq!(calls(), before, "no upstream call for {client} {value}");
            let v = a.json();
            let message = match client {
                "gemini" => {
                    assert_eq!(v["error"]["status"], "INVALID_ARGUMENT", "{v}");
                    v["error"]["message"].as_str().unwrap().to_string()
                }
                "anthropic" => {
                    assert_eq!(v["type"], "error", "{v}");
                    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
                    v["error"]["message"].as_str().unwrap().to_string()
                }
                _ => {
                    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
                    v["error"]["message"].as_str().unwrap().to_string()
                }
            };
            assert!(message.contains("max"), "{message}");
        }
        // Temperature and top_p outside the client's own range.
        let (temperature, top_p) = match client {
            "anthropic" => ("temperature", "top_p"),
            "gemini" => ("temperature", "topP"),
            _ => ("temperature", "top_p"),
        };
        for (field, value) in [
            (temperature, json!(-3)),
            (temperature, json!("hot")),
            (top_p, json!(1.5)),
        ] {
            let (path, mut body) = chat(client, to, "m-x", false);
            match client {
                "gemini" => body["generationConfig"] = json!({field: value}),
                _ => body[field] = value.clone(),
            }
            let a = post(&gw, &path, &body).await;
            assert_eq!(a.status, 400, "{client} {field} {value}: {}", a.text);
        }
        // In range, and null (absent), still pass.
        let (path, mut body) = chat(client, to, "m-x", false);
        match client {
            "gemini" => body["generationConfig"] = json!({"maxOutputTokens": 100, temperature: 0.5, top_p: null}),
            _ => {
                body["max_tokens"] = json!(100);
                body[temperature] = json!(0.5);
                body[top_p] = Value::Null;
            }
        }
        let a = post(&gw, &path, &body).await;
        assert_eq!(a.status, 200, "{client}: {}", a.text);
    }
}
