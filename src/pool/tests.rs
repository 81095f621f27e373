use super::*;
use crate::config::CooldownConfig;
use std::{collections::HashMap, time::Duration};

fn policy() -> Policy {
    let cooldown = CooldownConfig {
        after_5xx: 1,
        ..CooldownConfig::default()
    };
    Policy::new(CooldownScope::Key, cooldown, 2, 0)
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

#[test]
fn a_success_leased_before_a_cooldown_neither_reopens_it_nor_resets_its_backoff() {
    let p = pool_with(KeyStrategy::RoundRobin, policy(), &["a"]);
    let key = p.keys()[0].clone();
    let early: Vec<Lease> = (0..8).map(|_| p.lease(&[], None).unwrap()).collect();
    let late_429 = p.lease(&[], None).unwrap();
    assert!(matches!(
        late_429.observe(429, &headers(&[("retry-after", "30")]), None),
        Change::Cooled { .. }
    ));
    let version = key.status().version;
    // The rest of the window's answers: more 429s and late successes.
    for (i, l) in early.iter().enumerate() {
        let status = if i % 2 == 0 { 429 } else { 200 };
        let change = l.observe(status, &http::HeaderMap::new(), None);
        assert!(matches!(change, Change::Counted | Change::None), "{status}: {change:?}");
    }
    let st = key.status();
    assert_eq!(st.key.backoff_step, 1, "one failure window, one step");
    assert_eq!(st.version, version, "stale answers decide nothing");
    assert_eq!(key.state(now_ms()), KeyState::Cooling);
    assert!(p.lease(&[], None).is_err());
    // The half-open probe decides: its success reopens and is a recovery.
    drop((early, late_429));
    key.update(|s| s.key.until_ms = now_ms() - 1);
    p.relist();
    let probe = p.lease(&[], None).unwrap();
    assert_eq!(
        probe.observe(200, &http::HeaderMap::new(), None),
        Change::Recovered { model: None }
    );
    assert_eq!(key.status().key.backoff_step, 0);
    assert!(key.status().version > version);
    assert!(!key.probing());
}

#[test]
fn per_model_gates_keep_their_window_too() {
    let mut pol = policy();
    pol.scope = CooldownScope::Model;
    let p = pool_with(KeyStrategy::RoundRobin, pol, &["g"]);
    let key = p.keys()[0].clone();
    let early = p.lease(&[], Some("m")).unwrap();
    p.lease(&[], Some("m"))
        .unwrap()
        .observe(429, &http::HeaderMap::new(), Some("m"));
    early.observe(200, &http::HeaderMap::new(), Some("m"));
    early.observe(429, &http::HeaderMap::new(), Some("m"));
    assert_eq!(key.status().models["m"].backoff_step, 1);
    assert!(p.lease(&[], Some("m")).is_err(), "the model stays cooling");
    assert!(p.lease(&[], Some("other")).is_ok());
}

#[test]
fn one_5xx_does_not_cool_but_after_5xx_in_a_row_do_and_overload_cools_at_once() {
    let mut pol = policy();
    pol.cooldown.after_5xx = 3;
    let p = pool_with(KeyStrategy::RoundRobin, pol, &["a"]);
    let key = p.keys()[0].clone();
    let see = |s: u16, h: &[(&'static str, &str)]| p.lease(&[], None).unwrap().observe(s, &headers(h), None);
    assert_eq!(see(500, &[]), Change::Counted);
    assert_eq!(see(502, &[]), Change::Counted);
    assert_eq!(see(200, &[]), Change::Counted, "a success ends the streak");
    assert_eq!(see(500, &[]), Change::Counted);
    assert_eq!(see(500, &[]), Change::Counted);
    assert_eq!(key.state(now_ms()), KeyState::Active);
    assert!(matches!(see(500, &[]), Change::Cooled { .. }), "the third in a row");
    key.update(KeyStatus::reset);
    assert!(matches!(see(529, &[]), Change::Cooled { .. }), "overloaded");
    key.update(KeyStatus::reset);
    assert!(matches!(see(503, &[("retry-after", "2")]), Change::Cooled { .. }));
}

#[test]
fn retry_now_still_waits_the_backoff_floor() {
    let p = pool_with(KeyStrategy::RoundRobin, policy(), &["a"]);
    let key = p.keys()[0].clone();
    for h in [
        ("retry-after", "0"),
        ("retry-after", "Wed, 31 Dec 2025 00:00:00 GMT"),
        ("x-ratelimit-reset-requests", "6ms"),
    ] {
        key.update(KeyStatus::reset);
        p.relist();
        let before = now_ms();
        p.lease(&[], None).unwrap().observe(429, &headers(&[h]), None);
        let until = key.status().key.until_ms;
        assert!(until - before >= 1000, "{h:?}: {} ms", until - before);
        assert!(p.lease(&[], None).is_err(), "{h:?}");
    }
}

#[test]
fn a_slow_probe_blocks_others_only_for_the_probe_hold() {
    let p = pool_with(KeyStrategy::RoundRobin, policy(), &["a"]);
    p.lease(&[], None).unwrap().observe(429, &http::HeaderMap::new(), None);
    let key = p.keys()[0].clone();
    key.update(|s| s.key.until_ms = now_ms() - 1);
    let _probe = p.lease(&[], None).unwrap();
    assert!(p.lease(&[], None).is_err(), "one probe at a time");
    key.probe_since.store(now_ms() - PROBE_HOLD_MS, Ordering::Relaxed);
    let _next = p.lease(&[], None).expect("a probe past its hold blocks nobody");
    assert!(p.lease(&[], None).is_err(), "the next request is the probe now");
}

#[test]
fn remote_states_apply_only_when_newer_and_ties_go_to_the_more_closed() {
    let p = pool_with(KeyStrategy::RoundRobin, policy(), &["a"]);
    let key = p.keys()[0].clone();
    let id = key.id.clone();
    // Locally: cooled (version 1).
    p.lease(&[], None)
        .unwrap()
        .observe(429, &headers(&[("retry-after", "30")]), None);
    let local = key.status();
    assert_eq!(local.version, 1);
    // A stale stored state (version 0, open) must not reopen the key.
    assert!(!p.apply_remote(&id, KeyStatus::default()));
    assert_eq!(key.state(now_ms()), KeyState::Cooling);
    // A tie that is more open loses; a tie that is more closed wins.
    let open_tie = KeyStatus {
        version: 1,
        ..KeyStatus::default()
    };
    assert!(!p.apply_remote(&id, open_tie));
    let mut disabled = KeyStatus {
        version: 1,
        ..KeyStatus::default()
    };
    disabled.key.disabled = Some("401 unauthorized x3".into());
    assert!(p.apply_remote(&id, disabled));
    assert_eq!(key.state(now_ms()), KeyState::Disabled);
    // A newer deliberate re-enable from another node wins, and the clock
    // follows it.
    let recovered = KeyStatus {
        version: 7,
        revived: 7,
        ..KeyStatus::default()
    };
    assert!(p.apply_remote(&id, recovered));
    assert_eq!(key.state(now_ms()), KeyState::Active);
    // The next local decision outranks it.
    p.lease(&[], None).unwrap().observe(429, &http::HeaderMap::new(), None);
    assert_eq!(key.status().version, 8);
    // An admin change is a decision too.
    p.set_status(&id, KeyStatus::reset);
    assert_eq!(key.status().version, 9);
}

#[test]
fn a_cap_of_one_never_has_two_holders_under_threads() {
    use std::sync::atomic::AtomicU32;
    let mut pol = policy();
    pol.max_in_flight_per_key = 1;
    let p = pool_with(KeyStrategy::LeastInFlight, pol, &["a"]);
    let holders = Arc::new(AtomicU32::new(0));
    let max = Arc::new(AtomicU32::new(0));
    let leased = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (p, holders, max, leased) = (p.clone(), holders.clone(), max.clone(), leased.clone());
            // Until 2,000 leases were taken in all (a count, not a number of
            // tries: on two loaded cores a holder is often preempted, and
            // the others' tries then all fail), within a generous bound.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            std::thread::spawn(move || {
                while leased.load(Ordering::Relaxed) < 2_000 && std::time::Instant::now() < deadline {
                    if let Ok(l) = p.lease(&[], None) {
                        let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
                        max.fetch_max(now, Ordering::SeqCst);
                        leased.fetch_add(1, Ordering::Relaxed);
                        std::hint::spin_loop();
                        holders.fetch_sub(1, Ordering::SeqCst);
                        drop(l);
                    } else {
                        std::thread::yield_now();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(max.load(Ordering::SeqCst), 1, "two holders under a cap of 1");
    assert!(leased.load(Ordering::Relaxed) >= 2_000);
    assert_eq!(p.keys()[0].in_flight(), 0);
}

#[test]
fn a_half_open_key_never_gets_two_probes_under_threads() {
    use std::sync::atomic::AtomicU32;
    let p = pool_with(KeyStrategy::RoundRobin, policy(), &["a"]);
    let key = p.keys()[0].clone();
    let holders = Arc::new(AtomicU32::new(0));
    let max = Arc::new(AtomicU32::new(0));
    for _ in 0..50 {
        // Cooled and expired: half-open.
        key.update(|s| {
            s.key.backoff_step = 1;
            s.key.until_ms = now_ms() - 1;
        });
        key.probe_since.store(0, Ordering::Relaxed);
        p.relist();
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (p, holders, max) = (p.clone(), holders.clone(), max.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        if let Ok(l) = p.lease(&[], None) {
                            let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
                            max.fetch_max(now, Ordering::SeqCst);
                            std::hint::spin_loop();
                            holders.fetch_sub(1, Ordering::SeqCst);
                            drop(l);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
    assert_eq!(max.load(Ordering::SeqCst), 1, "two probes at once");
}
