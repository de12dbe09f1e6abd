//! Custom policies in Rego (OPA's language) through `regorus`.
//!
//! A SKU names `.rego` files (`skus.NAME.rego`). Each file declares a
//! package and a `decision` rule; the engine evaluates `data.<package>.decision`
//! with the input `{"signal": ..., "context": {"now_ms": ..., "payments_last_minute": ...}}`
//! and reads `{"allow": bool, "violations"?: [string], "score"?: number, "action"?: string}`.
//! Evaluation is deterministic and does no I/O; an evaluation error denies
//! (fail closed) with the error as the violation.
//!
//! Files load at start (an invalid one stops the node with its file, line
//! and message) and again on `POST /admin/policies/reload`, where an invalid
//! file is reported and the working version of it stays in force.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use regorus::utils::limits::ExecutionTimerConfig;
use regorus::LimitError;

use serde::Serialize;
use serde_json::{json, Value};
use tai_core::signal::Signal;

use super::{Context, Verdict};

/// A problem with a policy file, as an operator needs it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyError {
    pub file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    pub message: String,
}

impl std::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// regorus reports `\n--> file:line:col\n<source excerpt>\nerror: message`.
fn policy_error(file: &str, e: &anyhow::Error) -> PolicyError {
    let text = e.to_string();
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("--> "))
        .and_then(|loc| loc.rsplit(':').nth(1))
        .and_then(|l| l.parse().ok());
    let message = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid policy")
        .trim()
        .to_string();
    PolicyError {
        file: file.to_string(),
        line,
        message,
    }
}

/// Prepared engines kept per file for reuse: about as many as threads
/// evaluate it at once (cloning one costs twice an evaluation).
const IDLE_ENGINES: usize = 8;

/// How long an evaluation may run on the runtime worker that polls its
/// engine. One that needs longer is started again (evaluation is
/// deterministic and has no effects) with the rest of its limit, after
/// `block_in_place` has handed the worker to another thread: a slow policy
/// holds up the engines deciding with it, never the node's other work.
/// Handing off costs a thread switch, which a decision of tens of
/// microseconds should not pay (measured: 38 % fewer decided/s).
const INLINE: Duration = Duration::from_millis(1);

/// One version of a file: its prepared engine (the template every engine
/// in use was cloned from), its rule path, its source, its time limit,
/// and the prepared engines not in use right now.
struct Compiled {
    engine: regorus::Engine,
    rule: String,
    source: String,
    limit: Duration,
    idle: Mutex<Vec<regorus::Engine>>,
}

/// Cooperative: the interpreter reads the clock every `check_interval`
/// steps and fails the evaluation once past `limit`.
fn timer(engine: &mut regorus::Engine, limit: Duration) {
    engine.set_execution_timer_config(ExecutionTimerConfig {
        limit,
        check_interval: NonZeroU32::new(32).expect("non-zero"),
    });
}

/// `block_in_place` needs a multi-threaded runtime (the node's); on a
/// current-thread one, or outside any, there is no worker to hand over.
fn may_block_in_place() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

fn compile(file: &str, source: String, limit: Duration) -> Result<Compiled, PolicyError> {
    let mut engine = regorus::Engine::new();
    timer(&mut engine, limit);
    let package = engine
        .add_policy(file.to_string(), source.clone())
        .map_err(|e| policy_error(file, &e))?;
    let rule = format!("{package}.decision");
    // Prepares the whole module (undefined references, bad builtins) and
    // proves the decision rule exists before the file is trusted.
    let mut probe = engine.clone();
    probe.set_input(regorus::Value::from(json!({"signal": {}, "context": {}})));
    if let Err(e) = probe.eval_rule(rule.clone()) {
        if e.to_string().contains("not a valid rule path") {
            return Err(PolicyError {
                file: file.to_string(),
                line: None,
                message: format!("no `decision` rule in {package}"),
            });
        }
        return Err(policy_error(file, &e));
    }
    Ok(Compiled {
        idle: Mutex::new(vec![probe]),
        engine,
        rule,
        source,
        limit,
    })
}

