//! Stream conversion: transcripts in the providers' real shapes, fed whole,
//! a byte at a time and in uneven pieces; the output must be the same and
//! follow the client format's grammar.

use super::{Converter, anthropic::*, gemini::*, openai::*};
use crate::convert::{openai::ToolNames, sse::SseParser};
use serde_json::Value;

fn sse(events: &[(Option<&str>, &str)]) -> String {
    events
        .iter()
        .map(|(e, d)| match e {
            Some(e) => format!("event: {e}\r\ndata: {d}\r\n\r\n"),
            None => format!("data: {d}\n\n"),
        })
        .collect()
}

/// Run `input` through a fresh converter cut into pieces of `sizes` bytes.
fn run(make: &dyn Fn() -> Converter, input: &[u8], sizes: &[usize]) -> String {
    let mut c = make();
    let mut out = Vec::new();
    let mut rest = input;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes[i % sizes.len()].clamp(1, rest.len());
        out.extend(c.feed(&rest[..n]));
        rest = &rest[n..];
        i += 1;
    }
    out.extend(c.finish());
    String::from_utf8(out).unwrap()
}

/// Same output however the input is cut.
fn converted(make: &dyn Fn() -> Converter, input: &str) -> String {
    let whole = run(make, input.as_bytes(), &[input.len()]);
    for sizes in [&[1usize][..], &[3, 1, 7], &[64, 5]] {
        assert_eq!(run(make, input.as_bytes(), sizes), whole, "pieces {sizes:?}");
    }
    whole
}

fn events(text: &str) -> Vec<(Option<String>, Value)> {
    SseParser::parse_all(text.as_bytes())
        .into_iter()
        .map(|e| (e.event, serde_json::from_str(&e.data).unwrap_or(Value::String(e.data))))
        .collect()
}

/// The Anthropic event grammar Claude Code relies on.
fn assert_anthropic_grammar(text: &str) -> Vec<Value> {
    let evs = events(text);
    let types: Vec<&str> = evs.iter().map(|(_, v)| v["type"].as_str().unwrap()).collect();
    assert_eq!(types.iter().filter(|t| **t == "message_start").count(), 1, "{types:?}");
    assert_eq!(types.first(), Some(&"message_start"));
    assert_eq!(
        &types[types.len() - 2..],
        &["message_delta", "message_stop"],
        "{types:?}"
    );
    let mut open: Option<u64> = None;
    let mut last = None;
    for (e, v) in &evs {
        assert_eq!(e.as_deref(), v["type"].as_str(), "event line matches type");
        match v["type"].as_str().unwrap() {
            "content_block_start" => {
                assert!(open.is_none(), "blocks never overlap: {text}");
                let i = v["index"].as_u64().unwrap();
                assert!(last.is_none_or(|l| i == l + 1), "indices rise by one");
                open = Some(i);
                last = Some(i);
            }
            "content_block_delta" => assert_eq!(Some(v["index"].as_u64().unwrap()), open),
            "content_block_stop" => {
                assert_eq!(Some(v["index"].as_u64().unwrap()), open);
                open = None;
            }
            _ => {}
        }
    }
    assert!(open.is_none());
    evs.into_iter().map(|(_, v)| v).collect()
}

fn openai_upstream_transcript(with_done: bool) -> String {
    let mut ev = vec![
        r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#.to_string(),
        r#"{"id":"chatcmpl-1","choices":[{"index":0,"delta":{"reasoning_content":"Let me think"},"finish_reason":null}]}"#.into(),
        r#"{"id":"chatcmpl-1","choices":[{"index":0,"delta":{"content":"Checking ☀"},"finish_reason":null}]}"#.into(),
        r#"{"id":"chatcmpl-1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"weather","arguments":"{\"ci"}}]},"finish_reason":null}]}"#.into(),
        r#"{"id":"chatcmpl-1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"ty\":\"Paris\"}"}}]},"finish_reason":null}]}"#.into(),
        r#"{"id":"chatcmpl-1","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_b","type":"function","function":{"name":"time","arguments":""}}]},"finish_reason":null}]}"#.into(),
        r#"{"id":"chatcmpl-1","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"{}"}}]},"finish_reason":null}]}"#.into(),
        r#"{"id":"chatcmpl-1","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#.into(),
        r#"{"id":"chatcmpl-1","choices":[],"usage":{"prompt_tokens":20,"completion_tokens":9,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":4}}}"#.into(),
    ];
    if with_done {
        ev.push("[DONE]".into());
    }
    let refs: Vec<(Option<&str>, &str)> = ev.iter().map(|d| (None, d.as_str())).collect();
    format!(": keep-alive\n\n{}", sse(&refs))
}

