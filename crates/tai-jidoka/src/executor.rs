//! Action executors (SPEC §6): `log`, and `webhook` (an HTTP POST of the
//! action JSON, signed with the node's receipt key), each webhook target
//! behind its own circuit breaker ([`crate::breaker`]).
//!
//! The breakers are node-wide state shared by every engine (like an ETS
//! table owned by the application): they outlive engine restarts, and each
//! one is written to the store on every transition, so a melted breaker
//! stays melted across a node restart.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::json;
use sha2::Sha256;
use tai_core::alert::{Alert, Severity};
use tai_core::config::{Config, ExecutorConfig, ExecutorKind, StageConfig};
use tai_core::msg::{LedgerMsg, RouterMsg, WriteSet, ANDON_LEDGER, ENGINE_ROUTER};
use tai_core::receipt::ReceiptDraft;
use tai_core::signal::now_ms;
use tai_store::Store;
use tracing::{debug, error, info, warn};

use crate::breaker::{Admission, Breaker, BreakerConfig, BreakerState, Transition};
use crate::machine::Action;

const META_PREFIX: &str = tai_store::meta::BREAKER;

/// A rollout's health answer is a small JSON object; a longer body is
/// refused (health unknown, so the stage rolls back) without reading on.
const HEALTH_ANSWER_MAX_BYTES: usize = 64 * 1024;

/// What `GET /admin/breakers` shows per breaker.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerInfo {
    pub name: String,
    pub state: BreakerState,
    pub melted: bool,
    pub consecutive_failures: u32,
    pub half_open_successes: u32,
    pub trips: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_until_ms: Option<u64>,
    pub changed_at_ms: u64,
    pub calls: u64,
    pub failures: u64,
    pub slow_calls: u64,
    pub rejected: u64,
    pub failure_threshold: u32,
    pub success_threshold: u32,
    pub reset_timeout_ms: u64,
}

/// Every executor target's breaker.
#[derive(Clone)]
pub struct Breakers {
    inner: Arc<Mutex<BTreeMap<String, Breaker>>>,
    configs: Arc<BTreeMap<String, BreakerConfig>>,
    store: Store,
}

impl std::fmt::Debug for Breakers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breakers").finish_non_exhaustive()
    }
}

impl Breakers {
    /// One breaker per webhook executor, restored from the store.
    pub fn load(
        store: Store,
        executors: &BTreeMap<String, ExecutorConfig>,
    ) -> Result<Self, String> {
        let configs: BTreeMap<String, BreakerConfig> = executors
            .iter()
            .filter(|(_, c)| c.kind != ExecutorKind::Log)
            .map(|(n, c)| (n.clone(), BreakerConfig::from_executor(c)))
            .collect();
        let mut saved: BTreeMap<String, Breaker> = BTreeMap::new();
        for (key, bytes) in store.metas(META_PREFIX).map_err(|e| e.to_string())? {
            let name = key.trim_start_matches(META_PREFIX).to_string();
            match serde_json::from_slice::<Breaker>(&bytes) {
                Ok(mut b) => {
                    // State survives; the call counters count since this start.
                    (b.calls, b.failures, b.slow_calls, b.rejected) = (0, 0, 0, 0);
                    saved.insert(name, b);
                }
                Err(e) => {
                    warn!(breaker = %name, error = %e, "unreadable saved breaker: starting it closed")
                }
            }
        }
        let inner = configs
            .keys()
            .map(|n| (n.clone(), saved.remove(n).unwrap_or_default()))
            .collect::<BTreeMap<_, _>>();
        for (name, b) in &inner {
            metrics::gauge!(tai_core::telemetry::BREAKER_STATE, "breaker" => name.clone())
                .set(b.state.gauge());
            if b.state != BreakerState::Closed {
                info!(breaker = %name, state = b.state.as_str(), melted = b.melted, "breaker restored");
            }
        }
        Ok(Breakers {
            inner: Arc::new(Mutex::new(inner)),
            configs: Arc::new(configs),
            store,
        })
    }

