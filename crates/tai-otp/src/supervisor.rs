//! The supervisor actor: OTP's `supervisor` behaviour on ractor.
//!
//! ractor's own linking only reports child exits; everything OTP does with
//! them (which children restart, in which order, how often before giving up,
//! how they are stopped) is done here. The supervisor keeps its own ordered
//! child list because ractor's `get_children()` is unordered and keeps no
//! restart counts.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::hook::{emit_restart, RestartEvent};
use crate::report::{ChildInfo, ChildStatus, SupervisorReport};
use crate::spec::{ChildSpec, Exit, Restart, Shutdown, Strategy, SupervisorSpec};

/// How long to wait for a killed actor to be gone before moving on.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// How long a restart waits for a dying actor to release its registered name.
const NAME_RELEASE_WAIT: Duration = Duration::from_secs(5);

/// The supervisor behaviour. Start it with a [`SupervisorSpec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Supervisor;

/// Requests a supervisor answers; everything else it learns from supervision events.
pub enum SupervisorMsg {
    /// OTP `which_children/1`, with restart counts and failure reasons.
    WhichChildren(RpcReplyPort<SupervisorReport>),
    /// OTP `start_child/2`. For an id that is already running, answers the running child.
    StartChild(ChildSpec, RpcReplyPort<Result<ActorCell, StartChildError>>),
    /// OTP `terminate_child/2` followed by `delete_child/2`; answers whether it existed.
    TerminateChild(String, RpcReplyPort<bool>),
    /// Internal: restart these children (after a backoff, or to retry a failed start).
    Restart { seqs: Vec<u64>, token: u64 },
}

impl std::fmt::Debug for SupervisorMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SupervisorMsg::WhichChildren(_) => write!(f, "WhichChildren"),
            SupervisorMsg::StartChild(spec, _) => write!(f, "StartChild({})", spec.id),
            SupervisorMsg::TerminateChild(id, _) => write!(f, "TerminateChild({id})"),
            SupervisorMsg::Restart { seqs, token } => write!(f, "Restart({seqs:?}, {token})"),
        }
    }
}