#[test]
fn openai_upstream_to_anthropic_client() {
    let make = || {
        Converter::new(
            Box::new(OpenaiDecoder::new(ToolNames::default())),
            Box::new(AnthropicEncoder::new("claude-x")),
            false,
        )
    };
    let out = converted(&make, &openai_upstream_transcript(true));
    let evs = assert_anthropic_grammar(&out);
    let starts: Vec<&Value> = evs.iter().filter(|v| v["type"] == "content_block_start").collect();
    let kinds: Vec<&str> = starts
        .iter()
        .map(|v| v["content_block"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["thinking", "text", "tool_use", "tool_use"],
        "reasoning opens as a thinking block"
    );
    assert_eq!(starts[2]["content_block"]["id"], "call_a");
    let args: String = evs
        .iter()
        .filter(|v| v["type"] == "content_block_delta" && v["index"] == 2)
        .map(|v| v["delta"]["partial_json"].as_str().unwrap())
        .collect();
    assert_eq!(
        args, r#"{"city":"Paris"}"#,
        "the first fragment after the switch is kept"
    );
    let md = evs.iter().find(|v| v["type"] == "message_delta").unwrap();
    assert_eq!(md["delta"]["stop_reason"], "tool_use");
    assert_eq!(md["usage"]["input_tokens"], 16, "Anthropic input excludes cache reads");
    assert_eq!(md["usage"]["cache_read_input_tokens"], 4);
    assert_eq!(md["usage"]["output_tokens"], 9);
    assert!(out.contains("Checking ☀"));
}

#[test]
fn a_stream_cut_before_its_end_ends_with_an_error_event() {
    let make = || {
        Converter::new(
            Box::new(OpenaiDecoder::new(ToolNames::default())),
            Box::new(AnthropicEncoder::new("c")),
            false,
        )
    };
    let out = run(&make, openai_upstream_transcript(false).as_bytes(), &[17]);
    let evs = events(&out);
    let last = &evs.last().unwrap().1;
    assert_eq!(last["type"], "error", "{out}");
    assert!(!out.contains("message_stop"));
    // Without a usage chunk, Anthropic clients still get message_delta + message_stop.
    let no_usage = sse(&[
        (None, r#"{"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}]}"#),
        (
            None,
            r#"{"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
        ),
        (None, "[DONE]"),
    ]);
    let out = converted(&make, &no_usage);
    let evs = assert_anthropic_grammar(&out);
    assert_eq!(evs[evs.len() - 2]["delta"]["stop_reason"], "end_turn");
}

fn anthropic_upstream_transcript() -> String {
    sse(&[
        (
            Some("message_start"),
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[],"usage":{"input_tokens":30,"cache_read_input_tokens":70,"output_tokens":1}}}"#,
        ),
        (Some("ping"), r#"{"type":"ping"}"#),
        (
            Some("content_block_start"),
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"","signature":""}}"#,
        ),
        (
            Some("content_block_delta"),
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"Plan."}}"#,
        ),
        (
            Some("content_block_delta"),
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EqQBCgIYAh=="}}"#,
        ),
        (Some("content_block_stop"), r#"{"type":"content_block_stop","index":0}"#),
        (
            Some("content_block_start"),
            r#"{"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}"#,
        ),
        (
            Some("content_block_delta"),
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Sure."}}"#,
        ),
        (Some("content_block_stop"), r#"{"type":"content_block_stop","index":1}"#),
        (
            Some("content_block_start"),
            r#"{"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_9","name":"read","input":{}}}"#,
        ),
        (
            Some("content_block_delta"),
            r#"{"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":""}}"#,
        ),
        (
            Some("content_block_delta"),
            r#"{"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{\"path\":"}}"#,
        ),
        (
            Some("content_block_delta"),
            r#"{"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"\"a.rs\"}"}}"#,
        ),
        (Some("content_block_stop"), r#"{"type":"content_block_stop","index":2}"#),
        (
            Some("message_delta"),
            r#"{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":42}}"#,
        ),
        (Some("message_stop"), r#"{"type":"message_stop"}"#),
    ])
}

#[test]
fn anthropic_upstream_to_openai_client() {
    for include_usage in [true, false] {
        let make = move || {
            Converter::new(
                Box::new(AnthropicDecoder::default()),
                Box::new(OpenaiEncoder::new("claude-sonnet-4-5", 1, include_usage)),
                false,
            )
        };
        let out = converted(&make, &anthropic_upstream_transcript());
        assert!(out.ends_with("data: [DONE]\n\n"));
        assert!(!out.contains("ping"));
        let chunks: Vec<Value> = events(&out)
            .into_iter()
            .map(|(_, v)| v)
            .filter(|v| v.is_object())
            .collect();
        assert_eq!(
            chunks[0]["choices"][0]["delta"]["role"], "assistant",
            "the first chunk carries the role"
        );
        let calls: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
            .collect();
        assert_eq!(calls[0]["id"], "toolu_9");
        assert_eq!(calls[0]["index"], 0);
        let args: String = calls
            .iter()
            .filter_map(|c| c["function"]["arguments"].as_str())
            .collect();
        assert_eq!(args, r#"{"path":"a.rs"}"#);
        let reasoning: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["reasoning_content"].as_str())
            .collect();
        assert_eq!(reasoning, "Plan.");
        let finish = chunks
            .iter()
            .find_map(|c| c["choices"][0]["finish_reason"].as_str())
            .unwrap();
        assert_eq!(finish, "tool_calls");
        let usage = chunks
            .iter()
            .find(|c| c["choices"].as_array().is_some_and(Vec::is_empty));
        assert_eq!(usage.is_some(), include_usage, "the usage chunk only when asked");
        if let Some(u) = usage {
            assert_eq!(
                u["usage"]["prompt_tokens"], 100,
                "OpenAI prompt_tokens include cache reads"
            );
            assert_eq!(u["usage"]["completion_tokens"], 42, "message_delta usage is cumulative");
        }
    }
}

fn gemini_upstream_transcript() -> Vec<String> {
    vec![
        r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"thinking...","thought":true}]},"index":0}],"responseId":"resp-7","modelVersion":"gemini-2.5-pro"}"#.into(),
        r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"Calling."}]},"index":0}],"responseId":"resp-7","modelVersion":"gemini-2.5-pro"}"#.into(),
        r#"{"candidates":[{"content":{"role":"model","parts":[{"functionCall":{"name":"weather","args":{"city":"Rome"}},"thoughtSignature":"sig1"},{"functionCall":{"name":"weather","args":{"city":"Oslo"}}}]},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":12,"candidatesTokenCount":8,"thoughtsTokenCount":5,"totalTokenCount":25},"responseId":"resp-7","modelVersion":"gemini-2.5-pro"}"#.into(),
    ]
}

