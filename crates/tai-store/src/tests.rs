use super::*;
use tai_core::receipt::{ReceiptDraft, SigningKey, GENESIS_HASH};
use tai_core::signal::EngineState;

pub(crate) fn signal(tenant: &str, id: &str) -> Signal {
    Signal {
        id: id.into(),
        tenant_id: tenant.into(),
        sku_id: "payments".into(),
        kind: "payment".into(),
        critical: false,
        payload: Default::default(),
        received_at_ms: 1,
        trace_id: None,
        traceparent: None,
    }
}

/// Opens a store just closed in this process. sled's I/O threads let go of
/// the directory lock shortly after the last handle is dropped, so the
/// reopen waits for it (a new process, as in production, never has to).
pub(crate) fn reopen(dir: &std::path::Path) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Store::open(dir) {
            Ok(s) => return s,
            Err(StoreError::InUse { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("reopen failed: {e}"),
        }
    }
}

pub(crate) fn letter(tenant: &str, id: &str, reason: &str, at_ms: u64) -> DeadLetter {
    DeadLetter {
        signal: signal(tenant, id),
        reason: reason.into(),
        at_ms,
    }
}

fn delivery(seq: u64, tenant: &str, id: &str) -> Delivery {
    Delivery {
        seq,
        signal: std::sync::Arc::new(signal(tenant, id)),
        redelivered: false,
    }
}

fn stage(s: &Store, deliveries: Vec<Delivery>) -> Staged {
    s.stage_enqueue(deliveries).expect("deliveries to stage")
}

fn receipt(seq: u64, prev: &str) -> Receipt {
    receipt_for(seq, prev, "s1")
}

/// Receipt `seq` (id `r{seq}`) after `prev`, naming acme's signal `signal`.
pub(crate) fn receipt_for(seq: u64, prev: &str, signal: &str) -> Receipt {
    let d = ReceiptDraft {
        receipt_id: format!("r{seq}"),
        kind: "action_generated".into(),
        tenant_id: "acme".into(),
        sku_id: "payments".into(),
        signal_id: Some(signal.into()),
        action_id: None,
        state_before: EngineState::Stable.into(),
        state_after: EngineState::ActionPending.into(),
        success: true,
        reason: None,
        trace_id: None,
        timestamp_ms: seq,
    };
    Receipt::seal(d, seq, prev, "k", &SigningKey::new(b"key"))
}

/// Seqs 7 and 8 queued in one block, then a ledger batch that decides 7
/// (acme's `a`): receipts 1 and 2 with their signed head, the signal's
/// record, acme's checkpoint and a payment window. What it wrote.
pub(crate) fn decide_one_of_two(s: &Store) -> (Receipt, Receipt, SignedHead, SignalRecord) {
    stage(s, vec![delivery(7, "acme", "a"), delivery(8, "acme", "b")]);
    let r1 = receipt(1, GENESIS_HASH);
    let r2 = receipt(2, &r1.hash);
    let head = SignedHead::new(2, &r2.hash, "k", &SigningKey::new(b"key"));
    let mut rec = SignalRecord::accepted(&signal("acme", "a"));
    rec.status = SignalStatus::Completed;
    rec.receipts = vec!["r1".into(), "r2".into()];
    let writes = WriteSet {
        signal_records: vec![rec.clone()],
        checkpoints: vec![("acme".into(), "payments".into(), b"{}".to_vec())],
        acks: vec![7],
        dead_letters: vec![],
        velocity: vec![(
            "acme".into(),
            "payments".into(),
            "c1".into(),
            b"[5]".to_vec(),
        )],
    };
    s.commit(&[r1.clone(), r2.clone()], Some(&head), &writes)
        .unwrap();
    (r1, r2, head, rec)
}

#[tokio::test]
async fn queued_signals_are_known_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let blocks;
    {
        let s = Store::open(dir.path()).unwrap();
        let a = stage(
            &s,
            vec![delivery(1, "acme", "a"), delivery(2, "other", "a")],
        );
        let b = stage(&s, vec![delivery(3, "acme", "b")]);
        assert_eq!(a.block, 1);
        // The same block unless a flush took the first run in between.
        assert!(b.block == 1 && b.flush == a.flush || b.block == 3 && b.flush > a.flush);
        let rec = s.signal_record("acme", "a").unwrap().unwrap();
        assert_eq!(rec.status, SignalStatus::Accepted, "known before the flush");
        assert!(s.signal_record("acme", "zzz").unwrap().is_none());
        s.durable_at(b.flush).await.unwrap();
        blocks = (a.block, b.block);
    }
    let s = reopen(dir.path());
    let pending = s.pending().unwrap();
    assert_eq!(
        pending.iter().map(|(b, d)| (*b, d.seq)).collect::<Vec<_>>(),
        [(blocks.0, 1), (blocks.0, 2), (blocks.1, 3)]
    );
    assert_eq!(s.last_queue_seq().unwrap(), 3);
    assert_eq!(
        s.signal_record("other", "a").unwrap().unwrap().status,
        SignalStatus::Accepted,
        "the queued index is rebuilt at open"
    );
}

#[tokio::test]
async fn a_commit_is_atomic_and_a_decided_signal_is_not_pending_again() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        let (r1, r2, head, rec) = decide_one_of_two(&s);
        s.durable().await.unwrap();
        assert_eq!(s.pending().unwrap().len(), 1, "seq 7 is decided");
        assert_eq!(s.signal_record("acme", "a").unwrap().unwrap(), rec);
        assert_eq!(s.head().unwrap().unwrap(), head);
        assert_eq!(s.receipts(0, 10, None).unwrap(), [r1.clone(), r2.clone()]);
        assert_eq!(s.receipts(1, 10, None).unwrap(), std::slice::from_ref(&r2));
        assert_eq!(s.receipts(0, 1, None).unwrap(), std::slice::from_ref(&r1));
        assert_eq!(s.receipts(0, 10, Some("nobody")).unwrap().len(), 0);
        let r3 = receipt(3, &r2.hash);
        let head3 = SignedHead::new(3, &r3.hash, "k", &SigningKey::new(b"key"));
        s.commit(
            std::slice::from_ref(&r3),
            Some(&head3),
            &WriteSet::default(),
        )
        .unwrap();
        assert_eq!(s.receipts(2, 10, None).unwrap(), std::slice::from_ref(&r3));
        assert_eq!(s.all_receipts().unwrap(), [r1, r2, r3]);
        assert_eq!(s.checkpoint("acme", "payments").unwrap().unwrap(), b"{}");
        assert_eq!(
            s.checkpoints_after(None, usize::MAX).unwrap()[0].1,
            "payments"
        );
        assert_eq!(
            s.velocity("acme", "payments", "c1").unwrap().unwrap(),
            b"[5]"
        );
        assert!(s.velocity("acme", "payments", "c2").unwrap().is_none());
        s.durable().await.unwrap();
    }
    // The block still holds seq 7 (the queue drops a block once all of it is
    // decided); at open it is filtered out, never delivered twice.
    let s = reopen(dir.path());
    let pending = s.pending().unwrap();
    assert_eq!(pending.iter().map(|(_, d)| d.seq).collect::<Vec<_>>(), [8]);
    s.remove_block(7).unwrap();
    assert!(s.pending().unwrap().is_empty());
    assert_eq!(s.last_queue_seq().unwrap(), 0);
}

