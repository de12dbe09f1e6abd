//! The policy engine actor of one tenant × SKU (`engine:{tenant}:{sku}`).
//!
//! It feeds events to the pure [`step`], then performs the effects: one
//! atomic commit through `andon_ledger` (receipts, checkpoint, statuses,
//! acks, dead letters), then the action, then the acks to Kanban. Postponed
//! signals come back after a state change (gen_statem's postpone); the boot
//! and quota states have state timeouts.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tai_core::msg::{
    CommitGate, Delivery, KanbanMsg, LedgerMsg, RouterMsg, WriteSet, ANDON_LEDGER, ENGINE_ROUTER,
    KANBAN_QUEUE,
};
use tai_core::receipt::ReceiptDraft;
use tai_core::signal::{
    now_ms, ById, DeadLetter, EngineInfo, EngineState, SignalRecord, SignalStatus,
};
use tai_otp::statem::{Statem, TimeoutToken};
use tai_store::Store;
use tracing::{debug, info, Instrument};

use tai_core::alert::{Alert, Severity};

use crate::breaker::{BreakerState, Transition};
use crate::executor::{breaker_receipt, Executors, Outcome};
use crate::machine::{step, Action, Data, Effect, Event, Sku};

const LEDGER_TIMEOUT: Duration = Duration::from_secs(30);

pub enum EngineMsg {
    Deliver(Delivery),
    /// Internal: decide the deliveries received so far, as one commit.
    Drain,
    Timeout(TimeoutToken),
    Info(RpcReplyPort<EngineInfo>),
    Halt(String, RpcReplyPort<EngineInfo>),
    Resume(RpcReplyPort<EngineInfo>),
    /// A breaker changed (from the router): resume if it halted this engine.
    BreakerChanged {
        breaker: String,
        open: bool,
    },
}

#[derive(Clone, Copy, Debug)]
pub struct Engine;

pub struct EngineArgs {
    /// 0 when the router starts the engine; more when `engine_sup` restarts it after a crash.
    pub incarnation: u32,
    /// Nothing was sent to an earlier incarnation that it did not take: the
    /// router starts this engine for the first time, or again after
    /// draining it (passivation). Its first incarnation then does not ask
    /// Kanban to send again what is in flight for it: that is in this
    /// engine's mailbox already, or parked and sent again by the drained
    /// incarnation's `post_stop`.
    pub fresh: bool,
    /// Shared by the incarnations of one engine: set when one ends because
    /// its ledger commit failed (the store or the ledger, not the signals), so that
    /// the next does not count that crash as an attempt against the signal
    /// it held (which, counted three times, would dead-letter a good signal
    /// as poison over a full disk).
    pub commit_failed: Arc<AtomicBool>,
    pub tenant_id: String,
    pub sku_id: String,
    pub sku: Arc<Sku>,
    pub store: Store,
    pub executors: Executors,
}

pub struct EngineActorState {
    incarnation: u32,
    fresh: bool,
    commit_failed: Arc<AtomicBool>,
    /// Counts this engine's commits the ledger holds, for the next incarnation.
    gate: Arc<CommitGate>,
    name: String,
    tenant_id: String,
    sku_id: String,
    sku: Arc<Sku>,
    /// The SKU's policies, as the Kaizen report names them.
    policy_label: String,
    /// The traced signals this engine holds (until they settle), by id, so
    /// every receipt of a signal carries its trace id.
    traces: HashSet<ById>,
    /// `signals_processed_total` for this engine, by outcome: looked up
    /// once, not at every commit.
    processed: Vec<(SignalStatus, metrics::Counter)>,
    store: Store,
    executors: Executors,
    data: Data,
    statem: Statem<EngineState, Delivery>,
    /// Deliveries held here (postponed or being decided): a redelivered copy is dropped.
    seen: HashSet<u64>,
    /// Deliveries received and not yet decided: decided together on `Drain`,
    /// so a busy engine writes one checkpoint for many signals.
    inbox: Vec<Delivery>,
}

/// What one event asks the engine to do, in order.
enum Input {
    Signal(Delivery),
    Other(OwnedEvent),
}

enum OwnedEvent {
    StateTimeout,
    ActionDone {
        result: Result<(), String>,
        tripped: Option<String>,
    },
    Halt(String),
    Resume,
    Restored,
    BreakerChanged {
        breaker: String,
        open: bool,
    },
}

/// The trace id of a held signal.
#[allow(clippy::mutable_key_type)] // see `signal_keyed_by` in tai_core::signal
fn trace_of(traces: &HashSet<ById>, signal_id: &str) -> Option<String> {
    traces.get(signal_id).and_then(|h| h.0.trace_id.clone())
}

impl EngineActorState {
    /// This engine's `signals_processed_total` counter for `status`.
    fn processed_counter(&mut self, status: SignalStatus) -> &metrics::Counter {
        let i = match self.processed.iter().position(|(s, _)| *s == status) {
            Some(i) => i,
            None => {
                let counter = metrics::counter!(
                    tai_core::telemetry::SIGNALS_PROCESSED,
                    "tenant" => tai_core::telemetry::tenant_label(&self.tenant_id),
                    "sku" => self.sku_id.clone(),
                    "outcome" => status.as_str()
                );
                self.processed.push((status, counter));
                self.processed.len() - 1
            }
        };
        &self.processed[i].1
    }

