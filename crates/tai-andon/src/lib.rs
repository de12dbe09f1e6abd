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
use tai_core::receipt::{verify_ledger, VerifyReport};
use tai_otp::{ChildSpec, Strategy, SupervisorSpec};
use tai_store::Store;

pub use alerts::Alerts;
pub use ledger::{Ledger, LedgerArgs};

/// `andon_sup` (`one_for_one`): the receipt ledger and the alert router.
pub fn supervisor_spec(store: Store, config: AndonConfig, alerts: AlertsConfig) -> SupervisorSpec {
    SupervisorSpec::new(Strategy::OneForOne)
        .intensity(5, Duration::from_secs(10))
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

/// Verifies the whole ledger in a store against its signed head.
pub fn verify_store(store: &Store, keys: &BTreeMap<String, String>) -> VerifyReport {
    let head = match store.head() {
        Ok(h) => h,
        Err(e) => return unreadable(e.to_string()),
    };
    match store.all_receipts() {
        Ok(receipts) => verify_ledger(&receipts, keys, head.as_ref()),
        Err(e) => unreadable(e.to_string()),
    }
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
