//! `andon_ledger`: the one writer of receipts. It numbers, chains and signs
//! each decision's receipts, writes them with the decision's other writes in
//! one atomic batch, and answers once the batch is durable. One writer keeps
//! the chain in order: a later receipt is never on disk before an earlier one.

use std::collections::BTreeMap;

use ractor::RpcReplyPort;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tai_core::msg::{Committed, InFlight, LedgerMsg, WriteSet};
use tai_core::receipt::{Receipt, ReceiptDraft, SignedHead, SigningKey, GENESIS_HASH};
use tai_store::Store;
use tracing::{error, info};

#[derive(Clone, Copy, Debug)]
pub struct Ledger;

pub struct LedgerArgs {
    pub store: Store,
    pub key_id: String,
    pub keys: BTreeMap<String, String>,
}

pub struct LedgerState {
    store: Store,
    key_id: String,
    key: SigningKey,
    head_seq: u64,
    head_hash: String,
    /// Commits received since the last flush.
    batch: Vec<Pending>,
    /// The group flush the last written batch waits for, until it is
    /// durable. Once that flush has begun, new commits gather and go in as
    /// one batch when it ends: they could not be durable any sooner (they
    /// need the next flush), and fewer, larger batches cost fewer writes.
    awaiting_flush: Option<u64>,
    /// Whether the store has been told that `key_id` signs its receipts
    /// (done with the first batch it signs, so a key that never signed
    /// anything is not counted as one the ledger needs).
    key_recorded: bool,
}

impl Actor for Ledger {
    type Msg = LedgerMsg;
    type State = LedgerState;
    type Arguments = LedgerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<LedgerMsg>,
        args: LedgerArgs,
    ) -> Result<LedgerState, ActorProcessingErr> {
        let key = args
            .keys
            .get(&args.key_id)
            .ok_or_else(|| format!("signing key {:?} is not configured", args.key_id))?
            .as_bytes();
        let key = SigningKey::new(key);
        // A restart after a failed commit: its receipt block may be on
        // disk past the head; those seqs are numbered again from the head.
        args.store.drop_uncommitted_receipts()?;
        let (head_seq, head_hash) = match args.store.head()? {
            Some(h) => (h.seq, h.hash),
            None => (0, GENESIS_HASH.to_string()),
        };
        info!(head_seq, key_id = %args.key_id, "receipt ledger open");
        Ok(LedgerState {
            store: args.store,
            key_id: args.key_id,
            key,
            head_seq,
            head_hash,
            batch: Vec::new(),
            awaiting_flush: None,
            key_recorded: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<LedgerMsg>,
        msg: LedgerMsg,
        st: &mut LedgerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            LedgerMsg::Commit {
                receipts,
                writes,
                in_flight,
                unless_final,
                reply,
            } => {
                let reply = Reply::Commit {
                    unless_final,
                    left_out: Vec::new(),
                    reply,
                    in_flight,
                };
                Self::gather(&myself, st, receipts, writes, reply)?
            }
            LedgerMsg::DeadLetter {
                signal,
                receipt,
                writes,
                reply,
            } => {
                let reply = Reply::DeadLetter {
                    signal,
                    written: true,
                    reply,
                };
                Self::gather(&myself, st, vec![*receipt], writes, reply)?
            }
            LedgerMsg::Flush => Self::flush(&myself, st)?,
            LedgerMsg::Durable(generation) => {
                // An earlier batch's answer must not release a later one's wait.
                if st.awaiting_flush == Some(generation) {
                    st.awaiting_flush = None;
                }
                Self::flush(&myself, st)?;
            }
        }
        Ok(())
    }
}

struct Pending {
    receipts: Vec<ReceiptDraft>,
    writes: WriteSet,
    reply: Reply,
}

