//! Group commit: one thread calls `flush()`; writers wait for a flush that
//! started after their write. Every write that lands while a flush runs is
//! carried by the next one, so the flush rate adapts to the load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tokio::sync::watch;

/// After the first write of a batch, how long the flusher lets more writes
/// join it before flushing, unless `BATCH_WRITES` are already waiting.
/// Measured with `tai bench` (BENCHMARKS.md): 0 µs gave p99 24 ms at
/// 5,000/s, 1 ms gave 17 ms, 250 µs gave 13 ms at the same throughput.
const LINGER: Duration = Duration::from_micros(250);
const BATCH_WRITES: u64 = 256;

pub(crate) struct GroupCommit {
    started: Arc<AtomicU64>,
    pending: Arc<AtomicBool>,
    waiting: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    done: watch::Receiver<(u64, Option<String>)>,
    thread: Option<JoinHandle<()>>,
}

impl GroupCommit {
    pub(crate) fn start(db: sled::Db) -> Self {
        let started = Arc::new(AtomicU64::new(0));
        let pending = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = watch::channel((0u64, None));
        let waiting = Arc::new(AtomicU64::new(0));
        let (s, p, st, w) = (
            started.clone(),
            pending.clone(),
            stop.clone(),
            waiting.clone(),
        );
        let thread = thread::Builder::new()
            .name("tai-store-flusher".into())
            .spawn(move || loop {
                let mut idle = false;
                while !p.swap(false, Ordering::SeqCst) {
                    if st.load(Ordering::SeqCst) {
                        return;
                    }
                    idle = true;
                    thread::park_timeout(Duration::from_millis(100));
                }
                // Let the batch fill: one flush costs about the same for one
                // write or hundreds. Writers unpark this thread once
                // `BATCH_WRITES` wait. Not after a flush that writes were
                // already waiting for: the flush itself was their linger.
                let linger_until = std::time::Instant::now() + LINGER;
                while idle && w.load(Ordering::SeqCst) < BATCH_WRITES {
                    let now = std::time::Instant::now();
                    if now >= linger_until {
                        break;
                    }
                    thread::park_timeout(linger_until - now);
                }
                p.store(false, Ordering::SeqCst);
                w.store(0, Ordering::SeqCst);
                let generation = s.fetch_add(1, Ordering::SeqCst) + 1;
                let result = db.flush().err().map(|e| e.to_string());
                if let Some(e) = &result {
                    tracing::error!(error = %e, "group commit flush failed");
                }
                tx.send_replace((generation, result));
            })
            .expect("spawn the flusher thread");
        GroupCommit {
            started,
            pending,
            waiting,
            stop,
            done: rx,
            thread: Some(thread),
        }
    }

    /// How many flushes have started.
    pub(crate) fn flushes(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    pub(crate) async fn durable(&self) -> Result<(), String> {
        // A flush numbered above the one started now began after our write.
        let target = self.started.load(Ordering::SeqCst) + 1;
        self.pending.store(true, Ordering::SeqCst);
        if self.waiting.fetch_add(1, Ordering::SeqCst) == 0
            || self.waiting.load(Ordering::Relaxed) >= BATCH_WRITES
        {
            if let Some(t) = &self.thread {
                t.thread().unpark();
            }
        }
        let mut rx = self.done.clone();
        let seen = rx
            .wait_for(|(generation, _)| *generation >= target)
            .await
            .map_err(|_| "the flusher stopped".to_string())?;
        match &seen.1 {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
