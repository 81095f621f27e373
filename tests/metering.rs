//! Token metering as providers really answer: compressed JSON, OpenAI
//! streams that only report usage when asked, and bounded metric labels.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Gateway, MockUpstream};
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::io::Read;

fn config(mock: &MockUpstream) -> String {
    format!(
        "audit:\n  capture_body: true\n  body_max_bytes: 4KiB\nupstreams:\n  oai:\n    provider: openai\n    endpoints: ['{u}']\n    key_pool: oai\n    models: [gpt-4o]\n  ant:\n    provider: anthropic\n    endpoints: ['{u}']\n    key_pool: ant\n  gem:\n    provider: gemini\n    endpoints: ['{u}']\n    key_pool: gem\n  mock:\n    provider: mock\n    mock: {{ chunk_interval: 1ms }}\nkey_pools:\n  oai:\n    keys: [sk-one]\n  ant:\n    keys: [sk-ant]\n  gem:\n    keys: [gem-key]\n",
        u = mock.url()
    )
}

const ROUTES: &str = r#"
routes:
  - { name: chat, match: { path: /v1/chat/completions }, format: openai, upstream: oai }
  - { name: messages, match: { path: /v1/messages }, format: anthropic, upstream: ant }
  - { name: gemini, match: { path: "/v1beta/{*rest}" }, format: gemini, upstream: gem }
  - { name: mock-chat, match: { path: /mock/v1/chat/completions, model: ["mock-*"] }, format: openai, upstream: mock, transform: { strip_prefix: /mock } }
"#;

async fn start() -> (MockUpstream, Gateway, String) {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(&config(&mock), &[("r.yaml", ROUTES)]).await;
    let (_, secret) = gw.create_key(&[]);
    gw.wait_key(&secret, "/v1/messages").await;
    mock.clear();
    (mock, gw, secret)
}

fn decompress(encoding: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        "gzip" => flate2::read::GzDecoder::new(data).read_to_end(&mut out).unwrap(),
        "br" => brotli::Decompressor::new(data, 4096).read_to_end(&mut out).unwrap(),
        "zstd" => zstd::stream::read::Decoder::new(data)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap(),
        other => panic!("{other}"),
    };
    out
}

#[tokio::test]
async fn compressed_answers_reach_the_client_compressed_and_are_metered() {
    let (mock, gw, secret) = start().await;
    let c = reqwest::Client::new();
    let calls: [(&str, Value, (u64, u64)); 3] = [
        (
            "/v1/chat/completions",
            json!({"model": "gpt-4o", "messages": []}),
            (9, 1),
        ),
        (
            "/v1/messages",
            json!({"model": "claude", "max_tokens": 5, "messages": []}),
            (12, 3),
        ),
        (
            "/v1beta/models/gemini-2.0-flash:generateContent",
            json!({"contents": []}),
            (5, 1),
        ),
    ];
    let mut ids = Vec::new();
    for encoding in ["gzip", "br", "zstd"] {
        for (path, body, tokens) in &calls {
            let r = c
                .post(gw.url(path))
                .bearer_auth(&secret)
                .header("accept-encoding", format!("{encoding}, identity;q=0.5"))
                .json(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["content-encoding"], encoding, "{path}");
            let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
            let plain = decompress(encoding, &r.bytes().await.unwrap());
            let answer: Value = serde_json::from_slice(&plain).unwrap();
            assert!(answer.to_string().contains("\"Hi\""), "{answer}");
            ids.push((id, *tokens, encoding));
        }
    }
    assert_eq!(mock.seen().len(), 9);
    assert!(mock.seen().iter().all(|s| s.header("accept-encoding").is_some()));
    let rows = gw.wait_audit_ids(ids.iter().map(|(id, _, _)| id)).await;
    for (id, (prompt, completion), encoding) in &ids {
        let row = rows.iter().find(|r| &r.request_id == id).unwrap();
        assert_eq!(
            (row.prompt_tokens, row.completion_tokens),
            (Some(*prompt), Some(*completion)),
            "{encoding}: {row:?}"
        );
        let captured = row.response_body.as_deref().unwrap();
        assert!(
            captured.contains("\"Hi\""),
            "captured bodies are decoded text: {captured}"
        );
    }
}

