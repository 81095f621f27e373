//! The retry policy both forwarding paths share (FastGate's own exchange and
//! Pingora's `fail_to_connect`/`error_while_proxy`): given what one attempt
//! ran into, whether another attempt is made and where.
//!
//! The rules, like Envoy's:
//! - **Every attempt spends** one of the route's `retries` (a refused
//!   connection too), so no failure can loop. The one exception is a pooled
//!   connection found dead: one fresh connection per request, and only when
//!   the provider cannot have acted on the request.
//! - **A request the provider may have acted on is not sent again**, unless
//!   its method is idempotent (GET, HEAD, OPTIONS, ...) or its route says
//!   `idempotent: true`. LLM calls bill per call: replaying a POST after a
//!   500, a timeout or a connection lost after the write can bill twice and
//!   create a second file or batch. Proof that it did not act: no connection,
//!   a request not completely written, 429, 529 (Anthropic overloaded), a
//!   503 with `Retry-After`, or a 401/403 to a pool key FastGate injected.
//! - What goes to an upstream also needs room in its `retry_budget`
//!   ([`crate::upstream::Upstream::try_retry`]), checked by the caller once
//!   this says "retry" ([`judge`]).

use super::ctx::RequestCtx;
use crate::{state::AppState, upstream::Upstream};

/// Why no connection carried the request: nothing reached the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotConnected {
    /// Refused, no route, unreachable.
    Refused,
    /// The TCP connect did not finish in time.
    Timeout,
    /// The TLS handshake failed.
    Tls,
    /// Any other failure to connect.
    Other,
}

/// What one attempt ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No connection was made.
    NotConnected(NotConnected),
    /// Writing the request failed before all of it was written: the upstream
    /// cannot have a complete request to act on. `reused`: the connection
    /// came from the pool (it may have been closed while idle).
    WriteFailed { reused: bool },
    /// The request was written, then no answer came: `timeout` waiting for
    /// the headers, else the connection closed or failed. The upstream may
    /// be working on it (and billing it).
    AfterWrite { reused: bool, timeout: bool },
    /// An answer arrived. `retry_after`: it carries `Retry-After`;
    /// `pooled_key`: FastGate injected a pool key (a 401/403 condemns it).
    Answered {
        status: u16,
        retry_after: bool,
        pooled_key: bool,
    },
}

/// What the attempt's caller knows besides the outcome.
#[derive(Debug, Clone, Copy)]
pub struct Facts {
    pub outcome: Outcome,
    /// The method is idempotent, or the route says `idempotent: true`.
    pub idempotent: bool,
    /// Retries left on this upstream (the route's `retries` minus those spent).
    pub retries_left: u32,
    /// Another upstream follows in the route's chain.
    pub fallback_left: bool,
    /// This request already had its free fresh connection.
    pub reconnected: bool,
}

/// Why a failure is not retried; the label of
/// `fastgate_retries_refused_total{reason}` (bounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The upstream's `retry_budget` is spent.
    Budget,
    /// The provider may have acted on the request and the route is not idempotent.
    NotIdempotent,
    /// No retry and no fallback upstream left.
    Exhausted,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Budget => "budget",
            Refusal::NotIdempotent => "not_idempotent",
            Refusal::Exhausted => "exhausted",
        }
    }
}

