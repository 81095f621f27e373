//! A fixed-memory JSON scanner that finds provider usage objects in a byte
//! stream without parsing (or keeping) the rest of the document.
//!
//! It tracks nesting and string state byte by byte, remembers the first
//! bytes of the last string (a candidate key), and when a `usage` or
//! `usageMetadata` key one or two levels deep opens an object, copies that
//! object (at most [`OBJECT_CAP`] bytes) and parses only it. One or two
//! levels covers every provider: OpenAI and Anthropic bodies and chunks
//! (`usage`), Anthropic `message_start` (`message.usage`), the Responses
//! API's `response.completed` (`response.usage`), Gemini chunks and the
//! elements of Gemini's JSON-array stream (`usageMetadata`). Deeper keys
//! (a tool schema's property named `usage`) are ignored.

use super::Usage;
use memchr::memchr2;
use serde::Deserialize;

/// Largest usage object kept for parsing; real ones are a few hundred bytes.
const OBJECT_CAP: usize = 4096;
/// Longest model name kept from an answer (real ones are under 64 bytes).
const MODEL_CAP: usize = 128;
/// Longest key remembered; longer strings can never be one we look for.
const KEY_CAP: usize = 16;

/// The keys whose object values are usage objects.
fn is_usage_key(s: &[u8]) -> bool {
    matches!(s, b"usage" | b"usageMetadata")
}

/// The keys whose string values name the model that answered: OpenAI's and
/// Anthropic's `model` (top level, or in Anthropic's `message_start` and
/// the Responses API's `response`), Gemini's `modelVersion`.
fn is_model_key(s: &[u8]) -> bool {
    matches!(s, b"model" | b"modelVersion")
}

/// The keys whose string values say why the answer ended: OpenAI's
/// `finish_reason` (in `choices[i]`), Anthropic's `stop_reason` (top level,
/// or in `message_delta`'s `delta`), Gemini's `finishReason` (in
/// `candidates[i]`).
fn is_finish_key(s: &[u8]) -> bool {
    matches!(s, b"finish_reason" | b"stop_reason" | b"finishReason")
}

/// The keys naming the answer: `id` (OpenAI's top level, Anthropic's
/// `message_start.message`, the Responses API's `response`), Gemini's
/// `responseId`.
fn is_id_key(s: &[u8]) -> bool {
    matches!(s, b"id" | b"responseId")
}

/// A text field read from an answer besides its usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Model,
    Finish,
    Id,
}

/// Scanner state for one JSON text (or a sequence of them).
#[derive(Debug, Default)]
pub struct JsonScan {
    depth: u32,
    in_string: bool,
    escape: bool,
    /// The current string's first bytes, and whether it was longer.
    key: [u8; KEY_CAP],
    key_len: usize,
    key_long: bool,
    /// A string just closed was `usage`/`usageMetadata` (if it is a key).
    last_string: bool,
    /// `"usage":` seen; waiting for the value.
    pending: bool,
    /// The usage object being copied, with the depth it closes at.
    capture: Option<(Vec<u8>, u32)>,
    /// A string just closed was a [`Field`]'s key; then its `:` was seen.
    field_key: Option<Field>,
    field_pending: Option<Field>,
    /// The field's string value being read.
    field_text: Option<(Field, Vec<u8>)>,
    /// The first model an answer named (kept across events).
    model: Option<String>,
    /// The last reason an answer gave for ending (kept across events).
    finish: Option<String>,
    /// The first id the answer gave itself (kept across events).
    id: Option<String>,
    /// A usage object could not be read or believed (kept across events).
    unreadable: bool,
}

impl JsonScan {
    /// Start over (a new SSE event).
    pub fn reset(&mut self) {
        self.depth = 0;
        self.in_string = false;
        self.escape = false;
        self.last_string = false;
        self.pending = false;
        self.capture = None;
        self.field_key = None;
        self.field_pending = None;
        self.field_text = None;
    }

    /// The model the answer named, if it did.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Whether a usage object the answer sent could not be read or
    /// believed ([`MAX_COUNT`]).
    pub fn usage_unreadable(&self) -> bool {
        self.unreadable
    }

    /// The answer's id (`chatcmpl-…`, `msg_…`, `resp_…`, Gemini's
    /// `responseId`), the first one it gave.
    pub fn response_id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// Why the answer ended, as its provider said last (`stop`,
    /// `end_turn`, `STOP`, `length`, `tool_calls`...).
    pub fn finish_reason(&self) -> Option<&str> {
        self.finish.as_deref()
    }

