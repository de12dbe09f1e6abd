//! `tai bench`: a load generator for the signal path.
//!
//! Unless given `--target`, it starts its own node (`tai serve`, this same
//! binary) on a temporary data dir with N generated tenants, entitles them,
//! then sends signed signals for `--duration` seconds, at `--rate` per second
//! or as fast as `--concurrency` clients go. Decided/s and latency (send to
//! decision) come from the receipts' timestamps. In the same run, with the
//! same client, it measures a baseline: a bare warp endpoint that checks the
//! HMAC and answers 202, once before the node's load and once after (their
//! mean is the baseline).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tai_core::signal::now_ms;
use warp::Filter;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Distinct tenants sending signals.
    #[arg(long, default_value_t = 100, value_parser = at_least_one)]
    pub tenants: usize,
    /// Signals per second offered; 0 = as fast as the clients go.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Seconds of load.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub duration: u64,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub concurrency: usize,
    /// WIP limit of the node the bench starts.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub wip: u32,
    /// Prefetch (per engine) of the node the bench starts.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub prefetch: u32,
    /// `jidoka.max_active_engines` of the node the bench starts (default:
    /// the node's own default).
    #[arg(long)]
    pub max_active_engines: Option<usize>,
    /// `node.store_cache_mb` of the node the bench starts (default: the
    /// node's own default).
    #[arg(long)]
    pub store_cache_mb: Option<u64>,
    /// SKU to send to. The node the bench starts has `bench` (no policy),
    /// `payments` (payment_fraud) and `rego` (the shipped
    /// `config/policies/payment_limits.rego`).
    #[arg(long, default_value = "bench")]
    pub sku: String,
    /// Queue backend of the node the bench starts: `embedded` or `amqp`
    /// (RabbitMQ at --amqp-url; the baseline is then also a bare lapin loop,
    /// run just before and just after the node's load, and averaged).
    #[arg(long, default_value = "embedded", value_parser = ["embedded", "amqp"])]
    pub backend: String,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    /// Start the node with Prometheus metrics off (`kaizen.metrics = false`).
    #[arg(long)]
    pub no_metrics: bool,
    /// Start the node with tracing on, exporting over OTLP to a local
    /// receiver the bench runs (which counts and discards what it gets).
    #[arg(long)]
    pub otlp: bool,
    /// With --otlp: the node's `kaizen.trace_sample_ratio` (0 to 1).
    #[arg(long, default_value_t = 0.1, value_parser = ratio)]
    pub trace_sample_ratio: f64,
    /// Use the running node of --config instead of starting one.
    #[arg(long)]
    pub target: bool,
    /// Skip the baseline measurement.
    #[arg(long)]
    pub no_baseline: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        Ok(_) => Err("must be between 0 and 1".into()),
        Err(e) => Err(e.to_string()),
    }
}

