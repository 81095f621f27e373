//! Per-minute totals of the audit log by route, upstream and model, kept in
//! the same transaction as the rows (so they always agree), for the
//! admin's whole-gateway stats: a 24 h summary reads 1,440 minutes × a few
//! groups instead of every row. Latency and time to first byte are kept as
//! histograms (2 % buckets), so percentiles come out as they would from the
//! rows. Minutes from before the table existed (an upgraded database) and
//! the partial minute at a window's start are read from the rows.

use super::{StoreError, audit::AuditEntry};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::{BTreeMap, HashMap};

pub const MINUTE_MS: i64 = 60_000;
/// The `settings` row: rows from this time on (Unix ms) are in the rollup.
pub const FROM_SETTING: &str = "audit_rollup_from_ms";

/// Durations in logarithmic buckets 2 % wide: percentiles over any number of
/// rows in one pass and fixed memory (no sort of the whole window).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    counts: Vec<u64>,
    n: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; Self::BUCKETS],
            n: 0,
        }
    }
}

impl Histogram {
    const GROWTH: f64 = 1.02;
    /// 0.01 ms .. about 24 h.
    const MIN_MS: f64 = 0.01;
    const BUCKETS: usize = 1200;

    pub fn bucket(ms: f64) -> usize {
        let i = if ms.is_nan() || ms <= Self::MIN_MS {
            0
        } else {
            ((ms / Self::MIN_MS).ln() / Self::GROWTH.ln()).ceil() as usize
        };
        i.min(Self::BUCKETS - 1)
    }

    pub fn add(&mut self, ms: f64) {
        self.counts[Self::bucket(ms)] += 1;
        self.n += 1;
    }

    /// Add a histogram stored by [`Sparse::to_blob`]; bad bytes are ignored.
    pub fn add_blob(&mut self, blob: &[u8]) {
        for (i, c) in Sparse::entries(blob) {
            if let Some(slot) = self.counts.get_mut(i as usize) {
                *slot += u64::from(c);
                self.n += u64::from(c);
            }
        }
    }

    /// The upper bound of the bucket holding the `p` quantile (within 2 %).
    pub fn quantile(&self, p: f64) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let rank = ((self.n as f64 - 1.0) * p).round() as u64 + 1;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Self::MIN_MS * Self::GROWTH.powi(i as i32));
            }
        }
        None
    }
}

/// A histogram of few filled buckets, as stored: `(u16 bucket, u32 count)`
/// little-endian pairs in bucket order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sparse(BTreeMap<u16, u32>);

impl Sparse {
    fn add(&mut self, ms: f64) {
        let c = self.0.entry(Histogram::bucket(ms) as u16).or_default();
        *c = c.saturating_add(1);
    }

    fn merge_blob(&mut self, blob: &[u8]) {
        for (i, n) in Self::entries(blob) {
            let c = self.0.entry(i).or_default();
            *c = c.saturating_add(n);
        }
    }

    fn entries(blob: &[u8]) -> impl Iterator<Item = (u16, u32)> + '_ {
        blob.chunks_exact(6).map(|p| {
            (
                u16::from_le_bytes([p[0], p[1]]),
                u32::from_le_bytes([p[2], p[3], p[4], p[5]]),
            )
        })
    }

    fn to_blob(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() * 6);
        for (i, n) in &self.0 {
            out.extend_from_slice(&i.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
        }
        out
    }
}

/// One group's totals for one minute.
#[derive(Debug, Clone, Default, PartialEq)]
struct Totals {
    requests: i64,
    errors: i64,
    sum_ms: f64,
    n_ttfb: i64,
    sum_ttfb: f64,
    prompt_tokens: i64,
    completion_tokens: i64,
    cost: f64,
    latency: Sparse,
    ttfb: Sparse,
}

impl Totals {
    fn add(&mut self, r: &AuditEntry<'_>) {
        self.requests += 1;
        self.errors += i64::from(r.status >= 400);
        self.sum_ms += r.duration_ms;
        self.latency.add(r.duration_ms);
        if let Some(t) = r.ttfb_ms {
            self.n_ttfb += 1;
            self.sum_ttfb += t;
            self.ttfb.add(t);
        }
        self.prompt_tokens = self
            .prompt_tokens
            .saturating_add(r.prompt_tokens.map_or(0, |t| t.min(i64::MAX as u64) as i64));
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(r.completion_tokens.map_or(0, |t| t.min(i64::MAX as u64) as i64));
        self.cost += r.cost.filter(|c| c.is_finite()).unwrap_or(0.0);
    }
}