/// A Rego policy as a SKU holds it: a slot that a reload refills in place,
/// so every engine sees the new version at its next decision.
#[derive(Clone)]
pub struct RegoPolicy {
    pub file: String,
    slot: Arc<RwLock<Arc<Compiled>>>,
}

impl std::fmt::Debug for RegoPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegoPolicy")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl PartialEq for RegoPolicy {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.slot, &other.slot)
    }
}

impl RegoPolicy {
    /// Compiles Rego source (for tests and benchmarks; the node loads files
    /// through [`RegoSet`]).
    pub fn from_source(
        file: &str,
        source: &str,
        limit: Duration,
    ) -> Result<RegoPolicy, PolicyError> {
        Self::compiled(file, source.to_string(), limit)
    }

    fn compiled(file: &str, source: String, limit: Duration) -> Result<RegoPolicy, PolicyError> {
        Ok(RegoPolicy {
            file: file.to_string(),
            slot: Arc::new(RwLock::new(Arc::new(compile(file, source, limit)?))),
        })
    }

    /// Evaluates with a prepared engine of its own, so engines deciding
    /// with the same file at once never wait for each other; on the
    /// calling worker for up to [`INLINE`], off it for the rest of the
    /// file's time limit. Past the limit, a denial.
    pub fn evaluate(&self, signal: &Signal, ctx: Context<'_>) -> Verdict {
        let version = Arc::clone(&self.slot.read().expect("rego slot"));
        let taken = version.idle.lock().expect("rego engines").pop();
        let mut engine = taken.unwrap_or_else(|| version.engine.clone());
        let customer = signal
            .payload
            .get("customer_id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let recent = ctx.velocity.get(customer).map_or(0, |times| {
            times
                .iter()
                .filter(|t| ctx.now_ms.saturating_sub(**t) < 60_000)
                .count()
        });
        let input = json!({
            "signal": signal,
            "context": {"now_ms": ctx.now_ms, "payments_last_minute": recent},
        });
        engine.set_input(regorus::Value::from(input));
        let limit = version.limit;
        let mut run = |budget: Duration| {
            timer(&mut engine, budget);
            engine.eval_rule(version.rule.clone())
        };
        let out = match limit > INLINE && may_block_in_place() {
            true => match run(INLINE) {
                Err(e) if timed_out(&e) => tokio::task::block_in_place(|| run(limit - INLINE)),
                out => out,
            },
            false => run(limit),
        };
        let out = match out {
            Ok(v) => v
                .to_json_str()
                .map_err(|e| e.to_string())
                .and_then(|s| serde_json::from_str::<Value>(&s).map_err(|e| e.to_string())),
            Err(e) if timed_out(&e) => {
                tracing::warn!(
                    file = %self.file,
                    tenant = %signal.tenant_id,
                    sku = %signal.sku_id,
                    signal = %signal.id,
                    limit_ms = limit.as_millis() as u64,
                    "a Rego evaluation ran out of time: the signal is denied"
                );
                Err(format!(
                    "took longer than its {} ms limit",
                    limit.as_millis()
                ))
            }
            Err(e) => Err(e.to_string()),
        };
        // An engine whose evaluation failed part-way is not reused.
        if out.is_ok() {
            let mut idle = version.idle.lock().expect("rego engines");
            if idle.len() < IDLE_ENGINES {
                idle.push(engine);
            }
        }
        match out {
            Ok(doc) => verdict(&doc),
            // The engine puts the file's name before each violation.
            Err(e) => deny(format!("evaluation failed: {e}")),
        }
    }
}

fn timed_out(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<LimitError>(),
        Some(LimitError::TimeLimitExceeded { .. })
    )
}

