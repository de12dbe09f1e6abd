//! Andon alerts (SPEC §8): what any layer raises, and how it reaches
//! `andon_alerts` (by registered name, fire and forget: raising never
//! blocks or fails the caller).

use serde::{Deserialize, Serialize};

pub use crate::config::Severity;
use crate::msg::ANDON_ALERTS;

/// One alert. `key` identifies the condition: a repeat within the dedupe
/// window is dropped, and `resolve` ends the condition (PagerDuty `resolve`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub key: String,
    pub severity: Severity,
    /// What happened, e.g. `breaker_open`, `engine_halted`, `layer_restart`.
    pub kind: String,
    pub summary: String,
    /// Where: a breaker, an engine, a supervisor.
    pub source: String,
    #[serde(default)]
    pub resolve: bool,
    pub at_ms: u64,
}

impl Alert {
    pub fn new(
        severity: Severity,
        kind: &str,
        key: impl Into<String>,
        source: impl Into<String>,
        summary: impl Into<String>,
    ) -> Alert {
        Alert {
            key: key.into(),
            severity,
            kind: kind.to_string(),
            summary: summary.into(),
            source: source.into(),
            resolve: false,
            at_ms: crate::signal::now_ms(),
        }
    }

    /// The same condition, ended.
    pub fn resolved(mut self) -> Alert {
        self.resolve = true;
        self
    }
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

/// To `andon_alerts`.
pub enum AlertMsg {
    Raise(Alert),
    /// Recent alerts with their delivery status, newest last.
    Recent(ractor::RpcReplyPort<Vec<serde_json::Value>>),
    /// Internal: a channel finished (or gave up) delivering an alert.
    Delivered {
        id: u64,
        channel: String,
        result: Result<(), String>,
    },
}

/// Alerts raised while `andon_alerts` was not running (the node starting,
/// or its layer restarting), oldest first, until it takes them as it
/// starts ([`take_pending`]). Bounded: past [`PENDING_MAX`] the oldest go.
static PENDING: std::sync::Mutex<std::collections::VecDeque<Alert>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());

/// Alerts kept for `andon_alerts` while it does not run, at most.
pub const PENDING_MAX: usize = 1024;

fn pending() -> std::sync::MutexGuard<'static, std::collections::VecDeque<Alert>> {
    PENDING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Raises an alert. If the alert router is not running (it starts after
/// the layers that raise, and restarts with its layer), the alert is kept
/// for it, and logged; a critical alert raised as its layer restarts (the
/// restart itself, say) would otherwise be lost.
pub fn raise(alert: Alert) {
    crate::kaizen::ALERTS_RAISED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let router = ractor::registry::where_is(ANDON_ALERTS);
    if router.is_some_and(|a| a.send_message(AlertMsg::Raise(alert.clone())).is_ok()) {
        return;
    }
    tracing::warn!(key = %alert.key, severity = alert.severity.as_str(), summary = %alert.summary, "alert raised while andon_alerts is not running: kept until it runs");
    {
        let mut p = pending();
        if p.len() >= PENDING_MAX {
            if let Some(old) = p.pop_front() {
                tracing::warn!(key = %old.key, kept = PENDING_MAX, "an alert kept for andon_alerts dropped: too many wait");
            }
        }
        p.push_back(alert);
    }
    // It may have started (and taken what waited) since the look-up.
    if let Some(a) = ractor::registry::where_is(ANDON_ALERTS) {
        let mut p = pending();
        while let Some(kept) = p.pop_front() {
            if let Err(e) = a.send_message(AlertMsg::Raise(kept)) {
                if let ractor::MessagingErr::SendErr(AlertMsg::Raise(kept)) = e {
                    p.push_front(kept);
                }
                break;
            }
        }
    }
}

/// The alerts kept while `andon_alerts` was not running, oldest first; it
/// takes them as it starts.
pub fn take_pending() -> Vec<Alert> {
    pending().drain(..).collect()
}
