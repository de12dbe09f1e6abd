//! Durable enqueues per second through group commit: `--writers` tasks each
//! enqueue a signal and wait for it to be durable, for a few seconds.
//!
//! Run: `cargo bench -p tai-store --bench group_commit`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tai_core::signal::Signal;
use tai_store::Store;

fn signal(n: u64) -> Signal {
    let payload =
        serde_json::json!({"amount": 42.0, "currency": "USD", "customer_id": format!("c{n}")});
    Signal {
        id: format!("s{n}"),
        tenant_id: format!("t{}", n % 100),
        sku_id: "bench".into(),
        kind: "payment".into(),
        critical: false,
        payload: payload.as_object().unwrap().clone().into(),
        received_at_ms: 0,
        trace_id: None,
        traceparent: None,
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for writers in [1u64, 16, 64, 256] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let seq = Arc::new(AtomicU64::new(0));
        let end = Instant::now() + Duration::from_secs(3);
        let started = Instant::now();
        let done: u64 = rt.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..writers {
                let (store, seq) = (store.clone(), seq.clone());
                tasks.push(tokio::spawn(async move {
                    let mut n = 0u64;
                    while Instant::now() < end {
                        let s = seq.fetch_add(1, Ordering::Relaxed);
                        let staged = store
                            .stage_enqueue(vec![tai_core::msg::Delivery {
                                seq: s,
                                signal: std::sync::Arc::new(signal(s)),
                                redelivered: false,
                            }])
                            .unwrap();
                        store.durable_at(staged.flush).await.unwrap();
                        n += 1;
                    }
                    n
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await.unwrap();
            }
            total
        });
        let secs = started.elapsed().as_secs_f64();
        let flushes = store.flushes();
        println!(
            "group_commit writers={writers}: {:.0} durable enqueues/s, {} flushes ({:.2} ms each, {:.1} writes per flush)",
            done as f64 / secs,
            flushes,
            secs * 1000.0 / flushes.max(1) as f64,
            done as f64 / flushes.max(1) as f64
        );
    }
}
