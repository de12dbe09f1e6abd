//! What an operator does with a store that holds a damaged record: a
//! stopped node's store read through, every value by its kind
//! ([`check`]), and one damaged value moved out of the node's way
//! ([`set_aside`]), its bytes kept under `x/` and the original key.
//!
//! A value that does not read is [`StoreError::Corrupt`] naming its key,
//! and some are read when the store opens (queue blocks, redo records, the
//! signed head, the fallback buffer): a node with one of those damaged
//! does not start. The check opens sled alone, without the store's own
//! recovery (which reads those values), so it reads past any damage.
//! Keys are named as [`key_text`] prints them, which [`parse_key`] reads back.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use tai_core::receipt::SignedHead;
use tai_core::signal::{DeadLetter, Signal};

use crate::{codec, decode, meta, receipts, redo, Result, StoreError, HEAD};

/// What the store cannot read itself: engine checkpoints and payment
/// windows are the engines' own bytes.
pub struct Readers<'a> {
    /// Reads an engine checkpoint (`e/`).
    pub checkpoint: &'a dyn Fn(&[u8]) -> std::result::Result<(), String>,
    /// Reads a customer's payment window (`v/`).
    pub velocity: &'a dyn Fn(&[u8]) -> std::result::Result<(), String>,
    /// Reads a circuit breaker's saved state (`m/breaker/`).
    pub breaker: &'a dyn Fn(&[u8]) -> std::result::Result<(), String>,
}

/// A record that does not read.
#[derive(Debug, Clone, Serialize)]
pub struct Damaged {
    /// Its key, as [`key_text`] prints it.
    pub key: String,
    /// What kind of record its key says it is.
    pub kind: &'static str,
    /// Why it does not read.
    pub error: String,
    /// What setting it aside costs; `None` if it cannot be set aside.
    pub if_set_aside: Option<&'static str>,
}

/// What [`set_aside`] moved.
#[derive(Debug, Clone)]
pub struct Moved {
    /// The damaged record.
    pub record: Damaged,
    /// `accepted` signal records set aside with a queue block, their
    /// signal queued nowhere else ([`stranded_by`]), as [`key_text`]
    /// prints them.
    pub stranded: Vec<String>,
}

/// A record set aside earlier.
#[derive(Debug, Clone, Serialize)]
pub struct SetAside {
    /// The key it had, as [`key_text`] prints it.
    pub key: String,
    pub bytes: usize,
}

/// What [`check`] found.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Records by kind (every key, damaged or not).
    pub records: BTreeMap<&'static str, u64>,
    pub damaged: Vec<Damaged>,
    pub set_aside: Vec<SetAside>,
}

/// The kinds of record, by key prefix (or whole key), and what setting one
/// aside costs.
struct Kind {
    prefix: &'static [u8],
    /// The key is the prefix, not only starts with it.
    exact: bool,
    name: &'static str,
    /// `None`: never set aside.
    cost: Option<&'static str>,
}

