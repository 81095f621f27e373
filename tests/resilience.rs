//! The fault matrix: one pool with keys that are healthy, rate-limited,
//! revoked, failing, hanging and cut mid-stream, against a mock upstream
//! that behaves like the providers, through the real server on both
//! forwarding paths.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Gateway, KeyRule, MockUpstream, Scripted, eventually_text, script};
use fastgate::pool::key_id;
use serde_json::{Value, json};
use std::{
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

const TOKEN: &str = "resilience-admin-token-0123456789abcdef";

/// Start a gateway with the admin token, `upstreams`/`key_pools` YAML and routes.
async fn gateway(body: &str, routes: &str) -> Gateway {
    Gateway::start_with_admin(&format!("admin:\n  token: {TOKEN}\n{body}"), &[("r.yaml", routes)]).await
}

async fn admin(gw: &Gateway, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let c = reqwest::Client::new();
    let mut req = c
        .request(method.parse().unwrap(), gw.admin_url(path))
        .bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn pool_key(gw: &Gateway, pool: &str, secret: &str) -> Value {
    let (_, keys) = admin(gw, "GET", &format!("/api/pools/{pool}/keys"), None).await;
    common::pool_key_in(&keys, secret)
}

fn rule(mock: &MockUpstream, secret: &str, r: KeyRule) {
    mock.behaviour.keys.lock().unwrap().insert(secret.to_string(), r);
}

/// How many requests the upstream saw with `secret`.
fn seen_with(mock: &MockUpstream, secret: &str) -> usize {
    mock.seen()
        .iter()
        .filter(|s| {
            s.header("authorization") == Some(&format!("Bearer {secret}"))
                || s.header("x-api-key") == Some(secret)
                || s.header("x-goog-api-key") == Some(secret)
        })
        .count()
}

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4o", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

async fn post_chat(gw: &Gateway, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
}

const OPENAI_ROUTE: &str = "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, auth: none, upstream: oai, retries: 2 }\n";

/// The same route, declared idempotent: for the tests of failover after a
/// 500 or a timeout, which a POST otherwise never gets (the provider may
/// have acted on it; see tests/faults/retry.rs for that side).
const IDEMPOTENT_ROUTE: &str = "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, auth: none, upstream: oai, retries: 2, idempotent: true }\n";

fn openai_pool(mock: &MockUpstream, keys: &[&str], pool_extra: &str) -> String {
    format!(
        "upstreams:\n  oai: {{provider: openai, endpoints: ['{}'], key_pool: p}}\nkey_pools:\n  p: {{keys: [{}], strategy: round_robin{pool_extra}}}\n",
        mock.url(),
        keys.join(", ")
    )
}

#[tokio::test]
async fn a_429_key_cools_for_the_advertised_time_and_requests_succeed_on_another_key() {
    let mock = MockUpstream::start().await;
    rule(&mock, "sk-limited", KeyRule::RateLimited { retry_after: 30 });
    let gw = gateway(&openai_pool(&mock, &["sk-limited", "sk-good"], ""), OPENAI_ROUTE).await;
    for _ in 0..6 {
        let r = post_chat(&gw, &chat(false)).await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(seen_with(&mock, "sk-limited"), 1, "a cooling key is not tried again");
    assert_eq!(seen_with(&mock, "sk-good"), 6);
    let k = pool_key(&gw, "p", "sk-limited").await;
    assert_eq!(k["state"], "cooling", "{k}");
    let left = k["remaining_s"].as_f64().unwrap();
    assert!((25.0..=30.0).contains(&left), "cooling for Retry-After: {left}");
    assert_eq!(k["last_error"], "429 rate limited");
    let metrics = eventually_text(
        || reqwest::Client::new().get(gw.admin_url("/metrics")),
        |t| t.contains("fastgate_failovers_total{reason=\"status_429\"} 1"),
    )
    .await;
    assert!(
        metrics.contains("fastgate_pool_keys{pool=\"p\",state=\"cooling\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fastgate_pool_keys{pool=\"p\",state=\"active\"} 1"),
        "{metrics}"
    );
    let id = key_id("sk-limited");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("fastgate_pool_key_cooldown_seconds") && l.contains(&id))
        .unwrap();
    let secs: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(secs > 20.0, "{line}");
    // The failed-over request's audit row names both attempts.
    let rows = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let rows = gw.audit_rows();
            if rows.len() >= 6 || Instant::now() > deadline {
                break rows;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let failed_over: Vec<_> = rows.iter().filter(|r| r.retries > 0).collect();
    assert_eq!(failed_over.len(), 1);
    let attempts = failed_over[0].attempts.as_deref().unwrap();
    assert!(attempts.contains(&format!("{id} 429")), "{attempts}");
    assert!(attempts.contains(&format!("{} 200", key_id("sk-good"))), "{attempts}");
}

#[tokio::test]
async fn a_one_key_pool_that_429s_answers_503_with_the_soonest_retry_after_on_both_paths() {
    let mock = MockUpstream::start().await;
    rule(&mock, "sk-only", KeyRule::RateLimited { retry_after: 7 });
    let routes = "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, auth: none, upstream: oai, retries: 2 }\n  - { name: models, match: { path: /v1/models }, format: openai, auth: none, upstream: oai }\n";
    let gw = gateway(&openai_pool(&mock, &["sk-only"], ""), routes).await;
    let r = post_chat(&gw, &chat(false)).await;
    assert_eq!(r.status(), 503);
    let after: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((6..=7).contains(&after), "Retry-After {after}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_upstream_key", "{body}");
    assert_eq!(seen_with(&mock, "sk-only"), 1, "no instant retry on the same key");
    // The streaming path (body untouched) knows the key is cooling too.
    let r = reqwest::get(gw.url("/v1/models")).await.unwrap();
    assert_eq!(r.status(), 503);
    let after: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=7).contains(&after), "Retry-After {after}");
    assert_eq!(seen_with(&mock, "sk-only"), 1);
}

#[tokio::test]
async fn two_401s_disable_a_key_until_an_admin_enables_it() {
    let mock = MockUpstream::start().await;
    rule(&mock, "sk-revoked", KeyRule::Status(401));
    let gw = gateway(
        &openai_pool(&mock, &["sk-revoked", "sk-good"], ", disable_after: 2"),
        OPENAI_ROUTE,
    )
    .await;
    for _ in 0..8 {
        assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200);
    }
    assert_eq!(seen_with(&mock, "sk-revoked"), 2, "disabled after two 401s");
    let k = pool_key(&gw, "p", "sk-revoked").await;
    assert_eq!(k["state"], "disabled", "{k}");
    assert!(k["reason"].as_str().unwrap().contains("401"), "{k}");
    // Disabled means never, however long one waits.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for _ in 0..4 {
        assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200);
    }
    assert_eq!(seen_with(&mock, "sk-revoked"), 2);
    // Re-enabled (the provider fixed it): back in rotation.
    mock.behaviour.keys.lock().unwrap().remove("sk-revoked");
    let id = key_id("sk-revoked");
    let (status, k) = admin(
        &gw,
        "PATCH",
        &format!("/api/pools/p/keys/{id}"),
        Some(json!({"enabled": true})),
    )
    .await;
    assert_eq!(status, 200, "{k}");
    assert_eq!(k["state"], "active");
    for _ in 0..4 {
        assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200);
    }
    assert!(seen_with(&mock, "sk-revoked") >= 3);
    // An admin can also take a key out by hand.
    let (_, k) = admin(
        &gw,
        "PATCH",
        &format!("/api/pools/p/keys/{id}"),
        Some(json!({"enabled": false})),
    )
    .await;
    assert_eq!(k["state"], "disabled");
    assert!(k["reason"].as_str().unwrap().starts_with("disabled by admin"), "{k}");
}

