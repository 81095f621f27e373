//! Cluster mode, exact (issue 23): what a client sends never reaches Redis
//! as an identity, a call whose answer was lost is applied once, a slot
//! released during an outage is given back, every key FastGate writes
//! expires, a token refusal does bounded work, and the library runs on a
//! Redis Cluster. Real gateways, real redis-server, a FaultProxy between.
#![allow(clippy::unwrap_used)]

mod common;

use common::{FaultProxy, Gateway, MockUpstream, Redis, wait_metric};
use serde_json::{Value, json};
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

const TOKEN: &str = "cluster-admin-token-0123456789abcdef";
const ROUTE: &str =
    "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, upstream: oai, retries: 2 }\n";

/// One node's config: `window` is `cluster.rate_window`, `timeout`
/// `cluster.timeout`, `pool_extra` goes inside the pool's flow mapping.
fn config(redis_url: &str, mock: &MockUpstream, node: &str, window: &str, timeout: &str, pool_extra: &str) -> String {
    format!(
        "admin:\n  token: {TOKEN}\ncluster:\n  redis: {redis_url}\n  rate_window: {window}\n  timeout: {timeout}\n  node_id: {node}\nupstreams:\n  oai: {{provider: openai, endpoints: ['{}'], key_pool: p}}\nkey_pools:\n  p: {{keys: [sk-1, sk-2], strategy: round_robin{pool_extra}}}\n",
        mock.url(),
    )
}

/// Nodes on the given Redis URLs (one per node), with a gateway key per
/// entry of `keys` (admin API fields: rpm, tpm, token_quota...) made on the
/// first before the others start from its database; returns the nodes,
/// once each sees all of them, and the keys' (id, secret).
async fn nodes(
    urls: &[String],
    mock: &MockUpstream,
    window: &str,
    timeout: &str,
    pool_extra: &str,
    keys: &[Value],
) -> (Vec<Gateway>, Vec<(String, String)>) {
    let routes = [("r.yaml", ROUTE)];
    let cfg = |i: usize| config(&urls[i], mock, &format!("node-{i}"), window, timeout, pool_extra);
    let first = Gateway::start_with_admin(&cfg(0), &routes).await;
    let mut made = Vec::new();
    for fields in keys {
        made.push(make_key(&first, fields).await);
    }
    let mut all = vec![first];
    for i in 1..urls.len() {
        let next = Gateway::start_seeded(&cfg(i), &routes, &all[0]).await;
        all.push(next);
    }
    for n in &all {
        wait_metric(n, "fastgate_cluster_redis_up 1").await;
        wait_metric(n, &format!("fastgate_cluster_nodes {}", urls.len())).await;
    }
    (all, made)
}

