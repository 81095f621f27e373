//! Human-friendly value types for the YAML files: durations (`500ms`, `30s`,
//! `5m`) and sizes (`10MiB`). Plain integers are read as seconds / bytes.

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use std::{fmt, time::Duration};

/// A duration written as `500ms`, `30s`, `5m`, `1h` or a bare number of seconds.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct HumanDuration(pub Duration);

impl fmt::Debug for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl From<Duration> for HumanDuration {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(Self(Duration::from_secs(s))),
            Raw::Text(t) => humantime::parse_duration(t.trim())
                .map(Self)
                .map_err(|e| de::Error::custom(format!("invalid duration {t:?}: {e}"))),
        }
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// A byte size written as `10MiB`, `16KiB`, `512` (bytes).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct HumanSize(pub u64);

impl fmt::Debug for HumanSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize(self.0).display().iec())
    }
}

impl<'de> Deserialize<'de> for HumanSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(b) => Ok(Self(b)),
            Raw::Text(t) => t
                .trim()
                .parse::<bytesize::ByteSize>()
                .map(|b| Self(b.as_u64()))
                .map_err(|e| de::Error::custom(format!("invalid size {t:?}: {e}"))),
        }
    }
}

impl Serialize for HumanSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&bytesize::ByteSize(self.0).display().iec().to_string())
    }
}

/// `x` or `[x, y]`: several keys accept either a single value or a list.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> Default for OneOrMany<T> {
    fn default() -> Self {
        Self::Many(Vec::new())
    }
}

impl<T: Clone> OneOrMany<T> {
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            Self::One(v) => vec![v.clone()],
            Self::Many(v) => v.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_human_values() {
        let d: HumanDuration = serde_norway::from_str("500ms").unwrap();
        assert_eq!(d.0, Duration::from_millis(500));
        let d: HumanDuration = serde_norway::from_str("5m").unwrap();
        assert_eq!(d.0, Duration::from_secs(300));
        let d: HumanDuration = serde_norway::from_str("7").unwrap();
        assert_eq!(d.0, Duration::from_secs(7));
        let s: HumanSize = serde_norway::from_str("10MiB").unwrap();
        assert_eq!(s.0, 10 * 1024 * 1024);
        let s: HumanSize = serde_norway::from_str("16KiB").unwrap();
        assert_eq!(s.0, 16 * 1024);
        assert!(serde_norway::from_str::<HumanDuration>("soon").is_err());
        assert!(serde_norway::from_str::<HumanSize>("lots").is_err());
    }
}
