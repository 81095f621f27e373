//! A fault-injection checker for cluster mode, in the spirit of Jepsen: one
//! real redis-server, one real PostgreSQL, three gateway nodes each reaching
//! both through its own [`FaultProxy`] (so one node can be cut off alone),
//! concurrent clients with random and repeated `X-Request-Id`s, an admin
//! creating, editing and revoking keys on random nodes, and a seeded fault
//! schedule (delays, partitions, cuts, lost replies, Postgres killed and
//! restarted). Every request and admin change is recorded; after the faults
//! are healed the history is checked against what docs/cluster.md promises.
//!
//! Seeds: `FASTGATE_CHECKER_SEED=N` runs that one seed; otherwise
//! `FASTGATE_CHECKER_RUNS` seeds (default 2) from a fixed list, stopping at
//! the first that fails. 20 in a row:
//! `FASTGATE_CHECKER_RUNS=20 cargo nextest run --test cluster_checker`.
#![allow(clippy::unwrap_used)]

mod common;

use common::{FaultProxy, Gateway, MockUpstream, Postgres, Redis, wait_metric};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

const TOKEN: &str = "checker-admin-token-0123456789abcdef";
const ROUTE: &str =
    "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, upstream: oai, retries: 2 }\n";
const NODES: usize = 3;
const NODE_NAMES: [&str; NODES] = ["node-a", "node-b", "node-c"];
/// `cluster.rate_window`: "per minute" means per this window.
const WINDOW: Duration = Duration::from_secs(2);
/// `cluster.timeout`: a Redis call slower than this opens the breaker.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);
/// The pool's `max_in_flight_per_key` (two upstream keys).
const CAP: usize = 2;
/// How long the clients run: calm for the first [`CALM`], then faults, all
/// healed 2.5 s before the end.
const RUN: Duration = Duration::from_secs(18);
/// No Redis fault before this: windows there must be exact.
const CALM: Duration = Duration::from_millis(4500);
const CLIENTS: usize = 12;
/// Keys of the "requests" class: `rpm` binds.
const RPM_CLASS: (Option<u64>, Option<u64>) = (Some(8), None);
/// Keys of the "tokens" class: `tpm` binds (each answer uses 10 tokens,
/// each request reserves about 65).
const TPM_CLASS: (Option<u64>, Option<u64>) = (Some(40), Some(150));
/// A daily token quota on every key, never reached: its Redis counter is
/// what the no-double-charge check reads.
const QUOTA: u64 = 10_000_000;
/// How long after a Redis fault heals a node may still decide locally (the
/// breaker's probe runs every 250 ms); longer tails show in the metrics.
const HEAL_SLACK: Duration = Duration::from_millis(1000);
/// How late a revocation may be seen on a node once Postgres is back.
const REVOCATION_BOUND: Duration = Duration::from_secs(10);
/// Admission times are known only between send and answer; windows are
/// checked this much shorter than the rate window (clock jitter).
const WINDOW_MARGIN: Duration = Duration::from_millis(30);
/// The most tokens a request whose answer the client never saw may have
/// been charged (its reservation: prompt estimate plus `max_tokens`).
const UNKNOWN_TOKENS: u64 = 100;

/// A request body with a raw NUL byte (see [`send`]).
const RAW_NUL: &str = "raw-nul";

/// One request as the client saw it.
#[derive(Debug, Clone)]
struct Rec {
    node: usize,
    key: usize,
    request_id: String,
    sent: Duration,
    done: Duration,
    /// 0: no answer (connection error or client timeout).
    status: u16,
    /// `usage.total_tokens` of a 200.
    tokens: Option<u64>,
}