#[test]
fn gemini_upstream_to_anthropic_and_openai_clients() {
    let input = sse(&gemini_upstream_transcript()
        .iter()
        .map(|d| (None, d.as_str()))
        .collect::<Vec<_>>());
    let make = || {
        Converter::new(
            Box::new(GeminiDecoder::default()),
            Box::new(AnthropicEncoder::new("g")),
            false,
        )
    };
    let out = converted(&make, &input);
    let evs = assert_anthropic_grammar(&out);
    let tools: Vec<&Value> = evs
        .iter()
        .filter(|v| v["type"] == "content_block_start" && v["content_block"]["type"] == "tool_use")
        .collect();
    assert_eq!(tools.len(), 2, "parallel calls: separate blocks");
    let (a, b) = (
        tools[0]["content_block"]["id"].as_str().unwrap(),
        tools[1]["content_block"]["id"].as_str().unwrap(),
    );
    assert!(a.starts_with("call_") && a != b, "synthesized, unique ids");
    assert_eq!(
        evs[evs.len() - 2]["delta"]["stop_reason"],
        "tool_use",
        "STOP with calls is a tool turn"
    );
    assert_eq!(
        evs[evs.len() - 2]["usage"]["output_tokens"],
        13,
        "thoughts count as output"
    );
    // The same ids for the OpenAI client (stable per response).
    let make = || {
        Converter::new(
            Box::new(GeminiDecoder::default()),
            Box::new(OpenaiEncoder::new("g", 1, true)),
            false,
        )
    };
    let out = converted(&make, &input);
    assert!(out.contains(a) && out.contains(b));
    assert!(out.contains("\"finish_reason\":\"tool_calls\""));
    // The JSON-array stream (no alt=sse) decodes the same.
    let array = format!("[{}]", gemini_upstream_transcript().join(",\r\n"));
    let make_array = || {
        Converter::new(
            Box::new(GeminiDecoder::default()),
            Box::new(OpenaiEncoder::new("g", 1, true)),
            true,
        )
    };
    assert_eq!(converted(&make_array, &array), out);
}

