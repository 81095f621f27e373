//! Golden cases for the request and response codecs (the cases peers'
//! users reported), and round trips X -> IR -> X.

use super::{ConvertError, Loss, anthropic, gemini, ir::*, openai};
use serde_json::{Value, json};

fn openai_tools_conversation() -> Value {
    json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in Paris and Rome?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
            ]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": "{\"temp\": 24}"}
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "description": "Weather by city",
            "parameters": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                "additionalProperties": false,
                "properties": {"city": {"type": ["string", "null"]}, "unit": {"const": "celsius"}},
                "required": ["city"]}}}],
        "tool_choice": "required",
        "parallel_tool_calls": false,
        "temperature": 1.5,
        "stop": "END",
        "user": "u-1"
    })
}

#[test]
fn openai_to_anthropic_request() {
    let mut loss = Loss::default();
    let ir = openai::decode_request(&openai_tools_conversation(), &mut loss).unwrap();
    let out = anthropic::encode_request(&ir, 4096, &mut loss).unwrap();
    assert_eq!(
        out["system"], "Be brief.\n\nUse tools.",
        "system and developer merged in order"
    );
    assert_eq!(out["max_tokens"], 4096, "filled when the client gave none");
    assert_eq!(out["temperature"], 1.0, "clamped to Anthropic's range");
    assert!(loss.0.iter().any(|l| l.contains("temperature")), "{loss:?}");
    assert_eq!(out["stop_sequences"], json!(["END"]));
    assert_eq!(
        out["tool_choice"],
        json!({"type": "any", "disable_parallel_tool_use": true})
    );
    assert_eq!(out["metadata"]["user_id"], "u-1");
    let msgs = out["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 3, "{msgs:?}");
    assert_eq!(
        msgs[0]["content"][1]["source"],
        json!({"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="})
    );
    // An assistant turn of tool calls and empty content: no empty text block.
    let assistant = msgs[1]["content"].as_array().unwrap();
    assert_eq!(assistant.len(), 2);
    assert!(assistant.iter().all(|b| b["type"] == "tool_use"));
    assert_eq!(assistant[0]["input"], json!({"city": "Paris"}));
    // Two tool messages: one user turn of tool_result blocks.
    let results = msgs[2]["content"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["tool_use_id"], "call_1");
    assert_eq!(results[1]["content"][0]["text"], "{\"temp\": 24}");
}

#[test]
fn refusals_where_dropping_would_change_the_answer() {
    let mut body = openai_tools_conversation();
    body["n"] = json!(2);
    let ir = openai::decode_request(&body, &mut Loss::default()).unwrap();
    assert!(matches!(
        anthropic::encode_request(&ir, 4096, &mut Loss::default()),
        Err(ConvertError::Refused(_))
    ));
    let mut body = openai_tools_conversation();
    body["logprobs"] = json!(true);
    let ir = openai::decode_request(&body, &mut Loss::default()).unwrap();
    assert!(matches!(
        anthropic::encode_request(&ir, 4096, &mut Loss::default()),
        Err(ConvertError::Refused(_))
    ));
    assert!(matches!(
        gemini::encode_request(&ir, &mut Loss::default()),
        Err(ConvertError::Refused(_))
    ));
    assert!(matches!(
        openai::decode_request(&json!({"messages": "x"}), &mut Loss::default()),
        Err(ConvertError::Invalid(_))
    ));
    // A Gemini client's streamed candidateCount > 1 toward OpenAI: the
    // stream would carry one candidate only, silently.
    let gemini_body = json!({
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "generationConfig": {"candidateCount": 2}
    });
    let mut ir = gemini::decode_request(&gemini_body, "m", true, &mut Loss::default()).unwrap();
    assert!(matches!(
        openai::encode_request(&ir, &mut Default::default(), &mut Loss::default()),
        Err(ConvertError::Refused(_))
    ));
    ir.stream = false;
    let sent = openai::encode_request(&ir, &mut Default::default(), &mut Loss::default()).unwrap();
    assert_eq!(sent["n"], 2);
}

#[test]
fn openai_to_gemini_request() {
    let mut loss = Loss::default();
    let ir = openai::decode_request(&openai_tools_conversation(), &mut loss).unwrap();
    let out = gemini::encode_request(&ir, &mut loss).unwrap();
    assert_eq!(out["systemInstruction"]["parts"][0]["text"], "Be brief.\n\nUse tools.");
    let contents = out["contents"].as_array().unwrap();
    assert_eq!(contents[1]["role"], "model");
    assert_eq!(contents[1]["parts"].as_array().unwrap().len(), 2, "no empty text part");
    assert_eq!(
        contents[1]["parts"][0]["functionCall"]["args"],
        json!({"city": "Paris"})
    );
    // Tool results carry the called function's name; JSON results stay objects.
    assert_eq!(
        contents[2]["parts"][0]["functionResponse"],
        json!({"name": "weather", "response": {"result": "18C"}})
    );
    assert_eq!(
        contents[2]["parts"][1]["functionResponse"]["response"],
        json!({"temp": 24})
    );
    let params = &out["tools"][0]["functionDeclarations"][0]["parameters"];
    assert_eq!(
        params,
        &json!({"type": "object", "properties": {"city": {"type": "string", "nullable": true}, "unit": {"enum": ["celsius"]}}, "required": ["city"]}),
        "schema sanitized for Gemini"
    );
    assert_eq!(out["toolConfig"]["functionCallingConfig"]["mode"], "ANY");
    assert_eq!(out["generationConfig"]["temperature"], 1.5, "Gemini's range is 0-2");
    assert!(loss.0.iter().any(|l| l.contains("parallel_tool_calls")), "{loss:?}");
}

#[test]
fn anthropic_to_openai_request_with_thinking_and_long_tool_names() {
    let long = "mcp__some_server_with_a_long_name__and_a_tool_whose_name_goes_on_and_on";
    assert!(long.len() > 64);
    let body = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 2048,
        "system": [{"type": "text", "text": "You are Claude Code."}],
        "thinking": {"type": "enabled", "budget_tokens": 10000},
        "tools": [{"name": long, "input_schema": {"type": "object", "properties": {}}},
                  {"type": "web_search_20250305", "name": "web_search"}],
        "messages": [
            {"role": "user", "content": "list files"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "I should call the tool.", "signature": "sig=="},
                {"type": "tool_use", "id": "toolu_1", "name": long, "input": {"path": "."}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "a.rs"}]},
                {"type": "text", "text": "and now?"}
            ]}
        ]
    });
    let mut loss = Loss::default();
    let mut ir = anthropic::decode_request(&body, &mut loss).unwrap();
    // As a route's model_map would: a model that takes reasoning_effort.
    ir.model = "o3".into();
    let mut names = openai::ToolNames::default();
    let out = openai::encode_request(&ir, &mut names, &mut loss).unwrap();
    let short = out["tools"][0]["function"]["name"].as_str().unwrap().to_string();
    assert!(short.len() <= 64, "{short}");
    assert_eq!(out["tools"].as_array().unwrap().len(), 1, "server tools dropped");
    assert!(loss.0.iter().any(|l| l.contains("web_search")), "{loss:?}");
    assert_eq!(
        out["messages"][0],
        json!({"role": "system", "content": "You are Claude Code."})
    );
    assert_eq!(out["messages"][2]["tool_calls"][0]["function"]["name"], short.as_str());
    assert_eq!(
        out["messages"][2]["tool_calls"][0]["function"]["arguments"],
        "{\"path\":\".\"}"
    );
    assert_eq!(
        out["messages"][3],
        json!({"role": "tool", "tool_call_id": "toolu_1", "content": "a.rs"})
    );
    assert_eq!(out["messages"][4]["content"], "and now?");
    assert_eq!(out["reasoning_effort"], "medium");
    assert_eq!(out["max_completion_tokens"], 2048);
    // The answer's call comes back under the client's name.
    let answer = json!({"id": "chatcmpl-1", "model": "gpt-4o", "choices": [{"index": 0, "finish_reason": "tool_calls",
        "message": {"role": "assistant", "content": null, "tool_calls": [{"id": "call_9", "type": "function",
        "function": {"name": short, "arguments": "{}"}}]}}]});
    let resp = openai::decode_response(&answer, &names).unwrap();
    let claude = anthropic::encode_response(&resp);
    assert_eq!(claude["content"][0]["name"], long);
    assert_eq!(claude["stop_reason"], "tool_use");
}

