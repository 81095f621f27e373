//! Pool key states across nodes. A cooldown, rest or disable seen by one
//! node (or an admin's change on it) goes through `fastgate_key_state_v3`,
//! which stores it (only if its version is not older than the stored one)
//! and publishes it; every other node merges it at once
//! ([`crate::pool::KeyStatus::merge_remote`]).
//! Deadlines travel as milliseconds remaining, never as one node's clock.
//! A (re)subscription reads every stored state first, so messages lost
//! while a node was cut off are made up for.

use super::{Cluster, RETRY_EVERY};
use crate::pool::{KeyPool, KeyStatus};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::{collections::HashMap, sync::Arc, time::Duration};
use tokio::sync::mpsc;

/// Hash of the last published state per `pool/key`, and the sorted set of
/// when each was stored (to trim them).
const STATES_KEY: &str = "fg:{fg}:ks";
const STATES_AT_KEY: &str = "fg:{fg}:kst";
const CHANNEL: &str = "fg:{fg}:keystate";
/// A stored state untouched this long is dropped from Redis (longer than
/// any cooldown's `max_wait`; a disable older than this is no longer
/// handed to nodes that start later, each keeps its own copy).
const KEEP_STATES_MS: u64 = 7 * 86_400_000;

/// This node's pool by name, as it is now (pools come and go on reload):
/// the one handle key sync needs of the state above it.
pub type PoolLookup = Arc<dyn Fn(&str) -> Option<Arc<KeyPool>> + Send + Sync>;

/// One key's state as a node saw it change.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Payload {
    node: String,
    pool: String,
    key: String,
    /// Deadlines as milliseconds remaining (0 = open) on the wire; on this
    /// node's clock while waiting to be sent.
    status: KeyStatus,
}

/// Every gate's deadline moved by `-now`: absolute Unix ms to remaining ms.
fn relative(mut st: KeyStatus, now: i64) -> KeyStatus {
    for g in std::iter::once(&mut st.key).chain(st.models.values_mut()) {
        g.until_ms = if g.until_ms > now { g.until_ms - now } else { 0 };
    }
    st
}

/// Remaining ms (less `age`, the time the state spent in Redis) back to
/// deadlines on this node's clock.
fn absolute(mut st: KeyStatus, now: i64, age: i64) -> KeyStatus {
    for g in std::iter::once(&mut st.key).chain(st.models.values_mut()) {
        g.until_ms = if g.until_ms > age { now + g.until_ms - age } else { 0 };
    }
    st
}

/// Send this node's key changes; those Redis did not take are kept (the
/// latest per key) and sent once it is back. A change Redis refused as not
/// newer than the stored state is merged with that state instead, so two
/// nodes that reached one version apart converge on the merge.
pub(super) async fn publish(
    cluster: Arc<Cluster>,
    pools: PoolLookup,
    mut outbox: mpsc::UnboundedReceiver<crate::pool::changes::Change>,
) {
    let mut unsent: HashMap<String, Payload> = HashMap::new();
    let mut tick = tokio::time::interval(RETRY_EVERY);
    loop {
        tokio::select! {
            next = outbox.recv() => {
                let Some((pool, key, status)) = next else { return };
                let field = format!("{pool}/{key}");
                unsent.insert(field, Payload { node: cluster.node_id.clone(), pool, key, status });
            }
            _ = tick.tick() => {}
        }
        if unsent.is_empty() || !cluster.is_up() {
            continue;
        }
        for (field, payload) in std::mem::take(&mut unsent) {
            // Remaining time as of sending, not of the change: a state kept
            // through an outage is not sent with its old remainders.
            let wire = Payload {
                status: relative(payload.status.clone(), crate::clock::now_ms()),
                ..payload.clone()
            };
            let Ok(json) = serde_json::to_string(&wire) else {
                continue;
            };
            let mut cmd = redis::cmd("FCALL");
            cmd.arg("fastgate_key_state_v3")
                .arg(2)
                .arg(STATES_KEY)
                .arg(STATES_AT_KEY)
                .arg(CHANNEL)
                .arg(&field)
                .arg(payload.status.version)
                .arg(json)
                .arg(KEEP_STATES_MS);
            match cluster.call::<Stored>(&cmd).await {
                Ok(Stored::Taken) => {}
                Ok(Stored::Kept { stored, server_now }) => {
                    tracing::debug!(key = %field, "A state at least as new is stored; merging it.");
                    if let Some((payload, age_ms)) = parse_stored(&stored, server_now) {
                        apply(&cluster, &pools, payload.as_bytes(), age_ms, Refused::Outrank);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, key = %field, "Key state not published yet; kept for when Redis is back.");
                    unsent.insert(field, payload);
                }
            }
        }
    }
}

