//! `/metrics` on a live node (SPEC §9): the contract's names and labels, and
//! the exposition passes `promtool check metrics` (installed by scripts/test.sh).

use std::io::Write;
use std::process::{Command, Stdio};

use reqwest::Method;
use serde_json::{json, Value};
use tai_tests::*;

/// A payment of 5 USD on `payments`.
fn payment(tenant: &str, id: &str) -> Value {
    signal(
        tenant,
        "payments",
        "payment",
        id,
        json!({"amount": 5, "currency": "USD"}),
    )
}

#[tokio::test]
async fn metrics_name_the_contract_and_pass_promtool() {
    let node = Node::start_with(&test_config(""), &[("TAI_KAIZEN__TENANT_LABEL_CAP", "1")]);
    let acme = Client::new(&node, "acme", "acme-secret");
    let globex = Client::new(&node, "globex", "globex-secret");
    for c in [&acme, &globex] {
        let ent = signal(
            &c.tenant,
            "payments",
            "entitlement",
            "ent",
            json!({"active": true}),
        );
        assert_eq!(c.post(&ent).await.unwrap().status, 202);
        assert_eq!(c.post(&payment(&c.tenant, "p1")).await.unwrap().status, 202);
        c.decided("p1").await;
    }
    // One refused request, and a kill for a restart count.
    let bad = Client {
        secret: "wrong".into(),
        ..acme.clone()
    };
    assert_eq!(
        bad.post(&signal("acme", "payments", "payment", "x", json!({})))
            .await
            .unwrap()
            .status,
        401
    );
    // One refused for its size (413), answered while its body is read: counted too.
    let path = "/v1/signals";
    let big = oversized("acme");
    let now = unix_now();
    assert_eq!(
        acme.raw("POST", path, &big, &acme.headers(now, "POST", path, &big))
            .await
            .unwrap()
            .status,
        413
    );
    let (status, _) = node
        .admin(Method::POST, "/admin/actors/andon_sup/kill")
        .await;
    assert_eq!(status, 202);
    node.admin_until("/admin/tree", "andon_sup back", |t| {
        find(t, "andon_sup").is_some_and(|a| a["restarts"] == 1 && a["status"] == "running")
    })
    .await;

    // A status is final once the decision is committed; the queue hears
    // the acknowledgement just after, and sets its gauges then.
    node.admin_until("/admin/queue", "every signal acknowledged", |q| {
        q["depth"] == 0 && q["in_flight"] == 0
    })
    .await;
    let resp = reqwest::get(node.url("/metrics")).await.unwrap();
    assert_eq!(resp.status(), 200, "no auth on /metrics");
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = resp.text().await.unwrap();
    assert_eq!(
        sample(&text, "tai_signals_received_total{outcome=\"accepted\"}"),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "tai_signals_received_total{outcome=\"unauthorized\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "tai_signals_received_total{outcome=\"too_large\"}"),
        Some(1.0),
        "{text}"
    );
    // The label cap is 1: the first tenant keeps its name, the other is "other".
    let processed: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("tai_signals_processed_total{"))
        .collect();
    assert_eq!(processed.len(), 2, "{processed:?}");
    assert!(
        processed.iter().any(|l| l.contains("tenant=\"other\"")),
        "{processed:?}"
    );
    assert!(
        text.contains("tai_signal_processing_seconds_bucket{le=\"0.005\"}"),
        "a histogram"
    );
    // Every 202 above waited for a group flush, each one timed.
    assert!(
        sample(&text, "tai_store_flush_seconds_count").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        text.contains("tai_store_flush_seconds_bucket{le=\"0.0001\"}"),
        "the flush histogram's own buckets: {text}"
    );
    assert_eq!(
        sample(&text, "tai_engine_state{state=\"stable\"}"),
        Some(2.0)
    );
    assert_eq!(sample(&text, "tai_queue_depth"), Some(0.0));
    assert_eq!(sample(&text, "tai_queue_in_flight"), Some(0.0));
    assert_eq!(sample(&text, "tai_queue_parked"), Some(0.0));
    // Connections open per listener: this scrape's own on the operator port.
    assert!(
        sample(&text, "tai_http_connections{listener=\"operator\"}").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        sample(&text, "tai_http_connections{listener=\"ingress\"}").is_some(),
        "{text}"
    );
    assert_eq!(
        sample(&text, "tai_receipts_total{kind=\"action_successful\"}"),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "tai_actor_restarts_total{supervisor=\"tai_sup\"}"),
        Some(1.0)
    );
    assert!(
        text.contains("process_resident_memory_bytes"),
        "process metrics"
    );

    let promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = promtool.expect(
        "promtool not installed: scripts/test.sh installs it (scripts/install-test-tools.sh)",
    );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn the_kaizen_report_shows_stage_shares_the_slowest_fifth_and_a_baseline() {
    let node = Node::start_with(&test_config(""), &[]);
    let (status, body) = node.admin(Method::POST, "/admin/kaizen/baseline").await;
    assert_eq!(status, 503, "no baseline without timings: {body}");
    let c = Client::new(&node, "acme", "acme-secret");
    let ent = entitlement("acme", "payments", "e1");
    assert_eq!(c.post(&ent).await.unwrap().status, 202);
    for i in 0..20 {
        let pay = signal(
            "acme",
            "payments",
            "payment",
            &format!("p{i}"),
            json!({"amount": 5.0, "currency": "USD", "customer_id": format!("c{i}")}),
        );
        assert_eq!(c.post(&pay).await.unwrap().status, 202);
    }
    c.decided("p19").await;
    let report = node
        .admin_until("/admin/kaizen", "timings of every stage", |r| {
            r["stages"].as_array().is_some_and(|s| s.len() == 5)
        })
        .await;
    let stages: Vec<&str> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["ingress", "queue", "policy", "action", "receipt"]);
    let share: f64 = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["share"].as_f64().unwrap())
        .sum();
    assert!((share - 1.0).abs() < 1e-6, "shares add up: {report}");
    let policy = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "policy")
        .unwrap();
    assert_eq!(policy["count"], 21, "{report}");
    let slow = &report["slowest_20_percent"];
    assert!(slow["operations"].as_u64().unwrap() >= 1);
    assert!(slow["by_policy"].as_array().unwrap().iter().any(|p| [
        "payment_fraud",
        "log",
        "post_signal",
        "ledger"
    ]
    .contains(&p["name"].as_str().unwrap())));
    assert_eq!(slow["by_tenant"][0]["name"], "acme");
    assert_eq!(report["health"]["status"], "green");
    assert_eq!(report["baseline"], Value::Null);

    // Saved, then compared: the same samples show no regression (a commit
    // landing in between adds one: save again once the line is quiet).
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, saved) = node.admin(Method::POST, "/admin/kaizen/baseline").await;
        assert_eq!(status, 200, "{saved}");
        assert_eq!(saved["stages"]["policy"]["count"], 21);
        let (_, report) = node.admin(Method::GET, "/admin/kaizen").await;
        assert_eq!(report["baseline"]["saved_at_ms"], saved["saved_at_ms"]);
        if report["samples"] == saved["samples"] {
            assert!(
                report["regressions"].as_array().unwrap().is_empty(),
                "{report}"
            );
            assert_eq!(report["status"], "green");
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "samples never settled: {report}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The series whose label values are known are on `/metrics` at 0 before
/// anything happens: Prometheus's `increase()` would not see a first dead
/// letter or a first restart in a series that appeared at 1, and the
/// deploy kit's alert rules on them would miss it.
#[tokio::test]
async fn known_series_are_at_zero_before_anything_happens() {
    let node = Node::start_with(&test_config(""), &[]);
    let text = node.metrics_text().await;
    let value = |series: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    };
    let mut expected = Vec::new();
    for s in [
        "tai_sup",
        "ingress_sup",
        "kanban_sup",
        "processor_sup",
        "engine_sup",
        "kaizen_sup",
        "andon_sup",
    ] {
        expected.push(format!("tai_actor_restarts_total{{supervisor=\"{s}\"}}"));
    }
    for r in ["halted", "degraded", "quota_exhausted", "poison"] {
        expected.push(format!("tai_deadletter_total{{reason=\"{r}\"}}"));
    }
    for s in ["critical", "warning", "info"] {
        expected.push(format!("tai_alerts_total{{severity=\"{s}\"}}"));
    }
    for s in ["global", "tenant"] {
        expected.push(format!("tai_rate_limited_total{{scope=\"{s}\"}}"));
    }
    for o in [
        "accepted",
        "duplicate",
        "invalid",
        "unauthorized",
        "timed_out",
        "too_large",
        "unsupported_media_type",
        "rate_limited",
        "unavailable",
        "error",
    ] {
        expected.push(format!("tai_signals_received_total{{outcome=\"{o}\"}}"));
    }
    for s in [
        "boot",
        "stable",
        "action_pending",
        "degraded",
        "halted",
        "quota_exhausted",
    ] {
        expected.push(format!("tai_engine_state{{state=\"{s}\"}}"));
    }
    expected.push("tai_engines_live".to_string());
    for series in &expected {
        assert_eq!(value(series), Some(0.0), "{series} in:\n{text}");
    }
    // And they count from there: a restart is 1, not a new series.
    let (status, _) = node
        .admin(Method::POST, "/admin/actors/kaizen_health/kill")
        .await;
    assert_eq!(status, 202);
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = node.metrics_text().await;
        let restarts = text.lines().find_map(|l| {
            l.strip_prefix("tai_actor_restarts_total{supervisor=\"kaizen_sup\"} ")?
                .parse::<f64>()
                .ok()
        });
        if restarts == Some(1.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "kaizen_sup's restart not counted: {restarts:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_can_be_turned_off() {
    let node = Node::start_with(&test_config("[kaizen]\nmetrics = false\n"), &[]);
    let r = reqwest::get(node.url("/metrics")).await.unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    // The node still works.
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "e1").await;
    c.decided("e1").await;
}

