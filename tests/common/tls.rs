//! A private certificate authority for TLS tests (rcgen).
#![allow(dead_code)]

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use std::path::Path;
use tokio_rustls::rustls::pki_types::CertificateDer;

/// A private certificate authority that signs leaf certificates.
pub struct Ca {
    pub cert: rcgen::Certificate,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert,
            issuer: Issuer::new(params, key),
        }
    }

    /// Write a leaf for `names` (valid for `days`) as `<stem>.pem`/`<stem>.key`;
    /// its DER.
    pub fn leaf(&self, dir: &Path, stem: &str, names: &[&str], days: i64) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        // Write then rename, as certificate renewal tools do.
        for (ext, text) in [("pem", cert.pem()), ("key", key.serialize_pem())] {
            let tmp = dir.join(format!(".{stem}.{ext}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, dir.join(format!("{stem}.{ext}"))).unwrap();
        }
        cert.der().clone()
    }

    pub fn reqwest_root(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.cert.pem().as_bytes()).unwrap()
    }
}

impl Ca {
    /// A TLS client configuration that trusts this CA only (HTTP/1.1 by ALPN).
    pub fn client_config(&self) -> std::sync::Arc<tokio_rustls::rustls::ClientConfig> {
        use tokio_rustls::rustls;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        std::sync::Arc::new(config)
    }
}
