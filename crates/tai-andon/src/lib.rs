//! tai-andon: layer 5, `andon_sup`.
//!
//! The signed, hash-chained receipt ledger, the audit log, alert routing and
//! the board feed. Depends on tai-core, tai-otp and tai-store only.

use std::time::Duration;

use tai_otp::{Strategy, SupervisorSpec};

pub fn supervisor_spec() -> SupervisorSpec {
    SupervisorSpec::new(Strategy::OneForOne).intensity(5, Duration::from_secs(10))
}
