//! The stored form of a receipt block (`r/`), through [`crate::codec`]:
//! receipt blocks are the bulk of what the ledger writes, and sled writes
//! each one several times over (its log, leaf splits, segment cleaning),
//! so they are packed ([`crate::packed`]): ids, hashes and signatures as
//! bytes, the texts that repeat in a batch once, seqs and timestamps as
//! differences from the receipt before, and a `prev_hash` that is the
//! previous receipt's `hash` left out. Blocks written before in version 1
//! or as JSON (they start with `[`) still read.
//!
//! The stored struct mirrors [`Receipt`] field for field, with the states
//! externally tagged: `ReceiptState` is untagged in JSON, which a
//! non-self-describing format cannot read back.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use tai_core::receipt::Receipt;
use tai_core::signal::{BreakerState, EngineState, QueuedState, ReceiptState};

use crate::packed::{self, Interner, Packed};
use crate::{codec, Result, StoreError};

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

/// A block in version 2: the texts, then the receipts.
#[derive(Serialize, Deserialize)]
struct Block<'a> {
    table: Vec<Cow<'a, str>>,
    receipts: Vec<Packed2<'a>>,
}

/// One receipt in version 2. `seq` and `timestamp_ms` are differences
/// from the receipt before (from 0 for the first, wrapping); `prev_hash`
/// is `None` when it is the previous receipt's `hash`.
#[derive(Serialize, Deserialize)]
struct Packed2<'a> {
    seq: u64,
    receipt_id: Packed<'a>,
    kind: Packed<'a>,
    tenant_id: Packed<'a>,
    sku_id: Packed<'a>,
    signal_id: Option<Packed<'a>>,
    action_id: Option<Packed<'a>>,
    state_before: State,
    state_after: State,
    success: bool,
    reason: Option<Packed<'a>>,
    trace_id: Option<Packed<'a>>,
    timestamp_ms: i64,
    prev_hash: Option<Packed<'a>>,
    hash: Packed<'a>,
    key_id: Packed<'a>,
    signature: Packed<'a>,
}

/// A block as builds before the packed form wrote it (for tests of data
/// dirs those builds left).
#[cfg(test)]
pub(crate) fn encode_v1(receipts: &[Receipt]) -> Vec<u8> {
    codec::encode_v1(&receipts.iter().map(Stored::from).collect::<Vec<_>>())
}

pub(crate) fn encode(receipts: &[Receipt]) -> Vec<u8> {
    let mut texts = Interner::default();
    let mut before: Option<&Receipt> = None;
    let mut packed = Vec::with_capacity(receipts.len());
    for r in receipts {
        let (seq, ts) = before.map_or((0, 0), |b| (b.seq, b.timestamp_ms));
        let reason = r.reason.as_deref().map(|s| texts.pack(s));
        packed.push(Packed2 {
            seq: r.seq.wrapping_sub(seq),
            receipt_id: packed::pack(&r.receipt_id),
            kind: texts.pack(&r.kind),
            tenant_id: texts.pack(&r.tenant_id),
            sku_id: texts.pack(&r.sku_id),
            signal_id: r.signal_id.as_deref().map(packed::pack),
            action_id: r.action_id.as_deref().map(packed::pack),
            state_before: r.state_before.into(),
            state_after: r.state_after.into(),
            success: r.success,
            reason,
            trace_id: r.trace_id.as_deref().map(packed::pack),
            timestamp_ms: r.timestamp_ms.wrapping_sub(ts) as i64,
            prev_hash: match before {
                Some(b) if b.hash == r.prev_hash => None,
                _ => Some(packed::pack(&r.prev_hash)),
            },
            hash: packed::pack(&r.hash),
            key_id: texts.pack(&r.key_id),
            signature: packed::pack(&r.signature),
        });
        before = Some(r);
    }
    // A packed receipt takes ~150 bytes (its hash and signature 32 each);
    // the table of the block's repeated texts is small.
    let size = 160 * receipts.len() + 128;
    codec::encode_sized(
        codec::V2,
        &Block {
            table: texts.into_table(),
            receipts: packed,
        },
        size,
    )
}

