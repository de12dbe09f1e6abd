//! `engine_router`: delivers each signal to its engine, starting engines on
//! demand under `engine_sup` and passivating them (checkpointed already, then
//! drained and stopped) when idle or when too many are live, least recently
//! used first. Memory follows the active tenants, not every tenant ever seen.
//!
//! Every start and stop of an engine goes through here, so an engine that is
//! draining never races a new incarnation of itself: signals for it wait here.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tai_core::msg::{Delivery, EnginePage, KanbanMsg, RouterMsg, KANBAN_QUEUE};
use tai_core::names::{engine_name, ENGINE_SUP};
use tai_core::signal::{now_ms, EngineInfo, EngineState};
use tai_otp::{ChildSpec, ChildStatus, Restart, StartChildError, SupervisorMsg};
use tai_store::Store;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::breaker::BreakerState;
use crate::engine::{Engine, EngineArgs, EngineMsg};
use crate::executor::{Breakers, Executors};
use crate::machine::{self, Data, Event, Sku};
use crate::wakes::{tenant_and_sku, Until, Wakes};

const CALL: Duration = Duration::from_secs(10);

const PASSIVATING: &str = "the engine is being passivated; try again";

#[derive(Clone, Copy, Debug)]
pub struct Router;

/// The configured SKUs by id.
pub type Skus = HashMap<String, Arc<Sku>>;

pub struct RouterArgs {
    pub store: Store,
    pub skus: Arc<Skus>,
    /// For a sku_id the config does not name: it dead-letters every signal.
    pub unknown_sku: Arc<Sku>,
    pub idle_timeout: Duration,
    pub max_active: usize,
    pub executors: Executors,
}

struct Entry {
    /// `engine:{tenant}:{sku}`, shared with `RouterState::recency`.
    name: Arc<str>,
    tenant_id: String,
    sku_id: String,
    last_used: Instant,
    /// Its key in `RouterState::recency` while it is live.
    touch: u64,
    /// Draining: signals wait here until it is gone.
    waiting: Option<Vec<Delivery>>,
    /// Idle, and asked whether it is busy (`RouterMsg::IdleChecked`).
    checking: bool,
    /// Restarted after a crash while it drained: that incarnation is
    /// drained too once the drain is reported.
    restarted: bool,
}

impl Entry {
    /// Not yet in `RouterState::recency` (`touch` puts a live one there).
    fn new(name: &str, tenant_id: String, sku_id: String, waiting: Option<Vec<Delivery>>) -> Entry {
        Entry {
            name: name.into(),
            tenant_id,
            sku_id,
            last_used: Instant::now(),
            touch: 0,
            waiting,
            checking: false,
            restarted: false,
        }
    }
}

pub struct RouterState {
    args: RouterArgs,
    engines: HashMap<String, Entry>,
    /// The live (not draining) engines, least recently used first, so the
    /// cap and the idle sweep find their victims without a scan.
    recency: BTreeMap<u64, Arc<str>>,
    next_touch: u64,
    ticker: tokio::task::JoinHandle<()>,
    breaker_ticker: tokio::task::JoinHandle<()>,
    /// Where the sweep of stale payment windows goes on at the next tick.
    sweep_cursor: Option<Vec<u8>>,
    /// Engines a delivery could not start (their signals are in flight
    /// with no engine), so that their next start asks Kanban for them.
    failed_starts: HashSet<String>,
    /// Passive engines waiting for a state timeout or a breaker's close,
    /// on the clock of [`RouterState::clock_ms`].
    wakes: Wakes,
    started: Instant,
}

/// Payment windows looked at per tick.
const SWEEP_KEYS: usize = 10_000;

/// How often open breakers are checked for their half-open time, and
/// passive engines for a transition due.
const BREAKER_TICK: Duration = Duration::from_millis(200);

/// Passive engines started per tick for a transition due: a burst (a
/// breaker that held many, a period that ends for many at once) is spread
/// out rather than holding up the signals behind it.
const WAKE_BATCH: usize = 128;

/// An engine `engine_sup` did not start.
#[derive(Debug)]
struct StartFailed {
    name: String,
    error: StartChildError,
}

impl std::fmt::Display for StartFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot start {}: {}", self.name, self.error)
    }
}

impl std::error::Error for StartFailed {}

fn engine_ref(name: &str) -> Option<ActorRef<EngineMsg>> {
    ractor::registry::where_is(name).map(ActorRef::from)
}

impl RouterState {
    /// Milliseconds since the router started, on the monotonic clock: a
    /// wait is measured from when it is recorded, as a live engine's state
    /// timer is, so a step of the wall clock (NTP, a restored snapshot)
    /// neither stretches nor cuts it.
    fn clock_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// What an operator's question reads passivated engines with.
    fn passive(&self) -> Passive {
        Passive {
            skus: self.args.skus.clone(),
            breakers: self.args.executors.breakers.clone(),
        }
    }

