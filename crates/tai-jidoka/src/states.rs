//! Every engine's current state, live or passive, kept for introspection
//! (`tai_engine_state`, the board, `/admin/tree`) so that it reads it
//! without a round trip through thousands of mailboxes (like a public ETS
//! table). A live engine publishes its own; one that stops (passivated, or
//! with the node) stays counted in the state it stopped in, which its
//! checkpoint holds; and at the router's start its scan of the checkpoints
//! counts the passive engines this process has not seen.

use std::collections::HashMap;
use std::sync::{LazyLock, RwLock};

use tai_core::signal::EngineState;

/// An engine's last known state, and whether it runs now.
#[derive(Clone, Copy)]
struct Known {
    state: EngineState,
    live: bool,
}

static STATES: LazyLock<RwLock<HashMap<String, Known>>> =
    LazyLock::new(|| RwLock::new(HashMap::new()));

fn gauge(state: EngineState, delta: f64) {
    metrics::gauge!(tai_core::telemetry::ENGINE_STATE, "state" => state.as_str()).increment(delta);
}

fn live_gauge(delta: f64) {
    metrics::gauge!(tai_core::telemetry::ENGINES_LIVE).increment(delta);
}

/// The engine registered as `name` runs, in `state`.
pub(crate) fn publish(name: &str, state: EngineState) {
    let mut map = STATES.write().expect("engine states");
    match map.get_mut(name) {
        Some(known) => {
            if known.state != state {
                gauge(known.state, -1.0);
                gauge(state, 1.0);
            }
            if !known.live {
                live_gauge(1.0);
            }
            *known = Known { state, live: true };
        }
        None => {
            gauge(state, 1.0);
            live_gauge(1.0);
            map.insert(name.to_string(), Known { state, live: true });
        }
    }
}

/// The engine stopped: passive, it stays counted in the state it stopped
/// in, the one its checkpoint holds and its next start restores.
pub(crate) fn stopped(name: &str) {
    if let Some(known) = STATES.write().expect("engine states").get_mut(name) {
        if known.live {
            known.live = false;
            live_gauge(-1.0);
        }
    }
}

/// Passive engines read from their checkpoints (the router's start scan),
/// counted unless known already: one known has started or stopped since
/// its checkpoint was read, and knows better.
pub(crate) fn found_passive(found: Vec<(String, EngineState)>) {
    let mut map = STATES.write().expect("engine states");
    for (name, state) in found {
        map.entry(name).or_insert_with(|| {
            gauge(state, 1.0);
            Known { state, live: false }
        });
    }
}

/// Forgets the engines counted live that no longer run: killed with their
/// supervisor (ractor kills a subtree without `post_stop`), they left the
/// state they died in, perhaps ahead of their checkpoint. The router's
/// start scan, which follows, counts them again from their checkpoints.
pub(crate) fn retain_running() {
    let mut map = STATES.write().expect("engine states");
    map.retain(|name, known| {
        if !known.live {
            return true;
        }
        let running = ractor::registry::where_is(name.clone()).is_some();
        if !running {
            gauge(known.state, -1.0);
            live_gauge(-1.0);
        }
        running
    });
}

/// The state of the live engine registered as `name`.
pub fn engine_state(name: &str) -> Option<EngineState> {
    let map = STATES.read().expect("engine states");
    map.get(name).filter(|k| k.live).map(|k| k.state)
}

/// How many engines, live or passive, are in each state, and how many of
/// them run now: one pass under one lock, so the two agree.
pub fn state_counts() -> (HashMap<EngineState, usize>, usize) {
    let mut by_state = HashMap::new();
    let mut live = 0;
    for known in STATES.read().expect("engine states").values() {
        *by_state.entry(known.state).or_default() += 1;
        live += usize::from(known.live);
    }
    (by_state, live)
}