struct Target {
    ingress: String,
    operator: String,
    admin_token: String,
    tenants: Vec<(String, String)>,
    child: Option<std::process::Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Target {
    /// A bench that ends early (an error) does not leave its node running.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn bench_config(a: &BenchArgs, dir: &std::path::Path, otlp: Option<SocketAddr>) -> String {
    let mut c = format!(
        r#"[node]
mode = "dev"
data_dir = "{data}"
store_cache_mb = {cache_mb}
[ingress]
listen = "127.0.0.1:0"
[ingress.rate_limits]
global_per_sec = 10000000
enterprise_per_sec = 10000000
[operator]
listen = "127.0.0.1:0"
admin_token = "bench-admin-token"
[kanban]
wip_limit = {wip}
prefetch = {prefetch}
max_depth = 100000000
backend = "{backend}"
amqp_url = "{amqp_url}"
amqp_queue = "{amqp_queue}"
[kaizen]
metrics = {metrics}
{otlp}
[jidoka]
max_active_engines = {engines}
[skus.bench]
policies = []
quota = 1000000000000
[skus.payments]
policies = ["payment_fraud"]
quota = 1000000000000
[skus.rego]
policies = []
rego = ["{rego}"]
quota = 1000000000000
"#,
        rego = dir.join("payment_limits.rego").display(),
        data = dir.join("data").display(),
        wip = a.wip,
        cache_mb = a
            .store_cache_mb
            .unwrap_or(tai_core::config::NodeConfig::default().store_cache_mb),
        engines = a
            .max_active_engines
            .unwrap_or(tai_core::config::JidokaConfig::default().max_active_engines),
        prefetch = a.prefetch,
        backend = a.backend,
        amqp_url = a.amqp_url,
        amqp_queue = bench_queue(),
        metrics = !a.no_metrics,
        otlp = otlp
            .map(|addr| format!(
                "otlp_endpoint = \"http://{addr}\"\ntrace_sample_ratio = {}",
                a.trace_sample_ratio
            ))
            .unwrap_or_default(),
    );
    for i in 0..a.tenants {
        c.push_str(&format!(
            "[[tenants]]\nid = \"bench-{i}\"\nsecrets = [\"bench-secret-{i}\"]\ntier = \"enterprise\"\n"
        ));
    }
    c
}

/// The work queue of a bench node on the amqp backend (deleted afterwards).
fn bench_queue() -> String {
    format!("tai-bench.{}", std::process::id())
}

fn start_node(a: &BenchArgs, otlp: Option<SocketAddr>) -> anyhow::Result<Target> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("bench.toml");
    std::fs::write(&config, bench_config(a, dir.path(), otlp))?;
    std::fs::write(
        dir.path().join("payment_limits.rego"),
        include_str!("../../../config/policies/payment_limits.rego"),
    )?;
    let log = std::fs::File::create(dir.path().join("node.log"))?;
    let child = std::process::Command::new(std::env::current_exe()?)
        .args(["serve", "--config"])
        .arg(&config)
        // The node's default level, so the bench measures what runs by default.
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start tai serve")?;
    let endpoints = dir.path().join("data/endpoints.json");
    let started = Instant::now();
    // The node's log goes with its temp dir: an error carries its text.
    let log_text = || std::fs::read_to_string(dir.path().join("node.log")).unwrap_or_default();
    let mut target = Target {
        ingress: String::new(),
        operator: String::new(),
        admin_token: "bench-admin-token".into(),
        tenants: Vec::new(),
        child: Some(child),
        _dir: None,
    };
    let v: Value = loop {
        if let Ok(bytes) = std::fs::read(&endpoints) {
            if let Ok(v) = serde_json::from_slice(&bytes) {
                break v;
            }
        }
        if let Some(status) = target
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            bail!(
                "the bench node exited ({status}) before it was up:\n{}",
                log_text()
            );
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the bench node did not start within 60 s:\n{}", log_text());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    target.ingress = v["ingress"].as_str().unwrap_or_default().to_string();
    target.operator = v["operator"].as_str().unwrap_or_default().to_string();
    target.tenants = (0..a.tenants)
        .map(|i| (format!("bench-{i}"), format!("bench-secret-{i}")))
        .collect();
    target._dir = Some(dir);
    Ok(target)
}

fn existing(config: &tai_core::config::Config) -> anyhow::Result<Target> {
    let tenants: Vec<(String, String)> = config
        .tenants
        .iter()
        .filter_map(|t| t.secrets.first().map(|s| (t.id.clone(), s.clone())))
        .collect();
    if tenants.is_empty() {
        bail!("the config has no tenants to send as");
    }
    Ok(Target {
        ingress: config.ingress.listen.to_string(),
        operator: config.operator.listen.to_string(),
        admin_token: config.operator.admin_token.clone(),
        tenants,
        child: None,
        _dir: None,
    })
}

/// One signed POST; true on 202.
/// A request the node has not answered in this long counts as refused.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// One kept-alive HTTP/1.1 connection of a load client: a bare hyper
/// client connection (no pool, no URL parsing per request), so the load
/// generator's own CPU, which shares this machine's cores with the node,
/// stays small. Reconnects when the server closes.
struct Conn {
    addr: String,
    sender: Option<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>>,
}

impl Conn {
    fn new(base: &str) -> Self {
        Conn {
            addr: base.trim_start_matches("http://").to_string(),
            sender: None,
        }
    }

