//! The supervision backbone end to end: real `tai serve` processes.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use tai_tests::*;

const LAYERS: [&str; 5] = [
    "ingress_sup",
    "kanban_sup",
    "processor_sup",
    "kaizen_sup",
    "andon_sup",
];

fn names(node: &Value) -> Vec<String> {
    children(node)
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn the_tree_has_the_contract_shape_and_admin_needs_the_token() {
    let node = Node::start(&[]);
    let tree = node.tree().await;
    assert_eq!(tree["name"], "tai_sup");
    assert_eq!(tree["kind"], "supervisor");
    assert_eq!(tree["strategy"], "rest_for_one");
    assert_eq!(tree["intensity"], 5);
    assert_eq!(tree["period_secs"], 60.0);
    assert_eq!(names(&tree), LAYERS);
    for layer in children(&tree) {
        assert_eq!(layer["kind"], "supervisor");
        assert_eq!(layer["status"], "running");
        assert_eq!(layer["restarts"], 0);
        assert!(layer["id"].as_str().is_some_and(|s| !s.is_empty()));
    }
    let processor = find(&tree, "processor_sup").unwrap();
    let engine_sup = find(processor, "engine_sup").expect("engine_sup inside processor_sup");
    assert_eq!(engine_sup["strategy"], "simple_one_for_one");

    let client = reqwest::Client::new();
    let health = client.get(node.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = client.get(node.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    for auth in [None, Some("Bearer wrong-token"), Some("dev-admin-token")] {
        let mut req = client.get(node.url("/admin/tree"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{auth:?}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    let (status, body) = node
        .admin(Method::POST, "/admin/actors/no_such_actor/kill")
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    // A known path with the wrong method is a 405 naming the right one; a
    // path the API does not have is a 404.
    for (method, path, allow) in [
        (Method::DELETE, "/admin/tree", "GET"),
        (Method::GET, "/admin/tenants/acme/payments/halt", "POST"),
        (Method::GET, "/admin/deadletter/s-1/replay", "POST"),
        (Method::POST, "/metrics", "GET"),
    ] {
        let resp = client
            .request(method.clone(), node.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405, "{method} {path}");
        assert_eq!(resp.headers()["allow"], allow, "{method} {path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
        assert_eq!(
            body["error"]["message"],
            format!("{method} is not supported on {path} (use {allow})")
        );
    }
    // HEAD is a GET without its body (what some health checkers send).
    for path in ["/health", "/ready", "/metrics", "/admin/tree"] {
        let resp = client
            .head(node.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "HEAD {path}");
        assert!(resp.bytes().await.unwrap().is_empty(), "HEAD {path}");
    }
    for path in ["/admin/nope", "/admin/tenants/a/b/c/d", "/nope"] {
        let (status, body) = node.admin(Method::GET, path).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{path}: {body}"
        );
    }
    // A query parameter the endpoint does not read is refused, naming it:
    // a misspelt filter must not answer with everything, nor a halt's
    // reason given in the query be dropped for the default one.
    for (method, path, message) in [
        (
            Method::GET,
            "/admin/receipts?tenant_id=acme&limit=5",
            r#"unknown query parameter "tenant_id": GET /admin/receipts takes only tenant, after_seq, limit"#,
        ),
        (
            Method::GET,
            "/admin/tenants?status=halted",
            r#"unknown query parameter "status": GET /admin/tenants takes only state, limit, after"#,
        ),
        (
            Method::GET,
            "/admin/alerts?severity=critical",
            r#"unknown query parameter "severity": GET /admin/alerts takes no query parameters"#,
        ),
        (
            Method::POST,
            "/admin/tenants/acme/payments/halt?reason=fraud",
            r#"unknown query parameter "reason": POST /admin/tenants/acme/payments/halt takes no query parameters"#,
        ),
        (
            Method::GET,
            "/admin/deadletter?zz=1&limit=1&aa=2",
            r#"unknown query parameter "aa": GET /admin/deadletter takes only tenant, limit, after"#,
        ),
    ] {
        let (status, body) = node.admin(method.clone(), path).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_request")),
            "{method} {path}: {body}"
        );
        assert_eq!(body["error"]["message"], message, "{method} {path}");
    }
    // A halt would have started acme's engine, halted.
    let (status, engine) = node
        .admin(Method::GET, "/admin/tenants/acme/payments")
        .await;
    assert_eq!(status, 404, "the refused halt did something: {engine}");
    // The parameters each reads, and the probes' and scrape's anything.
    for path in [
        "/admin/receipts?tenant=acme&after_seq=0&limit=5",
        "/admin/tenants?state=stable&limit=5&after=a/b",
        "/admin/deadletter?tenant=acme&limit=5&after=a/b",
        "/health?probe=1",
        "/ready?probe=1",
        "/metrics?format=text",
    ] {
        let (status, body) = node.admin(Method::GET, path).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
}

#[tokio::test]
async fn killing_kanban_restarts_the_layers_after_it_and_leaves_ingress_alone() {
    let node = Node::start(&[]);
    let before = node.tree().await;
    let (status, _) = node
        .admin(Method::POST, "/admin/actors/kanban_sup/kill")
        .await;
    assert_eq!(status, 202);
    let mut after = Value::Null;
    for _ in 0..250 {
        after = node.tree().await;
        let done = LAYERS[1..].iter().all(|l| {
            let layer = find(&after, l).unwrap();
            layer["restarts"] == 1 && layer["status"] == "running"
        });
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for layer in LAYERS {
        let (old, new) = (find(&before, layer).unwrap(), find(&after, layer).unwrap());
        assert_eq!(new["status"], "running", "{layer}");
        if layer == "ingress_sup" {
            assert_eq!(new["id"], old["id"], "ingress untouched");
            assert_eq!(new["restarts"], 0);
        } else {
            assert_ne!(new["id"], old["id"], "{layer} is a new actor");
            assert_eq!(new["restarts"], 1, "{layer}");
        }
    }
    assert_eq!(
        find(&after, "kanban_sup").unwrap()["last_failure"],
        "killed"
    );
    assert!(
        find(&after, "engine_sup").is_some(),
        "engine_sup restarted inside processor_sup"
    );
    assert_eq!(names(&after), LAYERS, "start order kept");
}

/// A killed `ingress_http` leaves its listening socket to the next
/// incarnation (as a ranch listener outlives its acceptors). It used to bind
/// the port again at once, before the killed server had let go of it: every
/// restart failed with `Address already in use` within a millisecond, and
/// `ingress_sup` gave up and took every layer after it down with it. Clients
/// that connect meanwhile wait in the socket's backlog: none is refused.
#[tokio::test]
async fn a_killed_ingress_is_restarted_on_its_socket_and_no_client_is_refused() {
    let node = Node::start_with(&test_config(""), &[]);
    let c = Client::new(&node, "acme", "acme-secret");
    c.entitle("payments", "ent-1").await;
    // A client that opens a connection for every request all along.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (stop, url) = (stop.clone(), format!("http://{}/health", node.ingress));
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap();
            let (mut answered, mut refused) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match http.get(&url).send().await {
                    Ok(_) => answered += 1,
                    Err(e) if e.is_connect() => refused.push(e.to_string()),
                    // Taken by a server as it was killed: not a refusal.
                    Err(_) => {}
                }
            }
            (answered, refused)
        })
    };
    for i in 1..=4u64 {
        let (status, body) = node
            .admin(Method::POST, "/admin/actors/ingress_http/kill")
            .await;
        assert_eq!(status, 202, "kill {i}: {body}");
        let tree = node
            .admin_until("/admin/tree", "ingress_http restarted", |tree| {
                find(tree, "ingress_http")
                    .is_some_and(|w| w["restarts"] == i && w["status"] == "running")
            })
            .await;
        let sup = find(&tree, "ingress_sup").unwrap();
        assert_eq!(sup["restarts"], 0, "kill {i}: ingress_sup gave up: {tree}");
        // A client of its own, on a new connection: a kept-alive one from
        // before the kill is closed by the killed server as it winds down,
        // which may race a request sent on it (as any keep-alive close).
        let c = Client::new(&node, "acme", "acme-secret");
        let a = c
            .post(&signal(
                "acme",
                "payments",
                "payment",
                &format!("pay-{i}"),
                json!({"amount": 10, "currency": "USD", "customer_id": "c1"}),
            ))
            .await
            .unwrap();
        assert_eq!(a.status, 202, "kill {i}: {}", a.body);
        c.decided(&format!("pay-{i}")).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (answered, refused) = prober.await.unwrap();
    assert!(answered > 0, "the prober got no answer at all");
    assert!(
        refused.is_empty(),
        "{} connections refused: {refused:?}",
        refused.len()
    );
    assert!(
        !node.log().contains("Address already in use"),
        "{}",
        node.log_tail(40)
    );
}

#[tokio::test]
async fn six_kills_within_a_minute_end_the_node_with_a_failure() {
    let mut node = Node::start(&[]);
    for i in 1..=6u64 {
        let (status, body) = node
            .admin(Method::POST, "/admin/actors/andon_sup/kill")
            .await;
        assert_eq!(status, 202, "kill {i}: {body}");
        if i < 6 {
            for _ in 0..250 {
                let tree = node.tree().await;
                if find(&tree, "andon_sup")
                    .is_some_and(|a| a["restarts"] == i && a["status"] == "running")
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let status = node.wait_exit(Duration::from_secs(20));
    assert!(!status.success(), "node must fail, got {status}");
    let log = node.log();
    assert!(
        log.contains("reached_max_restart_intensity (5 in 60s)"),
        "{log}"
    );
}

/// A data dir the node makes is its own (0700, whatever the umask): the
/// store holds tenants' payloads. One the operator made keeps its mode.
#[tokio::test]
async fn a_data_dir_the_node_makes_is_its_own() {
    use std::os::unix::fs::PermissionsExt;
    let node = Node::start(&[]);
    node.tree().await;
    let mode = std::fs::metadata(node.data_dir())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o750)).unwrap();
    let node = Node::start_with_in(dir, &test_config(""), &[]);
    node.tree().await;
    let mode = std::fs::metadata(node.data_dir())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o750, "{mode:o}");
}

#[tokio::test]
async fn sigterm_stops_the_tree_in_order_and_exits_zero() {
    // SIGHUP too (the terminal a node was started from closed): its default
    // action ended the process at once, with no ordered stop.
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGHUP, "SIGHUP")] {
        let mut node = Node::start(&[("TAI_NODE__SHUTDOWN_GRACE_SECS", "5")]);
        node.tree().await;
        node.signal(sig);
        let status = node.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(0), "{name}: {status}: {}", node.log());
        let log = node.log();
        assert!(
            log.contains(&format!("graceful shutdown requested reason=\"{name}\"")),
            "{log}"
        );
        assert!(log.contains("supervision tree stopped in order"), "{log}");
    }
}

#[test]
fn a_sigterm_while_the_node_starts_still_stops_it_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("node.log");
    let mut child = std::process::Command::new(tai_bin())
        .current_dir(workspace_root())
        .args(["serve", "--config"])
        .arg(dev_config())
        .env("TAI_NODE__DATA_DIR", dir.path().join("data"))
        .env("TAI_OPERATOR__LISTEN", "127.0.0.1:0")
        .env("TAI_INGRESS__LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // Its tree is starting (the first layer is up), the rest is not.
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while !log().contains("ingress listening") {
        assert!(
            std::time::Instant::now() < end,
            "the node did not start: {}",
            log()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    send_signal(&child, libc::SIGTERM);
    let end = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < end, "the node did not stop");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(status.code(), Some(0), "{status}: {}", log());
    assert!(log().contains("SIGTERM"), "{}", log());
    assert!(
        log().contains("supervision tree stopped in order"),
        "{}",
        log()
    );
}

#[tokio::test]
async fn admin_shutdown_is_graceful() {
    let mut node = Node::start(&[]);
    let (status, body) = node.admin(Method::POST, "/admin/shutdown").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (202, Some("shutting_down"))
    );
    assert_eq!(node.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

/// Runs `tai serve` on the dev config, `data_dir` and `ingress`, expects it
/// to exit 1 at once, and returns what it wrote to stderr.
fn serve_refused(data_dir: &std::path::Path, ingress: &str) -> String {
    let out = std::process::Command::new(tai_bin())
        .args(["serve", "--config"])
        .arg(dev_config())
        .env("TAI_NODE__DATA_DIR", data_dir)
        .env("TAI_OPERATOR__LISTEN", "127.0.0.1:0")
        .env("TAI_INGRESS__LISTEN", ingress)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    err
}

#[tokio::test]
async fn a_second_node_on_the_same_data_dir_is_refused_and_the_first_runs_on() {
    let node = Node::start(&[]);
    let endpoints = std::fs::read(node.data_dir().join("endpoints.json")).unwrap();
    let err = serve_refused(&node.data_dir(), "127.0.0.1:0");
    assert!(
        err.contains(&format!(
            "the data directory {} is in use by another process (is another tai node running on it?)",
            node.data_dir().display()
        )),
        "{err}"
    );
    // The refused start touched nothing of the running node's.
    assert_eq!(
        std::fs::read(node.data_dir().join("endpoints.json")).unwrap(),
        endpoints
    );
    let tree = node.tree().await;
    assert_eq!(tree["status"], "running", "{tree}");
}

#[test]
fn a_taken_port_exits_1_naming_the_key_the_address_and_the_cause() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = serve_refused(&dir.path().join("data"), &addr.to_string());
    assert!(
        err.contains(&format!(
            "tai_sup failed to start: shutdown: child ingress_sup failed_to_start_child: \
             shutdown: child ingress_http failed_to_start_child: \
             cannot listen on ingress.listen {addr}: "
        )),
        "{err}"
    );
    // Nothing panicked: ractor's wording of a failed start is not passed on.
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test]
async fn fault_injection_can_be_turned_off() {
    let node = Node::start(&[("TAI_OPERATOR__FAULT_INJECTION", "false")]);
    let (status, body) = node
        .admin(Method::POST, "/admin/actors/kanban_sup/kill")
        .await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "forbidden");
    let tree = node.tree().await;
    assert_eq!(find(&tree, "kanban_sup").unwrap()["restarts"], 0);
}

#[test]
fn a_bad_config_exits_78_naming_every_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[node]
mode = "staging"
[ingress]
listen = "nowhere"
[kanban]
prefetch = "ten"
colour = "red"
[[tenants]]
id = "demo"
secrets = ["s"]
tier = "platinum"
"#,
    )
    .unwrap();
    let out = std::process::Command::new(tai_bin())
        .args(["serve", "--config"])
        .arg(&path)
        .env("TAI_OPERATOR__LISTEN", "somewhere")
        .env("TAI_TENANTS__0__SECRETS", "none")
        .env("TAI_KANBAN_WIP_LIMIT", "100")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "node.mode",
        "ingress.listen",
        "kanban.prefetch",
        "kanban.colour",
        "tenants[0].tier",
        "operator.listen",
        "(from TAI_OPERATOR__LISTEN)",
        "tenants[0].secrets: invalid type: string \"none\", expected a sequence (from TAI_TENANTS__0__SECRETS)",
        "TAI_KANBAN_WIP_LIMIT: not an override",
    ] {
        assert!(err.contains(key), "{key} not named in:\n{err}");
    }
}

