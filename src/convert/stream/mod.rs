//! Stream conversion: a per-request pipeline of an incremental parser, the
//! upstream format's decoder (events → [`Delta`]s) and the client format's
//! encoder (deltas → framed client events). One input event gives zero or
//! more output bytes at once; nothing waits for a later event except what a
//! format cannot express in pieces (Gemini's whole function-call arguments).

pub mod anthropic;
pub mod gemini;
pub mod openai;
pub mod responses;
pub mod whole;

use super::{
    errors::{self, UpstreamError},
    ir::{Finish, Usage},
    sse::{JsonArrayParser, SseParser},
};

/// One step of an answer, whatever format it streams in.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    /// The answer begins (sent once).
    Start {
        id: String,
        model: String,
    },
    Text(String),
    Thinking(String),
    /// The signature of the thinking just streamed.
    ThinkingSignature(String),
    /// Anthropic's encrypted thinking, whole.
    RedactedThinking(String),
    /// A tool call begins; `index` counts tool calls in this answer from 0.
    ToolStart {
        index: usize,
        id: String,
        name: String,
        /// Gemini's `thoughtSignature` on the call's part.
        signature: Option<String>,
    },
    ToolArgs {
        index: usize,
        fragment: String,
    },
    Finish(Finish),
    /// Usage so far (each report replaces the previous one).
    Usage(Usage),
    /// The upstream reported an error mid-stream.
    Error(UpstreamError),
    /// The upstream's terminal event.
    Done,
}

/// Turns one upstream event into deltas.
pub trait Decoder: Send {
    fn decode(&mut self, event: Option<&str>, data: &str, out: &mut Vec<Delta>);

    /// The upstream body ended cleanly. A format without a terminal event
    /// (Gemini) ends here, not at its finish reason: usage may follow it.
    fn end(&mut self, _out: &mut Vec<Delta>) {}
}

/// Turns deltas into the client's framed events.
pub trait Encoder: Send {
    fn encode(&mut self, delta: &Delta, out: &mut Vec<u8>);

    /// Whether the format repeats the whole answer at its end (Responses:
    /// `*.done` events and `response.completed`), so the encoder holds it.
    fn holds_the_answer(&self) -> bool {
        false
    }
}

/// Most answer bytes (text, thinking, arguments) a stream whose client
/// format repeats the whole answer at its end may carry: the encoder holds
/// them and writes them several times over. Far above any model's output
/// (128k tokens are about 0.5 MiB); an upstream sending more is broken or
/// hostile, and the stream ends in an error instead of memory growing with it.
pub const HELD_ANSWER_MAX: usize = 8 * 1024 * 1024;

enum Framing {
    Sse(SseParser),
    JsonArray(JsonArrayParser),
}

/// One request's stream conversion.
pub struct Converter {
    framing: Framing,
    decoder: Box<dyn Decoder>,
    encoder: Box<dyn Encoder>,
    deltas: Vec<Delta>,
    done: bool,
    /// A forced tool standing for a JSON answer (`json_schema` toward
    /// Anthropic): its arguments are the client's text.
    json_tool: Option<String>,
    json_index: Option<usize>,
    calls: CallOrder,
    /// The error the stream ended with (the upstream's, or FastGate's for a
    /// stream cut or broken), for the audit row.
    failure: Option<UpstreamError>,
    /// Answer bytes told so far, when the encoder holds them.
    held_bytes: usize,
}

/// Keeps each tool call's deltas together for the encoders, whose formats
/// (Anthropic blocks, Responses items, Gemini parts) tell one call at a
/// time. Upstreams announce several calls before their arguments,
/// alternate arguments by call index, or send text while a call is open.
/// The open call's arguments stream at once; anything else that comes
/// while they are not yet a whole JSON value waits, in order (a waiting
/// call's arguments kept with it), and takes its turn once they are — or
/// at the finish, when everything still waiting is told whole.
#[derive(Default)]
struct CallOrder {
    open: Option<usize>,
    open_args: String,
    held: std::collections::VecDeque<Delta>,
}

