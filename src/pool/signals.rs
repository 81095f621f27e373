//! What a provider's response headers say about the key that was used:
//! how long to stay away (`Retry-After`, reset headers) and how much of the
//! key's allowance is left (`x-ratelimit-remaining-*`,
//! `anthropic-ratelimit-*-remaining`).
//!
//! Dialects: OpenAI (and most OpenAI-compatible servers) send relative Go
//! durations (`x-ratelimit-reset-requests: 6m0s`); Anthropic sends RFC 3339
//! instants (`anthropic-ratelimit-requests-reset: 2025-08-21T12:40:59Z`);
//! `Retry-After` is seconds or an HTTP date. Gemini sends none of these.

use http::HeaderMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One rate-limit window as the provider reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Window {
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    /// Unix milliseconds when the window refills.
    pub reset_ms: Option<i64>,
}

/// The rate-limit facts of one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Signals {
    /// `Retry-After`, as Unix milliseconds.
    pub retry_at_ms: Option<i64>,
    pub requests: Window,
    pub tokens: Window,
}

/// Longest wait read from a header at all, so every instant below fits an
/// `i64` of milliseconds with room to spare. The pool clamps what it reads
/// again, to `[backoff floor, cooldown.max_wait]` (see
/// [`crate::pool::status`]); this bound only keeps the arithmetic safe.
pub const MAX_WAIT: Duration = Duration::from_secs(366 * 24 * 3600);

/// Seconds from a provider (or a broken proxy in front of one) as a wait:
/// negative is none, anything past [`MAX_WAIT`] (`1e20`, infinity) is
/// `MAX_WAIT`. `Duration::from_secs_f64` would panic on overflow.
fn wait_secs(secs: f64) -> Option<Duration> {
    if secs.is_nan() {
        return None;
    }
    Some(Duration::try_from_secs_f64(secs.max(0.0)).map_or(MAX_WAIT, |d| d.min(MAX_WAIT)))
}

impl Signals {
    /// Read the headers of a response received at `now_ms`. Runs on every
    /// answer: one pass over the headers, no allocation, no lookups.
    pub fn read(headers: &HeaderMap, now_ms: i64) -> Self {
        let mut s = Signals::default();
        let mut anthropic = [Window::default(); 3]; // tokens, input, output
        let mut anthropic_requests = Window::default();
        for (name, value) in headers {
            let name = name.as_str();
            let Some(first) = name.as_bytes().first() else { continue };
            if !matches!(first, b'x' | b'a' | b'r') {
                continue;
            }
            let Ok(v) = value.to_str() else { continue };
            let v = v.trim();
            if name == "retry-after" {
                s.retry_at_ms = retry_after(v, now_ms);
            } else if let Some(rest) = name.strip_prefix("x-ratelimit-") {
                match rest {
                    "limit-requests" => s.requests.limit = number(v),
                    "remaining-requests" => s.requests.remaining = number(v),
                    "reset-requests" => s.requests.reset_ms = reset_instant(v, now_ms),
                    "limit-tokens" => s.tokens.limit = number(v),
                    "remaining-tokens" => s.tokens.remaining = number(v),
                    "reset-tokens" => s.tokens.reset_ms = reset_instant(v, now_ms),
                    _ => {}
                }
            } else if let Some(rest) = name.strip_prefix("anthropic-ratelimit-") {
                let (window, field) = if let Some(f) = rest.strip_prefix("requests-") {
                    (&mut anthropic_requests, f)
                } else if let Some(f) = rest.strip_prefix("tokens-") {
                    (&mut anthropic[0], f)
                } else if let Some(f) = rest.strip_prefix("input-tokens-") {
                    (&mut anthropic[1], f)
                } else if let Some(f) = rest.strip_prefix("output-tokens-") {
                    (&mut anthropic[2], f)
                } else {
                    continue;
                };
                match field {
                    "limit" => window.limit = number(v),
                    "remaining" => window.remaining = number(v),
                    "reset" => window.reset_ms = reset_instant(v, now_ms),
                    _ => {}
                }
            }
        }
        if s.requests.remaining.is_none() {
            s.requests = anthropic_requests;
        }
        // Anthropic reports input and output tokens apart as well; the
        // window with the least left binds first.
        if s.tokens.remaining.is_none()
            && let Some(w) = anthropic
                .into_iter()
                .filter(|w| w.remaining.is_some())
                .min_by_key(|w| w.remaining)
        {
            s.tokens = w;
        }
        s
    }

    /// When the window that ran out refills: the later reset of the windows
    /// with nothing left, else the latest reset reported. Never the earliest:
    /// a token 429 also carries the request window's `6ms` reset, and
    /// trusting it sends the retry straight back into the spent window.
    pub fn reset_ms(&self) -> Option<i64> {
        let spent = [self.requests, self.tokens]
            .into_iter()
            .filter(|w| w.remaining == Some(0))
            .filter_map(|w| w.reset_ms)
            .max();
        spent.or_else(|| {
            [self.requests.reset_ms, self.tokens.reset_ms]
                .into_iter()
                .flatten()
                .max()
        })
    }
}

