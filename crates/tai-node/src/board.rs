//! The Andon board (SPEC §4, §8): `GET /board`, one HTML page with no build
//! step, live over the WebSocket `GET /board/ws`. A browser cannot send a
//! bearer header, so `GET /board?token=<admin token>` sets an HttpOnly
//! cookie and redirects to `/board`; the page and its WebSocket then
//! authenticate by that cookie. The page carries the first snapshot, so it
//! shows the line before the socket opens; the socket sends a snapshot every
//! 2 s and at once when an alert is raised.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tai_core::alert::AlertMsg;
use tai_core::msg::{KanbanMsg, QueueStats, ANDON_ALERTS, KANBAN_QUEUE};
use tai_core::names::LAYERS;
use tai_core::signal::{BreakerState, EngineState};
use tracing::warn;
use warp::http::{HeaderMap, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::Filter;

use crate::node::NodeState;

pub const COOKIE: &str = "tai_admin";
const PAGE: &str = include_str!("board.html");
const PUSH_EVERY: Duration = Duration::from_secs(2);
const ALERT_POLL: Duration = Duration::from_millis(100);
/// How long one snapshot may take to reach a board's socket before the
/// board is taken to have stopped reading.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// The board cookie's value: derived from the admin token, not the token
/// itself, so a cookie that leaks opens the board (read only), never the
/// admin API.
fn session(state: &NodeState) -> String {
    tai_core::receipt::SigningKey::new(state.config.operator.admin_token.as_bytes())
        .sign("tai board session")
}

/// The board cookie, compared in constant time.
pub fn cookie_ok(state: &NodeState, headers: &HeaderMap) -> bool {
    let session = session(state);
    headers
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .any(|t| constant_time_eq::constant_time_eq(t.as_bytes(), session.as_bytes()))
}

pub fn token_ok(state: &NodeState, token: &str) -> bool {
    constant_time_eq::constant_time_eq(
        token.as_bytes(),
        state.config.operator.admin_token.as_bytes(),
    )
}

/// `?token=`: the cookie, and back to `/board` without the token in the URL.
pub fn login(state: &NodeState) -> Response {
    let mut r = Response::new("".into());
    *r.status_mut() = StatusCode::SEE_OTHER;
    r.headers_mut()
        .insert("location", HeaderValue::from_static("/board"));
    let cookie = format!(
        "{COOKIE}={}; Path=/board; HttpOnly; SameSite=Strict",
        session(state)
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert("set-cookie", v);
    }
    r
}

/// The page, with the first snapshot in it.
pub async fn page(state: &NodeState) -> Response {
    let first = snapshot(state).await.to_string().replace("</", "<\\/");
    let mut r = Response::new(PAGE.replace("/*SNAPSHOT*/null", &first).into());
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    r
}

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    let last = sorted.len().checked_sub(1)?;
    Some(sorted[((last as f64 * p).round() as usize).min(last)])
}

/// Green, yellow or red (SPEC §8), with the reasons.
fn status(
    layers_down: &[String],
    breakers: &[tai_jidoka::BreakerInfo],
    engines: &std::collections::HashMap<EngineState, usize>,
    queue: Option<&QueueStats>,
    health_reasons: &[String],
) -> (&'static str, Vec<String>) {
    let mut red = Vec::new();
    let mut yellow = Vec::new();
    for l in layers_down {
        red.push(format!("{l} is restarting"));
    }
    for b in breakers.iter().filter(|b| b.state == BreakerState::Open) {
        red.push(format!("breaker {} is open", b.name));
    }
    let count = |s| engines.get(&s).copied().unwrap_or(0);
    if count(EngineState::Halted) > 0 {
        yellow.push(format!("{} engine(s) halted", count(EngineState::Halted)));
    }
    if count(EngineState::Degraded) > 0 {
        yellow.push(format!(
            "{} engine(s) degraded",
            count(EngineState::Degraded)
        ));
    }
    match queue {
        None => red.push("kanban_queue is not answering".into()),
        Some(q) => {
            if q.in_flight * 10 > u64::from(q.wip_limit) * 8 {
                yellow.push(format!(
                    "queue at {} of WIP limit {}",
                    q.in_flight, q.wip_limit
                ));
            }
            if let Some(r) = &q.not_ready {
                yellow.push(r.clone());
            }
        }
    }
    yellow.extend_from_slice(health_reasons);
    if !red.is_empty() {
        ("red", red)
    } else if !yellow.is_empty() {
        ("yellow", yellow)
    } else {
        ("green", Vec::new())
    }
}