#[tokio::test]
async fn dead_letters_are_replayed_into_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    stage(&s, vec![delivery(1, "acme", "a")]);
    let letter = letter("acme", "a", "poison", 5);
    s.dead_letter_queued(&letter).unwrap();
    assert!(s.pending().unwrap().is_empty());
    assert_eq!(s.dead_letter_count(), 1);
    assert_eq!(
        s.signal_record("acme", "a").unwrap().unwrap().status,
        SignalStatus::Deadlettered
    );
    assert!(s.replay_dead_letter("acme", "zzz", 2).unwrap().is_none());
    let again = s.replay_dead_letter("acme", "a", 2).unwrap().unwrap();
    assert_eq!(again.id, "a");
    let pending = s.pending().unwrap();
    assert_eq!(
        pending.iter().map(|(b, d)| (*b, d.seq)).collect::<Vec<_>>(),
        [(2, 2)],
        "only the replayed place of the signal is pending"
    );
    assert_eq!(s.dead_letter_count(), 0);
    assert_eq!(
        s.signal_record("acme", "a").unwrap().unwrap().status,
        SignalStatus::Accepted
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_writers_share_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let staged = stage(&s, vec![delivery(i + 1, "acme", &format!("id{i}"))]);
            s.durable_at(staged.flush).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(s.pending().unwrap().len(), 200);
    let flushes = s.flushes();
    assert!(
        flushes < 200,
        "writers were grouped: {flushes} flushes for 200 writes"
    );
}

#[test]
fn an_offline_open_wants_a_store_there_and_makes_none() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo");
    for path in [dir.path(), missing.as_path()] {
        let Err(err) = Store::open_existing(path) else {
            panic!("{} holds no store", path.display());
        };
        assert_eq!(err.code(), "store_missing");
        assert_eq!(
            err.to_string(),
            format!(
                "no store in {}: it holds no sled/db (give the data_dir of a node)",
                path.display()
            )
        );
    }
    assert!(
        !missing.exists() && !sled_dir(dir.path()).exists(),
        "nothing made"
    );
    // Where a node's store is, it goes on to open it (here: held, so refused).
    let _s = Store::open(dir.path()).unwrap();
    let Err(err) = Store::open_existing(dir.path()) else {
        panic!("the store is in use");
    };
    assert_eq!(err.code(), "store_in_use");
}

#[test]
fn the_data_dir_is_locked_and_starts_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.record_start().unwrap(), 1);
        let Err(err) = Store::open(dir.path()) else {
            panic!("a second open is refused");
        };
        assert!(matches!(err, StoreError::InUse { .. }), "{err:?}");
        assert_eq!(err.code(), "store_in_use");
        assert_eq!(
            err.to_string(),
            format!(
                "the data directory {} is in use by another process (is another tai node running on it?)",
                dir.path().display()
            )
        );
    }
    let s = reopen(dir.path());
    assert_eq!(s.record_start().unwrap(), 2);
}

#[tokio::test]
async fn stale_payment_windows_are_swept_in_steps() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let window = |customer: &str, newest: u64| {
        (
            "acme".to_string(),
            "payments".to_string(),
            customer.to_string(),
            format!("[1,{newest}]").into_bytes(),
        )
    };
    let writes = WriteSet {
        velocity: vec![
            window("a", 100),
            window("b", 59_000),
            window("c", 100),
            window("d", 100),
        ],
        ..WriteSet::default()
    };
    s.commit(&[], None, &writes).unwrap();
    // At 60 s with a 60 s window: a, c and d are stale, b is not.
    let (gone, cursor) = s.sweep_velocity(None, 2, 60_100, 60_000).unwrap();
    assert_eq!(gone, 1, "a went; b stays");
    let cursor = cursor.expect("more to scan");
    let (gone, cursor) = s.sweep_velocity(Some(&cursor), 10, 60_100, 60_000).unwrap();
    assert_eq!((gone, cursor), (2, None));
    assert!(s.velocity("acme", "payments", "a").unwrap().is_none());
    assert!(s.velocity("acme", "payments", "b").unwrap().is_some());
    assert!(s.velocity("acme", "payments", "d").unwrap().is_none());
}

#[tokio::test]
async fn a_receipt_block_whose_batch_never_committed_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let r1 = receipt(1, GENESIS_HASH);
    let r2 = receipt(2, &r1.hash);
    {
        let s = Store::open(dir.path()).unwrap();
        let head = SignedHead::new(1, &r1.hash, "k", &SigningKey::new(b"key"));
        s.commit(std::slice::from_ref(&r1), Some(&head), &WriteSet::default())
            .unwrap();
        // As if the process died after a batch's receipt block was written
        // and before its redo record (head and decisions) was.
        s.db.insert(
            seq_key(b'r', 2),
            receipts::encode(std::slice::from_ref(&r2)),
        )
        .unwrap();
        s.durable().await.unwrap();
        assert_eq!(s.all_receipts().unwrap().len(), 2);
    }
    let s = reopen(dir.path());
    assert_eq!(s.all_receipts().unwrap(), std::slice::from_ref(&r1));
    assert_eq!(s.head().unwrap().unwrap().seq, 1);
    // The ledger numbers from the head again; nothing more to drop.
    assert_eq!(s.drop_uncommitted_receipts().unwrap(), 0);
}

#[test]
fn receipts_past_the_head_that_no_crash_explains_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let r1 = receipt(1, GENESIS_HASH);
    let r2 = receipt(2, &r1.hash);
    let r3 = receipt(3, &r2.hash);
    let put = |r: &Receipt| {
        s.db.insert(
            seq_key(b'r', r.seq),
            receipts::encode(std::slice::from_ref(r)),
        )
        .unwrap();
    };
    // No head at all (deleted, say) and two blocks: not one batch's leftover.
    put(&r1);
    put(&r2);
    assert_eq!(s.drop_uncommitted_receipts().unwrap(), 0);
    // One block past the head that does not chain onto it.
    let head = SignedHead::new(1, &r1.hash, "k", &SigningKey::new(b"key"));
    s.db.insert(HEAD, encode(&head)).unwrap();
    s.db.remove(seq_key(b'r', 2)).unwrap();
    put(&r3);
    assert_eq!(s.drop_uncommitted_receipts().unwrap(), 0);
    assert_eq!(s.all_receipts().unwrap(), [r1, r3]);
}

