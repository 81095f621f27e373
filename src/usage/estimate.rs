//! Token estimates for what a provider did not report: the prompt of a
//! request (its reservation, before the answer) and the usage charged for a
//! request that ended without the provider's usage (a client hang-up, a cut
//! stream, an upstream error after bytes).
//!
//! A provider bills the prompt it read and the output it generated whether
//! or not the client stayed to see the usage, so such a request is charged
//! an estimate rather than nothing (nothing would make hanging up before
//! the usage chunk a way to dodge tpm and quotas). The estimates are
//! deliberately simple and documented (docs/resilience.md, "Metering
//! requests that do not finish"):
//!
//! - prompt: the request body's bytes / [`BYTES_PER_TOKEN`] (JSON framing
//!   included: an over- rather than an under-estimate);
//! - completion: one token per SSE `data:` line relayed (providers send
//!   about one token per content delta; the few framing events count too),
//!   or the decoded body's bytes / [`BYTES_PER_TOKEN`] for a JSON answer.

use super::Usage;

/// About how many bytes of English text or JSON make one token.
pub const BYTES_PER_TOKEN: u64 = 4;

/// The prompt tokens of a request whose body is `request_bytes` long: the
/// one estimate both the reservation (`cluster::limits::reserve_for`) and
/// the charge of an unfinished request use.
pub fn prompt_tokens(request_bytes: u64) -> u64 {
    request_bytes / BYTES_PER_TOKEN
}

/// The usage to charge for a request: what the provider reported, or, when
/// the request did not finish (`unfinished`), that filled in from the
/// estimates (`prompt_estimate` from [`prompt_tokens`], `seen` the
/// completion tokens estimated from the answer relayed so far). Returns the
/// usage and whether any of it is an estimate.
///
/// A provider's partial report is kept where it says more: Anthropic's
/// `message_start` names the prompt exactly (and one output token); the
/// completion is the larger of what was reported and what was seen.
pub fn charge(reported: Usage, unfinished: bool, prompt_estimate: u64, seen: u64) -> (Usage, bool) {
    if !unfinished {
        return (reported, false);
    }
    let prompt = reported.prompt_tokens.unwrap_or(prompt_estimate);
    let completion = reported.completion_tokens.unwrap_or(0).max(seen);
    let estimated = reported.prompt_tokens.is_none() || reported.completion_tokens.is_none_or(|c| c < seen);
    (
        Usage {
            prompt_tokens: Some(prompt),
            completion_tokens: Some(completion),
            // The cache parts the provider reported still hold: they
            // price the prompt that was read.
            ..reported
        },
        estimated,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: Usage = Usage {
        prompt_tokens: None,
        completion_tokens: None,
        cache_read_tokens: None,
        cache_write_tokens: None,
        reasoning_tokens: None,
    };

    #[test]
    fn a_finished_request_is_charged_what_the_provider_reported() {
        let real = Usage {
            prompt_tokens: Some(9),
            completion_tokens: Some(3),
            ..Default::default()
        };
        assert_eq!(charge(real, false, 100, 50), (real, false));
        assert_eq!(
            charge(NONE, false, 100, 50),
            (NONE, false),
            "no usage, but finished: unchanged"
        );
    }

    #[test]
    fn an_unfinished_request_without_usage_is_charged_its_estimate() {
        let (u, est) = charge(NONE, true, 100, 7);
        assert!(est);
        assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(100), Some(7)));
        // Hung up before any output: the prompt alone.
        let (u, est) = charge(NONE, true, 100, 0);
        assert!(est);
        assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(100), Some(0)));
    }

    #[test]
    fn a_partial_report_keeps_the_exact_prompt_and_the_larger_completion() {
        let start = Usage {
            prompt_tokens: Some(12),
            completion_tokens: Some(1),
            ..Default::default()
        };
        let (u, est) = charge(start, true, 100, 5);
        assert!(est);
        assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(12), Some(5)));
        // The final usage already arrived (cut just before the end): exact.
        let done = Usage {
            prompt_tokens: Some(12),
            completion_tokens: Some(30),
            ..Default::default()
        };
        assert_eq!(charge(done, true, 100, 5), (done, false));
    }

    #[test]
    fn the_prompt_estimate_is_bytes_over_four() {
        assert_eq!(prompt_tokens(0), 0);
        assert_eq!(prompt_tokens(403), 100);
    }
}
