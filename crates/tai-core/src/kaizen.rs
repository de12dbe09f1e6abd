//! Kaizen timings: how long each stage of the signal path took, kept as a
//! bounded window of recent samples per stage (no I/O; the layers record,
//! `/admin/kaizen` reads). Stages, in path order: `ingress` (request to
//! 202), `queue` (accepted to the engine taking it), `policy` (the engine's
//! decision step), `action` (the executor), `receipt` (the ledger commit
//! until durable).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustc_hash::FxBuildHasher;

pub const STAGES: [&str; 5] = ["ingress", "queue", "policy", "action", "receipt"];
/// Samples kept per stage.
const WINDOW: usize = 2048;
/// Distinct labels and tenants kept before the windows start afresh (a
/// bound on memory; tenants come from the config, so it is never reached
/// in practice).
const MAX_NAMES: usize = 1 << 20;

/// One timed operation.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub stage: &'static str,
    /// What ran: the policies of the SKU, the executor, ...
    pub label: String,
    pub tenant: String,
    pub micros: u64,
}

/// A sample as kept: its label and tenant by number. Recording is on the
/// path of every signal: 16 bytes a sample keep the windows (160 KB) in
/// the cache, where samples holding their own strings cost a cache miss
/// or two each time the oldest was recycled (2 % of the node's CPU at
/// full load, session 63).
#[derive(Clone, Copy)]
struct Kept {
    label: u32,
    tenant: u32,
    micros: u64,
}

/// The windows, stage by stage, and the names their samples refer to (by
/// number, and each name's number: one copy of each name).
struct Windows {
    stages: Vec<VecDeque<Kept>>,
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, u32, FxBuildHasher>,
}

impl Windows {
    /// The number of `name`, given it if new.
    fn id(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = u32::try_from(self.names.len()).expect("names are bounded by MAX_NAMES");
        let name: Arc<str> = name.into();
        self.ids.insert(name.clone(), id);
        self.names.push(name);
        id
    }
}

static WINDOWS: Mutex<Windows> = Mutex::new(Windows {
    stages: Vec::new(),
    names: Vec::new(),
    ids: HashMap::with_hasher(FxBuildHasher),
});

/// Records one operation of `stage` (one of [`STAGES`]; others are ignored).
pub fn record(stage: &'static str, label: &str, tenant: &str, took: Duration) {
    record_all(label, tenant, &[(stage, took)]);
}

