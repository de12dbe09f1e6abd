//! The seeds' reference systems, shipped as `config/examples/*.toml`, run
//! as shipped (only ports, data dir and the webhook URLs are overridden).

use reqwest::Method;
use serde_json::{json, Value};
use tai_tests::*;

fn example(name: &str) -> String {
    std::fs::read_to_string(workspace_root().join(format!("config/examples/{name}.toml")))
        .expect("example config")
}

async fn send(c: &Client, sku: &str, kind: &str, id: &str, payload: Value) {
    let a = c
        .post(&signal(&c.tenant, sku, kind, id, payload))
        .await
        .unwrap();
    assert_eq!(a.status, 202, "{}", a.body);
}

async fn entitle(c: &Client, sku: &str) {
    c.entitle(sku, &format!("ent-{sku}")).await;
}

async fn expect(c: &Client, id: &str, status: &str, reason: Option<&str>) -> Value {
    let s = c.decided(id).await;
    assert_eq!(s["status"], status, "{id}: {s}");
    if let Some(r) = reason {
        let got = s["reason"].as_str().unwrap_or_default();
        assert!(got.contains(r), "{id}: reason {got:?} lacks {r:?}");
    }
    s
}

#[tokio::test]
async fn payments_charges_through_the_gateway_and_denies_fraud_velocity_and_limits() {
    let gw = Gateway::start().await;
    let mut node = Node::start_with(
        &example("payments"),
        &[("TAI_EXECUTORS__GATEWAY__URL", gw.url.as_str())],
    );
    let mut c = Client::new(&node, "demo", "demo-secret");
    entitle(&c, "payments").await;
    let pay = |amount: f64, customer: &str| json!({"amount": amount, "currency": "USD", "customer_id": customer});
    send(&c, "payments", "payment", "p-ok", pay(99.5, "cust_1")).await;
    expect(&c, "p-ok", "completed", None).await;
    let charged: Value = serde_json::from_slice(&gw.hits()[0].body).unwrap();
    assert_eq!(charged["signal_id"], "p-ok");
    assert_eq!(charged["payload"]["amount"], 99.5);

    send(
        &c,
        "payments",
        "payment",
        "p-black",
        pay(10.0, "cust_blocked"),
    )
    .await;
    expect(
        &c,
        "p-black",
        "denied",
        Some("payment_fraud: customer cust_blocked is blacklisted"),
    )
    .await;
    // An amount sent as a string, a customer id as a number: not scored
    // as nothing, denied, saying which.
    let typed = json!({"amount": "9000", "currency": "USD", "customer_id": 42});
    send(&c, "payments", "payment", "p-typed", typed).await;
    expect(
        &c,
        "p-typed",
        "denied",
        Some("payment_fraud: amount \"9000\" is not a number of 0 or more (deny); payment_fraud: customer_id 42 is not a string (deny)"),
    )
    .await;
    // The Rego ceiling reads numbers only (a string orders after them all).
    let status = c.status("p-typed").await.body;
    assert!(
        !status["reason"].as_str().unwrap().contains("ceiling"),
        "{status}"
    );
    send(
        &c,
        "payments",
        "payment",
        "p-ceiling",
        pay(12000.0, "cust_2"),
    )
    .await;
    expect(
        &c,
        "p-ceiling",
        "denied",
        Some("config/policies/payment_limits.rego: amount 12000 over the 10000 ceiling"),
    )
    .await;

    // Fraud velocity: the sixth payment within a minute from one customer is
    // denied, across a kill -9 (each customer's window is stored with the
    // decision that changed it).
    for i in 1..=5 {
        if i == 4 {
            node.restart();
            c = Client::new(&node, "demo", "demo-secret");
        }
        let id = format!("v-{i}");
        send(&c, "payments", "payment", &id, pay(5.0, "cust_fast")).await;
        expect(&c, &id, "completed", None).await;
    }
    send(&c, "payments", "payment", "v-6", pay(5.0, "cust_fast")).await;
    expect(
        &c,
        "v-6",
        "denied",
        Some("6 payments from cust_fast within 60s"),
    )
    .await;
    assert_eq!(gw.hits().len(), 6, "denied payments are not charged");
    let (_, breakers) = node.admin(Method::GET, "/admin/breakers").await;
    assert_eq!(breakers[0]["name"], "gateway");
    assert_eq!(breakers[0]["calls"], 2, "calls since the restart");
}

#[tokio::test]
async fn governance_runs_the_four_blueprint_policies() {
    let node = Node::start_with(&example("governance"), &[]);
    let c = Client::new(&node, "demo", "demo-secret");
    let cases = [
        (
            "cost",
            json!({"spend": 80, "budget": 100}),
            json!({"spend": 130, "budget": 100}),
            "requested action: freeze",
        ),
        (
            "permissions",
            json!({"baseline": ["read"], "granted": ["read"]}),
            json!({"baseline": ["read"], "granted": ["read", "admin"]}),
            "requested action: revoke",
        ),
        (
            "changes",
            json!({"hour": 10, "approvals": ["ana", "bo"]}),
            json!({"hour": 22, "approvals": ["ana"]}),
            "requested action: deny",
        ),
        (
            "compliance",
            json!({"controls": ["encryption_at_rest", "mfa", "audit_logging"]}),
            json!({"controls": ["mfa"]}),
            "requested action: remediate",
        ),
    ];
    for (sku, good, bad, remedy) in cases {
        entitle(&c, sku).await;
        let (ok, no) = (format!("{sku}-ok"), format!("{sku}-no"));
        send(&c, sku, "check", &ok, good).await;
        send(&c, sku, "check", &no, bad).await;
        expect(&c, &ok, "completed", None).await;
        expect(&c, &no, "denied", Some(remedy)).await;
    }
    let (_, verify) = node.admin(Method::GET, "/admin/receipts/verify").await;
    assert_eq!(verify["ok"], true, "{verify}");
}

