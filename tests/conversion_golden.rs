//! Golden conversion fixtures (`tests/fixtures/conversion/`): upstream
//! stream transcripts and client requests in the providers' real wire
//! shapes, converted to every other format and compared with the expected
//! output in `expected/`. Each stream is fed whole, one byte at a time and
//! in pseudo-random pieces, and must give the same bytes every way.
//!
//! After an intended change of output, rewrite the expected files with
//! `UPDATE_GOLDEN=1 cargo nextest run --test conversion_golden` and review
//! the diff.
#![allow(clippy::unwrap_used)]

use fastgate::convert::{
    Loss, anthropic, gemini,
    openai::{self, ToolNames},
    stream::{Converter, Decoder, Encoder, anthropic as sa, gemini as sg, openai as so},
};
use serde_json::{Value, json};
use std::path::PathBuf;

const FORMATS: [&str; 3] = ["openai", "anthropic", "gemini"];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/conversion")
        .join(name)
}

/// Compare with `expected/<name>`, or write it under `UPDATE_GOLDEN=1`.
fn golden(name: &str, actual: &str) {
    let path = fixture("expected").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (write it with UPDATE_GOLDEN=1)", path.display()));
    assert_eq!(actual, want, "{name} differs from its golden file");
}

fn converter(from: &str, to: &str, json_array: bool) -> Converter {
    let decoder: Box<dyn Decoder> = match from {
        "openai" => Box::new(so::OpenaiDecoder::new(ToolNames::default())),
        "anthropic" => Box::new(sa::AnthropicDecoder::default()),
        _ => Box::new(sg::GeminiDecoder::default()),
    };
    let encoder: Box<dyn Encoder> = match to {
        "openai" => Box::new(so::OpenaiEncoder::new("client-model", 1_761_000_000, true)),
        "anthropic" => Box::new(sa::AnthropicEncoder::new("client-model")),
        _ => Box::new(sg::GeminiEncoder::new("client-model", false)),
    };
    Converter::new(decoder, encoder, json_array)
}

/// Feed `input` in pieces of the given sizes (cycled), then end it.
fn feed(mut conv: Converter, input: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = input;
    for n in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let n = (*n).clamp(1, rest.len());
        conv.feed_into(&rest[..n], &mut out);
        rest = &rest[n..];
    }
    out.extend(conv.finish());
    out
}

/// Piece sizes from a small deterministic generator (xorshift), 1..=40.
fn random_sizes(seed: u64) -> Vec<usize> {
    let mut x = seed | 1;
    (0..256)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 40) as usize + 1
        })
        .collect()
}

#[test]
fn stream_transcripts_convert_to_their_golden_output_however_they_are_cut() {
    let inputs = [
        ("openai", "openai_stream.sse", false),
        ("anthropic", "anthropic_stream.sse", false),
        ("gemini", "gemini_stream.sse", false),
        ("gemini", "gemini_stream.json", true),
    ];
    for (from, file, json_array) in inputs {
        let input = std::fs::read(fixture(file)).unwrap();
        for to in FORMATS.into_iter().filter(|t| *t != from) {
            let whole = feed(converter(from, to, json_array), &input, &[input.len()]);
            let mut cuts = vec![vec![1usize]];
            cuts.extend((1..=8).map(random_sizes));
            for sizes in cuts {
                let out = feed(converter(from, to, json_array), &input, &sizes);
                assert_eq!(
                    String::from_utf8_lossy(&out),
                    String::from_utf8_lossy(&whole),
                    "{file} -> {to}, pieces {:?}…",
                    &sizes[..4]
                );
            }
            let text = String::from_utf8(whole).unwrap();
            assert!(!text.contains("ping"), "pings are never passed on: {file} -> {to}");
            let stem = file.replace('.', "_");
            golden(&format!("{stem}_to_{to}.txt"), &text);
        }
    }
}

fn decode(from: &str, body: &Value, loss: &mut Loss) -> fastgate::convert::ir::ChatRequest {
    match from {
        "openai" => openai::decode_request(body, loss),
        "anthropic" => anthropic::decode_request(body, loss),
        _ => gemini::decode_request(body, "gemini-2.5-pro", true, loss),
    }
    .unwrap()
}

fn encode(to: &str, req: &fastgate::convert::ir::ChatRequest, loss: &mut Loss) -> Value {
    match to {
        // As toward a reasoning model on OpenAI (the fixtures ask for reasoning).
        "openai" => openai::encode_request_to(
            req,
            openai::Target {
                compatible: false,
                reasoning: Some(true),
            },
            &mut ToolNames::default(),
            loss,
        ),
        "anthropic" => anthropic::encode_request(req, 4096, loss),
        _ => gemini::encode_request(req, loss),
    }
    .unwrap()
}

#[test]
fn requests_convert_to_their_golden_bodies_and_name_what_was_dropped() {
    for from in FORMATS {
        let body: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{from}_request.json"))).unwrap()).unwrap();
        for to in FORMATS.into_iter().filter(|t| *t != from) {
            let mut loss = Loss::default();
            let req = decode(from, &body, &mut loss);
            let out = encode(to, &req, &mut loss);
            let text = serde_json::to_string_pretty(&json!({"body": out, "dropped": loss.0})).unwrap() + "\n";
            golden(&format!("{from}_request_to_{to}.json"), &text);
        }
        // And back into the client's own format, nothing lost on the way.
        let mut loss = Loss::default();
        let mut req = decode(from, &body, &mut loss);
        let again = decode(from, &encode(from, &req, &mut loss), &mut loss);
        if from == "openai" {
            // The reasoning target takes only the default sampling: dropped,
            // and named.
            assert!(loss.0.iter().any(|d| d.starts_with("temperature")), "{:?}", loss.0);
            req.temperature = None;
            req.top_p = None;
        }
        assert_eq!(
            format!("{req:?}"),
            format!("{again:?}"),
            "{from} -> IR -> {from} is stable"
        );
    }
}
