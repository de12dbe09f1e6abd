//! tai-store: the only crate that names sled.
//!
//! One sled database per node, under `node.data_dir`. It is opened once per
//! process, outside the supervision tree (like an ETS table owned by the
//! application rather than by any one process), so a layer restart never
//! closes or reopens it.

use std::path::Path;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot open the data directory {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: sled::Error,
    },
    #[error("store i/o failed: {0}")]
    Io(#[from] sled::Error),
}

impl StoreError {
    /// A stable code for logs and the HTTP layer.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Open { .. } => "store_open",
            StoreError::Io(_) => "store_io",
        }
    }
}

/// A handle to the node's store; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
}

const NODE_STARTS: &[u8] = b"node_starts";

impl Store {
    /// Opens (creating if needed) the store in `dir`. sled holds a lock on the
    /// directory: a second node on the same data dir is refused here.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(dir.join("sled"))
            .open()
            .map_err(|source| StoreError::Open {
                path: dir.display().to_string(),
                source,
            })?;
        let meta = db.open_tree("meta")?;
        Ok(Store { db, meta })
    }

    /// Counts this start in the store and returns the count (1 on a fresh data dir).
    pub fn record_start(&self) -> Result<u64, StoreError> {
        let next = self
            .meta
            .update_and_fetch(NODE_STARTS, |old| {
                let n = old
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map_or(0, u64::from_be_bytes);
                Some((n + 1).to_be_bytes().to_vec())
            })?
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        self.db.flush()?;
        Ok(next)
    }

    /// Whether the store answers a read: the readiness probe.
    pub fn ping(&self) -> Result<(), StoreError> {
        self.meta.get(NODE_STARTS)?;
        Ok(())
    }

    /// Makes everything written so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_are_counted_across_reopen_and_the_dir_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            assert_eq!(s.record_start().unwrap(), 1);
            s.ping().unwrap();
            let second = Store::open(dir.path());
            assert!(
                matches!(second, Err(StoreError::Open { .. })),
                "sled locks its directory"
            );
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.record_start().unwrap(), 2);
    }
}
