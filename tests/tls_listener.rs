//! The data plane over TLS (a private CA made here with rcgen): HTTP/1.1 and
//! HTTP/2 by ALPN, the certificate chosen by SNI, certificates reloaded
//! mid-traffic without dropping connections, SSE over HTTP/2 with
//! cancellation, h2c with prior knowledge, and `fastgate check` on TLS files.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Gateway, MockUpstream, tls::Ca};
use futures_util::StreamExt;
use serde_json::json;
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};
use tokio_rustls::rustls::{self, pki_types::CertificateDer};

fn config(mock: &MockUpstream) -> String {
    format!(
        "upstreams:\n  oai: {{provider: openai, endpoints: ['{url}'], key_pool: p}}\n  plain: {{provider: http, endpoints: ['{url}']}}\nkey_pools:\n  p: {{keys: [sk-tls-test]}}\n",
        url = mock.url()
    )
}

const ROUTES: &str = "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, auth: none, format: openai, upstream: oai }\n  - { name: plain, match: { path: '/{*rest}' }, priority: 200, auth: none, upstream: plain }\n";

fn tls_server(dir: &Path, stems: &[&str]) -> String {
    let mut s = String::from("  tls:\n    certificates:\n");
    for stem in stems {
        s.push_str(&format!(
            "      - {{ cert: {d}/{stem}.pem, key: {d}/{stem}.key }}\n",
            d = dir.display()
        ));
    }
    s
}

/// A client that trusts `ca` and resolves every test name to the gateway.
fn client(ca: &Ca, port: u16, h1_only: bool) -> reqwest::Client {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca.reqwest_root())
        .resolve("a.test", addr)
        .resolve("b.test", addr)
        .resolve("api.c.test", addr);
    if h1_only {
        b = b.http1_only();
    }
    b.build().unwrap()
}

