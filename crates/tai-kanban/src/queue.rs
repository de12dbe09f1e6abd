//! `kanban_queue`: owns the embedded queue. Enqueues durably (group commit)
//! before the 202, dispatches to `engine_router` by name within the WIP
//! limit, takes acks, redelivers what engines lost, dead-letters poison.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tai_core::msg::{Delivery, EnqueueOutcome, KanbanMsg, QueueStats, RouterMsg, ENGINE_ROUTER};
use tai_core::signal::{now_ms, DeadLetter};
use tai_store::Store;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::dispatch::Dispatch;

/// Attempts after which a signal that keeps killing its engine is poison.
const MAX_ATTEMPTS: u32 = 3;

#[derive(Clone, Copy, Debug)]
pub struct Queue;

pub struct QueueArgs {
    pub store: Store,
    pub wip_limit: u32,
    pub prefetch: u32,
    /// Queued signals beyond this are refused (503).
    pub max_depth: u64,
    /// In flight longer than this without an ack: sent again.
    pub visibility: Duration,
}

pub struct QueueState {
    args: QueueArgs,
    next_seq: u64,
    dispatch: Dispatch,
    /// Written but not yet durable.
    enqueuing: u64,
    ticker: tokio::task::JoinHandle<()>,
}

impl QueueState {
    fn depth(&self) -> u64 {
        self.dispatch.ready_len() + self.dispatch.in_flight_len()
    }
}

fn send_to_router(d: Delivery) {
    // Found by name at send time: a restarted router is found the same way.
    // If it is down, the signal stays in flight and is sent again on redelivery.
    if let Some(router) = ractor::registry::where_is(ENGINE_ROUTER) {
        let _ = router.send_message(RouterMsg::Deliver(d));
    }
}

impl Queue {
    fn dispatch(st: &mut QueueState) {
        let now = Instant::now();
        for d in st.dispatch.take(st.args.wip_limit, st.args.prefetch, now) {
            send_to_router(d);
        }
    }

    /// Sends again, or dead-letters as poison past the attempt limit.
    fn resend(st: &mut QueueState, again: Vec<(Delivery, u32)>) {
        for (d, attempts) in again {
            if attempts > MAX_ATTEMPTS {
                let letter = DeadLetter {
                    reason: "poison".into(),
                    at_ms: now_ms(),
                    signal: d.signal.clone(),
                };
                match st.args.store.dead_letter_queued(d.seq, &letter) {
                    Ok(()) => {
                        warn!(seq = d.seq, tenant = %d.signal.tenant_id, signal = %d.signal.id, attempts, "poison signal dead-lettered");
                        metrics::counter!(tai_core::telemetry::DEADLETTER, "reason" => "poison")
                            .increment(1);
                        st.dispatch.ack(d.seq);
                    }
                    Err(e) => {
                        warn!(error = %e, seq = d.seq, "could not dead-letter a poison signal")
                    }
                }
            } else {
                send_to_router(d);
            }
        }
    }
}