/// The SSE events of a response, as (data) strings.
async fn events(r: reqwest::Response) -> Vec<String> {
    let mut text = String::new();
    let mut s = r.bytes_stream();
    while let Some(chunk) = s.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn openai_streams_are_metered_and_the_usage_chunk_only_reaches_clients_that_asked() {
    let (mock, gw, secret) = start().await;
    let c = reqwest::Client::new();
    let send = |body: Value, path: &'static str| c.post(gw.url(path)).bearer_auth(&secret).json(&body).send();

    // Not a stream: the body goes upstream untouched (OpenAI refuses
    // stream_options without stream).
    let plain = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let r = send(plain.clone(), "/v1/chat/completions").await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(mock.last().json(), plain);

    // A stream that did not ask for usage: asked upstream, hidden from the client.
    let r = send(
        json!({"model": "gpt-4o", "stream": true, "messages": []}),
        "/v1/chat/completions",
    )
    .await
    .unwrap();
    let quiet_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let got = events(r).await;
    assert_eq!(mock.last().json()["stream_options"], json!({"include_usage": true}));
    assert_eq!(got.len(), 6, "{got:?}");
    assert!(got.iter().all(|e| !e.contains("\"choices\":[]")), "{got:?}");
    assert_eq!(got.last().unwrap(), "[DONE]");

    // Explicitly false: same.
    let r = send(
        json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": false}, "messages": []}),
        "/v1/chat/completions",
    )
    .await
    .unwrap();
    let got = events(r).await;
    assert_eq!(mock.last().json()["stream_options"]["include_usage"], json!(true));
    assert!(got.iter().all(|e| !e.contains("\"usage\"")), "{got:?}");

    // A client that asked gets the chunk.
    let r = send(
        json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}, "messages": []}),
        "/v1/chat/completions",
    )
    .await
    .unwrap();
    let asked_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let got = events(r).await;
    assert!(
        got.iter()
            .any(|e| e.contains("\"choices\":[]") && e.contains("\"usage\"")),
        "{got:?}"
    );

    // The built-in mock behaves the same.
    let r = send(
        json!({"model": "mock-1", "stream": true, "messages": []}),
        "/mock/v1/chat/completions",
    )
    .await
    .unwrap();
    let mock_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let got = events(r).await;
    assert!(got.iter().all(|e| !e.contains("\"usage\"")), "{got:?}");

    let ids = [quiet_id.clone(), asked_id.clone(), mock_id.clone()];
    let rows = gw.wait_audit_ids(ids.iter()).await;
    let row = |id: &str| rows.iter().find(|r| r.request_id == id).unwrap().clone();
    for id in [&quiet_id, &asked_id] {
        let r = row(id);
        assert_eq!((r.prompt_tokens, r.completion_tokens), (Some(9), Some(5)), "{r:?}");
    }
    assert!(row(&mock_id).completion_tokens.unwrap() > 5);
}

#[tokio::test]
async fn token_metrics_name_known_models_and_count_the_rest_as_other() {
    let (_mock, gw, secret) = start().await;
    let c = reqwest::Client::new();
    for model in ["gpt-4o", "mock-1", "mock-zz1", "mock-zz2", "mock-zz3"] {
        let path = if model == "gpt-4o" {
            "/v1/chat/completions"
        } else {
            "/mock/v1/chat/completions"
        };
        let r = c
            .post(gw.url(path))
            .bearer_auth(&secret)
            .json(&json!({"model": model, "messages": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await;
    }
    let metrics = common::eventually_text(|| c.get(gw.admin_url("/metrics")), |m| m.contains("model=\"other\"")).await;
    assert!(
        metrics.contains(r#"fastgate_tokens_total{kind="prompt",model="gpt-4o",route="chat"} 9"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"model="mock-1""#), "{metrics}");
    assert!(!metrics.contains("mock-zz"), "{metrics}");
}

/// The decoder and scanner alone, every coding, however the body is cut.
#[test]
fn compressed_answers_are_decoded_for_metering_and_capture() {
    let body = format!(
        r#"{{"id":"x","choices":[{{"message":{{"content":"{}"}}}}],"usage":{{"prompt_tokens":11,"completion_tokens":22}}}}"#,
        "word ".repeat(5000)
    );
    for encoding in ["gzip", "deflate", "br", "zstd", "identity"] {
        let packed = if encoding == "identity" {
            body.as_bytes().to_vec()
        } else {
            common::compress(encoding, body.as_bytes())
        };
        for chunk_size in [1, 7, 1000, packed.len()] {
            let mut m = fastgate::usage::UsageMeter::new(Some("application/json"), Some(encoding), Some(64));
            packed.chunks(chunk_size).for_each(|c| m.feed(c));
            assert_eq!(
                m.finish(),
                fastgate::usage::Usage {
                    prompt_tokens: Some(11),
                    completion_tokens: Some(22),
                    ..Default::default()
                },
                "{encoding} in chunks of {chunk_size}"
            );
            assert_eq!(m.take_capture().unwrap(), &body.as_bytes()[..64], "{encoding}");
        }
    }
    // Raw deflate (no zlib header), as some servers send it.
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut e, body.as_bytes()).unwrap();
    let mut m = fastgate::usage::UsageMeter::new(Some("application/json"), Some("deflate"), None);
    m.feed(&e.finish().unwrap());
    assert_eq!(m.finish().completion_tokens, Some(22));
}