#[derive(Debug, Clone)]
struct KeyInfo {
    id: String,
    secret: String,
    rpm: Option<u64>,
    tpm: Option<u64>,
    /// Made with a NUL in its name (a row Postgres refuses).
    nul: bool,
    /// An admin's delete or disable answered 2xx: (when, node, what).
    revoked: Option<(Duration, usize, &'static str)>,
}

#[derive(Debug, Clone)]
struct AdminRec {
    what: &'static str,
    key: Option<usize>,
    node: usize,
    at: Duration,
    done: Duration,
    status: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Redis(usize),
    Pg(usize),
    PgServer,
}

#[derive(Debug, Clone)]
struct FaultRec {
    target: Target,
    kind: &'static str,
    start: Duration,
    end: Duration,
}

/// Everything the run records.
#[derive(Default)]
struct History {
    recs: Vec<Rec>,
    keys: Vec<KeyInfo>,
    admin: Vec<AdminRec>,
    faults: Vec<FaultRec>,
    /// Spans in which a node's `fastgate_cluster_local_decisions_total` rose.
    local: Vec<(usize, Duration, Duration)>,
    /// Upstream requests as the mock saw them: (upstream key, start, end).
    upstream: Vec<(String, Duration, Duration)>,
}

type Shared = Arc<Mutex<History>>;

fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("FASTGATE_CHECKER_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![seed];
    }
    let runs: u64 = std::env::var("FASTGATE_CHECKER_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    (0..runs).map(|i| 0x5eed_0000 + i * 7919).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cluster_keeps_its_promises_under_seeded_faults() {
    // `FASTGATE_CHECKER_KEEP_GOING=1`: run every seed, then report them all.
    let keep_going = std::env::var_os("FASTGATE_CHECKER_KEEP_GOING").is_some();
    let mut failed = Vec::new();
    for seed in seeds() {
        eprintln!("checker: seed {seed}");
        let failures = run(seed).await;
        if failures.is_empty() {
            eprintln!("checker: seed {seed} passed");
            continue;
        }
        let report = format!(
            "checker seed {seed} (rerun with FASTGATE_CHECKER_SEED={seed}): {} check(s) failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
        assert!(keep_going, "{report}");
        eprintln!("{report}");
        failed.push(seed);
    }
    assert!(failed.is_empty(), "checker: seeds that failed: {failed:?}");
}

fn node_config(redis: &str, pg: &str, mock: &MockUpstream, node: usize) -> String {
    format!(
        "admin:\n  token: {TOKEN}\nsecrets:\n  master_key: the-same-on-every-node-0123456789abcdef\ncluster:\n  redis: {redis}\n  postgres: '{pg}'\n  node_id: {}\n  rate_window: {}s\n  timeout: {}ms\n  nodes: {NODES}\naudit:\n  capture_body: true\n  refused: all\nupstreams:\n  oai: {{provider: openai, endpoints: ['{}'], key_pool: p}}\nkey_pools:\n  p: {{keys: [sk-1, sk-2], strategy: round_robin, max_in_flight_per_key: {CAP}}}\n",
        NODE_NAMES[node],
        WINDOW.as_secs(),
        REDIS_TIMEOUT.as_millis(),
        mock.url()
    )
}

fn admin(gw: &Gateway, method: &str, path: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .request(method.parse().unwrap(), gw.admin_url(path))
        .bearer_auth(TOKEN)
        .timeout(Duration::from_secs(10))
}

/// Create a key through `gw`'s admin API: (status, id, secret).
async fn create_key(gw: &Gateway, name: &str, class: (Option<u64>, Option<u64>)) -> (u16, Option<(String, String)>) {
    let body = json!({"name": name, "rpm": class.0, "tpm": class.1, "token_quota": QUOTA, "quota_period": "day"});
    let Ok(r) = admin(gw, "POST", "/api/keys").json(&body).send().await else {
        return (0, None);
    };
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    match (v["id"].as_str(), v["secret"].as_str()) {
        (Some(id), Some(secret)) if status == 201 => (status, Some((id.into(), secret.into()))),
        _ => (status, None),
    }
}

async fn run(seed: u64) -> Vec<String> {
    let redis = Redis::start().await;
    let pg = Postgres::start().await;
    let mock = MockUpstream::start().await;
    let mut redis_proxies = Vec::new();
    let mut pg_proxies = Vec::new();
    for _ in 0..NODES {
        redis_proxies.push(FaultProxy::start(redis.port).await);
        pg_proxies.push(FaultProxy::start(pg.port).await);
    }
    let routes = [("r.yaml", ROUTE)];
    let mut nodes = Vec::new();
    for i in 0..NODES {
        let config = node_config(
            &redis_proxies[i].url_for(&redis.url()),
            &pg_proxies[i].url_for(&pg.url()),
            &mock,
            i,
        );
        nodes.push(Gateway::start_with_admin(&config, &routes).await);
    }
    let nodes = Arc::new(nodes);
    for n in nodes.iter() {
        wait_metric(n, "fastgate_cluster_redis_up 1").await;
    }

    let t0 = Instant::now();
    let history: Shared = Arc::default();
    // The upstream: each answer takes 10-120 ms (so requests overlap and
    // the in-flight cap matters) and uses 10 tokens.
    {
        let history = history.clone();
        common::script(&mock, move |key, n| {
            let history = history.clone();
            async move {
                let start = t0.elapsed();
                tokio::time::sleep(Duration::from_millis((n as u64 * 7919) % 110 + 10)).await;
                history
                    .lock()
                    .unwrap()
                    .upstream
                    .push((key.unwrap_or_default(), start, t0.elapsed()));
                None
            }
        });
    }

    // Four keys to begin with, made on node A, known to every node.
    for i in 0..4 {
        let class = if i % 2 == 0 { RPM_CLASS } else { TPM_CLASS };
        let (status, made) = create_key(&nodes[0], &format!("start-{i}"), class).await;
        let (id, secret) = made.unwrap_or_else(|| panic!("seed {seed}: creating a key answered {status}"));
        history.lock().unwrap().keys.push(KeyInfo {
            id,
            secret,
            rpm: class.0,
            tpm: class.1,
            nul: false,
            revoked: None,
        });
    }
    let ids: Vec<String> = history.lock().unwrap().keys.iter().map(|k| k.id.clone()).collect();
    for n in nodes.iter() {
        for id in &ids {
            let r = common::until_status(|| admin(n, "GET", &format!("/api/keys/{id}")), |s| s == 200).await;
            assert_eq!(
                r.status(),
                200,
                "seed {seed}: key {id} never reached {}",
                n.admin_url("")
            );
        }
    }

    let redis_proxies = Arc::new(redis_proxies);
    let pg_proxies = Arc::new(pg_proxies);
    let pg = Arc::new(tokio::sync::Mutex::new(pg));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        tasks.spawn(client(seed, c, nodes.clone(), history.clone(), t0));
    }
    tasks.spawn(admin_task(seed, nodes.clone(), history.clone(), t0));
    tasks.spawn(redis_nemesis(seed, redis_proxies.clone(), history.clone(), t0));
    tasks.spawn(pg_nemesis(seed, pg_proxies.clone(), pg.clone(), history.clone(), t0));
    tasks.spawn(monitor(nodes.clone(), history.clone(), t0));
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let healed = {
        let h = history.lock().unwrap();
        h.faults.iter().map(|f| f.end).max().unwrap_or_default()
    };
    {
        let h = history.lock().unwrap();
        eprintln!(
            "checker: seed {seed}: {} requests ({} admitted), {} admin changes, {} keys, faults:\n{}",
            h.recs.len(),
            h.recs.iter().filter(|r| r.status == 200).count(),
            h.admin.len(),
            h.keys.len(),
            h.faults
                .iter()
                .map(|f| format!("  {:?} {} {:.2?}..{:.2?}", f.target, f.kind, f.start, f.end))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    let mut failures = Vec::new();
    let mut report = |name: &str, found: Vec<String>| {
        eprintln!(
            "checker: seed {seed}: {name}: {}",
            if found.is_empty() { "ok" } else { "FAILED" }
        );
        failures.extend(found);
    };
    report("1 admitted <= limit", check_windows(&history.lock().unwrap()));
    report("6 in-flight cap", check_in_flight(&history.lock().unwrap()));
    report("4 revocations", check_revocations(&nodes, &history, t0, healed).await);
    report("3 no leaked slot", check_leases(&redis).await);
    report("2 no double charge", check_quota_counters(&redis, &history).await);
    let pg = pg.lock().await;
    report("5 audit rows", check_audit(&pg, &nodes, &history).await);
    if !failures.is_empty() {
        let h = history.lock().unwrap();
        eprintln!("checker: seed {seed}: admin changes:");
        for a in &h.admin {
            let key = a.key.map(|k| format!("key {k} ({})", h.keys[k].id)).unwrap_or_default();
            eprintln!(
                "  {:.2?}..{:.2?} {} {key} through {}: {}",
                a.at, a.done, a.what, NODE_NAMES[a.node], a.status
            );
        }
        for (i, n) in nodes.iter().enumerate() {
            let logs = n.logs();
            let warnings: Vec<&str> = logs
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .take(15)
                .collect();
            eprintln!(
                "checker: {} warnings and errors:\n{}",
                NODE_NAMES[i],
                warnings.join("\n")
            );
        }
    }
    failures
}

/// A client: requests to random nodes with random keys (mostly live ones),
/// a third of them with an `X-Request-Id` other requests use too.
async fn client(seed: u64, c: usize, nodes: Arc<Vec<Gateway>>, history: Shared, t0: Instant) {
    let mut rng = StdRng::seed_from_u64(seed ^ (c as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    while t0.elapsed() < RUN {
        let node = rng.random_range(0..NODES);
        let key = {
            let h = history.lock().unwrap();
            let live: Vec<usize> = (0..h.keys.len()).filter(|&k| h.keys[k].revoked.is_none()).collect();
            if rng.random_bool(0.85) && !live.is_empty() {
                live[rng.random_range(0..live.len())]
            } else {
                rng.random_range(0..h.keys.len())
            }
        };
        let request_id = if rng.random_bool(0.4) {
            format!("dup-{}", rng.random_range(0..3))
        } else {
            uuid::Uuid::now_v7().simple().to_string()
        };
        // A few bodies carry a NUL: escaped in JSON, or a raw byte (not
        // JSON: refused with 400, audited all the same).
        let content = match rng.random_range(0..100) {
            0..3 => "hi\u{0}there",
            3..5 => RAW_NUL,
            _ => "hi",
        };
        send(&http, &nodes, node, key, &request_id, content, &history, t0).await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(10..60))).await;
    }
}

/// One recorded request.
#[allow(clippy::too_many_arguments)]
async fn send(
    http: &reqwest::Client,
    nodes: &[Gateway],
    node: usize,
    key: usize,
    request_id: &str,
    content: &str,
    history: &Shared,
    t0: Instant,
) -> u16 {
    let secret = history.lock().unwrap().keys[key].secret.clone();
    let body = match content {
        RAW_NUL => b"{\"model\": \"gpt-4o\", \"messages\": [{\"role\": \"user\", \"content\": \"a\x00b\"}]}".to_vec(),
        _ => serde_json::to_vec(
            &json!({"model": "gpt-4o", "max_tokens": 40, "messages": [{"role": "user", "content": content}]}),
        )
        .unwrap(),
    };
    let sent = t0.elapsed();
    let answer = http
        .post(nodes[node].url("/v1/chat/completions"))
        .bearer_auth(&secret)
        .header("x-request-id", request_id)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    let (status, tokens) = match answer {
        Ok(r) => {
            let status = r.status().as_u16();
            match r.json::<Value>().await {
                Ok(v) => (status, v["usage"]["total_tokens"].as_u64()),
                Err(_) if status == 200 => (0, None),
                Err(_) => (status, None),
            }
        }
        Err(_) => (0, None),
    };
    history.lock().unwrap().recs.push(Rec {
        node,
        key,
        request_id: request_id.to_string(),
        sent,
        done: t0.elapsed(),
        status,
        tokens: tokens.filter(|_| status == 200),
    });
    status
}

/// The admin: creates keys, renames them, deletes or disables them, on
/// random nodes, whatever the faults.
async fn admin_task(seed: u64, nodes: Arc<Vec<Gateway>>, history: Shared, t0: Instant) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xad31_0000);
    let mut made = 0;
    let mut made_nul = false;
    while t0.elapsed() < RUN - Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(400..1000))).await;
        let node = rng.random_range(0..NODES);
        let at = t0.elapsed();
        let (live, all) = {
            let h = history.lock().unwrap();
            let live: Vec<usize> = (0..h.keys.len()).filter(|&k| h.keys[k].revoked.is_none()).collect();
            (live, h.keys.len())
        };
        let roll = rng.random_range(0..100);
        let (what, key, status) = if roll < 30 && made < 6 || live.len() <= 3 {
            made += 1;
            let class = if made % 2 == 0 { RPM_CLASS } else { TPM_CLASS };
            let nul = !made_nul && rng.random_bool(0.25);
            made_nul |= nul;
            let name = if nul {
                format!("bad\u{0}name-{made}")
            } else {
                format!("made-{made}")
            };
            let (status, key) = create_key(&nodes[node], &name, class).await;
            let index = key.map(|(id, secret)| {
                let mut h = history.lock().unwrap();
                h.keys.push(KeyInfo {
                    id,
                    secret,
                    rpm: class.0,
                    tpm: class.1,
                    nul,
                    revoked: None,
                });
                h.keys.len() - 1
            });
            (if nul { "create-nul" } else { "create" }, index, status)
        } else if roll < 65 {
            let k = live[rng.random_range(0..live.len())];
            let id = history.lock().unwrap().keys[k].id.clone();
            let (what, req) = if rng.random_bool(0.6) {
                ("delete", admin(&nodes[node], "DELETE", &format!("/api/keys/{id}")))
            } else {
                (
                    "disable",
                    admin(&nodes[node], "PATCH", &format!("/api/keys/{id}")).json(&json!({"enabled": false})),
                )
            };
            let status = req.send().await.map_or(0, |r| r.status().as_u16());
            if (200..300).contains(&status) {
                history.lock().unwrap().keys[k].revoked = Some((t0.elapsed(), node, what));
            }
            (what, Some(k), status)
        } else {
            // An edit, on any key (revoked ones too): it must not bring a
            // revoked key back.
            let k = rng.random_range(0..all);
            let id = history.lock().unwrap().keys[k].id.clone();
            let status = admin(&nodes[node], "PATCH", &format!("/api/keys/{id}"))
                .json(&json!({"name": format!("renamed-{}", rng.random_range(0..1000))}))
                .send()
                .await
                .map_or(0, |r| r.status().as_u16());
            ("rename", Some(k), status)
        };
        history.lock().unwrap().admin.push(AdminRec {
            what,
            key,
            node,
            at,
            done: t0.elapsed(),
            status,
        });
    }
}

