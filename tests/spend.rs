//! What requests cost, seen from the outside: the real server against a
//! mock provider that answers with each provider's documented usage shape
//! (cache and reasoning parts included), costs checked against values
//! computed by hand from `conf/prices.yaml`, the audit row, `/metrics`,
//! the stats, and a live change of the price table.
//!
//! Where each usage shape comes from:
//! - OpenAI chat: the `usage` object of the Chat Completions API reference
//!   (`prompt_tokens_details.cached_tokens`,
//!   `completion_tokens_details.reasoning_tokens`, both shares of the totals).
//! - Anthropic: the Messages streaming reference (`message_start` carries
//!   `input_tokens`, `cache_creation_input_tokens`, `cache_read_input_tokens`
//!   apart from each other; `message_delta` the cumulative `output_tokens`).
//! - Gemini: `UsageMetadata` in the API reference (`cachedContentTokenCount`
//!   a share of `promptTokenCount`; `thoughtsTokenCount` apart from
//!   `candidatesTokenCount`), sent with every `alt=sse` chunk.
#![allow(clippy::unwrap_used)]

mod common;

use common::{
    Gateway, MockUpstream,
    shapes::{Canned, can},
};
use serde_json::{Value, json};

const TOKEN: &str = "spend-admin-token-0123456789abcdef0123";

fn config(mock: &MockUpstream, pricing: &str) -> String {
    format!(
        "admin:\n  token: {TOKEN}\nupstreams:\n  oai:\n    provider: openai\n    endpoints: ['{u}']\n    key_pool: oai\n  ant:\n    provider: anthropic\n    endpoints: ['{u}']\n    key_pool: ant\n  gem:\n    provider: gemini\n    endpoints: ['{u}']\n    key_pool: gem\n  lab:\n    provider: openai_compatible\n    endpoints: ['{u}']\n    key_pool: oai\nkey_pools:\n  oai:\n    keys: [sk-one]\n  ant:\n    keys: [sk-ant]\n  gem:\n    keys: [gem-key]\n{pricing}",
        u = mock.url()
    )
}

const ROUTES: &str = r#"
routes:
  - { name: chat, match: { path: /v1/chat/completions }, format: openai, upstream: oai }
  - { name: lab, match: { path: /lab/v1/chat/completions }, format: openai, upstream: lab, transform: { strip_prefix: /lab } }
  - { name: messages, match: { path: /v1/messages }, format: anthropic, upstream: ant }
  - { name: gemini, match: { path: "/v1beta/{*rest}" }, format: gemini, upstream: gem }
"#;

async fn admin(gw: &Gateway, path: &str) -> Value {
    let r = reqwest::Client::new()
        .get(gw.admin_url(path))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

/// An OpenAI chat completion (whole) with cached and reasoning tokens.
fn openai_whole(model: &str) -> Canned {
    Canned {
        whole: Some(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1_761_000_000, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
                "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}}
        })),
        events: Vec::new(),
    }
}

/// An Anthropic stream that wrote 2000 tokens to the cache and read 8000.
fn anthropic_stream() -> Canned {
    let events = [
        json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
            "model": "claude-sonnet-4-5-20250929", "content": [], "stop_reason": null,
            "usage": {"input_tokens": 50, "cache_creation_input_tokens": 2000, "cache_read_input_tokens": 8000, "output_tokens": 1}}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 120}}),
        json!({"type": "message_stop"}),
    ];
    Canned {
        whole: None,
        events: events
            .iter()
            .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
            .collect(),
    }
}

