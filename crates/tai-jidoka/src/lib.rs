//! tai-jidoka: layer 3, `processor_sup`.
//!
//! Owns `engine_sup`, the dynamic supervisor of the per tenant × SKU policy
//! engines (`engine:{tenant}:{sku}`), and the executors behind their circuit
//! breakers. Depends on tai-core, tai-otp and tai-store only; never touches
//! HTTP itself except through its executors.

use std::time::Duration;

use tai_core::names::ENGINE_SUP;
use tai_otp::{ChildSpec, Strategy, SupervisorSpec};

/// `processor_sup` (`rest_for_one`): `engine_sup` first, so that anything
/// started after it (breakers, executors) restarts with it.
pub fn supervisor_spec(max_active_engines: usize) -> SupervisorSpec {
    SupervisorSpec::new(Strategy::RestForOne)
        .intensity(5, Duration::from_secs(10))
        .child(ChildSpec::supervisor(
            ENGINE_SUP,
            engine_sup_spec(max_active_engines),
        ))
}

/// `engine_sup`: one transient child per tenant × SKU, started on demand.
/// A crashed engine restarts alone; a passivated one (a normal stop) is removed.
pub fn engine_sup_spec(max_active_engines: usize) -> SupervisorSpec {
    SupervisorSpec::new(Strategy::SimpleOneForOne)
        .intensity(100, Duration::from_secs(10))
        .max_children(max_active_engines)
}