/// Everything the board shows, now.
pub async fn snapshot(state: &NodeState) -> Value {
    let annotate = |name: &str| tai_jidoka::engine_state(name).map(|s| s.as_str().to_string());
    let tree = tai_otp::tree(&state.root, Duration::from_secs(1), &annotate).await;
    let tree = serde_json::to_value(&tree).unwrap_or(Value::Null);
    let layers_down: Vec<String> = LAYERS
        .iter()
        .filter(|l| {
            !tree["children"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|n| n["name"] == **l && n["status"] == "running")
            })
        })
        .map(|l| l.to_string())
        .collect();
    let breakers = state.executors.breakers.list();
    let (engines, engines_live) = tai_jidoka::state_counts();
    let queue = crate::operator::call(KANBAN_QUEUE, KanbanMsg::Stats)
        .await
        .ok();
    let readings = tai_kaizen::health::readings(&state.config);
    let health = tai_kaizen::report::health(&readings);
    let health_reasons = tai_kaizen::report::health_reasons(&readings);
    let (status, reasons) = status(
        &layers_down,
        &breakers,
        &engines,
        queue.as_ref(),
        &health_reasons,
    );
    let (mut latencies, outcomes) = tai_core::kaizen::recent();
    latencies.sort_unstable();
    let errors = outcomes.iter().filter(|ok| !**ok).count();
    let alerts: Vec<Value> = crate::operator::call(ANDON_ALERTS, AlertMsg::Recent)
        .await
        .unwrap_or_default();
    let recent_alerts: Vec<&Value> = alerts.iter().rev().take(10).collect();
    let actions = last_actions(state, 10);
    let engines_by_state: serde_json::Map<String, Value> = EngineState::ALL
        .iter()
        .map(|s| {
            (
                s.as_str().to_string(),
                json!(engines.get(s).copied().unwrap_or(0)),
            )
        })
        .collect();
    json!({
        "at_ms": tai_core::signal::now_ms(),
        "status": status,
        "reasons": reasons,
        "queue": queue,
        "latency_ms": {
            "p50": percentile(&latencies, 0.50),
            "p95": percentile(&latencies, 0.95),
            "p99": percentile(&latencies, 0.99),
            "decisions": latencies.len(),
        },
        "error_rate": if outcomes.is_empty() { 0.0 } else { errors as f64 / outcomes.len() as f64 },
        "requests": outcomes.len(),
        "breakers": breakers.iter().map(|b| json!({"name": b.name, "state": b.state.as_str(), "trips": b.trips})).collect::<Vec<_>>(),
        "engines": engines_by_state,
        "engines_live": engines_live,
        "tree": tree,
        "actions": actions,
        "alerts": recent_alerts,
        "health": health,
    })
}

/// How far back the board looks for action receipts: a snapshot is built
/// every 2 s per open board, and a ledger of dead letters or breaker
/// receipts holds no actions to find.
const ACTION_SCAN: u64 = 2_000;

/// The last `n` action receipts among the newest [`ACTION_SCAN`] receipts,
/// newest first.
fn last_actions(state: &NodeState, n: usize) -> Vec<Value> {
    let Ok(Some(head)) = state.store.head() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut upto = head.seq;
    let floor = head.seq.saturating_sub(ACTION_SCAN);
    // Walk back in pages until n action receipts are found (or the floor).
    while out.len() < n && upto > floor {
        let from = upto.saturating_sub(200).max(floor);
        let Ok(page) = state.store.receipts(from, 200, None) else {
            break;
        };
        for r in page.iter().rev().filter(|r| r.seq <= upto) {
            if r.kind.starts_with("action_") && out.len() < n {
                out.push(json!({
                    "seq": r.seq, "receipt_id": r.receipt_id, "kind": r.kind,
                    "tenant_id": r.tenant_id, "sku_id": r.sku_id,
                    "signal_id": r.signal_id, "action_id": r.action_id,
                    "success": r.success, "timestamp_ms": r.timestamp_ms,
                }));
            }
        }
        upto = from;
    }
    out
}

/// `GET /board/ws`: snapshots every 2 s, and at once when an alert is raised.
pub fn ws(
    state: Arc<NodeState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    warp::path!("board" / "ws")
        .and(warp::get())
        .and(warp::header::headers_cloned())
        .and(warp::ws())
        .map(move |headers: HeaderMap, ws: warp::ws::Ws| {
            let state = state.clone();
            if !cookie_ok(&state, &headers) {
                return tai_ingress::http::error_reply(
                    tai_core::ErrorCode::Unauthorized,
                    "the board needs its cookie: open /board?token=<admin token>",
                );
            }
            use warp::Reply;
            ws.on_upgrade(move |socket| push(state, socket))
                .into_response()
        })
}

