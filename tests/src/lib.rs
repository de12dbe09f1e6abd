//! End-to-end test helpers: real `tai` processes on 127.0.0.1 port 0, each
//! with its own temporary data directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const ADMIN_TOKEN: &str = "dev-admin-token";

/// The `tai` binary built alongside these tests (`target/<profile>/tai`).
pub fn tai_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TAI_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = profile_dir.join("tai");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build -p tai-node, which scripts/test.sh does)",
        bin.display()
    );
    bin
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn dev_config() -> PathBuf {
    workspace_root().join("config/dev.toml")
}

/// Polls `f` until it returns `Some`, or panics naming `what` at the deadline.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `sig` to a child process of this test.
pub fn send_signal(child: &Child, sig: i32) {
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: plain kill(2) on our own child's pid.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

pub struct Node {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub operator: String,
    pub ingress: String,
    pub log_path: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
}

/// A config for signal tests: generous limits, and tenants and SKUs for
/// each case. `extra` is appended (more tables).
pub fn test_config(extra: &str) -> String {
    format!(
        r#"
[node]
mode = "dev"
shutdown_grace_secs = 10

[ingress.rate_limits]
global_per_sec = 100000
trial_per_sec = 5
standard_per_sec = 100000
enterprise_per_sec = 100000

[andon]
signing_key_id = "k2"
signing_keys = {{ "k1" = "old-receipt-key", "k2" = "test-receipt-key" }}

[[tenants]]
id = "acme"
secrets = ["acme-old-secret", "acme-secret"]
tier = "enterprise"

[[tenants]]
id = "globex"
secrets = ["globex-secret"]
tier = "standard"

[[tenants]]
id = "tiny"
secrets = ["tiny-secret"]
tier = "trial"

[skus.payments]
policies = ["payment_fraud"]
quota = 1000000
quota_period_secs = 3600
entitlement_timeout_secs = 30

[skus.tight]
policies = []
quota = 1
quota_period_secs = 3600

[skus.slowboot]
policies = []
entitlement_timeout_secs = 1
{extra}
"#
    )
}

impl Node {
    /// Starts `tai serve` on the dev config with free ports and a fresh data dir.
    pub fn start(env: &[(&str, &str)]) -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(dir, env)
    }

    pub fn start_in(dir: tempfile::TempDir, env: &[(&str, &str)]) -> Node {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::launch(dir, dev_config(), env)
    }

    /// Starts a node on `config_text` (written into its temp dir).
    pub fn start_with(config_text: &str, env: &[(&str, &str)]) -> Node {
        Self::start_with_in(tempfile::tempdir().expect("temp dir"), config_text, env)
    }

    /// As `start_with`, in `dir` (its data dir is `dir/data`).
    pub fn start_with_in(dir: tempfile::TempDir, config_text: &str, env: &[(&str, &str)]) -> Node {
        let path = dir.path().join("config.toml");
        std::fs::write(&path, config_text).expect("write config");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::launch(dir, path, env)
    }

    /// `kill -9`: no shutdown, no flush; what was durable must survive.
    pub fn kill_hard(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM, and a clean exit (status 0) within 30 s.
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        let status = self.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "the node stopped with {status}");
    }

    /// Stops the node, writes `config_text` over its config and starts it
    /// again on the same data dir: an operator's edit and restart.
    pub fn restart_with_config(&mut self, config_text: &str) {
        self.stop();
        std::fs::write(&self.config, config_text).expect("write config");
        self.restart();
    }

    /// Starts the node again on the same data dir and config (after an exit or a kill).
    pub fn restart(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let old_log = self
            .log_path
            .with_extension(format!("log.{}", self.child.id()));
        let _ = std::fs::rename(&self.log_path, old_log);
        let (child, operator, ingress) =
            spawn(self.dir.path(), &self.config, &self.env, &self.log_path);
        self.child = child;
        self.operator = operator;
        self.ingress = ingress;
    }

    fn launch(dir: tempfile::TempDir, config: PathBuf, env: Vec<(String, String)>) -> Node {
        let log_path = dir.path().join("node.log");
        let (child, operator, ingress) = spawn(dir.path(), &config, &env, &log_path);
        Node {
            child,
            dir,
            operator,
            ingress,
            log_path,
            config,
            env,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Polls an admin GET until `f` accepts its body.
    pub async fn admin_until(
        &self,
        path: &str,
        what: &str,
        mut f: impl FnMut(&Value) -> bool,
    ) -> Value {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self.admin(reqwest::Method::GET, path).await;
            if status == 200 && f(&body) {
                return body;
            }
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}: last {status} {body}\nthe node's log, last lines:\n{}",
                self.log_tail(200)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every receipt, paging through the admin API.
    pub async fn all_receipts(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let (status, page) = self
                .admin(
                    reqwest::Method::GET,
                    &format!("/admin/receipts?after_seq={after}&limit=1000"),
                )
                .await;
            assert_eq!(status, 200, "{page}");
            let page = page.as_array().cloned().unwrap_or_default();
            let Some(last) = page.last() else { return out };
            after = last["seq"].as_u64().unwrap();
            out.extend(page);
        }
    }

    /// Waits until the queue is empty and nothing is in flight.
    /// Kills the registered actor `name` (fault injection) and waits until
    /// the tree shows it running again after its `restarts`-th restart.
    pub async fn kill_until_restarted(&self, name: &str, restarts: u64) {
        let path = format!("/admin/actors/{}/kill", name.replace(':', "%3A"));
        let (status, body) = self.admin(reqwest::Method::POST, &path).await;
        assert_eq!(status, 202, "kill {name}: {body}");
        self.admin_until("/admin/tree", &format!("{name} restarted"), |t| {
            find(t, name).is_some_and(|a| a["restarts"] == restarts && a["status"] == "running")
        })
        .await;
    }

    pub async fn drained(&self) {
        self.admin_until("/admin/queue", "an empty queue", |q| {
            q["depth"] == 0 && q["in_flight"] == 0
        })
        .await;
    }
}

