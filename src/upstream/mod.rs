//! Upstreams: where requests go. Each upstream has one or more endpoints
//! balanced by pingora-load-balancing, a provider (which decides how keys are
//! injected), an optional key pool, and timeouts.
//!
//! Endpoint hostnames are resolved at start (blocking, once) and then
//! re-resolved in the background, like nginx's `resolve`; an endpoint that does
//! not resolve yet (offline machine) is simply absent until it does.
//!
//! Every resolved address is a backend. An address that refuses connections
//! (an IPv6 address on an IPv4-only host, a dead replica) is set aside for
//! [`ADDRESS_REST`] and the request's next attempt (if its route has a retry
//! left: see `proxy::retry`) goes to another address; optional active
//! health checks (`health_check`) do the same on a timer.

mod health;

use crate::{
    config::{Balance, MockConfig, Provider, RetryBudgetConfig, TimeoutsConfig, UpstreamConfig, endpoint::EndpointUrl},
    pool::KeyPool,
};
use async_trait::async_trait;
use pingora::{
    lb::{
        Backend, Extensions, LoadBalancer,
        discovery::ServiceDiscovery,
        selection::{Consistent, Random, RoundRobin},
    },
    protocols::{ALPN, l4::socket::SocketAddr as PeerAddr},
    upstreams::peer::HttpPeer,
};
use std::{
    collections::{BTreeSet, HashMap},
    net::{SocketAddr, ToSocketAddrs},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

/// How long an address that refused a connection is passed over.
pub const ADDRESS_REST: Duration = Duration::from_secs(30);

/// Which endpoint a resolved backend address belongs to.
#[derive(Debug, Clone, Copy)]
struct EndpointIndex(usize);

/// Resolves the endpoints' hostnames. The first call answers from the
/// blocking start-up resolution so the balancer is ready before serving.
struct DnsDiscovery {
    endpoints: Vec<EndpointUrl>,
    initial: parking_lot::Mutex<Option<BTreeSet<Backend>>>,
}

fn backend(addr: SocketAddr, index: usize) -> Backend {
    let mut ext = Extensions::new();
    ext.insert(EndpointIndex(index));
    Backend {
        addr: PeerAddr::Inet(addr),
        weight: 1,
        ext,
    }
}

impl DnsDiscovery {
    fn resolve_blocking(endpoints: &[EndpointUrl], upstream: &str) -> BTreeSet<Backend> {
        let mut set = BTreeSet::new();
        for (i, ep) in endpoints.iter().enumerate() {
            match (ep.host.as_str(), ep.port).to_socket_addrs() {
                Ok(addrs) => set.extend(addrs.map(|a| backend(a, i))),
                Err(e) => {
                    tracing::warn!(upstream, host = %ep.host, error = %e, "Endpoint does not resolve yet; will retry in the background.")
                }
            }
        }
        set
    }
}

#[async_trait]
impl ServiceDiscovery for DnsDiscovery {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        if let Some(initial) = self.initial.lock().take() {
            return Ok((initial, HashMap::new()));
        }
        let mut set = BTreeSet::new();
        for (i, ep) in self.endpoints.iter().enumerate() {
            if let Ok(addrs) = tokio::net::lookup_host((ep.host.as_str(), ep.port)).await {
                set.extend(addrs.map(|a| backend(a, i)));
            }
        }
        if set.is_empty() {
            // Keep the previous addresses rather than dropping to none.
            return pingora::Error::e_explain(pingora::ErrorType::ConnectNoRoute, "no endpoint resolved");
        }
        Ok((set, HashMap::new()))
    }
}

enum Selector {
    RoundRobin(LoadBalancer<RoundRobin>),
    Random(LoadBalancer<Random>),
    Consistent(LoadBalancer<Consistent>),
}

macro_rules! each_lb {
    ($sel:expr, $lb:ident => $body:expr) => {
        match $sel {
            Selector::RoundRobin($lb) => $body,
            Selector::Random($lb) => $body,
            Selector::Consistent($lb) => $body,
        }
    };
}

/// One chosen endpoint address.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub endpoint: usize,
}

