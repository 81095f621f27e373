//! `otel:`: OpenTelemetry trace export (OTLP). Absent = off. See docs/tracing.md.

use super::HumanDuration;
use serde::{Deserialize, Serialize};
use std::{collections::BTreeMap, time::Duration};

/// Where and how spans are exported.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtelConfig {
    /// The collector: `http://host:4318` (http/protobuf; `/v1/traces` is
    /// added when the URL has no path) or `http://host:4317` (grpc).
    pub endpoint: String,
    pub protocol: OtelProtocol,
    /// Sent with every export (an API key for a hosted backend); values
    /// may come from the environment (`${VAR}`) and are never shown.
    #[serde(serialize_with = "masked_values")]
    pub headers: BTreeMap<String, String>,
    /// Share of requests exported (0..1), decided by trace id. Requests
    /// that failed (5xx, 429, a transport error) are always exported, and
    /// so are those whose incoming `traceparent` says sampled.
    pub sample_ratio: f64,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// Spans waiting for export; past it new spans are dropped (and counted
    /// in `fastgate_otel_spans_dropped_total`), never waited for.
    pub queue_size: usize,
    /// Most spans in one export call.
    pub batch_size: usize,
    /// Longest wait before a partial batch is exported.
    pub flush_interval: HumanDuration,
    /// Longest an export call may take.
    pub timeout: HumanDuration,
}

/// `otel.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum OtelProtocol {
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "grpc")]
    Grpc,
}

impl Default for OtelConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            protocol: OtelProtocol::HttpProtobuf,
            headers: BTreeMap::new(),
            sample_ratio: 1.0,
            service_name: "fastgate".into(),
            queue_size: 8192,
            batch_size: 512,
            flush_interval: Duration::from_secs(1).into(),
            timeout: Duration::from_secs(10).into(),
        }
    }
}

impl OtelConfig {
    /// Every problem with these settings (none names a header's value).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        match url::Url::parse(&self.endpoint) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {}
            Ok(u) => out.push(format!(
                "otel.endpoint: scheme {} (use http:// or https://, with a host)",
                u.scheme()
            )),
            Err(e) => out.push(format!("otel.endpoint: {e} (like http://127.0.0.1:4318)")),
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            out.push(format!(
                "otel.sample_ratio must be between 0 and 1 (got {})",
                self.sample_ratio
            ));
        }
        if self.queue_size == 0 || self.batch_size == 0 {
            out.push("otel.queue_size and otel.batch_size must be greater than zero".into());
        }
        if self.timeout.0.is_zero() || self.flush_interval.0.is_zero() {
            out.push("otel.timeout and otel.flush_interval must be greater than zero".into());
        }
        if self.service_name.trim().is_empty() {
            out.push("otel.service_name must not be empty".into());
        }
        for (name, value) in &self.headers {
            let lower = name.to_ascii_lowercase();
            if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || (self.protocol == OtelProtocol::Grpc && (lower.ends_with("-bin") || lower != *name))
            {
                out.push(format!(
                    "otel.headers: {name:?} is not a valid header name (grpc metadata: lowercase, no -bin)"
                ));
            }
            if http::HeaderValue::from_str(value).is_err() {
                out.push(format!("otel.headers.{name}: the value is not a valid header value"));
            }
        }
        out
    }

    /// The URL spans are posted to: for http/protobuf an endpoint without a
    /// path gets the OTLP signal path `/v1/traces`, like
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; a full URL is used as it is.
    pub fn export_url(&self) -> String {
        match (self.protocol, url::Url::parse(&self.endpoint)) {
            (OtelProtocol::HttpProtobuf, Ok(u)) if u.path() == "/" && u.query().is_none() => {
                format!("{}/v1/traces", self.endpoint.trim_end_matches('/'))
            }
            _ => self.endpoint.clone(),
        }
    }
}

/// Header names shown, values masked (they are usually credentials).
fn masked_values<S: serde::Serializer>(headers: &BTreeMap<String, String>, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(headers.len()))?;
    for name in headers.keys() {
        map.serialize_entry(name, "***")?;
    }
    map.end()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_without_a_path_gets_the_traces_path_for_http_only() {
        let mut c = OtelConfig {
            endpoint: "http://collector:4318".into(),
            ..OtelConfig::default()
        };
        assert_eq!(c.export_url(), "http://collector:4318/v1/traces");
        c.endpoint = "http://collector:4318/".into();
        assert_eq!(c.export_url(), "http://collector:4318/v1/traces");
        c.endpoint = "https://otlp.example.com/api/v1/traces".into();
        assert_eq!(c.export_url(), "https://otlp.example.com/api/v1/traces");
        c.endpoint = "http://collector:4317".into();
        c.protocol = OtelProtocol::Grpc;
        assert_eq!(c.export_url(), "http://collector:4317");
    }

    #[test]
    fn the_section_is_optional_checked_and_located() {
        let parse = |yaml: &str| crate::config::parse_config(std::path::Path::new("f.yaml"), yaml);
        assert!(parse("{}\n").unwrap().file.otel.is_none());
        let on = parse("otel:\n  endpoint: http://c:4317\n  protocol: grpc\n").unwrap();
        let otel = on.file.otel.unwrap();
        assert_eq!(
            (otel.protocol, otel.sample_ratio, otel.queue_size),
            (OtelProtocol::Grpc, 1.0, 8192)
        );
        let err = parse("server:\n  threads: 1\notel:\n  endpoint: nope\n  sample_ratio: 2\n").unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
        assert!(err.0.iter().all(|d| d.line == 3), "{err}");
        let err = parse("otel:\n  endpoint: http://c:4318\n  protocol: zipkin\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("f.yaml:3: "), "{err}");
        let err = parse("otel:\n  endpoint: http://c:4317\n  protocol: grpc\n  headers: {X-Key: v}\n").unwrap_err();
        assert!(err.to_string().contains("not a valid header name"), "{err}");
    }

    #[test]
    fn header_values_are_masked_when_shown_and_never_quoted_in_errors() {
        let c = OtelConfig {
            endpoint: "ftp://x".into(),
            sample_ratio: 1.5,
            headers: BTreeMap::from([("x-api-key".into(), "s3cret\nvalue".into())]),
            ..OtelConfig::default()
        };
        let shown = serde_json::to_string(&c).unwrap();
        assert!(shown.contains(r#""x-api-key":"***""#), "{shown}");
        assert!(!shown.contains("s3cret"));
        let problems = c.problems().join("\n");
        assert_eq!(c.problems().len(), 3, "{problems}");
        assert!(!problems.contains("s3cret"), "{problems}");
    }
}