/// When faults must end: every fault is healed by then.
fn heal_by() -> Duration {
    RUN - Duration::from_millis(2500)
}

/// Faults between the nodes and Redis: one at a time, on a random node's
/// proxy. Lost replies end with the connection cut (a TCP connection does
/// not lose bytes and live on).
async fn redis_nemesis(seed: u64, proxies: Arc<Vec<FaultProxy>>, history: Shared, t0: Instant) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x4ed1_5000);
    // The first seconds are calm: the limits must be exact there.
    tokio::time::sleep(CALM + Duration::from_millis(rng.random_range(0..1000))).await;
    loop {
        let dur = Duration::from_millis(rng.random_range(400..1500));
        let start = t0.elapsed();
        if start + dur > heal_by() {
            return;
        }
        let node = rng.random_range(0..NODES);
        let p = &proxies[node];
        let kind = match rng.random_range(0..5) {
            0 => {
                p.blackhole();
                "blackhole"
            }
            1 => {
                p.cut();
                "cut"
            }
            2 => {
                p.drop_replies();
                "drop-replies"
            }
            3 => {
                p.delay(REDIS_TIMEOUT + Duration::from_millis(200));
                "delay-past-timeout"
            }
            _ => {
                p.delay(Duration::from_millis(30));
                "delay-30ms"
            }
        };
        tokio::time::sleep(dur).await;
        if kind == "drop-replies" {
            p.cut();
        }
        p.delay(Duration::ZERO);
        p.pass();
        history.lock().unwrap().faults.push(FaultRec {
            target: Target::Redis(node),
            kind,
            start,
            end: t0.elapsed(),
        });
        tokio::time::sleep(Duration::from_millis(rng.random_range(800..2500))).await;
    }
}