#[tokio::test]
async fn accepted_records_of_the_amqp_backend_read_the_same_from_memory_and_disk() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        s.record_accepted(&[
            signal("acme", "a"),
            signal("acme", "b"),
            signal("acme", "c"),
        ])
        .unwrap();
        let accepted = SignalRecord::accepted(&signal("acme", "a"));
        assert_eq!(s.signal_record("acme", "a").unwrap().unwrap(), accepted);
        assert_eq!(
            s.disk_record(&pair_key(b's', "acme", "a"))
                .unwrap()
                .unwrap(),
            accepted,
            "the in-memory copy is the record on disk"
        );
        let in_memory = |id: &str| {
            s.queued
                .lock()
                .unwrap()
                .contains_key(&pair_key(b's', "acme", id)[..])
        };
        assert!(in_memory("a") && in_memory("b") && in_memory("c"));
        // A decision replaces it, in memory too.
        let r1 = receipt(1, GENESIS_HASH);
        let head = SignedHead::new(1, &r1.hash, "k", &SigningKey::new(b"key"));
        let mut done = accepted.clone();
        done.status = SignalStatus::Completed;
        done.receipts = vec!["r1".into()];
        let writes = WriteSet {
            signal_records: vec![done.clone()],
            ..WriteSet::default()
        };
        s.commit(&[r1], Some(&head), &writes).unwrap();
        assert_eq!(s.signal_record("acme", "a").unwrap().unwrap(), done);
        assert!(!in_memory("a"), "a decision drops the in-memory copy");
        // A refused signal is forgotten in memory and on disk.
        s.forget_accepted(&[signal("acme", "b")]).unwrap();
        assert!(s.signal_record("acme", "b").unwrap().is_none());
        assert!(!in_memory("b"));
        s.durable().await.unwrap();
    }
    let s = reopen(dir.path());
    assert_eq!(
        s.signal_record("acme", "a").unwrap().unwrap().status,
        SignalStatus::Completed
    );
    assert!(s.signal_record("acme", "b").unwrap().is_none());
    assert_eq!(
        s.signal_record("acme", "c").unwrap().unwrap(),
        SignalRecord::accepted(&signal("acme", "c")),
        "after a restart the record comes from disk"
    );
}

/// Many ledger batches (appended `r/` blocks: the vendored sled splits such
/// leaves near their end) interleaved with records of signals in no order
/// (`s/` keys: middle splits), across a reopen: every receipt in order,
/// paging from any seq, every record, the packed forms read back whole.
#[tokio::test]
async fn a_long_ledger_and_scattered_records_read_back_whole_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut all: Vec<Receipt> = Vec::new();
    let mut records = Vec::new();
    {
        let s = Store::open(dir.path()).unwrap();
        let mut prev = GENESIS_HASH.to_string();
        for batch in 0..300u64 {
            let block: Vec<Receipt> = (0..3)
                .map(|i| {
                    let seq = batch * 3 + i + 1;
                    let d = ReceiptDraft {
                        receipt_id: format!("rcpt_{}", ulid::Ulid::new()),
                        kind: "action_generated".into(),
                        tenant_id: format!("t{}", seq % 7),
                        sku_id: "payments".into(),
                        signal_id: Some(format!("s{seq}")),
                        action_id: Some(format!("act_{}", ulid::Ulid::new())),
                        state_before: EngineState::Stable.into(),
                        state_after: EngineState::ActionPending.into(),
                        success: true,
                        reason: None,
                        trace_id: Some(format!("{seq:032x}")),
                        timestamp_ms: 1_700_000_000_000 + seq,
                    };
                    let r = Receipt::seal(d, seq, &prev, "k", &SigningKey::new(b"key"));
                    prev = r.hash.clone();
                    r
                })
                .collect();
            // Signal ids whose keys land all over the `s/` range.
            let id = format!("{:x}", (batch * 7919) % 1009);
            let mut rec = SignalRecord::accepted(&signal(&format!("t{}", batch % 5), &id));
            rec.status = SignalStatus::Completed;
            rec.receipts = block.iter().map(|r| r.receipt_id.clone()).collect();
            let writes = WriteSet {
                signal_records: vec![rec.clone()],
                ..WriteSet::default()
            };
            let last = block.last().unwrap();
            let head = SignedHead::new(last.seq, &last.hash, "k", &SigningKey::new(b"key"));
            s.commit(&block, Some(&head), &writes).unwrap();
            all.extend(block);
            records.push(rec);
        }
        s.durable().await.unwrap();
    }
    let s = reopen(dir.path());
    assert_eq!(s.all_receipts().unwrap(), all);
    for after in [0, 1, 449, 898, 899] {
        let page = s.receipts(after, 5, None).unwrap();
        let want: Vec<Receipt> = all
            .iter()
            .filter(|r| r.seq > after)
            .take(5)
            .cloned()
            .collect();
        assert_eq!(page, want, "after_seq {after}");
    }
    assert_eq!(
        s.receipts(0, 1000, Some("t3")).unwrap(),
        all.iter()
            .filter(|r| r.tenant_id == "t3")
            .cloned()
            .collect::<Vec<_>>()
    );
    let keys = std::collections::BTreeMap::from([("k".to_string(), "key".to_string())]);
    let report = tai_core::receipt::verify_chain(
        &s.all_receipts().unwrap(),
        &keys,
        s.head().unwrap().as_ref(),
    );
    assert!(report.ok, "{report:?}");
    assert_eq!(report.count, 900);
    for rec in &records {
        assert_eq!(
            s.signal_record(&rec.tenant_id, &rec.signal_id)
                .unwrap()
                .as_ref(),
            Some(rec)
        );
    }
}

/// A data dir an earlier build wrote (receipt blocks and records in
/// version 1) goes on under this one: the ledger verifies across both
/// forms and old records read as they were.
#[tokio::test]
async fn a_ledger_begun_by_an_earlier_build_goes_on_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let keys = std::collections::BTreeMap::from([("k".to_string(), "key".to_string())]);
    let r1 = receipt(1, GENESIS_HASH);
    let r2 = receipt(2, &r1.hash);
    let r3 = receipt(3, &r2.hash);
    let mut old = SignalRecord::accepted(&signal("acme", "pay-1"));
    old.status = SignalStatus::Completed;
    old.receipts = vec![r1.receipt_id.clone(), r2.receipt_id.clone()];
    {
        let s = Store::open(dir.path()).unwrap();
        // As the earlier build left them: version 1 block and record.
        s.db.insert(
            seq_key(b'r', 2),
            receipts::encode_v1(&[r1.clone(), r2.clone()]),
        )
        .unwrap();
        s.db.insert(
            pair_key(b's', "acme", "pay-1"),
            codec::encode_record_v1(&old),
        )
        .unwrap();
        s.db.insert(
            HEAD,
            encode(&SignedHead::new(2, &r2.hash, "k", &SigningKey::new(b"key"))),
        )
        .unwrap();
        s.durable().await.unwrap();
    }
    let s = reopen(dir.path());
    let head = SignedHead::new(3, &r3.hash, "k", &SigningKey::new(b"key"));
    s.commit(std::slice::from_ref(&r3), Some(&head), &WriteSet::default())
        .unwrap();
    let all = s.all_receipts().unwrap();
    assert_eq!(all, vec![r1, r2, r3]);
    let report = tai_core::receipt::verify_chain(&all, &keys, s.head().unwrap().as_ref());
    assert!(report.ok && report.count == 3, "{report:?}");
    assert_eq!(s.signal_record("acme", "pay-1").unwrap(), Some(old));
}

