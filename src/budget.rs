//! Budgets in money: an amount per period (day, week, month, or in total)
//! on a gateway key, a user (shared by their keys) or a route, counted in
//! micro-units of the price table's currency.
//!
//! Enforced like `tpm`: admission reserves the request's estimated cost
//! (its prompt estimate at the input rate plus the output it allows at the
//! output rate, cut to the budget) and is refused once spent plus reserved
//! reaches the amount; the settlement swaps the reservation for the real
//! cost. A budget is therefore exceeded by at most what the requests in
//! flight when it ran out cost beyond it (docs/spend.md states the bound).
//! In cluster mode the same counters live in Redis (`cluster::limits`).

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Micro-units per unit of currency: the counters' integer unit (a cheap
/// request costs a fraction of a cent; a counter of micro-dollars holds
/// ten million dollars within Redis Lua's exact range).
pub const MICROS: f64 = 1_000_000.0;

/// The largest budget amount (10 million): past it, a counter in
/// micro-units loses exactness in Redis's Lua.
pub const MAX_AMOUNT: f64 = 10_000_000.0;

/// `budgets:` in `fastgate.yaml`: how budgets tell that they are running out.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetsConfig {
    /// Fractions of a budget's amount that raise an alert once crossed.
    pub alert_thresholds: Vec<f64>,
    /// An HTTP(S) URL each alert is POSTed to as JSON (optional); a
    /// `user:password@` in it is sent as Basic authorization.
    #[serde(serialize_with = "masked_webhook")]
    pub webhook: Option<String>,
    /// Output tokens a reservation assumes for a request that names no
    /// `max_tokens` (or its spellings).
    pub default_output_tokens: u64,
}

/// The webhook as the admin API shows it: scheme, host and port; its
/// userinfo, path and query (where receivers put their tokens: Slack's
/// and Discord's are in the path) as `***`.
fn masked_webhook<S: serde::Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    let Some(url) = url else {
        return s.serialize_none();
    };
    match url::Url::parse(url) {
        Ok(u) => {
            let userinfo = if u.username().is_empty() && u.password().is_none() {
                ""
            } else {
                "***@"
            };
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            let host = u.host_str().unwrap_or_default();
            let rest = if u.path() == "/" && u.query().is_none() {
                "/"
            } else {
                "/***"
            };
            s.serialize_some(&format!("{}://{userinfo}{host}{port}{rest}", u.scheme()))
        }
        Err(_) => s.serialize_some("***"),
    }
}

/// A webhook URL without its userinfo, and the `Authorization` header the
/// userinfo stands for.
fn webhook_target(url: &str) -> (String, Option<String>) {
    use base64::Engine;
    let Ok(mut u) = url::Url::parse(url) else {
        return (url.to_string(), None);
    };
    if u.username().is_empty() && u.password().is_none() {
        return (url.to_string(), None);
    }
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let pair = format!("{}:{}", decode(u.username()), decode(u.password().unwrap_or("")));
    let _ = u.set_username("");
    let _ = u.set_password(None);
    let auth = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair));
    (u.to_string(), Some(auth))
}

impl Default for BudgetsConfig {
    fn default() -> Self {
        BudgetsConfig {
            alert_thresholds: vec![0.8, 1.0],
            webhook: None,
            default_output_tokens: 4096,
        }
    }
}

impl BudgetsConfig {
    /// Every problem with the section.
    pub fn check(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self
            .alert_thresholds
            .iter()
            .any(|t| !t.is_finite() || *t <= 0.0 || *t > 10.0)
        {
            errors.push("budgets.alert_thresholds: each is a fraction of the amount, above 0 and at most 10".into());
        }
        if self.alert_thresholds.len() > 16 {
            errors.push("budgets.alert_thresholds: at most 16".into());
        }
        if let Some(url) = &self.webhook {
            match url::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => errors.push("budgets.webhook: must be an http:// or https:// URL".into()),
            }
        }
        errors
    }
}

