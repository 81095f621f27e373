//! Faults: keys the provider disabled come back, and clients cannot make
//! the provider disable pool keys (see docs/resilience.md, "Disabled keys
//! come back").
//!
//! A provider's transient auth outage (every key answers 401 for a while)
//! disables keys; after it ends they are re-probed with no client traffic
//! and serve again. A client header naming another provider account
//! (`OpenAI-Organization: evil`) would make the provider answer 401 to the
//! pool key: such headers are dropped on pooled routes, on both forwarding
//! paths.

use crate::common::*;
use futures_util::future::join_all;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const TOKEN: &str = "reprobe-admin-token-0123456789abcdef0123";

async fn gateway(body: &str, routes: &str) -> Gateway {
    Gateway::start_with_admin(&format!("admin:\n  token: {TOKEN}\n{body}"), &[("r.yaml", routes)]).await
}

async fn admin(gw: &Gateway, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
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
    let (status, keys) = admin(gw, "GET", &format!("/api/pools/{pool}/keys"), None).await;
    assert_eq!(status, 200, "{keys}");
    pool_key_in(&keys, secret)
}

fn rule(mock: &MockUpstream, secret: &str, r: KeyRule) {
    mock.behaviour.keys.lock().unwrap().insert(secret.to_string(), r);
}

/// Requests the upstream saw with `secret`, however its provider sends it.
fn seen_with(mock: &MockUpstream, secret: &str) -> Vec<Seen> {
    mock.seen()
        .into_iter()
        .filter(|s| {
            s.header("authorization") == Some(&format!("Bearer {secret}"))
                || s.header("x-api-key") == Some(secret)
                || s.header("x-goog-api-key") == Some(secret)
        })
        .collect()
}