#[test]
fn anthropic_upstream_to_gemini_client_in_both_framings() {
    for json_array in [false, true] {
        let make = move || {
            Converter::new(
                Box::new(AnthropicDecoder::default()),
                Box::new(GeminiEncoder::new("claude", json_array)),
                false,
            )
        };
        let out = converted(&make, &anthropic_upstream_transcript());
        let chunks: Vec<Value> = if json_array {
            serde_json::from_str::<Vec<Value>>(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
        } else {
            events(&out).into_iter().map(|(_, v)| v).collect()
        };
        let calls: Vec<&Value> = chunks
            .iter()
            .flat_map(|c| c["candidates"][0]["content"]["parts"].as_array().into_iter().flatten())
            .filter_map(|p| p.get("functionCall"))
            .collect();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["args"], serde_json::json!({"path": "a.rs"}), "arguments whole");
        let last = chunks.last().unwrap();
        assert_eq!(last["candidates"][0]["finishReason"], "STOP");
        assert_eq!(last["usageMetadata"]["promptTokenCount"], 100);
        assert!(
            chunks
                .iter()
                .any(|c| c["candidates"][0]["content"]["parts"][0]["thought"] == true)
        );
    }
}

#[test]
fn upstream_errors_become_the_clients_error_framing() {
    let input = sse(&[
        (
            Some("message_start"),
            r#"{"type":"message_start","message":{"id":"msg_1","model":"c","usage":{"input_tokens":1}}}"#,
        ),
        (
            Some("error"),
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        ),
        (Some("message_stop"), r#"{"type":"message_stop"}"#),
    ]);
    let make = || {
        Converter::new(
            Box::new(AnthropicDecoder::default()),
            Box::new(OpenaiEncoder::new("c", 1, false)),
            false,
        )
    };
    let out = converted(&make, &input);
    let last = events(&out).pop().unwrap().1;
    assert_eq!(last["error"]["code"], "overloaded");
    assert!(!out.contains("[DONE]"), "nothing after the error");
}

/// Errors an upstream sends mid-stream keep the meaning a client acts on
/// (read and written by the same code as whole error answers): Anthropic's
/// "prompt is too long" (Claude Code compacts on it, as Codex and LangChain
/// do on OpenAI's `context_length_exceeded`); a Gemini daily quota
/// (Anthropic's `billing_error`, not a rate limit to retry).
#[test]
fn mid_stream_errors_keep_the_code_clients_act_on() {
    let too_long = sse(&[
        (
            Some("message_start"),
            r#"{"type":"message_start","message":{"id":"msg_1","model":"c","usage":{"input_tokens":1}}}"#,
        ),
        (
            Some("error"),
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 210012 tokens > 200000 maximum"}}"#,
        ),
    ]);
    let to_openai = || {
        Converter::new(
            Box::new(AnthropicDecoder::default()),
            Box::new(OpenaiEncoder::new("c", 1, false)),
            false,
        )
    };
    let last = events(&converted(&to_openai, &too_long)).pop().unwrap().1;
    assert_eq!(last["error"]["code"], "context_length_exceeded", "{last}");
    assert_eq!(last["error"]["type"], "invalid_request_error");
    let message = last["error"]["message"].as_str().unwrap();
    assert!(message.contains("200000") && message.contains("210012"), "{message}");
    let to_gemini = || {
        Converter::new(
            Box::new(AnthropicDecoder::default()),
            Box::new(GeminiEncoder::new("c", false)),
            false,
        )
    };
    let last = events(&converted(&to_gemini, &too_long)).pop().unwrap().1;
    assert_eq!(last["error"]["status"], "INVALID_ARGUMENT", "{last}");
    assert_eq!(last["error"]["code"], 400);

    // Gemini's daily quota, as its stream sends it (the error object of a
    // chunk), to an Anthropic client: billing, not a rate limit.
    let quota = sse(&[
        (
            None,
            r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"Hi"}]},"index":0}],"responseId":"r1"}"#,
        ),
        (
            None,
            r#"{"error":{"code":429,"message":"You exceeded your current quota.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]}]}}"#,
        ),
    ]);
    let to_anthropic = || {
        Converter::new(
            Box::new(GeminiDecoder::default()),
            Box::new(AnthropicEncoder::new("g")),
            false,
        )
    };
    let evs = events(&converted(&to_anthropic, &quota));
    let (name, last) = evs.last().unwrap();
    assert_eq!(name.as_deref(), Some("error"));
    assert_eq!(last["error"]["type"], "billing_error", "{last}");

    // An OpenAI stream's error chunk with a code: a rate limit stays one.
    let limited = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"a\"}}]}\n\ndata: {\"error\":{\"message\":\"Rate limit reached\",\"type\":\"requests\",\"param\":null,\"code\":\"rate_limit_exceeded\"}}\n\n";
    let to_anthropic = || {
        Converter::new(
            Box::new(OpenaiDecoder::default()),
            Box::new(AnthropicEncoder::new("m")),
            false,
        )
    };
    let evs = events(&converted(&to_anthropic, limited));
    assert_eq!(evs.last().unwrap().1["error"]["type"], "rate_limit_error");
}

