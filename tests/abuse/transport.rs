//! Attacks on transport: see docs/security.md. Each test sets small
//! `server.limits` and plays the attack with a raw TCP client, asserting
//! the bound (time to close, status, what the upstream saw, RSS growth,
//! the refusal counters in `/metrics`).

use crate::common::{Gateway, MockUpstream};
use std::time::{Duration, Instant};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const ROUTES: &str = r#"
routes:
  - name: chat
    match: { path: /v1/chat/completions, methods: [POST] }
    format: openai
    upstream: oai
  - name: messages
    match: { path: /v1/messages }
    format: anthropic
    upstream: oai
  - name: plain
    match: { path: "/plain/{*rest}" }
    auth: none
    upstream: plain
    transform: { strip_prefix: /plain }
  - name: plain-buffered
    match: { path: "/buffered/{*rest}" }
    auth: none
    upstream: plain
    retries: 1
    transform: { strip_prefix: /buffered }
"#;

/// A gateway with `limits` (YAML keys under `server.limits`, four spaces
/// deep) in front of a recording mock.
async fn start(limits: &str) -> (Gateway, MockUpstream) {
    let mock = MockUpstream::start().await;
    let server = format!("  limits:\n{limits}");
    let gw = Gateway::start_with_server(&server, &config(&mock), &[("r.yaml", ROUTES)]).await;
    (gw, mock)
}

fn config(mock: &MockUpstream) -> String {
    format!(
        "upstreams:\n  oai:\n    provider: openai\n    endpoints: ['{u}']\n    key_pool: oai\n  plain:\n    provider: http\n    endpoints: ['{u}']\nkey_pools:\n  oai:\n    keys: [sk-pool-one]\n",
        u = mock.url()
    )
}

async fn connect(gw: &Gateway) -> TcpStream {
    TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap()
}

/// Read until the server closes (EOF or reset) or `max` passes: what was
/// read and when the connection ended, `None` if it was still open.
async fn read_until_closed(s: &mut TcpStream, max: Duration) -> (Vec<u8>, Option<Duration>) {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = max.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return (out, None),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, Some(start.elapsed())),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Read one HTTP/1.1 response with a `Content-Length` body: (status, head,
/// body). Panics on a timeout or a close: the caller expects an answer.
async fn read_response(s: &mut TcpStream) -> (u16, String, Vec<u8>) {
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).into_owned();
            let status: u16 = head[9..12].parse().unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            let body_start = end + 4;
            while data.len() < body_start + len {
                let n = tokio::time::timeout_at(deadline.into(), s.read(&mut buf))
                    .await
                    .expect("timed out reading a response body")
                    .unwrap();
                assert!(n > 0, "closed mid-body");
                data.extend_from_slice(&buf[..n]);
            }
            return (status, head, data[body_start..body_start + len].to_vec());
        }
        let n = tokio::time::timeout_at(deadline.into(), s.read(&mut buf))
            .await
            .expect("timed out reading a response")
            .unwrap();
        assert!(n > 0, "closed before a response: {}", String::from_utf8_lossy(&data));
        data.extend_from_slice(&buf[..n]);
    }
}

/// `fastgate_transport_refusals_total{reason=...}` now (0 when absent).
async fn refusals(gw: &Gateway, reason: &str) -> u64 {
    let text = gw.metrics().await;
    let prefix = format!("fastgate_transport_refusals_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn a_half_sent_header_is_closed_after_client_header_timeout() {
    let (gw, mock) = start("    client_header_timeout: 2s\n").await;
    let mut s = connect(&gw).await;
    s.write_all(b"GET /health HTTP/1.1\r\nX-A").await.unwrap();
    // Still open after 1 s: the timeout is not shorter than configured.
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(1)).await;
    assert_eq!(closed, None, "closed before client_header_timeout");
    let (out, closed) = read_until_closed(&mut s, Duration::from_secs(4)).await;
    let closed = closed.expect("a half-sent header kept its connection open over 5 s");
    assert!(out.is_empty(), "nothing is answered: {}", String::from_utf8_lossy(&out));
    eprintln!("half-sent header closed {:?} after the first second", closed);
    assert_eq!(refusals(&gw, "header_timeout").await, 1);
    assert!(mock.seen().is_empty());
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_client_header_timeout() {
    let (gw, _mock) = start("    client_header_timeout: 2s\n    keepalive_timeout: 60s\n").await;
    let mut s = connect(&gw).await;
    let start = Instant::now();
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "an empty connection stayed open 5 s");
    assert!(start.elapsed() >= Duration::from_millis(1500), "{:?}", start.elapsed());
}

