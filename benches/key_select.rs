//! Key selection under contention: lease + observe(200) + release, the
//! per-request cost of a key pool, from 1, 16 and 64 concurrent tasks on a
//! 2-thread runtime, for pools of 10 and 1,000 keys with half of them
//! cooling down.
#![allow(clippy::unwrap_used)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fastgate::{
    clock::now_ms,
    config::{CooldownConfig, CooldownScope, KeyStrategy},
    pool::{KeyPool, KeySource, Policy, PoolKey},
};
use std::{hint::black_box, sync::Arc, time::Instant};

fn pool(size: usize, strategy: KeyStrategy) -> Arc<KeyPool> {
    let policy = Policy::new(CooldownScope::Key, CooldownConfig::default(), 3, 0);
    let keys = (0..size)
        .map(|i| Arc::new(PoolKey::new(&format!("sk-bench-{i}"), 1, KeySource::Config)))
        .collect();
    let pool = Arc::new(KeyPool::new("bench", strategy, policy, keys));
    let until = now_ms() + 3_600_000;
    for k in pool.keys().iter().step_by(2) {
        pool.set_status(&k.id, |s| s.key.until_ms = until);
    }
    pool
}

fn select(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let ok = http::HeaderMap::new();
    for strategy in [KeyStrategy::RoundRobin, KeyStrategy::LeastInFlight] {
        let mut group = c.benchmark_group(format!("key_select/{}", strategy.as_str()));
        group.throughput(Throughput::Elements(1));
        for size in [10usize, 1000] {
            let p = pool(size, strategy);
            for tasks in [1u64, 16, 64] {
                let id = BenchmarkId::new(format!("{size}_keys_half_cooling"), format!("{tasks}_tasks"));
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let per_task = iters.div_ceil(tasks);
                        let started = Instant::now();
                        rt.block_on(async {
                            let handles: Vec<_> = (0..tasks)
                                .map(|_| {
                                    let (p, ok) = (p.clone(), ok.clone());
                                    tokio::spawn(async move {
                                        for _ in 0..per_task {
                                            let lease = p.lease(&[], Some("gpt-4o")).unwrap();
                                            black_box(lease.observe(200, &ok, Some("gpt-4o")));
                                        }
                                    })
                                })
                                .collect();
                            for h in handles {
                                h.await.unwrap();
                            }
                        });
                        // Time per lease, scaled to what criterion asked for.
                        started.elapsed().mul_f64(iters as f64 / (per_task * tasks) as f64)
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, select);
criterion_main!(benches);
