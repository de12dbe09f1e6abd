//! tai-kanban: layer 2, `kanban_sup`.
//!
//! The durable work queue between ingress and the policy engines: the
//! embedded sled-backed queue (`kanban_queue`), WIP limit, per-engine prefetch,
//! fair round-robin dispatch across tenants (Heijunka), redelivery, poison
//! detection and dead letters. Depends on tai-core, tai-otp and tai-store
//! only; the only crate that will name lapin.

mod dispatch;
mod queue;

use std::time::Duration;

use tai_core::config::KanbanConfig;
use tai_core::msg::KANBAN_QUEUE;
use tai_otp::{ChildSpec, Strategy, SupervisorSpec};
use tai_store::Store;

pub use dispatch::Dispatch;
pub use queue::{Queue, QueueArgs};

/// `kanban_sup`: the queue owner. (`rest_for_one`: what is added after it
/// depends on it.)
pub fn supervisor_spec(store: Store, config: KanbanConfig) -> SupervisorSpec {
    SupervisorSpec::new(Strategy::RestForOne)
        .intensity(5, Duration::from_secs(10))
        .child(ChildSpec::worker(
            KANBAN_QUEUE,
            Some(KANBAN_QUEUE.to_string()),
            Queue,
            move || QueueArgs {
                store: store.clone(),
                wip_limit: config.wip_limit,
                prefetch: config.prefetch,
                max_depth: config.max_depth,
                visibility: Duration::from_secs(60),
            },
        ))
}
