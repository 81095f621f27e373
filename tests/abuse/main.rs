//! The adversarial suite: the real binary played against each attack of the
//! threat model in `docs/security.md`, every test asserting its bound (bytes
//! written, RSS growth, status, time, calls upstream), not only "no crash".
#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;

mod admin;
mod admin_port;
mod audit;
mod body;
mod transport;
mod upstream;
