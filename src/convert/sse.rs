//! An incremental Server-Sent Events parser: bytes in as they arrive, whole
//! events out as soon as their blank line is seen. Copes with events split
//! anywhere (mid-line, mid-UTF-8, between `\r` and `\n`), several events per
//! read, `\n`, `\r\n` and `\r` line endings, comments, multi-line `data:`,
//! and `id:`/`retry:` fields (ignored).

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if any (`message` by default per the spec).
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Longest line kept; a longer one is cut (an upstream gone wrong must not
/// make FastGate hold megabytes) and the parser says so ([`SseParser::overflowed`]).
pub const MAX_LINE: usize = 4 * 1024 * 1024;

/// A callback for [`SseParser::feed_with`] that keeps owned copies in `out`.
fn collect_into(out: &mut Vec<SseEvent>) -> impl FnMut(Option<&str>, &str) + '_ {
    |event, data| {
        out.push(SseEvent {
            event: event.map(str::to_string),
            data: data.to_string(),
        })
    }
}

#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    /// The previous byte was a `\r` ending a line: a `\n` next is its pair.
    after_cr: bool,
    /// The `event:` field of the event being read (`has_event` says if set);
    /// kept, like `data`, across events so steady streams allocate nothing.
    event: String,
    has_event: bool,
    data: String,
    has_data: bool,
    /// A line longer than [`MAX_LINE`] was cut.
    overflowed: bool,
}

impl SseParser {
    /// Whether a line was cut at [`MAX_LINE`]: the event it was in, and
    /// every one after it, is not handed out (the stream cannot be told whole).
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Feed bytes; complete events are appended to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) {
        self.feed_with(chunk, &mut collect_into(out));
    }

    /// Feed bytes; `on_event(event, data)` is called for each complete
    /// event, with text borrowed from the parser.
    pub fn feed_with(&mut self, chunk: &[u8], on_event: &mut impl FnMut(Option<&str>, &str)) {
        let mut rest = chunk;
        while !rest.is_empty() {
            if self.after_cr {
                self.after_cr = false;
                if rest[0] == b'\n' {
                    rest = &rest[1..];
                    continue;
                }
            }
            match memchr::memchr2(b'\n', b'\r', rest) {
                Some(i) => {
                    let line = &rest[..i];
                    self.after_cr = rest[i] == b'\r';
                    rest = &rest[i + 1..];
                    if self.line.is_empty() {
                        // The whole line is in this chunk: read it in place.
                        self.end_line(line, on_event);
                    } else {
                        self.push_line_bytes(line);
                        let whole = std::mem::take(&mut self.line);
                        self.end_line(&whole, on_event);
                        self.line = whole;
                        self.line.clear();
                    }
                }
                None => {
                    self.push_line_bytes(rest);
                    rest = &[];
                }
            }
        }
    }

    /// Every event of a whole text (tests, tools).
    pub fn parse_all(text: &[u8]) -> Vec<SseEvent> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        p.feed(text, &mut out);
        p.finish(&mut out);
        out
    }

    /// The stream ended: an event still open (no blank line after it) is
    /// dispatched.
    pub fn finish(&mut self, out: &mut Vec<SseEvent>) {
        self.finish_with(&mut collect_into(out));
    }

    /// [`SseParser::finish`], with a callback like [`SseParser::feed_with`].
    pub fn finish_with(&mut self, on_event: &mut impl FnMut(Option<&str>, &str)) {
        if !self.line.is_empty() {
            let whole = std::mem::take(&mut self.line);
            self.end_line(&whole, on_event);
        }
        self.dispatch(on_event);
    }

    fn push_line_bytes(&mut self, bytes: &[u8]) {
        let room = MAX_LINE.saturating_sub(self.line.len());
        self.overflowed |= bytes.len() > room;
        self.line.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn end_line(&mut self, line: &[u8], on_event: &mut impl FnMut(Option<&str>, &str)) {
        if line.is_empty() {
            self.dispatch(on_event);
            return;
        }
        if line[0] == b':' {
            return; // a comment
        }
        self.overflowed |= line.len() > MAX_LINE;
        let line = &line[..line.len().min(MAX_LINE)];
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        // Valid UTF-8 (nearly always) is checked on the fast path, not
        // walked chunk by chunk as a lossy conversion does.
        let value = match std::str::from_utf8(value) {
            Ok(v) => std::borrow::Cow::Borrowed(v),
            Err(_) => String::from_utf8_lossy(value),
        };
        match field {
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&value);
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event.push_str(&value);
                self.has_event = true;
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(Option<&str>, &str)) {
        let has_event = std::mem::take(&mut self.has_event);
        if !std::mem::take(&mut self.has_data) {
            return;
        }
        // From a cut event on, the stream cannot be told whole: nothing
        // more is handed out (not even its end).
        if !self.overflowed {
            on_event(has_event.then_some(self.event.as_str()), &self.data);
        }
        self.data.clear();
    }
}

