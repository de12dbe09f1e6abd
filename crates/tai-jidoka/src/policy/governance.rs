//! The blueprint's four governance policies and `deployment_safety`'s checks:
//! pure functions of the signal's payload and the policy's parameters.
//!
//! Each reads named payload fields; a field a policy needs but the signal
//! lacks is a violation (a decision must not pass for want of data), and
//! so is one present with a value of another type (a freeze sent as
//! `"yes"`, grants as a string): read as absent, it would pass unchecked.

use serde_json::{Map, Value};

use super::{strings, whole_number, Verdict};

fn num(payload: &Map<String, Value>, key: &str) -> Option<f64> {
    payload.get(key).and_then(Value::as_f64)
}

/// The strings of the array at `key` (none if it is absent); anything
/// else there adds a violation to `v`.
fn strs(payload: &Map<String, Value>, key: &str, v: &mut Vec<String>) -> Vec<String> {
    let Some(value) = payload.get(key) else {
        return Vec::new();
    };
    strings(value, key).unwrap_or_else(|e| {
        v.push(e);
        Vec::new()
    })
}

/// The optional number at `key`; present and not a number adds a violation.
fn opt_num(payload: &Map<String, Value>, key: &str, v: &mut Vec<String>) -> Option<f64> {
    let value = payload.get(key)?;
    let n = value.as_f64();
    if n.is_none() {
        v.push(format!("{key} must be a number"));
    }
    n
}

/// The number at `key` (else `default`), which must lie in `range`
/// (`what` says so in the error, e.g. "from 0 to 24").
fn param_f64(
    params: Option<&Value>,
    key: &str,
    default: f64,
    range: impl std::ops::RangeBounds<f64>,
    what: &str,
) -> Result<f64, String> {
    match params.and_then(|p| p.get(key)) {
        None => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|n| range.contains(n))
            .ok_or_else(|| format!("{key} must be a number {what}")),
    }
}

fn param_strs(params: Option<&Value>, key: &str) -> Result<Vec<String>, String> {
    params
        .and_then(|p| p.get(key))
        .map_or(Ok(Vec::new()), |v| strings(v, key))
}

fn check_keys(params: Option<&Value>, policy: &str, known: &[&str]) -> Result<(), String> {
    let Some(p) = params else { return Ok(()) };
    let table = p.as_object().ok_or("must be a table")?;
    for k in table.keys() {
        if !known.contains(&k.as_str()) {
            return Err(format!(
                "{k} is not a {policy} parameter (it takes {})",
                known.join(", ")
            ));
        }
    }
    Ok(())
}

fn verdict(violations: Vec<String>, action: &str) -> Verdict {
    Verdict {
        allow: violations.is_empty(),
        score: violations.len() as u32,
        violations,
        action: Some(action.to_string()),
    }
}

/// Spend against budget: over `freeze_ratio` × budget → deny (freeze);
/// over budget → allow with a scale-down action; spend over
/// `anomaly_ratio` × the usual spend → deny (anomaly).
#[derive(Debug, Clone, PartialEq)]
pub struct CostGovernance {
    pub freeze_ratio: f64,
    pub anomaly_ratio: f64,
}

impl CostGovernance {
    pub fn from_params(p: Option<&Value>) -> Result<Self, String> {
        check_keys(p, "cost_governance", &["freeze_ratio", "anomaly_ratio"])?;
        Ok(CostGovernance {
            freeze_ratio: param_f64(p, "freeze_ratio", 1.2, 0.0.., "of 0 or more")?,
            anomaly_ratio: param_f64(p, "anomaly_ratio", 3.0, 0.0.., "of 0 or more")?,
        })
    }

    pub fn evaluate(&self, payload: &Map<String, Value>) -> Verdict {
        let (Some(spend), Some(budget)) = (num(payload, "spend"), num(payload, "budget")) else {
            return verdict(vec!["spend and budget are required".into()], "notify");
        };
        let mut v = Vec::new();
        let usual = opt_num(payload, "baseline_spend", &mut v);
        if spend > budget * self.freeze_ratio {
            v.push(format!(
                "spend {spend} over {}x budget {budget}",
                self.freeze_ratio
            ));
        }
        if let Some(usual) = usual.filter(|u| *u > 0.0) {
            if spend > usual * self.anomaly_ratio {
                v.push(format!(
                    "spend {spend} is over {}x the usual {usual}",
                    self.anomaly_ratio
                ));
            }
        }
        let action = if !v.is_empty() {
            "freeze"
        } else if spend > budget {
            "scale_down"
        } else {
            "notify"
        };
        verdict(v, action)
    }
}

