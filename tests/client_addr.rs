//! The client's real address behind load balancers, from the outside:
//! `X-Forwarded-For` believed only from `server.trusted_proxies`, PROXY
//! protocol v1/v2 on plain and TLS listeners, the address in the audit row
//! and the log line, per-client rate limits on routes without keys, and
//! forwarding headers sent upstream only where configured.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Gateway, MockUpstream, tls::Ca};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A gateway with these `server:` keys, the routes above and `mock` behind them.
async fn gateway(mock: &MockUpstream, server: &str) -> Gateway {
    Gateway::start_with_server(server, &config(mock), &[("r.yaml", ROUTES)]).await
}

fn config(mock: &MockUpstream) -> String {
    format!(
        "upstreams:\n  private: {{provider: http, endpoints: ['{url}']}}\n  selfhosted: {{provider: http, endpoints: ['{url}'], forwarded_headers: true}}\n",
        url = mock.url()
    )
}

const ROUTES: &str = "routes:\n  - { name: private, match: { path: '/p/{*rest}' }, auth: none, upstream: private, transform: { strip_prefix: /p } }\n  - { name: selfhosted, match: { path: '/s/{*rest}' }, auth: none, upstream: selfhosted, transform: { strip_prefix: /s } }\n  - { name: limited, match: { path: '/l/{*rest}' }, auth: none, upstream: private, transform: { strip_prefix: /l }, rate_limit: { rpm: 2 } }\n";

/// GET `path` with `X-Forwarded-For: xff`; (status, request id).
async fn get(gw: &Gateway, path: &str, xff: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .get(gw.url(path))
        .header("x-forwarded-for", xff)
        .header("x-real-ip", "6.6.6.6")
        .send()
        .await
        .unwrap();
    (
        r.status().as_u16(),
        r.headers()["x-request-id"].to_str().unwrap().to_string(),
    )
}

async fn client_ip_of(gw: &Gateway, id: &String) -> Option<String> {
    let rows = gw.wait_audit_ids([id]).await;
    rows.into_iter().find(|r| &r.request_id == id).and_then(|r| r.client_ip)
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let mock = MockUpstream::start().await;
    // This test's client (127.0.0.1) is not among the trusted proxies.
    let untrusted = gateway(&mock, "  trusted_proxies: [10.0.0.0/8]\n").await;
    let (status, id) = get(&untrusted, "/p/json", "198.51.100.4").await;
    assert_eq!(status, 200);
    assert_eq!(
        client_ip_of(&untrusted, &id).await.as_deref(),
        Some("127.0.0.1"),
        "spoofed"
    );

    let trusted = gateway(&mock, "  trusted_proxies: [127.0.0.0/8, 10.0.0.0/8]\n").await;
    // The right-most hop that is not a trusted proxy; the left part, which
    // the client wrote itself, is not believed.
    let (status, id) = get(&trusted, "/p/json", "6.6.6.6, 198.51.100.4, 10.1.1.1").await;
    assert_eq!(status, 200);
    assert_eq!(client_ip_of(&trusted, &id).await.as_deref(), Some("198.51.100.4"));
    assert!(
        trusted.logs().contains("client_ip=198.51.100.4"),
        "the log line names the client:\n{}",
        trusted.logs()
    );
    // Privacy by default: no forwarding header reaches an upstream that did
    // not ask for them, not even the client's own.
    let seen = mock.last();
    for h in ["x-forwarded-for", "x-forwarded-proto", "x-real-ip"] {
        assert_eq!(seen.header(h), None, "{h} was forwarded");
    }
    // An upstream with `forwarded_headers: true` gets the chain and the scheme.
    let (status, _) = get(&trusted, "/s/json", "6.6.6.6, 198.51.100.4, 10.1.1.1").await;
    assert_eq!(status, 200);
    let seen = mock.last();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("6.6.6.6, 198.51.100.4, 10.1.1.1, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-real-ip"), None);
    // From an untrusted peer, the upstream hears only the peer.
    let (status, _) = get(&untrusted, "/s/json", "198.51.100.4").await;
    assert_eq!(status, 200);
    assert_eq!(mock.last().header("x-forwarded-for"), Some("127.0.0.1"));
}