    fn with<R>(&self, name: &str, f: impl FnOnce(&mut Breaker, &BreakerConfig) -> R) -> Option<R> {
        let c = self.configs.get(name)?;
        let mut all = self.inner.lock().expect("breakers");
        let b = all.get_mut(name)?;
        Some(f(b, c))
    }

    /// Persists, logs and measures a breaker after it changed.
    fn changed(&self, name: &str, b: &Breaker, t: Option<&Transition>) {
        if let Err(e) = self.store.put_meta(
            &format!("{META_PREFIX}{name}"),
            &serde_json::to_vec(b).unwrap_or_default(),
        ) {
            error!(breaker = %name, error = %e, "could not save the breaker");
        }
        metrics::gauge!(tai_core::telemetry::BREAKER_STATE, "breaker" => name.to_string())
            .set(b.state.gauge());
        if let Some(t) = t {
            let key = format!("breaker:{name}");
            let alert = match t.to {
                BreakerState::Open => Alert::new(
                    Severity::Critical,
                    "breaker_open",
                    key,
                    name,
                    format!("breaker {name} opened: {}", t.reason),
                ),
                BreakerState::HalfOpen => Alert::new(
                    Severity::Warning,
                    "breaker_half_open",
                    format!("{key}:half_open"),
                    name,
                    format!("breaker {name} half-open: {}", t.reason),
                ),
                BreakerState::Closed => Alert::new(
                    Severity::Critical,
                    "breaker_closed",
                    key,
                    name,
                    format!("breaker {name} closed: {}", t.reason),
                )
                .resolved(),
            };
            tai_core::alert::raise(alert);
            match t.to {
                BreakerState::Open => {
                    error!(breaker = %name, from = t.from.as_str(), reason = %t.reason, "breaker open: the line stops for this target")
                }
                _ => {
                    warn!(breaker = %name, from = t.from.as_str(), to = t.to.as_str(), reason = %t.reason, "breaker state change")
                }
            }
        }
    }

    fn apply(
        &self,
        name: &str,
        f: impl FnOnce(&mut Breaker, &BreakerConfig) -> Option<Transition>,
        always_save: bool,
    ) -> Option<Option<Transition>> {
        let c = self.configs.get(name)?;
        let mut all = self.inner.lock().expect("breakers");
        let b = all.get_mut(name)?;
        let t = f(b, c);
        if t.is_some() || always_save {
            self.changed(name, b, t.as_ref());
        }
        Some(t)
    }

    pub fn state(&self, name: &str) -> Option<BreakerState> {
        self.with(name, |b, _| b.state)
    }

    pub fn admit(&self, name: &str, now: u64) -> Option<(Admission, Option<Transition>)> {
        let c = self.configs.get(name)?;
        let mut all = self.inner.lock().expect("breakers");
        let b = all.get_mut(name)?;
        let (a, t) = b.admit(name, now, c.probe_lease_ms);
        if t.is_some() {
            self.changed(name, b, t.as_ref());
        }
        Some((a, t))
    }

    pub fn record(&self, name: &str, ok: bool, elapsed_ms: u64, now: u64) -> Option<Transition> {
        self.apply(name, |b, c| b.record(name, c, ok, elapsed_ms, now), false)
            .flatten()
    }

    /// Open breakers whose open time is over go half-open.
    pub fn tick(&self, now: u64) -> Vec<Transition> {
        let names: Vec<String> = self.configs.keys().cloned().collect();
        names
            .iter()
            .filter_map(|n| self.apply(n, |b, _| b.tick(n, now), false).flatten())
            .collect()
    }

    /// Operator melt: `None` if there is no such breaker.
    pub fn melt(&self, name: &str, now: u64) -> Option<Option<Transition>> {
        self.apply(name, |b, _| b.melt(name, now), true)
    }

