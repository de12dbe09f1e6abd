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

use ractor::RpcReplyPort;
use tai_core::config::{KanbanConfig, QueueBackend};
use tai_core::msg::{Delivery, EnqueueOutcome, IdOrigin, RouterMsg, ENGINE_ROUTER, KANBAN_QUEUE};
use tai_core::signal::SignalStatus;
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

/// Answers an enqueue of a signal the store already knows (a duplicate,
/// or a failed look-up) and returns `None`; gives the reply back for a new
/// one. An id ingress minted is new by construction (a fresh ULID: 80
/// random bits within its millisecond), so it is not looked up: that
/// look-up was a sled read per signal that could only miss.
///
/// A duplicate still `accepted` may be waiting for the flush that makes
/// its original durable (the queue knows a signal from the moment it is
/// staged): it is answered once a flush begun now is done, which carries
/// everything staged or written before it began, so a 200 never vouches
/// for a signal a crash could still lose.
pub(crate) fn answer_known(
    store: &Store,
    id: &(String, String),
    origin: IdOrigin,
    reply: RpcReplyPort<EnqueueOutcome>,
) -> Option<RpcReplyPort<EnqueueOutcome>> {
    if origin == IdOrigin::Minted {
        return Some(reply);
    }
    match store.signal_record(&id.0, &id.1) {
        Ok(None) => Some(reply),
        Ok(Some(existing)) if existing.status == SignalStatus::Accepted => {
            let store = store.clone();
            tokio::spawn(async move {
                let _ = reply.send(match store.durable().await {
                    Ok(()) => EnqueueOutcome::Duplicate(existing),
                    Err(e) => EnqueueOutcome::Failed(e.to_string()),
                });
            });
            None
        }
        Ok(Some(existing)) => {
            let _ = reply.send(EnqueueOutcome::Duplicate(existing));
            None
        }
        Err(e) => {
            let _ = reply.send(EnqueueOutcome::Failed(e.to_string()));
            None
        }
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tai_core::msg::{Delivery, EnqueueOutcome, IdOrigin};
    use tai_core::signal::{Signal, SignalStatus};
    use tai_store::Store;

    use super::answer_known;

    fn signal(id: &str) -> Signal {
        let body =
            format!(r#"{{"id":"{id}","tenant_id":"acme","sku_id":"payments","kind":"payment"}}"#);
        tai_core::signal::parse_signal(body.as_bytes(), 1, String::new).expect("a valid signal")
    }

    async fn ask(store: &Store, id: &str, origin: IdOrigin) -> Option<EnqueueOutcome> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let key = ("acme".to_string(), id.to_string());
        match answer_known(store, &key, origin, tx.into()) {
            Some(_) => None,
            None => Some(rx.await.expect("an answer")),
        }
    }

    #[tokio::test]
    async fn a_duplicate_of_a_staged_signal_is_answered_once_its_original_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let staged = store
            .stage_enqueue(vec![Delivery {
                seq: 1,
                signal: Arc::new(signal("pay-1")),
                redelivered: false,
            }])
            .unwrap();
        match ask(&store, "pay-1", IdOrigin::Client).await {
            Some(EnqueueOutcome::Duplicate(r)) => assert_eq!(r.status, SignalStatus::Accepted),
            other => panic!("{other:?}"),
        }
        // Answered no earlier than the flush that carries the original:
        // that flush is done already (polled once, not waited for).
        let done = tokio::time::timeout(Duration::ZERO, store.durable_at(staged.flush)).await;
        assert!(
            matches!(done, Ok(Ok(()))),
            "answered before its original was durable"
        );
        // The queue cannot tell which flush carries an original it staged
        // earlier, so the answer waits for one begun after the question,
        // even when nothing else is being written.
        let before = store.flushes();
        assert!(matches!(
            ask(&store, "pay-1", IdOrigin::Client).await,
            Some(EnqueueOutcome::Duplicate(_))
        ));
        assert!(store.flushes() > before, "answered without a flush");
        assert!(
            ask(&store, "pay-2", IdOrigin::Client).await.is_none(),
            "new"
        );
        assert!(
            ask(&store, "pay-1", IdOrigin::Minted).await.is_none(),
            "a minted id is not looked up"
        );
    }
}