    /// Marks a live engine as just used.
    fn touch(&mut self, name: &str) {
        let Some(e) = self.engines.get_mut(name) else {
            return;
        };
        e.last_used = Instant::now();
        self.recency.remove(&e.touch);
        self.next_touch += 1;
        e.touch = self.next_touch;
        self.recency.insert(e.touch, e.name.clone());
    }
}

impl Router {
    fn sku(st: &RouterState, sku_id: &str) -> Arc<Sku> {
        st.args
            .skus
            .get(sku_id)
            .cloned()
            .unwrap_or_else(|| st.args.unknown_sku.clone())
    }

    /// The running engine, started if need be (after passivating the least
    /// recently used one when at the cap, with `room`). `None` while it
    /// drains.
    async fn ensure(
        myself: &ActorRef<RouterMsg>,
        st: &mut RouterState,
        tenant: &str,
        sku_id: &str,
        room: bool,
    ) -> Result<Option<ActorRef<EngineMsg>>, ActorProcessingErr> {
        let name = engine_name(tenant, sku_id);
        if let Some(e) = st.engines.get(&name) {
            if e.waiting.is_some() {
                return Ok(None);
            }
            st.touch(&name);
            if let Some(r) = engine_ref(&name) {
                return Ok(Some(r));
            }
        }
        if room && !st.engines.contains_key(&name) && st.recency.len() >= st.args.max_active {
            Self::passivate_lru(myself, st);
        }
        let sup: ActorRef<SupervisorMsg> = ractor::registry::where_is(ENGINE_SUP)
            .map(ActorRef::from)
            .ok_or("engine_sup is not running")?;
        let args_store = st.args.store.clone();
        let executors = st.args.executors.clone();
        let sku = Self::sku(st, sku_id);
        let (t, s) = (tenant.to_string(), sku_id.to_string());
        // Each call of the args closure is one start: the first is ours, any
        // later one is engine_sup restarting the engine after a crash.
        let starts = std::sync::atomic::AtomicU32::new(0);
        // Known here and not drained (it stopped on its own or crashed for
        // good), or a start failed: what was sent to it may be lost.
        let fresh = !st.engines.contains_key(&name) && !st.failed_starts.contains(&name);
        let commit_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spec = ChildSpec::worker(name.clone(), Some(name.clone()), Engine, move || {
            EngineArgs {
                incarnation: starts.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
                fresh,
                commit_failed: commit_failed.clone(),
                tenant_id: t.clone(),
                sku_id: s.clone(),
                sku: sku.clone(),
                store: args_store.clone(),
                executors: executors.clone(),
            }
        })
        .restart(Restart::Transient);
        let cell = tai_otp::start_child(&sup, spec, CALL)
            .await
            .map_err(|error| StartFailed {
                name: name.clone(),
                error,
            })?;
        st.failed_starts.remove(&name);
        st.wakes.forget(&name);
        if !st.engines.contains_key(&name) {
            st.engines.insert(
                name.clone(),
                Entry::new(&name, tenant.to_string(), sku_id.to_string(), None),
            );
        }
        st.touch(&name);
        Ok(Some(cell.into()))
    }

    /// Passivates an idle engine unless it is busy: one running an action
    /// or holding postponed signals stays. A halted one is passivated as
    /// any other: it stays counted in `tai_engine_state` (`states`, which
    /// counts passive engines too) and on the board until it is resumed;
    /// one a breaker halted then waits for the breaker in `wakes`, which
    /// starts it when the breaker is no longer open even if it missed the
    /// news (a restart of the router between). The engine answers only
    /// between messages (an action runs inside its handler), so it is
    /// asked from a task that reports back (`RouterMsg::IdleChecked`):
    /// the router, which every signal goes through, never waits on it. One
    /// that does not answer within `CALL` is busy; one that is gone is not.
    fn check_idle(myself: &ActorRef<RouterMsg>, st: &mut RouterState, name: String) {
        let Some(r) = engine_ref(&name) else {
            Self::passivate(myself, st, &name);
            return;
        };
        if let Some(e) = st.engines.get_mut(&name) {
            e.checking = true;
        }
        let me = myself.clone();
        tokio::spawn(async move {
            let busy = match r.call(EngineMsg::Info, Some(CALL)).await {
                Ok(ractor::rpc::CallResult::Success(i)) => {
                    i.postponed > 0 || i.state == EngineState::ActionPending
                }
                Ok(ractor::rpc::CallResult::Timeout) => true,
                _ => false,
            };
            let _ = me.send_message(RouterMsg::IdleChecked { name, busy });
        });
    }

