//! `tai serve`: opens the store, starts `tai_sup` and the operator API, and
//! runs until a signal, `POST /admin/shutdown`, or the root giving up.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tai_core::config::Config;
use tai_core::names::{ANDON_SUP, INGRESS_SUP, KAIZEN_SUP, KANBAN_SUP, PROCESSOR_SUP, TAI_SUP};
use tai_otp::{startup_reason, Application, ChildSpec, Exit, Strategy, SupervisorSpec};
use tai_store::{meta, Store};
use tokio::sync::watch;
use tracing::{error, info, warn};
use warp::Filter;

/// The root supervisor (SPEC §1): `rest_for_one`, 5 restarts in 60 s, the five
/// layers in start order.
pub fn root_spec(
    config: &Config,
    store: &Store,
    executors: &tai_jidoka::Executors,
    rego: &tai_jidoka::RegoSet,
    draining: Arc<AtomicBool>,
    ingress_bound: Arc<Mutex<Option<SocketAddr>>>,
) -> Result<SupervisorSpec, String> {
    Ok(SupervisorSpec::new(Strategy::RestForOne)
        .intensity(5, Duration::from_secs(60))
        .child(ChildSpec::supervisor(
            INGRESS_SUP,
            tai_ingress::supervisor_spec(store.clone(), config, draining, ingress_bound),
        ))
        .child(ChildSpec::supervisor(
            KANBAN_SUP,
            tai_kanban::supervisor_spec(store.clone(), config.kanban.clone()),
        ))
        .child(ChildSpec::supervisor(
            PROCESSOR_SUP,
            tai_jidoka::supervisor_spec(store.clone(), config, executors.clone(), rego)?,
        ))
        .child(ChildSpec::supervisor(
            KAIZEN_SUP,
            tai_kaizen::supervisor_spec(config),
        ))
        .child(ChildSpec::supervisor(
            ANDON_SUP,
            tai_andon::supervisor_spec(store.clone(), config.andon.clone(), config.alerts.clone()),
        )))
}

/// What the operator API needs of the running node.
pub struct NodeState {
    /// `None` with `kaizen.metrics = false`.
    pub metrics: Option<tai_kaizen::Metrics>,
    pub config: Config,
    pub store: Store,
    pub executors: tai_jidoka::Executors,
    pub rego: tai_jidoka::RegoSet,
    pub root: ractor::ActorCell,
    pub draining: Arc<AtomicBool>,
    pub shutdown: watch::Sender<bool>,
}

impl NodeState {
    pub fn request_shutdown(&self, why: &str) {
        if self.drain() {
            info!(reason = why, "graceful shutdown requested");
        }
    }

    /// Ingress refuses new signals from now on, and the node's waits end.
    /// True the first time.
    fn drain(&self) -> bool {
        let first = !self.draining.swap(true, Ordering::SeqCst);
        let _ = self.shutdown.send(true);
        first
    }

    /// `None` when ready, else the reason it is not.
    pub async fn not_ready(&self) -> Option<String> {
        tai_ingress::not_ready(&self.store, &self.draining).await
    }
}

/// Writes where the node listens, for tools and tests that start it on port 0.
fn write_endpoints(
    dir: &Path,
    operator: SocketAddr,
    ingress: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let tmp = dir.join("endpoints.json.tmp");
    let body = json!({
        "operator": operator.to_string(),
        "ingress": ingress.map(|a| a.to_string()),
        "pid": std::process::id(),
    });
    std::fs::write(&tmp, serde_json::to_vec_pretty(&body)?)?;
    std::fs::rename(&tmp, dir.join("endpoints.json"))?;
    Ok(())
}

/// SIGTERM, SIGINT and SIGHUP, caught from the moment this is made: one
/// that arrives while the node is still starting waits here for the
/// ordered stop (the default action would end the process at once,
/// without it). SIGHUP is a terminal gone (a node started from a shell
/// that closed): it stops the node in order too, rather than killing it.
struct OsSignals(Option<[tokio::signal::unix::Signal; 3]>);

