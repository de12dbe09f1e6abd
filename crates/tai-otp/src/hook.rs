//! A process-wide hook that hears of every restart, so the metrics layer can
//! count them without tai-otp knowing of metrics (like Erlang's `telemetry`).

use std::sync::OnceLock;

/// One child restarted by one supervisor.
#[derive(Debug, Clone, Copy)]
pub struct RestartEvent<'a> {
    pub supervisor: &'a str,
    pub child: &'a str,
    pub reason: &'a str,
}

type Hook = Box<dyn Fn(&RestartEvent<'_>) + Send + Sync>;

static HOOK: OnceLock<Hook> = OnceLock::new();

/// Installs the restart hook; only the first call takes effect. Returns whether it did.
pub fn set_restart_hook(hook: impl Fn(&RestartEvent<'_>) + Send + Sync + 'static) -> bool {
    HOOK.set(Box::new(hook)).is_ok()
}

pub(crate) fn emit_restart(event: &RestartEvent<'_>) {
    if let Some(hook) = HOOK.get() {
        hook(event);
    }
}
