//! Faults: metering (see docs/resilience.md, "Metering requests that do not
//! finish"). A request that reached the provider and ended without its
//! usage (the client hung up, the upstream cut the stream) is charged an
//! estimate, audited with `usage_estimated`, and counted against the key's
//! `tpm`; refusals charge nothing; idle limiter scopes are forgotten.

use crate::common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

const TOKEN: &str = "metering-admin-token-0123456789abcdef";

const ROUTES: &str = r#"
routes:
  - { name: chat, match: { path: /v1/chat/completions }, format: openai, upstream: oai }
  - { name: messages, match: { path: /v1/messages }, format: anthropic, upstream: ant }
  - { name: dead, match: { path: /dead/v1/chat/completions }, format: openai, upstream: dead, transform: { strip_prefix: /dead } }
"#;

/// A gateway in front of `mock` (OpenAI and Anthropic, one pool key each)
/// and a gateway key with `tpm`; returns (gateway, key secret).
async fn start(mock: &MockUpstream, tpm: u64) -> (Gateway, String) {
    start_with(mock, tpm, "").await
}

/// Like `start`, with `extra` config (a `cluster:` block).
async fn start_with(mock: &MockUpstream, tpm: u64, extra: &str) -> (Gateway, String) {
    let config = format!(
        "admin:\n  token: {TOKEN}\n{extra}upstreams:\n  oai: {{provider: openai, endpoints: ['{u}'], key_pool: p}}\n  ant: {{provider: anthropic, endpoints: ['{u}'], key_pool: a}}\n  dead: {{provider: openai, endpoints: ['http://127.0.0.1:{dead}']}}\nkey_pools:\n  p: {{keys: [sk-1]}}\n  a: {{keys: [sk-ant]}}\n",
        u = mock.url(),
        dead = free_port(),
    );
    let gw = Gateway::start_with_admin(&config, &[("r.yaml", ROUTES)]).await;
    let (_, secret) = gw.create_key(&["--tpm", &tpm.to_string()]);
    // A route whose upstream refuses connections: no tokens, no mock call.
    gw.wait_key(&secret, "/dead/v1/chat/completions").await;
    (gw, secret)
}

/// A chat request whose body is about `bytes` long (the prompt estimate is
/// a quarter of the body).
fn chat(stream: bool, bytes: usize) -> Value {
    let mut body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(bytes)}]});
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// Read SSE events until `n` of them arrived, then hang up (drop the
/// response and its connection); returns the request id.
async fn read_then_hang_up(r: reqwest::Response, n: usize) -> String {
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut text = String::new();
    let mut s = r.bytes_stream();
    while text.matches("data: ").count() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("the stream stalled")
            .expect("the stream ended early")
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    drop(s);
    id
}

/// The audit row of request `id`, once written.
async fn row(gw: &Gateway, id: &String) -> fastgate::store::audit::AuditRecord {
    let rows = gw.wait_audit_ids([id]).await;
    rows.into_iter()
        .find(|r| &r.request_id == id)
        .unwrap_or_else(|| panic!("no audit row for {id}"))
}

