//! Faults: the key pool's state machine (see docs/resilience.md, "The key
//! state machine"): provider wait headers that are absurd, zero, past or far
//! in the future; 429s arriving while other requests on the key are still
//! running; one 5xx; a slow half-open probe; the in-flight cap under load;
//! per-pool `cool_on`/`disable_on`.

use crate::common::*;
use futures_util::future::join_all;
use serde_json::{Value, json};
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

const TOKEN: &str = "faults-pool-admin-token-0123456789abcdef";

async fn gateway(body: &str, routes: &str) -> Gateway {
    Gateway::start_with_admin(&format!("admin:\n  token: {TOKEN}\n{body}"), &[("r.yaml", routes)]).await
}

async fn pool_keys(gw: &Gateway, pool: &str) -> Value {
    reqwest::Client::new()
        .get(gw.admin_url(&format!("/api/pools/{pool}/keys")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn pool_key(gw: &Gateway, pool: &str, secret: &str) -> Value {
    pool_key_in(&pool_keys(gw, pool).await, secret)
}

/// How many requests the upstream saw with `secret`.
fn seen_with(mock: &MockUpstream, secret: &str) -> usize {
    mock.seen()
        .iter()
        .filter(|s| s.header("authorization") == Some(&format!("Bearer {secret}")))
        .count()
}

fn route(retries: u32) -> String {
    format!(
        "routes:\n  - {{ name: chat, match: {{ path: /v1/chat/completions }}, format: openai, auth: none, upstream: oai, retries: {retries} }}\n"
    )
}

fn pool(mock: &MockUpstream, keys: &[&str], extra: &str) -> String {
    format!(
        "upstreams:\n  oai: {{provider: openai, endpoints: ['{}'], key_pool: p}}\nkey_pools:\n  p: {{keys: [{}], strategy: round_robin{extra}}}\n",
        mock.url(),
        keys.join(", ")
    )
}

async fn post_chat(gw: &Gateway) -> reqwest::Response {
    reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
}

fn answer(status: u16, headers: &[(&str, &str)]) -> Option<Scripted> {
    Some(Scripted {
        status,
        headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    })
}

fn remaining_s(k: &Value) -> f64 {
    k["remaining_s"].as_f64().unwrap_or(0.0)
}

/// A key, the headers its 429 carries, the cooling it must get (s).
type Case = (&'static str, Vec<(&'static str, &'static str)>, (f64, f64));

/// Every wait a provider or a broken proxy in front of one can name lands
/// in `[backoff floor, max_wait]` (default 24 h): absurd ones at max_wait, "now" (zero,
/// negative, a date in the past, garbage) at the floor, a token 429's `6ms`
/// request reset at the later token reset. Each key is hit once.
#[tokio::test]
async fn absurd_zero_past_and_future_waits_cool_a_key_within_the_floor_and_max_wait() {
    let mock = MockUpstream::start().await;
    let cases: Vec<Case> = vec![
        ("sk-1e20", vec![("retry-after", "1e20")], (86_000.0, 86_400.0)),
        (
            "sk-go",
            vec![
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "99999999999999999999h"),
            ],
            (86_000.0, 86_400.0),
        ),
        (
            "sk-2999",
            vec![("retry-after", "Tue, 01 Jan 2999 00:00:00 GMT")],
            (86_000.0, 86_400.0),
        ),
        (
            "sk-rfc",
            vec![
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-requests-reset", "9999-12-31T23:59:59Z"),
            ],
            (86_000.0, 86_400.0),
        ),
        ("sk-zero", vec![("retry-after", "0")], (2.5, 6.0)),
        ("sk-neg", vec![("retry-after", "-30")], (2.5, 6.0)),
        (
            "sk-past",
            vec![("retry-after", "Mon, 01 Jan 2001 00:00:00 GMT")],
            (2.5, 6.0),
        ),
        ("sk-junk", vec![("retry-after", "soon-ish")], (2.5, 6.0)),
        (
            "sk-6ms",
            vec![
                ("x-ratelimit-remaining-requests", "4999"),
                ("x-ratelimit-reset-requests", "6ms"),
                ("x-ratelimit-remaining-tokens", "12"),
                ("x-ratelimit-reset-tokens", "40s"),
            ],
            (35.0, 40.0),
        ),
    ];
    let by_key: Arc<HashMap<String, Vec<(String, String)>>> = Arc::new(
        cases
            .iter()
            .map(|(k, h, _)| {
                (
                    k.to_string(),
                    h.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
                )
            })
            .collect(),
    );
    script(&mock, move |key, _| {
        let by_key = by_key.clone();
        async move {
            let headers = by_key.get(&key?)?.clone();
            Some(Scripted { status: 429, headers })
        }
    });
    let keys: Vec<&str> = cases.iter().map(|c| c.0).collect();
    let gw = gateway(&pool(&mock, &keys, ", cooldown: {initial: 5s}"), &route(0)).await;
    for _ in 0..keys.len() {
        let r = post_chat(&gw).await;
        assert!(matches!(r.status().as_u16(), 429 | 503), "{}", r.status());
    }
    let all = pool_keys(&gw, "p").await;
    for (secret, _, (lo, hi)) in &cases {
        let k = pool_key_in(&all, secret);
        assert_eq!(k["state"], "cooling", "{secret}: {k}");
        let left = remaining_s(&k);
        assert!(
            (*lo..=*hi).contains(&left),
            "{secret}: cooling {left} s, want {lo}..={hi}"
        );
        assert_eq!(seen_with(&mock, secret), 1, "{secret} hit once");
    }
    // Still serving (no panic): with every key cooling, a clean 503.
    let r = post_chat(&gw).await;
    assert_eq!(r.status(), 503);
    let after: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=6).contains(&after), "Retry-After {after}");
}

/// `Retry-After: 0` on a one-key pool with `retries: 2` used to send all
/// three attempts straight back to the key that had just said 429.
#[tokio::test]
async fn retry_after_zero_on_a_one_key_pool_is_one_upstream_call_not_three() {
    let mock = MockUpstream::start().await;
    script(&mock, |_, _| async { answer(429, &[("retry-after", "0")]) });
    let gw = gateway(&pool(&mock, &["sk-only"], ""), &route(2)).await;
    let r = post_chat(&gw).await;
    assert_eq!(seen_with(&mock, "sk-only"), 1, "one call for one client request");
    assert!(matches!(r.status().as_u16(), 429 | 503), "{}", r.status());
    let after: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&after), "Retry-After {after}");
    let k = pool_key(&gw, "p", "sk-only").await;
    assert_eq!(k["state"], "cooling", "{k}");
}