    /// Drains the engine (it finishes what is in its mailbox) and stops it.
    fn passivate(myself: &ActorRef<RouterMsg>, st: &mut RouterState, name: &str) {
        let Some(e) = st.engines.get_mut(name) else {
            return;
        };
        if e.waiting.is_some() {
            return;
        }
        e.waiting = Some(Vec::new());
        let touch = e.touch;
        st.recency.remove(&touch);
        debug!(engine = %name, "passivating engine");
        Self::drain(myself, name.to_string());
    }

    /// Takes on the engines running when the router starts: it restarted
    /// alone (`engine_sup`, before it under `rest_for_one`, did not), and
    /// they run on. Known as live, the cap and the idle sweep see to them;
    /// past the cap, the least recently used are passivated. Else each ran
    /// on, unknown, until a signal came for it.
    async fn take_on_running(myself: &ActorRef<RouterMsg>, st: &mut RouterState) {
        // The router restarts with engine_sup (processor_sup is rest_for_one):
        // the engines killed with it are no longer live.
        crate::states::retain_running();
        let Some(sup) = ractor::registry::where_is(ENGINE_SUP) else {
            return;
        };
        let report = match tai_otp::which_children(&sup, CALL).await {
            Ok(report) => report,
            Err(e) => {
                warn!(error = %e, "cannot list the engines running; each is taken on at its next signal");
                return;
            }
        };
        let mut taken = 0;
        for child in report.children {
            if child.status != ChildStatus::Running || engine_ref(&child.id).is_none() {
                continue;
            }
            let (tenant_id, sku_id) = tenant_and_sku(&child.id);
            st.engines.insert(
                child.id.clone(),
                Entry::new(&child.id, tenant_id, sku_id, None),
            );
            st.touch(&child.id);
            taken += 1;
        }
        while st.recency.len() > st.args.max_active && Self::passivate_lru(myself, st) {}
        if taken > 0 {
            info!(
                engines = taken,
                "engines running at the router's start taken on"
            );
        }
    }

    /// Passivates the least recently used live engine; false if none is.
    fn passivate_lru(myself: &ActorRef<RouterMsg>, st: &mut RouterState) -> bool {
        let Some(lru) = st.recency.values().next().cloned() else {
            return false;
        };
        Self::passivate(myself, st, &lru);
        true
    }

    /// Drains the engine of that name, if it runs, and reports it gone
    /// (`RouterMsg::Drained`).
    fn drain(myself: &ActorRef<RouterMsg>, name: String) {
        let me = myself.clone();
        match ractor::registry::where_is(name.clone()) {
            Some(cell) => {
                tokio::spawn(async move {
                    if cell.drain().is_ok() {
                        let _ = cell.wait(None).await;
                    }
                    let _ = me.send_message(RouterMsg::Drained(name));
                });
            }
            None => {
                let _ = me.send_message(RouterMsg::Drained(name));
            }
        }
    }

    /// Starts a passive engine for what its start records (an action a stop
    /// cut, a state timeout due, a breaker that closed), and passivates it
    /// again at once: its start records the transition before it takes a
    /// message, and no signal asked for it. It takes no live engine's place
    /// under the cap (a wake is over the cap for as long as its start), so a
    /// period that ends for thousands of passive engines passivates none of
    /// the active ones, and memory still follows the active tenants. One
    /// running already sees to that itself.
    async fn wake(myself: &ActorRef<RouterMsg>, st: &mut RouterState, tenant: &str, sku_id: &str) {
        let name = engine_name(tenant, sku_id);
        if engine_ref(&name).is_some() {
            return;
        }
        match Self::ensure(myself, st, tenant, sku_id, false).await {
            Ok(Some(_)) => Self::passivate(myself, st, &name),
            Ok(None) => {}
            Err(e)
                if e.downcast_ref::<StartFailed>()
                    .is_some_and(|f| matches!(f.error, StartChildError::MaxChildren(_))) =>
            {
                // Full (engines the router does not know of take places
                // too: a restarted router's): the next tick tries again.
                debug!(engine = %name, "engine_sup is full; the wake waits for the next tick");
                let now = st.clock_ms();
                st.wakes.sleep(tenant, sku_id, Until::Time(now));
            }
            Err(e) => {
                warn!(tenant = %tenant, sku = %sku_id, error = %e, "cannot start a passive engine for a transition due; its next signal starts it");
            }
        }
    }