fn completed(tenant: &str, id: &str) -> SignalRecord {
    let mut rec = SignalRecord::accepted(&signal(tenant, id));
    rec.status = SignalStatus::Completed;
    rec
}

fn commit_records(s: &Store, tenant: &str, ids: std::ops::Range<u32>) {
    let writes = WriteSet {
        signal_records: ids.map(|i| completed(tenant, &format!("id-{i}"))).collect(),
        ..WriteSet::default()
    };
    s.commit(&[], None, &writes).unwrap();
}

fn await_filter(s: &Store) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !s.known.ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "the record filter never became ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The duplicate check of a fresh id skips the disk through a filter of the
/// `s/` keys, filled by a scan at open and by every write after: a record
/// written before the reopen, during the scan or after it is still found.
#[tokio::test]
async fn the_record_filter_never_hides_a_stored_record() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        for chunk in 0..10 {
            commit_records(&s, "acme", chunk * 1_000..(chunk + 1) * 1_000);
        }
        s.record_accepted(&[signal("amqp", "published")]).unwrap();
        s.durable().await.unwrap();
    }
    let s = reopen(dir.path());
    // Written while the scan may still run, and after it is done.
    commit_records(&s, "beta", 0..500);
    await_filter(&s);
    commit_records(&s, "gamma", 0..500);
    s.forget_queued([("amqp", "published")]);
    assert_eq!(
        s.signal_record("amqp", "published")
            .unwrap()
            .unwrap()
            .status,
        SignalStatus::Accepted,
        "an accepted record the amqp backend wrote, read from disk"
    );
    for (tenant, n) in [("acme", 10_000), ("beta", 500), ("gamma", 500)] {
        for i in 0..n {
            let rec = s.signal_record(tenant, &format!("id-{i}")).unwrap();
            assert_eq!(
                rec.map(|r| r.status),
                Some(SignalStatus::Completed),
                "{tenant}/id-{i}"
            );
        }
    }
    // The filter is in use: nearly every fresh id is answered without the disk.
    let fresh = (0..1_000)
        .filter(|i| {
            !s.known
                .may_exist(&pair_key(b's', "acme", &format!("new-{i}")))
        })
        .count();
    assert!(
        fresh > 950,
        "only {fresh} of 1,000 fresh ids skipped the disk"
    );
    assert!(s.signal_record("acme", "new-1").unwrap().is_none());
}

/// One ledger batch of one receipt (after `prev`) for `tenant`, with its
/// engine's checkpoint `cp` and the signal's final record.
fn commit_one(s: &Store, prev: &Receipt, tenant: &str, id: &str, cp: &[u8]) -> Receipt {
    let r = receipt(prev.seq + 1, &prev.hash);
    let head = SignedHead::new(r.seq, &r.hash, "k", &SigningKey::new(b"key"));
    let mut rec = SignalRecord::accepted(&signal(tenant, id));
    rec.status = SignalStatus::Completed;
    let writes = WriteSet {
        signal_records: vec![rec],
        checkpoints: vec![(tenant.into(), "payments".into(), cp.to_vec())],
        ..WriteSet::default()
    };
    s.commit(std::slice::from_ref(&r), Some(&head), &writes)
        .unwrap();
    r
}

fn redo_records(s: &Store) -> usize {
    s.db.scan_prefix(b"w/").count()
}

/// The first ledger batch: one receipt, no checkpoint.
fn first_batch(s: &Store) -> Receipt {
    let r1 = receipt(1, GENESIS_HASH);
    let head = SignedHead::new(1, &r1.hash, "k", &SigningKey::new(b"key"));
    s.commit(std::slice::from_ref(&r1), Some(&head), &WriteSet::default())
        .unwrap();
    r1
}

/// `tenant`'s checkpoint as its `e/` key holds it (deferred ones aside).
fn on_disk(s: &Store, tenant: &str) -> Option<Vec<u8>> {
    s.db.get(pair_key(b'e', tenant, "payments"))
        .unwrap()
        .map(|v| v.to_vec())
}

/// The record of `tenant`'s signal `id` as its `s/` key holds it (deferred ones aside).
fn record_on_disk(s: &Store, tenant: &str, id: &str) -> Option<SignalStatus> {
    let key = pair_key(b's', tenant, id);
    s.db.get(&key)
        .unwrap()
        .map(|v| codec::decode_record(&key, &v).unwrap().status)
}

#[tokio::test]
async fn deferred_writes_are_read_first_and_written_again_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let window = velocity_key("acme", "payments", "c1");
    {
        let s = Store::open(dir.path()).unwrap();
        let r1 = first_batch(&s);
        let r2 = commit_one(&s, &r1, "acme", "a", b"acme-1");
        let r3 = commit_one(&s, &r2, "beta", "b", b"beta-1");
        // A batch with a write that is not deferred (a payment window).
        let r4 = receipt(r3.seq + 1, &r3.hash);
        let head = SignedHead::new(r4.seq, &r4.hash, "k", &SigningKey::new(b"key"));
        let writes = WriteSet {
            signal_records: vec![completed("acme", "c")],
            checkpoints: vec![("acme".into(), "payments".into(), b"acme-2".to_vec())],
            velocity: vec![(
                "acme".into(),
                "payments".into(),
                "c1".into(),
                b"[1]".to_vec(),
            )],
            ..WriteSet::default()
        };
        s.commit(std::slice::from_ref(&r4), Some(&head), &writes)
            .unwrap();
        assert_eq!(redo_records(&s), 3, "kept: their writes are deferred");
        assert_eq!(on_disk(&s, "acme"), None);
        assert_eq!(record_on_disk(&s, "acme", "c"), None);
        assert_eq!(s.db.get(&window).unwrap().unwrap(), b"[1]".as_slice());
        assert_eq!(
            s.checkpoint("acme", "payments").unwrap().unwrap(),
            b"acme-2"
        );
        assert_eq!(
            s.signal_record("acme", "c").unwrap().unwrap().status,
            SignalStatus::Completed,
            "read from the deferred writes"
        );
        let all: Vec<_> = s
            .checkpoints_after(None, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(t, _, v)| (t, v))
            .collect();
        assert_eq!(
            all,
            [
                ("acme".into(), b"acme-2".to_vec()),
                ("beta".into(), b"beta-1".to_vec())
            ]
        );
        // Written over since, outside the kept records: the open must not
        // write the record's copy again.
        s.db.insert(&window, b"[2]".as_slice()).unwrap();
        s.durable().await.unwrap();
        // Dropped without a write-out: as a crash leaves it.
    }
    let s = reopen(dir.path());
    assert_eq!(redo_records(&s), 0);
    assert_eq!(on_disk(&s, "acme"), Some(b"acme-2".to_vec()));
    assert_eq!(
        s.checkpoint("beta", "payments").unwrap().unwrap(),
        b"beta-1"
    );
    for (tenant, id) in [("acme", "a"), ("beta", "b"), ("acme", "c")] {
        assert_eq!(
            record_on_disk(&s, tenant, id),
            Some(SignalStatus::Completed),
            "{tenant}/{id}"
        );
    }
    assert_eq!(
        s.db.get(&window).unwrap().unwrap(),
        b"[2]".as_slice(),
        "a kept record's other writes are not applied again"
    );
    assert_eq!(s.head().unwrap().unwrap().seq, 4);
}

