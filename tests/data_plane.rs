//! The data plane from the outside: the real binary against a recording mock
//! upstream, asserting on what the client and the upstream saw.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Gateway, MockUpstream, until_status, write};
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::{
    collections::HashSet,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

fn upstreams(mock: &MockUpstream) -> String {
    format!(
        "upstreams:\n  oai:\n    provider: openai\n    endpoints: ['{u}']\n    key_pool: oai\n  ant:\n    provider: anthropic\n    endpoints: ['{u}']\n    key_pool: ant\n  gem:\n    provider: gemini\n    endpoints: ['{u}']\n    key_pool: gem\n  plain:\n    provider: http\n    endpoints: ['{u}']\n  dead:\n    provider: openai\n    endpoints: ['http://127.0.0.1:{dead}']\n    key_pool: oai\n    timeouts: {{connect: 1s}}\n  dead-ant:\n    provider: anthropic\n    endpoints: ['http://127.0.0.1:{dead}']\n    key_pool: ant\n  slow:\n    provider: gemini\n    endpoints: ['{u}']\n    key_pool: oai\n    timeouts: {{first_byte: 300ms}}\nkey_pools:\n  oai:\n    keys: [sk-pool-one, sk-pool-two, sk-pool-three]\n  ant:\n    keys: [sk-ant-pool]\n  gem:\n    keys: [gem-pool-key]\n",
        u = mock.url(),
        dead = common::free_port()
    )
}

const ROUTES: &str = r#"
routes:
  - name: chat
    match: { path: /v1/chat/completions, methods: [POST] }
    format: openai
    upstream: oai
  - name: messages
    match: { path: /v1/messages }
    format: anthropic
    upstream: ant
  - name: gemini
    match: { path: "/v1beta/{*rest}" }
    format: gemini
    upstream: gem
  - name: passthrough
    match: { path: "/plain/{*rest}" }
    auth: none
    upstream: plain
    transform: { strip_prefix: /plain }
  - name: passthrough-buffered
    match: { path: "/plain-buffered/{*rest}" }
    auth: none
    upstream: plain
    retries: 1
    transform: { strip_prefix: /plain-buffered }
  - name: dead
    match: { path: /dead/v1/chat/completions }
    format: openai
    upstream: dead
    transform: { strip_prefix: /dead }
  - name: dead-streaming
    match: { path: /dead-stream }
    auth: none
    format: anthropic
    upstream: dead-ant
  - name: slow
    match: { path: /slow }
    format: gemini
    upstream: slow
  - name: needs-tag
    match: { path: /tagged }
    permissions: [admin-only]
    upstream: oai
"#;

async fn setup() -> (MockUpstream, Gateway, String) {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(&upstreams(&mock), &[("10-test.yaml", ROUTES)]).await;
    let (_, secret) = gw.create_key(&["--permission", "chat"]);
    gw.wait_key(&secret, "/v1/messages").await;
    mock.clear();
    (mock, gw, secret)
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}]})
}

#[tokio::test]
async fn upstream_sees_pool_key_never_the_gateway_key_whichever_way_it_is_sent() {
    let (mock, gw, secret) = setup().await;
    let c = reqwest::Client::new();
    let ways: Vec<reqwest::RequestBuilder> = vec![
        c.post(gw.url("/v1/chat/completions")).bearer_auth(&secret),
        c.post(gw.url("/v1/chat/completions")).header("x-api-key", &secret),
        c.post(gw.url("/v1/chat/completions")).header("x-goog-api-key", &secret),
        c.post(gw.url(&format!("/v1/chat/completions?key={secret}&keep=1"))),
    ];
    for req in ways {
        let r = req.json(&chat("gpt-4o")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers().contains_key("x-request-id"));
        let seen = mock.last();
        let auth = seen.header("authorization").unwrap();
        assert!(auth.starts_with("Bearer sk-pool-"), "{auth}");
        let everything = format!("{seen:?}");
        assert!(
            !everything.contains(&secret),
            "gateway key leaked upstream: {everything}"
        );
        assert!(seen.header("x-api-key").is_none() && seen.header("x-goog-api-key").is_none());
    }
    assert!(mock.last().uri.ends_with("?keep=1"), "{}", mock.last().uri);
    assert!(!gw.logs().contains(&secret), "gateway key in logs");
    assert!(!gw.logs().contains("sk-pool-one"), "pool key in logs");
}

