//! tai-kanban: layer 2, `kanban_sup`.
//!
//! The durable work queue between ingress and the policy engines: the
//! embedded sled-backed queue (`kanban_queue`), WIP limit, per-engine prefetch,
//! fair round-robin dispatch across tenants (Heijunka), redelivery, poison
//! detection and dead letters. Depends on tai-core, tai-otp and tai-store
//! only; the only crate that will name lapin.

pub mod amqp;
mod dispatch;
mod poison;
mod queue;

use std::time::Duration;

use tai_core::config::{KanbanConfig, QueueBackend};
use tai_core::msg::{Delivery, EnqueueOutcome, IdOrigin, RouterMsg, ENGINE_ROUTER, KANBAN_QUEUE};
use tai_otp::{ChildSpec, Strategy, SupervisorSpec};
use tai_store::Store;

pub use dispatch::Dispatch;
pub use queue::{Queue, QueueArgs};

/// How long an engine may hold a signal without deciding it before it is
/// sent again.
const VISIBILITY: Duration = Duration::from_secs(60);

/// Sends a signal to `engine_router`, found by name at send time (a
/// restarted router is found the same way). If it is down, the signal stays
/// in flight and is sent again on redelivery.
pub(crate) fn send_to_router(d: Delivery) {
    if let Some(router) = ractor::registry::where_is(ENGINE_ROUTER) {
        let _ = router.send_message(RouterMsg::Deliver(d));
    }
}

/// The answer to an enqueue of a signal the store already knows (a
/// duplicate, or a failed look-up), or `None` for a new one. An id ingress
/// minted is new by construction (a fresh ULID: 80 random bits within its
/// millisecond), so it is not looked up: that look-up was a sled read per
/// signal that could only miss.
pub(crate) fn known(
    store: &Store,
    id: &(String, String),
    origin: IdOrigin,
) -> Option<EnqueueOutcome> {
    if origin == IdOrigin::Minted {
        return None;
    }
    match store.signal_record(&id.0, &id.1) {
        Ok(Some(existing)) => Some(EnqueueOutcome::Duplicate(existing)),
        Ok(None) => None,
        Err(e) => Some(EnqueueOutcome::Failed(e.to_string())),
    }
}

/// The queue's depth and in-flight gauges, looked up once per queue actor
/// (the actor sets them after every message; the metrics recorder is
/// installed before the tree starts).
pub(crate) struct QueueGauges {
    depth: metrics::Gauge,
    in_flight: metrics::Gauge,
}

impl QueueGauges {
    pub(crate) fn new() -> QueueGauges {
        QueueGauges {
            depth: metrics::gauge!(tai_core::telemetry::QUEUE_DEPTH),
            in_flight: metrics::gauge!(tai_core::telemetry::QUEUE_IN_FLIGHT),
        }
    }

    pub(crate) fn set(&self, depth: u64, in_flight: u64) {
        self.depth.set(depth as f64);
        self.in_flight.set(in_flight as f64);
    }
}

/// `kanban_sup`: the queue owner, on the configured backend. (`rest_for_one`:
/// what is added after it depends on it.)
pub fn supervisor_spec(store: Store, config: KanbanConfig) -> SupervisorSpec {
    let sup = SupervisorSpec::new(Strategy::RestForOne).intensity(5, Duration::from_secs(10));
    if config.backend == QueueBackend::Amqp {
        return sup.child(ChildSpec::worker(
            KANBAN_QUEUE,
            Some(KANBAN_QUEUE.to_string()),
            amqp::AmqpQueue,
            move || amqp::AmqpArgs {
                store: store.clone(),
                config: config.clone(),
                visibility: VISIBILITY,
            },
        ));
    }
    sup.child(ChildSpec::worker(
        KANBAN_QUEUE,
        Some(KANBAN_QUEUE.to_string()),
        Queue,
        move || QueueArgs {
            store: store.clone(),
            wip_limit: config.wip_limit,
            prefetch: config.prefetch,
            max_depth: config.max_depth,
            visibility: VISIBILITY,
        },
    ))
}