impl CallOrder {
    fn pass(&mut self, d: Delta, emit: &mut impl FnMut(Delta)) {
        match d {
            Delta::Start { .. } | Delta::Usage(_) => emit(d),
            Delta::Finish(_) | Delta::Done | Delta::Error(_) => {
                while let Some(h) = self.held.pop_front() {
                    self.tell(h, emit);
                }
                self.open = None;
                emit(d);
            }
            Delta::ToolArgs { index, fragment } if self.open == Some(index) => {
                self.open_args.push_str(&fragment);
                emit(Delta::ToolArgs { index, fragment });
                self.release(emit);
            }
            Delta::ToolArgs { index, fragment } => self.hold_args(index, fragment),
            d if !self.held.is_empty() || self.open_unfinished() => self.held.push_back(d),
            d => self.tell(d, emit),
        }
    }

    /// Tell `d` now, following which call is open.
    fn tell(&mut self, d: Delta, emit: &mut impl FnMut(Delta)) {
        match &d {
            Delta::ToolStart { index, .. } => {
                self.open = Some(*index);
                self.open_args.clear();
            }
            Delta::ToolArgs { index, fragment } if self.open == Some(*index) => self.open_args.push_str(fragment),
            Delta::ToolArgs { .. } => {}
            _ => self.open = None,
        }
        emit(d);
    }

    /// What waits takes its turn while the open call is whole.
    fn release(&mut self, emit: &mut impl FnMut(Delta)) {
        loop {
            // A call just told goes on with the arguments kept for it.
            let its_args =
                matches!(self.held.front(), Some(Delta::ToolArgs { index, .. }) if self.open == Some(*index));
            if self.held.is_empty() || (!its_args && self.open_unfinished()) {
                break;
            }
            if let Some(h) = self.held.pop_front() {
                self.tell(h, emit);
            }
        }
    }

    fn open_unfinished(&self) -> bool {
        self.open.is_some() && serde_json::from_str::<serde::de::IgnoredAny>(&self.open_args).is_err()
    }

    /// Arguments of a waiting call join it (right after its start).
    fn hold_args(&mut self, index: usize, fragment: String) {
        let start = self
            .held
            .iter()
            .rposition(|h| matches!(h, Delta::ToolStart { index: i, .. } if *i == index));
        match start {
            Some(pos) => match self.held.get_mut(pos + 1) {
                Some(Delta::ToolArgs {
                    index: i,
                    fragment: args,
                }) if *i == index => args.push_str(&fragment),
                _ => self.held.insert(pos + 1, Delta::ToolArgs { index, fragment }),
            },
            // Arguments of a call already told whole, or never announced.
            None => tracing::warn!(index, "tool-call arguments for a call already written whole: dropped"),
        }
    }
}

impl Converter {
    /// `json_array`: the upstream streams a JSON array (Gemini without `alt=sse`).
    pub fn new(decoder: Box<dyn Decoder>, encoder: Box<dyn Encoder>, json_array: bool) -> Self {
        Converter {
            framing: if json_array {
                Framing::JsonArray(JsonArrayParser::default())
            } else {
                Framing::Sse(SseParser::default())
            },
            decoder,
            encoder,
            deltas: Vec::new(),
            done: false,
            json_tool: None,
            json_index: None,
            calls: CallOrder::default(),
            failure: None,
            held_bytes: 0,
        }
    }

    /// Turn calls of `tool` into the answer's text.
    pub fn with_json_tool(mut self, tool: &str) -> Self {
        self.json_tool = Some(tool.to_string());
        self
    }

    fn rewrite(&mut self, d: Delta) -> Option<Delta> {
        let Some(tool) = &self.json_tool else { return Some(d) };
        match d {
            Delta::ToolStart { index, name, .. } if name == *tool => {
                self.json_index = Some(index);
                None
            }
            Delta::ToolArgs { index, fragment } if Some(index) == self.json_index => Some(Delta::Text(fragment)),
            Delta::Finish(super::ir::Finish::ToolCalls) if self.json_index.is_some() => {
                Some(Delta::Finish(super::ir::Finish::Stop))
            }
            other => Some(other),
        }
    }