type Group<'a> = (i64, &'a str, &'a str, &'a str);

/// Fold `records` into the rollup: one read and one write per group and
/// minute the batch touches (a few, at any rate), inside the caller's
/// transaction.
pub fn add(conn: &Connection, records: &[AuditEntry<'_>]) -> Result<(), StoreError> {
    if records.is_empty() {
        return Ok(());
    }
    let mut groups: HashMap<Group, Totals> = HashMap::new();
    for r in records {
        let g = (
            r.ts_ms.div_euclid(MINUTE_MS),
            r.route.unwrap_or_default(),
            r.upstream.unwrap_or_default(),
            r.model.unwrap_or_default(),
        );
        groups.entry(g).or_default().add(r);
    }
    let mut get = conn.prepare_cached(
        "SELECT requests, errors, sum_ms, n_ttfb, sum_ttfb, prompt_tokens, completion_tokens, latency, ttfb, cost
         FROM audit_rollup WHERE minute = ?1 AND route = ?2 AND upstream = ?3 AND model = ?4",
    )?;
    let mut put = conn.prepare_cached(
        "INSERT OR REPLACE INTO audit_rollup (minute, route, upstream, model, requests, errors, sum_ms,
            n_ttfb, sum_ttfb, prompt_tokens, completion_tokens, latency, ttfb, cost)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?;
    for ((minute, route, upstream, model), mut t) in groups {
        let old = get
            .query_row(params![minute, route, upstream, model], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, f64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, f64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, Vec<u8>>(7)?,
                    r.get::<_, Vec<u8>>(8)?,
                    r.get::<_, f64>(9)?,
                ))
            })
            .optional()?;
        if let Some((n, e, ms, nt, st, pt, ct, lat, tt, cost)) = old {
            t.cost += cost;
            t.requests += n;
            t.errors += e;
            t.sum_ms += ms;
            t.n_ttfb += nt;
            t.sum_ttfb += st;
            t.prompt_tokens = t.prompt_tokens.saturating_add(pt);
            t.completion_tokens = t.completion_tokens.saturating_add(ct);
            t.latency.merge_blob(&lat);
            t.ttfb.merge_blob(&tt);
        }
        put.execute(params![
            minute,
            route,
            upstream,
            model,
            t.requests,
            t.errors,
            t.sum_ms,
            t.n_ttfb,
            t.sum_ttfb,
            t.prompt_tokens,
            t.completion_tokens,
            t.latency.to_blob(),
            t.ttfb.to_blob(),
            t.cost,
        ])?;
    }
    Ok(())
}

/// Delete the minutes wholly before `cutoff_ms` (retention).
pub fn delete_before(conn: &Connection, cutoff_ms: i64) -> Result<usize, StoreError> {
    Ok(conn.execute(
        "DELETE FROM audit_rollup WHERE minute < ?1",
        [cutoff_ms.div_euclid(MINUTE_MS)],
    )?)
}

/// Where the rollup starts to serve a window that begins at `since`: the
/// first whole minute at or after both `since` and the rollup's start.
/// Rows before it are read one by one.
pub fn boundary(conn: &Connection, since: i64) -> Result<i64, StoreError> {
    let from = super::settings::get(conn, FROM_SETTING)?
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(i64::MAX);
    let up = |t: i64| {
        t.saturating_add(MINUTE_MS - 1)
            .div_euclid(MINUTE_MS)
            .saturating_mul(MINUTE_MS)
    };
    Ok(up(since).max(up(from)))
}

/// The whole gateway's numbers over `[since, now]`.
#[derive(Debug, Default)]
pub struct Summary {
    pub requests: i64,
    pub errors: i64,
    pub sum_ms: f64,
    pub n_ttfb: i64,
    pub sum_ttfb: f64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost: f64,
    pub latency: Histogram,
    pub ttfb: Histogram,
}

impl Summary {
    /// Count one row (its status, duration, time to first byte, tokens, cost).
    pub fn add_row(
        &mut self,
        status: i64,
        ms: f64,
        ttfb: Option<f64>,
        (prompt, completion): (Option<i64>, Option<i64>),
        cost: Option<f64>,
    ) {
        self.cost += cost.unwrap_or(0.0);
        self.requests += 1;
        self.errors += i64::from(status >= 400);
        self.sum_ms += ms;
        self.latency.add(ms);
        if let Some(t) = ttfb {
            self.n_ttfb += 1;
            self.sum_ttfb += t;
            self.ttfb.add(t);
        }
        self.prompt_tokens = self.prompt_tokens.saturating_add(prompt.unwrap_or(0));
        self.completion_tokens = self.completion_tokens.saturating_add(completion.unwrap_or(0));
    }
}

