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
pub const FORMAT: u8 = 1;

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

/// The entry back from [`AuditEntry::encode`]'s bytes, borrowing them.
pub fn decode(bytes: &[u8]) -> Result<AuditEntry<'_>, DecodeError> {
    match bytes.split_first() {
        None => Err(DecodeError::Empty),
        Some((&FORMAT, fields)) => Ok(postcard::from_bytes(fields)?),
        Some((&other, _)) => Err(DecodeError::Format(other)),
    }
}

/// Whether `bytes` look like a record this build reads (its version).
pub fn is_current(bytes: &[u8]) -> bool {
    bytes.first() == Some(&FORMAT)
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
        }
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
