//! `GET /api/events`: server-sent events for live views (the web UI's
//! pools page and dashboard, or `curl -N`). One `snapshot` on connect (every
//! pool with its keys, every upstream), then only what changed: `keys` (the
//! keys whose state, in-flight count, failures or totals changed, at most
//! four times a second), `upstreams` (address health or in-flight changes)
//! and a `tick` every second with per-second counters. Nothing runs on the
//! request path: each stream compares what it last sent with the live state.
//!
//! A stream lives no longer than its caller's right to open it: every
//! [`RECHECK_EVERY`] the bearer it was opened with is checked again, exactly
//! as a new request's would be (one indexed read of the user), and the
//! stream ends when the user was disabled, deleted, demoted, given a new
//! password, or the token expired.

use super::{AdminState, error::ApiError, pools, session::Caller};
use axum::{
    extract::{FromRequestParts, State},
    http::{HeaderMap, HeaderValue, header},
    response::sse::{Event, KeepAlive, Sse},
};
use futures_util::stream::{self, Stream};
use prometheus::core::Collector;
use serde_json::{Value, json};
use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    sync::Arc,
    time::Duration,
};

/// How often key and upstream state is compared with what was sent.
const SCAN_EVERY: Duration = Duration::from_millis(250);
/// Scans per `tick` event (one a second).
const SCANS_PER_TICK: u32 = 4;
/// How often the caller's access is checked again (scans).
const RECHECK_EVERY: u32 = 2;

