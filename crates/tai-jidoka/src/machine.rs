//! The policy engine's state machine (SPEC §5) as a pure function:
//! `step(data, sku, event, now) -> effects`. No I/O: the engine actor
//! performs the effects (one atomic commit, then the action).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tai_core::signal::{EngineState, Signal, SignalStatus};

use crate::policy::{Context, Policy};

/// A SKU's rules, as the engine uses them.
#[derive(Debug, Clone)]
pub struct Sku {
    pub quota: u64,
    pub period_ms: u64,
    pub entitlement_timeout_ms: u64,
    pub policies: Vec<Policy>,
    pub executor: String,
    /// False for a SKU the config does not name (any more): a signal for it
    /// reached the queue some other way (queued before the SKU left the
    /// config, a producer publishing to the broker) and has no rules to be
    /// decided by, so it is dead-lettered (`unknown_sku`), never decided by
    /// defaults (no policy would fail open).
    pub configured: bool,
}

/// What is checkpointed on every transition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Data {
    pub state: EngineState,
    pub quota_remaining: u64,
    /// The SKU's quota `quota_remaining` counts down from, so a quota
    /// changed in the config between two runs is applied to what this
    /// period has used ([`Data::reconcile`]). `None` in a checkpoint
    /// written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<u64>,
    pub period_start_ms: u64,
    pub entitled: bool,
    pub boot_started_ms: u64,
    pub in_flight: Option<InFlight>,
    /// Per customer, recent payment times (for velocity policies): a cache.
    /// Each customer's window is stored under its own key when it changes
    /// ([`Effect::Velocity`]) and loaded by the engine before a decision
    /// needs it, so a checkpoint stays small however many customers pay.
    #[serde(skip)]
    pub velocity: BTreeMap<String, VecDeque<u64>>,
    /// The breaker that halted the engine: it resumes when that breaker
    /// is no longer open. `None` for an operator halt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halted_by: Option<String>,
    /// Halted by a breaker, or out of quota, while `degraded` (a critical
    /// signal's action tripped the breaker, or it found the quota spent):
    /// the breaker's half-open or the refill takes it back to `degraded`,
    /// as the degraded row of SPEC §5 ends ("back to degraded"), unless an
    /// entitlement came meanwhile. An operator's resume goes to `stable`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub back_to_degraded: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InFlight {
    pub action_id: String,
    pub signal_id: String,
    pub seq: u64,
    /// Where the engine goes when the action ends (stable, or degraded for a
    /// critical signal decided while degraded).
    pub return_to: EngineState,
}

/// A customer's payment window as the store keeps it (`v/`), read back.
pub fn payment_window(bytes: &[u8]) -> serde_json::Result<VecDeque<u64>> {
    serde_json::from_slice(bytes)
}

impl Data {
    /// A checkpoint as the store keeps it (`e/`), read back as it was
    /// written (before [`Data::reconcile`]).
    pub fn from_checkpoint(bytes: &[u8]) -> serde_json::Result<Data> {
        serde_json::from_slice(bytes)
    }

    pub fn new(sku: &Sku, now_ms: u64) -> Self {
        Data {
            state: EngineState::Boot,
            quota_remaining: sku.quota,
            quota: Some(sku.quota),
            period_start_ms: now_ms,
            entitled: false,
            boot_started_ms: now_ms,
            in_flight: None,
            velocity: BTreeMap::new(),
            halted_by: None,
            back_to_degraded: false,
        }
    }

    /// Brings a checkpoint in line with the SKU as configured now, when
    /// its engine starts: a quota changed since keeps what this period has
    /// used of it (lowered below that, nothing is left); a checkpoint that
    /// did not record its quota is capped at the new one. An engine that
    /// is `quota_exhausted` stays so until its period refills the quota
    /// or an operator resumes it. A SKU the config no longer names leaves
    /// the checkpoint as it is (its engine decides nothing; the SKU may
    /// come back).
    pub fn reconcile(&mut self, sku: &Sku) {
        if !sku.configured {
            return;
        }
        self.quota_remaining = match self.quota {
            Some(old) if old != sku.quota => {
                let used = old.saturating_sub(self.quota_remaining);
                sku.quota.saturating_sub(used)
            }
            Some(_) => self.quota_remaining,
            None => self.quota_remaining.min(sku.quota),
        };
        self.quota = Some(sku.quota);
    }

