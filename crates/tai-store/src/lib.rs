//! tai-store: the only crate that names sled.
//!
//! One sled database per node, under `node.data_dir`, opened once per process
//! outside the supervision tree (like an ETS table owned by the application),
//! so a layer restart never closes it.
//!
//! Everything lives in one tree under key prefixes, so that one decision
//! (receipts, signed head, checkpoint, signal status, queue ack, dead letter)
//! is one atomic `apply_batch`:
//!
//! | prefix | key | value |
//! |---|---|---|
//! | `q/` | first queue seq of a block (u64 BE) | `[Delivery]`: the consecutive signals one group flush carried (version byte 1 + bincode, older ones JSON) |
//! | `s/` | tenant `\0` signal id | `SignalRecord` once the signal is past `accepted` (the dedupe key; version byte 2 + bincode, packed: tenant and id from the key, receipt ids as bytes; older ones version 1 or JSON) |
//! | `e/` | tenant `\0` sku | engine checkpoint (the engine's bytes) |
//! | `r/` | last receipt seq of a block (u64 BE) | `[Receipt]`: one ledger batch, in seq order (version byte 2 + bincode, packed: ids, hashes and signatures as bytes, repeated texts once per block, `prev_hash` implied by the receipt before; older ones version 1 or JSON) |
//! | `d/` | tenant `\0` signal id | `DeadLetter` |
//! | `v/` | tenant `\0` sku `\0` customer | a customer's recent payment times |
//! | `m/` | name | the node's records: the signed ledger head, start count and those of [`meta`] |
//! | `w/` | redo id (u64 BE) | a write set being applied, or applied but for the engine checkpoints and signal records it defers (`Deferred`) |
//! | `f/` | buffer seq (u64 BE) | `Signal`: the amqp backend's fallback buffer (broker down) |
//! | `x/` | a key set aside | the damaged value that was under it ([`check::set_aside`]: never read by the node) |
//!
//! Atomicity: a set of writes is first stored as one redo record (`w/`), then
//! applied, then the record is removed; a record found at start is applied
//! again (the writes are idempotent puts and deletes). A ledger batch writes
//! its receipt block first, by itself, and the signed head in the redo
//! record: a receipt block at start that chains onto the head but is past
//! it never committed and is dropped (so the receipts are not written twice).
//! A ledger batch's record is kept instead, applied but for its engine
//! checkpoints and signal records, until those are written out (sealed
//! every 256 batches, in key order, then written a slice per commit;
//! `Deferred`); at start such a
//! record (its head, its last write, is not past the head on disk) gives
//! only those again.
//!
//! Writes per signal are what the node's throughput is made of (each sled
//! insert copies a leaf), so the queue and the ledger write blocks: a queue
//! block holds every signal staged for one group flush (the flusher writes
//! it just before it flushes, [`Store::stage_enqueue`]) and goes when all of
//! them are decided (a block found at start is filtered by the `s/` records,
//! so a decided signal is never delivered again); a receipt block holds one
//! ledger batch. A queued signal's `accepted` record lives in memory (rebuilt
//! from the queue blocks at open), so enqueueing writes no `s/` key.
//!
//! Durability is by group commit ([`Store::durable`]): one flusher thread calls
//! `flush()`; writers wait for a flush that began after their write. Never
//! sled's asynchronous flush from many tasks (it deadlocked under concurrency, sled #1308).

pub mod check;
mod codec;
#[cfg(test)]
mod damage;
mod group_commit;
pub mod head;
mod known;
pub mod meta;
mod packed;
mod receipts;
mod redo;
#[cfg(any(test, feature = "test-support"))]
pub mod tmpfs;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tai_core::msg::{Delivery, WriteSet};
use tai_core::receipt::{Receipt, SignedHead, GENESIS_HASH};
use tai_core::signal::{DeadLetter, Signal, SignalRecord, SignalStatus};
use thiserror::Error;

use group_commit::GroupCommit;

/// Each message carries its cause itself (none is chained as a `source`),
/// so a report that prints an error's chain (`{:#}`) says it once.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot open the data directory {path}: {}", plain(.cause))]
    Open { path: String, cause: sled::Error },
    /// Another process (another node) holds the data directory's lock.
    #[error("the data directory {path} is in use by another process (is another tai node running on it?)")]
    InUse { path: String },
    /// Opened for reading only (offline commands), and no node's store is there.
    #[error("no store in {path}: it holds no sled/db (give the data_dir of a node)")]
    Missing { path: String },
    #[error("store i/o failed: {}", plain(.0))]
    Io(sled::Error),
    #[error("store flush failed: {0}")]
    Flush(String),
    /// `key` as [`check::key_text`] prints it.
    #[error("corrupt record at {key}: {message}")]
    Corrupt { key: String, message: String },
    /// An offline operation on the store refused, saying why.
    #[error("{0}")]
    Refused(String),
    /// A flush failed: sled fails every write after an I/O error until it
    /// is opened again, so the node must be started again.
    #[error("the store failed and must be reopened (start the node again): {0}")]
    Failed(String),
}

impl StoreError {
    /// A stable code for logs and the HTTP layer.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Open { .. } => "store_open",
            StoreError::InUse { .. } => "store_in_use",
            StoreError::Missing { .. } => "store_missing",
            StoreError::Io(_) => "store_io",
            StoreError::Flush(_) => "store_flush",
            StoreError::Corrupt { .. } => "store_corrupt",
            StoreError::Refused(_) => "store_refused",
            StoreError::Failed(_) => "store_failed",
        }
    }
}

/// A sled error in plain words. sled wraps an I/O error's Debug form in
/// another (`IO error: Custom { kind: StorageFull, error: "Os { code: 28,
/// .. }" }`), and that reaches clients in a 503's message; its kind says the
/// same plainly ("i/o error: no storage space").
pub(crate) fn plain(e: &sled::Error) -> String {
    match e {
        sled::Error::Io(io) if io.kind() != std::io::ErrorKind::Other => {
            format!("i/o error: {}", io.kind())
        }
        other => other.to_string(),
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e)
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A handle to the node's store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    log: LogSync,
    commit: Arc<GroupCommit>,
    redo_seq: Arc<std::sync::atomic::AtomicU64>,
    /// Queued signals not yet past `accepted`, by their `s/` key: what their
    /// `accepted` record is made of (one entry per waiting signal, so kept small).
    queued: Arc<Mutex<HashMap<Box<[u8]>, Queued>>>,
    /// The fallback buffer: next seq and how many signals it holds.
    buffer: Arc<Mutex<BufferCursor>>,
    /// A filter of the `s/` keys on disk: a miss skips the sled look-up.
    known: Arc<known::Known>,
    /// Engine checkpoints and signal records committed but not yet written
    /// to their `e/` and `s/` keys.
    deferred: Arc<Mutex<Deferred>>,
    /// How many `d/` keys there are: counted at open, then kept as letters
    /// are written and replayed, so `/admin/queue` and `/ready` (which ask
    /// the queue actor) do not scan every dead letter each time. Every
    /// letter write and replay holds it from the look-up of the letter's key
    /// to the write, so two writers of one letter (the dispatcher and an
    /// engine, or a replay) count it once.
    letters: Arc<Mutex<u64>>,
    /// Signals recorded `accepted` on the amqp queue this data dir last ran
    /// on that the embedded queue does not hold ([`Store::set_orphans`]).
    orphans: Arc<Mutex<std::collections::HashSet<(String, String)>>>,
    /// The highest delivery seq the embedded queue handed out in this
    /// process ([`Store::note_queue_seq`], [`Store::next_queue_seq`]).
    queue_seq_high: Arc<std::sync::atomic::AtomicU64>,
}

