//! The way out of a damaged signed head (`m/head`), short of a backup: a
//! new head over the ledger as it stands ([`rebuild_head`]), on a stopped
//! node.
//!
//! The head is the ledger's commit point: the store's open reads it to
//! know which receipts were committed, and the ledger numbers receipts on
//! from it. A head that does not read keeps the node from starting, and
//! one that is missing would have the ledger begin again over its own
//! receipts, so [`crate::check::set_aside`] never takes it. Rebuilding
//! verifies the whole chain first (every receipt's link, hash and
//! signature), so it never seals over a ledger that does not verify. What
//! it cannot know is whether receipts were cut off the end before the head
//! was damaged: that is what the head was for, and the report says so.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use tai_core::receipt::{ChainVerifier, Receipt, SignedHead, SigningKey, GENESIS_HASH};

use crate::check::{aside, key_text, open, transact};
use crate::{codec, decode, pair_key, receipts, redo, Result, StoreError, HEAD};

/// What [`rebuild_head`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Rebuilt {
    /// The new head's seq and hash (seq 0: the ledger holds no committed
    /// receipt, and no head is written).
    pub head_seq: u64,
    pub head_hash: String,
    /// `redo`: the head a redo record kept, as the node signed it;
    /// `signed`: signed now with `key_id`.
    pub source: &'static str,
    pub key_id: String,
    /// Receipts in the ledger, all verified.
    pub receipts: u64,
    /// The last receipt block, set aside as never committed (its batch's
    /// writes did not land before the crash that left it): its seqs.
    pub dropped: Option<(u64, u64)>,
    /// How the last block was judged committed or not.
    pub last_block: String,
    /// The damaged head's bytes were kept under `x/m/head`.
    pub kept_as: Option<String>,
}

/// Whether each of the ledger's receipts verifies, and what the last block
/// holds: walks every receipt block once.
struct Walk {
    receipts: u64,
    last_hash: String,
    last: Option<LastBlock>,
}

/// The ledger's last receipt block: the one a crash can leave uncommitted.
struct LastBlock {
    key: Vec<u8>,
    first: u64,
    /// Its receipts that name a signal: (tenant, signal, receipt id).
    signals: Vec<(String, String, String)>,
}

fn walk(db: &sled::Db, keys: &BTreeMap<String, String>) -> Result<Walk> {
    let mut v = ChainVerifier::new(keys);
    let mut last = None;
    let mut last_hash = GENESIS_HASH.to_string();
    let mut count = 0;
    for kv in db.scan_prefix(b"r/") {
        let (k, value) = kv?;
        let block: Vec<Receipt> = receipts::decode_block(&k, &value).map_err(|e| {
            StoreError::Refused(format!(
                "{e}: the ledger does not verify past it, so no head is rebuilt over it; `tai store check` names every damaged record, restore the data dir from a backup"
            ))
        })?;
        for r in &block {
            if !v.push(r) {
                let report = v.finish(None);
                return Err(StoreError::Refused(format!(
                    "the ledger does not verify at seq {}: {}; no head is rebuilt over it (restore the data dir from a backup)",
                    report.first_bad_seq.unwrap_or(r.seq),
                    report.reason.unwrap_or_default()
                )));
            }
            count += 1;
            last_hash.clone_from(&r.hash);
        }
        let signals = block
            .iter()
            .filter_map(|r| {
                let signal = r.signal_id.as_ref()?;
                Some((r.tenant_id.clone(), signal.clone(), r.receipt_id.clone()))
            })
            .collect();
        last = block.first().map(|r| LastBlock {
            key: k.to_vec(),
            first: r.seq,
            signals,
        });
    }
    Ok(Walk {
        receipts: count,
        last_hash,
        last,
    })
}

/// The highest authentic signed head a kept redo record carries: the head
/// of a commit whose writes the next start applies.
fn redo_head(db: &sled::Db, keys: &BTreeMap<String, String>) -> Result<Option<SignedHead>> {
    let mut best: Option<SignedHead> = None;
    for kv in db.scan_prefix(b"w/") {
        let (k, value) = kv?;
        let ops = redo::Ops::decode(&value).ok_or_else(|| {
            StoreError::Refused(format!(
                "the redo record {} does not read: `tai store check` names it and what setting it aside costs; set it aside first",
                key_text(&k)
            ))
        })?;
        let Some(head) = ops.last_put(HEAD) else {
            continue;
        };
        let head: SignedHead = decode(HEAD, head).map_err(|e| {
            StoreError::Refused(format!(
                "the redo record {} carries a head that does not read ({e}): set the record aside first",
                key_text(&k)
            ))
        })?;
        if head.is_authentic(keys) && best.as_ref().is_none_or(|b| head.seq > b.seq) {
            best = Some(head);
        }
    }
    Ok(best)
}

