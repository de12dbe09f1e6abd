//! Messages between layers. Layers never hold each other's actor refs: they
//! look up the registered name (`names`) when they send.

use std::sync::Arc;

use ractor::RpcReplyPort;
use serde::{Deserialize, Serialize};

use crate::receipt::ReceiptDraft;
use crate::signal::{DeadLetter, EngineInfo, Signal, SignalRecord};

/// Registered names of the workers that receive these messages.
pub const KANBAN_QUEUE: &str = "kanban_queue";
pub const ENGINE_ROUTER: &str = "engine_router";
pub const ANDON_LEDGER: &str = "andon_ledger";
pub const ANDON_ALERTS: &str = "andon_alerts";
pub const INGRESS_HTTP: &str = "ingress_http";

/// One queued signal handed out for a decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub seq: u64,
    /// Shared: the queue keeps what it sent in flight (to send again) while
    /// an engine decides it, and a copy would cost every string again.
    pub signal: Arc<Signal>,
    /// Sent before (after a restart or a lost engine): it may already be
    /// decided, so the engine checks the store before deciding it.
    #[serde(default, skip_serializing)]
    pub redelivered: bool,
}

#[derive(Debug, Clone)]
pub enum EnqueueOutcome {
    /// Durable; the 202 may be sent.
    Accepted,
    /// That tenant already sent this id.
    Duplicate(SignalRecord),
    /// The queue is at its bound, or draining.
    Full(String),
    Failed(String),
}

/// What became of a dead letter's replay (`KanbanMsg::Replay`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// Its letter is gone and its signal queued again, durably.
    Queued,
    /// No such letter (replayed meanwhile).
    NotFound(String),
    /// The store refused the write or could not make it durable: the
    /// replay may or may not have happened (the node stops on a failed
    /// store; after its restart the letter is either still listed or its
    /// signal decided).
    Failed(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueStats {
    pub backend: String,
    pub depth: u64,
    pub in_flight: u64,
    /// Of `in_flight`, those their engines hold until entitled.
    #[serde(default)]
    pub parked: u64,
    pub wip_limit: u32,
    pub prefetch: u32,
    pub deadletter: u64,
    pub max_depth: u64,
    /// Why the queue cannot take work now (broker unreachable), for `/ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready: Option<String>,
    /// The amqp backend: broker link and fallback buffer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerStats>,
}

/// What `GET /admin/queue` shows of the RabbitMQ link.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrokerStats {
    /// `connected`, `connecting` or `closed`.
    pub connection: String,
    pub queue: String,
    pub queue_type: String,
    /// Messages ready in the broker's queue (last probe, at most 1 s old).
    pub broker_depth: Option<u64>,
    /// Signals written to the local fallback buffer and not yet published.
    pub buffered: u64,
    pub buffer_max: u64,
    pub consumer_tag: Option<String>,
    /// Times the consumer was cancelled and started anew because parked
    /// signals held half its prefetch slots.
    pub consumer_turns: u64,
    /// Messages received from the broker since the node started.
    pub delivered: u64,
    pub reconnects: u64,
    pub last_error: Option<String>,
}

/// Who chose a signal's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdOrigin {
    /// The client sent it: it may be a retry of a signal already known.
    Client,
    /// Ingress minted it (a fresh ULID) because the client sent none: no
    /// signal can have it yet, so the queue skips its duplicate look-up.
    Minted,
}