#[tokio::test]
async fn a_nearly_spent_key_is_rested_before_it_429s() {
    let mock = MockUpstream::start().await;
    rule(
        &mock,
        "sk-small",
        KeyRule::Window {
            limit: 3,
            used: AtomicU32::new(0),
            reset: "1m0s",
        },
    );
    // No retries: any 429 would reach the client.
    let routes = "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, auth: none, upstream: oai }\n";
    let gw = gateway(&openai_pool(&mock, &["sk-small", "sk-big"], ""), routes).await;
    for i in 0..12 {
        let r = post_chat(&gw, &chat(false)).await;
        assert_eq!(r.status(), 200, "request {i}");
    }
    assert_eq!(
        seen_with(&mock, "sk-small"),
        3,
        "used up to its last request, never past it"
    );
    let k = pool_key(&gw, "p", "sk-small").await;
    assert_eq!(k["state"], "resting", "{k}");
    assert!(k["remaining_s"].as_f64().unwrap() > 50.0);
}

#[tokio::test]
async fn a_gemini_429_for_one_model_leaves_other_models_usable_on_that_key() {
    let mock = MockUpstream::start().await;
    rule(
        &mock,
        "AIza-one",
        KeyRule::ModelLimited {
            model: "gemini-a".into(),
        },
    );
    let body = format!(
        "upstreams:\n  g: {{provider: gemini, endpoints: ['{}'], key_pool: gp}}\nkey_pools:\n  gp: {{keys: [AIza-one], cooldown: {{initial: 30s, max: 1m}}}}\n",
        mock.url()
    );
    // `gemini` reads the body (retries): the 429's RetryInfo sets the
    // cooldown; `gemini-raw` is Pingora's streaming path.
    let routes = "routes:\n  - { name: gemini, match: { path: '/v1beta/{*rest}' }, format: gemini, auth: none, upstream: g, retries: 1 }\n  - { name: gemini-raw, match: { path: '/raw/v1beta/{*rest}' }, format: gemini, auth: none, upstream: g, transform: { strip_prefix: /raw } }\n";
    let gw = gateway(&body, routes).await;
    let c = reqwest::Client::new();
    let ask = |model: &str| {
        c.post(gw.url(&format!("/v1beta/models/{model}:generateContent")))
            .json(&json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}))
            .send()
    };
    let r = ask("gemini-a").await.unwrap();
    assert_eq!(
        r.status(),
        503,
        "model a cools on the only key; the retry finds no key for it"
    );
    let after: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        (44..=45).contains(&after),
        "Gemini's RetryInfo (45 s), not the backoff (30 s): {after}"
    );
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["status"], "UNAVAILABLE", "Gemini's error shape: {err}");
    assert_eq!(seen_with(&mock, "AIza-one"), 1);
    assert_eq!(ask("gemini-b").await.unwrap().status(), 200, "model b is fine");
    // The streaming path knows model a is cooling, and model b is fine there too.
    let raw = |model: &str| {
        c.post(gw.url(&format!("/raw/v1beta/models/{model}:generateContent")))
            .json(&json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}))
            .send()
    };
    assert_eq!(raw("gemini-a").await.unwrap().status(), 503);
    assert_eq!(raw("gemini-b").await.unwrap().status(), 200);
    let k = pool_key(&gw, "gp", "AIza-one").await;
    assert_eq!(k["state"], "active", "{k}");
    assert_eq!(k["models"]["gemini-a"]["state"], "cooling", "{k}");
    let (_, pools) = admin(&gw, "GET", "/api/pools", None).await;
    assert_eq!(
        pools[0]["cooldown_scope"], "model",
        "Gemini pools default to per-model cooldown"
    );
}