    /// Upstream bytes in, client bytes out (possibly none yet).
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.feed_into(chunk, &mut out);
        out
    }

    /// [`Converter::feed`], appending to `out` (several upstream pieces
    /// relayed in one client write).
    pub fn feed_into(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let (decoder, deltas) = (&mut self.decoder, &mut self.deltas);
        let overflowed = match &mut self.framing {
            Framing::Sse(p) => {
                p.feed_with(chunk, &mut |event, data| decoder.decode(event, data, deltas));
                p.overflowed()
            }
            Framing::JsonArray(p) => {
                p.feed_with(chunk, &mut |item| decoder.decode(None, item, deltas));
                p.overflowed()
            }
        };
        if overflowed && !self.done {
            // The cut event is lost: end with an error, never a short answer
            // that looks whole.
            self.deltas.push(Delta::Error(errors::gateway_failure(
                "the upstream sent a stream event larger than 4 MiB",
            )));
        }
        self.flush(out);
    }

    /// The upstream body ended. A stream that ended without its terminal
    /// event gets an error event, so the client does not take a cut answer
    /// for a whole one.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let (decoder, deltas) = (&mut self.decoder, &mut self.deltas);
        if let Framing::Sse(p) = &mut self.framing {
            p.finish_with(&mut |event, data| decoder.decode(event, data, deltas));
        }
        decoder.end(deltas);
        self.flush(&mut out);
        if !self.done {
            self.deltas.push(Delta::Error(errors::gateway_failure(
                "the upstream ended the stream before its end",
            )));
            self.flush(&mut out);
        }
        out
    }

    /// Deltas FastGate made itself (a whole answer told as a stream, an
    /// error), written as the client's events.
    pub fn emit(&mut self, deltas: impl IntoIterator<Item = Delta>) -> Vec<u8> {
        let mut out = Vec::new();
        self.deltas.extend(deltas);
        self.flush(&mut out);
        out
    }

    /// The upstream failed mid-stream (connection lost, timeout).
    pub fn fail(&mut self, message: &str) -> Vec<u8> {
        let mut out = Vec::new();
        if !self.done {
            self.deltas.push(Delta::Error(errors::gateway_failure(message)));
            self.flush(&mut out);
        }
        out
    }

    fn flush(&mut self, out: &mut Vec<u8>) {
        // The list is handed back afterwards: its room is reused.
        let mut deltas = std::mem::take(&mut self.deltas);
        for d in deltas.drain(..) {
            if self.done {
                break;
            }
            let Some(d) = self.rewrite(d) else { continue };
            let holds = self.encoder.holds_the_answer();
            let (encoder, done, failure, held) = (
                &mut self.encoder,
                &mut self.done,
                &mut self.failure,
                &mut self.held_bytes,
            );
            self.calls.pass(d, &mut |d| {
                if *done {
                    return;
                }
                if holds && let Delta::Text(t) | Delta::Thinking(t) | Delta::ToolArgs { fragment: t, .. } = &d {
                    *held += t.len();
                    if *held > HELD_ANSWER_MAX {
                        let e = errors::gateway_failure("the upstream's answer exceeded 8 MiB");
                        *done = true;
                        encoder.encode(&Delta::Error(e.clone()), out);
                        *failure = Some(e);
                        return;
                    }
                }
                match &d {
                    Delta::Done => *done = true,
                    Delta::Error(e) => {
                        *done = true;
                        *failure = Some(e.clone());
                    }
                    _ => {}
                }
                encoder.encode(&d, out);
            });
        }
        self.deltas = deltas;
    }

    /// Whether the stream reached its end (terminal event or error).
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The error the client's stream ended with, if it did.
    pub fn failure(&self) -> Option<&UpstreamError> {
        self.failure.as_ref()
    }
}

/// `data: <json>\n\n`, with an `event:` line when named.
pub(crate) fn sse_frame<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, event: Option<&str>, data: &T) {
    if let Some(e) = event {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(e.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    // Serializing a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, data);
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests;