    /// Operator reset: `None` if there is no such breaker.
    pub fn reset(&self, name: &str, now: u64) -> Option<Option<Transition>> {
        self.apply(name, |b, _| b.reset(name, now), true)
    }

    pub fn list(&self) -> Vec<BreakerInfo> {
        let all = self.inner.lock().expect("breakers");
        all.iter()
            .filter_map(|(name, b)| {
                let c = self.configs.get(name)?;
                Some(BreakerInfo {
                    name: name.clone(),
                    state: b.state,
                    melted: b.melted,
                    consecutive_failures: b.consecutive_failures,
                    half_open_successes: b.half_open_successes,
                    trips: b.trips,
                    open_until_ms: (b.state == BreakerState::Open && !b.melted)
                        .then_some(b.open_until_ms),
                    changed_at_ms: b.changed_at_ms,
                    calls: b.calls,
                    failures: b.failures,
                    slow_calls: b.slow_calls,
                    rejected: b.rejected,
                    failure_threshold: c.failure_threshold,
                    success_threshold: c.success_threshold,
                    reset_timeout_ms: c.reset_timeout_ms,
                })
            })
            .collect()
    }
}

/// The receipt of a breaker's state change: node-wide, so its tenant is `*`
/// (no tenant id can contain it) and its SKU field names the breaker.
pub fn breaker_receipt(t: &Transition) -> ReceiptDraft {
    ReceiptDraft {
        receipt_id: tai_core::receipt::prefixed_ulid("rcpt_"),
        kind: format!("breaker_{}", t.to.as_str()),
        tenant_id: "*".into(),
        sku_id: t.breaker.clone(),
        signal_id: None,
        action_id: None,
        state_before: t.from.into(),
        state_after: t.to.into(),
        success: t.to != BreakerState::Open,
        reason: Some(t.reason.clone()),
        trace_id: None,
        timestamp_ms: t.at_ms,
    }
}

/// Tells the engines a breaker is no longer open, so the ones it halted resume.
pub fn notify_engines(transitions: &[Transition]) {
    let Some(router) = ractor::registry::where_is(ENGINE_ROUTER) else {
        return;
    };
    for t in transitions.iter().filter(|t| t.to != BreakerState::Open) {
        let _ = router.send_message(RouterMsg::BreakerChanged {
            breaker: t.breaker.clone(),
            open: false,
        });
    }
}

/// Records transitions that no decision carries (the half-open timer, the
/// operator) in the ledger and waits until they are durable, then tells the
/// engines (so a `jidoka_resume` follows the breaker's own receipt).
pub async fn record_transitions(transitions: Vec<Transition>) -> Result<(), String> {
    if transitions.is_empty() {
        return Ok(());
    }
    let receipts: Vec<ReceiptDraft> = transitions.iter().map(breaker_receipt).collect();
    let result = match ractor::registry::where_is(ANDON_LEDGER) {
        Some(ledger) => {
            let sent = ractor::rpc::call(
                &ledger,
                |reply| LedgerMsg::Commit {
                    receipts,
                    writes: WriteSet::default(),
                    in_flight: None,
                    unless_final: false,
                    reply,
                },
                Some(Duration::from_secs(30)),
            )
            .await;
            match sent {
                Ok(ractor::rpc::CallResult::Success(Ok(_))) => Ok(()),
                Ok(ractor::rpc::CallResult::Success(Err(e))) => Err(e),
                _ => Err("andon_ledger did not answer".to_string()),
            }
        }
        None => Err("andon_ledger is not running".to_string()),
    };
    if let Err(e) = &result {
        error!(error = %e, "breaker receipts were not recorded");
    }
    notify_engines(&transitions);
    result
}

/// [`record_transitions`] in the background (the breaker timer).
pub fn announce(transitions: Vec<Transition>) {
    if !transitions.is_empty() {
        tokio::spawn(record_transitions(transitions));
    }
}