#[tokio::test]
async fn a_hanging_key_hits_the_first_byte_timeout_and_fails_over() {
    let mock = MockUpstream::start().await;
    rule(&mock, "sk-hang", KeyRule::Hang);
    let body = format!(
        "upstreams:\n  oai: {{provider: openai, endpoints: ['{}'], key_pool: p, timeouts: {{first_byte: 300ms}}}}\nkey_pools:\n  p: {{keys: [sk-hang, sk-good]}}\n",
        mock.url()
    );
    let gw = gateway(&body, IDEMPOTENT_ROUTE).await;
    for _ in 0..2 {
        let started = Instant::now();
        let r = post_chat(&gw, &chat(false)).await;
        assert_eq!(r.status(), 200);
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let rows = loop {
        let rows = gw.audit_rows();
        if rows.len() >= 2 || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Round robin starts on the hanging key: the first request waited for it.
    let trail = rows[0].attempts.as_deref().unwrap_or_default();
    assert!(
        trail.contains(&format!("{} upstream_timeout", key_id("sk-hang"))),
        "{rows:?}"
    );
    assert_eq!(rows[0].status, 200);
}

#[tokio::test]
async fn a_1mib_request_fails_over_intact() {
    let mock = MockUpstream::start().await;
    rule(&mock, "sk-broken", KeyRule::Status(500));
    let gw = gateway(&openai_pool(&mock, &["sk-broken", "sk-good"], ""), IDEMPOTENT_ROUTE).await;
    let big = "x".repeat(1024 * 1024);
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": big}]});
    let sent = serde_json::to_vec(&body).unwrap();
    for _ in 0..2 {
        assert_eq!(post_chat(&gw, &body).await.status(), 200);
    }
    let seen = mock.seen();
    assert!(seen_with(&mock, "sk-broken") >= 1);
    for s in &seen {
        assert_eq!(s.body.len(), sent.len(), "every attempt got the whole body");
        assert_eq!(&s.body[..], &sent[..]);
    }
}

/// Read an SSE response to its end; (text, whether it ended cleanly).
async fn read_stream(r: reqwest::Response) -> (String, bool) {
    use futures_util::StreamExt;
    let mut body = r.bytes_stream();
    let mut text = String::new();
    let mut clean = true;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(b) => text.push_str(&String::from_utf8_lossy(&b)),
            Err(_) => {
                clean = false;
                break;
            }
        }
    }
    (text, clean)
}