/// `GET /api/events` (admins: pool keys and upstreams are gateway-wide).
pub async fn stream(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    caller.require_admin()?;
    let mut feed = Feed {
        s,
        auth: headers
            .get(header::AUTHORIZATION)
            .cloned()
            .ok_or(ApiError::Unauthenticated)?,
        keys: HashMap::new(),
        upstreams: HashMap::new(),
        counters: None,
        scans: 0,
        ready: VecDeque::new(),
        ticker: None,
    };
    let first = feed.snapshot();
    feed.ready.push_back(first);
    let events = stream::unfold(feed, |mut feed| async move {
        let event = feed.next().await?;
        Some((Ok(event), feed))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// Counter totals at the previous tick.
#[derive(Clone, Copy, Default)]
struct Counters {
    requests: f64,
    errors: f64,
    rate_limited: f64,
    prompt_tokens: f64,
    completion_tokens: f64,
}

/// One client's view: what it was last sent.
struct Feed {
    s: Arc<AdminState>,
    /// The `Authorization` the stream was opened with.
    auth: HeaderValue,
    keys: HashMap<(String, String), Value>,
    upstreams: HashMap<String, Value>,
    counters: Option<Counters>,
    scans: u32,
    ready: VecDeque<Event>,
    ticker: Option<tokio::time::Interval>,
}

impl Feed {
    /// The next event; `None` once the caller lost access (the stream ends).
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Some(e);
            }
            let ticker = self.ticker.get_or_insert_with(|| {
                let mut t = tokio::time::interval(SCAN_EVERY);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                t
            });
            ticker.tick().await;
            if self.scans.is_multiple_of(RECHECK_EVERY) && !self.still_allowed().await {
                tracing::info!("Event stream closed: its caller no longer has access.");
                return None;
            }
            self.scan();
        }
    }

    /// Whether the bearer the stream was opened with would still open it.
    async fn still_allowed(&self) -> bool {
        let (mut parts, ()) = axum::http::Request::new(()).into_parts();
        parts.headers.insert(header::AUTHORIZATION, self.auth.clone());
        Caller::from_request_parts(&mut parts, &self.s)
            .await
            .is_ok_and(|c| c.is_admin())
    }

    fn snapshot(&mut self) -> Event {
        let runtime = self.s.app.runtime.load();
        let mut pool_names: Vec<&String> = runtime.pools.keys().collect();
        pool_names.sort();
        let pools: Vec<Value> = pool_names
            .iter()
            .filter_map(|name| runtime.pools.get(*name))
            .map(|p| {
                let interval = runtime.reprobe_interval(&p.name);
                let keys: Vec<Value> = p.keys().iter().map(|k| pools::key_json(k, interval)).collect();
                for k in &keys {
                    let id = k["id"].as_str().unwrap_or_default().to_string();
                    self.keys.insert((p.name.clone(), id), fingerprint(k));
                }
                json!({"pool": pools::pool_json(p), "keys": keys})
            })
            .collect();
        let upstreams = pools::upstreams_json(&runtime);
        for u in &upstreams {
            self.upstreams
                .insert(u["name"].as_str().unwrap_or_default().to_string(), u.clone());
        }
        self.counters = Some(self.read_counters());
        event("snapshot", &json!({"pools": pools, "upstreams": upstreams}))
    }

    /// Compare the live state with what was sent; queue the differences.
    fn scan(&mut self) {
        let runtime = self.s.app.runtime.load();
        let mut changed = Vec::new();
        let mut live = std::collections::HashSet::new();
        for p in runtime.pools.values() {
            let interval = runtime.reprobe_interval(&p.name);
            for k in p.keys() {
                let v = pools::key_json(&k, interval);
                let id = (p.name.clone(), k.id.clone());
                let print = fingerprint(&v);
                live.insert(id.clone());
                if self.keys.get(&id) != Some(&print) {
                    self.keys.insert(id, print);
                    changed.push(json!({"pool": p.name, "key": v}));
                }
            }
        }
        // Keys deleted (or pools removed by a reload) since the last scan.
        let gone: Vec<(String, String)> = self.keys.keys().filter(|id| !live.contains(*id)).cloned().collect();
        for id in gone {
            self.keys.remove(&id);
            changed.push(json!({"pool": id.0, "key": {"id": id.1, "state": "deleted"}}));
        }
        if !changed.is_empty() {
            self.ready.push_back(event("keys", &Value::Array(changed)));
        }
        let upstreams: Vec<Value> = pools::upstreams_json(&runtime)
            .into_iter()
            .filter(|u| {
                let name = u["name"].as_str().unwrap_or_default().to_string();
                if self.upstreams.get(&name) == Some(u) {
                    return false;
                }
                self.upstreams.insert(name, u.clone());
                true
            })
            .collect();
        if !upstreams.is_empty() {
            self.ready.push_back(event("upstreams", &Value::Array(upstreams)));
        }
        self.scans += 1;
        if self.scans.is_multiple_of(SCANS_PER_TICK) {
            let now = self.read_counters();
            let before = self.counters.replace(now).unwrap_or(now);
            let per_s = |a: f64, b: f64| {
                ((a - b).max(0.0) * 1000.0 / (SCAN_EVERY.as_millis() as f64 * SCANS_PER_TICK as f64)).round()
            };
            let m = &self.s.app.metrics;
            self.ready.push_back(event(
                "tick",
                &json!({
                    "ts_ms": crate::clock::now_ms(),
                    "requests_per_s": per_s(now.requests, before.requests),
                    "errors_per_s": per_s(now.errors, before.errors),
                    "rate_limited_per_s": per_s(now.rate_limited, before.rate_limited),
                    "prompt_tokens_per_s": per_s(now.prompt_tokens, before.prompt_tokens),
                    "completion_tokens_per_s": per_s(now.completion_tokens, before.completion_tokens),
                    "in_flight": self.s.app.in_flight(),
                    "streams_in_flight": m.streams_in_flight.get(),
                    "lifecycle": self.s.app.lifecycle().as_str(),
                }),
            ));
        }
    }

    /// Totals from the Prometheus series (one collect a second per stream).
    fn read_counters(&self) -> Counters {
        let m = &self.s.app.metrics;
        let mut c = Counters::default();
        for family in m.requests.collect() {
            for metric in family.get_metric() {
                let v = metric.get_counter().get_value();
                c.requests += v;
                let status = metric
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "status")
                    .map(|l| l.value().to_string())
                    .unwrap_or_default();
                if status.starts_with('5') {
                    c.errors += v;
                } else if status == "429" {
                    c.rate_limited += v;
                }
            }
        }
        for family in m.tokens.collect() {
            for metric in family.get_metric() {
                let v = metric.get_counter().get_value();
                match metric
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "kind")
                    .map(|l| l.value())
                {
                    Some("prompt") => c.prompt_tokens += v,
                    Some("completion") => c.completion_tokens += v,
                    _ => {}
                }
            }
        }
        c
    }
}

/// What decides whether a key changed: everything but the countdown
/// (`remaining_s`, which the client derives from `until_ms`).
fn fingerprint(key: &Value) -> Value {
    let mut v = key.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("remaining_s");
        if let Some(models) = o.get_mut("models").and_then(Value::as_object_mut) {
            for g in models.values_mut() {
                if let Some(g) = g.as_object_mut() {
                    g.remove("remaining_s");
                }
            }
        }
    }
    v
}

fn event(name: &str, data: &Value) -> Event {
    Event::default().event(name).data(data.to_string())
}
