//! Every live engine's current state, published by the engines themselves
//! (like a public ETS table) so that introspection (`/admin/tree`, metrics)
//! reads it without a round trip through thousands of mailboxes.

use std::collections::HashMap;
use std::sync::{LazyLock, RwLock};

use tai_core::signal::EngineState;

static STATES: LazyLock<RwLock<HashMap<String, EngineState>>> =
    LazyLock::new(|| RwLock::new(HashMap::new()));

fn gauge(state: EngineState, delta: f64) {
    metrics::gauge!(tai_core::telemetry::ENGINE_STATE, "state" => state.as_str()).increment(delta);
}

pub(crate) fn publish(name: &str, state: EngineState) {
    let mut map = STATES.write().expect("engine states");
    match map.insert(name.to_string(), state) {
        Some(old) if old == state => {}
        Some(old) => {
            gauge(old, -1.0);
            gauge(state, 1.0);
        }
        None => gauge(state, 1.0),
    }
}

pub(crate) fn forget(name: &str) {
    if let Some(old) = STATES.write().expect("engine states").remove(name) {
        gauge(old, -1.0);
    }
}

/// Forgets the engines no longer running: killed with their supervisor
/// (ractor kills a subtree without `post_stop`), they left their last
/// state here, and `tai_engine_state` and the board counted them as live
/// until each started again.
pub(crate) fn retain_running() {
    let mut map = STATES.write().expect("engine states");
    map.retain(|name, state| {
        let running = ractor::registry::where_is(name.clone()).is_some();
        if !running {
            gauge(*state, -1.0);
        }
        running
    });
}

/// The state of the live engine registered as `name`.
pub fn engine_state(name: &str) -> Option<EngineState> {
    STATES.read().expect("engine states").get(name).copied()
}

/// How many live engines are in each state.
pub fn state_counts() -> HashMap<EngineState, usize> {
    let mut out = HashMap::new();
    for s in STATES.read().expect("engine states").values() {
        *out.entry(*s).or_default() += 1;
    }
    out
}
