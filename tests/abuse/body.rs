//! Hostile request bodies on the data port: nesting far past any parser's
//! recursion, invalid UTF-8 and NUL bytes where JSON strings are expected.
//! Each must be refused in the client's own error shape, quickly, without
//! reaching the upstream, and the gateway must keep serving.

use crate::common::{Gateway, MockUpstream};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const ROUTES: &str = r#"
routes:
  - name: chat
    match: { path: /v1/chat/completions, methods: [POST] }
    format: openai
    upstream: oai
  - name: chat-to-gemini
    match: { path: /conv/v1/chat/completions, methods: [POST] }
    format: openai
    upstream: gem
  - name: messages-to-openai
    match: { path: /v1/messages }
    format: anthropic
    upstream: oai
  - name: by-model
    match: { path: /m/v1/chat/completions, methods: [POST], model: ["gpt-*"] }
    format: openai
    upstream: oai
    transform: { strip_prefix: /m }
"#;

async fn setup() -> (MockUpstream, Gateway, String) {
    let mock = MockUpstream::start().await;
    let config = format!(
        "upstreams:\n  oai: {{provider: openai, endpoints: ['{u}'], key_pool: oai}}\n  gem: {{provider: gemini, endpoints: ['{u}'], key_pool: gem}}\nkey_pools:\n  oai: {{keys: [sk-pool-one]}}\n  gem: {{keys: [gem-pool-key]}}\n",
        u = mock.url()
    );
    let gw = Gateway::start(&config, &[("10-abuse.yaml", ROUTES)]).await;
    let (_, secret) = gw.create_key(&[]);
    gw.wait_key(&secret, "/v1/messages").await;
    mock.clear();
    (mock, gw, secret)
}

/// `{"model":"gpt-4o","messages":[[[[ … ]]]]}` nested `depth` arrays deep.
fn nested(depth: usize) -> Vec<u8> {
    let mut body = br#"{"model":"gpt-4o","messages":"#.to_vec();
    body.extend(std::iter::repeat_n(b'[', depth));
    body.extend(std::iter::repeat_n(b']', depth));
    body.push(b'}');
    body
}

async fn post(gw: &Gateway, secret: &str, path: &str, body: Vec<u8>) -> (u16, Value, Duration) {
    let started = Instant::now();
    let r = reqwest::Client::new()
        .post(gw.url(path))
        .bearer_auth(secret)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
    (status, v, started.elapsed())
}

#[tokio::test]
async fn json_nested_ten_thousand_deep_is_refused_in_the_clients_shape() {
    let (mock, gw, secret) = setup().await;
    // Converted: the body is decoded whole, so it must be refused.
    let (status, v, took) = post(&gw, &secret, "/conv/v1/chat/completions", nested(10_000)).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "OpenAI's shape: {v}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let mut body = br#"{"model":"claude-x","max_tokens":8,"messages":"#.to_vec();
    body.extend(std::iter::repeat_n(b'[', 10_000));
    body.extend(std::iter::repeat_n(b']', 10_000));
    body.push(b'}');
    let (status, v, _) = post(&gw, &secret, "/v1/messages", body).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["type"], "error", "Anthropic's shape: {v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert!(
        mock.seen().is_empty(),
        "nothing reached the upstream: {:?}",
        mock.seen()
    );

    // Routed by model without conversion: FastGate reads only the model and
    // may pass the body on untouched (the upstream judges it), but it must
    // answer at once and never recurse 10,000 deep itself.
    let (status, v, took) = post(&gw, &secret, "/m/v1/chat/completions", nested(10_000)).await;
    assert!(status == 200 || status == 400, "{status}: {v}");
    assert!(took < Duration::from_secs(2), "took {took:?}");

    // Still serving, on the same routes.
    let ok = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let (status, v, _) = post(&gw, &secret, "/m/v1/chat/completions", ok.to_string().into_bytes()).await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test]