    /// Scan `data`, updating `usage` from every usage object that completes.
    pub fn feed(&mut self, mut data: &[u8], usage: &mut Usage) {
        while !data.is_empty() {
            if self.in_string {
                data = self.string_bytes(data);
                continue;
            }
            let b = data[0];
            data = &data[1..];
            self.structural(b, usage);
        }
    }

    /// Inside a string: jump to the next quote or backslash.
    fn string_bytes<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        if self.escape {
            self.escape = false;
            self.key_long = true; // keys we look for have no escapes
            self.field_text = None; // nor do model names and reasons
            self.copy(&data[..1]);
            return &data[1..];
        }
        let Some(i) = memchr2(b'"', b'\\', data) else {
            self.key_text(data);
            self.field_text_add(data);
            self.copy(data);
            return &[];
        };
        self.key_text(&data[..i]);
        self.field_text_add(&data[..i]);
        self.copy(&data[..=i]);
        if data[i] == b'\\' {
            self.escape = true;
        } else {
            self.in_string = false;
            let key = &self.key[..self.key_len];
            self.last_string = !self.key_long && is_usage_key(key);
            self.field_key = match () {
                _ if self.key_long => None,
                _ if is_model_key(key) => Some(Field::Model),
                _ if is_finish_key(key) => Some(Field::Finish),
                _ if is_id_key(key) => Some(Field::Id),
                _ => None,
            };
            if let Some((field, text)) = self.field_text.take().filter(|(_, t)| !t.is_empty()) {
                let text = String::from_utf8(text).ok();
                match field {
                    Field::Model => self.model = text,
                    Field::Finish => self.finish = text.or(self.finish.take()),
                    Field::Id => self.id = text,
                }
            }
        }
        &data[i + 1..]
    }

    fn field_text_add(&mut self, s: &[u8]) {
        if let Some((_, text)) = &mut self.field_text {
            if text.len() + s.len() > MODEL_CAP {
                self.field_text = None;
            } else {
                text.extend_from_slice(s);
            }
        }
    }

    fn key_text(&mut self, s: &[u8]) {
        if self.key_long {
            return;
        }
        if self.key_len + s.len() > KEY_CAP {
            self.key_long = true;
        } else {
            self.key[self.key_len..self.key_len + s.len()].copy_from_slice(s);
            self.key_len += s.len();
        }
    }

    fn structural(&mut self, b: u8, usage: &mut Usage) {
        match b {
            b'"' => {
                self.copy(&[b]);
                self.in_string = true;
                self.key_len = 0;
                self.key_long = false;
                self.last_string = false;
                self.field_key = None;
                if let Some(field) = self.field_pending.take() {
                    self.field_text = Some((field, Vec::new()));
                }
            }
            b':' => {
                self.copy(&[b]);
                self.pending = std::mem::take(&mut self.last_string) && matches!(self.depth, 1 | 2);
                self.field_pending = match self.field_key.take() {
                    Some(Field::Model) if matches!(self.depth, 1 | 2) && self.model.is_none() => Some(Field::Model),
                    Some(Field::Finish) if matches!(self.depth, 1..=3) => Some(Field::Finish),
                    Some(Field::Id) if matches!(self.depth, 1 | 2) && self.id.is_none() => Some(Field::Id),
                    _ => None,
                };
            }
            b'{' | b'[' => {
                // Both keys parse into the same fields; the names differ.
                if b == b'{' && self.capture.is_none() && self.pending {
                    let mut buf = Vec::with_capacity(256);
                    buf.push(b);
                    // The object closes when depth drops back to this level.
                    self.capture = Some((buf, self.depth));
                } else {
                    self.copy(&[b]);
                }
                self.pending = false;
                self.last_string = false;
                self.field_key = None;
                self.field_pending = None;
                self.depth = self.depth.saturating_add(1);
            }
            b'}' | b']' => {
                self.copy(&[b]);
                self.depth = self.depth.saturating_sub(1);
                self.pending = false;
                self.last_string = false;
                self.field_key = None;
                self.field_pending = None;
                if let Some((_, at)) = &self.capture
                    && *at == self.depth
                    && let Some((buf, _)) = self.capture.take()
                {
                    self.unreadable |= !read_counts(&buf, usage);
                }
            }
            b' ' | b'\t' | b'\r' | b'\n' => self.copy(&[b]),
            _ => {
                // Numbers, literals, commas: no key can be pending past them.
                self.copy(&[b]);
                self.pending = false;
                self.last_string = false;
                self.field_key = None;
                self.field_pending = None;
            }
        }
    }

    /// Append to the usage object being copied; an oversized one is dropped.
    fn copy(&mut self, s: &[u8]) {
        if let Some((buf, _)) = &mut self.capture {
            if buf.len() + s.len() > OBJECT_CAP {
                self.capture = None;
            } else {
                buf.extend_from_slice(s);
            }
        }
    }
}

