//! Taking a signal out of the queue as a dead letter without a decision
//! (poison): the dead letter, the signal's status and a `signal_deadlettered`
//! receipt are one ledger commit, so the ledger proves what the queue dropped.

use std::time::Duration;

use ractor::rpc::CallResult;
use tai_core::msg::{LedgerMsg, WriteSet, ANDON_LEDGER};
use tai_core::receipt::ReceiptDraft;
use tai_core::signal::{now_ms, DeadLetter, QueuedState, SignalRecord, SignalStatus};
use tai_store::Store;

const LEDGER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the queue knows of a message it gives up on.
pub struct Poisoned {
    pub tenant_id: String,
    pub sku_id: String,
    pub signal_id: Option<String>,
    pub trace_id: Option<String>,
    /// The signal, when the message was one (a malformed message is not).
    pub letter: Option<DeadLetter>,
    pub reason: String,
}

/// Commits the dead letter (if any) with its receipt; `Ok` once durable:
/// `Ok(true)` if written, `Ok(false)` if its signal was final already (a
/// copy of it decided, or dead-lettered, first), when nothing is written.
pub async fn commit(store: &Store, p: Poisoned) -> Result<bool, String> {
    let receipt_id = tai_core::receipt::prefixed_ulid("rcpt_");
    let mut writes = WriteSet::default();
    let mut signal = None;
    if let Some(letter) = p.letter {
        let s = &letter.signal;
        signal = Some((s.tenant_id.clone(), s.id.clone()));
        let mut record = store
            .signal_record(&s.tenant_id, &s.id)
            .map_err(|e| e.to_string())?
            .unwrap_or_else(|| SignalRecord::accepted(s));
        record.status = SignalStatus::Deadlettered;
        record.reason = Some(p.reason.clone());
        record.receipts.push(receipt_id.clone());
        writes.signal_records.push(record);
        writes.dead_letters.push(letter);
    }
    let draft = ReceiptDraft {
        receipt_id,
        kind: "signal_deadlettered".into(),
        tenant_id: p.tenant_id,
        sku_id: p.sku_id,
        signal_id: p.signal_id,
        action_id: None,
        state_before: QueuedState::Queued.into(),
        state_after: QueuedState::Deadlettered.into(),
        success: false,
        reason: Some(p.reason),
        trace_id: p.trace_id,
        timestamp_ms: now_ms(),
    };
    let ledger = ractor::registry::where_is(ANDON_LEDGER)
        .ok_or_else(|| format!("{ANDON_LEDGER} is not running"))?;
    let call = match signal {
        // The ledger writes it only if the signal is not final by then.
        Some(signal) => {
            ractor::rpc::call(
                &ledger,
                |reply| LedgerMsg::DeadLetter {
                    signal,
                    receipt: Box::new(draft),
                    writes,
                    reply,
                },
                Some(LEDGER_TIMEOUT),
            )
            .await
        }
        // A malformed message: no signal to be decided elsewhere.
        None => ractor::rpc::call(
            &ledger,
            |reply| LedgerMsg::Commit {
                receipts: vec![draft],
                writes,
                in_flight: None,
                unless_final: false,
                reply,
            },
            Some(LEDGER_TIMEOUT),
        )
        .await
        .map(|c| c.map(|r| r.map(|_| true))),
    };
    match call {
        Ok(CallResult::Success(Ok(written))) => Ok(written),
        Ok(CallResult::Success(Err(e))) => Err(format!("ledger commit failed: {e}")),
        Ok(CallResult::Timeout) => Err(format!("{ANDON_LEDGER} did not answer in time")),
        Ok(CallResult::SenderError) => Err(format!("{ANDON_LEDGER} stopped before answering")),
        Err(e) => Err(format!("{ANDON_LEDGER} unreachable: {e}")),
    }
}