/// A policy's parameter out of its range stops the node at start (exit
/// 78), named in full, before the data dir is made: an overnight window
/// is a window, a window from an hour to itself is not.
#[test]
fn a_policy_parameter_out_of_range_exits_78_naming_it_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let gov = |start: u32, end: u32| {
        test_config(&format!(
            "\n[skus.gov]\npolicies = [\"change_management\"]\n[skus.gov.params.change_management]\nwindow_start = {start}\nwindow_end = {end}\n"
        ))
    };
    for (text, expected) in [
        (
            gov(25, 6),
            "skus.gov.params.change_management.window_start must be a number from 0 to 24",
        ),
        (
            gov(9, 9),
            "skus.gov.params.change_management.window_end must differ from window_start (9)",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(tai_bin())
            .args(["serve", "--config"])
            .arg(&path)
            .env("TAI_NODE__DATA_DIR", dir.path().join("data"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{err}");
        assert!(err.contains(expected), "{expected} not in:\n{err}");
        assert!(!dir.path().join("data").exists(), "a data dir was made");
    }
}

#[test]
fn tai_tree_prints_the_live_tree() {
    let node = Node::start(&[]);
    let out = std::process::Command::new(tai_bin())
        .args(["tree", "--config"])
        .arg(dev_config())
        .env("TAI_OPERATOR__LISTEN", &node.operator)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("tai_sup [supervisor] running restarts=0 rest_for_one 5/60s"),
        "{text}"
    );
    let expected_prefixes = [
        "├─ ingress_sup [supervisor] running",
        "│  └─ ingress_http [worker] running restarts=0",
        "├─ kanban_sup [supervisor] running",
        "│  └─ kanban_queue [worker] running restarts=0",
        "├─ processor_sup [supervisor] running",
        "│  ├─ engine_sup [supervisor] running restarts=0 simple_one_for_one",
        "│  └─ engine_router [worker] running restarts=0",
        "├─ kaizen_sup [supervisor] running",
        "│  └─ kaizen_health [worker] running restarts=0",
        "└─ andon_sup [supervisor] running",
        "   ├─ andon_ledger [worker] running restarts=0",
        "   └─ andon_alerts [worker] running restarts=0",
    ];
    assert_eq!(lines.len(), 1 + expected_prefixes.len(), "{text}");
    for (line, want) in lines[1..].iter().zip(expected_prefixes) {
        assert!(
            line.starts_with(want),
            "{want:?} expected, got {line:?} in\n{text}"
        );
    }
}

/// Both listeners close a connection that has not sent its request headers
/// within `node.header_read_timeout_secs`: one that never sends a byte, one
/// that stops half-way through its headers, and a kept-alive one left idle
/// after its request (they held the node's file descriptors for ever).
#[tokio::test]
async fn connections_that_send_no_headers_in_time_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = Node::start_with(
        &test_config(""),
        &[("TAI_NODE__HEADER_READ_TIMEOUT_SECS", "1")],
    );
    // Whether the node closes the connection (EOF) within 10 s.
    let closed = async |stream: &mut tokio::net::TcpStream| -> bool {
        let mut buf = Vec::new();
        match tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Err(_) => false,
        }
    };
    for addr in [&node.ingress, &node.operator] {
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
        partial
            .write_all(b"POST /v1/signals HTTP/1.1\r\nHost: tai\r\nX-Tai-Tenant: acme\r\n")
            .await
            .unwrap();
        let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"GET /health HTTP/1.1\r\nHost: tai\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        kept.read_exact(&mut head).await.unwrap();
        assert!(head.starts_with(b"HTTP/1.1 "), "{addr}: {head:?}");
        assert!(
            closed(&mut silent).await,
            "{addr}: a silent connection stayed open"
        );
        assert!(
            closed(&mut partial).await,
            "{addr}: half its headers, and open"
        );
        assert!(
            closed(&mut kept).await,
            "{addr}: idle after its request, and open"
        );
    }
    // The node serves on.
    let (status, _) = node.admin(Method::GET, "/admin/tree").await;
    assert_eq!(status, 200);
}