#[tokio::test]
async fn a_header_dripped_byte_by_byte_is_cut_at_the_whole_header_deadline() {
    let (gw, _mock) = start("    client_header_timeout: 2s\n    keepalive_timeout: 60s\n").await;
    let mut s = connect(&gw).await;
    let start = Instant::now();
    let drip = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    // One byte every 500 ms: no single read waits long, the whole does.
    let mut closed_at = None;
    for b in drip {
        if s.write_all(&[*b]).await.is_err() {
            closed_at = Some(start.elapsed());
            break;
        }
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed_at = Some(start.elapsed());
                break;
            }
            Ok(Ok(n)) => panic!("answered a half header: {}", String::from_utf8_lossy(&buf[..n])),
        }
        if start.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    let closed_at = closed_at.expect("a dripped header was not cut within 8 s");
    eprintln!("dripped header cut after {closed_at:?}");
    assert!(closed_at >= Duration::from_millis(1500), "{closed_at:?}");
    assert!(closed_at <= Duration::from_secs(5), "{closed_at:?}");
    assert_eq!(refusals(&gw, "header_timeout").await, 1);
}

#[tokio::test]
async fn keep_alive_requests_get_their_own_header_clock_and_idle_connections_close() {
    let (gw, mock) = start("    client_header_timeout: 2s\n    keepalive_timeout: 3s\n").await;
    let mut s = connect(&gw).await;
    // 20 requests over ~4 s on one connection: longer than the header
    // timeout in total, never within one request.
    let start = Instant::now();
    for i in 0..20 {
        let req = format!("GET /plain/ping{i} HTTP/1.1\r\nHost: x\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let (status, _, _) = read_response(&mut s).await;
        assert_eq!(status, 200, "request {i}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(start.elapsed() > Duration::from_secs(3));
    assert_eq!(mock.seen().len(), 20, "all on one connection");
    assert_eq!(refusals(&gw, "header_timeout").await, 0, "no false timeouts");

    // A later request's clock starts at its first byte: after 1.5 s idle,
    // a half header is still cut about 2 s later, not at once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.write_all(b"GET /plain/x HTTP/1.1\r\nX-").await.unwrap();
    let sent = Instant::now();
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "a half header on a kept-alive connection stayed open");
    assert!(sent.elapsed() >= Duration::from_millis(1500), "{:?}", sent.elapsed());
    assert_eq!(refusals(&gw, "header_timeout").await, 1);

    // An idle kept-alive connection closes after keepalive_timeout.
    let mut s = connect(&gw).await;
    s.write_all(b"GET /plain/idle HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await.0, 200);
    let idle = Instant::now();
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(7)).await;
    let closed = closed.expect("an idle keep-alive connection stayed open 7 s");
    eprintln!("idle keep-alive closed after {:?}", idle.elapsed());
    assert!(closed >= Duration::from_millis(2500), "{closed:?}");
    assert!(closed <= Duration::from_millis(5000), "{closed:?}");
}

#[tokio::test]
async fn oversized_headers_get_431_and_long_uris_414_in_the_clients_shape() {
    let (gw, mock) = start("").await; // nginx's defaults: 32 KiB, 8 KiB, 8 KiB
    let key = gw.create_key(&[]).1;
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

    // 60 headers of 4 KB: cut by the connection guard while reading.
    let mut req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for i in 0..60 {
        req.push_str(&format!("X-Pad-{i}: {}\r\n", "a".repeat(4000)));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let started = Instant::now();
    let mut s = connect(&gw).await;
    let _ = s.write_all(req.as_bytes()).await; // may be cut mid-write
    let (out, closed) = read_until_closed(&mut s, Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(closed.is_some(), "still open");
    assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
    let json: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(json["error"]["code"], "header_too_large", "OpenAI shape: {json}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // One header just over the per-header cap: refused by the proxy from
    // the parsed header, in the Anthropic shape on /v1/messages.
    let req = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: {key}\r\nanthropic-version: 2023-06-01\r\nX-Big: {}\r\nContent-Length: 2\r\n\r\n{{}}",
        "b".repeat(9000)
    );
    let mut s = connect(&gw).await;
    s.write_all(req.as_bytes()).await.unwrap();
    let (status, _, body) = read_response(&mut s).await;
    assert_eq!(status, 431);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["type"], "error", "Anthropic shape: {json}");

    // A 9 KiB target: 414 (cut while reading), and 8.5 KiB (from the
    // parsed header): both in the OpenAI shape.
    for len in [9 * 1024, 8 * 1024 + 512] {
        let req = format!(
            "POST /v1/chat/completions?q={} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}",
            "u".repeat(len)
        );
        let mut s = connect(&gw).await;
        let _ = s.write_all(req.as_bytes()).await;
        let (out, _) = read_until_closed(&mut s, Duration::from_secs(3)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 414 "), "{len}: {text}");
        let json: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(json["error"]["code"], "uri_too_long", "{json}");
    }
    assert!(mock.seen().is_empty(), "nothing reached the upstream");
    assert_eq!(refusals(&gw, "header_too_large").await, 2);
    assert_eq!(refusals(&gw, "uri_too_long").await, 2);
}

#[tokio::test]
async fn one_mebibyte_headers_are_refused_quickly_without_buffering_them() {
    let (gw, mock) = start("").await;
    let pid = gw.child.id();
    // Warm up the worker threads and allocator with one normal request.
    let mut s = connect(&gw).await;
    s.write_all(b"GET /plain/warm HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await.0, 200);
    let before = crate::common::rss_kib(pid);

    // 48 connections each send 1 MiB of one header and never finish it:
    // without a bound each would hold a megabyte until a timeout.
    let big = format!(
        "GET /plain/x HTTP/1.1\r\nHost: x\r\nX-Huge: {}",
        "h".repeat(1024 * 1024)
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..48 {
        let big = big.clone();
        let port = gw.port;
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let _ = s.write_all(big.as_bytes()).await;
            read_until_closed(&mut s, Duration::from_secs(5)).await
        }));
    }
    let mut peak = 0;
    let mut answered = 0;
    for t in tasks {
        let (out, closed) = t.await.unwrap();
        assert!(closed.is_some(), "a 1 MiB header kept its connection open 5 s");
        peak = peak.max(crate::common::rss_kib(pid));
        let text = String::from_utf8_lossy(&out);
        if !text.is_empty() {
            assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
            answered += 1;
        }
    }
    let took = started.elapsed();
    let grown = peak.saturating_sub(before);
    eprintln!("48 x 1 MiB headers: refused in {took:?}, {answered} with a 431, RSS +{grown} KiB");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(grown < 16 * 1024, "RSS grew {grown} KiB for 48 MiB of headers");
    assert_eq!(refusals(&gw, "header_too_large").await, 48);
    assert_eq!(mock.seen().len(), 1, "only the warm-up reached the upstream");
}

#[tokio::test]
async fn connections_over_the_per_client_cap_are_refused_and_the_cap_frees() {
    let (gw, _mock) = start("    max_connections_per_client: 4\n").await;
    let mut held = Vec::new();
    for i in 0..4 {
        let mut s = connect(&gw).await;
        s.write_all(format!("GET /plain/a{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(read_response(&mut s).await.0, 200);
        held.push(s);
    }
    for _ in 0..3 {
        let mut s = connect(&gw).await;
        let _ = s.write_all(b"GET /plain/extra HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let (out, closed) = read_until_closed(&mut s, Duration::from_secs(2)).await;
        assert!(closed.is_some(), "an extra connection was kept");
        let text = String::from_utf8_lossy(&out);
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 503 "), "{text}");
    }
    assert_eq!(refusals(&gw, "per_client_cap").await, 3);
    // The earlier connections are still served.
    for s in &mut held {
        s.write_all(b"GET /plain/again HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(s).await.0, 200);
    }
    drop(held);
    // Closed connections give their slots back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut fresh = Vec::new();
    for _ in 0..4 {
        let mut s = connect(&gw).await;
        s.write_all(b"GET /plain/fresh HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut s).await.0, 200);
        fresh.push(s);
    }
    assert_eq!(refusals(&gw, "per_client_cap").await, 3);
}

/// Send a request with `Expect: 100-continue` and hold the body back: the
/// interim answer must come first, then the body is sent and answered.
async fn expect_continue(gw: &Gateway, path: &str) -> (String, u16) {
    let body = r#"{"hello":"world"}"#;
    let mut s = connect(gw).await;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = [0u8; 256];
    // curl waits 1 s before sending anyway: the answer must come sooner.
    let n = tokio::time::timeout(Duration::from_millis(900), s.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{path}: no 100 Continue before the body"))
        .unwrap();
    let interim = String::from_utf8_lossy(&buf[..n]).into_owned();
    s.write_all(body.as_bytes()).await.unwrap();
    let (status, _, _) = read_response(&mut s).await;
    (interim, status)
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body_on_both_paths() {
    let (gw, mock) = start("").await;
    // FastGate's own forwarding (the body is read first: retries) and
    // Pingora's streaming path (the body goes upstream as it comes).
    for path in ["/buffered/echo", "/plain/echo"] {
        let (interim, status) = expect_continue(&gw, path).await;
        assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n", "{path}");
        assert_eq!(status, 200, "{path}");
        let seen = mock.last();
        assert_eq!(seen.body, r#"{"hello":"world"}"#, "{path}");
        assert_eq!(seen.header("expect"), None, "{path}: FastGate answered it");
    }
    // Refused without reading: the final status instead of 100.
    let mut s = connect(&gw).await;
    s.write_all(b"POST /plain/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let (status, _, _) = read_response(&mut s).await;
    assert_eq!(status, 413);
    assert_eq!(mock.seen().len(), 2);
}

#[tokio::test]
async fn tls_connections_that_stall_after_the_handshake_are_closed_too() {
    let mock = MockUpstream::start().await;
    let certs = tempfile::tempdir().unwrap();
    let ca = crate::common::tls::Ca::new("FastGate test CA");
    ca.leaf(certs.path(), "a", &["a.test"], 90);
    let server = format!(
        "  tls: {{ cert: {d}/a.pem, key: {d}/a.key }}\n  limits:\n    client_header_timeout: 2s\n    max_connections_per_client: 3\n",
        d = certs.path().display()
    );
    let gw = Gateway::start_with_server(&server, &config(&mock), &[("r.yaml", ROUTES)]).await;
    let tls = |alpn: &'static [u8]| {
        let mut config = (*ca.client_config()).clone();
        config.alpn_protocols = vec![alpn.to_vec()];
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let port = gw.port;
        async move {
            let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            connector.connect("a.test".try_into().unwrap(), tcp).await.unwrap()
        }
    };
    // HTTP/2 by ALPN, then no preface; HTTP/1.1, then half a header.
    let mut h2 = tls(b"h2").await;
    let mut h1 = tls(b"http/1.1").await;
    h1.write_all(b"GET /plain/x HTTP/1.1\r\nX-").await.unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 256];
    for (name, s) in [
        ("h2", &mut h2 as &mut (dyn tokio::io::AsyncRead + Unpin + Send)),
        ("http/1.1", &mut h1),
    ] {
        let closed = loop {
            match tokio::time::timeout(Duration::from_secs(6), s.read(&mut buf)).await {
                Err(_) => break false,
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(_)) => {} // HTTP/2 settings, a GOAWAY
            }
        };
        assert!(closed, "{name}: a stalled TLS connection stayed open");
        eprintln!("{name}: closed after {:?}", start.elapsed());
    }
    assert!(start.elapsed() >= Duration::from_millis(1500), "{:?}", start.elapsed());
    assert!(start.elapsed() <= Duration::from_secs(5), "{:?}", start.elapsed());
    assert_eq!(refusals(&gw, "header_timeout").await, 2);
    // The per-client cap holds on TLS too: 3 served, the 4th refused.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = tls(b"http/1.1").await;
        s.write_all(b"GET /plain/a HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        held.push(s);
    }
    let mut extra = tls(b"http/1.1").await;
    let _ = extra.write_all(b"GET /plain/a HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), extra.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 503 "), "{text}");
    assert_eq!(refusals(&gw, "per_client_cap").await, 1);
}

#[tokio::test]
async fn keepalive_timeout_zero_turns_keep_alive_off() {
    let (gw, _mock) = start("    keepalive_timeout: 0s\n").await;
    let mut s = connect(&gw).await;
    s.write_all(b"GET /plain/once HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, head, _) = read_response(&mut s).await;
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(2)).await;
    assert!(closed.is_some(), "the connection was kept");
}

#[tokio::test]
async fn a_trusted_proxys_connections_are_not_capped_per_address() {
    // An HTTP balancer's connection pool carries many clients.
    let mock = MockUpstream::start().await;
    let server = "  trusted_proxies: [127.0.0.1]\n  limits:\n    max_connections_per_client: 2\n";
    let gw = Gateway::start_with_server(server, &config(&mock), &[("r.yaml", ROUTES)]).await;
    let mut held = Vec::new();
    for i in 0..5 {
        let mut s = connect(&gw).await;
        s.write_all(
            format!("GET /plain/b{i} HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.{i}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(read_response(&mut s).await.0, 200, "connection {i}");
        held.push(s);
    }
    assert_eq!(refusals(&gw, "per_client_cap").await, 0);
}