    /// Posts a signed signal; true on a 202.
    async fn post(&mut self, tenant: &str, secret: &str, body: Vec<u8>) -> bool {
        let ts = (now_ms() / 1000).to_string();
        let sig = tai_ingress::auth::sign(secret.as_bytes(), &ts, "POST", "/v1/signals", &body);
        let req = hyper::Request::post("/v1/signals")
            .header("host", self.addr.as_str())
            .header("content-type", "application/json")
            .header(tai_ingress::auth::TENANT, tenant)
            .header(tai_ingress::auth::TIMESTAMP, ts)
            .header(tai_ingress::auth::SIGNATURE, sig)
            .body(http_body_util::Full::new(bytes::Bytes::from(body)));
        let Ok(req) = req else { return false };
        let sender = match self.sender.as_mut() {
            Some(s) if !s.is_closed() => s,
            _ => {
                let Ok(stream) = tokio::net::TcpStream::connect(&self.addr).await else {
                    return false;
                };
                let _ = stream.set_nodelay(true);
                let Ok((sender, conn)) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                else {
                    return false;
                };
                tokio::spawn(conn);
                self.sender.insert(sender)
            }
        };
        if sender.ready().await.is_err() {
            self.sender = None;
            return false;
        }
        let exchange = async {
            let resp = sender.send_request(req).await.ok()?;
            let accepted = resp.status().as_u16() == 202;
            // Read the body to the end so the connection can be reused.
            http_body_util::BodyExt::collect(resp.into_body())
                .await
                .ok()?;
            Some(accepted)
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Some(accepted)) => accepted,
            // Failed or hung: this connection is dropped, the next post opens another.
            _ => {
                self.sender = None;
                false
            }
        }
    }
}

