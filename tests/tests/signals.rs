//! The signal path end to end (SPEC §2, §3, §5, §7): real nodes, real HTTP,
//! real sled, a client that signs with its own HMAC.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tai_tests::*;

fn pay(id: &str, customer: &str, amount: f64) -> Value {
    signal(
        "acme",
        "payments",
        "payment",
        id,
        json!({"amount": amount, "currency": "USD", "customer_id": customer}),
    )
}

fn kinds_for(receipts: &[Value], signal_id: &str) -> Vec<String> {
    receipts
        .iter()
        .filter(|r| r["signal_id"] == signal_id)
        .map(|r| r["kind"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_payment_is_accepted_decided_and_proven() {
    let node = Node::start_with(&test_config(""), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent-1").await;
    let a = c.post(&pay("pay-1", "cust_123", 99.99)).await.unwrap();
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.body, json!({"signal_id": "pay-1", "status": "accepted"}));
    assert_eq!(a.headers["x-signal-id"], "pay-1");

    let status = c.decided("pay-1").await;
    assert_eq!(status["status"], "completed");
    assert_eq!(status["tenant_id"], "acme");
    assert_eq!(status["sku_id"], "payments");
    assert_eq!(status["kind"], "payment");
    assert_eq!(status["receipts"].as_array().unwrap().len(), 2);

    let receipts = node.all_receipts().await;
    assert_eq!(kinds_for(&receipts, "ent-1"), ["entitlement_activated"]);
    assert_eq!(
        kinds_for(&receipts, "pay-1"),
        ["action_generated", "action_successful"]
    );
    let first = &receipts[0];
    assert_eq!(first["seq"], 1);
    assert_eq!(first["prev_hash"], "0".repeat(64));
    assert_eq!(first["key_id"], "k2");
    for pair in receipts.windows(2) {
        assert_eq!(pair[1]["prev_hash"], pair[0]["hash"], "chained");
    }
    let (_, verify) = node.admin(Method::GET, "/admin/receipts/verify").await;
    assert_eq!(verify["ok"], true, "{verify}");
    assert_eq!(verify["count"], 3);

    let (_, engine) = node
        .admin(Method::GET, "/admin/tenants/acme/payments")
        .await;
    assert_eq!(engine["state"], "stable");
    assert_eq!(engine["entitled"], true);
    assert_eq!(engine["quota_remaining"], 999_999);
    let tree = node.tree().await;
    let e = find(&tree, "engine:acme:payments").expect("engine in the tree");
    assert_eq!(e["kind"], "worker");

    // A fraudulent payment is denied with its violations in the receipt.
    let a = c.post(&pay("pay-2", "cust_9", 9000.0)).await.unwrap();
    assert_eq!(a.status, 202);
    let a = c
        .post(&signal(
            "acme",
            "payments",
            "payment",
            "pay-3",
            json!({"amount": 9000, "currency": "XYZ"}),
        ))
        .await
        .unwrap();
    assert_eq!(a.status, 202);
    assert_eq!(
        c.decided("pay-2").await["status"],
        "completed",
        "score 30 < 50"
    );
    let denied = c.decided("pay-3").await;
    assert_eq!(denied["status"], "denied");
    assert!(
        denied["reason"].as_str().unwrap().contains("payment_fraud"),
        "{denied}"
    );
    // At the default level (info) a decided signal writes no log line: the
    // receipts are its record (the `log` executor logs at debug).
    let log = node.log();
    for id in ["pay-1", "pay-2", "pay-3"] {
        assert!(!log.contains(id), "{id} in the log:\n{log}");
    }
}

#[tokio::test]
async fn every_ingress_error_has_its_code() {
    let node = Node::start_with(&test_config(""), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    let body = serde_json::to_vec(&pay("e-1", "c", 1.0)).unwrap();
    let now = unix_now();
    let path = "/v1/signals";
    let check = |a: &Answer, status: u16, code: &str| {
        assert_eq!(a.status, status, "{}", a.body);
        assert_eq!(a.body["error"]["code"], code, "{}", a.body);
        assert!(a.body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    };

    // 401: missing signature, wrong secret, stale timestamp, unknown tenant.
    let mut h = c.headers(now, "POST", path, &body);
    h.retain(|(k, _)| *k != "x-tai-signature");
    check(
        &c.raw("POST", path, &body, &h).await.unwrap(),
        401,
        "unauthorized",
    );
    let bad = Client {
        secret: "wrong".into(),
        ..c.clone()
    };
    check(
        &bad.raw("POST", path, &body, &bad.headers(now, "POST", path, &body))
            .await
            .unwrap(),
        401,
        "unauthorized",
    );
    check(
        &c.raw(
            "POST",
            path,
            &body,
            &c.headers(now - 301, "POST", path, &body),
        )
        .await
        .unwrap(),
        401,
        "unauthorized",
    );
    let stranger = Client {
        tenant: "nobody".into(),
        ..c.clone()
    };
    check(
        &stranger
            .raw(
                "POST",
                path,
                &body,
                &stranger.headers(now, "POST", path, &body),
            )
            .await
            .unwrap(),
        401,
        "unauthorized",
    );
    // Body tenant differs from the header tenant.
    let other =
        serde_json::to_vec(&signal("globex", "payments", "payment", "e-2", json!({}))).unwrap();
    check(
        &c.raw("POST", path, &other, &c.headers(now, "POST", path, &other))
            .await
            .unwrap(),
        401,
        "unauthorized",
    );

    // The rotated (old) secret still signs.
    let old = Client {
        secret: "acme-old-secret".into(),
        ..c.clone()
    };
    let a = old
        .raw("POST", path, &body, &old.headers(now, "POST", path, &body))
        .await
        .unwrap();
    assert_eq!(a.status, 202, "{}", a.body);

    // Replay: the same signed request again, without an id, is refused...
    let no_id =
        serde_json::to_vec(&json!({"tenant_id": "acme", "sku_id": "payments", "kind": "payment"}))
            .unwrap();
    let h = c.headers(now, "POST", path, &no_id);
    assert_eq!(c.raw("POST", path, &no_id, &h).await.unwrap().status, 202);
    let again = c.raw("POST", path, &no_id, &h).await.unwrap();
    check(&again, 401, "unauthorized");
    assert!(again.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("replay"));
    // ...but with an id already accepted it is the duplicate answer.
    let dup = old
        .raw("POST", path, &body, &old.headers(now, "POST", path, &body))
        .await
        .unwrap();
    assert_eq!(dup.status, 200, "{}", dup.body);
    assert_eq!(dup.body["duplicate"], true);
    assert_eq!(dup.body["signal_id"], "e-1");

    // 400: bad JSON and each schema problem, with a specific message.
    for (bad_body, says) in [
        (&b"{not json"[..], "not valid JSON"),
        (
            br#"{"tenant_id":"acme","sku_id":"payments"}"#,
            "kind is required",
        ),
        (
            br#"{"tenant_id":"acme","sku_id":"payments","kind":"k","payload":7}"#,
            "payload must be a JSON object",
        ),
        // An entitlement that could only be denied after its 202.
        (
            br#"{"tenant_id":"acme","sku_id":"payments","kind":"entitlement","payload":{"active":1}}"#,
            "an entitlement needs payload.active true or false",
        ),
        (
            br#"{"tenant_id":"acme","sku_id":"nope","kind":"k"}"#,
            "unknown sku_id",
        ),
        (
            br#"{"id":"has space","tenant_id":"acme","sku_id":"payments","kind":"k"}"#,
            "id may only contain",
        ),
        // Valid JSON syntax a policy still could not read: refused here,
        // not decided as if the payload were `{}`.
        (
            br#"{"tenant_id":"acme","sku_id":"payments","kind":"payment","payload":{"amount":9000,"currency":"XYZ","note":1e400}}"#,
            "payload is not readable JSON: number out of range",
        ),
    ] {
        let a = c
            .raw(
                "POST",
                path,
                bad_body,
                &c.headers(now, "POST", path, bad_body),
            )
            .await
            .unwrap();
        check(&a, 400, "invalid_signal");
        assert!(
            a.body["error"]["message"].as_str().unwrap().contains(says),
            "{}",
            a.body
        );
    }

    // 415: not JSON.
    let mut h = c.headers(now, "POST", path, &body);
    h[0].1 = "text/plain".into();
    check(
        &c.raw("POST", path, &body, &h).await.unwrap(),
        415,
        "unsupported_media_type",
    );

    // 413: over the 64 KiB default.
    let big = oversized("acme");
    check(
        &c.raw("POST", path, &big, &c.headers(now, "POST", path, &big))
            .await
            .unwrap(),
        413,
        "payload_too_large",
    );

    // 429 with Retry-After: the trial tier allows 5 a second.
    let tiny = Client::new(&node, "tiny", "tiny-secret");
    let mut limited = None;
    for i in 0..20 {
        let a = tiny
            .post(&signal(
                "tiny",
                "payments",
                "payment",
                &format!("t{i}"),
                json!({}),
            ))
            .await
            .unwrap();
        if a.status == 429 {
            limited = Some(a);
            break;
        }
        assert_eq!(a.status, 202, "{}", a.body);
    }
    let limited = limited.expect("the trial tier is rate limited");
    check(&limited, 429, "rate_limited");
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);

    // 405 with Allow: a path of the API asked with another method; 404
    // for a path it does not have.
    for (method, p, allow) in [
        ("PUT", path, "POST"),
        ("GET", path, "POST"),
        ("DELETE", "/v1/signals/e-1", "GET"),
        ("POST", "/health", "GET"),
        ("POST", "/ready", "GET"),
    ] {
        let a = c
            .raw(method, p, b"", &c.headers(now, method, p, b""))
            .await
            .unwrap();
        check(&a, 405, "method_not_allowed");
        assert_eq!(a.headers["allow"], allow, "{method} {p}");
        assert_eq!(
            a.body["error"]["message"],
            format!("{method} is not supported on {p} (use {allow})")
        );
    }
    let a = c.raw("GET", "/v1/signals/e-1/x", b"", &[]).await.unwrap();
    check(&a, 404, "not_found");
    // HEAD is a GET without its body: the probes, and a signal's status
    // signed as HEAD.
    let read = "/v1/signals/e-1";
    for (p, h) in [
        ("/health", vec![]),
        ("/ready", vec![]),
        (read, c.headers(now, "HEAD", read, b"")),
    ] {
        let a = c.raw("HEAD", p, b"", &h).await.unwrap();
        assert_eq!((a.status, &a.body), (200, &Value::Null), "HEAD {p}");
    }

    // An id read back percent-encoded, as `encodeURIComponent` sends it.
    let colon = signal("acme", "payments", "payment", "ns:e-3", json!({}));
    assert_eq!(c.post(&colon).await.unwrap().status, 202);
    let read = c.status("ns%3Ae-3").await;
    assert_eq!(
        (read.status, &read.body["signal_id"]),
        (200, &json!("ns:e-3"))
    );

    // 404: unknown signal, and another tenant's signal.
    assert_eq!(c.status("never-sent").await.status, 404);
    let globex = Client::new(&node, "globex", "globex-secret");
    let theirs = globex.status("e-1").await;
    assert_eq!(
        (theirs.status, theirs.body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
}

/// The replay cache's bound is the operator's: past it the oldest minute
/// goes early and says so (the default, sized from the global rate limit,
/// is what `every_ingress_error_has_its_code` refuses replays under).
#[tokio::test]
async fn a_replay_cache_bounded_below_its_window_drops_early_and_says_so() {
    let node = Node::start_with(
        &test_config(""),
        &[("TAI_INGRESS__REPLAY_CACHE_MAX_ENTRIES", "1")],
    );
    // The bound in force is in the start log.
    assert!(
        node.log().contains("replay_cache_max_entries=1"),
        "{}",
        node.log()
    );
    let c = Client::new(&node, "acme", "acme-secret");
    let path = "/v1/signals";
    let now = unix_now();
    let first =
        serde_json::to_vec(&json!({"tenant_id": "acme", "sku_id": "payments", "kind": "payment"}))
            .unwrap();
    let h = c.headers(now, "POST", path, &first);
    assert_eq!(c.raw("POST", path, &first, &h).await.unwrap().status, 202);
    let again = c.raw("POST", path, &first, &h).await.unwrap();
    assert_eq!(again.status, 401, "{}", again.body);
    // A second signature fills the cache past its bound of one...
    let second = serde_json::to_vec(
        &json!({"tenant_id": "acme", "sku_id": "payments", "kind": "payment", "payload": {"n": 2}}),
    )
    .unwrap();
    let h2 = c.headers(now, "POST", path, &second);
    assert_eq!(c.raw("POST", path, &second, &h2).await.unwrap().status, 202);
    node.log_until("replay cache full, dropping its oldest minute early")
        .await;
    assert!(node.log().contains("ingress.replay_cache_max_entries"));
    // ...so the first one's minute went: no longer refused.
    let late = c.raw("POST", path, &first, &h).await.unwrap();
    assert_eq!(late.status, 202, "{}", late.body);
}

#[tokio::test]
async fn halted_degraded_and_quota_signals_are_dead_lettered_and_replayed() {
    let node = Node::start_with(&test_config(""), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent").await;
    c.decided("ent").await;

    // Halted: an operator halt dead-letters what comes next.
    let (status, halted) = node
        .admin(Method::POST, "/admin/tenants/acme/payments/halt")
        .await;
    assert_eq!((status, halted["state"].as_str()), (200, Some("halted")));
    assert_eq!(c.post(&pay("h-1", "c1", 5.0)).await.unwrap().status, 202);
    let s = c.decided("h-1").await;
    assert_eq!(
        (s["status"].as_str(), s["reason"].as_str()),
        (Some("deadlettered"), Some("halted"))
    );
    let (_, letters) = node.admin(Method::GET, "/admin/deadletter").await;
    let letter = letters
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["signal"]["id"] == "h-1")
        .unwrap();
    assert_eq!(letter["reason"], "halted");
    // The same id dead-lettered for another tenant: a replay names its tenant.
    let g = Client::new(&node, "globex", "globex-secret");
    g.entitle("payments", "g-ent").await;
    g.decided("g-ent").await;
    node.admin(Method::POST, "/admin/tenants/globex/payments/halt")
        .await;
    let g_pay = json!({"amount": 5.0, "currency": "USD", "customer_id": "g1"});
    let a = g
        .post(&signal("globex", "payments", "payment", "h-1", g_pay))
        .await
        .unwrap();
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(g.decided("h-1").await["reason"], "halted");
    let (status, body) = node
        .admin(Method::POST, "/admin/deadletter/h-1/replay")
        .await;
    assert_eq!(
        (status, body["error"]["message"].as_str()),
        (
            400,
            Some("\"h-1\" is dead-lettered for several tenants: add ?tenant=")
        )
    );
    // Replayed into the halted engine it would only be dead-lettered again.
    let (status, body) = node
        .admin(Method::POST, "/admin/deadletter/h-1/replay?tenant=acme")
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str(), body["error"]["message"].as_str()),
        (
            409,
            Some("conflict"),
            Some("engine acme/payments is halted: resume it first (POST /admin/tenants/acme/payments/resume)")
        )
    );
    // Resume, replay: decided this time.
    let (status, resumed) = node
        .admin(Method::POST, "/admin/tenants/acme/payments/resume")
        .await;
    assert_eq!((status, resumed["state"].as_str()), (200, Some("stable")));
    let (status, body) = node
        .admin(Method::POST, "/admin/deadletter/h-1/replay?tenant=acme")
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(c.decided("h-1").await["status"], "completed");
    let receipts = node.all_receipts().await;
    let acme: Vec<Value> = receipts
        .into_iter()
        .filter(|r| r["tenant_id"] == "acme")
        .collect();
    assert_eq!(
        kinds_for(&acme, "h-1"),
        ["signal_skipped", "action_generated", "action_successful"]
    );
    let (status, _) = node
        .admin(Method::POST, "/admin/deadletter/h-1/replay?tenant=acme")
        .await;
    assert_eq!(status, 404, "replayed once");
    // globex's is the only h-1 left: no tenant needed.
    node.admin(Method::POST, "/admin/tenants/globex/payments/resume")
        .await;
    let (status, body) = node
        .admin(Method::POST, "/admin/deadletter/h-1/replay")
        .await;
    assert_eq!(
        (status, body["tenant_id"].as_str()),
        (202, Some("globex")),
        "{body}"
    );
    assert_eq!(g.decided("h-1").await["status"], "completed");

    // Quota: the `tight` SKU allows one action; the next is dead-lettered.
    c.entitle("tight", "ent-t").await;
    for id in ["q-1", "q-2"] {
        let a = c
            .post(&signal("acme", "tight", "job", id, json!({})))
            .await
            .unwrap();
        assert_eq!(a.status, 202);
    }
    assert_eq!(c.decided("q-1").await["status"], "completed");
    let q2 = c.decided("q-2").await;
    assert_eq!(
        (q2["status"].as_str(), q2["reason"].as_str()),
        (Some("deadlettered"), Some("quota_exhausted"))
    );
    let (_, e) = node.admin(Method::GET, "/admin/tenants/acme/tight").await;
    assert_eq!(e["state"], "quota_exhausted");
    let (status, body) = node
        .admin(Method::POST, "/admin/deadletter/q-2/replay")
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("conflict")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("engine acme/tight is out of quota: resume it first"),
        "{body}"
    );
    node.admin(Method::POST, "/admin/tenants/acme/tight/resume")
        .await;
    node.admin(Method::POST, "/admin/deadletter/q-2/replay")
        .await;
    assert_eq!(c.decided("q-2").await["status"], "completed");

    // Degraded: no entitlement within 1 s; non-critical skipped, critical decided.
    let a = c
        .post(&signal("acme", "slowboot", "job", "d-0", json!({})))
        .await
        .unwrap();
    assert_eq!(
        a.status, 202,
        "postponed in boot, then skipped when degraded"
    );
    node.admin_until("/admin/tenants/acme/slowboot", "degraded", |e| {
        e["state"] == "degraded"
    })
    .await;
    let d0 = c.decided("d-0").await;
    assert_eq!(
        (d0["status"].as_str(), d0["reason"].as_str()),
        (Some("deadlettered"), Some("degraded"))
    );
    let mut crit = signal("acme", "slowboot", "job", "d-1", json!({}));
    crit["critical"] = json!(true);
    c.post(&crit).await.unwrap();
    assert_eq!(c.decided("d-1").await["status"], "completed");
    let receipts = node.all_receipts().await;
    assert!(receipts.iter().any(|r| r["kind"] == "bootstrap_timeout"));
    let (_, e) = node
        .admin(Method::GET, "/admin/tenants/acme/slowboot")
        .await;
    assert_eq!(
        e["state"], "degraded",
        "back to degraded after the critical signal"
    );
    let (_, q) = node.admin(Method::GET, "/admin/queue").await;
    assert_eq!(q["backend"], "embedded");
    assert_eq!(q["deadletter"], 1, "d-0 is still a dead letter");
    let (status, body) = node
        .admin(Method::POST, "/admin/deadletter/d-0/replay")
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("degraded (no entitlement)"),
        "{body}"
    );

    // The list pages: `limit`, and one tenant's (by its whole name).
    c.post(&signal("acme", "slowboot", "job", "d-2", json!({})))
        .await
        .unwrap();
    assert_eq!(c.decided("d-2").await["status"], "deadlettered");
    let ids = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap_or_else(|| panic!("{v}"))
            .iter()
            .map(|d| d["signal"]["id"].as_str().unwrap().to_string())
            .collect()
    };
    for (query, expected) in [
        ("", vec!["d-0", "d-2"]),
        ("?limit=1", vec!["d-0"]),
        ("?tenant=acme&limit=5", vec!["d-0", "d-2"]),
        ("?tenant=acm", Vec::<&str>::new()),
        ("?tenant=globex", vec![]),
        // The next page starts after the last letter of the one before.
        ("?limit=1&after=acme/d-0", vec!["d-2"]),
        ("?tenant=acme&after=acme/d-2", vec![]),
        ("?tenant=globex&after=acme/d-0", vec![]),
        ("?after=acm/zzz", vec!["d-0", "d-2"]),
    ] {
        let (status, letters) = node
            .admin(Method::GET, &format!("/admin/deadletter{query}"))
            .await;
        assert_eq!(
            (status, ids(&letters)),
            (200, expected.iter().map(|s| s.to_string()).collect()),
            "{query}"
        );
    }
    let (status, body) = node.admin(Method::GET, "/admin/deadletter?limit=ten").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    assert_eq!(body["error"]["message"], "limit must be a whole number");
    let (status, body) = node.admin(Method::GET, "/admin/deadletter?after=d-0").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"]["message"],
        "after must be {tenant}/{signal_id}: the last letter of the page before"
    );
    let (_, verify) = node.admin(Method::GET, "/admin/receipts/verify").await;
    assert_eq!(verify["ok"], true, "{verify}");
}