/// Faults between the nodes and Postgres, and Postgres itself stopped and
/// started again (its data kept).
async fn pg_nemesis(
    seed: u64,
    proxies: Arc<Vec<FaultProxy>>,
    pg: Arc<tokio::sync::Mutex<Postgres>>,
    history: Shared,
    t0: Instant,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9a51_0000);
    let mut kills = 0;
    tokio::time::sleep(Duration::from_millis(rng.random_range(300..1200))).await;
    loop {
        let dur = Duration::from_millis(rng.random_range(800..3000));
        let start = t0.elapsed();
        if start + dur + Duration::from_millis(1500) > heal_by() {
            return;
        }
        if kills < 2 && rng.random_bool(0.3) {
            kills += 1;
            let mut pg = pg.lock().await;
            tokio::task::block_in_place(|| pg.kill());
            tokio::time::sleep(dur).await;
            pg.restart().await;
            history.lock().unwrap().faults.push(FaultRec {
                target: Target::PgServer,
                kind: "kill-restart",
                start,
                end: t0.elapsed(),
            });
        } else {
            let node = rng.random_range(0..NODES);
            let p = &proxies[node];
            let kind = match rng.random_range(0..4) {
                0 => {
                    p.blackhole();
                    "blackhole"
                }
                1 => {
                    p.cut();
                    "cut"
                }
                2 => {
                    p.drop_replies();
                    "drop-replies"
                }
                _ => {
                    p.delay(Duration::from_millis(200));
                    "delay-200ms"
                }
            };
            tokio::time::sleep(dur).await;
            if kind == "drop-replies" {
                p.cut();
            }
            p.delay(Duration::ZERO);
            p.pass();
            history.lock().unwrap().faults.push(FaultRec {
                target: Target::Pg(node),
                kind,
                start,
                end: t0.elapsed(),
            });
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1200))).await;
    }
}

