//! Upstream key pools: the provider keys FastGate injects, and who is using
//! which right now.
//!
//! A request takes a [`Lease`] on one key; dropping the lease (request done,
//! client gone, error) gives the key back. Every key carries a [`KeyState`];
//! today keys are always `Active` — the cooling/disabled transitions on
//! 429/401 plug in at [`PoolKey::state`] and [`KeyPool::lease`].

use crate::{config::KeyStrategy, secret::Secret};
use sha2::{Digest, Sha256};
use std::sync::{
    Arc,
    atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
};

/// Live state of one upstream key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Active,
}

impl KeyState {
    /// Every state, for gauges that report each (zero included).
    pub const ALL: [KeyState; 1] = [KeyState::Active];

    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
        }
    }
}

/// One upstream key and its counters.
#[derive(Debug)]
pub struct PoolKey {
    /// Stable, non-secret id derived from the key (`k_` + 8 hex of its SHA-256).
    pub id: String,
    pub secret: Secret,
    in_flight: AtomicU32,
    total: AtomicU64,
}

impl PoolKey {
    pub fn new(secret: &str) -> Self {
        let digest = Sha256::digest(secret.as_bytes());
        PoolKey {
            id: format!("k_{}", hex::encode(&digest[..4])),
            secret: Secret::new(secret),
            in_flight: AtomicU32::new(0),
            total: AtomicU64::new(0),
        }
    }

    pub fn state(&self) -> KeyState {
        KeyState::Active
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

/// A named pool of upstream keys with a selection strategy.
#[derive(Debug)]
pub struct KeyPool {
    pub name: String,
    pub strategy: KeyStrategy,
    keys: Vec<Arc<PoolKey>>,
    next: AtomicUsize,
}

/// Exclusive use of a pool key for one upstream attempt; released on drop.
#[derive(Debug)]
pub struct Lease {
    key: Arc<PoolKey>,
}

impl Lease {
    pub fn key(&self) -> &PoolKey {
        &self.key
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.key.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl KeyPool {
    /// Build a pool; empty strings (unset `${VAR:-}`) and duplicates are skipped.
    pub fn new(name: &str, strategy: KeyStrategy, secrets: &[String]) -> Self {
        let mut keys: Vec<Arc<PoolKey>> = Vec::new();
        for s in secrets.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            let key = PoolKey::new(s);
            if !keys.iter().any(|k| k.id == key.id) {
                keys.push(Arc::new(key));
            }
        }
        KeyPool {
            name: name.to_string(),
            strategy,
            keys,
            next: AtomicUsize::new(0),
        }
    }

    pub fn keys(&self) -> &[Arc<PoolKey>] {
        &self.keys
    }

    /// Lease a usable key, skipping ids in `avoid` when another is usable
    /// (a retry should not hit the key that just failed). `None` when the
    /// pool has no usable key.
    pub fn lease(&self, avoid: &[String]) -> Option<Lease> {
        let usable = |k: &&Arc<PoolKey>| k.state() == KeyState::Active;
        let preferred = |k: &&Arc<PoolKey>| usable(k) && !avoid.contains(&k.id);
        let key = self.choose(preferred).or_else(|| self.choose(usable))?;
        key.in_flight.fetch_add(1, Ordering::Relaxed);
        key.total.fetch_add(1, Ordering::Relaxed);
        Some(Lease { key: key.clone() })
    }

    fn choose(&self, ok: impl Fn(&&Arc<PoolKey>) -> bool) -> Option<&Arc<PoolKey>> {
        let n = self.keys.len();
        if n == 0 {
            return None;
        }
        match self.strategy {
            KeyStrategy::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|i| &self.keys[(start + i) % n]).find(|k| ok(k))
            }
            KeyStrategy::LeastInFlight => {
                // Ties rotate so equally idle keys share the load.
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|i| &self.keys[(start + i) % n])
                    .filter(|k| ok(k))
                    .min_by_key(|k| k.in_flight())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(strategy: KeyStrategy) -> KeyPool {
        KeyPool::new(
            "p",
            strategy,
            &["a".into(), "".into(), "b".into(), "c".into(), "a".into()],
        )
    }

    #[test]
    fn round_robin_spreads_and_skips_empty_and_duplicates() {
        let p = pool(KeyStrategy::RoundRobin);
        assert_eq!(p.keys().len(), 3);
        let ids: Vec<String> = (0..6).map(|_| p.lease(&[]).unwrap().key().id.clone()).collect();
        assert_eq!(ids[0..3], ids[3..6]);
        assert_ne!(ids[0], ids[1]);
        assert_ne!(ids[1], ids[2]);
    }

    #[test]
    fn least_in_flight_prefers_idle_keys_and_leases_release() {
        let p = pool(KeyStrategy::LeastInFlight);
        let a = p.lease(&[]).unwrap();
        let b = p.lease(&[]).unwrap();
        let c = p.lease(&[]).unwrap();
        let mut seen = vec![a.key().id.clone(), b.key().id.clone(), c.key().id.clone()];
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 3, "three leases, three different keys");
        let b_id = b.key().id.clone();
        drop(b);
        assert_eq!(p.lease(&[]).unwrap().key().id, b_id);
        assert!(p.keys().iter().map(|k| k.in_flight()).sum::<u32>() == 2);
    }

    #[test]
    fn avoid_is_a_preference_and_empty_pool_gives_none() {
        let p = KeyPool::new("one", KeyStrategy::RoundRobin, &["only".into()]);
        let id = p.keys()[0].id.clone();
        assert_eq!(p.lease(std::slice::from_ref(&id)).unwrap().key().id, id);
        assert!(
            KeyPool::new("none", KeyStrategy::RoundRobin, &["".into()])
                .lease(&[])
                .is_none()
        );
    }
}