#[tokio::test]
async fn a_stream_cut_mid_way_ends_with_an_error_event_and_an_audit_row_on_both_paths() {
    let mock = MockUpstream::start().await;
    rule(&mock, "sk-cut", KeyRule::CutMidStream);
    // `chat` reads the body (usage on streams): FastGate's own forwarding.
    // `raw` is passthrough with no retries: Pingora's streaming path.
    let routes = "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, auth: none, upstream: oai }\n  - { name: raw, match: { path: /raw/chat }, format: passthrough, auth: none, upstream: oai, transform: { rewrite_path: /v1/chat/completions } }\n";
    let gw = gateway(&openai_pool(&mock, &["sk-cut"], ""), routes).await;
    let c = reqwest::Client::new();
    for path in ["/v1/chat/completions", "/raw/chat"] {
        let r = c
            .post(gw.url(path))
            .header("x-request-id", format!("cut{}", path.len()))
            .json(&chat(true))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let (text, _) = read_stream(r).await;
        assert!(text.contains("t0") && text.contains("t1"), "{path}: {text}");
        let last = text.trim_end().rsplit("\n\n").next().unwrap();
        assert!(
            last.starts_with("data: {\"error\""),
            "{path} ends with an error event: {text}"
        );
        assert!(!text.contains("[DONE]"));
    }
    let ids = ["cut20".to_string(), "cut9".to_string()];
    let rows = gw.wait_audit_ids(ids.iter()).await;
    for id in &ids {
        let row = rows.iter().find(|r| &r.request_id == id).unwrap();
        assert!(row.error.is_some(), "audit row for {id} names the error: {row:?}");
    }
}

#[tokio::test]
async fn when_every_address_fails_its_health_check_requests_still_go_to_one() {
    // Red team: a health check that fails everywhere (a path the provider
    // answers 500 without a key) made every request a 502 "no resolvable
    // endpoint" without one attempt. Like Envoy's panic threshold and
    // nginx's reset of failed servers: with no healthy address, try any.
    let mock = MockUpstream::start().await;
    script(&mock, |key, _| async move {
        key.is_none().then(|| Scripted {
            status: 500,
            headers: Vec::new(),
        })
    });
    let body = format!(
        "upstreams:\n  oai: {{provider: openai, endpoints: ['{}'], key_pool: p, health_check: {{path: /v1/models, interval: 200ms, timeout: 200ms}}}}\nkey_pools:\n  p: {{keys: [sk-good]}}\n",
        mock.url()
    );
    let routes = "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, auth: none, upstream: oai }\n";
    let gw = gateway(&body, routes).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, ups) = admin(&gw, "GET", "/api/upstreams", None).await;
        if ups[0]["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["healthy"] == false)
        {
            break;
        }
        assert!(Instant::now() < deadline, "the address never failed its check: {ups}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..3 {
        assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200);
    }
}