/// Both listeners give up a request body that has not all arrived
/// `node.body_read_timeout_secs` after its headers (`408`, and the
/// connection closed: before, a client that stopped half-way through its
/// body held its connection for ever), and refuse one whose Content-Length
/// is over the limit at once (`413`, before a byte of it is sent: before,
/// the node waited for the body, to count it).
#[tokio::test]
async fn a_body_that_stalls_is_given_up_and_one_declared_too_large_refused_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = Node::start_with(
        &test_config(""),
        &[("TAI_NODE__BODY_READ_TIMEOUT_SECS", "1")],
    );
    // The answer and then EOF within 10 s, or what came before the wait ran out.
    let answer = async |stream: &mut tokio::net::TcpStream| -> String {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf));
        let ended = matches!(read.await, Ok(Ok(_)));
        let text = String::from_utf8_lossy(&buf).into_owned();
        if ended {
            text
        } else {
            format!("(still open) {text}")
        }
    };
    for (addr, path) in [
        (&node.ingress, "/v1/signals"),
        (&node.operator, "/admin/breakers/x/reset"),
    ] {
        let head = |length: u64| {
            format!(
                "POST {path} HTTP/1.1\r\nHost: tai\r\nContent-Type: application/json\r\n\
                 Content-Length: {length}\r\nX-Tai-Tenant: acme\r\nX-Tai-Timestamp: 1\r\n\
                 X-Tai-Signature: v1=00\r\n\r\n"
            )
        };
        let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
        stalled
            .write_all(format!("{}{{\"", head(100)).as_bytes())
            .await
            .unwrap();
        let text = answer(&mut stalled).await;
        assert!(text.starts_with("HTTP/1.1 408 "), "{addr}: {text}");
        assert!(
            text.contains(r#"{"error":{"code":"request_timeout","message":"request body not received within 1 s of its headers"}}"#),
            "{addr}: {text}"
        );
        let mut huge = tokio::net::TcpStream::connect(addr).await.unwrap();
        huge.write_all(head(100_000_000).as_bytes()).await.unwrap();
        let text = answer(&mut huge).await;
        assert!(text.starts_with("HTTP/1.1 413 "), "{addr}: {text}");
        assert!(
            text.contains(r#""code":"payload_too_large""#),
            "{addr}: {text}"
        );
    }
    // Counted by their outcome; the node serves on.
    let metrics = node.metrics_text().await;
    for outcome in ["timed_out", "too_large"] {
        let line = format!("tai_signals_received_total{{outcome=\"{outcome}\"}} 1");
        assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    }
    let (status, _) = node.admin(Method::GET, "/admin/tree").await;
    assert_eq!(status, 200);
}

/// Connections the node's `listener` holds open, from `/metrics`.
async fn open_connections(node: &Node, listener: &str) -> Option<u64> {
    let line = format!("tai_http_connections{{listener=\"{listener}\"}} ");
    node.metrics_text()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(line.as_str()).map(|v| v.parse().unwrap()))
}