/// To `kanban_queue`.
pub enum KanbanMsg {
    Enqueue(Signal, IdOrigin, RpcReplyPort<EnqueueOutcome>),
    /// These decisions are durable and their queue entries gone: free their
    /// WIP slots (an engine sends every ack of one commit together).
    Ack {
        seqs: Vec<u64>,
    },
    /// These signals wait in their engine for something outside it (an
    /// entitlement): not timed out, not waited for by a quiesce, until they
    /// are acknowledged or sent again.
    Park {
        seqs: Vec<u64>,
    },
    /// Parked signals their engine is deciding after all (it was entitled).
    Unpark {
        seqs: Vec<u64>,
    },
    /// Send again what is in flight for this engine (it restarted and lost its mailbox).
    /// `after_crash`: the engine was restarted after a failure, which counts
    /// an attempt against the signal it was most likely deciding.
    Redeliver {
        tenant_id: String,
        sku_id: String,
        after_crash: bool,
    },
    /// Send again everything in flight (the router restarted).
    RedeliverAll,
    Stats(RpcReplyPort<QueueStats>),
    Replay {
        tenant_id: String,
        signal_id: String,
        reply: RpcReplyPort<ReplayOutcome>,
    },
    /// Internal: write the enqueues received so far as one queue block.
    FlushEnqueues,
    /// Internal: enqueued signals are durable and may be dispatched.
    Ready(Vec<Delivery>),
    /// Internal: periodic redelivery of what has been in flight too long.
    Tick,
    /// Graceful shutdown: take no more work, and answer (with what is still
    /// in flight) once nothing is; the caller bounds the wait.
    Quiesce(RpcReplyPort<u64>),
    /// Internal to a queue backend (the amqp backend's broker events).
    Backend(Box<dyn std::any::Any + Send>),
}

/// What [`RouterMsg::Engines`] answers.
#[derive(Debug, Default)]
pub struct EnginePage {
    /// The engines of the page (fewer than it looked at when a checkpoint
    /// did not decode: that engine is left out, and logged).
    pub engines: Vec<EngineInfo>,
    /// The last engine the page looked at, when there may be more after it.
    pub next: Option<(String, String)>,
}

/// To `engine_router`.
pub enum RouterMsg {
    Deliver(Delivery),
    /// A page of engines, live or passivated, by tenant then SKU: those
    /// after the engine `after` names (tenant, sku), at most `limit`.
    Engines {
        after: Option<(String, String)>,
        limit: usize,
        reply: RpcReplyPort<Result<EnginePage, String>>,
    },
    Engine {
        tenant_id: String,
        sku_id: String,
        reply: RpcReplyPort<Option<EngineInfo>>,
    },
    Halt {
        tenant_id: String,
        sku_id: String,
        reason: String,
        reply: RpcReplyPort<Result<EngineInfo, String>>,
    },
    Resume {
        tenant_id: String,
        sku_id: String,
        reply: RpcReplyPort<Result<EngineInfo, String>>,
    },
    /// Internal: periodic passivation of idle engines.
    Tick,
    /// Internal: whether an idle engine was busy (an action, or signals
    /// postponed) when asked; asked from a task, so that a busy engine,
    /// which answers only once its action ends, holds up no delivery.
    IdleChecked {
        name: String,
        busy: bool,
    },
    /// Internal: an engine finished draining.
    Drained(String),
    /// A circuit breaker changed: engines it halted resume when it is no longer open.
    BreakerChanged {
        breaker: String,
        open: bool,
    },
    /// Internal: open breakers whose open time is over go half-open.
    BreakerTick,
    /// Internal: an engine whose checkpoint holds an action in flight, with
    /// no engine running (a crash or a restart of `engine_sup` cut the
    /// action): the router starts it, and it records the action
    /// `interrupted` now rather than at its next signal, which may never come.
    Interrupted {
        tenant_id: String,
        sku_id: String,
    },
    /// Internal: a passivated engine (one that stopped, or one read from
    /// its checkpoint at the router's start) waiting for a transition no
    /// signal brings: its state timeout, due at `due_ms`, or the close of
    /// the breaker `halted_by`. The router starts it when that comes, so
    /// the transition is recorded then.
    Asleep {
        tenant_id: String,
        sku_id: String,
        due_ms: Option<u64>,
        halted_by: Option<String>,
    },
    /// Internal: `engine_sup` restarted an engine after a crash. One that
    /// crashed while the router passivated it is drained again, or it would
    /// run on with no router to know of it (it was let go).
    Restarted {
        tenant_id: String,
        sku_id: String,
    },
}

/// Everything one decision writes, applied atomically with its receipts.
#[derive(Debug, Clone, Default)]
pub struct WriteSet {
    pub signal_records: Vec<SignalRecord>,
    /// Engine checkpoints: (tenant, sku, bytes); a later one for the same
    /// engine replaces an earlier one.
    pub checkpoints: Vec<(String, String, Vec<u8>)>,
    /// Queue seqs this commit decides or dead-letters (Kanban is told
    /// once the commit is durable; nothing is written for them).
    pub acks: Vec<u64>,
    pub dead_letters: Vec<DeadLetter>,
    /// Per-customer payment windows: (tenant, sku, customer, bytes).
    pub velocity: Vec<(String, String, String, Vec<u8>)>,
}