fn deny(violation: String) -> Verdict {
    Verdict {
        allow: false,
        score: 0,
        violations: vec![violation],
        action: None,
    }
}

/// Reads the decision document; anything malformed denies.
fn verdict(doc: &Value) -> Verdict {
    let Some(allow) = doc.get("allow").and_then(Value::as_bool) else {
        return deny(format!("decision has no boolean `allow` (got {doc})"));
    };
    let violations = doc
        .get("violations")
        .and_then(Value::as_array)
        .map(|v| {
            v.iter()
                .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Verdict {
        allow,
        score: doc
            .get("score")
            .and_then(Value::as_f64)
            .map_or(0, |s| s.clamp(0.0, f64::from(u32::MAX)) as u32),
        violations,
        action: doc
            .get("action")
            .and_then(Value::as_str)
            .map(str::to_string),
    }
}

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    pub reloaded: Vec<String>,
    pub unchanged: Vec<String>,
    pub errors: Vec<PolicyError>,
}

/// Every Rego file the SKUs name, by path; shared by the SKUs and the
/// operator API.
#[derive(Clone)]
pub struct RegoSet {
    base: PathBuf,
    limit: Duration,
    files: Arc<RwLock<BTreeMap<String, RegoPolicy>>>,
}

impl std::fmt::Debug for RegoSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegoSet").finish_non_exhaustive()
    }
}

impl RegoSet {
    /// Relative paths resolve against `base` (the working directory the
    /// node was started from, like every other path in its config); each
    /// evaluation may take up to `limit` (`jidoka.rego_timeout_ms`).
    pub fn new(base: &Path, limit: Duration) -> RegoSet {
        RegoSet {
            base: base.to_path_buf(),
            limit,
            files: Arc::default(),
        }
    }

    fn read(&self, file: &str) -> Result<String, PolicyError> {
        std::fs::read_to_string(self.base.join(file)).map_err(|e| PolicyError {
            file: file.to_string(),
            line: None,
            message: format!("cannot read: {e}"),
        })
    }

    /// The policy of `file`, compiled on first use.
    pub fn load(&self, file: &str) -> Result<RegoPolicy, PolicyError> {
        if let Some(p) = self.files.read().expect("rego set").get(file) {
            return Ok(p.clone());
        }
        let policy = RegoPolicy::compiled(file, self.read(file)?, self.limit)?;
        self.files
            .write()
            .expect("rego set")
            .insert(file.to_string(), policy.clone());
        Ok(policy)
    }

    /// Re-reads every file. A file that fails keeps its working version.
    pub fn reload(&self) -> ReloadReport {
        let files = self.files.read().expect("rego set").clone();
        let mut report = ReloadReport {
            reloaded: Vec::new(),
            unchanged: Vec::new(),
            errors: Vec::new(),
        };
        for (file, policy) in files {
            let source = match self.read(&file) {
                Ok(s) => s,
                Err(e) => {
                    report.errors.push(e);
                    continue;
                }
            };
            if policy.slot.read().expect("rego slot").source == source {
                report.unchanged.push(file);
                continue;
            }
            match compile(&file, source, self.limit) {
                Ok(c) => {
                    *policy.slot.write().expect("rego slot") = Arc::new(c);
                    report.reloaded.push(file);
                }
                Err(e) => report.errors.push(e),
            }
        }
        report
    }

    pub fn files(&self) -> Vec<String> {
        self.files
            .read()
            .expect("rego set")
            .keys()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, VecDeque};

    const LIMIT: Duration = Duration::from_millis(100);

    const LIMITS: &str = r#"
package tai.limits

default decision := {"allow": true}

decision := {"allow": false, "violations": [msg], "score": 80, "action": "review"} if {
    input.signal.payload.amount > 1000
    msg := sprintf("amount %v over 1000", [input.signal.payload.amount])
}
"#;