/// `budget: {amount, period}` on a key, a user or a route.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// In the price table's currency (`-0` read as 0).
    #[serde(deserialize_with = "amount")]
    pub amount: f64,
    #[serde(default)]
    pub period: BudgetPeriod,
}

fn amount<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    // Adding 0 turns -0 into 0; other values are unchanged.
    f64::deserialize(d).map(|a| a + 0.0)
}

/// Amounts are checked finite ([`Budget::check`]) before they are kept.
impl Eq for Budget {}

impl Budget {
    /// Why `self` cannot be a budget, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if !self.amount.is_finite() || self.amount < 0.0 || self.amount > MAX_AMOUNT {
            // 1e300 shown as such, not as its 301 digits.
            return Err(format!(
                "budget.amount: {:e} must be a number from 0 to {MAX_AMOUNT}",
                self.amount
            ));
        }
        Ok(())
    }

    /// The amount in micro-units.
    pub fn limit_micros(&self) -> u64 {
        to_micros(self.amount)
    }
}

/// The calendar period (UTC) a budget covers; `total` never resets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriod {
    Day,
    /// Monday to Monday (ISO weeks).
    Week,
    #[default]
    Month,
    Total,
}

impl std::str::FromStr for BudgetPeriod {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "day" => Ok(BudgetPeriod::Day),
            "week" => Ok(BudgetPeriod::Week),
            "month" => Ok(BudgetPeriod::Month),
            "total" => Ok(BudgetPeriod::Total),
            _ => Err("a budget's period is day, week, month or total".into()),
        }
    }
}

impl BudgetPeriod {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Week => "week",
            BudgetPeriod::Month => "month",
            BudgetPeriod::Total => "total",
        }
    }

    /// [start, end) of the period holding `now_ms`, in Unix ms (`total`:
    /// from 0, without end).
    pub fn bounds(self, now_ms: i64) -> (i64, i64) {
        let Ok(now) = time::OffsetDateTime::from_unix_timestamp(now_ms.div_euclid(1000)) else {
            return (0, i64::MAX);
        };
        let day = now.date();
        let ms = |d: time::Date| d.midnight().assume_utc().unix_timestamp() * 1000;
        let (start, end) = match self {
            BudgetPeriod::Total => return (0, i64::MAX),
            BudgetPeriod::Day => (day, day.next_day()),
            BudgetPeriod::Week => {
                let monday = day - time::Duration::days(i64::from(day.weekday().number_days_from_monday()));
                (monday, monday.checked_add(time::Duration::days(7)))
            }
            BudgetPeriod::Month => {
                let first = day.replace_day(1).unwrap_or(day);
                let next = if first.month() == time::Month::December {
                    time::Date::from_calendar_date(first.year() + 1, time::Month::January, 1).ok()
                } else {
                    time::Date::from_calendar_date(first.year(), first.month().next(), 1).ok()
                };
                (first, next)
            }
        };
        (ms(start), end.map_or(i64::MAX, ms))
    }
}

/// `amount` in micro-units, rounded up (a cost is never under-counted);
/// anything not a positive finite number is 0.
pub fn to_micros(amount: f64) -> u64 {
    // `as` saturates: an amount too large (or infinite) counts as the most,
    // never as nothing; NaN and negatives are nothing.
    if amount > 0.0 {
        (amount * MICROS).ceil() as u64
    } else {
        0
    }
}

/// Micro-units back to the currency.
pub fn from_micros(micros: u64) -> f64 {
    micros as f64 / MICROS
}

/// Whose budget a [`BudgetCheck`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetOf {
    Key,
    Owner,
    Route,
}

impl BudgetOf {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetOf::Key => "key",
            BudgetOf::Owner => "user",
            BudgetOf::Route => "route",
        }
    }
}