/// A first batch, then two decisions of `acme` (signals `a` and `b`,
/// checkpoints `acme-1` and `acme-2`), whose redo records are kept.
fn two_kept_commits(s: &Store) {
    let r1 = first_batch(s);
    let r2 = commit_one(s, &r1, "acme", "a", b"acme-1");
    commit_one(s, &r2, "acme", "b", b"acme-2");
    assert_eq!(redo_records(s), 2);
}

#[tokio::test]
async fn a_write_to_a_deferred_key_writes_the_deferred_ones_out_first() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        two_kept_commits(&s);
        // A write to keys nothing deferred holds leaves them deferred.
        let other = letter("beta", "x", "halted", 1);
        s.dead_letter_queued(&other).unwrap();
        assert_eq!(redo_records(&s), 2);
        assert_eq!(record_on_disk(&s, "acme", "a"), None);
        // One to a deferred key: they are written out before it.
        let letter = letter("acme", "a", "poison", 2);
        s.dead_letter_queued(&letter).unwrap();
        assert_eq!(redo_records(&s), 0);
        assert_eq!(
            record_on_disk(&s, "acme", "b"),
            Some(SignalStatus::Completed)
        );
        assert_eq!(on_disk(&s, "acme"), Some(b"acme-2".to_vec()));
        s.durable().await.unwrap();
        // Dropped without a flush.
    }
    let s = reopen(dir.path());
    assert_eq!(
        s.signal_record("acme", "a").unwrap().unwrap().status,
        SignalStatus::Deadlettered,
        "not written over by the decision deferred before it"
    );
    assert_eq!(
        s.signal_record("beta", "x").unwrap().unwrap().status,
        SignalStatus::Deadlettered
    );
}

/// sled's sorted writes (vendor/sled/PATCHED.md 8) against a model: puts
/// and removes spread over many leaves, mixed with single writes, read back
/// the same before and after a reopen.
#[test]
fn sorted_writes_read_back_like_single_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = BTreeMap::new();
    let mut rng = fastrand::Rng::with_seed(7);
    {
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        for round in 0..40 {
            let mut batch = BTreeMap::new();
            for _ in 0..rng.usize(1..400) {
                let key = format!("s/t{}\0{:05}", rng.u8(0..8), rng.u32(0..3000)).into_bytes();
                let value = (rng.u8(0..4) > 0).then(|| vec![rng.u8(..); rng.usize(1..120)]);
                batch.insert(key, value);
            }
            let items: Vec<_> = batch.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            db.apply_sorted(&items).unwrap();
            for (k, v) in batch {
                match v {
                    Some(v) => model.insert(k, v),
                    None => model.remove(&k),
                };
            }
            // Single writes in between, to the same leaves.
            let key = format!("s/t{}\0{:05}", round % 8, rng.u32(0..3000)).into_bytes();
            db.insert(&key, b"one".as_slice()).unwrap();
            model.insert(key, b"one".to_vec());
            let all: BTreeMap<Vec<u8>, Vec<u8>> = db
                .iter()
                .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())))
                .collect::<sled::Result<_>>()
                .unwrap();
            assert_eq!(all, model, "round {round}");
        }
        db.flush().unwrap();
    }
    let db = sled::Config::new().path(dir.path()).open().unwrap();
    for (k, v) in &model {
        assert_eq!(db.get(k).unwrap().unwrap(), v.as_slice());
    }
    assert_eq!(db.len(), model.len());
}

#[tokio::test]
async fn deferred_writes_are_written_out_in_bounded_slices() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let mut last = first_batch(&s);
    for n in 0..DEFERRED_RECORDS + 10 {
        let tenant = format!("t{}", n % 3);
        last = commit_one(
            &s,
            &last,
            &tenant,
            &format!("s{n}"),
            n.to_string().as_bytes(),
        );
        // A sealed generation's records go once its writes are out, a
        // slice per commit, within half the commits to the next seal.
        assert!(
            redo_records(&s) < DEFERRED_RECORDS + DEFERRED_RECORDS / 2,
            "{n}"
        );
        let d = s.deferred.lock().unwrap();
        if (DEFERRED_RECORDS - 1..DEFERRED_RECORDS - 1 + 8).contains(&n) {
            assert!(!d.sealed.is_empty(), "{n}: written out a slice at a time");
            assert!(d.sealed_written <= (n + 2 - DEFERRED_RECORDS) * WRITE_OUT_SLICE_MIN);
        }
    }
    assert_eq!(redo_records(&s), 10);
    // The write-out put each engine's latest checkpoint (and each signal's
    // record) sealed then on disk.
    let n = DEFERRED_RECORDS - 1;
    assert_eq!(
        record_on_disk(&s, &format!("t{}", n % 3), &format!("s{n}")),
        Some(SignalStatus::Completed)
    );
    assert_eq!(
        on_disk(&s, &format!("t{}", n % 3)),
        Some(n.to_string().into_bytes())
    );
    // A checkpoint committed without receipts (no new head) is written at
    // once, after the deferred ones, so it is the one that stays.
    let writes = WriteSet {
        checkpoints: vec![("t0".into(), "payments".into(), b"direct".to_vec())],
        ..WriteSet::default()
    };
    s.commit(&[], None, &writes).unwrap();
    assert_eq!(redo_records(&s), 0);
    assert_eq!(s.checkpoint("t0", "payments").unwrap().unwrap(), b"direct");
    assert_eq!(on_disk(&s, "t0"), Some(b"direct".to_vec()));
}

#[test]
fn a_flush_writes_the_deferred_checkpoints_out() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    two_kept_commits(&s);
    s.flush().unwrap();
    assert_eq!(redo_records(&s), 0, "a stopped node leaves no kept records");
    assert_eq!(on_disk(&s, "acme"), Some(b"acme-2".to_vec()));
    assert_eq!(
        s.checkpoint("acme", "payments").unwrap().unwrap(),
        b"acme-2"
    );
}

