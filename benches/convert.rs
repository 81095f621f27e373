//! Conversion cost: per stream event (one upstream SSE event in, the
//! client's events out) for each direction, and per whole answer.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fastgate::convert::{
    Loss, anthropic, gemini,
    openai::{self, ToolNames},
    responses::Echo,
    stream::{Converter, Decoder, Encoder, anthropic as sa, gemini as sg, openai as so, responses as sr},
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
        "responses" => Box::new(sr::ResponsesEncoder::new("m", 1, Echo::default())),
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
        // A Responses client (Codex CLI) on each provider.
        ("anthropic", "responses", ANTHROPIC_EVENT),
        ("openai", "responses", OPENAI_EVENT),
        ("gemini", "responses", GEMINI_EVENT),
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

/// A whole request, client body to upstream body (what `proxy::convert::plan`
/// does once per request): the load run's chat request, and one with a tool.
fn requests(c: &mut Criterion) {
    let mut g = c.benchmark_group("convert/request");
    let small =
        json!({"model": "m", "stream": true, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
            .to_string();
    let tools = json!({"model": "m", "stream": true, "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]})
    .to_string();
    for (name, body) in [("openai->anthropic/small", &small), ("openai->anthropic/tools", &tools)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let v: serde_json::Value = serde_json::from_str(black_box(body)).unwrap_or_default();
                let mut loss = Loss::default();
                let req = openai::decode_request(&v, &mut loss);
                black_box(
                    req.and_then(|r| anthropic::encode_request(&r, 4096, &mut loss))
                        .map(|v| serde_json::to_vec(&v)),
                )
            })
        });
    }
    g.finish();
}

/// The load run's whole stream (start, 10 text deltas, end), Anthropic
/// upstream to OpenAI client, in the two reads the upstream sends.
fn whole_streams(c: &mut Criterion) {
    let mut g = c.benchmark_group("convert/stream");
    let first = format!("{ANTHROPIC_START}{ANTHROPIC_EVENT}");
    let end = "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":11}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    let rest = format!("{}{end}", ANTHROPIC_EVENT.repeat(10));
    g.bench_function("anthropic->openai", |b| {
        b.iter(|| {
            let mut conv = Converter::new(decoder("anthropic"), encoder("openai"), false);
            let mut out = Vec::new();
            conv.feed_into(first.as_bytes(), &mut out);
            conv.feed_into(rest.as_bytes(), &mut out);
            black_box(out)
        })
    });
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

criterion_group!(benches, stream_events, whole_streams, requests, whole_answers);
criterion_main!(benches);