/// One budget a request counts against.
#[derive(Debug, Clone)]
pub struct BudgetCheck {
    /// `key_…`, `user:<id>`, `route:<name>`: ids and config names, never
    /// client text.
    pub scope: String,
    pub of: BudgetOf,
    pub kind: BudgetPeriod,
    /// The amount, in micro-units.
    pub limit: u64,
    /// Unix ms: [start, end) of the current period.
    pub period: (i64, i64),
}

impl BudgetCheck {
    pub fn new(scope: String, of: BudgetOf, budget: &Budget, now_ms: i64) -> Self {
        BudgetCheck {
            scope,
            of,
            kind: budget.period,
            limit: budget.limit_micros(),
            period: budget.period.bounds(now_ms),
        }
    }

    /// The reservation this budget holds for a request: cut to its amount.
    pub fn reserve(&self, cost_reserve: u64) -> u64 {
        cost_reserve.min(self.limit)
    }
}

/// One scope's period: spent and reserved, in micro-units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spend {
    pub start: i64,
    pub spent: u64,
    pub reserved: u64,
}

/// Budgets counted on this node (no cluster, or Redis down: then each
/// node takes its share of the amount).
#[derive(Debug, Default)]
pub struct BudgetTracker {
    spend: Mutex<HashMap<String, Spend>>,
}

impl BudgetTracker {
    /// Reserve `reserve` against `limit` for `scope` in the period
    /// `(start, end)` if spent plus reserved is below it; else the seconds
    /// until the period ends.
    pub fn admit(
        &self,
        scope: &str,
        limit: u64,
        (start, end): (i64, i64),
        reserve: u64,
        now_ms: i64,
    ) -> Result<(), u64> {
        let mut map = self.spend.lock();
        let s = map.entry(scope.to_string()).or_default();
        if s.start != start {
            *s = Spend {
                start,
                ..Spend::default()
            };
        }
        if s.spent.saturating_add(s.reserved) >= limit {
            return Err(retry_after(end, now_ms));
        }
        s.reserved = s.reserved.saturating_add(reserve.min(limit));
        Ok(())
    }

    /// Reserve against every budget of a request, or none: each in its
    /// share of the amount (`nodes` sharing it without a common counter);
    /// the first that has run out refuses, with its index and the seconds
    /// until its period ends.
    pub fn admit_all(&self, checks: &[BudgetCheck], reserve: u64, nodes: u64, now_ms: i64) -> Result<(), (usize, u64)> {
        if checks.is_empty() {
            return Ok(());
        }
        let mut map = self.spend.lock();
        for (i, c) in checks.iter().enumerate() {
            let limit = c.limit.div_ceil(nodes.max(1));
            let s = map
                .get(&c.scope)
                .filter(|s| s.start == c.period.0)
                .copied()
                .unwrap_or_default();
            if s.spent.saturating_add(s.reserved) >= limit {
                return Err((i, retry_after(c.period.1, now_ms)));
            }
        }
        for c in checks {
            let s = map.entry(c.scope.clone()).or_default();
            if s.start != c.period.0 {
                *s = Spend {
                    start: c.period.0,
                    ..Spend::default()
                };
            }
            s.reserved = s.reserved.saturating_add(c.reserve(reserve));
        }
        Ok(())
    }

    /// Swap a request's reservation for its cost; returns the spend before
    /// and after (for threshold alerts). A period that ended meanwhile is
    /// charged nothing new (the request began in it, its reservation went
    /// with it).
    pub fn settle(&self, scope: &str, start: i64, reserved: u64, cost: u64) -> Option<(u64, u64)> {
        let mut map = self.spend.lock();
        let s = map.entry(scope.to_string()).or_insert(Spend {
            start,
            ..Spend::default()
        });
        if s.start != start {
            return None;
        }
        s.reserved = s.reserved.saturating_sub(reserved);
        let before = s.spent;
        s.spent = s.spent.saturating_add(cost);
        Some((before, s.spent))
    }

