//! A probe worker that logs its starts and stops, and fails on request.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort};
use tai_otp::{ChildSpec, Restart, Shutdown, SupervisorMsg};

pub type Log = Arc<Mutex<Vec<String>>>;

pub fn new_log() -> Log {
    Arc::new(Mutex::new(Vec::new()))
}

pub fn entries(log: &Log) -> Vec<String> {
    log.lock().unwrap().clone()
}

#[derive(Clone)]
pub struct Probe {
    pub id: String,
    pub log: Log,
    pub slow_stop: Option<Duration>,
}

pub enum ProbeMsg {
    Panic,
    Fail,
    Stop,
    Ping(RpcReplyPort<()>),
}

impl Actor for Probe {
    type Msg = ProbeMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<ProbeMsg>, _: ()) -> Result<(), ActorProcessingErr> {
        self.log.lock().unwrap().push(format!("start:{}", self.id));
        Ok(())
    }

    async fn post_stop(&self, _: ActorRef<ProbeMsg>, _: &mut ()) -> Result<(), ActorProcessingErr> {
        if let Some(d) = self.slow_stop {
            self.log
                .lock()
                .unwrap()
                .push(format!("stopping:{}", self.id));
            tokio::time::sleep(d).await;
        }
        self.log.lock().unwrap().push(format!("stop:{}", self.id));
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ProbeMsg>,
        msg: ProbeMsg,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ProbeMsg::Panic => panic!("boom in {}", self.id),
            ProbeMsg::Fail => return Err(format!("fail in {}", self.id).into()),
            ProbeMsg::Stop => myself.stop(None),
            ProbeMsg::Ping(reply) => {
                let _ = reply.send(());
            }
        }
        Ok(())
    }
}

pub fn probe(id: &str, log: &Log, restart: Restart) -> ChildSpec {
    let actor = Probe {
        id: id.to_string(),
        log: log.clone(),
        slow_stop: None,
    };
    ChildSpec::worker(id, None, actor, || ()).restart(restart)
}

pub fn slow_probe(id: &str, log: &Log, stop_takes: Duration, shutdown: Shutdown) -> ChildSpec {
    let actor = Probe {
        id: id.to_string(),
        log: log.clone(),
        slow_stop: Some(stop_takes),
    };
    ChildSpec::worker(id, None, actor, || ()).shutdown(shutdown)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Panic,
    Err,
    Normal,
}

impl Failure {
    pub fn msg(self) -> ProbeMsg {
        match self {
            Failure::Panic => ProbeMsg::Panic,
            Failure::Err => ProbeMsg::Fail,
            Failure::Normal => ProbeMsg::Stop,
        }
    }
    pub fn abnormal(self) -> bool {
        self != Failure::Normal
    }
}

/// The live cell of child `id`, if it is running.
pub async fn child_cell(sup: &ActorRef<SupervisorMsg>, id: &str) -> Option<ActorCell> {
    let report = tai_otp::which_children(&sup.get_cell(), Duration::from_secs(5))
        .await
        .ok()?;
    report
        .children
        .into_iter()
        .find(|c| c.id == id)
        .and_then(|c| c.cell)
}

pub async fn fail(sup: &ActorRef<SupervisorMsg>, id: &str, how: Failure) {
    let cell = child_cell(sup, id).await.expect("child is running");
    cell.send_message(how.msg()).expect("child takes messages");
}

/// Lets every actor run until all are idle (time is paused, so this advances
/// the clock only once nothing else can run).
pub async fn settle() {
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// Polls `cond` until it holds or the (virtual) deadline passes.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
