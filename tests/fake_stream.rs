//! `fake_stream: true` through the real gateway: clients that ask to stream
//! get their stream header and a keepalive at once while a slow upstream
//! (which answers only whole, after 2.5 s) is asked without streaming, then
//! the whole answer as a well-formed stream of their own format — OpenAI
//! chat, Anthropic, Gemini SSE and Responses clients, toward OpenAI(-
//! compatible), Anthropic and Gemini upstreams. Also: an upstream error after the
//! header, a retry after the header, and a route without the option.
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
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

/// How long the mock upstream thinks before its whole answer.
const THINK: Duration = Duration::from_millis(2500);

/// A provider that answers whole and slowly (streams, asked for, come at
/// once: the route without the option).
struct SlowUpstream {
    addr: SocketAddr,
    /// (path and query, `accept` header, body) of every request.
    seen: Arc<Mutex<Vec<(String, String, Value)>>>,
    /// Answer every request with this status (0: answer normally).
    fail: Arc<AtomicU16>,
    /// Answer this many requests with 429 first.
    fail_429: Arc<AtomicU32>,
}

const TEXT: &str = "Sunny in Paris.";

fn openai_answer() -> Value {
    json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "up-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": TEXT,
            "tool_calls": [{"id": "call_w1", "type": "function",
                "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30}})
}

fn anthropic_answer() -> Value {
    json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "up-model",
        "content": [{"type": "text", "text": TEXT},
            {"type": "tool_use", "id": "toolu_w1", "name": "weather", "input": {"city": "Paris"}}],
        "stop_reason": "tool_use", "stop_sequence": null,
        "usage": {"input_tokens": 21, "output_tokens": 9}})
}

fn gemini_answer() -> Value {
    json!({"candidates": [{"content": {"role": "model", "parts": [{"text": TEXT},
            {"functionCall": {"name": "weather", "args": {"city": "Paris"}}}]},
        "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 21, "candidatesTokenCount": 9, "totalTokenCount": 30},
        "modelVersion": "up-model"})
}

fn openai_stream() -> String {
    [
        r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"streamed"},"finish_reason":null}]}"#,
        r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
        r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#,
        "[DONE]",
    ]
    .iter()
    .map(|d| format!("data: {d}\n\n"))
    .collect()
}

fn json_response(status: u16, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

impl SlowUpstream {
    async fn start() -> SlowUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let fail = Arc::new(AtomicU16::new(0));
        let fail_429 = Arc::new(AtomicU32::new(0));
        let (s, f, f429) = (seen.clone(), fail.clone(), fail_429.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (s, f, f429) = (s.clone(), f.clone(), f429.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (s, f, f429) = (s.clone(), f.clone(), f429.clone());
                        async move {
                            let uri = req.uri().to_string();
                            let accept = req
                                .headers()
                                .get("accept")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            s.lock().unwrap().push((uri.clone(), accept, body.clone()));
                            let anthropic = uri.starts_with("/v1/messages");
                            let gemini = uri.starts_with("/v1beta/");
                            if uri.contains(":streamGenerateContent") {
                                return Ok::<_, Infallible>(json_response(
                                    400,
                                    json!({"error": {"code": 400, "message": "this mock answers Gemini whole only", "status": "INVALID_ARGUMENT"}}),
                                ));
                            }
                            if body["stream"] == true {
                                // Streams (the route without the option) at once.
                                let text = if anthropic { anthropic_stream() } else { openai_stream() };
                                return Ok::<_, Infallible>(
                                    Response::builder()
                                        .header("content-type", "text/event-stream")
                                        .body(Full::new(Bytes::from(text)))
                                        .unwrap(),
                                );
                            }
                            if f429
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                                .is_ok()
                            {
                                let mut r = json_response(
                                    429,
                                    json!({"error": {"message": "slow down", "type": "rate_limit_error", "code": "rate_limit_exceeded"}}),
                                );
                                r.headers_mut().insert("retry-after", "1".parse().unwrap());
                                return Ok(r);
                            }
                            tokio::time::sleep(THINK).await;
                            let status = f.load(Ordering::SeqCst);
                            if status != 0 {
                                let body = if gemini {
                                    json!({"error": {"code": 500, "message": "the model crashed", "status": "INTERNAL"}})
                                } else if anthropic {
                                    json!({"type": "error", "error": {"type": "api_error", "message": "the model crashed"}})
                                } else {
                                    json!({"error": {"message": "the model crashed", "type": "server_error"}})
                                };
                                return Ok(json_response(status, body));
                            }
                            Ok(json_response(
                                200,
                                match (gemini, anthropic) {
                                    (true, _) => gemini_answer(),
                                    (_, true) => anthropic_answer(),
                                    _ => openai_answer(),
                                },
                            ))
                        }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
                });
            }
        });
        SlowUpstream {
            addr,
            seen,
            fail,
            fail_429,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests whose body or path names `model`.
    fn seen_for(&self, model: &str) -> Vec<(String, String, Value)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(uri, _, body)| body["model"] == model || uri.contains(model))
            .cloned()
            .collect()
    }
}

