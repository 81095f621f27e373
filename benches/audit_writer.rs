//! Audit writer throughput: rows per second the background writer sustains
//! (batched transactions, WAL), measured from first enqueue to the final
//! flush. Run: cargo bench --bench audit_writer
#![allow(clippy::unwrap_used)]

use fastgate::{audit::AuditSink, config::AuditConfig, store::audit::AuditRecord};
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
        client_ip: Some("10.1.2.3".into()),
        user_agent: Some("OpenAI/Python 1.54.0".into()),
        request_headers: Some(r#"{"content-type":"application/json","authorization":"[redacted]"}"#.into()),
        ..Default::default()
    }
}

fn main() {
    let n: u64 = std::env::var("ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    for batch in [64usize, 512, 2048] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig {
            batch_size: batch,
            queue_size: n as usize,
            ..AuditConfig::default()
        };
        let sink = AuditSink::start(&dir.path().join("bench.db"), &cfg).unwrap();
        let started = Instant::now();
        let mut enqueue_ns = 0u128;
        for i in 0..n {
            let t = Instant::now();
            assert!(sink.record(record(i)));
            enqueue_ns += t.elapsed().as_nanos();
        }
        sink.close();
        let secs = started.elapsed().as_secs_f64();
        println!(
            "audit_writer batch={batch:>5}: {n} rows in {secs:.2} s = {:>8.0} rows/s sustained; enqueue {:.0} ns/row on the request path",
            n as f64 / secs,
            enqueue_ns as f64 / n as f64
        );
    }
}
