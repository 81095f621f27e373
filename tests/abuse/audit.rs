//! Attacks on audit: see docs/security.md.
