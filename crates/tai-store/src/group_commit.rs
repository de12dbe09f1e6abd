//! Group commit: one thread calls `flush()`; writers wait for a flush that
//! started after their write. Every write that lands while a flush runs is
//! carried by the next one, so the flush rate adapts to the load.
//!
//! Queue blocks are staged rather than written: the flusher writes
//! everything staged since its last flush as one block per run of
//! consecutive seqs, just before it flushes, so a block holds what one flush
//! carries (not what one mailbox drain of the queue held: ~2.5 signals at
//! load, BENCHMARKS.md session 15), and each block is one sled insert and
//! one removal.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tai_core::msg::Delivery;
use tokio::sync::watch;

/// Runs of consecutive queue deliveries waiting for the next flush, each
/// to be written as one block keyed by its first seq.
#[derive(Default)]
pub(crate) struct StagedRuns {
    runs: Vec<Vec<Delivery>>,
}

impl StagedRuns {
    /// Adds `deliveries` (consecutive seqs) and returns the block they will
    /// be written in: the run they continue, or a new one.
    fn push(&mut self, deliveries: Vec<Delivery>) -> Option<u64> {
        let first = deliveries.first()?.seq;
        match self.runs.last_mut() {
            Some(run) if run.last().is_some_and(|d| d.seq + 1 == first) => {
                run.extend(deliveries);
                Some(run[0].seq)
            }
            _ => {
                self.runs.push(deliveries);
                Some(first)
            }
        }
    }
}

/// What the flusher calls with the staged runs before each flush.
pub(crate) type WriteStaged = Box<dyn Fn(Vec<Vec<Delivery>>) -> Result<(), String> + Send>;

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
    /// The first failure (a flush's, or a write's through
    /// [`GroupCommit::fail`]): sled fails every write after an I/O error
    /// until it is opened again, so this store is done for.
    fatal: watch::Sender<Option<String>>,
    thread: Option<JoinHandle<()>>,
    staged: Arc<Mutex<StagedRuns>>,
}

impl GroupCommit {
    pub(crate) fn start(db: sled::Db, log: crate::LogSync, write_staged: WriteStaged) -> Self {
        let staged = Arc::new(Mutex::new(StagedRuns::default()));
        let stage = staged.clone();
        let started = Arc::new(AtomicU64::new(0));
        let pending = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = watch::channel((0u64, None));
        let fatal = watch::Sender::new(None);
        let report = fatal.clone();
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
                // Under the staging lock, so that a stager learns which
                // flush carries what it staged.
                let (generation, runs) = {
                    let mut staged = stage.lock().expect("staged queue blocks");
                    let runs = std::mem::take(&mut staged.runs);
                    (s.fetch_add(1, Ordering::SeqCst) + 1, runs)
                };
                let flushing = std::time::Instant::now();
                let written = if runs.is_empty() {
                    Ok(())
                } else {
                    write_staged(runs)
                };
                let result = match written {
                    Ok(()) => log.flush(&db).err().map(|e| match e {
                        crate::StoreError::Io(e) => crate::plain(&e),
                        e => e.to_string(),
                    }),
                    Err(e) => Some(e),
                };
                metrics::histogram!(tai_core::telemetry::STORE_FLUSH_SECONDS)
                    .record(flushing.elapsed());
                if let Some(e) = &result {
                    tracing::error!(error = %e, "group commit flush failed");
                    first_failure(&report, e, &db);
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
            fatal,
            thread: Some(thread),
            staged,
        }
    }

    /// Stages queue deliveries (consecutive seqs) for the next flush;
    /// returns the block they will be written in and the flush that will
    /// carry them (pass it to [`GroupCommit::durable_at`]).
    pub(crate) fn stage(&self, deliveries: Vec<Delivery>) -> Option<(u64, u64)> {
        let block = {
            let mut staged = self.staged.lock().expect("staged queue blocks");
            let block = staged.push(deliveries)?;
            (block, self.started.load(Ordering::SeqCst) + 1)
        };
        // Staged blocks are written even if nobody waits for them.
        self.pending.store(true, Ordering::SeqCst);
        Some(block)
    }

    /// Marks the store on `db` failed (a write met the I/O error before a
    /// flush did); the first reason stays.
    pub(crate) fn fail(&self, reason: &str, db: &sled::Db) {
        first_failure(&self.fatal, reason, db);
    }

    /// Why this store can no longer make writes durable, once it cannot.
    pub(crate) fn failure(&self) -> Option<String> {
        self.fatal.borrow().clone()
    }

