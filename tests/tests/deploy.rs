//! The deploy kit (`deploy/`): Prometheus config and alert rules through
//! `promtool`, dashboards and rules naming metrics a live node exports, the
//! systemd unit through `systemd-analyze verify` and a real `sd_notify`
//! exchange, the container files pointing at what exists (every path the
//! workspace's manifest names copied into the build stage), and the
//! image's command run as the container runs it, answering its healthcheck.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tai_tests::*;

fn deploy(path: &str) -> std::path::PathBuf {
    workspace_root().join("deploy").join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("deploy/{path}: {e}"))
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/test.sh installs the test tools)"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool() {
    let (ok, out, err) = run(Command::new("promtool")
        .arg("check")
        .arg("config")
        .arg(deploy("prometheus/prometheus.yml")));
    assert!(ok, "{out}{err}");
    assert!(out.contains("SUCCESS: 1 rule files found"), "{out}");
    // The rules fire on the series they are for (alerts.test.yml).
    let (ok, out, err) = run(Command::new("promtool")
        .current_dir(deploy("prometheus"))
        .args(["test", "rules", "alerts.test.yml"]));
    assert!(ok, "{out}{err}");
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Metric names in PromQL text: identifiers starting `tai_` or `process_`.
fn metric_names(promql: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = promql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let rest = &promql[i..];
        if starts_word && (rest.starts_with("tai_") || rest.starts_with("process_")) {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            names.insert(rest[..len].to_string());
            i += len;
        } else {
            i += 1;
        }
    }
    names
}

fn exprs_in_dashboard(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(e)) = m.get("expr") {
                out.push(e.clone());
            }
            m.values().for_each(|v| exprs_in_dashboard(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| exprs_in_dashboard(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn dashboards_and_alert_rules_name_metrics_the_node_exports() {
    let mut exprs: Vec<String> = read("prometheus/alerts.yml")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:").map(str::to_string))
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    for name in ["andon", "kaizen"] {
        let d: Value = serde_json::from_str(&read(&format!("grafana/dashboards/{name}.json")))
            .unwrap_or_else(|e| panic!("{name}.json: {e}"));
        assert!(d["uid"].as_str().unwrap().starts_with("tai-"), "{name}");
        let before = exprs.len();
        exprs_in_dashboard(&d, &mut exprs);
        assert!(exprs.len() > before + 5, "{name}.json has its panels");
    }
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();

    // A node with a webhook executor (a breaker series), a signal decided,
    // one dead-lettered and an alert sent, so the lazily made series exist.
    let node = Node::start_with(
        &test_config(
            "[executors.gw]\nkind = \"webhook\"\nurl = \"http://127.0.0.1:9/hook\"\n\
             [skus.hooked]\npolicies = []\nexecutor = \"gw\"\n",
        ),
        &[],
    );
    let c = Client::new(&node, "acme", "acme-secret");
    let ent = entitlement("acme", "payments", "e1");
    assert_eq!(c.post(&ent).await.unwrap().status, 202);
    c.decided("e1").await;
    let (status, _) = node
        .admin(Method::POST, "/admin/tenants/acme/payments/halt")
        .await;
    assert_eq!(status, 200);
    let pay = signal(
        "acme",
        "payments",
        "payment",
        "p1",
        json!({"amount": 5.0, "currency": "USD", "customer_id": "c1"}),
    );
    assert_eq!(c.post(&pay).await.unwrap().status, 202);
    assert_eq!(c.decided("p1").await["status"], "deadlettered");
    // A trial tenant past its 5/s: a 429 (tai_rate_limited_total).
    let tiny = Client::new(&node, "tiny", "tiny-secret");
    let mut limited = false;
    for i in 0..20 {
        let s = signal(
            "tiny",
            "payments",
            "entitlement",
            &format!("t{i}"),
            json!({"active": true}),
        );
        if tiny.post(&s).await.unwrap().status == 429 {
            limited = true;
            break;
        }
    }
    assert!(limited, "a trial tenant was never rate limited");
    // A restart (tai_actor_restarts_total), by fault injection.
    let (status, body) = node
        .admin(Method::POST, "/admin/actors/kanban_queue/kill")
        .await;
    assert_eq!(status, 202, "{body}");
    let end = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = node.metrics_text().await;
        if [
            "tai_alerts_total",
            "tai_deadletter_total",
            "tai_actor_restarts_total",
        ]
        .iter()
        .all(|m| text.contains(m))
        {
            break text;
        }
        assert!(Instant::now() < end, "no alert counted: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    for name in &used {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            exported.contains(family),
            "{name} (in deploy/) is not exported by the node; it exports {exported:?}"
        );
    }
    for contract in ["tai_breaker_state", "tai_engine_state", "tai_queue_depth"] {
        assert!(used.contains(contract), "deploy/ watches {contract}");
    }
}

#[test]
fn the_systemd_unit_verifies_and_is_type_notify() {
    let unit = read("systemd/tai-node.service");
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
        "WatchdogSec=",
        "UMask=0077",
        "EnvironmentFile=-/etc/tai/node.env",
    ] {
        assert!(unit.contains(line), "{line} in the unit");
    }
    // Verified against the binary this build made (the unit names its installed path).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tai-node.service");
    let bin = tai_bin();
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/tai", bin.to_str().unwrap()),
    )
    .unwrap();
    let (ok, out, err) = run(Command::new("systemd-analyze").arg("verify").arg(&path));
    assert!(
        ok && err.trim().is_empty(),
        "systemd-analyze verify: {out}{err}"
    );
}

