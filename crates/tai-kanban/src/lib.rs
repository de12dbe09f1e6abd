//! tai-kanban: layer 2, `kanban_sup`.
//!
//! The durable work queue between ingress and the policy engines: the
//! embedded sled-backed queue (`kanban_queue`), WIP limit, per-engine prefetch,
//! fair round-robin dispatch across tenants (Heijunka), redelivery, poison
//! detection and dead letters. Depends on tai-core, tai-otp and tai-store
//! only; the only crate that will name lapin.

pub mod amqp;
pub use broker_drain::{drain_broker_queue, Drained};
mod broker_drain;
mod broker_letters;
mod dispatch;
mod poison;
mod queue;

use std::time::Duration;

use ractor::RpcReplyPort;
use tai_core::config::{KanbanConfig, QueueBackend};
use tai_core::msg::{Delivery, EnqueueOutcome, IdOrigin, RouterMsg, ENGINE_ROUTER, KANBAN_QUEUE};
use tai_core::signal::{SignalRecord, SignalStatus};
use tai_otp::{ChildSpec, Strategy, SupervisorSpec};
use tai_store::Store;

pub use dispatch::Dispatch;
pub use queue::{Queue, QueueArgs};

/// The longest a 202 waits for room in the line (`queue::Admission`).
const HOLD_MAX: Duration = Duration::from_secs(1);

/// Sends a signal to `engine_router`, found by name at send time (a
/// restarted router is found the same way). If it is down, the signal stays
/// in flight and is sent again on redelivery.
pub(crate) fn send_to_router(d: Delivery) {
    if let Some(router) = ractor::registry::where_is(ENGINE_ROUTER) {
        let _ = router.send_message(RouterMsg::Deliver(d));
    }
}

/// Whether the signal's engine runs now (it holds the signal, or will once
/// its mailbox reaches it).
pub(crate) fn engine_runs(s: &tai_core::signal::Signal) -> bool {
    ractor::registry::where_is(tai_core::names::engine_name(&s.tenant_id, &s.sku_id)).is_some()
}

/// What the store knows of an enqueued signal's id.
pub(crate) enum Known {
    /// Nothing: a new signal; the reply is given back.
    New(RpcReplyPort<EnqueueOutcome>),
    /// Still `accepted`: each backend knows when a 200 may vouch for it
    /// (the embedded queue: [`duplicate_once_durable`]).
    Accepted(SignalRecord, RpcReplyPort<EnqueueOutcome>),
    /// Answered (or to be, once durable): final already (a duplicate), or
    /// the look-up failed.
    Answered,
}

/// Looks an enqueued signal's id up in the store, and answers it if it is
/// final (once what was read is durable: [`duplicate_once_durable`]) or
/// the look-up failed. An id ingress minted is new by
/// construction (a fresh ULID: 80 random bits within its millisecond), so
/// it is not looked up: that look-up was a sled read per signal that could
/// only miss.
pub(crate) fn look_up(
    store: &Store,
    id: &(String, String),
    origin: IdOrigin,
    reply: RpcReplyPort<EnqueueOutcome>,
) -> Known {
    if origin == IdOrigin::Minted {
        return Known::New(reply);
    }
    match store.signal_record(&id.0, &id.1) {
        Ok(None) => Known::New(reply),
        Ok(Some(existing)) if existing.status == SignalStatus::Accepted => {
            Known::Accepted(existing, reply)
        }
        // Final: what was read may be a decision still in a group flush.
        Ok(Some(existing)) => {
            duplicate_once_durable(store, existing, reply);
            Known::Answered
        }
        Err(e) => {
            let _ = reply.send(EnqueueOutcome::Failed(e.to_string()));
            Known::Answered
        }
    }
}

/// Answers a duplicate once a flush begun now is done, and not at all if
/// it fails. One still `accepted` on the embedded queue may be waiting for
/// the flush that makes it durable (the queue knows a signal from the
/// moment it is staged); a final one may be a decision still in a group
/// flush, which a crash or a failed flush takes back (the signal is then
/// decided again, perhaps differently). That flush carries everything
/// staged or written before it began, so a 200 never vouches for what a
/// crash could still undo.
pub(crate) fn duplicate_once_durable(
    store: &Store,
    existing: SignalRecord,
    reply: RpcReplyPort<EnqueueOutcome>,
) {
    let store = store.clone();
    tokio::spawn(async move {
        let _ = reply.send(match store.durable().await {
            Ok(()) => EnqueueOutcome::Duplicate(existing),
            Err(e) => EnqueueOutcome::Failed(e.to_string()),
        });
    });
}