/// Every token field any provider puts in its usage object.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Counts {
    // OpenAI chat / completions / embeddings
    #[serde(rename = "prompt_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(rename = "completion_tokens")]
    completion_tokens: Option<u64>,
    #[serde(rename = "prompt_tokens_details")]
    prompt_tokens_details: Option<Details>,
    #[serde(rename = "completion_tokens_details")]
    completion_tokens_details: Option<Details>,
    // Anthropic; the OpenAI Responses API uses the same two names
    #[serde(rename = "input_tokens")]
    input_tokens: Option<u64>,
    #[serde(rename = "output_tokens")]
    output_tokens: Option<u64>,
    #[serde(rename = "cache_creation_input_tokens")]
    cache_creation_input_tokens: Option<u64>,
    #[serde(rename = "cache_read_input_tokens")]
    cache_read_input_tokens: Option<u64>,
    // The Responses API's parts
    #[serde(rename = "input_tokens_details")]
    input_tokens_details: Option<Details>,
    #[serde(rename = "output_tokens_details")]
    output_tokens_details: Option<Details>,
    // Gemini usageMetadata
    prompt_token_count: Option<u64>,
    candidates_token_count: Option<u64>,
    thoughts_token_count: Option<u64>,
    cached_content_token_count: Option<u64>,
}