    async fn deliver(
        myself: &ActorRef<RouterMsg>,
        st: &mut RouterState,
        d: Delivery,
    ) -> Result<(), ActorProcessingErr> {
        let engine = Self::ensure(myself, st, &d.signal.tenant_id, &d.signal.sku_id, true).await;
        let engine = engine.inspect_err(|_| {
            // In flight with no engine: its next start asks for it again.
            let name = engine_name(&d.signal.tenant_id, &d.signal.sku_id);
            st.failed_starts.insert(name);
        })?;
        match engine {
            Some(engine) => {
                // A send to an engine that just died is lost; Kanban redelivers
                // when the engine restarts.
                let _ = engine.send_message(EngineMsg::Deliver(d));
            }
            None => {
                let name = engine_name(&d.signal.tenant_id, &d.signal.sku_id);
                if let Some(w) = st.engines.get_mut(&name).and_then(|e| e.waiting.as_mut()) {
                    w.push(d);
                }
            }
        }
        Ok(())
    }

    /// Sends `msg` to the engine now (so operator commands reach it in the
    /// order they came) and answers `reply` from a task: an engine running an
    /// action answers only once it ends, and the router must not wait.
    fn ask_engine(
        engine: ActorRef<EngineMsg>,
        msg: impl FnOnce(ractor::RpcReplyPort<EngineInfo>) -> EngineMsg,
        what: &'static str,
        reply: ractor::RpcReplyPort<Result<EngineInfo, String>>,
    ) {
        let (tx, rx) = ractor::concurrency::oneshot();
        if engine.send_message(msg(tx.into())).is_err() {
            let _ = reply.send(Err("the engine stopped; try again".to_string()));
            return;
        }
        tokio::spawn(async move {
            let answer = match tokio::time::timeout(CALL, rx).await {
                Ok(Ok(info)) => Ok(info),
                Ok(Err(_)) => Err("the engine stopped before answering; try again".to_string()),
                Err(_) => Err(format!(
                    "the engine did not answer within {} s (an action in flight?); the {what} is in its mailbox and takes effect once it is free",
                    CALL.as_secs()
                )),
            };
            let _ = reply.send(answer);
        });
    }
}

/// How long an operator's question waits for a live engine before it is
/// answered from the engine's checkpoint (written on every transition): an
/// engine running an action answers only once the action ends.
const INFO_WAIT: Duration = Duration::from_secs(1);

/// Asks a running engine (its checkpoint if it is busy), or reads a
/// passivated one's checkpoint. Run off the router, which must never wait
/// on an engine: every signal goes through it.
async fn info(store: &Store, view: &Passive, tenant: &str, sku_id: &str) -> Option<EngineInfo> {
    let name = engine_name(tenant, sku_id);
    let live = engine_ref(&name);
    if let Some(r) = &live {
        if let Ok(ractor::rpc::CallResult::Success(info)) =
            r.call(EngineMsg::Info, Some(INFO_WAIT)).await
        {
            return Some(info);
        }
    }
    let bytes = match store.checkpoint(tenant, sku_id) {
        Ok(bytes) => bytes?,
        Err(e) => {
            warn!(tenant = %tenant, sku = %sku_id, error = %e, "cannot read an engine's checkpoint");
            return None;
        }
    };
    let mut info = passive_data(view, tenant, sku_id, &bytes)
        .map(|data| passive_info(tenant, sku_id, &data))?;
    info.active = live.is_some();
    Some(info)
}

/// A page of engines by tenant then SKU, after `after`, at most `limit`:
/// the live ones (`live`: tenant, sku, name; the first `limit` after
/// `after`) asked, the others read from their checkpoints.
async fn engines_page(
    store: Store,
    view: Passive,
    live: Vec<(String, String, String)>,
    after: Option<(String, String)>,
    limit: usize,
) -> Result<EnginePage, String> {
    enum Source {
        Live(String),
        /// `None`: its checkpoint does not decode.
        Passive(Option<EngineInfo>),
    }
    // A page of checkpoints is read and decoded off the async workers.
    let (read, config) = (store.clone(), view.clone());
    let stored = tokio::task::spawn_blocking(move || {
        let after = after.as_ref().map(|(t, s)| (t.as_str(), s.as_str()));
        let stored = read
            .checkpoints_after(after, limit)
            .map_err(|e| format!("cannot list the engines' checkpoints: {e}"))?;
        Ok::<_, String>(
            stored
                .into_iter()
                .map(|(t, s, bytes)| {
                    let info =
                        passive_data(&config, &t, &s, &bytes).map(|d| passive_info(&t, &s, &d));
                    ((t, s), Source::Passive(info))
                })
                .collect::<BTreeMap<_, _>>(),
        )
    })
    .await;
    let mut page = stored.map_err(|e| e.to_string())??;
    page.extend(
        live.into_iter()
            .map(|(t, s, name)| ((t, s), Source::Live(name))),
    );
    let page: Vec<((String, String), Source)> = page.into_iter().take(limit).collect();
    let next = (page.len() == limit)
        .then(|| page.last().map(|(key, _)| key.clone()))
        .flatten();
    let restarts = engine_restarts().await;
    let engines = futures::future::join_all(page.into_iter().map(|((t, s), source)| {
        let (store, view, restarts) = (&store, &view, &restarts);
        async move {
            match source {
                Source::Live(name) => {
                    let mut i = info(store, view, &t, &s).await?;
                    i.restarts = restarts.get(&name).copied().unwrap_or(0);
                    Some(i)
                }
                Source::Passive(info) => info,
            }
        }
    }))
    .await;
    Ok(EnginePage {
        engines: engines.into_iter().flatten().collect(),
        next,
    })
}

