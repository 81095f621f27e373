//! Shared rate limits: every check of a request in one `fastgate_admit_v1`
//! call (one round trip, all or nothing), its token reservation settled by
//! `fastgate_settle_v1` once the real usage is known.

use super::{Cluster, ClusterError};
use crate::{
    config::OnRedisDown,
    ratelimit::{Admission, Counted, Limited, QuotaTracker, RateChecks, RateLimiter, Refusal},
};
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    Limit(Refusal),
    /// `fail_closed` while Redis is down.
    Unavailable,
}

/// A finished request's tokens, waiting to be settled in Redis.
#[derive(Debug)]
pub struct Settlement {
    request_id: String,
    checks: RateChecks,
    tokens: u64,
}

/// Most settlements sent in one call.
const SETTLE_BATCH: usize = 128;

/// Extra time a quota counter outlives its period (admin views, late settles).
const QUOTA_COUNTER_SLACK_MS: i64 = 86_400_000;

fn window_keys(scope: &str) -> [String; 3] {
    [
        format!("fg:r:{scope}"),
        format!("fg:t:{scope}"),
        format!("fg:ta:{scope}"),
    ]
}

fn quota_key(scope: &str, period_start: i64) -> String {
    format!("fg:q:{scope}:{period_start}")
}

/// A request's token reservation: its prompt estimated from the body's
/// size (`usage::estimate::prompt_tokens`, also what a request that ends
/// without usage is charged for its prompt), plus the output it allows (`max_tokens`
/// and its OpenAI, Responses and Gemini spellings) or `default`.
pub fn reserve_for(body: Option<&[u8]>, default: u64) -> u64 {
    #[derive(Deserialize)]
    struct Generation {
        #[serde(rename = "maxOutputTokens")]
        max_output_tokens: Option<u64>,
    }
    #[derive(Deserialize)]
    struct Ask {
        max_tokens: Option<u64>,
        max_completion_tokens: Option<u64>,
        max_output_tokens: Option<u64>,
        #[serde(rename = "generationConfig")]
        generation: Option<Generation>,
    }
    let Some(body) = body else {
        return default;
    };
    let output = serde_json::from_slice::<Ask>(body)
        .ok()
        .and_then(|a| {
            a.max_tokens
                .or(a.max_completion_tokens)
                .or(a.max_output_tokens)
                .or(a.generation.and_then(|g| g.max_output_tokens))
        })
        .unwrap_or(default);
    crate::usage::estimate::prompt_tokens(body.len() as u64) + output
}

impl Cluster {
    /// Admit a request against `checks` in Redis; when Redis is down,
    /// decide as `on_redis_down` says (locally, each limit divided among
    /// the nodes, by default).
    pub async fn admit(
        &self,
        request_id: &str,
        checks: &RateChecks,
        reserve: u64,
        limiter: &RateLimiter,
        quotas: &QuotaTracker,
        now_ms: u64,
    ) -> Result<Counted, Denied> {
        match self.admit_shared(request_id, checks, reserve, now_ms).await {
            Ok(Ok(())) => Ok(Counted::Shared),
            Ok(Err(refusal)) => Err(Denied::Limit(refusal)),
            Err(_) => {
                self.decided_locally();
                match self.config.on_redis_down {
                    OnRedisDown::LocalShare => limiter
                        .admit_all(quotas, checks, self.share_nodes(), now_ms)
                        .map(|()| Counted::Local)
                        .map_err(Denied::Limit),
                    OnRedisDown::FailOpen => Ok(Counted::Local),
                    OnRedisDown::FailClosed => Err(Denied::Unavailable),
                }
            }
        }
    }

    async fn admit_shared(
        &self,
        request_id: &str,
        checks: &RateChecks,
        reserve: u64,
        now_ms: u64,
    ) -> Result<Result<(), Refusal>, ClusterError> {
        let mut keys: Vec<String> = Vec::with_capacity(checks.windows.len() * 3 + checks.quotas.len());
        // One (kind, limit, cost) triple per limit; `labels[i]` names limit
        // i+1 (with its quota period's end, for a quota).
        let mut limits: Vec<(&str, u64, u64)> = Vec::new();
        let mut labels: Vec<(Limited, Option<i64>)> = Vec::new();
        for w in &checks.windows {
            let [r, t, ta] = window_keys(&w.scope);
            if let Some(rpm) = w.limits.rpm {
                keys.push(r);
                limits.push(("r", rpm, 1));
                labels.push((w.label, None));
            }
            if let Some(tpm) = w.limits.tpm {
                keys.push(t);
                keys.push(ta);
                limits.push(("t", tpm, reserve));
                labels.push((w.label, None));
            }
        }
        for q in &checks.quotas {
            keys.push(quota_key(&q.scope, q.period.0));
            limits.push(("q", q.tokens, 0));
            labels.push((q.label, Some(q.period.1)));
        }
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("fastgate_admit_v1")
            .arg(keys.len())
            .arg(&keys)
            .arg(request_id)
            .arg(self.config.rate_window.0.as_millis() as u64)
            .arg(limits.len());
        for (kind, limit, cost) in &limits {
            cmd.arg(*kind).arg(*limit).arg(*cost);
        }
        let answer: Vec<i64> = self.call(&cmd).await?;
        Ok(match answer.as_slice() {
            [1, index, wait_ms, ..] => {
                let i = (*index as usize).saturating_sub(1);
                let (label, quota_end) = labels.get(i).copied().unwrap_or((Limited::Key, None));
                let retry_after = match quota_end {
                    Some(end) => ((end - now_ms as i64).max(0) as u64).div_ceil(1000),
                    None => (*wait_ms).max(0) as u64 / 1000 + 1,
                };
                Err(Refusal {
                    label,
                    retry_after: retry_after.max(1),
                })
            }
            _ => Ok(()),
        })
    }

