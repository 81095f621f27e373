//! Attacks on admin: see docs/security.md.