/// What a passivated engine's checkpoint is read with: the SKUs and the
/// breakers it would start with.
#[derive(Clone)]
struct Passive {
    skus: Arc<Skus>,
    breakers: Breakers,
}

/// How many checkpoints [`waiting_engines`] reads at a time.
const CHECKPOINT_PAGE: usize = 1_024;

/// What the checkpoints on disk ask of the router when it starts.
#[derive(Debug, Default)]
struct Waiting {
    /// Engines (tenant, SKU) whose checkpoint holds an action in flight.
    cut: Vec<(String, String)>,
    /// Engines waiting for a transition no signal brings, as
    /// `RouterMsg::Asleep` carries it: tenant, SKU, the state timeout's due
    /// time, the breaker that halted it.
    asleep: Vec<(String, String, Option<u64>, Option<String>)>,
}

/// Reads every checkpoint, a page at a time, for the engines the router
/// must start without a signal: those with an action in flight (recorded
/// `interrupted` at their start), and those waiting for a state timeout or
/// a breaker. It counts each engine in its state on the way
/// (`states::found_passive`). A checkpoint that does not decode is left to
/// the engine's start, or to the listing that reports it; one of a SKU the
/// config does not name waits for nothing (its engine decides nothing).
fn waiting_engines(store: &Store, skus: &Skus) -> Result<Waiting, String> {
    let mut found = Waiting::default();
    let mut after: Option<(String, String)> = None;
    let now = now_ms();
    loop {
        let page = store
            .checkpoints_after(
                after.as_ref().map(|(t, s)| (t.as_str(), s.as_str())),
                CHECKPOINT_PAGE,
            )
            .map_err(|e| format!("cannot read the engines' checkpoints: {e}"))?;
        let last_page = page.len() < CHECKPOINT_PAGE;
        let mut states = Vec::with_capacity(page.len());
        for (tenant, sku_id, bytes) in page {
            if let Ok(data) = Data::from_checkpoint(&bytes) {
                states.push((engine_name(&tenant, &sku_id), data.state));
                if data.in_flight.is_some() {
                    found.cut.push((tenant.clone(), sku_id.clone()));
                } else if let Some(sku) = skus.get(&sku_id) {
                    let (due, halted_by) = data.waits_for(sku, now);
                    if due.is_some() || halted_by.is_some() {
                        found
                            .asleep
                            .push((tenant.clone(), sku_id.clone(), due, halted_by));
                    }
                }
            }
            after = Some((tenant, sku_id));
        }
        crate::states::found_passive(states);
        if last_page {
            return Ok(found);
        }
    }
}

/// A passivated engine's checkpoint, as the engine would start on it: its
/// quota [`Data::reconcile`]d with the config, then moved on by what it
/// waits for ([`Data::waits_for`]) if that came: resumed if the breaker
/// that halted it is no longer open (until its start its checkpoint says
/// `halted`, which `GET /admin/tenants` showed after an outage, though no
/// breaker held it), and past its state timeout, moved on by it (an
/// exhausted engine's refill, a booting one's timeout: the router starts
/// such engines a batch per tick, so a large batch is shown as it will
/// be, not as it was). One that does not decode is left out of what the
/// operator sees, and said so in the log (the engine itself refuses to
/// start on it, with the same reason).
fn passive_data(view: &Passive, tenant: &str, sku_id: &str, bytes: &[u8]) -> Option<Data> {
    let mut data = Data::from_checkpoint(bytes)
        .inspect_err(|e| {
            warn!(tenant = %tenant, sku = %sku_id, error = %e, "corrupt checkpoint of a passivated engine");
        })
        .ok()?;
    if let Some(sku) = view.skus.get(sku_id) {
        data.reconcile(sku);
        let now = now_ms();
        let (due, halted_by) = data.waits_for(sku, now);
        if let Some(b) = halted_by.filter(|b| view.breakers.state(b) != Some(BreakerState::Open)) {
            let ev = Event::BreakerChanged {
                breaker: &b,
                open: false,
            };
            machine::step(&mut data, sku, ev, now, &mut str::to_string);
        }
        if due.is_some_and(|due| due <= now) {
            machine::step(
                &mut data,
                sku,
                Event::StateTimeout,
                now,
                &mut str::to_string,
            );
        }
    }
    Some(data)
}

