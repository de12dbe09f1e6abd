//! Kanban on RabbitMQ (SPEC §3.1, §3.3, §4; `kanban.backend = "amqp"`): real
//! nodes against the real broker on 127.0.0.1:5672, each test on queues of
//! its own. The tests of this binary run one at a time (`.config/nextest.toml`):
//! one of them stops the broker's application.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use reqwest::Method;
use serde_json::{json, Value};
use tai_tests::*;

fn pay(id: &str) -> Value {
    signal(
        "acme",
        "payments",
        "payment",
        id,
        json!({"amount": 25.0, "currency": "USD", "customer_id": format!("cust-{id}")}),
    )
}

fn amqp_node(queue: &str) -> Node {
    Node::start_with(&test_config(&amqp_kanban(queue)), &[])
}

async fn connected(node: &Node) -> Value {
    node.admin_until("/admin/queue", "a broker connection", |q| {
        q["backend"] == "amqp" && q["broker"]["connection"] == "connected"
    })
    .await
}

/// The amqp backend with a broker that cannot be reached.
fn unreachable_kanban(queue: &str) -> String {
    format!(
        "\n[kanban]\nbackend = \"amqp\"\namqp_url = \"amqp://guest:guest@127.0.0.1:1/%2f\"\namqp_queue = \"{queue}\"\n"
    )
}

/// Sends `body` three times more: each a `200` duplicate.
async fn retried_as_duplicates(c: &Client, body: &Value) {
    for _ in 0..3 {
        let a = c.post(body).await.unwrap();
        assert_eq!(
            (a.status, &a.body["duplicate"]),
            (200, &json!(true)),
            "{}",
            a.body
        );
    }
}

/// Once nothing is in flight or waiting in the broker: the broker
/// delivered `n` messages to the node.
async fn assert_delivered(node: &Node, n: u64, what: &str) {
    let q = node
        .admin_until("/admin/queue", "nothing in flight", |q| {
            q["in_flight"] == 0 && q["broker"]["broker_depth"] == 0
        })
        .await;
    assert_eq!(q["broker"]["delivered"], n, "{what}: {q}");
}

