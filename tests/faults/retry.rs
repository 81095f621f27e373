//! Faults: retry (see docs/resilience.md, "Failover order").
//!
//! Which failures are tried again, on both forwarding paths: FastGate's own
//! exchange (routes with `retries > 0`, a fallback, model routing, ...) and
//! Pingora's (one upstream, `retries: 0`, body untouched). A raw HTTP/1.1
//! upstream here does what providers and their proxies do at the worst
//! moment: read the whole body and then say nothing, close a kept-alive
//! connection after reading the next request, answer 5xx, refuse.

use crate::common::*;
use serde_json::json;
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// What the raw upstream does with one request.
#[derive(Clone)]
enum Act {
    /// Answer `status` with these headers (keep-alive), after `delay`.
    Reply {
        status: u16,
        headers: Vec<(&'static str, &'static str)>,
        delay: Duration,
    },
    /// Read the whole request, then say nothing for an hour.
    Hang,
    /// Read the whole request, then close the connection without a byte.
    Close,
}

fn reply(status: u16) -> Act {
    Act::Reply {
        status,
        headers: Vec::new(),
        delay: Duration::ZERO,
    }
}

/// One request as the raw upstream saw it.
#[derive(Clone, Debug)]
struct Call {
    /// Which request on its connection (1 = the first).
    on_conn: u32,
    key: String,
}

/// Chooses the act from (call number from 1, request number on its
/// connection from 1, upstream key).
type Script = Arc<dyn Fn(u32, u32, &str) -> Act + Send + Sync>;

/// A raw HTTP/1.1 upstream that counts what reaches it.
struct Raw {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<Call>>>,
    accepts: Arc<AtomicU32>,
}

impl Raw {
    async fn start(script: impl Fn(u32, u32, &str) -> Act + Send + Sync + 'static) -> Raw {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let accepts = Arc::new(AtomicU32::new(0));
        let script: Script = Arc::new(script);
        let (c, a) = (calls.clone(), accepts.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, c.clone(), script.clone()));
            }
        });
        Raw { addr, calls, accepts }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

async fn serve(mut stream: TcpStream, calls: Arc<Mutex<Vec<Call>>>, script: Script) {
    let mut buf = Vec::new();
    let mut on_conn = 0;
    loop {
        // The head, then exactly `content-length` bytes of body.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
                .unwrap_or_default()
        };
        let length: usize = header("content-length:").parse().unwrap_or(0);
        let key = header("authorization:").trim_start_matches("bearer ").to_string();
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + length);
        on_conn += 1;
        let n = {
            let mut c = calls.lock().unwrap();
            c.push(Call {
                on_conn,
                key: key.clone(),
            });
            c.len() as u32
        };
        match script(n, on_conn, &key) {
            Act::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return;
            }
            Act::Close => return,
            Act::Reply { status, headers, delay } => {
                tokio::time::sleep(delay).await;
                let body = json!({"error": {"message": format!("raw upstream says {status}"), "type": "server_error"}, "id": "raw", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}]}).to_string();
                let mut out = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
                    body.len()
                );
                for (k, v) in headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str("\r\n");
                out.push_str(&body);
                if stream.write_all(out.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A route file: `extra` is added to the route's mapping (`retries: 1`,
/// `idempotent: true`, ...). With `retries: 0` and nothing else the body is
/// streamed through Pingora; `retries > 0` makes FastGate read it and use
/// its own exchange. (Embeddings, a POST billed per call: a chat completion
/// on an OpenAI route is read for its `stream` flag, which would take
/// FastGate's exchange even with `retries: 0`.)
fn route(extra: &str) -> String {
    format!(
        "routes:\n  - {{ name: chat, match: {{ path: /v1/embeddings }}, format: openai, auth: none, upstream: u{extra} }}\n"
    )
}

fn upstream(raw: &Raw, extra: &str) -> String {
    format!(
        "upstreams:\n  u: {{provider: openai_compatible, endpoints: ['{}'], timeouts: {{first_byte: 600ms}}{extra}}}\n",
        raw.url()
    )
}

/// The same upstream with a two-key pool (round robin).
fn pooled(raw: &Raw) -> String {
    format!(
        "upstreams:\n  u: {{provider: openai_compatible, endpoints: ['{}'], timeouts: {{first_byte: 600ms}}, key_pool: p}}\nkey_pools:\n  p: {{keys: [sk-one, sk-two], strategy: round_robin}}\n",
        raw.url()
    )
}

async fn post(gw: &Gateway) -> reqwest::Response {
    reqwest::Client::new()
        .post(gw.url("/v1/embeddings"))
        .timeout(Duration::from_secs(20))
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "bill me once"}]}))
        .send()
        .await
        .unwrap()
}

