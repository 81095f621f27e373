//! Property tests over what request and response bytes reach: the usage
//! reader (any body, any coding, any split), the OpenAI usage-chunk filter,
//! credential extraction and query scrubbing, the config and routes.d
//! loaders, and the stream converters. Nothing reachable from those bytes
//! may panic. A failing case is
//! kept by proptest under `proptest-regressions/` and replayed on every run.
//! `.ci/run` runs this file once more with many more cases.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use fastgate::{
    auth,
    convert::{
        openai::ToolNames,
        sse::SseParser,
        stream::{Converter, Decoder, Encoder, anthropic, gemini, openai},
    },
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

/// Stream-event-like text: real event lines mixed with noise.
fn stream_text() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec![
        "data: ",
        "event: ",
        "\n",
        "\r\n",
        "\r",
        ": c\n",
        "[DONE]",
        "{\"type\":\"message_start\",\"message\":{\"id\":\"m\"}}",
        "{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t\",\"name\":\"f\"}}",
        "{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\"}}",
        "{\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":3}}",
        "{\"type\":\"message_stop\"}",
        "{\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"function\":{\"arguments\":\"x\"}}]}}]}",
        "{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"é\"},\"finish_reason\":\"stop\"}]}",
        "{\"candidates\":[{\"content\":{\"parts\":[{\"functionCall\":{\"name\":\"f\",\"args\":{}}}]},\"finishReason\":\"STOP\"}]}",
        "{\"error\":{\"message\":\"x\"}}",
        "[",
        ",",
        "]",
        "{",
        "}",
        "\"",
    ]);
    prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

fn decoders(i: usize) -> Box<dyn Decoder> {
    match i % 3 {
        0 => Box::new(openai::OpenaiDecoder::new(ToolNames::default())),
        1 => Box::new(anthropic::AnthropicDecoder::default()),
        _ => Box::new(gemini::GeminiDecoder::default()),
    }
}

fn encoders(i: usize) -> Box<dyn Encoder> {
    match i % 4 {
        0 => Box::new(openai::OpenaiEncoder::new("m", 1, true)),
        1 => Box::new(anthropic::AnthropicEncoder::new("m")),
        2 => Box::new(gemini::GeminiEncoder::new("m", false)),
        _ => Box::new(gemini::GeminiEncoder::new("m", true)),
    }
}