/// Decision receipts (`action_generated`) per signal id.
fn decisions(receipts: &[Value]) -> HashMap<String, usize> {
    let mut n = HashMap::new();
    for r in receipts.iter().filter(|r| r["kind"] == "action_generated") {
        *n.entry(r["signal_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    n
}

/// Lines of a `rabbitmqctl list_*` table without headers.
fn table(args: &[&str]) -> Vec<Vec<String>> {
    let mut all = vec![args[0], "-q", "--no-table-headers"];
    all.extend(&args[1..]);
    rabbitmqctl(&all)
        .unwrap()
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

async fn verify_ok(node: &Node) {
    let (status, v) = node.admin(Method::GET, "/admin/receipts/verify").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["ok"], true, "{v}");
}

#[tokio::test]
async fn the_topology_is_declared_and_200_signals_are_decided_through_the_broker() {
    ensure_broker();
    let queue = unique_queue("flow");
    let _cleanup = QueueCleanup(queue.clone());
    let node = amqp_node(&queue);
    connected(&node).await;

    let dlx = format!("{queue}.deadletter");
    let queues = table(&["list_queues", "name", "durable", "arguments"]);
    let work = queues
        .iter()
        .find(|l| l[0] == queue)
        .unwrap_or_else(|| panic!("no queue {queue}: {queues:?}"));
    assert_eq!(work[1], "true", "durable: {work:?}");
    for arg in [
        format!("{{\"x-dead-letter-exchange\",\"{dlx}\"}}"),
        "{\"x-single-active-consumer\",true}".to_string(),
        "{\"x-queue-type\",\"classic\"}".to_string(),
    ] {
        assert!(work[2].contains(&arg), "{arg} in {work:?}");
    }
    assert!(
        queues.iter().any(|l| l[0] == dlx && l[1] == "true"),
        "a durable dead-letter queue: {queues:?}"
    );
    let exchanges = table(&["list_exchanges", "name", "type", "durable"]);
    assert!(
        exchanges.contains(&vec![dlx.clone(), "direct".into(), "true".into()]),
        "a durable direct dead-letter exchange: {exchanges:?}"
    );
    let bindings = table(&[
        "list_bindings",
        "source_name",
        "destination_name",
        "routing_key",
    ]);
    assert!(
        bindings.contains(&vec![dlx.clone(), dlx.clone(), queue.clone()]),
        "the dead-letter queue is bound: {bindings:?}"
    );

    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent-1").await;
    let mut senders = Vec::new();
    for w in 0..8 {
        let c = c.clone();
        senders.push(tokio::spawn(async move {
            for i in 0..25 {
                let a = c.post(&pay(&format!("p-{w}-{i}"))).await.unwrap();
                assert_eq!(a.status, 202, "{}", a.body);
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    let dup = c.post(&pay("p-0-0")).await.unwrap();
    assert_eq!(dup.status, 200, "{}", dup.body);
    assert_eq!(dup.body["duplicate"], true);

    for w in 0..8 {
        for i in 0..25 {
            let s = c.decided(&format!("p-{w}-{i}")).await;
            assert_eq!(s["status"], "completed", "{s}");
        }
    }
    let d = decisions(&node.all_receipts().await);
    assert_eq!(d.len(), 200, "{d:?}");
    assert!(d.values().all(|&n| n == 1), "one decision each: {d:?}");
    verify_ok(&node).await;
    let q = node
        .admin_until("/admin/queue", "the broker queue empty", |q| {
            q["broker"]["broker_depth"] == 0 && q["in_flight"] == 0
        })
        .await;
    assert_eq!(q["broker"]["queue"], queue.as_str());
    assert!(q["broker"]["delivered"].as_u64().unwrap() >= 201, "{q}");
    assert_eq!(q["broker"]["buffered"], 0);
    let (status, ready) = reqwest_get(&node.url("/ready")).await;
    assert_eq!(status, 200, "{ready}");
}

async fn reqwest_get(url: &str) -> (u16, Value) {
    let r = reqwest::get(url).await.expect("GET");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Starts the broker's application again when the test ends, however it ends.
struct BrokerBack;

impl Drop for BrokerBack {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["start_app"]);
    }
}

#[tokio::test]
async fn a_broker_outage_is_buffered_locally_and_every_signal_is_decided_once() {
    ensure_broker();
    let queue = unique_queue("outage");
    let _cleanup = QueueCleanup(queue.clone());
    let node = amqp_node(&queue);
    connected(&node).await;
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent-1").await;

    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let refused = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for w in 0..6 {
        let (c, accepted, refused, stop) =
            (c.clone(), accepted.clone(), refused.clone(), stop.clone());
        senders.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let id = format!("o-{w}-{i}");
                i += 1;
                match c.post(&pay(&id)).await {
                    Ok(a) if a.status == 202 => accepted.lock().unwrap().push(id),
                    Ok(a) => refused
                        .lock()
                        .unwrap()
                        .push(format!("{id}: {} {}", a.status, a.body)),
                    Err(e) => refused.lock().unwrap().push(format!("{id}: {e}")),
                }
            }
        }));
    }
    let count = |v: &Arc<Mutex<Vec<String>>>| v.lock().unwrap().len();
    let until = |n: usize, what: &str| {
        let accepted = accepted.clone();
        let what = what.to_string();
        async move {
            let end = Instant::now() + Duration::from_secs(60);
            while accepted.lock().unwrap().len() < n {
                assert!(Instant::now() < end, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };

    until(100, "100 signals through the broker").await;
    let _back = BrokerBack;
    tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]))
        .await
        .unwrap()
        .expect("stop_app");
    let at_stop = count(&accepted);
    // Still 202 (into the local buffer), and not ready, with the reason.
    until(
        at_stop + 100,
        "100 signals accepted while the broker is down",
    )
    .await;
    let (status, ready) = reqwest_get(&node.url("/ready")).await;
    assert_eq!(status, 503, "{ready}");
    assert!(
        ready["reason"]
            .as_str()
            .unwrap()
            .contains("broker unreachable"),
        "{ready}"
    );
    let q = node
        .admin_until("/admin/queue", "signals in the fallback buffer", |q| {
            q["broker"]["buffered"].as_u64().unwrap_or(0) > 0
        })
        .await;
    assert_eq!(q["broker"]["connection"], "connecting", "{q}");

    tokio::task::spawn_blocking(|| rabbitmqctl(&["start_app"]))
        .await
        .unwrap()
        .expect("start_app");
    let at_start = count(&accepted);
    until(at_start + 100, "100 signals after the broker is back").await;
    stop.store(true, Ordering::SeqCst);
    for s in senders {
        s.await.unwrap();
    }
    assert!(
        refused.lock().unwrap().is_empty(),
        "refused: {:?}",
        refused.lock().unwrap()
    );

    node.admin_until(
        "/admin/queue",
        "the buffer drained and everything decided",
        |q| {
            q["broker"]["connection"] == "connected"
                && q["broker"]["buffered"] == 0
                && q["broker"]["broker_depth"] == 0
                && q["in_flight"] == 0
        },
    )
    .await;
    let ids = accepted.lock().unwrap().clone();
    for id in &ids {
        let s = c.decided(id).await;
        assert_eq!(s["status"], "completed", "{s}");
    }
    let receipts = node.all_receipts().await;
    let d = decisions(&receipts);
    for id in &ids {
        assert_eq!(
            d.get(id),
            Some(&1),
            "{id} decided exactly once: {:?}\n{}",
            receipts
                .iter()
                .filter(|r| r["signal_id"] == id.as_str())
                .collect::<Vec<_>>(),
            node.log()
        );
    }
    assert_eq!(d.len(), ids.len(), "nothing else was decided");
    verify_ok(&node).await;
    assert!(
        node.log().contains("fallback buffer drained"),
        "{}",
        node.log()
    );
    let (status, _) = reqwest_get(&node.url("/ready")).await;
    assert_eq!(status, 200);
}

fn header(props: &BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// A producer of our own on the broker, as another application would be:
/// its connection (kept open) and a channel with publisher confirms.
async fn producer() -> (Connection, lapin::Channel) {
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (conn, ch)
}

/// Publishes `body` straight to `queue`, persistent, and waits for the confirm.
async fn publish(ch: &lapin::Channel, queue: &str, body: &[u8], props: BasicProperties) {
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        props.with_delivery_mode(2),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test]
async fn a_retry_of_a_signal_recorded_but_never_published_is_published_and_decided() {
    // The amqp backend writes a signal's `accepted` record before it
    // publishes it (the record is the dedupe key), and answers 202 on the
    // broker's confirm. A node killed between the two leaves the record
    // and no message; the client, with no answer, retries. That retry was
    // answered 200 (a duplicate, `accepted`) and the signal was never
    // decided: found by a kill -9 soak. Now it is published again.
    ensure_broker();
    let queue = unique_queue("unpublished");
    let _cleanup = QueueCleanup(queue.clone());
    let mut node = amqp_node(&queue);
    connected(&node).await;
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent").await;
    c.decided("ent").await;
    node.stop();
    let body = serde_json::to_vec(&pay("lost-1")).unwrap();
    {
        let store = tai_store::Store::open(&node.data_dir()).unwrap();
        let s = tai_core::signal::parse_signal(&body, unix_now() * 1000, String::new).unwrap();
        store.record_accepted(&[s]).unwrap();
        store.flush().unwrap();
    }
    node.restart();
    connected(&node).await;
    let c = Client::new(&node, "acme", "acme-secret");
    let a = c.post(&pay("lost-1")).await.unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["duplicate"], true, "{}", a.body);
    assert_eq!(c.decided("lost-1").await["status"], "completed");
    // A second retry, once it is decided, is a plain duplicate: decided once.
    let a = c.post(&pay("lost-1")).await.unwrap();
    assert_eq!(
        (a.status, &a.body["status"]),
        (200, &json!("completed")),
        "{}",
        a.body
    );
    let receipts = node.all_receipts().await;
    assert_eq!(decisions(&receipts).get("lost-1"), Some(&1));
    verify_ok(&node).await;
}

#[tokio::test]
async fn a_retry_of_a_signal_the_node_holds_parked_adds_no_copy() {
    // Held here (parked for an entitlement), the signal is in the broker:
    // its retries are plain duplicates. Published again, each would be a
    // copy holding a prefetch slot until the entitlement. (Identical
    // retries are replays: with the signal still `accepted`, ingress leaves
    // them to the queue too.)
    let (node, _, _cleanup) = parked_on_amqp("held-retry", 1).await;
    let c = Client::new(&node, "acme", "acme-secret");
    retried_as_duplicates(&c, &signal("acme", "waiting", "job", "w-0", json!({}))).await;
    // A copy would be published before the entitlement (the fallback
    // buffer goes out first), so delivered before it is decided.
    c.entitle("waiting", "ent-w").await;
    assert_eq!(c.decided("w-0").await["status"], "completed");
    assert_delivered(&node, 2, "w-0 and ent-w, once each").await;
}

#[tokio::test]
async fn retries_of_a_signal_in_the_fallback_buffer_add_no_copy() {
    // The broker unreachable: a payment waits in the fallback buffer. Its
    // retries are plain duplicates; each used to be buffered again (a
    // still-`accepted` signal this node does not hold is published again),
    // a copy per retry for the broker to deliver once it is back.
    ensure_broker();
    let queue = unique_queue("buffered-retry");
    let _cleanup = QueueCleanup(queue.clone());
    let unreachable = unreachable_kanban(&queue);
    let mut node = Node::start_with(&test_config(&unreachable), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    assert_eq!(c.post(&pay("br-1")).await.unwrap().status, 202);
    retried_as_duplicates(&c, &pay("br-1")).await;
    let (_, q) = node.admin(Method::GET, "/admin/queue").await;
    assert_eq!(q["broker"]["buffered"], 1, "{q}");
    // The broker back: the one copy is published, then decided.
    node.restart_with_config(&test_config(&amqp_kanban(&queue)));
    connected(&node).await;
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "br-ent").await;
    assert_eq!(c.decided("br-1").await["status"], "completed");
    assert_delivered(&node, 2, "br-1 and br-ent, once each").await;
}

/// An amqp node on a queue of its own (`unique_queue(name)`, deleted when
/// the guard drops) with acme's `w-0`..`w-{n-1}` parked in its unentitled
/// `waiting` engine ([`waiting_sku`] of an hour).
async fn parked_on_amqp(name: &str, n: usize) -> (Node, String, QueueCleanup) {
    ensure_broker();
    let queue = unique_queue(name);
    let cleanup = QueueCleanup(queue.clone());
    let waiting = waiting_sku(3600);
    let node = Node::start_with(
        &test_config(&format!("{}{waiting}", amqp_kanban(&queue))),
        &[],
    );
    connected(&node).await;
    let c = Client::new(&node, "acme", "acme-secret");
    post_waiting(&c, n).await;
    node.admin_until("/admin/queue", "all parked", |q| q["parked"] == n)
        .await;
    (node, queue, cleanup)
}

#[tokio::test]
async fn a_switch_to_embedded_names_the_signals_left_in_the_broker() {
    // Three signals wait, parked for an entitlement, on an amqp node. It is
    // restarted on the embedded queue, which does not read the broker's:
    // the log says so, with how many, instead of leaving them silently
    // undecided. A client's retry of one is queued and decided there (it
    // could be a signal whose publish a kill cut, in no queue at all: it
    // was answered `200 duplicate` and never decided). Switched back, the
    // others are decided, and the broker's copy of the retried one is not
    // decided again.
    let (mut node, queue, _cleanup) = parked_on_amqp("left", 3).await;
    let waiting = waiting_sku(3600);
    node.restart_with_config(&test_config(&waiting));
    node.log_until("signals accepted on the amqp queue this data dir last used")
        .await;
    let log = node.log();
    assert!(log.contains("count=3"), "{}", node.log_tail(20));
    assert!(log.contains(&queue), "{}", node.log_tail(20));
    // Said at every start while they wait, not only the first.
    node.restart_with_config(&test_config(&waiting));
    node.log_until("signals accepted on the amqp queue this data dir last used")
        .await;
    assert!(node.log().contains("count=3"), "{}", node.log_tail(20));
    let c = Client::new(&node, "acme", "acme-secret");
    let w0 = signal("acme", "waiting", "job", "w-0", json!({}));
    assert_eq!(c.post(&w0).await.unwrap().status, 202, "queued anew");
    c.entitle("waiting", "ent-left").await;
    assert_eq!(c.decided("w-0").await["status"], "completed");
    let again = c.post(&w0).await.unwrap();
    assert_eq!(
        (again.status, &again.body["duplicate"]),
        (200, &json!(true)),
        "{:?}",
        again.body
    );

    let amqp = test_config(&format!("{}{waiting}", amqp_kanban(&queue)));
    node.restart_with_config(&amqp);
    connected(&node).await;
    let c = Client::new(&node, "acme", "acme-secret");
    for i in 1..3 {
        assert_eq!(c.decided(&format!("w-{i}")).await["status"], "completed");
    }
    // The broker's copy of w-0 came too, and was only acknowledged.
    node.admin_until("/admin/queue", "the broker's queue emptied", |q| {
        q["broker"]["broker_depth"] == 0 && q["in_flight"] == 0 && q["parked"] == 0
    })
    .await;
    assert_eq!(generated(&node).await, ["w-0", "w-1", "w-2"]);
}

/// The signals of the ledger's `action_generated` receipts, in order.
async fn generated(node: &Node) -> Vec<String> {
    node.all_receipts()
        .await
        .into_iter()
        .filter(|r| r["kind"] == "action_generated")
        .map(|r| r["signal_id"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// `tai drain-amqp` on `node`'s config: (success, stdout, stderr).
fn drain_amqp(node: &Node) -> (bool, String, String) {
    drain_amqp_args(node, &[])
}

/// [`drain_amqp`] with more arguments.
fn drain_amqp_args(node: &Node, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(tai_bin())
        .args(["drain-amqp", "--config"])
        .arg(node.config_path())
        .args(args)
        .current_dir(node.data_dir().parent().unwrap())
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[tokio::test]
async fn tai_drain_amqp_hands_what_the_broker_holds_to_an_embedded_node() {
    // Three signals wait, parked for an entitlement, on an amqp node. The
    // drain is refused while the node runs (its data dir) and while
    // anything consumes the queue; then it moves them into the data dir,
    // and the node, restarted on the embedded queue, decides them, once.
    let (mut node, queue, _cleanup) = parked_on_amqp("drain", 3).await;
    let waiting = waiting_sku(3600);
    let (ok, _, err) = drain_amqp(&node);
    assert!(!ok && err.contains("stop the node first"), "{err}");
    node.stop();
    let (ok, _, err) = drain_amqp_args(&node, &["--queue", "tai-test.no-such-queue"]);
    assert!(!ok, "{err}");
    assert_eq!(
        err.lines().count(),
        1,
        "one line, ours, not lapin's too: {err}"
    );
    assert!(
        err.contains("no queue") && err.contains("tai-test.no-such-queue"),
        "{err}"
    );

    // Beside them in the queue: a message that is not a signal, and a
    // second copy of w-0 (a republish after a lost confirm, say).
    let (_conn, ch) = producer().await;
    publish(&ch, &queue, b"not a signal", BasicProperties::default()).await;
    let mut copy = signal("acme", "waiting", "job", "w-0", json!({}));
    copy["received_at_ms"] = json!(1);
    let bytes = serde_json::to_vec(&copy).unwrap();
    publish(&ch, &queue, &bytes, BasicProperties::default()).await;
    let (other, reader) = producer().await;
    reader
        .basic_consume(
            queue.as_str().into(),
            "another-reader".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (ok, _, err) = drain_amqp(&node);
    assert!(!ok && err.contains("1 consumer(s) read"), "{err}");
    other.close(200, "done".into()).await.unwrap();

    let (ok, out, err) = drain_amqp(&node);
    assert!(ok, "{out}{err}");
    assert!(out.contains("moved 3 signal(s)"), "{out}");
    assert!(out.contains("1 already held or decided"), "{out}");
    assert!(out.contains("1 message(s) that are not signals"), "{out}");
    // Again: what it moved is held now; the message that is not a signal
    // is left where it was.
    let (ok, out, _) = drain_amqp(&node);
    assert!(ok && out.contains("moved 0 signal(s)"), "{out}");
    assert!(out.contains("1 message(s) that are not signals"), "{out}");

    std::fs::write(node.config_path(), test_config(&waiting)).unwrap();
    node.restart();
    node.log_until("moved=3").await;
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("waiting", "ent-drain").await;
    for i in 0..3 {
        assert_eq!(c.decided(&format!("w-{i}")).await["status"], "completed");
    }
    assert_eq!(generated(&node).await, ["w-0", "w-1", "w-2"]);
    assert!(
        !node
            .log()
            .contains("signals accepted on the amqp queue this data dir last used"),
        "{}",
        node.log_tail(20)
    );
}

/// `tai drain-amqp` on `node`'s config, started: the process (its stdout
/// piped) and the file its log goes to.
fn drain_started(node: &Node) -> (std::process::Child, std::path::PathBuf) {
    let log = node.dir.path().join("drain.log");
    let drain = std::process::Command::new(tai_bin())
        .args(["drain-amqp", "--config"])
        .arg(node.config_path())
        .current_dir(node.data_dir().parent().unwrap())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (drain, log)
}

/// A stopped amqp node on a queue of its own in which `n` payments
/// (`{prefix}-{i}`) wait, published while it was down.
async fn backlog_for_a_stopped_node(
    name: &str,
    prefix: &str,
    n: u64,
) -> (Node, String, QueueCleanup) {
    ensure_broker();
    let queue = unique_queue(name);
    let cleanup = QueueCleanup(queue.clone());
    let mut node = amqp_node(&queue);
    connected(&node).await;
    node.stop();
    let (_conn, ch) = producer().await;
    for i in 0..n {
        let mut body = pay(&format!("{prefix}-{i}"));
        body["received_at_ms"] = json!(1);
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&body).unwrap(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    }
    wait_for("the signals published", Duration::from_secs(60), || {
        queue_counts(&queue).filter(|(ready, _)| *ready == n)
    });
    (node, queue, cleanup)
}

#[tokio::test]
async fn tai_drain_amqp_waits_out_a_broker_that_is_down() {
    // Three signals wait on an amqp node, which stops. The broker goes down
    // as the drain starts: it says it tries again, and moves all three
    // once the broker is back.
    let (mut node, _queue, _cleanup) = parked_on_amqp("drain-down", 3).await;
    node.stop();
    let _back = BrokerBack;
    tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]))
        .await
        .unwrap()
        .expect("stop_app");
    let (drain, log) = drain_started(&node);
    wait_for("the drain to try again", Duration::from_secs(30), || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("the broker cut the drain off: trying again")
            .then_some(())
    });
    tokio::task::spawn_blocking(|| rabbitmqctl(&["start_app"]))
        .await
        .unwrap()
        .expect("start_app");
    let out = tokio::task::spawn_blocking(move || drain.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(text.contains("moved 3 signal(s)"), "{text}");
    assert!(text.contains("0 already held or decided"), "{text}");
    let (ok, out, _) = drain_amqp(&node);
    assert!(ok && out.contains("moved 0 signal(s)"), "{out}");
}

#[tokio::test]
async fn a_node_that_connects_counts_the_backlog_waiting_in_the_broker() {
    // Three signals wait in the broker while the node is down. Once it says
    // `connected`, `broker_depth` is known (the work queue's count when it
    // was declared), not null and counted as 0 until the first probe (a
    // script polling `depth == 0` after a restart took a backlog for an
    // empty queue).
    let (mut node, _queue, _cleanup) = backlog_for_a_stopped_node("backlog", "b", 3).await;
    node.restart();
    let q = node
        .admin_until("/admin/queue", "a broker connection", |q| {
            q["broker"]["connection"] == "connected"
        })
        .await;
    assert!(q["broker"]["broker_depth"].is_u64(), "{q}");
    node.log_until("broker_depth=3").await;
}

#[tokio::test]
async fn a_poison_message_is_requeued_once_then_dead_lettered_with_its_reason() {
    ensure_broker();
    let queue = unique_queue("poison");
    let _cleanup = QueueCleanup(queue.clone());
    let node = amqp_node(&queue);
    connected(&node).await;

    // Published straight to the queue, as a foreign producer would: not a signal.
    let (conn, ch) = producer().await;
    let mut headers = FieldTable::default();
    headers.insert(
        "tai-tenant".into(),
        AMQPValue::LongString(LongString::from("acme")),
    );
    // Not a signal; and a signal whose payload no policy could read (a
    // number beyond f64: ingress refuses it, so only a producer past the
    // node can send it).
    let bodies: [(&str, &[u8], &str); 2] = [
        (
            "poison-1",
            b"{\"id\": \"poison-1\", \"not\": \"a signal\"}",
            "missing field `tenant_id`",
        ),
        (
            "poison-2",
            br#"{"id":"poison-2","tenant_id":"acme","sku_id":"payments","kind":"payment","received_at_ms":1,"payload":{"amount":9000,"currency":"XYZ","note":1e400}}"#,
            "payload is not readable JSON: number out of range",
        ),
    ];
    for (id, body, _) in bodies {
        publish(
            &ch,
            &queue,
            body,
            BasicProperties::default()
                .with_message_id(id.into())
                .with_headers(headers.clone()),
        )
        .await;
    }

    let dlq = format!("{queue}.deadletter");
    let end = Instant::now() + Duration::from_secs(30);
    let mut dead = Vec::new();
    while dead.len() < bodies.len() {
        if let Some(m) = ch
            .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            dead.push(m);
            continue;
        }
        assert!(Instant::now() < end, "{} of 2 reached {dlq}", dead.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (id, body, why) in bodies {
        let m = dead
            .iter()
            .find(|m| m.delivery.data == body)
            .unwrap_or_else(|| panic!("{id} not dead-lettered"));
        let reason = header(&m.delivery.properties, "x-tai-deadletter-reason").unwrap();
        assert!(reason.starts_with("poison: malformed message"), "{reason}");
        assert!(reason.contains(why), "{reason}");
        assert_eq!(
            header(&m.delivery.properties, "tai-tenant").as_deref(),
            Some("acme")
        );
    }

    // Each delivered twice (the first time requeued), then out of the work queue.
    let q = node
        .admin_until(
            "/admin/queue",
            "the poison messages out of the queue",
            |q| q["broker"]["broker_depth"] == 0 && q["in_flight"] == 0,
        )
        .await;
    assert_eq!(q["broker"]["delivered"], 4, "{q}");
    assert!(node.log().contains("requeued once"), "{}", node.log());
    // A poison message reaches the dead-letter queue first, then its
    // receipt and count are written: waited for, not read once.
    let receipts = node
        .admin_until("/admin/receipts?tenant=acme", "both poison receipts", |r| {
            r.as_array().is_some_and(|r| {
                r.iter()
                    .filter(|r| r["kind"] == "signal_deadlettered")
                    .count()
                    == bodies.len()
            })
        })
        .await;
    let receipts = receipts.as_array().unwrap();
    for (id, _, _) in bodies {
        let r = receipts
            .iter()
            .find(|r| r["kind"] == "signal_deadlettered" && r["signal_id"] == id)
            .unwrap_or_else(|| panic!("a receipt for {id}: {receipts:?}"));
        assert_eq!(r["tenant_id"], "acme");
        assert_eq!(r["state_before"], "queued");
        assert_eq!(r["state_after"], "deadlettered");
        assert!(r["reason"].as_str().unwrap().contains("malformed"), "{r}");
    }
    verify_ok(&node).await;
    let end = Instant::now() + Duration::from_secs(10);
    while !node
        .metrics_text()
        .await
        .contains("tai_deadletter_total{reason=\"poison\"} 2")
    {
        assert!(Instant::now() < end, "{}", node.metrics_text().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The queue goes on: a signal after it is decided.
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent-1").await;
    c.post(&pay("after-poison")).await.unwrap();
    assert_eq!(c.decided("after-poison").await["status"], "completed");
    let _ = conn.close(200, "done".into()).await;
}

/// Before: a signal for a SKU the config does not name (published to the
/// broker by another producer, or queued before the SKU left the config)
/// was decided by a default SKU with no policy: an entitlement activated
/// it and a payment went through unchecked (`completed`).
#[tokio::test]
async fn a_signal_for_a_sku_the_config_does_not_name_is_dead_lettered_not_decided() {
    ensure_broker();
    let queue = unique_queue("unknown-sku");
    let _cleanup = QueueCleanup(queue.clone());
    let node = amqp_node(&queue);
    connected(&node).await;
    let (conn, ch) = producer().await;
    let ids = ["retired-ent", "retired-pay"];
    let bodies = [
        signal(
            "acme",
            "retired",
            "entitlement",
            ids[0],
            json!({"active": true}),
        ),
        signal(
            "acme",
            "retired",
            "payment",
            ids[1],
            json!({"amount": 9000, "currency": "XYZ", "customer_id": "c"}),
        ),
    ];
    for mut body in bodies {
        body["received_at_ms"] = json!(1);
        let bytes = serde_json::to_vec(&body).unwrap();
        publish(&ch, &queue, &bytes, BasicProperties::default()).await;
    }
    let c = Client::new(&node, "acme", "acme-secret");
    for id in ids {
        let s = c.decided(id).await;
        assert_eq!(
            (s["status"].as_str(), s["reason"].as_str()),
            (Some("deadlettered"), Some("unknown_sku")),
            "{s}"
        );
    }
    let receipts = node.all_receipts().await;
    assert!(
        receipts
            .iter()
            .all(|r| r["kind"] == "signal_skipped" || r["signal_id"] != "retired-pay"),
        "no decision for the payment: {receipts:?}"
    );
    let (_, letters) = node.admin(Method::GET, "/admin/deadletter").await;
    assert_eq!(letters.as_array().unwrap().len(), 2, "{letters}");
    verify_ok(&node).await;
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test]
async fn a_second_node_on_the_same_queue_stays_standby_until_the_first_stops() {
    ensure_broker();
    let queue = unique_queue("standby");
    let _cleanup = QueueCleanup(queue.clone());
    let mut first = amqp_node(&queue);
    let tag_first = connected(&first).await["broker"]["consumer_tag"]
        .as_str()
        .unwrap()
        .to_string();
    let second = amqp_node(&queue);
    let tag_second = connected(&second).await["broker"]["consumer_tag"]
        .as_str()
        .unwrap()
        .to_string();
    let mut consumers = queue_consumers(&queue);
    consumers.sort_by_key(|c| c[1] != "true");
    assert_eq!(
        consumers,
        vec![
            vec![tag_first.clone(), "true".into()],
            vec![tag_second.clone(), "false".into()],
        ],
        "single active consumer: the first node"
    );

    // Signals posted to the second node are decided by the first.
    let via_second = Client::new(&second, "acme", "acme-secret");
    let at_first = Client::new(&first, "acme", "acme-secret");
    via_second.entitle("payments", "ent-1").await;
    for i in 0..20 {
        let a = via_second.post(&pay(&format!("s-{i}"))).await.unwrap();
        assert_eq!(a.status, 202, "{}", a.body);
    }
    for i in 0..20 {
        assert_eq!(
            at_first.decided(&format!("s-{i}")).await["status"],
            "completed"
        );
    }
    let (_, q) = second.admin(Method::GET, "/admin/queue").await;
    assert_eq!(q["broker"]["delivered"], 0, "the standby consumed: {q}");
    assert!(second.all_receipts().await.is_empty());

    // The first stops gracefully: the second takes over.
    let (status, _) = first.admin(Method::POST, "/admin/shutdown").await;
    assert_eq!(status, 202);
    assert!(first.wait_exit(Duration::from_secs(30)).success());
    assert!(
        first.log().contains("queue quiesced: nothing in flight"),
        "{}",
        first.log()
    );
    via_second.entitle("payments", "ent-2").await;
    via_second.post(&pay("after-failover")).await.unwrap();
    assert_eq!(
        via_second.decided("after-failover").await["status"],
        "completed"
    );
    assert_eq!(
        queue_consumers(&queue),
        vec![vec![tag_second, "true".to_string()]]
    );
}

/// The `slowpay` SKU, acting through a webhook to `gw`.
fn slowpay(gw: &Gateway) -> String {
    format!(
        "\n[executors.gateway]\nkind = \"webhook\"\nurl = \"{}\"\ntimeout_ms = 5000\n\n\
         [skus.slowpay]\npolicies = []\nquota = 1000000\nexecutor = \"gateway\"\n",
        gw.url
    )
}

/// The consumers of `queue` on the broker: tag and whether active.
fn queue_consumers(queue: &str) -> Vec<Vec<String>> {
    table(&["list_consumers", "queue_name", "consumer_tag", "active"])
        .into_iter()
        .filter(|l| l[0] == queue)
        .map(|l| l[1..].to_vec())
        .collect()
}

/// A killed `kanban_queue` (no `post_stop`) lets go of its broker
/// connection at once: its consumer, left active on the single-active-
/// consumer queue, kept the new incarnation's consumer waiting as a
/// standby until a message came for the dead one.
#[tokio::test]
async fn a_killed_queue_lets_go_of_its_consumer_and_the_next_one_is_active() {
    ensure_broker();
    let queue = unique_queue("killedq");
    let _cleanup = QueueCleanup(queue.clone());
    let node = amqp_node(&queue);
    connected(&node).await;
    let (status, body) = node
        .admin(Method::POST, "/admin/actors/kanban_queue/kill")
        .await;
    assert_eq!(status, 202, "{body}");
    node.admin_until("/admin/tree", "the queue restarted", |t| {
        find(t, "kanban_queue").is_some_and(|q| q["restarts"] == 1 && q["status"] == "running")
    })
    .await;
    // Each incarnation numbers its consumers from 1: the tag is the same.
    let tag = connected(&node).await["broker"]["consumer_tag"]
        .as_str()
        .unwrap()
        .to_string();
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let consumers = queue_consumers(&queue);
        if consumers == vec![vec![tag.clone(), "true".to_string()]] {
            break;
        }
        assert!(
            Instant::now() < end,
            "the killed queue's consumer is still on the broker: {consumers:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent").await;
    c.post(&pay("p1")).await.unwrap();
    assert_eq!(c.decided("p1").await["status"], "completed");
}

/// The amqp queue killed while an engine works through a backlog behind
/// slow actions: the broker gives the new incarnation what the dead one
/// had sent to the engine, under new seqs, while the engine still holds
/// the first copies (postponed behind its action). Such a copy was decided
/// a second time (the store could not tell yet); it is now dropped until
/// the queue sends it again, then acknowledged as decided.
#[tokio::test]
async fn an_amqp_queue_killed_while_an_engine_holds_its_signals_decides_each_once() {
    ensure_broker();
    let queue = unique_queue("killheld");
    let _cleanup = QueueCleanup(queue.clone());
    let gw = Gateway::start().await;
    let node = Node::start_with(
        &test_config(&format!(
            "{}{}visibility_secs = 2\n",
            slowpay(&gw),
            amqp_kanban(&queue)
        )),
        &[],
    );
    connected(&node).await;
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("slowpay", "ent").await;
    c.decided("ent").await;
    gw.set(GatewayMode::Slow(20));
    let ids: Vec<String> = (0..80).map(|i| format!("held-{i}")).collect();
    for id in &ids {
        let body = signal("acme", "slowpay", "payment", id, json!({"amount": 5}));
        let a = c.post(&body).await.unwrap();
        assert_eq!(a.status, 202, "{}", a.body);
    }
    for (kill, after) in [(1, 10), (2, 35)] {
        let end = Instant::now() + Duration::from_secs(30);
        while decisions(&node.all_receipts().await).len() < after {
            assert!(Instant::now() < end, "not {after} decided");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        node.kill_until_restarted("kanban_queue", kill).await;
    }
    node.admin_until("/admin/queue", "everything decided", |q| {
        q["depth"] == 0 && q["in_flight"] == 0 && q["broker"]["broker_depth"] == 0
    })
    .await;
    let decided = decisions(&node.all_receipts().await);
    for id in &ids {
        assert_eq!(decided.get(id), Some(&1), "{id}: {decided:?}");
    }
    verify_ok(&node).await;
}

#[tokio::test]
async fn a_quorum_queue_works_and_dead_letters_replay_through_the_broker() {
    ensure_broker();
    let queue = unique_queue("quorum");
    let _cleanup = QueueCleanup(queue.clone());
    let config = test_config(&format!(
        "{}amqp_queue_type = \"quorum\"\n",
        amqp_kanban(&queue)
    ));
    let node = Node::start_with(&config, &[]);
    let q = connected(&node).await;
    assert_eq!(q["broker"]["queue_type"], "quorum");
    let types = table(&["list_queues", "name", "type"]);
    assert!(
        types.contains(&vec![queue.clone(), "quorum".into()]),
        "{types:?}"
    );

    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent-1").await;
    c.decided("ent-1").await;
    let (status, halted) = node
        .admin(Method::POST, "/admin/tenants/acme/payments/halt")
        .await;
    assert_eq!((status, halted["state"].as_str()), (200, Some("halted")));
    assert_eq!(c.post(&pay("h-1")).await.unwrap().status, 202);
    let s = c.decided("h-1").await;
    assert_eq!(
        (s["status"].as_str(), s["reason"].as_str()),
        (Some("deadlettered"), Some("halted"))
    );
    let (status, _) = node
        .admin(Method::POST, "/admin/tenants/acme/payments/resume")
        .await;
    assert_eq!(status, 200);
    // The replay goes out through the fallback buffer to the broker and back.
    let (status, body) = node
        .admin(Method::POST, "/admin/deadletter/h-1/replay")
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(c.decided("h-1").await["status"], "completed");
    let (status, _) = node
        .admin(Method::POST, "/admin/deadletter/h-1/replay")
        .await;
    assert_eq!(status, 404, "replayed once");
    let d = decisions(&node.all_receipts().await);
    assert_eq!(d.get("h-1"), Some(&1));
    verify_ok(&node).await;
}

/// A RabbitMQ policy on one queue, cleared when the test ends.
struct QueuePolicy(String);

impl QueuePolicy {
    fn set(queue: &str, definition: &str) -> QueuePolicy {
        let name = format!("{queue}.policy");
        let pattern = format!("^{}$", queue.replace('.', "\\."));
        rabbitmqctl(&[
            "set_policy",
            &name,
            &pattern,
            definition,
            "--apply-to",
            "queues",
        ])
        .unwrap();
        QueuePolicy(name)
    }
}

impl Drop for QueuePolicy {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["clear_policy", &self.0]);
    }
}

/// Before: a broker policy dead-lettering messages by itself (here a
/// `message-ttl` on the work queue) took 202'd signals out of the queue
/// with no trace in the node: their status stayed `accepted` for ever, no
/// dead letter, receipt, metric or alert.
#[tokio::test]
async fn a_signal_the_broker_expires_becomes_a_dead_letter_with_its_reason() {
    ensure_broker();
    let queue = unique_queue("ttl");
    let _cleanup = QueueCleanup(queue.clone());
    let _policy = QueuePolicy::set(&queue, r#"{"message-ttl": 300}"#);
    let gw = Gateway::start().await;
    // One delivery at a time, each held for a second by a slow target:
    // the signals behind it wait in the broker's queue past their TTL.
    let node = Node::start_with(
        &test_config(&format!(
            r#"{}
[kanban]
backend = "amqp"
amqp_url = "{AMQP_URL}"
amqp_queue = "{queue}"
prefetch = 1
"#,
            slowpay(&gw)
        )),
        &[],
    );
    connected(&node).await;
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("slowpay", "ent-1").await;
    assert_eq!(c.decided("ent-1").await["status"], "completed");
    gw.set(GatewayMode::Slow(1_000));
    let ids: Vec<String> = (1..=5).map(|i| format!("ttl-{i}")).collect();
    for id in &ids {
        let body = signal(
            "acme",
            "slowpay",
            "payment",
            id,
            json!({"amount": 5, "customer_id": id}),
        );
        assert_eq!(c.post(&body).await.unwrap().status, 202);
    }
    let mut expired = Vec::new();
    for id in &ids {
        let s = c.decided(id).await;
        match s["status"].as_str() {
            Some("completed") => {}
            Some("deadlettered") => {
                assert_eq!(s["reason"], "expired", "{s}");
                expired.push(id.clone());
            }
            _ => panic!("{id}: {s}"),
        }
    }
    assert!(
        !expired.is_empty(),
        "none waited past the TTL: {}",
        node.log()
    );
    let (_, letters) = node.admin(Method::GET, "/admin/deadletter").await;
    let mut listed: Vec<String> = letters
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["reason"] == "expired")
        .map(|l| l["signal"]["id"].as_str().unwrap().to_string())
        .collect();
    listed.sort();
    assert_eq!(listed, expired, "{letters}");
    let receipts = node.all_receipts().await;
    for id in &expired {
        let kinds: Vec<&str> = receipts
            .iter()
            .filter(|r| r["signal_id"] == id.as_str())
            .map(|r| r["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["signal_deadlettered"], "{id}");
    }
    // The dead-letter queue keeps its copy of each, as before.
    counts_until(&format!("{queue}.deadletter"), (expired.len() as u64, 0)).await;
    verify_ok(&node).await;
}

/// Puts `body` on the dead-letter exchange of `queue` as RabbitMQ does
/// when a message of it expires: routed by the queue's name, with an
/// `x-death` entry of reason `expired`.
async fn broker_expired(ch: &lapin::Channel, queue: &str, body: &Value) {
    let mut death = FieldTable::default();
    death.insert(
        "reason".into(),
        AMQPValue::LongString(LongString::from("expired")),
    );
    death.insert(
        "queue".into(),
        AMQPValue::LongString(LongString::from(queue)),
    );
    let mut headers = FieldTable::default();
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
    );
    ch.basic_publish(
        format!("{queue}.deadletter").as_str().into(),
        queue.into(),
        BasicPublishOptions::default(),
        &serde_json::to_vec(body).unwrap(),
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// Before: a copy of a signal the broker dead-lettered (it expired, say,
/// while another copy of it, published again after a lost confirm, waited
/// here for its engine's entitlement; or the held copy itself, returned to
/// the queue at a reconnect) was recorded as a dead letter while the node
/// still held a copy; the entitlement then decided that one too, and the
/// signal had two ends: `signal_deadlettered` and a decision.
#[tokio::test]
async fn a_copy_the_broker_dead_letters_while_another_waits_here_leaves_one_decision() {
    ensure_broker();
    let queue = unique_queue("copy-letter");
    let _cleanup = QueueCleanup(queue.clone());
    let node = amqp_node(&queue);
    connected(&node).await;
    let c = Client::new(&node, "acme", "acme-secret");
    // No entitlement yet: the payment waits in its engine, held unacked.
    assert_eq!(c.post(&pay("copy-1")).await.unwrap().status, 202);
    node.admin_until("/admin/queue", "the payment parked", |q| q["parked"] == 1)
        .await;

    // The broker dead-letters another copy of it, as a TTL would: on the
    // dead-letter exchange with the queue's name and an `x-death` entry.
    let (conn, ch) = producer().await;
    let mut copy = pay("copy-1");
    copy["received_at_ms"] = json!(1);
    broker_expired(&ch, &queue, &copy).await;
    // Taken from the watch queue, it waits there unacknowledged for the
    // held copy: acknowledged now, it would be lost with that copy if the
    // node stopped before deciding it.
    let watch = format!("{queue}.deadletter.watch");
    counts_until(&watch, (0, 1)).await;
    node.log_until("waiting for that copy's decision").await;
    let s = c.status("copy-1").await.body;
    assert_ne!(s["status"], "deadlettered", "{s}");

    c.entitle("payments", "copy-ent").await;
    let s = c.decided("copy-1").await;
    assert_eq!(s["status"], "completed", "{s}");
    // Then settled: its signal is decided, so nothing more is recorded.
    counts_until(&watch, (0, 0)).await;
    node.log_until("a copy of a signal decided already").await;
    let receipts = node.all_receipts().await;
    let kinds: Vec<&str> = receipts
        .iter()
        .filter(|r| r["signal_id"] == "copy-1")
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["action_generated", "action_successful"],
        "{receipts:?}"
    );
    let (_, letters) = node.admin(Method::GET, "/admin/deadletter").await;
    assert_eq!(letters, json!([]), "no dead letter beside the decision");
    verify_ok(&node).await;
    let _ = conn.close(200, "done".into()).await;
}

/// A node on a quorum queue whose `delivery-limit` of 0 makes the broker
/// dead-letter any message that comes back (at a reconnect, say).
fn quorum_node_with_no_redelivery(queue: &str) -> (QueuePolicy, Node) {
    ensure_broker();
    let policy = QueuePolicy::set(queue, r#"{"delivery-limit": 0}"#);
    let config = test_config(&format!(
        "{}amqp_queue_type = \"quorum\"\n",
        amqp_kanban(queue)
    ));
    (policy, Node::start_with(&config, &[]))
}

/// Drops every connection: the broker takes back the `held` signals the
/// node holds parked and dead-letters them. Returns the watch queue, once
/// the node has taken their letters from it.
async fn held_copies_dead_lettered(queue: &str, held: u64) -> String {
    rabbitmqctl(&["close_all_connections", "test: reconnect"]).unwrap();
    counts_until(&format!("{queue}.deadletter"), (held, 0)).await;
    counts_until(queue, (0, 0)).await;
    let watch = format!("{queue}.deadletter.watch");
    wait_for("the watch copies taken", Duration::from_secs(30), || {
        queue_counts(&watch).filter(|(ready, _)| *ready == 0)
    });
    watch
}

/// A held (parked) signal the broker dead-letters itself when it comes
/// back at a reconnect (a quorum queue's `delivery-limit`): the node
/// holds the only live copy. Decided, it has one end; if the node dies
/// first, the broker's dead letter, unacknowledged meanwhile, is recorded
/// after the restart: never lost.
#[tokio::test]
async fn a_held_signal_the_broker_dead_letters_at_a_reconnect_is_decided_or_recorded() {
    let queue = unique_queue("held-limit");
    let _cleanup = QueueCleanup(queue.clone());
    let (_policy, mut node) = quorum_node_with_no_redelivery(&queue);
    connected(&node).await;
    let acme = Client::new(&node, "acme", "acme-secret");
    let globex = Client::new(&node, "globex", "globex-secret");
    // No entitlements yet: both wait in their engines.
    assert_eq!(acme.post(&pay("held-a")).await.unwrap().status, 202);
    let mut g = pay("held-g");
    g["tenant_id"] = json!("globex");
    assert_eq!(globex.post(&g).await.unwrap().status, 202);
    node.admin_until("/admin/queue", "both parked", |q| q["parked"] == 2)
        .await;
    let watch = held_copies_dead_lettered(&queue, 2).await;

    // One is decided, and has that one end.
    acme.entitle("payments", "held-ent").await;
    assert_eq!(acme.decided("held-a").await["status"], "completed");
    let ends = |receipts: &[Value], id: &str| -> Vec<String> {
        receipts
            .iter()
            .filter(|r| r["signal_id"] == id)
            .map(|r| r["kind"].as_str().unwrap().to_string())
            .collect()
    };
    let receipts = node.all_receipts().await;
    assert_eq!(
        ends(&receipts, "held-a"),
        ["action_generated", "action_successful"]
    );

    // The node dies holding the other: the letter comes back, and the
    // restarted node records it.
    node.kill_hard();
    node.restart();
    let globex = Client::new(&node, "globex", "globex-secret");
    let s = globex.decided("held-g").await;
    assert_eq!(
        (s["status"].as_str(), s["reason"].as_str()),
        (Some("deadlettered"), Some("delivery_limit")),
        "{s}"
    );
    counts_until(&watch, (0, 0)).await;
    let receipts = node.all_receipts().await;
    assert_eq!(
        ends(&receipts, "held-a"),
        ["action_generated", "action_successful"]
    );
    assert_eq!(ends(&receipts, "held-g"), ["signal_deadlettered"]);
    verify_ok(&node).await;
}

/// Sets RabbitMQ's `consumer_timeout` (and how often channels check it)
/// for channels opened from now on; the values before are put back on drop.
struct ConsumerTimeout(String);

impl ConsumerTimeout {
    fn set(timeout_ms: u64, tick_ms: u64) -> ConsumerTimeout {
        // Prints `{1800000,60000}`.
        let before = rabbitmqctl(&[
            "eval",
            "{ok, T} = application:get_env(rabbit, consumer_timeout), \
             {ok, I} = application:get_env(rabbit, channel_tick_interval), {T, I}.",
        ])
        .unwrap();
        let values: Vec<u64> = before
            .trim()
            .trim_matches(|c| c == '{' || c == '}')
            .split(',')
            .map(|v| v.parse().unwrap())
            .collect();
        let set = |timeout: u64, tick: u64| {
            rabbitmqctl(&[
                "eval",
                &format!(
                    "application:set_env(rabbit, consumer_timeout, {timeout}), \
                     application:set_env(rabbit, channel_tick_interval, {tick})."
                ),
            ])
            .unwrap();
        };
        set(timeout_ms, tick_ms);
        ConsumerTimeout(format!(
            "application:set_env(rabbit, consumer_timeout, {}), \
             application:set_env(rabbit, channel_tick_interval, {}).",
            values[0], values[1]
        ))
    }
}

impl Drop for ConsumerTimeout {
    fn drop(&mut self) {
        // Not a panic in a drop (it may run while a failed test unwinds).
        if let Err(e) = rabbitmqctl(&["eval", &self.0]) {
            eprintln!("could not put RabbitMQ's consumer_timeout back: {e}");
        }
    }
}

/// Before: a signal parked longer than the broker's `consumer_timeout`
/// (30 min by default) made RabbitMQ close the consume channel; the node
/// took it for an outage: "broker unreachable; accepting into the fallback
/// buffer" and a critical `broker_down` alert, raised and resolved again
/// each time, while the broker was fine.
#[tokio::test]
async fn the_brokers_consumer_timeout_is_told_apart_from_an_outage() {
    ensure_broker();
    let queue = unique_queue("consumer-timeout");
    let _cleanup = QueueCleanup(queue.clone());
    let timeout = ConsumerTimeout::set(1_000, 200);
    let node = amqp_node(&queue);
    connected(&node).await;
    let c = Client::new(&node, "acme", "acme-secret");
    // No entitlement: the payment waits, unacknowledged, past the timeout.
    assert_eq!(c.post(&pay("ct-1")).await.unwrap().status, 202);
    node.log_until("RabbitMQ's consumer_timeout closed the consume channel")
        .await;
    let alerts = node
        .admin_until("/admin/alerts", "the consumer_timeout warning", |list| {
            list.as_array()
                .unwrap()
                .iter()
                .any(|a| a["kind"] == "consumer_timeout")
        })
        .await;
    let kinds: Vec<(&str, &str)> = alerts
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["kind"].as_str().unwrap(), a["severity"].as_str().unwrap()))
        .collect();
    assert!(
        kinds.iter().all(|(kind, _)| *kind != "broker_down"),
        "no outage: {alerts}"
    );
    assert!(kinds.contains(&("consumer_timeout", "warning")), "{alerts}");
    assert!(!node.log().contains("broker unreachable"), "{}", node.log());

    // Back to the broker's own timeout: the payment is decided once.
    drop(timeout);
    c.entitle("payments", "ct-ent").await;
    assert_eq!(c.decided("ct-1").await["status"], "completed");
    let receipts = node.all_receipts().await;
    assert_eq!(decisions(&receipts).get("ct-1"), Some(&1), "{receipts:?}");
    verify_ok(&node).await;
}

/// Before: when the broker cancelled the watch queue's consumer (the queue
/// deleted by an operator, say), the node did not notice: what the broker
/// dead-lettered by itself from then on reached only the dead-letter queue,
/// and its signals stayed `accepted` for ever. Now the node connects anew,
/// which declares the watch queue again.
#[tokio::test]
async fn a_watch_queue_deleted_under_the_node_is_declared_again() {
    ensure_broker();
    let queue = unique_queue("watch-deleted");
    let _cleanup = QueueCleanup(queue.clone());
    let node = amqp_node(&queue);
    connected(&node).await;
    let watch = format!("{queue}.deadletter.watch");
    rabbitmqctl(&["delete_queue", &watch]).unwrap();
    wait_for("the watch queue again", Duration::from_secs(30), || {
        queue_counts(&watch)
    });
    node.log_until("the broker cancelled the consumer of").await;
    connected(&node).await;

    // A signal the broker dead-letters (as a TTL would) is recorded.
    let (conn, ch) = producer().await;
    let mut body = pay("wd-1");
    body["received_at_ms"] = json!(1);
    broker_expired(&ch, &queue, &body).await;
    let c = Client::new(&node, "acme", "acme-secret");
    let s = c.decided("wd-1").await;
    assert_eq!(
        (s["status"].as_str(), s["reason"].as_str()),
        (Some("deadlettered"), Some("expired")),
        "{s}"
    );
    counts_until(&watch, (0, 0)).await;
    verify_ok(&node).await;
    let _ = conn.close(200, "done".into()).await;
}

/// The queue's (ready, unacknowledged) message counts.
fn queue_counts(queue: &str) -> Option<(u64, u64)> {
    table(&[
        "list_queues",
        "name",
        "messages_ready",
        "messages_unacknowledged",
    ])
    .into_iter()
    .find(|l| l[0] == queue)
    .map(|l| (l[1].parse().unwrap(), l[2].parse().unwrap()))
}

/// Waits (at most 30 s) until the queue's counts are `(ready, unacked)`.
async fn counts_until(queue: &str, want: (u64, u64)) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = queue_counts(queue);
        if now == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{queue}: {now:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A node on `queue` of `queue_type` with the `waiting` SKU (300 s).
fn waiting_config(queue: &str, queue_type: &str) -> String {
    test_config(&format!(
        "{}amqp_queue_type = \"{queue_type}\"\n{}",
        amqp_kanban(queue),
        // Past RabbitMQ's default consumer_timeout: the node says so.
        waiting_sku(3600)
    ))
}

/// Twelve signals wait (parked) in an engine for an entitlement: they
/// would hold the consumer's 10 prefetch slots, so the node turns its
/// consumer, and the entitlement and other engines' signals still come.
async fn parked_signals_do_not_hold_consumption(queue_type: &str) {
    ensure_broker();
    let queue = unique_queue(&format!("parked-{queue_type}"));
    let _cleanup = QueueCleanup(queue.clone());
    let node = Node::start_with(&waiting_config(&queue, queue_type), &[]);
    node.log_until(
        "skus.waiting.entitlement_timeout_secs reaches RabbitMQ's default consumer_timeout (1800 s)",
    )
    .await;
    let first_tag = connected(&node).await["broker"]["consumer_tag"]
        .as_str()
        .unwrap()
        .to_string();
    let c = Client::new(&node, "acme", "acme-secret");
    post_waiting(&c, 12).await;
    node.admin_until("/admin/queue", "all twelve parked", |q| q["parked"] == 12)
        .await;
    // The broker sees the new consumer alone. The last signals to park may
    // have started one more turn (a consumer holding half its prefetch in
    // parked signals turns), so the node's tag and the broker's list are
    // read until they agree.
    let end = Instant::now() + Duration::from_secs(30);
    let (tag, q) = loop {
        let (_, q) = node.admin(Method::GET, "/admin/queue").await;
        let tag = q["broker"]["consumer_tag"].as_str().unwrap().to_string();
        let consumers: Vec<String> = table(&["list_consumers", "queue_name", "consumer_tag"])
            .into_iter()
            .filter(|l| l[0] == queue)
            .map(|l| l[1].clone())
            .collect();
        if consumers == [tag.clone()] {
            break (tag, q);
        }
        assert!(
            Instant::now() < end,
            "the broker sees {consumers:?}, the node {tag}: {q}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(q["broker"]["consumer_turns"].as_u64() >= Some(1), "{q}");
    assert!(
        tag.starts_with(&format!("{first_tag}.")),
        "{tag} after {first_tag}"
    );
    // Held unacknowledged by the node (a quorum queue's counts lag a little).
    counts_until(&queue, (0, 12)).await;

    // Another engine of the tenant, and another tenant, are decided; then
    // the twelve, acknowledged on the channel although their consumer is
    // gone.
    let receipts = others_go_on_then_the_waiting_are_decided(&node, &c, 12).await;
    assert!(decisions(&receipts).values().all(|n| *n == 1));
    counts_until(&queue, (0, 0)).await;
    verify_ok(&node).await;
}

#[tokio::test]
async fn parked_signals_do_not_hold_a_classic_queue_consumer() {
    parked_signals_do_not_hold_consumption("classic").await;
}

/// Cancelling the active consumer of a single-active-consumer queue would
/// hand the queue to the standby node: with one there, no turn, and the
/// node logs `why`.
async fn with_a_standby_the_consumer_is_not_turned(queue_type: &str, why: &str) {
    ensure_broker();
    let queue = unique_queue(&format!("parked-standby-{queue_type}"));
    let _cleanup = QueueCleanup(queue.clone());
    let config = waiting_config(&queue, queue_type);
    let first = Node::start_with(&config, &[]);
    let tag = connected(&first).await["broker"]["consumer_tag"]
        .as_str()
        .unwrap()
        .to_string();
    let second = Node::start_with(&config, &[]);
    connected(&second).await;
    let c = Client::new(&first, "acme", "acme-secret");
    post_waiting(&c, 5).await;
    first
        .admin_until("/admin/queue", "five parked", |q| q["parked"] == 5)
        .await;
    first.log_until(why).await;
    let (_, q) = first.admin(Method::GET, "/admin/queue").await;
    assert_eq!(
        (
            q["broker"]["consumer_turns"].as_u64(),
            q["broker"]["consumer_tag"].as_str()
        ),
        (Some(0), Some(tag.as_str())),
        "{q}"
    );
    // The five free slots still take the entitlement: the first node
    // stays the one deciding.
    c.entitle("waiting", "ent-w").await;
    for i in 0..5 {
        assert_eq!(c.decided(&format!("w-{i}")).await["status"], "completed");
    }
    let (_, q) = second.admin(Method::GET, "/admin/queue").await;
    assert_eq!(q["broker"]["delivered"], 0, "the standby consumed: {q}");
}

#[tokio::test]
async fn with_a_standby_on_a_classic_queue_the_consumer_is_not_turned() {
    let why = "another node consumes from the queue too: not turning the consumer";
    with_a_standby_the_consumer_is_not_turned("classic", why).await;
}

#[tokio::test]
async fn on_a_quorum_queue_the_consumer_is_not_turned() {
    // A turn here handed the queue to the standby (the quorum queue's
    // consumer count leaves its waiting consumer out), and without a
    // standby messages around the cancel reached the node out of order.
    let why = "on a quorum queue the consumer is not turned";
    with_a_standby_the_consumer_is_not_turned("quorum", why).await;
}

#[tokio::test]
async fn the_trace_context_crosses_the_broker() {
    ensure_broker();
    let queue = unique_queue("trace");
    let _cleanup = QueueCleanup(queue.clone());
    let collector = Collector::start().await;
    let config = test_config(&format!(
        "{}\n[kaizen]\notlp_endpoint = \"{}\"\n",
        amqp_kanban(&queue),
        collector.url
    ));
    let node = Node::start_with(&config, &[]);
    connected(&node).await;
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent-1").await;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let client_span = "b7ad6b7169203331";
    assert_traced_payment(&node, &c, &collector, &pay("traced"), trace, client_span).await;
}

#[test]
fn tai_bench_on_the_amqp_backend_reports_the_bare_broker_loop() {
    // Checks the amqp bench runs end to end, bare lapin loop included;
    // how fast is BENCHMARKS.md's business.
    ensure_broker();
    let report = bench_report(&[
        "--backend",
        "amqp",
        "--tenants",
        "2",
        "--duration",
        "1",
        "--concurrency",
        "4",
        "--prefetch",
        "50",
    ]);
    assert_eq!(report["backend"], "amqp");
    assert_positive(&report, &["broker_baseline_per_sec", "broker_ratio"]);
    // The loop ran before and after the node's load; the baseline is their mean.
    assert_bracketed(&report, "broker_baseline_runs", "broker_baseline_per_sec");
}

#[tokio::test]
async fn a_backend_switch_carries_accepted_signals_over_in_both_directions() {
    ensure_broker();
    let queue = unique_queue("switch");
    let _cleanup = QueueCleanup(queue.clone());
    // Embedded: three payments wait in the queue for their entitlement.
    let mut node = Node::start_with(&test_config(""), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    for i in 0..3 {
        assert_eq!(c.post(&pay(&format!("sw-{i}"))).await.unwrap().status, 202);
    }
    // Switched to amqp: they go to the broker through the fallback buffer.
    node.restart_with_config(&test_config(&amqp_kanban(&queue)));
    node.log_until("undecided signals moved from the embedded queue")
        .await;
    assert!(node.log().contains("moved=3"), "{}", node.log_tail(20));
    connected(&node).await;
    let c = Client::new(&node, "acme", "acme-secret");
    let again = c.post(&pay("sw-1")).await.unwrap();
    assert_eq!(
        (again.status, &again.body["duplicate"]),
        (200, &json!(true)),
        "{}",
        again.body
    );
    c.entitle("payments", "sw-ent").await;
    for i in 0..3 {
        assert_eq!(c.decided(&format!("sw-{i}")).await["status"], "completed");
    }

    // The broker unreachable: a payment is kept in the fallback buffer.
    let unreachable = unreachable_kanban(&queue);
    node.restart_with_config(&test_config(&unreachable));
    let c = Client::new(&node, "acme", "acme-secret");
    assert_eq!(c.post(&pay("sw-b")).await.unwrap().status, 202);
    let (_, q) = node.admin(Method::GET, "/admin/queue").await;
    assert_eq!(q["broker"]["buffered"], 1, "{q}");
    // Switched back to embedded: the embedded queue decides it.
    node.restart_with_config(&test_config(""));
    node.log_until("undecided signals moved from the amqp fallback buffer")
        .await;
    assert!(node.log().contains("moved=1"), "{}", node.log_tail(20));
    let c = Client::new(&node, "acme", "acme-secret");
    assert_eq!(c.decided("sw-b").await["status"], "completed");

    // One decision each, nothing left queued, and the ledger verifies.
    let d = decisions(&node.all_receipts().await);
    for id in ["sw-0", "sw-1", "sw-2", "sw-b"] {
        assert_eq!(d.get(id), Some(&1), "{id}: {d:?}");
    }
    node.drained().await;
    verify_ok(&node).await;
}

#[tokio::test]
async fn tai_drain_amqp_cut_off_midway_goes_on_and_moves_each_signal_once() {
    // 30,000 signals wait in the broker for a stopped node. The broker
    // closes the drain's connection once it has taken part of them (some
    // moved, not yet acknowledged): the drain tries again, and in the end
    // has moved each signal once, none counted twice.
    let n = 30_000;
    let (node, queue, _cleanup) = backlog_for_a_stopped_node("drain-cut", "d", n).await;
    let (drain, log) = drain_started(&node);
    wait_for("the drain under way", Duration::from_secs(60), || {
        queue_counts(&queue).filter(|(ready, unacked)| ready + unacked < n - 1_000)
    });
    rabbitmqctl(&["close_all_connections", "test: cut the drain"]).unwrap();
    let out = tokio::task::spawn_blocking(move || drain.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(out.status.success(), "{text}{log}");
    assert!(
        log.contains("the broker cut the drain off: trying again"),
        "cut midway: {log}"
    );
    assert!(text.contains(&format!("moved {n} signal(s)")), "{text}");
    assert!(text.contains("0 already held or decided"), "{text}");
    assert_eq!(queue_counts(&queue), Some((0, 0)));
}