pub fn summary(conn: &Connection, since: i64) -> Result<Summary, StoreError> {
    let edge = boundary(conn, since)?;
    let mut s = Summary::default();
    let mut raw = conn.prepare_cached(
        "SELECT status, duration_ms, ttfb_ms, prompt_tokens, completion_tokens, cost FROM audit_log
         WHERE ts_ms >= ?1 AND ts_ms < ?2",
    )?;
    let mut rows = raw.query(params![since, edge])?;
    while let Some(r) = rows.next()? {
        s.add_row(r.get(0)?, r.get(1)?, r.get(2)?, (r.get(3)?, r.get(4)?), r.get(5)?);
    }
    let mut rolled = conn.prepare_cached(
        "SELECT requests, errors, sum_ms, n_ttfb, sum_ttfb, prompt_tokens, completion_tokens, latency, ttfb, cost
         FROM audit_rollup WHERE minute >= ?1",
    )?;
    let mut rows = rolled.query([edge.div_euclid(MINUTE_MS)])?;
    while let Some(r) = rows.next()? {
        s.requests = s.requests.saturating_add(r.get::<_, i64>(0)?);
        s.errors = s.errors.saturating_add(r.get::<_, i64>(1)?);
        s.sum_ms += r.get::<_, f64>(2)?;
        s.n_ttfb = s.n_ttfb.saturating_add(r.get::<_, i64>(3)?);
        s.sum_ttfb += r.get::<_, f64>(4)?;
        s.prompt_tokens = s.prompt_tokens.saturating_add(r.get::<_, i64>(5)?);
        s.completion_tokens = s.completion_tokens.saturating_add(r.get::<_, i64>(6)?);
        s.latency.add_blob(r.get_ref(7)?.as_blob().unwrap_or_default());
        s.ttfb.add_blob(r.get_ref(8)?.as_blob().unwrap_or_default());
        s.cost += r.get::<_, f64>(9)?;
    }
    Ok(s)
}

/// One point of a time series.
#[derive(Debug, Default, Clone)]
pub struct Point {
    pub requests: i64,
    pub errors: i64,
    pub sum_ms: f64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost: f64,
}

/// Totals per bucket of `bucket_ms` (a whole number of minutes) from `since`.
pub fn timeseries(conn: &Connection, since: i64, bucket_ms: i64) -> Result<BTreeMap<i64, Point>, StoreError> {
    let edge = boundary(conn, since)?;
    let mut out: BTreeMap<i64, Point> = BTreeMap::new();
    let mut raw = conn.prepare_cached(
        "SELECT (ts_ms / ?3) * ?3 AS t, COUNT(*), COALESCE(SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END), 0),
            SUM(duration_ms), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0),
            COALESCE(SUM(cost), 0.0)
         FROM audit_log WHERE ts_ms >= ?1 AND ts_ms < ?2 GROUP BY t",
    )?;
    let mut rolled = conn.prepare_cached(
        "SELECT (minute * 60000 / ?2) * ?2 AS t, SUM(requests), SUM(errors), SUM(sum_ms),
            SUM(prompt_tokens), SUM(completion_tokens), SUM(cost)
         FROM audit_rollup WHERE minute >= ?1 GROUP BY t",
    )?;
    let mut fold = |r: &rusqlite::Row<'_>| -> rusqlite::Result<()> {
        let p = out.entry(r.get(0)?).or_default();
        p.requests = p.requests.saturating_add(r.get::<_, i64>(1)?);
        p.errors = p.errors.saturating_add(r.get::<_, i64>(2)?);
        p.sum_ms += r.get::<_, f64>(3)?;
        p.prompt_tokens = p.prompt_tokens.saturating_add(r.get::<_, i64>(4)?);
        p.completion_tokens = p.completion_tokens.saturating_add(r.get::<_, i64>(5)?);
        p.cost += r.get::<_, f64>(6)?;
        Ok(())
    };
    let mut rows = raw.query(params![since, edge, bucket_ms])?;
    while let Some(r) = rows.next()? {
        fold(r)?;
    }
    let mut rows = rolled.query(params![edge.div_euclid(MINUTE_MS), bucket_ms])?;
    while let Some(r) = rows.next()? {
        fold(r)?;
    }
    Ok(out)
}