fn passive_info(tenant: &str, sku_id: &str, data: &Data) -> EngineInfo {
    EngineInfo {
        tenant_id: tenant.to_string(),
        sku_id: sku_id.to_string(),
        state: data.state,
        quota_remaining: data.quota_remaining,
        entitled: data.entitled,
        in_flight_action: data.in_flight.as_ref().map(|f| f.action_id.clone()),
        postponed: 0,
        restarts: 0,
        active: false,
    }
}

/// Restart counts of engines, from `engine_sup`.
async fn engine_restarts() -> HashMap<String, u64> {
    let Some(sup) = ractor::registry::where_is(ENGINE_SUP) else {
        return HashMap::new();
    };
    match tai_otp::which_children(&sup, CALL).await {
        Ok(r) => r.children.into_iter().map(|c| (c.id, c.restarts)).collect(),
        Err(_) => HashMap::new(),
    }
}

impl Router {
    /// Deletes stored payment windows no policy can need any more, a slice
    /// of the keys per tick (customers who stopped paying would otherwise
    /// keep their key for ever).
    fn sweep_velocity(st: &mut RouterState) {
        let window = st
            .args
            .skus
            .values()
            .flat_map(|s| s.policies.iter().filter_map(|p| p.velocity_window_ms()))
            .max();
        let Some(window) = window else { return };
        match st
            .args
            .store
            .sweep_velocity(st.sweep_cursor.as_deref(), SWEEP_KEYS, now_ms(), window)
        {
            Ok((removed, next)) => {
                if removed > 0 {
                    debug!(removed, "stale payment windows swept");
                }
                st.sweep_cursor = next;
            }
            Err(e) => warn!(error = %e, "payment window sweep failed"),
        }
    }
}

