//! Policies as code: pure, deterministic functions of the signal, the
//! policy's parameters and the engine's context. No I/O, no clock: the
//! engine passes the time in.

mod governance;
pub mod rego;

use std::collections::{BTreeMap, VecDeque};

use serde_json::Value;
use tai_core::signal::Signal;

/// A policy's verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub allow: bool,
    pub score: u32,
    pub violations: Vec<String>,
    /// The action the policy asks for (e.g. `freeze`, `revoke`, `rollback`);
    /// `None` leaves the signal's kind as the action.
    pub action: Option<String>,
}

/// What a policy may read of the engine besides the signal.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub now_ms: u64,
    /// Per customer, the times of their recent payments (this one not included).
    pub velocity: &'a BTreeMap<String, VecDeque<u64>>,
}

pub use governance::{
    ChangeManagement, ComplianceAudit, CostGovernance, DeploymentSafety, PermissionDrift,
};

#[derive(Debug, Clone, PartialEq)]
pub enum Policy {
    PaymentFraud(PaymentFraud),
    CostGovernance(CostGovernance),
    PermissionDrift(PermissionDrift),
    ChangeManagement(ChangeManagement),
    ComplianceAudit(ComplianceAudit),
    DeploymentSafety(DeploymentSafety),
    Rego(rego::RegoPolicy),
}

impl Policy {
    /// Builds a policy from its name and the SKU's `params.<name>` table.
    /// A parameter's error names it in full: `params.<policy>.<key> ...`
    /// (the SKU's `skus.<name>.` is added by the caller): each policy's
    /// errors start with the key.
    pub fn from_config(name: &str, params: Option<&Value>) -> Result<Policy, String> {
        let build: fn(Option<&Value>) -> Result<Policy, String> = match name {
            "payment_fraud" => |p| PaymentFraud::from_params(p).map(Policy::PaymentFraud),
            "cost_governance" => |p| CostGovernance::from_params(p).map(Policy::CostGovernance),
            "permission_drift" => |p| PermissionDrift::from_params(p).map(Policy::PermissionDrift),
            "change_management" => {
                |p| ChangeManagement::from_params(p).map(Policy::ChangeManagement)
            }
            "compliance_audit" => |p| ComplianceAudit::from_params(p).map(Policy::ComplianceAudit),
            "deployment_safety" => {
                |p| DeploymentSafety::from_params(p).map(Policy::DeploymentSafety)
            }
            other => return Err(format!("unknown policy {other:?}")),
        };
        if params.is_some_and(|p| !p.is_object()) {
            return Err(format!("params.{name} must be a table"));
        }
        build(params).map_err(|e| format!("params.{name}.{e}"))
    }

    pub fn name(&self) -> &str {
        match self {
            Policy::Rego(p) => &p.file,
            Policy::PaymentFraud(_) => "payment_fraud",
            Policy::CostGovernance(_) => "cost_governance",
            Policy::PermissionDrift(_) => "permission_drift",
            Policy::ChangeManagement(_) => "change_management",
            Policy::ComplianceAudit(_) => "compliance_audit",
            Policy::DeploymentSafety(_) => "deployment_safety",
        }
    }

    pub fn evaluate(&self, signal: &Signal, ctx: Context<'_>) -> Verdict {
        match self {
            Policy::PaymentFraud(p) => p.evaluate(signal, ctx),
            Policy::CostGovernance(p) => p.evaluate(&signal.payload),
            Policy::PermissionDrift(p) => p.evaluate(&signal.payload),
            Policy::ChangeManagement(p) => p.evaluate(&signal.payload),
            Policy::ComplianceAudit(p) => p.evaluate(&signal.payload),
            Policy::DeploymentSafety(p) => p.evaluate(&signal.payload),
            Policy::Rego(p) => p.evaluate(signal, ctx),
        }
    }

    /// The window within which the velocity context must be kept.
    pub fn velocity_window_ms(&self) -> Option<u64> {
        match self {
            Policy::PaymentFraud(p) => Some(p.velocity_window_secs * 1000),
            // Rego policies read `payments_last_minute`.
            Policy::Rego(_) => Some(60_000),
            _ => None,
        }
    }
}