/// Checkpoints and signal records a ledger commit made durable in its redo
/// record, which is kept, instead of writing each to its key at once: a
/// sled insert is a walk down the tree and a copy of the leaf, and a
/// signal's record (its dedupe key) was one per signal, its engine's
/// checkpoint ~0.3 more at load. Between two write-outs most engines commit
/// many times and only the last of their checkpoints is written; and the
/// write-out puts everything in key order, each leaf rewritten once for all
/// its keys ([`sled::Tree::apply_sorted`], vendor/sled/PATCHED.md 8), not
/// walked to and copied once per key. Reads see these first.
///
/// Every [`DEFERRED_RECORDS`] commits the latest values are sealed, in key
/// order, and the commits after write them to their keys a slice at a time
/// (so no commit waits for a whole write-out: with 100,000 tenants at
/// 2,000 signals/s one took ~3 ms, each key in a leaf of its own); once
/// all are written the kept records of that generation are dropped (with
/// sorted removes). Before any other write to a deferred key
/// ([`Store::settle`]), and when the node stops, everything deferred is
/// written out at once, so that the open, which writes the kept records'
/// deferred puts again in order after a crash, never writes an older
/// value over a newer one.
#[derive(Default)]
struct Deferred {
    /// The latest value of each key deferred since the last seal.
    latest: HashMap<Box<[u8]>, Vec<u8>>,
    /// Ids of the redo records kept for `latest`, in order.
    retained: Vec<u64>,
    /// The generation sealed last, in key order, being written out.
    sealed: Vec<(Box<[u8]>, Vec<u8>)>,
    /// How many of `sealed` are written.
    sealed_written: usize,
    /// Ids of the redo records kept for `sealed`.
    sealed_records: Vec<u64>,
}

impl Deferred {
    /// The deferred value of `key`, if it has one.
    fn get(&self, key: &[u8]) -> Option<&[u8]> {
        if let Some(v) = self.latest.get(key) {
            return Some(v);
        }
        let i = self.sealed.binary_search_by(|(k, _)| (**k).cmp(key)).ok()?;
        Some(&self.sealed[i].1)
    }

    /// The first `limit` deferred checkpoints (`e/` keys) after the key
    /// `after`, in key order, each at its latest value. Only those are
    /// copied, so paging through many engines does not copy every
    /// deferred checkpoint for each page.
    fn checkpoints(&self, after: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut page: BTreeMap<&[u8], &[u8]> = BTreeMap::new();
        // `latest` after `sealed`: the newer value wins.
        for (k, v) in self
            .sealed
            .iter()
            .map(|(k, v)| (k, v))
            .chain(self.latest.iter())
        {
            if k.starts_with(b"e/") && **k > *after {
                page.insert(k, v);
            }
        }
        page.into_iter()
            .take(limit)
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect()
    }

    /// How many sealed writes a commit writes out: enough to be done
    /// within half the commits before the next seal.
    fn slice(&self) -> usize {
        self.sealed
            .len()
            .div_ceil(DEFERRED_RECORDS / 2)
            .max(WRITE_OUT_SLICE_MIN)
    }
}

/// Kept redo records between two seals of the deferred writes.
const DEFERRED_RECORDS: usize = 256;

/// The fewest sealed writes a commit writes out.
const WRITE_OUT_SLICE_MIN: usize = 32;

/// The keys a ledger commit defers: engine checkpoints and signal records.
const DEFERRED: &[&[u8]] = &[b"e/", b"s/"];

/// The rest of a queued signal's `accepted` record (its key holds the tenant and id).
struct Queued {
    sku_id: Box<str>,
    kind: Box<str>,
}

impl Queued {
    fn of(s: &Signal) -> Queued {
        Queued {
            sku_id: s.sku_id.as_str().into(),
            kind: s.kind.as_str().into(),
        }
    }

    /// The `accepted` record of the signal under `key` (`s/` tenant `\0` id).
    fn record(&self, key: &[u8]) -> SignalRecord {
        let (tenant, id) = split_pair_key(key).unwrap_or((key.get(2..).unwrap_or_default(), &[]));
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        SignalRecord {
            signal_id: text(id),
            tenant_id: text(tenant),
            // `String::from`, not `to_string`: a `Box<str>` would go
            // through the formatter (once per decided signal).
            sku_id: String::from(&*self.sku_id),
            kind: String::from(&*self.kind),
            status: SignalStatus::Accepted,
            receipts: Vec::new(),
            reason: None,
        }
    }
}

/// Where [`Store::stage_enqueue`] put deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Staged {
    /// The queue block they are in (its first seq).
    pub block: u64,
    /// The group flush that writes and carries them.
    pub flush: u64,
}

#[derive(Debug, Default)]
struct BufferCursor {
    next: u64,
    count: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

const NODE_STARTS: &[u8] = b"m/node_starts";
const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;
const HEAD: &[u8] = b"m/head";
/// At most this many `accepted` records the amqp backend wrote are also kept
/// in memory ([`Store::record_accepted`]): a node that publishes what
/// another node decides (a standby taking HTTP traffic) never drops them.
pub const ACCEPTED_INDEX_MAX: usize = 65_536;

fn seq_key(prefix: u8, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(10);
    k.extend_from_slice(&[prefix, b'/']);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn pair_key(prefix: u8, a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + a.len() + b.len());
    write_pair_key(&mut k, prefix, a, b);
    k
}

/// Appends the key [`pair_key`] makes to `k`.
fn write_pair_key(k: &mut Vec<u8>, prefix: u8, a: &str, b: &str) {
    k.extend_from_slice(&[prefix, b'/']);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
}

/// The two parts of a key [`pair_key`] made (after its two-byte prefix):
/// the first up to the first `\0`, the rest after it.
pub(crate) fn split_pair_key(key: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = key.get(2..)?;
    let split = rest.iter().position(|b| *b == 0)?;
    Some((&rest[..split], &rest[split + 1..]))
}

fn velocity_key(tenant: &str, sku: &str, customer: &str) -> Vec<u8> {
    let mut k = pair_key(b'v', tenant, sku);
    k.push(0);
    k.extend_from_slice(customer.as_bytes());
    k
}

/// Signals in one queue block at most, when the amqp backend's buffer
/// moves into the embedded queue (a buffer of 88,022 was once one block).
pub const MOVED_BLOCK_MAX: usize = 4096;

fn seq_of(key: &[u8]) -> u64 {
    key.get(2..10)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_be_bytes)
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("store values serialize")
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: check::key_text(key),
        message: e.to_string(),
    })
}

/// Where sled keeps the store inside a data directory.
fn sled_dir(dir: &Path) -> std::path::PathBuf {
    dir.join("sled")
}

/// `dir` holds a node's store ([`StoreError::Missing`] if not): the
/// offline commands read one, and must not make an empty one.
fn existing(dir: &Path) -> Result<()> {
    if sled_dir(dir).join("db").is_file() {
        Ok(())
    } else {
        Err(StoreError::Missing {
            path: dir.display().to_string(),
        })
    }
}

/// sled, opened in `dir` with its page cache at `cache_bytes`; another
/// process holding the directory is [`StoreError::InUse`].
fn open_db(dir: &Path, cache_bytes: u64) -> Result<sled::Db> {
    sled::Config::new()
        .path(sled_dir(dir))
        .cache_capacity(cache_bytes)
        // Durability is ours (group commit); sled's own timer would only
        // add flushes that race ours.
        .flush_every_ms(None)
        .open()
        .map_err(|cause| {
            let path = dir.display().to_string();
            match cause {
                // sled takes an exclusive, non-blocking lock on its
                // file, and words a lock another process holds so
                // (sled 0.34.7, vendor/sled/src/config.rs; the store's
                // tests check it).
                sled::Error::Io(ref e)
                    if e.to_string().starts_with("could not acquire lock on") =>
                {
                    StoreError::InUse { path }
                }
                cause => StoreError::Open { path, cause },
            }
        })
}

/// sled's log file (`sled/db`), synced (`fdatasync`) after every flush.
/// sled's flush waits on `sync_file_range` for the range it wrote: that
/// survives a killed process, but writes neither the file's size (the log
/// grows a segment at a time) nor the disk's write cache, so a power cut
/// could take what a 202 promised. `fdatasync` on our own handle of the
/// file does both, once per group commit (BENCHMARKS.md session 46: no
/// cost measured at 256 clients; ~60 µs a call here).
#[derive(Clone)]
pub(crate) struct LogSync(Option<Arc<std::fs::File>>);

