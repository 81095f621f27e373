//! Attacks on upstream: see docs/security.md. What a client sends must not
//! steer the pooled key (the model never becomes a path), gateway keys never
//! reach an upstream in any spelling, and the admin API shows no secret.

use crate::common::{Gateway, raw_http};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request as a raw upstream saw it: the request line and headers as
/// sent on the wire, then the body.
#[derive(Debug, Clone)]
struct Raw {
    head: String,
    body: Vec<u8>,
}

impl Raw {
    fn target(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or_default()
    }
}

/// An upstream that writes exactly the bytes it is given (awkward JSON
/// included: spaces, key order) and records every request as sent.
struct RawUpstream {
    port: u16,
    seen: Arc<Mutex<Vec<Raw>>>,
}

impl RawUpstream {
    async fn start(answer: fn(&Raw) -> String) -> RawUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Arc<Mutex<Vec<Raw>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 8192];
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let raw = Raw {
                        head,
                        body: buf[head_end..].to_vec(),
                    };
                    let out = answer(&raw);
                    log.lock().unwrap().push(raw);
                    let _ = s.write_all(out.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        RawUpstream { port, seen }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<Raw> {
        self.seen.lock().unwrap().clone()
    }
}

fn json_answer(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A Python-style OpenAI stream: `json.dumps` spacing, `usage: null` on each
/// chunk, the usage-only chunk after the finish chunk with its keys reordered.
fn python_stream(_: &Raw) -> String {
    let events = [
        r#"{"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": null}], "usage": null}"#,
        r#"{"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": null}"#,
        r#"{"usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}, "id": "c1", "object": "chat.completion.chunk", "choices": []}"#,
    ];
    let mut body: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    body.push_str("data: [DONE]\n\n");
    format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{body}")
}

/// The usage chunk FastGate asked for stays hidden from a client that did
/// not ask, whatever the upstream's JSON spacing and key order; a client
/// that asked still gets it. Fails on the byte-matching filter.
#[tokio::test]
async fn upstream_usage_chunk_is_hidden_whatever_the_json_spacing() {
    let up = RawUpstream::start(python_stream).await;
    let gw = Gateway::start(
        &format!("upstreams:\n  py: {{provider: openai, endpoints: ['{}']}}\n", up.url()),
        &[(
            "r.yaml",
            "routes:\n  - {name: chat, match: {path: /v1/chat/completions}, format: openai, auth: none, upstream: py}\n",
        )],
    )
    .await;
    let c = reqwest::Client::new();
    let quiet = c
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "gpt-4o", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(quiet.status(), 200);
    let text = quiet.text().await.unwrap();
    let sent: Value = serde_json::from_slice(&up.seen()[0].body).unwrap();
    assert_eq!(sent["stream_options"], json!({"include_usage": true}), "FastGate asked");
    let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.len(), 3, "two chunks and [DONE], no usage chunk: {text}");
    assert!(!text.contains("prompt_tokens"), "{text}");
    assert_eq!(data[2], "[DONE]");

    let asked = c
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}, "messages": []}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        asked.contains("\"prompt_tokens\": 7"),
        "the client that asked sees it: {asked}"
    );
}

fn gemini_answer(_: &Raw) -> String {
    json_answer(
        r#"{"candidates": [{"content": {"parts": [{"text": "hi"}], "role": "model"}, "finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 1, "totalTokenCount": 2}}"#,
    )
}

const POOL_KEY: &str = "AIzaPOOLKEYpoolkeyPOOLKEYpoolkey0123";

/// A pooled Gemini upstream behind an OpenAI route (conversion) and a Gemini
/// passthrough route with a `{*rest}` capture.
async fn pooled_gemini() -> (RawUpstream, Gateway) {
    let up = RawUpstream::start(gemini_answer).await;
    let gw = Gateway::start(
        &format!(
            "key_pools:\n  gp: {{keys: ['{POOL_KEY}']}}\nupstreams:\n  gem: {{provider: gemini, endpoints: ['{}'], key_pool: gp}}\n",
            up.url()
        ),
        &[(
            "r.yaml",
            "routes:\n  - {name: conv, match: {path: /v1/chat/completions}, format: openai, auth: none, upstream: gem}\n  - {name: embed, match: {path: /v1/embeddings}, format: openai, auth: none, upstream: gem}\n  - {name: rest, match: {path: '/g/{*rest}'}, format: gemini, auth: none, upstream: gem, transform: {strip_prefix: /g}}\n",
        )],
    )
    .await;
    (up, gw)
}