/// The receipts of `block`, or only those of `tenant`. A receipt of
/// another tenant costs a comparison of its packed tenant (an index into
/// the table, for a tenant that is text) and the sums of its seq and
/// timestamp: its fields are not unpacked, so damage inside them is left
/// for verification, which reads every receipt, to report.
fn unpack_block(key: &[u8], block: Block<'_>, tenant: Option<&str>) -> Result<Vec<Receipt>> {
    let corrupt = |message: String| StoreError::Corrupt {
        key: crate::check::key_text(key),
        message,
    };
    let table = block.table;
    let text = |p: Packed<'_>| packed::unpack(p, &table).map_err(corrupt);
    let opt = |p: Option<Packed<'_>>| p.map(text).transpose();
    // The tenant as the block would have packed it: its entry in the
    // table, or its compact form (a tenant named like a ULID or a hash).
    let wanted = tenant.map(|t| (table.iter().position(|s| s == t), packed::pack(t)));
    let keep = |p: &Packed<'_>| match (&wanted, p) {
        (None, _) => true,
        (Some((entry, _)), Packed::Ref(i)) => *entry == Some(*i as usize),
        (Some((_, packed)), p) => p == packed,
    };
    let mut out: Vec<Receipt> = Vec::with_capacity(if tenant.is_none() {
        block.receipts.len()
    } else {
        0
    });
    let (mut seq, mut ts) = (0u64, 0u64);
    // The receipt before's hash, and whether it is `out`'s last.
    let mut before: Option<(Packed<'_>, bool)> = None;
    for p in block.receipts {
        seq = seq.wrapping_add(p.seq);
        ts = ts.wrapping_add(p.timestamp_ms as u64);
        let kept = keep(&p.tenant_id);
        let prev = before.replace((p.hash.clone(), kept));
        if !kept {
            continue;
        }
        let prev_hash = match (p.prev_hash, prev) {
            (Some(h), _) => text(h)?,
            (None, Some((h, kept))) => match out.last() {
                Some(b) if kept => b.hash.clone(),
                _ => text(h)?,
            },
            (None, None) => return Err(corrupt("the first receipt has no prev_hash".into())),
        };
        out.push(Receipt {
            seq,
            receipt_id: text(p.receipt_id)?,
            kind: text(p.kind)?,
            tenant_id: text(p.tenant_id)?,
            sku_id: text(p.sku_id)?,
            signal_id: opt(p.signal_id)?,
            action_id: opt(p.action_id)?,
            state_before: p.state_before.into(),
            state_after: p.state_after.into(),
            success: p.success,
            reason: opt(p.reason)?,
            trace_id: opt(p.trace_id)?,
            timestamp_ms: ts,
            prev_hash,
            hash: text(p.hash)?,
            key_id: text(p.key_id)?,
            signature: text(p.signature)?,
        });
    }
    Ok(out)
}

/// Whether a version 2 block may hold receipts of `tenant`, from its table
/// alone (it comes first, and is read without copying): a tenant whose
/// name is text is in the table of every block it has a receipt in. A
/// table that does not read says yes, so that the whole block is decoded
/// and its damage reported.
fn may_hold(bytes: &[u8], tenant: &str) -> bool {
    #[derive(Deserialize)]
    struct Table<'a> {
        #[serde(borrow)]
        table: Vec<&'a str>,
    }
    if !matches!(packed::pack(tenant), Packed::Text(_)) {
        return true;
    }
    bincode::serde::borrow_decode_from_slice::<Table<'_>, _>(
        &bytes[1..],
        bincode::config::standard(),
    )
    .map_or(true, |(t, _)| t.table.contains(&tenant))
}

pub(crate) fn decode_block(key: &[u8], bytes: &[u8]) -> Result<Vec<Receipt>> {
    decode_block_of(key, bytes, None)
}

