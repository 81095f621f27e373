//! Cluster mode's system of record against a real PostgreSQL (Debian's
//! package, started by the test on a loopback port): three nodes, each with
//! its own SQLite copy, share users and gateway keys; Postgres going away
//! stops nothing on the data plane.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Gateway, MockUpstream, Postgres};
use serde_json::{Value, json};
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

const TOKEN: &str = "records-admin-token-0123456789abcdef";
const ROUTE: &str =
    "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, upstream: oai }\n";

fn node_config(pg: &Postgres, mock: &MockUpstream, node: &str) -> String {
    format!(
        "admin:\n  token: {TOKEN}\nsecrets:\n  master_key: the-same-on-every-node-0123456789abcdef\ncluster:\n  postgres: '{}'\n  node_id: {node}\nupstreams:\n  oai: {{provider: openai, endpoints: ['{}'], key_pool: p}}\nkey_pools:\n  p: {{keys: [sk-1]}}\n",
        pg.url(),
        mock.url()
    )
}

async fn create_key(gw: &Gateway, name: &str) -> (String, String) {
    let r = reqwest::Client::new()
        .post(gw.admin_url("/api/keys"))
        .bearer_auth(TOKEN)
        .json(&json!({"name": name}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    (v["id"].as_str().unwrap().into(), v["secret"].as_str().unwrap().into())
}

async fn status(client: &reqwest::Client, gw: &Gateway, secret: &str) -> u16 {
    status_with_id(client, gw, secret, &uuid::Uuid::now_v7().simple().to_string()).await
}

async fn status_with_id(client: &reqwest::Client, gw: &Gateway, secret: &str, request_id: &str) -> u16 {
    client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(secret)
        .header("x-request-id", request_id)
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// How long until `secret` gets `want` on `gw`; fails after `limit`.
async fn time_until(gw: &Gateway, secret: &str, want: u16, limit: Duration) -> Duration {
    let client = reqwest::Client::new();
    let start = Instant::now();
    loop {
        let got = status(&client, gw, secret).await;
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "still {got} (not {want}) on {} after {limit:?}:\n{}",
            gw.url(""),
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_made_or_revoked_on_one_node_work_or_stop_everywhere_and_postgres_can_go_away() {
    let mut pg = Postgres::start().await;
    let mock = MockUpstream::start().await;
    let routes = [("r.yaml", ROUTE)];
    // Three nodes with three databases of their own (each made its own
    // first admin): only Postgres connects them.
    let mut nodes = Vec::new();
    for name in ["node-a", "node-b", "node-c"] {
        nodes.push(Gateway::start_with_admin(&node_config(&pg, &mock, name), &routes).await);
    }

    let (id, secret) = create_key(&nodes[0], "made-on-a").await;
    for n in &nodes[1..] {
        time_until(n, &secret, 200, Duration::from_secs(10)).await;
    }

    // An upstream key added through C's admin API serves on A and B; removed
    // through A, it is gone from B and C.
    let added = fastgate::pool::key_id("sk-added");
    let admin = |gw: &Gateway, method: &str, path: &str| {
        reqwest::Client::new()
            .request(method.parse().unwrap(), gw.admin_url(path))
            .bearer_auth(TOKEN)
    };
    let r = admin(&nodes[2], "POST", "/api/pools/p/keys")
        .json(&json!({"keys": ["sk-added"]}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let has_key = |keys: &Value| keys.as_array().unwrap().iter().any(|k| k["id"] == added.as_str());
    for n in &nodes[..2] {
        let keys = common::eventually_text(|| admin(n, "GET", "/api/pools/p/keys"), |t| t.contains(&added)).await;
        assert!(has_key(&serde_json::from_str(&keys).unwrap()), "{keys}");
    }
    let r = admin(&nodes[0], "DELETE", &format!("/api/pools/p/keys/{added}"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    for n in &nodes[1..] {
        let keys = common::eventually_text(|| admin(n, "GET", "/api/pools/p/keys"), |t| !t.contains(&added)).await;
        assert!(!has_key(&serde_json::from_str(&keys).unwrap()), "{keys}");
    }

    // Revoked through A: refused on B and C within a second.
    let r = reqwest::Client::new()
        .delete(nodes[0].admin_url(&format!("/api/keys/{id}")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    for n in &nodes[1..] {
        let took = time_until(n, &secret, 401, Duration::from_secs(1)).await;
        eprintln!("revocation seen on {} after {took:?}", n.url(""));
    }

    // Postgres goes away under load: nothing on the data plane notices,
    // and a key made meanwhile works at once where it was made.
    let (_, steady) = create_key(&nodes[1], "steady").await;
    for n in &nodes {
        time_until(n, &steady, 200, Duration::from_secs(10)).await;
    }
    let nodes = Arc::new(nodes);
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for i in 0..nodes.len() {
        let (nodes, stop, steady) = (nodes.clone(), stop.clone(), steady.clone());
        load.spawn(async move {
            let client = reqwest::Client::new();
            let mut sent = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let id = format!("load-{i}-{}", sent.len());
                sent.push((status_with_id(&client, &nodes[i], &steady, &id).await, id));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sent
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    pg.kill();
    // The cluster's log is in Postgres: the admin API says it is unavailable.
    common::until_status(
        || {
            reqwest::Client::new()
                .get(nodes[0].admin_url("/api/logs"))
                .bearer_auth(TOKEN)
        },
        |s| s == 503,
    )
    .await;
    let (_, offline) = create_key(&nodes[2], "made-while-postgres-was-down").await;
    time_until(&nodes[2], &offline, 200, Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.restart().await;
    for n in &nodes[..2] {
        time_until(n, &offline, 200, Duration::from_secs(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut sent_ids = Vec::new();
    while let Some(r) = load.join_next().await {
        let sent = r.unwrap();
        assert!(sent.iter().all(|(s, _)| *s == 200), "{sent:?}");
        sent_ids.extend(sent.into_iter().map(|(_, id)| id));
    }
    assert!(sent_ids.len() > 30, "the load ran: {} requests", sent_ids.len());

    // Every node's audit rows reach Postgres once each, across the outage.
    let (pgc, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let local: usize = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n: usize = nodes.iter().map(|n| n.audit_rows().len()).sum();
            let shipped: i64 = pgc
                .query_one("SELECT count(*) FROM fastgate_audit", &[])
                .await
                .unwrap()
                .get(0);
            let ids: Vec<String> = pgc
                .query(
                    "SELECT request_id FROM fastgate_audit WHERE request_id LIKE 'load-%'",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            if (shipped as usize == n && sent_ids.iter().all(|id| ids.contains(id))) || Instant::now() > deadline {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let shipped: i64 = pgc
        .query_one("SELECT count(*) FROM fastgate_audit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shipped as usize, local, "every local audit row shipped once");
    let dup: i64 = pgc
        .query_one(
            "SELECT count(*) FROM (SELECT request_id FROM fastgate_audit GROUP BY request_id HAVING count(*) > 1) d",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dup, 0, "no audit row shipped twice");
    let load_rows: i64 = pgc
        .query_one(
            "SELECT count(*) FROM fastgate_audit WHERE request_id LIKE 'load-%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        load_rows as usize,
        sent_ids.len(),
        "one row per request sent under load"
    );
    let nodes_seen: i64 = pgc
        .query_one("SELECT count(DISTINCT node) FROM fastgate_audit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(nodes_seen, 3);
    let partition: String = pgc
        .query_one(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        partition.starts_with("fastgate_audit_20"),
        "daily partitions: {partition}"
    );

    // Any node's admin API shows the whole cluster's log and stats.
    let get = |gw: &Gateway, path: &str| {
        let url = gw.admin_url(path);
        async move {
            let r = reqwest::Client::new().get(url).bearer_auth(TOKEN).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    for n in nodes.iter() {
        let mut items: Vec<Value> = Vec::new();
        let mut path = "/api/logs?limit=1000".to_string();
        loop {
            let page = get(n, &path).await;
            items.extend(page["items"].as_array().unwrap().iter().cloned());
            match page["next_cursor"].as_i64() {
                Some(c) => path = format!("/api/logs?limit=1000&cursor={c}"),
                None => break,
            }
        }
        assert_eq!(items.len(), local, "{}", n.admin_url(""));
        for id in &sent_ids {
            assert!(items.iter().any(|i| i["request_id"] == id.as_str()), "{id} missing");
        }
        let one = get(n, &format!("/api/logs/{}", items[0]["id"])).await;
        assert_eq!(one["request_id"], items[0]["request_id"]);
        let summary = get(n, "/api/stats/summary?window=1h").await;
        assert_eq!(summary["requests"], local as i64, "{summary}");
        let top = get(n, "/api/stats/top?by=route").await;
        assert_eq!(top["items"][0]["value"], "chat", "{top}");
        assert_eq!(top["items"][0]["requests"], local as i64, "{top}");
        let series = get(n, "/api/stats/timeseries?bucket=minute&window=1h").await;
        let total: i64 = series["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["requests"].as_i64().unwrap())
            .sum();
        assert_eq!(total, local as i64, "{series}");
    }
    // ... and every node's admin actions in one list.
    let events = common::eventually_text(
        || {
            reqwest::Client::new()
                .get(nodes[0].admin_url("/api/audit?limit=1000"))
                .bearer_auth(TOKEN)
        },
        |t| t.matches("\"key.create\"").count() == 3,
    )
    .await;
    let events: Value = serde_json::from_str(&events).unwrap();
    let actions: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions.iter().filter(|a| **a == "key.create").count(), 3, "{actions:?}");
    assert!(
        actions.contains(&"key.delete") && actions.contains(&"pool.key.delete"),
        "{actions:?}"
    );

    let filtered = get(&nodes[1], "/api/logs?limit=5&status=200").await;
    assert_eq!(filtered["items"].as_array().unwrap().len(), 5);
    let next = filtered["next_cursor"].as_i64().expect("a next page");
    let page2 = get(&nodes[1], &format!("/api/logs?limit=5&status=200&cursor={next}")).await;
    assert!(page2["items"][0]["id"].as_i64().unwrap() < next);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_and_postgres_over_tls_with_a_private_ca() {
    let certs = tempfile::tempdir().unwrap();
    let ca = common::tls::Ca::new("cluster test CA");
    ca.leaf(certs.path(), "server", &["127.0.0.1"], 30);
    std::fs::write(certs.path().join("ca.pem"), ca.cert.pem()).unwrap();
    let cert_pem = std::fs::read_to_string(certs.path().join("server.pem")).unwrap();
    let key_pem = std::fs::read_to_string(certs.path().join("server.key")).unwrap();
    let redis = common::Redis::start_tls(&certs.path().join("server.pem"), &certs.path().join("server.key")).await;
    let pg = Postgres::start_tls(&cert_pem, &key_pem).await;
    let mock = MockUpstream::start().await;
    let config = format!(
        "admin:\n  token: {TOKEN}\ncluster:\n  redis: {}\n  postgres: 'postgres://postgres@127.0.0.1:{}/postgres?sslmode=require'\n  ca_file: {}\n  node_id: tls\nupstreams:\n  oai: {{provider: openai, endpoints: ['{}'], key_pool: p}}\nkey_pools:\n  p: {{keys: [sk-1]}}\n",
        redis.url(),
        pg.port,
        certs.path().join("ca.pem").display(),
        mock.url()
    );
    assert!(redis.url().starts_with("rediss://"));
    let gw = Gateway::start_with_admin(&config, &[("r.yaml", ROUTE)]).await;
    // Redis: the shared limiter is up.
    let metrics = common::eventually_text(
        || reqwest::Client::new().get(gw.admin_url("/metrics")),
        |t| t.contains("fastgate_cluster_redis_up 1"),
    )
    .await;
    assert!(metrics.contains("fastgate_cluster_redis_up 1"), "{}", gw.logs());
    // Postgres: the cluster's log answers (it is read there).
    let r = common::until_status(
        || reqwest::Client::new().get(gw.admin_url("/api/logs")).bearer_auth(TOKEN),
        |s| s == 200,
    )
    .await;
    assert_eq!(r.status(), 200, "{}", gw.logs());
    let (_, secret) = create_key(&gw, "over-tls").await;
    time_until(&gw, &secret, 200, Duration::from_secs(5)).await;
}
