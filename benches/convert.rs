//! Conversion cost: per stream event (one upstream SSE event in, the
//! client's events out) for each direction, and per whole answer.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fastgate::convert::{
    Loss, anthropic, gemini,
    openai::{self, ToolNames},
    stream::{Converter, Decoder, Encoder, anthropic as sa, gemini as sg, openai as so},
};
use serde_json::json;
use std::hint::black_box;

const OPENAI_EVENT: &str = "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"token\"},\"finish_reason\":null}]}\n\n";
const ANTHROPIC_EVENT: &str = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"token\"}}\n\n";
const GEMINI_EVENT: &str = "data: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"text\":\"token\"}]},\"index\":0}],\"modelVersion\":\"gemini-2.5-flash\",\"responseId\":\"r\"}\n\n";
const ANTHROPIC_START: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"c\",\"usage\":{\"input_tokens\":1}}}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n";

fn decoder(from: &str) -> Box<dyn Decoder> {
    match from {
        "openai" => Box::new(so::OpenaiDecoder::new(ToolNames::default())),
        "anthropic" => Box::new(sa::AnthropicDecoder::default()),
        _ => Box::new(sg::GeminiDecoder::default()),
    }
}

fn encoder(to: &str) -> Box<dyn Encoder> {
    match to {
        "openai" => Box::new(so::OpenaiEncoder::new("m", 1, true)),
        "anthropic" => Box::new(sa::AnthropicEncoder::new("m")),
        _ => Box::new(sg::GeminiEncoder::new("m", false)),
    }
}

fn stream_events(c: &mut Criterion) {
    let mut g = c.benchmark_group("convert/stream_event");
    g.throughput(Throughput::Elements(1));
    for (from, to, event) in [
        ("anthropic", "openai", ANTHROPIC_EVENT),
        ("openai", "anthropic", OPENAI_EVENT),
        ("gemini", "openai", GEMINI_EVENT),
        ("openai", "gemini", OPENAI_EVENT),
        ("gemini", "anthropic", GEMINI_EVENT),
        ("anthropic", "gemini", ANTHROPIC_EVENT),
    ] {
        g.bench_function(BenchmarkId::from_parameter(format!("{from}->{to}")), |b| {
            let mut conv = Converter::new(decoder(from), encoder(to), false);
            if from == "anthropic" {
                black_box(conv.feed(ANTHROPIC_START.as_bytes()));
            }
            b.iter(|| black_box(conv.feed(event.as_bytes())));
        });
    }
    g.finish();
}

fn whole_answers(c: &mut Criterion) {
    let mut g = c.benchmark_group("convert/answer");
    let oa = json!({"id": "chatcmpl-1", "model": "gpt-4o", "choices": [{"index": 0, "finish_reason": "stop",
        "message": {"role": "assistant", "content": "Hello! How can I help you today? ".repeat(8)}}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 60, "total_tokens": 80}})
    .to_string();
    let an = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
        "content": [{"type": "text", "text": "Hello! How can I help you today? ".repeat(8)}],
        "stop_reason": "end_turn", "usage": {"input_tokens": 20, "output_tokens": 60}})
    .to_string();
    g.bench_function("openai->anthropic", |b| {
        b.iter(|| {
            let v: serde_json::Value = serde_json::from_str(black_box(&oa)).unwrap_or_default();
            let r = openai::decode_response(&v, &ToolNames::default());
            black_box(r.map(|r| anthropic::encode_response(&r).to_string()))
        })
    });
    g.bench_function("anthropic->gemini", |b| {
        b.iter(|| {
            let v: serde_json::Value = serde_json::from_str(black_box(&an)).unwrap_or_default();
            let r = anthropic::decode_response(&v, &mut Loss::default());
            black_box(r.map(|r| gemini::encode_response(&r).to_string()))
        })
    });
    g.finish();
}

criterion_group!(benches, stream_events, whole_answers);
criterion_main!(benches);