    /// Settle a request against each of its budgets (`reserve` is what
    /// admission reserved on this tracker: 0 when it was counted in Redis),
    /// telling `alerts` of thresholds crossed.
    pub fn settle_all(&self, checks: &[BudgetCheck], reserve: u64, cost: u64, alerts: Option<&Alerts>) {
        for c in checks {
            if let Some((before, after)) = self.settle(&c.scope, c.period.0, c.reserve(reserve), cost)
                && let Some(alerts) = alerts
            {
                alerts.check(c, before, after);
            }
        }
    }

    /// What `scope` has spent and reserved in the period starting at `start`.
    pub fn spend(&self, scope: &str, start: i64) -> Spend {
        self.spend
            .lock()
            .get(scope)
            .filter(|s| s.start == start)
            .copied()
            .unwrap_or(Spend {
                start,
                ..Spend::default()
            })
    }

    pub fn is_seeded(&self, scope: &str, start: i64) -> bool {
        self.spend.lock().get(scope).is_some_and(|s| s.start == start)
    }

    /// Set the spend from the audit log (keeps whatever is larger).
    pub fn seed(&self, scope: &str, start: i64, spent: u64) {
        let mut map = self.spend.lock();
        let s = map.entry(scope.to_string()).or_insert(Spend {
            start,
            ..Spend::default()
        });
        if s.start != start {
            *s = Spend {
                start,
                spent,
                reserved: 0,
            };
        } else {
            s.spent = s.spent.max(spent);
        }
    }

    /// Forget periods that began before `oldest_start` (a `total` budget,
    /// which begins at 0, is kept); returns how many.
    pub fn sweep(&self, oldest_start: i64) -> usize {
        let mut map = self.spend.lock();
        let before = map.len();
        map.retain(|_, s| s.start == 0 || s.start >= oldest_start || s.reserved > 0);
        before - map.len()
    }
}

/// A budget crossed one of its alert thresholds.
#[derive(Debug, Clone, Serialize)]
pub struct AlertEvent {
    /// `key`, `user` or `route`.
    pub of: &'static str,
    pub scope: String,
    /// The fraction of the amount crossed (0.8 = 80 %).
    pub threshold: f64,
    pub amount: f64,
    pub spent: f64,
    pub period: &'static str,
    /// Unix ms at which the period ends (`null` for a `total` budget).
    pub resets_at: Option<i64>,
}

/// Where threshold crossings go: a `warn` log line, the
/// `fastgate_budget_alerts_total{of,threshold}` counter, and the optional
/// webhook's queue (bounded: a slow or dead receiver costs a dropped alert,
/// counted, never a request's time).
pub struct Alerts {
    thresholds: Vec<f64>,
    counter: prometheus::IntCounterVec,
    webhook: Option<tokio::sync::mpsc::Sender<AlertEvent>>,
    dropped: prometheus::IntCounter,
}

impl Alerts {
    pub fn new(
        thresholds: Vec<f64>,
        counter: prometheus::IntCounterVec,
        dropped: prometheus::IntCounter,
        webhook: Option<tokio::sync::mpsc::Sender<AlertEvent>>,
    ) -> Self {
        Alerts {
            thresholds,
            counter,
            webhook,
            dropped,
        }
    }

    /// Report the thresholds `check`'s spend crossed going from `before`
    /// to `after` micro-units.
    pub fn check(&self, check: &BudgetCheck, before: u64, after: u64) {
        for threshold in crossed(&self.thresholds, check.limit, before, after) {
            let percent = format!("{}", (threshold * 100.0).round());
            self.counter.with_label_values(&[check.of.as_str(), &percent]).inc();
            let event = AlertEvent {
                of: check.of.as_str(),
                scope: check.scope.clone(),
                threshold,
                amount: from_micros(check.limit),
                spent: from_micros(after),
                period: check.kind.as_str(),
                resets_at: (check.period.1 != i64::MAX).then_some(check.period.1),
            };
            tracing::warn!(
                budget = %event.scope,
                of = event.of,
                threshold_percent = %percent,
                amount = event.amount,
                spent = event.spent,
                period = event.period,
                "Budget threshold reached."
            );
            if let Some(tx) = &self.webhook
                && tx.try_send(event).is_err()
            {
                self.dropped.inc();
            }
        }
    }
}