/// Granted permissions against a baseline: anything granted beyond it is
/// drift (deny, revoke); `max_drift` extra grants are tolerated with a notice.
#[derive(Debug, Clone, PartialEq)]
pub struct PermissionDrift {
    pub max_drift: usize,
}

impl PermissionDrift {
    pub fn from_params(p: Option<&Value>) -> Result<Self, String> {
        check_keys(p, "permission_drift", &["max_drift"])?;
        Ok(PermissionDrift {
            max_drift: match p.and_then(|p| p.get("max_drift")) {
                None => 0,
                Some(v) => whole_number(v, "max_drift")?,
            },
        })
    }

    pub fn evaluate(&self, payload: &Map<String, Value>) -> Verdict {
        let mut v = Vec::new();
        let baseline = strs(payload, "baseline", &mut v);
        let extra: Vec<String> = strs(payload, "granted", &mut v)
            .into_iter()
            .filter(|g| !baseline.contains(g))
            .collect();
        if extra.len() > self.max_drift {
            v.push(format!(
                "permissions beyond the baseline: {}",
                extra.join(", ")
            ));
        }
        let action = if v.is_empty() { "notify" } else { "revoke" };
        verdict(v, action)
    }
}

/// Changes only inside a window (`hour` of the change in `window_start..window_end`,
/// UTC), never during a freeze, and with at least `required_approvals`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeManagement {
    pub window_start: f64,
    pub window_end: f64,
    pub required_approvals: f64,
}

impl ChangeManagement {
    pub fn from_params(p: Option<&Value>) -> Result<Self, String> {
        check_keys(
            p,
            "change_management",
            &["window_start", "window_end", "required_approvals"],
        )?;
        let hour = |key, default| param_f64(p, key, default, 0.0..=24.0, "from 0 to 24");
        let (window_start, window_end) = (hour("window_start", 0.0)?, hour("window_end", 24.0)?);
        if window_start == window_end {
            return Err(format!(
                "window_end must differ from window_start ({window_start}): the window would hold no hour"
            ));
        }
        Ok(ChangeManagement {
            window_start,
            window_end,
            required_approvals: param_f64(p, "required_approvals", 1.0, 0.0.., "of 0 or more")?,
        })
    }

    /// Whether `hour` is in the window: `window_start` up to `window_end`,
    /// across midnight when the start is the later (22 to 6: 22:00-06:00).
    fn in_window(&self, hour: f64) -> bool {
        if self.window_start < self.window_end {
            hour >= self.window_start && hour < self.window_end
        } else {
            hour >= self.window_start || hour < self.window_end
        }
    }

    pub fn evaluate(&self, payload: &Map<String, Value>) -> Verdict {
        let mut v = Vec::new();
        match num(payload, "hour") {
            Some(h) if self.in_window(h) => {}
            Some(h) => v.push(format!(
                "hour {h} outside the change window {}-{}",
                self.window_start, self.window_end
            )),
            None => v.push("hour of the change is required".into()),
        }
        match payload.get("freeze") {
            None | Some(Value::Bool(false)) => {}
            Some(Value::Bool(true)) => v.push("a change freeze is in force".into()),
            Some(_) => v.push("freeze must be true or false".into()),
        }
        let approvals = strs(payload, "approvals", &mut v).len() as f64;
        if approvals < self.required_approvals {
            v.push(format!(
                "{approvals} approvals, {} required",
                self.required_approvals
            ));
        }
        let action = if v.is_empty() { "approve" } else { "deny" };
        verdict(v, action)
    }
}

/// Every required control must be present: a missing one is a finding
/// (deny, remediate).
#[derive(Debug, Clone, PartialEq)]
pub struct ComplianceAudit {
    pub required_controls: Vec<String>,
}

impl ComplianceAudit {
    pub fn from_params(p: Option<&Value>) -> Result<Self, String> {
        check_keys(p, "compliance_audit", &["required_controls"])?;
        let mut required_controls = param_strs(p, "required_controls")?;
        if required_controls.is_empty() {
            required_controls = vec![
                "encryption_at_rest".into(),
                "mfa".into(),
                "audit_logging".into(),
            ];
        }
        Ok(ComplianceAudit { required_controls })
    }