/// The value of `fastgate_key_reprobes_total` for `pool` and `result`.
async fn reprobes(gw: &Gateway, pool: &str, result: &str) -> u64 {
    let text = gw.metrics().await;
    text.lines()
        .filter(|l| l.starts_with("fastgate_key_reprobes_total{"))
        .filter(|l| l.contains(&format!("pool=\"{pool}\"")) && l.contains(&format!("result=\"{result}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Poll the key until `done` holds (at most `within`); its last state.
async fn key_until(gw: &Gateway, pool: &str, secret: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let k = pool_key(gw, pool, secret).await;
        if done(&k) || Instant::now() >= deadline {
            return k;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn openai_pool(mock: &MockUpstream, keys: &[&str], pool_extra: &str) -> String {
    format!(
        "upstreams:\n  oai: {{provider: openai, endpoints: ['{}'], key_pool: p}}\nkey_pools:\n  p: {{keys: [{}]{pool_extra}}}\n",
        mock.url(),
        keys.join(", ")
    )
}

/// FastGate's own exchange (`retries > 0` reads the body).
const CHAT_ROUTE: &str = "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, auth: none, upstream: oai, retries: 2 }\n";
/// Pingora's path: `retries: 0`, one upstream, no model routing, no
/// conversion, and not a chat completion (whose stream FastGate asks for
/// usage, which reads the body).
const EMBED_ROUTE: &str = "routes:\n  - { name: embed, match: { path: /v1/embeddings }, format: openai, auth: none, upstream: oai, retries: 0 }\n";

/// Send `n` requests at once, each naming a provider account the pool key
/// does not belong to, and some headers that must still pass.
async fn hostile_batch(gw: &Gateway, path: &str, n: usize) -> Vec<u16> {
    let c = reqwest::Client::new();
    let sends = (0..n).map(|i| {
        c.post(gw.url(path))
            .header("OpenAI-Organization", "evil")
            .header("OpenAI-Project", "proj_evil")
            .header("x-goog-user-project", "someone-elses-project")
            // Spellings servers that map headers the CGI way read as the same.
            .header("OpenAI_Organization", "evil")
            .header("x_goog_user_project", "someone-elses-project")
            .header("anthropic-beta", "prompt-caching-2024-07-31")
            .json(&json!({"model": "gpt-4o", "input": format!("hi {i}"), "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    });
    join_all(sends)
        .await
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect()
}

async fn account_headers_never_reach_a_pooled_upstream(route: &str, path: &str) {
    let mock = MockUpstream::start().await;
    *mock.behaviour.refuse_header.lock().unwrap() = Some(("openai-organization".into(), "evil".into()));
    // One key, disabled by a single 401: one forwarded header would be enough.
    let gw = gateway(&openai_pool(&mock, &["sk-org"], ", disable_after: 1"), route).await;
    let statuses = hostile_batch(&gw, path, 8).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let statuses = hostile_batch(&gw, path, 8).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let seen = seen_with(&mock, "sk-org");
    assert_eq!(seen.len(), 16, "one upstream call per request");
    for s in &seen {
        assert_eq!(s.header("openai-organization"), None, "{:?}", s.headers);
        assert_eq!(s.header("openai-project"), None, "{:?}", s.headers);
        assert_eq!(s.header("x-goog-user-project"), None, "{:?}", s.headers);
        assert_eq!(s.header("openai_organization"), None, "{:?}", s.headers);
        assert_eq!(s.header("x_goog_user_project"), None, "{:?}", s.headers);
        // Behaviour headers are not account headers: they pass.
        assert_eq!(s.header("anthropic-beta"), Some("prompt-caching-2024-07-31"));
    }
    let k = pool_key(&gw, "p", "sk-org").await;
    assert_eq!(k["state"], "active", "{k}");
    assert_eq!(k["consecutive_failures"], 0, "{k}");
    assert_eq!(k["totals"]["errors"], 0, "{k}");
}

#[tokio::test]
async fn a_client_account_header_cannot_disable_the_pool_key_on_fastgates_exchange() {
    account_headers_never_reach_a_pooled_upstream(CHAT_ROUTE, "/v1/chat/completions").await;
}

#[tokio::test]
async fn a_client_account_header_cannot_disable_the_pool_key_on_pingoras_path() {
    account_headers_never_reach_a_pooled_upstream(EMBED_ROUTE, "/v1/embeddings").await;
}

#[tokio::test]
async fn a_route_may_forward_account_headers_when_it_says_so() {
    let mock = MockUpstream::start().await;
    let routes = "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, auth: none, upstream: oai, retries: 2, forward_account_headers: true }\n  - { name: embed, match: { path: /v1/embeddings }, format: openai, auth: none, upstream: oai, forward_account_headers: true }\n";
    let gw = gateway(&openai_pool(&mock, &["sk-mine"], ""), routes).await;
    for path in ["/v1/chat/completions", "/v1/embeddings"] {
        let r = reqwest::Client::new()
            .post(gw.url(path))
            .header("OpenAI-Organization", "org-mine")
            .header("OpenAI-Project", "proj_mine")
            .json(&json!({"model": "gpt-4o", "input": "x", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let last = mock.last();
        assert_eq!(last.header("openai-organization"), Some("org-mine"), "{path}");
        assert_eq!(last.header("openai-project"), Some("proj_mine"), "{path}");
        assert_eq!(last.header("authorization"), Some("Bearer sk-mine"), "{path}");
    }
}

#[tokio::test]
async fn keys_disabled_by_an_auth_outage_come_back_after_it_with_no_client_traffic() {
    let mock = MockUpstream::start().await;
    // The provider's auth outage: every request with either key is refused.
    rule(&mock, "sk-out-a", KeyRule::Status(401));
    rule(&mock, "sk-out-b", KeyRule::Status(401));
    let gw = gateway(
        &openai_pool(
            &mock,
            &["sk-out-a", "sk-out-b"],
            ", disable_after: 3, reprobe_interval: 1s",
        ),
        CHAT_ROUTE,
    )
    .await;
    let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let c = reqwest::Client::new();
    for _ in 0..6 {
        let r = c.post(gw.url("/v1/chat/completions")).json(&chat).send().await.unwrap();
        assert_ne!(r.status(), 200);
    }
    let disabled_at = Instant::now();
    for secret in ["sk-out-a", "sk-out-b"] {
        let k = pool_key(&gw, "p", secret).await;
        assert_eq!(k["state"], "disabled", "{k}");
        assert!(k["disabled_reason"].as_str().unwrap().starts_with("401 "), "{k}");
        let next = k["next_probe_at"]
            .as_i64()
            .unwrap_or_else(|| panic!("no next_probe_at: {k}"));
        let last_error = k["last_error_ms"].as_i64().unwrap();
        assert_eq!(next, last_error + 1000, "{k}");
    }
    let chats = |m: &MockUpstream, s: &str| {
        seen_with(m, s)
            .iter()
            .filter(|r| r.uri.ends_with("/completions"))
            .count()
    };
    let before = (chats(&mock, "sk-out-a"), chats(&mock, "sk-out-b"));

    // The outage goes on: probes are refused, keys stay disabled, and the
    // next probe is a whole interval later (no hammering).
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let mut probes_in_outage = Vec::new();
    for secret in ["sk-out-a", "sk-out-b"] {
        let probes: Vec<Seen> = seen_with(&mock, secret)
            .into_iter()
            .filter(|r| r.method == "GET" && r.uri == "/v1/models")
            .collect();
        probes_in_outage.push(probes.len());
        assert!(
            (1..=4).contains(&probes.len()),
            "{secret}: {} probes in 3.5 s at 1 s",
            probes.len()
        );
        let k = pool_key(&gw, "p", secret).await;
        assert_eq!(k["state"], "disabled", "{k}");
        assert!(k["next_probe_at"].as_i64().unwrap() > k["last_error_ms"].as_i64().unwrap());
    }
    assert!(reprobes(&gw, "p", "still_refused").await >= 4);
    assert_eq!(reprobes(&gw, "p", "recovered").await, 0);

    // The outage ends. No client sends anything; both keys come back within
    // about one interval.
    mock.behaviour.keys.lock().unwrap().clear();
    let ended = Instant::now();
    for secret in ["sk-out-a", "sk-out-b"] {
        let k = key_until(&gw, "p", secret, Duration::from_secs(6), |k| k["state"] == "active").await;
        assert_eq!(k["state"], "active", "{k}");
        assert_eq!(k["disabled_reason"], Value::Null, "{k}");
        assert_eq!(k["next_probe_at"], Value::Null, "{k}");
    }
    let back_after = ended.elapsed();
    assert!(back_after < Duration::from_secs(4), "back after {back_after:?}");
    assert_eq!(
        (chats(&mock, "sk-out-a"), chats(&mock, "sk-out-b")),
        before,
        "no client traffic"
    );
    assert_eq!(reprobes(&gw, "p", "recovered").await, 2);

    // And they serve again.
    for _ in 0..4 {
        let r = c.post(gw.url("/v1/chat/completions")).json(&chat).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert!(chats(&mock, "sk-out-a") > before.0 && chats(&mock, "sk-out-b") > before.1);
    eprintln!(
        "outage probes per key {probes_in_outage:?} in 3.5 s; both keys back {back_after:?} after the outage ended ({:?} after the disable)",
        disabled_at.elapsed()
    );
}

#[tokio::test]
async fn the_probe_is_the_providers_model_list_with_the_pool_key() {
    let mock = MockUpstream::start().await;
    let body = format!(
        "upstreams:\n  oai: {{provider: openai, endpoints: ['{u}'], key_pool: o}}\n  ant: {{provider: anthropic, endpoints: ['{u}'], key_pool: a}}\n  gem: {{provider: gemini, endpoints: ['{u}'], key_pool: g}}\nkey_pools:\n  o: {{keys: [sk-o], disable_after: 1, reprobe_interval: 1s}}\n  a: {{keys: [sk-a], disable_after: 1, reprobe_interval: 1s}}\n  g: {{keys: [sk-g], disable_after: 1, reprobe_interval: 1s}}\n",
        u = mock.url()
    );
    let gw = gateway(&body, CHAT_ROUTE).await;
    rule(&mock, "sk-o", KeyRule::Status(401));
    rule(&mock, "sk-a", KeyRule::Status(403));
    rule(&mock, "sk-g", KeyRule::Status(401));
    // Disable each key with one refused admin key test (no client route needed).
    for (pool, secret) in [("o", "sk-o"), ("a", "sk-a"), ("g", "sk-g")] {
        let id = fastgate::pool::key_id(secret);
        let (status, _) = admin(&gw, "POST", &format!("/api/pools/{pool}/keys/{id}/test"), None).await;
        assert_eq!(status, 200);
        let k = pool_key(&gw, pool, secret).await;
        assert_eq!(k["state"], "disabled", "{k}");
    }
    mock.clear();
    mock.behaviour.keys.lock().unwrap().clear();
    for (pool, secret) in [("o", "sk-o"), ("a", "sk-a"), ("g", "sk-g")] {
        let k = key_until(&gw, pool, secret, Duration::from_secs(6), |k| k["state"] == "active").await;
        assert_eq!(k["state"], "active", "{k}");
    }
    let one = |secret: &str| {
        let seen = seen_with(&mock, secret);
        assert_eq!(seen.len(), 1, "one probe for {secret}: {seen:?}");
        seen.into_iter().next().unwrap()
    };
    let o = one("sk-o");
    assert_eq!((o.method.as_str(), o.uri.as_str()), ("GET", "/v1/models"));
    assert_eq!(o.header("authorization"), Some("Bearer sk-o"));
    let a = one("sk-a");
    assert_eq!((a.method.as_str(), a.uri.as_str()), ("GET", "/v1/models"));
    assert_eq!(a.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(a.header("authorization"), None);
    let g = one("sk-g");
    assert_eq!((g.method.as_str(), g.uri.as_str()), ("GET", "/v1beta/models"));
    assert_eq!(g.header("authorization"), None);
    for pool in ["o", "a", "g"] {
        assert_eq!(reprobes(&gw, pool, "recovered").await, 1, "{pool}");
    }
}

#[tokio::test]
async fn a_key_an_admin_disabled_is_never_probed() {
    let mock = MockUpstream::start().await;
    let body = format!(
        "upstreams:\n  oai: {{provider: openai, endpoints: ['{u}'], key_pool: p}}\n  oai-off: {{provider: openai, endpoints: ['{u}'], key_pool: off}}\nkey_pools:\n  p: {{keys: [sk-adm], reprobe_interval: 1s}}\n  off: {{keys: [sk-off], disable_after: 1, reprobe_interval: 0}}\n",
        u = mock.url()
    );
    let gw = gateway(&body, CHAT_ROUTE).await;
    let id = fastgate::pool::key_id("sk-adm");
    let (status, k) = admin(
        &gw,
        "PATCH",
        &format!("/api/pools/p/keys/{id}"),
        Some(json!({"enabled": false})),
    )
    .await;
    assert_eq!(status, 200, "{k}");
    assert_eq!(k["state"], "disabled");
    // A provider-disabled key in a pool with re-probing off (`0`).
    rule(&mock, "sk-off", KeyRule::Status(401));
    let off = fastgate::pool::key_id("sk-off");
    admin(&gw, "POST", &format!("/api/pools/off/keys/{off}/test"), None).await;
    let k_off = pool_key(&gw, "off", "sk-off").await;
    assert_eq!(k_off["state"], "disabled", "{k_off}");
    assert_eq!(k_off.get("next_probe_at"), Some(&Value::Null), "{k_off}");
    mock.clear();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(mock.seen().len(), 0, "no probe: {:?}", mock.seen());
    let k = pool_key(&gw, "p", "sk-adm").await;
    assert_eq!(k["state"], "disabled", "{k}");
    assert!(k["disabled_reason"].as_str().unwrap().starts_with("disabled by"), "{k}");
    assert_eq!(k.get("next_probe_at"), Some(&Value::Null), "{k}");
    assert_eq!(pool_key(&gw, "off", "sk-off").await["state"], "disabled");
    assert_eq!(
        reprobes(&gw, "p", "recovered").await + reprobes(&gw, "off", "recovered").await,
        0
    );
}

#[tokio::test]
async fn an_answer_that_says_nothing_about_the_key_leaves_it_disabled_until_a_later_probe() {
    let mock = MockUpstream::start().await;
    rule(&mock, "sk-flaky", KeyRule::Status(401));
    let gw = gateway(
        &openai_pool(&mock, &["sk-flaky"], ", disable_after: 1, reprobe_interval: 1s"),
        CHAT_ROUTE,
    )
    .await;
    let id = fastgate::pool::key_id("sk-flaky");
    admin(&gw, "POST", &format!("/api/pools/p/keys/{id}/test"), None).await;
    assert_eq!(pool_key(&gw, "p", "sk-flaky").await["state"], "disabled");
    // The provider's auth comes back, but its model list is failing: a 503
    // says nothing about the key.
    rule(&mock, "sk-flaky", KeyRule::Status(503));
    let deadline = Instant::now() + Duration::from_secs(6);
    while reprobes(&gw, "p", "error").await < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reprobes(&gw, "p", "error").await >= 2);
    let k = pool_key(&gw, "p", "sk-flaky").await;
    assert_eq!(k["state"], "disabled", "{k}");
    assert_eq!(k["last_error"], "re-probe answered 503", "{k}");
    assert!(k["disabled_reason"].as_str().unwrap().starts_with("401 "), "{k}");
    assert_eq!(
        k["next_probe_at"].as_i64().unwrap(),
        k["last_error_ms"].as_i64().unwrap() + 1000,
        "{k}"
    );
    // A client meanwhile gets the pool's answer, not a probe's.
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(
        seen_with(&mock, "sk-flaky").iter().all(|s| s.uri == "/v1/models"),
        "the disabled key served no client request"
    );
    // The model list answers again: the next probe brings the key back.
    mock.behaviour.keys.lock().unwrap().clear();
    let k = key_until(&gw, "p", "sk-flaky", Duration::from_secs(5), |k| k["state"] == "active").await;
    assert_eq!(k["state"], "active", "{k}");
    assert_eq!(reprobes(&gw, "p", "recovered").await, 1);
}

#[tokio::test]
async fn the_probe_schedule_survives_a_restart() {
    let mock = MockUpstream::start().await;
    rule(&mock, "sk-slow", KeyRule::Status(401));
    let mut gw = gateway(
        &openai_pool(&mock, &["sk-slow"], ", disable_after: 1, reprobe_interval: 1h"),
        CHAT_ROUTE,
    )
    .await;
    let id = fastgate::pool::key_id("sk-slow");
    admin(&gw, "POST", &format!("/api/pools/p/keys/{id}/test"), None).await;
    let k = pool_key(&gw, "p", "sk-slow").await;
    assert_eq!(k["state"], "disabled", "{k}");
    // The disable is confirmed by one probe soon (`CONFIRM_AFTER`), then the
    // next waits the interval.
    let first = k["next_probe_at"].as_i64().unwrap() - fastgate::clock::now_ms();
    assert!(first <= 2_000, "{first}");
    let deadline = Instant::now() + Duration::from_secs(8);
    let k = loop {
        let k = pool_key(&gw, "p", "sk-slow").await;
        if k["last_error"].as_str().is_some_and(|e| e.starts_with("re-probe")) {
            break k;
        }
        assert!(Instant::now() < deadline, "no confirmation probe: {k}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(k["state"], "disabled", "{k}");
    let next = k["next_probe_at"].as_i64().unwrap();
    let hour_ahead = next - fastgate::clock::now_ms();
    assert!((3_590_000..=3_600_000).contains(&hour_ahead), "{hour_ahead}");
    mock.clear();
    gw.restart().await;
    let k = pool_key(&gw, "p", "sk-slow").await;
    assert_eq!(k["state"], "disabled", "{k}");
    assert_eq!(k["next_probe_at"].as_i64(), Some(next), "the clock was not reset: {k}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(mock.seen().is_empty(), "no probe an hour early: {:?}", mock.seen());
}

#[tokio::test]
async fn the_route_dry_run_shows_account_headers_dropped_toward_a_pool() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&openai_pool(&mock, &["sk-dry"], ""), CHAT_ROUTE).await;
    let (status, v) = admin(
        &gw,
        "POST",
        "/api/routes/test",
        Some(json!({"method": "POST", "path": "/v1/chat/completions",
            "headers": {"OpenAI-Organization": "evil", "OpenAI-Project": "p", "anthropic-beta": "b"},
            "body": {"model": "gpt-4o"}})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let headers = &v["upstream_request"]["headers"];
    assert_eq!(headers.get("openai-organization"), None, "{headers}");
    assert_eq!(headers.get("openai-project"), None, "{headers}");
    assert_eq!(headers["anthropic-beta"], "b", "{headers}");
    assert_eq!(headers["authorization"], "<pool key>", "{headers}");
}

#[tokio::test]
async fn keys_a_client_got_refused_come_back_after_one_confirmation_probe() {
    // Red team: a client chooses a request the provider refuses whatever the
    // key (an admin-only path, another project's file); a 401 to a pool key
    // is retried on the next key, so one such request condemns every key.
    // The disable stands only if the model list refuses the key too.
    let mock = MockUpstream::start().await;
    *mock.behaviour.refuse_header.lock().unwrap() = Some(("x-ask-for".into(), "admin-only".into()));
    let gw = gateway(
        &openai_pool(&mock, &["sk-c1", "sk-c2"], ", disable_after: 1"),
        CHAT_ROUTE,
    )
    .await;
    let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let c = reqwest::Client::new();
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .header("x-ask-for", "admin-only")
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 200);
    let disabled_at = Instant::now();
    for secret in ["sk-c1", "sk-c2"] {
        assert_eq!(pool_key(&gw, "p", secret).await["state"], "disabled");
    }
    // Back after the confirmation probe (2 s), not the 10 min interval.
    for secret in ["sk-c1", "sk-c2"] {
        loop {
            let k = pool_key(&gw, "p", secret).await;
            if k["state"] == "active" {
                break;
            }
            assert!(disabled_at.elapsed() < Duration::from_secs(6), "still down: {k}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let back = disabled_at.elapsed();
    assert!(
        back >= Duration::from_millis(1500),
        "probed at {back:?}, not after CONFIRM_AFTER"
    );
    let r = c.post(gw.url("/v1/chat/completions")).json(&chat).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let probes = mock.seen().iter().filter(|s| s.uri == "/v1/models").count();
    assert_eq!(probes, 2, "one confirmation probe per key");
}
