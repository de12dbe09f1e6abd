//! tai-andon: layer 5, `andon_sup`.
//!
//! The signed, hash-chained receipt ledger (`andon_ledger`), its
//! verification, and (later) alert routing and the board feed. Depends on
//! tai-core, tai-otp and tai-store only.

mod alerts;
mod ledger;

use std::collections::BTreeMap;
use std::time::Duration;

use tai_core::config::{AlertsConfig, AndonConfig};
use tai_core::msg::{ANDON_ALERTS, ANDON_LEDGER};
use tai_core::receipt::{ChainVerifier, VerifyReport};
use tai_otp::{ChildSpec, Strategy, SupervisorSpec};
use tai_store::Store;

pub use alerts::Alerts;
pub use ledger::{Ledger, LedgerArgs};

/// `andon_sup` (`one_for_one`): the receipt ledger and the alert router.
pub fn supervisor_spec(store: Store, config: AndonConfig, alerts: AlertsConfig) -> SupervisorSpec {
    SupervisorSpec::new(Strategy::OneForOne)
        .intensity(tai_core::names::ANDON_SUP_RESTARTS, Duration::from_secs(10))
        .child(ChildSpec::worker(
            ANDON_LEDGER,
            Some(ANDON_LEDGER.to_string()),
            Ledger,
            move || LedgerArgs {
                store: store.clone(),
                key_id: config.signing_key_id.clone(),
                keys: config.signing_keys.clone(),
            },
        ))
        .child(ChildSpec::worker(
            ANDON_ALERTS,
            Some(ANDON_ALERTS.to_string()),
            Alerts,
            move || alerts.clone(),
        ))
}

/// Where the ids of the keys that ever signed this store's receipts are
/// kept (store meta, one record per key).
const SIGNING_KEY_META: &str = tai_store::meta::LEDGER_KEY;

/// Records that `key_id` signs this store's receipts from now on.
pub fn record_signing_key(store: &Store, key_id: &str) -> Result<(), String> {
    store
        .put_meta(&format!("{SIGNING_KEY_META}{key_id}"), b"")
        .map_err(|e| e.to_string())
}

/// The keys that signed some of this store's receipts (recorded as each
/// came into use, and the signed head's) that `keys` does not hold: the
/// ledger cannot be verified without them.
pub fn missing_signing_keys(
    store: &Store,
    keys: &BTreeMap<String, String>,
) -> Result<Vec<String>, String> {
    let mut used: std::collections::BTreeSet<String> = store
        .metas(SIGNING_KEY_META)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(name, _)| name[SIGNING_KEY_META.len()..].to_string())
        .collect();
    if let Some(head) = store.head().map_err(|e| e.to_string())? {
        used.insert(head.key_id);
    }
    Ok(used.into_iter().filter(|k| !keys.contains_key(k)).collect())
}

/// What a verification of a store covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// The ledger as of its signed head, read first: a running node appends
    /// while the receipts are read, and what it appends meanwhile is the
    /// next verification's (reading it as an unsigned extension was a false
    /// alarm under traffic).
    AsOfHead,
    /// Everything stored: a stopped node's data dir, where a receipt past
    /// the signed head is an unsigned extension.
    Whole,
}

/// Verifies a store's ledger against its signed head, a block at a time
/// (constant memory, whatever the ledger's length).
pub fn verify_store(
    store: &Store,
    keys: &BTreeMap<String, String>,
    extent: Extent,
) -> VerifyReport {
    let mut head = match store.head() {
        Ok(h) => h,
        Err(e) => return unreadable(e.to_string()),
    };
    if extent == Extent::AsOfHead && head.is_none() {
        // The first receipts may have landed since: their head with them.
        if store.receipt_blocks(0, None).next().is_some() {
            match store.head() {
                Ok(h) => head = h,
                Err(e) => return unreadable(e.to_string()),
            }
        }
    }
    let upto = match (extent, &head) {
        (Extent::AsOfHead, Some(h)) => h.seq,
        _ => u64::MAX,
    };
    let mut v = ChainVerifier::new(keys);
    'walk: for block in store.receipt_blocks(0, None) {
        let block = match block {
            Ok(b) => b,
            Err(e) => return v.broken(format!("unreadable receipt block: {e}")),
        };
        for r in block.iter().take_while(|r| r.seq <= upto) {
            if !v.push(r) {
                break 'walk;
            }
        }
        if block.last().is_some_and(|r| r.seq >= upto) {
            break;
        }
    }
    v.finish_ledger(head.as_ref())
}

fn unreadable(reason: String) -> VerifyReport {
    VerifyReport {
        ok: false,
        count: 0,
        head_seq: 0,
        head_hash: String::new(),
        first_bad_seq: Some(1),
        reason: Some(reason),
    }
}