/// Writes a new signed head over the ledger of the stopped node's store in
/// `dir`, whose head does not read (or is missing while receipts are
/// there): after every receipt verifies with `keys`, at the last receipt
/// whose batch committed, signed with `key_id` (or, where a kept redo
/// record carries the head of that receipt, that head as the node signed
/// it). The last receipt block is the one a crash can have left
/// uncommitted (written ahead of its batch's writes): it counts as
/// committed if a redo record's head covers it, or a signal record lists
/// one of its receipts, or it names no signal (nothing says otherwise);
/// else it is set aside under `x/`. The damaged head is kept under
/// `x/m/head`. Refused if the head reads, or the ledger does not verify.
pub fn rebuild_head(dir: &Path, keys: &BTreeMap<String, String>, key_id: &str) -> Result<Rebuilt> {
    let key = keys.get(key_id).ok_or_else(|| {
        StoreError::Refused(format!(
            "{key_id:?} (andon.signing_key_id) is not a key of andon.signing_keys"
        ))
    })?;
    let db = open(dir)?;
    let damaged = db.get(HEAD)?;
    if let Some(bytes) = &damaged {
        if let Ok(head) = decode::<SignedHead>(HEAD, bytes) {
            return Err(StoreError::Refused(format!(
                "m/head reads (seq {}): only a head that does not read is rebuilt; `tai receipts --verify --data-dir {}` checks it against the ledger",
                head.seq,
                dir.display()
            )));
        }
    }
    let w = walk(&db, keys)?;
    if damaged.is_none() && w.receipts == 0 {
        return Err(StoreError::Refused(
            "no signed head and no receipts: a node starts a fresh ledger here, nothing to rebuild"
                .into(),
        ));
    }
    let last_seq = w.receipts;
    let from_redo = redo_head(&db, keys)?;
    if let Some(h) = &from_redo {
        if h.seq > last_seq {
            return Err(StoreError::Refused(format!(
                "a redo record's signed head is at seq {} but the ledger ends at {last_seq}: receipts are missing; restore the data dir from a backup",
                h.seq
            )));
        }
    }
    // Was the last block committed?
    let mut dropped = None;
    let (head_seq, head_hash, last_block) = match (&w.last, &from_redo) {
        (None, _) => (0, GENESIS_HASH.to_string(), "the ledger holds no receipt".to_string()),
        (Some(_), Some(h)) if h.seq == last_seq => {
            if h.hash != w.last_hash {
                return Err(StoreError::Refused(format!(
                    "a redo record's signed head at seq {} does not match the ledger's last receipt; restore the data dir from a backup",
                    h.seq
                )));
            }
            (
                last_seq,
                w.last_hash.clone(),
                "committed: a redo record carries its signed head".to_string(),
            )
        }
        (Some(LastBlock { first, signals, .. }), _) if signals.is_empty() => (
            last_seq,
            w.last_hash.clone(),
            format!("kept: its receipts (seq {first} to {last_seq}) name no signal, so no signal record says whether its batch committed"),
        ),
        (
            Some(LastBlock {
                key: block_key,
                first,
                signals,
            }),
            _,
        ) => {
            let mut listed = false;
            for (tenant, signal, receipt) in signals {
                let k = pair_key(b's', tenant, signal);
                if let Some(v) = db.get(&k)? {
                    let rec = codec::decode_record(&k, &v)?;
                    if rec.receipts.iter().any(|r| r == receipt) {
                        listed = true;
                        break;
                    }
                }
            }
            if listed {
                (
                    last_seq,
                    w.last_hash.clone(),
                    format!("committed: a signal record lists one of its receipts (seq {first} to {last_seq})"),
                )
            } else {
                let before = db
                    .scan_prefix(b"r/")
                    .rev()
                    .nth(1)
                    .transpose()?
                    .map(|(k, v)| receipts::decode_block(&k, &v))
                    .transpose()?
                    .and_then(|b| b.last().map(|r| (r.seq, r.hash.clone())))
                    .unwrap_or((0, GENESIS_HASH.to_string()));
                dropped = Some((block_key.clone(), *first));
                (
                    before.0,
                    before.1,
                    format!("set aside: no signal record lists any of its receipts (seq {first} to {last_seq}), so its batch never committed and its signals are decided again"),
                )
            }
        }
    };
    let (head, source, signer) = match from_redo.filter(|h| h.seq == head_seq && head_seq > 0) {
        Some(h) => {
            let signer = h.key_id.clone();
            (Some(h), "redo", signer)
        }
        None if head_seq == 0 => (None, "signed", key_id.to_string()),
        None => (
            Some(SignedHead::new(
                head_seq,
                &head_hash,
                key_id,
                &SigningKey::new(key.as_bytes()),
            )),
            "signed",
            key_id.to_string(),
        ),
    };
    let kept_as = damaged.as_ref().map(|_| key_text(&aside(HEAD)));
    let kept_before = db.get(aside(HEAD))?.is_some();
    transact(&db, |t| {
        if let Some(bytes) = &damaged {
            // A head damaged twice: the first copy is the one kept.
            if !kept_before {
                t.insert(aside(HEAD), bytes)?;
            }
        }
        match &head {
            Some(h) => t.insert(HEAD, crate::encode(h))?,
            None => t.remove(HEAD)?,
        };
        if let Some((block_key, _)) = &dropped {
            if let Some(v) = t.get(block_key.as_slice())? {
                t.insert(aside(block_key), v)?;
                t.remove(block_key.as_slice())?;
            }
        }
        Ok(())
    })?;
    Ok(Rebuilt {
        head_seq,
        head_hash,
        source,
        key_id: signer,
        receipts: w.receipts,
        dropped: dropped.map(|(_, first)| (first, last_seq)),
        last_block,
        kept_as,
    })
}