/// The policy's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Same address, fresh connection, spends nothing (once per request):
    /// a pooled connection was found dead.
    Reconnect,
    /// Another key and address of the same upstream; spends one retry.
    /// `reason` is the `fastgate_failovers_total` label.
    Retry { reason: &'static str },
    /// The next upstream of the route's chain.
    Fallback { reason: &'static str },
    /// No other attempt: the client gets this answer, or the error.
    /// `None`: the outcome is final by nature (a success, a client error).
    Stop(Option<Refusal>),
}

/// Whether the outcome asks for another attempt at all, with the failover
/// reason, and whether it may have been acted on by the provider.
fn classify(outcome: Outcome) -> Option<(&'static str, bool)> {
    match outcome {
        Outcome::NotConnected(_) => Some(("connect", false)),
        Outcome::WriteFailed { .. } => Some(("timeout_or_io", false)),
        Outcome::AfterWrite { .. } => Some(("timeout_or_io", true)),
        Outcome::Answered {
            status,
            retry_after,
            pooled_key,
        } => match status {
            // The provider says it did not take the request.
            429 => Some(("status_429", false)),
            529 => Some(("status_5xx", false)),
            503 if retry_after => Some(("status_5xx", false)),
            401 | 403 if pooled_key => Some(("key_rejected", false)),
            // It may have run (part of) it.
            500..=599 => Some(("status_5xx", true)),
            _ => None,
        },
    }
}

/// Decide what follows an attempt. Pure: the caller gathers the facts and
/// applies the verdict (and checks the retry budget before a retry).
pub fn decide(f: &Facts) -> Verdict {
    // A pooled connection found dead: the upstream closed it while idle.
    // Retrying on a fresh one is the connection layer's business, not a
    // retry, when the provider cannot have acted (the write failed) or the
    // request is idempotent anyway.
    let stale = match f.outcome {
        Outcome::WriteFailed { reused } => reused,
        Outcome::AfterWrite { reused, timeout } => reused && !timeout && f.idempotent,
        _ => false,
    };
    if stale && !f.reconnected {
        return Verdict::Reconnect;
    }
    let Some((reason, maybe_acted)) = classify(f.outcome) else {
        return Verdict::Stop(None);
    };
    if maybe_acted && !f.idempotent {
        return Verdict::Stop(Some(Refusal::NotIdempotent));
    }
    if f.retries_left > 0 {
        Verdict::Retry { reason }
    } else if f.fallback_left {
        Verdict::Fallback { reason }
    } else {
        Verdict::Stop(Some(Refusal::Exhausted))
    }
}

/// [`decide`], then the retry budget of the upstream the next attempt goes
/// to (a retry that does not fit becomes `Stop(Budget)`), with the metrics:
/// `failovers_total{reason}` for a retry, `retries_refused_total` for a
/// refusal. The request's previous retry ends here, so its place in the
/// budget is handed back first. Both forwarding paths call this.
pub fn judge(
    state: &AppState,
    ctx: &mut RequestCtx,
    facts: &Facts,
    this: &Upstream,
    next: Option<&Upstream>,
) -> Verdict {
    let mut verdict = decide(facts);
    let target = match verdict {
        Verdict::Retry { .. } => Some(this),
        Verdict::Fallback { .. } => next,
        _ => None,
    };
    if let Some(target) = target {
        ctx.upstream.retry_token = None;
        match target.try_retry() {
            Some(token) => ctx.upstream.retry_token = Some(token),
            None => verdict = Verdict::Stop(Some(Refusal::Budget)),
        }
    }
    match verdict {
        Verdict::Retry { reason } | Verdict::Fallback { reason } => {
            state.metrics.failovers.with_label_values(&[reason]).inc();
        }
        Verdict::Stop(Some(refusal)) => {
            tracing::info!(request_id = %ctx.request_id, upstream = %this.name, reason = refusal.label(), outcome = ?facts.outcome, "Retryable failure not retried.");
            state
                .metrics
                .retries_refused
                .with_label_values(&[this.name.as_str(), refusal.label()])
                .inc();
        }
        Verdict::Reconnect | Verdict::Stop(None) => {}
    }
    verdict
}

/// Idempotent by method (RFC 9110 §9.2.2) or by the route's word.
pub fn idempotent(method: &http::Method, route_idempotent: bool) -> bool {
    route_idempotent || method.is_idempotent()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(outcome: Outcome) -> Facts {
        Facts {
            outcome,
            idempotent: false,
            retries_left: 1,
            fallback_left: false,
            reconnected: false,
        }
    }

    fn answer(status: u16, retry_after: bool) -> Outcome {
        Outcome::Answered {
            status,
            retry_after,
            pooled_key: true,
        }
    }

    #[test]
    fn answers_proving_nothing_was_done_are_retried_for_a_post() {
        for (status, ra) in [(429, false), (529, false), (503, true), (401, false), (403, false)] {
            assert!(
                matches!(decide(&facts(answer(status, ra))), Verdict::Retry { .. }),
                "{status}"
            );
        }
    }

    #[test]
    fn answers_that_may_have_been_acted_on_are_not_retried_for_a_post() {
        for status in [500, 502, 503, 504] {
            assert_eq!(
                decide(&facts(answer(status, false))),
                Verdict::Stop(Some(Refusal::NotIdempotent)),
                "{status}"
            );
        }
        let after = Outcome::AfterWrite {
            reused: false,
            timeout: true,
        };
        assert_eq!(decide(&facts(after)), Verdict::Stop(Some(Refusal::NotIdempotent)));
    }

    #[test]
    fn an_idempotent_request_is_retried_on_any_failure() {
        for outcome in [
            answer(500, false),
            answer(502, false),
            Outcome::AfterWrite {
                reused: false,
                timeout: true,
            },
        ] {
            let f = Facts {
                idempotent: true,
                ..facts(outcome)
            };
            assert!(matches!(decide(&f), Verdict::Retry { .. }), "{outcome:?}");
        }
    }

    #[test]
    fn final_answers_stop_without_a_refusal() {
        for status in [200, 201, 204, 400, 404, 422] {
            assert_eq!(decide(&facts(answer(status, false))), Verdict::Stop(None));
        }
        let keyless = Outcome::Answered {
            status: 401,
            retry_after: false,
            pooled_key: false,
        };
        assert_eq!(decide(&facts(keyless)), Verdict::Stop(None), "the client's own key");
    }

    #[test]
    fn every_attempt_spends_connect_refusals_too() {
        let refused = Outcome::NotConnected(NotConnected::Refused);
        assert!(matches!(decide(&facts(refused)), Verdict::Retry { reason: "connect" }));
        let spent = Facts {
            retries_left: 0,
            ..facts(refused)
        };
        assert_eq!(decide(&spent), Verdict::Stop(Some(Refusal::Exhausted)));
        let fallback = Facts {
            fallback_left: true,
            ..spent
        };
        assert_eq!(decide(&fallback), Verdict::Fallback { reason: "connect" });
    }

    #[test]
    fn a_dead_pooled_connection_gets_one_fresh_one_only_when_safe() {
        let write = Outcome::WriteFailed { reused: true };
        let spent = Facts {
            retries_left: 0,
            ..facts(write)
        };
        assert_eq!(decide(&spent), Verdict::Reconnect, "nothing complete was sent");
        let again = Facts {
            reconnected: true,
            ..spent
        };
        assert_eq!(decide(&again), Verdict::Stop(Some(Refusal::Exhausted)), "only once");
        // Closed after the request was written: the POST may be running.
        let read = Outcome::AfterWrite {
            reused: true,
            timeout: false,
        };
        assert_eq!(decide(&facts(read)), Verdict::Stop(Some(Refusal::NotIdempotent)));
        let get = Facts {
            idempotent: true,
            retries_left: 0,
            ..facts(read)
        };
        assert_eq!(decide(&get), Verdict::Reconnect);
    }

    #[test]
    fn idempotency_by_method_or_route() {
        assert!(idempotent(&http::Method::GET, false));
        assert!(idempotent(&http::Method::HEAD, false));
        assert!(idempotent(&http::Method::OPTIONS, false));
        assert!(!idempotent(&http::Method::POST, false));
        assert!(idempotent(&http::Method::POST, true));
    }
}
