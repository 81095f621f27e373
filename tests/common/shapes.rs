//! Answers in the awkward shapes real providers send, for the mock upstream
//! to replay ([`can`]): each is written as the provider's documentation (or
//! a public report of the provider's traffic) shows it; the source of each
//! is listed in `tests/fixtures/conversion/README.md` ("Shapes real
//! providers send").

use super::{Behaviour, Body, MockUpstream, full, sse};
use serde_json::{Value, json};
use std::{sync::Arc, time::Duration};

/// A canned answer: the whole body for a non-stream request, the events
/// (whole SSE frames) for a stream.
#[derive(Debug, Clone, Default)]
pub struct Canned {
    pub whole: Option<Value>,
    pub events: Vec<String>,
}

/// Answer every chat request with `canned` from now on.
pub fn can(mock: &MockUpstream, canned: Canned) {
    *mock.behaviour.canned.lock().unwrap() = Some(canned);
}

/// The canned answer for a request, if one is set.
pub(super) fn answer(b: &Arc<Behaviour>, stream: bool) -> Option<hyper::Response<Body>> {
    let canned = b.canned.lock().unwrap().clone()?;
    if stream {
        return Some(sse(canned.events, Duration::from_millis(5), b.clone()));
    }
    let whole = canned.whole?;
    Some(full(200, "application/json", whole.to_string()))
}

/// `data: <json>` frames, as OpenAI and Gemini (`alt=sse`) send them.
fn data(chunks: &[Value]) -> Vec<String> {
    chunks.iter().map(|c| format!("data: {c}\n\n")).collect()
}

/// Named frames, as Anthropic sends them.
fn named(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
        .collect()
}