    /// When the state timeout of the current state is due, if it has one:
    /// never further from `now` than the whole timeout (see [`settle_clock`]).
    pub fn state_deadline_ms(&self, sku: &Sku, now: u64) -> Option<u64> {
        match self.state {
            EngineState::Boot => Some(self.boot_started_ms.min(now) + sku.entitlement_timeout_ms),
            EngineState::QuotaExhausted => Some(self.period_start_ms.min(now) + sku.period_ms),
            _ => None,
        }
    }

    /// What the engine waits for that no signal brings, passive: its state
    /// timeout's due time, and the breaker that halted it (it resumes once
    /// that breaker is not open). `(None, None)`: nothing.
    pub fn waits_for(&self, sku: &Sku, now: u64) -> (Option<u64>, Option<String>) {
        let halted_by = match self.state {
            EngineState::Halted => self.halted_by.clone(),
            _ => None,
        };
        (self.state_deadline_ms(sku, now), halted_by)
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    Signal {
        seq: u64,
        signal: &'a Arc<Signal>,
    },
    /// The state's timeout (boot: no entitlement in time; quota_exhausted: refill due).
    StateTimeout,
    ActionDone {
        ok: bool,
    },
    ActionFailed {
        reason: &'a str,
        /// The executor's breaker is open after this failure: stop the line.
        tripped: Option<&'a str>,
    },
    /// A breaker changed; `open: false` resumes the engines it halted.
    BreakerChanged {
        breaker: &'a str,
        open: bool,
    },
    Halt {
        reason: &'a str,
    },
    Resume,
    /// The engine came back from a checkpoint.
    Restored,
}

/// An action for an executor: on the signal it was decided for (shared
/// with the queue and the engine, not copied).
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    pub action_id: String,
    pub signal: Arc<Signal>,
    /// What a policy asked for, when not the signal's own kind.
    pub asked: Option<String>,
    pub executor: String,
}

impl Action {
    pub fn tenant_id(&self) -> &str {
        &self.signal.tenant_id
    }
    pub fn sku_id(&self) -> &str {
        &self.signal.sku_id
    }
    pub fn signal_id(&self) -> &str {
        &self.signal.id
    }
    /// What to do: the policy's request, else the signal's kind.
    pub fn kind(&self) -> &str {
        self.asked.as_deref().unwrap_or(&self.signal.kind)
    }
    pub fn payload(&self) -> &tai_core::signal::Payload {
        &self.signal.payload
    }
}

/// As a webhook receives it: `action_id`, `tenant_id`, `sku_id`,
/// `signal_id`, `kind`, `executor`, `payload`.
impl Serialize for Action {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = ser.serialize_struct("Action", 7)?;
        st.serialize_field("action_id", &self.action_id)?;
        st.serialize_field("tenant_id", self.tenant_id())?;
        st.serialize_field("sku_id", self.sku_id())?;
        st.serialize_field("signal_id", self.signal_id())?;
        st.serialize_field("kind", self.kind())?;
        st.serialize_field("executor", &self.executor)?;
        st.serialize_field("payload", self.payload())?;
        st.end()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Receipt {
        kind: &'static str,
        before: EngineState,
        after: EngineState,
        signal_id: Option<String>,
        action_id: Option<String>,
        success: bool,
        reason: Option<String>,
    },
    /// Keep the signal until the state changes.
    Postpone,
    /// The signal is being decided; not acknowledged yet.
    Processing {
        signal_id: String,
    },
    /// The signal is decided: final status, acknowledged.
    Settle {
        seq: u64,
        signal_id: String,
        status: SignalStatus,
        reason: Option<String>,
    },
    /// Out of the line with a reason, acknowledged.
    DeadLetter {
        seq: u64,
        reason: &'static str,
    },
    Execute(Action),
    /// A customer's payment window changed: store it with the decision.
    Velocity {
        customer: String,
        times: Vec<u64>,
    },
}

struct Step<'s> {
    fx: Vec<Effect>,
    sku: &'s Sku,
}

impl Step<'_> {
    fn receipt(
        &mut self,
        kind: &'static str,
        before: EngineState,
        after: EngineState,
        signal_id: Option<&str>,
        success: bool,
        reason: Option<String>,
    ) {
        self.fx.push(Effect::Receipt {
            kind,
            before,
            after,
            signal_id: signal_id.map(str::to_string),
            action_id: None,
            success,
            reason,
        });
    }
}

