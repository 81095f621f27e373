//! Requests refused before a route or a key was found (no route, no key, a
//! bad or inactive key, a target or header over `server.limits`) cost an attacker nothing to send, so they are not
//! audited row by row: each is counted per reason in `/metrics`, and at
//! most one per client address per second is kept as a sample row.
//!
//! The sampling state is one set of the addresses sampled in the current
//! second, cleared when the second changes and never larger than
//! [`MAX_CLIENTS_PER_SECOND`] (once full, nothing more is sampled that
//! second): its memory is fixed, however many addresses send.

use crate::config::RefusedMode;
use parking_lot::Mutex;
use std::{
    collections::HashSet,
    net::{IpAddr, Ipv6Addr},
};

/// Most client addresses sampled in one second (so at most this many
/// refusal rows per second, from however many addresses).
pub const MAX_CLIENTS_PER_SECOND: usize = 256;

/// Why a request was refused before it reached a route with a valid key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No route matches the method, host, path (or model).
    NoRoute,
    /// The route needs a gateway key and none was sent.
    NoKey,
    /// The key sent is not a gateway key.
    BadKey,
    /// The key is revoked, disabled or expired.
    InactiveKey,
    /// The request target is over `server.limits.max_uri_bytes` (414).
    UriTooLong,
    /// A header line or the whole header is over `server.limits` (431).
    HeaderTooLarge,
}

impl Refusal {
    /// Every reason, for metrics (a bounded label set).
    pub const ALL: [Refusal; 6] = [
        Self::NoRoute,
        Self::NoKey,
        Self::BadKey,
        Self::InactiveKey,
        Self::UriTooLong,
        Self::HeaderTooLarge,
    ];

    /// The `reason` label of `fastgate_refused_requests_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoRoute => "no_route",
            Self::NoKey => "no_key",
            Self::BadKey => "bad_key",
            Self::InactiveKey => "inactive_key",
            Self::UriTooLong => "uri_too_long",
            Self::HeaderTooLarge => "header_too_large",
        }
    }
}

/// Decides which refusals get an audit row (and an info log line).
pub struct RefusalSampler {
    mode: RefusedMode,
    window: Mutex<Window>,
}

struct Window {
    second: u64,
    /// Addresses sampled during `second`; `None` for a client without one.
    seen: HashSet<Option<IpAddr>>,
}

impl RefusalSampler {
    pub fn new(mode: RefusedMode) -> Self {
        RefusalSampler {
            mode,
            window: Mutex::new(Window {
                second: 0,
                seen: HashSet::with_capacity(MAX_CLIENTS_PER_SECOND),
            }),
        }
    }

    /// Whether a refusal of `client` at Unix second `now_s` is kept.
    pub fn keep(&self, client: Option<IpAddr>, now_s: u64) -> bool {
        match self.mode {
            RefusedMode::All => true,
            RefusedMode::None => false,
            RefusedMode::Sampled => {
                let mut w = self.window.lock();
                if w.second != now_s {
                    w.second = now_s;
                    w.seen.clear(); // keeps its capacity: no allocation
                }
                if w.seen.len() >= MAX_CLIENTS_PER_SECOND {
                    return false;
                }
                w.seen.insert(client.map(network))
            }
        }
    }
}

/// The unit sampled: an IPv4 address, or an IPv6 /64 (what one host or
/// site is usually given; sampling single IPv6 addresses would give a
/// client 2^64 samples per second).
fn network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn one_sample_per_client_per_second() {
        let s = RefusalSampler::new(RefusedMode::Sampled);
        assert!(s.keep(ip("192.0.2.1"), 100));
        assert!(!s.keep(ip("192.0.2.1"), 100));
        assert!(s.keep(ip("192.0.2.2"), 100), "another client has its own sample");
        assert!(
            !s.keep(ip("2001:db8::1"), 100) || !s.keep(ip("2001:db8::2"), 100),
            "one /64"
        );
        assert!(s.keep(ip("192.0.2.1"), 101), "a new second");
        assert!(s.keep(None, 101));
        assert!(!s.keep(None, 101));
    }

    #[test]
    fn a_full_second_samples_nothing_more() {
        let s = RefusalSampler::new(RefusedMode::Sampled);
        let kept = (0..10_000u32)
            .filter(|i| s.keep(Some(IpAddr::from(i.to_be_bytes())), 7))
            .count();
        assert_eq!(kept, MAX_CLIENTS_PER_SECOND);
        assert!(s.window.lock().seen.capacity() < 4 * MAX_CLIENTS_PER_SECOND);
        assert!(s.keep(ip("192.0.2.1"), 8), "the next second starts empty");
    }

    #[test]
    fn modes() {
        let all = RefusalSampler::new(RefusedMode::All);
        assert!(all.keep(ip("192.0.2.1"), 1) && all.keep(ip("192.0.2.1"), 1));
        let none = RefusalSampler::new(RefusedMode::None);
        assert!(!none.keep(ip("192.0.2.1"), 1));
    }
}