#[tokio::test]
async fn a_route_without_keys_is_rate_limited_per_client_address() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "  trusted_proxies: [127.0.0.1]\n").await;
    assert_eq!(get(&gw, "/l/json", "198.51.100.4").await.0, 200);
    assert_eq!(get(&gw, "/l/json", "198.51.100.4").await.0, 200);
    let r = reqwest::Client::new()
        .get(gw.url("/l/json"))
        .header("x-forwarded-for", "198.51.100.4")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("per client address"),
        "{body}"
    );
    // Another client behind the same proxy has its own allowance.
    assert_eq!(get(&gw, "/l/json", "198.51.100.5").await.0, 200);
}

/// Write `preamble`, then each request in turn on the same connection,
/// reading each answer whole (by its content-length) before the next; the
/// last request should say `Connection: close`.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, preamble: &[u8], requests: &[&str]) -> String {
    stream.write_all(preamble).await.unwrap();
    let mut all = String::new();
    for request in requests {
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let read = async {
            loop {
                let n = stream.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&out);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length: ")
                                .map(str::to_string)
                        })
                        .and_then(|v| v.trim().parse::<usize>().ok());
                    if len.is_some_and(|n| body.len() >= n) {
                        break;
                    }
                }
            }
        };
        // A server that neither answers nor closes fails the test: what was
        // read so far is not an answer.
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .unwrap_or_else(|_| panic!("no whole answer within 5 s to {request:?}"));
        all.push_str(&String::from_utf8_lossy(&out));
    }
    all
}

fn request_ids(answer: &str) -> Vec<String> {
    answer
        .lines()
        .filter_map(|l| l.strip_prefix("x-request-id: "))
        .map(str::to_string)
        .collect()
}

const TWO_REQUESTS: &[&str] = &[
    "GET /p/json HTTP/1.1\r\nHost: gw\r\n\r\n",
    "GET /p/json HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
];
const ONE_REQUEST: &[&str] = &["GET /p/json HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"];

#[tokio::test]
async fn proxy_protocol_v1_and_v2_name_the_client_of_the_whole_connection() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "  trusted_proxies: [127.0.0.1]\n  proxy_protocol: true\n").await;
    let connect = || tokio::net::TcpStream::connect(("127.0.0.1", gw.port));

    // v1, then two keep-alive requests on the same connection.
    let mut s = connect().await.unwrap();
    let answer = exchange(&mut s, b"PROXY TCP4 198.51.100.9 127.0.0.1 40000 80\r\n", TWO_REQUESTS).await;
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
    for id in request_ids(&answer) {
        assert_eq!(client_ip_of(&gw, &id).await.as_deref(), Some("198.51.100.9"));
    }

    // v2 (binary), IPv6.
    let header = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (
            "[2001:db8::9]:40000".parse::<std::net::SocketAddr>().unwrap(),
            "[2001:db8::1]:80".parse::<std::net::SocketAddr>().unwrap(),
        ),
    )
    .build()
    .unwrap();
    let mut s = connect().await.unwrap();
    let answer = exchange(&mut s, &header, TWO_REQUESTS).await;
    let ids = request_ids(&answer);
    assert_eq!(ids.len(), 2, "{answer}");
    for id in &ids {
        assert_eq!(client_ip_of(&gw, id).await.as_deref(), Some("2001:db8::9"));
    }

    // A balancer's health check (v2 LOCAL) is answered as the peer itself.
    let local = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Local,
        ppp::v2::Protocol::Unspecified,
        ppp::v2::Addresses::Unspecified,
    )
    .build()
    .unwrap();
    let mut s = connect().await.unwrap();
    let answer = exchange(&mut s, &local, ONE_REQUEST).await;
    let id = request_ids(&answer).pop().expect(&answer);
    assert_eq!(client_ip_of(&gw, &id).await.as_deref(), Some("127.0.0.1"));

    // A trusted peer that sends no PROXY header is not served.
    let mut s = connect().await.unwrap();
    let answer = exchange(&mut s, b"", ONE_REQUEST).await;
    assert!(!answer.contains("200"), "{answer}");
}

