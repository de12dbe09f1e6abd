//! Policy evaluation cost per signal: the built-in policies and a Rego
//! policy (the shipped `config/policies/payment_limits.rego`).
//!
//! cargo bench -p tai-jidoka --bench policies

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use serde_json::json;
use tai_core::signal::Signal;
use tai_jidoka::policy::{Context, Policy};
use tai_jidoka::RegoSet;

fn signal(payload: serde_json::Value) -> Signal {
    Signal {
        id: "sig_1".into(),
        tenant_id: "acme".into(),
        sku_id: "payments".into(),
        kind: "payment".into(),
        critical: false,
        payload: payload.as_object().cloned().unwrap_or_default().into(),
        received_at_ms: 0,
        trace_id: None,
        traceparent: None,
    }
}

fn policies(c: &mut Criterion) {
    let mut velocity = BTreeMap::new();
    velocity.insert("cust_1".to_string(), VecDeque::from([1_000, 2_000, 3_000]));
    let ctx = Context {
        now_ms: 10_000,
        velocity: &velocity,
    };
    let payment = signal(
        json!({"amount": 120.5, "currency": "USD", "customer_id": "cust_1",
                                "country": "DE", "card_country": "DE"}),
    );
    let cases: Vec<(&str, Policy, Signal)> = vec![
        (
            "payment_fraud",
            Policy::from_config("payment_fraud", None).unwrap(),
            payment.clone(),
        ),
        (
            "cost_governance",
            Policy::from_config("cost_governance", None).unwrap(),
            signal(json!({"spend": 80, "budget": 100, "baseline_spend": 70})),
        ),
        (
            "permission_drift",
            Policy::from_config("permission_drift", None).unwrap(),
            signal(json!({"baseline": ["read", "write"], "granted": ["read", "write", "admin"]})),
        ),
        (
            "change_management",
            Policy::from_config("change_management", None).unwrap(),
            signal(json!({"hour": 10, "approvals": ["ana", "bo"]})),
        ),
        (
            "compliance_audit",
            Policy::from_config("compliance_audit", None).unwrap(),
            signal(json!({"controls": ["encryption_at_rest", "mfa", "audit_logging"]})),
        ),
        (
            "deployment_safety",
            Policy::from_config("deployment_safety", None).unwrap(),
            signal(
                json!({"image_exists": true, "capacity_ok": true, "rollback_plan": true,
                          "error_rate": 0.01, "p99_ms": 200}),
            ),
        ),
    ];
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let rego = RegoSet::new(&root, std::time::Duration::from_millis(100))
        .load("config/policies/payment_limits.rego")
        .expect("shipped policy compiles");
    let rego = Policy::Rego(rego);
    let mut g = c.benchmark_group("policy_evaluate");
    for (name, p, s) in &cases {
        g.bench_function(*name, |b| {
            b.iter(|| black_box(p.evaluate(black_box(s), ctx)))
        });
    }
    g.bench_function("rego_payment_limits", |b| {
        b.iter(|| black_box(rego.evaluate(black_box(&payment), ctx)))
    });
    g.finish();
}

criterion_group!(benches, policies);
criterion_main!(benches);
