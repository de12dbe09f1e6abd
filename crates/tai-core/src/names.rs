//! Registered names: layers find each other by these at send time, as Erlang
//! processes do, so a restart never leaves a stale reference behind. And
//! the one restart intensity a layer sizes its own by.

pub const TAI_SUP: &str = "tai_sup";
pub const INGRESS_SUP: &str = "ingress_sup";
pub const KANBAN_SUP: &str = "kanban_sup";
pub const PROCESSOR_SUP: &str = "processor_sup";
pub const KAIZEN_SUP: &str = "kaizen_sup";
pub const ANDON_SUP: &str = "andon_sup";
pub const ENGINE_SUP: &str = "engine_sup";

/// How many restarts of its children `andon_sup` allows in 10 s before it
/// escalates: `engine_sup` sizes its own intensity by it, since each
/// restart of `andon_ledger` cuts off the engines waiting for a commit.
pub const ANDON_SUP_RESTARTS: u32 = 5;

/// The layers in start order (SPEC §1).
pub const LAYERS: [&str; 5] = [
    INGRESS_SUP,
    KANBAN_SUP,
    PROCESSOR_SUP,
    KAIZEN_SUP,
    ANDON_SUP,
];

/// The registered name of the policy engine of one tenant and SKU.
pub fn engine_name(tenant: &str, sku: &str) -> String {
    format!("engine:{tenant}:{sku}")
}
