//! `kanban_queue`: owns the embedded queue. Enqueues durably (group commit)
//! before the 202, dispatches to `engine_router` by name within the WIP
//! limit, takes acks, redelivers what engines lost, dead-letters poison.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tai_core::msg::{Delivery, EnqueueOutcome, IdOrigin, KanbanMsg, QueueStats, ReplayOutcome};
use tai_core::signal::{now_ms, DeadLetter, Signal, SignalRecord};
use tai_store::Store;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::dispatch::Dispatch;
use crate::poison::{self, Poisoned};
use crate::{send_to_router, QueueGauges};

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
    /// Admission: while more than this many durable signals wait for a WIP
    /// slot, the 202s of a new batch are held (see [`Admission`]).
    pub hold_above: u64,
    /// The longest a 202 is held.
    pub hold_max: Duration,
}

impl QueueArgs {
    /// How many waiting signals hold the 202s, for a WIP limit: enough to
    /// keep every slot refilled at once, no more.
    pub fn hold_above_for(wip_limit: u32) -> u64 {
        (2 * u64::from(wip_limit)).max(256)
    }
}

/// Demand-driven admission, as GenStage does it: a signal is accepted (202)
/// once durable, but while the line of durable signals waiting for a WIP
/// slot is longer than `hold_above`, the 202s of a new batch wait until it
/// is not (at most `hold_max`). Without it, clients past what the engines
/// decide only lengthen the line: latency and memory grow for as long as
/// the overload lasts, and a long line makes every signal dearer (its
/// memory falls out of the caches; BENCHMARKS.md, session 18). The signal
/// is durable and queued either way; only its answer waits, so each client
/// slows to the pace of the engines. The held are let go when the queue
/// stops, crashes or is killed ([`QueueState`]'s `Drop`: ractor skips
/// `post_stop` after a failure or a kill).
pub(crate) struct Admission {
    waiting: std::sync::atomic::AtomicU64,
    limit: u64,
    below: tokio::sync::Notify,
}

impl Admission {
    fn new(limit: u64) -> Admission {
        Admission {
            waiting: std::sync::atomic::AtomicU64::new(0),
            limit,
            below: tokio::sync::Notify::new(),
        }
    }

    /// The queue actor reports its line after every message.
    fn set(&self, waiting: u64) {
        use std::sync::atomic::Ordering;
        let before = self.waiting.swap(waiting, Ordering::SeqCst);
        if before > self.limit && waiting <= self.limit {
            self.below.notify_waiters();
        }
    }

    /// Lets every held answer go (the queue is gone).
    fn release(&self) {
        self.waiting.store(0, std::sync::atomic::Ordering::SeqCst);
        self.below.notify_waiters();
    }

    /// Waits until the line is no longer than the limit, or `max`.
    async fn admit(&self, max: Duration) {
        let deadline = Instant::now() + max;
        loop {
            let below = self.below.notified();
            tokio::pin!(below);
            below.as_mut().enable();
            if self.waiting.load(std::sync::atomic::Ordering::SeqCst) <= self.limit
                || tokio::time::timeout_at(deadline, below).await.is_err()
            {
                return;
            }
        }
    }
}

/// What the queue keeps of one queue block.
#[derive(Default)]
struct Block {
    /// Its last seq.
    last: u64,
    /// How many of its signals are undecided.
    open: u32,
}

impl Block {
    /// `n` more undecided signals, the last of them at `seq`.
    fn add(&mut self, seq: u64, n: usize) {
        self.last = self.last.max(seq);
        self.open += n as u32;
    }
}

pub struct QueueState {
    args: QueueArgs,
    next_seq: u64,
    dispatch: Dispatch,
    /// Written but not yet durable.
    enqueuing: u64,
    /// Enqueues waiting for the next block write, and their ids.
    buffer: Vec<(Delivery, RpcReplyPort<EnqueueOutcome>)>,
    buffered_ids: HashSet<(String, String)>,
    /// Duplicates of buffered signals: answered once the block is durable.
    buffered_dups: Vec<(RpcReplyPort<EnqueueOutcome>, SignalRecord)>,
    /// Queue blocks (by first seq): their last seq and how many of their
    /// signals are undecided.
    blocks: BTreeMap<u64, Block>,
    ticker: tokio::task::JoinHandle<()>,
    quiescing: bool,
    quiesce_waiters: Vec<RpcReplyPort<u64>>,
    gauges: QueueGauges,
    admission: std::sync::Arc<Admission>,
}

