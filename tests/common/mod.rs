//! Test harness: a recording mock upstream speaking the providers' wire
//! formats, and the real `fastgate` binary started on ephemeral ports.
#![allow(dead_code, clippy::unwrap_used)]

pub mod fault_proxy;
pub mod shapes;
pub mod tls;

#[allow(unused_imports)]
pub use fault_proxy::{Fault, FaultProxy};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, body::Frame, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::net::TcpListener;

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: HashMap<String, String>,
    pub body: Bytes,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// How the mock treats requests made with one upstream key, like a real
/// provider treats a key that is rate-limited, revoked or overloaded.
#[derive(Debug)]
pub enum KeyRule {
    /// 429 with `Retry-After: secs` (and the provider's error body).
    RateLimited { retry_after: u32 },
    /// Answer every request with this status (401, 403, 500, 529 ...).
    Status(u16),
    /// 429 (no `Retry-After`, as Gemini does) for one model only.
    ModelLimited { model: String },
    /// Accept the request and never answer.
    Hang,
    /// Start a stream, send two events, then drop the connection.
    CutMidStream,
    /// A window of `limit` requests: every answer carries the OpenAI
    /// `x-ratelimit-*-requests` headers; over the limit, 429.
    Window {
        limit: u32,
        used: AtomicU32,
        reset: &'static str,
    },
}

/// Apply `rule` to every request, whatever its key (the rule is cloned
/// per known key header value at request time).
pub fn rule_all(mock: &MockUpstream, rule: KeyRule) {
    *mock.behaviour.every_key.lock().unwrap() = Some(rule);
}

/// Knobs a test can turn on the mock upstream.
#[derive(Default)]
pub struct Behaviour {
    /// Rules by upstream key (the bearer, `x-api-key` or `x-goog-api-key`).
    pub keys: Mutex<HashMap<String, KeyRule>>,
    /// A rule for requests with any key.
    pub every_key: Mutex<Option<KeyRule>>,
    /// Answer this many requests with 429 before answering normally.
    pub fail_429: AtomicU32,
    /// Interval between SSE events in milliseconds.
    pub sse_interval_ms: AtomicU32,
    /// Set when a streamed response could not be completed (client went away).
    pub stream_aborted: AtomicBool,
    /// Answer 401 to any request carrying this header with this value (a
    /// client header naming an account the key does not belong to, as
    /// `OpenAI-Organization` does).
    pub refuse_header: Mutex<Option<(String, String)>>,
    /// A test's own answers (see [`script`]); checked before every rule.
    pub script: Mutex<Option<Script>>,
    /// Send the first half of a (sized, uncompressed) JSON answer, then
    /// drop the connection: a non-stream body cut mid-way.
    pub cut_json_body: AtomicBool,
    /// Never send an OpenAI stream's usage chunk, even when asked (a proxy
    /// in front of the provider that strips it, or a provider that omits it).
    pub no_usage: AtomicBool,
    /// A provider's awkward answer to replay (see [`shapes::can`]).
    pub canned: Mutex<Option<shapes::Canned>>,
}

pub struct MockUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub behaviour: Arc<Behaviour>,
}

/// A body error makes hyper drop the connection mid-body (a cut stream).
type Body = BoxBody<Bytes, std::io::Error>;

fn full(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()).map_err(|e: Infallible| match e {}).boxed())
        .unwrap()
}

fn sse(events: Vec<String>, interval: Duration, aborted: Arc<Behaviour>) -> Response<Body> {
    sse_cut(events, interval, aborted, None)
}

