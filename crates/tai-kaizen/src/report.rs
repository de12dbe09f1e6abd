//! The Kaizen report (`GET /admin/kaizen`): where the time goes, stage by
//! stage; the slowest 20 % of operations and what they have in common
//! (stage, policy or executor, tenant); the comparison with a saved
//! baseline, regressions flagged; and the health monitor. Pure: the node
//! gives it the samples, the baseline and the memory reading.

use std::collections::{BTreeMap, HashMap};

use crate::health::{mb, Readings, RAISE_AT};
use serde_json::{json, Value};
use tai_core::kaizen::{Sample, STAGES};

/// A stage's p99 this much above its baseline (and at least
/// [`REGRESSION_MIN_MS`] more) is a regression.
pub const REGRESSION_RATIO: f64 = 1.2;
pub const REGRESSION_MIN_MS: f64 = 0.5;

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Per stage: count, p50 and p99 in ms (what a baseline saves).
pub fn stage_summary(samples: &[Sample]) -> BTreeMap<String, Value> {
    let mut by: HashMap<&str, Vec<u64>> = HashMap::new();
    for s in samples {
        by.entry(s.stage).or_default().push(s.micros);
    }
    let mut out = BTreeMap::new();
    for stage in STAGES {
        let Some(mut v) = by.remove(stage) else {
            continue;
        };
        v.sort_unstable();
        out.insert(
            stage.to_string(),
            json!({"count": v.len(), "p50_ms": ms(percentile(&v, 0.5)), "p99_ms": ms(percentile(&v, 0.99))}),
        );
    }
    out
}

/// Groups `ops` by `key` with their count and share of `total` micros, largest first.
fn shares<'a>(ops: &[&'a Sample], total: u64, key: impl Fn(&'a Sample) -> &'a str) -> Vec<Value> {
    let mut g: HashMap<&str, (u64, u64)> = HashMap::new();
    for s in ops {
        let e = g.entry(key(s)).or_default();
        e.0 += 1;
        e.1 += s.micros;
    }
    let mut v: Vec<(&str, (u64, u64))> = g.into_iter().collect();
    v.sort_by(|a, b| b.1 .1.cmp(&a.1 .1).then(a.0.cmp(b.0)));
    v.into_iter()
        .take(10)
        .map(|(k, (n, t))| {
            json!({"name": k, "count": n, "total_ms": ms(t), "share": t as f64 / total.max(1) as f64})
        })
        .collect()
}

/// Why the node is not green for its memory and disk, if it is not:
/// memory above [`RAISE_AT`] of its limit (SPEC §8: 80 %, yellow), less free space on
/// the data dir's disk than `kaizen.disk_free_min_mb`. The board shows
/// these as its yellow reasons.
pub fn health_reasons(r: &Readings) -> Vec<String> {
    let mut reasons = Vec::new();
    if memory_share(r).is_some_and(|s| s > RAISE_AT) {
        reasons.push(format!(
            "memory over {:.0} % of its limit",
            RAISE_AT * 100.0
        ));
    }
    if let Some(d) = r.disk.filter(|d| mb(d.free) < r.disk_free_min_mb) {
        reasons.push(format!(
            "{} MB free on the data dir's disk, below kaizen.disk_free_min_mb ({} MB)",
            mb(d.free),
            r.disk_free_min_mb
        ));
    }
    reasons
}

fn memory_share(r: &Readings) -> Option<f64> {
    let limit = r.memory_limit_mb * 1024 * 1024;
    r.rss_bytes
        .filter(|_| limit > 0)
        .map(|rss| rss as f64 / limit as f64)
}

/// Memory against its limit and the data dir's disk against its minimum
/// free space: `yellow` with [`health_reasons`], else `green`.
pub fn health(r: &Readings) -> Value {
    let reasons = health_reasons(r);
    json!({
        "status": if reasons.is_empty() { "green" } else { "yellow" },
        "reasons": reasons,
        "rss_mb": r.rss_bytes.map(mb),
        "memory_limit_mb": r.memory_limit_mb,
        "memory_share": memory_share(r),
        "disk_free_mb": r.disk.map(|d| mb(d.free)),
        "disk_total_mb": r.disk.map(|d| mb(d.total)),
        "disk_free_min_mb": r.disk_free_min_mb,
    })
}