/// A configured upstream, ready to route to.
pub struct Upstream {
    pub name: String,
    pub provider: Provider,
    pub endpoints: Vec<EndpointUrl>,
    pub timeouts: TimeoutsConfig,
    pub key_pool: Option<Arc<KeyPool>>,
    pub mock: Option<MockConfig>,
    /// 0 = unlimited.
    pub max_in_flight: u32,
    /// For converted requests to Anthropic without `max_tokens`.
    pub default_max_tokens: u64,
    /// Whether `X-Forwarded-For`/`-Proto` are sent to this upstream.
    pub forwarded_headers: bool,
    /// This upstream's capability rules (before the shipped table).
    pub capabilities: Vec<crate::config::capabilities::CapabilityRule>,
    in_flight: Arc<AtomicU32>,
    /// Retry attempts in flight toward this upstream (under `retry_budget`).
    active_retries: Arc<AtomicU32>,
    retry_budget: RetryBudgetConfig,
    /// Addresses that refused a connection, until when they are passed over.
    resting: parking_lot::Mutex<HashMap<SocketAddr, Instant>>,
    any_resting: AtomicBool,
    pub health_interval: Option<Duration>,
    selector: Option<Selector>,
}

/// A request's place under an upstream's `max_in_flight`; freed on drop.
#[derive(Debug)]
pub struct Slot(Arc<AtomicU32>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A retry attempt's place under its upstream's `retry_budget`; freed on
/// drop (when the attempt ends or the request does).
#[derive(Debug)]
pub struct RetryToken(Arc<AtomicU32>);

impl Drop for RetryToken {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How many retries may be in flight toward an upstream with `active`
/// requests in flight: Envoy's `retry_budget` (a share of the active
/// requests, never fewer than `min_concurrency`).
pub fn retry_allowance(budget: &RetryBudgetConfig, active: u32) -> u32 {
    let share = (f64::from(active) * budget.percent.clamp(0.0, 100.0) / 100.0).floor() as u32;
    share.max(budget.min_concurrency)
}

/// One resolved address and what FastGate knows of it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AddressHealth {
    pub address: String,
    pub endpoint: String,
    /// Passed the last health check (always true without health checks).
    pub healthy: bool,
    /// Refused a connection recently; passed over until it rests out.
    pub resting: bool,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("provider", &self.provider)
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Build from config; resolves hostnames once (blocking).
    pub fn build(name: &str, cfg: &UpstreamConfig, pools: &HashMap<String, Arc<KeyPool>>) -> Self {
        let endpoints: Vec<EndpointUrl> = cfg
            .endpoints
            .iter()
            .filter_map(|e| EndpointUrl::parse(e).ok())
            .collect();
        let selector = (cfg.provider != Provider::Mock).then(|| {
            let initial = DnsDiscovery::resolve_blocking(&endpoints, name);
            let discovery = DnsDiscovery {
                endpoints: endpoints.clone(),
                initial: parking_lot::Mutex::new(Some(initial)),
            };
            let mut backends = pingora::lb::Backends::new(Box::new(discovery));
            if let Some(hc) = &cfg.health_check {
                backends.set_health_check(Box::new(health::EndpointCheck::new(name, &endpoints, hc)));
            }
            let selector = match cfg.balance {
                Balance::RoundRobin => Selector::RoundRobin(LoadBalancer::from_backends(backends)),
                Balance::Random => Selector::Random(LoadBalancer::from_backends(backends)),
                Balance::ConsistentHash => Selector::Consistent(LoadBalancer::from_backends(backends)),
            };
            // The first discovery answers from memory, so this completes at once.
            use futures_lite::FutureExt as _;
            let _ = each_lb!(&selector, lb => futures_lite::future::block_on(lb.update().boxed()));
            selector
        });
        Upstream {
            name: name.to_string(),
            provider: cfg.provider,
            endpoints,
            timeouts: cfg.timeouts.clone(),
            key_pool: cfg.key_pool.as_ref().and_then(|p| pools.get(p).cloned()),
            mock: (cfg.provider == Provider::Mock).then(|| cfg.mock.clone().unwrap_or_default()),
            max_in_flight: cfg.max_in_flight,
            default_max_tokens: cfg.default_max_tokens,
            forwarded_headers: cfg.forwarded_headers,
            capabilities: cfg.capabilities.clone(),
            in_flight: Arc::new(AtomicU32::new(0)),
            active_retries: Arc::new(AtomicU32::new(0)),
            retry_budget: cfg.retry_budget,
            resting: parking_lot::Mutex::new(HashMap::new()),
            any_resting: AtomicBool::new(false),
            health_interval: cfg.health_check.as_ref().map(|h| h.interval.0),
            selector,
        }
    }

    /// Take a place under `max_in_flight`; `None` when the upstream is full.
    pub fn try_slot(&self) -> Option<Slot> {
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed);
        let slot = Slot(self.in_flight.clone());
        (self.max_in_flight == 0 || now < self.max_in_flight).then_some(slot)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Pass over `addr` for a while: it refused a connection.
    pub fn rest_address(&self, addr: SocketAddr) {
        let mut r = self.resting.lock();
        r.insert(addr, Instant::now() + ADDRESS_REST);
        self.any_resting.store(true, Ordering::Relaxed);
        tracing::info!(upstream = %self.name, %addr, "Address refused a connection; passing over it for a while.");
    }

    fn is_resting(&self, addr: &SocketAddr) -> bool {
        if !self.any_resting.load(Ordering::Relaxed) {
            return false;
        }
        let mut r = self.resting.lock();
        let now = Instant::now();
        r.retain(|_, until| *until > now);
        self.any_resting.store(!r.is_empty(), Ordering::Relaxed);
        r.contains_key(addr)
    }

    /// A place for one more retry toward this upstream, if its
    /// `retry_budget` has room: taken atomically, so requests answered at
    /// the same moment cannot all pass a full budget.
    pub fn try_retry(&self) -> Option<RetryToken> {
        let allowed = retry_allowance(&self.retry_budget, self.in_flight());
        self.active_retries
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < allowed).then_some(n + 1))
            .ok()?;
        Some(RetryToken(self.active_retries.clone()))
    }

    /// Run the active health checks once (the upkeep task calls this every
    /// `health_check.interval`).
    pub async fn check_health(&self) {
        if let Some(s) = &self.selector {
            each_lb!(s, lb => lb.backends().run_health_check(true).await);
        }
    }

    /// Every resolved address with its health.
    pub fn addresses(&self) -> Vec<AddressHealth> {
        let Some(s) = &self.selector else {
            return Vec::new();
        };
        each_lb!(s, lb => {
            let backends = lb.backends();
            backends
                .get_backend()
                .iter()
                .filter_map(|b| {
                    let addr = *b.addr.as_inet()?;
                    let ep = b.ext.get::<EndpointIndex>().and_then(|i| self.endpoints.get(i.0))?;
                    Some(AddressHealth {
                        address: addr.to_string(),
                        endpoint: format!("{}://{}{}", if ep.tls { "https" } else { "http" }, ep.authority, ep.base_path),
                        healthy: backends.ready(b),
                        resting: self.is_resting(&addr),
                    })
                })
                .collect()
        })
    }

    pub fn is_mock(&self) -> bool {
        self.provider == Provider::Mock
    }

    /// Resolved endpoint addresses currently known.
    pub fn backend_count(&self) -> usize {
        self.selector
            .as_ref()
            .map_or(0, |s| each_lb!(s, lb => lb.backends().get_backend().len()))
    }

    /// Re-resolve endpoint hostnames (background task).
    pub async fn refresh(&self) {
        if let Some(s) = &self.selector
            && let Err(e) = each_lb!(s, lb => lb.update().await)
        {
            tracing::debug!(upstream = %self.name, error = %e, "DNS refresh kept the previous addresses.");
        }
    }

    /// Pick an endpoint address, avoiding `avoid` when another one exists.
    /// `hash_key` feeds consistent hashing (ignored by the other strategies).
    /// Healthy, untried, not resting addresses come first; then healthy
    /// ones (a resting address may have come back); then any.
    pub fn select(&self, hash_key: &[u8], avoid: &[SocketAddr]) -> Option<Target> {
        let selector = self.selector.as_ref()?;
        let fresh = |b: &Backend, healthy: bool| {
            healthy
                && b.addr
                    .as_inet()
                    .is_some_and(|a| !avoid.contains(a) && !self.is_resting(a))
        };
        let untried = |b: &Backend, healthy: bool| healthy && b.addr.as_inet().is_some_and(|a| !avoid.contains(a));
        let backend = each_lb!(selector, lb => lb
            .select_with(hash_key, 256, fresh)
            .or_else(|| lb.select_with(hash_key, 256, untried))
            // No healthy address at all: any (a check can be wrong; an
            // attempt that fails costs a retry, a 502 without one costs
            // the request), as Envoy's panic threshold does.
            .or_else(|| lb.select_with(hash_key, 256, |_, _| true)))?;
        let addr = *backend.addr.as_inet()?;
        let endpoint = backend.ext.get::<EndpointIndex>().map_or(0, |i| i.0);
        Some(Target { addr, endpoint })
    }

    /// The Pingora peer for `target`: TLS with SNI and certificate
    /// verification for https endpoints, connect timeout, and `read_timeout`
    /// for every read until the caller changes it.
    pub fn peer(&self, target: &Target, read_timeout: Duration) -> HttpPeer {
        let ep = &self.endpoints[target.endpoint.min(self.endpoints.len().saturating_sub(1))];
        let mut peer = HttpPeer::new(target.addr, ep.tls, ep.host.clone());
        let o = &mut peer.options;
        o.connection_timeout = Some(self.timeouts.connect.0);
        o.total_connection_timeout = Some(self.timeouts.connect.0 * 2);
        o.read_timeout = Some(read_timeout);
        o.idle_timeout = Some(Duration::from_secs(60));
        o.verify_cert = true;
        o.verify_hostname = true;
        o.alpn = if ep.tls { ALPN::H2H1 } else { ALPN::H1 };
        peer
    }

    pub fn endpoint(&self, target: &Target) -> &EndpointUrl {
        &self.endpoints[target.endpoint.min(self.endpoints.len().saturating_sub(1))]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_allowance_is_a_share_with_a_floor() {
        let b = RetryBudgetConfig::default();
        assert_eq!(retry_allowance(&b, 0), 3);
        assert_eq!(retry_allowance(&b, 10), 3);
        assert_eq!(retry_allowance(&b, 40), 8);
        assert_eq!(retry_allowance(&b, 1000), 200);
        let none = RetryBudgetConfig {
            percent: 0.0,
            min_concurrency: 0,
        };
        assert_eq!(retry_allowance(&none, 1000), 0);
    }

    #[test]
    fn retry_tokens_stop_at_the_budget_and_come_back() {
        let cfg: UpstreamConfig = serde_norway::from_str(
            "{provider: openai, endpoints: ['http://127.0.0.1:1001'], retry_budget: {percent: 50, min_concurrency: 1}}",
        )
        .unwrap();
        let up = Upstream::build("u", &cfg, &HashMap::new());
        let slots: Vec<_> = (0..4).map(|_| up.try_slot().unwrap()).collect();
        let a = up.try_retry().unwrap();
        let b = up.try_retry().unwrap();
        assert!(up.try_retry().is_none(), "50 % of 4 in flight is 2");
        drop(a);
        let c = up.try_retry();
        assert!(c.is_some());
        drop((b, c, slots));
        assert!(up.try_retry().is_some(), "min_concurrency with nothing in flight");
    }

    #[test]
    fn round_robin_over_endpoints() {
        let cfg: UpstreamConfig =
            serde_norway::from_str("{provider: openai, endpoints: ['http://127.0.0.1:1001', 'http://127.0.0.1:1002']}")
                .unwrap();
        let up = Upstream::build("u", &cfg, &HashMap::new());
        assert_eq!(up.backend_count(), 2);
        let a = up.select(b"", &[]).unwrap();
        let b = up.select(b"", &[]).unwrap();
        assert_ne!(a.addr, b.addr);
        let c = up.select(b"", &[a.addr]).unwrap();
        assert_ne!(c.addr, a.addr);
        assert_eq!(up.endpoint(&c).port, c.addr.port());
    }
}
