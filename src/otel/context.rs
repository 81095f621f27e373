//! W3C Trace Context (`traceparent`, `tracestate`): the client's header
//! read strictly, ours written. Anything malformed is ignored (the request
//! starts a fresh trace), never an error.

use opentelemetry::trace::{SpanId, TraceId};

/// Longest `traceparent` looked at (a future version may append fields).
const TRACEPARENT_MAX: usize = 256;
/// Longest `tracestate` carried on (the W3C limit is 32 members of 256).
pub const TRACESTATE_MAX: usize = 512;

/// A parent span from the client's `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// The `sampled` flag: the caller records this trace.
    pub sampled: bool,
}

/// Parse one `traceparent` value: `00-<32 hex>-<16 hex>-<2 hex>`, lowercase
/// only, neither id all zeros, version `ff` refused; a later version may
/// carry more fields after a `-`, which are ignored.
pub fn parse_traceparent(value: &[u8]) -> Option<Parent> {
    if value.len() < 55 || value.len() > TRACEPARENT_MAX {
        return None;
    }
    let version = hex_u8(&value[0..2])?;
    if version == 0xff || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    // Version 00 is exactly 55 bytes; a later one may go on after a '-'.
    if (version == 0 && value.len() != 55) || (value.len() > 55 && value[55] != b'-') {
        return None;
    }
    let trace = hex_bytes::<16>(&value[3..35])?;
    let span = hex_bytes::<8>(&value[36..52])?;
    let flags = hex_u8(&value[53..55])?;
    let (trace_id, span_id) = (TraceId::from_bytes(trace), SpanId::from_bytes(span));
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
    })
}

/// A `tracestate` worth carrying on: within [`TRACESTATE_MAX`], visible
/// ASCII (and spaces, tabs between members) only. Not parsed further: it
/// belongs to the vendors that wrote it.
pub fn valid_tracestate(value: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= TRACESTATE_MAX
        && value
            .iter()
            .all(|&b| b == b' ' || b == b'\t' || (0x21..0x7f).contains(&b))
}

/// `00-<trace>-<span>-<flags>`: what goes upstream.
pub fn format_traceparent(trace_id: TraceId, span_id: SpanId, sampled: bool) -> String {
    format!("00-{trace_id}-{span_id}-{}", if sampled { "01" } else { "00" })
}

/// A fresh, non-zero trace id.
pub fn new_trace_id() -> TraceId {
    loop {
        let id = rand::random::<u128>();
        if id != 0 {
            return TraceId::from(id);
        }
    }
}

/// A fresh, non-zero span id.
pub fn new_span_id() -> SpanId {
    loop {
        let id = rand::random::<u64>();
        if id != 0 {
            return SpanId::from(id);
        }
    }
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

fn hex_u8(s: &[u8]) -> Option<u8> {
    Some(hex_digit(s[0])? << 4 | hex_digit(s[1])?)
}

fn hex_bytes<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = hex_u8(pair)?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_spec_example_parses() {
        let p = parse_traceparent(GOOD.as_bytes()).unwrap();
        assert_eq!(p.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.span_id.to_string(), "00f067aa0ba902b7");
        assert!(p.sampled);
        let unsampled = GOOD.replace("-01", "-00");
        assert!(!parse_traceparent(unsampled.as_bytes()).unwrap().sampled);
        // Other flag bits are not `sampled`.
        let other = GOOD.replace("-01", "-02");
        assert!(!parse_traceparent(other.as_bytes()).unwrap().sampled);
    }

    #[test]
    fn a_later_version_may_append_fields_but_00_may_not() {
        let v1 = GOOD.replacen("00-", "01-", 1);
        assert!(parse_traceparent(format!("{v1}-whatever").as_bytes()).is_some());
        assert!(parse_traceparent(format!("{v1}x").as_bytes()).is_none());
        assert!(parse_traceparent(format!("{GOOD}-extra").as_bytes()).is_none());
    }

    #[test]
    fn hostile_values_are_ignored() {
        let long = format!("{GOOD}-{}", "a".repeat(100_000));
        let zeros_trace = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        let zeros_span = "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01";
        for bad in [
            "",
            "00",
            &GOOD[..54],
            &GOOD.to_uppercase(),
            &GOOD.replace("4bf9", "4BF9"),
            &GOOD.replacen("00-", "ff-", 1),
            &GOOD.replacen("00-", "0g-", 1),
            &GOOD.replace('-', "_"),
            zeros_trace,
            zeros_span,
            &GOOD.replace("-01", "-zz"),
            &long,
            "00-4bf92f3577b34da6a3ce929d0e0e473\u{e9}-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad:.80}");
        }
    }

    #[test]
    fn tracestate_is_carried_only_when_small_and_printable() {
        assert!(valid_tracestate(b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"));
        assert!(!valid_tracestate(b""));
        assert!(!valid_tracestate(b"a=b\r\nx: y"));
        assert!(!valid_tracestate("a=\u{e9}".as_bytes()));
        assert!(!valid_tracestate("a=b,".repeat(200).as_bytes()));
    }

    #[test]
    fn ours_round_trips() {
        let (t, s) = (new_trace_id(), new_span_id());
        let text = format_traceparent(t, s, true);
        assert_eq!(
            parse_traceparent(text.as_bytes()),
            Some(Parent {
                trace_id: t,
                span_id: s,
                sampled: true
            })
        );
        assert!(format_traceparent(t, s, false).ends_with("-00"));
    }
}
