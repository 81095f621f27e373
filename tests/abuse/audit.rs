//! Attacks on audit: see docs/security.md. A client without a valid key
//! must not be able to fill the disk through the audit log; a client with
//! one must not be able to store more than the field caps per request; the
//! whole store stays under `audit.max_bytes`.

use crate::common::{ADMIN_PASSWORD, Gateway, MockUpstream};
use futures_util::{StreamExt, stream};
use std::time::{Duration, Instant};

/// `fastgate::audit::fields::PATH_MAX + QUERY_MAX` and room for the marks.
const PATH_ROOM: usize = 2048 + 2048 + 64;
/// The header-set cap (16 KiB) plus one header finishing past it, escaped.
const HEADERS_ROOM: usize = 16 * 1024 + 3 * 1024;
/// The same for a refused request's sampled row (4 KiB).
const REFUSED_HEADERS_ROOM: usize = 4 * 1024 + 3 * 1024;

fn config(mock: &MockUpstream, audit: &str) -> String {
    format!(
        "audit:\n  capture_headers: true\n{audit}upstreams:\n  oai: {{provider: openai, endpoints: ['{u}'], key_pool: oai}}\n  mock: {{provider: mock, mock: {{chunk_interval: 1ms}}}}\nkey_pools:\n  oai: {{keys: [sk-upstream]}}\n",
        u = mock.url()
    )
}

const ROUTES: &str = r#"
routes:
  - { name: chat, match: { path: /v1/chat/completions }, format: openai, upstream: oai }
  - { name: big, match: { path: "/big/{*rest}", model: ['*'] }, format: openai, upstream: mock, transform: { strip_prefix: /big } }
"#;

/// Bytes of the database once its write-ahead log is checkpointed into it
/// (the WAL itself stays bounded by SQLite's autocheckpoint, about 4 MiB:
/// what accumulates is the main file).
fn db_bytes(gw: &Gateway) -> u64 {
    let db = gw.db_path();
    let conn = fastgate::store::open(&db).unwrap();
    let _: (i64, i64, i64) = conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    drop(conn);
    let wal = db.with_extension("db-wal");
    [db, wal]
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum()
}

/// A counter's value in the `/metrics` text (0 when absent).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Wait until the audit writer has written everything queued (its counters
/// stop moving), so sizes are measured after the rows landed.
async fn settle(gw: &Gateway) {
    let mut last = String::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let m = gw.metrics().await;
        let now = format!(
            "{} {}",
            metric(&m, "fastgate_audit_written_total"),
            metric(&m, "fastgate_audit_queue_depth")
        );
        if now == last && metric(&m, "fastgate_audit_queue_depth") == 0 {
            return;
        }
        last = now;
    }
}

/// 60 headers of 4 KiB: what the attacker sent with every request.
fn junk_headers() -> reqwest::header::HeaderMap {
    let mut h = reqwest::header::HeaderMap::new();
    let value = reqwest::header::HeaderValue::from_str(&"h".repeat(4096)).unwrap();
    for i in 0..60 {
        let name = reqwest::header::HeaderName::from_bytes(format!("x-junk-{i}").as_bytes()).unwrap();
        h.insert(name, value.clone());
    }
    h
}

/// `server.limits` loosened far enough that the attack's requests reach
/// routing and auth (an operator who raised them): the audit caps and the
/// sampling must hold on their own.
const LOOSE_LIMITS: &str = "  limits: {max_header_bytes: 512KiB, max_uri_bytes: 16KiB}\n";

#[tokio::test]
async fn the_attack_under_default_limits_is_refused_before_it_costs_a_row() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(&config(&mock, ""), &[("r.yaml", ROUTES)]).await;
    settle(&gw).await;
    let before = db_bytes(&gw);
    let rows_before = gw.audit_rows().len();
    let client = reqwest::Client::new();
    let headers = junk_headers();
    let query = format!("q={}", "q".repeat(8 * 1024));
    let statuses: Vec<u16> = stream::iter(0..200)
        .map(|i| {
            let req = match i % 2 {
                0 => client.post(gw.url(&format!("/v1/chat/completions?{query}"))),
                _ => client.get(gw.url(&format!("/nowhere/{i}"))),
            };
            let req = req.headers(headers.clone());
            // The gateway may answer 414/431 and close before reading it all.
            async move { req.send().await.map_or(0, |r| r.status().as_u16()) }
        })
        .buffer_unordered(6)
        .collect()
        .await;
    assert!(
        statuses.iter().all(|s| [0, 414, 431].contains(s)),
        "only 414/431 (or a close): {statuses:?}"
    );
    assert!(statuses.iter().filter(|s| **s != 0).count() >= 190, "{statuses:?}");
    settle(&gw).await;
    let grown = db_bytes(&gw).saturating_sub(before);
    eprintln!("200 requests with 240 KiB of headers under the default limits: database grew {grown} bytes");
    assert!(grown < 64 * 1024, "the database grew {grown} bytes");
    assert!(gw.audit_rows().len() <= rows_before + 2, "no row per refused request");
    let m = gw.metrics().await;
    let refused: u64 = ["header_too_large", "uri_too_long"]
        .iter()
        .map(|r| metric(&m, &format!("fastgate_transport_refusals_total{{reason=\"{r}\"}}")))
        .sum();
    assert_eq!(refused, 200, "{m}");
    assert!(mock.seen().is_empty());
}

