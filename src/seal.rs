//! Encryption at rest for secrets FastGate keeps in its database (the
//! generated JWT secret; upstream pool keys added at run time), under
//! `secrets.master_key`: XChaCha20-Poly1305 with a random nonce per value,
//! bound to the value's name so a sealed value cannot be moved to another.
//!
//! Stored form: `fgseal1:` + hex(nonce ‖ ciphertext). Values without the
//! prefix are plaintext (written before a master key was set).

use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, KeyInit, Payload},
};
use sha2::{Digest, Sha256};

const PREFIX: &str = "fgseal1:";
const NONCE: usize = 24;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("{0} is encrypted but no secrets.master_key is set")]
    NoKey(String),
    #[error("{0} does not decrypt with this secrets.master_key (wrong key, or the value was altered)")]
    WrongKey(String),
}

/// Seals and opens values with the master key.
pub struct Sealer {
    cipher: Option<XChaCha20Poly1305>,
}

impl Sealer {
    /// From `secrets.master_key`; empty means no encryption. The key is
    /// stretched with SHA-256: give it at least 32 random characters.
    pub fn new(master_key: &str) -> Self {
        let cipher = (!master_key.is_empty()).then(|| {
            let key: [u8; 32] = Sha256::digest(format!("fastgate seal v1\0{master_key}").as_bytes()).into();
            XChaCha20Poly1305::new(&key.into())
        });
        Sealer { cipher }
    }

    pub fn enabled(&self) -> bool {
        self.cipher.is_some()
    }

    /// Whether a stored value is sealed.
    pub fn is_sealed(stored: &str) -> bool {
        stored.starts_with(PREFIX)
    }

    /// The stored form of `value` named `name`: sealed if a master key is
    /// set, else the value itself.
    pub fn seal(&self, name: &str, value: &str) -> String {
        let Some(cipher) = &self.cipher else {
            return value.to_string();
        };
        let nonce: [u8; NONCE] = rand::random();
        let payload = Payload {
            msg: value.as_bytes(),
            aad: name.as_bytes(),
        };
        match cipher.encrypt(XNonce::from_slice(&nonce), payload) {
            Ok(ct) => format!("{PREFIX}{}{}", hex::encode(nonce), hex::encode(ct)),
            // Encryption of an in-memory buffer does not fail; never store clear text.
            Err(_) => String::new(),
        }
    }

    /// The clear value of a stored `name`.
    pub fn open(&self, name: &str, stored: &str) -> Result<String, SealError> {
        let Some(hexed) = stored.strip_prefix(PREFIX) else {
            return Ok(stored.to_string());
        };
        let cipher = self.cipher.as_ref().ok_or_else(|| SealError::NoKey(name.into()))?;
        let wrong = || SealError::WrongKey(name.into());
        let raw = hex::decode(hexed).map_err(|_| wrong())?;
        if raw.len() < NONCE {
            return Err(wrong());
        }
        let (nonce, ct) = raw.split_at(NONCE);
        let payload = Payload {
            msg: ct,
            aad: name.as_bytes(),
        };
        let clear = cipher
            .decrypt(XNonce::from_slice(nonce), payload)
            .map_err(|_| wrong())?;
        String::from_utf8(clear).map_err(|_| wrong())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_key_and_name_they_were_sealed_with() {
        let s = Sealer::new("a-master-key-of-enough-length-123");
        let stored = s.seal("jwt_secret", "hunter2-but-longer");
        assert!(Sealer::is_sealed(&stored));
        assert!(!stored.contains("hunter2"));
        assert_ne!(
            stored,
            s.seal("jwt_secret", "hunter2-but-longer"),
            "a fresh nonce each time"
        );
        assert_eq!(s.open("jwt_secret", &stored).unwrap(), "hunter2-but-longer");
        assert!(matches!(s.open("other", &stored), Err(SealError::WrongKey(_))));
        let other = Sealer::new("another-master-key-of-enough-length");
        assert!(matches!(other.open("jwt_secret", &stored), Err(SealError::WrongKey(_))));
        assert!(matches!(
            Sealer::new("").open("jwt_secret", &stored),
            Err(SealError::NoKey(_))
        ));
        // Change the last hex digit (to another digit: the same one 1 time
        // in 16 would leave the value intact).
        let mut tampered = stored.clone();
        let last = tampered.pop();
        tampered.push(if last == Some('0') { '1' } else { '0' });
        assert!(s.open("jwt_secret", &tampered).is_err());
        assert_eq!(s.open("jwt_secret", "plain-old").unwrap(), "plain-old");
        assert_eq!(Sealer::new("").seal("n", "v"), "v");
    }
}
