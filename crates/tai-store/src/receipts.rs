//! The stored form of a receipt block (`r/`), through [`crate::codec`]:
//! receipt blocks are the bulk of what the ledger writes. JSON blocks
//! written before (they start with `[`) still read.
//!
//! The stored struct mirrors [`Receipt`] field for field, with the states
//! externally tagged: `ReceiptState` is untagged in JSON, which a
//! non-self-describing format cannot read back.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use tai_core::receipt::Receipt;
use tai_core::signal::{BreakerState, EngineState, QueuedState, ReceiptState};

use crate::{codec, Result};

#[derive(Serialize, Deserialize)]
enum State {
    Engine(EngineState),
    Breaker(BreakerState),
    Queue(QueuedState),
}

impl From<ReceiptState> for State {
    fn from(s: ReceiptState) -> Self {
        match s {
            ReceiptState::Engine(s) => State::Engine(s),
            ReceiptState::Breaker(s) => State::Breaker(s),
            ReceiptState::Queue(s) => State::Queue(s),
        }
    }
}

impl From<State> for ReceiptState {
    fn from(s: State) -> Self {
        match s {
            State::Engine(s) => ReceiptState::Engine(s),
            State::Breaker(s) => ReceiptState::Breaker(s),
            State::Queue(s) => ReceiptState::Queue(s),
        }
    }
}

/// Borrows a receipt to write it, owns what it reads.
#[derive(Serialize, Deserialize)]
struct Stored<'a> {
    seq: u64,
    receipt_id: Cow<'a, str>,
    kind: Cow<'a, str>,
    tenant_id: Cow<'a, str>,
    sku_id: Cow<'a, str>,
    signal_id: Option<Cow<'a, str>>,
    action_id: Option<Cow<'a, str>>,
    state_before: State,
    state_after: State,
    success: bool,
    reason: Option<Cow<'a, str>>,
    trace_id: Option<Cow<'a, str>>,
    timestamp_ms: u64,
    prev_hash: Cow<'a, str>,
    hash: Cow<'a, str>,
    key_id: Cow<'a, str>,
    signature: Cow<'a, str>,
}

fn borrow(o: &Option<String>) -> Option<Cow<'_, str>> {
    o.as_deref().map(Cow::Borrowed)
}

fn own(o: Option<Cow<'_, str>>) -> Option<String> {
    o.map(Cow::into_owned)
}

impl<'a> From<&'a Receipt> for Stored<'a> {
    fn from(r: &'a Receipt) -> Self {
        Stored {
            seq: r.seq,
            receipt_id: Cow::Borrowed(&r.receipt_id),
            kind: Cow::Borrowed(&r.kind),
            tenant_id: Cow::Borrowed(&r.tenant_id),
            sku_id: Cow::Borrowed(&r.sku_id),
            signal_id: borrow(&r.signal_id),
            action_id: borrow(&r.action_id),
            state_before: r.state_before.into(),
            state_after: r.state_after.into(),
            success: r.success,
            reason: borrow(&r.reason),
            trace_id: borrow(&r.trace_id),
            timestamp_ms: r.timestamp_ms,
            prev_hash: Cow::Borrowed(&r.prev_hash),
            hash: Cow::Borrowed(&r.hash),
            key_id: Cow::Borrowed(&r.key_id),
            signature: Cow::Borrowed(&r.signature),
        }
    }
}

impl From<Stored<'_>> for Receipt {
    fn from(s: Stored<'_>) -> Self {
        Receipt {
            seq: s.seq,
            receipt_id: s.receipt_id.into_owned(),
            kind: s.kind.into_owned(),
            tenant_id: s.tenant_id.into_owned(),
            sku_id: s.sku_id.into_owned(),
            signal_id: own(s.signal_id),
            action_id: own(s.action_id),
            state_before: s.state_before.into(),
            state_after: s.state_after.into(),
            success: s.success,
            reason: own(s.reason),
            trace_id: own(s.trace_id),
            timestamp_ms: s.timestamp_ms,
            prev_hash: s.prev_hash.into_owned(),
            hash: s.hash.into_owned(),
            key_id: s.key_id.into_owned(),
            signature: s.signature.into_owned(),
        }
    }
}

pub(crate) fn encode(receipts: &[Receipt]) -> Vec<u8> {
    let stored: Vec<Stored<'_>> = receipts.iter().map(Stored::from).collect();
    codec::encode_v1(&stored)
}

pub(crate) fn decode_block(key: &[u8], bytes: &[u8]) -> Result<Vec<Receipt>> {
    if bytes.first() == Some(&b'[') {
        return crate::decode(key, bytes);
    }
    let stored: Vec<Stored<'static>> = codec::decode_v1(key, bytes)?;
    Ok(stored.into_iter().map(Receipt::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreError;
    use tai_core::receipt::ReceiptDraft;

    fn sealed(seq: u64, prev: &str, state_after: ReceiptState, reason: Option<&str>) -> Receipt {
        let d = ReceiptDraft {
            receipt_id: format!("r{seq}"),
            kind: "action_generated".into(),
            tenant_id: "acme".into(),
            sku_id: "payments".into(),
            signal_id: Some("s1".into()),
            action_id: seq.is_multiple_of(2).then(|| "a1".into()),
            state_before: EngineState::Stable.into(),
            state_after,
            success: reason.is_none(),
            reason: reason.map(str::to_string),
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            timestamp_ms: 1_700_000_000_000 + seq,
        };
        Receipt::seal(d, seq, prev, "k", b"key")
    }

    fn one() -> Vec<Receipt> {
        let genesis = tai_core::receipt::GENESIS_HASH;
        vec![sealed(1, genesis, EngineState::Stable.into(), None)]
    }

    #[test]
    fn every_kind_of_state_round_trips_and_still_verifies() {
        let a = sealed(
            1,
            tai_core::receipt::GENESIS_HASH,
            EngineState::ActionPending.into(),
            None,
        );
        let b = sealed(2, &a.hash, BreakerState::Open.into(), Some("timeout"));
        let c = sealed(3, &b.hash, QueuedState::Deadlettered.into(), None);
        let block = vec![a, b, c];
        let bytes = encode(&block);
        assert_eq!(bytes[0], 1, "the version byte");
        let back = decode_block(b"r/x", &bytes).unwrap();
        assert_eq!(back, block);
        for r in &back {
            assert_eq!(r.compute_hash(), r.hash, "seq {}", r.seq);
        }
        let json = serde_json::to_vec(&block).unwrap();
        assert!(
            bytes.len() * 3 < json.len() * 2,
            "{} vs {}",
            bytes.len(),
            json.len()
        );
    }

    #[test]
    fn json_blocks_written_before_still_read() {
        let block = one();
        let json = serde_json::to_vec(&block).unwrap();
        assert_eq!(decode_block(b"r/x", &json).unwrap(), block);
    }

    #[test]
    fn a_damaged_block_is_reported_with_its_key() {
        let block = one();
        let bytes = encode(&block);
        for bad in [&bytes[..bytes.len() - 3], &[7u8, 1, 2][..], &[][..]] {
            match decode_block(b"r/x", bad) {
                Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, "r/x"),
                other => panic!("not reported: {other:?}"),
            }
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_block(b"r/x", &longer).is_err(), "trailing bytes");
    }
}