#[tokio::test]
async fn an_unhealthy_endpoint_is_skipped_and_comes_back() {
    let mock = MockUpstream::start().await;
    // An address nothing listens on (yet).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let body = format!(
        "upstreams:\n  oai: {{provider: openai, endpoints: ['{}', 'http://{dead_addr}'], key_pool: p, health_check: {{type: tcp, interval: 200ms, timeout: 200ms}}}}\nkey_pools:\n  p: {{keys: [sk-good]}}\n",
        mock.url()
    );
    let routes = "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, auth: none, upstream: oai }\n";
    let gw = gateway(&body, routes).await;
    let health = || async {
        let (_, ups) = admin(&gw, "GET", "/api/upstreams", None).await;
        ups[0]["addresses"].as_array().unwrap().clone()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while health()
        .await
        .iter()
        .any(|a| a["healthy"] == true && a["address"] == dead_addr.to_string())
    {
        assert!(Instant::now() < deadline, "the dead address never failed its check");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..10 {
        assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200);
    }
    // It comes back: something listens there now.
    let revived = tokio::net::TcpListener::bind(dead_addr).await.unwrap();
    let seen = std::sync::Arc::new(AtomicU32::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = revived.accept().await else { return };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 65536];
                let _ = s.read(&mut buf).await;
                let body = r#"{"id":"c2","object":"chat.completion","choices":[]}"#;
                let _ = s
                    .write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).as_bytes())
                    .await;
            });
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !health().await.iter().all(|a| a["healthy"] == true) {
        assert!(Instant::now() < deadline, "the revived address never passed its check");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_unreachable_address_family_still_gets_every_request_through() {
    let mock = MockUpstream::start().await;
    let port = mock.addr.port();
    // The same service under an IPv6 address it does not listen on (as on an
    // IPv4-only host), and its IPv4 one. A refused connection spends a retry
    // like any attempt (no free loop over addresses), so one retry is what
    // gets every request through; nothing was sent on the refused one.
    let body = format!(
        "upstreams:\n  oai: {{provider: openai, endpoints: ['http://[::1]:{port}', 'http://127.0.0.1:{port}'], key_pool: p}}\nkey_pools:\n  p: {{keys: [sk-good]}}\n"
    );
    let routes = "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, auth: none, upstream: oai, retries: 1 }\n  - { name: models, match: { path: /v1/models }, format: openai, auth: none, upstream: oai, retries: 1 }\n";
    let gw = gateway(&body, routes).await;
    for i in 0..20 {
        assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200, "request {i}");
        assert_eq!(
            reqwest::get(gw.url("/v1/models")).await.unwrap().status(),
            200,
            "request {i}"
        );
    }
}

#[tokio::test]
async fn key_states_and_totals_survive_a_restart() {
    let mock = MockUpstream::start().await;
    rule(&mock, "sk-revoked", KeyRule::Status(401));
    rule(&mock, "sk-limited", KeyRule::RateLimited { retry_after: 600 });
    let mut gw = gateway(
        &openai_pool(&mock, &["sk-revoked", "sk-limited", "sk-good"], ", disable_after: 1"),
        OPENAI_ROUTE,
    )
    .await;
    for _ in 0..6 {
        assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200);
    }
    let good_before = pool_key(&gw, "p", "sk-good").await["totals"]["requests"]
        .as_u64()
        .unwrap();
    gw.restart().await;
    let revoked = pool_key(&gw, "p", "sk-revoked").await;
    assert_eq!(revoked["state"], "disabled", "{revoked}");
    let limited = pool_key(&gw, "p", "sk-limited").await;
    assert_eq!(limited["state"], "cooling", "{limited}");
    assert!(limited["remaining_s"].as_f64().unwrap() > 500.0);
    let good = pool_key(&gw, "p", "sk-good").await;
    assert_eq!(good["totals"]["requests"].as_u64().unwrap(), good_before);
    assert!(good["totals"]["tokens"].as_u64().unwrap() > 0, "{good}");
    let before = (seen_with(&mock, "sk-revoked"), seen_with(&mock, "sk-limited"));
    for _ in 0..4 {
        assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200);
    }
    assert_eq!((seen_with(&mock, "sk-revoked"), seen_with(&mock, "sk-limited")), before);
}

