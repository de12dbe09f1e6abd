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

pub struct Node {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub operator: String,
    pub log_path: PathBuf,
}

impl Node {
    /// Starts `tai serve` on the dev config with free ports and a fresh data dir.
    pub fn start(env: &[(&str, &str)]) -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(dir, env)
    }

    pub fn start_in(dir: tempfile::TempDir, env: &[(&str, &str)]) -> Node {
        let log_path = dir.path().join("node.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let endpoints = dir.path().join("data/endpoints.json");
        let _ = std::fs::remove_file(&endpoints);
        let mut cmd = Command::new(tai_bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(dev_config())
            .env("TAI_NODE__DATA_DIR", dir.path().join("data"))
            .env("TAI_OPERATOR__LISTEN", "127.0.0.1:0")
            .env("TAI_INGRESS__LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn tai serve");
        let operator = wait_for("the node's endpoints.json", Duration::from_secs(30), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "tai serve exited early with {status}: {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            let v: Value = serde_json::from_slice(&std::fs::read(&endpoints).ok()?).ok()?;
            Some(v["operator"].as_str()?.to_string())
        });
        Node {
            child,
            dir,
            operator,
            log_path,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.operator)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub async fn admin(&self, method: reqwest::Method, path: &str) -> (u16, Value) {
        let resp = reqwest::Client::new()
            .request(method, self.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("admin request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn tree(&self) -> Value {
        let (status, tree) = self.admin(reqwest::Method::GET, "/admin/tree").await;
        assert_eq!(status, 200, "{tree}");
        tree
    }

    pub fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: plain kill(2) on our own child's pid.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig})");
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
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

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