/// One OpenAI `chat.completion.chunk` with this delta and finish reason.
fn openai_chunk(delta: Value, finish: Option<&str>) -> Value {
    json!({"id": "chatcmpl-shape", "object": "chat.completion.chunk", "created": 1_761_000_000,
        "model": "gpt-4o-2024-08-06", "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        "usage": null})
}

/// OpenAI's usage chunk (`stream_options.include_usage`): no choices.
fn openai_usage(prompt: u64, completion: u64) -> Value {
    json!({"id": "chatcmpl-shape", "object": "chat.completion.chunk", "created": 1_761_000_000,
        "model": "gpt-4o-2024-08-06", "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}})
}

fn openai_done(mut events: Vec<String>) -> Vec<String> {
    events.push("data: [DONE]\n\n".into());
    events
}

/// Gemini refuses the prompt: `promptFeedback.blockReason` and no
/// `candidates` at all, whole and as the stream's only chunk.
pub fn gemini_prompt_block() -> Canned {
    let body = json!({
        "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
        "usageMetadata": {"promptTokenCount": 12, "totalTokenCount": 12},
        "modelVersion": "gemini-2.5-flash",
        "responseId": "blocked-1",
    });
    Canned {
        events: data(std::slice::from_ref(&body)),
        whole: Some(body),
    }
}

/// Gemini's usage in a chunk of its own after the chunk with `finishReason`
/// (the earlier chunks carry none): 11 prompt, 4 candidate tokens.
pub fn gemini_usage_after_finish() -> Canned {
    let text = |t: &str, finish: Option<&str>| {
        let mut c = json!({"candidates": [{"content": {"parts": [{"text": t}], "role": "model"}, "index": 0}],
            "modelVersion": "gemini-2.5-flash", "responseId": "late-usage-1"});
        if let Some(f) = finish {
            c["candidates"][0]["finishReason"] = f.into();
        }
        c
    };
    Canned {
        events: data(&[
            text("Hello", None),
            text(" there", Some("STOP")),
            json!({"usageMetadata": {"promptTokenCount": 11, "candidatesTokenCount": 4, "totalTokenCount": 15},
                "modelVersion": "gemini-2.5-flash", "responseId": "late-usage-1"}),
        ]),
        whole: None,
    }
}

/// OpenAI's usual `include_usage` stream: the finish reason, then the usage
/// chunk (9 prompt, 3 completion tokens), then `[DONE]`.
pub fn openai_usage_after_finish() -> Canned {
    Canned {
        events: openai_done(data(&[
            openai_chunk(json!({"role": "assistant", "content": "", "refusal": null}), None),
            openai_chunk(json!({"content": "Hi there"}), None),
            openai_chunk(json!({}), Some("stop")),
            openai_usage(9, 3),
        ])),
        whole: None,
    }
}

/// A tool turn an OpenAI-compatible server ends with `finish_reason`
/// `finish` (`Some("stop")`, or `None`: no finish reason at all).
pub fn openai_calls_then(finish: Option<&str>) -> Canned {
    let call = json!({"index": 0, "id": "call_w1", "type": "function",
        "function": {"name": "weather", "arguments": ""}});
    let mut chunks = vec![
        openai_chunk(
            json!({"role": "assistant", "content": null, "tool_calls": [call]}),
            None,
        ),
        openai_chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": \"Paris\"}"}}]}),
            None,
        ),
    ];
    if finish.is_some() {
        chunks.push(openai_chunk(json!({}), finish));
    }
    chunks.push(openai_usage(20, 8));
    Canned {
        events: openai_done(data(&chunks)),
        whole: Some(
            json!({"id": "chatcmpl-shape", "object": "chat.completion", "created": 1_761_000_000,
            "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "refusal": null,
                "tool_calls": [{"id": "call_w1", "type": "function",
                    "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                "logprobs": null, "finish_reason": finish}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28}}),
        ),
    }
}

/// Two calls announced first, then their arguments alternating by index.
pub fn openai_headers_first_then_arguments() -> Canned {
    let args = |i: u64, a: &str| {
        openai_chunk(
            json!({"tool_calls": [{"index": i, "function": {"arguments": a}}]}),
            None,
        )
    };
    Canned {
        events: openai_done(data(&[
            openai_chunk(
                json!({"role": "assistant", "content": null, "tool_calls": [
                    {"index": 0, "id": "call_a", "type": "function", "function": {"name": "weather", "arguments": ""}},
                    {"index": 1, "id": "call_b", "type": "function", "function": {"name": "time", "arguments": ""}}]}),
                None,
            ),
            args(0, "{\"city\": "),
            args(1, "{\"tz\": "),
            args(0, "\"Paris\"}"),
            args(1, "\"CET\"}"),
            openai_chunk(json!({}), Some("tool_calls")),
            openai_usage(30, 12),
        ])),
        whole: None,
    }
}

/// Two calls that both come as `index: 0`, each whole with its own id (the
/// shape Ollama streams parallel calls in).
pub fn openai_calls_reusing_index_zero() -> Canned {
    let call = |id: &str, name: &str, a: &str| {
        openai_chunk(
            json!({"role": "assistant", "content": "", "tool_calls": [
                {"index": 0, "id": id, "type": "function", "function": {"name": name, "arguments": a}}]}),
            None,
        )
    };
    Canned {
        events: openai_done(data(&[
            call("call_x", "weather", "{\"city\":\"Paris\"}"),
            call("call_y", "time", "{\"tz\":\"CET\"}"),
            openai_chunk(json!({"content": ""}), Some("tool_calls")),
            openai_usage(30, 12),
        ])),
        whole: None,
    }
}

/// An Anthropic call with no input: the block starts with `input: {}`, and
/// its only `input_json_delta` is empty.
pub fn anthropic_call_without_input() -> Canned {
    Canned {
        events: named(&[
            json!({"type": "message_start", "message": {"id": "msg_noargs", "type": "message", "role": "assistant",
                "model": "claude-sonnet-4-5", "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 40, "output_tokens": 1}}}),
            json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "tool_use", "id": "toolu_now", "name": "now", "input": {}}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ""}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
                "usage": {"output_tokens": 12}}),
            json!({"type": "message_stop"}),
        ]),
        whole: Some(
            json!({"id": "msg_noargs", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [{"type": "tool_use", "id": "toolu_now", "name": "now", "input": {}}],
            "stop_reason": "tool_use", "stop_sequence": null, "usage": {"input_tokens": 40, "output_tokens": 12}}),
        ),
    }
}

/// A Gemini `functionCall` without `args` (a function without parameters).
pub fn gemini_call_without_args() -> Canned {
    let body = json!({"candidates": [{"content": {"parts": [{"functionCall": {"name": "now"}}], "role": "model"},
            "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 30, "candidatesTokenCount": 5, "totalTokenCount": 35},
        "modelVersion": "gemini-2.5-flash", "responseId": "noargs-1"});
    Canned {
        events: data(std::slice::from_ref(&body)),
        whole: Some(body),
    }
}

/// Two Gemini candidates (`candidateCount: 2`), listed out of order: the
/// candidate's `index`, not its place in the list, says which it is.
pub fn gemini_two_candidates() -> Canned {
    let cand = |i: u64, t: &str| json!({"content": {"parts": [{"text": t}], "role": "model"}, "finishReason": "STOP", "index": i});
    Canned {
        whole: Some(
            json!({"candidates": [cand(1, "second answer"), cand(0, "first answer")],
            "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 6, "totalTokenCount": 14},
            "modelVersion": "gemini-2.5-flash", "responseId": "two-1"}),
        ),
        events: Vec::new(),
    }
}