/// The queue's depth, in-flight and parked gauges, looked up once per queue actor
/// (the actor sets them after every message; the metrics recorder is
/// installed before the tree starts).
pub(crate) struct QueueGauges {
    depth: metrics::Gauge,
    in_flight: metrics::Gauge,
    parked: metrics::Gauge,
}

/// Counts signals taken back from an engine to deliver again (both
/// backends' dispatchers; a poison one is dead-lettered instead).
pub(crate) fn count_redelivered(n: usize) {
    if n > 0 {
        metrics::counter!(tai_core::telemetry::QUEUE_REDELIVERED).increment(n as u64);
    }
}

impl QueueGauges {
    pub(crate) fn new() -> QueueGauges {
        // The redelivery counter is shown from the start, at 0.
        metrics::counter!(tai_core::telemetry::QUEUE_REDELIVERED).increment(0);
        QueueGauges {
            depth: metrics::gauge!(tai_core::telemetry::QUEUE_DEPTH),
            in_flight: metrics::gauge!(tai_core::telemetry::QUEUE_IN_FLIGHT),
            parked: metrics::gauge!(tai_core::telemetry::QUEUE_PARKED),
        }
    }

    pub(crate) fn set(&self, depth: u64, dispatch: &crate::Dispatch) {
        self.depth.set(depth as f64);
        self.in_flight.set(dispatch.in_flight_len() as f64);
        self.parked.set(dispatch.parked_len() as f64);
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
                visibility: Duration::from_secs(config.visibility_secs),
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
            visibility: Duration::from_secs(config.visibility_secs),
            hold_above: QueueArgs::hold_above_for(config.wip_limit),
            hold_max: HOLD_MAX,
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

    use super::{duplicate_once_durable, look_up, Known};

    fn signal(id: &str) -> Signal {
        let body =
            format!(r#"{{"id":"{id}","tenant_id":"acme","sku_id":"payments","kind":"payment"}}"#);
        tai_core::signal::parse_signal(body.as_bytes(), 1, String::new).expect("a valid signal")
    }

    async fn ask(store: &Store, id: &str, origin: IdOrigin) -> Option<EnqueueOutcome> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let key = ("acme".to_string(), id.to_string());
        match look_up(store, &key, origin, tx.into()) {
            Known::New(_) => return None,
            Known::Accepted(existing, reply) => duplicate_once_durable(store, existing, reply),
            Known::Answered => {}
        }
        Some(rx.await.expect("an answer"))
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

    /// A duplicate of a decided signal is answered 200 once the decision it
    /// read is durable, and never from a store whose flush failed: that
    /// decision may be the one the failed flush lost. Needs root.
    #[tokio::test]
    async fn a_duplicate_of_a_decided_signal_is_answered_only_from_a_durable_store() {
        let disk = tai_store::tmpfs::TmpfsStore::open("2m");
        let store = disk.store.clone();
        let decide = |id: &str| {
            let mut rec = tai_core::signal::SignalRecord::accepted(&signal(id));
            rec.status = SignalStatus::Denied;
            let writes = tai_core::msg::WriteSet {
                signal_records: vec![rec],
                ..Default::default()
            };
            store.commit(&[], None, &writes).unwrap();
        };
        decide("pay-1");
        let before = store.flushes();
        match ask(&store, "pay-1", IdOrigin::Client).await {
            Some(EnqueueOutcome::Duplicate(r)) => assert_eq!(r.status, SignalStatus::Denied),
            other => panic!("{other:?}"),
        }
        assert!(store.flushes() > before, "answered without a flush");
        decide("pay-2");
        let _ = tai_store::tmpfs::fill(&store);
        match ask(&store, "pay-2", IdOrigin::Client).await {
            Some(EnqueueOutcome::Failed(e)) => assert!(e.contains("no storage space"), "{e}"),
            other => panic!("a decision the store did not keep was vouched for: {other:?}"),
        }
    }

    /// A queue with no router (what it dispatches stays in flight), one
    /// WIP slot, and 202s held while more than 4 signals wait.
    async fn held_queue(
        store: &Store,
        hold_max: Duration,
    ) -> ractor::ActorRef<tai_core::msg::KanbanMsg> {
        let args = super::QueueArgs {
            store: store.clone(),
            wip_limit: 1,
            prefetch: 1,
            max_depth: 1_000,
            visibility: Duration::from_secs(600),
            hold_above: 4,
            hold_max,
        };
        ractor::Actor::spawn(None, super::Queue, args)
            .await
            .expect("the queue starts")
            .0
    }

    /// A held queue with ten signals accepted: nothing waited when they came,
    /// so they were dispatched at once and answered; one is in flight and
    /// nine wait.
    async fn line_of_ten(
        hold_max: Duration,
    ) -> (
        tempfile::TempDir,
        Store,
        ractor::ActorRef<tai_core::msg::KanbanMsg>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let q = held_queue(&store, hold_max).await;
        let mut first = post(&q, (1..=10).map(|i| format!("a-{i}")));
        assert_eq!(answers(&mut first, 10).await.len(), 10);
        (dir, store, q)
    }

    /// Enqueues `ids` at once; their answers come on the returned channel.
    fn post(
        q: &ractor::ActorRef<tai_core::msg::KanbanMsg>,
        ids: impl IntoIterator<Item = String>,
    ) -> tokio::sync::mpsc::UnboundedReceiver<(String, EnqueueOutcome)> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for id in ids {
            let (q, tx) = (q.clone(), tx.clone());
            let s = signal(&id);
            tokio::spawn(async move {
                let out = ractor::call!(q, |r| tai_core::msg::KanbanMsg::Enqueue(
                    s,
                    IdOrigin::Client,
                    r
                ))
                .expect("an answer");
                let _ = tx.send((id, out));
            });
        }
        rx
    }

    async fn answers(
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, EnqueueOutcome)>,
        n: usize,
    ) -> Vec<String> {
        let mut ids = Vec::new();
        for _ in 0..n {
            let (id, out) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("answered in time")
                .expect("an answer");
            assert!(matches!(out, EnqueueOutcome::Accepted), "{id}: {out:?}");
            ids.push(id);
        }
        ids
    }

