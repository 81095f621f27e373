//! `audit:`: what the audit log keeps and for how long.

use super::{HumanDuration, HumanSize};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Write one row per proxied request to the `audit_log` table.
    pub enabled: bool,
    /// Keep request/response headers (credentials and cookies redacted).
    pub capture_headers: bool,
    /// Keep request/response bodies, each cut at `body_max_bytes`.
    pub capture_body: bool,
    pub body_max_bytes: HumanSize,
    /// A streamed answer's captured body is the answer merged into the
    /// client's non-stream JSON (text, tool calls, finish, usage) rather
    /// than its events, so the log shows what the model said.
    pub merge_streams: bool,
    /// Rows older than this are deleted in the background.
    pub retention: HumanDuration,
    /// Records waiting for the writer; when full, records are dropped (and counted), never waited for.
    pub queue_size: usize,
    /// Most rows written in one transaction.
    pub batch_size: usize,
    /// Size budget of the database (used pages): past it the oldest audit
    /// rows are deleted, alongside `retention`. 0 = no budget.
    pub max_bytes: HumanSize,
    /// Requests refused before a route or a valid key (no route, no key,
    /// bad or inactive key): one row per client per second, all, or none.
    pub refused: RefusedMode,
    /// When the segment files are made durable: `never` (the kernel writes
    /// them back; a crash of FastGate loses nothing written, a crash of the
    /// machine the last seconds) or `always` (`fdatasync` every write).
    pub fsync: AuditFsync,
}

/// `audit.fsync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditFsync {
    #[default]
    Never,
    Always,
}

/// `audit.refused`: which refused requests get an audit row. All of them
/// are counted in `fastgate_refused_requests_total` either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RefusedMode {
    /// At most one row per client address (IPv6: per /64) per second.
    #[default]
    Sampled,
    /// Every refusal (a client without a key can then write rows at will).
    All,
    /// None.
    None,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            capture_headers: true,
            capture_body: false,
            body_max_bytes: HumanSize(16 * 1024),
            merge_streams: true,
            retention: Duration::from_secs(30 * 24 * 3600).into(),
            queue_size: 65_536,
            batch_size: 512,
            max_bytes: HumanSize(10 * 1024 * 1024 * 1024),
            refused: RefusedMode::Sampled,
            fsync: AuditFsync::Never,
        }
    }
}