const VELOCITY_CUSTOMERS_CAP: usize = 10_000;

/// Refills the quota when its period is over.
fn refill(d: &mut Data, st: &mut Step<'_>, now: u64) {
    let period = st.sku.period_ms.max(1);
    if now < d.period_start_ms + period {
        return;
    }
    let periods = (now - d.period_start_ms) / period;
    d.period_start_ms += periods * period;
    d.quota_remaining = st.sku.quota;
    if d.state == EngineState::QuotaExhausted {
        d.state = after_automatic_resume(d);
        st.receipt(
            "quota_refilled",
            EngineState::QuotaExhausted,
            d.state,
            None,
            true,
            None,
        );
    }
}

/// The wall clock may be stepped back (NTP, a VM restored from a
/// snapshot). A time recorded before such a step lies in the future, and
/// every wait measured from it (the quota period, the entitlement wait, a
/// customer's payment window) would grow by the step: an hour back, an
/// hour longer, quota and payments refused all along. Such times are taken
/// as now: no wait lasts more than its own length past the step.
fn settle_clock(d: &mut Data, ev: &Event<'_>, now: u64) {
    d.period_start_ms = d.period_start_ms.min(now);
    d.boot_started_ms = d.boot_started_ms.min(now);
    // Windows are only loaded for SKUs with a velocity policy.
    if d.velocity.is_empty() {
        return;
    }
    if let Event::Signal { signal, .. } = ev {
        let customer = signal.payload.get("customer_id").and_then(Value::as_str);
        if let Some(times) = customer.and_then(|c| d.velocity.get_mut(c)) {
            for t in times.iter_mut() {
                *t = (*t).min(now);
            }
        }
    }
}

/// One event: the new data is written into `d`, the effects returned.
/// `new_id(prefix)` makes the id of a new action (`act_` and a ULID in
/// the node; tests count).
pub fn step(
    d: &mut Data,
    sku: &Sku,
    ev: Event<'_>,
    now: u64,
    new_id: &mut dyn FnMut(&str) -> String,
) -> Vec<Effect> {
    let mut st = Step {
        fx: Vec::new(),
        sku,
    };
    settle_clock(d, &ev, now);
    refill(d, &mut st, now);
    let before = d.state;
    match ev {
        Event::Signal { seq, signal } => on_signal(d, &mut st, seq, signal, now, new_id),
        Event::StateTimeout => {
            if d.state == EngineState::Boot && now >= d.boot_started_ms + sku.entitlement_timeout_ms
            {
                d.state = EngineState::Degraded;
                st.receipt(
                    "bootstrap_timeout",
                    before,
                    d.state,
                    None,
                    false,
                    Some("no entitlement within entitlement_timeout".into()),
                );
            }
        }
        Event::ActionDone { ok: true } => finish_action(d, &mut st, None),
        Event::ActionDone { ok: false } => finish_action(d, &mut st, Some("action failed".into())),
        Event::ActionFailed { reason, tripped } => {
            finish_action(d, &mut st, Some(reason.to_string()));
            if let Some(breaker) = tripped {
                if d.state != EngineState::Halted {
                    let before = d.state;
                    d.state = EngineState::Halted;
                    d.halted_by = Some(breaker.to_string());
                    d.back_to_degraded = before == EngineState::Degraded;
                    st.receipt(
                        "jidoka_halt",
                        before,
                        d.state,
                        None,
                        false,
                        Some(format!("breaker {breaker} is open")),
                    );
                }
            }
        }
        Event::BreakerChanged { breaker, open } => {
            if !open && d.state == EngineState::Halted && d.halted_by.as_deref() == Some(breaker) {
                let to = after_automatic_resume(d);
                resume(
                    d,
                    &mut st,
                    format!("breaker {breaker} is no longer open"),
                    to,
                );
            }
        }
        Event::Restored => {
            if d.in_flight.is_some() {
                finish_action(d, &mut st, Some("interrupted".into()));
            }
        }
        Event::Halt { reason } => {
            d.halted_by = None;
            if d.state != EngineState::Halted {
                d.state = EngineState::Halted;
                st.receipt(
                    "jidoka_halt",
                    before,
                    d.state,
                    None,
                    true,
                    Some(reason.to_string()),
                );
            }
        }
        Event::Resume => {
            if matches!(d.state, EngineState::Halted | EngineState::QuotaExhausted) {
                if d.state == EngineState::QuotaExhausted {
                    d.quota_remaining = sku.quota;
                    d.period_start_ms = now;
                }
                resume(d, &mut st, "operator resume".into(), EngineState::Stable);
            }
        }
    }
    st.fx
}

