//! An `endpoints:` entry of an upstream, parsed once at load.

/// A parsed `endpoints:` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Prefixed to every forwarded path (`https://host/openai` -> `/openai`).
    pub base_path: String,
    /// The `Host` header upstream expects (`host` or `host:port`).
    pub authority: String,
    /// `scheme://authority/base_path`, as the audit log records it (built
    /// once here, not per request).
    pub display: String,
}

impl EndpointUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let url = url::Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        let tls = match url.scheme() {
            "https" => true,
            "http" => false,
            other => return Err(format!("{s:?}: scheme {other:?} is not http or https")),
        };
        let host = url
            .host_str()
            .ok_or_else(|| format!("{s:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!("{s:?}: an endpoint takes no query or fragment"));
        }
        let port = url.port_or_known_default().unwrap_or(if tls { 443 } else { 80 });
        let authority = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_string(),
        };
        let base_path = url.path().trim_end_matches('/').to_string();
        let display = format!("{}://{authority}{base_path}", if tls { "https" } else { "http" });
        Ok(EndpointUrl {
            tls,
            host,
            port,
            base_path,
            authority,
            display,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls() {
        let e = EndpointUrl::parse("https://api.openai.com").unwrap();
        assert_eq!(
            (e.tls, e.port, e.base_path.as_str(), e.authority.as_str()),
            (true, 443, "", "api.openai.com")
        );
        let e = EndpointUrl::parse("http://127.0.0.1:8000/openai/").unwrap();
        assert_eq!(
            (e.tls, e.port, e.base_path.as_str(), e.authority.as_str()),
            (false, 8000, "/openai", "127.0.0.1:8000")
        );
        assert!(EndpointUrl::parse("ftp://x").is_err());
        assert!(EndpointUrl::parse("http://x/?a=1").is_err());
        assert!(EndpointUrl::parse("nope").is_err());
    }
}