#[cfg(test)]
mod tests {
    use tai_core::msg::WriteSet;
    use tai_core::receipt::verify_chain;
    use tai_core::signal::{SignalRecord, SignalStatus};

    use super::*;
    use crate::check::tests::{closed, put_raw};
    use crate::tests::{decide_one_of_two, receipt_for as sealed, reopen, signal};
    use crate::Store;

    fn keys() -> BTreeMap<String, String> {
        BTreeMap::from([("k".to_string(), "key".to_string())])
    }

    fn rebuilt(dir: &Path) -> Result<Rebuilt> {
        closed(|| rebuild_head(dir, &keys(), "k"))
    }

    fn refused(dir: &Path) -> String {
        match rebuilt(dir) {
            Err(StoreError::Refused(why)) => why,
            other => panic!("{other:?}"),
        }
    }

    /// Receipts 1 and 2 (one batch), then 3 deciding acme's `b`, committed
    /// and written out; returns receipt 3.
    async fn a_ledger_of_three(dir: &Path) -> Receipt {
        let s = Store::open(dir).unwrap();
        let (_, r2, _, _) = decide_one_of_two(&s);
        let r3 = sealed(3, &r2.hash, "b");
        let mut rec = SignalRecord::accepted(&signal("acme", "b"));
        rec.status = SignalStatus::Completed;
        rec.receipts = vec![r3.receipt_id.clone()];
        let head = SignedHead::new(3, &r3.hash, "k", &SigningKey::new(b"key"));
        let writes = WriteSet {
            signal_records: vec![rec],
            acks: vec![8],
            ..WriteSet::default()
        };
        s.commit(std::slice::from_ref(&r3), Some(&head), &writes)
            .unwrap();
        s.durable().await.unwrap();
        s.flush().unwrap();
        r3
    }

