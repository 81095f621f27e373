//! Key-state changes handed to whoever shares them between nodes (cluster
//! mode's key sync), without the pool knowing who that is.

use super::{KeyStatus, PoolKey};
use parking_lot::Mutex;
use std::sync::OnceLock;
use tokio::sync::mpsc;

/// `(pool, key id, state)`, deadlines on this node's clock.
pub type Change = (String, String, KeyStatus);

type Outbox = (
    mpsc::UnboundedSender<Change>,
    Mutex<Option<mpsc::UnboundedReceiver<Change>>>,
);

/// Set once, in cluster mode only; untouched otherwise, so a single node
/// pays nothing for a state change.
static OUTBOX: OnceLock<Outbox> = OnceLock::new();

/// Start collecting key changes (cluster mode, at start-up).
pub fn collect() {
    OUTBOX.get_or_init(|| {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, Mutex::new(Some(rx)))
    });
}

/// The changes collected since [`collect`]; `None` before it or once taken.
pub fn take() -> Option<mpsc::UnboundedReceiver<Change>> {
    OUTBOX.get().and_then(|(_, rx)| rx.lock().take())
}

/// A key of `pool` changed state on this node; a no-op unless collecting.
pub(super) fn changed(pool: &str, key: &PoolKey) {
    if let Some((tx, _)) = OUTBOX.get() {
        let _ = tx.send((pool.to_string(), key.id.clone(), key.status()));
    }
}