proptest! {
    /// Any upstream bytes, cut anywhere: no panic, and every event written
    /// is whole (SSE data is JSON or `[DONE]`; a JSON-array stream is JSON).
    #[test]
    fn stream_converters_take_any_bytes_and_write_whole_events(
        text in stream_text(),
        noise in prop::collection::vec(any::<u8>(), 0..64),
        cuts in prop::collection::vec(0.0f64..1.0, 0..6),
        dec in 0usize..3,
        enc in 0usize..4,
        array_in in any::<bool>(),
    ) {
        let mut bytes = text.into_bytes();
        bytes.extend_from_slice(&noise);
        let mut conv = Converter::new(decoders(dec), encoders(enc), array_in);
        let mut out = Vec::new();
        for piece in split(&bytes, &cuts) {
            out.extend(conv.feed(&piece));
        }
        out.extend(conv.finish());
        let out = String::from_utf8(out).unwrap();
        if enc == 3 {
            let parsed: Result<Vec<serde_json::Value>, _> = serde_json::from_str(&out);
            prop_assert!(parsed.is_ok(), "not a JSON array: {out}");
        } else {
            for e in SseParser::parse_all(out.as_bytes()) {
                prop_assert!(e.data == "[DONE]" || serde_json::from_str::<serde_json::Value>(&e.data).is_ok(), "bad event {e:?}");
            }
        }
    }

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
        prop_assert_eq!(m.finish(), Usage { prompt_tokens: Some(prompt), completion_tokens: Some(completion), ..Default::default() });
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
        // Only an event that parses to a usage-only chunk goes, and such
        // an event names `usage` (literally or through a `\u` escape).
        if !body.windows(5).any(|w| w == b"usage") && !body.windows(2).any(|w| w == b"\\u") {
            prop_assert_eq!(out, body);
        } else {
            prop_assert!(out.len() <= body.len());
        }
    }

    #[test]
    fn credentials_are_found_where_each_sdk_puts_them(
        junk in "[ -~]{0,80}",
        key_body in "[A-Za-z0-9]{32}",
        query in "[a-z=&%0-9_]{0,60}",
        place in 0..4usize,
    ) {
        let key = format!("fg_{key_body}");
        let mut headers = http::HeaderMap::new();
        // Junk somewhere that carries no credential: a header of another name.
        if let Ok(v) = http::HeaderValue::from_str(&junk) {
            headers.insert("x-other", v);
        }
        let query = query.replace("key=", "k=");
        let query = match place {
            0 => {
                headers.insert(http::header::AUTHORIZATION, format!("Bearer  {key} ").parse().unwrap());
                query
            }
            1 => {
                headers.insert("x-api-key", format!(" {key}").parse().unwrap());
                query
            }
            2 => {
                headers.insert("x-goog-api-key", key.parse().unwrap());
                query
            }
            _ => format!("{query}&key={key}"),
        };
        let want = [
            auth::CredentialSource::Bearer,
            auth::CredentialSource::XApiKey,
            auth::CredentialSource::XGoogApiKey,
            auth::CredentialSource::QueryKey,
        ][place];
        let found = auth::extract_credential(&headers, Some(&query));
        let (source, value) = found.expect("the credential is found");
        prop_assert_eq!(source, want);
        prop_assert_eq!(value.as_ref(), key.as_str());
        prop_assert!(auth::holds_gateway_key(value.as_bytes()));
    }

    #[test]
    fn gateway_keys_in_any_spelling_are_found_and_never_forwarded(
        key_body in "[A-Za-z0-9]{32}",
        // Per character of `fg_` and of the body: 0 as is, 1 `%XX`, 2 `%xx`,
        // 3 `%25XX` (encoded twice), 4 upper case (prefix only).
        spelling in prop::collection::vec(0..5u8, 35),
        before in "[a-z0-9=&]{0,20}",
        after in "[a-z0-9]{0,20}",
        as_name in any::<bool>(),
        drop_key in any::<bool>(),
    ) {
        let spelt: String = format!("fg_{key_body}")
            .chars()
            .zip(&spelling)
            .enumerate()
            .map(|(i, (c, how))| match how {
                1 => format!("%{:02X}", c as u32),
                2 => format!("%{:02x}", c as u32),
                3 => format!("%25{:02X}", c as u32),
                4 if i < 3 => c.to_ascii_uppercase().to_string(),
                _ => c.to_string(),
            })
            .collect();
        let pair = if as_name { format!("{spelt}{after}=1") } else { format!("t={spelt}{after}") };
        let q = format!("{before}&{pair}&z=9");
        prop_assert!(auth::holds_gateway_key(q.as_bytes()), "{q}");
        let out = rewrite::forwarded_query(&q, drop_key);
        prop_assert!(!auth::holds_gateway_key(out.as_bytes()), "{q} -> {out}");
        prop_assert!(!out.contains(&key_body[..]), "{q} -> {out}");
        prop_assert!(out.ends_with("z=9"), "the rest stays: {q} -> {out}");
        // In a header value, a cookie, a header name, a Basic credential.
        let value = format!("a={before}; s={spelt}{after}");
        prop_assert!(auth::header_holds_gateway_key(b"cookie", value.as_bytes()), "{}", value);
        prop_assert!(auth::header_holds_gateway_key(spelt.to_ascii_lowercase().as_bytes(), b"1"), "{}", spelt);
        use base64::Engine as _;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("u:{spelt}"));
        let basic = format!("Basic {basic}");
        prop_assert!(auth::header_holds_gateway_key(b"authorization", basic.as_bytes()), "{}", basic);
    }

    #[test]
    fn a_model_id_is_one_safe_path_segment(raw in "\\PC{0,40}", tail in "[a-z0-9./%?#:_ -]{0,12}") {
        use fastgate::convert::model_id::path_segment;
        for model in [raw.clone(), format!("gemini-{tail}"), format!("models/{tail}")] {
            if let Ok(seg) = path_segment(&model) {
                prop_assert!(!seg.is_empty());
                for bad in ["/", "?", "#", "%", ":", "..", "\\"] {
                    prop_assert!(!seg.contains(bad), "{model:?} -> {seg:?}");
                }
                prop_assert!(seg.bytes().all(|b| b.is_ascii_graphic()), "{seg:?}");
                let decoded = percent_encoding::percent_decode_str(seg).decode_utf8_lossy();
                prop_assert_eq!(decoded.as_ref(), seg, "nothing decodes to something else");
            }
        }
    }

    #[test]
    fn documented_model_ids_pass_unchanged(
        id in "(gemini-[1-3]\\.[05]-(flash|pro)(-lite)?(-[0-9]{3})?|text-embedding-00[1-9]|gemini-embedding-exp-0[1-9]-[0-3][0-9]|gemma-3-[0-9]{1,2}b-it)",
        prefixed in any::<bool>(),
    ) {
        let model = if prefixed { format!("models/{id}") } else { id.clone() };
        prop_assert_eq!(fastgate::convert::model_id::path_segment(&model), Ok(id.as_str()));
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
        let _ = fastgate::router::compile_sources(&sources, &config);
    }
}