/// A Gemini `alt=sse` stream with a cached context and thinking.
fn gemini_stream() -> Canned {
    let chunk = |text: &str, finish: Option<&str>, candidates: u64| {
        let mut c = json!({"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}],
            "usageMetadata": {"promptTokenCount": 5000, "cachedContentTokenCount": 4096,
                "candidatesTokenCount": candidates, "thoughtsTokenCount": 800, "totalTokenCount": 5800 + candidates},
            "modelVersion": "gemini-2.5-flash", "responseId": "r1"});
        if let Some(f) = finish {
            c["candidates"][0]["finishReason"] = json!(f);
        }
        format!("data: {c}\n\n")
    };
    Canned {
        whole: None,
        events: vec![chunk("H", None, 1), chunk("i", Some("STOP"), 200)],
    }
}

async fn send(gw: &Gateway, secret: &str, path: &str, body: Value) -> String {
    let r = reqwest::Client::new()
        .post(gw.url(path))
        .bearer_auth(secret)
        .header("x-goog-api-key", secret)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path}");
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    r.bytes().await.unwrap();
    id
}

#[tokio::test]
async fn each_providers_usage_is_priced_by_the_table() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start_with_admin(&config(&mock, ""), &[("r.yaml", ROUTES)]).await;
    let (_, secret) = gw.create_key(&[]);
    gw.wait_key(&secret, "/v1/messages").await;

    can(&mock, openai_whole("gpt-4o-2024-08-06"));
    let chat = send(
        &gw,
        &secret,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": []}),
    )
    .await;
    can(&mock, anthropic_stream());
    let messages = send(
        &gw,
        &secret,
        "/v1/messages",
        json!({"model": "claude-sonnet-4-5-20250929", "max_tokens": 200, "stream": true, "messages": []}),
    )
    .await;
    can(&mock, gemini_stream());
    let gemini = send(
        &gw,
        &secret,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        json!({"contents": []}),
    )
    .await;
    // A self-hosted model no rule prices: costs nothing, counted as unpriced.
    can(&mock, openai_whole("my-llama"));
    let lab = send(
        &gw,
        &secret,
        "/lab/v1/chat/completions",
        json!({"model": "my-llama", "messages": []}),
    )
    .await;

    let rows = gw.wait_audit_ids([&chat, &messages, &gemini, &lab]).await;
    let row = |id: &str| rows.iter().find(|r| r.request_id == id).unwrap().clone();
    // (86 × 2.50 + 1920 × 1.25 + 300 × 10.00) / 1e6
    let r = row(&chat);
    assert!(close(r.cost.unwrap(), 0.005615), "{r:?}");
    assert_eq!(r.cache_read_tokens, Some(1920));
    assert!(
        r.price_version.as_deref().unwrap().starts_with("builtin/2026-"),
        "{r:?}"
    );
    // (50 × 3 + 2000 × 3.75 + 8000 × 0.30 + 120 × 15) / 1e6
    let r = row(&messages);
    assert_eq!((r.prompt_tokens, r.completion_tokens), (Some(10_050), Some(120)));
    assert_eq!((r.cache_read_tokens, r.cache_write_tokens), (Some(8000), Some(2000)));
    assert!(close(r.cost.unwrap_or(-1.0), 0.01185), "{r:?}");
    // (904 × 0.30 + 4096 × 0.075 + (200 + 800) × 2.50) / 1e6
    let r = row(&gemini);
    assert_eq!(
        (r.completion_tokens, r.reasoning_tokens),
        (Some(1000), Some(800)),
        "{r:?}"
    );
    assert!(close(r.cost.unwrap(), 0.0030784), "{r:?}");
    let r = row(&lab);
    assert_eq!((r.cost, r.price_version.as_deref()), (None, None), "{r:?}");
    assert_eq!(r.prompt_tokens, Some(2006));

    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"fastgate_unpriced_requests_total{route="lab",upstream="lab"} 1"#),
        "{metrics}"
    );
    let line = metrics
        .lines()
        .find(|l| l.starts_with("fastgate_cost_total{") && l.contains(r#"route="messages""#))
        .unwrap_or_else(|| panic!("no cost series: {metrics}"));
    let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(close(value, 0.01185), "{line}");

    let summary = admin(&gw, "/api/stats/summary").await;
    let total = 0.005615 + 0.01185 + 0.0030784;
    assert!((summary["cost"].as_f64().unwrap() - total).abs() < 1e-9, "{summary}");
    let top = admin(&gw, "/api/stats/top?by=model").await;
    let flash = top["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["value"] == "gemini-2.5-flash")
        .unwrap();
    assert!(close(flash["cost"].as_f64().unwrap(), 0.0030784), "{top}");
    let logs = admin(&gw, &format!("/api/logs?request_id={messages}")).await;
    assert!(close(logs["items"][0]["cost"].as_f64().unwrap(), 0.01185), "{logs}");
    let pricing = admin(&gw, "/api/pricing").await;
    assert_eq!(pricing["currency"], "USD");
    assert!(
        pricing["rules"].as_array().unwrap().len() > 30,
        "the shipped table: {pricing}"
    );
}

#[tokio::test]
async fn the_operators_rates_come_first_and_reload_live() {
    let mock = MockUpstream::start().await;
    let pricing = "pricing:\n  version: v1\n  models:\n    - { upstream: lab, input: 0.5, output: 1.0 }\n    - { model: 'gpt-4o*', input: 1.0, cached_input: 0.5, output: 2.0 }\n";
    let gw = Gateway::start_with_admin(&config(&mock, pricing), &[("r.yaml", ROUTES)]).await;
    let (_, secret) = gw.create_key(&[]);
    gw.wait_key(&secret, "/v1/messages").await;
    can(&mock, openai_whole("gpt-4o"));
    let own = send(
        &gw,
        &secret,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": []}),
    )
    .await;
    let lab = send(
        &gw,
        &secret,
        "/lab/v1/chat/completions",
        json!({"model": "my-llama", "messages": []}),
    )
    .await;

    // A new rate, reloaded from the file: later requests use it.
    let path = gw.config_path();
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("version: v1", "version: v2")
        .replace(
            "{ upstream: lab, input: 0.5, output: 1.0 }",
            "{ upstream: lab, input: 0, output: 0 }",
        );
    common::write(&path, &text);
    let r = reqwest::Client::new()
        .post(gw.admin_url("/api/config/reload"))
        .bearer_auth(TOKEN)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let after = send(
        &gw,
        &secret,
        "/lab/v1/chat/completions",
        json!({"model": "my-llama", "messages": []}),
    )
    .await;

    let rows = gw.wait_audit_ids([&own, &lab, &after]).await;
    let row = |id: &str| rows.iter().find(|r| r.request_id == id).unwrap().clone();
    // (86 × 1.0 + 1920 × 0.5 + 300 × 2.0) / 1e6
    let r = row(&own);
    assert!(close(r.cost.unwrap(), 0.001646), "{r:?}");
    assert_eq!(r.price_version.as_deref(), Some("config/v1"));
    // (2006 × 0.5 + 300 × 1.0) / 1e6: per upstream, whatever the model
    let r = row(&lab);
    assert!(close(r.cost.unwrap(), 0.001303), "{r:?}");
    let r = row(&after);
    assert_eq!(
        (r.cost, r.price_version.as_deref()),
        (Some(0.0), Some("config/v2")),
        "{r:?}"
    );

    // A table that does not load is refused, the old one keeps serving: a
    // negative rate, or one so dear a cost would be no number.
    for rates in ["input: -1, output: 0", "input: 0, output: 1e308"] {
        common::write(&path, &text.replace("input: 0, output: 0", rates));
        let r = reqwest::Client::new()
            .post(gw.admin_url("/api/config/reload"))
            .bearer_auth(TOKEN)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{rates}");
        let body: Value = r.json().await.unwrap();
        assert!(
            body.to_string().contains("rates are per million tokens, from 0 to"),
            "{body}"
        );
    }
    let pricing = admin(&gw, "/api/pricing").await;
    assert_eq!(pricing["rules"][0]["version"], "config/v2", "{pricing}");
}

/// A key with a budget, over the admin API; its secret.
async fn key_with_budget(gw: &Gateway, budget: Value) -> (String, String) {
    let r = reqwest::Client::new()
        .post(gw.admin_url("/api/keys"))
        .bearer_auth(TOKEN)
        .json(&json!({"name": "budgeted", "budget": budget}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let v: Value = r.json().await.unwrap();
    (v["id"].as_str().unwrap().into(), v["secret"].as_str().unwrap().into())
}

async fn chat(gw: &Gateway, secret: &str, max_tokens: u64) -> reqwest::Response {
    reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(secret)
        .json(&json!({"model": "gpt-4o", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
}

/// Thirty requests at once against a budget of about eight: each reserves
/// its prompt estimate at 2.50 and its 600 `max_tokens` at 10.00 per
/// million (0.006 and a little, above the 0.005615 it costs), so the budget
/// is never exceeded by more than one reservation; the upstream sees only
/// the admitted ones, and the rest get the client's 429 with the time to
/// the end of the day.
#[tokio::test]
async fn a_budget_reached_by_concurrent_requests_is_exceeded_by_at_most_one_reservation() {
    let mock = MockUpstream::start().await;
    let (hook, alerts) = webhook().await;
    let gw = Gateway::start_with_admin(
        &config(
            &mock,
            &format!("budgets:\n  webhook: http://alert:s%40cret@{hook}/alerts?token=t0k3n\n"),
        ),
        &[("r.yaml", ROUTES)],
    )
    .await;
    let amount = 0.05;
    let (id, secret) = key_with_budget(&gw, json!({"amount": amount, "period": "day"})).await;
    gw.wait_key(&secret, "/v1/messages").await;
    can(&mock, openai_whole("gpt-4o"));
    mock.clear();
    let answers = futures_util::future::join_all((0..30).map(|_| chat(&gw, &secret, 600))).await;
    let mut ok = Vec::new();
    let mut refused = 0;
    for r in answers {
        match r.status().as_u16() {
            200 => ok.push(r.headers()["x-request-id"].to_str().unwrap().to_string()),
            429 => {
                let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
                assert!((1..=86_400).contains(&retry), "{retry}");
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
                assert!(body["error"]["message"].as_str().unwrap().contains("budget"), "{body}");
                refused += 1;
            }
            other => panic!("{other}"),
        }
    }
    assert_eq!(mock.seen().len(), ok.len(), "only admitted requests reach the provider");
    assert!(refused > 0 && ok.len() >= 8, "{} admitted, {refused} refused", ok.len());
    let rows = gw.wait_audit_ids(ok.iter()).await;
    let spent: f64 = rows.iter().filter_map(|r| r.cost).sum();
    let reservation = ((27 + 600) as f64 * 10.0) / 1e6;
    assert!(spent < amount + reservation, "spent {spent} of {amount}");
    // Spent: every later request is refused until the period ends.
    assert_eq!(chat(&gw, &secret, 1).await.status(), 429);
    let usage = admin(&gw, &format!("/api/keys/{id}/usage")).await;
    assert!((usage["cost"].as_f64().unwrap() - spent).abs() < 1e-9, "{usage}");
    assert!(
        (usage["budget"]["spent"].as_f64().unwrap() - spent).abs() < 1e-6,
        "{usage}"
    );
    assert_eq!(usage["budget"]["period"], "day");
    assert!(usage["budget"]["resets_at"].as_i64().unwrap() > common_now(), "{usage}");
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"fastgate_budget_alerts_total{of="key",threshold="100"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"fastgate_budget_alerts_total{of="key",threshold="80"} 1"#),
        "{metrics}"
    );
    // The webhook got both, as JSON, off the request path.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while alerts.lock().unwrap().len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut got = alerts.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "{got:?}");
    // Concurrent settlements may tell them in either order.
    got.sort_by(|a, b| a["threshold"].as_f64().partial_cmp(&b["threshold"].as_f64()).unwrap());
    let thresholds: Vec<f64> = got.iter().map(|a| a["threshold"].as_f64().unwrap()).collect();
    assert_eq!(thresholds, vec![0.8, 1.0]);
    assert_eq!(got[1]["of"], "key");
    assert_eq!(got[1]["scope"], id.as_str());
    assert_eq!(got[1]["period"], "day");
    assert!(got[1]["spent"].as_f64().unwrap() >= amount, "{got:?}");
    assert!(
        !got.iter().any(|a| a.to_string().contains(&secret)),
        "no secret in an alert"
    );
    // The URL's userinfo went as Basic authorization, its query as given.
    let head = got[0]["_head"].as_str().unwrap();
    assert!(head.starts_with("post /alerts?token=t0k3n http/1.1"), "{head}");
    // base64("alert:s@cret")
    assert!(head.contains("authorization: basic ywxlcnq6c0bjcmv0"), "{head}");
    // The admin API shows neither the userinfo nor the path and query.
    let shown = admin(&gw, "/api/config").await.to_string();
    assert!(shown.contains(&format!("http://***@{hook}/***")), "{shown}");
    assert!(!shown.contains("s%40cret") && !shown.contains("t0k3n"), "{shown}");
}

/// Bodies an upstream reads but a strict parser would not (a repeated
/// `max_tokens`, `600.0`, `1e20`) reserve what they may cost, and a body
/// that only looks like JSON reserves the whole budget: thirty at once
/// never get more than the budget's share through.
#[tokio::test]
async fn hostile_bodies_reserve_what_they_may_cost() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start_with_admin(&config(&mock, ""), &[("r.yaml", ROUTES)]).await;
    can(&mock, openai_whole("gpt-4o"));
    let msgs = r#""messages":[{"role":"user","content":"hi"}]"#;
    for body in [
        format!(r#"{{"model":"gpt-4o","max_tokens":600,"max_tokens":600,{msgs}}}"#),
        format!(r#"{{"model":"gpt-4o","max_tokens":600.0,{msgs}}}"#),
        format!(r#"{{"model":"gpt-4o","max_tokens":1e20,{msgs}}}"#),
        format!(r#"{{"model":"gpt-4o","max_tokens":600,{msgs}"#),
    ] {
        let amount = 0.05;
        let (_, secret) = key_with_budget(&gw, json!({"amount": amount, "period": "day"})).await;
        gw.wait_key(&secret, "/v1/messages").await;
        mock.clear();
        let send = || {
            reqwest::Client::new()
                .post(gw.url("/v1/chat/completions"))
                .bearer_auth(&secret)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
        };
        let answers = futures_util::future::join_all((0..30).map(|_| send())).await;
        let ok: Vec<String> = answers
            .iter()
            .map(|r| r.as_ref().unwrap())
            .filter(|r| r.status() == 200)
            .map(|r| r.headers()["x-request-id"].to_str().unwrap().to_string())
            .collect();
        assert!(
            answers
                .iter()
                .all(|r| matches!(r.as_ref().unwrap().status().as_u16(), 200 | 429)),
            "{body}"
        );
        // Each answer costs 0.005615: nine would be past the budget.
        assert!((1..=9).contains(&ok.len()), "{body}: {} admitted", ok.len());
        assert_eq!(mock.seen().len(), ok.len(), "{body}");
        let rows = gw.wait_audit_ids(ok.iter()).await;
        let spent: f64 = rows
            .iter()
            .filter(|r| ok.contains(&r.request_id))
            .filter_map(|r| r.cost)
            .sum();
        assert!(spent < amount + 0.006_5, "{body}: spent {spent} of {amount}");
    }
}

/// A Gemini URL's model is the one served: a `model` in the body neither
/// passes a key's `allowed_models` for another model nor prices the
/// request. A model no rule prices (an alias) reserves what the
/// upstream's dearest model would cost: a second request waits for the
/// first, in flight, to settle.
#[tokio::test]
async fn the_model_served_is_the_one_checked_and_reserved() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start_with_admin(&config(&mock, ""), &[("r.yaml", ROUTES)]).await;
    let r = reqwest::Client::new()
        .post(gw.admin_url("/api/keys"))
        .bearer_auth(TOKEN)
        .json(&json!({"name": "lite", "allowed_models": ["gemini-2.0-flash-lite"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let lite = r.json::<Value>().await.unwrap()["secret"].as_str().unwrap().to_string();
    gw.wait_key(&lite, "/v1/messages").await;
    let gemini = |model: &str, body: Value| {
        reqwest::Client::new()
            .post(gw.url(&format!("/v1beta/models/{model}:generateContent")))
            .header("x-goog-api-key", &lite)
            .json(&body)
            .send()
    };
    let contents = json!([{"role": "user", "parts": [{"text": "hi"}]}]);
    let ok = gemini("gemini-2.0-flash-lite", json!({"contents": contents}))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    mock.clear();
    let sneaky = json!({"model": "gemini-2.0-flash-lite", "contents": contents});
    let r = gemini("gemini-2.5-pro", sneaky).await.unwrap();
    assert_eq!(r.status(), 403, "{:?}", r.text().await);
    assert!(mock.seen().is_empty(), "the refused request reached the provider");

    // An alias no rule prices, streamed slowly: the first holds the budget.
    let (_, secret) = key_with_budget(&gw, json!({"amount": 0.01, "period": "day"})).await;
    gw.wait_key(&secret, "/v1/messages").await;
    mock.behaviour
        .sse_interval_ms
        .store(400, std::sync::atomic::Ordering::SeqCst);
    let alias = || {
        reqwest::Client::new()
            .post(gw.url("/v1/messages"))
            .header("x-api-key", &secret)
            .header("anthropic-version", "2023-06-01")
            .json(&json!({"model": "claude-alias-0", "max_tokens": 600, "stream": true,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    let first = alias().await.unwrap();
    assert_eq!(first.status(), 200);
    let second = alias().await.unwrap();
    assert_eq!(second.status(), 429, "the first's reservation was nothing");
    first.text().await.unwrap();
}

/// Counts no provider could mean (u64::MAX, -5, 1e20, "10", a billion)
/// are not believed: the request is charged its estimate, flagged, and
/// neither its key's budget nor the stats are poisoned.
#[tokio::test]
async fn usage_no_provider_could_mean_is_charged_its_estimate() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start_with_admin(&config(&mock, ""), &[("r.yaml", ROUTES)]).await;
    let (id, secret) = key_with_budget(&gw, json!({"amount": 1.0, "period": "total"})).await;
    gw.wait_key(&secret, "/v1/messages").await;
    let mut ids = Vec::new();
    for usage in [
        json!({"prompt_tokens": u64::MAX, "completion_tokens": 1}),
        json!({"prompt_tokens": -5, "completion_tokens": 3}),
        json!({"prompt_tokens": 1e20, "completion_tokens": 3}),
        json!({"prompt_tokens": "10", "completion_tokens": 3}),
        json!({"prompt_tokens": 2_000_000_000u64, "completion_tokens": 3}),
    ] {
        let mut answer = openai_whole("gpt-4o");
        answer.whole.as_mut().unwrap()["usage"] = usage.clone();
        can(&mock, answer);
        let r = chat(&gw, &secret, 30_000).await;
        assert_eq!(r.status(), 200, "{usage}");
        ids.push(r.headers()["x-request-id"].to_str().unwrap().to_string());
    }
    let rows = gw.wait_audit_ids(ids.iter()).await;
    assert_eq!(rows.iter().filter(|r| ids.contains(&r.request_id)).count(), 5);
    for r in rows.iter().filter(|r| ids.contains(&r.request_id)) {
        assert!(r.usage_estimated, "{r:?}");
        let (p, c) = (r.prompt_tokens.unwrap(), r.completion_tokens.unwrap());
        assert!(p > 0 && p < 1_000 && c < 1_000, "{r:?}");
        let cost = r.cost.unwrap();
        assert!(cost > 0.0 && cost < 0.01, "{r:?}");
    }
    // The budget counts the estimates (nothing leaked or locked) ...
    let usage = admin(&gw, &format!("/api/keys/{id}/usage")).await;
    let spent = usage["budget"]["spent"].as_f64().unwrap();
    assert!(spent > 0.0 && spent < 0.05, "{usage}");
    can(&mock, openai_whole("gpt-4o"));
    assert_eq!(chat(&gw, &secret, 600).await.status(), 200);
    // ... and the stats still add up.
    for path in ["/api/stats/summary", "/api/stats/top?by=model"] {
        admin(&gw, path).await;
    }
    let metrics = gw.metrics().await;
    assert!(metrics.contains("fastgate_usage_estimated_total"), "{metrics}");
}

/// A webhook receiver on a loopback port: every POSTed body, parsed.
async fn webhook() -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let seen = keep.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    let Some(head_end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let length: usize = text[..head_end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if buf.len() < head_end + 4 + length {
                        continue;
                    }
                    let body = &buf[head_end + 4..head_end + 4 + length];
                    let mut alert: Value = serde_json::from_slice(body).unwrap();
                    alert["_head"] = Value::String(text[..head_end].to_ascii_lowercase());
                    seen.lock().unwrap().push(alert);
                    let _ = s
                        .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                }
            });
        }
    });
    (addr, seen)
}

fn common_now() -> i64 {
    fastgate::clock::now_ms()
}

/// A budget set after the fact counts what the key spent this period (the
/// audit log), a user's budget is shared by their keys, a route's by all
/// its clients, and hostile amounts are refused.
#[tokio::test]
async fn budgets_of_keys_users_and_routes() {
    let mock = MockUpstream::start().await;
    let routes = ROUTES.replace(
        "upstream: lab, transform: { strip_prefix: /lab } }",
        "upstream: lab, transform: { strip_prefix: /lab }, budget: { amount: 0.001, period: total } }",
    );
    let pricing = "pricing:\n  models:\n    - { upstream: lab, input: 0.5, output: 1.0 }\n";
    let gw = Gateway::start_with_admin(&config(&mock, pricing), &[("r.yaml", &routes)]).await;
    let c = reqwest::Client::new();
    for bad in [
        json!({"amount": -1}),
        json!({"amount": 1e300}),
        json!({"amount": "1"}),
        json!({"amount": 1, "period": "year"}),
    ] {
        let r = c
            .post(gw.admin_url("/api/keys"))
            .bearer_auth(TOKEN)
            .json(&json!({"name": "bad", "budget": bad}))
            .send()
            .await
            .unwrap();
        assert!(matches!(r.status().as_u16(), 400 | 422), "{bad}: {}", r.status());
    }
    // The route's budget: 0.001 in total; each call costs (2006 × 0.5 + 300) / 1e6 = 0.001303.
    let (_, secret) = gw.create_key(&[]);
    gw.wait_key(&secret, "/v1/messages").await;
    can(&mock, openai_whole("my-llama"));
    let lab = |s: &str| {
        c.post(gw.url("/lab/v1/chat/completions"))
            .bearer_auth(s.to_string())
            .json(&json!({"model": "my-llama", "max_tokens": 1, "messages": []}))
            .send()
    };
    assert_eq!(lab(&secret).await.unwrap().status(), 200);
    let r = lab(&secret).await.unwrap();
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("route lab budget per total"),
        "{body}"
    );
    // Another key on the same route: the route's budget is everyone's.
    let (_, other) = gw.create_key(&[]);
    gw.wait_key(&other, "/v1/messages").await;
    assert_eq!(lab(&other).await.unwrap().status(), 429);
}