/// A client's model never becomes a path: every steering spelling is
/// refused with 400 in the OpenAI shape and the pooled key goes nowhere
/// (zero upstream calls); a documented model id still goes through.
#[tokio::test]
async fn upstream_model_name_cannot_steer_the_pooled_key() {
    let (up, gw) = pooled_gemini().await;
    let c = reqwest::Client::new();
    for model in [
        "gemini-x/../../../v1beta/cachedContents?x=",
        "tunedModels/someone-elses",
        "gemini-x%2F..%2FcachedContents",
        "..",
        "gemini-x:countTokens#",
        "gemini x",
        "gemini-x\u{0}",
    ] {
        for path in ["/v1/chat/completions", "/v1/embeddings"] {
            let body = if path.ends_with("embeddings") {
                json!({"model": model, "input": "hi"})
            } else {
                json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
            };
            let r = c.post(gw.url(path)).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 400, "{model:?} on {path}");
            let e: Value = r.json().await.unwrap();
            assert_eq!(e["error"]["code"], "invalid_model", "{model:?}: {e}");
            assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
        }
    }
    assert_eq!(up.seen().len(), 0, "no request reached the pooled upstream");

    let r = c
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "models/gemini-2.0-flash", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target(), "/v1beta/models/gemini-2.0-flash:generateContent");
    assert!(seen[0].head.contains(POOL_KEY), "the pool's key went with it");
}

/// A client path that climbs out of the route (`..`, `%2e%2e`, `%2F`) never
/// reaches the pooled upstream: 400 in the Gemini shape, zero calls.
#[tokio::test]
async fn upstream_dot_segments_and_encoded_slashes_are_refused() {
    let (up, gw) = pooled_gemini().await;
    for target in [
        "/g/v1beta/models/x/../../cachedContents",
        "/g/v1beta/models/x/%2e%2e/%2E%2E/files",
        "/g/v1beta/models/x%2F..%2F..%2Ffiles:generateContent",
        "/g/v1beta/./files",
    ] {
        let answer = raw_http(
            gw.port,
            &format!("POST {target} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"),
        )
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{target}: refused, not forwarded: {answer}"
        );
        assert!(answer.contains("INVALID_ARGUMENT"), "Gemini's error shape: {answer}");
    }
    assert_eq!(up.seen().len(), 0, "nothing reached the pooled upstream");
    let ok = raw_http(
        gw.port,
        "POST /g/v1beta/models/gemini-2.0-flash:generateContent HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert_eq!(up.seen()[0].target(), "/v1beta/models/gemini-2.0-flash:generateContent");
}

