//! Certificates of the data plane's TLS listener: loaded from PEM files,
//! chosen per handshake by the name the client asks for (SNI), swapped whole
//! on reload so open connections keep theirs and new handshakes get the new
//! ones. The same loading backs `fastgate check`.

use crate::config::{CertificateFiles, TlsConfig};
use arc_swap::ArcSwap;
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use std::{path::PathBuf, sync::Arc, time::Duration};

/// Certificates expiring sooner than this are reported by `check` and at load.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no usable PEM private key in it ({message})")]
    Key { path: PathBuf, message: String },
    #[error("{key}: this private key does not belong to the certificate in {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// One loaded certificate chain with its key and what it covers.
pub struct Certificate {
    /// DNS names from the subject alternative names (the common name when
    /// there are none), lower case; `*.` wildcards kept.
    pub names: Vec<String>,
    /// Expiry, Unix seconds.
    pub not_after: i64,
    pub files: CertificateFiles,
    key: Arc<CertifiedKey>,
}

impl Certificate {
    /// Whether this certificate is valid for `host` (exact, or a wildcard
    /// covering exactly one label).
    pub fn covers(&self, host: &str) -> bool {
        self.names.iter().any(|name| match name.strip_prefix("*.") {
            Some(parent) => host
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(parent)),
            None => name.eq_ignore_ascii_case(host),
        })
    }

    /// A warning if the certificate has expired or expires soon.
    pub fn expiry_warning(&self, now_unix: i64) -> Option<String> {
        let left = self.not_after - now_unix;
        let names = self.names.join(", ");
        if left <= 0 {
            Some(format!(
                "{}: the certificate for {names} EXPIRED {} day(s) ago",
                self.files.cert.display(),
                -left / 86_400
            ))
        } else if left < EXPIRY_WARNING.as_secs() as i64 {
            Some(format!(
                "{}: the certificate for {names} expires in {} day(s)",
                self.files.cert.display(),
                left / 86_400
            ))
        } else {
            None
        }
    }
}

/// Read a certificate chain and its key, and check that they belong together.
pub fn load_pair(files: &CertificateFiles) -> Result<Certificate, TlsError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.clone(),
            source,
        })
    };
    let cert_pem = read(&files.cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid {
            path: files.cert.clone(),
            message: format!("not a PEM certificate chain: {e}"),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    };
    let key_pem = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Key {
        path: files.key.clone(),
        message: e.to_string(),
    })?;
    let (names, not_after) = describe(leaf).map_err(|message| TlsError::Invalid {
        path: files.cert.clone(),
        message,
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        },
        other => TlsError::Key {
            path: files.key.clone(),
            message: other.to_string(),
        },
    })?;
    Ok(Certificate {
        names,
        not_after,
        files: files.clone(),
        key: Arc::new(certified),
    })
}

/// The DNS names and the expiry of an end-entity certificate.
fn describe(der: &CertificateDer<'_>) -> Result<(Vec<String>, i64), String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(format!("unreadable subject alternative names: {e}")),
    };
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

/// Every certificate of `tls`, loaded; all problems at once.
pub fn load_all(tls: &TlsConfig) -> Result<Vec<Certificate>, Vec<TlsError>> {
    let (mut loaded, mut errors) = (Vec::new(), Vec::new());
    for pair in tls.pairs() {
        match load_pair(&pair) {
            Ok(c) => loaded.push(c),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() { Ok(loaded) } else { Err(errors) }
}

/// Picks the certificate per handshake; reloadable while serving.
pub struct CertResolver {
    tls: TlsConfig,
    certs: ArcSwap<Vec<Certificate>>,
}

impl std::fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertResolver")
            .field("certificates", &self.certs.load().len())
            .finish()
    }
}

impl CertResolver {
    pub fn load(tls: &TlsConfig) -> Result<Self, Vec<TlsError>> {
        let certs = load_all(tls)?;
        warn_expiring(&certs);
        Ok(CertResolver {
            tls: tls.clone(),
            certs: ArcSwap::from_pointee(certs),
        })
    }

    /// Read the files again; swap the new certificates in only if all load.
    /// Blocking file I/O: call off the async workers.
    pub fn reload(&self) -> Result<usize, Vec<TlsError>> {
        let certs = load_all(&self.tls)?;
        warn_expiring(&certs);
        let n = certs.len();
        self.certs.store(Arc::new(certs));
        Ok(n)
    }

    /// The certificate and key files, for the file watcher.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.tls.pairs().into_iter().flat_map(|p| [p.cert, p.key]).collect()
    }

    pub fn offers_h2(&self) -> bool {
        self.tls.h2()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let certs = self.certs.load();
        let chosen = hello
            .server_name()
            .and_then(|sni| certs.iter().find(|c| c.covers(sni)))
            .or_else(|| certs.first());
        chosen.map(|c| c.key.clone())
    }
}

fn warn_expiring(certs: &[Certificate]) {
    let now = crate::clock::now_unix();
    for c in certs {
        if let Some(w) = c.expiry_warning(now) {
            tracing::warn!(warning = %w, "TLS certificate expiring.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(names: &[&str]) -> Certificate {
        let generated =
            rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files = CertificateFiles {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
        };
        std::fs::write(&files.cert, generated.cert.pem()).unwrap();
        std::fs::write(&files.key, generated.signing_key.serialize_pem()).unwrap();
        load_pair(&files).unwrap()
    }

    #[test]
    fn names_are_matched_exactly_or_by_a_one_label_wildcard() {
        let c = cert(&["api.example.com", "*.llm.example.com"]);
        assert_eq!(c.names, ["api.example.com", "*.llm.example.com"]);
        assert!(c.covers("api.example.com") && c.covers("API.example.com"));
        assert!(c.covers("eu.llm.example.com"));
        assert!(!c.covers("a.eu.llm.example.com"), "a wildcard covers one label");
        assert!(!c.covers("llm.example.com") && !c.covers("example.com"));
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_by_name() {
        let a = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b.test".to_string()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files = CertificateFiles {
            cert: dir.path().join("a.pem"),
            key: dir.path().join("b.key"),
        };
        std::fs::write(&files.cert, a.cert.pem()).unwrap();
        std::fs::write(&files.key, b.signing_key.serialize_pem()).unwrap();
        let err = load_pair(&files).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("b.key") && err.contains("does not belong"), "{err}");
        std::fs::write(&files.key, "not a key").unwrap();
        let err = load_pair(&files).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("no usable PEM private key"), "{err}");
    }

    #[test]
    fn expiry_is_reported_two_weeks_ahead() {
        let c = cert(&["a.test"]);
        assert!(c.expiry_warning(c.not_after - 30 * 86_400).is_none());
        let soon = c.expiry_warning(c.not_after - 3 * 86_400 - 10).unwrap_or_default();
        assert!(soon.contains("expires in 3 day(s)"), "{soon}");
        let gone = c.expiry_warning(c.not_after + 86_400).unwrap_or_default();
        assert!(gone.contains("EXPIRED"), "{gone}");
    }
}
