//! tai-ingress: layer 1, `ingress_sup`.
//!
//! Receives signed signals over HTTP and hands them to the Kanban layer by
//! registered name. Depends on tai-core, tai-otp and tai-store only; never on
//! another layer crate.

pub mod http;

use std::time::Duration;

use tai_otp::{Strategy, SupervisorSpec};

/// The layer supervisor's spec. Its workers (the public HTTP listener, the
/// replay cache, the rate limiter) are children added here as they land.
pub fn supervisor_spec() -> SupervisorSpec {
    SupervisorSpec::new(Strategy::OneForOne).intensity(5, Duration::from_secs(10))
}
