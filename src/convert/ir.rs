//! The internal representation every wire format decodes into and encodes
//! from: one decoder and one encoder per format, never a converter per pair.
//!
//! Built to fit the OpenAI Responses API later too: a conversation is a list
//! of turns holding typed parts (text, media, tool calls and results,
//! reasoning), which maps onto Responses "items" one to one.

use serde_json::Value;

/// A chat request, whatever format it came in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    /// System and developer instructions, in order.
    pub system: Vec<String>,
    pub messages: Vec<Message>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u64>,
    pub stop: Vec<String>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
    /// `Some(false)`: at most one tool call per turn.
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<ResponseFormat>,
    pub reasoning: Option<Reasoning>,
    pub stream: bool,
    /// The client wants usage on a stream (OpenAI `stream_options`).
    pub include_usage: bool,
    /// An end-user id for the provider's abuse monitoring.
    pub user: Option<String>,
    /// Features only some formats have; encoders refuse or drop them.
    pub only: FormatOnly,
}

/// Request features without a counterpart everywhere.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FormatOnly {
    /// OpenAI `n` / Gemini `candidateCount`.
    pub candidates: Option<u64>,
    /// OpenAI `logprobs` / `top_logprobs`.
    pub logprobs: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Media {
    Base64 { media_type: String, data: String },
    Url { url: String, media_type: Option<String> },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    Image(Media),
    /// A PDF or other document.
    Document {
        media: Media,
        title: Option<String>,
    },
    ToolCall(ToolCall),
    ToolResult(ToolResult),
    /// Reasoning text; the signature is the provider's proof, kept byte-exact.
    Thinking {
        text: String,
        signature: Option<String>,
    },
    /// Anthropic's encrypted reasoning, only meaningful to Anthropic.
    RedactedThinking(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text (OpenAI's form; parsed where an object is needed).
    pub arguments: String,
    /// Gemini's `thoughtSignature` on the part that carried the call.
    pub signature: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolResult {
    pub call_id: String,
    /// The called tool's name (Gemini needs it; found from the call when absent).
    pub name: Option<String>,
    /// Text and images.
    pub content: Vec<Part>,
    pub is_error: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments.
    pub parameters: Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    Auto,
    None,
    /// Some tool must be called.
    Required,
    Named(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { name: String, schema: Value, strict: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effort {
    Minimal,
    Low,
    Medium,
    High,
}

/// Reasoning asked for: an effort level, a token budget, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reasoning {
    pub effort: Option<Effort>,
    pub budget_tokens: Option<u64>,
    /// Explicitly off (Anthropic `thinking: disabled`, Gemini budget 0).
    pub disabled: bool,
}

impl Effort {
    /// The token budget an effort stands for when the target wants one.
    pub fn budget(self) -> u64 {
        match self {
            Effort::Minimal => 1024,
            Effort::Low => 2048,
            Effort::Medium => 8192,
            Effort::High => 24576,
        }
    }

    /// The effort a token budget stands for when the target wants a level.
    pub fn from_budget(budget: u64) -> Effort {
        match budget {
            0..=1024 => Effort::Minimal,
            1025..=4096 => Effort::Low,
            4097..=16384 => Effort::Medium,
            _ => Effort::High,
        }
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
    ToolCalls,
    ContentFilter,
    /// A stop sequence matched (which one, when known).
    StopSequence(Option<String>),
    Refusal,
    /// Anthropic: a long turn paused; the client continues it.
    PauseTurn,
    Other(String),
}

/// Token usage, with each provider's inclusions made explicit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Input tokens neither read from nor written to a cache.
    pub input: u64,
    pub cache_read: u64,
    pub cache_write: u64,
    /// Every output token, reasoning included.
    pub output: u64,
    /// The reasoning share of `output`.
    pub reasoning: u64,
}

impl Usage {
    /// All input tokens (OpenAI's `prompt_tokens`, Gemini's `promptTokenCount`).
    pub fn input_total(&self) -> u64 {
        self.input + self.cache_read + self.cache_write
    }
}

/// A whole (non-stream) answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatResponse {
    pub id: String,
    pub model: String,
    pub parts: Vec<Part>,
    pub finish: Option<Finish>,
    pub usage: Option<Usage>,
    /// The further choices of an answer asked for several (OpenAI `n`,
    /// Gemini `candidateCount`), in order after the first; usage covers all.
    pub more: Vec<Choice>,
}

/// One more choice of an answer with several.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Choice {
    pub parts: Vec<Part>,
    pub finish: Option<Finish>,
}

/// A forced tool call standing for a JSON answer becomes the answer's text
/// (and a normal stop).
pub fn answer_from_json_tool(resp: &mut ChatResponse, tool: &str) {
    let mut found = false;
    for p in &mut resp.parts {
        if let Part::ToolCall(c) = p
            && c.name == tool
        {
            *p = Part::Text(std::mem::take(&mut c.arguments));
            found = true;
        }
    }
    if found && resp.finish == Some(Finish::ToolCalls) {
        resp.finish = Some(Finish::Stop);
    }
}

/// A documented estimate of a request's input tokens, for token-counting
/// endpoints the upstream's format has no counterpart of: about four
/// characters per token for text and tool definitions, plus a flat 258 per
/// image or document (Gemini's figure for an image).
pub fn estimate_input_tokens(req: &ChatRequest) -> u64 {
    fn part_chars(p: &Part) -> (u64, u64) {
        match p {
            Part::Text(t) | Part::Thinking { text: t, .. } => (t.chars().count() as u64, 0),
            Part::Image(_) | Part::Document { .. } => (0, 1),
            Part::ToolCall(c) => ((c.name.len() + c.arguments.len()) as u64, 0),
            Part::ToolResult(r) => r
                .content
                .iter()
                .map(part_chars)
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1)),
            Part::RedactedThinking(_) => (0, 0),
        }
    }
    let mut chars: u64 = req.system.iter().map(|s| s.chars().count() as u64).sum();
    let mut media = 0;
    for m in &req.messages {
        for p in &m.parts {
            let (c, n) = part_chars(p);
            chars += c;
            media += n;
        }
    }
    chars += req
        .tools
        .iter()
        .map(|t| (t.name.len() + t.description.as_deref().map_or(0, str::len) + t.parameters.to_string().len()) as u64)
        .sum::<u64>();
    chars.div_ceil(4) + media * 258
}