/// sled's sorted writes racing single writes to the same leaves (the
/// even keys written in sorted sets, the odd ones one by one): every write
/// of both is there afterwards.
#[test]
fn sorted_writes_and_single_ones_to_the_same_leaves_both_land() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new().path(dir.path()).open().unwrap();
    let key = |n: u32| format!("s/t\0{n:06}").into_bytes();
    let singles = {
        let db = db.clone();
        std::thread::spawn(move || {
            for n in (1..20_000).step_by(2) {
                db.insert(key(n), n.to_string().as_bytes()).unwrap();
            }
        })
    };
    for start in (0..20_000).step_by(200) {
        let items: Vec<_> = (start..start + 200)
            .step_by(2)
            .map(|n| (key(n), Some(n.to_string().into_bytes())))
            .collect();
        db.apply_sorted(&items).unwrap();
    }
    singles.join().unwrap();
    assert_eq!(db.len(), 20_000);
    for n in 0..20_000 {
        assert_eq!(db.get(key(n)).unwrap().unwrap(), n.to_string().as_bytes());
    }
}

#[tokio::test]
async fn a_crash_in_the_middle_of_a_sealed_write_out_loses_nothing_and_keeps_the_latest() {
    let dir = tempfile::tempdir().unwrap();
    let commits = DEFERRED_RECORDS + 2;
    {
        let s = Store::open(dir.path()).unwrap();
        let mut last = first_batch(&s);
        for n in 0..commits {
            last = commit_one(
                &s,
                &last,
                &format!("t{}", n % 3),
                &format!("s{n}"),
                n.to_string().as_bytes(),
            );
        }
        {
            let d = s.deferred.lock().unwrap();
            assert!(
                d.sealed_written > 0 && d.sealed_written < d.sealed.len(),
                "in the middle of a write-out"
            );
        }
        // The sealed generation's checkpoints (the first keys in order) are
        // on disk; newer ones are deferred past them.
        let n = DEFERRED_RECORDS - 3;
        let t = format!("t{}", n % 3);
        assert_eq!(on_disk(&s, &t), Some(n.to_string().into_bytes()));
        assert_eq!(
            s.checkpoint(&t, "payments").unwrap().unwrap(),
            (n + 3).to_string().into_bytes()
        );
        s.durable().await.unwrap();
        // Dropped without a write-out: as a crash leaves it.
    }
    let s = reopen(dir.path());
    assert_eq!(redo_records(&s), 0);
    for n in commits - 3..commits {
        assert_eq!(
            on_disk(&s, &format!("t{}", n % 3)),
            Some(n.to_string().into_bytes()),
            "the latest checkpoint wins"
        );
    }
    for n in 0..commits {
        assert_eq!(
            record_on_disk(&s, &format!("t{}", n % 3), &format!("s{n}")),
            Some(SignalStatus::Completed),
            "s{n}"
        );
    }
}

#[tokio::test]
async fn dead_letters_are_counted_as_they_come_and_go_recounted_at_open_and_found_by_id() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        let with = |letters: Vec<DeadLetter>| WriteSet {
            dead_letters: letters,
            ..WriteSet::default()
        };
        let (a, b) = (
            letter("acme", "a", "halted", 1),
            letter("acme", "b", "poison", 2),
        );
        s.commit(&[], None, &with(vec![a.clone(), b])).unwrap();
        assert_eq!(s.dead_letter_count(), 2);
        // The same letter written again is still one.
        s.commit(&[], None, &with(vec![a])).unwrap();
        assert_eq!(s.dead_letter_count(), 2);
        s.dead_letter_queued(&letter("globex", "c", "degraded", 3))
            .unwrap();
        assert_eq!(s.dead_letter_count(), 3);
        assert!(s.replay_dead_letter("acme", "a", 1).unwrap().is_some());
        assert!(s.replay_dead_letter("acme", "a", 2).unwrap().is_none());
        assert_eq!(s.dead_letter_count(), 2);
        assert_eq!(s.dead_letters(None, None, usize::MAX).unwrap().len(), 2);
        // Found by signal id, by the whole id only.
        s.dead_letter_queued(&letter("acme", "c", "halted", 4))
            .unwrap();
        s.dead_letter_queued(&letter("acme", "xc", "halted", 5))
            .unwrap();
        let mut tenants = s.dead_letter_tenants("c", None).unwrap();
        tenants.sort();
        assert_eq!(tenants, vec!["acme", "globex"]);
        assert_eq!(
            s.dead_letter_tenants("c", Some("globex")).unwrap(),
            vec!["globex"]
        );
        assert!(s.dead_letter_tenants("c", Some("glob")).unwrap().is_empty());
        assert_eq!(s.dead_letter_tenants("b", None).unwrap(), vec!["acme"]);
        assert!(s.dead_letter_tenants("x", None).unwrap().is_empty());
        assert_eq!(s.dead_letter_count(), 4);
        s.durable().await.unwrap();
    }
    let s = reopen(dir.path());
    assert_eq!(s.dead_letter_count(), 4);
}

/// Writers of one letter at once (the dispatcher's poison, an engine's
/// commit, a replay) keep the count equal to the letters on disk.
#[test]
fn dead_letters_written_and_replayed_at_once_are_counted_once() {
    const ROUNDS: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let on_disk = |s: &Store| s.dead_letters(None, None, usize::MAX).unwrap().len() as u64;
    let barrier = std::sync::Barrier::new(4);
    std::thread::scope(|scope| {
        for w in 0..4 {
            let (s, barrier) = (&s, &barrier);
            scope.spawn(move || {
                for r in 0..ROUNDS {
                    barrier.wait();
                    let l = letter("acme", &format!("r{r}"), "poison", r as u64);
                    if w % 2 == 0 {
                        s.dead_letter_queued(&l).unwrap();
                    } else {
                        let set = WriteSet {
                            dead_letters: vec![l],
                            ..WriteSet::default()
                        };
                        s.commit(&[], None, &set).unwrap();
                    }
                }
            });
        }
    });
    assert_eq!(on_disk(&s), ROUNDS as u64);
    assert_eq!(s.dead_letter_count(), ROUNDS as u64);
    // One replays each letter while another writes it again: whichever
    // comes last decides whether it is there, and the count follows.
    let barrier = std::sync::Barrier::new(2);
    std::thread::scope(|scope| {
        let (s, barrier) = (&s, &barrier);
        scope.spawn(move || {
            for r in 0..ROUNDS {
                barrier.wait();
                s.replay_dead_letter("acme", &format!("r{r}"), 1_000 + r as u64)
                    .unwrap();
            }
        });
        scope.spawn(move || {
            for r in 0..ROUNDS {
                barrier.wait();
                s.dead_letter_queued(&letter("acme", &format!("r{r}"), "halted", 0))
                    .unwrap();
            }
        });
    });
    assert_eq!(s.dead_letter_count(), on_disk(&s));
}

/// A write that meets an I/O error (here a full disk, before any flush
/// did) marks the store failed at once: sled writes nothing more, and the
/// node stops on [`Store::failed`] rather than let supervisors restart
/// layers against it. Needs root (a tmpfs of its own).
#[tokio::test]
async fn a_write_that_meets_an_io_error_fails_the_store_at_once() {
    let disk = crate::tmpfs::TmpfsStore::open("2m");
    let s = &disk.store;
    assert!(s.ping().is_ok());
    let err = crate::tmpfs::fill(s);
    assert!(matches!(err, StoreError::Io(_)), "{err}");
    let reason = tokio::time::timeout(std::time::Duration::from_secs(10), s.failed())
        .await
        .expect("the store is marked failed without a flush");
    assert_eq!(reason, "i/o error: no storage space");
    assert!(matches!(s.ping(), Err(StoreError::Failed(_))));
}

