//! Faults: reprobe (see docs/resilience.md).

#[allow(unused_imports)]
use crate::common::*;
