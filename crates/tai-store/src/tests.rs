use super::*;
use serde_json::Map;
use tai_core::receipt::{ReceiptDraft, GENESIS_HASH};
use tai_core::signal::EngineState;

fn signal(tenant: &str, id: &str) -> Signal {
    Signal {
        id: id.into(),
        tenant_id: tenant.into(),
        sku_id: "payments".into(),
        kind: "payment".into(),
        critical: false,
        payload: Map::new(),
        received_at_ms: 1,
        trace_id: None,
    }
}

/// Opens a store just closed in this process. sled's I/O threads let go of
/// the directory lock shortly after the last handle is dropped, so the
/// reopen waits for it (a new process, as in production, never has to).
fn reopen(dir: &std::path::Path) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Store::open(dir) {
            Ok(s) => return s,
            Err(StoreError::Open { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("reopen failed: {e}"),
        }
    }
}

fn receipt(seq: u64, prev: &str) -> Receipt {
    let d = ReceiptDraft {
        receipt_id: format!("r{seq}"),
        kind: "action_generated".into(),
        tenant_id: "acme".into(),
        sku_id: "payments".into(),
        signal_id: Some("s1".into()),
        action_id: None,
        state_before: EngineState::Stable,
        state_after: EngineState::ActionPending,
        success: true,
        reason: None,
        trace_id: None,
        timestamp_ms: seq,
    };
    Receipt::seal(d, seq, prev, "k", b"key")
}

#[tokio::test]
async fn enqueue_dedupes_per_tenant_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        assert!(s.enqueue(1, &signal("acme", "a")).unwrap().is_none());
        assert!(
            s.enqueue(2, &signal("other", "a")).unwrap().is_none(),
            "ids are per tenant"
        );
        let dup = s.enqueue(3, &signal("acme", "a")).unwrap().unwrap();
        assert_eq!(dup.status, SignalStatus::Accepted);
        s.durable().await.unwrap();
    }
    let s = reopen(dir.path());
    let pending = s.pending().unwrap();
    assert_eq!(pending.iter().map(|d| d.seq).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(s.last_queue_seq().unwrap(), 2);
}

#[tokio::test]
async fn a_commit_is_atomic_and_acks_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    s.enqueue(7, &signal("acme", "a")).unwrap();
    let r1 = receipt(1, GENESIS_HASH);
    let r2 = receipt(2, &r1.hash);
    let head = SignedHead::new(2, &r2.hash, "k", b"key");
    let mut rec = SignalRecord::accepted(&signal("acme", "a"));
    rec.status = SignalStatus::Completed;
    rec.receipts = vec!["r1".into(), "r2".into()];
    let writes = WriteSet {
        signal_records: vec![rec.clone()],
        checkpoint: Some(("acme".into(), "payments".into(), b"{}".to_vec())),
        acks: vec![7],
        dead_letters: vec![],
    };
    s.commit(&[r1, r2], Some(&head), &writes).unwrap();
    s.durable().await.unwrap();
    assert!(s.pending().unwrap().is_empty());
    assert_eq!(s.signal_record("acme", "a").unwrap().unwrap(), rec);
    assert_eq!(s.head().unwrap().unwrap(), head);
    assert_eq!(s.receipts(1, 10, None).unwrap().len(), 1);
    assert_eq!(s.receipts(0, 10, Some("nobody")).unwrap().len(), 0);
    assert_eq!(s.checkpoint("acme", "payments").unwrap().unwrap(), b"{}");
    assert_eq!(s.checkpoints().unwrap()[0].1, "payments");
}

#[tokio::test]
async fn dead_letters_are_replayed_into_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    s.enqueue(1, &signal("acme", "a")).unwrap();
    let letter = DeadLetter {
        signal: signal("acme", "a"),
        reason: "poison".into(),
        at_ms: 5,
    };
    s.dead_letter_queued(1, &letter).unwrap();
    assert!(s.pending().unwrap().is_empty());
    assert_eq!(s.dead_letter_count(), 1);
    assert_eq!(
        s.signal_record("acme", "a").unwrap().unwrap().status,
        SignalStatus::Deadlettered
    );
    assert!(s.replay_dead_letter("acme", "zzz", 2).unwrap().is_none());
    let again = s.replay_dead_letter("acme", "a", 2).unwrap().unwrap();
    assert_eq!(again.id, "a");
    assert_eq!(s.pending().unwrap()[0].seq, 2);
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
            s.enqueue(i + 1, &signal("acme", &format!("id{i}")))
                .unwrap();
            s.durable().await.unwrap();
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
fn the_data_dir_is_locked_and_starts_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.record_start().unwrap(), 1);
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Open { .. })
        ));
    }
    let s = reopen(dir.path());
    assert_eq!(s.record_start().unwrap(), 2);
}