/// The receipts of a stored block, or only those of `tenant`.
pub(crate) fn decode_block_of(
    key: &[u8],
    bytes: &[u8],
    tenant: Option<&str>,
) -> Result<Vec<Receipt>> {
    let mut receipts: Vec<Receipt> = match bytes.first() {
        Some(&codec::V2) => {
            if tenant.is_some_and(|t| !may_hold(bytes, t)) {
                return Ok(Vec::new());
            }
            let block = codec::decode_versioned(codec::V2, key, bytes)?;
            return unpack_block(key, block, tenant);
        }
        Some(b'[') => crate::decode(key, bytes)?,
        _ => {
            let stored: Vec<Stored<'static>> = codec::decode_v1(key, bytes)?;
            stored.into_iter().map(Receipt::from).collect()
        }
    };
    if let Some(t) = tenant {
        receipts.retain(|r| r.tenant_id == t);
    }
    Ok(receipts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreError;
    use tai_core::receipt::{ReceiptDraft, SigningKey};

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
        Receipt::seal(d, seq, prev, "k", &SigningKey::new(b"key"))
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
        assert_eq!(bytes[0], codec::V2, "the version byte");
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

    /// A ledger batch as the node writes it: ids, trace ids, two tenants.
    fn batch() -> Vec<Receipt> {
        batch_of(6, |seq| if seq <= 2 { "acme" } else { "globex" }.into())
    }

    /// `n` receipts, the one of seq `s` from tenant `tenant(s)`.
    fn batch_of(n: u64, tenant: impl Fn(u64) -> String) -> Vec<Receipt> {
        let mut prev = tai_core::receipt::GENESIS_HASH.to_string();
        (1..=n)
            .map(|seq| {
                let d = ReceiptDraft {
                    receipt_id: format!("rcpt_{}", ulid::Ulid::new()),
                    kind: if seq % 2 == 1 {
                        "action_generated"
                    } else {
                        "action_successful"
                    }
                    .into(),
                    tenant_id: tenant(seq),
                    sku_id: "payments".into(),
                    signal_id: Some(format!("pay-{}", seq.div_ceil(2))),
                    action_id: Some(format!("act_{}", ulid::Ulid::new())),
                    state_before: EngineState::Stable.into(),
                    state_after: EngineState::Stable.into(),
                    success: true,
                    reason: None,
                    trace_id: Some(format!("{:032x}", u128::from(seq) * 0x1234_5678_9abc)),
                    timestamp_ms: 1_700_000_000_000 + seq * 3,
                };
                let r = Receipt::seal(d, seq, &prev, "k1", &SigningKey::new(b"key"));
                prev = r.hash.clone();
                r
            })
            .collect()
    }

    #[test]
    fn a_batch_packs_to_well_under_version_1_and_reads_back_the_same() {
        let block = batch();
        let bytes = encode(&block);
        assert_eq!(bytes[0], codec::V2);
        assert_eq!(decode_block(b"r/x", &bytes).unwrap(), block);
        let older = encode_v1(&block);
        assert!(
            bytes.len() * 2 < older.len(),
            "{} vs {} in version 1",
            bytes.len(),
            older.len()
        );
        assert_eq!(decode_block(b"r/x", &older).unwrap(), block);
    }

    #[test]
    fn one_tenants_receipts_read_back_exactly_as_from_the_whole_block() {
        // Tenants interleaved, one named like a ULID (packed as its bytes,
        // not into the table), and links left out or broken.
        let odd = ulid::Ulid::new().to_string();
        let tenant = |seq: u64| match seq % 5 {
            0 | 3 => "acme".to_string(),
            1 => odd.clone(),
            _ => format!("t{}", seq % 2),
        };
        let mut block = batch_of(23, tenant);
        block[7].prev_hash = "not a hash".into();
        block[12].prev_hash = block[2].hash.clone();
        let whole = encode(&block);
        let tenants = [odd.as_str(), "acme", "t0", "t1", "nobody", "acm", ""];
        let encodings = [
            ("version 2", whole.clone()),
            ("version 1", encode_v1(&block)),
            ("json", serde_json::to_vec(&block).unwrap()),
        ];
        for (form, bytes) in &encodings {
            assert_eq!(
                decode_block_of(b"r/x", bytes, None).unwrap(),
                block,
                "{form}"
            );
            for t in tenants {
                let mine: Vec<Receipt> =
                    block.iter().filter(|r| r.tenant_id == t).cloned().collect();
                assert_eq!(
                    decode_block_of(b"r/x", bytes, Some(t)).unwrap(),
                    mine,
                    "{form}, tenant {t:?}"
                );
            }
        }
        assert_eq!(
            decode_block_of(b"r/x", &whole, Some("acme")).unwrap().len(),
            9
        );
    }

    #[test]
    fn whatever_a_block_holds_reads_back_exactly() {
        // Links that do not follow, seqs and times out of order, texts
        // that only look like ids: stored as they are (verification is
        // what reports them).
        let mut block = batch();
        block[2].prev_hash = "not a hash".into();
        block[3].prev_hash = block[0].hash.clone();
        block[4].seq = 2;
        block[4].timestamp_ms = 0;
        block[5].seq = u64::MAX;
        block[5].timestamp_ms = u64::MAX;
        block[1].receipt_id = block[1].receipt_id.to_lowercase();
        block[1].hash = block[1].hash.to_uppercase();
        block[0].reason = Some(block[0].kind.clone());
        assert_eq!(decode_block(b"r/x", &encode(&block)).unwrap(), block);
        assert_eq!(
            decode_block(b"r/x", &encode(&[])).unwrap(),
            Vec::<Receipt>::new()
        );
    }

    #[test]
    fn a_damaged_block_is_reported_with_its_key() {
        let block = one();
        let bytes = encode(&block);
        let table_too = [codec::V2, 250];
        for bad in [
            &bytes[..bytes.len() - 3],
            &[7u8, 1, 2][..],
            &[][..],
            &table_too[..],
        ] {
            // A walk for one tenant reports it too when the tenant is in
            // the table, or the table itself is what is damaged.
            let tenants: &[Option<&str>] = if bad.len() > 2 {
                &[None, Some("acme")]
            } else {
                &[None, Some("acme"), Some("nobody")]
            };
            for &tenant in tenants {
                match decode_block_of(b"r/x", bad, tenant) {
                    Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, "r/\\x78"),
                    other => panic!("not reported for {tenant:?}: {other:?}"),
                }
            }
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_block(b"r/x", &longer).is_err(), "trailing bytes");
    }
}