/// Elements of a JSON array streamed one at a time (Gemini's stream without
/// `alt=sse`: `[{...}\r\n,{...}]`), each handed out as soon as it closes.
#[derive(Debug, Default)]
pub struct JsonArrayParser {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// An element longer than [`MAX_LINE`] was cut.
    overflowed: bool,
}

impl JsonArrayParser {
    /// Whether an element was cut at [`MAX_LINE`] (it and the rest are not handed out).
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<String>) {
        self.feed_with(chunk, &mut |item| out.push(item.to_string()));
    }

    /// Feed bytes; `on_item` is called with each complete element.
    pub fn feed_with(&mut self, chunk: &[u8], on_item: &mut impl FnMut(&str)) {
        for &b in chunk {
            if self.depth == 0 {
                // Between elements: `[`, `,`, `]` and whitespace.
                if b == b'{' {
                    self.depth = 1;
                    self.buf.push(b);
                }
                continue;
            }
            if self.buf.len() < MAX_LINE {
                self.buf.push(b);
            } else {
                self.overflowed = true;
            }
            if self.in_string {
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        if !self.overflowed {
                            on_item(&String::from_utf8_lossy(&self.buf));
                        }
                        self.buf.clear();
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(input: &[u8], sizes: &[usize]) -> Vec<SseEvent> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        let mut rest = input;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].min(rest.len());
            p.feed(&rest[..n], &mut out);
            rest = &rest[n..];
            i += 1;
        }
        p.finish(&mut out);
        out
    }

    #[test]
    fn events_however_the_bytes_are_cut() {
        let input = "event: message_start\r\ndata: {\"a\":\"é\"}\r\n\r\n: ping comment\n\nevent: ping\ndata: {}\n\ndata: line1\ndata: line2\rdata: line3\r\rid: 7\nretry: 100\ndata:no-space\n\n".as_bytes();
        let want = vec![
            SseEvent {
                event: Some("message_start".into()),
                data: "{\"a\":\"é\"}".into(),
            },
            SseEvent {
                event: Some("ping".into()),
                data: "{}".into(),
            },
            SseEvent {
                event: None,
                data: "line1\nline2\nline3".into(),
            },
            SseEvent {
                event: None,
                data: "no-space".into(),
            },
        ];
        for sizes in [&[input.len()][..], &[1], &[2, 3], &[5, 1, 7], &[13]] {
            assert_eq!(parse_in_pieces(input, sizes), want, "pieces {sizes:?}");
        }
    }

    #[test]
    fn an_unterminated_last_event_is_dispatched_at_the_end() {
        assert_eq!(
            parse_in_pieces(b"data: [DONE]", &[4]),
            vec![SseEvent {
                event: None,
                data: "[DONE]".into()
            }]
        );
        assert!(
            parse_in_pieces(b"event: only\n\n", &[3]).is_empty(),
            "no data, no event"
        );
    }

    #[test]
    fn json_array_elements_split_anywhere() {
        let input = br#"[{"a":"x}]\"y","b":[1,{"c":2}]}
,{"d":"{"}]"#;
        for n in [1usize, 2, 7, input.len()] {
            let mut p = JsonArrayParser::default();
            let mut out = Vec::new();
            for piece in input.chunks(n) {
                p.feed(piece, &mut out);
            }
            assert_eq!(
                out,
                vec![
                    r#"{"a":"x}]\"y","b":[1,{"c":2}]}"#.to_string(),
                    r#"{"d":"{"}"#.to_string()
                ],
                "n={n}"
            );
        }
    }
}