#[test]
fn reasoning_budgets_stay_inside_max_tokens() {
    let body = json!({"model": "o", "messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "high", "max_tokens": 1000});
    let ir = openai::decode_request(&body, &mut Loss::default()).unwrap();
    let out = anthropic::encode_request(&ir, 4096, &mut Loss::default()).unwrap();
    let budget = out["thinking"]["budget_tokens"].as_u64().unwrap();
    assert!(budget >= anthropic::MIN_THINKING_BUDGET);
    assert!(out["max_tokens"].as_u64().unwrap() > budget, "{out}");
    let out = gemini::encode_request(&ir, &mut Loss::default()).unwrap();
    assert_eq!(out["generationConfig"]["thinkingConfig"]["thinkingBudget"], budget);
    // Unsigned reasoning (from another provider) is never sent to Anthropic.
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning_content": "thought"}, {"role": "user", "content": "q2"}]});
    let mut loss = Loss::default();
    let ir = openai::decode_request(&body, &mut loss).unwrap();
    let out = anthropic::encode_request(&ir, 4096, &mut loss).unwrap();
    assert_eq!(out["messages"][1]["content"], json!([{"type": "text", "text": "a"}]));
    assert!(loss.0.iter().any(|l| l.contains("unsigned")));
}

#[test]
fn gemini_calls_without_ids_get_stable_ids_and_results_find_them() {
    let body = json!({
        "contents": [
            {"role": "user", "parts": [{"text": "weather?"}]},
            {"role": "model", "parts": [
                {"functionCall": {"name": "weather", "args": {"city": "Paris"}}, "thoughtSignature": "gsig"},
                {"functionCall": {"name": "time", "args": {}}}
            ]},
            {"role": "user", "parts": [
                {"functionResponse": {"name": "time", "response": {"result": "noon"}}},
                {"functionResponse": {"name": "weather", "response": {"temp": 18}}}
            ]}
        ],
        "tools": [{"functionDeclarations": [{"name": "weather", "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}}}]}],
        "system_instruction": {"parts": [{"text": "sys"}]},
        "generationConfig": {"maxOutputTokens": 100, "stopSequences": ["x"], "thinkingConfig": {"thinkingBudget": 0}}
    });
    let mut loss = Loss::default();
    let ir = gemini::decode_request(&body, "gemini-2.5-flash", false, &mut loss).unwrap();
    let again = gemini::decode_request(&body, "gemini-2.5-flash", false, &mut loss).unwrap();
    assert_eq!(ir, again, "ids are stable");
    let Part::ToolCall(weather) = &ir.messages[1].parts[0] else {
        panic!()
    };
    let Part::ToolCall(time) = &ir.messages[1].parts[1] else {
        panic!()
    };
    assert_ne!(weather.id, time.id);
    assert_eq!(
        weather.signature.as_deref(),
        Some("gsig"),
        "thoughtSignature kept on its part"
    );
    let Part::ToolResult(r0) = &ir.messages[2].parts[0] else {
        panic!()
    };
    let Part::ToolResult(r1) = &ir.messages[2].parts[1] else {
        panic!()
    };
    assert_eq!(
        (r0.call_id.as_str(), r1.call_id.as_str()),
        (time.id.as_str(), weather.id.as_str())
    );
    assert_eq!(
        ir.tools[0].parameters["properties"]["city"]["type"], "string",
        "types lowered"
    );
    assert_eq!(ir.system, vec!["sys".to_string()]);
    assert!(ir.reasoning.unwrap().disabled);
    let out = openai::encode_request(&ir, &mut openai::ToolNames::default(), &mut loss).unwrap();
    assert_eq!(out["messages"][2]["tool_calls"][0]["id"], weather.id.as_str());
    assert_eq!(out["messages"][3]["tool_call_id"], time.id.as_str());
    assert_eq!(out["messages"][3]["content"], "noon");
    assert_eq!(out["messages"][4]["content"], "{\"temp\":18}");
    assert!(out.get("reasoning_effort").is_none());
}

#[test]
fn responses_map_usage_finish_and_reasoning() {
    // Anthropic counts input without cache reads; OpenAI's prompt_tokens includes them.
    let claude = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
        "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"}, {"type": "text", "text": "Hi"}],
        "stop_reason": "stop_sequence", "stop_sequence": "END",
        "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 90, "cache_creation_input_tokens": 0}});
    let resp = anthropic::decode_response(&claude, &mut Loss::default()).unwrap();
    assert_eq!(resp.finish, Some(Finish::StopSequence(Some("END".into()))));
    let oa = openai::encode_response(&resp, 1);
    assert_eq!(oa["usage"]["prompt_tokens"], 100);
    assert_eq!(oa["usage"]["prompt_tokens_details"]["cached_tokens"], 90);
    assert_eq!(oa["choices"][0]["finish_reason"], "stop");
    assert_eq!(oa["choices"][0]["message"]["content"], "Hi");
    assert_eq!(oa["choices"][0]["message"]["reasoning_content"], "hmm");
    // Gemini: thoughts are separate from candidates; STOP with calls is a tool turn.
    let g = json!({"responseId": "r1", "modelVersion": "gemini-2.5-pro",
        "candidates": [{"content": {"role": "model", "parts": [
            {"text": "plan", "thought": true},
            {"functionCall": {"name": "weather", "args": {"city": "Rome"}}}]}, "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": 50, "candidatesTokenCount": 7, "thoughtsTokenCount": 30, "totalTokenCount": 87}});
    let resp = gemini::decode_response(&g, &mut Loss::default()).unwrap();
    assert_eq!(resp.finish, Some(Finish::ToolCalls));
    assert_eq!(
        resp.usage.unwrap(),
        Usage {
            input: 50,
            cache_read: 0,
            cache_write: 0,
            output: 37,
            reasoning: 30
        }
    );
    let claude = anthropic::encode_response(&resp);
    assert_eq!(claude["stop_reason"], "tool_use");
    assert_eq!(claude["content"][0]["type"], "thinking");
    assert_eq!(claude["content"][1]["type"], "tool_use");
    assert!(claude["content"][1]["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(claude["usage"]["output_tokens"], 37);
    let oa = openai::encode_response(&resp, 1);
    assert_eq!(oa["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(oa["choices"][0]["message"]["content"], Value::Null);
    assert_eq!(oa["usage"]["completion_tokens_details"]["reasoning_tokens"], 30);
    let back = gemini::encode_response(&gemini::decode_response(&g, &mut Loss::default()).unwrap());
    assert_eq!(back["usageMetadata"]["thoughtsTokenCount"], 30);
    assert_eq!(back["usageMetadata"]["candidatesTokenCount"], 7);
}

#[test]
fn each_format_round_trips_through_the_ir() {
    let mut loss = Loss::default();
    let oa = openai::decode_request(&openai_tools_conversation(), &mut loss).unwrap();
    let again = openai::decode_request(
        &openai::encode_request(&oa, &mut openai::ToolNames::default(), &mut loss).unwrap(),
        &mut loss,
    )
    .unwrap();
    assert_eq!(again.messages, oa.messages);
    assert_eq!(again.tools, oa.tools);
    assert_eq!(again.tool_choice, oa.tool_choice);

    let an = anthropic::decode_request(&anthropic::encode_request(&oa, 4096, &mut loss).unwrap(), &mut loss).unwrap();
    let an2 = anthropic::decode_request(&anthropic::encode_request(&an, 4096, &mut loss).unwrap(), &mut loss).unwrap();
    assert_eq!(an, an2, "Anthropic -> IR -> Anthropic is stable");

    let ge = gemini::decode_request(&gemini::encode_request(&oa, &mut loss).unwrap(), "g", false, &mut loss).unwrap();
    let ge2 = gemini::decode_request(&gemini::encode_request(&ge, &mut loss).unwrap(), "g", false, &mut loss).unwrap();
    assert_eq!(ge, ge2, "Gemini -> IR -> Gemini is stable");
}

#[test]
fn loss_reports_are_one_ascii_line() {
    let mut loss = Loss::default();
    loss.dropped("top_k — not here");
    loss.dropped("top_k — not here");
    loss.dropped("seed");
    assert_eq!(loss.header_value().unwrap(), "top_k ? not here; seed");
    assert_eq!(Loss::default().header_value(), None);
}

#[test]
fn tool_result_images_reach_openai_in_a_user_turn() {
    let body = json!({"model": "c", "max_tokens": 10, "messages": [
        {"role": "user", "content": "look"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "text", "text": "here"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}
    ]});
    let ir = anthropic::decode_request(&body, &mut Loss::default()).unwrap();
    let out = openai::encode_request(&ir, &mut openai::ToolNames::default(), &mut Loss::default()).unwrap();
    assert_eq!(
        out["messages"][2],
        json!({"role": "tool", "tool_call_id": "t1", "content": "here"})
    );
    assert_eq!(
        out["messages"][3]["content"][0]["image_url"]["url"],
        "data:image/png;base64,AAAA"
    );
}

#[test]
fn a_json_schema_becomes_a_forced_tool_toward_anthropic_and_text_again() {
    let body = json!({"model": "gpt", "messages": [{"role": "user", "content": "name a city"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": {"type": "object", "properties": {"name": {"type": "string"}}}}}});
    let mut loss = Loss::default();
    let ir = openai::decode_request(&body, &mut loss).unwrap();
    assert!(anthropic::answers_json_by_tool(&ir));
    let out = anthropic::encode_request(&ir, 1024, &mut loss).unwrap();
    assert_eq!(
        out["tool_choice"],
        json!({"type": "tool", "name": anthropic::JSON_TOOL})
    );
    assert_eq!(out["tools"][0]["input_schema"]["properties"]["name"]["type"], "string");
    assert!(out.get("output_config").is_none());
    assert!(loss.0.is_empty(), "{loss:?}");
    let answer = json!({"id": "msg_1", "model": "c", "stop_reason": "tool_use", "usage": {"input_tokens": 1, "output_tokens": 2},
        "content": [{"type": "tool_use", "id": "t", "name": anthropic::JSON_TOOL, "input": {"name": "Oslo"}}]});
    let mut resp = anthropic::decode_response(&answer, &mut Loss::default()).unwrap();
    answer_from_json_tool(&mut resp, anthropic::JSON_TOOL);
    let oa = openai::encode_response(&resp, 1);
    assert_eq!(oa["choices"][0]["message"]["content"], "{\"name\":\"Oslo\"}");
    assert_eq!(oa["choices"][0]["finish_reason"], "stop");
}

#[test]
fn a_json_schema_with_tools_or_thinking_uses_anthropic_native_structured_output() {
    let schema = json!({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"], "additionalProperties": false});
    let format = json!({"type": "json_schema", "json_schema": {"name": "city", "schema": schema}});
    let tool = json!({"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}});
    for body in [
        json!({"model": "gpt", "messages": [{"role": "user", "content": "hi"}], "response_format": format, "tools": [tool]}),
        json!({"model": "gpt", "messages": [{"role": "user", "content": "hi"}], "response_format": format, "reasoning_effort": "high"}),
    ] {
        let mut loss = Loss::default();
        let ir = openai::decode_request(&body, &mut loss).unwrap();
        assert!(!anthropic::answers_json_by_tool(&ir));
        let out = anthropic::encode_request(&ir, 4096, &mut loss).unwrap();
        assert_eq!(
            out["output_config"],
            json!({"format": {"type": "json_schema", "schema": schema}}),
            "{out}"
        );
        assert!(out.get("tool_choice").is_none_or(|c| c["type"] != "tool"), "{out}");
        assert!(
            out["tools"]
                .as_array()
                .is_none_or(|t| t.iter().all(|t| t["name"] != anthropic::JSON_TOOL)),
            "{out}"
        );
        if body.get("tools").is_some() {
            assert_eq!(out["tools"][0]["name"], "lookup");
        } else {
            assert_eq!(out["thinking"]["type"], "enabled", "thinking kept: {out}");
        }
        assert!(loss.0.is_empty(), "{loss:?}");
        // And back: an Anthropic client's structured output reaches OpenAI.
        let back = anthropic::decode_request(&out, &mut Loss::default()).unwrap();
        let oa = openai::encode_request(&back, &mut openai::ToolNames::default(), &mut Loss::default()).unwrap();
        assert_eq!(oa["response_format"]["type"], "json_schema", "{oa}");
        assert_eq!(oa["response_format"]["json_schema"]["schema"], schema);
    }
}

#[test]
fn a_gemini_thought_signature_survives_a_round_trip_through_openai_and_anthropic_clients() {
    let answer = json!({"candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"name": "weather", "args": {"city": "Rome"}}, "thoughtSignature": "CiQBVKhc7oFQ/+="},
            {"functionCall": {"name": "weather", "args": {"city": "Oslo"}}}]},
        "finishReason": "STOP", "index": 0}], "responseId": "r1", "modelVersion": "gemini-3-pro"});
    let resp = gemini::decode_response(&answer, &mut Loss::default()).unwrap();
    // The OpenAI client's next turn, with the ids it was given.
    let oa = openai::encode_response(&resp, 1);
    let calls = oa["choices"][0]["message"]["tool_calls"].as_array().unwrap().clone();
    let ids: Vec<&str> = calls.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert!(
        ids[0].contains("__thought__") && !ids[1].contains("__thought__"),
        "{ids:?}"
    );
    assert!(
        ids[0]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
        "{}",
        ids[0]
    );
    let next = json!({"model": "gemini-3-pro", "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": null, "tool_calls": calls},
        {"role": "tool", "tool_call_id": ids[0], "content": "sunny"},
        {"role": "tool", "tool_call_id": ids[1], "content": "snow"}]});
    let req = openai::decode_request(&next, &mut Loss::default()).unwrap();
    let to_gemini = gemini::encode_request(&req, &mut Loss::default()).unwrap();
    let model_parts = &to_gemini["contents"][1]["parts"];
    assert_eq!(model_parts[0]["thoughtSignature"], "CiQBVKhc7oFQ/+=", "{to_gemini}");
    assert!(model_parts[1].get("thoughtSignature").is_none());
    let results = &to_gemini["contents"][2]["parts"];
    assert_eq!(results[0]["functionResponse"]["name"], "weather", "{to_gemini}");
    assert_eq!(results[1]["functionResponse"]["name"], "weather", "{to_gemini}");
    // The same through an Anthropic client.
    let an = anthropic::encode_response(&resp);
    let blocks = an["content"].as_array().unwrap().clone();
    let id0 = blocks[0]["id"].as_str().unwrap().to_string();
    assert!(id0.contains("__thought__"), "{an}");
    let next = json!({"model": "gemini-3-pro", "max_tokens": 100, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": blocks},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": id0, "content": "sunny"},
                                     {"type": "tool_result", "tool_use_id": blocks[1]["id"], "content": "snow"}]}]});
    let req = anthropic::decode_request(&next, &mut Loss::default()).unwrap();
    let to_gemini = gemini::encode_request(&req, &mut Loss::default()).unwrap();
    assert_eq!(
        to_gemini["contents"][1]["parts"][0]["thoughtSignature"], "CiQBVKhc7oFQ/+=",
        "{to_gemini}"
    );
    // Toward Anthropic or OpenAI upstreams the ids are the plain ones.
    let to_openai = openai::encode_request(&req, &mut openai::ToolNames::default(), &mut Loss::default()).unwrap();
    let sent = to_openai["messages"][1]["tool_calls"][0]["id"].as_str().unwrap();
    assert!(!sent.contains("__thought__"), "{to_openai}");
}

#[test]
fn thinking_toward_anthropic_is_off_for_a_turn_after_unsigned_tool_calls() {
    let tool = json!({"type": "function", "function": {"name": "read", "parameters": {"type": "object"}}});
    let call = json!({"id": "call_1", "type": "function", "function": {"name": "read", "arguments": "{}"}});
    let body = json!({"model": "c", "reasoning_effort": "high", "tools": [tool], "messages": [
        {"role": "user", "content": "read it"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "fn main() {}"}]});
    let mut loss = Loss::default();
    let ir = openai::decode_request(&body, &mut loss).unwrap();
    let out = anthropic::encode_request(&ir, 4096, &mut loss).unwrap();
    assert!(out.get("thinking").is_none(), "{out}");
    assert!(loss.0.iter().any(|l| l.contains("signed")), "{loss:?}");
    // A first turn, or a history whose tool turn kept its signed thinking
    // (an Anthropic client), thinks as asked.
    let first = json!({"model": "c", "reasoning_effort": "high", "tools": [tool], "messages": [{"role": "user", "content": "read it"}]});
    let ir = openai::decode_request(&first, &mut Loss::default()).unwrap();
    let out = anthropic::encode_request(&ir, 4096, &mut Loss::default()).unwrap();
    assert_eq!(out["thinking"]["type"], "enabled");
    let claude = json!({"model": "c", "max_tokens": 8000, "thinking": {"type": "enabled", "budget_tokens": 2048}, "messages": [
        {"role": "user", "content": "read it"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "sig"},
                                          {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}]}]});
    let ir = anthropic::decode_request(&claude, &mut Loss::default()).unwrap();
    let out = anthropic::encode_request(&ir, 4096, &mut Loss::default()).unwrap();
    assert_eq!(out["thinking"]["budget_tokens"], 2048);
}

/// Anthropic's `model_context_window_exceeded` (the context window cut the
/// answer) is a length stop for other clients, as `max_tokens` is.
#[test]
fn a_context_window_stop_is_a_length_stop() {
    use crate::convert::{anthropic, ir::Finish};
    assert_eq!(
        anthropic::finish_from_wire("model_context_window_exceeded", None),
        Finish::Length
    );
    assert_eq!(crate::convert::openai::finish_to_wire(&Finish::Length), "length");
}