/// How a commit is answered, once its batch is durable.
enum Reply {
    /// With the seq of its last receipt and the signals whose end
    /// `unless_final` left out (see [`LedgerMsg::Commit`]).
    Commit {
        unless_final: bool,
        left_out: Vec<String>,
        reply: RpcReplyPort<Result<Committed, String>>,
        /// Let go of once answered (its engine's next incarnation waits).
        in_flight: Option<InFlight>,
    },
    /// With whether it was written: not if its signal was final already.
    /// A dead letter left out is answered after the batch it was left out
    /// of is durable too, so the decision that made it final (in that
    /// batch, or in one whose flush is still under way) is durable before
    /// the queue lets go of the signal.
    DeadLetter {
        signal: (String, String),
        written: bool,
        reply: RpcReplyPort<Result<bool, String>>,
    },
}

impl Reply {
    fn send(self, result: Result<u64, String>) {
        // A caller that gave up waiting has nothing to be told.
        match self {
            Reply::Commit {
                left_out,
                reply,
                in_flight,
                ..
            } => {
                drop(reply.send(result.map(|seq| Committed { seq, left_out })));
                drop(in_flight);
            }
            Reply::DeadLetter { written, reply, .. } => drop(reply.send(result.map(|_| written))),
        }
    }
}

/// Whether a dead letter for `signal` would follow its decision: the
/// signal is final in the store or in a commit of this batch (`earlier`).
/// Only dead letters pay for the look-up.
fn final_already(
    store: &Store,
    earlier: &WriteSet,
    signal: &(String, String),
) -> Result<bool, String> {
    let (tenant, id) = signal;
    let in_batch = earlier
        .signal_records
        .iter()
        .any(|r| r.status.is_final() && r.tenant_id == *tenant && r.signal_id == *id);
    if in_batch {
        return Ok(true);
    }
    let stored = store.signal_record(tenant, id).map_err(|e| e.to_string())?;
    Ok(stored.is_some_and(|r| r.status.is_final()))
}

/// Leaves out of `writes` and `receipts` those of every signal they would
/// write that is final already (in the store or earlier in the batch), so
/// a signal dead-lettered while its engine was down is not also ended by
/// the restored engine. Returns their ids.
fn keep_ends(
    store: &Store,
    earlier: &WriteSet,
    writes: &mut WriteSet,
    receipts: &mut Vec<ReceiptDraft>,
) -> Result<Vec<String>, String> {
    let mut ended = Vec::new();
    for r in &writes.signal_records {
        let signal = (r.tenant_id.clone(), r.signal_id.clone());
        if final_already(store, earlier, &signal)? {
            ended.push(signal);
        }
    }
    for (tenant, id) in &ended {
        info!(tenant = %tenant, signal = %id, "a restored engine's signal was ended meanwhile (dead-lettered); it is not ended again");
        writes
            .signal_records
            .retain(|r| !(r.tenant_id == *tenant && r.signal_id == *id));
        receipts
            .retain(|d| !(d.tenant_id == *tenant && d.signal_id.as_deref() == Some(id.as_str())));
    }
    Ok(ended.into_iter().map(|(_, id)| id).collect())
}

impl Ledger {
    /// Adds a commit to the batch; the first of a batch sends the `Flush`
    /// that queues behind everything already in the mailbox.
    fn gather(
        myself: &ActorRef<LedgerMsg>,
        st: &mut LedgerState,
        receipts: Vec<ReceiptDraft>,
        writes: WriteSet,
        reply: Reply,
    ) -> Result<(), ActorProcessingErr> {
        if st.batch.is_empty() {
            myself.send_message(LedgerMsg::Flush)?;
        }
        st.batch.push(Pending {
            receipts,
            writes,
            reply,
        });
        Ok(())
    }

