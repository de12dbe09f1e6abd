//! Metric names (SPEC §9, part of the contract) and the bounded tenant label.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, RwLock};

pub const SIGNALS_RECEIVED: &str = "tai_signals_received_total";
pub const SIGNALS_PROCESSED: &str = "tai_signals_processed_total";
pub const SIGNAL_PROCESSING_SECONDS: &str = "tai_signal_processing_seconds";
pub const QUEUE_DEPTH: &str = "tai_queue_depth";
pub const QUEUE_IN_FLIGHT: &str = "tai_queue_in_flight";
/// Not in SPEC §9: connections each HTTP listener holds open, by `listener`
/// (`ingress`, `operator`); at most `node.max_connections`.
pub const HTTP_CONNECTIONS: &str = "tai_http_connections";
/// Not in SPEC §9: of those in flight, the signals engines park until entitled.
pub const QUEUE_PARKED: &str = "tai_queue_parked";
/// Not in SPEC §9: signals the queue took back from an engine to deliver
/// again (an engine or the router restarted, or a signal outlasted the
/// visibility timeout); one past the attempt limit is dead-lettered instead.
pub const QUEUE_REDELIVERED: &str = "tai_queue_redelivered_total";
/// Not in SPEC §9: space left to the node on the filesystem that holds
/// `node.data_dir` (what it may still write), and that filesystem's size.
pub const DISK_FREE: &str = "tai_disk_free_bytes";
pub const DISK_TOTAL: &str = "tai_disk_total_bytes";
/// Not in SPEC §9: how long each group flush of the store took (the queue
/// blocks it carries written, sled flushed, the log synced): the floor
/// under every 202 and every committed decision. A slow disk shows here
/// first.
pub const STORE_FLUSH_SECONDS: &str = "tai_store_flush_seconds";
pub const DEADLETTER: &str = "tai_deadletter_total";
/// Every engine, live or passive, by state (a passive one in the state
/// its checkpoint holds).
pub const ENGINE_STATE: &str = "tai_engine_state";
/// Not in SPEC §9: the engines running now; the rest are passive.
pub const ENGINES_LIVE: &str = "tai_engines_live";
pub const BREAKER_STATE: &str = "tai_breaker_state";
pub const ACTOR_RESTARTS: &str = "tai_actor_restarts_total";
pub const RECEIPTS: &str = "tai_receipts_total";
pub const ALERTS: &str = "tai_alerts_total";
pub const RATE_LIMITED: &str = "tai_rate_limited_total";

/// The `reason` of a dead letter: SPEC §5's four, and `unknown_sku` for a
/// signal whose SKU left the configuration while it waited.
pub const DEADLETTER_REASONS: [&str; 5] = [
    "halted",
    "degraded",
    "quota_exhausted",
    "poison",
    "unknown_sku",
];
/// The `scope` of a rate limit that refused a request.
pub const RATE_LIMIT_SCOPES: [&str; 2] = ["global", "tenant"];

static CAP: AtomicUsize = AtomicUsize::new(100);
static KNOWN: LazyLock<RwLock<HashSet<String>>> = LazyLock::new(|| RwLock::new(HashSet::new()));

/// Counts equal items, in first-seen order: a batch's counter increments
/// as one lookup per label value instead of one per item.
pub fn tally<K: PartialEq>(items: impl IntoIterator<Item = K>) -> Vec<(K, u64)> {
    let mut out: Vec<(K, u64)> = Vec::new();
    for k in items {
        match out.iter_mut().find(|(seen, _)| *seen == k) {
            Some((_, n)) => *n += 1,
            None => out.push((k, 1)),
        }
    }
    out
}

/// Sets how many distinct tenants get their own label (`kaizen.tenant_label_cap`).
pub fn set_tenant_label_cap(cap: usize) {
    CAP.store(cap, Ordering::SeqCst);
}

/// The `tenant` label for `tenant`: its id for the first `cap` tenants seen,
/// `other` for the rest, so series stay bounded however many tenants come.
pub fn tenant_label(tenant: &str) -> String {
    if KNOWN.read().expect("tenant labels").contains(tenant) {
        return tenant.to_string();
    }
    let mut known = KNOWN.write().expect("tenant labels");
    if known.contains(tenant) || known.len() < CAP.load(Ordering::SeqCst) {
        known.insert(tenant.to_string());
        tenant.to_string()
    } else {
        "other".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_counts_in_first_seen_order() {
        assert_eq!(
            tally(["b", "a", "b", "b", "c"]),
            [("b", 3), ("a", 1), ("c", 1)]
        );
        assert!(tally(Vec::<u8>::new()).is_empty());
    }

    #[test]
    fn tenant_labels_are_capped() {
        set_tenant_label_cap(2);
        assert_eq!(tenant_label("a"), "a");
        assert_eq!(tenant_label("b"), "b");
        assert_eq!(tenant_label("c"), "other");
        assert_eq!(tenant_label("a"), "a", "a known tenant keeps its label");
    }
}