/// Why an actor did not start, as its `pre_start` said it. ractor words
/// every failed start as "Actor panicked during startup '…'" (most are
/// errors returned, not panics), and each supervisor level would wrap the
/// level below in it once more.
pub fn startup_reason(e: &ractor::SpawnErr) -> String {
    match e {
        ractor::SpawnErr::StartupFailed(inner) => inner.to_string(),
        other => other.to_string(),
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StartChildError {
    #[error("max_children reached ({0})")]
    MaxChildren(usize),
    #[error("child failed to start: {0}")]
    Start(String),
}

struct Child {
    spec: ChildSpec,
    cell: Option<ActorCell>,
    status: ChildStatus,
    restarts: u64,
    last_failure: Option<String>,
    started_at: Option<SystemTime>,
    started_instant: Option<Instant>,
    /// Consecutive restarts for backoff; reset once the child has run `reset_after`.
    consecutive: u32,
    /// The token of the restart this child is waiting for, if any.
    pending: Option<u64>,
}

impl Child {
    fn new(spec: ChildSpec) -> Self {
        Child {
            spec,
            cell: None,
            status: ChildStatus::Terminated,
            restarts: 0,
            last_failure: None,
            started_at: None,
            started_instant: None,
            consecutive: 0,
            pending: None,
        }
    }
}

pub struct SupervisorState {
    name: String,
    strategy: Strategy,
    intensity: u32,
    period: Duration,
    max_children: Option<usize>,
    children: BTreeMap<u64, Child>,
    by_id: HashMap<String, u64>,
    by_actor: HashMap<ActorId, u64>,
    next_seq: u64,
    next_token: u64,
    restart_times: VecDeque<Instant>,
    total_restarts: u64,
}

impl SupervisorState {
    fn insert(&mut self, spec: ChildSpec) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_id.insert(spec.id.clone(), seq);
        self.children.insert(seq, Child::new(spec));
        seq
    }

    fn remove(&mut self, seq: u64) {
        if let Some(child) = self.children.remove(&seq) {
            self.by_id.remove(&child.spec.id);
            if let Some(cell) = child.cell {
                self.by_actor.remove(&cell.get_id());
            }
        }
    }

    /// OTP's `add_restart`: one more restart inside the period, or an error when
    /// that exceeds the intensity.
    fn add_restart(&mut self) -> Result<(), String> {
        let now = Instant::now();
        self.restart_times.push_back(now);
        while let Some(first) = self.restart_times.front() {
            if now.duration_since(*first) > self.period {
                self.restart_times.pop_front();
            } else {
                break;
            }
        }
        if self.restart_times.len() as u64 > u64::from(self.intensity) {
            Err(format!(
                "reached_max_restart_intensity ({} in {}s)",
                self.intensity,
                self.period.as_secs_f64()
            ))
        } else {
            Ok(())
        }
    }

    /// The children a failure of `seq` takes down, in start order.
    fn affected_by(&self, seq: u64) -> Vec<u64> {
        match self.strategy {
            Strategy::OneForOne | Strategy::SimpleOneForOne => vec![seq],
            Strategy::OneForAll => self.children.keys().copied().collect(),
            Strategy::RestForOne => self.children.range(seq..).map(|(s, _)| *s).collect(),
        }
    }

    fn live_children(&self) -> usize {
        self.children
            .values()
            .filter(|c| c.cell.is_some() || c.status == ChildStatus::Restarting)
            .count()
    }

    fn report(&self) -> SupervisorReport {
        SupervisorReport {
            name: self.name.clone(),
            strategy: self.strategy,
            intensity: self.intensity,
            period_secs: self.period.as_secs_f64(),
            total_restarts: self.total_restarts,
            children: self
                .children
                .values()
                .map(|c| ChildInfo {
                    id: c.spec.id.clone(),
                    name: c.spec.name.clone().unwrap_or_else(|| c.spec.id.clone()),
                    actor_id: c.cell.as_ref().map(|cell| cell.get_id().to_string()),
                    kind: c.spec.kind,
                    restart: c.spec.restart,
                    status: c.status,
                    restarts: c.restarts,
                    last_failure: c.last_failure.clone(),
                    started_at_ms: c.started_at.and_then(|t| {
                        t.duration_since(UNIX_EPOCH)
                            .ok()
                            .map(|d| d.as_millis() as u64)
                    }),
                    cell: c.cell.clone(),
                })
                .collect(),
        }
    }
}

/// Stops one child the way its spec says: kill, or stop and wait then kill.
pub(crate) async fn shutdown_cell(cell: &ActorCell, shutdown: Shutdown, id: &str) {
    match shutdown {
        Shutdown::BrutalKill => {
            cell.kill();
            let _ = cell.wait(Some(KILL_WAIT)).await;
        }
        Shutdown::Timeout(limit) => {
            match cell
                .stop_and_wait(Some("shutdown".to_string()), Some(limit))
                .await
            {
                Ok(()) => {}
                Err(ractor::RactorErr::Timeout) => {
                    warn!(
                        child = id,
                        timeout_ms = limit.as_millis() as u64,
                        "child did not stop in time, killing it"
                    );
                    cell.kill();
                    let _ = cell.wait(Some(KILL_WAIT)).await;
                }
                // Already gone.
                Err(_) => {}
            }
        }
    }
}

impl Supervisor {
    async fn start_child_at(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        seq: u64,
    ) -> Result<ActorCell, String> {
        let child = state.children.get_mut(&seq).ok_or("child vanished")?;
        let start = child.spec.start.clone();
        let mut result = start(myself.get_cell()).await;
        if let Err(ractor::SpawnErr::ActorAlreadyRegistered(name)) = &result {
            // The previous holder of the name may still be dying: ractor kills
            // a killed supervisor's children asynchronously, and a name is
            // released only once its actor stops. Wait for it, then try again.
            if let Some(old) = ractor::registry::where_is(name.clone()) {
                if old.wait(Some(NAME_RELEASE_WAIT)).await.is_err() {
                    warn!(name = %name, "registered name still held by a live actor");
                }
            }
            result = start(myself.get_cell()).await;
        }
        match result {
            Ok(cell) => {
                let child = state.children.get_mut(&seq).ok_or("child vanished")?;
                child.cell = Some(cell.clone());
                child.status = ChildStatus::Running;
                child.pending = None;
                child.started_at = Some(SystemTime::now());
                child.started_instant = Some(Instant::now());
                state.by_actor.insert(cell.get_id(), seq);
                Ok(cell)
            }
            Err(e) => {
                let reason = format!("failed_to_start_child: {}", startup_reason(&e));
                child_mut(state, seq).last_failure = Some(reason.clone());
                Err(reason)
            }
        }
    }

    async fn shutdown_child(state: &mut SupervisorState, seq: u64) {
        let Some(child) = state.children.get_mut(&seq) else {
            return;
        };
        let Some(cell) = child.cell.take() else {
            return;
        };
        // Forget the actor first: its exit event is ours, not a failure to act on.
        state.by_actor.remove(&cell.get_id());
        child.status = ChildStatus::Terminated;
        let (shutdown, id) = (child.spec.shutdown, child.spec.id.clone());
        shutdown_cell(&cell, shutdown, &id).await;
    }

    /// Stops every child: reverse start order for static supervisors, all at
    /// once for a dynamic one (as OTP does for `simple_one_for_one`).
    async fn shutdown_all(state: &mut SupervisorState) {
        if state.strategy == Strategy::SimpleOneForOne {
            let mut stopping = Vec::new();
            for child in state.children.values_mut() {
                if let Some(cell) = child.cell.take() {
                    child.status = ChildStatus::Terminated;
                    stopping.push((cell, child.spec.shutdown, child.spec.id.clone()));
                }
            }
            state.by_actor.clear();
            futures::future::join_all(
                stopping
                    .iter()
                    .map(|(cell, shutdown, id)| shutdown_cell(cell, *shutdown, id)),
            )
            .await;
        } else {
            let seqs: Vec<u64> = state.children.keys().rev().copied().collect();
            for seq in seqs {
                Self::shutdown_child(state, seq).await;
            }
        }
    }

    /// Gives up: stops the children in order and fails, so the parent sees why.
    async fn escalate(
        state: &mut SupervisorState,
        reason: String,
        cause: &str,
    ) -> Result<(), ActorProcessingErr> {
        let full = format!("{reason}; last exit: {cause}");
        error!(supervisor = %state.name, reason = %full, "supervisor giving up, escalating");
        Self::shutdown_all(state).await;
        Err(full.into())
    }

    /// Starts `seqs` in start order; a start that fails is retried through a
    /// message, counting against intensity each time, as OTP's `try_again_restart`.
    async fn restart_children(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        seqs: &[u64],
        reason: &str,
    ) {
        for (i, seq) in seqs.iter().enumerate() {
            if !state.children.contains_key(seq) {
                continue;
            }
            match Self::start_child_at(myself, state, *seq).await {
                Ok(_) => {
                    let child = child_mut(state, *seq);
                    child.restarts += 1;
                    let id = child.spec.id.clone();
                    state.total_restarts += 1;
                    info!(supervisor = %state.name, child = %id, reason, "child restarted");
                    emit_restart(&RestartEvent {
                        supervisor: &state.name,
                        child: &id,
                        reason,
                    });
                }
                Err(e) => {
                    let id = child_mut(state, *seq).spec.id.clone();
                    warn!(supervisor = %state.name, child = %id, error = %e, "restart failed, trying again");
                    let token = state.next_token;
                    state.next_token += 1;
                    let rest = seqs[i..].to_vec();
                    for s in &rest {
                        if let Some(c) = state.children.get_mut(s) {
                            c.status = ChildStatus::Restarting;
                            c.pending = Some(token);
                        }
                    }
                    let _ = myself.send_message(SupervisorMsg::Restart { seqs: rest, token });
                    return;
                }
            }
        }
    }

    async fn child_exited(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        actor: ActorId,
        exit: Exit,
    ) -> Result<(), ActorProcessingErr> {
        let Some(seq) = state.by_actor.remove(&actor) else {
            // An actor we already stopped ourselves, or one we no longer track.
            return Ok(());
        };
        let dynamic = state.strategy == Strategy::SimpleOneForOne;
        let name = state.name.clone();
        let child = child_mut(state, seq);
        child.cell = None;
        let id = child.spec.id.clone();
        let reason = exit.describe();
        let restart = match child.spec.restart {
            Restart::Permanent => true,
            Restart::Transient => exit.is_abnormal(),
            Restart::Temporary => false,
        };
        if exit.is_abnormal() {
            child.last_failure = Some(reason.clone());
            warn!(supervisor = %name, child = %id, reason = %reason, "child exited abnormally");
        } else {
            debug!(supervisor = %name, child = %id, reason = %reason, "child exited");
        }
        if !restart {
            if dynamic || child.spec.restart == Restart::Temporary {
                state.remove(seq);
            } else {
                child.status = ChildStatus::Terminated;
            }
            return Ok(());
        }

        if let (Some(backoff), Some(started)) = (child.spec.backoff, child.started_instant) {
            if started.elapsed() >= backoff.reset_after {
                child.consecutive = 0;
            }
        }
        let backoff = child.spec.backoff;

        let mut affected = state.affected_by(seq);
        for s in affected.iter().rev() {
            if *s != seq {
                Self::shutdown_child(state, *s).await;
            }
        }
        // Temporary siblings stopped by the strategy are not started again.
        affected.retain(|s| {
            *s == seq || state.children.get(s).map(|c| c.spec.restart) != Some(Restart::Temporary)
        });
        for s in state.affected_by(seq) {
            if !affected.contains(&s) {
                state.remove(s);
            }
        }

        if let Some(backoff) = backoff {
            let child = child_mut(state, seq);
            let delay = backoff.delay(child.consecutive, fastrand::f64());
            child.consecutive = child.consecutive.saturating_add(1);
            let token = state.next_token;
            state.next_token += 1;
            for s in &affected {
                let c = child_mut(state, *s);
                c.status = ChildStatus::Restarting;
                c.pending = Some(token);
            }
            info!(supervisor = %state.name, child = %id, delay_ms = delay.as_millis() as u64, "restart after backoff");
            let me = myself.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = me.send_message(SupervisorMsg::Restart {
                    seqs: affected,
                    token,
                });
            });
            return Ok(());
        }

        if let Err(over) = state.add_restart() {
            return Self::escalate(state, over, &format!("{id}: {reason}")).await;
        }
        Self::restart_children(myself, state, &affected, &reason).await;
        Ok(())
    }
}

