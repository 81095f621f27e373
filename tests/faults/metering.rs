//! Faults: metering (see docs/resilience.md).

#[allow(unused_imports)]
use crate::common::*;
