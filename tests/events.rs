//! `GET /api/events` from the outside: a snapshot on connect, then a key's
//! change pushed as it happens (active → cooling on a 429 → active again
//! when its cooldown ends), per-second counters, admins only.
#![allow(clippy::unwrap_used)]

mod common;

use common::{ADMIN_PASSWORD, Gateway, KeyRule, MockUpstream};
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Reads named SSE events off a response body.
struct Events {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
}

impl Events {
    async fn next(&mut self) -> (String, Value) {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let raw: String = self.buf.drain(..end + 2).collect();
                let mut name = String::from("message");
                let mut data = String::new();
                for line in raw.lines() {
                    if let Some(n) = line.strip_prefix("event: ") {
                        name = n.to_string();
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data.push_str(d);
                    }
                }
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                return (name, serde_json::from_str(&data).unwrap());
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.body.next())
                .await
                .expect("no event within 10 s")
                .expect("the event stream ended")
                .unwrap();
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The first `keys` event in which `pred` holds of key `id`, within `within`.
    async fn key_until(&mut self, id: &str, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        loop {
            assert!(Instant::now() < deadline, "key {id} never reached the expected state");
            let (name, data) = self.next().await;
            if name != "keys" {
                continue;
            }
            for change in data.as_array().unwrap() {
                if change["key"]["id"] == id && pred(&change["key"]) {
                    return change["key"].clone();
                }
            }
        }
    }
}

#[tokio::test]
async fn key_state_changes_are_pushed_live_with_per_second_counters() {
    let mock = MockUpstream::start().await;
    let config = format!(
        "upstreams:\n  oai: {{provider: openai, endpoints: ['{}'], key_pool: p}}\nkey_pools:\n  p: {{keys: [sk-limited-key-0001, sk-good-key-00002], strategy: round_robin}}\n",
        mock.url()
    );
    let routes = "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, auth: none, upstream: oai, retries: 2 }\n";
    let gw = Gateway::start(&config, &[("r.yaml", routes)]).await;
    let token = gw.login("admin", ADMIN_PASSWORD).await;
    let c = reqwest::Client::new();

    let r = c
        .get(gw.admin_url("/api/events"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut events = Events {
        body: Box::pin(r.bytes_stream()),
        buf: String::new(),
    };
    let (name, snapshot) = events.next().await;
    assert_eq!(name, "snapshot");
    let keys = snapshot["pools"][0]["keys"].as_array().unwrap().clone();
    assert_eq!(snapshot["pools"][0]["pool"]["name"], "p");
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().all(|k| k["state"] == "active"), "{snapshot}");
    assert_eq!(snapshot["upstreams"][0]["name"], "oai");
    let text = snapshot.to_string();
    assert!(
        !text.contains("sk-limited-key-0001") && !text.contains("sk-good-key-00002"),
        "a secret in the stream: {text}"
    );
    let limited = keys
        .iter()
        .find(|k| k["masked"].as_str().unwrap().starts_with("sk-lim"))
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    // The upstream 429s one key for 2 s: its badge turns to cooling...
    mock.behaviour
        .keys
        .lock()
        .unwrap()
        .insert("sk-limited-key-0001".into(), KeyRule::RateLimited { retry_after: 2 });
    for _ in 0..4 {
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "failed over to the other key");
    }
    let cooling = events
        .key_until(&limited, Duration::from_secs(5), |k| k["state"] == "cooling")
        .await;
    assert!(cooling["until_ms"].as_i64().unwrap() > 0, "{cooling}");
    assert!(
        cooling["last_error"].as_str().unwrap_or_default().contains("429"),
        "{cooling}"
    );
    // ...and back once the cooldown is over and a probe succeeds, without
    // anyone asking.
    mock.behaviour.keys.lock().unwrap().remove("sk-limited-key-0001");
    let probe = tokio::spawn({
        let url = gw.url("/v1/chat/completions");
        async move {
            for _ in 0..40 {
                let _ = reqwest::Client::new()
                    .post(&url)
                    .json(&json!({"model": "gpt-4o", "messages": []}))
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }
    });
    let back = events
        .key_until(&limited, Duration::from_secs(8), |k| k["state"] == "active")
        .await;
    assert!(back["until_ms"].is_null(), "{back}");
    probe.abort();

    // A tick a second with the traffic counted.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(Instant::now() < deadline, "no tick with requests");
        let (name, data) = events.next().await;
        if name == "tick" && data["requests_per_s"].as_f64().unwrap() > 0.0 {
            assert_eq!(data["lifecycle"], "serving");
            assert!(data["in_flight"].is_number() && data["ts_ms"].is_number(), "{data}");
            break;
        }
    }
}

#[tokio::test]
async fn the_event_stream_is_for_admins() {
    let mock = MockUpstream::start().await;
    let config = format!("upstreams:\n  u: {{provider: http, endpoints: ['{}']}}\n", mock.url());
    let gw = Gateway::start(
        &config,
        &[(
            "r.yaml",
            "routes:\n  - { name: r, match: { path: '/{*rest}' }, auth: none, upstream: u }\n",
        )],
    )
    .await;
    let c = reqwest::Client::new();
    assert_eq!(c.get(gw.admin_url("/api/events")).send().await.unwrap().status(), 401);
    let admin = gw.login("admin", ADMIN_PASSWORD).await;
    let r = c
        .post(gw.admin_url("/api/users"))
        .bearer_auth(&admin)
        .json(&json!({"username": "alice", "password": "alice-password-1", "role": "user"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let alice = gw.login("alice", "alice-password-1").await;
    assert_eq!(
        c.get(gw.admin_url("/api/events"))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
}