fn child_mut(state: &mut SupervisorState, seq: u64) -> &mut Child {
    state
        .children
        .get_mut(&seq)
        .expect("supervisor child list and index agree")
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorSpec;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        spec: SupervisorSpec,
    ) -> Result<Self::State, ActorProcessingErr> {
        let name = myself
            .get_name()
            .unwrap_or_else(|| format!("supervisor-{}", myself.get_id()));
        let mut state = SupervisorState {
            name,
            strategy: spec.strategy,
            intensity: spec.intensity,
            period: spec.period,
            max_children: spec.max_children,
            children: BTreeMap::new(),
            by_id: HashMap::new(),
            by_actor: HashMap::new(),
            next_seq: 0,
            next_token: 0,
            restart_times: VecDeque::new(),
            total_restarts: 0,
        };
        for child in spec.children {
            if state.by_id.contains_key(&child.id) {
                return Err(format!("duplicate child id {}", child.id).into());
            }
            let id = child.id.clone();
            let seq = state.insert(child);
            if let Err(e) = Self::start_child_at(&myself, &mut state, seq).await {
                Self::shutdown_all(&mut state).await;
                return Err(format!("shutdown: child {id} {e}").into());
            }
        }
        debug!(supervisor = %state.name, strategy = state.strategy.as_str(), "supervisor started");
        Ok(state)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        Self::shutdown_all(state).await;
        debug!(supervisor = %state.name, "supervisor stopped");
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::WhichChildren(reply) => {
                let _ = reply.send(state.report());
            }
            SupervisorMsg::StartChild(spec, reply) => {
                let answer = Self::start_new_child(&myself, state, spec).await;
                let _ = reply.send(answer);
            }
            SupervisorMsg::TerminateChild(id, reply) => {
                let existed = match state.by_id.get(&id).copied() {
                    Some(seq) => {
                        Self::shutdown_child(state, seq).await;
                        state.remove(seq);
                        true
                    }
                    None => false,
                };
                let _ = reply.send(existed);
            }
            SupervisorMsg::Restart { seqs, token } => {
                let due: Vec<u64> = seqs
                    .into_iter()
                    .filter(|s| {
                        state
                            .children
                            .get(s)
                            .is_some_and(|c| c.pending == Some(token) && c.cell.is_none())
                    })
                    .collect();
                if due.is_empty() {
                    return Ok(());
                }
                let cause = due
                    .first()
                    .and_then(|s| state.children.get(s))
                    .map(|c| {
                        format!(
                            "{}: {}",
                            c.spec.id,
                            c.last_failure.as_deref().unwrap_or("restart")
                        )
                    })
                    .unwrap_or_default();
                if let Err(over) = state.add_restart() {
                    return Self::escalate(state, over, &cause).await;
                }
                Self::restart_children(&myself, state, &due, &cause).await;
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Overridden on purpose: ractor's default stops the supervisor on any
        // child exit and drops the cause.
        match evt {
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                Self::child_exited(
                    &myself,
                    state,
                    cell.get_id(),
                    Exit::from_stop_reason(reason),
                )
                .await
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                Self::child_exited(
                    &myself,
                    state,
                    cell.get_id(),
                    Exit::Abnormal(err.to_string()),
                )
                .await
            }
            _ => Ok(()),
        }
    }
}

impl Supervisor {
    async fn start_new_child(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        spec: ChildSpec,
    ) -> Result<ActorCell, StartChildError> {
        if let Some(seq) = state.by_id.get(&spec.id).copied() {
            let child = child_mut(state, seq);
            if let Some(cell) = &child.cell {
                return Ok(cell.clone());
            }
            if child.status == ChildStatus::Restarting {
                return Err(StartChildError::Start(format!(
                    "{} is waiting to restart",
                    spec.id
                )));
            }
            // A terminated child is started again with the new spec, in its place.
            child.spec = spec;
            return Self::start_child_at(myself, state, seq)
                .await
                .map_err(StartChildError::Start);
        }
        if let Some(max) = state.max_children {
            // Counted only near the cap (at most every child is live), so
            // starting a child under a dynamic supervisor of thousands does
            // not walk them all.
            if state.children.len() >= max && state.live_children() >= max {
                return Err(StartChildError::MaxChildren(max));
            }
        }
        let seq = state.insert(spec);
        match Self::start_child_at(myself, state, seq).await {
            Ok(cell) => Ok(cell),
            Err(e) => {
                state.remove(seq);
                Err(StartChildError::Start(e))
            }
        }
    }
}