    /// Seals every pending commit's receipts in arrival order and writes them
    /// all, with one signed head, as one atomic batch; each commit is answered
    /// once the batch is durable.
    fn flush(myself: &ActorRef<LedgerMsg>, st: &mut LedgerState) -> Result<(), ActorProcessingErr> {
        let flush_begun = st
            .awaiting_flush
            .is_some_and(|generation| st.store.flush_begun(generation));
        if flush_begun || st.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut st.batch);
        let mut seq = st.head_seq;
        let mut sealed: Vec<Receipt> = Vec::new();
        let mut writes = WriteSet::default();
        let mut replies = Vec::with_capacity(batch.len());
        for mut p in batch {
            if let Reply::Commit {
                unless_final: true,
                left_out,
                ..
            } = &mut p.reply
            {
                match keep_ends(&st.store, &writes, &mut p.writes, &mut p.receipts) {
                    Ok(ended) => *left_out = ended,
                    Err(e) => {
                        p.reply.send(Err(e));
                        continue;
                    }
                }
            }
            if let Reply::DeadLetter {
                signal, written, ..
            } = &mut p.reply
            {
                match final_already(&st.store, &writes, signal) {
                    Ok(false) => {}
                    Ok(true) => {
                        *written = false;
                        replies.push((p.reply, seq));
                        continue;
                    }
                    Err(e) => {
                        p.reply.send(Err(e));
                        continue;
                    }
                }
            }
            for draft in p.receipts {
                seq += 1;
                // Chained onto the receipt sealed just before (or the head).
                let prev = sealed.last().map_or(st.head_hash.as_str(), |r| &r.hash);
                let r = Receipt::seal(draft, seq, prev, &st.key_id, &st.key);
                sealed.push(r);
            }
            writes.extend(p.writes);
            replies.push((p.reply, seq));
        }
        let head = sealed
            .last()
            .map(|last| SignedHead::new(seq, &last.hash, &st.key_id, &st.key));
        if let Err(e) = st.store.commit(&sealed, head.as_ref(), &writes) {
            error!(error = %e, commits = replies.len(), "ledger commit failed");
            for (reply, _) in replies {
                reply.send(Err(e.to_string()));
            }
            // Part of the write may have landed: restart, so the chain
            // head is read back from the store rather than trusted.
            return Err(format!("ledger commit failed: {e}").into());
        }
        if !st.key_recorded && !sealed.is_empty() {
            // Durable with this batch: the flush awaited below begins after it.
            match crate::record_signing_key(&st.store, &st.key_id) {
                Ok(()) => st.key_recorded = true,
                // The signed head names the key too; tried again next batch.
                Err(e) => error!(error = %e, "cannot record the receipt signing key"),
            }
        }
        st.head_seq = seq;
        if let Some(last) = sealed.last() {
            st.head_hash.clone_from(&last.hash);
        }
        // One counter lookup per kind in the batch, not per receipt.
        for (kind, n) in tai_core::telemetry::tally(sealed.iter().map(|r| r.kind.as_str())) {
            metrics::counter!(tai_core::telemetry::RECEIPTS, "kind" => kind.to_string())
                .increment(n);
        }
        // Durability is awaited off the actor, so commits keep flowing
        // into the same group flush while it has not begun; the flush
        // carries them in order.
        let store = st.store.clone();
        let ledger = myself.clone();
        let generation = st.store.next_flush();
        st.awaiting_flush = Some(generation);
        tokio::spawn(async move {
            let result = store.durable().await.map_err(|e| e.to_string());
            let _ = ledger.send_message(LedgerMsg::Durable(generation));
            for (reply, seq) in replies {
                reply.send(result.clone().map(|()| seq));
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::rpc::CallResult;
    use tai_core::signal::{DeadLetter, Signal, SignalRecord, SignalStatus};

    fn signal(id: &str) -> Signal {
        Signal {
            id: id.into(),
            tenant_id: "t".into(),
            sku_id: "payments".into(),
            kind: "payment".into(),
            critical: false,
            payload: Default::default(),
            received_at_ms: 1,
            trace_id: None,
            traceparent: None,
        }
    }

    fn draft(kind: &str, id: &str) -> ReceiptDraft {
        ReceiptDraft {
            receipt_id: format!("rcpt_{kind}_{id}"),
            kind: kind.into(),
            tenant_id: "t".into(),
            sku_id: "payments".into(),
            signal_id: Some(id.into()),
            action_id: None,
            state_before: tai_core::signal::EngineState::Stable.into(),
            state_after: tai_core::signal::EngineState::Stable.into(),
            success: true,
            reason: None,
            trace_id: None,
            timestamp_ms: 1,
        }
    }

    fn record(id: &str, status: SignalStatus) -> SignalRecord {
        let mut r = SignalRecord::accepted(&signal(id));
        r.status = status;
        r
    }

    /// A `LedgerMsg::Commit` of one receipt; its answer.
    async fn commit(
        ledger: &ActorRef<LedgerMsg>,
        receipt: ReceiptDraft,
        writes: WriteSet,
        unless_final: bool,
    ) -> Committed {
        let kind = receipt.kind.clone();
        let answer = ractor::rpc::call(
            ledger,
            |reply| LedgerMsg::Commit {
                in_flight: None,
                receipts: vec![receipt],
                writes,
                unless_final,
                reply,
            },
            None,
        )
        .await;
        match answer {
            Ok(CallResult::Success(Ok(committed))) => committed,
            _ => panic!("the commit of {kind} was not answered"),
        }
    }

    async fn decide(ledger: &ActorRef<LedgerMsg>, id: &str) -> u64 {
        let writes = WriteSet {
            signal_records: vec![record(id, SignalStatus::Completed)],
            ..Default::default()
        };
        commit(ledger, draft("action_successful", id), writes, false)
            .await
            .seq
    }

    async fn dead_letter(ledger: &ActorRef<LedgerMsg>, id: &str) -> bool {
        let writes = WriteSet {
            signal_records: vec![record(id, SignalStatus::Deadlettered)],
            dead_letters: vec![DeadLetter {
                signal: signal(id),
                reason: "poison".into(),
                at_ms: 1,
            }],
            ..Default::default()
        };
        let answer = ractor::rpc::call(
            ledger,
            |reply| LedgerMsg::DeadLetter {
                signal: ("t".into(), id.into()),
                receipt: Box::new(draft("signal_deadlettered", id)),
                writes,
                reply,
            },
            None,
        )
        .await;
        match answer {
            Ok(CallResult::Success(Ok(written))) => written,
            _ => panic!("the dead letter of {id} was not answered"),
        }
    }

    async fn spawn(store: &Store) -> (ActorRef<LedgerMsg>, ractor::concurrency::JoinHandle<()>) {
        let args = LedgerArgs {
            store: store.clone(),
            key_id: "k1".into(),
            keys: BTreeMap::from([("k1".to_string(), "secret".to_string())]),
        };
        Actor::spawn(None, Ledger, args).await.unwrap()
    }

    /// Every receipt's kind and signal, in ledger order.
    fn kinds(store: &Store) -> Vec<(String, Option<String>)> {
        store
            .receipts(0, 100, None)
            .unwrap()
            .into_iter()
            .map(|r| (r.kind, r.signal_id))
            .collect()
    }

    #[tokio::test]
    async fn a_dead_letter_after_its_signals_decision_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (ledger, handle) = spawn(&store).await;

        // Sent together: the dead letter follows the decision in one batch
        // (or in the next, when the first flush began at once).
        let (seq, written) = tokio::join!(decide(&ledger, "s1"), dead_letter(&ledger, "s1"));
        assert_eq!((seq, written), (1, false));
        // In a later batch: the decision is read from the store, and the
        // answer waits for a flush (what made the signal final may not be
        // durable yet when the ledger reads it).
        let flushes = store.flushes();
        assert!(!dead_letter(&ledger, "s1").await);
        assert!(store.flushes() > flushes, "answered before a flush");
        // A signal nothing decided is dead-lettered.
        assert!(dead_letter(&ledger, "s2").await);
        // And once dead-lettered, a second dead letter of it is not written.
        assert!(!dead_letter(&ledger, "s2").await);

        assert_eq!(
            kinds(&store),
            vec![
                ("action_successful".to_string(), Some("s1".to_string())),
                ("signal_deadlettered".to_string(), Some("s2".to_string())),
            ]
        );
        let status = |id: &str| store.signal_record("t", id).unwrap().unwrap().status;
        assert_eq!(status("s1"), SignalStatus::Completed);
        assert_eq!(status("s2"), SignalStatus::Deadlettered);
        assert!(store.dead_letter("t", "s1").unwrap().is_none());
        assert!(store.dead_letter("t", "s2").unwrap().is_some());
        assert_eq!(store.head().unwrap().unwrap().seq, 2);

        ledger.stop(None);
        handle.await.unwrap();
    }
    /// What an engine restored from its checkpoint commits when it finds an
    /// action in flight: the action `interrupted` (its signal failed) and
    /// the checkpoint leaving `action_pending`.
    async fn restore(ledger: &ActorRef<LedgerMsg>, id: &str, checkpoint: &[u8]) -> Committed {
        let writes = WriteSet {
            signal_records: vec![record(id, SignalStatus::Failed)],
            checkpoints: vec![("t".into(), "payments".into(), checkpoint.to_vec())],
            ..Default::default()
        };
        commit(ledger, draft("action_failed", id), writes, true).await
    }

    #[tokio::test]
    async fn the_signing_key_is_recorded_once_it_has_signed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (ledger, handle) = spawn(&store).await;
        let keys = BTreeMap::new();
        // Open and idle: k1 signed nothing, so the ledger does not need it.
        assert!(crate::missing_signing_keys(&store, &keys)
            .unwrap()
            .is_empty());
        decide(&ledger, "s1").await;
        assert_eq!(crate::missing_signing_keys(&store, &keys).unwrap(), ["k1"]);
        ledger.stop(None);
        handle.await.unwrap();
    }

    #[tokio::test]
    async fn a_restored_engine_does_not_end_a_signal_dead_lettered_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (ledger, handle) = spawn(&store).await;

        // The queue dead-lettered s1 (its engine kept crashing with it)
        // before the restarted engine recorded its action interrupted: one
        // end, and the checkpoint still leaves action_pending.
        assert!(dead_letter(&ledger, "s1").await);
        // Answered with s1 left out, so the engine does not count it decided.
        let left_out = |seq: u64, ids: &[&str]| Committed {
            seq,
            left_out: ids.iter().map(|id| id.to_string()).collect(),
        };
        assert_eq!(
            restore(&ledger, "s1", b"after s1").await,
            left_out(1, &["s1"])
        );
        assert_eq!(
            store.checkpoint("t", "payments").unwrap().as_deref(),
            Some(&b"after s1"[..])
        );
        // The same two in one batch.
        let (written, restored) = tokio::join!(
            dead_letter(&ledger, "s2"),
            restore(&ledger, "s2", b"after s2")
        );
        assert!(written);
        assert_eq!(restored, left_out(2, &["s2"]));
        // A restored signal nothing else ended is ended by the restore.
        assert_eq!(restore(&ledger, "s3", b"after s3").await, left_out(3, &[]));

        assert_eq!(
            kinds(&store),
            vec![
                ("signal_deadlettered".to_string(), Some("s1".to_string())),
                ("signal_deadlettered".to_string(), Some("s2".to_string())),
                ("action_failed".to_string(), Some("s3".to_string())),
            ]
        );
        let status = |id: &str| store.signal_record("t", id).unwrap().unwrap().status;
        assert_eq!(status("s1"), SignalStatus::Deadlettered);
        assert_eq!(status("s2"), SignalStatus::Deadlettered);
        assert_eq!(status("s3"), SignalStatus::Failed);
        assert_eq!(
            store.checkpoint("t", "payments").unwrap().as_deref(),
            Some(&b"after s3"[..])
        );

        ledger.stop(None);
        handle.await.unwrap();
    }
}
