//! Shared rate limits: every check of a request in one `fastgate_admit_v3`
//! call (one round trip, all or nothing) under an op id this node mints,
//! its token and budget reservations settled by `fastgate_settle_v3` once
//! the real usage and cost are known. Settlements go in numbered batches, one at a time: a
//! batch whose answer was lost is sent again with its number, and Redis
//! applies each number once, so nothing is charged twice and nothing is
//! dropped while Redis is briefly unreachable.

use super::{Cluster, ClusterError, PREFIX, RETRY_EVERY};
use crate::{
    budget::BudgetTracker,
    config::OnRedisDown,
    ratelimit::{Admission, Counted, Limited, QuotaTracker, RateChecks, RateLimiter, Refusal, Ticket},
};
use std::sync::{Arc, atomic::Ordering};
use std::time::Duration;
use tokio::sync::mpsc::error::TryRecvError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    Limit(Refusal),
    /// `fail_closed` while Redis is down.
    Unavailable,
}

/// A finished request's tokens and cost, waiting to be settled in Redis.
#[derive(Debug)]
pub struct Settlement {
    checks: RateChecks,
    tokens: u64,
    /// Micro-units.
    cost: u64,
    ticket: Ticket,
}

/// Most settlements sent in one call.
const SETTLE_BATCH: usize = 128;
/// How long a batch waits for more settlements once the first arrives.
/// Under load this turns one Redis call per request into one per few
/// milliseconds; the answers are already sent, and a reservation kept a
/// few milliseconds longer only errs on the side of the limit.
const SETTLE_LINGER: Duration = Duration::from_millis(5);
/// Most settlements waiting for a batch; past it (a long outage with
/// requests admitted before it still finishing), quota tokens are owed
/// (aggregated per counter) and token reservations stay as reserved.
const MAX_QUEUED: usize = 50_000;
/// Attempts at a batch Redis refuses outright (not a lost answer).
const REFUSED_ATTEMPTS: u32 = 3;
/// The largest count sent to Redis's Lua: it writes numbers with 14
/// significant digits, so 10^14 and above reach `HINCRBY` as "1e+14", which
/// Redis refuses (the call fails half done). A limit this high is no limit
/// in practice; larger limits and amounts are sent as this.
const LUA_EXACT_MAX: u64 = 10_000_000_000_000;

/// Extra time a quota counter outlives its period (admin views, late settles).
const QUOTA_COUNTER_SLACK_MS: i64 = 86_400_000;

fn request_key(scope: &str) -> String {
    format!("{PREFIX}r:{scope}")
}

fn token_key(scope: &str) -> String {
    format!("{PREFIX}t:{scope}")
}

fn quota_key(scope: &str, period_start: i64) -> String {
    format!("{PREFIX}q:{scope}:{period_start}")
}

fn budget_key(scope: &str, period_start: i64) -> String {
    format!("{PREFIX}b:{scope}:{period_start}")
}

/// When a budget counter may go: a day after its period, or a `total`
/// budget's a year after its last settlement (renewed by each).
fn budget_expiry(period: (i64, i64), now_ms: i64) -> i64 {
    match period.1 {
        i64::MAX => now_ms + 366 * 86_400_000,
        end => end + QUOTA_COUNTER_SLACK_MS,
    }
}

/// A numbered batch in flight (replayed with its number until confirmed).
struct Batch {
    seq: u64,
    settlements: Vec<Settlement>,
    /// Quota tokens of requests decided locally: (counter, tokens, expiry).
    owed: Vec<(String, u64, i64)>,
    refused: u32,
}

/// A request's token reservation: its prompt estimated from the body's
/// size (`usage::estimate::prompt_tokens`, also what a request that ends
/// without usage is charged for its prompt), plus the output it allows (`max_tokens`
/// and its OpenAI, Responses and Gemini spellings) or `default`.
pub fn reserve_for(asked: &Asked, default: u64) -> u64 {
    // A client's `max_tokens` may be anything up to u64::MAX (`tpm` and the
    // quotas cut the reservation to their size).
    asked.prompt.saturating_add(asked.output_or(default))
}