impl WriteSet {
    /// Adds `other`'s writes after this set's (they apply in order).
    pub fn extend(&mut self, other: WriteSet) {
        self.signal_records.extend(other.signal_records);
        self.checkpoints.extend(other.checkpoints);
        self.acks.extend(other.acks);
        self.dead_letters.extend(other.dead_letters);
        self.velocity.extend(other.velocity);
    }
}

/// How `andon_ledger` answers a [`LedgerMsg::Commit`], once it is durable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    /// The seq of the ledger's last receipt once the commit was written.
    pub seq: u64,
    /// With `unless_final`: the signals (ids) whose end the commit would
    /// have written but left out, since they were final already. They were
    /// not decided by it, so they are not counted as decided.
    pub left_out: Vec<String>,
}

/// An engine's commits that `andon_ledger` holds and has not answered yet,
/// counted apart from the engine: a commit sent just before its engine was
/// killed (or gave up waiting) is still written, after the engine is gone.
/// The engine's next incarnation waits for them ([`CommitGate::settled`])
/// before it reads its checkpoint, or it would start from the state before
/// them: deciding their signals again, or losing their quota.
#[derive(Default, Debug)]
pub struct CommitGate {
    pending: std::sync::atomic::AtomicUsize,
    settled: tokio::sync::Notify,
}

impl CommitGate {
    /// Counts a commit about to be sent; the count drops when the ledger
    /// lets go of the [`InFlight`] (answered, failed, or dropped with a
    /// ledger that stopped).
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.pending
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// Commits sent and not yet let go of.
    pub fn pending(&self) -> usize {
        self.pending.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves once no commit is pending.
    pub async fn settled(&self) {
        loop {
            // Registered before the check: `notify_waiters` reaches a
            // `Notified` from its creation on, so no release is missed.
            let released = self.settled.notified();
            if self.pending() == 0 {
                return;
            }
            released.await;
        }
    }
}

/// A commit counted by a [`CommitGate`], carried in [`LedgerMsg::Commit`]
/// and held by the ledger until it answers it.
#[derive(Debug)]
pub struct InFlight(Arc<CommitGate>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let gate = &self.0;
        if gate
            .pending
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            gate.settled.notify_waiters();
        }
    }
}

/// To `andon_ledger`: chain and sign `receipts`, write them with `writes` in
/// one atomic batch, and answer once it is durable.
pub enum LedgerMsg {
    Commit {
        receipts: Vec<ReceiptDraft>,
        writes: WriteSet,
        /// An engine's commit, counted by its [`CommitGate`]; held until answered.
        in_flight: Option<InFlight>,
        /// Set by an engine restored from its checkpoint: a signal this
        /// commit would end that is final already (dead-lettered while the
        /// engine was down) keeps its one end; its record and receipts are
        /// left out of the commit, the rest (the checkpoint) is written.
        unless_final: bool,
        reply: RpcReplyPort<Result<Committed, String>>,
    },
    /// A signal given up on without a decision (poison, or dead-lettered by
    /// the broker): `receipt` and `writes` (its dead letter and status) are
    /// committed like [`LedgerMsg::Commit`] unless the signal (`tenant`,
    /// `id`) is final already, in the store or in an earlier commit of the
    /// same batch; then nothing is written and the answer is `Ok(false)`.
    /// The ledger serializes every commit, so a signal gets one terminal
    /// receipt even when its decision and its dead letter race.
    DeadLetter {
        signal: (String, String),
        receipt: Box<ReceiptDraft>,
        writes: WriteSet,
        reply: RpcReplyPort<Result<bool, String>>,
    },
    /// Internal: write every commit received so far as one atomic batch
    /// (group commit of decisions; one signed head per batch).
    Flush,
    /// Internal: the batch that waited for this group flush is durable (or
    /// failed to be); the commits that arrived meanwhile can be written.
    Durable(u64),
}