/// Tool calls an OpenAI client assembles from a stream: (id, name, arguments) by index.
fn openai_calls(text: &str) -> Vec<(String, String, String)> {
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for (_, c) in events(text).into_iter().filter(|(_, v)| v.is_object()) {
        for tc in c["choices"][0]["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let i = tc["index"].as_u64().unwrap() as usize;
            if calls.len() <= i {
                calls.resize(i + 1, Default::default());
            }
            if let Some(id) = tc["id"].as_str() {
                calls[i].0 = id.into();
            }
            if let Some(n) = tc["function"]["name"].as_str() {
                calls[i].1 = n.into();
            }
            calls[i]
                .2
                .push_str(tc["function"]["arguments"].as_str().unwrap_or_default());
        }
    }
    calls
}

#[test]
fn interleaved_and_reused_call_indices_keep_each_call_whole_however_cut() {
    let chunk = |tc: &str| format!(r#"{{"id":"c","choices":[{{"index":0,"delta":{{"tool_calls":[{tc}]}}}}]}}"#);
    // Both headers first, then the arguments alternating by index.
    let interleaved = [
        chunk(
            r#"{"index":0,"id":"call_a","function":{"name":"weather","arguments":""}},{"index":1,"id":"call_b","function":{"name":"time","arguments":""}}"#,
        ),
        chunk(r#"{"index":0,"function":{"arguments":"{\"city\":"}}"#),
        chunk(r#"{"index":1,"function":{"arguments":"{\"tz\":"}}"#),
        chunk(r#"{"index":0,"function":{"arguments":"\"Paris\"}"}}"#),
        chunk(r#"{"index":1,"function":{"arguments":"\"CET\"}"}}"#),
    ];
    // Every call numbered 0, told apart by its id.
    let reused = [
        chunk(r#"{"index":0,"id":"call_a","function":{"name":"weather","arguments":"{\"city\":"}}"#),
        chunk(r#"{"index":0,"function":{"arguments":"\"Paris\"}"}}"#),
        chunk(r#"{"index":0,"id":"call_b","function":{"name":"time","arguments":"{\"tz\":\"CET\"}"}}"#),
    ];
    let want = vec![
        (
            "call_a".to_string(),
            "weather".to_string(),
            r#"{"city":"Paris"}"#.to_string(),
        ),
        ("call_b".to_string(), "time".to_string(), r#"{"tz":"CET"}"#.to_string()),
    ];
    for chunks in [&interleaved[..], &reused[..]] {
        let mut ev: Vec<(Option<&str>, &str)> = chunks.iter().map(|c| (None, c.as_str())).collect();
        // No finish reason at all: the calls make it a tool turn.
        ev.push((None, "[DONE]"));
        let input = sse(&ev);
        let to_anthropic = || {
            Converter::new(
                Box::new(OpenaiDecoder::new(ToolNames::default())),
                Box::new(AnthropicEncoder::new("c")),
                false,
            )
        };
        let evs = assert_anthropic_grammar(&converted(&to_anthropic, &input));
        let mut got = Vec::new();
        for v in &evs {
            match v["type"].as_str().unwrap() {
                "content_block_start" => got.push((
                    v["content_block"]["id"].as_str().unwrap().to_string(),
                    v["content_block"]["name"].as_str().unwrap().to_string(),
                    String::new(),
                )),
                "content_block_delta" => got
                    .last_mut()
                    .unwrap()
                    .2
                    .push_str(v["delta"]["partial_json"].as_str().unwrap()),
                _ => {}
            }
        }
        assert_eq!(got, want);
        assert_eq!(evs[evs.len() - 2]["delta"]["stop_reason"], "tool_use");
        // The OpenAI-shaped output numbers the calls 0 and 1.
        let to_openai = || {
            Converter::new(
                Box::new(OpenaiDecoder::new(ToolNames::default())),
                Box::new(OpenaiEncoder::new("c", 1, false)),
                false,
            )
        };
        let out = converted(&to_openai, &input);
        assert_eq!(openai_calls(&out), want, "{out}");
        assert!(out.contains(r#""finish_reason":"tool_calls""#), "{out}");
    }
}

#[test]
fn the_gemini_stream_decoder_reads_the_candidate_numbered_zero_and_ends_at_the_body_end() {
    let chunks = [
        r#"{"candidates":[{"content":{"parts":[{"text":"other"}],"role":"model"},"index":1},{"content":{"parts":[{"text":"mine"}],"role":"model"},"index":0}],"responseId":"r"}"#,
        r#"{"candidates":[{"content":{"parts":[{"text":"!"}],"role":"model"},"finishReason":"STOP"}],"responseId":"r"}"#,
        r#"{"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":2,"totalTokenCount":5},"responseId":"r"}"#,
    ];
    let ev: Vec<(Option<&str>, &str)> = chunks.iter().map(|c| (None, *c)).collect();
    let make = || {
        Converter::new(
            Box::new(GeminiDecoder::default()),
            Box::new(OpenaiEncoder::new("c", 1, true)),
            false,
        )
    };
    let mut c = make();
    let early = String::from_utf8(c.feed(sse(&ev).as_bytes())).unwrap();
    assert!(
        !c.is_done() && !early.contains("[DONE]"),
        "a finish reason is not the end: {early}"
    );
    let out = converted(&make, &sse(&ev));
    let text: String = events(&out)
        .iter()
        .filter_map(|(_, v)| v["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "mine!");
    let usage = events(&out)
        .into_iter()
        .find_map(|(_, v)| v.get("usage").cloned())
        .unwrap();
    assert_eq!(
        (usage["prompt_tokens"].as_u64(), usage["completion_tokens"].as_u64()),
        (Some(3), Some(2))
    );
    assert!(out.ends_with("data: [DONE]\n\n"));
}

/// Calls and text as each client format tells them: (calls as
/// (id, name, arguments JSON), text).
type Told = (Vec<(String, String, Value)>, String);

fn told_by_anthropic(out: &str) -> Told {
    let (mut calls, mut text, mut args) = (Vec::new(), String::new(), Vec::<String>::new());
    for v in assert_anthropic_grammar(out) {
        match v["type"].as_str().unwrap() {
            "content_block_start" if v["content_block"]["type"] == "tool_use" => {
                calls.push((
                    v["content_block"]["id"].as_str().unwrap().to_string(),
                    v["content_block"]["name"].as_str().unwrap().to_string(),
                ));
                args.push(String::new());
            }
            "content_block_delta" => match v["delta"]["type"].as_str().unwrap() {
                "input_json_delta" => args
                    .last_mut()
                    .unwrap()
                    .push_str(v["delta"]["partial_json"].as_str().unwrap()),
                "text_delta" => text.push_str(v["delta"]["text"].as_str().unwrap()),
                _ => {}
            },
            _ => {}
        }
    }
    let calls = calls
        .into_iter()
        .zip(args)
        .map(|((id, name), a)| {
            (
                id,
                name,
                serde_json::from_str(&a).unwrap_or_else(|e| panic!("{e}: {a:?}")),
            )
        })
        .collect();
    (calls, text)
}

/// The Responses grammar: sequence numbers from 0, every item added is
/// done, one terminal event; what the terminal response holds.
fn told_by_responses(out: &str) -> Told {
    let evs = events(out);
    let (mut added, mut done) = (Vec::new(), Vec::new());
    for (i, (e, v)) in evs.iter().enumerate() {
        assert_eq!(e.as_deref(), v["type"].as_str());
        assert_eq!(v["sequence_number"], i, "{out}");
        match v["type"].as_str().unwrap() {
            "response.output_item.added" => added.push(v["output_index"].as_u64().unwrap()),
            "response.output_item.done" => done.push(v["output_index"].as_u64().unwrap()),
            _ => {}
        }
    }
    assert_eq!(added, done, "every item added is done: {out}");
    let (_, last) = evs.last().unwrap();
    assert!(matches!(
        last["type"].as_str(),
        Some("response.completed" | "response.incomplete" | "response.failed")
    ));
    let (mut calls, mut text) = (Vec::new(), String::new());
    for item in last["response"]["output"].as_array().unwrap() {
        match item["type"].as_str().unwrap() {
            "function_call" => calls.push((
                item["call_id"].as_str().unwrap().to_string(),
                item["name"].as_str().unwrap().to_string(),
                serde_json::from_str(item["arguments"].as_str().unwrap()).unwrap(),
            )),
            "message" => text.push_str(item["content"][0]["text"].as_str().unwrap()),
            _ => {}
        }
    }
    assert_eq!(
        added.len(),
        last["response"]["output"].as_array().unwrap().len(),
        "{out}"
    );
    (calls, text)
}

fn told_by_gemini(out: &str) -> Told {
    let (mut calls, mut text) = (Vec::new(), String::new());
    for (_, v) in events(out) {
        for p in v["candidates"][0]["content"]["parts"].as_array().into_iter().flatten() {
            if let Some(c) = p.get("functionCall") {
                calls.push((
                    c["id"].as_str().unwrap_or_default().to_string(),
                    c["name"].as_str().unwrap().to_string(),
                    c["args"].clone(),
                ));
            } else if let Some(t) = p["text"].as_str() {
                text.push_str(t);
            }
        }
    }
    (calls, text)
}

#[test]
fn calls_announced_together_or_cut_by_text_reach_every_client_format_whole() {
    let chunk = |tc: &str| format!(r#"{{"id":"c","choices":[{{"index":0,"delta":{{"tool_calls":[{tc}]}}}}]}}"#);
    let text = |t: &str| format!(r#"{{"id":"c","choices":[{{"index":0,"delta":{{"content":"{t}"}}}}]}}"#);
    let start_a = r#"{"index":0,"id":"call_a","function":{"name":"weather","arguments":""}}"#;
    let start_b = r#"{"index":1,"id":"call_b","function":{"name":"time","arguments":""}}"#;
    // Both headers first, then the arguments alternating by index.
    let interleaved = vec![
        chunk(&format!("{start_a},{start_b}")),
        chunk(r#"{"index":0,"function":{"arguments":"{\"city\":"}}"#),
        chunk(r#"{"index":1,"function":{"arguments":"{\"tz\":"}}"#),
        chunk(r#"{"index":0,"function":{"arguments":"\"Paris\"}"}}"#),
        chunk(r#"{"index":1,"function":{"arguments":"\"CET\"}"}}"#),
    ];
    // Text between a call's header and its arguments, and between two
    // pieces of the arguments.
    let text_inside = vec![
        chunk(start_a),
        text("Let me "),
        chunk(r#"{"index":0,"function":{"arguments":"{\"city\":"}}"#),
        text("check."),
        chunk(r#"{"index":0,"function":{"arguments":"\"Paris\"}"}}"#),
        chunk(start_b),
        chunk(r#"{"index":1,"function":{"arguments":"{\"tz\":\"CET\"}"}}"#),
    ];
    let want_calls = vec![
        (
            "call_a".to_string(),
            "weather".to_string(),
            serde_json::json!({"city": "Paris"}),
        ),
        (
            "call_b".to_string(),
            "time".to_string(),
            serde_json::json!({"tz": "CET"}),
        ),
    ];
    for (chunks, want_text) in [(interleaved, ""), (text_inside, "Let me check.")] {
        let mut ev: Vec<(Option<&str>, &str)> = chunks.iter().map(|c| (None, c.as_str())).collect();
        ev.push((
            None,
            r#"{"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
        ));
        ev.push((None, "[DONE]"));
        let input = sse(&ev);
        let from_openai = |encoder: &dyn Fn() -> Box<dyn super::Encoder>| {
            converted(
                &|| Converter::new(Box::new(OpenaiDecoder::new(ToolNames::default())), encoder(), false),
                &input,
            )
        };
        let anthropic = told_by_anthropic(&from_openai(&|| Box::new(AnthropicEncoder::new("c"))));
        let responses = told_by_responses(&from_openai(&|| {
            Box::new(super::responses::ResponsesEncoder::new("c", 1, Default::default()).with_base("B"))
        }));
        let gemini = told_by_gemini(&from_openai(&|| Box::new(GeminiEncoder::new("c", false))));
        for (client, (calls, text)) in [("anthropic", anthropic), ("responses", responses), ("gemini", gemini)] {
            let ids_kept = client != "gemini" || calls.iter().all(|c| !c.0.is_empty());
            let calls: Vec<_> = calls
                .into_iter()
                .zip(&want_calls)
                .map(|(got, want)| if ids_kept { got } else { (want.0.clone(), got.1, got.2) })
                .collect();
            assert_eq!(calls, want_calls, "{client}");
            assert_eq!(text, want_text, "{client}");
        }
        let openai = openai_calls(&from_openai(&|| Box::new(OpenaiEncoder::new("c", 1, false))));
        let openai: Vec<_> = openai
            .into_iter()
            .map(|(id, name, a)| (id, name, serde_json::from_str::<Value>(&a).unwrap()))
            .collect();
        assert_eq!(openai, want_calls);
    }
}

#[test]
fn an_upstream_event_past_the_line_limit_ends_the_stream_with_an_error() {
    let big = "x".repeat(crate::convert::sse::MAX_LINE + 10);
    let events_in = [
        r#"{"id":"c","choices":[{"index":0,"delta":{"content":"Hello"}}]}"#.to_string(),
        format!(r#"{{"id":"c","choices":[{{"index":0,"delta":{{"content":"{big}"}}}}]}}"#),
        r#"{"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#.to_string(),
    ];
    let ev: Vec<(Option<&str>, &str)> = events_in.iter().map(|e| (None, e.as_str())).collect();
    let input = sse(&ev) + "data: [DONE]\n\n";
    let out = run(
        &|| {
            Converter::new(
                Box::new(OpenaiDecoder::new(ToolNames::default())),
                Box::new(AnthropicEncoder::new("c")),
                false,
            )
        },
        input.as_bytes(),
        &[65536],
    );
    let evs = events(&out);
    let (_, last) = evs.last().unwrap();
    assert_eq!(last["type"], "error", "{}", &out[..out.len().min(2000)]);
    assert!(!out.contains("message_stop"), "a cut answer is not told as whole");
}

#[test]
fn a_failed_responses_stream_closes_the_item_it_had_open() {
    let ev = [
        (None, r#"{"id":"c","choices":[{"index":0,"delta":{"content":"Hel"}}]}"#),
        (None, r#"{"error":{"message":"overloaded","type":"server_error"}}"#),
    ];
    let out = run(
        &|| {
            Converter::new(
                Box::new(OpenaiDecoder::new(ToolNames::default())),
                Box::new(super::responses::ResponsesEncoder::new("c", 1, Default::default())),
                false,
            )
        },
        sse(&ev).as_bytes(),
        &[1 << 20],
    );
    let (_, text) = told_by_responses(&out);
    assert_eq!(text, "Hel");
    let evs = events(&out);
    let (_, last) = evs.last().unwrap();
    assert_eq!(last["type"], "response.failed");
    let item = &last["response"]["output"][0];
    assert_eq!(item["status"], "incomplete", "{out}");
}

#[test]
fn a_responses_stream_holds_at_most_its_cap_of_answer() {
    let piece = "y".repeat(64 * 1024);
    let chunk = format!(r#"{{"id":"c","choices":[{{"index":0,"delta":{{"content":"{piece}"}}}}]}}"#);
    let make = || {
        Converter::new(
            Box::new(OpenaiDecoder::new(ToolNames::default())),
            Box::new(super::responses::ResponsesEncoder::new("c", 1, Default::default())),
            false,
        )
    };
    let mut c = make();
    let mut out = Vec::new();
    let frame = sse(&[(None, chunk.as_str())]);
    for _ in 0..(super::HELD_ANSWER_MAX / piece.len() + 2) {
        out.extend(c.feed(frame.as_bytes()));
        if c.is_done() {
            break;
        }
    }
    assert!(c.is_done(), "the stream ends past the cap");
    assert!(c.failure().is_some());
    let text = String::from_utf8(out).unwrap();
    assert!(text.trim_end().ends_with('}') && text.contains("response.failed"));
    // An OpenAI client's stream holds nothing: no cap.
    let mut c = Converter::new(
        Box::new(OpenaiDecoder::new(ToolNames::default())),
        Box::new(OpenaiEncoder::new("c", 1, false)),
        false,
    );
    for _ in 0..(super::HELD_ANSWER_MAX / piece.len() + 2) {
        c.feed(frame.as_bytes());
    }
    assert!(!c.is_done());
}