/// SPEC §5: blacklist +100, more than `velocity_limit` payments a minute from
/// one customer +50, amount over `amount_threshold` +30, currency or geography
/// anomaly +20; deny at `deny_score` or more.
#[derive(Debug, Clone, PartialEq)]
pub struct PaymentFraud {
    pub blacklist: Vec<String>,
    pub velocity_limit: usize,
    pub velocity_window_secs: u64,
    pub amount_threshold: f64,
    pub currencies: Vec<String>,
    pub deny_score: u32,
}

impl Default for PaymentFraud {
    fn default() -> Self {
        PaymentFraud {
            blacklist: Vec::new(),
            velocity_limit: 5,
            velocity_window_secs: 60,
            amount_threshold: 5000.0,
            currencies: vec!["USD".into(), "EUR".into(), "GBP".into()],
            deny_score: 50,
        }
    }
}

/// `v` as an array of strings (a parameter, or a payload field); the error
/// names `key`.
fn strings(v: &Value, key: &str) -> Result<Vec<String>, String> {
    v.as_array()
        .ok_or_else(|| format!("{key} must be an array of strings"))?
        .iter()
        .map(|x| {
            x.as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("{key} must be an array of strings"))
        })
        .collect()
}

/// `v` as a whole number of 0 or more (a parameter); the error names `key`.
fn whole_number(v: &Value, key: &str) -> Result<usize, String> {
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| format!("{key} must be a whole number of 0 or more"))
}

impl PaymentFraud {
    fn from_params(params: Option<&Value>) -> Result<Self, String> {
        let mut p = PaymentFraud::default();
        let Some(params) = params else {
            return Ok(p);
        };
        let table = params.as_object().ok_or("must be a table")?;
        for (k, v) in table {
            match k.as_str() {
                "blacklist" => p.blacklist = strings(v, k)?,
                "currencies" => p.currencies = strings(v, k)?,
                "velocity_limit" => p.velocity_limit = whole_number(v, k)?,
                "velocity_window_secs" => {
                    p.velocity_window_secs = v
                        .as_u64()
                        .filter(|n| (1..=86_400).contains(n))
                        .ok_or("velocity_window_secs must be a whole number from 1 to 86400")?
                }
                "amount_threshold" => {
                    p.amount_threshold = v
                        .as_f64()
                        .filter(|n| *n >= 0.0)
                        .ok_or("amount_threshold must be a number of 0 or more")?
                }
                "deny_score" => {
                    p.deny_score = v
                        .as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .filter(|n| *n >= 1)
                        .ok_or("deny_score must be a whole number of 1 or more")?
                }
                other => {
                    return Err(format!(
                        "{other} is not a payment_fraud parameter (it takes blacklist, currencies, velocity_limit, velocity_window_secs, amount_threshold, deny_score)"
                    ))
                }
            }
        }
        Ok(p)
    }

    pub fn evaluate(&self, s: &Signal, ctx: Context<'_>) -> Verdict {
        let mut score = 0;
        let mut violations = Vec::new();
        // A field this policy scores, present with a value it cannot score,
        // denies the payment, saying which: unscored, an amount sent as a
        // string or a customer id as a number would pass every check.
        for what in Self::unscorable(s) {
            score += self.deny_score;
            violations.push(format!("{what} (deny)"));
        }
        let customer = s.payload.get("customer_id").and_then(Value::as_str);
        if let Some(c) = customer {
            if self.blacklist.iter().any(|b| b == c) {
                score += 100;
                violations.push(format!("customer {c} is blacklisted (+100)"));
            }
            let window = self.velocity_window_secs * 1000;
            let recent = ctx.velocity.get(c).map_or(0, |ts| {
                ts.iter()
                    .filter(|t| ctx.now_ms.saturating_sub(**t) < window)
                    .count()
            });
            // This payment counts too.
            if recent + 1 > self.velocity_limit {
                score += 50;
                violations.push(format!(
                    "{} payments from {c} within {}s, more than {} (+50)",
                    recent + 1,
                    self.velocity_window_secs,
                    self.velocity_limit
                ));
            }
        }
        if let Some(amount) = s.payload.get("amount").and_then(Value::as_f64) {
            if amount > self.amount_threshold {
                score += 30;
                violations.push(format!(
                    "amount {amount} over {} (+30)",
                    self.amount_threshold
                ));
            }
        }
        let currency = s.payload.get("currency").and_then(Value::as_str);
        let currency_odd = currency.is_some_and(|c| !self.currencies.iter().any(|x| x == c));
        let country = s.payload.get("country").and_then(Value::as_str);
        let card_country = s.payload.get("card_country").and_then(Value::as_str);
        let geo_odd = matches!((country, card_country), (Some(a), Some(b)) if a != b);
        if currency_odd || geo_odd {
            score += 20;
            let what = if currency_odd {
                format!(
                    "currency {} not in {:?}",
                    currency.unwrap_or_default(),
                    self.currencies
                )
            } else {
                format!(
                    "country {} differs from card country {}",
                    country.unwrap_or_default(),
                    card_country.unwrap_or_default()
                )
            };
            violations.push(format!("{what} (+20)"));
        }
        let allow = score < self.deny_score;
        Verdict {
            allow,
            score,
            violations: if allow { Vec::new() } else { violations },
            action: None,
        }
    }

