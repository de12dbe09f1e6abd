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

/// Raises an alert. If the alert router is not running (it restarts with
/// its layer), the alert is logged here instead of being lost silently.
pub fn raise(alert: Alert) {
    crate::kaizen::ALERTS_RAISED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match ractor::registry::where_is(ANDON_ALERTS) {
        Some(a) if a.send_message(AlertMsg::Raise(alert.clone())).is_ok() => {}
        _ => {
            tracing::warn!(key = %alert.key, severity = alert.severity.as_str(), summary = %alert.summary, "alert raised while andon_alerts is not running")
        }
    }
}