impl OsSignals {
    fn catch() -> OsSignals {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(term), Ok(int), Ok(hup)) => OsSignals(Some([term, int, hup])),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                warn!(error = %e, "cannot catch SIGTERM, SIGINT and SIGHUP: only the operator API can stop the node in order");
                OsSignals(None)
            }
        }
    }

    async fn recv(&mut self) -> &'static str {
        let Some([term, int, hup]) = &mut self.0 else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = hup.recv() => "SIGHUP",
        }
    }
}

/// RabbitMQ's default `consumer_timeout`: it closes a channel whose
/// delivery stays unacknowledged longer.
const RABBITMQ_CONSUMER_TIMEOUT_SECS: u64 = 30 * 60;

/// Accepted signals this data dir holds where the configured queue backend
/// would never read them (a node switched between backends): the embedded
/// queue's on `amqp`, the amqp backend's fallback buffer on `embedded`.
/// Moved to the configured backend before its queue starts, so that none
/// is left undecided.
fn carry_over_accepted(config: &Config, store: &Store) -> anyhow::Result<()> {
    use tai_core::config::QueueBackend;
    let (moved, from, to) = match config.kanban.backend {
        QueueBackend::Amqp => (
            store.move_queue_to_buffer()?,
            "the embedded queue",
            "the amqp fallback buffer (published once the broker is reachable)",
        ),
        QueueBackend::Embedded => (
            store.move_buffer_to_queue()?,
            "the amqp fallback buffer",
            "the embedded queue",
        ),
    };
    if moved > 0 {
        store.flush()?;
        info!(
            moved,
            "queue backend switched: undecided signals moved from {from} to {to}"
        );
    }
    // The backend the data dir last ran on (`amqp:{queue}` or `embedded`):
    // the signals an amqp node left in its broker's queue are not carried
    // over to an embedded one.
    let backend = match config.kanban.backend {
        QueueBackend::Amqp => format!("amqp:{}", config.kanban.amqp_queue),
        QueueBackend::Embedded => "embedded".to_string(),
    };
    let last = last_backend(store)?;
    // Switched to embedded, or to another broker queue: the signals the
    // old queue holds are decided only by a node that consumes it.
    let left_in = last
        .as_deref()
        .and_then(|l| l.strip_prefix("amqp:"))
        .filter(|q| {
            config.kanban.backend == QueueBackend::Embedded || *q != config.kanban.amqp_queue
        });
    let mut left = 0;
    if let Some(queue) = left_in {
        // On embedded, each is kept (up to ORPHANS_MAX) so that a client's
        // retry queues it: a signal whose publish a kill cut (its client
        // got no 202) is in no queue at all. An amqp node republishes such
        // retries by itself.
        let embedded = config.kanban.backend == QueueBackend::Embedded;
        let (count, keys) = store.accepted_not_queued(if embedded { ORPHANS_MAX } else { 5 })?;
        left = count;
        if count > 0 {
            warn!(
                count,
                examples = ?&keys[..keys.len().min(5)],
                queue,
                "signals accepted on the amqp queue this data dir last used are not decided here, and this node does not read that queue: they wait in it (unless this node was the standby of the node that consumed it, which decided them), and a client's retry of one is queued here; stop this node and run `tai drain-amqp` with the amqp config (or an amqp node on it until it is empty), then start it again"
            );
        }
        if embedded {
            store.set_orphans(keys);
        }
    }
    // An embedded node keeps the old queue on record while signals wait in
    // it, so that every start says so, not only the first after the switch
    // (its own signals are queued or decided: the count stays theirs).
    let keep_old = left > 0 && config.kanban.backend == QueueBackend::Embedded;
    if last.as_deref() != Some(backend.as_str()) && !keep_old {
        store.put_meta(meta::KANBAN_BACKEND, backend.as_bytes())?;
        store.flush()?;
    }
    Ok(())
}