const KINDS: &[Kind] = &[
    Kind {
        prefix: b"q/",
        exact: false,
        name: "queue block",
        cost: Some("its signals not yet decided are never decided: the node no longer knows them (GET /v1/signals/{id} answers 404) and their tenants may send them again"),
    },
    Kind {
        prefix: b"s/",
        exact: false,
        name: "signal record",
        cost: Some("the signal's status is forgotten (404) and its id may be accepted again: this was its duplicate check"),
    },
    Kind {
        prefix: b"e/",
        exact: false,
        name: "engine checkpoint",
        cost: Some("the engine starts afresh on its next signal, as a new tenant's would (boot, its quota from the config)"),
    },
    Kind {
        prefix: b"r/",
        exact: false,
        name: "receipt block",
        cost: Some("its receipts are gone from listings; verification already stops at this block and goes on reporting it"),
    },
    Kind {
        prefix: b"d/",
        exact: false,
        name: "dead letter",
        cost: Some("the letter leaves /admin/deadletter and cannot be replayed; its signal stays deadlettered"),
    },
    Kind {
        prefix: b"v/",
        exact: false,
        name: "payment window",
        cost: Some("the customer's recent payments are forgotten: the velocity rule counts from none"),
    },
    Kind {
        prefix: HEAD,
        exact: true,
        name: "signed ledger head",
        cost: None,
    },
    // The node's own records, each read leniently by its writer (logged,
    // and the node goes on as the cost says): set aside, only `check`
    // stops naming them.
    Kind {
        prefix: b"m/node_starts",
        exact: true,
        name: "start count",
        cost: Some("the count of the node's starts, which it only logs, begins again at 1 (as it does while this record does not read)"),
    },
    Kind {
        prefix: b"m/kanban_backend",
        exact: true,
        name: "queue backend record",
        cost: Some("the next start does not know which queue the data dir last ran on, so it cannot warn of signals a broker queue it left still holds (as while this record does not read)"),
    },
    Kind {
        prefix: b"m/amqp_seq_base",
        exact: true,
        name: "amqp seq base",
        cost: Some("the next amqp start numbers its deliveries from the clock alone (as while this record does not read): past every earlier start's unless the clock was set back since"),
    },
    Kind {
        prefix: b"m/kaizen_baseline",
        exact: true,
        name: "Kaizen baseline",
        cost: Some("GET /admin/kaizen compares with no baseline until one is saved again (as while this record does not read)"),
    },
    Kind {
        prefix: b"m/breaker/",
        exact: false,
        name: "circuit breaker",
        cost: Some("the breaker starts closed (as while this record does not read)"),
    },
    Kind {
        prefix: b"m/ledger_key/",
        exact: false,
        name: "signing key record",
        cost: Some("a node missing this key in its config no longer warns of it at start (verification still names it)"),
    },
    Kind {
        prefix: b"m/",
        exact: false,
        name: "node record",
        cost: Some("nothing: the node never reads a record of that name"),
    },
    Kind {
        prefix: b"w/",
        exact: false,
        name: "redo record",
        cost: Some("its atomic write set is not applied again at the next start: what of it reached its keys stays, the rest is lost (verify the ledger after)"),
    },
    Kind {
        prefix: b"f/",
        exact: false,
        name: "buffered signal",
        cost: Some("the signal is never published nor decided: the node no longer knows it and its tenant may send it again"),
    },
    Kind {
        prefix: b"x/",
        exact: false,
        name: "set aside",
        cost: None,
    },
];

/// A key the store never writes.
const UNKNOWN: Kind = Kind {
    prefix: b"",
    exact: false,
    name: "unknown key",
    cost: Some("nothing: the node never reads such a key"),
};

/// Why the signed head is never set aside.
const HEAD_KEPT: &str = "m/head is the ledger's signed head, which commits its receipts: without it a node would start the ledger over its own receipts; `tai store rebuild-head` writes a new one once every receipt verifies, or restore the data dir from a backup";

fn kind_of(key: &[u8]) -> &'static Kind {
    KINDS
        .iter()
        .find(|k| {
            if k.exact {
                key == k.prefix
            } else {
                key.starts_with(k.prefix)
            }
        })
        .unwrap_or(&UNKNOWN)
}

/// Prefixes whose keys are a u64 seq (big-endian) after the prefix.
const SEQ_KEYED: &[u8] = b"qrwf";

