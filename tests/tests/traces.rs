//! OpenTelemetry (SPEC §9, issue: Kaizen): a client's `traceparent` is
//! continued at ingress, carried through the embedded queue, and the spans
//! reach a local OTLP/HTTP receiver as one tree; the trace id is in every
//! receipt of the signal and in the logs. (The amqp backend's case is in
//! amqp.rs.)

use serde_json::json;
use tai_tests::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn a_traceparent_is_continued_through_the_queue_and_exported_over_otlp() {
    let collector = Collector::start().await;
    let node = Node::start_with(
        &test_config(&format!(
            "[kaizen]\notlp_endpoint = \"{}\"\ntrace_sample_ratio = 1.0\n",
            collector.url
        )),
        &[("RUST_LOG", "info,tai_ingress=debug")],
    );
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "e1").await;
    c.decided("e1").await;
    let pay = signal(
        "acme",
        "payments",
        "payment",
        "traced-1",
        json!({"amount": 10.0, "currency": "USD", "customer_id": "c1"}),
    );
    assert_traced_payment(&node, &c, &collector, &pay, TRACE, CLIENT_SPAN).await;
    let log = node.log();
    assert!(
        log.lines()
            .any(|l| l.contains("signal accepted") && l.contains(TRACE)),
        "the trace id in the logs: {log}"
    );

    // A signal without a traceparent starts a trace of its own, in its receipts too.
    let untraced = signal(
        "acme",
        "payments",
        "payment",
        "untraced-1",
        json!({"amount": 10.0, "currency": "USD", "customer_id": "c2"}),
    );
    assert_eq!(c.post(&untraced).await.unwrap().status, 202);
    c.decided("untraced-1").await;
    let r = node
        .all_receipts()
        .await
        .into_iter()
        .find(|r| r["signal_id"] == "untraced-1")
        .unwrap();
    let own = r["trace_id"].as_str().expect("a trace id of its own");
    assert_ne!(own, TRACE);
    collector
        .until_spans(own, &["ingress", "dequeue", "receipt"])
        .await;
}