    /// Waits until the store fails (forever if it does not).
    pub(crate) async fn failed(&self) -> String {
        let mut rx = self.fatal.subscribe();
        let first = rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|f| f.clone());
        match first {
            Some(e) => e,
            None => std::future::pending().await,
        }
    }

    /// How many flushes have started.
    pub(crate) fn flushes(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    pub(crate) async fn durable(&self) -> Result<(), String> {
        // A flush numbered above the one started now began after our write.
        self.durable_at(self.started.load(Ordering::SeqCst) + 1)
            .await
    }

    /// Waits for flush `target` (and asks for it). Once the store has
    /// failed, answers with the failure: at once (a flush after sled's
    /// I/O error may never return), and also to a writer that was
    /// waiting, even if a later flush succeeded, since `done` holds the
    /// latest flush's result only and a failed flush drops the queue
    /// blocks it was to write.
    pub(crate) async fn durable_at(&self, target: u64) -> Result<(), String> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        self.pending.store(true, Ordering::SeqCst);
        if self.waiting.fetch_add(1, Ordering::SeqCst) == 0
            || self.waiting.load(Ordering::Relaxed) >= BATCH_WRITES
        {
            if let Some(t) = &self.thread {
                t.thread().unpark();
            }
        }
        let mut rx = self.done.clone();
        let latest = rx
            .wait_for(|(generation, _)| *generation >= target)
            .await
            .map_err(|_| "the flusher stopped".to_string())?
            .1
            .clone();
        // Flushes after a failed one may succeed (not every sled error
        // sticks), but what the failed one carried is not on disk.
        if let Some(e) = self.failure() {
            return Err(e);
        }
        match latest {
            Some(e) => Err(e),
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

/// Records `reason` as the store's failure unless one is already recorded.
///
/// The first time, one handle of `db` is leaked: sled flushes when its last
/// handle is dropped, and after an I/O error that flush can wait forever
/// (seen on a full disk: `make_stable` never returns), which would hang
/// whichever thread dropped the store last, and so the node's exit. A
/// failed store is not used again; the process ends without that flush.
fn first_failure(fatal: &watch::Sender<Option<String>>, reason: &str, db: &sled::Db) {
    let fresh = fatal.send_if_modified(|first| {
        let fresh = first.is_none();
        first.get_or_insert_with(|| reason.to_string());
        fresh
    });
    if fresh {
        std::mem::forget(db.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::{GroupCommit, StagedRuns};
    use std::sync::atomic::{AtomicBool, Ordering};
    use tai_core::msg::Delivery;

    fn run(seqs: std::ops::Range<u64>) -> Vec<Delivery> {
        seqs.map(|seq| Delivery {
            seq,
            signal: std::sync::Arc::new(crate::tests::signal("acme", &format!("s{seq}"))),
            redelivered: false,
        })
        .collect()
    }

    #[test]
    fn staged_deliveries_join_the_run_they_continue() {
        let mut staged = StagedRuns::default();
        assert_eq!(staged.push(Vec::new()), None, "nothing to stage");
        assert_eq!(staged.push(run(5..7)), Some(5));
        assert_eq!(staged.push(run(7..8)), Some(5), "continues 5..7");
        // A seq taken elsewhere (a replayed dead letter writes its own block).
        assert_eq!(staged.push(run(9..11)), Some(9));
        assert_eq!(staged.push(run(11..12)), Some(9));
        let runs: Vec<Vec<u64>> = staged
            .runs
            .iter()
            .map(|r| r.iter().map(|d| d.seq).collect())
            .collect();
        assert_eq!(runs, [vec![5, 6, 7], vec![9, 10, 11]]);
    }

    /// A flush that failed dropped the blocks it was to write; a later
    /// flush that succeeds does not make them durable, so a writer of the
    /// failed one is told it failed, however late it looks.
    #[tokio::test]
    async fn a_failed_flush_is_not_answered_by_a_later_success() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let (entered, mut writing) = tokio::sync::mpsc::unbounded_channel::<()>();
        let once = AtomicBool::new(false);
        let commit = GroupCommit::start(
            db,
            crate::LogSync::none(),
            Box::new(move |_runs| {
                if once.swap(true, Ordering::SeqCst) {
                    Ok(())
                } else {
                    // The first flush's write waits for the test.
                    let _ = entered.send(());
                    let _ = wait.recv();
                    Err("could not write a queue block: no room".to_string())
                }
            }),
        );
        // Dropped before `commit` (whose drop joins the flusher), so that a
        // failing assertion does not leave the flusher waiting on it.
        let go = go;
        let (_, first) = commit.stage(run(1..3)).unwrap();
        let waiter = commit.durable_at(first);
        tokio::pin!(waiter);
        assert!(
            tokio::time::timeout(std::time::Duration::ZERO, waiter.as_mut())
                .await
                .is_err(),
            "waiting for the first flush"
        );
        writing.recv().await.expect("the first flush writes");
        // Staged behind it: the next flush writes this, and succeeds.
        let (_, second) = commit.stage(run(3..4)).unwrap();
        assert_eq!(second, first + 1);
        go.send(()).unwrap();
        let mut done = commit.done.clone();
        done.wait_for(|(generation, _)| *generation >= second)
            .await
            .unwrap();
        assert_eq!(commit.done.borrow().1, None, "the later flush succeeded");
        assert_eq!(
            waiter.await.unwrap_err(),
            "could not write a queue block: no room",
            "the failed flush, seen after a later one succeeded"
        );
    }

    /// A write that met sled's I/O error marks the store failed before any
    /// flush does: a writer is answered with that failure, not with a
    /// flush that may still succeed (or never return).
    #[tokio::test]
    async fn a_store_failed_by_a_write_answers_every_writer_with_the_failure() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let commit =
            GroupCommit::start(db.clone(), crate::LogSync::none(), Box::new(|_runs| Ok(())));
        commit.durable().await.expect("a working store flushes");
        commit.fail("i/o error: no storage space", &db);
        let (_, flush) = commit.stage(run(1..2)).unwrap();
        assert_eq!(
            commit.durable_at(flush).await.unwrap_err(),
            "i/o error: no storage space"
        );
        assert_eq!(
            commit.durable().await.unwrap_err(),
            "i/o error: no storage space"
        );
    }
}