/// The longest `Retry-After` a budget tells: a `total` budget never resets,
/// and no client should be told to wait for centuries.
pub const MAX_RETRY_AFTER: u64 = 31 * 86_400;

/// How long one alert's POST may take.
const WEBHOOK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// POST each alert from `queue` to `url` as JSON, one at a time, until the
/// queue closes; a refused, failed or slow delivery is logged and counted
/// in `failed`, never retried (the next threshold will tell again).
pub async fn deliver(url: String, mut queue: tokio::sync::mpsc::Receiver<AlertEvent>, failed: prometheus::IntCounter) {
    let https = match hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
    {
        Ok(b) => b.https_or_http().enable_http1().build(),
        Err(e) => {
            tracing::error!(error = %e, "Budget webhook: no system root certificates; alerts are not delivered.");
            return;
        }
    };
    let client: hyper_util::client::legacy::Client<_, String> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
    let (url, authorization) = webhook_target(&url);
    while let Some(event) = queue.recv().await {
        let body = serde_json::to_string(&event).unwrap_or_default();
        let mut request = http::Request::post(url.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "fastgate-budget-alert");
        if let Some(auth) = &authorization {
            request = request.header(http::header::AUTHORIZATION, auth.as_str());
        }
        let request = request.body(body);
        let Ok(request) = request else {
            failed.inc();
            continue;
        };
        match tokio::time::timeout(WEBHOOK_TIMEOUT, client.request(request)).await {
            Ok(Ok(r)) if r.status().is_success() => {}
            Ok(Ok(r)) => {
                failed.inc();
                tracing::warn!(status = r.status().as_u16(), budget = %event.scope, "Budget webhook refused an alert.");
            }
            Ok(Err(e)) => {
                failed.inc();
                tracing::warn!(error = %e, budget = %event.scope, "Budget webhook unreachable; alert not delivered.");
            }
            Err(_) => {
                failed.inc();
                tracing::warn!(budget = %event.scope, "Budget webhook did not answer within 5 s; alert not delivered.");
            }
        }
    }
}

fn retry_after(end: i64, now_ms: i64) -> u64 {
    ((end.saturating_sub(now_ms) / 1000).max(1) as u64).min(MAX_RETRY_AFTER)
}