/// At most this many signals left on an amqp queue are remembered by an
/// embedded node, so that a retry of one is queued ([`Store::set_orphans`]):
/// ~100 bytes each. A standby's data dir holds every signal it took in.
const ORPHANS_MAX: usize = 100_000;

/// The backend the data dir last ran on (`amqp:{queue}` or `embedded`); a
/// record that does not read is logged and taken for none.
fn last_backend(store: &Store) -> anyhow::Result<Option<String>> {
    let Some(bytes) = store.meta(meta::KANBAN_BACKEND)? else {
        return Ok(None);
    };
    Ok(meta::read_backend(&bytes)
        .map_err(|e| warn!(error = %e, "the record of the queue backend this data dir last ran on (m/{}) does not read: a queue it left signals in is not known", meta::KANBAN_BACKEND))
        .ok()
        .map(str::to_string))
}

/// `tai drain-amqp`: moves what an amqp work queue holds into this stopped
/// node's fallback buffer, for a switch to `embedded` (whose queue takes
/// the buffer in at its start). The queue is `queue`, else the one the data
/// dir last ran on, else `kanban.amqp_queue`.
pub async fn drain_amqp(config: &Config, queue: Option<String>) -> anyhow::Result<i32> {
    let dir = &config.node.data_dir;
    let store = Store::open_existing(dir).map_err(|e| {
        crate::store_check::not_opened(e, "stop the node first (the drain writes to its data dir)")
    })?;
    let last = last_backend(&store)?;
    let queue = queue
        .or_else(|| last.as_deref()?.strip_prefix("amqp:").map(str::to_string))
        .unwrap_or_else(|| config.kanban.amqp_queue.clone());
    let d = tai_kanban::drain_broker_queue(&config.kanban.amqp_url, &queue, &store)
        .await
        .map_err(anyhow::Error::msg)?;
    println!(
        "moved {} signal(s) from the amqp queue {queue} into the fallback buffer of {}; {} already held or decided there (acknowledged only)",
        d.moved,
        dir.display(),
        d.already
    );
    if d.unreadable > 0 {
        println!(
            "{} message(s) that are not signals were left in the queue",
            d.unreadable
        );
    }
    println!("a node started on this data dir decides them, on either backend");
    Ok(0)
}

/// Receipts signed with a key `andon.signing_keys` no longer holds cannot
/// be verified (a key replaced instead of added to at a rotation): said in
/// the log and as a warning alert; the node goes on (nothing is lost, and
/// putting the key back mends it).
fn warn_of_missing_signing_keys(state: &NodeState) {
    let missing =
        match tai_andon::missing_signing_keys(&state.store, &state.config.andon.signing_keys) {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "cannot read which keys signed the ledger");
                return;
            }
        };
    if missing.is_empty() {
        return;
    }
    let summary = format!(
        "receipts were signed with {} that andon.signing_keys no longer holds: \
         the ledger cannot be verified until they are put back (old keys stay to verify old receipts)",
        missing.join(", ")
    );
    warn!(keys = ?missing, "{summary}");
    tai_core::alert::raise(tai_core::alert::Alert::new(
        tai_core::alert::Severity::Warning,
        "ledger_key_missing",
        "ledger_key_missing",
        "andon_ledger",
        summary,
    ));
}

/// On the amqp backend, a signal parked for its entitlement stays
/// unacknowledged up to its SKU's `entitlement_timeout_secs`: past the
/// broker's `consumer_timeout` its channel would be closed (and the node
/// reconnect) before the engine decides it. Said at start, per SKU.
fn warn_of_long_parks(config: &Config) {
    if config.kanban.backend != tai_core::config::QueueBackend::Amqp {
        return;
    }
    for (name, sku) in &config.skus {
        let secs = sku.entitlement_timeout_secs;
        if secs >= RABBITMQ_CONSUMER_TIMEOUT_SECS {
            warn!(
                sku = %name,
                entitlement_timeout_secs = secs,
                "skus.{name}.entitlement_timeout_secs reaches RabbitMQ's default consumer_timeout \
                 ({RABBITMQ_CONSUMER_TIMEOUT_SECS} s): a signal parked that long makes the broker \
                 close the node's channel; lower it, or raise consumer_timeout on the broker"
            );
        }
    }
}