    fn signal(amount: f64) -> Signal {
        Signal {
            id: "s".into(),
            tenant_id: "t".into(),
            sku_id: "k".into(),
            kind: "payment".into(),
            critical: false,
            payload: json!({"amount": amount, "customer_id": "c"})
                .as_object()
                .cloned()
                .unwrap()
                .into(),
            received_at_ms: 0,
            trace_id: None,
            traceparent: None,
        }
    }

    fn ctx(v: &BTreeMap<String, VecDeque<u64>>) -> Context<'_> {
        Context {
            now_ms: 100_000,
            velocity: v,
        }
    }

    #[test]
    fn a_rego_policy_allows_and_denies() {
        let p = RegoPolicy::from_source("limits.rego", LIMITS, LIMIT).unwrap();
        let v = BTreeMap::new();
        assert!(p.evaluate(&signal(10.0), ctx(&v)).allow);
        let denied = p.evaluate(&signal(5000.0), ctx(&v));
        assert!(!denied.allow);
        assert_eq!(denied.score, 80);
        assert_eq!(denied.violations, ["amount 5000 over 1000"]);
        assert_eq!(denied.action.as_deref(), Some("review"));
    }

    #[test]
    fn the_context_reaches_the_policy() {
        let p = RegoPolicy::from_source(
            "v.rego",
            r#"package v
decision := {"allow": input.context.payments_last_minute < 2}"#,
            LIMIT,
        )
        .unwrap();
        let mut v = BTreeMap::new();
        v.insert("c".to_string(), VecDeque::from([99_000]));
        assert!(p.evaluate(&signal(1.0), ctx(&v)).allow);
        v.insert("c".to_string(), VecDeque::from([99_000, 99_500]));
        assert!(!p.evaluate(&signal(1.0), ctx(&v)).allow);
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let e = RegoPolicy::from_source(
            "bad.rego",
            "package bad\n\ndecision := {\"allow\": }\n",
            LIMIT,
        )
        .unwrap_err();
        assert_eq!(e.file, "bad.rego");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(!e.message.is_empty());
        let e = RegoPolicy::from_source("none.rego", "package none\nallow := true\n", LIMIT)
            .unwrap_err();
        assert!(e.message.contains("decision"), "{e}");
    }

    #[test]
    fn the_shipped_example_compiles_and_decides() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let set = RegoSet::new(&root, LIMIT);
        let p = set.load("config/policies/payment_limits.rego").unwrap();
        let v = BTreeMap::new();
        assert!(p.evaluate(&signal(9000.0), ctx(&v)).allow);
        let d = p.evaluate(&signal(12000.0), ctx(&v));
        assert!(!d.allow);
        assert_eq!(d.violations, ["amount 12000 over the 10000 ceiling"]);
    }

    #[test]
    fn a_malformed_decision_denies() {
        let p = RegoPolicy::from_source("m.rego", "package m\ndecision := {\"ok\": true}\n", LIMIT)
            .unwrap();
        let v = BTreeMap::new();
        let out = p.evaluate(&signal(1.0), ctx(&v));
        assert!(!out.allow);
        assert!(out.violations[0].contains("no boolean `allow`"), "{out:?}");
    }

    #[test]
    fn a_broken_file_on_reload_keeps_the_working_version() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.rego"), LIMITS).unwrap();
        let set = RegoSet::new(dir.path(), LIMIT);
        let p = set.load("p.rego").unwrap();
        let v = BTreeMap::new();
        assert!(!p.evaluate(&signal(5000.0), ctx(&v)).allow);

        std::fs::write(
            dir.path().join("p.rego"),
            "package tai.limits\ndecision := {\n",
        )
        .unwrap();
        let r = set.reload();
        assert_eq!(r.errors.len(), 1);
        assert_eq!(r.errors[0].file, "p.rego");
        assert!(
            !p.evaluate(&signal(5000.0), ctx(&v)).allow,
            "old version still in force"
        );

        std::fs::write(
            dir.path().join("p.rego"),
            "package tai.limits\ndecision := {\"allow\": true}\n",
        )
        .unwrap();
        let r = set.reload();
        assert_eq!(r.reloaded, ["p.rego"]);
        assert!(
            p.evaluate(&signal(5000.0), ctx(&v)).allow,
            "new version in force"
        );
        assert_eq!(set.reload().unchanged, ["p.rego"]);
    }

    /// A file that iterates over what the tenant sends: a large `n` would
    /// hold its engine (and, before the limit, a runtime worker) for seconds.
    const SIZED_BY_INPUT: &str = r#"package sized
