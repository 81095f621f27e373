//! Cross-node in-flight caps (`max_in_flight_per_key`): a slot per request
//! on a pool key, taken in Redis (`fastgate_lease_v1`) with a TTL of the
//! pool's `stuck_after`, so a node that dies mid-request frees its slots
//! by itself; given back when the request lets go of the key.

use super::Cluster;
use crate::pool::{Held, KeyPool, Lease, NoKey};
use std::sync::Arc;

/// A taken slot; dropping it gives it back (in the background).
struct Slot {
    cluster: Arc<Cluster>,
    set: String,
    id: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // the TTL frees it
        };
        let (cluster, set, id) = (
            self.cluster.clone(),
            std::mem::take(&mut self.set),
            std::mem::take(&mut self.id),
        );
        runtime.spawn(async move {
            let mut cmd = redis::cmd("FCALL");
            cmd.arg("fastgate_release_v1").arg(1).arg(&set).arg(&id);
            let _ = cluster.call::<i64>(&cmd).await;
        });
    }
}

impl Cluster {
    /// Lease a key of `pool` whose cluster-wide in-flight count is under
    /// the pool's cap, trying the next key when one is full on other nodes.
    /// Redis down: the cap is enforced per node only.
    pub async fn lease(
        self: &Arc<Self>,
        pool: &Arc<KeyPool>,
        avoid: &[String],
        model: Option<&str>,
        lease_id: &str,
    ) -> Result<Lease, NoKey> {
        let cap = pool.policy.max_in_flight_per_key;
        let mut full: Vec<String> = Vec::new();
        loop {
            let mut lease = pool.lease_except(avoid, &full, model)?;
            if cap == 0 {
                return Ok(lease);
            }
            let set = format!("fg:if:{}/{}", pool.name, lease.key().id);
            let mut cmd = redis::cmd("FCALL");
            cmd.arg("fastgate_lease_v1")
                .arg(1)
                .arg(&set)
                .arg(lease_id)
                .arg(cap)
                .arg(pool.policy.stuck_after.as_millis() as u64);
            match self.call::<i64>(&cmd).await {
                Ok(1) => {
                    lease.hold(Held(Box::new(Slot {
                        cluster: self.clone(),
                        set,
                        id: lease_id.to_string(),
                    })));
                    return Ok(lease);
                }
                Ok(_) => full.push(lease.key().id.clone()),
                Err(_) => {
                    self.decided_locally();
                    return Ok(lease);
                }
            }
        }
    }
}