impl LogSync {
    /// sled's file in `sled_dir`, and the directory synced once, so that
    /// the file's own name in it is on disk too.
    fn open(sled_dir: &Path) -> std::io::Result<LogSync> {
        let log = std::fs::File::open(sled_dir.join("db"))?;
        std::fs::File::open(sled_dir)?.sync_all()?;
        Ok(LogSync(Some(Arc::new(log))))
    }

    /// For a sled without a file (the tests' temporary ones).
    #[cfg(test)]
    pub(crate) fn none() -> LogSync {
        LogSync(None)
    }

    /// Flushes `db`, then syncs its log.
    pub(crate) fn flush(&self, db: &sled::Db) -> Result<()> {
        db.flush()?;
        match &self.0 {
            Some(log) => log
                .sync_data()
                .map_err(|e| StoreError::Flush(format!("could not sync sled's log: {e}"))),
            None => Ok(()),
        }
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir`. sled holds a lock on the
    /// directory: a second process on the same data dir is refused here.
    pub fn open(dir: &Path) -> Result<Store> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens the store a node left in `dir`, for offline reading: a
    /// directory without one is an error, not a new empty store (which
    /// would verify as an empty ledger and leave sled's files behind).
    pub fn open_existing(dir: &Path) -> Result<Store> {
        existing(dir)?;
        Self::open(dir)
    }

    /// Opens with sled's page cache bounded to `cache_bytes` (sled's own
    /// default is 1 GiB, which a node with many tenants would fill).
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Store> {
        let db = open_db(dir, cache_bytes)?;
        let log = LogSync::open(&sled_dir(dir)).map_err(|e| StoreError::Open {
            path: dir.display().to_string(),
            cause: e.into(),
        })?;
        let blocks = db.clone();
        let commit = Arc::new(GroupCommit::start(
            db.clone(),
            log.clone(),
            Box::new(move |runs| {
                for run in runs {
                    let first = run.first().map_or(0, |d| d.seq);
                    blocks
                        .insert(seq_key(b'q', first), codec::encode_block(&run))
                        .map_err(|e| format!("could not write a queue block: {}", plain(&e)))?;
                }
                Ok(())
            }),
        ));
        // A kept redo record (its head, which it puts last, is not past the
        // head on disk) was applied but for its checkpoints.
        let head_seq = match db.get(HEAD)? {
            Some(v) => decode::<SignedHead>(HEAD, &v)?.seq,
            None => 0,
        };
        let redo_seq = redo::recover(&db, DEFERRED, |ops| {
            ops.last_put(HEAD)
                .and_then(|v| decode::<SignedHead>(HEAD, v).ok())
                .is_some_and(|h| h.seq <= head_seq)
        })?;
        // After the redo records are applied: the scan must see their keys.
        let known = Arc::new(known::Known::start(db.clone()));
        let letters = Arc::new(Mutex::new(db.scan_prefix(b"d/").keys().count() as u64));
        let store = Store {
            db,
            log,
            commit,
            redo_seq: Arc::new(std::sync::atomic::AtomicU64::new(redo_seq)),
            queued: Arc::default(),
            buffer: Arc::default(),
            known,
            deferred: Arc::default(),
            letters,
            orphans: Arc::default(),
            queue_seq_high: Arc::default(),
        };
        store.recover_queue()?;
        store.recover_buffer()?;
        store.drop_uncommitted_receipts()?;
        let aside = store.db.scan_prefix(b"x/").keys().count();
        if aside > 0 {
            tracing::warn!(
                records = aside,
                "this store holds damaged records set aside (under x/, never read): `tai store check` lists them"
            );
        }
        Ok(store)
    }

    /// Rebuilds the in-memory `accepted` records from the queue blocks and
    /// drops blocks whose signals are all decided. The highest seq in any
    /// block is where [`Store::next_queue_seq`] starts above: a data dir
    /// written before replays kept blocks runs of consecutive seqs may hold
    /// a higher seq in an earlier block than in the last one.
    fn recover_queue(&self) -> Result<()> {
        let mut queued = HashMap::new();
        let mut spent = Vec::new();
        for (block, deliveries) in self.blocks()? {
            let mut open = 0;
            for d in deliveries {
                self.note_queue_seq(d.seq);
                let key = pair_key(b's', &d.signal.tenant_id, &d.signal.id);
                match self.disk_record(&key)? {
                    Some(r) if r.status.is_final() => {}
                    // A replayed dead letter keeps its record on disk.
                    Some(_) => open += 1,
                    None => {
                        open += 1;
                        queued.insert(key.into(), Queued::of(&d.signal));
                    }
                }
            }
            if open == 0 {
                spent.push(block);
            }
        }
        for block in spent {
            self.db.remove(seq_key(b'q', block))?;
        }
        *self.queued.lock().expect("queued index") = queued;
        Ok(())
    }

    fn blocks(&self) -> Result<Vec<(u64, Vec<Delivery>)>> {
        self.db
            .scan_prefix(b"q/")
            .map(|kv| {
                let (k, v) = kv?;
                Ok((seq_of(&k), codec::decode_block(&k, &v)?))
            })
            .collect()
    }

    /// A signal's record in the store: deferred, or on disk.
    fn disk_record(&self, key: &[u8]) -> Result<Option<SignalRecord>> {
        if !self.known.may_exist(key) {
            return Ok(None);
        }
        if let Some(v) = self.deferred.lock().expect("deferred writes").get(key) {
            return codec::decode_record(key, v).map(Some);
        }
        self.db
            .get(key)?
            .map(|v| codec::decode_record(key, &v))
            .transpose()
    }

    fn decided_on_disk(&self, tenant: &str, id: &str) -> Result<bool> {
        Ok(self
            .disk_record(&pair_key(b's', tenant, id))?
            .is_some_and(|r| r.status.is_final()))
    }

    /// Drops the in-memory `accepted` records of these (tenant, signal id)
    /// pairs. Each key is built in one buffer: a commit runs this for every
    /// decision.
    fn forget_queued<'a>(&self, signals: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let mut q = self.queued.lock().expect("queued index");
        let mut key = Vec::new();
        for (tenant, id) in signals {
            key.clear();
            write_pair_key(&mut key, b's', tenant, id);
            q.remove(&key[..]);
        }
    }

    /// Applies `ops` atomically (all or none survive a crash) through the redo
    /// record: sled's own `apply_batch` forces a synchronous disk write per
    /// batch, which would defeat group commit. Settled first (see
    /// [`Store::settle`]).
    fn atomic(&self, ops: redo::Ops) -> Result<()> {
        let mut deferred = self.deferred.lock().expect("deferred writes");
        self.settle(&mut deferred, ops.keys())?;
        let id = self.redo_id_for(&ops);
        self.noting(redo::apply(&self.db, id, ops))
    }

    /// Passes `r` on. A sled I/O error in it marks the store failed at
    /// once, as a failed flush does ([`Store::failed`]): sled writes
    /// nothing more after one until it is opened again, and the writer that
    /// met it first (the ledger, say) must not leave the supervisors to
    /// restart it against a store that can only fail.
    fn noting<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(StoreError::Io(e @ sled::Error::Io(_))) = &r {
            self.commit.fail(&plain(e), &self.db);
        }
        r
    }

    /// Before a write of `keys` other than a ledger commit's deferred ones
    /// (made while `d` stays locked): if any of them is deferred, writes the
    /// deferred set out first. Otherwise a kept record would still hold the
    /// older value, and the open after a crash would write it again over
    /// this write.
    fn settle<'k>(&self, d: &mut Deferred, mut keys: impl Iterator<Item = &'k [u8]>) -> Result<()> {
        if !(d.latest.is_empty() && d.sealed.is_empty()) && keys.any(|k| d.get(k).is_some()) {
            self.write_out(d)?;
        }
        Ok(())
    }

    /// The next redo id, for a set whose `s/` keys are added to the filter
    /// of known records first (before they are written, as the filter needs).
    fn redo_id_for(&self, ops: &redo::Ops) -> u64 {
        self.known
            .add_all(ops.inserted_keys().filter(|k| k.starts_with(b"s/")));
        self.redo_seq
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }

    /// Writes out everything deferred: the sealed generation's rest, then
    /// the latest values, sealed for it.
    fn write_out(&self, d: &mut Deferred) -> Result<()> {
        self.seal(d)?;
        self.write_sealed(d, usize::MAX)
    }

    /// A commit's share of the write-out: a seal when one is due, then a
    /// slice of the sealed writes.
    fn write_out_slice(&self, d: &mut Deferred) -> Result<()> {
        if d.retained.len() >= DEFERRED_RECORDS {
            self.seal(d)?;
        }
        let slice = d.slice();
        self.write_sealed(d, slice)
    }

    /// Seals the latest values (after writing out the rest of the
    /// generation sealed before, if any).
    fn seal(&self, d: &mut Deferred) -> Result<()> {
        self.write_sealed(d, usize::MAX)?;
        let mut sealed: Vec<_> = d.latest.drain().collect();
        sealed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        d.sealed = sealed;
        d.sealed_written = 0;
        d.sealed_records = std::mem::take(&mut d.retained);
        Ok(())
    }

    /// Writes up to `n` more of the sealed writes to their keys, in key
    /// order; once all are written, drops the redo records that kept them
    /// (in that order: a crash in between leaves records whose writes are
    /// made again at open, in order, so the latest still wins). On an
    /// error what is not written stays sealed (and writing it again is
    /// harmless).
    fn write_sealed(&self, d: &mut Deferred, n: usize) -> Result<()> {
        if d.sealed.is_empty() {
            return Ok(());
        }
        let end = d.sealed.len().min(d.sealed_written.saturating_add(n));
        let puts: Vec<(&[u8], Option<&[u8]>)> = d.sealed[d.sealed_written..end]
            .iter()
            .map(|(k, v)| (&k[..], Some(v.as_slice())))
            .collect();
        self.db.apply_sorted(&puts)?;
        d.sealed_written = end;
        if end == d.sealed.len() {
            let records: Vec<([u8; 10], Option<&[u8]>)> = d
                .sealed_records
                .iter()
                .map(|&id| (redo::key(id), None))
                .collect();
            self.db.apply_sorted(&records)?;
            d.sealed.clear();
            d.sealed_written = 0;
            d.sealed_records.clear();
        }
        Ok(())
    }

    /// Waits until everything written before this call is on disk.
    pub async fn durable(&self) -> Result<()> {
        self.commit.durable().await.map_err(StoreError::Flush)
    }

    /// Flushes started so far (group commit's batching shows as writes per flush).
    pub fn flushes(&self) -> u64 {
        self.commit.flushes()
    }

    /// The group flush that will carry a write made now.
    pub fn next_flush(&self) -> u64 {
        self.commit.flushes() + 1
    }

    /// Whether flush `generation` has begun: a write made now is durable
    /// only with a later one. A writer whose last write waits for a flush
    /// that has begun can gather what comes meanwhile into one write.
    pub fn flush_begun(&self, generation: u64) -> bool {
        self.commit.flushes() >= generation
    }

    /// Counts this start and returns the count (1 on a fresh data dir).
    /// A count that does not read is logged and counted again from 1.
    pub fn record_start(&self) -> Result<u64> {
        let next = self
            .db
            .update_and_fetch(NODE_STARTS, |old| {
                let n = old.map_or(Ok(0), meta::read_u64).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "the count of starts (m/node_starts) does not read: counting again from 1");
                    0
                });
                Some((n + 1).to_be_bytes().to_vec())
            })?
            // The count just written, 8 bytes.
            .and_then(|b| meta::read_u64(&b).ok())
            .unwrap_or(0);
        self.log.flush(&self.db)?;
        Ok(next)
    }

    /// Whether the store has failed for good (see [`Store::failed`]).
    pub fn has_failed(&self) -> bool {
        self.commit.failure().is_some()
    }

    /// Whether the store answers a read: the readiness probe.
    pub fn ping(&self) -> Result<()> {
        if let Some(reason) = self.commit.failure() {
            return Err(StoreError::Failed(reason));
        }
        self.noting(self.db.get(NODE_STARTS).map_err(StoreError::from))?;
        Ok(())
    }

    /// Waits until the store fails for good (a flush or a write met an
    /// I/O error: see [`StoreError::Failed`]) and says why; pending while
    /// it works.
    pub async fn failed(&self) -> String {
        self.commit.failed().await
    }

    /// Writes out the deferred checkpoints and flushes: what the node does
    /// when it stops, so that the next start has no kept records to go
    /// through.
    pub fn flush(&self) -> Result<()> {
        self.write_out(&mut self.deferred.lock().expect("deferred writes"))?;
        self.log.flush(&self.db)
    }

    // ---- signals and the queue -------------------------------------------

    /// The record of a signal: its `s/` record, or `accepted` while it is queued.
    pub fn signal_record(&self, tenant: &str, id: &str) -> Result<Option<SignalRecord>> {
        let key = pair_key(b's', tenant, id);
        // The queued index first: a decision writes `s/` before it forgets
        // the index entry, so a miss here is never a miss on disk too.
        if let Some(q) = self.queued.lock().expect("queued index").get(&key[..]) {
            return Ok(Some(q.record(&key)));
        }
        self.disk_record(&key)
    }

    /// The record of a signal as a crash now would leave it: what
    /// [`Store::signal_record`] reads, answered once a flush begun after
    /// the read is done. The read sees writes still in a group flush (a
    /// decision, say); a crash or a failed flush takes those back, and the
    /// signal is decided again, perhaps differently. So a client is never
    /// shown what the store does not keep: on a failed store this is the
    /// failure, not the record. A miss needs no flush.
    pub async fn settled_record(&self, tenant: &str, id: &str) -> Result<Option<SignalRecord>> {
        let Some(record) = self.signal_record(tenant, id)? else {
            return Ok(None);
        };
        self.durable().await?;
        Ok(Some(record))
    }

    /// Stages `deliveries` (consecutive seqs, after any staged before) for
    /// the next group flush, which writes every run of consecutive staged
    /// deliveries as one queue block just before it flushes. Returns the
    /// block they will be in (its first seq) and the flush to wait for with
    /// [`Store::durable_at`] before the 202. The caller (the queue owner)
    /// has checked for duplicates and serialises calls.
    pub fn stage_enqueue(&self, deliveries: Vec<Delivery>) -> Option<Staged> {
        {
            let mut q = self.queued.lock().expect("queued index");
            for d in &deliveries {
                q.insert(
                    pair_key(b's', &d.signal.tenant_id, &d.signal.id).into(),
                    Queued::of(&d.signal),
                );
            }
        }
        let (block, flush) = self.commit.stage(deliveries)?;
        Some(Staged { block, flush })
    }

    /// Waits until flush `generation` (from [`Store::stage_enqueue`]) is done.
    pub async fn durable_at(&self, generation: u64) -> Result<()> {
        self.commit
            .durable_at(generation)
            .await
            .map_err(StoreError::Flush)
    }

    /// Drops a queue block whose signals are all decided or dead-lettered.
    /// Needs no durability of its own: a block that survives a crash is
    /// filtered at open.
    pub fn remove_block(&self, block: u64) -> Result<()> {
        self.noting(
            self.db
                .remove(seq_key(b'q', block))
                .map_err(StoreError::from),
        )?;
        Ok(())
    }

    /// Every undecided queued signal with its block, in queue order. A
    /// replayed dead letter is also in the block it was first queued in:
    /// only its latest place counts.
    pub fn pending(&self) -> Result<Vec<(u64, Delivery)>> {
        let mut out: Vec<Option<(u64, Delivery)>> = Vec::new();
        let mut place = HashMap::new();
        for (block, deliveries) in self.blocks()? {
            for d in deliveries {
                if self.decided_on_disk(&d.signal.tenant_id, &d.signal.id)? {
                    continue;
                }
                let id = (d.signal.tenant_id.clone(), d.signal.id.clone());
                if let Some(earlier) = place.insert(id, out.len()) {
                    out[earlier] = None;
                }
                out.push(Some((block, d)));
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Signals recorded `accepted` on an amqp queue that the embedded queue
    /// does not hold (the node, started on `embedded` after an amqp run,
    /// sets them from [`Store::accepted_not_queued`]): still in that queue,
    /// or never published (a node killed between the record and its
    /// publish; its client got no 202). A retry of one is queued anew
    /// ([`Store::take_orphan`]) instead of answered as a duplicate of a
    /// signal nothing here would decide.
    pub fn set_orphans(&self, keys: impl IntoIterator<Item = (String, String)>) {
        let mut orphans = self.orphans.lock().expect("orphans");
        orphans.clear();
        orphans.extend(keys);
    }

    /// Whether `(tenant, id)` was one of [`Store::set_orphans`]'s, forgotten
    /// as it is answered: its retry is queued once.
    pub fn take_orphan(&self, tenant: &str, id: &str) -> bool {
        let mut orphans = self.orphans.lock().expect("orphans");
        !orphans.is_empty() && orphans.remove(&(tenant.to_string(), id.to_string()))
    }

    /// Remembers `(tenant, id)` again (taken, then refused: the queue was full).
    pub fn add_orphan(&self, key: (String, String)) {
        self.orphans.lock().expect("orphans").insert(key);
    }

    /// The signals (tenant, id) the embedded queue and the fallback buffer
    /// hold. Reads both whole: for a backend switch only.
    pub fn held_keys(&self) -> Result<std::collections::HashSet<(String, String)>> {
        let mut held: std::collections::HashSet<(String, String)> = self
            .pending()?
            .into_iter()
            .map(|(_, d)| (d.signal.tenant_id.clone(), d.signal.id.clone()))
            .collect();
        held.extend(
            self.buffered(usize::MAX)?
                .into_iter()
                .map(|(_, s)| (s.tenant_id, s.id)),
        );
        Ok(held)
    }

    /// Signals recorded `accepted` that neither the embedded queue nor the
    /// fallback buffer holds: after a switch from an amqp queue, the ones
    /// that queue still holds (or whose publish a crash cut). How many, and
    /// the first `examples` of them (tenant, signal id; ask for every one
    /// with `usize::MAX`). Reads every signal
    /// record: for a backend switch only. A record that does not decode is
    /// skipped (it is reported where it is read).
    pub fn accepted_not_queued(&self, examples: usize) -> Result<(u64, Vec<(String, String)>)> {
        let queued = self.held_keys()?;
        let (mut count, mut some) = (0, Vec::new());
        for kv in self.db.scan_prefix(b"s/") {
            let (k, v) = kv?;
            let Ok(r) = codec::decode_record(&k, &v) else {
                continue;
            };
            if r.status == SignalStatus::Accepted
                && !queued.contains(&(r.tenant_id.clone(), r.signal_id.clone()))
            {
                count += 1;
                if some.len() < examples {
                    some.push((r.tenant_id, r.signal_id));
                }
            }
        }
        Ok((count, some))
    }

    /// Notes that the embedded queue hands out delivery seqs up to `seq`:
    /// called before any of them is staged, written or dispatched.
    pub fn note_queue_seq(&self, seq: u64) {
        self.queue_seq_high
            .fetch_max(seq, std::sync::atomic::Ordering::SeqCst);
    }

    /// The first delivery seq an embedded queue opening now may hand out:
    /// past the last queue block on disk, and past every seq a queue handed
    /// out earlier in this process. A queue that a kill or its supervisor
    /// restarted must not hand out its dead incarnation's seqs again: the
    /// blocks of signals decided since are gone from disk, and engines
    /// still hold (and acknowledge, or drop a copy of) what it sent, an
    /// ack coming again for a copy sent again after the decision. A reused
    /// seq let such an ack settle a new signal's block (lost at the next
    /// crash), and an engine drop a new signal as a copy of one it held.
    pub fn next_queue_seq(&self) -> Result<u64> {
        let high = self
            .queue_seq_high
            .load(std::sync::atomic::Ordering::SeqCst);
        Ok(self.last_queue_seq()?.max(high) + 1)
    }

    pub fn last_queue_seq(&self) -> Result<u64> {
        let Some(kv) = self.db.scan_prefix(b"q/").next_back().transpose()? else {
            return Ok(0);
        };
        let (k, v) = kv;
        let block = codec::decode_block(&k, &v)?;
        Ok(block.last().map_or(seq_of(&k), |d| d.seq))
    }

    /// Takes a queued signal out as a dead letter (no decision was made).
    /// Its queue block goes when the rest of it is decided.
    pub fn dead_letter_queued(&self, letter: &DeadLetter) -> Result<()> {
        let s = &letter.signal;
        let key = pair_key(b's', &s.tenant_id, &s.id);
        let mut record = self
            .signal_record(&s.tenant_id, &s.id)?
            .unwrap_or_else(|| SignalRecord::accepted(s));
        record.status = SignalStatus::Deadlettered;
        record.reason = Some(letter.reason.clone());
        let mut batch = redo::Ops::default();
        let mut letters = self.letters.lock().expect("dead letter count");
        let new = self.put_letter(&mut batch, letter)?;
        batch.insert(key, codec::encode_record(&record));
        self.atomic(batch)?;
        *letters += new;
        drop(letters);
        self.forget_queued([(s.tenant_id.as_str(), s.id.as_str())]);
        Ok(())
    }

    /// Dead letters by tenant then signal id: one tenant's (or all), those
    /// after the letter `after` names (tenant, signal id), at most `limit`.
    pub fn dead_letters(
        &self,
        tenant: Option<&str>,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        use std::ops::Bound;
        let prefix = match tenant {
            // `d/{tenant}\0`: this tenant's, not those of a longer name.
            Some(t) => pair_key(b'd', t, ""),
            None => b"d/".to_vec(),
        };
        let start = match after.map(|(t, id)| pair_key(b'd', t, id)) {
            Some(key) if key >= prefix => Bound::Excluded(key),
            _ => Bound::Included(prefix.clone()),
        };
        self.db
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
            .take_while(|kv| kv.as_ref().map_or(true, |(k, _)| k.starts_with(&prefix)))
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Tenant `tenant`'s dead letter `signal_id`, if there is one.
    pub fn dead_letter(&self, tenant: &str, signal_id: &str) -> Result<Option<DeadLetter>> {
        let key = pair_key(b'd', tenant, signal_id);
        self.db.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    /// The tenants holding a dead letter `signal_id` (checked for `tenant`
    /// alone when given). Keys only: no letter is decoded.
    pub fn dead_letter_tenants(
        &self,
        signal_id: &str,
        tenant: Option<&str>,
    ) -> Result<Vec<String>> {
        if let Some(t) = tenant {
            let found = self.db.contains_key(pair_key(b'd', t, signal_id))?;
            return Ok(if found {
                vec![t.to_string()]
            } else {
                Vec::new()
            });
        }
        // `d/{tenant}\0{signal_id}`: neither name holds a NUL.
        let mut suffix = vec![0u8];
        suffix.extend_from_slice(signal_id.as_bytes());
        let mut tenants = Vec::new();
        for kv in self.db.scan_prefix(b"d/") {
            let (k, _) = kv?;
            if let Some(t) = k.strip_suffix(suffix.as_slice()) {
                tenants.push(String::from_utf8_lossy(&t[2..]).into_owned());
            }
        }
        Ok(tenants)
    }

    pub fn dead_letter_count(&self) -> u64 {
        *self.letters.lock().expect("dead letter count")
    }

    /// Puts `letter` in `batch`; 1 if its key is new, 0 if it is written
    /// again over itself (so it is not counted twice). The caller holds
    /// [`Store::letters`] until the batch is written.
    fn put_letter(&self, batch: &mut redo::Ops, letter: &DeadLetter) -> Result<u64> {
        let key = pair_key(b'd', &letter.signal.tenant_id, &letter.signal.id);
        let new = u64::from(!self.db.contains_key(&key)?);
        batch.insert(key, encode(letter));
        Ok(new)
    }

    /// A replayed dead letter's record: `accepted` again, its receipts kept.
    fn replayed_record(&self, letter: &DeadLetter) -> Result<SignalRecord> {
        let s = &letter.signal;
        let mut record = self
            .signal_record(&s.tenant_id, &s.id)?
            .unwrap_or_else(|| SignalRecord::accepted(s));
        record.status = SignalStatus::Accepted;
        record.reason = None;
        Ok(record)
    }

    /// Puts a dead letter back in the queue as a block of one at `seq`,
    /// atomically: the letter goes, the signal is `accepted` again. `None`
    /// if there is no such letter.
    pub fn replay_dead_letter(
        &self,
        tenant: &str,
        id: &str,
        seq: u64,
    ) -> Result<Option<std::sync::Arc<Signal>>> {
        let key = pair_key(b'd', tenant, id);
        let mut letters = self.letters.lock().expect("dead letter count");
        let Some(v) = self.db.get(&key)? else {
            return Ok(None);
        };
        let letter: DeadLetter = decode(&key, &v)?;
        let record = self.replayed_record(&letter)?;
        let delivery = Delivery {
            seq,
            signal: std::sync::Arc::new(letter.signal),
            redelivered: false,
        };
        let mut batch = redo::Ops::default();
        batch.remove(key);
        batch.insert(pair_key(b's', tenant, id), codec::encode_record(&record));
        let signal = delivery.signal.clone();
        batch.insert(seq_key(b'q', seq), codec::encode_block(&[delivery]));
        self.atomic(batch)?;
        *letters = letters.saturating_sub(1);
        Ok(Some(signal))
    }

    // ---- the amqp backend ----------------------------------------------------

    /// Records signals handed to the broker as `accepted` (`s/`), the dedupe
    /// key until their decision replaces it. Durable with the next group flush.
    ///
    /// The records are also kept in the in-memory index a queued signal's
    /// `accepted` record lives in on the embedded queue (up to
    /// [`ACCEPTED_INDEX_MAX`] entries), so the engine that decides the signal
    /// reads it from memory, not from the tree; its decision (or
    /// [`Store::forget_accepted`]) drops it. Past the cap, and after a
    /// restart, the record is read from disk: the same record either way.
    pub fn record_accepted(&self, signals: &[Signal]) -> Result<()> {
        let keys: Vec<_> = signals
            .iter()
            .map(|s| pair_key(b's', &s.tenant_id, &s.id))
            .collect();
        self.known.add_all(keys.iter().map(|k| &k[..]));
        {
            let mut deferred = self.deferred.lock().expect("deferred writes");
            self.settle(&mut deferred, keys.iter().map(|k| &k[..]))?;
            for (key, s) in keys.iter().zip(signals) {
                self.db
                    .insert(key, codec::encode_record(&SignalRecord::accepted(s)))?;
            }
        }
        let mut q = self.queued.lock().expect("queued index");
        for (key, s) in keys.into_iter().zip(signals) {
            if q.len() >= ACCEPTED_INDEX_MAX {
                break;
            }
            q.insert(key.into(), Queued::of(s));
        }
        Ok(())
    }

    /// Forgets `accepted` records of signals that were refused after all
    /// (neither the broker nor the buffer took them), so a retry is not a duplicate.
    pub fn forget_accepted(&self, signals: &[Signal]) -> Result<()> {
        self.forget_queued(
            signals
                .iter()
                .map(|s| (s.tenant_id.as_str(), s.id.as_str())),
        );
        let keys: Vec<Vec<u8>> = signals
            .iter()
            .map(|s| pair_key(b's', &s.tenant_id, &s.id))
            .collect();
        // Held over every removal, so that no commit defers one of these
        // keys again in between.
        let mut deferred = self.deferred.lock().expect("deferred writes");
        self.settle(&mut deferred, keys.iter().map(|k| &k[..]))?;
        for key in keys {
            let Some(old) = self.db.get(&key)? else {
                continue;
            };
            if codec::decode_record(&key, &old)?.status == SignalStatus::Accepted {
                // Compare-and-swap: a decision landing meanwhile stays.
                let _ = self
                    .db
                    .compare_and_swap(&key, Some(old), None as Option<&[u8]>)?;
            }
        }
        Ok(())
    }

    fn recover_buffer(&self) -> Result<()> {
        let mut cur = self.buffer.lock().expect("buffer cursor");
        cur.count = self.db.scan_prefix(b"f/").keys().count() as u64;
        cur.next = match self.db.scan_prefix(b"f/").keys().next_back() {
            Some(k) => seq_of(&k?) + 1,
            None => 1,
        };
        Ok(())
    }

    /// Appends signals to the fallback buffer, in order, with their
    /// `accepted` records unless `recorded` (written before publishing);
    /// refused (false) if that would pass `max`. A signal already past
    /// `accepted` is left out: an engine has it, so the broker had it (its
    /// publisher confirm was lost, not the message); and a record is never
    /// overwritten here, so a decision landing meanwhile is not undone.
    /// Call [`Store::durable`] before the 202.
    pub fn buffer_append(&self, signals: &[Signal], max: u64, recorded: bool) -> Result<bool> {
        let mut fresh = Vec::with_capacity(signals.len());
        for s in signals {
            let key = pair_key(b's', &s.tenant_id, &s.id);
            if self
                .disk_record(&key)?
                .is_none_or(|r| r.status == SignalStatus::Accepted)
            {
                fresh.push((key, s));
            }
        }
        let mut cur = self.buffer.lock().expect("buffer cursor");
        if cur.count + fresh.len() as u64 > max {
            return Ok(false);
        }
        let mut batch = redo::Ops::default();
        for (i, (key, s)) in fresh.iter().enumerate() {
            batch.insert(seq_key(b'f', cur.next + i as u64), encode(s));
            if !recorded {
                batch.insert(
                    key.as_slice(),
                    codec::encode_record(&SignalRecord::accepted(s)),
                );
            }
        }
        self.atomic(batch)?;
        cur.next += fresh.len() as u64;
        cur.count += fresh.len() as u64;
        Ok(true)
    }

    /// The oldest `limit` buffered signals with their buffer seqs.
    pub fn buffered(&self, limit: usize) -> Result<Vec<(u64, Signal)>> {
        self.db
            .scan_prefix(b"f/")
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((seq_of(&k), decode(&k, &v)?))
            })
            .collect()
    }

    /// Drops buffered signals the broker has confirmed. No durability of its
    /// own: one that survives a crash is published again and deduplicated.
    pub fn unbuffer(&self, seqs: &[u64]) -> Result<()> {
        let mut cur = self.buffer.lock().expect("buffer cursor");
        for &seq in seqs {
            if self.db.remove(seq_key(b'f', seq))?.is_some() {
                cur.count = cur.count.saturating_sub(1);
            }
        }
        Ok(())
    }

    pub fn buffered_count(&self) -> u64 {
        self.buffer.lock().expect("buffer cursor").count
    }

    // ---- switching backends ----------------------------------------------

    /// For a node switched from `embedded` to `amqp`, before its queue
    /// starts: moves every undecided signal of the embedded queue into the
    /// fallback buffer (which publishes it once the broker is reachable),
    /// in queue order, atomically. Each gets its `accepted` record on disk
    /// (a replayed dead letter keeps the one it has) and every queue block
    /// goes. Returns how many moved. Durable with the next flush.
    pub fn move_queue_to_buffer(&self) -> Result<usize> {
        let blocks = self
            .db
            .scan_prefix(b"q/")
            .keys()
            .map(|k| k.map(|k| seq_of(&k)))
            .collect::<std::result::Result<Vec<u64>, _>>()?;
        if blocks.is_empty() {
            return Ok(0);
        }
        let pending = self.pending()?;
        let mut cur = self.buffer.lock().expect("buffer cursor");
        let mut batch = redo::Ops::default();
        for (i, (_, d)) in pending.iter().enumerate() {
            let s = &*d.signal;
            batch.insert(seq_key(b'f', cur.next + i as u64), encode(s));
            let key = pair_key(b's', &s.tenant_id, &s.id);
            if self.disk_record(&key)?.is_none() {
                batch.insert(key, codec::encode_record(&SignalRecord::accepted(s)));
            }
        }
        for block in blocks {
            batch.remove(seq_key(b'q', block));
        }
        self.atomic(batch)?;
        // Their `accepted` records are on disk now.
        self.forget_queued(
            pending
                .iter()
                .map(|(_, d)| (d.signal.tenant_id.as_str(), d.signal.id.as_str())),
        );
        cur.next += pending.len() as u64;
        cur.count += pending.len() as u64;
        Ok(pending.len())
    }

    /// For a node switched from `amqp` to `embedded`, before its queue
    /// starts: moves the fallback buffer's signals into the embedded queue
    /// after its last, in buffer order, in blocks of at most
    /// [`MOVED_BLOCK_MAX`] (a block goes only once all its signals are
    /// decided, and is read whole at each start), each block atomically
    /// with its signals' removal from the buffer (their `accepted` records
    /// stay, and one missing is written; one decided meanwhile is only
    /// dropped from the buffer). A block at a time, so neither the move's
    /// memory nor its redo records grow with the buffer (a drained broker
    /// queue may hold any number); a move a crash cut short goes on at the
    /// next start, after the blocks it wrote. Returns how many moved.
    /// Durable with the next flush.
    pub fn move_buffer_to_queue(&self) -> Result<usize> {
        let mut cur = self.buffer.lock().expect("buffer cursor");
        let mut moved = 0;
        // The queue's last seq, read once (each block after it is noted).
        let mut seq = self.next_queue_seq()? - 1;
        loop {
            let buffered = self.buffered(MOVED_BLOCK_MAX)?;
            if buffered.is_empty() {
                return Ok(moved);
            }
            let taken = buffered.len() as u64;
            moved += self.move_buffered(buffered, &mut seq)?;
            cur.count = cur.count.saturating_sub(taken);
        }
    }

    /// Moves `buffered` (at most a block's worth, in buffer order) into a
    /// queue block after `seq`, the queue's last, atomically; `seq` becomes
    /// the block's last.
    pub(crate) fn move_buffered(
        &self,
        buffered: Vec<(u64, Signal)>,
        seq: &mut u64,
    ) -> Result<usize> {
        let mut batch = redo::Ops::default();
        let mut deliveries = Vec::with_capacity(buffered.len());
        for (at, signal) in buffered {
            batch.remove(seq_key(b'f', at));
            let key = pair_key(b's', &signal.tenant_id, &signal.id);
            match self.disk_record(&key)? {
                Some(r) if r.status.is_final() => {
                    tracing::debug!(tenant = %signal.tenant_id, signal = %signal.id, "a buffered signal decided meanwhile: dropped from the buffer");
                    continue;
                }
                Some(_) => {}
                // Written before the buffer's entry, so not expected; the
                // queue's signals need theirs (the open built its index).
                None => batch.insert(key, codec::encode_record(&SignalRecord::accepted(&signal))),
            }
            *seq += 1;
            deliveries.push(Delivery {
                seq: *seq,
                signal: Arc::new(signal),
                redelivered: false,
            });
        }
        if let Some(first) = deliveries.first() {
            batch.insert(seq_key(b'q', first.seq), codec::encode_block(&deliveries));
            self.note_queue_seq(*seq);
        }
        self.atomic(batch)?;
        Ok(deliveries.len())
    }

    /// Moves a dead letter into the fallback buffer (which publishes it to the
    /// broker), atomically: the letter goes, the signal is `accepted` again.
    /// `None` if there is no such letter.
    pub fn replay_dead_letter_to_buffer(&self, tenant: &str, id: &str) -> Result<Option<Signal>> {
        let key = pair_key(b'd', tenant, id);
        let mut letters = self.letters.lock().expect("dead letter count");
        let Some(v) = self.db.get(&key)? else {
            return Ok(None);
        };
        let letter: DeadLetter = decode(&key, &v)?;
        let record = self.replayed_record(&letter)?;
        let mut cur = self.buffer.lock().expect("buffer cursor");
        let mut batch = redo::Ops::default();
        batch.remove(key);
        batch.insert(pair_key(b's', tenant, id), codec::encode_record(&record));
        batch.insert(seq_key(b'f', cur.next), encode(&letter.signal));
        self.atomic(batch)?;
        *letters = letters.saturating_sub(1);
        cur.next += 1;
        cur.count += 1;
        Ok(Some(letter.signal))
    }

    /// A customer's stored payment window (see `WriteSet::velocity`).
    pub fn velocity(&self, tenant: &str, sku: &str, customer: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .db
            .get(velocity_key(tenant, sku, customer))?
            .map(|v| v.to_vec()))
    }

    /// Deletes stored payment windows whose newest payment is `window_ms` or
    /// more before `now_ms`, looking at up to `limit` keys after `cursor`.
    /// Returns how many went and where to go on (`None`: the end was reached).
    /// A window rewritten meanwhile is kept (compare-and-swap).
    pub fn sweep_velocity(
        &self,
        cursor: Option<&[u8]>,
        limit: usize,
        now_ms: u64,
        window_ms: u64,
    ) -> Result<(usize, Option<Vec<u8>>)> {
        let start = match cursor {
            Some(c) => std::ops::Bound::Excluded(c.to_vec()),
            None => std::ops::Bound::Included(b"v/".to_vec()),
        };
        let end = std::ops::Bound::Excluded(b"v0".to_vec());
        let (mut removed, mut scanned) = (0, 0);
        let mut last = None;
        for kv in self.db.range::<Vec<u8>, _>((start, end)).take(limit) {
            let (k, v) = kv?;
            scanned += 1;
            let newest = serde_json::from_slice::<Vec<u64>>(&v)
                .ok()
                .and_then(|t| t.last().copied())
                .unwrap_or(0);
            if now_ms.saturating_sub(newest) >= window_ms
                && self
                    .db
                    .compare_and_swap(&k, Some(&v), None as Option<&[u8]>)?
                    .is_ok()
            {
                removed += 1;
            }
            last = Some(k.to_vec());
        }
        Ok((removed, if scanned == limit { last } else { None }))
    }

    // ---- node records -------------------------------------------------------

    /// Writes a small node-level record under `m/{name}` (circuit breakers).
    /// Durable with the next group flush.
    pub fn put_meta(&self, name: &str, value: &[u8]) -> Result<()> {
        self.db.insert(meta::key(name), value)?;
        Ok(())
    }

    /// The node-level record `m/{name}`, if there is one.
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(meta::key(name))?.map(|v| v.to_vec()))
    }

    /// Every node-level record whose name starts with `prefix`: (name, bytes).
    pub fn metas(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.db
            .scan_prefix(meta::key(prefix))
            .map(|kv| {
                let (k, v) = kv?;
                Ok((String::from_utf8_lossy(&k[2..]).into_owned(), v.to_vec()))
            })
            .collect()
    }

    // ---- engines ------------------------------------------------------------

    /// An engine's latest checkpoint: deferred (in memory, see the `w/` records) or on disk.
    pub fn checkpoint(&self, tenant: &str, sku: &str) -> Result<Option<Vec<u8>>> {
        let key = pair_key(b'e', tenant, sku);
        if let Some(v) = self.deferred.lock().expect("deferred writes").get(&key) {
            return Ok(Some(v.to_vec()));
        }
        Ok(self.db.get(key)?.map(|v| v.to_vec()))
    }

    /// Checkpoints by tenant then SKU, after the engine `after` names
    /// (tenant, sku), at most `limit`: a page of them, so a node of many
    /// engines is listed without holding them all (`None` and `usize::MAX`:
    /// every one), the deferred ones included.
    pub fn checkpoints_after(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<(String, String, Vec<u8>)>> {
        use std::ops::Bound;
        // `\0` parts the tenant from the SKU, so key order is (tenant, sku) order.
        let after = after.map_or_else(|| b"e/".to_vec(), |(t, s)| pair_key(b'e', t, s));
        let latest = self
            .deferred
            .lock()
            .expect("deferred writes")
            .checkpoints(&after, limit);
        let mut all: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let stored = self
            .db
            .range::<Vec<u8>, _>((Bound::Excluded(after), Bound::Unbounded))
            .take_while(|kv| kv.as_ref().map_or(true, |(k, _)| k.starts_with(b"e/")))
            .take(limit);
        for kv in stored {
            let (k, v) = kv?;
            all.insert(k.to_vec(), v.to_vec());
        }
        // A deferred value is newer than the stored one; past the first
        // `limit` of the two together, neither can be on this page.
        all.extend(latest);
        let mut out = Vec::new();
        for (k, v) in all.into_iter().take(limit) {
            let Some((tenant, sku)) = split_pair_key(&k) else {
                continue;
            };
            out.push((
                String::from_utf8_lossy(tenant).into_owned(),
                String::from_utf8_lossy(sku).into_owned(),
                v,
            ));
        }
        Ok(out)
    }

    // ---- the ledger ---------------------------------------------------------

    /// Writes sealed receipts, the new signed head and a decision's writes
    /// atomically. Call [`Store::durable`] before relying on it.
    ///
    /// The receipt block goes first, as one insert of its own; the head
    /// (which must cover the receipts) and the other writes follow as one
    /// redo record. The head is what commits the block: a block past the
    /// stored head (its write set never landed) is dropped at open and by
    /// [`Store::drop_uncommitted_receipts`]. So the redo record does not
    /// carry a second copy of the receipts, the largest part of a batch.
    pub fn commit(
        &self,
        receipts: &[Receipt],
        head: Option<&SignedHead>,
        writes: &WriteSet,
    ) -> Result<()> {
        self.noting(self.commit_writes(receipts, head, writes))
    }

    fn commit_writes(
        &self,
        receipts: &[Receipt],
        head: Option<&SignedHead>,
        writes: &WriteSet,
    ) -> Result<()> {
        if let Some(last) = receipts.last() {
            debug_assert!(
                head.is_some_and(|h| h.seq >= last.seq),
                "a head covers the receipts"
            );
            self.db
                .insert(seq_key(b'r', last.seq), receipts::encode(receipts))?;
        }
        let mut batch = redo::Ops::default();
        for rec in &writes.signal_records {
            batch.insert(
                pair_key(b's', &rec.tenant_id, &rec.signal_id),
                codec::encode_record(rec),
            );
        }
        for (t, s, bytes) in &writes.checkpoints {
            batch.insert(pair_key(b'e', t, s), bytes.as_slice());
        }
        for (t, s, customer, bytes) in &writes.velocity {
            batch.insert(velocity_key(t, s, customer), bytes.as_slice());
        }
        // Held to the end when there are letters (see `Store::letters`);
        // most commits have none and never take it.
        let mut letters = (!writes.dead_letters.is_empty())
            .then(|| self.letters.lock().expect("dead letter count"));
        let mut new_letters = 0;
        for d in &writes.dead_letters {
            new_letters += self.put_letter(&mut batch, d)?;
        }
        // The head goes last: once it is on disk, so is the rest of the set
        // (sled recovers its log as a prefix), which is how the store's open
        // tells a kept record from one a crash interrupted.
        if let Some(h) = head {
            batch.insert(HEAD, encode(h));
        }
        let defers = !(writes.checkpoints.is_empty() && writes.signal_records.is_empty());
        if !defers || receipts.is_empty() || head.is_none() {
            // Nothing to defer, or no new head to mark the record applied:
            // written whole (and settled, so that no deferred write goes
            // over it at the next open).
            self.atomic(batch)?;
        } else {
            let mut deferred = self.deferred.lock().expect("deferred writes");
            let id = self.redo_id_for(&batch);
            if let Err(e) = redo::apply_retaining(&self.db, id, &batch, DEFERRED) {
                // Not applied: its record must not give its checkpoints
                // again at the next open (the ledger restarts either way).
                if let Err(forget) = redo::forget(&self.db, id) {
                    tracing::error!(redo_id = id, error = %forget, "could not drop the redo record of a failed commit");
                }
                return Err(e);
            }
            deferred.retained.push(id);
            for (k, v) in batch.into_puts_under(DEFERRED) {
                deferred.latest.insert(k.into(), v);
            }
            // The batch is committed: a write-out that fails now is
            // logged, not reported as the commit's failure, and goes on
            // with the next commit (what it has not written stays deferred).
            if let Err(e) = self.write_out_slice(&mut deferred) {
                tracing::warn!(
                    error = %e,
                    "could not write out deferred writes; the next commit tries again"
                );
            }
            drop(deferred);
        }
        self.forget_queued(
            writes
                .signal_records
                .iter()
                .map(|r| (r.tenant_id.as_str(), r.signal_id.as_str())),
        );
        if let Some(count) = letters.as_mut() {
            **count += new_letters;
        }
        Ok(())
    }

    /// Drops the receipt block written ahead of a batch whose head and
    /// writes never landed (a crash or a failed write in between): nothing
    /// it records was decided. The ledger writes one batch at a time, so
    /// only one block can be left that way, and it chains onto the head
    /// (its first receipt follows the head's seq and hash). Anything else
    /// past the head is not a crash's leftover but damage: it is kept for
    /// verification to report. The ledger calls this before it numbers
    /// receipts again from the head. Returns how many blocks went (0 or 1).
    pub fn drop_uncommitted_receipts(&self) -> Result<usize> {
        let (head_seq, head_hash) = self
            .head()?
            .map_or((0, GENESIS_HASH.to_string()), |h| (h.seq, h.hash));
        let past: Vec<(sled::IVec, sled::IVec)> = self
            .db
            .range(seq_key(b'r', head_seq.saturating_add(1))..=seq_key(b'r', u64::MAX))
            .collect::<std::result::Result<_, _>>()?;
        let [(key, value)] = past.as_slice() else {
            if !past.is_empty() {
                tracing::warn!(
                    blocks = past.len(),
                    head_seq,
                    "receipt blocks past the signed head: kept (verification reports them)"
                );
            }
            return Ok(0);
        };
        let chains = receipts::decode_block(key, value).is_ok_and(|block| {
            block
                .first()
                .is_some_and(|r| r.seq == head_seq + 1 && r.prev_hash == head_hash)
        });
        if !chains {
            tracing::warn!(
                head_seq,
                "a receipt block past the signed head does not follow it: kept (verification reports it)"
            );
            return Ok(0);
        }
        self.db.remove(key)?;
        self.log.flush(&self.db)?;
        tracing::warn!(
            head_seq,
            last_seq = seq_of(key),
            "dropped the receipt block of a batch that never committed"
        );
        Ok(1)
    }

    pub fn head(&self) -> Result<Option<SignedHead>> {
        self.db.get(HEAD)?.map(|v| decode(HEAD, &v)).transpose()
    }

    /// Receipts after `after_seq`, in order, optionally of one tenant, at most `limit`.
    pub fn receipts(
        &self,
        after_seq: u64,
        limit: usize,
        tenant: Option<&str>,
    ) -> Result<Vec<Receipt>> {
        let mut out = Vec::new();
        for block in self.receipt_blocks(after_seq, tenant) {
            for r in block? {
                out.push(r);
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    /// Receipts after `after_seq` in seq order, a stored block at a time and
    /// lazily, so a ledger of millions is walked in constant memory. A block
    /// that does not decode is an error naming its key. With a `tenant`,
    /// each block holds only that tenant's receipts (perhaps none): a block
    /// whose table of texts does not name the tenant is passed over once
    /// that table is read, and in one that does the others' receipts are
    /// not unpacked. The ledger keeps no index by tenant (it would cost the
    /// signal path a write per tenant per batch), so this is still a walk
    /// of the whole range, but 10 to 20 times cheaper than unpacking every
    /// receipt (BENCHMARKS.md, session 55).
    pub fn receipt_blocks<'a>(
        &'a self,
        after_seq: u64,
        tenant: Option<&'a str>,
    ) -> impl Iterator<Item = Result<Vec<Receipt>>> + 'a {
        // A block is keyed by its last seq: the first block at or after
        // `after_seq + 1` holds the first receipt wanted.
        let start = seq_key(b'r', after_seq.saturating_add(1));
        self.db
            .range(start..seq_key(b'r', u64::MAX))
            .map(move |kv| {
                let (k, v) = kv?;
                let mut block = receipts::decode_block_of(&k, &v, tenant)?;
                block.retain(|r| r.seq > after_seq);
                Ok(block)
            })
    }

    /// Every receipt in seq order (the tests' small ledgers).
    #[cfg(test)]
    pub fn all_receipts(&self) -> Result<Vec<Receipt>> {
        let blocks = self.receipt_blocks(0, None).collect::<Result<Vec<_>>>()?;
        Ok(blocks.into_iter().flatten().collect())
    }
}

#[cfg(test)]
mod tests;