/// Reads notifications into `seen` until one carries `want`.
async fn expect(sock: &tokio::net::UnixDatagram, seen: &mut String, want: &str) {
    let end = Instant::now() + Duration::from_secs(30);
    let mut buf = vec![0u8; 4096];
    while !seen.contains(want) {
        let left = end.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, sock.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {want} from the node; got {seen:?}"))
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        seen.push('\n');
    }
}

#[tokio::test]
async fn the_node_tells_systemd_it_is_ready_alive_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&sock_path).unwrap();
    let sock_env = sock_path.to_str().unwrap().to_string();
    let mut node = Node::start_with(
        &test_config(""),
        &[("NOTIFY_SOCKET", &sock_env), ("WATCHDOG_USEC", "200000")],
    );
    let mut seen = String::new();
    expect(&sock, &mut seen, "READY=1").await;
    expect(&sock, &mut seen, "WATCHDOG=1").await;
    let (status, _) = node.admin(Method::POST, "/admin/shutdown").await;
    assert_eq!(status, 202);
    expect(&sock, &mut seen, "STOPPING=1").await;
    assert!(node.wait_exit(Duration::from_secs(30)).success());
    assert!(seen.contains("STATUS=running"), "{seen}");
}

/// The paths a workspace manifest names: its members (a glob's
/// directory) and every path dependency and patch.
fn manifest_paths(manifest: &str) -> Vec<String> {
    let doc: toml::Table = manifest.parse().expect("Cargo.toml parses");
    let members = doc["workspace"]["members"]
        .as_array()
        .expect("workspace members")
        .iter()
        .filter_map(|m| m.as_str())
        .map(|m| m.trim_end_matches("/*").to_string());
    let dependencies = doc["workspace"]
        .get("dependencies")
        .and_then(|d| d.as_table())
        .into_iter()
        .flat_map(|t| t.values());
    let patches = doc
        .get("patch")
        .and_then(|p| p.as_table())
        .into_iter()
        .flat_map(|t| t.values())
        .filter_map(|registry| registry.as_table())
        .flat_map(|t| t.values());
    let paths = dependencies
        .chain(patches)
        .filter_map(|d| d.get("path").and_then(|p| p.as_str()))
        .map(str::to_string);
    members.chain(paths).collect()
}