/// Watch each node's count of decisions made without Redis: spans in which
/// it rose are local episodes (whatever caused them).
async fn monitor(nodes: Arc<Vec<Gateway>>, history: Shared, t0: Instant) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let mut last: Vec<(f64, Duration)> = vec![(0.0, Duration::ZERO); NODES];
    while t0.elapsed() < RUN + Duration::from_secs(1) {
        for (i, n) in nodes.iter().enumerate() {
            let Ok(r) = http.get(n.admin_url("/metrics")).send().await else {
                continue;
            };
            let text = r.text().await.unwrap_or_default();
            let Some(v) = text
                .lines()
                .find_map(|l| l.strip_prefix("fastgate_cluster_local_decisions_total "))
                .and_then(|v| v.trim().parse::<f64>().ok())
            else {
                continue;
            };
            let now = t0.elapsed();
            if v > last[i].0 {
                history.lock().unwrap().local.push((i, last[i].1, now));
            }
            last[i] = (v, now);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// When node `n` may have decided locally: its Redis faults (plus the time
/// the breaker takes to close) and the spans its metrics showed.
fn local_spans(h: &History) -> Vec<(usize, Duration, Duration)> {
    let mut spans: Vec<(usize, Duration, Duration)> = h
        .faults
        .iter()
        .filter_map(|f| match f.target {
            Target::Redis(n) => Some((n, f.start, f.end + HEAL_SLACK)),
            _ => None,
        })
        .collect();
    spans.extend(h.local.iter().copied());
    spans
}

/// Check 1: admitted <= limit in every rolling window; a window in which
/// nodes decided locally may admit `2 * ceil(limit / N)` more per such node.
/// Token windows are checked only where no node decided locally.
fn check_windows(h: &History) -> Vec<String> {
    let spans = local_spans(h);
    let mut failures = Vec::new();
    let w = WINDOW - WINDOW_MARGIN;
    for (k, key) in h.keys.iter().enumerate() {
        let mut ok: Vec<&Rec> = h.recs.iter().filter(|r| r.key == k && r.status == 200).collect();
        ok.sort_by_key(|r| r.sent);
        let mut worst: Option<(usize, u64, String)> = None;
        for (i, first) in ok.iter().enumerate() {
            let s = first.sent;
            let inside: Vec<&&Rec> = ok[i..].iter().filter(|r| r.done < s + w).collect();
            let local_nodes: std::collections::BTreeSet<usize> = spans
                .iter()
                .filter(|(_, a, b)| *a < s + w && *b > s)
                .map(|(n, _, _)| *n)
                .collect();
            if let Some(rpm) = key.rpm {
                let bound = rpm + local_nodes.len() as u64 * 2 * rpm.div_ceil(NODES as u64);
                if inside.len() as u64 > bound && worst.as_ref().is_none_or(|(n, _, _)| inside.len() > *n) {
                    let detail = format!(
                        "key {k} ({}) rpm {rpm}: {} admitted in the window from {s:.2?} (bound {bound}; nodes deciding locally: {local_nodes:?}): {:?}",
                        key.id,
                        inside.len(),
                        inside
                            .iter()
                            .map(|r| format!("{}@{}:{:.2?}", r.request_id, NODE_NAMES[r.node], r.sent))
                            .collect::<Vec<_>>()
                    );
                    worst = Some((inside.len(), bound, detail));
                }
            }
            if let Some(tpm) = key.tpm
                && local_nodes.is_empty()
            {
                let tokens: u64 = inside.iter().map(|r| r.tokens.unwrap_or(0)).sum();
                if tokens > tpm {
                    failures.push(format!(
                        "[1 admitted <= limit] key {k} ({}) tpm {tpm}: {tokens} tokens answered in the window from {s:.2?} with Redis up everywhere",
                        key.id
                    ));
                    break;
                }
            }
        }
        if let Some((_, _, detail)) = worst {
            failures.push(format!("[1 admitted <= limit] {detail}"));
        }
    }
    failures
}

/// Check 6: at no moment while every node reached Redis did the upstream
/// see more than `max_in_flight_per_key` requests on one upstream key.
fn check_in_flight(h: &History) -> Vec<String> {
    let spans = local_spans(h);
    let mut failures = Vec::new();
    for (key, start, _) in &h.upstream {
        if spans.iter().any(|(_, a, b)| a <= start && start <= b) {
            continue;
        }
        let at_once = h
            .upstream
            .iter()
            .filter(|(k, s, e)| k == key && s <= start && start < e)
            .count();
        if at_once > CAP {
            failures.push(format!(
                "[6 in-flight cap] {at_once} requests in flight at once on upstream key {key} at {start:.2?} (cap {CAP}) with Redis up everywhere"
            ));
            break;
        }
    }
    failures
}

/// Check 4: every key revoked (delete or disable answered 2xx) answers 401
/// on every node within [`REVOCATION_BOUND`] of the last fault healing, and
/// stays so; every key made and not revoked is known to every node by then.
async fn check_revocations(nodes: &Arc<Vec<Gateway>>, history: &Shared, t0: Instant, healed: Duration) -> Vec<String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let keys = history.lock().unwrap().keys.clone();
    let deadline = healed.max(t0.elapsed()) + REVOCATION_BOUND;
    let mut pending: Vec<(usize, usize)> = Vec::new();
    let mut unknown: Vec<(usize, usize)> = Vec::new();
    for (k, key) in keys.iter().enumerate() {
        for n in 0..NODES {
            if key.revoked.is_some() {
                pending.push((k, n));
            } else if !key.nul {
                unknown.push((k, n));
            }
        }
    }
    let mut seen_at: HashMap<(usize, usize), Duration> = HashMap::new();
    let mut last_status: HashMap<(usize, usize), u16> = HashMap::new();
    loop {
        let mut still = Vec::new();
        for (k, n) in pending {
            let id = format!("revoked-probe-{}", uuid::Uuid::now_v7().simple());
            let status = send(&http, nodes, n, k, &id, "hi", history, t0).await;
            if status == 401 {
                seen_at.insert((k, n), t0.elapsed());
            } else {
                last_status.insert((k, n), status);
                still.push((k, n));
            }
        }
        pending = still;
        let mut still = Vec::new();
        for (k, n) in unknown {
            let status = admin(&nodes[n], "GET", &format!("/api/keys/{}", keys[k].id))
                .send()
                .await
                .map_or(0, |r| r.status().as_u16());
            if status != 200 {
                last_status.insert((k, n), status);
                still.push((k, n));
            }
        }
        unknown = still;
        if (pending.is_empty() && unknown.is_empty()) || t0.elapsed() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut failures = Vec::new();
    for (k, n) in &pending {
        let key = &keys[*k];
        let (at, on, what) = key.revoked.unwrap();
        failures.push(format!(
            "[4 revocation seen everywhere] key {k} ({}), {what} through {} at {at:.2?}, still answers {} on {} {REVOCATION_BOUND:?} after the last fault healed ({healed:.2?})",
            key.id, NODE_NAMES[on], last_status[&(*k, *n)], NODE_NAMES[*n]
        ));
    }
    for (k, n) in &unknown {
        failures.push(format!(
            "[4 keys reach every node] key {k} ({}), made and never revoked, answers {} on {}'s admin API {REVOCATION_BOUND:?} after the last fault healed",
            keys[*k].id, last_status[&(*k, *n)], NODE_NAMES[*n]
        ));
    }
    // ... and stays revoked.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for ((k, n), at) in seen_at {
        let id = format!("revoked-again-{}", uuid::Uuid::now_v7().simple());
        let status = send(&http, nodes, n, k, &id, "hi", history, t0).await;
        if status != 401 {
            failures.push(format!(
                "[4 revocation stays] key {k} ({}) answered 401 on {} at {at:.2?}, then {status} at {:.2?}",
                keys[k].id,
                NODE_NAMES[n],
                t0.elapsed()
            ));
        }
    }
    failures
}

async fn redis_conn(redis: &Redis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn keys_matching(con: &mut redis::aio::MultiplexedConnection, pattern: &str) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(pattern)
        .query_async(con)
        .await
        .unwrap_or_default()
}

/// Check 3: once the faults have ended and every request has finished,
/// every lease set is empty within a few seconds.
async fn check_leases(redis: &Redis) -> Vec<String> {
    let mut con = redis_conn(redis).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut held = Vec::new();
        for set in keys_matching(&mut con, "fg:*if:*").await {
            // Held slots score their expiry (> 0); tombstones of slots
            // given back before their take arrived score below 0.
            let members: Vec<String> = redis::cmd("ZRANGE")
                .arg(&set)
                .arg("(0")
                .arg("+inf")
                .arg("BYSCORE")
                .query_async(&mut con)
                .await
                .unwrap_or_default();
            if !members.is_empty() {
                held.push(format!("{set}: {members:?}"));
            }
        }
        if held.is_empty() {
            return Vec::new();
        }
        if Instant::now() > deadline {
            return vec![format!(
                "[3 no leaked slot] slots still held 5 s after every request finished: {}",
                held.join("; ")
            )];
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The sum of every quota counter of scope `id` in Redis.
async fn quota_counter(con: &mut redis::aio::MultiplexedConnection, id: &str) -> u64 {
    let mut total = 0;
    for counter in keys_matching(con, &format!("fg:*q:{id}:*")).await {
        let v: Option<String> = redis::cmd("GET").arg(&counter).query_async(con).await.unwrap_or(None);
        total += v.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    total
}

/// Check 2: no double charge: each key's quota counter in Redis equals the
/// tokens of its answered requests (plus at most [`UNKNOWN_TOKENS`] for each
/// request whose answer the client did not see).
async fn check_quota_counters(redis: &Redis, history: &Shared) -> Vec<String> {
    let (keys, expected) = {
        let h = history.lock().unwrap();
        let expected: Vec<(u64, u64)> = (0..h.keys.len())
            .map(|k| {
                let mine = h.recs.iter().filter(|r| r.key == k);
                let sure: u64 = mine.clone().filter_map(|r| r.tokens).sum();
                let unknown = mine
                    .filter(|r| r.tokens.is_none() && ![400, 401, 429, 503].contains(&r.status))
                    .count() as u64;
                (sure, sure + unknown * UNKNOWN_TOKENS)
            })
            .collect();
        (h.keys.clone(), expected)
    };
    let mut con = redis_conn(redis).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut wrong = Vec::new();
        for (k, key) in keys.iter().enumerate() {
            let got = quota_counter(&mut con, &key.id).await;
            let (low, high) = expected[k];
            if got < low || got > high {
                wrong.push(format!(
                    "key {k} ({}): counter {got}, answered requests used {low}{}",
                    key.id,
                    if high > low {
                        format!("..={high}")
                    } else {
                        String::new()
                    }
                ));
            }
        }
        if wrong.is_empty() {
            return Vec::new();
        }
        if Instant::now() > deadline {
            return vec![format!(
                "[2 no double charge] quota counters 15 s after the run: {}",
                wrong.join("; ")
            )];
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Check 5: Postgres holds exactly one audit row per request a client got
/// an answer for (by node and request id, counted: ids repeat), as many as
/// each node's own SQLite log, once shipping has caught up.
async fn check_audit(pg: &Postgres, nodes: &[Gateway], history: &Shared) -> Vec<String> {
    let (pgc, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    // (node, request id) -> (answered, unanswered)
    let mut want: BTreeMap<(usize, String), (usize, usize)> = BTreeMap::new();
    for r in &history.lock().unwrap().recs {
        let e = want.entry((r.node, r.request_id.clone())).or_default();
        if r.status == 0 { e.1 += 1 } else { e.0 += 1 }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut got: BTreeMap<(usize, String), usize> = BTreeMap::new();
        let mut strangers = 0;
        let rows = pgc
            .query(
                "SELECT node, request_id, count(*) FROM fastgate_audit GROUP BY 1, 2",
                &[],
            )
            .await
            .unwrap_or_default();
        for row in rows {
            let node: String = row.get(0);
            let id: String = row.get(1);
            let n: i64 = row.get(2);
            match NODE_NAMES.iter().position(|name| node.starts_with(&format!("{name}-"))) {
                Some(i) => *got.entry((i, id)).or_default() += n as usize,
                None => strangers += 1,
            }
        }
        let mut local: BTreeMap<(usize, String), usize> = BTreeMap::new();
        for (i, n) in nodes.iter().enumerate() {
            for row in n.audit_rows() {
                *local.entry((i, row.request_id)).or_default() += 1;
            }
        }
        let mut wrong = Vec::new();
        if strangers > 0 {
            wrong.push(format!("{strangers} rows from nodes not in the cluster"));
        }
        for ((n, id), (answered, unanswered)) in &want {
            let rows = got.get(&(*n, id.clone())).copied().unwrap_or(0);
            if rows < *answered || rows > answered + unanswered {
                wrong.push(format!(
                    "{} {id}: {rows} rows for {answered} answered ({unanswered} unanswered) requests",
                    NODE_NAMES[*n]
                ));
            }
        }
        for ((n, id), rows) in &got {
            if !want.contains_key(&(*n, id.clone())) {
                wrong.push(format!("{} {id}: {rows} rows for no request sent", NODE_NAMES[*n]));
            }
        }
        for (i, _) in nodes.iter().enumerate() {
            let shipped: usize = got.iter().filter(|((n, _), _)| *n == i).map(|(_, c)| c).sum();
            let kept: usize = local.iter().filter(|((n, _), _)| *n == i).map(|(_, c)| c).sum();
            if shipped != kept {
                wrong.push(format!(
                    "{}: {shipped} rows in Postgres, {kept} in its own log",
                    NODE_NAMES[i]
                ));
            }
        }
        if wrong.is_empty() {
            return Vec::new();
        }
        if Instant::now() > deadline {
            let n = wrong.len();
            wrong.truncate(12);
            return vec![format!(
                "[5 no audit row lost or duplicated] 20 s after the run, {n} mismatches, first: {}",
                wrong.join("; ")
            )];
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
