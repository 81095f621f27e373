//! The fault suite: the real binary against providers, proxies and clients
//! that misbehave (absurd and zero reset headers, 429s arriving mid-flight,
//! transient 401s, cut streams, refused connections), many requests at once,
//! each test asserting what the client got, what the upstream saw and what
//! the key pool and the meters did. See `docs/resilience.md`.
#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;

mod metering;
mod pool;
mod reprobe;
mod retry;