async fn push(state: Arc<NodeState>, socket: warp::ws::WebSocket) {
    let how = feed(socket, PUSH_EVERY, SEND_TIMEOUT, || {
        let state = state.clone();
        async move { snapshot(&state).await.to_string() }
    })
    .await;
    if how == Fed::Stalled {
        warn!(
            give_up_secs = SEND_TIMEOUT.as_secs(),
            "a board stopped reading its WebSocket: closed it"
        );
    }
}

/// How a board's feed ended.
#[derive(Debug, PartialEq, Eq)]
enum Fed {
    /// The board closed its socket, or the socket failed.
    Closed,
    /// A snapshot did not reach the socket within its time: the board had
    /// stopped reading (a frozen tab, a laptop asleep) and the socket's
    /// buffers were full.
    Stalled,
}

/// Sends `next()` every `every`, and at once when an alert is raised, until
/// the board closes its socket or stops reading: a send that does not
/// finish within `give_up` ends the feed, and dropping the socket closes
/// it, so a board that never reads holds neither a task nor a connection
/// under `node.max_connections` for ever.
async fn feed<F, Fut>(
    socket: warp::ws::WebSocket,
    every: Duration,
    give_up: Duration,
    mut next: F,
) -> Fed
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let (mut tx, mut rx) = socket.split();
    // Reads only to notice the close.
    let reader = tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
    let mut seen = tai_core::kaizen::ALERTS_RAISED.load(Ordering::Relaxed);
    let mut last_push = tokio::time::Instant::now() - every;
    let fed = loop {
        if reader.is_finished() {
            break Fed::Closed;
        }
        let raised = tai_core::kaizen::ALERTS_RAISED.load(Ordering::Relaxed);
        if raised != seen || last_push.elapsed() >= every {
            seen = raised;
            last_push = tokio::time::Instant::now();
            let snap = next().await;
            match tokio::time::timeout(give_up, tx.send(warp::ws::Message::text(snap))).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break Fed::Closed,
                Err(_) => break Fed::Stalled,
            }
        }
        tokio::time::sleep(ALERT_POLL).await;
    };
    reader.abort();
    fed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::mpsc;

    const SIZE: usize = 256 * 1024;

    /// A warp server on 127.0.0.1:0 whose `/ws` feeds messages of [`SIZE`]
    /// bytes every 10 ms, giving a send up after 3 s (a margin for a test
    /// thread descheduled while the reading client is behind), and reports
    /// how each feed ended.
    async fn server() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Fed>) {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let route = warp::path("ws")
            .and(warp::ws())
            .map(move |ws: warp::ws::Ws| {
                let done = done_tx.clone();
                ws.on_upgrade(move |socket| async move {
                    let every = Duration::from_millis(10);
                    let fed = feed(socket, every, Duration::from_secs(3), || async {
                        "x".repeat(SIZE)
                    })
                    .await;
                    let _ = done.send(fed);
                })
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        (addr, done_rx)
    }

    #[tokio::test]
    async fn a_board_that_stops_reading_is_closed_and_one_that_reads_is_fed() {
        let (addr, mut done) = server().await;
        let url = format!("ws://{addr}/ws");
        let (mut reading, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        let received = Arc::new(AtomicUsize::new(0));
        let count = received.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(m)) = reading.next().await {
                assert_eq!(m.len(), SIZE);
                count.fetch_add(1, Ordering::Relaxed);
            }
        });

        // A board that never reads, on a socket with a small receive buffer.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let (mut stalled, _) = tokio_tungstenite::client_async(&url, stream).await.unwrap();
        let fed = tokio::time::timeout(Duration::from_secs(60), done.recv())
            .await
            .expect("the feed of a board that stopped reading never ended")
            .unwrap();
        assert_eq!(fed, Fed::Stalled);
        // Its socket was closed: reading what was buffered now comes to an end.
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(Ok(_)) = stalled.next().await {}
        })
        .await
        .expect("the socket of the board given up is still open");

        // The board that reads is still fed, and its feed has not ended.
        let before = received.load(Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while received.load(Ordering::Relaxed) < before + 10 {
            assert!(!reader.is_finished(), "the reading board's socket ended");
            assert!(
                tokio::time::Instant::now() < deadline,
                "the reading board is no longer fed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(done.try_recv().is_err(), "the reading board's feed ended");
    }
}