pairs := [1 | some x in numbers.range(1, input.signal.payload.n); some y in numbers.range(1, input.signal.payload.n)]
decision := {"allow": count(pairs) >= 0}
"#;

    #[test]
    fn an_evaluation_past_its_time_limit_denies_and_the_next_one_decides() {
        let limit = Duration::from_millis(20);
        let p = RegoPolicy::from_source("sized.rego", SIZED_BY_INPUT, limit).unwrap();
        let v = BTreeMap::new();
        let sized = |n: u64| {
            let mut s = signal(1.0);
            s.payload = json!({"n": n}).as_object().cloned().unwrap().into();
            s
        };
        assert!(p.evaluate(&sized(100), ctx(&v)).allow);
        let started = std::time::Instant::now();
        let out = p.evaluate(&sized(100_000), ctx(&v));
        assert!(!out.allow, "{out:?}");
        assert_eq!(
            out.violations,
            ["evaluation failed: took longer than its 20 ms limit"]
        );
        // Stopped by the limit, not run to the end (10^10 steps take hours).
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
        assert!(
            p.evaluate(&sized(100), ctx(&v)).allow,
            "the policy still decides"
        );
    }

    #[test]
    fn engines_deciding_with_one_file_at_once_each_get_a_prepared_engine() {
        let p = RegoPolicy::from_source("limits.rego", LIMITS, LIMIT).unwrap();
        let v = BTreeMap::new();
        std::thread::scope(|s| {
            for i in 0..4 {
                let (p, v) = (&p, &v);
                s.spawn(move || {
                    for _ in 0..50 {
                        let amount = if i % 2 == 0 { 10.0 } else { 5000.0 };
                        assert_eq!(p.evaluate(&signal(amount), ctx(v)).allow, i % 2 == 0);
                    }
                });
            }
        });
        let version = Arc::clone(&p.slot.read().unwrap());
        let idle = version.idle.lock().unwrap().len();
        assert!((1..=IDLE_ENGINES).contains(&idle), "{idle} kept for reuse");
    }

    /// On the node's runtime a long evaluation gives its worker away: with
    /// a single worker, another task runs while the policy is still busy.
    #[test]
    fn a_long_evaluation_leaves_the_runtime_worker_to_other_tasks() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let p = RegoPolicy::from_source("sized.rego", SIZED_BY_INPUT, Duration::from_millis(500))
            .unwrap();
        let other_ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, ran) = (other_ran.clone(), other_ran.clone());
        let (verdict, other_ran_meanwhile) = rt.block_on(async move {
            let slow = tokio::spawn(async move {
                let mut s = signal(1.0);
                s.payload = json!({"n": 100_000}).as_object().cloned().unwrap().into();
                let v = p.evaluate(&s, ctx(&BTreeMap::new()));
                // No await since the evaluation: only another thread could
                // have run the other task in the meantime.
                (v, ran.load(std::sync::atomic::Ordering::SeqCst))
            });
            tokio::spawn(async move { flag.store(true, std::sync::atomic::Ordering::SeqCst) });
            slow.await.unwrap()
        });
        assert!(other_ran_meanwhile);
        assert_eq!(
            verdict.violations,
            ["evaluation failed: took longer than its 500 ms limit"]
        );
    }
}
