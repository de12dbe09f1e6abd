//! tai-ingress: layer 1, `ingress_sup`.
//!
//! The public HTTP API (`ingress_http`): HMAC signatures with key rotation,
//! the replay window and cache, rate limits by tier, validation, and the
//! hand-off to Kanban by registered name. Depends on tai-core, tai-otp and
//! tai-store only; never on another layer crate.

pub mod auth;
pub mod http;
pub mod limits;
pub mod replay;
mod server;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tai_core::config::Config;
use tai_core::msg::{KanbanMsg, INGRESS_HTTP, KANBAN_QUEUE};
use tai_core::names::{LAYERS, TAI_SUP};
use tai_otp::{ChildSpec, ChildStatus, Strategy, SupervisorSpec};
use tai_store::Store;

pub use server::{IngressArgs, IngressHttp, Shared};

/// `ingress_sup` with its HTTP worker. `bound` receives the listening address.
pub fn supervisor_spec(
    store: Store,
    config: &Config,
    draining: Arc<AtomicBool>,
    bound: Arc<Mutex<Option<SocketAddr>>>,
) -> SupervisorSpec {
    let shared = Arc::new(Shared {
        store,
        tenants: auth::tenants(&config.tenants),
        skus: config.skus.keys().cloned().collect(),
        max_body_bytes: config.ingress.max_body_bytes,
        body_timeout: std::time::Duration::from_secs(config.node.body_read_timeout_secs),
        window_secs: config.ingress.replay_window_secs,
        limits: limits::Limits::new(&config.ingress.rate_limits),
        replay: Mutex::new(replay::ReplayCache::new(
            config.ingress.replay_window_secs,
            config.ingress.replay_cache_entries(),
        )),
        draining,
        trace_sampling: config
            .kaizen
            .otlp_endpoint
            .as_ref()
            .map(|_| config.kaizen.trace_sample_ratio),
        received: std::sync::OnceLock::new(),
    });
    let listen = config.ingress.listen;
    let listening = http::Listening::new("ingress", &config.node);
    // Kept across the worker's restarts, and ingress_sup's.
    let socket = Arc::new(Mutex::new(None));
    SupervisorSpec::new(Strategy::OneForOne)
        .intensity(5, Duration::from_secs(10))
        .child(
            ChildSpec::worker(
                INGRESS_HTTP,
                Some(INGRESS_HTTP.to_string()),
                IngressHttp,
                move || IngressArgs {
                    shared: shared.clone(),
                    listen,
                    bound: bound.clone(),
                    socket: socket.clone(),
                    listening,
                },
            )
            .shutdown(tai_otp::Shutdown::Timeout(Duration::from_secs(15))),
        )
}

/// `None` when the node is ready to take signals, else why not: draining,
/// the store not answering, or a layer not running.
pub async fn not_ready(store: &Store, draining: &AtomicBool) -> Option<String> {
    if draining.load(Ordering::SeqCst) {
        return Some("node is draining".into());
    }
    if let Err(e) = store.ping() {
        return Some(format!("store unreachable: {e}"));
    }
    let Some(root) = ractor::registry::where_is(TAI_SUP) else {
        return Some(format!("{TAI_SUP} is not running"));
    };
    let report = match tai_otp::which_children(&root, Duration::from_secs(2)).await {
        Ok(r) => r,
        Err(e) => return Some(format!("{TAI_SUP}: {e}")),
    };
    for layer in LAYERS {
        match report.children.iter().find(|c| c.id == layer) {
            Some(c) if c.status == ChildStatus::Running && c.cell.is_some() => {}
            Some(_) => return Some(format!("{layer} is restarting")),
            None => return Some(format!("{layer} is missing")),
        }
    }
    // The queue backend's own view (the amqp backend: is the broker reachable?).
    let queue = ractor::registry::where_is(KANBAN_QUEUE)?;
    match ractor::rpc::call(&queue, KanbanMsg::Stats, Some(Duration::from_secs(2))).await {
        Ok(ractor::rpc::CallResult::Success(stats)) => stats.not_ready,
        _ => Some(format!("{KANBAN_QUEUE} did not answer")),
    }
}