/// Both forwarding paths: Pingora's proxy (body untouched) and FastGate's
/// own (body read: here for retries).
const OPEN_PATHS: [&str; 2] = ["/plain", "/plain-buffered"];

#[tokio::test]
async fn a_gateway_key_never_leaves_even_on_open_routes() {
    let (mock, gw, secret) = setup().await;
    let c = reqwest::Client::new();
    for prefix in OPEN_PATHS {
        let url = |q: &str| gw.url(&format!("{prefix}/v1/things{q}"));
        let ways: Vec<reqwest::RequestBuilder> = vec![
            c.post(url("")).bearer_auth(&secret),
            c.post(url("")).header("x-api-key", &secret),
            c.post(url("")).header("x-goog-api-key", &secret),
            c.post(url(&format!("?key={secret}&keep=1"))),
            c.post(url(&format!("?keep=1&token={secret}"))),
            c.post(url("")).header("x-custom-auth", format!("Token {secret}")),
        ];
        for req in ways {
            let r = req.body("{}").send().await.unwrap();
            assert_eq!(r.status(), 200, "{prefix}");
            let seen = mock.last();
            assert!(
                !format!("{seen:?}").contains(&secret),
                "gateway key leaked upstream via {prefix}: {seen:?}"
            );
        }
        assert!(mock.last().uri.ends_with("/v1/things"), "{}", mock.last().uri);
        // A client's own provider key passes on a route without a key pool.
        let r = c
            .post(url("?key=client-own&x=1"))
            .bearer_auth("sk-client-own")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let seen = mock.last();
        assert_eq!(seen.header("authorization"), Some("Bearer sk-client-own"), "{prefix}");
        assert!(seen.uri.ends_with("?key=client-own&x=1"), "{}", seen.uri);
    }
}