/// On an `auth: none` route (bring your own key), a gateway key in any
/// spelling is removed before forwarding: percent-encoded query names and
/// values, an upper-case prefix, a cookie, a header name, `Basic` auth. The
/// rest of the request still goes (the test can fail both ways).
#[tokio::test]
async fn upstream_gateway_keys_never_leave_in_any_spelling() {
    use base64::Engine as _;
    let up = RawUpstream::start(|_| json_answer(r#"{"ok": true}"#)).await;
    let gw = Gateway::start(
        &format!(
            "upstreams:\n  byok: {{provider: openai, endpoints: ['{}']}}\n",
            up.url()
        ),
        &[(
            "r.yaml",
            "routes:\n  - {name: open, match: {path: '/o/{*rest}'}, auth: none, upstream: byok}\n",
        )],
    )
    .await;
    let body = "Zx9Qw3Er5Ty7Ui1Op2As4Df6Gh8Jk0Lm";
    assert_eq!(body.len(), 32);
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("me:fg_{body}"));
    let query = format!("a=1&token=fg%5F{body}&%66%67%5f{body}=x&t2=FG_{body}&t3=fg%255F{body}&t4=+fg_{body}+&b=2");
    let request = format!(
        "GET /o/v1/models?{query} HTTP/1.1\r\nhost: x\r\nx-keep: yes\r\nx-one: Fg_{body}\r\ncookie: s=fg%5f{body}; other=1\r\nfg_{body}: 1\r\nauthorization: Basic {basic}\r\nconnection: close\r\n\r\n"
    );
    let answer = raw_http(gw.port, &request).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let head = &seen[0].head;
    assert!(!head.contains(body), "the key's body left: {head}");
    assert!(!head.contains(&basic), "the Basic credential left: {head}");
    assert!(head.contains("x-keep: yes"), "{head}");
    assert_eq!(
        seen[0].target(),
        "/o/v1/models?a=1&b=2",
        "only the key-bearing parameters went"
    );
    // In the path: refused (a path cannot lose a segment and keep its meaning).
    let answer = raw_http(
        gw.port,
        &format!("GET /o/v1/files/fg%5F{body} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(up.seen().len(), 1, "nothing more reached the upstream");
}

/// A provider's 401 quotes the key it got ("Incorrect API key provided:
/// sk-…"): on Pingora's forwarding path (a passthrough route without
/// retries) the pool key must reach neither the client nor the audit log,
/// which a `user` reads.
#[tokio::test]
async fn a_providers_401_quoting_the_pool_key_reaches_no_client_and_no_audit_row() {
    use crate::common::{KeyRule, MockUpstream};
    let mock = MockUpstream::start().await;
    let config = format!(
        "audit:\n  capture_body: true\nupstreams:\n  oai: {{provider: openai, endpoints: ['{u}'], key_pool: p}}\nkey_pools:\n  p: {{keys: [sk-pool-secret-quoted-by-the-provider]}}\n",
        u = mock.url()
    );
    let routes = "routes:\n  - { name: other, match: { path: \"/v1/{*rest}\" }, format: openai, upstream: oai }\n";
    let gw = Gateway::start(&config, &[("r.yaml", routes)]).await;
    let (_, secret) = gw.create_key(&[]);
    gw.wait_key(&secret, "/v1/models").await;
    mock.behaviour
        .keys
        .lock()
        .unwrap()
        .insert("sk-pool-secret-quoted-by-the-provider".into(), KeyRule::Status(401));
    let r = reqwest::Client::new()
        .post(gw.url("/v1/files"))
        .bearer_auth(&secret)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let text = r.text().await.unwrap();
    assert!(
        !text.contains("sk-pool-secret"),
        "the pool key reached the client: {text}"
    );
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("refused FastGate's provider key"),
        "{v}"
    );
    // The upstream did quote it (the mock is as awkward as OpenAI).
    assert!(mock.last().header("authorization").unwrap().contains("sk-pool-secret"));
    let mut row = None;
    for _ in 0..50 {
        row = gw.audit_rows().into_iter().find(|r| r.path == "/v1/files");
        if row.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let row = row.expect("the request has its audit row");
    assert_eq!(row.status, 401);
    let body = row.response_body.unwrap_or_default();
    assert!(
        !body.contains("sk-pool-secret"),
        "the pool key is in the audit row: {body}"
    );
}

/// A route file may put an operator's secret into the body sent upstream
/// (`set_body` with `${VAR}`); the captured request body is that body, and
/// whoever reads the logs through the admin API sees `${VAR}`, not the value.
#[tokio::test]
async fn environment_values_in_captured_bodies_are_masked_in_logs_and_exports() {
    use crate::common::MockUpstream;
    const SECRET: &str = "partner-secret-value-0123456789abcdefXYZ";
    const TOKEN: &str = "abuse-upstream-admin-token-0123456789abcdef";
    let mock = MockUpstream::start().await;
    let config = format!(
        "admin:\n  token: {TOKEN}\naudit:\n  capture_body: true\n  capture_headers: true\nupstreams:\n  oai: {{provider: openai, endpoints: ['{u}'], key_pool: p}}\nkey_pools:\n  p: {{keys: [sk-pool]}}\n",
        u = mock.url()
    );
    let routes = "routes:\n  - name: chat\n    match: { path: /v1/chat/completions }\n    format: openai\n    upstream: oai\n    transform:\n      set_headers: { x-partner: \"${PARTNER_TOKEN}\" }\n      set_body: { user: \"${PARTNER_TOKEN}\" }\n";
    let gw = Gateway::start_with_env(&config, &[("r.yaml", routes)], &[("PARTNER_TOKEN", SECRET)]).await;
    let (_, secret) = gw.create_key(&[]);
    gw.wait_key(&secret, "/v1/chat/completions").await;
    mock.clear();
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&secret)
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(mock.last().json()["user"], SECRET, "the upstream gets the real value");
    let admin = reqwest::Client::new();
    let mut listed = String::new();
    for _ in 0..50 {
        listed = admin
            .get(gw.admin_url("/api/logs?route=chat"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if listed.contains("PARTNER_TOKEN") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(listed.contains("${PARTNER_TOKEN}"), "{listed}");
    let v: Value = serde_json::from_str(&listed).unwrap();
    let id = v["items"][0]["id"].as_i64().unwrap();
    for path in [
        "/api/logs?route=chat".to_string(),
        format!("/api/logs/{id}"),
        "/api/logs/export?format=csv".into(),
        "/api/logs/export?format=ndjson".into(),
    ] {
        let text = admin
            .get(gw.admin_url(&path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!text.contains(SECRET), "{path}: {text}");
        assert!(
            text.contains("PARTNER_TOKEN"),
            "{path}: the row is there, masked: {text}"
        );
    }
}