/// What the top list groups by.
#[derive(Debug, Clone, Copy)]
pub enum By {
    Route,
    Upstream,
    Model,
}

impl By {
    fn column(self) -> &'static str {
        match self {
            By::Route => "route",
            By::Upstream => "upstream",
            By::Model => "model",
        }
    }
}

/// One entry of a top list: its value (`None`: the column was empty).
#[derive(Debug, Clone, Default)]
pub struct TopItem {
    pub value: Option<String>,
    pub requests: i64,
    pub errors: i64,
    pub tokens: i64,
    pub sum_ms: f64,
    pub cost: f64,
}

/// The `limit` values of `by` with the most requests since `since`; ties
/// by value.
pub fn top(conn: &Connection, since: i64, by: By, limit: usize) -> Result<Vec<TopItem>, StoreError> {
    let edge = boundary(conn, since)?;
    let col = by.column();
    let mut all: HashMap<Option<String>, TopItem> = HashMap::new();
    let raw = format!(
        "SELECT {col}, COUNT(*), COALESCE(SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END), 0),
            COALESCE(SUM(prompt_tokens), 0) + COALESCE(SUM(completion_tokens), 0), SUM(duration_ms),
            COALESCE(SUM(cost), 0.0)
         FROM audit_log WHERE ts_ms >= ?1 AND ts_ms < ?2 GROUP BY {col}"
    );
    let rolled = format!(
        "SELECT NULLIF({col}, ''), SUM(requests), SUM(errors), SUM(prompt_tokens) + SUM(completion_tokens),
            SUM(sum_ms), SUM(cost)
         FROM audit_rollup WHERE minute >= ?1 GROUP BY {col}"
    );
    let mut fold = |r: &rusqlite::Row<'_>| -> rusqlite::Result<()> {
        // An empty name and none are one group, as in the rollup.
        let value: Option<String> = r.get::<_, Option<String>>(0)?.filter(|v| !v.is_empty());
        let item = all.entry(value.clone()).or_insert_with(|| TopItem {
            value,
            ..TopItem::default()
        });
        item.requests = item.requests.saturating_add(r.get::<_, i64>(1)?);
        item.errors = item.errors.saturating_add(r.get::<_, i64>(2)?);
        item.tokens = item.tokens.saturating_add(r.get::<_, i64>(3)?);
        item.sum_ms += r.get::<_, f64>(4)?;
        item.cost += r.get::<_, f64>(5)?;
        Ok(())
    };
    let mut stmt = conn.prepare_cached(&raw)?;
    let mut rows = stmt.query(params![since, edge])?;
    while let Some(r) = rows.next()? {
        fold(r)?;
    }
    let mut stmt = conn.prepare_cached(&rolled)?;
    let mut rows = stmt.query([edge.div_euclid(MINUTE_MS)])?;
    while let Some(r) = rows.next()? {
        fold(r)?;
    }
    let mut items: Vec<TopItem> = all.into_values().collect();
    items.sort_by(|a, b| b.requests.cmp(&a.requests).then_with(|| a.value.cmp(&b.value)));
    items.truncate(limit);
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles_are_within_two_percent() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for i in 1..=10_000 {
            h.add(f64::from(i) / 10.0); // 0.1 .. 1000 ms
        }
        for (p, want) in [(0.5, 500.0), (0.95, 950.0), (0.0, 0.1), (1.0, 1000.0)] {
            let got = h.quantile(p).unwrap();
            assert!((got - want).abs() / want <= 0.021, "p{p}: {got} vs {want}");
        }
        h.add(1e12);
        assert!(h.quantile(1.0).unwrap() > 1e6, "huge values land in the last bucket");
    }

    #[test]
    fn sparse_histograms_round_trip_and_merge() {
        let mut a = Sparse::default();
        for ms in [0.0, 0.5, 0.5, 120.0, 9e9, f64::NAN, -3.0] {
            a.add(ms);
        }
        let mut b = Sparse::default();
        b.merge_blob(&a.to_blob());
        b.merge_blob(&a.to_blob());
        let mut h = Histogram::default();
        h.add_blob(&b.to_blob());
        assert_eq!(h.n, 14);
        // Garbage is ignored, never a panic.
        h.add_blob(&[0xff; 13]);
        assert_eq!(h.n, 14);
    }
}