    /// The scored fields present with values the checks cannot read: an
    /// `amount` that is not a number of zero or more, a `customer_id`,
    /// `currency`, `country` or `card_country` that is not a string.
    /// (A field left out is not scored.)
    fn unscorable(s: &Signal) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(v) = s.payload.get("amount") {
            if !v.as_f64().is_some_and(|a| a >= 0.0) {
                out.push(format!("amount {v} is not a number of 0 or more"));
            }
        }
        for key in ["customer_id", "currency", "country", "card_country"] {
            if let Some(v) = s.payload.get(key).filter(|v| !v.is_string()) {
                out.push(format!("{key} {v} is not a string"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn payment(payload: Value) -> Signal {
        Signal {
            id: "p".into(),
            tenant_id: "t".into(),
            sku_id: "payments".into(),
            kind: "payment".into(),
            critical: false,
            payload: payload.as_object().unwrap().clone().into(),
            received_at_ms: 0,
            trace_id: None,
            traceparent: None,
        }
    }

    #[test]
    fn thresholds_score_as_specified() {
        let p = PaymentFraud {
            blacklist: vec!["bad".into()],
            ..PaymentFraud::default()
        };
        let empty = BTreeMap::new();
        let ctx = Context {
            now_ms: 100_000,
            velocity: &empty,
        };
        let cases = [
            (
                json!({"amount": 10.0, "currency": "USD", "customer_id": "c"}),
                0,
                true,
            ),
            (json!({"amount": 5000.0, "currency": "USD"}), 0, true),
            (json!({"amount": 5000.01, "currency": "USD"}), 30, true),
            (json!({"amount": 10, "currency": "XYZ"}), 20, true),
            (json!({"amount": 6000, "currency": "XYZ"}), 50, false),
            (
                json!({"amount": 10, "country": "US", "card_country": "FR"}),
                20,
                true,
            ),
            (json!({"amount": 10, "customer_id": "bad"}), 100, false),
            // Present, and not what the checks read: denied, not unscored.
            (json!({"amount": "9000", "currency": "USD"}), 50, false),
            (json!({"amount": -5, "currency": "USD"}), 50, false),
            (json!({"amount": null}), 50, false),
            (json!({"amount": 1, "customer_id": 7}), 50, false),
            (json!({"amount": 1, "currency": ["USD"]}), 50, false),
            (
                json!({"amount": 1, "country": 1, "card_country": 2}),
                100,
                false,
            ),
            // Left out: not scored.
            (json!({}), 0, true),
        ];
        for (payload, score, allow) in cases {
            let v = p.evaluate(&payment(payload.clone()), ctx);
            assert_eq!((v.score, v.allow), (score, allow), "{payload}");
            assert_eq!(v.violations.is_empty(), allow, "{payload}");
        }
    }

    #[test]
    fn an_unscorable_field_is_named_in_the_denial() {
        let p = PaymentFraud {
            blacklist: vec!["7".into()],
            ..PaymentFraud::default()
        };
        let empty = BTreeMap::new();
        let ctx = Context {
            now_ms: 0,
            velocity: &empty,
        };
        let v = p.evaluate(
            &payment(json!({"amount": "9000", "customer_id": 7, "currency": "USD"})),
            ctx,
        );
        assert_eq!(
            v.violations,
            [
                "amount \"9000\" is not a number of 0 or more (deny)",
                "customer_id 7 is not a string (deny)"
            ]
        );
    }

    #[test]
    fn the_sixth_payment_within_a_minute_is_denied() {
        let p = PaymentFraud::default();
        let now = 1_000_000;
        let mut velocity = BTreeMap::new();
        velocity.insert(
            "c".to_string(),
            VecDeque::from(vec![now - 50_000, now - 40_000, now - 30_000, now - 20_000]),
        );
        let s = payment(json!({"amount": 1, "customer_id": "c"}));
        assert!(
            p.evaluate(
                &s,
                Context {
                    now_ms: now,
                    velocity: &velocity
                }
            )
            .allow,
            "fifth"
        );
        velocity.get_mut("c").unwrap().push_back(now - 10_000);
        let v = p.evaluate(
            &s,
            Context {
                now_ms: now,
                velocity: &velocity,
            },
        );
        assert!(!v.allow, "sixth");
        assert_eq!(v.score, 50);
        // Older than the window no longer counts.
        assert!(
            p.evaluate(
                &s,
                Context {
                    now_ms: now + 55_000,
                    velocity: &velocity
                }
            )
            .allow
        );
    }

    #[test]
    fn params_are_checked() {
        let ok = Policy::from_config(
            "payment_fraud",
            Some(&json!({"amount_threshold": 10, "blacklist": ["x"]})),
        )
        .unwrap();
        assert_eq!(ok.name(), "payment_fraud");
        // Each refusal names the parameter in full (under the SKU's
        // `skus.<name>.`, which the caller adds) and what it takes.
        let err = |name: &str, params: Value| Policy::from_config(name, Some(&params)).unwrap_err();
        let cases = [
            ("payment_fraud", json!({"amount_treshold": 10}), "params.payment_fraud.amount_treshold is not a payment_fraud parameter (it takes blacklist, currencies, velocity_limit, velocity_window_secs, amount_threshold, deny_score)"),
            ("payment_fraud", json!({"blacklist": "x"}), "params.payment_fraud.blacklist must be an array of strings"),
            ("payment_fraud", json!({"amount_threshold": -1}), "params.payment_fraud.amount_threshold must be a number of 0 or more"),
            ("payment_fraud", json!({"deny_score": 0}), "params.payment_fraud.deny_score must be a whole number of 1 or more"),
            ("payment_fraud", json!({"velocity_window_secs": 0}), "params.payment_fraud.velocity_window_secs must be a whole number from 1 to 86400"),
            ("payment_fraud", json!(7), "params.payment_fraud must be a table"),
            ("change_management", json!({"window_start": 25}), "params.change_management.window_start must be a number from 0 to 24"),
            ("change_management", json!({"window_start": 9, "window_end": 9}), "params.change_management.window_end must differ from window_start (9): the window would hold no hour"),
            ("change_management", json!({"window": 9}), "params.change_management.window is not a change_management parameter (it takes window_start, window_end, required_approvals)"),
            ("permission_drift", json!({"max_drift": -1}), "params.permission_drift.max_drift must be a whole number of 0 or more"),
            ("permission_drift", json!({"max_drift": 1.5}), "params.permission_drift.max_drift must be a whole number of 0 or more"),
            ("cost_governance", json!({"freeze_ratio": "high"}), "params.cost_governance.freeze_ratio must be a number of 0 or more"),
            ("deployment_safety", json!({"max_error_rate": 5}), "params.deployment_safety.max_error_rate must be a number from 0 to 1"),
            ("compliance_audit", json!({"required_controls": [1]}), "params.compliance_audit.required_controls must be an array of strings"),
        ];
        for (name, params, message) in cases {
            assert_eq!(err(name, params.clone()), message, "{name} {params}");
        }
        assert_eq!(
            Policy::from_config("astrology", None).unwrap_err(),
            "unknown policy \"astrology\""
        );
    }
}
