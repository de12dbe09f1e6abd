//! Node configuration (SPEC §10): TOML, overridden by `TAI_<SECTION>__<KEY>`
//! environment variables, checked whole.
//!
//! [`load`] is pure: it takes the file's text and the environment and returns
//! the config, or every problem found, each naming its key's path.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub const DEV_ADMIN_TOKEN: &str = "dev-admin-token";
pub const DEV_RECEIPT_KEY: &str = "dev-receipt-key";
pub const DEV_TENANT_SECRET: &str = "demo-secret";

/// The policies a SKU may list.
pub const KNOWN_POLICIES: &[&str] = &[
    "payment_fraud",
    "cost_governance",
    "permission_drift",
    "change_management",
    "compliance_audit",
    "deployment_safety",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Dev,
    Prod,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub ingress: IngressConfig,
    pub operator: OperatorConfig,
    pub kanban: KanbanConfig,
    pub jidoka: JidokaConfig,
    pub kaizen: KaizenConfig,
    pub andon: AndonConfig,
    pub alerts: AlertsConfig,
    pub tenants: Vec<TenantConfig>,
    pub skus: BTreeMap<String, SkuConfig>,
    pub executors: BTreeMap<String, ExecutorConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    pub mode: Mode,
    pub data_dir: PathBuf,
    /// How long a graceful shutdown may take before what is left is killed.
    pub shutdown_grace_secs: u64,
    /// The store's page cache, in MiB.
    pub store_cache_mb: u64,
    /// Both HTTP listeners close a connection whose request headers have
    /// not all arrived this long after it began waiting for them (an idle
    /// keep-alive connection too).
    pub header_read_timeout_secs: u64,
    /// Both HTTP listeners answer `408` and close a connection whose
    /// request body has not all arrived this long after its headers.
    pub body_read_timeout_secs: u64,
    /// Connections each HTTP listener (ingress, operator) holds open at
    /// once; at the bound it accepts no more until one closes. `tai serve`
    /// lowers it, saying so, when the open-file limit could not hold both
    /// listeners' connections and the store's files.
    pub max_connections: usize,
    /// Let the kernel back the node's heap with transparent huge pages.
    /// Off by default: the allocator asks for them (`MADV_HUGEPAGE`), and
    /// the kernel's khugepaged then fills every 2 MiB range the heap still
    /// touches, undoing the allocator's return of freed memory, so an idle
    /// node's resident memory creeps up to its past peak (BENCHMARKS.md,
    /// session 35). On, the node is ~3 % faster per signal.
    pub transparent_huge_pages: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            mode: Mode::Dev,
            data_dir: PathBuf::from("./data"),
            shutdown_grace_secs: 30,
            store_cache_mb: 32,
            header_read_timeout_secs: 30,
            body_read_timeout_secs: 30,
            max_connections: 8192,
            transparent_huge_pages: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngressConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub replay_window_secs: u64,
    /// Signatures the replay cache may hold. Unset: what the global rate
    /// limit can admit while a signature stays, so the window holds for
    /// every admitted request and the rate limit bounds the memory (see
    /// [`IngressConfig::replay_cache_entries`]).
    pub replay_cache_max_entries: Option<u64>,
    pub rate_limits: RateLimits,
}

impl IngressConfig {
    /// The replay cache's bound: `replay_cache_max_entries`, else
    /// `global_per_sec × (2 × replay_window_secs + 61)`. A signature stays
    /// until its request's minute has left the window: up to the window
    /// plus 60 s after it came with a timestamp of its arrival, twice the
    /// window plus 60 s with one a window ahead of the node's clock; and
    /// the global limit admits a second's worth of burst on top of its rate.
    pub fn replay_cache_entries(&self) -> usize {
        let derived = || {
            let stays = self.replay_window_secs.saturating_mul(2).saturating_add(61);
            u64::from(self.rate_limits.global_per_sec).saturating_mul(stays)
        };
        let n = self.replay_cache_max_entries.unwrap_or_else(derived);
        usize::try_from(n).unwrap_or(usize::MAX)
    }
}

impl Default for IngressConfig {
    fn default() -> Self {
        IngressConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 65536,
            replay_window_secs: 300,
            replay_cache_max_entries: None,
            rate_limits: RateLimits::default(),
        }
    }
}

