//! Property tests over what request and response bytes reach: the usage
//! reader (any body, any coding, any split), the OpenAI usage-chunk filter,
//! credential extraction and query scrubbing, and the config and routes.d
//! loaders. Nothing reachable from those bytes may panic. A failing case is
//! kept by proptest under `proptest-regressions/` and replayed on every run.
//! `.ci/run` runs this file once more with many more cases.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use fastgate::{
    auth,
    proxy::rewrite,
    usage::{Usage, UsageMeter, chunk_filter::UsageChunkFilter},
};
use proptest::prelude::*;

/// Cut `data` at the given fractions (any order, duplicates fine).
fn split(data: &[u8], cuts: &[f64]) -> Vec<Vec<u8>> {
    let mut at: Vec<usize> = cuts.iter().map(|f| (f * data.len() as f64) as usize).collect();
    at.sort_unstable();
    let mut out = Vec::new();
    let mut from = 0;
    for a in at.into_iter().chain([data.len()]) {
        out.push(data[from..a.max(from)].to_vec());
        from = a.max(from);
    }
    out
}

fn content_types() -> impl Strategy<Value = Option<&'static str>> {
    prop::sample::select(vec![
        None,
        Some("application/json"),
        Some("text/event-stream"),
        Some("application/x-ndjson"),
        Some("text/plain"),
    ])
}

fn encodings() -> impl Strategy<Value = Option<&'static str>> {
    prop::sample::select(vec![
        None,
        Some("gzip"),
        Some("deflate"),
        Some("br"),
        Some("zstd"),
        Some("x-unknown"),
    ])
}

proptest! {
    #[test]
    fn the_usage_reader_takes_any_bytes(
        body in prop::collection::vec(any::<u8>(), 0..4096),
        cuts in prop::collection::vec(0.0..1.0f64, 0..8),
        ct in content_types(),
        enc in encodings(),
    ) {
        let mut m = UsageMeter::new(ct, enc, Some(64));
        for part in split(&body, &cuts) {
            m.feed(&part);
        }
        let _ = m.finish();
        prop_assert!(m.take_capture().is_none_or(|c| c.len() <= 64));
    }

    #[test]
    fn json_text_with_usage_is_read_whatever_the_coding_and_split(
        text in any::<String>(),
        prompt in 0u64..1_000_000,
        completion in 0u64..1_000_000,
        cuts in prop::collection::vec(0.0..1.0f64, 0..8),
        enc in prop::sample::select(vec!["identity", "gzip", "deflate", "br", "zstd"]),
        sse in any::<bool>(),
    ) {
        let answer = serde_json::json!({
            "id": "x",
            "choices": [{"message": {"content": text, "usage": {"prompt_tokens": 1}}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
        })
        .to_string();
        let plain = if sse { format!("data: {answer}\r\n\r\ndata: [DONE]\n\n") } else { answer };
        let body = if enc == "identity" { plain.into_bytes() } else { common::compress(enc, plain.as_bytes()) };
        let ct = if sse { "text/event-stream" } else { "application/json" };
        let mut m = UsageMeter::new(Some(ct), Some(enc), None);
        for part in split(&body, &cuts) {
            m.feed(&part);
        }
        prop_assert_eq!(m.finish(), Usage { prompt_tokens: Some(prompt), completion_tokens: Some(completion) });
    }

    #[test]
    fn the_usage_chunk_filter_passes_everything_else_unchanged(
        body in prop::collection::vec(any::<u8>(), 0..4096),
        cuts in prop::collection::vec(0.0..1.0f64, 0..8),
    ) {
        let mut f = UsageChunkFilter::default();
        let mut out = Vec::new();
        for part in split(&body, &cuts) {
            out.extend_from_slice(&f.filter(Bytes::from(part)));
        }
        out.extend_from_slice(&f.flush());
        if !body.windows(12).any(|w| w == b"\"choices\":[]") {
            prop_assert_eq!(out, body);
        } else {
            prop_assert!(out.len() <= body.len());
        }
    }

    #[test]
    fn credentials_are_found_and_gateway_keys_never_forwarded(
        value in "[ -~]{0,80}",
        key_body in "[A-Za-z0-9]{32}",
        query in "[a-z=&%0-9_]{0,60}",
        drop_key in any::<bool>(),
    ) {
        let mut headers = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_str(&value) {
            headers.insert(http::header::AUTHORIZATION, v.clone());
            headers.insert("x-api-key", v);
        }
        let _ = auth::extract_credential(&headers, Some(&query));
        let _ = auth::holds_gateway_key(value.as_bytes());
        let key = format!("fg_{key_body}");
        for q in [query.clone(), format!("{query}&key={key}"), format!("token={key}&{query}")] {
            let out = rewrite::forwarded_query(&q, drop_key);
            prop_assert!(!auth::holds_gateway_key(out.as_bytes()), "{q} -> {out}");
        }
    }

    #[test]
    fn the_config_loader_takes_any_text(raw in ".{0,400}") {
        let _ = fastgate::config::parse_config(std::path::Path::new("fuzz.yaml"), &raw);
    }

    #[test]
    fn the_config_loader_takes_mangled_valid_config(
        cut in 0.0..1.0f64,
        insert in "[ -~\n]{0,20}",
    ) {
        let valid = include_str!("../conf/fastgate.yaml");
        let at = valid.char_indices().map(|(i, _)| i).nth((cut * valid.chars().count() as f64) as usize).unwrap_or(valid.len());
        let raw = format!("{}{insert}{}", &valid[..at], &valid[at..]);
        let _ = fastgate::config::parse_config(std::path::Path::new("fuzz.yaml"), &raw);
    }

    #[test]
    fn the_routes_loader_takes_any_text(raw in ".{0,400}", mangle in "[ -~\n]{0,30}") {
        let config = fastgate::config::FileConfig::default();
        let valid = "routes:\n  - { name: r, match: { path: \"/v1/{*rest}\", model: [\"gpt-*\"] }, upstream: u }\n";
        let sources = vec![
            (std::path::PathBuf::from("a.yaml"), raw),
            (std::path::PathBuf::from("b.yaml"), format!("{valid}{mangle}")),
        ];
        let _ = fastgate::config::routes_d::compile_sources(&sources, &config);
    }
}
