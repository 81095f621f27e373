//! A whole answer told as a stream (`fake_stream`): the IR answer becomes
//! the deltas a streaming upstream would have sent, so every client format
//! gets its usual event grammar from its own stream encoder.

use super::Delta;
use crate::convert::ir::{ChatResponse, Finish, Part};

/// The deltas of `resp`, in stream order: usage first (an Anthropic
/// `message_start` carries the input count), the start, each part (a
/// thinking block with its signature, text, every tool call with its
/// arguments in one piece), the finish, the usage again, the end.
pub fn deltas(resp: &ChatResponse) -> Vec<Delta> {
    let mut out = Vec::with_capacity(resp.parts.len() * 2 + 5);
    if let Some(u) = resp.usage {
        out.push(Delta::Usage(u));
    }
    out.push(Delta::Start {
        id: resp.id.clone(),
        model: resp.model.clone(),
    });
    let mut calls = 0;
    for part in &resp.parts {
        match part {
            Part::Text(t) if !t.is_empty() => out.push(Delta::Text(t.clone())),
            Part::Thinking { text, signature } => {
                if !text.is_empty() {
                    out.push(Delta::Thinking(text.clone()));
                }
                if let Some(s) = signature.as_ref().filter(|s| !s.is_empty()) {
                    out.push(Delta::ThinkingSignature(s.clone()));
                }
            }
            Part::RedactedThinking(data) => out.push(Delta::RedactedThinking(data.clone())),
            Part::ToolCall(c) => {
                out.push(Delta::ToolStart {
                    index: calls,
                    id: c.id.clone(),
                    name: c.name.clone(),
                    signature: c.signature.clone(),
                });
                if !c.arguments.is_empty() {
                    out.push(Delta::ToolArgs {
                        index: calls,
                        fragment: c.arguments.clone(),
                    });
                }
                calls += 1;
            }
            // Empty text; media and tool results are not in answers.
            _ => {}
        }
    }
    let finish = match &resp.finish {
        Some(f) => f.clone(),
        None if calls > 0 => Finish::ToolCalls,
        None => Finish::Stop,
    };
    out.push(Delta::Finish(finish));
    if let Some(u) = resp.usage {
        out.push(Delta::Usage(u));
    }
    out.push(Delta::Done);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::{
        ir::{ToolCall, Usage},
        stream::{Converter, anthropic, openai},
    };

    fn answer() -> ChatResponse {
        ChatResponse {
            id: "r1".into(),
            model: "m".into(),
            parts: vec![
                Part::Text("hello".into()),
                Part::ToolCall(ToolCall {
                    id: "call_1".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into(),
                    signature: None,
                }),
            ],
            finish: Some(Finish::ToolCalls),
            usage: Some(Usage {
                input: 11,
                output: 7,
                ..Usage::default()
            }),
            more: Vec::new(),
        }
    }

    fn events(bytes: &[u8]) -> Vec<serde_json::Value> {
        String::from_utf8_lossy(bytes)
            .split("\n\n")
            .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap_or_default())
            .collect()
    }

    #[test]
    fn an_anthropic_client_gets_the_whole_grammar_with_usage() {
        let mut conv = Converter::new(
            Box::new(anthropic::AnthropicDecoder::default()),
            Box::new(anthropic::AnthropicEncoder::new("m")),
            false,
        );
        let out = conv.emit(deltas(&answer()));
        assert!(conv.is_done());
        let types: Vec<String> = events(&out)
            .iter()
            .map(|e| e["type"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(
            types,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let all = events(&out);
        assert_eq!(all[0]["message"]["usage"]["input_tokens"], 11);
        assert_eq!(all[5]["delta"]["partial_json"], r#"{"city":"Paris"}"#);
        assert_eq!(all[7]["delta"]["stop_reason"], "tool_use");
        assert_eq!(all[7]["usage"]["output_tokens"], 7);
    }

    #[test]
    fn an_openai_client_gets_role_first_calls_finish_and_done() {
        let mut conv = Converter::new(
            Box::new(openai::OpenaiDecoder::new(Default::default())),
            Box::new(openai::OpenaiEncoder::new("m", 0, true)),
            false,
        );
        let out = conv.emit(deltas(&answer()));
        let text = String::from_utf8_lossy(&out);
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        let all = events(&out);
        assert_eq!(all[0]["choices"][0]["delta"]["role"], "assistant");
        let finish: Vec<&serde_json::Value> = all
            .iter()
            .filter_map(|e| e["choices"][0].get("finish_reason"))
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finish, [&serde_json::json!("tool_calls")]);
        assert!(all.iter().any(|e| e["usage"]["prompt_tokens"] == 11));
    }
}