/// Turns transparent huge pages off for this process (`node.transparent_huge_pages`
/// = false): mimalloc advises its arenas `MADV_HUGEPAGE`, and khugepaged
/// then collapses every 2 MiB range with a page still in use into a whole
/// huge page, so memory the allocator gave back becomes resident again and
/// an idle node grows towards its past peak (measured: +80 MB over five
/// idle minutes after a burst over 20k tenants; none with this off).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn no_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and only sets a flag
    // on this process's memory map.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        warn!(
            error = %std::io::Error::last_os_error(),
            "could not turn transparent huge pages off (node.transparent_huge_pages)"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn no_transparent_huge_pages() {}

/// Open files kept for all but the listeners' connections: the store's
/// (its log, the blobs it writes and reads), the broker's, webhooks',
/// OTLP's, the data dir's lock.
const FILES_KEPT: u64 = 256;

/// Raises the soft open-file limit to the hard one, as servers do (a
/// login shell's soft limit is often 1,024, the hard one far higher), and
/// returns the limit in force, or `None` if it cannot be read.
#[cfg(unix)]
#[allow(unsafe_code)]
fn raise_open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "could not read the open-file limit");
        return None;
    }
    // Linux refuses more than fs.nr_open (2^20 by default), even unlimited.
    let target = limit.rlim_max.min(1 << 20);
    if limit.rlim_cur >= target {
        return Some(limit.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: target,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        warn!(
            error = %std::io::Error::last_os_error(),
            soft = limit.rlim_cur,
            hard = limit.rlim_max,
            "could not raise the open-file limit"
        );
        return Some(limit.rlim_cur);
    }
    info!(from = limit.rlim_cur, to = target, "open-file limit raised");
    Some(target)
}

#[cfg(not(unix))]
fn raise_open_file_limit() -> Option<u64> {
    None
}

/// `node.max_connections` as the open-file limit allows: each of the two
/// listeners gets at most half of what the store and the rest leave
/// ([`FILES_KEPT`]), and never fewer than 16.
pub(crate) fn connection_bound(max_connections: usize, open_files: Option<u64>) -> usize {
    let Some(limit) = open_files else {
        return max_connections;
    };
    let room = usize::try_from(limit.saturating_sub(FILES_KEPT) / 2).unwrap_or(usize::MAX);
    max_connections.min(room.max(16))
}