/// A key in words: a seq-keyed one (`q/`, `r/`, `w/`, `f/` and 8 bytes) as
/// its prefix and seq in decimal (`q/1024`), any other byte past such a
/// prefix as `\xNN`, a key set aside as `x/` and its own key's text
/// (`x/q/1024`), and every other key with its bytes outside printable
/// ASCII (the `\0` between a tenant and an id, say) escaped
/// (`s/acme\x00pay-1`). [`parse_key`] reads it back.
pub fn key_text(key: &[u8]) -> String {
    match key {
        [b'x', b'/', rest @ ..] => format!("x/{}", key_text(rest)),
        [p, b'/', rest @ ..] if SEQ_KEYED.contains(p) => match <[u8; 8]>::try_from(rest) {
            Ok(seq) => format!("{}/{}", *p as char, u64::from_be_bytes(seq)),
            Err(_) => {
                let mut s = format!("{}/", *p as char);
                for b in rest {
                    s.push_str(&format!("\\x{b:02x}"));
                }
                s
            }
        },
        _ => key.escape_ascii().to_string(),
    }
}

/// The key [`key_text`] printed as `text`, or why it is not one.
pub fn parse_key(text: &str) -> std::result::Result<Vec<u8>, String> {
    if let Some(rest) = text.strip_prefix("x/") {
        let mut key = b"x/".to_vec();
        key.extend(parse_key(rest)?);
        return Ok(key);
    }
    let b = text.as_bytes();
    if let [p, b'/', rest @ ..] = b {
        if SEQ_KEYED.contains(p) && !rest.is_empty() && rest.iter().all(u8::is_ascii_digit) {
            let seq: u64 = text[2..]
                .parse()
                .map_err(|_| format!("{text}: the seq is past the largest u64"))?;
            return Ok(crate::seq_key(*p, seq));
        }
    }
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let (byte, len) = match b.get(i + 1) {
            Some(b'x') => {
                let hex = text
                    .get(i + 2..i + 4)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("{text}: `\\x` at byte {i} needs two hex digits"))?;
                (hex, 4)
            }
            Some(b'0') => (0, 2),
            Some(b'n') => (b'\n', 2),
            Some(b'r') => (b'\r', 2),
            Some(b't') => (b'\t', 2),
            Some(&c @ (b'\\' | b'\'' | b'"')) => (c, 2),
            _ => return Err(format!("{text}: an unknown escape at byte {i}")),
        };
        out.push(byte);
        i += len;
    }
    Ok(out)
}

/// Why the value under `key` does not read, if it does not.
fn fault(key: &[u8], value: &[u8], readers: &Readers<'_>) -> Option<String> {
    let corrupt = |e: StoreError| match e {
        StoreError::Corrupt { message, .. } => message,
        other => other.to_string(),
    };
    let seq_shaped = |what: &str| {
        (key.len() != 10)
            .then(|| format!("a {what} under a key that is not its prefix and an 8-byte seq"))
    };
    let json = |r: Result<()>| r.err().map(corrupt);
    match kind_of(key).prefix {
        b"q/" => {
            seq_shaped("queue block").or_else(|| codec::decode_block(key, value).err().map(corrupt))
        }
        b"s/" => codec::decode_record(key, value).err().map(corrupt),
        b"e/" => (readers.checkpoint)(value).err(),
        b"r/" => seq_shaped("receipt block")
            .or_else(|| receipts::decode_block(key, value).err().map(corrupt)),
        b"d/" => json(decode::<DeadLetter>(key, value).map(drop)),
        b"v/" => (readers.velocity)(value).err(),
        b"m/head" => json(decode::<SignedHead>(key, value).map(drop)),
        b"m/node_starts" => meta::read_u64(value).err(),
        b"m/kanban_backend" => meta::read_backend(value).err(),
        b"m/amqp_seq_base" => meta::SeqBase::decode(value).err(),
        b"m/kaizen_baseline" => json(decode::<serde_json::Value>(key, value).map(drop)),
        b"m/breaker/" => (readers.breaker)(value).err(),
        // Its name is what it says; it has no value.
        b"m/ledger_key/" => None,
        b"m/" => Some("a node record of no name the node writes".into()),
        b"w/" => seq_shaped("redo record").or_else(|| match redo::Ops::decode(value) {
            None => Some("undecodable redo record".into()),
            // Its puts are written at the next start: each must read too.
            Some(ops) => ops.puts().find_map(|(k, v)| {
                if matches!(kind_of(k).prefix, b"w/" | b"x/" | b"m/" | b"") {
                    return None;
                }
                fault(k, v, readers).map(|e| format!("its put to {}: {e}", key_text(k)))
            }),
        }),
        b"f/" => {
            seq_shaped("buffered signal").or_else(|| json(decode::<Signal>(key, value).map(drop)))
        }
        // Set-aside records are kept as they were.
        b"x/" => None,
        _ => Some("a key of no kind the store writes".into()),
    }
}