/// What a request body asks for, as reservations read it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Asked {
    /// The prompt's tokens, estimated from the body's size.
    pub prompt: u64,
    /// The output it allows for all its answers (`max_tokens` or a
    /// spelling of it, the largest it names, times `n` or
    /// `candidateCount`), if it says.
    pub output: Option<u64>,
    /// How many answers it asks for (`n`, `candidateCount`; at least 1):
    /// what a default output is multiplied by.
    pub choices: u64,
    /// The model it names in the body (Gemini's is in the path).
    pub model: Option<String>,
    /// A body that looks like a JSON object (after whitespace or a BOM) but
    /// that FastGate could not read (too deep, malformed): an upstream may
    /// still read it, so budgets reserve their most. Other bodies
    /// (multipart, binary) name no priced model and reserve nothing.
    pub unreadable: bool,
}

impl Asked {
    /// The output to reserve for: what the body allows, or `default` for
    /// each answer it asks for.
    pub fn output_or(&self, default: u64) -> u64 {
        self.output.unwrap_or_else(|| default.saturating_mul(self.choices))
    }
}

/// Read `body` for [`Asked`] as an upstream would: a repeated key's last
/// value wins, a number in any spelling counts (`10.0`, `1e20`, saturated
/// to `u64`; negative is 0), a value of another type says nothing; where
/// several spellings of the output bound are given (`max_tokens` and
/// `max_completion_tokens`, Gemini's camel and snake case), the largest
/// counts, since providers differ on which wins. Other fields are skipped
/// without being built.
pub fn asked(body: Option<&[u8]>) -> Asked {
    let Some(body) = body else {
        return Asked {
            choices: 1,
            ..Asked::default()
        };
    };
    let prompt = crate::usage::estimate::prompt_tokens(body.len() as u64);
    match serde_json::from_slice::<ask::Ask>(body) {
        Ok(a) => {
            let choices = a.choices().max(1);
            Asked {
                prompt,
                output: a.output().map(|o| o.saturating_mul(choices)),
                choices,
                model: a.model,
                unreadable: false,
            }
        }
        Err(_) => {
            let text = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
            Asked {
                prompt,
                choices: 1,
                unreadable: text.trim_ascii_start().starts_with(b"{"),
                ..Asked::default()
            }
        }
    }
}

/// The lenient reader behind [`asked`].
mod ask {
    use serde::Deserialize;
    use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
    use std::fmt;

    #[derive(Default)]
    pub struct Ask {
        pub model: Option<String>,
        /// `max_tokens`, `max_completion_tokens`, `max_output_tokens`,
        /// `maxOutputTokens`: each the last given.
        outputs: [Option<u64>; 4],
        /// `n`, `candidateCount`, `candidate_count`.
        choices: [Option<u64>; 3],
        /// `generationConfig`, `generation_config`.
        nested: [Option<Box<Ask>>; 2],
    }

    impl Ask {
        pub fn output(&self) -> Option<u64> {
            let nested = self.nested.iter().flatten().filter_map(|n| n.output());
            self.outputs.iter().flatten().copied().chain(nested).max()
        }

        pub fn choices(&self) -> u64 {
            let nested = self.nested.iter().flatten().map(|n| n.choices());
            self.choices.iter().flatten().copied().chain(nested).max().unwrap_or(1)
        }
    }

    enum Field {
        Model,
        Output(usize),
        Choices(usize),
        Nested(usize),
        Other,
    }