/// Runs the node to its end and returns the process exit status.
pub async fn serve(mut config: Config) -> anyhow::Result<i32> {
    let mut os_signals = OsSignals::catch();
    if !config.node.transparent_huge_pages {
        no_transparent_huge_pages();
    }
    let open_files = raise_open_file_limit();
    let bound = connection_bound(config.node.max_connections, open_files);
    if bound < config.node.max_connections {
        warn!(
            max_connections = config.node.max_connections,
            open_file_limit = open_files,
            each_listener_holds = bound,
            "node.max_connections is more than the open-file limit leaves for two listeners and the store: each listener holds at most the lower figure (raise the limit: LimitNOFILE= in the systemd unit, ulimit -n)"
        );
        config.node.max_connections = bound;
    }
    // The SKUs' rules first: a policy that does not load (a Rego file
    // missing or broken) is a config error, told before the data dir is
    // created or opened (and not hidden behind `store_in_use` when another
    // node holds it).
    let rego = tai_jidoka::RegoSet::new(
        &std::env::current_dir()?,
        Duration::from_millis(config.jidoka.rego_timeout_ms),
    );
    if let Err(e) = tai_jidoka::skus_from_config(&config, &rego) {
        eprintln!("config error: {e}");
        return Ok(78);
    }
    let data_dir = config.node.data_dir.clone();
    // Made the node's own (0700): the store holds tenants' payloads. A
    // directory the operator made is left as it is.
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&data_dir)
            .with_context(|| format!("cannot create node.data_dir {}", data_dir.display()))?;
    }
    let store = Store::open_with_cache(&data_dir, config.node.store_cache_mb * 1024 * 1024)
        .map_err(|e| crate::store_check::not_opened(e, ""))?;
    carry_over_accepted(&config, &store)?;
    let starts = store.record_start()?;
    let metrics = if config.kaizen.metrics {
        Some(tai_kaizen::Metrics::install(
            config.kaizen.tenant_label_cap,
        )?)
    } else {
        None
    };

    let draining = Arc::new(AtomicBool::new(false));
    let ingress_bound = Arc::new(Mutex::new(None));
    // Node-wide like the store: breakers outlive the engines that use them.
    let executors = match tai_jidoka::Executors::new(&config, store.clone()) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("config error: {e}");
            return Ok(78);
        }
    };
    let spec = match root_spec(
        &config,
        &store,
        &executors,
        &rego,
        draining.clone(),
        ingress_bound.clone(),
    ) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("config error: {e}");
            return Ok(78);
        }
    };
    let mut app = Application::start(TAI_SUP, spec)
        .await
        .map_err(|e| anyhow::anyhow!("{TAI_SUP} failed to start: {}", startup_reason(&e)))?;
    let ingress_addr = *ingress_bound.lock().expect("ingress address");

    let listener = tokio::net::TcpListener::bind(config.operator.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on operator.listen {}",
                config.operator.listen
            )
        })?;
    let operator_addr = listener.local_addr()?;
    let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
    let state = Arc::new(NodeState {
        metrics,
        store: store.clone(),
        executors,
        rego,
        root: app.root.get_cell(),
        draining,
        shutdown: shutdown_tx,
        config,
    });
    let (server_stop_tx, server_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tai_ingress::http::serve(
        warp::service(
            crate::board::ws(state.clone())
                .or(crate::operator::routes(state.clone()))
                .unify(),
        ),
        listener,
        tai_ingress::http::Listening::new("operator", &state.config.node),
        async {
            let _ = server_stop_rx.await;
        },
    ));
    write_endpoints(&data_dir, operator_addr, ingress_addr)?;
    info!(
        ingress = ?ingress_addr,
        operator = %operator_addr,
        data_dir = %data_dir.display(),
        mode = ?state.config.node.mode,
        starts,
        "tai node running"
    );
    warn_of_long_parks(&state.config);
    warn_of_missing_signing_keys(&state);

    systemd_ready();
    let watchdog = systemd_watchdog();

    let grace = Duration::from_secs(state.config.node.shutdown_grace_secs);
    let code = tokio::select! {
        // A store failure first: the tree may give up on the same error
        // (its layers failing to restart against the store) in the same
        // instant, and the store's failure is the cause to report.
        biased;
        reason = store.failed() => {
            // Nothing durable can be written any more, and sled will not
            // write again until it is opened anew: restarting layers would
            // only fail again. Ingress stops accepting; no quiesce (no
            // decision can be committed); what was accepted is on disk and
            // is decided after the next start.
            store_failed(&reason, &data_dir);
            state.drain();
            let _ = stop_tree(app, grace).await;
            1
        }
        exit = app.wait() => {
            match exit {
                Exit::Abnormal(reason) => {
                    match store.ping() {
                        // A layer met the store's I/O error first (a read,
                        // say) and the tree gave up on it before the store
                        // was marked failed: the store is the cause.
                        Err(e) => {
                            store_failed(&e.to_string(), &data_dir);
                            state.drain();
                        }
                        Ok(()) => error!(reason = %reason, "{TAI_SUP} gave up, node exiting"),
                    }
                    1
                }
                Exit::Normal(_) => {
                    error!("{TAI_SUP} stopped unexpectedly, node exiting");
                    1
                }
            }
        }
        why = os_signals.recv() => {
            state.request_shutdown(why);
            quiesce(grace).await;
            stop_tree(app, grace).await
        }
        _ = shutdown_rx.wait_for(|v| *v) => {
            quiesce(grace).await;
            stop_tree(app, grace).await
        }
    };
    if let Some(w) = watchdog {
        w.abort();
    }
    let _ = server_stop_tx.send(());
    if tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .is_err()
    {
        warn!("operator api did not close in time");
    }
    // A failed store writes nothing more (its failure is logged above).
    if let Err(e) = store.ping().and_then(|()| store.flush()) {
        if !matches!(e, tai_store::StoreError::Failed(_)) {
            error!(error = %e, "final store flush failed");
        }
        return Ok(1);
    }
    info!(code, "tai node stopped");
    Ok(code)
}