/// Runs however the actor ends: ractor drops the state after `post_stop`,
/// and also when `handle` failed or panicked, or the actor was killed, where
/// it skips `post_stop`. The held answers are of durable signals: they must
/// not wait out `hold_max` behind a queue that is gone.
impl Drop for QueueState {
    fn drop(&mut self) {
        self.ticker.abort();
        self.admission.release();
    }
}

impl QueueState {
    fn depth(&self) -> u64 {
        self.dispatch.ready_len() + self.dispatch.in_flight_len()
    }

    fn answer_quiesce(&mut self) {
        if self.quiescing && self.dispatch.working_len() == 0 {
            // Only parked signals left: they are delivered again at the next start.
            for w in self.quiesce_waiters.drain(..) {
                let _ = w.send(self.dispatch.parked_len());
            }
        }
    }

    /// One signal of the block holding `seq` is done; the block goes with its last.
    fn settle(&mut self, seq: u64) {
        // The nearest block at or before `seq` that reaches it. A block is
        // a run of consecutive seqs, except in a data dir written before
        // replays took a seq of their own between two enqueues of one
        // batch: there a replayed signal's block of one lies inside the
        // batch's span, and the nearest block alone was the wrong one (an
        // ack of the batch's next signal dropped the replayed signal's
        // block, so it was lost at the next start: soak seed 198).
        let Some((&block, b)) = self
            .blocks
            .range_mut(..=seq)
            .rev()
            .find(|(_, b)| b.last >= seq)
        else {
            return;
        };
        b.open = b.open.saturating_sub(1);
        if b.open == 0 {
            tracing::trace!(
                block,
                seq,
                "every signal of a queue block is settled: dropped"
            );
            self.blocks.remove(&block);
            if let Err(e) = self.args.store.remove_block(block) {
                // Harmless: a spent block left behind is dropped at the next start.
                warn!(error = %e, block, "could not drop a spent queue block");
            }
        }
    }
}

impl Queue {
    fn dispatch(st: &mut QueueState) {
        if st.quiescing {
            return;
        }
        let now = Instant::now();
        for d in st.dispatch.take(st.args.wip_limit, st.args.prefetch, now) {
            send_to_router(d);
        }
    }

    /// Sends again, or dead-letters as poison past the attempt limit: the
    /// dead letter and its receipt are one ledger commit; the queue entry
    /// goes once that is durable.
    fn resend(myself: &ActorRef<KanbanMsg>, st: &mut QueueState, again: Vec<(Delivery, u32)>) {
        for (d, attempts) in again {
            if attempts <= MAX_ATTEMPTS {
                send_to_router(d);
                continue;
            }
            // Out of flight now, so it is neither resent nor counted twice.
            st.dispatch.ack(d.seq);
            warn!(seq = d.seq, tenant = %d.signal.tenant_id, signal = %d.signal.id, attempts, "poison signal: dead-lettering");
            let (store, me, seq) = (st.args.store.clone(), myself.clone(), d.seq);
            let s = std::sync::Arc::unwrap_or_clone(d.signal);
            let p = Poisoned {
                tenant_id: s.tenant_id.clone(),
                sku_id: s.sku_id.clone(),
                signal_id: Some(s.id.clone()),
                trace_id: s.trace_id.clone(),
                reason: "poison".into(),
                letter: Some(DeadLetter {
                    reason: "poison".into(),
                    at_ms: now_ms(),
                    signal: s,
                }),
            };
            tokio::spawn(async move {
                match poison::commit(&store, p).await {
                    Ok(written) => {
                        if written {
                            metrics::counter!(tai_core::telemetry::DEADLETTER, "reason" => "poison")
                                .increment(1);
                        } else {
                            info!(
                                seq,
                                "a poison signal was decided meanwhile; not dead-lettered"
                            );
                        }
                        let _ = me.send_message(KanbanMsg::Backend(Box::new(Settled(seq))));
                    }
                    // Still in its queue block: delivered again at the next start.
                    Err(e) => warn!(error = %e, seq, "could not dead-letter a poison signal"),
                }
            });
        }
    }
}