    impl<'de> Deserialize<'de> for Field {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = Field;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a key")
                }
                fn visit_str<E: de::Error>(self, s: &str) -> Result<Field, E> {
                    Ok(match s {
                        "model" => Field::Model,
                        "max_tokens" => Field::Output(0),
                        "max_completion_tokens" => Field::Output(1),
                        "max_output_tokens" => Field::Output(2),
                        "maxOutputTokens" => Field::Output(3),
                        "n" => Field::Choices(0),
                        "candidateCount" => Field::Choices(1),
                        "candidate_count" => Field::Choices(2),
                        "generationConfig" => Field::Nested(0),
                        "generation_config" => Field::Nested(1),
                        _ => Field::Other,
                    })
                }
            }
            d.deserialize_str(V)
        }
    }

    /// A value read for a count or a name; anything else is skipped.
    enum Scalar {
        Count(u64),
        Text(String),
        Other,
    }

    impl Scalar {
        fn count(self) -> Option<u64> {
            match self {
                Scalar::Count(n) => Some(n),
                _ => None,
            }
        }
        fn text(self) -> Option<String> {
            match self {
                Scalar::Text(t) => Some(t),
                _ => None,
            }
        }
    }

    impl<'de> Deserialize<'de> for Scalar {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Scalar;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("any JSON value")
                }
                fn visit_u64<E>(self, n: u64) -> Result<Scalar, E> {
                    Ok(Scalar::Count(n))
                }
                fn visit_i64<E>(self, n: i64) -> Result<Scalar, E> {
                    Ok(Scalar::Count(n.max(0) as u64))
                }
                fn visit_f64<E>(self, n: f64) -> Result<Scalar, E> {
                    // `as` saturates, and NaN (not JSON anyway) is 0.
                    Ok(Scalar::Count(n as u64))
                }
                fn visit_str<E>(self, s: &str) -> Result<Scalar, E> {
                    Ok(Scalar::Text(s.to_owned()))
                }
                fn visit_bool<E>(self, _: bool) -> Result<Scalar, E> {
                    Ok(Scalar::Other)
                }
                fn visit_unit<E>(self) -> Result<Scalar, E> {
                    Ok(Scalar::Other)
                }
                fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<Scalar, A::Error> {
                    while a.next_element::<IgnoredAny>()?.is_some() {}
                    Ok(Scalar::Other)
                }
                fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Scalar, A::Error> {
                    while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                    Ok(Scalar::Other)
                }
            }
            d.deserialize_any(V)
        }
    }

    /// An object's fields; the generation config nests and is read with
    /// the same visitor (a value of another type says nothing).
    struct Object;

    impl<'de> Visitor<'de> for Object {
        type Value = Option<Ask>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Ask>, A::Error> {
            let mut ask = Ask::default();
            while let Some(field) = map.next_key::<Field>()? {
                match field {
                    Field::Model => ask.model = map.next_value::<Scalar>()?.text(),
                    Field::Output(i) => ask.outputs[i] = map.next_value::<Scalar>()?.count(),
                    Field::Choices(i) => ask.choices[i] = map.next_value::<Scalar>()?.count(),
                    Field::Nested(i) => ask.nested[i] = map.next_value::<Nested>()?.0.map(Box::new),
                    Field::Other => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(Some(ask))
        }
        fn visit_u64<E>(self, _: u64) -> Result<Option<Ask>, E> {
            Ok(None)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Option<Ask>, E> {
            Ok(None)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Option<Ask>, E> {
            Ok(None)
        }
        fn visit_str<E>(self, _: &str) -> Result<Option<Ask>, E> {
            Ok(None)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Option<Ask>, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Option<Ask>, E> {
            Ok(None)
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<Option<Ask>, A::Error> {
            while a.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }

    struct Nested(Option<Ask>);

    impl<'de> Deserialize<'de> for Nested {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(Object).map(Nested)
        }
    }

    impl<'de> Deserialize<'de> for Ask {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(Object)?
                .ok_or_else(|| de::Error::custom("not an object"))
        }
    }
}

/// One adjustment of the settlement call: kind, counter key, where (the
/// token bucket, or the counter's expiry), tokens (or cost) used, reserved.
type Adjustment = (&'static str, String, i64, u64, u64);

/// A batch's settlements summed per counter: per token bucket (its key and
/// the bucket each admission answered) the tokens used and reserved, per
/// quota counter the tokens and its latest expiry. Redis then does one
/// adjustment per counter, not one per request (a busy key's batch of 128
/// touches one or two buckets).
fn aggregate(settlements: &[Settlement]) -> Vec<Adjustment> {
    use std::collections::BTreeMap;
    let mut buckets: BTreeMap<(String, i64), (u64, u64)> = BTreeMap::new();
    let mut quotas: BTreeMap<String, (u64, i64)> = BTreeMap::new();
    let mut budgets: BTreeMap<String, (u64, u64, i64)> = BTreeMap::new();
    let now = crate::clock::now_ms();
    for s in settlements {
        for b in &s.checks.budgets {
            let sum = budgets
                .entry(budget_key(&b.scope, b.period.0))
                .or_insert((0, 0, budget_expiry(b.period, now)));
            sum.0 = sum.0.saturating_add(s.cost);
            sum.1 = sum
                .1
                .saturating_add(b.reserve(s.checks.cost_reserve).min(LUA_EXACT_MAX));
        }
        for w in &s.checks.windows {
            if let Some(tpm) = w.limits.tpm {
                let sum = buckets.entry((token_key(&w.scope), s.ticket.bucket)).or_default();
                sum.0 = sum.0.saturating_add(s.tokens);
                sum.1 = sum.1.saturating_add(s.ticket.reserve.min(tpm.min(LUA_EXACT_MAX)));
            }
        }
        for q in &s.checks.quotas {
            let expiry = q.period.1 + QUOTA_COUNTER_SLACK_MS;
            let sum = quotas.entry(quota_key(&q.scope, q.period.0)).or_insert((0, expiry));
            sum.0 = sum.0.saturating_add(s.tokens);
            sum.1 = sum.1.max(expiry);
        }
    }
    let buckets = buckets
        .into_iter()
        .map(|((key, bucket), (tokens, reserved))| ("t", key, bucket, tokens, reserved));
    let quotas = quotas
        .into_iter()
        .map(|(key, (tokens, expiry))| ("q", key, expiry, tokens, 0));
    let budgets = budgets
        .into_iter()
        .map(|(key, (cost, reserved, expiry))| ("b", key, expiry, cost, reserved));
    buckets.chain(quotas).chain(budgets).collect()
}

impl Cluster {
    /// Admit a request against `checks` in Redis; when Redis is down,
    /// decide as `on_redis_down` says (locally, each limit divided among
    /// the nodes, by default). `request_id` is for logs only.
    pub async fn admit(
        &self,
        request_id: &str,
        checks: &RateChecks,
        reserve: u64,
        limiter: &RateLimiter,
        trackers: (&QuotaTracker, &BudgetTracker),
        now_ms: u64,
    ) -> Result<Counted, Denied> {
        match self.admit_shared(checks, reserve, now_ms).await {
            Ok(Ok(ticket)) => Ok(Counted::Shared(ticket)),
            Ok(Err(refusal)) => Err(Denied::Limit(refusal)),
            Err(e) => {
                tracing::debug!(error = %e, request_id, "Admission decided locally.");
                self.decided_locally();
                match self.config.on_redis_down {
                    OnRedisDown::LocalShare => limiter
                        .admit_all(trackers, checks, self.share_nodes(), now_ms)
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
        checks: &RateChecks,
        reserve: u64,
        now_ms: u64,
    ) -> Result<Result<Ticket, Refusal>, ClusterError> {
        let op = self.next_op();
        let mut keys: Vec<String> =
            Vec::with_capacity(1 + checks.windows.len() * 2 + checks.quotas.len() + checks.budgets.len());
        keys.push(format!("{PREFIX}op:{op}"));
        // One (kind, limit, cost) triple per limit; `labels[i]` names limit
        // i+1 (with its quota period's end, for a quota).
        let mut limits: Vec<(&str, u64, u64)> = Vec::new();
        let mut labels: Vec<(Limited, Option<i64>)> = Vec::new();
        for w in &checks.windows {
            if let Some(rpm) = w.limits.rpm {
                keys.push(request_key(&w.scope));
                limits.push(("r", rpm.min(LUA_EXACT_MAX), 1));
                labels.push((w.label, None));
            }
            if let Some(tpm) = w.limits.tpm {
                keys.push(token_key(&w.scope));
                let tpm = tpm.min(LUA_EXACT_MAX);
                limits.push(("t", tpm, reserve.min(tpm)));
                labels.push((w.label, None));
            }
        }
        for q in &checks.quotas {
            keys.push(quota_key(&q.scope, q.period.0));
            limits.push(("q", q.tokens.min(LUA_EXACT_MAX), 0));
            labels.push((q.label, Some(q.period.1)));
        }
        for b in &checks.budgets {
            keys.push(budget_key(&b.scope, b.period.0));
            let limit = b.limit.min(LUA_EXACT_MAX);
            limits.push(("b", limit, b.reserve(checks.cost_reserve).min(limit)));
            labels.push((Limited::of_budget(b), Some(b.period.1)));
        }
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("fastgate_admit_v3")
            .arg(keys.len())
            .arg(&keys)
            .arg(&op)
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
                    Some(end) => (end.saturating_sub(now_ms as i64).max(0) as u64)
                        .div_ceil(1000)
                        .min(crate::budget::MAX_RETRY_AFTER),
                    // A bucket outlives the window by up to one bucket
                    // width; a retry is never told to wait past the window.
                    None => ((*wait_ms).max(0) as u64 / 1000 + 1)
                        .min(self.config.rate_window.0.as_millis().div_ceil(1000) as u64),
                };
                Err(Refusal {
                    label,
                    retry_after: retry_after.max(1),
                })
            }
            [0, bucket, ..] => Ok(Ticket {
                bucket: *bucket,
                reserve,
            }),
            _ => Ok(Ticket { bucket: -1, reserve }),
        })
    }

    /// Charge a finished request's `tokens` and `cost` (micro-units) the
    /// way it was counted (settling its reservations in Redis, in the
    /// background: the response is already on its way). `request_id` is
    /// for logs only.
    pub fn settle(
        self: &Arc<Self>,
        request_id: &str,
        admission: Admission,
        (tokens, cost): (u64, u64),
        (limiter, quotas, budgets): (&RateLimiter, &QuotaTracker, &BudgetTracker),
        now_ms: u64,
    ) {
        let checks = admission.checks;
        let ticket = match admission.counted {
            Counted::Local => {
                limiter.charge_all(quotas, &checks, tokens, now_ms);
                budgets.settle_all(&checks.budgets, checks.cost_reserve, cost, Some(&self.alerts));
                self.owe(&checks, tokens, cost);
                return;
            }
            Counted::Shared(ticket) => ticket,
        };
        // This node's own usage: the base of its share while Redis is down.
        for q in &checks.quotas {
            quotas.add(&q.scope, q.period.0, tokens);
        }
        budgets.settle_all(&checks.budgets, 0, cost, None);
        if !checks.counts_tokens() && checks.budgets.is_empty() && (checks.quotas.is_empty() || tokens == 0) {
            return;
        }
        if self.queued.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUED {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(request_id, "Settlement queue full; quota tokens and costs owed.");
            self.owe(&checks, tokens, cost);
            return;
        }
        let _ = self.settlements.0.send(Settlement {
            checks,
            tokens,
            cost,
            ticket,
        });
    }

    /// Whether settlements, or quota tokens owed from an outage, have yet
    /// to reach Redis: a stopping node gives them a moment
    /// ([`crate::server`]'s drain), or they are lost with the process.
    pub fn settling(&self) -> bool {
        self.queued.load(Ordering::Relaxed) > 0
            || self.unconfirmed.load(Ordering::Relaxed)
            || !self.owed.lock().is_empty()
    }

    /// Send queued settlements (and owed quota tokens) in numbered
    /// batches, one at a time, up to [`SETTLE_BATCH`] per call. A batch
    /// Redis did not confirm is sent again, with its number, once Redis
    /// answers: applied exactly once whether or not the lost call ran.
    pub(super) async fn flush_settlements(self: Arc<Self>) {
        let Some(mut queue) = self.settlements.1.lock().take() else {
            return;
        };
        let mut seq: u64 = 0;
        let mut pending: Option<Batch> = None;
        let mut tick = tokio::time::interval(RETRY_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut taken = Vec::with_capacity(SETTLE_BATCH);
        let mut open = true;
        loop {
            let batch = match pending.take() {
                Some(b) => b,
                None => {
                    if taken.is_empty() && open {
                        tokio::select! {
                            n = queue.recv_many(&mut taken, SETTLE_BATCH) => open = n > 0,
                            _ = tick.tick() => {}
                        }
                        if open && !taken.is_empty() && taken.len() < SETTLE_BATCH {
                            tokio::time::sleep(SETTLE_LINGER).await;
                            while taken.len() < SETTLE_BATCH {
                                match queue.try_recv() {
                                    Ok(s) => taken.push(s),
                                    Err(TryRecvError::Empty) => break,
                                    Err(TryRecvError::Disconnected) => {
                                        open = false;
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    let owed = if self.is_up() { self.take_owed() } else { Vec::new() };
                    if taken.is_empty() && owed.is_empty() {
                        if !open {
                            return;
                        }
                        continue;
                    }
                    self.unconfirmed.store(true, Ordering::Relaxed);
                    self.queued.fetch_sub(taken.len(), Ordering::Relaxed);
                    seq += 1;
                    Batch {
                        seq,
                        settlements: std::mem::take(&mut taken),
                        owed,
                        refused: 0,
                    }
                }
            };
            if !self.is_up() {
                pending = Some(batch);
                tick.tick().await;
                continue;
            }
            match self.settle_shared(&batch).await {
                Ok(()) => self.unconfirmed.store(false, Ordering::Relaxed),
                Err(e) if e.is_transport() => {
                    tracing::debug!(error = %e, seq = batch.seq, "Settlement batch unconfirmed; sent again once Redis answers.");
                    pending = Some(batch);
                }
                Err(e) if batch.refused + 1 < REFUSED_ATTEMPTS => {
                    tracing::warn!(error = %e, seq = batch.seq, "Redis refused a settlement batch; trying again.");
                    pending = Some(Batch {
                        refused: batch.refused + 1,
                        ..batch
                    });
                    tick.tick().await;
                }
                Err(e) => {
                    self.unconfirmed.store(false, Ordering::Relaxed);
                    tracing::error!(error = %e, settlements = batch.settlements.len(), "Redis refused a settlement batch again; dropped.");
                }
            }
        }
    }

    async fn settle_shared(&self, batch: &Batch) -> Result<(), ClusterError> {
        let mut keys = vec![format!("{PREFIX}seq:{}:{}", self.node_id, self.boot)];
        let settled = aggregate(&batch.settlements);
        let requests = settled.len() + batch.owed.len();
        let mut args: Vec<String> = vec![
            batch.seq.to_string(),
            self.config.rate_window.0.as_millis().to_string(),
            requests.to_string(),
        ];
        // Each budget counter's change, in the order Redis answers its value.
        let mut budget_changes: Vec<(String, i128)> = Vec::new();
        for (kind, key, at, tokens, reserved) in settled {
            if kind == "b" {
                budget_changes.push((key.clone(), i128::from(tokens) - i128::from(reserved)));
            }
            keys.push(key);
            args.extend([
                "1".to_string(),
                kind.to_string(),
                tokens.min(LUA_EXACT_MAX).to_string(),
                reserved.min(LUA_EXACT_MAX).to_string(),
                at.to_string(),
            ]);
        }
        for (counter, tokens, expiry) in &batch.owed {
            keys.push(counter.clone());
            args.extend([
                "1".to_string(),
                "q".to_string(),
                (*tokens).min(LUA_EXACT_MAX).to_string(),
                "0".into(),
                expiry.to_string(),
            ]);
        }
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("fastgate_settle_v3").arg(keys.len()).arg(&keys).arg(&args);
        let answer = self.call::<Vec<i64>>(&cmd).await?;
        let applied = answer.first() == Some(&1);
        if !batch.owed.is_empty() {
            tracing::info!(
                counters = batch.owed.len(),
                replayed = !applied,
                "Quota tokens and costs used while Redis was down added to the shared counters."
            );
        }
        if applied {
            self.alert_crossings(batch, &budget_changes, &answer[1..]);
        }
        Ok(())
    }

    /// Budget thresholds a settled batch crossed, told once across the
    /// cluster: by the node whose batch moved the shared counter across.
    /// The counter holds the spend plus the reservations in flight.
    fn alert_crossings(&self, batch: &Batch, changes: &[(String, i128)], values: &[i64]) {
        for ((key, change), &after) in changes.iter().zip(values) {
            if *change <= 0 {
                continue;
            }
            let check = batch
                .settlements
                .iter()
                .flat_map(|s| &s.checks.budgets)
                .find(|b| budget_key(&b.scope, b.period.0) == *key);
            if let Some(check) = check {
                let after = after.max(0) as u64;
                let before = after.saturating_sub((*change).min(i128::from(u64::MAX)) as u64);
                self.alerts.check(check, before, after);
            }
        }
    }

    /// Remember quota tokens and costs Redis has not seen.
    fn owe(&self, checks: &RateChecks, tokens: u64, cost: u64) {
        let now = crate::clock::now_ms();
        let mut owed = self.owed.lock();
        if tokens > 0 {
            for q in &checks.quotas {
                let e = owed
                    .entry(quota_key(&q.scope, q.period.0))
                    .or_insert((0, q.period.1 + QUOTA_COUNTER_SLACK_MS));
                e.0 += tokens;
            }
        }
        if cost > 0 {
            for b in &checks.budgets {
                let e = owed
                    .entry(budget_key(&b.scope, b.period.0))
                    .or_insert((0, budget_expiry(b.period, now)));
                e.0 += cost;
            }
        }
    }

    /// The owed quota tokens, for the next batch (reconciliation).
    fn take_owed(&self) -> Vec<(String, u64, i64)> {
        let mut owed = self.owed.lock();
        if owed.is_empty() {
            return Vec::new();
        }
        owed.drain()
            .map(|(counter, (tokens, expiry))| (counter, tokens, expiry))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{Settlement, aggregate, asked, reserve_for};

    /// Read as an upstream reads it: the last of repeated keys, numbers in
    /// any spelling; what only looks like a JSON object is unreadable.
    #[test]
    fn a_body_is_read_for_its_model_and_output_as_an_upstream_would() {
        let read = |b: &str| {
            let a = asked(Some(b.as_bytes()));
            (a.model, a.output, a.unreadable)
        };
        let m = || Some("gpt-4o".to_string());
        assert_eq!(read(r#"{"model":"gpt-4o","max_tokens":10}"#), (m(), Some(10), false));
        assert_eq!(
            read(r#"{"max_tokens":1,"model":"x","max_tokens":10,"model":"gpt-4o"}"#),
            (m(), Some(10), false)
        );
        assert_eq!(read(r#"{"model":"gpt-4o","max_tokens":10.0}"#), (m(), Some(10), false));
        assert_eq!(
            read(r#"{"model":"gpt-4o","max_tokens":1e20}"#),
            (m(), Some(u64::MAX), false)
        );
        assert_eq!(read(r#"{"model":"gpt-4o","max_tokens":-5}"#), (m(), Some(0), false));
        assert_eq!(read(r#"{"model":"gpt-4o","max_tokens":"10"}"#), (m(), None, false));
        assert_eq!(
            read(r#"{"m\u006fdel":"gpt-4o","max_completion_tokens":7}"#),
            (m(), Some(7), false)
        );
        assert_eq!(
            read(r#"{"model":["gpt-4o"],"messages":[{"a":[1,{"b":null}]}]}"#),
            (None, None, false)
        );
        assert_eq!(
            read(r#"{"generationConfig":{"temperature":1,"maxOutputTokens":64},"contents":[]}"#),
            (None, Some(64), false)
        );
        assert_eq!(read(r#"{"generationConfig":5}"#), (None, None, false));
        // Every answer asked for, and the largest of several spellings.
        assert_eq!(
            read(r#"{"model":"gpt-4o","max_tokens":10,"n":128}"#),
            (m(), Some(1280), false)
        );
        assert_eq!(
            read(r#"{"max_tokens":1,"max_completion_tokens":1000}"#),
            (None, Some(1000), false)
        );
        assert_eq!(
            read(
                r#"{"generationConfig":{"maxOutputTokens":1,"candidateCount":8},"generation_config":{"max_output_tokens":600}}"#
            ),
            (None, Some(4800), false)
        );
        let many = asked(Some(br#"{"model":"gpt-4o","n":3}"#));
        assert_eq!((many.output, many.output_or(100)), (None, 300));
        assert_eq!(asked(None).output_or(100), 100);
        // Skipped fields are skipped at any depth.
        let deep = format!(r#"{{"model":"gpt-4o","x":{}{}}}"#, "[".repeat(5000), "]".repeat(5000));
        assert_eq!(read(&deep), (m(), None, false));
        // Cut off, or not JSON at all.
        assert!(read("\u{feff} {\"model\":\"gpt-4o\",").2);
        assert!(!read("--boundary\r\nContent-Disposition: form-data").2);
        assert!(!read("").2);
    }
    use crate::budget::{BudgetCheck, BudgetOf, BudgetPeriod};
    use crate::ratelimit::Ticket;
    use crate::ratelimit::{Limited, Limits, QuotaCheck, RateChecks, WindowCheck};

    #[test]
    fn a_batch_settles_once_per_counter_not_once_per_request() {
        let settle = |tokens: u64, bucket: i64, reserve: u64, period_end: i64| Settlement {
            checks: RateChecks {
                windows: vec![WindowCheck {
                    scope: "k1".into(),
                    limits: Limits {
                        rpm: Some(10),
                        tpm: Some(100),
                    },
                    label: Limited::Key,
                }],
                quotas: vec![QuotaCheck {
                    scope: "k1".into(),
                    tokens: 1000,
                    period: (0, period_end),
                    label: Limited::Key,
                }],
                budgets: vec![BudgetCheck {
                    scope: "k1".into(),
                    of: BudgetOf::Key,
                    kind: BudgetPeriod::Day,
                    limit: 1_000,
                    period: (0, 86_400_000),
                }],
                // Cut to the budget's 1,000 in each settlement.
                cost_reserve: 4_000,
            },
            tokens,
            cost: tokens * 3,
            ticket: Ticket { bucket, reserve },
        };
        // Three requests in bucket 7 (one reserved more than tpm: cut to
        // 100), one in bucket 8; one quota counter.
        let batch = [
            settle(10, 7, 50, 5),
            settle(20, 7, 500, 9),
            settle(5, 7, 5, 5),
            settle(1, 8, 2, 5),
        ];
        let adj = aggregate(&batch);
        let t: Vec<_> = adj.iter().filter(|a| a.0 == "t").collect();
        assert_eq!(t.len(), 2, "{adj:?}");
        assert_eq!((t[0].2, t[0].3, t[0].4), (7, 35, 155));
        assert_eq!((t[1].2, t[1].3, t[1].4), (8, 1, 2));
        let q: Vec<_> = adj.iter().filter(|a| a.0 == "q").collect();
        assert_eq!(q.len(), 1, "{adj:?}");
        assert_eq!((q[0].3, q[0].4), (36, 0));
        assert_eq!(q[0].2, 9 + super::QUOTA_COUNTER_SLACK_MS, "the latest expiry");
        let b: Vec<_> = adj.iter().filter(|a| a.0 == "b").collect();
        assert_eq!(b.len(), 1, "one budget counter: {adj:?}");
        assert_eq!(
            (b[0].3, b[0].4),
            (36 * 3, 4 * 1_000),
            "costs summed, reservations cut to the budget"
        );
        assert_eq!(b[0].2, 86_400_000 + super::QUOTA_COUNTER_SLACK_MS);
    }

    #[test]
    fn reservations_read_every_providers_output_limit() {
        let openai = br#"{"model":"m","max_tokens":100,"messages":[]}"#;
        assert_eq!(reserve_for(&asked(Some(openai)), 7), openai.len() as u64 / 4 + 100);
        let newer = br#"{"max_completion_tokens":50}"#;
        assert_eq!(reserve_for(&asked(Some(newer)), 7), newer.len() as u64 / 4 + 50);
        let responses = br#"{"max_output_tokens":60}"#;
        assert_eq!(reserve_for(&asked(Some(responses)), 7), responses.len() as u64 / 4 + 60);
        let gemini = br#"{"generationConfig":{"maxOutputTokens":70}}"#;
        assert_eq!(reserve_for(&asked(Some(gemini)), 7), gemini.len() as u64 / 4 + 70);
        assert_eq!(reserve_for(&asked(Some(b"{}")), 7), 7);
        assert_eq!(reserve_for(&asked(None), 7), 7);
        // A hostile max_tokens saturates (it used to overflow: a panic in
        // debug builds, a wrapped tiny reservation in release).
        let huge = br#"{"max_tokens":18446744073709551615,"messages":[]}"#;
        assert_eq!(reserve_for(&asked(Some(huge)), 7), u64::MAX);
        assert_eq!(reserve_for(&asked(Some(b"not json")), 7), 2 + 7);
    }
}
