//! tai-kanban: layer 2, `kanban_sup`.
//!
//! The durable work queue between ingress and the policy engines, with WIP
//! limit, prefetch, fair per-tenant dispatch and dead letters. Depends on
//! tai-core, tai-otp and tai-store only; the only crate that will name lapin.

use std::time::Duration;

use tai_otp::{Strategy, SupervisorSpec};

/// The layer supervisor's spec: the queue owner first, then the dispatcher
/// that depends on it (`rest_for_one`).
pub fn supervisor_spec() -> SupervisorSpec {
    SupervisorSpec::new(Strategy::RestForOne).intensity(5, Duration::from_secs(10))
}
