//! Child and supervisor specifications: the data an OTP `child_spec()` and
//! `init/1` return, as Rust values.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorCell, SpawnErr};
use serde::Serialize;

/// When a child that exits is started again (OTP `restart`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Restart {
    /// Always restarted.
    Permanent,
    /// Restarted only when it exits abnormally.
    Transient,
    /// Never restarted, not even when a sibling's restart stopped it.
    Temporary,
}

/// How a child is stopped by its supervisor (OTP `shutdown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Killed at once: no `post_stop`.
    BrutalKill,
    /// Asked to stop, its `post_stop` runs; killed if it has not stopped in time.
    Timeout(Duration),
}

impl Shutdown {
    /// OTP's default for workers: 5 s.
    pub const WORKER_DEFAULT: Shutdown = Shutdown::Timeout(Duration::from_secs(5));
    /// Supervisors get long enough to stop their own subtree in order.
    pub const SUPERVISOR_DEFAULT: Shutdown = Shutdown::Timeout(Duration::from_secs(60));
}

/// Worker or supervisor (OTP `type`); supervisors are descended into by the tree helper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildKind {
    Worker,
    Supervisor,
}

/// Restart strategy (OTP `strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Only the child that exited is restarted.
    OneForOne,
    /// Every child is stopped (reverse start order) and restarted (start order).
    OneForAll,
    /// The child and every child started after it are stopped and restarted.
    RestForOne,
    /// Children of one kind are added and removed at run time by key; each
    /// restarts alone. Used for the per-tenant engines.
    SimpleOneForOne,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::OneForOne => "one_for_one",
            Strategy::OneForAll => "one_for_all",
            Strategy::RestForOne => "rest_for_one",
            Strategy::SimpleOneForOne => "simple_one_for_one",
        }
    }
}

/// Per-child restart backoff, an extension to OTP (off unless a child spec sets it).
///
/// The n-th consecutive restart waits `min(max, base * 2^n)`, spread by
/// `jitter` (0.0..=1.0) either way. A child that ran for `reset_after` without
/// failing starts again from `base`. The restart is counted against the
/// supervisor's intensity when it happens, not while it waits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    pub jitter: f64,
    pub reset_after: Duration,
}

impl Backoff {
    pub fn delay(&self, consecutive: u32, random_unit: f64) -> Duration {
        let factor = 2u32.saturating_pow(consecutive.min(30));
        let raw = self.base.saturating_mul(factor).min(self.max);
        let spread = (random_unit * 2.0 - 1.0) * self.jitter.clamp(0.0, 1.0);
        raw.mul_f64((1.0 + spread).max(0.0))
    }
}

pub type StartFuture = Pin<Box<dyn Future<Output = Result<ActorCell, SpawnErr>> + Send>>;
/// Starts the child linked to the supervisor cell it is given.
pub type StartFn = Arc<dyn Fn(ActorCell) -> StartFuture + Send + Sync>;

/// One child of a supervisor.
#[derive(Clone)]
pub struct ChildSpec {
    /// Unique among the supervisor's children; the key of a dynamic child.
    pub id: String,
    /// Registered name of the child actor, if it has one.
    pub name: Option<String>,
    pub start: StartFn,
    pub restart: Restart,
    pub shutdown: Shutdown,
    pub kind: ChildKind,
    pub backoff: Option<Backoff>,
}

impl fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildSpec")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("restart", &self.restart)
            .field("shutdown", &self.shutdown)
            .field("kind", &self.kind)
            .field("backoff", &self.backoff)
            .finish()
    }
}

impl ChildSpec {
    /// A worker: `actor` is cloned and `args` called afresh at every (re)start.
    pub fn worker<A, F>(id: impl Into<String>, name: Option<String>, actor: A, args: F) -> Self
    where
        A: Actor + Clone + Sync,
        F: Fn() -> A::Arguments + Send + Sync + 'static,
    {
        let registered = name.clone();
        let start: StartFn = Arc::new(move |sup: ActorCell| {
            let actor = actor.clone();
            let args = args();
            let name = name.clone();
            Box::pin(async move {
                let (r, _) = Actor::spawn_linked(name, actor, args, sup).await?;
                Ok(r.get_cell())
            })
        });
        let id = id.into();
        ChildSpec {
            name: registered,
            id,
            start,
            restart: Restart::Permanent,
            shutdown: Shutdown::WORKER_DEFAULT,
            kind: ChildKind::Worker,
            backoff: None,
        }
    }