fn anthropic_stream() -> String {
    [
        ("message_start", json!({"type": "message_start", "message": {"id": "msg_s", "type": "message", "role": "assistant", "model": "m", "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 3, "output_tokens": 0}}})),
        ("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})),
        ("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "streamed"}})),
        ("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
        ("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 1}})),
        ("message_stop", json!({"type": "message_stop"})),
    ]
    .iter()
    .map(|(e, d)| format!("event: {e}\ndata: {d}\n\n"))
    .collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Client {
    Openai,
    Anthropic,
    Gemini,
    Responses,
}

const CLIENTS: [Client; 4] = [Client::Openai, Client::Anthropic, Client::Gemini, Client::Responses];

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::Openai => "openai",
            Client::Anthropic => "anthropic",
            Client::Gemini => "gemini",
            Client::Responses => "responses",
        }
    }

    fn route_path(self) -> &'static str {
        match self {
            Client::Openai => "/v1/chat/completions",
            Client::Anthropic => "/v1/messages",
            Client::Gemini => "/v1beta/{*rest}",
            Client::Responses => "/v1/responses",
        }
    }
}

/// Upstreams: `oai` (OpenAI), `compat` (OpenAI-compatible: Responses
/// clients are converted toward it, while OpenAI itself serves them
/// natively), `ant` (Anthropic) and `gem` (Gemini), all the slow mock. Routes
/// `/fs-{client}-{up}` with the option (keepalive every second),
/// `/plain-{client}-{up}` without.
async fn gateway(up: &SlowUpstream, extra: &str) -> Gateway {
    let u = up.url();
    let config = format!(
        "upstreams:\n  oai: {{provider: openai, endpoints: ['{u}']}}\n  compat: {{provider: openai_compatible, endpoints: ['{u}']}}\n  ant: {{provider: anthropic, endpoints: ['{u}']}}\n  gem: {{provider: gemini, endpoints: ['{u}']}}\n{extra}"
    );
    let mut routes = String::from("routes:\n");
    for c in CLIENTS {
        for to in ["oai", "ant", "gem"] {
            let to = if c == Client::Responses && to == "oai" {
                "compat"
            } else {
                to
            };
            let (name, path) = (c.name(), c.route_path());
            for (kind, option) in [("fs", ", fake_stream: true, fake_stream_keepalive: 1s"), ("plain", "")] {
                routes.push_str(&format!(
                    "  - {{ name: {kind}-{name}-{to}, match: {{ path: '/{kind}-{name}-{to}{path}' }}, format: {name}, auth: none, upstream: {to}, transform: {{ strip_prefix: /{kind}-{name}-{to} }}{option} }}\n"
                ));
            }
        }
    }
    Gateway::start(&config, &[("r.yaml", &routes)]).await
}

/// The request a client sends, asking to stream, naming `model`.
fn request(gw: &Gateway, kind: &str, c: Client, to: &str, model: &str) -> reqwest::RequestBuilder {
    let prefix = match kind {
        "" => String::new(),
        _ => format!("/{kind}-{}-{to}", c.name()),
    };
    let tools_openai = json!([{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let (path, body) = match c {
        Client::Openai => (
            "/v1/chat/completions".to_string(),
            json!({"model": model, "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 100,
                "messages": [{"role": "user", "content": "weather?"}], "tools": tools_openai}),
        ),
        Client::Anthropic => (
            "/v1/messages".to_string(),
            json!({"model": model, "stream": true, "max_tokens": 100,
                "messages": [{"role": "user", "content": "weather?"}],
                "tools": [{"name": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]}),
        ),
        Client::Gemini => (
            format!("/v1beta/models/{model}:streamGenerateContent?alt=sse"),
            json!({"contents": [{"role": "user", "parts": [{"text": "weather?"}]}],
                "tools": [{"functionDeclarations": [{"name": "weather", "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}}}]}]}),
        ),
        Client::Responses => (
            "/v1/responses".to_string(),
            json!({"model": model, "stream": true, "input": "weather?",
                "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]}),
        ),
    };
    let mut r = reqwest::Client::new()
        .post(gw.url(&format!("{prefix}{path}")))
        .json(&body);
    if c == Client::Anthropic {
        r = r.header("anthropic-version", "2023-06-01");
    }
    r
}

/// What a client received: when its first bytes and its end came, the
/// request id, and the raw body.
struct Received {
    status: u16,
    content_type: String,
    request_id: String,
    first: Duration,
    total: Duration,
    body: String,
}

async fn receive(req: reqwest::RequestBuilder) -> Received {
    let started = Instant::now();
    let mut resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (content_type, request_id) = (header("content-type"), header("x-request-id"));
    let mut first = None;
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        first.get_or_insert(started.elapsed());
        body.extend_from_slice(&chunk);
    }
    Received {
        status,
        content_type,
        request_id,
        first: first.unwrap_or(Duration::MAX),
        total: started.elapsed(),
        body: String::from_utf8(body).unwrap(),
    }
}

/// SSE events as (event name, data), comments and blank keepalives
/// counted apart (the grammar per the WHATWG SSE spec: a line starting
/// with ':' is a comment; a blank line ends an event).
fn sse(body: &str) -> (Vec<(Option<String>, String)>, usize) {
    let mut events = Vec::new();
    let mut keepalives = 0;
    for block in body.split("\n\n") {
        let mut name = None;
        let mut data = Vec::new();
        for line in block.lines() {
            if line.starts_with(':') {
                keepalives += 1;
            } else if let Some(n) = line.strip_prefix("event: ") {
                name = Some(n.to_string());
            } else if let Some(d) = line.strip_prefix("data: ") {
                data.push(d);
            } else if !line.is_empty() {
                panic!("not an SSE line: {line:?} in {body}");
            }
        }
        if !data.is_empty() {
            events.push((name, data.join("\n")));
        }
    }
    (events, keepalives)
}

fn parse(data: &str) -> Value {
    serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"))
}

/// Check the client's stream against its format's grammar, returning the
/// text and the tool call (name, arguments as JSON) it tells.
fn check_grammar(c: Client, r: &Received, min_keepalives: usize) -> (String, String, Value) {
    let (events, comments) = sse(&r.body);
    let mut text = String::new();
    let (mut tool, mut args) = (String::new(), String::new());
    match c {
        Client::Openai => {
            assert!(
                comments >= min_keepalives,
                "keepalive comments at once and every second: {}",
                r.body
            );
            assert_eq!(events.last().unwrap().1, "[DONE]", "{}", r.body);
            let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|(_, d)| parse(d)).collect();
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant", "role first");
            let finishes: Vec<&Value> = chunks
                .iter()
                .filter_map(|c| c["choices"].get(0).map(|x| &x["finish_reason"]))
                .filter(|f| !f.is_null())
                .collect();
            assert_eq!(finishes, [&json!("tool_calls")], "one finish reason");
            let usage = chunks.last().unwrap();
            assert_eq!(usage["choices"], json!([]), "the usage chunk last (include_usage)");
            assert_eq!(usage["usage"]["prompt_tokens"], 21);
            for ch in &chunks {
                let d = &ch["choices"][0]["delta"];
                text.push_str(d["content"].as_str().unwrap_or_default());
                if let Some(call) = d["tool_calls"].get(0) {
                    assert_eq!(call["index"], 0);
                    tool.push_str(call["function"]["name"].as_str().unwrap_or_default());
                    args.push_str(call["function"]["arguments"].as_str().unwrap_or_default());
                }
            }
        }
        Client::Anthropic => {
            let pings = events.iter().filter(|(n, _)| n.as_deref() == Some("ping")).count();
            assert!(
                pings >= min_keepalives,
                "ping events at once and every second: {}",
                r.body
            );
            let events: Vec<(String, Value)> = events
                .into_iter()
                .filter(|(n, _)| n.as_deref() != Some("ping"))
                .map(|(n, d)| (n.unwrap_or_default(), parse(&d)))
                .collect();
            let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(
                names,
                [
                    "message_start",
                    "content_block_start",
                    "content_block_delta",
                    "content_block_stop",
                    "content_block_start",
                    "content_block_delta",
                    "content_block_stop",
                    "message_delta",
                    "message_stop"
                ],
                "{}",
                r.body
            );
            for (n, v) in &events {
                assert_eq!(v["type"], n.as_str(), "the event line names the data's type");
            }
            assert_eq!(events[1].1["index"], 0);
            assert_eq!(events[4].1["index"], 1, "indices rise by one");
            text = events[2].1["delta"]["text"].as_str().unwrap().to_string();
            tool = events[4].1["content_block"]["name"].as_str().unwrap().to_string();
            args = events[5].1["delta"]["partial_json"].as_str().unwrap().to_string();
            assert_eq!(events[7].1["delta"]["stop_reason"], "tool_use");
            assert_eq!(events[7].1["usage"]["output_tokens"], 9);
        }
        Client::Gemini => {
            // Blank lines keep it alive: no comment line (the Python SDK
            // would parse it as JSON).
            assert_eq!(comments, 0, "{}", r.body);
            assert!(r.body.starts_with("\n\n"), "a keepalive first: {:?}", r.body);
            let chunks: Vec<Value> = events.iter().map(|(_, d)| parse(d)).collect();
            for ch in &chunks {
                for p in ch["candidates"][0]["content"]["parts"].as_array().unwrap() {
                    text.push_str(p["text"].as_str().unwrap_or_default());
                    if let Some(call) = p.get("functionCall") {
                        tool = call["name"].as_str().unwrap().to_string();
                        args = call["args"].to_string();
                    }
                }
            }
            let last = chunks.last().unwrap();
            assert_eq!(last["candidates"][0]["finishReason"], "STOP");
            assert_eq!(last["usageMetadata"]["promptTokenCount"], 21);
        }
        Client::Responses => {
            assert!(comments >= min_keepalives, "keepalive comments: {}", r.body);
            let events: Vec<(String, Value)> = events
                .into_iter()
                .map(|(n, d)| (n.unwrap_or_default(), parse(&d)))
                .collect();
            for (i, (n, v)) in events.iter().enumerate() {
                assert_eq!(v["type"], n.as_str());
                assert_eq!(v["sequence_number"], i, "sequence numbers count from 0");
            }
            let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names[..2], ["response.created", "response.in_progress"]);
            assert_eq!(*names.last().unwrap(), "response.completed", "{names:?}");
            for (n, v) in &events {
                match n.as_str() {
                    "response.output_text.delta" => text.push_str(v["delta"].as_str().unwrap()),
                    "response.output_item.done" if v["item"]["type"] == "function_call" => {
                        tool = v["item"]["name"].as_str().unwrap().to_string();
                        args = v["item"]["arguments"].as_str().unwrap().to_string();
                    }
                    _ => {}
                }
            }
            let done = &events.last().unwrap().1["response"];
            assert_eq!(done["usage"]["input_tokens"], 21);
        }
    }
    let args: Value = serde_json::from_str(&args).unwrap_or_else(|e| panic!("{e}: {args:?}"));
    (text, tool, args)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_client_format_gets_keepalives_at_once_then_the_whole_answer_as_its_stream() {
    let up = SlowUpstream::start().await;
    let gw = gateway(&up, "").await;
    let mut cases = Vec::new();
    for c in CLIENTS {
        for to in ["oai", "ant", "gem"] {
            let to = if c == Client::Responses && to == "oai" {
                "compat"
            } else {
                to
            };
            cases.push((c, to));
        }
    }
    // All at once: each waits for the slow upstream.
    let received = futures_util::future::join_all(cases.iter().map(|&(c, to)| {
        let model = format!("case-{}-{to}", c.name());
        let req = request(&gw, "fs", c, to, &model);
        async move { receive(req).await }
    }))
    .await;
    for (&(c, to), r) in cases.iter().zip(&received) {
        let case = format!("{} client, {to} upstream", c.name());
        assert_eq!(r.status, 200, "{case}: {}", r.body);
        assert_eq!(r.content_type, "text/event-stream", "{case}");
        // (b) the first bytes long before the answer.
        assert!(
            r.first < Duration::from_millis(1500),
            "{case}: first bytes after {:?}",
            r.first
        );
        assert!(r.total >= THINK, "{case}: the answer took {:?}", r.total);
        // (a) the upstream was asked once, without streaming.
        let seen = up.seen_for(&format!("case-{}-{to}", c.name()));
        assert_eq!(seen.len(), 1, "{case}: {seen:?}");
        let (uri, accept, body) = &seen[0];
        assert_ne!(body["stream"], true, "{case}: {body}");
        assert!(body.get("stream_options").is_none(), "{case}: {body}");
        assert!(!accept.contains("event-stream"), "{case}: accept {accept}");
        assert!(!uri.contains("stream"), "{case}: {uri}");
        // (c) the stream in the client's grammar, text and call whole.
        let (text, tool, args) = check_grammar(c, r, 2);
        assert_eq!(text, TEXT, "{case}");
        assert_eq!(tool, "weather", "{case}");
        assert_eq!(args, json!({"city": "Paris"}), "{case}");
    }
    // Usage from the upstream's whole answer, the request a stream.
    let ids: Vec<String> = received.iter().map(|r| r.request_id.clone()).collect();
    let rows = gw.wait_audit_ids(&ids).await;
    for id in &ids {
        let row = rows.iter().find(|r| &r.request_id == id).unwrap();
        assert_eq!(row.status, 200, "{row:?}");
        assert!(row.stream, "{row:?}");
        assert_eq!(
            (row.prompt_tokens, row.completion_tokens),
            (Some(21), Some(9)),
            "{row:?}"
        );
        assert!(!row.usage_estimated, "{row:?}");
        assert!(row.error.is_none(), "{row:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_error_after_the_header_ends_the_stream_with_the_clients_error_event() {
    let up = SlowUpstream::start().await;
    up.fail.store(500, Ordering::SeqCst);
    let gw = gateway(&up, "").await;
    let cases = [
        (Client::Openai, "oai"),
        (Client::Anthropic, "oai"),
        (Client::Openai, "ant"),
        (Client::Anthropic, "ant"),
        (Client::Gemini, "ant"),
        (Client::Responses, "ant"),
        (Client::Openai, "gem"),
        (Client::Gemini, "gem"),
    ];
    let received = futures_util::future::join_all(cases.iter().map(|&(c, to)| {
        let req = request(&gw, "fs", c, to, &format!("err-{}-{to}", c.name()));
        async move {
            tokio::time::timeout(Duration::from_secs(20), receive(req))
                .await
                .unwrap()
        }
    }))
    .await;
    for (&(c, to), r) in cases.iter().zip(&received) {
        let case = format!("{} client, {to} upstream", c.name());
        assert_eq!(r.status, 200, "{case}: the header went out first");
        assert!(r.first < Duration::from_millis(1500), "{case}");
        let (events, _) = sse(&r.body);
        let events: Vec<(Option<String>, Value)> = events
            .into_iter()
            .filter(|(n, _)| n.as_deref() != Some("ping"))
            .map(|(n, d)| (n, parse(&d)))
            .collect();
        // Nothing but the error (for Responses clients, after the
        // response's opening events): no half answer.
        let opening = if c == Client::Responses { 2 } else { 0 };
        assert_eq!(events.len(), opening + 1, "{case}: {}", r.body);
        let (name, v) = &events[opening];
        match c {
            Client::Anthropic => {
                assert_eq!(name.as_deref(), Some("error"));
                assert_eq!(v["error"]["type"], "api_error", "{v}");
            }
            Client::Responses => {
                assert_eq!(name.as_deref(), Some("response.failed"));
                assert_eq!(v["response"]["error"]["code"], "server_error", "{v}");
            }
            Client::Gemini => assert_eq!(v["error"]["code"], 500, "{v}"),
            Client::Openai => assert_eq!(v["error"]["type"], "server_error", "{v}"),
        }
        assert!(
            r.body.contains("the model crashed"),
            "{case}: the upstream's message: {}",
            r.body
        );
    }
    let ids: Vec<String> = received.iter().map(|r| r.request_id.clone()).collect();
    let rows = gw.wait_audit_ids(&ids).await;
    for id in &ids {
        let row = rows.iter().find(|r| &r.request_id == id).unwrap();
        let error = row.error.as_deref().unwrap_or_default();
        assert!(error.contains("500") && error.contains("the model crashed"), "{row:?}");
        assert_eq!(row.completion_tokens.unwrap_or(0), 0, "nothing billed: {row:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limited_attempt_after_the_header_is_retried_on_another_key() {
    let up = SlowUpstream::start().await;
    up.fail_429.store(1, Ordering::SeqCst);
    let u = up.url();
    let config = format!(
        "upstreams:\n  oai: {{provider: openai, endpoints: ['{u}'], key_pool: p}}\nkey_pools:\n  p: {{keys: [sk-one, sk-two]}}\n"
    );
    let routes = "routes:\n  - { name: r, match: { path: /v1/messages }, format: anthropic, auth: none, upstream: oai, retries: 2, fake_stream: true }\n";
    let gw = Gateway::start(&config, &[("r.yaml", routes)]).await;
    let r = receive(request(&gw, "", Client::Anthropic, "", "retried")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.first < Duration::from_millis(1500));
    let seen = up.seen_for("retried");
    assert_eq!(seen.len(), 2, "one 429, then the answer: {seen:?}");
    // Keepalives every 5 s by default: the one sent at once.
    let (text, tool, _) = check_grammar(Client::Anthropic, &r, 1);
    assert_eq!((text.as_str(), tool.as_str()), (TEXT, "weather"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_without_the_option_streams_through() {
    let up = SlowUpstream::start().await;
    let gw = gateway(&up, "").await;
    for (c, to) in [
        (Client::Openai, "oai"),
        (Client::Anthropic, "oai"),
        (Client::Anthropic, "ant"),
    ] {
        let model = format!("plain-{}-{to}", c.name());
        let r = receive(request(&gw, "plain", c, to, &model)).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let seen = up.seen_for(&model);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].2["stream"], true, "asked to stream: {:?}", seen[0]);
        assert!(r.body.contains("streamed"), "{}", r.body);
        assert!(!r.body.contains("keepalive") && !r.body.contains("ping"), "{}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_timeout_after_the_header_ends_the_stream_with_an_error_event() {
    let up = SlowUpstream::start().await;
    let u = up.url();
    let config = format!("upstreams:\n  oai: {{provider: openai, endpoints: ['{u}']}}\n");
    // The route's timeout is shorter than the upstream's thinking.
    let routes = "routes:\n  - { name: r, match: { path: /v1/messages }, format: anthropic, auth: none, upstream: oai, timeout: 1s, fake_stream: true }\n";
    let gw = Gateway::start(&config, &[("r.yaml", routes)]).await;
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        receive(request(&gw, "", Client::Anthropic, "", "timed-out")),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.first < Duration::from_millis(900),
        "a ping before the timeout: {:?}",
        r.first
    );
    assert!(r.total < THINK, "ended by the timeout, not the answer: {:?}", r.total);
    let (events, _) = sse(&r.body);
    let names: Vec<&str> = events.iter().filter_map(|(n, _)| n.as_deref()).collect();
    assert_eq!(names, ["ping", "error"], "{}", r.body);
    let error = parse(&events[1].1);
    assert_eq!(error["type"], "error");
    assert!(
        error["error"]["message"].as_str().unwrap().contains("did not respond"),
        "{error}"
    );
    let rows = gw.wait_audit_ids([&r.request_id]).await;
    let row = rows.iter().find(|row| row.request_id == r.request_id).unwrap();
    assert!(
        row.error.as_deref().unwrap_or_default().contains("did not respond"),
        "{row:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gemini_json_array_client_gets_whitespace_then_a_whole_array() {
    let up = SlowUpstream::start().await;
    let gw = gateway(&up, "").await;
    let r = receive(
        reqwest::Client::new()
            .post(gw.url("/fs-gemini-ant/v1beta/models/array-case:streamGenerateContent"))
            .json(&json!({"contents": [{"role": "user", "parts": [{"text": "weather?"}]}]})),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type, "application/json");
    assert!(r.first < Duration::from_millis(1500), "{:?}", r.first);
    assert!(
        r.body.starts_with("\n\n"),
        "whitespace keepalives before '[': {:?}",
        r.body
    );
    let chunks: Vec<Value> = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body));
    let texts: String = chunks
        .iter()
        .flat_map(|c| {
            c["candidates"][0]["content"]["parts"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|p| p["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(texts, TEXT);
    assert!(
        chunks
            .iter()
            .any(|c| c["candidates"][0]["content"]["parts"][0]["functionCall"]["name"] == "weather")
    );
    assert_eq!(up.seen_for("array-case")[0].0, "/v1/messages");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_hangs_up_during_the_keepalives_is_recorded_and_not_answered() {
    let up = SlowUpstream::start().await;
    let gw = gateway(&up, "").await;
    let mut resp = request(&gw, "fs", Client::Openai, "oai", "hung-up")
        .send()
        .await
        .unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let first = resp.chunk().await.unwrap().unwrap();
    assert_eq!(&first[..], b": keepalive\n\n");
    drop(resp);
    let rows = gw.wait_audit_ids([&id]).await;
    let row = rows.iter().find(|r| r.request_id == id).unwrap();
    assert_eq!(row.status, 499, "{row:?}");
    assert!(
        row.duration_ms < THINK.as_millis() as f64,
        "ended when the client left, not at the answer: {row:?}"
    );
    // The hang-up may even come before the request reached the upstream.
    assert!(up.seen_for("hung-up").len() <= 1, "never retried");
}