#[tokio::test]
async fn in_flight_counts_return_to_zero_after_a_burst_with_client_disconnects() {
    let mock = MockUpstream::start().await;
    mock.behaviour.sse_interval_ms.store(100, Ordering::SeqCst);
    let routes = "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, auth: none, upstream: oai }\n  - { name: raw, match: { path: /raw/chat }, format: passthrough, auth: none, upstream: oai, transform: { rewrite_path: /v1/chat/completions } }\n";
    let gw = gateway(&openai_pool(&mock, &["sk-a", "sk-b"], ""), routes).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let url = gw.url(if i % 2 == 0 {
            "/v1/chat/completions"
        } else {
            "/raw/chat"
        });
        tasks.push(tokio::spawn(async move {
            let r = reqwest::Client::new().post(url).json(&chat(true)).send().await.unwrap();
            if i % 4 < 2 {
                // Hang up after the first bytes.
                drop(r);
            } else {
                let _ = read_stream(r).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, keys) = admin(&gw, "GET", "/api/pools/p/keys", None).await;
        let busy: u64 = keys
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["in_flight"].as_u64().unwrap())
            .sum();
        let (_, ups) = admin(&gw, "GET", "/api/upstreams", None).await;
        if busy == 0 && ups[0]["in_flight"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "leases still held: {keys} {ups}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_reload_that_replaces_a_key_keeps_in_flight_requests_alive() {
    let mock = MockUpstream::start().await;
    mock.behaviour.sse_interval_ms.store(150, Ordering::SeqCst);
    let routes = "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, auth: none, upstream: oai }\n";
    let gw = gateway(&openai_pool(&mock, &["sk-old"], ""), routes).await;
    let long = post_chat(&gw, &chat(true)).await;
    assert_eq!(long.status(), 200);
    let reading = tokio::spawn(read_stream(long));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let config = std::fs::read_to_string(gw.config_path()).unwrap();
    common::write(&gw.config_path(), &config.replace("sk-old", "sk-new"));
    let (status, body) = admin(&gw, "POST", "/api/config/reload", Some(json!({}))).await;
    assert_eq!(status, 200, "{body}");
    let (text, clean) = reading.await.unwrap();
    assert!(
        clean && text.contains("[DONE]"),
        "the stream that began before the reload finished: {text}"
    );
    assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200);
    assert_eq!(mock.last().header("authorization"), Some("Bearer sk-new"));
    let (_, keys) = admin(&gw, "GET", "/api/pools/p/keys", None).await;
    assert_eq!(keys.as_array().unwrap().len(), 1);
    assert_eq!(keys[0]["id"], key_id("sk-new").as_str());
    // A broken file keeps the old config serving, with every error reported.
    common::write(
        &gw.config_path(),
        &config
            .replace("sk-old", "sk-new")
            .replace("key_pool: p", "key_pool: nope"),
    );
    let (status, body) = admin(&gw, "POST", "/api/config/reload", Some(json!({}))).await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("nope"), "{body}");
    assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200);
    // SIGHUP reloads the whole file too.
    common::write(&gw.config_path(), &config.replace("sk-old", "sk-hup"));
    gw.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200);
        if mock.last().header("authorization") == Some("Bearer sk-hup") {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP did not reload the key pools");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_upstream_over_max_in_flight_answers_503_and_the_fallback_takes_over() {
    let mock = MockUpstream::start().await;
    mock.behaviour.sse_interval_ms.store(200, Ordering::SeqCst);
    let body = format!(
        "upstreams:\n  oai: {{provider: openai, endpoints: ['{u}'], key_pool: p, max_in_flight: 1}}\n  spare: {{provider: openai, endpoints: ['{u}'], key_pool: q}}\nkey_pools:\n  p: {{keys: [sk-main]}}\n  q: {{keys: [sk-spare]}}\n",
        u = mock.url()
    );
    let routes = "routes:\n  - { name: solo, match: { path: /solo/chat }, format: openai, auth: none, upstream: oai, transform: { rewrite_path: /v1/chat/completions } }\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, auth: none, upstream: oai, fallback: [spare] }\n";
    let gw = gateway(&body, routes).await;
    let held = post_chat(&gw, &chat(true)).await;
    assert_eq!(held.status(), 200);
    let r = reqwest::Client::new()
        .post(gw.url("/solo/chat"))
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let r = post_chat(&gw, &chat(false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(mock.last().header("authorization"), Some("Bearer sk-spare"));
    drop(held);
}

#[tokio::test]
async fn pool_keys_are_added_in_bulk_tested_and_never_shown() {
    let mock = MockUpstream::start().await;
    let body = format!(
        "secrets:\n  master_key: a-test-master-key-of-at-least-32-chars\n{}",
        openai_pool(&mock, &["sk-config-key-1"], "")
    );
    let gw = gateway(&body, OPENAI_ROUTE).await;
    let (status, added) = admin(
        &gw,
        "POST",
        "/api/pools/p/keys",
        Some(json!({"text": "sk-added-aaaa1111\n\nsk-added-bbbb2222\nsk-config-key-1\nsk-added-aaaa1111\n", "test": true})),
    )
    .await;
    assert_eq!(status, 200, "{added}");
    assert_eq!(added["added"].as_array().unwrap().len(), 2, "{added}");
    assert_eq!(added["duplicates"].as_array().unwrap().len(), 2, "{added}");
    assert_eq!(added["tests"][0]["test"]["status"], 200, "{added}");
    assert!(added["tests"][0]["test"]["latency_ms"].as_f64().is_some());
    assert_eq!(mock.last().uri, "/v1/models", "the test is a cheap real call");
    for _ in 0..6 {
        assert_eq!(post_chat(&gw, &chat(false)).await.status(), 200);
    }
    assert!(seen_with(&mock, "sk-added-bbbb2222") >= 2, "added keys serve at once");
    // A config key cannot be deleted here; an added one can.
    let (status, _) = admin(
        &gw,
        "DELETE",
        &format!("/api/pools/p/keys/{}", key_id("sk-config-key-1")),
        None,
    )
    .await;
    assert_eq!(status, 409);
    let gone = key_id("sk-added-aaaa1111");
    let (status, _) = admin(&gw, "DELETE", &format!("/api/pools/p/keys/{gone}"), None).await;
    assert_eq!(status, 200);
    // Added keys survive a restart (sealed in the database), deleted ones do not.
    let mut gw = gw;
    gw.restart().await;
    let (_, keys) = admin(&gw, "GET", "/api/pools/p/keys", None).await;
    let ids: Vec<&str> = keys
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&key_id("sk-added-bbbb2222").as_str()) && !ids.contains(&gone.as_str()),
        "{ids:?}"
    );
    let conn = fastgate::store::open(&gw.db_path()).unwrap();
    let stored: String = conn
        .query_row("SELECT group_concat(secret, ' ') FROM pool_keys", [], |r| r.get(0))
        .unwrap();
    assert!(
        stored.starts_with("fgseal1:") && !stored.contains("sk-added"),
        "sealed at rest"
    );
    // No secret in any API answer, metric, log line or audit row.
    let mut everything = String::new();
    for path in [
        "/api/pools",
        "/api/pools/p/keys",
        "/api/upstreams",
        "/api/config",
        "/metrics",
        "/api/logs?limit=100",
    ] {
        let r = reqwest::Client::new()
            .get(gw.admin_url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        everything.push_str(&r.text().await.unwrap());
    }
    everything.push_str(&gw.logs());
    everything.push_str(&format!("{:?}", gw.audit_rows()));
    for secret in ["sk-added-aaaa1111", "sk-added-bbbb2222", "sk-config-key-1"] {
        assert!(!everything.contains(secret), "{secret} leaked");
    }
}

#[tokio::test]
async fn adding_pool_keys_without_a_master_key_is_refused_clearly() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&openai_pool(&mock, &["sk-config"], ""), OPENAI_ROUTE).await;
    let (status, body) = admin(&gw, "POST", "/api/pools/p/keys", Some(json!({"keys": ["sk-new-one"]}))).await;
    assert_eq!(status, 409);
    assert!(
        body["error"]["message"].as_str().unwrap().contains("master_key"),
        "{body}"
    );
    assert_eq!(
        post_chat(&gw, &chat(false)).await.status(),
        200,
        "config keys still work"
    );
}

#[tokio::test]
async fn a_refused_pool_key_is_never_quoted_to_the_client() {
    let mock = MockUpstream::start().await;
    rule(&mock, "sk-only-revoked", KeyRule::Status(401));
    let gw = gateway(&openai_pool(&mock, &["sk-only-revoked"], ""), OPENAI_ROUTE).await;
    let r = post_chat(&gw, &chat(false)).await;
    assert_eq!(r.status(), 401);
    let body = r.text().await.unwrap();
    assert!(!body.contains("sk-only-revoked"), "{body}");
    assert!(body.contains("refused FastGate's provider key"), "{body}");
}