    /// A supervisor child, registered under `id`.
    pub fn supervisor(id: impl Into<String>, spec: crate::SupervisorSpec) -> Self {
        let id = id.into();
        let name = id.clone();
        let start: StartFn = Arc::new(move |sup: ActorCell| {
            let spec = spec.clone();
            let name = name.clone();
            Box::pin(async move {
                let (r, _) = Actor::spawn_linked(Some(name), crate::Supervisor, spec, sup).await?;
                Ok(r.get_cell())
            })
        });
        ChildSpec {
            name: Some(id.clone()),
            id,
            start,
            restart: Restart::Permanent,
            shutdown: Shutdown::SUPERVISOR_DEFAULT,
            kind: ChildKind::Supervisor,
            backoff: None,
        }
    }

    pub fn restart(mut self, restart: Restart) -> Self {
        self.restart = restart;
        self
    }
    pub fn shutdown(mut self, shutdown: Shutdown) -> Self {
        self.shutdown = shutdown;
        self
    }
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = Some(backoff);
        self
    }
}

/// What a supervisor is started with (OTP `init/1`'s return value).
#[derive(Clone, Debug)]
pub struct SupervisorSpec {
    pub strategy: Strategy,
    /// At most this many restarts within `period`; one more escalates.
    pub intensity: u32,
    pub period: Duration,
    /// Static children, started in this order. Empty for `simple_one_for_one`.
    pub children: Vec<ChildSpec>,
    /// Cap on dynamic children (`simple_one_for_one`); `None` for no cap.
    pub max_children: Option<usize>,
}

impl SupervisorSpec {
    /// OTP's defaults: intensity 1 in 5 s.
    pub fn new(strategy: Strategy) -> Self {
        SupervisorSpec {
            strategy,
            intensity: 1,
            period: Duration::from_secs(5),
            children: Vec::new(),
            max_children: None,
        }
    }
    pub fn intensity(mut self, intensity: u32, period: Duration) -> Self {
        self.intensity = intensity;
        self.period = period;
        self
    }
    pub fn child(mut self, child: ChildSpec) -> Self {
        self.children.push(child);
        self
    }
    pub fn max_children(mut self, max: usize) -> Self {
        self.max_children = Some(max);
        self
    }
}

/// How a child ended, as the supervisor classifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `normal`, `shutdown` or `{shutdown, _}`: a transient child stays down.
    Normal(Option<String>),
    /// A panic, an `Err` from a handler, a kill or any other stop reason.
    Abnormal(String),
}

impl Exit {
    /// Classifies a ractor stop reason the way OTP classifies exit reasons.
    pub fn from_stop_reason(reason: Option<String>) -> Exit {
        match reason {
            None => Exit::Normal(None),
            Some(r)
                if r == "normal"
                    || r == "shutdown"
                    || r.starts_with("shutdown:")
                    || r == "Drained" =>
            {
                Exit::Normal(Some(r))
            }
            Some(r) => Exit::Abnormal(r),
        }
    }
    pub fn is_abnormal(&self) -> bool {
        matches!(self, Exit::Abnormal(_))
    }
    pub fn describe(&self) -> String {
        match self {
            Exit::Normal(None) => "normal".into(),
            Exit::Normal(Some(r)) | Exit::Abnormal(r) => r.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reasons_follow_otp() {
        assert_eq!(Exit::from_stop_reason(None), Exit::Normal(None));
        assert!(!Exit::from_stop_reason(Some("shutdown".into())).is_abnormal());
        assert!(!Exit::from_stop_reason(Some("shutdown: passivated".into())).is_abnormal());
        assert!(Exit::from_stop_reason(Some("killed".into())).is_abnormal());
        assert!(Exit::from_stop_reason(Some("boom".into())).is_abnormal());
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_jitters_both_ways() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
            jitter: 0.5,
            reset_after: Duration::from_secs(10),
        };
        assert_eq!(b.delay(0, 0.5), Duration::from_millis(100));
        assert_eq!(b.delay(2, 0.5), Duration::from_millis(400));
        assert_eq!(b.delay(10, 0.5), Duration::from_secs(1));
        assert_eq!(b.delay(0, 0.0), Duration::from_millis(50));
        assert_eq!(b.delay(0, 1.0), Duration::from_millis(150));
    }
}