/// Gemini says how long to wait in the 429's body, not in a header:
/// `{"error":{"details":[{"@type":"…RetryInfo","retryDelay":"38s"}]}}`.
pub fn gemini_retry_delay(body: &[u8]) -> Option<Duration> {
    #[derive(serde::Deserialize)]
    struct Body {
        error: Error,
    }
    #[derive(serde::Deserialize)]
    struct Error {
        #[serde(default)]
        details: Vec<Detail>,
    }
    #[derive(serde::Deserialize)]
    struct Detail {
        #[serde(rename = "retryDelay")]
        retry_delay: Option<String>,
    }
    let body: Body = serde_json::from_slice(body).ok()?;
    let delay = body.error.details.into_iter().find_map(|d| d.retry_delay)?;
    let secs: f64 = delay.trim().strip_suffix('s')?.parse().ok()?;
    (secs >= 0.0).then(|| wait_secs(secs)).flatten()
}

fn number(v: &str) -> Option<u64> {
    v.parse::<f64>()
        .ok()
        .filter(|n| n.is_finite())
        .map(|n| n.max(0.0) as u64)
}

/// `Retry-After`: delay seconds or an HTTP date.
fn retry_after(v: &str, now_ms: i64) -> Option<i64> {
    if let Ok(secs) = v.parse::<f64>() {
        return wait_secs(secs).map(|d| now_ms.saturating_add(clamp(d)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(unix_ms(at).clamp(now_ms, now_ms.saturating_add(clamp(MAX_WAIT))))
}

/// A reset header: a relative Go duration (`1s`, `6m0s`, `12ms`), plain
/// seconds, or an RFC 3339 instant.
fn reset_instant(v: &str, now_ms: i64) -> Option<i64> {
    if let Some(d) = go_duration(v) {
        return Some(now_ms.saturating_add(clamp(d)));
    }
    if let Ok(secs) = v.parse::<f64>() {
        return (secs >= 0.0)
            .then(|| wait_secs(secs))
            .flatten()
            .map(|d| now_ms.saturating_add(clamp(d)));
    }
    let at = time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339).ok()?;
    let ms = i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
    Some(ms.clamp(now_ms, now_ms.saturating_add(clamp(MAX_WAIT))))
}

fn clamp(d: Duration) -> i64 {
    i64::try_from(d.min(MAX_WAIT).as_millis()).unwrap_or(i64::MAX)
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Go's `time.Duration` text: one or more `<number><unit>` with units
/// `h`, `m`, `s`, `ms`, `us`/`µs`, `ns`. A bare number is not one.
fn go_duration(v: &str) -> Option<Duration> {
    let mut rest = v;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += n * scale;
        rest = &rest[unit_len..];
    }
    wait_secs(total)
}

#[cfg(test)]
mod tests {
    #[test]
    fn absurd_waits_are_capped_never_a_panic() {
        for v in ["1e20", "inf", "1e308", "99999999999999999999"] {
            assert_eq!(retry_after(v, NOW), Some(NOW + clamp(MAX_WAIT)), "{v}");
            assert_eq!(reset_instant(v, NOW), Some(NOW + clamp(MAX_WAIT)), "{v}");
        }
        assert_eq!(retry_after("NaN", NOW), None);
        assert_eq!(reset_instant("99999999999999999999h", NOW), Some(NOW + clamp(MAX_WAIT)));
        assert_eq!(go_duration("99999999999999999999h"), Some(MAX_WAIT));
        let body = br#"{"error":{"details":[{"retryDelay":"1e20s"}]}}"#;
        assert_eq!(gemini_retry_delay(body), Some(MAX_WAIT));
    }

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (http::HeaderName::from_static(k), v.parse().unwrap()))
            .collect()
    }

    const NOW: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

    #[test]
    fn gemini_retry_info() {
        let body = br#"{"error":{"code":429,"message":"Resource has been exhausted","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"38s"}]}}"#;
        assert_eq!(gemini_retry_delay(body), Some(Duration::from_secs(38)));
        assert_eq!(
            gemini_retry_delay(br#"{"error":{"details":[{"retryDelay":"1.5s"}]}}"#),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(gemini_retry_delay(br#"{"error":{"code":429}}"#), None);
        assert_eq!(gemini_retry_delay(b"not json"), None);
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(go_duration("12ms"), Some(Duration::from_millis(12)));
        assert_eq!(go_duration("1h2m3.5s"), Some(Duration::from_millis(3_723_500)));
        assert_eq!(go_duration("17"), None);
        assert_eq!(go_duration("s"), None);
        assert_eq!(go_duration("3d"), None);
    }

    #[test]
    fn retry_after_seconds_and_http_date() {
        let s = Signals::read(&headers(&[("retry-after", "7")]), NOW);
        assert_eq!(s.retry_at_ms, Some(NOW + 7000));
        let s = Signals::read(&headers(&[("retry-after", "Thu, 01 Jan 2026 00:00:30 GMT")]), NOW);
        assert_eq!(s.retry_at_ms, Some(NOW + 30_000));
        let s = Signals::read(&headers(&[("retry-after", "Wed, 31 Dec 2025 00:00:00 GMT")]), NOW);
        assert_eq!(s.retry_at_ms, Some(NOW), "a past date means now");
        let s = Signals::read(&headers(&[("retry-after", "999999999")]), NOW);
        assert_eq!(s.retry_at_ms, Some(NOW + clamp(MAX_WAIT)), "capped");
        assert_eq!(
            Signals::read(&headers(&[("retry-after", "soon")]), NOW).retry_at_ms,
            None
        );
    }

    #[test]
    fn openai_windows() {
        let s = Signals::read(
            &headers(&[
                ("x-ratelimit-limit-requests", "50"),
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "34s"),
                ("x-ratelimit-remaining-tokens", "18000"),
                ("x-ratelimit-reset-tokens", "6m0s"),
            ]),
            NOW,
        );
        assert_eq!(s.requests.limit, Some(50));
        assert_eq!(s.requests.remaining, Some(0));
        assert_eq!(s.requests.reset_ms, Some(NOW + 34_000));
        assert_eq!(s.tokens.reset_ms, Some(NOW + 360_000));
        assert_eq!(s.reset_ms(), Some(NOW + 34_000), "the spent window's reset");
    }

    #[test]
    fn anthropic_windows_take_the_tightest_tokens() {
        let s = Signals::read(
            &headers(&[
                ("anthropic-ratelimit-requests-remaining", "999"),
                ("anthropic-ratelimit-requests-reset", "2026-01-01T00:00:05Z"),
                ("anthropic-ratelimit-input-tokens-remaining", "80000"),
                ("anthropic-ratelimit-output-tokens-remaining", "0"),
                ("anthropic-ratelimit-output-tokens-reset", "2026-01-01T00:00:20Z"),
            ]),
            NOW,
        );
        assert_eq!(s.requests.remaining, Some(999));
        assert_eq!(s.tokens.remaining, Some(0));
        assert_eq!(s.reset_ms(), Some(NOW + 20_000));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn bounded(at: Option<i64>) -> bool {
            at.is_none_or(|at| (NOW..=NOW + clamp(MAX_WAIT)).contains(&at))
        }

        fn number_text() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<f64>().prop_map(|f| f.to_string()),
                any::<f64>().prop_map(|f| format!("{f:e}")),
                Just("NaN".to_string()),
                Just("inf".to_string()),
                Just("-inf".to_string()),
                Just("1e308".to_string()),
                Just("-1e308".to_string()),
                any::<i64>().prop_map(|n| n.to_string()),
                "[0-9]{1,40}",
            ]
        }

        proptest! {
            #[test]
            fn any_header_text_reads_without_panic_and_within_bounds(v in "\\PC{0,40}") {
                for name in [
                    "retry-after",
                    "x-ratelimit-reset-requests",
                    "x-ratelimit-reset-tokens",
                    "anthropic-ratelimit-tokens-reset",
                ] {
                    let Ok(value) = http::HeaderValue::from_str(&v) else { continue };
                    let mut h = HeaderMap::new();
                    h.insert(http::HeaderName::from_static(name), value);
                    let s = Signals::read(&h, NOW);
                    prop_assert!(bounded(s.retry_at_ms));
                    prop_assert!(bounded(s.reset_ms()));
                }
                let body = format!(r#"{{"error":{{"details":[{{"retryDelay":{}}}]}}}}"#, serde_json::json!(v));
                prop_assert!(gemini_retry_delay(body.as_bytes()).is_none_or(|d| d <= MAX_WAIT));
            }

            #[test]
            fn any_number_with_any_unit_is_bounded(n in number_text(), unit in prop_oneof![
                Just(""), Just("s"), Just("ms"), Just("h"), Just("m"), Just("us"), Just("ns"), Just("h0m"), Just("d"),
            ]) {
                let v = format!("{n}{unit}");
                prop_assert!(bounded(retry_after(&v, NOW)));
                prop_assert!(bounded(reset_instant(&v, NOW)));
                prop_assert!(go_duration(&v).is_none_or(|d| d <= MAX_WAIT));
                let body = format!(r#"{{"error":{{"details":[{{"retryDelay":"{v}"}}]}}}}"#);
                prop_assert!(gemini_retry_delay(body.as_bytes()).is_none_or(|d| d <= MAX_WAIT));
            }

            #[test]
            fn any_date_is_bounded(secs in any::<i64>(), year in 0i32..=9999) {
                let rfc = format!("{year:04}-01-01T00:00:00Z");
                prop_assert!(bounded(reset_instant(&rfc, NOW)));
                let at = UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs() % (400 * 365 * 86400)));
                if let Some(at) = at {
                    prop_assert!(bounded(retry_after(&httpdate::fmt_http_date(at), NOW)));
                }
            }
        }
    }
}
