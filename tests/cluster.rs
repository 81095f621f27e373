//! Cluster mode against a real Redis (Debian's `redis-server`, started by
//! the test on a loopback port): three nodes share exact limits and pool key
//! states, and keep serving while Redis is gone.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Gateway, KeyRule, MockUpstream, Redis, wait_metric};
use fastgate::pool::key_id;
use serde_json::{Value, json};
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

const TOKEN: &str = "cluster-admin-token-0123456789abcdef";
const ROUTE: &str =
    "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, upstream: oai, retries: 2 }\n";
/// The tests' rolling window (`cluster.rate_window`): "30 per minute" is 30 per 5 s.
const WINDOW: Duration = Duration::from_secs(5);

fn node_config(redis_url: &str, mock: &MockUpstream, node: &str, keys: &[&str], cluster_extra: &str) -> String {
    pooled_node_config(redis_url, mock, node, keys, cluster_extra, "")
}

/// `pool_extra` goes inside the pool's flow mapping (`, key: value`).
/// `cluster.timeout` is generous: on a loaded test machine a Redis call can
/// take longer than the 50 ms default, which opens the breaker and lets the
/// approximate local fallback decide; these tests are about the exact path.
fn pooled_node_config(
    redis_url: &str,
    mock: &MockUpstream,
    node: &str,
    keys: &[&str],
    cluster_extra: &str,
    pool_extra: &str,
) -> String {
    format!(
        "admin:\n  token: {TOKEN}\ncluster:\n  redis: {redis_url}\n  rate_window: 5s\n  timeout: 1s\n  node_id: {node}\n{cluster_extra}upstreams:\n  oai: {{provider: openai, endpoints: ['{}'], key_pool: p}}\nkey_pools:\n  p: {{keys: [{}], strategy: round_robin{pool_extra}}}\n",
        mock.url(),
        keys.join(", ")
    )
}

/// Three nodes on one Redis sharing one gateway key (created with
/// `key_args`); returns them once each shares its limits with all three.
async fn three_nodes(redis: &Redis, mock: &MockUpstream, keys: &[&str], key_args: &[&str]) -> (Vec<Gateway>, String) {
    three_pooled_nodes(redis, mock, keys, key_args, "").await
}

async fn three_pooled_nodes(
    redis: &Redis,
    mock: &MockUpstream,
    keys: &[&str],
    key_args: &[&str],
    pool_extra: &str,
) -> (Vec<Gateway>, String) {
    let routes = [("r.yaml", ROUTE)];
    let config = |node: &str| pooled_node_config(&redis.url(), mock, node, keys, "", pool_extra);
    let a = Gateway::start_with_admin(&config("node-a"), &routes).await;
    let (_, secret) = a.create_key(key_args);
    let b = Gateway::start_seeded(&config("node-b"), &routes, &a).await;
    let c = Gateway::start_seeded(&config("node-c"), &routes, &a).await;
    let nodes = vec![a, b, c];
    for n in &nodes {
        wait_metric(n, "fastgate_cluster_redis_up 1").await;
        wait_metric(n, "fastgate_cluster_nodes 3").await;
    }
    (nodes, secret)
}

fn chat() -> Value {
    json!({"model": "gpt-4o", "max_tokens": 40, "messages": [{"role": "user", "content": "hi"}]})
}

async fn post(client: &reqwest::Client, gw_url: String, secret: &str) -> (u16, Option<u64>) {
    let r = client
        .post(gw_url)
        .bearer_auth(secret)
        .json(&chat())
        .send()
        .await
        .unwrap();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (r.status().as_u16(), retry)
}

/// `per_node` concurrent requests on every node at once; statuses by node.
async fn burst(nodes: &[Gateway], secret: &str, per_node: usize) -> Vec<Vec<(u16, Option<u64>)>> {
    let client = reqwest::Client::new();
    let mut set = tokio::task::JoinSet::new();
    for (i, n) in nodes.iter().enumerate() {
        for _ in 0..per_node {
            let (client, url, secret) = (client.clone(), n.url("/v1/chat/completions"), secret.to_string());
            set.spawn(async move { (i, post(&client, url, &secret).await) });
        }
    }
    let mut by_node = vec![Vec::new(); nodes.len()];
    while let Some(r) = set.join_next().await {
        let (i, answer) = r.unwrap();
        by_node[i].push(answer);
    }
    by_node
}

fn ok(by_node: &[Vec<(u16, Option<u64>)>]) -> usize {
    by_node.iter().flatten().filter(|(s, _)| *s == 200).count()
}

