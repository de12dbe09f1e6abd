//! tai-kaizen: layer 4, `kaizen_sup`.
//!
//! Measurement: Prometheus metrics, traces and the bottleneck report.
//! Depends on tai-core, tai-otp and tai-store only.

use std::time::Duration;

use tai_otp::{Strategy, SupervisorSpec};

pub fn supervisor_spec() -> SupervisorSpec {
    SupervisorSpec::new(Strategy::OneForOne).intensity(5, Duration::from_secs(10))
}