    #[tokio::test]
    async fn the_head_a_kept_redo_record_carries_is_the_one_written_back() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let head = {
            let s = Store::open(dir).unwrap();
            let (_, _, head, _) = decide_one_of_two(&s);
            // Durable, not written out: its redo record is kept.
            s.durable().await.unwrap();
            head
        };
        put_raw(dir, HEAD, b"{}");
        let r = rebuilt(dir).unwrap();
        assert_eq!((r.head_seq, r.source), (2, "redo"));
        assert!(
            r.last_block.contains("a redo record carries"),
            "{}",
            r.last_block
        );
        let s = reopen(dir);
        assert_eq!(s.head().unwrap().unwrap(), head, "the node's own signature");
        let rec = s.signal_record("acme", "a").unwrap().unwrap();
        assert_eq!(rec.status, SignalStatus::Completed, "its writes applied");
    }

    /// The store opens, and its ledger verifies against its head.
    fn verifies(dir: &Path) -> u64 {
        let s = reopen(dir);
        let all = s.receipts(0, usize::MAX, None).unwrap();
        let head = s.head().unwrap();
        let report = verify_chain(&all, &keys(), head.as_ref());
        assert!(report.ok, "{report:?}");
        report.head_seq
    }

    #[tokio::test]
    async fn a_damaged_head_is_rebuilt_over_a_ledger_that_verifies() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        a_ledger_of_three(dir).await;
        assert!(refused(dir).contains("m/head reads (seq 3)"));

        put_raw(dir, HEAD, b"{\"seq\":");
        match closed(|| Store::open(dir)) {
            Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, "m/head"),
            other => panic!("{other:?}"),
        }
        let r = rebuilt(dir).unwrap();
        assert_eq!((r.head_seq, r.receipts, r.dropped), (3, 3, None));
        assert!(r.last_block.starts_with("committed"), "{}", r.last_block);
        assert_eq!(r.kept_as.as_deref(), Some("x/m/head"));
        assert_eq!(verifies(dir), 3);
        let report = closed(|| crate::check::check(dir, &crate::check::tests::readers())).unwrap();
        assert!(report.damaged.is_empty(), "{report:?}");
        assert_eq!(report.set_aside.len(), 1);
        assert_eq!(report.set_aside[0].key, "m/head");
    }

    #[tokio::test]
    async fn an_uncommitted_last_block_is_set_aside_and_a_committed_one_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let r3 = a_ledger_of_three(dir).await;
        // A crash between a batch's receipt block and its writes: block 4
        // names acme's `c`, whose record does not list it.
        let r4 = sealed(4, &r3.hash, "c");
        put_raw(
            dir,
            &crate::seq_key(b'r', 4),
            &receipts::encode(std::slice::from_ref(&r4)),
        );
        put_raw(dir, HEAD, b"");
        let r = rebuilt(dir).unwrap();
        assert_eq!((r.head_seq, r.receipts, r.dropped), (3, 4, Some((4, 4))));
        assert!(r.last_block.starts_with("set aside"), "{}", r.last_block);
        assert_eq!(r.head_hash, r3.hash);
        assert_eq!(verifies(dir), 3);

        // Block 4 again, its batch committed this time (b's record lists
        // it), the head damaged again: kept, and the head signed over it.
        put_raw(
            dir,
            &crate::seq_key(b'r', 4),
            &receipts::encode(&[sealed(4, &r3.hash, "b")]),
        );
        let mut rec = SignalRecord::accepted(&signal("acme", "b"));
        rec.status = SignalStatus::Completed;
        rec.receipts = vec!["r3".into(), "r4".into()];
        put_raw(
            dir,
            &pair_key(b's', "acme", "b"),
            &codec::encode_record(&rec),
        );
        put_raw(dir, HEAD, b"[");
        let r = rebuilt(dir).unwrap();
        assert_eq!((r.head_seq, r.dropped), (4, None));
        assert_eq!(r.source, "signed");
        assert!(
            r.last_block.contains("lists one of its receipts"),
            "{}",
            r.last_block
        );
        assert_eq!(verifies(dir), 4);
    }

    #[tokio::test]
    async fn no_head_is_rebuilt_over_a_ledger_that_does_not_verify() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let r3 = a_ledger_of_three(dir).await;
        put_raw(dir, HEAD, b"");
        // Receipt 3 edited (its hash no longer matches).
        let mut edited = r3.clone();
        edited.success = false;
        put_raw(dir, &crate::seq_key(b'r', 3), &receipts::encode(&[edited]));
        let why = refused(dir);
        assert!(why.contains("does not verify at seq 3"), "{why}");
        // A block that does not read.
        put_raw(dir, &crate::seq_key(b'r', 3), b"\x02\x00");
        let why = refused(dir);
        assert!(
            why.contains("r/3") && why.contains("does not verify past it"),
            "{why}"
        );
        // An unknown signing key.
        match closed(|| rebuild_head(dir, &keys(), "k9")) {
            Err(StoreError::Refused(why)) => assert!(why.contains("\"k9\""), "{why}"),
            other => panic!("{other:?}"),
        }
        // Nothing was written: the head is still the damaged one.
        assert_eq!(
            closed(|| open(dir)).unwrap().get(HEAD).unwrap().as_deref(),
            Some(&b""[..])
        );
    }
}