/// The end-entity certificate a fresh handshake for `sni` is served.
async fn served_certificate(port: u16, sni: &str) -> CertificateDer<'static> {
    #[derive(Debug)]
    struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(sni.to_string().try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

#[tokio::test]
async fn tls_serves_http1_and_http2_by_alpn_with_the_certificate_sni_asks_for() {
    let mock = MockUpstream::start().await;
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("FastGate test CA");
    let a = ca.leaf(certs.path(), "a", &["a.test"], 90);
    let b = ca.leaf(certs.path(), "b", &["b.test", "*.c.test"], 90);
    let gw = Gateway::start_with_server(
        &tls_server(certs.path(), &["a", "b"]),
        &config(&mock),
        &[("r.yaml", ROUTES)],
    )
    .await;

    for (host, h1_only, version) in [
        ("a.test", true, reqwest::Version::HTTP_11),
        ("a.test", false, reqwest::Version::HTTP_2),
        ("b.test", false, reqwest::Version::HTTP_2),
        ("api.c.test", true, reqwest::Version::HTTP_11),
    ] {
        // The client verifies the name: a wrong certificate fails the request.
        let r = client(&ca, gw.port, h1_only)
            .post(format!("https://{host}:{}/v1/chat/completions", gw.port))
            .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{host}: {e:?}\n{}", gw.logs()));
        assert_eq!(r.status(), 200, "{host}");
        assert_eq!(r.version(), version, "{host}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(body["choices"][0]["message"]["content"].is_string(), "{body}");
        assert_eq!(mock.last().header("authorization"), Some("Bearer sk-tls-test"));
    }
    assert_eq!(served_certificate(gw.port, "a.test").await, a);
    assert_eq!(served_certificate(gw.port, "api.c.test").await, b);
    // A name no certificate covers gets the first one.
    assert_eq!(served_certificate(gw.port, "unknown.test").await, a);
    // Plain HTTP on the TLS port is not answered as HTTP.
    let plain = reqwest::Client::new().get(gw.url("/json")).send().await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
}

#[tokio::test]
async fn certificates_reload_on_file_change_and_sighup_without_dropping_connections() {
    let mock = MockUpstream::start().await;
    mock.behaviour.sse_interval_ms.store(250, Ordering::SeqCst);
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("FastGate test CA");
    let first = ca.leaf(certs.path(), "a", &["a.test"], 90);
    let gw = Gateway::start_with_server(&tls_server(certs.path(), &["a"]), &config(&mock), &[("r.yaml", ROUTES)]).await;
    assert_eq!(served_certificate(gw.port, "a.test").await, first);

    // A stream on an HTTP/2 connection that stays open across the reloads.
    let h2 = client(&ca, gw.port, false);
    let url = format!("https://a.test:{}/sse", gw.port);
    let r = h2.get(&url).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let mut stream = r.bytes_stream();
    let mut text = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();

    // Renewal by rename: picked up by the file watcher.
    let second = ca.leaf(certs.path(), "a", &["a.test"], 90);
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_certificate(gw.port, "a.test").await != second {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A broken file is refused whole; the last good certificate keeps serving.
    std::fs::write(certs.path().join("a.key"), "-----BEGIN PRIVATE KEY-----\nbroken\n").unwrap();
    gw.signal("HUP");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(served_certificate(gw.port, "a.test").await, second);
    assert!(gw.logs().contains("TLS certificates not reloaded"), "{}", gw.logs());
    // Fixed, then SIGHUP.
    let third = ca.leaf(certs.path(), "a", &["a.test"], 90);
    gw.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_certificate(gw.port, "a.test").await != third {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload the certificate\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The admin API's config reload reads the certificates too (like SIGHUP).
    let fourth = ca.leaf(certs.path(), "a", &["a.test"], 90);
    let token = gw.login("admin", common::ADMIN_PASSWORD).await;
    let r = reqwest::Client::new()
        .post(gw.admin_url("/api/config/reload"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(served_certificate(gw.port, "a.test").await, fourth);

    // The stream that began before any reload finished whole, on its connection.
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.expect("the reload cut the stream")).unwrap());
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // And the same client (its connection) still works.
    assert_eq!(
        h2.get(format!("https://a.test:{}/json", gw.port))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn sse_over_http2_is_unbuffered_and_a_reset_stream_releases_the_upstream_and_the_key() {
    let mock = MockUpstream::start().await;
    mock.behaviour.sse_interval_ms.store(200, Ordering::SeqCst);
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("FastGate test CA");
    ca.leaf(certs.path(), "a", &["a.test"], 90);
    let gw = Gateway::start_with_server(&tls_server(certs.path(), &["a"]), &config(&mock), &[("r.yaml", ROUTES)]).await;
    let h2 = client(&ca, gw.port, false);
    let url = format!("https://a.test:{}/v1/chat/completions", gw.port);
    let body = json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]});

    // Both forwarding paths: FastGate's own exchange (chat) and Pingora's (plain).
    for (what, req) in [
        ("chat", h2.post(&url).json(&body)),
        ("plain", h2.get(format!("https://a.test:{}/sse", gw.port))),
    ] {
        let started = Instant::now();
        let r = req.send().await.unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        let mut arrivals = Vec::new();
        let mut s = r.bytes_stream();
        while let Some(chunk) = s.next().await {
            chunk.unwrap();
            arrivals.push(started.elapsed());
        }
        assert!(arrivals.len() >= 3, "{what}: {arrivals:?}");
        assert!(
            *arrivals.last().unwrap() - arrivals[0] > Duration::from_millis(400),
            "{what}: chunks arrived all at once: {arrivals:?}"
        );
    }

    // RST_STREAM: dropping the response mid-stream cancels the upstream
    // request and gives the pool key back, on a connection that stays up;
    // on both forwarding paths.
    for (what, req) in [
        ("chat", h2.post(&url).json(&body)),
        ("plain", h2.get(format!("https://a.test:{}/sse", gw.port))),
    ] {
        mock.behaviour.stream_aborted.store(false, Ordering::SeqCst);
        let r = req.send().await.unwrap();
        let mut s = r.bytes_stream();
        s.next().await.unwrap().unwrap();
        drop(s);
        let deadline = Instant::now() + Duration::from_secs(3);
        while !mock.behaviour.stream_aborted.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "{what}: the upstream kept streaming to nobody\n{}",
                gw.logs()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let metrics = common::eventually_text(
        || reqwest::Client::new().get(gw.admin_url("/metrics")),
        |m| m.contains("fastgate_pool_in_flight{pool=\"p\"} 0") && m.contains("fastgate_requests_in_flight 0"),
    )
    .await;
    assert!(
        metrics.contains("fastgate_pool_in_flight{pool=\"p\"} 0") && metrics.contains("fastgate_requests_in_flight 0"),
        "the lease or the request was not released:\n{metrics}"
    );
    assert_eq!(
        h2.get(format!("https://a.test:{}/json", gw.port))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn h2c_with_prior_knowledge_on_a_plain_listener() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start_with_server("  h2c: true\n", &config(&mock), &[("r.yaml", ROUTES)]).await;
    let h2c = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let r = h2c
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200, "{:?} {}", mock.seen().len(), gw.logs());
    // HTTP/1.1 keeps working on the same port.
    let r = reqwest::Client::new().get(gw.url("/json")).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.version()), (200, reqwest::Version::HTTP_11));
}

#[test]
fn check_validates_certificate_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("FastGate test CA");
    ca.leaf(dir.path(), "good", &["a.test"], 90);
    ca.leaf(dir.path(), "soon", &["soon.test"], 3);
    ca.leaf(dir.path(), "other", &["o.test"], 90);
    std::fs::create_dir(dir.path().join("routes.d")).unwrap();
    let write = |server_tls: &str| -> PathBuf {
        let path = dir.path().join("fastgate.yaml");
        std::fs::write(
            &path,
            format!(
                "server:\n  listen: 127.0.0.1:0\n{server_tls}database:\n  path: {d}/fg.db\nroutes_dir: {d}/routes.d\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        path
    };
    let d = dir.path().display();

    let (ok, out, err) = common::check(
        &write(&format!("  tls: {{ cert: {d}/good.pem, key: {d}/good.key }}\n")),
        dir.path(),
    );
    assert!(ok, "{err}");
    assert!(out.contains("TLS with 1 certificate(s)"), "{out}");
    assert!(!err.contains("warning"), "{err}");

    let (ok, _, err) = common::check(&write(&tls_server(dir.path(), &["good", "soon"])), dir.path());
    assert!(ok, "expiring soon is a warning, not an error: {err}");
    assert!(err.contains("soon.pem") && err.contains("expires in"), "{err}");

    let (ok, _, err) = common::check(
        &write(&format!("  tls: {{ cert: {d}/good.pem, key: {d}/other.key }}\n")),
        dir.path(),
    );
    assert!(!ok);
    assert!(err.contains("other.key") && err.contains("does not belong"), "{err}");

    let (ok, _, err) = common::check(
        &write(&format!("  tls: {{ cert: {d}/missing.pem, key: {d}/good.key }}\n")),
        dir.path(),
    );
    assert!(!ok);
    assert!(err.contains("missing.pem") && err.contains("cannot read"), "{err}");

    let (ok, _, err) = common::check(&write(&format!("  tls: {{ cert: {d}/good.pem }}\n")), dir.path());
    assert!(!ok);
    assert!(err.contains("`cert` and `key` go together"), "{err}");
}