/// A gateway key made through `gw`'s admin API with `fields`; (id, secret).
async fn make_key(gw: &Gateway, fields: &Value) -> (String, String) {
    let mut body = json!({"name": "exact"});
    body.as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    let r = reqwest::Client::new()
        .post(gw.admin_url("/api/keys"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let v: Value = r.json().await.unwrap();
    (
        v["id"].as_str().unwrap().to_string(),
        v["secret"].as_str().unwrap().to_string(),
    )
}

fn chat() -> Value {
    json!({"model": "gpt-4o", "max_tokens": 40, "messages": [{"role": "user", "content": "hi"}]})
}

/// One chat request, with `request_id` as its `X-Request-Id` if given;
/// returns the status.
async fn post(client: &reqwest::Client, url: String, secret: &str, request_id: Option<&str>) -> u16 {
    let mut r = client.post(url).bearer_auth(secret).json(&chat());
    if let Some(id) = request_id {
        r = r.header("x-request-id", id);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let _ = r.bytes().await;
    status
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Every key in Redis.
async fn all_keys(conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// A key's element count (hash fields, set members), 1 for a string.
async fn size_of(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> (String, u64) {
    let kind: String = redis::cmd("TYPE").arg(key).query_async(conn).await.unwrap();
    let size: u64 = match kind.as_str() {
        "hash" => redis::cmd("HLEN").arg(key).query_async(conn).await.unwrap(),
        "zset" => redis::cmd("ZCARD").arg(key).query_async(conn).await.unwrap(),
        "set" => redis::cmd("SCARD").arg(key).query_async(conn).await.unwrap(),
        "list" => redis::cmd("LLEN").arg(key).query_async(conn).await.unwrap(),
        _ => 1,
    };
    (kind, size)
}

/// The slots a lease set holds (scored by expiry; a tombstone of a slot
/// given back before its take arrived scores below 0).
async fn held_in(conn: &mut redis::aio::MultiplexedConnection, set: &str) -> u64 {
    redis::cmd("ZCOUNT")
        .arg(set)
        .arg("(0")
        .arg("+inf")
        .query_async(conn)
        .await
        .unwrap()
}

/// Every quota counter of key `id` in Redis, summed: what it was charged.
async fn quota_charged(conn: &mut redis::aio::MultiplexedConnection, id: &str) -> u64 {
    let mut total = 0u64;
    for k in all_keys(conn)
        .await
        .iter()
        .filter(|k| k.contains(":q:") && k.contains(id))
    {
        let v: Option<u64> = redis::cmd("GET").arg(k).query_async(conn).await.unwrap();
        total += v.unwrap_or(0);
    }
    total
}

/// A stream of seven events `interval_ms` apart, started; returns the
/// response once its headers are in (the request holds its lease).
async fn start_stream(client: &reqwest::Client, url: String, secret: &str) -> reqwest::Response {
    let r = client
        .post(url)
        .bearer_auth(secret)
        .json(&json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repeated_request_id_is_not_a_free_pass() {
    let redis = Redis::start().await;
    let mock = MockUpstream::start().await;
    let (all, keys) = nodes(
        &[redis.url(), redis.url()],
        &mock,
        "5s",
        "1s",
        "",
        &[json!({"rpm": 5}), json!({"tpm": 1000})],
    )
    .await;
    let client = reqwest::Client::new();

    // rpm 5: twelve requests under one id, then four fresh ones.
    let secret = keys[0].1.clone();
    let mut statuses = Vec::new();
    for i in 0..16 {
        let id = (i < 12).then_some("same-id-0001");
        statuses.push(post(&client, all[i % 2].url("/v1/chat/completions"), &secret, id).await);
    }
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "exactly the limit, whatever the request ids: {statuses:?}"
    );

    // tpm 1000, rounds of twelve concurrent streams under one id, all
    // admitted before any is settled: reservations (about 80 each) are
    // settled to the 14 tokens each stream used, so round after round is
    // admitted (a repeated id used to leave all but one reservation
    // counted: one round, then about one a round), never more than 1000
    // tokens' worth.
    let secret = keys[1].1.clone();
    mock.behaviour.sse_interval_ms.store(100, Ordering::Relaxed);
    let start = Instant::now();
    let mut admitted = 0;
    for _round in 0..4 {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..12 {
            let (client, url, secret) = (client.clone(), all[i % 2].url("/v1/chat/completions"), secret.clone());
            set.spawn(async move {
                let r = client
                    .post(url)
                    .bearer_auth(&secret)
                    .header("x-request-id", "same-id-0002")
                    .json(&json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 40, "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let _ = r.bytes().await;
                status
            });
        }
        while let Some(s) = set.join_next().await {
            let s = s.unwrap();
            assert!(s == 200 || s == 429, "{s}");
            admitted += usize::from(s == 200);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mock.behaviour.sse_interval_ms.store(0, Ordering::Relaxed);
    // The bound holds per window (the rounds take about 3 s of its 5).
    assert!(
        start.elapsed() > Duration::from_secs(5) || admitted * 14 <= 1000,
        "{admitted} streams of 14 tokens in a 1000-token window"
    );
    assert!(
        admitted >= 24,
        "only {admitted} admitted: settlements under one repeated id did not give reservations back"
    );

    // max_in_flight_per_key 2 on both pool keys, across two nodes (each
    // could hold four on its own), every request under one id.
    drop(all);
    let (all, keys) = nodes(
        &[redis.url(), redis.url()],
        &mock,
        "5s",
        "1s",
        ", max_in_flight_per_key: 2",
        &[json!({})],
    )
    .await;
    let secret = keys[0].1.clone();
    mock.behaviour.sse_interval_ms.store(300, Ordering::Relaxed);
    let mut set = tokio::task::JoinSet::new();
    for n in &all {
        for _ in 0..3 {
            let (client, url, secret) = (client.clone(), n.url("/v1/chat/completions"), secret.clone());
            set.spawn(async move {
                let r = client
                    .post(url)
                    .bearer_auth(&secret)
                    .header("x-request-id", "same-id-0003")
                    .json(&json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let _ = r.bytes().await;
                status
            });
        }
    }
    let mut answers = Vec::new();
    while let Some(r) = set.join_next().await {
        answers.push(r.unwrap());
    }
    assert_eq!(
        answers.iter().filter(|s| **s == 200).count(),
        4,
        "two keys with two slots each, cluster-wide, one request id: {answers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_released_while_redis_is_unreachable_is_given_back_once_it_returns() {
    let redis = Redis::start().await;
    let proxy = FaultProxy::start(redis.port).await;
    let mock = MockUpstream::start().await;
    // Node 0 reaches Redis through the proxy, node 1 directly. One key,
    // one slot cluster-wide.
    let (all, keys) = nodes(
        &[proxy.url_for(&redis.url()), redis.url()],
        &mock,
        "5s",
        "300ms",
        ", max_in_flight_per_key: 1",
        &[json!({})],
    )
    .await;
    let secret = keys[0].1.clone();
    let client = reqwest::Client::new();
    // Two keys in the pool: hold both, one per node, so node 1 needs
    // node 0's slot back.
    mock.behaviour.sse_interval_ms.store(600, Ordering::Relaxed);
    let held = start_stream(&client, all[0].url("/v1/chat/completions"), &secret).await;
    let other = start_stream(&client, all[1].url("/v1/chat/completions"), &secret).await;
    proxy.cut();
    wait_metric(&all[0], "fastgate_cluster_redis_up 0").await;
    // Both streams end while node 0 cannot reach Redis: its release fails.
    let _ = held.bytes().await;
    let _ = other.bytes().await;
    mock.behaviour.sse_interval_ms.store(0, Ordering::Relaxed);
    proxy.pass();
    wait_metric(&all[0], "fastgate_cluster_redis_up 1").await;
    let mut conn = redis_conn(&redis.url()).await;
    let mut held_slots = u64::MAX;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        held_slots = 0;
        for k in all_keys(&mut conn).await.iter().filter(|k| k.contains(":if:")) {
            held_slots += held_in(&mut conn, k).await;
        }
        if held_slots == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(held_slots, 0, "the slot released during the outage is still held");
    // Both keys serve on node 1 again (one slot each).
    let mut set = tokio::task::JoinSet::new();
    mock.behaviour.sse_interval_ms.store(300, Ordering::Relaxed);
    for _ in 0..2 {
        let (client, url, secret) = (client.clone(), all[1].url("/v1/chat/completions"), secret.clone());
        set.spawn(async move { start_stream(&client, url, &secret).await.bytes().await.is_ok() });
    }
    while let Some(r) = set.join_next().await {
        assert!(r.unwrap());
    }
}

/// A Redis that refuses writes for a while (out of memory; the same path
/// as `LOADING` after a restart, `READONLY` after a failover) is an outage,
/// not a verdict on the call: the settlement and the slot's release made
/// meanwhile are kept and sent once it takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settlements_and_releases_survive_a_redis_that_refuses_writes_for_a_while() {
    let redis = Redis::start().await;
    let mock = MockUpstream::start().await;
    let (all, keys) = nodes(
        &[redis.url()],
        &mock,
        "5s",
        "300ms",
        ", max_in_flight_per_key: 1",
        &[json!({"token_quota": 1_000_000, "quota_period": "day"})],
    )
    .await;
    let (id, secret) = keys[0].clone();
    let client = reqwest::Client::new();
    let mut conn = redis_conn(&redis.url()).await;
    let held = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            let mut n = 0;
            for k in all_keys(&mut conn).await.iter().filter(|k| k.contains(":if:")) {
                n += held_in(&mut conn, k).await;
            }
            n
        }
    };
    // Two streams of the pool's two keys (one slot each) start while Redis
    // takes writes, and end while it refuses them.
    mock.behaviour.sse_interval_ms.store(200, Ordering::Relaxed);
    let a = start_stream(&client, all[0].url("/v1/chat/completions"), &secret).await;
    let b = start_stream(&client, all[0].url("/v1/chat/completions"), &secret).await;
    assert_eq!(held(&mut conn).await, 2);
    let config = |v: &str| redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(v).clone();
    config("1").query_async::<()>(&mut conn).await.unwrap();
    let _ = a.bytes().await;
    let _ = b.bytes().await;
    // Longer than the three tries a refused batch used to get.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    config("0").query_async::<()>(&mut conn).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut tokens, mut slots) = (0, u64::MAX);
    while Instant::now() < deadline {
        (tokens, slots) = (quota_charged(&mut conn, &id).await, held(&mut conn).await);
        if tokens > 0 && slots == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        tokens > 0,
        "the settlements made while Redis refused writes were dropped:\n{}",
        all[0].logs()
    );
    assert_eq!(slots, 0, "slots released while Redis refused writes are still held");
    // Both keys serve again at once.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let (client, url, secret) = (client.clone(), all[0].url("/v1/chat/completions"), secret.clone());
        set.spawn(async move { start_stream(&client, url, &secret).await.status().as_u16() });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap(), 200);
    }
}

/// Redis's Lua writes numbers with 14 significant digits: a tpm of 2^62
/// and a `max_tokens` of u64::MAX (both accepted) must still reach Redis as
/// integers, or every such request fails in Redis and is decided locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_limits_and_amounts_reach_redis_as_integers() {
    let redis = Redis::start().await;
    let mock = MockUpstream::start().await;
    let huge = 1u64 << 62;
    let (all, keys) = nodes(
        &[redis.url()],
        &mock,
        "5s",
        "1s",
        "",
        &[json!({"rpm": huge, "tpm": huge, "token_quota": huge, "quota_period": "day"})],
    )
    .await;
    let secret = keys[0].1.clone();
    let client = reqwest::Client::new();
    // The first reserves the whole window until it settles (10 tokens).
    for max_tokens in [u64::MAX, 40, 40] {
        let r = client
            .post(all[0].url("/v1/chat/completions"))
            .bearer_auth(&secret)
            .json(
                &json!({"model": "gpt-4o", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", all[0].logs());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut conn = redis_conn(&redis.url()).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut fields: Vec<String> = Vec::new();
    while Instant::now() < deadline {
        fields = Vec::new();
        for k in all_keys(&mut conn).await.iter().filter(|k| k.contains(":t:")) {
            let all: Vec<String> = redis::cmd("HVALS").arg(k).query_async(&mut conn).await.unwrap();
            fields.extend(all);
        }
        if !fields.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!fields.is_empty(), "no token window in Redis:\n{}", all[0].logs());
    assert!(fields.iter().all(|v| v.parse::<i64>().is_ok()), "{fields:?}");
    let logs = all[0].logs();
    assert!(!logs.contains("Redis refused"), "{logs}");
    assert!(!logs.contains("decided locally"), "{logs}");
}

/// A node stopped right after its last answers (SIGTERM, as a rolling
/// deploy does) sends their settlements first: they linger a few ms to be
/// batched, and nothing else (no audit flush here) holds the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_stopped_right_after_its_answers_charges_them_all() {
    let redis = Redis::start().await;
    let mock = MockUpstream::start().await;
    let cfg = config(&redis.url(), &mock, "node-0", "60s", "1s", "") + "audit:\n  enabled: false\n";
    let mut gw = Gateway::start_with_admin(&cfg, &[("r.yaml", ROUTE)]).await;
    wait_metric(&gw, "fastgate_cluster_redis_up 1").await;
    let (id, secret) = make_key(&gw, &json!({"token_quota": 1_000_000_000u64, "quota_period": "day"})).await;
    let client = reqwest::Client::new();
    let mut conn = redis_conn(&redis.url()).await;
    // What one answer is charged.
    assert_eq!(post(&client, gw.url("/v1/chat/completions"), &secret, None).await, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let one = quota_charged(&mut conn, &id).await;
    assert!(one > 0);
    let mut sent = 1;
    for _ in 0..4 {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let (client, url, secret) = (client.clone(), gw.url("/v1/chat/completions"), secret.clone());
            set.spawn(async move { post(&client, url, &secret, None).await });
        }
        while let Some(r) = set.join_next().await {
            assert_eq!(r.unwrap(), 200);
            sent += 1;
        }
        // Stopped the moment the last answer is in.
        gw.restart().await;
        wait_metric(&gw, "fastgate_cluster_redis_up 1").await;
    }
    assert_eq!(quota_charged(&mut conn, &id).await, one * sent, "{} answers", sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_settlement_whose_answer_was_lost_is_charged_once() {
    let redis = Redis::start().await;
    let proxy = FaultProxy::start(redis.port).await;
    let mock = MockUpstream::start().await;
    let (all, keys) = nodes(
        &[proxy.url_for(&redis.url())],
        &mock,
        "5s",
        "300ms",
        "",
        &[json!({"token_quota": 1_000_000, "quota_period": "day"})],
    )
    .await;
    let (id, secret) = keys[0].clone();
    let client = reqwest::Client::new();
    let mut conn = redis_conn(&redis.url()).await;
    // One stream settled normally: what one request is charged.
    mock.behaviour.sse_interval_ms.store(150, Ordering::Relaxed);
    let _ = start_stream(&client, all[0].url("/v1/chat/completions"), &secret)
        .await
        .bytes()
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut one = 0;
    while one == 0 && Instant::now() < deadline {
        one = quota_charged(&mut conn, &id).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(one > 0, "the first request was never settled");

    // The next one finishes while Redis's answers are lost: Redis runs
    // the settlement, the node never hears back.
    let r = start_stream(&client, all[0].url("/v1/chat/completions"), &secret).await;
    proxy.drop_replies();
    let _ = r.bytes().await;
    wait_metric(&all[0], "fastgate_cluster_redis_up 0").await;
    assert!(proxy.dropped_replies() > 0);
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.pass();
    wait_metric(&all[0], "fastgate_cluster_redis_up 1").await;
    // Time for any replay (and any double charge) to land.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        quota_charged(&mut conn, &id).await,
        2 * one,
        "two requests of {one} tokens each"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tpm_refusal_does_bounded_work() {
    let redis = Redis::start().await;
    let mock = MockUpstream::start().await;
    // Each answer uses 10 tokens: about 2,200 fit.
    let (all, keys) = nodes(&[redis.url()], &mock, "60s", "1s", "", &[json!({"tpm": 22_000})]).await;
    let secret = keys[0].1.clone();
    let client = reqwest::Client::new();
    let (mut admitted, mut refused, mut sent) = (0usize, 0usize, 0usize);
    while (admitted < 2000 || refused < 20) && sent < 4000 {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..32 {
            let (client, url, secret) = (client.clone(), all[0].url("/v1/chat/completions"), secret.clone());
            set.spawn(async move {
                let r = client
                    .post(url)
                    .bearer_auth(&secret)
                    .json(&chat())
                    .send()
                    .await
                    .unwrap();
                let retry = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
                (r.status().as_u16(), retry)
            });
        }
        while let Some(s) = set.join_next().await {
            match s.unwrap() {
                (200, _) => admitted += 1,
                (429, retry) => {
                    refused += 1;
                    // Refusals answer with when to retry.
                    let retry = retry.expect("a 429 says when to retry");
                    assert!((1..=64).contains(&retry), "Retry-After {retry}");
                }
                (s, _) => panic!("status {s}"),
            }
            sent += 1;
        }
    }
    assert!(admitted >= 2000, "{admitted} admitted of {sent}");
    assert!(refused >= 20, "{refused} refused of {sent}");
    assert!(admitted * 10 <= 22_000, "{admitted} answers of 10 tokens");
    // Whatever was admitted, no key FastGate keeps grew with it: a token
    // window is a bounded set of buckets, and a refusal reads only them.
    let mut conn = redis_conn(&redis.url()).await;
    for k in all_keys(&mut conn).await {
        let (kind, size) = size_of(&mut conn, &k).await;
        assert!(
            size <= 32,
            "{k} ({kind}) holds {size} entries after {admitted} requests"
        );
    }
}

/// One `fastgate_admit_v3` call on `keys` for op `op`: (kind, limit, cost)
/// per limit, a 60 s window. Returns Redis's answer.
async fn admit(
    conn: &mut redis::aio::MultiplexedConnection,
    op: &str,
    keys: &[&str],
    limits: &[(&str, u64, u64)],
) -> Vec<i64> {
    let mut cmd = redis::cmd("FCALL");
    cmd.arg("fastgate_admit_v3")
        .arg(keys.len() + 1)
        .arg(format!("fg:{{fg}}:op:{op}"))
        .arg(keys)
        .arg(op)
        .arg(60_000)
        .arg(limits.len());
    for (kind, limit, cost) in limits {
        cmd.arg(*kind).arg(*limit).arg(*cost);
    }
    cmd.query_async(conn).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_admission_is_counted_once_with_or_without_a_request_limit() {
    let redis = Redis::start().await;
    let mock = MockUpstream::start().await;
    // A node loads the function library.
    let (_all, _keys) = nodes(&[redis.url()], &mock, "60s", "1s", "", &[]).await;
    let mut conn = redis_conn(&redis.url()).await;
    let (log, tokens) = ("fg:{fg}:test:r", "fg:{fg}:test:t");

    // rpm 1 and tpm 100: the first call takes both, its retry answers the
    // same bucket and takes nothing more, another op is refused by rpm.
    let both = [("r", 1, 1), ("t", 100, 60)];
    let first = admit(&mut conn, "n:1:1", &[log, tokens], &both).await;
    assert_eq!(first[0], 0, "{first:?}");
    let again = admit(&mut conn, "n:1:1", &[log, tokens], &both).await;
    assert_eq!(again, first, "a retry answers as the first call did");
    let card: u64 = redis::cmd("ZCARD").arg(log).query_async(&mut conn).await.unwrap();
    assert_eq!(card, 1);
    let sum: u64 = redis::cmd("HGET")
        .arg(tokens)
        .arg("s")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(sum, 60, "the retry reserved nothing more");
    let other = admit(&mut conn, "n:1:2", &[log, tokens], &both).await;
    assert_eq!(
        other[..2],
        [1, 1],
        "another op is refused by the request limit: {other:?}"
    );

    // Without a request limit the op's marker answers the retry.
    let only_tokens = [("t", 100, 30)];
    let t = "fg:{fg}:test:t2";
    let first = admit(&mut conn, "n:1:3", &[t], &only_tokens).await;
    assert_eq!(first[0], 0, "{first:?}");
    for _ in 0..3 {
        assert_eq!(admit(&mut conn, "n:1:3", &[t], &only_tokens).await, first);
    }
    let sum: u64 = redis::cmd("HGET").arg(t).arg("s").query_async(&mut conn).await.unwrap();
    assert_eq!(sum, 30, "three retries reserved nothing more");
    let ok = admit(&mut conn, "n:1:4", &[t], &only_tokens).await;
    assert_eq!(ok[0], 0);
    let refused = admit(&mut conn, "n:1:5", &[t], &[("t", 100, 50)]).await;
    assert_eq!(refused[..2], [1, 1], "60 held, 50 more do not fit in 100: {refused:?}");
}

/// A take whose answer was lost (the node served the request without
/// Redis and gave the slot back) may still reach Redis late, over a stalled
/// connection: it must take nothing, or the slot stays held for
/// `stuck_after` (10 minutes) and the key serves one request fewer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_take_that_arrives_after_its_release_takes_nothing() {
    let redis = Redis::start().await;
    let mock = MockUpstream::start().await;
    let (_all, _keys) = nodes(&[redis.url()], &mock, "60s", "1s", "", &[]).await;
    let mut conn = redis_conn(&redis.url()).await;
    let set = "fg:{fg}:if:test/k";
    let call = |f: &str, args: Vec<String>| {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(f).arg(1).arg(set).arg(args);
        cmd
    };
    let take = |op: &str| call("fastgate_lease_v3", vec![op.into(), "1".into(), "600000".into()]);
    // The release comes first (the node's replay after the outage).
    let given: i64 = call("fastgate_release_v3", vec!["n:1:9".into()])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(given, 0);
    let pttl: i64 = redis::cmd("PTTL").arg(set).query_async(&mut conn).await.unwrap();
    assert!(pttl > 0, "the tombstone's set has a TTL: {pttl}");
    // Then the stale take: answered, nothing held.
    let taken: i64 = take("n:1:9").query_async(&mut conn).await.unwrap();
    assert_eq!(taken, 1);
    assert_eq!(held_in(&mut conn, set).await, 0, "a stale take holds no slot");
    // The one slot is there for a real request, and only one.
    assert_eq!(take("n:1:10").query_async::<i64>(&mut conn).await.unwrap(), 1);
    assert_eq!(take("n:1:11").query_async::<i64>(&mut conn).await.unwrap(), 0);
    assert_eq!(
        take("n:1:10").query_async::<i64>(&mut conn).await.unwrap(),
        1,
        "a retried take"
    );
    assert_eq!(held_in(&mut conn, set).await, 1);
    // Releases give back what is held, once.
    let given: i64 = call("fastgate_release_v3", vec!["n:1:10".into(), "n:1:10".into()])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(given, 1);
    assert_eq!(held_in(&mut conn, set).await, 0);
    assert_eq!(take("n:1:11").query_async::<i64>(&mut conn).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_key_fastgate_writes_has_a_ttl() {
    let redis = Redis::start().await;
    let mock = MockUpstream::start().await;
    mock.behaviour
        .keys
        .lock()
        .unwrap()
        .insert("sk-1".into(), common::KeyRule::RateLimited { retry_after: 30 });
    let (all, keys) = nodes(
        &[redis.url(), redis.url()],
        &mock,
        "5s",
        "1s",
        ", max_in_flight_per_key: 4",
        &[json!({"rpm": 100, "tpm": 100_000, "token_quota": 1_000_000, "quota_period": "day"})],
    )
    .await;
    let limited = keys[0].1.clone();
    let client = reqwest::Client::new();
    for i in 0..10 {
        let s = post(&client, all[i % 2].url("/v1/chat/completions"), &limited, None).await;
        assert_eq!(s, 200);
    }
    // sk-1 answered 429: a key state was stored and published.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut conn = redis_conn(&redis.url()).await;
    let mut keys = Vec::new();
    while Instant::now() < deadline {
        keys = all_keys(&mut conn).await;
        let state = keys.iter().any(|k| k.contains("keystate") || k.contains(":ks"));
        let quota = keys.iter().any(|k| k.contains(":q:"));
        if state && quota {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(keys.len() >= 5, "{keys:?}");
    let mut without = Vec::new();
    for k in &keys {
        let ttl: i64 = redis::cmd("PTTL").arg(k).query_async(&mut conn).await.unwrap();
        if ttl == -1 {
            without.push(k.clone());
        }
    }
    assert!(without.is_empty(), "keys without a TTL: {without:?} (of {keys:?})");
}

/// A single-node Redis Cluster (every slot on one server).
struct ClusterRedis {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl ClusterRedis {
    async fn start() -> ClusterRedis {
        let dir = tempfile::tempdir().unwrap();
        let port = common::free_port();
        let conf: PathBuf = dir.path().join("nodes.conf");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--cluster-enabled", "yes", "--cluster-config-file"])
            .arg(&conf)
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        let url = format!("redis://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut conn = loop {
            if let Ok(c) = redis::Client::open(url.as_str())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
            {
                break c;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server --cluster-enabled did not start"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        let _: () = redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(0)
            .arg(16383)
            .query_async(&mut conn)
            .await
            .unwrap();
        loop {
            let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(&mut conn).await.unwrap();
            if info.contains("cluster_state:ok") {
                break;
            }
            assert!(Instant::now() < deadline, "the cluster never got ready: {info}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        ClusterRedis { port, child, _dir: dir }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for ClusterRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_library_runs_on_a_redis_cluster_and_limits_hold_there() {
    let redis = ClusterRedis::start().await;
    let mock = MockUpstream::start().await;
    // Both limits in one call: several keys, one slot.
    let (all, keys) = nodes(
        &[redis.url(), redis.url()],
        &mock,
        "5s",
        "1s",
        "",
        &[json!({"rpm": 6, "tpm": 100_000})],
    )
    .await;
    let secret = keys[0].1.clone();
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(post(&client, all[0].url("/v1/chat/completions"), &secret, None).await);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        6,
        "the shared limit, not a node's share of it: {statuses:?}"
    );
    let metrics = all[0].metrics().await;
    assert!(
        metrics.contains("fastgate_cluster_local_decisions_total 0\n"),
        "Redis Cluster refused a call: {metrics}\n{}",
        all[0].logs()
    );
}

async fn key_state(gw: &Gateway, upstream_key: &str) -> String {
    let r = reqwest::Client::new()
        .get(gw.admin_url("/api/pools/p/keys"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    common::pool_key_in(&r.json().await.unwrap(), upstream_key)["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disable_is_not_undone_by_another_nodes_concurrent_decisions() {
    let redis = Redis::start().await;
    let proxy = FaultProxy::start(redis.port).await;
    let mock = MockUpstream::start().await;
    let (all, _) = nodes(
        &[proxy.url_for(&redis.url()), redis.url()],
        &mock,
        "5s",
        "300ms",
        "",
        &[],
    )
    .await;
    let client = reqwest::Client::new();
    let key = fastgate::pool::key_id("sk-2");
    // Node 0 is cut off while it disables sk-2; node 1, never having seen
    // that, makes two decisions of its own on the key (two resets: a
    // higher version, nothing re-enabled).
    proxy.cut();
    wait_metric(&all[0], "fastgate_cluster_redis_up 0").await;
    for _ in 0..2 {
        let r = client
            .post(all[1].admin_url(&format!("/api/pools/p/keys/{key}/reset")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = client
        .patch(all[0].admin_url(&format!("/api/pools/p/keys/{key}")))
        .bearer_auth(TOKEN)
        .json(&json!({"enabled": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    proxy.pass();
    wait_metric(&all[0], "fastgate_cluster_redis_up 1").await;
    // Both nodes end up with the disable, and keep it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let states = (key_state(&all[0], "sk-2").await, key_state(&all[1], "sk-2").await);
        if states.0 == "disabled" && states.1 == "disabled" {
            break;
        }
        assert!(Instant::now() < deadline, "sk-2 is {states:?} on the two nodes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for n in &all {
        assert_eq!(key_state(n, "sk-2").await, "disabled");
    }
    // A deliberate enable after it, on either node, opens it everywhere.
    let r = client
        .patch(all[1].admin_url(&format!("/api/pools/p/keys/{key}")))
        .bearer_auth(TOKEN)
        .json(&json!({"enabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while key_state(&all[0], "sk-2").await != "active" {
        assert!(Instant::now() < deadline, "the enable never reached node 0");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_state_of_the_same_version_does_not_overwrite_a_stored_disable() {
    let redis = Redis::start().await;
    let proxy = FaultProxy::start(redis.port).await;
    let mock = MockUpstream::start().await;
    let (all, _) = nodes(
        &[proxy.url_for(&redis.url()), redis.url()],
        &mock,
        "5s",
        "300ms",
        "",
        &[],
    )
    .await;
    let client = reqwest::Client::new();
    let key = fastgate::pool::key_id("sk-2");
    let field = format!("p/{key}");
    // Node 1 disables sk-2 (stored in Redis) while node 0, cut off, makes
    // one decision of its own on it: both reach the same version.
    proxy.cut();
    wait_metric(&all[0], "fastgate_cluster_redis_up 0").await;
    let r = client
        .patch(all[1].admin_url(&format!("/api/pools/p/keys/{key}")))
        .bearer_auth(TOKEN)
        .json(&json!({"enabled": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .post(all[0].admin_url(&format!("/api/pools/p/keys/{key}/reset")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut conn = redis_conn(&redis.url()).await;
    let stored = async |conn: &mut redis::aio::MultiplexedConnection| -> String {
        redis::cmd("HGET")
            .arg("fg:{fg}:ks")
            .arg(&field)
            .query_async::<Option<String>>(conn)
            .await
            .unwrap()
            .unwrap_or_default()
    };
    let before = stored(&mut conn).await;
    assert!(before.contains("disabled by"), "{before}");
    proxy.pass();
    wait_metric(&all[0], "fastgate_cluster_redis_up 1").await;
    // Node 0's queued state goes out once it is back; what Redis keeps
    // must still be the disable (a node that starts later reads it).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = stored(&mut conn).await;
    assert!(
        after.contains("disabled by"),
        "the stored state lost the disable: {after}"
    );
    for n in &all {
        assert_eq!(key_state(n, "sk-2").await, "disabled");
    }
    // A node with a database of its own learns the disable from Redis.
    let later = Gateway::start_with_admin(
        &config(&redis.url(), &mock, "node-later", "5s", "300ms", ""),
        &[("r.yaml", ROUTE)],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while key_state(&later, "sk-2").await != "disabled" {
        assert!(Instant::now() < deadline, "the later node never saw the disable");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
