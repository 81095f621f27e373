//! Route matching with 1,000 routes: the per-request cost of the router.
//! Run: cargo bench --bench route_match
#![allow(clippy::unwrap_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use fastgate::{config::FileConfig, router::RouteTable, router::compile_sources};
use http::{HeaderMap, Method};
use std::{fmt::Write, hint::black_box, path::PathBuf};

fn table(n: usize) -> RouteTable {
    let config: FileConfig =
        serde_norway::from_str("upstreams:\n  u: {provider: openai, endpoints: ['http://127.0.0.1:1']}\n").unwrap();
    let mut yaml = String::from("routes:\n");
    for i in 0..n {
        // A realistic mix: static paths, parameters, catch-alls, model globs.
        let path = match i % 4 {
            0 => format!("/t{i}/v1/chat/completions"),
            1 => format!("/t{i}/v1/{{*rest}}"),
            2 => format!("/t{i}/files/{{id}}"),
            _ => "/v1/chat/completions".to_string(),
        };
        let model = if i % 4 == 3 {
            format!(", model: ['m{i}-*']")
        } else {
            String::new()
        };
        writeln!(
            yaml,
            "  - {{ name: r{i}, match: {{ path: '{path}'{model} }}, upstream: u, priority: {} }}",
            i % 7
        )
        .unwrap();
    }
    compile_sources(&[(PathBuf::from("bench.yaml"), yaml)], &config).unwrap()
}

fn bench(c: &mut Criterion) {
    let t = table(1000);
    let headers = HeaderMap::new();
    let mut g = c.benchmark_group("route_match_1000");
    g.bench_function("static_path", |b| {
        b.iter(|| {
            black_box(
                t.candidates(&Method::POST, None, black_box("/t500/v1/chat/completions"), &headers)
                    .len(),
            )
        })
    });
    g.bench_function("catch_all", |b| {
        b.iter(|| {
            black_box(
                t.candidates(&Method::GET, None, black_box("/t501/v1/models"), &headers)
                    .len(),
            )
        })
    });
    g.bench_function("shared_path_250_model_globs", |b| {
        b.iter(|| {
            let c = t.candidates(&Method::POST, None, black_box("/v1/chat/completions"), &headers);
            black_box(t.pick(&c, Some("m999-large")).map(|r| r.order))
        })
    });
    g.bench_function("no_match", |b| {
        b.iter(|| {
            black_box(
                t.candidates(&Method::GET, None, black_box("/nothing/here"), &headers)
                    .len(),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