fn assert_only_200_or_429(by_node: &[Vec<(u16, Option<u64>)>]) {
    for (s, retry) in by_node.iter().flatten() {
        assert!(*s == 200 || *s == 429, "status {s}: {by_node:?}");
        if *s == 429 {
            let r = retry.expect("a 429 says when to retry");
            assert!((1..=WINDOW.as_secs() + 1).contains(&r), "Retry-After {r}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_gets_exactly_its_limit_across_three_nodes_in_any_rolling_window() {
    let redis = Redis::start().await;
    let mock = MockUpstream::start().await;
    let (nodes, secret) = three_nodes(&redis, &mock, &["sk-1"], &["--rpm", "30"]).await;

    let first = burst(&nodes, &secret, 20).await;
    let first_done = Instant::now();
    assert_only_200_or_429(&first);
    assert_eq!(ok(&first), 30, "exactly the limit across the nodes: {first:?}");
    assert!(
        first.iter().filter(|n| n.iter().any(|(s, _)| *s == 200)).count() >= 2,
        "the limit is shared, not taken by one node: {first:?}"
    );

    // Half a window later the same 30 still count.
    tokio::time::sleep(WINDOW / 2).await;
    let second = burst(&nodes, &secret, 5).await;
    assert_only_200_or_429(&second);
    assert_eq!(ok(&second), 0, "the rolling window still holds 30: {second:?}");

    // Once the first 30 have left the window, 30 more and no more.
    tokio::time::sleep((first_done + WINDOW + Duration::from_millis(300)).saturating_duration_since(Instant::now()))
        .await;
    let third = burst(&nodes, &secret, 20).await;
    assert_only_200_or_429(&third);
    assert_eq!(ok(&third), 30, "{third:?}");
    assert_eq!(mock.seen().len(), 60, "the upstream saw only the admitted requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_are_reserved_before_and_settled_after_across_nodes() {
    let redis = Redis::start().await;
    let mock = MockUpstream::start().await;
    // Each answer uses 10 tokens; each request reserves its size / 4 plus
    // max_tokens 40, about 65.
    let (nodes, secret) = three_nodes(&redis, &mock, &["sk-1"], &["--tpm", "200"]).await;
    let start = Instant::now();
    let mut admitted = 0;
    let mut rounds = 0;
    while start.elapsed() < Duration::from_secs(3) {
        let round = burst(&nodes, &secret, 2).await;
        assert_only_200_or_429(&round);
        admitted += ok(&round);
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rounds >= 3, "{rounds} rounds");
    assert!(
        admitted * 10 <= 200,
        "{admitted} answers of 10 tokens went past 200 tokens per window"
    );
    // Reservations alone would stop at 3 (3 x 65 <= 200); settled answers
    // give back what they did not use.
    assert!(admitted > 3, "only {admitted} admitted: reservations were not settled");
    assert_eq!(mock.seen().len(), admitted);
}

async fn pool_key(gw: &Gateway, secret: &str) -> Value {
    let r = reqwest::Client::new()
        .get(gw.admin_url("/api/pools/p/keys"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    common::pool_key_in(&r.json().await.unwrap(), secret)
}

/// How long until `secret`'s state is `want` on `gw` (polled every 2 ms).
async fn time_until_state(gw: &Gateway, secret: &str, want: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let k = pool_key(gw, secret).await;
        if k["state"] == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{secret} still {} on {}: {k}",
            k["state"],
            gw.admin_url("")
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_cooled_or_disabled_on_one_node_is_so_on_every_node() {
    let redis = Redis::start().await;
    let mock = MockUpstream::start().await;
    mock.behaviour
        .keys
        .lock()
        .unwrap()
        .insert("sk-hot".into(), KeyRule::RateLimited { retry_after: 30 });
    let (nodes, secret) = three_nodes(&redis, &mock, &["sk-hot", "sk-cold"], &[]).await;
    let client = reqwest::Client::new();
    let seen_hot = || {
        mock.seen()
            .iter()
            .filter(|s| s.header("authorization") == Some("Bearer sk-hot"))
            .count()
    };
    // Round robin: one of the first two requests on node A meets the 429.
    for _ in 0..2 {
        let (status, _) = post(&client, nodes[0].url("/v1/chat/completions"), &secret).await;
        assert_eq!(status, 200, "the request failed over to the other key");
        if seen_hot() == 1 {
            break;
        }
    }
    assert_eq!(seen_hot(), 1);
    for n in &nodes[1..] {
        let took = time_until_state(n, "sk-hot", "cooling", Duration::from_millis(100)).await;
        eprintln!("cooldown seen on {} after {took:?}", n.admin_url(""));
        let left = pool_key(n, "sk-hot").await["remaining_s"].as_f64().unwrap();
        assert!((25.0..=30.0).contains(&left), "cooling for the Retry-After: {left}");
    }
    for n in &nodes[1..] {
        for _ in 0..3 {
            assert_eq!(post(&client, n.url("/v1/chat/completions"), &secret).await.0, 200);
        }
    }
    assert_eq!(seen_hot(), 1, "no node tried the cooling key again");

    // An admin disables a key through node B: disabled on A and C too.
    let id = key_id("sk-cold");
    let r = client
        .patch(nodes[1].admin_url(&format!("/api/pools/p/keys/{id}")))
        .bearer_auth(TOKEN)
        .json(&json!({"enabled": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for n in [&nodes[0], &nodes[2]] {
        time_until_state(n, "sk-cold", "disabled", Duration::from_millis(100)).await;
    }
    // Enabled again through node C: active on A and B.
    let r = client
        .patch(nodes[2].admin_url(&format!("/api/pools/p/keys/{id}")))
        .bearer_auth(TOKEN)
        .json(&json!({"enabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for n in &nodes[..2] {
        time_until_state(n, "sk-cold", "active", Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_redis_each_node_enforces_its_share_and_nothing_fails() {
    let mut redis = Redis::start().await;
    let mock = MockUpstream::start().await;
    let (nodes, secret) = three_nodes(&redis, &mock, &["sk-1"], &["--rpm", "30"]).await;
    let nodes = Arc::new(nodes);

    // Steady load on every node while Redis is killed.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for i in 0..nodes.len() {
        let (nodes, stop, secret) = (nodes.clone(), stop.clone(), secret.clone());
        load.spawn(async move {
            let client = reqwest::Client::new();
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                statuses.push(post(&client, nodes[i].url("/v1/chat/completions"), &secret).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.kill();
    for n in nodes.iter() {
        wait_metric(n, "fastgate_cluster_redis_up 0").await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut during = Vec::new();
    while let Some(r) = load.join_next().await {
        during.push(r.unwrap());
    }
    assert_only_200_or_429(&during);

    // Two windows later (the local windows have emptied): each node admits
    // its third of the limit.
    tokio::time::sleep(WINDOW * 2 + Duration::from_millis(200)).await;
    let down = burst(&nodes, &secret, 15).await;
    assert_only_200_or_429(&down);
    for (i, n) in down.iter().enumerate() {
        let admitted = n.iter().filter(|(s, _)| *s == 200).count();
        assert!(
            (9..=11).contains(&admitted),
            "node {i} admitted {admitted} of 30 / 3: {down:?}"
        );
    }
    let metrics = nodes[0].metrics().await;
    assert!(
        !metrics.contains("fastgate_cluster_local_decisions_total 0\n"),
        "{metrics}"
    );

    // Redis back (empty): the limit is shared and exact again.
    redis.restart().await;
    for n in nodes.iter() {
        wait_metric(n, "fastgate_cluster_redis_up 1").await;
    }
    let back = burst(&nodes, &secret, 20).await;
    assert_only_200_or_429(&back);
    assert_eq!(ok(&back), 30, "{back:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_per_key_in_flight_cap_holds_across_the_nodes() {
    let redis = Redis::start().await;
    let mock = MockUpstream::start().await;
    // Streams of a few events 300 ms apart: long enough to overlap.
    mock.behaviour.sse_interval_ms.store(300, Ordering::Relaxed);
    let (nodes, secret) = three_pooled_nodes(&redis, &mock, &["sk-1"], &[], ", max_in_flight_per_key: 2").await;
    let client = reqwest::Client::new();
    let mut set = tokio::task::JoinSet::new();
    for n in &nodes {
        for _ in 0..2 {
            let (client, url, secret) = (client.clone(), n.url("/v1/chat/completions"), secret.clone());
            set.spawn(async move {
                let r = client
                    .post(url)
                    .bearer_auth(&secret)
                    .json(&json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
                let _ = r.bytes().await;
                (status, retry)
            });
        }
    }
    let mut answers = Vec::new();
    while let Some(r) = set.join_next().await {
        answers.push(r.unwrap());
    }
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(ok, 2, "two streams at once on the one key, cluster-wide: {answers:?}");
    for (s, retry) in answers.iter().filter(|(s, _)| *s != 200) {
        assert_eq!((*s, retry.as_deref()), (503, Some("1")), "{answers:?}");
    }
    // The slots are given back: the next requests are served again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for n in &nodes {
        let r = client
            .post(n.url("/v1/chat/completions"))
            .bearer_auth(&secret)
            .json(&chat())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

#[tokio::test]
async fn the_route_editing_api_is_off_in_cluster_mode_unless_asked_for() {
    let mock = MockUpstream::start().await;
    let dead = format!("redis://127.0.0.1:{}", common::free_port());
    let route = "routes:\n  - { name: extra, match: { path: /extra }, upstream: oai }\n";
    for (extra, want) in [("", 409), ("  route_api: true\n", 201)] {
        let gw =
            Gateway::start_with_admin(&node_config(&dead, &mock, "n", &["sk-1"], extra), &[("r.yaml", ROUTE)]).await;
        let r = reqwest::Client::new()
            .put(gw.admin_url("/api/routes/extra/yaml"))
            .bearer_auth(TOKEN)
            .body(route)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, want, "{extra:?}: {body}");
        if want == 409 {
            assert!(body["error"]["message"].as_str().unwrap().contains("SIGHUP"), "{body}");
            assert!(!gw.routes_dir().join("extra.yaml").exists());
        }
        // Reading routes is not affected.
        let r = reqwest::Client::new()
            .get(gw.admin_url("/api/routes"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

#[tokio::test]
async fn fail_closed_refuses_limited_requests_and_fail_open_admits_them_while_redis_is_down() {
    let mock = MockUpstream::start().await;
    // Nothing listens there: Redis is down from the start.
    let dead = format!("redis://127.0.0.1:{}", common::free_port());
    let routes = [("r.yaml", ROUTE)];
    let closed = Gateway::start_with_admin(
        &node_config(&dead, &mock, "closed", &["sk-1"], "  on_redis_down: fail_closed\n"),
        &routes,
    )
    .await;
    let (_, limited) = closed.create_key(&["--rpm", "1"]);
    let (_, unlimited) = closed.create_key(&[]);
    closed.wait_key(&unlimited, "/v1/chat/completions").await;
    let client = reqwest::Client::new();
    let url = closed.url("/v1/chat/completions");
    let r = client
        .post(&url)
        .bearer_auth(&limited)
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limiter_unavailable", "{body}");
    assert_eq!(
        post(&client, url.clone(), &unlimited).await.0,
        200,
        "a key without limits is not affected"
    );

    let open = Gateway::start_seeded(
        &node_config(&dead, &mock, "open", &["sk-1"], "  on_redis_down: fail_open\n"),
        &routes,
        &closed,
    )
    .await;
    for _ in 0..3 {
        assert_eq!(post(&client, open.url("/v1/chat/completions"), &limited).await.0, 200);
    }
}

/// The harness's fault proxy does what the cluster tests rely on: bytes
/// pass, are held by a partition and delivered on healing, answers can be
/// lost while the server still runs the command, and a cut drops and
/// refuses connections.
#[tokio::test]
async fn the_fault_proxy_holds_loses_and_cuts_traffic() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let redis = Redis::start().await;
    let proxy = common::FaultProxy::start(redis.port).await;
    assert_eq!(proxy.url_for(&redis.url()), format!("redis://127.0.0.1:{}", proxy.port));
    let mut conn = BufReader::new(tokio::net::TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap());
    let mut line = String::new();
    conn.get_mut().write_all(b"INCR n\r\n").await.unwrap();
    conn.read_line(&mut line).await.unwrap();
    assert_eq!(line.trim_end(), ":1");

    proxy.blackhole();
    conn.get_mut().write_all(b"INCR n\r\n").await.unwrap();
    line.clear();
    let held = tokio::time::timeout(Duration::from_millis(300), conn.read_line(&mut line)).await;
    assert!(held.is_err(), "a partition holds the bytes");
    assert_eq!(get(redis.port, "n").await, "1", "not run yet");
    proxy.pass();
    tokio::time::timeout(Duration::from_secs(5), conn.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line.trim_end(), ":2", "held bytes are delivered on healing");

    proxy.drop_replies();
    conn.get_mut().write_all(b"INCR n\r\n").await.unwrap();
    line.clear();
    let lost = tokio::time::timeout(Duration::from_millis(300), conn.read_line(&mut line)).await;
    assert!(lost.is_err(), "the answer is lost");
    assert!(proxy.dropped_replies() >= 1);
    let mut ran = String::new();
    for _ in 0..50 {
        ran = get(redis.port, "n").await;
        if ran == "3" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ran, "3", "the server ran the command");

    proxy.cut();
    let mut buf = [0u8; 1];
    let n = tokio::io::AsyncReadExt::read(conn.get_mut(), &mut buf)
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "a cut closes open connections");
    let mut fresh = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    let _ = fresh.write_all(b"PING\r\n").await;
    let n = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::io::AsyncReadExt::read(&mut fresh, &mut buf),
    )
    .await
    .unwrap()
    .unwrap_or(0);
    assert_eq!(n, 0, "and refuses new ones");
    proxy.pass();
    let mut again = BufReader::new(tokio::net::TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap());
    again.get_mut().write_all(b"PING\r\n").await.unwrap();
    line.clear();
    again.read_line(&mut line).await.unwrap();
    assert_eq!(line.trim_end(), "+PONG");
}

/// A string value read straight from redis-server (not through a proxy).
async fn get(port: u16, key: &str) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut conn = BufReader::new(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    conn.get_mut()
        .write_all(format!("GET {key}\r\n").as_bytes())
        .await
        .unwrap();
    let (mut len, mut value) = (String::new(), String::new());
    conn.read_line(&mut len).await.unwrap();
    if len.starts_with("$-1") {
        return String::new();
    }
    conn.read_line(&mut value).await.unwrap();
    value.trim_end().to_string()
}

/// A key's budget in money across three nodes: every answer costs 0.01
/// (10 tokens at 1,000 per million) and reserves about 0.06 before it is
/// settled, and the budget is 0.10 a day. Bursts on all three nodes at
/// once admit about ten in all, never past the budget by more than the
/// reservations in flight when it ran out (the three nodes' two each:
/// 0.06 each), and Redis's counter agrees with the audit logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_budget_in_money_holds_across_three_nodes() {
    let redis = Redis::start().await;
    let mock = MockUpstream::start().await;
    let routes = [("r.yaml", ROUTE)];
    let config = |node: &str| {
        pooled_node_config(&redis.url(), &mock, node, &["sk-1"], "", "")
            + "pricing:\n  builtin: false\n  models: [{ input: 1000, output: 1000 }]\n"
    };
    let a = Gateway::start_with_admin(&config("node-a"), &routes).await;
    let r = reqwest::Client::new()
        .post(a.admin_url("/api/keys"))
        .bearer_auth(TOKEN)
        .json(&json!({"name": "b", "budget": {"amount": 0.1, "period": "day"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let secret = r.json::<Value>().await.unwrap()["secret"].as_str().unwrap().to_string();
    let b = Gateway::start_seeded(&config("node-b"), &routes, &a).await;
    let c = Gateway::start_seeded(&config("node-c"), &routes, &a).await;
    let nodes = vec![a, b, c];
    for n in &nodes {
        wait_metric(n, "fastgate_cluster_redis_up 1").await;
        wait_metric(n, "fastgate_cluster_nodes 3").await;
        n.wait_key(&secret, "/v1/chat/completions").await;
    }
    // The key checks reached the provider and cost their share too.
    let mut admitted = mock.seen().len();
    for _ in 0..8 {
        let round = burst(&nodes, &secret, 2).await;
        for (s, retry) in round.iter().flatten() {
            assert!(*s == 200 || *s == 429, "status {s}");
            if *s == 429 {
                assert!((1..=86_400).contains(&retry.unwrap()), "{retry:?}");
            }
        }
        admitted += ok(&round);
        // Settlements reach Redis within a few ms (batched).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(mock.seen().len(), admitted, "only admitted requests reach the provider");
    let spent = admitted as f64 * 0.01;
    assert!(
        spent <= 0.1 + 6.0 * 0.063 + 1e-9,
        "{admitted} admitted: {spent} of 0.10"
    );
    // Redis's counter: the spend in micro-units, no reservation left.
    let start = fastgate::budget::BudgetPeriod::Day.bounds(fastgate::clock::now_ms()).0;
    let key_id = {
        let rows = nodes[0].audit_rows();
        rows.iter().find_map(|r| r.key_id.clone()).unwrap()
    };
    // (The harness reads one reply line: `INCRBY 0` answers `:<value>`.)
    let counter = redis
        .cmd(&["INCRBY", &format!("fg:{{fg}}:b:{key_id}:{start}"), "0"])
        .await
        .unwrap();
    assert_eq!(counter, format!(":{}", admitted * 10_000), "{counter}");
    let ttl: i64 = redis
        .cmd(&["PTTL", &format!("fg:{{fg}}:b:{key_id}:{start}")])
        .await
        .unwrap()
        .trim_start_matches(':')
        .parse()
        .unwrap();
    assert!(ttl > 0, "the counter goes after its period: {ttl}");
    assert!(
        admitted >= 10,
        "only {admitted} admitted: reservations were not settled"
    );
}