fn spawn(
    dir: &Path,
    config: &Path,
    env: &[(String, String)],
    log_path: &Path,
) -> (Child, String, String) {
    let args = ["serve".as_ref(), "--config".as_ref(), config.as_os_str()];
    spawn_args(dir, &args, env, log_path)
}

/// Runs `tai` with `args` from the repository root, its data dir
/// `dir/data`, both listeners on free loopback ports and its log in
/// `log_path`, and waits until it has written its endpoints:
/// (child, operator address, ingress address). Panics with the log if it
/// exits first.
pub fn spawn_args(
    dir: &Path,
    args: &[impl AsRef<std::ffi::OsStr>],
    env: &[(String, String)],
    log_path: &Path,
) -> (Child, String, String) {
    let log = std::fs::File::create(log_path).expect("log file");
    let endpoints = dir.join("data/endpoints.json");
    let _ = std::fs::remove_file(&endpoints);
    let mut cmd = Command::new(tai_bin());
    // Relative paths in a config (Rego files) resolve from the repository
    // root, as when an operator runs `tai serve` there.
    cmd.current_dir(workspace_root())
        .args(args)
        .env("TAI_NODE__DATA_DIR", dir.join("data"))
        .env("TAI_OPERATOR__LISTEN", "127.0.0.1:0")
        .env("TAI_INGRESS__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn tai serve");
    let (operator, ingress) =
        wait_for("the node's endpoints.json", Duration::from_secs(30), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "tai serve exited early with {status}: {}",
                    std::fs::read_to_string(log_path).unwrap_or_default()
                );
            }
            let v: Value = serde_json::from_slice(&std::fs::read(&endpoints).ok()?).ok()?;
            Some((
                v["operator"].as_str()?.to_string(),
                v["ingress"].as_str()?.to_string(),
            ))
        });
    (child, operator, ingress)
}

/// A client that signs as SPEC §3 says, with its own HMAC (not the node's code).
#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub tenant: String,
    pub secret: String,
    pub http: reqwest::Client,
}

pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

