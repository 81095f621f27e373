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

const TOKEN: &str = "records-admin-token";
const ROUTE: &str =
    "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, upstream: oai }\n";

fn node_config(pg: &Postgres, mock: &MockUpstream, node: &str) -> String {
    format!(
        "admin:\n  token: {TOKEN}\ncluster:\n  postgres: '{}'\n  node_id: {node}\nupstreams:\n  oai: {{provider: openai, endpoints: ['{}'], key_pool: p}}\nkey_pools:\n  p: {{keys: [sk-1]}}\n",
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
    client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(secret)
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
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                statuses.push(status(&client, &nodes[i], &steady).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    pg.kill();
    let (_, offline) = create_key(&nodes[2], "made-while-postgres-was-down").await;
    time_until(&nodes[2], &offline, 200, Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.restart().await;
    for n in &nodes[..2] {
        time_until(n, &offline, 200, Duration::from_secs(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    while let Some(r) = load.join_next().await {
        let statuses = r.unwrap();
        sent += statuses.len();
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    }
    assert!(sent > 30, "the load ran: {sent} requests");
}
