//! Sealing a receipt (SPEC §7: its hash over the previous hash and its
//! canonical JSON, then the HMAC of that hash): the ledger does it twice
//! for every decided signal.
//!
//! cargo bench -p tai-core --bench receipt

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use tai_core::receipt::{prefixed_ulid, Receipt, ReceiptDraft, SigningKey};
use tai_core::signal::EngineState;

fn draft() -> ReceiptDraft {
    ReceiptDraft {
        receipt_id: prefixed_ulid("rcpt_"),
        kind: "action_generated".into(),
        tenant_id: "bench-42".into(),
        sku_id: "payments".into(),
        signal_id: Some("01KBENCHBENCHBENCHBENCHBENC".into()),
        action_id: Some(prefixed_ulid("act_")),
        state_before: EngineState::Stable.into(),
        state_after: EngineState::ActionPending.into(),
        success: true,
        reason: None,
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        timestamp_ms: 1_764_000_000_000,
    }
}

fn seal(c: &mut Criterion) {
    let key = SigningKey::new(b"bench-signing-key");
    let prev = "a".repeat(64);
    let d = draft();
    c.bench_function("receipt_seal", |b| {
        b.iter(|| Receipt::seal(black_box(d.clone()), 7, &prev, "k1", &key))
    });
    let sealed = Receipt::seal(d, 7, &prev, "k1", &key);
    c.bench_function("receipt_compute_hash", |b| {
        b.iter(|| black_box(&sealed).compute_hash())
    });
}

criterion_group!(benches, seal);
criterion_main!(benches);
