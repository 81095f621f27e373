use super::*;
use crate::config::CooldownConfig;
use std::{collections::HashMap, time::Duration};

fn policy() -> Policy {
    Policy {
        scope: CooldownScope::Key,
        cooldown: CooldownConfig::default(),
        disable_after: 2,
        max_in_flight_per_key: 0,
        stuck_after: Duration::from_secs(600),
    }
}

fn pool_with(strategy: KeyStrategy, policy: Policy, secrets: &[&str]) -> Arc<KeyPool> {
    let keys = secrets
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| Arc::new(PoolKey::new(s, 1, KeySource::Config)))
        .collect();
    Arc::new(KeyPool::new("p", strategy, policy, keys))
}

fn pool(strategy: KeyStrategy) -> Arc<KeyPool> {
    pool_with(strategy, policy(), &["a", "b", "c", "a"])
}

fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
    pairs
        .iter()
        .map(|(k, v)| (http::HeaderName::from_static(k), v.parse().unwrap()))
        .collect()
}

#[test]
fn round_robin_spreads_and_skips_duplicates() {
    let p = pool(KeyStrategy::RoundRobin);
    assert_eq!(p.len(), 3);
    let ids: Vec<String> = (0..6).map(|_| p.lease(&[], None).unwrap().key().id.clone()).collect();
    assert_eq!(ids[0..3], ids[3..6]);
    assert_ne!(ids[0], ids[1]);
    assert_ne!(ids[1], ids[2]);
}

#[test]
fn least_in_flight_prefers_idle_keys_and_leases_release() {
    let p = pool(KeyStrategy::LeastInFlight);
    let a = p.lease(&[], None).unwrap();
    let b = p.lease(&[], None).unwrap();
    let c = p.lease(&[], None).unwrap();
    let mut seen = vec![a.key().id.clone(), b.key().id.clone(), c.key().id.clone()];
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 3, "three leases, three different keys");
    let b_id = b.key().id.clone();
    drop(b);
    assert_eq!(p.lease(&[], None).unwrap().key().id, b_id);
    assert_eq!(p.keys().iter().map(|k| k.in_flight()).sum::<u32>(), 2);
}

#[test]
fn weighted_and_random_follow_their_odds() {
    let keys = vec![
        Arc::new(PoolKey::new("heavy", 9, KeySource::Config)),
        Arc::new(PoolKey::new("light", 1, KeySource::Config)),
    ];
    let p = Arc::new(KeyPool::new("w", KeyStrategy::Weighted, policy(), keys));
    let heavy = (0..2000)
        .filter(|_| p.lease(&[], None).unwrap().key().id == key_id("heavy"))
        .count();
    assert!((1600..2000).contains(&heavy), "heavy picked {heavy} of 2000");
    let p = pool(KeyStrategy::Random);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..3000 {
        *counts.entry(p.lease(&[], None).unwrap().key().id.clone()).or_default() += 1;
    }
    assert!(counts.values().all(|&c| c > 700), "{counts:?}");
}

#[test]
fn a_cooling_key_is_skipped_until_its_deadline_and_none_left_says_when() {
    let p = pool_with(KeyStrategy::RoundRobin, policy(), &["a", "b"]);
    let l = p.lease(&[], None).unwrap();
    let first = l.key().id.clone();
    assert!(matches!(
        l.observe(429, &headers(&[("retry-after", "30")]), None),
        Change::Cooled { .. }
    ));
    drop(l);
    for _ in 0..5 {
        assert_ne!(p.lease(&[], None).unwrap().key().id, first);
    }
    let l = p.lease(&[], None).unwrap();
    l.observe(429, &headers(&[("retry-after", "10")]), None);
    drop(l);
    let err = p.lease(&[], None).unwrap_err();
    let wait = err.retry_at_ms.unwrap() - now_ms();
    assert!((9_000..=10_000).contains(&wait), "soonest recovery: {wait} ms");
}