    /// Waits until the queue holds `depth` signals (every enqueue durable
    /// and in the line), then for one more flush.
    async fn settled(q: &ractor::ActorRef<tai_core::msg::KanbanMsg>, store: &Store, depth: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let stats = ractor::call!(q, tai_core::msg::KanbanMsg::Stats).unwrap();
            if stats.depth == depth {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "depth {}",
                stats.depth
            );
            tokio::task::yield_now().await;
        }
        store.durable().await.unwrap();
    }

    /// A queue restarted in the same process (killed, or by its supervisor)
    /// hands out no delivery seq its earlier incarnation did, although the
    /// blocks of what that one sent are gone (decided and dropped): engines
    /// may still hold, and acknowledge, what it sent, and an ack of a reused
    /// seq settled another signal's block (chaos soak seed 151: a replayed
    /// dead letter lost at the next crash).
    #[tokio::test]
    async fn a_restarted_queue_hands_out_no_seq_its_earlier_incarnation_did() {
        let (_dir, store, q) = line_of_ten(Duration::from_secs(30)).await;
        settled(&q, &store, 10).await;
        // One slot: each ack lets the next signal out; all ten decided.
        for seq in 1..=10 {
            q.send_message(tai_core::msg::KanbanMsg::Ack { seqs: vec![seq] })
                .unwrap();
        }
        settled(&q, &store, 0).await;
        assert!(store.pending().unwrap().is_empty());
        assert_eq!(store.last_queue_seq().unwrap(), 0, "every block dropped");
        q.kill_and_wait(None).await.unwrap();

        let q = held_queue(&store, Duration::from_secs(30)).await;
        let mut next = post(&q, ["b-1".to_string()]);
        assert_eq!(answers(&mut next, 1).await, ["b-1"]);
        let seqs: Vec<u64> = store
            .pending()
            .unwrap()
            .into_iter()
            .map(|(_, d)| d.seq)
            .collect();
        assert_eq!(seqs.len(), 1, "{seqs:?}");
        assert!(seqs[0] > 10, "seq {} handed out again", seqs[0]);
        q.kill_and_wait(None).await.unwrap();
    }

    /// A replay that comes between two enqueues of one batch, before the
    /// batch is written, keeps its signal in the queue until that signal
    /// is decided. Its seq fell between the batch's, so the batch's block
    /// spanned the replay's block of one, and an ack of the batch's later
    /// signal settled the replayed one's block instead: gone from the
    /// queue undecided, never delivered again (soak seed 198).
    #[tokio::test]
    async fn a_replay_between_two_enqueues_of_a_batch_stays_queued_until_decided() {
        use tai_core::msg::{KanbanMsg, ReplayOutcome};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.dead_letter_queued(&halted("l-1")).unwrap();
        store.durable().await.unwrap();
        let q = wide_queue(&store).await;
        // All three in the mailbox before the queue runs (this test's
        // runtime has one thread): the batch's write is scheduled behind
        // them.
        let enqueue = |id: &str| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            q.send_message(KanbanMsg::Enqueue(signal(id), IdOrigin::Client, tx.into()))
                .unwrap();
            rx
        };
        let first = enqueue("a-1");
        let (tx, replayed) = tokio::sync::oneshot::channel();
        q.send_message(KanbanMsg::Replay {
            tenant_id: "acme".into(),
            signal_id: "l-1".into(),
            reply: tx.into(),
        })
        .unwrap();
        let second = enqueue("a-2");
        for answer in [first, second] {
            assert!(matches!(answer.await.unwrap(), EnqueueOutcome::Accepted));
        }
        assert_eq!(replayed.await.unwrap(), ReplayOutcome::Queued);
        // The batch was written before the replay took its seq: each block
        // is a run of consecutive seqs.
        let blocks: Vec<(u64, u64, String)> = queued(&store);
        assert_eq!(
            blocks,
            [
                (1, 1, "a-1".into()),
                (2, 2, "l-1".into()),
                (3, 3, "a-2".into())
            ]
        );
        // Both enqueued signals decided (acknowledged, in flight: no router).
        settled(&q, &store, 3).await;
        q.send_message(KanbanMsg::Ack { seqs: vec![1, 3] }).unwrap();
        settled(&q, &store, 1).await;
        assert_eq!(queued(&store), [(2, 2, "l-1".into())]);
        q.kill_and_wait(None).await.unwrap();
    }

    /// A queue with no router and room for ten in flight.
    async fn wide_queue(store: &Store) -> ractor::ActorRef<tai_core::msg::KanbanMsg> {
        let args = super::QueueArgs {
            store: store.clone(),
            wip_limit: 10,
            prefetch: 10,
            max_depth: 1_000,
            visibility: Duration::from_secs(600),
            hold_above: 1_000,
            hold_max: Duration::from_secs(30),
        };
        ractor::Actor::spawn(None, super::Queue, args)
            .await
            .expect("the queue starts")
            .0
    }

    fn halted(id: &str) -> tai_core::signal::DeadLetter {
        tai_core::signal::DeadLetter {
            signal: signal(id),
            reason: "halted".into(),
            at_ms: 1,
        }
    }

    /// A queue's blocks (first seq), seqs and signal ids, in seq order.
    fn queued(store: &Store) -> Vec<(u64, u64, String)> {
        let mut v: Vec<_> = store
            .pending()
            .unwrap()
            .into_iter()
            .map(|(block, d)| (block, d.seq, d.signal.id.clone()))
            .collect();
        v.sort_by_key(|(_, seq, _)| *seq);
        v
    }

    /// A data dir that a build before the fix above left with a replayed
    /// signal's block inside a batch's span: recovered, acks of the
    /// batch's signals settle the batch's block, not the replayed one's,
    /// and a new signal gets a seq above all of them (the last block, the
    /// replayed one's, does not hold the highest).
    #[tokio::test]
    async fn a_block_inside_another_blocks_span_is_settled_apart() {
        use tai_core::msg::KanbanMsg;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let delivery = |seq: u64, id: &str| Delivery {
            seq,
            signal: Arc::new(signal(id)),
            redelivered: false,
        };
        store.dead_letter_queued(&halted("l-1")).unwrap();
        let staged = store
            .stage_enqueue(vec![delivery(1, "a-1"), delivery(3, "a-2")])
            .unwrap();
        store.durable_at(staged.flush).await.unwrap();
        store.replay_dead_letter("acme", "l-1", 2).unwrap().unwrap();
        store.durable().await.unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            queued(&store),
            [
                (1, 1, "a-1".into()),
                (2, 2, "l-1".into()),
                (1, 3, "a-2".into())
            ]
        );
        let q = wide_queue(&store).await;
        let mut next = post(&q, ["b-1".to_string()]);
        assert_eq!(answers(&mut next, 1).await, ["b-1"]);
        assert_eq!(queued(&store)[3], (4, 4, "b-1".into()), "a seq of its own");
        settled(&q, &store, 4).await;
        q.send_message(KanbanMsg::Ack { seqs: vec![3] }).unwrap();
        settled(&q, &store, 3).await;
        q.send_message(KanbanMsg::Ack { seqs: vec![1, 4] }).unwrap();
        settled(&q, &store, 1).await;
        assert_eq!(
            queued(&store),
            [(2, 2, "l-1".into())],
            "the replayed signal is still queued, and only it"
        );
        q.kill_and_wait(None).await.unwrap();
    }

    /// A replay answers what became of it: queued again, no such letter
    /// (replayed meanwhile), or a store that failed. The operator API
    /// answers the last with a 500 saying so, not with the 404 of a letter
    /// that is gone (it answered 404 for every failure before). Needs root
    /// (the store on a 2 MiB tmpfs of its own, filled up).
    #[tokio::test]
    async fn a_replay_tells_a_letter_gone_from_a_store_that_failed() {
        use tai_core::msg::{KanbanMsg, ReplayOutcome};
        use tai_core::signal::DeadLetter;
        let disk = tai_store::tmpfs::TmpfsStore::open("2m");
        let store = disk.store.clone();
        let letter = |id: &str| DeadLetter {
            signal: {
                let body = format!(
                    r#"{{"id":"{id}","tenant_id":"acme","sku_id":"payments","kind":"payment","payload":{{}}}}"#
                );
                tai_core::signal::parse_signal(body.as_bytes(), 1, String::new).unwrap()
            },
            reason: "halted".into(),
            at_ms: 1,
        };
        for id in ["l-1", "l-2"] {
            store.dead_letter_queued(&letter(id)).unwrap();
        }
        store.durable().await.unwrap();
        let q = held_queue(&store, Duration::from_secs(30)).await;
        let replay = |id: &str| {
            let q = q.clone();
            let id = id.to_string();
            async move {
                ractor::call!(q, |reply| KanbanMsg::Replay {
                    tenant_id: "acme".into(),
                    signal_id: id,
                    reply,
                })
                .expect("an answer")
            }
        };
        assert_eq!(replay("l-1").await, ReplayOutcome::Queued);
        assert!(
            matches!(replay("l-1").await, ReplayOutcome::NotFound(e) if e.contains("no dead letter \"l-1\"")),
            "a letter replayed already is gone"
        );
        let _ = tai_store::tmpfs::fill(&store);
        match replay("l-2").await {
            ReplayOutcome::Failed(e) => assert!(e.contains("no storage space"), "{e}"),
            other => panic!("a replay on a failed store answered {other:?}"),
        }
        q.kill_and_wait(None).await.unwrap();
    }

    /// Past what the engines take, a client's 202 waits for room in the
    /// line instead of lengthening it; the signal is durable meanwhile.
    #[tokio::test]
    async fn accepted_signals_behind_a_long_line_are_answered_when_it_shortens() {
        let (_dir, store, q) = line_of_ten(Duration::from_secs(600)).await;
        let mut second = post(&q, (1..=3).map(|i| format!("b-{i}")));
        settled(&q, &store, 13).await;
        assert!(
            second.try_recv().is_err(),
            "answered behind a line of 12 (the hold is 4)"
        );
        for id in ["b-1", "b-2", "b-3"] {
            assert_eq!(
                store.signal_record("acme", id).unwrap().map(|r| r.status),
                Some(SignalStatus::Accepted),
                "{id} is queued while its answer waits"
            );
        }
        // Each ack frees the slot and the next waiting signal takes it.
        for seq in 1..=8 {
            q.send_message(tai_core::msg::KanbanMsg::Ack { seqs: vec![seq] })
                .unwrap();
        }
        let mut got = answers(&mut second, 3).await;
        got.sort();
        assert_eq!(got, ["b-1", "b-2", "b-3"]);
        q.stop(None);
    }

    /// A held 202 goes out after `hold_max`, and at once when the queue
    /// stops or is killed (ractor runs no `post_stop` after a kill).
    #[tokio::test]
    async fn a_held_answer_waits_no_longer_than_its_bound_or_the_queue() {
        let (_dir, _store, q) = line_of_ten(Duration::from_millis(200)).await;
        let mut second = post(&q, ["b-1".to_string()]);
        answers(&mut second, 1).await;
        q.stop(None);

        let (_dir, store, q) = line_of_ten(Duration::from_secs(600)).await;
        let mut second = post(&q, ["b-1".to_string()]);
        settled(&q, &store, 11).await;
        assert!(second.try_recv().is_err(), "held");
        q.stop_and_wait(None, Some(Duration::from_secs(10)))
            .await
            .unwrap();
        answers(&mut second, 1).await;

        let (_dir, store, q) = line_of_ten(Duration::from_secs(600)).await;
        let mut second = post(&q, ["b-1".to_string()]);
        settled(&q, &store, 11).await;
        assert!(second.try_recv().is_err(), "held");
        q.kill_and_wait(Some(Duration::from_secs(10)))
            .await
            .unwrap();
        answers(&mut second, 1).await;
    }
}
