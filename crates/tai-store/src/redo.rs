//! Atomic multi-key writes without `sled::Batch` (whose `apply_batch` rolls
//! sled's I/O buffer with a synchronous disk write every time).
//!
//! A write set is inserted as one value under `w/{id}` (a single insert is
//! atomic), applied key by key, and removed. sled recovers its log as a
//! prefix, so after a crash either the record is gone (fully applied, or
//! never written) or it is there and is applied again at open: puts and
//! deletes of fixed values are idempotent, and writes to the same keys made
//! after it are later in the log, so they cannot have survived without its
//! removal.

use crate::Result;

/// Puts (`Some`) and deletes (`None`), applied in order.
#[derive(Default, Debug)]
pub(crate) struct Ops(Vec<(Vec<u8>, Option<Vec<u8>>)>);

impl Ops {
    /// Takes the key and value as they are: an owned `Vec` (what the
    /// encoders return) is moved in, not copied.
    pub(crate) fn insert(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.0.push((key.into(), Some(value.into())));
    }
    /// The keys this set puts a value under.
    pub(crate) fn inserted_keys(&self) -> impl Iterator<Item = &[u8]> {
        self.0
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(k, _)| k.as_slice())
    }
    /// Every key this set writes (puts and deletes).
    pub(crate) fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.0.iter().map(|(k, _)| k.as_slice())
    }
    pub(crate) fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.0.push((key.as_ref().to_vec(), None));
    }

    /// The puts under any of `prefixes`, taken out of the set.
    pub(crate) fn into_puts_under<'a>(
        self,
        prefixes: &'a [&'a [u8]],
    ) -> impl Iterator<Item = (Vec<u8>, Vec<u8>)> + 'a {
        self.0.into_iter().filter_map(move |(k, v)| {
            let v = v?;
            under(&k, prefixes).then_some((k, v))
        })
    }

    /// The puts of this set, in order.
    pub(crate) fn puts(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.0
            .iter()
            .filter_map(|(k, v)| Some((k.as_slice(), v.as_deref()?)))
    }

    /// The value of this set's last write, if that write puts it under `key`.
    pub(crate) fn last_put(&self, key: &[u8]) -> Option<&[u8]> {
        match self.0.last() {
            Some((k, Some(v))) if k == key => Some(v),
            _ => None,
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        // Its exact size: a commit's record holds every value it writes.
        let size = self
            .0
            .iter()
            .map(|(k, v)| 4 + k.len() + 1 + v.as_ref().map_or(0, |v| 4 + v.len()))
            .sum();
        let mut out = Vec::with_capacity(size);
        for (k, v) in &self.0 {
            out.extend_from_slice(&(k.len() as u32).to_be_bytes());
            out.extend_from_slice(k);
            match v {
                Some(v) => {
                    out.push(1);
                    out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                    out.extend_from_slice(v);
                }
                None => out.push(0),
            }
        }
        out
    }

    pub(crate) fn decode(mut b: &[u8]) -> Option<Ops> {
        let mut ops = Vec::new();
        let take = |b: &mut &[u8], n: usize| -> Option<Vec<u8>> {
            let (head, rest) = (b.get(..n)?, b.get(n..)?);
            *b = rest;
            Some(head.to_vec())
        };
        while !b.is_empty() {
            let klen = u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?) as usize;
            let k = take(&mut b, klen)?;
            let v = match take(&mut b, 1)?[0] {
                1 => {
                    let vlen = u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?) as usize;
                    Some(take(&mut b, vlen)?)
                }
                _ => None,
            };
            ops.push((k, v));
        }
        Some(Ops(ops))
    }
}

/// Whether `key` starts with one of `prefixes`.
pub(crate) fn under(key: &[u8], prefixes: &[&[u8]]) -> bool {
    prefixes.iter().any(|p| key.starts_with(p))
}

pub(crate) fn key(id: u64) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[..2].copy_from_slice(b"w/");
    k[2..].copy_from_slice(&id.to_be_bytes());
    k
}

fn apply_ops(db: &sled::Db, ops: &Ops) -> Result<()> {
    apply_some(db, ops, |_| true)
}

/// Applies the writes of `ops` whose key `keep` accepts, in order.
fn apply_some(db: &sled::Db, ops: &Ops, keep: impl Fn(&[u8]) -> bool) -> Result<()> {
    for (k, v) in ops.0.iter().filter(|(k, _)| keep(k)) {
        match v {
            Some(v) => {
                db.insert(k, v.as_slice())?;
            }
            None => {
                db.remove(k)?;
            }
        }
    }
    Ok(())
}

pub(crate) fn apply(db: &sled::Db, id: u64, ops: Ops) -> Result<()> {
    if ops.0.len() == 1 {
        // One write is atomic by itself.
        return apply_ops(db, &ops);
    }
    let k = key(id);
    db.insert(k, ops.encode())?;
    apply_ops(db, &ops)?;
    db.remove(k)?;
    Ok(())
}

/// Writes `ops` as redo record `id` and applies all of it but the puts
/// under the `deferred` prefixes, and keeps the record: those puts are
/// durable in it, and whoever deferred them writes them to their keys
/// later, then [`forget`]s the record. Until then, [`recover`] applies them
/// again at open.
pub(crate) fn apply_retaining(db: &sled::Db, id: u64, ops: &Ops, deferred: &[&[u8]]) -> Result<()> {
    db.insert(key(id), ops.encode())?;
    apply_some(db, ops, |k| !under(k, deferred))
}