/// The tokens the pool key `secret` of `pool` has used, per the admin API.
async fn pool_tokens(gw: &Gateway, pool: &str, secret: &str) -> u64 {
    let keys: Value = reqwest::Client::new()
        .get(gw.admin_url(&format!("/api/pools/{pool}/keys")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    pool_key_in(&keys, secret)["totals"]["tokens"].as_u64().unwrap()
}

async fn post(gw: &Gateway, secret: &str, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(gw.url(path))
        .bearer_auth(secret)
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_client_that_hangs_up_before_the_usage_chunk_is_charged_the_estimate() {
    let mock = MockUpstream::start().await;
    // 400 bytes of prompt: about 100 tokens estimated, over the tpm of 80.
    let (gw, secret) = start(&mock, 80).await;
    mock.behaviour.sse_interval_ms.store(300, Ordering::SeqCst);
    let body = chat(true, 400);
    let r = post(&gw, &secret, "/v1/chat/completions", &body).await;
    let id = read_then_hang_up(r, 2).await;

    let row = row(&gw, &id).await;
    assert_eq!(row.status, 499, "{row:?}");
    assert!(row.usage_estimated, "{row:?}");
    let prompt = row.prompt_tokens.unwrap();
    let completion = row.completion_tokens.unwrap();
    // The reservation's prompt estimate: a quarter of the body sent upstream.
    assert_eq!(prompt, row.request_bytes / 4, "{row:?}");
    assert!(prompt >= 100, "{row:?}");
    // Two content chunks reached the client; the hang-up stops the relay
    // before the next (300 ms later): one token per SSE data line.
    assert!((2..=3).contains(&completion), "{row:?}");
    assert_eq!(
        pool_tokens(&gw, "p", "sk-1").await,
        prompt + completion,
        "the pool key's totals count the estimate"
    );
    assert!(
        gw.metrics()
            .await
            .contains("fastgate_usage_estimated_total{route=\"chat\"} 1"),
        "{}",
        gw.metrics().await
    );

    // The estimate counted against the key's tpm: the next request is refused
    // by FastGate, and the provider never sees it.
    let seen = mock.seen().len();
    let r = post(&gw, &secret, "/v1/chat/completions", &chat(false, 10)).await;
    assert_eq!(r.status(), 429, "{}", r.text().await.unwrap());
    assert_eq!(mock.seen().len(), seen);
}

/// The upstream drops the connection after two events of a stream sent to
/// `path` (FastGate's own forwarding for OpenAI, which reads the body to ask
/// for usage; Pingora's for Anthropic, whose body is streamed untouched).
async fn upstream_cut(path: &str, body: Value) {
    let mock = MockUpstream::start().await;
    let (gw, secret) = start(&mock, 80).await;
    rule_all(&mock, KeyRule::CutMidStream);
    let r = post(&gw, &secret, path, &body).await;
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    // The client reads to the end: two chunks, then the cut (FastGate's
    // error event, or a connection closed without a clean end).
    let text = String::from_utf8_lossy(&r.bytes().await.unwrap_or_default()).to_string();
    assert!(text.contains("t1") || path.ends_with("/messages"), "{text}");

    let row = row(&gw, &id).await;
    assert!(row.usage_estimated, "{row:?}");
    assert!(row.error.is_some(), "{row:?}");
    assert_eq!(row.prompt_tokens, Some(row.request_bytes / 4), "{row:?}");
    assert!(row.request_bytes >= 400, "{row:?}");
    assert_eq!(row.completion_tokens, Some(2), "two chunks arrived: {row:?}");

    *mock.behaviour.every_key.lock().unwrap() = None;
    let seen = mock.seen().len();
    let r = post(&gw, &secret, path, &body).await;
    assert_eq!(r.status(), 429, "{}", r.text().await.unwrap());
    assert_eq!(mock.seen().len(), seen);
}

/// A non-stream answer to `path` whose body the upstream cuts midway, after
/// the first half was relayed.
async fn json_cut(path: &str, body: Value) {
    let mock = MockUpstream::start().await;
    let (gw, secret) = start(&mock, 80).await;
    mock.behaviour.cut_json_body.store(true, Ordering::SeqCst);
    let r = post(&gw, &secret, path, &body).await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let status = r.status();
    let got = r.bytes().await;
    let row = row(&gw, &id).await;
    assert_eq!(status, 200);
    assert!(
        got.is_err(),
        "the client must not take half a body for a whole one: {got:?}"
    );
    assert!(row.usage_estimated, "{row:?}");
    assert_eq!(row.prompt_tokens, Some(row.request_bytes / 4), "{row:?}");
    assert!(row.request_bytes >= 400, "{row:?}");
    // Half of the provider's JSON (its usage comes last): its bytes / 4.
    let completion = row.completion_tokens.unwrap();
    assert!((10..=60).contains(&completion), "{row:?}");

    mock.behaviour.cut_json_body.store(false, Ordering::SeqCst);
    let seen = mock.seen().len();
    let r = post(&gw, &secret, path, &body).await;
    assert_eq!(r.status(), 429, "{}", r.text().await.unwrap());
    assert_eq!(mock.seen().len(), seen);
}

#[tokio::test]
async fn a_json_answer_cut_mid_body_is_charged_the_estimate() {
    json_cut("/v1/chat/completions", chat(false, 400)).await;
}

#[tokio::test]
async fn a_json_answer_cut_mid_body_on_pingoras_path_is_charged_the_estimate() {
    let body = json!({"model": "claude", "max_tokens": 50, "messages": [{"role": "user", "content": "x".repeat(400)}]});
    json_cut("/v1/messages", body).await;
}

#[tokio::test]
async fn in_cluster_mode_the_estimate_is_settled_in_redis() {
    let redis = Redis::start().await;
    let mock = MockUpstream::start().await;
    let cluster = format!("cluster:\n  redis: {}\n  timeout: 1s\n", redis.url());
    let (gw, secret) = start_with(&mock, 80, &cluster).await;
    // The key's first requests (502s while it loaded) reserved tokens until
    // their settlements (0 tokens) reach Redis.
    tokio::time::sleep(Duration::from_secs(1)).await;
    mock.behaviour.sse_interval_ms.store(300, Ordering::SeqCst);
    let r = post(&gw, &secret, "/v1/chat/completions", &chat(true, 400)).await;
    let id = read_then_hang_up(r, 2).await;
    gw.wait_audit_ids([&id]).await;
    // Settlements go to Redis in the background, batched: once they are in,
    // the shared window holds the estimate (the reservation was replaced by
    // it, not released), and the next request is refused by Redis's count.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = mock.seen().len();
    let r = post(&gw, &secret, "/v1/chat/completions", &chat(false, 10)).await;
    assert_eq!(r.status(), 429, "{}", r.text().await.unwrap());
    assert_eq!(mock.seen().len(), seen);
    let row = row(&gw, &id).await;
    assert!(row.usage_estimated, "{row:?}");
    let charged = row.prompt_tokens.unwrap() + row.completion_tokens.unwrap();
    assert!(charged >= 100, "{row:?}");
}

#[tokio::test]
async fn a_stream_the_upstream_cuts_is_charged_the_estimate() {
    upstream_cut("/v1/chat/completions", chat(true, 400)).await;
}

#[tokio::test]
async fn a_stream_the_upstream_cuts_on_pingoras_path_is_charged_the_estimate() {
    let body = json!({"model": "claude", "max_tokens": 50, "stream": true, "messages": [{"role": "user", "content": "x".repeat(400)}]});
    upstream_cut("/v1/messages", body).await;
}

#[tokio::test]
async fn an_anthropic_stream_cut_before_message_delta_is_charged_the_estimate() {
    let mock = MockUpstream::start().await;
    // message_start reports 12 prompt tokens and 1 output token; the client
    // then sees one text delta and hangs up before message_delta (3 output).
    // Charged: the exact prompt (12) and the 2 data lines seen = 14; the
    // partial report alone (13) would stay under a tpm of 14.
    let (gw, secret) = start(&mock, 14).await;
    mock.behaviour.sse_interval_ms.store(500, Ordering::SeqCst);
    let body =
        json!({"model": "claude", "max_tokens": 50, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let r = post(&gw, &secret, "/v1/messages", &body).await;
    let id = read_then_hang_up(r, 2).await;

    let row = row(&gw, &id).await;
    assert_eq!(row.status, 499, "{row:?}");
    assert!(row.usage_estimated, "{row:?}");
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens),
        (Some(12), Some(2)),
        "{row:?}"
    );
    assert_eq!(pool_tokens(&gw, "a", "sk-ant").await, 14);
    let seen = mock.seen().len();
    let r = post(
        &gw,
        &secret,
        "/v1/messages",
        &json!({"model": "claude", "max_tokens": 5, "messages": []}),
    )
    .await;
    assert_eq!(r.status(), 429, "{}", r.text().await.unwrap());
    assert_eq!(mock.seen().len(), seen);
}

#[tokio::test]
async fn a_finished_stream_is_charged_exactly_what_the_provider_reported() {
    let mock = MockUpstream::start().await;
    let (gw, secret) = start(&mock, 1_000_000).await;
    let r = post(&gw, &secret, "/v1/chat/completions", &chat(true, 400)).await;
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let text = String::from_utf8(r.bytes().await.unwrap().to_vec()).unwrap();
    assert!(text.contains("[DONE]"), "{text}");
    let row = row(&gw, &id).await;
    assert!(!row.usage_estimated, "{row:?}");
    assert_eq!((row.prompt_tokens, row.completion_tokens), (Some(9), Some(5)));
    assert_eq!(pool_tokens(&gw, "p", "sk-1").await, 14);
    assert!(!gw.metrics().await.contains("fastgate_usage_estimated_total{"));
}

#[tokio::test]
async fn a_stream_options_null_cannot_turn_the_usage_chunk_off() {
    // Red team: `"stream_options": null` was kept beside the spliced field;
    // providers read the last of two keys, sent no usage, and the clean end
    // charged nothing against a tpm of 3,000 for 10,000 tokens.
    let mock = MockUpstream::start().await;
    let (gw, secret) = start(&mock, 1_000_000).await;
    for body in [
        r#"{"model":"gpt-4o","stream":true,"stream_options":null,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"gpt-4o", "stream" : true , "stream_options" : {"include_usage": false}, "messages":[]}"#,
    ] {
        let r = reqwest::Client::new()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&secret)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        let text = String::from_utf8(r.bytes().await.unwrap().to_vec()).unwrap();
        assert!(text.contains("[DONE]"), "{text}");
        // As a provider parses it: the last of repeated keys wins.
        let sent: Value = serde_json::from_slice(&mock.last().body).unwrap();
        assert_eq!(sent["stream_options"]["include_usage"], json!(true), "{sent}");
        let row = row(&gw, &id).await;
        assert!(!row.usage_estimated, "{row:?}");
        assert_eq!((row.prompt_tokens, row.completion_tokens), (Some(9), Some(5)), "{body}");
    }
}

#[tokio::test]
async fn a_stream_that_ends_cleanly_without_usage_is_charged_the_estimate() {
    // A proxy in front of the provider strips the usage chunk: the stream
    // ends with [DONE] and no usage. It is charged its estimate, not 0.
    let mock = MockUpstream::start().await;
    mock.behaviour.no_usage.store(true, Ordering::SeqCst);
    let (gw, secret) = start(&mock, 300).await;
    let r = post(&gw, &secret, "/v1/chat/completions", &chat(true, 1200)).await;
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let text = String::from_utf8(r.bytes().await.unwrap().to_vec()).unwrap();
    assert!(text.contains("[DONE]") && !text.contains("\"usage\""), "{text}");
    let row = row(&gw, &id).await;
    assert!(row.usage_estimated, "{row:?}");
    let prompt = row.prompt_tokens.unwrap();
    assert!(prompt >= 300, "the prompt estimate is a quarter of the body: {row:?}");
    assert!(row.completion_tokens.unwrap() >= 5, "{row:?}");
    assert_eq!(
        pool_tokens(&gw, "p", "sk-1").await,
        prompt + row.completion_tokens.unwrap()
    );
    // The estimate counted against tpm (300): the next request is refused
    // before it reaches the provider.
    let calls = mock.seen().len();
    let r = post(&gw, &secret, "/v1/chat/completions", &chat(true, 40)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(mock.seen().len(), calls);
}

#[tokio::test]
async fn refusals_and_unreachable_upstreams_charge_nothing() {
    let mock = MockUpstream::start().await;
    // A tpm of 1: any token charged refuses the next request.
    let (gw, secret) = start(&mock, 1).await;
    let c = reqwest::Client::new();
    let body = chat(false, 4000);
    // 404 (no route), 401 (bad key), 502 (the upstream refuses connections).
    let r = c
        .post(gw.url("/v1/nowhere"))
        .bearer_auth(&secret)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth("fg-not-a-key")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(gw.url("/dead/v1/chat/completions"))
        .bearer_auth(&secret)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let dead_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let dead = row(&gw, &dead_id).await;
    assert!(!dead.usage_estimated, "{dead:?}");
    assert_eq!((dead.prompt_tokens, dead.completion_tokens), (None, None));
    assert!(mock.seen().is_empty());
    // Nothing was charged: the key's tpm of 1 still admits a request.
    let r = post(&gw, &secret, "/v1/chat/completions", &chat(false, 10)).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert!(
        gw.audit_rows().iter().all(|r| !r.usage_estimated),
        "{:?}",
        gw.audit_rows()
    );
}

/// The value of the gauge `name` in a metrics text.
fn gauge(metrics: &str, name: &str) -> i64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
        .trim()
        .parse()
        .unwrap()
}

/// `n` GETs on the per-client limited route, each from a new address
/// (`X-Forwarded-For` from a trusted proxy), `batch` at a time.
async fn from_distinct_clients(gw: &Gateway, first: u32, n: u32) {
    let c = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();
    let mut next = first;
    while next < first + n {
        let end = (next + 64).min(first + n);
        let calls = (next..end).map(|i| {
            let ip = std::net::Ipv6Addr::from((0x2001_0db8u128 << 96) | u128::from(i));
            c.get(gw.url("/open/v1/models"))
                .header("x-forwarded-for", ip.to_string())
                .send()
        });
        for r in futures_util::future::join_all(calls).await {
            assert_eq!(r.unwrap().status(), 200);
        }
        next = end;
    }
}

#[tokio::test]
async fn idle_per_client_limiter_scopes_are_forgotten() {
    // The local limiter counts `rate_window` (cluster mode while Redis is
    // down: the same limiter, a window short enough for a test). FastGate's
    // own mock upstream and no audit log keep 40,000 requests quick.
    let config = format!(
        "audit:\n  enabled: false\ncluster:\n  redis: redis://127.0.0.1:{dead}\n  rate_window: 1s\n  nodes: 1\n  timeout: 50ms\nupstreams:\n  open: {{provider: mock}}\n",
        dead = free_port(),
    );
    let routes = "routes:\n  - { name: open, match: { path: '/open/{*rest}' }, auth: none, upstream: open, rate_limit: { rpm: 1000 } }\n";
    let gw = Gateway::start_with_server("  trusted_proxies: [127.0.0.1/32]\n", &config, &[("r.yaml", routes)]).await;
    let scopes = |m: &str| gauge(m, "fastgate_limiter_scopes");
    let pid = gw.child.id();

    let started = Instant::now();
    from_distinct_clients(&gw, 0, 20_000).await;
    let after_first = scopes(&gw.metrics().await);
    let rss_first = rss_kib(pid);
    // Every address is a scope while its window runs (some may already be
    // forgotten when the run outlasts a window).
    assert!(after_first > 0, "{after_first}");
    eprintln!(
        "first 20000 addresses in {:?}: {after_first} scopes, RSS {rss_first} KiB",
        started.elapsed()
    );

    let forgotten = |m: &str| scopes(m) == 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !forgotten(&gw.metrics().await) {
        assert!(
            Instant::now() < deadline,
            "idle scopes still held: {}",
            gw.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    from_distinct_clients(&gw, 20_000, 20_000).await;
    let rss_second = rss_kib(pid);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !forgotten(&gw.metrics().await) {
        assert!(
            Instant::now() < deadline,
            "idle scopes still held: {}",
            gw.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "second 20000 addresses: RSS {rss_second} KiB ({:+} KiB)",
        rss_second as i64 - rss_first as i64
    );
    assert!(
        rss_second < rss_first + 8 * 1024,
        "RSS grew from {rss_first} to {rss_second} KiB"
    );
}
