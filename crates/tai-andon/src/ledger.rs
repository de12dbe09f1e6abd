//! `andon_ledger`: the one writer of receipts. It numbers, chains and signs
//! each decision's receipts, writes them with the decision's other writes in
//! one atomic batch, and answers once the batch is durable. One writer keeps
//! the chain in order: a later receipt is never on disk before an earlier one.

use std::collections::BTreeMap;

use ractor::RpcReplyPort;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tai_core::msg::{LedgerMsg, WriteSet};
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
                reply,
            } => {
                // Everything already in the mailbox joins this batch: the
                // flush request queues behind it.
                if st.batch.is_empty() {
                    myself.send_message(LedgerMsg::Flush)?;
                }
                st.batch.push(Pending {
                    receipts,
                    writes,
                    reply,
                });
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
    reply: RpcReplyPort<Result<u64, String>>,
}

impl Ledger {
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
        for p in batch {
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
                let _ = reply.send(Err(e.to_string()));
            }
            // Part of the write may have landed: restart, so the chain
            // head is read back from the store rather than trusted.
            return Err(format!("ledger commit failed: {e}").into());
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
                let _ = reply.send(result.clone().map(|()| seq));
            }
        });
        Ok(())
    }
}