async fn invalid_utf8_and_nul_in_the_model_never_reach_the_upstream_as_text() {
    let (mock, gw, secret) = setup().await;
    // Invalid UTF-8 inside a JSON string is not JSON.
    let mut bad = br#"{"model":"gpt-"#.to_vec();
    bad.extend([0xff, 0xfe]);
    bad.extend(br#"","messages":[{"role":"user","content":"hi"}]}"#);
    for path in ["/conv/v1/chat/completions", "/m/v1/chat/completions"] {
        let (status, v, _) = post(&gw, &secret, path, bad.clone()).await;
        assert_eq!(status, 400, "{path}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{path}: {v}");
    }
    // A NUL (escaped, so valid JSON) in the model: no model matches it, and
    // toward Gemini it would become part of a URL path.
    let nul = json!({"model": "gemini-2.0-flash\u{0}x", "messages": [{"role": "user", "content": "hi"}]});
    let (status, v, _) = post(&gw, &secret, "/conv/v1/chat/completions", nul.to_string().into_bytes()).await;
    assert!(status == 400 || status == 404, "{status}: {v}");
    assert!(v["error"].is_object(), "an OpenAI-shaped error: {v}");
    for seen in mock.seen() {
        assert!(!seen.uri.contains('\0') && !seen.uri.contains("%00"), "{}", seen.uri);
    }
}

/// Raw bytes: a request whose header values carry obs-text (invalid UTF-8)
/// and whose client request id is garbage.
async fn raw(port: u16, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the gateway answered and closed within 5 s")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn invalid_utf8_in_header_values_is_served_or_refused_never_a_5xx() {
    let (mock, gw, secret) = setup().await;
    let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    for header in [
        &b"User-Agent: \xff\xfe\x80"[..],
        b"X-Request-Id: \xff\xff\xff",
        b"OpenAI-Beta: \xc3\x28",
        b"X-Custom: a\x01b",
    ] {
        let mut req = format!(
            "POST /m/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(header);
        req.extend_from_slice(b"\r\n\r\n");
        req.extend_from_slice(body);
        let answer = raw(gw.port, &req).await;
        let status: u16 = answer
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status for {:?}: {answer:?}", String::from_utf8_lossy(header)));
        assert!(status < 500, "{:?}: {answer}", String::from_utf8_lossy(header));
    }
    // No invalid byte was made up into the upstream's headers, and the
    // gateway still answers.
    for seen in mock.seen() {
        for (name, value) in &seen.headers {
            assert!(!value.contains('\u{fffd}'), "{name}: {value}");
        }
    }
    let ok = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let (status, v, _) = post(&gw, &secret, "/m/v1/chat/completions", ok.to_string().into_bytes()).await;
    assert_eq!(status, 200, "{v}");
}

/// A body that sends one byte and then nothing, never ending.
fn stalled_body() -> reqwest::Body {
    let first = futures_util::stream::once(async { Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"{")) });
    reqwest::Body::wrap_stream(futures_util::StreamExt::chain(first, futures_util::stream::pending()))
}

#[tokio::test]
async fn a_stalled_body_is_cut_at_client_body_timeout_on_http1_and_http2() {
    let mock = MockUpstream::start().await;
    let config = format!(
        "upstreams:\n  oai: {{provider: openai, endpoints: ['{u}'], key_pool: oai}}\n  gem: {{provider: gemini, endpoints: ['{u}'], key_pool: gem}}\nkey_pools:\n  oai: {{keys: [sk-pool-one]}}\n  gem: {{keys: [gem-pool-key]}}\n",
        u = mock.url()
    );
    let gw = Gateway::start_with_server(
        "  h2c: true\n  limits: {client_body_timeout: 1s}\n",
        &config,
        &[("10-abuse.yaml", ROUTES)],
    )
    .await;
    let (_, secret) = gw.create_key(&[]);
    gw.wait_key(&secret, "/v1/messages").await;
    // HTTP/2 by prior knowledge: before, nothing ended such a stream until
    // the client left; HTTP/1.1 stalled for Pingora's 60 s read timeout.
    for (proto, client) in [
        ("HTTP/1.1", reqwest::Client::builder().http1_only().build().unwrap()),
        (
            "HTTP/2",
            reqwest::Client::builder().http2_prior_knowledge().build().unwrap(),
        ),
    ] {
        let started = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            client
                .post(gw.url("/m/v1/chat/completions"))
                .bearer_auth(&secret)
                .header("content-type", "application/json")
                .header("content-length", "100000")
                .body(stalled_body())
                .send(),
        )
        .await
        .unwrap_or_else(|_| panic!("{proto}: no answer within 10 s"));
        let took = started.elapsed();
        let r = r.unwrap();
        assert_eq!(r.status(), 408, "{proto}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "body_timeout", "{proto}: OpenAI's shape: {v}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "{proto}: {took:?}"
        );
    }
    assert!(mock.seen().is_empty(), "nothing reached the upstream");
}