/// 20 requests at once at a pool; on each key the first three are slow
/// successes and the rest 429 while those are still running. After all
/// finish every key is still cooling (a late success did not reopen it)
/// and its backoff grew by one step (one failure window), and the slow
/// successes stayed successes for their clients.
async fn late_successes_keep_a_key_cooling(keys: &[&str]) {
    let mock = MockUpstream::start().await;
    let arrivals: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    script(&mock, move |key, _| {
        let arrivals = arrivals.clone();
        async move {
            let key = key?;
            let n = {
                let mut a = arrivals.lock().unwrap();
                let n = a.entry(key).or_default();
                *n += 1;
                *n
            };
            if n <= 3 {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                answer(200, &[])
            } else {
                tokio::time::sleep(Duration::from_millis(300)).await;
                answer(429, &[])
            }
        }
    });
    let gw = gateway(&pool(&mock, keys, ", cooldown: {initial: 30s, max: 5m}"), &route(0)).await;
    let statuses: Vec<u16> = join_all((0..20).map(|_| async { post_chat(&gw).await.status().as_u16() })).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(ok, 3 * keys.len(), "{statuses:?}");
    let all = pool_keys(&gw, "p").await;
    for secret in keys {
        assert!(seen_with(&mock, secret) > 3, "{secret} saw 429s: {statuses:?}");
        let k = pool_key_in(&all, secret);
        assert_eq!(k["state"], "cooling", "{secret}: a late success reopened it: {k}");
        assert_eq!(
            k["consecutive_failures"], 1,
            "{secret}: one window, one backoff step: {k}"
        );
        let left = remaining_s(&k);
        assert!((20.0..=36.0).contains(&left), "{secret}: {left}");
    }
}

#[tokio::test]
async fn late_successes_do_not_reopen_a_one_key_pool_and_backoff_grows_once() {
    late_successes_keep_a_key_cooling(&["sk-one"]).await;
}

