//! tai-otp: Erlang/OTP supervision on ractor.
//!
//! Supervisors with OTP's strategies (`one_for_one`, `one_for_all`,
//! `rest_for_one`, `simple_one_for_one`), restart types (`permanent`,
//! `transient`, `temporary`), restart intensity with escalation, ordered
//! shutdown with per-child timeouts, optional restart backoff, live tree
//! introspection and gen_statem helpers.
//!
//! Knows nothing of TAI: depends only on ractor and tokio. Every other TAI
//! crate that runs actors builds on it.

mod app;
mod hook;
mod report;
mod spec;
pub mod statem;
mod supervisor;

pub use app::Application;
pub use hook::{set_restart_hook, RestartEvent};
pub use report::{
    tree, which_children, Annotate, CallError, ChildInfo, ChildStatus, SupervisorReport, TreeNode,
};
pub use spec::{
    Backoff, ChildKind, ChildSpec, Exit, Restart, Shutdown, StartFn, StartFuture, Strategy,
    SupervisorSpec,
};
pub use supervisor::{startup_reason, StartChildError, Supervisor, SupervisorMsg};

use std::time::Duration;

use ractor::{ActorCell, ActorRef};

/// Asks a supervisor to start a child (OTP `start_child/2`).
pub async fn start_child(
    supervisor: &ActorRef<SupervisorMsg>,
    spec: ChildSpec,
    timeout: Duration,
) -> Result<ActorCell, StartChildError> {
    match supervisor
        .call(
            |reply| SupervisorMsg::StartChild(spec, reply),
            Some(timeout),
        )
        .await
    {
        Ok(ractor::rpc::CallResult::Success(answer)) => answer,
        Ok(ractor::rpc::CallResult::Timeout) => Err(StartChildError::Start(
            "supervisor did not answer in time".into(),
        )),
        Ok(ractor::rpc::CallResult::SenderError) => Err(StartChildError::Start(
            "supervisor stopped before answering".into(),
        )),
        Err(_) => Err(StartChildError::Start("supervisor is not running".into())),
    }
}

/// Asks a supervisor to stop and forget a child (OTP `terminate_child/2` + `delete_child/2`).
pub async fn terminate_child(
    supervisor: &ActorRef<SupervisorMsg>,
    id: &str,
    timeout: Duration,
) -> bool {
    matches!(
        supervisor
            .call(
                |reply| SupervisorMsg::TerminateChild(id.to_string(), reply),
                Some(timeout)
            )
            .await,
        Ok(ractor::rpc::CallResult::Success(true))
    )
}