/// Records several operations of one label and tenant under one lock: an
/// engine times two stages of every signal of a batch, and the windows are
/// shared by every worker thread, so a lock per sample was a cache miss per
/// sample.
pub fn record_all(label: &str, tenant: &str, timed: &[(&'static str, Duration)]) {
    if timed.is_empty() {
        return;
    }
    let mut w = WINDOWS.lock().expect("kaizen windows");
    if w.stages.is_empty() || w.names.len() >= MAX_NAMES {
        w.stages.clear();
        w.stages
            .resize_with(STAGES.len(), || VecDeque::with_capacity(WINDOW));
        w.names.clear();
        w.ids.clear();
    }
    let (label, tenant) = (w.id(label), w.id(tenant));
    for &(stage, took) in timed {
        let Some(i) = STAGES.iter().position(|s| *s == stage) else {
            continue;
        };
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let q = &mut w.stages[i];
        if q.len() == WINDOW {
            q.pop_front();
        }
        q.push_back(Kept {
            label,
            tenant,
            micros,
        });
    }
}

/// Every sample in the windows, stage by stage, oldest first.
pub fn samples() -> Vec<Sample> {
    let w = WINDOWS.lock().expect("kaizen windows");
    let name = |id: u32| w.names[id as usize].to_string();
    w.stages
        .iter()
        .zip(STAGES)
        .flat_map(|(q, stage)| {
            q.iter().map(move |k| Sample {
                stage,
                label: name(k.label),
                tenant: name(k.tenant),
                micros: k.micros,
            })
        })
        .collect()
}

/// Decision latencies (ms, acceptance to durable decision) and ingress
/// outcomes (ok: 2xx), recent ones only: the board's latency and error rate.
struct Recent {
    latencies: VecDeque<u64>,
    outcomes: VecDeque<bool>,
}

static RECENT: Mutex<Recent> = Mutex::new(Recent {
    latencies: VecDeque::new(),
    outcomes: VecDeque::new(),
});

fn push<T>(q: &mut VecDeque<T>, v: T) {
    if q.len() == WINDOW {
        q.pop_front();
    }
    q.push_back(v);
}

/// Records the latencies of a commit's decisions, under one lock.
pub fn record_decisions(latencies_ms: impl IntoIterator<Item = u64>) {
    let mut recent = RECENT.lock().expect("kaizen recent");
    for latency_ms in latencies_ms {
        push(&mut recent.latencies, latency_ms);
    }
}

pub fn record_ingress(ok: bool) {
    push(&mut RECENT.lock().expect("kaizen recent").outcomes, ok);
}

/// Recent decision latencies (ms) and ingress outcomes.
pub fn recent() -> (Vec<u64>, Vec<bool>) {
    let r = RECENT.lock().expect("kaizen recent");
    (
        r.latencies.iter().copied().collect(),
        r.outcomes.iter().copied().collect(),
    )
}

/// Alerts raised since the start: the board pushes at once when it moves.
pub static ALERTS_RAISED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_window_keeps_the_latest_samples_with_their_own_text() {
        for n in 0..WINDOW + 5 {
            record(
                "action",
                &format!("exec-{n}"),
                &format!("t{}", n % 3),
                Duration::from_micros(n as u64),
            );
        }
        record("nope", "ignored", "t", Duration::ZERO);
        let action: Vec<Sample> = samples()
            .into_iter()
            .filter(|s| s.stage == "action")
            .collect();
        assert_eq!(action.len(), WINDOW);
        assert_eq!(action[0].label, "exec-5", "the oldest five went");
        let last = action.last().unwrap();
        let n = WINDOW + 4;
        assert_eq!(
            (last.label.as_str(), last.tenant.as_str(), last.micros),
            (
                format!("exec-{n}").as_str(),
                format!("t{}", n % 3).as_str(),
                n as u64
            )
        );
        assert!(samples().iter().all(|s| s.label != "ignored"));
    }

    #[test]
    fn the_table_of_names_is_bounded_and_starts_afresh_when_full() {
        // Labels and tenants come from the config; a table that somehow
        // filled would start again rather than grow.
        for n in 1..MAX_NAMES {
            record("ingress", "post_signal", &format!("t{n}"), Duration::ZERO);
        }
        assert_eq!(WINDOWS.lock().unwrap().names.len(), MAX_NAMES);
        record("receipt", "ledger", "last", Duration::from_micros(9));
        let all = samples();
        assert_eq!(all.len(), 1, "only the sample after the reset");
        assert_eq!(
            (
                all[0].stage,
                all[0].label.as_str(),
                all[0].tenant.as_str(),
                all[0].micros
            ),
            ("receipt", "ledger", "last", 9)
        );
        assert_eq!(WINDOWS.lock().unwrap().names.len(), 2);
    }

    #[test]
    fn a_batch_of_samples_lands_in_each_stages_window_in_order() {
        let before = |stage: &str| samples().iter().filter(|s| s.stage == stage).count();
        let (queue, policy) = (before("queue"), before("policy"));
        record_all(
            "fraud",
            "batch-tenant",
            &[
                ("queue", Duration::from_millis(3)),
                ("policy", Duration::from_micros(7)),
                ("no-such-stage", Duration::ZERO),
                ("queue", Duration::from_millis(4)),
            ],
        );
        let of = |stage: &str| -> Vec<u64> {
            samples()
                .into_iter()
                .filter(|s| s.stage == stage && s.tenant == "batch-tenant")
                .inspect(|s| assert_eq!(s.label, "fraud"))
                .map(|s| s.micros)
                .collect()
        };
        assert_eq!(of("queue"), [3_000, 4_000]);
        assert_eq!(of("policy"), [7]);
        assert_eq!((before("queue"), before("policy")), (queue + 2, policy + 1));
        assert!(samples().iter().all(|s| s.stage != "no-such-stage"));
    }
}