/// Engines killed with `engine_sup` (ractor kills a subtree without
/// `post_stop`) are no longer counted live, and are counted once, passive,
/// in the state their checkpoint holds: `tai_engine_state` had counted them
/// live, with the state they died in, until each started again.
#[tokio::test]
async fn engines_killed_with_their_supervisor_are_counted_once_and_passive() {
    let node = Node::start_with(&test_config(""), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent").await;
    c.decided("ent").await;
    // Its ack reached the queue: else the router's restart below has the
    // queue send it again, which starts the engine anew.
    node.drained().await;
    let (stable, live) = ("tai_engine_state{state=\"stable\"}", "tai_engines_live");
    let text = node.metrics_text().await;
    assert_eq!(
        (sample(&text, stable), sample(&text, live)),
        (Some(1.0), Some(1.0))
    );
    let (status, body) = node
        .admin(Method::POST, "/admin/actors/engine_sup/kill")
        .await;
    assert_eq!(status, 202, "{body}");
    node.admin_until("/admin/tree", "processor_sup restarted", |t| {
        find(t, "processor_sup").is_some_and(|p| {
            children(p)
                .iter()
                .all(|c| c["restarts"] == 1 && c["status"] == "running")
        })
    })
    .await;
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let text = node.metrics_text().await;
        let now = (sample(&text, stable), sample(&text, live));
        if now == (Some(1.0), Some(0.0)) {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "the killed engine is still live, or not counted once: (stable, live) {now:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Its next signal starts it again, counted once.
    assert_eq!(c.post(&payment("acme", "p1")).await.unwrap().status, 202);
    c.decided("p1").await;
    let text = node.metrics_text().await;
    assert_eq!(
        (sample(&text, stable), sample(&text, live)),
        (Some(1.0), Some(1.0))
    );
}