/// Each listener holds at most `node.max_connections` connections: the
/// next waits (in the kernel's backlog) until one closes, rather than take
/// file descriptors the store needs; and connections flooding the ingress
/// port leave the operator port answering.
#[tokio::test]
async fn a_listener_holds_at_most_max_connections_and_the_next_waits_for_one_to_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut node = Node::start_with(&test_config(""), &[("TAI_NODE__MAX_CONNECTIONS", "4")]);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(&node.ingress).await.unwrap());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while open_connections(&node, "ingress").await != Some(4) {
        assert!(
            std::time::Instant::now() < deadline,
            "the ingress never counted its 4 connections"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A fifth is connected by the kernel, and not served.
    let mut fifth = tokio::net::TcpStream::connect(&node.ingress).await.unwrap();
    fifth
        .write_all(b"GET /health HTTP/1.1\r\nHost: tai\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    let early = tokio::time::timeout(Duration::from_secs(1), fifth.read_exact(&mut head)).await;
    assert!(early.is_err(), "a fifth connection was served: {head:?}");
    // The operator port is bounded apart: it answers.
    assert_eq!(open_connections(&node, "ingress").await, Some(4));
    let log = node.log();
    assert!(
        log.contains("connections at node.max_connections: new ones wait until one closes"),
        "{log}"
    );
    // One closes: the fifth is taken and served.
    drop(held.pop());
    tokio::time::timeout(Duration::from_secs(10), fifth.read_exact(&mut head))
        .await
        .expect("the fifth connection served once one closed")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 200", "{head:?}");
    // At the bound again (three held, the fifth kept alive, one more
    // waiting in the backlog), a SIGTERM still stops the node cleanly.
    let _waiting = tokio::net::TcpStream::connect(&node.ingress).await.unwrap();
    node.stop();
    drop((held, fifth));
}

/// `tai serve` raises its soft open-file limit to the hard one (a login
/// shell's soft limit is often 1,024), so the store's files and the
/// listeners' connections have the room the system allows.
#[tokio::test]
#[allow(unsafe_code)]
async fn the_node_raises_its_open_file_limit_to_the_hard_one() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write the struct given. The
    // node inherits the lowered soft limit; this process gets its own back.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    let low = libc::rlimit {
        rlim_cur: 512,
        rlim_max: limit.rlim_max,
    };
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
    let node = Node::start(&[]);
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", node.child.id())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files in /proc/PID/limits")
        .split_whitespace()
        .collect();
    let hard = limit.rlim_max.min(1 << 20).to_string();
    assert_eq!(open_files[3], hard, "{limits}");
    let log = node.log();
    assert!(log.contains("open-file limit raised"), "{log}");
    assert!(log.contains("from=512"), "{log}");
}

/// `THP_enabled` of the node's process, as the kernel shows it.
fn thp_enabled(node: &Node) -> String {
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.child.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim().to_string())
        .expect("THP_enabled in /proc/PID/status")
}

/// Transparent huge pages are off for the node's process unless
/// `node.transparent_huge_pages` turns them on (BENCHMARKS.md, session 35:
/// with them, an idle node's memory crept back up towards its peak).
#[tokio::test]
async fn transparent_huge_pages_are_off_unless_the_config_turns_them_on() {
    let off = Node::start(&[]);
    assert_eq!(thp_enabled(&off), "0");
    let on = Node::start(&[("TAI_NODE__TRANSPARENT_HUGE_PAGES", "true")]);
    assert_eq!(thp_enabled(&on), "1");
}
