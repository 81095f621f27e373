//! Cross-node in-flight caps (`max_in_flight_per_key`): a slot per request
//! on a pool key, taken in Redis (`fastgate_lease_v3`) under an op id this
//! node mints, with a TTL of the pool's `stuck_after`, so a node that dies
//! mid-request frees its slots by itself; given back when the request lets
//! go of the key. A release Redis did not confirm (breaker open, timeout)
//! is kept and replayed once it answers: releases are idempotent, so a
//! short outage leaks no slot.

use super::{Cluster, MAX_RELEASES, PREFIX};
use crate::pool::{Held, KeyPool, Lease, NoKey};
use std::sync::Arc;

/// Most releases sent in one call.
const RELEASE_BATCH: usize = 256;

/// A taken slot; dropping it gives it back (in the background).
struct Slot {
    cluster: Arc<Cluster>,
    set: String,
    op: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let (set, op) = (std::mem::take(&mut self.set), std::mem::take(&mut self.op));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime (shutdown): kept for a replay, else the TTL frees it.
            self.cluster.keep_release(set, op);
            return;
        };
        let cluster = self.cluster.clone();
        runtime.spawn(async move { cluster.release(set, op).await });
    }
}

fn lease_set(pool: &str, key: &str) -> String {
    format!("{PREFIX}if:{pool}/{key}")
}

impl Cluster {
    /// Lease a key of `pool` whose cluster-wide in-flight count is under
    /// the pool's cap, trying the next key when one is full on other nodes.
    /// Redis down: the cap is enforced per node only. `request` names the
    /// request in logs only; the slot is held under a fresh op id.
    pub async fn lease(
        self: &Arc<Self>,
        pool: &Arc<KeyPool>,
        avoid: &[String],
        model: Option<&str>,
        request: &str,
    ) -> Result<Lease, NoKey> {
        let cap = pool.policy.max_in_flight_per_key;
        let mut full: Vec<String> = Vec::new();
        loop {
            let mut lease = pool.lease_except(avoid, &full, model)?;
            if cap == 0 {
                return Ok(lease);
            }
            let set = lease_set(&pool.name, &lease.key().id);
            let op = self.next_op();
            let mut cmd = redis::cmd("FCALL");
            cmd.arg("fastgate_lease_v3")
                .arg(1)
                .arg(&set)
                .arg(&op)
                .arg(cap)
                .arg(pool.policy.stuck_after.as_millis() as u64);
            match self.call::<i64>(&cmd).await {
                Ok(1) => {
                    lease.hold(Held(Box::new(Slot {
                        cluster: self.clone(),
                        set,
                        op,
                    })));
                    return Ok(lease);
                }
                Ok(_) => full.push(lease.key().id.clone()),
                Err(e) => {
                    // Redis may have taken the slot before its answer was
                    // lost: give it back once Redis answers again.
                    if e.is_transport() {
                        self.keep_release(set, op);
                    }
                    tracing::debug!(error = %e, request, "In-flight slot decided locally.");
                    self.decided_locally();
                    return Ok(lease);
                }
            }
        }
    }

    /// Give a slot back; kept for a replay when Redis does not confirm.
    async fn release(&self, set: String, op: String) {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("fastgate_release_v3").arg(1).arg(&set).arg(&op);
        if let Err(e) = self.call::<i64>(&cmd).await
            && e.is_transport()
        {
            self.keep_release(set, op);
        }
    }

    fn keep_release(&self, set: String, op: String) {
        let mut kept = self.releases.lock();
        if kept.len() >= MAX_RELEASES {
            kept.pop_front();
        }
        kept.push_back((set, op));
    }

    /// Send the releases Redis has not confirmed (after an outage), one
    /// call per lease set and batch; those still unconfirmed stay.
    pub(super) async fn replay_releases(&self) {
        let kept: Vec<(String, String)> = self.releases.lock().drain(..).collect();
        if kept.is_empty() {
            return;
        }
        let mut by_set: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (set, op) in kept {
            by_set.entry(set).or_default().push(op);
        }
        let mut released = 0;
        for (set, ops) in by_set {
            for chunk in ops.chunks(RELEASE_BATCH) {
                let mut cmd = redis::cmd("FCALL");
                cmd.arg("fastgate_release_v3").arg(1).arg(&set).arg(chunk);
                match self.call::<i64>(&cmd).await {
                    Ok(n) => released += n,
                    Err(e) if e.is_transport() => {
                        for op in chunk {
                            self.keep_release(set.clone(), op.clone());
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "Redis refused a release replay; the slots expire by themselves.")
                    }
                }
            }
        }
        tracing::info!(
            released,
            "In-flight slots released while Redis was unreachable given back."
        );
    }
}
