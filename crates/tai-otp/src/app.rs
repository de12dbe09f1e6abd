//! The root of a tree: OTP's application master. It starts the top
//! supervisor linked to itself, so that the top supervisor's end (normal or
//! an escalation past its intensity) is heard, with its cause, by whoever
//! runs the node.

use std::sync::Mutex;
use std::time::Duration;

use ractor::{
    Actor, ActorCell, ActorProcessingErr, ActorRef, ActorStatus, SpawnErr, SupervisionEvent,
};
use tokio::sync::oneshot;

use crate::spec::{Exit, SupervisorSpec};
use crate::supervisor::{shutdown_cell, Supervisor, SupervisorMsg};
use crate::Shutdown;

/// A running tree.
pub struct Application {
    pub root: ActorRef<SupervisorMsg>,
    master: ActorRef<()>,
    exit: oneshot::Receiver<Exit>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("root", &self.root.get_name())
            .finish()
    }
}

struct Master;

struct MasterArgs {
    name: String,
    spec: SupervisorSpec,
    exit: oneshot::Sender<Exit>,
}

struct MasterState {
    root: ActorRef<SupervisorMsg>,
    exit: Mutex<Option<oneshot::Sender<Exit>>>,
}

impl Actor for Master {
    type Msg = ();
    type State = MasterState;
    type Arguments = MasterArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<()>,
        args: MasterArgs,
    ) -> Result<MasterState, ActorProcessingErr> {
        let (root, _) =
            Actor::spawn_linked(Some(args.name), Supervisor, args.spec, myself.get_cell())
                .await
                .map_err(|e| crate::supervisor::startup_reason(&e))?;
        Ok(MasterState {
            root,
            exit: Mutex::new(Some(args.exit)),
        })
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        evt: SupervisionEvent,
        state: &mut MasterState,
    ) -> Result<(), ActorProcessingErr> {
        let exit = match evt {
            SupervisionEvent::ActorTerminated(cell, _, reason)
                if cell.get_id() == state.root.get_id() =>
            {
                Exit::from_stop_reason(reason)
            }
            SupervisionEvent::ActorFailed(cell, err) if cell.get_id() == state.root.get_id() => {
                Exit::Abnormal(err.to_string())
            }
            _ => return Ok(()),
        };
        if let Some(tx) = state.exit.lock().expect("exit slot").take() {
            let _ = tx.send(exit);
        }
        myself.stop(None);
        Ok(())
    }
}

/// How long `start` waits for every actor of a new tree to finish starting.
const SETTLE_DEADLINE: Duration = Duration::from_secs(5);

/// Waits until no actor in the tree below `root` is still starting, or
/// `deadline` passes; gives the first one still starting then.
///
/// A supervisor starts its children in its own `pre_start`, so by the time
/// the root has been spawned every child exists; but ractor marks an actor
/// running only after its `post_start`, which runs on the actor's own task.
/// Waiting for that means a node announces itself only once its whole tree
/// reports `running`.
pub(crate) async fn settle(root: &ActorCell, deadline: Duration) -> Option<ActorCell> {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let starting = first_starting(root);
        if starting.is_none() || tokio::time::Instant::now() >= until {
            return starting;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn first_starting(cell: &ActorCell) -> Option<ActorCell> {
    if matches!(
        cell.get_status(),
        ActorStatus::Unstarted | ActorStatus::Starting
    ) {
        return Some(cell.clone());
    }
    cell.get_children().iter().find_map(first_starting)
}

impl Application {
    /// Starts the top supervisor, registered as `name`, and every child below it.
    pub async fn start(name: &str, spec: SupervisorSpec) -> Result<Application, SpawnErr> {
        let (tx, rx) = oneshot::channel();
        let (master, _) = Actor::spawn(
            None,
            Master,
            MasterArgs {
                name: name.to_string(),
                spec,
                exit: tx,
            },
        )
        .await?;
        let root = ractor::registry::where_is(name)
            .map(ActorRef::from)
            .ok_or_else(|| SpawnErr::StartupFailed("root supervisor vanished at start".into()))?;
        if let Some(cell) = settle(&root.get_cell(), SETTLE_DEADLINE).await {
            tracing::warn!(
                actor = %cell.get_name().unwrap_or_else(|| cell.get_id().to_string()),
                "still starting {SETTLE_DEADLINE:?} after the tree was started"
            );
        }
        Ok(Application {
            root,
            master,
            exit: rx,
        })
    }

    /// Waits for the tree to end by itself, and says how.
    pub async fn wait(&mut self) -> Exit {
        (&mut self.exit)
            .await
            .unwrap_or_else(|_| Exit::Abnormal("application master vanished".into()))
    }

    /// Graceful stop: the root stops its children in reverse order, each within
    /// its own shutdown; the whole is killed past `grace`.
    pub async fn stop(mut self, grace: Duration) -> Exit {
        shutdown_cell(&self.root.get_cell(), Shutdown::Timeout(grace), "root").await;
        let exit = self.wait().await;
        self.master.stop(None);
        exit
    }
}