/// A step of an action worth its own receipt (a rollout stage, a rollback).
#[derive(Debug, Clone, PartialEq)]
pub struct StepReceipt {
    pub kind: &'static str,
    pub success: bool,
    pub reason: String,
}

/// What running an action came to.
#[derive(Debug)]
pub struct Outcome {
    pub result: Result<(), String>,
    /// Receipts of the action's own steps, in order.
    pub steps: Vec<StepReceipt>,
    /// Breaker changes this call caused (their receipts go with the decision).
    pub transitions: Vec<Transition>,
    /// The breaker that is open after this call: the engine halts.
    pub tripped: Option<String>,
}

/// The node's executors.
#[derive(Clone)]
pub struct Executors {
    client: reqwest::Client,
    targets: Arc<BTreeMap<String, ExecutorConfig>>,
    key_id: String,
    key: Arc<Vec<u8>>,
    pub breakers: Breakers,
}

impl Default for Outcome {
    fn default() -> Self {
        Outcome {
            result: Ok(()),
            steps: Vec::new(),
            transitions: Vec::new(),
            tripped: None,
        }
    }
}

impl std::fmt::Debug for Executors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executors").finish_non_exhaustive()
    }
}

type HmacSha256 = Hmac<Sha256>;

/// `v1=` hex HMAC-SHA256 over `timestamp\nbody`: the `X-Tai-Signature` of a webhook.
pub fn webhook_signature(key: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("hmac takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b"\n");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

impl Executors {
    pub fn new(config: &Config, store: Store) -> Result<Self, String> {
        let key = config
            .andon
            .signing_keys
            .get(&config.andon.signing_key_id)
            .ok_or_else(|| {
                format!(
                    "andon.signing_key_id: {:?} is not in andon.signing_keys",
                    config.andon.signing_key_id
                )
            })?
            .as_bytes()
            .to_vec();
        // A redirect is an answer, not a delivery: followed, a 302 turns the
        // POST into a GET of the new address, and its 200 would record an
        // action the target never received.
        let client = reqwest::Client::builder()
            .user_agent(concat!("tai-node/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        Ok(Executors {
            client,
            breakers: Breakers::load(store, &config.executors)?,
            targets: Arc::new(config.executors.clone()),
            key_id: config.andon.signing_key_id.clone(),
            key: Arc::new(key),
        })
    }

    /// Whether `executor` acts outside the node (its result must not be
    /// committed with the decision that asked for it).
    pub fn is_external(&self, executor: &str) -> bool {
        self.targets
            .get(executor)
            .is_some_and(|t| t.kind != ExecutorKind::Log)
    }

    pub async fn run(&self, a: &Action) -> Outcome {
        let Some(target) = self.targets.get(&a.executor) else {
            if a.executor == "log" {
                return Self::log(a);
            }
            return Outcome {
                result: Err(format!("executor {:?} is not configured", a.executor)),
                ..Outcome::default()
            };
        };
        match target.kind {
            ExecutorKind::Log => Self::log(a),
            ExecutorKind::Webhook | ExecutorKind::Rollout => self.guarded(a, target).await,
        }
    }

    /// Records only (SPEC §6): the receipts are the record. The line is at
    /// debug, so a node at the default level writes none per signal (at
    /// 20k signals/s it cost the node a tenth of its CPU).
    fn log(a: &Action) -> Outcome {
        debug!(
            tenant = %a.tenant_id(),
            sku = %a.sku_id(),
            action_id = %a.action_id,
            signal = %a.signal_id(),
            kind = %a.kind(),
            "action executed (log executor)"
        );
        Outcome {
            result: Ok(()),
            ..Outcome::default()
        }
    }

    /// Runs a webhook or rollout action through its target's breaker.
    async fn guarded(&self, a: &Action, target: &ExecutorConfig) -> Outcome {
        let name = a.executor.as_str();
        let mut out = Outcome {
            result: Ok(()),
            ..Outcome::default()
        };
        let Some((admission, t)) = self.breakers.admit(name, now_ms()) else {
            out.result = Err(format!("no breaker for executor {name:?}"));
            return out;
        };
        out.transitions.extend(t);
        if admission == Admission::Reject {
            // Open: the line stops. Half-open with another call's probe in
            // flight: this action fails, the engine stays up to try again
            // (a lost probe's lease expires; an engine halted here would
            // wait for a transition that might never come).
            if self.breakers.state(name) == Some(BreakerState::Open) {
                out.result = Err(format!("breaker {name} is open: call not made"));
                out.tripped = Some(name.to_string());
            } else {
                out.result = Err(format!(
                    "breaker {name} is half-open and its probe is out: call not made"
                ));
            }
            return out;
        }
        let started = Instant::now();
        // Whether the target itself answered (what the breaker counts); a
        // rollout rolled back for bad health still had a working target.
        let target_ok = match target.kind {
            ExecutorKind::Rollout => {
                let (target_ok, result, steps) = self.rollout(a, target).await;
                out.result = result;
                out.steps = steps;
                target_ok
            }
            _ => {
                out.result = self.post(a, target, &json!(a)).await;
                out.result.is_ok()
            }
        };
        let elapsed = started.elapsed().as_millis() as u64;
        out.transitions
            .extend(self.breakers.record(name, target_ok, elapsed, now_ms()));
        out.tripped =
            (self.breakers.state(name) == Some(BreakerState::Open)).then(|| name.to_string());
        if let Err(e) = &out.result {
            warn!(executor = name, action_id = %a.action_id, error = %e, elapsed_ms = elapsed, probe = admission == Admission::Probe, "action failed");
        }
        out
    }

    /// A staged rollout: region by region, stage by stage, a deploy call
    /// then a health check; a stage over `max_error_rate` or `max_p99_ms`
    /// (or whose health cannot be read) is rolled back in every region it
    /// reached, newest first. Returns (the deploy target answered, the
    /// action's result, the step receipts).
    async fn rollout(
        &self,
        a: &Action,
        target: &ExecutorConfig,
    ) -> (bool, Result<(), String>, Vec<StepReceipt>) {
        let regions = if target.regions.is_empty() {
            vec!["default".to_string()]
        } else {
            target.regions.clone()
        };
        let mut steps = Vec::new();
        let mut touched: Vec<&str> = Vec::new();
        for region in &regions {
            touched.push(region);
            for stage in &target.stages {
                let at = format!("{} {}% in {region}", stage.name, stage.percent);
                let body = json!({
                    "action": a, "kind": a.kind(), "region": region,
                    "stage": stage.name, "percent": stage.percent,
                });
                if let Err(e) = self.post(a, target, &body).await {
                    steps.push(StepReceipt {
                        kind: "rollout_stage",
                        success: false,
                        reason: format!("{at}: deploy call failed: {e}"),
                    });
                    return (false, Err(format!("{at}: deploy call failed: {e}")), steps);
                }
                let verdict = match self.health(target, region, stage, a).await {
                    Ok((rate, _)) if rate > target.max_error_rate => Err(format!(
                        "error rate {rate:.3} over {:.3}",
                        target.max_error_rate
                    )),
                    Ok((_, p99)) if p99 > target.max_p99_ms => {
                        Err(format!("p99 {p99:.0} ms over {:.0} ms", target.max_p99_ms))
                    }
                    Ok((rate, p99)) => Ok(format!("error rate {rate:.3}, p99 {p99:.0} ms")),
                    Err(e) => Err(format!("health unknown: {e}")),
                };
                match verdict {
                    Ok(h) => steps.push(StepReceipt {
                        kind: "rollout_stage",
                        success: true,
                        reason: format!("{at} healthy: {h}"),
                    }),
                    Err(why) => {
                        let why = format!("{at} unhealthy: {why}");
                        steps.push(StepReceipt {
                            kind: "rollout_stage",
                            success: false,
                            reason: why.clone(),
                        });
                        let target_ok = self.roll_back(a, target, &touched, &why, &mut steps).await;
                        return (target_ok, Err(format!("rolled back: {why}")), steps);
                    }
                }
            }
        }
        (true, Ok(()), steps)
    }

    /// Rolls back every region the rollout reached, newest first.
    async fn roll_back(
        &self,
        a: &Action,
        target: &ExecutorConfig,
        touched: &[&str],
        why: &str,
        steps: &mut Vec<StepReceipt>,
    ) -> bool {
        let mut all_ok = true;
        for region in touched.iter().rev() {
            let body = json!({
                "action": a, "kind": "rollback", "region": region,
                "stage": "rollback", "percent": 0, "reason": why,
            });
            let result = self.post(a, target, &body).await;
            all_ok &= result.is_ok();
            steps.push(StepReceipt {
                kind: "rollout_rollback",
                success: result.is_ok(),
                reason: match result {
                    Ok(()) => format!("{region} rolled back ({why})"),
                    Err(e) => format!("{region} rollback call failed: {e}"),
                },
            });
        }
        all_ok
    }

    /// `GET health_url?region=&stage=&percent=&action_id=` → (error rate, p99 ms).
    async fn health(
        &self,
        target: &ExecutorConfig,
        region: &str,
        stage: &StageConfig,
        a: &Action,
    ) -> Result<(f64, f64), String> {
        let url = target.health_url.as_deref().unwrap_or_default();
        let percent = stage.percent.to_string();
        let mut response = self
            .client
            .get(url)
            .timeout(Duration::from_millis(target.timeout_ms))
            .query(&[
                ("region", region),
                ("stage", stage.name.as_str()),
                ("percent", percent.as_str()),
                ("action_id", a.action_id.as_str()),
            ])
            .send()
            .await
            .map_err(|e| format!("health check failed: {e}"))?;
        // Only a 2xx answer is health (a redirect is not followed).
        if !response.status().is_success() {
            return Err(format!("health check answered {}", response.status()));
        }
        // Read with a cap: a target streaming a body without end (within
        // its timeout) would otherwise have the node hold all of it.
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("health answer could not be read: {e}"))?
        {
            if body.len() + chunk.len() > HEALTH_ANSWER_MAX_BYTES {
                return Err(format!(
                    "health answer over {HEALTH_ANSWER_MAX_BYTES} bytes"
                ));
            }
            body.extend_from_slice(&chunk);
        }
        let doc: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| format!("health answer is not JSON: {e}"))?;
        let field = |k: &str| {
            doc.get(k)
                .and_then(serde_json::Value::as_f64)
                .ok_or_else(|| format!("health answer lacks a numeric {k:?}: {doc}"))
        };
        Ok((field("error_rate")?, field("p99_ms")?))
    }

    /// POSTs `body`, signed, to the target's `url`; 2xx is success.
    async fn post(
        &self,
        a: &Action,
        target: &ExecutorConfig,
        body: &serde_json::Value,
    ) -> Result<(), String> {
        let url = target.url.as_deref().unwrap_or_default();
        let body = serde_json::to_vec(body).map_err(|e| e.to_string())?;
        let ts = now_ms() / 1000;
        let response = self
            .client
            .post(url)
            .timeout(Duration::from_millis(target.timeout_ms))
            .header("content-type", "application/json")
            .header("x-tai-timestamp", ts.to_string())
            .header("x-tai-key-id", &self.key_id)
            .header("x-tai-signature", webhook_signature(&self.key, ts, &body))
            .header("x-tai-action-id", &a.action_id)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    format!("timed out after {} ms", target.timeout_ms)
                } else {
                    format!("request failed: {e}")
                }
            })?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("target answered {status}"))
        }
    }
}
