//! The framework's ceiling: a minimal Pingora passthrough proxy with no
//! FastGate logic, used by `benches/run.sh` as the baseline.
//!
//! Usage: bare_pingora LISTEN UPSTREAM THREADS
//!   e.g. bare_pingora 127.0.0.1:18101 127.0.0.1:18100 2
#![allow(clippy::unwrap_used)]

use async_trait::async_trait;
use pingora::{
    prelude::*,
    proxy::{ProxyHttp, Session, http_proxy_service},
    server::configuration::ServerConf,
};

struct Bare {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream.as_str(), false, String::new())))
    }
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listen = args.get(1).cloned().unwrap_or_else(|| "127.0.0.1:18101".into());
    let upstream = args.get(2).cloned().unwrap_or_else(|| "127.0.0.1:18100".into());
    let threads = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(2);
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Bare { upstream });
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever();
}