#[tokio::test]
async fn a_proxy_header_from_an_untrusted_peer_is_not_believed() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "  trusted_proxies: [10.0.0.0/8]\n  proxy_protocol: true\n").await;
    // Plain HTTP from an untrusted peer is served as usual...
    let (status, id) = get(&gw, "/p/json", "198.51.100.4").await;
    assert_eq!(status, 200);
    assert_eq!(client_ip_of(&gw, &id).await.as_deref(), Some("127.0.0.1"));
    // ...and a PROXY header from it is not read as one: it is parsed as an
    // HTTP request line, a bad one (believed, the request would be served).
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    let answer = exchange(&mut s, b"PROXY TCP4 198.51.100.9 127.0.0.1 40000 80\r\n", ONE_REQUEST).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    // A later request's row is written after any row of the PROXY attempt
    // (one ordered writer): waiting for it, the log holds every row.
    let (status, last) = get(&gw, "/p/json", "198.51.100.4").await;
    assert_eq!(status, 200);
    let rows = gw.wait_audit_ids([&id, &last]).await;
    let ips: Vec<_> = rows.iter().map(|r| r.client_ip.as_deref()).collect();
    assert_eq!(
        ips,
        [Some("127.0.0.1"), Some("127.0.0.1")],
        "only the two plain requests were served, both as the peer"
    );
}

/// A TLS connection to `gw` behind a PROXY v1 header naming 198.51.100.11.
async fn proxied_tls(gw: &Gateway, ca: &Ca) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    tcp.write_all(b"PROXY TCP4 198.51.100.11 127.0.0.1 40000 443\r\n")
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(ca.client_config())
        .connect("a.test".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn proxy_protocol_before_tls() {
    let mock = MockUpstream::start().await;
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("FastGate test CA");
    ca.leaf(certs.path(), "a", &["a.test"], 90);
    let server = format!(
        "  trusted_proxies: [127.0.0.1]\n  proxy_protocol: true\n  tls: {{ cert: {d}/a.pem, key: {d}/a.key }}\n",
        d = certs.path().display()
    );
    let gw = gateway(&mock, &server).await;
    let mut tls = proxied_tls(&gw, &ca).await;
    let answer = exchange(&mut tls, b"", TWO_REQUESTS).await;
    let ids = request_ids(&answer);
    assert_eq!(ids.len(), 2, "{answer}");
    for id in &ids {
        assert_eq!(client_ip_of(&gw, id).await.as_deref(), Some("198.51.100.11"));
    }
    // The scheme reaches an upstream that asked for forwarding headers.
    let mut tls = proxied_tls(&gw, &ca).await;
    let answer = exchange(
        &mut tls,
        b"",
        &["GET /s/json HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"],
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = mock.last();
    assert_eq!(seen.header("x-forwarded-for"), Some("198.51.100.11"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
}

#[tokio::test]
async fn admin_login_throttling_counts_the_client_behind_a_trusted_proxy() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "  trusted_proxies: [127.0.0.1]\n").await;
    let c = reqwest::Client::new();
    let login = |client: &'static str, password: &'static str| {
        c.post(gw.admin_url("/api/auth/login"))
            .header("x-forwarded-for", client)
            .json(&serde_json::json!({"username": "admin", "password": password}))
            .send()
    };
    // One client behind the proxy fails until it is throttled...
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(login("198.51.100.4", "wrong").await.unwrap().status().as_u16());
    }
    assert_eq!(statuses[..5], [401; 5], "{statuses:?}");
    assert_eq!(statuses[5], 429, "{statuses:?}");
    assert_eq!(
        login("198.51.100.4", common::ADMIN_PASSWORD).await.unwrap().status(),
        429
    );
    // ...while another client behind the same proxy logs in.
    assert_eq!(
        login("198.51.100.5", common::ADMIN_PASSWORD).await.unwrap().status(),
        200
    );
}