#[tokio::test]
async fn a_thousand_refused_requests_are_counted_not_written() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start_with_server(LOOSE_LIMITS, &config(&mock, ""), &[("r.yaml", ROUTES)]).await;
    settle(&gw).await;
    let before = db_bytes(&gw);
    let started_s = fastgate::clock::now_ms() / 1000;
    let client = reqwest::Client::new();
    let headers = junk_headers();
    let query = format!("q={}", "q".repeat(8 * 1024));
    let statuses: Vec<u16> = stream::iter(0..1000)
        .map(|i| {
            let req = match i % 3 {
                0 => client.post(gw.url(&format!("/v1/chat/completions?{query}"))),
                1 => client
                    .post(gw.url(&format!("/v1/chat/completions?{query}")))
                    .bearer_auth(format!("fg_bogus{i:06}")),
                _ => client.get(gw.url(&format!("/nowhere/{i}?{query}"))),
            };
            let req = req.headers(headers.clone());
            async move { req.send().await.unwrap().status().as_u16() }
        })
        .buffer_unordered(6)
        .collect()
        .await;
    let ended_s = fastgate::clock::now_ms() / 1000;
    assert_eq!(statuses.iter().filter(|s| **s == 401).count(), 667, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 404).count(), 333);
    settle(&gw).await;

    let grown = db_bytes(&gw).saturating_sub(before);
    eprintln!(
        "1,000 refused requests (60 x 4 KiB headers, 8 KiB query) in {} s: database grew {grown} bytes",
        ended_s - started_s + 1
    );
    assert!(grown < 1024 * 1024, "the database grew {grown} bytes");

    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, r#"fastgate_refused_requests_total{reason="no_key"}"#),
        334,
        "{m}"
    );
    assert_eq!(metric(&m, r#"fastgate_refused_requests_total{reason="bad_key"}"#), 333);
    assert_eq!(metric(&m, r#"fastgate_refused_requests_total{reason="no_route"}"#), 333);

    let rows = gw.audit_rows();
    let refused: Vec<_> = rows.iter().filter(|r| r.status == 401 || r.status == 404).collect();
    // The last answers' rows may be made just after the second turned.
    let seconds = (ended_s - started_s + 2) as usize;
    assert!(
        !refused.is_empty() && refused.len() <= seconds,
        "{} sampled rows in {seconds} s from one client",
        refused.len()
    );
    for r in &refused {
        assert!(r.path.len() <= PATH_ROOM, "path of {} bytes", r.path.len());
        assert!(r.path.contains("…[truncated "), "{}", &r.path[r.path.len() - 40..]);
        let h = r.request_headers.as_deref().unwrap();
        assert!(h.len() <= REFUSED_HEADERS_ROOM, "headers of {} bytes", h.len());
        assert!(!h.contains("fg_bogus"), "a bogus key was stored");
    }
    assert!(
        gw.logs().matches("request refused (not sampled)").count() >= 1000 - refused.len() - 5,
        "unsampled refusals are logged at debug only"
    );
}

#[tokio::test]
async fn ten_thousand_bogus_keys_cost_bounded_disk_and_memory() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(&config(&mock, ""), &[("r.yaml", ROUTES)]).await;
    let client = reqwest::Client::new();
    // Warm up (connections, worker threads, allocator arenas) before measuring.
    for i in 0..200 {
        let _ = client
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(format!("fg_warm{i}"))
            .send()
            .await
            .unwrap();
    }
    settle(&gw).await;
    let (db_before, rss_before) = (db_bytes(&gw), gw.rss_kib());
    let started = Instant::now();
    let statuses: Vec<u16> = stream::iter(0..10_000)
        .map(|i| {
            let req = client
                .post(gw.url("/v1/chat/completions"))
                .bearer_auth(format!("fg_{i:08}_{}", "k".repeat(40)))
                .body(r#"{"model":"gpt-4o","messages":[]}"#);
            async move { req.send().await.unwrap().status().as_u16() }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    let took = started.elapsed();
    assert!(statuses.iter().all(|s| *s == 401), "every bogus key is refused");
    settle(&gw).await;
    let grown = db_bytes(&gw).saturating_sub(db_before);
    let rss_grown = gw.rss_kib().saturating_sub(rss_before);
    eprintln!("10,000 bogus keys, 50 at a time, in {took:?}: database grew {grown} bytes, RSS grew {rss_grown} KiB");
    assert!(grown < 1024 * 1024, "the database grew {grown} bytes");
    assert!(rss_grown < 32 * 1024, "RSS grew {rss_grown} KiB");
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, r#"fastgate_refused_requests_total{reason="bad_key"}"#),
        10_200,
        "{m}"
    );
    let sampled = gw.audit_rows().iter().filter(|r| r.status == 401).count();
    assert!(
        sampled <= took.as_secs_f64().ceil() as usize + 3,
        "{sampled} rows for one client in {took:?}"
    );
    assert_eq!(mock.seen().len(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn an_accepted_request_with_huge_fields_gets_a_capped_marked_row() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(
        &config(&mock, "  capture_body: true\n  body_max_bytes: 1KiB\n"),
        &[("r.yaml", ROUTES)],
    )
    .await;
    let (_, secret) = gw.create_key(&[]);
    gw.wait_key(&secret, "/v1/chat/completions").await;

    // Within the header budget of the data port (32 KiB): 100 headers of
    // 200 bytes, a 3,000-byte value and User-Agent, a value not UTF-8.
    // Those checked below come first (the set keeps the first 64 headers).
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-big", "b".repeat(3000).parse().unwrap());
    headers.insert("user-agent", "u".repeat(3000).parse().unwrap());
    headers.insert(
        "x-not-utf8",
        reqwest::header::HeaderValue::from_bytes(b"caf\xe9 \xff\xfe").unwrap(),
    );
    for i in 0..100 {
        let name = reqwest::header::HeaderName::from_bytes(format!("x-many-{i}").as_bytes()).unwrap();
        headers.insert(name, "v".repeat(200).parse().unwrap());
    }
    let model = format!("m\u{0}{}", "x".repeat(5000));
    let body = serde_json::json!({"model": model, "messages": [{"role": "user", "content": "a\u{0}é".repeat(2000)}]});
    // Within the URI budget of the data port (8 KiB), past both caps.
    let path = format!("/big/{}/v1/chat/completions?q={}", "p".repeat(3000), "é".repeat(500));
    let r = reqwest::Client::new()
        .post(gw.url(&path))
        .bearer_auth(&secret)
        .headers(headers)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let _ = r.bytes().await.unwrap();
    let rows = gw.wait_audit_ids([&id]).await;
    let row = rows
        .iter()
        .find(|r| r.request_id == id)
        .expect("the accepted request's row");

    let everything = serde_json::to_string(row).unwrap();
    for text in [
        Some(row.path.as_str()),
        row.model.as_deref(),
        row.user_agent.as_deref(),
        row.request_headers.as_deref(),
        row.request_body.as_deref(),
        row.response_body.as_deref(),
        row.error.as_deref(),
    ]
    .into_iter()
    .flatten()
    {
        assert!(!text.contains('\0'), "a NUL was stored: {text}");
    }
    eprintln!("row of a hostile accepted request: {} bytes as JSON", everything.len());
    assert!(everything.len() < 32 * 1024, "row of {} bytes", everything.len());

    assert!(
        row.path.len() <= PATH_ROOM && row.path.contains("…[truncated "),
        "{}",
        row.path.len()
    );
    let model = row.model.as_deref().unwrap();
    assert!(model.len() <= 256 + 40, "model of {} bytes", model.len());
    assert!(
        model.starts_with("m\u{2400}xxx") && model.ends_with("…[truncated 4746 bytes]"),
        "{model}"
    );
    let ua = row.user_agent.as_deref().unwrap();
    assert!(ua.len() <= 512 + 40 && ua.ends_with("…[truncated 2488 bytes]"), "{ua}");
    let h = row.request_headers.as_deref().unwrap();
    assert!(h.len() <= HEADERS_ROOM, "headers of {} bytes", h.len());
    let h: serde_json::Value = serde_json::from_str(h).unwrap();
    assert_eq!(h["authorization"], "[redacted]");
    assert!(h["…"].as_str().unwrap().starts_with("[truncated "), "{h}");
    assert!(h["x-big"].as_str().unwrap().ends_with("…[truncated 1976 bytes]"));
    assert!(h["x-not-utf8"].as_str().unwrap().contains('\u{fffd}'), "{h}");
    let body = row.request_body.as_deref().unwrap();
    assert!(body.len() <= 1024 + 40 && body.contains("…[truncated "), "{body}");

    // The admin API's log detail shows the marks.
    let token = gw.login("admin", ADMIN_PASSWORD).await;
    let page: serde_json::Value = reqwest::Client::new()
        .get(gw.admin_url(&format!("/api/logs?request_id={id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let log_id = &page["items"][0]["id"];
    let detail: serde_json::Value = reqwest::Client::new()
        .get(gw.admin_url(&format!("/api/logs/{log_id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        detail["model"].as_str().unwrap().ends_with("…[truncated 4746 bytes]"),
        "{detail}"
    );
    assert!(detail["path"].as_str().unwrap().contains("…[truncated "));
}

#[tokio::test]
async fn the_audit_store_stays_under_max_bytes() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(
        &config(&mock, "  capture_body: true\n  max_bytes: 256KiB\n"),
        &[("r.yaml", ROUTES)],
    )
    .await;
    let (_, secret) = gw.create_key(&[]);
    gw.wait_key(&secret, "/big/v1/chat/completions").await;
    let client = reqwest::Client::new();
    let filler = "f".repeat(3000);
    let mut sizes = Vec::new();
    // 4,000 rows with a 3 KB body and a 3 KB header: over 16 MiB without a budget.
    for round in 0..8 {
        let statuses: Vec<u16> = stream::iter(0..500)
            .map(|i| {
                let req = client
                    .post(gw.url(&format!("/big/v1/chat/completions?round={round}&i={i}")))
                    .bearer_auth(&secret)
                    .header("x-filler", &filler)
                    .json(&serde_json::json!({"model": "m", "messages": [{"role": "user", "content": filler}]}));
                async move { req.send().await.unwrap().status().as_u16() }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        assert!(statuses.iter().all(|s| *s == 200));
        settle(&gw).await;
        sizes.push(std::fs::metadata(gw.db_path()).unwrap().len());
    }
    let rows = gw.audit_rows().len();
    let m = gw.metrics().await;
    let deleted = metric(&m, "fastgate_audit_budget_deleted_total");
    let wal = std::fs::metadata(gw.db_path().with_extension("db-wal")).map_or(0, |m| m.len());
    eprintln!(
        "4,000 rows (3 KB body and header each) under a 256 KiB budget: file sizes per 500 rows {sizes:?}, WAL {wal} bytes, {rows} rows kept, {deleted} deleted by the budget"
    );
    assert!(deleted > 3000, "{deleted} rows deleted");
    assert!(rows < 1000, "{rows} rows kept");
    // Over 16 MiB written: the file's high-water mark is the budget plus
    // about one write batch, never the sum of the rows.
    let most = *sizes.iter().max().unwrap();
    assert!(most < 1024 * 1024, "the file grew to {most} bytes: {sizes:?}");
}

/// Send raw bytes on a fresh connection; the answer's status code (0 if none).
async fn raw_status(port: u16, request: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn invalid_utf8_and_nul_on_the_wire_never_break_a_row() {
    let mock = MockUpstream::start().await;
    // Every refusal kept, so each request below has its row to check.
    let gw = Gateway::start(&config(&mock, "  refused: all\n"), &[("r.yaml", ROUTES)]).await;
    let requests: [&[u8]; 4] = [
        b"GET /nowhere/\xff\xfe?q=\xff HTTP/1.1\r\nHost: x\r\nUser-Agent: a\xffb\r\nConnection: close\r\n\r\n",
        b"GET /nowhere/nul HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\nConnection: close\r\n\r\n",
        b"GET /nowhere/\x00 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer fg_\xff\x00\r\nX-Bin: \xc3\x28\xa0\xa1\r\nConnection: close\r\n\r\n",
    ];
    let mut statuses = Vec::new();
    for r in requests {
        statuses.push(raw_status(gw.port, r).await);
    }
    eprintln!("raw requests with invalid UTF-8 / NUL answered {statuses:?}");
    // Whatever the parser refuses is refused with 400; what passes is ours.
    assert!(statuses.iter().all(|s| matches!(s, 400 | 401 | 404)), "{statuses:?}");
    let answered = statuses.iter().filter(|s| **s != 400).count();
    settle(&gw).await;
    let rows = gw.audit_rows();
    assert!(rows.len() >= answered, "{} rows for {answered} answers", rows.len());
    eprintln!("paths stored: {:?}", rows.iter().map(|r| &r.path).collect::<Vec<_>>());
    for row in &rows {
        let json = serde_json::to_string(row).unwrap();
        assert!(!json.contains("\\u0000"), "a NUL was stored: {json}");
        if let Some(h) = &row.request_headers {
            serde_json::from_str::<serde_json::Value>(h).unwrap();
        }
    }
    // Still serving.
    let r = reqwest::get(gw.url("/nowhere")).await.unwrap();
    assert_eq!(r.status(), 404);
}