impl Actor for Queue {
    type Msg = KanbanMsg;
    type State = QueueState;
    type Arguments = QueueArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<KanbanMsg>,
        args: QueueArgs,
    ) -> Result<QueueState, ActorProcessingErr> {
        let mut dispatch = Dispatch::default();
        let pending = args.store.pending()?;
        let count = pending.len();
        for d in pending {
            dispatch.push(d);
        }
        let next_seq = args.store.last_queue_seq()? + 1;
        let ticker = myself.send_interval(Duration::from_secs(1), || KanbanMsg::Tick);
        info!(recovered = count, next_seq, "embedded queue open");
        Ok(QueueState {
            args,
            next_seq,
            dispatch,
            enqueuing: 0,
            ticker,
        })
    }

    async fn post_start(
        &self,
        _myself: ActorRef<KanbanMsg>,
        st: &mut QueueState,
    ) -> Result<(), ActorProcessingErr> {
        Self::dispatch(st);
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<KanbanMsg>,
        st: &mut QueueState,
    ) -> Result<(), ActorProcessingErr> {
        st.ticker.abort();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<KanbanMsg>,
        msg: KanbanMsg,
        st: &mut QueueState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            KanbanMsg::Enqueue(signal, reply) => {
                if st.depth() + st.enqueuing >= st.args.max_depth {
                    let _ = reply.send(EnqueueOutcome::Full(format!(
                        "queue is full ({} signals)",
                        st.args.max_depth
                    )));
                    return Ok(());
                }
                let seq = st.next_seq;
                match st.args.store.enqueue(seq, &signal) {
                    Ok(Some(existing)) => {
                        let _ = reply.send(EnqueueOutcome::Duplicate(existing));
                    }
                    Ok(None) => {
                        st.next_seq += 1;
                        st.enqueuing += 1;
                        let store = st.args.store.clone();
                        let me = myself.clone();
                        tokio::spawn(async move {
                            // The 202 waits for the group flush that carries this write.
                            let outcome = match store.durable().await {
                                Ok(()) => EnqueueOutcome::Accepted,
                                Err(e) => EnqueueOutcome::Failed(e.to_string()),
                            };
                            let _ = reply.send(outcome);
                            let _ = me.send_message(KanbanMsg::Ready(Delivery { seq, signal }));
                        });
                    }
                    Err(e) => {
                        let _ = reply.send(EnqueueOutcome::Failed(e.to_string()));
                    }
                }
            }
            KanbanMsg::Ready(d) => {
                st.enqueuing = st.enqueuing.saturating_sub(1);
                st.dispatch.push(d);
                Self::dispatch(st);
            }
            KanbanMsg::Ack { seq } => {
                if st.dispatch.ack(seq) {
                    Self::dispatch(st);
                }
            }
            KanbanMsg::Redeliver {
                tenant_id,
                sku_id,
                after_crash,
            } => {
                let again =
                    st.dispatch
                        .redeliver_engine(&tenant_id, &sku_id, after_crash, Instant::now());
                Self::resend(st, again);
                Self::dispatch(st);
            }
            KanbanMsg::RedeliverAll => {
                for d in st.dispatch.redeliver_all(Instant::now()) {
                    send_to_router(d);
                }
            }
            KanbanMsg::Tick => {
                let again = st.dispatch.expired(st.args.visibility, Instant::now());
                if !again.is_empty() {
                    warn!(
                        count = again.len(),
                        "redelivering signals in flight too long"
                    );
                }
                Self::resend(st, again);
                Self::dispatch(st);
            }
            KanbanMsg::Stats(reply) => {
                let _ = reply.send(QueueStats {
                    backend: "embedded".into(),
                    depth: st.depth(),
                    in_flight: st.dispatch.in_flight_len(),
                    wip_limit: st.args.wip_limit,
                    prefetch: st.args.prefetch,
                    deadletter: st.args.store.dead_letter_count(),
                    max_depth: st.args.max_depth,
                });
            }
            KanbanMsg::Replay {
                tenant_id,
                signal_id,
                reply,
            } => {
                let seq = st.next_seq;
                match st
                    .args
                    .store
                    .replay_dead_letter(&tenant_id, &signal_id, seq)
                {
                    Ok(Some(signal)) => {
                        st.next_seq += 1;
                        st.enqueuing += 1;
                        let store = st.args.store.clone();
                        let me = myself.clone();
                        tokio::spawn(async move {
                            let result = store.durable().await.map_err(|e| e.to_string());
                            let _ = reply.send(result);
                            let _ = me.send_message(KanbanMsg::Ready(Delivery { seq, signal }));
                        });
                    }
                    Ok(None) => {
                        let _ = reply.send(Err(format!(
                            "no dead letter {signal_id:?} for tenant {tenant_id:?}"
                        )));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.to_string()));
                    }
                }
            }
        }
        metrics::gauge!(tai_core::telemetry::QUEUE_DEPTH).set(st.depth() as f64);
        metrics::gauge!(tai_core::telemetry::QUEUE_IN_FLIGHT)
            .set(st.dispatch.in_flight_len() as f64);
        Ok(())
    }
}