/// The thresholds (fractions of the amount) a spend crossed going from
/// `before` to `after` micro-units of `limit`.
pub fn crossed(thresholds: &[f64], limit: u64, before: u64, after: u64) -> impl Iterator<Item = f64> + '_ {
    thresholds.iter().copied().filter(move |t| {
        let mark = (limit as f64 * t).ceil() as u64;
        before < mark && after >= mark
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_calendar_periods_in_utc() {
        // Wednesday 2026-12-02 13:00 UTC
        let now = 1_796_216_400_000;
        let day = |d: &str| {
            let f = time::macros::format_description!("[year]-[month]-[day]");
            time::Date::parse(d, &f)
                .unwrap()
                .midnight()
                .assume_utc()
                .unix_timestamp()
                * 1000
        };
        assert_eq!(BudgetPeriod::Day.bounds(now), (day("2026-12-02"), day("2026-12-03")));
        assert_eq!(BudgetPeriod::Week.bounds(now), (day("2026-11-30"), day("2026-12-07")));
        assert_eq!(BudgetPeriod::Month.bounds(now), (day("2026-12-01"), day("2027-01-01")));
        assert_eq!(BudgetPeriod::Total.bounds(now), (0, i64::MAX));
    }

    #[test]
    fn reservations_hold_the_budget_until_settled() {
        let t = BudgetTracker::default();
        let p = (1000, 61_000);
        // 1.00 budget: three requests reserving 0.40 each, the third gets in
        // (0.80 < 1.00) and the fourth does not.
        for _ in 0..3 {
            assert!(t.admit("k", 1_000_000, p, 400_000, 2000).is_ok());
        }
        assert_eq!(t.admit("k", 1_000_000, p, 400_000, 2000), Err(59));
        // They cost 0.10 each: the reservations go, the spend stays.
        for _ in 0..3 {
            t.settle("k", p.0, 400_000, 100_000);
        }
        assert_eq!(
            t.spend("k", p.0),
            Spend {
                start: 1000,
                spent: 300_000,
                reserved: 0
            }
        );
        assert!(t.admit("k", 1_000_000, p, 400_000, 2000).is_ok());
        // A reservation larger than the budget is cut to it.
        t.settle("k", p.0, 400_000, 0);
        assert!(t.admit("k", 1_000_000, p, u64::MAX, 2000).is_ok());
        assert_eq!(t.spend("k", p.0).reserved, 1_000_000);
        // A new period starts from nothing.
        assert!(t.admit("k", 1_000_000, (61_000, 121_000), 1, 62_000).is_ok());
        assert_eq!(
            t.settle("k", p.0, 1_000_000, 5),
            None,
            "the old period's settlement is dropped"
        );
    }

    #[test]
    fn amounts_and_micros() {
        assert_eq!(to_micros(0.000_000_1), 1, "a cost is rounded up");
        assert_eq!(to_micros(f64::NAN), 0);
        assert_eq!(to_micros(-1.0), 0);
        assert_eq!(to_micros(1e30), u64::MAX);
        assert!(
            Budget {
                amount: -1.0,
                period: BudgetPeriod::Day
            }
            .check()
            .is_err()
        );
        assert!(
            Budget {
                amount: f64::INFINITY,
                period: BudgetPeriod::Day
            }
            .check()
            .is_err()
        );
        assert!(
            Budget {
                amount: 1e20,
                period: BudgetPeriod::Day
            }
            .check()
            .is_err()
        );
        assert!(
            Budget {
                amount: 25.0,
                period: BudgetPeriod::Week
            }
            .check()
            .is_ok()
        );
        let crossed: Vec<f64> = crossed(&[0.8, 1.0], 1_000_000, 790_000, 1_000_000).collect();
        assert_eq!(crossed, vec![0.8, 1.0]);
        assert_eq!(super::crossed(&[0.8, 1.0], 1_000_000, 800_000, 900_000).count(), 0);
    }

    #[test]
    fn a_webhooks_userinfo_is_sent_as_basic_and_shown_as_stars() {
        let (url, auth) = super::webhook_target("https://alert:s%40cret@hooks.example/a?token=t");
        assert_eq!(url, "https://hooks.example/a?token=t");
        assert_eq!(auth.as_deref(), Some("Basic YWxlcnQ6c0BjcmV0"));
        assert_eq!(super::webhook_target("http://h/a"), ("http://h/a".into(), None));
        let config = BudgetsConfig {
            webhook: Some("https://alert:s%40cret@hooks.example/a?token=t".into()),
            ..BudgetsConfig::default()
        };
        let shown = serde_json::to_string(&config).unwrap();
        assert!(
            shown.contains(r#""webhook":"https://***@hooks.example/***""#),
            "{shown}"
        );
    }

    #[test]
    fn minus_zero_is_zero_and_huge_amounts_are_told_briefly() {
        let b: Budget = serde_json::from_str(r#"{"amount": -0.0, "period": "day"}"#).unwrap();
        assert!(b.amount.is_sign_positive() && b.check().is_ok());
        let b: Budget = serde_json::from_str(r#"{"amount": 1e300}"#).unwrap();
        let e = b.check().unwrap_err();
        assert!(e.len() < 80 && e.contains("1e300"), "{e}");
    }
}