#[test]
fn avoided_keys_only_when_nothing_else_and_disabled_keys_never() {
    let p = pool_with(KeyStrategy::RoundRobin, policy(), &["a", "b"]);
    let a = key_id("a");
    for _ in 0..4 {
        assert_ne!(p.lease(std::slice::from_ref(&a), None).unwrap().key().id, a);
    }
    let only = pool_with(KeyStrategy::RoundRobin, policy(), &["a"]);
    assert_eq!(only.lease(std::slice::from_ref(&a), None).unwrap().key().id, a);
    for _ in 0..2 {
        only.lease(&[], None)
            .unwrap()
            .observe(401, &http::HeaderMap::new(), None);
    }
    let err = only.lease(&[], None).unwrap_err();
    assert_eq!(err.retry_at_ms, None, "{err:?}");
    assert_eq!(only.keys()[0].state(now_ms()), KeyState::Disabled);
    only.set_status(&a, KeyStatus::reset);
    assert!(only.lease(&[], None).is_ok(), "re-enabled");
}

#[test]
fn model_scoped_cooldown_leaves_other_models_usable() {
    let mut pol = policy();
    pol.scope = CooldownScope::Model;
    let p = pool_with(KeyStrategy::RoundRobin, pol, &["g"]);
    p.lease(&[], Some("a"))
        .unwrap()
        .observe(429, &http::HeaderMap::new(), Some("a"));
    assert!(p.lease(&[], Some("a")).is_err());
    assert!(p.lease(&[], Some("b")).is_ok());
    assert!(p.lease(&[], None).is_ok());
}

#[test]
fn resting_keys_are_a_last_resort() {
    let p = pool_with(KeyStrategy::RoundRobin, policy(), &["a", "b"]);
    let l = p.lease(&[], None).unwrap();
    let tired = l.key().id.clone();
    l.observe(
        200,
        &headers(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "20s"),
        ]),
        None,
    );
    drop(l);
    for _ in 0..4 {
        assert_ne!(p.lease(&[], None).unwrap().key().id, tired);
    }
    let other = p.keys().into_iter().find(|k| k.id != tired).unwrap();
    p.set_status(&other.id, |s| s.key.disabled = Some("test".into()));
    assert_eq!(p.lease(&[], None).unwrap().key().id, tired, "better than a 503");
}

#[test]
fn in_flight_cap_and_stuck_leases() {
    let mut pol = policy();
    pol.max_in_flight_per_key = 1;
    pol.stuck_after = Duration::from_millis(1);
    let p = pool_with(KeyStrategy::RoundRobin, pol, &["a"]);
    let held = p.lease(&[], None).unwrap();
    let err = p.lease(&[], None).unwrap_err();
    assert!(err.reason.contains("max_in_flight_per_key"), "{err:?}");
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(p.reclaim_stuck(), 1);
    assert_eq!(p.keys()[0].in_flight(), 0);
    drop(held);
    assert_eq!(p.keys()[0].in_flight(), 0, "a reclaimed lease is not given back twice");
    assert_eq!(p.reclaimed.load(Ordering::Relaxed), 1);
}

#[test]
fn many_closed_keys_leave_the_list_once() {
    let secrets: Vec<String> = (0..1000).map(|i| format!("key-{i}")).collect();
    let keys = secrets
        .iter()
        .map(|s| Arc::new(PoolKey::new(s, 1, KeySource::Config)))
        .collect();
    let p = Arc::new(KeyPool::new("big", KeyStrategy::RoundRobin, policy(), keys));
    for k in p.keys().iter().step_by(2) {
        k.update(|s| s.key.until_ms = now_ms() + 60_000);
    }
    for _ in 0..2000 {
        let l = p.lease(&[], None).unwrap();
        assert_eq!(l.key().state(now_ms()), KeyState::Active);
    }
    assert_eq!(p.rotation.lock().active.len(), 500);
    assert_eq!(p.count_by_state(now_ms()), [500, 0, 500, 0]);
}

#[test]
fn a_key_back_from_cooldown_takes_one_probe_at_a_time() {
    let p = pool_with(KeyStrategy::RoundRobin, policy(), &["a"]);
    p.lease(&[], None).unwrap().observe(429, &http::HeaderMap::new(), None);
    let key = p.keys()[0].clone();
    // Jump past the deadline.
    key.update(|s| s.key.until_ms = now_ms() - 1);
    let probe = p.lease(&[], None).unwrap();
    assert!(key.probing());
    assert!(p.lease(&[], None).is_err(), "one probe at a time");
    probe.observe(200, &http::HeaderMap::new(), None);
    drop(probe);
    assert!(!key.probing());
    let (a, b) = (p.lease(&[], None).unwrap(), p.lease(&[], None).unwrap());
    assert_eq!(a.key().id, b.key().id, "recovered: many at once again");
}