#[tokio::test]
async fn late_successes_do_not_reopen_a_two_key_pool_and_backoff_grows_once() {
    late_successes_keep_a_key_cooling(&["sk-a", "sk-b"]).await;
}

/// `max_in_flight_per_key: 1` under 20 requests at once against a slow
/// upstream: the upstream never sees two at once.
#[tokio::test]
async fn a_cap_of_one_never_has_two_requests_at_the_upstream() {
    let mock = MockUpstream::start().await;
    let now = Arc::new(AtomicU32::new(0));
    let max = Arc::new(AtomicU32::new(0));
    let (n, m) = (now.clone(), max.clone());
    script(&mock, move |_, _| {
        let (n, m) = (n.clone(), m.clone());
        async move {
            let at = n.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(at, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(150)).await;
            n.fetch_sub(1, Ordering::SeqCst);
            answer(200, &[])
        }
    });
    let gw = gateway(&pool(&mock, &["sk-capped"], ", max_in_flight_per_key: 1"), &route(0)).await;
    for _ in 0..3 {
        let statuses: Vec<u16> = join_all((0..20).map(|_| async { post_chat(&gw).await.status().as_u16() })).await;
        assert!(statuses.iter().all(|s| matches!(s, 200 | 503)), "{statuses:?}");
        assert!(statuses.contains(&200), "{statuses:?}");
    }
    assert_eq!(max.load(Ordering::SeqCst), 1, "two requests on a key capped at one");
    // Leases are given back when each request's logging ends, just after
    // its client has the answer.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let k = pool_key(&gw, "p", "sk-capped").await;
        if k["in_flight"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "leases not given back: {k}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One 5xx says the provider is unwell, not that the key is spent: a
/// one-key pool stays open, and the next request is served at once.
#[tokio::test]
async fn one_500_does_not_close_a_one_key_pool() {
    let mock = MockUpstream::start().await;
    script(&mock, |_, n| async move {
        (n == 1).then(|| Scripted {
            status: 500,
            headers: vec![],
        })
    });
    let gw = gateway(&pool(&mock, &["sk-only"], ""), &route(0)).await;
    let first = post_chat(&gw).await.status().as_u16();
    assert!(first >= 500, "{first}");
    let r = post_chat(&gw).await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_eq!(seen_with(&mock, "sk-only"), 2);
    let k = pool_key(&gw, "p", "sk-only").await;
    assert_eq!(k["state"], "active", "{k}");
    assert_eq!(k["consecutive_failures"], 0, "{k}");
}

/// A half-open key's probe that never answers (a slow model, a client whose
/// input the provider chews on) keeps the others off the key for at most
/// the probe hold (5 s), not until it ends.
#[tokio::test]
async fn a_slow_probe_does_not_hold_a_key_closed_past_the_probe_hold() {
    let mock = MockUpstream::start().await;
    script(&mock, |_, n| async move {
        match n {
            1 => answer(429, &[("retry-after", "1")]),
            2 => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                answer(200, &[])
            }
            _ => None,
        }
    });
    let gw = gateway(&pool(&mock, &["sk-only"], ""), &route(0)).await;
    assert!(matches!(post_chat(&gw).await.status().as_u16(), 429 | 503));
    tokio::time::sleep(Duration::from_millis(1400)).await;
    let url = gw.url("/v1/chat/completions");
    let probe = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "slow"}]}))
            .send()
            .await
    });
    // Wait for the probe to reach the upstream.
    let started = Instant::now();
    while mock.seen().len() < 2 {
        assert!(started.elapsed() < Duration::from_secs(5), "the probe never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let probe_at = Instant::now();
    let mut busy = 0;
    let served_after = loop {
        let r = post_chat(&gw).await;
        match r.status().as_u16() {
            200 => break probe_at.elapsed(),
            503 => busy += 1,
            s => panic!("unexpected {s}"),
        }
        assert!(
            probe_at.elapsed() < Duration::from_secs(9),
            "still refused {:?} after the probe started ({busy} refusals)",
            probe_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(busy >= 1, "one probe at a time: the first others wait");
    assert!(
        served_after >= Duration::from_secs(4) && served_after < Duration::from_secs(8),
        "served {served_after:?} after the probe started"
    );
    probe.abort();
    let k = pool_key(&gw, "p", "sk-only").await;
    assert_eq!(k["state"], "active", "{k}");
}

/// `cool_on`/`disable_on` per pool: a 402 can cool, a 403 can be a mere
/// answer (not counted towards disabling).
#[tokio::test]
async fn cool_on_and_disable_on_are_per_pool() {
    let mock = MockUpstream::start().await;
    script(&mock, |key, _| async move {
        match key.as_deref() {
            Some("sk-402") => answer(402, &[]),
            Some("sk-403") => answer(403, &[]),
            _ => None,
        }
    });
    let gw = gateway(
        &pool(
            &mock,
            &["sk-402", "sk-403"],
            ", cool_on: [429, \"500-599\", 402], disable_on: [401], disable_after: 1",
        ),
        &route(0),
    )
    .await;
    for _ in 0..6 {
        post_chat(&gw).await;
    }
    let all = pool_keys(&gw, "p").await;
    let k402 = pool_key_in(&all, "sk-402");
    assert_eq!(k402["state"], "cooling", "{k402}");
    assert_eq!(seen_with(&mock, "sk-402"), 1);
    let k403 = pool_key_in(&all, "sk-403");
    assert_eq!(k403["state"], "active", "403 is not in disable_on: {k403}");
    assert!(seen_with(&mock, "sk-403") >= 4);
}

#[test]
fn a_bad_status_list_is_reported_by_check() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("routes.d")).unwrap();
    let conf = dir.path().join("fastgate.yaml");
    std::fs::write(
        &conf,
        "key_pools:\n  p:\n    keys: [sk-x]\n    cool_on: [429, \"500-700\"]\n",
    )
    .unwrap();
    let (ok, _, err) = check(&conf, dir.path());
    assert!(!ok);
    assert!(err.contains("500-700") && err.contains("100-599"), "{err}");
    std::fs::write(
        &conf,
        "key_pools:\n  p:\n    keys: [sk-x]\n    disable_on: [401, \"402-403\"]\n",
    )
    .unwrap();
    let (ok, _, err) = check(&conf, dir.path());
    assert!(ok, "{err}");
}

/// Poll `secret`'s key on `gw` until `done` holds (at most `limit`).
async fn key_until(gw: &Gateway, secret: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let k = pool_key(gw, "p", secret).await;
        if done(&k) {
            return k;
        }
        assert!(start.elapsed() < limit, "{secret} on {}: {k}", gw.admin_url(""));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Cluster mode: a key's recovery (its half-open probe answered well) is
/// published like its cooldown, so the other node forgets the backoff too
/// instead of keeping a stale failure streak (and, with versions, a stale
/// stored state cannot undo it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recovery_is_published_to_the_other_nodes() {
    let redis = Redis::start().await;
    let mock = MockUpstream::start().await;
    script(&mock, |_, n| async move {
        (n == 1).then(|| Scripted {
            status: 429,
            headers: vec![("retry-after".into(), "1".into())],
        })
    });
    let config = |node: &str| {
        format!(
            "admin:\n  token: {TOKEN}\ncluster:\n  redis: {}\n  timeout: 1s\n  node_id: {node}\n{}",
            redis.url(),
            pool(&mock, &["sk-one"], "")
        )
    };
    let routes = route(0);
    let a = Gateway::start_with_admin(&config("node-a"), &[("r.yaml", routes.as_str())]).await;
    let b = Gateway::start_with_admin(&config("node-b"), &[("r.yaml", routes.as_str())]).await;
    for n in [&a, &b] {
        eventually_text(
            || reqwest::Client::new().get(n.admin_url("/metrics")),
            |t| t.contains("fastgate_cluster_nodes 2"),
        )
        .await;
    }
    assert!(matches!(post_chat(&a).await.status().as_u16(), 429 | 503));
    let k = key_until(&b, "sk-one", Duration::from_secs(3), |k| k["state"] == "cooling").await;
    assert_eq!(k["consecutive_failures"], 1, "{k}");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // Node A's next request is the probe, and it succeeds.
    assert_eq!(post_chat(&a).await.status(), 200);
    let k = key_until(&b, "sk-one", Duration::from_secs(3), |k| k["consecutive_failures"] == 0).await;
    assert_eq!(k["state"], "active", "{k}");
    assert_eq!(k["probing"], false, "{k}");
}