/// The whole report. `baseline` is what [`stage_summary`] gave when it was saved.
pub fn report(samples: &[Sample], baseline: Option<&Value>, health: Value) -> Value {
    let total: u64 = samples.iter().map(|s| s.micros).sum();
    let summary = stage_summary(samples);
    let mut stages = Vec::new();
    let mut bottleneck: Option<(&str, u64)> = None;
    for stage in STAGES {
        let in_stage: Vec<u64> = samples
            .iter()
            .filter(|s| s.stage == stage)
            .map(|s| s.micros)
            .collect();
        if in_stage.is_empty() {
            continue;
        }
        let t: u64 = in_stage.iter().sum();
        if bottleneck.is_none_or(|(_, b)| t > b) {
            bottleneck = Some((stage, t));
        }
        let s = &summary[stage];
        stages.push(json!({
            "stage": stage,
            "count": in_stage.len(),
            "total_ms": ms(t),
            "share": t as f64 / total.max(1) as f64,
            "p50_ms": s["p50_ms"],
            "p99_ms": s["p99_ms"],
        }));
    }

    // 80/20: the slowest fifth of all operations, and what they share.
    let mut sorted: Vec<&Sample> = samples.iter().collect();
    sorted.sort_by_key(|s| std::cmp::Reverse(s.micros));
    let slow = &sorted[..sorted.len().div_ceil(5)];
    let slow_total: u64 = slow.iter().map(|s| s.micros).sum();

    let mut regressions = Vec::new();
    if let Some(base) = baseline.and_then(|b| b["stages"].as_object()) {
        for (stage, now) in &summary {
            let (Some(was), Some(is)) = (
                base.get(stage).and_then(|b| b["p99_ms"].as_f64()),
                now["p99_ms"].as_f64(),
            ) else {
                continue;
            };
            if is > was * REGRESSION_RATIO && is - was >= REGRESSION_MIN_MS {
                regressions.push(json!({
                    "stage": stage, "baseline_p99_ms": was, "p99_ms": is, "ratio": is / was.max(0.001),
                }));
            }
        }
    }
    let status = if health["status"] == "yellow" || !regressions.is_empty() {
        "yellow"
    } else {
        "green"
    };
    json!({
        "status": status,
        "samples": samples.len(),
        "stages": stages,
        "bottleneck": bottleneck.map(|(s, _)| s),
        "slowest_20_percent": {
            "operations": slow.len(),
            "time_share": slow_total as f64 / total.max(1) as f64,
            "threshold_ms": slow.last().map(|s| ms(s.micros)),
            "by_stage": shares(slow, slow_total, |s| s.stage),
            "by_policy": shares(slow, slow_total, |s| s.label.as_str()),
            "by_tenant": shares(slow, slow_total, |s| s.tenant.as_str()),
        },
        "baseline": baseline,
        "regressions": regressions,
        "health": health,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Disk;

    fn s(stage: &'static str, label: &str, tenant: &str, micros: u64) -> Sample {
        Sample {
            stage,
            label: label.into(),
            tenant: tenant.into(),
            micros,
        }
    }

    #[test]
    fn shares_bottleneck_and_the_slowest_fifth() {
        let mut v = Vec::new();
        for _ in 0..8 {
            v.push(s("policy", "payment_fraud", "calm", 100));
            v.push(s("receipt", "ledger", "calm", 1_000));
        }
        v.push(s("receipt", "ledger", "hot", 50_000));
        v.push(s("action", "gw", "hot", 40_000));
        let r = report(&v, None, health(&memory(1, 0)));
        assert_eq!(r["bottleneck"], "receipt");
        let total = 8.0 * 100.0 + 8.0 * 1000.0 + 50_000.0 + 40_000.0;
        let receipt = r["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["stage"] == "receipt")
            .unwrap();
        assert!((receipt["share"].as_f64().unwrap() - 58_000.0 / total).abs() < 1e-9);
        // 18 operations: the slowest fifth is 4 of them.
        let slow = &r["slowest_20_percent"];
        assert_eq!(slow["operations"], 4);
        assert_eq!(slow["by_tenant"][0]["name"], "hot");
        assert_eq!(slow["by_stage"][0]["name"], "receipt");
        assert_eq!(r["status"], "green");
        assert!(r["regressions"].as_array().unwrap().is_empty());
    }

    #[test]
    fn a_slower_p99_than_the_baseline_is_a_regression() {
        let before: Vec<Sample> = (0..100).map(|_| s("receipt", "l", "t", 1_000)).collect();
        let baseline = json!({"stages": stage_summary(&before)});
        let after: Vec<Sample> = (0..100).map(|_| s("receipt", "l", "t", 3_000)).collect();
        let unread = Readings {
            rss_bytes: None,
            ..memory(0, 0)
        };
        let r = report(&after, Some(&baseline), health(&unread));
        assert_eq!(r["regressions"][0]["stage"], "receipt");
        assert_eq!(r["regressions"][0]["baseline_p99_ms"], 1.0);
        assert_eq!(r["status"], "yellow");
        // The same figures again: no regression.
        let r = report(&before, Some(&baseline), health(&unread));
        assert!(r["regressions"].as_array().unwrap().is_empty());
    }

    fn memory(rss_mb: u64, memory_limit_mb: u64) -> Readings {
        Readings {
            rss_bytes: Some(rss_mb * 1024 * 1024),
            memory_limit_mb,
            disk: None,
            disk_free_min_mb: 0,
        }
    }

    #[test]
    fn memory_over_80_percent_of_the_limit_is_yellow() {
        assert_eq!(health(&memory(900, 1000))["status"], "yellow");
        assert_eq!(
            health(&memory(900, 1000))["reasons"],
            json!(["memory over 80 % of its limit"])
        );
        assert_eq!(health(&memory(700, 1000))["status"], "green");
        assert_eq!(health(&memory(700, 0))["status"], "green");
    }

    #[test]
    fn less_free_disk_than_the_minimum_is_yellow() {
        let disk = |free_mb: u64, min: u64| Readings {
            disk: Some(Disk {
                free: free_mb * 1024 * 1024,
                total: 10_000 * 1024 * 1024,
            }),
            disk_free_min_mb: min,
            ..memory(1, 0)
        };
        let low = health(&disk(500, 1024));
        assert_eq!(low["status"], "yellow");
        assert_eq!(
            low["reasons"],
            json!(["500 MB free on the data dir's disk, below kaizen.disk_free_min_mb (1024 MB)"])
        );
        assert_eq!(
            (&low["disk_free_mb"], &low["disk_total_mb"]),
            (&json!(500), &json!(10_000))
        );
        assert_eq!(health(&disk(2000, 1024))["status"], "green");
        assert_eq!(health(&disk(500, 0))["status"], "green", "0: no check");
        // Both at once: both reasons.
        let both = Readings {
            disk: disk(5, 1024).disk,
            disk_free_min_mb: 1024,
            ..memory(900, 1000)
        };
        assert_eq!(health(&both)["reasons"].as_array().unwrap().len(), 2);
    }
}