pub fn sign(secret: &str, ts: &str, method: &str, path: &str, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{ts}\n{method}\n{path}\n").as_bytes());
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl Client {
    pub fn new(node: &Node, tenant: &str, secret: &str) -> Client {
        Client {
            base: format!("http://{}", node.ingress),
            tenant: tenant.into(),
            secret: secret.into(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
        }
    }

    /// Sends `body` with every header under the caller's control.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        headers: &[(&str, String)],
    ) -> Result<Answer, reqwest::Error> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .body(body.to_vec());
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.json().await.unwrap_or(Value::Null);
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    pub fn headers(
        &self,
        ts: u64,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Vec<(&'static str, String)> {
        let ts = ts.to_string();
        vec![
            ("content-type", "application/json".to_string()),
            ("x-tai-tenant", self.tenant.clone()),
            (
                "x-tai-signature",
                sign(&self.secret, &ts, method, path, body),
            ),
            ("x-tai-timestamp", ts),
        ]
    }

    pub async fn post(&self, body: &Value) -> Result<Answer, reqwest::Error> {
        let bytes = serde_json::to_vec(body).unwrap();
        let headers = self.headers(unix_now(), "POST", "/v1/signals", &bytes);
        self.raw("POST", "/v1/signals", &bytes, &headers).await
    }

    /// Posts the entitlement of this client's tenant for `sku`; it must be accepted.
    pub async fn entitle(&self, sku: &str, id: &str) {
        let a = self
            .post(&entitlement(&self.tenant, sku, id))
            .await
            .expect("entitlement request");
        assert_eq!(a.status, 202, "{}", a.body);
    }

    pub async fn status(&self, id: &str) -> Answer {
        let path = format!("/v1/signals/{id}");
        let headers = self.headers(unix_now(), "GET", &path, b"");
        self.raw("GET", &path, b"", &headers)
            .await
            .expect("status request")
    }

    /// Polls a signal until its status is final.
    pub async fn decided(&self, id: &str) -> Value {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let a = self.status(id).await;
            let s = a.body["status"].as_str().unwrap_or_default().to_string();
            if a.status == 200
                && ["completed", "denied", "failed", "deadlettered"].contains(&s.as_str())
            {
                return a.body;
            }
            assert!(Instant::now() < end, "signal {id} not decided: {}", a.body);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The `waiting` SKU of the parked-signal tests: no policy, and an
/// entitlement timeout of `secs`.
pub fn waiting_sku(secs: u64) -> String {
    format!("\n[skus.waiting]\npolicies = []\nentitlement_timeout_secs = {secs}\n")
}

/// Posts `w-0`..`w-{n-1}` to acme's `waiting` SKU (see [`waiting_sku`]),
/// each answered 202.
pub async fn post_waiting(c: &Client, n: usize) {
    for i in 0..n {
        let id = format!("w-{i}");
        let a = c
            .post(&signal(
                "acme",
                "waiting",
                "job",
                &id,
                serde_json::json!({}),
            ))
            .await;
        assert_eq!(a.as_ref().map(|a| a.status).ok(), Some(202), "{id}");
    }
}

/// With `n` signals parked in acme's unentitled `waiting` engine: another
/// engine of acme and another tenant are decided; then, entitled, the `n`
/// are decided in order, once, and nothing stays in flight. The receipts.
pub async fn others_go_on_then_the_waiting_are_decided(
    node: &Node,
    c: &Client,
    n: usize,
) -> Vec<Value> {
    c.entitle("payments", "ent").await;
    let pay = serde_json::json!({"amount": 5.0, "currency": "USD", "customer_id": "c1"});
    let a = c
        .post(&signal("acme", "payments", "payment", "pay-1", pay))
        .await
        .unwrap();
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(c.decided("pay-1").await["status"], "completed");
    let g = Client::new(node, "globex", "globex-secret");
    g.entitle("payments", "g-ent").await;
    assert_eq!(g.decided("g-ent").await["status"], "completed");
    c.entitle("waiting", "ent-w").await;
    for i in 0..n {
        assert_eq!(c.decided(&format!("w-{i}")).await["status"], "completed");
    }
    let receipts = node.all_receipts().await;
    let decided: Vec<&str> = receipts
        .iter()
        .filter(|r| r["kind"] == "action_generated" && r["sku_id"] == "waiting")
        .map(|r| r["signal_id"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..n).map(|i| format!("w-{i}")).collect();
    assert_eq!(decided, expected, "in order, once");
    node.admin_until("/admin/queue", "nothing left in flight", |q| {
        q["in_flight"] == 0 && q["parked"] == 0
    })
    .await;
    receipts
}

pub fn signal(tenant: &str, sku: &str, kind: &str, id: &str, payload: Value) -> Value {
    serde_json::json!({"id": id, "tenant_id": tenant, "sku_id": sku, "kind": kind, "payload": payload})
}

/// A payment body over the node's 64 KiB default body limit (413).
pub fn oversized(tenant: &str) -> Vec<u8> {
    serde_json::to_vec(&signal(
        tenant,
        "payments",
        "payment",
        "big",
        serde_json::json!({"blob": "x".repeat(70_000)}),
    ))
    .unwrap()
}

/// The entitlement that takes a tenant × SKU engine out of `boot`.
pub fn entitlement(tenant: &str, sku: &str, id: &str) -> Value {
    signal(
        tenant,
        sku,
        "entitlement",
        id,
        serde_json::json!({"active": true}),
    )
}

impl Node {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.operator)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last `lines` lines of the node's log, for a failure message.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits (at most 30 s) until the node's log holds `text`.
    pub async fn log_until(&self, text: &str) {
        let end = Instant::now() + Duration::from_secs(30);
        while !self.log().contains(text) {
            assert!(
                Instant::now() < end,
                "timed out waiting for {text:?} in the node's log, last lines:\n{}",
                self.log_tail(200)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn admin(&self, method: reqwest::Method, path: &str) -> (u16, Value) {
        self.admin_with_body(method, path, "").await
    }

    /// An operator API request with a body (sent as JSON).
    pub async fn admin_with_body(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &str,
    ) -> (u16, Value) {
        let resp = reqwest::Client::new()
            .request(method, self.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("admin request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// The Prometheus text of `GET /metrics`.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics request")
            .text()
            .await
            .expect("metrics body")
    }

    pub async fn tree(&self) -> Value {
        let (status, tree) = self.admin(reqwest::Method::GET, "/admin/tree").await;
        assert_eq!(status, 200, "{tree}");
        tree
    }

    pub fn signal(&self, sig: i32) {
        send_signal(&self.child, sig);
    }

    /// Waits for the process to end within `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let child = &mut self.child;
        wait_for("the node to exit", deadline, || {
            child.try_wait().ok().flatten()
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        kill_if_running(&mut self.child);
    }
}

/// `kill -9` and reap a child still running (a test that ended early must
/// not leave its node behind).
pub fn kill_if_running(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A small tmpfs mounted on a directory for one test: a disk that fills
/// up. Mounting needs root (CAP_SYS_ADMIN), which the tests have on the CI
/// machine; without it the test fails, saying so. Unmounted when dropped.
pub use tai_store::tmpfs::Tmpfs;

/// The children of a tree node, by name, in order.
pub fn children(node: &Value) -> Vec<&Value> {
    node["children"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

pub fn find<'a>(node: &'a Value, name: &str) -> Option<&'a Value> {
    if node["name"] == name {
        return Some(node);
    }
    children(node).into_iter().find_map(|c| find(c, name))
}

/// How the test gateway answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GatewayMode {
    Ok,
    /// 500 Internal Server Error.
    Fail,
    /// 200 after this many milliseconds.
    Slow(u64),
    /// 302 Found to the health URL, which answers a GET with 200.
    Redirect,
}

/// One request the gateway received.
#[derive(Debug, Clone)]
pub struct GatewayHit {
    pub headers: std::collections::HashMap<String, String>,
    pub body: Vec<u8>,
}

/// A real HTTP target on 127.0.0.1 (a payment gateway, a deploy hook) whose
/// answers the test switches, recording what it receives.
pub struct Gateway {
    pub url: String,
    /// `GET` here answers `{"error_rate", "p99_ms"}` (a rollout's health check).
    pub health_url: String,
    mode: std::sync::Arc<std::sync::Mutex<GatewayMode>>,
    hits: std::sync::Arc<std::sync::Mutex<Vec<GatewayHit>>>,
    /// Per stage name, the status and health it reports (default: 200, healthy).
    health: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, (u16, Value)>>>,
    /// Requests being answered now, and the most at once.
    flight: std::sync::Arc<[std::sync::atomic::AtomicUsize; 2]>,
}

impl Gateway {
    pub async fn start() -> Gateway {
        use warp::Filter;
        let mode = std::sync::Arc::new(std::sync::Mutex::new(GatewayMode::Ok));
        let hits = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health_url = format!("http://{addr}/health");
        let flight: std::sync::Arc<[std::sync::atomic::AtomicUsize; 2]> = Default::default();
        let (m, h, to, f) = (
            mode.clone(),
            hits.clone(),
            health_url.clone(),
            flight.clone(),
        );
        let route = warp::post()
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .then(
                move |headers: warp::http::HeaderMap, body: warp::hyper::body::Bytes| {
                    let (m, h, to, f) = (m.clone(), h.clone(), to.clone(), f.clone());
                    async move {
                        use std::sync::atomic::Ordering::SeqCst;
                        let now = f[0].fetch_add(1, SeqCst) + 1;
                        f[1].fetch_max(now, SeqCst);
                        h.lock().unwrap().push(GatewayHit {
                            headers: headers
                                .iter()
                                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                                .collect(),
                            body: body.to_vec(),
                        });
                        let mode = *m.lock().unwrap();
                        let answer = warp::http::Response::builder();
                        let answer = match mode {
                            GatewayMode::Ok => answer.status(200),
                            GatewayMode::Fail => answer.status(500),
                            GatewayMode::Slow(ms) => {
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                                answer.status(200)
                            }
                            GatewayMode::Redirect => answer.status(302).header("location", to),
                        };
                        f[0].fetch_sub(1, SeqCst);
                        answer.body("{}").unwrap()
                    }
                },
            );
        let health = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
            String,
            (u16, Value),
        >::new()));
        let hl = health.clone();
        let health_route = warp::get()
            .and(warp::path("health"))
            .and(warp::query::<std::collections::HashMap<String, String>>())
            .map(move |q: std::collections::HashMap<String, String>| {
                let stage = q.get("stage").cloned().unwrap_or_default();
                let (status, doc) = hl.lock().unwrap().get(&stage).cloned().unwrap_or_else(|| {
                    (200, serde_json::json!({"error_rate": 0.01, "p99_ms": 120}))
                });
                warp::reply::with_status(
                    warp::reply::json(&doc),
                    warp::http::StatusCode::from_u16(status).unwrap(),
                )
            });
        tokio::spawn(warp::serve(health_route.or(route)).incoming(listener).run());
        Gateway {
            url: format!("http://{addr}/hook"),
            health_url,
            mode,
            hits,
            health,
            flight,
        }
    }

    /// The most requests it has held at once.
    pub fn max_in_flight(&self) -> usize {
        self.flight[1].load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The requests it holds now (not yet answered).
    pub fn in_flight(&self) -> usize {
        self.flight[0].load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Makes the health check of `stage` report `doc`.
    pub fn set_health(&self, stage: &str, doc: Value) {
        self.set_health_answer(stage, 200, doc);
    }

    /// Makes the health check of `stage` answer `status` with `doc`.
    pub fn set_health_answer(&self, stage: &str, status: u16, doc: Value) {
        self.health
            .lock()
            .unwrap()
            .insert(stage.to_string(), (status, doc));
    }

    pub fn set(&self, mode: GatewayMode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn hits(&self) -> Vec<GatewayHit> {
        self.hits.lock().unwrap().clone()
    }
}

// ---- RabbitMQ (the amqp backend's tests) -----------------------------------

/// The local broker's address; loopback only.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn broker_listening() -> bool {
    std::net::TcpStream::connect_timeout(
        &"127.0.0.1:5672".parse().expect("address"),
        Duration::from_millis(500),
    )
    .is_ok()
}

/// Makes sure RabbitMQ runs on 127.0.0.1:5672: started with
/// `rabbitmq-server -detached` if it is not, else the test fails saying why.
pub fn ensure_broker() {
    if broker_listening() && rabbitmqctl(&["await_startup"]).is_ok() {
        return;
    }
    let started = Command::new("rabbitmq-server").arg("-detached").status();
    if let Err(e) = &started {
        panic!(
            "RabbitMQ is not running on 127.0.0.1:5672 and `rabbitmq-server -detached` failed: {e}"
        );
    }
    // `start_app` too, in case only the application was stopped.
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let _ = rabbitmqctl(&["start_app"]);
        if broker_listening() && rabbitmqctl(&["await_startup"]).is_ok() {
            return;
        }
        assert!(
            Instant::now() < end,
            "RabbitMQ did not come up on 127.0.0.1:5672 within 90 s after `rabbitmq-server -detached`"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Runs `rabbitmqctl` with `args`; its stdout, or why it failed.
pub fn rabbitmqctl(args: &[&str]) -> Result<String, String> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map_err(|e| format!("rabbitmqctl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "rabbitmqctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A queue name of its own for one test (tests share the broker).
pub fn unique_queue(test: &str) -> String {
    format!("tai-test.{test}.{}.{}", std::process::id(), unix_now())
}

/// The `[kanban]` table of a node on the amqp backend with queue `queue`.
pub fn amqp_kanban(queue: &str) -> String {
    format!(
        "\n[kanban]\nbackend = \"amqp\"\namqp_url = \"{AMQP_URL}\"\namqp_queue = \"{queue}\"\nprefetch = 10\nwip_limit = 50\n"
    )
}

/// Deletes a test's queues when the test ends, however it ends.
pub struct QueueCleanup(pub String);

impl Drop for QueueCleanup {
    fn drop(&mut self) {
        let queue = self.0.clone();
        // Its own thread and runtime: drop may run inside a test's runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            // The node's own clean-up: every queue and exchange it declares.
            // Again until it goes through: right after a test restarts the
            // broker, a queue it is still recovering cannot be deleted yet
            // (a watch queue was left behind so).
            let end = Instant::now() + Duration::from_secs(20);
            rt.block_on(async {
                loop {
                    match tai_kanban::amqp::delete_topology(AMQP_URL, &queue).await {
                        Ok(()) => return,
                        Err(e) if Instant::now() >= end => {
                            eprintln!("could not delete the test queue {queue}: {e}");
                            return;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
            });
        })
        .join();
    }
}

// ---- OpenTelemetry (the traces tests) --------------------------------------

/// A local OTLP/HTTP receiver: keeps every span posted to `/v1/traces`
/// (OTLP JSON), flattened to `{traceId, spanId, parentSpanId, name, links}`.
pub struct Collector {
    /// The base URL to give as `kaizen.otlp_endpoint`.
    pub url: String,
    spans: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
}

impl Collector {
    pub async fn start() -> Collector {
        use warp::Filter;
        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = spans.clone();
        let route = warp::post()
            .and(warp::path!("v1" / "traces"))
            .and(warp::body::bytes())
            .map(move |body: bytes::Bytes| {
                let v: Value = serde_json::from_slice(&body).expect("OTLP JSON");
                let mut out = store.lock().unwrap();
                for rs in v["resourceSpans"].as_array().into_iter().flatten() {
                    for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                        out.extend(ss["spans"].as_array().into_iter().flatten().cloned());
                    }
                }
                warp::reply::json(&serde_json::json!({}))
            });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        Collector {
            url: format!("http://{addr}"),
            spans,
        }
    }

    /// The spans of one trace received so far.
    pub fn trace(&self, trace_id: &str) -> Vec<Value> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| {
                s["traceId"]
                    .as_str()
                    .is_some_and(|t| t.eq_ignore_ascii_case(trace_id))
            })
            .cloned()
            .collect()
    }

    /// Waits until the trace has a span of each name in `names`.
    pub async fn until_spans(&self, trace_id: &str, names: &[&str]) -> Vec<Value> {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let spans = self.trace(trace_id);
            if names.iter().all(|n| spans.iter().any(|s| s["name"] == *n)) {
                return spans;
            }
            assert!(
                Instant::now() < end,
                "trace {trace_id} lacks some of {names:?}: {spans:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The span named `name` in `spans` (the first, if several).
pub fn span<'a>(spans: &'a [Value], name: &str) -> &'a Value {
    spans
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no {name} span in {spans:?}"))
}

/// Checks the tree of one signal's spans: the client's span → ingress →
/// enqueue → (the queue) → dequeue → policy, action, receipt.
pub fn assert_signal_span_tree(spans: &[Value], client_span: &str) {
    let id = |n: &str| span(spans, n)["spanId"].as_str().unwrap().to_lowercase();
    let parent = |n: &str| {
        span(spans, n)["parentSpanId"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase()
    };
    assert_eq!(
        parent("ingress"),
        client_span,
        "ingress continues the client's span"
    );
    assert_eq!(parent("enqueue"), id("ingress"));
    assert_eq!(
        parent("dequeue"),
        id("enqueue"),
        "the trace crosses the queue"
    );
    for child in ["policy", "action", "receipt"] {
        assert_eq!(parent(child), id("dequeue"), "{child} under dequeue");
    }
}

/// Sends the payment `body` (signal `id`) inside the client's trace
/// (`trace`, parent span `client_span`), waits for its decision, checks
/// the exported span tree, and that both receipts of the decision carry
/// the trace id.
pub async fn assert_traced_payment(
    node: &Node,
    c: &Client,
    collector: &Collector,
    body: &Value,
    trace: &str,
    client_span: &str,
) {
    let id = body["id"].as_str().expect("the signal has an id");
    let a = c
        .post_traced(body, &format!("00-{trace}-{client_span}-01"))
        .await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(c.decided(id).await["status"], "completed");
    let spans = collector
        .until_spans(
            trace,
            &[
                "ingress", "enqueue", "dequeue", "policy", "action", "receipt",
            ],
        )
        .await;
    assert_signal_span_tree(&spans, client_span);
    let receipts: Vec<_> = node
        .all_receipts()
        .await
        .into_iter()
        .filter(|r| r["signal_id"] == id)
        .collect();
    assert_eq!(receipts.len(), 2, "action_generated and action_successful");
    assert!(
        receipts.iter().all(|r| r["trace_id"] == trace),
        "{receipts:?}"
    );
}

impl Client {
    /// Posts a signal with a W3C `traceparent` header.
    pub async fn post_traced(&self, body: &Value, traceparent: &str) -> Answer {
        let bytes = serde_json::to_vec(body).unwrap();
        let mut headers = self.headers(unix_now(), "POST", "/v1/signals", &bytes);
        headers.push(("traceparent", traceparent.to_string()));
        self.raw("POST", "/v1/signals", &bytes, &headers)
            .await
            .expect("POST /v1/signals")
    }
}

/// Runs `tai bench ARGS --json` (short runs: the figures belong to
/// BENCHMARKS.md) and returns its report after checking that it succeeded
/// and decided every signal it got a 202 for.
pub fn bench_report(args: &[&str]) -> Value {
    let out = Command::new(tai_bin())
        .current_dir(workspace_root())
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .expect("run tai bench");
    assert!(
        out.status.success(),
        "tai bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.lines().last().expect("a JSON line"))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    let accepted = report["accepted"].as_u64().unwrap();
    assert!(accepted > 0, "{report}");
    assert_eq!(report["decided"], accepted, "every 202 decided: {report}");
    report
}

/// Asserts that each of `keys` is a positive number in a bench report.
pub fn assert_positive(report: &Value, keys: &[&str]) {
    for key in keys {
        assert!(
            report[*key].as_f64().is_some_and(|v| v > 0.0),
            "{key} missing or zero: {report}"
        );
    }
}

/// Asserts that a bench report's baseline `mean_key` is the mean of its two
/// runs under `runs_key` (one before the node's load, one after), both positive.
pub fn assert_bracketed(report: &Value, runs_key: &str, mean_key: &str) {
    let runs: Vec<f64> = report[runs_key]
        .as_array()
        .unwrap_or_else(|| panic!("{runs_key} missing: {report}"))
        .iter()
        .map(|r| r.as_f64().expect("a rate"))
        .collect();
    assert_eq!(runs.len(), 2, "{report}");
    assert!(runs.iter().all(|r| *r > 0.0), "{report}");
    let mean = report[mean_key].as_f64().expect("baseline");
    assert!((mean - (runs[0] + runs[1]) / 2.0).abs() < 1e-6, "{report}");
}

/// The value of the first sample in Prometheus text whose line starts with
/// `name_and_labels` (a name and its labels as the node writes them).
pub fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
