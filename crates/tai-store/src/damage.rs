//! Damaged stored values: whatever a disk, a bad copy or a hand edit leaves
//! under a key, reading it gives the value or `StoreError::Corrupt` naming
//! the key, never a panic and never an allocation sized by a damaged length
//! (a panic at open would be a node that cannot start, with no word of
//! which key is at fault).
//!
//! Each case starts from a value the store writes (a queue block, a signal
//! record, a receipt block, a redo record) and damages it: bytes
//! overwritten, the value cut short, bytes put in, or bytes of its own.

use std::sync::Arc;

use proptest::prelude::*;
use tai_core::msg::Delivery;
use tai_core::receipt::{Receipt, ReceiptDraft, SigningKey, GENESIS_HASH};
use tai_core::signal::{EngineState, Payload, Signal, SignalRecord};

use crate::{codec, receipts, redo, StoreError};

/// One way to damage a value.
#[derive(Debug, Clone)]
enum Damage {
    /// Bytes from `at` (a share of the length) replaced.
    Overwrite { at: f64, bytes: Vec<u8> },
    /// The value cut at `at`.
    Truncate { at: f64 },
    /// Bytes put in at `at`.
    Insert { at: f64, bytes: Vec<u8> },
    /// A huge length put in at `at`: bincode's varint for a u64 (marker
    /// 0xfd) or a u32 (0xfc), all but its top bits set.
    Huge { at: f64, wide: bool },
}

fn damage() -> impl Strategy<Value = Damage> {
    let at = 0.0..1.0f64;
    let bytes = prop::collection::vec(any::<u8>(), 1..9);
    prop_oneof![
        (at.clone(), bytes.clone()).prop_map(|(at, bytes)| Damage::Overwrite { at, bytes }),
        at.clone().prop_map(|at| Damage::Truncate { at }),
        (at.clone(), bytes).prop_map(|(at, bytes)| Damage::Insert { at, bytes }),
        (at, any::<bool>()).prop_map(|(at, wide)| Damage::Huge { at, wide }),
    ]
}

fn apply(value: &[u8], damages: &[Damage]) -> Vec<u8> {
    let mut v = value.to_vec();
    for d in damages {
        let pos = |at: f64| ((v.len() as f64 * at) as usize).min(v.len());
        match d {
            Damage::Overwrite { at, bytes } => {
                let start = pos(*at);
                for (i, b) in bytes.iter().enumerate() {
                    if let Some(x) = v.get_mut(start + i) {
                        *x = *b;
                    }
                }
            }
            Damage::Truncate { at } => v.truncate(pos(*at)),
            Damage::Insert { at, bytes } => {
                let at = pos(*at);
                v.splice(at..at, bytes.iter().copied());
            }
            Damage::Huge { at, wide } => {
                let at = pos(*at);
                let len: &[u8] = if *wide {
                    &[0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f]
                } else {
                    &[0xfc, 0xff, 0xff, 0xff, 0x7f]
                };
                v.splice(at..at, len.iter().copied());
            }
        }
    }
    v
}