/// Internal: a poison signal's dead letter is durable; its queue entry may go.
struct Settled(u64);

impl Queue {
    /// Checks and buffers one enqueue; the first of a batch schedules the
    /// block write behind everything already in the mailbox.
    fn enqueue(
        myself: &ActorRef<KanbanMsg>,
        st: &mut QueueState,
        signal: Signal,
        origin: IdOrigin,
        reply: RpcReplyPort<EnqueueOutcome>,
    ) -> Result<(), ActorProcessingErr> {
        let id = (signal.tenant_id.clone(), signal.id.clone());
        if st.buffered_ids.contains(&id) {
            st.buffered_dups
                .push((reply, SignalRecord::accepted(&signal)));
            return Ok(());
        }
        let mut orphan = false;
        let reply = match crate::look_up(&st.args.store, &id, origin, reply) {
            crate::Known::New(reply) => reply,
            // Recorded on the amqp queue this data dir last ran on, and not
            // held here: the retry brings the signal, so it is queued now
            // (a copy the broker still holds is a duplicate of its decision).
            crate::Known::Accepted(_, reply) if st.args.store.take_orphan(&id.0, &id.1) => {
                orphan = true;
                reply
            }
            crate::Known::Accepted(existing, reply) => {
                crate::duplicate_once_durable(&st.args.store, existing, reply);
                return Ok(());
            }
            crate::Known::Answered => return Ok(()),
        };
        // After the duplicate checks: a known signal is answered as such
        // even when the queue is full.
        let waiting = st.depth() + st.enqueuing + st.buffer.len() as u64;
        if waiting >= st.args.max_depth {
            if orphan {
                // Still in no queue here: its next retry is queued.
                st.args.store.add_orphan(id);
            }
            let _ = reply.send(EnqueueOutcome::Full(format!(
                "queue is full ({} signals)",
                st.args.max_depth
            )));
            return Ok(());
        }
        if st.buffer.is_empty() {
            myself.send_message(KanbanMsg::FlushEnqueues)?;
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        st.buffered_ids.insert(id);
        st.buffer.push((
            Delivery {
                seq,
                signal: std::sync::Arc::new(signal),
                redelivered: false,
            },
            reply,
        ));
        Ok(())
    }

    /// Stages the buffered enqueues for the next group flush, which writes
    /// them (with whatever else it carries) as one queue block; each is
    /// answered (202 or 503) once that flush is done, a 202 later if the
    /// batch joins a long line ([`Admission`]).
    ///
    /// When nothing waits to be dispatched, they are dispatched at once
    /// rather than after that flush: a decision is durable only with a
    /// flush that begins after it is written, and every flush writes the
    /// blocks staged before it began, so no decision is ever durable
    /// without its signal's block (a crash in between loses both, or keeps
    /// the block and the signal is delivered again). An engine can then
    /// decide a signal while its block's flush runs, and the decision rides
    /// the next flush instead of the one after it. A signal may so be
    /// decided before its 202 is sent; if that flush fails, the client gets
    /// an error and its retry is a duplicate. With a backlog, dispatching
    /// early would only lengthen the line (and make ledger batches
    /// smaller), so they join it once durable, behind what waits.
    fn write_block(myself: &ActorRef<KanbanMsg>, st: &mut QueueState) {
        let buffered = std::mem::take(&mut st.buffer);
        st.buffered_ids.clear();
        let dups = std::mem::take(&mut st.buffered_dups);
        let (deliveries, replies): (Vec<Delivery>, Vec<_>) = buffered.into_iter().unzip();
        let n = deliveries.len();
        if let Some(last) = deliveries.last() {
            st.args.store.note_queue_seq(last.seq);
        }
        // Nothing staged only when nothing was buffered, and a duplicate is
        // only ever buffered behind its original: no reply is dropped here.
        let Some(staged) = st.args.store.stage_enqueue(deliveries.clone()) else {
            return;
        };
        if let Some(last) = deliveries.last() {
            st.blocks.entry(staged.block).or_default().add(last.seq, n);
        }
        // Early only behind nothing: a tenant's signals keep their order.
        let early = st.enqueuing == 0 && st.dispatch.ready_len() == 0;
        let late = if early {
            for d in deliveries {
                st.dispatch.push(d);
            }
            Self::dispatch(st);
            None
        } else {
            st.enqueuing += n as u64;
            Some((myself.clone(), deliveries))
        };
        let store = st.args.store.clone();
        let (admission, hold_max) = (st.admission.clone(), st.args.hold_max);
        tokio::spawn(async move {
            let durable = store
                .durable_at(staged.flush)
                .await
                .map_err(|e| e.to_string());
            // To the dispatcher before the 202s: a client's next signal,
            // sent after this 202, then reaches it after this one, even if
            // this thread is preempted in between.
            if let Some((me, deliveries)) = late {
                let _ = me.send_message(KanbanMsg::Ready(deliveries));
                // Behind a line: the 202s wait for room in it.
                if durable.is_ok() {
                    admission.admit(hold_max).await;
                }
            }
            for reply in replies {
                let _ = reply.send(match &durable {
                    Ok(()) => EnqueueOutcome::Accepted,
                    Err(e) => EnqueueOutcome::Failed(e.clone()),
                });
            }
            for (reply, record) in dups {
                let _ = reply.send(match &durable {
                    Ok(()) => EnqueueOutcome::Duplicate(record),
                    Err(e) => EnqueueOutcome::Failed(e.clone()),
                });
            }
        });
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
        // What an earlier incarnation staged for the group flush is written
        // by the flusher, not by the queue, and its clients get their 202
        // when that flush is done: wait for a flush begun now, which writes
        // it, so that it is read back below (and numbered after). Else it
        // would wait undecided until the next start, and a new signal could
        // take one of its seqs. On a failed store nothing more is written:
        // what is on disk is all there is.
        if let Err(e) = args.store.durable().await {
            warn!(error = %e, "the store failed: the queue starts from what it holds");
        }
        let pending = args.store.pending()?;
        let count = pending.len();
        let mut blocks: BTreeMap<u64, Block> = BTreeMap::new();
        for (block, mut d) in pending {
            blocks.entry(block).or_default().add(d.seq, 1);
            // Undecided by construction (acks commit with decisions), but
            // checked again: recovery is where a bug would double-decide.
            d.redelivered = true;
            dispatch.push(d);
        }
        // Past what an earlier incarnation in this process handed out.
        let next_seq = args.store.next_queue_seq()?;
        let ticker = myself.send_interval(Duration::from_secs(1), || KanbanMsg::Tick);
        info!(
            recovered = count,
            next_seq,
            hold_above = args.hold_above,
            "embedded queue open"
        );
        let admission = std::sync::Arc::new(Admission::new(args.hold_above));
        Ok(QueueState {
            args,
            next_seq,
            dispatch,
            enqueuing: 0,
            buffer: Vec::new(),
            buffered_ids: HashSet::new(),
            buffered_dups: Vec::new(),
            blocks,
            ticker,
            quiescing: false,
            quiesce_waiters: Vec::new(),
            gauges: QueueGauges::new(),
            admission,
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

    async fn handle(
        &self,
        myself: ActorRef<KanbanMsg>,
        msg: KanbanMsg,
        st: &mut QueueState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            KanbanMsg::Enqueue(signal, origin, reply) => {
                Self::enqueue(&myself, st, signal, origin, reply)?
            }
            KanbanMsg::FlushEnqueues => Self::write_block(&myself, st),
            KanbanMsg::Ready(ds) => {
                st.enqueuing = st.enqueuing.saturating_sub(ds.len() as u64);
                for d in ds {
                    st.dispatch.push(d);
                }
                Self::dispatch(st);
            }
            KanbanMsg::Ack { seqs } => {
                let mut freed = false;
                for seq in seqs {
                    if st.dispatch.ack(seq) {
                        st.settle(seq);
                        freed = true;
                    }
                }
                if freed {
                    Self::dispatch(st);
                }
                st.answer_quiesce();
            }
            KanbanMsg::Park { seqs } => {
                // Their WIP slots are free for other engines' signals.
                st.dispatch.park(&seqs);
                Self::dispatch(st);
                st.answer_quiesce();
            }
            KanbanMsg::Unpark { seqs } => st.dispatch.unpark(&seqs, Instant::now()),
            KanbanMsg::Quiesce(reply) => {
                if !st.quiescing {
                    info!(
                        in_flight = st.dispatch.in_flight_len(),
                        "embedded queue quiescing: dispatching no more"
                    );
                }
                st.quiescing = true;
                st.quiesce_waiters.push(reply);
                st.answer_quiesce();
            }
            KanbanMsg::Backend(any) => {
                if let Ok(settled) = any.downcast::<Settled>() {
                    st.settle(settled.0);
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
                Self::resend(&myself, st, again);
                Self::dispatch(st);
            }
            KanbanMsg::RedeliverAll => {
                for d in st.dispatch.redeliver_all(Instant::now()) {
                    send_to_router(d);
                }
            }
            KanbanMsg::Tick => {
                let again =
                    st.dispatch
                        .expired(st.args.visibility, Instant::now(), crate::engine_runs);
                if !again.is_empty() {
                    warn!(
                        count = again.len(),
                        "redelivering signals in flight too long"
                    );
                }
                Self::resend(&myself, st, again);
                Self::dispatch(st);
            }
            KanbanMsg::Stats(reply) => {
                let _ = reply.send(QueueStats {
                    backend: "embedded".into(),
                    depth: st.depth(),
                    in_flight: st.dispatch.in_flight_len(),
                    parked: st.dispatch.parked_len(),
                    wip_limit: st.args.wip_limit,
                    prefetch: st.args.prefetch,
                    deadletter: st.args.store.dead_letter_count(),
                    max_depth: st.args.max_depth,
                    not_ready: None,
                    broker: None,
                });
            }
            KanbanMsg::Replay {
                tenant_id,
                signal_id,
                reply,
            } => {
                // Enqueues buffered before it are staged first, so that its
                // seq does not fall inside their block: every block stays a
                // run of consecutive seqs.
                if !st.buffer.is_empty() {
                    Self::write_block(&myself, st);
                }
                let seq = st.next_seq;
                st.args.store.note_queue_seq(seq);
                match st
                    .args
                    .store
                    .replay_dead_letter(&tenant_id, &signal_id, seq)
                {
                    Ok(Some(signal)) => {
                        debug!(seq, tenant = %tenant_id, signal = %signal_id, "a dead letter replayed into the queue");
                        st.next_seq += 1;
                        st.enqueuing += 1;
                        st.blocks.insert(seq, Block { last: seq, open: 1 });
                        let store = st.args.store.clone();
                        let me = myself.clone();
                        tokio::spawn(async move {
                            let outcome = match store.durable().await {
                                Ok(()) => ReplayOutcome::Queued,
                                Err(e) => ReplayOutcome::Failed(e.to_string()),
                            };
                            let _ = me.send_message(KanbanMsg::Ready(vec![Delivery {
                                seq,
                                signal,
                                redelivered: false,
                            }]));
                            let _ = reply.send(outcome);
                        });
                    }
                    Ok(None) => {
                        let _ = reply.send(ReplayOutcome::NotFound(format!(
                            "no dead letter {signal_id:?} for tenant {tenant_id:?}"
                        )));
                    }
                    Err(e) => {
                        let _ = reply.send(ReplayOutcome::Failed(e.to_string()));
                    }
                }
            }
        }
        st.gauges.set(st.depth(), &st.dispatch);
        st.admission.set(st.dispatch.ready_len());
        Ok(())
    }
}
