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
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

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

/// One compiled file: the engine (cloned per evaluation) and its rule path.
#[derive(Clone)]
struct Compiled {
    engine: regorus::Engine,
    rule: String,
    source: String,
}

fn compile(file: &str, source: String) -> Result<Compiled, PolicyError> {
    let mut engine = regorus::Engine::new();
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
        engine,
        rule,
        source,
    })
}

/// A Rego policy as a SKU holds it: a slot that a reload refills in place,
/// so every engine sees the new version at its next decision.
#[derive(Clone)]
pub struct RegoPolicy {
    pub file: String,
    slot: Arc<RwLock<Compiled>>,
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
    pub fn from_source(file: &str, source: &str) -> Result<RegoPolicy, PolicyError> {
        Ok(RegoPolicy {
            file: file.to_string(),
            slot: Arc::new(RwLock::new(compile(file, source.to_string())?)),
        })
    }

    pub fn evaluate(&self, signal: &Signal, ctx: Context<'_>) -> Verdict {
        // One prepared engine per file, used in turn: cloning it per
        // evaluation cost more than the evaluation itself.
        let mut c = self.slot.write().expect("rego slot");
        let rule = c.rule.clone();
        let engine = &mut c.engine;
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
        let out = engine
            .eval_rule(rule)
            .map_err(|e| e.to_string())
            .and_then(|v| v.to_json_str().map_err(|e| e.to_string()))
            .and_then(|s| serde_json::from_str::<Value>(&s).map_err(|e| e.to_string()));
        match out {
            Ok(doc) => verdict(&self.file, &doc),
            Err(e) => deny(format!("{}: evaluation failed: {e}", self.file)),
        }
    }
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
fn verdict(file: &str, doc: &Value) -> Verdict {
    let Some(allow) = doc.get("allow").and_then(Value::as_bool) else {
        return deny(format!(
            "{file}: decision has no boolean `allow` (got {doc})"
        ));
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
#[derive(Clone, Default)]
pub struct RegoSet {
    base: PathBuf,
    files: Arc<RwLock<BTreeMap<String, RegoPolicy>>>,
}

impl std::fmt::Debug for RegoSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegoSet").finish_non_exhaustive()
    }
}

impl RegoSet {
    /// Relative paths resolve against `base` (the working directory the
    /// node was started from, like every other path in its config).
    pub fn new(base: &Path) -> RegoSet {
        RegoSet {
            base: base.to_path_buf(),
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
        let policy = RegoPolicy {
            file: file.to_string(),
            slot: Arc::new(RwLock::new(compile(file, self.read(file)?)?)),
        };
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
            match compile(&file, source) {
                Ok(c) => {
                    *policy.slot.write().expect("rego slot") = c;
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
        let p = RegoPolicy::from_source("limits.rego", LIMITS).unwrap();
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
        let e = RegoPolicy::from_source("bad.rego", "package bad\n\ndecision := {\"allow\": }\n")
            .unwrap_err();
        assert_eq!(e.file, "bad.rego");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(!e.message.is_empty());
        let e = RegoPolicy::from_source("none.rego", "package none\nallow := true\n").unwrap_err();
        assert!(e.message.contains("decision"), "{e}");
    }

    #[test]
    fn the_shipped_example_compiles_and_decides() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let set = RegoSet::new(&root);
        let p = set.load("config/policies/payment_limits.rego").unwrap();
        let v = BTreeMap::new();
        assert!(p.evaluate(&signal(9000.0), ctx(&v)).allow);
        let d = p.evaluate(&signal(12000.0), ctx(&v));
        assert!(!d.allow);
        assert_eq!(d.violations, ["amount 12000 over the 10000 ceiling"]);
    }

    #[test]
    fn a_malformed_decision_denies() {
        let p =
            RegoPolicy::from_source("m.rego", "package m\ndecision := {\"ok\": true}\n").unwrap();
        let v = BTreeMap::new();
        let out = p.evaluate(&signal(1.0), ctx(&v));
        assert!(!out.allow);
        assert!(out.violations[0].contains("no boolean `allow`"), "{out:?}");
    }

    #[test]
    fn a_broken_file_on_reload_keeps_the_working_version() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.rego"), LIMITS).unwrap();
        let set = RegoSet::new(dir.path());
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
}