/// `fastgate_key_state_v3`'s answer.
enum Stored {
    Taken,
    /// Not newer than the stored state, returned with Redis's time.
    Kept {
        stored: String,
        server_now: i64,
    },
}

impl redis::FromRedisValue for Stored {
    fn from_redis_value(v: redis::Value) -> Result<Self, redis::ParsingError> {
        match v {
            redis::Value::Int(_) => Ok(Stored::Taken),
            _ => {
                let (stored, server_now) = <(String, i64)>::from_redis_value(v)?;
                Ok(Stored::Kept { stored, server_now })
            }
        }
    }
}

/// A stored `version|stored at|payload` as its payload and its age.
fn parse_stored(stored: &str, server_now: i64) -> Option<(&str, i64)> {
    let mut parts = stored.splitn(3, '|');
    let (_version, at, payload) = (parts.next()?, parts.next()?, parts.next()?);
    Some((payload, server_now - at.parse::<i64>().ok()?))
}

/// What to do when a merge keeps this node's state over a stored one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// Nothing: a message or a resync.
    Ignore,
    /// Publish this node's state again, above the stored version: Redis
    /// refused it as not newer, yet it outranks what Redis keeps.
    Outrank,
}

/// Apply the other nodes' key changes as they are published; on every
/// (re)subscription, first every stored state.
pub(super) async fn subscribe(cluster: Arc<Cluster>, pools: PoolLookup) {
    let mut cut_off = false;
    loop {
        if let Ok(Ok(mut pubsub)) =
            tokio::time::timeout(Duration::from_secs(2), cluster.client.get_async_pubsub()).await
            && pubsub.subscribe(CHANNEL).await.is_ok()
        {
            match resync(&cluster, &pools).await {
                Ok(n) => tracing::info!(states = n, "Subscribed to key states; stored states applied."),
                Err(e) => tracing::warn!(error = %e, "Subscribed to key states; the resync failed."),
            }
            cut_off = false;
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                apply(&cluster, &pools, msg.get_payload_bytes(), 0, Refused::Ignore);
            }
            tracing::warn!("Key-state subscription lost; subscribing again.");
        } else if !cut_off {
            cut_off = true;
            tracing::warn!("Cannot subscribe to key states; retrying.");
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

/// Apply every stored state; returns how many were read.
async fn resync(cluster: &Cluster, pools: &PoolLookup) -> Result<usize, redis::RedisError> {
    let mut conn = cluster.client.get_multiplexed_async_connection().await?;
    let (server_now, fields): (i64, Vec<(String, String)>) = redis::cmd("FCALL")
        .arg("fastgate_key_states_v3")
        .arg(1)
        .arg(STATES_KEY)
        .query_async(&mut conn)
        .await?;
    for (_, stored) in &fields {
        if let Some((payload, age_ms)) = parse_stored(stored, server_now) {
            apply(cluster, pools, payload.as_bytes(), age_ms, Refused::Ignore);
        }
    }
    Ok(fields.len())
}

/// Apply one published state, `age_ms` old, unless this node sent it.
fn apply(cluster: &Cluster, pools: &PoolLookup, payload: &[u8], age_ms: i64, refused: Refused) {
    let Ok(p) = serde_json::from_slice::<Payload>(payload) else {
        tracing::warn!("Ignored a malformed key-state message.");
        return;
    };
    if p.node == cluster.node_id {
        return;
    }
    let Some(pool) = pools(&p.pool) else {
        return;
    };
    let status = absolute(p.status, crate::clock::now_ms(), age_ms);
    let taken = pool.apply_remote(&p.key, status);
    if taken {
        tracing::debug!(pool = %p.pool, key = %p.key, from = %p.node, "Applied a key state from another node.");
    } else if refused == Refused::Outrank {
        pool.republish(&p.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_travel_as_time_remaining() {
        let mut st = KeyStatus::default();
        st.key.until_ms = 10_500;
        st.models.insert(
            "m".into(),
            crate::pool::Gate {
                until_ms: 9_000,
                ..Default::default()
            },
        );
        let sent = relative(st, 10_000);
        assert_eq!(sent.key.until_ms, 500);
        assert_eq!(sent.models["m"].until_ms, 0, "an expired gate travels as open");
        // Received on a clock a minute ahead, after 200 ms in Redis.
        let got = absolute(sent, 70_000, 200);
        assert_eq!(got.key.until_ms, 70_300);
        assert_eq!(absolute(relative(got, 70_000), 70_000, 400).key.until_ms, 0);
    }
}
