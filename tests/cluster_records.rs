//! Cluster mode's system of record against a real PostgreSQL (Debian's
//! package, started by the test on a loopback port): three nodes, each with
//! its own SQLite copy, share users and gateway keys; Postgres going away
//! stops nothing on the data plane.
#![allow(clippy::unwrap_used)]

mod common;

use common::{FaultProxy, Gateway, MockUpstream, Postgres};
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
    node_config_url(&pg.url(), mock, node)
}

fn node_config_url(pg_url: &str, mock: &MockUpstream, node: &str) -> String {
    format!(
        "admin:\n  token: {TOKEN}\nsecrets:\n  master_key: the-same-on-every-node-0123456789abcdef\ncluster:\n  postgres: '{}'\n  node_id: {node}\nupstreams:\n  oai: {{provider: openai, endpoints: ['{}'], key_pool: p}}\nkey_pools:\n  p: {{keys: [sk-1]}}\n",
        pg_url,
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
    // The outbox is measured while Postgres is away (it read 0 until the
    // next shipment), so the gauge says how far behind a node is.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = nodes[0].metrics().await;
        let unshipped = metrics
            .lines()
            .find_map(|l| l.strip_prefix("fastgate_audit_unshipped "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if unshipped > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fastgate_audit_unshipped stayed 0 while Postgres was down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
        // Captured headers are read from the node's segments when shipped,
        // and where they were is not.
        assert!(
            one["request_headers"]
                .as_str()
                .is_some_and(|h| h.contains("content-type")),
            "{one}"
        );
        assert!(
            one.get("captured_in").is_none() && one.get("captured_at").is_none(),
            "{one}"
        );
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

fn admin(gw: &Gateway, method: &str, path: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .request(method.parse().unwrap(), gw.admin_url(path))
        .bearer_auth(TOKEN)
}

/// Wait until `gw` no longer reaches Postgres (its log answers 503).
async fn until_postgres_is_away(gw: &Gateway) {
    let r = common::until_status(|| admin(gw, "GET", "/api/logs"), |s| s == 503).await;
    assert_eq!(r.status(), 503, "{}", gw.logs());
}

/// Wait until `gw` reaches Postgres again (its log answers 200).
async fn until_postgres_is_back(gw: &Gateway) {
    let r = common::until_status(|| admin(gw, "GET", "/api/logs"), |s| s == 200).await;
    assert_eq!(r.status(), 200, "{}", gw.logs());
}

/// `secret` gets `want` on every node of `nodes`, every 100 ms for `period`.
async fn stays(nodes: &[&Gateway], secret: &str, want: u16, period: Duration) {
    let client = reqwest::Client::new();
    let start = Instant::now();
    while start.elapsed() < period {
        for n in nodes {
            let got = status(&client, n, secret).await;
            assert_eq!(got, want, "{} after {:?}:\n{}", n.url(""), start.elapsed(), n.logs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn pg_client(pg: &Postgres) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_revoked_while_postgres_is_away_stays_revoked_everywhere() {
    let pg = Postgres::start().await;
    let mock = MockUpstream::start().await;
    let routes = [("r.yaml", ROUTE)];
    // Each node reaches Postgres through a proxy that can cut it off
    // (Postgres "stopped" for both, its data kept).
    let (pa, pb) = (FaultProxy::start(pg.port).await, FaultProxy::start(pg.port).await);
    let a = Gateway::start_with_admin(&node_config_url(&pa.url_for(&pg.url()), &mock, "node-a"), &routes).await;
    let b = Gateway::start_with_admin(&node_config_url(&pb.url_for(&pg.url()), &mock, "node-b"), &routes).await;
    let (id, secret) = create_key(&b, "made-on-b").await;
    time_until(&a, &secret, 200, Duration::from_secs(10)).await;
    time_until(&b, &secret, 200, Duration::from_secs(1)).await;

    pa.cut();
    pb.cut();
    until_postgres_is_away(&a).await;
    until_postgres_is_away(&b).await;
    let r = admin(&a, "DELETE", &format!("/api/keys/{id}")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    time_until(&a, &secret, 401, Duration::from_secs(2)).await;
    time_until(&b, &secret, 200, Duration::from_secs(1)).await;

    pa.pass();
    pb.pass();
    until_postgres_is_back(&a).await;
    // A's deletion is a change made while Postgres was away: it is sent,
    // not overwritten by the record's older copy, and it reaches B.
    time_until(&b, &secret, 401, Duration::from_secs(10)).await;
    stays(&[&a, &b], &secret, 401, Duration::from_secs(20)).await;

    // A node that joins later takes the deletion too.
    let c = Gateway::start_with_admin(&node_config(&pg, &mock, "node-c"), &routes).await;
    let (_, later) = create_key(&a, "made-after").await;
    time_until(&c, &later, 200, Duration::from_secs(10)).await;
    stays(&[&a, &b, &c], &secret, 401, Duration::from_secs(2)).await;
    let pgc = pg_client(&pg).await;
    let row: Option<Value> = pgc
        .query_one(
            "SELECT row FROM fastgate_records WHERE tbl = 'gateway_keys' AND id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(row.is_none(), "the record holds the deletion: {row:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delete_or_a_disable_wins_over_a_concurrent_edit() {
    let pg = Postgres::start().await;
    let mock = MockUpstream::start().await;
    let routes = [("r.yaml", ROUTE)];
    let (pa, pb) = (FaultProxy::start(pg.port).await, FaultProxy::start(pg.port).await);
    let a = Gateway::start_with_admin(&node_config_url(&pa.url_for(&pg.url()), &mock, "node-a"), &routes).await;
    let b = Gateway::start_with_admin(&node_config_url(&pb.url_for(&pg.url()), &mock, "node-b"), &routes).await;
    let (deleted, deleted_secret) = create_key(&a, "deleted-on-a").await;
    let (disabled, disabled_secret) = create_key(&a, "disabled-on-a").await;
    time_until(&b, &deleted_secret, 200, Duration::from_secs(10)).await;
    time_until(&b, &disabled_secret, 200, Duration::from_secs(10)).await;

    // A partition: A deletes one key and disables the other, B edits both
    // (B's edit of the second one even says `enabled: true`).
    pa.cut();
    pb.cut();
    until_postgres_is_away(&a).await;
    until_postgres_is_away(&b).await;
    let r = admin(&a, "DELETE", &format!("/api/keys/{deleted}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = admin(&a, "PATCH", &format!("/api/keys/{disabled}"))
        .json(&json!({"enabled": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    for (id, name) in [(&deleted, "renamed-on-b"), (&disabled, "renamed-too")] {
        let r = admin(&b, "PATCH", &format!("/api/keys/{id}"))
            .json(&json!({"name": name, "enabled": true, "rpm": 1000}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    pa.pass();
    pb.pass();
    until_postgres_is_back(&a).await;
    until_postgres_is_back(&b).await;
    time_until(&b, &deleted_secret, 401, Duration::from_secs(10)).await;
    time_until(&b, &disabled_secret, 401, Duration::from_secs(10)).await;
    stays(&[&a, &b], &deleted_secret, 401, Duration::from_secs(5)).await;
    stays(&[&a, &b], &disabled_secret, 401, Duration::from_secs(1)).await;

    let pgc = pg_client(&pg).await;
    let row = |id: String| {
        let pgc = &pgc;
        async move {
            let row: Option<Value> = pgc
                .query_one(
                    "SELECT row FROM fastgate_records WHERE tbl = 'gateway_keys' AND id = $1",
                    &[&id],
                )
                .await
                .unwrap()
                .get(0);
            row
        }
    };
    assert!(row(deleted.clone()).await.is_none(), "deleted in the record");
    let kept = row(disabled.clone()).await.unwrap();
    assert_eq!(kept["enabled"], 0, "disabled in the record: {kept}");
    // Both nodes hold the same row for the disabled key.
    for n in [&a, &b] {
        let v: Value = common::eventually_text(
            || admin(n, "GET", &format!("/api/keys/{disabled}")),
            |t| t.contains("\"enabled\":false"),
        )
        .await
        .parse::<Value>()
        .unwrap();
        assert_eq!(v["enabled"], false, "{v}");
        let r = admin(n, "GET", &format!("/api/keys/{deleted}")).send().await.unwrap();
        assert_eq!(r.status(), 404);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revision_that_commits_late_is_still_read() {
    let pg = Postgres::start().await;
    let mock = MockUpstream::start().await;
    let routes = [("r.yaml", ROUTE)];
    let a = Gateway::start_with_admin(&node_config(&pg, &mock, "node-a"), &routes).await;
    let b = Gateway::start_with_admin(&node_config(&pg, &mock, "node-b"), &routes).await;
    let (first, first_secret) = create_key(&a, "revoked-late").await;
    time_until(&b, &first_secret, 200, Duration::from_secs(10)).await;

    // Another writer takes a revision for a change (this key revoked) and
    // holds it uncommitted while a later change is made.
    let mut writer = pg_client(&pg).await;
    let pgc = pg_client(&pg).await;
    let mut row: Value = pgc
        .query_one(
            "SELECT row FROM fastgate_records WHERE tbl = 'gateway_keys' AND id = $1",
            &[&first],
        )
        .await
        .unwrap()
        .get(0);
    row["enabled"] = 0.into();
    row["revoked_at"] = 1.into();
    let tx = writer.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO fastgate_records (tbl, id, row, revision, updated_by)
         VALUES ('gateway_keys', $1, $2, nextval('fastgate_revision'), 'another-writer')
         ON CONFLICT (tbl, id) DO UPDATE SET row = EXCLUDED.row, revision = EXCLUDED.revision,
           updated_by = EXCLUDED.updated_by",
        &[&first, &row],
    )
    .await
    .unwrap();
    let (_, second_secret) = create_key(&a, "made-meanwhile").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    tx.commit().await.unwrap();

    // B applies both, on the session it has (no reconnect).
    time_until(&b, &second_secret, 200, Duration::from_secs(10)).await;
    time_until(&b, &first_secret, 401, Duration::from_secs(10)).await;
    assert_eq!(
        b.logs().matches("Connected to Postgres").count(),
        1,
        "one session: {}",
        b.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_postgres_refuses_is_quarantined_and_nul_rows_flow_as_u2400() {
    let pg = Postgres::start().await;
    let mock = MockUpstream::start().await;
    let routes = [("r.yaml", ROUTE)];
    let a = Gateway::start_with_admin(&node_config(&pg, &mock, "node-a"), &routes).await;
    let b = Gateway::start_with_admin(&node_config(&pg, &mock, "node-b"), &routes).await;
    let (_, first) = create_key(&a, "first").await;
    time_until(&b, &first, 200, Duration::from_secs(10)).await;

    // The admin API refuses control characters in names (400, its shape).
    let r = admin(&a, "POST", "/api/keys")
        .json(&json!({"name": "bad\u{0}name"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let err: Value = r.json().await.unwrap();
    assert!(err["error"].to_string().contains("name"), "{err}");

    // Rows written straight into A's SQLite (an older version, a restored
    // backup): a key whose name holds a NUL (jsonb refuses NUL: it is sent
    // as U+2400), a NUL in an audit body (the same), and an audit row whose
    // status is not a number (refused: quarantined).
    {
        let db = rusqlite::Connection::open(a.db_path()).unwrap();
        db.busy_timeout(Duration::from_secs(5)).unwrap();
        db.execute(
            "INSERT INTO gateway_keys (id, name, owner, secret_sha256, masked, created_at)
             VALUES ('poison', 'bad' || char(0) || 'name', '', randomblob(32), 'fg-…', 1)",
            [],
        )
        .unwrap();
        db.execute(
            "INSERT INTO audit_log (request_id, ts_ms, method, path, status, stream, duration_ms,
                request_bytes, response_bytes, chunks, retries, request_body)
             VALUES ('poison-audit', ?1, 'POST', '/v1/chat/completions', 'abc', 0, 1.0, 0, 0, 0, 0, NULL),
                    ('nul-body', ?1, 'POST', '/v1/chat/completions', 200, 0, 1.0, 0, 0, 0, 0,
                     'a' || char(0) || 'b {\"x\":\"\\u0000\"}')",
            [std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64],
        )
        .unwrap();
    }
    // The rest keeps flowing: keys made after it reach B, audit rows ship.
    let (_, second) = create_key(&a, "second").await;
    time_until(&b, &second, 200, Duration::from_secs(10)).await;
    let client = reqwest::Client::new();
    for i in 0..5 {
        assert_eq!(status_with_id(&client, &a, &second, &format!("after-{i}")).await, 200);
    }
    let pgc = pg_client(&pg).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let shipped = loop {
        let n: i64 = pgc
            .query_one(
                "SELECT count(*) FROM fastgate_audit WHERE request_id LIKE 'after-%' OR request_id = 'nul-body'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n == 6 || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(shipped, 6, "audit rows after the refused one ship:\n{}", a.logs());
    let poison: i64 = pgc
        .query_one(
            "SELECT count(*) FROM fastgate_audit WHERE request_id = 'poison-audit'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(poison, 0);

    // Listed (admin only) and counted.
    let list = common::eventually_text(
        || admin(&a, "GET", "/api/cluster/quarantine"),
        |t| t.contains("poison-audit") || t.contains("\"audit\""),
    )
    .await;
    let list: Value = serde_json::from_str(&list).unwrap();
    let items = list["items"].as_array().unwrap();
    assert!(
        items.iter().any(|i| i["kind"] == "audit" && i["table"] == "audit_log"),
        "{list}"
    );
    assert!(!items.iter().any(|i| i["kind"] == "record"), "{list}");
    // Postgres's own reason, not the driver's "db error".
    assert!(
        items.iter().all(|i| i["error"]
            .as_str()
            .is_some_and(|e| e.contains("(22") && !e.contains("db error"))),
        "{list}"
    );
    let metrics = a.metrics().await;
    assert!(
        metrics.contains("fastgate_cluster_quarantined_total{kind=\"audit\"} 1"),
        "{metrics}"
    );
    // A user's session is no admin: the list is refused.
    let r = reqwest::Client::new()
        .get(a.admin_url("/api/cluster/quarantine"))
        .bearer_auth(&first)
        .send()
        .await
        .unwrap();
    assert!(r.status() == 401 || r.status() == 403, "{}", r.status());
    // Once dealt with, an admin removes the entry (recorded); it is gone,
    // and a second removal is a 404.
    let id = items[0]["id"].as_i64().unwrap();
    let path = format!("/api/cluster/quarantine/{id}");
    let r = reqwest::Client::new()
        .delete(a.admin_url(&path))
        .bearer_auth(&first)
        .send()
        .await
        .unwrap();
    assert!(r.status() == 401 || r.status() == 403, "{}", r.status());
    assert_eq!(admin(&a, "DELETE", &path).send().await.unwrap().status(), 204);
    let after: Value = admin(&a, "GET", "/api/cluster/quarantine")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        !after["items"].as_array().unwrap().iter().any(|i| i["id"] == id),
        "{after}"
    );
    assert_eq!(admin(&a, "DELETE", &path).send().await.unwrap().status(), 404);
    // (The admin audit is read from Postgres: once shipped.)
    let events = common::eventually_text(|| admin(&a, "GET", "/api/audit"), |t| t.contains("quarantine.delete")).await;
    assert!(events.contains("quarantine.delete"), "{events}");
    // The key with a NUL reached the record, the NUL as U+2400.
    let name: String = pgc
        .query_one("SELECT row->>'name' FROM fastgate_records WHERE id = 'poison'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "bad\u{2400}name");

    // A disable made on a key whose old name holds a NUL reaches B (it
    // was quarantined on every change, and B served the key on and on).
    let (third_id, third) = create_key(&a, "third").await;
    time_until(&b, &third, 200, Duration::from_secs(10)).await;
    {
        let db = rusqlite::Connection::open(a.db_path()).unwrap();
        db.busy_timeout(Duration::from_secs(5)).unwrap();
        db.execute(
            "UPDATE gateway_keys SET name = 'q' || char(0) || 'dis' WHERE id = ?1",
            [&third_id],
        )
        .unwrap();
    }
    let r = admin(&a, "PATCH", &format!("/api/keys/{third_id}"))
        .json(&json!({"enabled": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    time_until(&b, &third, 401, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_log_reader_is_replaced_when_it_dies_and_filters_paths_like_sqlite() {
    let pg = Postgres::start().await;
    let mock = MockUpstream::start().await;
    let routes = [("r.yaml", ROUTE)];
    let a = Gateway::start_with_admin(&node_config(&pg, &mock, "node-a"), &routes).await;
    let (_, secret) = create_key(&a, "reader").await;
    time_until(&a, &secret, 200, Duration::from_secs(5)).await;
    until_postgres_is_back(&a).await;
    let shipped = common::eventually_text(
        || admin(&a, "GET", "/api/logs?path=/v1/chat"),
        |t| t.contains("/v1/chat/completions"),
    )
    .await;
    assert!(shipped.contains("/v1/chat/completions"), "{shipped}");
    // One rule on both stores: a case-sensitive prefix.
    let upper: Value = admin(&a, "GET", "/api/logs?path=/V1/CHAT")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(upper["items"].as_array().map(Vec::len), Some(0), "{upper}");

    // The reader's backend dies (an idle timeout, a failover): the admin
    // API gets a working reader back within a resync, without a new session.
    let pgc = pg_client(&pg).await;
    let killed: i64 = pgc
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE (application_name = 'fastgate-log-reader' OR query LIKE 'SELECT seq, row FROM fastgate_audit%')
               AND pid <> pg_backend_pid()) k",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    let start = Instant::now();
    loop {
        let s = admin(&a, "GET", "/api/logs").send().await.unwrap().status();
        if s == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "still {s}:\n{}", a.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(a.logs().matches("Connected to Postgres").count(), 1, "{}", a.logs());
}