/// Opens a stopped node's store in `dir` as sled alone: no recovery runs
/// and nothing is written.
pub(crate) fn open(dir: &Path) -> Result<sled::Db> {
    crate::existing(dir)?;
    crate::open_db(dir, crate::DEFAULT_CACHE_BYTES)
}

/// Reads every record of the store in `dir` (its node stopped: sled locks
/// the directory), each by its kind, and reports those that do not read
/// and those set aside before.
pub fn check(dir: &Path, readers: &Readers<'_>) -> Result<Report> {
    let db = open(dir)?;
    let mut report = Report::default();
    for kv in db.iter() {
        let (k, v) = kv?;
        let kind = kind_of(&k);
        *report.records.entry(kind.name).or_default() += 1;
        if kind.prefix == b"x/" {
            report.set_aside.push(SetAside {
                key: key_text(&k[2..]),
                bytes: v.len(),
            });
        } else if let Some(error) = fault(&k, &v, readers) {
            report.damaged.push(Damaged {
                key: key_text(&k),
                kind: kind.name,
                error,
                if_set_aside: kind.cost,
            });
        }
    }
    Ok(report)
}

/// Moves the damaged record under `key` (as [`key_text`] prints it) out of
/// the node's way, atomically: its bytes go under `x/` and the original
/// key, durably. Only a record that does not read is moved, and never the
/// signed head; the node must be stopped.
pub fn set_aside(dir: &Path, key: &str, readers: &Readers<'_>) -> Result<Moved> {
    let raw = parse_key(key).map_err(StoreError::Refused)?;
    let db = open(dir)?;
    let value = db
        .get(&raw)?
        .ok_or_else(|| StoreError::Refused(format!("no record at {key} in {}", dir.display())))?;
    let kind = kind_of(&raw);
    if kind.prefix == b"x/" {
        return Err(StoreError::Refused(format!(
            "{key} is a record set aside already"
        )));
    }
    let Some(error) = fault(&raw, &value, readers) else {
        return Err(StoreError::Refused(format!(
            "the {} at {key} reads correctly: only a damaged record is set aside",
            kind.name
        )));
    };
    let Some(cost) = kind.cost else {
        return Err(StoreError::Refused(format!(
            "{key} does not read ({error}), but is not set aside: {HEAD_KEPT}"
        )));
    };
    let stranded = if kind.prefix == b"q/" {
        stranded_by(&db, &raw)?
    } else {
        Vec::new()
    };
    transact(&db, |t| {
        for k in std::iter::once(&raw).chain(&stranded) {
            if let Some(v) = t.get(k.as_slice())? {
                t.insert(aside(k), v)?;
                t.remove(k.as_slice())?;
            }
        }
        Ok(())
    })?;
    Ok(Moved {
        record: Damaged {
            key: key.to_string(),
            kind: kind.name,
            error,
            if_set_aside: Some(cost),
        },
        stranded: stranded.iter().map(|k| key_text(k)).collect(),
    })
}