#[test]
fn the_manifest_paths_are_all_read() {
    let paths = manifest_paths(
        r#"
[workspace]
members = ["crates/*", "tests"]
[workspace.dependencies]
a = { path = "crates/a" }
serde = "1"
[patch.crates-io]
sled = { path = "vendor/sled" }
"#,
    );
    assert_eq!(paths, ["crates", "tests", "crates/a", "vendor/sled"]);
}

#[test]
fn the_container_files_point_at_what_exists() {
    let dockerfile = read("Dockerfile");
    let stages = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert_eq!(stages, 2, "a multi-stage build");
    assert!(dockerfile.contains("cargo build --release --locked --bin tai"));
    let copied: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| l.split_whitespace().rev().skip(1))
        .collect();
    for src in &copied {
        assert!(workspace_root().join(src).exists(), "COPY {src}");
    }
    // The build stage needs every path the workspace's manifest names:
    // its members, its path dependencies and the patched sled, or cargo
    // cannot load the workspace there.
    let root = workspace_root();
    for named in manifest_paths(&std::fs::read_to_string(root.join("Cargo.toml")).unwrap()) {
        assert!(
            copied
                .iter()
                .any(|c| named == *c || named.starts_with(&format!("{c}/"))),
            "Cargo.toml names {named}, which deploy/Dockerfile's build stage does not COPY"
        );
    }
    assert!(root.join("config/dev.toml").exists());

    let compose = read("docker-compose.yml");
    for service in ["tai-node", "rabbitmq", "prometheus", "grafana", "jaeger"] {
        assert!(
            compose.contains(&format!("\n  {service}:\n")),
            "service {service}"
        );
    }
    for mount in compose
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- ./"))
        .map(|l| l.split(':').next().unwrap())
    {
        assert!(deploy(mount).exists(), "volume ./{mount}");
    }
    assert!(compose.contains("config/staging.toml"));
    assert!(Path::new(&root.join("config/staging.toml")).exists());
}

/// The value of a Dockerfile instruction's JSON array (`CMD [...]`,
/// `ENTRYPOINT [...]`).
fn exec_form(dockerfile: &str, instruction: &str) -> Vec<String> {
    let line = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{instruction} ")))
        .unwrap_or_else(|| panic!("no {instruction} in the Dockerfile"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{instruction} {line}: {e}"))
}

/// A node this test started, killed when the test ends if it still runs
/// (a failed assertion must not leave it behind).
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        kill_if_running(&mut self.0);
    }
}

/// The image's command, run as the container runs it (from a directory
/// laid out as its `WORKDIR`: the repository root, whose `config` the
/// image copies), answers its `HEALTHCHECK` and logs in the format it
/// asks for. Only the listen addresses and the data dir are the test's
/// own (the image's `ENV` sets them to fixed ports and a volume).
#[tokio::test]
async fn the_image_command_starts_a_node_that_answers_its_healthcheck() {
    let dockerfile = read("Dockerfile");
    let entrypoint = exec_form(&dockerfile, "ENTRYPOINT");
    assert_eq!(entrypoint, ["/usr/local/bin/tai"]);
    let cmd = exec_form(&dockerfile, "CMD");
    let health = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("HEALTHCHECK "))
        .and_then(|l| l.split("http://127.0.0.1:9090").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("a HEALTHCHECK on the operator port")
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("node.log");
    let (child, operator, _) = spawn_args(dir.path(), &cmd, &[], &log_path);
    let mut child = Stopped(child);
    let answer = reqwest::get(format!("http://{operator}{health}"))
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "GET {health}");
    send_signal(&child.0, libc::SIGTERM);
    let status = wait_for(
        "the node's exit on SIGTERM",
        Duration::from_secs(30),
        || child.0.try_wait().unwrap(),
    );
    assert!(status.success(), "stopped with {status}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(!lines.is_empty(), "the node logged nothing");
    if cmd.iter().any(|a| a == "json") {
        for line in lines {
            serde_json::from_str::<Value>(line)
                .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
        }
    }
}
