//! `tai store check` and `tai store set-aside`: a stopped node's store
//! read record by record, and a damaged record moved out of the node's way
//! (ARCHITECTURE.md, the store; README, "A damaged store").

use std::path::{Path, PathBuf};

use anyhow::bail;
use tai_core::config::Config;
use tai_store::check::{self, Damaged, Moved};
use tai_store::head;
use tai_store::StoreError;

/// The data dir: `--data-dir`, else the config's `node.data_dir`.
fn dir(config: &Config, data_dir: Option<PathBuf>) -> PathBuf {
    data_dir.unwrap_or_else(|| config.node.data_dir.clone())
}

/// A store error, with what to do when the node still runs.
fn refused(e: StoreError) -> anyhow::Error {
    match e {
        e @ StoreError::InUse { .. } => {
            anyhow::anyhow!(
                "{e}: stop the node first (the store is read with nothing writing to it)"
            )
        }
        e => e.into(),
    }
}

/// A store that did not open, with the way past a damaged record, and
/// `held` (what to do instead) when a running node holds it.
pub fn not_opened(e: StoreError, held: &str) -> anyhow::Error {
    match e {
        StoreError::Corrupt { ref key, .. } if key == "m/head" => anyhow::anyhow!(
            "{e}; `tai store rebuild-head` writes a new signed head over the ledger once every receipt verifies (or restore the data dir from a backup); `tai store check` names any other damaged record"
        ),
        e @ StoreError::Corrupt { .. } => anyhow::anyhow!(
            "{e}; `tai store check` names every damaged record and what setting it aside costs; `tai store set-aside KEY` moves one out of the node's way"
        ),
        e @ StoreError::InUse { .. } if !held.is_empty() => anyhow::anyhow!("{e}: {held}"),
        e => e.into(),
    }
}

/// `s` quoted for a shell.
fn quoted(s: &str) -> String {
    shlex::try_quote(s)
        .map(|q| q.into_owned())
        .unwrap_or_else(|_| s.to_string())
}

/// The command that sets `key` aside, quoted for a shell.
fn set_aside_command(key: &str, dir: &Path) -> String {
    format!(
        "tai store set-aside {} --data-dir {}",
        quoted(key),
        quoted(&dir.display().to_string())
    )
}

/// Prints what the check found; 1 if any record is damaged.
pub fn run_check(config: &Config, data_dir: Option<PathBuf>, json: bool) -> anyhow::Result<i32> {
    let dir = dir(config, data_dir);
    let report = check::check(&dir, &tai_jidoka::store_readers()).map_err(refused)?;
    let code = i32::from(!report.damaged.is_empty());
    if json {
        let mut v = serde_json::to_value(&report)?;
        v["data_dir"] = dir.display().to_string().into();
        v["ok"] = report.damaged.is_empty().into();
        println!("{v}");
        return Ok(code);
    }
    let total: u64 = report.records.values().sum();
    let kinds: Vec<String> = report
        .records
        .iter()
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect();
    println!(
        "{} records in {}: {}",
        total,
        dir.display(),
        kinds.join(", ")
    );
    if report.damaged.is_empty() {
        println!("every record reads");
    } else {
        println!("{} damaged record(s):", report.damaged.len());
    }
    for d in &report.damaged {
        println!("  {} ({}): {}", d.key, d.kind, d.error);
        match d.if_set_aside {
            Some(cost) => {
                println!("    if set aside: {cost}");
                println!("    {}", set_aside_command(&d.key, &dir));
            }
            None => {
                println!(
                    "    never set aside: a node would begin the ledger again over its receipts"
                );
                println!(
                    "    tai store rebuild-head --data-dir {} writes a new one over the ledger once every receipt verifies, or restore the data dir from a backup",
                    quoted(&dir.display().to_string())
                );
            }
        }
    }
    if !report.set_aside.is_empty() {
        println!(
            "{} record(s) set aside earlier (kept under x/, never read):",
            report.set_aside.len()
        );
        for a in &report.set_aside {
            println!("  {} ({} bytes)", a.key, a.bytes);
        }
    }
    println!(
        "the ledger's chain and signed head: tai receipts --verify --data-dir {}",
        dir.display()
    );
    Ok(code)
}

/// Sets each of `keys` aside, in order, stopping at the first refused.
pub fn run_set_aside(
    config: &Config,
    data_dir: Option<PathBuf>,
    keys: &[String],
) -> anyhow::Result<i32> {
    let dir = dir(config, data_dir);
    let readers = tai_jidoka::store_readers();
    for key in keys {
        let Moved {
            record:
                Damaged {
                    key,
                    kind,
                    error,
                    if_set_aside,
                },
            stranded,
        } = match check::set_aside(&dir, key, &readers) {
            Ok(d) => d,
            Err(StoreError::Refused(why)) => bail!("not set aside: {why}"),
            Err(e) => return Err(refused(e)),
        };
        println!("set aside the {kind} at {key} ({error}): its bytes are kept under x/{key}");
        if let Some(cost) = if_set_aside {
            println!("  {cost}");
        }
        for record in stranded {
            println!(
                "  with it the record {record}, `accepted` and queued nowhere else (a dead letter replayed into that block): kept under x/{record}, so that the signal may be sent again"
            );
        }
    }
    Ok(0)
}

/// Writes a new signed head over a ledger whose head does not read, and
/// says what it rests on.
pub fn run_rebuild_head(
    config: &Config,
    data_dir: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<i32> {
    let dir = dir(config, data_dir);
    let andon = &config.andon;
    let r = match head::rebuild_head(&dir, &andon.signing_keys, &andon.signing_key_id) {
        Ok(r) => r,
        Err(StoreError::Refused(why)) => bail!("no head rebuilt: {why}"),
        Err(e) => return Err(refused(e)),
    };
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(0);
    }
    println!(
        "{} receipts verify; the last block: {}",
        r.receipts, r.last_block
    );
    if let Some((first, last)) = r.dropped {
        println!("  receipts {first} to {last} set aside under x/ (never committed)");
    }
    if r.head_seq == 0 {
        println!(
            "no committed receipt: the head is removed, and the node begins the ledger at seq 1"
        );
    } else if r.source == "redo" {
        println!(
            "m/head is now the node's own signed head at seq {} (hash {}), kept in a redo record",
            r.head_seq, r.head_hash
        );
    } else {
        println!(
            "m/head is now a head signed with key {} at seq {} (hash {})",
            r.key_id, r.head_seq, r.head_hash
        );
    }
    if let Some(kept) = &r.kept_as {
        println!("the damaged head's bytes are kept under {kept}");
    }
    println!(
        "the head vouches for the ledger as it stands now: receipts cut off its end before the head was damaged would not show"
    );
    Ok(0)
}