const DECISIONS: [&str; 4] = [
    "action_generated",
    "policy_denied",
    "quota_exceeded",
    "signal_skipped",
];

/// After a crash and a restart: every accepted (202'd) signal of acme has
/// exactly one decision receipt and a decided record, none is decided twice,
/// and the ledger verifies. Returns the receipts.
async fn each_decided_once(node: &Node, accepted: &HashSet<String>) -> Vec<Value> {
    let receipts = node.all_receipts().await;
    let mut decisions: HashMap<String, usize> = HashMap::new();
    for r in &receipts {
        if DECISIONS.contains(&r["kind"].as_str().unwrap()) {
            *decisions
                .entry(r["signal_id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    let c = Client::new(node, "acme", "acme-secret");
    for id in accepted {
        if decisions.get(id) != Some(&1) {
            let status = c.status(id).await.body;
            let (_, letters) = node.admin(Method::GET, "/admin/deadletter").await;
            let logs: Vec<String> = std::fs::read_dir(node.dir.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("node.log"))
                .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                .collect();
            panic!(
                "{id}: {:?} decision receipts; status {status}; dead letters {letters}; logs:\n{}",
                decisions.get(id),
                logs.join("\n----\n")
            );
        }
    }
    assert!(
        decisions.values().all(|n| *n == 1),
        "no signal was decided twice"
    );
    // Every one's record (its dedupe key) says it was decided: records are
    // deferred in kept redo records too, which a kill nearly always leaves.
    for id in accepted {
        let s = c.decided(id).await;
        assert!(
            ["completed", "failed"].contains(&s["status"].as_str().unwrap()),
            "{s}"
        );
    }
    let (_, verify) = node.admin(Method::GET, "/admin/receipts/verify").await;
    assert_eq!(verify["ok"], true, "{verify}");
    assert_eq!(verify["count"].as_u64().unwrap() as usize, receipts.len());
    receipts
}

/// 32 clients posting 63 payments each to acme, the node killed hard
/// (kill -9) once 600 are accepted: the ids accepted.
async fn killed_mid_burst(node: &mut Node) -> HashSet<String> {
    let c = Client::new(node, "acme", "acme-secret");
    c.entitle("payments", "ent").await;
    c.decided("ent").await;

    let accepted = Arc::new(Mutex::new(HashSet::new()));
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    for w in 0..32 {
        let (c, accepted, sent) = (c.clone(), accepted.clone(), sent.clone());
        clients.push(tokio::spawn(async move {
            for i in 0..63 {
                let id = format!("burst-{w}-{i}");
                sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                match c.post(&pay(&id, &format!("cust-{w}-{i}"), 10.0)).await {
                    Ok(a) if a.status == 202 => {
                        accepted.lock().unwrap().insert(id);
                    }
                    Ok(a) => panic!("unexpected {}: {}", a.status, a.body),
                    // The node is gone: this client stops.
                    Err(_) => return,
                }
            }
        }));
    }
    // Kill it hard in the middle of the burst.
    wait_for("half the burst accepted", Duration::from_secs(60), || {
        (accepted.lock().unwrap().len() >= 600).then_some(())
    });
    node.kill_hard();
    for t in clients {
        t.await.unwrap();
    }
    let accepted: HashSet<String> = accepted.lock().unwrap().clone();
    assert!(
        accepted.len() >= 600 && accepted.len() < 2016,
        "killed mid-burst: {} accepted",
        accepted.len()
    );
    accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_burst_loses_nothing_and_decides_nothing_twice() {
    let mut node = Node::start_with(&test_config(""), &[]);
    let accepted = killed_mid_burst(&mut node).await;
    node.restart();
    node.drained().await;
    let receipts = each_decided_once(&node, &accepted).await;
    // The engine came back from a checkpoint that matches the ledger
    // (checkpoints are deferred in kept redo records; the kill left some).
    quota_matches_actions(&node, &receipts).await;
}

/// The signed head of a node killed mid-burst, damaged, is rebuilt at the
/// ledger's last committed receipt (with the kept redo records and signal
/// records a kill leaves): the node starts and loses nothing, decides
/// nothing twice, and its ledger verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_rebuilt_after_a_kill_mid_burst_loses_nothing_and_decides_nothing_twice() {
    let mut node = Node::start_with(&test_config(""), &[]);
    let accepted = killed_mid_burst(&mut node).await;
    let data = node.data_dir();
    let config = node.config_path().to_path_buf();
    let rebuilt = rebuild_damaged_head(&config, &data);
    assert!(rebuilt["head_seq"].as_u64().unwrap() > 600, "{rebuilt}");
    node.restart();
    node.drained().await;
    let receipts = each_decided_once(&node, &accepted).await;
    quota_matches_actions(&node, &receipts).await;
}

/// acme's `payments` engine holds one unit of quota less per action it
/// generated (its receipts), none lost or counted twice.
async fn quota_matches_actions(node: &Node, receipts: &[Value]) {
    let actions = receipts
        .iter()
        .filter(|r| r["kind"] == "action_generated" && r["tenant_id"] == "acme")
        .count() as u64;
    let (_, engine) = node
        .admin(Method::GET, "/admin/tenants/acme/payments")
        .await;
    assert_eq!(
        engine["quota_remaining"].as_u64(),
        Some(1_000_000 - actions),
        "one unit of quota per action: {engine}"
    );
}

/// Sixteen clients posting payments (`{prefix}-{worker}-{n}`) until stopped.
struct Burst {
    accepted: Arc<Mutex<HashSet<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Burst {
    /// `refusals`: whether a 503 is an answer to expect (else it fails the test).
    fn start(c: &Client, prefix: &str, refusals: bool) -> Burst {
        Burst::of(c, prefix, refusals, 16, |id, w, i| {
            pay(id, &format!("cust-{w}-{i}"), 1.0)
        })
    }

    /// `clients` clients posting `signal(id, worker, n)` until stopped.
    fn of(
        c: &Client,
        prefix: &str,
        refusals: bool,
        clients: usize,
        signal: fn(&str, usize, usize) -> Value,
    ) -> Burst {
        let workers = clients;
        let accepted = Arc::new(Mutex::new(HashSet::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut clients = Vec::new();
        for w in 0..workers {
            let (c, accepted, stop) = (c.clone(), accepted.clone(), stop.clone());
            let prefix = prefix.to_string();
            clients.push(tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let id = format!("{prefix}-{w}-{i}");
                    i += 1;
                    let a = c.post(&signal(&id, w, i)).await;
                    match a {
                        Ok(a) if a.status == 202 => {
                            accepted.lock().unwrap().insert(id);
                        }
                        Ok(a) if a.status == 503 && refusals => {}
                        Ok(a) => panic!("unexpected {}: {}", a.status, a.body),
                        Err(e) => panic!("{id}: {e}"),
                    }
                }
            }));
        }
        Burst {
            accepted,
            stop,
            clients,
        }
    }

    /// Waits until `n` more signals are accepted.
    async fn accepted_more(&self, n: usize) {
        let before = self.accepted.lock().unwrap().len();
        let end = std::time::Instant::now() + Duration::from_secs(30);
        while self.accepted.lock().unwrap().len() < before + n {
            assert!(std::time::Instant::now() < end, "no signals accepted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the clients; what was accepted.
    async fn stop(self) -> HashSet<String> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in self.clients {
            t.await.unwrap();
        }
        let accepted = self.accepted.lock().unwrap().clone();
        accepted
    }
}

/// The queue killed again and again under a burst (its supervisor
/// restarts it, the node goes on): every signal answered 202 is decided
/// once, without a restart of the node. What a killed queue had staged
/// for the next group flush is still written by it, so the new queue must
/// see it (and number its own signals after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_killed_under_a_burst_loses_nothing_it_accepted() {
    let node = Node::start_with(&test_config(""), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent").await;
    c.decided("ent").await;
    // The queue restarting, or gone with the post in hand: 503.
    let burst = Burst::start(&c, "kq", true);
    // Four kills: kanban_sup allows five restarts in 10 s.
    for kill in 1..=4 {
        // Some signals in between, so that each kill meets a burst.
        burst.accepted_more(200).await;
        node.kill_until_restarted("kanban_queue", kill).await;
    }
    let accepted = burst.stop().await;
    for id in &accepted {
        assert_eq!(c.decided(id).await["status"], "completed", "{id}");
    }
    each_decided_once(&node, &accepted).await;
}

/// SKUs of the ledger test, each an engine of acme's.
const LEDGER_SKUS: usize = 400;

/// `andon_ledger` killed under a burst over many engines: each kill
/// crashes the engines it cut off mid-commit (each comes back from its
/// checkpoint), and nothing accepted is lost or decided twice. Those
/// crashes can pass `engine_sup`'s own 100 restarts in 10 s, so
/// `engine_sup` allows for them (`engine_sup_intensity`: 5 ledger
/// restarts of `wip_limit` engines more) and carries on.
///
/// How many engines a kill cuts off is up to timing (the commits the
/// ledger holds for its next write at that instant: from none to most of
/// the WIP limit, seen here), so engines are then also killed outright,
/// 101 of them, at once: more restarts than 100 in 10 s in every run,
/// which the fixed limit of before failed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_restarts_under_load_do_not_take_the_engines_down() {
    let mut extra = String::from("[kanban]\nwip_limit = 400\n");
    for k in 0..LEDGER_SKUS {
        extra += &format!("[skus.k{k}]\npolicies = []\nquota = 1000000\n");
    }
    let node = Node::start_with(&test_config(&extra), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    for k in 0..LEDGER_SKUS {
        c.entitle(&format!("k{k}"), &format!("ent-{k}")).await;
    }
    for k in 0..LEDGER_SKUS {
        c.decided(&format!("ent-{k}")).await;
    }
    let burst = Burst::of(&c, "kl", false, 256, |id, w, i| {
        let sku = format!("k{}", (w * 7 + i) % LEDGER_SKUS);
        signal("acme", &sku, "deploy", id, json!({"n": i}))
    });
    // Five kills (as many as andon_sup allows in 10 s), each with most of
    // the WIP limit in flight.
    for kill in 1..=5 {
        node.admin_until("/admin/queue", "350 signals in flight", |q| {
            q["in_flight"].as_u64() >= Some(350)
        })
        .await;
        node.kill_until_restarted("andon_ledger", kill).await;
    }
    // Engines killed outright, under the same burst: 101 that were
    // running (one being restarted or passivated is not there to kill).
    let mut killed = std::collections::BTreeSet::new();
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while killed.len() <= 100 {
        assert!(
            std::time::Instant::now() < end,
            "only {} engines could be killed",
            killed.len()
        );
        let kills = (0..LEDGER_SKUS)
            .filter(|k| !killed.contains(k))
            .take(101 - killed.len());
        let node = &node;
        let done = futures::future::join_all(kills.map(|k| async move {
            let path = format!("/admin/actors/engine%3Aacme%3Ak{k}/kill");
            (k, node.admin(Method::POST, &path).await.0)
        }))
        .await;
        killed.extend(
            done.into_iter()
                .filter(|(_, status)| *status == 202)
                .map(|(k, _)| k),
        );
        if killed.len() <= 100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let accepted = burst.stop().await;
    node.drained().await;
    each_decided_once(&node, &accepted).await;
    let cut = node
        .log()
        .lines()
        .filter(|l| l.contains("child exited abnormally") && l.contains("andon_ledger"))
        .count();
    let tree = node.tree().await;
    assert_eq!(
        find(&tree, "engine_sup").unwrap()["restarts"],
        0,
        "engine_sup gave up after {cut} engines were cut off by the ledger and {} killed: {tree}",
        killed.len()
    );
    for k in &killed {
        let engine = find(&tree, &format!("engine:acme:k{k}"));
        assert!(
            engine.is_some_and(|e| e["restarts"].as_u64() >= Some(1)),
            "engine k{k} was killed, and is not shown restarted: {engine:?}"
        );
    }
    eprintln!(
        "engines cut off by the ledger's restarts: {cut}; killed: {}",
        killed.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_killed_mid_commit_starts_from_what_it_committed() {
    let node = Node::start_with(&test_config(""), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent").await;
    c.decided("ent").await;
    let burst = Burst::start(&c, "ke", false);
    let engine = "engine:acme:payments";
    for kill in 1..=8 {
        // A burst under way at each kill.
        burst.accepted_more(200).await;
        node.kill_until_restarted(engine, kill).await;
    }
    let accepted = burst.stop().await;
    node.drained().await;
    let receipts = each_decided_once(&node, &accepted).await;
    quota_matches_actions(&node, &receipts).await;
    // Most kills land mid-commit (a busy engine waits on the ledger most of
    // its time): the next incarnation waited for what the ledger held.
    assert!(
        node.log()
            .contains("waiting for the commits an earlier incarnation left"),
        "no kill landed mid-commit:\n{}",
        node.log_tail(60)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_what_it_cannot_keep_and_loses_nothing_it_accepted() {
    // The data dir on a 2 MiB tmpfs of its own: 16 clients post until the
    // node refuses (the disk is full) or goes (it stops when its store fails).
    let dir = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(&dir.path().join("data"), "2m");
    let mut node = Node::start_with_in(dir, &test_config(""), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent").await;
    c.decided("ent").await;

    let accepted = Arc::new(Mutex::new(HashSet::new()));
    let refused = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for w in 0..16 {
        let (c, accepted, refused) = (c.clone(), accepted.clone(), refused.clone());
        clients.push(tokio::spawn(async move {
            for i in 0..100_000 {
                let id = format!("full-{w}-{i}");
                match c.post(&pay(&id, &format!("cust-{w}-{i}"), 10.0)).await {
                    Ok(a) if a.status == 202 => {
                        accepted.lock().unwrap().insert(id);
                    }
                    // A refusal says why, per SPEC's error JSON.
                    Ok(a) if a.status >= 500 => {
                        let code = a.body["error"]["code"].as_str().map(str::to_string);
                        refused
                            .lock()
                            .unwrap()
                            .push((a.status, code, a.body.to_string()));
                        return;
                    }
                    Ok(a) => panic!("unexpected {}: {}", a.status, a.body),
                    // The node is gone.
                    Err(_) => return,
                }
            }
        }));
    }
    for t in clients {
        t.await.unwrap();
    }
    let refused = refused.lock().unwrap().clone();
    // Every refusal is a 503 saying why: the full disk, the queue
    // restarting because of it (or stopping with the post in its hands),
    // or the node stopping. (Clients that got no
    // answer found the node gone: it stops within milliseconds.)
    for (status, code, body) in &refused {
        assert_eq!(
            (*status, code.as_deref()),
            (503, Some("unavailable")),
            "{body}"
        );
        assert!(
            body.contains("i/o error: no storage space")
                || body.contains("the queue is restarting")
                || body.contains("the queue stopped before answering")
                || body.contains("node is draining"),
            "{body}"
        );
    }
    let accepted: HashSet<String> = accepted.lock().unwrap().clone();
    assert!(
        !accepted.is_empty(),
        "nothing accepted before the disk filled"
    );
    // sled writes nothing more after an I/O error until it is opened
    // again: the node stops by itself, saying why and what to do, rather
    // than restart layers that could only fail again.
    let status = node.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", node.log());
    let log = node.log();
    assert!(
        log.contains(
            "the store failed: the node stops (exit 1); start it again once the cause is gone"
        ),
        "{log}"
    );
    assert!(log.contains("no storage space"), "{log}");
    // Engines whose commits failed did not count it against the signals
    // they held, so none was taken for poison (three would have been).
    assert!(!log.contains("poison"), "{log}");

    // Room again, and a restart: everything accepted is decided once, and
    // no signal was set aside as poison for the store's failures.
    disk.resize("64m");
    node.restart();
    node.drained().await;
    each_decided_once(&node, &accepted).await;
    let (_, letters) = node.admin(Method::GET, "/admin/deadletter").await;
    assert_eq!(letters, json!([]), "{letters}");
    drop(disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_the_store_cannot_write_stops_the_node_and_loses_nothing_it_accepted() {
    // sled writes any page past 128 KiB to a file of its own under
    // `blobs/` (a queue block of a few large signals, a full leaf of the
    // ledger). Made a file, that directory refuses them all, as a full
    // disk or a process out of file handles would. The write that meets it
    // fails the store, and the node stops, saying why, as on a full disk.
    let mut node = Node::start_with(&test_config(""), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent").await;
    c.decided("ent").await;
    let blobs = node.data_dir().join("sled").join("blobs");
    std::fs::remove_dir_all(&blobs).unwrap();
    std::fs::write(&blobs, b"").unwrap();

    let accepted = Arc::new(Mutex::new(HashSet::new()));
    let mut clients = Vec::new();
    for w in 0..8 {
        let (c, accepted) = (c.clone(), accepted.clone());
        clients.push(tokio::spawn(async move {
            for i in 0..10_000 {
                let id = format!("blob-{w}-{i}");
                let body = signal(
                    "acme",
                    "payments",
                    "payment",
                    &id,
                    json!({"amount": 1.0, "currency": "USD", "customer_id": format!("c{w}-{i}"),
                           "note": "n".repeat(40_000)}),
                );
                match c.post(&body).await {
                    Ok(a) if a.status == 202 => {
                        accepted.lock().unwrap().insert(id);
                    }
                    Ok(a) if a.status == 503 => return,
                    Ok(a) => panic!("unexpected {}: {}", a.status, a.body),
                    // The node is gone.
                    Err(_) => return,
                }
            }
            panic!("10,000 signals of 40 KB accepted with no blob written");
        }));
    }
    for t in clients {
        t.await.unwrap();
    }
    let status = node.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", node.log());
    let log = node.log();
    assert!(
        log.contains(
            "the store failed: the node stops (exit 1); start it again once the cause is gone"
        ),
        "{log}"
    );

    // The cause gone, a restart decides everything accepted, once.
    std::fs::remove_file(&blobs).unwrap();
    std::fs::create_dir(&blobs).unwrap();
    let accepted: HashSet<String> = accepted.lock().unwrap().clone();
    node.restart();
    node.drained().await;
    each_decided_once(&node, &accepted).await;
    let c = Client::new(&node, "acme", "acme-secret");
    assert_eq!(c.decided("ent").await["status"], "completed");
}

/// A 202 promises a signal on disk, power cuts included: watched with
/// strace on the running node.
/// - sled's flush waits on `sync_file_range` for the log range it wrote,
///   which writes neither the log file's size nor the disk's cache: the
///   store `fdatasync`s the log (`sled/db`) after each flush.
/// - sled writes a page past 128 KiB (here a queue block of large signals)
///   to a file of its own under `blobs/`, and puts a pointer to it in its
///   log: each blob, and then `blobs/`, is synced when written, before the
///   log that points at it is (vendor/sled/PATCHED.md 11).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_and_each_blob_are_synced_before_their_signals_are_accepted() {
    let node = Node::start_with(&test_config(""), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent").await;
    c.decided("ent").await;
    let trace = node.dir.path().join("strace.txt");
    let mut strace = std::process::Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-y",
            "-e",
            "trace=openat,fsync,fdatasync,sync_file_range",
            "-o",
        ])
        .arg(&trace)
        .args(["-p", &node.child.id().to_string()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("strace (scripts/install-test-tools.sh installs it)");
    let traced = || std::fs::read_to_string(&trace).unwrap_or_default();
    // Attached once the flush of a signal shows in the trace.
    let end = std::time::Instant::now() + Duration::from_secs(30);
    for i in 0.. {
        assert!(
            std::time::Instant::now() < end,
            "strace never attached: {}",
            traced()
        );
        let id = format!("probe-{i}");
        c.post(&pay(&id, "c", 1.0)).await.unwrap();
        c.decided(&id).await;
        if traced().contains("sync_file_range(") {
            break;
        }
    }
    // Large signals, 8 at once, until blobs have been written.
    let blobs_dir = node.data_dir().join("sled").join("blobs");
    let created = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.contains("O_CREAT") && l.contains("/blobs/"))
            .filter_map(|l| {
                let path = &l[l.find('"')? + 1..];
                Some(path[..path.find('"')?].to_string())
            })
            .collect()
    };
    let end = std::time::Instant::now() + Duration::from_secs(60);
    let mut round = 0;
    while created(&traced()).len() < 3 {
        assert!(std::time::Instant::now() < end, "no blob written");
        let mut posts = Vec::new();
        for w in 0..8 {
            let c = c.clone();
            let id = format!("big-{round}-{w}");
            posts.push(tokio::spawn(async move {
                let body = signal(
                    "acme",
                    "payments",
                    "payment",
                    &id,
                    json!({"amount": 1.0, "customer_id": id, "note": "n".repeat(40_000)}),
                );
                assert_eq!(c.post(&body).await.unwrap().status, 202);
            }));
        }
        for p in posts {
            p.await.unwrap();
        }
        round += 1;
    }
    let log = std::fs::canonicalize(node.data_dir().join("sled").join("db")).unwrap();
    let dir = std::fs::canonicalize(&blobs_dir).unwrap();
    let (log, dir) = (log.to_str().unwrap(), dir.to_str().unwrap());
    // With -y, a synced file descriptor shows its path: `fsync(7</.../blobs/1234>)`,
    // or `fsync(7</.../blobs/1234> <unfinished ...>` when another thread's call cuts in.
    let synced = |t: &str, call: &str, path: &str| {
        let fd = format!("<{path}>");
        t.lines()
            .any(|l| l.contains(&format!(" {call}(")) && l.contains(&fd))
    };
    // What is not synced yet; a blob's sync follows its creation at once,
    // but may not be in the trace yet when its creation is.
    let unsynced = |t: &str| -> Vec<String> {
        let mut left: Vec<String> = created(t)
            .iter()
            .map(|b| format!("{dir}/{}", b.rsplit('/').next().unwrap()))
            .filter(|b| !synced(t, "fsync", b))
            .collect();
        if !synced(t, "fsync", dir) {
            left.push(dir.to_string());
        }
        if !synced(t, "fdatasync", log) {
            left.push(log.to_string());
        }
        left
    };
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let t = traced();
        let left = unsynced(&t);
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "never synced: {left:?}\n{t}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    send_signal(&strace, libc::SIGINT);
    let _ = strace.wait();
}

#[tokio::test]
async fn the_ledger_verifies_offline_and_every_tampering_is_caught() {
    let mut node = Node::start_with(&test_config(""), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent").await;
    for i in 0..4 {
        c.post(&pay(&format!("t-{i}"), &format!("c{i}"), 1.0))
            .await
            .unwrap();
    }
    for i in 0..4 {
        c.decided(&format!("t-{i}")).await;
    }
    let export = node.dir.path().join("receipts.jsonl");
    let (config, operator) = (node.config_path().to_path_buf(), node.operator.clone());
    let run = |args: &[&str]| tai_receipts(&config, &operator, args);
    let out = run(&["--verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Offline, on the data dir of a node that still runs: refused, saying why.
    let data = node.data_dir();
    let out = run(&["--verify", "--data-dir", data.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("is in use by another process")
            && err.contains("a running node's receipts are read online, without --data-dir"),
        "{err}"
    );

    // A path that holds no node's store is refused, not verified as empty.
    let nothing = node.dir.path().join("no-such-dir");
    let out = run(&["--verify", "--data-dir", nothing.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("no store in") && err.contains("give the data_dir of a node"),
        "{err}"
    );
    assert!(!nothing.exists(), "nothing was made there");

    // Stop the node; everything else works on its data dir and an export.
    node.signal(libc::SIGTERM);
    assert_eq!(node.wait_exit(Duration::from_secs(15)).code(), Some(0));
    let scratch = node.dir.path().to_path_buf();
    let out = run(&["--verify", "--data-dir", data.to_str().unwrap()]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["ok"].as_bool(), report["count"].as_u64()),
        (Some(true), Some(9)),
        "{report}"
    );
    let out = run(&[
        "--export",
        export.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let intact = std::fs::read_to_string(&export).unwrap();
    let lines: Vec<String> = intact.lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 10, "9 receipts and the signed head");
    // One tenant's, offline: acme's are all nine, nobody's none.
    let one = node.dir.path().join("one-tenant.jsonl");
    for (tenant, lines) in [("acme", 10), ("nobody", 1)] {
        let out = run(&[
            "--export",
            one.to_str().unwrap(),
            "--tenant",
            tenant,
            "--data-dir",
            data.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{tenant}");
        let text = std::fs::read_to_string(&one).unwrap();
        assert_eq!(text.lines().count(), lines, "{tenant}: {text}");
        assert_eq!(text.lines().last(), intact.lines().last(), "the head");
        if tenant == "acme" {
            assert_eq!(text, intact);
        }
    }

    let verify_file = |lines: &[String]| -> Value {
        let f = scratch.join("tampered.jsonl");
        std::fs::write(&f, lines.join("\n")).unwrap();
        let out = run(&["--verify", "--file", f.to_str().unwrap()]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(out.status.success(), v["ok"] == true);
        v
    };
    assert_eq!(verify_file(&lines)["ok"], true);
    let mut edited = lines.clone();
    edited[4] = edited[4].replace("\"success\":true", "\"success\":false");
    assert_eq!(verify_file(&edited)["first_bad_seq"], 5);
    let mut deleted = lines.clone();
    deleted.remove(2);
    assert_eq!(verify_file(&deleted)["first_bad_seq"], 3);
    let mut reordered = lines.clone();
    reordered.swap(5, 6);
    assert_eq!(verify_file(&reordered)["first_bad_seq"], 6);
    let mut inserted = lines.clone();
    // A forged receipt slipped in before seq 4, claiming to be seq 4.
    inserted.insert(3, lines[3].replace("\"rcpt_", "\"rcpt_forged"));
    assert_eq!(verify_file(&inserted)["first_bad_seq"], 4);
    let mut truncated = lines[..7].to_vec();
    truncated.push(lines[9].clone());
    let v = verify_file(&truncated);
    assert_eq!(
        (v["ok"].as_bool(), v["first_bad_seq"].as_u64()),
        (Some(false), Some(8)),
        "a cut tail is caught by the signed head"
    );
}

/// `tai receipts ARGS` against the node of `config` at `operator`.
/// An export is written beside its name and renamed into place once
/// whole: synced before the rename, and its directory after, so that a
/// crash or power cut cannot leave the name on an export whose bytes never
/// reached the disk (a rename is often on disk before the data it names).
/// Watched with strace on `tai receipts --export`.
#[tokio::test]
async fn an_export_is_synced_before_it_takes_its_name() {
    let node = Node::start_with(&test_config(""), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent").await;
    c.decided("ent").await;
    let dir = std::fs::canonicalize(node.dir.path()).unwrap();
    let export = dir.join("receipts.jsonl");
    let trace = dir.join("export.strace");
    let out = std::process::Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-y",
            "-e",
            "trace=fsync,fdatasync,rename,renameat,renameat2",
            "-o",
        ])
        .arg(&trace)
        .arg(tai_bin())
        .args(["receipts", "--config"])
        .arg(node.config_path())
        .arg("--export")
        .arg(&export)
        .env("TAI_OPERATOR__LISTEN", &node.operator)
        .output()
        .expect("strace (scripts/install-test-tools.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = t.lines().collect();
    let at = |what: &dyn Fn(&str) -> bool| lines.iter().position(|l| what(l));
    let partial = format!("{}.partial", export.display());
    let synced = at(&|l| l.contains("sync(") && l.contains(&format!("<{partial}>")));
    let renamed = at(&|l| l.contains("rename") && l.contains(&partial));
    let dir_synced = at(&|l| l.contains("sync(") && l.contains(&format!("<{}>", dir.display())));
    assert!(
        matches!((synced, renamed, dir_synced), (Some(a), Some(b), Some(c)) if a < b && b < c),
        "the export synced, renamed, then its directory synced, in that order: {synced:?} {renamed:?} {dir_synced:?}\n{t}"
    );
    assert!(std::fs::read_to_string(&export).unwrap().lines().count() >= 2);
}

fn tai_receipts(config: &std::path::Path, operator: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(tai_bin())
        .arg("receipts")
        .arg("--config")
        .arg(config)
        .args(args)
        .env("TAI_OPERATOR__LISTEN", operator)
        .output()
        .unwrap()
}

/// A running node verifies its ledger as of the signed head it reads first:
/// receipts committed while it reads are the next verification's, not an
/// unsigned extension (they were reported as one, a false alarm, whenever
/// signals were decided during a verification).
#[tokio::test]
async fn the_ledger_verifies_while_signals_keep_being_decided() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    let node = Node::start_with(&test_config(""), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent").await;
    let done = AtomicBool::new(false);
    let senders = (0..8).map(|w| {
        let (c, done) = (&c, &done);
        async move {
            let mut sent = 0u64;
            while !done.load(Relaxed) {
                let id = format!("v-{w}-{sent}");
                let a = c.post(&pay(&id, &id, 1.0)).await.unwrap();
                assert_eq!(a.status, 202, "{}", a.body);
                sent += 1;
            }
            sent
        }
    });
    let verifier = async {
        let head_seq = || async {
            let (_, h) = node.admin(Method::GET, "/admin/receipts/head").await;
            h["signed_head"]["seq"].as_u64().unwrap_or(0)
        };
        // A ledger long enough that reading it overlaps commits.
        while head_seq().await < 1_000 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let mut last = 0;
        for _ in 0..5 {
            let (status, v) = node.admin(Method::GET, "/admin/receipts/verify").await;
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["ok"], true, "verified under traffic: {v}");
            let count = v["count"].as_u64().unwrap();
            assert!(count >= last, "{count} after {last}");
            last = count;
        }
        done.store(true, Relaxed);
        last
    };
    let (sent, verified) = tokio::join!(futures::future::join_all(senders), verifier);
    let sent: u64 = sent.iter().sum();
    let (_, v) = node.admin(Method::GET, "/admin/receipts/verify").await;
    assert_eq!(v["ok"], true, "at rest: {v}");
    assert!(
        v["count"].as_u64().unwrap() >= verified,
        "{sent} signals sent, {verified} receipts verified under traffic, then {v}"
    );
}

#[tokio::test]
async fn an_online_export_is_the_ledger_as_of_the_signed_head_it_ends_with() {
    let node = std::sync::Arc::new(Node::start_with(&test_config(""), &[]));
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent").await;
    // Receipts on the ledger before the export starts, so that the cut
    // below leaves some (the export can end before any more are decided,
    // as it did on a loaded machine: one receipt, cut to an empty ledger,
    // which verifies).
    c.post(&pay("first", "c-first", 1.0)).await.unwrap();
    c.decided("first").await;
    // Taken from the running node while signals keep being decided.
    let file = node.dir.path().join("online.jsonl");
    let exporting = {
        let (node, file) = (node.clone(), file.to_str().unwrap().to_string());
        tokio::task::spawn_blocking(move || {
            tai_receipts(node.config_path(), &node.operator, &["--export", &file])
        })
    };
    let mut sent = 0;
    while !exporting.is_finished() || sent < 20 {
        let a = c
            .post(&pay(&format!("x-{sent}"), &format!("c{sent}"), 1.0))
            .await
            .unwrap();
        assert_eq!(a.status, 202, "{}", a.body);
        sent += 1;
    }
    let out = exporting.await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let (last, receipts) = lines.split_last().unwrap();
    let head: Value = serde_json::from_str(last).unwrap();
    assert_eq!(
        head["signed_head"]["seq"].as_u64(),
        Some(receipts.len() as u64),
        "the file ends with the head of what it holds: {last}"
    );
    let verify = |body: &str| -> Value {
        let f = node.dir.path().join("check.jsonl");
        std::fs::write(&f, body).unwrap();
        let out = tai_receipts(
            node.config_path(),
            &node.operator,
            &["--verify", "--file", f.to_str().unwrap()],
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(out.status.success(), v["ok"] == true, "{v}");
        v
    };
    let v = verify(&text);
    assert_eq!(
        (v["ok"].as_bool(), v["count"].as_u64()),
        (Some(true), Some(receipts.len() as u64)),
        "{v}"
    );
    // Cut its tail and its head line with it: not vouched for.
    let cut = receipts[..receipts.len() - 1].join("\n");
    let v = verify(&cut);
    assert_eq!(
        v["first_bad_seq"].as_u64(),
        Some(receipts.len() as u64),
        "{v}"
    );
    assert!(
        v["reason"].as_str().unwrap().starts_with("no signed head"),
        "{v}"
    );
    // The node's own head, as the export took it, is served on its own.
    let (status, now) = node.admin(Method::GET, "/admin/receipts/head").await;
    assert_eq!(status, 200);
    assert!(now["signed_head"]["seq"].as_u64() >= head["signed_head"]["seq"].as_u64());
}

fn engines_live(tree: &Value) -> Vec<String> {
    find(tree, "engine_sup")
        .map(|s| {
            children(s)
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn idle_engines_are_passivated_and_come_back_with_their_state() {
    let node = Node::start_with(
        &test_config(""),
        &[
            ("TAI_JIDOKA__IDLE_TIMEOUT_SECS", "1"),
            ("TAI_JIDOKA__MAX_ACTIVE_ENGINES", "2"),
        ],
    );
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent").await;
    c.post(&pay("p-1", "c1", 1.0)).await.unwrap();
    assert_eq!(c.decided("p-1").await["status"], "completed");
    let tree = node.tree().await;
    let engine = find(&tree, "engine:acme:payments").expect("live after a signal");
    assert_eq!(
        engine["state"], "stable",
        "the tree shows the engine's state"
    );

    // Idle for its timeout: checkpointed already, stopped, gone from the tree.
    let tree = node
        .admin_until("/admin/tree", "passivation", |t| engines_live(t).is_empty())
        .await;
    assert!(find(&tree, "engine:acme:payments").is_none());
    let (_, e) = node
        .admin(Method::GET, "/admin/tenants/acme/payments")
        .await;
    assert_eq!(
        (e["active"].as_bool(), e["state"].as_str()),
        (Some(false), Some("stable"))
    );
    assert_eq!(e["quota_remaining"], 999_999);

    // The next signal brings it back from its checkpoint.
    c.post(&pay("p-2", "c2", 1.0)).await.unwrap();
    assert_eq!(c.decided("p-2").await["status"], "completed");
    let (_, e) = node
        .admin(Method::GET, "/admin/tenants/acme/payments")
        .await;
    assert_eq!(
        (e["active"].as_bool(), e["entitled"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(e["quota_remaining"], 999_998, "state survived passivation");

    // A cap of 2 live engines: a third passivates the least recently used.
    c.entitle("tight", "ent-tight").await;
    c.entitle("slowboot", "ent-slow").await;
    for id in ["ent-tight", "ent-slow"] {
        c.decided(id).await;
    }
    let tree = node.tree().await;
    assert!(engines_live(&tree).len() <= 2, "{:?}", engines_live(&tree));
    let (_, all) = node.admin(Method::GET, "/admin/tenants").await;
    assert_eq!(
        all.as_array().unwrap().len(),
        3,
        "passivated engines are still listed: {all}"
    );
}

/// `tai_engine_state{state}` on `/metrics`.
async fn engines_in(node: &Node, state: &str) -> Option<f64> {
    let series = format!("tai_engine_state{{state=\"{state}\"}} ");
    node.metrics_text()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str())?.parse().ok())
}

/// `tai_engines_live` on `/metrics`.
async fn engines_live_now(node: &Node) -> Option<f64> {
    node.metrics_text()
        .await
        .lines()
        .find_map(|l| l.strip_prefix("tai_engines_live ")?.parse().ok())
}

/// Polls until `tai_engine_state` counts `halted` and `stable` engines as
/// given and none is live, and checks the listing agrees.
async fn counted(node: &Node, halted: f64, stable: f64, what: &str) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let now = (
            engines_in(node, "halted").await,
            engines_in(node, "stable").await,
            engines_live_now(node).await,
        );
        if now == (Some(halted), Some(stable), Some(0.0)) {
            break;
        }
        assert!(
            Instant::now() < end,
            "{what}: (halted, stable, live) {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (state, n) in [("halted", halted), ("stable", stable)] {
        let (_, list) = node
            .admin(Method::GET, &format!("/admin/tenants?state={state}"))
            .await;
        assert_eq!(
            list.as_array().map(|l| l.len() as f64),
            Some(n),
            "{what}: {list}"
        );
    }
}

/// Every engine is counted in its state, live or passive: a passivated
/// engine stays counted in the state it stopped in (a halt shows in
/// `tai_engine_state`, the deploy kit's alert on it and the board for as
/// long as it lasts, not for the idle timeout), and after a restart the
/// router's scan of the checkpoints counts the engines no signal started.
#[tokio::test]
async fn every_engine_is_counted_in_its_state_live_or_passive() {
    let mut node = Node::start_with(&test_config(""), &[("TAI_JIDOKA__IDLE_TIMEOUT_SECS", "1")]);
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent-p").await;
    c.entitle("tight", "ent-t").await;
    c.decided("ent-p").await;
    c.decided("ent-t").await;
    let (status, _) = node
        .admin_with_body(
            Method::POST,
            "/admin/tenants/acme/payments/halt",
            r#"{"reason": "fraud review"}"#,
        )
        .await;
    assert_eq!(status, 200);
    // Both idle, both passivated; still one halted, one stable.
    counted(&node, 1.0, 1.0, "passivated").await;
    assert!(engines_live(&node.tree().await).is_empty());

    // Counted from their checkpoints after a restart, no signal sent.
    node.stop();
    node.restart();
    counted(&node, 1.0, 1.0, "after the restart").await;

    // Resumed (started, then passivated again): stable.
    let (status, _) = node
        .admin(Method::POST, "/admin/tenants/acme/payments/resume")
        .await;
    assert_eq!(status, 200);
    counted(&node, 0.0, 2.0, "resumed").await;
}

/// An engine's `{tenant}/{sku}` in an `/admin/tenants` answer.
fn engine_key(e: &Value) -> String {
    format!(
        "{}/{}",
        e["tenant_id"].as_str().unwrap(),
        e["sku_id"].as_str().unwrap()
    )
}

/// The engines of an `/admin/tenants` answer, as `{tenant}/{sku}`.
fn engine_keys(list: &Value) -> Vec<String> {
    list.as_array().unwrap().iter().map(engine_key).collect()
}

#[tokio::test]
async fn past_the_cap_the_least_recently_used_engine_is_passivated() {
    let node = Node::start_with(&test_config(""), &[("TAI_JIDOKA__MAX_ACTIVE_ENGINES", "2")]);
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "lru-ent-p").await;
    c.decided("lru-ent-p").await;
    c.entitle("tight", "lru-ent-t").await;
    c.decided("lru-ent-t").await;
    // payments is used again, so tight is now the least recently used.
    c.post(&pay("lru-p-1", "c1", 1.0)).await.unwrap();
    c.decided("lru-p-1").await;
    c.entitle("slowboot", "lru-ent-s").await;
    c.decided("lru-ent-s").await;
    let mut live = Vec::new();
    node.admin_until("/admin/tree", "tight passivated", |t| {
        live = engines_live(t);
        live.sort();
        live == ["engine:acme:payments", "engine:acme:slowboot"]
    })
    .await;
    // The passivated one comes back on its next signal, state intact.
    let (_, e) = node.admin(Method::GET, "/admin/tenants/acme/tight").await;
    assert_eq!(
        (e["active"].as_bool(), e["entitled"].as_bool()),
        (Some(false), Some(true)),
        "{e}"
    );

    // Listed live and passivated alike, by tenant then SKU; pages of any
    // size walk the same list.
    let g = Client::new(&node, "globex", "globex-secret");
    g.entitle("payments", "lru-ent-g").await;
    g.decided("lru-ent-g").await;
    let (status, all) = node.admin(Method::GET, "/admin/tenants").await;
    assert_eq!(status, 200, "{all}");
    let all = all.as_array().unwrap().clone();
    assert_eq!(
        all.iter().map(engine_key).collect::<Vec<_>>(),
        [
            "acme/payments",
            "acme/slowboot",
            "acme/tight",
            "globex/payments"
        ]
    );
    let actives: Vec<bool> = all.iter().map(|e| e["active"].as_bool().unwrap()).collect();
    assert_eq!(actives.iter().filter(|a| **a).count(), 2, "{all:?}");
    for limit in [1, 3] {
        let mut walked = Vec::new();
        let mut path = format!("/admin/tenants?limit={limit}");
        loop {
            let (status, page) = node.admin(Method::GET, &path).await;
            assert_eq!(status, 200, "{page}");
            let page = page.as_array().unwrap().clone();
            assert!(page.len() <= limit);
            let Some(last) = page.last() else { break };
            path = format!("/admin/tenants?limit={limit}&after={}", engine_key(last));
            walked.extend(page.iter().map(engine_key));
        }
        assert_eq!(
            walked,
            all.iter().map(engine_key).collect::<Vec<_>>(),
            "pages of {limit}"
        );
    }
    let (_, stable) = node
        .admin(
            Method::GET,
            "/admin/tenants?state=stable&limit=1&after=acme/slowboot",
        )
        .await;
    assert_eq!(engine_keys(&stable), ["acme/tight"]);
    let (status, bad) = node.admin(Method::GET, "/admin/tenants?after=acme").await;
    assert_eq!(
        (status, &bad["error"]["code"]),
        (400, &json!("invalid_request")),
        "{bad}"
    );
}

#[tokio::test]
async fn a_list_of_engines_longer_than_a_page_is_streamed_whole() {
    // 1,500 engines, most passivated: the router reads them in pages of 1,000.
    const N: usize = 1_500;
    let mut extra = String::new();
    for i in 0..N {
        extra.push_str(&format!(
            "[[tenants]]\nid = \"many-{i:04}\"\nsecrets = [\"many-{i}\"]\ntier = \"enterprise\"\n"
        ));
    }
    let node = Node::start_with(
        &test_config(&extra),
        &[("TAI_JIDOKA__MAX_ACTIVE_ENGINES", "100")],
    );
    let clients: Vec<Client> = (0..N)
        .map(|i| Client::new(&node, &format!("many-{i:04}"), &format!("many-{i}")))
        .collect();
    for batch in clients.chunks(50) {
        let posts = batch.iter().map(|c| c.entitle("payments", "ent"));
        futures::future::join_all(posts).await;
    }
    node.drained().await;
    let want: Vec<String> = (0..N).map(|i| format!("many-{i:04}/payments")).collect();

    // The whole list comes as a stream (no length ahead), in order, once each.
    let resp = reqwest::Client::new()
        .get(node.url("/admin/tenants"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert!(
        resp.headers().get("content-length").is_none(),
        "{:?}",
        resp.headers()
    );
    let all: Vec<Value> = resp.json().await.unwrap();
    assert_eq!(all.iter().map(engine_key).collect::<Vec<_>>(), want);
    // Filtered by state across pages, and paged by hand: the same list.
    let (_, stable) = node.admin(Method::GET, "/admin/tenants?state=stable").await;
    assert_eq!(engine_keys(&stable), want);
    let (_, first) = node.admin(Method::GET, "/admin/tenants?limit=1000").await;
    let first = first.as_array().unwrap().clone();
    let path = format!(
        "/admin/tenants?limit=1000&after={}",
        engine_key(first.last().unwrap())
    );
    let (_, rest) = node.admin(Method::GET, &path).await;
    let walked: Vec<String> = first
        .iter()
        .chain(rest.as_array().unwrap())
        .map(engine_key)
        .collect();
    assert_eq!(walked, want);
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    let node = Node::start_with(&test_config(""), &[("TAI_KANBAN__MAX_DEPTH", "3")]);
    // No entitlement yet: globex's payments wait in boot, so they stay queued.
    let c = Client::new(&node, "globex", "globex-secret");
    for i in 0..3 {
        let a = c
            .post(&signal(
                "globex",
                "payments",
                "payment",
                &format!("w{i}"),
                json!({}),
            ))
            .await
            .unwrap();
        assert_eq!(a.status, 202, "{}", a.body);
    }
    let full = c
        .post(&signal("globex", "payments", "payment", "w3", json!({})))
        .await
        .unwrap();
    assert_eq!(full.status, 503, "{}", full.body);
    assert_eq!(full.body["error"]["code"], "unavailable");
    assert!(full.headers.contains_key("retry-after"));
    // A signal already queued is still answered as a duplicate, full or not.
    let dup = c
        .post(&signal("globex", "payments", "payment", "w0", json!({})))
        .await
        .unwrap();
    assert_eq!(dup.status, 200, "{}", dup.body);
    assert_eq!(dup.body["duplicate"], true);
    let (_, q) = node.admin(Method::GET, "/admin/queue").await;
    assert_eq!(
        (q["depth"].as_u64(), q["max_depth"].as_u64()),
        (Some(3), Some(3))
    );
    // Delivery to the engine follows the 202 asynchronously.
    node.admin_until(
        "/admin/tenants/globex/payments",
        "three signals postponed in boot",
        |e| e["state"] == "boot" && e["postponed"] == 3,
    )
    .await;
    // Entitled, the waiting signals are decided in order and the queue drains.
    let ent = c
        .post(&signal(
            "globex",
            "payments",
            "entitlement",
            "g-ent",
            json!({"active": true}),
        ))
        .await
        .unwrap();
    assert_eq!(
        ent.status, 503,
        "still full: the entitlement cannot get in either"
    );
}

#[tokio::test]
async fn a_governance_policy_with_params_decides_through_the_node() {
    let extra = r#"
[skus.costs]
policies = ["cost_governance", "compliance_audit"]
params.cost_governance = { freeze_ratio = 1.5 }
params.compliance_audit = { required_controls = ["mfa"] }
"#;
    let node = Node::start_with(&test_config(extra), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("costs", "ent").await;
    let send = |id: &str, spend: u32| {
        signal(
            "acme",
            "costs",
            "spend_report",
            id,
            json!({"spend": spend, "budget": 100, "controls": ["mfa"]}),
        )
    };
    assert_eq!(c.post(&send("ok", 140)).await.unwrap().status, 202);
    assert_eq!(c.post(&send("frozen", 151)).await.unwrap().status, 202);
    assert_eq!(
        c.decided("ok").await["status"],
        "completed",
        "140 is under 1.5 x 100"
    );
    let frozen = c.decided("frozen").await;
    assert_eq!(frozen["status"], "denied");
    let reason = frozen["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("cost_governance: spend 151 over 1.5x budget 100"),
        "{reason}"
    );
    let missing = signal(
        "acme",
        "costs",
        "spend_report",
        "no-mfa",
        json!({"spend": 1, "budget": 100, "controls": []}),
    );
    c.post(&missing).await.unwrap();
    let denied = c.decided("no-mfa").await;
    assert!(
        denied["reason"]
            .as_str()
            .unwrap()
            .contains("compliance_audit: missing controls: mfa"),
        "{denied}"
    );
}

#[test]
fn tai_bench_decides_what_it_sends_and_reports_its_figures() {
    // Short on purpose: this checks the load generator works end to end
    // (its own node, entitlement, signed load, decisions from receipts,
    // baseline), not how fast; the figures are BENCHMARKS.md's business.
    let report = bench_report(&["--tenants", "3", "--duration", "1", "--concurrency", "4"]);
    assert_positive(
        &report,
        &[
            "accepted_per_sec",
            "decided_per_sec",
            "p50_ms",
            "p99_ms",
            "p999_ms",
            "baseline_per_sec",
            "rss_mb",
            "node_cpu_us_per_signal",
            "client_cpu_us_per_signal",
        ],
    );
    // The bare endpoint ran before and after the node's load; the baseline
    // is their mean.
    assert_bracketed(&report, "baseline_runs", "baseline_per_sec");
}

#[test]
fn tai_bench_refuses_bad_arguments_by_name() {
    let bench = |args: &[&str]| {
        let out = std::process::Command::new(tai_bin())
            .arg("bench")
            .args(args)
            .args(["--no-baseline", "--json"])
            .current_dir(workspace_root())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    for (args, code, says) in [
        (
            &["--tenants", "0"][..],
            2,
            "'--tenants <TENANTS>': must be at least 1",
        ),
        (
            &["--concurrency", "0"],
            2,
            "'--concurrency <CONCURRENCY>': must be at least 1",
        ),
        (
            &["--duration", "0"],
            2,
            "'--duration <DURATION>': 0 is not in 1..",
        ),
        (
            &["--prefetch", "0"],
            2,
            "'--prefetch <PREFETCH>': 0 is not in 1..",
        ),
        (
            &["--otlp", "--trace-sample-ratio", "2"],
            2,
            "must be between 0 and 1",
        ),
        (
            &["--wip", "5"],
            1,
            "--wip (5) must be at least --prefetch (10)",
        ),
        // Past the bench's own checks: the node it starts refuses its
        // config, and the bench says why at once (its log, with the key).
        (
            &["--store-cache-mb", "0"],
            1,
            "the bench node exited (exit status: 78) before it was up",
        ),
    ] {
        let (got, err) = bench(args);
        assert_eq!(got, Some(code), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let (_, err) = bench(&["--store-cache-mb", "0"]);
    assert!(
        err.contains("node.store_cache_mb: must be greater than 0"),
        "{err}"
    );
}

#[tokio::test]
async fn a_signal_waiting_for_its_entitlement_is_parked_not_timed_out_nor_waited_for() {
    // Signals are sent again after 1 s undecided, an attempt counted (three
    // make poison); `patient` waits 4 s for its entitlement, `waiting` 300 s.
    let extra = format!(
        "[skus.patient]\npolicies = []\nentitlement_timeout_secs = 4\n{}",
        waiting_sku(300)
    );
    let mut node = Node::start_with(
        &test_config(&extra),
        &[("TAI_KANBAN__VISIBILITY_SECS", "1")],
    );
    let c = Client::new(&node, "acme", "acme-secret");
    for (sku, id) in [("patient", "p-1"), ("waiting", "w-1")] {
        let a = c
            .post(&signal("acme", sku, "job", id, json!({})))
            .await
            .unwrap();
        assert_eq!(a.status, 202, "{}", a.body);
    }
    let q = node
        .admin_until("/admin/queue", "both parked", |q| q["parked"] == 2)
        .await;
    assert_eq!(q["in_flight"], 2, "{q}");
    let metrics = node.metrics_text().await;
    assert!(
        metrics.lines().any(|l| l == "tai_queue_parked 2"),
        "{metrics}"
    );

    // Four visibility periods later `patient` gives up waiting: p-1 goes as
    // the degraded engine's non-critical signal, not as poison, and was
    // never sent again.
    let p1 = c.decided("p-1").await;
    assert_eq!(
        (p1["status"].as_str(), p1["reason"].as_str()),
        (Some("deadlettered"), Some("degraded")),
        "{p1}"
    );
    let log = node.log();
    assert!(!log.contains("in flight too long"), "{log}");
    let q = node
        .admin_until("/admin/queue", "p-1 settled", |q| q["in_flight"] == 1)
        .await;
    assert_eq!(q["parked"], 1, "{q}");

    // A graceful stop does not wait for w-1 (nothing could entitle its
    // engine while the queue hands out no more), and keeps it.
    node.signal(libc::SIGINT);
    assert!(node.wait_exit(Duration::from_secs(30)).success());
    let log = node.log();
    assert!(
        log.contains("signals waiting for an entitlement are delivered again at the next start"),
        "{log}"
    );
    assert!(
        !log.contains("signals still in flight at shutdown"),
        "{log}"
    );
    node.restart();
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("waiting", "ent-w").await;
    assert_eq!(c.decided("w-1").await["status"], "completed");
    let receipts = node.all_receipts().await;
    let decisions = receipts
        .iter()
        .filter(|r| r["signal_id"] == "w-1" && r["kind"] == "action_generated")
        .count();
    assert_eq!(decisions, 1);
}

#[tokio::test]
async fn an_engine_waiting_for_its_entitlement_does_not_hold_other_engines_back() {
    // A WIP of 10, the prefetch of one engine: `waiting` parks signals for
    // up to 300 s; before, a dozen would have taken the whole WIP, and the
    // entitlement queued behind them could not reach it.
    let extra = waiting_sku(300);
    let node = Node::start_with(
        &test_config(&extra),
        &[
            ("TAI_KANBAN__WIP_LIMIT", "10"),
            ("TAI_KANBAN__PREFETCH", "10"),
        ],
    );
    let c = Client::new(&node, "acme", "acme-secret");
    post_waiting(&c, 12).await;
    let q = node
        .admin_until("/admin/queue", "all twelve parked", |q| q["parked"] == 12)
        .await;
    assert_eq!(
        (q["in_flight"].as_u64(), q["depth"].as_u64()),
        (Some(12), Some(12)),
        "{q}"
    );
    // Another engine of the same tenant, and another tenant, are decided;
    // entitled at last, all twelve are decided, in order, once.
    others_go_on_then_the_waiting_are_decided(&node, &c, 12).await;
}

/// Sends `id` to acme's unentitled `waiting` SKU and waits until its
/// engine has parked it.
async fn park_one(node: &Node, c: &Client, id: &str) {
    let a = c
        .post(&signal("acme", "waiting", "job", id, json!({})))
        .await
        .unwrap();
    assert_eq!(a.status, 202, "{}", a.body);
    node.admin_until("/admin/queue", "the signal parked", |q| q["parked"] == 1)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_passivated_with_signals_in_their_mailbox_decide_them_without_a_crash() {
    // One live engine at most, and two tenants' signals interleaved by
    // concurrent clients: nearly every signal passivates the other engine,
    // often while signals still wait in its mailbox. Passivating drains it:
    // what it holds is decided, and nothing crashes (a crash counts a
    // delivery attempt: repeated, it turned a signal into poison).
    let node = Node::start_with(&test_config(""), &[("TAI_JIDOKA__MAX_ACTIVE_ENGINES", "1")]);
    let tenants = [("acme", "acme-secret"), ("globex", "globex-secret")];
    for (t, secret) in tenants {
        let c = Client::new(&node, t, secret);
        c.entitle("payments", "ent").await;
        c.decided("ent").await;
    }
    let mut clients = Vec::new();
    for w in 0..8 {
        let clients_of: Vec<Client> = tenants
            .iter()
            .map(|(t, secret)| Client::new(&node, t, secret))
            .collect();
        clients.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for i in 0..30 {
                let c = &clients_of[(w + i) % 2];
                let id = format!("mb-{w}-{i}");
                let body = signal(
                    &c.tenant,
                    "payments",
                    "payment",
                    &id,
                    json!({"amount": 1.0, "currency": "USD", "customer_id": format!("c-{w}-{i}")}),
                );
                let a = c.post(&body).await.unwrap();
                assert_eq!(a.status, 202, "{}", a.body);
                sent.push((c.tenant.clone(), id));
            }
            sent
        }));
    }
    let mut sent = Vec::new();
    for t in clients {
        sent.extend(t.await.unwrap());
    }
    for (t, id) in &sent {
        let secret = tenants.iter().find(|(n, _)| n == t).unwrap().1;
        let s = Client::new(&node, t, secret).decided(id).await;
        assert_eq!(s["status"], "completed", "{t}/{id}: {s}");
    }
    let log = node.log();
    assert!(!log.contains("exited abnormally"), "{log}");
    assert!(!log.contains("poison"), "{log}");
    let (_, v) = node.admin(Method::GET, "/admin/receipts/verify").await;
    assert_eq!(v["ok"], true, "{v}");
}

#[tokio::test]
async fn an_engine_passivated_while_signals_wait_in_it_comes_back_for_them() {
    // One live engine at most: starting a second passivates the first,
    // whose signal waits (parked) for an entitlement that never comes.
    let extra = waiting_sku(2);
    let node = Node::start_with(
        &test_config(&extra),
        &[("TAI_JIDOKA__MAX_ACTIVE_ENGINES", "1")],
    );
    let c = Client::new(&node, "acme", "acme-secret");
    park_one(&node, &c, "w-0").await;
    c.entitle("payments", "ent").await;
    assert_eq!(c.decided("ent").await["status"], "completed");
    // The waiting engine came back for w-0, and gave up on its entitlement.
    let w0 = c.decided("w-0").await;
    assert_eq!(
        (w0["status"].as_str(), w0["reason"].as_str()),
        (Some("deadlettered"), Some("degraded")),
        "{w0}"
    );
    node.admin_until("/admin/queue", "nothing in flight", |q| {
        q["in_flight"] == 0 && q["parked"] == 0
    })
    .await;
}

#[tokio::test]
async fn a_restarted_queue_learns_again_which_signals_are_parked() {
    // Sent again after 1 s undecided (three times make poison), unless parked.
    let extra = waiting_sku(300);
    let node = Node::start_with(
        &test_config(&extra),
        &[("TAI_KANBAN__VISIBILITY_SECS", "1")],
    );
    let c = Client::new(&node, "acme", "acme-secret");
    park_one(&node, &c, "w-1").await;
    // The queue restarts and sends w-1 again from the store; the engine,
    // which still holds it, parks it again rather than let it time out.
    let (status, _) = node
        .admin(Method::POST, "/admin/actors/kanban_queue/kill")
        .await;
    assert_eq!(status, 202);
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let tree = node.tree().await;
        if find(&tree, "kanban_queue")
            .is_some_and(|q| q["restarts"] == 1 && q["status"] == "running")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "kanban_queue restarted: {tree}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.admin_until("/admin/queue", "w-1 parked again", |q| {
        q["in_flight"] == 1 && q["parked"] == 1
    })
    .await;
    c.entitle("waiting", "ent-w").await;
    assert_eq!(c.decided("w-1").await["status"], "completed");
    let log = node.log();
    assert!(!log.contains("poison"), "{log}");
}

/// The `tai` CLI against `node` (its dev config, its ports).
fn tai_command(node: &Node, args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(tai_bin());
    c.args(args)
        .arg("--config")
        .arg(dev_config())
        .env("TAI_INGRESS__LISTEN", &node.ingress)
        .env("TAI_OPERATOR__LISTEN", &node.operator);
    c
}

/// Runs the `tai` CLI against `node` and returns its exit code, stdout
/// and stderr.
fn tai(node: &Node, args: &[&str]) -> (i32, String, String) {
    let out = tai_command(node, args).output().expect("run tai");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `tai status ID` until the signal is past `accepted`.
fn cli_decided(node: &Node, id: &str) -> Value {
    wait_for(&format!("{id} decided"), Duration::from_secs(15), || {
        let (code, out, err) = tai(node, &["status", id]);
        assert_eq!(code, 0, "{out}{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        (v["status"] != "accepted").then_some(v)
    })
}

/// One line of `tai tenants` for `tenant` and `sku`, checked to line up
/// with the header.
fn cli_engine_line(node: &Node, tenant: &str, sku: &str) -> Vec<String> {
    let (code, out, err) = tai(node, &["tenants"]);
    assert_eq!(code, 0, "{out}{err}");
    let mut lines = out.lines();
    let header = lines.next().unwrap();
    assert!(header.starts_with("TENANT"), "{out}");
    let line = lines
        .find(|l| l.split_whitespace().take(2).eq([tenant, sku]))
        .unwrap_or_else(|| panic!("no {tenant} {sku} in:\n{out}"));
    assert_eq!(line.len(), header.len(), "columns line up:\n{out}");
    line.split_whitespace().map(str::to_string).collect()
}

/// The README's walk-through, with the CLI: send, status, receipts,
/// tenants, halt and resume, against a node on the dev config.
#[test]
fn the_cli_sends_reads_halts_and_resumes_as_the_readme_shows() {
    let node = Node::start(&[]);
    let (code, out, err) = tai(
        &node,
        &[
            "send",
            "--sku",
            "payments",
            "--kind",
            "entitlement",
            "--payload",
            r#"{"active": true}"#,
            "--id",
            "ent-1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        json!({"signal_id": "ent-1", "status": "accepted"})
    );
    let pay = |id: &str, payload: &str| {
        tai(
            &node,
            &[
                "send",
                "--sku",
                "payments",
                "--kind",
                "payment",
                "--id",
                id,
                "--payload",
                payload,
            ],
        )
    };
    let good = r#"{"amount": 99.99, "customer_id": "cust_123", "currency": "USD", "merchant_id": "merc_456"}"#;
    let (code, out, err) = pay("pay-1", good);
    assert_eq!(
        (code, out.trim()),
        (0, r#"{"signal_id":"pay-1","status":"accepted"}"#),
        "{err}"
    );
    let s = cli_decided(&node, "pay-1");
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(s["receipts"].as_array().unwrap().len(), 2, "{s}");
    // The same id again: a duplicate, answered with its status.
    let (code, out, _) = pay("pay-1", good);
    let dup: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((code, &dup["duplicate"]), (0, &json!(true)), "{dup}");

    let (code, out, err) = tai(&node, &["receipts", "--verify"]);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&report["ok"], &report["count"]),
        (&json!(true), &json!(3)),
        "{report}"
    );
    let (code, all, _) = tai(&node, &["receipts"]);
    assert_eq!(code, 0);
    for kind in [
        "entitlement_activated",
        "action_generated",
        "action_successful",
    ] {
        assert!(all.contains(kind), "{kind} not in:\n{all}");
    }
    assert_eq!(all.lines().count(), 3, "{all}");
    let (code, out, _) = tai(&node, &["receipts", "--tenant", "nobody"]);
    assert_eq!((code, out.as_str()), (0, ""), "another tenant's receipts");
    let (code, out, _) = tai(&node, &["receipts", "--tenant", "demo"]);
    assert_eq!((code, out.as_str()), (0, all.as_str()), "the tenant's own");
    // Piped into a reader that has stopped (`| head -1`, `| grep -q`):
    // quietly done, as any Unix filter (this used to panic, exit 101).
    for args in [&["status", "pay-1"][..], &["receipts"], &["tenants"]] {
        let mut child = tai_command(&node, args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!((out.status.code(), err.as_ref()), (Some(0), ""), "{args:?}");
    }

    let line = cli_engine_line(&node, "demo", "payments");
    assert_eq!(line[2], "stable", "{line:?}");

    // Halted: a payment is dead-lettered; resumed, the next is decided.
    let (code, out, err) = tai(&node, &["halt", "demo", "payments", "--reason", "audit"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(cli_engine_line(&node, "demo", "payments")[2], "halted");
    // Which engines are halted, among others that are not.
    let (code, _, err) = tai(
        &node,
        &[
            "send",
            "--sku",
            "governance",
            "--kind",
            "entitlement",
            "--payload",
            r#"{"active": true}"#,
            "--id",
            "ent-g",
        ],
    );
    assert_eq!(code, 0, "{err}");
    cli_decided(&node, "ent-g");
    let engines = |state: &str| -> Vec<(String, String)> {
        let (code, out, err) = tai(&node, &["tenants", "--json", "--state", state]);
        assert_eq!(code, 0, "{out}{err}");
        let list: Value = serde_json::from_str(&out).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .map(|e| (e["tenant_id"].to_string(), e["sku_id"].to_string()))
            .collect()
    };
    let one = |t: &str, s: &str| vec![(format!("{t:?}"), format!("{s:?}"))];
    assert_eq!(engines("halted"), one("demo", "payments"));
    assert_eq!(engines("stable"), one("demo", "governance"));
    let (code, out, err) = tai(&node, &["tenants", "--state", "asleep"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("400 Bad Request: state must be one of boot, stable, action_pending, degraded, halted, quota_exhausted, not")
            && err.contains("asleep"),
        "{err}"
    );
    let (code, out, err) = pay("pay-h", good);
    assert_eq!(code, 0, "{out}{err}");
    let s = cli_decided(&node, "pay-h");
    assert_eq!(
        (&s["status"], &s["reason"]),
        (&json!("deadlettered"), &json!("halted")),
        "{s}"
    );
    let (code, out, err) = tai(&node, &["resume", "demo", "payments"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(cli_engine_line(&node, "demo", "payments")[2], "stable");
    let (code, _, err) = pay("pay-2", r#"{"amount": 9000, "currency": "XYZ"}"#);
    assert_eq!(code, 0, "{err}");
    let s = cli_decided(&node, "pay-2");
    assert_eq!(s["status"], "denied", "{s}");
    let reason = s["reason"].as_str().unwrap();
    assert!(
        reason.contains("amount 9000 over 5000") && reason.contains("currency XYZ"),
        "{reason}"
    );

    // Errors: exit 1, saying what.
    let (code, out, _) = tai(&node, &["status", "no-such-signal"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["error"]["code"],
        "not_found"
    );
    let (code, _, err) = tai(&node, &["halt", "demo", "no-such-sku"]);
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");
}

/// `tai store ARGS --data-dir data --config config`.
fn tai_store(
    config: &std::path::Path,
    data: &std::path::Path,
    args: &[&str],
) -> std::process::Output {
    std::process::Command::new(tai_bin())
        .arg("store")
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

/// Damages the signed head in the stopped node's `data`, then rebuilds it
/// with `tai store rebuild-head --json`: its report.
fn rebuild_damaged_head(config: &std::path::Path, data: &std::path::Path) -> Value {
    tai_store::check::overwrite_first(data, "m/head", b"\xff")
        .unwrap()
        .expect("a signed head");
    let out = tai_store(config, data, &["rebuild-head", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `tai serve` on `data`, which must refuse to start: its log.
fn refused_start(node: &Node, config: &std::path::Path, data: &std::path::Path) -> String {
    let log = node.dir.path().join("refused.log");
    let mut serve = std::process::Command::new(tai_bin())
        .current_dir(workspace_root())
        .args(["serve", "--config"])
        .arg(config)
        .env("TAI_NODE__DATA_DIR", data)
        .env("TAI_OPERATOR__LISTEN", "127.0.0.1:0")
        .env("TAI_INGRESS__LISTEN", "127.0.0.1:0")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = wait_for(
        "tai serve to refuse the store",
        Duration::from_secs(30),
        || serve.try_wait().unwrap(),
    );
    let refused = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{refused}");
    refused
}

/// A damaged signed head keeps the node from starting; `tai store check`
/// names it and the way out, `tai store rebuild-head` writes a new head
/// over the ledger once it verifies (and refuses a head that reads), and
/// the node starts with its decisions as they were and goes on.
#[tokio::test]
async fn a_damaged_signed_head_is_rebuilt_and_the_node_starts_again() {
    let mut node = Node::start_with(&test_config(""), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent-1").await;
    c.post(&pay("pay-1", "cust_123", 99.99)).await.unwrap();
    assert_eq!(c.decided("pay-1").await["status"], "completed");
    node.stop();
    let data = node.data_dir();
    let config = node.config_path().to_path_buf();
    tai_store::check::overwrite_first(&data, "m/head", b"{")
        .unwrap()
        .expect("a signed head");
    let refused = refused_start(&node, &config, &data);
    assert!(
        refused.contains("corrupt record at m/head")
            && refused.contains("`tai store rebuild-head` writes a new signed head"),
        "{refused}"
    );

    let out = tai_store(&config, &data, &["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("m/head (signed ledger head)")
            && text.contains("tai store rebuild-head --data-dir"),
        "{text}"
    );
    let out = tai_store(&config, &data, &["rebuild-head"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("3 receipts verify")
            && text.contains("m/head is now")
            && text.contains("kept under x/m/head"),
        "{text}"
    );
    // Damaged again: the JSON report (the first damaged copy stays kept).
    let rebuilt = rebuild_damaged_head(&config, &data);
    assert_eq!(rebuilt["head_seq"], 3, "{rebuilt}");
    assert_eq!(rebuilt["receipts"], 3, "{rebuilt}");
    assert_eq!(rebuilt["kept_as"], "x/m/head", "{rebuilt}");
    let out = tai_store(&config, &data, &["rebuild-head"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("m/head reads (seq 3)"),
        "{err}"
    );

    node.restart();
    let c = Client::new(&node, "acme", "acme-secret");
    let (_, verify) = node.admin(Method::GET, "/admin/receipts/verify").await;
    assert_eq!(
        (&verify["ok"], &verify["count"]),
        (&json!(true), &json!(3)),
        "{verify}"
    );
    assert_eq!(c.status("pay-1").await.body["status"], "completed");
    let again = c.post(&pay("pay-1", "cust_123", 99.99)).await.unwrap();
    assert_eq!(again.body["duplicate"], true, "{}", again.body);
    c.post(&pay("pay-2", "cust_123", 5.0)).await.unwrap();
    assert_eq!(c.decided("pay-2").await["status"], "completed");
    let (_, verify) = node.admin(Method::GET, "/admin/receipts/verify").await;
    assert_eq!(
        (&verify["ok"], &verify["count"]),
        (&json!(true), &json!(5)),
        "{verify}"
    );
}

/// A damaged record the node reads at its start (a queue block) keeps it
/// from starting, named; `tai store check` finds it and says what setting
/// it aside costs, `tai store set-aside` moves it out of the way (and
/// nothing that reads), and the node starts again with the rest as it was.
#[tokio::test]
async fn a_damaged_queue_block_is_named_set_aside_and_the_node_starts_again() {
    let mut node = Node::start_with(&test_config(&waiting_sku(3600)), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    // Parked (acme's `waiting` is not entitled), each in a block of its own.
    post_waiting(&c, 3).await;
    node.stop();
    let data = node.data_dir();
    let config = node.config_path().to_path_buf();
    let out = tai_store(&config, &data, &["check"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let key = tai_store::check::overwrite_first(&data, "q/", b"\x01\xff\xff")
        .unwrap()
        .expect("a queue block");
    // The node does not start, and says which record and what to do.
    let refused = refused_start(&node, &config, &data);
    assert!(
        refused.contains(&format!("corrupt record at {key}"))
            && refused.contains("`tai store check`"),
        "{refused}"
    );

    let out = tai_store(&config, &data, &["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("{key} (queue block)"))
            && text.contains("never decided")
            && text.contains(&format!("tai store set-aside {key} --data-dir")),
        "{text}"
    );
    let out = tai_store(&config, &data, &["check", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["damaged"][0]["key"], key.as_str(), "{report}");
    assert_eq!(report["damaged"].as_array().unwrap().len(), 1, "{report}");

    // A record that reads is never set aside.
    let out = tai_store(&config, &data, &["set-aside", "m/node_starts"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("reads correctly"),
        "{err}"
    );
    let out = tai_store(&config, &data, &["set-aside", &key]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("set aside the queue block at {key}")),
        "{text}"
    );

    // The node starts; w-0, in the block set aside, is unknown (and may be
    // sent again), w-1 and w-2 are decided once acme is entitled.
    node.restart();
    node.log_until("damaged records set aside").await;
    let c = Client::new(&node, "acme", "acme-secret");
    assert_eq!(c.status("w-0").await.status, 404);
    assert_eq!(c.status("w-1").await.body["status"], "accepted");
    c.entitle("waiting", "ent-w").await;
    for id in ["w-1", "w-2"] {
        assert_eq!(c.decided(id).await["status"], "completed", "{id}");
    }
    let again = c
        .post(&signal("acme", "waiting", "job", "w-0", json!({})))
        .await
        .unwrap();
    assert_eq!(
        (again.status, &again.body["duplicate"]),
        (202, &Value::Null),
        "{}",
        again.body
    );
    assert_eq!(c.decided("w-0").await["status"], "completed");
    node.stop();
    let out = tai_store(&config, &data, &["check", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert_eq!(
        report["set_aside"],
        json!([{"key": key, "bytes": 3}]),
        "{report}"
    );
}