/// What a client is shown of a signal is on disk: a decision is answered
/// once a flush begun after the read is done, and never from a store whose
/// flush failed, though its memory still holds the decision (a restart
/// takes that back and decides the signal again). Needs root.
#[tokio::test]
async fn a_settled_record_is_answered_after_its_flush_and_never_from_a_failed_store() {
    let disk = crate::tmpfs::TmpfsStore::open("2m");
    let s = &disk.store;
    commit_records(s, "acme", 0..1);
    let before = s.flushes();
    let rec = s.settled_record("acme", "id-0").await.unwrap();
    assert_eq!(rec, Some(completed("acme", "id-0")));
    assert!(s.flushes() > before, "answered without a flush");
    let before = s.flushes();
    assert_eq!(s.settled_record("acme", "id-1").await.unwrap(), None);
    assert_eq!(s.flushes(), before, "a miss waited for a flush");
    commit_records(s, "acme", 1..2);
    let _ = crate::tmpfs::fill(s);
    assert_eq!(
        s.signal_record("acme", "id-1").unwrap(),
        Some(completed("acme", "id-1")),
        "the decision is still in memory"
    );
    let err = s.settled_record("acme", "id-1").await.unwrap_err();
    assert!(matches!(err, StoreError::Flush(_)), "{err}");
}

/// A blob sled cannot write (any page or value past a quarter of a
/// segment goes to a file of its own; here a 200 KiB value, with the blob
/// directory made a file) fails sled's log at once: its flush and its close
/// answer the error. Before vendor/sled/PATCHED.md 10, the log buffer in
/// which the blob's pointer had claimed a slot was never written, and
/// every flush from then on waited for it for ever, the one in sled's
/// close too: a node or a `tai` command whose store met a full disk or no
/// free file handle there hung instead of stopping. What was flushed
/// before is kept.
#[test]
fn a_blob_that_cannot_be_written_fails_sleds_flush_and_close_instead_of_hanging_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new().path(dir.path()).open().unwrap();
    db.insert(b"kept", b"1".as_slice()).unwrap();
    db.flush().unwrap();
    let blobs = dir.path().join("blobs");
    std::fs::remove_dir_all(&blobs).unwrap();
    std::fs::write(&blobs, b"").unwrap();
    let err = db.insert(b"big", vec![7u8; 200 * 1024]).unwrap_err();
    assert!(matches!(err, sled::Error::Io(_)), "{err}");
    let (answer, answered) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let flushed = db.flush();
        drop(db);
        answer.send(flushed).unwrap();
    });
    let flushed = answered
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("sled's flush and close answered once a blob failed");
    assert!(flushed.is_err(), "a flush after a failed blob succeeded");

    // The next start (on a copy: this process may keep the failed
    // store's lock) finds what was flushed, and not the failed write.
    let copy = tempfile::tempdir().unwrap();
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(dir.path())
        .arg(copy.path().join("db"))
        .status()
        .unwrap();
    assert!(copied.success());
    let copied_blobs = copy.path().join("db").join("blobs");
    std::fs::remove_file(&copied_blobs).unwrap();
    std::fs::create_dir(&copied_blobs).unwrap();
    let db = sled::Config::new()
        .path(copy.path().join("db"))
        .open()
        .unwrap();
    assert_eq!(db.get(b"kept").unwrap().as_deref(), Some(b"1".as_slice()));
    assert_eq!(db.get(b"big").unwrap(), None);
}

#[tokio::test]
async fn checkpoints_are_paged_in_tenant_order_with_the_deferred_ones_newest() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    // On disk: "a-b" sorts after "a" by (tenant, sku), though '-' < '/'.
    for (t, v) in [("a", "a-old"), ("a-b", "ab-1"), ("c", "c-1")] {
        s.db.insert(pair_key(b'e', t, "payments"), v.as_bytes())
            .unwrap();
    }
    // Deferred (in the ledger's kept redo records): a newer "a", and "b".
    let r1 = first_batch(&s);
    let r2 = commit_one(&s, &r1, "a", "s1", b"a-new");
    commit_one(&s, &r2, "b", "s2", b"b-1");
    let page = |after: Option<(&str, &str)>, limit| -> Vec<(String, Vec<u8>)> {
        s.checkpoints_after(after, limit)
            .unwrap()
            .into_iter()
            .map(|(t, _, v)| (t, v))
            .collect()
    };
    let all = page(None, usize::MAX);
    let expect: Vec<(String, Vec<u8>)> =
        [("a", "a-new"), ("a-b", "ab-1"), ("b", "b-1"), ("c", "c-1")]
            .into_iter()
            .map(|(t, v)| (t.to_string(), v.as_bytes().to_vec()))
            .collect();
    assert_eq!(all, expect);
    assert_eq!(s.checkpoints_after(None, usize::MAX).unwrap().len(), 4);
    // Pages of one and of three walk the same list.
    let mut walked = Vec::new();
    for limit in [1, 3] {
        walked.clear();
        let mut after: Option<String> = None;
        loop {
            let p = page(after.as_deref().map(|t| (t, "payments")), limit);
            assert!(p.len() <= limit);
            let Some((last, _)) = p.last() else { break };
            after = Some(last.clone());
            walked.extend(p);
        }
        assert_eq!(walked, expect, "pages of {limit}");
    }
    assert!(page(Some(("c", "payments")), 10).is_empty());
}