    /// Charge a finished request's `tokens` the way it was counted
    /// (settling its reservation in Redis, in the background: the response
    /// is already on its way).
    pub fn settle(
        self: &Arc<Self>,
        request_id: &str,
        admission: Admission,
        tokens: u64,
        (limiter, quotas): (&RateLimiter, &QuotaTracker),
        now_ms: u64,
    ) {
        let checks = admission.checks;
        if admission.counted == Counted::Local {
            limiter.charge_all(quotas, &checks, tokens, now_ms);
            self.owe(&checks, tokens);
            return;
        }
        // This node's own usage: the base of its share while Redis is down.
        for q in &checks.quotas {
            quotas.add(&q.scope, q.period.0, tokens);
        }
        if !checks.counts_tokens() && (checks.quotas.is_empty() || tokens == 0) {
            return;
        }
        let _ = self.settlements.0.send(Settlement {
            request_id: request_id.to_string(),
            checks,
            tokens,
        });
    }

    /// Send queued settlements, up to [`SETTLE_BATCH`] per call; those
    /// Redis does not take are owed.
    pub(super) async fn flush_settlements(self: Arc<Self>) {
        let Some(mut queue) = self.settlements.1.lock().take() else {
            return;
        };
        let mut batch = Vec::with_capacity(SETTLE_BATCH);
        while queue.recv_many(&mut batch, SETTLE_BATCH).await > 0 {
            if self.settle_shared(&batch).await.is_err() {
                for s in &batch {
                    self.owe(&s.checks, s.tokens);
                }
            }
            batch.clear();
        }
    }

    async fn settle_shared(&self, batch: &[Settlement]) -> Result<(), ClusterError> {
        let mut keys = Vec::new();
        let mut args: Vec<String> = vec![batch.len().to_string()];
        for s in batch {
            let limits = s.checks.windows.iter().filter(|w| w.limits.tpm.is_some()).count() + s.checks.quotas.len();
            args.push(s.request_id.clone());
            args.push(limits.to_string());
            for w in s.checks.windows.iter().filter(|w| w.limits.tpm.is_some()) {
                let [_, t, ta] = window_keys(&w.scope);
                keys.push(t);
                keys.push(ta);
                args.extend(["t".to_string(), s.tokens.to_string(), "0".to_string()]);
            }
            for q in &s.checks.quotas {
                keys.push(quota_key(&q.scope, q.period.0));
                let expiry = q.period.1 + QUOTA_COUNTER_SLACK_MS;
                args.extend(["q".to_string(), s.tokens.to_string(), expiry.to_string()]);
            }
        }
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("fastgate_settle_v1").arg(keys.len()).arg(&keys).arg(&args);
        self.call::<i64>(&cmd).await.map(|_| ())
    }

    /// Remember quota tokens Redis has not seen.
    fn owe(&self, checks: &RateChecks, tokens: u64) {
        if tokens == 0 || checks.quotas.is_empty() {
            return;
        }
        let mut owed = self.owed.lock();
        for q in &checks.quotas {
            let e = owed
                .entry(quota_key(&q.scope, q.period.0))
                .or_insert((0, q.period.1 + QUOTA_COUNTER_SLACK_MS));
            e.0 += tokens;
        }
    }

    /// Add the quota tokens used while Redis was down (reconciliation).
    pub(super) async fn settle_owed(&self) {
        let owed: Vec<(String, (u64, i64))> = self.owed.lock().drain().collect();
        if owed.is_empty() {
            return;
        }
        let mut failed = Vec::new();
        for (counter, (tokens, expiry)) in owed {
            let mut cmd = redis::cmd("FCALL");
            cmd.arg("fastgate_settle_v1")
                .arg(1)
                .arg(&counter)
                .arg(1)
                .arg("reconcile")
                .arg(1)
                .arg("q")
                .arg(tokens)
                .arg(expiry);
            if self.call::<i64>(&cmd).await.is_err() {
                failed.push((counter, (tokens, expiry)));
            }
        }
        let n = failed.len();
        self.owed.lock().extend(failed);
        tracing::info!(
            unsettled = n,
            "Quota tokens used while Redis was down added to the shared counters."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::reserve_for;

    #[test]
    fn reservations_read_every_providers_output_limit() {
        let openai = br#"{"model":"m","max_tokens":100,"messages":[]}"#;
        assert_eq!(reserve_for(Some(openai), 7), openai.len() as u64 / 4 + 100);
        let newer = br#"{"max_completion_tokens":50}"#;
        assert_eq!(reserve_for(Some(newer), 7), newer.len() as u64 / 4 + 50);
        let responses = br#"{"max_output_tokens":60}"#;
        assert_eq!(reserve_for(Some(responses), 7), responses.len() as u64 / 4 + 60);
        let gemini = br#"{"generationConfig":{"maxOutputTokens":70}}"#;
        assert_eq!(reserve_for(Some(gemini), 7), gemini.len() as u64 / 4 + 70);
        assert_eq!(reserve_for(Some(b"{}"), 7), 7);
        assert_eq!(reserve_for(None, 7), 7);
        assert_eq!(reserve_for(Some(b"not json"), 7), 2 + 7);
    }
}