/// The `accepted` signal records that setting the queue block `block`
/// aside strands. On a data dir last run on the embedded queue, a signal's
/// record is on disk as `accepted` only while the signal waits in a queue
/// block (a dead letter replayed, in a block of its own, or a signal the
/// amqp backend took and a switch moved into the queue) or in the fallback
/// buffer; one in neither once `block` is gone was in it. Its signal is in
/// no queue then, and its record would answer every post of it as a
/// duplicate, so it is set aside with the block: the signal is unknown,
/// as the block's other undecided signals are. None when another queue
/// block or a buffered signal does not read (what it holds is unknown:
/// set it aside too, and the records go with it), or the data dir last ran
/// on a broker, whose queue holds the signals of its `accepted` records.
fn stranded_by(db: &sled::Db, block: &[u8]) -> Result<Vec<Vec<u8>>> {
    match db.get(meta::key(meta::KANBAN_BACKEND))? {
        None => {}
        Some(v) if meta::read_backend(&v) == Ok("embedded") => {}
        Some(_) => return Ok(Vec::new()),
    }
    let mut queued = std::collections::HashSet::new();
    for kv in db.scan_prefix(b"q/") {
        let (k, v) = kv?;
        if *k == *block {
            continue;
        }
        let Ok(deliveries) = codec::decode_block(&k, &v) else {
            return Ok(Vec::new());
        };
        for d in deliveries {
            queued.insert(crate::pair_key(b's', &d.signal.tenant_id, &d.signal.id));
        }
    }
    for kv in db.scan_prefix(b"f/") {
        let (k, v) = kv?;
        let Ok(signal) = decode::<Signal>(&k, &v) else {
            return Ok(Vec::new());
        };
        queued.insert(crate::pair_key(b's', &signal.tenant_id, &signal.id));
    }
    let mut stranded = Vec::new();
    for kv in db.scan_prefix(b"s/") {
        let (k, v) = kv?;
        let accepted = codec::decode_record(&k, &v)
            .is_ok_and(|r| r.status == tai_core::signal::SignalStatus::Accepted);
        if accepted && !queued.contains(k.as_ref()) {
            stranded.push(k.to_vec());
        }
    }
    Ok(stranded)
}

/// Where a record set aside is kept: `x/` and its key.
pub(crate) fn aside(key: &[u8]) -> Vec<u8> {
    let mut x = b"x/".to_vec();
    x.extend_from_slice(key);
    x
}

/// Runs `f` as one sled transaction on a stopped node's store, then makes
/// it durable (offline, a synchronous flush costs nothing).
pub(crate) fn transact(
    db: &sled::Db,
    f: impl Fn(
        &sled::transaction::TransactionalTree,
    ) -> std::result::Result<(), sled::transaction::UnabortableTransactionError>,
) -> Result<()> {
    db.transaction(|t| {
        f(t)?;
        Ok::<_, sled::transaction::ConflictableTransactionError<std::convert::Infallible>>(())
    })
    .map_err(|e| match e {
        sled::transaction::TransactionError::Storage(e) => StoreError::Io(e),
        sled::transaction::TransactionError::Abort(never) => match never {},
    })?;
    db.flush()?;
    Ok(())
}