/// The log line of a failed store: the node stops on it.
fn store_failed(reason: &str, data_dir: &Path) {
    error!(
        reason = %reason,
        data_dir = %data_dir.display(),
        "the store failed: the node stops (exit 1); start it again once the cause is gone (free space on the data dir's disk)"
    );
}

/// systemd `Type=notify`: the node is up (both ports listen, the tree runs).
/// Without `NOTIFY_SOCKET` (not under systemd) this does nothing.
fn systemd_ready() {
    if let Err(e) = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("running"),
    ]) {
        warn!(error = %e, "could not notify systemd");
    }
}

fn systemd_stopping() {
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("stopping"),
    ]);
}

/// With `WatchdogSec=` in the unit: pings at half the interval while the
/// root supervisor is alive, so systemd restarts a node that hangs.
fn systemd_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let every = sd_notify::watchdog_enabled()? / 2;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if ractor::registry::where_is(TAI_SUP).is_some() {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        }
    }))
}

/// Before the tree stops: the queue hands out no more work (the amqp
/// backend cancels its consumer) and in-flight signals are decided and
/// acknowledged, for at most a third of the grace period (what is left in
/// flight then is delivered again at the next start). Signals parked in an
/// engine waiting for its entitlement are not waited for: nothing can
/// entitle it while the queue dispatches no more.
async fn quiesce(grace: Duration) {
    systemd_stopping();
    let Some(queue) = ractor::registry::where_is(tai_core::msg::KANBAN_QUEUE) else {
        return;
    };
    let limit = (grace / 3).min(Duration::from_secs(10));
    let started = std::time::Instant::now();
    match ractor::rpc::call(&queue, tai_core::msg::KanbanMsg::Quiesce, Some(limit)).await {
        Ok(ractor::rpc::CallResult::Success(0)) => info!(
            took_ms = started.elapsed().as_millis() as u64,
            "queue quiesced: nothing in flight"
        ),
        Ok(ractor::rpc::CallResult::Success(parked)) => info!(
            took_ms = started.elapsed().as_millis() as u64,
            parked,
            "queue quiesced: nothing being decided; signals waiting for an entitlement are delivered again at the next start"
        ),
        _ => warn!(
            ?limit,
            "signals still in flight at shutdown; they are delivered again at the next start"
        ),
    }
}

async fn stop_tree(app: Application, grace: Duration) -> i32 {
    let started = std::time::Instant::now();
    match app.stop(grace).await {
        Exit::Normal(_) => {
            info!(
                took_ms = started.elapsed().as_millis() as u64,
                "supervision tree stopped in order"
            );
            0
        }
        Exit::Abnormal(reason) => {
            error!(reason = %reason, "supervision tree did not stop cleanly");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::connection_bound;

    #[test]
    fn each_listener_holds_what_the_open_file_limit_leaves() {
        // Room for both listeners and the store's files: as configured.
        assert_eq!(connection_bound(8192, Some(65_536)), 8192);
        assert_eq!(connection_bound(8192, Some(256 + 2 * 8192)), 8192);
        // A soft limit of 1,024 that could not be raised: (1024 - 256) / 2.
        assert_eq!(connection_bound(8192, Some(1024)), 384);
        // Never fewer than 16, and the limit unknown: as configured.
        assert_eq!(connection_bound(8192, Some(100)), 16);
        assert_eq!(connection_bound(10, Some(100)), 10);
        assert_eq!(connection_bound(8192, None), 8192);
    }
}