fn signal(n: u64) -> Signal {
    Signal {
        id: format!("pay-{n}"),
        tenant_id: if n.is_multiple_of(2) {
            "acme"
        } else {
            "globex"
        }
        .into(),
        sku_id: "payments".into(),
        kind: "payment".into(),
        critical: n.is_multiple_of(3),
        payload: Payload::from_text(format!(r#"{{"amount": {n}, "currency": "USD"}}"#))
            .expect("an object"),
        received_at_ms: 1_700_000_000_000 + n,
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
    }
}

fn queue_block() -> Vec<u8> {
    let deliveries: Vec<Delivery> = (1..=4)
        .map(|seq| Delivery {
            seq,
            signal: Arc::new(signal(seq)),
            redelivered: false,
        })
        .collect();
    codec::encode_block(&deliveries)
}

fn record() -> SignalRecord {
    codec::tests::record(Some("velocity"))
}

fn receipt_block() -> Vec<u8> {
    let key = SigningKey::new(b"key");
    let mut prev = GENESIS_HASH.to_string();
    let mut block: Vec<Receipt> = Vec::new();
    for seq in 1..=4u64 {
        let d = ReceiptDraft {
            receipt_id: format!("rcpt_{}", ulid::Ulid::new()),
            kind: "action_generated".into(),
            tenant_id: if seq.is_multiple_of(2) {
                "acme"
            } else {
                "globex"
            }
            .into(),
            sku_id: "payments".into(),
            signal_id: Some(format!("pay-{seq}")),
            action_id: Some(format!("act_{}", ulid::Ulid::new())),
            state_before: EngineState::Stable.into(),
            state_after: EngineState::ActionPending.into(),
            success: seq != 3,
            reason: (seq == 3).then(|| "velocity".into()),
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            timestamp_ms: 1_700_000_000_000 + seq,
        };
        let r = Receipt::seal(d, seq, &prev, "k1", &key);
        prev = r.hash.clone();
        block.push(r);
    }
    receipts::encode(&block)
}

fn redo_record() -> Vec<u8> {
    let mut ops = redo::Ops::default();
    ops.insert(b"s/acme\0pay-1".to_vec(), codec::encode_record(&record()));
    ops.insert(b"e/acme\0payments".to_vec(), b"checkpoint".to_vec());
    ops.remove(b"q/\0\0\0\0\0\0\0\x01");
    ops.encode()
}

/// A read gave its value or an error naming the key it was given.
fn named<T>(read: crate::Result<T>, key: &[u8]) -> Result<(), TestCaseError> {
    match read {
        Ok(_) => Ok(()),
        Err(StoreError::Corrupt {
            key: named,
            message,
        }) => {
            prop_assert_eq!(named.as_bytes(), key);
            prop_assert!(!message.is_empty());
            Ok(())
        }
        Err(other) => Err(TestCaseError::fail(format!(
            "not a corrupt-record error: {other}"
        ))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn a_damaged_queue_block_reads_or_is_named(damages in prop::collection::vec(damage(), 1..4)) {
        let key = b"q/\0\0\0\0\0\0\0\x01";
        let bytes = apply(&queue_block(), &damages);
        named(codec::decode_block(key, &bytes), key)?;
    }

    #[test]
    fn a_damaged_signal_record_reads_or_is_named(
        damages in prop::collection::vec(damage(), 1..4),
        v1 in any::<bool>(),
    ) {
        let key = b"s/acme\0pay-1";
        let r = record();
        let value = if v1 { codec::encode_record_v1(&r) } else { codec::encode_record(&r) };
        let bytes = apply(&value, &damages);
        named(codec::decode_record(key, &bytes), key)?;
    }

    #[test]
    fn a_damaged_receipt_block_reads_or_is_named(
        damages in prop::collection::vec(damage(), 1..4),
        tenant in prop::option::of(prop_oneof![Just("acme"), Just("globex"), Just("initech")]),
    ) {
        let key = b"r/\0\0\0\0\0\0\0\x04";
        let bytes = apply(&receipt_block(), &damages);
        named(receipts::decode_block_of(key, &bytes, tenant), key)?;
    }

    #[test]
    fn a_damaged_redo_record_reads_or_is_refused(damages in prop::collection::vec(damage(), 1..4)) {
        // `redo::recover` names the key of a record this refuses.
        let _ = redo::Ops::decode(&apply(&redo_record(), &damages));
    }

    #[test]
    fn any_bytes_read_or_are_named(bytes in prop::collection::vec(any::<u8>(), 0..256), first in 0u8..4) {
        // The version bytes the readers branch on, then anything.
        let mut v = vec![[1, 2, b'{', b'['][first as usize]];
        v.extend_from_slice(&bytes);
        named(codec::decode_block(b"q/x", &v), b"q/x")?;
        named(codec::decode_record(b"s/acme\0x", &v), b"s/acme\0x")?;
        named(receipts::decode_block_of(b"r/x", &v, None), b"r/x")?;
        named(receipts::decode_block_of(b"r/x", &v, Some("acme")), b"r/x")?;
    }
}

#[test]
fn the_undamaged_values_read_back() {
    // The cases above start from values that read: a damaged copy is
    // what is being tested, not a value that never read.
    assert_eq!(
        codec::decode_block(b"q/x", &queue_block()).unwrap().len(),
        4
    );
    let r = record();
    assert_eq!(
        codec::decode_record(b"s/acme\0pay-1", &codec::encode_record(&r)).unwrap(),
        r
    );
    assert_eq!(
        receipts::decode_block_of(b"r/x", &receipt_block(), Some("acme"))
            .unwrap()
            .len(),
        2
    );
    assert_eq!(redo::Ops::decode(&redo_record()).unwrap().keys().count(), 3);
}
