//! Attacks on upstream: see docs/security.md.