/// Where a breaker's half-open or a quota refill takes the engine (and
/// clears what it remembered): `degraded` if it was degraded when it halted
/// or ran out and is still not entitled, else `stable`.
fn after_automatic_resume(d: &mut Data) -> EngineState {
    let degraded = std::mem::take(&mut d.back_to_degraded) && !d.entitled;
    match degraded {
        true => EngineState::Degraded,
        false => EngineState::Stable,
    }
}

/// Back on the line: to the pending action if one is in flight, else `to`.
fn resume(d: &mut Data, st: &mut Step<'_>, reason: String, to: EngineState) {
    let before = d.state;
    d.halted_by = None;
    d.back_to_degraded = false;
    d.state = if d.in_flight.is_some() {
        EngineState::ActionPending
    } else {
        to
    };
    st.receipt("jidoka_resume", before, d.state, None, true, Some(reason));
}

fn finish_action(d: &mut Data, st: &mut Step<'_>, failure: Option<String>) {
    let Some(f) = d.in_flight.take() else {
        return;
    };
    let before = d.state;
    // A halt while the action ran keeps the engine halted.
    if d.state == EngineState::ActionPending {
        d.state = f.return_to;
    }
    let (kind, status, success) = match failure {
        None => ("action_successful", SignalStatus::Completed, true),
        Some(_) => ("action_failed", SignalStatus::Failed, false),
    };
    st.fx.push(Effect::Receipt {
        kind,
        before,
        after: d.state,
        signal_id: Some(f.signal_id.clone()),
        action_id: Some(f.action_id.clone()),
        success,
        reason: failure.clone(),
    });
    st.fx.push(Effect::Settle {
        seq: f.seq,
        signal_id: f.signal_id,
        status,
        reason: failure,
    });
}

fn skip(
    d: &Data,
    st: &mut Step<'_>,
    seq: u64,
    s: &Signal,
    reason: &'static str,
    kind: &'static str,
) {
    st.receipt(
        kind,
        d.state,
        d.state,
        Some(&s.id),
        false,
        Some(reason.into()),
    );
    st.fx.push(Effect::DeadLetter { seq, reason });
}

fn on_signal(
    d: &mut Data,
    st: &mut Step<'_>,
    seq: u64,
    s: &Arc<Signal>,
    now: u64,
    new_id: &mut dyn FnMut(&str) -> String,
) {
    let before = d.state;
    if !st.sku.configured {
        return skip(d, st, seq, s, "unknown_sku", "signal_skipped");
    }
    if d.state == EngineState::ActionPending
        || (d.state == EngineState::Boot && s.kind != tai_core::signal::ENTITLEMENT)
    {
        st.fx.push(Effect::Postpone);
        return;
    }
    if d.state == EngineState::Halted {
        return skip(d, st, seq, s, "halted", "signal_skipped");
    }
    if s.kind == tai_core::signal::ENTITLEMENT {
        let settle = |st: &mut Step<'_>, status, reason: Option<String>| {
            st.fx.push(Effect::Settle {
                seq,
                signal_id: s.id.clone(),
                status,
                reason,
            })
        };
        match s.payload.get("active").and_then(Value::as_bool) {
            Some(active) => {
                d.entitled = active;
                let kind = if active {
                    if matches!(d.state, EngineState::Boot | EngineState::Degraded) {
                        d.state = EngineState::Stable;
                    }
                    "entitlement_activated"
                } else {
                    d.state = EngineState::Degraded;
                    "entitlement_revoked"
                };
                st.receipt(kind, before, d.state, Some(&s.id), true, None);
                settle(st, SignalStatus::Completed, None);
            }
            None => {
                let why = "entitlement needs payload.active true or false".to_string();
                st.receipt(
                    "policy_denied",
                    before,
                    before,
                    Some(&s.id),
                    false,
                    Some(why.clone()),
                );
                settle(st, SignalStatus::Denied, Some(why));
            }
        }
        return;
    }
    match d.state {
        EngineState::QuotaExhausted => skip(d, st, seq, s, "quota_exhausted", "quota_exceeded"),
        EngineState::Degraded if !s.critical => skip(d, st, seq, s, "degraded", "signal_skipped"),
        EngineState::Degraded | EngineState::Stable => decide(d, st, seq, s, now, new_id),
        EngineState::Boot | EngineState::ActionPending | EngineState::Halted => {
            unreachable!("handled above")
        }
    }
}