/// An SSE answer; with `cut_after`, the connection drops after that many events.
fn sse_cut(
    events: Vec<String>,
    interval: Duration,
    aborted: Arc<Behaviour>,
    cut_after: Option<usize>,
) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    tokio::spawn(async move {
        for (i, e) in events.into_iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(interval).await;
            }
            if cut_after == Some(i) {
                let _ = tx.send(Err(std::io::Error::other("cut mid-stream"))).await;
                return;
            }
            if tx.send(Ok(Frame::data(Bytes::from(e)))).await.is_err() {
                aborted.stream_aborted.store(true, Ordering::SeqCst);
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

/// The coding a provider's CDN would pick from the client's `Accept-Encoding`.
fn pick_encoding(accept: Option<&str>) -> Option<&'static str> {
    let offered: Vec<String> = accept?
        .split(',')
        .map(|e| e.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .collect();
    ["br", "gzip", "zstd", "deflate"]
        .into_iter()
        .find(|e| offered.iter().any(|o| o == e))
}

pub fn compress(encoding: &str, data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    match encoding {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        "deflate" => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        "br" => {
            let mut out = Vec::new();
            let mut e = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
            e.write_all(data).unwrap();
            drop(e);
            out
        }
        "zstd" => zstd::encode_all(data, 3).unwrap(),
        other => panic!("no such coding {other}"),
    }
}

/// Like real providers, JSON answers are compressed when the client accepts it.
async fn handle(
    req: Request<hyper::body::Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    b: Arc<Behaviour>,
) -> Result<Response<Body>, Infallible> {
    let encoding = pick_encoding(req.headers().get("accept-encoding").and_then(|v| v.to_str().ok()));
    let cut = b.cut_json_body.load(Ordering::SeqCst);
    let resp = answer(req, seen, b).await?;
    if cut {
        return Ok(cut_in_half(resp).await);
    }
    let is_json = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let Some(encoding) = encoding.filter(|_| is_json) else {
        return Ok(resp);
    };
    let (mut parts, body) = resp.into_parts();
    let plain = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    parts.headers.insert("content-encoding", encoding.parse().unwrap());
    parts.headers.remove("content-length");
    Ok(Response::from_parts(
        parts,
        Full::new(Bytes::from(compress(encoding, &plain)))
            .map_err(|e: Infallible| match e {})
            .boxed(),
    ))
}

/// The upstream key a request carries, however its provider sends it.
fn upstream_key(headers: &hyper::HeaderMap) -> Option<String> {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    h("authorization")
        .and_then(|a| a.strip_prefix("Bearer ").map(str::to_string))
        .or_else(|| h("x-api-key"))
        .or_else(|| h("x-goog-api-key"))
}

/// The provider's error body for `status`, in its own shape.
fn provider_error(path: &str, status: u16, message: &str) -> String {
    if path.ends_with("/messages") {
        let kind = match status {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            529 => "overloaded_error",
            _ => "api_error",
        };
        serde_json::json!({"type":"error","error":{"type":kind,"message":message}}).to_string()
    } else if path.contains(":generateContent")
        || path.contains(":streamGenerateContent")
        || path.starts_with("/v1beta")
    {
        let st = match status {
            401 => "UNAUTHENTICATED",
            403 => "PERMISSION_DENIED",
            429 => "RESOURCE_EXHAUSTED",
            _ => "INTERNAL",
        };
        serde_json::json!({"error":{"code":status,"message":message,"status":st}}).to_string()
    } else {
        serde_json::json!({"error":{"message":message,"type":"requests","param":null,"code":status.to_string()}})
            .to_string()
    }
}

/// What a key rule makes of a request, if anything: an early answer, or
/// (for a window) headers to add to the normal one.
enum RuleOutcome {
    Answer(Response<Body>),
    Headers(Vec<(&'static str, String)>),
    Cut,
    Pass,
}

async fn apply_rule(b: &Behaviour, key: Option<&str>, path: &str, model: &str) -> RuleOutcome {
    let (limited, hang) = {
        let rules = b.keys.lock().unwrap();
        let every = b.every_key.lock().unwrap();
        let Some(rule) = key.and_then(|k| rules.get(k)).or(every.as_ref()) else {
            return RuleOutcome::Pass;
        };
        match rule {
            KeyRule::RateLimited { retry_after } => {
                let mut r = full(
                    429,
                    "application/json",
                    provider_error(path, 429, "Rate limit reached for requests"),
                );
                r.headers_mut()
                    .insert("retry-after", retry_after.to_string().parse().unwrap());
                return RuleOutcome::Answer(r);
            }
            KeyRule::Status(code) => {
                // Like OpenAI's 401: the message quotes the key it got.
                let message = match code {
                    401 => format!("Incorrect API key provided: {}", key.unwrap_or_default()),
                    _ => "as the rule says".to_string(),
                };
                return RuleOutcome::Answer(full(*code, "application/json", provider_error(path, *code, &message)));
            }
            KeyRule::ModelLimited { model: m } if m == model => (true, false),
            KeyRule::ModelLimited { .. } => return RuleOutcome::Pass,
            KeyRule::Hang => (false, true),
            KeyRule::CutMidStream => return RuleOutcome::Cut,
            KeyRule::Window { limit, used, reset } => {
                let n = used.fetch_add(1, Ordering::SeqCst) + 1;
                if n > *limit {
                    let mut r = full(
                        429,
                        "application/json",
                        provider_error(path, 429, "Rate limit reached for requests"),
                    );
                    r.headers_mut()
                        .insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
                    r.headers_mut()
                        .insert("x-ratelimit-reset-requests", reset.parse().unwrap());
                    return RuleOutcome::Answer(r);
                }
                return RuleOutcome::Headers(vec![
                    ("x-ratelimit-limit-requests", limit.to_string()),
                    ("x-ratelimit-remaining-requests", (limit - n).to_string()),
                    ("x-ratelimit-reset-requests", reset.to_string()),
                ]);
            }
        }
    };
    if hang {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if limited {
        // Gemini's own 429: the wait is in the body's RetryInfo, no header.
        let body = serde_json::json!({"error": {
            "code": 429,
            "message": "Resource has been exhausted (e.g. check quota).",
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests", "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "45s"}
            ]
        }});
        return RuleOutcome::Answer(full(429, "application/json", body.to_string()));
    }
    RuleOutcome::Pass
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    b: Arc<Behaviour>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let record = Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: body.clone(),
    };
    let arrival = {
        let mut seen = seen.lock().unwrap();
        seen.push(record);
        seen.len()
    };
    let path = parts.uri.path().to_string();
    let refused = b.refuse_header.lock().unwrap().as_ref().is_some_and(|(name, value)| {
        parts
            .headers
            .get(name.as_str())
            .is_some_and(|v| v.as_bytes() == value.as_bytes())
    });
    if refused {
        let message = "The organization in the OpenAI-Organization header does not match the API key";
        return Ok(full(401, "application/json", provider_error(&path, 401, message)));
    }
    let scripted = b.script.lock().unwrap().clone();
    if let Some(script) = scripted
        && let Some(answer) = script(upstream_key(&parts.headers), arrival).await
    {
        let mut r = full(
            answer.status,
            "application/json",
            provider_error(&path, answer.status, "as the script says"),
        );
        if answer.status == 200 {
            r = full(
                200,
                "application/json",
                r#"{"id":"s","object":"chat.completion","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
            );
        }
        for (k, v) in answer.headers {
            r.headers_mut().insert(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                hyper::header::HeaderValue::from_str(&v).unwrap(),
            );
        }
        return Ok(r);
    }
    if b.fail_429.load(Ordering::SeqCst) > 0 {
        b.fail_429.fetch_sub(1, Ordering::SeqCst);
        return Ok(full(
            429,
            "application/json",
            r#"{"error":{"message":"rate limited","type":"requests","code":"rate_limit_exceeded"}}"#,
        ));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        return Ok(full(
            code.parse().unwrap_or(500),
            "application/json",
            r#"{"error":{"message":"as asked"}}"#,
        ));
    }
    if path.ends_with("/hop") {
        // Headers named in `Connection` belong to this hop only.
        return Ok(Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .header("connection", "x-hop-secret")
            .header("x-hop-secret", "upstream-internal")
            .header("x-end-to-end", "kept")
            .body(
                Full::new(Bytes::from_static(b"{}"))
                    .map_err(|e: Infallible| match e {})
                    .boxed(),
            )
            .unwrap());
    }
    if path == "/slow" {
        tokio::time::sleep(Duration::from_secs(5)).await;
        return Ok(full(200, "application/json", "{}"));
    }
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let stream =
        json["stream"].as_bool().unwrap_or(false) || path.contains(":streamGenerateContent") || path.ends_with("/sse");
    if let Some(r) = shapes::answer(&b, stream) {
        return Ok(r);
    }
    let interval = Duration::from_millis(b.sse_interval_ms.load(Ordering::SeqCst) as u64);
    let gemini_model = path
        .split("/models/")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .map(str::to_string);
    let model = json["model"]
        .as_str()
        .map(str::to_string)
        .or(gemini_model)
        .unwrap_or_else(|| "upstream-model".to_string());
    let mut extra_headers = Vec::new();
    match apply_rule(&b, upstream_key(&parts.headers).as_deref(), &path, &model).await {
        RuleOutcome::Answer(r) => return Ok(r),
        RuleOutcome::Headers(h) => extra_headers = h,
        RuleOutcome::Cut => {
            let events = (0..5)
                .map(|i| format!("data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i}\"}}}}]}}\n\n"))
                .collect();
            return Ok(sse_cut(events, interval.max(Duration::from_millis(20)), b, Some(2)));
        }
        RuleOutcome::Pass => {}
    }
    let mut resp = answer_normally(&path, &json, stream, interval, &model, b);
    if extra_headers.is_empty() && resp.status() == 200 {
        // Like the real providers: every answer reports the key's allowance.
        extra_headers = if path.ends_with("/messages") {
            vec![
                ("anthropic-ratelimit-requests-limit", "1000".into()),
                ("anthropic-ratelimit-requests-remaining", "999".into()),
                ("anthropic-ratelimit-requests-reset", "2099-01-01T00:00:00Z".into()),
            ]
        } else if !path.contains("/models/") {
            vec![
                ("x-ratelimit-limit-requests", "10000".into()),
                ("x-ratelimit-remaining-requests", "9999".into()),
                ("x-ratelimit-reset-requests", "6ms".into()),
            ]
        } else {
            Vec::new()
        };
    }
    for (k, v) in extra_headers {
        resp.headers_mut().insert(k, v.parse().unwrap());
    }
    Ok(resp)
}

/// The tool to call when a request offers tools and is not already
/// answering a call (any of the three formats).
fn first_tool_name(json: &serde_json::Value) -> Option<String> {
    let answering = json["messages"].as_array().and_then(|m| m.last()).is_some_and(|m| {
        m["role"] == "tool"
            || m["content"]
                .as_array()
                .is_some_and(|c| c.iter().any(|b| b["type"] == "tool_result"))
    }) || json["contents"].as_array().and_then(|c| c.last()).is_some_and(|c| {
        c["parts"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p.get("functionResponse").is_some()))
    });
    if answering {
        return None;
    }
    let tools = json["tools"].as_array()?;
    let t = tools.first()?;
    t["function"]["name"]
        .as_str()
        .or_else(|| t["name"].as_str())
        .or_else(|| t["functionDeclarations"][0]["name"].as_str())
        .map(str::to_string)
}

/// What a healthy provider answers.
fn answer_normally(
    path: &str,
    json: &serde_json::Value,
    stream: bool,
    interval: Duration,
    model: &str,
    b: Arc<Behaviour>,
) -> Response<Body> {
    if path.ends_with("/messages") {
        if let Some(name) = first_tool_name(json) {
            if stream {
                let events = vec![
                    format!("event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"msg_2\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"{model}\",\"content\":[],\"usage\":{{\"input_tokens\":12,\"output_tokens\":1}}}}}}\n\n"),
                    format!("event: content_block_start\ndata: {{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"{name}\",\"input\":{{}}}}}}\n\n"),
                    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"city\\\": \"}}\n\n".into(),
                    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\\\"Paris\\\"}\"}}\n\n".into(),
                    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n".into(),
                    "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":7}}\n\n".into(),
                    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".into(),
                ];
                return sse(events, interval, b);
            }
            let out = serde_json::json!({"id":"msg_2","type":"message","role":"assistant","model":model,"content":[{"type":"tool_use","id":"toolu_1","name":name,"input":{"city":"Paris"}}],"stop_reason":"tool_use","usage":{"input_tokens":12,"output_tokens":7}});
            return full(200, "application/json", out.to_string());
        }
        if stream {
            let events = vec![
                format!("event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"{model}\",\"content\":[],\"usage\":{{\"input_tokens\":12,\"output_tokens\":1}}}}}}\n\n"),
                "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n".into(),
                "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":3}}\n\n".into(),
                "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".into(),
            ];
            return sse(events, interval, b);
        }
        let out = serde_json::json!({"id":"msg_1","type":"message","role":"assistant","model":model,"content":[{"type":"text","text":"Hi"}],"stop_reason":"end_turn","usage":{"input_tokens":12,"output_tokens":3}});
        return full(200, "application/json", out.to_string());
    }
    if path.contains(":generateContent") || path.contains(":streamGenerateContent") {
        let tool = first_tool_name(json);
        let chunk = |i: u64, last: bool| {
            let part = match (&tool, last) {
                (Some(name), true) => serde_json::json!({"functionCall": {"name": name, "args": {"city": "Paris"}}}),
                _ => serde_json::json!({"text": "Hi"}),
            };
            let mut c = serde_json::json!({"candidates":[{"content":{"parts":[part],"role":"model"},"index":0}],"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":i + 1,"totalTokenCount":i + 6},"modelVersion":model,"responseId":"resp-1"});
            if last {
                c["candidates"][0]["finishReason"] = "STOP".into();
            }
            c
        };
        if stream {
            // Like Gemini: the finish reason on the last chunk only.
            let events = (0..5).map(|i| format!("data: {}\n\n", chunk(i, i == 4))).collect();
            return sse(events, interval, b);
        }
        return full(200, "application/json", chunk(0, true).to_string());
    }
    // OpenAI-style default, with OpenAI's rules.
    if !json["stream_options"].is_null() && !stream {
        return full(
            400,
            "application/json",
            r#"{"error":{"message":"The 'stream_options' parameter is only allowed when 'stream' is enabled.","type":"invalid_request_error","param":"stream_options","code":null}}"#,
        );
    }
    if let Some(name) = first_tool_name(json) {
        if stream {
            let events = vec![
                format!("data: {{\"id\":\"c2\",\"object\":\"chat.completion.chunk\",\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{{\"name\":\"{name}\",\"arguments\":\"\"}}}}]}},\"finish_reason\":null}}]}}\n\n"),
                "data: {\"id\":\"c2\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\":\"}}]},\"finish_reason\":null}]}\n\n".into(),
                "data: {\"id\":\"c2\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\" \\\"Paris\\\"}\"}}]},\"finish_reason\":null}]}\n\n".into(),
                "data: {\"id\":\"c2\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n".into(),
                "data: {\"id\":\"c2\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":6,\"total_tokens\":15}}\n\n".into(),
                "data: [DONE]\n\n".into(),
            ];
            return sse(events, interval, b);
        }
        let out = serde_json::json!({"id":"c2","object":"chat.completion","model":model,"choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":name,"arguments":"{\"city\": \"Paris\"}"}}]},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":9,"completion_tokens":6,"total_tokens":15}});
        return full(200, "application/json", out.to_string());
    }
    if stream {
        let mut events: Vec<String> = (0..5)
            .map(|i| format!("data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i}\"}},\"finish_reason\":null}}]}}\n\n"))
            .collect();
        if json["stream_options"]["include_usage"] == serde_json::Value::Bool(true)
            && !b.no_usage.load(Ordering::SeqCst)
        {
            events.push(format!("data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"{model}\",\"choices\":[],\"usage\":{{\"prompt_tokens\":9,\"completion_tokens\":5,\"total_tokens\":14}}}}\n\n"));
        }
        events.push("data: [DONE]\n\n".into());
        return sse(events, interval, b);
    }
    let out = serde_json::json!({"id":"c1","object":"chat.completion","model":model,"choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10},"upstream_port_echo":true});
    full(200, "application/json", out.to_string())
}

impl MockUpstream {
    pub async fn start() -> MockUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let behaviour = Arc::new(Behaviour::default());
        let (s, b) = (seen.clone(), behaviour.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (s, b) = (s.clone(), b.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(req, s.clone(), b.clone()));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        MockUpstream { addr, seen, behaviour }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.seen().last().cloned().expect("the upstream saw no request")
    }

    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

/// Whether the server came up on its ports; false if it exited (a port clash).
async fn wait_ready(child: &mut Child, port: u16, admin_port: u16, log: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    // A restart appends to the same log: only this child's lines count.
    let start = std::fs::metadata(log).map_or(0, |m| m.len() as usize);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        // The admin service logs a failed bind and the server runs on
        // without it: that is a clash too, so retry on other ports.
        let ours = std::fs::read(log).map(|l| l.get(start..).map(|t| t.to_vec()).unwrap_or_default());
        if ours.is_ok_and(|l| String::from_utf8_lossy(&l).contains("in use")) {
            let _ = child.kill();
            return false;
        }
        // Another test's server may hold a port this one failed to bind:
        // ready means *this* child owns both listening sockets.
        if listens_on(child.id(), port) && listens_on(child.id(), admin_port) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "gateway did not start:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// Start the server `make` builds for a (proxy port, admin port) pair until
/// it owns both: a port free a moment ago may be taken by the time the server
/// binds it (tests run in parallel). Its stderr goes to `log`.
pub async fn spawn_listening(log: &Path, make: impl Fn(u16, u16) -> Command) -> (Child, u16, u16) {
    for _ in 0..5 {
        let (port, admin_port) = (free_port(), free_port());
        let mut child = make(port, admin_port)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        if wait_ready(&mut child, port, admin_port, log).await {
            return (child, port, admin_port);
        }
        let logs = std::fs::read_to_string(log).unwrap_or_default();
        assert!(logs.contains("in use"), "gateway did not start:\n{logs}");
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("no free ports after five tries");
}

/// Whether process `pid` holds the socket listening on 127.0.0.1:`port`
/// (Linux: the socket's inode in /proc/net/tcp among the process's fds).
fn listens_on(pid: u32, port: u16) -> bool {
    let local = format!("0100007F:{port:04X}");
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() > 9 && f[1] == local && f[3] == "0A").then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}

/// `fastgate check -c CONFIG` run in `cwd`: (exit 0, stdout, stderr).
pub fn check(config: &Path, cwd: &Path) -> (bool, String, String) {
    let out = Command::new(bin())
        .args(["check", "-c"])
        .arg(config)
        .current_dir(cwd)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The bootstrap admin's password in every test gateway.
pub const ADMIN_PASSWORD: &str = "test-admin-password";

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_fastgate")
}

/// A running `fastgate serve` with its own config, routes.d and database.
/// The log filter test gateways run with.
const DEFAULT_LOG: &str = "info,fastgate=debug";

pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub admin_port: u16,
    pub child: Child,
    pub log: PathBuf,
}

impl Gateway {
    /// `config` is the YAML after the `server:`/`database:`/`routes_dir:` keys,
    /// which the harness fills in; `routes` are (file name, YAML) pairs.
    pub async fn start(config: &str, routes: &[(&str, &str)]) -> Gateway {
        Self::start_inner(config, routes, "", "", DEFAULT_LOG, None, &[]).await
    }

    /// Like `start`, on a copy of `seed`'s database (gateway keys, users):
    /// the nodes of one cluster share their keys this way in tests.
    /// `config` may start with an `admin:` block, as for `start_with_admin`.
    pub async fn start_seeded(config: &str, routes: &[(&str, &str)], seed: &Gateway) -> Gateway {
        let (admin_keys, config) = split_admin(config);
        Self::start_inner(config, routes, admin_keys, "", DEFAULT_LOG, Some(&seed.db_path()), &[]).await
    }

    /// Like `start`, with `server:` keys (indented by two spaces, such as
    /// `  tls: ...`) added to the harness's server block.
    pub async fn start_with_server(server: &str, config: &str, routes: &[(&str, &str)]) -> Gateway {
        Self::start_inner(config, routes, "", server, DEFAULT_LOG, None, &[]).await
    }

    /// Like `start`, with `admin:` keys from `config` (its first line must be
    /// `admin:` and the keys below it) merged into the harness's admin block.
    pub async fn start_with_admin(config: &str, routes: &[(&str, &str)]) -> Gateway {
        assert!(config.starts_with("admin:\n"), "config starts with admin:");
        let (admin_keys, config) = split_admin(config);
        Self::start_inner(config, routes, admin_keys, "", DEFAULT_LOG, None, &[]).await
    }

    /// Like `start`, with `FASTGATE_LOG` set to `filter`.
    pub async fn start_logging(config: &str, routes: &[(&str, &str)], filter: &str) -> Gateway {
        Self::start_inner(config, routes, "", "", filter, None, &[]).await
    }

    async fn start_inner(
        config: &str,
        routes: &[(&str, &str)],
        admin_keys: &str,
        server_keys: &str,
        log_filter: &str,
        seed_db: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        if let Some(seed) = seed_db {
            let conn = fastgate::store::open(seed).unwrap();
            conn.execute("VACUUM INTO ?1", [dir.path().join("fg.db").to_str().unwrap()])
                .unwrap();
        }
        std::fs::create_dir(dir.path().join("routes.d")).unwrap();
        for (name, yaml) in routes {
            std::fs::write(dir.path().join("routes.d").join(name), yaml).unwrap();
        }
        let log = dir.path().join("fastgate.log");
        let (child, port, admin_port) = spawn_listening(&log, |port, admin_port| {
            let full = format!(
                "server:\n  listen: 127.0.0.1:{port}\n  threads: 2\n  max_request_body: 2MiB\n  grace_period: 5s\n{server_keys}admin:\n  listen: 127.0.0.1:{admin_port}\n{admin_keys}database:\n  path: {db}\n  key_refresh: 100ms\nroutes_dir: {routes}\n{config}",
                db = dir.path().join("fg.db").display(),
                routes = dir.path().join("routes.d").display(),
            );
            std::fs::write(dir.path().join("fastgate.yaml"), full).unwrap();
            let mut cmd = Command::new(bin());
            cmd.args(["serve", "-c"])
                .arg(dir.path().join("fastgate.yaml"))
                .env("FASTGATE_LOG", log_filter)
                .env("FASTGATE_ADMIN_PASSWORD", ADMIN_PASSWORD)
                .envs(env.iter().copied());
            cmd
        })
        .await;
        Gateway {
            dir,
            port,
            admin_port,
            child,
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("fg.db")
    }

    /// The audit rows written so far.
    pub fn audit_rows(&self) -> Vec<fastgate::store::audit::AuditRecord> {
        let conn = fastgate::store::open(&self.db_path()).unwrap();
        fastgate::audit::captured::CapturedStore::for_database(&self.db_path())
            .all(&conn)
            .unwrap()
    }

    /// Wait until every request id in `ids` has a row; returns all rows.
    pub async fn wait_audit_ids<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a String> + Clone,
    ) -> Vec<fastgate::store::audit::AuditRecord> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let rows = self.audit_rows();
            let all = ids
                .clone()
                .into_iter()
                .all(|id| rows.iter().any(|r| &r.request_id == id));
            if all || Instant::now() > deadline {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("fastgate.yaml")
    }

    pub fn routes_dir(&self) -> PathBuf {
        self.dir.path().join("routes.d")
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The admin port's `/metrics` text now.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.admin_url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Create a gateway key with the CLI; returns (id, secret).
    pub fn create_key(&self, extra: &[&str]) -> (String, String) {
        let out = Command::new(bin())
            .args(["keys", "-c"])
            .arg(self.config_path())
            .args(["create", "--name", "test", "--json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            v["id"].as_str().unwrap().to_string(),
            v["secret"].as_str().unwrap().to_string(),
        )
    }

    /// Wait until `secret` is accepted (the key cache refreshes in the background).
    pub async fn wait_key(&self, secret: &str, path: &str) {
        let client = reqwest::Client::new();
        for _ in 0..100 {
            let r = client.get(self.url(path)).bearer_auth(secret).send().await.unwrap();
            if r.status() != 401 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("key never became valid");
    }

    /// Log in to the admin API; returns the bearer token.
    pub async fn login(&self, username: &str, password: &str) -> String {
        let r = reqwest::Client::new()
            .post(self.admin_url("/api/auth/login"))
            .json(&serde_json::json!({"username": username, "password": password}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "login as {username} failed");
        r.json::<serde_json::Value>().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Stop the server gracefully (SIGTERM; unless it has died) and start it
    /// again on the same config, database and ports.
    pub async fn restart(&mut self) {
        if self.child.try_wait().unwrap().is_none() {
            self.signal("TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "gateway did not stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for _ in 0..50 {
            let mut child = Command::new(bin())
                .args(["serve", "-c"])
                .arg(self.config_path())
                .env("FASTGATE_LOG", "info,fastgate=debug")
                .env("FASTGATE_ADMIN_PASSWORD", ADMIN_PASSWORD)
                .stdout(Stdio::null())
                .stderr(std::fs::OpenOptions::new().append(true).open(&self.log).unwrap())
                .spawn()
                .unwrap();
            if wait_ready(&mut child, self.port, self.admin_port, &self.log).await {
                self.child = child;
                return;
            }
            let _ = child.wait();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("gateway did not come back on its ports");
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Send the request `make` builds until its status satisfies `done` (route
/// reloads and new keys apply within moments, not instantly); the last answer.
/// A connection refused or closed early counts as not yet (a port that was
/// over its connection cap answers 503 and closes before reading).
pub async fn until_status(make: impl Fn() -> reqwest::RequestBuilder, done: impl Fn(u16) -> bool) -> reqwest::Response {
    for _ in 0..100 {
        if let Ok(r) = make().send().await
            && done(r.status().as_u16())
        {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    make().send().await.unwrap()
}

/// Send `request` as raw bytes and read the answer until the server closes
/// (the request should say `Connection: close`).
pub async fn raw_http(port: u16, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

pub fn write(path: &Path, text: &str) {
    // Write-then-rename, like editors and the admin API do.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

/// Wait until the gateway's `/metrics` holds `line` (panics, with the
/// metrics and the gateway's logs, if it never does).
pub async fn wait_metric(gw: &Gateway, line: &str) {
    let text = eventually_text(
        || reqwest::Client::new().get(gw.admin_url("/metrics")),
        |t| t.contains(line),
    )
    .await;
    assert!(
        text.contains(line),
        "no `{line}` in the metrics:\n{text}\n{}",
        gw.logs()
    );
}

/// GET the text `make` builds until `done` holds of it (metrics and logs
/// trail the response by moments); the last text.
pub async fn eventually_text(make: impl Fn() -> reqwest::RequestBuilder, done: impl Fn(&str) -> bool) -> String {
    for _ in 0..100 {
        let text = make().send().await.unwrap().text().await.unwrap();
        if done(&text) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    make().send().await.unwrap().text().await.unwrap()
}

/// The entry for the upstream key `secret` in a `/api/pools/{pool}/keys` answer.
pub fn pool_key_in(keys: &serde_json::Value, secret: &str) -> serde_json::Value {
    let id = fastgate::pool::key_id(secret);
    keys.as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("no key {id} in {keys}"))
}

/// Split `config` into the keys of a leading `admin:` block and the rest.
fn split_admin(config: &str) -> (&str, &str) {
    let Some(rest) = config.strip_prefix("admin:\n") else {
        return ("", config);
    };
    let indented: usize = rest
        .split_inclusive('\n')
        .take_while(|l| l.starts_with("  "))
        .map(str::len)
        .sum();
    rest.split_at(indented)
}

/// A server from Debian's packages that a test starts on a loopback port,
/// kills and starts again on the same port.
trait LocalServer {
    const NAME: &'static str;
    fn port(&mut self) -> &mut u16;
    /// Start the process; whether it is ready on its port.
    async fn spawn(&mut self) -> bool;
    fn kill(&mut self);
}

/// Spawn until the server owns a port (another test may take a port free
/// a moment ago).
async fn start_on_a_free_port(server: &mut impl LocalServer) -> bool {
    for _ in 0..5 {
        if server.spawn().await {
            return true;
        }
        server.kill();
        *server.port() = free_port();
    }
    false
}

async fn restart_on_its_port<S: LocalServer>(server: &mut S) {
    server.kill();
    for _ in 0..50 {
        if server.spawn().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    panic!("{} did not come back on port {}", S::NAME, server.port());
}

/// A real `redis-server` (Debian's package) on a loopback port, in a temp
/// dir, without persistence: killed and started again on the same port to
/// test what the gateway does while it is gone.
pub struct Redis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// TLS only (`rediss://`): the certificate and key files it serves.
    tls: Option<(PathBuf, PathBuf)>,
}

impl Redis {
    pub async fn start() -> Redis {
        Self::start_with(None).await
    }

    /// A Redis that speaks TLS only, with `cert`/`key` (PEM files).
    pub async fn start_tls(cert: &Path, key: &Path) -> Redis {
        Self::start_with(Some((cert.to_path_buf(), key.to_path_buf()))).await
    }

    async fn start_with(tls: Option<(PathBuf, PathBuf)>) -> Redis {
        let mut redis = Redis {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            tls,
        };
        assert!(
            start_on_a_free_port(&mut redis).await,
            "redis-server did not start (is Debian's redis-server installed?)"
        );
        redis
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        LocalServer::kill(self);
    }

    /// Start again on the same port (empty: nothing was persisted).
    pub async fn restart(&mut self) {
        restart_on_its_port(self).await;
    }
}

impl LocalServer for Redis {
    const NAME: &'static str = "redis-server";

    fn port(&mut self) -> &mut u16 {
        &mut self.port
    }

    async fn spawn(&mut self) -> bool {
        let log = self.dir.path().join("redis.log");
        let mut cmd = Command::new("redis-server");
        let port = self.port.to_string();
        match &self.tls {
            None => cmd.args(["--bind", "127.0.0.1", "--port", &port]),
            Some((cert, key)) => cmd
                .args([
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key),
        };
        let child = cmd
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's package) must be installed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                return false;
            }
            let ready = match self.tls {
                None => self.cmd(&["PING"]).await.as_deref() == Some("+PONG"),
                // Listening is ready enough: the gateway retries.
                Some(_) => tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok(),
            };
            if ready {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    /// SIGKILL: the server is gone at once, connections reset.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Redis {
    /// One inline command; the first line of the answer.
    pub async fn cmd(&self, args: &[&str]) -> Option<String> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
        s.write_all(format!("{}\r\n", args.join(" ")).as_bytes()).await.ok()?;
        let mut line = String::new();
        tokio::io::BufReader::new(s).read_line(&mut line).await.ok()?;
        Some(line.trim_end().to_string())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real PostgreSQL server (Debian's package) on a loopback port, in a
/// temp dir, trusting local connections; run as the `postgres` user when
/// the tests run as root (PostgreSQL refuses root).
pub struct Postgres {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL (Debian's postgresql package) must be installed")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop().expect("no PostgreSQL server binaries").join(name)
}

fn as_postgres_user(program: &Path) -> Command {
    if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Postgres {
    pub async fn start() -> Postgres {
        Self::start_with(None).await
    }

    /// A Postgres that also speaks TLS, with the PEM certificate and key.
    pub async fn start_tls(cert_pem: &str, key_pem: &str) -> Postgres {
        Self::start_with(Some((cert_pem, key_pem))).await
    }

    async fn start_with(tls: Option<(&str, &str)>) -> Postgres {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        if unsafe { libc::geteuid() } == 0 {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let out = as_postgres_user(&pg_bin("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(data.join("server.crt"), cert).unwrap();
            std::fs::write(data.join("server.key"), key).unwrap();
            std::fs::set_permissions(data.join("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
            let mut conf = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("postgresql.conf"))
                .unwrap();
            std::io::Write::write_all(&mut conf, b"\nssl = on\n").unwrap();
            if unsafe { libc::geteuid() } == 0 {
                let ok = Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(data.join("server.crt"))
                    .arg(data.join("server.key"))
                    .status()
                    .unwrap();
                assert!(ok.success());
            }
        }
        let mut pg = Postgres {
            port: free_port(),
            dir,
            child: None,
        };
        if !start_on_a_free_port(&mut pg).await {
            let log = std::fs::read_to_string(pg.dir.path().join("pg.log")).unwrap_or_default();
            panic!("postgres did not start:\n{log}");
        }
        pg
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable", self.port)
    }

    pub fn kill(&mut self) {
        LocalServer::kill(self);
    }

    /// Start again on the same port and data.
    pub async fn restart(&mut self) {
        restart_on_its_port(self).await;
    }
}

impl LocalServer for Postgres {
    const NAME: &'static str = "postgres";

    fn port(&mut self) -> &mut u16 {
        &mut self.port
    }

    async fn spawn(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("pg.log"))
            .unwrap();
        let child = as_postgres_user(&pg_bin("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args([
                "-p",
                &self.port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
            ])
            .arg("-k")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                return false;
            }
            let ready = Command::new(pg_bin("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Stop (a fast shutdown: clients are cut off at once).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // The postmaster itself (runuser may not pass the signal on, and
            // an orphaned postmaster would keep serving the nodes).
            let postmaster = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid"))
                .ok()
                .and_then(|f| f.lines().next().map(str::to_string))
                .filter(|pid| pid.parse::<u32>().is_ok());
            for pid in postmaster.iter().chain(std::iter::once(&c.id().to_string())) {
                let _ = Command::new("kill").args(["-INT", pid]).status();
            }
            let gone = |pid: &Option<String>| pid.as_ref().is_none_or(|p| !Path::new(&format!("/proc/{p}")).exists());
            let deadline = Instant::now() + Duration::from_secs(10);
            while (c.try_wait().unwrap().is_none() || !gone(&postmaster)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Some(pid) = postmaster.as_ref().filter(|_| !gone(&postmaster)) {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Gateway {
    /// Like `start_with_admin` (`config` may start with an `admin:` block),
    /// with extra environment variables for the process: values a config or
    /// route file interpolates with `${NAME}`.
    pub async fn start_with_env(config: &str, routes: &[(&str, &str)], env: &[(&str, &str)]) -> Gateway {
        let (admin_keys, config) = split_admin(config);
        Self::start_inner(config, routes, admin_keys, "", DEFAULT_LOG, None, env).await
    }

    /// The gateway process's resident set, KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }
}

/// A process's resident set, KiB (`VmRSS` in `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// What a [`Script`] answers: a status (200 is a small chat completion,
/// anything else the provider's error body) and headers, sent as they are.
pub struct Scripted {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

/// A test's own upstream: called with the request's upstream key and its
/// arrival number at the mock (1-based, across keys); may wait (a slow
/// answer) and returns `None` to let the mock answer as usual.
pub type Script =
    Arc<dyn Fn(Option<String>, usize) -> futures_util::future::BoxFuture<'static, Option<Scripted>> + Send + Sync>;

/// Answer requests with `f` from now on (see [`Script`]).
pub fn script<F, Fut>(mock: &MockUpstream, f: F)
where
    F: Fn(Option<String>, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<Scripted>> + Send + 'static,
{
    let f = Arc::new(f);
    let s: Script = Arc::new(move |key, n| {
        let f = f.clone();
        Box::pin(async move { f(key, n).await })
    });
    *mock.behaviour.script.lock().unwrap() = Some(s);
}

/// `resp` with its declared length but only the first half of its body, then
/// an error (hyper drops the connection): a body cut mid-way.
async fn cut_in_half(resp: Response<Body>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    let whole = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    parts
        .headers
        .insert("content-length", whole.len().to_string().parse().unwrap());
    let half = whole.slice(..whole.len() / 2);
    // The cut comes a moment after the first half (a connection that dies
    // while the answer is being relayed).
    let frames = futures_util::stream::unfold(0u8, move |step| {
        let half = half.clone();
        async move {
            match step {
                0 => Some((Ok(Frame::data(half)), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Some((Err(std::io::Error::other("cut mid-body")), 2))
                }
                _ => None,
            }
        }
    });
    Response::from_parts(parts, BodyExt::boxed(StreamBody::new(frames)))
}
