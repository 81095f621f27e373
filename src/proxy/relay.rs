//! Reading an upstream body for relaying, in batches of what is already there.
//!
//! Providers send each SSE event as its own HTTP chunk, and Pingora hands
//! them out one at a time even when a single socket read brought in many.
//! Writing each to the client separately costs a `sendto` and, on loopback
//! or a busy host, a wake-up of the reader per event. [`Relay::ready`] takes
//! the pieces that can be had without waiting, so one client write carries
//! them all; nothing is ever held back waiting for more.

use bytes::Bytes;
use futures_util::FutureExt;
use pingora::protocols::http::client::HttpSession;

/// At most this much is gathered into one client write.
pub const BATCH_BYTES: usize = 64 * 1024;

/// One upstream body being relayed.
#[derive(Default)]
pub struct Relay {
    /// An end or error met while gathering, returned by the next `next`.
    held: Option<pingora::Result<Option<Bytes>>>,
}

impl Relay {
    /// The next piece of body: waits for it (cancel-safe, as Pingora's body
    /// readers commit their state before each await).
    pub async fn next(&mut self, up: &mut HttpSession) -> pingora::Result<Option<Bytes>> {
        match self.held.take() {
            Some(result) => result,
            None => up.read_response_body().await,
        }
    }

    /// A piece that is available right now (buffered, or readable without
    /// blocking); `None` when there is none. An end or error found here is
    /// kept for the following `next`.
    pub fn ready(&mut self, up: &mut HttpSession) -> Option<Bytes> {
        if self.held.is_some() {
            return None;
        }
        match up.read_response_body().now_or_never()? {
            Ok(Some(data)) => Some(data),
            end_or_error => {
                self.held = Some(end_or_error);
                None
            }
        }
    }
}