/// OpenAI's `*_tokens_details` (chat and Responses alike).
#[derive(Deserialize, Default)]
struct Details {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

/// A count above this is no count: no answer reads or writes a billion
/// tokens, and a provider that says so (or says `-5`, `1e20`, `"10"`) has
/// its usage object ignored and the request charged its estimate.
pub const MAX_COUNT: u64 = 1_000_000_000;

impl Counts {
    fn believable(&self) -> bool {
        let details = |d: &Option<Details>| {
            d.as_ref()
                .map_or([None, None], |d| [d.cached_tokens, d.reasoning_tokens])
        };
        [
            self.prompt_tokens,
            self.completion_tokens,
            self.input_tokens,
            self.output_tokens,
            self.cache_creation_input_tokens,
            self.cache_read_input_tokens,
            self.prompt_token_count,
            self.candidates_token_count,
            self.thoughts_token_count,
            self.cached_content_token_count,
        ]
        .into_iter()
        .chain(details(&self.prompt_tokens_details))
        .chain(details(&self.completion_tokens_details))
        .chain(details(&self.input_tokens_details))
        .chain(details(&self.output_tokens_details))
        .all(|n| n.is_none_or(|n| n <= MAX_COUNT))
    }
}

/// Parse one usage object and merge what it says into `usage`. Later
/// objects win: providers report cumulative counts (a count a later object
/// leaves out keeps its earlier value: Anthropic's `message_delta` may
/// carry only `output_tokens`). False if the object could not be believed.
fn read_counts(object: &[u8], usage: &mut Usage) -> bool {
    let Some(c) = serde_json::from_slice::<Counts>(object).ok().filter(Counts::believable) else {
        return false;
    };
    let prompt = c.prompt_tokens.or(c.prompt_token_count).or_else(|| {
        // Anthropic counts cache reads and writes apart from input_tokens.
        c.input_tokens.map(|i| {
            i.saturating_add(c.cache_creation_input_tokens.unwrap_or(0))
                .saturating_add(c.cache_read_input_tokens.unwrap_or(0))
        })
    });
    let completion = c.completion_tokens.or(c.output_tokens).or_else(|| {
        (c.candidates_token_count.is_some() || c.thoughts_token_count.is_some()).then(|| {
            c.candidates_token_count
                .unwrap_or(0)
                .saturating_add(c.thoughts_token_count.unwrap_or(0))
        })
    });
    if prompt.is_none() && completion.is_none() {
        // `"usage": {}`: an answer that says it counted, and counted nothing.
        return false;
    }
    let detail = |d: &Option<Details>, f: fn(&Details) -> Option<u64>| d.as_ref().and_then(f);
    let cache_read = c
        .cache_read_input_tokens
        .or(c.cached_content_token_count)
        .or(detail(&c.prompt_tokens_details, |d| d.cached_tokens))
        .or(detail(&c.input_tokens_details, |d| d.cached_tokens));
    let reasoning = c
        .thoughts_token_count
        .or(detail(&c.completion_tokens_details, |d| d.reasoning_tokens))
        .or(detail(&c.output_tokens_details, |d| d.reasoning_tokens));
    let merge = |into: &mut Option<u64>, v: Option<u64>| {
        if v.is_some() {
            *into = v;
        }
    };
    merge(&mut usage.prompt_tokens, prompt);
    merge(&mut usage.completion_tokens, completion);
    merge(&mut usage.cache_read_tokens, cache_read);
    merge(&mut usage.cache_write_tokens, c.cache_creation_input_tokens);
    merge(&mut usage.reasoning_tokens, reasoning);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(parts: &[&str]) -> Usage {
        let mut s = JsonScan::default();
        let mut u = Usage::default();
        parts.iter().for_each(|p| s.feed(p.as_bytes(), &mut u));
        u
    }

    fn scan_bytewise(text: &str) -> Usage {
        let mut s = JsonScan::default();
        let mut u = Usage::default();
        text.as_bytes().chunks(1).for_each(|b| s.feed(b, &mut u));
        u
    }

    #[test]
    fn finds_usage_at_the_top_level_whatever_the_split() {
        let body = r#"{"id":"x","choices":[{"message":{"content":"the \"usage\": {\"prompt_tokens\": 1}"}}],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12,"prompt_tokens_details":{"cached_tokens":0}}}"#;
        let want = Usage {
            prompt_tokens: Some(9),
            completion_tokens: Some(3),
            cache_read_tokens: Some(0),
            ..Default::default()
        };
        assert_eq!(scan_all(&[body]), want);
        assert_eq!(scan_bytewise(body), want);
        for cut in 0..body.len() {
            assert_eq!(scan_all(&[&body[..cut], &body[cut..]]), want, "cut at {cut}");
        }
    }

    #[test]
    fn ignores_deep_keys_and_keys_in_strings() {
        let body = r#"{"tools":[{"parameters":{"properties":{"usage":{"prompt_tokens":1000}}}}],"text":"\"usage\":{\"prompt_tokens\":5}"}"#;
        assert_eq!(scan_all(&[body]), Usage::default());
    }

    #[test]
    fn counts_no_provider_could_mean_are_not_believed() {
        let read = |o: &str| {
            let mut u = Usage::default();
            (read_counts(o.as_bytes(), &mut u), u.prompt_tokens, u.completion_tokens)
        };
        assert_eq!(
            read(r#"{"prompt_tokens":10,"completion_tokens":5}"#),
            (true, Some(10), Some(5))
        );
        for bad in [
            r#"{"prompt_tokens":-5,"completion_tokens":5}"#,
            r#"{"prompt_tokens":1e20,"completion_tokens":5}"#,
            r#"{"prompt_tokens":"10","completion_tokens":5}"#,
            r#"{"prompt_tokens":10.5,"completion_tokens":5}"#,
            r#"{"prompt_tokens":18446744073709551615,"completion_tokens":1}"#,
            r#"{"input_tokens":1000000001,"output_tokens":1}"#,
            r#"{"prompt_tokens":1,"prompt_tokens_details":{"cached_tokens":9000000000}}"#,
            r#"{}"#,
            r#"{"total_tokens":12}"#,
        ] {
            assert_eq!(read(bad), (false, None, None), "{bad}");
        }
        // At the bound, sums do not overflow.
        let max = format!(
            r#"{{"input_tokens":{m},"cache_read_input_tokens":{m},"cache_creation_input_tokens":{m}}}"#,
            m = MAX_COUNT
        );
        assert_eq!(read(&max), (true, Some(3 * MAX_COUNT), None));
        // The scanner remembers that an answer's usage was not believed.
        let mut s = JsonScan::default();
        let mut u = Usage::default();
        s.feed(br#"{"id":"x","usage":{"prompt_tokens":-1}}"#, &mut u);
        assert!(s.usage_unreadable());
    }

    #[test]
    fn responses_api_and_anthropic_nesting() {
        let done = r#"{"type":"response.completed","response":{"id":"r","output":[],"usage":{"input_tokens":20,"input_tokens_details":{"cached_tokens":4},"output_tokens":7,"total_tokens":27}}}"#;
        assert_eq!(
            scan_all(&[done]),
            Usage {
                prompt_tokens: Some(20),
                completion_tokens: Some(7),
                cache_read_tokens: Some(4),
                ..Default::default()
            }
        );
        let start = r#"{"type":"message_start","message":{"usage":{"input_tokens":10,"cache_creation_input_tokens":5,"cache_read_input_tokens":90,"output_tokens":1}}}"#;
        assert_eq!(
            scan_all(&[start]),
            Usage {
                prompt_tokens: Some(105),
                completion_tokens: Some(1),
                cache_read_tokens: Some(90),
                cache_write_tokens: Some(5),
                ..Default::default()
            }
        );
    }

    #[test]
    fn gemini_array_elements() {
        let arr = r#"[{"candidates":[],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":1}},
{"candidates":[],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":8,"thoughtsTokenCount":2}}]"#;
        assert_eq!(
            scan_all(&[arr]),
            Usage {
                prompt_tokens: Some(3),
                completion_tokens: Some(10),
                reasoning_tokens: Some(2),
                ..Default::default()
            }
        );
    }

    #[test]
    fn an_oversized_usage_object_is_dropped_not_kept() {
        let big = format!(
            r#"{{"usage":{{"pad":"{}","prompt_tokens":1}}}}"#,
            "x".repeat(OBJECT_CAP)
        );
        assert_eq!(scan_all(&[&big]), Usage::default());
    }

    /// Each provider's documented usage shape with its cache and reasoning
    /// parts: OpenAI chat (`prompt_tokens_details.cached_tokens`,
    /// `completion_tokens_details.reasoning_tokens`, both shares of the
    /// totals), the Responses API (`input_tokens_details`,
    /// `output_tokens_details`), Anthropic (`cache_creation_input_tokens`
    /// and `cache_read_input_tokens` apart from `input_tokens`), Gemini
    /// (`cachedContentTokenCount` a share of `promptTokenCount`,
    /// `thoughtsTokenCount` apart from `candidatesTokenCount`).
    #[test]
    fn cache_and_reasoning_parts_of_every_provider() {
        let part = |p, c, r: Option<u64>, w: Option<u64>, th: Option<u64>| Usage {
            prompt_tokens: Some(p),
            completion_tokens: Some(c),
            cache_read_tokens: r,
            cache_write_tokens: w,
            reasoning_tokens: th,
        };
        let chat = r#"{"usage": {"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
            "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 256, "audio_tokens": 0}}}"#;
        assert_eq!(scan_all(&[chat]), part(2006, 300, Some(1920), None, Some(256)));
        let responses = r#"{"type":"response.completed","response":{"usage":{"input_tokens":1500,
            "input_tokens_details":{"cached_tokens":1024},"output_tokens":700,
            "output_tokens_details":{"reasoning_tokens":512},"total_tokens":2200}}}"#;
        assert_eq!(scan_all(&[responses]), part(1500, 700, Some(1024), None, Some(512)));
        let anthropic = r#"{"usage":{"input_tokens":50,"cache_creation_input_tokens":2000,
            "cache_read_input_tokens":8000,"output_tokens":120}}"#;
        assert_eq!(scan_all(&[anthropic]), part(10_050, 120, Some(8000), Some(2000), None));
        let gemini = r#"{"usageMetadata":{"promptTokenCount":5000,"cachedContentTokenCount":4096,
            "candidatesTokenCount":200,"thoughtsTokenCount":800,"totalTokenCount":6000}}"#;
        assert_eq!(scan_all(&[gemini]), part(5000, 1000, Some(4096), None, Some(800)));
    }

    #[test]
    fn a_later_object_keeps_the_parts_it_leaves_out() {
        let start = r#"{"type":"message_start","message":{"usage":{"input_tokens":4,"cache_read_input_tokens":60,"output_tokens":1}}}"#;
        let delta = r#"{"type":"message_delta","usage":{"output_tokens":33}}"#;
        let mut s = JsonScan::default();
        let mut u = Usage::default();
        s.feed(start.as_bytes(), &mut u);
        s.reset();
        s.feed(delta.as_bytes(), &mut u);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.cache_read_tokens),
            (Some(64), Some(33), Some(60))
        );
    }

    #[test]
    fn the_model_an_answer_names_is_kept() {
        let model = |parts: &[&str]| {
            let mut s = JsonScan::default();
            let mut u = Usage::default();
            parts.iter().for_each(|p| s.feed(p.as_bytes(), &mut u));
            s.model().map(str::to_string)
        };
        let chat =
            r#"{"id":"x","model":"gpt-4o-2024-08-06","choices":[{"message":{"content":"the \"model\": \"evil\""}}]}"#;
        assert_eq!(model(&[chat]).as_deref(), Some("gpt-4o-2024-08-06"));
        for cut in 0..chat.len() {
            assert_eq!(
                model(&[&chat[..cut], &chat[cut..]]).as_deref(),
                Some("gpt-4o-2024-08-06"),
                "cut at {cut}"
            );
        }
        let start = r#"{"type":"message_start","message":{"id":"m","model":"claude-sonnet-4-5-20250929","usage":{}}}"#;
        assert_eq!(model(&[start]).as_deref(), Some("claude-sonnet-4-5-20250929"));
        let gemini = r#"{"candidates":[],"modelVersion": "gemini-2.5-flash"}"#;
        assert_eq!(model(&[gemini]).as_deref(), Some("gemini-2.5-flash"));
        // Deeper keys, non-strings, escapes and huge names are not a model.
        assert_eq!(model(&[r#"{"a":{"b":{"model":"deep"}}}"#]), None);
        assert_eq!(model(&[r#"{"model":{"name":"x"},"model2":"y"}"#]), None);
        assert_eq!(model(&[r#"{"model":"a\"b"}"#]), None);
        let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(MODEL_CAP + 1));
        assert_eq!(model(&[&long]), None);
        // The first named wins (later chunks repeat it).
        assert_eq!(
            model(&[r#"{"model":"one"}"#, r#"{"model":"two"}"#]).as_deref(),
            Some("one")
        );
    }

    /// Each provider's documented place for why an answer ended; `null`
    /// (a stream's earlier chunks) keeps what was said; the last wins.
    #[test]
    fn the_finish_reason_an_answer_gives_is_kept() {
        // Each part a stream event: (finish reason, response id).
        let scan = |parts: &[&str]| {
            let mut s = JsonScan::default();
            let mut u = Usage::default();
            for p in parts {
                s.feed(p.as_bytes(), &mut u);
                s.reset();
            }
            (
                s.finish_reason().map(str::to_string),
                s.response_id().map(str::to_string),
            )
        };
        let finish = |parts: &[&str]| scan(parts).0;
        let id = |parts: &[&str]| scan(parts).1;
        let chat =
            r#"{"choices":[{"index":0,"message":{"content":"the finish_reason: x"},"finish_reason":"tool_calls"}]}"#;
        assert_eq!(finish(&[chat]).as_deref(), Some("tool_calls"));
        let chunks = [
            r#"{"choices":[{"delta":{"content":"a"},"finish_reason":null}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"length"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1}}"#,
        ];
        assert_eq!(finish(&chunks).as_deref(), Some("length"));
        let anthropic = [
            r#"{"type":"message_start","message":{"stop_reason":null}}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":3}}"#,
        ];
        assert_eq!(finish(&anthropic).as_deref(), Some("end_turn"));
        let gemini = r#"{"candidates":[{"content":{"parts":[{"text":"x"}]},"finishReason":"MAX_TOKENS","index":0}]}"#;
        assert_eq!(id(&[chat]), None, "no id at all");
        assert_eq!(
            id(&[r#"{"id":"chatcmpl-1","choices":[]}"#]).as_deref(),
            Some("chatcmpl-1")
        );
        // Anthropic: the message's id, not a later tool block's.
        let blocks = [
            r#"{"type":"message_start","message":{"id":"msg_1","content":[]}}"#,
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"toolu_1"}}"#,
        ];
        assert_eq!(id(&blocks).as_deref(), Some("msg_1"));
        // Gemini: a function call's id is deep; the response's is not.
        let g =
            r#"{"candidates":[{"content":{"parts":[{"functionCall":{"id":"f1","name":"n"}}]}}],"responseId":"r-9"}"#;
        assert_eq!(id(&[g]).as_deref(), Some("r-9"));
        assert_eq!(finish(&[gemini]).as_deref(), Some("MAX_TOKENS"));
        assert_eq!(finish(&[r#"{"a":{"b":{"c":{"finish_reason":"deep"}}}}"#]), None);
    }
}
