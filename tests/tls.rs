//! https upstreams: certificates are verified. A self-signed upstream must be
//! refused before any request reaches it.
#![allow(clippy::unwrap_used)]

mod common;

use common::Gateway;
use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};
use tokio::{io::AsyncReadExt, net::TcpListener};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
};

#[tokio::test]
async fn an_untrusted_upstream_certificate_is_refused() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der], key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // `hellos`: connections that started a TLS handshake (a ClientHello
    // record first); `rejected`: handshakes FastGate itself aborted with a
    // certificate alert; `requests`: bytes read over a finished handshake.
    let counters = || Arc::new(AtomicUsize::new(0));
    let (hellos, rejected, requests) = (counters(), counters(), counters());
    let (h, x, r) = (hellos.clone(), rejected.clone(), requests.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            let (h, x, r) = (h.clone(), x.clone(), r.clone());
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                if tcp.peek(&mut first).await.unwrap_or(0) == 1 && first[0] == 0x16 {
                    h.fetch_add(1, Ordering::SeqCst);
                }
                match acceptor.accept(tcp).await {
                    Ok(mut tls) => {
                        let mut buf = [0u8; 1024];
                        if tls.read(&mut buf).await.unwrap_or(0) > 0 {
                            r.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Err(e) => {
                        let alert = e
                            .get_ref()
                            .and_then(|inner| inner.downcast_ref::<tokio_rustls::rustls::Error>())
                            .is_some_and(|e| matches!(e, tokio_rustls::rustls::Error::AlertReceived(_)));
                        if alert {
                            x.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            });
        }
    });

    let config = format!(
        "upstreams:\n  selfsigned: {{provider: openai, endpoints: ['https://127.0.0.1:{port}'], key_pool: p}}\nkey_pools:\n  p: {{keys: [sk-must-not-leak]}}\n"
    );
    let gw = Gateway::start(&config, &[("r.yaml", "routes:\n  - { name: r, match: { path: '/v1/{*rest}' }, auth: none, format: openai, upstream: selfsigned }\n")]).await;
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_unreachable");
    let (hellos, rejected) = (hellos.load(Ordering::SeqCst), rejected.load(Ordering::SeqCst));
    assert!(hellos >= 1, "FastGate never tried TLS");
    assert_eq!(
        rejected, hellos,
        "every handshake FastGate began, it aborted itself on the certificate"
    );
    assert_eq!(
        requests.load(Ordering::SeqCst),
        0,
        "a request (and the pool key) reached an unverified upstream"
    );
}