    fn info(&self) -> EngineInfo {
        EngineInfo {
            tenant_id: self.tenant_id.clone(),
            sku_id: self.sku_id.clone(),
            state: self.data.state,
            quota_remaining: self.data.quota_remaining,
            entitled: self.data.entitled,
            in_flight_action: self.data.in_flight.as_ref().map(|f| f.action_id.clone()),
            postponed: self.statem.postponed_len(),
            restarts: 0,
            active: true,
        }
    }

    fn arm_state_timeout(&mut self, myself: &ActorRef<EngineMsg>) {
        let now = now_ms();
        if let Some(due) = self.data.state_deadline_ms(&self.sku, now) {
            let after = Duration::from_millis(due.saturating_sub(now));
            self.statem
                .set_state_timeout(myself, after, EngineMsg::Timeout);
        }
    }
}

/// How long an engine waits for a layer it needs that is (re)starting.
const LAYER_WAIT: Duration = Duration::from_secs(15);

/// The ledger by name, waiting while it is not registered: layers start in
/// SPEC order (processor before andon) and restart independently, so a brief
/// absence is normal and must not crash the engine (each crash would count
/// an attempt against the signal it holds).
///
/// Not while the engine's own layer is being stopped: a `rest_for_one`
/// restart from an earlier layer (or the node's stop) stops andon first,
/// then processor, `engine_router` before `engine_sup`. An engine that
/// waited for the ledger then held up its own stop until `engine_sup` killed
/// it (5 s), and every engine so waiting delayed the layers' restart, or
/// the node's stop past its grace. With neither the ledger nor the router
/// registered it gives up at once; like any commit that fails, that counts
/// no attempt against its signals.
async fn ledger() -> Result<ractor::ActorCell, ActorProcessingErr> {
    let end = tokio::time::Instant::now() + LAYER_WAIT;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(cell) = ractor::registry::where_is(ANDON_LEDGER) {
            return Ok(cell);
        }
        if ractor::registry::where_is(ENGINE_ROUTER).is_none() {
            return Err("andon_ledger is not running and engine_router is gone: \
                 the processor layer is being stopped"
                .into());
        }
        if tokio::time::Instant::now() >= end {
            return Err(format!("andon_ledger not running for {LAYER_WAIT:?}").into());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Commits through the ledger; the signals whose end it left out (final
/// already, with `unless_final`).
async fn commit(
    gate: &Arc<CommitGate>,
    receipts: Vec<ReceiptDraft>,
    writes: WriteSet,
    unless_final: bool,
) -> Result<Vec<String>, ActorProcessingErr> {
    let ledger = ledger().await?;
    let answer = ractor::rpc::call(
        &ledger,
        |reply| LedgerMsg::Commit {
            receipts,
            writes,
            in_flight: Some(gate.begin()),
            unless_final,
            reply,
        },
        Some(LEDGER_TIMEOUT),
    )
    .await
    .map_err(|e| format!("andon_ledger unreachable: {e}"))?;
    match answer {
        ractor::rpc::CallResult::Success(Ok(committed)) => Ok(committed.left_out),
        ractor::rpc::CallResult::Success(Err(e)) => {
            Err(format!("ledger commit failed: {e}").into())
        }
        ractor::rpc::CallResult::Timeout => Err("andon_ledger did not answer in time".into()),
        ractor::rpc::CallResult::SenderError => Err("andon_ledger stopped before answering".into()),
    }
}

/// The engine's data as its last commit left it: read from its checkpoint
/// once the commits an earlier incarnation left with the ledger (it was
/// killed, or gave up waiting, while the ledger held them) are answered;
/// they are written after that incarnation is gone, and the checkpoint
/// read before them would decide their signals again, or lose their quota.
async fn restore(
    args: &EngineArgs,
    name: &str,
    gate: &CommitGate,
) -> Result<Data, ActorProcessingErr> {
    let pending = gate.pending();
    if pending > 0 {
        info!(engine = %name, commits = pending, "waiting for the commits an earlier incarnation left with andon_ledger before reading the checkpoint");
        tokio::time::timeout(LEDGER_TIMEOUT, gate.settled())
            .await
            .map_err(|_| {
                format!(
                    "{pending} commit(s) of an earlier incarnation of {name} still unanswered by andon_ledger after {LEDGER_TIMEOUT:?}"
                )
            })?;
    }
    Ok(
        match args.store.checkpoint(&args.tenant_id, &args.sku_id)? {
            Some(bytes) => {
                let mut data = Data::from_checkpoint(&bytes).map_err(|e| {
                    format!(
                        "corrupt checkpoint for {}/{}: {e}",
                        args.tenant_id, args.sku_id
                    )
                })?;
                data.reconcile(&args.sku);
                data
            }
            None => Data::new(&args.sku, now_ms()),
        },
    )
}

/// The span of a commit: a child of the last signal's `dequeue` span,
/// linked to the others it carries.
fn receipt_span(spans: &[tracing::Span]) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let Some(last) = spans.iter().rev().find(|s| !s.is_none()) else {
        return tracing::Span::none();
    };
    let span = tracing::info_span!(parent: last, "receipt", signals = spans.len());
    for other in spans.iter().filter(|s| !s.is_none() && s.id() != last.id()) {
        use opentelemetry::trace::TraceContextExt;
        span.add_link(other.context().span().span_context().clone());
    }
    span
}

fn ack(seqs: Vec<u64>) {
    if !seqs.is_empty() {
        send_to_queue(KanbanMsg::Ack { seqs });
    }
}

/// Acknowledges (with `ack`) redelivered signals the store shows decided,
/// once the store has made durable what it showed: the decision read may be
/// one still in the group flush, or in a flush that fails (a full disk),
/// and the broker drops its copy at the acknowledgement, before the node
/// stops. Never acknowledged on a failed store: the queue sends them again
/// after the restart. (Seed 178 of the soak, amqp with `--disk-full`: two
/// signals so acknowledged while the decision was lost with the failed
/// flush, left `accepted` for good.)
fn ack_when_durable(store: &Store, seqs: Vec<u64>, ack: impl FnOnce(Vec<u64>) + Send + 'static) {
    if seqs.is_empty() {
        return;
    }
    let store = store.clone();
    tokio::spawn(async move {
        match store.durable().await {
            Ok(()) => ack(seqs),
            Err(e) => {
                debug!(error = %e, signals = seqs.len(), "redelivered signals decided in memory not acknowledged: the store failed; they come again after the restart");
            }
        }
    });
}

/// Whether an engine's (re)start counts a delivery attempt against the
/// oldest signal it held: only a restart after a crash that may be that
/// signal's doing. Not after a failed commit (the ledger's store failed,
/// not the signal), and not on a store that has failed for good (a full
/// disk): every read then fails too, and an engine crashing on one in a
/// loop made poison of the signal it held within milliseconds (soak seed
/// 209: "could not dead-letter a poison signal", the store being gone).
fn counts_an_attempt(incarnation: u32, commit_failed: bool, store_failed: bool) -> bool {
    incarnation > 0 && !commit_failed && !store_failed
}

fn send_to_queue(msg: KanbanMsg) {
    if let Some(q) = ractor::registry::where_is(KANBAN_QUEUE) {
        let _ = q.send_message(msg);
    }
}

/// The writes of one or more steps, committed together.
#[derive(Default)]
struct Pending {
    drafts: Vec<ReceiptDraft>,
    writes: WriteSet,
    /// Per signal, in first-touched order: its final status and reason.
    statuses: Vec<(String, SignalStatus, Option<String>)>,
    /// The delivered signals of these steps, for records and dead letters.
    deliveries: Vec<Delivery>,
    /// Holds the restore of a checkpoint: the in-flight action it ends may
    /// belong to a signal the queue dead-lettered meanwhile (see
    /// `LedgerMsg::Commit`).
    restored: bool,
}

impl Pending {
    fn status(&mut self, signal_id: String, status: SignalStatus, reason: Option<String>) {
        match self.statuses.iter_mut().find(|(id, _, _)| *id == signal_id) {
            Some(entry) => {
                entry.1 = status;
                entry.2 = reason;
            }
            None => self.statuses.push((signal_id, status, reason)),
        }
    }

    fn is_empty(&self) -> bool {
        self.drafts.is_empty() && self.statuses.is_empty() && self.writes.acks.is_empty()
    }

    fn delivered(&self, signal_id: &str) -> Option<&Delivery> {
        self.deliveries.iter().find(|d| d.signal.id == signal_id)
    }
}

impl Engine {
    /// Applies one step's effects to `p`; returns the action to run, if any.
    fn collect(
        st: &mut EngineActorState,
        fx: Vec<Effect>,
        input: &Input,
        p: &mut Pending,
        now: u64,
    ) -> Option<Action> {
        let current = match input {
            Input::Signal(d) => Some(d),
            Input::Other(_) => None,
        };
        let mut action = None;
        for e in fx {
            match e {
                Effect::Receipt {
                    kind,
                    before,
                    after,
                    signal_id,
                    action_id,
                    success,
                    reason,
                } => {
                    let trace_id = signal_id.as_deref().and_then(|id| trace_of(&st.traces, id));
                    p.drafts.push(ReceiptDraft {
                        receipt_id: tai_core::receipt::prefixed_ulid("rcpt_"),
                        kind: kind.to_string(),
                        tenant_id: st.tenant_id.clone(),
                        sku_id: st.sku_id.clone(),
                        signal_id,
                        action_id,
                        state_before: before.into(),
                        state_after: after.into(),
                        success,
                        reason,
                        trace_id,
                        timestamp_ms: now,
                    });
                }
                Effect::Postpone => {
                    if let Input::Signal(d) = input {
                        // In boot it waits for an entitlement, which may be
                        // long in coming: the queue must not time it out
                        // (nor a graceful stop wait for it).
                        if st.data.state == EngineState::Boot {
                            send_to_queue(KanbanMsg::Park { seqs: vec![d.seq] });
                        }
                        st.statem.postpone(d.clone());
                    }
                }
                Effect::Processing { signal_id } => {
                    p.status(signal_id, SignalStatus::Processing, None)
                }
                Effect::Settle {
                    seq,
                    signal_id,
                    status,
                    reason,
                } => {
                    st.traces.remove(signal_id.as_str());
                    p.status(signal_id, status, reason);
                    p.writes.acks.push(seq);
                }
                Effect::DeadLetter { seq, reason } => {
                    if let Some(d) = current {
                        p.writes.dead_letters.push(DeadLetter {
                            signal: (*d.signal).clone(),
                            reason: reason.to_string(),
                            at_ms: now,
                        });
                        let id = d.signal.id.clone();
                        st.traces.remove(id.as_str());
                        p.status(id, SignalStatus::Deadlettered, Some(reason.to_string()));
                    }
                    p.writes.acks.push(seq);
                }
                Effect::Execute(a) => action = Some(a),
                Effect::Velocity { customer, times } => {
                    p.writes.velocity.push((
                        st.tenant_id.clone(),
                        st.sku_id.clone(),
                        customer,
                        serde_json::to_vec(&times).unwrap_or_default(),
                    ));
                }
            }
        }
        action
    }

    /// Loads the signal's customer window into the cache if a policy needs it.
    fn load_velocity(st: &mut EngineActorState, d: &Delivery) {
        if !st
            .sku
            .policies
            .iter()
            .any(|p| p.velocity_window_ms().is_some())
        {
            return;
        }
        let Some(c) = d.signal.payload.get("customer_id").and_then(|v| v.as_str()) else {
            return;
        };
        if st.data.velocity.contains_key(c) {
            return;
        }
        match st.store.velocity(&st.tenant_id, &st.sku_id, c) {
            Ok(Some(bytes)) => {
                if let Ok(times) = crate::machine::payment_window(&bytes) {
                    st.data.velocity.insert(c.to_string(), times);
                }
            }
            Ok(None) => {}
            // A store that cannot read will not commit either: the commit
            // fails, the engine restarts and the signal is redelivered.
            Err(e) => tracing::warn!(error = %e, customer = c, "cannot read a payment window"),
        }
    }

    fn step_input(st: &mut EngineActorState, input: &Input, now: u64) -> Vec<Effect> {
        let mut id = tai_core::receipt::prefixed_ulid;
        if let Input::Signal(d) = input {
            Self::load_velocity(st, d);
        }
        match input {
            Input::Signal(d) => step(
                &mut st.data,
                &st.sku,
                Event::Signal {
                    seq: d.seq,
                    signal: &d.signal,
                },
                now,
                &mut id,
            ),
            Input::Other(e) => {
                let ev = match e {
                    OwnedEvent::StateTimeout => Event::StateTimeout,
                    OwnedEvent::ActionDone { result: Ok(()), .. } => Event::ActionDone { ok: true },
                    OwnedEvent::ActionDone {
                        result: Err(r),
                        tripped,
                    } => Event::ActionFailed {
                        reason: r,
                        tripped: tripped.as_deref(),
                    },
                    OwnedEvent::BreakerChanged { breaker, open } => Event::BreakerChanged {
                        breaker,
                        open: *open,
                    },
                    OwnedEvent::Halt(r) => Event::Halt { reason: r },
                    OwnedEvent::Resume => Event::Resume,
                    OwnedEvent::Restored => Event::Restored,
                };
                step(&mut st.data, &st.sku, ev, now, &mut id)
            }
        }
    }

    /// Writes `p` (with the checkpoint) in one atomic, durable commit, then
    /// acknowledges its signals to Kanban.
    async fn commit(st: &mut EngineActorState, mut p: Pending) -> Result<(), ActorProcessingErr> {
        for (signal_id, status, reason) in std::mem::take(&mut p.statuses) {
            let mut rec = match st.store.signal_record(&st.tenant_id, &signal_id)? {
                Some(r) => r,
                None => match p.delivered(&signal_id) {
                    Some(d) => SignalRecord::accepted(&d.signal),
                    None => continue,
                },
            };
            rec.status = status;
            rec.reason = reason;
            rec.receipts.extend(
                p.drafts
                    .iter()
                    .filter(|r| r.signal_id.as_deref() == Some(signal_id.as_str()))
                    .map(|r| r.receipt_id.clone()),
            );
            p.writes.signal_records.push(rec);
        }
        p.writes.checkpoints.push((
            st.tenant_id.clone(),
            st.sku_id.clone(),
            serde_json::to_vec(&st.data)?,
        ));
        let acks = p.writes.acks.clone();
        let finals = || {
            p.writes
                .signal_records
                .iter()
                .filter(|r| r.status.is_final())
        };
        let mut decided: Vec<(SignalStatus, Option<u64>)> = finals()
            .map(|r| {
                let received = p.delivered(&r.signal_id).map(|d| d.signal.received_at_ms);
                (r.status, received)
            })
            .collect();
        // Their ids, in the same order, only where the ledger may leave one
        // out (a restored engine's commit): the common commit copies none.
        let decided_ids: Vec<String> = if p.restored {
            finals().map(|r| r.signal_id.clone()).collect()
        } else {
            Vec::new()
        };
        let letters: Vec<String> = p
            .writes
            .dead_letters
            .iter()
            .map(|d| d.reason.clone())
            .collect();
        let committing = std::time::Instant::now();
        let left_out = match commit(&st.gate, p.drafts, p.writes, p.restored).await {
            Ok(left_out) => left_out,
            Err(e) => {
                // The ledger failed (its store, a flush, its absence), not these
                // signals: the engine crashes and comes back from its checkpoint
                // without an attempt counted against what it held.
                st.commit_failed.store(true, Ordering::SeqCst);
                return Err(e);
            }
        };
        // Ended meanwhile (dead-lettered while this engine was down): not
        // decided here, so not counted here.
        if !left_out.is_empty() {
            decided = decided
                .into_iter()
                .zip(&decided_ids)
                .filter(|(_, id)| !left_out.contains(id))
                .map(|(d, _)| d)
                .collect();
        }
        tai_core::kaizen::record("receipt", "ledger", &st.tenant_id, committing.elapsed());
        // Counted once the decision is durable, so a retried commit is not counted twice.
        let now = now_ms();
        // One histogram lookup per commit, not per signal; the outcome
        // counters are the engine's own handles.
        let latency = metrics::histogram!(tai_core::telemetry::SIGNAL_PROCESSING_SECONDS);
        let latencies = decided
            .iter()
            .filter_map(|(_, received)| received.map(|at| now.saturating_sub(at)));
        for ms in latencies.clone() {
            latency.record(ms as f64 / 1000.0);
        }
        tai_core::kaizen::record_decisions(latencies);
        for (status, n) in tai_core::telemetry::tally(decided.iter().map(|(s, _)| *s)) {
            st.processed_counter(status).increment(n);
        }
        for reason in letters {
            metrics::counter!(tai_core::telemetry::DEADLETTER, "reason" => reason.clone())
                .increment(1);
            tai_core::alert::raise(Alert::new(
                Severity::Warning,
                "deadletter",
                format!("deadletter:{}:{reason}", st.name),
                st.name.clone(),
                format!("{} dead-lettered a signal ({reason})", st.name),
            ));
        }
        for seq in &acks {
            st.seen.remove(seq);
        }
        ack(acks);
        Ok(())
    }

    /// Runs `first` (in order) and everything it leads to: actions' results
    /// and the postponed signals a state change releases. Their writes go
    /// out as one commit, except that an action with effects outside the
    /// node runs only after what led to it is durable.
    ///
    /// Boxed: its future is large, and an actor's task holds the futures of
    /// its handlers inline for its whole life, so every idle engine would
    /// carry it; boxed, it exists only while a run is under way.
    fn run<'a>(
        myself: &'a ActorRef<EngineMsg>,
        st: &'a mut EngineActorState,
        first: Vec<Input>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), ActorProcessingErr>> + Send + 'a>,
    > {
        Box::pin(Self::run_inline(myself, st, first))
    }

    async fn run_inline(
        myself: &ActorRef<EngineMsg>,
        st: &mut EngineActorState,
        first: Vec<Input>,
    ) -> Result<(), ActorProcessingErr> {
        let mut inputs = VecDeque::from(first);
        let mut p = Pending::default();
        let mut changed = false;
        // Breaker changes made by this run's calls: told to the engines once committed.
        let mut breaker_changes = Vec::new();
        // The `dequeue` span of each signal this run decides, continuing the
        // trace its ingress started; policy, action and receipt spans hang off it.
        let mut spans: Vec<tracing::Span> = Vec::new();
        // Each signal's `queue` and `policy` timings, recorded for Kaizen
        // together once the run has stepped them all (one lock, not two per signal).
        let mut timed = Vec::new();
        while let Some(input) = inputs.pop_front() {
            let now = now_ms();
            let before = st.data.state;
            // Whose halt this is (resumed, the engine forgets it).
            let halted_by = st.data.halted_by.clone();
            p.restored |= matches!(input, Input::Other(OwnedEvent::Restored));
            if let Input::Signal(d) = &input {
                p.deliveries.push(d.clone());
                if d.signal.trace_id.is_some() {
                    st.traces.replace(ById(d.signal.clone()));
                }
                // Spans only for a sampled trace: the rest would be made to be dropped.
                let span = match &d.signal.traceparent {
                    Some(tp) if tai_core::trace::sampled(tp) => {
                        let span = tracing::info_span!(
                            "dequeue",
                            signal = %d.signal.id,
                            engine = %st.name,
                            trace_id = d.signal.trace_id.as_deref().unwrap_or(""),
                        );
                        tai_core::trace::continue_from(&span, tp);
                        span
                    }
                    _ => tracing::Span::none(),
                };
                spans.push(span);
            }
            let stepped = std::time::Instant::now();
            let fx = match (&input, spans.last()) {
                (Input::Signal(_), Some(span)) if !span.is_none() => {
                    tracing::info_span!(parent: span, "policy", policies = %st.policy_label)
                        .in_scope(|| Self::step_input(st, &input, now))
                }
                _ => Self::step_input(st, &input, now),
            };
            if let Input::Signal(d) = &input {
                let queued = now.saturating_sub(d.signal.received_at_ms);
                timed.push(("queue", Duration::from_millis(queued)));
                timed.push(("policy", stepped.elapsed()));
            }
            let mut action = Self::collect(st, fx, &input, &mut p, now);
            // An action with no effect outside the node runs inline: its
            // result joins the decision's commit. Any other runs only once
            // the `action_generated` commit is durable.
            while let Some(a) = action.take_if(|a| !st.executors.is_external(&a.executor)) {
                let result = Self::timed_action(st, &a, spans.last()).await;
                let trace = trace_of(&st.traces, a.signal_id());
                let done = Self::outcome(&a, result, trace, &mut p, &mut breaker_changes);
                let fx = Self::step_input(st, &done, now);
                action = Self::collect(st, fx, &done, &mut p, now);
            }
            // An operator halt of an engine a breaker halted changes who
            // holds it, not its state: checkpointed all the same, or a
            // restart would hand it back to the breaker, whose close resumes it.
            let taken_over = halted_by.is_some() && st.data.halted_by.is_none();
            changed |= st.data.state != before || taken_over;
            if let Some(a) = action {
                Self::commit(st, std::mem::take(&mut p))
                    .instrument(receipt_span(&spans))
                    .await?;
                changed = false;
                let result = Self::timed_action(st, &a, spans.last()).await;
                let trace = trace_of(&st.traces, a.signal_id());
                let done = Self::outcome(&a, result, trace, &mut p, &mut breaker_changes);
                inputs.push_front(done);
            }
            let from = *st.statem.state();
            let t = st.statem.transition(st.data.state);
            // An operator taking over a breaker's halt changes the alert's
            // key, not the state.
            if t.changed || taken_over {
                Self::alert_state(st, before, halted_by.as_deref());
            }
            if t.changed {
                crate::states::publish(&st.name, st.data.state);
                debug!(tenant = %st.tenant_id, sku = %st.sku_id, from = before.as_str(), to = st.data.state.as_str(), "engine state change");
                st.arm_state_timeout(myself);
                if from == EngineState::Boot && !t.replay.is_empty() {
                    // Parked while it waited; decided now, before a quiesce ends.
                    send_to_queue(KanbanMsg::Unpark {
                        seqs: t.replay.iter().map(|d| d.seq).collect(),
                    });
                }
                inputs.extend(t.replay.into_iter().map(Input::Signal));
            }
        }
        tai_core::kaizen::record_all(&st.policy_label, &st.tenant_id, &timed);
        if !p.is_empty() || changed {
            Self::commit(st, p).instrument(receipt_span(&spans)).await?;
        }
        crate::executor::notify_engines(&breaker_changes);
        Ok(())
    }

    /// Andon: halted (critical) and quota exhausted (warning) raise an
    /// alert; leaving those states resolves it. A halt by a breaker is
    /// raised under the breaker's own key (`breaker:{name}`), so it is a
    /// repeat of the breaker's open alert within the dedupe window: a shared
    /// breaker halting a thousand engines pages once, not a thousand times,
    /// and the breaker's close resolves it (`halted_by`: the breaker that had
    /// halted this engine before the step, if any; its resume resolves
    /// nothing, the breaker being at best half-open).
    fn alert_state(st: &EngineActorState, before: EngineState, halted_by: Option<&str>) {
        let after = st.data.state;
        for (state, severity, kind) in [
            (EngineState::Halted, Severity::Critical, "engine_halted"),
            (
                EngineState::QuotaExhausted,
                Severity::Warning,
                "quota_exhausted",
            ),
        ] {
            let key = format!("{}:{}", st.name, state.as_str());
            // Halted by an operator while a breaker held it: the halt is the
            // engine's own from now on, raised under its own key (the
            // operator's resume resolves it; the breaker's close does not).
            let taken_over = state == EngineState::Halted
                && after == state
                && halted_by.is_some()
                && st.data.halted_by.is_none();
            if (after == state && before != state) || taken_over {
                let (key, why) = match (&st.data.halted_by, state) {
                    (Some(b), EngineState::Halted) => {
                        (format!("breaker:{b}"), format!(": breaker {b} is open"))
                    }
                    _ => (key, String::new()),
                };
                tai_core::alert::raise(Alert::new(
                    severity,
                    kind,
                    key,
                    st.name.clone(),
                    format!("{} is {}{why}", st.name, state.as_str()),
                ));
            } else if before == state
                && after != state
                && !(state == EngineState::Halted && halted_by.is_some())
            {
                tai_core::alert::raise(
                    Alert::new(
                        severity,
                        kind,
                        key,
                        st.name.clone(),
                        format!("{} is {}", st.name, after.as_str()),
                    )
                    .resolved(),
                );
            }
        }
    }

    /// Runs an action, timed for the Kaizen report (by executor) and traced
    /// under the signal's span.
    async fn timed_action(
        st: &EngineActorState,
        a: &Action,
        signal: Option<&tracing::Span>,
    ) -> Outcome {
        let started = std::time::Instant::now();
        let span = match signal {
            Some(parent) if !parent.is_none() => {
                tracing::info_span!(parent: parent, "action", executor = %a.executor)
            }
            _ => tracing::Span::none(),
        };
        let o = st.executors.run(a).instrument(span).await;
        tai_core::kaizen::record("action", &a.executor, &st.tenant_id, started.elapsed());
        o
    }

    /// An action's outcome as the engine's next input; the breaker changes
    /// it caused get their receipts in the same commit.
    fn outcome(
        a: &Action,
        o: Outcome,
        trace_id: Option<String>,
        p: &mut Pending,
        changes: &mut Vec<Transition>,
    ) -> Input {
        let now = now_ms();
        p.drafts.extend(o.steps.into_iter().map(|s| ReceiptDraft {
            receipt_id: tai_core::receipt::prefixed_ulid("rcpt_"),
            kind: s.kind.to_string(),
            tenant_id: a.tenant_id().to_string(),
            sku_id: a.sku_id().to_string(),
            signal_id: Some(a.signal_id().to_string()),
            action_id: Some(a.action_id.clone()),
            state_before: EngineState::ActionPending.into(),
            state_after: EngineState::ActionPending.into(),
            success: s.success,
            reason: Some(s.reason),
            trace_id: trace_id.clone(),
            timestamp_ms: now,
        }));
        p.drafts.extend(o.transitions.iter().map(breaker_receipt));
        changes.extend(o.transitions);
        Input::Other(OwnedEvent::ActionDone {
            result: o.result,
            tripped: o.tripped,
        })
    }
}

impl Engine {
    /// The inbox as inputs, in arrival order. A redelivered signal that is
    /// already decided (its commit landed, its ack was lost) is only
    /// acknowledged again.
    fn take_inbox(st: &mut EngineActorState) -> Result<Vec<Input>, ActorProcessingErr> {
        let mut inputs: Vec<Input> = Vec::with_capacity(st.inbox.len());
        let mut acks = Vec::new();
        for d in std::mem::take(&mut st.inbox) {
            // A second delivery of a signal held here under another seq (a
            // queue that restarted sends again what its dead incarnation had
            // sent; the broker redelivers it): the store cannot tell yet,
            // the first is not decided. Dropped unacknowledged: the queue
            // sends it again after its visibility, and it is then
            // acknowledged as decided.
            let id = d.signal.id.as_str();
            // Only a redelivery can be such a copy: a first delivery (the
            // embedded queue's common case) pays for no look-up.
            let held = d.redelivered
                && (inputs
                    .iter()
                    .any(|i| matches!(i, Input::Signal(o) if o.signal.id == id))
                    || st.statem.postponed().any(|o| o.signal.id == id)
                    || st
                        .data
                        .in_flight
                        .as_ref()
                        .is_some_and(|f| f.signal_id == id));
            if held {
                debug!(engine = %st.name, signal = %id, seq = d.seq, "a second delivery of a signal held here: dropped until it is sent again");
                st.seen.remove(&d.seq);
                continue;
            }
            let decided = d.redelivered
                && match st.store.signal_record(&d.signal.tenant_id, &d.signal.id) {
                    Ok(r) => r.is_some_and(|r| r.status.is_final()),
                    Err(e) => {
                        ack_when_durable(&st.store, acks, ack);
                        return Err(e.into());
                    }
                };
            if decided {
                debug!(engine = %st.name, signal = %id, seq = d.seq, "a redelivered signal is decided already: acknowledged only");
                st.seen.remove(&d.seq);
                acks.push(d.seq);
            } else {
                inputs.push(Input::Signal(d));
            }
        }
        ack_when_durable(&st.store, acks, ack);
        Ok(inputs)
    }

    /// Runs `event` after the signals that arrived before it.
    async fn run_after_inbox(
        myself: &ActorRef<EngineMsg>,
        st: &mut EngineActorState,
        event: OwnedEvent,
    ) -> Result<(), ActorProcessingErr> {
        let mut inputs = Self::take_inbox(st)?;
        inputs.push(Input::Other(event));
        Self::run(myself, st, inputs).await
    }
}

impl Actor for Engine {
    type Msg = EngineMsg;
    type State = EngineActorState;
    type Arguments = EngineArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<EngineMsg>,
        args: EngineArgs,
    ) -> Result<EngineActorState, ActorProcessingErr> {
        let name = tai_core::names::engine_name(&args.tenant_id, &args.sku_id);
        let gate = crate::gates::gate(&name);
        let data = match restore(&args, &name, &gate).await {
            Ok(data) => data,
            Err(e) => {
                crate::gates::release(&name, &gate);
                return Err(e);
            }
        };
        let state = data.state;
        crate::states::publish(&name, state);
        Ok(EngineActorState {
            incarnation: args.incarnation,
            fresh: args.fresh,
            commit_failed: args.commit_failed,
            gate,
            name,
            tenant_id: args.tenant_id,
            sku_id: args.sku_id,
            policy_label: match args.sku.policies.len() {
                0 => "none".to_string(),
                _ => args
                    .sku
                    .policies
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>()
                    .join("+"),
            },
            sku: args.sku,
            traces: Default::default(),
            processed: Vec::new(),
            store: args.store,
            executors: args.executors,
            statem: Statem::new(state),
            data,
            seen: HashSet::new(),
            inbox: Vec::new(),
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<EngineMsg>,
        st: &mut EngineActorState,
    ) -> Result<(), ActorProcessingErr> {
        if st.data.in_flight.is_some() {
            Self::run(&myself, st, vec![Input::Other(OwnedEvent::Restored)]).await?;
        }
        // Halted by a breaker that closed or half-opened while this engine was passive.
        if let Some(b) = st.data.halted_by.clone() {
            if st.executors.breakers.state(&b) != Some(BreakerState::Open) {
                let ev = OwnedEvent::BreakerChanged {
                    breaker: b,
                    open: false,
                };
                Self::run(&myself, st, vec![Input::Other(ev)]).await?;
            }
        }
        // A state timeout that fell due while the engine was passive is taken
        // now, before anything in its mailbox, as it would have been live:
        // the signals that waited behind an entitlement are decided after
        // its timeout, and an engine the router started for its timeout
        // (and passivates at once) has recorded it before it stops.
        let now = now_ms();
        if st
            .data
            .state_deadline_ms(&st.sku, now)
            .is_some_and(|due| due <= now)
        {
            Self::run(&myself, st, vec![Input::Other(OwnedEvent::StateTimeout)]).await?;
        }
        st.arm_state_timeout(&myself);
        // Restarted by engine_sup: the router may have let this engine go
        // (it crashed while being passivated), and drains it too.
        if st.incarnation > 0 {
            if let Some(r) = ractor::registry::where_is(ENGINE_ROUTER) {
                let _ = r.send_message(RouterMsg::Restarted {
                    tenant_id: st.tenant_id.clone(),
                    sku_id: st.sku_id.clone(),
                });
            }
        }
        // Whatever Kanban had sent to an earlier incarnation died with its
        // mailbox (none did when the router starts a fresh one).
        if st.incarnation > 0 || !st.fresh {
            let commit_failed = st.commit_failed.swap(false, Ordering::SeqCst);
            send_to_queue(KanbanMsg::Redeliver {
                tenant_id: st.tenant_id.clone(),
                sku_id: st.sku_id.clone(),
                after_crash: counts_an_attempt(
                    st.incarnation,
                    commit_failed,
                    st.store.has_failed(),
                ),
            });
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<EngineMsg>,
        st: &mut EngineActorState,
    ) -> Result<(), ActorProcessingErr> {
        crate::states::stopped(&st.name);
        crate::gates::release(&st.name, &st.gate);
        // Passive from now on, it has no timer and hears no breaker: the
        // router starts it again when its state timeout is due or the
        // breaker that halted it closes.
        let (due_ms, halted_by) = st.data.waits_for(&st.sku, now_ms());
        if st.sku.configured && (due_ms.is_some() || halted_by.is_some()) {
            if let Some(r) = ractor::registry::where_is(ENGINE_ROUTER) {
                let _ = r.send_message(RouterMsg::Asleep {
                    tenant_id: st.tenant_id.clone(),
                    sku_id: st.sku_id.clone(),
                    due_ms,
                    halted_by,
                });
            }
        }
        if st.statem.postponed_len() > 0 {
            // Passivated while signals waited here (the cap on live engines
            // takes the least recently used): they are parked in Kanban,
            // which would not send them again on its own; sent now, they
            // bring the engine back and its entitlement timeout runs on.
            send_to_queue(KanbanMsg::Redeliver {
                tenant_id: st.tenant_id.clone(),
                sku_id: st.sku_id.clone(),
                after_crash: false,
            });
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<EngineMsg>,
        msg: EngineMsg,
        st: &mut EngineActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            EngineMsg::Deliver(d) => {
                if !st.seen.insert(d.seq) {
                    // A copy of one held here. If it waits for the
                    // entitlement, the queue sending it again (it restarted
                    // and lost its parking) must know it is parked, or it
                    // would time it out into poison.
                    if st.data.state == EngineState::Boot
                        && st.statem.postponed().any(|p| p.seq == d.seq)
                    {
                        send_to_queue(KanbanMsg::Park { seqs: vec![d.seq] });
                    }
                    return Ok(());
                }
                let first = st.inbox.is_empty();
                st.inbox.push(d);
                // A first signal sends the `Drain` that decides it with those
                // behind it in the mailbox, in one run. An engine being
                // passivated (drained) takes no new message, not even its
                // own: it decides the signal now (failing here would crash
                // it and count a delivery attempt against the signal).
                if first && myself.send_message(EngineMsg::Drain).is_err() {
                    let inputs = Self::take_inbox(st)?;
                    if !inputs.is_empty() {
                        Self::run(&myself, st, inputs).await?;
                    }
                }
            }
            EngineMsg::Drain => {
                let inputs = Self::take_inbox(st)?;
                if !inputs.is_empty() {
                    Self::run(&myself, st, inputs).await?;
                }
            }
            EngineMsg::Timeout(token) => {
                if st.statem.take_timeout(token) {
                    Self::run_after_inbox(&myself, st, OwnedEvent::StateTimeout).await?;
                }
            }
            EngineMsg::Info(reply) => {
                let _ = reply.send(st.info());
            }
            EngineMsg::Halt(reason, reply) => {
                Self::run_after_inbox(&myself, st, OwnedEvent::Halt(reason)).await?;
                let _ = reply.send(st.info());
            }
            EngineMsg::Resume(reply) => {
                Self::run_after_inbox(&myself, st, OwnedEvent::Resume).await?;
                let _ = reply.send(st.info());
            }
            EngineMsg::BreakerChanged { breaker, open } => {
                if st.data.halted_by.as_deref() == Some(breaker.as_str()) {
                    let ev = OwnedEvent::BreakerChanged { breaker, open };
                    Self::run_after_inbox(&myself, st, ev).await?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a crash that may be a signal's doing counts an attempt: not a
    /// first start, not a failed commit, and not anything on a store that
    /// failed (a real one, on a tmpfs filled up).
    #[test]
    fn a_restart_on_a_failed_store_counts_no_attempt() {
        let disk = tai_store::tmpfs::TmpfsStore::open("2m");
        let store = disk.store.clone();
        assert!(!store.has_failed());
        assert!(counts_an_attempt(1, false, store.has_failed()));
        assert!(!counts_an_attempt(0, false, store.has_failed()));
        assert!(!counts_an_attempt(3, true, store.has_failed()));
        let _ = tai_store::tmpfs::fill(&store);
        assert!(store.has_failed(), "a full disk fails the store");
        assert!(!counts_an_attempt(1, false, store.has_failed()));
    }

    /// A redelivered signal found decided is acknowledged once the store
    /// made durable what it read, and never on a store whose flush failed
    /// (what it read may be a decision the failed flush lost).
    #[tokio::test]
    async fn a_decided_copy_is_acknowledged_only_on_a_durable_store() {
        let disk = tai_store::tmpfs::TmpfsStore::open("2m");
        let store = disk.store.clone();
        let acked = |store: &Store, seq: u64| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            ack_when_durable(store, vec![seq], move |seqs| {
                let _ = tx.send(seqs);
            });
            rx
        };
        assert_eq!(acked(&store, 1).await.ok(), Some(vec![1]));
        let _ = tai_store::tmpfs::fill(&store);
        assert!(
            acked(&store, 2).await.is_err(),
            "acknowledged on a store whose flush failed"
        );
    }

    /// Neither the ledger nor the router registered (nextest runs each test
    /// in a process of its own): the layer is going down, not restarting.
    #[tokio::test]
    async fn an_engine_whose_layer_is_being_stopped_does_not_wait_for_the_ledger() {
        let e = ledger().await.unwrap_err();
        assert!(e.to_string().contains("being stopped"), "{e}");
    }
}