#[tokio::test]
async fn hop_by_hop_headers_stop_at_each_hop_on_both_paths() {
    let (mock, gw, _) = setup().await;
    for prefix in OPEN_PATHS {
        let answer = common::raw_http(
            gw.port,
            &format!(
                "GET {prefix}/hop HTTP/1.1\r\nHost: x\r\nConnection: x-drop-me, close\r\nX-Drop-Me: client-internal\r\nX-Kept: yes\r\n\r\n"
            ),
        )
        .await;
        let seen = mock.last();
        assert!(seen.header("x-drop-me").is_none(), "{prefix}: {seen:?}");
        assert_eq!(seen.header("x-kept"), Some("yes"));
        let head = answer.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{prefix}: {answer}");
        assert!(!head.contains("x-hop-secret"), "{prefix}: {head}");
        assert!(head.contains("x-end-to-end: kept"), "{prefix}: {head}");

        let answer = common::raw_http(
            gw.port,
            &format!("GET {prefix}/status/204 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await;
        let head = answer.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 204"), "{prefix}: {answer}");
        assert!(!head.contains("transfer-encoding"), "{prefix}: {answer}");
    }
}

#[tokio::test]
async fn keys_are_injected_the_providers_way() {
    let (mock, gw, secret) = setup().await;
    let c = reqwest::Client::new();
    let r = c
        .post(gw.url("/v1/messages"))
        .header("x-api-key", &secret)
        .json(&json!({"model": "claude-3", "max_tokens": 5, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = mock.last();
    assert_eq!(seen.header("x-api-key"), Some("sk-ant-pool"));
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
    assert!(seen.header("authorization").is_none());

    let r = c
        .post(gw.url("/v1beta/models/gemini-2.0-flash:generateContent"))
        .header("x-goog-api-key", &secret)
        .json(&json!({"contents": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = mock.last();
    assert_eq!(seen.header("x-goog-api-key"), Some("gem-pool-key"));
    assert_eq!(seen.uri, "/v1beta/models/gemini-2.0-flash:generateContent");
    // A client's own anthropic-version wins.
    c.post(gw.url("/v1/messages"))
        .header("x-api-key", &secret)
        .header("anthropic-version", "2024-01-01")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(mock.last().header("anthropic-version"), Some("2024-01-01"));
}

#[tokio::test]
async fn round_robin_spreads_requests_over_the_pool_keys() {
    let (mock, gw, secret) = setup().await;
    let c = reqwest::Client::new();
    for _ in 0..9 {
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&secret)
            .json(&chat("gpt-4o"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let mut counts = std::collections::HashMap::new();
    for s in mock.seen() {
        *counts
            .entry(s.header("authorization").unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n == 3), "{counts:?}");
}

#[tokio::test]
async fn transforms_do_what_they_say() {
    let mock = MockUpstream::start().await;
    let routes = r#"
routes:
  - name: rewrite
    match: { path: "/team/{team}/{*rest}" }
    auth: none
    upstream: oai
    model_map: { gpt-4: gpt-4o-2024 }
    transform:
      rewrite_path: /v1/{rest}
      set_headers: { x-source: fastgate, x-team: overwritten }
      remove_headers: [x-internal]
      set_body: { metadata: { source: fastgate }, temperature: null, user: fastgate }
  - name: strip
    match: { path: "/openai/{*rest}" }
    auth: none
    upstream: oai
    transform: { strip_prefix: /openai }
"#;
    let gw = Gateway::start(&upstreams(&mock), &[("r.yaml", routes)]).await;
    let c = reqwest::Client::new();
    let body = json!({"model": "gpt-4", "temperature": 0.5, "messages": [], "metadata": {"other": 1}});
    let r = c
        .post(gw.url("/team/ml/chat/completions?x=1"))
        .header("x-internal", "secret-thing")
        .header("x-team", "ml")
        .header("x-kept", "yes")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = mock.last();
    assert_eq!(seen.uri, "/v1/chat/completions?x=1");
    assert_eq!(seen.header("x-source"), Some("fastgate"));
    assert_eq!(seen.header("x-team"), Some("overwritten"));
    assert_eq!(seen.header("x-kept"), Some("yes"));
    assert!(seen.header("x-internal").is_none());
    let sent = seen.json();
    assert_eq!(sent["model"], "gpt-4o-2024");
    assert_eq!(sent["metadata"], json!({"other": 1, "source": "fastgate"}));
    assert!(sent.get("temperature").is_none(), "null in set_body removes a key");
    assert_eq!(sent["user"], "fastgate");
    assert_eq!(seen.header("content-length").unwrap(), seen.body.len().to_string());
    assert_eq!(seen.header("host").unwrap(), mock.addr.to_string());

    let r = c.get(gw.url("/openai/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(mock.last().uri, "/v1/models");
}

#[tokio::test]
async fn model_globs_pick_the_upstream() {
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    let config = format!(
        "upstreams:\n  a: {{provider: openai, endpoints: ['{}'], key_pool: p}}\n  b: {{provider: openai, endpoints: ['{}'], key_pool: p}}\nkey_pools:\n  p: {{keys: [k1]}}\n",
        a.url(),
        b.url()
    );
    let routes = r#"
routes:
  - { name: gpt, match: { path: /v1/chat/completions, model: ["gpt-4*", "o*"] }, auth: none, upstream: a }
  - { name: rest, match: { path: /v1/chat/completions }, auth: none, upstream: b, priority: 500 }
"#;
    let gw = Gateway::start(&config, &[("m.yaml", routes)]).await;
    let c = reqwest::Client::new();
    for (model, expect_a) in [
        ("gpt-4o", true),
        ("o3-mini", true),
        ("claude-3", false),
        ("gpt-3.5", false),
    ] {
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .json(&chat(model))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{model}");
        let (hit, miss) = if expect_a { (&a, &b) } else { (&b, &a) };
        assert_eq!(hit.last().json()["model"], model);
        assert!(
            miss.seen().iter().all(|s| s.json()["model"] != model),
            "{model} went to the wrong upstream"
        );
    }
}

#[tokio::test]
async fn a_one_mib_body_reaches_the_upstream_intact_on_both_paths() {
    let (mock, gw, secret) = setup().await;
    let c = reqwest::Client::new();
    let filler = "x".repeat(1024 * 1024);
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": filler}]}).to_string();
    assert!(body.len() > 1024 * 1024);
    // Body-aware path (model routing on, the body is read by FastGate).
    let routes =
        format!("{ROUTES}\n  - name: by-model\n    match: {{ path: /big, model: ['gpt-*'] }}\n    upstream: oai\n");
    write(&gw.routes_dir().join("10-test.yaml"), &routes);
    let big = || c.post(gw.url("/big")).bearer_auth(&secret).body(body.clone());
    let status = until_status(big, |s| s != 404).await.status().as_u16();
    assert_eq!(status, 200);
    assert_eq!(mock.last().body.len(), body.len());
    assert_eq!(mock.last().body, body.as_bytes());
    // Streaming path (no body features: Pingora streams it through).
    let r = c.post(gw.url("/plain/upload")).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(mock.last().body, body.as_bytes());
}

/// FastGate corks the upstream socket while it writes a request it holds
/// whole (header and body leave in one segment). A kept-alive connection
/// must be uncorked afterwards, or the kernel would hold the next request's
/// header for up to 200 ms: sequential requests on one pooled connection
/// stay fast, and every body arrives intact.
#[tokio::test]
async fn requests_on_a_kept_alive_upstream_connection_are_not_held_back() {
    let (mock, gw, secret) = setup().await;
    let c = reqwest::Client::new();
    let mut took = Vec::new();
    for i in 0..7 {
        let body = chat(&format!("gpt-4o-{i}"));
        let started = Instant::now();
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&secret)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        took.push(started.elapsed());
        assert_eq!(mock.last().json(), body, "the body reached the upstream intact");
    }
    took.sort();
    let median = took[took.len() / 2];
    assert!(
        median < Duration::from_millis(150),
        "a held-back request takes 200 ms or more: {took:?}"
    );
}

#[tokio::test]
async fn sse_events_arrive_spread_over_time_on_both_paths() {
    let (mock, gw, secret) = setup().await;
    mock.behaviour.sse_interval_ms.store(200, Ordering::SeqCst);
    let c = reqwest::Client::new();
    let requests = [
        // Both go through Pingora's streaming path here; the body-aware path
        // has its own test below.
        c.post(gw.url("/v1/chat/completions"))
            .bearer_auth(&secret)
            .json(&json!({"model": "gpt-4o", "stream": true, "messages": []})),
        c.get(gw.url("/plain/sse")),
    ];
    for req in requests {
        let started = Instant::now();
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let mut arrivals = Vec::new();
        let mut stream = r.bytes_stream();
        let mut text = String::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            text.push_str(std::str::from_utf8(&chunk).unwrap());
            arrivals.push(started.elapsed());
        }
        assert_eq!(text.matches("data: ").count(), 6, "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"));
        // Six events 200 ms apart: they arrive one by one, the first well
        // before the last (ratios, not wall times: the machine may be slow).
        assert!(arrivals.len() >= 5, "events were batched: {arrivals:?}");
        let first = arrivals[0];
        let last = *arrivals.last().unwrap();
        assert!(first * 2 < last, "the first event waited for the rest: {arrivals:?}");
        assert!(
            arrivals.windows(2).filter(|w| w[1] > w[0]).count() >= 4,
            "events not spread: {arrivals:?}"
        );
    }
}

#[tokio::test]
async fn sse_through_the_body_aware_path_is_not_buffered() {
    let mock = MockUpstream::start().await;
    mock.behaviour.sse_interval_ms.store(200, Ordering::SeqCst);
    let routes = "routes:\n  - { name: m, match: { path: /v1/messages, model: ['claude-*'] }, auth: none, format: anthropic, upstream: ant }\n";
    let gw = Gateway::start(&upstreams(&mock), &[("r.yaml", routes)]).await;
    let started = Instant::now();
    let r = reqwest::Client::new()
        .post(gw.url("/v1/messages"))
        .json(&json!({"model": "claude-3", "stream": true, "max_tokens": 5, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        arrivals.push(started.elapsed());
    }
    assert!(text.contains("event: message_stop"));
    assert!(arrivals.len() >= 3, "{arrivals:?}");
    assert!(
        *arrivals.last().unwrap() - arrivals[0] > Duration::from_millis(450),
        "{arrivals:?}"
    );
}

#[tokio::test]
async fn a_client_disconnect_cancels_the_upstream_stream() {
    let mock = MockUpstream::start().await;
    mock.behaviour.sse_interval_ms.store(150, Ordering::SeqCst);
    let routes = "routes:\n  - { name: m, match: { path: /v1/chat/completions, model: ['*'] }, auth: none, upstream: oai }\n  - { name: p, match: { path: '/plain/{*rest}' }, auth: none, upstream: plain, transform: { strip_prefix: /plain } }\n";
    let gw = Gateway::start(&upstreams(&mock), &[("r.yaml", routes)]).await;
    for req in [
        reqwest::Client::new()
            .post(gw.url("/v1/chat/completions"))
            .json(&json!({"model": "x", "stream": true})),
        reqwest::Client::new().get(gw.url("/plain/sse")),
    ] {
        mock.behaviour.stream_aborted.store(false, Ordering::SeqCst);
        let r = req.send().await.unwrap();
        let mut stream = r.bytes_stream();
        stream.next().await.unwrap().unwrap();
        drop(stream);
        let mut aborted = false;
        for _ in 0..40 {
            if mock.behaviour.stream_aborted.load(Ordering::SeqCst) {
                aborted = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(aborted, "the upstream kept streaming to nobody");
    }
}

#[tokio::test]
async fn hot_reload_applies_good_files_and_keeps_serving_on_bad_ones() {
    let (mock, gw, secret) = setup().await;
    let c = reqwest::Client::new();
    assert_eq!(c.get(gw.url("/new/v1/models")).send().await.unwrap().status(), 404);
    let new_file = gw.routes_dir().join("20-new.yaml");
    write(
        &new_file,
        "routes:\n  - { name: new, match: { path: '/new/{*rest}' }, auth: none, upstream: plain, transform: { strip_prefix: /new } }\n",
    );
    let status = until_status(|| c.get(gw.url("/new/v1/models")), |s| s == 200)
        .await
        .status()
        .as_u16();
    assert_eq!(status, 200, "new route never took effect");
    assert_eq!(mock.last().uri, "/v1/models");

    // A broken file (and a broken edit of a good one) leaves the last good table serving.
    write(
        &gw.routes_dir().join("30-broken.yaml"),
        "routes:\n  - { name: broken, match: { path: no-slash }, upstream: nowhere }\n",
    );
    write(
        &new_file,
        "routes:\n  - { name: new, match: { path: '/changed/{*rest}' }, auth: none, upstream: plain }\n",
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gw.logs().contains("Rejected routes.d change") {
        assert!(
            Instant::now() < deadline,
            "the bad file was never noticed:\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gw.logs().contains("30-broken.yaml:2"),
        "error lacks file:line:\n{}",
        gw.logs()
    );
    assert_eq!(c.get(gw.url("/new/v1/models")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(gw.url("/changed/v1/models")).send().await.unwrap().status(), 404);
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&secret)
        .json(&chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // SIGHUP reloads too (after the bad file is fixed).
    std::fs::remove_file(gw.routes_dir().join("30-broken.yaml")).unwrap();
    gw.signal("HUP");
    let status = until_status(|| c.get(gw.url("/changed/v1/models")), |s| s == 200)
        .await
        .status()
        .as_u16();
    assert_eq!(status, 200);
}

async fn error_of(r: reqwest::Response) -> (u16, Value, bool) {
    let status = r.status().as_u16();
    let has_id = r.headers().contains_key("x-request-id");
    let body: Value = r.json().await.unwrap();
    (status, body, has_id)
}

fn assert_openai(body: &Value, code: &str) {
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"].is_string() && body["error"]["type"].is_string(),
        "{body}"
    );
}

fn assert_anthropic(body: &Value, kind: &str) {
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert!(body["error"]["message"].is_string());
}

fn assert_gemini(body: &Value, status: u16, name: &str) {
    assert_eq!(body["error"]["code"], status, "{body}");
    assert_eq!(body["error"]["status"], name, "{body}");
}

#[tokio::test]
async fn every_gateway_error_has_the_right_status_and_shape() {
    let (_mock, gw, secret) = setup().await;
    let c = reqwest::Client::new();

    let (s, b, id) = error_of(c.get(gw.url("/nowhere")).send().await.unwrap()).await;
    assert!(id);
    assert_eq!(s, 404);
    assert_openai(&b, "route_not_found");

    let (s, b, _) = error_of(
        c.post(gw.url("/v1/chat/completions"))
            .json(&chat("m"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 401);
    assert_openai(&b, "missing_api_key");
    let (s, b, _) = error_of(
        c.post(gw.url("/v1/messages"))
            .header("x-api-key", "fg_wrong")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 401);
    assert_anthropic(&b, "authentication_error");
    let (s, b, _) = error_of(c.post(gw.url("/v1beta/models/g:generateContent")).send().await.unwrap()).await;
    assert_eq!(s, 401);
    assert_gemini(&b, 401, "UNAUTHENTICATED");

    let (s, b, _) = error_of(c.get(gw.url("/tagged")).bearer_auth(&secret).send().await.unwrap()).await;
    assert_eq!(s, 403);
    assert_openai(&b, "permission_denied");

    let big = "y".repeat(3 * 1024 * 1024);
    let (s, b, _) = error_of(
        c.post(gw.url("/v1/messages"))
            .header("x-api-key", &secret)
            .body(big.clone())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 413);
    assert_anthropic(&b, "request_too_large");
    let (s, _, _) = error_of(c.post(gw.url("/plain/upload")).body(big).send().await.unwrap()).await;
    assert_eq!(s, 413);

    // Bad JSON matters only where the route needs the body (model routing).
    let routes = format!(
        "{ROUTES}\n  - name: by-model\n    match: {{ path: /by-model, model: ['gpt-*'] }}\n    upstream: oai\n"
    );
    write(&gw.routes_dir().join("10-test.yaml"), &routes);
    let bad_json = || c.post(gw.url("/by-model")).bearer_auth(&secret).body("{not json");
    let result = error_of(until_status(bad_json, |s| s != 404).await).await;
    assert_eq!(result.0, 400);
    assert_openai(&result.1, "invalid_json");

    let (s, b, _) = error_of(
        c.post(gw.url("/dead/v1/chat/completions"))
            .bearer_auth(&secret)
            .json(&chat("m"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 502);
    assert_openai(&b, "upstream_unreachable");
    let (s, b, _) = error_of(c.post(gw.url("/dead-stream")).body("streamed").send().await.unwrap()).await;
    assert_eq!(s, 502);
    assert_anthropic(&b, "api_error");

    let started = Instant::now();
    let (s, b, _) = error_of(c.post(gw.url("/slow")).bearer_auth(&secret).send().await.unwrap()).await;
    assert_eq!(s, 504);
    assert_gemini(&b, 504, "DEADLINE_EXCEEDED");
    assert!(started.elapsed() < Duration::from_secs(4), "timeout not applied");
}

#[tokio::test]
async fn retries_move_to_another_key_before_the_first_byte() {
    let mock = MockUpstream::start().await;
    let routes =
        "routes:\n  - { name: r, match: { path: /v1/chat/completions }, auth: none, upstream: oai, retries: 2 }\n";
    let gw = Gateway::start(&upstreams(&mock), &[("r.yaml", routes)]).await;
    mock.behaviour.fail_429.store(2, Ordering::SeqCst);
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let keys: HashSet<String> = mock
        .seen()
        .iter()
        .map(|s| s.header("authorization").unwrap().to_string())
        .collect();
    assert_eq!(mock.seen().len(), 3);
    assert_eq!(keys.len(), 3, "each retry used another key: {keys:?}");
    // The two keys that 429'd are cooling: when the last one 429s too, the
    // client hears when a key is usable again instead of a burst of retries.
    mock.clear();
    mock.behaviour.fail_429.store(5, Ordering::SeqCst);
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(mock.seen().len(), 1);
}

#[tokio::test]
async fn fallback_upstream_takes_over_when_the_first_is_down() {
    let mock = MockUpstream::start().await;
    let routes = "routes:\n  - { name: r, match: { path: /v1/chat/completions }, auth: none, upstream: dead, fallback: [oai] }\n";
    let gw = Gateway::start(&upstreams(&mock), &[("r.yaml", routes)]).await;
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(mock.seen().len(), 1);
}

#[tokio::test]
async fn request_ids_are_generated_or_kept() {
    let (_mock, gw, secret) = setup().await;
    let c = reqwest::Client::new();
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&secret)
        .header("x-request-id", "client-id-123")
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "client-id-123");
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&secret)
        .header("x-request-id", "bad id with spaces")
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_ne!(id, "bad id with spaces");
    assert_eq!(id.len(), 32);
    let deadline = Instant::now() + Duration::from_secs(3);
    while !gw.logs().contains(&id) {
        assert!(Instant::now() < deadline, "request id not in the logs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn revoked_and_expired_keys_stop_working() {
    let (_mock, gw, secret) = setup().await;
    let c = reqwest::Client::new();
    let (id, revoked) = gw.create_key(&[]);
    gw.wait_key(&revoked, "/v1/messages").await;
    let out = std::process::Command::new(common::bin())
        .args(["keys", "-c"])
        .arg(gw.config_path())
        .args(["revoke", &id])
        .output()
        .unwrap();
    assert!(out.status.success());
    let r = until_status(
        || c.post(gw.url("/v1/messages")).header("x-api-key", &revoked),
        |s| s == 401,
    )
    .await;
    assert_eq!(r.status(), 401, "a revoked key kept working");

    // A key that expires stops working, however slow the machine: it is
    // seen working first, then its expiry is moved to one second from now.
    let (expiring_id, expiring) = gw.create_key(&["--expires-in", "1h"]);
    gw.wait_key(&expiring, "/v1/messages").await;
    let conn = fastgate::store::open(&gw.db_path()).unwrap();
    conn.execute(
        "UPDATE gateway_keys SET expires_at = ?2 WHERE id = ?1",
        rusqlite::params![expiring_id, fastgate::clock::now_unix() + 1],
    )
    .unwrap();
    let r = until_status(
        || c.post(gw.url("/v1/messages")).header("x-api-key", &expiring),
        |s| s == 401,
    )
    .await;
    assert_eq!(r.status(), 401, "an expired key kept working");
    // The original key still works.
    let r = c
        .post(gw.url("/v1/messages"))
        .header("x-api-key", &secret)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// An upstream that reads a request and then "thinks" without answering,
/// reporting when the gateway closes the connection on it.
async fn thinking_upstream() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::Receiver<(&'static str, Instant)>,
) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut seen = Vec::new();
                loop {
                    match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => {
                            let _ = tx.send(("closed", Instant::now())).await;
                            return;
                        }
                        Ok(Ok(n)) => {
                            seen.extend_from_slice(&buf[..n]);
                            if seen.ends_with(b"}") {
                                let _ = tx.send(("request", Instant::now())).await;
                            }
                        }
                        Err(_) => return, // never answered, never closed
                    }
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn a_client_hanging_up_while_the_upstream_thinks_cancels_it_on_both_paths() {
    let (addr, mut events) = thinking_upstream().await;
    let config = format!(
        "upstreams:\n  thinker:\n    provider: openai\n    endpoints: ['http://{addr}']\n    key_pool: p\nkey_pools:\n  p:\n    keys: [sk-thinker]\n"
    );
    let routes = r#"
routes:
  - { name: streamed, match: { path: /streamed/v1/embeddings }, auth: none, format: openai, upstream: thinker, transform: { strip_prefix: /streamed } }
  - { name: buffered, match: { path: /buffered/v1/embeddings }, auth: none, format: openai, upstream: thinker, retries: 1, transform: { strip_prefix: /buffered } }
"#;
    let gw = Gateway::start(&config, &[("r.yaml", routes)]).await;
    let mut ids = Vec::new();
    for prefix in ["/streamed", "/buffered"] {
        let id = format!("hangup{}", &prefix[1..]);
        let body = r#"{"model":"m","input":"x"}"#;
        let mut client = tokio::net::TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
        let request = format!(
            "POST {prefix}/v1/embeddings HTTP/1.1\r\nHost: x\r\nx-request-id: {id}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        tokio::io::AsyncWriteExt::write_all(&mut client, request.as_bytes())
            .await
            .unwrap();
        let (what, _) = events.recv().await.unwrap();
        assert_eq!(what, "request", "{prefix}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let hung_up = Instant::now();
        drop(client);
        let (what, at) = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap_or_else(|_| panic!("{prefix}: the upstream connection stayed open after the client left"))
            .unwrap();
        assert_eq!(what, "closed", "{prefix}");
        let after = at.duration_since(hung_up);
        assert!(
            after < Duration::from_secs(1),
            "{prefix}: upstream closed {after:?} after the client"
        );
        ids.push(id);
    }
    let rows = gw.wait_audit_ids(ids.iter()).await;
    for id in &ids {
        let row = rows
            .iter()
            .find(|r| &r.request_id == id)
            .unwrap_or_else(|| panic!("no row for {id}"));
        assert_eq!(row.status, 499, "{row:?}");
        assert_eq!(row.error.as_deref(), Some("client closed the connection"), "{row:?}");
    }
    let metrics = common::eventually_text(
        || reqwest::Client::new().get(gw.admin_url("/metrics")),
        |m| m.contains("fastgate_requests_in_flight 0") && m.contains("fastgate_pool_in_flight{pool=\"p\"} 0"),
    )
    .await;
    assert!(metrics.contains("fastgate_requests_in_flight 0"), "{metrics}");
    assert!(metrics.contains("fastgate_pool_in_flight{pool=\"p\"} 0"), "{metrics}");
}

/// An upstream that starts a chunked answer of `content_type` and drops the
/// connection halfway.
async fn breaking_upstream(content_type: &'static str) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\n\r\n9\r\n{{\"partial\r\n"
                );
                let _ = s.write_all(head.as_bytes()).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                // Dropped here: no terminating chunk.
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_answer_the_upstream_breaks_off_never_looks_complete_on_both_paths() {
    let json_up = breaking_upstream("application/json").await;
    let sse_up = breaking_upstream("text/event-stream").await;
    let config = format!(
        "upstreams:\n  json:\n    provider: http\n    endpoints: ['http://{json_up}']\n  sse:\n    provider: http\n    endpoints: ['http://{sse_up}']\n"
    );
    let routes = r#"
routes:
  - { name: json-streamed, match: { path: /streamed/json }, auth: none, upstream: json }
  - { name: json-buffered, match: { path: /buffered/json }, auth: none, upstream: json, retries: 1 }
  - { name: sse-buffered, match: { path: /buffered/sse }, auth: none, format: anthropic, upstream: sse, retries: 1 }
"#;
    let gw = Gateway::start(&config, &[("r.yaml", routes)]).await;
    let mut ids = Vec::new();
    for path in ["/streamed/json", "/buffered/json"] {
        let id = format!("broken{}", path.replace('/', "-"));
        let answer = common::raw_http(
            gw.port,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nx-request-id: {id}\r\n\r\n"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
        assert!(answer.contains("partial"), "{path}: {answer}");
        assert!(
            !answer.ends_with("0\r\n\r\n"),
            "{path}: a broken body must not end with the chunked terminator: {answer:?}"
        );
        ids.push(id);
    }
    // An SSE stream ends with an error event, well-formed.
    let answer = common::raw_http(
        gw.port,
        "GET /buffered/sse HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.contains("event: error"), "{answer}");
    assert!(answer.ends_with("0\r\n\r\n"), "{answer:?}");

    let rows = gw.wait_audit_ids(ids.iter()).await;
    for id in &ids {
        let row = rows.iter().find(|r| &r.request_id == id).unwrap();
        assert!(row.error.is_some(), "the break is audited: {row:?}");
    }
}

/// Reading the route files (a `cat`, a backup, an editor opening one) is
/// not a change: it must not reload them, let alone start a loop in which
/// each reload's own reads trigger the next.
#[tokio::test]
async fn reading_the_route_files_does_not_reload_them() {
    let (_mock, gw, _secret) = setup().await;
    let reloads = async || -> usize { gw.logs().matches("Reloading routes.d.").count() };
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = reloads().await;
    for entry in std::fs::read_dir(gw.routes_dir()).unwrap() {
        let _ = std::fs::read(entry.unwrap().path()).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(reloads().await, before, "reloaded on a read:\n{}", gw.logs());
    // A real change still reloads, once.
    write(
        &gw.routes_dir().join("40-more.yaml"),
        "routes:\n  - { name: more, match: { path: '/more/{*rest}' }, auth: none, upstream: plain }\n",
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(reloads().await, before + 1, "{}", gw.logs());
}