#[tokio::test]
async fn deployments_roll_out_stage_by_stage_and_roll_back_a_bad_canary() {
    let hook = Gateway::start().await;
    let node = Node::start_with(
        &example("deployments"),
        &[
            ("TAI_EXECUTORS__DEPLOYER__URL", hook.url.as_str()),
            (
                "TAI_EXECUTORS__DEPLOYER__HEALTH_URL",
                hook.health_url.as_str(),
            ),
        ],
    );
    let c = Client::new(&node, "demo", "demo-secret");
    entitle(&c, "deployments").await;
    let deploy = |error_rate: f64, p99: f64| {
        json!({"service": "api", "image": "api:1.2", "image_exists": true, "capacity_ok": true,
               "rollback_plan": true, "error_rate": error_rate, "p99_ms": p99})
    };
    let stages = |hits: &[GatewayHit]| -> Vec<String> {
        hits.iter()
            .map(|h| {
                let b: Value = serde_json::from_slice(&h.body).unwrap();
                format!(
                    "{}:{}",
                    b["region"].as_str().unwrap(),
                    b["stage"].as_str().unwrap()
                )
            })
            .collect()
    };

    // Healthy: every stage in every region, in order.
    send(&c, "deployments", "deploy", "d-ok", deploy(0.01, 200.0)).await;
    expect(&c, "d-ok", "completed", None).await;
    assert_eq!(
        stages(&hook.hits()),
        [
            "eu-west:canary",
            "eu-west:staging",
            "eu-west:prod",
            "us-east:canary",
            "us-east:staging",
            "us-east:prod"
        ]
    );
    let receipts = node.all_receipts().await;
    let steps: Vec<&Value> = receipts
        .iter()
        .filter(|r| r["signal_id"] == "d-ok" && r["kind"] == "rollout_stage")
        .collect();
    assert_eq!(steps.len(), 6);
    assert!(steps[0]["reason"]
        .as_str()
        .unwrap()
        .starts_with("canary 5% in eu-west healthy"));

    // An unsafe change never starts.
    send(
        &c,
        "deployments",
        "deploy",
        "d-unsafe",
        deploy(0.12, 1500.0),
    )
    .await;
    expect(&c, "d-unsafe", "denied", Some("requested action: rollback")).await;
    assert_eq!(hook.hits().len(), 6);

    // A canary whose health goes bad (error rate over 5 %) is rolled back.
    hook.set_health("canary", json!({"error_rate": 0.09, "p99_ms": 300}));
    send(&c, "deployments", "deploy", "d-bad", deploy(0.01, 200.0)).await;
    expect(
        &c,
        "d-bad",
        "failed",
        Some("rolled back: canary 5% in eu-west unhealthy: error rate 0.090 over 0.050"),
    )
    .await;
    assert_eq!(
        stages(&hook.hits()[6..]),
        ["eu-west:canary", "eu-west:rollback"]
    );
    let receipts = node.all_receipts().await;
    let kinds: Vec<&str> = receipts
        .iter()
        .filter(|r| r["signal_id"] == "d-bad")
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "action_generated",
            "rollout_stage",
            "rollout_rollback",
            "action_failed"
        ]
    );

    // Health answered with a redirect (or any non-2xx) is unknown health,
    // even when its body reads as healthy: rolled back.
    hook.set_health_answer("canary", 302, json!({"error_rate": 0.0, "p99_ms": 1}));
    send(&c, "deployments", "deploy", "d-moved", deploy(0.01, 200.0)).await;
    expect(
        &c,
        "d-moved",
        "failed",
        Some("rolled back: canary 5% in eu-west unhealthy: health unknown: health check answered 302 Found"),
    )
    .await;
    // A health answer past 64 KiB is not read on, however healthy its
    // start: unknown health, rolled back.
    let long = json!({"error_rate": 0.0, "p99_ms": 1, "pad": "x".repeat(100_000)});
    hook.set_health("canary", long);
    send(&c, "deployments", "deploy", "d-long", deploy(0.01, 200.0)).await;
    expect(
        &c,
        "d-long",
        "failed",
        Some("rolled back: canary 5% in eu-west unhealthy: health unknown: health answer over 65536 bytes"),
    )
    .await;
    // Bad health is not the deploy hook failing: the breaker stays closed.
    let (_, breakers) = node.admin(Method::GET, "/admin/breakers").await;
    assert_eq!(breakers[0]["state"], "closed", "{breakers}");
}
