//! The audit record as the request path writes it: borrowed fields, encoded
//! once into one buffer. The encoding is postcard's for
//! [`AuditRecord`](crate::store::audit::AuditRecord), field by field in the
//! same order; the indexer decodes it borrowing the bytes. The request path
//! clones no name and leaves no string for another thread to free; the
//! indexer allocates none.

pub use crate::store::audit::AuditEntry;
#[cfg(test)]
use crate::store::audit::AuditRecord;

/// The encoding's version, the first byte of every record: a binary that
/// adopts another's segments (after a crash) skips what it cannot read
/// rather than misread it. Bump it with any change to the fields.
pub const FORMAT: u8 = 2;

/// Format 1 lacked the last fields of format 2 (the token parts, cost and
/// price version): all `Option`s, which postcard writes as one 0 byte
/// when absent.
const ADDED_IN_2: usize = 5;

impl AuditEntry<'_> {
    /// The record's bytes ([`FORMAT`], then the fields), in one allocation
    /// sized for them up front.
    pub fn encode(&self) -> Vec<u8> {
        let texts = [
            self.request_headers,
            self.response_headers,
            self.request_body,
            self.response_body,
        ];
        let capacity = 320 + texts.iter().flatten().map(|t| t.len() + 5).sum::<usize>();
        // Encoding into a Vec cannot fail: every field is a plain value.
        let mut out = Vec::with_capacity(capacity);
        out.push(FORMAT);
        postcard::to_extend(self, out).unwrap_or_default()
    }
}

/// Why a record's bytes could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("record format {0}, this build reads {FORMAT}")]
    Format(u8),
    #[error("empty record")]
    Empty,
    #[error("record fields: {0}")]
    Fields(#[from] postcard::Error),
}

/// The entry back from [`AuditEntry::encode`]'s bytes, borrowing them
/// (an older format's record first goes through [`upgrade`]).
pub fn decode(bytes: &[u8]) -> Result<AuditEntry<'_>, DecodeError> {
    match bytes.split_first() {
        None => Err(DecodeError::Empty),
        Some((&FORMAT, fields)) => Ok(postcard::from_bytes(fields)?),
        Some((&other, _)) => Err(DecodeError::Format(other)),
    }
}

/// A format-1 record's bytes as format 2 (the added fields absent), for
/// segments an older build wrote (kept texts, a crash before an upgrade);
/// `None` for any other record. Only old records pay for the copy.
pub fn upgrade(bytes: &[u8]) -> Option<Vec<u8>> {
    let (&1, fields) = bytes.split_first()? else {
        return None;
    };
    let mut out = Vec::with_capacity(bytes.len() + ADDED_IN_2);
    out.push(FORMAT);
    out.extend_from_slice(fields);
    out.extend_from_slice(&[0; ADDED_IN_2]);
    Some(out)
}

/// Whether `bytes` look like a record this build reads (its version or
/// one it upgrades).
pub fn is_current(bytes: &[u8]) -> bool {
    matches!(bytes.first(), Some(&1 | &FORMAT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> AuditRecord {
        AuditRecord {
            request_id: "01J0000000000000000000000".into(),
            ts_ms: 1_764_000_000_123,
            key_id: Some("key_1".into()),
            owner: Some("team ü".into()),
            user_id: Some("usr_1".into()),
            route: Some("chat".into()),
            upstream: Some("openai".into()),
            endpoint: Some("https://api.openai.com".into()),
            upstream_key_id: Some("k_1".into()),
            method: "POST".into(),
            path: "/v1/chat/completions?x=1".into(),
            status: 429,
            model: Some("gpt-4o".into()),
            stream: true,
            ttfb_ms: Some(12.5),
            duration_ms: 99.25,
            request_bytes: u64::MAX,
            response_bytes: 7,
            chunks: 3,
            prompt_tokens: Some(10),
            completion_tokens: None,
            usage_estimated: true,
            retries: 2,
            attempts: Some("a; b".into()),
            error: Some("upstream said no".into()),
            client_ip: Some("::1".into()),
            user_agent: Some("sdk\0/1".into()),
            request_headers: Some("{}".into()),
            response_headers: None,
            request_body: Some("{\"a\":1}".into()),
            response_body: Some(String::new()),
            cache_read_tokens: Some(6),
            cache_write_tokens: Some(0),
            reasoning_tokens: None,
            cost: Some(0.012_5),
            price_version: Some("builtin/2026-11-20".into()),
        }
    }

    /// A record a format-1 build wrote (the same fields but the five
    /// format 2 appended) reads with those absent: kept texts and
    /// adopted segments survive the upgrade.
    #[test]
    fn a_format_1_record_reads_with_the_new_fields_absent() {
        let old = AuditRecord {
            cache_read_tokens: None,
            cache_write_tokens: None,
            reasoning_tokens: None,
            cost: None,
            price_version: None,
            ..full()
        };
        let mut v1 = AuditEntry::from(&old).encode();
        assert_eq!(v1[v1.len() - ADDED_IN_2..], [0; ADDED_IN_2]);
        v1.truncate(v1.len() - ADDED_IN_2);
        v1[0] = 1;
        assert!(decode(&v1).is_err(), "not read as format 2 unchanged");
        assert!(is_current(&v1));
        let up = upgrade(&v1).expect("format 1 upgrades");
        assert_eq!(decode(&up).unwrap(), AuditEntry::from(&old));
        assert!(
            upgrade(&AuditEntry::from(&full()).encode()).is_none(),
            "a current record is left alone"
        );
    }

    /// The borrowed entry and the owned record encode to the same bytes,
    /// and decode to the record: the field orders agree.
    #[test]
    fn the_entry_is_the_records_encoding() {
        let r = full();
        let bytes = AuditEntry::from(&r).encode();
        assert_eq!(bytes[0], FORMAT);
        assert_eq!(bytes[1..], postcard::to_stdvec(&r).unwrap());
        assert_eq!(decode(&bytes).unwrap(), AuditEntry::from(&r));
        assert_eq!(postcard::from_bytes::<AuditRecord>(&bytes[1..]).unwrap(), r);
        let empty = AuditRecord::default();
        assert_eq!(
            decode(&AuditEntry::from(&empty).encode()).unwrap(),
            AuditEntry::from(&empty)
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let bytes = AuditEntry::from(&full()).encode();
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err());
        }
        assert!(decode(&[0xff; 64]).is_err());
        assert!(matches!(decode(&[FORMAT + 1, 0]), Err(DecodeError::Format(_))));
        assert!(matches!(decode(&[]), Err(DecodeError::Empty)));
    }
}
