//! Active health checks of an upstream's resolved addresses, run by
//! pingora-load-balancing's health registry: a TCP connect, or an HTTP
//! `GET` that counts any answer below 500 as alive (providers answer 401 to
//! a request without a key, which still proves the address serves).

use super::EndpointIndex;
use crate::config::endpoint::EndpointUrl;
use crate::config::{HealthCheckConfig, HealthCheckKind};
use async_trait::async_trait;
use pingora::{
    ErrorType,
    connectors::http::Connector,
    lb::{Backend, health_check::HealthCheck},
    upstreams::peer::HttpPeer,
};
use std::time::Duration;

pub struct EndpointCheck {
    pub upstream: String,
    pub endpoints: Vec<EndpointUrl>,
    pub kind: HealthCheckKind,
    pub path: String,
    pub timeout: Duration,
    pub rise: usize,
    pub fall: usize,
    connector: Connector,
}

impl EndpointCheck {
    pub fn new(upstream: &str, endpoints: &[EndpointUrl], cfg: &HealthCheckConfig) -> Self {
        let kind = if cfg.path.is_some() {
            HealthCheckKind::Http
        } else {
            cfg.kind
        };
        EndpointCheck {
            upstream: upstream.to_string(),
            endpoints: endpoints.to_vec(),
            kind,
            path: cfg.path.clone().unwrap_or_else(|| "/".into()),
            timeout: cfg.timeout.0,
            rise: cfg.rise,
            fall: cfg.fall,
            connector: Connector::new(None),
        }
    }

    fn endpoint(&self, target: &Backend) -> Option<&EndpointUrl> {
        let i = target.ext.get::<EndpointIndex>().map_or(0, |i| i.0);
        self.endpoints.get(i)
    }
}

fn failed(why: &'static str) -> Box<pingora::Error> {
    pingora::Error::explain(ErrorType::ConnectError, why)
}

#[async_trait]
impl HealthCheck for EndpointCheck {
    async fn check(&self, target: &Backend) -> pingora::Result<()> {
        let addr = *target.addr.as_inet().ok_or_else(|| failed("not an inet address"))?;
        match self.kind {
            HealthCheckKind::Tcp => {
                match tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect(addr)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(_)) => Err(failed("connect failed")),
                    Err(_) => Err(failed("connect timed out")),
                }
            }
            HealthCheckKind::Http => {
                let ep = self.endpoint(target).ok_or_else(|| failed("unknown endpoint"))?;
                let mut peer = HttpPeer::new(addr, ep.tls, ep.host.clone());
                peer.options.connection_timeout = Some(self.timeout);
                peer.options.total_connection_timeout = Some(self.timeout);
                peer.options.read_timeout = Some(self.timeout);
                peer.options.verify_cert = true;
                peer.options.verify_hostname = true;
                let path = format!("{}{}", ep.base_path, self.path);
                let mut req = pingora::http::RequestHeader::build("GET", path.as_bytes(), None)?;
                req.insert_header(http::header::HOST, ep.authority.as_str())?;
                req.insert_header(http::header::USER_AGENT, "fastgate-health-check")?;
                let run = async {
                    let (mut s, _) = self.connector.get_http_session(&peer).await?;
                    s.write_request_header(Box::new(req)).await?;
                    s.finish_request_body().await?;
                    s.read_response_header().await?;
                    let status = s.response_header().map_or(599, |h| h.status.as_u16());
                    if status >= 500 {
                        return Err(failed("answered 5xx"));
                    }
                    Ok(())
                };
                tokio::time::timeout(self.timeout, run)
                    .await
                    .unwrap_or_else(|_| Err(failed("timed out")))
            }
        }
    }

    async fn health_status_change(&self, target: &Backend, healthy: bool) {
        if healthy {
            tracing::info!(upstream = %self.upstream, address = %target.addr, "Upstream address is healthy again.");
        } else {
            tracing::warn!(upstream = %self.upstream, address = %target.addr, "Upstream address failed its health check; skipping it.");
        }
    }

    fn health_threshold(&self, success: bool) -> usize {
        if success { self.rise } else { self.fall }
    }
}
