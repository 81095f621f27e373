use super::*;

fn merged(spec: Spec, ct: &str, cap: usize, pieces: &[&[u8]]) -> Value {
    let mut m = StreamMerge::new(spec, Some(ct), cap).unwrap();
    for p in pieces {
        m.feed(p);
    }
    let text = m.finish().unwrap();
    assert!(text.len() <= cap, "{} > {cap}", text.len());
    serde_json::from_str(&text).unwrap()
}

fn sse(events: &[Value]) -> String {
    events.iter().map(|e| format!("data: {e}\n\n")).collect()
}

fn openai_stream() -> String {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut s = sse(&[
        chunk(json!({"role": "assistant", "content": "Hé"}), Value::Null),
        chunk(json!({"content": "llo"}), Value::Null),
        chunk(
            json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":"}}]}),
            Value::Null,
        ),
        chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
            Value::Null,
        ),
        chunk(json!({}), json!("tool_calls")),
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}),
    ]);
    s.push_str("data: [DONE]\n\n");
    s
}

use serde_json::json;

#[test]
fn a_stream_merges_the_same_whatever_its_pieces() {
    let stream = openai_stream();
    let whole = merged(Spec::default(), "text/event-stream", 16 * 1024, &[stream.as_bytes()]);
    let bytes: Vec<&[u8]> = stream.as_bytes().chunks(1).collect();
    assert_eq!(merged(Spec::default(), "text/event-stream", 16 * 1024, &bytes), whole);
    let m = &whole["choices"][0]["message"];
    assert_eq!(m["content"], "Héllo");
    assert_eq!(m["tool_calls"][0]["function"]["arguments"], "{\"a\":1}");
    assert_eq!(whole["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(whole["usage"]["completion_tokens"], 4);
    assert!(whole.get("fastgate_incomplete").is_none(), "{whole}");
}

#[test]
fn converted_streams_are_written_in_the_clients_shape_under_its_model() {
    let spec = Spec {
        upstream: Some(Format::Openai),
        client: Some(Format::Anthropic),
        model: Some("claude-x".into()),
        ..Spec::default()
    };
    let v = merged(spec, "text/event-stream", 16 * 1024, &[openai_stream().as_bytes()]);
    assert_eq!(v["model"], "claude-x");
    assert_eq!(v["content"][0], json!({"type": "text", "text": "Héllo"}));
    assert_eq!(v["content"][1]["input"], json!({"a": 1}));
    assert_eq!(v["stop_reason"], "tool_use");
}

#[test]
fn a_forced_json_tool_is_the_answers_text() {
    let spec = Spec {
        upstream: Some(Format::Openai),
        client: Some(Format::Openai),
        json_tool: Some("f".into()),
        ..Spec::default()
    };
    let v = merged(spec, "text/event-stream", 16 * 1024, &[openai_stream().as_bytes()]);
    assert_eq!(v["choices"][0]["message"]["content"], "Héllo{\"a\":1}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[test]
fn a_gemini_json_array_is_merged_and_a_json_object_is_left_to_the_raw_capture() {
    let chunk = |t: &str, finish: Option<&str>| {
        let mut c = json!({"candidates": [{"content": {"parts": [{"text": t}], "role": "model"}, "index": 0}], "responseId": "r1"});
        if let Some(f) = finish {
            c["candidates"][0]["finishReason"] = f.into();
        }
        c
    };
    let array = format!("[{},\r\n{}]", chunk("a", None), chunk("b", Some("STOP")));
    let pieces: Vec<&[u8]> = array.as_bytes().chunks(7).collect();
    let v = merged(Spec::default(), "application/json; charset=UTF-8", 4096, &pieces);
    assert_eq!(v["candidates"][0]["content"]["parts"][0]["text"], "ab");
    assert_eq!(v["candidates"][0]["finishReason"], "STOP");

    let mut m = StreamMerge::new(Spec::default(), Some("application/json"), 4096).unwrap();
    m.feed(b"  {\"id\": ");
    assert!(m.declined());
    assert_eq!(m.take_undecided(), b"  {\"id\": ");
    assert!(StreamMerge::new(Spec::default(), Some("text/plain"), 4096).is_none());
}

#[test]
fn events_of_no_known_format_are_left_to_the_raw_capture() {
    let mut m = StreamMerge::new(Spec::default(), Some("text/event-stream"), 4096).unwrap();
    m.feed(b"data: {\"hello\": 1}\n\n");
    assert!(m.declined());
    assert_eq!(m.take_undecided(), b"data: {\"hello\": 1}\n\n");
}

#[test]
fn a_cut_stream_says_so_without_a_finish_reason() {
    let stream = openai_stream();
    let cut = &stream[..stream.find("tool_calls").unwrap()];
    let v = merged(Spec::default(), "text/event-stream", 4096, &[cut.as_bytes()]);
    assert_eq!(v["fastgate_incomplete"], true);
    assert_eq!(v["choices"][0]["finish_reason"], Value::Null);
    assert_eq!(v["choices"][0]["message"]["content"], "Héllo");
}

#[test]
fn an_error_event_ends_the_merge_with_its_message() {
    let events = [
        json!({"type": "message_start", "message": {"id": "msg_1", "model": "c", "usage": {"input_tokens": 2}}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    ];
    let stream: String = events
        .iter()
        .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
        .collect();
    let v = merged(Spec::default(), "text/event-stream", 4096, &[stream.as_bytes()]);
    assert_eq!(v["content"][0]["text"], "Hi");
    assert_eq!(v["stop_reason"], Value::Null);
    assert_eq!(
        (&v["fastgate_incomplete"], &v["fastgate_error"]),
        (&json!(true), &json!("Overloaded"))
    );
}

#[test]
fn content_is_cut_to_fit_the_cap_even_when_escaping_grows_it() {
    // Control characters take six bytes each in JSON.
    let text = "\u{1}".repeat(3000);
    let stream = sse(&[json!({"choices": [{"index": 0, "delta": {"content": text}}]})]);
    for cap in [600, 1000, 2048] {
        let v = merged(Spec::default(), "text/event-stream", cap, &[stream.as_bytes()]);
        assert_eq!(v["fastgate_truncated"], true, "{cap}");
        let kept = v["choices"][0]["message"]["content"].as_str().unwrap().len();
        assert!(kept > 0 && kept < 3000, "{cap}: {kept}");
    }
    // A cap below the answer's frame: cut and marked like any body.
    let mut m = StreamMerge::new(Spec::default(), Some("text/event-stream"), 40).unwrap();
    m.feed(stream.as_bytes());
    let text = m.finish().unwrap();
    assert!(text.ends_with("]") && text.contains("…[truncated"), "{text}");
}

#[test]
fn a_responses_stream_keeps_custom_tool_calls_custom() {
    let events = [
        json!({"type": "response.created", "response": {"id": "resp_1", "model": "gpt-5", "status": "in_progress"}}),
        json!({"type": "response.output_item.added", "output_index": 0, "item": {"type": "custom_tool_call", "call_id": "call_c", "name": "apply_patch", "input": ""}}),
        json!({"type": "response.custom_tool_call_input.delta", "output_index": 0, "delta": "*** Begin"}),
        json!({"type": "response.custom_tool_call_input.delta", "output_index": 0, "delta": " Patch"}),
        json!({"type": "response.completed", "response": {"id": "resp_1", "status": "completed",
            "usage": {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 2}, "output_tokens": 3}}}),
    ];
    let stream: String = events
        .iter()
        .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
        .collect();
    let v = merged(Spec::default(), "text/event-stream", 4096, &[stream.as_bytes()]);
    assert_eq!(v["id"], "resp_1");
    assert_eq!(v["status"], "completed");
    let call = &v["output"][0];
    assert_eq!(
        (&call["type"], &call["name"], &call["input"]),
        (
            &json!("custom_tool_call"),
            &json!("apply_patch"),
            &json!("*** Begin Patch")
        )
    );
    assert_eq!(v["usage"]["input_tokens"], 5);
    assert_eq!(v["usage"]["input_tokens_details"]["cached_tokens"], 2);
}

#[test]
fn a_long_answer_keeps_most_of_the_cap() {
    let words: Vec<Value> = (0..250)
        .map(|i| json!({"choices": [{"index": 0, "delta": {"content": format!("word{i:04} ")}}]}))
        .collect();
    let mut stream = sse(&words);
    stream.push_str(&openai_stream());
    for client in [Format::Openai, Format::Gemini, Format::Anthropic, Format::Responses] {
        let spec = Spec {
            upstream: Some(Format::Openai),
            client: Some(client),
            ..Spec::default()
        };
        let mut m = StreamMerge::new(spec, Some("text/event-stream"), 2048).unwrap();
        m.feed(stream.as_bytes());
        let text = m.finish().unwrap();
        assert!(
            text.len() <= 2048 && text.len() > 1700,
            "{client:?}: {} {text}",
            text.len()
        );
    }
}

/// Codex sends ~20 KB of instructions and tools, which a `response` object
/// repeats: beside a 16 KiB cap they are left out, not the answer (the row
/// stays JSON and keeps the output and usage).
#[test]
fn a_responses_answer_drops_the_repeated_request_before_its_output() {
    let mut echo = Echo::default();
    echo.fields.insert("instructions".into(), json!("x".repeat(20_000)));
    echo.fields
        .insert("tools".into(), json!([{"type": "function", "name": "shell"}]));
    let spec = Spec {
        upstream: Some(Format::Openai),
        client: Some(Format::Responses),
        echo,
        ..Spec::default()
    };
    for cap in [16 * 1024, 700] {
        let v = merged(spec.clone(), "text/event-stream", cap, &[openai_stream().as_bytes()]);
        assert!(v.get("instructions").is_none_or(Value::is_null), "{cap}: {v}");
        assert_eq!(v["fastgate_truncated"], true);
        assert!(v["output"].as_array().is_some_and(|o| !o.is_empty()), "{cap}: {v}");
        assert!(v["usage"].is_object(), "{cap}: {v}");
    }
    // Room for both: the request is repeated as OpenAI does.
    let v = merged(spec, "text/event-stream", 64 * 1024, &[openai_stream().as_bytes()]);
    assert_eq!(v["instructions"].as_str().map(str::len), Some(20_000));
}