/// Signals per second, GCRA with a burst of one second's worth.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    pub global_per_sec: u32,
    pub trial_per_sec: u32,
    pub standard_per_sec: u32,
    pub enterprise_per_sec: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            global_per_sec: 50_000,
            trial_per_sec: 10,
            standard_per_sec: 100,
            enterprise_per_sec: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OperatorConfig {
    pub listen: SocketAddr,
    pub admin_token: String,
    /// Defaults to true in dev mode, false in prod.
    pub fault_injection: Option<bool>,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        OperatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            admin_token: DEV_ADMIN_TOKEN.to_string(),
            fault_injection: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueBackend {
    Embedded,
    Amqp,
}

/// RabbitMQ queue type of the work queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AmqpQueueType {
    Classic,
    Quorum,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KanbanConfig {
    pub backend: QueueBackend,
    pub amqp_url: String,
    /// The work queue's name; its dead-letter exchange and queue are this
    /// name with `.deadletter`.
    pub amqp_queue: String,
    pub amqp_queue_type: AmqpQueueType,
    /// Signals held in the local fallback buffer while the broker is down;
    /// past this, ingress answers 503.
    pub buffer_max: u64,
    pub prefetch: u32,
    pub wip_limit: u32,
    /// Signals queued beyond this are refused with 503 (back-pressure).
    pub max_depth: u64,
    /// How long an engine may hold a signal undecided before it is sent
    /// again with an attempt counted (a signal parked for its entitlement
    /// is exempt).
    pub visibility_secs: u64,
}

impl Default for KanbanConfig {
    fn default() -> Self {
        KanbanConfig {
            backend: QueueBackend::Embedded,
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_string(),
            amqp_queue: "tai2030.signals".to_string(),
            amqp_queue_type: AmqpQueueType::Classic,
            buffer_max: 100_000,
            prefetch: 10,
            wip_limit: 50,
            max_depth: 1_000_000,
            visibility_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JidokaConfig {
    /// An engine idle this long is checkpointed and stopped.
    pub idle_timeout_secs: u64,
    /// Live engines beyond this are passivated, least recently used first.
    pub max_active_engines: usize,
    /// Wall-clock budget of one Rego evaluation: past it the policy denies
    /// (fail closed) and the engine moves on.
    pub rego_timeout_ms: u64,
}

impl Default for JidokaConfig {
    fn default() -> Self {
        JidokaConfig {
            idle_timeout_secs: 300,
            max_active_engines: 2_000,
            rego_timeout_ms: 100,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KaizenConfig {
    pub otlp_endpoint: Option<String>,
    /// Share of new traces exported (0 to 1); a client's sampled
    /// `traceparent` is always followed.
    pub trace_sample_ratio: f64,
    /// Prometheus metrics at `/metrics` (off: no recorder, `/metrics` 404;
    /// for measuring what metrics cost).
    pub metrics: bool,
    /// Distinct tenant label values kept in metrics; the rest become "other".
    pub tenant_label_cap: usize,
    /// The node's memory limit (e.g. the unit's `MemoryMax=`): RSS over 80 %
    /// of it raises the `memory_high` alert. 0 turns the check off.
    pub memory_limit_mb: u64,
    /// Free space on the data dir's filesystem below this raises the
    /// `disk_low` alert (the node stops when a write finds the disk full).
    /// 0 turns the check off.
    pub disk_free_min_mb: u64,
}

impl Default for KaizenConfig {
    fn default() -> Self {
        KaizenConfig {
            otlp_endpoint: None,
            trace_sample_ratio: 0.1,
            metrics: true,
            tenant_label_cap: 100,
            memory_limit_mb: 2048,
            disk_free_min_mb: 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AndonConfig {
    pub signing_key_id: String,
    pub signing_keys: BTreeMap<String, String>,
}

impl Default for AndonConfig {
    fn default() -> Self {
        AndonConfig {
            signing_key_id: "dev-1".to_string(),
            signing_keys: BTreeMap::from([("dev-1".to_string(), DEV_RECEIPT_KEY.to_string())]),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Critical,
    Warning,
    Info,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    Log,
    Webhook,
    Slack,
    Pagerduty,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    pub name: String,
    pub kind: ChannelKind,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default = "all_severities")]
    pub severities: Vec<Severity>,
    /// PagerDuty: the integration's routing key.
    #[serde(default)]
    pub routing_key: Option<String>,
}

fn all_severities() -> Vec<Severity> {
    vec![Severity::Critical, Severity::Warning, Severity::Info]
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    pub dedupe_window_secs: u64,
    pub channels: Vec<ChannelConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            dedupe_window_secs: 60,
            channels: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Trial,
    #[default]
    Standard,
    Enterprise,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub id: String,
    pub secrets: Vec<String>,
    #[serde(default)]
    pub tier: Tier,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SkuConfig {
    pub policies: Vec<String>,
    pub quota: u64,
    pub quota_period_secs: u64,
    pub entitlement_timeout_secs: u64,
    pub executor: String,
    /// Policy thresholds, e.g. `params.payment_fraud = { amount_threshold = 5000 }`.
    pub params: BTreeMap<String, serde_json::Value>,
    /// Custom policies: `.rego` files, relative to the node's working directory.
    pub rego: Vec<String>,
}

impl Default for SkuConfig {
    fn default() -> Self {
        SkuConfig {
            policies: Vec::new(),
            quota: 1000,
            quota_period_secs: 3600,
            entitlement_timeout_secs: 30,
            executor: "log".to_string(),
            params: BTreeMap::new(),
            rego: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutorKind {
    Log,
    Webhook,
    /// A staged rollout through a deploy webhook, each stage health-checked.
    Rollout,
}

/// One stage of a rollout: its name and the share of traffic it takes.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    pub name: String,
    pub percent: u32,
}

fn default_stages() -> Vec<StageConfig> {
    [("canary", 5), ("staging", 25), ("prod", 100)]
        .into_iter()
        .map(|(name, percent)| StageConfig {
            name: name.into(),
            percent,
        })
        .collect()
}
fn default_max_error_rate() -> f64 {
    0.05
}
fn default_max_p99_ms() -> f64 {
    1000.0
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorConfig {
    pub kind: ExecutorKind,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    #[serde(default = "default_reset_timeout_secs")]
    pub reset_timeout_secs: u64,
    #[serde(default = "default_success_threshold")]
    pub success_threshold: u32,
    /// Cap of the open time, which doubles on repeated trips (default 16 × `reset_timeout_secs`).
    #[serde(default)]
    pub max_reset_timeout_secs: Option<u64>,
    /// Also open when this share of the last `window_calls` calls failed
    /// (once `minimum_calls` are in the window). Off unless set.
    #[serde(default)]
    pub failure_rate_pct: Option<u32>,
    #[serde(default = "default_window_calls")]
    pub window_calls: u32,
    #[serde(default = "default_minimum_calls")]
    pub minimum_calls: u32,
    /// A call at least this slow counts as a failure. Off unless set.
    #[serde(default)]
    pub slow_call_ms: Option<u64>,
    /// Rollout: where each stage's health is read (`GET`, answers
    /// `{"error_rate", "p99_ms"}`).
    #[serde(default)]
    pub health_url: Option<String>,
    /// Rollout: the stages, in order (default canary 5 % → staging 25 % → prod 100 %).
    #[serde(default = "default_stages")]
    pub stages: Vec<StageConfig>,
    /// Rollout: regions, one after another (default: one region, `default`).
    #[serde(default)]
    pub regions: Vec<String>,
    /// Rollout: a stage over either threshold is rolled back.
    #[serde(default = "default_max_error_rate")]
    pub max_error_rate: f64,
    #[serde(default = "default_max_p99_ms")]
    pub max_p99_ms: f64,
}

fn default_timeout_ms() -> u64 {
    2000
}
fn default_failure_threshold() -> u32 {
    5
}
fn default_reset_timeout_secs() -> u64 {
    30
}
fn default_success_threshold() -> u32 {
    3
}
fn default_window_calls() -> u32 {
    20
}
fn default_minimum_calls() -> u32 {
    10
}

impl Config {
    /// Fault injection is on by default in dev, off in prod.
    pub fn fault_injection(&self) -> bool {
        self.operator
            .fault_injection
            .unwrap_or(self.node.mode == Mode::Dev)
    }
}

/// One problem with the configuration, at a key's path such as `ingress.listen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

fn err(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.into(),
        message: message.into(),
    }
}

/// An override from the environment, once read.
struct Override {
    var: String,
    /// Its key, lower-cased, split at `__`.
    path: Vec<String>,
    /// Its key as errors name it (`tenants[0].secrets`), once set.
    shown: String,
    raw: String,
}

/// The `TAI_` variables of `env` that override keys, and the ones that
/// look meant to but do not: a key left empty (`TAI_KANBAN__`), or a
/// section joined to its key by one underscore (`TAI_INGRESS_LISTEN`),
/// which would otherwise be ignored while the node runs on the file's
/// value. Other `TAI_` variables are not the node's business.
fn overrides(
    env: impl IntoIterator<Item = (String, String)>,
    schema: &std::cell::OnceCell<toml::Value>,
) -> (Vec<Override>, Vec<ConfigError>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix("TAI_") else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if path.len() > 1 {
            if path.iter().any(String::is_empty) {
                errors.push(err(
                    "",
                    format!("{var}: an empty key (a section and each key below it are joined by two underscores)"),
                ));
            } else {
                out.push(Override {
                    var,
                    path,
                    shown: String::new(),
                    raw,
                });
            }
            continue;
        }
        let sections = schema.get_or_init(defaults);
        let lower = rest.to_ascii_lowercase();
        if sections.get(lower.as_str()).is_some() {
            out.push(Override {
                var,
                path,
                shown: String::new(),
                raw,
            });
        } else if let Some(s) = sections
            .as_table()
            .into_iter()
            .flat_map(|t| t.keys())
            .find(|s| lower.len() > s.len() + 1 && lower.starts_with(&format!("{s}_")))
        {
            errors.push(err(
                "",
                format!(
                    "{var}: not an override: a section and its key are joined by two underscores (TAI_{}__{})",
                    s.to_ascii_uppercase(),
                    &rest[s.len() + 1..]
                ),
            ));
        }
    }
    errors.sort_by(|a, b| a.message.cmp(&b.message));
    // In key order, indices by number, so that an override of a whole
    // list comes before one of its elements and element 2 before 10.
    out.sort_by(|a, b| {
        let seg = |s: &String| (s.parse::<u64>().ok(), s.clone());
        a.path.iter().map(seg).cmp(b.path.iter().map(seg))
    });
    (out, errors)
}

/// The built-in config as a TOML tree: which sections exist, and which
/// keys hold lists (an override `TAI_TENANTS__0__ID` on a file without
/// `tenants` starts the list).
fn defaults() -> toml::Value {
    toml::Value::try_from(Config::default()).unwrap_or(toml::Value::Table(toml::Table::new()))
}

/// Parses `text`, applies `TAI_<SECTION>__<KEY>` overrides from `env`, and
/// checks the result, returning every problem at once.
pub fn load(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, Vec<ConfigError>> {
    // The built-in config's tree, made once and only when an override needs it.
    let schema = std::cell::OnceCell::new();
    let (mut env, mut errors) = overrides(env, &schema);
    // The usual case: no overrides and a good file, parsed straight into the
    // typed config (no intermediate tree; it matters for 100k tenants).
    if env.is_empty() && errors.is_empty() {
        if let Ok(config) = toml::from_str::<Config>(text) {
            validate(&config, &mut errors);
            return if errors.is_empty() {
                Ok(config)
            } else {
                Err(errors)
            };
        }
    }
    let mut root = match text.parse::<toml::Table>() {
        Ok(t) => toml::Value::Table(t),
        Err(e) => return Err(vec![err("", format!("not valid TOML: {e}"))]),
    };
    let schema = schema.get_or_init(defaults);
    for o in &mut env {
        match set_path(&mut root, schema, &o.path, parse_env_value(&o.raw)) {
            Ok(shown) => o.shown = shown,
            Err((shown, message)) => errors.push(err(shown, format!("{message} (from {})", o.var))),
        }
    }
    // The override that set `path` or the nearest table or list above it
    // (`TAI_TENANTS__0__TIER` rather than `TAI_TENANTS` for `tenants[0].tier`).
    let set_by = |path: &str| {
        env.iter()
            .filter(|o| {
                !o.shown.is_empty()
                    && path
                        .strip_prefix(o.shown.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
            })
            .max_by_key(|o| o.shown.len())
    };

    // serde stops at the first problem: note it, take the offending key out
    // (the default applies), and go again, so every problem is reported.
    let mut config = None;
    let mut removed = Removed::default();
    for _ in 0..200 {
        match serde_path_to_error::deserialize::<_, Config>(root.clone()) {
            Ok(c) => {
                config = Some(c);
                break;
            }
            Err(e) => {
                let segments: Vec<_> = e.path().iter().cloned().collect();
                let inner = e.inner().to_string();
                let inner = inner.lines().next().unwrap_or_default().to_string();
                // An unknown key is reported at its own path.
                let (path, message, removal) = match unknown_field(&inner) {
                    Some(field) => {
                        let mut removal = segments.clone();
                        if !matches!(removal.last(), Some(serde_path_to_error::Segment::Map { key }) if key == &field)
                        {
                            removal.push(serde_path_to_error::Segment::Map { key: field.clone() });
                        }
                        (
                            removed.display(&removal),
                            "unknown key".to_string(),
                            removal,
                        )
                    }
                    None => (removed.display(&segments), inner, segments),
                };
                // An override is TOML when it reads as TOML; where the key
                // wants another type (a token of digits, a secret `true`),
                // it is the variable's text.
                if let Some(o) = set_by(&path).filter(|o| o.shown == path) {
                    if message.starts_with("invalid type:") {
                        if let Some(v) = value_at(&mut root, &removal) {
                            if !v.is_str() {
                                *v = toml::Value::String(o.raw.clone());
                                continue;
                            }
                        }
                    }
                }
                // A field taken out for its bad value is not missing too.
                let consequence = missing_field(&message).is_some_and(|f| {
                    let field = match path.as_str() {
                        "" => f.to_string(),
                        parent => format!("{parent}.{f}"),
                    };
                    errors.iter().any(|e| e.path == field)
                });
                if !consequence {
                    errors.push(err(path, message));
                }
                if removal.is_empty() || !remove_path(&mut root, &removal) {
                    break;
                }
                removed.note(&removal);
            }
        }
    }
    if let Some(config) = &config {
        validate(config, &mut errors);
    }
    // A problem with what a variable set names the variable. An unknown
    // key that no variable set at or above is a table only variables made
    // (`TAI_FOO__BAR` makes `foo`): those under it are named, since the
    // file has no `foo` to look for. A check against another key
    // (`must be at least kanban.prefetch`) names the variable that set that
    // one too.
    for e in &mut errors {
        let mut vars: Vec<&str> = match set_by(&e.path) {
            Some(o) => vec![o.var.as_str()],
            None if e.message == "unknown key" => env
                .iter()
                .filter(|o| {
                    o.shown
                        .strip_prefix(e.path.as_str())
                        .is_some_and(|rest| rest.starts_with(['.', '[']))
                })
                .map(|o| o.var.as_str())
                .collect(),
            None => Vec::new(),
        };
        for o in env.iter().filter(|o| names_key(&e.message, &o.shown)) {
            if !vars.contains(&o.var.as_str()) {
                vars.push(&o.var);
            }
        }
        vars.retain(|v| !e.message.contains(v));
        if !vars.is_empty() {
            e.message = format!("{} (from {})", e.message, vars.join(", "));
        }
    }
    match config {
        Some(config) if errors.is_empty() => Ok(config),
        _ => Err(errors),
    }
}

/// Whether `message` names the key `path` (`kanban.prefetch`) as a whole,
/// not as the start of a longer one.
fn names_key(message: &str, path: &str) -> bool {
    !path.is_empty()
        && message.match_indices(path).any(|(i, _)| {
            let before = message[..i].chars().next_back();
            let after = message[i + path.len()..].chars().next();
            let part = |c: Option<char>| {
                c.is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '['))
            };
            !part(before) && !part(after)
        })
}

fn missing_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("missing field `")?;
    Some(&rest[..rest.find('`')?])
}

fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

/// Array elements taken out while collecting errors, so that later errors
/// still name the element's index in the file.
#[derive(Default)]
struct Removed(BTreeMap<String, Vec<usize>>);

impl Removed {
    fn original(&self, array: &str, index: usize) -> usize {
        let mut o = index;
        for r in self.0.get(array).into_iter().flatten() {
            if *r <= o {
                o += 1;
            }
        }
        o
    }

    fn note(&mut self, segments: &[serde_path_to_error::Segment]) {
        if let Some((serde_path_to_error::Segment::Seq { index }, parents)) = segments.split_last()
        {
            let array = self.display(parents);
            let o = self.original(&array, *index);
            let list = self.0.entry(array).or_default();
            list.push(o);
            list.sort_unstable();
        }
    }

    fn display(&self, segments: &[serde_path_to_error::Segment]) -> String {
        display_path(segments, |array, index| self.original(array, index))
    }
}

fn display_path(
    segments: &[serde_path_to_error::Segment],
    original: impl Fn(&str, usize) -> usize,
) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for s in segments {
        match s {
            Segment::Seq { index } => {
                let o = original(&out, *index);
                out.push_str(&format!("[{o}]"))
            }
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Enum { variant } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(variant);
            }
            Segment::Unknown => out.push_str(".?"),
        }
    }
    out
}

/// The value at `segments` in `root`, if there is one.
fn value_at<'a>(
    root: &'a mut toml::Value,
    segments: &[serde_path_to_error::Segment],
) -> Option<&'a mut toml::Value> {
    use serde_path_to_error::Segment;
    let mut cur = root;
    for s in segments {
        cur = match (s, cur) {
            (Segment::Map { key }, toml::Value::Table(t)) => t.get_mut(key)?,
            (Segment::Seq { index }, toml::Value::Array(a)) => a.get_mut(*index)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn remove_path(root: &mut toml::Value, segments: &[serde_path_to_error::Segment]) -> bool {
    use serde_path_to_error::Segment;
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    match (last, value_at(root, parents)) {
        (Segment::Map { key }, Some(toml::Value::Table(t))) => t.remove(key).is_some(),
        (Segment::Seq { index }, Some(toml::Value::Array(a))) if *index < a.len() => {
            a.remove(*index);
            true
        }
        _ => false,
    }
}

/// An override's value: TOML if it parses as a TOML value (numbers, booleans,
/// arrays), else the plain string.
fn parse_env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// Sets `value` at `path` in `root`, making the tables (and, where the
/// built-in config has a list, the lists) on the way. A list's element is
/// named by its index: an element it has, or the next one, which adds it.
/// Returns the key as errors name it (`tenants[0].secrets`), or that and
/// why it cannot be set.
fn set_path(
    root: &mut toml::Value,
    schema: &toml::Value,
    path: &[String],
    value: toml::Value,
) -> Result<String, (String, String)> {
    let mut shown = String::new();
    let mut cur = root;
    let mut schema = Some(schema);
    let mut value = Some(value);
    for (i, seg) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        match cur {
            toml::Value::Table(t) => {
                if !shown.is_empty() {
                    shown.push('.');
                }
                shown.push_str(seg);
                let below = schema.and_then(|s| s.get(seg.as_str()));
                if last {
                    t.insert(seg.clone(), value.take().expect("set once"));
                    return Ok(shown);
                }
                let list = below.is_some_and(toml::Value::is_array);
                cur = t.entry(seg.clone()).or_insert_with(|| {
                    if list {
                        toml::Value::Array(Vec::new())
                    } else {
                        toml::Value::Table(toml::Table::new())
                    }
                });
                schema = below;
            }
            toml::Value::Array(a) => {
                let Ok(index) = seg.parse::<usize>() else {
                    return Err((
                        shown.clone(),
                        format!("{shown} is a list: name an element by its index (0, 1, ...), not {seg:?}"),
                    ));
                };
                if index > a.len() {
                    return Err((
                        format!("{shown}[{index}]"),
                        format!("{shown} has {} element(s): an override can change one of them or add the next, [{}]", a.len(), a.len()),
                    ));
                }
                shown.push_str(&format!("[{index}]"));
                schema = schema
                    .and_then(toml::Value::as_array)
                    .and_then(|a| a.first());
                if index == a.len() {
                    a.push(toml::Value::Table(toml::Table::new()));
                }
                if last {
                    a[index] = value.take().expect("set once");
                    return Ok(shown);
                }
                cur = &mut a[index];
            }
            _ => {
                return Err((
                    shown.clone(),
                    format!("{shown} is a value, not a table: it has no key {seg:?}"),
                ))
            }
        }
    }
    Err((shown, "empty key".into()))
}

fn valid_id(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn validate(c: &Config, errors: &mut Vec<ConfigError>) {
    let prod = c.node.mode == Mode::Prod;
    if c.operator.admin_token.len() < 8 {
        errors.push(err("operator.admin_token", "must be at least 8 characters"));
    }
    if prod && c.operator.admin_token == DEV_ADMIN_TOKEN {
        errors.push(err(
            "operator.admin_token",
            "the built-in dev token is refused in prod mode",
        ));
    }
    if c.ingress.max_body_bytes == 0 {
        errors.push(err("ingress.max_body_bytes", "must be greater than 0"));
    }
    if c.ingress.replay_window_secs == 0 {
        errors.push(err("ingress.replay_window_secs", "must be greater than 0"));
    }
    if c.ingress.replay_cache_max_entries == Some(0) {
        errors.push(err(
            "ingress.replay_cache_max_entries",
            "must be greater than 0 (leave it out to size it from the global rate limit)",
        ));
    }
    let rl = &c.ingress.rate_limits;
    for (key, v) in [
        ("global_per_sec", rl.global_per_sec),
        ("trial_per_sec", rl.trial_per_sec),
        ("standard_per_sec", rl.standard_per_sec),
        ("enterprise_per_sec", rl.enterprise_per_sec),
    ] {
        if v == 0 {
            errors.push(err(
                format!("ingress.rate_limits.{key}"),
                "must be greater than 0",
            ));
        }
    }
    if c.kanban.visibility_secs == 0 {
        errors.push(err("kanban.visibility_secs", "must be greater than 0"));
    }
    if c.kanban.prefetch == 0 {
        errors.push(err("kanban.prefetch", "must be greater than 0"));
    }
    if c.kanban.wip_limit == 0 {
        // Nothing would ever be dispatched: every signal accepted, none decided.
        errors.push(err("kanban.wip_limit", "must be greater than 0"));
    } else if c.kanban.wip_limit < c.kanban.prefetch {
        errors.push(err(
            "kanban.wip_limit",
            format!("must be at least kanban.prefetch ({})", c.kanban.prefetch),
        ));
    }
    if c.node.header_read_timeout_secs == 0 {
        errors.push(err(
            "node.header_read_timeout_secs",
            "must be greater than 0",
        ));
    }
    if c.node.body_read_timeout_secs == 0 {
        errors.push(err("node.body_read_timeout_secs", "must be greater than 0"));
    }
    if c.node.max_connections == 0 {
        errors.push(err("node.max_connections", "must be greater than 0"));
    }
    if c.node.store_cache_mb == 0 {
        errors.push(err("node.store_cache_mb", "must be greater than 0"));
    }
    if c.kanban.max_depth == 0 {
        errors.push(err("kanban.max_depth", "must be greater than 0"));
    }
    if !(0.0..=1.0).contains(&c.kaizen.trace_sample_ratio) {
        errors.push(err("kaizen.trace_sample_ratio", "must be between 0 and 1"));
    }
    if c.kanban.backend == QueueBackend::Amqp {
        if !c.kanban.amqp_url.starts_with("amqp://") {
            errors.push(err(
                "kanban.amqp_url",
                format!(
                    "{:?} is not an amqp:// URL (amqps is not built into this node)",
                    c.kanban.amqp_url
                ),
            ));
        }
        if c.kanban.amqp_queue.is_empty() || c.kanban.amqp_queue.len() > 200 {
            errors.push(err("kanban.amqp_queue", "must be 1 to 200 characters"));
        }
        if c.kanban.buffer_max == 0 {
            errors.push(err("kanban.buffer_max", "must be greater than 0"));
        }
        if c.kanban.prefetch > u32::from(u16::MAX) {
            errors.push(err(
                "kanban.prefetch",
                "must be at most 65535 with the amqp backend (basic.qos)",
            ));
        }
    }
    if c.jidoka.idle_timeout_secs == 0 {
        // 0 would passivate every engine at the next check after each
        // signal (every 100 ms), a start and a checkpoint per signal.
        errors.push(err(
            "jidoka.idle_timeout_secs",
            "must be greater than 0 (seconds an engine may idle before it is passivated)",
        ));
    }
    if c.jidoka.max_active_engines == 0 {
        errors.push(err("jidoka.max_active_engines", "must be greater than 0"));
    }
    if !(1..=60_000).contains(&c.jidoka.rego_timeout_ms) {
        errors.push(err("jidoka.rego_timeout_ms", "must be 1 to 60000"));
    }
    if !c.andon.signing_keys.contains_key(&c.andon.signing_key_id) {
        errors.push(err(
            "andon.signing_key_id",
            format!(
                "{:?} is not a key of andon.signing_keys",
                c.andon.signing_key_id
            ),
        ));
    }
    for (id, key) in &c.andon.signing_keys {
        if key.is_empty() {
            errors.push(err(format!("andon.signing_keys.{id}"), "must not be empty"));
        }
        if prod && key == DEV_RECEIPT_KEY {
            errors.push(err(
                format!("andon.signing_keys.{id}"),
                "the built-in dev key is refused in prod mode",
            ));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, t) in c.tenants.iter().enumerate() {
        if !valid_id(&t.id, 64) {
            errors.push(err(
                format!("tenants[{i}].id"),
                "must be 1-64 characters [A-Za-z0-9._-]",
            ));
        }
        if !seen.insert(t.id.as_str()) {
            errors.push(err(
                format!("tenants[{i}].id"),
                format!("duplicate tenant {:?}", t.id),
            ));
        }
        if t.secrets.is_empty() {
            errors.push(err(
                format!("tenants[{i}].secrets"),
                "needs at least one secret",
            ));
        }
        for (j, s) in t.secrets.iter().enumerate() {
            if s.is_empty() {
                errors.push(err(
                    format!("tenants[{i}].secrets[{j}]"),
                    "must not be empty",
                ));
            }
            if prod && s == DEV_TENANT_SECRET {
                errors.push(err(
                    format!("tenants[{i}].secrets[{j}]"),
                    "the built-in dev secret is refused in prod mode",
                ));
            }
        }
    }
    for (name, sku) in &c.skus {
        if !valid_id(name, 64) {
            errors.push(err(
                format!("skus.{name}"),
                "SKU names must be 1-64 characters [A-Za-z0-9._-]",
            ));
        }
        if sku.quota_period_secs == 0 {
            errors.push(err(
                format!("skus.{name}.quota_period_secs"),
                "must be greater than 0",
            ));
        }
        for (i, p) in sku.policies.iter().enumerate() {
            if !KNOWN_POLICIES.contains(&p.as_str()) {
                errors.push(err(
                    format!("skus.{name}.policies[{i}]"),
                    format!(
                        "unknown policy {p:?}, expected one of {}",
                        KNOWN_POLICIES.join(", ")
                    ),
                ));
            }
        }
        if sku.executor != "log" && !c.executors.contains_key(&sku.executor) {
            errors.push(err(
                format!("skus.{name}.executor"),
                format!(
                    "{:?} is neither \"log\" nor an [executors] table",
                    sku.executor
                ),
            ));
        }
    }
    for (name, ex) in &c.executors {
        let mut urls = vec![("url", ex.url.as_deref())];
        if ex.kind == ExecutorKind::Rollout {
            urls.push(("health_url", ex.health_url.as_deref()));
            if ex.stages.is_empty() || ex.stages.iter().any(|s| s.percent == 0 || s.percent > 100) {
                errors.push(err(
                    format!("executors.{name}.stages"),
                    "a rollout needs stages with percent between 1 and 100",
                ));
            }
        }
        for (key, url) in urls.into_iter().filter(|_| ex.kind != ExecutorKind::Log) {
            let needs = || format!("a {:?} executor needs {key}", ex.kind).to_lowercase();
            if let Some(problem) = url_problem(url, needs) {
                errors.push(err(format!("executors.{name}.{key}"), problem));
            }
        }
        if ex.timeout_ms == 0 {
            errors.push(err(
                format!("executors.{name}.timeout_ms"),
                "must be greater than 0",
            ));
        }
        if ex.failure_rate_pct.is_some_and(|p| p == 0 || p > 100) {
            errors.push(err(
                format!("executors.{name}.failure_rate_pct"),
                "must be between 1 and 100",
            ));
        }
        if ex.window_calls == 0 || ex.minimum_calls == 0 || ex.minimum_calls > ex.window_calls {
            errors.push(err(
                format!("executors.{name}.minimum_calls"),
                "window_calls and minimum_calls must be greater than 0, minimum_calls at most window_calls",
            ));
        }
        if ex.failure_threshold == 0 {
            errors.push(err(
                format!("executors.{name}.failure_threshold"),
                "must be greater than 0",
            ));
        }
        if ex.success_threshold == 0 {
            errors.push(err(
                format!("executors.{name}.success_threshold"),
                "must be greater than 0",
            ));
        }
    }
    let mut names = std::collections::HashSet::new();
    for (i, ch) in c.alerts.channels.iter().enumerate() {
        if ch.name.is_empty() {
            errors.push(err(
                format!("alerts.channels[{i}].name"),
                "must not be empty",
            ));
        } else if !names.insert(ch.name.as_str()) {
            errors.push(err(
                format!("alerts.channels[{i}].name"),
                format!("{:?} names another channel too", ch.name),
            ));
        }
        if ch.kind != ChannelKind::Log {
            let needs = || "this channel kind needs a url".to_string();
            if let Some(problem) = url_problem(ch.url.as_deref(), needs) {
                errors.push(err(format!("alerts.channels[{i}].url"), problem));
            }
        }
        if ch.kind == ChannelKind::Pagerduty && ch.routing_key.as_deref().is_none_or(str::is_empty)
        {
            errors.push(err(
                format!("alerts.channels[{i}].routing_key"),
                "a pagerduty channel needs the routing key of its integration",
            ));
        }
    }
}

/// Why a `url` that must be there cannot be called over HTTP, if it cannot
/// (absent or empty: `needs()`): found at start, not when the first action
/// or alert is sent.
fn url_problem(url: Option<&str>, needs: impl FnOnce() -> String) -> Option<String> {
    let Some(url) = url.filter(|u| !u.is_empty()) else {
        return Some(needs());
    };
    match url::Url::parse(url) {
        Err(e) => Some(format!("{url:?} is not a URL: {e}")),
        Ok(u) if !matches!(u.scheme(), "http" | "https") => {
            Some(format!("{url:?} is not an http:// or https:// URL"))
        }
        Ok(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each problem as (key, message), for comparing with what is expected.
    fn pairs(errors: &[ConfigError]) -> Vec<(&str, &str)> {
        errors
            .iter()
            .map(|e| (e.path.as_str(), e.message.as_str()))
            .collect()
    }

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn empty_config_is_the_dev_default() {
        let c = load("", no_env()).unwrap();
        assert_eq!(c.node.mode, Mode::Dev);
        assert_eq!(c.ingress.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.operator.listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.kanban.prefetch, 10);
        assert_eq!(c.kanban.wip_limit, 50);
        assert!(c.fault_injection());
    }

    #[test]
    fn every_unknown_key_and_bad_value_is_reported_with_its_path() {
        let text = r#"
            [node]
            mode = "staging"
            colour = "blue"
            [ingress]
            listen = "not an address"
            max_body_bytes = "big"
            [ingress.rate_limits]
            global_per_sec = -1
            [kanban]
            prefetch = 10
            wip_limt = 5
            [[tenants]]
            id = "demo"
            secrets = ["s3cret"]
            tier = "gold"
            [surprise]
            x = 1
        "#;
        let errors = load(text, no_env()).unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "node.mode",
            "node.colour",
            "ingress.listen",
            "ingress.max_body_bytes",
            "ingress.rate_limits.global_per_sec",
            "kanban.wip_limt",
            "tenants[0].tier",
            "surprise",
        ] {
            assert!(paths.contains(&want), "{want} missing from {errors:?}");
        }
        let unknown = errors.iter().find(|e| e.path == "node.colour").unwrap();
        assert_eq!(unknown.message, "unknown key");
    }

    #[test]
    fn environment_overrides_any_key() {
        let env = vec![
            ("TAI_INGRESS__LISTEN".to_string(), "127.0.0.1:0".to_string()),
            ("TAI_KANBAN__WIP_LIMIT".to_string(), "200".to_string()),
            (
                "TAI_INGRESS__RATE_LIMITS__GLOBAL_PER_SEC".to_string(),
                "7".to_string(),
            ),
            (
                "TAI_OPERATOR__FAULT_INJECTION".to_string(),
                "false".to_string(),
            ),
            (
                "TAI_UNRELATED".to_string(),
                "ignored: no section separator".to_string(),
            ),
        ];
        let c = load("[kanban]\nwip_limit = 50\n", env).unwrap();
        assert_eq!(c.ingress.listen.port(), 0);
        assert_eq!(c.kanban.wip_limit, 200);
        assert_eq!(c.ingress.rate_limits.global_per_sec, 7);
        assert!(!c.fault_injection());
    }

    #[test]
    fn a_zero_visibility_is_refused_by_name() {
        let errors = load("[kanban]\nvisibility_secs = 0\n", vec![]).unwrap_err();
        assert_eq!(
            pairs(&errors)[0],
            ("kanban.visibility_secs", "must be greater than 0")
        );
        let c = load("", vec![]).unwrap();
        assert_eq!(c.kanban.visibility_secs, 60);
    }

    #[test]
    fn the_replay_cache_holds_the_window_at_the_global_rate_unless_bounded() {
        // Unset: a signature stays up to twice the window and a minute, at
        // most the global rate limit's worth of them per second (and its burst).
        let c = load("[ingress.rate_limits]\nglobal_per_sec = 1000\n", vec![]).unwrap();
        assert_eq!(c.ingress.replay_cache_entries(), 1000 * (600 + 61));
        let c = load(
            "[ingress]\nreplay_window_secs = 60\n[ingress.rate_limits]\nglobal_per_sec = 7\n",
            vec![],
        )
        .unwrap();
        assert_eq!(c.ingress.replay_cache_entries(), 7 * 181);
        let env = vec![(
            "TAI_INGRESS__REPLAY_CACHE_MAX_ENTRIES".to_string(),
            "5000".to_string(),
        )];
        let c = load("", env).unwrap();
        assert_eq!(c.ingress.replay_cache_entries(), 5000);
        let errors = load("[ingress]\nreplay_cache_max_entries = 0\n", vec![]).unwrap_err();
        assert_eq!(pairs(&errors)[0].0, "ingress.replay_cache_max_entries");
        assert!(pairs(&errors)[0].1.starts_with("must be greater than 0"));
    }

    #[test]
    fn an_idle_timeout_of_zero_is_refused_by_name() {
        let errors = load("[jidoka]\nidle_timeout_secs = 0\n", vec![]).unwrap_err();
        assert_eq!(pairs(&errors)[0].0, "jidoka.idle_timeout_secs");
        assert!(pairs(&errors)[0].1.starts_with("must be greater than 0"));
        let env = vec![("TAI_JIDOKA__IDLE_TIMEOUT_SECS".to_string(), "1".to_string())];
        assert_eq!(load("", env).unwrap().jidoka.idle_timeout_secs, 1);
    }

    #[test]
    fn a_body_timeout_of_zero_is_refused_by_name() {
        let errors = load("[node]\nbody_read_timeout_secs = 0\n", vec![]).unwrap_err();
        assert_eq!(
            pairs(&errors),
            [("node.body_read_timeout_secs", "must be greater than 0")]
        );
        assert_eq!(load("", vec![]).unwrap().node.body_read_timeout_secs, 30);
    }

    #[test]
    fn no_connections_at_all_is_refused_by_name() {
        let errors = load("[node]\nmax_connections = 0\n", vec![]).unwrap_err();
        assert_eq!(
            pairs(&errors)[0],
            ("node.max_connections", "must be greater than 0")
        );
        assert_eq!(load("", vec![]).unwrap().node.max_connections, 8192);
    }

    #[test]
    fn a_rego_time_limit_out_of_range_is_refused_by_name() {
        for bad in ["0", "60001"] {
            let text = format!("[jidoka]\nrego_timeout_ms = {bad}\n");
            let errors = load(&text, vec![]).unwrap_err();
            assert_eq!(
                pairs(&errors)[0],
                ("jidoka.rego_timeout_ms", "must be 1 to 60000")
            );
        }
        assert_eq!(load("", vec![]).unwrap().jidoka.rego_timeout_ms, 100);
    }

    #[test]
    fn urls_and_channels_that_could_never_be_called_are_refused_by_name() {
        let text = r#"
            [executors.a]
            kind = "webhook"
            url = "http://"
            [executors.b]
            kind = "webhook"
            url = "ftp://127.0.0.1/x"
            [executors.c]
            kind = "webhook"
            url = "https://gateway.example:443/charge"
            [[alerts.channels]]
            name = "oncall"
            kind = "pagerduty"
            url = "127.0.0.1:9998/v2/enqueue"
            [[alerts.channels]]
            name = "oncall"
            kind = "slack"
            url = "http://127.0.0.1:9997/hook"
        "#;
        let errors = load(text, vec![]).unwrap_err();
        let got = pairs(&errors);
        assert_eq!(
            got,
            [
                ("executors.a.url", "\"http://\" is not a URL: empty host"),
                (
                    "executors.b.url",
                    "\"ftp://127.0.0.1/x\" is not an http:// or https:// URL"
                ),
                (
                    "alerts.channels[0].url",
                    "\"127.0.0.1:9998/v2/enqueue\" is not a URL: relative URL without a base"
                ),
                (
                    "alerts.channels[0].routing_key",
                    "a pagerduty channel needs the routing key of its integration"
                ),
                (
                    "alerts.channels[1].name",
                    "\"oncall\" names another channel too"
                ),
            ],
            "{errors:?}"
        );
    }

    #[test]
    fn an_absent_or_empty_url_is_refused_by_name() {
        let text = r#"
            [executors.d]
            kind = "webhook"
            [executors.r]
            kind = "rollout"
            url = "http://127.0.0.1:9998/deploy"
            health_url = ""
            [[alerts.channels]]
            name = "chat"
            kind = "slack"
        "#;
        let errors = load(text, vec![]).unwrap_err();
        let got = pairs(&errors);
        assert_eq!(
            got,
            [
                ("executors.d.url", "a webhook executor needs url"),
                (
                    "executors.r.health_url",
                    "a rollout executor needs health_url"
                ),
                ("alerts.channels[0].url", "this channel kind needs a url"),
            ],
            "{errors:?}"
        );
    }

    #[test]
    fn a_bad_required_value_is_reported_once_not_also_as_missing() {
        let text = "[executors.d]\nkind = \"carrier_pigeon\"\n[executors.e]\nurl = \"http://x\"\n";
        let errors = load(text, vec![]).unwrap_err();
        let got: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(got, ["executors.d.kind", "executors.e"], "{errors:?}");
        assert!(errors[0]
            .message
            .starts_with("unknown variant `carrier_pigeon`"));
        // Absent in the file, it is still reported missing.
        assert_eq!(errors[1].message, "missing field `kind`");
    }

    #[test]
    fn zero_prefetch_and_wip_are_both_refused_by_name() {
        let errors = load("[kanban]\nprefetch = 0\nwip_limit = 0\n", vec![]).unwrap_err();
        let got = pairs(&errors);
        assert_eq!(
            got,
            [
                ("kanban.prefetch", "must be greater than 0"),
                ("kanban.wip_limit", "must be greater than 0")
            ]
        );
    }

    #[test]
    fn a_bad_override_names_its_variable() {
        let env = vec![("TAI_KANBAN__PREFETCH".to_string(), "lots".to_string())];
        let errors = load("", env).unwrap_err();
        assert_eq!(errors[0].path, "kanban.prefetch");
        assert_eq!(
            errors[0].message,
            "invalid type: string \"lots\", expected u32 (from TAI_KANBAN__PREFETCH)"
        );
        let env = vec![("TAI_KANBAN__COLOUR".to_string(), "red".to_string())];
        let errors = load("", env).unwrap_err();
        assert_eq!(errors[0].path, "kanban.colour");
        assert_eq!(errors[0].message, "unknown key (from TAI_KANBAN__COLOUR)");
        // A section no file or default has is named by the variables that
        // made it.
        let env = vec![
            ("TAI_FOO__BAR".to_string(), "1".to_string()),
            ("TAI_FOO__BAZ".to_string(), "2".to_string()),
        ];
        let errors = load("[kanban]\nprefetch = 5\n", env).unwrap_err();
        assert_eq!(
            pairs(&errors),
            [("foo", "unknown key (from TAI_FOO__BAR, TAI_FOO__BAZ)")]
        );
        // One in the file is not blamed on a variable.
        let env = vec![("TAI_KANBAN__PREFETCH".to_string(), "5".to_string())];
        let errors = load("[foo]\nbar = 1\n", env).unwrap_err();
        assert_eq!(pairs(&errors), [("foo", "unknown key")]);
        // A check against another key names the variable that set it.
        let env = vec![("TAI_KANBAN__PREFETCH".to_string(), "100".to_string())];
        let errors = load("", env).unwrap_err();
        assert_eq!(
            pairs(&errors),
            [(
                "kanban.wip_limit",
                "must be at least kanban.prefetch (100) (from TAI_KANBAN__PREFETCH)"
            )]
        );
        let env = vec![
            ("TAI_KANBAN__PREFETCH".to_string(), "100".to_string()),
            ("TAI_KANBAN__WIP_LIMIT".to_string(), "60".to_string()),
        ];
        let errors = load("", env).unwrap_err();
        assert_eq!(
            pairs(&errors),
            [(
                "kanban.wip_limit",
                "must be at least kanban.prefetch (100) (from TAI_KANBAN__WIP_LIMIT, TAI_KANBAN__PREFETCH)"
            )]
        );
        assert!(names_key("at least kanban.prefetch (1)", "kanban.prefetch"));
        assert!(!names_key(
            "at least kanban.prefetch_max (1)",
            "kanban.prefetch"
        ));
        assert!(!names_key("see xkanban.prefetch", "kanban.prefetch"));
        // A check of the whole config names the variable that set the key.
        let env = vec![("TAI_KANBAN__WIP_LIMIT".to_string(), "5".to_string())];
        let errors = load("", env).unwrap_err();
        assert_eq!(
            pairs(&errors),
            [(
                "kanban.wip_limit",
                "must be at least kanban.prefetch (10) (from TAI_KANBAN__WIP_LIMIT)"
            )]
        );
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn an_override_where_the_key_wants_text_is_its_text() {
        // Read as TOML, these would be a number, a boolean and a date: a
        // token or secret of digits was refused ("expected a string").
        let env = vars(&[
            ("TAI_OPERATOR__ADMIN_TOKEN", "12345678901"),
            ("TAI_ANDON__SIGNING_KEY_ID", "true"),
            ("TAI_ANDON__SIGNING_KEYS", "{ \"true\" = \"k\" }"),
            ("TAI_NODE__DATA_DIR", "2026-12-04"),
        ]);
        let c = load("", env).unwrap();
        assert_eq!(c.operator.admin_token, "12345678901");
        assert_eq!(c.andon.signing_key_id, "true");
        assert_eq!(c.node.data_dir, PathBuf::from("2026-12-04"));
        // Where the key wants a number, text is still refused.
        let errors = load("", vars(&[("TAI_KANBAN__PREFETCH", "[1]")])).unwrap_err();
        assert_eq!(
            pairs(&errors),
            [(
                "kanban.prefetch",
                "invalid type: string \"[1]\", expected u32 (from TAI_KANBAN__PREFETCH)"
            )]
        );
    }

    #[test]
    fn overrides_reach_a_lists_elements() {
        // A tenant's secrets from the environment, the rest from the file;
        // and a second tenant added whole by the next index.
        let text = "[[tenants]]\nid = \"acme\"\nsecrets = [\"file\"]\n";
        let env = vars(&[
            ("TAI_TENANTS__0__SECRETS", "[\"env-1\", \"env-2\"]"),
            ("TAI_TENANTS__1__ID", "zeta"),
            ("TAI_TENANTS__1__SECRETS", "[\"z\"]"),
            ("TAI_TENANTS__1__TIER", "enterprise"),
        ]);
        let c = load(text, env).unwrap();
        assert_eq!(c.tenants.len(), 2);
        assert_eq!(c.tenants[0].id, "acme");
        assert_eq!(c.tenants[0].secrets, ["env-1", "env-2"]);
        assert_eq!(c.tenants[1].id, "zeta");
        assert_eq!(c.tenants[1].tier, Tier::Enterprise);
        // A file without the list: the environment starts it, elements in
        // the order of their index (2 after 10 as text, not as a number).
        let mut env = Vec::new();
        for i in 0..11 {
            env.push((format!("TAI_TENANTS__{i}__ID"), format!("t{i}")));
            env.push((format!("TAI_TENANTS__{i}__SECRETS"), "[\"s\"]".into()));
        }
        env.reverse();
        let c = load("", env).unwrap();
        let ids: Vec<_> = c.tenants.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, (0..11).map(|i| format!("t{i}")).collect::<Vec<_>>());
        // A whole list, and an element past the next one.
        let env = vars(&[("TAI_TENANTS", "[{ id = \"w\", secrets = [\"s\"] }]")]);
        assert_eq!(load("", env).unwrap().tenants[0].id, "w");
        let errors = load(text, vars(&[("TAI_TENANTS__3__TIER", "trial")])).unwrap_err();
        assert_eq!(
            pairs(&errors),
            [(
                "tenants[3]",
                "tenants has 1 element(s): an override can change one of them or add the next, [1] (from TAI_TENANTS__3__TIER)"
            )]
        );
        let errors = load(text, vars(&[("TAI_TENANTS__ACME__TIER", "trial")])).unwrap_err();
        assert_eq!(
            pairs(&errors),
            [(
                "tenants",
                "tenants is a list: name an element by its index (0, 1, ...), not \"acme\" (from TAI_TENANTS__ACME__TIER)"
            )]
        );
        // The nearest override is named: the element's, not the list's.
        let env = vars(&[
            ("TAI_TENANTS", "[{ id = \"w\", secrets = [\"s\"] }]"),
            ("TAI_TENANTS__0__TIER", "gold"),
        ]);
        let errors = load("", env).unwrap_err();
        assert!(
            errors[0].message.ends_with("(from TAI_TENANTS__0__TIER)"),
            "{errors:?}"
        );
        // An element's bad value is named at the element.
        let errors = load(text, vars(&[("TAI_TENANTS__0__TIER", "gold")])).unwrap_err();
        assert_eq!(errors[0].path, "tenants[0].tier");
        assert!(
            errors[0].message.starts_with("unknown variant `gold`")
                && errors[0].message.ends_with("(from TAI_TENANTS__0__TIER)"),
            "{errors:?}"
        );
    }

    #[test]
    fn a_mistyped_override_is_refused_not_ignored() {
        // One underscore between the section and its key: ignored, the node
        // would run on the file's value while the operator believes otherwise.
        let env = vars(&[
            ("TAI_INGRESS_LISTEN", "127.0.0.1:1"),
            ("TAI_KANBAN__", "x"),
            ("TAI_NODE____DATA_DIR", "x"),
            ("TAI_UNRELATED", "not ours: no section of that name"),
            ("TAI_NODES_EXTRA", "not ours either"),
            ("PATH", "/bin"),
        ]);
        let errors = load("", env).unwrap_err();
        let messages: Vec<_> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            [
                "TAI_INGRESS_LISTEN: not an override: a section and its key are joined by two underscores (TAI_INGRESS__LISTEN)",
                "TAI_KANBAN__: an empty key (a section and each key below it are joined by two underscores)",
                "TAI_NODE____DATA_DIR: an empty key (a section and each key below it are joined by two underscores)",
            ]
        );
    }

    #[test]
    fn prod_refuses_dev_token_secret_and_key() {
        let text = r#"
            [node]
            mode = "prod"
            [[tenants]]
            id = "demo"
            secrets = ["demo-secret"]
        "#;
        let errors = load(text, no_env()).unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert!(paths.contains(&"operator.admin_token"), "{errors:?}");
        assert!(paths.contains(&"tenants[0].secrets[0]"), "{errors:?}");
        assert!(paths.contains(&"andon.signing_keys.dev-1"), "{errors:?}");
    }

    #[test]
    fn missing_required_fields_and_cross_references_are_reported() {
        let text = r#"
            [[tenants]]
            secrets = ["x"]
            [[tenants]]
            id = "ok"
            secrets = ["y"]
            extra = 1
            [skus.payments]
            executor = "gateway"
            [andon]
            signing_key_id = "k9"
        "#;
        let errors = load(text, no_env()).unwrap_err();
        let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            shown.iter().any(|e| e.contains("missing field `id`")),
            "{shown:?}"
        );
        assert!(
            shown.iter().any(|e| e.starts_with("tenants[1].extra")),
            "{shown:?}"
        );
        assert!(
            shown
                .iter()
                .any(|e| e.starts_with("skus.payments.executor")),
            "{shown:?}"
        );
        assert!(
            shown.iter().any(|e| e.starts_with("andon.signing_key_id")),
            "{shown:?}"
        );
    }

    #[test]
    fn amqp_settings_are_checked_when_the_backend_is_amqp() {
        let text =
            "[kanban]\nbackend = \"amqp\"\namqp_url = \"http://broker\"\namqp_queue = \"\"\n";
        let errors = load(text, no_env()).unwrap_err();
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["kanban.amqp_url", "kanban.amqp_queue"],
            "{errors:?}"
        );
        let c = load(
            "[kanban]\nbackend = \"amqp\"\namqp_queue_type = \"quorum\"\n",
            no_env(),
        )
        .unwrap();
        assert_eq!(c.kanban.amqp_queue_type, AmqpQueueType::Quorum);
        assert_eq!(c.kanban.amqp_queue, "tai2030.signals");
        let errors = load("[kanban]\namqp_queue_type = \"stream\"\n", no_env()).unwrap_err();
        assert_eq!(errors[0].path, "kanban.amqp_queue_type", "{errors:?}");
    }
}