/// Drops redo record `id`, kept by [`apply_retaining`].
pub(crate) fn forget(db: &sled::Db, id: u64) -> Result<()> {
    db.remove(key(id))?;
    Ok(())
}

/// Applies the redo records left in `db` in order, then drops them; returns
/// the next redo id. A record that `applied` says was applied, except for
/// the puts under the `deferred` prefixes (one [`apply_retaining`] kept), gets only those
/// again: its other writes may have been overwritten since, and applying
/// them again would undo that. Any other record is one a crash interrupted,
/// applied whole.
pub(crate) fn recover(
    db: &sled::Db,
    deferred: &[&[u8]],
    applied: impl Fn(&Ops) -> bool,
) -> Result<u64> {
    let mut next = 0;
    let mut retained = 0usize;
    let pending: Vec<_> = db
        .scan_prefix(b"w/")
        .collect::<std::result::Result<_, _>>()?;
    for (k, v) in pending {
        let corrupt = |message: &str| crate::StoreError::Corrupt {
            key: crate::check::key_text(&k),
            message: message.into(),
        };
        // The store writes these keys itself, `w/` and 8 bytes of id.
        let id = <[u8; 8]>::try_from(&k[2..])
            .map(u64::from_be_bytes)
            .map_err(|_| corrupt("a redo record under a key that is not `w/` and an 8-byte id"))?;
        let ops = Ops::decode(&v).ok_or_else(|| corrupt("undecodable redo record"))?;
        if applied(&ops) {
            retained += 1;
            apply_some(db, &ops, |k| under(k, deferred))?;
        } else {
            tracing::warn!(
                writes = ops.0.len(),
                "re-applying a write set a crash interrupted"
            );
            apply_ops(db, &ops)?;
        }
        db.remove(&k)?;
        next = next.max(id + 1);
    }
    if retained > 0 {
        tracing::info!(
            records = retained,
            "wrote the deferred writes of the redo records kept since the last write-out"
        );
    }
    db.flush()?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_write_set_is_applied_at_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        db.insert(b"gone", b"x".as_slice()).unwrap();
        let mut ops = Ops::default();
        ops.insert(b"a", b"1");
        ops.insert(b"b", b"2");
        ops.remove(b"gone");
        // As if the process died right after the redo record was written.
        db.insert(key(7), ops.encode()).unwrap();
        assert_eq!(recover(&db, &[b"e/"], |_| false).unwrap(), 8);
        assert_eq!(db.get(b"a").unwrap().unwrap(), b"1".as_slice());
        assert_eq!(db.get(b"b").unwrap().unwrap(), b"2".as_slice());
        assert!(db.get(b"gone").unwrap().is_none());
        assert_eq!(db.scan_prefix(b"w/").count(), 0);
    }

    #[test]
    fn a_kept_record_gives_only_its_deferred_writes_again() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let mut first = Ops::default();
        first.insert(b"s/1", b"decided");
        first.insert(b"e/x", b"one");
        first.insert(b"m/head", b"1");
        apply_retaining(&db, 3, &first, &[b"e/"]).unwrap();
        assert_eq!(db.get(b"s/1").unwrap().unwrap(), b"decided".as_slice());
        assert!(db.get(b"e/x").unwrap().is_none(), "deferred");
        let mut second = Ops::default();
        second.insert(b"e/x", b"two");
        second.insert(b"m/head", b"2");
        apply_retaining(&db, 4, &second, &[b"e/"]).unwrap();
        // Written since, outside the records: not to be undone.
        db.insert(b"s/1", b"replayed").unwrap();
        assert_eq!(
            recover(&db, &[b"e/"], |ops| ops.last_put(b"m/head").is_some()).unwrap(),
            5
        );
        assert_eq!(
            db.get(b"e/x").unwrap().unwrap(),
            b"two".as_slice(),
            "in order"
        );
        assert_eq!(db.get(b"s/1").unwrap().unwrap(), b"replayed".as_slice());
        assert_eq!(db.scan_prefix(b"w/").count(), 0);
        apply_retaining(&db, 5, &first, &[b"e/"]).unwrap();
        forget(&db, 5).unwrap();
        assert_eq!(db.scan_prefix(b"w/").count(), 0);
    }

    #[test]
    fn a_record_under_a_key_the_store_never_writes_is_named_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let mut ops = Ops::default();
        ops.insert(b"s/1", b"decided");
        db.insert(b"w/short", ops.encode()).unwrap();
        match recover(&db, &[], |_| false) {
            Err(crate::StoreError::Corrupt { key, message }) => {
                assert_eq!(key, "w/\\x73\\x68\\x6f\\x72\\x74");
                assert!(message.contains("8-byte id"), "{message}");
            }
            other => panic!("expected a corrupt-record error, got {other:?}"),
        }
        assert!(db.get(b"s/1").unwrap().is_none(), "nothing applied");
        assert!(db.get(b"w/short").unwrap().is_some(), "nothing removed");
    }

    #[test]
    fn records_round_trip() {
        let mut ops = Ops::default();
        ops.insert(b"k", vec![0u8; 300]);
        ops.remove(b"q/1");
        let encoded = ops.encode();
        assert_eq!(encoded.capacity(), encoded.len(), "sized exactly up front");
        let back = Ops::decode(&encoded).unwrap();
        assert_eq!(back.0, ops.0);
        assert!(Ops::decode(&[0, 0, 0, 9, 1]).is_none(), "truncated");
    }
}
