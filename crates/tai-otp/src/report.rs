//! What supervisors say about their children, and the whole live tree built from it.

use std::time::Duration;

use futures::future::BoxFuture;
use ractor::{ActorCell, ActorStatus};
use serde::Serialize;

use crate::spec::{ChildKind, Restart, Strategy};
use crate::supervisor::SupervisorMsg;

/// A child's status as its supervisor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildStatus {
    Running,
    /// Waiting out a backoff, or a failed start being retried.
    Restarting,
    /// Stopped and not to be restarted (a transient child that ended normally).
    Terminated,
}

impl ChildStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ChildStatus::Running => "running",
            ChildStatus::Restarting => "restarting",
            ChildStatus::Terminated => "terminated",
        }
    }
}

/// One row of `which_children`.
#[derive(Debug, Clone, Serialize)]
pub struct ChildInfo {
    pub id: String,
    pub name: String,
    pub actor_id: Option<String>,
    pub kind: ChildKind,
    pub restart: Restart,
    pub status: ChildStatus,
    pub restarts: u64,
    pub last_failure: Option<String>,
    pub started_at_ms: Option<u64>,
    #[serde(skip)]
    pub cell: Option<ActorCell>,
}

/// A supervisor's answer to `which_children`.
#[derive(Debug, Clone, Serialize)]
pub struct SupervisorReport {
    pub name: String,
    pub strategy: Strategy,
    pub intensity: u32,
    pub period_secs: f64,
    pub total_restarts: u64,
    pub children: Vec<ChildInfo>,
}

/// A node of the live tree, in the JSON shape of SPEC §4.
#[derive(Debug, Clone, Serialize)]
pub struct TreeNode {
    pub name: String,
    pub id: String,
    pub kind: ChildKind,
    pub status: String,
    pub restarts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intensity: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    pub children: Vec<TreeNode>,
}

impl TreeNode {
    /// Depth-first search by registered name.
    pub fn find(&self, name: &str) -> Option<&TreeNode> {
        if self.name == name {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(name))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("supervisor did not answer within {0:?}")]
    Timeout(Duration),
    #[error("supervisor is not running")]
    Down,
}

/// Asks a supervisor for its children.
pub async fn which_children(
    supervisor: &ActorCell,
    timeout: Duration,
) -> Result<SupervisorReport, CallError> {
    match ractor::rpc::call(supervisor, SupervisorMsg::WhichChildren, Some(timeout)).await {
        Ok(ractor::rpc::CallResult::Success(report)) => Ok(report),
        Ok(ractor::rpc::CallResult::Timeout) => Err(CallError::Timeout(timeout)),
        _ => Err(CallError::Down),
    }
}

fn status_name(status: ActorStatus) -> &'static str {
    match status {
        ActorStatus::Unstarted => "unstarted",
        ActorStatus::Starting => "starting",
        ActorStatus::Running | ActorStatus::Upgrading => "running",
        ActorStatus::Draining => "draining",
        ActorStatus::Stopping => "stopping",
        ActorStatus::Stopped => "stopped",
    }
}

/// Gives the `state` of a worker by registered name (policy engines report theirs).
pub type Annotate<'a> = &'a (dyn Fn(&str) -> Option<String> + Sync);

/// Assembles the live tree below `root`, asking each supervisor in turn.
/// A supervisor that does not answer in `timeout` appears without children.
pub async fn tree(root: &ActorCell, timeout: Duration, annotate: Annotate<'_>) -> TreeNode {
    let name = root.get_name().unwrap_or_else(|| root.get_id().to_string());
    let mut node = TreeNode {
        name,
        id: root.get_id().to_string(),
        kind: ChildKind::Supervisor,
        status: status_name(root.get_status()).to_string(),
        restarts: 0,
        strategy: None,
        intensity: None,
        period_secs: None,
        state: None,
        last_failure: None,
        started_at_ms: None,
        children: Vec::new(),
    };
    fill(&mut node, root, timeout, annotate).await;
    node
}

fn fill<'a>(
    node: &'a mut TreeNode,
    cell: &'a ActorCell,
    timeout: Duration,
    annotate: Annotate<'a>,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let Ok(report) = which_children(cell, timeout).await else {
            return;
        };
        node.strategy = Some(report.strategy);
        node.intensity = Some(report.intensity);
        node.period_secs = Some(report.period_secs);
        for child in report.children {
            let status = match (&child.cell, child.status) {
                (Some(cell), ChildStatus::Running) => status_name(cell.get_status()).to_string(),
                (_, other) => other.as_str().to_string(),
            };
            let mut sub = TreeNode {
                state: if child.kind == ChildKind::Worker {
                    annotate(&child.name)
                } else {
                    None
                },
                name: child.name,
                id: child.actor_id.unwrap_or_default(),
                kind: child.kind,
                status,
                restarts: child.restarts,
                strategy: None,
                intensity: None,
                period_secs: None,
                last_failure: child.last_failure,
                started_at_ms: child.started_at_ms,
                children: Vec::new(),
            };
            if let (ChildKind::Supervisor, Some(cell)) = (child.kind, &child.cell) {
                fill(&mut sub, cell, timeout, annotate).await;
            }
            node.children.push(sub);
        }
    })
}