fn decide(
    d: &mut Data,
    st: &mut Step<'_>,
    seq: u64,
    s: &Arc<Signal>,
    now: u64,
    new_id: &mut dyn FnMut(&str) -> String,
) {
    let before = d.state;
    if d.quota_remaining == 0 {
        d.state = EngineState::QuotaExhausted;
        d.back_to_degraded = before == EngineState::Degraded;
        st.receipt(
            "quota_exceeded",
            before,
            d.state,
            Some(&s.id),
            false,
            Some("quota_exhausted".into()),
        );
        st.fx.push(Effect::DeadLetter {
            seq,
            reason: "quota_exhausted",
        });
        return;
    }
    let mut violations = Vec::new();
    let mut denied = false;
    let mut window = 0;
    let mut asked = None;
    // A payload no policy can read is denied, never read as `{}` (which
    // would pass a blacklist or a threshold it should not; see `Payload`).
    let unreadable = match st.sku.policies.is_empty() {
        true => None,
        false => s.payload.unreadable(),
    };
    if let Some(why) = unreadable {
        denied = true;
        violations.push(why.to_string());
    }
    for p in st.sku.policies.iter().filter(|_| unreadable.is_none()) {
        let v = p.evaluate(
            s,
            Context {
                now_ms: now,
                velocity: &d.velocity,
            },
        );
        // All must allow; a denying policy's violations go into the receipt.
        if !v.allow {
            denied = true;
            if v.violations.is_empty() {
                violations.push(format!("{}: denied", p.name()));
            }
            violations.extend(
                v.violations
                    .into_iter()
                    .map(|x| format!("{}: {x}", p.name())),
            );
        }
        asked = asked.or(v.action);
        window = window.max(p.velocity_window_ms().unwrap_or(0));
    }
    if window > 0 {
        record_velocity(d, st, s, now, window);
    }
    if denied {
        let mut reason = violations.join("; ");
        // SPEC §5: a denial stays in place; the remedy a policy asks for
        // (freeze, revoke, rollback, ...) is recorded for the operator.
        if let Some(a) = &asked {
            reason.push_str(&format!("; requested action: {a}"));
        }
        st.receipt(
            "policy_denied",
            before,
            before,
            Some(&s.id),
            false,
            Some(reason.clone()),
        );
        st.fx.push(Effect::Settle {
            seq,
            signal_id: s.id.clone(),
            status: SignalStatus::Denied,
            reason: Some(reason),
        });
        return;
    }
    d.quota_remaining -= 1;
    let action_id = new_id("act_");
    d.in_flight = Some(InFlight {
        action_id: action_id.clone(),
        signal_id: s.id.clone(),
        seq,
        return_to: before,
    });
    d.state = EngineState::ActionPending;
    st.fx.push(Effect::Receipt {
        kind: "action_generated",
        before,
        after: d.state,
        signal_id: Some(s.id.clone()),
        action_id: Some(action_id.clone()),
        success: true,
        reason: None,
    });
    st.fx.push(Effect::Processing {
        signal_id: s.id.clone(),
    });
    st.fx.push(Effect::Execute(Action {
        action_id,
        signal: s.clone(),
        asked,
        executor: st.sku.executor.clone(),
    }));
}

fn record_velocity(d: &mut Data, st: &mut Step<'_>, s: &Signal, now: u64, window: u64) {
    let Some(c) = s.payload.get("customer_id").and_then(Value::as_str) else {
        return;
    };
    let ts = d.velocity.entry(c.to_string()).or_default();
    ts.push_back(now);
    while ts.front().is_some_and(|t| now.saturating_sub(*t) >= window) {
        ts.pop_front();
    }
    st.fx.push(Effect::Velocity {
        customer: c.to_string(),
        times: ts.iter().copied().collect(),
    });
    if d.velocity.len() > VELOCITY_CUSTOMERS_CAP {
        d.velocity
            .retain(|_, ts| ts.back().is_some_and(|t| now.saturating_sub(*t) < window));
    }
}

#[cfg(test)]
mod tests;