/// For tests: writes `bytes` over the value of the first key under
/// `prefix` in the stopped node's store in `dir` (damage no sled checksum
/// sees: a bug, a hand edit), and returns that key as [`key_text`] prints
/// it; `None` if no key is there.
#[cfg(any(test, feature = "test-support"))]
pub fn overwrite_first(dir: &Path, prefix: &str, bytes: &[u8]) -> Result<Option<String>> {
    let db = open(dir)?;
    let Some(key) = db
        .scan_prefix(prefix.as_bytes())
        .keys()
        .next()
        .transpose()?
    else {
        return Ok(None);
    };
    db.insert(&key, bytes)?;
    db.flush()?;
    Ok(Some(key_text(&key)))
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;
    use tai_core::signal::SignalStatus;

    use super::*;
    use crate::tests::{decide_one_of_two, letter, reopen};
    use crate::Store;

    proptest! {
        #[test]
        fn any_key_reads_back_from_its_text(
            key in prop::collection::vec(any::<u8>(), 0..24),
            seq in any::<u64>(),
            prefix in prop::sample::select(b"qrwfsedvmx".to_vec()),
        ) {
            prop_assert_eq!(parse_key(&key_text(&key)).unwrap(), key.clone());
            let seq_key = crate::seq_key(prefix, seq);
            prop_assert_eq!(parse_key(&key_text(&seq_key)).unwrap(), seq_key);
            let mut other = vec![prefix, b'/'];
            other.extend_from_slice(&key);
            prop_assert_eq!(parse_key(&key_text(&other)).unwrap(), other);
        }
    }

    #[test]
    fn keys_are_printed_as_an_operator_types_them() {
        assert_eq!(key_text(&crate::seq_key(b'q', 1024)), "q/1024");
        assert_eq!(key_text(b"s/acme\0pay-1"), "s/acme\\x00pay-1");
        assert_eq!(key_text(b"q/12"), "q/\\x31\\x32", "not a seq key");
        assert_eq!(parse_key("s/acme\\0pay-1").unwrap(), b"s/acme\0pay-1");
        let err = parse_key("q/99999999999999999999").unwrap_err();
        assert!(err.contains("past the largest u64"), "{err}");
        let err = parse_key("s/a\\x4").unwrap_err();
        assert!(err.contains("needs two hex digits"), "{err}");
        let err = parse_key("s/a\\q").unwrap_err();
        assert!(err.contains("unknown escape at byte 3"), "{err}");
    }

    pub(crate) fn readers() -> Readers<'static> {
        Readers {
            checkpoint: &|b| {
                serde_json::from_slice::<serde_json::Value>(b)
                    .map(drop)
                    .map_err(|e| e.to_string())
            },
            velocity: &|b| {
                serde_json::from_slice::<Vec<u64>>(b)
                    .map(drop)
                    .map_err(|e| e.to_string())
            },
            breaker: &|b| {
                serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(b)
                    .map(drop)
                    .map_err(|e| e.to_string())
            },
        }
    }

    /// `f` on a store just closed in this process: sled lets go of the
    /// directory's lock shortly after its last handle is dropped.
    pub(crate) fn closed<T>(f: impl Fn() -> Result<T>) -> Result<T> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match f() {
                Err(StoreError::InUse { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                r => return r,
            }
        }
    }

    pub(crate) fn put_raw(dir: &Path, key: &[u8], value: &[u8]) {
        let db = closed(|| open(dir)).unwrap();
        db.insert(key, value).unwrap();
        db.flush().unwrap();
    }

    fn damaged(dir: &Path) -> Vec<(String, &'static str)> {
        closed(|| check(dir, &readers()))
            .unwrap()
            .damaged
            .into_iter()
            .map(|d| (d.key, d.kind))
            .collect()
    }

    fn refused(dir: &Path, key: &str) -> String {
        match closed(|| set_aside(dir, key, &readers())) {
            Err(StoreError::Refused(why)) => why,
            other => panic!("{key}: {other:?}"),
        }
    }

    /// A store with a record of every kind: a queue block (seqs 7 and 8,
    /// 7 decided), two receipts and their head, a signal record, a
    /// checkpoint, a payment window and a dead letter.
    async fn a_store_of_every_kind(dir: &Path) {
        let s = Store::open(dir).unwrap();
        decide_one_of_two(&s);
        s.dead_letter_queued(&letter("globex", "g", "halted", 3))
            .unwrap();
        s.durable().await.unwrap();
        // Written out of the redo records into their own keys.
        s.flush().unwrap();
    }

    #[tokio::test]
    async fn a_damaged_record_is_named_set_aside_and_the_store_opens_again() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        a_store_of_every_kind(dir).await;
        let report = closed(|| check(dir, &readers())).unwrap();
        assert!(report.damaged.is_empty(), "{report:?}");
        for kind in [
            "queue block",
            "receipt block",
            "signed ledger head",
            "signal record",
            "engine checkpoint",
            "payment window",
            "dead letter",
        ] {
            assert!(
                report.records.get(kind).is_some_and(|n| *n >= 1),
                "{kind}: {report:?}"
            );
        }

        // A damaged queue block: the node's store no longer opens, and says where.
        put_raw(dir, &crate::seq_key(b'q', 7), b"\x01\xff\xff");
        match closed(|| Store::open(dir)) {
            Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, "q/7"),
            other => panic!("{other:?}"),
        }
        assert_eq!(damaged(dir), [("q/7".to_string(), "queue block")]);

        // Only a damaged record, and one that is there, is set aside.
        assert!(refused(dir, "m/head").contains("reads correctly"));
        assert!(refused(dir, "q/8").contains("no record at q/8"));
        assert!(refused(dir, "q/x\\").contains("unknown escape"));

        let moved = closed(|| set_aside(dir, "q/7", &readers())).unwrap();
        assert!(moved.stranded.is_empty(), "{moved:?}");
        let moved = moved.record;
        assert_eq!((moved.key.as_str(), moved.kind), ("q/7", "queue block"));
        assert!(moved.if_set_aside.unwrap().contains("never decided"));
        assert!(
            refused(dir, "q/7").contains("no record at q/7"),
            "moved once"
        );

        // The store opens; seq 8, in the block set aside, is no longer known.
        {
            let s = reopen(dir);
            assert!(s.pending().unwrap().is_empty());
            assert!(s.signal_record("acme", "b").unwrap().is_none());
            let a = s.signal_record("acme", "a").unwrap().unwrap();
            assert_eq!(a.status, SignalStatus::Completed, "the rest is as it was");
            assert_eq!(s.head().unwrap().unwrap().seq, 2);
        }
        let report = closed(|| check(dir, &readers())).unwrap();
        assert!(report.damaged.is_empty(), "{report:?}");
        let aside: Vec<_> = report
            .set_aside
            .iter()
            .map(|a| (a.key.as_str(), a.bytes))
            .collect();
        assert_eq!(aside, [("q/7", 3)], "its bytes are kept");
        assert!(refused(dir, "x/q/7").contains("set aside already"));
    }

    /// A dead letter replayed into a queue block of its own keeps an
    /// `accepted` record on disk; setting that block aside takes the
    /// record too (else every post of the signal would be a duplicate of
    /// one no queue holds), but not on a data dir last run on a broker.
    #[tokio::test]
    async fn a_replayed_dead_letter_goes_with_its_queue_block() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        a_store_of_every_kind(dir).await;
        let seq = {
            let s = reopen(dir);
            let seq = s.next_queue_seq().unwrap();
            s.replay_dead_letter("globex", "g", seq)
                .unwrap()
                .expect("the letter");
            s.flush().unwrap();
            seq
        };
        let replayed = crate::seq_key(b'q', seq);
        let accepted = |dir: &Path| {
            let s = reopen(dir);
            s.signal_record("globex", "g").unwrap().map(|r| r.status)
        };
        assert_eq!(accepted(dir), Some(SignalStatus::Accepted));

        // Last run on a broker: the record is the broker queue's, kept.
        put_raw(dir, b"m/kanban_backend", b"amqp:tai.signals");
        put_raw(dir, &replayed, b"\x01\xff\xff");
        let moved = closed(|| set_aside(dir, &key_text(&replayed), &readers())).unwrap();
        assert!(moved.stranded.is_empty(), "{moved:?}");
        assert_eq!(accepted(dir), Some(SignalStatus::Accepted));

        // On the embedded queue, the next block set aside takes it: its
        // signal is in no queue block left.
        put_raw(dir, b"m/kanban_backend", b"embedded");
        put_raw(dir, &crate::seq_key(b'q', 7), b"\x01\xff\xff");
        let moved = closed(|| set_aside(dir, "q/7", &readers())).unwrap();
        assert_eq!(moved.stranded, ["s/globex\\x00g"]);
        assert_eq!(accepted(dir), None, "the signal may be sent again");
        let report = closed(|| check(dir, &readers())).unwrap();
        let aside: Vec<_> = report.set_aside.iter().map(|a| a.key.as_str()).collect();
        assert!(aside.contains(&"s/globex\\x00g"), "{aside:?}");
    }

    #[tokio::test]
    async fn every_kind_of_damage_is_named_and_the_head_is_never_set_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        a_store_of_every_kind(dir).await;
        put_raw(dir, b"m/head", b"{\"seq\":");
        put_raw(dir, b"e/acme\0payments", b"not json");
        put_raw(dir, b"v/acme\0payments\0c1", b"[\"x\"]");
        put_raw(dir, b"d/globex\0g", b"{}");
        put_raw(dir, &crate::seq_key(b'r', 2), b"\x02\x00");
        put_raw(dir, &crate::seq_key(b'f', 1), b"[]");
        put_raw(dir, b"zz", b"");
        // The node's own records: read leniently by the node, named here.
        put_raw(dir, b"m/amqp_seq_base", b"abc");
        put_raw(dir, b"m/node_starts", b"\x01");
        put_raw(dir, b"m/kanban_backend", b"sled");
        put_raw(dir, b"m/kaizen_baseline", b"{");
        put_raw(dir, b"m/breaker/hook", b"[]");
        put_raw(dir, b"m/ledger_key/k1", b"");
        put_raw(dir, b"m/what", b"1");
        // A redo record that would write a damaged signal record at the next start.
        let mut ops = redo::Ops::default();
        ops.insert(b"s/acme\0z".to_vec(), b"\x02\x01".to_vec());
        put_raw(dir, &redo::key(9), &ops.encode());
        put_raw(dir, &redo::key(10), b"\xff");
        let found = damaged(dir);
        let expected = [
            ("d/globex\\x00g", "dead letter"),
            ("e/acme\\x00payments", "engine checkpoint"),
            ("f/1", "buffered signal"),
            ("m/amqp_seq_base", "amqp seq base"),
            ("m/breaker/hook", "circuit breaker"),
            ("m/head", "signed ledger head"),
            ("m/kaizen_baseline", "Kaizen baseline"),
            ("m/kanban_backend", "queue backend record"),
            ("m/node_starts", "start count"),
            ("m/what", "node record"),
            ("r/2", "receipt block"),
            ("v/acme\\x00payments\\x00c1", "payment window"),
            ("w/9", "redo record"),
            ("w/10", "redo record"),
            ("zz", "unknown key"),
        ];
        assert_eq!(found, expected.map(|(k, kind)| (k.to_string(), kind)));
        let report = closed(|| check(dir, &readers())).unwrap();
        let w9 = report.damaged.iter().find(|d| d.key == "w/9").unwrap();
        assert!(
            w9.error.starts_with("its put to s/acme\\x00z: "),
            "{}",
            w9.error
        );

        let seq_base = report
            .damaged
            .iter()
            .find(|d| d.key == "m/amqp_seq_base")
            .unwrap();
        assert!(seq_base.error.contains("3 bytes"), "{}", seq_base.error);
        assert!(seq_base.if_set_aside.unwrap().contains("from the clock"));
        assert_eq!(report.records["signing key record"], 1, "{report:?}");

        let why = refused(dir, "m/head");
        assert!(
            why.contains("does not read") && why.contains("restore the data dir from a backup"),
            "{why}"
        );
        for (key, _) in expected.iter().filter(|(k, _)| *k != "m/head") {
            closed(|| set_aside(dir, key, &readers())).unwrap();
        }
        assert_eq!(damaged(dir), [("m/head".to_string(), "signed ledger head")]);
        assert_eq!(
            closed(|| check(dir, &readers())).unwrap().set_aside.len(),
            expected.len() - 1
        );
    }
}
