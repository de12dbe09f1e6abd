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
    /// Alerts wait in the queue [`raise`] keeps ([`take_pending`]): route them.
    Raised,
    /// Recent alerts with their delivery status, newest last.
    Recent(ractor::RpcReplyPort<Vec<serde_json::Value>>),
    /// Internal: a channel finished (or gave up) delivering an alert.
    Delivered {
        id: u64,
        channel: String,
        result: Result<(), String>,
    },
}

/// Raised alerts not yet taken by `andon_alerts`, oldest first. They wait
/// here, not in its mailbox, so that none is lost with the router: one
/// killed or crashed (its mailbox goes with it) leaves them to the next,
/// which takes them as it starts, as it takes those raised while no
/// router ran (the node starting, its layer restarting). Bounded: past
/// [`PENDING_MAX`] the oldest go, logged.
static PENDING: std::sync::Mutex<std::collections::VecDeque<Alert>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());

/// Alerts waiting for `andon_alerts`, at most (~300 bytes each). A running
/// router takes every waiting one at each [`AlertMsg::Raised`].
pub const PENDING_MAX: usize = 16_384;

fn pending() -> std::sync::MutexGuard<'static, std::collections::VecDeque<Alert>> {
    PENDING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Raises an alert: queued for `andon_alerts` ([`take_pending`]), which is
/// told. If it is not running (it starts after the layers that raise, and
/// restarts with its layer) the alert waits for it, logged; a critical
/// alert raised as its layer restarts (the restart itself, say) would
/// otherwise be lost.
pub fn raise(alert: Alert) {
    crate::kaizen::ALERTS_RAISED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (key, severity, summary) = (alert.key.clone(), alert.severity, alert.summary.clone());
    {
        let mut p = pending();
        if p.len() >= PENDING_MAX {
            if let Some(old) = p.pop_front() {
                tracing::warn!(key = %old.key, kept = PENDING_MAX, "an alert waiting for andon_alerts dropped: too many wait");
            }
        }
        p.push_back(alert);
    }
    // Told after the alert is queued: a router that starts meanwhile takes
    // it as it starts, one running takes it at this message.
    let told = ractor::registry::where_is(ANDON_ALERTS)
        .is_some_and(|a| a.send_message(AlertMsg::Raised).is_ok());
    if !told {
        tracing::warn!(key = %key, severity = severity.as_str(), summary = %summary, "alert raised while andon_alerts is not running: kept until it runs");
    }
}

/// The alerts waiting for `andon_alerts`, oldest first: it takes them as
/// it starts and at each [`AlertMsg::Raised`].
pub fn take_pending() -> Vec<Alert> {
    pending().drain(..).collect()
}