/// The value of one metric series (0 when absent).
async fn metric(gw: &Gateway, name: &str, labels: &str) -> f64 {
    let text = gw.metrics().await;
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn refused(upstream: &str, reason: &str) -> String {
    format!("reason=\"{reason}\",upstream=\"{upstream}\"")
}

// ---- A POST the provider may be working on is not sent twice ----

#[tokio::test]
async fn post_timing_out_after_its_body_is_sent_once_on_the_exchange() {
    let raw = Raw::start(|_, _, _| Act::Hang).await;
    let gw = Gateway::start(&upstream(&raw, ""), &[("r.yaml", &route(", retries: 2"))]).await;
    let started = Instant::now();
    let resp = post(&gw).await;
    assert_eq!(resp.status(), 504);
    assert_eq!(
        raw.count(),
        1,
        "one call: the provider may be generating (and billing) it"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(
        metric(&gw, "fastgate_retries_refused_total", &refused("u", "not_idempotent")).await,
        1.0
    );
}

#[tokio::test]
async fn post_timing_out_after_its_body_is_sent_once_on_pingoras_path() {
    let raw = Raw::start(|_, _, _| Act::Hang).await;
    let gw = Gateway::start(&upstream(&raw, ""), &[("r.yaml", &route(""))]).await;
    let resp = post(&gw).await;
    assert_eq!(resp.status(), 504);
    assert_eq!(raw.count(), 1);
}

#[tokio::test]
async fn an_idempotent_route_retries_a_timed_out_post() {
    let raw = Raw::start(|n, _, _| if n == 1 { Act::Hang } else { reply(200) }).await;
    let gw = Gateway::start(
        &upstream(&raw, ""),
        &[("r.yaml", &route(", retries: 1, idempotent: true"))],
    )
    .await;
    let resp = post(&gw).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(raw.count(), 2, "the route says a second call is harmless");
}

#[tokio::test]
async fn a_pooled_connection_closed_after_reading_a_post_is_not_replayed() {
    // The first request on a connection is answered (and the connection
    // kept); the next one on it is read, then the connection closes.
    let raw = Raw::start(|_, on_conn, _| if on_conn == 1 { reply(200) } else { Act::Close }).await;
    let gw = Gateway::start(&upstream(&raw, ""), &[("r.yaml", &route(", retries: 1"))]).await;
    assert_eq!(post(&gw).await.status(), 200);
    let resp = post(&gw).await;
    assert_eq!(resp.status(), 502);
    let calls = raw.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[1].on_conn, 2, "the second POST went on the pooled connection");
    assert_eq!(
        raw.accepts.load(Ordering::SeqCst),
        1,
        "and was not sent again on a fresh one"
    );
}

#[tokio::test]
async fn a_pooled_connection_closed_after_reading_a_post_is_not_replayed_by_pingora() {
    let raw = Raw::start(|_, on_conn, _| if on_conn == 1 { reply(200) } else { Act::Close }).await;
    let gw = Gateway::start(&upstream(&raw, ""), &[("r.yaml", &route(""))]).await;
    assert_eq!(post(&gw).await.status(), 200);
    assert_eq!(post(&gw).await.status(), 502);
    assert_eq!(raw.count(), 2);
}

#[tokio::test]
async fn a_get_on_a_dead_pooled_connection_gets_one_fresh_connection() {
    let raw = Raw::start(|_, on_conn, _| if on_conn == 1 { reply(200) } else { Act::Close }).await;
    let routes =
        "routes:\n  - { name: models, match: { path: /v1/models }, format: openai, auth: none, upstream: u }\n";
    let gw = Gateway::start(&upstream(&raw, ""), &[("r.yaml", routes)]).await;
    for _ in 0..2 {
        let resp = reqwest::get(gw.url("/v1/models")).await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    let calls = raw.calls();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!(raw.accepts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_500_to_a_post_is_handed_to_the_client_after_one_call() {
    let raw = Raw::start(|_, _, _| reply(500)).await;
    let gw = Gateway::start(&pooled(&raw), &[("r.yaml", &route(", retries: 2"))]).await;
    let resp = post(&gw).await;
    assert_eq!(resp.status(), 500);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        body["error"]["message"], "raw upstream says 500",
        "the upstream's own answer"
    );
    assert_eq!(raw.count(), 1);
    assert_eq!(
        metric(&gw, "fastgate_retries_refused_total", &refused("u", "not_idempotent")).await,
        1.0
    );
}

#[tokio::test]
async fn a_502_or_a_503_without_retry_after_to_a_post_is_not_retried() {
    for status in [502, 503, 504] {
        let raw = Raw::start(move |_, _, _| reply(status)).await;
        let gw = Gateway::start(&pooled(&raw), &[("r.yaml", &route(", retries: 2"))]).await;
        assert_eq!(post(&gw).await.status(), status);
        assert_eq!(raw.count(), 1, "{status}");
    }
}

#[tokio::test]
async fn a_500_on_an_idempotent_route_is_retried_on_the_other_key() {
    let raw = Raw::start(|n, _, _| if n == 1 { reply(500) } else { reply(200) }).await;
    let gw = Gateway::start(&pooled(&raw), &[("r.yaml", &route(", retries: 2, idempotent: true"))]).await;
    assert_eq!(post(&gw).await.status(), 200);
    let calls = raw.calls();
    assert_eq!(calls.len(), 2);
    assert_ne!(calls[0].key, calls[1].key);
}

#[tokio::test]
async fn answers_proving_the_provider_did_nothing_are_retried_on_the_other_key() {
    let answers: [(u16, Vec<(&'static str, &'static str)>); 3] =
        [(429, vec![]), (529, vec![]), (503, vec![("retry-after", "1")])];
    for (status, headers) in answers {
        let first = Act::Reply {
            status,
            headers,
            delay: Duration::ZERO,
        };
        let raw = Raw::start(move |n, _, _| if n == 1 { first.clone() } else { reply(200) }).await;
        let gw = Gateway::start(&pooled(&raw), &[("r.yaml", &route(", retries: 2"))]).await;
        assert_eq!(post(&gw).await.status(), 200, "{status}");
        let calls = raw.calls();
        assert_eq!(calls.len(), 2, "{status}: {calls:?}");
        assert_ne!(calls[0].key, calls[1].key, "{status}: the other key");
    }
}

// ---- Every attempt spends: no loop over addresses that refuse ----

/// Three addresses: two fail their health check at start (nothing listens),
/// the third passes it and then stops listening (it refuses from then on).
/// Before, the unhealthy two counted as "untried" forever: a refused
/// connection was retried for free, in a loop, with nothing sent.
async fn unhealthy_twice_then_refused(route_extra: &str) {
    let dead = [free_port(), free_port()];
    let alive = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = alive.local_addr().unwrap().port();
    let config = format!(
        "upstreams:\n  u: {{provider: openai_compatible, endpoints: ['http://127.0.0.1:{}', 'http://127.0.0.1:{}', 'http://127.0.0.1:{port}'], health_check: {{interval: 1h, timeout: 300ms}}}}\n",
        dead[0], dead[1]
    );
    let gw = Gateway::start(&config, &[("r.yaml", &route(route_extra))]).await;
    // The first health check (at start) has marked the two dead addresses.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(alive);
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .post(gw.url("/v1/embeddings"))
        .timeout(Duration::from_secs(8))
        .json(&json!({"model": "m", "messages": []}))
        .send()
        .await
        .expect("an answer, not a request spinning over refused connections");
    assert_eq!(resp.status(), 502);
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    // One attempt: `retries: 0` spends nothing more, refusals included.
    assert_eq!(metric(&gw, "fastgate_failovers_total", "reason=\"connect\"").await, 0.0);
    assert_eq!(
        metric(&gw, "fastgate_retries_refused_total", &refused("u", "exhausted")).await,
        1.0
    );
}

#[tokio::test]
async fn refused_connections_spend_retries_on_the_exchange() {
    // A `model_map` makes FastGate read the body (its own exchange).
    unhealthy_twice_then_refused(", retries: 0, model_map: { x: y }").await;
}

#[tokio::test]
async fn refused_connections_spend_retries_on_pingoras_path() {
    unhealthy_twice_then_refused("").await;
}

// ---- The per-upstream retry budget ----

#[tokio::test]
async fn the_retry_budget_bounds_retries_under_a_burst_of_429s() {
    // Every call: 429 after 300 ms (all 40 requests are in flight when the
    // first answers come back).
    let raw = Raw::start(|_, _, _| Act::Reply {
        status: 429,
        headers: Vec::new(),
        delay: Duration::from_millis(300),
    })
    .await;
    let gw = Gateway::start(&upstream(&raw, ""), &[("r.yaml", &route(", retries: 3"))]).await;
    let client = reqwest::Client::new();
    let sends = (0..40).map(|_| {
        client
            .post(gw.url("/v1/embeddings"))
            .timeout(Duration::from_secs(20))
            .json(&json!({"model": "m", "messages": []}))
            .send()
    });
    let answers = futures_util::future::join_all(sends).await;
    for a in answers {
        assert_eq!(a.unwrap().status(), 429, "the last answer is handed on");
    }
    let calls = raw.count();
    // Without a budget: 40 × 4 = 160. With 20 % (min 3): at most 8 retries
    // while 40 are active, then at most 3 at a time for the few left, each
    // of those at most 3 times: 40 + 8 + 3 + 3 = 54 when the answers come
    // on time (measured: 54); 60 leaves room for a loaded machine.
    assert!(calls <= 60, "{calls} upstream calls");
    let refused_budget = metric(&gw, "fastgate_retries_refused_total", &refused("u", "budget")).await;
    assert!(refused_budget >= 30.0, "{refused_budget} refusals (budget)");
    eprintln!("budget: {calls} upstream calls for 40 requests, {refused_budget} retries refused");
}

#[test]
fn a_retry_budget_over_100_percent_is_refused_by_check() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("routes.d")).unwrap();
    let config = dir.path().join("f.yaml");
    let write = |budget: &str| {
        let text = format!(
            "upstreams:\n  u: {{provider: openai, endpoints: ['http://127.0.0.1:1'], retry_budget: {budget}}}\nroutes_dir: routes.d\n"
        );
        std::fs::write(&config, text).unwrap();
    };
    write("{percent: 150}");
    let (ok, _, err) = check(&config, dir.path());
    assert!(!ok);
    assert!(err.contains("retry_budget.percent must be between 0 and 100"), "{err}");
    write("{percent: 50, min_concurrency: 1}");
    let (ok, out, err) = check(&config, dir.path());
    assert!(ok, "{out}{err}");
}

#[tokio::test]
async fn the_retry_budget_holds_for_a_two_key_pool_under_a_burst_of_429s() {
    // The same burst against a two-key pool: the keys cool down as the 429s
    // arrive, so some retries find no usable key; the rest are bounded by
    // the budget all the same.
    let raw = Raw::start(|_, _, _| Act::Reply {
        status: 429,
        headers: Vec::new(),
        delay: Duration::from_millis(300),
    })
    .await;
    let gw = Gateway::start(&pooled(&raw), &[("r.yaml", &route(", retries: 3"))]).await;
    let client = reqwest::Client::new();
    let sends = (0..40).map(|_| {
        client
            .post(gw.url("/v1/embeddings"))
            .timeout(Duration::from_secs(20))
            .json(&json!({"model": "m", "messages": []}))
            .send()
    });
    let answers = futures_util::future::join_all(sends).await;
    for a in answers {
        let status = a.unwrap().status().as_u16();
        assert!(matches!(status, 429 | 503), "{status}");
    }
    let calls = raw.count();
    let refused_budget = metric(&gw, "fastgate_retries_refused_total", &refused("u", "budget")).await;
    eprintln!("pooled budget: {calls} upstream calls for 40 requests, {refused_budget} retries refused");
    assert!(calls <= 60, "{calls} upstream calls");
}
