//! Audit store throughput and CPU: rows per second from the first enqueue
//! until the indexer has every row in SQLite, the CPU per row of the writer
//! (segment appends) and of the indexer (SQLite), and the request path's
//! cost (encode + enqueue). Run: cargo bench --bench audit_writer
#![allow(clippy::unwrap_used)]

use fastgate::{
    audit::{AuditSink, entry::AuditEntry},
    config::AuditConfig,
    store::audit::AuditRecord,
};
use std::sync::atomic::Ordering;
use std::time::Instant;

fn record(i: u64) -> AuditRecord {
    AuditRecord {
        request_id: format!("01a2014e1c3c7389b51ce8bade{i:06}"),
        ts_ms: fastgate::clock::now_ms(),
        key_id: Some("key_abcdefghijkl".into()),
        route: Some("openai-chat".into()),
        upstream: Some("openai".into()),
        endpoint: Some("https://api.openai.com".into()),
        upstream_key_id: Some("k_1a2b3c4d".into()),
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        status: 200,
        model: Some("gpt-4o-mini".into()),
        stream: i.is_multiple_of(2),
        ttfb_ms: Some(312.5),
        duration_ms: 1840.2,
        request_bytes: 1234,
        response_bytes: 5678,
        chunks: 42,
        prompt_tokens: Some(120),
        completion_tokens: Some(380),
        cache_read_tokens: Some(0),
        cost: Some(0.000_246),
        price_version: Some("builtin/2026-11-20".into()),
        client_ip: Some("10.1.2.3".into()),
        user_agent: Some("OpenAI/Python 1.54.0".into()),
        request_headers: Some(r#"{"content-type":"application/json","authorization":"[redacted]"}"#.into()),
        ..Default::default()
    }
}

/// CPU seconds (user + system) each thread of this process named in
/// `names` has used, from `/proc/self/task/*/stat` (10 ms resolution).
fn thread_cpu(names: &[&str]) -> Vec<f64> {
    let tick = 100.0; // USER_HZ on Linux
    let mut out = vec![0.0; names.len()];
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let Some(i) = names.iter().position(|n| comm.trim() == *n) else {
            continue;
        };
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the `(comm)`: state is 3rd, utime 14th, stime 15th.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        let (u, s): (f64, f64) = (f[11].parse().unwrap(), f[12].parse().unwrap());
        out[i] += (u + s) / tick;
    }
    out
}

fn main() {
    let n: u64 = std::env::var("ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    for batch in [512usize, 2048] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig {
            batch_size: batch,
            queue_size: n as usize,
            ..AuditConfig::default()
        };
        let sink = AuditSink::start(&dir.path().join("bench.db"), &cfg).unwrap();
        let started = Instant::now();
        let mut enqueue_ns = 0u128;
        let mut cpu = [0.0; 2];
        for i in 0..n {
            let r = record(i);
            let t = Instant::now();
            assert!(sink.record_entry(&AuditEntry::from(&r)));
            enqueue_ns += t.elapsed().as_nanos();
            if i + 1 == n {
                // Threads' CPU is read before close: they end with it.
                while sink.stats().written.load(Ordering::Relaxed) < n {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                let c = thread_cpu(&["audit-writer", "audit-indexer"]);
                cpu = [c[0], c[1]];
            }
        }
        let secs = started.elapsed().as_secs_f64();
        sink.close();
        let per_row = |s: f64| s * 1e6 / n as f64;
        println!(
            "audit batch={batch:>5}: {n} rows indexed in {secs:.2} s = {:>8.0} rows/s; CPU per row: writer {:.2} µs, indexer {:.2} µs; request path (encode + enqueue) {:.0} ns",
            n as f64 / secs,
            per_row(cpu[0]),
            per_row(cpu[1]),
            enqueue_ns as f64 / n as f64
        );
    }
}
