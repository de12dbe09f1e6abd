//! Jidoka end to end (SPEC §5, §6): webhook actions against a real local
//! HTTP gateway, the breaker stopping the line and starting it again.

use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Sha256;
use tai_tests::*;

fn config(gateway: &str, extra: &str) -> String {
    test_config(&format!(
        r#"
[executors.gateway]
kind = "webhook"
url = "{gateway}"
timeout_ms = 1000
failure_threshold = 5
reset_timeout_secs = 1
success_threshold = 3

[skus.checkout]
policies = ["payment_fraud"]
quota = 1000000
executor = "gateway"
{extra}
"#
    ))
}

fn pay(sku: &str, id: &str) -> Value {
    signal(
        "acme",
        sku,
        "payment",
        id,
        json!({"amount": 20, "currency": "USD", "customer_id": id}),
    )
}

async fn send(c: &Client, body: &Value) {
    let a = c.post(body).await.unwrap();
    assert_eq!(a.status, 202, "{}", a.body);
}

async fn entitle(c: &Client, sku: &str) {
    c.entitle(sku, &format!("ent-{sku}")).await;
}

/// Waits (10 s at most) until the gateway has had `n` requests, the last `what`'s.
async fn until_hits(gw: &Gateway, n: usize, what: &str) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while gw.hits().len() < n {
        assert!(
            std::time::Instant::now() < end,
            "{what} never reached the gateway"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

async fn breaker(node: &Node, name: &str) -> Value {
    let (status, list) = node.admin(Method::GET, "/admin/breakers").await;
    assert_eq!(status, 200, "{list}");
    list.as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no breaker {name} in {list}"))
}

async fn engine_state(node: &Node, sku: &str) -> String {
    let (_, e) = node
        .admin(Method::GET, &format!("/admin/tenants/acme/{sku}"))
        .await;
    e["state"].as_str().unwrap_or_default().to_string()
}

/// A node that keeps one engine live at most, with the webhook executor
/// `name` (`keys`: its TOML past `kind` and `url`) to `gw` and the SKU
/// `sku` acting through it, acme entitled to it. Returns the node, acme's
/// client and globex's.
async fn one_live_engine(
    gw: &Gateway,
    name: &str,
    keys: &str,
    sku: &str,
) -> (Node, Client, Client) {
    let extra = format!(
        "\n[executors.{name}]\nkind = \"webhook\"\nurl = \"{}\"\n{keys}\n\n[skus.{sku}]\npolicies = []\nexecutor = \"{name}\"\n",
        gw.url
    );
    let node = Node::start_with(
        &config(&gw.url, &extra),
        &[("TAI_JIDOKA__MAX_ACTIVE_ENGINES", "1")],
    );
    let c = Client::new(&node, "acme", "acme-secret");
    let g = Client::new(&node, "globex", "globex-secret");
    entitle(&c, sku).await;
    c.decided(&format!("ent-{sku}")).await;
    (node, c, g)
}

/// [`one_live_engine`] with acme's `heldpay` engine halted by its breaker
/// (`held`: two failures trip it, and it stays open for 600 s).
async fn heldpay_halted_by_its_breaker(gw: &Gateway) -> (Node, Client, Client) {
    let keys = "failure_threshold = 2\nreset_timeout_secs = 600";
    let (node, c, g) = one_live_engine(gw, "held", keys, "heldpay").await;
    gw.set(GatewayMode::Fail);
    for id in ["h-1", "h-2"] {
        send(&c, &pay("heldpay", id)).await;
        assert_eq!(c.decided(id).await["status"], "failed");
    }
    assert_eq!(engine_state(&node, "heldpay").await, "halted");
    (node, c, g)
}

fn kinds(receipts: &[Value]) -> Vec<String> {
    receipts
        .iter()
        .map(|r| r["kind"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_failing_gateway_stops_the_line_and_a_healed_one_starts_it_again() {
    let gw = Gateway::start().await;
    let node = Node::start_with(&config(&gw.url, ""), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    entitle(&c, "checkout").await;

    // A healthy call first: the action JSON arrives signed with the node's key.
    send(&c, &pay("checkout", "ok-0")).await;
    assert_eq!(c.decided("ok-0").await["status"], "completed");
    let hit = &gw.hits()[0];
    let action: Value = serde_json::from_slice(&hit.body).unwrap();
    assert_eq!(action["signal_id"], "ok-0");
    assert_eq!(action["executor"], "gateway");
    assert_eq!(hit.headers["x-tai-key-id"], "k2");
    let mut mac = Hmac::<Sha256>::new_from_slice(b"test-receipt-key").unwrap();
    mac.update(format!("{}\n", hit.headers["x-tai-timestamp"]).as_bytes());
    mac.update(&hit.body);
    assert_eq!(
        hit.headers["x-tai-signature"],
        format!("v1={}", hex::encode(mac.finalize().into_bytes()))
    );

    // Five failures in a row open the breaker and halt the engine.
    gw.set(GatewayMode::Fail);
    for i in 1..=5 {
        let id = format!("fail-{i}");
        send(&c, &pay("checkout", &id)).await;
        let s = c.decided(&id).await;
        assert_eq!(s["status"], "failed", "{s}");
        let b = breaker(&node, "gateway").await;
        let expected = if i < 5 { "closed" } else { "open" };
        assert_eq!(b["state"], expected, "after {i} failures: {b}");
    }
    assert_eq!(engine_state(&node, "checkout").await, "halted");
    assert_eq!(gw.hits().len(), 6);

    // Halted: signals are dead-lettered, the gateway is not called.
    for id in ["held-1", "held-2"] {
        send(&c, &pay("checkout", id)).await;
        let s = c.decided(id).await;
        assert_eq!(s["status"], "deadlettered", "{s}");
        assert_eq!(s["reason"], "halted");
    }
    assert_eq!(gw.hits().len(), 6, "no call while open");

    // The gateway heals; after the open time the breaker half-opens and the
    // engine resumes by itself.
    gw.set(GatewayMode::Ok);
    node.admin_until(
        "/admin/tenants/acme/checkout",
        "the engine to resume",
        |e| e["state"] == "stable",
    )
    .await;
    assert_eq!(breaker(&node, "gateway").await["state"], "half_open");
    for i in 1..=3 {
        let id = format!("probe-{i}");
        send(&c, &pay("checkout", &id)).await;
        assert_eq!(c.decided(&id).await["status"], "completed");
    }
    let b = breaker(&node, "gateway").await;
    assert_eq!(b["state"], "closed", "three successful probes: {b}");
    assert_eq!(b["trips"], 0);

    // The held signals replay and complete.
    for id in ["held-1", "held-2"] {
        let (status, body) = node
            .admin(
                Method::POST,
                &format!("/admin/deadletter/{id}/replay?tenant=acme"),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(c.decided(id).await["status"], "completed");
    }

    let receipts = node.all_receipts().await;
    let line: Vec<String> = kinds(&receipts)
        .into_iter()
        .filter(|k| k.starts_with("breaker_") || k.starts_with("jidoka_"))
        .collect();
    assert_eq!(
        line,
        [
            "breaker_open",
            "jidoka_halt",
            "breaker_half_open",
            "jidoka_resume",
            "breaker_closed"
        ]
    );
    let open = receipts
        .iter()
        .find(|r| r["kind"] == "breaker_open")
        .unwrap();
    assert_eq!(open["tenant_id"], "*");
    assert_eq!(open["sku_id"], "gateway");
    assert_eq!(open["state_before"], "closed");
    assert_eq!(open["state_after"], "open");
    let (_, verify) = node.admin(Method::GET, "/admin/receipts/verify").await;
    assert_eq!(verify["ok"], true, "{verify}");
    let metrics = node.metrics_text().await;
    assert!(
        metrics.contains("tai_breaker_state{breaker=\"gateway\"} 0"),
        "closed again in the gauge"
    );
}

#[tokio::test]
async fn slow_calls_trip_the_breaker_and_the_next_action_halts_the_engine() {
    let gw = Gateway::start().await;
    let extra = format!(
        r#"
[executors.slowgw]
kind = "webhook"
url = "{}"
timeout_ms = 2000
failure_threshold = 2
slow_call_ms = 100
reset_timeout_secs = 60

[skus.slowpay]
policies = []
executor = "slowgw"
"#,
        gw.url
    );
    let node = Node::start_with(&config(&gw.url, &extra), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    entitle(&c, "slowpay").await;
    gw.set(GatewayMode::Slow(250));
    for id in ["slow-1", "slow-2"] {
        send(&c, &pay("slowpay", id)).await;
        // The calls succeed: the actions complete.
        assert_eq!(c.decided(id).await["status"], "completed");
    }
    let b = breaker(&node, "slowgw").await;
    assert_eq!(b["state"], "open", "{b}");
    assert_eq!(b["slow_calls"], 2);
    assert_eq!(b["failures"], 0);
    send(&c, &pay("slowpay", "slow-3")).await;
    let s = c.decided("slow-3").await;
    assert_eq!(s["status"], "failed");
    assert!(
        s["reason"]
            .as_str()
            .unwrap()
            .contains("breaker slowgw is open"),
        "{s}"
    );
    assert_eq!(engine_state(&node, "slowpay").await, "halted");
    assert_eq!(gw.hits().len(), 2, "the open breaker made no call");
    let receipts = node.all_receipts().await;
    let open = receipts
        .iter()
        .find(|r| r["kind"] == "breaker_open")
        .unwrap();
    assert!(
        open["reason"].as_str().unwrap().contains("slow call"),
        "{open}"
    );
}

/// A graceful stop lets an action already under way finish and records its
/// outcome, on either queue backend: its signal stays in flight until the
/// outcome is committed, and the queue's quiesce waits for what is in
/// flight before the tree stops. Stopped midway (the ledger stops before
/// the engines), the call the target went on to answer would be found at
/// the next start and recorded `interrupted` (failed), and its engine
/// would exit abnormally while its layer stopped.
async fn a_graceful_stop_lets_an_action_under_way_finish(kanban: &str) {
    let gw = Gateway::start().await;
    let mut node = Node::start_with(&config(&gw.url, kanban), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    entitle(&c, "checkout").await;
    gw.set(GatewayMode::Slow(800));
    send(&c, &pay("checkout", "under-way-1")).await;
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while gw.in_flight() == 0 {
        assert!(
            std::time::Instant::now() < end,
            "the call never reached the gateway"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    node.signal(libc::SIGTERM);
    // Polled here, not waited for: the gateway answers on this test's runtime.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = node.child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < end, "the node did not stop");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    let log = node.log();
    assert!(status.success(), "{status}: {log}");
    assert!(!log.contains("exited abnormally"), "{log}");
    assert_eq!(gw.hits().len(), 1, "one call, made once");
    node.restart();
    let c = Client::new(&node, "acme", "acme-secret");
    let s = c.decided("under-way-1").await;
    assert_eq!(s["status"], "completed", "{s}");
    let kinds: Vec<String> = node
        .all_receipts()
        .await
        .iter()
        .filter(|r| r["signal_id"] == "under-way-1")
        .map(|r| r["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        kinds,
        ["action_generated", "action_successful"],
        "{kinds:?}"
    );
    assert_eq!(gw.hits().len(), 1, "not called again after the restart");
}

#[tokio::test]
async fn a_graceful_stop_lets_an_action_under_way_finish_on_the_embedded_queue() {
    a_graceful_stop_lets_an_action_under_way_finish("").await;
}

#[tokio::test]
async fn a_graceful_stop_lets_an_action_under_way_finish_on_amqp() {
    ensure_broker();
    let queue = unique_queue("actionstop");
    let _cleanup = QueueCleanup(queue.clone());
    a_graceful_stop_lets_an_action_under_way_finish(&amqp_kanban(&queue)).await;
}

/// A redirect is not a delivery: followed, a POST becomes a GET of the new
/// address, whose 200 would record an action the target never received.
#[tokio::test]
async fn a_webhook_target_that_redirects_has_failed_the_call() {
    let gw = Gateway::start().await;
    let node = Node::start_with(&config(&gw.url, ""), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    entitle(&c, "checkout").await;
    gw.set(GatewayMode::Redirect);
    send(&c, &pay("checkout", "moved-1")).await;
    let s = c.decided("moved-1").await;
    assert_eq!(s["status"], "failed", "{s}");
    assert!(
        s["reason"].as_str().unwrap_or_default().contains("302"),
        "the reason names the answer: {s}"
    );
    assert_eq!(gw.hits().len(), 1, "one POST, nothing re-sent");
    let b = breaker(&node, "gateway").await;
    assert_eq!(b["failures"], 1, "the breaker counts it: {b}");
}

/// SKU `slowpay`, whose actions go to `url` (a slow gateway) with a 10 s
/// timeout.
fn slow_sku(url: &str) -> String {
    format!(
        r#"
[executors.slowgw]
kind = "webhook"
url = "{url}"
timeout_ms = 10000

[skus.slowpay]
policies = []
executor = "slowgw"
"#
    )
}

/// Every signal goes through the engine router: an operator's question
/// about an engine that is running a slow action must not hold it up.
#[tokio::test]
async fn asking_about_a_busy_engine_holds_up_no_other_signal() {
    let (gw, slow) = (Gateway::start().await, Gateway::start().await);
    slow.set(GatewayMode::Slow(3_000));
    let extra = format!(
        "{}\n[skus.quick]\npolicies = []\nexecutor = \"log\"\n",
        slow_sku(&slow.url)
    );
    let node = Node::start_with(&config(&gw.url, &extra), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    entitle(&c, "slowpay").await;
    entitle(&c, "quick").await;
    send(&c, &pay("slowpay", "slow-1")).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while slow.hits().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow call never came"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    // Answered from the checkpoint while the engine waits on its action.
    let (status, e) = node.admin(Method::GET, "/admin/tenants/acme/slowpay").await;
    assert_eq!(status, 200, "{e}");
    assert_eq!(e["state"], "action_pending", "{e}");
    assert_eq!(e["active"], true, "{e}");
    assert!(e["in_flight_action"].is_string(), "{e}");
    let (status, all) = node.admin(Method::GET, "/admin/tenants").await;
    assert_eq!(status, 200, "{all}");
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .any(|e| e["sku_id"] == "slowpay" && e["state"] == "action_pending"),
        "{all}"
    );

    // Another engine decides meanwhile, and a halt of the busy one waits for
    // it without holding the others up.
    let halt = {
        let node = &node;
        async move {
            node.admin(Method::POST, "/admin/tenants/acme/slowpay/halt")
                .await
        }
    };
    let quick = async {
        send(&c, &pay("quick", "quick-1")).await;
        let quick = c.decided("quick-1").await;
        let slow_then = c.status("slow-1").await.body;
        (quick, slow_then)
    };
    let ((status, halted), (quick, slow_then)) = tokio::join!(halt, quick);
    assert_eq!(quick["status"], "completed", "{quick}");
    assert!(
        !["completed", "failed"].contains(&slow_then["status"].as_str().unwrap_or_default()),
        "the quick signal was decided while the slow action was still running: {slow_then}"
    );
    assert_eq!(status, 200, "{halted}");
    assert_eq!(halted["state"], "halted", "{halted}");
    assert_eq!(c.decided("slow-1").await["status"], "completed");
}

/// A signal held by a live engine past `kanban.visibility_secs` (its own
/// action is slow, or it waits behind one) is sent again without an
/// attempt counted: it used to turn to poison, dead-lettered while its
/// engine was deciding it, and then decided as well.
#[tokio::test]
async fn a_long_action_turns_nothing_it_holds_to_poison() {
    let (gw, slow) = (Gateway::start().await, Gateway::start().await);
    slow.set(GatewayMode::Slow(5_000));
    let node = Node::start_with(
        &config(&gw.url, &slow_sku(&slow.url)),
        &[("TAI_KANBAN__VISIBILITY_SECS", "1")],
    );
    let c = Client::new(&node, "acme", "acme-secret");
    entitle(&c, "slowpay").await;
    for id in ["long-1", "long-2"] {
        send(&c, &pay("slowpay", id)).await;
    }
    for id in ["long-1", "long-2"] {
        let s = c.decided(id).await;
        assert_eq!(s["status"], "completed", "{s}");
    }
    let (_, letters) = node.admin(Method::GET, "/admin/deadletter").await;
    assert_eq!(letters, serde_json::json!([]), "nothing dead-lettered");
    let receipts = node.all_receipts().await;
    assert!(
        !kinds(&receipts).contains(&"signal_deadlettered".to_string()),
        "{receipts:?}"
    );
    assert_eq!(slow.hits().len(), 2, "each action called once");
}

/// `tai_queue_redelivered_total` from the node's metrics.
async fn redelivered(node: &Node) -> f64 {
    let text = node.metrics_text().await;
    sample(&text, "tai_queue_redelivered_total ")
        .unwrap_or_else(|| panic!("no tai_queue_redelivered_total: {text}"))
}

/// An engine the router starts is sent each signal once: only one that
/// restarts after a crash (its mailbox lost) asks Kanban for what is in
/// flight for it again. Every first start used to, and the queue sent its
/// first signal twice, with a scan of everything in flight (10–18 % of the
/// node's CPU per signal with 100,000 tenants at full speed, BENCHMARKS session 43).
#[tokio::test]
async fn only_an_engine_restarted_after_a_crash_is_sent_its_signals_again() {
    let (gw, slow) = (Gateway::start().await, Gateway::start().await);
    let node = Node::start_with(&config(&gw.url, &slow_sku(&slow.url)), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    for sku in ["checkout", "slowpay"] {
        entitle(&c, sku).await;
        for n in 0..3 {
            send(&c, &pay(sku, &format!("{sku}-{n}"))).await;
        }
    }
    for sku in ["checkout", "slowpay"] {
        for n in 0..3 {
            let s = c.decided(&format!("{sku}-{n}")).await;
            assert_eq!(s["status"], "completed", "{s}");
        }
    }
    node.admin_until("/admin/queue", "nothing in flight", |q| q["in_flight"] == 0)
        .await;
    assert_eq!(redelivered(&node).await, 0.0, "two engines started");

    // Killed mid-call with a signal waiting behind the call, the engine is
    // restarted: the call is recorded interrupted, and the signal that
    // waited, lost with its mailbox, is sent again.
    slow.set(GatewayMode::Slow(20_000));
    send(&c, &pay("slowpay", "cut")).await;
    until_hits(&slow, 4, "cut").await;
    send(&c, &pay("slowpay", "behind")).await;
    node.admin_until("/admin/queue", "both in flight", |q| q["in_flight"] == 2)
        .await;
    slow.set(GatewayMode::Ok);
    let (status, body) = node
        .admin(Method::POST, "/admin/actors/engine:acme:slowpay/kill")
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(c.decided("cut").await["reason"], "interrupted");
    assert_eq!(c.decided("behind").await["status"], "completed");
    node.admin_until("/admin/queue", "nothing in flight", |q| q["in_flight"] == 0)
        .await;
    assert_eq!(redelivered(&node).await, 1.0);
}

/// A crash during a flush can keep a decision whose signal's queue block
/// that flush had yet to write (sled writes its log in order, and the
/// block goes in just before the flush). The kill-9 soak found two such
/// webhook actions: `action_generated` with no outcome, their signals
/// `processing` for good, since nothing queued would start their engines
/// again. Made here by a kill -9 mid-call and the queue's blocks dropped
/// while the node is down: at the restart the engine is started from its
/// checkpoint and records the action interrupted, with no signal sent.
#[tokio::test]
async fn an_action_a_crash_cut_is_recorded_interrupted_at_the_next_start_with_nothing_queued() {
    let (gw, slow) = (Gateway::start().await, Gateway::start().await);
    slow.set(GatewayMode::Slow(20_000));
    let mut node = Node::start_with(&config(&gw.url, &slow_sku(&slow.url)), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    entitle(&c, "slowpay").await;
    send(&c, &pay("slowpay", "cut")).await;
    until_hits(&slow, 1, "cut").await;
    node.kill_hard();
    {
        let store = tai_store::Store::open(&node.data_dir()).unwrap();
        let pending = store.pending().unwrap();
        assert!(
            pending.iter().any(|(_, d)| d.signal.id == "cut"),
            "{pending:?}"
        );
        for (block, _) in pending {
            store.remove_block(block).unwrap();
        }
        store.flush().unwrap();
    }
    slow.set(GatewayMode::Ok);
    node.restart();
    let c = Client::new(&node, "acme", "acme-secret");
    let s = c.decided("cut").await;
    assert_eq!(
        (s["status"].as_str(), s["reason"].as_str()),
        (Some("failed"), Some("interrupted")),
        "{s}"
    );
    assert_eq!(engine_state(&node, "slowpay").await, "stable");
    assert_eq!(slow.hits().len(), 1, "the cut call is not made again");
    node.log_until("engines with an action in flight at the last stop")
        .await;
}

/// Passivation asks each idle engine whether it is busy. An engine in a
/// long action answers only once the action ends, and every signal goes
/// through the router: the question must not hold the router up.
#[tokio::test]
async fn an_engine_busy_past_the_idle_timeout_holds_up_no_other_engine() {
    let (gw, slow) = (Gateway::start().await, Gateway::start().await);
    let node = Node::start_with(
        &config(&gw.url, &slow_sku(&slow.url)),
        &[("TAI_JIDOKA__IDLE_TIMEOUT_SECS", "1")],
    );
    let c = Client::new(&node, "acme", "acme-secret");
    for sku in ["checkout", "slowpay"] {
        entitle(&c, sku).await;
    }
    // Under the call's 10 s timeout, far past the idle timeout (1 s) and
    // the router's check of it (every 250 ms).
    slow.set(GatewayMode::Slow(9_000));
    send(&c, &pay("slowpay", "long")).await;
    until_hits(&slow, 1, "long").await;
    let held = std::time::Instant::now();
    let mut n = 0;
    // Each decided while the long call is still held, for twice as long
    // as slowpay takes to count as idle.
    while held.elapsed() < std::time::Duration::from_secs(2) {
        let id = format!("quick-{n}");
        send(&c, &pay("checkout", &id)).await;
        assert_eq!(c.decided(&id).await["status"], "completed");
        assert_eq!(
            slow.in_flight(),
            1,
            "{id} was decided only once the long call ended"
        );
        n += 1;
    }
    // The busy engine was left to finish its action, and is passivated
    // once it has been idle for its timeout.
    assert_eq!(c.decided("long").await["status"], "completed");
    node.admin_until("/admin/tenants/acme/slowpay", "slowpay passivated", |e| {
        e["active"] == false && e["state"] == "stable"
    })
    .await;
}

#[tokio::test]
async fn a_melted_breaker_stays_open_across_a_restart_until_reset() {
    let gw = Gateway::start().await;
    let mut node = Node::start_with(&config(&gw.url, ""), &[]);
    let (status, b) = node
        .admin(Method::POST, "/admin/breakers/gateway/melt")
        .await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(
        (b["state"].as_str(), b["melted"].as_bool()),
        (Some("open"), Some(true))
    );
    let (status, body) = node
        .admin(Method::POST, "/admin/breakers/nosuch/reset")
        .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found", "{body}");

    node.restart();
    let b = breaker(&node, "gateway").await;
    assert_eq!(
        (b["state"].as_str(), b["melted"].as_bool()),
        (Some("open"), Some(true))
    );
    // While melted, an action is refused without a call.
    let c = Client::new(&node, "acme", "acme-secret");
    entitle(&c, "checkout").await;
    send(&c, &pay("checkout", "m-1")).await;
    assert_eq!(c.decided("m-1").await["status"], "failed");
    assert!(gw.hits().is_empty());
    assert_eq!(engine_state(&node, "checkout").await, "halted");

    // Reset closes it and resumes the engine it halted.
    let (status, b) = node
        .admin(Method::POST, "/admin/breakers/gateway/reset")
        .await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["state"], "closed");
    node.admin_until(
        "/admin/tenants/acme/checkout",
        "the engine to resume",
        |e| e["state"] == "stable",
    )
    .await;
    send(&c, &pay("checkout", "m-2")).await;
    assert_eq!(c.decided("m-2").await["status"], "completed");
    assert_eq!(gw.hits().len(), 1);
    let k = kinds(&node.all_receipts().await);
    assert!(k.contains(&"breaker_open".to_string()), "{k:?}");
    assert!(k.contains(&"breaker_closed".to_string()), "{k:?}");
}

const RULES_V1: &str = r#"package tai.custom
default decision := {"allow": true}
decision := {"allow": false, "violations": [sprintf("amount %v over 1000", [input.signal.payload.amount])]} if {
    input.signal.payload.amount > 1000
}
"#;

#[tokio::test]
async fn a_rego_policy_decides_and_a_broken_reload_keeps_the_working_one() {
    let scratch = tempfile::tempdir().unwrap();
    let file = scratch.path().join("custom.rego");
    std::fs::write(&file, RULES_V1).unwrap();
    let file_name = file.display().to_string();
    let extra = format!(
        r#"
[skus.custom]
policies = []
rego = ["{file_name}"]
"#
    );
    let node = Node::start_with(&test_config(&extra), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    entitle(&c, "custom").await;
    let big = |id: &str| {
        signal(
            "acme",
            "custom",
            "payment",
            id,
            json!({"amount": 5000, "customer_id": "c"}),
        )
    };
    send(&c, &pay("custom", "small-1")).await;
    assert_eq!(c.decided("small-1").await["status"], "completed");
    send(&c, &big("big-1")).await;
    let s = c.decided("big-1").await;
    assert_eq!(s["status"], "denied", "{s}");
    assert_eq!(
        s["reason"],
        format!("{file_name}: amount 5000 over 1000"),
        "the violation names its policy"
    );
    let (_, listed) = node.admin(Method::GET, "/admin/policies").await;
    assert_eq!(listed["rego"], json!([file_name]));

    // A broken file is refused with its line; the working version stays.
    std::fs::write(&file, "package tai.custom\n\ndecision := {\"allow\": \n").unwrap();
    let (status, body) = node.admin(Method::POST, "/admin/policies/reload").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_policy");
    assert_eq!(body["errors"][0]["file"], file_name);
    assert!(body["errors"][0]["line"].as_u64().is_some(), "{body}");
    send(&c, &big("big-2")).await;
    assert_eq!(c.decided("big-2").await["status"], "denied");

    // A valid new version replaces it at once.
    std::fs::write(&file, "package tai.custom\ndecision := {\"allow\": true}\n").unwrap();
    let (status, body) = node.admin(Method::POST, "/admin/policies/reload").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reloaded"], json!([file_name]));
    send(&c, &big("big-3")).await;
    assert_eq!(c.decided("big-3").await["status"], "completed");
}

/// Loops as long as the tenant asks: `n` × `n` steps, never true, so
/// nothing piles up in memory while it runs.
const SIZED_BY_INPUT: &str = r#"package tai.sized
decision := {"allow": count(found) == 0}
found := [1 | some x in numbers.range(1, input.signal.payload.n); some y in numbers.range(1, input.signal.payload.n); x + y == 0]
"#;

/// Before: a Rego evaluation ran on the runtime worker that polled its
/// engine, with no time limit, while every other engine deciding with the
/// same file waited for it on a lock (on a worker too). Two slow signals
/// took both of this machine's workers: no signal of any tenant was
/// accepted or decided until the policy ended, hours later.
#[tokio::test]
async fn a_slow_rego_policy_holds_up_only_its_own_engines_and_is_cut_off() {
    let scratch = tempfile::tempdir().unwrap();
    let file = scratch.path().join("sized.rego");
    std::fs::write(&file, SIZED_BY_INPUT).unwrap();
    let file_name = file.display().to_string();
    let extra = format!(
        r#"
[skus.sized]
policies = []
rego = ["{file_name}"]
"#
    );
    let node = Node::start_with(
        &test_config(&extra),
        &[("TAI_JIDOKA__REGO_TIMEOUT_MS", "5000")],
    );
    let acme = Client::new(&node, "acme", "acme-secret");
    let globex = Client::new(&node, "globex", "globex-secret");
    for c in [&acme, &globex] {
        entitle(c, "sized").await;
    }
    entitle(&acme, "payments").await;
    let sized =
        |tenant: &str, id: &str, n: u64| signal(tenant, "sized", "payment", id, json!({"n": n}));
    send(&acme, &sized("acme", "quick", 10)).await;
    assert_eq!(acme.decided("quick").await["status"], "completed");

    send(&acme, &sized("acme", "slow-a", 100_000)).await;
    send(&globex, &sized("globex", "slow-b", 100_000)).await;
    node.admin_until(
        "/admin/queue",
        "both slow signals with their engines",
        |q| q["in_flight"] == 2,
    )
    .await;
    // Another SKU's signal is accepted and decided while both run.
    send(&acme, &pay("payments", "pay-1")).await;
    assert_eq!(acme.decided("pay-1").await["status"], "completed");
    for (c, id) in [(&acme, "slow-a"), (&globex, "slow-b")] {
        let s = c.status(id).await.body;
        assert_eq!(s["status"], "accepted", "{id} still being decided: {s}");
    }

    // Past the limit the policy denies (fail closed), naming the limit.
    for (c, id) in [(&acme, "slow-a"), (&globex, "slow-b")] {
        let s = c.decided(id).await;
        assert_eq!(s["status"], "denied", "{s}");
        assert_eq!(
            s["reason"],
            format!("{file_name}: evaluation failed: took longer than its 5000 ms limit"),
        );
    }
    assert!(node
        .log_tail(200)
        .contains("a Rego evaluation ran out of time"));
    send(&acme, &sized("acme", "quick-2", 10)).await;
    assert_eq!(acme.decided("quick-2").await["status"], "completed");
}

/// `tai serve` on a config whose SKU names `rego_file`, with `data_dir`:
/// its exit code and stderr.
fn serve_with_rego(
    scratch: &std::path::Path,
    rego_file: &str,
    data_dir: &std::path::Path,
) -> (Option<i32>, String) {
    let config = scratch.join("config.toml");
    let extra = format!("[skus.custom]\nrego = [\"{rego_file}\"]\n");
    std::fs::write(&config, test_config(&extra)).unwrap();
    let out = std::process::Command::new(tai_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env("TAI_NODE__DATA_DIR", data_dir)
        .env("TAI_OPERATOR__LISTEN", "127.0.0.1:0")
        .env("TAI_INGRESS__LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Refused before the data dir is created or opened: a fresh one is not
/// made, and one another node holds gives the config error, not
/// `store_in_use` (before, the store was opened first).
#[test]
fn a_node_with_a_broken_or_missing_rego_file_refuses_to_start_naming_it() {
    let scratch = tempfile::tempdir().unwrap();
    let file = scratch.path().join("broken.rego");
    std::fs::write(&file, "package broken\n\ndecision := {\n").unwrap();
    let fresh = scratch.path().join("data");
    let (code, err) = serve_with_rego(scratch.path(), &file.display().to_string(), &fresh);
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains(&format!("skus.custom.rego[0]: {}:", file.display())),
        "{err}"
    );
    assert!(!fresh.exists(), "no data dir made for a config refused");

    let running = Node::start(&[]);
    let missing = scratch.path().join("missing.rego");
    let (code, err) = serve_with_rego(
        scratch.path(),
        &missing.display().to_string(),
        &running.data_dir(),
    );
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains(&format!(
            "skus.custom.rego[0]: {}: cannot read",
            missing.display()
        )),
        "{err}"
    );
}

#[tokio::test]
async fn quota_refills_by_itself_and_a_revoked_entitlement_degrades_the_engine() {
    let extra = r#"
[skus.refill]
policies = []
quota = 1
quota_period_secs = 1
"#;
    let node = Node::start_with(&config("http://127.0.0.1:9/unused", extra), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    entitle(&c, "refill").await;
    send(&c, &pay("refill", "r-1")).await;
    send(&c, &pay("refill", "r-2")).await;
    assert_eq!(c.decided("r-1").await["status"], "completed");
    let r2 = c.decided("r-2").await;
    assert_eq!(r2["reason"], "quota_exhausted", "{r2}");
    // The period ends: the engine refills and is stable again on its own.
    node.admin_until("/admin/tenants/acme/refill", "the quota to refill", |e| {
        e["state"] == "stable" && e["quota_remaining"] == 1
    })
    .await;
    send(&c, &pay("refill", "r-3")).await;
    assert_eq!(c.decided("r-3").await["status"], "completed");

    // Revocation degrades; a non-critical signal is skipped; re-entitled, stable.
    let entitlement = |id: &str, active: bool| {
        signal(
            "acme",
            "refill",
            "entitlement",
            id,
            json!({"active": active}),
        )
    };
    send(&c, &entitlement("revoke-1", false)).await;
    node.admin_until("/admin/tenants/acme/refill", "degraded", |e| {
        e["state"] == "degraded" && e["entitled"] == false
    })
    .await;
    send(&c, &pay("refill", "r-4")).await;
    assert_eq!(c.decided("r-4").await["reason"], "degraded");
    send(&c, &entitlement("ent-again", true)).await;
    node.admin_until("/admin/tenants/acme/refill", "stable", |e| {
        e["state"] == "stable"
    })
    .await;
    let k = kinds(&node.all_receipts().await);
    for kind in [
        "quota_exceeded",
        "quota_refilled",
        "entitlement_revoked",
        "signal_skipped",
    ] {
        assert!(k.contains(&kind.to_string()), "{kind} missing from {k:?}");
    }
}

#[tokio::test]
async fn a_revoked_engine_whose_critical_action_tripped_the_breaker_stays_degraded() {
    // Revoked, the engine decides critical signals only. One's action trips
    // the breaker and halts the engine; the half-open takes it back to
    // degraded (SPEC §5's degraded row), not to stable: an outage of the
    // gateway must not lift the tenant's degradation.
    let gw = Gateway::start().await;
    let extra = format!(
        r#"
[executors.trippy]
kind = "webhook"
url = "{}"
timeout_ms = 1000
failure_threshold = 1
reset_timeout_secs = 1
success_threshold = 1

[skus.trippay]
policies = []
executor = "trippy"
"#,
        gw.url
    );
    let node = Node::start_with(&config(&gw.url, &extra), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    entitle(&c, "trippay").await;
    let revoke = signal(
        "acme",
        "trippay",
        "entitlement",
        "revoke",
        json!({"active": false}),
    );
    send(&c, &revoke).await;
    c.decided("revoke").await;
    gw.set(GatewayMode::Fail);
    let mut critical = pay("trippay", "crit-1");
    critical["critical"] = json!(true);
    send(&c, &critical).await;
    assert_eq!(c.decided("crit-1").await["status"], "failed");
    wait_until(
        &node,
        "the breaker's half-open resumes the engine",
        || async { resumes(&node, "trippay").await == 1 },
    )
    .await;
    let resumed = node
        .all_receipts()
        .await
        .into_iter()
        .find(|r| r["sku_id"] == "trippay" && r["kind"] == "jidoka_resume")
        .unwrap();
    assert_eq!(
        (&resumed["state_before"], &resumed["state_after"]),
        (&json!("halted"), &json!("degraded")),
        "{resumed}"
    );
    assert_eq!(engine_state(&node, "trippay").await, "degraded");
    send(&c, &pay("trippay", "plain-1")).await;
    let s = c.decided("plain-1").await;
    assert_eq!(
        (&s["status"], &s["reason"]),
        (&json!("deadlettered"), &json!("degraded")),
        "{s}"
    );
}

#[tokio::test]
async fn a_lost_probe_does_not_stick_the_breaker() {
    let gw = Gateway::start().await;
    let extra = format!(
        r#"
[executors.lossy]
kind = "webhook"
url = "{}"
timeout_ms = 1500
failure_threshold = 1
reset_timeout_secs = 1
success_threshold = 1

[skus.lossypay]
policies = []
executor = "lossy"
"#,
        gw.url
    );
    let node = Node::start_with(&config(&gw.url, &extra), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    entitle(&c, "lossypay").await;
    gw.set(GatewayMode::Fail);
    send(&c, &pay("lossypay", "l-1")).await;
    assert_eq!(c.decided("l-1").await["status"], "failed");
    assert_eq!(breaker(&node, "lossy").await["state"], "open");

    // Half-open: the probe goes out to a gateway that never answers in time,
    // and its engine is killed mid-call: the probe's result is lost.
    gw.set(GatewayMode::Slow(20_000));
    node.admin_until(
        "/admin/tenants/acme/lossypay",
        "the engine to resume",
        |e| e["state"] == "stable",
    )
    .await;
    send(&c, &pay("lossypay", "l-probe")).await;
    until_hits(&gw, 2, "the probe").await;
    let (status, body) = node
        .admin(Method::POST, "/admin/actors/engine:acme:lossypay/kill")
        .await;
    assert_eq!(status, 202, "{body}");
    let lost = c.decided("l-probe").await;
    assert_eq!(lost["reason"], "interrupted", "{lost}");
    assert_eq!(breaker(&node, "lossy").await["state"], "half_open");

    // The gateway is fine again. While the lost probe's lease lasts, calls
    // are refused without halting the engine; once it expires a new probe
    // goes out and closes the breaker.
    gw.set(GatewayMode::Ok);
    let end = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut n = 0;
    loop {
        n += 1;
        let id = format!("l-after-{n}");
        send(&c, &pay("lossypay", &id)).await;
        let s = c.decided(&id).await;
        if s["status"] == "completed" {
            break;
        }
        assert!(
            s["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("probe is out"),
            "{s}"
        );
        assert_eq!(engine_state(&node, "lossypay").await, "stable");
        assert!(std::time::Instant::now() < end, "the breaker stayed stuck");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert_eq!(breaker(&node, "lossy").await["state"], "closed");
}

#[tokio::test]
async fn an_engine_restarted_while_it_was_being_passivated_is_still_routed_to() {
    // One live engine at most. acme's `slowpay` engine is mid-call to a slow
    // gateway when globex's first signal passivates it (a drain: it finishes
    // its call first). Killed then, engine_sup restarts it, and that
    // incarnation, with nothing queued for it, is passivated too: the
    // router had let the engine go, and must not leave one running that
    // neither its cap nor its idle sweep knows of. The next signal starts
    // it (should the restart still run, engine_sup answers the start with
    // it, as OTP's `already_started`), and the cap holds.
    let gw = Gateway::start().await;
    let (node, c, g) = one_live_engine(&gw, "slow", "timeout_ms = 20000", "slowpay").await;
    gw.set(GatewayMode::Slow(20_000));
    send(&c, &pay("slowpay", "s-1")).await;
    until_hits(&gw, 1, "s-1").await;
    // globex's entitlement starts its engine, which passivates slowpay's.
    g.entitle("payments", "g-ent").await;
    g.decided("g-ent").await;
    let (status, body) = node
        .admin(Method::POST, "/admin/actors/engine:acme:slowpay/kill")
        .await;
    assert_eq!(status, 202, "{body}");
    let lost = c.decided("s-1").await;
    assert_eq!(lost["reason"], "interrupted", "{lost}");
    // With nothing queued for it, the restarted incarnation is passivated
    // as the one it replaced was being: globex's engine is the one live.
    live_engines_until(&node, &["engine:globex:payments"]).await;

    gw.set(GatewayMode::Ok);
    send(&c, &pay("slowpay", "s-2")).await;
    assert_eq!(c.decided("s-2").await["status"], "completed");
    let log = node.log();
    for refused in ["delivery failed", "delivery after passivation failed"] {
        assert!(!log.contains(refused), "{refused}: {log}");
    }
    // The cap holds: globex's engine went to make room for it.
    live_engines_until(&node, &["engine:acme:slowpay"]).await;
}

#[tokio::test]
async fn a_restarted_router_takes_on_the_engines_running() {
    // One live engine at most. acme's engine runs when engine_router is
    // killed; engine_sup, before the router under rest_for_one, is not
    // restarted, so the engine runs on. The new router takes it on, so
    // globex's first signal passivates it to keep to the cap.
    let node = Node::start_with(
        &config("http://127.0.0.1:9/unused", ""),
        &[("TAI_JIDOKA__MAX_ACTIVE_ENGINES", "1")],
    );
    let c = Client::new(&node, "acme", "acme-secret");
    let g = Client::new(&node, "globex", "globex-secret");
    c.entitle("payments", "a-ent").await;
    c.decided("a-ent").await;
    let (status, body) = node
        .admin(Method::POST, "/admin/actors/engine_router/kill")
        .await;
    assert_eq!(status, 202, "{body}");
    node.admin_until("/admin/tree", "engine_router restarted", |t| {
        find(t, "engine_router").is_some_and(|r| r["restarts"] == 1 && r["status"] == "running")
    })
    .await;
    g.entitle("payments", "g-ent").await;
    g.decided("g-ent").await;
    live_engines_until(&node, &["engine:globex:payments"]).await;
    // And acme's next signal brings its engine back (globex's goes).
    send(&c, &pay("payments", "a-1")).await;
    assert_eq!(c.decided("a-1").await["status"], "completed");
    live_engines_until(&node, &["engine:acme:payments"]).await;
}

/// Waits until the live engines (engine_sup's children) are `names`.
async fn live_engines_until(node: &Node, names: &[&str]) {
    node.admin_until("/admin/tree", &format!("live engines {names:?}"), |t| {
        find(t, "engine_sup").is_some_and(|s| {
            let live: Vec<&str> = children(s)
                .iter()
                .map(|c| c["name"].as_str().unwrap())
                .collect();
            live == names
        })
    })
    .await;
}

#[tokio::test]
async fn an_engine_passivated_while_a_breaker_halted_it_resumes_once_the_breaker_closes() {
    // One live engine at most. acme's `heldpay` engine is halted by its
    // breaker, then passivated by globex's first signal. A reset resumes
    // the live engines the breaker halted, and starts the passive ones it
    // held, which record their `jidoka_resume` then, with no signal sent
    // (one passive had waited for its next signal, and until then its
    // checkpoint said `halted`: GET /admin/tenants showed it halted, held
    // by no breaker, after every outage).
    let gw = Gateway::start().await;
    let (node, c, g) = heldpay_halted_by_its_breaker(&gw).await;
    g.entitle("payments", "g-ent").await;
    g.decided("g-ent").await;
    let path = "/admin/tenants/acme/heldpay";
    let e = node
        .admin_until(path, "heldpay passivated", |e| e["active"] == false)
        .await;
    assert_eq!(e["state"], "halted", "the breaker is still open: {e}");
    assert_eq!(resumes(&node, "heldpay").await, 0);

    gw.set(GatewayMode::Ok);
    let (status, body) = node.admin(Method::POST, "/admin/breakers/held/reset").await;
    assert_eq!(status, 200, "{body}");
    let (_, e) = node.admin(Method::GET, path).await;
    assert_eq!(e["state"], "stable", "{e}");
    let (_, halted) = node.admin(Method::GET, "/admin/tenants?state=halted").await;
    assert_eq!(halted, json!([]));
    wait_until(
        &node,
        "heldpay's jidoka_resume, with no signal sent",
        || async { resumes(&node, "heldpay").await == 1 },
    )
    .await;
    // And it goes on so: the next payment is made.
    send(&c, &pay("heldpay", "h-3")).await;
    assert_eq!(c.decided("h-3").await["status"], "completed");
    assert_eq!(resumes(&node, "heldpay").await, 1);
}

/// acme's `jidoka_resume` receipts for `sku`.
async fn resumes(node: &Node, sku: &str) -> usize {
    receipts_of(node, sku, "jidoka_resume").await
}

/// acme's receipts of `kind` for `sku`.
async fn receipts_of(node: &Node, sku: &str, kind: &str) -> usize {
    node.all_receipts()
        .await
        .iter()
        .filter(|r| r["tenant_id"] == "acme" && r["sku_id"] == sku && r["kind"] == kind)
        .count()
}

/// Polls `f` every 50 ms until it holds; fails after 30 s naming `what`,
/// with the tail of `node`'s log.
async fn wait_until<F, Fut>(node: &Node, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !f().await {
        assert!(
            std::time::Instant::now() < end,
            "{what}: not within 30 s\nthe node's log, last lines:\n{}",
            node.log_tail(100)
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_passive_engine_refills_its_quota_when_the_period_ends_with_no_signal_sent() {
    // One live engine at most. acme's `refill` engine runs out of quota and
    // is passivated by globex's first signal. Its period ends while it is
    // passive: the router starts it then, and it records `quota_refilled`
    // with no signal sent (it had waited for its next signal), and it is
    // passivated again without passivating globex's live engine. The same
    // across a restart: the router reads what passive engines wait for
    // from their checkpoints when it starts.
    let extra = r#"
[skus.refill]
policies = []
quota = 1
quota_period_secs = 6
"#;
    let mut node = Node::start_with(
        &config("http://127.0.0.1:9/unused", extra),
        &[
            ("TAI_JIDOKA__MAX_ACTIVE_ENGINES", "1"),
            ("RUST_LOG", "info,tai_jidoka::router=debug"),
        ],
    );
    let c = Client::new(&node, "acme", "acme-secret");
    let g = Client::new(&node, "globex", "globex-secret");
    entitle(&c, "refill").await;
    for round in 0..2 {
        let (paid, refused) = (format!("r-{round}-1"), format!("r-{round}-2"));
        send(&c, &pay("refill", &paid)).await;
        send(&c, &pay("refill", &refused)).await;
        assert_eq!(c.decided(&paid).await["status"], "completed");
        assert_eq!(c.decided(&refused).await["reason"], "quota_exhausted");
        let ent = format!("g-ent-{round}");
        g.entitle("payments", &ent).await;
        g.decided(&ent).await;
        let e = node
            .admin_until("/admin/tenants/acme/refill", "refill passivated", |e| {
                e["active"] == false
            })
            .await;
        assert_eq!(e["state"], "quota_exhausted", "{e}");
        assert_eq!(
            receipts_of(&node, "refill", "quota_refilled").await,
            round,
            "the period ended before the engine was passivated: this test needs a longer quota_period_secs"
        );
        if round == 1 {
            node.restart();
        }
        wait_until(&node, "quota_refilled, with no signal sent", || async {
            receipts_of(&node, "refill", "quota_refilled").await == round + 1
        })
        .await;
        let e = node
            .admin_until("/admin/tenants/acme/refill", "refill stable", |e| {
                e["state"] == "stable"
            })
            .await;
        assert_eq!(e["quota_remaining"], 1, "{e}");
        // Started for its refill alone, it is passivated again at once, and
        // it took the one live slot from no engine: globex's stays live.
        node.admin_until("/admin/tenants/acme/refill", "refill passive again", |e| {
            e["active"] == false
        })
        .await;
        if round == 0 {
            let (_, e) = node
                .admin(Method::GET, "/admin/tenants/globex/payments")
                .await;
            assert_eq!(e["active"], true, "the wake passivated a live engine: {e}");
            // Once: its start recorded the refill before the passivation
            // could stop it, so the router did not have to start it again.
            let wakes = node
                .log()
                .matches("starting passive engines for a transition due")
                .count();
            assert_eq!(wakes, 1, "{}", node.log_tail(40));
        }
    }
}

#[tokio::test]
async fn more_passive_engines_due_at_once_than_engine_sup_has_room_for_all_refill() {
    // One live engine at most, so engine_sup runs 16 engines at most (live
    // and draining). 40 of acme's engines run out of quota and wait,
    // passive, for their period's end; the node is stopped past it, so its
    // start finds all 40 due at once. The router starts no more a tick than
    // engine_sup has room for, and every engine records its refill.
    const SKUS: usize = 40;
    const PERIOD_MS: u64 = 10_000;
    let skus: Vec<String> = (0..SKUS).map(|i| format!("m{i:02}")).collect();
    let extra: String = skus
        .iter()
        .map(|s| {
            format!(
                "\n[skus.{s}]\npolicies = []\nquota = 1\nquota_period_secs = {}\n",
                PERIOD_MS / 1000
            )
        })
        .collect();
    let mut node = Node::start_with(
        &config("http://127.0.0.1:9/unused", &extra),
        &[("TAI_JIDOKA__MAX_ACTIVE_ENGINES", "1")],
    );
    let c = Client::new(&node, "acme", "acme-secret");
    for s in &skus {
        entitle(&c, s).await;
        send(&c, &pay(s, &format!("{s}-1"))).await;
        send(&c, &pay(s, &format!("{s}-2"))).await;
    }
    for s in &skus {
        assert_eq!(
            c.decided(&format!("{s}-2")).await["reason"],
            "quota_exhausted"
        );
    }
    let (_, list) = node
        .admin(Method::GET, "/admin/tenants?state=quota_exhausted")
        .await;
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(SKUS),
        "a period ended before the node stopped: this test needs a longer quota_period_secs: {list}"
    );
    let last = node
        .all_receipts()
        .await
        .iter()
        .filter(|r| r["kind"] == "quota_exceeded")
        .filter_map(|r| r["timestamp_ms"].as_u64())
        .max()
        .unwrap();
    node.stop();
    // Every period ends within PERIOD_MS of its last refusal.
    let past = last + PERIOD_MS + 500;
    let end = std::time::Instant::now() + std::time::Duration::from_millis(PERIOD_MS + 5_000);
    while unix_now() * 1000 < past {
        assert!(std::time::Instant::now() < end, "the clock stood still");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    node.restart();
    wait_until(
        &node,
        "every engine refilled, with no signal sent",
        || async {
            let refilled: std::collections::HashSet<String> = node
                .all_receipts()
                .await
                .iter()
                .filter(|r| r["kind"] == "quota_refilled")
                .filter_map(|r| r["sku_id"].as_str().map(str::to_string))
                .collect();
            refilled.len() == SKUS
        },
    )
    .await;
    assert!(
        !node.log().contains("cannot start a passive engine"),
        "{}",
        node.log_tail(40)
    );
}

#[tokio::test]
async fn an_operator_halt_of_an_engine_a_breaker_halted_outlasts_the_breaker() {
    // acme's `heldpay` engine is halted by its breaker, then by an operator.
    // The halt is the operator's from then on: the breaker's close resumes
    // it neither live nor at its next start (it was checkpointed only
    // with a state change, so a passivation handed it back to the breaker),
    // and its alert is the engine's own, resolved by the operator's resume.
    let gw = Gateway::start().await;
    let (node, c, g) = heldpay_halted_by_its_breaker(&gw).await;
    let path = "/admin/tenants/acme/heldpay";
    let (status, body) = node
        .admin_with_body(
            Method::POST,
            &format!("{path}/halt"),
            r#"{"reason": "audit"}"#,
        )
        .await;
    assert_eq!((status, &body["state"]), (200, &json!("halted")), "{body}");
    let own_key = "engine:acme:heldpay:halted";
    let alerts = node
        .admin_until("/admin/alerts", "the engine's own halt alert", |list| {
            list.as_array().unwrap().iter().any(|a| a["key"] == own_key)
        })
        .await;
    let own: Vec<&Value> = alerts
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["key"] == own_key)
        .collect();
    assert_eq!(
        (own.len(), &own[0]["kind"], &own[0]["resolve"]),
        (1, &json!("engine_halted"), &json!(false)),
        "{alerts}"
    );

    // Passivated (globex's signal takes the one live slot), then the
    // breaker closes: the engine stays halted, shown and at its start.
    g.entitle("payments", "g-ent").await;
    g.decided("g-ent").await;
    node.admin_until(path, "heldpay passivated", |e| e["active"] == false)
        .await;
    gw.set(GatewayMode::Ok);
    let (status, body) = node.admin(Method::POST, "/admin/breakers/held/reset").await;
    assert_eq!(status, 200, "{body}");
    let (_, e) = node.admin(Method::GET, path).await;
    assert_eq!(e["state"], "halted", "{e}");
    send(&c, &pay("heldpay", "h-3")).await;
    let s = c.decided("h-3").await;
    assert_eq!(
        (&s["status"], &s["reason"]),
        (&json!("deadlettered"), &json!("halted")),
        "{s}"
    );
    assert_eq!(engine_state(&node, "heldpay").await, "halted");

    // The operator's resume starts the line and resolves the engine's alert.
    let (status, body) = node.admin(Method::POST, &format!("{path}/resume")).await;
    assert_eq!((status, &body["state"]), (200, &json!("stable")), "{body}");
    node.admin_until("/admin/alerts", "the halt alert resolved", |list| {
        list.as_array()
            .unwrap()
            .iter()
            .any(|a| a["key"] == own_key && a["resolve"] == true)
    })
    .await;
    send(&c, &pay("heldpay", "h-4")).await;
    assert_eq!(c.decided("h-4").await["status"], "completed");
}

#[tokio::test]
async fn halt_and_resume_refuse_a_tenant_or_sku_not_configured() {
    let node = Node::start_with(&test_config(""), &[]);
    for (path, message) in [
        (
            "/admin/tenants/nobody/payments/halt",
            "no tenant \"nobody\" in the configuration",
        ),
        (
            "/admin/tenants/acme/nosku/resume",
            "no SKU \"nosku\" in the configuration",
        ),
    ] {
        let (status, body) = node.admin(Method::POST, path).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{body}"
        );
        assert_eq!(body["error"]["message"], message);
    }
    // No engine was started for them, nothing went into the ledger.
    let (_, engines) = node.admin(Method::GET, "/admin/tenants").await;
    assert_eq!(engines, json!([]));
    assert!(node.all_receipts().await.is_empty());
    // A halt's body is `{"reason": "..."}` or nothing; anything else is
    // refused with what is wrong, and halts nothing.
    let halt = "/admin/tenants/acme/payments/halt";
    for (body, message) in [
        (
            r#"{"reason": 5}"#,
            "the body must be {\"reason\": \"...\"}: invalid type: integer `5`, expected a string at line 1 column 12",
        ),
        (
            "reason=audit",
            "the body must be {\"reason\": \"...\"}: expected value at line 1 column 1",
        ),
        (
            r#"{"reason": "audit", "until": 5}"#,
            "the body must be {\"reason\": \"...\"}: unknown field `until`, expected `reason` at line 1 column 27",
        ),
        (r#"{"reason": " "}"#, "reason must not be empty"),
    ] {
        let (status, answer) = node.admin_with_body(Method::POST, halt, body).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (400, Some("invalid_request")),
            "{body}: {answer}"
        );
        assert_eq!(answer["error"]["message"], message, "{body}");
    }
    assert!(node.all_receipts().await.is_empty());
    // A configured pair is halted as before, with its reason or the default.
    let (status, body) = node
        .admin_with_body(Method::POST, halt, r#"{"reason": "audit"}"#)
        .await;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("halted")),
        "{body}"
    );
    let (_, resumed) = node
        .admin(Method::POST, "/admin/tenants/acme/payments/resume")
        .await;
    assert_eq!(resumed["state"], "stable", "{resumed}");
    let (status, body) = node.admin(Method::POST, halt).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("halted")));
    let reasons: Vec<Value> = node
        .all_receipts()
        .await
        .into_iter()
        .filter(|r| r["kind"] == "jidoka_halt")
        .map(|r| r["reason"].clone())
        .collect();
    assert_eq!(reasons, [json!("audit"), json!("operator halt")]);
}

#[tokio::test]
async fn a_corrupt_checkpoint_of_a_passive_engine_is_logged_not_hidden() {
    let mut node = Node::start_with(&test_config(""), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent").await;
    c.entitle("tight", "ent-t").await;
    node.signal(libc::SIGTERM);
    assert_eq!(
        node.wait_exit(std::time::Duration::from_secs(15)).code(),
        Some(0)
    );
    // Damage one engine's checkpoint while the node is down.
    {
        let store = tai_store::Store::open(&node.data_dir()).unwrap();
        let writes = tai_core::msg::WriteSet {
            checkpoints: vec![("acme".into(), "payments".into(), b"{\"state\":".to_vec())],
            ..Default::default()
        };
        store.commit(&[], None, &writes).unwrap();
        store.flush().unwrap();
    }
    node.restart();
    let (status, engines) = node.admin(Method::GET, "/admin/tenants").await;
    assert_eq!(status, 200);
    let listed: Vec<&str> = engines
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["sku_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["tight"], "{engines}");
    node.log_until("corrupt checkpoint of a passivated engine")
        .await;
    let line = node
        .log()
        .lines()
        .find(|l| l.contains("corrupt checkpoint"))
        .unwrap()
        .to_string();
    assert!(
        line.contains("tenant=acme") && line.contains("sku=payments"),
        "{line}"
    );
}

#[tokio::test]
async fn a_quota_changed_in_the_config_applies_at_the_restart_to_what_was_used() {
    let sku = |quota: u64| {
        format!("\n[skus.metered]\npolicies = []\nquota = {quota}\nquota_period_secs = 3600\n")
    };
    let mut node = Node::start_with(&config("http://127.0.0.1:9/unused", &sku(10)), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    entitle(&c, "metered").await;
    for i in 0..3 {
        send(&c, &pay("metered", &format!("m-{i}"))).await;
    }
    for i in 0..3 {
        assert_eq!(c.decided(&format!("m-{i}")).await["status"], "completed");
    }
    let remaining = |e: &Value| e["quota_remaining"].as_u64();
    let (_, e) = node.admin(Method::GET, "/admin/tenants/acme/metered").await;
    assert_eq!(remaining(&e), Some(7), "{e}");

    // Raised to 20 and restarted: 3 of it are used this period. Read from
    // the checkpoint (the engine is not running yet), then from the engine.
    let restart = |node: &mut Node, quota: u64| {
        node.restart_with_config(&config("http://127.0.0.1:9/unused", &sku(quota)));
    };
    restart(&mut node, 20);
    let (_, e) = node.admin(Method::GET, "/admin/tenants/acme/metered").await;
    assert_eq!(
        (remaining(&e), e["active"].as_bool()),
        (Some(17), Some(false)),
        "{e}"
    );
    let c = Client::new(&node, "acme", "acme-secret");
    send(&c, &pay("metered", "m-3")).await;
    assert_eq!(c.decided("m-3").await["status"], "completed");
    let (_, e) = node.admin(Method::GET, "/admin/tenants/acme/metered").await;
    assert_eq!(remaining(&e), Some(16), "{e}");

    // Lowered to 4 (below what was used): nothing is left this period.
    restart(&mut node, 4);
    let c = Client::new(&node, "acme", "acme-secret");
    send(&c, &pay("metered", "m-4")).await;
    let m4 = c.decided("m-4").await;
    assert_eq!(m4["reason"], "quota_exhausted", "{m4}");
    assert_eq!(engine_state(&node, "metered").await, "quota_exhausted");
}