impl Actor for Router {
    type Msg = RouterMsg;
    type State = RouterState;
    type Arguments = RouterArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RouterMsg>,
        args: RouterArgs,
    ) -> Result<RouterState, ActorProcessingErr> {
        let tick =
            (args.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let ticker = myself.send_interval(tick, || RouterMsg::Tick);
        let breaker_ticker = myself.send_interval(BREAKER_TICK, || RouterMsg::BreakerTick);
        Ok(RouterState {
            args,
            engines: HashMap::new(),
            recency: BTreeMap::new(),
            next_touch: 0,
            ticker,
            breaker_ticker,
            sweep_cursor: None,
            failed_starts: HashSet::new(),
            wakes: Wakes::default(),
            started: Instant::now(),
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<RouterMsg>,
        st: &mut RouterState,
    ) -> Result<(), ActorProcessingErr> {
        Self::take_on_running(&myself, st).await;
        // Whatever was in flight went to engines of an earlier incarnation.
        if let Some(q) = ractor::registry::where_is(KANBAN_QUEUE) {
            let _ = q.send_message(KanbanMsg::RedeliverAll);
        }
        // Actions an earlier incarnation left in flight. Most belong to a
        // signal still queued, whose redelivery starts their engine; not
        // all do (a crash during a flush can keep a decision whose signal's
        // queue block that flush had yet to write), and the checkpoints
        // are what tells. They also tell which passive engines wait for a
        // state timeout or a breaker.
        let (store, skus) = (st.args.store.clone(), st.args.skus.clone());
        tokio::spawn(async move {
            let read = tokio::task::spawn_blocking(move || waiting_engines(&store, &skus)).await;
            match read.map_err(|e| e.to_string()).and_then(|read| read) {
                Ok(found) => {
                    if !found.cut.is_empty() {
                        info!(
                            engines = found.cut.len(),
                            "engines with an action in flight at the last stop: starting them to record it interrupted"
                        );
                    }
                    if !found.asleep.is_empty() {
                        info!(
                            engines = found.asleep.len(),
                            "passive engines waiting for a state timeout or a breaker: each starts when it comes"
                        );
                    }
                    for (tenant_id, sku_id) in found.cut {
                        let _ = myself.send_message(RouterMsg::Interrupted { tenant_id, sku_id });
                    }
                    for (tenant_id, sku_id, due_ms, halted_by) in found.asleep {
                        let _ = myself.send_message(RouterMsg::Asleep {
                            tenant_id,
                            sku_id,
                            due_ms,
                            halted_by,
                        });
                    }
                }
                Err(e) => warn!(error = %e, "cannot read the engines' checkpoints at the start"),
            }
        });
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<RouterMsg>,
        st: &mut RouterState,
    ) -> Result<(), ActorProcessingErr> {
        st.ticker.abort();
        st.breaker_ticker.abort();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<RouterMsg>,
        msg: RouterMsg,
        st: &mut RouterState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RouterMsg::Deliver(d) => {
                if let Err(e) = Self::deliver(&myself, st, d).await {
                    // The signal stays in flight; Kanban sends it again.
                    warn!(error = %e, "delivery failed");
                }
            }
            RouterMsg::Tick => {
                Self::sweep_velocity(st);
                let idle = st.args.idle_timeout;
                let due: Vec<String> = st
                    .recency
                    .values()
                    .map_while(|name| {
                        let e = st.engines.get(&name[..])?;
                        (e.last_used.elapsed() >= idle).then_some((name, e.checking))
                    })
                    .filter(|(_, checking)| !checking)
                    .map(|(name, _)| name.to_string())
                    .collect();
                for name in due {
                    Self::check_idle(&myself, st, name);
                }
            }
            RouterMsg::IdleChecked { name, busy } => {
                let idle = st.args.idle_timeout;
                let Some(e) = st.engines.get_mut(&name) else {
                    return Ok(());
                };
                e.checking = false;
                // Used since it was asked, or being drained already: as is.
                if e.waiting.is_some() || e.last_used.elapsed() < idle {
                    return Ok(());
                }
                if busy {
                    st.touch(&name);
                } else {
                    Self::passivate(&myself, st, &name);
                }
            }
            RouterMsg::BreakerTick => {
                crate::executor::announce(st.args.executors.breakers.tick(now_ms()));
                // Woken engines take no live engine's place, but they are
                // engine_sup's children while they start and drain: no more
                // than it has room for (a cap under 128 leaves little).
                let room = crate::engine_sup_max_children(st.args.max_active)
                    .saturating_sub(st.engines.len());
                let due = st.wakes.take_due(st.clock_ms(), WAKE_BATCH.min(room));
                if !due.is_empty() {
                    debug!(
                        engines = due.len(),
                        waiting = st.wakes.len(),
                        "starting passive engines for a transition due"
                    );
                }
                for (tenant_id, sku_id) in due {
                    Self::wake(&myself, st, &tenant_id, &sku_id).await;
                }
            }
            RouterMsg::BreakerChanged { breaker, open } => {
                // Live engines hear it now; passive ones it held are started.
                if !open {
                    st.wakes.breaker_closed(&breaker, st.clock_ms());
                }
                for name in st.engines.keys() {
                    if let Some(r) = engine_ref(name) {
                        let _ = r.send_message(EngineMsg::BreakerChanged {
                            breaker: breaker.clone(),
                            open,
                        });
                    }
                }
            }
            RouterMsg::Restarted { tenant_id, sku_id } => {
                let name = engine_name(&tenant_id, &sku_id);
                match st.engines.get_mut(&name) {
                    // Draining: the crash ended that drain; its report
                    // drains this incarnation.
                    Some(e) if e.waiting.is_some() => e.restarted = true,
                    Some(_) => {}
                    // Let go (its drain was reported before the restart):
                    // nothing asked for it since, so it is passivated too,
                    // rather than run on unknown to the cap and the sweep.
                    None => {
                        st.engines.insert(
                            name.clone(),
                            Entry::new(&name, tenant_id, sku_id, Some(Vec::new())),
                        );
                        debug!(engine = %name, "passivating an engine restarted after its passivation");
                        Self::drain(&myself, name);
                    }
                }
            }
            RouterMsg::Interrupted { tenant_id, sku_id } => {
                // One running already (a delivery started it, or only the
                // router restarted) has seen to its action itself.
                Self::wake(&myself, st, &tenant_id, &sku_id).await;
            }
            RouterMsg::Asleep {
                tenant_id,
                sku_id,
                due_ms,
                halted_by,
            } => {
                // Live and not draining (a delivery started it since it was
                // read from its checkpoint): its own timer and breaker news.
                let name = engine_name(&tenant_id, &sku_id);
                let live = st.engines.get(&name).is_some_and(|e| e.waiting.is_none());
                if live && engine_ref(&name).is_some() {
                    return Ok(());
                }
                // A breaker that closed while the engine drained, or before
                // the start's scan got here, is over already.
                let until = match (halted_by, due_ms) {
                    (Some(b), _)
                        if st.args.executors.breakers.state(&b) == Some(BreakerState::Open) =>
                    {
                        Until::Breaker(b)
                    }
                    (Some(_), _) => Until::Time(st.clock_ms()),
                    // Due in as long as the wall clock says now.
                    (None, Some(at)) => Until::Time(st.clock_ms() + at.saturating_sub(now_ms())),
                    (None, None) => return Ok(()),
                };
                st.wakes.sleep(&tenant_id, &sku_id, until);
            }
            RouterMsg::Drained(name) => {
                if let Some(e) = st.engines.get_mut(&name) {
                    if std::mem::take(&mut e.restarted) && engine_ref(&name).is_some() {
                        Self::drain(&myself, name);
                        return Ok(());
                    }
                }
                if let Some(e) = st.engines.remove(&name) {
                    for d in e.waiting.unwrap_or_default() {
                        if let Err(err) = Self::deliver(&myself, st, d).await {
                            warn!(error = %err, "delivery after passivation failed");
                        }
                    }
                }
            }
            RouterMsg::Engines {
                after,
                limit,
                reply,
            } => {
                // The first `limit` live engines after `after`: any on the
                // page is among them.
                let mut live: Vec<(String, String, String)> = st
                    .engines
                    .iter()
                    .filter(|(_, e)| {
                        after.as_ref().is_none_or(|(t, s)| {
                            (e.tenant_id.as_str(), e.sku_id.as_str()) > (t.as_str(), s.as_str())
                        })
                    })
                    .map(|(name, e)| (e.tenant_id.clone(), e.sku_id.clone(), name.clone()))
                    .collect();
                live.sort_unstable();
                live.truncate(limit);
                let (store, view) = (st.args.store.clone(), st.passive());
                tokio::spawn(async move {
                    let _ = reply.send(engines_page(store, view, live, after, limit).await);
                });
            }
            RouterMsg::Engine {
                tenant_id,
                sku_id,
                reply,
            } => {
                let (store, view) = (st.args.store.clone(), st.passive());
                tokio::spawn(async move {
                    let mut info = info(&store, &view, &tenant_id, &sku_id).await;
                    if let Some(i) = info.as_mut() {
                        i.restarts = engine_restarts()
                            .await
                            .get(&engine_name(&tenant_id, &sku_id))
                            .copied()
                            .unwrap_or(0);
                    }
                    let _ = reply.send(info);
                });
            }
            RouterMsg::Halt {
                tenant_id,
                sku_id,
                reason,
                reply,
            } => match Self::ensure(&myself, st, &tenant_id, &sku_id, true).await {
                Ok(Some(e)) => Self::ask_engine(e, |r| EngineMsg::Halt(reason, r), "halt", reply),
                Ok(None) => {
                    let _ = reply.send(Err(PASSIVATING.to_string()));
                }
                Err(e) => {
                    let _ = reply.send(Err(e.to_string()));
                }
            },
            RouterMsg::Resume {
                tenant_id,
                sku_id,
                reply,
            } => match Self::ensure(&myself, st, &tenant_id, &sku_id, true).await {
                Ok(Some(e)) => Self::ask_engine(e, EngineMsg::Resume, "resume", reply),
                Ok(None) => {
                    let _ = reply.send(Err(PASSIVATING.to_string()));
                }
                Err(e) => {
                    let _ = reply.send(Err(e.to_string()));
                }
            },
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passive_engine_is_shown_as_it_would_start_past_its_state_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let sku = Sku {
            quota: 3,
            period_ms: 60_000,
            entitlement_timeout_ms: 30_000,
            policies: Vec::new(),
            executor: "log".into(),
            configured: true,
        };
        let view = Passive {
            skus: Arc::new(Skus::from([("metered".to_string(), Arc::new(sku.clone()))])),
            breakers: Breakers::load(store, &BTreeMap::new()).unwrap(),
        };
        let now = now_ms();
        let shown = |data: &Data| {
            let bytes = serde_json::to_vec(data).unwrap();
            let d = passive_data(&view, "acme", "metered", &bytes).unwrap();
            (d.state, d.quota_remaining)
        };
        let mut exhausted = Data::new(&sku, now - 61_000);
        exhausted.state = EngineState::QuotaExhausted;
        exhausted.quota_remaining = 0;
        exhausted.entitled = true;
        assert_eq!(
            shown(&exhausted),
            (EngineState::Stable, 3),
            "its period is over"
        );
        exhausted.period_start_ms = now - 1_000;
        assert_eq!(
            shown(&exhausted),
            (EngineState::QuotaExhausted, 0),
            "not yet"
        );
        let booting = Data::new(&sku, now - 31_000);
        assert_eq!(
            shown(&booting).0,
            EngineState::Degraded,
            "no entitlement in time"
        );
        let booting = Data::new(&sku, now - 1_000);
        assert_eq!(shown(&booting).0, EngineState::Boot);
    }
}