    pub fn evaluate(&self, payload: &Map<String, Value>) -> Verdict {
        let mut v = Vec::new();
        let present = strs(payload, "controls", &mut v);
        let missing: Vec<&str> = self
            .required_controls
            .iter()
            .filter(|c| !present.contains(c))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            v.push(format!("missing controls: {}", missing.join(", ")));
        }
        let action = if v.is_empty() {
            "record_finding"
        } else {
            "remediate"
        };
        verdict(v, action)
    }
}

/// Before a deployment: the image exists, there is capacity, there is a
/// rollback plan, and the service is healthy (error rate under
/// `max_error_rate`, p99 under `max_p99_ms`).
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentSafety {
    pub max_error_rate: f64,
    pub max_p99_ms: f64,
}

impl DeploymentSafety {
    pub fn from_params(p: Option<&Value>) -> Result<Self, String> {
        check_keys(p, "deployment_safety", &["max_error_rate", "max_p99_ms"])?;
        Ok(DeploymentSafety {
            max_error_rate: param_f64(p, "max_error_rate", 0.05, 0.0..=1.0, "from 0 to 1")?,
            max_p99_ms: param_f64(p, "max_p99_ms", 1000.0, 0.0.., "of 0 or more")?,
        })
    }

    pub fn evaluate(&self, payload: &Map<String, Value>) -> Verdict {
        let mut v = Vec::new();
        let flag = |k: &str| payload.get(k).and_then(Value::as_bool) == Some(true);
        if !flag("image_exists") {
            v.push("image does not exist".to_string());
        }
        if !flag("capacity_ok") {
            v.push("not enough capacity".to_string());
        }
        if !flag("rollback_plan") {
            v.push("no rollback plan".to_string());
        }
        match num(payload, "error_rate") {
            Some(e) if e < self.max_error_rate => {}
            Some(e) => v.push(format!("error rate {e} not under {}", self.max_error_rate)),
            None => v.push("error_rate is required".into()),
        }
        match num(payload, "p99_ms") {
            Some(p) if p < self.max_p99_ms => {}
            Some(p) => v.push(format!("p99 {p} ms not under {} ms", self.max_p99_ms)),
            None => v.push("p99_ms is required".into()),
        }
        let action = if v.is_empty() { "deploy" } else { "rollback" };
        verdict(v, action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn cost_governance_thresholds() {
        let c = CostGovernance::from_params(None).unwrap();
        let cases = [
            (json!({"spend": 80, "budget": 100}), true, "notify"),
            (json!({"spend": 110, "budget": 100}), true, "scale_down"),
            (json!({"spend": 120, "budget": 100}), true, "scale_down"),
            (json!({"spend": 121, "budget": 100}), false, "freeze"),
            (
                json!({"spend": 90, "budget": 100, "baseline_spend": 30}),
                true,
                "notify",
            ),
            (
                json!({"spend": 91, "budget": 100, "baseline_spend": 30}),
                false,
                "freeze",
            ),
            (json!({"spend": 10}), false, "notify"),
        ];
        for (payload, allow, action) in cases {
            let v = c.evaluate(&p(payload.clone()));
            assert_eq!(
                (v.allow, v.action.as_deref()),
                (allow, Some(action)),
                "{payload}"
            );
        }
        assert!(CostGovernance::from_params(Some(&json!({"freeze": 1}))).is_err());
    }

    /// A field present with a value of another type is a violation named
    /// as such: read as absent, each of these passed before.
    #[test]
    fn a_field_of_the_wrong_type_is_a_violation_not_an_absence() {
        let cases: [(Verdict, &str); 6] = [
            (
                CostGovernance::from_params(None).unwrap().evaluate(&p(
                    json!({"spend": 90, "budget": 100, "baseline_spend": "30"}),
                )),
                "baseline_spend must be a number",
            ),
            (
                PermissionDrift::from_params(None)
                    .unwrap()
                    .evaluate(&p(json!({"baseline": ["read"], "granted": "admin"}))),
                "granted must be an array of strings",
            ),
            (
                PermissionDrift::from_params(None).unwrap().evaluate(&p(
                    json!({"baseline": ["read"], "granted": ["read", {"role": "admin"}]}),
                )),
                "granted must be an array of strings",
            ),
            (
                ChangeManagement::from_params(None)
                    .unwrap()
                    .evaluate(&p(json!({"hour": 10, "approvals": ["a"], "freeze": "yes"}))),
                "freeze must be true or false",
            ),
            (
                ChangeManagement::from_params(None)
                    .unwrap()
                    .evaluate(&p(json!({"hour": 10, "approvals": "a"}))),
                "approvals must be an array of strings",
            ),
            (
                ComplianceAudit::from_params(None).unwrap().evaluate(&p(
                    json!({"controls": ["encryption_at_rest", "mfa", "audit_logging", 7]}),
                )),
                "controls must be an array of strings",
            ),
        ];
        for (v, violation) in cases {
            assert!(!v.allow, "{violation}: {v:?}");
            assert!(
                v.violations.iter().any(|x| x == violation),
                "{violation}: {v:?}"
            );
        }
    }

    #[test]
    fn permission_drift_thresholds() {
        let strict = PermissionDrift::from_params(None).unwrap();
        let lax = PermissionDrift::from_params(Some(&json!({"max_drift": 1}))).unwrap();
        let same = p(json!({"baseline": ["read", "write"], "granted": ["read"]}));
        let one = p(json!({"baseline": ["read"], "granted": ["read", "admin"]}));
        let two = p(json!({"baseline": ["read"], "granted": ["admin", "root"]}));
        assert!(strict.evaluate(&same).allow);
        let v = strict.evaluate(&one);
        assert!(
            !v.allow && v.violations[0].contains("admin") && v.action.as_deref() == Some("revoke")
        );
        assert!(lax.evaluate(&one).allow);
        assert!(!lax.evaluate(&two).allow);
    }

    #[test]
    fn change_management_thresholds() {
        let c = ChangeManagement::from_params(Some(
            &json!({"window_start": 9, "window_end": 17, "required_approvals": 2}),
        ))
        .unwrap();
        let ok = p(json!({"hour": 9, "approvals": ["a", "b"]}));
        assert_eq!(c.evaluate(&ok).action.as_deref(), Some("approve"));
        for bad in [
            json!({"hour": 17, "approvals": ["a", "b"]}),
            json!({"hour": 8.5, "approvals": ["a", "b"]}),
            json!({"hour": 10, "approvals": ["a"]}),
            json!({"hour": 10, "approvals": ["a", "b"], "freeze": true}),
            json!({"approvals": ["a", "b"]}),
        ] {
            let v = c.evaluate(&p(bad.clone()));
            assert!(!v.allow, "{bad}");
            assert_eq!(v.action.as_deref(), Some("deny"));
        }
    }

    /// A window whose start is the later hour runs across midnight.
    #[test]
    fn an_overnight_change_window_wraps_midnight() {
        let c = ChangeManagement::from_params(Some(
            &json!({"window_start": 22, "window_end": 6, "required_approvals": 0}),
        ))
        .unwrap();
        for (hour, inside) in [
            (22.0, true),
            (23.5, true),
            (0.0, true),
            (5.9, true),
            (6.0, false),
            (12.0, false),
            (21.9, false),
        ] {
            let v = c.evaluate(&p(json!({"hour": hour, "approvals": []})));
            assert_eq!(v.allow, inside, "hour {hour}: {v:?}");
        }
    }

    #[test]
    fn compliance_audit_thresholds() {
        let c =
            ComplianceAudit::from_params(Some(&json!({"required_controls": ["mfa", "backups"]})))
                .unwrap();
        assert!(
            c.evaluate(&p(json!({"controls": ["mfa", "backups", "extra"]})))
                .allow
        );
        let v = c.evaluate(&p(json!({"controls": ["mfa"]})));
        assert_eq!((v.allow, v.action.as_deref()), (false, Some("remediate")));
        assert!(v.violations[0].contains("backups"));
        let default = ComplianceAudit::from_params(None).unwrap();
        assert_eq!(default.required_controls.len(), 3);
    }

    #[test]
    fn deployment_safety_thresholds() {
        let d = DeploymentSafety::from_params(None).unwrap();
        let good = json!({"image_exists": true, "capacity_ok": true, "rollback_plan": true, "error_rate": 0.049, "p99_ms": 999});
        assert_eq!(
            d.evaluate(&p(good.clone())).action.as_deref(),
            Some("deploy")
        );
        for (key, value) in [
            ("image_exists", json!(false)),
            ("capacity_ok", json!(false)),
            ("rollback_plan", json!(false)),
            ("error_rate", json!(0.05)),
            ("p99_ms", json!(1000)),
        ] {
            let mut bad = good.clone();
            bad[key] = value;
            let v = d.evaluate(&p(bad));
            assert!(!v.allow, "{key}");
            assert_eq!(v.action.as_deref(), Some("rollback"));
        }
    }
}