#[tokio::test]
async fn a_backend_switch_moves_the_undecided_signals_across_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let ids = |v: Vec<(u64, Signal)>| v.into_iter().map(|(_, s)| s.id).collect::<Vec<_>>();
    {
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.move_queue_to_buffer().unwrap(), 0);
        let staged = stage(
            &s,
            vec![
                delivery(1, "acme", "a"),
                delivery(2, "acme", "b"),
                delivery(3, "acme", "c"),
            ],
        );
        s.durable_at(staged.flush).await.unwrap();
        let decided = WriteSet {
            signal_records: vec![completed("acme", "a")],
            ..WriteSet::default()
        };
        s.commit(&[], None, &decided).unwrap();
        // c was dead-lettered and replayed: queued twice, its record on disk.
        s.dead_letter_queued(&letter("acme", "c", "poison", 5))
            .unwrap();
        s.replay_dead_letter("acme", "c", 4).unwrap().unwrap();

        // Embedded to amqp: b and c, once each, in queue order.
        assert_eq!(s.move_queue_to_buffer().unwrap(), 2);
        assert!(s.pending().unwrap().is_empty());
        assert_eq!(s.last_queue_seq().unwrap(), 0, "no queue block is left");
        assert_eq!(ids(s.buffered(10).unwrap()), ["b", "c"]);
        assert_eq!(s.buffered_count(), 2);
        assert_eq!(s.move_queue_to_buffer().unwrap(), 0, "moved once");
        s.durable().await.unwrap();
    }
    let s = reopen(dir.path());
    assert_eq!(s.buffered_count(), 2);
    for id in ["b", "c"] {
        let r = s.signal_record("acme", id).unwrap().unwrap();
        assert_eq!(
            r.status,
            SignalStatus::Accepted,
            "{id} is still a duplicate"
        );
    }
    // c is decided meanwhile (the broker had a copy): only b goes back.
    let decided = WriteSet {
        signal_records: vec![completed("acme", "c")],
        ..WriteSet::default()
    };
    s.commit(&[], None, &decided).unwrap();
    // d's record never landed (buffered as if written before publishing).
    assert!(s.buffer_append(&[signal("acme", "d")], 10, true).unwrap());
    assert!(s.signal_record("acme", "d").unwrap().is_none());
    assert_eq!(s.move_buffer_to_queue().unwrap(), 2);
    assert_eq!(s.buffered_count(), 0);
    assert!(s.buffered(10).unwrap().is_empty());
    let pending = s.pending().unwrap();
    assert_eq!(
        pending
            .iter()
            .map(|(block, d)| (*block, d.seq, d.signal.id.as_str()))
            .collect::<Vec<_>>(),
        [(1, 1, "b"), (1, 2, "d")]
    );
    let r = s.signal_record("acme", "d").unwrap().unwrap();
    assert_eq!(r.status, SignalStatus::Accepted, "d is a duplicate now");
    assert_eq!(s.move_buffer_to_queue().unwrap(), 0, "moved once");
}

/// Signals in the large buffers below: two full moved blocks and a few.
const LARGE_BUFFER: usize = 2 * MOVED_BLOCK_MAX + 10;

/// Buffers acme's `m0`.. `m{LARGE_BUFFER - 1}`.
fn buffer_large(s: &Store) {
    let signals: Vec<Signal> = (0..LARGE_BUFFER)
        .map(|i| signal("acme", &format!("m{i}")))
        .collect();
    assert!(s
        .buffer_append(&signals, LARGE_BUFFER as u64, false)
        .unwrap());
}

#[tokio::test]
async fn a_large_buffer_moves_into_the_queue_in_blocks() {
    let (dir, n) = (tempfile::tempdir().unwrap(), LARGE_BUFFER);
    {
        let s = Store::open(dir.path()).unwrap();
        buffer_large(&s);
        assert_eq!(s.move_buffer_to_queue().unwrap(), n);
        s.durable().await.unwrap();
    }
    let s = reopen(dir.path());
    let pending = s.pending().unwrap();
    assert_eq!(pending.len(), n);
    let m = MOVED_BLOCK_MAX as u64;
    for (i, (block, d)) in pending.iter().enumerate() {
        let seq = i as u64 + 1;
        assert_eq!(d.seq, seq);
        assert_eq!(d.signal.id, format!("m{i}"), "in buffer order");
        assert_eq!(*block, (seq - 1) / m * m + 1, "seq {seq}");
    }
    assert_eq!(s.last_queue_seq().unwrap(), n as u64);
    assert_eq!(s.buffered_count(), 0);
}

/// Each block moves in a write of its own; a move a crash cut short (here:
/// one block moved, then the store closed) goes on at the next start, in
/// buffer order after the block it wrote.
#[tokio::test]
async fn a_buffer_moves_a_block_at_a_time_and_a_move_cut_short_goes_on() {
    let (dir, n) = (tempfile::tempdir().unwrap(), LARGE_BUFFER);
    {
        let s = Store::open(dir.path()).unwrap();
        buffer_large(&s);
        let first = s.buffered(MOVED_BLOCK_MAX).unwrap();
        let redo_before = s.redo_seq.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(s.move_buffered(first, &mut 0).unwrap(), MOVED_BLOCK_MAX);
        assert_eq!(
            s.redo_seq.load(std::sync::atomic::Ordering::SeqCst),
            redo_before + 1,
            "one write"
        );
        s.durable().await.unwrap();
    }
    let s = reopen(dir.path());
    assert_eq!(s.buffered_count(), (n - MOVED_BLOCK_MAX) as u64);
    let redo_before = s.redo_seq.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(s.move_buffer_to_queue().unwrap(), n - MOVED_BLOCK_MAX);
    assert_eq!(
        s.redo_seq.load(std::sync::atomic::Ordering::SeqCst),
        redo_before + 2,
        "a write per block"
    );
    assert_eq!(s.buffered_count(), 0);
    let ids: Vec<String> = s
        .pending()
        .unwrap()
        .into_iter()
        .map(|(_, d)| d.signal.id.clone())
        .collect();
    let expected: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    assert_eq!(ids, expected, "in buffer order, each once");
}

#[test]
fn an_orphan_is_taken_once_unless_given_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let key = |id: &str| ("t".to_string(), id.to_string());
    assert!(!store.take_orphan("t", "a"), "none set");
    store.set_orphans([key("a"), key("b")]);
    assert!(store.take_orphan("t", "a"));
    assert!(!store.take_orphan("t", "a"), "its retry is queued once");
    // Refused (a full queue): its next retry is queued after all.
    store.add_orphan(key("a"));
    assert!(store.take_orphan("t", "a"));
    assert!(!store.take_orphan("u", "b"), "by tenant and id");
    // A start sets them anew.
    store.set_orphans([key("c")]);
    assert!(!store.take_orphan("t", "b"));
    assert!(store.take_orphan("t", "c"));
}

#[test]
fn accepted_signals_held_neither_in_the_queue_nor_the_buffer_are_counted() {
    // As an amqp node leaves a data dir: records written before publishing,
    // one decided, one in the fallback buffer; then one moved to the
    // embedded queue. What remains `accepted` and held nowhere here is what
    // the broker's queue holds.
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let ids = ["a", "b", "c", "d", "e"];
    s.record_accepted(&ids.map(|id| signal("acme", id)))
        .unwrap();
    let decided = WriteSet {
        signal_records: vec![completed("acme", "c")],
        ..WriteSet::default()
    };
    s.commit(&[], None, &decided).unwrap();
    assert!(s.buffer_append(&[signal("acme", "d")], 10, true).unwrap());
    assert_eq!(
        s.accepted_not_queued(2).unwrap(),
        (
            3,
            vec![("acme".into(), "a".into()), ("acme".into(), "b".into())]
        )
    );
    assert_eq!(s.move_buffer_to_queue().unwrap(), 1, "d, into the queue");
    assert!(s.buffer_append(&[signal("acme", "e")], 10, true).unwrap());
    assert_eq!(
        s.accepted_not_queued(5).unwrap(),
        (
            2,
            vec![("acme".into(), "a".into()), ("acme".into(), "b".into())]
        )
    );
}