/// Sends for `duration`; returns (id, send time ms) of every 202.
async fn load(
    base: &str,
    tenants: &[(String, String)],
    a: &BenchArgs,
    sku: &str,
    tag: &str,
) -> anyhow::Result<(Vec<(String, u64)>, Duration)> {
    let tenants = Arc::new(tenants.to_vec());
    let next = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(a.duration);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..a.concurrency {
        let (tenants, next, base, sku, tag) = (
            tenants.clone(),
            next.clone(),
            base.to_string(),
            sku.to_string(),
            tag.to_string(),
        );
        let pace = pace(a.rate, a.concurrency, client).map(|(offset, period)| {
            tokio::time::interval_at(tokio::time::Instant::from_std(started) + offset, period)
        });
        tasks.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            let mut conn = Conn::new(&base);
            let mut tick = pace;
            while Instant::now() < end {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                let (tenant, secret) = &tenants[(n as usize) % tenants.len()];
                let id = format!("{tag}-{n}");
                let body = serde_json::to_vec(&json!({
                    "id": id, "tenant_id": tenant, "sku_id": sku, "kind": "payment",
                    "payload": {"amount": 42.0, "currency": "USD", "customer_id": format!("c{n}")}
                }))
                .expect("json");
                let sent = now_ms();
                if conn.post(tenant, secret, body).await {
                    accepted.push((id, sent));
                }
            }
            accepted
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    Ok((all, started.elapsed()))
}

/// At a fixed `rate` (0: as fast as the clients go), when client number
/// `client` of `concurrency` first sends, after the load starts, and how
/// often. Each client sends once per period, the clients spread evenly over
/// it: `--rate 5000` with 64 clients is a signal every 200 µs, not all 64
/// at once every 12.8 ms, which the clients' ticks in step gave until
/// session 59 (each burst's tail was in the p99).
fn pace(rate: u64, concurrency: usize, client: usize) -> Option<(Duration, Duration)> {
    (rate > 0).then(|| {
        let period = Duration::from_secs_f64(concurrency as f64 / rate as f64);
        (period.mul_f64(client as f64 / concurrency as f64), period)
    })
}

async fn admin(t: &Target, path: &str) -> anyhow::Result<Value> {
    Ok(reqwest::Client::new()
        .get(format!("http://{}{path}", t.operator))
        .bearer_auth(&t.admin_token)
        .timeout(Duration::from_secs(60))
        .send()
        .await?
        .json()
        .await?)
}

async fn drained(t: &Target, limit: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + limit;
    loop {
        let q = admin(t, "/admin/queue").await?;
        if q["depth"] == 0 && q["in_flight"] == 0 {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("the node did not drain its queue in {limit:?}: {q}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The decision time of each signal: its last receipt's timestamp.
async fn decision_times(t: &Target, after_seq: u64) -> anyhow::Result<(HashMap<String, u64>, u64)> {
    let mut out = HashMap::new();
    let mut after = after_seq;
    loop {
        let page = admin(t, &format!("/admin/receipts?after_seq={after}&limit=1000")).await?;
        let Some(list) = page.as_array().filter(|l| !l.is_empty()) else {
            return Ok((out, after));
        };
        for r in list {
            if let (Some(id), Some(ts)) = (r["signal_id"].as_str(), r["timestamp_ms"].as_u64()) {
                out.insert(id.to_string(), ts);
            }
            after = r["seq"].as_u64().unwrap_or(after);
        }
    }
}

fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// A baseline measured before and after the node's load: both runs, and
/// their mean as the baseline.
fn bracket(before: Option<f64>, after: Option<f64>) -> (Option<[f64; 2]>, Option<f64>) {
    let runs = before.zip(after).map(|(b, a)| [b, a]);
    (runs, runs.map(|[b, a]| (b + a) / 2.0))
}

/// One baseline run: the same load, with the same client, against the bare
/// endpoint; requests answered 202 per second.
async fn baseline_run(tenants: &[(String, String)], a: &BenchArgs) -> anyhow::Result<f64> {
    let (addr, stop) = baseline_server(tenants).await?;
    let (ok, took) = load(&format!("http://{addr}"), tenants, a, &a.sku, "baseline").await?;
    let _ = stop.send(());
    Ok(ok.len() as f64 / took.as_secs_f64())
}

/// The baseline: HMAC check and 202, nothing else.
async fn baseline_server(
    tenants: &[(String, String)],
) -> anyhow::Result<(SocketAddr, tokio::sync::oneshot::Sender<()>)> {
    let configs: Vec<tai_core::config::TenantConfig> = tenants
        .iter()
        .map(|(id, s)| tai_core::config::TenantConfig {
            id: id.clone(),
            secrets: vec![s.clone()],
            tier: tai_core::config::Tier::Enterprise,
        })
        .collect();
    let map = Arc::new(tai_ingress::auth::tenants(&configs));
    let route = warp::post()
        .and(warp::path!("v1" / "signals"))
        .and(warp::header::headers_cloned())
        .and(warp::body::bytes())
        .map(move |h: warp::http::HeaderMap, body: bytes::Bytes| {
            let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok());
            let p = tai_ingress::auth::Presented {
                tenant: get(tai_ingress::auth::TENANT),
                timestamp: get(tai_ingress::auth::TIMESTAMP),
                signature: get(tai_ingress::auth::SIGNATURE),
            };
            let ok = tai_ingress::auth::verify(
                &map,
                p,
                "POST",
                "/v1/signals",
                &body,
                now_ms() / 1000,
                300,
            )
            .is_ok();
            let status = if ok {
                warp::http::StatusCode::ACCEPTED
            } else {
                warp::http::StatusCode::UNAUTHORIZED
            };
            warp::reply::with_status(warp::reply::json(&json!({"status": "accepted"})), status)
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    // The node's own server stack, so the two differ only in what they do.
    let listening =
        tai_ingress::http::Listening::new("baseline", &tai_core::config::NodeConfig::default());
    tokio::spawn(tai_ingress::http::serve(
        warp::service(route),
        listener,
        listening,
        async {
            let _ = rx.await;
        },
    ));
    Ok((addr, tx))
}

/// One bare lapin loop at the node's prefetch on a queue of its own:
/// persistent publishes with 1,000 confirms in flight and a consumer acking
/// each delivery by hand; returns what went through both ends per second.
async fn bare_broker_loop(a: &BenchArgs) -> anyhow::Result<f64> {
    let payload = serde_json::to_vec(&json!({
        "id": "01KBENCHBENCHBENCHBENCHBENC", "tenant_id": "bench-0", "sku_id": a.sku,
        "kind": "payment", "critical": false, "received_at_ms": now_ms(),
        "payload": {"amount": 25.0, "currency": "USD", "customer_id": "cust-0"},
    }))?;
    let bare = tai_kanban::amqp::bare_loop(
        &a.amqp_url,
        &format!("tai-bench.bare.{}", std::process::id()),
        u16::try_from(a.prefetch).unwrap_or(u16::MAX),
        1000,
        Duration::from_secs(a.duration),
        &payload,
    )
    .await
    .map_err(|e| anyhow::anyhow!("bare broker loop: {e}"))?;
    Ok(bare.consumed as f64 / bare.secs)
}

/// A local OTLP/HTTP receiver for `--otlp`: counts the spans it gets.
async fn otlp_sink() -> anyhow::Result<(SocketAddr, Arc<AtomicU64>)> {
    let spans = Arc::new(AtomicU64::new(0));
    let count = spans.clone();
    let route = warp::post()
        .and(warp::path!("v1" / "traces"))
        .and(warp::body::bytes())
        .map(move |body: bytes::Bytes| {
            // Counted, not parsed: the receiver shares the machine with the node.
            let n = body
                .windows(b"\"spanId\"".len())
                .filter(|w| *w == b"\"spanId\"")
                .count();
            count.fetch_add(n as u64, Ordering::Relaxed);
            warp::reply::json(&json!({}))
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(warp::serve(route).incoming(listener).run());
    Ok((addr, spans))
}

/// CPU time (user + system) a process has used, in µs, from `/proc`.
fn cpu_us(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // Linux reports these in USER_HZ, 100 per second on every supported platform.
    Some(ticks * 10_000)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize] as f64
}

pub async fn run(config: &tai_core::config::Config, a: BenchArgs) -> anyhow::Result<i32> {
    if !a.target && a.wip < a.prefetch {
        bail!(
            "--wip ({}) must be at least --prefetch ({})",
            a.wip,
            a.prefetch
        );
    }
    let (otlp, spans) = if a.otlp && !a.target {
        let (addr, spans) = otlp_sink().await?;
        (Some(addr), Some(spans))
    } else {
        (None, None)
    };
    let mut target = if a.target {
        existing(config)?
    } else {
        start_node(&a, otlp)?
    };
    let base = format!("http://{}", target.ingress);
    eprintln!(
        "bench: {} tenants, node at {}",
        target.tenants.len(),
        target.ingress
    );

    // Entitle every tenant's engine first: each tenant/SKU starts in boot.
    let entitled = Arc::new(AtomicU64::new(0));
    let chunks: Vec<Vec<(String, String)>> = target
        .tenants
        .chunks(target.tenants.len().div_ceil(a.concurrency.max(1)))
        .map(<[_]>::to_vec)
        .collect();
    let mut tasks = Vec::new();
    for chunk in chunks {
        let (base, sku, entitled) = (base.clone(), a.sku.clone(), entitled.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(&base);
            for (t, s) in chunk {
                let body = serde_json::to_vec(&json!({"tenant_id": t, "sku_id": sku, "kind": "entitlement", "payload": {"active": true}})).expect("json");
                if conn.post(&t, &s, body).await {
                    entitled.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    drained(&target, Duration::from_secs(300)).await?;
    let (_, warm_seq) = decision_times(&target, 0).await?;
    eprintln!(
        "bench: {} tenants entitled; loading for {} s",
        entitled.load(Ordering::Relaxed),
        a.duration
    );

    let baseline_before = if a.no_baseline {
        None
    } else {
        Some(baseline_run(&target.tenants, &a).await?)
    };
    let broker_before = if a.backend == "amqp" && !a.no_baseline {
        Some(bare_broker_loop(&a).await?)
    } else {
        None
    };

    let tag = format!("b{}", now_ms());
    let node_pid = target.child.as_ref().map(|c| c.id().to_string());
    let node_cpu0 = node_pid.as_deref().and_then(cpu_us);
    let client_cpu0 = cpu_us("self");
    let (accepted, took) = load(&base, &target.tenants, &a, &a.sku, &tag).await?;
    let load_end = now_ms();
    drained(&target, Duration::from_secs(600)).await?;
    let client_cpu = cpu_us("self").zip(client_cpu0).map(|(b, a)| b - a);
    let node_cpu = node_pid
        .as_deref()
        .and_then(cpu_us)
        .zip(node_cpu0)
        .map(|(b, a)| b - a);
    let (decided_at, _) = decision_times(&target, warm_seq).await?;
    let mut lat = Vec::with_capacity(accepted.len());
    let first_send = accepted.iter().map(|(_, s)| *s).min().unwrap_or(0);
    let mut last_decision = 0;
    for (id, sent) in &accepted {
        if let Some(at) = decided_at.get(id) {
            lat.push(at.saturating_sub(*sent));
            last_decision = last_decision.max(*at);
        }
    }
    lat.sort_unstable();
    let decided = lat.len();
    let decided_secs = (last_decision.max(load_end).saturating_sub(first_send)) as f64 / 1000.0;
    let rss = target.child.as_ref().and_then(|c| rss_mb(c.id()));

    // The bare endpoint after the node's load as before it: the two bracket
    // the node's run, so a machine that speeds up or slows down during the
    // run moves the baseline with it.
    let baseline_after = if a.no_baseline {
        None
    } else {
        Some(baseline_run(&target.tenants, &a).await?)
    };
    let (baseline_runs, baseline) = bracket(baseline_before, baseline_after);

    // The broker alone, in the same run, after the node's load as before it
    // (the two bracket the node's run, so a machine that speeds up or slows
    // down during the run moves the baseline with it).
    let broker_after = if broker_before.is_some() {
        Some(bare_broker_loop(&a).await?)
    } else {
        None
    };
    let (broker_runs, broker) = bracket(broker_before, broker_after);
    let decided_per_sec = decided as f64 / decided_secs.max(0.001);
    let report = json!({
        "backend": a.backend,
        "tenants": target.tenants.len(),
        "offered_rate": a.rate,
        "duration_secs": a.duration,
        "concurrency": a.concurrency,
        "sku": a.sku,
        "accepted": accepted.len(),
        "decided": decided,
        "accepted_per_sec": accepted.len() as f64 / took.as_secs_f64(),
        "decided_per_sec": decided_per_sec,
        "p50_ms": percentile(&lat, 0.50),
        "p99_ms": percentile(&lat, 0.99),
        "p999_ms": percentile(&lat, 0.999),
        "baseline_per_sec": baseline,
        "baseline_runs": baseline_runs,
        "rss_mb": rss,
        // CPU per decided signal from the first send to the queue drained:
        // the node's (when the bench started it) and this load generator's.
        "node_cpu_us_per_signal": node_cpu.map(|us| us as f64 / decided.max(1) as f64),
        "client_cpu_us_per_signal": client_cpu.map(|us| us as f64 / decided.max(1) as f64),
        "metrics": !a.no_metrics,
        "otlp_spans_received": spans.map(|s| s.load(Ordering::Relaxed)),
        "broker_baseline_per_sec": broker,
        "broker_baseline_runs": broker_runs,
        "broker_ratio": broker.map(|b| decided_per_sec / b),
    });
    if let Some(mut child) = target.child.take() {
        let _ = reqwest::Client::new()
            .post(format!("http://{}/admin/shutdown", target.operator))
            .bearer_auth(&target.admin_token)
            .send()
            .await;
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        if a.backend == "amqp" {
            if let Err(e) = tai_kanban::amqp::delete_topology(&a.amqp_url, &bench_queue()).await {
                eprintln!("bench: could not delete the bench queue: {e}");
            }
        }
    }
    if a.json {
        crate::client::outln!("{report}")?;
    } else {
        crate::client::outln!("{}", serde_json::to_string_pretty(&report)?)?;
    }
    if decided < accepted.len() {
        eprintln!(
            "bench: {} accepted signals have no decision receipt",
            accepted.len() - decided
        );
        return Ok(1);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::pace;
    use std::time::Duration;

    #[test]
    fn a_fixed_rate_is_spread_evenly_over_the_clients() {
        assert_eq!(pace(0, 64, 3), None, "no rate: as fast as they go");
        let period = Duration::from_micros(12_800);
        // Every send of the first period, all clients together: one every
        // 200 µs, each client once.
        let mut sends: Vec<Duration> = (0..64)
            .map(|c| {
                let (offset, p) = pace(5000, 64, c).unwrap();
                assert_eq!(p, period, "client {c}");
                offset
            })
            .collect();
        sends.sort();
        for (i, at) in sends.iter().enumerate() {
            let want = Duration::from_micros(200 * i as u64);
            let off = at.abs_diff(want);
            assert!(
                off < Duration::from_nanos(10),
                "send {i} at {at:?}, not {want:?}"
            );
        }
    }
}
