//! A filter of the signal records (`s/` keys) on disk, so that the duplicate
//! check of a fresh client id (the common case: a miss) skips the sled
//! look-up, which walks the tree to a leaf that does not hold the key (4 %
//! of the node's CPU at load, BENCHMARKS.md session 18).
//!
//! It is a growable Bloom filter: "absent" is certain, "present" may be
//! wrong (1 % at first; each stage it grows by adds its own share, ~5 %
//! at ten million records, which take ~18 MB), and then the look-up goes
//! to disk as before. It never forgets a key, so a record removed from
//! disk (an `accepted` record the amqp backend takes back) only costs a
//! look-up.
//!
//! Every `s/` key is added before it is written ([`Known::add_all`], called by
//! the store's two writers of `s/` keys). The keys already on disk are
//! added by a thread that scans them when the store opens; until it is done
//! the filter answers "maybe" for everything (the look-ups go to disk), so
//! a large store opens as fast as before. A key on disk is therefore in the
//! filter once it is ready: it was either there when the scan began (sled's
//! iterator visits every key present when it starts and still present when
//! it passes), or written after the store opened.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use growable_bloom_filter::GrowableBloom;

/// The false-positive rate the filter keeps as it grows.
const ERROR_RATIO: f64 = 0.01;
/// The first stage's size; each further stage is twice the one before.
const FIRST_STAGE: usize = 100_000;
/// Keys the scan adds per lock.
const SCAN_CHUNK: usize = 4_096;

pub(crate) struct Known {
    bloom: Arc<Mutex<GrowableBloom>>,
    ready: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    scan: Option<JoinHandle<()>>,
}

impl Known {
    /// Starts the scan of the `s/` keys already in `db`.
    pub(crate) fn start(db: sled::Db) -> Known {
        let bloom = Arc::new(Mutex::new(GrowableBloom::new(ERROR_RATIO, FIRST_STAGE)));
        let ready = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, r, s) = (bloom.clone(), ready.clone(), stop.clone());
        let scan = std::thread::Builder::new()
            .name("tai-store-known".into())
            .spawn(move || match scan(&db, &b, &s) {
                Ok(Some(keys)) => {
                    r.store(true, Ordering::SeqCst);
                    tracing::debug!(keys, "signal record filter ready");
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    "could not scan the signal records; duplicate checks read the disk"
                ),
            })
            .map_err(|e| tracing::warn!(error = %e, "could not start the signal record scan"))
            .ok();
        Known {
            bloom,
            ready,
            stop,
            scan,
        }
    }

    /// Adds `s/` keys about to be written.
    pub(crate) fn add_all<'a>(&self, keys: impl IntoIterator<Item = &'a [u8]>) {
        let mut bloom = self.bloom.lock().expect("known records");
        for key in keys {
            bloom.insert(key);
        }
    }

    /// False only if no record is stored under `key`.
    pub(crate) fn may_exist(&self, key: &[u8]) -> bool {
        !self.ready.load(Ordering::SeqCst)
            || self.bloom.lock().expect("known records").contains(key)
    }

    /// Whether the scan of the keys on disk is done (the filter is in use).
    #[cfg(test)]
    pub(crate) fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// Adds every `s/` key in `db`; `None` if told to stop first.
fn scan(
    db: &sled::Db,
    bloom: &Mutex<GrowableBloom>,
    stop: &AtomicBool,
) -> sled::Result<Option<u64>> {
    let mut keys = db.scan_prefix(b"s/").keys();
    let mut count = 0;
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let chunk = keys
            .by_ref()
            .take(SCAN_CHUNK)
            .collect::<sled::Result<Vec<_>>>()?;
        if chunk.is_empty() {
            return Ok(Some(count));
        }
        count += chunk.len() as u64;
        let mut bloom = bloom.lock().expect("known records");
        for k in &chunk {
            bloom.insert(&k[..]);
        }
    }
}

impl Drop for Known {
    fn drop(&mut self) {
        // The scan holds the database open (and sled locks its directory).
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.scan.take() {
            let _ = t.join();
        }
    }
}
